//! Marketo REST client for oppsync.
//!
//! - The identity token is cached per client id, refreshed before it runs out and on 601/602 (the
//!   call is then retried once); it is sent only as `Authorization: Bearer`.
//! - Every call goes through one [`Limiter`] per process: calls per window (default 50 per 20 s)
//!   and concurrent calls (default 5), Adobe's advice for one integration on a shared instance.
//! - A daily budget stops calls before they would pass it, leaving the rest of the 50,000 daily
//!   quota to the instance's other integrations.
//! - Writes are split into batches of at most 300 records and 1 MB, duplicates removed first;
//!   results are matched back to inputs by `seq` where Marketo sends it and by position where it
//!   does not (Sync Leads), and a record-level 1018 (native CRM sync) ends the call as one error.
//! - The identity request has the shape Adobe documents; no redirect is followed; no error
//!   carries a URL. docs/API-FIDELITY.md lists each behaviour with its source.
//! - Errors are typed at three levels (HTTP, response, record) and classified
//!   ([`ErrorClass`]) so callers know what to retry.

mod client;
mod error;
mod limiter;
mod operation;
mod settings;

pub use client::{
    CallLedger, FieldDescription, LeadRecord, MarketoClient, ObjectDescription, Preflight, RecordOutcome, RecordStatus,
    RoleKey, RoleRecord, Taken,
};
pub use error::{Disposition, ErrorClass, MarketoError, Reason, classify};
pub use limiter::{Limiter, LimiterSettings, LimitsConfig, Permit};
pub use operation::Operation;
pub use settings::{MarketoSettings, Secret, SettingsError};
