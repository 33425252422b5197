//! The sync's steps as plain async functions over the Dataverse client, the Marketo client and
//! the state store (architecture.md, "What flows where"):
//!
//! - [`Pipeline::poll`] records what changed in Dynamics as pending, then moves the cursors;
//! - [`Pipeline::transform`] turns pending records into plans (or marks them synced when the plan
//!   is what Marketo already holds);
//! - [`Pipeline::write`] writes ready plans to Marketo in as few calls as the 300-record limit
//!   allows, and records the outcome of each;
//! - [`Pipeline::resync`] runs transform and write now for named records, whatever their hash;
//! - [`Pipeline::drain`] runs transform and write until nothing is left (the local runner).
//!
//! The Lambda functions and the `oppsync` command call these unchanged.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use oppsync_dynamics::{ChangeDetection, DataverseClient, DataverseError, EntitySet, Watermark};
use oppsync_mapping::{
    AccountId, Action, Change, ContactId, Desired, LeadMatch, Opportunity, OpportunityId, Plan, PlanHash, Related,
    WrittenRole, plan_change,
};
use oppsync_marketo::{ErrorClass, MarketoClient, MarketoError, RecordOutcome, RoleKey, RoleRecord};
use oppsync_state::{
    Claim, Completion, Lease, MarkOutcome, Millis, OpportunityState, PendingChange, Source, StateError, StateStore,
    Status, SyncError, TransformResult, WriteResult, Written,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub mod config;
pub mod crash;
pub mod metrics;
pub mod time;

pub use config::{Config, ConfigError, SyncOptions};
pub use metrics::Metrics;

/// The lease the poller holds while it reads a window of changes.
pub const POLL_LEASE: &str = "poller";

/// The connection attributes the poller reads (either side may be the opportunity).
const CONNECTION_SELECT: &[&str] = &[
    "connectionid",
    "_record1id_value",
    "_record2id_value",
    "record1objecttypecode",
    "record2objecttypecode",
    "statecode",
];

/// What stopped a step.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Dataverse(#[from] DataverseError),
    #[error(transparent)]
    Marketo(#[from] MarketoError),
    #[error(transparent)]
    State(#[from] StateError),
}

impl PipelineError {
    /// Whether running the step again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            PipelineError::Dataverse(e) => e.is_retryable(),
            PipelineError::Marketo(e) => e.class().is_retryable() || e.class() == ErrorClass::QuotaExhausted,
            PipelineError::State(e) => e.is_retryable(),
        }
    }
}

/// The clock, in Unix milliseconds; tests and the crash harness substitute their own.
pub type Clock = Arc<dyn Fn() -> Millis + Send + Sync>;

/// The wall clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as Millis)
    })
}

/// The ports a pipeline runs over, built once per process.
pub struct Pipeline<S> {
    pub store: S,
    pub dataverse: DataverseClient,
    pub marketo: MarketoClient,
    pub config: Arc<Config>,
    pub clock: Clock,
    /// Names this process in the lease.
    pub owner: String,
    /// Companies this process has upserted.
    pub companies: CompanyCache,
}

impl<S> Pipeline<S> {
    /// A pipeline on the wall clock.
    pub fn new(
        store: S,
        dataverse: DataverseClient,
        marketo: MarketoClient,
        config: Config,
        owner: impl Into<String>,
    ) -> Pipeline<S> {
        Pipeline {
            store,
            dataverse,
            marketo,
            config: Arc::new(config),
            clock: system_clock(),
            owner: owner.into(),
            companies: CompanyCache::default(),
        }
    }
}

/// The companies this process has upserted, with the name written. A company is the account of
/// many opportunities; without this it would be upserted again in every batch that mentions it.
/// A company whose name changed is written again. Resync bypasses it.
#[derive(Clone, Default)]
pub struct CompanyCache(Arc<Mutex<HashMap<AccountId, Option<String>>>>);

/// Past this many companies the cache starts over (a bound on memory, not a correctness limit).
const COMPANY_CACHE_MAX: usize = 200_000;

impl CompanyCache {
    fn holds(&self, id: AccountId, name: &Option<String>) -> bool {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&id) == Some(name)
    }

    fn remember(&self, id: AccountId, name: Option<String>) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= COMPANY_CACHE_MAX {
            map.clear();
        }
        map.insert(id, name);
    }
}

impl<S: Clone> Clone for Pipeline<S> {
    fn clone(&self) -> Self {
        Pipeline {
            store: self.store.clone(),
            dataverse: self.dataverse.clone(),
            marketo: self.marketo.clone(),
            config: self.config.clone(),
            clock: self.clock.clone(),
            owner: self.owner.clone(),
            companies: self.companies.clone(),
        }
    }
}

/// What a poll did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PollReport {
    /// Another poller holds the lease; nothing was read.
    pub busy: bool,
    /// Changed or deleted opportunities read.
    pub opportunity_changes: u64,
    /// Stakeholder connection changes read.
    pub connection_changes: u64,
    /// Records newly marked pending.
    pub marked: u64,
    /// Changes the store already had at that version or newer.
    pub stale: u64,
    /// Records put back to pending because their stakeholders changed, or they were stuck.
    pub requeued: u64,
    /// Both sources are read up to now; false when the time budget ran out first (the next
    /// poll continues from the stored cursors).
    pub caught_up: bool,
    /// A change-tracking token had expired and a source was read again in full.
    pub full_resync: bool,
    /// A full id scan for deletions ran.
    pub deletion_scan: bool,
    pub dataverse_requests: u64,
}

/// One record's transform.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Transformed {
    /// Planned: ready to write.
    Ready { plan: Box<Plan> },
    /// The plan equals what Marketo holds: synced without a call.
    Unchanged,
    /// Excluded by the sync filter.
    Filtered,
    /// Deleted in Dynamics; the delete policy (or an earlier write) leaves nothing to do.
    Kept,
    /// Could not be planned.
    Failed { error: SyncError },
    /// Not pending, or another worker holds it.
    NotClaimed,
    /// A newer version arrived while planning; the newer one will be planned.
    Superseded,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TransformRecord {
    pub id: OpportunityId,
    #[serde(flatten)]
    pub result: Transformed,
}

/// What a transform batch did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TransformReport {
    pub records: Vec<TransformRecord>,
    #[serde(skip)]
    pub metrics: Metrics,
}

impl TransformReport {
    pub fn ready(&self) -> Vec<OpportunityId> {
        self.records
            .iter()
            .filter(|r| matches!(r.result, Transformed::Ready { .. }))
            .map(|r| r.id)
            .collect()
    }
}

/// Marketo's answer for one record of one call.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Answer {
    /// `companies`, `leads`, `opportunities`, `roles`, `role_deletions`, `opportunity_deletions`.
    pub operation: &'static str,
    /// The record's key in that call.
    pub key: String,
    pub outcome: RecordOutcome,
}

/// How one record's write ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Wrote {
    Synced,
    Deleted,
    /// A retryable failure: the record stays ready.
    Retry {
        error: SyncError,
    },
    /// A permanent failure, in the error ledger.
    Failed {
        error: SyncError,
    },
    NotClaimed,
    /// A newer version arrived during the write; what was written is recorded and the newer
    /// version will be written next.
    Superseded,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WriteRecord {
    pub id: OpportunityId,
    #[serde(flatten)]
    pub result: Wrote,
    pub answers: Vec<Answer>,
}

/// What a write batch did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct WriteReport {
    pub records: Vec<WriteRecord>,
    /// Why writing stopped early (quota, budget, credentials), if it did.
    pub stopped: Option<String>,
    /// The stop will not pass by itself (credentials refused, an instance that runs Marketo's
    /// native CRM sync): someone must fix something. False for the quota and the budget.
    pub stopped_for_good: bool,
    pub marketo_calls: u64,
    #[serde(skip)]
    pub metrics: Metrics,
}

impl WriteReport {
    /// Records to hand back for retry (Lambda `batchItemFailures`).
    pub fn retry(&self) -> Vec<OpportunityId> {
        self.records
            .iter()
            .filter(|r| matches!(r.result, Wrote::Retry { .. }))
            .map(|r| r.id)
            .collect()
    }
}

/// The resync function's input.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ResyncRequest {
    #[serde(default)]
    pub opportunity_ids: Vec<String>,
    #[serde(default)]
    pub all: bool,
    #[serde(default)]
    pub dry_run: bool,
}

/// A resync input that makes sense.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResyncTarget {
    Ids(Vec<OpportunityId>),
    All,
}

