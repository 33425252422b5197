//! Each write step on the in-memory ports: no socket, no simulator. The Dataverse rows are the
//! mapping crate's fixtures (every customer and stakeholder case); the store is real SQLite.

use std::path::PathBuf;

use oppsync_mapping::OpportunityId;
use oppsync_marketo::RoleKey;
use oppsync_pipeline::memory::{MemoryDataverse, MemoryMarketo};
use oppsync_pipeline::{Config, DrainReport, Pipeline, ResyncTarget};
use oppsync_state::{SqliteStore, StateStore, Status};
use oppsync_tests::harness::sqlite;
use serde_json::{Value, json};

pub(crate) fn o(n: u64) -> String {
    format!("0b000000-0000-4000-8000-{n:012}")
}

/// The `value` rows of one of the mapping crate's fixture files.
pub(crate) fn rows(name: &str) -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../mapping/tests/fixtures")
        .join(name);
    let page: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    page["value"].as_array().unwrap().clone()
}

/// Dynamics holding the fixture opportunities numbered `numbers` and everything they refer to.
pub(crate) fn dataverse(numbers: &[u64]) -> MemoryDataverse {
    let wanted: Vec<String> = numbers.iter().map(|n| o(*n)).collect();
    let opportunities = rows("opportunities.json")
        .into_iter()
        .filter(|r| wanted.iter().any(|w| r["opportunityid"] == w.as_str()))
        .collect();
    // Only the connections of these opportunities: one naming another would make the poll
    // touch an opportunity this Dynamics does not hold.
    let connections = rows("connections.json")
        .into_iter()
        .filter(|c| {
            wanted
                .iter()
                .any(|w| c["_record1id_value"] == w.as_str() || c["_record2id_value"] == w.as_str())
        })
        .collect();
    MemoryDataverse::new(
        opportunities,
        rows("accounts.json"),
        rows("contacts.json"),
        rows("connectionroles.json"),
        connections,
    )
}

pub(crate) type Memory = Pipeline<SqliteStore, MemoryDataverse, MemoryMarketo>;

pub(crate) fn pipeline(dv: &MemoryDataverse, mk: &MemoryMarketo) -> Memory {
    Pipeline::new(sqlite(), dv.clone(), mk.clone(), Config::default(), "memory-test")
}

pub(crate) async fn sync(p: &Memory) -> DrainReport {
    let poll = p.poll(None).await.unwrap();
    assert!(poll.caught_up, "{poll:?}");
    p.drain(|_, _| {}).await.unwrap()
}

pub(crate) async fn status(p: &Memory, n: u64) -> Status {
    p.store()
        .get(OpportunityId::parse(&o(n)).unwrap())
        .await
        .unwrap()
        .unwrap()
        .status
}

#[tokio::test]
async fn companies_are_written_before_the_opportunity_that_names_them() {
    let (dv, mk) = (dataverse(&[1]), MemoryMarketo::default());
    let p = pipeline(&dv, &mk);
    let report = sync(&p).await;
    assert_eq!((report.written, report.failed), (1, 0), "{report:?}");
    let holds = mk.holds();
    let account = "a0000000-0000-4000-8000-000000000001";
    assert!(holds.companies[account]["company"].is_string(), "{holds:?}");
    assert_eq!(holds.opportunities[&o(1)]["externalCompanyId"], json!(account));
    let company = holds.calls.iter().position(|c| *c == "companies.sync").unwrap();
    let opportunity = holds.calls.iter().position(|c| *c == "opportunities.sync").unwrap();
    assert!(company < opportunity, "{:?}", holds.calls);
}

