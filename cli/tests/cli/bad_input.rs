//! Bad input of every kind: a clear message naming the problem and the fix, a non-zero exit,
//! and the state as it was.

use oppsync_simulators::dataverse::Mix;
use oppsync_tests::harness::{assert_marketo_matches_dynamics, sims};
use serde_json::Value;

use crate::common::*;

/// A state with a finished sync in it, and a way to see that it did not change.
async fn synced_state(env: &[(String, String)]) -> (std::path::PathBuf, Value) {
    let state = state_path();
    let run = oppsync(&["sync", "--state", s(&state)], env).await;
    assert_eq!(run.code, 0, "{run:?}");
    let view = snapshot(&state).await;
    (state, view)
}

/// What a failed command must leave alone: counts and cursors.
async fn snapshot(state: &std::path::Path) -> Value {
    let v = oppsync(&["status", "--json", "--state", s(state)], &[]).await.json();
    serde_json::json!({"counts": v["counts"], "cursors": [v["cursors"]["opportunities"]["updated"], v["cursors"]["connections"]["updated"]]})
}

/// Records still queued (pending or ready) and records failed, as `status` counts them.
async fn queued_and_failed(state: &std::path::Path) -> (u64, u64) {
    let status = oppsync(&["status", "--json", "--state", s(state)], &[]).await.json();
    let count = |k: &str| status["counts"][k].as_u64().unwrap();
    (count("pending") + count("ready"), count("failed"))
}