impl ResyncRequest {
    /// Checks the request: ids are GUIDs (nothing else reaches a Dataverse query), and exactly
    /// one of `opportunityIds` and `all` is given.
    pub fn target(&self) -> Result<ResyncTarget, String> {
        match (self.all, self.opportunity_ids.is_empty()) {
            (true, false) => Err("give either \"opportunityIds\" or \"all\": true, not both".into()),
            (false, true) => {
                Err("nothing to resync: give \"opportunityIds\": [\"<guid>\", ...] or \"all\": true".into())
            }
            (true, true) => Ok(ResyncTarget::All),
            (false, false) => {
                let mut ids = Vec::new();
                let mut bad = Vec::new();
                for text in &self.opportunity_ids {
                    match OpportunityId::parse(text.trim()) {
                        Ok(id) => ids.push(id),
                        Err(_) => bad.push(text.chars().take(80).collect::<String>()),
                    }
                }
                if bad.is_empty() {
                    ids.sort();
                    ids.dedup();
                    Ok(ResyncTarget::Ids(ids))
                } else {
                    Err(format!(
                        "not opportunity ids (GUIDs like 6f1c3b2a-5d4e-4f60-8a7b-9c0d1e2f3a4b): {}",
                        bad.iter().map(|b| format!("`{b}`")).collect::<Vec<_>>().join(", ")
                    ))
                }
            }
        }
    }
}

/// One record's resync.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResyncRecord {
    pub id: OpportunityId,
    /// The plan made now.
    pub plan: Option<Plan>,
    /// What Marketo held before (from the sync state).
    pub previously_written: Option<WrittenSummary>,
    pub transform: Option<Transformed>,
    pub write: Option<Wrote>,
    pub answers: Vec<Answer>,
}

/// What was last written, for reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WrittenSummary {
    pub version: i64,
    pub hash: PlanHash,
    pub marketo_guid: Option<String>,
    pub roles: Vec<WrittenRole>,
    pub deleted: bool,
}

impl From<&Written> for WrittenSummary {
    fn from(w: &Written) -> Self {
        WrittenSummary {
            version: w.version,
            hash: w.hash,
            marketo_guid: w.marketo_guid.clone(),
            roles: w.roles.clone(),
            deleted: w.deleted,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ResyncReport {
    pub dry_run: bool,
    pub records: Vec<ResyncRecord>,
    pub stopped: Option<String>,
}

/// A plan made without touching the state (dry runs, `oppsync plan`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Preview {
    pub id: OpportunityId,
    pub plan: Result<Plan, SyncError>,
    pub written: Option<WrittenSummary>,
    /// The plan equals what was last written: a sync would make no Marketo call.
    pub unchanged: bool,
}

/// What a drain (transform and write until nothing is left) did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DrainReport {
    pub transformed: u64,
    pub unchanged: u64,
    pub written: u64,
    pub failed: u64,
    /// Write attempts that ended in a retryable failure (a record may count more than once).
    pub retried: u64,
    /// Records whose last write this drain failed retryably: still queued for the next run.
    pub left_for_retry: u64,
    /// Why they were left, as `operation code: message` with how many records each.
    pub retry_reasons: Vec<(String, u64)>,
    pub stopped: Option<String>,
    /// See [`WriteReport::stopped_for_good`].
    pub stopped_for_good: bool,
    #[serde(skip)]
    pub metrics: Metrics,
}

/// The cursor of a watermark strategy, stored as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct WatermarkCursor {
    watermark: Watermark,
    /// Polls since the last full scan for deletions.
    polls: u32,
}

fn sync_error(operation: &str, code: impl Into<String>, message: impl Into<String>) -> SyncError {
    SyncError {
        operation: operation.to_owned(),
        code: code.into(),
        message: message.into(),
    }
}

/// Per-record bookkeeping during a write.
struct Work {
    claim: Claim,
    state: OpportunityState,
    plan: Plan,
    /// The first error met; later steps skip the record.
    error: Option<(SyncError, bool)>,
    /// An error that does not stop the other writes (a duplicate lead), recorded at the end.
    soft_error: Option<SyncError>,
    roles: BTreeMap<(ContactId, String), Option<i64>>,
    guid: Option<String>,
    company_done: bool,
    touched: bool,
    answers: Vec<Answer>,
}

impl Work {
    fn fail(&mut self, error: SyncError, retryable: bool) {
        if self.error.is_none() {
            self.error = Some((error, retryable));
        }
    }
    fn ok(&self) -> bool {
        self.error.is_none()
    }
}

/// Whether a skipped record is worth retrying.
fn skip_error(operation: &str, outcome: &RecordOutcome) -> (SyncError, bool) {
    let code = outcome.code().unwrap_or("skipped").to_owned();
    let message = outcome
        .reasons
        .first()
        .map(|r| r.message.clone())
        .unwrap_or_else(|| "skipped without a reason".into());
    let retryable = outcome.class().is_some_and(ErrorClass::is_retryable);
    (sync_error(operation, code, message), retryable)
}

impl<S: StateStore> Pipeline<S> {
    fn now(&self) -> Millis {
        (self.clock)()
    }

    /// Where a watermark strategy starts: before every row.
    fn first_watermark(&self) -> Watermark {
        if self.config.dataverse.change_detection == ChangeDetection::VersionWatermark {
            Watermark::Version(0)
        } else {
            Watermark::ModifiedOn {
                at: "1900-01-01T00:00:00Z".into(),
                seen: Vec::new(),
            }
        }
    }

    fn opportunity_select(&self) -> Vec<String> {
        self.config.mapping.opportunity_attributes()
    }

    // ---------------------------------------------------------------- poll

    /// Reads what changed in Dynamics since the cursors and records each changed opportunity as
    /// pending; a cursor moves only after the changes it covers are recorded. Stops at `deadline`
    /// with `caught_up: false`; the next poll continues from there.
    #[tracing::instrument(skip_all, name = "poll")]
    pub async fn poll(&self, deadline: Option<Instant>) -> Result<PollReport, PipelineError> {
        let requests_before = self.dataverse.requests();
        let ttl = i64::from(self.config.sync.lease_ttl_seconds) * 1000;
        let Some(lease) = self
            .store
            .acquire_lease(POLL_LEASE, &self.owner, ttl, self.now())
            .await?
        else {
            tracing::info!("another poller holds the lease; nothing to do");
            return Ok(PollReport {
                busy: true,
                ..PollReport::default()
            });
        };
        let mut report = PollReport::default();
        let result = self.poll_under(lease.clone(), deadline, &mut report).await;
        // Give the lease up even after an error: the cursors hold everything recorded so far.
        if let Err(e) = self.store.release_lease(&lease).await {
            tracing::warn!(error = %e, "could not release the poller lease; it expires by itself");
        }
        report.dataverse_requests = self.dataverse.requests() - requests_before;
        result?;
        Ok(report)
    }

    async fn poll_under(
        &self,
        mut lease: Lease,
        deadline: Option<Instant>,
        report: &mut PollReport,
    ) -> Result<(), PipelineError> {
        let mut marked_now: BTreeSet<OpportunityId> = BTreeSet::new();
        let done = match self.config.dataverse.change_detection {
            ChangeDetection::ChangeTracking => self.poll_tracked(&mut lease, deadline, report, &mut marked_now).await?,
            _ => self.poll_watermark(&mut lease, report, &mut marked_now).await?,
        };
        report.caught_up = done;
        if done {
            report.requeued += self.sweep_stuck().await?;
        }
        Ok(())
    }

    fn out_of_time(deadline: Option<Instant>) -> bool {
        deadline.is_some_and(|d| Instant::now() >= d)
    }

    async fn renew(&self, lease: &mut Lease) -> Result<(), PipelineError> {
        let ttl = i64::from(self.config.sync.lease_ttl_seconds) * 1000;
        match self.store.renew_lease(lease, ttl, self.now()).await? {
            Some(renewed) => {
                *lease = renewed;
                Ok(())
            }
            None => Err(StateError::LeaseLost(lease.name.clone()).into()),
        }
    }

