//! The store's contract: [`StateStore`], one atomic step a method, each guard checked by the store
//! itself. The types it speaks in are in the crate's root.

use std::collections::HashMap;
use std::future::Future;

use oppsync_mapping::{OpportunityId, WrittenRole};

use crate::{
    Claim, Completion, Counts, Cursor, Lease, MarkOutcome, Millis, OpportunityState, Page, PendingChange, Run, Source,
    StateError, Status, TransformResult, WriteResult, overlapped,
};

/// The sync-state store. Every method is one atomic step; every guard is checked by the store
/// itself (a conditional write or a transaction), never by reading first and writing after.
pub trait StateStore: Send + Sync + Clone + 'static {
    /// The cursor of a source, if it has been read before.
    fn cursor(&self, source: Source) -> impl Future<Output = Result<Option<Cursor>, StateError>> + Send;

    /// Moves a cursor, only while `lease` is still held (fencing).
    fn advance_cursor(
        &self,
        lease: &Lease,
        source: Source,
        value: &str,
        now: Millis,
    ) -> impl Future<Output = Result<(), StateError>> + Send;

    /// Takes the named lease if it is free or expired; `None` when someone else holds it.
    fn acquire_lease(
        &self,
        name: &str,
        owner: &str,
        ttl_ms: i64,
        now: Millis,
    ) -> impl Future<Output = Result<Option<Lease>, StateError>> + Send;

    /// Extends a held lease; `None` when it was lost.
    fn renew_lease(
        &self,
        lease: &Lease,
        ttl_ms: i64,
        now: Millis,
    ) -> impl Future<Output = Result<Option<Lease>, StateError>> + Send;

    /// Gives the lease up early; a no-op when it was already lost.
    fn release_lease(&self, lease: &Lease) -> impl Future<Output = Result<(), StateError>> + Send;

    /// Records changes as pending, each guarded by version: an older or equal version changes
    /// nothing. Returns one outcome per change, in order.
    fn mark_pending(
        &self,
        changes: &[PendingChange],
        now: Millis,
    ) -> impl Future<Output = Result<Vec<MarkOutcome>, StateError>> + Send;

    /// Puts an existing item back to pending at its current version (resync, retry of a failed
    /// record, a stuck one). With `rewrite`, the next transform writes even an unchanged plan
    /// (Marketo may differ from what was recorded); an earlier `rewrite` is never cleared here.
    /// Returns false when there is no such item.
    fn requeue(
        &self,
        id: OpportunityId,
        rewrite: bool,
        now: Millis,
    ) -> impl Future<Output = Result<bool, StateError>> + Send;

    /// Requeues an existing item with `rewrite` and claims it for its transform in the same
    /// atomic step, so that no other transformer plans it in between (resync). Whoever held it
    /// loses the claim. `None` when there is no such item.
    fn requeue_claimed(
        &self,
        id: OpportunityId,
        ttl_ms: i64,
        now: Millis,
    ) -> impl Future<Output = Result<Option<(Claim, OpportunityState)>, StateError>> + Send;

    /// Extends a claim still held (same token, same version); `None` when it was lost.
    fn renew_claim(
        &self,
        claim: &Claim,
        ttl_ms: i64,
        now: Millis,
    ) -> impl Future<Output = Result<Option<Claim>, StateError>> + Send;

    /// Records the roles a write is about to send (with their lead ids) before it sends them,
    /// only while `claim` is still held, and extends the claim; `None` when it was lost (the
    /// caller must not send them). `roles` replaces what was recorded (callers pass the union).
    fn record_planned(
        &self,
        claim: &Claim,
        roles: &[WrittenRole],
        ttl_ms: i64,
        now: Millis,
    ) -> impl Future<Output = Result<Option<Claim>, StateError>> + Send;

    /// Takes short-lived locks on `keys`, one flag per key: a key is taken when nobody holds it
    /// or its lock has expired, whoever held it before (the same process included). A lock lasts
    /// `ttl_ms` even after its work is done, which is what keeps two writers (or two calls in
    /// quick succession) from creating the same Marketo lead; `unlock` frees it early only when
    /// the work did not happen.
    fn lock(
        &self,
        keys: &[String],
        ttl_ms: i64,
        now: Millis,
    ) -> impl Future<Output = Result<Vec<bool>, StateError>> + Send;

    /// Frees locks taken at `now` with `ttl_ms` (their expiry is the proof of holding them)
    /// before they expire: the work they guarded did not happen (a lead creation refused).
    /// Locks taken since by someone else are left alone.
    fn unlock(&self, keys: &[String], ttl_ms: i64, now: Millis) -> impl Future<Output = Result<(), StateError>> + Send;

    /// Gives a claim up unfinished, so the record can be claimed again at once (a handler that
    /// failed, a writer at its deadline). A no-op when it was already lost.
    fn release(&self, claim: &Claim, now: Millis) -> impl Future<Output = Result<(), StateError>> + Send;

    /// Ends the wait of a ready record whose `retry_at` has passed and that nobody holds:
    /// `retry_at` is removed, which is what the writer's stream filter waits for. Returns
    /// whether it did.
    fn wake(&self, id: OpportunityId, now: Millis) -> impl Future<Output = Result<bool, StateError>> + Send;

    /// Claims an item in `from` status that nobody holds (or whose claim expired) and that is
    /// not waiting out a retry (`retry_at` in the future).
    fn claim(
        &self,
        id: OpportunityId,
        from: Status,
        ttl_ms: i64,
        now: Millis,
    ) -> impl Future<Output = Result<Option<(Claim, OpportunityState)>, StateError>> + Send;

    /// [`Self::claim`] for each of `ids`, answering in order; a store that can take them in
    /// one request does.
    fn claim_many(
        &self,
        ids: Vec<OpportunityId>,
        from: Status,
        ttl_ms: i64,
        now: Millis,
    ) -> impl Future<Output = Vec<Result<Option<(Claim, OpportunityState)>, StateError>>> + Send {
        overlapped(ids.into_iter().map(move |id| self.claim(id, from, ttl_ms, now)))
    }

    /// Ends a transform claim.
    fn complete_transform(
        &self,
        claim: &Claim,
        result: TransformResult,
        now: Millis,
    ) -> impl Future<Output = Result<Completion, StateError>> + Send;

    /// Ends a write claim. What was written is recorded even when the claim was superseded,
    /// unless a newer write is already recorded.
    fn complete_write(
        &self,
        claim: &Claim,
        result: WriteResult,
        now: Millis,
    ) -> impl Future<Output = Result<Completion, StateError>> + Send;

    /// [`Self::complete_write`] for each write, answering in order; a store that can record
    /// them in one request does.
    fn complete_writes(
        &self,
        writes: Vec<(Claim, WriteResult)>,
        now: Millis,
    ) -> impl Future<Output = Vec<Result<Completion, StateError>>> + Send {
        overlapped(
            writes
                .into_iter()
                .map(move |(claim, result)| async move { self.complete_write(&claim, result, now).await }),
        )
    }

    fn get(&self, id: OpportunityId) -> impl Future<Output = Result<Option<OpportunityState>, StateError>> + Send;

    /// Items in a status, oldest in that status first.
    fn list(
        &self,
        status: Status,
        limit: usize,
        page: Option<&str>,
    ) -> impl Future<Output = Result<Page<OpportunityState>, StateError>> + Send;

    fn counts(&self) -> impl Future<Output = Result<Counts, StateError>> + Send;

    /// The item pending the longest, and since when.
    fn oldest_pending(&self) -> impl Future<Output = Result<Option<(OpportunityId, Millis)>, StateError>> + Send;

    /// Items that reached synced, deleted or filtered from `since` to `until` (per-minute
    /// resolution: whole minutes that overlap the window count).
    fn completions(&self, since: Millis, until: Millis) -> impl Future<Output = Result<u64, StateError>> + Send;

    /// Adds to a day's Marketo call count atomically; returns the new total.
    fn add_marketo_calls(&self, day: &str, calls: u64) -> impl Future<Output = Result<u64, StateError>> + Send;

    fn marketo_calls(&self, day: &str) -> impl Future<Output = Result<u64, StateError>> + Send;

    /// Takes one call from a day's count if it stays within `budget`, atomically across
    /// processes: the new count, or `None` when the day's budget is spent (nothing counted).
    fn take_marketo_call(&self, day: &str, budget: u64)
    -> impl Future<Output = Result<Option<u64>, StateError>> + Send;

    /// Registers (or renews) `member` as a process writing to Marketo until `until`; returns
    /// how many members are live at `now`, this one included. Each takes an equal share of the
    /// call budget.
    fn join_budget(
        &self,
        member: &str,
        until: Millis,
        now: Millis,
    ) -> impl Future<Output = Result<u32, StateError>> + Send;

    /// Withdraws `member` (a process that stops writing), so the others' shares grow at once.
    fn leave_budget(&self, member: &str) -> impl Future<Output = Result<(), StateError>> + Send;

    /// Remembers which opportunity each stakeholder connection belongs to. Dataverse reports a
    /// deleted connection by its id alone; this is how its opportunity is found again.
    fn remember_links(&self, links: &[(String, OpportunityId)]) -> impl Future<Output = Result<(), StateError>> + Send;

    /// The opportunities of the remembered connections among `connections` (unknown ids are
    /// left out), deduplicated.
    fn linked_opportunities(
        &self,
        connections: &[String],
    ) -> impl Future<Output = Result<Vec<OpportunityId>, StateError>> + Send;

    /// Remembers the Marketo lead each lead key resolved to (a key is a hash of the lookup
    /// field and value, so no email reaches the store): a contact seen before costs no lead call.
    fn remember_leads(&self, leads: &[(String, i64)]) -> impl Future<Output = Result<(), StateError>> + Send;

    /// The remembered lead of each known key among `keys` (unknown keys are left out).
    fn known_leads(&self, keys: &[String]) -> impl Future<Output = Result<HashMap<String, i64>, StateError>> + Send;

    /// Forgets remembered leads (Marketo no longer has them: deleted, merged away).
    fn forget_leads(&self, keys: &[String]) -> impl Future<Output = Result<(), StateError>> + Send;

    /// Adds a run to the run history, kept `keep_ms` after it ended; runs past their time are
    /// removed (SQLite: at the next record; DynamoDB: by the table's TTL).
    fn record_run(&self, run: &Run, keep_ms: i64) -> impl Future<Output = Result<(), StateError>> + Send;

    /// The newest `limit` runs still kept, newest first.
    fn runs(&self, limit: usize, now: Millis) -> impl Future<Output = Result<Vec<Run>, StateError>> + Send;
}
