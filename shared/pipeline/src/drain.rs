//! The drain: transform and write, batch by batch, until nothing is left that this run can make
//! progress on (the local runner's loop), with what was left for retry and why.

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicUsize};

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

/// Write groups a drain has at Marketo at once: two, so one group's opportunities and roles go
/// beside the next one's companies and leads (which wait for the first's: see `front`). At 2 s
/// a call, one at a time left the budget's calls at once part-idle at every step and between
/// groups (87% of the ceiling at 100,000 opportunities).
pub(crate) const DRAIN_WRITES_AT_ONCE: usize = 2;

/// What the transform tells the write beside it: records made ready since the write last
/// looked, and whether the transform has finished its pass.
#[derive(Default)]
struct Handover {
    ready: AtomicUsize,
    done: AtomicBool,
    wake: tokio::sync::Notify,
}

/// Tells the caller's progress of a finished batch (the transform and the write take turns).
fn tell(progress: &Mutex<impl FnMut(Stage, usize)>, stage: Stage, n: usize) {
    (progress.lock().unwrap_or_else(std::sync::PoisonError::into_inner))(stage, n);
}

impl Handover {
    /// Until a whole write group is ready or the transform's pass is over.
    async fn wait_for(&self, group: usize) {
        while !self.done.load(Relaxed) && self.ready.load(Relaxed) < group {
            self.wake.notified().await;
        }
    }
    fn add(&self, ready: usize) {
        self.ready.fetch_add(ready, Relaxed);
        self.wake.notify_one();
    }
    fn finish(&self) {
        self.done.store(true, Relaxed);
        self.wake.notify_one();
    }
}

