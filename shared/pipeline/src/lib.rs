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
    Action, Change, ContactId, Desired, Guid, LeadMatch, Opportunity, OpportunityId, Plan, PlanHash, Related,
    SalesPerson, WrittenRole, plan_change, plan_delete_excluded,
};
use oppsync_marketo::{Disposition, MarketoClient, MarketoError, Operation, RecordOutcome, RoleKey, RoleRecord};
use oppsync_state::{
    Claim, Completion, Lease, MarkOutcome, Millis, OpportunityState, PendingChange, Source, StateError, StateStore,
    Status, SyncError, TransformResult, WriteResult, Written,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

mod budget;
pub mod config;
pub mod crash;
mod drain;
mod error;
pub mod memory;
pub mod metrics;
mod poll;
pub mod ports;
mod resync;
mod runs;
pub mod time;
mod transform;
mod write;

pub use config::{Config, ConfigError, SyncOptions};
pub use drain::{DrainReport, Stage};
pub use error::PipelineError;
use error::{skip_error, sync_error};
pub use metrics::Metrics;
pub use poll::PollReport;
pub use ports::{DataversePort, MarketoPort, NoAccess};
pub use resync::{ResyncRecord, ResyncReport, ResyncRequest, ResyncTarget, Since, WrittenSummary};
pub use runs::RunTimes;
pub use transform::{Planned, TransformRecord, TransformReport, Transformed};
pub use write::{Answer, WriteRecord, WriteReport, Wrote};

pub(crate) use oppsync_state::overlapped;

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

/// The steps over their ports, built once per process: the state store `S`, Dataverse `D` and
/// Marketo `M` (the HTTP clients unless a test supplies in-memory ones).
pub struct Pipeline<S, D = DataverseClient, M = MarketoClient> {
    store: S,
    dataverse: D,
    marketo: M,
    config: Arc<Config>,
    clock: Clock,
    /// Names this process in the lease.
    owner: String,
    /// Companies this process has upserted.
    companies: WrittenCache,
    /// Sales persons this process has upserted.
    sales_persons: WrittenCache,
    /// This process among the Marketo budget's members.
    member: String,
    /// Whether the Marketo adapter counts its calls in the store (set at the first write).
    counted: Arc<std::sync::OnceLock<bool>>,
    /// Marketo's preflight verdict in this process: made while Dataverse is read or, failing
    /// that, before the first write; the lock makes one check of callers that come together.
    preflight: Arc<tokio::sync::Mutex<write::Verdict>>,
    /// Held by a write for its companies and leads: two writes in one process overlap (one's
    /// opportunities and roles beside the next one's companies and leads), but never send the
    /// same company or lead at once, and the second finds what the first created.
    front: Arc<tokio::sync::Mutex<()>>,
    /// The Marketo adapter's calls already counted in a report, so writes that overlap each
    /// count their calls once (none before the first write).
    accounted: Arc<Mutex<Option<BTreeMap<&'static str, u64>>>>,
}

impl<S, D, M> Pipeline<S, D, M> {
    /// A pipeline on the wall clock.
    pub fn new(store: S, dataverse: D, marketo: M, config: Config, owner: impl Into<String>) -> Pipeline<S, D, M> {
        let owner = owner.into();
        Pipeline {
            store,
            dataverse,
            marketo,
            config: Arc::new(config),
            clock: system_clock(),
            member: budget::member_name(&owner),
            owner,
            companies: WrittenCache::default(),
            sales_persons: WrittenCache::default(),
            counted: Arc::default(),
            preflight: Arc::default(),
            front: Arc::default(),
            accounted: Arc::default(),
        }
    }

    /// The same pipeline on another clock (tests, the crash harness).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The same pipeline writing through another Marketo adapter.
    pub fn with_marketo<M2>(self, marketo: M2) -> Pipeline<S, D, M2> {
        Pipeline {
            store: self.store,
            dataverse: self.dataverse,
            marketo,
            config: self.config,
            clock: self.clock,
            owner: self.owner,
            companies: self.companies,
            sales_persons: self.sales_persons,
            member: self.member,
            // The new adapter has not been given the ledger yet, nor been checked.
            counted: Arc::default(),
            preflight: Arc::default(),
            front: self.front,
            accounted: Arc::default(),
        }
    }

    /// The state store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The Dataverse adapter.
    pub fn dataverse(&self) -> &D {
        &self.dataverse
    }

    /// The Marketo adapter.
    pub fn marketo(&self) -> &M {
        &self.marketo
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Now, on this pipeline's clock.
    pub fn now(&self) -> Millis {
        (self.clock)()
    }
}

/// Records this process has upserted (companies, sales persons), by id, with a hash of what was
/// written. A company is the account of many opportunities, a sales person the owner of many:
/// without this each would be upserted again in every batch that mentions it. A record whose
/// content changed (a renamed account, a user's new email) is written again. Resync bypasses it.
#[derive(Clone, Default)]
pub struct WrittenCache(Arc<Mutex<HashMap<Guid, u64>>>);

/// Past this many records the cache starts over: a bound on memory (an id and a hash each,
/// about 32 MB when full), not a correctness limit. At 200,000 names a million opportunities'
/// 500,000 companies were each written twice (1.33x the minimum calls).
const WRITTEN_CACHE_MAX: usize = 1_000_000;

impl WrittenCache {
    fn holds<T: std::hash::Hash>(&self, id: Guid, content: &T) -> bool {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&id) == Some(&Self::content_hash(content))
    }

    fn remember<T: std::hash::Hash>(&self, id: Guid, content: &T) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= WRITTEN_CACHE_MAX {
            map.clear();
        }
        map.insert(id, Self::content_hash(content));
    }

    /// Forgets a record (Marketo no longer has it: the next write sends it again).
    fn forget(&self, id: Guid) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    }

    /// The content as the cache keeps it: a change changes it (a 64-bit collision aside).
    fn content_hash<T: std::hash::Hash>(content: &T) -> u64 {
        use std::hash::Hasher;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        content.hash(&mut hasher);
        hasher.finish()
    }
}

