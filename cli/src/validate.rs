//! `oppsync validate`: every check a first sync depends on, each with pass or fail and the fix:
//! the configuration, the environment, both sets of credentials, read access to each Dataverse
//! table, change tracking where the configuration relies on it, Marketo's preflight (can the
//! instance take opportunity writes, does it have the mapped fields) and the state store.

use std::process::ExitCode;

use clap::Args;
use oppsync_dynamics::{ChangeDetection, DataverseClient, EntitySet};
use oppsync_mapping::convert::Source;
use oppsync_marketo::{Limiter, MarketoClient};
use oppsync_pipeline::Config;
use oppsync_state::{FileProblem, SCHEMA_VERSION, StateError};
use serde_json::{Value, json};

use crate::CliError;
use crate::context::{self, StateArgs};

#[derive(Debug, Args)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub state: StateArgs,
    /// One JSON document on stdout.
    #[arg(long)]
    pub json: bool,
}

struct Checks(Vec<Value>);

impl Checks {
    fn pass(&mut self, name: &str, detail: impl Into<String>) {
        self.0.push(json!({"check": name, "ok": true, "detail": detail.into()}));
    }
    fn fail(&mut self, name: &str, problem: impl Into<String>, fix: &str) {
        self.0
            .push(json!({"check": name, "ok": false, "problem": problem.into(), "fix": fix}));
    }
    /// Not a failure (the exit stays 0), but likely not what the user wants, with the fix.
    fn warn(&mut self, name: &str, warning: impl Into<String>, fix: &str) {
        self.0
            .push(json!({"check": name, "ok": true, "warning": warning.into(), "fix": fix}));
    }
    fn skip(&mut self, name: &str, why: &str) {
        self.0.push(json!({"check": name, "ok": null, "detail": why}));
    }
}