#[tokio::test]
async fn leads_found_are_reused_and_only_missing_ones_are_created() {
    // Opportunity 2: contact customer Ada (already a lead) and stakeholder Barbara (not yet).
    let (dv, mk) = (dataverse(&[2]), MemoryMarketo::default());
    let ada = mk.add_lead(json!({"email": "ada@contoso.example"}));
    let p = pipeline(&dv, &mk);
    sync(&p).await;
    let holds = mk.holds();
    let barbara = holds
        .leads
        .iter()
        .find(|(_, f)| f["email"] == json!("barbara@mit.example"))
        .map(|(id, _)| *id)
        .expect("Barbara's lead was created");
    assert_eq!(holds.leads.len(), 2, "no second lead for Ada: {:?}", holds.leads);
    assert_eq!(holds.calls.iter().filter(|c| **c == "leads.sync").count(), 1);
    let leads: Vec<i64> = holds.roles.keys().map(|k| k.lead_id).collect();
    assert!(leads.contains(&ada) && leads.contains(&barbara), "{:?}", holds.roles);
}

/// Lead calls made since the calls numbered `since`, by endpoint.
fn lead_calls(mk: &MemoryMarketo, since: usize) -> Vec<&'static str> {
    mk.holds().calls[since..]
        .iter()
        .copied()
        .filter(|c| c.starts_with("leads."))
        .collect()
}

/// Opportunity 2 again under another id: the same contact customer (Ada) and stakeholders.
fn another_opportunity_for_the_same_contacts(dv: &MemoryDataverse, n: u64) {
    let mut row = rows("opportunities.json")
        .into_iter()
        .find(|r| r["opportunityid"] == o(2).as_str())
        .unwrap();
    row["opportunityid"] = json!(o(n));
    row["name"] = json!(format!("Opportunity {n}"));
    dv.upsert_opportunity(row);
}

#[tokio::test]
async fn an_existing_lead_is_never_changed_and_a_contact_seen_before_costs_no_lead_call() {
    let (dv, mk) = (dataverse(&[2]), MemoryMarketo::default());
    // Ada's lead exists, and a Marketo user edited her first name.
    let ada = mk.add_lead(json!({"email": "ada@contoso.example", "firstName": "Countess"}));
    let p = pipeline(&dv, &mk);
    let report = sync(&p).await;
    assert_eq!((report.written, report.failed), (1, 0), "{report:?}");
    // One creation call (Barbara created, Ada skipped as existing), one lookup (Ada found).
    assert_eq!(lead_calls(&mk, 0), ["leads.sync", "leads.query"]);
    let holds = mk.holds();
    assert_eq!(
        holds.leads[&ada]["firstName"],
        json!("Countess"),
        "an existing lead was changed"
    );
    assert!(holds.roles.keys().any(|k| k.lead_id == ada), "{:?}", holds.roles);
    // A new opportunity for the same contacts: their leads are remembered, no lead call.
    let since = mk.holds().calls.len();
    another_opportunity_for_the_same_contacts(&dv, 20);
    let report = sync(&p).await;
    assert_eq!((report.written, report.failed), (1, 0), "{report:?}");
    assert_eq!(lead_calls(&mk, since), Vec::<&str>::new());
    let holds = mk.holds();
    assert_eq!(holds.leads.len(), 2, "{:?}", holds.leads);
    assert!(
        holds
            .roles
            .keys()
            .any(|k| k.external_opportunity_id == o(20) && k.lead_id == ada),
        "{:?}",
        holds.roles
    );
}

#[tokio::test]
async fn new_contacts_cost_one_lead_call_in_all() {
    let (dv, mk) = (dataverse(&[2]), MemoryMarketo::default());
    let p = pipeline(&dv, &mk);
    sync(&p).await;
    // Ada and Barbara are both new: one creation returns both ids; no lookup.
    assert_eq!(lead_calls(&mk, 0), ["leads.sync"]);
    assert_eq!(mk.holds().leads.len(), 2);
}

