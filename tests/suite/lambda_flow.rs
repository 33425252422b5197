//! The deployed shape, minus AWS: the functions cold-start from Secrets Manager (moto), the
//! poller's handler records changes in DynamoDB (moto), and the transformer's and writer's
//! handlers receive the table's real stream records, kept by the template's own filter
//! patterns and cut to its batch sizes, with failed records redelivered as Lambda does.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use oppsync_dynamics::DataverseClient;
use oppsync_lambda::coldstart::{self, ColdStartError, Env};
use oppsync_lambda::{BatchResponse, Handled};
use oppsync_mapping::OpportunityId;
use oppsync_marketo::MarketoClient;
use oppsync_marketo::Operation as E;
use oppsync_pipeline::ports::DataversePort;
use oppsync_pipeline::{NoAccess, Pipeline};
use oppsync_simulators::dataverse::{Mix, Table, seed_id};
use oppsync_state::{DynamoStore, StateStore, Status};
use oppsync_tests::harness::{
    Sims, assert_marketo_matches_dynamics, aws, dynamics_secret, dynamo, marketo_secret, moto_endpoint, secret, sims,
};
use oppsync_tests::stream::{self, StreamReader};
use oppsync_tests::template;
use serde_json::{Value, json};

fn env(table: &str, dynamics_arn: &str, marketo_arn: &str, config: &str) -> Env {
    let vars = [
        ("STATE_TABLE", table),
        ("DYNAMICS_SECRET_ARN", dynamics_arn),
        ("MARKETO_SECRET_ARN", marketo_arn),
        ("OPPSYNC_CONFIG", config),
    ];
    Env::read(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())).unwrap()
}

/// What Lambda does with the two stream consumers.
pub(crate) struct Deployment {
    pub(crate) pipeline: Pipeline<DynamoStore>,
    /// How far the functions' clock runs ahead of the wall clock (retry waits pass at once).
    skew: Arc<AtomicI64>,
    reader: StreamReader,
    pending: (Value, usize),
    ready: (Value, usize),
    /// Every metric name a handler published.
    emitted: BTreeSet<String>,
    /// Deliveries answered with batchItemFailures, and the records they named.
    redelivered: Vec<String>,
    /// Every stream record read so far, in order.
    history: Vec<Value>,
    /// Stream records delivered to the transformer and to the writer (first deliveries; the
    /// redeliveries of failed records are in `redelivered`).
    pub(crate) delivered: (u64, u64),
    /// Deliveries that found nothing to claim (the handlers' `ClaimsMissed`).
    pub(crate) claims_missed: u64,
}

impl Deployment {
    async fn cold_start(sims: &Sims) -> Deployment {
        Self::cold_start_with(sims, "").await
    }

    /// The functions cold-started with `config` as their OPPSYNC_CONFIG.
    pub(crate) async fn cold_start_with(sims: &Sims, config: &str) -> Deployment {
        let store = dynamo().await;
        let table = store.table().to_owned();
        let reader = StreamReader::open(&oppsync_tests::harness::dynamo_client(), &moto_endpoint(), &table).await;
        let env = env(
            &table,
            &secret(&dynamics_secret(sims)).await,
            &secret(&marketo_secret(sims)).await,
            config,
        );
        let skew = Arc::new(AtomicI64::new(0));
        let ahead = Arc::clone(&skew);
        let wall = oppsync_pipeline::system_clock();
        let pipeline = coldstart::build(&env, &aws())
            .await
            .unwrap()
            .with_clock(Arc::new(move || wall() + ahead.load(Ordering::SeqCst)));
        let t = template::load();
        Deployment {
            pipeline,
            skew,
            reader,
            pending: template::stream_source(&t, "TransformerFunction", "Pending"),
            ready: template::stream_source(&t, "WriterFunction", "Ready"),
            emitted: BTreeSet::new(),
            redelivered: Vec::new(),
            history: Vec::new(),
            delivered: (0, 0),
            claims_missed: 0,
        }
    }

    /// Moves the functions' clock forward.
    pub(crate) fn advance(&self, ms: i64) {
        self.skew.fetch_add(ms, Ordering::SeqCst);
    }

    pub(crate) async fn poll(&mut self) {
        let handled = oppsync_lambda::poll(&self.pipeline, json!({}), Instant::now() + Duration::from_secs(900))
            .await
            .unwrap();
        assert!(handled.response.caught_up, "{:?}", handled.response);
        self.emitted.extend(handled.metrics.counts.keys().cloned());
    }

