//! `oppsync plan`: what a sync would write to Marketo now, as a diff against what was last
//! written. Reads Dynamics from the stored cursors without moving them; writes nothing to
//! Marketo and records nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;

use clap::Args;
use oppsync_dynamics::EntitySet;
use oppsync_mapping::{Action, OpportunityId, Plan};
use oppsync_pipeline::{Pipeline, Planned};
use oppsync_state::{OpportunityState, StateStore, Status};
use serde_json::{Value, json};

use crate::CliError;
use crate::context::{Open, StateArgs, fatal};
use crate::with_pipeline;

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub state: StateArgs,
    /// Plan every opportunity in Dynamics, not only the changed ones.
    #[arg(long)]
    pub all: bool,
    /// One JSON document on stdout instead of the readable diff.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: PlanArgs) -> Result<ExitCode, CliError> {
    with_pipeline!(&args.state, Open::ReadOnlyOrEmpty, |pipeline| plan(
        &pipeline, args.all, args.json
    )
    .await)
}

async fn plan<S: StateStore>(pipeline: &Pipeline<S>, all: bool, json_out: bool) -> Result<ExitCode, CliError> {
    let ids: BTreeSet<OpportunityId> = if all {
        pipeline
            .dataverse()
            .all_ids(EntitySet::Opportunities)
            .await
            .map_err(|e| CliError::Fatal(format!("Dynamics: {e}")))?
            .into_iter()
            .map(OpportunityId)
            .collect()
    } else {
        let mut ids = pipeline.peek().await.map_err(fatal)?;
        // Recorded but not yet written: a poll already ran.
        for status in [Status::Pending, Status::Ready] {
            ids.extend(pipeline.ids_in(status, |_| true, None).await.map_err(fatal)?);
        }
        ids
    };
    let ids: Vec<OpportunityId> = ids.into_iter().collect();
    let mut entries = Vec::new();
    let mut unchanged = 0;
    for chunk in ids.chunks(pipeline.config().sync.batch_size.max(1)) {
        for preview in pipeline.plan(chunk).await.map_err(fatal)? {
            if preview.unchanged {
                unchanged += 1;
                continue;
            }
            let before = pipeline
                .store()
                .get(preview.id)
                .await
                .map_err(|e| CliError::Fatal(format!("state store: {e}")))?;
            entries.push(diff(&preview, before.as_ref()));
        }
    }
    if json_out {
        println!(
            "{}",
            json!({"changes": entries, "unchanged": unchanged, "examined": ids.len()})
        );
    } else {
        for e in &entries {
            print_entry(e);
        }
        println!(
            "{} of {} opportunities would change in Marketo; {unchanged} already match. Nothing was written.",
            entries.len(),
            ids.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// One record's change, as data: the action, fields old → new, roles added and removed,
/// the company, the sales person, warnings, and the plan itself.
fn diff(preview: &Planned, before: Option<&OpportunityState>) -> Value {
    let plan = match &preview.plan {
        Ok(plan) => plan,
        Err(e) => {
            return json!({"id": preview.id, "action": "error", "error": e});
        }
    };
    // The fields last written are those of the last plan, if it is the one Marketo holds.
    let previous: Option<&Plan> = before
        .and_then(|s| s.plan.as_ref().zip(s.written.as_ref()))
        .filter(|(p, w)| p.hash == w.hash)
        .map(|(p, _)| p);
    let old_fields: BTreeMap<String, Value> = match previous.map(|p| &p.action) {
        Some(Action::Upsert(d)) => d.opportunity.clone(),
        _ => BTreeMap::new(),
    };
    let action = match &plan.action {
        Action::Upsert(_) if preview.written.is_none() => "create",
        Action::Upsert(_) => "update",
        Action::Delete => "delete",
        Action::Filtered => "filtered",
        Action::Kept => "kept",
    };
    let mut fields = serde_json::Map::new();
    let mut roles_added = Vec::new();
    let mut company = Value::Null;
    let mut sales_person = Value::Null;
    if let Action::Upsert(desired) = &plan.action {
        for (name, value) in &desired.opportunity {
            let old = old_fields.get(name);
            if old != Some(value) {
                fields.insert(name.clone(), json!({"from": old, "to": value}));
            }
        }
        let written: BTreeSet<(String, String)> = preview
            .written
            .as_ref()
            .map(|w| {
                w.roles
                    .iter()
                    .map(|r| (r.contact.to_string(), r.role.clone()))
                    .collect()
            })
            .unwrap_or_default();
        for role in &desired.roles {
            if !written.contains(&(role.contact.to_string(), role.role.clone())) {
                roles_added.push(json!({"contact": role.contact, "role": role.role, "isPrimary": role.is_primary}));
            }
        }
        company = json!(desired.company.as_ref().map(|c| c.external_company_id));
        sales_person = json!(desired.sales_person.as_ref().map(|p| p.external_sales_person_id));
    }
    let roles_removed: Vec<Value> = plan
        .role_deletions
        .iter()
        .map(|r| json!({"contact": r.contact, "role": r.role}))
        .collect();
    json!({
        "id": preview.id,
        "action": action,
        "fields": fields,
        "roles_added": roles_added,
        "roles_removed": roles_removed,
        "company": company,
        "sales_person": sales_person,
        "warnings": plan.warnings,
        "plan": plan,
    })
}

fn print_entry(e: &Value) {
    let id = e["id"].as_str().unwrap_or("?");
    let action = e["action"].as_str().unwrap_or("?");
    if action == "error" {
        println!(
            "! {id}: cannot be planned: {}",
            e["error"]["message"].as_str().unwrap_or("")
        );
        return;
    }
    println!("{} {id} ({action})", if action == "delete" { "-" } else { "~" });
    if let Some(fields) = e["fields"].as_object() {
        for (name, change) in fields {
            println!("    {name}: {} → {}", short(&change["from"]), short(&change["to"]));
        }
    }
    if let Some(company) = e["company"].as_str() {
        println!("    company: {company}");
    }
    if let Some(person) = e["sales_person"].as_str() {
        println!("    sales person: {person}");
    }
    for r in e["roles_added"].as_array().into_iter().flatten() {
        println!(
            "    + role {} for contact {}",
            r["role"].as_str().unwrap_or(""),
            r["contact"].as_str().unwrap_or("")
        );
    }
    for r in e["roles_removed"].as_array().into_iter().flatten() {
        println!(
            "    - role {} for contact {}",
            r["role"].as_str().unwrap_or(""),
            r["contact"].as_str().unwrap_or("")
        );
    }
    for w in e["warnings"].as_array().into_iter().flatten() {
        println!("    warning: {}", w["message"].as_str().unwrap_or(""));
    }
}

fn short(v: &Value) -> String {
    match v {
        Value::Null => "(none)".into(),
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}
