//! The run history's entries: each report, as one [`Run`] (counts and the stop reason).

use oppsync_state::{Millis, Run};

use crate::{DrainReport, PollReport, ResyncReport, TransformReport, Transformed, WriteReport, Wrote};

/// When a run began and ended, and what ran.
#[derive(Debug, Clone)]
pub struct RunTimes {
    pub command: &'static str,
    pub started: Millis,
    pub ended: Millis,
}

impl RunTimes {
    fn run(&self) -> Run {
        Run {
            command: self.command.into(),
            started: self.started,
            ended: self.ended,
            ..Run::default()
        }
    }

    /// A poll: the changes read.
    pub fn poll(&self, report: &PollReport) -> Run {
        Run {
            read: report.marked + report.requeued,
            stopped: (!report.caught_up && !report.busy)
                .then(|| "the time ran out; the next poll goes on from the stored cursors".to_owned()),
            ..self.run()
        }
    }

    /// A transform: what was planned unchanged or filtered, and what could not be planned.
    pub fn transform(&self, report: &TransformReport) -> Run {
        let count = |f: fn(&Transformed) -> bool| report.records.iter().filter(|r| f(&r.result)).count() as u64;
        Run {
            unchanged: count(|t| matches!(t, Transformed::Unchanged | Transformed::Filtered | Transformed::Kept)),
            failed: count(|t| matches!(t, Transformed::Failed { .. })),
            ..self.run()
        }
    }

    /// A write: records written, failed, left for retry, and its Marketo calls.
    pub fn write(&self, report: &WriteReport) -> Run {
        let count = |f: fn(&Wrote) -> bool| report.records.iter().filter(|r| f(&r.result)).count() as u64;
        Run {
            written: count(|w| matches!(w, Wrote::Synced | Wrote::Deleted)),
            failed: count(|w| matches!(w, Wrote::Failed { .. })),
            left_for_retry: count(|w| matches!(w, Wrote::Retry { .. })),
            marketo_calls: report.marketo_calls,
            stopped: report.stopped.clone(),
            ..self.run()
        }
    }

    /// A drain after `read` changes were read (a `sync` cycle).
    pub fn drain(&self, read: u64, report: &DrainReport) -> Run {
        Run {
            read,
            written: report.written,
            unchanged: report.unchanged,
            failed: report.failed,
            left_for_retry: report.left_for_retry,
            marketo_calls: report.metrics.marketo_calls(),
            stopped: report.stopped.clone(),
            ..self.run()
        }
    }

    /// A resync (a dry run writes nothing).
    pub fn resync(&self, report: &ResyncReport) -> Run {
        let wrote = |f: fn(&Wrote) -> bool| {
            report
                .records
                .iter()
                .filter(|r| r.write.as_ref().is_some_and(f))
                .count() as u64
        };
        let unchanged = report
            .records
            .iter()
            .filter(|r| {
                r.write.is_none()
                    && matches!(
                        r.transform,
                        Some(Transformed::Unchanged | Transformed::Filtered | Transformed::Kept)
                    )
            })
            .count() as u64;
        Run {
            read: report.targeted,
            written: report.written,
            unchanged,
            failed: wrote(|w| matches!(w, Wrote::Failed { .. })),
            left_for_retry: wrote(|w| matches!(w, Wrote::Retry { .. })),
            marketo_calls: report.marketo_calls,
            stopped: report.stopped.clone(),
            ..self.run()
        }
    }

    /// A run that ended with an error before it could report.
    pub fn failed(&self, error: &impl std::fmt::Display) -> Run {
        Run {
            stopped: Some(error.to_string()),
            ..self.run()
        }
    }
}
