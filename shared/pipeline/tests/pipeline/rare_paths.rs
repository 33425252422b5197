//! The state machine's rare paths on the in-memory ports: a writer superseded mid-write, a
//! resync racing a stream transformer, retries that wait and stop, a handler that fails with
//! claims held, a writer at its deadline, a deletion scan owed across runs. Each scenario is
//! made to happen exactly, by a hook at the point where the race falls.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use oppsync_mapping::OpportunityId;
use oppsync_marketo::{LeadRecord, MarketoError, RecordOutcome, RoleKey, RoleRecord};
use oppsync_pipeline::memory::MemoryMarketo;
use oppsync_pipeline::ports::MarketoPort;
use oppsync_pipeline::{Config, Pipeline, ResyncTarget, Wrote};
use oppsync_state::*;
use oppsync_tests::harness::sqlite;
use serde_json::{Value, json};

use crate::ports::{dataverse, o, pipeline, rows, status, sync};

type Hook = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// A Marketo that runs a hook once, just before the first call of one operation reaches it:
/// whatever the hook does happens while the caller is inside that call.
#[derive(Clone)]
struct Hooked {
    inner: MemoryMarketo,
    hook: Arc<Mutex<Option<(&'static str, Hook)>>>,
}

impl Hooked {
    fn new(inner: &MemoryMarketo) -> Hooked {
        Hooked {
            inner: inner.clone(),
            hook: Arc::new(Mutex::new(None)),
        }
    }

    fn before(&self, operation: &'static str, hook: Hook) {
        *self.hook.lock().unwrap() = Some((operation, hook));
    }

    async fn run(&self, operation: &'static str) {
        let due = {
            let mut slot = self.hook.lock().unwrap();
            match slot.take() {
                Some((op, hook)) if op == operation => Some(hook),
                other => {
                    *slot = other;
                    None
                }
            }
        };
        if let Some(hook) = due {
            hook().await;
        }
    }
}

impl MarketoPort for Hooked {
    async fn sync_opportunities(&self, records: &[Value]) -> Result<Vec<RecordOutcome>, MarketoError> {
        self.run("opportunities.sync").await;
        self.inner.sync_opportunities(records).await
    }
    async fn delete_opportunities(&self, ids: &[String]) -> Result<Vec<RecordOutcome>, MarketoError> {
        self.run("opportunities.delete").await;
        self.inner.delete_opportunities(ids).await
    }
    async fn sync_roles(&self, roles: &[RoleRecord]) -> Result<Vec<RecordOutcome>, MarketoError> {
        self.run("roles.sync").await;
        self.inner.sync_roles(roles).await
    }
    async fn delete_roles(&self, keys: &[RoleKey]) -> Result<Vec<RecordOutcome>, MarketoError> {
        self.run("roles.delete").await;
        self.inner.delete_roles(keys).await
    }
    async fn sync_companies(&self, records: &[Value]) -> Result<Vec<RecordOutcome>, MarketoError> {
        self.run("companies.sync").await;
        self.inner.sync_companies(records).await
    }
    async fn sync_sales_persons(&self, records: &[Value]) -> Result<Vec<RecordOutcome>, MarketoError> {
        self.run("salespersons.sync").await;
        self.inner.sync_sales_persons(records).await
    }
    async fn query_leads(
        &self,
        field: &str,
        values: &[String],
        fields: &[&str],
    ) -> Result<Vec<LeadRecord>, MarketoError> {
        self.run("leads.query").await;
        self.inner.query_leads(field, values, fields).await
    }
    async fn create_leads(&self, lookup_field: &str, leads: &[Value]) -> Result<Vec<RecordOutcome>, MarketoError> {
        self.run("leads.sync").await;
        self.inner.create_leads(lookup_field, leads).await
    }
    async fn preflight(&self, fields: &[String]) -> Result<oppsync_marketo::Preflight, MarketoError> {
        self.inner.preflight(fields).await
    }
    fn set_calls_today(&self, calls: u64) {
        self.inner.set_calls_today(calls)
    }
    fn count_calls_in(&self, ledger: std::sync::Arc<dyn oppsync_marketo::CallLedger>) -> bool {
        self.inner.count_calls_in(ledger)
    }
    fn share_limits_with(&self, sharers: usize) {
        self.inner.share_limits_with(sharers)
    }
    fn calls_by_endpoint(&self) -> std::collections::BTreeMap<&'static str, u64> {
        self.inner.calls_by_endpoint()
    }
}

