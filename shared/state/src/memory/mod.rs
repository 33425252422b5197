//! The reference store: the [`StateStore`] contract as plain data structures in memory, with no
//! cleverness, written to be the model the other stores are checked against (the model-based
//! conformance test compares every answer of SQLite and DynamoDB with this one's) and the store
//! of the deterministic simulation, where it must be fast and hold no thread or timer.
//!
//! Each method takes the one lock, does its whole step and lets go: every step is atomic, as
//! the trait requires. Listings page exactly and in the trait's order. Claim tokens count up
//! from one, so a simulation run is the same every time.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use oppsync_mapping::{OpportunityId, Plan, WrittenRole};

use crate::{
    Claim, Counts, Cursor, Lease, MarkOutcome, Millis, OpportunityState, Page, PendingChange, Run, Source, StateError,
    Status, SyncError, Written, minute_of,
};

mod store;

/// One opportunity's item, as the store holds it.
#[derive(Debug, Clone)]
struct Item {
    status: Status,
    version: i64,
    deleted: bool,
    modified_on: Option<String>,
    plan: Option<Plan>,
    written: Option<Written>,
    attempts: u32,
    last_error: Option<SyncError>,
    claim_token: Option<i64>,
    claim_until: Option<Millis>,
    retry_at: Option<Millis>,
    rewrite: bool,
    planned: Vec<WrittenRole>,
    created_at: Millis,
    updated_at: Millis,
    status_since: Millis,
}

impl Item {
    fn new(change: &PendingChange, now: Millis) -> Item {
        Item {
            status: Status::Pending,
            version: change.version,
            deleted: change.deleted,
            modified_on: change.modified_on.clone(),
            plan: None,
            written: None,
            attempts: 0,
            last_error: None,
            claim_token: None,
            claim_until: None,
            retry_at: None,
            rewrite: false,
            planned: Vec::new(),
            created_at: now,
            updated_at: now,
            status_since: now,
        }
    }

    fn state(&self, id: OpportunityId) -> OpportunityState {
        OpportunityState {
            id,
            status: self.status,
            version: self.version,
            deleted: self.deleted,
            modified_on: self.modified_on.clone(),
            plan: self.plan.clone(),
            written: self.written.clone(),
            attempts: self.attempts,
            last_error: self.last_error.clone(),
            claim_until: self.claim_until,
            retry_at: self.retry_at,
            rewrite: self.rewrite,
            planned: self.planned.clone(),
            unreadable: None,
            created_at: self.created_at,
            updated_at: self.updated_at,
            status_since: self.status_since,
        }
    }

    /// Nobody holds it at `now` (never claimed, released, or the claim expired).
    fn free(&self, now: Millis) -> bool {
        self.claim_until.is_none_or(|until| until <= now)
    }

    /// `claim` is still this item's claim: same token, same version (expiry is not checked,
    /// as in the other stores: an expired claim nobody took is still the holder's).
    fn held_by(&self, claim: &Claim) -> bool {
        self.claim_token == Some(claim.token) && self.version == claim.version
    }

    /// Moves it to `status`; `status_since` changes only when the status does.
    fn enter(&mut self, status: Status, now: Millis) {
        if self.status != status {
            self.status_since = now;
        }
        self.status = status;
    }

    fn unclaim(&mut self) {
        self.claim_token = None;
        self.claim_until = None;
    }

    /// Records what a write left in Marketo unless a newer write is already recorded.
    fn record_written(&mut self, written: &Written) {
        if self.written.as_ref().is_none_or(|w| w.version <= written.version) {
            self.written = Some(written.clone());
        }
    }
}

/// Everything the store holds.
#[derive(Debug, Default)]
struct Data {
    cursors: BTreeMap<Source, Cursor>,
    leases: BTreeMap<String, Lease>,
    items: BTreeMap<OpportunityId, Item>,
    completions: BTreeMap<i64, u64>,
    marketo_calls: BTreeMap<String, u64>,
    links: BTreeMap<String, OpportunityId>,
    /// Lock key → when it expires.
    locks: BTreeMap<String, Millis>,
    leads: BTreeMap<String, i64>,
    /// Budget member → until when it is live.
    members: BTreeMap<String, Millis>,
    /// (started, sequence) → (kept until, the run).
    runs: BTreeMap<(Millis, u64), (Millis, Run)>,
    runs_recorded: u64,
    /// The last claim token drawn.
    tokens: i64,
}

