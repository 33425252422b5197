//! `oppsync sandbox`: the Dataverse and Marketo simulators on loopback until stopped, the
//! `export` lines that point every command at them, and a few changes to make in "Dynamics"
//! from the sandbox's own terminal. Nothing in it reaches a real system.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use oppsync_simulators::dataverse::{DataverseConfig, Mix, Table};
use oppsync_simulators::oracle::{self, Rules};
use oppsync_simulators::{DataverseSim, MarketoConfig, MarketoSim};
use serde_json::json;

use crate::CliError;

#[derive(Debug, Clone, Args)]
pub struct SandboxArgs {
    /// Opportunities seeded in the simulated Dynamics, of every customer and stakeholder case
    /// (1 to 100,000).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub opportunities: u64,
    /// Changes the seeded data.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Also writes the `export` lines to this file, to `source` in another shell.
    #[arg(long, value_name = "FILE")]
    pub env_file: Option<PathBuf>,
}

const HELP: &str = "Type here to change the simulated systems (one command a line):
  change N     change the amount of N opportunities in Dynamics
  delete N     delete N opportunities in Dynamics
  reject ID    Marketo rejects the next write of that opportunity (1003 Invalid data)
  ids [N]      list N opportunity ids (10 by default)
  stats        what Marketo holds, and how it differs from the rules
  help         this list
Ctrl-C stops the simulators.";

pub async fn run(args: SandboxArgs) -> Result<ExitCode, CliError> {
    let io = |e: std::io::Error| CliError::Fatal(format!("sandbox: could not start a simulator: {e}"));
    let dv = DataverseSim::start(DataverseConfig::default()).await.map_err(io)?;
    // Marketo's documented limits, as a real instance enforces them.
    // One custom opportunity field, fed by the seed's custom column new_region once
    // `oppsync fields` suggests it.
    let mk = MarketoSim::start(MarketoConfig {
        custom_opportunity_fields: vec!["region".into()],
        ..MarketoConfig::default()
    })
    .await
    .map_err(io)?;
    dv.seed(args.opportunities, args.seed, Mix::Realistic);
    let (tenant, client, secret) = dv.credentials();
    let exports: Vec<String> = [
        ("DYNAMICS_URL", dv.url()),
        ("DYNAMICS_TENANT_ID", tenant),
        ("DYNAMICS_CLIENT_ID", client),
        ("DYNAMICS_CLIENT_SECRET", secret),
        ("DYNAMICS_TOKEN_URL", dv.token_url()),
        ("MARKETO_URL", mk.url()),
        ("MARKETO_CLIENT_ID", mk.client_id()),
        ("MARKETO_CLIENT_SECRET", mk.client_secret()),
    ]
    .into_iter()
    .map(|(name, value)| format!("export {name}={value}"))
    .collect();
    if let Some(path) = &args.env_file {
        std::fs::write(path, exports.join("\n") + "\n").map_err(|e| {
            CliError::Usage(format!(
                "--env-file {}: {e}; name a file in a directory you can write",
                path.display()
            ))
        })?;
    }
    say(&format!(
        "oppsync sandbox: simulated Dynamics 365 and Marketo on loopback, {} opportunities seeded \
         (every customer and stakeholder case). Nothing here reaches a real system.\n\n\
         In another terminal, set the environment{}:\n\n{}\n\n\
         then try `oppsync validate`, `oppsync plan`, `oppsync sync`, `oppsync status` \
         (README, \"Try every command: the sandbox\").\n\n{HELP}",
        args.opportunities,
        args.env_file
            .as_ref()
            .map(|p| format!(" (or `source {}`)", p.display()))
            .unwrap_or_default(),
        exports.join("\n"),
    ));

    // A closed stdin (the sandbox run in the background) ends the commands, not the simulators.
    let mut rx = crate::simulate::stdin_lines();
    let mut commands_open = true;
    let mut round = 0u64;
    // One listener for the sandbox's life: made anew each time round the loop, a signal that
    // came while a command ran was lost, and the sandbox ran on.
    let interrupted = crate::context::interrupted();
    tokio::pin!(interrupted);
    loop {
        let line = tokio::select! {
            line = rx.recv(), if commands_open => line,
            signal = &mut interrupted => {
                say(&format!("oppsync sandbox: stopped by {signal}; the simulators are gone"));
                return Ok(ExitCode::SUCCESS);
            }
        };
        let Some(line) = line else {
            commands_open = false;
            continue;
        };
        round += 1;
        let reply = command(&dv, &mk, line.trim(), round);
        say(&reply);
    }
}

