//! Read-only Dataverse Web API client for oppsync.
//!
//! Read-only by construction: the only request that is not a GET is the Entra ID token request,
//! and nothing public can build another.
//!
//! - Token: client credentials against Entra ID (or `DYNAMICS_TOKEN_URL`), scope
//!   `{environment}/.default`, cached and refreshed before it runs out; a 401 from the Web API
//!   refreshes once and retries.
//! - Change detection: change tracking ([`DataverseClient::changes`], delta links, `$deletedEntity`
//!   rows; an expired delta token restarts a full read of that table, logged) or a watermark on
//!   `versionnumber` / `modifiedon` ([`DataverseClient::watermark_changes`]) with a full id scan
//!   ([`DataverseClient::all_ids`]) to find deletions.
//! - Paging: `Prefer: odata.maxpagesize`; `@odata.nextLink` followed verbatim, only to the
//!   environment's own host; one page per call, so the caller records a page before it stores the
//!   cursor that follows it.
//! - Related reads for a batch: `Microsoft.Dynamics.CRM.In` filters chunked under the 32 KB URL
//!   limit ([`DataverseClient::related`]).
//! - Service protection: 429 waits exactly `Retry-After`; 5xx, timeouts and garbled answers retry
//!   with capped exponential backoff and jitter; concurrency is bounded.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use oppsync_mapping::dataverse::{ParentCustomer, Related, Table};
use oppsync_mapping::{ContactId, Guid, Opportunity, OpportunityId, RecordError};
use reqwest::{StatusCode, Url};
use serde_json::Value;
use tokio::sync::{Mutex, Semaphore};
use tokio::time::Instant;

/// Dataverse's "Version stamp associated with the client has expired".
pub const EXPIRED_VERSION_STAMP: &str = "0x80044352";
const ANNOTATIONS: &str =
    "odata.include-annotations=\"OData.Community.Display.V1.FormattedValue,Microsoft.Dynamics.CRM.lookuplogicalname\"";
/// Dataverse's URL limit for a GET (32 KB, dataverse.md), less 2 KB for the `$skiptoken` a
/// next link adds to the same query (the page-results page's example cookie is about 420 bytes).
pub const MAX_GET_URL: usize = 32 * 1024 - 2 * 1024;
const MAX_ATTEMPTS: u32 = 6;

mod changes;
mod client;
mod error;
mod metadata;
mod options;
mod related;
mod settings;

pub use changes::{ChangePage, Watermark, WatermarkPage, contacts_touched, opportunities_touched};
pub use client::DataverseClient;
pub use error::DataverseError;
use error::{odata_error, redirect_host};
pub use metadata::AttributeDefinition;
pub use options::{ChangeDetection, DataverseOptions};
pub use settings::{DataverseSettings, EntitySet, Secret};
