//! The owner rule: an opportunity's owner (a Dynamics user) becomes a Marketo sales person, as
//! the native sync's user sync does; a team owner gives none.

use oppsync_mapping::dataverse::Related;
use oppsync_mapping::{Change, Mapping, Opportunity, SystemUser, plan_change};
use serde_json::{Value, json};

use crate::common::*;

const USER: &str = "5e000000-0000-4000-8000-000000000007";
const TEAM: &str = "7ea00000-0000-4000-8000-000000000001";

fn owned_by(owner: Option<(&str, &str)>) -> Opportunity {
    let mut row = json!({"opportunityid": o(1), "name": "Chairs", "statecode": 0});
    if let Some((id, table)) = owner {
        row["_ownerid_value"] = json!(id);
        row[format!("_ownerid_value{LN}")] = json!(table);
    }
    Opportunity::from_json(row).unwrap()
}

fn user_row() -> Value {
    json!({"systemuserid": USER, "internalemailaddress": "dana@example.com", "firstname": "Dana", "lastname": "Seller"})
}

fn plan(mapping: &Mapping, opportunity: Opportunity, users: Vec<Value>) -> oppsync_mapping::Plan {
    let mut related = Related::new();
    assert!(related.add_users(users).is_empty());
    plan_change(mapping, &Change::Upserted(opportunity), &related, &[])
}

#[test]
fn a_user_owner_becomes_the_sales_person_the_opportunity_names() {
    let p = plan(
        &Mapping::default(),
        owned_by(Some((USER, "systemuser"))),
        vec![user_row()],
    );
    let person = desired(&p).sales_person.clone().expect("a sales person");
    assert_eq!(person.external_sales_person_id.to_string(), USER);
    assert_eq!(person.email.as_deref(), Some("dana@example.com"));
    assert_eq!(person.first_name.as_deref(), Some("Dana"));
    assert_eq!(person.last_name.as_deref(), Some("Seller"));
    assert_eq!(field(&p, "externalSalesPersonId"), Some(&json!(USER)));
    assert!(
        !p.warnings.iter().any(|w| w.field == "externalSalesPersonId"),
        "{:?}",
        p.warnings
    );
    // Personal data stays out of Debug output.
    let debug = format!("{person:?} {:?}", SystemUser::from_json(user_row()).unwrap());
    assert!(!debug.contains("dana@") && !debug.contains("Dana"), "{debug}");
}

#[test]
fn a_team_owner_gives_no_sales_person_and_empties_the_field() {
    let p = plan(&Mapping::default(), owned_by(Some((TEAM, "team"))), vec![user_row()]);
    assert!(desired(&p).sales_person.is_none());
    assert_eq!(field(&p, "externalSalesPersonId"), Some(&Value::Null));
    assert!(
        p.warnings
            .iter()
            .any(|w| w.field == "externalSalesPersonId" && w.message.contains("team")),
        "{:?}",
        p.warnings
    );
}

#[test]
fn an_unreadable_user_is_still_the_sales_person_without_email_or_name() {
    let p = plan(&Mapping::default(), owned_by(Some((USER, "systemuser"))), vec![]);
    let person = desired(&p).sales_person.clone().expect("a sales person");
    assert_eq!(person.external_sales_person_id.to_string(), USER);
    assert!(person.email.is_none() && person.first_name.is_none());
    assert!(p.warnings.iter().any(|w| w.message.contains("could not be read")));
}

#[test]
fn an_owner_without_its_table_is_a_user_when_one_was_read_and_none_otherwise() {
    let mut row = json!({"opportunityid": o(1), "name": "Chairs", "_ownerid_value": USER});
    let read = plan(
        &Mapping::default(),
        Opportunity::from_json(row.clone()).unwrap(),
        vec![user_row()],
    );
    assert!(desired(&read).sales_person.is_some());
    let unread = plan(
        &Mapping::default(),
        Opportunity::from_json(row.clone()).unwrap(),
        vec![],
    );
    assert!(desired(&unread).sales_person.is_none());
    assert_eq!(field(&unread, "externalSalesPersonId"), Some(&Value::Null));
    // A malformed owner costs the sales person, with a warning, not the record.
    row["_ownerid_value"] = json!("not-a-guid");
    let bad = plan(&Mapping::default(), Opportunity::from_json(row).unwrap(), vec![]);
    assert!(desired(&bad).sales_person.is_none());
    assert!(bad.warnings.iter().any(|w| w.message.contains("not a GUID")));
}

#[test]
fn with_sales_persons_off_the_owner_is_neither_read_nor_written() {
    let off = mapping("[mapping]\nsales_persons = false\n");
    let p = plan(&off, owned_by(Some((USER, "systemuser"))), vec![user_row()]);
    assert!(desired(&p).sales_person.is_none());
    assert_eq!(field(&p, "externalSalesPersonId"), None);
    // A plan without a sales person hashes as plans made before sales persons existed did.
    let json = serde_json::to_string(&p.action).unwrap();
    assert!(!json.contains("sales_person"), "{json}");
}

#[test]
fn mapping_external_sales_person_id_yourself_needs_sales_persons_off() {
    let toml = "[mapping]\n[[mapping.fields]]\nmarketo = \"externalSalesPersonId\"\ndataverse = \"ownerid\"\ntype = \"lookup\"\n";
    let e = oppsync_mapping::MappingConfig::from_toml(toml)
        .unwrap()
        .validate()
        .unwrap_err();
    assert!(e.mentions("mapping.fields[0].marketo"), "{e}");
    assert!(e.to_string().contains("sales_persons = false"), "{e}");
    mapping(&toml.replacen("[mapping]\n", "[mapping]\nsales_persons = false\n", 1));
}
