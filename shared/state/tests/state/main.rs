//! The state stores' tests: one conformance suite, run against the reference store, SQLite and
//! DynamoDB (moto).
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod conformance;
mod dynamodb_only;
mod files;
mod model;
mod stores;

/// Instantiates every conformance test for each store.
macro_rules! for_every_store {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    crate::conformance::$name(oppsync_state::MemoryStore::new()).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    crate::conformance::$name(crate::stores::sqlite()).await;
                }
            )*
        }
        mod dynamodb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    crate::conformance::$name(crate::stores::dynamo().await).await;
                }
            )*
        }
    };
}

for_every_store!(
    the_run_history_lists_the_newest_runs_first_and_forgets_old_ones,
    a_cursor_starts_empty_and_moves_only_under_the_lease,
    a_lease_cannot_be_taken_while_held_and_expires_by_itself,
    a_poller_whose_lease_expired_cannot_move_the_cursor_or_renew,
    a_released_lease_is_free_at_once,
    new_changes_are_recorded_pending_and_repeats_are_no_ops,
    out_of_order_versions_never_regress_a_record,
    a_deletion_is_a_flag_and_a_restored_record_is_recorded_again,
    a_requeued_deletion_is_read_again_not_deleted_again,
    a_double_claim_fails_until_the_first_claim_expires,
    racing_claims_have_exactly_one_winner,
    a_transform_completes_only_under_its_claim_and_version,
    an_unchanged_plan_is_synced_without_a_write,
    a_write_marks_synced_and_records_what_marketo_holds,
    a_deletion_write_marks_the_record_deleted,
    a_crash_between_the_marketo_write_and_marking_synced_converges_on_rerun,
    a_superseded_write_still_records_what_was_written_but_never_an_older_one,
    a_retryable_failure_stays_ready_and_a_permanent_one_goes_to_the_error_ledger,
    the_failed_view_pages_through_every_failure_oldest_first,
    a_closed_status_lists_every_record_once_in_small_pages,
    counts_and_oldest_pending_describe_the_backlog,
    completions_are_counted_per_minute,
    marketo_call_counters_are_exact_under_concurrent_increments,
    requeue_puts_a_record_back_to_pending,
    a_large_plan_round_trips,
    a_bad_page_token_is_a_clear_error,
    a_deleted_connection_is_traced_back_to_its_opportunity,
    a_remembered_lead_is_known_until_forgotten,
    a_days_calls_are_taken_before_each_call_and_stop_at_the_budget,
    processes_sharing_the_budget_are_counted_while_live,
    what_a_write_sent_is_kept_part_by_part,
    a_retried_write_waits_until_woken_and_a_paused_one_counts_no_attempt,
    a_resync_requeues_and_claims_in_one_step_so_no_transformer_takes_it_between,
    a_claim_is_renewed_only_while_held_and_a_released_one_is_free_at_once,
    planned_roles_are_recorded_under_the_claim_and_cleared_by_the_completed_write,
    a_lock_is_taken_once_until_it_expires,
    a_group_is_claimed_and_completed_as_each_would_be_alone,
);

/// The local command holds an OS lock on its state file, so what a dead run left (claims,
/// leases, lead-creation locks) is freed when the next run starts, not when it expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_local_run_frees_what_a_dead_one_left() {
    use oppsync_state::StateStore;
    let store = stores::sqlite();
    let key = vec!["lead#x".to_owned()];
    assert_eq!(store.lock(&key, 60_000, 1_000).await.unwrap(), vec![true]);
    assert_eq!(store.lock(&key, 60_000, 1_001).await.unwrap(), vec![false]);
    store.release_abandoned().await.unwrap();
    assert_eq!(store.lock(&key, 60_000, 1_002).await.unwrap(), vec![true]);
}

/// A state file written before `retry_at`, `rewrite` and `planned` existed opens, keeps its
/// records and gains the columns: upgrading oppsync never strands a user's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_file_from_before_the_new_columns_opens_and_keeps_its_records() {
    use oppsync_state::{SqliteStore, StateStore, Status};
    let path = std::env::temp_dir().join(format!("{}.db", oppsync_tests::harness::unique("old-schema")));
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(oppsync_tests::harness::FIRST_OPPORTUNITIES_TABLE)
            .unwrap();
        conn.execute(
            "INSERT INTO opportunities (id, status, version, deleted, attempts, created_at, updated_at, status_since)
             VALUES (?1, 'pending', 7, 0, 0, 1, 1, 1)",
            [conformance::id(1).to_string()],
        )
        .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let state = store.get(conformance::id(1)).await.unwrap().unwrap();
    assert_eq!((state.status, state.version), (Status::Pending, 7));
    assert_eq!((state.retry_at, state.rewrite, state.planned.len()), (None, false, 0));
    assert!(store.requeue(conformance::id(1), true, 2).await.unwrap());
    assert!(store.get(conformance::id(1)).await.unwrap().unwrap().rewrite);
    drop(store);
    let _ = std::fs::remove_file(&path);
}

/// SQLite answers every generated sequence of operations as the reference store does.
#[test]
fn sqlite_answers_every_generated_sequence_as_the_reference_store_does() {
    model::check_against_the_model(500, || async { stores::sqlite() });
}

/// DynamoDB (moto) answers every generated sequence of operations as the reference store does.
#[test]
fn dynamodb_answers_every_generated_sequence_as_the_reference_store_does() {
    model::check_against_the_model(500, stores::dynamo);
}
