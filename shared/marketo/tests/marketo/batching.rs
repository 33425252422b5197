//! Batching, duplicates, result matching, and the endpoints' semantics.

use oppsync_marketo::Operation as E;
use oppsync_marketo::{MarketoError, RecordStatus, RoleKey, RoleRecord};
use oppsync_simulators::MarketoFault;
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn a_thousand_record_upsert_takes_exactly_four_calls() {
    let sim = sim(fast_config()).await;
    let client = client(&sim);
    let outcomes = client.sync_opportunities(&opportunities(1000)).await.unwrap();
    assert_eq!(sim.calls(E::OpportunitySync), 1000_u64.div_ceil(300));
    assert_eq!(outcomes.len(), 1000);
    assert!(outcomes.iter().all(|o| o.status == RecordStatus::Created));
    assert_eq!(sim.snapshot().opportunities.len(), 1000);
    // Outcomes are in input order: the 700th outcome is the 700th opportunity's GUID.
    let snapshot = sim.snapshot();
    let stored = &snapshot.opportunities[&format!("0b000000-0000-4000-8000-{:012}", 699)];
    assert_eq!(outcomes[699].marketo_id.as_deref(), stored["marketoGUID"].as_str());
    // Again: all updates, same number of calls.
    let outcomes = client.sync_opportunities(&opportunities(1000)).await.unwrap();
    assert!(outcomes.iter().all(|o| o.status == RecordStatus::Updated));
    assert_eq!(sim.calls(E::OpportunitySync), 8);
}

#[tokio::test]
async fn duplicates_in_one_call_are_removed_first_and_share_the_outcome() {
    let sim = sim(fast_config()).await;
    let client = client(&sim);
    let records = vec![opportunity(1), opportunity(2), opportunity(1), opportunity(1)];
    let outcomes = client.sync_opportunities(&records).await.unwrap();
    assert_eq!(outcomes.len(), 4);
    assert!(outcomes.iter().all(|o| !o.is_skipped()), "{outcomes:?}");
    assert_eq!(outcomes[0], outcomes[2]);
    assert_eq!(outcomes[0], outcomes[3]);
    let companies = vec![
        json!({"externalCompanyId": "a1", "company": "Contoso"}),
        json!({"externalCompanyId": "a1", "company": "Contoso"}),
    ];
    let outcomes = client.sync_companies(&companies).await.unwrap();
    assert!(outcomes.iter().all(|o| o.status == RecordStatus::Created));
    assert_eq!(sim.snapshot().companies.len(), 1);
}

#[tokio::test]
async fn a_record_level_skip_is_an_outcome_with_its_reason_not_an_error() {
    let sim = sim(fast_config()).await;
    let client = client(&sim);
    let mut bad = opportunity(2);
    bad["noSuchField"] = json!(1);
    let outcomes = client.sync_opportunities(&[opportunity(1), bad]).await.unwrap();
    assert_eq!(outcomes[0].status, RecordStatus::Created);
    assert_eq!(outcomes[1].status, RecordStatus::Skipped);
    assert_eq!(outcomes[1].code(), Some("1006"));
    assert!(outcomes[1].reasons[0].message.contains("noSuchField"));
    assert_eq!(outcomes[1].class(), Some(oppsync_marketo::ErrorClass::Permanent));
}

