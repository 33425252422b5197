//! Calendar arithmetic the pipeline needs without a date crate: Marketo's quota day and the
//! age of a Dataverse `modifiedon`.

use oppsync_state::Millis;

pub use oppsync_support::{civil_from_days, days_from_civil};

/// The Marketo quota day a moment falls in. Marketo resets the daily quota at midnight US
/// Central time (America/Chicago, daylight saving time included: 05:00 UTC in summer, 06:00 in
/// winter). A fixed UTC−6 turned the count over an hour late in summer, so Marketo's new day
/// could take the budget plus an hour of calls.
pub fn marketo_day(now: Millis) -> String {
    let central = jiff::Timestamp::from_millisecond(now)
        .ok()
        .zip(central_time())
        .map(|(at, zone)| zone.to_datetime(at).date());
    match central {
        Some(date) => format!("{:04}-{:02}-{:02}", date.year(), date.month(), date.day()),
        // Out of jiff's range (years past 9999) or no zone data: standard time.
        None => {
            let (y, m, d) = civil_from_days((now - 6 * 3_600_000).div_euclid(86_400_000));
            format!("{y:04}-{m:02}-{d:02}")
        }
    }
}

/// US Central time from the zone database built into the binary.
fn central_time() -> Option<jiff::tz::TimeZone> {
    static ZONE: std::sync::OnceLock<Option<jiff::tz::TimeZone>> = std::sync::OnceLock::new();
    ZONE.get_or_init(|| jiff::tz::db().get("America/Chicago").ok()).clone()
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
    fn the_quota_day_turns_over_at_midnight_us_central_time_with_daylight_saving() {
        let at = |text: &str| parse_utc(text).unwrap_or_default();
        // Winter (CST, UTC−6): at 06:00 UTC.
        assert_eq!(marketo_day(at("2026-11-25T05:59:59Z")), "2026-11-24");
        assert_eq!(marketo_day(at("2026-11-25T06:00:00Z")), "2026-11-25");
        // Summer (CDT, UTC−5): at 05:00 UTC. A fixed UTC−6 said 2026-07-01 until 06:00.
        assert_eq!(marketo_day(at("2026-07-02T04:59:59Z")), "2026-07-01");
        assert_eq!(marketo_day(at("2026-07-02T05:00:00Z")), "2026-07-02");
        // The days of the changes: clocks go forward at 02:00 on 2026-03-08 and back at 02:00
        // on 2026-11-01, Central time; the day still begins at local midnight.
        assert_eq!(marketo_day(at("2026-03-08T05:59:59Z")), "2026-03-07");
        assert_eq!(marketo_day(at("2026-03-08T06:00:00Z")), "2026-03-08");
        assert_eq!(marketo_day(at("2026-03-09T04:59:59Z")), "2026-03-08");
        assert_eq!(marketo_day(at("2026-03-09T05:00:00Z")), "2026-03-09");
        assert_eq!(marketo_day(at("2026-11-01T04:59:59Z")), "2026-10-31");
        assert_eq!(marketo_day(at("2026-11-01T05:00:00Z")), "2026-11-01");
        assert_eq!(marketo_day(at("2026-11-02T05:59:59Z")), "2026-11-01");
        assert_eq!(marketo_day(at("2026-11-02T06:00:00Z")), "2026-11-02");
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
