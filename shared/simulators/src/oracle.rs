//! The expected Marketo state, computed from the Dataverse simulator's rows by the seed's rules
//! written out a second time, independently of the mapping crate: the demo and the tests compare
//! Marketo's end state with this, record by record.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::dataverse::{DataverseSim, Row, Table};
use crate::marketo::Snapshot;

/// The rule settings the oracle follows (the product's defaults unless a test changes them).
#[derive(Debug, Clone)]
pub struct Rules {
    pub customer_role: String,
    pub stakeholder_categories: Vec<i64>,
    /// Attribute of the sync filter; only an explicit false excludes.
    pub sync_filter: Option<String>,
    /// Owners that are users become sales persons (`[mapping] sales_persons`).
    pub sales_persons: bool,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            customer_role: "Potential Customer".into(),
            stakeholder_categories: vec![1000],
            sync_filter: None,
            sales_persons: true,
        }
    }
}

/// One opportunity as Marketo should hold it (the fields the defaults map).
#[derive(Debug, Clone, PartialEq)]
pub struct ExpectedOpportunity {
    pub name: Option<String>,
    pub amount: Option<f64>,
    pub external_company_id: Option<String>,
    /// The owner, when it is a user and sales persons are synced.
    pub external_sales_person_id: Option<String>,
    pub is_closed: bool,
    pub is_won: bool,
    pub stage: &'static str,
}

/// A role by its Marketo key, with the lead named by email.
pub type ExpectedRole = (String, String, String, bool);

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Expected {
    pub opportunities: BTreeMap<String, ExpectedOpportunity>,
    /// (externalOpportunityId, lead email, role, isPrimary).
    pub roles: BTreeSet<ExpectedRole>,
    /// Companies the opportunities refer to: externalCompanyId → name.
    pub companies: BTreeMap<String, Option<String>>,
    /// Sales persons the opportunities refer to: externalSalesPersonId → email (lowercase).
    pub sales_persons: BTreeMap<String, Option<String>>,
}

/// A table's rows by name.
struct Rows<F>(F);

impl<F: Fn(Table) -> Vec<(String, Row)>> Rows<F> {
    fn rows(&self, table: Table) -> Vec<(String, Row)> {
        (self.0)(table)
    }
}

fn text(row: &Row, key: &str) -> Option<String> {
    row.attributes.get(key).and_then(Value::as_str).map(str::to_owned)
}

fn valid_email(email: &str) -> bool {
    let email = email.trim();
    match email.split_once('@') {
        Some((local, domain)) => !local.is_empty() && domain.contains('.') && !email.contains(' '),
        None => false,
    }
}

/// What Marketo should hold for `dv`'s current rows. Records excluded by the sync filter are
/// left out; `differences` takes the ids whose Marketo copy is expected to stay as it was.
pub fn expected(dv: &DataverseSim, rules: &Rules) -> Expected {
    expected_from(|table| dv.rows(table), rules)
}

