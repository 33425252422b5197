//! Service protection, transient faults, links to other hosts, credentials, read-only.

use std::time::{Duration, Instant};

use oppsync_dynamics::{DataverseClient, DataverseError, DataverseSettings, EntitySet, Secret};
use oppsync_simulators::DataverseFault as F;
use oppsync_simulators::dataverse::Mix;

use crate::common::*;

#[tokio::test]
async fn a_429_waits_exactly_retry_after_then_succeeds() {
    let sim = sim().await;
    sim.seed(3, 1, Mix::Uniform);
    let client = client(&sim, 5000);
    sim.inject(1, F::Throttle(1));
    let started = Instant::now();
    let (rows, ..) = read_all(&client, EntitySet::Opportunities, OPPORTUNITY_SELECT, None).await;
    let waited = started.elapsed();
    assert_eq!(rows.len(), 3);
    assert_eq!(sim.throttled(), 1);
    assert!(
        waited >= Duration::from_secs(1),
        "waited only {waited:?}; Retry-After was 1 s"
    );
    assert!(
        waited < Duration::from_millis(1800),
        "waited {waited:?}; Retry-After was 1 s"
    );
}

#[tokio::test]
async fn sustained_throttling_is_paced_by_retry_after_and_nothing_is_lost() {
    let sim = sim().await;
    sim.seed(40, 1, Mix::Uniform);
    sim.configure(|c| c.throttle = Some((3, Duration::from_secs(1))));
    let client = client(&sim, 10);
    let (rows, ..) = read_all(&client, EntitySet::Opportunities, OPPORTUNITY_SELECT, None).await;
    assert_eq!(rows.len(), 40);
    assert!(sim.throttled() >= 1, "5 pages at 3 a second must be throttled");
}

#[tokio::test]
async fn server_errors_and_garbled_answers_are_retried() {
    for fault in [F::Status(503), F::Status(500), F::Malformed] {
        let sim = sim().await;
        sim.seed(4, 1, Mix::Uniform);
        let client = client(&sim, 5000);
        sim.inject(1, fault.clone());
        sim.inject(2, fault.clone());
        let (rows, ..) = read_all(&client, EntitySet::Opportunities, OPPORTUNITY_SELECT, None).await;
        assert_eq!(rows.len(), 4, "{fault:?}");
        assert_eq!(sim.requests(), 3, "{fault:?}: two failures and a success");
    }
}

