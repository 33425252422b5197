//! Every error class, each leading to its documented behaviour.

use oppsync_marketo::Operation as E;
use oppsync_marketo::{ErrorClass, MarketoError};
use oppsync_simulators::{MarketoConfig, MarketoFault as F};

use crate::common::*;

#[tokio::test]
async fn throttling_and_transient_codes_are_retried_until_they_pass() {
    for fault in [
        F::Code("606"),
        F::Code("615"),
        F::Http(502),
        F::Code("604"),
        F::Code("608"),
        F::Code("611"),
        F::Code("713"),
        F::Http(503),
        F::Malformed,
    ] {
        let sim = sim(fast_config()).await;
        let client = client(&sim);
        sim.inject(E::OpportunitySync, 1, fault.clone());
        sim.inject(E::OpportunitySync, 2, fault.clone());
        let outcomes = client.sync_opportunities(&opportunities(2)).await.unwrap();
        assert_eq!(outcomes.len(), 2, "{fault:?}");
        assert_eq!(
            sim.calls(E::OpportunitySync),
            3,
            "{fault:?}: two failures, then success"
        );
        assert_eq!(sim.snapshot().opportunities.len(), 2, "{fault:?}");
    }
}

#[tokio::test]
async fn a_transient_failure_that_persists_gives_up_with_the_code() {
    let sim = sim(fast_config()).await;
    let client = client(&sim);
    for nth in 1..=10 {
        sim.inject(E::OpportunitySync, nth, F::Code("611"));
    }
    let err = client.sync_opportunities(&opportunities(1)).await.unwrap_err();
    assert_eq!(err.code(), "611");
    assert_eq!(err.class(), ErrorClass::Transient);
    assert_eq!(sim.calls(E::OpportunitySync), 6, "bounded retries");
}

#[tokio::test]
async fn the_daily_quota_607_stops_at_once_without_retrying() {
    let sim = sim(fast_config()).await;
    let client = client(&sim);
    client.sync_opportunities(&opportunities(1)).await.unwrap();
    sim.set_daily_calls(50_000);
    let err = client.sync_opportunities(&opportunities(2)).await.unwrap_err();
    assert!(matches!(err, MarketoError::QuotaExhausted), "{err}");
    assert!(err.to_string().contains("midnight US Central"), "{err}");
    assert_eq!(err.class(), ErrorClass::QuotaExhausted);
    assert_eq!(sim.calls(E::OpportunitySync), 2, "no retry after 607");
    assert_eq!(sim.refused("607"), 1);
}

#[tokio::test]
async fn permanent_request_errors_are_not_retried() {
    let sim = sim(fast_config()).await;
    let client = client(&sim);
    sim.inject(E::OpportunitySync, 1, F::Code("603"));
    let err = client.sync_opportunities(&opportunities(1)).await.unwrap_err();
    assert_eq!((err.code().as_str(), err.class()), ("603", ErrorClass::Permanent));
    assert_eq!(sim.calls(E::OpportunitySync), 1);
}

#[tokio::test]
async fn a_body_over_a_megabyte_is_refused_by_marketo_with_413() {
    // One record cannot be split: the client sends it, Marketo refuses it, and the error says why.
    let sim = sim(fast_config()).await;
    let client = client(&sim);
    let mut huge = opportunity(1);
    huge["description"] = serde_json::json!("x".repeat(1_100_000));
    let err = client.sync_opportunities(&[huge]).await.unwrap_err();
    assert!(matches!(err, MarketoError::Http { status: 413, .. }), "{err}");
    assert!(err.to_string().contains("over 1 MB"), "{err}");
    assert_eq!(err.class(), ErrorClass::Permanent);
}

#[tokio::test]
async fn a_native_crm_sync_instance_gets_a_clear_message_from_the_preflight_and_the_writes() {
    // How a disabled API answers is not documented: each plausible code, and both readings of
    // "read-only" (opportunities page) and "disabled" (lead-database page).
    for (refusal, reads_disabled) in [
        ("1018", false),
        ("603", false),
        ("610", false),
        ("1018", true),
        ("610", true),
    ] {
        let sim = sim(MarketoConfig {
            crm_enabled: true,
            crm_refusal: refusal,
            crm_reads_disabled: reads_disabled,
            ..fast_config()
        })
        .await;
        let client = client(&sim);
        let preflight = client.preflight(&["name", "amount"]).await.unwrap();
        assert!(!preflight.ok(), "{refusal}");
        let blocked = preflight.blocked.unwrap();
        assert!(
            blocked.contains("native") && blocked.contains(refusal),
            "{refusal}: {blocked}"
        );
        // A write refused record by record (1018) is one error for the whole call, not one
        // failure per record.
        let err = client.sync_opportunities(&opportunities(2)).await.unwrap_err();
        assert!(matches!(err, MarketoError::CrmEnabled), "{refusal}: {err}");
        assert_eq!(err.class(), ErrorClass::CrmEnabled);
        assert!(sim.snapshot().opportunities.is_empty());
    }
}

#[tokio::test]
async fn the_preflight_names_configured_fields_the_instance_lacks() {
    let sim = sim(MarketoConfig {
        custom_opportunity_fields: vec!["region".into()],
        ..fast_config()
    })
    .await;
    let client = client(&sim);
    let preflight = client.preflight(&["name", "region", "dynamicsOwner"]).await.unwrap();
    assert_eq!(preflight.blocked, None);
    assert_eq!(preflight.missing_fields, ["dynamicsOwner"]);
    assert!(client.preflight(&["name", "region"]).await.unwrap().ok());
}

#[tokio::test]
async fn an_unreachable_instance_is_a_transport_error() {
    let settings =
        oppsync_marketo::MarketoSettings::new("http://127.0.0.1:9", "id", oppsync_marketo::Secret::from("s")).unwrap();
    let client = oppsync_marketo::MarketoClient::new(settings, oppsync_marketo::Limiter::new(Default::default()), 10)
        .unwrap()
        .with_backoff_base(std::time::Duration::from_millis(1));
    let err = client.sync_opportunities(&opportunities(1)).await.unwrap_err();
    assert!(
        matches!(
            err,
            MarketoError::Transport {
                endpoint: "identity",
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn an_answer_past_the_cap_is_refused_before_it_is_held_whole() {
    use oppsync_simulators::oversized::{Oversized, serve};
    for how in [Oversized::Announced, Oversized::Streamed] {
        let url = serve(how).await;
        let settings =
            oppsync_marketo::MarketoSettings::new(&url, "id", oppsync_marketo::Secret::from("s".to_owned())).unwrap();
        let client = oppsync_marketo::MarketoClient::new(
            settings,
            oppsync_marketo::Limiter::new(oppsync_marketo::LimiterSettings::default()),
            1000,
        )
        .unwrap()
        .with_backoff_base(std::time::Duration::from_millis(5));
        let err = client.sync_opportunities(&[opportunity(1)]).await.unwrap_err();
        assert!(matches!(err, MarketoError::Decode { .. }), "{how:?}: {err}");
        assert!(err.to_string().contains("over 16 MB"), "{err}");
    }
}
