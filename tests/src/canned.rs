//! A loopback HTTP server that answers what a test tells it to: the documented example
//! responses in `tests/fixtures/api-docs/`, served over a real socket to the real clients.
//!
//! Replies are queued per path; the last one for a path repeats. In a reply body the placeholder
//! `[Organization URI]` (Microsoft's docs write it there) becomes this server's URL, so links in
//! a documented page lead back here.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

/// One answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    /// A fixture file's answer: `{"source", "status"?, "headers"?, "body"}`.
    pub fn fixture(text: &str) -> Reply {
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("fixture is not JSON: {e}"));
        assert!(
            v["source"].as_str().is_some_and(|s| !s.is_empty()),
            "a fixture names its source page"
        );
        Reply {
            status: v["status"].as_u64().unwrap_or(200) as u16,
            headers: v["headers"]
                .as_object()
                .map(|h| {
                    h.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                        .collect()
                })
                .unwrap_or_default(),
            body: match &v["body"] {
                Value::Null => String::new(),
                Value::String(s) => s.clone(),
                other => other.to_string(),
            },
        }
    }

    pub fn json(body: Value) -> Reply {
        Reply {
            status: 200,
            headers: Vec::new(),
            body: body.to_string(),
        }
    }

    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: String::new(),
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }
}

/// A request the server saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: String,
    pub authorization: Option<String>,
    pub body: String,
}

#[derive(Default)]
struct Inner {
    routes: HashMap<String, VecDeque<Reply>>,
    seen: Vec<Seen>,
    url: String,
}

pub struct Canned {
    inner: Arc<Mutex<Inner>>,
    addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Canned {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Canned {
    pub async fn start() -> Canned {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = Router::new().fallback(answer).with_state(Arc::clone(&inner));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        inner.lock().unwrap().url = format!("http://{addr}");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Canned { inner, addr, server }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues `reply` for requests to `path`.
    pub fn reply(&self, path: &str, reply: Reply) -> &Self {
        self.inner
            .lock()
            .unwrap()
            .routes
            .entry(path.to_owned())
            .or_default()
            .push_back(reply);
        self
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.inner.lock().unwrap().seen.clone()
    }

    /// Requests seen for `path`.
    pub fn seen_at(&self, path: &str) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.path == path).collect()
    }
}

async fn answer(
    State(inner): State<Arc<Mutex<Inner>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut g = inner.lock().unwrap();
    let path = uri.path().to_owned();
    g.seen.push(Seen {
        method: method.to_string(),
        path: path.clone(),
        query: uri.query().unwrap_or("").to_owned(),
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body: String::from_utf8_lossy(&body).into_owned(),
    });
    let url = g.url.clone();
    let Some(queue) = g.routes.get_mut(&path) else {
        return (StatusCode::NOT_FOUND, format!("no canned reply for {path}")).into_response();
    };
    let reply = if queue.len() > 1 {
        queue.pop_front().unwrap()
    } else {
        queue.front().cloned().unwrap()
    };
    let mut response = (
        StatusCode::from_u16(reply.status).unwrap(),
        reply.body.replace("[Organization URI]", &url),
    )
        .into_response();
    for (k, v) in reply.headers {
        response.headers_mut().insert(
            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            axum::http::HeaderValue::from_str(&v).unwrap(),
        );
    }
    if !response.headers().contains_key("content-type") {
        response
            .headers_mut()
            .insert("content-type", axum::http::HeaderValue::from_static("application/json"));
    }
    response
}
