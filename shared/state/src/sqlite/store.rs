//! [`StateStore`] on SQLite: each method one transaction, the same guards as DynamoDB's
//! conditional writes.

use super::*;
use steps::{claim_in, complete_write_in};

/// Back to pending at the current version, unclaimed, its wait and attempts reset; Dynamics is
/// read again, so a restored record is written and a missing one deleted. `?3` sets `rewrite`.
const REQUEUE: &str = "UPDATE opportunities SET status = 'pending', deleted = 0, claim_token = NULL,
         claim_until = NULL, retry_at = NULL, attempts = 0, rewrite = MAX(rewrite, ?3), updated_at = ?2,
         status_since = ?2
     WHERE id = ?1";

impl StateStore for SqliteStore {
    async fn cursor(&self, source: Source) -> Result<Option<Cursor>, StateError> {
        self.run(move |c| {
            c.query_row(
                "SELECT value, updated_at FROM cursors WHERE source = ?1",
                params![source.as_str()],
                |r| {
                    Ok(Cursor {
                        value: r.get(0)?,
                        updated_at: r.get(1)?,
                    })
                },
            )
            .optional()
            .map_err(sql)
        })
        .await
    }

    async fn advance_cursor(&self, lease: &Lease, source: Source, value: &str, now: Millis) -> Result<(), StateError> {
        let (lease, value) = (lease.clone(), value.to_owned());
        self.run(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql)?;
            let held: bool = tx
                .query_row(
                    "SELECT EXISTS (SELECT 1 FROM leases WHERE name = ?1 AND token = ?2 AND expires_at > ?3)",
                    params![lease.name, lease.token, now],
                    |r| r.get(0),
                )
                .map_err(sql)?;
            if !held {
                return Err(StateError::LeaseLost(lease.name));
            }
            tx.execute(
                "INSERT INTO cursors (source, value, updated_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (source) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                params![source.as_str(), value, now],
            )
            .map_err(sql)?;
            tx.commit().map_err(sql)
        })
        .await
    }

    async fn acquire_lease(
        &self,
        name: &str,
        owner: &str,
        ttl_ms: i64,
        now: Millis,
    ) -> Result<Option<Lease>, StateError> {
        let (name, owner) = (name.to_owned(), owner.to_owned());
        self.run(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql)?;
            let changed = tx
                .execute(
                    "INSERT INTO leases (name, owner, token, expires_at) VALUES (?1, ?2, 1, ?3)
                     ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, token = token + 1,
                         expires_at = excluded.expires_at
                     WHERE leases.expires_at <= ?4",
                    params![name, owner, now + ttl_ms, now],
                )
                .map_err(sql)?;
            let lease = if changed == 1 {
                let token: i64 = tx
                    .query_row("SELECT token FROM leases WHERE name = ?1", params![name], |r| r.get(0))
                    .map_err(sql)?;
                Some(Lease {
                    name,
                    owner,
                    token,
                    expires_at: now + ttl_ms,
                })
            } else {
                None
            };
            tx.commit().map_err(sql)?;
            Ok(lease)
        })
        .await
    }

    async fn renew_lease(&self, lease: &Lease, ttl_ms: i64, now: Millis) -> Result<Option<Lease>, StateError> {
        let lease = lease.clone();
        self.run(move |c| {
            let changed = c
                .execute(
                    "UPDATE leases SET expires_at = ?3 WHERE name = ?1 AND token = ?2 AND expires_at > ?4",
                    params![lease.name, lease.token, now + ttl_ms, now],
                )
                .map_err(sql)?;
            Ok((changed == 1).then(|| Lease {
                expires_at: now + ttl_ms,
                ..lease
            }))
        })
        .await
    }

    async fn release_lease(&self, lease: &Lease) -> Result<(), StateError> {
        let lease = lease.clone();
        self.run(move |c| {
            c.execute(
                "UPDATE leases SET expires_at = 0 WHERE name = ?1 AND token = ?2",
                params![lease.name, lease.token],
            )
            .map_err(sql)?;
            Ok(())
        })
        .await
    }

    async fn mark_pending(&self, changes: &[PendingChange], now: Millis) -> Result<Vec<MarkOutcome>, StateError> {
        let changes = changes.to_vec();
        self.run(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql)?;
            let mut outcomes = Vec::with_capacity(changes.len());
            {
                // Insert, or move to pending only when the version is newer: the guard is in the
                // statement itself.
                // A change applies when its version is newer; a deletion (a flag, its version
                // kept) when the record is not already deleted.
                let mut upsert = tx
                    .prepare_cached(
                        "INSERT INTO opportunities (id, status, version, deleted, modified_on, attempts,
                             created_at, updated_at, status_since)
                         VALUES (?1, 'pending', ?2, 0, ?3, 0, ?4, ?4, ?4)
                         ON CONFLICT (id) DO UPDATE SET
                             status = 'pending', version = excluded.version, deleted = 0,
                             modified_on = excluded.modified_on, attempts = 0, err_operation = NULL,
                             err_code = NULL, err_message = NULL, claim_token = NULL, claim_until = NULL,
                             retry_at = NULL, updated_at = excluded.updated_at,
                             status_since = CASE WHEN status = 'pending' THEN status_since ELSE excluded.status_since END
                         WHERE opportunities.version < excluded.version",
                    )
                    .map_err(sql)?;
                let mut delete = tx
                    .prepare_cached(
                        "INSERT INTO opportunities (id, status, version, deleted, modified_on, attempts,
                             created_at, updated_at, status_since)
                         VALUES (?1, 'pending', 0, 1, NULL, 0, ?2, ?2, ?2)
                         ON CONFLICT (id) DO UPDATE SET
                             status = 'pending', deleted = 1, modified_on = NULL, attempts = 0,
                             err_operation = NULL, err_code = NULL, err_message = NULL, claim_token = NULL,
                             claim_until = NULL, retry_at = NULL, updated_at = excluded.updated_at,
                             status_since = CASE WHEN status = 'pending' THEN status_since ELSE excluded.status_since END
                         WHERE opportunities.deleted = 0",
                    )
                    .map_err(sql)?;
                for change in &changes {
                    let n = if change.deleted {
                        delete.execute(params![change.id.to_string(), now])
                    } else {
                        upsert.execute(params![change.id.to_string(), change.version, change.modified_on, now])
                    }
                    .map_err(sql)?;
                    outcomes.push(if n == 1 { MarkOutcome::Recorded } else { MarkOutcome::Stale });
                }
            }
            tx.commit().map_err(sql)?;
            Ok(outcomes)
        })
        .await
    }

    async fn requeue(&self, id: OpportunityId, rewrite: bool, now: Millis) -> Result<bool, StateError> {
        self.run(move |c| {
            let n = c.execute(REQUEUE, params![id.to_string(), now, rewrite]).map_err(sql)?;
            Ok(n == 1)
        })
        .await
    }

    async fn requeue_claimed(
        &self,
        id: OpportunityId,
        ttl_ms: i64,
        now: Millis,
    ) -> Result<Option<(Claim, OpportunityState)>, StateError> {
        self.run(move |c| {
            let token = new_token();
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql)?;
            let n = tx.execute(REQUEUE, params![id.to_string(), now, true]).map_err(sql)?;
            if n == 0 {
                return Ok(None);
            }
            tx.execute(
                "UPDATE opportunities SET claim_token = ?2, claim_until = ?3 WHERE id = ?1",
                params![id.to_string(), token, now + ttl_ms],
            )
            .map_err(sql)?;
            let state = get_state(&tx, id)?.ok_or_else(|| corrupt(id.to_string(), "vanished inside a transaction"))?;
            tx.commit().map_err(sql)?;
            Ok(Some((
                Claim {
                    id,
                    version: state.version,
                    token,
                    until: now + ttl_ms,
                },
                state,
            )))
        })
        .await
    }

    async fn renew_claim(&self, claim: &Claim, ttl_ms: i64, now: Millis) -> Result<Option<Claim>, StateError> {
        let claim = claim.clone();
        self.run(move |c| {
            let n = c
                .execute(
                    "UPDATE opportunities SET claim_until = ?4, updated_at = ?5
                     WHERE id = ?1 AND claim_token = ?2 AND version = ?3",
                    params![claim.id.to_string(), claim.token, claim.version, now + ttl_ms, now],
                )
                .map_err(sql)?;
            Ok((n == 1).then(|| Claim {
                until: now + ttl_ms,
                ..claim
            }))
        })
        .await
    }

    async fn record_planned(
        &self,
        claim: &Claim,
        roles: &[WrittenRole],
        ttl_ms: i64,
        now: Millis,
    ) -> Result<Option<Claim>, StateError> {
        let (claim, planned) = (claim.clone(), to_json(&roles)?);
        self.run(move |c| {
            let n = c
                .execute(
                    "UPDATE opportunities SET planned = ?4, claim_until = ?5, updated_at = ?6
                     WHERE id = ?1 AND claim_token = ?2 AND version = ?3",
                    params![
                        claim.id.to_string(),
                        claim.token,
                        claim.version,
                        planned,
                        now + ttl_ms,
                        now
                    ],
                )
                .map_err(sql)?;
            Ok((n == 1).then(|| Claim {
                until: now + ttl_ms,
                ..claim
            }))
        })
        .await
    }

    async fn lock(&self, keys: &[String], ttl_ms: i64, now: Millis) -> Result<Vec<bool>, StateError> {
        let keys = keys.to_vec();
        self.run(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql)?;
            // Expired locks are dropped as new ones are taken: the table holds only live ones.
            tx.execute("DELETE FROM locks WHERE expires_at <= ?1", params![now])
                .map_err(sql)?;
            let mut taken = Vec::with_capacity(keys.len());
            {
                let mut insert = tx
                    .prepare_cached("INSERT INTO locks (key, expires_at) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING")
                    .map_err(sql)?;
                for key in &keys {
                    taken.push(insert.execute(params![key, now + ttl_ms]).map_err(sql)? == 1);
                }
            }
            tx.commit().map_err(sql)?;
            Ok(taken)
        })
        .await
    }

    async fn unlock(&self, keys: &[String], ttl_ms: i64, now: Millis) -> Result<(), StateError> {
        let keys = keys.to_vec();
        self.run(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql)?;
            {
                let mut delete = tx
                    .prepare_cached("DELETE FROM locks WHERE key = ?1 AND expires_at = ?2")
                    .map_err(sql)?;
                for key in &keys {
                    delete.execute(params![key, now + ttl_ms]).map_err(sql)?;
                }
            }
            tx.commit().map_err(sql)
        })
        .await
    }

    async fn release(&self, claim: &Claim, now: Millis) -> Result<(), StateError> {
        let claim = claim.clone();
        self.run(move |c| {
            c.execute(
                "UPDATE opportunities SET claim_token = NULL, claim_until = NULL, updated_at = ?3
                 WHERE id = ?1 AND claim_token = ?2",
                params![claim.id.to_string(), claim.token, now],
            )
            .map_err(sql)?;
            Ok(())
        })
        .await
    }

    async fn wake(&self, id: OpportunityId, now: Millis) -> Result<bool, StateError> {
        self.run(move |c| {
            let n = c
                .execute(
                    "UPDATE opportunities SET retry_at = NULL, updated_at = ?2
                     WHERE id = ?1 AND status = 'ready' AND retry_at <= ?2
                       AND (claim_until IS NULL OR claim_until <= ?2)",
                    params![id.to_string(), now],
                )
                .map_err(sql)?;
            Ok(n == 1)
        })
        .await
    }

    async fn claim(
        &self,
        id: OpportunityId,
        from: Status,
        ttl_ms: i64,
        now: Millis,
    ) -> Result<Option<(Claim, OpportunityState)>, StateError> {
        self.in_transaction(move |tx| claim_in(tx, id, from, ttl_ms, now)).await
    }

    /// One transaction for them all ([`SqliteStore::each_in_transaction`]).
    async fn claim_many(
        &self,
        ids: Vec<OpportunityId>,
        from: Status,
        ttl_ms: i64,
        now: Millis,
    ) -> Vec<Result<Option<(Claim, OpportunityState)>, StateError>> {
        self.each_in_transaction(ids, move |tx, id| claim_in(tx, id, from, ttl_ms, now))
            .await
    }

    async fn complete_transform(
        &self,
        claim: &Claim,
        result: TransformResult,
        now: Millis,
    ) -> Result<Completion, StateError> {
        let claim = claim.clone();
        self.run(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql)?;
            let (status, plan, error) = result.parts();
            let plan = plan.map(to_json).transpose()?;
            let done = !status.is_open();
            let n = tx
                .execute(
                    "UPDATE opportunities SET status = ?4, plan = COALESCE(?5, plan),
                         attempts = attempts + ?6, err_operation = ?7, err_code = ?8, err_message = ?9,
                         claim_token = NULL, claim_until = NULL, retry_at = NULL, updated_at = ?10,
                         status_since = ?10
                     WHERE id = ?1 AND claim_token = ?2 AND version = ?3",
                    params![
                        claim.id.to_string(),
                        claim.token,
                        claim.version,
                        status.as_str(),
                        plan,
                        i64::from(error.is_some()),
                        error.map(|e| e.operation.clone()),
                        error.map(|e| e.code.clone()),
                        error.map(|e| e.message.clone()),
                        now
                    ],
                )
                .map_err(sql)?;
            if n == 1 && done {
                count_completion(&tx, now)?;
            }
            tx.commit().map_err(sql)?;
            Ok(if n == 1 {
                Completion::Completed
            } else {
                Completion::Superseded
            })
        })
        .await
    }

    async fn complete_write(&self, claim: &Claim, result: WriteResult, now: Millis) -> Result<Completion, StateError> {
        let claim = claim.clone();
        self.in_transaction(move |tx| complete_write_in(tx, &claim, result, now))
            .await
    }

    /// One transaction for them all ([`SqliteStore::each_in_transaction`]).
    async fn complete_writes(
        &self,
        writes: Vec<(Claim, WriteResult)>,
        now: Millis,
    ) -> Vec<Result<Completion, StateError>> {
        self.each_in_transaction(writes, move |tx, (claim, result)| {
            complete_write_in(tx, &claim, result, now)
        })
        .await
    }

    async fn get(&self, id: OpportunityId) -> Result<Option<OpportunityState>, StateError> {
        self.run(move |c| get_state(c, id)).await
    }

    async fn list(
        &self,
        status: Status,
        limit: usize,
        page: Option<&str>,
    ) -> Result<Page<OpportunityState>, StateError> {
        let after = match page {
            None => None,
            Some(token) => {
                let (since, id) = token
                    .split_once('/')
                    .and_then(|(s, i)| Some((s.parse::<i64>().ok()?, i.to_owned())))
                    .ok_or_else(|| StateError::BadPageToken(token.to_owned()))?;
                Some((since, id))
            }
        };
        let limit = limit.clamp(1, 10_000);
        self.run(move |c| {
            let (since, id) = after.unwrap_or((i64::MIN, String::new()));
            let mut stmt = c
                .prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM opportunities WHERE status = ?1 AND (status_since, id) > (?2, ?3)
                     ORDER BY status_since, id LIMIT ?4"
                ))
                .map_err(sql)?;
            let mut rows = stmt
                .query(params![status.as_str(), since, id, limit as i64 + 1])
                .map_err(sql)?;
            let mut items = Vec::new();
            while let Some(row) = rows.next().map_err(sql)? {
                items.push(read_state(row)?);
            }
            let next = if items.len() > limit {
                items.truncate(limit);
                items.last().map(|s| format!("{}/{}", s.status_since, s.id))
            } else {
                None
            };
            Ok(Page { items, next })
        })
        .await
    }

    async fn counts(&self) -> Result<Counts, StateError> {
        self.run(|c| {
            let mut stmt = c
                .prepare_cached("SELECT status, COUNT(*) FROM opportunities GROUP BY status")
                .map_err(sql)?;
            let mut rows = stmt.query([]).map_err(sql)?;
            let mut counts = Counts::default();
            while let Some(row) = rows.next().map_err(sql)? {
                let status: String = row.get(0).map_err(sql)?;
                let n: i64 = row.get(1).map_err(sql)?;
                let status =
                    Status::parse(&status).ok_or_else(|| corrupt("opportunities", format!("status `{status}`")))?;
                counts.0.insert(status, n as u64);
            }
            Ok(counts)
        })
        .await
    }

    async fn oldest_pending(&self) -> Result<Option<(OpportunityId, Millis)>, StateError> {
        self.run(|c| {
            let row: Option<(String, i64)> = c
                .query_row(
                    "SELECT id, status_since FROM opportunities WHERE status = 'pending'
                     ORDER BY status_since, id LIMIT 1",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(sql)?;
            row.map(|(id, since)| Ok((OpportunityId::parse(&id).map_err(|e| corrupt(&id, e))?, since)))
                .transpose()
        })
        .await
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

    async fn remember_leads(&self, leads: &[(String, i64)]) -> Result<(), StateError> {
        self.put_leads(leads).await
    }

    async fn known_leads(&self, keys: &[String]) -> Result<HashMap<String, i64>, StateError> {
        self.get_leads(keys).await
    }

    async fn forget_leads(&self, keys: &[String]) -> Result<(), StateError> {
        self.delete_leads(keys).await
    }

    async fn record_run(&self, run: &Run, keep_ms: i64) -> Result<(), StateError> {
        self.put_run(run, keep_ms).await
    }

    async fn runs(&self, limit: usize, now: Millis) -> Result<Vec<Run>, StateError> {
        self.get_runs(limit, now).await
    }
}
