//! What only the DynamoDB store has: item shapes the Lambda stream filters and the sparse index
//! rely on, the table's stream, and the 400 KB item limit.

use aws_sdk_dynamodb::types::{AttributeValue, StreamViewType};
use oppsync_mapping::{Action, ContactId, Desired, Guid, Role};
use oppsync_state::{PendingChange, StateError, StateStore, Status, TransformResult, WriteResult, Written};

use crate::conformance::{id, plan};
use crate::stores::{client, dynamo};

async fn raw(table: &str, n: u128) -> std::collections::HashMap<String, AttributeValue> {
    client()
        .get_item()
        .table_name(table)
        .key("pk", AttributeValue::S(format!("opp#{}", id(n))))
        .send()
        .await
        .unwrap()
        .item
        .unwrap()
}

#[tokio::test]
async fn items_carry_the_status_the_stream_filters_match_and_leave_the_open_index_when_done() {
    let store = dynamo().await;
    store
        .mark_pending(&[PendingChange::upserted(id(1), 3, None)], 1_000)
        .await
        .unwrap();
    let item = raw(store.table(), 1).await;
    // The transformer's filter: status pending, awaits transform (template.yaml).
    let awaits = |item: &std::collections::HashMap<String, AttributeValue>| item.get("awaits").cloned();
    assert_eq!(item["status"], AttributeValue::S("pending".into()));
    assert_eq!(awaits(&item), Some(AttributeValue::S("transform".into())));
    assert_eq!(item["q"], AttributeValue::S("pending".into()));
    assert_eq!(item["ver"], AttributeValue::N("3".into()));

    let (claim, _) = store
        .claim(id(1), Status::Pending, 10_000, 1_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(awaits(&raw(store.table(), 1).await), None, "a claim wakes no consumer");
    store
        .complete_transform(&claim, TransformResult::Ready(plan(1)), 1_001)
        .await
        .unwrap();
    let item = raw(store.table(), 1).await;
    assert_eq!(item["status"], AttributeValue::S("ready".into()));
    assert_eq!(
        awaits(&item),
        Some(AttributeValue::S("write".into())),
        "the writer's filter"
    );

    // A retry waits without `awaits` until the sweep wakes it.
    let (claim, _) = store.claim(id(1), Status::Ready, 10_000, 1_002).await.unwrap().unwrap();
    assert_eq!(awaits(&raw(store.table(), 1).await), None);
    let retry = WriteResult::Retry {
        error: oppsync_state::SyncError {
            operation: "opportunities.sync".into(),
            code: "606".into(),
            message: "rate".into(),
        },
        written: None,
        retry_at: 1_010,
    };
    store.complete_write(&claim, retry, 1_002).await.unwrap();
    assert_eq!(
        awaits(&raw(store.table(), 1).await),
        None,
        "a waiting retry wakes nothing"
    );
    assert!(store.wake(id(1), 1_010).await.unwrap());
    assert_eq!(
        awaits(&raw(store.table(), 1).await),
        Some(AttributeValue::S("write".into()))
    );
    assert!(
        item.contains_key("plan_json"),
        "a small plan is stored as readable JSON"
    );

    let (claim, _) = store.claim(id(1), Status::Ready, 10_000, 1_002).await.unwrap().unwrap();
    let written = Written {
        version: 3,
        hash: plan(1).hash,
        marketo_guid: None,
        company: None,
        roles: vec![],
        deleted: false,
        at: 1_003,
        sent: None,
    };
    store
        .complete_write(&claim, WriteResult::Synced(written), 1_003)
        .await
        .unwrap();
    let item = raw(store.table(), 1).await;
    assert_eq!(item["status"], AttributeValue::S("synced".into()));
    assert!(
        !item.contains_key("q"),
        "a synced item must leave the sparse open index"
    );
    assert!(!item.contains_key("claim"));
    assert_eq!(awaits(&item), None, "a completion wakes no consumer");
}

#[tokio::test]
async fn the_table_streams_new_images_and_has_the_sparse_open_index() {
    let store = dynamo().await;
    let table = client()
        .describe_table()
        .table_name(store.table())
        .send()
        .await
        .unwrap()
        .table
        .unwrap();
    let stream = table.stream_specification.unwrap();
    assert!(stream.stream_enabled);
    assert_eq!(stream.stream_view_type, Some(StreamViewType::NewImage));
    let indexes = table.global_secondary_indexes.unwrap();
    assert_eq!(indexes.len(), 1);
    assert_eq!(
        indexes[0].index_name.as_deref(),
        Some(oppsync_state::dynamodb::OPEN_INDEX)
    );
    // Creating it again is harmless.
    store.create_table().await.unwrap();
}

#[tokio::test]
async fn a_plan_too_large_for_an_item_even_compressed_is_refused_and_nothing_is_lost() {
    let store = dynamo().await;
    // Role names from a xorshift generator do not compress.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut noise = || {
        (0..40)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                char::from(b'!' + (x % 90) as u8)
            })
            .collect::<String>()
    };
    let mut huge = plan(1);
    if let Action::Upsert(Desired { roles, .. }) = &mut huge.action {
        *roles = (0..12_000)
            .map(|i| Role {
                contact: ContactId(Guid::from_u128(i)),
                role: noise(),
                is_primary: false,
            })
            .collect();
    }
    store
        .mark_pending(&[PendingChange::upserted(id(1), 1, None)], 0)
        .await
        .unwrap();
    let (claim, _) = store.claim(id(1), Status::Pending, 10_000, 0).await.unwrap().unwrap();
    let err = store
        .complete_transform(&claim, TransformResult::Ready(huge), 1)
        .await
        .unwrap_err();
    assert!(matches!(err, StateError::TooLarge { .. }), "{err}");
    assert!(err.to_string().contains("the plan"), "{err}");
    // The record is still pending under its claim: the transformer can record the failure.
    let state = store.get(id(1)).await.unwrap().unwrap();
    assert_eq!(state.status, Status::Pending);
    let failed = oppsync_state::SyncError {
        operation: "store plan".into(),
        code: "TooLarge".into(),
        message: err.to_string(),
    };
    store
        .complete_transform(&claim, TransformResult::Failed(failed), 2)
        .await
        .unwrap();
    assert_eq!(store.get(id(1)).await.unwrap().unwrap().status, Status::Failed);
}