    async fn poll_tracked(
        &self,
        lease: &mut Lease,
        deadline: Option<Instant>,
        report: &mut PollReport,
        marked_now: &mut BTreeSet<OpportunityId>,
    ) -> Result<bool, PipelineError> {
        let select: Vec<String> = vec!["opportunityid".into(), "versionnumber".into(), "modifiedon".into()];
        let select: Vec<&str> = select.iter().map(String::as_str).collect();
        for (source, set) in [
            (Source::Opportunities, EntitySet::Opportunities),
            (Source::Connections, EntitySet::Connections),
        ] {
            loop {
                if Self::out_of_time(deadline) {
                    return Ok(false);
                }
                let cursor = self.store.cursor(source).await?;
                let columns = if source == Source::Opportunities {
                    &select[..]
                } else {
                    CONNECTION_SELECT
                };
                let page = self
                    .dataverse
                    .changes(set, columns, cursor.as_ref().map(|c| c.value.as_str()))
                    .await?;
                report.full_resync |= page.full_resync;
                match source {
                    Source::Opportunities => {
                        report.opportunity_changes += (page.rows.len() + page.deleted.len()) as u64;
                        self.record_opportunity_changes(&page.rows, &page.deleted, report, marked_now)
                            .await?;
                    }
                    Source::Connections => {
                        report.connection_changes += (page.rows.len() + page.deleted.len()) as u64;
                        self.record_connection_changes(&page.rows, &page.deleted, report, marked_now)
                            .await?;
                    }
                }
                crash::point("poll.recorded");
                self.renew(lease).await?;
                self.store
                    .advance_cursor(lease, source, &page.cursor, self.now())
                    .await?;
                crash::point("poll.cursor");
                if page.full_resync && source == Source::Opportunities {
                    // Deletions during the expired window are gone from change tracking; the
                    // full read is followed by a scan that finds them.
                    report.deletion_scan = true;
                }
                if page.caught_up {
                    break;
                }
            }
        }
        if report.deletion_scan {
            self.scan_deletions(report, marked_now).await?;
        }
        Ok(true)
    }

    async fn poll_watermark(
        &self,
        lease: &mut Lease,
        report: &mut PollReport,
        marked_now: &mut BTreeSet<OpportunityId>,
    ) -> Result<bool, PipelineError> {
        let mut scan = false;
        for (source, set) in [
            (Source::Opportunities, EntitySet::Opportunities),
            (Source::Connections, EntitySet::Connections),
        ] {
            let stored = self.store.cursor(source).await?;
            let cursor = match stored {
                Some(c) => serde_json::from_str::<WatermarkCursor>(&c.value).map_err(|e| StateError::Corrupt {
                    key: format!("cursor {}", source.as_str()),
                    reason: format!(
                        "{e}; a cursor from another change-detection strategy? Reset it with a full resync"
                    ),
                })?,
                None => WatermarkCursor {
                    watermark: self.first_watermark(),
                    polls: 0,
                },
            };
            let columns: Vec<&str> = if source == Source::Opportunities {
                vec!["opportunityid"]
            } else {
                CONNECTION_SELECT.to_vec()
            };
            let (rows, next) = self
                .dataverse
                .watermark_changes(set, &columns, &cursor.watermark)
                .await?;
            match source {
                Source::Opportunities => {
                    report.opportunity_changes += rows.len() as u64;
                    self.record_opportunity_changes(&rows, &[], report, marked_now).await?;
                }
                Source::Connections => {
                    report.connection_changes += rows.len() as u64;
                    self.record_connection_changes(&rows, &[], report, marked_now).await?;
                }
            }
            let polls = cursor.polls + 1;
            let due = source == Source::Opportunities && polls >= self.config.dataverse.full_scan_every;
            scan |= due;
            let value = serde_json::to_string(&WatermarkCursor {
                watermark: next,
                polls: if due { 0 } else { polls },
            })
            .map_err(|e| StateError::Corrupt {
                key: "cursor".into(),
                reason: e.to_string(),
            })?;
            self.renew(lease).await?;
            self.store.advance_cursor(lease, source, &value, self.now()).await?;
        }
        if scan {
            report.deletion_scan = true;
            self.scan_deletions(report, marked_now).await?;
        }
        Ok(true)
    }

    async fn record_opportunity_changes(
        &self,
        rows: &[Value],
        deleted: &[String],
        report: &mut PollReport,
        marked_now: &mut BTreeSet<OpportunityId>,
    ) -> Result<(), PipelineError> {
        let mut changes = Vec::with_capacity(rows.len() + deleted.len());
        for row in rows {
            let Some(id) = row["opportunityid"].as_str().and_then(|t| OpportunityId::parse(t).ok()) else {
                tracing::warn!(row = %row, "a changed opportunity without a valid opportunityid; skipped");
                continue;
            };
            let version = match &row["versionnumber"] {
                Value::Number(n) => n.as_i64(),
                Value::String(s) => s.parse().ok(),
                _ => None,
            }
            .unwrap_or(0);
            changes.push(PendingChange::upserted(
                id,
                version,
                row["modifiedon"].as_str().map(str::to_owned),
            ));
        }
        for text in deleted {
            match OpportunityId::parse(text) {
                Ok(id) => changes.push(PendingChange::deleted(id)),
                Err(_) => tracing::warn!(id = %text, "a deleted opportunity id that is not a GUID; skipped"),
            }
        }
        self.mark(&changes, report, marked_now).await
    }

    async fn mark(
        &self,
        changes: &[PendingChange],
        report: &mut PollReport,
        marked_now: &mut BTreeSet<OpportunityId>,
    ) -> Result<(), PipelineError> {
        for chunk in changes.chunks(1000) {
            let outcomes = self.store.mark_pending(chunk, self.now()).await?;
            for (change, outcome) in chunk.iter().zip(outcomes) {
                match outcome {
                    MarkOutcome::Recorded => {
                        report.marked += 1;
                        marked_now.insert(change.id);
                    }
                    MarkOutcome::Stale => report.stale += 1,
                }
            }
        }
        Ok(())
    }

    async fn record_connection_changes(
        &self,
        rows: &[Value],
        deleted: &[String],
        report: &mut PollReport,
        marked_now: &mut BTreeSet<OpportunityId>,
    ) -> Result<(), PipelineError> {
        let mut links = Vec::new();
        for row in rows {
            let touched = oppsync_dynamics::opportunities_touched(std::slice::from_ref(row));
            if let (Some(connection), Some(opportunity)) = (row["connectionid"].as_str(), touched.first()) {
                links.push((connection.to_owned(), *opportunity));
            }
        }
        self.store.remember_links(&links).await?;
        let mut touched: BTreeSet<OpportunityId> = links.iter().map(|(_, o)| *o).collect();
        touched.extend(self.store.linked_opportunities(deleted).await?);
        touched.retain(|id| !marked_now.contains(id));
        self.touch(touched, report, marked_now).await
    }

    /// Opportunities whose related records changed but whose own version did not: new ones are
    /// recorded at version 0 (the transform reads the current record), known ones requeued.
    async fn touch(
        &self,
        ids: BTreeSet<OpportunityId>,
        report: &mut PollReport,
        marked_now: &mut BTreeSet<OpportunityId>,
    ) -> Result<(), PipelineError> {
        let changes: Vec<PendingChange> = ids.iter().map(|id| PendingChange::upserted(*id, 0, None)).collect();
        for chunk in changes.chunks(1000) {
            let outcomes = self.store.mark_pending(chunk, self.now()).await?;
            for (change, outcome) in chunk.iter().zip(outcomes) {
                match outcome {
                    MarkOutcome::Recorded => report.marked += 1,
                    MarkOutcome::Stale => {
                        if self.store.requeue(change.id, self.now()).await? {
                            report.requeued += 1;
                        }
                    }
                }
                marked_now.insert(change.id);
            }
        }
        Ok(())
    }

    /// Finds opportunities deleted while no change tracking saw it: every id the store knows
    /// (listed first, so a record created meanwhile is not mistaken for a deletion) that
    /// Dataverse no longer has.
    async fn scan_deletions(
        &self,
        report: &mut PollReport,
        marked_now: &mut BTreeSet<OpportunityId>,
    ) -> Result<(), PipelineError> {
        let mut known = Vec::new();
        for status in Status::ALL {
            if status == Status::Deleted {
                continue;
            }
            let mut page: Option<String> = None;
            loop {
                let listed = self.store.list(status, 1000, page.as_deref()).await?;
                known.extend(listed.items.into_iter().filter(|s| !s.deleted).map(|s| s.id));
                match listed.next {
                    Some(next) => page = Some(next),
                    None => break,
                }
            }
        }
        let present = self.dataverse.all_ids(EntitySet::Opportunities).await?;
        let gone: Vec<PendingChange> = known
            .into_iter()
            .filter(|id| !present.contains(&id.to_string()))
            .map(PendingChange::deleted)
            .collect();
        tracing::info!(deletions = gone.len(), "deletion scan");
        report.opportunity_changes += gone.len() as u64;
        self.mark(&gone, report, marked_now).await
    }

