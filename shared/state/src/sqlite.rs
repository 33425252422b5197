//! The embedded store: one SQLite file in WAL mode, for local runs (`oppsync sync`, the demo).
//!
//! Each trait method is one SQLite transaction on one connection behind a mutex, so every guard
//! holds within the process; WAL lets `oppsync status` read while a sync writes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use oppsync_mapping::OpportunityId;
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use crate::{
    Claim, Completion, Counts, Cursor, Lease, MarkOutcome, Millis, OpportunityState, Page, PendingChange, Source,
    StateError, StateStore, Status, SyncError, TransformResult, WriteResult, Written, minute_of, new_token,
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS cursors (
    source TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY, owner TEXT NOT NULL, token INTEGER NOT NULL, expires_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS opportunities (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    version INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    modified_on TEXT,
    plan TEXT,
    written TEXT,
    written_version INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    err_operation TEXT, err_code TEXT, err_message TEXT,
    claim_token INTEGER, claim_until INTEGER,
    created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL, status_since INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS opportunities_by_status ON opportunities (status, status_since, id);
CREATE TABLE IF NOT EXISTS completions (minute INTEGER PRIMARY KEY, n INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS marketo_calls (day TEXT PRIMARY KEY, n INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS links (connection TEXT PRIMARY KEY, opportunity TEXT NOT NULL);
";

const COLUMNS: &str = "id, status, version, deleted, modified_on, plan, written, attempts, \
     err_operation, err_code, err_message, claim_until, created_at, updated_at, status_since";

/// The SQLite store. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    path: Arc<PathBuf>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the state file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StateError> {
        let path = path.as_ref().to_path_buf();
        let err = |e: rusqlite::Error| StateError::Sqlite {
            path: path.display().to_string(),
            message: format!(
                "{e}; check that the directory exists and is writable, or choose another file with --state"
            ),
        };
        let conn = Connection::open(&path).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            path: Arc::new(path),
        })
    }

    /// Frees the claims and the leases that a process which died left behind, so that work
    /// resumes at once instead of when they expire. Only for a caller that knows no other
    /// process uses this file: the `oppsync` command holds an OS lock on it first. Lease tokens
    /// keep counting, so fencing still holds. Returns how many claims were freed.
    pub async fn release_abandoned(&self) -> Result<u64, StateError> {
        self.run(|c| {
            let freed = c
                .execute(
                    "UPDATE opportunities SET claim_until = NULL WHERE claim_until IS NOT NULL",
                    [],
                )
                .map_err(sql)?;
            c.execute("UPDATE leases SET expires_at = 0", []).map_err(sql)?;
            Ok(freed as u64)
        })
        .await
    }

    /// Runs `f` on the connection on the blocking pool.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StateError> + Send + 'static,
    ) -> Result<T, StateError> {
        let conn = Arc::clone(&self.conn);
        let path = Arc::clone(&self.path);
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock poisons it; the connection itself is still sound,
            // since every step is a transaction that rolled back.
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| StateError::Sqlite {
            path: path.display().to_string(),
            message: format!("the store task stopped: {e}"),
        })?
    }
}

fn sql(e: rusqlite::Error) -> StateError {
    StateError::Sqlite {
        path: String::new(),
        message: e.to_string(),
    }
}

fn corrupt(key: impl Into<String>, reason: impl std::fmt::Display) -> StateError {
    StateError::Corrupt {
        key: key.into(),
        reason: reason.to_string(),
    }
}

fn read_state(row: &Row<'_>) -> Result<OpportunityState, StateError> {
    let id: String = row.get(0).map_err(sql)?;
    let status: String = row.get(1).map_err(sql)?;
    let plan: Option<String> = row.get(5).map_err(sql)?;
    let written: Option<String> = row.get(6).map_err(sql)?;
    let error_code: Option<String> = row.get(9).map_err(sql)?;
    Ok(OpportunityState {
        id: OpportunityId::parse(&id).map_err(|e| corrupt(&id, e))?,
        status: Status::parse(&status).ok_or_else(|| corrupt(&id, format!("unknown status `{status}`")))?,
        version: row.get(2).map_err(sql)?,
        deleted: row.get(3).map_err(sql)?,
        modified_on: row.get(4).map_err(sql)?,
        plan: plan
            .map(|p| serde_json::from_str(&p))
            .transpose()
            .map_err(|e| corrupt(&id, e))?,
        written: written
            .map(|w| serde_json::from_str(&w))
            .transpose()
            .map_err(|e| corrupt(&id, e))?,
        attempts: row.get(7).map_err(sql)?,
        last_error: match error_code {
            Some(code) => Some(SyncError {
                operation: row.get::<_, Option<String>>(8).map_err(sql)?.unwrap_or_default(),
                code,
                message: row.get::<_, Option<String>>(10).map_err(sql)?.unwrap_or_default(),
            }),
            None => None,
        },
        claim_until: row.get(11).map_err(sql)?,
        created_at: row.get(12).map_err(sql)?,
        updated_at: row.get(13).map_err(sql)?,
        status_since: row.get(14).map_err(sql)?,
    })
}

