//! `oppsync`: the sync on your machine. `demo` runs the whole pipeline against the built-in
//! Dataverse and Marketo simulators on an embedded SQLite store.
//!
//! Exit codes (README's table, each case held by a test in cli/tests/cli/exit_codes.rs): 0 done;
//! 1 the run finished but something is wrong (a record failed, writing stopped at the quota or
//! budget, a resync id nobody knows, the demo's end state differs from the rules); 2 bad
//! arguments, configuration, environment or a --state that is not oppsync's; 3 a fatal error
//! (credentials, the preflight, Dynamics unreachable, the state store); 4 the run finished with
//! records left for retry (still queued; the output says why); 130 or 143 stopped by a signal.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod context;
mod demo;
mod fields;
mod plan;
mod progress;
mod resync;
mod sandbox;
mod simulate;
mod status;
mod sync;
mod validate;

#[derive(Debug, Parser)]
#[command(
    name = "oppsync",
    version,
    about = "Keeps Marketo's opportunities in step with Dynamics 365",
    after_help = "Exit codes: 0 done; 1 finished with failed records, stopped at the quota or budget, a resync id nobody knows, or a wrong end state; 2 bad arguments, configuration or environment, or a --state that is not oppsync's; 3 fatal error (credentials, the preflight, an unusable state); 4 finished with records left for retry (still queued); 130 or 143 stopped by Ctrl-C or SIGTERM.\nResults go to stdout, logs to stderr (RUST_LOG=info for more, RUST_LOG=debug for each call)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the full sync against the built-in simulators: an initial sync of seeded
    /// opportunities, a scripted round of changes in Dynamics, an incremental sync, then checks
    /// Marketo's end state against the rules, record by record.
    Demo(demo::DemoArgs),
    /// Syncs Dynamics into Marketo: reads the changes since the last run, writes them, and
    /// exits (or repeats with --every). Endpoints and credentials come from the environment:
    /// DYNAMICS_URL, DYNAMICS_TENANT_ID, DYNAMICS_CLIENT_ID, DYNAMICS_CLIENT_SECRET, optional
    /// DYNAMICS_TOKEN_URL, MARKETO_URL, MARKETO_CLIENT_ID, MARKETO_CLIENT_SECRET.
    Sync(sync::SyncArgs),
    /// Shows what a sync would write to Marketo now, as a diff against what was last written.
    /// Writes nothing and moves no cursor.
    Plan(plan::PlanArgs),
    /// Writes the named opportunities (or --all) to Marketo now, whatever was written before,
    /// and reports Marketo's answer for each.
    Resync(resync::ResyncArgs),
    /// The Sync Status view: records by status, oldest pending, last-hour throughput, cursor
    /// ages, Marketo calls used today.
    Status(status::StatusArgs),
    /// The Sync Errors view: failed records with the operation, code and message; searchable,
    /// exportable as CSV or JSON.
    Errors(status::ErrorsArgs),
    /// The run history, newest first: each sync cycle, resync and Lambda invocation with its
    /// counts, Marketo calls and why it stopped (kept [sync] run_history_days).
    Runs(status::RunsArgs),
    /// Checks the configuration, the environment, both sets of credentials, Dataverse change
    /// tracking and Marketo's preflight, each with pass or fail and the fix.
    Validate(validate::ValidateArgs),
    /// Reads Dynamics' opportunity columns and Marketo's opportunity fields, prints them side by
    /// side with a suggested mapping, and with --write FILE writes it as a configuration that
    /// `validate` accepts: choosing the fields to sync at setup.
    Fields(fields::FieldsArgs),
    /// Measures the product against the API ceilings on the simulators: wall time, Marketo calls
    /// against the minimum possible, Dataverse requests, peak memory; then a 1% incremental
    /// round. `--limits` enforces Marketo's real limits at the default budget.
    Bench(bench::BenchArgs),
    /// Runs the Dataverse and Marketo simulators on loopback until stopped and prints the
    /// `export` lines that point every command at them, to try `validate`, `plan`, `sync`,
    /// `resync`, `status` and `errors` without a real system; changes are typed in its terminal.
    Sandbox(sandbox::SandboxArgs),
    /// The simulators in a process of their own (used by `bench`).
    #[command(hide = true)]
    Simulate(simulate::SimulateArgs),
}

/// Why a command stopped.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Fatal(String),
}

impl CliError {
    fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Usage(_) => ExitCode::from(2),
            CliError::Fatal(_) => ExitCode::from(3),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo's seeded data holds bad rows on purpose (contacts without email, …): their
    // warnings are noise there, and `RUST_LOG=warn` brings them back.
    init_logging(match cli.command {
        Command::Demo(_) | Command::Bench(_) | Command::Simulate(_) | Command::Sandbox(_) => "error",
        _ => "warn",
    });
    // The SQLite store works on one connection, so more than a few blocking threads only wait;
    // each thread that allocates gets its own malloc arena, and idle arenas are peak memory.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(4)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            return ExitCode::from(3);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Sync(args) => context::stoppable("sync", sync::run(args)).await,
            Command::Plan(args) => plan::run(args).await,
            Command::Resync(args) => context::stoppable("resync", resync::run(args)).await,
            Command::Status(args) => status::status(args).await,
            Command::Errors(args) => status::errors(args).await,
            Command::Runs(args) => status::runs(args).await,
            Command::Validate(args) => validate::run(args).await,
            Command::Fields(args) => fields::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Simulate(args) => simulate::run(args).await,
            Command::Sandbox(args) => sandbox::run(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

/// Logs to stderr, at `default` and up unless RUST_LOG says otherwise: stdout is for results.
fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
