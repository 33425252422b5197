//! Dataverse Web API records as the mapping needs them, parsed from the JSON the Web API returns.
//!
//! Lookups arrive as `_x_value` GUIDs with the `@Microsoft.Dynamics.CRM.lookuplogicalname`
//! annotation naming the table of a polymorphic lookup; option sets and lookups may carry an
//! `@OData.Community.Display.V1.FormattedValue` label. Money is a JSON number, DateOnly a
//! `YYYY-MM-DD` string, BigInt (`versionnumber`) a number or, with `IEEE754Compatible`, a string.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::ids::{AccountId, ContactId, Guid, GuidError, OpportunityId, UserId};

/// Suffix of the formatted-value annotation (option set labels, lookup names, formatted money).
pub const FORMATTED_VALUE: &str = "@OData.Community.Display.V1.FormattedValue";
/// Suffix of the annotation naming the table a polymorphic lookup points at.
pub const LOOKUP_LOGICAL_NAME: &str = "@Microsoft.Dynamics.CRM.lookuplogicalname";

/// Object type codes used by `connection.record{1,2}objecttypecode`.
const OBJECT_TYPE_ACCOUNT: i64 = 1;
const OBJECT_TYPE_CONTACT: i64 = 2;
const OBJECT_TYPE_OPPORTUNITY: i64 = 3;

/// A Dataverse row that cannot be used at all. Per-field problems are plan warnings instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("{entity} record is not a JSON object")]
    NotAnObject { entity: &'static str },
    #[error("{entity} record has no `{attribute}`; include it in $select")]
    MissingAttribute {
        entity: &'static str,
        attribute: &'static str,
    },
    #[error("{entity} record: `{attribute}` {source}")]
    InvalidGuid {
        entity: &'static str,
        attribute: &'static str,
        #[source]
        source: GuidError,
    },
    #[error("{entity} record: `{attribute}` has an unexpected JSON type ({found}); expected {expected}")]
    WrongType {
        entity: &'static str,
        attribute: &'static str,
        found: &'static str,
        expected: &'static str,
    },
}

pub(crate) fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The table a lookup points at, from its logical name or object type code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Account,
    Contact,
    Opportunity,
    /// `systemuser`: a user (an owner).
    User,
    /// `team`: a team (an owner).
    Team,
    Other,
}

impl Table {
    fn from_logical_name(name: &str) -> Table {
        match name {
            "account" => Table::Account,
            "contact" => Table::Contact,
            "opportunity" => Table::Opportunity,
            "systemuser" => Table::User,
            "team" => Table::Team,
            _ => Table::Other,
        }
    }

    fn from_object_type_code(code: i64) -> Table {
        match code {
            OBJECT_TYPE_ACCOUNT => Table::Account,
            OBJECT_TYPE_CONTACT => Table::Contact,
            OBJECT_TYPE_OPPORTUNITY => Table::Opportunity,
            _ => Table::Other,
        }
    }
}

/// A lookup value: the GUID and, when the annotation was returned, the table it points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LookupRef {
    pub id: Guid,
    pub table: Option<Table>,
}

fn read_guid(
    map: &Map<String, Value>,
    entity: &'static str,
    attribute: &'static str,
) -> Result<Option<Guid>, RecordError> {
    match map.get(attribute) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Guid::parse(s).map(Some).map_err(|source| RecordError::InvalidGuid {
            entity,
            attribute,
            source,
        }),
        Some(other) => Err(RecordError::WrongType {
            entity,
            attribute,
            found: json_type(other),
            expected: "a GUID string",
        }),
    }
}

fn require_guid(map: &Map<String, Value>, entity: &'static str, attribute: &'static str) -> Result<Guid, RecordError> {
    read_guid(map, entity, attribute)?.ok_or(RecordError::MissingAttribute { entity, attribute })
}

/// Reads `_x_value` and its lookuplogicalname annotation.
fn read_lookup(
    map: &Map<String, Value>,
    entity: &'static str,
    attribute: &'static str,
) -> Result<Option<LookupRef>, RecordError> {
    let Some(id) = read_guid(map, entity, attribute)? else {
        return Ok(None);
    };
    let table = map
        .get(&format!("{attribute}{LOOKUP_LOGICAL_NAME}"))
        .and_then(Value::as_str)
        .map(Table::from_logical_name);
    Ok(Some(LookupRef { id, table }))
}

