//! The sync state: a cursor per source, the poller lease, one item per opportunity, and the
//! queries operators need. One trait, [`StateStore`], with a DynamoDB implementation for Lambda,
//! an embedded SQLite one for local runs, and the reference store in memory ([`MemoryStore`]:
//! the model the other two are checked against, and the simulation's store); all three pass the
//! same conformance suite.
//!
//! Guarantees every implementation keeps (architecture.md, "State model"):
//! - idempotent: any step can run twice;
//! - no regression: an older source version never overwrites a newer one;
//! - nothing lost: a cursor moves only under the lease, after its changes are recorded;
//! - fenced: a poller whose lease expired cannot move a cursor.
//!
//! Time is passed in (`now`, Unix milliseconds) so that tests control the clock.

use std::collections::BTreeMap;
use std::fmt;

use oppsync_mapping::{AccountId, OpportunityId, Plan, PlanHash, WrittenRole};
use serde::{Deserialize, Serialize};

mod contract;
pub mod dynamodb;
pub mod memory;
pub mod sqlite;

pub use contract::StateStore;
pub use dynamodb::DynamoStore;
pub use memory::MemoryStore;
pub use sqlite::{FileProblem, SCHEMA_VERSION, SqliteStore};

/// Unix time in milliseconds.
pub type Millis = i64;

/// Where an opportunity is in the sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Changed in Dynamics; to be transformed.
    Pending,
    /// Planned; to be written to Marketo.
    Ready,
    /// Marketo reflects the latest version.
    Synced,
    /// Failed permanently; the error ledger has the reason.
    Failed,
    /// Deleted in Dynamics and handled in Marketo.
    Deleted,
    /// Excluded by the sync filter.
    Filtered,
}

impl Status {
    pub const ALL: [Status; 6] = [
        Status::Pending,
        Status::Ready,
        Status::Synced,
        Status::Failed,
        Status::Deleted,
        Status::Filtered,
    ];

    /// The name stored in both stores and matched by the Lambda stream filters.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Ready => "ready",
            Status::Synced => "synced",
            Status::Failed => "failed",
            Status::Deleted => "deleted",
            Status::Filtered => "filtered",
        }
    }

    pub fn parse(text: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Statuses that still need work or attention; stores index these for cheap queries.
    pub fn is_open(self) -> bool {
        matches!(self, Status::Pending | Status::Ready | Status::Failed)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A change source with its own cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    Opportunities,
    Connections,
    /// Not a read position but an obligation: a deletion scan is owed (a full re-read after an
    /// expired token, a watermark's periodic scan) until one completes, across any number of runs.
    DeletionScan,
    /// An obligation too: every opportunity's stakeholders are to be planned again, because a
    /// connection's change-tracking token expired and the connections deleted meanwhile are
    /// gone from change tracking (their opportunities would keep the stakeholder's role).
    StakeholderScan,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Opportunities => "opportunities",
            Source::Connections => "connections",
            Source::DeletionScan => "deletion_scan",
            Source::StakeholderScan => "stakeholder_scan",
        }
    }
}

/// How far a source has been read: a delta link or a watermark, opaque to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub value: String,
    pub updated_at: Millis,
}

/// The poller's lease. `token` grows with every acquisition, fencing out an older holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub name: String,
    pub owner: String,
    pub token: i64,
    pub expires_at: Millis,
}

/// A change read from Dataverse, to be recorded as pending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingChange {
    pub id: OpportunityId,
    /// `versionnumber` (a deletion carries none: it is recorded as a flag).
    pub version: i64,
    pub deleted: bool,
    /// `modifiedon`, for the sync-lag metric.
    pub modified_on: Option<String>,
}

impl PendingChange {
    pub fn upserted(id: OpportunityId, version: i64, modified_on: Option<String>) -> Self {
        PendingChange {
            id,
            version,
            deleted: false,
            modified_on,
        }
    }

    /// A deletion: a flag, not a version. It applies to a record not already deleted and keeps
    /// the record's version, so a version Dynamics had before stays stale while the record
    /// Dataverse returns again (restored from its recycle bin, with its id and a new version)
    /// is recorded and synced again.
    pub fn deleted(id: OpportunityId) -> Self {
        PendingChange {
            id,
            version: 0,
            deleted: true,
            modified_on: None,
        }
    }
}

/// What recording a change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkOutcome {
    /// Recorded: the item is pending at this version.
    Recorded,
    /// The store already has this version or a newer one; nothing changed.
    Stale,
}

/// Exclusive, expiring right to work on one item at one version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub id: OpportunityId,
    pub version: i64,
    pub token: i64,
    pub until: Millis,
}

/// What Marketo holds for an opportunity, as last written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Written {
    /// The source version the write reflected.
    pub version: i64,
    pub hash: PlanHash,
    /// Marketo's `marketoGUID` for the opportunity.
    pub marketo_guid: Option<String>,
    pub company: Option<AccountId>,
    pub roles: Vec<WrittenRole>,
    /// The opportunity was deleted from Marketo.
    pub deleted: bool,
    pub at: Millis,
    /// What that write left in Marketo, part by part (none after a partial write or a deletion:
    /// the next write sends everything).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent: Option<Sent>,
}

