//! Rows in and out: a row read back into an [`OpportunityState`], JSON columns, SQLite's
//! errors as [`StateError`]s, and the two small writes every completion shares.

use super::*;

pub(super) fn sql(e: rusqlite::Error) -> StateError {
    StateError::Sqlite {
        path: String::new(),
        message: e.to_string(),
    }
}

pub(super) fn corrupt(key: impl Into<String>, reason: impl std::fmt::Display) -> StateError {
    StateError::Corrupt {
        key: key.into(),
        reason: reason.to_string(),
    }
}

pub(super) fn read_state(row: &Row<'_>) -> Result<OpportunityState, StateError> {
    let id: String = row.get(0).map_err(sql)?;
    let status: String = row.get(1).map_err(sql)?;
    let plan: Option<String> = row.get(5).map_err(sql)?;
    let written: Option<String> = row.get(6).map_err(sql)?;
    let error_code: Option<String> = row.get(9).map_err(sql)?;
    let planned: Option<String> = row.get(17).map_err(sql)?;
    let mut unreadable = None;
    let plan = crate::lenient("plan", part(plan), &mut unreadable);
    let written = crate::lenient("record of what was written", part(written), &mut unreadable);
    let planned = crate::lenient("planned roles", part(planned), &mut unreadable);
    Ok(OpportunityState {
        id: OpportunityId::parse(&id).map_err(|e| corrupt(&id, e))?,
        status: Status::parse(&status).ok_or_else(|| corrupt(&id, format!("unknown status `{status}`")))?,
        version: row.get(2).map_err(sql)?,
        deleted: row.get(3).map_err(sql)?,
        modified_on: row.get(4).map_err(sql)?,
        plan,
        written,
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
        retry_at: row.get(15).map_err(sql)?,
        rewrite: row.get(16).map_err(sql)?,
        planned: planned.unwrap_or_default(),
        unreadable,
    })
}

/// One JSON column, decoded.
fn part<T: serde::de::DeserializeOwned>(text: Option<String>) -> Result<Option<T>, String> {
    text.map(|t| serde_json::from_str(&t))
        .transpose()
        .map_err(|e| crate::json_fault(&e))
}

pub(super) fn get_state(conn: &Connection, id: OpportunityId) -> Result<Option<OpportunityState>, StateError> {
    let mut stmt = conn
        .prepare_cached(&format!("SELECT {COLUMNS} FROM opportunities WHERE id = ?1"))
        .map_err(sql)?;
    let mut rows = stmt.query(params![id.to_string()]).map_err(sql)?;
    match rows.next().map_err(sql)? {
        Some(row) => read_state(row).map(Some),
        None => Ok(None),
    }
}

pub(super) fn to_json<T: serde::Serialize>(value: &T) -> Result<String, StateError> {
    serde_json::to_string(value).map_err(|e| corrupt("a value to store", e))
}

pub(super) fn count_completion(conn: &Connection, now: Millis) -> Result<(), StateError> {
    conn.execute(
        "INSERT INTO completions (minute, n) VALUES (?1, 1) ON CONFLICT (minute) DO UPDATE SET n = n + 1",
        params![minute_of(now)],
    )
    .map_err(sql)?;
    Ok(())
}

/// Records `written` unless a newer write is already recorded.
pub(super) fn record_written(conn: &Connection, id: &str, written: &Written) -> Result<(), StateError> {
    conn.execute(
        "UPDATE opportunities SET written = ?2, written_version = ?3
         WHERE id = ?1 AND (written_version IS NULL OR written_version <= ?3)",
        params![id, to_json(written)?, written.version],
    )
    .map_err(sql)?;
    Ok(())
}
