//! The SAM template grants each function only what it uses and wires the pipeline as
//! architecture.md draws it. cfn-lint and `sam validate --lint` run in scripts/test too, but
//! their checks stop short of these.

use std::collections::{BTreeMap, BTreeSet};

use oppsync_tests::template::{self, resources, stream_source};
use serde_json::{Value, json};

/// Each role's grants: (action, resource) pairs, resources in CloudFormation's long form.
fn grants(role: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for policy in role["Properties"]["Policies"].as_array().unwrap() {
        for statement in policy["PolicyDocument"]["Statement"].as_array().unwrap() {
            assert_eq!(statement["Effect"], "Allow", "{statement}");
            let list = |v: &Value| match v {
                Value::Array(items) => items.clone(),
                other => vec![other.clone()],
            };
            for action in list(&statement["Action"]) {
                for resource in list(&statement["Resource"]) {
                    out.insert((action.as_str().unwrap().to_owned(), resource.to_string()));
                }
            }
        }
    }
    out
}

fn table() -> String {
    json!({"Fn::GetAtt": ["SyncStateTable", "Arn"]}).to_string()
}

fn index() -> String {
    json!({"Fn::Sub": "${SyncStateTable.Arn}/index/open"}).to_string()
}

fn stream() -> String {
    json!({"Fn::GetAtt": ["SyncStateTable", "StreamArn"]}).to_string()
}

fn secrets() -> Vec<String> {
    vec![
        json!({"Ref": "DynamicsSecretArn"}).to_string(),
        json!({"Ref": "MarketoSecretArn"}).to_string(),
    ]
}

/// What each function needs, from the calls its code makes (shared/state/src/dynamodb.rs):
/// - poller: the lease (UpdateItem), cursors (GetItem; advance = ConditionCheck on the lease +
///   PutItem, one transaction), pending marks and requeues (UpdateItem), connection links
///   (BatchWriteItem, BatchGetItem), the stuck sweep (Query on `open`) and the deletion scan,
///   which lists closed statuses too (Scan);
/// - transformer: claim and complete (UpdateItem), plus reading its stream;
/// - writer: claim and complete (UpdateItem), the day's Marketo calls (GetItem, UpdateItem),
///   plus its stream;
/// - resync: what was written before (GetItem), requeue, claim, complete (UpdateItem).
///
/// Every function reads both secrets at cold start and writes its own log group.
fn needs() -> BTreeMap<&'static str, BTreeSet<(String, String)>> {
    let mut needs = BTreeMap::new();
    let on = |actions: &[&str], resources: &[String]| -> BTreeSet<(String, String)> {
        let mut set = BTreeSet::new();
        for a in actions {
            for r in resources {
                set.insert((a.to_string(), r.clone()));
            }
        }
        set
    };
    // Each function reads only the secrets of the systems it reaches.
    let common = |function: &str| {
        let log = json!({"Fn::GetAtt": [format!("{function}LogGroup"), "Arn"]}).to_string();
        let mut set = on(&["logs:CreateLogStream", "logs:PutLogEvents"], &[log]);
        let all = secrets();
        let readable: Vec<String> = match function {
            "Poller" | "Transformer" => vec![all[0].clone()],
            "Writer" => vec![all[1].clone()],
            _ => all,
        };
        set.extend(on(&["secretsmanager:GetSecretValue"], &readable));
        set
    };
    let stream_read = on(
        &[
            "dynamodb:DescribeStream",
            "dynamodb:GetRecords",
            "dynamodb:GetShardIterator",
            "dynamodb:ListStreams",
        ],
        &[stream()],
    );
    let failures = on(
        &["sqs:SendMessage"],
        &[json!({"Fn::GetAtt": ["StreamFailureQueue", "Arn"]}).to_string()],
    );

    let mut poller = common("Poller");
    poller.extend(on(
        &[
            "dynamodb:GetItem",
            "dynamodb:PutItem",
            "dynamodb:UpdateItem",
            "dynamodb:ConditionCheckItem",
            "dynamodb:BatchGetItem",
            "dynamodb:BatchWriteItem",
            "dynamodb:Query",
            "dynamodb:Scan",
        ],
        &[table(), index()],
    ));
    needs.insert("PollerRole", poller);

    let mut transformer = common("Transformer");
    transformer.extend(stream_read.clone());
    transformer.extend(failures.clone());
    transformer.extend(on(&["dynamodb:UpdateItem"], &[table()]));
    needs.insert("TransformerRole", transformer);

    let mut writer = common("Writer");
    writer.extend(stream_read);
    writer.extend(failures);
    writer.extend(on(&["dynamodb:GetItem", "dynamodb:UpdateItem"], &[table()]));
    needs.insert("WriterRole", writer);

    let mut resync = common("Resync");
    resync.extend(on(&["dynamodb:GetItem", "dynamodb:UpdateItem"], &[table()]));
    needs.insert("ResyncRole", resync);
    needs
}

