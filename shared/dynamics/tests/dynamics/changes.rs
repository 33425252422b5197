//! Change detection: initial loads across pages, increments, deletions, stakeholder changes,
//! expired delta tokens, watermarks.

use oppsync_dynamics::{EntitySet, Watermark, opportunities_touched};
use oppsync_mapping::OpportunityId;
use oppsync_simulators::dataverse::{Mix, Table};
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn an_initial_load_pages_through_every_row_without_asking_for_annotations() {
    let sim = sim().await;
    // The reported defect (powerapps-docs issue 439): asking for annotations on a
    // change-tracking read loses the delta link. The client does not ask, so it keeps it.
    sim.configure(|c| c.annotations_drop_delta_link = true);
    let seeded = sim.seed(120, 7, Mix::Realistic);
    let client = client(&sim, 50);
    let (rows, deleted, pages, cursor, resync) =
        read_all(&client, EntitySet::Opportunities, OPPORTUNITY_SELECT, None).await;
    assert_eq!(rows.len(), 120);
    assert_eq!(pages, 3, "120 rows at 50 a page");
    assert!(deleted.is_empty() && !resync);
    assert!(
        cursor.contains("$deltatoken") || cursor.contains("%24deltatoken"),
        "{cursor}"
    );
    let mut ids: Vec<&str> = rows.iter().map(|r| r["opportunityid"].as_str().unwrap()).collect();
    ids.sort_unstable();
    let mut expected: Vec<&str> = seeded.opportunities.iter().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(ids, expected, "every row exactly once");
    let with_customer = rows.iter().find(|r| !r["_customerid_value"].is_null()).unwrap();
    assert!(with_customer["_customerid_value@Microsoft.Dynamics.CRM.lookuplogicalname"].is_null());
    assert!(rows[0]["statecode@OData.Community.Display.V1.FormattedValue"].is_null());
    // Only what was selected comes back.
    assert!(rows[0].get("description").is_none());
}