pub async fn run(args: ValidateArgs) -> Result<ExitCode, CliError> {
    let mut checks = Checks(Vec::new());
    let config = match context::load_config(args.state.config.as_deref()) {
        Ok(c) => {
            checks.pass(
                "configuration",
                args.state
                    .config
                    .as_ref()
                    .map_or("the built-in defaults".into(), |p| p.display().to_string()),
            );
            c
        }
        Err(e) => {
            checks.fail("configuration", e.to_string(), "correct each key named above");
            Config::default()
        }
    };
    match context::endpoints(&config, |k| std::env::var(k).ok()) {
        Err(e) => {
            checks.fail("environment", e.to_string(), "set the variables named above");
            for name in ["Dynamics credentials", "Marketo credentials"] {
                checks.skip(name, "needs the environment");
            }
        }
        Ok((dynamics, marketo)) => {
            checks.pass("environment", "every variable is set");
            match DataverseClient::new(dynamics) {
                Ok(client) => dataverse_checks(&mut checks, &client, &config).await,
                Err(e) => checks.fail("Dynamics credentials", e.to_string(), "correct DYNAMICS_URL"),
            }
            match MarketoClient::new(
                marketo,
                Limiter::new(config.marketo.limiter()),
                config.marketo.daily_budget,
            ) {
                Ok(client) => marketo_checks(&mut checks, &client, &config).await,
                Err(e) => checks.fail("Marketo credentials", e.to_string(), "correct MARKETO_URL"),
            }
        }
    }
    state_check(&mut checks, &args.state).await;

    let failed = checks.0.iter().filter(|c| c["ok"] == json!(false)).count();
    if args.json {
        println!("{}", json!({"checks": checks.0, "failed": failed}));
    } else {
        for c in &checks.0 {
            match c["ok"].as_bool() {
                Some(true) if c.get("warning").is_some() => println!(
                    "WARN  {}: {}\n      Fix: {}",
                    c["check"].as_str().unwrap_or(""),
                    c["warning"].as_str().unwrap_or(""),
                    c["fix"].as_str().unwrap_or("")
                ),
                Some(true) => println!(
                    "PASS  {}: {}",
                    c["check"].as_str().unwrap_or(""),
                    c["detail"].as_str().unwrap_or("")
                ),
                Some(false) => println!(
                    "FAIL  {}: {}\n      Fix: {}",
                    c["check"].as_str().unwrap_or(""),
                    c["problem"].as_str().unwrap_or(""),
                    c["fix"].as_str().unwrap_or("")
                ),
                None => println!(
                    "SKIP  {}: {}",
                    c["check"].as_str().unwrap_or(""),
                    c["detail"].as_str().unwrap_or("")
                ),
            }
        }
        println!("{} checks, {failed} failed", checks.0.len());
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn dataverse_checks(checks: &mut Checks, client: &DataverseClient, config: &Config) {
    let tables = [
        EntitySet::Opportunities,
        EntitySet::Connections,
        EntitySet::ConnectionRoles,
        EntitySet::Accounts,
        EntitySet::Contacts,
    ];
    match client.probe(tables[0]).await {
        Ok(()) => checks.pass(
            "Dynamics credentials",
            "a token was issued and opportunities can be read",
        ),
        Err(e) => {
            checks.fail(
                "Dynamics credentials",
                format!("Dynamics: {e}"),
                "check DYNAMICS_TENANT_ID, DYNAMICS_CLIENT_ID, DYNAMICS_CLIENT_SECRET and DYNAMICS_URL (README, Deploy to AWS, step 1)",
            );
            return;
        }
    }
    for set in &tables[1..] {
        match client.probe(*set).await {
            Ok(()) => checks.pass(&format!("Dynamics read {}", set.name()), "readable"),
            Err(e) => checks.fail(
                &format!("Dynamics read {}", set.name()),
                format!("Dynamics: {e}"),
                "give the application user's security role organization-level Read on this table",
            ),
        }
    }
    if config.mapping.sales_persons {
        // Not a failure: without it the sync runs, with sales persons lacking email and name.
        match client.probe(EntitySet::SystemUsers).await {
            Ok(()) => checks.pass("Dynamics read systemusers", "readable (the owners, for sales persons)"),
            Err(e) => checks.warn(
                "Dynamics read systemusers",
                format!("Dynamics: {e}; sales persons would be written without email or name"),
                "give the application user's security role organization-level Read on User, or set [mapping] sales_persons = false",
            ),
        }
    }
    currency_check(checks, client, config).await;
    if config.dataverse.change_detection != ChangeDetection::ChangeTracking {
        checks.skip(
            "Dynamics change tracking",
            "the configuration uses a watermark, not change tracking",
        );
        return;
    }
    for set in [EntitySet::Opportunities, EntitySet::Connections] {
        let name = format!("Dynamics change tracking on {}", set.logical());
        match client.change_tracking_enabled(set).await {
            Ok(true) => checks.pass(&name, "enabled"),
            Ok(false) => checks.fail(
                &name,
                "change tracking is off for this table",
                "turn on Track changes for the table (Power Apps > Tables > Properties > Advanced options), or set [dataverse] change_detection = \"versionnumber\"",
            ),
            Err(e) => checks.fail(&name, format!("Dynamics: {e}"), "give the application user read access to table metadata"),
        }
    }
}

/// Marketo holds one currency: when opportunities use several, an amount mapped from
/// `estimatedvalue` (each opportunity's own currency) mixes them; `estimatedvalue_base` is the
/// amount in the organisation's base currency.
async fn currency_check(checks: &mut Checks, client: &DataverseClient, config: &Config) {
    let name = "Dynamics currencies";
    let amount_from = config
        .mapping
        .fields
        .iter()
        .find(|f| &*f.marketo == "amount")
        .map(|f| match &f.source {
            Source::Attribute(a) => a.to_string(),
            Source::Derived => "a derived value".into(),
        });
    match (client.opportunity_currencies().await, amount_from.as_deref()) {
        (Ok(found), _) if found.len() < 2 => checks.pass(name, "opportunities use one transaction currency"),
        (Ok(_), Some("estimatedvalue")) => checks.warn(
            name,
            "opportunities use more than one transaction currency, and amount is mapped from estimatedvalue, each in its own currency; Marketo holds one, so amounts of different currencies would sit side by side",
            "to write every amount in the organisation's base currency, add [[mapping.fields]] with marketo = \"amount\", dataverse = \"estimatedvalue_base\", type = \"decimal\" (README, Currency)",
        ),
        (Ok(_), Some(from)) => checks.pass(
            name,
            format!("opportunities use more than one transaction currency; amount is mapped from {from}"),
        ),
        (Ok(_), None) => checks.pass(
            name,
            "opportunities use more than one transaction currency; amount is not written",
        ),
        (Err(e), _) => checks.fail(
            name,
            format!("Dynamics: {e}"),
            "give the application user's security role organization-level Read on opportunity",
        ),
    }
}

async fn marketo_checks(checks: &mut Checks, client: &MarketoClient, config: &Config) {
    let fields: Vec<&str> = config.mapping.fields.iter().map(|f| &*f.marketo).collect();
    match client.preflight(&fields).await {
        Err(e) => checks.fail(
            "Marketo credentials",
            format!("Marketo: {e}"),
            "check MARKETO_URL, MARKETO_CLIENT_ID and MARKETO_CLIENT_SECRET (README, Deploy to AWS, step 2)",
        ),
        Ok(preflight) => {
            checks.pass(
                "Marketo credentials",
                "a token was issued and the opportunity objects described",
            );
            match &preflight.blocked {
                None => checks.pass("Marketo opportunity writes", "the instance takes them"),
                Some(why) => checks.fail(
                    "Marketo opportunity writes",
                    why.clone(),
                    "this instance runs Marketo's native CRM sync, which closes these APIs; oppsync is for instances without it",
                ),
            }
            if preflight.missing_fields.is_empty() {
                checks.pass("Marketo fields", format!("all {} mapped fields exist", fields.len()));
            } else {
                checks.fail(
                    "Marketo fields",
                    format!(
                        "the instance has no opportunity field {}",
                        preflight.missing_fields.join(", ")
                    ),
                    "create the fields in Marketo (Admin > Field Management), or remove them from [mapping]",
                );
            }
        }
    }
}

async fn state_check(checks: &mut Checks, args: &StateArgs) {
    if let Some(table) = &args.table {
        checks.skip("state", &format!("DynamoDB table {table}: checked on first use"));
        return;
    }
    let path = args.state.clone().unwrap_or_else(|| context::DEFAULT_STATE.into());
    let shown = path.display();
    // Read only: validating never creates or changes the file.
    match oppsync_state::SqliteStore::open_read_only(&path) {
        Ok(_) if std::fs::metadata(&path).is_ok_and(|m| m.permissions().readonly()) => {
            let problem = FileProblem::ReadOnly;
            checks.fail("state", format!("{shown}: {problem}"), &problem.fix());
        }
        Ok(_) => checks.pass(
            "state",
            format!("{shown} is oppsync's state (schema {SCHEMA_VERSION})"),
        ),
        Err(StateError::File { problem, .. }) => match problem {
            FileProblem::Missing => checks.pass("state", format!("{shown} does not exist yet; `oppsync sync` creates it")),
            FileProblem::Older { found, known } => checks.pass(
                "state",
                format!("{shown} was written by an older oppsync (schema {found}); the next sync brings it to schema {known}"),
            ),
            problem => checks.fail("state", format!("{shown}: {problem}"), &problem.fix()),
        },
        Err(e) => checks.fail("state", e.to_string(), "point --state at oppsync's state file, or at a new path"),
    }
}
