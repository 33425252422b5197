//! Properties: plans are deterministic and independent of row and key order; no input panics.

use oppsync_mapping::dataverse::Related;
use oppsync_mapping::{Change, Mapping, MappingConfig, Opportunity, plan_change};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

use crate::common::{FV, LN};

fn guid(prefix: u32, n: u32) -> String {
    format!("{prefix:08x}-0000-4000-8000-{n:012}")
}

/// A generated scenario: one opportunity, its customer, and its stakeholder connections.
#[derive(Debug, Clone)]
struct Scenario {
    customer: u8,       // 0 none, 1 account, 2 contact, 3 both
    contact_parent: u8, // 0 none, 1 account, 2 contact
    amount: Option<f64>,
    state: i64,
    stakeholders: Vec<(u32, u32, bool)>, // (contact, role, active)
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        0u8..4,
        0u8..3,
        proptest::option::of(0.0f64..1.0e9),
        0i64..3,
        proptest::collection::vec((0u32..6, 0u32..5, any::<bool>()), 0..8),
    )
        .prop_map(|(customer, contact_parent, amount, state, stakeholders)| Scenario {
            customer,
            contact_parent,
            amount,
            state,
            stakeholders,
        })
}

const ROLES: [(&str, i64); 5] = [
    ("Champion", 1000),
    ("Decision Maker", 1000),
    ("Sales Professional", 1001),
    (
        "A role name that is far longer than the fifty characters Marketo allows",
        1000,
    ),
    ("Friend", 3),
];

/// The scenario as Web API rows: opportunity, accounts, contacts, roles, connections.
fn rows(s: &Scenario) -> (Value, Vec<Value>, Vec<Value>, Vec<Value>, Vec<Value>) {
    let opp_id = guid(0x0b, 1);
    let mut opp = json!({
        "opportunityid": opp_id, "name": "Generated", "description": null,
        "estimatedvalue": s.amount, "closeprobability": 30, "statecode": s.state,
        "estimatedclosedate": "2026-12-31", "actualclosedate": if s.state == 0 { Value::Null } else { json!("2026-11-01") },
        "versionnumber": 7,
    });
    let o = opp.as_object_mut().unwrap();
    match s.customer {
        1 => {
            o.insert("_customerid_value".into(), json!(guid(0xa, 1)));
            o.insert(format!("_customerid_value{LN}"), json!("account"));
        }
        2 => {
            o.insert("_customerid_value".into(), json!(guid(0xc, 0)));
            o.insert(format!("_customerid_value{LN}"), json!("contact"));
        }
        3 => {
            o.insert("_customerid_value".into(), json!(guid(0xa, 1)));
            o.insert(format!("_customerid_value{LN}"), json!("account"));
            o.insert("_parentcontactid_value".into(), json!(guid(0xc, 0)));
        }
        _ => {}
    }
    let accounts = vec![
        json!({"accountid": guid(0xa, 1), "name": "Contoso"}),
        json!({"accountid": guid(0xa, 2), "name": "Fabrikam"}),
    ];
    let contacts = (0..6)
        .map(|n| {
            let mut c = json!({"contactid": guid(0xc, n), "emailaddress1": format!("c{n}@example.com"), "firstname": "F", "lastname": format!("L{n}")});
            if n == 0 {
                match s.contact_parent {
                    1 => {
                        c["_parentcustomerid_value"] = json!(guid(0xa, 2));
                        c[format!("_parentcustomerid_value{LN}")] = json!("account");
                    }
                    2 => {
                        c["_parentcustomerid_value"] = json!(guid(0xc, 5));
                        c[format!("_parentcustomerid_value{LN}")] = json!("contact");
                    }
                    _ => {}
                }
            }
            c
        })
        .collect();
    let roles = ROLES
        .iter()
        .enumerate()
        .map(|(i, (name, cat))| json!({"connectionroleid": guid(0xf, i as u32), "name": name, "category": cat, format!("category{FV}"): "x"}))
        .collect();
    let mut connections = Vec::new();
    for (i, (contact, role, active)) in s.stakeholders.iter().enumerate() {
        let state = if *active { 0 } else { 1 };
        let (c, r) = (guid(0xc, *contact), guid(0xf, *role));
        connections.push(json!({
            "connectionid": guid(0xe, 2 * i as u32), "_record1id_value": opp_id, "record1objecttypecode": 3,
            "_record2id_value": c, "record2objecttypecode": 2, "_record2roleid_value": r, "_record1roleid_value": null, "statecode": state
        }));
        connections.push(json!({
            "connectionid": guid(0xe, 2 * i as u32 + 1), "_record1id_value": c, "record1objecttypecode": 2,
            "_record2id_value": opp_id, "record2objecttypecode": 3, "_record1roleid_value": r, "_record2roleid_value": null, "statecode": state
        }));
    }
    (opp, accounts, contacts, roles, connections)
}

