//! The client against every shape Adobe's docs show or leave open: results with and without
//! `seq`, in and out of order, `reasons` and `reason`; identity by query string; long reads as
//! `POST ?_method=GET`.

use oppsync_marketo::Operation as E;
use oppsync_marketo::{MarketoError, RecordStatus};
use oppsync_simulators::{MarketoConfig, ResultShape};
use serde_json::{Value, json};

use crate::common::*;

/// Five opportunities, the third refused: each outcome must land on its own record.
async fn sync_with_one_refused(shape: ResultShape) {
    let sim = sim(MarketoConfig {
        result_shape: shape,
        ..fast_config()
    })
    .await;
    let client = client(&sim);
    let records = opportunities(5);
    let refused = records[2]["externalOpportunityId"].as_str().unwrap().to_owned();
    sim.skip_record(&refused, "1003", 1);
    let outcomes = client.sync_opportunities(&records).await.unwrap();
    assert_eq!(outcomes.len(), 5, "{shape:?}");
    let stored = sim.snapshot().opportunities;
    for (record, outcome) in records.iter().zip(&outcomes) {
        let id = record["externalOpportunityId"].as_str().unwrap();
        if id == refused {
            assert_eq!(outcome.code(), Some("1003"), "{shape:?}: the skip lands on its record");
        } else {
            assert_eq!(outcome.status, RecordStatus::Created, "{shape:?}");
            // The marketoGUID each record got is the one Marketo stored for it.
            assert_eq!(
                outcome.marketo_id.as_deref(),
                stored[id]["marketoGUID"].as_str(),
                "{shape:?}: {id}"
            );
        }
    }
}

#[tokio::test]
async fn write_results_are_matched_by_seq_as_documented() {
    sync_with_one_refused(ResultShape::Documented).await;
}

#[tokio::test]
async fn write_results_out_of_order_are_matched_by_their_seq() {
    sync_with_one_refused(ResultShape::Shuffled).await;
}

#[tokio::test]
async fn write_results_without_seq_are_matched_by_position() {
    sync_with_one_refused(ResultShape::NoSeq).await;
}

#[tokio::test]
async fn a_skip_with_a_singular_reason_is_read() {
    sync_with_one_refused(ResultShape::SingularReason).await;
}

#[tokio::test]
async fn sync_leads_results_carry_no_seq_and_are_matched_by_position() {
    // The leads page's shape: `{"id": 50, "status": "created"}`, no seq. One lead refused in
    // the middle; every other lead gets the id Marketo stored for its email.
    let sim = sim(fast_config()).await;
    let client = client(&sim);
    let leads: Vec<Value> = (0..5)
        .map(|i| json!({"email": format!("person{i}@example.com"), "firstName": format!("P{i}")}))
        .collect();
    sim.skip_record("person2@example.com", "1003", 1);
    let outcomes = client.upsert_leads("email", &leads).await.unwrap();
    assert_eq!(outcomes.len(), 5);
    assert_eq!(outcomes[2].code(), Some("1003"));
    let stored = sim.snapshot().leads;
    for (i, outcome) in outcomes.iter().enumerate().filter(|(i, _)| *i != 2) {
        let email = format!("person{i}@example.com");
        let lead = stored.iter().find(|l| l.fields["email"] == json!(email)).unwrap();
        assert_eq!(outcome.status, RecordStatus::Created);
        assert_eq!(
            outcome.marketo_id.as_deref(),
            Some(lead.id.to_string().as_str()),
            "{email}"
        );
    }
    // The same again: every existing lead is updated, in place, with its id.
    let again = client.upsert_leads("email", &leads).await.unwrap();
    assert!(again.iter().enumerate().all(|(i, o)| if i == 2 {
        o.status == RecordStatus::Created
    } else {
        o.status == RecordStatus::Updated
    }));
}

#[tokio::test]
async fn creating_leads_leaves_an_existing_lead_as_a_marketo_user_edited_it() {
    // Sync Leads `createOnly` (leads page): a new lead is created with its id; an existing one
    // is skipped with 1005 and not changed; an email with two leads is skipped too.
    let sim = sim(fast_config()).await;
    let client = client(&sim);
    let edited = sim.add_lead(json!({"email": "old@example.com", "firstName": "Edited"}));
    sim.add_lead(json!({"email": "twice@example.com"}));
    sim.add_lead(json!({"email": "twice@example.com"}));
    let leads = [
        json!({"email": "old@example.com", "firstName": "From Dynamics"}),
        json!({"email": "new@example.com", "firstName": "New"}),
        json!({"email": "twice@example.com"}),
    ];
    let outcomes = client.create_leads("email", &leads).await.unwrap();
    assert_eq!(outcomes[0].code(), Some("1005"));
    assert_eq!(outcomes[1].status, RecordStatus::Created);
    assert!(outcomes[2].is_skipped(), "{:?}", outcomes[2]);
    let stored = sim.snapshot().leads;
    let old = stored.iter().find(|l| l.id == edited).unwrap();
    assert_eq!(old.fields["firstName"], json!("Edited"));
    let new = stored
        .iter()
        .find(|l| l.fields["email"] == json!("new@example.com"))
        .unwrap();
    assert_eq!(outcomes[1].marketo_id.as_deref(), Some(new.id.to_string().as_str()));
}

