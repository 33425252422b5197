//! The pipeline's edges as narrow traits: what it needs from Dataverse ([`DataversePort`]) and
//! from Marketo ([`MarketoPort`]), nothing more. The HTTP clients are the production adapters
//! (implemented below by forwarding); `memory` holds in-memory adapters so a step can be tested
//! without a socket. The state store's port is `oppsync_state::StateStore`.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;

use oppsync_dynamics::{ChangePage, DataverseClient, DataverseError, EntitySet, Watermark, WatermarkPage};
use oppsync_mapping::dataverse::Related;
use oppsync_mapping::{Guid, Opportunity, OpportunityId, RecordError};
use oppsync_marketo::{
    CallLedger, LeadRecord, MarketoClient, MarketoError, Preflight, RecordOutcome, RoleKey, RoleRecord,
};
use serde_json::Value;

/// What the pipeline reads from Dynamics (read-only by construction: there is nothing to write
/// with).
pub trait DataversePort: Clone + Send + Sync + 'static {
    /// One page of changes after `cursor` (`None` starts a full read).
    fn changes(
        &self,
        set: EntitySet,
        select: &[&str],
        cursor: Option<&str>,
    ) -> impl Future<Output = Result<ChangePage, DataverseError>> + Send;
    /// One page of the rows changed after a watermark (`link`: a previous page's `next`).
    fn watermark_page(
        &self,
        set: EntitySet,
        select: &[&str],
        from: &Watermark,
        link: Option<&str>,
    ) -> impl Future<Output = Result<WatermarkPage, DataverseError>> + Send;
    /// Every id in a table (the deletion scan).
    fn all_ids(&self, set: EntitySet) -> impl Future<Output = Result<BTreeSet<Guid>, DataverseError>> + Send;
    /// Opportunities by id, annotated, with the attributes in `select`.
    fn opportunities(
        &self,
        ids: &[OpportunityId],
        select: &[&str],
    ) -> impl Future<Output = Result<Vec<Value>, DataverseError>> + Send;
    /// Whether an opportunity exists, read by its key (confirms a row a batch read missed).
    fn opportunity_exists(&self, id: OpportunityId) -> impl Future<Output = Result<bool, DataverseError>> + Send;
    /// Everything the mapping needs for a batch: customers, stakeholders, accounts.
    fn related(
        &self,
        opportunities: &[Opportunity],
    ) -> impl Future<Output = Result<(Related, Vec<RecordError>), DataverseError>> + Send;
    /// Requests made so far (for metrics).
    fn requests(&self) -> u64;
}

/// What the pipeline writes to Marketo, by operation.
pub trait MarketoPort: Clone + Send + Sync + 'static {
    fn sync_opportunities(
        &self,
        records: &[Value],
    ) -> impl Future<Output = Result<Vec<RecordOutcome>, MarketoError>> + Send;
    fn delete_opportunities(
        &self,
        ids: &[String],
    ) -> impl Future<Output = Result<Vec<RecordOutcome>, MarketoError>> + Send;
    fn sync_roles(&self, roles: &[RoleRecord])
    -> impl Future<Output = Result<Vec<RecordOutcome>, MarketoError>> + Send;
    fn delete_roles(&self, keys: &[RoleKey]) -> impl Future<Output = Result<Vec<RecordOutcome>, MarketoError>> + Send;
    fn sync_companies(
        &self,
        records: &[Value],
    ) -> impl Future<Output = Result<Vec<RecordOutcome>, MarketoError>> + Send;
    /// Creates or updates sales persons (by externalSalesPersonId).
    fn sync_sales_persons(
        &self,
        records: &[Value],
    ) -> impl Future<Output = Result<Vec<RecordOutcome>, MarketoError>> + Send;
    /// Leads whose `field` is one of `values`.
    fn query_leads(
        &self,
        field: &str,
        values: &[String],
        fields: &[&str],
    ) -> impl Future<Output = Result<Vec<LeadRecord>, MarketoError>> + Send;
    /// Creates the leads that do not exist (Sync Leads `createOnly`): an existing lead is
    /// skipped (1005, or 1007 when several match) and never changed.
    fn create_leads(
        &self,
        lookup_field: &str,
        leads: &[Value],
    ) -> impl Future<Output = Result<Vec<RecordOutcome>, MarketoError>> + Send;
    /// Whether the instance takes opportunity writes (not a native-CRM-sync instance) and has
    /// every opportunity field in `fields`: the opportunity and role objects described.
    fn preflight(&self, fields: &[String]) -> impl Future<Output = Result<Preflight, MarketoError>> + Send;
    /// Seeds today's count of calls made by other processes (the daily budget).
    fn set_calls_today(&self, calls: u64);
    /// Counts each call in `ledger` before it is sent; false when this adapter counts no calls
    /// (then the caller adds them to the day's count after).
    fn count_calls_in(&self, ledger: Arc<dyn CallLedger>) -> bool;
    /// Takes 1/`sharers` of the call budget's rate and calls at once.
    fn share_limits_with(&self, sharers: usize);
    /// Calls made by this adapter, by operation.
    fn calls_by_endpoint(&self) -> BTreeMap<&'static str, u64>;
}

