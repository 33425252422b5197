//! The stores under test, each fresh.

use std::sync::atomic::{AtomicU32, Ordering};

use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
use oppsync_state::{DynamoStore, SqliteStore};

static NEXT: AtomicU32 = AtomicU32::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A new SQLite file in the temporary directory.
pub fn sqlite() -> SqliteStore {
    let path = std::env::temp_dir().join(format!("{}.db", unique("oppsync-state-test")));
    SqliteStore::open(path).unwrap()
}

/// The moto server that scripts/test started.
pub fn endpoint() -> String {
    std::env::var("OPPSYNC_DYNAMODB_ENDPOINT").unwrap_or_else(|_| {
        panic!(
            "OPPSYNC_DYNAMODB_ENDPOINT is not set. The DynamoDB tests run against moto's server, which \
             scripts/test installs and starts; run scripts/test, or start `moto_server -H 127.0.0.1 -p 5000` \
             and set OPPSYNC_DYNAMODB_ENDPOINT=http://127.0.0.1:5000"
        )
    })
}

pub fn client() -> aws_sdk_dynamodb::Client {
    let config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "tests"))
        .endpoint_url(endpoint())
        .build();
    aws_sdk_dynamodb::Client::from_conf(config)
}

/// A new table on the moto server.
pub async fn dynamo() -> DynamoStore {
    let store = DynamoStore::new(client(), unique("oppsync-state-test"));
    store.create_table().await.unwrap();
    store
}