/// A state store that runs a hook once, right after the first requeue (plain or claimed)
/// returns (a stream transformer woken by the requeue's new image runs there), and can fail
/// the next completions of writes (a process that dies before recording them).
#[derive(Clone)]
struct Hooks {
    inner: SqliteStore,
    hook: Arc<Mutex<Option<Hook>>>,
    fail_completions: Arc<AtomicI64>,
    /// When set, each claim, renewal and completion takes a DynamoDB-like round trip (5 ms) and
    /// is recorded (start, end).
    round_trips: Arc<Mutex<Option<Vec<Trip>>>>,
}

/// A traced store round trip: when it started and ended.
type Trip = (Instant, Instant);

impl Hooks {
    fn new() -> Hooks {
        Hooks {
            inner: sqlite(),
            hook: Arc::new(Mutex::new(None)),
            fail_completions: Arc::new(AtomicI64::new(0)),
            round_trips: Arc::new(Mutex::new(None)),
        }
    }

    /// Runs `call` as a round trip when round trips are traced.
    async fn round_trip<T>(&self, call: impl Future<Output = T>) -> T {
        if self.round_trips.lock().unwrap().is_none() {
            return call.await;
        }
        let start = Instant::now();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let out = call.await;
        if let Some(trips) = self.round_trips.lock().unwrap().as_mut() {
            trips.push((start, Instant::now()));
        }
        out
    }

    /// The round trips traced, and the longest chain of them that ran one after another (the
    /// critical path, in round trips).
    fn critical_path(&self) -> (usize, usize) {
        let mut trips = self.round_trips.lock().unwrap().clone().unwrap_or_default();
        trips.sort();
        let mut chain = vec![1usize; trips.len()];
        for i in 0..trips.len() {
            for j in 0..i {
                if trips[j].1 <= trips[i].0 {
                    chain[i] = chain[i].max(chain[j] + 1);
                }
            }
        }
        (trips.len(), chain.into_iter().max().unwrap_or(0))
    }

    async fn run(&self) {
        let hook = self.hook.lock().unwrap().take();
        if let Some(hook) = hook {
            hook().await;
        }
    }
}