#[test]
fn no_policy_grants_a_wildcard() {
    let t = template::load();
    let roles = resources(&t, "AWS::IAM::Role");
    assert_eq!(roles.len(), 4, "one role per function");
    for (name, role) in roles {
        for (action, resource) in grants(role) {
            assert!(!action.contains('*'), "{name} grants the wildcard action {action}");
            assert!(
                !resource.contains('*'),
                "{name} grants {action} on the wildcard {resource}"
            );
        }
    }
}

#[test]
fn each_role_grants_exactly_what_its_function_uses() {
    let t = template::load();
    for (role, needed) in needs() {
        let granted = grants(&t["Resources"][role]);
        let extra: Vec<_> = granted.difference(&needed).collect();
        let missing: Vec<_> = needed.difference(&granted).collect();
        assert!(extra.is_empty(), "{role} grants more than its function uses: {extra:?}");
        assert!(missing.is_empty(), "{role} lacks what its function uses: {missing:?}");
    }
}

#[test]
fn every_function_runs_under_its_own_role_and_no_sam_generated_policy() {
    // A SAM `Policies:` list (or no `Role`) makes SAM attach managed policies whose resource
    // is `*` (AWSLambdaDynamoDBExecutionRole): the explicit roles above replace them.
    let t = template::load();
    let functions = resources(&t, "AWS::Serverless::Function");
    assert_eq!(functions.len(), 4);
    for (name, f) in functions {
        let props = &f["Properties"];
        assert!(props.get("Policies").is_none(), "{name} has SAM policies");
        let role = props["Role"]["Fn::GetAtt"][0].as_str().unwrap_or_default();
        assert_eq!(role, name.replace("Function", "Role"), "{name} runs under {role}");
        assert_eq!(f["Metadata"]["BuildMethod"], "rust-cargolambda", "{name}");
    }
}

#[test]
fn each_function_builds_the_binary_of_its_crate() {
    let t = template::load();
    for (logical, crate_dir) in [
        ("PollerFunction", "poller"),
        ("TransformerFunction", "transformer"),
        ("WriterFunction", "writer"),
        ("ResyncFunction", "resync"),
    ] {
        let binary = t["Resources"][logical]["Metadata"]["BuildProperties"]["Binary"]
            .as_str()
            .unwrap();
        let manifest: toml::Table =
            std::fs::read_to_string(oppsync_tests::repo_root().join(format!("functions/{crate_dir}/Cargo.toml")))
                .unwrap()
                .parse()
                .unwrap();
        let bins = manifest["bin"].as_array().unwrap();
        assert!(
            bins.iter().any(|b| b["name"].as_str() == Some(binary)),
            "{logical} builds `{binary}`, which functions/{crate_dir} does not define"
        );
    }
}

#[test]
fn the_runtime_is_al2023_on_arm64() {
    let t = template::load();
    let globals = &t["Globals"]["Function"];
    assert_eq!(globals["Runtime"], "provided.al2023");
    assert_eq!(globals["Architectures"], json!(["arm64"]));
    for variable in ["STATE_TABLE", "OPPSYNC_CONFIG"] {
        assert!(
            globals["Environment"]["Variables"].get(variable).is_some(),
            "the functions need {variable} (shared/lambda/src/coldstart.rs)"
        );
    }
    for variable in ["DYNAMICS_SECRET_ARN", "MARKETO_SECRET_ARN"] {
        assert!(
            globals["Environment"]["Variables"].get(variable).is_none(),
            "{variable} is given only to the functions that use it"
        );
    }
}

/// Each function is given, and its role may read, only the secrets of the systems it reaches
/// (shared/lambda's `*Pipeline` types): the poller and the transformer Dynamics, the writer
/// Marketo, resync both.
#[test]
fn each_function_reads_only_the_secrets_it_uses() {
    let t = template::load();
    for (function, role, secrets) in [
        ("PollerFunction", "PollerRole", vec!["Dynamics"]),
        ("TransformerFunction", "TransformerRole", vec!["Dynamics"]),
        ("WriterFunction", "WriterRole", vec!["Marketo"]),
        ("ResyncFunction", "ResyncRole", vec!["Dynamics", "Marketo"]),
    ] {
        let variables = &t["Resources"][function]["Properties"]["Environment"]["Variables"];
        let statements = t["Resources"][role]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
            .as_array()
            .unwrap();
        let readable: Vec<Value> = statements
            .iter()
            .filter(|st| st["Action"] == "secretsmanager:GetSecretValue")
            .flat_map(|st| match &st["Resource"] {
                Value::Array(list) => list.clone(),
                one => vec![one.clone()],
            })
            .collect();
        let mut wanted = Vec::new();
        for system in ["Dynamics", "Marketo"] {
            let variable = format!("{}_SECRET_ARN", system.to_ascii_uppercase());
            let parameter = json!({"Ref": format!("{system}SecretArn")});
            if secrets.contains(&system) {
                assert_eq!(variables[&variable], parameter, "{function} needs {variable}");
                wanted.push(parameter);
            } else {
                assert!(
                    variables.get(&variable).is_none(),
                    "{function} must not be given {variable}"
                );
            }
        }
        assert_eq!(readable, wanted, "{role} reads exactly the secrets {function} uses");
    }
}

