//! The identity token: cached, refreshed on expiry, and on 601/602 with one retry.

use std::time::Duration;

use oppsync_marketo::Operation as E;
use oppsync_marketo::{MarketoClient, MarketoError, MarketoSettings, Secret};
use oppsync_simulators::MarketoConfig;

use crate::common::*;

#[tokio::test]
async fn one_token_serves_many_calls() {
    let sim = sim(fast_config()).await;
    let client = client(&sim);
    for i in 0..5 {
        client.sync_opportunities(&[opportunity(i)]).await.unwrap();
    }
    assert_eq!(sim.calls(E::Identity), 1);
    assert_eq!(sim.calls(E::OpportunitySync), 5);
}

#[tokio::test]
async fn an_expired_token_is_replaced_before_the_call() {
    let sim = sim(MarketoConfig {
        token_ttl: Duration::from_secs(2),
        ..fast_config()
    })
    .await;
    let client = client(&sim);
    client.sync_opportunities(&[opportunity(1)]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    client.sync_opportunities(&[opportunity(2)]).await.unwrap();
    assert_eq!(sim.refused("602"), 0, "the client must not send an expired token");
    assert!(sim.calls(E::Identity) >= 2);
}

#[tokio::test]
async fn a_602_re_authenticates_and_retries_once() {
    let sim = sim(fast_config()).await;
    let client = client(&sim);
    client.sync_opportunities(&[opportunity(1)]).await.unwrap();
    sim.expire_tokens();
    let outcomes = client.sync_opportunities(&[opportunity(2)]).await.unwrap();
    assert_eq!(outcomes.len(), 1);
    assert_eq!(sim.refused("602"), 1);
    assert_eq!(sim.calls(E::Identity), 2);
    assert_eq!(sim.snapshot().opportunities.len(), 2);
}

#[tokio::test]
async fn a_601_re_authenticates_and_retries_once() {
    let sim = sim(fast_config()).await;
    let client = client(&sim);
    client.sync_opportunities(&[opportunity(1)]).await.unwrap();
    sim.invalidate_tokens();
    client.sync_opportunities(&[opportunity(2)]).await.unwrap();
    assert_eq!(sim.refused("601"), 1);
    assert_eq!(sim.calls(E::Identity), 2);
}

#[tokio::test]
async fn a_token_refused_twice_is_an_error_not_a_loop() {
    let sim = sim(fast_config()).await;
    let client = client(&sim);
    client.sync_opportunities(&[opportunity(1)]).await.unwrap();
    sim.inject(E::OpportunitySync, 2, oppsync_simulators::MarketoFault::Code("601"));
    sim.inject(E::OpportunitySync, 3, oppsync_simulators::MarketoFault::Code("601"));
    let err = client.sync_opportunities(&[opportunity(2)]).await.unwrap_err();
    assert!(
        matches!(err, MarketoError::Api { ref code, .. } if code == "601"),
        "{err}"
    );
    assert_eq!(sim.calls(E::OpportunitySync), 3);
}

#[tokio::test]
async fn wrong_credentials_are_a_clear_error_naming_what_to_check() {
    let sim = sim(fast_config()).await;
    let settings = MarketoSettings::new(&sim.url(), &sim.client_id(), Secret::from("wrong")).unwrap();
    let client = MarketoClient::new(settings, oppsync_marketo::Limiter::new(Default::default()), 100).unwrap();
    let err = client.sync_opportunities(&[opportunity(1)]).await.unwrap_err();
    assert!(matches!(err, MarketoError::Auth { status: 401 }), "{err}");
    assert!(err.to_string().contains("MARKETO_CLIENT_SECRET"), "{err}");
    assert_eq!(sim.rest_calls(), 0, "no REST call without a token");
}

#[tokio::test]
async fn the_token_travels_only_in_the_authorization_header() {
    let sim = sim(fast_config()).await;
    let client = client(&sim);
    client.sync_opportunities(&opportunities(3)).await.unwrap();
    client
        .query_leads("email", &["a@example.com".into()], &[])
        .await
        .unwrap();
    assert_eq!(sim.token_in_query(), 0);
}
