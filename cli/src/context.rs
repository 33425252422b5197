//! What every command that touches the real systems shares: the configuration file, the
//! endpoints and credentials from the environment, the state store, and the pipeline over them.

use std::path::{Path, PathBuf};

use clap::Args;
use oppsync_dynamics::{DataverseClient, DataverseSettings};
use oppsync_marketo::{Limiter, MarketoClient, MarketoSettings};
use oppsync_pipeline::config::MAX_CONFIG_BYTES;
use oppsync_pipeline::{Config, Pipeline};
use oppsync_state::{DynamoStore, FileProblem, SqliteStore};

use crate::CliError;

/// Where the sync state lives and which configuration to use: the same flags on every command.
#[derive(Debug, Clone, Args)]
pub struct StateArgs {
    /// The SQLite state file [default: oppsync-state.db].
    #[arg(long, value_name = "FILE", conflicts_with = "table")]
    pub state: Option<PathBuf>,
    /// A DynamoDB table instead (the one the SAM stack created; AWS_ENDPOINT_URL for a local
    /// server; credentials and region from the usual AWS environment).
    #[arg(long, value_name = "NAME")]
    pub table: Option<String>,
    /// The configuration file (TOML: [mapping], [dataverse], [marketo], [sync]) [default: the
    /// built-in defaults].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

pub const DEFAULT_STATE: &str = "oppsync-state.db";

/// The environment variables `sync`, `plan`, `resync` and `validate` read.
pub const REQUIRED_ENV: [&str; 7] = [
    "DYNAMICS_URL",
    "DYNAMICS_TENANT_ID",
    "DYNAMICS_CLIENT_ID",
    "DYNAMICS_CLIENT_SECRET",
    "MARKETO_URL",
    "MARKETO_CLIENT_ID",
    "MARKETO_CLIENT_SECRET",
];

/// Reads and checks the configuration file; no file means the defaults.
pub fn load_config(path: Option<&Path>) -> Result<Config, CliError> {
    let Some(path) = path else {
        return Ok(Config::default());
    };
    let unreadable = |e: std::io::Error| {
        CliError::Usage(format!(
            "cannot read the configuration file {}: {e}. Fix: give --config an existing TOML file, or leave it out for the defaults",
            path.display()
        ))
    };
    // Read no more than a configuration can be: `--config /dev/zero` must not fill memory.
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(
            std::fs::File::open(path).map_err(unreadable)?,
            MAX_CONFIG_BYTES as u64 + 1,
        ),
        &mut bytes,
    )
    .map_err(unreadable)?;
    if bytes.len() > MAX_CONFIG_BYTES {
        return Err(CliError::Usage(format!(
            "the configuration file {} is larger than the {} KB a configuration can be. Fix: give --config oppsync's TOML file",
            path.display(),
            MAX_CONFIG_BYTES / 1024
        )));
    }
    let text = String::from_utf8(bytes).map_err(|_| {
        CliError::Usage(format!(
            "the configuration file {} is not UTF-8 text. Fix: give --config oppsync's TOML file",
            path.display()
        ))
    })?;
    Config::from_toml(&text, &path.display().to_string()).map_err(|e| CliError::Usage(e.to_string()))
}

/// Both systems' settings from the environment (read through `get`, so tests can pass a map).
/// Every missing variable is named at once.
pub fn endpoints(
    config: &Config,
    get: impl Fn(&str) -> Option<String>,
) -> Result<(DataverseSettings, MarketoSettings), CliError> {
    let value = |name: &str| get(name).filter(|v| !v.trim().is_empty());
    let missing: Vec<&str> = REQUIRED_ENV.iter().copied().filter(|n| value(n).is_none()).collect();
    if !missing.is_empty() {
        return Err(CliError::Usage(format!(
            "missing environment variables: {}. Fix: set them (README.md, section \"Run it against your systems\"); DYNAMICS_TOKEN_URL is optional",
            missing.join(", ")
        )));
    }
    let v = |name: &str| value(name).unwrap_or_default();
    let mut dynamics = DataverseSettings::new(
        &v("DYNAMICS_URL"),
        &v("DYNAMICS_TENANT_ID"),
        &v("DYNAMICS_CLIENT_ID"),
        oppsync_dynamics::Secret::from(v("DYNAMICS_CLIENT_SECRET")),
        value("DYNAMICS_TOKEN_URL").as_deref(),
    )
    .map_err(|e| CliError::Usage(format!("Dynamics: {e}")))?;
    dynamics.page_size = config.dataverse.page_size;
    dynamics.concurrency = config.dataverse.concurrency;
    let marketo = MarketoSettings::new(
        &v("MARKETO_URL"),
        &v("MARKETO_CLIENT_ID"),
        oppsync_marketo::Secret::from(v("MARKETO_CLIENT_SECRET")),
    )
    .map_err(|e| CliError::Usage(format!("Marketo: {e}")))?;
    Ok((dynamics, marketo))
}

