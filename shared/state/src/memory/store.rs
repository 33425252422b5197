//! [`StateStore`] on the reference store: each method one step under the lock, the same guards
//! the other stores check with conditional writes and transactions, written out plainly.

use super::*;
use crate::{Completion, StateStore, TransformResult, WriteResult};

impl StateStore for MemoryStore {
    async fn cursor(&self, source: Source) -> Result<Option<Cursor>, StateError> {
        Ok(self.data().cursors.get(&source).cloned())
    }

    async fn advance_cursor(&self, lease: &Lease, source: Source, value: &str, now: Millis) -> Result<(), StateError> {
        let mut d = self.data();
        let held = d
            .leases
            .get(&lease.name)
            .is_some_and(|l| l.token == lease.token && l.expires_at > now);
        if !held {
            return Err(StateError::LeaseLost(lease.name.clone()));
        }
        let cursor = Cursor {
            value: value.to_owned(),
            updated_at: now,
        };
        d.cursors.insert(source, cursor);
        Ok(())
    }

    async fn acquire_lease(
        &self,
        name: &str,
        owner: &str,
        ttl_ms: i64,
        now: Millis,
    ) -> Result<Option<Lease>, StateError> {
        let mut d = self.data();
        let token = match d.leases.get(name) {
            None => 1,
            Some(held) if held.expires_at <= now => held.token + 1,
            Some(_) => return Ok(None),
        };
        let lease = Lease {
            name: name.to_owned(),
            owner: owner.to_owned(),
            token,
            expires_at: now + ttl_ms,
        };
        d.leases.insert(name.to_owned(), lease.clone());
        Ok(Some(lease))
    }

    async fn renew_lease(&self, lease: &Lease, ttl_ms: i64, now: Millis) -> Result<Option<Lease>, StateError> {
        let mut d = self.data();
        match d.leases.get_mut(&lease.name) {
            Some(held) if held.token == lease.token && held.expires_at > now => {
                held.expires_at = now + ttl_ms;
                Ok(Some(Lease {
                    expires_at: now + ttl_ms,
                    ..lease.clone()
                }))
            }
            _ => Ok(None),
        }
    }

    async fn release_lease(&self, lease: &Lease) -> Result<(), StateError> {
        if let Some(held) = self.data().leases.get_mut(&lease.name)
            && held.token == lease.token
        {
            held.expires_at = 0;
        }
        Ok(())
    }

    async fn mark_pending(&self, changes: &[PendingChange], now: Millis) -> Result<Vec<MarkOutcome>, StateError> {
        let mut d = self.data();
        let mut outcomes = Vec::with_capacity(changes.len());
        for change in changes {
            let Some(item) = d.items.get_mut(&change.id) else {
                d.items.insert(change.id, Item::new(change, now));
                outcomes.push(MarkOutcome::Recorded);
                continue;
            };
            // A change applies when its version is newer; a deletion (a flag, the version kept)
            // when the item is not already deleted.
            let applies = if change.deleted {
                !item.deleted
            } else {
                item.version < change.version
            };
            if applies {
                if !change.deleted {
                    item.version = change.version;
                }
                item.deleted = change.deleted;
                item.modified_on = change.modified_on.clone();
                item.enter(Status::Pending, now);
                item.attempts = 0;
                item.last_error = None;
                item.unclaim();
                item.retry_at = None;
                item.updated_at = now;
            }
            outcomes.push(outcome(applies));
        }
        Ok(outcomes)
    }

    async fn requeue(&self, id: OpportunityId, rewrite: bool, now: Millis) -> Result<bool, StateError> {
        Ok(self.data().requeue(id, rewrite, now))
    }

    async fn requeue_claimed(
        &self,
        id: OpportunityId,
        ttl_ms: i64,
        now: Millis,
    ) -> Result<Option<(Claim, OpportunityState)>, StateError> {
        let mut d = self.data();
        if !d.requeue(id, true, now) {
            return Ok(None);
        }
        Ok(d.claim(id, Status::Pending, ttl_ms, now))
    }

    async fn renew_claim(&self, claim: &Claim, ttl_ms: i64, now: Millis) -> Result<Option<Claim>, StateError> {
        Ok(self.data().extend_claim(claim, ttl_ms, now, |_| {}))
    }

