//! Cold start: the environment, the two secrets, the configuration, the clients. Everything is
//! checked here, once per execution environment, so that a mistake fails the first invocation
//! with a message that names it, not the thousandth record.

use secrecy::ExposeSecret;

use oppsync_dynamics::{DataverseClient, DataverseSettings};
use oppsync_marketo::{Limiter, LimiterSettings, MarketoClient, MarketoSettings};
use oppsync_pipeline::{Config, NoAccess, Pipeline};
use oppsync_state::DynamoStore;
use serde::Deserialize;

/// The environment variables the template sets.
pub const ENV_TABLE: &str = "STATE_TABLE";
pub const ENV_DYNAMICS_SECRET: &str = "DYNAMICS_SECRET_ARN";
pub const ENV_MARKETO_SECRET: &str = "MARKETO_SECRET_ARN";
/// The configuration file's text (TOML); empty or unset means the defaults.
pub const ENV_CONFIG: &str = "OPPSYNC_CONFIG";
/// How many execution environments share the Marketo budget (the writer's and the resync
/// function's reserved concurrency together); each takes its share of the limits.
pub const ENV_MARKETO_SHARE: &str = "MARKETO_BUDGET_SHARE";

/// Why a function cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ColdStartError {
    #[error("missing environment variables: {}; the SAM template sets them, check the function's configuration", .0.join(", "))]
    MissingEnv(Vec<&'static str>),
    #[error("{name} is {value}: {problem}")]
    BadEnv {
        name: &'static str,
        value: String,
        problem: String,
    },
    #[error("reading the {system} secret ({arn}) from Secrets Manager failed: {message}")]
    SecretRead {
        system: &'static str,
        arn: String,
        message: String,
    },
    #[error(
        "the {system} secret is not the expected JSON: {problem}. Fix: store {shape} (README.md, section Deploy to AWS)"
    )]
    SecretShape {
        system: &'static str,
        problem: String,
        shape: &'static str,
    },
    #[error("{0}")]
    Config(#[from] oppsync_pipeline::ConfigError),
    #[error("the {system} settings are invalid: {message}")]
    Settings { system: &'static str, message: String },
}

/// The environment, read and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub table: String,
    pub dynamics_secret_arn: String,
    pub marketo_secret_arn: String,
    pub config: String,
    pub marketo_share: u32,
}

/// Which systems a function reaches, so which secrets it reads (and may read: its role names
/// only those).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    pub dynamics: bool,
    pub marketo: bool,
}

impl Needs {
    pub const BOTH: Needs = Needs {
        dynamics: true,
        marketo: true,
    };
}

impl Env {
    /// Reads the environment through `get` (the process environment in `main`, a map in tests);
    /// every missing variable is named at once. Both secrets are required.
    pub fn read(get: impl Fn(&str) -> Option<String>) -> Result<Env, ColdStartError> {
        Env::read_for(get, Needs::BOTH)
    }

    /// [`Env::read`] for a function that reaches only the systems in `needs`: the other secret's
    /// variable is neither required nor read.
    pub fn read_for(get: impl Fn(&str) -> Option<String>, needs: Needs) -> Result<Env, ColdStartError> {
        let mut missing = Vec::new();
        let mut need = |name: &'static str| match get(name).filter(|v| !v.trim().is_empty()) {
            Some(v) => v,
            None => {
                missing.push(name);
                String::new()
            }
        };
        let table = need(ENV_TABLE);
        let dynamics_secret_arn = if needs.dynamics {
            need(ENV_DYNAMICS_SECRET)
        } else {
            String::new()
        };
        let marketo_secret_arn = if needs.marketo {
            need(ENV_MARKETO_SECRET)
        } else {
            String::new()
        };
        if !missing.is_empty() {
            return Err(ColdStartError::MissingEnv(missing));
        }
        let marketo_share = match get(ENV_MARKETO_SHARE) {
            None => 1,
            Some(text) => oppsync_support::input::number(ENV_MARKETO_SHARE, &text, 1..=10).map_err(|e| {
                ColdStartError::BadEnv {
                    name: ENV_MARKETO_SHARE,
                    value: oppsync_support::input::shown(&text),
                    problem: format!(
                        "{}; it is the reserved concurrency of the functions that write to Marketo",
                        e.fix
                    ),
                }
            })?,
        };
        Ok(Env {
            table,
            dynamics_secret_arn,
            marketo_secret_arn,
            config: get(ENV_CONFIG).unwrap_or_default(),
            marketo_share,
        })
    }
}

