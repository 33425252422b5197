//! The embedded store: one SQLite file in WAL mode, for local runs (`oppsync sync`, the demo).
//!
//! Each trait method is one SQLite transaction on one connection behind a mutex, so every guard
//! holds within the process; WAL lets `oppsync status` read while a sync writes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use oppsync_mapping::{OpportunityId, WrittenRole};
use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use crate::{
    Claim, Completion, Counts, Cursor, Lease, MarkOutcome, Millis, OpportunityState, Page, PendingChange, Run, Source,
    StateError, StateStore, Status, SyncError, TransformResult, WriteResult, Written, minute_of, new_token,
};

mod codec;
mod file;
mod ledger;
mod steps;
mod store;

use codec::*;
use file::Found;
pub use file::{FileProblem, SCHEMA_VERSION};

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
    retry_at INTEGER, rewrite INTEGER NOT NULL DEFAULT 0, planned TEXT,
    created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL, status_since INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS opportunities_by_status ON opportunities (status, status_since, id);
CREATE TABLE IF NOT EXISTS completions (minute INTEGER PRIMARY KEY, n INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS marketo_calls (day TEXT PRIMARY KEY, n INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS links (connection TEXT PRIMARY KEY, opportunity TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS locks (key TEXT PRIMARY KEY, expires_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS leads (key TEXT PRIMARY KEY, lead_id INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS budget_members (member TEXT PRIMARY KEY, until INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, started INTEGER NOT NULL, keep_until INTEGER NOT NULL,
    run TEXT NOT NULL);
";

const COLUMNS: &str = "id, status, version, deleted, modified_on, plan, written, attempts, \
     err_operation, err_code, err_message, claim_until, created_at, updated_at, status_since, retry_at, rewrite, planned";

/// Columns added since the first schema, each with its definition: a file written by an older
/// oppsync gains them when it is opened.
const ADDED_COLUMNS: &[(&str, &str)] = &[
    ("retry_at", "INTEGER"),
    ("rewrite", "INTEGER NOT NULL DEFAULT 0"),
    ("planned", "TEXT"),
];

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
    /// Opens the state file at `path` for reading and writing, creating it if there is none.
    /// A file that is not oppsync's, or that a newer oppsync wrote, is refused before anything
    /// in it changes; one an older oppsync wrote is brought up to this schema.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StateError> {
        let path = path.as_ref().to_path_buf();
        let refuse = |problem| StateError::File {
            path: path.display().to_string(),
            problem,
        };
        let found = file::inspect(&path).map_err(refuse)?;
        if let Found::Ours { version } = found {
            if version > SCHEMA_VERSION {
                return Err(refuse(FileProblem::Newer {
                    found: version,
                    known: SCHEMA_VERSION,
                }));
            }
            if std::fs::metadata(&path).is_ok_and(|m| m.permissions().readonly()) {
                return Err(refuse(FileProblem::ReadOnly));
            }
        }
        let conn = Connection::open(&path).map_err(|e| refuse(file::classify(e)))?;
        prepare(&conn, found).map_err(|e| refuse(file::classify(e)))?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            path: Arc::new(path),
        })
    }

    /// Opens oppsync's state file at `path` for reading only: nothing is created or changed
    /// (for `status`, `errors`, `plan`, `validate`). A missing file, another program's, or one
    /// at another schema version is refused with the reason.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Self, StateError> {
        let path = path.as_ref().to_path_buf();
        let refuse = |problem| StateError::File {
            path: path.display().to_string(),
            problem,
        };
        match file::inspect(&path).map_err(refuse)? {
            Found::New => return Err(refuse(FileProblem::Missing)),
            Found::Ours { version } if version > SCHEMA_VERSION => {
                return Err(refuse(FileProblem::Newer {
                    found: version,
                    known: SCHEMA_VERSION,
                }));
            }
            Found::Ours { version } if version < SCHEMA_VERSION => {
                return Err(refuse(FileProblem::Older {
                    found: version,
                    known: SCHEMA_VERSION,
                }));
            }
            Found::Ours { .. } => {}
        }
        let conn = file::open_untouched(&path).map_err(refuse)?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            path: Arc::new(path),
        })
    }

    /// An empty state held in memory only: what a read-only command sees before the first
    /// sync has written a file.
    pub fn empty() -> Result<Self, StateError> {
        let err = |e: rusqlite::Error| StateError::Sqlite {
            path: ":memory:".into(),
            message: e.to_string(),
        };
        let conn = Connection::open_in_memory().map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            path: Arc::new(PathBuf::from(":memory:")),
        })
    }

    /// Frees the claims, leases and locks that a process which died left behind, so that work
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
            // A lead-creation lock a dead run took would hold its records back for a minute;
            // the restarted run creates with `createOnly`, which cannot create a lead twice
            // when no other creation is in flight. A dead run no longer shares the budget.
            c.execute("DELETE FROM locks", []).map_err(sql)?;
            c.execute("DELETE FROM budget_members", []).map_err(sql)?;
            Ok(freed as u64)
        })
        .await
    }

    /// Runs one statement once per row of parameters, all in one transaction.
    async fn execute_all(&self, statement: &'static str, rows: Vec<Vec<SqlValue>>) -> Result<(), StateError> {
        if rows.is_empty() {
            return Ok(());
        }
        self.run(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql)?;
            {
                let mut stmt = tx.prepare_cached(statement).map_err(sql)?;
                for row in rows {
                    stmt.execute(rusqlite::params_from_iter(row)).map_err(sql)?;
                }
            }
            tx.commit().map_err(sql)
        })
        .await
    }

    /// Runs `f` in one immediate transaction on the blocking pool: committed when `f` succeeds,
    /// rolled back when it fails.
    async fn in_transaction<T: Send + 'static>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, StateError> + Send + 'static,
    ) -> Result<T, StateError> {
        self.run(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql)?;
            let out = f(&tx)?;
            tx.commit().map_err(sql)?;
            Ok(out)
        })
        .await
    }

    /// `each` on every item, all in one transaction: on a local file a transaction an item costs
    /// more than the item (a write group's 3,000 claims took about half a second). An error
    /// rolls the whole transaction back, so it is every item's answer.
    async fn each_in_transaction<I: Send + 'static, T: Send + 'static>(
        &self,
        items: Vec<I>,
        each: impl Fn(&rusqlite::Transaction<'_>, I) -> Result<T, StateError> + Send + 'static,
    ) -> Vec<Result<T, StateError>> {
        let n = items.len();
        let done = self
            .in_transaction(move |tx| {
                items
                    .into_iter()
                    .map(|item| each(tx, item))
                    .collect::<Result<Vec<T>, _>>()
            })
            .await;
        match done {
            Ok(out) => out.into_iter().map(Ok).collect(),
            Err(e) => (0..n).map(|_| Err(e.clone())).collect(),
        }
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

/// Makes a new or older file this schema's, marked as oppsync's. The mark is set with the
/// tables, in one transaction, and checkpointed into the main file, so that the file is never
/// left holding oppsync's tables without it.
fn prepare(conn: &Connection, found: Found) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    let current = matches!(found, Found::Ours { version } if version == SCHEMA_VERSION);
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let done = (|| {
        conn.execute_batch(SCHEMA)?;
        add_missing_columns(conn)?;
        if !current {
            conn.pragma_update(None, "application_id", file::APPLICATION_ID)?;
            conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        }
        Ok(())
    })();
    match done {
        Ok(()) => conn.execute_batch("COMMIT")?,
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e);
        }
    }
    if !current {
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    }
    Ok(())
}

/// Brings a state file written by an older oppsync up to this schema (new columns only; rows
/// keep their values and get the column's default).
fn add_missing_columns(conn: &Connection) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info('opportunities')")?;
    let have: Vec<String> = stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
    for (name, definition) in ADDED_COLUMNS {
        if !have.iter().any(|h| h == name) {
            conn.execute_batch(&format!("ALTER TABLE opportunities ADD COLUMN {name} {definition}"))?;
        }
    }
    Ok(())
}