    /// The opportunities a poll would record now: read from the stored cursors, which do not
    /// move, and nothing is recorded (`oppsync plan`). Deletions a watermark cannot see are
    /// left to the poll's periodic scan.
    pub async fn peek(&self) -> Result<BTreeSet<OpportunityId>, PipelineError> {
        let mut ids = BTreeSet::new();
        let opportunity_columns = ["opportunityid"];
        for (source, set) in [
            (Source::Opportunities, EntitySet::Opportunities),
            (Source::Connections, EntitySet::Connections),
        ] {
            let columns: &[&str] = if source == Source::Opportunities {
                &opportunity_columns
            } else {
                CONNECTION_SELECT
            };
            let stored = self.store.cursor(source).await?.map(|c| c.value);
            let (rows, deleted) = match self.config.dataverse.change_detection {
                ChangeDetection::ChangeTracking => {
                    let (mut rows, mut deleted) = (Vec::new(), Vec::new());
                    let mut cursor = stored;
                    loop {
                        let page = self.dataverse.changes(set, columns, cursor.as_deref()).await?;
                        rows.extend(page.rows);
                        deleted.extend(page.deleted);
                        cursor = Some(page.cursor);
                        if page.caught_up {
                            break;
                        }
                    }
                    (rows, deleted)
                }
                _ => {
                    let watermark = match stored {
                        Some(text) => {
                            serde_json::from_str::<WatermarkCursor>(&text)
                                .map_err(|e| StateError::Corrupt {
                                    key: format!("cursor {}", source.as_str()),
                                    reason: e.to_string(),
                                })?
                                .watermark
                        }
                        None => self.first_watermark(),
                    };
                    (
                        self.dataverse.watermark_changes(set, columns, &watermark).await?.0,
                        Vec::new(),
                    )
                }
            };
            match source {
                Source::Opportunities => {
                    ids.extend(
                        rows.iter()
                            .filter_map(|r| r["opportunityid"].as_str())
                            .chain(deleted.iter().map(String::as_str))
                            .filter_map(|t| OpportunityId::parse(t).ok()),
                    );
                }
                Source::Connections => {
                    ids.extend(oppsync_dynamics::opportunities_touched(&rows));
                    ids.extend(self.store.linked_opportunities(&deleted).await?);
                }
            }
        }
        Ok(ids)
    }