/// A secret string that never prints (`secrecy`, read straight from the secret's JSON).
pub type Hidden = secrecy::SecretString;

/// The Dynamics secret: `{"url", "tenantId", "clientId", "clientSecret", "tokenUrl"?}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DynamicsSecret {
    pub url: String,
    pub tenant_id: String,
    pub client_id: String,
    pub client_secret: Hidden,
    #[serde(default)]
    pub token_url: Option<String>,
}

/// The Marketo secret: `{"url", "clientId", "clientSecret"}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MarketoSecret {
    pub url: String,
    pub client_id: String,
    pub client_secret: Hidden,
}

pub const DYNAMICS_SHAPE: &str = r#"{"url": "https://<org>.crm.dynamics.com", "tenantId": "<guid>", "clientId": "<guid>", "clientSecret": "<secret>"} (optional "tokenUrl")"#;
pub const MARKETO_SHAPE: &str =
    r#"{"url": "https://<munchkin-id>.mktorest.com", "clientId": "<id>", "clientSecret": "<secret>"}"#;

fn parse_secret<T: for<'de> Deserialize<'de>>(
    text: &str,
    system: &'static str,
    shape: &'static str,
) -> Result<T, ColdStartError> {
    // serde_json's messages name the field, never the value, so no secret leaks into them.
    serde_json::from_str(text).map_err(|e| ColdStartError::SecretShape {
        system,
        problem: e.to_string(),
        shape,
    })
}

impl DynamicsSecret {
    pub fn parse(text: &str) -> Result<Self, ColdStartError> {
        parse_secret(text, "Dynamics", DYNAMICS_SHAPE)
    }

    pub fn client(&self, config: &Config) -> Result<DataverseClient, ColdStartError> {
        let settings_err = |e: oppsync_dynamics::DataverseError| ColdStartError::Settings {
            system: "Dynamics",
            message: e.to_string(),
        };
        let mut settings = DataverseSettings::new(
            &self.url,
            &self.tenant_id,
            &self.client_id,
            oppsync_dynamics::Secret::from(self.client_secret.expose_secret()),
            self.token_url.as_deref(),
        )
        .map_err(settings_err)?;
        settings.page_size = config.dataverse.page_size;
        settings.concurrency = config.dataverse.concurrency;
        DataverseClient::new(settings).map_err(settings_err)
    }
}

impl MarketoSecret {
    pub fn parse(text: &str) -> Result<Self, ColdStartError> {
        parse_secret(text, "Marketo", MARKETO_SHAPE)
    }

    /// The client, with this environment's share of the configured limits.
    pub fn client(&self, config: &Config, share: u32) -> Result<MarketoClient, ColdStartError> {
        let settings = MarketoSettings::new(
            &self.url,
            &self.client_id,
            oppsync_marketo::Secret::from(self.client_secret.expose_secret()),
        )
        .map_err(|e| ColdStartError::Settings {
            system: "Marketo",
            message: e.to_string(),
        })?;
        let limits = share_limits(config.marketo.limiter(), share);
        MarketoClient::new(settings, Limiter::new(limits), config.marketo.daily_budget).map_err(|e| {
            ColdStartError::Settings {
                system: "Marketo",
                message: e.to_string(),
            }
        })
    }
}

/// One environment's part of the limits when `share` environments may run at once.
pub fn share_limits(limits: LimiterSettings, share: u32) -> LimiterSettings {
    let share = share.max(1) as usize;
    LimiterSettings {
        calls_per_window: (limits.calls_per_window / share).max(1),
        window: limits.window,
        concurrency: (limits.concurrency / share).max(1),
    }
}

/// Reads a secret's string value.
async fn read_secret(
    client: &aws_sdk_secretsmanager::Client,
    arn: &str,
    system: &'static str,
) -> Result<String, ColdStartError> {
    let out = client.get_secret_value().secret_id(arn).send().await.map_err(|e| {
        use aws_sdk_secretsmanager::error::ProvideErrorMetadata;
        // The code and message say what is wrong; the raw response adds nothing.
        let message = match (e.code(), e.message()) {
            (Some(code), Some(message)) => format!("{code}: {message}"),
            _ => aws_sdk_secretsmanager::error::DisplayErrorContext(&e).to_string(),
        };
        ColdStartError::SecretRead {
            system,
            arn: arn.to_owned(),
            message,
        }
    })?;
    out.secret_string.ok_or_else(|| ColdStartError::SecretRead {
        system,
        arn: arn.to_owned(),
        message: "the secret has no string value (a binary secret?); store it as JSON text".into(),
    })
}

