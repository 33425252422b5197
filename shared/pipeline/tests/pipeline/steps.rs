//! The steps one at a time: the poller's lease and checkpoints, the hash skip, and a write
//! stopped by Marketo's daily quota.

use std::time::{Duration, Instant};

use oppsync_marketo::Operation as E;
use oppsync_pipeline::{Config, POLL_LEASE};
use oppsync_simulators::dataverse::{DataverseFault, Mix, Table, seed_id};
use oppsync_simulators::marketo::Fault;
use oppsync_state::{PendingChange, Source, StateStore, Status, SyncError, TransformResult, WriteResult};
use oppsync_tests::harness::*;
use serde_json::json;

/// GIVEN another poller holds the lease WHEN this one polls THEN it reads nothing and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poller_that_finds_the_lease_taken_reads_nothing() {
    let sims = sims().await;
    sims.dv.seed(10, 1, Mix::Uniform);
    let p = pipeline(&sims, sqlite(), Config::default());
    let now = p.now();
    let held = p
        .store()
        .acquire_lease(POLL_LEASE, "someone-else", 60_000, now)
        .await
        .unwrap();
    assert!(held.is_some());
    let report = p.poll(None).await.unwrap();
    assert!(report.busy && !report.caught_up, "{report:?}");
    assert_eq!(sims.dv.requests(), 0, "a busy poller reads nothing");
    assert_eq!(p.store().counts().await.unwrap().total(), 0);
}

/// GIVEN a backfill larger than one invocation's time WHEN the deadline cuts the poll
/// THEN the cursor holds what was recorded and the next poll reads only the rest. For change
/// tracking and both watermarks (a watermark read keeps where its pages reached, so a first
/// poll of a large table is recorded page by page and never starts over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_cut_by_the_deadline_continues_from_its_checkpoint() {
    // The last case stamps every row in one second (a bulk import): the read goes on inside a
    // `modifiedon` tie larger than a page, dropping only the rows it already saw.
    for (strategy, writes_per_second) in [
        ("change_tracking", 1),
        ("versionnumber", 1),
        ("modifiedon", 1),
        ("modifiedon", 1_000_000),
    ] {
        let sims = sims().await;
        sims.dv.configure(|c| c.writes_per_second = writes_per_second);
        sims.dv.seed(100, 2, Mix::Uniform);
        sims.dv.configure(|c| c.max_page_size = 10);
        let config = format!("[dataverse]\nchange_detection = \"{strategy}\"\npage_size = 10\n");
        let p = pipeline(&sims, sqlite(), Config::from_toml(&config, "test").unwrap());
        // The second to fourth requests are slow, so the deadline falls after a page or two.
        for n in 2..=4 {
            sims.dv.inject(n, DataverseFault::Delay(Duration::from_millis(600)));
        }
        let first = p.poll(Some(Instant::now() + Duration::from_secs(1))).await.unwrap();
        assert!(!first.caught_up, "{strategy}: {first:?}");
        assert!(
            first.opportunity_changes > 0 && first.opportunity_changes < 100,
            "{strategy}: {first:?}"
        );
        assert_eq!(
            p.store().counts().await.unwrap().get(Status::Pending),
            first.opportunity_changes,
            "{strategy}"
        );
        let second = p.poll(None).await.unwrap();
        assert!(second.caught_up, "{strategy}: {second:?}");
        assert_eq!(
            first.opportunity_changes + second.opportunity_changes,
            100,
            "{strategy}: the second poll continued; it did not start over"
        );
        assert_eq!(
            p.store().counts().await.unwrap().get(Status::Pending),
            100,
            "{strategy}"
        );
        let stamps: std::collections::BTreeSet<String> = sims
            .dv
            .rows(Table::Opportunities)
            .iter()
            .map(|(_, row)| row.attributes["modifiedon"].to_string())
            .collect();
        assert_eq!(stamps.len() == 1, writes_per_second > 1, "{strategy}: {stamps:?}");
        // A change after the read, in the same second when rows share one, is still seen. (It
        // is pending already, so it is marked as a newer version: one marked, none stale.)
        let changed = seed_id(0x0b00_0000, 42);
        sims.dv
            .upsert(Table::Opportunities, &changed, json!({"estimatedvalue": 7.0}), &[]);
        let third = p.poll(None).await.unwrap();
        assert_eq!(third.marked, 1, "{strategy}: {third:?}");
    }
}

