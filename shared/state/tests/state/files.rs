//! A state file is oppsync's or it is refused untouched, and each refusal says which failure it
//! is: not a database, a directory, truncated, read-only, another program's, a newer schema.

use std::path::{Path, PathBuf};

use oppsync_state::{FileProblem, SCHEMA_VERSION, SqliteStore, StateError, StateStore, Status};

fn dir() -> PathBuf {
    oppsync_tests::harness::scratch_dir("state-files")
}

fn contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
    oppsync_tests::harness::dir_contents(dir)
}

fn problem(result: Result<SqliteStore, StateError>) -> FileProblem {
    match result {
        Err(StateError::File { problem, .. }) => problem,
        Err(other) => panic!("expected a state-file problem, got {other}"),
        Ok(_) => panic!("expected a state-file problem, the file opened"),
    }
}

/// Both opens refuse the file, with the same problem, and leave the directory as it was.
fn refused_untouched(dir: &Path, file: &Path) -> FileProblem {
    let before = contents(dir);
    let read_write = problem(SqliteStore::open(file));
    assert_eq!(contents(dir), before, "open changed something");
    let read_only = problem(SqliteStore::open_read_only(file));
    assert_eq!(contents(dir), before, "open_read_only changed something");
    assert_eq!(read_write, read_only);
    read_write
}

fn another_programs_database(path: &Path, sql: &str) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(sql).unwrap();
}

#[test]
fn another_programs_sqlite_file_is_refused_untouched() {
    let dir = dir();
    let notes = dir.join("notes.db");
    another_programs_database(
        &notes,
        "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT); INSERT INTO notes (body) VALUES ('keep');",
    );
    let got = refused_untouched(&dir, &notes);
    assert!(
        matches!(&got, FileProblem::NotOurs(why) if why.contains("notes")),
        "{got:?}"
    );
    assert!(got.is_wrong_path());

    // Marked by its owner, even with a table name oppsync uses.
    let marked = dir.join("marked.db");
    another_programs_database(&marked, "PRAGMA application_id = 42; CREATE TABLE opportunities (x);");
    let got = refused_untouched(&dir, &marked);
    assert!(
        matches!(&got, FileProblem::NotOurs(why) if why.contains("0x0000002a")),
        "{got:?}"
    );

    // In WAL mode, as many programs keep theirs.
    let wal = dir.join("wal.db");
    another_programs_database(
        &wal,
        "PRAGMA journal_mode = WAL; CREATE TABLE t (x); INSERT INTO t VALUES (1);",
    );
    assert!(matches!(refused_untouched(&dir, &wal), FileProblem::NotOurs(_)));
}