#[tokio::test]
async fn a_remembered_lead_deleted_in_marketo_is_found_or_created_again() {
    use std::sync::atomic::{AtomicI64, Ordering};
    let (dv, mk) = (dataverse(&[2]), MemoryMarketo::default());
    let clock = std::sync::Arc::new(AtomicI64::new(1_800_000_000_000));
    let now = clock.clone();
    let p = pipeline(&dv, &mk).with_clock(std::sync::Arc::new(move || now.load(Ordering::Relaxed)));
    sync(&p).await;
    // Past the minute a creation keeps its email locked.
    clock.fetch_add(61_000, Ordering::Relaxed);
    let ada = mk
        .holds()
        .leads
        .iter()
        .find(|(_, f)| f["email"] == json!("ada@contoso.example"))
        .map(|(id, _)| *id)
        .unwrap();
    // A Marketo user deletes Ada's lead (or merges it away).
    mk.remove_lead(ada);
    another_opportunity_for_the_same_contacts(&dv, 21);
    let report = sync(&p).await;
    assert_eq!((report.written, report.failed), (1, 0), "{report:?}");
    let holds = mk.holds();
    let again = holds
        .leads
        .iter()
        .find(|(_, f)| f["email"] == json!("ada@contoso.example"))
        .map(|(id, _)| *id)
        .expect("Ada's lead created again");
    assert_ne!(again, ada);
    assert!(
        holds
            .roles
            .keys()
            .any(|k| k.external_opportunity_id == o(21) && k.lead_id == again),
        "{:?}",
        holds.roles
    );
    // Remembered again: the next opportunity costs no lead call.
    let since = mk.holds().calls.len();
    another_opportunity_for_the_same_contacts(&dv, 22);
    sync(&p).await;
    assert_eq!(lead_calls(&mk, since), Vec::<&str>::new());
}

#[tokio::test]
async fn opportunities_and_their_roles_are_written_with_the_customer_as_primary() {
    let (dv, mk) = (dataverse(&[3, 6]), MemoryMarketo::default());
    let p = pipeline(&dv, &mk);
    let report = sync(&p).await;
    assert_eq!((report.written, report.failed), (2, 0), "{report:?}");
    let holds = mk.holds();
    assert_eq!(holds.opportunities[&o(6)]["isWon"], json!(true));
    // Opportunity 3: a contact customer without an account: one primary Potential Customer role.
    let customer: Vec<(&RoleKey, &bool)> = holds
        .roles
        .iter()
        .filter(|(k, _)| k.external_opportunity_id == o(3))
        .collect();
    assert_eq!(customer.len(), 1, "{customer:?}");
    assert_eq!(
        (customer[0].0.role.as_str(), *customer[0].1),
        ("Potential Customer", true)
    );
    // Opportunity 6: its active stakeholders with a Stakeholder-category role (not the inactive
    // connection, not Sales Team).
    let stakeholders = holds.roles.keys().filter(|k| k.external_opportunity_id == o(6)).count();
    assert!(stakeholders >= 3, "{:?}", holds.roles);
    assert!(
        holds.calls.iter().position(|c| *c == "opportunities.sync")
            < holds.calls.iter().position(|c| *c == "roles.sync")
    );
}

/// The calls made since the calls numbered `since`.
fn calls_since(mk: &MemoryMarketo, since: usize) -> Vec<&'static str> {
    mk.holds().calls[since..].to_vec()
}