/// GIVEN 5,000 opportunities stamped in one `modifiedon` second (a bulk import) WHEN a
/// `modifiedon` watermark polls them THEN every one is recorded, the stored cursor stays small
/// (it listed every row of the tie, twice: about 480 KB, past DynamoDB's 400 KB item limit, so
/// the poller could never store its cursor there again), and a change in the same second after
/// the read is still seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_import_in_one_second_keeps_the_watermark_cursor_small() {
    let sims = sims().await;
    sims.dv.configure(|c| c.writes_per_second = 1_000_000);
    sims.dv.seed(5_000, 9, Mix::Lean);
    let config = "[dataverse]\nchange_detection = \"modifiedon\"\n";
    let p = pipeline(&sims, sqlite(), Config::from_toml(config, "test").unwrap());
    let first = p.poll(None).await.unwrap();
    assert!(first.caught_up, "{first:?}");
    assert_eq!(p.store().counts().await.unwrap().get(Status::Pending), 5_000);
    let cursor = p.store().cursor(Source::Opportunities).await.unwrap().unwrap();
    assert!(
        cursor.value.len() < 64 * 1024,
        "the cursor holds {} bytes (DynamoDB items hold at most 400 KB)",
        cursor.value.len()
    );
    // Read again, nothing new is marked (the tie's rows are at their versions already).
    let again = p.poll(None).await.unwrap();
    assert_eq!(again.marked, 0, "{again:?}");
    let changed = seed_id(0x0b00_0000, 4_321);
    sims.dv
        .upsert(Table::Opportunities, &changed, json!({"estimatedvalue": 7.0}), &[]);
    let third = p.poll(None).await.unwrap();
    assert_eq!(third.marked, 1, "{third:?}");
}

/// GIVEN a synced opportunity WHEN it is saved in Dynamics with nothing Marketo cares about
/// changed THEN it is synced again without a single Marketo call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_that_changes_nothing_for_marketo_makes_no_marketo_call() {
    let sims = sims().await;
    sims.dv.seed(40, 3, Mix::Realistic);
    let p = pipeline(&sims, sqlite(), Config::default());
    sync(&p).await;
    let id = seed_id(0x0b00_0000, 7);
    let row = sims.dv.row(Table::Opportunities, &id).unwrap();
    sims.dv.upsert(
        Table::Opportunities,
        &id,
        json!({"name": row.attributes["name"].clone()}),
        &[],
    );
    let calls = sims.mk.rest_calls();
    let poll = p.poll(None).await.unwrap();
    assert_eq!(poll.marked, 1, "the save is a change in Dynamics: {poll:?}");
    let drained = p.drain(|_, _| {}).await.unwrap();
    assert_eq!((drained.unchanged, drained.written), (1, 0), "{drained:?}");
    assert_eq!(sims.mk.rest_calls(), calls, "no Marketo call for an unchanged plan");
    assert_eq!(
        p.store()
            .get(oppsync_mapping::OpportunityId::parse(&id).unwrap())
            .await
            .unwrap()
            .unwrap()
            .status,
        Status::Synced
    );
}

/// GIVEN Marketo's daily quota runs out in the middle of a write WHEN the writer stops
/// THEN every record it did not finish stays ready, nothing is marked failed, and the next
/// run (the quota back) finishes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_stopped_by_the_daily_quota_leaves_its_records_ready() {
    let sims = sims().await;
    sims.dv.seed(30, 4, Mix::Uniform);
    let p = pipeline(&sims, sqlite(), Config::default());
    p.poll(None).await.unwrap();
    sims.mk.inject(E::OpportunitySync, 1, Fault::Code("607"));
    let drained = p.drain(|_, _| {}).await.unwrap();
    assert!(
        drained
            .stopped
            .as_deref()
            .is_some_and(|s| s.contains("607") || s.contains("quota")),
        "{drained:?}"
    );
    let counts = p.store().counts().await.unwrap();
    assert_eq!(counts.get(Status::Ready), 30, "{counts:?}");
    assert_eq!(counts.get(Status::Failed), 0, "{counts:?}");
    // A stop is not the records' fault: no attempt counts against their cap.
    let ready = p.store().list(Status::Ready, 100, None).await.unwrap();
    assert!(ready.items.iter().all(|s| s.attempts == 0), "{:?}", ready.items[0]);
    let next = p.drain(|_, _| {}).await.unwrap();
    assert_eq!(next.written, 30, "{next:?}");
    assert_marketo_matches_dynamics(&sims);
}

