//! Owners as sales persons: each user that owns an opportunity is upserted once, before the
//! opportunities that name it; a sales person Marketo rejects keeps back only its own records;
//! one Marketo has lost (718 on the opportunity call) is written again.

use oppsync_marketo::Operation as E;
use oppsync_pipeline::{Config, ResyncTarget};
use oppsync_simulators::dataverse::{Mix, Table, seed_id};
use oppsync_simulators::oracle::{self, Rules};
use oppsync_state::{StateStore, Status};
use serde_json::{Value, json};

use oppsync_tests::harness::*;

fn user(n: u64) -> String {
    seed_id(0x5e00_0000, n)
}

/// GIVEN 1,000 opportunities owned by 10 users (and one in ten by a team) WHEN they sync THEN
/// Marketo holds each user once as a sales person, written in one call that ended before the
/// first opportunity call began, and each opportunity names its owner (a team's, none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_owner_is_written_once_before_the_opportunities_that_name_it() {
    let sims = sims().await;
    let seeded = sims.dv.seed(1_000, 11, Mix::Realistic);
    let p = pipeline(&sims, sqlite(), Config::default());
    let report = sync(&p).await;
    assert_eq!(report.failed, 0, "{report:?}");
    assert_marketo_matches_dynamics(&sims);

    let snapshot = sims.mk.snapshot();
    let owners: std::collections::BTreeSet<String> = sims
        .dv
        .rows(Table::Opportunities)
        .iter()
        .filter(|(_, o)| o.lookups.get("_ownerid_value") == Some(&"systemuser"))
        .filter_map(|(_, o)| o.attributes["_ownerid_value"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(owners.len(), seeded.users.len());
    assert_eq!(
        snapshot
            .sales_persons
            .keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>(),
        owners
    );
    assert_eq!(snapshot.sales_persons[&user(0)]["email"], json!("seller0@example.com"));
    assert_eq!(sims.mk.calls(E::SalesPersonSync), 1, "10 sales persons, one call");
    assert_eq!(sims.mk.records(E::SalesPersonSync), 10, "each written once");
    let team_owned = snapshot
        .opportunities
        .values()
        .filter(|o| o.get("externalSalesPersonId") == Some(&Value::Null))
        .count();
    assert!(team_owned > 50, "one in ten is owned by a team: {team_owned}");
    let log = sims.mk.call_log();
    let sales_persons_ended = log
        .iter()
        .filter(|(op, _, _)| *op == E::SalesPersonSync)
        .map(|c| c.2)
        .max();
    let first_opportunity = log
        .iter()
        .filter(|(op, _, _)| *op == E::OpportunitySync)
        .map(|c| c.1)
        .min();
    assert!(sales_persons_ended.unwrap() <= first_opportunity.unwrap());
    assert_eq!(sims.mk.refused("718"), 0);

    // An owner's new email reaches Marketo with the next change to an opportunity it owns; an
    // unchanged owner is not written again.
    sims.dv.upsert(
        Table::SystemUsers,
        &user(3),
        json!({"internalemailaddress": "seller3.new@example.com"}),
        &[],
    );
    let owned_by_3 = sims
        .dv
        .rows(Table::Opportunities)
        .into_iter()
        .find(|(_, o)| o.attributes["_ownerid_value"] == json!(user(3)))
        .map(|(id, _)| id)
        .unwrap();
    sims.dv
        .upsert(Table::Opportunities, &owned_by_3, json!({"name": "Renamed"}), &[]);
    sims.dv.upsert(
        Table::Opportunities,
        &seed_id(0x0b00_0000, 5),
        json!({"name": "Renamed too"}),
        &[],
    );
    let again = sync(&p).await;
    assert_eq!(again.failed, 0, "{again:?}");
    assert_eq!(
        sims.mk.snapshot().sales_persons[&user(3)]["email"],
        json!("seller3.new@example.com")
    );
    assert_eq!(sims.mk.records(E::SalesPersonSync), 11, "only the changed owner again");
    assert_marketo_matches_dynamics(&sims);
}

/// GIVEN a sales person Marketo rejects (1003) WHEN 300 opportunities of three owners sync
/// THEN only the rejected owner's opportunities fail, with the sales person's code, and none of
/// them is sent (Marketo would refuse their whole call with 718); the other 200 are synced in
/// the same run. `resync --failed` then writes the 100 once Marketo takes the sales person.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sales_person_marketo_rejects_keeps_back_only_its_own_opportunities() {
    let sims = sims().await;
    sims.dv.seed(300, 5, Mix::Uniform);
    sims.mk.skip_record(&user(1), "1003", 1);
    let p = pipeline(&sims, sqlite(), Config::default());
    let report = sync(&p).await;
    assert_eq!(report.failed, 100, "{report:?}");
    assert_eq!(report.written, 200, "{report:?}");
    assert_eq!(
        sims.mk.refused("718"),
        0,
        "no opportunity call named the rejected sales person"
    );
    let failed = p
        .store()
        .get(oppsync_mapping::OpportunityId::parse(&seed_id(0x0b00_0000, 1)).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(failed.status, Status::Failed);
    let error = failed.last_error.unwrap();
    assert_eq!(
        (error.operation.as_str(), error.code.as_str()),
        ("salespersons.sync", "1003")
    );
    assert_eq!(sims.mk.snapshot().opportunities.len(), 200);

    let resynced = p.resync(ResyncTarget::Failed, false).await.unwrap();
    assert_eq!(resynced.written, 100, "{resynced:?}");
    assert_marketo_matches_dynamics(&sims);
}

/// GIVEN a synced opportunity whose sales person a Marketo admin deleted WHEN the opportunity
/// changes and syncs again THEN Marketo's 718 is met by writing the sales person again and the
/// call once more: nothing fails, Marketo holds both again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sales_person_deleted_in_marketo_is_written_again_when_marketo_answers_718() {
    let sims = sims().await;
    sims.dv.seed(300, 6, Mix::Uniform);
    let p = pipeline(&sims, sqlite(), Config::default());
    assert_eq!(sync(&p).await.failed, 0);
    assert!(sims.mk.delete_sales_person(&user(2)));
    let owned_by_2 = seed_id(0x0b00_0000, 2);
    sims.dv
        .upsert(Table::Opportunities, &owned_by_2, json!({"name": "Renamed"}), &[]);
    sims.dv.upsert(
        Table::Opportunities,
        &seed_id(0x0b00_0000, 0),
        json!({"name": "Also renamed"}),
        &[],
    );
    let before = sims.mk.calls(E::SalesPersonSync);
    let report = sync(&p).await;
    assert_eq!(
        (report.failed, report.left_for_retry, report.written),
        (0, 0, 2),
        "{report:?}"
    );
    assert_eq!(sims.mk.refused("718"), 1, "one refused call");
    assert_eq!(sims.mk.calls(E::SalesPersonSync), before + 1);
    let snapshot = sims.mk.snapshot();
    assert!(snapshot.sales_persons.contains_key(&user(2)));
    assert_eq!(snapshot.opportunities[&owned_by_2]["name"], json!("Renamed"));
    assert_marketo_matches_dynamics(&sims);
}