#[tokio::test]
async fn an_incremental_write_sends_only_the_parts_that_changed() {
    let (dv, mk) = (dataverse(&[6]), MemoryMarketo::default());
    let p = pipeline(&dv, &mk);
    sync(&p).await;
    let roles = mk.holds().roles.clone();
    // The amount changes: the opportunity alone is sent; its company, leads and roles are in
    // Marketo as planned.
    let mut row = rows("opportunities.json")
        .into_iter()
        .find(|r| r["opportunityid"] == o(6).as_str())
        .unwrap();
    row["estimatedvalue"] = json!(123_456.0);
    row["versionnumber"] = json!(row["versionnumber"].as_i64().unwrap_or(1) + 1);
    dv.upsert_opportunity(row);
    let since = mk.holds().calls.len();
    let report = sync(&p).await;
    assert_eq!((report.written, report.failed), (1, 0), "{report:?}");
    assert_eq!(calls_since(&mk, since), ["opportunities.sync"]);
    let holds = mk.holds();
    assert_eq!(holds.opportunities[&o(6)]["amount"], json!(123_456.0));
    assert_eq!(holds.roles, roles);
    // A stakeholder goes: its role is deleted; the opportunity, unchanged, is not sent.
    let edsger: Vec<Value> = rows("connections.json")
        .into_iter()
        .filter(|c| {
            [
                "e0000000-0000-4000-8000-000000000010",
                "e0000000-0000-4000-8000-000000000011",
            ]
            .contains(&c["connectionid"].as_str().unwrap_or_default())
        })
        .collect();
    assert_eq!(edsger.len(), 2);
    dv.delete_connection("e0000000-0000-4000-8000-000000000010");
    dv.delete_connection("e0000000-0000-4000-8000-000000000011");
    let since = mk.holds().calls.len();
    let report = sync(&p).await;
    assert_eq!((report.written, report.failed), (1, 0), "{report:?}");
    assert_eq!(calls_since(&mk, since), ["roles.delete"]);
    assert_eq!(mk.holds().roles.len(), roles.len() - 1);
    // The stakeholder comes back: one role sent, on the remembered lead; nothing else.
    for row in edsger {
        dv.upsert_connection(row);
    }
    let since = mk.holds().calls.len();
    let report = sync(&p).await;
    assert_eq!((report.written, report.failed), (1, 0), "{report:?}");
    assert_eq!(calls_since(&mk, since), ["roles.sync"]);
    assert_eq!(mk.holds().roles, roles);
    // A resync writes everything again (it is how a user repairs Marketo).
    let since = mk.holds().calls.len();
    let report = p
        .resync(ResyncTarget::Ids(vec![OpportunityId::parse(&o(6)).unwrap()]), false)
        .await
        .unwrap();
    assert!(report.stopped.is_none(), "{report:?}");
    let resent = calls_since(&mk, since);
    assert!(
        resent.contains(&"opportunities.sync") && resent.contains(&"roles.sync"),
        "{resent:?}"
    );
}

#[tokio::test]
async fn a_removed_stakeholder_has_its_role_deleted() {
    let (dv, mk) = (dataverse(&[6]), MemoryMarketo::default());
    let p = pipeline(&dv, &mk);
    sync(&p).await;
    let before = mk.holds().roles.len();
    // Edsger (contact 5) stops being a stakeholder: both rows of the connection go.
    dv.delete_connection("e0000000-0000-4000-8000-000000000010");
    dv.delete_connection("e0000000-0000-4000-8000-000000000011");
    let report = p
        .resync(ResyncTarget::Ids(vec![OpportunityId::parse(&o(6)).unwrap()]), false)
        .await
        .unwrap();
    assert!(report.stopped.is_none(), "{report:?}");
    let holds = mk.holds();
    assert_eq!(holds.roles.len(), before - 1, "{:?}", holds.roles);
    assert!(holds.calls.contains(&"roles.delete"), "{:?}", holds.calls);
}

#[tokio::test]
async fn an_opportunity_deleted_in_dynamics_is_deleted_in_marketo() {
    let (dv, mk) = (dataverse(&[1, 3]), MemoryMarketo::default());
    let p = pipeline(&dv, &mk);
    sync(&p).await;
    dv.delete_opportunity(&o(1));
    let report = sync(&p).await;
    assert_eq!(report.written, 1, "{report:?}");
    let holds = mk.holds();
    assert!(!holds.opportunities.contains_key(&o(1)) && holds.opportunities.contains_key(&o(3)));
    assert!(holds.calls.contains(&"opportunities.delete"), "{:?}", holds.calls);
    assert_eq!(status(&p, 1).await, Status::Deleted);
}