fn with(env: &[(String, String)], name: &str, value: &str) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = env.iter().filter(|(k, _)| k != name).cloned().collect();
    env.push((name.to_owned(), value.to_owned()));
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_environment_variables_are_all_named() {
    let state = state_path();
    let run = oppsync(
        &["sync", "--state", s(&state)],
        &[("MARKETO_URL".into(), "https://x.mktorest.com".into())],
    )
    .await;
    assert_eq!(run.code, 2, "{run:?}");
    for name in [
        "DYNAMICS_URL",
        "DYNAMICS_TENANT_ID",
        "DYNAMICS_CLIENT_ID",
        "DYNAMICS_CLIENT_SECRET",
        "MARKETO_CLIENT_ID",
        "MARKETO_CLIENT_SECRET",
    ] {
        assert!(run.stderr.contains(name), "{name} is not named: {run:?}");
    }
    assert!(
        !run.stderr.contains("MARKETO_URL,"),
        "a set variable is not listed as missing: {run:?}"
    );
    assert!(!state.exists(), "nothing was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_files_are_refused_with_the_key_and_the_fix() {
    let sims = sims().await;
    sims.dv.seed(5, 41, Mix::Uniform);
    let env = env_for(&sims);
    let (state, before) = synced_state(&env).await;
    let cases = [
        ("[marketo]\ncalls_per_20s = 500\n", "calls_per_20s"),
        ("[mapping\n", "TOML"),
        ("[sync]\nbatch_size = \"lots\"\n", "batch_size"),
        ("[unknown]\nx = 1\n", "unknown"),
        (
            "[[mapping.fields]]\nmarketo = \"x\"\ndataverse = \"y\"\ntype = \"text\"\n",
            "type",
        ),
        // Issue 19: these were reported by byte offset alone.
        (
            "[sync]\nbatch_size = 10\nbatch_size = 20\n",
            "line 3, column 1: `batch_size = 20`",
        ),
        (
            "[sync]\nmax_attempts = 99999999999999999999999\n",
            "line 2, column 16: `max_attempts",
        ),
    ];
    for (text, names) in cases {
        let config = config_file(text);
        let run = oppsync(&["sync", "--state", s(&state), "--config", s(&config)], &env).await;
        assert_eq!(run.code, 2, "{text}: {run:?}");
        assert!(
            run.stderr.contains(names),
            "{text}: the message should name {names}: {run:?}"
        );
    }
    let missing = oppsync(
        &["sync", "--state", s(&state), "--config", "/nonexistent/oppsync.toml"],
        &env,
    )
    .await;
    assert_eq!(missing.code, 2, "{missing:?}");
    assert!(
        missing.stderr.contains("/nonexistent/oppsync.toml") && missing.stderr.contains("Fix"),
        "{missing:?}"
    );
    // Every problem of every section at once, not only each section's first (issue 19).
    let many = config_file(
        "[marketo]\ncalls_per_20s = \"fifty\"\nconcurrent_calls = -1\n[sync]\nbatch_size = \"lots\"\nmax_attempts = 1.5\nretries = 3\n",
    );
    let run = oppsync(&["sync", "--state", s(&state), "--config", s(&many)], &env).await;
    assert_eq!(run.code, 2, "{run:?}");
    for key in [
        "marketo.calls_per_20s",
        "marketo.concurrent_calls",
        "sync.batch_size",
        "sync.max_attempts",
        "sync.retries",
    ] {
        assert!(run.stderr.contains(key), "{key} is not named: {run:?}");
    }
    // A long value is not echoed back whole.
    let long = config_file(&format!("[sync]\nbatch_size = \"{}\n", "x".repeat(200_000)));
    let run = oppsync(&["sync", "--state", s(&state), "--config", s(&long)], &env).await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.len() < 2_000, "{} bytes of stderr", run.stderr.len());
    // Endless input is read only as far as a configuration can go (it once filled memory).
    let endless = oppsync(&["sync", "--state", s(&state), "--config", "/dev/zero"], &env).await;
    assert_eq!(endless.code, 2, "{endless:?}");
    assert!(endless.stderr.contains("256 KB"), "{endless:?}");
    // Thousands of mapped fields: refused by count, not failed later as an overlong URL.
    let mut many = String::new();
    for i in 0..1_000 {
        many.push_str(&format!(
            "[[mapping.fields]]\nmarketo = \"f{i}\"\ndataverse = \"new_f{i}\"\ntype = \"string\"\n"
        ));
    }
    let config = config_file(&many);
    let run = oppsync(&["sync", "--state", s(&state), "--config", s(&config)], &env).await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains("mapping.fields") && run.stderr.contains("at most 200"),
        "{run:?}"
    );
    assert!(
        run.stderr.len() < 2_000,
        "one short message: {} bytes",
        run.stderr.len()
    );
    assert_eq!(snapshot(&state).await, before, "the state is untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_to_a_remote_host_is_refused_for_either_system() {
    let sims = sims().await;
    let env = env_for(&sims);
    for (name, system) in [("DYNAMICS_URL", "Dynamics"), ("MARKETO_URL", "Marketo")] {
        let run = oppsync(
            &["sync", "--state", s(&state_path())],
            &with(&env, name, "http://crm.example.com"),
        )
        .await;
        assert_eq!(run.code, 2, "{run:?}");
        assert!(run.stderr.contains(system) && run.stderr.contains("https"), "{run:?}");
    }
    assert_eq!(sims.dv.requests() + sims.mk.rest_calls(), 0);
}

