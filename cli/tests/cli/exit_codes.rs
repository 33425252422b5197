//! The README's exit-code table, case by case: each case a row names is held by a test that
//! runs the command that way and asserts the code. The table and [`CASES`] must agree: a case
//! added to the README without a test here, or a test for a case the README dropped, fails.

use std::path::Path;

use oppsync_marketo::Operation as E;
use oppsync_simulators::MarketoFault;
use oppsync_simulators::dataverse::{Mix, Table};
use oppsync_tests::harness::{assert_marketo_matches_dynamics, sims};
use serde_json::json;

use crate::common::*;

/// (code, a phrase of the README's case, the test that holds it). The test may live in any of
/// the command's test files or in its own source (the demo's verdict is a unit test).
const CASES: &[(&str, &str, &str)] = &[
    (
        "0",
        "everything read was written or was unchanged",
        "sync_once_writes_everything_then_nothing_and_status_shows_it",
    ),
    (
        "1",
        "a record failed permanently",
        "a_permanent_failure_exits_1_and_is_in_the_searchable_exportable_error_ledger",
    ),
    (
        "1",
        "writing stopped at the Marketo quota",
        "writing_stopped_at_the_marketo_quota_exits_1_with_the_rest_queued",
    ),
    (
        "1",
        "writing stopped at oppsync's daily budget",
        "writing_stopped_at_the_daily_budget_exits_1_with_the_rest_queued",
    ),
    (
        "1",
        "a resync named an id that neither Dynamics nor oppsync knows",
        "resync_of_an_id_dynamics_does_not_have_deletes_only_what_oppsync_wrote",
    ),
    (
        "1",
        "the demo's end state differs from the rules",
        "the_demos_end_state_differs_from_the_rules_exits_1",
    ),
    ("2", "bad arguments", "bad_arguments_are_refused_by_the_parser"),
    (
        "2",
        "bad configuration",
        "bad_configuration_files_are_refused_with_the_key_and_the_fix",
    ),
    (
        "2",
        "a bad environment value",
        "each_environment_value_is_checked_for_its_shape",
    ),
    (
        "2",
        "a `--state` that is not oppsync's state file",
        "each_unusable_state_file_says_which_failure_it_is_and_the_fix",
    ),
    (
        "3",
        "credentials refused",
        "wrong_credentials_name_the_system_and_change_nothing",
    ),
    (
        "3",
        "a MARKETO_URL that is not a Marketo instance",
        "a_marketo_url_that_is_not_marketo_stops_with_exit_3_and_fails_no_record",
    ),
    (
        "3",
        "an instance that runs Marketo's native CRM sync",
        "an_instance_running_the_native_crm_sync_stops_sync_before_any_write",
    ),
    (
        "3",
        "a mapped field the instance lacks",
        "a_mapped_field_marketo_lacks_stops_the_run_before_anything_is_sent",
    ),
    (
        "3",
        "Dynamics unreachable",
        "an_unreachable_endpoint_is_a_clear_fatal_error",
    ),
    (
        "3",
        "oppsync's state file truncated or damaged",
        "each_unusable_state_file_says_which_failure_it_is_and_the_fix",
    ),
    (
        "3",
        "a state file too old for a read-only command",
        "an_older_state_file_is_named_and_upgraded_by_sync",
    ),
    (
        "3",
        "another oppsync using the state",
        "a_second_run_on_the_same_state_is_refused_while_the_first_holds_it",
    ),
    (
        "4",
        "Marketo unreachable past the retries",
        "marketo_unreachable_leaves_the_records_queued_with_exit_4_and_errors_reads_its_config",
    ),
    (
        "4",
        "Marketo throttling past the retries",
        "marketo_throttling_past_the_retries_leaves_the_records_queued_with_exit_4",
    ),
    (
        "4",
        "a record-level failure that may pass (1014)",
        "records_left_for_retry_exit_4_saying_how_many_and_why_and_the_next_run_writes_them",
    ),
    (
        "130",
        "stopped by Ctrl-C",
        "sync_stopped_by_a_signal_says_so_exits_130_or_143_and_the_next_run_goes_on",
    ),
    (
        "130",
        "stopped by SIGTERM",
        "sync_stopped_by_a_signal_says_so_exits_130_or_143_and_the_next_run_goes_on",
    ),
];

