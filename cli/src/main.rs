//! `oppsync`: the sync on your machine. `demo` runs the whole pipeline against the built-in
//! Dataverse and Marketo simulators on an embedded SQLite store.
//!
//! Exit codes: 0 done; 1 the run finished but something is wrong (a record failed, or the demo's
//! Marketo end state differs from the rules); 2 bad arguments or configuration; 3 a fatal error
//! (an endpoint, the state store).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod demo;
mod progress;

#[derive(Debug, Parser)]
#[command(
    name = "oppsync",
    version,
    about = "Keeps Marketo's opportunities in step with Dynamics 365",
    after_help = "Exit codes: 0 done; 1 finished with failed records or a wrong end state; 2 bad arguments or configuration; 3 fatal error.\nLogs go to stderr (RUST_LOG=debug for more); results go to stdout."
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
        Command::Demo(_) => "error",
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            return ExitCode::from(3);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
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