#[tokio::test]
async fn an_incremental_read_returns_exactly_the_changes_and_the_deletions() {
    let sim = sim().await;
    let seeded = sim.seed(30, 3, Mix::Realistic);
    let client = client(&sim, 10);
    let (_, _, _, cursor, _) = read_all(&client, EntitySet::Opportunities, OPPORTUNITY_SELECT, None).await;
    // Nothing changed: nothing comes back.
    let (rows, deleted, _, cursor, _) =
        read_all(&client, EntitySet::Opportunities, OPPORTUNITY_SELECT, Some(cursor)).await;
    assert!(rows.is_empty() && deleted.is_empty());
    sim.upsert(
        Table::Opportunities,
        &seeded.opportunities[4],
        json!({"estimatedvalue": 99}),
        &[],
    );
    sim.upsert(
        Table::Opportunities,
        "0b000000-0000-4000-8000-999999999999",
        json!({"name": "New", "statecode": 0}),
        &[],
    );
    assert!(sim.delete(Table::Opportunities, &seeded.opportunities[7]));
    let (rows, deleted, _, _, _) = read_all(&client, EntitySet::Opportunities, OPPORTUNITY_SELECT, Some(cursor)).await;
    let ids: Vec<&str> = rows.iter().map(|r| r["opportunityid"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        [seeded.opportunities[4].as_str(), "0b000000-0000-4000-8000-999999999999"]
    );
    assert_eq!(rows[0]["estimatedvalue"], 99);
    assert_eq!(deleted, [seeded.opportunities[7].clone()]);
}

#[tokio::test]
async fn stakeholder_changes_are_seen_through_connections_and_name_their_opportunity() {
    let sim = sim().await;
    let seeded = sim.seed(10, 5, Mix::Uniform);
    let client = client(&sim, 5000);
    let (rows, _, _, cursor, _) = read_all(&client, EntitySet::Connections, CONNECTION_SELECT, None).await;
    assert_eq!(
        rows.len(),
        10 * 2 * 2,
        "2 stakeholders each, each connection stored twice"
    );
    let opp = &seeded.opportunities[3];
    let opportunity_row_before = sim.row(Table::Opportunities, opp).unwrap();
    let pair = sim.add_stakeholder(opp, &seeded.contacts[29], "f0000000-0000-4000-8000-000000000003");
    // A stakeholder change does not touch the opportunity itself...
    assert_eq!(sim.row(Table::Opportunities, opp).unwrap(), opportunity_row_before);
    // ...so it is the connections' changes that name it.
    let (rows, _, _, cursor, _) = read_all(&client, EntitySet::Connections, CONNECTION_SELECT, Some(cursor)).await;
    assert_eq!(rows.len(), 2);
    let touched: Vec<OpportunityId> = opportunities_touched(&rows).into_iter().collect();
    assert_eq!(touched, [OpportunityId::parse(opp).unwrap()]);
    // Removing it deletes both rows; deletions carry only their ids.
    sim.remove_connection(&pair);
    let (rows, deleted, _, _, _) = read_all(&client, EntitySet::Connections, CONNECTION_SELECT, Some(cursor)).await;
    assert!(rows.is_empty());
    let mut expected = vec![pair.0.clone(), pair.1.clone()];
    expected.sort();
    let mut deleted = deleted;
    deleted.sort();
    assert_eq!(deleted, expected);
}

#[tokio::test]
async fn an_expired_delta_token_leads_to_a_full_read_automatically() {
    let sim = sim().await;
    sim.seed(25, 9, Mix::Realistic);
    let client = client(&sim, 10);
    let (_, _, _, cursor, _) = read_all(&client, EntitySet::Opportunities, OPPORTUNITY_SELECT, None).await;
    sim.expire_delta_tokens();
    let (rows, _, pages, cursor, resync) =
        read_all(&client, EntitySet::Opportunities, OPPORTUNITY_SELECT, Some(cursor)).await;
    assert!(resync, "the page must say it is a full resync");
    assert_eq!(rows.len(), 25, "everything, again");
    assert_eq!(pages, 3);
    // And the new cursor works.
    let (rows, _, _, _, resync) = read_all(&client, EntitySet::Opportunities, OPPORTUNITY_SELECT, Some(cursor)).await;
    assert!(rows.is_empty() && !resync);
}

#[tokio::test]
async fn a_versionnumber_watermark_sees_every_change_once() {
    let sim = sim().await;
    let seeded = sim.seed(20, 1, Mix::Realistic);
    let client = client(&sim, 7);
    let (rows, mark) = client
        .watermark_changes(EntitySet::Opportunities, OPPORTUNITY_SELECT, &Watermark::Version(0))
        .await
        .unwrap();
    assert_eq!(rows.len(), 20);
    let (rows, mark) = client
        .watermark_changes(EntitySet::Opportunities, OPPORTUNITY_SELECT, &mark)
        .await
        .unwrap();
    assert!(rows.is_empty());
    sim.upsert(
        Table::Opportunities,
        &seeded.opportunities[0],
        json!({"name": "Renamed"}),
        &[],
    );
    let (rows, _) = client
        .watermark_changes(EntitySet::Opportunities, OPPORTUNITY_SELECT, &mark)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["name"], "Renamed");
}

#[tokio::test]
async fn a_modifiedon_watermark_uses_ge_and_drops_only_what_it_already_saw() {
    let sim = sim().await;
    let seeded = sim.seed(5, 1, Mix::Uniform);
    let client = client(&sim, 5000);
    let start = Watermark::ModifiedOn {
        at: "2026-01-01T00:00:00Z".into(),
        seen: vec![],
    };
    let (rows, mark) = client
        .watermark_changes(EntitySet::Opportunities, OPPORTUNITY_SELECT, &start)
        .await
        .unwrap();
    assert_eq!(rows.len(), 5);
    // `ge` returns the last row again; it is recognised and dropped.
    let (rows, mark) = client
        .watermark_changes(EntitySet::Opportunities, OPPORTUNITY_SELECT, &mark)
        .await
        .unwrap();
    assert!(rows.is_empty(), "{rows:?}");
    sim.upsert(
        Table::Opportunities,
        &seeded.opportunities[1],
        json!({"name": "Changed"}),
        &[],
    );
    let (rows, _) = client
        .watermark_changes(EntitySet::Opportunities, OPPORTUNITY_SELECT, &mark)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
}

