//! Dynamics in the simulation: a world of accounts, contacts, users, a team, connection roles,
//! opportunities and stakeholder connections that its users change while the sync runs, served
//! through the pipeline's Dataverse port as the Web API serves it: rows annotated, every change
//! a new `versionnumber` (a rowversion), change tracking by token (a token reads what changed
//! after it, as often as it is read; an expired one answers with a full read), deletions as
//! tombstones.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use oppsync_dynamics::{ChangePage, DataverseError, EntitySet, Watermark, WatermarkPage};
use oppsync_mapping::dataverse::Related;
use oppsync_mapping::{Guid, Opportunity, OpportunityId, RecordError};
use oppsync_pipeline::DataversePort;
use oppsync_simulators::dataverse::{Row, Table};
use serde_json::{Map, Value, json};

use super::faults::{Faults, Port};
use super::rng::Rng;

const LOOKUP: &str = "@Microsoft.Dynamics.CRM.lookuplogicalname";
/// The connection role categories: 1000 is Stakeholder.
const ROLES: [(&str, i64); 3] = [("Champion", 1000), ("Decision Maker", 1000), ("Partner", 1)];
const ACCOUNTS: u64 = 4;
const CONTACTS: u64 = 8;
const USERS: u64 = 3;

pub fn opportunity_id(n: u64) -> String {
    format!("0b000000-0000-4000-8000-{n:012}")
}
fn account_id(n: u64) -> String {
    format!("a0000000-0000-4000-8000-{n:012}")
}
fn contact_id(n: u64) -> String {
    format!("c0000000-0000-4000-8000-{n:012}")
}
fn user_id(n: u64) -> String {
    format!("50000000-0000-4000-8000-{n:012}")
}
const TEAM: &str = "7ea00000-0000-4000-8000-000000000001";
fn role_id(n: usize) -> String {
    format!("f0000000-0000-4000-8000-{n:012}")
}
fn connection_id(n: u64) -> String {
    format!("e0000000-0000-4000-8000-{n:012}")
}

/// A row with its version, or a tombstone (`None`) at the version it was deleted.
#[derive(Debug, Clone)]
struct Versioned {
    version: i64,
    row: Option<Value>,
}

#[derive(Default)]
struct World {
    /// The rowversion: every change takes the next.
    version: i64,
    opportunities: BTreeMap<String, Versioned>,
    connections: BTreeMap<String, Versioned>,
    accounts: Vec<Value>,
    contacts: BTreeMap<String, Value>,
    users: BTreeMap<String, Value>,
    roles: Vec<Value>,
    /// Tokens minted at or below this version have expired.
    expired_below: i64,
    next_opportunity: u64,
    next_connection: u64,
    /// The virtual time, as `modifiedon` reads it.
    now_text: String,
    requests: u64,
}

fn annotated(mut row: Map<String, Value>, lookups: &[(&str, Option<String>, &str)]) -> Value {
    for (attribute, id, table) in lookups {
        match id {
            Some(id) => {
                row.insert((*attribute).to_owned(), json!(id));
                row.insert(format!("{attribute}{LOOKUP}"), json!(table));
            }
            None => {
                row.insert((*attribute).to_owned(), Value::Null);
            }
        }
    }
    Value::Object(row)
}

impl World {
    fn bump(&mut self) -> i64 {
        self.version += 1;
        self.version
    }

    fn set_opportunity(&mut self, id: &str, mut row: Value) {
        let version = self.bump();
        row["versionnumber"] = json!(version);
        row["modifiedon"] = json!(self.now_text);
        self.opportunities.insert(
            id.to_owned(),
            Versioned {
                version,
                row: Some(row),
            },
        );
    }

