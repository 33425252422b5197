//! The stakeholder rule: active Stakeholder connections become opportunity roles.

use oppsync_mapping::dataverse::{Connection, Related};
use oppsync_mapping::{Change, Mapping, plan_change};

use crate::common::*;

#[test]
fn each_active_stakeholder_becomes_an_opportunity_role() {
    // Opportunity 6: Ada Champion, Grace Decision Maker ($expand'ed role), Edsger with a long role.
    let plan = plan_fixture(6, &Mapping::default(), &[]);
    let long = "Executive Sponsor for the Northern European Region";
    assert_eq!(long.chars().count(), 50);
    assert_eq!(
        roles(&plan),
        vec![
            (c(1), "Champion".into(), false),
            (c(2), "Decision Maker".into(), false),
            (c(5), long.into(), false),
        ]
    );
    let leads: Vec<String> = desired(&plan).leads.iter().map(|l| l.contact.to_string()).collect();
    assert_eq!(leads, vec![c(1), c(2), c(5)]);
}

#[test]
fn reciprocal_connection_rows_count_once() {
    // Every fixture connection is a pair; one direction alone gives the same roles as both.
    let rows = fixture("connections.json");
    let (both, _) = Related::from_json(
        fixture("accounts.json"),
        fixture("contacts.json"),
        fixture("connectionroles.json"),
        rows.clone(),
    );
    let masters: Vec<_> = rows.iter().filter(|r| r["ismaster"] == true).cloned().collect();
    let reciprocals: Vec<_> = rows.iter().filter(|r| r["ismaster"] == false).cloned().collect();
    assert_eq!(masters.len(), reciprocals.len());
    let plan_with = |connections| {
        let (related, _) = Related::from_json(
            fixture("accounts.json"),
            fixture("contacts.json"),
            fixture("connectionroles.json"),
            connections,
        );
        plan_change(&Mapping::default(), &Change::Upserted(opportunity(6)), &related, &[])
    };
    let from_both = plan_change(&Mapping::default(), &Change::Upserted(opportunity(6)), &both, &[]);
    assert_eq!(roles(&plan_with(masters)), roles(&from_both));
    // The reciprocal rows carry the role on record1; they must read the same.
    assert_eq!(roles(&plan_with(reciprocals)), roles(&from_both));
    assert_eq!(roles(&from_both).len(), 3);
}

#[test]
fn a_reciprocal_row_reads_the_role_from_the_contacts_side() {
    let rows = fixture("connections.json");
    let reciprocal = rows.iter().find(|r| r["ismaster"] == false).unwrap().clone();
    let link = Connection::from_json(reciprocal).unwrap().stakeholder_link().unwrap();
    assert_eq!(link.opportunity.to_string(), o(6));
    assert_eq!(link.contact.to_string(), c(1));
    assert_eq!(
        link.role.id.unwrap().to_string(),
        "f0000000-0000-4000-8000-000000000001"
    );
}

#[test]
fn inactive_connections_produce_no_role() {
    // Barbara's Influencer connection on opportunity 6 is inactive (statecode 1).
    let plan = plan_fixture(6, &Mapping::default(), &[]);
    assert!(!roles(&plan).iter().any(|(contact, _, _)| contact == &c(4)));
}

#[test]
fn sales_team_and_other_categories_produce_nothing_by_default() {
    // Alan is Sales Professional (1001, Sales Team); Ada also has a Social "Friend" role.
    let plan = plan_fixture(6, &Mapping::default(), &[]);
    let r = roles(&plan);
    assert!(!r.iter().any(|(contact, _, _)| contact == &c(3)), "{r:?}");
    assert!(!r.iter().any(|(_, role, _)| role == "Friend"), "{r:?}");
}

#[test]
fn sales_team_roles_are_included_when_their_category_is_configured() {
    let m = mapping("[mapping.roles]\nstakeholder_categories = [1000, 1001]\n");
    let plan = plan_fixture(6, &m, &[]);
    assert!(roles(&plan).contains(&(c(3), "Sales Professional".into(), false)));
}

#[test]
fn role_names_longer_than_fifty_characters_are_truncated_with_a_warning() {
    let plan = plan_fixture(6, &Mapping::default(), &[]);
    let warning = plan
        .warnings
        .iter()
        .find(|w| w.message.contains("longer than Marketo's 50 characters"))
        .expect("a truncation warning");
    assert!(
        warning
            .message
            .contains("Executive Sponsor for the Northern European Regional Rollout")
    );
    assert!(roles(&plan).iter().all(|(_, role, _)| role.chars().count() <= 50));
}

#[test]
fn a_stakeholder_without_an_email_is_skipped_with_a_warning_when_leads_match_by_email() {
    // Donald has no email.
    let plan = plan_fixture(6, &Mapping::default(), &[]);
    assert!(!roles(&plan).iter().any(|(contact, _, _)| contact == &c(6)));
    assert!(
        plan.warnings
            .iter()
            .any(|w| w.field == "leads" && w.message.contains("no email"))
    );
}

#[test]
fn a_stakeholder_without_an_email_keeps_its_role_when_leads_match_on_a_contact_id_field() {
    let m = mapping("[mapping.leads]\nmatch = \"field\"\nfield = \"dynamicsContactId\"\n");
    let plan = plan_fixture(6, &m, &[]);
    assert!(roles(&plan).contains(&(c(6), "Stakeholder".into(), false)));
    let donald = desired(&plan)
        .leads
        .iter()
        .find(|l| l.contact.to_string() == c(6))
        .unwrap();
    assert_eq!(donald.email, None);
}

#[test]
fn the_customer_contact_and_a_stakeholder_role_are_separate_roles() {
    // Opportunity 2: Barbara is a Stakeholder; the customer is Ada.
    let plan = plan_fixture(2, &Mapping::default(), &[]);
    assert_eq!(
        roles(&plan),
        vec![
            (c(1), "Potential Customer".into(), true),
            (c(4), "Stakeholder".into(), false)
        ]
    );
}

#[test]
fn a_stakeholder_role_named_like_the_customer_role_merges_into_the_primary_role() {
    let m = mapping("[mapping.roles]\ncustomer_role = \"Stakeholder\"\n");
    let related = related();
    // Make Barbara opportunity 2's customer too.
    let mut opp = opportunity(2);
    opp.customer.customerid = None;
    opp.customer.parent_contact = Some(oppsync_mapping::ContactId::parse(&c(4)).unwrap());
    let plan = plan_change(&m, &Change::Upserted(opp), &related, &[]);
    assert_eq!(roles(&plan), vec![(c(4), "Stakeholder".into(), true)]);
}

#[test]
fn an_unreadable_connection_role_is_a_warning() {
    let mut related = related();
    related.roles.clear();
    // Grace's role is $expand'ed and survives; the others name roles that are now unknown.
    let plan = plan_change(&Mapping::default(), &Change::Upserted(opportunity(6)), &related, &[]);
    assert_eq!(roles(&plan), vec![(c(2), "Decision Maker".into(), false)]);
    assert!(plan.warnings.iter().any(|w| w.message.contains("connection role")));
}
