//! The conformance suite: what every [`StateStore`] must do. Each test takes a fresh store.

use std::collections::HashMap;
use std::sync::Arc;

use oppsync_mapping::{
    Action, ContactId, Desired, Guid, Mapping, Opportunity, OpportunityId, Plan, PlanHash, Role, WrittenRole,
    plan_upsert,
};
use oppsync_state::{
    Completion, MarkOutcome, PendingChange, Run, Source, StateError, StateStore, Status, SyncError, TransformResult,
    WriteResult, Written,
};
use serde_json::json;

const T0: i64 = 1_790_000_000_000;
const MINUTE: i64 = 60_000;
const TTL: i64 = 30_000;

pub fn id(n: u128) -> OpportunityId {
    OpportunityId(Guid::from_u128(0x0b00_0000_0000_4000_8000_0000_0000_0000 | n))
}

pub fn change(n: u128, version: i64) -> PendingChange {
    PendingChange::upserted(id(n), version, Some("2026-11-20T10:00:00Z".into()))
}

pub fn plan(n: u128) -> Plan {
    let opp = Opportunity::from_json(json!({
        "opportunityid": id(n).to_string(), "name": format!("Deal {n}"), "statecode": 0,
        "estimatedvalue": 100.5, "closeprobability": 10, "estimatedclosedate": "2026-12-31",
        "description": null, "actualclosedate": null,
    }))
    .unwrap();
    plan_upsert(&Mapping::default(), &opp, &Default::default(), &[])
}

fn role(contact: u128, name: &str, lead: i64) -> WrittenRole {
    WrittenRole {
        contact: ContactId(Guid::from_u128(contact)),
        role: name.to_owned(),
        lead_id: Some(lead),
    }
}

fn written(version: i64, roles: Vec<WrittenRole>) -> Written {
    Written {
        version,
        hash: PlanHash(u128::from(version as u64)),
        marketo_guid: Some(format!("guid-{version}")),
        company: None,
        roles,
        deleted: false,
        at: T0,
        sent: None,
    }
}

fn error(code: &str) -> SyncError {
    SyncError {
        operation: "opportunities.sync".into(),
        code: code.into(),
        message: format!("Marketo said {code}"),
    }
}

/// Records `n` at `version` and walks it to ready.
async fn to_ready<S: StateStore>(store: &S, n: u128, version: i64, now: i64) {
    store.mark_pending(&[change(n, version)], now).await.unwrap();
    let (claim, _) = store.claim(id(n), Status::Pending, TTL, now).await.unwrap().unwrap();
    let done = store
        .complete_transform(&claim, TransformResult::Ready(plan(n)), now)
        .await
        .unwrap();
    assert_eq!(done, Completion::Completed);
}

pub async fn a_cursor_starts_empty_and_moves_only_under_the_lease<S: StateStore>(store: S) {
    assert_eq!(store.cursor(Source::Opportunities).await.unwrap(), None);
    let lease = store.acquire_lease("poller", "a", TTL, T0).await.unwrap().unwrap();
    store
        .advance_cursor(&lease, Source::Opportunities, "delta-1", T0 + 1)
        .await
        .unwrap();
    store
        .advance_cursor(&lease, Source::Connections, "watermark-9", T0 + 2)
        .await
        .unwrap();
    let cursor = store.cursor(Source::Opportunities).await.unwrap().unwrap();
    assert_eq!((cursor.value.as_str(), cursor.updated_at), ("delta-1", T0 + 1));
    assert_eq!(
        store.cursor(Source::Connections).await.unwrap().unwrap().value,
        "watermark-9"
    );
    store
        .advance_cursor(&lease, Source::Opportunities, "delta-2", T0 + 3)
        .await
        .unwrap();
    assert_eq!(
        store.cursor(Source::Opportunities).await.unwrap().unwrap().value,
        "delta-2"
    );
}

pub async fn a_lease_cannot_be_taken_while_held_and_expires_by_itself<S: StateStore>(store: S) {
    let a = store.acquire_lease("poller", "a", TTL, T0).await.unwrap().unwrap();
    assert_eq!(
        store.acquire_lease("poller", "b", TTL, T0 + TTL - 1).await.unwrap(),
        None
    );
    // Another lease name is independent.
    assert!(store.acquire_lease("other", "b", TTL, T0).await.unwrap().is_some());
    // Renewal extends it.
    let a = store.renew_lease(&a, TTL, T0 + TTL - 1).await.unwrap().unwrap();
    assert_eq!(
        store.acquire_lease("poller", "b", TTL, T0 + TTL + 1).await.unwrap(),
        None
    );
    // Expired: anyone may take it, with a higher fencing token.
    let b = store
        .acquire_lease("poller", "b", TTL, a.expires_at)
        .await
        .unwrap()
        .unwrap();
    assert!(
        b.token > a.token,
        "fencing token must grow: {} then {}",
        a.token,
        b.token
    );
    assert_eq!(b.owner, "b");
}

pub async fn a_poller_whose_lease_expired_cannot_move_the_cursor_or_renew<S: StateStore>(store: S) {
    let a = store.acquire_lease("poller", "a", TTL, T0).await.unwrap().unwrap();
    store
        .advance_cursor(&a, Source::Opportunities, "a-1", T0)
        .await
        .unwrap();
    // a stalls past its lease; b takes over and moves on.
    let b = store
        .acquire_lease("poller", "b", TTL, T0 + TTL)
        .await
        .unwrap()
        .unwrap();
    store
        .advance_cursor(&b, Source::Opportunities, "b-1", T0 + TTL + 1)
        .await
        .unwrap();
    // a wakes up: it must not move the cursor back, nor renew.
    let err = store
        .advance_cursor(&a, Source::Opportunities, "a-2", T0 + TTL + 2)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StateError::LeaseLost(ref name) if name == "poller"),
        "{err}"
    );
    assert!(err.to_string().contains("nothing was moved"));
    assert_eq!(store.renew_lease(&a, TTL, T0 + TTL + 2).await.unwrap(), None);
    assert_eq!(store.cursor(Source::Opportunities).await.unwrap().unwrap().value, "b-1");
    // Even an expired lease that nobody took cannot move the cursor.
    let err = store
        .advance_cursor(&b, Source::Opportunities, "b-2", T0 + 3 * TTL)
        .await
        .unwrap_err();
    assert!(matches!(err, StateError::LeaseLost(_)));
}

