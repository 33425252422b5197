//! Mapping throughput: opportunities planned per second on one core, each with a contact
//! customer (with a parent account) and 2 stakeholders, as the benchmark issue specifies.
//!
//! `cargo bench -p oppsync-mapping --bench mapping`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use oppsync_mapping::dataverse::Related;
use oppsync_mapping::{Change, Mapping, Opportunity, plan_change};
use serde_json::{Value, json};

const N: u32 = 1_000;
const LN: &str = "@Microsoft.Dynamics.CRM.lookuplogicalname";

fn guid(prefix: u32, n: u32) -> String {
    format!("{prefix:08x}-0000-4000-8000-{n:012}")
}

fn opportunity_json(n: u32) -> Value {
    json!({
        "@odata.etag": "W/\"1\"",
        "opportunityid": guid(0x0b, n),
        "name": format!("Opportunity {n}"),
        "description": "Fifty laptops and a support contract for the regional office",
        "estimatedvalue": 12_500.0 + f64::from(n),
        "closeprobability": 40,
        "estimatedclosedate": "2026-12-31",
        "actualclosedate": null,
        "statecode": 0,
        "statecode@OData.Community.Display.V1.FormattedValue": "Open",
        "versionnumber": 1_000_000 + n,
        "modifiedon": "2026-11-20T10:00:00Z",
        "_customerid_value": guid(0xc, 3 * n),
        format!("_customerid_value{LN}"): "contact",
    })
}

fn related() -> Related {
    let mut accounts = Vec::new();
    let mut contacts = Vec::new();
    let mut connections = Vec::new();
    let roles = vec![
        json!({"connectionroleid": guid(0xf, 1), "name": "Champion", "category": 1000}),
        json!({"connectionroleid": guid(0xf, 2), "name": "Decision Maker", "category": 1000}),
    ];
    for n in 0..N {
        accounts.push(json!({"accountid": guid(0xa, n), "name": format!("Account {n}")}));
        for k in 0..3 {
            let id = 3 * n + k;
            contacts.push(json!({
                "contactid": guid(0xc, id), "emailaddress1": format!("person{id}@example.com"),
                "firstname": "Pat", "lastname": format!("Person {id}"),
                "_parentcustomerid_value": guid(0xa, n), format!("_parentcustomerid_value{LN}"): "account",
            }));
        }
        for k in 1..3 {
            connections.push(json!({
                "connectionid": guid(0xe, 2 * n + k), "_record1id_value": guid(0x0b, n), "record1objecttypecode": 3,
                "_record2id_value": guid(0xc, 3 * n + k), "record2objecttypecode": 2,
                "_record2roleid_value": guid(0xf, k), "statecode": 0,
            }));
        }
    }
    let (related, rejected) = Related::from_json(accounts, contacts, roles, connections);
    assert!(rejected.is_empty());
    related
}

fn bench(c: &mut Criterion) {
    let mapping = Mapping::default();
    let related = related();
    let raw: Vec<Value> = (0..N).map(opportunity_json).collect();
    let changes: Vec<Change> = raw
        .iter()
        .map(|v| Change::Upserted(Opportunity::from_json(v.clone()).expect("valid")))
        .collect();
    let texts: Vec<String> = raw.iter().map(Value::to_string).collect();

    let mut group = c.benchmark_group("mapping");
    group.throughput(Throughput::Elements(u64::from(N)));
    group.bench_function("plan 1000 opportunities (2 stakeholders each)", |b| {
        b.iter(|| {
            for change in &changes {
                black_box(plan_change(&mapping, change, &related, &[]));
            }
        })
    });
    group.bench_function("parse JSON + plan 1000 opportunities", |b| {
        b.iter(|| {
            for text in &texts {
                let value: Value = serde_json::from_str(text).expect("valid");
                let change = Change::Upserted(Opportunity::from_json(value).expect("valid"));
                black_box(plan_change(&mapping, &change, &related, &[]));
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