impl StateStore for Hooks {
    async fn cursor(&self, source: Source) -> Result<Option<Cursor>, StateError> {
        self.inner.cursor(source).await
    }
    async fn advance_cursor(&self, lease: &Lease, source: Source, value: &str, now: Millis) -> Result<(), StateError> {
        self.inner.advance_cursor(lease, source, value, now).await
    }
    async fn acquire_lease(
        &self,
        name: &str,
        owner: &str,
        ttl_ms: i64,
        now: Millis,
    ) -> Result<Option<Lease>, StateError> {
        self.inner.acquire_lease(name, owner, ttl_ms, now).await
    }
    async fn renew_lease(&self, lease: &Lease, ttl_ms: i64, now: Millis) -> Result<Option<Lease>, StateError> {
        self.inner.renew_lease(lease, ttl_ms, now).await
    }
    async fn release_lease(&self, lease: &Lease) -> Result<(), StateError> {
        self.inner.release_lease(lease).await
    }
    async fn mark_pending(&self, changes: &[PendingChange], now: Millis) -> Result<Vec<MarkOutcome>, StateError> {
        self.inner.mark_pending(changes, now).await
    }
    async fn requeue(&self, id: OpportunityId, rewrite: bool, now: Millis) -> Result<bool, StateError> {
        let done = self.inner.requeue(id, rewrite, now).await;
        self.run().await;
        done
    }
    async fn requeue_claimed(
        &self,
        id: OpportunityId,
        ttl_ms: i64,
        now: Millis,
    ) -> Result<Option<(Claim, OpportunityState)>, StateError> {
        let done = self.inner.requeue_claimed(id, ttl_ms, now).await;
        self.run().await;
        done
    }
    async fn renew_claim(&self, claim: &Claim, ttl_ms: i64, now: Millis) -> Result<Option<Claim>, StateError> {
        self.round_trip(self.inner.renew_claim(claim, ttl_ms, now)).await
    }
    async fn record_planned(
        &self,
        claim: &Claim,
        roles: &[oppsync_mapping::WrittenRole],
        ttl_ms: i64,
        now: Millis,
    ) -> Result<Option<Claim>, StateError> {
        self.round_trip(self.inner.record_planned(claim, roles, ttl_ms, now))
            .await
    }
    async fn release(&self, claim: &Claim, now: Millis) -> Result<(), StateError> {
        self.inner.release(claim, now).await
    }
    async fn lock(&self, keys: &[String], ttl_ms: i64, now: Millis) -> Result<Vec<bool>, StateError> {
        self.inner.lock(keys, ttl_ms, now).await
    }
    async fn unlock(&self, keys: &[String], ttl_ms: i64, now: Millis) -> Result<(), StateError> {
        self.inner.unlock(keys, ttl_ms, now).await
    }
    async fn wake(&self, id: OpportunityId, now: Millis) -> Result<bool, StateError> {
        self.inner.wake(id, now).await
    }
    async fn claim(
        &self,
        id: OpportunityId,
        from: Status,
        ttl_ms: i64,
        now: Millis,
    ) -> Result<Option<(Claim, OpportunityState)>, StateError> {
        self.round_trip(self.inner.claim(id, from, ttl_ms, now)).await
    }
    async fn complete_transform(
        &self,
        claim: &Claim,
        result: TransformResult,
        now: Millis,
    ) -> Result<Completion, StateError> {
        self.round_trip(self.inner.complete_transform(claim, result, now)).await
    }
    async fn complete_write(&self, claim: &Claim, result: WriteResult, now: Millis) -> Result<Completion, StateError> {
        if self.fail_completions.fetch_sub(1, Ordering::SeqCst) > 0 {
            return Err(StateError::Sqlite {
                path: "hooks".into(),
                message: "the process died before recording the write (a fault the test scheduled)".into(),
            });
        }
        self.round_trip(self.inner.complete_write(claim, result, now)).await
    }
    async fn get(&self, id: OpportunityId) -> Result<Option<OpportunityState>, StateError> {
        self.inner.get(id).await
    }
    async fn list(
        &self,
        status: Status,
        limit: usize,
        page: Option<&str>,
    ) -> Result<Page<OpportunityState>, StateError> {
        self.inner.list(status, limit, page).await
    }
    async fn counts(&self) -> Result<Counts, StateError> {
        self.inner.counts().await
    }
    async fn oldest_pending(&self) -> Result<Option<(OpportunityId, Millis)>, StateError> {
        self.inner.oldest_pending().await
    }
    async fn completions(&self, since: Millis, until: Millis) -> Result<u64, StateError> {
        self.inner.completions(since, until).await
    }
    async fn add_marketo_calls(&self, day: &str, calls: u64) -> Result<u64, StateError> {
        self.inner.add_marketo_calls(day, calls).await
    }
    async fn marketo_calls(&self, day: &str) -> Result<u64, StateError> {
        self.inner.marketo_calls(day).await
    }
    async fn remember_links(&self, links: &[(String, OpportunityId)]) -> Result<(), StateError> {
        self.inner.remember_links(links).await
    }
    async fn linked_opportunities(&self, connections: &[String]) -> Result<Vec<OpportunityId>, StateError> {
        self.inner.linked_opportunities(connections).await
    }
    async fn remember_leads(&self, leads: &[(String, i64)]) -> Result<(), StateError> {
        self.inner.remember_leads(leads).await
    }
    async fn known_leads(&self, keys: &[String]) -> Result<std::collections::HashMap<String, i64>, StateError> {
        self.inner.known_leads(keys).await
    }
    async fn forget_leads(&self, keys: &[String]) -> Result<(), StateError> {
        self.inner.forget_leads(keys).await
    }
    async fn record_run(&self, run: &oppsync_state::Run, keep_ms: i64) -> Result<(), StateError> {
        self.inner.record_run(run, keep_ms).await
    }
    async fn runs(&self, limit: usize, now: i64) -> Result<Vec<oppsync_state::Run>, StateError> {
        self.inner.runs(limit, now).await
    }
    async fn take_marketo_call(&self, day: &str, budget: u64) -> Result<Option<u64>, StateError> {
        self.inner.take_marketo_call(day, budget).await
    }
    async fn join_budget(&self, member: &str, until: i64, now: i64) -> Result<u32, StateError> {
        self.inner.join_budget(member, until, now).await
    }
    async fn leave_budget(&self, member: &str) -> Result<(), StateError> {
        self.inner.leave_budget(member).await
    }
}

