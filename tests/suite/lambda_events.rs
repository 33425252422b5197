//! The Lambda handlers with event JSON in the shapes Lambda delivers: stream records that the
//! filters let through (and some they should not have), the Scheduler event, resync requests,
//! and malformed payloads, each of which gets a clear, non-retryable error.

use std::time::{Duration, Instant};

use oppsync_lambda::{HandlerError, parse_stream_event, stream_items};
use oppsync_mapping::OpportunityId;
use oppsync_pipeline::Config;
use oppsync_simulators::dataverse::seed_id;
use oppsync_state::{StateStore, Status};
use oppsync_tests::harness::{pipeline, sims, sqlite};
use serde_json::{Value, json};

const ARN: &str =
    "arn:aws:dynamodb:us-east-1:123456789012:table/oppsync-SyncStateTable-1ABC/stream/2026-11-30T20:00:00.000";

/// One stream record as Lambda delivers it from a NEW_IMAGE stream.
fn record(event_name: &str, pk: &str, status: Option<&str>, seq: u64) -> Value {
    let mut image = json!({
        "pk": {"S": pk},
        "ver": {"N": "1730000000123"},
        "attempts": {"N": "0"},
        "updated": {"N": "1764532800000"},
        "deleted": {"BOOL": false}
    });
    if let Some(s) = status {
        image["status"] = json!({"S": s});
        image["q"] = json!({"S": s});
    }
    let mut dynamodb = json!({
        "ApproximateCreationDateTime": 1764532800,
        "Keys": {"pk": {"S": pk}},
        "SequenceNumber": format!("{:026}", 13021600000000001596u64 + seq),
        "SizeBytes": 212,
        "StreamViewType": "NEW_IMAGE"
    });
    if event_name != "REMOVE" {
        dynamodb["NewImage"] = image;
    }
    json!({
        "eventID": format!("c4ca4238a0b923820dcc509a6f75849{seq}"),
        "eventName": event_name,
        "eventVersion": "1.1",
        "eventSource": "aws:dynamodb",
        "awsRegion": "us-east-1",
        "dynamodb": dynamodb,
        "eventSourceARN": ARN
    })
}

fn opp(n: u64) -> String {
    seed_id(0x0b00_0000, n)
}

#[test]
fn a_stream_event_yields_the_opportunities_of_the_functions_status_with_their_sequence_numbers() {
    let event = json!({"Records": [
        record("INSERT", &format!("opp#{}", opp(1)), Some("pending"), 1),
        record("MODIFY", &format!("opp#{}", opp(2)), Some("ready"), 2),
        record("MODIFY", &format!("opp#{}", opp(3)), Some("pending"), 3),
        // Items that are not opportunities, removals and other statuses are not work.
        record("MODIFY", "cursor#opportunities", None, 4),
        record("MODIFY", "lease#poller", None, 5),
        record("REMOVE", &format!("opp#{}", opp(4)), None, 6),
        record("MODIFY", &format!("opp#{}", opp(5)), Some("synced"), 7),
    ]});
    let parsed = parse_stream_event(event).unwrap();
    let pending = stream_items(&parsed, Status::Pending);
    let ids: Vec<String> = pending.iter().map(|i| i.id.to_string()).collect();
    assert_eq!(ids, vec![opp(1), opp(3)]);
    assert_eq!(
        pending[0].sequence_number,
        format!("{:026}", 13021600000000001596u64 + 1)
    );
    let ready = stream_items(&parsed, Status::Ready);
    assert_eq!(ready.len(), 1);
    assert_eq!(ready[0].id, OpportunityId::parse(&opp(2)).unwrap());
}

#[test]
fn a_record_whose_key_is_not_an_opportunity_id_is_passed_over_not_a_panic() {
    let event = json!({"Records": [
        record("MODIFY", "opp#not-a-guid') or true", Some("pending"), 1),
        record("MODIFY", &format!("opp#{}", opp(9)), Some("pending"), 2),
    ]});
    let items = stream_items(&parse_stream_event(event).unwrap(), Status::Pending);
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].id.to_string(), opp(9));
}

