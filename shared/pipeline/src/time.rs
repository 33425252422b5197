//! Calendar arithmetic the pipeline needs without a date crate: Marketo's quota day and the
//! age of a Dataverse `modifiedon`.

use oppsync_state::Millis;

pub use oppsync_support::{civil_from_days, days_from_civil};

/// The Marketo quota day a moment falls in. Marketo resets the daily quota at midnight US
/// Central time; a fixed UTC−6 is used, so the counter turns over an hour late in summer time,
/// which errs on the side of spending less.
pub fn marketo_day(now: Millis) -> String {
    let shifted = now - 6 * 3_600_000;
    let (y, m, d) = civil_from_days(shifted.div_euclid(86_400_000));
    format!("{y:04}-{m:02}-{d:02}")
}

/// A moment as `2026-11-25T08:30:00Z` (UTC, seconds): how the run history shows it.
pub fn format_utc(at: Millis) -> String {
    let seconds = at.div_euclid(1000);
    let (y, m, d) = civil_from_days(seconds.div_euclid(86_400));
    let s = seconds.rem_euclid(86_400);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", s / 3600, s / 60 % 60, s % 60)
}

/// Parses Dataverse's `modifiedon` (`2026-11-20T10:00:00Z`, seconds precision, UTC).
pub fn parse_utc(text: &str) -> Option<Millis> {
    let b = text.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| text.get(r)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, s) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 || !text.ends_with('Z') {
        return None;
    }
    Some(((days_from_civil(y, mo, d) * 24 + h) * 60 + mi) * 60_000 + s * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quota_day_turns_over_at_six_utc() {
        let midnight_utc = parse_utc("2026-11-25T00:00:00Z").unwrap_or_default();
        assert_eq!(marketo_day(midnight_utc), "2026-11-24");
        assert_eq!(marketo_day(midnight_utc + 6 * 3_600_000 - 1), "2026-11-24");
        assert_eq!(marketo_day(midnight_utc + 6 * 3_600_000), "2026-11-25");
    }

    #[test]
    fn a_formatted_moment_parses_back() {
        for text in ["1970-01-01T00:00:01Z", "2026-11-25T08:30:59Z", "2000-02-29T23:59:00Z"] {
            let at = parse_utc(text).unwrap_or_default();
            assert_eq!(format_utc(at + 999), text);
        }
    }

    #[test]
    fn modifiedon_parses_to_unix_millis_and_garbage_does_not() {
        assert_eq!(parse_utc("1970-01-01T00:00:01Z"), Some(1000));
        assert_eq!(parse_utc("2000-03-01T00:00:00Z"), Some(951_868_800_000));
        for bad in [
            "",
            "2026-13-01T00:00:00Z",
            "yesterday",
            "2026-11-25 00:00:00Z",
            "2026-11-25T00:00:00+01:00",
        ] {
            assert_eq!(parse_utc(bad), None, "{bad}");
        }
    }
}