pub async fn a_released_lease_is_free_at_once<S: StateStore>(store: S) {
    let a = store.acquire_lease("poller", "a", TTL, T0).await.unwrap().unwrap();
    store.release_lease(&a).await.unwrap();
    let b = store.acquire_lease("poller", "b", TTL, T0 + 1).await.unwrap().unwrap();
    // Releasing a lease someone else holds now does nothing.
    store.release_lease(&a).await.unwrap();
    assert_eq!(store.acquire_lease("poller", "c", TTL, T0 + 2).await.unwrap(), None);
    assert!(store.renew_lease(&b, TTL, T0 + 2).await.unwrap().is_some());
}

pub async fn new_changes_are_recorded_pending_and_repeats_are_no_ops<S: StateStore>(store: S) {
    let outcomes = store
        .mark_pending(&[change(1, 10), change(2, 20), change(1, 10)], T0)
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        [MarkOutcome::Recorded, MarkOutcome::Recorded, MarkOutcome::Stale]
    );
    let one = store.get(id(1)).await.unwrap().unwrap();
    assert_eq!((one.status, one.version, one.deleted), (Status::Pending, 10, false));
    assert_eq!(one.modified_on.as_deref(), Some("2026-11-20T10:00:00Z"));
    assert_eq!((one.created_at, one.status_since), (T0, T0));
    assert_eq!(store.get(id(3)).await.unwrap(), None);
    // The same change delivered again later changes nothing.
    assert_eq!(
        store.mark_pending(&[change(2, 20)], T0 + 5).await.unwrap(),
        [MarkOutcome::Stale]
    );
    assert_eq!(store.get(id(2)).await.unwrap().unwrap().updated_at, T0);
}

pub async fn out_of_order_versions_never_regress_a_record<S: StateStore>(store: S) {
    to_ready(&store, 1, 30, T0).await;
    for (version, expected) in [
        (10, MarkOutcome::Stale),
        (30, MarkOutcome::Stale),
        (29, MarkOutcome::Stale),
    ] {
        assert_eq!(
            store.mark_pending(&[change(1, version)], T0 + 1).await.unwrap(),
            [expected]
        );
    }
    let state = store.get(id(1)).await.unwrap().unwrap();
    assert_eq!(
        (state.status, state.version),
        (Status::Ready, 30),
        "an older version must not requeue"
    );
    assert_eq!(
        store.mark_pending(&[change(1, 31)], T0 + 2).await.unwrap(),
        [MarkOutcome::Recorded]
    );
    let state = store.get(id(1)).await.unwrap().unwrap();
    assert_eq!((state.status, state.version), (Status::Pending, 31));
    // A newer version of a pending record keeps its place in the queue (it has waited since T0+2).
    store.mark_pending(&[change(1, 32)], T0 + 9).await.unwrap();
    assert_eq!(store.get(id(1)).await.unwrap().unwrap().status_since, T0 + 2);
}

pub async fn a_deletion_is_a_flag_and_a_restored_record_is_recorded_again<S: StateStore>(store: S) {
    store.mark_pending(&[change(1, 5)], T0).await.unwrap();
    store
        .mark_pending(&[PendingChange::deleted(id(1))], T0 + 1)
        .await
        .unwrap();
    let state = store.get(id(1)).await.unwrap().unwrap();
    assert!(state.deleted);
    assert_eq!(state.modified_on, None);
    // A version Dynamics had before the deletion is still stale...
    assert_eq!(
        store.mark_pending(&[change(1, 5)], T0 + 2).await.unwrap(),
        [MarkOutcome::Stale]
    );
    // ...a deletion recorded twice changes nothing...
    assert_eq!(
        store
            .mark_pending(&[PendingChange::deleted(id(1))], T0 + 3)
            .await
            .unwrap(),
        [MarkOutcome::Stale]
    );
    // ...and the record Dataverse returns again (restored from its recycle bin, with its id and
    // a new version) is live again.
    assert_eq!(
        store.mark_pending(&[change(1, 1_000_000)], T0 + 4).await.unwrap(),
        [MarkOutcome::Recorded]
    );
    let state = store.get(id(1)).await.unwrap().unwrap();
    assert!(!state.deleted, "{state:?}");
    assert_eq!((state.status, state.version), (Status::Pending, 1_000_000));
    // A deletion of a record never seen is recorded too.
    assert_eq!(
        store
            .mark_pending(&[PendingChange::deleted(id(2))], T0 + 5)
            .await
            .unwrap(),
        [MarkOutcome::Recorded]
    );
}

pub async fn a_requeued_deletion_is_read_again_not_deleted_again<S: StateStore>(store: S) {
    store.mark_pending(&[change(1, 5)], T0).await.unwrap();
    store
        .mark_pending(&[PendingChange::deleted(id(1))], T0 + 1)
        .await
        .unwrap();
    // Resync requeues: the transform reads Dynamics again, which decides (a restored record
    // is written, a missing one deleted).
    assert!(store.requeue(id(1), false, T0 + 2).await.unwrap());
    let state = store.get(id(1)).await.unwrap().unwrap();
    assert_eq!((state.status, state.deleted), (Status::Pending, false));
}

pub async fn a_double_claim_fails_until_the_first_claim_expires<S: StateStore>(store: S) {
    store.mark_pending(&[change(1, 1)], T0).await.unwrap();
    let (first, state) = store.claim(id(1), Status::Pending, TTL, T0).await.unwrap().unwrap();
    assert_eq!((first.version, state.status), (1, Status::Pending));
    assert_eq!(state.claim_until, Some(T0 + TTL));
    assert!(
        store
            .claim(id(1), Status::Pending, TTL, T0 + 1)
            .await
            .unwrap()
            .is_none()
    );
    // Wrong status: nothing to claim.
    assert!(
        store
            .claim(id(1), Status::Ready, TTL, T0 + TTL)
            .await
            .unwrap()
            .is_none()
    );
    // No such record: nothing to claim.
    assert!(store.claim(id(9), Status::Pending, TTL, T0).await.unwrap().is_none());
    // After expiry a second worker may take it, and the first one's completion is refused.
    let (second, _) = store
        .claim(id(1), Status::Pending, TTL, T0 + TTL)
        .await
        .unwrap()
        .unwrap();
    assert_ne!(first.token, second.token);
    let late = store
        .complete_transform(&first, TransformResult::Ready(plan(1)), T0 + TTL + 1)
        .await
        .unwrap();
    assert_eq!(late, Completion::Superseded);
    let done = store
        .complete_transform(&second, TransformResult::Ready(plan(1)), T0 + TTL + 2)
        .await
        .unwrap();
    assert_eq!(done, Completion::Completed);
}