#[tokio::test]
async fn a_record_marketo_refuses_fails_alone_with_its_code() {
    let (dv, mk) = (dataverse(&[1, 3]), MemoryMarketo::default());
    mk.refuse(&o(3), "1003");
    let p = pipeline(&dv, &mk);
    let report = sync(&p).await;
    assert_eq!((report.written, report.failed), (1, 1), "{report:?}");
    assert_eq!(status(&p, 3).await, Status::Failed);
    let state = p
        .store()
        .get(OpportunityId::parse(&o(3)).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.last_error.unwrap().code, "1003");
}

#[tokio::test]
async fn a_deleted_opportunity_restored_in_dynamics_comes_back_with_its_roles() {
    // Dataverse's recycle bin restores a record with its id and a new version: it is a change
    // like any other, and the opportunity (and its roles) must return to Marketo.
    let (dv, mk) = (dataverse(&[3]), MemoryMarketo::default());
    let p = pipeline(&dv, &mk);
    sync(&p).await;
    let row = rows("opportunities.json")
        .into_iter()
        .find(|r| r["opportunityid"] == o(3).as_str())
        .unwrap();
    let roles_before = mk.holds().roles.len();
    assert!(roles_before > 0);
    dv.delete_opportunity(&o(3));
    sync(&p).await;
    assert!(!mk.holds().opportunities.contains_key(&o(3)));
    assert_eq!(status(&p, 3).await, Status::Deleted);
    let mut restored = row.clone();
    restored["versionnumber"] = json!(row["versionnumber"].as_i64().unwrap_or(0) + 1_000);
    dv.upsert_opportunity(restored);
    let report = sync(&p).await;
    assert_eq!((report.written, report.failed), (1, 0), "{report:?}");
    let holds = mk.holds();
    assert!(holds.opportunities.contains_key(&o(3)), "{holds:?}");
    assert_eq!(
        holds.roles.len(),
        roles_before,
        "its roles came back too: {:?}",
        holds.roles
    );
    assert_eq!(status(&p, 3).await, Status::Synced);
}

#[tokio::test]
async fn a_contact_whose_email_changed_keeps_one_role_on_its_new_lead() {
    // Opportunity 3's customer is Grace (grace@navy.example). Her email changes together with an
    // edit of the opportunity: her role moves to the lead for the new email, and the role on the
    // old lead is deleted, not left beside it.
    let (dv, mk) = (dataverse(&[3]), MemoryMarketo::default());
    let p = pipeline(&dv, &mk);
    sync(&p).await;
    let holds = mk.holds();
    let old_lead = holds
        .roles
        .keys()
        .find(|k| k.external_opportunity_id == o(3))
        .unwrap()
        .lead_id;
    let mut grace = rows("contacts.json")
        .into_iter()
        .find(|c| c["emailaddress1"] == "grace@navy.example")
        .unwrap();
    grace["emailaddress1"] = json!("grace.hopper@navy.example");
    dv.upsert_contact(grace);
    let mut row = rows("opportunities.json")
        .into_iter()
        .find(|r| r["opportunityid"] == o(3).as_str())
        .unwrap();
    row["versionnumber"] = json!(row["versionnumber"].as_i64().unwrap_or(0) + 10);
    row["estimatedvalue"] = json!(4242);
    dv.upsert_opportunity(row);
    let report = sync(&p).await;
    assert_eq!((report.written, report.failed), (1, 0), "{report:?}");
    let holds = mk.holds();
    let roles: Vec<&RoleKey> = holds
        .roles
        .keys()
        .filter(|k| k.external_opportunity_id == o(3))
        .collect();
    assert_eq!(roles.len(), 1, "one Potential Customer role, not two: {roles:?}");
    assert_ne!(roles[0].lead_id, old_lead, "on the new email's lead");
    assert_eq!(
        holds.leads[&roles[0].lead_id]["email"],
        json!("grace.hopper@navy.example")
    );
}

