//! The Marketo budget held across processes: two writers on one state store, each configured
//! with the whole budget, against one Marketo. (SQLite here, for writes large enough to keep
//! every call slot busy; the store operations behind it are in the conformance suite on both
//! stores, and the second test runs on DynamoDB.)

use std::time::Duration;

use oppsync_marketo::{Limiter, LimiterSettings, MarketoClient, MarketoSettings, Secret};
use oppsync_pipeline::{Config, Pipeline};
use oppsync_simulators::dataverse::{DataverseConfig, Mix};
use oppsync_simulators::{DataverseSim, MarketoConfig, MarketoSim};
use oppsync_state::StateStore;
use oppsync_state::Status;
use oppsync_tests::harness::{Sims, assert_marketo_matches_dynamics, dataverse, dynamo, sqlite, unique};

async fn slow_marketo() -> Sims {
    let dv = DataverseSim::start(DataverseConfig::default()).await.unwrap();
    let mk = MarketoSim::start(MarketoConfig {
        rate_window: Duration::from_secs(1),
        // Long enough that a writer's calls overlap.
        latency: Duration::from_millis(150),
        ..MarketoConfig::default()
    })
    .await
    .unwrap();
    Sims { dv, mk }
}

/// A writer's own client with the whole budget: 4 calls at once, `daily` calls a day.
fn writer(sims: &Sims, daily: u64) -> MarketoClient {
    let limits = LimiterSettings {
        calls_per_window: 1000,
        window: Duration::from_secs(1),
        concurrency: 4,
    };
    writer_with(sims, limits, daily)
}

fn writer_with(sims: &Sims, limits: LimiterSettings, daily: u64) -> MarketoClient {
    let settings = MarketoSettings::new(
        &sims.mk.url(),
        &sims.mk.client_id(),
        Secret::from(sims.mk.client_secret()),
    )
    .unwrap();
    MarketoClient::new(settings, Limiter::new(limits), daily)
        .unwrap()
        .with_backoff_base(Duration::from_millis(5))
}

/// Batches of `n`: a drain writes ten at once, in two writes at a time, so with a twentieth of
/// the records each, both writers find ready records at once.
fn config(n: usize) -> Config {
    Config::from_toml(&format!("[sync]\nbatch_size = {n}\n"), "test").unwrap()
}

/// Two pipelines on one store, each with its own Marketo client; Dynamics polled to the end.
async fn two_writers<S: StateStore + Clone>(
    sims: &Sims,
    store: &S,
    client: impl Fn() -> MarketoClient,
    batch: usize,
) -> (Pipeline<S>, Pipeline<S>) {
    let pipeline = |name: &str| Pipeline::new(store.clone(), dataverse(sims), client(), config(batch), unique(name));
    let (a, b) = (pipeline("a"), pipeline("b"));
    while !a.poll(None).await.unwrap().caught_up {}
    (a, b)
}

/// Both writers count themselves in before either writes, then drain at once; both write and
/// nothing fails.
async fn both_write<S: StateStore + Clone>(a: &Pipeline<S>, b: &Pipeline<S>) {
    a.share_budget().await;
    b.share_budget().await;
    let (ra, rb) = tokio::join!(a.drain(|_, _| {}), b.drain(|_, _| {}));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.failed + rb.failed, 0, "{ra:?} {rb:?}");
    assert!(ra.written > 0 && rb.written > 0, "both wrote: {ra:?} {rb:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_writers_on_one_store_share_the_calls_at_once() {
    let sims = slow_marketo().await;
    sims.dv.seed(1200, 11, Mix::Uniform);
    let store = sqlite();
    let (a, b) = two_writers(&sims, &store, || writer(&sims, 40_000), 30).await;
    both_write(&a, &b).await;
    // Each took half of the 4 calls at once: never more than 4 in flight in all (each alone
    // keeps 4 busy, so 8 without the sharing).
    let peak = sims.mk.concurrency_high_water();
    assert!((3..=4).contains(&peak), "{peak} calls at once");
    // Every call was counted in the table before it was sent.
    let day = oppsync_pipeline::time::marketo_day(a.now());
    assert_eq!(store.marketo_calls(&day).await.unwrap(), sims.mk.rest_calls());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_writers_together_stop_at_the_days_budget() {
    let sims = slow_marketo().await;
    sims.dv.seed(120, 12, Mix::Uniform);
    let store = dynamo().await;
    let budget = 5;
    let (a, b) = two_writers(&sims, &store, || writer(&sims, budget), 6).await;
    let (ra, rb) = tokio::join!(a.drain(|_, _| {}), b.drain(|_, _| {}));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    // The sync needs 8 calls and each writer may make 5 a day on its own; together they make
    // 5, and say why they stopped.
    assert_eq!(sims.mk.rest_calls(), budget);
    assert!(ra.stopped.is_some() || rb.stopped.is_some(), "{ra:?} {rb:?}");
    let day = oppsync_pipeline::time::marketo_day(a.now());
    assert_eq!(store.marketo_calls(&day).await.unwrap(), budget);
}

/// Two writers on one DynamoDB table, each configured with the whole budget of 4 calls per
/// 2 s, against a Marketo that refuses the 5th call in any 2 s with 606. Each takes half, so
/// Marketo never refuses one, and everything is written. (4, not Marketo's shape of 10: moto
/// answers about 100 requests a second, so two writers on it make about 3 calls a second;
/// 4 per 2 s is a window both press against, and without the sharing Marketo refuses calls.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_writers_on_dynamodb_hold_the_calls_per_window_together() {
    let dv = DataverseSim::start(DataverseConfig::default()).await.unwrap();
    let mk = MarketoSim::start(MarketoConfig {
        rate_limit: Some(4),
        rate_window: Duration::from_secs(2),
        latency: Duration::from_millis(50),
        ..MarketoConfig::default()
    })
    .await
    .unwrap();
    let sims = Sims { dv, mk };
    let n = 150;
    sims.dv.seed(n, 13, Mix::Uniform);
    let store = dynamo().await;
    let limits = LimiterSettings {
        calls_per_window: 4,
        window: Duration::from_secs(2),
        concurrency: 4,
    };
    let (a, b) = two_writers(&sims, &store, || writer_with(&sims, limits, 40_000), 1).await;
    both_write(&a, &b).await;
    // Enough calls that the window mattered: many windows' worth.
    let calls = sims.mk.rest_calls();
    eprintln!("{calls} calls, refused {} x606", sims.mk.refused("606"));
    assert!(calls > 20, "only {calls} calls");
    assert_eq!(sims.mk.refused("606"), 0, "Marketo refused calls past 4 per 2 s");
    assert_eq!(sims.mk.refused("615"), 0);
    let counts = store.counts().await.unwrap();
    assert_eq!(counts.get(Status::Synced), n, "{counts:?}");
    assert_marketo_matches_dynamics(&sims);
}