    async fn record_planned(
        &self,
        claim: &Claim,
        roles: &[WrittenRole],
        ttl_ms: i64,
        now: Millis,
    ) -> Result<Option<Claim>, StateError> {
        Ok(self
            .data()
            .extend_claim(claim, ttl_ms, now, |item| item.planned = roles.to_vec()))
    }

    async fn lock(&self, keys: &[String], ttl_ms: i64, now: Millis) -> Result<Vec<bool>, StateError> {
        let mut d = self.data();
        d.locks.retain(|_, expires| *expires > now);
        Ok(keys
            .iter()
            .map(|key| {
                let free = !d.locks.contains_key(key);
                if free {
                    d.locks.insert(key.clone(), now + ttl_ms);
                }
                free
            })
            .collect())
    }

    async fn unlock(&self, keys: &[String], ttl_ms: i64, now: Millis) -> Result<(), StateError> {
        let mut d = self.data();
        for key in keys {
            if d.locks.get(key) == Some(&(now + ttl_ms)) {
                d.locks.remove(key);
            }
        }
        Ok(())
    }

    async fn release(&self, claim: &Claim, now: Millis) -> Result<(), StateError> {
        if let Some(item) = self.data().items.get_mut(&claim.id)
            && item.claim_token == Some(claim.token)
        {
            item.unclaim();
            item.updated_at = now;
        }
        Ok(())
    }