#[tokio::test]
async fn an_unreachable_endpoint_is_a_retryable_error_naming_the_operation() {
    let config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
        .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new("t", "t", None, None, "t"))
        .endpoint_url("http://127.0.0.1:9")
        .retry_config(aws_sdk_dynamodb::config::retry::RetryConfig::disabled())
        .build();
    let store = oppsync_state::DynamoStore::new(aws_sdk_dynamodb::Client::from_conf(config), "nowhere");
    let err = store.get(id(1)).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(err.to_string().contains("GetItem"), "{err}");
}

/// A DynamoDB endpoint that answers every request with an HTML 500 (as moto's server does when
/// it breaks under load, and as a proxy in front of DynamoDB might): counts the requests.
async fn failing_endpoint() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let _ = socket.read(&mut buf).await;
                let body = "<!doctype html><title>500 Internal Server Error</title>";
                let answer = format!(
                    "HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(answer.as_bytes()).await;
            });
        }
    });
    (url, seen)
}

#[tokio::test]
async fn a_server_error_without_a_code_is_retried_and_then_retryable() {
    let (url, seen) = failing_endpoint().await;
    // A client built without a retry configuration, as a caller may hand one in.
    let config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
        .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new("t", "t", None, None, "t"))
        .endpoint_url(url)
        .build();
    let store = oppsync_state::DynamoStore::new(aws_sdk_dynamodb::Client::from_conf(config), "t");
    let err = store.get(id(1)).await.unwrap_err();
    // A 5xx is the service's trouble, not the request's: the next run may succeed.
    assert!(err.is_retryable(), "{err}");
    assert!(err.to_string().contains("GetItem"), "{err}");
    // And the store tried more than once before giving up.
    let attempts = seen.load(std::sync::atomic::Ordering::SeqCst);
    assert!(attempts >= 3, "{attempts} attempts");
}