/// GIVEN two opportunities of one account written in separate batches WHEN the second is
/// written THEN its company is not upserted again; a resync writes it again all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_company_written_once_is_not_upserted_again_by_later_batches_but_resync_rewrites_it() {
    let sims = sims().await;
    // Uniform: opportunity o's account is (3·o) mod (n/2); with n = 4, o = 0 and o = 2 share it.
    let seeded = sims.dv.seed(4, 5, Mix::Uniform);
    let p = pipeline(&sims, sqlite(), Config::default());
    p.poll(None).await.unwrap();
    let id = |n: usize| oppsync_mapping::OpportunityId::parse(&seeded.opportunities[n]).unwrap();
    p.transform(&[id(0), id(1), id(2), id(3)], false).await.unwrap();
    p.write(&[id(0)]).await.unwrap();
    let companies = sims.mk.calls(E::CompanySync);
    assert_eq!(companies, 1);
    let report = p.write(&[id(2)]).await.unwrap();
    assert_eq!(sims.mk.calls(E::CompanySync), companies, "{report:?}");
    assert!(matches!(report.records[0].result, oppsync_pipeline::Wrote::Synced));
    let state = p.store().get(id(2)).await.unwrap().unwrap();
    assert!(
        state.written.unwrap().company.is_some(),
        "the company is recorded as written"
    );
    p.resync(oppsync_pipeline::ResyncTarget::Ids(vec![id(2)]), false)
        .await
        .unwrap();
    assert_eq!(
        sims.mk.calls(E::CompanySync),
        companies + 1,
        "resync writes the company again"
    );
    p.drain(|_, _| {}).await.unwrap();
    assert_marketo_matches_dynamics(&sims);
}

/// GIVEN a daily Marketo budget smaller than an initial sync needs WHEN the budget runs out
/// mid-run THEN writing stops with every unfinished record still ready, no day spends more than
/// the budget, and the following days' runs finish the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_budget_stops_a_run_and_the_next_days_finish_it() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, Ordering};

    let sims = sims().await;
    // Two write groups of 1,500 opportunities, each about 55 calls; a day allows 60.
    sims.dv.seed(3_000, 6, Mix::Uniform);
    let budget = 60;
    let settings = oppsync_marketo::MarketoSettings::new(
        &sims.mk.url(),
        &sims.mk.client_id(),
        oppsync_marketo::Secret::from(sims.mk.client_secret()),
    )
    .unwrap();
    let limits = oppsync_marketo::LimiterSettings {
        window: Duration::from_secs(1),
        ..Default::default()
    };
    let client = oppsync_marketo::MarketoClient::new(settings, oppsync_marketo::Limiter::new(limits), budget).unwrap();
    // Noon UTC on 2026-12-01, then one day later each round.
    let now = Arc::new(AtomicI64::new(1_764_590_400_000));
    let clock = now.clone();
    let p = pipeline(&sims, sqlite(), Config::default())
        .with_marketo(client)
        .with_clock(Arc::new(move || clock.load(Ordering::Relaxed)));
    p.poll(None).await.unwrap();

    let mut days = 0;
    loop {
        days += 1;
        assert!(days <= 6, "not finished after {days} days");
        let before = sims.mk.rest_calls();
        let drained = p.drain(|_, _| {}).await.unwrap();
        let spent = sims.mk.rest_calls() - before;
        assert!(spent <= budget, "day {days} spent {spent} calls of a {budget} budget");
        let counts = p.store().counts().await.unwrap();
        assert_eq!(
            counts.get(Status::Failed),
            0,
            "a budget stop fails no record: {counts:?}"
        );
        if drained.stopped.is_none() {
            assert_eq!(counts.get(Status::Synced), 3_000, "{counts:?}");
            break;
        }
        assert!(drained.stopped.as_deref().unwrap().contains("budget"), "{drained:?}");
        assert!(!drained.stopped_for_good, "the budget passes with the day");
        assert!(
            counts.get(Status::Ready) > 0,
            "unfinished records stay ready: {counts:?}"
        );
        now.fetch_add(86_400_000, Ordering::Relaxed);
    }
    assert!(days >= 2, "the budget did stop the run ({days} days)");
    assert_marketo_matches_dynamics(&sims);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_scan_that_would_delete_too_much_stops_and_deletes_nothing() {
    // A scan that finds most records gone is more likely a lost read permission than a purge:
    // past [sync] max_deletion_percent it stops with a message and deletes nothing.
    let sims = sims().await;
    let seeded = sims.dv.seed(40, 8, Mix::Uniform);
    let config =
        "[dataverse]\nchange_detection = \"versionnumber\"\nfull_scan_every = 1\n[sync]\nmax_deletion_percent = 20\n";
    let store = sqlite();
    let p = pipeline(&sims, store.clone(), Config::from_toml(config, "test").unwrap());
    sync(&p).await;
    for id in &seeded.opportunities[..15] {
        sims.dv.delete(Table::Opportunities, id);
    }
    // A record waiting out a retry whose wait has ended: the refused scan must not hold it.
    let waiting = oppsync_mapping::OpportunityId::parse(&seeded.opportunities[20]).unwrap();
    let now = p.now();
    let plan = store.get(waiting).await.unwrap().unwrap().plan.unwrap();
    let version = store.get(waiting).await.unwrap().unwrap().version;
    store
        .mark_pending(&[PendingChange::upserted(waiting, version + 1, None)], now)
        .await
        .unwrap();
    let (claim, _) = store
        .claim(waiting, Status::Pending, 60_000, now)
        .await
        .unwrap()
        .unwrap();
    store
        .complete_transform(&claim, TransformResult::Ready(plan), now)
        .await
        .unwrap();
    let (claim, _) = store.claim(waiting, Status::Ready, 60_000, now).await.unwrap().unwrap();
    let retry = WriteResult::Retry {
        error: SyncError {
            operation: "opportunities.sync".into(),
            code: "604".into(),
            message: "timed out".into(),
        },
        written: None,
        retry_at: now - 1,
    };
    store.complete_write(&claim, retry, now).await.unwrap();
    let err = p.poll(None).await.unwrap_err();
    assert_eq!(
        store.get(waiting).await.unwrap().unwrap().retry_at,
        None,
        "a record whose retry wait ended is woken although the deletion scan was refused"
    );
    let message = err.to_string();
    assert!(!err.is_retryable(), "{message}");
    assert!(
        message.contains("15 of 40") && message.contains("max_deletion_percent"),
        "{message}"
    );
    assert_eq!(store.counts().await.unwrap().get(Status::Deleted), 0, "nothing deleted");
    assert_eq!(sims.mk.snapshot().opportunities.len(), 40);
    // With the limit raised (the deletions are real), the same scan deletes them.
    let raised = Config::from_toml(&config.replace("= 20", "= 50"), "test").unwrap();
    let q = pipeline(&sims, store.clone(), raised);
    sync(&q).await;
    assert_eq!(store.counts().await.unwrap().get(Status::Deleted), 15);
    assert_eq!(sims.mk.snapshot().opportunities.len(), 25);
}

