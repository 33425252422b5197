//! Marketo's errors, typed at three levels and classified for retry decisions.

/// What a caller should do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// 601, 602: get a new token and retry once.
    ReAuth,
    /// 606, 615, HTTP 502: back off and retry.
    Throttled,
    /// 604, 608, 611, 713, record-level 1014, 5xx, timeouts, garbled answers: retry with backoff.
    Transient,
    /// 607: the daily quota is spent; nothing more until Marketo's daily reset.
    QuotaExhausted,
    /// 1018: the instance runs native CRM sync; the opportunity APIs are not available.
    CrmEnabled,
    /// Anything else: retrying will not help; record it with its code and message.
    Permanent,
}

impl ErrorClass {
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorClass::ReAuth | ErrorClass::Throttled | ErrorClass::Transient)
    }
}

/// What a failure means for the records it carried: the one retry decision, made here and used
/// by every caller (the pipeline's steps, the Lambda handlers, the CLI's exit codes). The client
/// has already retried what a retry within the call could fix (601/602, 606/615, transient
/// faults) before anyone sees an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// It may pass: the records stay queued and a later attempt retries them.
    Retry,
    /// Nothing more today (Marketo's 607, oppsync's budget): the records stay queued, the run
    /// stops, and the next day's runs finish them.
    Wait,
    /// Someone must act (credentials refused, an instance with native CRM sync): the records
    /// stay queued and the run stops with one message.
    Fix,
    /// This record will not go in as it is: record the failure with its code and message.
    Fail,
}

impl Disposition {
    /// The records stay queued (everything but [`Disposition::Fail`]).
    pub fn keeps_records_queued(self) -> bool {
        self != Disposition::Fail
    }

    /// No more calls in this run: the rest would fail the same way.
    pub fn stops_the_run(self) -> bool {
        matches!(self, Disposition::Wait | Disposition::Fix)
    }
}

impl From<ErrorClass> for Disposition {
    fn from(class: ErrorClass) -> Self {
        match class {
            ErrorClass::ReAuth | ErrorClass::Throttled | ErrorClass::Transient => Disposition::Retry,
            ErrorClass::QuotaExhausted => Disposition::Wait,
            ErrorClass::CrmEnabled => Disposition::Fix,
            ErrorClass::Permanent => Disposition::Fail,
        }
    }
}

/// Classifies a Marketo error code (response level 6xx/7xx or record level 1xxx).
pub fn classify(code: &str) -> ErrorClass {
    match code {
        "601" | "602" => ErrorClass::ReAuth,
        "502" | "606" | "615" => ErrorClass::Throttled,
        "604" | "608" | "611" | "713" => ErrorClass::Transient,
        // Record level: "Failed to create Object", retried by Marketo's own Python client;
        // no record code is documented as transient, so this is the one oppsync retries.
        "1014" => ErrorClass::Transient,
        "607" => ErrorClass::QuotaExhausted,
        "1018" => ErrorClass::CrmEnabled,
        _ => ErrorClass::Permanent,
    }
}

/// One `{code, message}` from Marketo.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct Reason {
    pub code: String,
    #[serde(default)]
    pub message: String,
}

/// A failed Marketo call.
#[derive(Debug, thiserror::Error)]
pub enum MarketoError {
    #[error(
        "Marketo refused the client credentials (HTTP {status} from the identity endpoint); check MARKETO_CLIENT_ID and MARKETO_CLIENT_SECRET against the LaunchPoint service"
    )]
    Auth { status: u16 },
    /// The identity path answered as a web server without it would (404, 405, 410…): the URL
    /// reaches something, but not a Marketo instance.
    #[error(
        "MARKETO_URL does not reach a Marketo instance (HTTP {status} from its /identity/oauth/token); set it to the REST API endpoint without /rest, from Admin > Web Services (https://<munchkin id>.mktorest.com)"
    )]
    NotMarketo { status: u16 },
    #[error("Marketo {endpoint}: HTTP {status}{}", if *status == 413 { " (request body over 1 MB)" } else if *status == 414 { " (URL over 8 KB)" } else { "" })]
    Http { endpoint: &'static str, status: u16 },
    #[error("Marketo {endpoint}: error {code}: {message}")]
    Api {
        endpoint: &'static str,
        code: String,
        message: String,
    },
    #[error(
        "Marketo's daily API quota is spent (607); writes stop until the daily reset at midnight US Central time, and every record stays queued"
    )]
    QuotaExhausted,
    #[error(
        "this Marketo instance runs the native CRM sync (1018 \"CRM Enabled\"), which makes the opportunity, role and company APIs unavailable; oppsync is for instances without it"
    )]
    CrmEnabled,
    #[error(
        "oppsync's daily Marketo budget is spent ({used} of {budget} calls today); writes resume after Marketo's daily reset, and every record stays queued. Raise [marketo] daily_budget to allow more"
    )]
    BudgetExhausted { used: u64, budget: u64 },
    #[error("Marketo {endpoint} answered {got} results for {sent} records{detail}; nothing from this call was trusted")]
    ResultMismatch {
        endpoint: &'static str,
        sent: usize,
        got: usize,
        /// Why the results could not be matched when the counts agree (a bad or repeated
        /// `seq`, an unreadable status); empty when the counts differ.
        detail: &'static str,
    },
    #[error("Marketo {endpoint}: {message}")]
    Transport {
        endpoint: &'static str,
        message: String,
        timeout: bool,
    },
    #[error("Marketo {endpoint} answered something that is not its JSON envelope: {preview}")]
    Decode { endpoint: &'static str, preview: String },
}