pub async fn racing_claims_have_exactly_one_winner<S: StateStore + 'static>(store: S) {
    store.mark_pending(&[change(1, 1)], T0).await.unwrap();
    let store = Arc::new(store);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let store = Arc::clone(&store);
        tasks.spawn(async move { store.claim(id(1), Status::Pending, TTL, T0).await.unwrap().is_some() });
    }
    let mut winners = 0;
    while let Some(won) = tasks.join_next().await {
        winners += usize::from(won.unwrap());
    }
    assert_eq!(winners, 1);
}

pub async fn a_transform_completes_only_under_its_claim_and_version<S: StateStore>(store: S) {
    store.mark_pending(&[change(1, 1)], T0).await.unwrap();
    let (claim, _) = store.claim(id(1), Status::Pending, TTL, T0).await.unwrap().unwrap();
    // A newer version arrives while the transform runs.
    store.mark_pending(&[change(1, 2)], T0 + 1).await.unwrap();
    let stale = store
        .complete_transform(&claim, TransformResult::Ready(plan(1)), T0 + 2)
        .await
        .unwrap();
    assert_eq!(stale, Completion::Superseded);
    let state = store.get(id(1)).await.unwrap().unwrap();
    assert_eq!(
        (state.status, state.version, state.plan.as_ref()),
        (Status::Pending, 2, None)
    );
    // The newer version is claimable at once (the new change released the old claim).
    let (claim, _) = store.claim(id(1), Status::Pending, TTL, T0 + 3).await.unwrap().unwrap();
    assert_eq!(claim.version, 2);
    let p = plan(1);
    store
        .complete_transform(&claim, TransformResult::Ready(p.clone()), T0 + 4)
        .await
        .unwrap();
    let state = store.get(id(1)).await.unwrap().unwrap();
    assert_eq!(
        (state.status, state.plan, state.claim_until),
        (Status::Ready, Some(p), None)
    );
    // Completing twice is refused: the claim is spent.
    let again = store
        .complete_transform(&claim, TransformResult::Unchanged, T0 + 5)
        .await
        .unwrap();
    assert_eq!(again, Completion::Superseded);
    assert_eq!(store.get(id(1)).await.unwrap().unwrap().status, Status::Ready);
}

pub async fn an_unchanged_plan_is_synced_without_a_write<S: StateStore>(store: S) {
    store
        .mark_pending(&[change(1, 1), change(2, 1), change(3, 1)], T0)
        .await
        .unwrap();
    let outcomes = [
        (1, TransformResult::Unchanged, Status::Synced),
        (2, TransformResult::Filtered(plan(2)), Status::Filtered),
        (3, TransformResult::Failed(error("1003")), Status::Failed),
    ];
    for (n, result, expected) in outcomes {
        let (claim, _) = store.claim(id(n), Status::Pending, TTL, T0).await.unwrap().unwrap();
        store.complete_transform(&claim, result, T0 + 1).await.unwrap();
        let state = store.get(id(n)).await.unwrap().unwrap();
        assert_eq!(state.status, expected);
        assert_eq!(state.status_since, T0 + 1);
    }
    let failed = store.get(id(3)).await.unwrap().unwrap();
    assert_eq!((failed.attempts, failed.last_error), (1, Some(error("1003"))));
}

pub async fn a_write_marks_synced_and_records_what_marketo_holds<S: StateStore>(store: S) {
    to_ready(&store, 1, 7, T0).await;
    let (claim, state) = store.claim(id(1), Status::Ready, TTL, T0 + 1).await.unwrap().unwrap();
    assert_eq!(state.plan, Some(plan(1)), "the writer gets the stored plan");
    let w = written(7, vec![role(1, "Champion", 101), role(2, "Potential Customer", 102)]);
    let done = store
        .complete_write(&claim, WriteResult::Synced(w.clone()), T0 + 2)
        .await
        .unwrap();
    assert_eq!(done, Completion::Completed);
    let state = store.get(id(1)).await.unwrap().unwrap();
    assert_eq!(
        (state.status, state.attempts, state.last_error),
        (Status::Synced, 0, None)
    );
    assert_eq!(state.written, Some(w));
    assert_eq!(state.claim_until, None);
}

/// GIVEN a complete write that records what it sent, part by part
/// WHEN the record is read back
/// THEN the parts are there as written (the next write compares against them).
pub async fn what_a_write_sent_is_kept_part_by_part<S: StateStore>(store: S) {
    to_ready(&store, 1, 7, T0).await;
    let (claim, _) = store.claim(id(1), Status::Ready, TTL, T0 + 1).await.unwrap().unwrap();
    let sent = oppsync_state::Sent {
        opportunity: u64::MAX,
        company: Some(7),
        sales_person: Some(u64::MAX - 1),
        roles: vec![1, 2, 3],
    };
    let w = Written {
        sent: Some(sent.clone()),
        ..written(7, vec![])
    };
    store
        .complete_write(&claim, WriteResult::Synced(w), T0 + 2)
        .await
        .unwrap();
    let state = store.get(id(1)).await.unwrap().unwrap();
    assert_eq!(state.written.unwrap().sent, Some(sent));
}

pub async fn a_deletion_write_marks_the_record_deleted<S: StateStore>(store: S) {
    to_ready(&store, 1, 7, T0).await;
    let (claim, _) = store.claim(id(1), Status::Ready, TTL, T0 + 1).await.unwrap().unwrap();
    let w = Written {
        deleted: true,
        ..written(7, vec![])
    };
    store
        .complete_write(&claim, WriteResult::Synced(w), T0 + 2)
        .await
        .unwrap();
    assert_eq!(store.get(id(1)).await.unwrap().unwrap().status, Status::Deleted);
}

