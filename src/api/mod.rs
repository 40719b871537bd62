//! The HTTP API on a unix socket, the one gvisor-tap-vsock (gvproxy) serves and that Lima's
//! hostagent and Podman call (REFERENCE.md section 3). Paths and JSON shapes match gvproxy's.
//!
//! This layer knows nothing of the network: it parses and validates requests, calls an
//! [`ApiBackend`] with clean values and turns the answers into HTTP responses.
//!
//! | path | method | answer |
//! | --- | --- | --- |
//! | `/services/dhcp/leases`, `/leases` | GET | `{"192.168.5.15": "52:55:55:12:34:56"}` |
//! | `/services/forwarder/expose` | POST | `{"local","remote","protocol"}` -> 200, empty body |
//! | `/services/forwarder/unexpose` | POST | `{"local","protocol"}` -> 200, empty body |
//! | `/services/forwarder/all` | GET | `[{"local","remote","protocol"}, ...]`, sorted by local, protocol |
//! | `/services/dns/add` | POST | a zone `{"Name","Records":[{"Name","IP"}],"DefaultIP"}` -> 200 |
//! | `/services/dns/all` | GET | the zones, same shape |
//! | `/stats` | GET | `{"BytesSent","BytesReceived","usernet":{...}}` |
//! | `/extension/wait_port?ip=&port=&timeout=` | GET | 200 once the guest port accepts |
//!
//! Status codes: 400 for a request we can't accept (bad JSON, unknown protocol, bad address,
//! bad query), 404 for an unknown path and for unexposing a forward that does not exist (gvproxy
//! answers 500 there; a client only checks for 200), 405 for a known path with the wrong method
//! (gvproxy answers 400 "post only"), 500 when the host port is busy or another backend error
//! (as gvproxy), 504 when `wait_port` times out. Error bodies are one line of text.
//!
//! Like Go's `encoding/json`, which gvproxy uses, JSON keys are matched case-insensitively
//! (an exact match wins), unknown keys are ignored, and an empty or missing `protocol` is tcp.

mod socket;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub use socket::bind;
pub use validate::{parse_local, parse_remote};

/// A boxed future, for the backend methods that wait.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How long `wait_port` waits when the query names no timeout (Lima's default).
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(10);

/// How much longer than the requested timeout the HTTP layer lets a backend's `wait_port` run
/// before it answers 504 itself.
pub const WAIT_GRACE: Duration = Duration::from_secs(1);

/// What the network behind the API does. The HTTP layer validates every value first:
/// a [`Forward`] reaching `expose` has a valid `local` (see [`parse_local`]) and `remote`
/// (see [`parse_remote`]).
pub trait ApiBackend: Send + Sync + 'static {
    /// The live DHCP leases, IP and MAC (`aa:bb:cc:dd:ee:ff`).
    fn leases(&self) -> Vec<(Ipv4Addr, String)>;

    /// Start forwarding `f.local` on the host to the guest at `f.remote`. An empty remote IP
    /// (`":22"`) means the first guest. A host port in use is [`ApiError::Busy`] with the OS
    /// error text; a forward already present for the same protocol and local is `Busy` too.
    fn expose(&self, f: Forward) -> Result<(), ApiError>;

    /// Stop the forward of `protocol` on `local` (the string given to `expose`);
    /// [`ApiError::NotFound`] if there is none.
    fn unexpose(&self, local: &str, protocol: Protocol) -> Result<(), ApiError>;

    /// The forwards in place (any order: the HTTP layer sorts them).
    fn forwards(&self) -> Vec<Forward>;

    /// Add a DNS zone. gvproxy's semantics: a zone with the name of an existing one replaces
    /// it, its records put before the old zone's records.
    fn dns_add(&self, zone: Zone) -> Result<(), ApiError>;

    /// The DNS zones served.
    fn dns_zones(&self) -> Vec<Zone>;

    /// The full usernet stats document (`crate::stats::collect`). `/stats` nests it under
    /// `"usernet"` and derives `BytesReceived` from `switch.bytes_in` and `BytesSent` from
    /// `switch.bytes_out` (0 when missing).
    fn stats(&self) -> BoxFuture<'_, Value>;

    /// Resolve once a TCP connect to `ip:port` in the guest network succeeds, retrying until
    /// `timeout` has passed, then [`ApiError::Timeout`]. The HTTP layer also gives up on its
    /// own [`WAIT_GRACE`] after `timeout`.
    fn wait_port(
        &self,
        ip: Ipv4Addr,
        port: u16,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<(), ApiError>>;
}

