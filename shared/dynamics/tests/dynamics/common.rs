use std::time::Duration;

use oppsync_dynamics::{DataverseClient, DataverseSettings, EntitySet, Secret};
use oppsync_simulators::DataverseSim;
use oppsync_simulators::dataverse::DataverseConfig;

pub async fn sim() -> DataverseSim {
    DataverseSim::start(DataverseConfig::default()).await.unwrap()
}

pub fn client(sim: &DataverseSim, page_size: u32) -> DataverseClient {
    let (tenant, id, secret) = sim.credentials();
    let mut settings =
        DataverseSettings::new(&sim.url(), &tenant, &id, Secret::from(secret), Some(&sim.token_url())).unwrap();
    settings.page_size = page_size;
    DataverseClient::new(settings)
        .unwrap()
        .with_backoff_base(Duration::from_millis(10))
}

pub const OPPORTUNITY_SELECT: &[&str] = &[
    "opportunityid",
    "name",
    "estimatedvalue",
    "statecode",
    "_customerid_value",
    "_parentaccountid_value",
    "_parentcontactid_value",
    "versionnumber",
    "modifiedon",
];

pub const CONNECTION_SELECT: &[&str] = &[
    "connectionid",
    "_record1id_value",
    "_record2id_value",
    "record1objecttypecode",
    "record2objecttypecode",
    "_record2roleid_value",
    "statecode",
];

/// Reads a table's changes to the end: all rows, deletions, pages, and the final cursor.
pub async fn read_all(
    client: &DataverseClient,
    set: EntitySet,
    select: &[&str],
    cursor: Option<String>,
) -> (Vec<serde_json::Value>, Vec<String>, usize, String, bool) {
    let (mut rows, mut deleted, mut pages, mut resync) = (Vec::new(), Vec::new(), 0, false);
    let mut cursor = cursor;
    loop {
        let page = client.changes(set, select, cursor.as_deref()).await.unwrap();
        pages += 1;
        resync |= page.full_resync;
        rows.extend(page.rows);
        deleted.extend(page.deleted);
        cursor = Some(page.cursor);
        if page.caught_up {
            return (rows, deleted, pages, cursor.unwrap(), resync);
        }
        assert!(pages < 1000, "paging does not end");
    }
}