    /// Reads the stream until it is quiet, delivering each batch to its function.
    pub(crate) async fn pump(&mut self) {
        for _ in 0..50 {
            let records = self.reader.read().await;
            if records.is_empty() {
                return;
            }
            self.history.extend(records.iter().cloned());
            for event in stream::events(&records, &self.pending.0, self.pending.1) {
                self.deliver(true, event).await;
            }
            for event in stream::events(&records, &self.ready.0, self.ready.1) {
                self.deliver(false, event).await;
            }
        }
        panic!("the stream never went quiet");
    }

    /// One batch, retried from the first failed record on, as Lambda does with
    /// ReportBatchItemFailures (at most the template's MaximumRetryAttempts).
    pub(crate) async fn deliver(&mut self, transformer: bool, mut event: Value) {
        let records = event["Records"].as_array().map_or(0, Vec::len) as u64;
        if transformer {
            self.delivered.0 += records;
        } else {
            self.delivered.1 += records;
        }
        for _ in 0..=5 {
            let handled: Handled<BatchResponse> = if transformer {
                oppsync_lambda::transform(&self.pipeline, event.clone()).await.unwrap()
            } else {
                oppsync_lambda::write(&self.pipeline, event.clone(), oppsync_tests::harness::far())
                    .await
                    .unwrap()
            };
            self.emitted.extend(handled.metrics.counts.keys().cloned());
            self.emitted.extend(handled.metrics.millis.keys().cloned());
            self.claims_missed += handled.metrics.counts.get("ClaimsMissed").copied().unwrap_or(0);
            let failed: Vec<u128> = handled
                .response
                .batch_item_failures
                .iter()
                .map(|f| f.item_identifier.as_deref().unwrap().parse().unwrap())
                .collect();
            let Some(first) = failed.iter().min() else { return };
            self.redelivered.extend(
                handled
                    .response
                    .batch_item_failures
                    .iter()
                    .filter_map(|f| f.item_identifier.clone()),
            );
            let rest: Vec<Value> = event["Records"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| {
                    r["dynamodb"]["SequenceNumber"]
                        .as_str()
                        .unwrap()
                        .parse::<u128>()
                        .unwrap()
                        >= *first
                })
                .cloned()
                .collect();
            event = json!({ "Records": rest });
        }
        panic!("a batch still failed after the retries: {event}");
    }

    pub(crate) async fn state(&self, id: &str) -> oppsync_state::OpportunityState {
        self.pipeline
            .store()
            .get(OpportunityId::parse(id).unwrap())
            .await
            .unwrap()
            .unwrap()
    }
}

