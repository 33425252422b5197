//! Batched related reads: what the mapping needs, in a handful of requests.

use oppsync_dynamics::EntitySet;
use oppsync_mapping::{Action, Change, Mapping, Opportunity, OpportunityId, plan_change};
use oppsync_simulators::dataverse::{Mix, SEED_ROLES, Table, seed_id};

use crate::common::*;

/// As the pipeline reads them: the change feed gives ids (without annotations), then the rows
/// are read by id, annotated, for the mapping.
async fn load_opportunities(client: &oppsync_dynamics::DataverseClient) -> Vec<Opportunity> {
    let select: Vec<String> = Mapping::default().opportunity_attributes();
    let select: Vec<&str> = select.iter().map(String::as_str).collect();
    let (changed, ..) = read_all(client, EntitySet::Opportunities, &["opportunityid"], None).await;
    let ids: Vec<OpportunityId> = changed
        .iter()
        .map(|r| OpportunityId::parse(r["opportunityid"].as_str().unwrap()).unwrap())
        .collect();
    let rows = client.opportunities(&ids, &select).await.unwrap();
    rows.into_iter().map(|r| Opportunity::from_json(r).unwrap()).collect()
}

#[tokio::test]
async fn related_reads_give_the_mapping_every_active_stakeholder_and_customer() {
    let sim = sim().await;
    let seeded = sim.seed(60, 11, Mix::Realistic);
    let client = client(&sim, 5000);
    let opportunities = load_opportunities(&client).await;
    let (related, rejected) = client.related(&opportunities).await.unwrap();
    assert!(rejected.is_empty(), "{rejected:?}");
    let mapping = Mapping::default();
    for opportunity in &opportunities {
        let id = opportunity.id.to_string();
        let plan = plan_change(&mapping, &Change::Upserted(opportunity.clone()), &related, &[]);
        let Action::Upsert(desired) = &plan.action else {
            panic!("{plan:?}")
        };
        // Expected stakeholder roles, straight from the simulator's rows.
        let mut expected: Vec<(String, String)> = Vec::new();
        for (a, _) in seeded.stakeholders.get(&id).into_iter().flatten() {
            let row = sim.row(Table::Connections, a).unwrap().attributes;
            let role_id = row["_record2roleid_value"].as_str().unwrap();
            let (_, name, category) = SEED_ROLES
                .iter()
                .find(|(k, ..)| seed_id(0xf000_0000, *k) == role_id)
                .unwrap();
            let contact = row["_record2id_value"].as_str().unwrap().to_owned();
            let has_email = !sim.row(Table::Contacts, &contact).unwrap().attributes["emailaddress1"].is_null();
            if row["statecode"] == 0 && *category == 1000 && has_email {
                expected.push((contact, (*name).to_owned()));
            }
        }
        expected.sort();
        expected.dedup();
        let mut got: Vec<(String, String)> = desired
            .roles
            .iter()
            .filter(|r| !r.is_primary)
            .map(|r| (r.contact.to_string(), r.role.clone()))
            .collect();
        got.sort();
        assert_eq!(got, expected, "stakeholders of {id}");
        // A contact customer's account is its parent account, if it is one.
        if let Some(customer) = opportunity.customer.customerid
            && customer.table == Some(oppsync_mapping::dataverse::Table::Contact)
            && opportunity.customer.parent_account.is_none()
        {
            let contact = sim.row(Table::Contacts, &customer.id.to_string()).unwrap();
            let parent_is_account = contact.lookups.get("_parentcustomerid_value") == Some(&"account");
            assert_eq!(desired.company.is_some(), parent_is_account, "company of {id}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initial_load_of_10000_opportunities_takes_at_most_100_requests() {
    let sim = sim().await;
    sim.seed(10_000, 42, Mix::Uniform);
    let client = client(&sim, 5000);
    let opportunities = load_opportunities(&client).await;
    assert_eq!(opportunities.len(), 10_000);
    let (connections, ..) = read_all(&client, EntitySet::Connections, CONNECTION_SELECT, None).await;
    assert_eq!(connections.len(), 40_000);
    let (related, rejected) = client.related(&opportunities).await.unwrap();
    assert!(rejected.is_empty());
    let roles: usize = opportunities
        .iter()
        .map(
            |o| match plan_change(&Mapping::default(), &Change::Upserted(o.clone()), &related, &[]).action {
                Action::Upsert(d) => d.roles.len(),
                _ => 0,
            },
        )
        .sum();
    assert_eq!(roles, 30_000, "a customer role and 2 stakeholder roles each");
    let requests = sim.requests();
    println!("Dataverse requests for a 10,000-opportunity initial load: {requests}");
    for table in [
        Table::Opportunities,
        Table::Connections,
        Table::Contacts,
        Table::Accounts,
    ] {
        println!("  {table:?}: {}", sim.requests_to(table));
    }
    assert!(requests <= 100, "{requests} requests (at most 1% of 10,000 allowed)");
    assert_eq!(requests, client.requests());
}