    fn live_opportunities(&self) -> Vec<String> {
        self.opportunities
            .iter()
            .filter(|(_, v)| v.row.is_some())
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn changes(&self, table: &BTreeMap<String, Versioned>, after: i64) -> (Vec<Value>, Vec<String>) {
        let mut rows = Vec::new();
        let mut deleted = Vec::new();
        for (id, v) in table.iter().filter(|(_, v)| v.version > after) {
            match &v.row {
                Some(row) => rows.push(row.clone()),
                None => deleted.push(id.clone()),
            }
        }
        (rows, deleted)
    }
}

/// Dynamics: the world and the port the pipeline reads it through. Cheap to clone.
#[derive(Clone)]
pub struct SimDynamics {
    world: Arc<Mutex<World>>,
    faults: Faults,
}

impl SimDynamics {
    /// A world of a few accounts, contacts, users, a team, and `opportunities` opportunities with
    /// every customer, owner and stakeholder case drawn from `rng`.
    pub fn new(rng: &mut Rng, opportunities: u64, faults: Faults) -> SimDynamics {
        let mut w = World {
            now_text: "2026-07-01T12:00:00Z".into(),
            ..World::default()
        };
        w.accounts = (0..ACCOUNTS)
            .map(|n| json!({ "accountid": account_id(n), "name": format!("Account {n}") }))
            .collect();
        for n in 0..CONTACTS {
            let parent = (n % 3 != 2).then(|| account_id(n % ACCOUNTS));
            let row = annotated(
                Map::from_iter([
                    ("contactid".to_owned(), json!(contact_id(n))),
                    ("firstname".to_owned(), json!(format!("First{n}"))),
                    ("lastname".to_owned(), json!(format!("Last{n}"))),
                    ("emailaddress1".to_owned(), json!(format!("contact{n}@example.com"))),
                ]),
                &[("_parentcustomerid_value", parent, "account")],
            );
            w.contacts.insert(contact_id(n), row);
        }
        for n in 0..USERS {
            w.users.insert(
                user_id(n),
                json!({
                    "systemuserid": user_id(n), "firstname": format!("User{n}"), "lastname": "Seller",
                    "internalemailaddress": format!("user{n}@example.com"),
                }),
            );
        }
        w.roles = ROLES
            .iter()
            .enumerate()
            .map(|(i, (name, category))| json!({ "connectionroleid": role_id(i), "name": name, "category": category }))
            .collect();
        let dynamics = SimDynamics {
            world: Arc::new(Mutex::new(w)),
            faults,
        };
        for _ in 0..opportunities {
            dynamics.create_opportunity(rng);
        }
        for _ in 0..opportunities / 2 {
            dynamics.add_stakeholder(rng);
        }
        dynamics
    }