/// GIVEN opportunities of every customer and stakeholder case in Dynamics, and the functions
/// cold-started from their secrets
/// WHEN the poller's handler runs and the stream drives the transformer and the writer
/// THEN Marketo matches Dynamics record by record, in ⌈n/300⌉ opportunity calls; and an
/// incremental round writes only what changed, skips an unchanged save, deletes a deleted
/// opportunity, retries a transient per-record failure after its backoff (not by an immediate
/// redelivery) until it succeeds, and puts a permanent one in the error ledger.
#[tokio::test]
async fn the_functions_sync_dynamics_into_marketo_over_the_real_stream() {
    let sims = sims().await;
    let seeded = sims.dv.seed(450, 21, Mix::Realistic);
    let mut d = Deployment::cold_start(&sims).await;

    d.poll().await;
    d.pump().await;
    let counts = d.pipeline.store().counts().await.unwrap();
    assert_eq!(counts.get(Status::Synced), 450, "{counts:?}");
    assert_marketo_matches_dynamics(&sims);
    assert_eq!(sims.mk.calls(E::OpportunitySync), 2, "⌈450/300⌉ opportunity calls");
    assert!(d.redelivered.is_empty(), "nothing failed: {:?}", d.redelivered);
    // Each invocation is in the run history: the poller's reads, the transformers' plans, the
    // writers' writes and every Marketo call.
    let runs = d.pipeline.store().runs(1000, d.pipeline.now()).await.unwrap();
    let sum = |command: &str, f: fn(&oppsync_state::Run) -> u64| {
        runs.iter().filter(|r| r.command == command).map(f).sum::<u64>()
    };
    assert_eq!(sum("poller", |r| r.read), 450, "{runs:?}");
    assert_eq!(
        sum("transformer", |r| r.unchanged) + sum("writer", |r| r.written),
        450,
        "{runs:?}"
    );
    assert_eq!(sum("writer", |r| r.marketo_calls), sims.mk.rest_calls(), "{runs:?}");
    assert!(runs.iter().all(|r| r.ended >= r.started && r.failed == 0), "{runs:?}");

    // The incremental round.
    let o = |n: u64| seed_id(0x0b00_0000, n);
    let amount = |sims: &Sims, id: &str| {
        sims.mk
            .snapshot()
            .opportunities
            .get(id)
            .and_then(|f| f.get("amount").cloned())
    };
    sims.dv
        .upsert(Table::Opportunities, &o(1), json!({"estimatedvalue": 4242.5}), &[]);
    // Saved without a change that matters to Marketo.
    let same = sims.dv.row(Table::Opportunities, &o(2)).unwrap();
    sims.dv.upsert(
        Table::Opportunities,
        &o(2),
        json!({"name": same.attributes["name"].clone()}),
        &[],
    );
    sims.dv.delete(Table::Opportunities, &o(3));
    sims.dv
        .upsert(Table::Opportunities, &o(4), json!({"estimatedvalue": 44.0}), &[]);
    sims.mk.skip_record(&o(4), "1014", 1);
    sims.dv
        .upsert(Table::Opportunities, &o(5), json!({"estimatedvalue": 55.0}), &[]);
    sims.mk.skip_record(&o(5), "1003", 100);
    let opportunity_calls = sims.mk.calls(E::OpportunitySync);

    d.poll().await;
    d.pump().await;

    assert_eq!(amount(&sims, &o(1)), Some(json!(4242.5)));
    assert_eq!(d.state(&o(2)).await.status, Status::Synced);
    assert!(
        !sims.mk.snapshot().opportunities.contains_key(&o(3)),
        "deleted in Marketo"
    );
    assert_eq!(d.state(&o(3)).await.status, Status::Deleted);
    // The transient failure waits out its backoff in the state: its image carries `retry_at`,
    // which the writer's filter skips, and it is not handed back for an immediate redelivery.
    let waiting = d.state(&o(4)).await;
    assert_eq!((waiting.status, waiting.attempts), (Status::Ready, 1));
    let retry_at = waiting.retry_at.expect("a retry wait");
    assert!(retry_at > d.pipeline.now(), "the wait is ahead");
    assert!(
        d.redelivered.is_empty(),
        "nothing went straight back to Lambda: {:?}",
        d.redelivered
    );
    d.poll().await;
    d.pump().await;
    assert_eq!(
        d.state(&o(4)).await.status,
        Status::Ready,
        "a poll before the wait ends leaves it"
    );
    // When the wait is over, the poller's sweep hands it back to the writer.
    d.advance(retry_at - d.pipeline.now() + 1);
    d.poll().await;
    d.pump().await;
    assert_eq!(
        amount(&sims, &o(4)),
        Some(json!(44.0)),
        "the transient failure was retried"
    );
    assert_eq!(d.state(&o(4)).await.status, Status::Synced);
    let failed = d.state(&o(5)).await;
    assert_eq!(failed.status, Status::Failed);
    assert_eq!(failed.last_error.as_ref().unwrap().code, "1003");
    // The changed records share calls: one batch, then the one retry.
    assert!(sims.mk.calls(E::OpportunitySync) - opportunity_calls <= 2);
    assert!(seeded.opportunities.len() == 450);

    // What the dashboard and alarms read is what the handlers publish.
    let shown = crate::template::dashboard_metrics();
    let missing: Vec<_> = shown.difference(&d.emitted).collect();
    assert!(
        missing.is_empty(),
        "the dashboard shows metrics no handler published: {missing:?}"
    );
    assert!(
        d.emitted.iter().any(|m| m.starts_with("MarketoCalls.")),
        "{:?}",
        d.emitted
    );

    // The log lines themselves are checked on the real binary's stdout
    // (functions/resync/tests/runtime.rs): a thread-scoped subscriber here would share tracing's
    // callsite cache with the tests running beside it, and miss lines.
    assert_eq!(seeded.opportunities.len(), 450);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_start_names_what_is_wrong_with_the_environment_secrets_or_configuration() {
    let sims = sims().await;
    let good_dynamics = secret(&dynamics_secret(&sims)).await;
    let good_marketo = secret(&marketo_secret(&sims)).await;

    // Every missing variable, at once.
    let e = Env::read(|_| None).unwrap_err();
    let text = e.to_string();
    for name in ["STATE_TABLE", "DYNAMICS_SECRET_ARN", "MARKETO_SECRET_ARN"] {
        assert!(text.contains(name), "{text}");
    }
    // A function that reaches one system needs (and reads) only that system's secret.
    let only = |name: &'static str, value: String| {
        move |k: &str| match k {
            "STATE_TABLE" => Some("t".to_owned()),
            k if k == name => Some(value.clone()),
            _ => None,
        }
    };
    let poller_env = Env::read_for(
        only("DYNAMICS_SECRET_ARN", good_dynamics.clone()),
        coldstart::needs::<DataverseClient, NoAccess>(),
    )
    .unwrap();
    coldstart::build_with::<DataverseClient, NoAccess>(&poller_env, &aws())
        .await
        .unwrap();
    let writer_env = Env::read_for(
        only("MARKETO_SECRET_ARN", good_marketo.clone()),
        coldstart::needs::<NoAccess, MarketoClient>(),
    )
    .unwrap();
    let writer = coldstart::build_with::<NoAccess, MarketoClient>(&writer_env, &aws())
        .await
        .unwrap();
    let e = writer
        .dataverse()
        .all_ids(oppsync_dynamics::EntitySet::Opportunities)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not given Dynamics access"), "{e}");
    let e = Env::read_for(
        only("MARKETO_SECRET_ARN", good_marketo.clone()),
        coldstart::needs::<DataverseClient, NoAccess>(),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("DYNAMICS_SECRET_ARN") && !e.to_string().contains("MARKETO_SECRET_ARN"),
        "{e}"
    );

    let e = Env::read(|k| match k {
        "MARKETO_BUDGET_SHARE" => Some("zero".into()),
        _ => Some("x".into()),
    })
    .unwrap_err();
    assert!(e.to_string().contains("MARKETO_BUDGET_SHARE"), "{e}");

    // A secret that is not there.
    let e = coldstart::build(
        &env(
            "t",
            "arn:aws:secretsmanager:us-east-1:123456789012:secret:nope-AbCdEf",
            &good_marketo,
            "",
        ),
        &aws(),
    )
    .await
    .err()
    .unwrap();
    assert!(
        matches!(e, ColdStartError::SecretRead { system: "Dynamics", .. }),
        "{e}"
    );

    // A secret of the wrong shape: the message names the system and the shape, never the value.
    let leaky = "s3cr3t-that-must-not-print";
    let wrong = secret(&json!({"url": sims.mk.url(), "client_id": "a", "clientSecret": leaky}).to_string()).await;
    let e = coldstart::build(&env("t", &good_dynamics, &wrong, ""), &aws())
        .await
        .err()
        .unwrap();
    let text = e.to_string();
    assert!(
        matches!(e, ColdStartError::SecretShape { system: "Marketo", .. }),
        "{text}"
    );
    assert!(text.contains("clientId") && text.contains("Deploy to AWS"), "{text}");
    assert!(!text.contains(leaky) && !format!("{e:?}").contains(leaky), "{text}");
    let not_json = secret("url=https://x;secret=hunter2").await;
    let e = coldstart::build(&env("t", &not_json, &good_marketo, ""), &aws())
        .await
        .err()
        .unwrap();
    assert!(!e.to_string().contains("hunter2"), "{e}");

    // A plain-http, non-loopback endpoint in a secret.
    let remote =
        secret(&json!({"url": "http://marketo.example.com", "clientId": "a", "clientSecret": "b"}).to_string()).await;
    let e = coldstart::build(&env("t", &good_dynamics, &remote, ""), &aws())
        .await
        .err()
        .unwrap();
    assert!(matches!(e, ColdStartError::Settings { system: "Marketo", .. }), "{e}");

    // A bad configuration fails before any secret is read, with every problem named.
    let e = coldstart::build(
        &env(
            "t",
            "arn:nope",
            "arn:nope",
            "[marketo]\ncalls_per_20s = 500\n[sync]\nbatch = 3\n",
        ),
        &aws(),
    )
    .await
    .err()
    .unwrap();
    let text = e.to_string();
    assert!(
        text.contains("OPPSYNC_CONFIG") && text.contains("calls_per_20s") && text.contains("batch"),
        "{text}"
    );

    // And the good ones build a pipeline whose Debug output holds no secret.
    let p = coldstart::build(&env("t", &good_dynamics, &good_marketo, ""), &aws())
        .await
        .unwrap();
    let parsed = coldstart::DynamicsSecret::parse(&dynamics_secret(&sims)).unwrap();
    let (_, _, dynamics_client_secret) = sims.dv.credentials();
    assert!(!format!("{parsed:?}").contains(&dynamics_client_secret));
    assert_eq!(p.store().table(), "t");
}