/// Hashes of the parts a complete write left in Marketo: the next write of the record sends
/// only the parts whose hash changed (an opportunity is not sent again because a role changed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sent {
    /// The opportunity's fields.
    pub opportunity: u64,
    /// The company record, when there is one.
    pub company: Option<u64>,
    /// The sales person record, when there is one (absent in what older versions stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sales_person: Option<u64>,
    /// Each role (its contact, role name, primary flag and the contact's lead key), sorted.
    pub roles: Vec<u64>,
}

/// Why an opportunity failed: the operation, the Marketo or Dataverse code, the message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncError {
    pub operation: String,
    pub code: String,
    pub message: String,
}

/// One opportunity's sync state.
#[derive(Debug, Clone, PartialEq)]
pub struct OpportunityState {
    pub id: OpportunityId,
    pub status: Status,
    pub version: i64,
    pub deleted: bool,
    pub modified_on: Option<String>,
    /// The last plan made for it.
    pub plan: Option<Plan>,
    pub written: Option<Written>,
    pub attempts: u32,
    pub last_error: Option<SyncError>,
    pub claim_until: Option<Millis>,
    /// A retried write waits until then: the sweep wakes it (the writer's stream filter skips
    /// an item that carries it, so a failing write does not re-trigger itself at once).
    pub retry_at: Option<Millis>,
    /// Marketo may differ from what was last recorded as written (a superseded write landed
    /// after a newer one, a resync): the next transform writes even a plan whose hash matches.
    pub rewrite: bool,
    /// Roles sent to Marketo (or about to be) that no completed write has recorded yet: Marketo
    /// may hold them (a timeout, a crash, a lost claim), so later plans delete against
    /// `written.roles` ∪ these. Cleared by the next completed write, whose `written` covers them.
    pub planned: Vec<WrittenRole>,
    /// Why part of the stored state (the plan, what was written, the planned roles) could not
    /// be read back, if it could not: that part reads as absent. The transformer quarantines
    /// such a record as failed with this reason, unless a resync asked for it to be written
    /// afresh, so that one bad item never stops the run.
    pub unreadable: Option<String>,
    pub created_at: Millis,
    pub updated_at: Millis,
    /// When it entered its current status (oldest pending, error ledger's "last try").
    pub status_since: Millis,
}

/// How a transform ended.
#[derive(Debug, Clone, PartialEq)]
pub enum TransformResult {
    /// A plan to write: status ready.
    Ready(Plan),
    /// The plan's hash equals what was last written: status synced, no Marketo call.
    Unchanged,
    /// Excluded by the sync filter: status filtered, no Marketo call.
    Filtered(Plan),
    /// Deleted in Dynamics, and the delete policy keeps Marketo's copy: status deleted.
    Kept(Plan),
    /// The records could not be planned: status failed.
    Failed(SyncError),
}

/// How a write to Marketo ended.
#[derive(Debug, Clone, PartialEq)]
pub enum WriteResult {
    /// Marketo reflects the plan: status synced (or deleted, for a deletion).
    Synced(Written),
    /// A retryable failure: status stays ready, attempts grows, the claim is released, and the
    /// record waits until `retry_at` (backoff).
    Retry {
        error: SyncError,
        written: Option<Written>,
        retry_at: Millis,
    },
    /// The run stopped before finishing the record (credentials, quota, budget, the deadline):
    /// as `Retry`, but no attempt is counted, since the record itself did nothing wrong.
    Paused {
        error: SyncError,
        written: Option<Written>,
        until: Millis,
    },
    /// A permanent failure: status failed, with the reason in the error ledger.
    Failed { error: SyncError, written: Option<Written> },
}

/// Whether a completion took effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    Completed,
    /// The claim was lost (expired and taken, or a newer version arrived). What was written to
    /// Marketo is still recorded, so the newer work plans against it.
    Superseded,
}

/// One run of the sync (a `sync` cycle, a `resync`, a Lambda invocation), as the run history
/// keeps it: counts and the stop reason, never a record's data.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// What ran: `sync`, `resync`, or the Lambda function (`poller`, `transformer`, `writer`,
    /// `resync-function`).
    pub command: String,
    pub started: Millis,
    pub ended: Millis,
    /// Changes read from Dynamics.
    pub read: u64,
    pub written: u64,
    /// Planned and found to be what Marketo holds already, or filtered out.
    pub unchanged: u64,
    pub failed: u64,
    /// Left queued for a later run (a retryable failure, the deadline, a stop).
    pub left_for_retry: u64,
    pub marketo_calls: u64,
    /// Why the run stopped early, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
}

/// Items by status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts(pub BTreeMap<Status, u64>);

