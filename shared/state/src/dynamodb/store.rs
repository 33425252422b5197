//! [`StateStore`] on DynamoDB: every guard a conditional write (cursors behind the lease,
//! claims with their token and expiry, completions that check the claim), the views on the
//! sparse `open` index, and the daily Marketo call count as an atomic ADD.

use super::*;
use crate::overlapped;

impl StateStore for DynamoStore {
    async fn cursor(&self, source: Source) -> Result<Option<Cursor>, StateError> {
        let out = self
            .client
            .get_item()
            .table_name(&*self.table)
            .key("pk", s(format!("cursor#{}", source.as_str())))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| dynamo_err("GetItem (cursor)", e))?;
        Ok(out.item.and_then(|item| {
            Some(Cursor {
                value: get_s(&item, "value")?.to_owned(),
                updated_at: get_n(&item, "updated").unwrap_or(0),
            })
        }))
    }

    async fn advance_cursor(&self, lease: &Lease, source: Source, value: &str, now: Millis) -> Result<(), StateError> {
        let build = |e: aws_sdk_dynamodb::error::BuildError| StateError::Dynamo {
            operation: "TransactWriteItems (cursor)",
            message: e.to_string(),
            retryable: false,
        };
        let check = ConditionCheck::builder()
            .table_name(&*self.table)
            .key("pk", s(format!("lease#{}", lease.name)))
            .condition_expression("#t = :t AND expires > :now")
            .expression_attribute_names("#t", "token")
            .expression_attribute_values(":t", n(lease.token))
            .expression_attribute_values(":now", n(now))
            .build()
            .map_err(build)?;
        let put = Put::builder()
            .table_name(&*self.table)
            .item("pk", s(format!("cursor#{}", source.as_str())))
            .item("value", s(value))
            .item("updated", n(now))
            .build()
            .map_err(build)?;
        self.count_write();
        let result = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().condition_check(check).build())
            .transact_items(TransactWriteItem::builder().put(put).build())
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("TransactionCanceledException") => {
                let reasons = e
                    .as_service_error()
                    .and_then(|se| match se {
                        aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(tc) => Some(tc),
                        _ => None,
                    })
                    .map(|tc| tc.cancellation_reasons().iter().filter_map(|r| r.code()).collect::<Vec<_>>())
                    .unwrap_or_default();
                if reasons.contains(&"ConditionalCheckFailed") || reasons.is_empty() {
                    Err(StateError::LeaseLost(lease.name.clone()))
                } else {
                    Err(dynamo_err("TransactWriteItems (cursor)", e))
                }
            }
            Err(e) => Err(dynamo_err("TransactWriteItems (cursor)", e)),
        }
    }

    async fn acquire_lease(
        &self,
        name: &str,
        owner: &str,
        ttl_ms: i64,
        now: Millis,
    ) -> Result<Option<Lease>, StateError> {
        let mut u = Update::default();
        u.set("#o = :o, expires = :e, #t = if_not_exists(#t, :zero) + :one")
            .value(":o", s(owner))
            .value(":e", n(now + ttl_ms))
            .value(":zero", n(0))
            .value(":one", n(1))
            .value(":now", n(now));
        self.count_write();
        let request = self
            .client
            .update_item()
            .table_name(&*self.table)
            .key("pk", s(format!("lease#{name}")))
            .update_expression(u.expression())
            .condition_expression("attribute_not_exists(pk) OR expires <= :now")
            .expression_attribute_names("#o", "owner")
            .expression_attribute_names("#t", "token")
            .set_expression_attribute_values(Some(u.values))
            .return_values(ReturnValue::AllNew);
        match request.send().await {
            Ok(out) => {
                let item = out.attributes.unwrap_or_default();
                Ok(Some(Lease {
                    name: name.to_owned(),
                    owner: owner.to_owned(),
                    token: get_n(&item, "token").unwrap_or(0),
                    expires_at: now + ttl_ms,
                }))
            }
            Err(e) if is_condition_failed(&e) => Ok(None),
            Err(e) => Err(dynamo_err("UpdateItem (acquire lease)", e)),
        }
    }

    async fn renew_lease(&self, lease: &Lease, ttl_ms: i64, now: Millis) -> Result<Option<Lease>, StateError> {
        self.count_write();
        let request = self
            .client
            .update_item()
            .table_name(&*self.table)
            .key("pk", s(format!("lease#{}", lease.name)))
            .update_expression("SET expires = :e")
            .condition_expression("#t = :t AND expires > :now")
            .expression_attribute_names("#t", "token")
            .expression_attribute_values(":e", n(now + ttl_ms))
            .expression_attribute_values(":t", n(lease.token))
            .expression_attribute_values(":now", n(now));
        match request.send().await {
            Ok(_) => Ok(Some(Lease {
                expires_at: now + ttl_ms,
                ..lease.clone()
            })),
            Err(e) if is_condition_failed(&e) => Ok(None),
            Err(e) => Err(dynamo_err("UpdateItem (renew lease)", e)),
        }
    }

    async fn release_lease(&self, lease: &Lease) -> Result<(), StateError> {
        self.count_write();
        let request = self
            .client
            .update_item()
            .table_name(&*self.table)
            .key("pk", s(format!("lease#{}", lease.name)))
            .update_expression("SET expires = :zero")
            .condition_expression("#t = :t")
            .expression_attribute_names("#t", "token")
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":t", n(lease.token));
        match request.send().await {
            Ok(_) => Ok(()),
            Err(e) if is_condition_failed(&e) => Ok(()),
            Err(e) => Err(dynamo_err("UpdateItem (release lease)", e)),
        }
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
        let expires = now + ttl_ms;
        // A key named twice in one call is taken once, by its first mention: sent twice at once,
        // which of the two requests won would be a race.
        let mut seen = std::collections::HashSet::new();
        let first: Vec<bool> = keys.iter().map(|key| seen.insert(key.as_str())).collect();
        let takes: Vec<_> = keys
            .iter()
            .zip(first)
            .map(|(key, first)| {
                if first {
                    // An update creates the item when it is missing: the writer's role needs no PutItem.
                    self.count_write();
                }
                let request = self
                    .client
                    .update_item()
                    .table_name(&*self.table)
                    .key("pk", s(format!("lock#{key}")))
                    // DynamoDB's TTL removes the item some time after `expire_at_s` (seconds since the
                    // epoch); the condition reads `expires`, so a late removal changes nothing.
                    .update_expression(format!("SET expires = :e, {} = :x", attr::EXPIRE_AT))
                    .condition_expression("attribute_not_exists(pk) OR expires <= :now")
                    .expression_attribute_values(":e", n(expires))
                    .expression_attribute_values(":x", n(expires / 1000 + 3600))
                    .expression_attribute_values(":now", n(now));
                async move {
                    if !first {
                        return Ok(false);
                    }
                    match request.send().await {
                        Ok(_) => Ok(true),
                        Err(e) if is_condition_failed(&e) => Ok(false),
                        Err(e) => Err(dynamo_err("UpdateItem (lock)", e)),
                    }
                }
            })
            .collect();
        // A bounded number in flight: a batch's hundreds of new leads are not hundreds of
        // requests at once.
        overlapped(takes).await.into_iter().collect()
    }

    async fn unlock(&self, keys: &[String], ttl_ms: i64, now: Millis) -> Result<(), StateError> {
        let unique: std::collections::BTreeSet<&String> = keys.iter().collect();
        let frees: Vec<_> = unique
            .into_iter()
            .map(|key| {
                self.count_write();
                let request = self
                    .client
                    .update_item()
                    .table_name(&*self.table)
                    .key("pk", s(format!("lock#{key}")))
                    .update_expression("SET expires = :zero")
                    .condition_expression("expires = :e")
                    .expression_attribute_values(":zero", n(0))
                    .expression_attribute_values(":e", n(now + ttl_ms));
                async move {
                    match request.send().await {
                        Ok(_) => Ok(()),
                        Err(e) if is_condition_failed(&e) => Ok(()),
                        Err(e) => Err(dynamo_err("UpdateItem (unlock)", e)),
                    }
                }
            })
            .collect();
        overlapped(frees).await.into_iter().collect()
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
        let minutes: Vec<i64> = (minute_of(since)..=minute_of(until)).collect();
        let mut total = 0u64;
        for chunk in minutes.chunks(100) {
            let mut keys = KeysAndAttributes::builder();
            for m in chunk {
                keys = keys.keys(HashMap::from([("pk".to_owned(), s(format!("done#{m}")))]));
            }
            let mut request: HashMap<String, KeysAndAttributes> = HashMap::from([(
                self.table.to_string(),
                keys.build().map_err(|e| StateError::Dynamo {
                    operation: "BatchGetItem (completions)",
                    message: e.to_string(),
                    retryable: false,
                })?,
            )]);
            // BatchGetItem may return some keys unprocessed; ask again for those.
            while !request.is_empty() {
                let out = self
                    .client
                    .batch_get_item()
                    .set_request_items(Some(request))
                    .send()
                    .await
                    .map_err(|e| dynamo_err("BatchGetItem (completions)", e))?;
                for items in out.responses.unwrap_or_default().into_values() {
                    total += items.iter().filter_map(|i| get_n(i, "n")).sum::<i64>() as u64;
                }
                request = out.unprocessed_keys.unwrap_or_default();
            }
        }
        Ok(total)
    }

    async fn add_marketo_calls(&self, day: &str, calls: u64) -> Result<u64, StateError> {
        self.count_write();
        let out = self
            .client
            .update_item()
            .table_name(&*self.table)
            .key("pk", s(format!("calls#{day}")))
            .update_expression("ADD n :c")
            .expression_attribute_values(":c", n(calls))
            // All of the item: adding 0 changes nothing, and moto then returns no updated `n`.
            .return_values(ReturnValue::AllNew)
            .send()
            .await
            .map_err(|e| dynamo_err("UpdateItem (Marketo calls)", e))?;
        Ok(out.attributes.as_ref().and_then(|a| get_n(a, "n")).unwrap_or(0) as u64)
    }

    async fn take_marketo_call(&self, day: &str, budget: u64) -> Result<Option<u64>, StateError> {
        self.count_write();
        let out = self
            .client
            .update_item()
            .table_name(&*self.table)
            .key("pk", s(format!("calls#{day}")))
            .update_expression("ADD n :one")
            .condition_expression("attribute_not_exists(n) OR n < :budget")
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":budget", n(budget))
            .return_values(ReturnValue::UpdatedNew)
            .send()
            .await;
        match out {
            Ok(out) => Ok(Some(
                out.attributes.as_ref().and_then(|a| get_n(a, "n")).unwrap_or(0) as u64
            )),
            Err(e) if e.code() == Some("ConditionalCheckFailedException") => Ok(None),
            Err(e) => Err(dynamo_err("UpdateItem (Marketo calls)", e)),
        }
    }

    async fn join_budget(&self, member: &str, until: Millis, now: Millis) -> Result<u32, StateError> {
        self.join_members(member, until, now).await
    }

    async fn leave_budget(&self, member: &str) -> Result<(), StateError> {
        self.leave_members(member).await
    }

    async fn marketo_calls(&self, day: &str) -> Result<u64, StateError> {
        let out = self
            .client
            .get_item()
            .table_name(&*self.table)
            .key("pk", s(format!("calls#{day}")))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| dynamo_err("GetItem (Marketo calls)", e))?;
        Ok(out.item.as_ref().and_then(|i| get_n(i, "n")).unwrap_or(0) as u64)
    }

    async fn remember_links(&self, links: &[(String, OpportunityId)]) -> Result<(), StateError> {
        self.put_links(links).await
    }

    async fn linked_opportunities(&self, connections: &[String]) -> Result<Vec<OpportunityId>, StateError> {
        self.get_links(connections).await
    }

    async fn record_run(&self, run: &Run, keep_ms: i64) -> Result<(), StateError> {
        let json = serde_json::to_string(run).map_err(|e| StateError::Corrupt {
            key: "run".into(),
            reason: e.to_string(),
        })?;
        self.count_write();
        // In the sparse index under `q = run`, newest last by `since`; the table's TTL removes
        // it after its time. An update that creates its item: every function's role may update.
        self.client
            .update_item()
            .table_name(&*self.table)
            .key("pk", s(format!("run#{:013}#{:x}", run.started.max(0), new_token())))
            .update_expression("SET q = :q, since = :since, run_json = :run, expire_at_s = :expire")
            .expression_attribute_values(":q", s(RUN_QUEUE))
            .expression_attribute_values(":since", n(run.started))
            .expression_attribute_values(":run", s(json))
            .expression_attribute_values(":expire", n(run.ended.saturating_add(keep_ms) / 1000))
            .send()
            .await
            .map_err(|e| dynamo_err("UpdateItem (run)", e))?;
        Ok(())
    }

    async fn runs(&self, limit: usize, now: Millis) -> Result<Vec<Run>, StateError> {
        let mut out = Vec::new();
        let mut start = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&*self.table)
                .index_name(OPEN_INDEX)
                .key_condition_expression("q = :q")
                .expression_attribute_values(":q", s(RUN_QUEUE))
                .scan_index_forward(false)
                .limit(limit.clamp(1, 1000) as i32)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| dynamo_err("Query (runs)", e))?;
            for item in page.items.unwrap_or_default() {
                // The TTL removes expired items within days, not at once.
                if get_n(&item, "expire_at_s").is_some_and(|at| at < now / 1000) {
                    continue;
                }
                let text = get_s(&item, "run_json").unwrap_or_default();
                out.push(serde_json::from_str(text).map_err(|e| StateError::Corrupt {
                    key: "run".into(),
                    reason: e.to_string(),
                })?);
                if out.len() >= limit {
                    return Ok(out);
                }
            }
            match page.last_evaluated_key {
                Some(key) => start = Some(key),
                None => return Ok(out),
            }
        }
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
