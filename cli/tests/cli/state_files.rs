//! Other people's files and oppsync's own: a state file is oppsync's or it is refused
//! untouched, each failure is named with its fix, read-only commands create and change
//! nothing, and the demo neither reuses an old state nor leaves one behind.

use std::path::{Path, PathBuf};
use std::time::Duration;

use oppsync_simulators::dataverse::{Mix, Table};
use oppsync_tests::harness::sims;

use crate::common::*;

fn dir() -> PathBuf {
    oppsync_tests::harness::scratch_dir("state-files")
}

fn contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
    oppsync_tests::harness::dir_contents(dir)
}

fn names(dir: &Path) -> Vec<String> {
    contents(dir).into_iter().map(|(name, _)| name).collect()
}

/// A table in a SQLite file, as another program writes it.
fn sqlite(path: &Path, sql: &str) {
    rusqlite::Connection::open(path).unwrap().execute_batch(sql).unwrap();
}

/// The row: `status` or `validate` on another program's SQLite file added oppsync's
/// tables, switched it to WAL and said PASS. Every command now refuses it as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_programs_sqlite_file_is_refused_untouched_by_every_command() {
    let sims = sims().await;
    let env = env_for(&sims);
    let dir = dir();
    let notes = dir.join("notes.db");
    sqlite(
        &notes,
        "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT); INSERT INTO notes (body) VALUES ('keep me');",
    );
    let before = contents(&dir);
    for command in ["status", "errors", "plan", "sync", "resync"] {
        let mut args = vec![command, "--state", s(&notes)];
        if command == "resync" {
            args.push("--all");
        }
        let run = oppsync(&args, &env).await;
        assert_eq!(run.code, 2, "{command}: {run:?}");
        assert!(
            run.stderr.contains("notes.db")
                && run.stderr.contains("not oppsync's")
                && run.stderr.contains("notes")
                && run.stderr.contains("Fix:"),
            "{command}: {run:?}"
        );
        assert_eq!(contents(&dir), before, "{command} changed the directory");
    }
    assert_eq!(
        sims.dv.requests(),
        0,
        "a refused state is found before Dynamics is read"
    );
    let run = oppsync(&["validate", "--state", s(&notes)], &env).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stdout.contains("FAIL  state") && run.stdout.contains("not oppsync's"),
        "{run:?}"
    );
    assert_eq!(contents(&dir), before, "validate changed the directory");
}

/// The issue's row: every state-file failure ended "check that the directory exists and is
/// writable". Each now says which it is and its own fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_unusable_state_file_says_which_failure_it_is_and_the_fix() {
    let sims = sims().await;
    let env = env_for(&sims);
    sims.dv.seed(60, 43, Mix::Uniform);
    let dir = dir();
    let synced = dir.join("synced.db");
    let run = oppsync(&["sync", "--state", s(&synced)], &env).await;
    assert_eq!(run.code, 0, "{run:?}");
    let bytes = std::fs::read(&synced).unwrap();

    let text = dir.join("notes.txt");
    std::fs::write(
        &text,
        "some notes, not a database; long enough to hold a header. ".repeat(3),
    )
    .unwrap();
    let truncated = dir.join("truncated.db");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let newer = dir.join("newer.db");
    std::fs::write(&newer, &bytes).unwrap();
    sqlite(&newer, "PRAGMA user_version = 99;");
    let sub = dir.join("a-directory");
    std::fs::create_dir(&sub).unwrap();
    let missing_dir = dir.join("no-such-dir").join("state.db");

    let cases: [(&Path, i32, &str, &str); 5] = [
        (
            &text,
            2,
            "not a SQLite database",
            "point --state at oppsync's state file",
        ),
        (&truncated, 3, "truncated", "restore it from a backup"),
        (&newer, 2, "newer oppsync (state schema 99", "run that version"),
        (&sub, 2, "is a directory", "a-directory/oppsync.db"),
        (
            &missing_dir,
            2,
            "no-such-dir is not an existing directory",
            "create the directory",
        ),
    ];
    for (path, code, what, fix) in cases {
        for command in ["status", "sync"] {
            let before = contents(&dir);
            let run = oppsync(&[command, "--state", s(path)], &env).await;
            assert_eq!(run.code, code, "{command} {}: {run:?}", path.display());
            assert!(
                run.stderr.contains(what) && run.stderr.contains(fix),
                "{command} {}: {run:?}",
                path.display()
            );
            assert!(!run.stderr.contains("is writable"), "{run:?}");
            assert_eq!(
                contents(&dir),
                before,
                "{command} {} changed the directory",
                path.display()
            );
        }
    }
}

