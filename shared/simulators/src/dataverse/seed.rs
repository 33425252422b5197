//! The seeded generator: opportunities with every customer and stakeholder case, built
//! deterministically from a seed.

use super::*;

/// Connection roles the generator uses: (id suffix, name, category).
pub const SEED_ROLES: [(u64, &str, i64); 6] = [
    (1, "Champion", 1000),
    (2, "Decision Maker", 1000),
    (3, "Influencer", 1000),
    (4, "Economic Buyer", 1000),
    (5, "Sales Professional", 1001),
    (6, "Friend", 3),
];

/// The transaction currency of every seeded opportunity (the organisation's base currency).
pub const SEED_CURRENCY: &str = "7c000000-0000-4000-8000-000000000001";

/// GUIDs the generator uses, readable by table.
pub fn seed_id(prefix: u32, n: u64) -> String {
    format!("{prefix:08x}-0000-4000-8000-{n:012}")
}

/// What the generator made, for assertions.
#[derive(Debug, Clone, Default)]
pub struct Seeded {
    pub opportunities: Vec<String>,
    pub accounts: Vec<String>,
    pub contacts: Vec<String>,
    /// The users that own opportunities.
    pub users: Vec<String>,
    /// Connection pairs, by opportunity.
    pub stakeholders: BTreeMap<String, Vec<(String, String)>>,
}

/// The mix of records the generator builds.
#[derive(Debug, Clone, Copy)]
pub enum Mix {
    /// Every case: account customers, contact customers with and without an account (and with a
    /// contact as parent), both form fields set, 0–5 stakeholders, Sales Team and inactive
    /// connections, open, won and lost, a custom field.
    Realistic,
    /// The benchmark's shape: a contact customer with a parent account and 2 stakeholders each.
    Uniform,
    /// An account customer and no stakeholders each: the benchmark's shape for a million
    /// opportunities, whose uniform shape (eight Dataverse rows an opportunity, held as JSON)
    /// does not fit in the simulators' memory.
    Lean,
}