fn id(n: u64) -> OpportunityId {
    OpportunityId::parse(&o(n)).unwrap()
}

/// Fixture opportunity `n` with a new version and `amount`.
fn edited(n: u64, bump: i64, amount: f64) -> Value {
    let mut row = rows("opportunities.json")
        .into_iter()
        .find(|r| r["opportunityid"] == o(n).as_str())
        .unwrap();
    row["versionnumber"] = json!(row["versionnumber"].as_i64().unwrap() + bump);
    row["estimatedvalue"] = json!(amount);
    row
}

fn amount(mk: &MemoryMarketo, n: u64) -> Option<Value> {
    mk.holds()
        .opportunities
        .get(&o(n))
        .and_then(|f| f.get("amount").cloned())
}

/// A clock the test moves.
fn clock() -> (Arc<AtomicI64>, oppsync_pipeline::Clock) {
    let now = Arc::new(AtomicI64::new(1_790_000_000_000));
    let read = Arc::clone(&now);
    (now, Arc::new(move || read.load(Ordering::SeqCst)))
}

#[tokio::test]
async fn a_superseded_writer_never_leaves_marketo_behind_the_state() {
    // Writer A sends plan P1; while its call is in flight (a 606 backoff inside the client, say)
    // the poller records v2 and writer B writes P2 and completes; then A's call lands P1. The
    // state says "synced v2"; Marketo must end up holding P2 all the same.
    let (dv, mk) = (dataverse(&[1]), MemoryMarketo::default());
    let b = pipeline(&dv, &mk);
    sync(&b).await;
    dv.upsert_opportunity(edited(1, 10, 1000.0));
    b.poll(None).await.unwrap();
    b.transform(&[id(1)], false).await.unwrap();
    assert_eq!(status(&b, 1).await, Status::Ready);

    let hooked = Hooked::new(&mk);
    let a = Pipeline::new(
        b.store().clone(),
        dv.clone(),
        hooked.clone(),
        Config::default(),
        "writer-a",
    );
    let (dv2, b2) = (dv.clone(), b.clone());
    hooked.before(
        "opportunities.sync",
        Box::new(move || {
            Box::pin(async move {
                dv2.upsert_opportunity(edited(1, 20, 2000.0));
                let report = sync(&b2).await;
                assert_eq!(report.written, 1, "writer B wrote v2: {report:?}");
            })
        }),
    );
    let report = a.write(&[id(1)]).await.unwrap();
    assert_eq!(report.records[0].result, Wrote::Superseded, "{report:?}");
    assert_eq!(
        amount(&mk, 1),
        Some(json!(1000.0)),
        "A's late call landed the older plan"
    );

    // The next cycle must put P2 back.
    sync(&b).await;
    assert_eq!(amount(&mk, 1), Some(json!(2000.0)), "Marketo holds what the state says");
    assert_eq!(status(&b, 1).await, Status::Synced);
}