/// Issue 19, item 3: every environment value is checked for its shape where it enters, the
/// refusal names the variable and the fix, shows at most a short prefix (never a secret), and
/// exits 2 before anything is read or created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_environment_value_is_checked_for_its_shape() {
    let sims = sims().await;
    let env = env_for(&sims);
    let huge = format!("https://{}.crm.dynamics.com", "x".repeat(100_000));
    for (name, value, says) in [
        ("DYNAMICS_TENANT_ID", "../../attacker.example/x", "is not a GUID"),
        ("DYNAMICS_CLIENT_ID", "my app", "is not a GUID"),
        ("DYNAMICS_URL", huge.as_str(), "characters long"),
        (
            "DYNAMICS_URL",
            "https://me:hunter2@crm.example.com",
            "user name or password",
        ),
        (
            "MARKETO_URL",
            "https://123-abc-456.mktorest.com\u{1b}[2J",
            "control character",
        ),
        ("MARKETO_CLIENT_ID", "abc\tdef", "control character"),
        ("MARKETO_CLIENT_SECRET", "hunter2\u{1}", "control character"),
    ] {
        let mut env = with(&env, name, value);
        if name == "DYNAMICS_TENANT_ID" {
            env.retain(|(k, _)| k != "DYNAMICS_TOKEN_URL");
        }
        let state = state_path();
        let run = oppsync(&["sync", "--state", s(&state)], &env).await;
        assert_eq!(run.code, 2, "{name}: {run:?}");
        assert!(
            run.stderr.contains(name) && run.stderr.contains(says) && run.stderr.contains("Fix:"),
            "{name}: {run:?}"
        );
        assert!(run.stderr.len() < 1_000, "{name}: {} bytes of stderr", run.stderr.len());
        assert!(!run.stderr.contains("hunter2"), "{name}: {run:?}");
        assert!(!state.exists(), "{name}: the state was created");
    }
    for table in ["", "a", "my table", "t\u{7}x"] {
        let run = oppsync(&["status", "--table", table], &[]).await;
        assert_eq!(run.code, 2, "{table:?}: {run:?}");
        assert!(run.stderr.contains("--table") && run.stderr.contains("Fix:"), "{run:?}");
    }
    assert_eq!(sims.dv.requests() + sims.mk.rest_calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_ids_must_be_guids_and_an_injection_never_reaches_dataverse() {
    let sims = sims().await;
    sims.dv.seed(5, 42, Mix::Uniform);
    let env = env_for(&sims);
    let (state, before) = synced_state(&env).await;
    let requests = sims.dv.requests();
    for bad in [
        "not-a-guid",
        "0b000000-0000-4000-8000-00000000000z",
        "0b000000-0000-4000-8000-000000000001') or (statecode eq 0",
        "' or 1 eq 1 or '",
    ] {
        let run = oppsync(&["resync", bad, "--state", s(&state)], &env).await;
        assert_eq!(run.code, 2, "{bad}: {run:?}");
        assert!(run.stderr.contains("not opportunity ids"), "{bad}: {run:?}");
    }
    let neither = oppsync(&["resync", "--state", s(&state)], &env).await;
    assert_eq!(neither.code, 2, "{neither:?}");
    for bad in [
        "yesterday",
        "2026-13-01",
        "2026-02-30",
        "2026-11-01T24:00:00Z",
        "2026-11-01 08:00:00",
        "2026-11-01T00:00:00Z' or 1 eq 1",
    ] {
        let run = oppsync(&["resync", "--modified-since", bad, "--state", s(&state)], &env).await;
        assert_eq!(run.code, 2, "{bad}: {run:?}");
        assert!(run.stderr.contains("YYYY-MM-DD"), "{bad}: {run:?}");
    }
    let both = oppsync(&["resync", "--failed", "--all", "--state", s(&state)], &env).await;
    assert_eq!(both.code, 2, "{both:?}");
    assert_eq!(sims.dv.requests(), requests, "no bad id reached Dataverse");
    assert_eq!(snapshot(&state).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_name_the_system_and_change_nothing() {
    let sims = sims().await;
    sims.dv.seed(5, 43, Mix::Uniform);
    let env = env_for(&sims);
    let (state, before) = synced_state(&env).await;
    sims.dv.upsert(
        oppsync_simulators::dataverse::Table::Opportunities,
        &oppsync_simulators::dataverse::seed_id(0x0b00_0000, 1),
        serde_json::json!({"estimatedvalue": 1.5}),
        &[],
    );
    let dynamics = oppsync(
        &["sync", "--state", s(&state)],
        &with(&env, "DYNAMICS_CLIENT_SECRET", "wrong"),
    )
    .await;
    assert_eq!(dynamics.code, 3, "{dynamics:?}");
    assert!(
        dynamics.stderr.contains("Dynamics") && dynamics.stderr.contains("DYNAMICS_CLIENT_SECRET"),
        "{dynamics:?}"
    );
    assert!(
        !dynamics.stderr.contains("wrong"),
        "the secret is not echoed: {dynamics:?}"
    );
    assert_eq!(snapshot(&state).await, before);

    // Dynamics is read (the change recorded), then Marketo refuses: the change stays queued.
    let marketo = oppsync(
        &["sync", "--state", s(&state)],
        &with(&env, "MARKETO_CLIENT_SECRET", "wrong"),
    )
    .await;
    assert_eq!(marketo.code, 3, "{marketo:?}");
    assert!(marketo.stderr.contains("Marketo"), "{marketo:?}");
    let after = oppsync(&["status", "--json", "--state", s(&state)], &[]).await.json();
    assert_eq!(after["counts"]["failed"], 0, "a refused login fails no record: {after}");
    let queued = after["counts"]["pending"].as_u64().unwrap() + after["counts"]["ready"].as_u64().unwrap();
    assert_eq!(queued, 1, "the change is kept for the next run: {after}");
    let fixed = oppsync(&["sync", "--state", s(&state)], &env).await;
    assert!(fixed.stdout.contains("1 written"), "{fixed:?}");

    // The row: resync with refused credentials exited 1; it is the same fatal error.
    let id = oppsync_simulators::dataverse::seed_id(0x0b00_0000, 1);
    for (name, system) in [
        ("DYNAMICS_CLIENT_SECRET", "Dynamics"),
        ("MARKETO_CLIENT_SECRET", "Marketo"),
    ] {
        let run = oppsync(&["resync", &id, "--state", s(&state)], &with(&env, name, "wrong")).await;
        assert_eq!(run.code, 3, "{name}: {run:?}");
        assert!(
            run.stderr.contains(system) && !run.stderr.contains("wrong"),
            "{name}: {run:?}"
        );
    }
}

/// The rows: `sync` with Marketo unreachable exited 0 ("15 left for retry"), and
/// `errors --config <garbage>` exited 0 without reading the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marketo_unreachable_leaves_the_records_queued_with_exit_4_and_errors_reads_its_config() {
    let sims = sims().await;
    sims.dv.seed(15, 45, Mix::Uniform);
    let env = env_for(&sims);
    // Port 1 (tcpmux): outside the ephemeral range, so no other test's server can be there
    // (a port bound and freed could be taken by one, which then answered 404).
    let closed = "http://127.0.0.1:1".to_owned();
    let state = state_path();
    let run = oppsync(&["sync", "--state", s(&state)], &with(&env, "MARKETO_URL", &closed)).await;
    assert_eq!(run.code, 4, "{run:?}");
    assert!(
        run.stdout.contains("15 left for retry") || run.stderr.contains("Marketo"),
        "{run:?}"
    );
    assert_eq!(queued_and_failed(&state).await, (15, 0));
    let fixed = oppsync(&["sync", "--state", s(&state)], &env).await;
    assert_eq!(fixed.code, 0, "{fixed:?}");

    for config in [
        config_file("[sync\n"),
        std::path::PathBuf::from("/nonexistent/oppsync.toml"),
    ] {
        let run = oppsync(&["errors", "--state", s(&state), "--config", s(&config)], &[]).await;
        assert_eq!(run.code, 2, "{run:?}");
        assert!(run.stderr.contains("Fix"), "{run:?}");
    }
}

/// A MARKETO_URL that reaches a web server but not Marketo (a wrong host: its identity path
/// answers 404) is a setup error like refused credentials: exit 3, the message names
/// MARKETO_URL, and no record is failed for it (it failed all 15 with "identity HTTP 404").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marketo_url_that_is_not_marketo_stops_with_exit_3_and_fails_no_record() {
    let sims = sims().await;
    sims.dv.seed(15, 46, Mix::Uniform);
    let env = env_for(&sims);
    let state = state_path();
    // The Dataverse simulator is a web server without Marketo's identity endpoint.
    let run = oppsync(
        &["sync", "--state", s(&state)],
        &with(&env, "MARKETO_URL", &sims.dv.url()),
    )
    .await;
    assert_eq!(run.code, 3, "{run:?}");
    assert!(
        run.stderr.contains("MARKETO_URL") && run.stderr.contains("404"),
        "{run:?}"
    );
    assert_eq!(queued_and_failed(&state).await, (15, 0));
    let fixed = oppsync(&["sync", "--state", s(&state)], &env).await;
    assert_eq!(fixed.code, 0, "{fixed:?}");
    assert_marketo_matches_dynamics(&sims);
}

/// The row: a mapped field Marketo lacks failed every record with 1006 (no preflight
/// before writing). The write now stops before its first record is sent, naming the field,
/// with every record queued; once the mapping is fixed, `resync --all` writes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mapped_field_marketo_lacks_stops_the_run_before_anything_is_sent() {
    let sims = sims().await;
    sims.dv.seed(12, 46, Mix::Uniform);
    let env = env_for(&sims);
    let state = state_path();
    let config =
        config_file("[[mapping.fields]]\nmarketo = \"dealRegion\"\ndataverse = \"description\"\ntype = \"string\"\n");
    let run = oppsync(&["sync", "--state", s(&state), "--config", s(&config)], &env).await;
    assert_eq!(run.code, 3, "{run:?}");
    assert!(
        run.stderr.contains("no opportunity field dealRegion") && run.stderr.contains("Field Management"),
        "{run:?}"
    );
    use oppsync_marketo::Operation as E;
    let writes: u64 = [
        E::CompanySync,
        E::SalesPersonSync,
        E::LeadSync,
        E::OpportunitySync,
        E::RoleSync,
    ]
    .into_iter()
    .map(|e| sims.mk.calls(e))
    .sum();
    assert_eq!(writes, 0, "nothing was sent");
    assert_eq!(sims.mk.calls(E::OpportunityDescribe), 1, "one preflight");
    let status = oppsync(&["status", "--json", "--state", s(&state)], &[]).await.json();
    let queued = status["counts"]["pending"].as_u64().unwrap() + status["counts"]["ready"].as_u64().unwrap();
    assert_eq!(
        (queued, status["counts"]["failed"].as_u64().unwrap()),
        (12, 0),
        "{status}"
    );
    // Run again: stopped again before sending, no record failed (before, each failed with 1006).
    let again = oppsync(&["sync", "--state", s(&state), "--config", s(&config)], &env).await;
    assert_eq!(again.code, 3, "{again:?}");
    assert_eq!(sims.mk.calls(E::OpportunitySync), 0);
    let status = oppsync(&["status", "--json", "--state", s(&state)], &[]).await.json();
    assert_eq!(status["counts"]["failed"], 0, "{status}");
    // The mapping fixed: the plans made with the missing field are made again and written.
    let fixed = oppsync(&["resync", "--all", "--state", s(&state)], &env).await;
    assert_eq!(fixed.code, 0, "{fixed:?}");
    assert_eq!(sims.mk.snapshot().opportunities.len(), 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_endpoint_is_a_clear_fatal_error() {
    let sims = sims().await;
    let env = env_for(&sims);
    // Port 1 (tcpmux): outside the ephemeral range, so no other test's server can be there
    // (a port bound and freed could be taken by one, which then answered 404).
    let closed = "http://127.0.0.1:1".to_owned();
    let state = state_path();
    let run = oppsync(
        &["sync", "--state", s(&state)],
        &with(
            &with(&env, "DYNAMICS_URL", &closed),
            "DYNAMICS_TOKEN_URL",
            &format!("{closed}/tenant/oauth2/v2.0/token"),
        ),
    )
    .await;
    assert_eq!(run.code, 3, "{run:?}");
    assert!(
        run.stderr.contains("Dynamics") && run.stderr.contains("reach"),
        "{run:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_state_file_is_refused_before_anything_is_read() {
    let sims = sims().await;
    let env = env_for(&sims);
    let file = config_file("not a directory");
    let inside = file.join("state.db");
    let run = oppsync(&["sync", "--state", s(&inside)], &env).await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains("is not an existing directory") && run.stderr.contains("Fix"),
        "{run:?}"
    );
    assert_eq!(sims.dv.requests(), 0);
    for command in ["status", "errors"] {
        let missing = oppsync(&[command, "--state", "/nonexistent/state.db"], &[]).await;
        assert_eq!(missing.code, 2, "{command}: {missing:?}");
        assert!(
            missing.stderr.contains("/nonexistent is not an existing directory"),
            "{missing:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_are_refused_by_the_parser() {
    for args in [
        vec!["demo", "--opportunities", "5"],
        vec!["demo", "--opportunities", "many"],
        vec!["sync", "--every", "soon"],
        // Overflowed the seconds (a panic in a debug build, a wrapped interval in a release one).
        vec!["sync", "--every", "99999999999999999h"],
        vec!["sync", "--every", "99999999999999999999999"],
        vec!["sync", "--once", "--every", "5m"],
        vec!["sync", "--state", "a.db", "--table", "t"],
        vec!["errors", "--export", "xml"],
    ] {
        let run = oppsync(&args, &[]).await;
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
        assert!(!run.stderr.is_empty(), "{args:?}");
        assert!(!run.stderr.contains("panicked"), "{args:?}: {run:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dynamodb_table_that_does_not_exist_is_named_with_the_fix() {
    let env = vec![
        ("AWS_ENDPOINT_URL".to_string(), oppsync_tests::harness::moto_endpoint()),
        ("AWS_ACCESS_KEY_ID".into(), "test".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "test".into()),
        ("AWS_REGION".into(), "us-east-1".into()),
    ];
    let run = oppsync(&["status", "--table", "no-such-oppsync-table"], &env).await;
    assert_eq!(run.code, 3, "{run:?}");
    assert!(
        run.stderr.contains("does not exist") && run.stderr.contains("SyncStateTableName"),
        "{run:?}"
    );
    assert!(run.stderr.lines().count() <= 2, "no raw response dump: {run:?}");
}

/// No email address, contact name or secret reaches a log line (at `RUST_LOG=trace`), an error
/// message or the error ledger, through a run with faults on both sides, permanent refusals,
/// duplicate leads and a contact whose email is not an address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_email_name_or_secret_reaches_a_log_line_or_the_error_ledger() {
    use oppsync_simulators::Chaos;
    use oppsync_simulators::dataverse::Table;
    let sims = oppsync_tests::harness::sims_with(Some(Chaos { rate: 0.1, seed: 7 })).await;
    let seeded = sims.dv.seed(200, 40, Mix::Realistic);
    // A refused opportunity (the ledger), a contact with a broken email (a plan warning), and a
    // contact whose email matches two leads (a duplicate-lead error).
    sims.mk.skip_record(&seeded.opportunities[0], "1003", 1000);
    let customers: Vec<String> = sims
        .dv
        .rows(Table::Opportunities)
        .into_iter()
        .filter(|(_, row)| row.lookups.get("_customerid_value") == Some(&"contact"))
        .filter_map(|(_, row)| row.attributes["_customerid_value"].as_str().map(str::to_owned))
        .collect();
    assert!(customers.len() >= 2, "contact customers to spoil");
    sims.dv.upsert(
        Table::Contacts,
        &customers[0],
        serde_json::json!({"emailaddress1": "not-an-address.secret-person"}),
        &[],
    );
    let twice = sims
        .dv
        .row(Table::Contacts, &customers[customers.len() - 1])
        .unwrap()
        .attributes["emailaddress1"]
        .clone();
    for _ in 0..2 {
        sims.mk.add_lead(serde_json::json!({"email": twice}));
    }
    let mut env = env_for(&sims);
    env.push(("RUST_LOG".into(), "trace".into()));
    let state = state_path();
    let mut seen = String::new();
    for _ in 0..8 {
        let run = oppsync(&["sync", "--state", s(&state)], &env).await;
        seen.push_str(&run.stdout);
        seen.push_str(&run.stderr);
        if run.code == 0 || run.code == 1 {
            break;
        }
    }
    for args in [
        vec!["errors", "--state", s(&state)],
        vec!["errors", "--export", "csv", "--state", s(&state)],
        vec!["status", "--state", s(&state)],
    ] {
        let run = oppsync(&args, &env).await;
        seen.push_str(&run.stdout);
        seen.push_str(&run.stderr);
    }
    assert!(
        seen.contains("1003"),
        "the ledger was read: {}",
        &seen[seen.len().saturating_sub(2000)..]
    );
    let mut personal: Vec<String> = vec!["not-an-address.secret-person".into()];
    for (_, row) in sims.dv.rows(Table::Contacts) {
        for attr in ["emailaddress1", "firstname", "lastname"] {
            if let Some(v) = row.attributes.get(attr).and_then(serde_json::Value::as_str)
                && v.len() >= 4
            {
                personal.push(v.to_owned());
            }
        }
    }
    let (_, _, dynamics_secret) = sims.dv.credentials();
    personal.push(dynamics_secret);
    personal.push(sims.mk.client_secret());
    assert!(seen.contains("is not a valid address"), "the broken email was met");
    assert!(seen.contains("duplicate-lead"), "the duplicate leads were met");
    let leaked: Vec<&String> = personal.iter().filter(|p| seen.contains(p.as_str())).collect();
    assert!(
        leaked.is_empty(),
        "{} of {} personal values or secrets appear in the output, e.g. {:?}",
        leaked.len(),
        personal.len(),
        leaked.iter().take(3).collect::<Vec<_>>()
    );
}

/// The row: a garbage stored cursor was blamed on Dataverse ("not OData JSON") and
/// stopped every run. A cursor that cannot be read is only a lost bookmark: the run reads the
/// tables afresh (as after an expired token) and goes on. A cursor of another environment means
/// the state belongs to another Dynamics: refused, named, with the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_stored_cursor_is_read_afresh_and_another_environments_is_refused() {
    let sims = sims().await;
    let seeded = sims.dv.seed(12, 47, Mix::Uniform);
    let env = env_for(&sims);
    let (state, _) = synced_state(&env).await;
    let set_cursors = |value: &str| {
        let conn = rusqlite::Connection::open(&state).unwrap();
        let n = conn
            .execute(
                "UPDATE cursors SET value = ?1 WHERE source IN ('opportunities', 'connections')",
                [value],
            )
            .unwrap();
        assert_eq!(n, 2);
    };
    set_cursors("garbage \u{1b}[31m not a link");
    sims.dv.upsert(
        oppsync_simulators::dataverse::Table::Opportunities,
        &seeded.opportunities[3],
        serde_json::json!({"estimatedvalue": 31337}),
        &[],
    );
    let run = oppsync(&["sync", "--state", s(&state)], &env).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(!run.stderr.contains("OData"), "{run:?}");
    assert!(
        run.stderr.contains("stored change-tracking cursor") && run.stderr.contains("reading"),
        "{run:?}"
    );
    assert!(!run.stderr.contains('\u{1b}'), "the value is not echoed raw: {run:?}");
    assert_marketo_matches_dynamics(&sims);
    // Read afresh, the cursor is good again: the next run reads only changes.
    let run = oppsync(&["sync", "--state", s(&state)], &env).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("sync: 0 changes read"), "{run:?}");

    set_cursors("https://other.crm.dynamics.com/api/data/v9.2/opportunities?$deltatoken=919042");
    let requests = sims.dv.requests();
    let run = oppsync(&["sync", "--state", s(&state)], &env).await;
    assert_eq!(run.code, 3, "{run:?}");
    assert!(
        run.stderr.contains("other.crm.dynamics.com")
            && run.stderr.contains("another Dynamics environment")
            && run.stderr.contains("Fix"),
        "{run:?}"
    );
    assert!(!run.stderr.contains("deltatoken"), "{run:?}");
    // Nothing was read from Dataverse with the foreign link.
    assert!(sims.dv.requests() - requests <= 1, "{}", sims.dv.requests() - requests);
}