/// Why a backend call failed; each maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// 400: the request can't be carried out as asked.
    BadRequest(String),
    /// 404: the thing named does not exist (unexpose of an unknown forward).
    NotFound(String),
    /// 500 (as gvproxy): the host address is in use, or the forward exists already.
    Busy(String),
    /// 504: `wait_port` gave up.
    Timeout(String),
    /// 500: anything else.
    Internal(String),
}

impl ApiError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Busy(_) | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The reason given.
    pub fn message(&self) -> &str {
        match self {
            ApiError::BadRequest(m)
            | ApiError::NotFound(m)
            | ApiError::Busy(m)
            | ApiError::Timeout(m)
            | ApiError::Internal(m) => m,
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        text(self.status(), self.message())
    }
}

/// A forwarding's transport protocol. JSON: `"tcp"`, `"udp"`, `"unix"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// A TCP listener on the host.
    Tcp,
    /// A UDP socket on the host.
    Udp,
    /// A unix socket on the host (`local` is its path), forwarded to a TCP port in the guest.
    Unix,
}

impl Protocol {
    /// The JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Unix => "unix",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = String;

    /// Exactly `tcp`, `udp` or `unix` (gvproxy compares case-sensitively too).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            "unix" => Ok(Protocol::Unix),
            "npipe" => Err("protocol \"npipe\" is only supported on Windows".to_string()),
            other => Err(format!(
                "unknown protocol {other:?}: expected \"tcp\", \"udp\" or \"unix\""
            )),
        }
    }
}

/// A port forwarding. JSON: exactly `{"local","remote","protocol"}`.
///
/// `local` is `IP:PORT` (IPv4, `[IPv6]:PORT`, or `:PORT` for all IPv4 interfaces) for tcp and
/// udp, an absolute path for unix; it is kept as the client wrote it, since unexpose names it
/// again. `remote` is normalised to `IP:PORT` or `:PORT` (the first guest), also for unix,
/// where gvproxy's `tcp://IP:PORT` form is accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forward {
    pub local: String,
    pub remote: String,
    pub protocol: Protocol,
}

/// Where a forward listens on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalAddr {
    /// tcp and udp; `:PORT` is `0.0.0.0:PORT`.
    Inet(SocketAddr),
    /// unix.
    Path(PathBuf),
}

impl Forward {
    /// The host address to listen on.
    pub fn local_addr(&self) -> Result<LocalAddr, ApiError> {
        parse_local(self.protocol, &self.local).map_err(ApiError::BadRequest)
    }

    /// The guest address: `None` for the first guest, and the port.
    pub fn remote_addr(&self) -> Result<(Option<Ipv4Addr>, u16), ApiError> {
        parse_remote(self.protocol, &self.remote)
            .map(|(ip, port, _)| (ip, port))
            .map_err(ApiError::BadRequest)
    }
}

/// A DNS zone, gvproxy's JSON: `{"Name":"internal.","Records":[...],"DefaultIP":null}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Zone {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Records")]
    pub records: Vec<ZoneRecord>,
    /// Answer for any other name in the zone. Serialised as `null` when absent, as Go does.
    #[serde(rename = "DefaultIP")]
    pub default_ip: Option<Ipv4Addr>,
}

/// A record of a [`Zone`]: `{"Name":"host","IP":"192.168.5.2"}`. gvproxy's `Regexp` records
/// are rejected with 400 (a null or empty `Regexp` is accepted and ignored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ZoneRecord {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "IP")]
    pub ip: Ipv4Addr,
}

/// The router over `backend`; [`serve`] runs it. Public so a caller can embed or test it.
pub fn router(backend: Arc<dyn ApiBackend>) -> Router {
    Router::new()
        .route("/services/dhcp/leases", get(leases))
        .route("/leases", get(leases))
        .route("/services/forwarder/expose", post(expose))
        .route("/services/forwarder/unexpose", post(unexpose))
        .route("/services/forwarder/all", get(forwards))
        .route("/services/dns/add", post(dns_add))
        .route("/services/dns/all", get(dns_all))
        .route("/stats", get(stats))
        .route("/extension/wait_port", get(wait_port))
        .fallback(|| async { text(StatusCode::NOT_FOUND, "404 page not found") })
        .method_not_allowed_fallback(|| async {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        })
        .with_state(backend)
}

