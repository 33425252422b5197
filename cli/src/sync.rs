//! `oppsync sync`: the real thing on one machine. One cycle polls Dynamics until caught up,
//! then transforms and writes everything pending; `--every` repeats it. Stopping it at any
//! moment is safe: the state records every change before a cursor moves past it.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use oppsync_pipeline::{DrainReport, Pipeline, RunTimes};
use oppsync_state::{Run, StateStore, Status};

use crate::CliError;
use crate::context::{StateArgs, fatal};
use crate::with_pipeline;

#[derive(Debug, Args)]
pub struct SyncArgs {
    #[command(flatten)]
    pub state: StateArgs,
    /// Run one cycle and exit (the default).
    #[arg(long, conflicts_with = "every")]
    pub once: bool,
    /// Run a cycle, then again every DURATION (like 30s, 5m, 1h; at most 24h), until stopped.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub every: Option<Duration>,
}

/// The longest `--every`: a day.
const MAX_EVERY_SECONDS: u64 = 24 * 3600;

/// `30s`, `5m`, `1h`, or a number of seconds, at most a day.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration; write it like 30s, 5m or 1h"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("`{text}`: unknown unit `{unit}`; use s, m or h")),
    };
    let seconds = n.saturating_mul(scale);
    if seconds == 0 {
        return Err("the interval must be at least 1s".into());
    }
    if seconds > MAX_EVERY_SECONDS {
        return Err(format!(
            "`{}` is longer than a day; for cycles further apart, run `oppsync sync --once` from cron or a timer",
            oppsync_support::input::shown(text)
        ));
    }
    Ok(Duration::from_secs(seconds))
}

pub async fn run(args: SyncArgs) -> Result<ExitCode, CliError> {
    with_pipeline!(&args.state, |pipeline| {
        loop {
            let code = cycle(&pipeline).await?;
            match args.every {
                None => return Ok(code),
                Some(every) => {
                    eprintln!("next cycle in {}s", every.as_secs());
                    tokio::time::sleep(every).await;
                }
            }
        }
    })
}

/// One cycle: poll to the end, drain; a summary on stdout. Exit 1 when a record failed
/// permanently in this cycle or writing stopped early (quota, budget); exit 4 when records are
/// left for retry after failures that may pass (they stay queued, and the output says why).
pub async fn cycle<S: StateStore>(pipeline: &Pipeline<S>) -> Result<ExitCode, CliError> {
    let started = Instant::now();
    let since = pipeline.now();
    let mut changes = 0;
    loop {
        let poll = pipeline.poll(None).await.map_err(fatal)?;
        if poll.busy {
            return Err(CliError::Fatal(
                "another poller holds the lease on this state (another `oppsync sync`, or the Lambda poller on this table); try again when it is done (a crashed run's lease expires by itself within [sync] lease_ttl_seconds)".into(),
            ));
        }
        changes += poll.marked + poll.requeued;
        if poll.caught_up {
            break;
        }
    }
    let report = pipeline.drain(|_, _| {}).await;
    // Done writing: the other processes on this table take the whole budget again.
    pipeline.leave_budget().await;
    let times = RunTimes {
        command: "sync",
        started: since,
        ended: pipeline.now(),
    };
    pipeline
        .record_run(match &report {
            Ok(r) => times.drain(changes, r),
            Err(e) => Run {
                read: changes,
                ..times.failed(e)
            },
        })
        .await;
    let report: DrainReport = report.map_err(fatal)?;
    println!(
        "sync: {changes} changes read; {} written, {} unchanged or filtered, {} failed, {} left for retry; {:.1} s",
        report.written,
        report.unchanged,
        report.failed,
        report.left_for_retry,
        started.elapsed().as_secs_f64()
    );
    let mut code = ExitCode::SUCCESS;
    if let (Some(stop), true) = (&report.stopped, report.stopped_for_good) {
        return Err(CliError::Fatal(format!(
            "Marketo: {stop}. The changes read stay queued for the next run"
        )));
    }
    if let Some(stop) = &report.stopped {
        println!("stopped early: {stop}; the unfinished records stay queued for the next run");
        code = ExitCode::from(1);
    }
    if report.failed > 0 {
        println!("failed in this cycle (`oppsync errors` lists every failed record):");
        let listed = pipeline
            .store()
            .list(Status::Failed, 1000, None)
            .await
            .map_err(|e| CliError::Fatal(format!("state store: {e}")))?;
        for state in listed.items.iter().filter(|s| s.status_since >= since).take(20) {
            if let Some(e) = &state.last_error {
                println!("  {} {} {}: {}", state.id, e.operation, e.code, e.message);
            }
        }
        code = ExitCode::from(1);
    }
    if report.left_for_retry > 0 {
        println!(
            "left for retry: {} records, still queued; the next run retries them. Why:",
            report.left_for_retry
        );
        for (reason, count) in report.retry_reasons.iter().take(10) {
            println!("  {count} × {reason}");
        }
        if code == ExitCode::SUCCESS {
            code = ExitCode::from(LEFT_FOR_RETRY);
        }
    }
    Ok(code)
}

/// The exit code of a run that finished with records left for retry.
pub const LEFT_FOR_RETRY: u8 = 4;
