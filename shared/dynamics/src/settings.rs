//! Where Dataverse is and who we are: the environment and token URLs (https, or http on
//! loopback only), the app registration's credentials, and the tables oppsync reads.

use super::*;
use oppsync_support::input;

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
    SystemUsers,
}

impl EntitySet {
    pub fn name(self) -> &'static str {
        match self {
            EntitySet::Opportunities => "opportunities",
            EntitySet::Accounts => "accounts",
            EntitySet::Contacts => "contacts",
            EntitySet::Connections => "connections",
            EntitySet::ConnectionRoles => "connectionroles",
            EntitySet::SystemUsers => "systemusers",
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
            EntitySet::SystemUsers => "systemuser",
        }
    }
    pub fn key(self) -> &'static str {
        match self {
            EntitySet::Opportunities => "opportunityid",
            EntitySet::Accounts => "accountid",
            EntitySet::Contacts => "contactid",
            EntitySet::Connections => "connectionid",
            EntitySet::ConnectionRoles => "connectionroleid",
            EntitySet::SystemUsers => "systemuserid",
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

impl DataverseSettings {
    /// `token_url` overrides `https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token`.
    /// Each value is checked as it enters (shared with every entry point: `oppsync_support::input`).
    pub fn new(
        environment: &str,
        tenant_id: &str,
        client_id: &str,
        client_secret: Secret,
        token_url: Option<&str>,
    ) -> Result<Self, DataverseError> {
        let refused = |e: input::InputError| DataverseError::Settings(e.to_string());
        let mut environment =
            input::endpoint_url("DYNAMICS_URL", environment, "https://contoso.crm.dynamics.com").map_err(refused)?;
        environment.set_path("/");
        environment.set_query(None);
        environment.set_fragment(None);
        let token_url = match token_url {
            Some(t) => input::endpoint_url(
                "DYNAMICS_TOKEN_URL",
                t,
                "https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token",
            )
            .map_err(refused)?,
            None => {
                let tenant = tenant(tenant_id).map_err(refused)?;
                Url::parse(&format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"))
                    .map_err(|e| DataverseError::Settings(format!("the Entra ID token URL: {e}")))?
            }
        };
        let client_id = input::guid(
            "DYNAMICS_CLIENT_ID",
            client_id,
            "use the app registration's Application (client) ID, a GUID (Entra admin center > App registrations)",
        )
        .map_err(refused)?;
        input::text(
            "DYNAMICS_CLIENT_SECRET",
            client_secret.expose_secret(),
            input::MAX_TEXT,
            true,
        )
        .map_err(refused)?;
        Ok(DataverseSettings {
            environment,
            token_url,
            client_id,
            client_secret,
            page_size: 5000,
            concurrency: 4,
        })
    }
}

/// The Directory (tenant) ID: a GUID, or one of the tenant's domain names (Entra ID accepts
/// both in the token URL); nothing that could change the URL's path.
fn tenant(value: &str) -> Result<String, input::InputError> {
    let fix = "use the Directory (tenant) ID, a GUID (Entra admin center > Overview)";
    if let Ok(guid) = input::guid("DYNAMICS_TENANT_ID", value, fix) {
        return Ok(guid);
    }
    let name = input::text("DYNAMICS_TENANT_ID", value, 253, false)?;
    let domain = name.contains('.')
        && name.split('.').all(|label| {
            !label.is_empty() && label.len() <= 63 && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if domain {
        Ok(name.to_ascii_lowercase())
    } else {
        input::guid("DYNAMICS_TENANT_ID", value, fix)
    }
}
