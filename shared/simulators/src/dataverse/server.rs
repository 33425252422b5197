//! The HTTP side: the token endpoint, the bearer check, redirects, faults and throttling
//! (429 with `Retry-After`), then the query itself (`odata`), and the one metadata read.

use super::*;
use odata::{serve, table_of_logical};

type Shared = Arc<Mutex<Inner>>;

/// The routes: Entra ID's token endpoint for a tenant, and the Web API's resources (an entity
/// set, one row by key, `EntityDefinitions(...)` or its columns), every method accepted so that anything but
/// a GET is counted before it is refused. Anything else is a Dataverse 404.
pub(super) fn routes(inner: Shared) -> Router {
    use axum::extract::Path;
    use axum::routing::any;
    Router::new()
        .route(
            "/{tenant}/oauth2/v2.0/token",
            any(|st: State<Shared>, m: Method, u: Uri, b: Bytes| async move { token(&st.0, &m, u.path(), &b) }),
        )
        .route(
            "/api/data/v9.2/{resource}",
            any(
                |Path(resource): Path<String>, st: State<Shared>, m: Method, u: Uri, h: HeaderMap| async move {
                    handle(resource, st, m, u, h).await
                },
            ),
        )
        // A table definition's columns: `EntityDefinitions(…)/Attributes[/<cast>]`.
        .route(
            "/api/data/v9.2/{definition}/Attributes",
            any(
                |Path(definition): Path<String>, st: State<Shared>, m: Method, u: Uri, h: HeaderMap| async move {
                    handle(format!("{definition}/Attributes"), st, m, u, h).await
                },
            ),
        )
        .route(
            "/api/data/v9.2/{definition}/Attributes/{cast}",
            any(
                |Path((definition, cast)): Path<(String, String)>,
                 st: State<Shared>,
                 m: Method,
                 u: Uri,
                 h: HeaderMap| async move {
                    handle(format!("{definition}/Attributes/{cast}"), st, m, u, h).await
                },
            ),
        )
        .fallback(|| async { odata_error(StatusCode::NOT_FOUND, "0x80060888", "Resource not found") })
        .with_state(inner)
}

/// One Web API request, after routing: the bearer check, faults and throttling, then the query.
pub(super) async fn handle(
    rest: String,
    State(inner): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let rest = rest.as_str();
    let delay = {
        let mut g = lock(&inner);
        g.counters.requests += 1;
        if method != Method::GET {
            g.counters.not_get += 1;
            return odata_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "0x80060888",
                "This simulator is read-only",
            );
        }
        let bearer = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if bearer
            .and_then(|t| g.tokens.get(t))
            .is_none_or(|e| *e <= Instant::now())
        {
            // A bearer challenge naming the tenant's authority (Entra ID's error-response shape).
            let challenge = format!(
                "Bearer authorization_uri=https://login.microsoftonline.com/{}/oauth2/authorize, error=\"invalid_token\", error_description=\"The access token is missing or expired.\"",
                g.config.tenant_id
            );
            return (StatusCode::UNAUTHORIZED, [("WWW-Authenticate", challenge)]).into_response();
        }
        if let Some(to) = &g.config.redirect_to {
            return (StatusCode::FOUND, [("Location", to.clone())]).into_response();
        }
        if uri.to_string().len() > g.config.max_url_bytes {
            return odata_error(StatusCode::URI_TOO_LONG, "0x8006088a", "The URL is too long");
        }
        let nth = g.counters.requests;
        let fault = g
            .faults
            .iter()
            .position(|(n, _)| *n == nth)
            .map(|i| g.faults.remove(i).1);
        let fault = fault.or_else(|| {
            let chaos = g.config.chaos?;
            g.dice.hit(chaos.rate).then(|| {
                g.counters.chaos += 1;
                g.dice.pick(&[
                    DataverseFault::Throttle(1),
                    DataverseFault::Status(500),
                    DataverseFault::Status(503),
                    DataverseFault::Malformed,
                ])
            })
        });
        if let Some((limit, window)) = g.config.throttle {
            let now = Instant::now();
            g.counters.window.retain(|t| now.duration_since(*t) < window);
            if g.counters.window.len() >= limit {
                g.counters.throttled += 1;
                let retry = window
                    .saturating_sub(now.duration_since(g.counters.window[0]))
                    .as_secs()
                    .max(1);
                return throttle_response(retry);
            }
            g.counters.window.push(now);
        }
        match fault {
            Some(DataverseFault::Throttle(secs)) => {
                g.counters.throttled += 1;
                return throttle_response(secs);
            }
            Some(DataverseFault::Status(code)) => {
                let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                return odata_error(status, "0x80040216", "An unexpected error occurred.");
            }
            Some(DataverseFault::Malformed) => return (StatusCode::OK, "<html>gateway</html>").into_response(),
            Some(DataverseFault::Delay(d)) => d,
            None => Duration::ZERO,
        }
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let prefer = headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    let mut g = lock(&inner);
    serve(&mut g, rest, &parse_query(uri.query().unwrap_or("")), &prefer)
}

/// `EntityDefinitions(LogicalName='…')`: the one metadata property oppsync reads.
pub(super) fn entity_definition(g: &Inner, logical: &str) -> Response {
    let Some(table) = table_of_logical(logical) else {
        return odata_error(
            StatusCode::NOT_FOUND,
            "0x80040217",
            &format!("Could not find an entity with LogicalName = {logical}"),
        );
    };
    axum::Json(json!({
        "@odata.context": format!("{API}$metadata#EntityDefinitions(ChangeTrackingEnabled)/$entity"),
        "LogicalName": logical,
        "ChangeTrackingEnabled": !g.config.untracked.contains(&table),
    }))
    .into_response()
}

pub(super) fn throttle_response(retry_after: u64) -> Response {
    let mut response = odata_error(
        StatusCode::TOO_MANY_REQUESTS,
        "0x80072322",
        "Number of requests exceeded the limit of 6000 over time window of 300 seconds.",
    );
    if let Ok(v) = HeaderValue::from_str(&retry_after.to_string()) {
        response.headers_mut().insert("Retry-After", v);
    }
    response
}

pub(super) fn token(inner: &Mutex<Inner>, method: &Method, path: &str, body: &[u8]) -> Response {
    let mut g = lock(inner);
    g.counters.token_requests += 1;
    let form: HashMap<String, String> = parse_query(&String::from_utf8_lossy(body)).into_iter().collect();
    let tenant_ok = path == format!("/{}/oauth2/v2.0/token", g.config.tenant_id);
    let ok = *method == Method::POST
        && tenant_ok
        && form.get("grant_type").map(String::as_str) == Some("client_credentials")
        && form.get("client_id") == Some(&g.config.client_id)
        && form.get("client_secret") == Some(&g.config.client_secret)
        && form.get("scope").is_some_and(|s| s.ends_with("/.default"));
    if !ok {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided."})),
        )
            .into_response();
    }
    let token = format!("sim-dv-token-{}", g.counters.token_requests);
    let ttl = g.config.token_ttl;
    g.tokens.insert(token.clone(), Instant::now() + ttl);
    axum::Json(json!({"token_type": "Bearer", "expires_in": ttl.as_secs(), "ext_expires_in": ttl.as_secs(), "access_token": token}))
        .into_response()
}