/// Renders an object as JSON text with its keys in the order given by `seed`.
fn shuffled_text(value: &Value, seed: u64) -> String {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            let mut state = seed | 1;
            for i in (1..entries.len()).rev() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                entries.swap(i, (state % (i as u64 + 1)) as usize);
            }
            let body: Vec<String> = entries
                .into_iter()
                .map(|(k, v)| {
                    format!(
                        "{}:{}",
                        Value::String(k.clone()),
                        shuffled_text(v, seed.wrapping_add(1))
                    )
                })
                .collect();
            format!("{{{}}}", body.join(","))
        }
        other => other.to_string(),
    }
}

fn plan_from(
    rows_: &(Value, Vec<Value>, Vec<Value>, Vec<Value>, Vec<Value>),
    mapping: &Mapping,
) -> oppsync_mapping::Plan {
    let (opp, accounts, contacts, roles, connections) = rows_.clone();
    let (related, rejected) = Related::from_json(accounts, contacts, roles, connections);
    assert!(rejected.is_empty());
    plan_change(
        mapping,
        &Change::Upserted(Opportunity::from_json(opp).unwrap()),
        &related,
        &[],
    )
}

fn reparse(v: &Value, seed: u64) -> Value {
    serde_json::from_str(&shuffled_text(v, seed)).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn plan_and_hash_are_independent_of_row_order_and_json_key_order(s in scenario(), seed in any::<u64>()) {
        let mapping = Mapping::default();
        let original = rows(&s);
        let expected = plan_from(&original, &mapping);

        let (opp, mut accounts, mut contacts, mut roles, mut connections) = original.clone();
        let rot = |v: &mut Vec<Value>| if !v.is_empty() { let k = (seed as usize) % v.len(); v.rotate_left(k); v.reverse(); };
        rot(&mut accounts);
        rot(&mut contacts);
        rot(&mut roles);
        rot(&mut connections);
        let shuffled = (
            reparse(&opp, seed),
            accounts.iter().map(|v| reparse(v, seed)).collect(),
            contacts.iter().map(|v| reparse(v, seed)).collect(),
            roles.iter().map(|v| reparse(v, seed)).collect(),
            connections.iter().map(|v| reparse(v, seed)).collect(),
        );
        let again = plan_from(&shuffled, &mapping);
        prop_assert_eq!(&again.action, &expected.action);
        prop_assert_eq!(again.hash, expected.hash);
        prop_assert_eq!(plan_from(&original, &mapping), expected);
    }

    #[test]
    fn reciprocal_rows_never_double_a_role(s in scenario()) {
        let plan = plan_from(&rows(&s), &Mapping::default());
        if let oppsync_mapping::Action::Upsert(d) = &plan.action {
            let mut keys: Vec<_> = d.roles.iter().map(|r| (r.contact, r.role.clone())).collect();
            let n = keys.len();
            keys.sort();
            keys.dedup();
            prop_assert_eq!(keys.len(), n);
            prop_assert!(d.roles.iter().all(|r| r.role.chars().count() <= 50));
            prop_assert!(d.roles.iter().filter(|r| r.is_primary).count() <= 1);
            // Every role has its lead.
            prop_assert!(d.roles.iter().all(|r| d.leads.iter().any(|l| l.contact == r.contact)));
        }
    }
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,40}".prop_map(Value::String),
        "[0-9a-fA-F-]{30,40}".prop_map(Value::String),
        Just(json!("2026-02-30")),
        Just(json!("c0000000-0000-4000-8000-000000000000")),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z]{1,5}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const ATTRIBUTES: [&str; 16] = [
    "opportunityid",
    "name",
    "description",
    "estimatedvalue",
    "closeprobability",
    "statecode",
    "estimatedclosedate",
    "actualclosedate",
    "versionnumber",
    "_customerid_value",
    "_customerid_value@Microsoft.Dynamics.CRM.lookuplogicalname",
    "_parentaccountid_value",
    "_parentcontactid_value",
    "new_synctomkto",
    "new_region",
    "statecode@OData.Community.Display.V1.FormattedValue",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn no_input_makes_the_mapper_panic(
        values in proptest::collection::vec(any_json(), ATTRIBUTES.len()),
        keep_id in any::<bool>(),
        related_rows in proptest::collection::vec(any_json(), 0..6),
    ) {
        let mut map = Map::new();
        for (k, v) in ATTRIBUTES.iter().zip(values) {
            map.insert((*k).to_owned(), v);
        }
        if keep_id {
            map.insert("opportunityid".into(), json!("0b000000-0000-4000-8000-000000000001"));
        }
        let mapping = MappingConfig::from_toml(
            "[mapping]\nsync_filter = \"new_synctomkto\"\n[[mapping.fields]]\nmarketo = \"region\"\ndataverse = \"new_region\"\ntype = \"option\"\n",
        ).unwrap().validate().unwrap();
        let (related, _) = Related::from_json(related_rows.clone(), related_rows.clone(), related_rows.clone(), related_rows);
        match Opportunity::from_json(Value::Object(map)) {
            Ok(opp) => {
                let plan = plan_change(&mapping, &Change::Upserted(opp), &related, &[]);
                // Whatever came in, the key is always there and well formed.
                if let oppsync_mapping::Action::Upsert(d) = &plan.action {
                    let id = d.opportunity["externalOpportunityId"].as_str().unwrap();
                    prop_assert_eq!(id, "0b000000-0000-4000-8000-000000000001");
                }
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}