    async fn wake(&self, id: OpportunityId, now: Millis) -> Result<bool, StateError> {
        let mut d = self.data();
        match d.items.get_mut(&id) {
            Some(item)
                if item.status == Status::Ready && item.retry_at.is_some_and(|at| at <= now) && item.free(now) =>
            {
                item.retry_at = None;
                item.updated_at = now;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn claim(
        &self,
        id: OpportunityId,
        from: Status,
        ttl_ms: i64,
        now: Millis,
    ) -> Result<Option<(Claim, OpportunityState)>, StateError> {
        Ok(self.data().claim(id, from, ttl_ms, now))
    }

    async fn complete_transform(
        &self,
        claim: &Claim,
        result: TransformResult,
        now: Millis,
    ) -> Result<Completion, StateError> {
        let mut d = self.data();
        let (status, plan, error) = result.parts();
        let held = d.items.get(&claim.id).is_some_and(|item| item.held_by(claim));
        if !held {
            return Ok(Completion::Superseded);
        }
        if let Some(item) = d.items.get_mut(&claim.id) {
            if let Some(plan) = plan {
                item.plan = Some(plan.clone());
            }
            item.status = status;
            item.status_since = now;
            item.attempts += u32::from(error.is_some());
            item.last_error = error.cloned();
            item.unclaim();
            item.retry_at = None;
            item.updated_at = now;
        }
        if !status.is_open() {
            d.count_completion(now);
        }
        Ok(Completion::Completed)
    }

    async fn complete_write(&self, claim: &Claim, result: WriteResult, now: Millis) -> Result<Completion, StateError> {
        let mut d = self.data();
        let Some(item) = d.items.get_mut(&claim.id) else {
            return Ok(Completion::Superseded);
        };
        let (status, written, error) = result.parts();
        // What was written is recorded even when the claim was lost: newer work plans against it.
        if let Some(written) = written {
            item.record_written(written);
        }
        if !item.held_by(claim) {
            return Ok(Completion::Superseded);
        }
        item.enter(status, now);
        item.attempts = match result.attempts_delta() {
            None => 0,
            Some(delta) => item.attempts + delta as u32,
        };
        item.last_error = error.cloned();
        item.unclaim();
        item.updated_at = now;
        item.retry_at = result.retry_at();
        if matches!(result, WriteResult::Synced(_)) {
            item.rewrite = false;
        }
        item.planned.clear();
        if matches!(status, Status::Synced | Status::Deleted) {
            d.count_completion(now);
        }
        Ok(Completion::Completed)
    }

    async fn get(&self, id: OpportunityId) -> Result<Option<OpportunityState>, StateError> {
        Ok(self.data().items.get(&id).map(|item| item.state(id)))
    }

    async fn list(
        &self,
        status: Status,
        limit: usize,
        page: Option<&str>,
    ) -> Result<Page<OpportunityState>, StateError> {
        let after = page.map(parse_page_token).transpose()?;
        let limit = limit.clamp(1, 10_000);
        let d = self.data();
        let mut in_status: Vec<(Millis, OpportunityId)> = d
            .items
            .iter()
            .filter(|(_, item)| item.status == status)
            .map(|(id, item)| (item.status_since, *id))
            .filter(|position| after.is_none_or(|after| *position > after))
            .collect();
        in_status.sort();
        let more = in_status.len() > limit;
        let items: Vec<OpportunityState> = in_status
            .into_iter()
            .take(limit)
            .map(|(_, id)| d.items[&id].state(id))
            .collect();
        let next = if more { items.last().map(page_token) } else { None };
        Ok(Page { items, next })
    }

    async fn counts(&self) -> Result<Counts, StateError> {
        Ok(counts_of(&self.data().items))
    }

    async fn oldest_pending(&self) -> Result<Option<(OpportunityId, Millis)>, StateError> {
        Ok(self
            .data()
            .items
            .iter()
            .filter(|(_, item)| item.status == Status::Pending)
            .map(|(id, item)| (item.status_since, *id))
            .min()
            .map(|(since, id)| (id, since)))
    }

    async fn completions(&self, since: Millis, until: Millis) -> Result<u64, StateError> {
        Ok(self
            .data()
            .completions
            .range(minute_of(since)..=minute_of(until))
            .map(|(_, n)| n)
            .sum())
    }

    async fn add_marketo_calls(&self, day: &str, calls: u64) -> Result<u64, StateError> {
        let mut d = self.data();
        let n = d.marketo_calls.entry(day.to_owned()).or_default();
        *n += calls;
        Ok(*n)
    }

    async fn marketo_calls(&self, day: &str) -> Result<u64, StateError> {
        Ok(self.data().marketo_calls.get(day).copied().unwrap_or(0))
    }

    async fn take_marketo_call(&self, day: &str, budget: u64) -> Result<Option<u64>, StateError> {
        let mut d = self.data();
        let n = d.marketo_calls.entry(day.to_owned()).or_default();
        if *n >= budget {
            return Ok(None);
        }
        *n += 1;
        Ok(Some(*n))
    }

    async fn join_budget(&self, member: &str, until: Millis, now: Millis) -> Result<u32, StateError> {
        let mut d = self.data();
        d.members.insert(member.to_owned(), until);
        d.members.retain(|_, live_until| *live_until > now);
        Ok((d.members.len() as u32).max(1))
    }

    async fn leave_budget(&self, member: &str) -> Result<(), StateError> {
        self.data().members.remove(member);
        Ok(())
    }

    async fn remember_links(&self, links: &[(String, OpportunityId)]) -> Result<(), StateError> {
        let mut d = self.data();
        for (connection, opportunity) in links {
            d.links.insert(connection.to_ascii_lowercase(), *opportunity);
        }
        Ok(())
    }

    async fn linked_opportunities(&self, connections: &[String]) -> Result<Vec<OpportunityId>, StateError> {
        let d = self.data();
        Ok(dedup_sorted(
            connections
                .iter()
                .filter_map(|c| d.links.get(&c.to_ascii_lowercase()).copied()),
        ))
    }

    async fn remember_leads(&self, leads: &[(String, i64)]) -> Result<(), StateError> {
        let mut d = self.data();
        for (key, lead) in leads {
            d.leads.insert(key.clone(), *lead);
        }
        Ok(())
    }

    async fn known_leads(&self, keys: &[String]) -> Result<HashMap<String, i64>, StateError> {
        Ok(known(&self.data().leads, keys))
    }

    async fn forget_leads(&self, keys: &[String]) -> Result<(), StateError> {
        let mut d = self.data();
        for key in keys {
            d.leads.remove(key);
        }
        Ok(())
    }

    async fn record_run(&self, run: &Run, keep_ms: i64) -> Result<(), StateError> {
        let mut d = self.data();
        d.runs.retain(|_, (keep_until, _)| *keep_until >= run.ended);
        d.runs_recorded += 1;
        let key = (run.started, d.runs_recorded);
        d.runs.insert(key, (run.ended.saturating_add(keep_ms), run.clone()));
        Ok(())
    }

    async fn runs(&self, limit: usize, now: Millis) -> Result<Vec<Run>, StateError> {
        Ok(self
            .data()
            .runs
            .values()
            .rev()
            .filter(|(keep_until, _)| *keep_until >= now)
            .take(limit)
            .map(|(_, run)| run.clone())
            .collect())
    }
}
