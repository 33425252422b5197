//! `oppsync bench`: the product against the API ceilings. The simulators run in a child process
//! (`oppsync simulate`), so the peak memory reported is the pipeline's own: the poller, the
//! transformer and the writer over an embedded SQLite store, as `oppsync sync` runs them.
//!
//! Default mode: Marketo's rate window compressed to one second and its limits lifted, so the
//! wall time is the product's own work and the call counts are what they would be. `--limits`:
//! Marketo's real limits (100 calls per 20 s, 10 at once) enforced by the simulator, the product's
//! default budget (50 per 20 s, 5 at once) in the client, and each call taking `--latency-ms`;
//! throughput is reported against the ceiling that budget allows.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use oppsync_dynamics::{DataverseClient, DataverseSettings};
use oppsync_marketo::{Limiter, LimiterSettings, MarketoClient, MarketoSettings};
use oppsync_pipeline::{Config, Pipeline};
use oppsync_state::SqliteStore;
use serde_json::{Value, json};

use crate::CliError;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Opportunities to sync, each with a contact customer (with a parent account) and 2
    /// stakeholders.
    #[arg(long, default_value_t = 100_000)]
    pub opportunities: u64,
    /// Enforce Marketo's real rate and concurrency limits, at the product's default budget.
    #[arg(long)]
    pub limits: bool,
    /// With --limits: the time each Marketo call takes, in milliseconds.
    #[arg(long, default_value_t = 150)]
    pub latency_ms: u64,
    /// The share of opportunities changed for the incremental round, in percent.
    #[arg(long, default_value_t = 1.0)]
    pub changed_percent: f64,
    /// The data generator's seed.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// An account customer and no stakeholders each, so the simulators can hold a million
    /// opportunities (the default shape is eight Dataverse rows an opportunity).
    #[arg(long)]
    pub lean: bool,
    /// The results as one JSON document on stdout (the text report goes to stderr).
    #[arg(long)]
    pub json: bool,
}

/// The simulators' process.
struct Simulators {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Simulators {
    fn start(args: &BenchArgs) -> Result<(Simulators, Value), CliError> {
        let exe = std::env::current_exe().map_err(|e| CliError::Fatal(format!("cannot find this program: {e}")))?;
        let mut command = Command::new(exe);
        command.args([
            "simulate",
            "--opportunities",
            &args.opportunities.to_string(),
            "--seed",
            &args.seed.to_string(),
        ]);
        if args.lean {
            command.arg("--lean");
        }
        if args.limits {
            command.args(["--latency-ms", &args.latency_ms.to_string()]);
        } else {
            command.args(["--no-limits", "--window-ms", "1000"]);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| CliError::Fatal(format!("cannot start the simulators: {e}")))?;
        let stdin = child.stdin.take().ok_or_else(|| CliError::Fatal("no stdin".into()))?;
        let stdout = BufReader::new(child.stdout.take().ok_or_else(|| CliError::Fatal("no stdout".into()))?);
        let mut sims = Simulators { child, stdin, stdout };
        let hello = sims.read()?;
        Ok((sims, hello))
    }

    fn read(&mut self) -> Result<Value, CliError> {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .map_err(|e| CliError::Fatal(format!("simulators: {e}")))?;
        serde_json::from_str(&line).map_err(|e| CliError::Fatal(format!("simulators answered `{}`: {e}", line.trim())))
    }