fn get_state(conn: &Connection, id: OpportunityId) -> Result<Option<OpportunityState>, StateError> {
    let mut stmt = conn
        .prepare_cached(&format!("SELECT {COLUMNS} FROM opportunities WHERE id = ?1"))
        .map_err(sql)?;
    let mut rows = stmt.query(params![id.to_string()]).map_err(sql)?;
    match rows.next().map_err(sql)? {
        Some(row) => read_state(row).map(Some),
        None => Ok(None),
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, StateError> {
    serde_json::to_string(value).map_err(|e| corrupt("a value to store", e))
}

fn count_completion(conn: &Connection, now: Millis) -> Result<(), StateError> {
    conn.execute(
        "INSERT INTO completions (minute, n) VALUES (?1, 1) ON CONFLICT (minute) DO UPDATE SET n = n + 1",
        params![minute_of(now)],
    )
    .map_err(sql)?;
    Ok(())
}

/// Records `written` unless a newer write is already recorded.
fn record_written(conn: &Connection, id: &str, written: &Written) -> Result<(), StateError> {
    conn.execute(
        "UPDATE opportunities SET written = ?2, written_version = ?3
         WHERE id = ?1 AND (written_version IS NULL OR written_version <= ?3)",
        params![id, to_json(written)?, written.version],
    )
    .map_err(sql)?;
    Ok(())
}

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
                let mut stmt = tx
                    .prepare_cached(
                        "INSERT INTO opportunities (id, status, version, deleted, modified_on, attempts,
                             created_at, updated_at, status_since)
                         VALUES (?1, 'pending', ?2, ?3, ?4, 0, ?5, ?5, ?5)
                         ON CONFLICT (id) DO UPDATE SET
                             status = 'pending', version = excluded.version, deleted = excluded.deleted,
                             modified_on = excluded.modified_on, attempts = 0, err_operation = NULL,
                             err_code = NULL, err_message = NULL, claim_token = NULL, claim_until = NULL,
                             updated_at = excluded.updated_at,
                             status_since = CASE WHEN status = 'pending' THEN status_since ELSE excluded.status_since END
                         WHERE opportunities.version < excluded.version",
                    )
                    .map_err(sql)?;
                for change in &changes {
                    let n = stmt
                        .execute(params![
                            change.id.to_string(),
                            change.version,
                            change.deleted,
                            change.modified_on,
                            now
                        ])
                        .map_err(sql)?;
                    outcomes.push(if n == 1 { MarkOutcome::Recorded } else { MarkOutcome::Stale });
                }
            }
            tx.commit().map_err(sql)?;
            Ok(outcomes)
        })
        .await
    }

    async fn requeue(&self, id: OpportunityId, now: Millis) -> Result<bool, StateError> {
        self.run(move |c| {
            let n = c
                .execute(
                    "UPDATE opportunities SET status = 'pending', claim_token = NULL, claim_until = NULL,
                         attempts = 0, updated_at = ?2, status_since = ?2
                     WHERE id = ?1",
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
        self.run(move |c| {
            let token = new_token();
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql)?;
            let n = tx
                .execute(
                    "UPDATE opportunities SET claim_token = ?3, claim_until = ?4, updated_at = ?5
                     WHERE id = ?1 AND status = ?2 AND (claim_until IS NULL OR claim_until <= ?5)",
                    params![id.to_string(), from.as_str(), token, now + ttl_ms, now],
                )
                .map_err(sql)?;
            let result = if n == 1 {
                let state =
                    get_state(&tx, id)?.ok_or_else(|| corrupt(id.to_string(), "vanished inside a transaction"))?;
                Some((
                    Claim {
                        id,
                        version: state.version,
                        token,
                        until: now + ttl_ms,
                    },
                    state,
                ))
            } else {
                None
            };
            tx.commit().map_err(sql)?;
            Ok(result)
        })
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
                         claim_token = NULL, claim_until = NULL, updated_at = ?10, status_since = ?10
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
        self.run(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql)?;
            let id = claim.id.to_string();
            let (status, written, error) = result.parts();
            let attempts_delta = error.map(|_| 1);
            if let Some(w) = written {
                record_written(&tx, &id, w)?;
            }
            let n = tx
                .execute(
                    "UPDATE opportunities SET status = ?4,
                         attempts = CASE WHEN ?5 IS NULL THEN 0 ELSE attempts + ?5 END,
                         err_operation = ?6, err_code = ?7, err_message = ?8,
                         claim_token = NULL, claim_until = NULL, updated_at = ?9,
                         status_since = CASE WHEN status = ?4 THEN status_since ELSE ?9 END
                     WHERE id = ?1 AND claim_token = ?2 AND version = ?3",
                    params![
                        id,
                        claim.token,
                        claim.version,
                        status.as_str(),
                        attempts_delta,
                        error.map(|e| e.operation.clone()),
                        error.map(|e| e.code.clone()),
                        error.map(|e| e.message.clone()),
                        now
                    ],
                )
                .map_err(sql)?;
            if n == 1 && matches!(status, Status::Synced | Status::Deleted) {
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

    async fn add_marketo_calls(&self, day: &str, calls: u64) -> Result<u64, StateError> {
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

    async fn marketo_calls(&self, day: &str) -> Result<u64, StateError> {
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

    async fn remember_links(&self, links: &[(String, OpportunityId)]) -> Result<(), StateError> {
        let links: Vec<(String, String)> = links
            .iter()
            .map(|(c, o)| (c.to_ascii_lowercase(), o.to_string()))
            .collect();
        self.run(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql)?;
            {
                let mut stmt = tx
                    .prepare_cached("INSERT OR REPLACE INTO links (connection, opportunity) VALUES (?1, ?2)")
                    .map_err(sql)?;
                for (connection, opportunity) in &links {
                    stmt.execute(params![connection, opportunity]).map_err(sql)?;
                }
            }
            tx.commit().map_err(sql)
        })
        .await
    }

    async fn linked_opportunities(&self, connections: &[String]) -> Result<Vec<OpportunityId>, StateError> {
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
}
