//! The bad-input catalogue: configuration, events, Dataverse data and Marketo answers that are
//! wrong in the ways real ones are. Each gets a clear error or a recorded per-record failure,
//! none a panic, and nothing already recorded is lost.

use oppsync_mapping::OpportunityId;
use oppsync_marketo::Operation as E;
use oppsync_pipeline::Config;
use oppsync_simulators::MarketoFault;
use oppsync_simulators::dataverse::{Mix, Table, seed_id};
use oppsync_state::{StateStore, Status};
use oppsync_tests::harness::{pipeline, sims, sqlite, sync};
use serde_json::{Value, json};

/// Configuration documents, and what the error must name.
const CONFIGS: [(&str, &str); 13] = [
    ("[mapping\n", "TOML"),
    ("[marketo]\ncalls_per_20s = 0\n", "calls_per_20s"),
    ("[marketo]\nconcurrent_calls = 11\n", "concurrent_calls"),
    ("[marketo]\ndaily_budget = -5\n", "daily_budget"),
    ("[marketo]\ndaily_budget = 50\n", "daily_budget"),
    ("[dataverse]\npage_size = 6000\n", "page_size"),
    ("[dataverse]\nchange_detection = \"webhooks\"\n", "change_detection"),
    ("[sync]\nbatch_size = 301\n", "batch_size"),
    ("[sync]\nclaim_ttl_seconds = 1\n", "claim_ttl_seconds"),
    ("[unknown]\nx = 1\n", "unknown"),
    (
        "[[mapping.fields]]\nmarketo = \"x\"\ndataverse = \"y\"\ntype = \"text\"\n",
        "type",
    ),
    (
        "[[mapping.fields]]\nmarketo = \"name\"\ndataverse = \"name\"\ntype = \"string\"\n[[mapping.fields]]\nmarketo = \"Name\"\ndataverse = \"topic\"\ntype = \"string\"\n",
        "more than once",
    ),
    ("[mapping.leads]\nmatch = \"field\"\n", "field"),
];

