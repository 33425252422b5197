//! `oppsync demo`: the whole product against the built-in simulators, on embedded defaults.
//!
//! 1. starts the Dataverse and Marketo simulators on loopback and seeds every customer and
//!    stakeholder case;
//! 2. polls and drains (the initial sync) on a SQLite store;
//! 3. changes Dynamics the way users do: an amount, a stakeholder added and one removed, a
//!    customer switched from an account to a contact, an opportunity won, one deleted, one
//!    excluded by the sync filter;
//! 4. polls and drains again (the incremental sync);
//! 5. prints what happened and checks Marketo's end state against the rules, written a second
//!    time independently of the mapping crate (`oppsync_simulators::oracle`).
//!
//! Marketo's 20-second rate window is compressed to one second on both sides: the same calls,
//! without the waiting, so the demo finishes in seconds. The call counts are what they would be.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use oppsync_dynamics::{DataverseClient, DataverseSettings};
use oppsync_marketo::{Limiter, LimiterSettings, MarketoClient, MarketoSettings};
use oppsync_pipeline::{Config, DrainReport, Pipeline, Stage};
use oppsync_simulators::dataverse::{DataverseConfig, Mix, Seeded, Table, seed_id};
use oppsync_simulators::marketo::Snapshot;
use oppsync_simulators::oracle::{self, Rules};
use oppsync_simulators::{DataverseSim, MarketoConfig, MarketoSim};
use oppsync_state::{SqliteStore, StateStore, Status};
use serde_json::json;

use crate::CliError;
use crate::context;
use crate::progress::Progress;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How many opportunities to seed in the Dataverse simulator (10 to 200,000).
    #[arg(long, default_value_t = 5_000)]
    opportunities: u64,
    /// The seed of the data generator: the same seed, the same data.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// The SQLite state file (default: a new file in the system's temporary directory).
    #[arg(long)]
    state: Option<PathBuf>,
}

/// The demo's configuration: the defaults plus the sync filter, so that one scripted change can
/// show a record being excluded.
const DEMO_CONFIG: &str = "[mapping]\nsync_filter = \"new_synctomkto\"\n";
const SYNC_FILTER: &str = "new_synctomkto";

pub async fn run(args: DemoArgs) -> Result<ExitCode, CliError> {
    if !(10..=200_000).contains(&args.opportunities) {
        return Err(CliError::Usage(format!(
            "--opportunities {} is out of range: give 10 to 200000",
            args.opportunities
        )));
    }
    let started = Instant::now();
    let fatal = |what: &str| {
        let what = what.to_owned();
        move |e: std::io::Error| CliError::Fatal(format!("{what}: {e}"))
    };
    let dv = DataverseSim::start(DataverseConfig::default())
        .await
        .map_err(fatal("starting the Dataverse simulator"))?;
    let mk = MarketoSim::start(MarketoConfig {
        rate_window: Duration::from_secs(1),
        ..MarketoConfig::default()
    })
    .await
    .map_err(fatal("starting the Marketo simulator"))?;
    let seeded = dv.seed(args.opportunities, args.seed, Mix::Realistic);
    let (state_path, temporary) = match &args.state {
        Some(path) => (path.clone(), false),
        None => (
            std::env::temp_dir().join(format!(
                "oppsync-demo-{}-{}.db",
                std::process::id(),
                started.elapsed().as_nanos()
            )),
            true,
        ),
    };
    if !temporary {
        refuse_used_state(&state_path)?;
    }
    let store = SqliteStore::open(&state_path).map_err(context::state_file_error)?;
    context::lock_exclusively(&state_path)?;
    let outcome = tokio::select! {
        outcome = demo(store.clone(), &dv, &mk, &seeded, &state_path, temporary, started) => outcome,
        signal = context::interrupted() => {
            eprintln!("oppsync demo: stopped by {signal}");
            Ok(ExitCode::from(match signal { "SIGTERM" => 143, _ => 130 }))
        }
    };
    if temporary {
        context::remove_state(&state_path);
    } else {
        // The kept file holds no claim or lease of this run's: a later command need not wait
        // for them to expire.
        let _ = store.release_abandoned().await;
    }
    outcome
}

