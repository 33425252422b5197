//! Crash points, for the crash-restart tests: with `OPPSYNC_CRASH_AT=<point>:<n>` in the
//! environment, the process aborts the n-th time it reaches that point, as a power cut or an
//! OOM kill would stop it there. Compiled only with the `crash-points` feature (the `oppsync`
//! command's tests turn it on); without it, as in the Lambda builds, a point is nothing at all.
//!
//! The points sit at the step boundaries where a crash is hardest to survive:
//! - `poll.recorded` — changes recorded as pending, the cursor not yet moved;
//! - `poll.cursor` — the cursor moved;
//! - `transform.planned` — a plan made, not yet stored;
//! - `write.sent` — Marketo written, nothing recorded yet;
//! - `write.recorded` — one record's outcome recorded, the rest of the batch not.

#[cfg(feature = "crash-points")]
use std::sync::OnceLock;
#[cfg(feature = "crash-points")]
use std::sync::atomic::{AtomicU64, Ordering};

/// The points a test can name.
pub const POINTS: [&str; 5] = [
    "poll.recorded",
    "poll.cursor",
    "transform.planned",
    "write.sent",
    "write.recorded",
];

#[cfg(feature = "crash-points")]
static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
#[cfg(feature = "crash-points")]
static HITS: AtomicU64 = AtomicU64::new(0);

#[cfg(feature = "crash-points")]
fn target() -> &'static Option<(String, u64)> {
    TARGET.get_or_init(|| {
        let text = std::env::var("OPPSYNC_CRASH_AT").ok()?;
        let (name, n) = text.rsplit_once(':')?;
        Some((name.to_owned(), n.parse().ok()?))
    })
}

/// Aborts the process at the configured hit of `name`.
#[cfg(not(feature = "crash-points"))]
#[inline(always)]
pub fn point(_name: &str) {}

/// Aborts the process at the configured hit of `name`.
#[cfg(feature = "crash-points")]
pub fn point(name: &str) {
    if let Some((target, n)) = target()
        && target == name
        && HITS.fetch_add(1, Ordering::Relaxed) + 1 == *n
    {
        eprintln!("oppsync: crash point {name} reached (OPPSYNC_CRASH_AT); aborting");
        std::process::abort();
    }
}