/// [`expected`] for rows from anywhere the simulators' [`Row`]s can be made (the deterministic
/// simulation's Dynamics).
pub fn expected_from(rows: impl Fn(Table) -> Vec<(String, Row)>, rules: &Rules) -> Expected {
    let dv = Rows(rows);
    let accounts: BTreeMap<String, Row> = dv.rows(Table::Accounts).into_iter().collect();
    let contacts: BTreeMap<String, Row> = dv.rows(Table::Contacts).into_iter().collect();
    let roles: BTreeMap<String, Row> = dv.rows(Table::ConnectionRoles).into_iter().collect();
    let users: BTreeMap<String, Row> = dv.rows(Table::SystemUsers).into_iter().collect();
    let mut out = Expected::default();
    let contact_email = |id: &str| -> Option<String> {
        let email = text(contacts.get(id)?, "emailaddress1")?;
        valid_email(&email).then(|| email.trim().to_ascii_lowercase())
    };
    let mut stakeholders: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for (_, c) in dv.rows(Table::Connections) {
        let a = &c.attributes;
        let active = a.get("statecode").and_then(Value::as_i64) == Some(0);
        // Each connection is stored twice; the row with the opportunity on side 1 counts.
        if !active
            || a.get("record1objecttypecode").and_then(Value::as_i64) != Some(3)
            || a.get("record2objecttypecode").and_then(Value::as_i64) != Some(2)
        {
            continue;
        }
        let (Some(opp), Some(contact), Some(role)) = (
            text(&c, "_record1id_value"),
            text(&c, "_record2id_value"),
            text(&c, "_record2roleid_value"),
        ) else {
            continue;
        };
        let Some(role) = roles.get(&role) else { continue };
        let category = role.attributes.get("category").and_then(Value::as_i64).unwrap_or(-1);
        if !rules.stakeholder_categories.contains(&category) {
            continue;
        }
        if let Some(name) = text(role, "name") {
            stakeholders.entry(opp).or_default().push((contact, name));
        }
    }
    for (id, o) in dv.rows(Table::Opportunities) {
        if let Some(filter) = &rules.sync_filter
            && o.attributes.get(filter) == Some(&Value::Bool(false))
        {
            continue;
        }
        let customer = text(&o, "_customerid_value");
        let customer_table = o.lookups.get("_customerid_value").copied();
        // contact set, account empty → role for the contact, account = the contact's account;
        // account set (alone or with a contact) → account only.
        let (company, customer_contact) = match (customer, customer_table) {
            (Some(account), Some("account")) => (Some(account), None),
            (Some(contact), Some("contact")) => {
                let parent = contacts.get(&contact).and_then(|c| {
                    (c.lookups.get("_parentcustomerid_value") == Some(&"account"))
                        .then(|| text(c, "_parentcustomerid_value"))
                        .flatten()
                });
                (parent, Some(contact))
            }
            _ => (None, None),
        };
        if let Some(contact) = customer_contact
            && let Some(email) = contact_email(&contact)
        {
            out.roles.insert((id.clone(), email, rules.customer_role.clone(), true));
        }
        for (contact, role) in stakeholders.get(&id).into_iter().flatten() {
            if let Some(email) = contact_email(contact) {
                out.roles
                    .insert((id.clone(), email, role.chars().take(50).collect(), false));
            }
        }
        if let Some(account) = &company {
            out.companies
                .insert(account.clone(), accounts.get(account).and_then(|a| text(a, "name")));
        }
        // The owner rule: a user is the sales person; a team is none.
        let sales_person = text(&o, "_ownerid_value")
            .filter(|_| rules.sales_persons && o.lookups.get("_ownerid_value") == Some(&"systemuser"));
        if let Some(user) = &sales_person {
            let email = users
                .get(user)
                .and_then(|u| text(u, "internalemailaddress"))
                .filter(|e| valid_email(e))
                .map(|e| e.trim().to_ascii_lowercase());
            out.sales_persons.insert(user.clone(), email);
        }
        let state = o.attributes.get("statecode").and_then(Value::as_i64).unwrap_or(0);
        out.opportunities.insert(
            id,
            ExpectedOpportunity {
                name: text(&o, "name"),
                amount: o.attributes.get("estimatedvalue").and_then(Value::as_f64),
                external_company_id: company,
                external_sales_person_id: sales_person,
                is_closed: state != 0,
                is_won: state == 1,
                stage: match state {
                    0 => "Open",
                    1 => "Won",
                    _ => "Lost",
                },
            },
        );
    }
    out
}