/// A file an older oppsync wrote before state files were marked: read-only commands name the
/// schema and the upgrade, and `sync` upgrades it in place, keeping what it held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_state_file_is_named_and_upgraded_by_sync() {
    let sims = sims().await;
    let env = env_for(&sims);
    sims.dv.seed(20, 42, Mix::Uniform);
    let dir = dir();
    let old = dir.join("old.db");
    sqlite(
        &old,
        &format!(
            "{}
{}",
            oppsync_tests::harness::FIRST_STATE_SCHEMA,
            oppsync_tests::harness::FIRST_OPPORTUNITIES_TABLE
        ),
    );
    let before = contents(&dir);
    let run = oppsync(&["status", "--state", s(&old)], &[]).await;
    assert_eq!(run.code, 3, "{run:?}");
    assert!(
        run.stderr.contains("older oppsync (state schema 0")
            && run.stderr.contains("`oppsync sync` brings it up to date"),
        "{run:?}"
    );
    assert_eq!(contents(&dir), before);
    let run = oppsync(&["validate", "--state", s(&old)], &env).await;
    assert!(
        run.stdout.contains("PASS  state") && run.stdout.contains("older oppsync"),
        "{run:?}"
    );
    let run = oppsync(&["sync", "--state", s(&old)], &env).await;
    assert_eq!(run.code, 0, "{run:?}");
    let status = oppsync(&["status", "--json", "--state", s(&old)], &[]).await;
    assert_eq!(status.code, 0, "{status:?}");
    assert!(status.json()["counts"]["synced"].as_u64().unwrap() > 0, "{status:?}");
}

/// The row: `plan` ("writes nothing") created the state file and freed claims. The
/// read-only commands now create nothing and leave oppsync's file byte for byte as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_commands_create_nothing_and_change_nothing() {
    let sims = sims().await;
    let env = env_for(&sims);
    sims.dv.seed(20, 40, Mix::Uniform);
    let dir = dir();
    let state = dir.join("state.db");
    let run = oppsync(&["plan", "--state", s(&state)], &env).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("would change in Marketo"), "{run:?}");
    assert_eq!(names(&dir), Vec::<String>::new(), "plan created a file");
    for command in ["status", "errors"] {
        let run = oppsync(&[command, "--state", s(&state)], &[]).await;
        assert_eq!(run.code, 2, "{command}: {run:?}");
        assert!(run.stderr.contains("no state file there yet"), "{run:?}");
    }
    let run = oppsync(&["validate", "--state", s(&state)], &env).await;
    assert!(run.stdout.contains("does not exist yet"), "{run:?}");
    assert_eq!(names(&dir), Vec::<String>::new(), "a read-only command created a file");

    let run = oppsync(&["sync", "--state", s(&state)], &env).await;
    assert_eq!(run.code, 0, "{run:?}");
    let seeded = sims.dv.seed(20, 41, Mix::Uniform);
    sims.dv.upsert(
        Table::Opportunities,
        &seeded.opportunities[0],
        serde_json::json!({"estimatedvalue": 4.5}),
        &[],
    );
    let before = contents(&dir);
    for args in [
        vec!["status", "--state", s(&state)],
        vec!["errors", "--state", s(&state)],
        vec!["plan", "--state", s(&state)],
        vec!["plan", "--all", "--state", s(&state)],
        vec!["validate", "--state", s(&state)],
    ] {
        let run = oppsync(&args, &env).await;
        assert_eq!(run.code, 0, "{args:?}: {run:?}");
        assert_eq!(contents(&dir), before, "{args:?} changed the state");
    }
}

/// The rows: `demo --state F` run twice failed on the first run's stored cursor, and
/// each demo left a 12.7 MB state file in the temporary directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_refuses_a_used_state_and_leaves_no_temporary_file() {
    let dir = dir();
    let tmp = dir.join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let env = vec![("TMPDIR".to_owned(), s(&tmp).to_owned())];
    let run = oppsync(&["demo", "--opportunities", "60"], &env).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("removed at the end"), "{run:?}");
    assert_eq!(names(&tmp), Vec::<String>::new(), "the demo left its state behind");

    let kept = dir.join("demo.db");
    let run = oppsync(&["demo", "--opportunities", "60", "--state", s(&kept)], &env).await;
    assert_eq!(run.code, 0, "{run:?}");
    let before = contents(&dir);
    let again = oppsync(&["demo", "--opportunities", "60", "--state", s(&kept)], &env).await;
    assert_eq!(again.code, 2, "{again:?}");
    assert!(
        again.stderr.contains("holds an earlier run's state") && again.stderr.contains("Fix:"),
        "{again:?}"
    );
    assert_eq!(contents(&dir), before, "the refused demo changed the kept state");
    let status = oppsync(&["status", "--json", "--state", s(&kept)], &[]).await;
    assert_eq!(status.code, 0, "{status:?}");
}