impl Counts {
    pub fn get(&self, status: Status) -> u64 {
        self.0.get(&status).copied().unwrap_or(0)
    }
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

/// One page of a listing; `next` continues it.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<String>,
}

/// What went wrong in the store.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StateError {
    #[error(
        "the lease `{0}` is no longer held by this poller (it expired or another poller took it); nothing was moved"
    )]
    LeaseLost(String),
    #[error("DynamoDB {operation} failed: {message}")]
    Dynamo {
        operation: &'static str,
        message: String,
        retryable: bool,
    },
    #[error("the SQLite state store {path}: {message}")]
    Sqlite { path: String, message: String },
    #[error("the state file {path}: {problem}. Fix: {}", problem.fix())]
    File { path: String, problem: sqlite::FileProblem },
    #[error(
        "stored state for {key} cannot be read: {reason}; it was written by an incompatible version or edited by hand"
    )]
    Corrupt { key: String, reason: String },
    #[error("{what} is {size} bytes, more than the store can hold ({limit} bytes)")]
    TooLarge { what: String, size: usize, limit: usize },
    #[error("invalid page token `{0}`; start the listing again without one")]
    BadPageToken(String),
}

impl StateError {
    /// Whether trying again later may succeed (throttling, a network blip).
    pub fn is_retryable(&self) -> bool {
        match self {
            StateError::Dynamo { retryable, .. } => *retryable,
            StateError::Sqlite { message, .. } => message.contains("locked") || message.contains("busy"),
            _ => false,
        }
    }
}

/// Reads one stored part leniently: a part that cannot be decoded reads as absent, and why
/// joins `unreadable`.
pub(crate) fn lenient<T>(what: &str, decoded: Result<Option<T>, String>, unreadable: &mut Option<String>) -> Option<T> {
    match decoded {
        Ok(value) => value,
        Err(why) => {
            let reason = format!("the stored {what} cannot be read ({why})");
            *unreadable = Some(match unreadable.take() {
                Some(earlier) => format!("{earlier}; {reason}"),
                None => reason,
            });
            None
        }
    }
}

/// Where stored JSON broke, never what it holds (a plan holds emails).
pub(crate) fn json_fault(e: &serde_json::Error) -> String {
    format!("{:?} error at line {}, column {}", e.classify(), e.line(), e.column())
}

/// The minute bucket completions are counted in.
pub fn minute_of(now: Millis) -> i64 {
    now.div_euclid(60_000)
}

/// Store calls a batch sends at once: on DynamoDB each claim and completion is a round trip of
/// several milliseconds, and one after another they would put a batch's length on its critical
/// path.
pub const STORE_CONCURRENCY: usize = 16;

/// Runs independent store calls [`STORE_CONCURRENCY`] at once; the answers come in order.
pub async fn overlapped<F: std::future::Future>(calls: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    use futures_util::StreamExt;
    futures_util::stream::iter(calls)
        .buffered(STORE_CONCURRENCY)
        .collect()
        .await
}

/// A claim token that no other claim in this or another process will draw.
pub(crate) fn new_token() -> i64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // RandomState is seeded randomly per process; the counter separates claims within one.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    (h.finish() >> 1) as i64
}

impl TransformResult {
    /// The status it leads to, the plan to store, and the error to record.
    pub(crate) fn parts(&self) -> (Status, Option<&Plan>, Option<&SyncError>) {
        match self {
            TransformResult::Ready(plan) => (Status::Ready, Some(plan), None),
            TransformResult::Unchanged => (Status::Synced, None, None),
            TransformResult::Filtered(plan) => (Status::Filtered, Some(plan), None),
            TransformResult::Kept(plan) => (Status::Deleted, Some(plan), None),
            TransformResult::Failed(e) => (Status::Failed, None, Some(e)),
        }
    }
}

impl WriteResult {
    /// The status it leads to, what Marketo now holds, and the error to record.
    pub(crate) fn parts(&self) -> (Status, Option<&Written>, Option<&SyncError>) {
        match self {
            WriteResult::Synced(w) => (if w.deleted { Status::Deleted } else { Status::Synced }, Some(w), None),
            WriteResult::Retry { error, written, .. } | WriteResult::Paused { error, written, .. } => {
                (Status::Ready, written.as_ref(), Some(error))
            }
            WriteResult::Failed { error, written } => (Status::Failed, written.as_ref(), Some(error)),
        }
    }

    /// When a record left ready may be tried again.
    pub(crate) fn retry_at(&self) -> Option<Millis> {
        match self {
            WriteResult::Retry { retry_at, .. } => Some(*retry_at),
            WriteResult::Paused { until, .. } => Some(*until),
            _ => None,
        }
    }

    /// What it adds to `attempts`; `None` resets them (a success).
    pub(crate) fn attempts_delta(&self) -> Option<i64> {
        match self {
            WriteResult::Synced(_) => None,
            WriteResult::Paused { .. } => Some(0),
            WriteResult::Retry { .. } | WriteResult::Failed { .. } => Some(1),
        }
    }
}
