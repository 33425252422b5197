//! Plans: default fields, field selection, role deletions, deletes, the sync filter, the hash.

use oppsync_mapping::{Action, Change, ContactId, Mapping, OpportunityId, Plan, WrittenRole, plan_change, plan_delete};
use serde_json::{Value, json};

use crate::common::*;

fn written(contact: &str, role: &str, lead_id: i64) -> WrittenRole {
    WrittenRole {
        contact: ContactId::parse(contact).unwrap(),
        role: role.to_owned(),
        lead_id: Some(lead_id),
    }
}

#[test]
fn default_fields_follow_the_native_default_mapping() {
    let plan = plan_fixture(6, &Mapping::default(), &[]);
    let f = &desired(&plan).opportunity;
    assert_eq!(f["externalOpportunityId"], json!(o(6)));
    assert_eq!(f["name"], json!("Won deal with stakeholders"));
    assert_eq!(f["description"], json!("Description of Won deal with stakeholders"));
    assert_eq!(f["amount"], json!(10000.0));
    assert_eq!(f["probability"], json!(100));
    assert_eq!(f["stage"], json!("Won"));
    assert_eq!(f["isClosed"], json!(true));
    assert_eq!(f["isWon"], json!(true));
    assert_eq!(f["closeDate"], json!("2026-10-15"), "closed: the actual close date");
    assert_eq!(f["externalCompanyId"], json!(a(1)));
    let names: Vec<&str> = f.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "amount",
            "closeDate",
            "description",
            "externalCompanyId",
            "externalOpportunityId",
            "externalSalesPersonId",
            "isClosed",
            "isWon",
            "name",
            "probability",
            "stage"
        ]
    );
}

#[test]
fn an_open_opportunity_has_the_estimated_close_date_and_is_neither_closed_nor_won() {
    let plan = plan_fixture(1, &Mapping::default(), &[]);
    assert_eq!(field(&plan, "closeDate"), Some(&json!("2026-12-31")));
    assert_eq!(field(&plan, "stage"), Some(&json!("Open")));
    assert_eq!(field(&plan, "isClosed"), Some(&json!(false)));
    assert_eq!(field(&plan, "isWon"), Some(&json!(false)));
}

#[test]
fn custom_fields_are_added_to_the_defaults_with_their_conversions() {
    let m = mapping(
        r#"
        [mapping]
        exclude = ["description"]
        [[mapping.fields]]
        marketo = "region"
        dataverse = "new_region"
        type = "string"
        [[mapping.fields]]
        marketo = "salesStage"
        dataverse = "salesstage"
        type = "option"
        [[mapping.fields]]
        marketo = "currency"
        dataverse = "transactioncurrencyid"
        type = "lookup"
        lookup = "name"
        "#,
    );
    let plan = plan_fixture(6, &m, &[]);
    assert_eq!(field(&plan, "region"), Some(&json!("EMEA")));
    assert_eq!(field(&plan, "salesStage"), Some(&json!("Develop")));
    assert_eq!(field(&plan, "currency"), Some(&json!("US Dollar")));
    assert_eq!(field(&plan, "description"), None, "excluded");
    assert!(field(&plan, "amount").is_some(), "defaults kept");
}

#[test]
fn the_null_policy_skip_does_not_overwrite_marketo_with_null() {
    let write = mapping("[[mapping.fields]]\nmarketo = \"region\"\ndataverse = \"new_region\"\ntype = \"string\"\n");
    let skip = mapping(
        "[[mapping.fields]]\nmarketo = \"region\"\ndataverse = \"new_region\"\ntype = \"string\"\nnull = \"skip\"\n",
    );
    // Opportunity 1 has no region.
    assert_eq!(field(&plan_fixture(1, &write, &[]), "region"), Some(&Value::Null));
    assert_eq!(field(&plan_fixture(1, &skip, &[]), "region"), None);
}

