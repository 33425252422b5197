//! Crash points, for the crash-restart tests: with `OPPSYNC_CRASH_AT=<point>:<n>` in the
//! environment, the process aborts the n-th time it reaches that point, as a power cut or an
//! OOM kill would stop it there. Without the variable a point is one relaxed atomic load.
//!
//! The points sit at the step boundaries where a crash is hardest to survive:
//! - `poll.recorded` — changes recorded as pending, the cursor not yet moved;
//! - `poll.cursor` — the cursor moved;
//! - `transform.planned` — a plan made, not yet stored;
//! - `write.sent` — Marketo written, nothing recorded yet;
//! - `write.recorded` — one record's outcome recorded, the rest of the batch not.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The points a test can name.
pub const POINTS: [&str; 5] = [
    "poll.recorded",
    "poll.cursor",
    "transform.planned",
    "write.sent",
    "write.recorded",
];

static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
static HITS: AtomicU64 = AtomicU64::new(0);

fn target() -> &'static Option<(String, u64)> {
    TARGET.get_or_init(|| {
        let text = std::env::var("OPPSYNC_CRASH_AT").ok()?;
        let (name, n) = text.rsplit_once(':')?;
        Some((name.to_owned(), n.parse().ok()?))
    })
}

/// Aborts the process at the configured hit of `name`.
pub fn point(name: &str) {
    if let Some((target, n)) = target()
        && target == name
        && HITS.fetch_add(1, Ordering::Relaxed) + 1 == *n
    {
        eprintln!("oppsync: crash point {name} reached (OPPSYNC_CRASH_AT); aborting");
        std::process::abort();
    }
}