/// GIVEN an opportunity changed twice and synced each time WHEN Lambda delivers old stream
/// records again — twice, newest first, the oldest last — THEN nothing regresses: no Marketo
/// call is made, Marketo keeps the newest values and the state the newest version.
#[tokio::test]
async fn duplicate_and_out_of_order_stream_deliveries_never_regress_a_record() {
    let sims = sims().await;
    sims.dv.seed(40, 22, Mix::Uniform);
    let mut d = Deployment::cold_start(&sims).await;
    d.poll().await;
    d.pump().await;
    let id = seed_id(0x0b00_0000, 1);
    let mut versions = Vec::new();
    for amount in [100.0, 200.0] {
        sims.dv
            .upsert(Table::Opportunities, &id, json!({"estimatedvalue": amount}), &[]);
        d.poll().await;
        d.pump().await;
        versions.push(d.state(&id).await.version);
    }
    assert!(versions[1] > versions[0]);
    let calls = sims.mk.rest_calls();
    let mut old = d.history.clone();
    old.reverse();
    for _ in 0..2 {
        for event in stream::events(&old, &d.pending.0, 7) {
            d.deliver(true, event).await;
        }
        for event in stream::events(&old, &d.ready.0, 7) {
            d.deliver(false, event).await;
        }
    }
    d.pump().await;
    assert_eq!(sims.mk.rest_calls(), calls, "old deliveries made Marketo calls");
    let state = d.state(&id).await;
    assert_eq!((state.status, state.version), (Status::Synced, versions[1]));
    let amount = sims.mk.snapshot().opportunities[&id]["amount"].clone();
    assert_eq!(amount, json!(200.0));
    assert_marketo_matches_dynamics(&sims);
}