#[test]
fn the_stream_consumers_report_partial_failures_bisect_retry_and_dead_letter() {
    let t = template::load();
    for (function, event, wanted) in [
        (
            "TransformerFunction",
            "Pending",
            json!({"dynamodb": {"NewImage": {"status": {"S": ["pending"]}, "awaits": {"S": ["transform"]}}}}),
        ),
        // Only the transition into "awaits its step" triggers a consumer: claims, renewals and
        // completions (which remove `awaits`) and a retry's wait (which has none) wake nothing.
        (
            "WriterFunction",
            "Ready",
            json!({"dynamodb": {"NewImage": {"status": {"S": ["ready"]}, "awaits": {"S": ["write"]}}}}),
        ),
    ] {
        let e = &t["Resources"][function]["Properties"]["Events"][event];
        assert_eq!(e["Type"], "DynamoDB", "{function}");
        let p = &e["Properties"];
        assert_eq!(p["Stream"], json!({"Fn::GetAtt": ["SyncStateTable", "StreamArn"]}));
        assert_eq!(
            p["FunctionResponseTypes"],
            json!(["ReportBatchItemFailures"]),
            "{function}"
        );
        assert_eq!(p["BisectBatchOnFunctionError"], json!(true), "{function}");
        let retries = p["MaximumRetryAttempts"].as_i64().unwrap();
        assert!(
            (1..=10).contains(&retries),
            "{function}: a bounded retry count, not {retries}"
        );
        assert_eq!(
            p["DestinationConfig"]["OnFailure"]["Destination"],
            json!({"Fn::GetAtt": ["StreamFailureQueue", "Arn"]})
        );
        let (pattern, batch) = stream_source(&t, function, event);
        assert_eq!(pattern, wanted, "{function}");
        assert_eq!(batch, 300, "{function}: batches fill one Marketo call");
    }
    let writer = &t["Resources"]["WriterFunction"]["Properties"];
    assert!(
        writer["Events"]["Ready"]["Properties"]["MaximumBatchingWindowInSeconds"]
            .as_i64()
            .unwrap()
            > 0,
        "the writer waits for batches to fill"
    );
    assert_eq!(
        writer["ReservedConcurrentExecutions"],
        json!({"Ref": "WriterConcurrency"})
    );
    let allowed = t["Parameters"]["WriterConcurrency"]["AllowedValues"]
        .as_array()
        .unwrap();
    assert!(allowed.len() <= 4, "the writer's concurrency stays low");
}

#[test]
fn no_function_is_given_a_fixed_split_of_the_budget() {
    // The writers, the resync function and any oppsync command on the table share the budget
    // through the state table (each takes 1/members, counted before every call); a fixed split
    // by reserved concurrency would divide it twice.
    let t = template::load();
    assert!(t["Mappings"]["BudgetShare"].is_null());
    let text = std::fs::read_to_string(oppsync_tests::repo_root().join("template.yaml")).unwrap();
    assert!(!text.contains("MARKETO_BUDGET_SHARE"));
}

#[test]
fn the_poller_runs_on_a_scheduler_schedule_with_a_dead_letter_queue() {
    let t = template::load();
    let poller = &t["Resources"]["PollerFunction"]["Properties"];
    let schedule = &poller["Events"]["Schedule"];
    assert_eq!(schedule["Type"], "ScheduleV2");
    assert_eq!(
        schedule["Properties"]["ScheduleExpression"],
        json!({"Ref": "PollSchedule"})
    );
    assert_eq!(t["Parameters"]["PollSchedule"]["Default"], "rate(1 minute)");
    assert_eq!(
        schedule["Properties"]["DeadLetterConfig"]["Arn"],
        json!({"Fn::GetAtt": ["ScheduleDeadLetterQueue", "Arn"]})
    );
    assert_eq!(poller["ReservedConcurrentExecutions"], json!(1));
    assert_eq!(poller["Timeout"], json!(900), "the longest a backfill step can run");
}

#[test]
fn the_state_table_streams_new_images_with_recovery_and_on_demand_billing() {
    let t = template::load();
    let p = &t["Resources"]["SyncStateTable"]["Properties"];
    assert_eq!(p["BillingMode"], "PAY_PER_REQUEST");
    assert_eq!(p["StreamSpecification"]["StreamViewType"], "NEW_IMAGE");
    assert_eq!(
        p["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"],
        json!(true)
    );
}

