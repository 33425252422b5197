use std::path::PathBuf;

use oppsync_mapping::dataverse::Related;
use oppsync_mapping::{Action, Change, Desired, Mapping, Opportunity, Plan, WrittenRole, plan_change};
use serde_json::Value;

pub const FV: &str = "@OData.Community.Display.V1.FormattedValue";
pub const LN: &str = "@Microsoft.Dynamics.CRM.lookuplogicalname";

pub fn o(n: u64) -> String {
    format!("0b000000-0000-4000-8000-{n:012}")
}
pub fn a(n: u64) -> String {
    format!("a0000000-0000-4000-8000-{n:012}")
}
pub fn c(n: u64) -> String {
    format!("c0000000-0000-4000-8000-{n:012}")
}

/// The `value` array of a fixture response.
pub fn fixture(name: &str) -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut page: Value = serde_json::from_str(&text).unwrap();
    match page["value"].take() {
        Value::Array(rows) => rows,
        other => panic!("{name}: no value array: {other}"),
    }
}

/// Accounts, contacts, roles and connections from the fixtures.
pub fn related() -> Related {
    let (related, rejected) = Related::from_json(
        fixture("accounts.json"),
        fixture("contacts.json"),
        fixture("connectionroles.json"),
        fixture("connections.json"),
    );
    assert!(rejected.is_empty(), "fixture rows rejected: {rejected:?}");
    related
}

pub fn opportunity(n: u64) -> Opportunity {
    let id = o(n);
    let row = fixture("opportunities.json")
        .into_iter()
        .find(|r| r["opportunityid"] == id.as_str())
        .unwrap_or_else(|| panic!("no fixture opportunity {id}"));
    Opportunity::from_json(row).unwrap()
}

pub fn plan_fixture(n: u64, mapping: &Mapping, written: &[WrittenRole]) -> Plan {
    plan_change(mapping, &Change::Upserted(opportunity(n)), &related(), written)
}

pub fn desired(plan: &Plan) -> &Desired {
    match &plan.action {
        Action::Upsert(d) => d,
        other => panic!("expected an upsert, got {other:?}"),
    }
}

/// (contact, role, isPrimary) triples, for readable assertions.
pub fn roles(plan: &Plan) -> Vec<(String, String, bool)> {
    desired(plan)
        .roles
        .iter()
        .map(|r| (r.contact.to_string(), r.role.clone(), r.is_primary))
        .collect()
}

pub fn company_id(plan: &Plan) -> Option<String> {
    desired(plan)
        .company
        .as_ref()
        .map(|c| c.external_company_id.to_string())
}

pub fn field<'p>(plan: &'p Plan, name: &str) -> Option<&'p Value> {
    desired(plan).opportunity.get(name)
}

pub fn mapping(toml: &str) -> Mapping {
    oppsync_mapping::MappingConfig::from_toml(toml)
        .and_then(|c| c.validate())
        .unwrap_or_else(|e| panic!("{e}"))
}
