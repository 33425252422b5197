//! The Marketo plan for one opportunity: what to write, computed from Dataverse records and the
//! role set last written, with a stable hash of the desired state.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use xxhash_rust::xxh3::xxh3_128;

use crate::config::{LeadMatch, Mapping};
use crate::convert::FieldOutcome;
use crate::dataverse::{Opportunity, Related, Table};
use crate::ids::{AccountId, ContactId, OpportunityId, UserId};
use crate::rules::{apply_customer_rules, potential_customer, stakeholder_roles};

/// Marketo's length for the opportunity role's `role` field.
pub const MARKETO_ROLE_MAX: usize = 50;

/// A change read from Dataverse.
// Nearly every change is an upsert: boxing it would add an allocation to each and save nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Upserted(Opportunity),
    Deleted(OpportunityId),
}

impl Change {
    pub fn opportunity_id(&self) -> OpportunityId {
        match self {
            Change::Upserted(o) => o.id,
            Change::Deleted(id) => *id,
        }
    }
}

/// Something the operator should know about a plan; the plan is still usable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Warning {
    /// The Marketo field, or `customerid` / `stakeholders` / `sync_filter` / `leads`.
    pub field: String,
    pub message: String,
}

impl Warning {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Warning {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A Marketo company, upserted by `externalCompanyId` before the opportunity refers to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Company {
    pub external_company_id: AccountId,
    /// The account's name; `None` when the account could not be read (a warning says so).
    pub name: Option<String>,
}

/// A Marketo sales person, upserted by `externalSalesPersonId` before the opportunity that
/// names it: the opportunity's owner when the owner is a user.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SalesPerson {
    pub external_sales_person_id: UserId,
    /// `None` when the user could not be read (a warning says so) or has none.
    pub email: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
}

/// Personal data stays out of logs: the id only.
impl fmt::Debug for SalesPerson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SalesPerson")
            .field("external_sales_person_id", &self.external_sales_person_id)
            .finish_non_exhaustive()
    }
}

/// A contact that a role needs as a Marketo lead.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Lead {
    pub contact: ContactId,
    pub email: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
}

/// An opportunity role to ensure. Marketo's key is (externalOpportunityId, leadId, role).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Role {
    pub contact: ContactId,
    pub role: String,
    pub is_primary: bool,
}

/// A role as last written to Marketo, kept in the sync state.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WrittenRole {
    pub contact: ContactId,
    pub role: String,
    /// The Marketo lead id the role was written with, when known.
    pub lead_id: Option<i64>,
}

/// The Marketo records an opportunity should have.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Desired {
    pub company: Option<Company>,
    /// The owner as a sales person (`[mapping] sales_persons`). Absent from the stored form
    /// when there is none, so plans made without sales persons keep their hashes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sales_person: Option<SalesPerson>,
    /// Marketo opportunity fields, `externalOpportunityId` and `externalCompanyId` included.
    pub opportunity: BTreeMap<String, Value>,
    pub leads: Vec<Lead>,
    pub roles: Vec<Role>,
}

/// What to do in Marketo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
// Nearly every plan is an upsert: boxing it would add an allocation to each and save nothing.
#[allow(clippy::large_enum_variant)]
pub enum Action {
    /// Create or update the opportunity, its company, leads and roles.
    Upsert(Desired),
    /// The opportunity was deleted in Dynamics: delete it (and its roles) in Marketo.
    Delete,
    /// Filtered out by the sync filter: no Marketo call, nothing deleted. (Stored as
    /// `excluded`, its earlier name, so stored plans and their hashes stay valid.)
    #[serde(rename = "excluded")]
    Filtered,
    /// Deleted in Dynamics but the delete policy keeps Marketo's copy. (Stored as `keep`.)
    #[serde(rename = "keep")]
    Kept,
}

/// A 128-bit hash of the desired Marketo state (xxh3 over canonical JSON): stable across runs,
/// processes and versions of this crate as long as the plan's shape is unchanged.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PlanHash(pub u128);