/// The README's exit-code rows: the first code of the row and its cases (`; `-separated).
fn readme_rows() -> Vec<(String, Vec<String>)> {
    let readme = std::fs::read_to_string(oppsync_tests::repo_root().join("README.md")).unwrap();
    readme
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("| **")?;
            let (code, rest) = rest.split_once("**")?;
            let cells: Vec<&str> = rest.split(" | ").collect();
            let when = cells.get(1)?;
            Some((code.to_owned(), when.split("; ").map(str::to_owned).collect()))
        })
        .collect()
}

/// The text of `fn name(` up to its closing brace at the start of a line, in the command's
/// tests or sources.
fn test_body(name: &str) -> Option<String> {
    let root = oppsync_tests::repo_root().join("cli");
    for dir in [root.join("tests/cli"), root.join("src")] {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            if let Some(start) = text.find(&format!("fn {name}(")) {
                let end = text[start..].find("\n}\n").or_else(|| text[start..].find("\n    }\n"));
                return Some(text[start..start + end.unwrap_or(text.len() - start)].to_owned());
            }
        }
    }
    None
}

#[test]
fn every_case_of_the_readmes_exit_code_table_is_held_by_a_test() {
    let rows = readme_rows();
    let codes: Vec<&str> = rows.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(codes, ["0", "1", "2", "3", "4", "130"], "{rows:?}");
    for (code, cases) in &rows {
        for case in cases {
            let held: Vec<_> = CASES
                .iter()
                .filter(|(c, phrase, _)| c == code && case.contains(phrase))
                .collect();
            assert_eq!(
                held.len(),
                1,
                "exit {code}, case \"{case}\": no test here names it (add one to CASES)"
            );
        }
    }
    for (code, phrase, test) in CASES {
        let row = rows.iter().find(|(c, _)| c == code).unwrap();
        assert!(
            row.1.iter().any(|case| case.contains(phrase)),
            "CASES names \"{phrase}\" for exit {code}; the README's row no longer has it"
        );
        let body = test_body(test).unwrap_or_else(|| panic!("no test named {test}"));
        let codes: &[&str] = if *code == "130" { &["130", "143"] } else { &[code] };
        for c in codes {
            let asserted = body.contains(&format!(", {c}")) || body.contains(&format!("({c})"));
            assert!(asserted, "{test} does not assert exit {c}");
        }
    }
}

async fn synced_state(n: u64, seed: u64) -> (oppsync_tests::harness::Sims, Vec<(String, String)>, std::path::PathBuf) {
    let sims = sims().await;
    sims.dv.seed(n, seed, Mix::Uniform);
    let env = env_for(&sims);
    let state = state_path();
    let run = oppsync(&["sync", "--state", s(&state)], &env).await;
    assert_eq!(run.code, 0, "{run:?}");
    (sims, env, state)
}

/// Changes the amount of the first `n` opportunities (a new amount each call).
fn change_amounts(sims: &oppsync_tests::harness::Sims, n: usize) {
    static ROUND: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let round = ROUND.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    for (k, (id, _)) in sims.dv.rows(Table::Opportunities).iter().take(n).enumerate() {
        sims.dv.upsert(
            Table::Opportunities,
            id,
            json!({"estimatedvalue": 1_000_000 * round + k as u64}),
            &[],
        );
    }
}

