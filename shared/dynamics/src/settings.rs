//! Where Dataverse is and who we are: the environment and token URLs (https, or http on
//! loopback only), the app registration's credentials, and the tables oppsync reads.

use super::*;

/// A secret (the client secret, a token): `secrecy`'s string, which never prints.
pub use secrecy::{ExposeSecret, SecretString as Secret};

/// The tables oppsync reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EntitySet {
    Opportunities,
    Accounts,
    Contacts,
    Connections,
    ConnectionRoles,
}

impl EntitySet {
    pub fn name(self) -> &'static str {
        match self {
            EntitySet::Opportunities => "opportunities",
            EntitySet::Accounts => "accounts",
            EntitySet::Contacts => "contacts",
            EntitySet::Connections => "connections",
            EntitySet::ConnectionRoles => "connectionroles",
        }
    }
    /// The table's logical name (EntityDefinitions' `LogicalName`).
    pub fn logical(self) -> &'static str {
        match self {
            EntitySet::Opportunities => "opportunity",
            EntitySet::Accounts => "account",
            EntitySet::Contacts => "contact",
            EntitySet::Connections => "connection",
            EntitySet::ConnectionRoles => "connectionrole",
        }
    }
    pub fn key(self) -> &'static str {
        match self {
            EntitySet::Opportunities => "opportunityid",
            EntitySet::Accounts => "accountid",
            EntitySet::Contacts => "contactid",
            EntitySet::Connections => "connectionid",
            EntitySet::ConnectionRoles => "connectionroleid",
        }
    }
}

/// Where Dataverse is and who we are.
#[derive(Clone, Debug)]
pub struct DataverseSettings {
    /// The environment URL (`DYNAMICS_URL`), like https://contoso.crm.dynamics.com.
    pub environment: Url,
    pub token_url: Url,
    pub client_id: String,
    pub client_secret: Secret,
    /// Rows per page (Prefer: odata.maxpagesize), at most 5000.
    pub page_size: u32,
    /// Requests in flight at once (Dataverse allows 52 per user).
    pub concurrency: usize,
}

pub(crate) fn loopback(url: &Url) -> bool {
    let host = url
        .host_str()
        .unwrap_or("")
        .trim_start_matches('[')
        .trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

pub(crate) fn checked_url(name: &str, text: &str) -> Result<Url, DataverseError> {
    let url = Url::parse(text.trim()).map_err(|_| DataverseError::Settings(format!("{name} `{text}` is not a URL")))?;
    match url.scheme() {
        "https" => Ok(url),
        "http" if loopback(&url) => Ok(url),
        _ => Err(DataverseError::Settings(format!(
            "{name} `{text}` must use https:// (plain http is only for loopback simulators)"
        ))),
    }
}

impl DataverseSettings {
    /// `token_url` overrides `https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token`.
    pub fn new(
        environment: &str,
        tenant_id: &str,
        client_id: &str,
        client_secret: Secret,
        token_url: Option<&str>,
    ) -> Result<Self, DataverseError> {
        let mut environment = checked_url("DYNAMICS_URL", environment)?;
        environment.set_path("/");
        let token_url = match token_url {
            Some(t) => checked_url("DYNAMICS_TOKEN_URL", t)?,
            None => {
                if tenant_id.trim().is_empty() {
                    return Err(DataverseError::Settings("DYNAMICS_TENANT_ID is empty".into()));
                }
                checked_url(
                    "the Entra ID token URL",
                    &format!(
                        "https://login.microsoftonline.com/{}/oauth2/v2.0/token",
                        tenant_id.trim()
                    ),
                )?
            }
        };
        if client_id.trim().is_empty() || client_secret.expose_secret().is_empty() {
            return Err(DataverseError::Settings(
                "DYNAMICS_CLIENT_ID and DYNAMICS_CLIENT_SECRET must both be set".into(),
            ));
        }
        Ok(DataverseSettings {
            environment,
            token_url,
            client_id: client_id.trim().to_owned(),
            client_secret,
            page_size: 5000,
            concurrency: 4,
        })
    }
}