impl<S: StateStore, D: DataversePort, M: MarketoPort> Pipeline<S, D, M> {
    /// Transforms every pending record and writes every ready one, until none is left that this
    /// run can make progress on. The write runs beside the transform, a group at a time (ten
    /// batches, so calls stay full), so an initial sync writes from its first group on instead
    /// of after its last; Marketo's preflight is made while the first group is read.
    /// `progress` hears of each finished batch.
    pub async fn drain(&self, progress: impl FnMut(Stage, usize)) -> Result<DrainReport, PipelineError> {
        let progress = Mutex::new(progress);
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
            let handover = Handover::default();
            let (transformed, written) = tokio::join!(
                async {
                    let pass = self.transform_pass(&handover, &progress).await;
                    handover.finish();
                    pass
                },
                self.write_pass(&handover, &progress, &mut write_attempts, &mut left),
            );
            let (transform_moved, transformed) = transformed?;
            let (write_moved, written) = written?;
            report.transformed += transformed.transformed;
            report.unchanged += transformed.unchanged;
            report.failed += transformed.failed + written.failed;
            report.written += written.written;
            report.retried += written.retried;
            report.metrics.merge(transformed.metrics);
            report.metrics.merge(written.metrics);
            if written.stopped.is_some() {
                report.stopped = written.stopped;
                report.stopped_for_good = written.stopped_for_good;
                return Ok(finish(report, left));
            }
            if !transform_moved && !write_moved {
                return Ok(finish(report, left));
            }
        }
    }

    /// One pass of the transform: always from the oldest pending; past pages only when the
    /// first holds nothing this run can claim. Whether it moved anything, and what it did.
    async fn transform_pass(
        &self,
        handover: &Handover,
        progress: &Mutex<impl FnMut(Stage, usize)>,
    ) -> Result<(bool, DrainReport), PipelineError> {
        let batch = self.config.sync.batch_size;
        let mut report = DrainReport::default();
        let mut moved = false;
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
            let mut ready = 0;
            for r in &done.records {
                match r.result {
                    Transformed::Ready { .. } => {
                        report.transformed += 1;
                        ready += 1;
                    }
                    Transformed::Unchanged | Transformed::Filtered | Transformed::Kept => report.unchanged += 1,
                    Transformed::Failed { .. } => report.failed += 1,
                    _ => {}
                }
            }
            report.metrics.merge(done.metrics);
            tell(progress, Stage::Transform, claimed);
            handover.add(ready);
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
        Ok((moved, report))
    }

    /// One pass of the write beside the transform: a group of ready records at a time, once a
    /// whole group is ready or the transform's pass is over, skipping records this drain has
    /// already tried enough. Two writes run at once ([`DRAIN_WRITES_AT_ONCE`]): the next group's
    /// companies and leads go beside this one's opportunities and roles, so Marketo's calls at
    /// once stay busy across a group's steps and its bookkeeping. Ends when the transform has
    /// finished and no ready record is left that it can make progress on, or when Marketo stops
    /// the run.
    async fn write_pass(
        &self,
        handover: &Handover,
        progress: &Mutex<impl FnMut(Stage, usize)>,
        write_attempts: &mut HashMap<OpportunityId, u32>,
        left: &mut HashMap<OpportunityId, SyncError>,
    ) -> Result<(bool, DrainReport), PipelineError> {
        use futures_util::StreamExt;
        let group = self.config.sync.batch_size * DRAIN_WRITE_GROUP;
        let mut report = DrainReport::default();
        let mut moved = false;
        if self.anything_to_write().await? {
            report.metrics.merge(self.preflight_early().await);
        }
        // No backoff: the drain bounds its own attempts and is not re-triggered.
        let start = |ids: Vec<OpportunityId>| async move {
            let done = self.write_batch(&ids, false, None, false).await;
            (ids, done)
        };
        let mut running = futures_util::stream::FuturesUnordered::new();
        // Records a running write holds, and those this pass could not claim (another process
        // holds them): not listed again in this pass.
        let mut in_flight: HashSet<OpportunityId> = HashSet::new();
        let mut not_claimed: HashSet<OpportunityId> = HashSet::new();
        // Nothing to start until a running write ends.
        let mut idle = false;
        let mut first_error: Option<PipelineError> = None;
        loop {
            let ended = if running.len() >= DRAIN_WRITES_AT_ONCE || (idle && !running.is_empty()) {
                running.next().await
            } else if running.is_empty() {
                handover.wait_for(group).await;
                None
            } else {
                tokio::select! {
                    biased;
                    ended = running.next() => ended,
                    () = handover.wait_for(group) => None,
                }
            };
            if let Some((ids, done)) = ended {
                idle = false;
                for id in &ids {
                    in_flight.remove(id);
                }
                let done: WriteReport = match done {
                    Ok(done) => done,
                    Err(e) => {
                        // The other write finishes first: its records are recorded, not held.
                        first_error.get_or_insert(e);
                        continue;
                    }
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
                    if matches!(r.result, Wrote::NotClaimed) {
                        not_claimed.insert(r.id);
                    } else {
                        claimed += 1;
                    }
                }
                report.metrics.merge(done.metrics);
                tell(progress, Stage::Write, claimed);
                if claimed > 0 {
                    moved = true;
                }
                if let Some(stop) = done.stopped {
                    report.stopped.get_or_insert(stop);
                    report.stopped_for_good |= done.stopped_for_good;
                }
                continue;
            }
            if first_error.is_some() || report.stopped.is_some() {
                // Nothing new starts; the running writes end on their own.
                if running.is_empty() {
                    break;
                }
                idle = true;
                continue;
            }
            // Whatever was ready is looked at now; only records made ready after this wake the
            // write before the transform's pass is over.
            let finished = handover.done.load(Relaxed);
            handover.ready.store(0, Relaxed);
            // Up to a group of ready records, oldest first, past those in flight or done with.
            let ids = self
                .ids_in(
                    Status::Ready,
                    |s| {
                        !in_flight.contains(&s.id)
                            && !not_claimed.contains(&s.id)
                            && write_attempts.get(&s.id).copied().unwrap_or(0) < DRAIN_WRITE_ATTEMPTS
                    },
                    Some(group),
                )
                .await;
            let ids = match ids {
                Ok(ids) => ids,
                Err(e) => {
                    first_error.get_or_insert(e);
                    idle = true;
                    continue;
                }
            };
            if ids.is_empty() {
                if running.is_empty() && finished {
                    break;
                }
                // Wait for a running write to end, or for what the transform makes ready.
                idle = !running.is_empty();
                continue;
            }
            in_flight.extend(ids.iter().copied());
            running.push(start(ids));
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok((moved, report)),
        }
    }

    /// Whether a drain has anything that may reach Marketo (a preflight for nothing costs calls).
    async fn anything_to_write(&self) -> Result<bool, PipelineError> {
        for status in [Status::Pending, Status::Ready] {
            if !self.store.list(status, 1, None).await?.items.is_empty() {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