impl<S: Clone, D: Clone, M: Clone> Clone for Pipeline<S, D, M> {
    fn clone(&self) -> Self {
        Pipeline {
            store: self.store.clone(),
            dataverse: self.dataverse.clone(),
            marketo: self.marketo.clone(),
            config: self.config.clone(),
            clock: self.clock.clone(),
            owner: self.owner.clone(),
            companies: self.companies.clone(),
            sales_persons: self.sales_persons.clone(),
            // A clone is the same process, on adapters that share their state.
            member: self.member.clone(),
            counted: self.counted.clone(),
            preflight: self.preflight.clone(),
            front: self.front.clone(),
            accounted: self.accounted.clone(),
        }
    }
}

impl<S: StateStore, D, M> Pipeline<S, D, M> {
    /// Adds a run to the run history, kept `[sync] run_history_days`. Best effort: a run the
    /// store cannot record is logged and never fails the run itself.
    pub async fn record_run(&self, run: oppsync_state::Run) {
        let keep_ms = i64::from(self.config.sync.run_history_days) * 86_400_000;
        if let Err(e) = self.store.record_run(&run, keep_ms).await {
            tracing::warn!(error = %e, command = %run.command, "could not record the run in the run history");
        }
    }

    /// Records `command`, begun at `started` and ending now: its report as `made` reads it, or
    /// the error that ended it as the stop reason.
    pub async fn record_outcome<T, E: std::fmt::Display>(
        &self,
        command: &'static str,
        started: Millis,
        outcome: &Result<T, E>,
        made: impl FnOnce(&RunTimes, &T) -> oppsync_state::Run,
    ) {
        let times = RunTimes {
            command,
            started,
            ended: self.now(),
        };
        self.record_run(match outcome {
            Ok(report) => made(&times, report),
            Err(e) => times.failed(e),
        })
        .await;
    }
}

impl<S: StateStore, D: DataversePort, M: MarketoPort> Pipeline<S, D, M> {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use oppsync_mapping::AccountId;

    /// A million opportunities name 500,000 companies: each is written once, so the cache
    /// holds at least that many, and a rename is written again.
    #[test]
    fn the_company_cache_holds_half_a_million_companies_and_sees_a_rename() {
        let cache = WrittenCache::default();
        let id = |n: u128| AccountId::parse(&format!("a0000000-0000-4000-8000-{n:012}")).unwrap().0;
        let name = |n: u128| Some(format!("Account {n}"));
        for n in 0..500_000u128 {
            cache.remember(id(n), &name(n));
        }
        assert!(cache.holds(id(0), &name(0)) && cache.holds(id(499_999), &name(499_999)));
        assert!(!cache.holds(id(0), &Some("Renamed".to_owned())));
        assert!(!cache.holds(id(0), &None::<String>));
        assert!(!cache.holds(id(500_000), &name(500_000)));
    }
}
