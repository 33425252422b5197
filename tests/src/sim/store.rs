//! The state store in the simulation: the reference store behind the run's faults. A store call
//! may be refused before it is applied (throttled) or applied with its answer lost (a timeout
//! after DynamoDB acted), and each takes its latency, so that the actors' store calls
//! interleave differently with every seed.

use std::collections::HashMap;

use oppsync_mapping::{OpportunityId, WrittenRole};
use oppsync_state::{
    Claim, Completion, Counts, Cursor, Lease, MarkOutcome, MemoryStore, Millis, OpportunityState, Page, PendingChange,
    Run, Source, StateError, StateStore, Status, TransformResult, WriteResult,
};

use super::faults::{Faults, Port};

/// The simulation's store. Cheap to clone; clones share what it holds.
#[derive(Clone)]
pub struct SimStore {
    pub inner: MemoryStore,
    faults: Faults,
}

impl SimStore {
    pub fn new(faults: Faults) -> SimStore {
        SimStore {
            inner: MemoryStore::new(),
            faults,
        }
    }
}

impl StateStore for SimStore {
    async fn cursor(&self, source: Source) -> Result<Option<Cursor>, StateError> {
        self.faults.call(Port::Store, "cursor").await?;
        let answer = self.inner.cursor(source).await;
        self.faults.answer(Port::Store, "cursor").await?;
        answer
    }

    async fn advance_cursor(&self, lease: &Lease, source: Source, value: &str, now: Millis) -> Result<(), StateError> {
        self.faults.call(Port::Store, "advance_cursor").await?;
        let answer = self.inner.advance_cursor(lease, source, value, now).await;
        self.faults.answer(Port::Store, "advance_cursor").await?;
        answer
    }

    async fn acquire_lease(
        &self,
        name: &str,
        owner: &str,
        ttl_ms: i64,
        now: Millis,
    ) -> Result<Option<Lease>, StateError> {
        self.faults.call(Port::Store, "acquire_lease").await?;
        let answer = self.inner.acquire_lease(name, owner, ttl_ms, now).await;
        self.faults.answer(Port::Store, "acquire_lease").await?;
        answer
    }

    async fn renew_lease(&self, lease: &Lease, ttl_ms: i64, now: Millis) -> Result<Option<Lease>, StateError> {
        self.faults.call(Port::Store, "renew_lease").await?;
        let answer = self.inner.renew_lease(lease, ttl_ms, now).await;
        self.faults.answer(Port::Store, "renew_lease").await?;
        answer
    }

    async fn release_lease(&self, lease: &Lease) -> Result<(), StateError> {
        self.faults.call(Port::Store, "release_lease").await?;
        let answer = self.inner.release_lease(lease).await;
        self.faults.answer(Port::Store, "release_lease").await?;
        answer
    }

    async fn mark_pending(&self, changes: &[PendingChange], now: Millis) -> Result<Vec<MarkOutcome>, StateError> {
        self.faults.call(Port::Store, "mark_pending").await?;
        let answer = self.inner.mark_pending(changes, now).await;
        self.faults.answer(Port::Store, "mark_pending").await?;
        answer
    }

    async fn requeue(&self, id: OpportunityId, rewrite: bool, now: Millis) -> Result<bool, StateError> {
        self.faults.call(Port::Store, "requeue").await?;
        let answer = self.inner.requeue(id, rewrite, now).await;
        self.faults.answer(Port::Store, "requeue").await?;
        answer
    }

    async fn requeue_claimed(
        &self,
        id: OpportunityId,
        ttl_ms: i64,
        now: Millis,
    ) -> Result<Option<(Claim, OpportunityState)>, StateError> {
        self.faults.call(Port::Store, "requeue_claimed").await?;
        let answer = self.inner.requeue_claimed(id, ttl_ms, now).await;
        self.faults.answer(Port::Store, "requeue_claimed").await?;
        answer
    }