#[test]
fn a_malformed_value_becomes_a_warning_and_the_field_is_left_out() {
    let mut opp = opportunity(1);
    opp.attributes.insert("estimatedvalue".into(), json!("a lot"));
    opp.attributes.insert("statecode".into(), json!(9));
    let plan = plan_change(&Mapping::default(), &Change::Upserted(opp), &related(), &[]);
    assert_eq!(field(&plan, "amount"), None);
    assert_eq!(field(&plan, "stage"), None);
    assert!(plan.warnings.iter().any(|w| w.field == "amount"));
    assert!(
        plan.warnings
            .iter()
            .any(|w| w.field == "stage" && w.message.contains("unknown option value 9"))
    );
}

#[test]
fn removed_stakeholders_become_role_deletions() {
    let before = [
        written(&c(1), "Champion", 11),
        written(&c(4), "Influencer", 14), // now inactive
    ];
    let plan = plan_fixture(6, &Mapping::default(), &before);
    assert_eq!(plan.role_deletions, vec![written(&c(4), "Influencer", 14)]);
}

#[test]
fn a_role_name_change_is_a_delete_plus_a_create() {
    let before = [written(&c(1), "Evangelist", 11)];
    let plan = plan_fixture(6, &Mapping::default(), &before);
    assert_eq!(plan.role_deletions, before);
    assert!(roles(&plan).contains(&(c(1), "Champion".into(), false)));
}

#[test]
fn an_is_primary_change_is_an_update_not_a_deletion() {
    // isPrimary is not part of Marketo's role key.
    let before = [written(&c(2), "Potential Customer", 12)];
    let plan = plan_fixture(3, &Mapping::default(), &before);
    assert!(plan.role_deletions.is_empty());
}

#[test]
fn the_keep_role_policy_never_deletes_roles() {
    let m = mapping("[mapping.deletes]\nroles = \"keep\"\n");
    let plan = plan_fixture(6, &m, &[written(&c(4), "Influencer", 14)]);
    assert!(plan.role_deletions.is_empty());
}

#[test]
fn a_deleted_opportunity_deletes_the_opportunity_and_its_roles() {
    let id = OpportunityId::parse(&o(6)).unwrap();
    let before = [written(&c(2), "Decision Maker", 12), written(&c(1), "Champion", 11)];
    let plan = plan_change(&Mapping::default(), &Change::Deleted(id), &related(), &before);
    assert_eq!(plan.action, Action::Delete);
    assert_eq!(
        plan.role_deletions,
        vec![written(&c(1), "Champion", 11), written(&c(2), "Decision Maker", 12)]
    );
    assert!(plan.writes_anything());
}

#[test]
fn the_keep_delete_policy_leaves_marketo_alone_when_an_opportunity_is_deleted() {
    let m = mapping("[mapping.deletes]\nopportunities = \"keep\"\n");
    let id = OpportunityId::parse(&o(6)).unwrap();
    let plan = plan_delete(&m, id, &[written(&c(1), "Champion", 11)]);
    assert_eq!(plan.action, Action::Kept);
    assert!(plan.role_deletions.is_empty());
    assert!(!plan.writes_anything());
}

#[test]
fn the_sync_filter_excludes_only_an_explicit_false() {
    let m = mapping("[mapping]\nsync_filter = \"new_synctomkto\"\n");
    // Opportunity 7 says No; it had roles before: nothing is deleted (Yes -> No stops updates).
    let plan = plan_fixture(7, &m, &[written(&c(1), "Champion", 11)]);
    assert_eq!(plan.action, Action::Filtered);
    assert!(plan.role_deletions.is_empty());
    assert!(!plan.writes_anything());
    // Yes syncs; so does null.
    assert!(matches!(plan_fixture(1, &m, &[]).action, Action::Upsert(_)));
    let mut unset = opportunity(1);
    unset.attributes.insert("new_synctomkto".into(), Value::Null);
    let plan = plan_change(&m, &Change::Upserted(unset), &related(), &[]);
    assert!(matches!(plan.action, Action::Upsert(_)));
}

#[test]
fn a_non_boolean_sync_filter_value_syncs_with_a_warning() {
    let m = mapping("[mapping]\nsync_filter = \"new_synctomkto\"\n");
    let mut odd = opportunity(1);
    odd.attributes.insert("new_synctomkto".into(), json!("No"));
    let plan = plan_change(&m, &Change::Upserted(odd), &related(), &[]);
    assert!(matches!(plan.action, Action::Upsert(_)));
    assert!(plan.warnings.iter().any(|w| w.field == "sync_filter"));
}