impl DataversePort for DataverseClient {
    fn changes(
        &self,
        set: EntitySet,
        select: &[&str],
        cursor: Option<&str>,
    ) -> impl Future<Output = Result<ChangePage, DataverseError>> + Send {
        DataverseClient::changes(self, set, select, cursor)
    }
    fn watermark_page(
        &self,
        set: EntitySet,
        select: &[&str],
        from: &Watermark,
        link: Option<&str>,
    ) -> impl Future<Output = Result<WatermarkPage, DataverseError>> + Send {
        DataverseClient::watermark_page(self, set, select, from, link)
    }
    fn all_ids(&self, set: EntitySet) -> impl Future<Output = Result<BTreeSet<Guid>, DataverseError>> + Send {
        DataverseClient::all_ids(self, set)
    }
    fn opportunities(
        &self,
        ids: &[OpportunityId],
        select: &[&str],
    ) -> impl Future<Output = Result<Vec<Value>, DataverseError>> + Send {
        DataverseClient::opportunities(self, ids, select)
    }
    async fn opportunity_exists(&self, id: OpportunityId) -> Result<bool, DataverseError> {
        DataverseClient::exists(self, EntitySet::Opportunities, &id.to_string()).await
    }
    fn related(
        &self,
        opportunities: &[Opportunity],
    ) -> impl Future<Output = Result<(Related, Vec<RecordError>), DataverseError>> + Send {
        DataverseClient::related(self, opportunities)
    }
    fn requests(&self) -> u64 {
        DataverseClient::requests(self)
    }
}

impl MarketoPort for MarketoClient {
    fn sync_opportunities(
        &self,
        records: &[Value],
    ) -> impl Future<Output = Result<Vec<RecordOutcome>, MarketoError>> + Send {
        MarketoClient::sync_opportunities(self, records)
    }
    fn delete_opportunities(
        &self,
        ids: &[String],
    ) -> impl Future<Output = Result<Vec<RecordOutcome>, MarketoError>> + Send {
        MarketoClient::delete_opportunities(self, ids)
    }
    fn sync_roles(
        &self,
        roles: &[RoleRecord],
    ) -> impl Future<Output = Result<Vec<RecordOutcome>, MarketoError>> + Send {
        MarketoClient::sync_roles(self, roles)
    }
    fn delete_roles(&self, keys: &[RoleKey]) -> impl Future<Output = Result<Vec<RecordOutcome>, MarketoError>> + Send {
        MarketoClient::delete_roles(self, keys)
    }
    fn sync_companies(
        &self,
        records: &[Value],
    ) -> impl Future<Output = Result<Vec<RecordOutcome>, MarketoError>> + Send {
        MarketoClient::sync_companies(self, records)
    }
    fn sync_sales_persons(
        &self,
        records: &[Value],
    ) -> impl Future<Output = Result<Vec<RecordOutcome>, MarketoError>> + Send {
        MarketoClient::sync_sales_persons(self, records)
    }
    fn query_leads(
        &self,
        field: &str,
        values: &[String],
        fields: &[&str],
    ) -> impl Future<Output = Result<Vec<LeadRecord>, MarketoError>> + Send {
        MarketoClient::query_leads(self, field, values, fields)
    }
    fn create_leads(
        &self,
        lookup_field: &str,
        leads: &[Value],
    ) -> impl Future<Output = Result<Vec<RecordOutcome>, MarketoError>> + Send {
        MarketoClient::create_leads(self, lookup_field, leads)
    }
    async fn preflight(&self, fields: &[String]) -> Result<Preflight, MarketoError> {
        let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
        MarketoClient::preflight(self, &fields).await
    }
    fn set_calls_today(&self, calls: u64) {
        MarketoClient::set_calls_today(self, calls)
    }
    fn count_calls_in(&self, ledger: Arc<dyn CallLedger>) -> bool {
        MarketoClient::count_calls_in(self, ledger);
        true
    }
    fn share_limits_with(&self, sharers: usize) {
        MarketoClient::share_limits_with(self, sharers)
    }
    fn calls_by_endpoint(&self) -> BTreeMap<&'static str, u64> {
        MarketoClient::calls_by_endpoint(self)
    }
}

