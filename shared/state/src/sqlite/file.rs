//! What a state file is, found out before oppsync changes anything in it: oppsync's own (marked
//! with SQLite's `application_id`, its schema version in `user_version`), new, one an older
//! oppsync wrote before files were marked, or something to refuse untouched, with the reason.

use std::io::Read;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, ErrorCode, OpenFlags};

/// SQLite's `application_id` for oppsync's state files: "opps".
pub(super) const APPLICATION_ID: i32 = 0x6f70_7073;
/// The schema this build writes. 0 is an unmarked file from before schemas were numbered.
pub const SCHEMA_VERSION: i32 = 1;
/// Every table oppsync has ever created: an unmarked file holding only these is an older
/// oppsync's; one holding anything else is another program's.
const OUR_TABLES: &[&str] = &[
    "cursors",
    "leases",
    "opportunities",
    "completions",
    "marketo_calls",
    "links",
    "locks",
    "leads",
    "budget_members",
];

/// Why a state file cannot be used; [`FileProblem::fix`] says what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileProblem {
    #[error("there is no state file there yet")]
    Missing,
    #[error("{0} is not an existing directory")]
    NoDirectory(String),
    #[error("it is a directory")]
    Directory(String),
    #[error("it is not a SQLite database")]
    NotADatabase,
    #[error("it is truncated ({have} of {need} bytes), as a copy cut short or a full disk leaves it")]
    Truncated { have: u64, need: u64 },
    #[error("it is damaged ({0})")]
    Damaged(String),
    #[error("it is not oppsync's ({0}), so oppsync left it as it was")]
    NotOurs(String),
    #[error("it was written by a newer oppsync (state schema {found}; this one knows schema {known})")]
    Newer { found: i32, known: i32 },
    #[error("it was written by an older oppsync (state schema {found}; this one writes schema {known})")]
    Older { found: i32, known: i32 },
    #[error("it is read-only")]
    ReadOnly,
    #[error("another program holds a lock on it")]
    Busy,
    #[error("it cannot be opened ({0})")]
    CannotOpen(String),
}

impl FileProblem {
    /// What to do about it.
    pub fn fix(&self) -> String {
        let afresh =
            "restore it from a backup, or start afresh at a new --state path (the next sync reads everything again)";
        match self {
            FileProblem::Missing => "run `oppsync sync` first, or point --state at the file it wrote".into(),
            FileProblem::NoDirectory(_) => {
                "create the directory, or point --state at a file in an existing directory".into()
            }
            FileProblem::Directory(dir) => format!("point --state at a file, e.g. {dir}/oppsync.db"),
            FileProblem::NotADatabase | FileProblem::NotOurs(_) => {
                "point --state at oppsync's state file, or at a new path".into()
            }
            FileProblem::Truncated { .. } | FileProblem::Damaged(_) => afresh.into(),
            FileProblem::Newer { .. } => "run that version of oppsync, or use a new --state path".into(),
            FileProblem::Older { .. } => {
                "`oppsync sync` brings it up to date in place; run it once, then this again".into()
            }
            FileProblem::ReadOnly => "make it writable (chmod u+w), or copy it to a writable place".into(),
            FileProblem::Busy => "wait for the other program to finish".into(),
            FileProblem::CannotOpen(_) => "check that the file and its directory are readable and writable".into(),
        }
    }

    /// The path given is the wrong one (a bad argument), rather than the right file being
    /// unusable.
    pub fn is_wrong_path(&self) -> bool {
        matches!(
            self,
            FileProblem::Missing
                | FileProblem::NoDirectory(_)
                | FileProblem::Directory(_)
                | FileProblem::NotADatabase
                | FileProblem::NotOurs(_)
                | FileProblem::Newer { .. }
        )
    }
}

/// What is at the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Found {
    /// Nothing, or an empty file: oppsync may create its state there.
    New,
    /// oppsync's state at this schema version (0: written before versions were recorded).
    Ours { version: i32 },
}