/// The state store the flags name.
pub enum Store {
    Sqlite(SqliteStore),
    Dynamo(DynamoStore),
}

/// How a command opens a SQLite state file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// For reading and writing (creating it if there is none), with this process alone on it.
    CreateIfMissing,
    /// For reading only, changing and creating nothing; there must be one.
    ReadOnly,
    /// For reading only; with no file yet, an empty state (what `plan` sees before a sync).
    ReadOnlyOrEmpty,
}

pub async fn open_store(args: &StateArgs, open: Open) -> Result<Store, CliError> {
    if let Some(table) = &args.table {
        let table =
            oppsync_support::input::text("--table", table, 255, false).map_err(|e| CliError::Usage(e.to_string()))?;
        // DynamoDB's rule for table names: 3 to 255 of a-z, A-Z, 0-9, `_`, `-` and `.`.
        if table.len() < 3 || !table.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) {
            return Err(CliError::Usage(format!(
                "--table {} is not a DynamoDB table name. Fix: give the table's name (3 to 255 of letters, digits, `_`, `-` and `.`), as the stack's outputs show it",
                oppsync_support::input::shown(table)
            )));
        }
        return Ok(Store::Dynamo(DynamoStore::connect(table, None).await));
    }
    let path = args.state.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_STATE));
    if open != Open::CreateIfMissing {
        lock_shared(&path);
        return match SqliteStore::open_read_only(&path) {
            Ok(store) => Ok(Store::Sqlite(store)),
            Err(oppsync_state::StateError::File {
                problem: FileProblem::Missing,
                ..
            }) if open == Open::ReadOnlyOrEmpty => SqliteStore::empty()
                .map(Store::Sqlite)
                .map_err(|e| CliError::Fatal(format!("state store: {e}"))),
            Err(e) => Err(state_file_error(e)),
        };
    }
    let store = SqliteStore::open(&path).map_err(state_file_error)?;
    lock_exclusively(&path)?;
    // This process is now the only one on the file: what an earlier run that died held
    // (claims, the poller's lease) is free at once, not when it expires.
    let freed = store
        .release_abandoned()
        .await
        .map_err(|e| CliError::Fatal(format!("state store: {e}")))?;
    if freed > 0 {
        tracing::warn!(
            records = freed,
            "freed the claims an earlier run left behind when it stopped"
        );
    }
    Ok(Store::Sqlite(store))
}

/// A state file the flags name that cannot be used: a wrong path is a bad argument (exit 2),
/// the right file unusable is fatal (exit 3).
pub fn state_file_error(e: oppsync_state::StateError) -> CliError {
    match &e {
        oppsync_state::StateError::File { problem, .. } if problem.is_wrong_path() => CliError::Usage(e.to_string()),
        _ => CliError::Fatal(e.to_string()),
    }
}

/// Removes a temporary state file and the files SQLite and the lock keep beside it.
pub fn remove_state(path: &Path) {
    for suffix in ["", "-wal", "-shm", ".lock"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(file));
    }
}

/// The OS lock on `<state>.lock`, held until the process exits.
static STATE_LOCK: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();

