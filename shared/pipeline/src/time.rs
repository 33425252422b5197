//! Calendar arithmetic the pipeline needs without a date crate: Marketo's quota day and the
//! age of a Dataverse `modifiedon`.

use oppsync_state::Millis;

/// Days since 1970-01-01 for a civil date (proleptic Gregorian; Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The (year, month, day) of a count of days since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The Marketo quota day a moment falls in. Marketo resets the daily quota at midnight US
/// Central time; a fixed UTC−6 is used, so the counter turns over an hour late in summer time,
/// which errs on the side of spending less.
pub fn marketo_day(now: Millis) -> String {
    let shifted = now - 6 * 3_600_000;
    let (y, m, d) = civil_from_days(shifted.div_euclid(86_400_000));
    format!("{y:04}-{m:02}-{d:02}")
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