/// GIVEN `[mapping] sales_persons = false` WHEN opportunities sync THEN no user is read, no
/// sales person written, and no opportunity carries `externalSalesPersonId`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sales_persons_off_owners_are_neither_read_nor_written() {
    let sims = sims().await;
    sims.dv.seed(200, 8, Mix::Realistic);
    let config = Config::from_toml("[mapping]\nsales_persons = false\n", "test").unwrap();
    let p = pipeline(&sims, sqlite(), config);
    assert_eq!(sync(&p).await.failed, 0);
    assert_eq!(sims.dv.requests_to(Table::SystemUsers), 0);
    assert_eq!(sims.mk.calls(E::SalesPersonSync), 0);
    let snapshot = sims.mk.snapshot();
    assert!(snapshot.sales_persons.is_empty());
    assert!(
        snapshot
            .opportunities
            .values()
            .all(|o| !o.contains_key("externalSalesPersonId"))
    );
    let rules = Rules {
        sales_persons: false,
        ..Rules::default()
    };
    let diff = oracle::differences(&oracle::expected(&sims.dv, &rules), &snapshot, &Default::default());
    assert!(diff.is_empty(), "{diff:?}");
}

/// GIVEN an application user without Read on User (Dynamics answers 403 for `systemusers`)
/// WHEN opportunities sync THEN nothing fails: each opportunity still names its owner, and the
/// sales persons are written without email or name (the README's "a user oppsync cannot read").
/// Before, the refusal failed the whole batch's read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_read_on_user_the_sales_persons_go_without_email_and_nothing_fails() {
    let sims = sims().await;
    sims.dv.seed(300, 9, Mix::Uniform);
    sims.dv.configure(|c| c.forbidden = vec![Table::SystemUsers]);
    let p = pipeline(&sims, sqlite(), Config::default());
    let report = sync(&p).await;
    assert_eq!(
        (report.failed, report.left_for_retry, report.written),
        (0, 0, 300),
        "{report:?}"
    );
    assert!(sims.dv.requests_to(Table::SystemUsers) > 0, "the owners were asked for");
    let snapshot = sims.mk.snapshot();
    assert_eq!(snapshot.sales_persons.len(), 3);
    assert!(snapshot.sales_persons.values().all(|p| !p.contains_key("email")));
    for (id, o) in &snapshot.opportunities {
        let owner = &sims.dv.row(Table::Opportunities, id).unwrap().attributes["_ownerid_value"];
        assert_eq!(o.get("externalSalesPersonId"), Some(owner), "{id}");
    }
}