    fn world(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The time `modifiedon` takes from now on.
    pub fn set_time(&self, text: String) {
        self.world().now_text = text;
    }

    fn opportunity_row(rng: &mut Rng, id: &str) -> Value {
        let customer = match rng.below(4) {
            0 => (Some(account_id(rng.below(ACCOUNTS))), "account"),
            1 | 2 => (Some(contact_id(rng.below(CONTACTS))), "contact"),
            _ => (None, "account"),
        };
        let owner = if rng.one_in(5) {
            (Some(TEAM.to_owned()), "team")
        } else {
            (Some(user_id(rng.below(USERS))), "systemuser")
        };
        let state = [0, 0, 0, 1, 2][rng.below(5) as usize];
        annotated(
            Map::from_iter([
                ("opportunityid".to_owned(), json!(id)),
                ("name".to_owned(), json!(format!("Deal {}", rng.below(1000)))),
                ("estimatedvalue".to_owned(), json!(rng.range(1, 1000) as f64 * 10.0)),
                ("closeprobability".to_owned(), json!(rng.below(100))),
                ("estimatedclosedate".to_owned(), json!("2026-12-31")),
                ("description".to_owned(), Value::Null),
                ("actualclosedate".to_owned(), Value::Null),
                ("statecode".to_owned(), json!(state)),
            ]),
            &[
                ("_customerid_value", customer.0, customer.1),
                ("_ownerid_value", owner.0, owner.1),
            ],
        )
    }

    /// A new opportunity.
    pub fn create_opportunity(&self, rng: &mut Rng) -> String {
        let mut w = self.world();
        w.next_opportunity += 1;
        let id = opportunity_id(w.next_opportunity);
        let row = Self::opportunity_row(rng, &id);
        w.set_opportunity(&id, row);
        id
    }

    /// An existing opportunity, changed the way users change one: a field, the customer, the
    /// owner, the state, or all of it.
    pub fn edit_opportunity(&self, rng: &mut Rng) -> Option<String> {
        let mut w = self.world();
        let id = rng.pick(&w.live_opportunities())?.clone();
        let mut row = w.opportunities[&id].row.clone()?;
        let fresh = Self::opportunity_row(rng, &id);
        match rng.below(4) {
            0 => row["estimatedvalue"] = fresh["estimatedvalue"].clone(),
            1 => row["statecode"] = fresh["statecode"].clone(),
            _ => {
                for attribute in ["_customerid_value", "_ownerid_value"] {
                    if rng.one_in(2) {
                        let annotation = format!("{attribute}{LOOKUP}");
                        row[attribute] = fresh[attribute].clone();
                        row[annotation.as_str()] = fresh[annotation.as_str()].clone();
                    }
                }
            }
        }
        w.set_opportunity(&id, row);
        Some(id)
    }

    /// Deletes an opportunity (its stakeholder connections stay, as Dataverse cascades them
    /// away unseen by the sync, which no longer reads them).
    pub fn delete_opportunity(&self, rng: &mut Rng) -> Option<String> {
        let mut w = self.world();
        let id = rng.pick(&w.live_opportunities())?.clone();
        let version = w.bump();
        w.opportunities.insert(id.clone(), Versioned { version, row: None });
        Some(id)
    }

    /// Brings a deleted opportunity back (from the recycle bin: its id, a new version).
    pub fn restore_opportunity(&self, rng: &mut Rng) -> Option<String> {
        let mut w = self.world();
        let deleted: Vec<String> = w
            .opportunities
            .iter()
            .filter(|(_, v)| v.row.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        let id = rng.pick(&deleted)?.clone();
        let row = Self::opportunity_row(rng, &id);
        w.set_opportunity(&id, row);
        Some(id)
    }

    /// Connects a contact to an opportunity with a role, stored as Dataverse stores a
    /// connection: twice, once from each side.
    pub fn add_stakeholder(&self, rng: &mut Rng) -> Option<String> {
        let mut w = self.world();
        let opportunity = rng.pick(&w.live_opportunities())?.clone();
        let contact = contact_id(rng.below(CONTACTS));
        let role = role_id(rng.below(ROLES.len() as u64) as usize);
        let (a, b) = (w.next_connection + 1, w.next_connection + 2);
        w.next_connection += 2;
        let side = |id: u64, other: u64, opp_first: bool| {
            let (r1, t1, c1, r2, t2, c2) = if opp_first {
                (&opportunity, "opportunity", 3, &contact, "contact", 2)
            } else {
                (&contact, "contact", 2, &opportunity, "opportunity", 3)
            };
            let mut row = annotated(
                Map::from_iter([
                    ("connectionid".to_owned(), json!(connection_id(id))),
                    ("_relatedconnectionid_value".to_owned(), json!(connection_id(other))),
                    ("record1objecttypecode".to_owned(), json!(c1)),
                    ("record2objecttypecode".to_owned(), json!(c2)),
                    ("statecode".to_owned(), json!(0)),
                ]),
                &[
                    ("_record1id_value", Some(r1.clone()), t1),
                    ("_record2id_value", Some(r2.clone()), t2),
                ],
            );
            let (mine, theirs) = if opp_first {
                (Value::Null, json!(role))
            } else {
                (json!(role), Value::Null)
            };
            row["_record1roleid_value"] = mine;
            row["_record2roleid_value"] = theirs;
            row
        };
        for (id, other, opp_first) in [(a, b, true), (b, a, false)] {
            let version = w.bump();
            let row = side(id, other, opp_first);
            w.connections.insert(
                connection_id(id),
                Versioned {
                    version,
                    row: Some(row),
                },
            );
        }
        Some(opportunity)
    }

    /// Removes a stakeholder: both rows deleted, or (one time in three) deactivated.
    pub fn remove_stakeholder(&self, rng: &mut Rng) -> Option<String> {
        let mut w = self.world();
        let live: Vec<(String, Value)> = w
            .connections
            .iter()
            .filter_map(|(id, v)| Some((id.clone(), v.row.clone()?)))
            .filter(|(_, row)| row["record1objecttypecode"] == 3)
            .collect();
        let (id, row) = rng.pick(&live)?.clone();
        let other = row["_relatedconnectionid_value"].as_str()?.to_owned();
        let deactivate = rng.one_in(3);
        for key in [id, other] {
            let version = w.bump();
            let row = if deactivate {
                w.connections[&key].row.clone().map(|mut r| {
                    r["statecode"] = json!(1);
                    r
                })
            } else {
                None
            };
            w.connections.insert(key, Versioned { version, row });
        }
        row["_record1id_value"].as_str().map(str::to_owned)
    }

    /// A contact's new email. Contacts are not change-tracked by the sync: a user's next edit
    /// of each opportunity naming the contact carries it, and the simulation makes that edit.
    pub fn change_contact_email(&self, rng: &mut Rng) {
        let mut w = self.world();
        let contact = contact_id(rng.below(CONTACTS));
        let email = format!("contact{}.{}@example.com", &contact[30..], rng.below(1000));
        if let Some(row) = w.contacts.get_mut(&contact) {
            row["emailaddress1"] = json!(email);
        }
        let naming: BTreeSet<String> = w
            .connections
            .values()
            .filter_map(|v| v.row.as_ref())
            .filter(|c| c["_record2id_value"] == contact.as_str())
            .filter_map(|c| c["_record1id_value"].as_str().map(str::to_owned))
            .chain(
                w.opportunities
                    .iter()
                    .filter(|(_, v)| {
                        v.row
                            .as_ref()
                            .is_some_and(|r| r["_customerid_value"] == contact.as_str())
                    })
                    .map(|(id, _)| id.clone()),
            )
            .collect();
        Self::touch(&mut w, naming);
    }

    /// A user's new email; as for contacts, the owned opportunities are edited after it.
    pub fn change_user_email(&self, rng: &mut Rng) {
        let mut w = self.world();
        let user = user_id(rng.below(USERS));
        let email = format!("user{}.{}@example.com", &user[30..], rng.below(1000));
        if let Some(row) = w.users.get_mut(&user) {
            row["internalemailaddress"] = json!(email);
        }
        let owned: BTreeSet<String> = w
            .opportunities
            .iter()
            .filter(|(_, v)| v.row.as_ref().is_some_and(|r| r["_ownerid_value"] == user.as_str()))
            .map(|(id, _)| id.clone())
            .collect();
        Self::touch(&mut w, owned);
    }

    fn touch(w: &mut World, ids: BTreeSet<String>) {
        for id in ids {
            if let Some(row) = w.opportunities.get(&id).and_then(|v| v.row.clone()) {
                w.set_opportunity(&id, row);
            }
        }
    }

    /// Every change token minted so far expires (a sync paused past Dataverse's retention).
    pub fn expire_tokens(&self) {
        let mut w = self.world();
        w.expired_below = w.version;
    }

    /// The rows of a table as the simulators' oracle reads them.
    pub fn oracle_rows(&self, table: Table) -> Vec<(String, Row)> {
        let w = self.world();
        let (key, rows): (&str, Vec<Value>) = match table {
            Table::Opportunities => (
                "opportunityid",
                w.opportunities.values().filter_map(|v| v.row.clone()).collect(),
            ),
            Table::Connections => (
                "connectionid",
                w.connections.values().filter_map(|v| v.row.clone()).collect(),
            ),
            Table::Accounts => ("accountid", w.accounts.clone()),
            Table::Contacts => ("contactid", w.contacts.values().cloned().collect()),
            Table::SystemUsers => ("systemuserid", w.users.values().cloned().collect()),
            Table::ConnectionRoles => ("connectionroleid", w.roles.clone()),
        };
        rows.into_iter()
            .filter_map(|row| {
                let id = row.get(key)?.as_str()?.to_owned();
                let object = row.as_object()?;
                let lookups = object
                    .iter()
                    .filter_map(|(k, v)| {
                        let attribute = k.strip_suffix(LOOKUP)?;
                        let table: &'static str = match v.as_str()? {
                            "account" => "account",
                            "contact" => "contact",
                            "opportunity" => "opportunity",
                            "systemuser" => "systemuser",
                            "team" => "team",
                            _ => return None,
                        };
                        Some((attribute.to_owned(), table))
                    })
                    .collect();
                let attributes = object
                    .iter()
                    .filter(|(k, _)| !k.contains('@'))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                Some((
                    id,
                    Row {
                        attributes,
                        lookups,
                        version: 0,
                    },
                ))
            })
            .collect()
    }

    fn token_version(token: &str) -> Option<i64> {
        token.rsplit(':').next()?.parse().ok()
    }
}

impl DataversePort for SimDynamics {
    async fn changes(
        &self,
        set: EntitySet,
        _select: &[&str],
        cursor: Option<&str>,
    ) -> Result<ChangePage, DataverseError> {
        self.faults.call(Port::Dataverse, "changes").await?;
        let page = {
            let mut w = self.world();
            w.requests += 1;
            let after = cursor.and_then(Self::token_version);
            let expired = after.is_some_and(|v| v < w.expired_below);
            let table = match set {
                EntitySet::Opportunities => &w.opportunities,
                _ => &w.connections,
            };
            let (rows, deleted) = match after {
                Some(v) if !expired => w.changes(table, v),
                _ => (w.changes(table, 0).0, Vec::new()),
            };
            if cursor.is_none() || expired {
                self.faults.trace(format!(
                    "Dataverse {}: a full read ({} rows){}",
                    set.name(),
                    rows.len(),
                    if expired { ", the token had expired" } else { "" }
                ));
            }
            ChangePage {
                rows,
                deleted,
                cursor: format!("sim:{}:{}", set.name(), w.version),
                caught_up: true,
                full_resync: expired,
            }
        };
        self.faults.answer(Port::Dataverse, "changes").await?;
        Ok(page)
    }