/// Every difference between what Marketo holds and what it should, as readable lines (empty
/// when they agree). `ignore` lists opportunities whose Marketo copy is expected to differ
/// (excluded by the sync filter after an earlier sync: kept as last written).
pub fn differences(expected: &Expected, marketo: &Snapshot, ignore: &BTreeSet<String>) -> Vec<String> {
    let mut out = Vec::new();
    let emails: BTreeMap<i64, String> = marketo
        .leads
        .iter()
        .filter_map(|l| {
            let email = l.fields.get("email")?.as_str()?.trim().to_ascii_lowercase();
            Some((l.id, email))
        })
        .collect();
    for (id, want) in &expected.opportunities {
        let Some(got) = marketo.opportunities.get(id) else {
            out.push(format!("opportunity {id}: missing in Marketo"));
            continue;
        };
        let s = |k: &str| got.get(k).and_then(Value::as_str).map(str::to_owned);
        let b = |k: &str| got.get(k).and_then(Value::as_bool).unwrap_or(false);
        let checks: [(&str, bool); 7] = [
            ("name", s("name") == want.name),
            (
                "amount",
                got.get("amount").and_then(Value::as_f64).map(|a| (a * 100.0).round())
                    == want.amount.map(|a| (a * 100.0).round()),
            ),
            ("externalCompanyId", s("externalCompanyId") == want.external_company_id),
            (
                "externalSalesPersonId",
                s("externalSalesPersonId") == want.external_sales_person_id,
            ),
            ("isClosed", b("isClosed") == want.is_closed),
            ("isWon", b("isWon") == want.is_won),
            ("stage", s("stage").as_deref() == Some(want.stage)),
        ];
        for (field, ok) in checks {
            if !ok {
                out.push(format!(
                    "opportunity {id}: {field} is {:?}, expected from Dynamics {}",
                    got.get(field),
                    match field {
                        "name" => format!("{:?}", want.name),
                        "amount" => format!("{:?}", want.amount),
                        "externalCompanyId" => format!("{:?}", want.external_company_id),
                        "externalSalesPersonId" => format!("{:?}", want.external_sales_person_id),
                        "isClosed" => want.is_closed.to_string(),
                        "isWon" => want.is_won.to_string(),
                        _ => want.stage.to_owned(),
                    }
                ));
            }
        }
    }
    for id in marketo.opportunities.keys() {
        if !expected.opportunities.contains_key(id) && !ignore.contains(id) {
            out.push(format!(
                "opportunity {id}: in Marketo but not (or no longer) in Dynamics"
            ));
        }
    }
    let got_roles: BTreeSet<ExpectedRole> = marketo
        .roles
        .iter()
        .filter(|r| !ignore.contains(&r.external_opportunity_id))
        .map(|r| {
            (
                r.external_opportunity_id.clone(),
                emails
                    .get(&r.lead_id)
                    .cloned()
                    .unwrap_or_else(|| format!("lead {}", r.lead_id)),
                r.role.clone(),
                r.is_primary,
            )
        })
        .collect();
    let want_roles: BTreeSet<ExpectedRole> = expected
        .roles
        .iter()
        .filter(|r| !ignore.contains(&r.0))
        .cloned()
        .collect();
    for r in want_roles.difference(&got_roles) {
        out.push(format!("role {r:?}: missing in Marketo"));
    }
    for r in got_roles.difference(&want_roles) {
        out.push(format!("role {r:?}: in Marketo but not expected"));
    }
    let mut keys = BTreeSet::new();
    for r in &marketo.roles {
        if !keys.insert((&r.external_opportunity_id, r.lead_id, &r.role)) {
            out.push(format!("role {r:?}: duplicated"));
        }
    }
    for (id, name) in &expected.companies {
        match marketo.companies.get(id) {
            None => out.push(format!("company {id}: missing in Marketo")),
            Some(c) if name.is_some() && c.get("company").and_then(Value::as_str) != name.as_deref() => {
                out.push(format!("company {id}: name {:?}, expected {name:?}", c.get("company")))
            }
            Some(_) => {}
        }
    }
    for (id, email) in &expected.sales_persons {
        match marketo.sales_persons.get(id) {
            None => out.push(format!("sales person {id}: missing in Marketo")),
            Some(p) => {
                let got = p
                    .get("email")
                    .and_then(Value::as_str)
                    .map(|e| e.trim().to_ascii_lowercase());
                if email.is_some() && &got != email {
                    out.push(format!("sales person {id}: email differs from the owner's in Dynamics"));
                }
            }
        }
    }
    out
}