    /// Requeues open records nobody has touched for `stuck_after_minutes`: a worker died, a
    /// stream delivery went to the dead-letter queue, or a retry was never redelivered.
    pub async fn sweep_stuck(&self) -> Result<u64, PipelineError> {
        let now = self.now();
        let cutoff = now - i64::from(self.config.sync.stuck_after_minutes) * 60_000;
        let mut requeued = 0;
        for status in [Status::Pending, Status::Ready] {
            let mut page: Option<String> = None;
            'pages: loop {
                let listed = self.store.list(status, 500, page.as_deref()).await?;
                for item in &listed.items {
                    // Oldest first: once one is recent, the rest are too.
                    if item.updated_at > cutoff {
                        break 'pages;
                    }
                    if item.claim_until.is_none_or(|until| until <= now) && self.store.requeue(item.id, now).await? {
                        tracing::warn!(opportunity = %item.id, status = %status, "requeued a stuck record");
                        requeued += 1;
                    }
                }
                match listed.next {
                    Some(next) => page = Some(next),
                    None => break,
                }
            }
        }
        Ok(requeued)
    }

    // ---------------------------------------------------------------- transform

    /// Plans records without touching the state: for dry runs and `oppsync plan`.
    pub async fn preview(&self, ids: &[OpportunityId]) -> Result<Vec<Preview>, PipelineError> {
        let mut states = Vec::with_capacity(ids.len());
        for id in ids {
            states.push((*id, self.store.get(*id).await?));
        }
        let plans = self.plan_batch(&states).await?;
        Ok(states
            .into_iter()
            .zip(plans)
            .map(|((id, state), plan)| {
                let written = state.as_ref().and_then(|s| s.written.as_ref());
                let unchanged = match (&plan, written) {
                    (Ok(p), Some(w)) => p.hash == w.hash && p.role_deletions.is_empty(),
                    _ => false,
                };
                Preview {
                    id,
                    plan,
                    written: written.map(WrittenSummary::from),
                    unchanged,
                }
            })
            .collect())
    }

    /// Reads what the rules need for a batch and plans each record.
    async fn plan_batch(
        &self,
        states: &[(OpportunityId, Option<OpportunityState>)],
    ) -> Result<Vec<Result<Plan, SyncError>>, PipelineError> {
        let live: Vec<OpportunityId> = states
            .iter()
            .filter(|(_, s)| !s.as_ref().is_some_and(|s| s.deleted))
            .map(|(id, _)| *id)
            .collect();
        let select = self.opportunity_select();
        let select: Vec<&str> = select.iter().map(String::as_str).collect();
        let rows = if live.is_empty() {
            Vec::new()
        } else {
            self.dataverse.opportunities(&live, &select).await?
        };
        let mut parsed: HashMap<OpportunityId, Result<Opportunity, SyncError>> = HashMap::new();
        for row in rows {
            let id = row["opportunityid"].as_str().and_then(|t| OpportunityId::parse(t).ok());
            let result = Opportunity::from_json(row);
            match (id, result) {
                (_, Ok(o)) => {
                    parsed.insert(o.id, Ok(o));
                }
                (Some(id), Err(e)) => {
                    parsed.insert(id, Err(sync_error("read", "bad-record", e.to_string())));
                }
                (None, Err(e)) => tracing::warn!(error = %e, "an opportunity row without a usable id"),
            }
        }
        let opportunities: Vec<Opportunity> = parsed.values().filter_map(|r| r.as_ref().ok().cloned()).collect();
        let related = if opportunities.is_empty() {
            Related::default()
        } else {
            let (related, problems) = self.dataverse.related(&opportunities).await?;
            for problem in problems {
                tracing::warn!(problem = %problem, "a related record could not be read; plans carry a warning");
            }
            related
        };
        Ok(states
            .iter()
            .map(|(id, state)| {
                let written_roles: &[WrittenRole] = state
                    .as_ref()
                    .and_then(|s| s.written.as_ref())
                    .map_or(&[], |w| &w.roles[..]);
                let change = if state.as_ref().is_some_and(|s| s.deleted) {
                    Change::Deleted(*id)
                } else {
                    match parsed.remove(id) {
                        Some(Ok(o)) => Change::Upserted(o),
                        Some(Err(e)) => return Err(e),
                        // Not in Dataverse any more: deleted after the poll read it. The poll's
                        // deletion record follows; planning the delete now is the same outcome.
                        None => Change::Deleted(*id),
                    }
                };
                let plan = plan_change(&self.config.mapping, &change, &related, written_roles);
                for w in &plan.warnings {
                    tracing::warn!(opportunity = %id, field = %w.field, "{}", w.message);
                }
                Ok(plan)
            })
            .collect())
    }

    /// Plans a batch of pending records. With `force`, a plan equal to what was last written is
    /// still made ready (resync).
    #[tracing::instrument(skip_all, name = "transform", fields(records = ids.len()))]
    pub async fn transform(&self, ids: &[OpportunityId], force: bool) -> Result<TransformReport, PipelineError> {
        let ttl = i64::from(self.config.sync.claim_ttl_seconds) * 1000;
        let mut report = TransformReport::default();
        let mut claimed = Vec::new();
        let mut unique: Vec<OpportunityId> = ids.to_vec();
        unique.sort();
        unique.dedup();
        for id in unique {
            match self.store.claim(id, Status::Pending, ttl, self.now()).await? {
                Some((claim, state)) => claimed.push((claim, state)),
                None => report.records.push(TransformRecord {
                    id,
                    result: Transformed::NotClaimed,
                }),
            }
        }
        if claimed.is_empty() {
            return Ok(report);
        }
        let states: Vec<(OpportunityId, Option<OpportunityState>)> =
            claimed.iter().map(|(c, s)| (c.id, Some(s.clone()))).collect();
        let plans = self.plan_batch(&states).await?;
        for ((claim, state), plan) in claimed.into_iter().zip(plans) {
            let (result, outcome) = match plan {
                Err(error) => (TransformResult::Failed(error.clone()), Transformed::Failed { error }),
                Ok(plan) => {
                    let written = state.written.as_ref();
                    let unchanged = written.is_some_and(|w| w.hash == plan.hash) && plan.role_deletions.is_empty();
                    match &plan.action {
                        Action::Excluded => (TransformResult::Filtered(plan), Transformed::Filtered),
                        Action::Keep => (TransformResult::Kept(plan), Transformed::Kept),
                        // A deletion already written stays deleted.
                        Action::Delete if unchanged && !force => (TransformResult::Kept(plan), Transformed::Kept),
                        _ if unchanged && !force => (TransformResult::Unchanged, Transformed::Unchanged),
                        _ => (
                            TransformResult::Ready(plan.clone()),
                            Transformed::Ready { plan: Box::new(plan) },
                        ),
                    }
                }
            };
            crash::point("transform.planned");
            let completion = self.store.complete_transform(&claim, result, self.now()).await?;
            let outcome = match completion {
                Completion::Completed => outcome,
                Completion::Superseded => Transformed::Superseded,
            };
            let name = match &outcome {
                Transformed::Ready { .. } => "OpportunitiesPlanned",
                Transformed::Unchanged => "OpportunitiesSkippedUnchanged",
                Transformed::Filtered => "OpportunitiesFiltered",
                Transformed::Kept => "OpportunitiesKept",
                Transformed::Failed { .. } => "OpportunitiesFailed",
                Transformed::NotClaimed | Transformed::Superseded => "OpportunitiesSuperseded",
            };
            report.metrics.count(name, 1);
            if matches!(outcome, Transformed::Unchanged)
                && let Some(at) = state.modified_on.as_deref().and_then(time::parse_utc)
            {
                report.metrics.observe_ms("SyncLag", (self.now() - at).max(0) as f64);
            }
            tracing::debug!(opportunity = %claim.id, outcome = name, "transformed");
            report.records.push(TransformRecord {
                id: claim.id,
                result: outcome,
            });
        }
        report.metrics.count("DataverseCalls", 0);
        Ok(report)
    }

    // ---------------------------------------------------------------- write

    /// Writes a batch of ready plans to Marketo: companies, then leads (found or created), then
    /// opportunities, roles, role deletions and opportunity deletions, each as few calls as the
    /// 300-record limit allows; then records each outcome.
    #[tracing::instrument(skip_all, name = "write", fields(records = ids.len()))]
    pub async fn write(&self, ids: &[OpportunityId]) -> Result<WriteReport, PipelineError> {
        self.write_batch(ids, false).await
    }

    /// [`Pipeline::write`]; `fresh` writes every company again, even one this process wrote.
    async fn write_batch(&self, ids: &[OpportunityId], fresh: bool) -> Result<WriteReport, PipelineError> {
        let ttl = i64::from(self.config.sync.claim_ttl_seconds) * 1000;
        let mut report = WriteReport::default();
        let mut works = Vec::new();
        let mut unique: Vec<OpportunityId> = ids.to_vec();
        unique.sort();
        unique.dedup();
        for id in unique {
            match self.store.claim(id, Status::Ready, ttl, self.now()).await? {
                Some((claim, state)) => match state.plan.clone() {
                    Some(plan) => works.push(Work {
                        roles: state
                            .written
                            .as_ref()
                            .map(|w| {
                                w.roles
                                    .iter()
                                    .map(|r| ((r.contact, r.role.clone()), r.lead_id))
                                    .collect()
                            })
                            .unwrap_or_default(),
                        guid: state.written.as_ref().and_then(|w| w.marketo_guid.clone()),
                        claim,
                        state,
                        plan,
                        error: None,
                        soft_error: None,
                        company_done: false,
                        touched: false,
                        answers: Vec::new(),
                    }),
                    None => {
                        let error = sync_error("write", "no-plan", "a ready record without a stored plan; resync it");
                        self.store
                            .complete_write(
                                &claim,
                                WriteResult::Failed {
                                    error: error.clone(),
                                    written: None,
                                },
                                self.now(),
                            )
                            .await?;
                        report.records.push(WriteRecord {
                            id,
                            result: Wrote::Failed { error },
                            answers: Vec::new(),
                        });
                    }
                },
                None => report.records.push(WriteRecord {
                    id,
                    result: Wrote::NotClaimed,
                    answers: Vec::new(),
                }),
            }
        }
        if works.is_empty() {
            return Ok(report);
        }
        // The daily budget holds across processes: start from the store's count.
        let day = time::marketo_day(self.now());
        let used = self.store.marketo_calls(&day).await?;
        self.marketo.set_calls_today(used);
        let before = self.marketo.calls_by_endpoint();

        let stopped = self.write_steps(&mut works, fresh).await;
        crash::point("write.sent");
        if let Some(e) = &stopped {
            tracing::warn!(error = %e, "Marketo writes stopped early; unfinished records stay ready");
            report.stopped = Some(e.to_string());
            report.stopped_for_good = !(e.class().is_retryable() || e.class() == ErrorClass::QuotaExhausted);
        }

        let after = self.marketo.calls_by_endpoint();
        let mut calls = 0;
        for (endpoint, n) in &after {
            let delta = n - before.get(endpoint).copied().unwrap_or(0);
            if delta > 0 {
                calls += delta;
                report.metrics.count(format!("MarketoCalls.{endpoint}"), delta);
            }
        }
        report.marketo_calls = calls;
        if calls > 0 {
            self.store.add_marketo_calls(&day, calls).await?;
        }

        for work in works {
            let (result, wrote) = self.finish(&work);
            let completion = self.store.complete_write(&work.claim, result, self.now()).await?;
            crash::point("write.recorded");
            let wrote = match completion {
                Completion::Completed => wrote,
                Completion::Superseded => Wrote::Superseded,
            };
            let name = match &wrote {
                Wrote::Synced => "OpportunitiesSynced",
                Wrote::Deleted => "OpportunitiesDeleted",
                Wrote::Retry { .. } => "OpportunitiesRetried",
                Wrote::Failed { .. } => "OpportunitiesFailed",
                Wrote::NotClaimed | Wrote::Superseded => "OpportunitiesSuperseded",
            };
            report.metrics.count(name, 1);
            if matches!(wrote, Wrote::Synced | Wrote::Deleted)
                && let Some(at) = work.state.modified_on.as_deref().and_then(time::parse_utc)
            {
                report.metrics.observe_ms("SyncLag", (self.now() - at).max(0) as f64);
            }
            match &wrote {
                Wrote::Failed { error } | Wrote::Retry { error } => tracing::warn!(
                    opportunity = %work.claim.id, operation = %error.operation, code = %error.code,
                    outcome = name, "{}", error.message
                ),
                _ => tracing::debug!(opportunity = %work.claim.id, outcome = name, "written"),
            }
            report.records.push(WriteRecord {
                id: work.claim.id,
                result: wrote,
                answers: work.answers,
            });
        }
        Ok(report)
    }

    /// What to record for one record after the calls.
    fn finish(&self, work: &Work) -> (WriteResult, Wrote) {
        let deleting = matches!(work.plan.action, Action::Delete);
        let previous = work.state.written.as_ref();
        let roles: Vec<WrittenRole> = work
            .roles
            .iter()
            .map(|((contact, role), lead_id)| WrittenRole {
                contact: *contact,
                role: role.clone(),
                lead_id: *lead_id,
            })
            .collect();
        let written = |hash: PlanHash, deleted: bool| Written {
            version: work.plan.source_version.unwrap_or(work.claim.version),
            hash,
            marketo_guid: if deleted { None } else { work.guid.clone() },
            company: match &work.plan.action {
                Action::Upsert(d) if work.company_done => d.company.as_ref().map(|c| c.external_company_id),
                _ => previous.and_then(|w| w.company),
            },
            roles: roles.clone(),
            deleted,
            at: self.now(),
        };
        let failure: Option<(&SyncError, bool)> = match (&work.error, &work.soft_error) {
            (Some((error, retryable)), _) => Some((error, *retryable)),
            (None, Some(error)) => Some((error, false)),
            (None, None) => None,
        };
        let Some((error, retryable)) = failure else {
            return (
                WriteResult::Synced(written(work.plan.hash, deleting)),
                if deleting { Wrote::Deleted } else { Wrote::Synced },
            );
        };
        // Record what did get written, so later plans delete the right roles; keep the old hash
        // so the record is never mistaken for synced.
        let partial = (work.touched || previous.is_some()).then(|| {
            written(
                previous.map_or(PlanHash(0), |w| w.hash),
                previous.is_some_and(|w| w.deleted),
            )
        });
        if retryable {
            (
                WriteResult::Retry {
                    error: error.clone(),
                    written: partial,
                },
                Wrote::Retry { error: error.clone() },
            )
        } else {
            (
                WriteResult::Failed {
                    error: error.clone(),
                    written: partial,
                },
                Wrote::Failed { error: error.clone() },
            )
        }
    }
}

