//! `oppsync status`, `oppsync errors` and `oppsync runs`: the Sync Status and Sync Errors views
//! and the run history, read from the state alone (no call to Dynamics or Marketo).

use std::process::ExitCode;

use clap::{Args, ValueEnum};
use oppsync_pipeline::{Config, time};
use oppsync_state::{OpportunityState, Run, Source, StateStore, Status};
use serde_json::{Value, json};

use crate::CliError;
use crate::context::{self, Open, StateArgs};
use crate::with_store;

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub state: StateArgs,
    /// One JSON document on stdout.
    #[arg(long)]
    pub json: bool,
}

fn store_err(e: oppsync_state::StateError) -> CliError {
    CliError::Fatal(format!("state store: {e}"))
}

fn now_ms() -> i64 {
    (oppsync_pipeline::system_clock())()
}

pub async fn status(args: StatusArgs) -> Result<ExitCode, CliError> {
    let config = context::load_config(args.state.config.as_deref())?;
    let store = context::open_store(&args.state, Open::ReadOnly).await?;
    let view = with_store!(store, |s| status_view(&s, &config, now_ms()).await)?;
    if args.json {
        println!("{view}");
    } else {
        println!("Records by status:");
        for status in Status::ALL {
            println!("  {:<10} {:>9}", status.as_str(), view["counts"][status.as_str()]);
        }
        match view["oldest_pending"].as_object() {
            Some(o) => println!(
                "Oldest pending: {} for {}",
                o["id"].as_str().unwrap_or(""),
                age(o["age_seconds"].as_i64().unwrap_or(0))
            ),
            None => println!("Oldest pending: none"),
        }
        println!("Completed in the last hour: {}", view["last_hour_completed"]);
        for source in ["opportunities", "connections"] {
            match view["cursors"][source]["age_seconds"].as_i64() {
                Some(a) => println!("Cursor {source}: read {} ago", age(a)),
                None => println!("Cursor {source}: never read"),
            }
        }
        println!(
            "Marketo calls today ({}): {} of the {} budget",
            view["marketo"]["day"].as_str().unwrap_or(""),
            view["marketo"]["calls_today"],
            view["marketo"]["daily_budget"]
        );
        match serde_json::from_value::<Run>(view["last_run"].clone()) {
            Ok(run) => println!("Last run: {}", run_line(&run)),
            Err(_) => println!("Last run: none recorded"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct RunsArgs {
    #[command(flatten)]
    pub state: StateArgs,
    /// How many runs to list, newest first.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub limit: u64,
    /// One JSON array on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `oppsync runs`: the run history, newest first.
pub async fn runs(args: RunsArgs) -> Result<ExitCode, CliError> {
    let store = context::open_store(&args.state, Open::ReadOnly).await?;
    let limit = args.limit as usize;
    let runs = with_store!(store, |s| s.runs(limit, now_ms()).await.map_err(store_err))?;
    if args.json {
        println!("{}", json!(runs));
    } else if runs.is_empty() {
        println!(
            "no runs recorded yet (each `oppsync sync` cycle, `oppsync resync` and Lambda invocation records one)"
        );
    } else {
        for run in &runs {
            println!("{}", run_line(run));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One run on one line: when (UTC), how long, what, the counts, why it stopped.
fn run_line(run: &Run) -> String {
    let when = time::format_utc(run.started);
    let seconds = (run.ended - run.started).max(0) as f64 / 1000.0;
    let mut line = format!(
        "{when} {} {seconds:.1} s: {} read, {} written, {} unchanged, {} failed, {} left for retry, {} Marketo calls",
        run.command, run.read, run.written, run.unchanged, run.failed, run.left_for_retry, run.marketo_calls
    );
    if let Some(stop) = &run.stopped {
        line.push_str(&format!("; stopped: {stop}"));
    }
    line
}

fn age(seconds: i64) -> String {
    match seconds {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s => format!("{:.1} h", s as f64 / 3600.0),
    }
}

/// The status view as data.
pub async fn status_view<S: StateStore>(store: &S, config: &Config, now: i64) -> Result<Value, CliError> {
    let counts = store.counts().await.map_err(store_err)?;
    let mut by_status = serde_json::Map::new();
    for status in Status::ALL {
        by_status.insert(status.as_str().into(), json!(counts.get(status)));
    }
    let oldest = store
        .oldest_pending()
        .await
        .map_err(store_err)?
        .map(|(id, since)| json!({"id": id, "since": since, "age_seconds": (now - since).max(0) / 1000}));
    let last_hour = store.completions(now - 3_600_000, now).await.map_err(store_err)?;
    let mut cursors = serde_json::Map::new();
    for source in [Source::Opportunities, Source::Connections] {
        let c = store.cursor(source).await.map_err(store_err)?;
        cursors.insert(
            source.as_str().into(),
            json!({"updated": c.as_ref().map(|c| c.updated_at),
                   "age_seconds": c.as_ref().map(|c| (now - c.updated_at).max(0) / 1000)}),
        );
    }
    let day = time::marketo_day(now);
    let calls = store.marketo_calls(&day).await.map_err(store_err)?;
    let last_run = store.runs(1, now).await.map_err(store_err)?.into_iter().next();
    Ok(json!({
        "counts": by_status,
        "total": counts.total(),
        "oldest_pending": oldest,
        "last_hour_completed": last_hour,
        "cursors": cursors,
        "marketo": {"day": day, "calls_today": calls, "daily_budget": config.marketo.daily_budget},
        "last_run": last_run,
    }))
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Export {
    Csv,
    Json,
}

#[derive(Debug, Args)]
pub struct ErrorsArgs {
    #[command(flatten)]
    pub state: StateArgs,
    /// Only records whose id, operation, code or message contains TEXT (case-insensitive).
    #[arg(long, value_name = "TEXT")]
    pub search: Option<String>,
    /// Every matching record in a machine format on stdout.
    #[arg(long, value_enum)]
    pub export: Option<Export>,
}

pub async fn errors(args: ErrorsArgs) -> Result<ExitCode, CliError> {
    // Read as every command reads it, so a wrong --config is named here too.
    context::load_config(args.state.config.as_deref())?;
    let store = context::open_store(&args.state, Open::ReadOnly).await?;
    let failed = with_store!(store, |s| failed_records(&s).await)?;
    let needle = args.search.as_deref().map(str::to_lowercase);
    let rows: Vec<Value> = failed
        .iter()
        .map(error_row)
        .filter(|row| {
            needle.as_deref().is_none_or(|n| {
                ["id", "operation", "code", "message"]
                    .iter()
                    .any(|k| row[*k].as_str().is_some_and(|v| v.to_lowercase().contains(n)))
            })
        })
        .collect();
    match args.export {
        Some(Export::Json) => println!("{}", Value::Array(rows)),
        Some(Export::Csv) => {
            println!("id,operation,code,message,attempts,last_try");
            for r in &rows {
                let fields: Vec<String> = ["id", "operation", "code", "message", "attempts", "last_try"]
                    .iter()
                    .map(|k| csv_field(&r[*k]))
                    .collect();
                println!("{}", fields.join(","));
            }
        }
        None => {
            for r in &rows {
                println!(
                    "{}  {} {}  attempts {}  last try {}\n    {}",
                    r["id"].as_str().unwrap_or(""),
                    r["operation"].as_str().unwrap_or(""),
                    r["code"].as_str().unwrap_or(""),
                    r["attempts"],
                    r["last_try"].as_str().unwrap_or(""),
                    r["message"].as_str().unwrap_or("")
                );
            }
            println!("{} failed records", rows.len());
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn failed_records<S: StateStore>(store: &S) -> Result<Vec<OpportunityState>, CliError> {
    let mut out = Vec::new();
    let mut page = None;
    loop {
        let listed = store
            .list(Status::Failed, 1000, page.as_deref())
            .await
            .map_err(store_err)?;
        out.extend(listed.items);
        match listed.next {
            Some(next) => page = Some(next),
            None => return Ok(out),
        }
    }
}

fn error_row(s: &OpportunityState) -> Value {
    let e = s.last_error.as_ref();
    json!({
        "id": s.id,
        "operation": e.map(|e| e.operation.as_str()),
        "code": e.map(|e| e.code.as_str()),
        "message": e.map(|e| e.message.as_str()),
        "attempts": s.attempts,
        "last_try": iso(s.status_since),
    })
}

/// Unix milliseconds as ISO 8601 UTC.
fn iso(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = time::civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// RFC 4180: quoted when it holds a comma, a quote or a line break; quotes doubled. A leading
/// `=`, `+`, `-` or `@` is prefixed with `'` so a spreadsheet does not run it as a formula.
fn csv_field(v: &Value) -> String {
    let text = match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let text = if text.starts_with(['=', '+', '-', '@']) {
        format!("'{text}")
    } else {
        text
    };
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text
    }
}
