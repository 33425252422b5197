//! Per-operation latency and throughput of both stores: marking opportunities pending (one
//! batch), then claiming and completing each through transform and write.
//!
//! `cargo bench -p oppsync-state --bench state` (SQLite: 10,000 opportunities a sample). With
//! `OPPSYNC_DYNAMODB_ENDPOINT` set to a moto server, DynamoDB is measured too (1,000 a sample,
//! since moto answers one request at a time: these figures measure moto, not DynamoDB).

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use oppsync_mapping::{Guid, Mapping, OpportunityId, PlanHash, plan_delete};
use oppsync_state::{
    DynamoStore, PendingChange, SqliteStore, StateStore, Status, TransformResult, WriteResult, Written,
};

fn id(n: u64) -> OpportunityId {
    OpportunityId(Guid::from_u128(u128::from(n) | (0x0b << 120)))
}

fn changes(n: u64) -> Vec<PendingChange> {
    (0..n).map(|i| PendingChange::upserted(id(i), 1, None)).collect()
}

#[derive(Clone, Copy)]
enum Phase {
    Mark,
    Transform,
    Write,
}

/// Runs one phase over `n` items on a fresh store; returns the time of that phase alone.
async fn run<S: StateStore>(store: S, n: u64, phase: Phase) -> Duration {
    let now = 1_790_000_000_000;
    let plan = plan_delete(&Mapping::default(), id(0), &[]);
    let batch = changes(n);
    let start = Instant::now();
    store.mark_pending(&batch, now).await.expect("mark");
    if let Phase::Mark = phase {
        return start.elapsed();
    }
    let start = Instant::now();
    for i in 0..n {
        let (claim, _) = store
            .claim(id(i), Status::Pending, 60_000, now)
            .await
            .expect("claim")
            .expect("free");
        store
            .complete_transform(&claim, TransformResult::Ready(plan.clone()), now)
            .await
            .expect("transform");
    }
    if let Phase::Transform = phase {
        return start.elapsed();
    }
    let start = Instant::now();
    for i in 0..n {
        let (claim, _) = store
            .claim(id(i), Status::Ready, 60_000, now)
            .await
            .expect("claim")
            .expect("free");
        let written = Written {
            version: 1,
            hash: PlanHash(1),
            marketo_guid: None,
            company: None,
            roles: vec![],
            deleted: false,
            at: now,
            sent: None,
        };
        store
            .complete_write(&claim, WriteResult::Synced(written), now)
            .await
            .expect("write");
    }
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = std::env::temp_dir().join(format!("oppsync-state-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut group = c.benchmark_group("state");
    group.sample_size(10).warm_up_time(Duration::from_secs(1));
    let phases = [
        ("mark pending (one batch)", Phase::Mark),
        ("claim + complete transform", Phase::Transform),
        ("claim + complete write", Phase::Write),
    ];

    let n = 10_000;
    group.throughput(Throughput::Elements(n));
    for (k, (name, phase)) in phases.into_iter().enumerate() {
        let mut sample = 0;
        group.bench_function(BenchmarkId::new(format!("sqlite/{name}"), n), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    sample += 1;
                    let store = SqliteStore::open(dir.join(format!("{k}-{sample}.db"))).expect("open");
                    total += rt.block_on(run(store, n, phase));
                }
                total
            })
        });
    }

    if let Ok(endpoint) = std::env::var("OPPSYNC_DYNAMODB_ENDPOINT") {
        let n = 1_000;
        group.throughput(Throughput::Elements(n));
        for (name, phase) in phases {
            let mut sample = 0;
            group.bench_function(BenchmarkId::new(format!("dynamodb-moto/{name}"), n), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        sample += 1;
                        total += rt.block_on(async {
                            let config = aws_sdk_dynamodb::Config::builder()
                                .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
                                .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
                                .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
                                    "t", "t", None, None, "bench",
                                ))
                                .endpoint_url(&endpoint)
                                .build();
                            let store = DynamoStore::new(
                                aws_sdk_dynamodb::Client::from_conf(config),
                                format!("bench-{}-{sample}-{name}", std::process::id())
                                    .replace([' ', '(', ')', '+'], "-"),
                            );
                            store.create_table().await.expect("table");
                            run(store, n, phase).await
                        });
                    }
                    total
                })
            });
        }
    } else {
        eprintln!("OPPSYNC_DYNAMODB_ENDPOINT is not set: DynamoDB (moto) not measured");
    }
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