    async fn renew_claim(&self, claim: &Claim, ttl_ms: i64, now: Millis) -> Result<Option<Claim>, StateError> {
        self.faults.call(Port::Store, "renew_claim").await?;
        let answer = self.inner.renew_claim(claim, ttl_ms, now).await;
        self.faults.answer(Port::Store, "renew_claim").await?;
        answer
    }

    async fn record_planned(
        &self,
        claim: &Claim,
        roles: &[WrittenRole],
        ttl_ms: i64,
        now: Millis,
    ) -> Result<Option<Claim>, StateError> {
        self.faults.call(Port::Store, "record_planned").await?;
        let answer = self.inner.record_planned(claim, roles, ttl_ms, now).await;
        self.faults.answer(Port::Store, "record_planned").await?;
        answer
    }

    async fn lock(&self, keys: &[String], ttl_ms: i64, now: Millis) -> Result<Vec<bool>, StateError> {
        self.faults.call(Port::Store, "lock").await?;
        let answer = self.inner.lock(keys, ttl_ms, now).await;
        self.faults.answer(Port::Store, "lock").await?;
        answer
    }

    async fn unlock(&self, keys: &[String], ttl_ms: i64, now: Millis) -> Result<(), StateError> {
        self.faults.call(Port::Store, "unlock").await?;
        let answer = self.inner.unlock(keys, ttl_ms, now).await;
        self.faults.answer(Port::Store, "unlock").await?;
        answer
    }

    async fn release(&self, claim: &Claim, now: Millis) -> Result<(), StateError> {
        self.faults.call(Port::Store, "release").await?;
        let answer = self.inner.release(claim, now).await;
        self.faults.answer(Port::Store, "release").await?;
        answer
    }

    async fn wake(&self, id: OpportunityId, now: Millis) -> Result<bool, StateError> {
        self.faults.call(Port::Store, "wake").await?;
        let answer = self.inner.wake(id, now).await;
        self.faults.answer(Port::Store, "wake").await?;
        answer
    }

    async fn claim(
        &self,
        id: OpportunityId,
        from: Status,
        ttl_ms: i64,
        now: Millis,
    ) -> Result<Option<(Claim, OpportunityState)>, StateError> {
        self.faults.call(Port::Store, "claim").await?;
        let answer = self.inner.claim(id, from, ttl_ms, now).await;
        self.faults.answer(Port::Store, "claim").await?;
        answer
    }

    async fn complete_transform(
        &self,
        claim: &Claim,
        result: TransformResult,
        now: Millis,
    ) -> Result<Completion, StateError> {
        self.faults.call(Port::Store, "complete_transform").await?;
        let answer = self.inner.complete_transform(claim, result, now).await;
        self.faults.answer(Port::Store, "complete_transform").await?;
        answer
    }

    async fn complete_write(&self, claim: &Claim, result: WriteResult, now: Millis) -> Result<Completion, StateError> {
        self.faults.call(Port::Store, "complete_write").await?;
        let answer = self.inner.complete_write(claim, result, now).await;
        self.faults.answer(Port::Store, "complete_write").await?;
        answer
    }

    async fn get(&self, id: OpportunityId) -> Result<Option<OpportunityState>, StateError> {
        self.faults.call(Port::Store, "get").await?;
        let answer = self.inner.get(id).await;
        self.faults.answer(Port::Store, "get").await?;
        answer
    }

    async fn list(
        &self,
        status: Status,
        limit: usize,
        page: Option<&str>,
    ) -> Result<Page<OpportunityState>, StateError> {
        self.faults.call(Port::Store, "list").await?;
        let answer = self.inner.list(status, limit, page).await;
        self.faults.answer(Port::Store, "list").await?;
        answer
    }

    async fn counts(&self) -> Result<Counts, StateError> {
        self.faults.call(Port::Store, "counts").await?;
        let answer = self.inner.counts().await;
        self.faults.answer(Port::Store, "counts").await?;
        answer
    }

    async fn oldest_pending(&self) -> Result<Option<(OpportunityId, Millis)>, StateError> {
        self.faults.call(Port::Store, "oldest_pending").await?;
        let answer = self.inner.oldest_pending().await;
        self.faults.answer(Port::Store, "oldest_pending").await?;
        answer
    }