impl MarketoError {
    pub fn class(&self) -> ErrorClass {
        match self {
            MarketoError::Auth { .. } | MarketoError::NotMarketo { .. } => ErrorClass::Permanent,
            MarketoError::Http { status, .. } => match status {
                502 => ErrorClass::Throttled,
                500..=599 => ErrorClass::Transient,
                _ => ErrorClass::Permanent,
            },
            MarketoError::Api { code, .. } => classify(code),
            MarketoError::QuotaExhausted | MarketoError::BudgetExhausted { .. } => ErrorClass::QuotaExhausted,
            MarketoError::CrmEnabled => ErrorClass::CrmEnabled,
            MarketoError::ResultMismatch { .. } | MarketoError::Transport { .. } | MarketoError::Decode { .. } => {
                ErrorClass::Transient
            }
        }
    }

    /// Whether Marketo may have applied the call although it failed: its answer was lost (a
    /// timeout, a dropped connection, a 5xx from a gateway after the instance acted) or could
    /// not be read. Such a call is treated as applied: what it may have created is not created
    /// again at once, and what it may have written is written again. A refusal Marketo answered
    /// (an error code in its envelope, 4xx, the quota) was not applied.
    pub fn may_have_been_applied(&self) -> bool {
        match self {
            MarketoError::Transport { .. } | MarketoError::ResultMismatch { .. } | MarketoError::Decode { .. } => true,
            MarketoError::Http { status, .. } => *status >= 500,
            _ => false,
        }
    }

    /// What this failure means for the records of the call: see [`Disposition`].
    pub fn disposition(&self) -> Disposition {
        match self {
            // Refused credentials and a wrong URL do not pass by themselves.
            MarketoError::Auth { .. } | MarketoError::NotMarketo { .. } => Disposition::Fix,
            other => other.class().into(),
        }
    }

    /// The operation the failed call was (its [`crate::Operation`] name), where there was one.
    pub fn operation(&self) -> Option<&'static str> {
        match self {
            MarketoError::Http { endpoint, .. }
            | MarketoError::Api { endpoint, .. }
            | MarketoError::ResultMismatch { endpoint, .. }
            | MarketoError::Transport { endpoint, .. }
            | MarketoError::Decode { endpoint, .. } => Some(endpoint),
            MarketoError::Auth { .. } | MarketoError::NotMarketo { .. } => Some(crate::Operation::Identity.name()),
            _ => None,
        }
    }

    /// The Marketo code, for the error ledger.
    pub fn code(&self) -> String {
        match self {
            MarketoError::Api { code, .. } => code.clone(),
            MarketoError::Http { status, .. } | MarketoError::Auth { status } | MarketoError::NotMarketo { status } => {
                format!("HTTP {status}")
            }
            MarketoError::QuotaExhausted => "607".into(),
            MarketoError::CrmEnabled => "1018".into(),
            MarketoError::BudgetExhausted { .. } => "budget".into(),
            MarketoError::ResultMismatch { .. } => "result-mismatch".into(),
            MarketoError::Transport { timeout: true, .. } => "timeout".into(),
            MarketoError::Transport { .. } => "transport".into(),
            MarketoError::Decode { .. } => "decode".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_retry_decision_for_every_error() {
        let api = |code: &str| MarketoError::Api {
            endpoint: "opportunities.sync",
            code: code.into(),
            message: String::new(),
        };
        for (error, disposition) in [
            (api("606"), Disposition::Retry),
            (api("611"), Disposition::Retry),
            (api("1014"), Disposition::Retry),
            (MarketoError::QuotaExhausted, Disposition::Wait),
            (MarketoError::BudgetExhausted { used: 1, budget: 1 }, Disposition::Wait),
            (MarketoError::Auth { status: 401 }, Disposition::Fix),
            (MarketoError::NotMarketo { status: 404 }, Disposition::Fix),
            (MarketoError::CrmEnabled, Disposition::Fix),
            (api("603"), Disposition::Fail),
            (api("1003"), Disposition::Fail),
            (
                MarketoError::Transport {
                    endpoint: "identity",
                    message: String::new(),
                    timeout: true,
                },
                Disposition::Retry,
            ),
        ] {
            assert_eq!(error.disposition(), disposition, "{error}");
            assert_eq!(
                error.disposition().keeps_records_queued(),
                disposition != Disposition::Fail
            );
        }
        assert!(Disposition::Wait.stops_the_run() && Disposition::Fix.stops_the_run());
        assert!(!Disposition::Retry.stops_the_run() && !Disposition::Fail.stops_the_run());
    }

    #[test]
    fn codes_are_classified_as_documented() {
        for (code, class) in [
            ("601", ErrorClass::ReAuth),
            ("602", ErrorClass::ReAuth),
            ("606", ErrorClass::Throttled),
            ("615", ErrorClass::Throttled),
            ("502", ErrorClass::Throttled),
            ("604", ErrorClass::Transient),
            ("608", ErrorClass::Transient),
            ("611", ErrorClass::Transient),
            ("713", ErrorClass::Transient),
            ("607", ErrorClass::QuotaExhausted),
            ("1018", ErrorClass::CrmEnabled),
            ("603", ErrorClass::Permanent),
            ("1003", ErrorClass::Permanent),
            ("1007", ErrorClass::Permanent),
            ("1013", ErrorClass::Permanent),
        ] {
            assert_eq!(classify(code), class, "{code}");
        }
    }
}
