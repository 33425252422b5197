//! `oppsync simulate` (hidden): the Dataverse and Marketo simulators in a process of their
//! own, so that `oppsync bench` measures the pipeline's memory and not the simulators'.
//!
//! It prints one JSON line with the endpoints and credentials, then answers commands on stdin,
//! one a line, until stdin closes:
//! - `change N` — changes the amount of N opportunities (spread over the table) → `{"changed": N}`
//! - `stats` — Marketo calls and records by endpoint, Dataverse requests, what Marketo holds,
//!   and the differences from the rules → one JSON line

use std::collections::BTreeSet;
use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use oppsync_marketo::Operation as E;
use oppsync_simulators::dataverse::{DataverseConfig, Mix, Table, seed_id};
use oppsync_simulators::marketo::Snapshot;
use oppsync_simulators::oracle::{self, Rules};
use oppsync_simulators::{DataverseSim, MarketoConfig, MarketoSim};
use serde_json::{Value, json};

use crate::CliError;

#[derive(Debug, Clone, Args)]
pub struct SimulateArgs {
    #[arg(long, default_value_t = 1000)]
    pub opportunities: u64,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Every customer and stakeholder case instead of the benchmark's uniform shape.
    #[arg(long)]
    pub realistic: bool,
    /// An account customer and no stakeholders each (`bench --lean`).
    #[arg(long, conflicts_with = "realistic")]
    pub lean: bool,
    /// Marketo's rate window in milliseconds (Marketo: 20000).
    #[arg(long, default_value_t = 20_000)]
    pub window_ms: u64,
    /// Lift Marketo's rate and concurrency limits.
    #[arg(long)]
    pub no_limits: bool,
    /// Time each Marketo call takes, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
}

/// The Marketo operations `stats` reports, by their one name (`Operation::name`).
pub const ENDPOINTS: [(&str, E); 10] = [
    (E::CompanySync.name(), E::CompanySync),
    (E::SalesPersonSync.name(), E::SalesPersonSync),
    (E::LeadQuery.name(), E::LeadQuery),
    (E::LeadSync.name(), E::LeadSync),
    (E::OpportunitySync.name(), E::OpportunitySync),
    (E::RoleSync.name(), E::RoleSync),
    (E::RoleDelete.name(), E::RoleDelete),
    (E::OpportunityDelete.name(), E::OpportunityDelete),
    (E::OpportunityDescribe.name(), E::OpportunityDescribe),
    (E::RoleDescribe.name(), E::RoleDescribe),
];

pub async fn run(args: SimulateArgs) -> Result<ExitCode, CliError> {
    let io = |e: std::io::Error| CliError::Fatal(format!("simulator: {e}"));
    let dv = DataverseSim::start(DataverseConfig::default()).await.map_err(io)?;
    let mk = MarketoSim::start(MarketoConfig {
        rate_window: Duration::from_millis(args.window_ms.max(1)),
        rate_limit: if args.no_limits { None } else { Some(100) },
        concurrency_limit: if args.no_limits { None } else { Some(10) },
        latency: Duration::from_millis(args.latency_ms),
        daily_quota: u64::MAX,
        ..MarketoConfig::default()
    })
    .await
    .map_err(io)?;
    let mix = match (args.realistic, args.lean) {
        (true, _) => Mix::Realistic,
        (_, true) => Mix::Lean,
        _ => Mix::Uniform,
    };
    let seeded = dv.seed(args.opportunities, args.seed, mix);
    let (tenant, client, secret) = dv.credentials();
    println!(
        "{}",
        json!({
            "dynamics": {"url": dv.url(), "tenant": tenant, "client_id": client, "secret": secret, "token_url": dv.token_url()},
            "marketo": {"url": mk.url(), "client_id": mk.client_id(), "secret": mk.client_secret()},
            "opportunities": seeded.opportunities.len(),
        })
    );
    let _ = std::io::stdout().flush();
    let mut rx = stdin_lines();
    let mut round = 0u64;
    // What Marketo held at the last `stats`: the honest minimum is counted from it.
    let mut last = mk.snapshot();
    while let Some(line) = rx.recv().await {
        let mut words = line.split_whitespace();
        let reply = match (words.next(), words.next().and_then(|n| n.parse::<u64>().ok())) {
            (Some("change"), Some(n)) => {
                round += 1;
                let count = seeded.opportunities.len() as u64;
                let step = (count / n.max(1)).max(1);
                let mut changed = 0;
                for k in 0..n.min(count) {
                    let id = seed_id(0x0b00_0000, (k * step + round) % count);
                    dv.upsert(
                        Table::Opportunities,
                        &id,
                        json!({"estimatedvalue": 500_000 + k as i64 + round as i64}),
                        &[],
                    );
                    changed += 1;
                }
                json!({"changed": changed})
            }
            (Some("stats"), _) => {
                let held = mk.snapshot();
                let reply = stats(&dv, &mk, &held, &last);
                last = held;
                reply
            }
            _ => json!({"error": format!("unknown command `{line}`: use `change N` or `stats`")}),
        };
        println!("{reply}");
        let _ = std::io::stdout().flush();
    }
    Ok(ExitCode::SUCCESS)
}

/// The lines typed on stdin, read on a thread of their own so the simulators keep answering
/// on the runtime; the channel closes when stdin does.
pub fn stdin_lines() -> tokio::sync::mpsc::Receiver<String> {
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(4);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn stats(dv: &DataverseSim, mk: &MarketoSim, snapshot: &Snapshot, last: &Snapshot) -> Value {
    let mut calls = serde_json::Map::new();
    let mut records = serde_json::Map::new();
    for (name, endpoint) in ENDPOINTS {
        calls.insert(name.into(), json!(mk.calls(endpoint)));
        records.insert(name.into(), json!(mk.records(endpoint)));
    }
    let expected = oracle::expected(dv, &Rules::default());
    let differences = oracle::differences(&expected, snapshot, &BTreeSet::new());
    let minimum = snapshot.minimum_since(last);
    json!({
        "calls": calls,
        "records": records,
        "refused": {"606": mk.refused("606"), "615": mk.refused("615")},
        "in_flight_high_water": mk.concurrency_high_water(),
        "dataverse_requests": dv.requests(),
        "held": {"opportunities": snapshot.opportunities.len(), "companies": snapshot.companies.len(),
                 "sales_persons": snapshot.sales_persons.len(), "leads": snapshot.leads.len(), "roles": snapshot.roles.len()},
        "minimum_since_last": {"calls": minimum.calls(), "by_object": minimum.by_object},
        "differences": differences.len(),
        "first_differences": differences.iter().take(5).collect::<Vec<_>>(),
    })
}
