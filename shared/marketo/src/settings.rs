//! Where Marketo is and who we are: validated once, secrets never printable.

use reqwest::Url;

/// A secret (client secret, access token): `secrecy`'s string, which never prints and is wiped
/// when dropped; only `expose_secret` gives the text, at the one place it is sent.
pub use secrecy::{ExposeSecret, SecretString as Secret};

/// A problem with the Marketo settings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error("MARKETO_URL `{0}` is not a URL; use the instance's base URL, like https://123-ABC-456.mktorest.com")]
    BadUrl(String),
    #[error(
        "MARKETO_URL `{0}` uses http:// for a host that is not this machine; use https:// (plain http is only for loopback simulators)"
    )]
    InsecureUrl(String),
    #[error("{0} is empty; set it to the LaunchPoint service's value (Admin > LaunchPoint > View Details)")]
    Empty(&'static str),
}

/// The Marketo instance and the API user's LaunchPoint credentials.
#[derive(Clone, Debug)]
pub struct MarketoSettings {
    /// `{MARKETO_URL}`: identity at `/identity/oauth/token`, REST at `/rest/v1/`.
    pub base: Url,
    pub client_id: String,
    pub client_secret: Secret,
}

impl MarketoSettings {
    pub fn new(base: &str, client_id: &str, client_secret: Secret) -> Result<Self, SettingsError> {
        let mut url = Url::parse(base.trim()).map_err(|_| SettingsError::BadUrl(base.to_owned()))?;
        match url.scheme() {
            "https" => {}
            "http" if is_loopback(&url) => {}
            "http" => return Err(SettingsError::InsecureUrl(base.to_owned())),
            _ => return Err(SettingsError::BadUrl(base.to_owned())),
        }
        if url.host_str().is_none() {
            return Err(SettingsError::BadUrl(base.to_owned()));
        }
        // Accept the REST endpoint pasted in full: https://x.mktorest.com/rest -> the base.
        let path = url.path().trim_end_matches('/').to_owned();
        let path = path
            .strip_suffix("/rest/v1")
            .or_else(|| path.strip_suffix("/rest"))
            .unwrap_or(&path);
        url.set_path(&format!("{path}/"));
        if client_id.trim().is_empty() {
            return Err(SettingsError::Empty("MARKETO_CLIENT_ID"));
        }
        if client_secret.expose_secret().trim().is_empty() {
            return Err(SettingsError::Empty("MARKETO_CLIENT_SECRET"));
        }
        Ok(MarketoSettings {
            base: url,
            client_id: client_id.trim().to_owned(),
            client_secret,
        })
    }
}

/// 127.0.0.0/8, ::1 and localhost.
pub(crate) fn is_loopback(url: &Url) -> bool {
    let Some(host) = url.host_str() else { return false };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_and_loopback_http_are_accepted_and_the_rest_suffix_is_dropped() {
        let s = MarketoSettings::new("https://123-ABC-456.mktorest.com/rest", "id", Secret::from("s")).unwrap();
        assert_eq!(s.base.as_str(), "https://123-abc-456.mktorest.com/");
        for ok in ["http://127.0.0.1:8080", "http://localhost:1", "http://[::1]:9/"] {
            assert!(MarketoSettings::new(ok, "id", Secret::from("s")).is_ok(), "{ok}");
        }
    }

    #[test]
    fn plain_http_to_another_host_is_refused_with_the_fix() {
        let err = MarketoSettings::new("http://123-ABC-456.mktorest.com", "id", Secret::from("s")).unwrap_err();
        assert!(err.to_string().contains("use https://"), "{err}");
        assert!(matches!(
            MarketoSettings::new("http://10.0.0.1", "id", Secret::from("s")),
            Err(SettingsError::InsecureUrl(_))
        ));
        assert!(matches!(
            MarketoSettings::new("not a url", "id", Secret::from("s")),
            Err(SettingsError::BadUrl(_))
        ));
        assert!(matches!(
            MarketoSettings::new("https://x.mktorest.com", " ", Secret::from("s")),
            Err(SettingsError::Empty("MARKETO_CLIENT_ID"))
        ));
    }

    #[test]
    fn secrets_never_print() {
        let s = MarketoSettings::new("https://x.mktorest.com", "id", Secret::from("hunter2")).unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!format!("{:?}", Secret::from("hunter2")).contains("hunter2"));
    }
}
