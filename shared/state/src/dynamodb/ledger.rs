//! The ledgers beside the opportunity items: completions per minute, the day's Marketo calls and
//! the run history (budget members, links and leads are in `links.rs`). The [`StateStore`]
//! methods of the same capabilities call these.

use super::*;

impl DynamoStore {
    pub(super) async fn completions_between(&self, since: Millis, until: Millis) -> Result<u64, StateError> {
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
    pub(super) async fn count_calls(&self, day: &str, calls: u64) -> Result<u64, StateError> {
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
    pub(super) async fn take_call(&self, day: &str, budget: u64) -> Result<Option<u64>, StateError> {
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
    pub(super) async fn calls_on(&self, day: &str) -> Result<u64, StateError> {
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
    pub(super) async fn put_run(&self, run: &Run, keep_ms: i64) -> Result<(), StateError> {
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
    pub(super) async fn get_runs(&self, limit: usize, now: Millis) -> Result<Vec<Run>, StateError> {
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
}