/// Each step is delivered once: the filters match only the image that made a record await its
/// transform or its write, never a claim, a renewal or a completion. Counts deliveries per
/// opportunity for an initial sync of 300 and an incremental round of 30, and the state
/// table's write requests per opportunity (docs/PERFORMANCE.md reports both).
#[tokio::test]
async fn each_step_is_delivered_once_per_opportunity() {
    let sims = sims().await;
    let seeded = sims.dv.seed(300, 31, Mix::Realistic);
    let mut d = Deployment::cold_start(&sims).await;
    d.poll().await;
    d.pump().await;
    let counts = d.pipeline.store().counts().await.unwrap();
    assert_eq!(counts.get(Status::Synced), 300, "{counts:?}");
    assert_marketo_matches_dynamics(&sims);
    let writes = d.pipeline.store().write_requests();
    let (transformer, writer) = d.delivered;
    println!(
        "initial sync of 300: {:.2} transformer and {:.2} writer deliveries, {:.2} DynamoDB write requests per opportunity",
        transformer as f64 / 300.0,
        writer as f64 / 300.0,
        writes as f64 / 300.0
    );
    let initial = (transformer, writer);

    // An incremental round: 30 opportunities change.
    for id in &seeded.opportunities[..30] {
        sims.dv
            .upsert(Table::Opportunities, id, json!({"estimatedvalue": 777.0}), &[]);
    }
    let (before, writes_before) = (d.delivered, d.pipeline.store().write_requests());
    d.poll().await;
    d.pump().await;
    assert_marketo_matches_dynamics(&sims);
    let (transformer, writer) = (d.delivered.0 - before.0, d.delivered.1 - before.1);
    let writes = d.pipeline.store().write_requests() - writes_before;
    println!(
        "incremental round of 30: {:.2} transformer and {:.2} writer deliveries, {:.2} DynamoDB write requests per changed opportunity",
        transformer as f64 / 30.0,
        writer as f64 / 30.0,
        writes as f64 / 30.0
    );
    assert!(
        initial.0 <= 330,
        "transformer deliveries: {} for 300 opportunities",
        initial.0
    );
    assert!(
        initial.1 <= 330,
        "writer deliveries: {} for 300 opportunities",
        initial.1
    );
    assert!(
        transformer <= 33,
        "transformer deliveries: {transformer} for 30 changes"
    );
    assert!(writer <= 33, "writer deliveries: {writer} for 30 changes");
    assert!(d.redelivered.is_empty(), "{:?}", d.redelivered);
    assert_eq!(d.claims_missed, 0, "no delivery found nothing to do");
}
