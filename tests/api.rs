//! The HTTP API (`usernet::api`) against a mock backend, served for real on a temp unix socket
//! and driven by real HTTP clients: curl (what people and scripts use; skipped with a SKIPPED
//! line when curl is missing, a failure with USERNET_E2E=1) and a minimal raw HTTP/1.1 client
//! written here (always runs). JSON answers are parsed and compared whole.

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use usernet::api::{self, ApiBackend, ApiError, BoxFuture, Forward, Protocol, Zone};

// ---------------------------------------------------------------------------------------------
// Mock backend
// ---------------------------------------------------------------------------------------------

/// Records every call; canned data and errors chosen by the request values.
struct Mock {
    calls: Mutex<Vec<String>>,
    forwards: Mutex<Vec<Forward>>,
    zones: Mutex<Vec<Zone>>,
    stats: Mutex<Value>,
}

/// `expose` answers Busy with this text for local port 60099, like the OS would.
const BUSY_PORT: &str = "60099";
const BUSY_TEXT: &str = "listen tcp 127.0.0.1:60099: bind: address already in use";

impl Mock {
    fn new() -> Arc<Mock> {
        Arc::new(Mock {
            calls: Mutex::new(Vec::new()),
            forwards: Mutex::new(Vec::new()),
            zones: Mutex::new(Vec::new()),
            stats: Mutex::new(json!({
                "switch": {"frames_in": 3, "bytes_in": 1234, "bytes_out": 5678},
                "tcp": {"open": 2},
            })),
        })
    }

    fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

impl ApiBackend for Mock {
    fn leases(&self) -> Vec<(Ipv4Addr, String)> {
        self.record("leases".into());
        vec![
            (Ipv4Addr::new(192, 168, 5, 16), "52:55:55:12:34:57".into()),
            (Ipv4Addr::new(192, 168, 5, 15), "52:55:55:12:34:56".into()),
        ]
    }

    fn expose(&self, f: Forward) -> Result<(), ApiError> {
        self.record(format!("expose {} {} {}", f.protocol, f.local, f.remote));
        if f.local.ends_with(BUSY_PORT) {
            return Err(ApiError::Busy(BUSY_TEXT.into()));
        }
        let mut all = self.forwards.lock().unwrap();
        if all
            .iter()
            .any(|x| x.local == f.local && x.protocol == f.protocol)
        {
            return Err(ApiError::Busy("proxy already running".into()));
        }
        all.push(f);
        Ok(())
    }

    fn unexpose(&self, local: &str, protocol: Protocol) -> Result<(), ApiError> {
        self.record(format!("unexpose {protocol} {local}"));
        let mut all = self.forwards.lock().unwrap();
        let before = all.len();
        all.retain(|x| !(x.local == local && x.protocol == protocol));
        if all.len() == before {
            return Err(ApiError::NotFound("proxy not found".into()));
        }
        Ok(())
    }

    fn forwards(&self) -> Vec<Forward> {
        self.forwards.lock().unwrap().clone()
    }

    fn dns_add(&self, zone: Zone) -> Result<(), ApiError> {
        self.record(format!("dns_add {}", zone.name));
        self.zones.lock().unwrap().push(zone);
        Ok(())
    }

    fn dns_zones(&self) -> Vec<Zone> {
        self.zones.lock().unwrap().clone()
    }

    fn stats(&self) -> BoxFuture<'_, Value> {
        Box::pin(async move { self.stats.lock().unwrap().clone() })
    }

