//! Where Marketo is and who we are: validated once, secrets never printable.

use oppsync_support::input;
use reqwest::Url;

/// A secret (client secret, access token): `secrecy`'s string, which never prints and is wiped
/// when dropped; only `expose_secret` gives the text, at the one place it is sent.
pub use secrecy::{ExposeSecret, SecretString as Secret};

/// A problem with the Marketo settings: the value named, a short prefix of it (never of a
/// secret) and the fix, as every entry point words it (`oppsync_support::input`).
pub type SettingsError = oppsync_support::input::InputError;

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
        let mut url = input::endpoint_url("MARKETO_URL", base, "https://123-ABC-456.mktorest.com")?;
        // Accept the REST endpoint pasted in full: https://x.mktorest.com/rest -> the base.
        let path = url.path().trim_end_matches('/').to_owned();
        let path = path
            .strip_suffix("/rest/v1")
            .or_else(|| path.strip_suffix("/rest"))
            .unwrap_or(&path);
        url.set_path(&format!("{path}/"));
        url.set_query(None);
        url.set_fragment(None);
        let client_id = input::text("MARKETO_CLIENT_ID", client_id, input::MAX_TEXT, false)
            .map_err(launchpoint)?
            .to_owned();
        input::text(
            "MARKETO_CLIENT_SECRET",
            client_secret.expose_secret(),
            input::MAX_TEXT,
            true,
        )
        .map_err(launchpoint)?;
        Ok(MarketoSettings {
            base: url,
            client_id,
            client_secret,
        })
    }
}

/// Where the LaunchPoint values are found, as the fix for an empty or malformed one.
fn launchpoint(mut e: SettingsError) -> SettingsError {
    e.fix = format!("{}; copy it from Admin > LaunchPoint > View Details", e.fix);
    e
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
        for (url, client_id, problem) in [
            (
                "http://10.0.0.1",
                "id",
                "uses http:// for a host that is not this machine",
            ),
            ("not a url", "id", "is not a URL"),
            ("https://x.mktorest.com", " ", "is empty"),
            ("https://x.mktorest.com", "id\n2", "holds a control character"),
        ] {
            let err = MarketoSettings::new(url, client_id, Secret::from("s")).unwrap_err();
            assert!(err.to_string().contains(problem), "{url} {client_id:?}: {err}");
        }
        let err = MarketoSettings::new("https://x.mktorest.com", "id", Secret::from("hunter2\u{0}")).unwrap_err();
        assert!(
            err.name == "MARKETO_CLIENT_SECRET" && !err.to_string().contains("hunter2"),
            "{err}"
        );
    }

    #[test]
    fn secrets_never_print() {
        let s = MarketoSettings::new("https://x.mktorest.com", "id", Secret::from("hunter2")).unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!format!("{:?}", Secret::from("hunter2")).contains("hunter2"));
    }
}
