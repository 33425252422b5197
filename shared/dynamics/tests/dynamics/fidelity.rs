//! The client against what Microsoft's pages show and what they leave open: the expired
//! version stamp at any status, the empty delta answer, a read that ends without a delta link,
//! redirects, and `In()` requests sized to the 32 KB URL limit.

use oppsync_dynamics::{DataverseError, EntitySet, MAX_GET_URL};
use oppsync_simulators::dataverse::{Mix, Table};
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn the_expired_version_stamp_is_recognised_whatever_the_status() {
    // The Web API's status for 0x80044352 is not documented: the code or message decides.
    for status in [400, 404, 410, 500, 503] {
        let sim = sim().await;
        sim.configure(|c| c.expired_stamp_status = status);
        sim.seed(12, 1, Mix::Realistic);
        let client = client(&sim, 5);
        let (_, _, _, cursor, _) = read_all(&client, EntitySet::Opportunities, OPPORTUNITY_SELECT, None).await;
        sim.expire_delta_tokens();
        let (rows, _, _, _, resync) =
            read_all(&client, EntitySet::Opportunities, OPPORTUNITY_SELECT, Some(cursor)).await;
        assert!(resync, "HTTP {status}: a full read, flagged");
        assert_eq!(rows.len(), 12, "HTTP {status}");
    }
}

#[tokio::test]
async fn an_empty_answer_to_a_delta_read_keeps_the_delta_link() {
    // Change-tracking page: "An empty JSON response is returned if no table changes have
    // occurred". The cursor stays where it was and later changes are still seen.
    let sim = sim().await;
    sim.configure(|c| c.empty_delta_body = true);
    let seeded = sim.seed(8, 1, Mix::Realistic);
    let client = client(&sim, 5);
    let (_, _, _, cursor, _) = read_all(&client, EntitySet::Opportunities, OPPORTUNITY_SELECT, None).await;
    let page = client
        .changes(EntitySet::Opportunities, OPPORTUNITY_SELECT, Some(&cursor))
        .await
        .unwrap();
    assert!(page.caught_up && page.rows.is_empty() && page.deleted.is_empty());
    assert_eq!(page.cursor, cursor);
    sim.upsert(
        Table::Opportunities,
        &seeded.opportunities[3],
        json!({"estimatedvalue": 7}),
        &[],
    );
    let (rows, _, _, _, _) = read_all(&client, EntitySet::Opportunities, OPPORTUNITY_SELECT, Some(cursor)).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["opportunityid"], json!(seeded.opportunities[3]));
}

#[tokio::test]
async fn a_full_read_that_ends_without_a_delta_link_starts_again_rather_than_stalling() {
    let sim = sim().await;
    sim.configure(|c| c.never_delta_link = true);
    sim.seed(12, 1, Mix::Realistic);
    let client = client(&sim, 5);
    let (rows, _, pages, cursor, _) = read_all(&client, EntitySet::Opportunities, OPPORTUNITY_SELECT, None).await;
    assert_eq!((rows.len(), pages), (12, 3), "the read still ends, caught up");
    assert!(
        !cursor.contains("deltatoken") && !cursor.contains("skiptoken"),
        "{cursor}"
    );
    // Once Dataverse hands out delta links again, the restarted read gets one.
    sim.configure(|c| c.never_delta_link = false);
    let (rows, _, _, cursor, _) = read_all(&client, EntitySet::Opportunities, OPPORTUNITY_SELECT, Some(cursor)).await;
    assert_eq!(rows.len(), 12);
    assert!(cursor.contains("deltatoken"), "{cursor}");
}

#[tokio::test]
async fn a_redirect_is_an_error_and_is_never_followed() {
    let elsewhere = sim().await;
    let sim = sim().await;
    sim.seed(2, 1, Mix::Realistic);
    sim.configure(|c| c.redirect_to = Some(format!("{}/api/data/v9.2/opportunities", elsewhere.url())));
    let client = client(&sim, 5);
    let err = client
        .changes(EntitySet::Opportunities, OPPORTUNITY_SELECT, None)
        .await
        .unwrap_err();
    assert!(matches!(err, DataverseError::Redirected { status: 302, .. }), "{err}");
    assert!(
        err.to_string().contains("127.0.0.1") && err.to_string().contains("DYNAMICS_URL"),
        "{err}"
    );
    assert_eq!(elsewhere.requests(), 0, "the redirect was followed");
    assert_eq!(elsewhere.token_requests(), 0);
}