    /// Port 22 accepts at once, 2222 after 300 ms; 23 never (Timeout after `timeout`); 24 hangs
    /// forever (the HTTP layer must give up itself); 25 fails.
    fn wait_port(
        &self,
        ip: Ipv4Addr,
        port: u16,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<(), ApiError>> {
        self.record(format!("wait_port {ip}:{port} {}s", timeout.as_secs()));
        Box::pin(async move {
            match port {
                22 => Ok(()),
                2222 => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok(())
                }
                23 => {
                    tokio::time::sleep(timeout).await;
                    Err(ApiError::Timeout(format!("{ip}:{port} did not accept")))
                }
                24 => std::future::pending().await,
                _ => Err(ApiError::Internal("no route to the guest".into())),
            }
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The server under test
// ---------------------------------------------------------------------------------------------

struct Server {
    rt: tokio::runtime::Runtime,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

fn start(mock: &Arc<Mock>) -> Server {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let listener = {
        let _guard = rt.enter();
        api::bind(&sock).expect("bind the API socket")
    };
    let backend: Arc<dyn ApiBackend> = mock.clone();
    rt.spawn(api::serve(listener, backend));
    Server {
        rt,
        sock,
        _dir: dir,
    }
}

/// A response: status, lower-cased headers, body.
struct Resp {
    status: u16,
    headers: String,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// A minimal HTTP/1.1 client: one request per connection, `Connection: close`, read to EOF.
fn raw(sock: &Path, method: &str, target: &str, body: Option<&str>) -> Resp {
    let mut s = UnixStream::connect(sock).expect("connect to the API socket");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: lima\r\nConnection: close\r\n");
    if let Some(b) = body {
        req += &format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        );
    }
    req += "\r\n";
    req += body.unwrap_or("");
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read the response");
    let (head, body) = out
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {out:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let headers = head.to_ascii_lowercase();
    assert!(
        !headers.contains("transfer-encoding: chunked"),
        "this client does not de-chunk: {head}"
    );
    Resp {
        status,
        headers,
        body: body.to_string(),
    }
}

/// Whether curl is here; without it the test is skipped (or fails with USERNET_E2E=1).
fn have_curl(test: &str) -> bool {
    let found = Command::new("curl")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if found {
        return true;
    }
    if std::env::var("USERNET_E2E").as_deref() == Ok("1") {
        panic!("{test}: curl is required with USERNET_E2E=1 but was not found in PATH");
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: {test}: tool `curl` not found in PATH"
    );
    false
}

/// One request with curl over the unix socket.
fn curl(sock: &Path, method: &str, target: &str, body: Option<&str>) -> Resp {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "30", "--unix-socket"])
        .arg(sock)
        .args(["-X", method, "-D", "-", "-w", "\n%{http_code}"]);
    if let Some(b) = body {
        // As Lima's and Podman's Go clients do: a JSON body, no exotic headers.
        cmd.args(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    cmd.arg(format!("http://localhost{target}"));
    let out = cmd.output().expect("run curl");
    assert!(
        out.status.success(),
        "curl {method} {target} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (rest, code) = text.rsplit_once('\n').unwrap();
    let (head, body) = rest.split_once("\r\n\r\n").unwrap();
    Resp {
        status: code.trim().parse().unwrap(),
        headers: head.to_ascii_lowercase(),
        body: body.to_string(),
    }
}

/// An error answer: the status and a one-line text reason containing `needle`.
#[track_caller]
fn assert_error(r: &Resp, status: u16, needle: &str, what: &str) {
    assert_eq!(r.status, status, "{what}: status; body {:?}", r.body);
    assert!(
        r.body.ends_with('\n') && r.body.trim_end().lines().count() == 1,
        "{what}: the reason must be one line: {:?}",
        r.body
    );
    assert!(
        r.body.contains(needle),
        "{what}: reason {:?} lacks {needle:?}",
        r.body
    );
    assert!(r.headers.contains("content-type: text/plain"), "{what}");
}

// ---------------------------------------------------------------------------------------------
// curl
// ---------------------------------------------------------------------------------------------

#[test]
fn curl_leases_on_both_paths() {
    if !have_curl("curl_leases_on_both_paths") {
        return;
    }
    let mock = Mock::new();
    let srv = start(&mock);
    let want = json!({"192.168.5.15": "52:55:55:12:34:56", "192.168.5.16": "52:55:55:12:34:57"});
    for path in ["/services/dhcp/leases", "/leases"] {
        let r = curl(&srv.sock, "GET", path, None);
        assert_eq!(r.status, 200, "{path}");
        assert!(
            r.headers.contains("content-type: application/json"),
            "{path}"
        );
        assert_eq!(r.json(), want, "{path}");
    }
}

#[test]
fn curl_expose_list_unexpose() {
    if !have_curl("curl_expose_list_unexpose") {
        return;
    }
    let mock = Mock::new();
    let srv = start(&mock);
    let s = &srv.sock;
    let ok = |body: &str| {
        let r = curl(s, "POST", "/services/forwarder/expose", Some(body));
        assert_eq!(r.status, 200, "expose {body}: {:?}", r.body);
        assert_eq!(r.body, "", "gvproxy answers 200 with no body");
    };
    ok(r#"{"local":"127.0.0.1:60022","remote":"192.168.5.15:22","protocol":"tcp"}"#);
    ok(r#"{"local":":5353","remote":":53","protocol":"udp"}"#);
    ok(
        r#"{"local":"/tmp/usernet-test/guest.sock","remote":"tcp://192.168.5.15:2375","protocol":"unix"}"#,
    );
    // No protocol: tcp, as gvproxy.
    ok(r#"{"local":"[::1]:8080","remote":"192.168.5.15:80"}"#);
    assert_eq!(
        mock.calls(),
        [
            "expose tcp 127.0.0.1:60022 192.168.5.15:22",
            "expose udp :5353 :53",
            "expose unix /tmp/usernet-test/guest.sock 192.168.5.15:2375",
            "expose tcp [::1]:8080 192.168.5.15:80",
        ]
    );

    let r = curl(s, "GET", "/services/forwarder/all", None);
    assert_eq!(r.status, 200);
    assert!(r.headers.contains("content-type: application/json"));
    assert_eq!(
        r.json(),
        json!([
            {"local": "/tmp/usernet-test/guest.sock", "remote": "192.168.5.15:2375", "protocol": "unix"},
            {"local": "127.0.0.1:60022", "remote": "192.168.5.15:22", "protocol": "tcp"},
            {"local": ":5353", "remote": ":53", "protocol": "udp"},
            {"local": "[::1]:8080", "remote": "192.168.5.15:80", "protocol": "tcp"},
        ])
    );

    let r = curl(
        s,
        "POST",
        "/services/forwarder/unexpose",
        Some(r#"{"local":"127.0.0.1:60022","protocol":"tcp"}"#),
    );
    assert_eq!((r.status, r.body.as_str()), (200, ""));
    let r = curl(
        s,
        "POST",
        "/services/forwarder/unexpose",
        Some(r#"{"local":":5353","protocol":"udp"}"#),
    );
    assert_eq!(r.status, 200);
    let all = curl(s, "GET", "/services/forwarder/all", None).json();
    assert_eq!(all.as_array().unwrap().len(), 2, "{all}");

    // Unknown forward: 404. Same local, other protocol: unknown too.
    for body in [
        r#"{"local":"127.0.0.1:60022","protocol":"tcp"}"#,
        r#"{"local":"[::1]:8080","protocol":"udp"}"#,
    ] {
        let r = curl(s, "POST", "/services/forwarder/unexpose", Some(body));
        assert_error(&r, 404, "proxy not found", body);
    }
    // Bad unexpose bodies: 400, backend not called.
    let before = mock.calls().len();
    for (body, needle) in [
        ("{", "invalid JSON"),
        (r#"{"protocol":"tcp"}"#, "missing \"local\""),
        (
            r#"{"local":"127.0.0.1:1","protocol":"sctp"}"#,
            "unknown protocol",
        ),
        (
            r#"{"local":"nohost","protocol":"tcp"}"#,
            "invalid local address",
        ),
    ] {
        let r = curl(s, "POST", "/services/forwarder/unexpose", Some(body));
        assert_error(&r, 400, needle, body);
    }
    assert_eq!(
        mock.calls().len(),
        before,
        "no backend call for a bad request"
    );

    // Empty list is [], not null.
    for body in [
        r#"{"local":"/tmp/usernet-test/guest.sock","protocol":"unix"}"#,
        r#"{"local":"[::1]:8080"}"#,
    ] {
        assert_eq!(
            curl(s, "POST", "/services/forwarder/unexpose", Some(body)).status,
            200
        );
    }
    assert_eq!(
        curl(s, "GET", "/services/forwarder/all", None).json(),
        json!([])
    );
}

#[test]
fn curl_expose_rejects_bad_requests() {
    if !have_curl("curl_expose_rejects_bad_requests") {
        return;
    }
    let mock = Mock::new();
    let srv = start(&mock);
    let cases: &[(&str, &str)] = &[
        ("", "empty request body"),
        ("{\"local\":", "invalid JSON"),
        ("[1,2]", "must be a JSON object"),
        (
            r#"{"local":5,"remote":":22"}"#,
            "\"local\" must be a string",
        ),
        (r#"{"remote":"192.168.5.15:22"}"#, "missing \"local\""),
        (r#"{"local":"127.0.0.1:60022"}"#, "missing \"remote\""),
        (
            r#"{"local":"127.0.0.1:1","remote":":22","protocol":"sctp"}"#,
            "unknown protocol",
        ),
        (
            r#"{"local":"127.0.0.1:1","remote":":22","protocol":"TCP"}"#,
            "unknown protocol",
        ),
        (
            r#"{"local":"127.0.0.1:1","remote":":22","protocol":"npipe"}"#,
            "npipe",
        ),
        (
            r#"{"local":"localhost:22","remote":":22"}"#,
            "invalid local address",
        ),
        (
            r#"{"local":"127.0.0.1","remote":":22"}"#,
            "invalid local address",
        ),
        (r#"{"local":"127.0.0.1:0","remote":":22"}"#, "port 0"),
        (
            r#"{"local":"127.0.0.1:70000","remote":":22"}"#,
            "invalid local address",
        ),
        (
            r#"{"local":"127.0.0.1:1","remote":"guest:22"}"#,
            "guest IP must be IPv4",
        ),
        (
            r#"{"local":"127.0.0.1:1","remote":"[fd00::2]:22"}"#,
            "guest IP must be IPv4",
        ),
        (
            r#"{"local":"127.0.0.1:1","remote":"192.168.5.15"}"#,
            "invalid remote address",
        ),
        (
            r#"{"local":"127.0.0.1:1","remote":"192.168.5.15:0"}"#,
            "port 0",
        ),
        (
            r#"{"local":"127.0.0.1:1","remote":"tcp://192.168.5.15:22"}"#,
            "invalid remote address",
        ),
        (
            r#"{"local":"rel.sock","remote":":22","protocol":"unix"}"#,
            "must be absolute",
        ),
        (
            r#"{"local":"/tmp/x.sock","remote":"ssh-tunnel://u@192.168.5.15:22/run/p.sock?key=k","protocol":"unix"}"#,
            "not supported",
        ),
    ];
    for (body, needle) in cases {
        let r = curl(&srv.sock, "POST", "/services/forwarder/expose", Some(body));
        assert_error(&r, 400, needle, body);
    }
    assert_eq!(
        mock.calls(),
        Vec::<String>::new(),
        "no backend call for a bad request"
    );

    // Host port busy: 500 with the OS error text, as gvproxy.
    let body = format!(r#"{{"local":"127.0.0.1:{BUSY_PORT}","remote":":22","protocol":"tcp"}}"#);
    let r = curl(&srv.sock, "POST", "/services/forwarder/expose", Some(&body));
    assert_error(&r, 500, BUSY_TEXT, "busy port");
    // Already exposed: 500 too.
    let body = r#"{"local":"127.0.0.1:60022","remote":":22","protocol":"tcp"}"#;
    assert_eq!(
        curl(&srv.sock, "POST", "/services/forwarder/expose", Some(body)).status,
        200
    );
    let r = curl(&srv.sock, "POST", "/services/forwarder/expose", Some(body));
    assert_error(&r, 500, "already running", "duplicate");
}

#[test]
fn curl_dns_add_and_all() {
    if !have_curl("curl_dns_add_and_all") {
        return;
    }
    let mock = Mock::new();
    let srv = start(&mock);
    let s = &srv.sock;
    assert_eq!(curl(s, "GET", "/services/dns/all", None).json(), json!([]));

    let r = curl(
        s,
        "POST",
        "/services/dns/add",
        Some(r#"{"Name":"internal.","Records":[{"Name":"host.lima","IP":"192.168.5.2"}]}"#),
    );
    assert_eq!((r.status, r.body.as_str()), (200, ""));
    // Go's decoder matches keys case-insensitively and ignores null Regexp: so do we.
    let r = curl(
        s,
        "POST",
        "/services/dns/add",
        Some(
            r#"{"name":"test.","records":[{"name":"a","ip":"10.0.0.1","Regexp":null},{"Name":"b","IP":"10.0.0.2"}],"defaultip":"10.0.0.9"}"#,
        ),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let r = curl(s, "POST", "/services/dns/add", Some(r#"{"Name":"empty."}"#));
    assert_eq!(r.status, 200, "{}", r.body);

    let r = curl(s, "GET", "/services/dns/all", None);
    assert_eq!(r.status, 200);
    assert!(r.headers.contains("content-type: application/json"));
    assert_eq!(
        r.json(),
        json!([
            {"Name": "internal.", "Records": [{"Name": "host.lima", "IP": "192.168.5.2"}], "DefaultIP": null},
            {"Name": "test.", "Records": [{"Name": "a", "IP": "10.0.0.1"}, {"Name": "b", "IP": "10.0.0.2"}], "DefaultIP": "10.0.0.9"},
            {"Name": "empty.", "Records": [], "DefaultIP": null},
        ])
    );

    let before = mock.calls().len();
    for (body, needle) in [
        ("nope", "invalid JSON"),
        (r#"{"Records":[]}"#, "missing zone \"Name\""),
        (r#"{"Name":"x.","Records":{}}"#, "must be an array"),
        (r#"{"Name":"x.","Records":[7]}"#, "must be an object"),
        (
            r#"{"Name":"x.","Records":[{"Name":"a"}]}"#,
            "missing \"IP\"",
        ),
        (
            r#"{"Name":"x.","Records":[{"IP":"10.0.0.1"}]}"#,
            "missing \"Name\"",
        ),
        (
            r#"{"Name":"x.","Records":[{"Name":"a","IP":"fd00::1"}]}"#,
            "invalid IPv4",
        ),
        (
            r#"{"Name":"x.","Records":[{"Name":"a","IP":"10.0.0.256"}]}"#,
            "invalid IPv4",
        ),
        (
            r#"{"Name":"x.","Records":[{"Regexp":"^.*$","IP":"10.0.0.1"}]}"#,
            "Regexp records are not supported",
        ),
        (r#"{"Name":"x.","DefaultIP":"nope"}"#, "DefaultIP"),
    ] {
        let r = curl(s, "POST", "/services/dns/add", Some(body));
        assert_error(&r, 400, needle, body);
    }
    assert_eq!(mock.calls().len(), before, "no backend call for a bad zone");
}

#[test]
fn curl_stats() {
    if !have_curl("curl_stats") {
        return;
    }
    let mock = Mock::new();
    let srv = start(&mock);
    let r = curl(&srv.sock, "GET", "/stats", None);
    assert_eq!(r.status, 200);
    assert!(r.headers.contains("content-type: application/json"));
    assert_eq!(
        r.json(),
        json!({
            "BytesSent": 5678,
            "BytesReceived": 1234,
            "usernet": {
                "switch": {"frames_in": 3, "bytes_in": 1234, "bytes_out": 5678},
                "tcp": {"open": 2},
            },
        })
    );
    // Keys missing from the backend's document: 0.
    *mock.stats.lock().unwrap() = json!({"switch": {"frames_in": 1}});
    let v = curl(&srv.sock, "GET", "/stats", None).json();
    assert_eq!(
        (&v["BytesSent"], &v["BytesReceived"]),
        (&json!(0), &json!(0))
    );
}

#[test]
fn curl_wait_port() {
    if !have_curl("curl_wait_port") {
        return;
    }
    let mock = Mock::new();
    let srv = start(&mock);
    let s = &srv.sock;
    let get = |q: &str| curl(s, "GET", &format!("/extension/wait_port{q}"), None);

    let r = get("?ip=192.168.5.15&port=22");
    assert_eq!(r.status, 200, "{}", r.body);
    let t = Instant::now();
    assert_eq!(get("?ip=192.168.5.15&port=2222&timeout=5").status, 200);
    assert!(t.elapsed() >= Duration::from_millis(300));
    // Lima asks for 599 s on first boot: passed through as is.
    assert_eq!(get("?ip=192.168.5.15&port=22&timeout=599").status, 200);

    // The backend times out: 504.
    let t = Instant::now();
    let r = get("?ip=192.168.5.15&port=23&timeout=1");
    assert_error(&r, 504, "did not accept", "backend timeout");
    assert!(t.elapsed() >= Duration::from_secs(1));
    // The backend hangs: the HTTP layer gives up after timeout + WAIT_GRACE, 504 too.
    let t = Instant::now();
    let r = get("?ip=192.168.5.15&port=24&timeout=0");
    assert_error(
        &r,
        504,
        "timed out waiting for 192.168.5.15:24",
        "hung backend",
    );
    assert!(t.elapsed() >= api::WAIT_GRACE && t.elapsed() < Duration::from_secs(10));
    // Another backend error: 500.
    assert_error(
        &get("?ip=192.168.5.15&port=25"),
        500,
        "no route",
        "backend error",
    );

    assert_eq!(
        mock.calls(),
        [
            "wait_port 192.168.5.15:22 10s",
            "wait_port 192.168.5.15:2222 5s",
            "wait_port 192.168.5.15:22 599s",
            "wait_port 192.168.5.15:23 1s",
            "wait_port 192.168.5.15:24 0s",
            "wait_port 192.168.5.15:25 10s",
        ]
    );

    for (q, needle) in [
        ("", "invalid ip address"),
        ("?port=22", "invalid ip address"),
        ("?ip=nope&port=22", "invalid ip address"),
        ("?ip=fd00::2&port=22", "invalid ip address"),
        ("?ip=192.168.5.15", "invalid port"),
        ("?ip=192.168.5.15&port=0", "invalid port"),
        ("?ip=192.168.5.15&port=70000", "invalid port"),
        ("?ip=192.168.5.15&port=22&timeout=-1", "invalid timeout"),
        ("?ip=192.168.5.15&port=22&timeout=1.5", "invalid timeout"),
        ("?ip=192.168.5.15&port=22&timeout=70000", "invalid timeout"),
    ] {
        assert_error(&get(q), 400, needle, q);
    }
    assert_eq!(mock.calls().len(), 6, "no backend call for a bad query");
}

#[test]
fn curl_unknown_paths_and_wrong_methods() {
    if !have_curl("curl_unknown_paths_and_wrong_methods") {
        return;
    }
    let mock = Mock::new();
    let srv = start(&mock);
    let s = &srv.sock;
    for path in [
        "/",
        "/nope",
        "/services",
        "/services/forwarder",
        "/services/dhcp/leases/x",
    ] {
        assert_error(&curl(s, "GET", path, None), 404, "not found", path);
    }
    for (method, path) in [
        ("GET", "/services/forwarder/expose"),
        ("GET", "/services/forwarder/unexpose"),
        ("GET", "/services/dns/add"),
        ("POST", "/leases"),
        ("POST", "/services/dhcp/leases"),
        ("PUT", "/services/forwarder/all"),
        ("DELETE", "/stats"),
        ("POST", "/extension/wait_port?ip=192.168.5.15&port=22"),
    ] {
        let r = curl(s, method, path, Some("{}"));
        assert_error(&r, 405, "method not allowed", &format!("{method} {path}"));
        assert!(
            r.headers.contains("allow:"),
            "{method} {path}: Allow header"
        );
    }
    assert_eq!(mock.calls(), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1.1 client (runs without curl)
// ---------------------------------------------------------------------------------------------

#[test]
fn raw_http_every_path() {
    let mock = Mock::new();
    let srv = start(&mock);
    let s = &srv.sock;

    let r = raw(s, "GET", "/leases", None);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        json!({"192.168.5.15": "52:55:55:12:34:56", "192.168.5.16": "52:55:55:12:34:57"})
    );

    let r = raw(
        s,
        "POST",
        "/services/forwarder/expose",
        Some(r#"{"local":"127.0.0.1:60022","remote":"192.168.5.15:22","protocol":"tcp"}"#),
    );
    assert_eq!((r.status, r.body.as_str()), (200, ""));
    assert!(r.headers.contains("content-length: 0"), "{}", r.headers);
    assert_eq!(
        raw(s, "GET", "/services/forwarder/all", None).json(),
        json!([{"local": "127.0.0.1:60022", "remote": "192.168.5.15:22", "protocol": "tcp"}])
    );
    let r = raw(
        s,
        "POST",
        "/services/forwarder/expose",
        Some(r#"{"local":"127.0.0.1:1","remote":":22","protocol":"sctp"}"#),
    );
    assert_error(&r, 400, "unknown protocol", "raw sctp");
    let r = raw(
        s,
        "POST",
        "/services/forwarder/unexpose",
        Some(r#"{"local":"127.0.0.1:60022","protocol":"tcp"}"#),
    );
    assert_eq!(r.status, 200);

    let r = raw(
        s,
        "POST",
        "/services/dns/add",
        Some(r#"{"Name":"internal.","Records":[{"Name":"host.lima","IP":"192.168.5.2"}]}"#),
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        raw(s, "GET", "/services/dns/all", None).json(),
        json!([{"Name": "internal.", "Records": [{"Name": "host.lima", "IP": "192.168.5.2"}], "DefaultIP": null}])
    );

    let v = raw(s, "GET", "/stats", None).json();
    assert_eq!(
        (&v["BytesSent"], &v["BytesReceived"]),
        (&json!(5678), &json!(1234))
    );

    let r = raw(
        s,
        "GET",
        "/extension/wait_port?ip=192.168.5.15&port=22&timeout=3",
        None,
    );
    assert_eq!(r.status, 200);
    assert_error(
        &raw(s, "GET", "/extension/wait_port?ip=1.2.3&port=22", None),
        400,
        "invalid ip address",
        "raw bad ip",
    );
    assert_error(&raw(s, "GET", "/nope", None), 404, "not found", "raw 404");
    assert_error(
        &raw(s, "POST", "/stats", Some("")),
        405,
        "method not allowed",
        "raw 405",
    );
}

/// Requests on one kept-alive connection, as Go's client does (Lima polls leases every 500 ms).
#[test]
fn raw_http_keep_alive() {
    let mock = Mock::new();
    let srv = start(&mock);
    let mut c = UnixStream::connect(&srv.sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for _ in 0..3 {
        c.write_all(b"GET /services/dhcp/leases HTTP/1.1\r\nHost: lima\r\n\r\n")
            .unwrap();
        // Read one response: headers, then Content-Length bytes.
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            c.read_exact(&mut byte).unwrap();
            buf.push(byte[0]);
        }
        let head = String::from_utf8(buf).unwrap().to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .expect("content-length")
            .trim()
            .parse()
            .unwrap();
        let mut body = vec![0u8; len];
        c.read_exact(&mut body).unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["192.168.5.15"], "52:55:55:12:34:56");
    }
    assert_eq!(mock.calls().len(), 3);
}

// ---------------------------------------------------------------------------------------------
// The socket
// ---------------------------------------------------------------------------------------------

#[test]
fn socket_is_0600_and_bind_guards_the_path() {
    let mock = Mock::new();
    let srv = start(&mock);
    let meta = std::fs::metadata(&srv.sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600, "socket mode");

    // A live socket is not stolen.
    let err = {
        let _g = srv.rt.enter();
        api::bind(&srv.sock).expect_err("bind over a live socket")
    };
    assert!(err.to_string().contains("another process"), "{err:#}");
    assert_eq!(
        raw(&srv.sock, "GET", "/leases", None).status,
        200,
        "still served"
    );

    // Stop the server: the file stays, stale; a new bind replaces it.
    let Server { rt, sock, _dir } = srv;
    drop(rt);
    assert!(sock.exists());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _g = rt.enter();
    let listener = api::bind(&sock).expect("bind over a stale socket");
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o7777,
        0o600
    );
    drop(listener);

    // Not a socket: refused, the file untouched.
    let file = _dir.path().join("regular");
    std::fs::write(&file, "keep me").unwrap();
    let err = api::bind(&file).expect_err("bind over a regular file");
    assert!(err.to_string().contains("not a socket"), "{err:#}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}
