//! What a write needs to send: the parts of a plan whose hash differs from what the last
//! complete write of the record left in Marketo. An opportunity is not sent again because a
//! role changed, nor a role because the opportunity did.

use oppsync_state::Sent;

use super::*;

/// Plain data serialized cannot fail; the plan's maps are sorted, so the bytes are canonical.
fn hash<T: Serialize + ?Sized>(value: &T) -> u64 {
    xxhash_rust::xxh3::xxh3_64(&serde_json::to_vec(value).unwrap_or_default())
}

/// The hash of a part that is not in Marketo as planned (a 64-bit hash of a part being 0 is a
/// one-in-2^64 chance, and would cost one part one unneeded send).
const NOT_SENT: u64 = 0;

/// A plan's parts, hashed.
#[derive(Debug, Clone, Default)]
pub(crate) struct Parts {
    pub(crate) opportunity: u64,
    pub(crate) company: Option<u64>,
    pub(crate) sales_person: Option<u64>,
    /// By (contact, role name).
    pub(crate) roles: BTreeMap<(ContactId, String), u64>,
}

impl Parts {
    pub(crate) fn of(desired: &Desired, lead_match: &LeadMatch) -> Parts {
        // A role is the same role while its contact maps to the same lead key: an email change
        // moves it to another lead.
        let lead_key = |contact: ContactId| -> Option<String> {
            match lead_match {
                LeadMatch::Email => desired
                    .leads
                    .iter()
                    .find(|l| l.contact == contact)
                    .and_then(|l| l.email.as_ref())
                    .map(|e| e.trim().to_ascii_lowercase()),
                LeadMatch::Field(_) => Some(contact.to_string()),
            }
        };
        Parts {
            opportunity: hash(&desired.opportunity),
            company: desired.company.as_ref().map(hash),
            sales_person: desired.sales_person.as_ref().map(hash),
            roles: desired
                .roles
                .iter()
                .map(|r| {
                    let key = (r.contact, r.role.clone());
                    (key, hash(&(r.contact, &r.role, r.is_primary, lead_key(r.contact))))
                })
                .collect(),
        }
    }

    /// What a write that stopped part way left in Marketo: the parts it got through (or found
    /// there as planned); a part that did not get through gets a hash no part has, so the next
    /// try sends it.
    pub(crate) fn partly_sent(&self, work: &Work) -> Sent {
        Sent {
            opportunity: if work.opportunity_done {
                self.opportunity
            } else {
                NOT_SENT
            },
            company: if work.company_done {
                self.company
            } else {
                self.company.map(|_| NOT_SENT)
            },
            sales_person: if work.sales_person_done {
                self.sales_person
            } else {
                self.sales_person.map(|_| NOT_SENT)
            },
            roles: work.in_marketo.iter().copied().collect(),
        }
    }

    /// What a complete write of these parts leaves in Marketo (`roles`: the role hashes now
    /// there as planned).
    pub(crate) fn sent(&self, roles: &BTreeSet<u64>) -> Sent {
        Sent {
            opportunity: self.opportunity,
            company: self.company,
            sales_person: self.sales_person,
            roles: roles.iter().copied().collect(),
        }
    }
}

impl Work {
    /// Whether the company goes to Marketo in this write.
    pub(crate) fn sends_company(&self) -> bool {
        match (&self.parts, &self.previous) {
            (Some(parts), Some(previous)) => parts.company != previous.company,
            _ => true,
        }
    }

    /// Whether the sales person goes to Marketo in this write.
    pub(crate) fn sends_sales_person(&self) -> bool {
        match (&self.parts, &self.previous) {
            (Some(parts), Some(previous)) => parts.sales_person != previous.sales_person,
            _ => true,
        }
    }

    /// Whether the opportunity goes to Marketo in this write.
    pub(crate) fn sends_opportunity(&self) -> bool {
        match (&self.parts, &self.previous) {
            (Some(parts), Some(previous)) => parts.opportunity != previous.opportunity,
            _ => true,
        }
    }

    /// Whether this role goes to Marketo in this write: it is not already there as planned.
    pub(crate) fn sends_role(&self, contact: ContactId, role: &str) -> bool {
        let Some(parts) = &self.parts else { return true };
        match parts.roles.get(&(contact, role.to_owned())) {
            Some(hash) => !self.in_marketo.contains(hash),
            None => true,
        }
    }

    /// The role now in Marketo as planned.
    pub(crate) fn role_sent(&mut self, contact: ContactId, role: &str) {
        if let Some(hash) = self
            .parts
            .as_ref()
            .and_then(|p| p.roles.get(&(contact, role.to_owned())))
        {
            self.in_marketo.insert(*hash);
        }
    }
}

/// The parts of a plan and what its last complete write left in Marketo, for a claimed record.
/// `full`: send everything (a resync, a record requeued to be written again, one restored after
/// a deletion, one whose last write was partial).
pub(crate) fn parts_and_previous(
    plan: &Plan,
    state: &OpportunityState,
    lead_match: &LeadMatch,
    full: bool,
) -> (Option<Parts>, Option<Sent>, BTreeSet<u64>) {
    let Action::Upsert(desired) = &plan.action else {
        return (None, None, BTreeSet::new());
    };
    let parts = Parts::of(desired, lead_match);
    let previous = match &state.written {
        Some(w) if !full && !state.rewrite && !w.deleted => w.sent.clone(),
        _ => None,
    };
    let planned: BTreeSet<u64> = parts.roles.values().copied().collect();
    let in_marketo = previous
        .iter()
        .flat_map(|p| p.roles.iter().copied())
        .filter(|h| planned.contains(h))
        .collect();
    (Some(parts), previous, in_marketo)
}
