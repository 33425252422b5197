//! A Dataverse in memory: serves the rows it was given, change feed included.

use std::collections::{BTreeMap, BTreeSet};
use std::future::{Future, ready};
use std::sync::{Arc, Mutex};

use oppsync_dynamics::{ChangePage, DataverseError, EntitySet, Watermark, WatermarkPage};
use oppsync_mapping::dataverse::Related;
use oppsync_mapping::{Guid, Opportunity, OpportunityId, RecordError};
use serde_json::Value;

use super::guard;
use crate::ports::DataversePort;

/// Rows by table, and what changed since the change feed was last read.
#[derive(Default)]
struct Tables {
    opportunities: BTreeMap<String, Value>,
    accounts: Vec<Value>,
    contacts: Vec<Value>,
    roles: Vec<Value>,
    connections: BTreeMap<String, Value>,
    /// Users (opportunity owners).
    users: Vec<Value>,
    /// Changed (Some(row)) or deleted (None) since the last read, by table.
    changed: BTreeMap<EntitySet, BTreeMap<String, Option<Value>>>,
    read_once: BTreeSet<EntitySet>,
    /// Rows a batch read leaves out although they exist (a replica behind, a read that lost
    /// rows): they are still found by their key.
    hidden: BTreeSet<String>,
    /// Contacts and connection roles the application user cannot read (left out of `related`).
    unreadable: BTreeSet<String>,
    /// The next change-feed read of every table answers as an expired token does: a full
    /// read, flagged `full_resync`, with no deletions (change tracking lost them).
    expired: bool,
    /// Reads that fail, by operation (`changes`, `all_ids`, `opportunities`, `related`), with
    /// how many more times.
    failing: BTreeMap<&'static str, u32>,
    requests: u64,
    /// A batch read of opportunities that waits for a signal: how many reads before it, and
    /// the signal (see [`MemoryDataverse::hold_read`]).
    held_read: Option<(u32, Arc<tokio::sync::Notify>)>,
}

impl Tables {
    /// Counts a request; fails it if a fault is scheduled for `operation`.
    fn request(&mut self, operation: &'static str) -> Result<(), DataverseError> {
        self.requests += 1;
        match self.failing.get_mut(operation) {
            Some(n) if *n > 0 => {
                *n -= 1;
                Err(DataverseError::Transport {
                    message: format!("{operation}: connection reset (a fault the test scheduled)"),
                    timeout: false,
                })
            }
            _ => Ok(()),
        }
    }
}

/// A Dataverse in memory. Cheap to clone; clones share the rows.
#[derive(Clone, Default)]
pub struct MemoryDataverse(Arc<Mutex<Tables>>);

fn key_of(set: EntitySet, row: &Value) -> String {
    row[set.key()].as_str().unwrap_or_default().to_ascii_lowercase()
}

impl MemoryDataverse {
    /// Rows as the Web API returns them (annotated).
    pub fn new(
        opportunities: Vec<Value>,
        accounts: Vec<Value>,
        contacts: Vec<Value>,
        roles: Vec<Value>,
        connections: Vec<Value>,
    ) -> MemoryDataverse {
        let t = Tables {
            opportunities: opportunities
                .into_iter()
                .map(|r| (key_of(EntitySet::Opportunities, &r), r))
                .collect(),
            accounts,
            contacts,
            roles,
            connections: connections
                .into_iter()
                .map(|r| (key_of(EntitySet::Connections, &r), r))
                .collect(),
            ..Tables::default()
        };
        MemoryDataverse(Arc::new(Mutex::new(t)))
    }

    /// The batch read of opportunities after the next `reads` waits until `signal` is given,
    /// as a slow Dataverse would: work that should run meanwhile shows that it does.
    pub fn hold_read(&self, reads: u32, signal: Arc<tokio::sync::Notify>) {
        guard(&self.0).held_read = Some((reads, signal));
    }

    /// Creates or replaces an opportunity row; the change feed reports it.
    pub fn upsert_opportunity(&self, row: Value) {
        let mut t = guard(&self.0);
        let id = key_of(EntitySet::Opportunities, &row);
        t.changed
            .entry(EntitySet::Opportunities)
            .or_default()
            .insert(id.clone(), Some(row.clone()));
        t.opportunities.insert(id, row);
    }