/// Lambda payloads, and what the error must name.
fn events() -> Vec<(&'static str, Value, &'static str)> {
    vec![
        ("transformer", json!({}), "Records"),
        ("writer", json!({"Records": {}}), "Records"),
        (
            "writer",
            json!({"Records": [{"dynamodb": {"NewImage": {}}}]}),
            "SequenceNumber",
        ),
        ("transformer", json!("{\"Records\": []}"), "DynamoDB stream event"),
        (
            "resync",
            json!({"opportunityIds": ["../../etc/passwd"]}),
            "not opportunity ids",
        ),
        ("resync", json!({"opportunityIds": [42]}), "invalid type"),
        ("resync", json!({"all": true, "dryRun": "yes"}), "invalid type"),
        ("poller", json!([]), "EventBridge Scheduler event"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalogue() {
    let mut cases = 0;

    // Configuration: every problem named, with its key.
    for (text, names) in CONFIGS {
        let e = Config::from_toml(text, "catalogue.toml").expect_err(text);
        let message = e.to_string();
        assert!(message.contains(names), "{text:?}: `{message}` should name {names}");
        assert!(message.contains("catalogue.toml"), "the origin is named: {message}");
        cases += 1;
    }

    // Events: a clear, non-retryable error; nothing read, nothing written.
    let s = sims().await;
    let p = pipeline(&s, sqlite(), Config::default());
    for (handler, payload, names) in events() {
        let result = match handler {
            "transformer" => oppsync_lambda::transform(&p, payload.clone()).await.err(),
            "writer" => oppsync_lambda::write(&p, payload.clone(), oppsync_tests::harness::far())
                .await
                .err(),
            "resync" => oppsync_lambda::resync(&p, payload.clone()).await.err(),
            _ => oppsync_lambda::poll(&p, payload.clone(), std::time::Instant::now())
                .await
                .err(),
        };
        let e = result.unwrap_or_else(|| panic!("{handler} took {payload}"));
        assert!(
            e.to_string().contains(names),
            "{handler} {payload}: `{e}` should name {names}"
        );
        assert!(!e.is_retryable());
        cases += 1;
    }
    assert_eq!((s.dv.requests(), s.mk.rest_calls()), (0, 0));

    cases += dataverse_data().await;
    cases += marketo_answers().await;
    assert!(cases >= 30, "the catalogue has {cases} cases");
}

/// Dataverse rows that are wrong: each opportunity either syncs (with a warning where a value
/// could not be used) or is recorded as failed with the reason; the good ones all sync.
async fn dataverse_data() -> usize {
    let s = sims().await;
    let seeded = s.dv.seed(30, 9, Mix::Uniform);
    let o = |n: u64| seed_id(0x0b00_0000, n);
    let c = |n: u64| seed_id(0xc000_0000, n);
    let mut cases = 0;
    let mut bad = |id: String, attrs: Value, lookups: &[(&str, &'static str)]| {
        s.dv.upsert(Table::Opportunities, &id, attrs, lookups);
        cases += 1;
        id
    };
    let long_name = bad(o(1), json!({"name": "x".repeat(10_240)}), &[]);
    let unknown_state = bad(o(2), json!({"statecode": 9, "statuscode": 77}), &[]);
    let text_amount = bad(
        o(3),
        json!({"estimatedvalue": "a lot", "closeprobability": "high"}),
        &[],
    );
    let bad_date = bad(o(4), json!({"estimatedclosedate": "2026-02-30"}), &[]);
    let all_null = bad(
        o(5),
        json!({"name": null, "description": null, "estimatedvalue": null, "closeprobability": null,
               "statecode": null, "estimatedclosedate": null, "actualclosedate": null,
               "_customerid_value": null, "_parentaccountid_value": null, "_parentcontactid_value": null}),
        &[],
    );
    let missing_contact = bad(
        o(6),
        json!({"_customerid_value": c(999_999), "_parentcontactid_value": c(999_999)}),
        &[("_customerid_value", "contact"), ("_parentcontactid_value", "contact")],
    );
    let bad_guid = bad(
        o(7),
        json!({"_customerid_value": "not-a-guid"}),
        &[("_customerid_value", "contact")],
    );
    // A contact whose parent is a contact: the opportunity's account is left empty.
    s.dv.upsert(
        Table::Contacts,
        &c(21),
        json!({"_parentcustomerid_value": c(22)}),
        &[("_parentcustomerid_value", "contact")],
    );
    let parent_contact = bad(
        o(8),
        json!({"_customerid_value": c(21), "_parentcontactid_value": c(21)}),
        &[("_customerid_value", "contact"), ("_parentcontactid_value", "contact")],
    );
    // A contact with an email Marketo cannot take.
    s.dv.upsert(Table::Contacts, &c(24), json!({"emailaddress1": "not an email"}), &[]);
    let bad_email = bad(
        o(9),
        json!({"_customerid_value": c(24), "_parentcontactid_value": c(24)}),
        &[("_customerid_value", "contact"), ("_parentcontactid_value", "contact")],
    );

    let p = pipeline(&s, sqlite(), Config::default());
    let report = sync(&p).await;
    let snapshot = s.mk.snapshot();
    let state = |id: &str| {
        let p = &p;
        let id = OpportunityId::parse(id).unwrap();
        async move { p.store().get(id).await.unwrap().unwrap() }
    };
    // A 10 KB name is cut to Marketo's length, with a warning in the plan.
    let name = snapshot.opportunities[&long_name]["name"].as_str().unwrap().len();
    assert!(name <= 255, "{name}");
    assert!(!state(&long_name).await.plan.unwrap().warnings.is_empty());
    // Values that cannot be converted are left out (Marketo keeps its own), with warnings.
    for id in [
        &unknown_state,
        &text_amount,
        &bad_date,
        &all_null,
        &missing_contact,
        &parent_contact,
        &bad_email,
    ] {
        let st = state(id).await;
        assert!(
            matches!(st.status, Status::Synced | Status::Failed),
            "{id}: {:?}",
            st.status
        );
        if st.status == Status::Failed {
            let e = st.last_error.unwrap();
            assert!(!e.message.is_empty() && !e.code.is_empty(), "{id}: {e:?}");
        }
    }
    assert!(
        snapshot.opportunities[&text_amount]
            .get("amount")
            .is_none_or(|a| a.is_number() || a.is_null())
    );
    // The contact-parented contact gives the opportunity no account.
    assert!(matches!(
        snapshot.opportunities[&parent_contact].get("externalCompanyId"),
        None | Some(Value::Null)
    ));
    // A malformed GUID in a lookup is not trusted.
    let st = state(&bad_guid).await;
    assert!(matches!(st.status, Status::Synced | Status::Failed));
    // Nothing lost: every other opportunity is synced.
    for id in seeded.opportunities.iter().skip(10) {
        assert_eq!(state(id).await.status, Status::Synced, "{id}");
    }
    assert!(report.written >= 20, "{report:?}");
    cases
}

/// Marketo answers that are wrong: each is a retry or a recorded failure, and once Marketo
/// answers properly again every record syncs.
async fn marketo_answers() -> usize {
    let s = sims().await;
    s.dv.seed(20, 10, Mix::Uniform);
    let faults = [
        (E::OpportunitySync, MarketoFault::Malformed),
        (E::CompanySync, MarketoFault::DropResult),
        (E::RoleSync, MarketoFault::Http(500)),
        (E::LeadQuery, MarketoFault::Code("1029")),
        (E::LeadSync, MarketoFault::Http(413)),
        (E::OpportunitySync, MarketoFault::Code("709")),
    ];
    for (endpoint, fault) in &faults {
        // Every attempt of the first write fails this way.
        for n in 1..=8 {
            s.mk.inject(*endpoint, n, fault.clone());
        }
    }
    let p = pipeline(&s, sqlite(), Config::default());
    p.poll(None).await.unwrap();
    let first = p.drain(|_, _| {}).await.unwrap();
    let counts = p.store().counts().await.unwrap();
    assert_eq!(
        counts.get(Status::Synced),
        0,
        "nothing got through those answers: {counts:?}"
    );
    assert!(first.failed + first.retried > 0 || first.stopped.is_some(), "{first:?}");
    // Marketo answers properly again: resync the failed ones, drain the rest.
    s.mk.clear_faults();
    let mut failed = Vec::new();
    let listed = p.store().list(Status::Failed, 100, None).await.unwrap();
    for st in &listed.items {
        assert!(!st.last_error.as_ref().unwrap().message.is_empty());
        failed.push(st.id);
    }
    if !failed.is_empty() {
        p.resync(oppsync_pipeline::ResyncTarget::Ids(failed), false)
            .await
            .unwrap();
    }
    for _ in 0..5 {
        p.drain(|_, _| {}).await.unwrap();
    }
    let counts = p.store().counts().await.unwrap();
    assert_eq!(counts.get(Status::Synced), 20, "{counts:?}");
    faults.len()
}
