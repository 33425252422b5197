//! Values that enter from outside (the environment, a secret's JSON, a flag), checked where
//! they enter and in one place, so that every entry point (the `oppsync` command and each
//! Lambda function) refuses the same things in the same words: the name of what was wrong, a
//! short prefix of the value, and the fix.

use url::Url;

/// The most of a value an error message shows.
pub const SHOWN_CHARS: usize = 40;
/// The longest URL accepted (far above any real endpoint; a longer one is a pasted mistake).
pub const MAX_URL: usize = 2048;
/// The longest identifier or secret accepted.
pub const MAX_TEXT: usize = 1024;

/// A value refused, with what it is and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name} {problem}. Fix: {fix}")]
pub struct InputError {
    pub name: String,
    pub problem: String,
    pub fix: String,
}

fn refuse(name: &str, problem: String, fix: &str) -> InputError {
    InputError {
        name: name.to_owned(),
        problem,
        fix: fix.to_owned(),
    }
}

/// At most [`SHOWN_CHARS`] characters of `value` for a message, control characters escaped,
/// in backticks, with how much was left out.
pub fn shown(value: &str) -> String {
    let mut out = String::from("`");
    for c in value.chars().take(SHOWN_CHARS) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.push('`');
    let total = value.chars().count();
    if total > SHOWN_CHARS {
        out.push_str(&format!(" (first {SHOWN_CHARS} of {total} characters)"));
    }
    out
}

/// A non-empty value, trimmed, with no control characters and at most `max` characters. With
/// `secret`, the value is never shown.
pub fn text<'a>(name: &str, value: &'a str, max: usize, secret: bool) -> Result<&'a str, InputError> {
    let trimmed = value.trim();
    let problem = |what: &str| {
        if secret {
            what.to_owned()
        } else {
            format!("{} {what}", shown(trimmed))
        }
    };
    if trimmed.is_empty() {
        return Err(refuse(name, "is empty".into(), "set it"));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(refuse(
            name,
            problem("holds a control character (a newline or tab pasted with it?)"),
            "set it again without the control character",
        ));
    }
    let count = trimmed.chars().count();
    if count > max {
        return Err(refuse(
            name,
            format!("is {count} characters long, more than {max}"),
            "check that only the value was pasted",
        ));
    }
    Ok(trimmed)
}

/// A GUID in its 8-4-4-4-12 hexadecimal form (braces allowed), lowercased.
pub fn guid(name: &str, value: &str, fix: &str) -> Result<String, InputError> {
    let trimmed = text(name, value, MAX_TEXT, false)?;
    let bare = trimmed.trim_start_matches('{').trim_end_matches('}');
    let shape_ok = bare.len() == 36
        && bare.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        });
    if !shape_ok {
        return Err(refuse(name, format!("{} is not a GUID", shown(trimmed)), fix));
    }
    Ok(bare.to_ascii_lowercase())
}

/// An endpoint URL: `https://`, or plain `http://` on this machine only (the simulators); a
/// host; no user name or password in it.
pub fn endpoint_url(name: &str, value: &str, example: &str) -> Result<Url, InputError> {
    let trimmed = text(name, value, MAX_URL, false)?;
    let fix = format!("give the base URL, like {example}");
    let url = Url::parse(trimmed).map_err(|e| refuse(name, format!("{} is not a URL ({e})", shown(trimmed)), &fix))?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err(refuse(name, format!("{} names no host", shown(trimmed)), &fix));
    }
    if !url.username().is_empty() || url.password().is_some() {
        // Not shown: the part before the host is a credential.
        return Err(refuse(
            name,
            "holds a user name or password before the host".into(),
            "remove it; credentials go in their own variables",
        ));
    }
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback(&url) => Ok(url),
        "http" => Err(refuse(
            name,
            format!("{} uses http:// for a host that is not this machine", shown(trimmed)),
            "use https:// (plain http is only for loopback simulators)",
        )),
        other => Err(refuse(
            name,
            format!("{} uses the scheme {other}:", shown(trimmed)),
            &fix,
        )),
    }
}

/// 127.0.0.0/8, ::1 and localhost.
pub fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// A whole number from `range`, parsed without overflow.
pub fn number<T>(name: &str, value: &str, range: std::ops::RangeInclusive<T>) -> Result<T, InputError>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    let trimmed = text(name, value, 40, false)?;
    let fix = format!("give a whole number from {} to {}", range.start(), range.end());
    match trimmed.parse::<T>() {
        Ok(n) if range.contains(&n) => Ok(n),
        _ => Err(refuse(
            name,
            format!("{} is out of range or not a number", shown(trimmed)),
            &fix,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_value_is_cut_and_control_characters_are_escaped() {
        let long = "x".repeat(10_000);
        let s = shown(&long);
        assert!(s.len() < 100 && s.contains("first 40 of 10000"), "{s}");
        assert_eq!(shown("a\nb"), "`a\\nb`");
        let e = text("X", "ok\u{7}", 10, false).unwrap_err();
        assert!(
            e.to_string().contains("control character") && e.to_string().contains("ok\\u{7}"),
            "{e}"
        );
        let e = text("SECRET", "s3cr3t\n!", 100, true).unwrap_err();
        assert!(!e.to_string().contains("s3cr3t"), "{e}");
    }

    #[test]
    fn guids_urls_and_numbers_take_their_shapes() {
        assert_eq!(
            guid("T", "{0B000000-0000-4000-8000-000000000001}", "f").unwrap(),
            "0b000000-0000-4000-8000-000000000001"
        );
        for bad in [
            "contoso",
            "0b000000-0000-4000-8000-00000000000",
            "0b000000/../x",
            "0b000000-0000-4000-8000-00000000000g",
        ] {
            assert!(guid("T", bad, "f").is_err(), "{bad}");
        }
        assert!(endpoint_url("U", "https://x.example.com", "e").is_ok());
        assert!(endpoint_url("U", "http://127.0.0.1:9", "e").is_ok());
        for bad in [
            "http://x.example.com",
            "ftp://x.example.com",
            "https://user:pw@x.example.com",
            "https://x.exa\u{0}mple.com/",
            "not a url",
        ] {
            let e = endpoint_url("U", bad, "e");
            assert!(e.is_err(), "{bad}");
            assert!(!e.unwrap_err().to_string().contains("pw@"), "{bad}");
        }
        assert!(endpoint_url("U", &format!("https://x.example.com/{}", "a".repeat(3000)), "e").is_err());
        assert_eq!(number::<u32>("N", "7", 1..=10).unwrap(), 7);
        for bad in ["0", "11", "-1", "99999999999999999999", "x"] {
            assert!(number::<u32>("N", bad, 1..=10).is_err(), "{bad}");
        }
    }
}
