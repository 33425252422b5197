//! The steps that run both alone and inside a group's one transaction (`claim_many`,
//! `complete_writes`): a claim, and the record of a write.

use super::*;

/// [`StateStore::claim`] inside a transaction.
pub(super) fn claim_in(
    tx: &rusqlite::Transaction<'_>,
    id: OpportunityId,
    from: Status,
    ttl_ms: i64,
    now: Millis,
) -> Result<Option<(Claim, OpportunityState)>, StateError> {
    let token = new_token();
    let n = tx
        .prepare_cached(
            "UPDATE opportunities SET claim_token = ?3, claim_until = ?4, updated_at = ?5
             WHERE id = ?1 AND status = ?2 AND (claim_until IS NULL OR claim_until <= ?5)
               AND (retry_at IS NULL OR retry_at <= ?5)",
        )
        .and_then(|mut update| update.execute(params![id.to_string(), from.as_str(), token, now + ttl_ms, now]))
        .map_err(sql)?;
    let result = if n == 1 {
        let state = get_state(tx, id)?.ok_or_else(|| corrupt(id.to_string(), "vanished inside a transaction"))?;
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
    Ok(result)
}

/// [`StateStore::complete_write`] inside a transaction.
pub(super) fn complete_write_in(
    tx: &rusqlite::Transaction<'_>,
    claim: &Claim,
    result: WriteResult,
    now: Millis,
) -> Result<Completion, StateError> {
    let id = claim.id.to_string();
    let (status, written, error) = result.parts();
    let attempts_delta = result.attempts_delta();
    let retry_at = result.retry_at();
    let synced = matches!(result, WriteResult::Synced(_));
    if let Some(w) = written {
        record_written(tx, &id, w)?;
    }
    let n = tx
        .prepare_cached(
            "UPDATE opportunities SET status = ?4,
                 attempts = CASE WHEN ?5 IS NULL THEN 0 ELSE attempts + ?5 END,
                 err_operation = ?6, err_code = ?7, err_message = ?8,
                 claim_token = NULL, claim_until = NULL, updated_at = ?9,
                 status_since = CASE WHEN status = ?4 THEN status_since ELSE ?9 END,
                 retry_at = ?10, rewrite = CASE WHEN ?11 THEN 0 ELSE rewrite END, planned = NULL
             WHERE id = ?1 AND claim_token = ?2 AND version = ?3",
        )
        .and_then(|mut update| {
            update.execute(params![
                id,
                claim.token,
                claim.version,
                status.as_str(),
                attempts_delta,
                error.map(|e| e.operation.clone()),
                error.map(|e| e.code.clone()),
                error.map(|e| e.message.clone()),
                now,
                retry_at,
                synced
            ])
        })
        .map_err(sql)?;
    if n == 1 && matches!(status, Status::Synced | Status::Deleted) {
        count_completion(tx, now)?;
    }
    Ok(if n == 1 {
        Completion::Completed
    } else {
        Completion::Superseded
    })
}