impl DataverseSim {
    /// Builds `n` opportunities with everything they refer to, deterministically from `seed`.
    pub fn seed(&self, n: u64, seed: u64, mix: Mix) -> Seeded {
        let mut g = lock(&self.inner);
        let mut x = seed | 1;
        let mut rand = move |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m.max(1)
        };
        let mut out = Seeded::default();
        for (k, name, category) in SEED_ROLES {
            let id = seed_id(0xf000_0000, k);
            upsert_row(
                &mut g,
                Table::ConnectionRoles,
                &id,
                json!({"name": name, "category": category}),
                &[],
            );
        }
        let accounts = (n / 2).max(1);
        for a in 0..accounts {
            let id = seed_id(0xa000_0000, a);
            upsert_row(
                &mut g,
                Table::Accounts,
                &id,
                json!({"name": format!("Account {a}")}),
                &[],
            );
            out.accounts.push(id);
        }
        // Owners: about one user per hundred opportunities, as a sales team would have.
        let users = (n / 100).clamp(1, 300);
        for u in 0..users {
            let id = seed_id(0x5e00_0000, u);
            // One realistic user without an email: the sales person goes without one.
            let email = if matches!(mix, Mix::Realistic) && u == 1 {
                Value::Null
            } else {
                json!(format!("seller{u}@example.com"))
            };
            upsert_row(
                &mut g,
                Table::SystemUsers,
                &id,
                json!({"firstname": "Sam", "lastname": format!("Seller {u}"), "fullname": format!("Sam Seller {u}"),
                       "internalemailaddress": email}),
                &[],
            );
            out.users.push(id);
        }
        let contacts = if matches!(mix, Mix::Lean) { 0 } else { 3 * n.max(1) };
        for c in 0..contacts {
            let id = seed_id(0xc000_0000, c);
            let parent = match (mix, rand(10)) {
                (Mix::Uniform, _) | (_, 0..=6) => Some((seed_id(0xa000_0000, c % accounts), "account")),
                (_, 7) if c > 0 => Some((seed_id(0xc000_0000, c - 1), "contact")),
                _ => None,
            };
            let email = if matches!(mix, Mix::Realistic) && rand(50) == 0 {
                Value::Null
            } else {
                json!(format!("person{c}@example.com"))
            };
            let mut attrs = json!({"firstname": "Pat", "lastname": format!("Person {c}"), "fullname": format!("Pat Person {c}"),
                                   "emailaddress1": email, "_parentcustomerid_value": Value::Null});
            let mut lookups = vec![];
            if let Some((pid, table)) = &parent {
                attrs["_parentcustomerid_value"] = json!(pid);
                lookups.push((
                    "_parentcustomerid_value",
                    if *table == "account" { "account" } else { "contact" },
                ));
            }
            upsert_row(&mut g, Table::Contacts, &id, attrs, &lookups);
            out.contacts.push(id);
        }
        drop(g);
        for o in 0..n {
            let id = seed_id(0x0b00_0000, o);
            let contact = seed_id(0xc000_0000, 3 * o);
            let account = seed_id(0xa000_0000, o % accounts);
            let (state, kind) = match mix {
                Mix::Uniform => (0, 1),
                Mix::Lean => (0, 0),
                Mix::Realistic => ([0, 0, 0, 1, 2][rand(5) as usize], rand(4)),
            };
            let status = [1, 3, 5][state as usize];
            let region = ["EMEA", "AMER", "APAC"][rand(3) as usize];
            let amount = 1000 + rand(100_000) as i64;
            // One currency, the organisation's base: the amount in base currency is the amount.
            let mut attrs = json!({
                "name": format!("Opportunity {o}"), "description": format!("Generated opportunity {o}"),
                "estimatedvalue": amount, "estimatedvalue_base": amount,
                "_transactioncurrencyid_value": SEED_CURRENCY, "closeprobability": rand(101) as i64,
                "estimatedclosedate": "2026-12-31", "actualclosedate": if state == 0 { Value::Null } else { json!("2026-11-01") },
                "statecode": state, "statuscode": status,
                "new_region": region,
                "_customerid_value": Value::Null, "_parentaccountid_value": Value::Null, "_parentcontactid_value": Value::Null,
            });
            let mut lookups = vec![("_transactioncurrencyid_value", "transactioncurrency")];
            // Owned by a user; one realistic opportunity in ten by a team (no sales person).
            if matches!(mix, Mix::Realistic) && rand(10) == 0 {
                attrs["_ownerid_value"] = json!(seed_id(0x7ea0_0000, 1));
                lookups.push(("_ownerid_value", "team"));
            } else {
                attrs["_ownerid_value"] = json!(seed_id(0x5e00_0000, o % users));
                lookups.push(("_ownerid_value", "systemuser"));
            }
            match kind {
                0 => {
                    attrs["_customerid_value"] = json!(account);
                    attrs["_parentaccountid_value"] = json!(account);
                    lookups.extend([("_customerid_value", "account"), ("_parentaccountid_value", "account")]);
                }
                1 => {
                    attrs["_customerid_value"] = json!(contact);
                    attrs["_parentcontactid_value"] = json!(contact);
                    lookups.extend([("_customerid_value", "contact"), ("_parentcontactid_value", "contact")]);
                }
                2 => {
                    // Both on the form: Dynamics stores the account.
                    attrs["_customerid_value"] = json!(account);
                    attrs["_parentaccountid_value"] = json!(account);
                    attrs["_parentcontactid_value"] = json!(contact);
                    lookups.extend([
                        ("_customerid_value", "account"),
                        ("_parentaccountid_value", "account"),
                        ("_parentcontactid_value", "contact"),
                    ]);
                }
                _ => {}
            }
            self.upsert(Table::Opportunities, &id, attrs, &lookups);
            let stakeholders = match mix {
                Mix::Uniform => 2,
                Mix::Lean => 0,
                Mix::Realistic => rand(6),
            };
            for s in 0..stakeholders {
                let stakeholder = seed_id(0xc000_0000, (3 * o + 1 + s) % contacts);
                let role = match mix {
                    Mix::Uniform | Mix::Lean => s + 1,
                    Mix::Realistic => 1 + rand(SEED_ROLES.len() as u64),
                };
                let pair = self.add_stakeholder(&id, &stakeholder, &seed_id(0xf000_0000, role));
                if matches!(mix, Mix::Realistic) && rand(8) == 0 {
                    self.set_connection_state(&pair, 1);
                }
                out.stakeholders.entry(id.clone()).or_default().push(pair);
            }
            out.opportunities.push(id);
        }
        out
    }
}