/// The demo starts from an empty state every run (its simulators are new each time, and a
/// stored cursor would point at the last run's): a file that holds state already is refused,
/// never emptied, since it may be a real sync's.
fn refuse_used_state(path: &std::path::Path) -> Result<(), CliError> {
    match SqliteStore::open_read_only(path) {
        Err(oppsync_state::StateError::File {
            problem: oppsync_state::FileProblem::Missing,
            ..
        }) => Ok(()),
        Ok(_)
        | Err(oppsync_state::StateError::File {
            problem: oppsync_state::FileProblem::Older { .. },
            ..
        }) => Err(CliError::Usage(format!(
            "the state file {} holds an earlier run's state, and the demo starts from an empty state each time (its simulators are new). Fix: remove the file, or give --state a new path",
            path.display()
        ))),
        Err(e) => Err(context::state_file_error(e)),
    }
}

/// The demo itself, on a state opened for it.
async fn demo(
    store: SqliteStore,
    dv: &DataverseSim,
    mk: &MarketoSim,
    seeded: &Seeded,
    state_path: &std::path::Path,
    temporary: bool,
    started: Instant,
) -> Result<ExitCode, CliError> {
    let config =
        Config::from_toml(DEMO_CONFIG, "the demo's configuration").map_err(|e| CliError::Usage(e.to_string()))?;
    let pipeline = Pipeline::new(
        store,
        dataverse_client(dv)?,
        marketo_client(mk)?,
        config,
        format!("oppsync-demo-{}", std::process::id()),
    );

    println!(
        "oppsync demo: {} opportunities in the Dataverse simulator ({} accounts, {} contacts, {} users who own them), state in {}",
        seeded.opportunities.len(),
        seeded.accounts.len(),
        seeded.contacts.len(),
        seeded.users.len(),
        if temporary {
            "a temporary file, removed at the end".to_owned()
        } else {
            format!(
                "{} (kept: `oppsync status --state {}` reads it)",
                state_path.display(),
                state_path.display()
            )
        }
    );
    println!("Marketo's 20 s rate window is compressed to 1 s: the same calls, without the waiting.\n");

    let initial = round(&pipeline, dv, mk, "initial sync", seeded.opportunities.len()).await?;

    let script = change_dynamics(dv, seeded);
    println!("\nChanged in Dynamics:");
    for line in &script.lines {
        println!("  - {line}");
    }
    println!();
    let incremental = round(&pipeline, dv, mk, "incremental sync", script.lines.len()).await?;

    let (expected, snapshot, diff) = judge(dv, mk, &script);

    let counts = pipeline
        .store()
        .counts()
        .await
        .map_err(|e| CliError::Fatal(e.to_string()))?;
    println!("\nRecords by status:");
    for status in Status::ALL {
        let n = counts.get(status);
        if n > 0 {
            println!("  {:<10} {n:>8}", status.as_str());
        }
    }
    println!(
        "\nMarketo now holds {} opportunities, {} roles, {} companies, {} sales persons, {} leads.",
        snapshot.opportunities.len(),
        snapshot.roles.len(),
        snapshot.companies.len(),
        snapshot.sales_persons.len(),
        snapshot.leads.len()
    );
    println!("Total time: {:.1} s", started.elapsed().as_secs_f64());

    let failed = initial.failed + incremental.failed;
    let code = exit_code(diff.len(), failed);
    if !diff.is_empty() {
        println!(
            "\nFAIL: Marketo differs from the rules in {} places; the first ones:",
            diff.len()
        );
        for d in diff.iter().take(20) {
            println!("  {d}");
        }
        return Ok(ExitCode::from(code));
    }
    if failed > 0 {
        println!("\nFAIL: {failed} records failed (run with RUST_LOG=warn to see why)");
        return Ok(ExitCode::from(code));
    }
    println!(
        "\nPASS: Marketo matches Dynamics by the rules, record by record ({} opportunities, {} roles, {} companies, {} sales persons checked).",
        expected.opportunities.len(),
        expected.roles.len(),
        expected.companies.len(),
        expected.sales_persons.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// One poll and drain, with its progress and summary.
async fn round(
    pipeline: &Pipeline<SqliteStore>,
    dv: &DataverseSim,
    mk: &MarketoSim,
    name: &str,
    expected_records: usize,
) -> Result<DrainReport, CliError> {
    let started = Instant::now();
    let before = endpoint_counts(mk);
    let held_before = mk.snapshot();
    let dv_before = dv.requests();
    let poll = pipeline
        .poll(None)
        .await
        .map_err(|e| CliError::Fatal(format!("poll: {e}")))?;
    let mut transform = Progress::new("transform", expected_records);
    let mut write = Progress::new("write", expected_records);
    let report = pipeline
        .drain(|stage, n| match stage {
            Stage::Transform => transform.add(n),
            Stage::Write => write.add(n),
        })
        .await
        .map_err(|e| CliError::Fatal(format!("{name}: {e}")))?;
    transform.finish();
    write.finish();
    let elapsed = started.elapsed();
    println!(
        "{name}: {} changes read, {} planned, {} unchanged or filtered (no Marketo call), {} written, {} failed, in {:.1} s",
        poll.marked + poll.requeued,
        report.transformed,
        report.unchanged,
        report.written,
        report.failed,
        elapsed.as_secs_f64()
    );
    let after = endpoint_counts(mk);
    let mut calls = 0;
    let mut by_endpoint = Vec::new();
    for (name, (c, _)) in &after {
        let c = c - before.get(name).map_or(0, |b| b.0);
        if c > 0 {
            calls += c;
            by_endpoint.push(format!("{name} {c}"));
        }
    }
    let least = mk.snapshot().minimum_since(&held_before);
    let minimum = least.calls();
    // Marketo's preflight (two describes before this process's first write) carries no record.
    let preflight: u64 = [
        oppsync_marketo::Operation::OpportunityDescribe.name(),
        oppsync_marketo::Operation::RoleDescribe.name(),
    ]
    .iter()
    .map(|name| after.get(name).map_or(0, |a| a.0) - before.get(name).map_or(0, |b| b.0))
    .sum();
    let writes = calls - preflight;
    println!(
        "  Marketo calls: {calls} ({preflight} the preflight's describes), {writes} carrying records against an honest minimum of {minimum} (every record Marketo came to hold or lost, written once, 300 a call): {:.2}× the minimum",
        if minimum == 0 {
            1.0
        } else {
            writes as f64 / minimum as f64
        }
    );
    let moved: Vec<String> = least
        .by_object
        .iter()
        .filter(|(_, (w, d))| w + d > 0)
        .map(|(object, (w, d))| match d {
            0 => format!("{object} {w} written"),
            _ => format!("{object} {w} written, {d} deleted"),
        })
        .collect();
    println!("    records: {}", moved.join("; "));
    println!("    {}", by_endpoint.join(", "));
    println!(
        "    a one-call-per-record integration would make at least {}",
        report.written
    );
    println!("  Dataverse requests: {}", dv.requests() - dv_before);
    Ok(report)
}

/// Calls and records carried, by endpoint.
fn endpoint_counts(mk: &MarketoSim) -> BTreeMap<&'static str, (u64, u64)> {
    crate::simulate::ENDPOINTS
        .into_iter()
        .map(|(name, endpoint)| (name, (mk.calls(endpoint), mk.records(endpoint))))
        .collect()
}

fn dataverse_client(dv: &DataverseSim) -> Result<DataverseClient, CliError> {
    let (tenant, id, secret) = dv.credentials();
    let settings = DataverseSettings::new(
        &dv.url(),
        &tenant,
        &id,
        oppsync_dynamics::Secret::from(secret),
        Some(&dv.token_url()),
    )
    .map_err(|e| CliError::Fatal(e.to_string()))?;
    DataverseClient::new(settings).map_err(|e| CliError::Fatal(e.to_string()))
}

fn marketo_client(mk: &MarketoSim) -> Result<MarketoClient, CliError> {
    let settings = MarketoSettings::new(
        &mk.url(),
        &mk.client_id(),
        oppsync_marketo::Secret::from(mk.client_secret()),
    )
    .map_err(|e| CliError::Fatal(e.to_string()))?;
    let limits = LimiterSettings {
        window: Duration::from_secs(1),
        ..LimiterSettings::default()
    };
    MarketoClient::new(settings, Limiter::new(limits), 40_000).map_err(|e| CliError::Fatal(e.to_string()))
}

/// What the scripted round changed, for the summary and the end-state check.
/// Marketo's end state against the rules applied to what Dynamics holds: what was expected,
/// what Marketo holds, and each difference (the record excluded by the sync filter must keep
/// its old name).
fn judge(dv: &DataverseSim, mk: &MarketoSim, script: &Script) -> (oracle::Expected, Snapshot, Vec<String>) {
    let rules = Rules {
        sync_filter: Some(SYNC_FILTER.into()),
        ..Rules::default()
    };
    let expected = oracle::expected(dv, &rules);
    let snapshot = mk.snapshot();
    let mut diff = oracle::differences(&expected, &snapshot, &BTreeSet::from([script.excluded.clone()]));
    let excluded_name = snapshot
        .opportunities
        .get(&script.excluded)
        .and_then(|f| f.get("name").cloned());
    if excluded_name != Some(json!(script.excluded_old_name)) {
        diff.push(format!(
            "opportunity {}: excluded by the sync filter, yet Marketo's name changed to {excluded_name:?}",
            script.excluded
        ));
    }
    (expected, snapshot, diff)
}

/// The demo's exit: 1 when Marketo differs from the rules or a record failed, else 0.
fn exit_code(differences: usize, failed: u64) -> u8 {
    u8::from(differences > 0 || failed > 0)
}

struct Script {
    lines: Vec<String>,
    excluded: String,
    excluded_old_name: String,
}

fn change_dynamics(dv: &DataverseSim, seeded: &Seeded) -> Script {
    let o = |n: usize| seeded.opportunities[n % seeded.opportunities.len()].clone();
    let contact = |n: u64| seed_id(0xc000_0000, n % seeded.contacts.len() as u64);
    let mut lines = Vec::new();

    let id = o(1);
    dv.upsert(Table::Opportunities, &id, json!({"estimatedvalue": 98765.43}), &[]);
    lines.push(format!("{id}: amount changed to 98765.43"));

    let id = o(2);
    dv.add_stakeholder(&id, &contact(5), &seed_id(0xf000_0000, 2));
    lines.push(format!("{id}: stakeholder {} added", contact(5)));

    if let Some((opportunity, pairs)) = seeded.stakeholders.iter().find(|(_, pairs)| !pairs.is_empty()) {
        dv.remove_connection(&pairs[0]);
        lines.push(format!("{opportunity}: a stakeholder removed"));
    }

    let id = o(3);
    let switched_to = contact(12);
    dv.upsert(
        Table::Opportunities,
        &id,
        json!({"_customerid_value": switched_to, "_parentaccountid_value": null, "_parentcontactid_value": switched_to}),
        &[("_customerid_value", "contact"), ("_parentcontactid_value", "contact")],
    );
    lines.push(format!("{id}: customer switched to contact {switched_to}"));

    let id = o(4);
    dv.upsert(
        Table::Opportunities,
        &id,
        json!({"statecode": 1, "statuscode": 3, "actualclosedate": "2026-11-30"}),
        &[],
    );
    lines.push(format!("{id}: won"));

    let id = o(5);
    dv.delete(Table::Opportunities, &id);
    lines.push(format!("{id}: deleted"));

    // A new seller takes over an opportunity: a new Marketo sales person, named by it.
    let id = o(7);
    let seller = seed_id(0x5e00_0000, 999_999);
    dv.upsert(
        Table::SystemUsers,
        &seller,
        json!({"firstname": "Nova", "lastname": "Seller", "internalemailaddress": "nova.seller@example.com"}),
        &[],
    );
    dv.upsert(
        Table::Opportunities,
        &id,
        json!({"_ownerid_value": seller}),
        &[("_ownerid_value", "systemuser")],
    );
    lines.push(format!(
        "{id}: owner changed to a new user {seller} (a new sales person)"
    ));

    let excluded = o(6);
    let excluded_old_name = dv
        .row(Table::Opportunities, &excluded)
        .and_then(|r| r.attributes.get("name").and_then(|n| n.as_str()).map(str::to_owned))
        .unwrap_or_default();
    dv.upsert(
        Table::Opportunities,
        &excluded,
        json!({SYNC_FILTER: false, "name": "Renamed after it was excluded"}),
        &[],
    );
    lines.push(format!(
        "{excluded}: {SYNC_FILTER} set to No, then renamed (Marketo keeps the old name)"
    ));

    Script {
        lines,
        excluded,
        excluded_old_name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exit 1 when the demo's end state differs from the rules: Dynamics changed after the
    /// sync (as a lost write would leave it) is judged by the same comparison the demo makes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_demos_end_state_differs_from_the_rules_exits_1() {
        let dv = DataverseSim::start(DataverseConfig::default()).await.unwrap();
        let mk = MarketoSim::start(MarketoConfig::default()).await.unwrap();
        let seeded = dv.seed(30, 5, Mix::Realistic);
        let script = Script {
            lines: vec![],
            excluded: seeded.opportunities[0].clone(),
            excluded_old_name: String::new(),
        };
        // Nothing was written: Marketo holds none of what the rules expect.
        let (_, _, diff) = judge(&dv, &mk, &script);
        assert!(diff.len() > 30, "{diff:?}");
        assert_eq!(exit_code(diff.len(), 0), 1);
        assert_eq!(exit_code(0, 2), 1);
        assert_eq!(exit_code(0, 0), 0);
    }
}