#[test]
fn without_a_sync_filter_configured_an_explicit_false_still_syncs() {
    assert!(matches!(
        plan_fixture(7, &Mapping::default(), &[]).action,
        Action::Upsert(_)
    ));
}

fn hash(plan: &Plan) -> String {
    plan.hash.to_string()
}

#[test]
fn the_hash_follows_the_desired_state_and_only_it() {
    let base = plan_fixture(6, &Mapping::default(), &[]);
    assert_eq!(hash(&base), hash(&plan_fixture(6, &Mapping::default(), &[])));
    assert_eq!(hash(&base).len(), 32);
    // What was written before changes the deletions, not the hash.
    let with_history = plan_fixture(6, &Mapping::default(), &[written(&c(4), "Influencer", 1)]);
    assert_eq!(hash(&base), hash(&with_history));
    // A changed amount changes it.
    let mut changed = opportunity(6);
    changed.attributes.insert("estimatedvalue".into(), json!(10000.01));
    let plan = plan_change(&Mapping::default(), &Change::Upserted(changed), &related(), &[]);
    assert_ne!(hash(&base), hash(&plan));
    // An attribute nobody maps does not.
    let mut unmapped = opportunity(6);
    unmapped.attributes.insert("stepname".into(), json!("3-Propose"));
    let plan = plan_change(&Mapping::default(), &Change::Upserted(unmapped), &related(), &[]);
    assert_eq!(hash(&base), hash(&plan));
    // Neither does a new versionnumber with the same content (a no-op save in Dynamics).
    let mut resaved = opportunity(6);
    resaved.version = Some(999_999);
    let plan = plan_change(&Mapping::default(), &Change::Upserted(resaved), &related(), &[]);
    assert_eq!(hash(&base), hash(&plan));
}

#[test]
fn the_hash_changes_when_a_stakeholder_changes() {
    let base = plan_fixture(6, &Mapping::default(), &[]);
    let mut related = related();
    let id = OpportunityId::parse(&o(6)).unwrap();
    related
        .stakeholders
        .get_mut(&id)
        .unwrap()
        .retain(|l| l.contact.to_string() != c(2));
    let plan = plan_change(&Mapping::default(), &Change::Upserted(opportunity(6)), &related, &[]);
    assert_ne!(base.hash, plan.hash);
}

#[test]
fn a_plan_round_trips_through_json_for_the_state_store() {
    let plan = plan_fixture(6, &Mapping::default(), &[written(&c(4), "Influencer", 14)]);
    let json = serde_json::to_string(&plan).unwrap();
    let back: Plan = serde_json::from_str(&json).unwrap();
    assert_eq!(back, plan);
    assert!(json.contains(&format!("\"hash\":\"{}\"", plan.hash)));
}

#[test]
fn the_opportunity_record_is_parsed_from_the_web_api_shape() {
    let opp = opportunity(2);
    assert_eq!(opp.version, Some(500_002));
    assert_eq!(opp.state, Some(0));
    assert_eq!(opp.modified_on.as_deref(), Some("2026-11-20T10:02:00Z"));
    assert_eq!(opp.customer.customerid.unwrap().id.to_string(), c(1));
    assert_eq!(opp.formatted("statecode"), Some("Open"));
}

#[test]
fn a_record_without_its_id_or_with_a_malformed_guid_is_rejected_with_the_attribute_named() {
    use oppsync_mapping::Opportunity;
    let err = Opportunity::from_json(json!({"name": "x"})).unwrap_err();
    assert!(err.to_string().contains("opportunityid"), "{err}");
    let err = Opportunity::from_json(json!({"opportunityid": "' or 1 eq 1"})).unwrap_err();
    assert!(err.to_string().contains("is not a GUID"), "{err}");
    let err = Opportunity::from_json(json!({"opportunityid": o(1), "_customerid_value": 42})).unwrap_err();
    assert!(err.to_string().contains("_customerid_value"), "{err}");
    assert!(Opportunity::from_json(json!([1, 2])).is_err());
}