/// A contact's Marketo lead, as resolved for one write batch.
#[derive(Debug, Clone)]
enum LeadId {
    Found(i64),
    /// Several leads match: which one is meant is not ours to guess.
    Duplicate(Vec<i64>),
    /// No lead, and the configuration says not to create one.
    Missing,
    /// Creating it failed.
    Failed(SyncError, bool),
}

const NOT_FOUND: &str = "1013";

impl<S: StateStore> Pipeline<S> {
    /// Records a failed call against every record it carried; returns the error when it stops
    /// the whole batch (quota, budget, credentials, a CRM-enabled instance).
    fn call_failed<'w>(
        error: MarketoError,
        operation: &str,
        affected: impl Iterator<Item = &'w mut Work>,
    ) -> Option<MarketoError> {
        let class = error.class();
        let auth = matches!(error, MarketoError::Auth { .. });
        // A stop that someone must fix (credentials, native CRM sync) keeps the records queued:
        // the run ends with one message, not one failure per record.
        let retryable =
            class.is_retryable() || matches!(class, ErrorClass::QuotaExhausted | ErrorClass::CrmEnabled) || auth;
        let recorded = sync_error(operation, error.code(), error.to_string());
        for work in affected {
            work.fail(recorded.clone(), retryable);
        }
        (auth || matches!(class, ErrorClass::QuotaExhausted | ErrorClass::CrmEnabled)).then_some(error)
    }

    /// After a batch-stopping error, every record not yet failed is failed the same way.
    fn stop_all(works: &mut [Work], error: &MarketoError) {
        let recorded = sync_error("write", error.code(), error.to_string());
        for work in works.iter_mut() {
            work.fail(recorded.clone(), true);
        }
    }

    /// The Marketo calls for a batch, in dependency order. Returns the error that stopped the
    /// batch early, if one did.
    async fn write_steps(&self, works: &mut [Work], fresh: bool) -> Option<MarketoError> {
        let stop = match self.write_companies(works, fresh).await {
            Some(stop) => Some(stop),
            None => match self.write_opportunities_and_roles(works).await {
                Some(stop) => Some(stop),
                None => match self.delete_roles(works).await {
                    Some(stop) => Some(stop),
                    None => self.delete_opportunities(works).await,
                },
            },
        };
        if let Some(stop) = &stop {
            Self::stop_all(works, stop);
        }
        stop
    }

    async fn write_companies(&self, works: &mut [Work], fresh: bool) -> Option<MarketoError> {
        let mut records: Vec<Value> = Vec::new();
        let mut seen = BTreeSet::new();
        for work in works.iter_mut().filter(|w| w.ok()) {
            if let Action::Upsert(desired) = &work.plan.action
                && let Some(company) = &desired.company
                && !fresh
                && self.companies.holds(company.external_company_id, &company.name)
            {
                // Written by this process already, with this name.
                work.company_done = true;
                continue;
            }
            if let Action::Upsert(desired) = &work.plan.action
                && let Some(company) = &desired.company
                && seen.insert(company.external_company_id)
            {
                let mut record = serde_json::Map::new();
                record.insert(
                    "externalCompanyId".into(),
                    Value::String(company.external_company_id.to_string()),
                );
                if let Some(name) = &company.name {
                    record.insert("company".into(), Value::String(name.clone()));
                }
                records.push(Value::Object(record));
            }
        }
        if records.is_empty() {
            return None;
        }
        let outcomes = match self.marketo.sync_companies(&records).await {
            Ok(o) => o,
            Err(e) => {
                let affected = works
                    .iter_mut()
                    .filter(|w| w.ok() && !w.company_done && company_of(w).is_some());
                return Self::call_failed(e, "companies", affected);
            }
        };
        let by_id: HashMap<String, RecordOutcome> = records
            .iter()
            .zip(outcomes)
            .map(|(r, o)| (r["externalCompanyId"].as_str().unwrap_or_default().to_owned(), o))
            .collect();
        for work in works.iter_mut().filter(|w| w.ok() && !w.company_done) {
            let Some(company) = company_of(work) else { continue };
            let Some(outcome) = by_id.get(&company) else { continue };
            work.answers.push(Answer {
                operation: "companies",
                key: company.clone(),
                outcome: outcome.clone(),
            });
            if outcome.is_skipped() {
                let (error, retryable) = skip_error("companies", outcome);
                work.fail(error, retryable);
            } else {
                work.company_done = true;
                work.touched = true;
                if let Action::Upsert(Desired { company: Some(c), .. }) = &work.plan.action {
                    self.companies.remember(c.external_company_id, c.name.clone());
                }
            }
        }
        None
    }

    /// Finds (or creates) the leads the batch's roles need.
    async fn resolve_leads(&self, works: &mut [Work]) -> Result<HashMap<ContactId, LeadId>, MarketoError> {
        let mapping = &self.config.mapping;
        // The key each contact is looked up by: its email, or its contact id in a custom field.
        let (field, key_of): (&str, fn(&oppsync_mapping::Lead) -> Option<String>) = match &mapping.lead_match {
            LeadMatch::Email => ("email", |l| l.email.as_ref().map(|e| e.trim().to_ascii_lowercase())),
            LeadMatch::Field(f) => (f.as_str(), |l| Some(l.contact.to_string())),
        };
        let mut leads: BTreeMap<String, oppsync_mapping::Lead> = BTreeMap::new();
        let mut contact_key: HashMap<ContactId, String> = HashMap::new();
        for work in works.iter().filter(|w| w.ok()) {
            if let Action::Upsert(desired) = &work.plan.action {
                for lead in &desired.leads {
                    if let Some(key) = key_of(lead) {
                        contact_key.insert(lead.contact, key.clone());
                        leads.entry(key).or_insert_with(|| lead.clone());
                    }
                }
            }
        }
        let mut resolved: HashMap<ContactId, LeadId> = HashMap::new();
        if leads.is_empty() {
            return Ok(resolved);
        }
        let keys: Vec<String> = leads.keys().cloned().collect();
        let mut found: HashMap<String, Vec<i64>> = HashMap::new();
        for record in self.marketo.query_leads(field, &keys, &[]).await? {
            let value = match record.fields.get(field) {
                Some(Value::String(s)) => s.trim().to_ascii_lowercase(),
                Some(other) => other.to_string(),
                None => continue,
            };
            found.entry(value).or_default().push(record.id);
        }
        let missing: Vec<&oppsync_mapping::Lead> = keys
            .iter()
            .filter(|k| !found.contains_key(*k))
            .filter_map(|k| leads.get(k))
            .collect();
        let mut created: HashMap<String, LeadId> = HashMap::new();
        if mapping.create_missing_leads && !missing.is_empty() {
            let records: Vec<Value> = missing
                .iter()
                .map(|lead| {
                    let mut r = serde_json::Map::new();
                    if let LeadMatch::Field(f) = &mapping.lead_match {
                        r.insert(f.clone(), Value::String(lead.contact.to_string()));
                    }
                    if let Some(email) = &lead.email {
                        r.insert("email".into(), Value::String(email.clone()));
                    }
                    if let Some(first) = &lead.first_name {
                        r.insert("firstName".into(), Value::String(first.clone()));
                    }
                    if let Some(last) = &lead.last_name {
                        r.insert("lastName".into(), Value::String(last.clone()));
                    }
                    Value::Object(r)
                })
                .collect();
            let outcomes = self.marketo.upsert_leads(field, &records).await?;
            for (lead, outcome) in missing.iter().zip(outcomes) {
                let Some(key) = key_of(lead) else { continue };
                let id = if outcome.is_skipped() {
                    let (error, retryable) = skip_error("leads", &outcome);
                    LeadId::Failed(error, retryable)
                } else {
                    match outcome.marketo_id.as_deref().and_then(|t| t.parse::<i64>().ok()) {
                        Some(id) => LeadId::Found(id),
                        None => LeadId::Failed(
                            sync_error("leads", "no-id", "Marketo created a lead without returning its id"),
                            true,
                        ),
                    }
                };
                created.insert(key, id);
            }
        }
        for (contact, key) in contact_key {
            let id = match found.get(&key) {
                Some(ids) if ids.len() == 1 => LeadId::Found(ids[0]),
                Some(ids) => LeadId::Duplicate(ids.clone()),
                None => created.get(&key).cloned().unwrap_or(LeadId::Missing),
            };
            resolved.insert(contact, id);
        }
        Ok(resolved)
    }

    async fn write_opportunities_and_roles(&self, works: &mut [Work]) -> Option<MarketoError> {
        // Leads first: a role needs its lead's id.
        let leads = match self.resolve_leads(works).await {
            Ok(l) => l,
            Err(e) => {
                let affected = works
                    .iter_mut()
                    .filter(|w| w.ok() && matches!(&w.plan.action, Action::Upsert(d) if !d.roles.is_empty()));
                if let Some(stop) = Self::call_failed(e, "leads", affected) {
                    return Some(stop);
                }
                HashMap::new()
            }
        };

        let records: Vec<Value> = works
            .iter()
            .filter(|w| w.ok())
            .filter_map(|w| match &w.plan.action {
                Action::Upsert(d) => Some(Value::Object(d.opportunity.clone().into_iter().collect())),
                _ => None,
            })
            .collect();
        if !records.is_empty() {
            match self.marketo.sync_opportunities(&records).await {
                Ok(outcomes) => {
                    let mut outcomes = outcomes.into_iter();
                    for work in works
                        .iter_mut()
                        .filter(|w| w.ok() && matches!(w.plan.action, Action::Upsert(_)))
                    {
                        let Some(outcome) = outcomes.next() else { break };
                        work.answers.push(Answer {
                            operation: "opportunities",
                            key: work.plan.opportunity_id.to_string(),
                            outcome: outcome.clone(),
                        });
                        if outcome.is_skipped() {
                            let (error, retryable) = skip_error("opportunities", &outcome);
                            work.fail(error, retryable);
                        } else {
                            work.touched = true;
                            if outcome.marketo_id.is_some() {
                                work.guid = outcome.marketo_id.clone();
                            }
                        }
                    }
                }
                Err(e) => {
                    let affected = works
                        .iter_mut()
                        .filter(|w| w.ok() && matches!(w.plan.action, Action::Upsert(_)));
                    if let Some(stop) = Self::call_failed(e, "opportunities", affected) {
                        return Some(stop);
                    }
                }
            }
        }

        // Roles of the opportunities just written.
        let mut roles: Vec<RoleRecord> = Vec::new();
        let mut owners: Vec<(usize, ContactId, String)> = Vec::new();
        for (index, work) in works.iter_mut().enumerate() {
            if !work.ok() {
                continue;
            }
            let Action::Upsert(desired) = &work.plan.action else {
                continue;
            };
            let mut soft: Option<SyncError> = None;
            let mut hard: Option<(SyncError, bool)> = None;
            for role in &desired.roles {
                match leads.get(&role.contact) {
                    Some(LeadId::Found(lead_id)) => {
                        roles.push(RoleRecord {
                            key: RoleKey {
                                external_opportunity_id: work.plan.opportunity_id.to_string(),
                                lead_id: *lead_id,
                                role: role.role.clone(),
                            },
                            is_primary: role.is_primary,
                        });
                        owners.push((index, role.contact, role.role.clone()));
                    }
                    Some(LeadId::Duplicate(ids)) => {
                        soft.get_or_insert_with(|| {
                            sync_error(
                                "leads",
                                "duplicate-lead",
                                format!(
                                    "contact {} matches {} Marketo leads (ids {}); merge them in Marketo, then resync this opportunity",
                                    role.contact,
                                    ids.len(),
                                    ids.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                                ),
                            )
                        });
                    }
                    Some(LeadId::Failed(error, retryable)) => {
                        hard.get_or_insert_with(|| (error.clone(), *retryable));
                    }
                    Some(LeadId::Missing) | None => {
                        tracing::info!(
                            opportunity = %work.plan.opportunity_id, contact = %role.contact,
                            "no Marketo lead for this contact and leads are not created; role left out"
                        );
                    }
                }
            }
            if let Some(error) = soft {
                work.soft_error.get_or_insert(error);
            }
            if let Some((error, retryable)) = hard {
                work.fail(error, retryable);
                owners.retain(|(i, _, _)| *i != index);
                let key = work.plan.opportunity_id.to_string();
                roles.retain(|r| r.key.external_opportunity_id != key);
            }
        }
        if roles.is_empty() {
            return None;
        }
        match self.marketo.sync_roles(&roles).await {
            Ok(outcomes) => {
                for ((index, contact, role), (record, outcome)) in owners.into_iter().zip(roles.iter().zip(outcomes)) {
                    let work = &mut works[index];
                    work.answers.push(Answer {
                        operation: "roles",
                        key: format!(
                            "{}/{}/{}",
                            record.key.external_opportunity_id, record.key.lead_id, record.key.role
                        ),
                        outcome: outcome.clone(),
                    });
                    if outcome.is_skipped() {
                        let (error, retryable) = skip_error("roles", &outcome);
                        work.fail(error, retryable);
                    } else {
                        work.touched = true;
                        work.roles.insert((contact, role), Some(record.key.lead_id));
                    }
                }
                None
            }
            Err(e) => {
                let involved: BTreeSet<usize> = owners.iter().map(|(i, _, _)| *i).collect();
                let affected = works
                    .iter_mut()
                    .enumerate()
                    .filter(|(i, _)| involved.contains(i))
                    .map(|(_, w)| w);
                Self::call_failed(e, "roles", affected)
            }
        }
    }

    async fn delete_roles(&self, works: &mut [Work]) -> Option<MarketoError> {
        let mut keys = Vec::new();
        let mut owners = Vec::new();
        for (index, work) in works.iter_mut().enumerate() {
            if !work.ok() {
                continue;
            }
            for gone in &work.plan.role_deletions {
                // The lead id recorded when the role was written; fall back to the one in state.
                let lead = gone
                    .lead_id
                    .or_else(|| work.roles.get(&(gone.contact, gone.role.clone())).copied().flatten());
                match lead {
                    Some(lead_id) => {
                        keys.push(RoleKey {
                            external_opportunity_id: work.plan.opportunity_id.to_string(),
                            lead_id,
                            role: gone.role.clone(),
                        });
                        owners.push((index, gone.contact, gone.role.clone()));
                    }
                    None => {
                        tracing::warn!(
                            opportunity = %work.plan.opportunity_id, contact = %gone.contact,
                            "a removed role whose Marketo lead is unknown cannot be deleted; forgotten"
                        );
                        work.roles.remove(&(gone.contact, gone.role.clone()));
                    }
                }
            }
        }
        if keys.is_empty() {
            return None;
        }
        match self.marketo.delete_roles(&keys).await {
            Ok(outcomes) => {
                for ((index, contact, role), (key, outcome)) in owners.into_iter().zip(keys.iter().zip(outcomes)) {
                    let work = &mut works[index];
                    work.answers.push(Answer {
                        operation: "role_deletions",
                        key: format!("{}/{}/{}", key.external_opportunity_id, key.lead_id, key.role),
                        outcome: outcome.clone(),
                    });
                    // Already gone is as good as deleted.
                    if outcome.is_skipped() && outcome.code() != Some(NOT_FOUND) {
                        let (error, retryable) = skip_error("role_deletions", &outcome);
                        work.fail(error, retryable);
                    } else {
                        work.touched = true;
                        work.roles.remove(&(contact, role));
                    }
                }
                None
            }
            Err(e) => {
                let involved: BTreeSet<usize> = owners.iter().map(|(i, _, _)| *i).collect();
                let affected = works
                    .iter_mut()
                    .enumerate()
                    .filter(|(i, _)| involved.contains(i))
                    .map(|(_, w)| w);
                Self::call_failed(e, "role_deletions", affected)
            }
        }
    }

    async fn delete_opportunities(&self, works: &mut [Work]) -> Option<MarketoError> {
        let ids: Vec<String> = works
            .iter()
            .filter(|w| w.ok() && matches!(w.plan.action, Action::Delete))
            .map(|w| w.plan.opportunity_id.to_string())
            .collect();
        if ids.is_empty() {
            return None;
        }
        match self.marketo.delete_opportunities(&ids).await {
            Ok(outcomes) => {
                let mut outcomes = outcomes.into_iter();
                for work in works
                    .iter_mut()
                    .filter(|w| w.ok() && matches!(w.plan.action, Action::Delete))
                {
                    let Some(outcome) = outcomes.next() else { break };
                    work.answers.push(Answer {
                        operation: "opportunity_deletions",
                        key: work.plan.opportunity_id.to_string(),
                        outcome: outcome.clone(),
                    });
                    if outcome.is_skipped() && outcome.code() != Some(NOT_FOUND) {
                        let (error, retryable) = skip_error("opportunity_deletions", &outcome);
                        work.fail(error, retryable);
                    } else {
                        work.touched = true;
                        work.guid = None;
                    }
                }
                None
            }
            Err(e) => {
                let affected = works
                    .iter_mut()
                    .filter(|w| w.ok() && matches!(w.plan.action, Action::Delete));
                Self::call_failed(e, "opportunity_deletions", affected)
            }
        }
    }
}