#[tokio::test]
async fn a_lead_skip_in_the_openapi_shape_is_read() {
    let sim = sim(MarketoConfig {
        result_shape: ResultShape::SingularReason,
        ..fast_config()
    })
    .await;
    let client = client(&sim);
    sim.skip_record("b@example.com", "1006", 1);
    let leads = [json!({"email": "a@example.com"}), json!({"email": "b@example.com"})];
    let outcomes = client.upsert_leads("email", &leads).await.unwrap();
    assert_eq!(outcomes[0].status, RecordStatus::Created);
    assert_eq!(outcomes[1].code(), Some("1006"));
}

#[tokio::test]
async fn a_count_mismatch_says_the_real_counts() {
    let sim = sim(fast_config()).await;
    let client = client(&sim);
    for nth in 1..=6 {
        sim.inject(E::LeadSync, nth, oppsync_simulators::MarketoFault::DropResult);
    }
    let leads: Vec<Value> = (0..3).map(|i| json!({"email": format!("m{i}@example.com")})).collect();
    let err = client.upsert_leads("email", &leads).await.unwrap_err();
    assert!(
        matches!(err, MarketoError::ResultMismatch { sent: 3, got: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("answered 2 results for 3 records"), "{err}");
}

#[tokio::test]
async fn a_long_opportunity_query_switches_to_post_with_method_get() {
    let sim = sim(fast_config()).await;
    let client = client(&sim);
    let records = opportunities(300);
    client.sync_opportunities(&records).await.unwrap();
    let ids: Vec<String> = records
        .iter()
        .map(|r| r["externalOpportunityId"].as_str().unwrap().to_owned())
        .collect();
    // 300 GUIDs: about 11 KB of URL, over Marketo's 8 KB.
    let found = client.query_opportunities(&ids).await.unwrap();
    assert_eq!(found.len(), 300);
    assert_eq!(sim.refused("414"), 0);
    assert_eq!(sim.method_overrides(), 1);
}

#[tokio::test]
async fn identity_is_asked_in_the_documented_shape_and_a_form_body_is_not_read() {
    // The simulator reads the identity parameters from the query string only, as the
    // authentication page shows; a client that sent them in a form body would be refused.
    let sim = sim(fast_config()).await;
    let refused = reqwest::Client::new()
        .post(format!("{}/identity/oauth/token", sim.url()))
        .form(&[
            ("grant_type", "client_credentials".to_owned()),
            ("client_id", sim.client_id()),
            ("client_secret", sim.client_secret()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 401);
    let client = client(&sim);
    client.sync_opportunities(&opportunities(1)).await.unwrap();
    assert_eq!(sim.calls(E::Identity), 2);
}

/// Sync Sales Persons (sales-persons page) goes through the same matching: in every shape the
/// docs show or leave open, a skip lands on its own sales person and the rest get their ids.
#[tokio::test]
async fn sales_person_results_land_on_their_records_in_every_shape() {
    for shape in [
        ResultShape::Documented,
        ResultShape::Shuffled,
        ResultShape::NoSeq,
        ResultShape::SingularReason,
    ] {
        let sim = sim(MarketoConfig {
            result_shape: shape,
            ..fast_config()
        })
        .await;
        let client = client(&sim);
        let records: Vec<Value> = (0..5)
            .map(|i| json!({"externalSalesPersonId": format!("user-{i}"), "email": format!("seller{i}@example.com")}))
            .collect();
        sim.skip_record("user-2", "1003", 1);
        let outcomes = client.sync_sales_persons(&records).await.unwrap();
        assert_eq!(outcomes.len(), 5, "{shape:?}");
        let stored = sim.snapshot().sales_persons;
        for (i, outcome) in outcomes.iter().enumerate() {
            let key = format!("user-{i}");
            if i == 2 {
                assert_eq!(outcome.code(), Some("1003"), "{shape:?}");
                assert!(!stored.contains_key(&key), "{shape:?}");
            } else {
                assert_eq!(outcome.status, RecordStatus::Created, "{shape:?}");
                assert_eq!(
                    outcome.marketo_id.as_deref(),
                    stored[&key]["id"].as_i64().map(|n| n.to_string()).as_deref(),
                    "{shape:?}: {key}"
                );
            }
        }
    }
}