#[tokio::test]
async fn a_resync_overwrites_an_edit_in_marketo_even_when_a_stream_transformer_races_it() {
    // The resync's requeue writes a pending image; the stream transformer it wakes must not
    // plan the record first and mark it unchanged, leaving the edit made in Marketo.
    let (dv, mk) = (dataverse(&[1]), MemoryMarketo::default());
    let store = Hooks::new();
    let p = Pipeline::new(store.clone(), dv.clone(), mk.clone(), Config::default(), "resync");
    p.poll(None).await.unwrap();
    p.drain(|_, _| {}).await.unwrap();
    mk.sync_opportunities(&[json!({"externalOpportunityId": o(1), "amount": 1})])
        .await
        .unwrap();
    let transformer = Pipeline::new(store.inner.clone(), dv.clone(), mk.clone(), Config::default(), "stream");
    *store.hook.lock().unwrap() = Some(Box::new(move || {
        Box::pin(async move {
            transformer.transform(&[id(1)], false).await.unwrap();
        })
    }));
    let report = p.resync(ResyncTarget::Ids(vec![id(1)]), false).await.unwrap();
    assert_eq!(report.records[0].write, Some(Wrote::Synced), "{report:?}");
    assert_eq!(
        amount(&mk, 1),
        Some(json!(10000.0)),
        "the edit in Marketo is overwritten"
    );
}

#[tokio::test]
async fn a_record_that_keeps_failing_retryably_fails_for_good_after_max_attempts() {
    let (dv, mk) = (dataverse(&[1]), MemoryMarketo::default());
    mk.refuse(&o(1), "1014"); // "Failed to create": retryable, and here it never passes.
    let mut config = Config::default();
    config.sync.max_attempts = 4;
    let p = Pipeline::new(sqlite(), dv.clone(), mk.clone(), config, "cap");
    let first = sync(&p).await;
    assert_eq!(first.left_for_retry, 1, "{first:?}");
    assert_eq!(status(&p, 1).await, Status::Ready);
    let second = p.drain(|_, _| {}).await.unwrap();
    assert_eq!((second.failed, second.left_for_retry), (1, 0), "{second:?}");
    let state = p.store().get(id(1)).await.unwrap().unwrap();
    assert_eq!(state.status, Status::Failed);
    let error = state.last_error.unwrap();
    assert_eq!(error.code, "1014");
    assert!(error.message.contains("gave up after 4 attempts"), "{}", error.message);
}

#[tokio::test]
async fn a_retried_write_waits_its_backoff_and_the_sweep_hands_it_back() {
    let (dv, mk) = (dataverse(&[1]), MemoryMarketo::default());
    let (now, clock) = clock();
    let p = Pipeline::new(sqlite(), dv.clone(), mk.clone(), Config::default(), "stream").with_clock(clock);
    p.poll(None).await.unwrap();
    p.transform(&[id(1)], false).await.unwrap();
    mk.refuse(&o(1), "1014");
    let first = p.write(&[id(1)]).await.unwrap();
    assert!(matches!(first.records[0].result, Wrote::Retry { .. }), "{first:?}");
    let calls = mk.holds().calls.len();
    // A redelivery at once finds nothing it may do: no Marketo call, no hot loop.
    let again = p.write(&[id(1)]).await.unwrap();
    assert_eq!(again.records[0].result, Wrote::NotClaimed, "{again:?}");
    assert_eq!(mk.holds().calls.len(), calls);
    assert_eq!(p.wake_due().await.unwrap(), 0, "not before the wait ends");
    now.fetch_add(30_000, Ordering::SeqCst);
    assert_eq!(p.wake_due().await.unwrap(), 1);
    let state = p.store().get(id(1)).await.unwrap().unwrap();
    assert_eq!((state.retry_at, state.attempts), (None, 1));
    // The second failure waits twice as long.
    let second = p.write(&[id(1)]).await.unwrap();
    assert!(matches!(second.records[0].result, Wrote::Retry { .. }), "{second:?}");
    let state = p.store().get(id(1)).await.unwrap().unwrap();
    assert_eq!(state.retry_at, Some(now.load(Ordering::SeqCst) + 60_000));
}

#[tokio::test]
async fn a_transform_that_fails_hands_its_claims_back_at_once() {
    // The handler fails (Dataverse dropped the connection); the redelivery must be able to
    // take the records at once, not wait for the claims to expire.
    let (dv, mk) = (dataverse(&[1, 3]), MemoryMarketo::default());
    let p = pipeline(&dv, &mk);
    p.poll(None).await.unwrap();
    dv.fail_next("opportunities", 1);
    let err = p.transform(&[id(1), id(3)], false).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    let redelivered = p.transform(&[id(1), id(3)], false).await.unwrap();
    assert_eq!(redelivered.ready().len(), 2, "{redelivered:?}");
}

