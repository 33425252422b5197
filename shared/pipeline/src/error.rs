//! What stops a step ([`PipelineError`]) and what a record's failure is called in the error
//! ledger ([`SyncError`] through `sync_error` and `skip_error`).

use super::*;

/// What stopped a step.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Dataverse(#[from] DataverseError),
    #[error(transparent)]
    Marketo(#[from] MarketoError),
    #[error(transparent)]
    State(#[from] StateError),
    /// A guard stopped the step before it did something that needs a person's look.
    #[error("{0}")]
    Refused(String),
}

impl PipelineError {
    /// Whether running the step again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            PipelineError::Dataverse(e) => e.is_retryable(),
            PipelineError::Marketo(e) => e.disposition().keeps_records_queued(),
            PipelineError::State(e) => e.is_retryable(),
            PipelineError::Refused(_) => false,
        }
    }
}

pub(crate) fn sync_error(operation: &str, code: impl Into<String>, message: impl Into<String>) -> SyncError {
    SyncError {
        operation: operation.to_owned(),
        code: code.into(),
        message: message.into(),
    }
}

/// Whether a skipped record is worth retrying.
pub(crate) fn skip_error(operation: &str, outcome: &RecordOutcome) -> (SyncError, bool) {
    let code = outcome.code().unwrap_or("skipped").to_owned();
    let message = outcome
        .reasons
        .first()
        .map(|r| r.message.clone())
        .unwrap_or_else(|| "skipped without a reason".into());
    let retryable = outcome.disposition().is_some_and(Disposition::keeps_records_queued);
    (sync_error(operation, code, message), retryable)
}