/// The row: a demo stopped by SIGINT or SIGTERM kept its lease, and a re-run read
/// nothing. A stopped demo now removes its temporary state, releases the lease of a kept one,
/// and exits with the signal's conventional code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_demo_cleans_up_and_holds_no_lease() {
    let dir = dir();
    let tmp = dir.join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let kept = dir.join("kept.db");
    for (signal, code, state) in [("INT", 130, None), ("TERM", 143, Some(&kept))] {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_oppsync"));
        command
            .args(["demo", "--opportunities", "20000"])
            .env_clear()
            .env("TMPDIR", &tmp)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        if let Some(state) = state {
            command.arg("--state").arg(state);
        }
        let child = command.spawn().unwrap();
        // Stopped while it writes: once the poll recorded the changes.
        let file = state.cloned().unwrap_or_else(|| tmp.clone());
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while !(recorded(&file) || std::time::Instant::now() > deadline) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(recorded(&file), "the demo never recorded a change");
        send_signal(&child, signal);
        let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "SIG{signal}: {stderr}");
        assert!(stderr.contains(&format!("stopped by SIG{signal}")), "{stderr}");
        assert_eq!(
            names(&tmp),
            Vec::<String>::new(),
            "SIG{signal} left the temporary state"
        );
    }
    // The kept state holds no live lease or claim of the stopped run's.
    let conn = rusqlite::Connection::open_with_flags(&kept, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let now = oppsync_pipeline::system_clock()();
    let live: i64 = conn
        .query_row("SELECT COUNT(*) FROM leases WHERE expires_at > ?1", [now], |r| r.get(0))
        .unwrap();
    let claimed: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM opportunities WHERE claim_until IS NOT NULL AND claim_until > ?1",
            [now],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!((live, claimed), (0, 0));
}

/// Whether the demo's state (the file, or the only one in a directory) holds records.
fn recorded(path: &Path) -> bool {
    let file = if path.is_dir() {
        match std::fs::read_dir(path)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "db"))
        {
            Some(file) => file,
            None => return false,
        }
    } else {
        path.to_path_buf()
    };
    let Ok(conn) = rusqlite::Connection::open_with_flags(&file, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return false;
    };
    conn.query_row("SELECT COUNT(*) FROM opportunities", [], |r| r.get::<_, i64>(0))
        .is_ok_and(|n| n > 0)
}

/// The row: one stored plan that could not be read stopped every later `plan` and
/// `sync` on that record, with no way past it. It is now quarantined as failed with the
/// reason (in `errors`), the rest of the run goes on, and `resync` writes it afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_whose_stored_state_cannot_be_read_is_quarantined_and_replayable() {
    let sims = sims().await;
    let env = env_for(&sims);
    let seeded = sims.dv.seed(20, 44, Mix::Uniform);
    let state = state_path();
    let run = oppsync(&["sync", "--state", s(&state)], &env).await;
    assert_eq!(run.code, 0, "{run:?}");
    let (bad, good) = (&seeded.opportunities[3], &seeded.opportunities[4]);
    let changed = rusqlite::Connection::open(&state)
        .unwrap()
        .execute(
            "UPDATE opportunities SET plan = '{\"action\": [broken', written = 'not json' WHERE id = ?1",
            [bad],
        )
        .unwrap();
    assert_eq!(changed, 1);
    for id in [bad, good] {
        sims.dv.upsert(
            Table::Opportunities,
            id,
            serde_json::json!({"estimatedvalue": 777.25}),
            &[],
        );
    }

    let run = oppsync(&["plan", "--state", s(&state)], &env).await;
    assert_eq!(run.code, 0, "plan stops on the record: {run:?}");
    let run = oppsync(&["sync", "--state", s(&state)], &env).await;
    assert_eq!(run.code, 1, "one record failed permanently: {run:?}");
    let amount = |id: &str| sims.mk.snapshot().opportunities[id].get("amount").cloned();
    assert_eq!(
        amount(good),
        Some(serde_json::json!(777.25)),
        "the run went on past the bad record"
    );
    let errors = oppsync(&["errors", "--export", "json", "--state", s(&state)], &[]).await;
    let rows = errors.json();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{errors:?}");
    assert_eq!(rows[0]["id"], serde_json::json!(bad));
    assert_eq!(rows[0]["code"], serde_json::json!("unreadable-state"));
    let message = rows[0]["message"].as_str().unwrap();
    assert!(
        message.contains("stored plan cannot be read")
            && message.contains("what was written cannot be read")
            && message.contains("oppsync resync"),
        "{message}"
    );

    let run = oppsync(&["sync", "--state", s(&state)], &env).await;
    assert_eq!(run.code, 0, "a later sync is not stopped by it: {run:?}");
    let run = oppsync(&["resync", bad, "--state", s(&state)], &env).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(amount(bad), Some(serde_json::json!(777.25)));
    let status = oppsync(&["status", "--json", "--state", s(&state)], &[]).await.json();
    assert_eq!(status["counts"]["failed"], serde_json::json!(0), "{status}");
}