/// A watermark read stopped after its first page goes on from where that page reached: the
/// rest, each row once, none of the first page again. For both watermarks.
#[tokio::test]
async fn a_watermark_read_resumed_from_where_its_first_page_reached_reads_exactly_the_rest() {
    for start in [
        Watermark::Version(0),
        Watermark::ModifiedOn {
            at: "2026-01-01T00:00:00Z".into(),
            seen: vec![],
        },
    ] {
        let sim = sim().await;
        let seeded = sim.seed(20, 1, Mix::Uniform);
        let client = client(&sim, 7);
        let first = client
            .watermark_page(EntitySet::Opportunities, OPPORTUNITY_SELECT, &start, None)
            .await
            .unwrap();
        assert_eq!(first.rows.len(), 7, "{start:?}");
        assert!(first.next.is_some(), "{start:?}: more pages follow");
        let (rest, _) = client
            .watermark_changes(EntitySet::Opportunities, OPPORTUNITY_SELECT, &first.reached)
            .await
            .unwrap();
        assert_eq!(rest.len(), 13, "{start:?}: the rest, none of the first page again");
        let mut ids: Vec<&str> = first
            .rows
            .iter()
            .chain(&rest)
            .map(|r| r["opportunityid"].as_str().unwrap())
            .collect();
        ids.sort_unstable();
        let mut expected: Vec<&str> = seeded.opportunities.iter().map(String::as_str).collect();
        expected.sort_unstable();
        assert_eq!(ids, expected, "{start:?}: every row exactly once");
    }
}

#[tokio::test]
async fn a_full_id_scan_finds_what_a_watermark_cannot_see_deleted() {
    let sim = sim().await;
    let seeded = sim.seed(12, 1, Mix::Uniform);
    let client = client(&sim, 5);
    sim.delete(Table::Opportunities, &seeded.opportunities[2]);
    let ids = client.all_ids(EntitySet::Opportunities).await.unwrap();
    assert_eq!(ids.len(), 11);
    assert!(!ids.contains(&oppsync_mapping::Guid::parse(&seeded.opportunities[2]).unwrap()));
}

#[tokio::test]
async fn the_simulator_serves_single_records_and_top() {
    let sim = sim().await;
    let seeded = sim.seed(5, 1, Mix::Uniform);
    let token_client = reqwest::Client::new();
    let (_, id, secret) = sim.credentials();
    let token: serde_json::Value = token_client
        .post(sim.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", id.as_str()),
            ("client_secret", secret.as_str()),
            ("scope", &format!("{}/.default", sim.url())),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let bearer = token["access_token"].as_str().unwrap().to_owned();
    let get = |path: String| {
        let (c, b) = (token_client.clone(), bearer.clone());
        async move { c.get(path).bearer_auth(b).send().await.unwrap() }
    };
    let one = get(format!(
        "{}/api/data/v9.2/opportunities({})?$select=name",
        sim.url(),
        seeded.opportunities[2]
    ))
    .await;
    let one: serde_json::Value = one.json().await.unwrap();
    assert_eq!(one["name"], "Opportunity 2");
    let missing = get(format!(
        "{}/api/data/v9.2/opportunities(0b000000-0000-4000-8000-000000000999)",
        sim.url()
    ))
    .await;
    assert_eq!(missing.status().as_u16(), 404);
    let top: serde_json::Value = get(format!("{}/api/data/v9.2/accounts?$top=1", sim.url()))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(top["value"].as_array().unwrap().len(), 1);
}
