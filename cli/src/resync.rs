//! `oppsync resync`: writes named records (or all) to Marketo now, whatever the cursor and the
//! hash, and reports per record what was planned, what was there before, and Marketo's answer.

use std::process::ExitCode;

use clap::Args;
use oppsync_pipeline::{ResyncRequest, Wrote};

use crate::CliError;
use crate::context::{StateArgs, fatal};
use crate::with_pipeline;

#[derive(Debug, Args)]
pub struct ResyncArgs {
    #[command(flatten)]
    pub state: StateArgs,
    /// The opportunities' ids (GUIDs).
    #[arg(value_name = "OPPORTUNITY_ID", required_unless_present_any = ["all", "failed", "modified_since"])]
    pub ids: Vec<String>,
    /// Every opportunity in Dynamics (reports only the records that need attention).
    #[arg(long, conflicts_with_all = ["ids", "failed", "modified_since"])]
    pub all: bool,
    /// Every record that failed (`oppsync errors` lists them): a replay once the cause is fixed.
    #[arg(long, conflicts_with_all = ["ids", "modified_since"])]
    pub failed: bool,
    /// Every opportunity changed in Dynamics at or after this UTC time (YYYY-MM-DD or
    /// YYYY-MM-DDTHH:MM:SSZ); reports only the records that need attention.
    #[arg(long, value_name = "DATE", conflicts_with = "ids")]
    pub modified_since: Option<String>,
    /// Plan and report, write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// The full report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: ResyncArgs) -> Result<ExitCode, CliError> {
    // The ids are checked before anything else: nothing but a GUID reaches a Dataverse query.
    let request = ResyncRequest {
        opportunity_ids: args.ids.clone(),
        all: args.all,
        failed: args.failed,
        modified_since: args.modified_since.clone(),
        dry_run: args.dry_run,
    };
    let target = request.target().map_err(CliError::Usage)?;
    with_pipeline!(&args.state, |pipeline| {
        let started = pipeline.now();
        let report = pipeline.resync(target, args.dry_run).await;
        pipeline.leave_budget().await;
        // A dry run changes nothing, so it is not a run of the sync.
        if !args.dry_run {
            pipeline
                .record_outcome("resync", started, &report, oppsync_pipeline::RunTimes::resync)
                .await;
        }
        let report = report.map_err(fatal)?;
        let failed = report
            .records
            .iter()
            .filter(|r| matches!(r.write, Some(Wrote::Failed { .. }) | Some(Wrote::Retry { .. })))
            .count();
        let not_found = report.records.iter().filter(|r| r.not_found).count();
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
        } else {
            let what = match (args.failed, &args.modified_since) {
                (true, _) => " (failed)".to_owned(),
                (_, Some(since)) => format!(" (changed in Dynamics since {})", since.trim()),
                _ => String::new(),
            };
            println!(
                "{} records to resync{what}{}",
                report.targeted,
                if args.dry_run { "; a dry run writes nothing" } else { "" }
            );
            for r in &report.records {
                let outcome = match (&r.transform, &r.write) {
                    _ if r.not_found => Some(
                        "not found in Dynamics, and oppsync never wrote it: nothing sent, nothing stored (check the id)"
                            .into(),
                    ),
                    (_, Some(w)) => serde_json::to_value(w)
                        .ok()
                        .and_then(|v| v["outcome"].as_str().map(str::to_owned)),
                    (Some(t), None) => serde_json::to_value(t)
                        .ok()
                        .and_then(|v| v["outcome"].as_str().map(str::to_owned)),
                    (None, None) if args.dry_run => Some(
                        match r.action() {
                            "write" => "would write (dry run)",
                            "delete" => "would delete from Marketo (dry run)",
                            _ => "would change nothing in Marketo (dry run)",
                        }
                        .into(),
                    ),
                    (None, None) => None,
                };
                println!("{} {}", r.id, outcome.unwrap_or_else(|| "-".into()));
                for a in &r.answers {
                    let code = a.outcome.code().map(|c| format!(" {c}")).unwrap_or_default();
                    println!("    {} {}: {:?}{code}", a.operation, a.key, a.outcome.status);
                }
            }
            if let Some(stop) = &report.stopped {
                println!("stopped early: {stop}");
            }
            println!(
                "{} records{}",
                report.records.len(),
                if args.dry_run {
                    ", nothing written (dry run)"
                } else {
                    ""
                }
            );
        }
        if not_found > 0 {
            eprintln!(
                "error: {not_found} of the ids given are not in Dynamics and were never written by oppsync; nothing was sent for them"
            );
        }
        // Refused credentials or a native-sync instance: fatal, as for `sync`.
        if let (Some(stop), true) = (&report.stopped, report.stopped_for_good) {
            return Err(CliError::Fatal(format!("Marketo: {stop}")));
        }
        Ok(if failed > 0 || not_found > 0 || report.stopped.is_some() {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        })
    })
}