/// Reads an Int64 that Dataverse may send as a number or (IEEE754Compatible) a string.
fn read_i64(map: &Map<String, Value>, attribute: &str) -> Option<i64> {
    match map.get(attribute)? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn into_object(value: Value, entity: &'static str) -> Result<Map<String, Value>, RecordError> {
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(RecordError::NotAnObject { entity }),
    }
}

/// The opportunity's customer lookups as stored: `customerid` (polymorphic) and the two form
/// fields `parentaccountid` / `parentcontactid` when they were selected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CustomerFields {
    pub customerid: Option<LookupRef>,
    pub parent_account: Option<AccountId>,
    pub parent_contact: Option<ContactId>,
}

/// An opportunity row. The attributes the field selection reads stay as returned; the ones the
/// rules depend on are parsed up front.
#[derive(Debug, Clone, PartialEq)]
pub struct Opportunity {
    pub id: OpportunityId,
    /// `versionnumber` (rowversion): orders changes without ties.
    pub version: Option<i64>,
    /// `modifiedon` as returned (ISO 8601, UTC).
    pub modified_on: Option<String>,
    pub customer: CustomerFields,
    /// `statecode`: 0 Open, 1 Won, 2 Lost.
    pub state: Option<i64>,
    /// `ownerid`: a user or a team; read when sales persons are synced.
    pub owner: Option<LookupRef>,
    pub attributes: Map<String, Value>,
}

impl Opportunity {
    /// Parses one element of an `opportunities` response's `value` array.
    pub fn from_json(value: Value) -> Result<Self, RecordError> {
        const E: &str = "opportunity";
        let attributes = into_object(value, E)?;
        let id = OpportunityId(require_guid(&attributes, E, "opportunityid")?);
        let customer = CustomerFields {
            customerid: read_lookup(&attributes, E, "_customerid_value")?,
            parent_account: read_guid(&attributes, E, "_parentaccountid_value")?.map(AccountId),
            parent_contact: read_guid(&attributes, E, "_parentcontactid_value")?.map(ContactId),
        };
        Ok(Opportunity {
            id,
            version: read_i64(&attributes, "versionnumber"),
            modified_on: attributes.get("modifiedon").and_then(Value::as_str).map(str::to_owned),
            customer,
            state: read_i64(&attributes, "statecode"),
            // A malformed owner costs the sales person (a plan warning), not the record.
            owner: read_lookup(&attributes, E, "_ownerid_value").ok().flatten(),
            attributes,
        })
    }

    /// The raw attribute value, `None` when the attribute was not returned at all.
    pub fn attribute(&self, name: &str) -> Option<&Value> {
        self.attributes.get(name)
    }

    /// The formatted-value annotation of an attribute, when returned.
    pub fn formatted(&self, name: &str) -> Option<&str> {
        self.attributes
            .get(&format!("{name}{FORMATTED_VALUE}"))
            .and_then(Value::as_str)
    }
}

/// An account row (`accountid`, `name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub id: AccountId,
    pub name: Option<String>,
}

impl Account {
    pub fn from_json(value: Value) -> Result<Self, RecordError> {
        const E: &str = "account";
        let map = into_object(value, E)?;
        Ok(Account {
            id: AccountId(require_guid(&map, E, "accountid")?),
            name: map.get("name").and_then(Value::as_str).map(str::to_owned),
        })
    }
}

/// A text attribute, trimmed; `None` when absent, not text, or blank.
fn trimmed_text(map: &Map<String, Value>, key: &str) -> Option<String> {
    map.get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// A user row (`systemuserid`, `internalemailaddress`, `firstname`, `lastname`): an owner, who
/// becomes a Marketo sales person.
#[derive(Clone, PartialEq, Eq)]
pub struct SystemUser {
    pub id: UserId,
    pub email: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
}

/// Personal data stays out of logs: the id only.
impl std::fmt::Debug for SystemUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SystemUser")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl SystemUser {
    pub fn from_json(value: Value) -> Result<Self, RecordError> {
        const E: &str = "systemuser";
        let map = into_object(value, E)?;
        let text = |k: &str| trimmed_text(&map, k);
        Ok(SystemUser {
            id: UserId(require_guid(&map, E, "systemuserid")?),
            email: text("internalemailaddress"),
            first_name: text("firstname"),
            last_name: text("lastname"),
        })
    }
}