/// A row committed after a watermark read with an earlier stamp than rows that read saw (a
/// long transaction) is still read: each poll reads again from where the watermark stood a
/// while ago. For both watermark strategies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_committed_late_with_an_earlier_stamp_is_not_skipped_by_a_watermark() {
    for strategy in ["versionnumber", "modifiedon"] {
        let sims = sims().await;
        let seeded = sims.dv.seed(10, 2, Mix::Uniform);
        let config = format!("[dataverse]\nchange_detection = \"{strategy}\"\n");
        let p = pipeline(&sims, sqlite(), Config::from_toml(&config, "test").unwrap());
        sync(&p).await;
        let (late, other) = (&seeded.opportunities[0], &seeded.opportunities[1]);
        // The long transaction writes `late` first; `other` is written and read after it.
        let pending = sims.dv.begin_write();
        sims.dv
            .upsert(Table::Opportunities, other, json!({"estimatedvalue": 222.0}), &[]);
        sync(&p).await;
        sims.dv
            .commit(pending, Table::Opportunities, late, json!({"estimatedvalue": 111.0}));
        sync(&p).await;
        let amount = |id: &str| sims.mk.snapshot().opportunities[id].get("amount").cloned();
        assert_eq!(amount(other), Some(json!(222.0)), "{strategy}");
        assert_eq!(
            amount(late),
            Some(json!(111.0)),
            "{strategy}: the late commit reached Marketo"
        );
        assert_marketo_matches_dynamics(&sims);
    }
}

/// A Marketo outage is not the records' fault: every write call answering 503 leaves each
/// record ready and waiting, with no attempt counted, so an outage longer than
/// `max_attempts` tries never turns the backlog into failures that someone must replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marketo_outage_is_not_charged_to_the_records() {
    let sims = sims().await;
    sims.dv.seed(5, 2, Mix::Uniform);
    let config = Config::from_toml("[sync]\nmax_attempts = 1\n", "test").unwrap();
    let store = sqlite();
    let p = pipeline(&sims, store.clone(), config);
    p.poll(None).await.unwrap();
    let pending: Vec<_> = store
        .list(Status::Pending, 100, None)
        .await
        .unwrap()
        .items
        .iter()
        .map(|s| s.id)
        .collect();
    p.transform(&pending, false).await.unwrap();
    for operation in [
        E::CompanySync,
        E::SalesPersonSync,
        E::LeadQuery,
        E::LeadSync,
        E::OpportunitySync,
        E::RoleSync,
    ] {
        for n in 1..=20 {
            sims.mk.inject(operation, n, Fault::Http(503));
        }
    }
    let report = p.write(&pending).await.unwrap();
    assert_eq!(report.retry().len(), pending.len(), "{report:?}");
    for id in &pending {
        let state = store.get(*id).await.unwrap().unwrap();
        assert_eq!((state.status, state.attempts), (Status::Ready, 0), "{state:?}");
        assert!(state.retry_at.is_some(), "it waits before the next try");
    }
}
