//! Every command doing its job.

use oppsync_marketo::Operation as E;
use oppsync_simulators::MarketoFault;
use oppsync_simulators::dataverse::{Mix, Table};
use oppsync_tests::harness::{assert_marketo_matches_dynamics, dynamo, moto_endpoint, sims};
use serde_json::json;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_has_help_and_the_exit_codes_are_documented() {
    let top = oppsync(&["--help"], &[]).await;
    assert_eq!(top.code, 0, "{top:?}");
    assert!(top.stdout.contains("Exit codes"), "{top:?}");
    for command in [
        "demo", "sync", "plan", "resync", "status", "errors", "validate", "sandbox", "fields", "runs",
    ] {
        let run = oppsync(&[command, "--help"], &[]).await;
        assert_eq!(run.code, 0, "{command}: {run:?}");
        assert!(run.stdout.contains("Usage: oppsync"), "{command}: {run:?}");
        assert!(top.stdout.contains(command), "`oppsync --help` lists {command}");
    }
    let unknown = oppsync(&["synk"], &[]).await;
    assert_eq!(unknown.code, 2, "{unknown:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_to_a_passing_end_state() {
    let state = state_path();
    let run = oppsync(&["demo", "--opportunities", "400", "--state", s(&state)], &[]).await;
    assert_eq!(run.code, 0, "{run:?}");
    for expected in [
        "initial sync:",
        "incremental sync:",
        "Marketo calls:",
        "Records by status:",
        "PASS",
    ] {
        assert!(run.stdout.contains(expected), "the demo prints {expected}: {run:?}");
    }
    assert!(run.stdout.contains("deleted"), "{run:?}");
    assert!(run.stdout.contains("filtered"), "{run:?}");
    // The state it used is a real SQLite file the other commands read.
    let status = oppsync(&["status", "--json", "--state", s(&state)], &[]).await;
    assert_eq!(status.code, 0, "{status:?}");
    assert_eq!(status.json()["counts"]["deleted"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_once_writes_everything_then_nothing_and_status_shows_it() {
    let sims = sims().await;
    sims.dv.seed(120, 31, Mix::Realistic);
    let env = env_for(&sims);
    let state = state_path();
    let first = oppsync(&["sync", "--once", "--state", s(&state)], &env).await;
    assert_eq!(first.code, 0, "{first:?}");
    assert!(first.stdout.contains("120 written"), "{first:?}");
    assert_marketo_matches_dynamics(&sims);

    let calls = sims.mk.rest_calls();
    let second = oppsync(&["sync", "--state", s(&state)], &env).await;
    assert_eq!(second.code, 0, "{second:?}");
    assert!(second.stdout.contains("0 written"), "{second:?}");
    assert_eq!(sims.mk.rest_calls(), calls, "nothing changed, nothing written");

    let status = oppsync(&["status", "--json", "--state", s(&state)], &[]).await;
    let view = status.json();
    assert_eq!(view["counts"]["synced"], 120, "{view}");
    assert_eq!(view["oldest_pending"], json!(null));
    assert!(view["last_hour_completed"].as_u64().unwrap() >= 120, "{view}");
    assert!(view["cursors"]["opportunities"]["age_seconds"].as_i64().unwrap() < 60);
    assert!(view["marketo"]["calls_today"].as_u64().unwrap() >= calls, "{view}");
    assert_eq!(view["marketo"]["daily_budget"], 40_000);
    let human = oppsync(&["status", "--state", s(&state)], &[]).await;
    assert!(
        human.stdout.contains("synced") && human.stdout.contains("Marketo calls today"),
        "{human:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_left_for_retry_exit_4_saying_how_many_and_why_and_the_next_run_writes_them() {
    let sims = sims().await;
    let seeded = sims.dv.seed(20, 33, Mix::Uniform);
    let flaky = seeded.opportunities[5].clone();
    // 1014 "Failed to create Object": a record-level failure that a retry may get past.
    sims.mk.skip_record(&flaky, "1014", 1000);
    let env = env_for(&sims);
    let state = state_path();
    let run = oppsync(&["sync", "--state", s(&state)], &env).await;
    assert_eq!(run.code, 4, "{run:?}");
    assert!(
        run.stdout.contains("19 written") && run.stdout.contains("1 left for retry"),
        "{run:?}"
    );
    assert!(run.stdout.contains("1 × opportunities.sync 1014"), "{run:?}");
    let status = oppsync(&["status", "--json", "--state", s(&state)], &[]).await;
    assert_eq!(status.json()["counts"]["ready"], 1, "{status:?}");
    sims.mk.clear_faults();
    let again = oppsync(&["sync", "--state", s(&state)], &env).await;
    assert_eq!(again.code, 0, "{again:?}");
    assert!(
        again.stdout.contains("1 written") && again.stdout.contains("0 left for retry"),
        "{again:?}"
    );
    assert_marketo_matches_dynamics(&sims);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_exits_1_and_is_in_the_searchable_exportable_error_ledger() {
    let sims = sims().await;
    let seeded = sims.dv.seed(20, 32, Mix::Uniform);
    let bad = seeded.opportunities[3].clone();
    sims.mk.skip_record(&bad, "1003", 100);
    let env = env_for(&sims);
    let state = state_path();
    let run = oppsync(&["sync", "--state", s(&state)], &env).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stdout.contains(&bad) && run.stdout.contains("1003"), "{run:?}");

    let errors = oppsync(&["errors", "--state", s(&state)], &[]).await;
    assert_eq!(errors.code, 0, "{errors:?}");
    assert!(
        errors.stdout.contains(&bad) && errors.stdout.contains("1 failed records"),
        "{errors:?}"
    );
    let csv = oppsync(&["errors", "--export", "csv", "--state", s(&state)], &[]).await;
    let lines: Vec<&str> = csv.stdout.lines().collect();
    assert_eq!(lines[0], "id,operation,code,message,attempts,last_try");
    assert_eq!(lines.len(), 2, "{csv:?}");
    assert!(
        lines[1].starts_with(&format!("{bad},opportunities.sync,1003,")),
        "{csv:?}"
    );
    let json = oppsync(
        &["errors", "--export", "json", "--search", "1003", "--state", s(&state)],
        &[],
    )
    .await;
    assert_eq!(json.json().as_array().unwrap().len(), 1);
    // The cause is fixed: a dry run counts the failed records and writes nothing; the replay
    // writes each, and the ledger is empty.
    sims.mk.clear_faults();
    let calls = sims.mk.rest_calls();
    let dry = oppsync(&["resync", "--failed", "--dry-run", "--state", s(&state)], &env).await;
    assert_eq!(dry.code, 0, "{dry:?}");
    assert!(
        dry.stdout
            .starts_with("1 records to resync (failed); a dry run writes nothing")
            && dry.stdout.contains(&bad),
        "{dry:?}"
    );
    assert_eq!(sims.mk.rest_calls(), calls, "a dry run makes no Marketo call");
    let replay = oppsync(&["resync", "--failed", "--state", s(&state)], &env).await;
    assert_eq!(replay.code, 0, "{replay:?}");
    assert!(replay.stdout.contains(&format!("{bad} synced")), "{replay:?}");
    let after = oppsync(&["errors", "--export", "json", "--state", s(&state)], &[]).await;
    assert_eq!(after.json(), json!([]), "nothing failed is left");
    assert_marketo_matches_dynamics(&sims);
    let none = oppsync(
        &[
            "errors",
            "--export",
            "json",
            "--search",
            "no-such-code",
            "--state",
            s(&state),
        ],
        &[],
    )
    .await;
    assert_eq!(none.json(), json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_shows_the_diff_and_writes_nothing_and_moves_no_cursor() {
    let sims = sims().await;
    let seeded = sims.dv.seed(30, 33, Mix::Uniform);
    let env = env_for(&sims);
    let state = state_path();
    assert_eq!(oppsync(&["sync", "--state", s(&state)], &env).await.code, 0);
    let changed = seeded.opportunities[5].clone();
    sims.dv
        .upsert(Table::Opportunities, &changed, json!({"estimatedvalue": 777.25}), &[]);
    let before = oppsync(&["status", "--json", "--state", s(&state)], &[]).await.json();
    let calls = sims.mk.rest_calls();

    let plan = oppsync(&["plan", "--state", s(&state)], &env).await;
    assert_eq!(plan.code, 0, "{plan:?}");
    assert!(plan.stdout.contains(&format!("~ {changed} (update)")), "{plan:?}");
    assert!(
        plan.stdout.contains("amount:") && plan.stdout.contains("→ 777.25"),
        "{plan:?}"
    );
    assert!(plan.stdout.contains("1 of 1 opportunities would change"), "{plan:?}");
    let json = oppsync(&["plan", "--json", "--state", s(&state)], &env).await.json();
    assert_eq!(json["changes"][0]["id"], json!(changed));
    assert_eq!(json["changes"][0]["fields"]["amount"]["to"], json!(777.25));
    // The owner, as the sales person the opportunity names.
    let owner = sims.dv.row(Table::Opportunities, &changed).unwrap().attributes["_ownerid_value"].clone();
    assert_eq!(json["changes"][0]["sales_person"], owner);
    assert!(
        plan.stdout
            .contains(&format!("sales person: {}", owner.as_str().unwrap())),
        "{plan:?}"
    );

    assert_eq!(sims.mk.rest_calls(), calls, "plan makes no Marketo write");
    let after = oppsync(&["status", "--json", "--state", s(&state)], &[]).await.json();
    assert_eq!(before["counts"], after["counts"]);
    assert_eq!(
        before["cursors"]["opportunities"]["updated"],
        after["cursors"]["opportunities"]["updated"]
    );
    // And the change is still there for the sync.
    let sync = oppsync(&["sync", "--state", s(&state)], &env).await;
    assert!(sync.stdout.contains("1 written"), "{sync:?}");
    let all = oppsync(&["plan", "--all", "--json", "--state", s(&state)], &env)
        .await
        .json();
    assert_eq!(
        (all["examined"].as_u64(), all["unchanged"].as_u64()),
        (Some(30), Some(30))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_writes_named_records_again_and_a_dry_run_writes_nothing() {
    let sims = sims().await;
    let seeded = sims.dv.seed(10, 34, Mix::Uniform);
    let env = env_for(&sims);
    let state = state_path();
    assert_eq!(oppsync(&["sync", "--state", s(&state)], &env).await.code, 0);
    let id = seeded.opportunities[2].clone();
    let calls = sims.mk.calls(E::OpportunitySync);
    let dry = oppsync(&["resync", &id, "--dry-run", "--state", s(&state)], &env).await;
    assert_eq!(dry.code, 0, "{dry:?}");
    assert!(dry.stdout.contains("nothing written (dry run)"), "{dry:?}");
    assert_eq!(sims.mk.calls(E::OpportunitySync), calls);
    let run = oppsync(&["resync", &id, "--json", "--state", s(&state)], &env).await;
    assert_eq!(run.code, 0, "{run:?}");
    let report = run.json();
    assert_eq!(report["records"][0]["write"]["outcome"], "synced", "{report}");
    assert_eq!(
        sims.mk.calls(E::OpportunitySync),
        calls + 1,
        "written again though unchanged"
    );
    // A retryable Marketo failure that outlasts the retries exits 1.
    for n in 1..=10 {
        sims.mk
            .inject(E::OpportunitySync, calls + 1 + n, MarketoFault::Http(503));
    }
    let failing = oppsync(&["resync", &id, "--state", s(&state)], &env).await;
    assert_eq!(failing.code, 1, "{failing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_of_an_id_dynamics_does_not_have_deletes_only_what_oppsync_wrote() {
    let sims = sims().await;
    let seeded = sims.dv.seed(10, 36, Mix::Uniform);
    let env = env_for(&sims);
    let state = state_path();
    assert_eq!(oppsync(&["sync", "--state", s(&state)], &env).await.code, 0);
    let before = sims.mk.rest_calls();
    let counts = |v: &serde_json::Value| v["counts"].clone();
    let status_before = oppsync(&["status", "--json", "--state", s(&state)], &[]).await.json();
    // An id nobody has: a typo, or another system's record.
    let typo = "0b000000-0000-4000-8000-00000000ffff";
    let dry = oppsync(&["resync", typo, "--dry-run", "--state", s(&state)], &env).await;
    assert_eq!(dry.code, 1, "{dry:?}");
    assert!(dry.stdout.contains("not found in Dynamics"), "{dry:?}");
    let run = oppsync(&["resync", typo, "--state", s(&state)], &env).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stdout.contains("not found in Dynamics"), "{run:?}");
    assert!(run.stderr.contains("never written by oppsync"), "{run:?}");
    assert_eq!(sims.mk.rest_calls(), before, "nothing sent to Marketo");
    let status_after = oppsync(&["status", "--json", "--state", s(&state)], &[]).await.json();
    assert_eq!(counts(&status_after), counts(&status_before), "nothing stored");
    // One oppsync wrote and Dynamics no longer has: a deletion, named as one.
    let gone = seeded.opportunities[4].clone();
    sims.dv.delete(Table::Opportunities, &gone);
    let dry = oppsync(&["resync", &gone, "--dry-run", "--state", s(&state)], &env).await;
    assert_eq!(dry.code, 0, "{dry:?}");
    assert!(dry.stdout.contains("would delete from Marketo"), "{dry:?}");
    let kept = seeded.opportunities[5].clone();
    let dry = oppsync(&["resync", &kept, "--dry-run", "--state", s(&state)], &env).await;
    assert!(dry.stdout.contains("would write"), "{dry:?}");
    let run = oppsync(&["resync", &gone, "--state", s(&state)], &env).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("deleted"), "{run:?}");
    assert!(!sims.mk.snapshot().opportunities.contains_key(&gone));
}

/// GIVEN Dynamics with a custom `new_region` column and a Marketo with a custom `region` field
/// WHEN `oppsync fields --write x.toml` runs THEN it shows both sides with the suggestion, the
/// file maps region from new_region, `oppsync validate --config x.toml` passes, and a sync with
/// it carries each opportunity's region into Marketo. An existing file is never overwritten
/// (exit 2) and a run that fails leaves no file behind (exit 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_writes_a_configuration_that_validate_accepts_and_sync_uses() {
    let sims = sims().await;
    sims.mk
        .configure(|c| c.custom_opportunity_fields = vec!["region".into()]);
    sims.dv.seed(20, 36, Mix::Realistic);
    let env = env_for(&sims);
    let path = std::env::temp_dir().join(format!("{}.toml", oppsync_tests::harness::unique("fields")));
    let run = oppsync(&["fields", "--write", s(&path)], &env).await;
    assert_eq!(run.code, 0, "{run:?}");
    for shown in [
        "externalOpportunityId      string    <- opportunityid",
        "externalSalesPersonId",
        "region                     string    <- new_region",
        "matching names, custom",
        "A sync filter column was found: new_synctomkto",
    ] {
        assert!(run.stdout.contains(shown), "{shown}: {}", run.stdout);
    }
    let written = std::fs::read_to_string(&path).unwrap();
    assert!(
        written.contains("marketo = \"region\"\ndataverse = \"new_region\"\ntype = \"string\""),
        "{written}"
    );
    let validate = oppsync(&["validate", "--config", s(&path), "--state", s(&state_path())], &env).await;
    assert_eq!(validate.code, 0, "{validate:?}");
    assert!(
        validate
            .stdout
            .contains("PASS  Marketo fields: all 11 mapped fields exist"),
        "{validate:?}"
    );
    let state = state_path();
    let sync = oppsync(&["sync", "--config", s(&path), "--state", s(&state)], &env).await;
    assert_eq!(sync.code, 0, "{sync:?}");
    let regions = sims
        .mk
        .snapshot()
        .opportunities
        .values()
        .filter(|o| {
            o.get("region")
                .and_then(|r| r.as_str())
                .is_some_and(|r| ["EMEA", "AMER", "APAC"].contains(&r))
        })
        .count();
    assert_eq!(regions, 20, "every opportunity's region reached Marketo");

    // Never over an existing file: refused before anything is read, the file as it was.
    let again = oppsync(&["fields", "--write", s(&path)], &env).await;
    assert_eq!(again.code, 2, "{again:?}");
    assert!(again.stderr.contains("never overwrites"), "{again:?}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), written);
    // A run that cannot read Dynamics writes nothing, and leaves no empty file.
    let fresh = path.with_extension("second.toml");
    let mut bad = env.clone();
    for (k, v) in bad.iter_mut() {
        if k == "DYNAMICS_CLIENT_SECRET" {
            *v = "wrong".into();
        }
    }
    let failed = oppsync(&["fields", "--write", s(&fresh)], &bad).await;
    assert_eq!(failed.code, 3, "{failed:?}");
    assert!(failed.stderr.contains("Dynamics"), "{failed:?}");
    assert!(!fresh.exists(), "no file left behind");
    // The JSON form holds both sides and the suggestion.
    let json = oppsync(&["fields", "--json"], &env).await.json();
    assert!(
        json["dataverse"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "new_region" && c["custom"] == true)
    );
    assert!(
        json["marketo"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["name"] == "region")
    );
    assert!(
        json["suggestion"]["pairs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["marketo"] == "region" && p["why"] == "name")
    );
    let _ = std::fs::remove_file(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_passes_against_good_systems_and_names_each_problem_with_its_fix() {
    let sims = sims().await;
    sims.dv.seed(5, 35, Mix::Uniform);
    let env = env_for(&sims);
    let ok = oppsync(&["validate", "--state", s(&state_path())], &env).await;
    assert_eq!(ok.code, 0, "{ok:?}");
    assert!(
        ok.stdout.contains("PASS  Dynamics change tracking on connection"),
        "{ok:?}"
    );
    assert!(ok.stdout.contains("PASS  Marketo opportunity writes"), "{ok:?}");
    assert!(ok.stdout.contains("PASS  Dynamics read systemusers"), "{ok:?}");
    // Without Read on User: a warning with the fix, not a failure (the sync runs without the
    // sales persons' emails and names).
    sims.dv.configure(|c| c.forbidden = vec![Table::SystemUsers]);
    let warned = oppsync(&["validate", "--state", s(&state_path())], &env).await;
    assert_eq!(warned.code, 0, "{warned:?}");
    assert!(
        warned.stdout.contains("WARN  Dynamics read systemusers") && warned.stdout.contains("Read on User"),
        "{warned:?}"
    );
    sims.dv.configure(|c| c.forbidden = Vec::new());

    sims.dv.configure(|c| c.untracked = vec![Table::Connections]);
    let config =
        config_file("[[mapping.fields]]\nmarketo = \"region\"\ndataverse = \"new_region\"\ntype = \"string\"\n");
    let run = oppsync(&["validate", "--json", "--config", s(&config)], &env).await;
    assert_eq!(run.code, 1, "{run:?}");
    let checks = run.json();
    let failed: Vec<&str> = checks["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == json!(false))
        .map(|c| c["check"].as_str().unwrap())
        .collect();
    assert_eq!(
        failed,
        vec!["Dynamics change tracking on connection", "Marketo fields"],
        "{checks}"
    );
    let text = checks.to_string();
    assert!(text.contains("region") && text.contains("Track changes"), "{text}");

    sims.mk.configure(|c| c.crm_enabled = true);
    let blocked = oppsync(&["validate"], &env).await;
    assert!(
        blocked.stdout.contains("FAIL  Marketo opportunity writes"),
        "{blocked:?}"
    );
}

/// GIVEN opportunities in two transaction currencies WHEN validate runs on the default mapping
/// (amount from estimatedvalue) THEN it warns and names the base-currency mapping, without
/// failing; with that mapping it passes, and a sync writes each amount in the base currency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_currencies_are_reported_and_the_base_currency_amount_can_be_mapped() {
    let sims = sims().await;
    let seeded = sims.dv.seed(6, 37, Mix::Uniform);
    let env = env_for(&sims);
    let one = oppsync(&["validate", "--state", s(&state_path())], &env).await;
    assert!(
        one.stdout
            .contains("PASS  Dynamics currencies: opportunities use one transaction currency"),
        "{one:?}"
    );
    // One opportunity in euros: 1,000 EUR is 1,100 in the base currency.
    let euro = &seeded.opportunities[2];
    sims.dv.upsert(
        Table::Opportunities,
        euro,
        json!({"_transactioncurrencyid_value": "7c000000-0000-4000-8000-000000000002",
               "estimatedvalue": 1000, "estimatedvalue_base": 1100}),
        &[],
    );
    let several = oppsync(&["validate", "--state", s(&state_path())], &env).await;
    assert_eq!(several.code, 0, "a warning does not fail validate: {several:?}");
    assert!(
        several
            .stdout
            .contains("WARN  Dynamics currencies: opportunities use more than one transaction currency")
            && several.stdout.contains("estimatedvalue_base"),
        "{several:?}"
    );
    let config = config_file(
        "[[mapping.fields]]\nmarketo = \"amount\"\ndataverse = \"estimatedvalue_base\"\ntype = \"decimal\"\n",
    );
    let mapped = oppsync(&["validate", "--config", s(&config), "--state", s(&state_path())], &env).await;
    assert!(
        mapped.stdout.contains("PASS  Dynamics currencies")
            && mapped.stdout.contains("mapped from estimatedvalue_base"),
        "{mapped:?}"
    );
    let state = state_path();
    let run = oppsync(&["sync", "--config", s(&config), "--state", s(&state)], &env).await;
    assert_eq!(run.code, 0, "{run:?}");
    let amount = |id: &str| sims.mk.snapshot().opportunities[id]["amount"].as_f64();
    assert_eq!(amount(euro), Some(1100.0), "the base-currency amount");
    let other = &seeded.opportunities[0];
    let base = sims.dv.row(Table::Opportunities, other).unwrap().attributes["estimatedvalue_base"].as_f64();
    assert_eq!(amount(other), base);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_on_a_dynamodb_table() {
    let sims = sims().await;
    sims.dv.seed(25, 36, Mix::Realistic);
    let store = dynamo().await;
    let mut env = env_for(&sims);
    env.extend([
        ("AWS_ENDPOINT_URL".to_string(), moto_endpoint()),
        ("AWS_ACCESS_KEY_ID".into(), "test".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "test".into()),
        ("AWS_REGION".into(), "us-east-1".into()),
    ]);
    let run = oppsync(&["sync", "--table", store.table()], &env).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("25 written"), "{run:?}");
    assert_marketo_matches_dynamics(&sims);
    let status = oppsync(&["status", "--json", "--table", store.table()], &env).await;
    assert_eq!(status.json()["counts"]["synced"], 25, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_documents_every_command_and_exit_code() {
    let readme = std::fs::read_to_string(oppsync_tests::repo_root().join("README.md")).unwrap();
    let top = oppsync(&["--help"], &[]).await;
    let commands: Vec<&str> = top
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.len() >= 7, "{commands:?}");
    for c in commands {
        assert!(
            readme.contains(&format!("| `oppsync {c}")),
            "README's command table lacks {c}"
        );
    }
    // Every exit code `--help` names has its row in the README's table, and no other.
    let help_line = top.stdout.lines().find(|l| l.starts_with("Exit codes:")).unwrap();
    let in_help: Vec<String> = help_line
        .split(';')
        .filter_map(|part| part.split_whitespace().find(|w| w.chars().all(|c| c.is_ascii_digit())))
        .map(str::to_owned)
        .collect();
    let in_readme: Vec<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| **")?.split_once("**").map(|(c, _)| c.to_owned()))
        .collect();
    assert_eq!(in_help, ["0", "1", "2", "3", "4", "130"], "{help_line}");
    assert_eq!(in_readme, in_help, "README's exit-code table");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_reports_calls_against_the_minimum_memory_and_the_incremental_round() {
    let run = oppsync(&["bench", "--opportunities", "900", "--json"], &[]).await;
    assert_eq!(run.code, 0, "{run:?}");
    // The line scripts read, on stderr with --json (stdout is the document).
    let line = run
        .stderr
        .lines()
        .find(|l| l.starts_with("Marketo calls: ") && l.ends_with("× the minimum"))
        .unwrap_or_else(|| panic!("{run:?}"));
    let ratio: f64 = line["Marketo calls: ".len()..line.len() - "× the minimum".len()]
        .parse()
        .unwrap();
    assert!(ratio <= 1.05, "{line}");
    let report = run.json();
    assert_eq!(report["initial"]["differences"], 0, "{report}");
    assert_eq!(report["incremental"]["differences"], 0, "{report}");
    assert_eq!(report["incremental"]["changed"], 9);
    assert!(
        report["initial"]["marketo_calls"].as_u64().unwrap() >= report["initial"]["marketo_minimum"].as_u64().unwrap()
    );
    assert!(report["peak_memory_bytes"].as_u64().unwrap() > 1_000_000);
    // The incremental round against its own minimum: only what changed is written.
    let incremental = report["incremental"]["marketo_ratio"].as_f64().unwrap();
    assert!(incremental <= 1.05, "{report}");
    // A run shorter than the budget's window cannot pass the ceiling (it once said 1311%).
    let short = oppsync(
        &[
            "bench",
            "--limits",
            "--latency-ms",
            "50",
            "--opportunities",
            "300",
            "--json",
        ],
        &[],
    )
    .await;
    assert_eq!(short.code, 0, "{short:?}");
    let fraction = short.json()["limits"]["fraction_of_ceiling"].as_f64().unwrap();
    assert!(fraction > 0.0 && fraction <= 1.0, "{fraction}");
    let bad = oppsync(&["bench", "--opportunities", "10"], &[]).await;
    assert_eq!(bad.code, 2, "{bad:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_and_sync_with_a_version_watermark_instead_of_change_tracking() {
    let sims = sims().await;
    let seeded = sims.dv.seed(15, 37, Mix::Uniform);
    let env = env_for(&sims);
    let state = state_path();
    let config = config_file("[dataverse]\nchange_detection = \"versionnumber\"\n");
    let args = |cmd: &'static str| vec![cmd, "--state", s(&state), "--config", s(&config)];
    assert_eq!(oppsync(&args("sync"), &env).await.code, 0);
    let changed = seeded.opportunities[7].clone();
    sims.dv
        .upsert(Table::Opportunities, &changed, json!({"estimatedvalue": 4321.0}), &[]);
    let plan = oppsync(&[args("plan"), vec!["--json"]].concat(), &env).await.json();
    assert_eq!(plan["changes"].as_array().unwrap().len(), 1, "{plan}");
    assert_eq!(plan["changes"][0]["id"], json!(changed));
    let sync = oppsync(&args("sync"), &env).await;
    assert!(sync.stdout.contains("1 written"), "{sync:?}");
    assert_marketo_matches_dynamics(&sims);
}

/// A bench stopped by Ctrl-C says so, exits 130 and leaves no state file behind (a killed
/// bench once left a 237 MB one in the temporary directory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bench_stopped_by_ctrl_c_removes_its_state_file() {
    let tmp = oppsync_tests::harness::scratch_dir("oppsync-bench-stop");
    let bench_files = {
        let tmp = tmp.clone();
        move || -> Vec<String> {
            std::fs::read_dir(&tmp)
                .unwrap()
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("oppsync-bench-"))
                .collect()
        }
    };
    // Two seconds a Marketo call: still writing when it is stopped.
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_oppsync"));
    command
        .args(["bench", "--opportunities", "300", "--limits", "--latency-ms", "2000"])
        .env_clear()
        .env("TMPDIR", &tmp)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let child = command.spawn().unwrap();
    let started = std::time::Instant::now();
    while bench_files().is_empty() {
        assert!(started.elapsed().as_secs() < 60, "the bench made no state file");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    send_signal(&child, "INT");
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("oppsync bench: stopped by SIGINT"), "{stderr}");
    assert_eq!(bench_files(), Vec::<String>::new(), "{stderr}");
}

/// GIVEN two sync cycles (the second with a change and a record Marketo rejects), a resync and
/// a dry run WHEN `oppsync runs` is asked THEN it lists the three runs that changed something,
/// newest first, each with its counts and Marketo calls; `status` shows the last; a
/// `run_history_days` outside 1..=3650 is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_lists_each_sync_cycle_and_resync_newest_first() {
    let sims = sims().await;
    let seeded = sims.dv.seed(20, 33, Mix::Uniform);
    let env = env_for(&sims);
    let state = state_path();
    assert_eq!(oppsync(&["sync", "--state", s(&state)], &env).await.code, 0);
    let (changed, rejected) = (&seeded.opportunities[3], &seeded.opportunities[4]);
    for id in [changed, rejected] {
        sims.dv
            .upsert(Table::Opportunities, id, json!({"estimatedvalue": 31.5}), &[]);
    }
    sims.mk.skip_record(rejected, "1003", 1);
    let calls_before = sims.mk.rest_calls();
    assert_eq!(oppsync(&["sync", "--state", s(&state)], &env).await.code, 1);
    let second_calls = sims.mk.rest_calls() - calls_before;
    let dry = oppsync(&["resync", "--failed", "--dry-run", "--state", s(&state)], &env).await;
    assert_eq!(dry.code, 0, "{dry:?}");
    assert_eq!(
        oppsync(&["resync", "--failed", "--state", s(&state)], &env).await.code,
        0
    );

    let runs = oppsync(&["runs", "--json", "--state", s(&state)], &[]).await.json();
    let runs = runs.as_array().unwrap();
    let shape: Vec<(&str, u64, u64, u64)> = runs
        .iter()
        .map(|r| {
            (
                r["command"].as_str().unwrap(),
                r["read"].as_u64().unwrap(),
                r["written"].as_u64().unwrap(),
                r["failed"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        shape,
        [("resync", 1, 1, 0), ("sync", 2, 1, 1), ("sync", 20, 20, 0)],
        "{runs:?}"
    );
    assert_eq!(runs[1]["marketo_calls"].as_u64(), Some(second_calls), "{runs:?}");
    assert!(runs[0]["started"].as_i64() >= runs[1]["ended"].as_i64(), "{runs:?}");
    let text = oppsync(&["runs", "--limit", "1", "--state", s(&state)], &[]).await;
    assert_eq!(text.stdout.lines().count(), 1, "{text:?}");
    assert!(
        text.stdout.contains(" resync ") && text.stdout.contains("1 written"),
        "{text:?}"
    );
    let status = oppsync(&["status", "--state", s(&state)], &[]).await;
    assert!(
        status.stdout.contains("Last run: ") && status.stdout.contains(" resync "),
        "{status:?}"
    );
    let status = oppsync(&["status", "--json", "--state", s(&state)], &[]).await.json();
    assert_eq!(status["last_run"]["command"], "resync", "{status}");

    let config = config_file("[sync]\nrun_history_days = 0\n");
    let refused = oppsync(&["sync", "--state", s(&state), "--config", s(&config)], &env).await;
    assert_eq!(refused.code, 2, "{refused:?}");
    assert!(refused.stderr.contains("sync.run_history_days"), "{refused:?}");
}
