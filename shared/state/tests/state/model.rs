//! Model-based conformance: proptest generates sequences of store operations (every method of
//! the trait, on a few ids, with small page limits and a clock that jumps past claim, lock and
//! lease lifetimes) and runs each against a real store and the reference store
//! ([`MemoryStore`]) side by side, comparing every answer. A paging or guard mistake in one
//! store shows as the first operation whose answers differ, printed with the sequence.

use std::collections::BTreeSet;
use std::fmt::Debug;

use oppsync_mapping::{ContactId, Guid, PlanHash, WrittenRole};
use oppsync_state::{
    Claim, Lease, MemoryStore, OpportunityState, PendingChange, Run, Source, StateError, StateStore, Status, SyncError,
    TransformResult, WriteResult, Written,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use crate::conformance::{id, plan};

const T0: i64 = 1_790_000_000_000;
const TTL: i64 = 30_000;

/// One step of a sequence. Ids are 0..4; claims and leases are named by the order in which
/// they were taken (modulo how many there are).
#[derive(Debug, Clone)]
enum Op {
    Tick(i64),
    Mark(Vec<(u8, i64, bool)>),
    Requeue(u8, bool),
    RequeueClaimed(u8),
    Claim(u8, bool),
    Renew(usize),
    Planned(usize, u8),
    Release(usize),
    Wake(u8),
    Transform(usize, u8),
    Write(usize, u8, i64, u8),
    Get(u8),
    List(u8, usize),
    Counts,
    OldestPending,
    Completions,
    Lock(Vec<u8>, i64),
    UnlockLast,
    TakeCall(u64),
    AddCalls(u64),
    Join(u8, i64),
    Leave(u8),
    Acquire(u8),
    RenewLease(usize),
    ReleaseLease(usize),
    Advance(usize, bool),
    Links(Vec<(u8, u8)>, Vec<u8>),
    Leads(Vec<(u8, i64)>, Vec<u8>, Vec<u8>),
    Runs(i64, usize),
    /// Ids 16.. (as many as given) recorded and planned to the given closed status in one go:
    /// more items in a closed status than a small page holds.
    Bulk(u8, u8),
}

fn op() -> impl Strategy<Value = Op> {
    let n = || 0u8..4;
    prop_oneof![
        4 => (0i64..45_000).prop_map(Op::Tick),
        6 => prop::collection::vec((n(), 1i64..5, prop::bool::weighted(0.2)), 1..4).prop_map(Op::Mark),
        1 => (n(), any::<bool>()).prop_map(|(i, r)| Op::Requeue(i, r)),
        1 => n().prop_map(Op::RequeueClaimed),
        6 => (n(), any::<bool>()).prop_map(|(i, ready)| Op::Claim(i, ready)),
        2 => (0usize..8).prop_map(Op::Renew),
        2 => (0usize..8, 0u8..3).prop_map(|(c, r)| Op::Planned(c, r)),
        1 => (0usize..8).prop_map(Op::Release),
        2 => n().prop_map(Op::Wake),
        5 => (0usize..8, 0u8..5).prop_map(|(c, k)| Op::Transform(c, k)),
        5 => (0usize..8, 0u8..4, 1i64..5, 0u8..3).prop_map(|(c, k, v, r)| Op::Write(c, k, v, r)),
        2 => n().prop_map(Op::Get),
        4 => (0u8..6, 1usize..4).prop_map(|(s, l)| Op::List(s, l)),
        1 => Just(Op::Counts),
        1 => Just(Op::OldestPending),
        1 => Just(Op::Completions),
        2 => (prop::collection::vec(0u8..3, 1..3), 1i64..60_000).prop_map(|(k, t)| Op::Lock(k, t)),
        1 => Just(Op::UnlockLast),
        2 => (1u64..4).prop_map(Op::TakeCall),
        1 => (0u64..3).prop_map(Op::AddCalls),
        1 => (0u8..3, 0i64..60_000).prop_map(|(m, t)| Op::Join(m, t)),
        1 => (0u8..3).prop_map(Op::Leave),
        2 => (0u8..2).prop_map(Op::Acquire),
        1 => (0usize..4).prop_map(Op::RenewLease),
        1 => (0usize..4).prop_map(Op::ReleaseLease),
        2 => (0usize..4, any::<bool>()).prop_map(|(l, s)| Op::Advance(l, s)),
        1 => (prop::collection::vec((0u8..3, n()), 0..3), prop::collection::vec(0u8..4, 0..3))
            .prop_map(|(l, q)| Op::Links(l, q)),
        1 => (
            prop::collection::vec((0u8..3, 1i64..9), 0..3),
            prop::collection::vec(0u8..4, 0..3),
            prop::collection::vec(0u8..3, 0..2)
        )
            .prop_map(|(r, q, f)| Op::Leads(r, q, f)),
        1 => (0i64..100_000, 1usize..4).prop_map(|(k, l)| Op::Runs(k, l)),
        1 => (3u8..10, 0u8..3).prop_map(|(n, k)| Op::Bulk(n, k)),
    ]
}

/// One store's side of a sequence: its claims (with the status each was taken from: a transform
/// completes a pending claim, a write a ready one) and leases, as it handed them out.
struct Side<S> {
    store: S,
    claims: Vec<(Claim, Status)>,
    leases: Vec<Lease>,
}

fn role(n: u8) -> WrittenRole {
    WrittenRole {
        contact: ContactId(Guid::from_u128(0xc0 + u128::from(n))),
        role: format!("Role {n}"),
        lead_id: Some(i64::from(n) + 100),
    }
}

fn error(code: &str) -> SyncError {
    SyncError {
        operation: "opportunities.sync".into(),
        code: code.into(),
        message: format!("Marketo said {code}"),
    }
}

/// An answer as compared: claim tokens and page tokens differ between stores by design.
fn claim_answer(c: &Claim) -> String {
    format!("claim {} v{} until {}", c.id, c.version, c.until)
}

fn state_answer(s: &OpportunityState) -> String {
    let mut s = s.clone();
    s.unreadable = None;
    format!("{s:?}")
}

fn error_answer(e: &StateError) -> String {
    match e {
        StateError::LeaseLost(name) => format!("lease lost: {name}"),
        StateError::BadPageToken(_) => "bad page token".into(),
        other => format!("store error: {other}"),
    }
}

fn answer<T: Debug>(r: Result<T, StateError>) -> String {
    match r {
        Ok(v) => format!("{v:?}"),
        Err(e) => error_answer(&e),
    }
}

const STATUSES: [Status; 6] = Status::ALL;

impl<S: StateStore> Side<S> {
    fn claim(&self, i: usize) -> Option<Claim> {
        (!self.claims.is_empty()).then(|| self.claims[i % self.claims.len()].0.clone())
    }

    /// The `i`th claim taken from `from`, if any was.
    fn claim_from(&self, i: usize, from: Status) -> Option<Claim> {
        let of: Vec<&Claim> = self.claims.iter().filter(|(_, s)| *s == from).map(|(c, _)| c).collect();
        (!of.is_empty()).then(|| of[i % of.len()].clone())
    }

    fn lease(&self, i: usize) -> Option<Lease> {
        (!self.leases.is_empty()).then(|| self.leases[i % self.leases.len()].clone())
    }

    /// Every page of a status, `limit` at a time: the items (in the order given for the open
    /// statuses, sorted for the closed ones, which DynamoDB scans) and whether any page was
    /// longer than asked.
    async fn list_all(&self, status: Status, limit: usize) -> String {
        let mut items = Vec::new();
        let mut page = None;
        for _ in 0..100 {
            match self.store.list(status, limit, page.as_deref()).await {
                Err(e) => return error_answer(&e),
                Ok(p) => {
                    if p.items.len() > limit {
                        return format!("a page of {} items for a limit of {limit}", p.items.len());
                    }
                    items.extend(p.items.iter().map(state_answer));
                    match p.next {
                        Some(next) => page = Some(next),
                        None => break,
                    }
                }
            }
        }
        if !status.is_open() {
            items.sort();
        }
        let unique: BTreeSet<&String> = items.iter().collect();
        if unique.len() != items.len() {
            return format!("an item listed twice in {items:?}");
        }
        format!("{items:?}")
    }

    async fn apply(&mut self, op: &Op, now: i64) -> String {
        let store = &self.store;
        match op {
            Op::Tick(_) => String::new(),
            Op::Mark(changes) => {
                let changes: Vec<PendingChange> = changes
                    .iter()
                    .map(|&(n, v, deleted)| {
                        if deleted {
                            PendingChange::deleted(id(n.into()))
                        } else {
                            PendingChange::upserted(id(n.into()), v, Some(format!("2026-11-20T10:00:0{v}Z")))
                        }
                    })
                    .collect();
                answer(store.mark_pending(&changes, now).await)
            }
            Op::Requeue(n, rewrite) => answer(store.requeue(id((*n).into()), *rewrite, now).await),
            Op::RequeueClaimed(n) => {
                let taken = store.requeue_claimed(id((*n).into()), TTL, now).await;
                self.took(taken, Status::Pending)
            }
            Op::Claim(n, ready) => {
                let from = if *ready { Status::Ready } else { Status::Pending };
                let taken = store.claim(id((*n).into()), from, TTL, now).await;
                self.took(taken, from)
            }
            Op::Renew(c) => match self.claim(*c) {
                Some(claim) => answer(
                    store
                        .renew_claim(&claim, TTL, now)
                        .await
                        .map(|c| c.map(|c| claim_answer(&c))),
                ),
                None => String::new(),
            },
            Op::Planned(c, r) => match self.claim(*c) {
                Some(claim) => {
                    let roles: Vec<WrittenRole> = (0..*r).map(role).collect();
                    answer(
                        store
                            .record_planned(&claim, &roles, TTL, now)
                            .await
                            .map(|c| c.map(|c| claim_answer(&c))),
                    )
                }
                None => String::new(),
            },
            Op::Release(c) => match self.claim(*c) {
                Some(claim) => answer(store.release(&claim, now).await),
                None => String::new(),
            },
            Op::Wake(n) => answer(store.wake(id((*n).into()), now).await),
            Op::Transform(c, kind) => match self.claim_from(*c, Status::Pending) {
                Some(claim) => {
                    let n = claim.id.0.as_u128() & 0xff;
                    let result = match kind {
                        0 => TransformResult::Ready(plan(n)),
                        1 => TransformResult::Unchanged,
                        2 => TransformResult::Filtered(plan(n)),
                        3 => TransformResult::Kept(plan(n)),
                        _ => TransformResult::Failed(error("plan")),
                    };
                    answer(store.complete_transform(&claim, result, now).await)
                }
                None => String::new(),
            },
            Op::Write(c, kind, older, roles) => match self.claim_from(*c, Status::Ready) {
                Some(claim) => {
                    // A write reflects its claim's version or, for a plan made before a
                    // change, an older one: never a newer one.
                    let version = (claim.version - older % 2).max(0);
                    let written = Written {
                        version,
                        hash: PlanHash(version as u128),
                        marketo_guid: Some(format!("guid-{version}")),
                        company: None,
                        roles: (0..*roles).map(role).collect(),
                        deleted: *kind == 3 && *roles == 0,
                        at: now,
                        sent: None,
                    };
                    let partial = (*roles > 0).then(|| written.clone());
                    let result = match kind {
                        0 => WriteResult::Synced(written),
                        1 => WriteResult::Retry {
                            error: error("604"),
                            written: partial,
                            retry_at: now + 30_000,
                        },
                        2 => WriteResult::Paused {
                            error: error("606"),
                            written: partial,
                            until: now,
                        },
                        _ => WriteResult::Failed {
                            error: error("1003"),
                            written: partial,
                        },
                    };
                    answer(store.complete_write(&claim, result, now).await)
                }
                None => String::new(),
            },
            Op::Get(n) => answer(store.get(id((*n).into())).await.map(|s| s.as_ref().map(state_answer))),
            Op::List(s, limit) => self.list_all(STATUSES[usize::from(*s)], *limit).await,
            Op::Counts => answer(store.counts().await),
            Op::OldestPending => answer(store.oldest_pending().await),
            Op::Completions => answer(store.completions(T0, now).await),
            Op::Lock(keys, ttl) => {
                let keys: Vec<String> = keys.iter().map(|k| format!("lead#{k}")).collect();
                answer(store.lock(&keys, *ttl, now).await)
            }
            Op::UnlockLast => String::new(),
            Op::TakeCall(budget) => answer(store.take_marketo_call("2026-11-20", *budget).await),
            Op::AddCalls(n) => answer(store.add_marketo_calls("2026-11-20", *n).await),
            Op::Join(m, ttl) => answer(store.join_budget(&format!("member-{m}"), now + ttl, now).await),
            Op::Leave(m) => answer(store.leave_budget(&format!("member-{m}")).await),
            Op::Acquire(owner) => match store.acquire_lease("poller", &format!("owner-{owner}"), TTL, now).await {
                Ok(Some(lease)) => {
                    let shown = format!("lease {} until {}", lease.owner, lease.expires_at);
                    self.leases.push(lease);
                    shown
                }
                other => answer(other),
            },
            Op::RenewLease(l) => match self.lease(*l) {
                Some(lease) => answer(
                    store
                        .renew_lease(&lease, TTL, now)
                        .await
                        .map(|l| l.map(|l| l.expires_at)),
                ),
                None => String::new(),
            },
            Op::ReleaseLease(l) => match self.lease(*l) {
                Some(lease) => answer(store.release_lease(&lease).await),
                None => String::new(),
            },
            Op::Advance(l, connections) => match self.lease(*l) {
                Some(lease) => {
                    let source = if *connections {
                        Source::Connections
                    } else {
                        Source::Opportunities
                    };
                    let moved = answer(store.advance_cursor(&lease, source, &format!("link-{now}"), now).await);
                    format!("{moved} → {}", answer(store.cursor(source).await))
                }
                None => String::new(),
            },
            Op::Links(links, query) => {
                let links: Vec<(String, oppsync_mapping::OpportunityId)> = links
                    .iter()
                    .map(|&(c, n)| (format!("CONN-{c}"), id(n.into())))
                    .collect();
                let remembered = answer(store.remember_links(&links).await);
                let query: Vec<String> = query.iter().map(|c| format!("conn-{c}")).collect();
                format!("{remembered} → {}", answer(store.linked_opportunities(&query).await))
            }
            Op::Leads(remember, query, forget) => {
                let remember: Vec<(String, i64)> = remember.iter().map(|&(k, v)| (format!("k{k}"), v)).collect();
                let query: Vec<String> = query.iter().map(|k| format!("k{k}")).collect();
                let forget: Vec<String> = forget.iter().map(|k| format!("k{k}")).collect();
                let a = answer(store.remember_leads(&remember).await);
                let b = answer(store.known_leads(&query).await.map(|m| {
                    let mut v: Vec<(String, i64)> = m.into_iter().collect();
                    v.sort();
                    v
                }));
                let c = answer(store.forget_leads(&forget).await);
                format!("{a} {b} {c}")
            }
            Op::Bulk(count, kind) => {
                let ids: Vec<_> = (16..16 + u128::from(*count)).map(id).collect();
                let changes: Vec<PendingChange> = ids.iter().map(|i| PendingChange::upserted(*i, 1, None)).collect();
                let mut answers = vec![answer(store.mark_pending(&changes, now).await)];
                for taken in store.claim_many(ids, Status::Pending, TTL, now).await {
                    let Ok(Some((claim, _))) = taken else {
                        answers.push(answer(taken.map(|t| t.map(|_| ()))));
                        continue;
                    };
                    let n = claim.id.0.as_u128() & 0xff;
                    let result = match kind {
                        0 => TransformResult::Unchanged,
                        1 => TransformResult::Filtered(plan(n)),
                        _ => TransformResult::Failed(error("plan")),
                    };
                    answers.push(answer(store.complete_transform(&claim, result, now).await));
                }
                answers.join(" ")
            }
            Op::Runs(keep, limit) => {
                let run = Run {
                    command: "sync".into(),
                    started: now - 1_000,
                    ended: now,
                    ..Run::default()
                };
                let recorded = answer(store.record_run(&run, *keep).await);
                format!("{recorded} → {}", answer(store.runs(*limit, now).await))
            }
        }
    }

    fn took(&mut self, taken: Result<Option<(Claim, OpportunityState)>, StateError>, from: Status) -> String {
        match taken {
            Ok(Some((claim, state))) => {
                let shown = format!("{} {}", claim_answer(&claim), state_answer(&state));
                self.claims.push((claim, from));
                shown
            }
            other => answer(other.map(|o| o.map(|_| ()))),
        }
    }
}

/// Runs each generated sequence on a fresh pair (the store `make` gives, and the reference) and
/// fails on the first answer that differs.
pub fn check_against_the_model<S, F, Fut>(cases: u32, make: F)
where
    S: StateStore,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = S>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let sequences = prop::collection::vec(op(), 1..40);
    let outcome = runner.run(&sequences, |ops| {
        runtime.block_on(async {
            let mut real = Side {
                store: make().await,
                claims: Vec::new(),
                leases: Vec::new(),
            };
            let mut model = Side {
                store: MemoryStore::new(),
                claims: Vec::new(),
                leases: Vec::new(),
            };
            let mut now = T0;
            for (step, op) in ops.iter().enumerate() {
                if let Op::Tick(ms) = op {
                    now += ms;
                }
                let (got, want) = (real.apply(op, now).await, model.apply(op, now).await);
                if got != want {
                    return Err(TestCaseError::fail(format!(
                        "step {step}, {op:?} at +{} ms:\n  the store answered     {got}\n  the reference answered {want}",
                        now - T0
                    )));
                }
            }
            Ok(())
        })
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
}
