//! [`StateStore`] on DynamoDB: every guard a conditional write (cursors behind the lease,
//! claims with their token and expiry, completions that check the claim), the views on the
//! sparse `open` index, and the daily Marketo call count as an atomic ADD.

use super::*;

impl StateStore for DynamoStore {
    async fn cursor(&self, source: Source) -> Result<Option<Cursor>, StateError> {
        self.read_cursor(source).await
    }

    async fn advance_cursor(&self, lease: &Lease, source: Source, value: &str, now: Millis) -> Result<(), StateError> {
        self.move_cursor(lease, source, value, now).await
    }

    async fn acquire_lease(
        &self,
        name: &str,
        owner: &str,
        ttl_ms: i64,
        now: Millis,
    ) -> Result<Option<Lease>, StateError> {
        self.take_lease(name, owner, ttl_ms, now).await
    }

    async fn renew_lease(&self, lease: &Lease, ttl_ms: i64, now: Millis) -> Result<Option<Lease>, StateError> {
        self.extend_lease(lease, ttl_ms, now).await
    }

    async fn release_lease(&self, lease: &Lease) -> Result<(), StateError> {
        self.give_up_lease(lease).await
    }

    async fn mark_pending(&self, changes: &[PendingChange], now: Millis) -> Result<Vec<MarkOutcome>, StateError> {
        // Concurrent across opportunities, in order within one: two changes to the same record in
        // one batch must resolve as if applied one after the other.
        let mut by_id: HashMap<OpportunityId, Vec<(usize, PendingChange)>> = HashMap::new();
        for (i, change) in changes.iter().enumerate() {
            by_id.entry(change.id).or_default().push((i, change.clone()));
        }
        let permits = Arc::new(Semaphore::new(MARK_CONCURRENCY));
        let mut tasks = JoinSet::new();
        for group in by_id.into_values() {
            let (store, permits) = (self.clone(), Arc::clone(&permits));
            tasks.spawn(async move {
                let _permit = permits.acquire_owned().await;
                let mut results = Vec::with_capacity(group.len());
                for (i, change) in group {
                    results.push((i, store.mark_one(&change, now).await));
                }
                results
            });
        }
        let mut outcomes = vec![MarkOutcome::Stale; changes.len()];
        let mut first_error = None;
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(results) => {
                    for (i, result) in results {
                        match result {
                            Ok(outcome) => outcomes[i] = outcome,
                            Err(e) => {
                                first_error.get_or_insert(e);
                            }
                        }
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(StateError::Dynamo {
                        operation: "UpdateItem (mark pending)",
                        message: format!("the task stopped: {e}"),
                        retryable: true,
                    });
                }
            }
        }
        // Each recorded change is durable on its own; on error the caller retries the whole
        // batch, and the version guard makes the repeats no-ops.
        match first_error {
            Some(e) => Err(e),
            None => Ok(outcomes),
        }
    }

    async fn requeue(&self, id: OpportunityId, rewrite: bool, now: Millis) -> Result<bool, StateError> {
        let u = requeue_update(rewrite, true, now);
        let done = self
            .update(
                "UpdateItem (requeue)",
                opp_key(id),
                &u,
                Some("attribute_exists(pk)"),
                ReturnValue::None,
            )
            .await?;
        Ok(done.is_some())
    }

    async fn requeue_claimed(
        &self,
        id: OpportunityId,
        ttl_ms: i64,
        now: Millis,
    ) -> Result<Option<(Claim, OpportunityState)>, StateError> {
        let token = new_token();
        let mut u = requeue_update(true, false, now);
        u.set("claim = :t, claim_until = :until")
            .value(":t", n(token))
            .value(":until", n(now + ttl_ms));
        let item = self
            .update(
                "UpdateItem (requeue and claim)",
                opp_key(id),
                &u,
                Some("attribute_exists(pk)"),
                ReturnValue::AllNew,
            )
            .await?;
        match item {
            None => Ok(None),
            Some(item) => {
                let state = read_state(&item)?;
                Ok(Some((
                    Claim {
                        id,
                        version: state.version,
                        token,
                        until: now + ttl_ms,
                    },
                    state,
                )))
            }
        }
    }

    async fn renew_claim(&self, claim: &Claim, ttl_ms: i64, now: Millis) -> Result<Option<Claim>, StateError> {
        let mut u = Update::default();
        u.set("claim_until = :until, updated = :now")
            .value(":until", n(now + ttl_ms))
            .value(":now", n(now))
            .value(":t", n(claim.token))
            .value(":v", n(claim.version));
        let done = self
            .update(
                "UpdateItem (renew claim)",
                opp_key(claim.id),
                &u,
                Some("claim = :t AND ver = :v"),
                ReturnValue::None,
            )
            .await?;
        Ok(done.map(|_| Claim {
            until: now + ttl_ms,
            ..claim.clone()
        }))
    }

    async fn record_planned(
        &self,
        claim: &Claim,
        roles: &[WrittenRole],
        ttl_ms: i64,
        now: Millis,
    ) -> Result<Option<Claim>, StateError> {
        let mut u = Update::default();
        u.set("claim_until = :until, updated = :now")
            .value(":until", n(now + ttl_ms))
            .value(":now", n(now))
            .value(":t", n(claim.token))
            .value(":v", n(claim.version))
            .blob(
                encode_blob("planned", json(&roles)?, "the planned role set")?,
                "planned_json",
                "planned_z",
            );
        let done = self
            .update(
                "UpdateItem (record planned roles)",
                opp_key(claim.id),
                &u,
                Some("claim = :t AND ver = :v"),
                ReturnValue::None,
            )
            .await?;
        Ok(done.map(|_| Claim {
            until: now + ttl_ms,
            ..claim.clone()
        }))
    }

    async fn lock(&self, keys: &[String], ttl_ms: i64, now: Millis) -> Result<Vec<bool>, StateError> {
        self.take_locks(keys, ttl_ms, now).await
    }

    async fn unlock(&self, keys: &[String], ttl_ms: i64, now: Millis) -> Result<(), StateError> {
        self.free_locks(keys, ttl_ms, now).await
    }

    async fn release(&self, claim: &Claim, now: Millis) -> Result<(), StateError> {
        let mut u = Update::default();
        u.set("updated = :now")
            .value(":now", n(now))
            .value(":t", n(claim.token))
            .remove("claim")
            .remove("claim_until");
        self.update(
            "UpdateItem (release claim)",
            opp_key(claim.id),
            &u,
            Some("claim = :t"),
            ReturnValue::None,
        )
        .await?;
        Ok(())
    }

    async fn wake(&self, id: OpportunityId, now: Millis) -> Result<bool, StateError> {
        let mut u = Update::default();
        u.set("updated = :now")
            .value(":now", n(now))
            .value(":ready", s(Status::Ready.as_str()))
            .remove("retry_at")
            .awaits(Some(AWAITS_WRITE));
        let done = self
            .update(
                "UpdateItem (wake)",
                opp_key(id),
                &u,
                Some("#s = :ready AND retry_at <= :now AND (attribute_not_exists(claim_until) OR claim_until <= :now)"),
                ReturnValue::None,
            )
            .await?;
        Ok(done.is_some())
    }

    async fn claim(
        &self,
        id: OpportunityId,
        from: Status,
        ttl_ms: i64,
        now: Millis,
    ) -> Result<Option<(Claim, OpportunityState)>, StateError> {
        let token = new_token();
        let mut u = Update::default();
        u.set("claim = :t, claim_until = :until, updated = :now")
            .value(":t", n(token))
            .value(":until", n(now + ttl_ms))
            .value(":now", n(now))
            .value(":from", s(from.as_str()))
            .awaits(None);
        let item = self
            .update(
                "UpdateItem (claim)",
                opp_key(id),
                &u,
                Some(
                    "#s = :from AND (attribute_not_exists(claim_until) OR claim_until <= :now) \
                     AND (attribute_not_exists(retry_at) OR retry_at <= :now)",
                ),
                ReturnValue::AllNew,
            )
            .await?;
        match item {
            None => Ok(None),
            Some(item) => {
                let state = read_state(&item)?;
                Ok(Some((
                    Claim {
                        id,
                        version: state.version,
                        token,
                        until: now + ttl_ms,
                    },
                    state,
                )))
            }
        }
    }

    async fn complete_transform(
        &self,
        claim: &Claim,
        result: TransformResult,
        now: Millis,
    ) -> Result<Completion, StateError> {
        let (status, plan, error) = result.parts();
        let mut u = Update::default();
        u.status(status)
            .set("updated = :now, since = :now, attempts = attempts + :inc")
            .value(":now", n(now))
            .value(":inc", n(i64::from(error.is_some())))
            .value(":t", n(claim.token))
            .value(":v", n(claim.version))
            .error(error)
            .remove("claim")
            .remove("claim_until")
            .remove("retry_at")
            .remove("psince")
            .awaits((status == Status::Ready).then_some(AWAITS_WRITE));
        if let Some(plan) = plan {
            u.blob(encode_blob("plan", json(plan)?, "the plan")?, "plan_json", "plan_z");
        }
        let done = self
            .update(
                "UpdateItem (complete transform)",
                opp_key(claim.id),
                &u,
                Some("claim = :t AND ver = :v"),
                ReturnValue::None,
            )
            .await?;
        if done.is_none() {
            return Ok(Completion::Superseded);
        }
        if !status.is_open() {
            self.count_completion(now).await?;
        }
        Ok(Completion::Completed)
    }

    async fn complete_write(&self, claim: &Claim, result: WriteResult, now: Millis) -> Result<Completion, StateError> {
        let (status, written, error) = result.parts();
        let mut u = Update::default();
        u.status(status)
            .set("updated = :now")
            .value(":now", n(now))
            .value(":t", n(claim.token))
            .value(":v", n(claim.version))
            .error(error)
            .remove("claim")
            .remove("claim_until")
            // A retry waits for the sweep to wake it; a success or failure awaits nothing.
            .awaits(None);
        if status != Status::Ready {
            u.set("since = :now");
        }
        match result.attempts_delta() {
            Some(delta) => u.set("attempts = attempts + :inc").value(":inc", n(delta)),
            None => u.set("attempts = :zero").value(":zero", n(0)),
        };
        match result.retry_at() {
            Some(at) => u.set("retry_at = :retry").value(":retry", n(at)),
            None => u.remove("retry_at"),
        };
        if matches!(result, WriteResult::Synced(_)) {
            u.remove("needs_rewrite");
        }
        // What was written now covers the roles planned before the calls.
        u.remove("planned_json").remove("planned_z");
        let mut condition = "claim = :t AND ver = :v".to_owned();
        if let Some(w) = written {
            u.blob(
                encode_blob("written", json(w)?, "the written role set")?,
                "written_json",
                "written_z",
            )
            .set("wver = :wv")
            .value(":wv", n(w.version));
            condition.push_str(" AND (attribute_not_exists(wver) OR wver <= :wv)");
        }
        let done = self
            .update(
                "UpdateItem (complete write)",
                opp_key(claim.id),
                &u,
                Some(&condition),
                ReturnValue::None,
            )
            .await?;
        if done.is_none() {
            if let Some(w) = written {
                self.record_written(claim.id, w).await?;
            }
            return Ok(Completion::Superseded);
        }
        if matches!(status, Status::Synced | Status::Deleted) {
            self.count_completion(now).await?;
        }
        Ok(Completion::Completed)
    }

    async fn get(&self, id: OpportunityId) -> Result<Option<OpportunityState>, StateError> {
        let out = self
            .client
            .get_item()
            .table_name(&*self.table)
            .key("pk", opp_key(id))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| dynamo_err("GetItem", e))?;
        out.item.as_ref().map(read_state).transpose()
    }

    async fn list(
        &self,
        status: Status,
        limit: usize,
        page: Option<&str>,
    ) -> Result<Page<OpportunityState>, StateError> {
        let limit = limit.clamp(1, 10_000);
        let mut start = page.map(decode_page).transpose()?;
        let mut items = Vec::new();
        loop {
            let want = (limit - items.len()) as i32;
            let (batch, last) = if status.is_open() {
                let (batch, _, last) = self.query_open(status, want, start.take(), false).await?;
                (batch, last)
            } else {
                // Closed statuses are not indexed (that would put every synced item in one index
                // partition); listing them scans, which only the operator views do.
                let out = self
                    .client
                    .scan()
                    .table_name(&*self.table)
                    .filter_expression("#s = :s AND begins_with(pk, :p)")
                    .expression_attribute_names("#s", "status")
                    .expression_attribute_values(":s", s(status.as_str()))
                    .expression_attribute_values(":p", s("opp#"))
                    .limit(want.max(25))
                    .set_exclusive_start_key(start.take())
                    .send()
                    .await
                    .map_err(|e| dynamo_err("Scan", e))?;
                (out.items.unwrap_or_default(), out.last_evaluated_key)
            };
            for item in &batch {
                if items.len() == limit {
                    // A scan page can hold more than asked (its limit counts items before the
                    // filter, and is at least 25): the listing goes on after the last item it
                    // gave, not after the scan's page, so the rest is listed next time.
                    let last = items
                        .last()
                        .map(|kept: &OpportunityState| Item::from([("pk".to_owned(), opp_key(kept.id))]));
                    return Ok(Page {
                        items,
                        next: last.map(|key| encode_page(&key)),
                    });
                }
                items.push(read_state(item)?);
            }
            match last {
                Some(key) if items.len() < limit => start = Some(key),
                Some(key) => {
                    return Ok(Page {
                        items,
                        next: Some(encode_page(&key)),
                    });
                }
                None => return Ok(Page { items, next: None }),
            }
        }
    }

    async fn counts(&self) -> Result<Counts, StateError> {
        let mut counts = Counts::default();
        // Open statuses: count queries on the sparse index.
        for status in Status::ALL.into_iter().filter(|s| s.is_open()) {
            let mut start = None;
            let mut total = 0;
            loop {
                let (_, count, last) = self.query_open(status, 0, start, true).await?;
                total += count;
                match last {
                    Some(k) => start = Some(k),
                    None => break,
                }
            }
            if total > 0 {
                counts.0.insert(status, total as u64);
            }
        }
        // Closed statuses: a scan, projecting only the status.
        let mut start = None;
        loop {
            let out = self
                .client
                .scan()
                .table_name(&*self.table)
                .filter_expression("begins_with(pk, :p) AND attribute_not_exists(q)")
                .projection_expression("#s")
                .expression_attribute_names("#s", "status")
                .expression_attribute_values(":p", s("opp#"))
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| dynamo_err("Scan (counts)", e))?;
            for item in out.items() {
                if let Some(status) = get_s(item, "status").and_then(Status::parse) {
                    *counts.0.entry(status).or_default() += 1;
                }
            }
            match out.last_evaluated_key {
                Some(k) => start = Some(k),
                None => break,
            }
        }
        Ok(counts)
    }

    async fn oldest_pending(&self) -> Result<Option<(OpportunityId, Millis)>, StateError> {
        let (items, _, _) = self.query_open(Status::Pending, 1, None, false).await?;
        items
            .first()
            .map(|item| read_state(item).map(|st| (st.id, st.status_since)))
            .transpose()
    }

    async fn completions(&self, since: Millis, until: Millis) -> Result<u64, StateError> {
        self.completions_between(since, until).await
    }

    async fn add_marketo_calls(&self, day: &str, calls: u64) -> Result<u64, StateError> {
        self.count_calls(day, calls).await
    }

    async fn take_marketo_call(&self, day: &str, budget: u64) -> Result<Option<u64>, StateError> {
        self.take_call(day, budget).await
    }

    async fn join_budget(&self, member: &str, until: Millis, now: Millis) -> Result<u32, StateError> {
        self.join_members(member, until, now).await
    }

    async fn leave_budget(&self, member: &str) -> Result<(), StateError> {
        self.leave_members(member).await
    }

    async fn marketo_calls(&self, day: &str) -> Result<u64, StateError> {
        self.calls_on(day).await
    }

    async fn remember_links(&self, links: &[(String, OpportunityId)]) -> Result<(), StateError> {
        self.put_links(links).await
    }

    async fn linked_opportunities(&self, connections: &[String]) -> Result<Vec<OpportunityId>, StateError> {
        self.get_links(connections).await
    }

    async fn record_run(&self, run: &Run, keep_ms: i64) -> Result<(), StateError> {
        self.put_run(run, keep_ms).await
    }

    async fn runs(&self, limit: usize, now: Millis) -> Result<Vec<Run>, StateError> {
        self.get_runs(limit, now).await
    }

    async fn remember_leads(&self, leads: &[(String, i64)]) -> Result<(), StateError> {
        self.put_leads(leads).await
    }

    async fn known_leads(&self, keys: &[String]) -> Result<HashMap<String, i64>, StateError> {
        self.get_leads(keys).await
    }

    async fn forget_leads(&self, keys: &[String]) -> Result<(), StateError> {
        self.delete_leads(keys).await
    }
}

/// Back to pending at the current version, unclaimed, its wait and attempts reset; Dynamics is
/// read again, so a restored record is written and a missing one deleted. `rewrite` is set,
/// never cleared, here.
/// `unclaim` removes the claim (a caller that claims sets it instead).
fn requeue_update(rewrite: bool, unclaim: bool, now: Millis) -> Update {
    let mut u = Update::default();
    u.status(Status::Pending)
        .set("attempts = :zero, updated = :now, since = :now, psince = :now, deleted = :no")
        .value(":no", AttributeValue::Bool(false))
        .value(":zero", n(0))
        .value(":now", n(now))
        .remove("retry_at");
    if unclaim {
        u.remove("claim").remove("claim_until").awaits(Some(AWAITS_TRANSFORM));
    } else {
        u.awaits(None);
    }
    if rewrite {
        u.set("needs_rewrite = :yes").value(":yes", AttributeValue::Bool(true));
    }
    u
}
