//! Dataverse opportunity records in, a Marketo plan out.
//!
//! This crate is pure: no network, no clock, no AWS, no async. It holds the rules of Marketo's
//! native Dynamics opportunity sync ([`rules`]), the configurable field selection ([`config`],
//! [`convert`]) and the plan with its hash ([`plan`]). The pipeline feeds it records read in
//! batches and hands its plans to the Marketo writer.
//!
//! ```
//! use oppsync_mapping::{Change, Mapping, Opportunity, Related, plan_change};
//! let opportunity = Opportunity::from_json(serde_json::json!({
//!     "opportunityid": "6f3b2c1a-0e4d-4b7a-9c1d-00aa11bb22cc",
//!     "name": "Fifty laptops",
//!     "statecode": 0,
//! })).unwrap();
//! let plan = plan_change(&Mapping::default(), &Change::Upserted(opportunity), &Related::new(), &[]);
//! assert!(plan.writes_anything());
//! ```

pub mod config;
pub mod convert;
pub mod dataverse;
pub mod ids;
pub mod plan;
pub mod rules;
pub mod suggest;

pub use config::{ConfigError, ConfigErrors, LeadMatch, Mapping, MappingConfig};
pub use dataverse::{Account, Connection, ConnectionRole, Contact, Opportunity, RecordError, Related, SystemUser};
pub use ids::{AccountId, ContactId, Guid, GuidError, OpportunityId, UserId};
pub use plan::{
    Action, Change, Company, Desired, Lead, Plan, PlanHash, Role, SalesPerson, Warning, WrittenRole, plan_change,
    plan_delete, plan_delete_excluded, plan_upsert,
};
