//! End to end, through the Lambda functions' entry points (cold start from Secrets Manager,
//! the poller's handler, the transformer and writer fed by the state table's real stream on
//! moto): each rule of the native sync, with records built for it, and Marketo's end state
//! checked record by record — explicitly, and against the rules' independent oracle.

use oppsync_marketo::{Limiter, LimiterSettings, MarketoClient, MarketoSettings, Secret};
use oppsync_simulators::dataverse::{Table, seed_id};
use oppsync_simulators::oracle::{self, Rules};
use oppsync_state::Status;
use oppsync_tests::harness::{Sims, assert_marketo_matches_dynamics, sims};
use serde_json::{Value, json};

use crate::lambda_flow::Deployment;

fn account(sims: &Sims, n: u64, name: &str) -> String {
    let id = seed_id(0xaa00_0000, n);
    sims.dv.upsert(Table::Accounts, &id, json!({"name": name}), &[]);
    id
}

fn contact(sims: &Sims, n: u64, email: &str, parent: Option<(&str, &'static str)>) -> String {
    let id = seed_id(0xcc00_0000, n);
    let mut attrs = json!({"firstname": "Pat", "lastname": format!("E2E {n}"), "emailaddress1": email,
                           "_parentcustomerid_value": Value::Null});
    let mut lookups = vec![];
    if let Some((pid, table)) = parent {
        attrs["_parentcustomerid_value"] = json!(pid);
        lookups.push(("_parentcustomerid_value", table));
    }
    sims.dv.upsert(Table::Contacts, &id, attrs, &lookups);
    id
}

enum Customer<'a> {
    Contact(&'a str),
    Account(&'a str),
    /// Both form fields set: Dynamics stores the account.
    Both {
        account: &'a str,
        contact: &'a str,
    },
}

fn opportunity(sims: &Sims, n: u64, customer: Customer<'_>, extra: Value) -> String {
    let id = seed_id(0x0e00_0000, n);
    let mut attrs = json!({"name": format!("E2E deal {n}"), "estimatedvalue": 1000 + n as i64, "statecode": 0,
                           "statuscode": 1, "estimatedclosedate": "2026-12-31", "closeprobability": 50,
                           "_customerid_value": Value::Null, "_parentaccountid_value": Value::Null,
                           "_parentcontactid_value": Value::Null});
    let mut lookups = vec![];
    match customer {
        Customer::Contact(c) => {
            attrs["_customerid_value"] = json!(c);
            attrs["_parentcontactid_value"] = json!(c);
            lookups.extend([("_customerid_value", "contact"), ("_parentcontactid_value", "contact")]);
        }
        Customer::Account(a) => {
            attrs["_customerid_value"] = json!(a);
            attrs["_parentaccountid_value"] = json!(a);
            lookups.extend([("_customerid_value", "account"), ("_parentaccountid_value", "account")]);
        }
        Customer::Both { account, contact } => {
            attrs["_customerid_value"] = json!(account);
            attrs["_parentaccountid_value"] = json!(account);
            attrs["_parentcontactid_value"] = json!(contact);
            lookups.extend([
                ("_customerid_value", "account"),
                ("_parentaccountid_value", "account"),
                ("_parentcontactid_value", "contact"),
            ]);
        }
    }
    if let (Some(a), Some(e)) = (attrs.as_object_mut(), extra.as_object()) {
        a.extend(e.clone());
    }
    sims.dv.upsert(Table::Opportunities, &id, attrs, &lookups);
    id
}

/// The connection role with seed number `n` (1 Champion, 2 Decision Maker, 3 Influencer:
/// Stakeholder category; 5 Sales Professional: Sales Team), created on first use.
fn role_id(sims: &Sims, n: u64) -> String {
    let id = seed_id(0xf000_0000, n);
    let (_, name, category) = oppsync_simulators::dataverse::SEED_ROLES
        .iter()
        .find(|(k, _, _)| *k == n)
        .copied()
        .unwrap();
    sims.dv.upsert(
        Table::ConnectionRoles,
        &id,
        json!({"name": name, "category": category}),
        &[],
    );
    id
}

/// The roles Marketo holds for an opportunity: (lead email, role, isPrimary).
fn roles_of(sims: &Sims, opportunity: &str) -> Vec<(String, String, bool)> {
    let snapshot = sims.mk.snapshot();
    let mut out: Vec<(String, String, bool)> = snapshot
        .roles
        .iter()
        .filter(|r| r.external_opportunity_id == opportunity)
        .map(|r| {
            let email = snapshot
                .leads
                .iter()
                .find(|l| l.id == r.lead_id)
                .and_then(|l| l.fields.get("email").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_default();
            (email, r.role.clone(), r.is_primary)
        })
        .collect();
    out.sort();
    out
}

fn field(sims: &Sims, opportunity: &str, name: &str) -> Option<Value> {
    sims.mk
        .snapshot()
        .opportunities
        .get(opportunity)
        .and_then(|f| f.get(name).cloned())
}

async fn sync(d: &mut Deployment) {
    d.poll().await;
    d.pump().await;
}

#[tokio::test]
async fn the_customer_rules() {
    let sims = sims().await;
    let acme = account(&sims, 1, "Acme");
    let globex = account(&sims, 2, "Globex");
    let with_account = contact(&sims, 1, "ann@acme.example", Some((&acme, "account")));
    let alone = contact(&sims, 2, "bob@nowhere.example", None);
    let both_contact = contact(&sims, 3, "cy@globex.example", Some((&globex, "account")));
    let contact_only = opportunity(&sims, 1, Customer::Contact(&with_account), json!({}));
    let contact_no_account = opportunity(&sims, 2, Customer::Contact(&alone), json!({}));
    let account_only = opportunity(&sims, 3, Customer::Account(&globex), json!({}));
    let both = opportunity(
        &sims,
        4,
        Customer::Both {
            account: &acme,
            contact: &both_contact,
        },
        json!({}),
    );
    let mut d = Deployment::cold_start_with(&sims, "").await;
    sync(&mut d).await;

    // Contact set, account empty: a Potential Customer role, the contact's account.
    assert_eq!(
        roles_of(&sims, &contact_only),
        vec![("ann@acme.example".into(), "Potential Customer".into(), true)]
    );
    assert_eq!(field(&sims, &contact_only, "externalCompanyId"), Some(json!(acme)));
    // … and a contact without an account leaves the opportunity's account empty.
    assert_eq!(roles_of(&sims, &contact_no_account).len(), 1);
    assert!(matches!(
        field(&sims, &contact_no_account, "externalCompanyId"),
        None | Some(Value::Null)
    ));
    // Account set, contact empty: only the account.
    assert!(roles_of(&sims, &account_only).is_empty());
    assert_eq!(field(&sims, &account_only, "externalCompanyId"), Some(json!(globex)));
    // Both set: Dynamics stores the account, so the account rule applies.
    assert!(roles_of(&sims, &both).is_empty());
    assert_eq!(field(&sims, &both, "externalCompanyId"), Some(json!(acme)));
    assert_eq!(sims.mk.snapshot().companies[&acme]["company"], json!("Acme"));
    assert_marketo_matches_dynamics(&sims);
}

#[tokio::test]
async fn stakeholders_reciprocal_inactive_sales_team_renamed_and_removed() {
    let sims = sims().await;
    let acme = account(&sims, 1, "Acme");
    let buyer = contact(&sims, 1, "buyer@acme.example", Some((&acme, "account")));
    let champ = contact(&sims, 2, "champ@acme.example", Some((&acme, "account")));
    let idle = contact(&sims, 3, "idle@acme.example", Some((&acme, "account")));
    let seller = contact(&sims, 4, "seller@acme.example", Some((&acme, "account")));
    let deal = opportunity(&sims, 1, Customer::Contact(&buyer), json!({}));
    // Each of these is stored twice in Dataverse (the connection and its reciprocal).
    let champion = sims.dv.add_stakeholder(&deal, &champ, &role_id(&sims, 1));
    let inactive = sims.dv.add_stakeholder(&deal, &idle, &role_id(&sims, 3));
    sims.dv.set_connection_state(&inactive, 1);
    sims.dv.add_stakeholder(&deal, &seller, &role_id(&sims, 5)); // Sales Professional: Sales Team, not Stakeholder
    let mut d = Deployment::cold_start_with(&sims, "").await;
    sync(&mut d).await;
    assert_eq!(
        roles_of(&sims, &deal),
        vec![
            ("buyer@acme.example".into(), "Potential Customer".into(), true),
            ("champ@acme.example".into(), "Champion".into(), false),
        ],
        "one role per connection, none for inactive or Sales Team connections"
    );

    // The role renamed: Marketo keys roles by name, so the old one goes and the new one comes.
    sims.dv.upsert(
        Table::Connections,
        &champion.0,
        json!({"_record2roleid_value": role_id(&sims, 2)}),
        &[("_record2roleid_value", "connectionrole")],
    );
    sims.dv.upsert(
        Table::Connections,
        &champion.1,
        json!({"_record1roleid_value": role_id(&sims, 2)}),
        &[("_record1roleid_value", "connectionrole")],
    );
    sync(&mut d).await;
    assert!(roles_of(&sims, &deal).contains(&("champ@acme.example".into(), "Decision Maker".into(), false)));
    assert!(!roles_of(&sims, &deal).iter().any(|r| r.1 == "Champion"));

    // Removed: its role is deleted.
    sims.dv.remove_connection(&champion);
    sync(&mut d).await;
    assert_eq!(roles_of(&sims, &deal).len(), 1, "{:?}", roles_of(&sims, &deal));
    assert_marketo_matches_dynamics(&sims);
}

#[tokio::test]
async fn deletes_and_the_sync_filter() {
    let sims = sims().await;
    let acme = account(&sims, 1, "Acme");
    let buyer = contact(&sims, 1, "buyer@acme.example", Some((&acme, "account")));
    let champ = contact(&sims, 2, "champ@acme.example", Some((&acme, "account")));
    let doomed = opportunity(&sims, 1, Customer::Contact(&buyer), json!({"new_synctomkto": true}));
    sims.dv.add_stakeholder(&doomed, &champ, &role_id(&sims, 1));
    let kept = opportunity(&sims, 2, Customer::Account(&acme), json!({"new_synctomkto": true}));
    let never = opportunity(&sims, 3, Customer::Account(&acme), json!({"new_synctomkto": false}));
    let mut d = Deployment::cold_start_with(&sims, "[mapping]\nsync_filter = \"new_synctomkto\"\n").await;
    sync(&mut d).await;
    assert_eq!(roles_of(&sims, &doomed).len(), 2);
    assert!(
        field(&sims, &never, "name").is_none(),
        "an explicit No is never written"
    );

    sims.dv.delete(Table::Opportunities, &doomed);
    sims.dv.upsert(
        Table::Opportunities,
        &kept,
        json!({"new_synctomkto": false, "name": "Renamed"}),
        &[],
    );
    sync(&mut d).await;
    assert!(field(&sims, &doomed, "name").is_none(), "deleted in Marketo");
    assert!(roles_of(&sims, &doomed).is_empty(), "and its roles");
    assert_eq!(d.state(&doomed).await.status, Status::Deleted);
    // Yes → No stops updates and deletes nothing.
    assert_eq!(field(&sims, &kept, "name"), Some(json!("E2E deal 2")));
    assert_eq!(d.state(&kept).await.status, Status::Filtered);
    let rules = Rules {
        sync_filter: Some("new_synctomkto".into()),
        ..Rules::default()
    };
    let diff = oracle::differences(
        &oracle::expected(&sims.dv, &rules),
        &sims.mk.snapshot(),
        &[kept.clone()].into_iter().collect(),
    );
    assert!(diff.is_empty(), "{diff:?}");

    // Excluded, then deleted in Dynamics: the filter means oppsync leaves the record alone, so
    // Marketo's copy stays (README: "nothing is deleted").
    sims.dv.delete(Table::Opportunities, &kept);
    sync(&mut d).await;
    assert_eq!(
        field(&sims, &kept, "name"),
        Some(json!("E2E deal 2")),
        "an excluded record deleted in Dynamics is left alone in Marketo"
    );
    assert_eq!(d.state(&kept).await.status, Status::Deleted);
}

#[tokio::test]
async fn custom_fields_and_the_null_policy() {
    let sims = sims().await;
    sims.mk
        .configure(|c| c.custom_opportunity_fields = vec!["region".into()]);
    let acme = account(&sims, 1, "Acme");
    let deal = opportunity(
        &sims,
        1,
        Customer::Account(&acme),
        json!({"new_region": "EMEA", "description": "First"}),
    );
    let config =
        "[[mapping.fields]]\nmarketo = \"region\"\ndataverse = \"new_region\"\ntype = \"string\"\nnull = \"skip\"\n";
    let mut d = Deployment::cold_start_with(&sims, config).await;
    sync(&mut d).await;
    assert_eq!(field(&sims, &deal, "region"), Some(json!("EMEA")));
    assert_eq!(field(&sims, &deal, "description"), Some(json!("First")));
    sims.dv.upsert(
        Table::Opportunities,
        &deal,
        json!({"new_region": null, "description": null}),
        &[],
    );
    sync(&mut d).await;
    assert_eq!(
        field(&sims, &deal, "region"),
        Some(json!("EMEA")),
        "null = skip keeps Marketo's value"
    );
    assert_eq!(
        field(&sims, &deal, "description"),
        Some(Value::Null),
        "the default writes null"
    );
}

#[tokio::test]
async fn leads_are_reused_created_and_never_guessed() {
    let sims = sims().await;
    let acme = account(&sims, 1, "Acme");
    let known = contact(&sims, 1, "Known@Acme.example", Some((&acme, "account")));
    let new = contact(&sims, 2, "new@acme.example", Some((&acme, "account")));
    let twice = contact(&sims, 3, "twice@acme.example", Some((&acme, "account")));
    let existing = sims
        .mk
        .add_lead(json!({"email": "known@acme.example", "firstName": "Known"}));
    sims.mk.add_lead(json!({"email": "twice@acme.example"}));
    sims.mk.add_lead(json!({"email": "twice@acme.example"}));
    let reuse = opportunity(&sims, 1, Customer::Contact(&known), json!({}));
    let create = opportunity(&sims, 2, Customer::Contact(&new), json!({}));
    let ambiguous = opportunity(&sims, 3, Customer::Contact(&twice), json!({}));
    let mut d = Deployment::cold_start_with(&sims, "").await;
    sync(&mut d).await;

    let snapshot = sims.mk.snapshot();
    let role = |opp: &str| {
        snapshot
            .roles
            .iter()
            .find(|r| r.external_opportunity_id == opp)
            .map(|r| r.lead_id)
    };
    assert_eq!(
        role(&reuse),
        Some(existing),
        "the existing lead is used (emails match case-insensitively)"
    );
    let known_leads = snapshot
        .leads
        .iter()
        .filter(|l| {
            l.fields["email"]
                .as_str()
                .unwrap()
                .eq_ignore_ascii_case("known@acme.example")
        })
        .count();
    assert_eq!(known_leads, 1, "no second lead for a known email");
    assert!(role(&create).is_some(), "a missing lead is created");
    assert!(snapshot.leads.iter().any(|l| l.fields["email"] == "new@acme.example"));
    // Two leads with one email: which is meant is not ours to guess.
    assert!(role(&ambiguous).is_none());
    let state = d.state(&ambiguous).await;
    assert_eq!(state.status, Status::Failed, "{state:?}");
    let error = state.last_error.unwrap();
    assert!(
        error.message.contains("twice@acme.example") || error.code.contains("duplicate"),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_resync_restores_a_record_someone_changed_in_marketo() {
    let sims = sims().await;
    let acme = account(&sims, 1, "Acme");
    let deal = opportunity(&sims, 1, Customer::Account(&acme), json!({}));
    let mut d = Deployment::cold_start_with(&sims, "").await;
    sync(&mut d).await;
    // Someone edits the opportunity in Marketo.
    let tamper = MarketoClient::new(
        MarketoSettings::new(
            &sims.mk.url(),
            &sims.mk.client_id(),
            Secret::from(sims.mk.client_secret()),
        )
        .unwrap(),
        Limiter::new(LimiterSettings::default()),
        100,
    )
    .unwrap();
    tamper
        .sync_opportunities(&[json!({"externalOpportunityId": deal, "name": "Edited in Marketo", "amount": 1})])
        .await
        .unwrap();
    assert_eq!(field(&sims, &deal, "name"), Some(json!("Edited in Marketo")));
    // A sync does nothing: Dynamics did not change.
    sync(&mut d).await;
    assert_eq!(field(&sims, &deal, "name"), Some(json!("Edited in Marketo")));
    // The resync function writes it again.
    let handled = oppsync_lambda::resync(&d.pipeline, json!({"opportunityIds": [deal]}))
        .await
        .unwrap();
    assert_eq!(
        serde_json::to_value(&handled.response).unwrap()["records"][0]["write"]["outcome"],
        "synced"
    );
    assert_eq!(field(&sims, &deal, "name"), Some(json!("E2E deal 1")));
    assert_eq!(field(&sims, &deal, "amount").and_then(|a| a.as_f64()), Some(1001.0));
    let diff = oracle::differences(
        &oracle::expected(&sims.dv, &Rules::default()),
        &sims.mk.snapshot(),
        &Default::default(),
    );
    assert!(diff.is_empty(), "{diff:?}");
}

#[tokio::test]
async fn a_deleted_opportunity_restored_in_dynamics_returns_to_marketo() {
    // Dataverse's recycle bin restores a record with its id (and a new version): the
    // opportunity and its roles must come back to Marketo.
    let sims = sims().await;
    let acme = account(&sims, 1, "Acme");
    let buyer = contact(&sims, 1, "buyer@acme.example", Some((&acme, "account")));
    let champ = contact(&sims, 2, "champ@acme.example", Some((&acme, "account")));
    let deal = opportunity(&sims, 1, Customer::Contact(&buyer), json!({}));
    sims.dv.add_stakeholder(&deal, &champ, &role_id(&sims, 1));
    let mut d = Deployment::cold_start_with(&sims, "").await;
    sync(&mut d).await;
    assert_eq!(roles_of(&sims, &deal).len(), 2);
    let row = sims.dv.row(Table::Opportunities, &deal).unwrap();

    sims.dv.delete(Table::Opportunities, &deal);
    sync(&mut d).await;
    assert!(field(&sims, &deal, "name").is_none(), "deleted in Marketo");
    assert_eq!(d.state(&deal).await.status, Status::Deleted);

    let lookups: Vec<(&str, &'static str)> = row.lookups.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    sims.dv.upsert(
        Table::Opportunities,
        &deal,
        Value::Object(row.attributes.clone()),
        &lookups,
    );
    sync(&mut d).await;
    assert_eq!(field(&sims, &deal, "name"), Some(json!("E2E deal 1")), "restored");
    assert_eq!(roles_of(&sims, &deal).len(), 2, "with its roles");
    assert_eq!(d.state(&deal).await.status, Status::Synced);
    assert_marketo_matches_dynamics(&sims);
}

#[tokio::test]
async fn a_contact_whose_email_changed_keeps_one_role_on_its_new_lead() {
    let sims = sims().await;
    let acme = account(&sims, 1, "Acme");
    let buyer = contact(&sims, 1, "buyer@acme.example", Some((&acme, "account")));
    let deal = opportunity(&sims, 1, Customer::Contact(&buyer), json!({}));
    let mut d = Deployment::cold_start_with(&sims, "").await;
    sync(&mut d).await;
    assert_eq!(roles_of(&sims, &deal).len(), 1);

    // The buyer's email changes together with an edit of the opportunity.
    sims.dv.upsert(
        Table::Contacts,
        &buyer,
        json!({"emailaddress1": "pat.buyer@acme.example"}),
        &[],
    );
    sims.dv
        .upsert(Table::Opportunities, &deal, json!({"estimatedvalue": 4242}), &[]);
    sync(&mut d).await;
    let roles = roles_of(&sims, &deal);
    assert_eq!(roles.len(), 1, "one Potential Customer role, not two: {roles:?}");
    assert_eq!(roles[0].0, "pat.buyer@acme.example", "on the new email's lead");
    assert_marketo_matches_dynamics(&sims);
}