    /// Creates or replaces a user row (an owner).
    pub fn upsert_user(&self, row: Value) {
        let mut t = guard(&self.0);
        let id = key_of(EntitySet::SystemUsers, &row);
        t.users.retain(|u| key_of(EntitySet::SystemUsers, u) != id);
        t.users.push(row);
    }

    /// Replaces a contact row (a changed email, say). Contacts are not change-tracked by the
    /// pipeline: the change reaches Marketo with the next change to an opportunity naming it.
    pub fn upsert_contact(&self, row: Value) {
        let mut t = guard(&self.0);
        let id = key_of(EntitySet::Contacts, &row);
        t.contacts.retain(|c| key_of(EntitySet::Contacts, c) != id);
        t.contacts.push(row);
    }

    /// Deletes an opportunity; the change feed reports the deletion.
    pub fn delete_opportunity(&self, id: &str) {
        let mut t = guard(&self.0);
        let id = id.to_ascii_lowercase();
        t.opportunities.remove(&id);
        t.changed.entry(EntitySet::Opportunities).or_default().insert(id, None);
    }

    /// Deletes an opportunity without the change feed seeing it (while a change-tracking token
    /// was expired, or under a watermark, which cannot see deletions).
    pub fn delete_opportunity_unseen(&self, id: &str) {
        guard(&self.0).opportunities.remove(&id.to_ascii_lowercase());
    }

    /// A contact or connection role (by id) the application user cannot read: `related` leaves
    /// it out, as Dataverse leaves out rows a security role hides.
    pub fn make_unreadable(&self, id: &str) {
        guard(&self.0).unreadable.insert(id.to_ascii_lowercase());
    }

    /// Undoes [`MemoryDataverse::make_unreadable`].
    pub fn make_readable(&self, id: &str) {
        guard(&self.0).unreadable.remove(&id.to_ascii_lowercase());
    }

    /// The next change-feed reads answer as for an expired token (a full read).
    pub fn expire_change_tokens(&self) {
        guard(&self.0).expired = true;
    }

    /// The next `times` reads of `operation` (`changes`, `all_ids`, `opportunities`,
    /// `related`) fail as a dropped connection does.
    pub fn fail_next(&self, operation: &'static str, times: u32) {
        guard(&self.0).failing.insert(operation, times);
    }

    /// Leaves an opportunity out of batch reads although it exists (read by key, it is there).
    pub fn hide_from_batch_reads(&self, id: &str) {
        guard(&self.0).hidden.insert(id.to_ascii_lowercase());
    }

    /// Creates or replaces a connection row; the change feed reports it.
    pub fn upsert_connection(&self, row: Value) {
        let mut t = guard(&self.0);
        let id = key_of(EntitySet::Connections, &row);
        t.changed
            .entry(EntitySet::Connections)
            .or_default()
            .insert(id.clone(), Some(row.clone()));
        t.connections.insert(id, row);
    }

    /// Deletes a connection row; the change feed reports the deletion.
    pub fn delete_connection(&self, id: &str) {
        let mut t = guard(&self.0);
        let id = id.to_ascii_lowercase();
        t.connections.remove(&id);
        t.changed.entry(EntitySet::Connections).or_default().insert(id, None);
    }

    fn rows(t: &Tables, set: EntitySet) -> Vec<Value> {
        match set {
            EntitySet::Opportunities => t.opportunities.values().cloned().collect(),
            EntitySet::Connections => t.connections.values().cloned().collect(),
            EntitySet::Accounts => t.accounts.clone(),
            EntitySet::Contacts => t.contacts.clone(),
            EntitySet::ConnectionRoles => t.roles.clone(),
            EntitySet::SystemUsers => t.users.clone(),
        }
    }
}