/// One line typed in the sandbox's terminal, and what it says back.
fn command(dv: &DataverseSim, mk: &MarketoSim, line: &str, round: u64) -> String {
    let mut words = line.split_whitespace();
    let word = words.next().unwrap_or_default();
    let arg = words.next();
    let count = |default: u64| -> Result<u64, String> {
        match arg {
            None => Ok(default),
            Some(n) => n
                .parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("`{word} {n}`: N is a whole number above 0")),
        }
    };
    let ids = || -> Vec<String> { dv.rows(Table::Opportunities).into_iter().map(|(id, _)| id).collect() };
    let outcome = match word {
        "" => return String::new(),
        "help" => Ok(HELP.to_owned()),
        "change" => count(1).map(|n| {
            let ids = ids();
            let step = (ids.len() as u64 / n).max(1) as usize;
            let changed: Vec<&String> = ids.iter().step_by(step).take(n as usize).collect();
            for (k, id) in changed.iter().enumerate() {
                dv.upsert(
                    Table::Opportunities,
                    id,
                    json!({"estimatedvalue": 500_000 + k as i64 * 1_000 + round as i64}),
                    &[],
                );
            }
            format!(
                "changed the amount of {} opportunities in Dynamics; `oppsync plan` shows them, `oppsync sync` writes them",
                changed.len()
            )
        }),
        "delete" => count(1).map(|n| {
            let deleted = ids()
                .iter()
                .take(n as usize)
                .filter(|id| dv.delete(Table::Opportunities, id))
                .count();
            format!("deleted {deleted} opportunities in Dynamics; `oppsync sync` deletes them from Marketo")
        }),
        "reject" => match arg {
            Some(id) if ids().iter().any(|known| known == id) => {
                mk.skip_record(id, "1003", 1);
                Ok(format!(
                    "Marketo rejects the next write of {id} (1003 Invalid data); change it, `oppsync sync`, then `oppsync errors` and `oppsync resync --failed`"
                ))
            }
            Some(id) => Err(format!("`reject {id}`: no such opportunity; `ids` lists them")),
            None => Err("`reject ID`: name an opportunity id (`ids` lists them)".to_owned()),
        },
        "ids" => count(10).map(|n| ids().into_iter().take(n as usize).collect::<Vec<_>>().join("\n")),
        "stats" => Ok({
            let held = mk.snapshot();
            let expected = oracle::expected(dv, &Rules::default());
            let differences = oracle::differences(&expected, &held, &BTreeSet::new());
            let mut out = format!(
                "Dynamics: {} opportunities. Marketo holds {} opportunities, {} companies, {} sales persons, {} leads, {} roles; {} REST calls so far.\nDifferences from the rules: {}",
                dv.count(Table::Opportunities),
                held.opportunities.len(),
                held.companies.len(),
                held.sales_persons.len(),
                held.leads.len(),
                held.roles.len(),
                mk.rest_calls(),
                differences.len()
            );
            for d in differences.iter().take(5) {
                out.push_str(&format!("\n  {d}"));
            }
            if !differences.is_empty() {
                out.push_str("\n(`oppsync sync` brings Marketo in step)");
            }
            out
        }),
        other => Err(format!("unknown command `{other}`; `help` lists them")),
    };
    outcome.unwrap_or_else(|e| format!("error: {e}"))
}

fn say(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}