#[test]
fn each_kind_of_unusable_path_is_named_for_what_it_is() {
    let dir = dir();
    let text = dir.join("notes.txt");
    std::fs::write(
        &text,
        "not a database at all, just some text that is long enough\n".repeat(4),
    )
    .unwrap();
    assert_eq!(refused_untouched(&dir, &text), FileProblem::NotADatabase);

    let sub = dir.join("sub");
    std::fs::create_dir(&sub).unwrap();
    let got = refused_untouched(&dir, &sub);
    assert!(matches!(&got, FileProblem::Directory(_)), "{got:?}");
    assert!(got.fix().contains("oppsync.db"), "{}", got.fix());

    let nowhere = dir.join("missing-dir").join("state.db");
    let got = refused_untouched(&dir, &nowhere);
    assert!(
        matches!(&got, FileProblem::NoDirectory(d) if d.ends_with("missing-dir")),
        "{got:?}"
    );

    // A read-only open of a path with nothing there creates nothing.
    let absent = dir.join("absent.db");
    let before = contents(&dir);
    assert_eq!(problem(SqliteStore::open_read_only(&absent)), FileProblem::Missing);
    assert_eq!(contents(&dir), before);
    // Each message names the file, the failure and the fix.
    let message = SqliteStore::open(&text).unwrap_err().to_string();
    assert!(
        message.contains("notes.txt") && message.contains("not a SQLite database") && message.contains("Fix:"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_state_file_is_named_truncated_and_kept() {
    let dir = dir();
    let path = dir.join("state.db");
    {
        let store = SqliteStore::open(&path).unwrap();
        let changes: Vec<_> = (1..=400u128).map(|n| crate::conformance::change(n, 1)).collect();
        store.mark_pending(&changes, 1).await.unwrap();
    }
    let bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() > 8192, "{}", bytes.len());
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let got = refused_untouched(&dir, &path);
    assert!(
        matches!(got, FileProblem::Truncated { have, need } if have < need),
        "{got:?}"
    );
    assert!(!got.is_wrong_path());
    // Cut inside the header.
    std::fs::write(&path, &bytes[..40]).unwrap();
    assert!(matches!(refused_untouched(&dir, &path), FileProblem::Truncated { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_is_refused_and_a_read_only_file_is_named() {
    let dir = dir();
    let path = dir.join("state.db");
    drop(SqliteStore::open(&path).unwrap());
    another_programs_database(&path, &format!("PRAGMA user_version = {};", SCHEMA_VERSION + 1));
    let got = refused_untouched(&dir, &path);
    assert_eq!(
        got,
        FileProblem::Newer {
            found: SCHEMA_VERSION + 1,
            known: SCHEMA_VERSION
        }
    );

    let ro = dir.join("ro.db");
    drop(SqliteStore::open(&ro).unwrap());
    let mut permissions = std::fs::metadata(&ro).unwrap().permissions();
    permissions.set_readonly(true);
    std::fs::set_permissions(&ro, permissions).unwrap();
    assert_eq!(problem(SqliteStore::open(&ro)), FileProblem::ReadOnly);
    // Reading it is still fine.
    let store = SqliteStore::open_read_only(&ro).unwrap();
    assert_eq!(store.counts().await.unwrap().get(Status::Pending), 0);
}

/// A new file is marked as oppsync's; reading it back read-only finds the records and
/// leaves the directory byte for byte as it was, with no SQLite side files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oppsyncs_file_is_marked_and_read_only_opens_change_nothing() {
    let dir = dir();
    let path = dir.join("state.db");
    {
        let store = SqliteStore::open(&path).unwrap();
        store
            .mark_pending(&[crate::conformance::change(1, 1)], 1)
            .await
            .unwrap();
    }
    // The mark is in the main file's header (SQLite's file format: user_version at byte 60,
    // application_id at 68), where any tool can see it.
    let header = std::fs::read(&path).unwrap();
    let at = |i: usize| i32::from_be_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    assert_eq!((at(68), at(60)), (0x6f70_7073, SCHEMA_VERSION));

    let before = contents(&dir);
    assert_eq!(
        before.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>(),
        ["state.db"]
    );
    let store = SqliteStore::open_read_only(&path).unwrap();
    assert_eq!(store.counts().await.unwrap().get(Status::Pending), 1);
    // A write through a read-only open fails and changes nothing.
    assert!(
        store
            .mark_pending(&[crate::conformance::change(2, 1)], 1)
            .await
            .is_err()
    );
    drop(store);
    assert_eq!(contents(&dir), before);

    // An empty file (as `touch` leaves it) is a new state.
    let empty = dir.join("empty.db");
    std::fs::write(&empty, b"").unwrap();
    drop(SqliteStore::open(&empty).unwrap());
    assert!(SqliteStore::open_read_only(&empty).is_ok());
}

/// A file an older oppsync wrote before files were marked: read-only commands say to upgrade
/// it (changing nothing); a read-write open upgrades and marks it, keeping its records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmarked_older_oppsync_file_is_upgraded_by_a_writer_only() {
    let dir = dir();
    let path = dir.join("old.db");
    another_programs_database(
        &path,
        &format!(
            "{}
{}",
            oppsync_tests::harness::FIRST_STATE_SCHEMA,
            oppsync_tests::harness::FIRST_OPPORTUNITIES_TABLE
        ),
    );
    let before = contents(&dir);
    assert_eq!(
        problem(SqliteStore::open_read_only(&path)),
        FileProblem::Older {
            found: 0,
            known: SCHEMA_VERSION
        }
    );
    assert_eq!(contents(&dir), before);
    let store = SqliteStore::open(&path).unwrap();
    store
        .mark_pending(&[crate::conformance::change(1, 1)], 1)
        .await
        .unwrap();
    drop(store);
    let store = SqliteStore::open_read_only(&path).unwrap();
    assert_eq!(store.counts().await.unwrap().get(Status::Pending), 1);
}
