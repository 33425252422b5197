//! The small helpers more than one oppsync crate needs, written once: the jittered exponential
//! backoff both API clients wait with, and the civil-date arithmetic the pipeline (Marketo's
//! quota day) and the Dataverse simulator (`modifiedon`) share, without a date crate; and the
//! checks every entry point applies to values from outside ([`input`]).

use std::time::Duration;

pub mod input;

/// A response body read up to a cap: an answer larger than any the APIs give is refused as it
/// passes the cap (by its Content-Length before a byte is read), never held whole.
pub async fn body_capped(mut response: reqwest::Response, cap: usize) -> Result<String, BodyError> {
    if response.content_length().is_some_and(|n| n > cap as u64) {
        return Err(BodyError::TooLarge { cap });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| BodyError::Read(error_without_urls(&e, "reading the answer failed"), e.is_timeout()))?
    {
        if body.len() + chunk.len() > cap {
            return Err(BodyError::TooLarge { cap });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Why a body was not read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("an answer over {} MB, not read", cap / (1024 * 1024))]
    TooLarge { cap: usize },
    /// The connection failed while reading (the message without URLs; whether it timed out).
    #[error("{0}")]
    Read(String, bool),
}

/// Capped exponential backoff with jitter: between half and all of base × 2^(attempt-1), at
/// most `cap`. Half is fixed so a throttled client never retries at once; half is random so
/// many clients spread out.
/// At most `max` characters of `text` (cut on a character boundary), saying how long it was
/// when it was longer: an error from a server can carry a whole response body, and a message,
/// log line or run-history entry must stay small.
pub fn clipped(text: &str, max: usize) -> String {
    let mut chars = text.char_indices();
    match chars.nth(max) {
        None => text.to_owned(),
        Some((cut, _)) => format!("{}… ({} characters in all)", &text[..cut], text.chars().count()),
    }
}

pub fn backoff(base: Duration, attempt: u32, cap: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let ceiling = base.saturating_mul(1 << attempt.saturating_sub(1).min(10)).min(cap);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(attempt);
    let fraction = (h.finish() % 1000) as u32;
    ceiling / 2 + ceiling / 2 * fraction / 1000
}

/// Days since 1970-01-01 for a civil date (proleptic Gregorian; Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
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

/// `YYYY-MM-DDThh:mm:ssZ` for seconds since 1970-01-01 UTC.
pub fn utc_timestamp(seconds: i64) -> String {
    let (days, rem) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// An error and its causes as one line, leaving out every part that names a URL: an HTTP
/// client's message names the request's URL, whose query can hold personal data (lead emails
/// in `filterValues`, ids in a Dataverse filter) or a secret (Marketo's identity call). What
/// went wrong (refused, reset, timed out) is kept.
pub fn error_without_urls(error: &dyn std::error::Error, fallback: &str) -> String {
    let mut message = String::new();
    let mut source: Option<&dyn std::error::Error> = Some(error);
    while let Some(err) = source {
        let text = err.to_string();
        if !text.contains("://") && !message.contains(&text) {
            if !message.is_empty() {
                message.push_str(": ");
            }
            message.push_str(&text);
        }
        source = err.source();
    }
    if message.is_empty() {
        fallback.to_owned()
    } else {
        message
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_chain_loses_its_urls_and_keeps_the_cause() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "error sending request for url (https://x.example/rest/v1/leads.json?filterValues=ada@example.com)",
                )
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = Outer(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        ));
        let text = error_without_urls(&e, "request failed");
        assert_eq!(text, "connection refused");
        assert!(!text.contains("ada@"));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(20);
        assert!(backoff(base, 1, cap) <= base && backoff(base, 1, cap) >= base / 2);
        assert!(backoff(base, 4, cap) >= Duration::from_millis(400));
        assert!(backoff(base, 30, cap) <= cap);
    }

    #[test]
    fn civil_dates_round_trip() {
        for days in [-719_468, -1, 0, 1, 10_957, 20_789, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(civil_from_days(20_788), (2026, 12, 1));
        assert_eq!(utc_timestamp(1_795_132_800), "2026-11-20T00:00:00Z");
    }
}