#[tokio::test]
async fn a_writer_at_its_deadline_leaves_unsent_records_for_the_next_run_without_an_attempt() {
    let (dv, mk) = (dataverse(&[1, 3]), MemoryMarketo::default());
    let p = pipeline(&dv, &mk);
    p.poll(None).await.unwrap();
    p.transform(&[id(1), id(3)], false).await.unwrap();
    let report = p.write_until(&[id(1), id(3)], Some(Instant::now())).await.unwrap();
    assert!(
        report.stopped.as_deref().is_some_and(|s| s.contains("time ran out")),
        "{report:?}"
    );
    assert!(!report.stopped_for_good);
    assert!(
        mk.holds().calls.is_empty(),
        "no call after the deadline: {:?}",
        mk.holds().calls
    );
    for n in [1, 3] {
        let state = p.store().get(id(n)).await.unwrap().unwrap();
        assert_eq!((state.status, state.attempts), (Status::Ready, 0), "{n}");
    }
    let next = p.write(&[id(1), id(3)]).await.unwrap();
    assert!(next.records.iter().all(|r| r.result == Wrote::Synced), "{next:?}");
}

#[tokio::test]
async fn a_deletion_scan_owed_after_an_expired_token_survives_a_failed_run() {
    // Opportunity 3 is deleted while the change-tracking token is expired, so only the scan
    // after the full re-read can find it. That run fails before the scan; the next, with a
    // good token again, must still owe it and run it.
    let (dv, mk) = (dataverse(&[1, 3]), MemoryMarketo::default());
    let p = pipeline(&dv, &mk);
    sync(&p).await;
    dv.delete_opportunity_unseen(&o(3));
    dv.expire_change_tokens();
    dv.fail_next("all_ids", 1);
    assert!(p.poll(None).await.is_err(), "the scan's read failed");
    let poll = p.poll(None).await.unwrap();
    assert!(poll.deletion_scan, "{poll:?}");
    p.drain(|_, _| {}).await.unwrap();
    assert!(!mk.holds().opportunities.contains_key(&o(3)), "deleted in Marketo");
    assert_eq!(status(&p, 3).await, Status::Deleted);
    let after = p.poll(None).await.unwrap();
    assert!(!after.deletion_scan, "paid once, not again: {after:?}");
}

#[tokio::test]
async fn a_role_marketo_accepted_but_the_state_never_recorded_is_deleted_when_its_stakeholder_goes() {
    // Opportunity 6's first write: Marketo accepts every role, then the process dies before the
    // outcome is recorded. Edsger then stops being a stakeholder: his role must be deleted,
    // although no completed write ever recorded it.
    let (dv, mk) = (dataverse(&[6]), MemoryMarketo::default());
    let store = Hooks::new();
    let p = Pipeline::new(store.clone(), dv.clone(), mk.clone(), Config::default(), "crash");
    p.poll(None).await.unwrap();
    p.transform(&[id(6)], false).await.unwrap();
    store.fail_completions.store(1, Ordering::SeqCst);
    assert!(p.write(&[id(6)]).await.is_err(), "the outcome was never recorded");
    let accepted = mk
        .holds()
        .roles
        .keys()
        .filter(|k| k.external_opportunity_id == o(6))
        .count();
    assert!(accepted >= 3, "Marketo holds the roles: {:?}", mk.holds().roles);
    let state = p.store().get(id(6)).await.unwrap().unwrap();
    assert!(state.written.is_none(), "no completed write: {state:?}");

    dv.delete_connection("e0000000-0000-4000-8000-000000000010");
    dv.delete_connection("e0000000-0000-4000-8000-000000000011");
    p.poll(None).await.unwrap();
    p.drain(|_, _| {}).await.unwrap();
    let roles = mk
        .holds()
        .roles
        .keys()
        .filter(|k| k.external_opportunity_id == o(6))
        .count();
    assert_eq!(roles, accepted - 1, "Edsger's role is gone: {:?}", mk.holds().roles);
    let state = p.store().get(id(6)).await.unwrap().unwrap();
    assert_eq!(state.status, Status::Synced);
    assert!(state.planned.is_empty(), "the completed write covers what was planned");
    assert_eq!(state.written.unwrap().roles.len(), roles);
}