/// Takes an exclusive OS lock beside the state file, so two `oppsync` runs never share one
/// SQLite state (the lock dies with the process, however it ends).
pub fn lock_exclusively(path: &Path) -> Result<(), CliError> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| CliError::Fatal(format!("cannot create {}: {e}", lock_path.display())))?;
    match file.try_lock() {
        Ok(()) => {
            let _ = STATE_LOCK.set(file);
            Ok(())
        }
        Err(std::fs::TryLockError::WouldBlock) => Err(CliError::Fatal(format!(
            "another oppsync is using the state {}; wait for it to finish (or use another --state)",
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(CliError::Fatal(format!("cannot lock {}: {e}", lock_path.display())))
        }
    }
}

/// A reader's shared hold on `<state>.lock`, if the file is there (a reader creates nothing):
/// while it is held no writer starts, so the state can be read without SQLite's side files. A
/// writer already running keeps its write-ahead log open, and the state is read through it.
fn lock_shared(path: &Path) {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    if let Ok(file) = std::fs::File::open(PathBuf::from(lock_path))
        && file.try_lock_shared().is_ok()
    {
        let _ = STATE_LOCK.set(file);
    }
}

/// Runs `$body` with `$store` bound to whichever store the flags chose.
#[macro_export]
macro_rules! with_store {
    ($store:expr, |$s:ident| $body:expr) => {
        match $store {
            $crate::context::Store::Sqlite($s) => $body,
            $crate::context::Store::Dynamo($s) => $body,
        }
    };
}

/// Runs `$body` with `$p` bound to the pipeline the flags and the environment describe: the
/// configuration, both systems' endpoints and the state store (locked), checked in that order,
/// so a mistake is found before anything is opened or read.
#[macro_export]
macro_rules! with_pipeline {
    ($state:expr, |$p:ident| $body:expr) => {
        $crate::with_pipeline!($state, $crate::context::Open::CreateIfMissing, |$p| $body)
    };
    ($state:expr, $open:expr, |$p:ident| $body:expr) => {{
        let state: &$crate::context::StateArgs = $state;
        let config = $crate::context::load_config(state.config.as_deref())?;
        let (dynamics, marketo) = $crate::context::endpoints(&config, |k| std::env::var(k).ok())?;
        let store = $crate::context::open_store(state, $open).await?;
        $crate::with_store!(store, |s| {
            let $p = $crate::context::pipeline(s, config, dynamics, marketo)?;
            $body
        })
    }};
}

/// The two HTTP clients over real endpoints, held to the configuration's Marketo budget.
pub fn clients(
    config: &Config,
    dynamics: DataverseSettings,
    marketo: MarketoSettings,
) -> Result<(DataverseClient, MarketoClient), CliError> {
    let dataverse = DataverseClient::new(dynamics).map_err(|e| CliError::Usage(format!("Dynamics: {e}")))?;
    let marketo = MarketoClient::new(
        marketo,
        Limiter::new(config.marketo.limiter()),
        config.marketo.daily_budget,
    )
    .map_err(|e| CliError::Usage(format!("Marketo: {e}")))?;
    Ok((dataverse, marketo))
}

/// The pipeline over real endpoints.
pub fn pipeline<S>(
    store: S,
    config: Config,
    dynamics: DataverseSettings,
    marketo: MarketoSettings,
) -> Result<Pipeline<S>, CliError> {
    let (dataverse, marketo) = clients(&config, dynamics, marketo)?;
    Ok(Pipeline::new(
        store,
        dataverse,
        marketo,
        config,
        format!("oppsync-cli-{}", std::process::id()),
    ))
}

/// Names the system in a pipeline error, so "wrong credentials" says whose.
pub fn describe(e: &oppsync_pipeline::PipelineError) -> String {
    use oppsync_pipeline::PipelineError as P;
    match e {
        P::Dataverse(e) => format!("Dynamics: {e}"),
        P::Marketo(e) => format!("Marketo: {e}"),
        P::State(e) => format!("state store: {e}"),
        P::Refused(message) => message.clone(),
    }
}

pub fn fatal(e: oppsync_pipeline::PipelineError) -> CliError {
    CliError::Fatal(describe(&e))
}

/// Waits for Ctrl-C or SIGTERM; names the one that came.
pub async fn interrupted() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}

/// Runs a command that writes until it ends or a signal stops it. Stopped, it exits 130
/// (SIGINT) or 143 (SIGTERM) as a shell reports a process the signal killed, and says so: what
/// it read stays queued, and it holds nothing a next run must wait for (with a SQLite state
/// the next run frees its claims at once; on a DynamoDB table they lapse after the claim TTL).
pub async fn stoppable(
    command: &str,
    run: impl std::future::Future<Output = Result<std::process::ExitCode, CliError>>,
) -> Result<std::process::ExitCode, CliError> {
    tokio::select! {
        outcome = run => outcome,
        signal = interrupted() => {
            eprintln!("oppsync {command}: stopped by {signal}; what was read stays queued for the next run");
            Ok(std::process::ExitCode::from(match signal { "SIGTERM" => 143, _ => 130 }))
        }
    }
}