/// A contact's parent customer (`parentcustomerid`), which is an account or another contact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParentCustomer {
    Account(AccountId),
    Contact(ContactId),
    /// The annotation was not returned; resolved against the accounts read in the same batch.
    Unknown(Guid),
}

/// A contact row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contact {
    pub id: ContactId,
    pub email: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub parent: Option<ParentCustomer>,
}

impl Contact {
    pub fn from_json(value: Value) -> Result<Self, RecordError> {
        const E: &str = "contact";
        let map = into_object(value, E)?;
        let text = |k: &str| trimmed_text(&map, k);
        let parent = read_lookup(&map, E, "_parentcustomerid_value")?.map(|lookup| match lookup.table {
            Some(Table::Account) => ParentCustomer::Account(AccountId(lookup.id)),
            Some(Table::Contact) => ParentCustomer::Contact(ContactId(lookup.id)),
            _ => ParentCustomer::Unknown(lookup.id),
        });
        Ok(Contact {
            id: ContactId(require_guid(&map, E, "contactid")?),
            email: text("emailaddress1"),
            first_name: text("firstname"),
            last_name: text("lastname"),
            parent,
        })
    }
}

/// A connection role (`connectionroleid`, `name`, `category`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ConnectionRole {
    pub connectionroleid: Option<Guid>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub category: Option<i64>,
}

impl ConnectionRole {
    pub fn from_json(value: Value) -> Result<Self, RecordError> {
        serde_json::from_value(value).map_err(|_| RecordError::WrongType {
            entity: "connectionrole",
            attribute: "connectionroleid",
            found: "malformed record",
            expected: "{connectionroleid, name, category}",
        })
    }
}

/// The role on one side of a connection: its id, and the role itself when `$expand`ed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RoleRef {
    pub id: Option<Guid>,
    pub expanded: Option<ConnectionRole>,
}

/// One side of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Party {
    pub table: Table,
    pub id: Guid,
}

/// A connection row. Dataverse stores each connection twice (the row and its reciprocal, with
/// record1 and record2 swapped); [`Connection::stakeholder_link`] reads both the same way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub id: Guid,
    pub record1: Option<Party>,
    pub record2: Option<Party>,
    pub record1_role: RoleRef,
    pub record2_role: RoleRef,
    /// `statecode`: 0 Active, 1 Inactive. Absent counts as not active.
    pub state: Option<i64>,
}

/// An opportunity–contact link read from a connection, with the contact's role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StakeholderLink {
    pub opportunity: OpportunityId,
    pub contact: ContactId,
    pub role: RoleRef,
    pub active: bool,
}

impl Connection {
    pub fn from_json(value: Value) -> Result<Self, RecordError> {
        const E: &str = "connection";
        let map = into_object(value, E)?;
        let party = |n: u8| -> Result<Option<Party>, RecordError> {
            let (attribute, code) = if n == 1 {
                ("_record1id_value", "record1objecttypecode")
            } else {
                ("_record2id_value", "record2objecttypecode")
            };
            let Some(lookup) = read_lookup(&map, E, attribute)? else {
                return Ok(None);
            };
            // The object type code is authoritative; the annotation is the fallback.
            let table = read_i64(&map, code)
                .map(Table::from_object_type_code)
                .or(lookup.table)
                .unwrap_or(Table::Other);
            Ok(Some(Party { table, id: lookup.id }))
        };
        let role = |n: u8| -> Result<RoleRef, RecordError> {
            let (attribute, nav) = if n == 1 {
                ("_record1roleid_value", "record1roleid")
            } else {
                ("_record2roleid_value", "record2roleid")
            };
            let expanded = match map.get(nav) {
                Some(v @ Value::Object(_)) => Some(ConnectionRole::from_json(v.clone())?),
                _ => None,
            };
            let id = read_guid(&map, E, attribute)?.or(expanded.as_ref().and_then(|r| r.connectionroleid));
            Ok(RoleRef { id, expanded })
        };
        Ok(Connection {
            id: require_guid(&map, E, "connectionid")?,
            record1: party(1)?,
            record2: party(2)?,
            record1_role: role(1)?,
            record2_role: role(2)?,
            state: read_i64(&map, "statecode"),
        })
    }