/// The Marketo roles of opportunity `n`, as (lead email, role).
fn roles_of(mk: &MemoryMarketo, n: u64) -> Vec<(String, String)> {
    let holds = mk.holds();
    let mut roles: Vec<(String, String)> = holds
        .roles
        .keys()
        .filter(|k| k.external_opportunity_id == o(n))
        .map(|k| {
            let email = holds.leads[&k.lead_id]["email"].as_str().unwrap_or_default().to_owned();
            (email, k.role.clone())
        })
        .collect();
    roles.sort();
    roles
}

#[tokio::test]
async fn a_role_whose_contact_cannot_be_read_is_kept_not_deleted() {
    // Edsger's contact row becomes unreadable (a security role change) while opportunity 6 is
    // edited: his role cannot be planned, and it must not be deleted for that.
    let (dv, mk) = (dataverse(&[6]), MemoryMarketo::default());
    let p = pipeline(&dv, &mk);
    sync(&p).await;
    let before = roles_of(&mk, 6);
    assert!(before.iter().any(|(e, _)| e == "edsger@utexas.example"), "{before:?}");
    dv.make_unreadable("c0000000-0000-4000-8000-000000000005");
    dv.upsert_opportunity(edited(6, 10, 777.0));
    let report = sync(&p).await;
    assert_eq!((report.written, report.failed), (1, 0), "{report:?}");
    assert_eq!(amount(&mk, 6), Some(json!(777.0)));
    assert_eq!(roles_of(&mk, 6), before, "every role kept, Edsger's included");
    assert!(!mk.holds().calls.contains(&"roles.delete"), "{:?}", mk.holds().calls);
    // Readable again, and really removed: then it goes.
    dv.make_readable("c0000000-0000-4000-8000-000000000005");
    dv.delete_connection("e0000000-0000-4000-8000-000000000010");
    dv.delete_connection("e0000000-0000-4000-8000-000000000011");
    sync(&p).await;
    assert_eq!(roles_of(&mk, 6).len(), before.len() - 1);
}

#[tokio::test]
async fn a_role_whose_connection_role_cannot_be_read_is_kept_not_deleted() {
    let (dv, mk) = (dataverse(&[6]), MemoryMarketo::default());
    let p = pipeline(&dv, &mk);
    sync(&p).await;
    let before = roles_of(&mk, 6);
    assert!(before.iter().any(|(_, r)| r == "Champion"), "{before:?}");
    dv.make_unreadable("f0000000-0000-4000-8000-000000000001"); // Champion
    dv.upsert_opportunity(edited(6, 10, 778.0));
    let report = sync(&p).await;
    assert_eq!((report.written, report.failed), (1, 0), "{report:?}");
    assert_eq!(roles_of(&mk, 6), before, "Ada's Champion role is kept");
}

