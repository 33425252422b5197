//! The Potential Customer rules, each tested on its own fixture opportunity.

use oppsync_mapping::dataverse::{Related, object};
use oppsync_mapping::{Change, Mapping, Opportunity, plan_change};
use serde_json::{Value, json};

use crate::common::*;

#[test]
fn contact_set_account_empty_creates_a_role_for_the_contact_and_uses_the_contacts_account() {
    // GIVEN opportunity 2, whose Potential Customer is Ada, a contact whose parent is Fabrikam
    let plan = plan_fixture(2, &Mapping::default(), &[]);
    // THEN Ada gets the primary "Potential Customer" role and Fabrikam is the company
    assert!(roles(&plan).contains(&(c(1), "Potential Customer".into(), true)));
    assert_eq!(company_id(&plan), Some(a(2)));
    assert_eq!(field(&plan, "externalCompanyId"), Some(&json!(a(2))));
    let company = desired(&plan).company.as_ref().unwrap();
    assert_eq!(company.name.as_deref(), Some("Fabrikam Inc"));
    let lead = desired(&plan)
        .leads
        .iter()
        .find(|l| l.contact.to_string() == c(1))
        .unwrap();
    assert_eq!(lead.email.as_deref(), Some("ada@contoso.example"));
    assert_eq!(lead.first_name.as_deref(), Some("Ada"));
    assert_eq!(lead.last_name.as_deref(), Some("Lovelace"));
}

#[test]
fn contact_set_account_empty_leaves_the_account_empty_when_the_contact_has_none() {
    let plan = plan_fixture(3, &Mapping::default(), &[]);
    assert_eq!(roles(&plan), vec![(c(2), "Potential Customer".into(), true)]);
    assert_eq!(company_id(&plan), None);
    assert_eq!(field(&plan, "externalCompanyId"), Some(&Value::Null));
}

#[test]
fn contact_set_account_empty_leaves_the_account_empty_when_the_contacts_parent_is_a_contact() {
    // Alan's parentcustomerid is Ada, a contact: a contact is not an account.
    let plan = plan_fixture(4, &Mapping::default(), &[]);
    assert_eq!(roles(&plan), vec![(c(3), "Potential Customer".into(), true)]);
    assert_eq!(company_id(&plan), None);
    assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
}

#[test]
fn account_set_contact_empty_only_sets_the_account() {
    let plan = plan_fixture(1, &Mapping::default(), &[]);
    assert!(roles(&plan).is_empty());
    assert!(desired(&plan).leads.is_empty());
    assert_eq!(company_id(&plan), Some(a(1)));
    assert_eq!(field(&plan, "externalCompanyId"), Some(&json!(a(1))));
    assert_eq!(
        desired(&plan).company.as_ref().unwrap().name.as_deref(),
        Some("Contoso Ltd")
    );
}

#[test]
fn both_set_applies_the_account_only_rule() {
    // Opportunity 5 has Fabrikam in customerid and Ada in parentcontactid.
    let plan = plan_fixture(5, &Mapping::default(), &[]);
    assert_eq!(company_id(&plan), Some(a(2)));
    assert!(roles(&plan).is_empty(), "the contact gets no role: {:?}", roles(&plan));
}

fn bare_opportunity(extra: Value) -> Opportunity {
    let mut v = object([
        ("opportunityid", json!(o(99))),
        ("name", json!("Bare")),
        ("statecode", json!(0)),
    ]);
    if let (Value::Object(base), Value::Object(extra)) = (&mut v, extra) {
        base.extend(extra);
    }
    Opportunity::from_json(v).unwrap()
}

#[test]
fn both_set_applies_the_account_only_rule_when_only_the_form_fields_are_returned() {
    let opp = bare_opportunity(json!({"_parentaccountid_value": a(1), "_parentcontactid_value": c(2)}));
    let plan = plan_change(&Mapping::default(), &Change::Upserted(opp), &related(), &[]);
    assert_eq!(company_id(&plan), Some(a(1)));
    assert!(roles(&plan).is_empty());
}

#[test]
fn both_set_applies_the_account_only_rule_when_customerid_is_the_contact_and_an_account_is_on_the_form() {
    let opp = bare_opportunity(json!({
        "_customerid_value": c(2), format!("_customerid_value{LN}"): "contact",
        "_parentaccountid_value": a(1),
    }));
    let plan = plan_change(&Mapping::default(), &Change::Upserted(opp), &related(), &[]);
    assert_eq!(company_id(&plan), Some(a(1)));
    assert!(roles(&plan).is_empty());
}

#[test]
fn a_customerid_without_its_annotation_is_resolved_against_the_records_read() {
    let contact = bare_opportunity(json!({"_customerid_value": c(1)}));
    let plan = plan_change(&Mapping::default(), &Change::Upserted(contact), &related(), &[]);
    assert_eq!(roles(&plan), vec![(c(1), "Potential Customer".into(), true)]);
    assert_eq!(company_id(&plan), Some(a(2)));

    let account = bare_opportunity(json!({"_customerid_value": a(1)}));
    let plan = plan_change(&Mapping::default(), &Change::Upserted(account), &related(), &[]);
    assert_eq!(company_id(&plan), Some(a(1)));
}

#[test]
fn an_unresolvable_customer_is_a_warning_not_a_guess() {
    let opp = bare_opportunity(json!({"_customerid_value": "12345678-0000-4000-8000-000000000000"}));
    let plan = plan_change(&Mapping::default(), &Change::Upserted(opp), &Related::new(), &[]);
    assert_eq!(company_id(&plan), None);
    assert!(roles(&plan).is_empty());
    assert!(
        plan.warnings.iter().any(|w| w.field == "customerid"),
        "{:?}",
        plan.warnings
    );
}

#[test]
fn a_contact_customer_whose_account_was_not_read_still_gets_its_company_upserted() {
    // Ada's parent (Fabrikam) is known from the annotation even when the account row is missing.
    let mut related = related();
    related.accounts.clear();
    let plan = plan_change(&Mapping::default(), &Change::Upserted(opportunity(2)), &related, &[]);
    assert_eq!(company_id(&plan), Some(a(2)));
    assert_eq!(desired(&plan).company.as_ref().unwrap().name, None);
    assert!(plan.warnings.iter().any(|w| w.field == "externalCompanyId"));
}

#[test]
fn no_customer_means_no_company_and_no_role() {
    let plan = plan_change(
        &Mapping::default(),
        &Change::Upserted(bare_opportunity(json!({}))),
        &related(),
        &[],
    );
    assert_eq!(company_id(&plan), None);
    assert_eq!(field(&plan, "externalCompanyId"), Some(&Value::Null));
    assert!(roles(&plan).is_empty());
}

#[test]
fn the_customer_role_name_is_configurable() {
    let m = mapping("[mapping.roles]\ncustomer_role = \"Buyer\"\n");
    let plan = plan_fixture(3, &m, &[]);
    assert_eq!(roles(&plan), vec![(c(2), "Buyer".into(), true)]);
}