    /// The opportunity–contact link this row describes, from either direction: the role that
    /// counts is always the one on the contact's side.
    pub fn stakeholder_link(&self) -> Option<StakeholderLink> {
        let (r1, r2) = (self.record1?, self.record2?);
        let (opportunity, contact, role) = match (r1.table, r2.table) {
            (Table::Opportunity, Table::Contact) => (r1.id, r2.id, &self.record2_role),
            (Table::Contact, Table::Opportunity) => (r2.id, r1.id, &self.record1_role),
            _ => return None,
        };
        Some(StakeholderLink {
            opportunity: OpportunityId(opportunity),
            contact: ContactId(contact),
            role: role.clone(),
            active: self.state == Some(0),
        })
    }
}

/// What a batch of opportunities needs besides the opportunities themselves, read together and
/// indexed once: accounts, contacts, connection roles and stakeholder links by opportunity.
#[derive(Debug, Clone, Default)]
pub struct Related {
    pub accounts: HashMap<AccountId, Account>,
    pub contacts: HashMap<ContactId, Contact>,
    pub roles: HashMap<Guid, ConnectionRole>,
    pub stakeholders: HashMap<OpportunityId, Vec<StakeholderLink>>,
    /// Owners that are users, read when sales persons are synced.
    pub users: HashMap<UserId, SystemUser>,
}

impl Related {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add_account(&mut self, account: Account) {
        self.accounts.insert(account.id, account);
    }

    pub fn add_contact(&mut self, contact: Contact) {
        self.contacts.insert(contact.id, contact);
    }

    pub fn add_user(&mut self, user: SystemUser) {
        self.users.insert(user.id, user);
    }

    /// Parses `systemusers` rows; the rows that cannot be used are returned.
    pub fn add_users(&mut self, rows: Vec<Value>) -> Vec<RecordError> {
        let mut rejected = Vec::new();
        for v in rows {
            match SystemUser::from_json(v) {
                Ok(u) => self.add_user(u),
                Err(e) => rejected.push(e),
            }
        }
        rejected
    }

    pub fn add_role(&mut self, role: ConnectionRole) {
        if let Some(id) = role.connectionroleid {
            self.roles.insert(id, role);
        }
    }

    /// Adds a connection row; rows that do not link an opportunity to a contact are ignored.
    pub fn add_connection(&mut self, connection: &Connection) {
        if let Some(link) = connection.stakeholder_link() {
            self.stakeholders.entry(link.opportunity).or_default().push(link);
        }
    }

    /// Resolves a role reference: the expanded role if present, else the role table.
    pub fn role<'a>(&'a self, role: &'a RoleRef) -> Option<&'a ConnectionRole> {
        role.expanded
            .as_ref()
            .or_else(|| role.id.and_then(|id| self.roles.get(&id)))
    }

    /// Parses whole Web API `value` arrays; rows that cannot be used are returned, not dropped
    /// silently, so the caller can log them.
    pub fn from_json(
        accounts: Vec<Value>,
        contacts: Vec<Value>,
        roles: Vec<Value>,
        connections: Vec<Value>,
    ) -> (Self, Vec<RecordError>) {
        let mut related = Related::new();
        let mut rejected = Vec::new();
        for v in accounts {
            match Account::from_json(v) {
                Ok(a) => related.add_account(a),
                Err(e) => rejected.push(e),
            }
        }
        for v in contacts {
            match Contact::from_json(v) {
                Ok(c) => related.add_contact(c),
                Err(e) => rejected.push(e),
            }
        }
        for v in roles {
            match ConnectionRole::from_json(v) {
                Ok(r) => related.add_role(r),
                Err(e) => rejected.push(e),
            }
        }
        for v in connections {
            match Connection::from_json(v) {
                Ok(c) => related.add_connection(&c),
                Err(e) => rejected.push(e),
            }
        }
        (related, rejected)
    }
}

/// Attribute values by name, for callers that build records in code (tests, generators).
pub fn object(pairs: impl IntoIterator<Item = (&'static str, Value)>) -> Value {
    Value::Object(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}