#[tokio::test]
async fn two_writers_needing_the_same_new_contact_create_one_lead() {
    // Opportunities 3 and 6 both name Grace, who has no Marketo lead yet. Writer A's lead
    // creation is in flight when writer B, writing opportunity 6, looks Grace up and finds
    // nothing: B must not create her too (concurrent upserts with one email can create two
    // leads).
    let (dv, mk) = (dataverse(&[3, 6]), MemoryMarketo::default());
    let (now, clock) = clock();
    let store = sqlite();
    let a =
        Pipeline::new(store.clone(), dv.clone(), mk.clone(), Config::default(), "writer-a").with_clock(clock.clone());
    let b = Pipeline::new(store.clone(), dv.clone(), mk.clone(), Config::default(), "writer-b").with_clock(clock);
    a.poll(None).await.unwrap();
    a.transform(&[id(3), id(6)], false).await.unwrap();
    let b2 = b.clone();
    mk.during_next_lead_upsert(Box::new(move || {
        Box::pin(async move {
            let report = b2.write(&[id(6)]).await.unwrap();
            assert!(matches!(report.records[0].result, Wrote::Retry { .. }), "{report:?}");
        })
    }));
    let report = a.write(&[id(3)]).await.unwrap();
    assert_eq!(report.records[0].result, Wrote::Synced, "{report:?}");
    let graces = |mk: &MemoryMarketo| {
        mk.holds()
            .leads
            .values()
            .filter(|f| f.get("email") == Some(&json!("grace@navy.example")))
            .count()
    };
    assert_eq!(graces(&mk), 1, "one lead for Grace: {:?}", mk.holds().leads);
    let waiting = store.get(id(6)).await.unwrap().unwrap();
    assert_eq!(
        (waiting.status, waiting.attempts),
        (Status::Ready, 0),
        "a wait, not a failed try"
    );
    assert_eq!(waiting.last_error.unwrap().code, "lead-being-created");
    // Later, B's retry finds Grace's lead and uses it.
    now.fetch_add(10 * 60_000, Ordering::SeqCst);
    b.wake_due().await.unwrap();
    let report = b.write(&[id(6)]).await.unwrap();
    assert_eq!(report.records[0].result, Wrote::Synced, "{report:?}");
    assert_eq!(graces(&mk), 1);
    let grace_roles = roles_of(&mk, 6)
        .into_iter()
        .filter(|(e, _)| e == "grace@navy.example")
        .count();
    assert!(grace_roles >= 1, "{:?}", roles_of(&mk, 6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batchs_store_round_trips_overlap_instead_of_one_after_another() {
    // 60 opportunities; each claim, renewal and completion takes a 5 ms round trip, as on
    // DynamoDB. One after another, the transform and the write would chain at least 60 each.
    let dv = dataverse(&[2]);
    let template = rows("opportunities.json")
        .into_iter()
        .find(|r| r["opportunityid"] == o(2).as_str())
        .unwrap();
    for n in 100..160 {
        let mut row = template.clone();
        row["opportunityid"] = json!(o(n));
        dv.upsert_opportunity(row);
    }
    let mk = MemoryMarketo::default();
    let store = Hooks::new();
    let p = Pipeline::new(store.clone(), dv.clone(), mk.clone(), Config::default(), "overlap");
    let poll = p.poll(None).await.unwrap();
    assert!(poll.caught_up, "{poll:?}");
    *store.round_trips.lock().unwrap() = Some(Vec::new());
    let report = p.drain(|_, _| {}).await.unwrap();
    assert_eq!((report.written, report.failed), (61, 0), "{report:?}");
    let (trips, critical) = store.critical_path();
    eprintln!("{trips} store round trips for 61 opportunities; critical path {critical}");
    assert!(trips >= 5 * 61, "{trips}");
    // Claims, completions, renewals and planned roles go out 16 at once: a few waves per step.
    assert!(critical <= 40, "{critical} round trips one after another");
}

#[tokio::test]
async fn a_superseded_write_is_requeued_even_when_another_completion_of_its_batch_fails() {
    // Records 1 and 2 are written together. During the opportunity call a newer version of 2
    // arrives (another poller), so what this write sent for 2 may land after the newer write:
    // 2 must be marked for a rewrite. The completion of 1 fails (the store), which returned the
    // error before 2's rewrite was asked for.
    let (dv, mk) = (dataverse(&[1, 2]), MemoryMarketo::default());
    let store = Hooks::new();
    let hooked = Hooked::new(&mk);
    let p = Pipeline::new(store.clone(), dv.clone(), hooked.clone(), Config::default(), "writer");
    p.poll(None).await.unwrap();
    p.transform(&[id(1), id(2)], false).await.unwrap();
    let other = Pipeline::new(store.clone(), dv.clone(), mk.clone(), Config::default(), "poller");
    let dv2 = dv.clone();
    hooked.before(
        "opportunities.sync",
        Box::new(move || {
            Box::pin(async move {
                dv2.upsert_opportunity(edited(2, 20, 2000.0));
                other.poll(None).await.unwrap();
            })
        }),
    );
    store.fail_completions.store(1, Ordering::SeqCst);
    assert!(p.write(&[id(1), id(2)]).await.is_err(), "1's outcome was not recorded");
    let state = p.store().get(id(2)).await.unwrap().unwrap();
    assert!(state.rewrite, "2 is written again whatever its plan's hash: {state:?}");
}