    fn ask(&mut self, command: &str) -> Result<Value, CliError> {
        writeln!(self.stdin, "{command}").map_err(|e| CliError::Fatal(format!("simulators: {e}")))?;
        self.read()
    }
}

impl Drop for Simulators {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The CPU time this process (the pipeline, without the simulators) has used, in seconds.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // The kernel's USER_HZ is 100 on every Linux this runs on.
    Some(ticks / 100.0)
}

/// This process's peak resident memory (VmHWM), in bytes.
fn peak_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The describes of Marketo's preflight made between two stats.
fn preflight_calls(after: &Value, before: &Value) -> u64 {
    [
        oppsync_marketo::Operation::OpportunityDescribe,
        oppsync_marketo::Operation::RoleDescribe,
    ]
    .into_iter()
    .map(|op| delta(after, before, op.name(), "calls"))
    .sum()
}

fn calls_total(stats: &Value) -> u64 {
    stats["calls"]
        .as_object()
        .map_or(0, |m| m.values().filter_map(Value::as_u64).sum())
}

fn delta(after: &Value, before: &Value, endpoint: &str, what: &str) -> u64 {
    after[what][endpoint].as_u64().unwrap_or(0) - before[what][endpoint].as_u64().unwrap_or(0)
}

/// Runs the bench until it ends or a signal stops it; stopped, its simulators and its state
/// file go with it (a killed bench once left a 237 MB state file behind).
pub async fn run(args: BenchArgs) -> Result<ExitCode, CliError> {
    tokio::select! {
        // The signal first: its handler is in place before the bench's first (blocking) steps.
        biased;
        signal = crate::context::interrupted() => {
            eprintln!("oppsync bench: stopped by {signal}; its simulators and state file are removed");
            Ok(ExitCode::from(match signal { "SIGTERM" => 143, _ => 130 }))
        }
        outcome = measure(args) => outcome,
    }
}

/// The bench's state file, removed however the run ends (done, an error, a signal).
struct BenchState(std::path::PathBuf);

impl Drop for BenchState {
    fn drop(&mut self) {
        crate::context::remove_state(&self.0);
    }
}

async fn measure(args: BenchArgs) -> Result<ExitCode, CliError> {
    if args.opportunities < 300 {
        return Err(CliError::Usage("--opportunities must be at least 300".into()));
    }
    if !(args.changed_percent > 0.0 && args.changed_percent <= 100.0) {
        return Err(CliError::Usage(
            "--changed-percent must be more than 0 and at most 100".into(),
        ));
    }
    let (mut sims, hello) = Simulators::start(&args)?;
    let text = |k: &str, f: &str| hello[k][f].as_str().unwrap_or_default().to_owned();
    let dataverse = DataverseClient::new(
        DataverseSettings::new(
            &text("dynamics", "url"),
            &text("dynamics", "tenant"),
            &text("dynamics", "client_id"),
            oppsync_dynamics::Secret::from(text("dynamics", "secret")),
            Some(&text("dynamics", "token_url")),
        )
        .map_err(|e| CliError::Fatal(e.to_string()))?,
    )
    .map_err(|e| CliError::Fatal(e.to_string()))?;
    let config = Config::default();
    let limits = if args.limits {
        config.marketo.limiter()
    } else {
        LimiterSettings {
            calls_per_window: 1_000_000,
            window: Duration::from_secs(1),
            concurrency: config.marketo.limiter().concurrency,
        }
    };
    let budget = config.marketo.limiter();
    let marketo = MarketoClient::new(
        MarketoSettings::new(
            &text("marketo", "url"),
            &text("marketo", "client_id"),
            oppsync_marketo::Secret::from(text("marketo", "secret")),
        )
        .map_err(|e| CliError::Fatal(e.to_string()))?,
        Limiter::new(limits),
        u64::MAX,
    )
    .map_err(|e| CliError::Fatal(e.to_string()))?;
    // Declared before the store, so the store is closed before the file is removed.
    let state = BenchState(std::env::temp_dir().join(format!("oppsync-bench-{}.db", std::process::id())));
    let store = SqliteStore::open(&state.0).map_err(|e| CliError::Fatal(e.to_string()))?;
    let pipeline = Pipeline::new(store, dataverse, marketo, config, "oppsync-bench");
    let n = args.opportunities;
    eprintln!(
        "oppsync bench: {n} opportunities ({}), {} mode",
        if args.lean {
            "an account customer and no stakeholders each"
        } else {
            "a contact customer with a parent account and 2 stakeholders each"
        },
        if args.limits { "Marketo-limits" } else { "unthrottled" }
    );

    // The initial sync.
    let before = sims.ask("stats")?;
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    sync(&pipeline).await?;
    let initial_time = started.elapsed();
    let cpu = cpu_seconds().zip(cpu_before).map(|(a, b)| a - b);
    let after = sims.ask("stats")?;
    let held = &after["held"];
    let count = |k: &str| held[k].as_u64().unwrap_or(0);
    // The honest minimum: every record Marketo now holds written once, 300 a call per object.
    let minimum = after["minimum_since_last"]["calls"].as_u64().unwrap_or(0);
    let calls = calls_total(&after) - calls_total(&before);
    // The preflight (two describes, once per process before its first write) writes no record:
    // reported beside the ratio, which counts the calls that carry records.
    let preflight = preflight_calls(&after, &before);
    let records = count("opportunities") + count("companies") + count("leads") + count("roles");
    let dataverse =
        after["dataverse_requests"].as_u64().unwrap_or(0) - before["dataverse_requests"].as_u64().unwrap_or(0);
    let per_thousand = |x: u64| x as f64 * 1000.0 / n as f64;
    let ratio = (calls - preflight) as f64 / minimum.max(1) as f64;
    let rate = n as f64 / initial_time.as_secs_f64();
    let mut report = json!({
        "mode": if args.limits { "limits" } else { "unthrottled" },
        "opportunities": n,
        "initial": {
            "seconds": initial_time.as_secs_f64(),
            "opportunities_per_second": rate,
            "pipeline_cpu_seconds": cpu,
            "marketo_calls": calls,
            "preflight_calls": preflight,
            "marketo_minimum": minimum,
            "marketo_ratio": ratio,
            "marketo_calls_per_1000": per_thousand(calls),
            "minimum_per_1000": per_thousand(minimum),
            "per_record_integration_per_1000": per_thousand(records),
            "dataverse_requests": dataverse,
            "dataverse_requests_per_1000": per_thousand(dataverse),
            "calls_by_endpoint": endpoint_deltas(&after, &before),
            "differences": after["differences"],
        },
    });
    eprintln!(
        "initial sync: {:.1} s, {rate:.0} opportunities/s",
        initial_time.as_secs_f64()
    );
    if let Some(cpu) = cpu {
        eprintln!(
            "  the pipeline's own CPU time: {cpu:.1} s ({:.0} opportunities per CPU-second; the rest is the simulators')",
            n as f64 / cpu.max(0.01)
        );
    }
    println_or_err(args.json, &format!("Marketo calls: {ratio:.2}× the minimum"));
    eprintln!(
        "  {calls} calls, {preflight} of them the preflight's describes ({:.1} per 1,000 opportunities) against a minimum of {minimum} ({:.1} per 1,000); one call per record would be {:.0} per 1,000",
        per_thousand(calls),
        per_thousand(minimum),
        per_thousand(records)
    );
    eprintln!(
        "  Dataverse requests: {dataverse} ({:.1} per 1,000)",
        per_thousand(dataverse)
    );

    if args.limits {
        // The ceiling the budget allows: the shortest time in which the minimum calls could be
        // made under it. The budget is a number of calls per sliding window and a number at
        // once: a window's calls may start together, the next window's only when it slides;
        // and no more than the calls at once are in flight, each taking the latency. (A
        // steady-state rate alone would let a run shorter than one window pass 100%.)
        let latency = args.latency_ms as f64 / 1000.0;
        let window = budget.window.as_secs_f64();
        let per_window = budget.calls_per_window.max(1) as f64;
        let at_once = budget.concurrency.max(1) as f64;
        let least = minimum.max(1) as f64;
        let by_rate = ((least - 1.0) / per_window).floor() * window + latency;
        let by_at_once = (least / at_once).ceil() * latency;
        let shortest = by_rate.max(by_at_once).max(0.001);
        let bound = if by_at_once >= by_rate {
            format!("{} calls at once at {} ms a call", budget.concurrency, args.latency_ms)
        } else {
            format!("{} calls / {} s", budget.calls_per_window, budget.window.as_secs())
        };
        let ceiling = n as f64 / shortest;
        let fraction = rate / ceiling;
        let ceiling_calls_per_s = least / shortest;
        let calls_per_s = calls as f64 / initial_time.as_secs_f64().max(0.001);
        report["limits"] = json!({
            "budget_calls_per_20s": budget.calls_per_window,
            "budget_concurrency": budget.concurrency,
            "latency_ms": args.latency_ms,
            "ceiling_opportunities_per_second": ceiling,
            "ceiling_bound_by": bound,
            "fraction_of_ceiling": fraction,
            "calls_per_second": calls_per_s,
            "ceiling_calls_per_second": ceiling_calls_per_s,
            "refused": after["refused"],
            "in_flight_high_water": after["in_flight_high_water"],
        });
        println_or_err(
            args.json,
            &format!(
                "Throughput: {:.0}% of the ceiling the budget allows ({rate:.1} of {ceiling:.1} opportunities/s; bound by {bound})",
                fraction * 100.0
            ),
        );
        eprintln!("  {calls_per_s:.2} Marketo calls/s of {ceiling_calls_per_s:.2} allowed");
        eprintln!(
            "  Marketo refused {} calls with 606 and {} with 615; at most {} in flight",
            after["refused"]["606"], after["refused"]["615"], after["in_flight_high_water"]
        );
    }

    // The incremental round.
    let changed = ((n as f64 * args.changed_percent / 100.0).round() as u64).max(1);
    sims.ask(&format!("change {changed}"))?;
    let before = sims.ask("stats")?;
    let started = Instant::now();
    sync(&pipeline).await?;
    let time = started.elapsed();
    let after = sims.ask("stats")?;
    let calls = calls_total(&after) - calls_total(&before);
    let dataverse =
        after["dataverse_requests"].as_u64().unwrap_or(0) - before["dataverse_requests"].as_u64().unwrap_or(0);
    let minimum = after["minimum_since_last"]["calls"].as_u64().unwrap_or(0);
    let ratio = calls as f64 / minimum.max(1) as f64;
    report["incremental"] = json!({
        "changed": changed,
        "seconds": time.as_secs_f64(),
        "marketo_calls": calls,
        "marketo_minimum": minimum,
        "marketo_ratio": ratio,
        "minimum_records": after["minimum_since_last"]["by_object"],
        "dataverse_requests": dataverse,
        "calls_by_endpoint": endpoint_deltas(&after, &before),
        "differences": after["differences"],
    });
    eprintln!(
        "incremental ({changed} changed): {:.2} s, {calls} Marketo calls against a minimum of {minimum} ({ratio:.2}× the minimum), {dataverse} Dataverse requests",
        time.as_secs_f64()
    );
    let peak = peak_memory();
    report["peak_memory_bytes"] = json!(peak);
    if let Some(p) = peak {
        println_or_err(args.json, &format!("Peak memory: {:.0} MB", p as f64 / 1_048_576.0));
    }
    let differences = after["differences"].as_u64().unwrap_or(u64::MAX);
    if args.json {
        println!("{report}");
    }
    if differences != 0 {
        eprintln!(
            "FAIL: Marketo differs from the rules in {differences} places: {}",
            after["first_differences"]
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

fn println_or_err(json: bool, line: &str) {
    if json {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
}

fn endpoint_deltas(after: &Value, before: &Value) -> Value {
    let mut out = serde_json::Map::new();
    for (name, _) in crate::simulate::ENDPOINTS {
        let c = delta(after, before, name, "calls");
        if c > 0 {
            out.insert(
                name.into(),
                json!({"calls": c, "records": delta(after, before, name, "records")}),
            );
        }
    }
    Value::Object(out)
}

/// Polls to the end and drains, as one `oppsync sync --once` cycle does.
async fn sync(pipeline: &Pipeline<SqliteStore>) -> Result<(), CliError> {
    loop {
        let poll = pipeline.poll(None).await.map_err(crate::context::fatal)?;
        if poll.caught_up {
            break;
        }
    }
    let report = pipeline.drain(|_, _| {}).await.map_err(crate::context::fatal)?;
    if report.failed > 0 || report.stopped.is_some() {
        return Err(CliError::Fatal(format!(
            "the benchmark's sync did not finish cleanly: {report:?}"
        )));
    }
    Ok(())
}