async fn counts(state: &Path) -> serde_json::Value {
    let status = oppsync(&["status", "--json", "--state", s(state)], &[]).await;
    assert_eq!(status.code, 0, "{status:?}");
    status.json()["counts"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writing_stopped_at_the_marketo_quota_exits_1_with_the_rest_queued() {
    let (sims, env, state) = synced_state(20, 61).await;
    change_amounts(&sims, 5);
    // The instance's quota is spent (other integrations): Marketo answers 607.
    let quota = oppsync_simulators::MarketoConfig::default().daily_quota;
    sims.mk.set_daily_calls(quota);
    let run = oppsync(&["sync", "--state", s(&state)], &env).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stdout.contains("stopped early") && run.stdout.contains("607"),
        "{run:?}"
    );
    assert_eq!(counts(&state).await["ready"], 5);
    // The next day's run writes them.
    sims.mk.set_daily_calls(0);
    let run = oppsync(&["sync", "--state", s(&state)], &env).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert_marketo_matches_dynamics(&sims);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writing_stopped_at_the_daily_budget_exits_1_with_the_rest_queued() {
    let (sims, env, state) = synced_state(20, 62).await;
    change_amounts(&sims, 5);
    // Other runs on this state spent today's budget (the default 40,000 calls).
    let conn = rusqlite::Connection::open(&state).unwrap();
    let spent = conn.execute("UPDATE marketo_calls SET n = 40000", []).unwrap();
    assert_eq!(spent, 1, "the first sync counted its calls");
    drop(conn);
    let before = sims.mk.rest_calls();
    let run = oppsync(&["sync", "--state", s(&state)], &env).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stdout.contains("stopped early") && run.stdout.contains("budget"),
        "{run:?}"
    );
    assert_eq!(sims.mk.rest_calls(), before, "a call past the budget was sent");
    assert_eq!(counts(&state).await["ready"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_running_the_native_crm_sync_stops_sync_before_any_write() {
    let sims = sims().await;
    sims.dv.seed(10, 63, Mix::Uniform);
    sims.mk.configure(|c| c.crm_enabled = true);
    let env = env_for(&sims);
    let state = state_path();
    let run = oppsync(&["sync", "--state", s(&state)], &env).await;
    assert_eq!(run.code, 3, "{run:?}");
    assert!(run.stderr.contains("native"), "{run:?}");
    for op in [
        E::OpportunitySync,
        E::CompanySync,
        E::SalesPersonSync,
        E::LeadSync,
        E::RoleSync,
    ] {
        assert_eq!(sims.mk.calls(op), 0, "{op:?}");
    }
    // What was read stays queued.
    assert_eq!(counts(&state).await["ready"], 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marketo_throttling_past_the_retries_leaves_the_records_queued_with_exit_4() {
    let sims = sims().await;
    sims.dv.seed(10, 64, Mix::Uniform);
    // Every companies call of this run is refused for the calls at once (615), past the
    // client's retries and the drain's hand-offs.
    for nth in 1..=40 {
        sims.mk.inject(E::CompanySync, nth, MarketoFault::Code("615"));
    }
    let env = env_for(&sims);
    let state = state_path();
    let run = oppsync(&["sync", "--state", s(&state)], &env).await;
    assert_eq!(run.code, 4, "{run:?}");
    assert!(
        run.stdout.contains("615") && run.stdout.contains("left for retry"),
        "{run:?}"
    );
    sims.mk.clear_faults();
    let run = oppsync(&["sync", "--state", s(&state)], &env).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert_marketo_matches_dynamics(&sims);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_stopped_by_a_signal_says_so_exits_130_or_143_and_the_next_run_goes_on() {
    let (sims, env, state) = synced_state(10, 65).await;
    for (signal, code) in [("INT", 130), ("TERM", 143)] {
        change_amounts(&sims, 3);
        let cwd = std::env::temp_dir();
        let stopped = run_then_signal(
            &["sync", "--every", "1h", "--state", s(&state)],
            &env,
            &cwd,
            "sync: ",
            signal,
        )
        .await;
        // Stopped once its first cycle was done and it waited for the next.
        assert!(
            stopped.line.as_deref().is_some_and(|l| l.contains("3 written")),
            "{:?} {}",
            stopped.line,
            stopped.stderr
        );
        assert_eq!(stopped.code, Some(code), "SIG{signal}: {}", stopped.stderr);
        assert!(
            stopped
                .stderr
                .contains(&format!("oppsync sync: stopped by SIG{signal}")),
            "{}",
            stopped.stderr
        );
    }
    // The lock and the lease died with it: the next run starts at once.
    change_amounts(&sims, 4);
    let run = oppsync(&["sync", "--state", s(&state)], &env).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert_marketo_matches_dynamics(&sims);
}
