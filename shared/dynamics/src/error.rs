//! What went wrong talking to Dataverse, with the code and message of its OData error body,
//! and whether trying again may help.

use super::*;

/// What went wrong talking to Dataverse.
#[derive(Debug, thiserror::Error)]
pub enum DataverseError {
    #[error(
        "Entra ID refused the Dataverse credentials (HTTP {status}: {detail}); check DYNAMICS_TENANT_ID, DYNAMICS_CLIENT_ID and DYNAMICS_CLIENT_SECRET, and that the app registration has a Dataverse application user"
    )]
    Auth { status: u16, detail: String },
    #[error(
        "Dataverse refused access ({code}: {message}); give the application user a security role with organization-level Read on opportunity, connection, account, contact, connectionrole and (for sales persons) systemuser"
    )]
    Forbidden { code: String, message: String },
    #[error("Dataverse: not found ({code}: {message})")]
    NotFound { code: String, message: String },
    #[error("Dataverse rejected the query ({code}: {message})")]
    BadQuery { code: String, message: String },
    #[error("Dataverse kept throttling (429) after {attempts} attempts")]
    Throttled { attempts: u32 },
    #[error("Dataverse failed with HTTP {status} after {attempts} attempts ({message})")]
    Transient {
        status: u16,
        attempts: u32,
        message: String,
    },
    #[error("the change-tracking token has expired (Dataverse {EXPIRED_VERSION_STAMP}); a full read is needed")]
    ChangeTokenExpired,
    #[error("refusing to follow a link to another host: {0}")]
    ForeignLink(String),
    #[error(
        "the state's stored change-tracking cursor belongs to Dataverse at {stored}, not {configured}: this state was synced from another Dynamics environment. Fix: give this environment its own --state (or table), or set DYNAMICS_URL back to {stored}"
    )]
    ForeignCursor { stored: String, configured: String },
    #[error(
        "Dataverse answered HTTP {status}, a redirect to {to}; oppsync follows no redirects. Set DYNAMICS_URL to the environment's own URL (Power Platform admin center > Environments > Environment URL)"
    )]
    Redirected { status: u16, to: String },
    #[error("Dataverse answered something that is not OData JSON: {0}")]
    Decode(String),
    #[error(
        "Dataverse answered more than {cap_mb} MB for one page of {page_size} rows; nothing of it was read. Fix: lower [dataverse] page_size"
    )]
    TooLarge { cap_mb: usize, page_size: u32 },
    #[error("cannot reach Dataverse: {message}")]
    Transport { message: String, timeout: bool },
    #[error("{0}")]
    Settings(String),
}

impl DataverseError {
    /// Whether trying again later may help.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            DataverseError::Throttled { .. }
                | DataverseError::Transient { .. }
                | DataverseError::Transport { .. }
                | DataverseError::Decode(_)
        )
    }
}

/// The host a redirect points at (its path and query may carry anything; only the host is told).
pub(crate) fn redirect_host(location: &str) -> String {
    Url::parse(location)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_else(|| "an unnamed location".into())
}

/// The longest error message kept from a Dataverse answer (errors, logs and the run history
/// carry it).
const MESSAGE_CHARS: usize = 500;

/// A parsed OData error body, its code and message clipped: a body can be megabytes.
pub(crate) fn odata_error(body: &str) -> (String, String) {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    (
        oppsync_support::clipped(v["error"]["code"].as_str().unwrap_or(""), 100),
        oppsync_support::clipped(v["error"]["message"].as_str().unwrap_or(body), MESSAGE_CHARS),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 64 MB answer must not become a 64 MB error: the message is clipped, on a character
    /// boundary (a body cut at byte 200 inside a character was kept whole before).
    #[test]
    fn an_error_body_of_any_size_gives_a_short_message() {
        let huge = format!(
            "{{\"error\":{{\"code\":\"0x1\",\"message\":\"{}\"}}}}",
            "x".repeat(1_000_000)
        );
        let (code, message) = odata_error(&huge);
        assert_eq!(code, "0x1");
        assert!(
            message.len() < 600 && message.ends_with("(1000000 characters in all)"),
            "{}",
            &message[..80]
        );
        let not_json = format!("{}é{}", "a".repeat(199), "b".repeat(100_000));
        let (_, message) = odata_error(&not_json);
        assert!(message.chars().count() < 560, "{} characters", message.chars().count());
    }
}