/// Serve the API on `listener` until an accept fails for good (in practice forever: drop or
/// abort the task to stop). Connections are HTTP/1.1; no request timeout, since Lima's
/// `wait_port` asks for up to 599 s.
pub async fn serve(
    listener: tokio::net::UnixListener,
    backend: Arc<dyn ApiBackend>,
) -> std::io::Result<()> {
    axum::serve(listener, router(backend)).await
}

type Backend = State<Arc<dyn ApiBackend>>;

/// A one-line text response, like Go's `http.Error`.
fn text(status: StatusCode, msg: &str) -> Response {
    let mut line = msg.replace(['\r', '\n'], " ");
    line.push('\n');
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        line,
    )
        .into_response()
}

fn json_response(v: &impl Serialize) -> Response {
    match serde_json::to_vec(v) {
        Ok(mut body) => {
            body.push(b'\n');
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                body,
            )
                .into_response()
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

async fn leases(State(b): Backend) -> Response {
    let mut map = BTreeMap::new();
    for (ip, mac) in b.leases() {
        map.insert(ip, mac);
    }
    let obj: serde_json::Map<String, Value> = map
        .into_iter()
        .map(|(ip, mac)| (ip.to_string(), Value::String(mac)))
        .collect();
    json_response(&obj)
}

async fn expose(State(b): Backend, body: Bytes) -> Response {
    let f = match validate::expose_request(&body) {
        Ok(f) => f,
        Err(e) => return text(StatusCode::BAD_REQUEST, &e),
    };
    let what = format!("{} {} -> {}", f.protocol, f.local, f.remote);
    match b.expose(f) {
        Ok(()) => {
            tracing::info!("api: exposed {what}");
            StatusCode::OK.into_response()
        }
        Err(e) => {
            tracing::warn!("api: expose {what}: {e}");
            e.into_response()
        }
    }
}

async fn unexpose(State(b): Backend, body: Bytes) -> Response {
    let (local, protocol) = match validate::unexpose_request(&body) {
        Ok(v) => v,
        Err(e) => return text(StatusCode::BAD_REQUEST, &e),
    };
    match b.unexpose(&local, protocol) {
        Ok(()) => {
            tracing::info!("api: unexposed {protocol} {local}");
            StatusCode::OK.into_response()
        }
        Err(e) => {
            tracing::warn!("api: unexpose {protocol} {local}: {e}");
            e.into_response()
        }
    }
}

async fn forwards(State(b): Backend) -> Response {
    let mut all = b.forwards();
    all.sort_by(|x, y| {
        (x.local.as_str(), x.protocol.as_str()).cmp(&(y.local.as_str(), y.protocol.as_str()))
    });
    json_response(&all)
}

async fn dns_add(State(b): Backend, body: Bytes) -> Response {
    let zone = match validate::zone(&body) {
        Ok(z) => z,
        Err(e) => return text(StatusCode::BAD_REQUEST, &e),
    };
    let name = zone.name.clone();
    match b.dns_add(zone) {
        Ok(()) => {
            tracing::info!("api: added DNS zone {name:?}");
            StatusCode::OK.into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn dns_all(State(b): Backend) -> Response {
    json_response(&b.dns_zones())
}

/// `BytesReceived` = `switch.bytes_in`, `BytesSent` = `switch.bytes_out`, the document under
/// `usernet`.
pub fn stats_document(usernet: Value) -> Value {
    let switch = |key: &str| {
        usernet
            .get("switch")
            .and_then(|s| s.get(key))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    json!({
        "BytesSent": switch("bytes_out"),
        "BytesReceived": switch("bytes_in"),
        "usernet": usernet,
    })
}

async fn stats(State(b): Backend) -> Response {
    json_response(&stats_document(b.stats().await))
}

async fn wait_port(
    State(b): Backend,
    query: Result<Query<BTreeMap<String, String>>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = query else {
        return text(StatusCode::BAD_REQUEST, "malformed query string");
    };
    let (ip, port, timeout) = match validate::wait_query(&q) {
        Ok(v) => v,
        Err(e) => return text(StatusCode::BAD_REQUEST, &e),
    };
    match tokio::time::timeout(timeout + WAIT_GRACE, b.wait_port(ip, port, timeout)).await {
        Ok(Ok(())) => StatusCode::OK.into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(_) => ApiError::Timeout(format!(
            "timed out waiting for {ip}:{port} to accept after {}s",
            timeout.as_secs()
        ))
        .into_response(),
    }
}