/// Looks at the file without changing it (nor creating SQLite's side files).
pub(super) fn inspect(path: &Path) -> Result<Found, FileProblem> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            let dir = directory_of(path);
            return if dir.is_dir() {
                Ok(Found::New)
            } else {
                Err(FileProblem::NoDirectory(dir.display().to_string()))
            };
        }
        Err(e) => return Err(FileProblem::CannotOpen(e.kind().to_string())),
    };
    if meta.is_dir() {
        return Err(FileProblem::Directory(path.display().to_string()));
    }
    if meta.len() == 0 {
        return Ok(Found::New);
    }
    let header = read_header(path)?;
    let magic: &[u8] = b"SQLite format 3\0";
    let have = meta.len();
    if header.len() < magic.len() || header[..magic.len()] != *magic {
        return if magic.starts_with(&header) {
            Err(FileProblem::Truncated { have, need: 100 })
        } else {
            Err(FileProblem::NotADatabase)
        };
    }
    if header.len() < 100 {
        return Err(FileProblem::Truncated { have, need: 100 });
    }
    let be32 = |at: usize| u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]]);
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65_536,
        n => u64::from(n),
    };
    // The page count in the header is valid only when the change counter and the
    // version-valid-for number agree (SQLite's file format, section 1.3.7).
    if be32(24) == be32(92) {
        let need = page_size * u64::from(be32(28));
        if have < need {
            return Err(FileProblem::Truncated { have, need });
        }
    }
    // The main file's header can be older than its write-ahead log; ask SQLite.
    let conn = open_untouched(path)?;
    let pragma = |name: &str| {
        conn.pragma_query_value(None, name, |r| r.get::<_, i32>(0))
            .map_err(classify)
    };
    let application_id = pragma("application_id")?;
    let version = pragma("user_version")?;
    if application_id == APPLICATION_ID {
        return Ok(Found::Ours { version });
    }
    if application_id != 0 {
        return Err(FileProblem::NotOurs(format!(
            "another program marked it with SQLite application id {application_id:#010x}"
        )));
    }
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .map_err(classify)?;
    if tables.is_empty() && version == 0 {
        return Ok(Found::New);
    }
    let foreign: Vec<&String> = tables.iter().filter(|t| !OUR_TABLES.contains(&t.as_str())).collect();
    if foreign.is_empty() && tables.iter().any(|t| t == "opportunities") && version == 0 {
        return Ok(Found::Ours { version: 0 });
    }
    let named: Vec<String> = foreign.iter().take(3).map(|t| short(t)).collect();
    Err(FileProblem::NotOurs(if named.is_empty() {
        "it is a SQLite database another program wrote".to_owned()
    } else {
        format!(
            "it holds tables oppsync never makes: {}{}",
            named.join(", "),
            if foreign.len() > 3 { ", …" } else { "" }
        )
    }))
}

/// Opens a SQLite file read-only without creating anything beside it: with no write-ahead log
/// present, as immutable (no locks, no `-shm`); with one (a writer is running, or died), read
/// through it.
pub(super) fn open_untouched(path: &Path) -> Result<Connection, FileProblem> {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let escaped = uri_path(path)?;
    let uri = if Path::new(&wal).exists() {
        format!("file:{escaped}?mode=ro")
    } else {
        format!("file:{escaped}?mode=ro&immutable=1")
    };
    let conn = Connection::open_with_flags(
        uri,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(classify)?;
    conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(classify)?;
    Ok(conn)
}

/// Which failure a SQLite error is.
pub(super) fn classify(e: rusqlite::Error) -> FileProblem {
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => FileProblem::NotADatabase,
        Some(ErrorCode::DatabaseCorrupt) => FileProblem::Damaged(short(&e.to_string())),
        Some(ErrorCode::ReadOnly) => FileProblem::ReadOnly,
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => FileProblem::Busy,
        _ => FileProblem::CannotOpen(short(&e.to_string())),
    }
}

fn read_header(path: &Path) -> Result<Vec<u8>, FileProblem> {
    let file = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => FileProblem::CannotOpen("permission denied".into()),
        kind => FileProblem::CannotOpen(kind.to_string()),
    })?;
    let mut header = Vec::with_capacity(100);
    file.take(100)
        .read_to_end(&mut header)
        .map_err(|e| FileProblem::CannotOpen(e.kind().to_string()))?;
    Ok(header)
}

fn directory_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The path as a SQLite URI path: the characters URIs give meaning to are escaped.
fn uri_path(path: &Path) -> Result<String, FileProblem> {
    let text = path
        .to_str()
        .ok_or_else(|| FileProblem::CannotOpen("the path is not UTF-8; choose a UTF-8 path".into()))?;
    let mut out = String::new();
    for c in text.chars() {
        match c {
            '%' | '?' | '#' => out.push_str(&format!("%{:02X}", c as u32)),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// At most 60 characters of something another program wrote.
fn short(text: &str) -> String {
    let mut out: String = text.chars().take(60).collect();
    if text.chars().nth(60).is_some() {
        out.push('…');
    }
    out
}