    async fn completions(&self, since: Millis, until: Millis) -> Result<u64, StateError> {
        self.faults.call(Port::Store, "completions").await?;
        let answer = self.inner.completions(since, until).await;
        self.faults.answer(Port::Store, "completions").await?;
        answer
    }

    async fn add_marketo_calls(&self, day: &str, calls: u64) -> Result<u64, StateError> {
        self.faults.call(Port::Store, "add_marketo_calls").await?;
        let answer = self.inner.add_marketo_calls(day, calls).await;
        self.faults.answer(Port::Store, "add_marketo_calls").await?;
        answer
    }

    async fn marketo_calls(&self, day: &str) -> Result<u64, StateError> {
        self.faults.call(Port::Store, "marketo_calls").await?;
        let answer = self.inner.marketo_calls(day).await;
        self.faults.answer(Port::Store, "marketo_calls").await?;
        answer
    }

    async fn take_marketo_call(&self, day: &str, budget: u64) -> Result<Option<u64>, StateError> {
        self.faults.call(Port::Store, "take_marketo_call").await?;
        let answer = self.inner.take_marketo_call(day, budget).await;
        self.faults.answer(Port::Store, "take_marketo_call").await?;
        answer
    }

    async fn join_budget(&self, member: &str, until: Millis, now: Millis) -> Result<u32, StateError> {
        self.faults.call(Port::Store, "join_budget").await?;
        let answer = self.inner.join_budget(member, until, now).await;
        self.faults.answer(Port::Store, "join_budget").await?;
        answer
    }

    async fn leave_budget(&self, member: &str) -> Result<(), StateError> {
        self.faults.call(Port::Store, "leave_budget").await?;
        let answer = self.inner.leave_budget(member).await;
        self.faults.answer(Port::Store, "leave_budget").await?;
        answer
    }

    async fn remember_links(&self, links: &[(String, OpportunityId)]) -> Result<(), StateError> {
        self.faults.call(Port::Store, "remember_links").await?;
        let answer = self.inner.remember_links(links).await;
        self.faults.answer(Port::Store, "remember_links").await?;
        answer
    }

    async fn linked_opportunities(&self, connections: &[String]) -> Result<Vec<OpportunityId>, StateError> {
        self.faults.call(Port::Store, "linked_opportunities").await?;
        let answer = self.inner.linked_opportunities(connections).await;
        self.faults.answer(Port::Store, "linked_opportunities").await?;
        answer
    }

    async fn remember_leads(&self, leads: &[(String, i64)]) -> Result<(), StateError> {
        self.faults.call(Port::Store, "remember_leads").await?;
        let answer = self.inner.remember_leads(leads).await;
        self.faults.answer(Port::Store, "remember_leads").await?;
        answer
    }

    async fn known_leads(&self, keys: &[String]) -> Result<HashMap<String, i64>, StateError> {
        self.faults.call(Port::Store, "known_leads").await?;
        let answer = self.inner.known_leads(keys).await;
        self.faults.answer(Port::Store, "known_leads").await?;
        answer
    }

    async fn forget_leads(&self, keys: &[String]) -> Result<(), StateError> {
        self.faults.call(Port::Store, "forget_leads").await?;
        let answer = self.inner.forget_leads(keys).await;
        self.faults.answer(Port::Store, "forget_leads").await?;
        answer
    }

    async fn record_run(&self, run: &Run, keep_ms: i64) -> Result<(), StateError> {
        self.faults.call(Port::Store, "record_run").await?;
        let answer = self.inner.record_run(run, keep_ms).await;
        self.faults.answer(Port::Store, "record_run").await?;
        answer
    }

    async fn runs(&self, limit: usize, now: Millis) -> Result<Vec<Run>, StateError> {
        self.faults.call(Port::Store, "runs").await?;
        let answer = self.inner.runs(limit, now).await;
        self.faults.answer(Port::Store, "runs").await?;
        answer
    }
}