fn company_of(work: &Work) -> Option<String> {
    match &work.plan.action {
        Action::Upsert(d) => d.company.as_ref().map(|c| c.external_company_id.to_string()),
        _ => None,
    }
}

/// Which stage a drain just finished a batch of (for progress bars).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Transform,
    Write,
}

/// How many times one drain hands the same record to Marketo before leaving it ready for the
/// next run (each attempt already retries transient errors with backoff inside the client).
const DRAIN_WRITE_ATTEMPTS: u32 = 3;

/// A drain writes this many batches' ready records in one write: the client cuts each object
/// type into calls of 300, so a larger group leaves fewer part-filled calls when a batch's
/// companies, leads and roles are not multiples of 300 (the demo's mixed data: 1.31× the minimum calls
/// with one batch a write, 1.07× with five).
const DRAIN_WRITE_GROUP: usize = 5;

impl<S: StateStore> Pipeline<S> {
    /// Transforms every pending record and writes every ready one, batch by batch, until none
    /// is left that this run can make progress on. `progress` hears of each finished batch.
    pub async fn drain(&self, mut progress: impl FnMut(Stage, usize)) -> Result<DrainReport, PipelineError> {
        let batch = self.config.sync.batch_size;
        let mut report = DrainReport::default();
        let mut write_attempts: HashMap<OpportunityId, u32> = HashMap::new();
        // The last retryable error of each record not (yet) written.
        let mut left: HashMap<OpportunityId, SyncError> = HashMap::new();
        let finish = |mut report: DrainReport, left: HashMap<OpportunityId, SyncError>| {
            let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
            for error in left.values() {
                let message: String = error.message.chars().take(160).collect();
                *reasons
                    .entry(format!("{} {}: {message}", error.operation, error.code))
                    .or_default() += 1;
            }
            report.left_for_retry = left.len() as u64;
            report.retry_reasons = reasons.into_iter().collect();
            report.retry_reasons.sort_by_key(|r| std::cmp::Reverse(r.1));
            report
        };
        loop {
            let mut moved = false;
            // Transform: always from the oldest pending; past pages only when the first holds
            // nothing this run can claim.
            let mut page: Option<String> = None;
            loop {
                let listed = self.store.list(Status::Pending, batch, page.as_deref()).await?;
                if listed.items.is_empty() {
                    break;
                }
                let ids: Vec<OpportunityId> = listed.items.iter().map(|s| s.id).collect();
                let done = self.transform(&ids, false).await?;
                let claimed = done
                    .records
                    .iter()
                    .filter(|r| !matches!(r.result, Transformed::NotClaimed))
                    .count();
                for r in &done.records {
                    match r.result {
                        Transformed::Ready { .. } => report.transformed += 1,
                        Transformed::Unchanged | Transformed::Filtered | Transformed::Kept => report.unchanged += 1,
                        Transformed::Failed { .. } => report.failed += 1,
                        _ => {}
                    }
                }
                report.metrics.merge(done.metrics);
                progress(Stage::Transform, claimed);
                if claimed > 0 {
                    moved = true;
                    page = None;
                } else {
                    match listed.next {
                        Some(next) => page = Some(next),
                        None => break,
                    }
                }
            }
            // Write: the same, skipping records this drain has already tried enough.
            let mut page: Option<String> = None;
            loop {
                let listed = self
                    .store
                    .list(Status::Ready, batch * DRAIN_WRITE_GROUP, page.as_deref())
                    .await?;
                if listed.items.is_empty() {
                    break;
                }
                let ids: Vec<OpportunityId> = listed
                    .items
                    .iter()
                    .map(|s| s.id)
                    .filter(|id| write_attempts.get(id).copied().unwrap_or(0) < DRAIN_WRITE_ATTEMPTS)
                    .collect();
                let done = if ids.is_empty() {
                    WriteReport::default()
                } else {
                    self.write(&ids).await?
                };
                let mut claimed = 0;
                for r in &done.records {
                    match &r.result {
                        Wrote::Synced | Wrote::Deleted => {
                            report.written += 1;
                            left.remove(&r.id);
                        }
                        Wrote::Failed { .. } => {
                            report.failed += 1;
                            left.remove(&r.id);
                        }
                        Wrote::Retry { error } => {
                            report.retried += 1;
                            *write_attempts.entry(r.id).or_default() += 1;
                            left.insert(r.id, error.clone());
                        }
                        _ => {}
                    }
                    if !matches!(r.result, Wrote::NotClaimed) {
                        claimed += 1;
                    }
                }
                report.metrics.merge(done.metrics);
                progress(Stage::Write, claimed);
                if let Some(stop) = done.stopped {
                    report.stopped = Some(stop);
                    report.stopped_for_good = done.stopped_for_good;
                    return Ok(finish(report, left));
                }
                if claimed > 0 {
                    moved = true;
                    page = None;
                } else {
                    match listed.next {
                        Some(next) => page = Some(next),
                        None => break,
                    }
                }
            }
            if !moved {
                return Ok(finish(report, left));
            }
        }
    }