pub async fn a_crash_between_the_marketo_write_and_marking_synced_converges_on_rerun<S: StateStore>(store: S) {
    to_ready(&store, 1, 7, T0).await;
    // The writer claims, writes to Marketo, and dies before completing.
    let (_lost, _) = store.claim(id(1), Status::Ready, TTL, T0 + 1).await.unwrap().unwrap();
    let state = store.get(id(1)).await.unwrap().unwrap();
    assert_eq!(
        state.status,
        Status::Ready,
        "nothing is lost: the record is still ready"
    );
    // Until the claim expires nobody else writes it; then the rerun repeats the (idempotent)
    // write and completes.
    assert!(store.claim(id(1), Status::Ready, TTL, T0 + 2).await.unwrap().is_none());
    let (claim, state) = store
        .claim(id(1), Status::Ready, TTL, T0 + 1 + TTL)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.plan, Some(plan(1)));
    store
        .complete_write(&claim, WriteResult::Synced(written(7, vec![])), T0 + 2 + TTL)
        .await
        .unwrap();
    let state = store.get(id(1)).await.unwrap().unwrap();
    assert_eq!((state.status, state.version), (Status::Synced, 7));
}

pub async fn a_superseded_write_still_records_what_was_written_but_never_an_older_one<S: StateStore>(store: S) {
    to_ready(&store, 1, 7, T0).await;
    let (claim7, _) = store.claim(id(1), Status::Ready, TTL, T0 + 1).await.unwrap().unwrap();
    // Version 8 arrives while version 7 is being written.
    store.mark_pending(&[change(1, 8)], T0 + 2).await.unwrap();
    let w7 = written(7, vec![role(1, "Champion", 101)]);
    let done = store
        .complete_write(&claim7, WriteResult::Synced(w7.clone()), T0 + 3)
        .await
        .unwrap();
    assert_eq!(done, Completion::Superseded);
    let state = store.get(id(1)).await.unwrap().unwrap();
    assert_eq!(
        (state.status, state.version),
        (Status::Pending, 8),
        "v8 still has to be synced"
    );
    assert_eq!(state.written, Some(w7.clone()), "v8's plan must see the roles v7 wrote");
    // v8 is written; then a very late v7 completion must not overwrite it.
    let (c, _) = store.claim(id(1), Status::Pending, TTL, T0 + 4).await.unwrap().unwrap();
    store
        .complete_transform(&c, TransformResult::Ready(plan(1)), T0 + 4)
        .await
        .unwrap();
    let (c, _) = store.claim(id(1), Status::Ready, TTL, T0 + 5).await.unwrap().unwrap();
    let w8 = written(8, vec![role(1, "Decision Maker", 101)]);
    store
        .complete_write(&c, WriteResult::Synced(w8.clone()), T0 + 6)
        .await
        .unwrap();
    let late = store
        .complete_write(&claim7, WriteResult::Synced(w7), T0 + 7)
        .await
        .unwrap();
    assert_eq!(late, Completion::Superseded);
    let state = store.get(id(1)).await.unwrap().unwrap();
    assert_eq!((state.status, state.written), (Status::Synced, Some(w8)));
}

pub async fn a_retryable_failure_stays_ready_and_a_permanent_one_goes_to_the_error_ledger<S: StateStore>(store: S) {
    to_ready(&store, 1, 7, T0).await;
    let (claim, _) = store.claim(id(1), Status::Ready, TTL, T0 + 1).await.unwrap().unwrap();
    store
        .complete_write(
            &claim,
            WriteResult::Retry {
                error: error("606"),
                written: None,
                retry_at: T0 + 2,
            },
            T0 + 2,
        )
        .await
        .unwrap();
    let state = store.get(id(1)).await.unwrap().unwrap();
    assert_eq!((state.status, state.attempts), (Status::Ready, 1));
    assert_eq!(state.last_error, Some(error("606")));
    assert_eq!(state.claim_until, None, "the claim is released for the retry");
    assert_eq!(state.status_since, T0, "still waiting since it became ready");

    let (claim, _) = store.claim(id(1), Status::Ready, TTL, T0 + 3).await.unwrap().unwrap();
    let partial = written(7, vec![role(1, "Champion", 101)]);
    store
        .complete_write(
            &claim,
            WriteResult::Failed {
                error: error("1007"),
                written: Some(partial.clone()),
            },
            T0 + 4,
        )
        .await
        .unwrap();
    let state = store.get(id(1)).await.unwrap().unwrap();
    assert_eq!((state.status, state.attempts), (Status::Failed, 2));
    assert_eq!(state.last_error, Some(error("1007")));
    assert_eq!(state.written, Some(partial), "a partial write is still recorded");
    let page = store.list(Status::Failed, 10, None).await.unwrap();
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].last_error.as_ref().unwrap().code, "1007");
    // A new version clears the error and starts over.
    store.mark_pending(&[change(1, 8)], T0 + 5).await.unwrap();
    let state = store.get(id(1)).await.unwrap().unwrap();
    assert_eq!(
        (state.status, state.attempts, state.last_error),
        (Status::Pending, 0, None)
    );
}

