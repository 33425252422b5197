//! The shared-instance limits: the default budget stays inside them under load; the daily budget
//! stops before the quota.

use std::time::Duration;

use oppsync_marketo::{LimiterSettings, MarketoClient, MarketoError};
use oppsync_simulators::{MarketoConfig, MarketoSim};
use serde_json::{Value, json};

use crate::common::*;

/// 10,000 opportunities, companies and leads, written by `tasks` tasks at once.
async fn load(client: &MarketoClient, tasks_n: usize) {
    let mut tasks = tokio::task::JoinSet::new();
    let share = 10_000 / tasks_n;
    for t in 0..tasks_n {
        let client = client.clone();
        tasks.spawn(async move {
            let range = t * share..(t + 1) * share;
            let opps: Vec<Value> = range.clone().map(opportunity).collect();
            let companies: Vec<Value> = range
                .clone()
                .map(|i| json!({"externalCompanyId": format!("a{i}"), "company": format!("Company {i}")}))
                .collect();
            let leads: Vec<Value> = range
                .map(|i| json!({"email": format!("lead{i}@example.com")}))
                .collect();
            client.sync_companies(&companies).await.unwrap();
            client.sync_opportunities(&opps).await.unwrap();
            client.upsert_leads("email", &leads).await.unwrap();
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

fn loaded_sim_config() -> MarketoConfig {
    MarketoConfig {
        // Each call takes a while, so calls overlap as they would against a real instance.
        latency: Duration::from_millis(15),
        ..fast_config()
    }
}

fn assert_all_written(sim: &MarketoSim) {
    let snapshot = sim.snapshot();
    assert_eq!(snapshot.opportunities.len(), 10_000);
    assert_eq!(snapshot.companies.len(), 10_000);
    assert_eq!(snapshot.leads.len(), 10_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_budget_never_lets_marketo_refuse_a_call_under_a_10000_record_load() {
    let sim = sim(loaded_sim_config()).await;
    let client = client(&sim);
    load(&client, 8).await;
    assert_all_written(&sim);
    assert_eq!(sim.refused("606"), 0, "rate limit hit");
    assert_eq!(sim.refused("615"), 0, "concurrency limit hit");
    assert!(
        sim.concurrency_high_water() <= 5,
        "{} in flight",
        sim.concurrency_high_water()
    );
    assert!(sim.concurrency_high_water() >= 2, "the load should overlap calls");
    // 3 objects × 8 tasks × ⌈1250/300⌉ calls.
    assert_eq!(sim.rest_calls(), 3 * 8 * 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_allowed_more_than_marketo_is_refused_but_retries_and_loses_nothing() {
    // The control: the same load without our limits does trip Marketo's, so the test above can fail.
    let sim = sim(loaded_sim_config()).await;
    let client = client_with(
        &sim,
        LimiterSettings {
            calls_per_window: 1000,
            window: Duration::from_secs(1),
            concurrency: 64,
        },
        50_000,
    )
    // 20 tasks × 64 in flight against Marketo's 10 is a retry storm: give the backoff room to
    // spread it (the jittered waits then span well past one window).
    .with_backoff_base(Duration::from_millis(100));
    load(&client, 20).await;
    assert!(
        sim.refused("606") + sim.refused("615") > 0,
        "the simulator must enforce the limits"
    );
    assert_all_written(&sim);
}

#[tokio::test]
async fn the_daily_budget_stops_calls_before_the_quota_and_says_so() {
    let sim = sim(MarketoConfig {
        daily_quota: 6,
        ..fast_config()
    })
    .await;
    let client = client_with(
        &sim,
        LimiterSettings {
            window: Duration::from_secs(1),
            ..LimiterSettings::default()
        },
        5,
    );
    let err = client.sync_opportunities(&opportunities(2000)).await.unwrap_err();
    assert!(
        matches!(err, MarketoError::BudgetExhausted { used: 5, budget: 5 }),
        "{err}"
    );
    assert!(err.to_string().contains("stays queued"), "{err}");
    assert_eq!(sim.rest_calls(), 5, "the sixth call was never sent");
    assert_eq!(sim.refused("607"), 0, "Marketo's quota was never reached");
    assert_eq!(client.calls_today(), 5);
    // A new day: the pipeline seeds the count from the state store.
    client.set_calls_today(0);
    assert!(client.sync_opportunities(&opportunities(1)).await.is_ok());
}

#[tokio::test]
async fn calls_are_counted_by_endpoint() {
    let sim = sim(fast_config()).await;
    let client = client(&sim);
    client.sync_opportunities(&opportunities(301)).await.unwrap();
    client
        .query_leads("email", &["x@example.com".into()], &[])
        .await
        .unwrap();
    let calls = client.calls_by_endpoint();
    assert_eq!(calls.get("opportunities.sync"), Some(&2));
    assert_eq!(calls.get("leads.query"), Some(&1));
    assert_eq!(client.calls_today(), 3);
}

#[tokio::test]
async fn a_full_window_606_waits_long_enough_for_the_window_to_turn() {
    // Another integration fills the instance's window: Marketo allows 2 calls a window here,
    // while our own limiter would allow 100.
    let sim = sim(MarketoConfig {
        rate_limit: Some(2),
        ..fast_config()
    })
    .await;
    let client = client_with(
        &sim,
        LimiterSettings {
            calls_per_window: 100,
            window: Duration::from_secs(1),
            concurrency: 5,
        },
        50_000,
    )
    .with_backoff_base(Duration::from_millis(1));
    for n in 0..5 {
        client.sync_opportunities(&opportunities(n + 1)).await.unwrap();
    }
    assert!(sim.refused("606") > 0, "the window did fill");
}

/// One write of 1,500 records is five calls, and they go out together up to the budget's calls
/// at once (a real call takes seconds; one at a time would use a fifth of the budget), never
/// past it, with results in input order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_large_write_keeps_the_budgets_calls_in_flight_and_no_more() {
    let sim = sim(MarketoConfig {
        latency: Duration::from_millis(100),
        ..fast_config()
    })
    .await;
    let client = client(&sim);
    let opps: Vec<Value> = (0..1500).map(opportunity).collect();
    let outcomes = client.sync_opportunities(&opps).await.unwrap();
    assert_eq!(outcomes.len(), 1500);
    assert_eq!(sim.rest_calls(), 5);
    assert_eq!(sim.concurrency_high_water(), 5, "the five calls overlapped");
    let emails: Vec<String> = (0..1500).map(|i| format!("lead{i}@example.com")).collect();
    client.query_leads("email", &emails, &[]).await.unwrap();
    assert_eq!(
        sim.concurrency_high_water(),
        5,
        "never more than the budget's 5 at once"
    );
    assert_eq!(sim.refused("615"), 0);
}