/// The side a function has no access to: the poller and the transformer are not given the
/// Marketo secret, the writer not the Dynamics one (each role reads only the secret it uses).
/// Reaching it is a bug, and the error says so.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoAccess;

const NO_DYNAMICS: &str = "this function is not given Dynamics access (its role reads only the secrets it uses)";
const NO_MARKETO: &str = "this function is not given Marketo access (its role reads only the secrets it uses)";

fn no_marketo() -> MarketoError {
    MarketoError::Api {
        endpoint: "none",
        code: "no-access".into(),
        message: NO_MARKETO.into(),
    }
}

impl DataversePort for NoAccess {
    async fn changes(&self, _: EntitySet, _: &[&str], _: Option<&str>) -> Result<ChangePage, DataverseError> {
        Err(DataverseError::Settings(NO_DYNAMICS.into()))
    }
    async fn watermark_page(
        &self,
        _: EntitySet,
        _: &[&str],
        _: &Watermark,
        _: Option<&str>,
    ) -> Result<WatermarkPage, DataverseError> {
        Err(DataverseError::Settings(NO_DYNAMICS.into()))
    }
    async fn all_ids(&self, _: EntitySet) -> Result<BTreeSet<Guid>, DataverseError> {
        Err(DataverseError::Settings(NO_DYNAMICS.into()))
    }
    async fn opportunities(&self, _: &[OpportunityId], _: &[&str]) -> Result<Vec<Value>, DataverseError> {
        Err(DataverseError::Settings(NO_DYNAMICS.into()))
    }
    async fn opportunity_exists(&self, _: OpportunityId) -> Result<bool, DataverseError> {
        Err(DataverseError::Settings(NO_DYNAMICS.into()))
    }
    async fn related(&self, _: &[Opportunity]) -> Result<(Related, Vec<RecordError>), DataverseError> {
        Err(DataverseError::Settings(NO_DYNAMICS.into()))
    }
    fn requests(&self) -> u64 {
        0
    }
}

impl MarketoPort for NoAccess {
    async fn sync_opportunities(&self, _: &[Value]) -> Result<Vec<RecordOutcome>, MarketoError> {
        Err(no_marketo())
    }
    async fn delete_opportunities(&self, _: &[String]) -> Result<Vec<RecordOutcome>, MarketoError> {
        Err(no_marketo())
    }
    async fn sync_roles(&self, _: &[RoleRecord]) -> Result<Vec<RecordOutcome>, MarketoError> {
        Err(no_marketo())
    }
    async fn delete_roles(&self, _: &[RoleKey]) -> Result<Vec<RecordOutcome>, MarketoError> {
        Err(no_marketo())
    }
    async fn sync_companies(&self, _: &[Value]) -> Result<Vec<RecordOutcome>, MarketoError> {
        Err(no_marketo())
    }
    async fn sync_sales_persons(&self, _: &[Value]) -> Result<Vec<RecordOutcome>, MarketoError> {
        Err(no_marketo())
    }
    async fn query_leads(&self, _: &str, _: &[String], _: &[&str]) -> Result<Vec<LeadRecord>, MarketoError> {
        Err(no_marketo())
    }
    async fn create_leads(&self, _: &str, _: &[Value]) -> Result<Vec<RecordOutcome>, MarketoError> {
        Err(no_marketo())
    }
    async fn preflight(&self, _: &[String]) -> Result<Preflight, MarketoError> {
        Err(no_marketo())
    }
    fn set_calls_today(&self, _: u64) {}
    fn count_calls_in(&self, _: Arc<dyn CallLedger>) -> bool {
        false
    }
    fn share_limits_with(&self, _: usize) {}
    fn calls_by_endpoint(&self) -> BTreeMap<&'static str, u64> {
        BTreeMap::new()
    }
}