pub async fn the_failed_view_pages_through_every_failure_oldest_first<S: StateStore>(store: S) {
    for n in 0..25u128 {
        store.mark_pending(&[change(n, 1)], T0).await.unwrap();
        let (claim, _) = store.claim(id(n), Status::Pending, TTL, T0).await.unwrap().unwrap();
        store
            .complete_transform(&claim, TransformResult::Failed(error("1003")), T0 + 100 - n as i64)
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut page_token = None;
    let mut pages = 0;
    loop {
        let page = store.list(Status::Failed, 10, page_token.as_deref()).await.unwrap();
        assert!(page.items.len() <= 10);
        seen.extend(page.items.iter().map(|s| (s.status_since, s.id)));
        pages += 1;
        match page.next {
            Some(t) => page_token = Some(t),
            None => break,
        }
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(seen.len(), 25, "every failure exactly once");
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "oldest first");
    assert_eq!(seen[0].1, id(24));
    assert!(store.list(Status::Pending, 10, None).await.unwrap().items.is_empty());
}

/// The deletion scan builds its set of known records from these pages: a listing that drops
/// items makes their deletions invisible (DynamoDB's scan listed about 40 of 100).
pub async fn a_closed_status_lists_every_record_once_in_small_pages<S: StateStore>(store: S) {
    let ids: Vec<_> = (0..100u128).map(id).collect();
    let changes: Vec<_> = (0..100u128).map(|n| change(n, 1)).collect();
    store.mark_pending(&changes, T0).await.unwrap();
    for taken in store.claim_many(ids.clone(), Status::Pending, TTL, T0).await {
        let (claim, _) = taken.unwrap().unwrap();
        store
            .complete_transform(&claim, TransformResult::Unchanged, T0)
            .await
            .unwrap();
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut page_token = None;
    for _ in 0..100 {
        let page = store.list(Status::Synced, 10, page_token.as_deref()).await.unwrap();
        assert!(
            page.items.len() <= 10,
            "a page of {} for a limit of 10",
            page.items.len()
        );
        for item in &page.items {
            assert!(seen.insert(item.id), "{} listed twice", item.id);
        }
        match page.next {
            Some(t) => page_token = Some(t),
            None => break,
        }
    }
    assert_eq!(seen.len(), 100, "every synced record listed");
}

pub async fn counts_and_oldest_pending_describe_the_backlog<S: StateStore>(store: S) {
    assert_eq!(store.counts().await.unwrap().total(), 0);
    assert_eq!(store.oldest_pending().await.unwrap(), None);
    store.mark_pending(&[change(1, 1)], T0 + 10).await.unwrap();
    store.mark_pending(&[change(2, 1)], T0 + 5).await.unwrap();
    store.mark_pending(&[change(3, 1)], T0 + 20).await.unwrap();
    to_ready(&store, 4, 1, T0).await;
    to_ready(&store, 5, 1, T0).await;
    let (claim, _) = store.claim(id(5), Status::Ready, TTL, T0).await.unwrap().unwrap();
    store
        .complete_write(&claim, WriteResult::Synced(written(1, vec![])), T0 + 1)
        .await
        .unwrap();
    let counts = store.counts().await.unwrap();
    assert_eq!(counts.get(Status::Pending), 3);
    assert_eq!(counts.get(Status::Ready), 1);
    assert_eq!(counts.get(Status::Synced), 1);
    assert_eq!(counts.get(Status::Failed), 0);
    assert_eq!(counts.total(), 5);
    assert_eq!(store.oldest_pending().await.unwrap(), Some((id(2), T0 + 5)));
}

pub async fn completions_are_counted_per_minute<S: StateStore>(store: S) {
    let hour_ago = T0 - 60 * MINUTE;
    for (n, at) in [(1, T0 - 90 * MINUTE), (2, T0 - 30 * MINUTE), (3, T0 - MINUTE), (4, T0)] {
        store.mark_pending(&[change(n, 1)], at).await.unwrap();
        let (claim, _) = store.claim(id(n), Status::Pending, TTL, at).await.unwrap().unwrap();
        store
            .complete_transform(&claim, TransformResult::Unchanged, at)
            .await
            .unwrap();
    }
    // A transform to ready is not a completion.
    to_ready(&store, 5, 1, T0).await;
    assert_eq!(store.completions(hour_ago, T0).await.unwrap(), 3);
    assert_eq!(store.completions(T0 - 2 * 60 * MINUTE, T0).await.unwrap(), 4);
    assert_eq!(store.completions(T0 + MINUTE, T0 + 2 * MINUTE).await.unwrap(), 0);
}

pub async fn marketo_call_counters_are_exact_under_concurrent_increments<S: StateStore + 'static>(store: S) {
    let store = Arc::new(store);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let store = Arc::clone(&store);
        tasks.spawn(async move {
            for _ in 0..10 {
                store.add_marketo_calls("2026-11-25", 3).await.unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    assert_eq!(store.marketo_calls("2026-11-25").await.unwrap(), 600);
    assert_eq!(store.marketo_calls("2026-11-26").await.unwrap(), 0);
    assert_eq!(store.add_marketo_calls("2026-11-26", 4).await.unwrap(), 4);
}

pub async fn requeue_puts_a_record_back_to_pending<S: StateStore>(store: S) {
    to_ready(&store, 1, 7, T0).await;
    let (claim, _) = store.claim(id(1), Status::Ready, TTL, T0).await.unwrap().unwrap();
    store
        .complete_write(&claim, WriteResult::Synced(written(7, vec![])), T0 + 1)
        .await
        .unwrap();
    assert!(store.requeue(id(1), false, T0 + 2).await.unwrap());
    let state = store.get(id(1)).await.unwrap().unwrap();
    assert_eq!(
        (state.status, state.version, state.status_since),
        (Status::Pending, 7, T0 + 2)
    );
    assert!(state.written.is_some(), "what Marketo holds is kept");
    assert!(
        store
            .claim(id(1), Status::Pending, TTL, T0 + 3)
            .await
            .unwrap()
            .is_some()
    );
    assert!(!store.requeue(id(2), false, T0).await.unwrap());
}

/// A plan far larger than a DynamoDB item (400 KB) once serialized.
pub fn large_plan(n: u128, roles: usize) -> Plan {
    let mut p = plan(n);
    if let Action::Upsert(Desired { roles: r, .. }) = &mut p.action {
        *r = (0..roles)
            .map(|i| Role {
                contact: ContactId(Guid::from_u128(i as u128)),
                role: format!("Stakeholder role number {i}"),
                is_primary: false,
            })
            .collect();
    }
    p
}

pub async fn a_large_plan_round_trips<S: StateStore>(store: S) {
    let big = large_plan(1, 20_000);
    let size = serde_json::to_string(&big).unwrap().len();
    assert!(size > 1_500_000, "the test plan is only {size} bytes");
    store.mark_pending(&[change(1, 1)], T0).await.unwrap();
    let (claim, _) = store.claim(id(1), Status::Pending, TTL, T0).await.unwrap().unwrap();
    store
        .complete_transform(&claim, TransformResult::Ready(big.clone()), T0)
        .await
        .unwrap();
    let (claim, state) = store.claim(id(1), Status::Ready, TTL, T0).await.unwrap().unwrap();
    assert_eq!(state.plan, Some(big));
    let roles: Vec<WrittenRole> = (0..20_000).map(|i| role(i, "Stakeholder", i as i64)).collect();
    store
        .complete_write(&claim, WriteResult::Synced(written(1, roles.clone())), T0)
        .await
        .unwrap();
    assert_eq!(store.get(id(1)).await.unwrap().unwrap().written.unwrap().roles, roles);
    // And a small plan afterwards replaces it cleanly.
    store.mark_pending(&[change(1, 2)], T0 + 1).await.unwrap();
    let (claim, _) = store.claim(id(1), Status::Pending, TTL, T0 + 1).await.unwrap().unwrap();
    store
        .complete_transform(&claim, TransformResult::Ready(plan(1)), T0 + 1)
        .await
        .unwrap();
    assert_eq!(store.get(id(1)).await.unwrap().unwrap().plan, Some(plan(1)));
}

pub async fn a_bad_page_token_is_a_clear_error<S: StateStore>(store: S) {
    let err = store.list(Status::Failed, 10, Some("not a token")).await.unwrap_err();
    assert!(matches!(err, StateError::BadPageToken(_)), "{err}");
    assert!(err.to_string().contains("start the listing again"), "{err}");
}

/// GIVEN a day's budget of 10 calls
/// WHEN 25 calls are taken at once, from many tasks
/// THEN exactly 10 are granted, numbered 1 to 10, and the day's count says 10.
pub async fn a_days_calls_are_taken_before_each_call_and_stop_at_the_budget<S: StateStore>(store: S) {
    let day = "2026-12-01";
    let takes = (0..25).map(|_| {
        let store = store.clone();
        tokio::spawn(async move { store.take_marketo_call(day, 10).await.unwrap() })
    });
    let mut granted: Vec<u64> = Vec::new();
    for take in takes {
        if let Some(n) = take.await.unwrap() {
            granted.push(n);
        }
    }
    granted.sort();
    assert_eq!(granted, (1..=10).collect::<Vec<u64>>());
    assert_eq!(store.marketo_calls(day).await.unwrap(), 10);
    // Another day starts from zero; an unlimited budget grants.
    assert_eq!(store.take_marketo_call("2026-12-02", 10).await.unwrap(), Some(1));
    assert_eq!(store.take_marketo_call("2026-12-02", u64::MAX).await.unwrap(), Some(2));
}

/// GIVEN processes joining the budget with expiring memberships
/// WHEN they join, renew, expire and leave
/// THEN each join counts the live members, itself included, each once.
pub async fn processes_sharing_the_budget_are_counted_while_live<S: StateStore>(store: S) {
    assert_eq!(store.join_budget("a", T0 + 100, T0).await.unwrap(), 1);
    assert_eq!(store.join_budget("b", T0 + 100, T0 + 1).await.unwrap(), 2);
    assert_eq!(store.join_budget("a", T0 + 200, T0 + 2).await.unwrap(), 2);
    // b has expired; a has not.
    assert_eq!(store.join_budget("c", T0 + 300, T0 + 150).await.unwrap(), 2);
    store.leave_budget("a").await.unwrap();
    assert_eq!(store.join_budget("c", T0 + 300, T0 + 151).await.unwrap(), 1);
    // Leaving twice, or without having joined, is not an error.
    store.leave_budget("a").await.unwrap();
    store.leave_budget("z").await.unwrap();
}

/// GIVEN leads remembered for two keys, one of them remembered again with another id
/// WHEN keys are looked up with an unknown one among them, then one is forgotten
/// THEN each known key yields its latest lead id, the unknown one nothing, the forgotten one
/// nothing after.
pub async fn a_remembered_lead_is_known_until_forgotten<S: StateStore>(store: S) {
    let (a, b, c) = ("lead#aaaa".to_owned(), "lead#bbbb".to_owned(), "lead#cccc".to_owned());
    store.remember_leads(&[(a.clone(), 11), (b.clone(), 22)]).await.unwrap();
    store.remember_leads(&[(b.clone(), 23)]).await.unwrap();
    let known = store.known_leads(&[a.clone(), b.clone(), c.clone()]).await.unwrap();
    assert_eq!(known, HashMap::from([(a.clone(), 11), (b.clone(), 23)]));
    store.forget_leads(std::slice::from_ref(&a)).await.unwrap();
    let known = store.known_leads(&[a.clone(), b.clone()]).await.unwrap();
    assert_eq!(known, HashMap::from([(b.clone(), 23)]));
    // Many keys at once: more than one request's worth on DynamoDB.
    let many: Vec<(String, i64)> = (0..130).map(|i| (format!("lead#{i:04}"), i)).collect();
    store.remember_leads(&many).await.unwrap();
    let keys: Vec<String> = many.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(store.known_leads(&keys).await.unwrap().len(), 130);
}

/// GIVEN links remembered for two connections (one remembered twice, case differing)
/// WHEN the connections are looked up with an unknown one among them
/// THEN each known connection yields its opportunity once, the unknown one nothing.
pub async fn a_deleted_connection_is_traced_back_to_its_opportunity<S: StateStore>(store: S) {
    let (a, b) = (id(1), id(2));
    let links = vec![
        ("00000000-0000-0000-0000-00000000aaaa".to_owned(), a),
        ("00000000-0000-0000-0000-00000000bbbb".to_owned(), b),
        ("00000000-0000-0000-0000-00000000AAAA".to_owned(), a),
    ];
    store.remember_links(&links).await.unwrap();
    let found = store
        .linked_opportunities(&[
            "00000000-0000-0000-0000-00000000AAAA".to_owned(),
            "00000000-0000-0000-0000-00000000cccc".to_owned(),
        ])
        .await
        .unwrap();
    assert_eq!(found, vec![a]);
    let both = store
        .linked_opportunities(&[
            "00000000-0000-0000-0000-00000000aaaa".to_owned(),
            "00000000-0000-0000-0000-00000000bbbb".to_owned(),
        ])
        .await
        .unwrap();
    assert_eq!(both.len(), 2);
    assert!(store.linked_opportunities(&[]).await.unwrap().is_empty());
    // Links are not opportunities: they never show up in the counts.
    assert_eq!(store.counts().await.unwrap().total(), 0);
}

pub async fn a_retried_write_waits_until_woken_and_a_paused_one_counts_no_attempt<S: StateStore>(store: S) {
    to_ready(&store, 1, 7, T0).await;
    let (claim, _) = store.claim(id(1), Status::Ready, TTL, T0 + 1).await.unwrap().unwrap();
    let retry = WriteResult::Retry {
        error: error("606"),
        written: None,
        retry_at: T0 + MINUTE,
    };
    store.complete_write(&claim, retry, T0 + 2).await.unwrap();
    let state = store.get(id(1)).await.unwrap().unwrap();
    assert_eq!(
        (state.status, state.attempts, state.retry_at),
        (Status::Ready, 1, Some(T0 + MINUTE))
    );
    assert!(
        store
            .claim(id(1), Status::Ready, TTL, T0 + MINUTE - 1)
            .await
            .unwrap()
            .is_none(),
        "a stale stream delivery cannot take it before its wait ends"
    );
    assert!(
        !store.wake(id(1), T0 + MINUTE - 1).await.unwrap(),
        "not before its time"
    );
    assert!(store.wake(id(1), T0 + MINUTE).await.unwrap());
    let state = store.get(id(1)).await.unwrap().unwrap();
    assert_eq!((state.retry_at, state.attempts), (None, 1));
    assert!(!store.wake(id(1), T0 + MINUTE).await.unwrap(), "nothing left to wake");

    // A pause (the run stopped: quota, credentials, deadline) waits the same but is no attempt.
    let (claim, _) = store
        .claim(id(1), Status::Ready, TTL, T0 + MINUTE)
        .await
        .unwrap()
        .unwrap();
    let paused = WriteResult::Paused {
        error: error("607"),
        written: None,
        until: T0 + 2 * MINUTE,
    };
    store.complete_write(&claim, paused, T0 + MINUTE + 1).await.unwrap();
    let state = store.get(id(1)).await.unwrap().unwrap();
    assert_eq!((state.attempts, state.retry_at), (1, Some(T0 + 2 * MINUTE)));
    // A claimed record is not woken under its holder.
    let (claim, _) = store
        .claim(id(1), Status::Ready, TTL, T0 + 2 * MINUTE)
        .await
        .unwrap()
        .unwrap();
    assert!(!store.wake(id(1), T0 + 2 * MINUTE).await.unwrap());
    store
        .complete_write(&claim, WriteResult::Synced(written(7, vec![])), T0 + 2 * MINUTE + 1)
        .await
        .unwrap();
    let state = store.get(id(1)).await.unwrap().unwrap();
    assert_eq!(
        (state.status, state.attempts, state.retry_at),
        (Status::Synced, 0, None)
    );
    // A new version is not made to wait for an old one's backoff.
    to_ready(&store, 2, 1, T0).await;
    let (claim, _) = store.claim(id(2), Status::Ready, TTL, T0).await.unwrap().unwrap();
    let retry = WriteResult::Retry {
        error: error("606"),
        written: None,
        retry_at: T0 + MINUTE,
    };
    store.complete_write(&claim, retry, T0 + 1).await.unwrap();
    store.mark_pending(&[change(2, 2)], T0 + 2).await.unwrap();
    assert_eq!(store.get(id(2)).await.unwrap().unwrap().retry_at, None);
}

pub async fn a_resync_requeues_and_claims_in_one_step_so_no_transformer_takes_it_between<S: StateStore>(store: S) {
    to_ready(&store, 1, 7, T0).await;
    let (claim, _) = store.claim(id(1), Status::Ready, TTL, T0 + 1).await.unwrap().unwrap();
    store
        .complete_write(&claim, WriteResult::Synced(written(7, vec![])), T0 + 2)
        .await
        .unwrap();
    let (claim, state) = store.requeue_claimed(id(1), TTL, T0 + 3).await.unwrap().unwrap();
    assert_eq!((state.status, state.version, state.rewrite), (Status::Pending, 7, true));
    assert!(
        store
            .claim(id(1), Status::Pending, TTL, T0 + 4)
            .await
            .unwrap()
            .is_none(),
        "a stream transformer cannot take it"
    );
    let done = store
        .complete_transform(&claim, TransformResult::Ready(plan(1)), T0 + 5)
        .await
        .unwrap();
    assert_eq!(done, Completion::Completed);
    // The flag outlives the transform and ends with the next successful write.
    let (claim, state) = store.claim(id(1), Status::Ready, TTL, T0 + 6).await.unwrap().unwrap();
    assert!(state.rewrite);
    store
        .complete_write(&claim, WriteResult::Synced(written(7, vec![])), T0 + 7)
        .await
        .unwrap();
    assert!(!store.get(id(1)).await.unwrap().unwrap().rewrite);
    assert!(
        store.requeue_claimed(id(2), TTL, T0).await.unwrap().is_none(),
        "no such record"
    );
    // A plain requeue does not clear a pending rewrite.
    assert!(store.requeue(id(1), true, T0 + 8).await.unwrap());
    assert!(store.requeue(id(1), false, T0 + 9).await.unwrap());
    assert!(store.get(id(1)).await.unwrap().unwrap().rewrite);
}

pub async fn a_claim_is_renewed_only_while_held_and_a_released_one_is_free_at_once<S: StateStore>(store: S) {
    to_ready(&store, 1, 7, T0).await;
    let (claim, _) = store.claim(id(1), Status::Ready, TTL, T0).await.unwrap().unwrap();
    let renewed = store.renew_claim(&claim, TTL, T0 + TTL - 1).await.unwrap().unwrap();
    assert_eq!(renewed.until, T0 + 2 * TTL - 1);
    assert!(
        store
            .claim(id(1), Status::Ready, TTL, T0 + TTL + 1)
            .await
            .unwrap()
            .is_none(),
        "the renewal holds past the first expiry"
    );
    // A newer version takes the record from under the claim: the renewal fails.
    store.mark_pending(&[change(1, 8)], T0 + TTL + 2).await.unwrap();
    assert!(store.renew_claim(&renewed, TTL, T0 + TTL + 3).await.unwrap().is_none());
    to_ready(&store, 2, 1, T0).await;
    let (claim, _) = store.claim(id(2), Status::Ready, TTL, T0).await.unwrap().unwrap();
    store.release(&claim, T0 + 1).await.unwrap();
    let (again, _) = store.claim(id(2), Status::Ready, TTL, T0 + 2).await.unwrap().unwrap();
    // Releasing a claim already lost leaves the new holder alone.
    store.release(&claim, T0 + 3).await.unwrap();
    assert!(store.claim(id(2), Status::Ready, TTL, T0 + 4).await.unwrap().is_none());
    assert!(store.renew_claim(&again, TTL, T0 + 5).await.unwrap().is_some());
}

pub async fn planned_roles_are_recorded_under_the_claim_and_cleared_by_the_completed_write<S: StateStore>(store: S) {
    to_ready(&store, 1, 7, T0).await;
    let (claim, _) = store.claim(id(1), Status::Ready, TTL, T0).await.unwrap().unwrap();
    let planned = vec![role(1, "Champion", 101), role(2, "Decision Maker", 102)];
    let extended = store
        .record_planned(&claim, &planned, TTL, T0 + 10)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(extended.until, T0 + 10 + TTL, "recording extends the claim");
    let state = store.get(id(1)).await.unwrap().unwrap();
    assert_eq!(state.planned, planned);
    // Still planned after the process dies and the record goes round again.
    store.mark_pending(&[change(1, 8)], T0 + 20).await.unwrap();
    assert!(
        store
            .record_planned(&extended, &[], TTL, T0 + 21)
            .await
            .unwrap()
            .is_none(),
        "a lost claim records nothing"
    );
    assert_eq!(store.get(id(1)).await.unwrap().unwrap().planned, planned);
    to_ready(&store, 1, 8, T0 + 30).await;
    let (claim, state) = store.claim(id(1), Status::Ready, TTL, T0 + 31).await.unwrap().unwrap();
    assert_eq!(state.planned, planned);
    store
        .complete_write(&claim, WriteResult::Synced(written(8, planned.clone())), T0 + 32)
        .await
        .unwrap();
    let state = store.get(id(1)).await.unwrap().unwrap();
    assert!(state.planned.is_empty(), "{state:?}");
    assert_eq!(state.written.unwrap().roles, planned);
}

pub async fn a_lock_is_taken_once_until_it_expires<S: StateStore>(store: S) {
    let keys = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect::<Vec<String>>();
    assert_eq!(
        store.lock(&keys(&["lead#a", "lead#b"]), TTL, T0).await.unwrap(),
        vec![true, true]
    );
    assert_eq!(
        store.lock(&keys(&["lead#a", "lead#c"]), TTL, T0 + 1).await.unwrap(),
        vec![false, true],
        "held, by anyone, until it expires"
    );
    assert_eq!(store.lock(&keys(&["lead#a"]), TTL, T0 + TTL).await.unwrap(), vec![true]);
    assert_eq!(
        store.lock(&keys(&["lead#a"]), TTL, T0 + TTL + 1).await.unwrap(),
        vec![false]
    );
    assert_eq!(store.lock(&[], TTL, T0).await.unwrap(), Vec::<bool>::new());
    // Freed by its holder, it can be taken at once; a stale holder frees nothing.
    store.unlock(&keys(&["lead#c"]), TTL, T0 + 1).await.unwrap();
    assert_eq!(store.lock(&keys(&["lead#c"]), TTL, T0 + 2).await.unwrap(), vec![true]);
    store.unlock(&keys(&["lead#c"]), TTL, T0 + 1).await.unwrap();
    assert_eq!(store.lock(&keys(&["lead#c"]), TTL, T0 + 3).await.unwrap(), vec![false]);
}

/// GIVEN a group of records, one held by another worker and one unknown
/// WHEN they are claimed and completed together (a write group's requests)
/// THEN each answers as its own claim and completion would, in order: the held and the unknown
/// are not claimed, a stale completion is superseded, the rest are recorded.
pub async fn a_group_is_claimed_and_completed_as_each_would_be_alone<S: StateStore>(store: S) {
    for n in 1..=4 {
        to_ready(&store, n, 7, T0).await;
    }
    let (held, _) = store.claim(id(3), Status::Ready, TTL, T0 + 1).await.unwrap().unwrap();
    let ids = vec![id(1), id(2), id(3), id(9), id(4)];
    let claimed: Vec<_> = store
        .claim_many(ids, Status::Ready, TTL, T0 + 2)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let taken: Vec<bool> = claimed.iter().map(Option::is_some).collect();
    assert_eq!(taken, [true, true, false, false, true]);
    let claims: Vec<_> = claimed.into_iter().flatten().map(|(claim, _)| claim).collect();
    assert_eq!(claims.iter().map(|c| c.id).collect::<Vec<_>>(), [id(1), id(2), id(4)]);
    // A newer version of 2 arrives meanwhile: its write is superseded, the others complete.
    store.mark_pending(&[change(2, 8)], T0 + 3).await.unwrap();
    let w = written(7, vec![role(1, "Champion", 101)]);
    let mut writes: Vec<(oppsync_state::Claim, WriteResult)> = claims
        .iter()
        .map(|c| (c.clone(), WriteResult::Synced(w.clone())))
        .collect();
    writes.push((held, WriteResult::Synced(w.clone())));
    let done: Vec<Completion> = store
        .complete_writes(writes, T0 + 4)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        done,
        [
            Completion::Completed,
            Completion::Superseded,
            Completion::Completed,
            Completion::Completed
        ]
    );
    for (n, status) in [
        (1, Status::Synced),
        (2, Status::Pending),
        (3, Status::Synced),
        (4, Status::Synced),
    ] {
        let state = store.get(id(n)).await.unwrap().unwrap();
        assert_eq!(state.status, status, "record {n}");
        assert_eq!(state.written, Some(w.clone()), "record {n}: what was written is kept");
    }
}

/// GIVEN runs recorded over time WHEN the history is read THEN the newest come first, `limit`
/// holds, and a run past its keeping time is gone.
pub async fn the_run_history_lists_the_newest_runs_first_and_forgets_old_ones(store: impl StateStore) {
    let day = 86_400_000;
    let t0 = 1_800_000_000_000;
    let run = |k: i64, written: u64| Run {
        command: "sync".into(),
        started: t0 + k * 60_000,
        ended: t0 + k * 60_000 + 5_000,
        read: written + 1,
        written,
        marketo_calls: 3,
        stopped: (k == 2).then(|| "Marketo's daily API quota is spent (607)".to_owned()),
        ..Run::default()
    };
    assert!(store.runs(10, t0).await.unwrap().is_empty());
    for k in 0..3 {
        store.record_run(&run(k, k as u64 * 10), 30 * day).await.unwrap();
    }
    let runs = store.runs(10, t0 + day).await.unwrap();
    assert_eq!(runs, vec![run(2, 20), run(1, 10), run(0, 0)]);
    assert_eq!(store.runs(2, t0 + day).await.unwrap(), vec![run(2, 20), run(1, 10)]);
    // 31 days on, a new run is recorded and the three old ones are past their time.
    let late = Run {
        started: t0 + 31 * day,
        ended: t0 + 31 * day + 1_000,
        ..run(0, 7)
    };
    store.record_run(&late, 30 * day).await.unwrap();
    assert_eq!(store.runs(10, t0 + 31 * day + 2_000).await.unwrap(), vec![late]);
}