#[tokio::test]
async fn in_requests_are_sized_from_the_encoded_url_with_room_for_a_skiptoken() {
    let sim = sim().await;
    let client = client(&sim, 5000);
    let ids: Vec<String> = (0..5000).map(|n| format!("0b000000-0000-4000-8000-{n:012}")).collect();
    let select = [
        "connectionid",
        "_record1id_value",
        "_record2id_value",
        "record2objecttypecode",
        "statecode",
    ];
    let urls = client
        .in_urls(
            EntitySet::Connections,
            "record1id",
            &ids,
            &select,
            Some("record1objecttypecode eq 3 and record2objecttypecode eq 2 and statecode eq 0"),
            Some("record2roleid($select=connectionroleid,name,category)"),
        )
        .unwrap();
    let mut covered = 0;
    for url in &urls {
        let len = url.as_str().len();
        assert!(len <= MAX_GET_URL, "{len} bytes");
        assert!(len + 2048 <= 32 * 1024, "no room for a skiptoken: {len}");
        covered += url.as_str().matches("0b000000-0000-4000-8000-").count();
    }
    assert_eq!(covered, 5000, "every id once");
    // Full requests: all but the last are within one id of the limit.
    for url in &urls[..urls.len() - 1] {
        assert!(url.as_str().len() + 60 > MAX_GET_URL, "{}", url.as_str().len());
    }
    // A select that cannot fit even one id is refused with a message, not sent.
    let huge: Vec<String> = (0..2000).map(|i| format!("new_field_{i:05}")).collect();
    let huge: Vec<&str> = huge.iter().map(String::as_str).collect();
    let err = client
        .in_urls(EntitySet::Opportunities, "opportunityid", &ids[..1], &huge, None, None)
        .unwrap_err();
    assert!(err.to_string().contains("32 KB"), "{err}");
}

#[tokio::test]
async fn a_row_is_confirmed_by_its_key_and_a_404_says_it_is_gone() {
    let sim = sim().await;
    let seeded = sim.seed(2, 1, Mix::Realistic);
    let client = client(&sim, 5);
    assert!(
        client
            .exists(EntitySet::Opportunities, &seeded.opportunities[0])
            .await
            .unwrap()
    );
    sim.delete(Table::Opportunities, &seeded.opportunities[1]);
    assert!(
        !client
            .exists(EntitySet::Opportunities, &seeded.opportunities[1])
            .await
            .unwrap()
    );
}

/// Whether a null matches `ne 'x'` is left open by the Filter rows page: the currency check
/// says `ne null` outright, so an opportunity without a currency is not a second currency,
/// and it takes two one-row requests whatever the table's size.
#[tokio::test]
async fn the_currencies_in_use_are_found_in_two_requests_and_a_missing_one_is_not_counted() {
    let sim = sim().await;
    let seeded = sim.seed(30, 4, Mix::Uniform);
    let client = client(&sim, 5000);
    sim.upsert(
        Table::Opportunities,
        &seeded.opportunities[3],
        json!({"_transactioncurrencyid_value": null}),
        &[],
    );
    let before = sim.requests();
    let found = client.opportunity_currencies().await.unwrap();
    assert_eq!(found, vec![oppsync_simulators::dataverse::SEED_CURRENCY.to_owned()]);
    assert_eq!(sim.requests() - before, 2);
    let euro = "7c000000-0000-4000-8000-000000000002";
    sim.upsert(
        Table::Opportunities,
        &seeded.opportunities[7],
        json!({"_transactioncurrencyid_value": euro}),
        &[],
    );
    let found = client.opportunity_currencies().await.unwrap();
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found.contains(&euro.to_owned()));
}