    async fn watermark_page(
        &self,
        _set: EntitySet,
        _select: &[&str],
        _from: &Watermark,
        _link: Option<&str>,
    ) -> Result<WatermarkPage, DataverseError> {
        Err(DataverseError::BadQuery {
            code: "sim".into(),
            message: "the simulation reads with change tracking".into(),
        })
    }

    async fn all_ids(&self, set: EntitySet) -> Result<BTreeSet<Guid>, DataverseError> {
        self.faults.call(Port::Dataverse, "all_ids").await?;
        let ids = {
            let mut w = self.world();
            w.requests += 1;
            let table = match set {
                EntitySet::Opportunities => &w.opportunities,
                _ => &w.connections,
            };
            table
                .iter()
                .filter(|(_, v)| v.row.is_some())
                .filter_map(|(id, _)| Guid::parse(id).ok())
                .collect()
        };
        self.faults.answer(Port::Dataverse, "all_ids").await?;
        Ok(ids)
    }

    async fn opportunities(&self, ids: &[OpportunityId], _select: &[&str]) -> Result<Vec<Value>, DataverseError> {
        self.faults.call(Port::Dataverse, "opportunities").await?;
        let rows = {
            let mut w = self.world();
            w.requests += 1;
            ids.iter()
                .filter_map(|id| w.opportunities.get(&id.to_string()).and_then(|v| v.row.clone()))
                .collect()
        };
        self.faults.answer(Port::Dataverse, "opportunities").await?;
        Ok(rows)
    }

