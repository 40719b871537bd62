//! Test rig of the dns crate: DNS clients (raw hickory-proto messages over UDP and TCP), a
//! tiny in-process upstream for loopback tests, and `in_netns`, which runs a test body inside
//! a network namespace of its own (only `lo`) with dnsmasq on 127.0.0.1:53 and the namespace's
//! own /etc/hosts and /etc/resolv.conf (`ip netns exec` bind-mounts /etc/netns/NAME/*).
//!
//! Safety: nothing here sends a packet anywhere but loopback. getaddrinfo (which reads the
//! machine's /etc/resolv.conf) is only ever called inside such a namespace, where the
//! resolv.conf is ours and there is no route out anyway.
#![allow(dead_code)]

pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use dns::{DnsConfig, DnsServer};

/// How long a test client waits for one answer.
pub const CLIENT_WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// A query for `name`/`rtype` with RD set and, if given, an EDNS OPT with that UDP size.
pub fn query(name: &str, rtype: RecordType, edns: Option<u16>) -> Message {
    let mut m = Message::new(rand::random(), MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    // from_ascii keeps the case (from_str maps through IDNA, which lowercases).
    m.add_query(Query::query(
        Name::from_ascii(name).expect("test name"),
        rtype,
    ));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m
}

/// Sends raw bytes over UDP and waits for one datagram (None after `wait`).
pub async fn udp_raw(server: SocketAddr, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind client");
    sock.connect(server).await.expect("connect client");
    sock.send(bytes).await.expect("send");
    let mut buf = vec![0u8; 65535];
    match tokio::time::timeout(wait, sock.recv(&mut buf)).await {
        Ok(Ok(n)) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

/// One query over UDP; panics without an answer within `CLIENT_WAIT`.
pub async fn udp(server: SocketAddr, q: &Message) -> (Message, Vec<u8>) {
    let bytes = q.to_vec().expect("encode query");
    let raw = udp_raw(server, &bytes, CLIENT_WAIT)
        .await
        .unwrap_or_else(|| panic!("no UDP answer from {server} for {}", q.queries[0]));
    let m = Message::from_vec(&raw).expect("parse answer");
    assert_eq!(m.metadata.id, q.metadata.id, "answer ID");
    (m, raw)
}

/// Writes one length-prefixed message.
pub async fn tcp_send(s: &mut TcpStream, bytes: &[u8]) {
    let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    s.write_all(&out).await.expect("tcp write");
}

/// Reads one length-prefixed message (None on EOF or after `CLIENT_WAIT`).
pub async fn tcp_recv(s: &mut TcpStream) -> Option<Vec<u8>> {
    let fut = async {
        let n = s.read_u16().await.ok()? as usize;
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf).await.ok()?;
        Some(buf)
    };
    tokio::time::timeout(CLIENT_WAIT, fut).await.ok().flatten()
}

/// One query on a fresh TCP connection.
pub async fn tcp(server: SocketAddr, q: &Message) -> (Message, Vec<u8>) {
    let mut all = tcp_many(server, std::slice::from_ref(q)).await;
    all.pop().expect("one answer")
}

/// Several queries pipelined on one TCP connection; answers returned in query order
/// (matched by ID, as they may come in any order).
pub async fn tcp_many(server: SocketAddr, qs: &[Message]) -> Vec<(Message, Vec<u8>)> {
    let mut s = TcpStream::connect(server).await.expect("tcp connect");
    for q in qs {
        tcp_send(&mut s, &q.to_vec().expect("encode")).await;
    }
    let mut got: Vec<(Message, Vec<u8>)> = Vec::new();
    for _ in qs {
        let raw = tcp_recv(&mut s)
            .await
            .unwrap_or_else(|| panic!("TCP answer missing from {server}"));
        got.push((Message::from_vec(&raw).expect("parse tcp answer"), raw));
    }
    qs.iter()
        .map(|q| {
            let i = got
                .iter()
                .position(|(m, _)| m.metadata.id == q.metadata.id)
                .unwrap_or_else(|| panic!("no TCP answer with ID {}", q.metadata.id));
            got.swap_remove(i)
        })
        .collect()
}

/// A server on 127.0.0.1 (UDP and TCP on the same random port); returns the address.
pub async fn start(server: &DnsServer) -> SocketAddr {
    let (tcp, udp, addr) = upstream::bind_pair().await;
    let s1 = server.clone();
    tokio::spawn(async move { s1.serve_tcp(tcp).await });
    let s2 = server.clone();
    tokio::spawn(async move { s2.serve_udp(udp).await });
    addr
}

/// A temp resolv.conf with `text` (kept while the TempDir lives).
pub fn resolv_conf(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("resolv.conf");
    std::fs::write(&p, text).expect("write resolv.conf");
    (dir, p)
}

/// A config that can only reach loopback: the given resolv.conf, fallback to a closed local
/// port unless set otherwise by the caller.
pub fn local_config(resolv: PathBuf) -> DnsConfig {
    DnsConfig {
        resolv_conf: resolv,
        fallback: vec!["127.0.0.1:9".parse().unwrap()],
        ..DnsConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// dnsmasq, the upstream of the namespace tests
// ---------------------------------------------------------------------------------------------

/// TTL dnsmasq gives its records (so "the real TTL" is recognisable).
pub const UPSTREAM_TTL: u32 = 123;

/// The 8 strings of the long TXT record (8 x 200 bytes: the answer is about 1650 bytes).
pub fn long_txt_strings() -> Vec<String> {
    (0..8u8)
        .map(|i| String::from_utf8(vec![b'a' + i; 200]).unwrap())
        .collect()
}

/// dnsmasq's arguments: a local-only server on `addr`:53 with the test records.
pub fn dnsmasq_args(listen: &str) -> Vec<String> {
    let mut a: Vec<String> = [
        "-k",
        "--no-resolv",
        "--no-hosts",
        "--port=53",
        "--bind-interfaces",
        "--pid-file=",
        "--user=root",
        "--local-ttl=123",
        "--local=/test/",
        "--local=/internal/",
        "--host-record=web.test,10.0.0.10,fd00::10",
        "--host-record=v4only.test,10.0.0.11",
        "--host-record=other.internal,10.0.0.77",
        "--cname=alias.test,web.test",
        "--txt-record=txt.test,hello world",
        "--mx-host=test,mail.test,10",
        "--srv-host=_http._tcp.test,web.test,80,0,0",
        "--ptr-record=10.0.0.10.in-addr.arpa,web.test",
        "--caa-record=test,0,issue,ca.test",
        // NS test. -> ns1.test.
        "--dns-rr=test,2,03:6e:73:31:04:74:65:73:74:00",
        // HTTPS test. -> 1 . alpn=h2
        "--dns-rr=test,65,00:01:00:00:01:00:03:02:68:32",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push(format!("--listen-address={listen}"));
    a.push(format!(
        "--txt-record=long.test,{}",
        long_txt_strings().join(",")
    ));
    a
}

// ---------------------------------------------------------------------------------------------
// Running a test body in a namespace of its own
// ---------------------------------------------------------------------------------------------

const INNER_ENV: &str = "DNS_TEST_NETNS";
const PID_ENV: &str = "DNS_TEST_DNSMASQ_PID";

/// The hosts file of the test namespace.
pub const NS_HOSTS: &str =
    "127.0.0.1 localhost\n10.1.2.3 hostsonly.test\nfd00::99 hostsonly6.test\n";

/// The resolv.conf of the test namespace (what glibc in it uses).
pub const NS_RESOLV: &str = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n";

/// What a test body inside the namespace gets.
pub struct NsEnv {
    pub netns: String,
    pub dnsmasq_pid: u32,
}

impl NsEnv {
    /// Stops dnsmasq and waits until it no longer answers.
    pub async fn stop_upstream(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.dnsmasq_pid.to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(10);
        while upstream_answers().await {
            assert!(Instant::now() < end, "dnsmasq did not stop");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Replaces the namespace's /etc/resolv.conf (glibc re-reads it when it changes).
    pub fn set_system_resolv_conf(&self, text: &str) {
        // A bind mount of /etc/netns/NAME/resolv.conf: write in place, keep the inode.
        std::fs::write("/etc/resolv.conf", text).expect("rewrite /etc/resolv.conf in netns");
    }
}

async fn upstream_answers() -> bool {
    let q = query("web.test.", RecordType::A, None);
    udp_raw(
        "127.0.0.1:53".parse().unwrap(),
        &q.to_vec().unwrap(),
        Duration::from_millis(300),
    )
    .await
    .is_some()
}

fn find_tool(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].iter().map(PathBuf::from))
        .any(|d| d.join(tool).is_file())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Whether namespace tests can run; prints SKIPPED (or panics with USERNET_E2E=1) otherwise.
fn can_run(test: &str) -> bool {
    let mut why = Vec::new();
    if !is_root() {
        why.push("not root".to_string());
    }
    for t in ["ip", "dnsmasq"] {
        if !find_tool(t) {
            why.push(format!(
                "`{t}` not found (dnsmasq: apt-get install dnsmasq-base)"
            ));
        }
    }
    if why.is_empty() {
        return true;
    }
    let why = why.join("; ");
    if std::env::var("USERNET_E2E").as_deref() == Ok("1") {
        panic!("{test}: cannot run with USERNET_E2E=1: {why}");
    }
    eprintln!("SKIPPED: {test}: {why}");
    false
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The namespace, its /etc/netns files and dnsmasq; all removed on drop.
struct Outer {
    name: String,
    dnsmasq: Option<Child>,
}

impl Drop for Outer {
    fn drop(&mut self) {
        if let Some(mut c) = self.dnsmasq.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Anything else left in the namespace was started by this test.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.name));
    }
}

fn run_cmd(cmd: &mut Command) {
    let out = cmd.output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `body` in a fresh namespace with dnsmasq on 127.0.0.1:53. `test` must be this test's
/// name (the test binary re-runs itself, filtered to it, inside the namespace).
pub fn in_netns<F, Fut>(test: &str, body: F)
where
    F: FnOnce(NsEnv) -> Fut,
    Fut: Future<Output = ()>,
{
    if let Ok(netns) = std::env::var(INNER_ENV) {
        let dnsmasq_pid = std::env::var(PID_ENV)
            .ok()
            .and_then(|p| p.parse().ok())
            .expect("dnsmasq pid");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let end = Instant::now() + Duration::from_secs(10);
            while !upstream_answers().await {
                assert!(Instant::now() < end, "dnsmasq in {netns} never answered");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            body(NsEnv {
                netns: netns.clone(),
                dnsmasq_pid,
            })
            .await
        });
        return;
    }
    if !can_run(test) {
        return;
    }
    let name = format!(
        "dnst-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    run_cmd(Command::new("ip").args(["netns", "add", &name]));
    let mut outer = Outer {
        name: name.clone(),
        dnsmasq: None,
    };
    run_cmd(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]));
    let etc = format!("/etc/netns/{name}");
    std::fs::create_dir_all(&etc).expect("create /etc/netns/NAME");
    std::fs::write(format!("{etc}/hosts"), NS_HOSTS).expect("write hosts");
    std::fs::write(format!("{etc}/resolv.conf"), NS_RESOLV).expect("write resolv.conf");

    let log = tempfile::NamedTempFile::new().expect("dnsmasq log");
    let dnsmasq = Command::new("ip")
        .args(["netns", "exec", &name, "dnsmasq"])
        .args(dnsmasq_args("127.0.0.1"))
        .stdin(Stdio::null())
        .stdout(log.as_file().try_clone().expect("log"))
        .stderr(log.as_file().try_clone().expect("log"))
        .spawn()
        .expect("spawn dnsmasq");
    let pid = dnsmasq.id();
    outer.dnsmasq = Some(dnsmasq);

    let exe = std::env::current_exe().expect("test binary");
    let out_file = tempfile::NamedTempFile::new().expect("inner output");
    let out = out_file.as_file().try_clone().expect("out");
    let mut inner = Command::new("ip")
        .args(["netns", "exec", &name])
        .arg(&exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(INNER_ENV, &name)
        .env(PID_ENV, pid.to_string())
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("out"))
        .stderr(out)
        .spawn()
        .expect("spawn the test inside the namespace");
    let end = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(st) = inner.try_wait().expect("wait inner") {
            break Some(st);
        }
        if Instant::now() >= end {
            let _ = inner.kill();
            let _ = inner.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = std::fs::read_to_string(out_file.path()).unwrap_or_default();
    let ran = output.contains("1 passed");
    let dnsmasq_log = std::fs::read_to_string(log.path()).unwrap_or_default();
    drop(outer);
    assert!(
        status.map(|s| s.success()).unwrap_or(false) && ran,
        "{test} inside namespace {name}: {}\n--- its output:\n{output}\n--- dnsmasq:\n{dnsmasq_log}",
        match status {
            Some(s) => format!("exited with {s}"),
            None => "killed after 180 s".to_string(),
        }
    );
}