#[tokio::test]
async fn a_result_count_that_differs_from_the_input_is_an_error() {
    let sim = sim(fast_config()).await;
    let client = client(&sim);
    for nth in 1..=6 {
        sim.inject(E::OpportunitySync, nth, MarketoFault::DropResult);
    }
    let err = client.sync_opportunities(&opportunities(3)).await.unwrap_err();
    assert!(
        matches!(err, MarketoError::ResultMismatch { sent: 3, got: 2, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn roles_need_their_opportunity_and_lead_and_are_keyed_by_all_three_parts() {
    let sim = sim(fast_config()).await;
    let client = client(&sim);
    client.sync_opportunities(&[opportunity(1)]).await.unwrap();
    let lead = sim.add_lead(json!({"email": "ada@example.com"}));
    let opp = "0b000000-0000-4000-8000-000000000001".to_owned();
    let role = |lead_id, name: &str, primary| RoleRecord {
        key: RoleKey {
            external_opportunity_id: opp.clone(),
            lead_id,
            role: name.to_owned(),
        },
        is_primary: primary,
    };
    let outcomes = client
        .sync_roles(&[
            role(lead, "Champion", false),
            role(lead, "Potential Customer", true),
            role(999_999, "Champion", false),
        ])
        .await
        .unwrap();
    assert_eq!(outcomes[0].status, RecordStatus::Created);
    assert_eq!(outcomes[1].status, RecordStatus::Created);
    assert_eq!(outcomes[2].code(), Some("1004"), "a role needs an existing lead");
    let found = client
        .query_roles(&[role(lead, "Champion", false).key, role(lead, "Other", false).key])
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    let deleted = client
        .delete_roles(&[role(lead, "Champion", false).key, role(lead, "Gone", false).key])
        .await
        .unwrap();
    assert_eq!(deleted[0].status, RecordStatus::Deleted);
    assert_eq!(deleted[1].code(), Some("1013"));
    assert_eq!(sim.snapshot().roles.len(), 1);
}

#[tokio::test]
async fn deleting_opportunities_reports_missing_ones_as_1013() {
    let sim = sim(fast_config()).await;
    let client = client(&sim);
    client.sync_opportunities(&opportunities(2)).await.unwrap();
    let ids = vec![
        "0b000000-0000-4000-8000-000000000000".to_owned(),
        "0b000000-0000-4000-8000-000000000009".to_owned(),
    ];
    let outcomes = client.delete_opportunities(&ids).await.unwrap();
    assert_eq!(outcomes[0].status, RecordStatus::Deleted);
    assert_eq!(outcomes[1].code(), Some("1013"));
    assert_eq!(client.query_opportunities(&ids).await.unwrap().len(), 0);
    assert_eq!(sim.snapshot().opportunities.len(), 1);
}

#[tokio::test]
async fn a_long_lead_lookup_switches_to_post_with_method_get() {
    let sim = sim(fast_config()).await;
    let client = client(&sim);
    sim.add_lead(json!({"email": "person-00007@a-rather-long-domain-name.example.com"}));
    let short = vec!["person-00007@a-rather-long-domain-name.example.com".to_owned()];
    assert_eq!(
        client.query_leads("email", &short, &["firstName"]).await.unwrap().len(),
        1
    );
    assert_eq!(sim.method_overrides(), 0, "a short list is a plain GET");
    let long: Vec<String> = (0..300)
        .map(|i| format!("person-{i:05}@a-rather-long-domain-name.example.com"))
        .collect();
    let found = client.query_leads("email", &long, &["firstName"]).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(sim.method_overrides(), 1);
    assert_eq!(sim.refused("414"), 0);
    // More than 300 values: one call per 300.
    let many: Vec<String> = (0..301).map(|i| format!("p{i}@x.example")).collect();
    let before = sim.calls(E::LeadQuery);
    client.query_leads("email", &many, &[]).await.unwrap();
    assert_eq!(sim.calls(E::LeadQuery) - before, 2);
}

#[tokio::test]
async fn leads_upsert_by_email_and_duplicates_by_email_are_a_1007_skip() {
    let sim = sim(fast_config()).await;
    let client = client(&sim);
    sim.add_lead(json!({"email": "twin@example.com"}));
    sim.add_lead(json!({"email": "TWIN@example.com"}));
    let existing = sim.add_lead(json!({"email": "grace@example.com"}));
    let outcomes = client
        .upsert_leads(
            "email",
            &[
                json!({"email": "new@example.com", "firstName": "New"}),
                json!({"email": "Grace@Example.com", "lastName": "Hopper"}),
                json!({"email": "twin@example.com"}),
            ],
        )
        .await
        .unwrap();
    assert_eq!(outcomes[0].status, RecordStatus::Created);
    assert_eq!(outcomes[1].status, RecordStatus::Updated);
    assert_eq!(outcomes[1].marketo_id, Some(existing.to_string()));
    assert_eq!(outcomes[2].code(), Some("1007"));
    // By a custom field holding the contact id.
    let outcomes = client
        .upsert_leads(
            "dynamicsContactId",
            &[json!({"dynamicsContactId": "c1", "email": "c1@example.com"})],
        )
        .await
        .unwrap();
    assert_eq!(outcomes[0].status, RecordStatus::Created);
    let found = client
        .query_leads("dynamicsContactId", &["c1".into()], &["email"])
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
}
