use std::time::Duration;

use oppsync_marketo::{Limiter, LimiterSettings, MarketoClient, MarketoSettings, Secret};
use oppsync_simulators::{MarketoConfig, MarketoSim};
use serde_json::{Value, json};

/// A simulator with Marketo's limits, and time compressed: 100 calls per second, not per 20 s.
pub fn fast_config() -> MarketoConfig {
    MarketoConfig {
        rate_window: Duration::from_secs(1),
        ..MarketoConfig::default()
    }
}

pub async fn sim(config: MarketoConfig) -> MarketoSim {
    MarketoSim::start(config).await.unwrap()
}

/// A client with the default budget (50 calls per window, 5 concurrent), on a 1 s window.
pub fn client(sim: &MarketoSim) -> MarketoClient {
    client_with(
        sim,
        LimiterSettings {
            window: Duration::from_secs(1),
            ..LimiterSettings::default()
        },
        50_000,
    )
}

pub fn client_with(sim: &MarketoSim, limits: LimiterSettings, budget: u64) -> MarketoClient {
    let settings = MarketoSettings::new(&sim.url(), &sim.client_id(), Secret::from(sim.client_secret())).unwrap();
    MarketoClient::new(settings, Limiter::new(limits), budget)
        .unwrap()
        .with_backoff_base(Duration::from_millis(20))
}

pub fn opportunity(n: usize) -> Value {
    json!({"externalOpportunityId": format!("0b000000-0000-4000-8000-{n:012}"), "name": format!("Deal {n}"), "amount": n})
}

pub fn opportunities(n: usize) -> Vec<Value> {
    (0..n).map(opportunity).collect()
}
