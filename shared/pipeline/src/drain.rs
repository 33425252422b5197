//! The drain: transform and write, batch by batch, until nothing is left that this run can make
//! progress on (the local runner's loop), with what was left for retry and why.

use super::*;

/// What a drain (transform and write until nothing is left) did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DrainReport {
    pub transformed: u64,
    pub unchanged: u64,
    pub written: u64,
    pub failed: u64,
    /// Write attempts that ended in a retryable failure (a record may count more than once).
    pub retried: u64,
    /// Records whose last write this drain failed retryably: still queued for the next run.
    pub left_for_retry: u64,
    /// Why they were left, as `operation code: message` with how many records each.
    pub retry_reasons: Vec<(String, u64)>,
    pub stopped: Option<String>,
    /// See [`WriteReport::stopped_for_good`].
    pub stopped_for_good: bool,
    #[serde(skip)]
    pub metrics: Metrics,
}

/// Which stage a drain just finished a batch of (for progress bars).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Transform,
    Write,
}

/// How many times one drain hands the same record to Marketo before leaving it ready for the
/// next run (each attempt already retries transient errors with backoff inside the client).
pub(crate) const DRAIN_WRITE_ATTEMPTS: u32 = 3;

/// A drain writes this many batches' ready records in one write: the client cuts each object
/// type into calls of 300 (sent together, up to the budget's calls at once), so a larger group
/// leaves fewer part-filled calls when a batch's companies, leads and roles are not multiples
/// of 300 (the demo's initial sync: 1.06× the honest minimum with five batches a write, 1.00×
/// with ten).
pub(crate) const DRAIN_WRITE_GROUP: usize = 10;

impl<S: StateStore, D: DataversePort, M: MarketoPort> Pipeline<S, D, M> {
    /// Transforms every pending record and writes every ready one, batch by batch, until none
    /// is left that this run can make progress on. `progress` hears of each finished batch.
    pub async fn drain(&self, mut progress: impl FnMut(Stage, usize)) -> Result<DrainReport, PipelineError> {
        let batch = self.config.sync.batch_size;
        let mut report = DrainReport::default();
        let mut write_attempts: HashMap<OpportunityId, u32> = HashMap::new();
        // The last retryable error of each record not (yet) written.
        let mut left: HashMap<OpportunityId, SyncError> = HashMap::new();
        let finish = |mut report: DrainReport, left: HashMap<OpportunityId, SyncError>| {
            let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
            for error in left.values() {
                let message: String = error.message.chars().take(160).collect();
                *reasons
                    .entry(format!("{} {}: {message}", error.operation, error.code))
                    .or_default() += 1;
            }
            report.left_for_retry = left.len() as u64;
            report.retry_reasons = reasons.into_iter().collect();
            report.retry_reasons.sort_by_key(|r| std::cmp::Reverse(r.1));
            report
        };
        loop {
            let mut moved = false;
            // Transform: always from the oldest pending; past pages only when the first holds
            // nothing this run can claim.
            let mut page: Option<String> = None;
            loop {
                let listed = self.store.list(Status::Pending, batch, page.as_deref()).await?;
                if listed.items.is_empty() {
                    break;
                }
                let ids: Vec<OpportunityId> = listed.items.iter().map(|s| s.id).collect();
                let done = self.transform(&ids, false).await?;
                let claimed = done
                    .records
                    .iter()
                    .filter(|r| !matches!(r.result, Transformed::NotClaimed))
                    .count();
                for r in &done.records {
                    match r.result {
                        Transformed::Ready { .. } => report.transformed += 1,
                        Transformed::Unchanged | Transformed::Filtered | Transformed::Kept => report.unchanged += 1,
                        Transformed::Failed { .. } => report.failed += 1,
                        _ => {}
                    }
                }
                report.metrics.merge(done.metrics);
                progress(Stage::Transform, claimed);
                if claimed > 0 {
                    moved = true;
                    page = None;
                } else {
                    match listed.next {
                        Some(next) => page = Some(next),
                        None => break,
                    }
                }
            }
            // Write: the same, skipping records this drain has already tried enough.
            let mut page: Option<String> = None;
            loop {
                let listed = self
                    .store
                    .list(Status::Ready, batch * DRAIN_WRITE_GROUP, page.as_deref())
                    .await?;
                if listed.items.is_empty() {
                    break;
                }
                let ids: Vec<OpportunityId> = listed
                    .items
                    .iter()
                    .map(|s| s.id)
                    .filter(|id| write_attempts.get(id).copied().unwrap_or(0) < DRAIN_WRITE_ATTEMPTS)
                    .collect();
                let done = if ids.is_empty() {
                    WriteReport::default()
                } else {
                    // No backoff: the drain bounds its own attempts and is not re-triggered.
                    self.write_batch(&ids, false, None, false).await?
                };
                let mut claimed = 0;
                for r in &done.records {
                    match &r.result {
                        Wrote::Synced | Wrote::Deleted => {
                            report.written += 1;
                            left.remove(&r.id);
                        }
                        Wrote::Failed { .. } => {
                            report.failed += 1;
                            left.remove(&r.id);
                        }
                        Wrote::Retry { error } => {
                            report.retried += 1;
                            *write_attempts.entry(r.id).or_default() += 1;
                            left.insert(r.id, error.clone());
                        }
                        _ => {}
                    }
                    if !matches!(r.result, Wrote::NotClaimed) {
                        claimed += 1;
                    }
                }
                report.metrics.merge(done.metrics);
                progress(Stage::Write, claimed);
                if let Some(stop) = done.stopped {
                    report.stopped = Some(stop);
                    report.stopped_for_good = done.stopped_for_good;
                    return Ok(finish(report, left));
                }
                if claimed > 0 {
                    moved = true;
                    page = None;
                } else {
                    match listed.next {
                        Some(next) => page = Some(next),
                        None => break,
                    }
                }
            }
            if !moved {
                return Ok(finish(report, left));
            }
        }
    }
}
