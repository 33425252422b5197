//! The simulator's own fidelity, over raw HTTP: what the client is careful never to trigger.

use oppsync_marketo::Operation as E;
use serde_json::{Value, json};

use crate::common::*;

async fn token(sim: &oppsync_simulators::MarketoSim) -> String {
    let url = format!("{}/identity/oauth/token", sim.url());
    let answer: Value = reqwest::Client::new()
        .get(url)
        .query(&[
            ("grant_type", "client_credentials".to_owned()),
            ("client_id", sim.client_id()),
            ("client_secret", sim.client_secret()),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["token_type"], "bearer");
    assert!(answer["expires_in"].as_u64().unwrap() <= 3600);
    answer["access_token"].as_str().unwrap().to_owned()
}

async fn post(sim: &oppsync_simulators::MarketoSim, path: &str, body: Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{}{path}", sim.url()))
        .bearer_auth(token(sim).await)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn before_expiry_the_identity_endpoint_returns_the_same_token() {
    let sim = sim(fast_config()).await;
    assert_eq!(token(&sim).await, token(&sim).await);
}

#[tokio::test]
async fn duplicates_in_one_input_are_skipped_with_1036_and_results_keep_input_order() {
    let sim = sim(fast_config()).await;
    let (status, body) = post(
        &sim,
        "/rest/v1/opportunities.json",
        json!({"action": "createOrUpdate", "input": [opportunity(1), opportunity(2), opportunity(1)]}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["success"], true);
    let seqs: Vec<u64> = body["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [0, 1, 2]);
    assert_eq!(body["result"][2]["status"], "skipped");
    assert_eq!(body["result"][2]["reasons"][0]["code"], "1036");
}

#[tokio::test]
async fn more_than_300_records_is_a_request_level_failure_on_http_200() {
    let sim = sim(fast_config()).await;
    let (status, body) = post(
        &sim,
        "/rest/v1/opportunities.json",
        json!({"input": opportunities(301)}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["success"], false);
    assert!(body["errors"][0]["code"].is_string());
    assert!(sim.snapshot().opportunities.is_empty());
}

#[tokio::test]
async fn a_url_over_8_kb_is_refused_with_414() {
    let sim = sim(fast_config()).await;
    let values = vec!["x".repeat(50); 200].join(",");
    let response = reqwest::Client::new()
        .get(format!("{}/rest/v1/leads.json", sim.url()))
        .bearer_auth(token(&sim).await)
        .query(&[("filterType", "email"), ("filterValues", values.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 414);
    assert_eq!(sim.refused("414"), 1);
}

#[tokio::test]
async fn a_scheduled_record_skip_happens_as_many_times_as_asked_then_the_record_goes_through() {
    let sim = sim(fast_config()).await;
    let client = client(&sim);
    sim.skip_record("0b000000-0000-4000-8000-000000000001", "1003", 1);
    let first = client.sync_opportunities(&opportunities(3)).await.unwrap();
    assert_eq!(first[1].code(), Some("1003"));
    assert!(!first[0].is_skipped() && !first[2].is_skipped());
    let second = client.sync_opportunities(&opportunities(3)).await.unwrap();
    assert!(second.iter().all(|o| !o.is_skipped()));
}

#[tokio::test]
async fn usage_counts_the_days_rest_calls() {
    let sim = sim(fast_config()).await;
    let client = client(&sim);
    client.sync_opportunities(&opportunities(1)).await.unwrap();
    // The usage call itself counts.
    assert_eq!(client.usage_today().await.unwrap(), 2);
    assert_eq!(sim.calls(E::Usage), 1);
}

#[tokio::test]
async fn a_missing_or_unknown_token_is_601_and_never_touches_data() {
    let sim = sim(fast_config()).await;
    let response: Value = reqwest::Client::new()
        .post(format!("{}/rest/v1/opportunities.json", sim.url()))
        .json(&json!({"input": [opportunity(1)]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(response["success"], false);
    assert_eq!(response["errors"][0]["code"], "601");
    assert!(sim.snapshot().opportunities.is_empty());
}
