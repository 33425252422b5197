//! The rules of Marketo's native "Microsoft Dynamics Sync: Opportunity Sync", one function each,
//! with the rule's sentence as its doc comment.

use std::collections::{BTreeMap, BTreeSet};

use crate::config::Mapping;
use crate::dataverse::{CustomerFields, ParentCustomer, Related, Table};
use crate::ids::{AccountId, ContactId, OpportunityId};
use crate::plan::{MARKETO_ROLE_MAX, Warning};

/// The Potential Customer as Dynamics stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PotentialCustomer {
    None,
    Contact(ContactId),
    Account(AccountId),
    /// Both form fields set (parentaccountid and parentcontactid, or customerid plus the other).
    AccountAndContact(AccountId, ContactId),
}

/// What the customer rules decide for one opportunity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CustomerOutcome {
    /// The opportunity's account, written as `externalCompanyId` and upserted as a company.
    pub account: Option<AccountId>,
    /// The contact that gets a "Potential Customer" role.
    pub contact_role: Option<ContactId>,
}

/// Reads the Potential Customer from `customerid` (polymorphic: account or contact) and the two
/// form fields. When `customerid` lacks its lookuplogicalname annotation the id is looked up
/// among the accounts and contacts read for the batch.
pub fn potential_customer(
    fields: &CustomerFields,
    related: &Related,
    warnings: &mut Vec<Warning>,
) -> PotentialCustomer {
    let mut account = fields.parent_account;
    let mut contact = fields.parent_contact;
    if let Some(lookup) = fields.customerid {
        let table = lookup.table.or_else(|| {
            if related.accounts.contains_key(&AccountId(lookup.id)) {
                Some(Table::Account)
            } else if related.contacts.contains_key(&ContactId(lookup.id)) {
                Some(Table::Contact)
            } else {
                None
            }
        });
        match table {
            Some(Table::Account) => account = Some(AccountId(lookup.id)),
            Some(Table::Contact) => contact = Some(ContactId(lookup.id)),
            _ => warnings.push(Warning::new(
                "customerid",
                format!(
                    "customerid {} is neither a readable account nor a contact (no lookuplogicalname annotation); \
                     the opportunity is written without a company or customer role",
                    lookup.id
                ),
            )),
        }
    }
    match (account, contact) {
        (None, None) => PotentialCustomer::None,
        (None, Some(c)) => PotentialCustomer::Contact(c),
        (Some(a), None) => PotentialCustomer::Account(a),
        (Some(a), Some(c)) => PotentialCustomer::AccountAndContact(a, c),
    }
}

/// Applies whichever customer rule matches the Potential Customer.
pub fn apply_customer_rules(
    customer: PotentialCustomer,
    related: &Related,
    warnings: &mut Vec<Warning>,
) -> CustomerOutcome {
    match customer {
        PotentialCustomer::None => CustomerOutcome::default(),
        PotentialCustomer::Contact(contact) => contact_set_account_empty(contact, related, warnings),
        PotentialCustomer::Account(account) => account_set_contact_empty(account),
        PotentialCustomer::AccountAndContact(account, contact) => both_set(account, contact),
    }
}

/// Contact set, account empty → create an opportunity contact role for that contact, and set the
/// opportunity's account to the contact's account (left empty if the contact has none).
///
/// The contact's account is its `parentcustomerid` when that is an account; a contact whose
/// parent is another contact has no account.
pub fn contact_set_account_empty(
    contact: ContactId,
    related: &Related,
    warnings: &mut Vec<Warning>,
) -> CustomerOutcome {
    let account = match related.contacts.get(&contact).and_then(|c| c.parent) {
        None | Some(ParentCustomer::Contact(_)) => None,
        Some(ParentCustomer::Account(a)) => Some(a),
        Some(ParentCustomer::Unknown(id)) => {
            if related.accounts.contains_key(&AccountId(id)) {
                Some(AccountId(id))
            } else {
                warnings.push(Warning::new(
                    "customerid",
                    format!(
                        "contact {contact}'s parent customer {id} has no lookuplogicalname annotation and is not a \
                         readable account; the opportunity's account is left empty"
                    ),
                ));
                None
            }
        }
    };
    CustomerOutcome {
        account,
        contact_role: Some(contact),
    }
}

/// Account set, contact empty → only set the opportunity's account to that account.
pub fn account_set_contact_empty(account: AccountId) -> CustomerOutcome {
    CustomerOutcome {
        account: Some(account),
        contact_role: None,
    }
}

/// Both set → Dynamics stores the account, so the account-only rule applies.
pub fn both_set(account: AccountId, _contact: ContactId) -> CustomerOutcome {
    account_set_contact_empty(account)
}

/// Stakeholders: Dynamics links contacts to opportunities through connections with a
/// Stakeholder role; each stakeholder becomes an opportunity contact role in Marketo.
///
/// Only active connections (statecode 0) whose role's category is configured (1000, Stakeholder,
/// by default) count. Each connection is stored twice; both rows read as the same (contact, role)
/// and count once. Role names longer than Marketo's 50 characters are truncated with a warning.
/// Returns role names by contact, sorted, without duplicates.
pub fn stakeholder_roles(
    opportunity: OpportunityId,
    mapping: &Mapping,
    related: &Related,
    warnings: &mut Vec<Warning>,
    unreadable: &mut BTreeSet<ContactId>,
) -> BTreeMap<(ContactId, String), ()> {
    let mut roles = BTreeMap::new();
    let Some(links) = related.stakeholders.get(&opportunity) else {
        return roles;
    };
    for link in links.iter().filter(|l| l.active) {
        let Some(role) = related.role(&link.role) else {
            warnings.push(Warning::new(
                "stakeholders",
                format!(
                    "the connection role of contact {} is not readable ({}); that stakeholder is skipped, and a role written for it before is kept until it can be read",
                    link.contact,
                    link.role
                        .id
                        .map(|g| g.to_string())
                        .unwrap_or_else(|| "no role id".to_owned())
                ),
            ));
            unreadable.insert(link.contact);
            continue;
        };
        if !role
            .category
            .is_some_and(|c| mapping.stakeholder_categories.contains(&c))
        {
            continue;
        }
        let Some(name) = role_name(role.name.as_deref(), link.contact, warnings) else {
            continue;
        };
        roles.insert((link.contact, name), ());
    }
    roles
}

/// A role name as Marketo can store it: trimmed, at most 50 characters.
fn role_name(name: Option<&str>, contact: ContactId, warnings: &mut Vec<Warning>) -> Option<String> {
    let name = name.map(str::trim).filter(|n| !n.is_empty());
    let Some(name) = name else {
        warnings.push(Warning::new(
            "stakeholders",
            format!("contact {contact}'s connection role has no name; that stakeholder is skipped"),
        ));
        return None;
    };
    match name.char_indices().nth(MARKETO_ROLE_MAX) {
        None => Some(name.to_owned()),
        Some((cut, _)) => {
            let short = name[..cut].trim_end().to_owned();
            warnings.push(Warning::new(
                "stakeholders",
                format!("role name \"{name}\" is longer than Marketo's {MARKETO_ROLE_MAX} characters; written as \"{short}\""),
            ));
            Some(short)
        }
    }
}