#[tokio::test]
async fn an_opportunity_a_batch_read_leaves_out_is_not_deleted_while_it_exists() {
    let (dv, mk) = (dataverse(&[1, 3]), MemoryMarketo::default());
    let p = pipeline(&dv, &mk);
    sync(&p).await;
    // Opportunity 3 changes, but the batch read that plans it leaves it out although it exists.
    let mut row = rows("opportunities.json")
        .into_iter()
        .find(|r| r["opportunityid"] == o(3).as_str())
        .unwrap();
    row["versionnumber"] = json!(row["versionnumber"].as_i64().unwrap_or(0) + 10);
    dv.upsert_opportunity(row);
    dv.hide_from_batch_reads(&o(3));
    p.poll(None).await.unwrap();
    let err = p.drain(|_, _| {}).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(mk.holds().opportunities.contains_key(&o(3)), "not deleted from Marketo");
    assert!(!mk.holds().calls.contains(&"opportunities.delete"));
    assert_ne!(status(&p, 3).await, Status::Deleted);
}

#[tokio::test]
async fn the_sweep_skips_a_recently_touched_record_instead_of_stopping_at_it() {
    // The open views list oldest-in-status first, not least-recently-touched first: a record
    // waiting long but touched lately must not hide the stuck ones behind it.
    use oppsync_state::PendingChange;
    let t0: i64 = 1_764_590_400_000;
    let minute = 60_000;
    let store = sqlite();
    let (a, b) = (
        OpportunityId::parse(&o(1)).unwrap(),
        OpportunityId::parse(&o(3)).unwrap(),
    );
    store
        .mark_pending(&[PendingChange::upserted(a, 1, None)], t0)
        .await
        .unwrap();
    store
        .mark_pending(&[PendingChange::upserted(b, 1, None)], t0 + 1_000)
        .await
        .unwrap();
    // A newer version of A: still pending since t0, but touched at t0 + 20 minutes.
    store
        .mark_pending(&[PendingChange::upserted(a, 2, None)], t0 + 20 * minute)
        .await
        .unwrap();
    let now = t0 + 20 * minute + 1_000;
    let p = Pipeline::new(
        store.clone(),
        dataverse(&[]),
        MemoryMarketo::default(),
        Config::default(),
        "sweep",
    )
    .with_clock(std::sync::Arc::new(move || now));
    assert_eq!(
        p.sweep_stuck().await.unwrap(),
        1,
        "B, stuck for 20 minutes, is requeued"
    );
    let b_state = store.get(b).await.unwrap().unwrap();
    assert_eq!(b_state.updated_at, now);
}

/// A write that got part of a record into Marketo (some roles refused with a code that may
/// pass) sends only the rest the next time: a record with many roles would otherwise send them
/// all on every try, and under a steady rate of such refusals never get through (the chaos run
/// failed a record with many roles after 10 tries).
#[tokio::test]
async fn a_retry_after_a_partial_write_sends_only_what_did_not_get_through() {
    let (dv, mk) = (dataverse(&[6]), MemoryMarketo::default());
    let p = pipeline(&dv, &mk);
    mk.refuse_next_roles(1, "1014");
    let report = sync(&p).await;
    assert_eq!((report.written, report.failed), (1, 0), "{report:?}");
    let holds = mk.holds();
    let roles = holds.role_writes.clone();
    assert!(roles.len() == 2 && roles[0] > 1, "{roles:?}");
    // The retry: the one refused role, and no opportunity again.
    assert_eq!(roles[1], 1, "{roles:?}");
    assert_eq!(
        holds.calls.iter().filter(|c| **c == "opportunities.sync").count(),
        1,
        "{:?}",
        holds.calls
    );
    assert_eq!(status(&p, 6).await, Status::Synced);
}