impl Data {
    fn token(&mut self) -> i64 {
        self.tokens += 1;
        self.tokens
    }

    fn count_completion(&mut self, now: Millis) {
        *self.completions.entry(minute_of(now)).or_default() += 1;
    }

    /// [`crate::StateStore::requeue`]'s step: back to pending at its version, unclaimed, its
    /// wait and attempts reset.
    fn requeue(&mut self, id: OpportunityId, rewrite: bool, now: Millis) -> bool {
        let Some(item) = self.items.get_mut(&id) else {
            return false;
        };
        item.status = Status::Pending;
        item.status_since = now;
        item.deleted = false;
        item.unclaim();
        item.retry_at = None;
        item.attempts = 0;
        item.rewrite |= rewrite;
        item.updated_at = now;
        true
    }

    /// Extends a claim still held, after `change` to its item; `None` when it was lost.
    fn extend_claim(
        &mut self,
        claim: &Claim,
        ttl_ms: i64,
        now: Millis,
        change: impl FnOnce(&mut Item),
    ) -> Option<Claim> {
        let item = self.items.get_mut(&claim.id).filter(|item| item.held_by(claim))?;
        change(item);
        item.claim_until = Some(now + ttl_ms);
        item.updated_at = now;
        Some(Claim {
            until: now + ttl_ms,
            ..claim.clone()
        })
    }

    fn claim(
        &mut self,
        id: OpportunityId,
        from: Status,
        ttl_ms: i64,
        now: Millis,
    ) -> Option<(Claim, OpportunityState)> {
        let token = self.token();
        let item = self.items.get_mut(&id)?;
        let waiting = item.retry_at.is_some_and(|at| at > now);
        if item.status != from || !item.free(now) || waiting {
            return None;
        }
        item.claim_token = Some(token);
        item.claim_until = Some(now + ttl_ms);
        item.updated_at = now;
        let claim = Claim {
            id,
            version: item.version,
            token,
            until: now + ttl_ms,
        };
        Some((claim, item.state(id)))
    }
}

/// The reference store. Cheap to clone; clones share what it holds.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore(Arc<Mutex<Data>>);

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn data(&self) -> MutexGuard<'_, Data> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every item, by id (the simulation's oracle reads the whole state at the end).
    pub fn all(&self) -> Vec<OpportunityState> {
        self.data().items.iter().map(|(id, item)| item.state(*id)).collect()
    }

    /// Frees every claim, lease, lock and budget membership, as [`crate::SqliteStore::release_abandoned`]
    /// does for a restarted local run.
    pub fn release_abandoned(&self) -> u64 {
        let mut d = self.data();
        let mut freed = 0;
        for item in d.items.values_mut() {
            if item.claim_until.take().is_some() {
                freed += 1;
            }
        }
        for lease in d.leases.values_mut() {
            lease.expires_at = 0;
        }
        d.locks.clear();
        d.members.clear();
        freed
    }
}

/// The page token of a listing: the last item's position in its status's order.
fn page_token(state: &OpportunityState) -> String {
    format!("{}/{}", state.status_since, state.id)
}

fn parse_page_token(token: &str) -> Result<(Millis, OpportunityId), StateError> {
    token
        .split_once('/')
        .and_then(|(since, id)| Some((since.parse().ok()?, OpportunityId::parse(id).ok()?)))
        .ok_or_else(|| StateError::BadPageToken(token.to_owned()))
}

/// Keys seen once each, in order.
fn dedup_sorted<T: Ord>(items: impl IntoIterator<Item = T>) -> Vec<T> {
    items.into_iter().collect::<BTreeSet<T>>().into_iter().collect()
}

/// The known ones among `keys`.
fn known<V: Copy>(map: &BTreeMap<String, V>, keys: &[String]) -> HashMap<String, V> {
    keys.iter()
        .filter_map(|k| map.get(k).map(|v| (k.clone(), *v)))
        .collect()
}

fn counts_of(items: &BTreeMap<OpportunityId, Item>) -> Counts {
    let mut counts = Counts::default();
    for item in items.values() {
        *counts.0.entry(item.status).or_default() += 1;
    }
    counts
}

fn outcome(recorded: bool) -> MarkOutcome {
    if recorded {
        MarkOutcome::Recorded
    } else {
        MarkOutcome::Stale
    }
}