impl DataversePort for MemoryDataverse {
    fn changes(
        &self,
        set: EntitySet,
        _select: &[&str],
        cursor: Option<&str>,
    ) -> impl Future<Output = Result<ChangePage, DataverseError>> + Send {
        let mut t = guard(&self.0);
        if let Err(e) = t.request("changes") {
            return ready(Err(e));
        }
        // The first read of a table (or a read without a cursor) is a full read; later ones are
        // what changed since. An expired token is a full read too, flagged as such.
        let expired = std::mem::take(&mut t.expired) && cursor.is_some();
        if expired {
            t.expired = set == EntitySet::Opportunities;
        }
        let full = cursor.is_none() || !t.read_once.contains(&set) || expired;
        t.read_once.insert(set);
        let changed = t.changed.remove(&set).unwrap_or_default();
        let (rows, deleted) = if full {
            (Self::rows(&t, set), Vec::new())
        } else {
            let mut rows = Vec::new();
            let mut deleted = Vec::new();
            for (id, row) in changed {
                match row {
                    Some(row) => rows.push(row),
                    None => deleted.push(id),
                }
            }
            (rows, deleted)
        };
        ready(Ok(ChangePage {
            rows,
            deleted,
            cursor: format!("memory:{}:delta", set.name()),
            caught_up: true,
            full_resync: expired,
        }))
    }

    fn watermark_page(
        &self,
        set: EntitySet,
        _select: &[&str],
        _from: &Watermark,
        _link: Option<&str>,
    ) -> impl Future<Output = Result<WatermarkPage, DataverseError>> + Send {
        let mut t = guard(&self.0);
        t.requests += 1;
        ready(Ok(WatermarkPage {
            rows: Self::rows(&t, set),
            reached: Watermark::Version(0),
            next: None,
        }))
    }

    fn all_ids(&self, set: EntitySet) -> impl Future<Output = Result<BTreeSet<Guid>, DataverseError>> + Send {
        let mut t = guard(&self.0);
        if let Err(e) = t.request("all_ids") {
            return ready(Err(e));
        }
        ready(Ok(Self::rows(&t, set)
            .iter()
            .filter_map(|r| Guid::parse(&key_of(set, r)).ok())
            .collect()))
    }

    fn opportunities(
        &self,
        ids: &[OpportunityId],
        _select: &[&str],
    ) -> impl Future<Output = Result<Vec<Value>, DataverseError>> + Send {
        let mut t = guard(&self.0);
        let refused = t.request("opportunities").err();
        let rows: Vec<Value> = ids
            .iter()
            .filter(|id| !t.hidden.contains(&id.to_string()))
            .filter_map(|id| t.opportunities.get(&id.to_string()).cloned())
            .collect();
        let wait = match &mut t.held_read {
            Some((0, signal)) => {
                let signal = signal.clone();
                t.held_read = None;
                Some(signal)
            }
            Some((reads, _)) => {
                *reads -= 1;
                None
            }
            None => None,
        };
        async move {
            if let Some(signal) = wait {
                signal.notified().await;
            }
            refused.map_or(Ok(rows), Err)
        }
    }

    fn opportunity_exists(&self, id: OpportunityId) -> impl Future<Output = Result<bool, DataverseError>> + Send {
        let mut t = guard(&self.0);
        t.requests += 1;
        ready(Ok(t.opportunities.contains_key(&id.to_string())))
    }

    fn related(
        &self,
        _opportunities: &[Opportunity],
    ) -> impl Future<Output = Result<(Related, Vec<RecordError>), DataverseError>> + Send {
        let mut t = guard(&self.0);
        if let Err(e) = t.request("related") {
            return ready(Err(e));
        }
        let readable = |set: EntitySet, rows: &[Value]| -> Vec<Value> {
            rows.iter()
                .filter(|r| !t.unreadable.contains(&key_of(set, r)))
                .cloned()
                .collect()
        };
        let (mut related, mut rejected) = Related::from_json(
            t.accounts.clone(),
            readable(EntitySet::Contacts, &t.contacts),
            readable(EntitySet::ConnectionRoles, &t.roles),
            t.connections.values().cloned().collect(),
        );
        rejected.extend(related.add_users(readable(EntitySet::SystemUsers, &t.users)));
        ready(Ok((related, rejected)))
    }

    fn requests(&self) -> u64 {
        guard(&self.0).requests
    }
}