/// A Marketo user deleted an opportunity oppsync wrote; then only a stakeholder changes in
/// Dynamics. The role is refused (1013, its opportunity is gone), and the retry sends the
/// opportunity and every role again, not only what changed.
#[tokio::test]
async fn an_opportunity_deleted_in_marketo_is_written_again_with_all_its_roles() {
    use std::sync::atomic::{AtomicI64, Ordering};
    let (dv, mk) = (dataverse(&[6]), MemoryMarketo::default());
    let clock = std::sync::Arc::new(AtomicI64::new(1_800_000_000_000));
    let now = clock.clone();
    let p = pipeline(&dv, &mk).with_clock(std::sync::Arc::new(move || now.load(Ordering::Relaxed)));
    sync(&p).await;
    let roles = mk.holds().roles.clone();
    mk.remove_opportunity(&o(6));
    let edsger = "e0000000-0000-4000-8000-000000000010";
    let row = rows("connections.json")
        .into_iter()
        .find(|c| c["connectionid"] == edsger)
        .unwrap();
    dv.delete_connection(edsger);
    dv.delete_connection("e0000000-0000-4000-8000-000000000011");
    sync(&p).await;
    dv.upsert_connection(row);
    for _ in 0..3 {
        sync(&p).await;
        clock.fetch_add(3_600_000, Ordering::Relaxed);
    }
    assert_eq!(status(&p, 6).await, Status::Synced);
    let holds = mk.holds();
    assert!(holds.opportunities.contains_key(&o(6)), "the opportunity is back");
    assert_eq!(holds.roles, roles, "every role is back");
}

/// The drain, timed by what waits for what: `dv`'s batch read after `reads` others waits for
/// `mk` to be called with `operation`. A drain that made the call only after its reads would
/// wait forever; 20 s is that forever (the drain takes milliseconds).
async fn drain_while_read_waits_for(
    dv: &MemoryDataverse,
    mk: &MemoryMarketo,
    config: Config,
    reads: u32,
    operation: &'static str,
) -> DrainReport {
    let p = Pipeline::new(sqlite(), dv.clone(), mk.clone(), config, "memory-test");
    assert!(p.poll(None).await.unwrap().caught_up);
    let signal = std::sync::Arc::new(tokio::sync::Notify::new());
    mk.signal_on(operation, signal.clone());
    dv.hold_read(reads, signal);
    tokio::time::timeout(std::time::Duration::from_secs(20), p.drain(|_, _| {}))
        .await
        .unwrap_or_else(|_| panic!("the drain waited for its reads before calling {operation}"))
        .unwrap()
}

#[tokio::test]
async fn marketos_preflight_is_made_while_dataverse_is_read() {
    // At seconds a Marketo call, the preflight after the reads would be a round trip of its own.
    let (dv, mk) = (dataverse(&[1, 3]), MemoryMarketo::default());
    let report = drain_while_read_waits_for(&dv, &mk, Config::default(), 0, "preflight").await;
    assert_eq!((report.written, report.failed), (2, 0), "{report:?}");
}

#[tokio::test]
async fn a_drain_writes_its_first_group_while_later_records_are_read() {
    // Twelve opportunities a batch at a time: the first ten (a write group) are written while
    // the eleventh is read; before, every pending record was transformed before any write.
    let dv = dataverse(&[1]);
    let template = rows("opportunities.json")
        .into_iter()
        .find(|r| r["opportunityid"] == o(1).as_str())
        .unwrap();
    for n in 101..=111 {
        let mut row = template.clone();
        row["opportunityid"] = json!(o(n));
        dv.upsert_opportunity(row);
    }
    let mk = MemoryMarketo::default();
    let mut config = Config::default();
    config.sync.batch_size = 1;
    let report = drain_while_read_waits_for(&dv, &mk, config, 10, "opportunities.sync").await;
    assert_eq!((report.written, report.failed), (12, 0), "{report:?}");
    assert_eq!(mk.holds().opportunities.len(), 12);
    // Two write groups: ten, then the two read after.
    let opportunity_calls = mk.holds().calls.iter().filter(|c| **c == "opportunities.sync").count();
    assert_eq!(opportunity_calls, 2);
}