#[tokio::test]
async fn a_server_error_that_persists_is_a_typed_error_after_bounded_retries() {
    let sim = sim().await;
    let client = client(&sim, 5000);
    for n in 1..=10 {
        sim.inject(n, F::Status(500));
    }
    let err = client
        .changes(EntitySet::Opportunities, OPPORTUNITY_SELECT, None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            DataverseError::Transient {
                status: 500,
                attempts: 6,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.is_retryable());
}

#[tokio::test]
async fn a_next_link_to_another_host_is_refused() {
    let sim = sim().await;
    sim.seed(10, 1, Mix::Uniform);
    sim.configure(|c| c.link_host = Some("127.0.0.1:1".into()));
    let client = client(&sim, 5);
    // Refused as Dataverse gives it, before a caller could store it as a cursor.
    let err = client
        .changes(EntitySet::Opportunities, OPPORTUNITY_SELECT, None)
        .await
        .unwrap_err();
    assert!(matches!(err, DataverseError::ForeignLink(_)), "{err}");
    assert!(err.to_string().contains("127.0.0.1"), "{err}");
    let before = sim.requests();
    let _ = client.changes(EntitySet::Opportunities, OPPORTUNITY_SELECT, None).await;
    assert_eq!(sim.requests(), before + 1, "only the first page was read");
}

#[tokio::test]
async fn wrong_credentials_are_a_clear_error_naming_what_to_check() {
    let sim = sim().await;
    let (tenant, id, _) = sim.credentials();
    let settings =
        DataverseSettings::new(&sim.url(), &tenant, &id, Secret::from("wrong"), Some(&sim.token_url())).unwrap();
    let client = DataverseClient::new(settings).unwrap();
    let err = client
        .changes(EntitySet::Opportunities, OPPORTUNITY_SELECT, None)
        .await
        .unwrap_err();
    assert!(matches!(err, DataverseError::Auth { status: 401, .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("DYNAMICS_CLIENT_SECRET") && text.contains("AADSTS7000215"),
        "{text}"
    );
    assert!(!text.contains("wrong"), "the secret itself must not be echoed");
    assert_eq!(sim.requests(), 0);
}

#[tokio::test]
async fn an_expired_token_gets_one_refresh_and_a_retry() {
    let sim = sim().await;
    sim.seed(2, 1, Mix::Uniform);
    let client = client(&sim, 5000);
    read_all(&client, EntitySet::Opportunities, OPPORTUNITY_SELECT, None).await;
    sim.expire_tokens();
    read_all(&client, EntitySet::Opportunities, OPPORTUNITY_SELECT, None).await;
    assert_eq!(sim.token_requests(), 2);
}

#[tokio::test]
async fn a_query_dataverse_rejects_is_a_typed_error_with_its_code() {
    let sim = sim().await;
    let client = client(&sim, 5000);
    let err = client
        .read_in(
            EntitySet::Contacts,
            "contactid",
            &["x".into()],
            &["contactid"],
            Some("name contains 'x'"),
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, DataverseError::BadQuery { .. }), "{err}");
}

#[tokio::test]
async fn settings_refuse_plain_http_to_a_real_host() {
    const CLIENT: &str = "0b1c2d3e-0000-4000-8000-000000000001";
    let err =
        DataverseSettings::new("http://contoso.crm.dynamics.com", "t", CLIENT, Secret::from("s"), None).unwrap_err();
    assert!(err.to_string().contains("https://"), "{err}");
    let ok = DataverseSettings::new(
        "https://contoso.crm4.dynamics.com",
        "contoso.onmicrosoft.com",
        CLIENT,
        Secret::from("s"),
        None,
    )
    .unwrap();
    assert_eq!(
        ok.token_url.as_str(),
        "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    );
    assert!(!format!("{ok:?}").contains("\"s\""));
}

/// The rows: every value is checked for its shape where it enters, with the name, a
/// short prefix and the fix; a tenant id cannot change the token URL's path.
#[tokio::test]
async fn settings_check_each_value_for_its_shape() {
    const CLIENT: &str = "0b1c2d3e-0000-4000-8000-000000000001";
    const URL: &str = "https://contoso.crm.dynamics.com";
    let long = format!("https://contoso.crm.dynamics.com/{}", "x".repeat(5_000));
    for (url, tenant, client, secret, problem) in [
        (
            URL,
            "../../evil.example/x",
            CLIENT,
            "s",
            "DYNAMICS_TENANT_ID `../../evil.example/x` is not a GUID",
        ),
        (URL, "tenant", CLIENT, "s", "DYNAMICS_TENANT_ID `tenant` is not a GUID"),
        (
            URL,
            "00000000-0000-4000-8000-00000000a11c",
            "my-app",
            "s",
            "DYNAMICS_CLIENT_ID `my-app` is not a GUID",
        ),
        (
            URL,
            "00000000-0000-4000-8000-00000000a11c",
            CLIENT,
            "",
            "DYNAMICS_CLIENT_SECRET is empty",
        ),
        (
            URL,
            "00000000-0000-4000-8000-00000000a11c",
            CLIENT,
            "top\u{1b}secret",
            "DYNAMICS_CLIENT_SECRET holds a control character",
        ),
        (
            "https://contoso\u{7}.crm.dynamics.com",
            "t",
            CLIENT,
            "s",
            "DYNAMICS_URL `https://contoso\\u{7}.crm.dynamics.com` holds a control character",
        ),
        (&long, "t", CLIENT, "s", "DYNAMICS_URL is 5033 characters long"),
        (
            "https://me:pw@contoso.crm.dynamics.com",
            "t",
            CLIENT,
            "s",
            "DYNAMICS_URL holds a user name or password",
        ),
    ] {
        let err = DataverseSettings::new(url, tenant, client, Secret::from(secret), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains(problem) && err.contains("Fix:"), "{problem}: {err}");
        assert!(err.len() < 400, "the value is echoed whole: {err}");
        assert!(!err.contains("secret") || problem.contains("SECRET"), "{err}");
        assert!(!err.contains("top") && !err.contains("pw@"), "{err}");
    }
}

#[tokio::test]
async fn no_request_but_get_ever_leaves_the_client() {
    let sim = sim().await;
    let seeded = sim.seed(30, 4, Mix::Realistic);
    let client = client(&sim, 7);
    // Everything the client can do.
    let (rows, _, _, cursor, _) = read_all(&client, EntitySet::Opportunities, OPPORTUNITY_SELECT, None).await;
    read_all(&client, EntitySet::Opportunities, OPPORTUNITY_SELECT, Some(cursor)).await;
    read_all(&client, EntitySet::Connections, CONNECTION_SELECT, None).await;
    let opportunities: Vec<_> = rows
        .into_iter()
        .map(|r| oppsync_mapping::Opportunity::from_json(r).unwrap())
        .collect();
    client.related(&opportunities).await.unwrap();
    client.all_ids(EntitySet::Accounts).await.unwrap();
    client
        .watermark_changes(
            EntitySet::Contacts,
            &["contactid"],
            &oppsync_dynamics::Watermark::Version(0),
        )
        .await
        .unwrap();
    let ids: Vec<_> = seeded
        .opportunities
        .iter()
        .map(|i| oppsync_mapping::OpportunityId::parse(i).unwrap())
        .collect();
    client.opportunities(&ids, OPPORTUNITY_SELECT).await.unwrap();
    assert!(sim.requests() > 10);
    assert_eq!(sim.non_get_requests(), 0);
    // The simulator does count them: a POST is refused and recorded.
    let status = reqwest::Client::new()
        .post(format!("{}/api/data/v9.2/opportunities", sim.url()))
        .body("{}")
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status.as_u16(), 405);
    assert_eq!(sim.non_get_requests(), 1);
}

#[tokio::test]
async fn an_answer_past_the_page_cap_is_refused_before_it_is_held_whole() {
    use oppsync_simulators::oversized::{Oversized, serve};
    let sim = sim().await;
    let (tenant, id, secret) = sim.credentials();
    for how in [Oversized::Announced, Oversized::Streamed] {
        let url = serve(how).await;
        let settings =
            DataverseSettings::new(&url, &tenant, &id, Secret::from(secret.clone()), Some(&sim.token_url())).unwrap();
        let client = DataverseClient::new(settings).unwrap();
        let err = client
            .changes(EntitySet::Opportunities, OPPORTUNITY_SELECT, None)
            .await
            .unwrap_err();
        assert!(matches!(err, DataverseError::TooLarge { .. }), "{how:?}: {err}");
        assert!(!err.is_retryable(), "the same page would be as large");
        assert!(
            err.to_string().contains("64 MB") && err.to_string().contains("page_size"),
            "{err}"
        );
    }
}