impl fmt::Display for PlanHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for PlanHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PlanHash({self})")
    }
}

impl Serialize for PlanHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PlanHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(d)?;
        u128::from_str_radix(&text, 16)
            .map(PlanHash)
            .map_err(|_| serde::de::Error::custom(format!("`{text}` is not a plan hash (32 hex digits)")))
    }
}

/// The plan for one opportunity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub opportunity_id: OpportunityId,
    /// The Dataverse `versionnumber` this plan reflects (none for a deletion).
    pub source_version: Option<i64>,
    pub action: Action,
    /// Roles written before that this plan removes. Not part of the hash: they depend on what
    /// was written, not on what is wanted.
    pub role_deletions: Vec<WrittenRole>,
    pub warnings: Vec<Warning>,
    pub hash: PlanHash,
}

impl Plan {
    /// Whether the plan needs any Marketo call.
    pub fn writes_anything(&self) -> bool {
        matches!(self.action, Action::Upsert(_) | Action::Delete) || !self.role_deletions.is_empty()
    }
}

fn hash_of(opportunity_id: OpportunityId, action: &Action) -> PlanHash {
    thread_local! {
        // Reused across plans: one-shot hashing of a buffer is several times faster than
        // streaming serde's many small writes into the hasher.
        static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    BUFFER.with_borrow_mut(|buffer| {
        buffer.clear();
        // Everything inside `action` is sorted (BTreeMap fields, sorted leads and roles), so the
        // serialization is canonical. Serializing plain data into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *buffer, &(opportunity_id, action));
        PlanHash(xxh3_128(buffer))
    })
}

/// Plans one change. Never fails: a record that could not be parsed never got here, and every
/// per-field or per-role problem is a warning on the plan.
pub fn plan_change(mapping: &Mapping, change: &Change, related: &Related, written_roles: &[WrittenRole]) -> Plan {
    match change {
        Change::Upserted(opportunity) => plan_upsert(mapping, opportunity, related, written_roles),
        Change::Deleted(id) => plan_delete(mapping, *id, written_roles),
    }
}

/// Plans a deleted opportunity: its roles and then itself are deleted in Marketo, unless the
/// delete policy keeps them.
pub fn plan_delete(mapping: &Mapping, id: OpportunityId, written_roles: &[WrittenRole]) -> Plan {
    let (action, role_deletions) = if mapping.delete_opportunities {
        let mut roles = written_roles.to_vec();
        roles.sort();
        roles.dedup();
        (Action::Delete, roles)
    } else {
        (Action::Kept, Vec::new())
    };
    Plan {
        opportunity_id: id,
        source_version: None,
        hash: hash_of(id, &action),
        action,
        role_deletions,
        warnings: Vec::new(),
    }
}

/// Plans the deletion of an opportunity the sync filter excluded: oppsync left it alone while it
/// was excluded, and leaves it alone now (README: the filter deletes nothing). Marketo keeps
/// what it holds; the record ends deleted in the state.
pub fn plan_delete_excluded(id: OpportunityId) -> Plan {
    let action = Action::Kept;
    Plan {
        opportunity_id: id,
        source_version: None,
        hash: hash_of(id, &action),
        action,
        role_deletions: Vec::new(),
        warnings: Vec::new(),
    }
}

/// The sync filter: only an explicit false excludes; true → false stops updates and deletes
/// nothing.
pub fn excluded_by_sync_filter(mapping: &Mapping, opportunity: &Opportunity, warnings: &mut Vec<Warning>) -> bool {
    let Some(attr) = &mapping.sync_filter else {
        return false;
    };
    match opportunity.attribute(attr) {
        Some(Value::Bool(false)) => true,
        None | Some(Value::Null) | Some(Value::Bool(true)) => false,
        Some(other) => {
            warnings.push(Warning::new(
                "sync_filter",
                format!("`{attr}` is not a boolean ({other}); only an explicit false excludes, so the record syncs"),
            ));
            false
        }
    }
}

/// Plans an opportunity that exists in Dynamics.
pub fn plan_upsert(
    mapping: &Mapping,
    opportunity: &Opportunity,
    related: &Related,
    written_roles: &[WrittenRole],
) -> Plan {
    let mut warnings = Vec::new();
    let id = opportunity.id;
    if excluded_by_sync_filter(mapping, opportunity, &mut warnings) {
        let action = Action::Filtered;
        return Plan {
            opportunity_id: id,
            source_version: opportunity.version,
            hash: hash_of(id, &action),
            action,
            role_deletions: Vec::new(),
            warnings,
        };
    }

    let mut fields = BTreeMap::new();
    for rule in &mapping.fields {
        match rule.apply(opportunity) {
            FieldOutcome::Set(v) => {
                fields.insert(rule.marketo.to_string(), v);
            }
            FieldOutcome::SetWithWarning(v, w) => {
                fields.insert(rule.marketo.to_string(), v);
                warnings.push(Warning::new(&*rule.marketo, w));
            }
            FieldOutcome::Omit => {}
            FieldOutcome::Warn(w) => warnings.push(Warning::new(&*rule.marketo, w)),
        }
    }

    let customer = potential_customer(&opportunity.customer, related, &mut warnings);
    let outcome = apply_customer_rules(customer, related, &mut warnings);
    let company = outcome.account.map(|account| {
        let name = related.accounts.get(&account).and_then(|a| a.name.clone());
        if !related.accounts.contains_key(&account) {
            warnings.push(Warning::new(
                "externalCompanyId",
                format!("account {account} could not be read; the company is upserted without a name"),
            ));
        }
        Company {
            external_company_id: account,
            name,
        }
    });
    fields.insert(
        crate::config::EXTERNAL_COMPANY_ID.to_owned(),
        outcome.account.map_or(Value::Null, |a| Value::String(a.to_string())),
    );

    let sales_person = if mapping.sales_persons {
        let person = sales_person_for(opportunity, related, &mut warnings);
        fields.insert(
            crate::config::EXTERNAL_SALES_PERSON_ID.to_owned(),
            person
                .as_ref()
                .map_or(Value::Null, |p| Value::String(p.external_sales_person_id.to_string())),
        );
        person
    } else {
        None
    };

    // Roles by (contact, role name); the customer role is primary and wins a tie.
    // Contacts whose roles cannot be known now (the contact or its connection role could not be
    // read): what was written for them is kept, not deleted, until they can be read.
    let mut unreadable: BTreeSet<ContactId> = BTreeSet::new();
    let mut wanted: BTreeMap<(ContactId, String), bool> =
        stakeholder_roles(id, mapping, related, &mut warnings, &mut unreadable)
            .into_keys()
            .map(|k| (k, false))
            .collect();
    if let Some(contact) = outcome.contact_role {
        wanted.insert((contact, mapping.customer_role.clone()), true);
    }

    let mut leads: BTreeMap<ContactId, Lead> = BTreeMap::new();
    let mut roles = Vec::with_capacity(wanted.len());
    for ((contact, role), is_primary) in wanted {
        if let std::collections::btree_map::Entry::Vacant(slot) = leads.entry(contact) {
            match lead_for(mapping, contact, related) {
                Ok(lead) => {
                    slot.insert(lead);
                }
                Err(message) => {
                    if !related.contacts.contains_key(&contact) {
                        unreadable.insert(contact);
                    }
                    warnings.push(Warning::new("leads", format!("{message}; role \"{role}\" is skipped")));
                    continue;
                }
            }
        }
        roles.push(Role {
            contact,
            role,
            is_primary,
        });
    }

    let role_deletions = if mapping.delete_roles {
        let mut gone: Vec<WrittenRole> = written_roles
            .iter()
            .filter(|w| !roles.iter().any(|r| r.contact == w.contact && r.role == w.role))
            .filter(|w| {
                let keep = unreadable.contains(&w.contact);
                if keep {
                    warnings.push(Warning::new(
                        "roles",
                        format!(
                            "contact {} could not be read; its role \"{}\" is kept in Marketo until it can be",
                            w.contact, w.role
                        ),
                    ));
                }
                !keep
            })
            .cloned()
            .collect();
        gone.sort();
        gone.dedup();
        gone
    } else {
        Vec::new()
    };

    let action = Action::Upsert(Desired {
        company,
        sales_person,
        opportunity: fields,
        leads: leads.into_values().collect(),
        roles,
    });
    Plan {
        opportunity_id: id,
        source_version: opportunity.version,
        hash: hash_of(id, &action),
        action,
        role_deletions,
        warnings,
    }
}

/// The owner rule: an opportunity owned by a user gets that user as its sales person; one owned
/// by a team gets none (a Marketo sales person is a person, and a team has no one email), so
/// its `externalSalesPersonId` is emptied and a warning names the team.
fn sales_person_for(opportunity: &Opportunity, related: &Related, warnings: &mut Vec<Warning>) -> Option<SalesPerson> {
    let field = crate::config::EXTERNAL_SALES_PERSON_ID;
    let Some(owner) = opportunity.owner else {
        if opportunity.attribute("_ownerid_value").is_some_and(|v| !v.is_null()) {
            warnings.push(Warning::new(
                field,
                "the owner (_ownerid_value) is not a GUID; the opportunity has no sales person",
            ));
        }
        return None;
    };
    let user = UserId(owner.id);
    match owner.table {
        Some(Table::Team) => {
            warnings.push(Warning::new(
                field,
                format!("the owner is team {}; a team is not a sales person, so the opportunity has none in Marketo (assign a user in Dynamics to give it one)", owner.id),
            ));
            None
        }
        Some(Table::User) | None if related.users.contains_key(&user) || owner.table.is_some() => {
            let record = related.users.get(&user);
            if record.is_none() {
                warnings.push(Warning::new(
                    field,
                    format!("user {user} could not be read; the sales person is upserted without an email or a name"),
                ));
            }
            Some(SalesPerson {
                external_sales_person_id: user,
                email: record.and_then(|u| u.email.clone()).filter(|e| is_email(e)),
                first_name: record.and_then(|u| u.first_name.clone()),
                last_name: record.and_then(|u| u.last_name.clone()),
            })
        }
        _ => {
            warnings.push(Warning::new(
                field,
                format!(
                    "the owner {} is neither a readable user nor a team; the opportunity has no sales person",
                    owner.id
                ),
            ));
            None
        }
    }
}

/// The lead a contact becomes, or why it cannot become one.
fn lead_for(mapping: &Mapping, contact: ContactId, related: &Related) -> Result<Lead, String> {
    let Some(record) = related.contacts.get(&contact) else {
        return Err(format!("contact {contact} could not be read"));
    };
    let email = record.email.as_deref().map(str::trim);
    let valid_email = email.filter(|e| is_email(e)).map(str::to_owned);
    if mapping.lead_match == LeadMatch::Email && valid_email.is_none() {
        return Err(match email {
            None => format!("contact {contact} has no email, and leads are matched by email"),
            // The value itself is personal data: the message names the contact, not the address.
            Some(e) => format!(
                "contact {contact}'s email ({} characters) is not a valid address, and leads are matched by email; correct it in Dynamics",
                e.chars().count()
            ),
        });
    }
    Ok(Lead {
        contact,
        email: valid_email,
        first_name: record.first_name.clone(),
        last_name: record.last_name.clone(),
    })
}

/// A plausible email address: one `@`, a non-empty local part, a dotted domain, no spaces,
/// at most 254 characters. Marketo does its own checks; this keeps obvious junk out.
pub fn is_email(text: &str) -> bool {
    let Some((local, domain)) = text.split_once('@') else {
        return false;
    };
    text.len() <= 254
        && !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !text.chars().any(|c| c.is_whitespace() || c.is_control())
}
