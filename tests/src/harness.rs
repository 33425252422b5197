//! Simulators, clients and stores wired into a pipeline, for tests.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
use oppsync_dynamics::{DataverseClient, DataverseSettings};
use oppsync_marketo::{Limiter, LimiterSettings, MarketoClient, MarketoSettings, Secret};
use oppsync_pipeline::{Config, Pipeline};
use oppsync_simulators::dataverse::DataverseConfig;
use oppsync_simulators::oracle::{self, Rules};
use oppsync_simulators::{DataverseSim, MarketoConfig, MarketoSim};
use oppsync_state::{DynamoStore, SqliteStore, StateStore};
use serde_json::json;

static NEXT: AtomicU32 = AtomicU32::new(0);

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A new, empty directory of its own under the temporary directory, so that what a test leaves
/// in it can be listed.
pub fn scratch_dir(prefix: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(unique(prefix));
    std::fs::create_dir_all(&dir).expect("create a scratch directory");
    dir
}

/// Every file in `dir` with its bytes, sorted by name: what "left untouched" compares.
pub fn dir_contents(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .expect("list the scratch directory")
        .filter_map(Result::ok)
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap_or_default(),
            )
        })
        .collect();
    out.sort();
    out
}

/// The opportunities table as the first oppsync wrote it: before `retry_at`, `rewrite` and
/// `planned`, and before state files were marked.
pub const FIRST_OPPORTUNITIES_TABLE: &str = "CREATE TABLE opportunities (
    id TEXT PRIMARY KEY, status TEXT NOT NULL, version INTEGER NOT NULL,
    deleted INTEGER NOT NULL, modified_on TEXT, plan TEXT, written TEXT,
    written_version INTEGER, attempts INTEGER NOT NULL DEFAULT 0,
    err_operation TEXT, err_code TEXT, err_message TEXT,
    claim_token INTEGER, claim_until INTEGER,
    created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL, status_since INTEGER NOT NULL);";

/// A whole state file as an older, unmarked oppsync left it.
pub const FIRST_STATE_SCHEMA: &str =
    "CREATE TABLE cursors (source TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at INTEGER NOT NULL);
CREATE TABLE leases (name TEXT PRIMARY KEY, owner TEXT NOT NULL, token INTEGER NOT NULL, expires_at INTEGER NOT NULL);";

pub struct Sims {
    pub dv: DataverseSim,
    pub mk: MarketoSim,
}

/// Both simulators; Marketo's 20-second window compressed to one second on both sides (the
/// same call counts, without the waiting).
pub async fn sims() -> Sims {
    sims_with(None).await
}

/// [`sims`], both failing at random with `chaos`.
pub async fn sims_with(chaos: Option<oppsync_simulators::Chaos>) -> Sims {
    let dv = DataverseSim::start(DataverseConfig {
        chaos,
        ..DataverseConfig::default()
    })
    .await
    .unwrap();
    let mk = MarketoSim::start(MarketoConfig {
        rate_window: Duration::from_secs(1),
        chaos,
        ..MarketoConfig::default()
    })
    .await
    .unwrap();
    Sims { dv, mk }
}

pub fn sqlite() -> SqliteStore {
    SqliteStore::open(std::env::temp_dir().join(format!("{}.db", unique("oppsync-pipeline-test")))).unwrap()
}

/// moto's server, which `scripts/test` starts.
pub fn moto_endpoint() -> String {
    std::env::var("OPPSYNC_DYNAMODB_ENDPOINT").unwrap_or_else(|_| {
        panic!(
            "OPPSYNC_DYNAMODB_ENDPOINT is not set. The DynamoDB tests run against moto's server, which \
             scripts/test installs and starts; run scripts/test, or start `.venv/bin/python scripts/moto_server.py 127.0.0.1 5000` \
             and set OPPSYNC_DYNAMODB_ENDPOINT=http://127.0.0.1:5000"
        )
    })
}

/// A DynamoDB client for moto's server, with the dummy credentials it accepts.
pub fn dynamo_client() -> aws_sdk_dynamodb::Client {
    let config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "tests"))
        .endpoint_url(moto_endpoint())
        .build();
    aws_sdk_dynamodb::Client::from_conf(config)
}