    /// Transforms and writes the named records (or every opportunity in Dynamics) now, whatever
    /// their cursor or hash. A dry run plans them and changes nothing.
    #[tracing::instrument(skip_all, name = "resync", fields(dry_run))]
    pub async fn resync(&self, target: ResyncTarget, dry_run: bool) -> Result<ResyncReport, PipelineError> {
        let all = target == ResyncTarget::All;
        let ids: Vec<OpportunityId> = match target {
            ResyncTarget::Ids(ids) => ids,
            ResyncTarget::All => self
                .dataverse
                .all_ids(EntitySet::Opportunities)
                .await?
                .iter()
                .filter_map(|t| OpportunityId::parse(t).ok())
                .collect(),
        };
        let mut report = ResyncReport {
            dry_run,
            ..ResyncReport::default()
        };
        for chunk in ids.chunks(self.config.sync.batch_size) {
            if dry_run {
                for preview in self.preview(chunk).await? {
                    let (plan, transform) = match preview.plan {
                        Ok(plan) => (Some(plan), None),
                        Err(error) => (None, Some(Transformed::Failed { error })),
                    };
                    report.records.push(ResyncRecord {
                        id: preview.id,
                        plan,
                        previously_written: preview.written,
                        transform,
                        write: None,
                        answers: Vec::new(),
                    });
                }
                continue;
            }
            let mut before: HashMap<OpportunityId, Option<WrittenSummary>> = HashMap::new();
            for id in chunk {
                let state = self.store.get(*id).await?;
                before.insert(*id, state.and_then(|s| s.written.as_ref().map(WrittenSummary::from)));
                if !self.store.requeue(*id, self.now()).await? {
                    self.store
                        .mark_pending(&[PendingChange::upserted(*id, 0, None)], self.now())
                        .await?;
                }
            }
            let transformed = self.transform(chunk, true).await?;
            let ready = transformed.ready();
            let written = if ready.is_empty() {
                WriteReport::default()
            } else {
                self.write_batch(&ready, true).await?
            };
            let mut writes: HashMap<OpportunityId, WriteRecord> =
                written.records.into_iter().map(|r| (r.id, r)).collect();
            for t in transformed.records {
                let write = writes.remove(&t.id);
                let clean = matches!(
                    write.as_ref().map(|w| &w.result),
                    Some(Wrote::Synced) | Some(Wrote::Deleted)
                );
                // `all` reports only what needs attention; a named resync reports everything.
                if all && clean {
                    continue;
                }
                let (plan, transform) = match t.result {
                    Transformed::Ready { plan } => (Some(*plan), None),
                    other => (None, Some(other)),
                };
                report.records.push(ResyncRecord {
                    id: t.id,
                    plan,
                    previously_written: before.remove(&t.id).flatten(),
                    transform,
                    write: write.as_ref().map(|w| w.result.clone()),
                    answers: write.map(|w| w.answers).unwrap_or_default(),
                });
            }
            if let Some(stop) = written.stopped {
                report.stopped = Some(stop);
                break;
            }
        }
        Ok(report)
    }
}