/// Malformed stream payloads, and what the error must name.
fn malformed_stream_events() -> Vec<(Value, &'static str)> {
    vec![
        (json!({}), "Records"),
        (json!({"Records": "all of them"}), "Records"),
        (json!({"Records": [{"eventName": "MODIFY"}]}), "dynamodb"),
        (
            json!({"Records": [{"dynamodb": {"Keys": {}, "NewImage": {}}}]}),
            "SequenceNumber",
        ),
        (json!([1, 2, 3]), "DynamoDB stream event"),
        (Value::Null, "DynamoDB stream event"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_stream_events_get_a_clear_non_retryable_error_and_change_nothing() {
    let sims = sims().await;
    let p = pipeline(&sims, sqlite(), Config::default());
    for (payload, names) in malformed_stream_events() {
        for handler in ["transformer", "writer"] {
            let result = match handler {
                "transformer" => oppsync_lambda::transform(&p, payload.clone()).await.map(|_| ()),
                _ => oppsync_lambda::write(&p, payload.clone(), oppsync_tests::harness::far())
                    .await
                    .map(|_| ()),
            };
            let e = result.expect_err("a malformed event is an error");
            assert!(matches!(e, HandlerError::BadEvent { .. }), "{e:?}");
            assert!(!e.is_retryable(), "retrying a malformed event cannot help");
            let message = e.to_string();
            assert!(message.contains(names), "{handler}: `{message}` should name {names}");
            let diagnostic = lambda_runtime::Diagnostic::from(e);
            assert_eq!(diagnostic.error_type, "NonRetryable");
        }
    }
    assert_eq!(sims.dv.requests(), 0, "nothing was read for a malformed event");
    assert_eq!(sims.mk.rest_calls(), 0, "nothing was written for a malformed event");
    assert_eq!(p.store().counts().await.unwrap().total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_nothing_for_the_function_answers_with_no_failures_and_no_calls() {
    let sims = sims().await;
    let p = pipeline(&sims, sqlite(), Config::default());
    let event = json!({"Records": [record("MODIFY", "cursor#connections", None, 1)]});
    let handled = oppsync_lambda::write(&p, event.clone(), oppsync_tests::harness::far())
        .await
        .unwrap();
    assert!(handled.response.batch_item_failures.is_empty());
    let handled = oppsync_lambda::transform(&p, event).await.unwrap();
    assert_eq!(
        serde_json::to_value(&handled.response).unwrap(),
        json!({"batchItemFailures": []})
    );
    assert_eq!((sims.dv.requests(), sims.mk.rest_calls()), (0, 0));
}

/// The event EventBridge Scheduler sends a templated Lambda target without an input.
fn scheduler_event() -> Value {
    json!({})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_event_polls_and_anything_but_an_object_is_refused() {
    let sims = sims().await;
    sims.dv.seed(20, 3, oppsync_simulators::dataverse::Mix::Realistic);
    let p = pipeline(&sims, sqlite(), Config::default());
    let deadline = Instant::now() + Duration::from_secs(600);
    for bad in [json!("poll"), json!([1]), json!(42), Value::Null] {
        let e = oppsync_lambda::poll(&p, bad, deadline).await.unwrap_err();
        assert!(e.to_string().contains("EventBridge Scheduler event"), "{e}");
        assert!(!e.is_retryable());
    }
    assert_eq!(sims.dv.requests(), 0);
    let handled = oppsync_lambda::poll(&p, scheduler_event(), deadline).await.unwrap();
    assert!(handled.response.caught_up);
    assert_eq!(handled.response.marked, 20);
    assert_eq!(handled.metrics.counts["OpportunitiesMarkedPending"], 20);
    assert!(handled.metrics.counts["DataverseCalls"] > 0);
    // An EventBridge-style event with detail fields is an object too, and polls.
    let rich = json!({"version": "0", "detail-type": "Scheduled Event", "source": "aws.scheduler", "detail": {}});
    let again = oppsync_lambda::poll(&p, rich, deadline).await.unwrap();
    assert_eq!(again.response.marked, 0, "nothing changed since");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_near_its_deadline_stops_checkpointed_and_the_next_run_continues() {
    let sims = sims().await;
    sims.dv.seed(30, 5, oppsync_simulators::dataverse::Mix::Realistic);
    sims.dv.configure(|c| c.max_page_size = 10);
    let p = pipeline(&sims, sqlite(), Config::default());
    // Less than the handler's one-minute margin left: it stops before reading anything.
    let stopped = oppsync_lambda::poll(&p, json!({}), Instant::now() + Duration::from_secs(30))
        .await
        .unwrap();
    assert!(!stopped.response.caught_up && !stopped.response.busy);
    assert_eq!(stopped.response.marked, 0);
    let next = oppsync_lambda::poll(&p, json!({}), Instant::now() + Duration::from_secs(900))
        .await
        .unwrap();
    assert!(next.response.caught_up);
    assert_eq!(next.response.marked, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_requests_are_checked_before_anything_is_read_or_written() {
    let sims = sims().await;
    let p = pipeline(&sims, sqlite(), Config::default());
    let cases = [
        (
            json!({"opportunityIds": ["0b000000-0000-4000-8000-00000000000z"]}),
            "not opportunity ids",
        ),
        (
            json!({"opportunityIds": ["x') or statecode eq 0 or ('"]}),
            "not opportunity ids",
        ),
        (json!({"opportunityIds": []}), "nothing to resync"),
        (json!({}), "nothing to resync"),
        (json!({"opportunityIds": [opp(1)], "all": true}), "not both"),
        (json!({"ids": [opp(1)]}), "unknown field `ids`"),
        (json!({"opportunityIds": opp(1)}), "invalid type"),
        (json!({"all": "yes"}), "invalid type"),
        (json!({"failed": true, "all": true}), "not both"),
        (json!({"failed": true, "modifiedSince": "2026-11-01"}), "not both"),
        (json!({"failed": "yes"}), "invalid type"),
        (json!({"modifiedSince": "yesterday"}), "YYYY-MM-DD"),
        (json!({"modifiedSince": "2026-02-30"}), "YYYY-MM-DD"),
        (
            json!({"modifiedSince": "2026-11-01T00:00:00Z' or 1 eq 1"}),
            "YYYY-MM-DD",
        ),
        (json!("resync everything"), "invalid type"),
    ];
    for (payload, names) in cases {
        let e = oppsync_lambda::resync(&p, payload.clone()).await.unwrap_err();
        let message = e.to_string();
        assert!(message.contains(names), "{payload}: `{message}` should say {names}");
        assert!(
            message.contains("opportunityIds"),
            "the error shows the expected shape: {message}"
        );
        assert!(!e.is_retryable());
    }
    assert_eq!((sims.dv.requests(), sims.mk.rest_calls()), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_resync_reports_the_plan_and_writes_nothing() {
    let sims = sims().await;
    let seeded = sims.dv.seed(5, 11, oppsync_simulators::dataverse::Mix::Uniform);
    let p = pipeline(&sims, sqlite(), Config::default());
    let id = seeded.opportunities[0].clone();
    let handled = oppsync_lambda::resync(&p, json!({"opportunityIds": [id.to_uppercase()], "dryRun": true}))
        .await
        .unwrap();
    let report = serde_json::to_value(&handled.response).unwrap();
    assert_eq!(report["dry_run"], json!(true));
    assert_eq!(report["records"].as_array().unwrap().len(), 1);
    assert_eq!(report["records"][0]["id"], json!(id), "ids are read case-insensitively");
    assert!(report["records"][0]["plan"].is_object(), "{report}");
    assert_eq!(report["records"][0]["write"], Value::Null);
    assert_eq!(sims.mk.rest_calls(), 0);
    assert_eq!(
        p.store().counts().await.unwrap().total(),
        0,
        "a dry run records nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_writes_the_named_record_again_and_reports_marketos_answers() {
    let sims = sims().await;
    let seeded = sims.dv.seed(6, 12, oppsync_simulators::dataverse::Mix::Uniform);
    let p = pipeline(&sims, sqlite(), Config::default());
    oppsync_tests::harness::sync(&p).await;
    let id = seeded.opportunities[2].clone();
    let calls = sims.mk.rest_calls();
    let handled = oppsync_lambda::resync(&p, json!({"opportunityIds": [id]}))
        .await
        .unwrap();
    let report = serde_json::to_value(&handled.response).unwrap();
    let record = &report["records"][0];
    assert_eq!(record["id"], json!(id));
    assert_eq!(record["write"]["outcome"], "synced", "{report}");
    assert!(record["previously_written"]["hash"].is_string() || record["previously_written"]["hash"].is_number());
    let operations: Vec<&str> = record["answers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["operation"].as_str().unwrap())
        .collect();
    assert!(operations.contains(&"opportunities.sync"), "{operations:?}");
    assert!(sims.mk.rest_calls() > calls, "written again though nothing changed");
    assert_eq!(handled.metrics.counts["OpportunitiesResynced"], 1);
}

#[test]
fn the_partial_batch_response_has_the_shape_lambda_reads() {
    // Lambda reads `batchItemFailures[].itemIdentifier` (ReportBatchItemFailures); anything
    // else is taken as "all succeeded".
    let mut response = oppsync_lambda::BatchResponse::default();
    let mut failure = aws_lambda_events::streams::DynamoDbBatchItemFailure::default();
    failure.item_identifier = Some("13021600000000001597".into());
    response.batch_item_failures.push(failure);
    let json = serde_json::to_value(&response).unwrap();
    assert_eq!(json["batchItemFailures"][0]["itemIdentifier"], "13021600000000001597");
}

/// GIVEN opportunities synced and then two changed in Dynamics WHEN the resync function is
/// asked for what changed since the first change THEN a dry run takes exactly those two and
/// writes nothing, and the resync writes them; a date before everything takes every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_of_what_changed_since_a_time_takes_exactly_those_opportunities() {
    let sims = sims().await;
    let seeded = sims.dv.seed(8, 14, oppsync_simulators::dataverse::Mix::Uniform);
    let p = pipeline(&sims, sqlite(), Config::default());
    oppsync_tests::harness::sync(&p).await;
    let (a, b) = (seeded.opportunities[2].clone(), seeded.opportunities[5].clone());
    let table = oppsync_simulators::dataverse::Table::Opportunities;
    sims.dv.upsert(table, &a, json!({"name": "Changed A"}), &[]);
    let since = sims.dv.row(table, &a).unwrap().attributes["modifiedon"].clone();
    sims.dv.upsert(table, &b, json!({"name": "Changed B"}), &[]);
    let calls = sims.mk.rest_calls();
    let dry = oppsync_lambda::resync(&p, json!({"modifiedSince": since, "dryRun": true}))
        .await
        .unwrap();
    let report = serde_json::to_value(&dry.response).unwrap();
    assert_eq!(report["targeted"], 2, "{report}");
    let mut named: Vec<&str> = report["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    named.sort_unstable();
    let mut expected = vec![a.as_str(), b.as_str()];
    expected.sort_unstable();
    assert_eq!(named, expected);
    assert_eq!(sims.mk.rest_calls(), calls, "a dry run makes no Marketo call");
    let run = oppsync_lambda::resync(&p, json!({"modifiedSince": since}))
        .await
        .unwrap();
    assert_eq!(run.response.targeted, 2);
    assert_eq!(sims.mk.snapshot().opportunities[&a]["name"], json!("Changed A"));
    assert_eq!(sims.mk.snapshot().opportunities[&b]["name"], json!("Changed B"));
    let everything = oppsync_lambda::resync(&p, json!({"modifiedSince": "2026-01-01", "dryRun": true}))
        .await
        .unwrap();
    assert_eq!(everything.response.targeted, 8);
}

/// GIVEN records Marketo refused for good WHEN the cause is fixed and the resync function is
/// asked for the failed ones THEN a dry run counts them and writes nothing, and the replay
/// writes each, leaving nothing failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_of_failed_records_counts_them_first_and_writes_each_again() {
    let sims = sims().await;
    let seeded = sims.dv.seed(6, 15, oppsync_simulators::dataverse::Mix::Uniform);
    for n in [1, 4] {
        sims.mk.skip_record(&seeded.opportunities[n], "1003", 1);
    }
    let p = pipeline(&sims, sqlite(), Config::default());
    oppsync_tests::harness::sync(&p).await;
    assert_eq!(p.store().counts().await.unwrap().get(Status::Failed), 2);
    let calls = sims.mk.rest_calls();
    let dry = oppsync_lambda::resync(&p, json!({"failed": true, "dryRun": true}))
        .await
        .unwrap();
    assert_eq!((dry.response.targeted, dry.response.records.len()), (2, 2));
    assert_eq!(sims.mk.rest_calls(), calls, "a dry run makes no Marketo call");
    assert_eq!(p.store().counts().await.unwrap().get(Status::Failed), 2);
    let replay = oppsync_lambda::resync(&p, json!({"failed": true})).await.unwrap();
    let report = serde_json::to_value(&replay.response).unwrap();
    assert_eq!(report["targeted"], 2);
    for record in report["records"].as_array().unwrap() {
        assert_eq!(record["write"]["outcome"], "synced", "{report}");
    }
    let counts = p.store().counts().await.unwrap();
    assert_eq!(
        (counts.get(Status::Failed), counts.get(Status::Synced)),
        (0, 6),
        "{counts:?}"
    );
    oppsync_tests::harness::assert_marketo_matches_dynamics(&sims);
}