/// A new table on moto's server, created as `template.yaml` declares it (stream included).
pub async fn dynamo() -> DynamoStore {
    let store = DynamoStore::new(dynamo_client(), unique("oppsync-test"));
    store.create_table().await.unwrap();
    store
}

pub fn dataverse(sims: &Sims) -> DataverseClient {
    let (tenant, id, secret) = sims.dv.credentials();
    let settings = DataverseSettings::new(
        &sims.dv.url(),
        &tenant,
        &id,
        oppsync_dynamics::Secret::from(secret),
        Some(&sims.dv.token_url()),
    )
    .unwrap();
    DataverseClient::new(settings)
        .unwrap()
        .with_backoff_base(Duration::from_millis(5))
}

pub fn marketo(sims: &Sims) -> MarketoClient {
    let settings = MarketoSettings::new(
        &sims.mk.url(),
        &sims.mk.client_id(),
        Secret::from(sims.mk.client_secret()),
    )
    .unwrap();
    let limits = LimiterSettings {
        window: Duration::from_secs(1),
        ..LimiterSettings::default()
    };
    MarketoClient::new(settings, Limiter::new(limits), 40_000)
        .unwrap()
        .with_backoff_base(Duration::from_millis(5))
}

pub fn pipeline<S: StateStore>(sims: &Sims, store: S, config: Config) -> Pipeline<S> {
    Pipeline::new(store, dataverse(sims), marketo(sims), config, unique("test-poller"))
}

/// Poll until caught up, then drain; panics on errors.
pub async fn sync<S: StateStore>(p: &Pipeline<S>) -> oppsync_pipeline::DrainReport {
    let poll = p.poll(None).await.unwrap();
    assert!(poll.caught_up && !poll.busy, "{poll:?}");
    p.drain(|_, _| {}).await.unwrap()
}

/// Marketo's state against the rules, record by record.
pub fn assert_marketo_matches_dynamics(sims: &Sims) {
    let expected = oracle::expected(&sims.dv, &Rules::default());
    // The oracle must have something to compare: a seeded run has roles and companies.
    assert!(!expected.roles.is_empty() && !expected.companies.is_empty());
    let diff = oracle::differences(&expected, &sims.mk.snapshot(), &Default::default());
    assert_eq!(
        sims.mk.lead_key_races(),
        0,
        "two Sync Leads calls in flight carried one lead key (Adobe's leads page: duplicate leads)"
    );
    assert!(
        diff.is_empty(),
        "{} differences, first ones:\n{}",
        diff.len(),
        diff.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// An AWS configuration for moto's server (DynamoDB and Secrets Manager).
pub fn aws() -> aws_config::SdkConfig {
    aws_config::SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_dynamodb::config::SharedCredentialsProvider::new(
            aws_sdk_dynamodb::config::Credentials::new("test", "test", None, None, "tests"),
        ))
        .endpoint_url(moto_endpoint())
        .build()
}

/// Stores a secret in moto's Secrets Manager; returns its ARN.
pub async fn secret(value: &str) -> String {
    let client = aws_sdk_secretsmanager::Client::new(&aws());
    let out = client
        .create_secret()
        .name(unique("oppsync/credentials"))
        .secret_string(value)
        .send()
        .await
        .unwrap();
    out.arn().unwrap().to_owned()
}

pub fn dynamics_secret(sims: &Sims) -> String {
    let (tenant, client, secret) = sims.dv.credentials();
    json!({"url": sims.dv.url(), "tenantId": tenant, "clientId": client, "clientSecret": secret,
           "tokenUrl": sims.dv.token_url()})
    .to_string()
}

pub fn marketo_secret(sims: &Sims) -> String {
    json!({"url": sims.mk.url(), "clientId": sims.mk.client_id(), "clientSecret": sims.mk.client_secret()}).to_string()
}

/// A Lambda invocation deadline far enough away not to matter.
pub fn far() -> std::time::Instant {
    std::time::Instant::now() + std::time::Duration::from_secs(900)
}
