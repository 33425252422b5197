//! The ledgers beside the opportunity items, each a table of its own: completions per minute,
//! the day's Marketo calls, the budget's members, connection links, remembered leads and the
//! run history. The [`StateStore`] methods of the same capabilities call these.

use super::*;

impl SqliteStore {
    pub(super) async fn completions_between(&self, since: Millis, until: Millis) -> Result<u64, StateError> {
        self.run(move |c| {
            let n: i64 = c
                .query_row(
                    "SELECT COALESCE(SUM(n), 0) FROM completions WHERE minute BETWEEN ?1 AND ?2",
                    params![minute_of(since), minute_of(until)],
                    |r| r.get(0),
                )
                .map_err(sql)?;
            Ok(n as u64)
        })
        .await
    }
    pub(super) async fn count_calls(&self, day: &str, calls: u64) -> Result<u64, StateError> {
        let day = day.to_owned();
        self.run(move |c| {
            let n: i64 = c
                .query_row(
                    "INSERT INTO marketo_calls (day, n) VALUES (?1, ?2)
                     ON CONFLICT (day) DO UPDATE SET n = n + excluded.n RETURNING n",
                    params![day, calls as i64],
                    |r| r.get(0),
                )
                .map_err(sql)?;
            Ok(n as u64)
        })
        .await
    }
    pub(super) async fn take_call(&self, day: &str, budget: u64) -> Result<Option<u64>, StateError> {
        let day = day.to_owned();
        self.run(move |c| {
            // The update's WHERE refuses the call once the budget is spent: no row comes back.
            let n: Option<i64> = c
                .query_row(
                    "INSERT INTO marketo_calls (day, n) VALUES (?1, 1)
                     ON CONFLICT (day) DO UPDATE SET n = n + 1 WHERE n < ?2 RETURNING n",
                    // SQLite integers are signed: an unlimited budget is the largest one.
                    params![day, i64::try_from(budget).unwrap_or(i64::MAX)],
                    |r| r.get(0),
                )
                .optional()
                .map_err(sql)?;
            Ok(n.map(|n| n as u64).filter(|n| *n <= budget))
        })
        .await
    }
    pub(super) async fn join_members(&self, member: &str, until: Millis, now: Millis) -> Result<u32, StateError> {
        let member = member.to_owned();
        self.run(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql)?;
            tx.execute(
                "INSERT OR REPLACE INTO budget_members (member, until) VALUES (?1, ?2)",
                params![member, until],
            )
            .map_err(sql)?;
            tx.execute("DELETE FROM budget_members WHERE until <= ?1", params![now])
                .map_err(sql)?;
            let live: i64 = tx
                .query_row("SELECT COUNT(*) FROM budget_members", [], |r| r.get(0))
                .map_err(sql)?;
            tx.commit().map_err(sql)?;
            Ok(live.max(1) as u32)
        })
        .await
    }
    pub(super) async fn leave_members(&self, member: &str) -> Result<(), StateError> {
        let rows = vec![vec![SqlValue::Text(member.to_owned())]];
        self.execute_all("DELETE FROM budget_members WHERE member = ?1", rows)
            .await
    }
    pub(super) async fn calls_on(&self, day: &str) -> Result<u64, StateError> {
        let day = day.to_owned();
        self.run(move |c| {
            let n: Option<i64> = c
                .query_row("SELECT n FROM marketo_calls WHERE day = ?1", params![day], |r| r.get(0))
                .optional()
                .map_err(sql)?;
            Ok(n.unwrap_or(0) as u64)
        })
        .await
    }
    pub(super) async fn put_links(&self, links: &[(String, OpportunityId)]) -> Result<(), StateError> {
        let rows: Vec<Vec<SqlValue>> = links
            .iter()
            .map(|(c, o)| vec![SqlValue::Text(c.to_ascii_lowercase()), SqlValue::Text(o.to_string())])
            .collect();
        self.execute_all(
            "INSERT OR REPLACE INTO links (connection, opportunity) VALUES (?1, ?2)",
            rows,
        )
        .await
    }
    pub(super) async fn get_links(&self, connections: &[String]) -> Result<Vec<OpportunityId>, StateError> {
        let connections: Vec<String> = connections.iter().map(|c| c.to_ascii_lowercase()).collect();
        self.run(move |c| {
            let mut stmt = c
                .prepare_cached("SELECT opportunity FROM links WHERE connection = ?1")
                .map_err(sql)?;
            let mut out = std::collections::BTreeSet::new();
            for connection in &connections {
                let found: Option<String> = stmt
                    .query_row(params![connection], |r| r.get(0))
                    .optional()
                    .map_err(sql)?;
                if let Some(text) = found {
                    out.insert(
                        OpportunityId::parse(&text)
                            .map_err(|e| corrupt(format!("link {connection}"), e.to_string()))?,
                    );
                }
            }
            Ok(out.into_iter().collect())
        })
        .await
    }
    pub(super) async fn put_leads(&self, leads: &[(String, i64)]) -> Result<(), StateError> {
        let rows: Vec<Vec<SqlValue>> = leads
            .iter()
            .map(|(k, id)| vec![SqlValue::Text(k.clone()), SqlValue::Integer(*id)])
            .collect();
        self.execute_all("INSERT OR REPLACE INTO leads (key, lead_id) VALUES (?1, ?2)", rows)
            .await
    }
    pub(super) async fn get_leads(&self, keys: &[String]) -> Result<HashMap<String, i64>, StateError> {
        let keys = keys.to_vec();
        self.run(move |c| {
            let mut stmt = c
                .prepare_cached("SELECT lead_id FROM leads WHERE key = ?1")
                .map_err(sql)?;
            let mut out = HashMap::new();
            for key in keys {
                let found: Option<i64> = stmt.query_row(params![key], |r| r.get(0)).optional().map_err(sql)?;
                if let Some(id) = found {
                    out.insert(key, id);
                }
            }
            Ok(out)
        })
        .await
    }
    pub(super) async fn delete_leads(&self, keys: &[String]) -> Result<(), StateError> {
        let rows: Vec<Vec<SqlValue>> = keys.iter().map(|k| vec![SqlValue::Text(k.clone())]).collect();
        self.execute_all("DELETE FROM leads WHERE key = ?1", rows).await
    }
    pub(super) async fn put_run(&self, run: &Run, keep_ms: i64) -> Result<(), StateError> {
        let json = serde_json::to_string(run).map_err(|e| StateError::Corrupt {
            key: "run".into(),
            reason: e.to_string(),
        })?;
        let (started, ended) = (run.started, run.ended);
        self.in_transaction(move |t| {
            t.execute("DELETE FROM runs WHERE keep_until < ?1", params![ended])
                .map_err(sql)?;
            t.execute(
                "INSERT INTO runs (started, keep_until, run) VALUES (?1, ?2, ?3)",
                params![started, ended.saturating_add(keep_ms), json],
            )
            .map_err(sql)?;
            Ok(())
        })
        .await
    }
    pub(super) async fn get_runs(&self, limit: usize, now: Millis) -> Result<Vec<Run>, StateError> {
        self.run(move |c| {
            let mut stmt = match c
                .prepare("SELECT run FROM runs WHERE keep_until >= ?1 ORDER BY started DESC, id DESC LIMIT ?2")
            {
                Ok(stmt) => stmt,
                // A file an older oppsync wrote, opened read-only, has no run history yet.
                Err(e) if e.to_string().contains("no such table") => return Ok(Vec::new()),
                Err(e) => return Err(sql(e)),
            };
            let rows = stmt
                .query_map(params![now, limit as i64], |r| r.get::<_, String>(0))
                .map_err(sql)?;
            let mut out = Vec::new();
            for row in rows {
                let text = row.map_err(sql)?;
                out.push(serde_json::from_str(&text).map_err(|e| StateError::Corrupt {
                    key: "run".into(),
                    reason: e.to_string(),
                })?);
            }
            Ok(out)
        })
        .await
    }
}