#[test]
fn alarms_cover_errors_dead_letters_iterator_age_and_sync_lag() {
    let t = template::load();
    let alarms = resources(&t, "AWS::CloudWatch::Alarm");
    let watched: BTreeSet<String> = alarms
        .iter()
        .map(|(_, a)| {
            let p = &a["Properties"];
            let metric = p["MetricName"]
                .as_str()
                .or_else(|| p["Metrics"][0]["MetricStat"]["Metric"]["MetricName"].as_str())
                .unwrap();
            assert!(p["AlarmActions"].as_array().is_some_and(|a| !a.is_empty()));
            metric.to_owned()
        })
        .collect();
    for metric in ["Errors", "ApproximateNumberOfMessagesVisible", "IteratorAge", "SyncLag"] {
        assert!(watched.contains(metric), "no alarm on {metric}: {watched:?}");
    }
    let errors = alarms
        .iter()
        .filter(|(_, a)| a["Properties"]["MetricName"] == "Errors")
        .count();
    assert_eq!(errors, 4, "one error alarm per function");
}

/// The metric names the dashboard and alarms read from the `oppsync` namespace (checked
/// against what the handlers emit in the Lambda flow test).
pub fn dashboard_metrics() -> BTreeSet<String> {
    let t = template::load();
    let body = &t["Resources"]["Dashboard"]["Properties"]["DashboardBody"]["Fn::Sub"];
    let body: Value = serde_json::from_str(body.as_str().unwrap()).unwrap();
    let mut names = BTreeSet::new();
    for widget in body["widgets"].as_array().unwrap() {
        for row in widget["properties"]["metrics"].as_array().into_iter().flatten() {
            // "." repeats the row above's namespace; every such row here follows an oppsync one.
            if row[0] == "oppsync" || row[0] == "." {
                names.insert(row[1].as_str().unwrap().to_owned());
            }
        }
    }
    names
}

#[test]
fn the_dashboard_is_valid_json_showing_the_sync_metrics() {
    let names = dashboard_metrics();
    for metric in [
        "OpportunitiesSynced",
        "OpportunitiesFailed",
        "OpportunitiesSkippedUnchanged",
        "SyncLag",
        "DataverseCalls",
    ] {
        assert!(names.contains(metric), "the dashboard lacks {metric}: {names:?}");
    }
}

/// Every topic an alarm publishes to is encrypted with a customer-managed key whose policy lets
/// CloudWatch use it: under the AWS-managed `alias/aws/sns` key, CloudWatch cannot publish and
/// every alarm goes nowhere.
#[test]
fn alarm_topics_use_a_key_cloudwatch_may_publish_with() {
    let t = template::load();
    let mut topics = BTreeSet::new();
    for (name, alarm) in template::resources(&t, "AWS::CloudWatch::Alarm") {
        for action in alarm["Properties"]["AlarmActions"].as_array().unwrap_or(&Vec::new()) {
            let topic = action["Ref"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: an action that is not a topic in this stack"));
            topics.insert(topic.to_owned());
        }
    }
    assert!(!topics.is_empty(), "the alarms publish somewhere");
    for topic in topics {
        let key = &t["Resources"][&topic]["Properties"]["KmsMasterKeyId"];
        assert_ne!(
            key,
            &json!("alias/aws/sns"),
            "{topic}: CloudWatch cannot use the AWS-managed key"
        );
        let key_name = key["Ref"]
            .as_str()
            .unwrap_or_else(|| panic!("{topic}: encrypted with a key of this stack, not {key}"));
        let key = &t["Resources"][key_name];
        assert_eq!(key["Type"], "AWS::KMS::Key");
        assert_eq!(key["Properties"]["EnableKeyRotation"], json!(true));
        let statements = key["Properties"]["KeyPolicy"]["Statement"].as_array().unwrap();
        let cloudwatch = statements
            .iter()
            .find(|s| s["Principal"]["Service"] == "cloudwatch.amazonaws.com")
            .unwrap_or_else(|| panic!("{key_name}: no statement for CloudWatch"));
        let actions: Vec<&str> = cloudwatch["Action"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|a| a.as_str())
            .collect();
        assert!(
            actions.contains(&"kms:Decrypt") && actions.contains(&"kms:GenerateDataKey*"),
            "{actions:?}"
        );
    }
    // The optional subscriptions: an e-mail address and an HTTPS webhook.
    assert_eq!(
        t["Resources"]["AlarmWebhookSubscription"]["Properties"]["Protocol"],
        "https"
    );
    assert_eq!(
        t["Resources"]["AlarmWebhookSubscription"]["Condition"],
        "HasAlarmWebhook"
    );
}