/// One side of a pipeline as a cold start opens it: a client built from its secret, or
/// [`NoAccess`] for a function that does not reach that system (and reads no secret for it).
pub trait Access: Sized {
    /// The system whose secret this reads, if any.
    const SYSTEM: Option<&'static str>;
    fn open(secret: Option<&str>, config: &Config, env: &Env) -> Result<Self, ColdStartError>;
}

impl Access for DataverseClient {
    const SYSTEM: Option<&'static str> = Some("Dynamics");
    fn open(secret: Option<&str>, config: &Config, _: &Env) -> Result<Self, ColdStartError> {
        DynamicsSecret::parse(secret.unwrap_or_default())?.client(config)
    }
}

impl Access for MarketoClient {
    const SYSTEM: Option<&'static str> = Some("Marketo");
    fn open(secret: Option<&str>, config: &Config, env: &Env) -> Result<Self, ColdStartError> {
        MarketoSecret::parse(secret.unwrap_or_default())?.client(config, env.marketo_share)
    }
}

impl Access for NoAccess {
    const SYSTEM: Option<&'static str> = None;
    fn open(_: Option<&str>, _: &Config, _: &Env) -> Result<Self, ColdStartError> {
        Ok(NoAccess)
    }
}

/// What a function with sides `D` and `M` needs from its environment.
pub fn needs<D: Access, M: Access>() -> Needs {
    Needs {
        dynamics: D::SYSTEM.is_some(),
        marketo: M::SYSTEM.is_some(),
    }
}

/// Builds the pipeline the resync function runs (both systems).
pub async fn build(env: &Env, aws: &aws_config::SdkConfig) -> Result<Pipeline<DynamoStore>, ColdStartError> {
    build_with::<DataverseClient, MarketoClient>(env, aws).await
}

/// Builds the pipeline a function runs: configuration first (no network needed to find a
/// mistake in it), then the secrets its sides need (only those), then the clients.
pub async fn build_with<D: Access, M: Access>(
    env: &Env,
    aws: &aws_config::SdkConfig,
) -> Result<Pipeline<DynamoStore, D, M>, ColdStartError> {
    let config = if env.config.trim().is_empty() {
        Config::default()
    } else {
        Config::from_toml(&env.config, ENV_CONFIG)?
    };
    if D::SYSTEM.is_some() {
        config.dataverse.log();
    }
    let secrets = aws_sdk_secretsmanager::Client::new(aws);
    let fetching = std::time::Instant::now();
    let dynamics = match D::SYSTEM {
        Some(system) => Some(read_secret(&secrets, &env.dynamics_secret_arn, system).await?),
        None => None,
    };
    let marketo = match M::SYSTEM {
        Some(system) => Some(read_secret(&secrets, &env.marketo_secret_arn, system).await?),
        None => None,
    };
    // The one network round trip of a cold start, logged apart so init is measured without it
    // (docs/PERFORMANCE.md, cold start).
    tracing::info!(secrets_ms = fetching.elapsed().as_secs_f64() * 1000.0, "secrets read");
    let dataverse = D::open(dynamics.as_deref(), &config, env)?;
    let marketo = M::open(marketo.as_deref(), &config, env)?;
    Ok(Pipeline::new(
        DynamoStore::new(aws_sdk_dynamodb::Client::new(aws), env.table.clone()),
        dataverse,
        marketo,
        config,
        std::env::var("AWS_LAMBDA_LOG_STREAM_NAME").unwrap_or_else(|_| format!("pid-{}", std::process::id())),
    ))
}

/// The whole cold start from the process environment, for a function with sides `D` and `M`.
pub async fn from_process_env<D: Access, M: Access>() -> Result<Pipeline<DynamoStore, D, M>, ColdStartError> {
    let env = Env::read_for(|k| std::env::var(k).ok(), needs::<D, M>())?;
    let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    build_with::<D, M>(&env, &aws).await
}