    async fn opportunity_exists(&self, id: OpportunityId) -> Result<bool, DataverseError> {
        self.faults.call(Port::Dataverse, "opportunity_exists").await?;
        let exists = {
            let mut w = self.world();
            w.requests += 1;
            w.opportunities.get(&id.to_string()).is_some_and(|v| v.row.is_some())
        };
        self.faults.answer(Port::Dataverse, "opportunity_exists").await?;
        Ok(exists)
    }

    async fn related(&self, _opportunities: &[Opportunity]) -> Result<(Related, Vec<RecordError>), DataverseError> {
        self.faults.call(Port::Dataverse, "related").await?;
        let (accounts, contacts, roles, connections, users) = {
            let mut w = self.world();
            w.requests += 1;
            (
                w.accounts.clone(),
                w.contacts.values().cloned().collect(),
                w.roles.clone(),
                w.connections.values().filter_map(|v| v.row.clone()).collect(),
                w.users.values().cloned().collect(),
            )
        };
        let (mut related, mut rejected) = Related::from_json(accounts, contacts, roles, connections);
        rejected.extend(related.add_users(users));
        self.faults.answer(Port::Dataverse, "related").await?;
        Ok((related, rejected))
    }

    fn requests(&self) -> u64 {
        self.world().requests
    }
}
