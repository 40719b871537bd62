//! End-to-end tests of the outbound path: the guest (namespace G, 192.168.5.15 by DHCP) reaches
//! servers on the daemon namespace's loopback (as 192.168.5.2) and in a server namespace S
//! (10.200.0.2, behind a veth from the daemon's namespace D) through usernet's host sockets:
//! TCP (bulk both ways, half-close, RST, refusal, pending connects, 1000 flows), UDP (sizes up to
//! fragmented 65507 bytes, flow timeout), ICMP echo, and malformed frames. See
//! `support::OutboundRig`. Traffic goes only to loopback and to the test's own namespaces;
//! 10.201.0.0/24 is routed from D into S, which drops it (forwarding off): SYNs go unanswered.
//! Without root and the tools the tests print `SKIPPED:` unless `USERNET_E2E=1`.

mod support;

use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

const HOST: &str = "192.168.5.2";
const SERVER: &str = VETH_S_IP;
/// An address the daemon's namespace has no route to: host sockets fail locally.
const UNROUTED: &str = "10.202.0.1";
const TOOLS: &[&str] = &["busybox", "python3", "curl", "ss"];

fn rig(test: &str, extra: &[&str]) -> Option<OutboundRig> {
    if !require_root_and_tools(test, TOOLS) {
        return None;
    }
    Some(OutboundRig::new(extra))
}

/// Straight to stderr so it shows even under libtest's capture.
fn note(msg: impl std::fmt::Display) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(x)) => x.clone(),
        Some(x) => x.to_string(),
        None => String::new(),
    }
}

fn f(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

fn u(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(u64::MAX)
}

/// A deterministic text file of about 200 KB.
fn page_text() -> String {
    let mut t = String::from("usernet outbound e2e test page\n");
    for i in 0..6000 {
        t.push_str(&format!(
            "line {i:05} of the served file: the quick brown fox\n"
        ));
    }
    t
}

/// Compares a client's received text with the expected content, with a short account.
fn same_text(got: &str, want: &str) -> Result<(), String> {
    if got == want {
        return Ok(());
    }
    let at = got
        .bytes()
        .zip(want.bytes())
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    Err(format!(
        "content differs: got {} bytes, expected {}; first difference at byte {at}: got {:?}",
        got.len(),
        want.len(),
        &got[at.min(got.len())..(at + 60).min(got.len())]
    ))
}

fn curl(rig: &OutboundRig, url: &str) -> RunOutput {
    run_with_deadline(
        rig.g
            .exec("curl", &["-sS", "--max-time", "20", "-o", "-", url]),
        Duration::from_secs(30),
    )
}

/// The JSON lines `srv` printed, once one of them is `reported` (within 5 s): a server
/// reports after it answered, so its client can be done first.
fn lines_once_reported(srv: &BgProcess, reported: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut seen = Vec::new();
    poll_until(Duration::from_secs(5), || {
        seen = json_lines(&srv.stdout());
        seen.iter().any(&reported)
    });
    seen
}

#[track_caller]
fn assert_curl(rig: &OutboundRig, url: &str, want: &str, server: &mut BgProcess) {
    let out = curl(rig, url);
    let res = if out.success() {
        same_text(&out.stdout, want)
    } else {
        Err("curl failed".to_string())
    };
    if let Err(e) = res {
        let mut o = out;
        o.stdout.truncate(2000);
        rig.fail(format!(
            "curl {url} from the guest: {e}\n{}\n{}",
            o.describe(),
            server.describe()
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// 1. HTTP to the host's loopback and to the server namespace
// ---------------------------------------------------------------------------------------------

#[test]
fn curl_reaches_host_loopback_and_server_namespace() {
    let Some(rig) = rig("curl_reaches_host_loopback_and_server_namespace", &[]) else {
        return;
    };
    let text = page_text();
    let (dir, _file) = temp_file("page.txt", &text);
    let mut on_d = rig.httpd(&rig.d, "127.0.0.1", 8080, dir.path());
    let mut on_s = rig.httpd(&rig.s, SERVER, 8081, dir.path());

    assert_curl(
        &rig,
        &format!("http://{HOST}:8080/page.txt"),
        &text,
        &mut on_d,
    );
    assert_curl(
        &rig,
        &format!("http://{SERVER}:8081/page.txt"),
        &text,
        &mut on_s,
    );
    // Twice more each, so connection reuse of ports and flow teardown are exercised too.
    assert_curl(
        &rig,
        &format!("http://{HOST}:8080/page.txt"),
        &text,
        &mut on_d,
    );
    assert_curl(
        &rig,
        &format!("http://{SERVER}:8081/page.txt"),
        &text,
        &mut on_s,
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Bulk transfers both ways, sha256 compared
// ---------------------------------------------------------------------------------------------

/// Sends `nbytes` guest -> `host:sink_port` and receives `nbytes` from `host:source_port`;
/// sha256 must agree at both ends.
#[allow(clippy::too_many_arguments)]
fn bulk_both_ways(
    rig: &OutboundRig,
    host: &str,
    sink_port: u16,
    source_port: u16,
    nbytes: u64,
    deadline: Duration,
    sink: &mut BgProcess,
    source: &mut BgProcess,
) {
    let n = nbytes.to_string();
    let mib = nbytes as f64 / f64::from(1u32 << 20);

    // Guest -> server.
    let out = run_with_deadline(
        rig.tool(&rig.g, &["send", host, &sink_port.to_string(), &n]),
        deadline,
    );
    let Some(v) = parse_last_json(&out.stdout).filter(|_| out.success()) else {
        rig.fail(format!(
            "guest -> {host}:{sink_port}: {mib} MiB upload did not complete within {deadline:?}\n{}\n{}",
            out.describe(),
            sink.describe()
        ));
    };
    let want_reply = format!("{nbytes} {}", s(&v, "sha"));
    if s(&v, "reply") != want_reply {
        rig.fail(format!(
            "guest -> {host}:{sink_port}: the server received something else: server says {:?}, \
             guest sent {want_reply:?}\n{}\n{}",
            s(&v, "reply"),
            out.describe(),
            sink.describe()
        ));
    }
    note(format!(
        "bulk guest -> {host}: {mib} MiB in {:.2} s = {:.1} MiB/s",
        f(&v, "secs"),
        f(&v, "mib_per_s")
    ));

    // Server -> guest.
    let out = run_with_deadline(
        rig.tool(&rig.g, &["recv", host, &source_port.to_string(), &n]),
        deadline,
    );
    let Some(v) = parse_last_json(&out.stdout).filter(|_| out.success()) else {
        rig.fail(format!(
            "{host}:{source_port} -> guest: {mib} MiB download did not complete within {deadline:?}\n{}\n{}",
            out.describe(),
            source.describe()
        ));
    };
    if u(&v, "got") != nbytes || s(&v, "sha") != s(&v, "expected_sha") {
        rig.fail(format!(
            "{host}:{source_port} -> guest: got {} bytes sha {}, expected {nbytes} bytes sha {}\n{}\n{}",
            s(&v, "got"),
            s(&v, "sha"),
            s(&v, "expected_sha"),
            out.describe(),
            source.describe()
        ));
    }
    note(format!(
        "bulk {host} -> guest: {mib} MiB in {:.2} s = {:.1} MiB/s",
        f(&v, "secs"),
        f(&v, "mib_per_s")
    ));
}

fn bulk_test(test: &str, nbytes: u64, deadline: Duration, also_loopback: bool, offload: bool) {
    let extra: &[&str] = if offload { &[] } else { &["--no-offload"] };
    let Some(rig) = rig(test, extra) else {
        return;
    };
    let n = nbytes.to_string();
    let mut sink = rig.tool_server(&rig.s, &["tcp-sink", SERVER, "9001"], 't', 9001);
    let mut source = rig.tool_server(&rig.s, &["tcp-source", SERVER, "9002", &n], 't', 9002);
    bulk_both_ways(
        &rig,
        SERVER,
        9001,
        9002,
        nbytes,
        deadline,
        &mut sink,
        &mut source,
    );
    if also_loopback {
        let mut sink = rig.tool_server(&rig.d, &["tcp-sink", "127.0.0.1", "9001"], 't', 9001);
        let mut source =
            rig.tool_server(&rig.d, &["tcp-source", "127.0.0.1", "9002", &n], 't', 9002);
        bulk_both_ways(
            &rig,
            HOST,
            9001,
            9002,
            nbytes,
            deadline,
            &mut sink,
            &mut source,
        );
    }
    // The byte counters saw it all (each direction once per path), and every flow closed.
    let paths = if also_loopback { 2 } else { 1 };
    let want = nbytes * paths;
    rig.daemon.wait_stats(
        Duration::from_secs(30),
        &format!("tcp.bytes_from_guest and tcp.bytes_to_guest >= {want}, tcp.open == 0"),
        |st| {
            stat_u64(st, "tcp.bytes_from_guest").is_some_and(|b| b >= want)
                && stat_u64(st, "tcp.bytes_to_guest").is_some_and(|b| b >= want)
                && stat_u64(st, "tcp.open") == Some(0)
        },
    );
    // With offload, what went to the guest crossed the tap in large segments.
    let st = rig.daemon.stats();
    let large = stat_u64(&st, "switch.large_frames").unwrap_or(0);
    rig.check(
        if offload { large > 0 } else { large == 0 },
        format!(
            "switch.large_frames should be {}: {st}",
            if offload { "> 0" } else { "0" }
        ),
    );
}

/// Without segmentation offload on the tap (`--no-offload`): every frame fits the MTU.
#[test]
fn bulk_64mib_both_directions() {
    bulk_test(
        "bulk_64mib_both_directions",
        64 << 20,
        Duration::from_secs(120),
        true,
        false,
    );
}

#[test]
fn bulk_1gib_both_directions() {
    bulk_test(
        "bulk_1gib_both_directions",
        1 << 30,
        Duration::from_secs(240),
        false,
        true,
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Half-close both ways
// ---------------------------------------------------------------------------------------------

#[test]
fn half_close_both_ways() {
    let Some(rig) = rig("half_close_both_ways", &[]) else {
        return;
    };
    const REQ: u64 = 100_000;
    const REPLY: u64 = 2 << 20;
    const FIRST: u64 = 1 << 20;
    // Sent by the guest after the server's FIN, to a server that starts reading only 0.5 s
    // later: the tail must wait in usernet while the host socket is full, and still arrive.
    const AFTER: u64 = 4 << 20;
    for (ns, bind, target, peer) in [
        (&rig.s, SERVER, SERVER, VETH_D_IP),
        (&rig.d, "127.0.0.1", HOST, "127.0.0.1"),
    ] {
        // The guest half-closes first; the server reads to EOF, then replies and closes.
        let mut srv = rig.tool_server(
            ns,
            &["tcp-halfclose", bind, "9003", &REPLY.to_string()],
            't',
            9003,
        );
        let out = run_with_deadline(
            rig.tool(
                &rig.g,
                &[
                    "halfclose",
                    target,
                    "9003",
                    &REQ.to_string(),
                    &REPLY.to_string(),
                ],
            ),
            Duration::from_secs(60),
        );
        let v = parse_last_json(&out.stdout).filter(|_| out.success());
        let ok = v.as_ref().is_some_and(|v| {
            s(v, "header") == format!("{REQ} {}", s(v, "sent_sha"))
                && u(v, "body_len") == REPLY
                && s(v, "body_sha") == s(v, "expected_body_sha")
        });
        if !ok {
            rig.fail(format!(
                "guest half-closed towards {target}:9003: the server should read {REQ} bytes to EOF \
                 and the guest then read the whole {REPLY}-byte reply\n{}\n{}",
                out.describe(),
                srv.describe()
            ));
        }
        let reported = |l: &Value| s(l, "peer") == peer && u(l, "got") == REQ;
        let seen = lines_once_reported(&srv, reported);
        rig.check(
            seen.iter().any(reported),
            format!(
                "the server should report {REQ} bytes from {peer}\n{}",
                srv.describe()
            ),
        );

        // The server half-closes first; the guest reads to EOF, then sends and closes.
        let mut srv = rig.tool_server(
            ns,
            &["tcp-serverfirst", bind, "9004", &FIRST.to_string(), "0.5"],
            't',
            9004,
        );
        let out = run_with_deadline(
            rig.tool(
                &rig.g,
                &[
                    "serverfirst",
                    target,
                    "9004",
                    &FIRST.to_string(),
                    &AFTER.to_string(),
                ],
            ),
            Duration::from_secs(60),
        );
        let v = parse_last_json(&out.stdout).filter(|_| out.success());
        let ok = v
            .as_ref()
            .is_some_and(|v| u(v, "got") == FIRST && s(v, "sha") == s(v, "expected_sha"));
        if !ok {
            rig.fail(format!(
                "{target}:9004 half-closed first: the guest should read all {FIRST} bytes, then \
                 still send {AFTER} bytes\n{}\n{}",
                out.describe(),
                srv.describe()
            ));
        }
        let sent_sha = s(v.as_ref().unwrap(), "sent_sha");
        let mut got_it = false;
        poll_until(Duration::from_secs(10), || {
            got_it = json_lines(&srv.stdout())
                .iter()
                .any(|l| u(l, "got") == AFTER && s(l, "sha") == sent_sha);
            got_it
        });
        rig.check(
            got_it,
            format!(
                "after its own FIN, the server at {target} should still receive the guest's \
                 {AFTER} bytes (sha {sent_sha})\n{}\n{}",
                out.describe(),
                srv.describe()
            ),
        );
    }
}

/// `echo-many` from the guest to SERVER:`port`: all `n` connections echo `size` bytes exactly
/// (`context` goes into the failure).
#[track_caller]
fn echo_many_ok(rig: &OutboundRig, port: &str, n: u64, size: usize, context: &str) {
    let (v, out) = rig.tool_json(
        &rig.g,
        &[
            "echo-many",
            SERVER,
            port,
            &n.to_string(),
            &size.to_string(),
            "20",
        ],
        Duration::from_secs(30),
    );
    rig.check(
        u(&v, "ok") == n,
        format!(
            "{n} connections echoing {size} bytes on :{port}\n{}\n{context}",
            out.describe()
        ),
    );
}

/// Frames in the pcap at `path` that match the tshark display `filter`.
fn pcap_count(path: &std::path::Path, filter: &str) -> Option<usize> {
    let mut c = std::process::Command::new("tshark");
    c.args(["-n", "-r"])
        .arg(path)
        .args(["-Y", filter, "-T", "fields", "-e", "frame.number"]);
    let out = run_with_deadline(c, Duration::from_secs(30));
    out.success()
        .then(|| out.stdout.lines().filter(|l| !l.trim().is_empty()).count())
}

/// The ACK of the guest's FIN rides on usernet's next segment when the host closes at once
/// (an echo: request, reply, the guest's FIN, the server's; the capture shows no bare ACK of
/// the FIN: one segment to the guest fewer per connection), and waits no longer than 20 ms
/// when the host answers later: with a server that replies 2 s after the guest's FIN, the
/// guest's socket reaches FIN-WAIT-2 (its FIN acknowledged) long before, and the guest's
/// kernel retransmits nothing.
#[test]
fn guest_fin_ack_rides_on_the_answer_or_comes_soon() {
    let test = "guest_fin_ack_rides_on_the_answer_or_comes_soon";
    if !require_root_and_tools(test, &["tshark"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pcap = dir.path().join("fin.pcap");
    let pcap_arg = pcap.display().to_string();
    let Some(rig) = rig(test, &["--pcap", &pcap_arg]) else {
        return;
    };
    // 1000 bytes each way: relative to the guest's ISN, its FIN is 1001 and its ACK 1002.
    let fin_acked = "tcp.ack == 1002";

    // At once: the echo server closes when it reads the end; its FIN carries the ACK.
    let mut srv = rig.tool_server(&rig.s, &["tcp-echo", SERVER, "9017"], 't', 9017);
    echo_many_ok(&rig, "9017", 1, 1000, &srv.describe());
    let from = "tcp.srcport == 9017";
    let mut carried = None;
    poll_until(Duration::from_secs(10), || {
        carried = pcap_count(&pcap, &format!("{from} && {fin_acked}"));
        carried.is_some_and(|n| n > 0)
    });
    let bare = pcap_count(
        &pcap,
        &format!(
            "{from} && {fin_acked} && tcp.len == 0 && tcp.flags.fin == 0 && tcp.flags.reset == 0"
        ),
    );
    rig.check(
        carried.is_some_and(|n| n > 0) && bare == Some(0),
        format!(
            "the guest's FIN acknowledged by the answer, not by a bare ACK: {carried:?} segments \
             acknowledge it, {bare:?} of them bare"
        ),
    );
    srv.kill();

    // Two seconds later: the ACK comes alone, within 20 ms, before the guest's kernel resends.
    let answered = |out: &RunOutput| {
        parse_last_json(&out.stdout)
            .filter(|_| out.success())
            .is_some_and(|v| {
                s(&v, "header") == format!("1000 {}", s(&v, "sent_sha"))
                    && u(&v, "body_len") == 100
                    && s(&v, "body_sha") == s(&v, "expected_body_sha")
            })
    };
    let mut srv = rig.tool_server(
        &rig.s,
        &["tcp-halfclose", SERVER, "9018", "100", "2"],
        't',
        9018,
    );
    let retrans = || snmp_counter(&rig.g, "Tcp", "RetransSegs");
    let before = retrans();
    // The guest's data is acknowledged before its FIN (a pause of 0.2 s), as in a request
    // answered later: the FIN alone waits for its ACK.
    let client = rig.tool(&rig.g, &["halfclose", SERVER, "9018", "1000", "100", "0.2"]);
    let running = std::thread::spawn(move || run_with_deadline(client, Duration::from_secs(30)));
    let mut seen = String::new();
    // The guest's FIN acknowledged while the server waits its 2 s: the connection in
    // FIN-WAIT-2 within 1.5 s of its first sighting (counted from there, not from the client's
    // start, which a loaded machine may slow). An answer that brought the ACK would find it in
    // FIN-WAIT-1 until then.
    let (mut first, mut fin_wait_2) = (None::<Instant>, None::<Instant>);
    poll_until(Duration::from_secs(10), || {
        let out = run_with_deadline(
            rig.g
                .exec("ss", &["-tanH", "dst", &format!("{SERVER}:9018")]),
            Duration::from_secs(5),
        );
        if !out.stdout.trim().is_empty() {
            first.get_or_insert_with(Instant::now);
            seen = out.stdout;
        }
        if seen.contains("FIN-WAIT-2") {
            fin_wait_2.get_or_insert_with(Instant::now);
        }
        fin_wait_2.is_some()
    });
    let fin_wait_2 = match (first, fin_wait_2) {
        (Some(a), Some(b)) => b - a < Duration::from_millis(1500),
        _ => false,
    };
    let out = running.join().expect("halfclose thread");
    let after = retrans();
    rig.check(
        answered(&out),
        format!(
            "half-close to :9018 answered after 2 s\n{}\n{}",
            out.describe(),
            srv.describe()
        ),
    );
    rig.check(
        fin_wait_2,
        format!("while the server waits 2 s, the guest's FIN is acknowledged (FIN-WAIT-2 within 1.5 s of the connection's first sighting): ss {seen:?}"),
    );
    let alone = pcap_count(
        &pcap,
        &format!("tcp.srcport == 9018 && {fin_acked} && tcp.len == 0 && tcp.flags.fin == 0"),
    );
    rig.check(
        alone.is_some_and(|n| n >= 1),
        format!("a bare ACK of the guest's FIN went out while the server waited: {alone:?}"),
    );
    rig.check(
        before.is_some() && before == after,
        format!("the guest retransmitted nothing (RetransSegs {before:?} -> {after:?})"),
    );
    srv.kill();
}

// ---------------------------------------------------------------------------------------------
// 4. RST both ways
// ---------------------------------------------------------------------------------------------

#[test]
fn rst_both_ways() {
    let Some(rig) = rig("rst_both_ways", &[]) else {
        return;
    };
    for (ns, bind, target) in [(&rig.s, SERVER, SERVER), (&rig.d, "127.0.0.1", HOST)] {
        // Server -> guest: the server reads "hello" and closes with SO_LINGER 0.
        let mut srv = rig.tool_server(ns, &["tcp-rst", bind, "9005"], 't', 9005);
        let (v, out) = rig.tool_json(&rig.g, &["rst", target, "9005"], Duration::from_secs(30));
        if s(&v, "result") != "reset" {
            rig.fail(format!(
                "a server at {target} closing with SO_LINGER 0: the guest should see \
                 ECONNRESET\n{}\n{}",
                out.describe(),
                srv.describe()
            ));
        }

        // Guest -> server: the guest sends "hello" and closes with SO_LINGER 0.
        let mut obs = rig.tool_server(ns, &["tcp-observe", bind, "9006"], 't', 9006);
        let (_v, out) = rig.tool_json(&rig.g, &["abort", target, "9006"], Duration::from_secs(30));
        let mut seen = None;
        poll_until(Duration::from_secs(10), || {
            seen = json_lines(&obs.stdout()).into_iter().next();
            seen.is_some()
        });
        let res = seen.as_ref().map(|l| s(l, "result"));
        if res.as_deref() != Some("reset") {
            rig.fail(format!(
                "the guest aborted (SO_LINGER 0) its connection to {target}: the server should \
                 see ECONNRESET, saw {res:?}\n{}\n{}",
                out.describe(),
                obs.describe()
            ));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Refusal is immediate
// ---------------------------------------------------------------------------------------------

#[test]
fn connection_refused_within_one_second() {
    let Some(rig) = rig("connection_refused_within_one_second", &[]) else {
        return;
    };
    for target in [HOST, SERVER] {
        let (v, out) = rig.tool_json(
            &rig.g,
            &["connect", target, "9999", "10"],
            Duration::from_secs(20),
        );
        let elapsed = f(&v, "elapsed");
        if s(&v, "result") != "refused" || (elapsed.is_nan() || elapsed >= 1.0) {
            rig.fail(format!(
                "connect to the closed port {target}:9999 should be refused within 1 s; \
                 got {} after {elapsed:.3} s\n{}",
                s(&v, "result"),
                out.describe()
            ));
        }
        note(format!(
            "refused by {target}:9999 after {:.1} ms",
            elapsed * 1000.0
        ));
    }
    // D has no route to 10.202.0.0/24 (no default route either): the host connect fails
    // locally, and the guest must hear of it at once instead of retrying its SYN.
    let (v, out) = rig.tool_json(
        &rig.g,
        &["connect", UNROUTED, "80", "10"],
        Duration::from_secs(20),
    );
    let elapsed = f(&v, "elapsed");
    let res = s(&v, "result");
    if res == "connected" || res == "timeout" || (elapsed.is_nan() || elapsed >= 1.0) {
        rig.fail(format!(
            "connect to {UNROUTED}:80 (no route in the daemon's namespace) should fail within \
             1 s; got {res} after {elapsed:.3} s\n{}",
            out.describe()
        ));
    }
    note(format!(
        "{UNROUTED}:80 (unrouted): {res} after {:.1} ms",
        elapsed * 1000.0
    ));
}

// ---------------------------------------------------------------------------------------------
// 6. Pending connects do not block others; they end at --tcp-connect-timeout
// ---------------------------------------------------------------------------------------------

#[test]
fn pending_connects_do_not_block_and_time_out() {
    let Some(rig) = rig(
        "pending_connects_do_not_block_and_time_out",
        &["--tcp-connect-timeout", "5"],
    ) else {
        return;
    };
    const N: usize = 20;
    const DROPPED: &str = "10.201.0.5";
    let dst = format!("{DROPPED}:80");
    let mut echo = rig.tool_server(&rig.s, &["tcp-echo", SERVER, "9007"], 't', 9007);
    let mut pending = BgProcess::spawn(rig.tool(
        &rig.g,
        &["connect-many", DROPPED, "80", &N.to_string(), "20"],
    ));
    let started = Instant::now();
    let mut problems = Vec::new();

    // All N are pending in the guest and, as host connects, in the daemon's namespace.
    if !poll_until(Duration::from_secs(5), || syn_sent_count(&rig.g, &dst) >= N) {
        rig.fail(format!(
            "the guest should have {N} connects to {dst} pending (SYN-SENT), has {}\n{}",
            syn_sent_count(&rig.g, &dst),
            pending.describe()
        ));
    }
    if !poll_until(Duration::from_secs(5), || syn_sent_count(&rig.d, &dst) >= N) {
        problems.push(format!(
            "the daemon should have {N} host connects to {dst} pending (SYN-SENT in D), has {}",
            syn_sent_count(&rig.d, &dst)
        ));
    }

    // Meanwhile a working server answers at once.
    let out = run_with_deadline(
        rig.tool(&rig.g, &["echo-many", SERVER, "9007", "1", "65536", "10"]),
        Duration::from_secs(15),
    );
    let v = parse_last_json(&out.stdout).filter(|_| out.success());
    let secs = v.as_ref().map(|v| f(v, "secs")).unwrap_or(f64::NAN);
    let ok = v.as_ref().is_some_and(|v| u(v, "ok") == 1);
    if !ok || (secs.is_nan() || secs >= 2.0) {
        rig.fail(format!(
            "with {N} connects pending, a 64 KiB echo with {SERVER}:9007 should complete within \
             2 s (took {secs:.3} s)\n{}\n{}\n{}",
            out.describe(),
            echo.describe(),
            pending.describe()
        ));
    }
    note(format!(
        "echo with {N} connects pending: {:.1} ms",
        secs * 1000.0
    ));

    if started.elapsed() < Duration::from_secs(4) {
        match rig.daemon.try_stats() {
            Ok(st) => {
                let c = stat_u64(&st, "tcp.connecting");
                if c.is_none_or(|c| c < N as u64) {
                    problems.push(format!(
                        "stats tcp.connecting should be >= {N} while they are pending: {st}"
                    ));
                }
            }
            Err(e) => problems.push(e),
        }
    }

    // The pending ones must fail at about the connect timeout (5 s), not hang to their own 20 s.
    let out = pending.finish(Duration::from_secs(30));
    match parse_last_json(&out.stdout) {
        Some(v) => {
            let results = v
                .get("results")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if results.len() != N {
                problems.push(format!("expected {N} results from the pending client"));
            }
            let kinds: std::collections::BTreeSet<String> =
                results.iter().map(|r| s(r, "result")).collect();
            let els: Vec<f64> = results.iter().map(|r| f(r, "elapsed")).collect();
            note(format!(
                "{N} pending connects ended: {kinds:?} after {:.2}..{:.2} s",
                els.iter().cloned().fold(f64::INFINITY, f64::min),
                els.iter().cloned().fold(0.0, f64::max)
            ));
            for (i, r) in results.iter().enumerate() {
                let res = s(r, "result");
                let el = f(r, "elapsed");
                if res == "connected" || res == "timeout" || !(4.0..=10.5).contains(&el) {
                    problems.push(format!(
                        "pending connect #{i} to {dst}: {res} after {el:.2} s (expected an error \
                         (reset/refused) between 4 and 10.5 s, from --tcp-connect-timeout 5)"
                    ));
                }
            }
        }
        None => problems.push("the pending client printed no results".to_string()),
    }
    if !poll_until(Duration::from_secs(5), || syn_sent_count(&rig.d, &dst) == 0) {
        problems.push(format!(
            "the daemon should have abandoned its host connects to {dst}; still {} SYN-SENT in D",
            syn_sent_count(&rig.d, &dst)
        ));
    }
    if !problems.is_empty() {
        rig.fail(format!("{}\n{}", problems.join("\n"), out.describe()));
    }
}

// ---------------------------------------------------------------------------------------------
// 7. 1000 concurrent connections
// ---------------------------------------------------------------------------------------------

#[test]
fn thousand_concurrent_echo_connections() {
    let Some(rig) = rig("thousand_concurrent_echo_connections", &[]) else {
        return;
    };
    const N: u64 = 1000;
    let mut echo = rig.tool_server(&rig.s, &["tcp-echo", SERVER, "9008"], 't', 9008);
    let out = run_with_deadline(
        rig.tool(
            &rig.g,
            &["echo-many", SERVER, "9008", &N.to_string(), "65536", "170"],
        ),
        Duration::from_secs(180),
    );
    let v = parse_last_json(&out.stdout).filter(|_| out.success());
    if v.as_ref().is_none_or(|v| u(v, "ok") != N) {
        rig.fail(format!(
            "{N} concurrent connections each echoing 64 KiB through usernet should all succeed\n{}\n{}",
            out.describe(),
            echo.describe()
        ));
    }
    let v = v.unwrap();
    note(format!(
        "{N} x 64 KiB echo: {:.2} s (slowest connection {:.2} s)",
        f(&v, "secs"),
        f(&v, "max_conn_secs")
    ));
    let st = rig.daemon.wait_stats(
        Duration::from_secs(30),
        "tcp.open == 0 after all closed",
        |st| stat_u64(st, "tcp.open") == Some(0) && stat_u64(st, "tcp.connecting") == Some(0),
    );
    rig.check(
        stat_u64(&st, "tcp.opened").is_some_and(|n| n >= N)
            && stat_u64(&st, "tcp.closed").is_some_and(|n| n >= N),
        format!("stats tcp.opened and tcp.closed should be >= {N}: {st}"),
    );
}

/// The guest's kernel negotiates RFC 7323 timestamps with usernet, so a client that closes
/// first may reuse a port still in TIME_WAIT (`tcp_tw_reuse`, which needs the peer's
/// timestamps): with only 4 ephemeral ports, 12 connections in a row to the same address
/// succeed within seconds (without timestamps the 5th would wait out TIME_WAIT, 60 s).
#[test]
fn timestamps_let_the_guest_reuse_time_wait_ports() {
    let Some(rig) = rig("timestamps_let_the_guest_reuse_time_wait_ports", &[]) else {
        return;
    };
    ns_sysctl(&rig.g, "net.ipv4.ip_local_port_range", "40000 40003");
    ns_sysctl(&rig.g, "net.ipv4.tcp_tw_reuse", "1");
    let mut echo = rig.tool_server(&rig.d, &["tcp-echo", "127.0.0.1", "9013"], 't', 9013);
    let (v, out) = rig.tool_json(
        &rig.g,
        &["connect-reuse", HOST, "9013", "12", "20"],
        Duration::from_secs(30),
    );
    let ts = v["ts"].as_array().cloned().unwrap_or_default();
    if u(&v, "ok") != 12 || ts.len() != 12 || !ts.iter().all(|t| t.as_bool() == Some(true)) {
        rig.fail(format!(
            "12 connections through 4 ports should all succeed, each with timestamps\n{}\n{}",
            out.describe(),
            echo.describe()
        ));
    }
    note(format!(
        "12 connections over 4 ports: {:.2} s, {} connects waited for a port (ports {})",
        f(&v, "elapsed"),
        u(&v, "retries"),
        v["ports"]
    ));
}

/// A UDP flow's host socket asks for a large receive buffer (room for a host's burst while the
/// daemon's thread is busy): the daemon namespace's kernel shows it, as much as
/// `net.core.rmem_max` allows, where a socket that does not ask has `rmem_default`.
#[test]
fn udp_flow_sockets_get_a_large_receive_buffer() {
    let Some(rig) = rig("udp_flow_sockets_get_a_large_receive_buffer", &[]) else {
        return;
    };
    let mut echo = rig.tool_server(&rig.d, &["udp-echo", "127.0.0.1", "9019"], 'u', 9019);
    let (v, out) = rig.tool_json(
        &rig.g,
        &["udp-echo-client", HOST, "9019", "40300", "100"],
        Duration::from_secs(30),
    );
    if v.pointer("/results/0/ok") != Some(&Value::Bool(true)) {
        rig.fail(format!(
            "UDP echo via {HOST}:9019\n{}\n{}",
            out.describe(),
            echo.describe()
        ));
    }
    // usernet's flow socket: the one connected to the echo server.
    let out = run_with_deadline(
        rig.d.exec("ss", &["-uanmH", "dst", "127.0.0.1:9019"]),
        Duration::from_secs(5),
    );
    let rb = out.stdout.split("rb").nth(1).and_then(|t| {
        t.split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse::<u64>().ok())
    });
    // As the daemon's namespace has it.
    let rmem_max: u64 = run_with_deadline(
        rig.d.exec("cat", &["/proc/sys/net/core/rmem_max"]),
        Duration::from_secs(5),
    )
    .stdout
    .trim()
    .parse()
    .unwrap_or(212_992);
    let want = 2 * rmem_max.min(1 << 20);
    rig.check(
        rb.is_some_and(|rb| rb >= want),
        format!(
            "the flow socket's receive buffer should be {want} (2 x min(1 MiB, rmem_max \
             {rmem_max})): ss {:?}",
            out.stdout
        ),
    );
    note(format!("flow socket: {}", out.stdout.trim()));
    echo.kill();
}

/// A host connection that lasts gets keep-alive probes (armed after a second, so that short
/// connections skip the two system calls): the daemon namespace's kernel shows the timer.
#[test]
fn lasting_host_connections_get_keepalive_probes() {
    let Some(rig) = rig("lasting_host_connections_get_keepalive_probes", &[]) else {
        return;
    };
    let mut echo = rig.tool_server(&rig.d, &["tcp-echo", "127.0.0.1", "9014"], 't', 9014);
    let mut held =
        BgProcess::spawn(rig.tool(&rig.g, &["echo-rounds", HOST, "9014", "1000", "2", "8"]));
    let mut last = String::new();
    let ok = poll_until(Duration::from_secs(6), || {
        // usernet's side of the connection: the one whose peer is the echo server.
        let out = run_with_deadline(
            rig.d.exec(
                "ss",
                &["-tnoH", "state", "established", "dst", "127.0.0.1:9014"],
            ),
            Duration::from_secs(5),
        );
        last = out.stdout.clone();
        last.contains("timer:(keepalive")
    });
    if !ok {
        rig.fail(format!(
            "the host socket of a lasting connection should have a keep-alive timer; ss: {last:?}\n{}\n{}",
            held.describe(),
            echo.describe()
        ));
    }
    note(format!("host socket: {}", last.trim()));
    held.kill();
    echo.kill();
}

/// `--outbound-addr`: the host sockets of the guest's connections are bound to that address
/// (a second address of the daemon namespace's veth, which the kernel would not pick itself),
/// and get their ports at connect time: with only 4 ephemeral ports and 3 of them in TIME_WAIT
/// towards one server port, 3 connections to another port of the same server still succeed
/// (a port reserved at bind time would leave 1).
#[test]
fn outbound_addr_binds_and_shares_ports_across_destinations() {
    const OUT: &str = "10.200.0.3";
    let Some(rig) = rig(
        "outbound_addr_binds_and_shares_ports_across_destinations",
        &["--outbound-addr", OUT],
    ) else {
        return;
    };
    rig.d
        .ip_ok(&["addr", "add", &format!("{OUT}/24"), "dev", "veth-d"]);
    ns_sysctl(&rig.d, "net.ipv4.ip_local_port_range", "40000 40003");
    let mut a = rig.tool_server(&rig.s, &["tcp-echo", SERVER, "9015"], 't', 9015);
    let mut b = rig.tool_server(&rig.s, &["tcp-echo", SERVER, "9016"], 't', 9016);
    for port in ["9015", "9016"] {
        let (v, out) = rig.tool_json(
            &rig.g,
            &["connect-many", SERVER, port, "3", "10"],
            Duration::from_secs(30),
        );
        let results: Vec<String> = v["results"]
            .as_array()
            .map(|r| r.iter().map(|x| s(x, "result")).collect())
            .unwrap_or_default();
        if results.len() != 3 || results.iter().any(|r| r != "connected") {
            rig.fail(format!(
                "3 connections to {SERVER}:{port} through 4 host ports should all connect: \
                 {results:?}\n{}\n{}\n{}",
                out.describe(),
                a.describe(),
                b.describe()
            ));
        }
    }
    // usernet's host sockets (TIME_WAIT after the guest's close, or still closing).
    let out = run_with_deadline(rig.d.exec("ss", &["-tanH"]), Duration::from_secs(5));
    let ours: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.contains(&format!("{SERVER}:9015")) || l.contains(&format!("{SERVER}:9016")))
        .collect();
    rig.check(
        ours.len() >= 6 && ours.iter().all(|l| l.contains(&format!("{OUT}:4000"))),
        format!("every host socket to the servers is bound to {OUT}, ports 40000-40003: {ours:#?}"),
    );
    note(format!("host sockets: {ours:#?}"));
}

/// A connection that went idle gets its buffers released (both halves), and data carried
/// after that is still exact in both directions.
#[test]
fn idle_connection_releases_buffers_and_keeps_data() {
    let Some(rig) = rig("idle_connection_releases_buffers_and_keeps_data", &[]) else {
        return;
    };
    let mut echo = rig.tool_server(&rig.s, &["tcp-echo", SERVER, "9010"], 't', 9010);
    let before = rig.daemon.stats();
    // 3.5 s pauses: past the 2 s after which an idle connection's buffers go back.
    let out = run_with_deadline(
        rig.tool(
            &rig.g,
            &["echo-rounds", SERVER, "9010", "1000000", "3", "3.5"],
        ),
        Duration::from_secs(60),
    );
    let v = parse_last_json(&out.stdout).filter(|_| out.success());
    if !v.as_ref().is_some_and(|v| v["ok"] == Value::Bool(true)) {
        rig.fail(format!(
            "three 1 MB echo rounds on one connection, idle 3.5 s between them, should all \
             come back exact\n{}\n{}",
            out.describe(),
            echo.describe()
        ));
    }
    let after = rig.daemon.stats();
    let released = |st: &Value| stat_u64(st, "tcp.buffers_released").unwrap_or(0);
    rig.check(
        released(&after) >= released(&before) + 2,
        format!(
            "the connection's buffers should have been released in both pauses: \
             before {before}\nafter {after}"
        ),
    );
}

/// A tap port runs its connections on its own runtime: when the tap goes away, they end with
/// it, and the gauges the limits read (`tcp.open`, `tcp.connecting`) come back down at once
/// rather than after the connect timeout or the connections' own end.
#[test]
fn connections_end_with_their_tap_and_give_back_their_counts() {
    let Some(rig) = rig(
        "connections_end_with_their_tap_and_give_back_their_counts",
        &["--tcp-connect-timeout", "60"],
    ) else {
        return;
    };
    const N: usize = 5;
    let mut echo = rig.tool_server(&rig.s, &["tcp-echo", SERVER, "9011"], 't', 9011);
    // One connection held open (a round, then 60 s of quiet), N connects that never complete.
    let mut held =
        BgProcess::spawn(rig.tool(&rig.g, &["echo-rounds", SERVER, "9011", "1000", "2", "60"]));
    let mut pending = BgProcess::spawn(rig.tool(
        &rig.g,
        &["connect-many", "10.201.0.5", "80", &N.to_string(), "60"],
    ));
    let counts = |st: &Value| {
        (
            stat_u64(st, "tcp.open").unwrap_or(0),
            stat_u64(st, "tcp.connecting").unwrap_or(0),
        )
    };
    let st = rig.daemon.wait_stats(
        Duration::from_secs(10),
        &format!("tcp.open >= 1 and tcp.connecting >= {N}"),
        |st| {
            let (open, connecting) = counts(st);
            open >= 1 && connecting >= N as u64
        },
    );
    note(format!("before the tap went: {:?}", counts(&st)));
    rig.g.ip_ok(&["link", "del", "tap0"]);
    let st = rig.daemon.wait_stats(
        Duration::from_secs(10),
        "tcp.open and tcp.connecting back to 0 once the tap is gone",
        |st| counts(st) == (0, 0),
    );
    let closed = stat_u64(&st, "tcp.closed").unwrap_or(0);
    rig.check(
        closed >= 1,
        format!("the held connection counts as closed: {st}"),
    );
    rig.check(
        rig.daemon.try_stats().is_ok(),
        "the daemon keeps running without its tap",
    );
    // Nothing holds the device's queues (two by default) any more: no tun fd stays open.
    let pid = rig.daemon.pid().expect("daemon pid");
    let tun_fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        std::fs::read_link(e.path())
                            .is_ok_and(|l| l == std::path::Path::new("/dev/net/tun"))
                    })
                    .count()
            })
            .unwrap_or(usize::MAX)
    };
    rig.check(
        poll_until(Duration::from_secs(10), || tun_fds() == 0),
        format!(
            "the daemon closes every queue of the tap once it is gone: {} tun fds open",
            tun_fds()
        ),
    );
    held.kill();
    pending.kill();
    echo.kill();
}

/// The fields of a /proc `stat` file after the command name (state first).
fn stat_fields(path: &std::path::Path) -> Vec<String> {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    let after = stat.rfind(')').map(|i| &stat[i + 1..]).unwrap_or("");
    after.split_whitespace().map(String::from).collect()
}

/// User + system CPU time in milliseconds from the fields of a `stat` file (10 ms ticks).
fn stat_cpu_ms(fields: &[String]) -> u64 {
    // After the comm: state is field 3, utime 14, stime 15.
    let ticks: u64 = fields
        .iter()
        .skip(11)
        .take(2)
        .map(|x| x.parse::<u64>().unwrap_or(0))
        .sum();
    // SAFETY: sysconf only reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    ticks * 1000 / hz
}

/// CPU time (user + system) of process `pid` so far, in milliseconds.
fn cpu_ms(pid: u32) -> u64 {
    stat_cpu_ms(&stat_fields(std::path::Path::new(&format!(
        "/proc/{pid}/stat"
    ))))
}

/// The `stat` fields of each thread of process `pid` named `comm`.
fn threads_named(pid: u32, comm: &str) -> Vec<Vec<String>> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|n| n.trim_end() == comm)
        })
        .map(|t| stat_fields(&t.path().join("stat")))
        .collect()
}

/// Whether the thread of process `pid` named `comm` is running or runnable (state R).
fn thread_running(pid: u32, comm: &str) -> Option<bool> {
    let threads = threads_named(pid, comm);
    let fields = threads.first()?;
    Some(fields.first().map(String::as_str) == Some("R"))
}

/// Busy polling (`--busy-poll`) keeps the tap port's thread polling while the guest talks
/// and lets it sleep once the guest is quiet: how often the tap thread is running while the
/// guest pings every 5 ms with a 10 ms limit, the daemon's CPU once nothing happens, and the
/// same with busy polling off.
#[test]
fn busy_polling_spins_while_the_guest_talks_and_sleeps_when_it_is_quiet() {
    let test = "busy_polling_spins_while_the_guest_talks_and_sleeps_when_it_is_quiet";
    for (limit, spins) in [("10000", true), ("0", false)] {
        let Some(rig) = rig(test, &["--busy-poll", limit]) else {
            return;
        };
        let pid = rig.daemon.pid().expect("daemon pid");
        let before = cpu_ms(pid);
        let t = Instant::now();
        let mut ping = BgProcess::spawn(
            rig.g
                .exec("busybox", &["ping", "-q", "-i", "0.005", "-c", "200", HOST]),
        );
        // How often the tap thread is found running or runnable (state R, which it keeps
        // while it waits for a core: unlike its CPU time this does not depend on what else
        // the machine is doing) while the pings go.
        let (mut samples, mut running) = (0u32, 0u32);
        let deadline = Instant::now() + Duration::from_secs(20);
        while ping.running() && Instant::now() < deadline {
            if let Some(r) = thread_running(pid, "tap tap0") {
                samples += 1;
                running += u32::from(r);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let out = ping.finish(Duration::from_secs(5));
        rig.check(out.success(), format!("pings answered\n{}", out.describe()));
        let (talking, secs) = (cpu_ms(pid) - before, t.elapsed().as_secs_f64());
        let share = f64::from(running) / f64::from(samples.max(1));
        note(format!(
            "--busy-poll {limit}: tap thread running in {running} of {samples} samples, \
             {talking} ms of CPU over {secs:.2} s of pings every 5 ms"
        ));
        rig.check(
            samples >= 50,
            format!("{samples} samples of the tap thread"),
        );
        if spins {
            // Polling through the 5 ms gaps: running all the time (half is the bar; a thread
            // that sleeps between pings is found running in a few samples of a hundred).
            rig.check(
                share >= 0.5,
                format!("busy polling: running in {running} of {samples} samples"),
            );
        } else {
            rig.check(
                share < 0.25,
                format!("no busy polling: running in {running} of {samples} samples"),
            );
        }
        // Quiet: within 5 s a whole second passes with (almost) no CPU used.
        let mut quiet = None;
        let deadline = Instant::now() + Duration::from_secs(5);
        while quiet.is_none() && Instant::now() < deadline {
            let c0 = cpu_ms(pid);
            std::thread::sleep(Duration::from_secs(1));
            let used = cpu_ms(pid) - c0;
            if used <= 20 {
                quiet = Some(used);
            }
        }
        rig.check(
            quiet.is_some(),
            format!(
                "--busy-poll {limit}: the daemon still uses CPU 5 s after the guest went quiet"
            ),
        );
    }
}

/// CPU time (ms) of each thread of process `pid` named `comm`, summed; None without one.
fn thread_cpu_ms(pid: u32, comm: &str) -> Option<u64> {
    let threads = threads_named(pid, comm);
    (!threads.is_empty()).then(|| threads.iter().map(|f| stat_cpu_ms(f)).sum())
}

/// The guest's tx queues on tap0 (`tx-0`, ...), as its kernel shows them.
fn guest_tx_queues(rig: &OutboundRig) -> Vec<String> {
    let out = run_with_deadline(
        rig.g.exec("ls", &["/sys/class/net/tap0/queues"]),
        Duration::from_secs(10),
    );
    out.stdout
        .split_whitespace()
        .filter(|q| q.starts_with("tx-"))
        .map(String::from)
        .collect()
}

/// `--tap-queues 2` (the default): the guest's kernel sees one queue until a connection
/// carries bulk data; then bulk connections move to the second queue's thread, whose queue
/// is attached (the guest sees two), each thread carries its share (32 connections each
/// echoing 2 MiB, checked byte for byte), and once they are over the queue is detached again.
/// With one queue there is no second thread and nothing moves.
#[test]
fn tap_queues_carry_bulk_connections_on_both_threads() {
    let test = "tap_queues_carry_bulk_connections_on_both_threads";
    for queues in [2usize, 1] {
        let Some(rig) = rig(test, &["--tap-queues", &queues.to_string()]) else {
            return;
        };
        let tx = guest_tx_queues(&rig);
        rig.check(
            tx == ["tx-0"],
            format!("--tap-queues {queues}: before any bulk connection the guest sees one tx queue on tap0: {tx:?}"),
        );
        let pid = rig.daemon.pid().expect("daemon pid");
        let mut echo = rig.tool_server(&rig.s, &["tcp-echo", SERVER, "9012"], 't', 9012);
        const N: u64 = 32;
        let client = rig.tool(
            &rig.g,
            &[
                "echo-many",
                SERVER,
                "9012",
                &N.to_string(),
                "2097152",
                "100",
            ],
        );
        let running =
            std::thread::spawn(move || run_with_deadline(client, Duration::from_secs(120)));
        // While they run, the guest sees the second queue (moved connections are on it).
        let mut seen = Vec::new();
        let both = poll_until(Duration::from_secs(60), || {
            seen = guest_tx_queues(&rig);
            seen.len() == 2 || running.is_finished()
        }) && seen.len() == 2;
        let out = running.join().expect("echo-many thread");
        let v = parse_last_json(&out.stdout).filter(|_| out.success());
        if v.as_ref().is_none_or(|v| u(v, "ok") != N) {
            rig.fail(format!(
                "{N} connections each echoing 2 MiB over {queues} queue(s)\n{}\n{}",
                out.describe(),
                echo.describe()
            ));
        }
        let moved = stat_u64(&rig.daemon.stats(), "tcp.moved").unwrap_or(0);
        let first = thread_cpu_ms(pid, "tap tap0");
        let second = thread_cpu_ms(pid, "tap tap0 q1");
        note(format!(
            "{queues} queue(s): {moved} connections moved; queue threads' CPU {first:?} / {second:?} ms"
        ));
        rig.check(
            first.is_some_and(|ms| ms >= 20),
            format!("queue 0's thread carried connections: {first:?} ms"),
        );
        if queues == 2 {
            rig.check(
                both,
                format!("while bulk connections run the guest sees two tx queues: {seen:?}"),
            );
            rig.check(
                moved >= N / 4,
                format!("bulk connections moved to the second thread: {moved} of {N}"),
            );
            rig.check(
                second.is_some_and(|ms| ms >= 20),
                format!("queue 1's thread carried connections: {second:?} ms"),
            );
            let mut after = Vec::new();
            let detached = poll_until(Duration::from_secs(20), || {
                after = guest_tx_queues(&rig);
                after.len() == 1
            });
            rig.check(detached, format!("with the moved connections over, the second queue is detached again: {after:?}"));
        } else {
            rig.check(
                !both,
                format!("one queue: the guest never sees a second: {seen:?}"),
            );
            rig.check(moved == 0, format!("one queue: nothing moves ({moved})"));
            rig.check(second.is_none(), "one queue: no second queue thread");
        }
        // Whatever moved where (connections that came in on the second queue while it was
        // attached may have moved to the first), the port still carries new connections.
        echo_many_ok(
            &rig,
            "9012",
            4,
            65536,
            &format!("{queues} queue(s), after the bulk ones"),
        );
        echo.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// 8. UDP
// ---------------------------------------------------------------------------------------------

#[test]
fn udp_echo_sizes_and_flow_timeout() {
    let Some(rig) = rig("udp_echo_sizes_and_flow_timeout", &["--udp-timeout", "2"]) else {
        return;
    };
    let mut on_s = rig.tool_server(&rig.s, &["udp-echo", SERVER, "9009"], 'u', 9009);
    let mut on_d = rig.tool_server(&rig.d, &["udp-echo", "127.0.0.1", "9009"], 'u', 9009);
    let sizes = ["1", "1400", "60000", "65507"];
    for (target, bind_port, srv, peer) in [
        (SERVER, "40100", &mut on_s, VETH_D_IP),
        (HOST, "40101", &mut on_d, "127.0.0.1"),
    ] {
        let mut args = vec!["udp-echo-client", target, "9009", bind_port];
        args.extend_from_slice(&sizes);
        let (v, out) = rig.tool_json(&rig.g, &args, Duration::from_secs(60));
        let results = v
            .get("results")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let bad: Vec<&Value> = results
            .iter()
            .filter(|r| r.get("ok") != Some(&Value::Bool(true)))
            .collect();
        if results.len() != sizes.len() || !bad.is_empty() {
            rig.fail(format!(
                "UDP echo via {target}:9009 of sizes {sizes:?}: every reply must be byte-identical \
                 and come from {target}:9009; failed: {bad:?}\n{}\n{}",
                out.describe(),
                srv.describe()
            ));
        }
        let reported = |l: &Value| s(l, "peer") == peer && u(l, "len") == 60000;
        let seen = lines_once_reported(srv, reported);
        rig.check(
            seen.iter().any(reported),
            format!(
                "the echo server behind {target} should have seen the 60000-byte datagram from \
                 {peer}\n{}",
                srv.describe()
            ),
        );
    }

    // Per-flow host sockets: every datagram of the guest's flow from port 40100 left from one
    // host port; another guest flow (port 40102) leaves from another.
    let ports = |srv: &BgProcess| -> std::collections::BTreeSet<u64> {
        json_lines(&srv.stdout())
            .iter()
            .map(|l| u(l, "port"))
            .collect()
    };
    let first = ports(&on_s);
    let (v, out) = rig.tool_json(
        &rig.g,
        &["udp-echo-client", SERVER, "9009", "40102", "7"],
        Duration::from_secs(30),
    );
    let exchanged = Instant::now();
    // The server reports a datagram after echoing it: wait for its line.
    let mut both = Default::default();
    poll_until(Duration::from_secs(5), || {
        both = ports(&on_s);
        both.len() >= 2
    });
    if first.len() != 1 || both.len() != 2 || v.pointer("/results/0/ok") != Some(&Value::Bool(true))
    {
        rig.fail(format!(
            "UDP flows from guest ports 40100 and 40102 should each use one host socket: the \
             server saw source ports {first:?} for the first, {both:?} for both\n{}\n{}",
            out.describe(),
            on_s.describe()
        ));
    }

    let st = rig.daemon.stats();
    let mut problems = Vec::new();
    if stat_u64(&st, "udp.opened").is_none_or(|n| n < 3) {
        problems.push(format!("stats udp.opened should be >= 3: {st}"));
    }
    // (Only while the last flow cannot have expired yet: --udp-timeout 2.)
    if exchanged.elapsed() < Duration::from_millis(1500)
        && stat_u64(&st, "udp.open").is_none_or(|n| n < 1)
    {
        problems.push(format!(
            "stats udp.open should be >= 1 right after the exchange: {st}"
        ));
    }
    if !problems.is_empty() {
        rig.fail(problems.join("\n"));
    }
    // 1 + 1400 + 60000 + 65507 each way on two paths, plus the 7-byte flow.
    let want: u64 = 2 * (1 + 1400 + 60000 + 65507) + 7;
    for k in ["udp.bytes_from_guest", "udp.bytes_to_guest"] {
        if stat_u64(&st, k).is_none_or(|b| b < want) {
            problems.push(format!("stats {k} should be >= {want}: {st}"));
        }
    }
    if !problems.is_empty() {
        rig.fail(problems.join("\n"));
    }
    let opened = stat_u64(&st, "udp.opened").unwrap_or(0);
    rig.daemon.wait_stats(
        Duration::from_secs(15),
        "udp.open == 0 after --udp-timeout 2",
        |st| stat_u64(st, "udp.open") == Some(0),
    );

    // The same 5-tuple again, after its flow expired: a new flow, which works.
    let (v, out) = rig.tool_json(
        &rig.g,
        &["udp-echo-client", SERVER, "9009", "40100", "100"],
        Duration::from_secs(30),
    );
    let r = v.pointer("/results/0").cloned().unwrap_or_default();
    if r.get("ok") != Some(&Value::Bool(true)) {
        rig.fail(format!(
            "UDP echo on the same ports after the flow expired failed\n{}\n{}",
            out.describe(),
            on_s.describe()
        ));
    }
    let st = rig.daemon.stats();
    rig.check(
        stat_u64(&st, "udp.opened").is_some_and(|n| n > opened),
        format!("stats udp.opened should have grown past {opened} for the re-created flow: {st}"),
    );
}

/// The running kernel's version is at least MAJOR.MINOR.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (major, minor)
}

/// Datagrams the burst server sends: runs of one size (gathered into frames of several for a
/// guest whose tap takes offload), a shorter one ending a run, an empty one, and datagrams
/// too long for the MTU (fragmented).
const BURST: &[&str] = &[
    "1200x200", "1472x50", "100", "1472", "1472", "800", "800", "0", "3000", "1472x3", "20000",
    "1400x64", "65507", "1x5",
];

/// Host datagrams in bursts reach the guest's kernel whole and in order: with the tap's offload
/// (runs of one size gathered into frames of several datagrams, which the guest's kernel cuts
/// apart), with the capture on as well, and without offload (one frame each). The guest's
/// bursts reach a host server whole and in order too, runs sent out together.
#[test]
fn udp_bursts_reach_the_guest_whole_and_in_order() {
    let pcap = std::env::temp_dir().join(format!("usernet-udp-burst-{}.pcap", std::process::id()));
    let pcap_arg = pcap.to_string_lossy().into_owned();
    let variants: [(&str, Vec<&str>, bool); 3] = [
        ("offload", vec![], true),
        (
            "offload and --pcap",
            vec!["--pcap", pcap_arg.as_str()],
            true,
        ),
        ("--no-offload", vec!["--no-offload"], false),
    ];
    let count: usize = BURST
        .iter()
        .map(|p| {
            p.split_once('x')
                .map_or(1, |(_, n)| n.parse::<usize>().unwrap())
        })
        .sum();
    for (label, extra, gathers) in variants {
        let Some(rig) = rig("udp_bursts_reach_the_guest_whole_and_in_order", &extra) else {
            return;
        };
        // A burst each way: a server in D on its loopback, the client in G.
        let burst = |server: &str, port: &str, client: &str, bind: &str, who: &str| {
            let mut srv = rig.tool_server(
                &rig.d,
                &[server, "127.0.0.1", port],
                'u',
                port.parse().unwrap(),
            );
            let mut args = vec![client, HOST, port, bind];
            args.extend_from_slice(BURST);
            let (v, out) = rig.tool_json(&rig.g, &args, Duration::from_secs(60));
            if v.get("ok") != Some(&Value::Bool(true)) || u(&v, "received") != count as u64 {
                rig.fail(format!(
                    "{label}: {who} should receive all {count} datagrams of the burst in order, \
                     byte for byte: {v}\n{}\n{}",
                    out.describe(),
                    srv.describe()
                ));
            }
        };
        burst(
            "udp-burst",
            "9011",
            "udp-burst-client",
            "40200",
            "the guest",
        );
        // And the other way: runs of one size leave the host socket together (UDP_SEGMENT)
        // from the tap's thread.
        burst(
            "udp-collect",
            "9012",
            "udp-burst-send",
            "40201",
            "the host server",
        );
        let st = rig.daemon.stats();
        rig.check(
            stat_u64(&st, "udp.gathered_from_guest").is_some_and(|n| n > 0),
            format!("{label}: runs from the guest should leave gathered: {st}"),
        );
        let gathered = stat_u64(&st, "udp.gathered_to_guest").unwrap_or(0);
        let cut = stat_u64(&st, "switch.large_frames_cut").unwrap_or(u64::MAX);
        if gathers {
            rig.check(
                gathered > 0,
                format!(
                    "{label}: runs of one size should go out gathered (udp.gathered_to_guest): \
                     {st}"
                ),
            );
            // Linux 6.2 and later cut them itself (UDP GSO from the tap); before, the tap does.
            let log = std::fs::read_to_string(rig.daemon.log_path()).unwrap_or_default();
            let said = log.contains("UDP segmentation offload");
            if kernel_at_least(6, 2) {
                rig.check(
                    said && cut == 0,
                    format!(
                        "{label}: this kernel takes UDP GSO frames: the tap should say so and \
                         nothing should be cut in usernet (switch.large_frames_cut {cut})"
                    ),
                );
            } else {
                rig.check(
                    !said && cut > 0,
                    format!("{label}: a kernel before 6.2: the tap should cut them: {st}"),
                );
            }
        } else {
            rig.check(
                gathered == 0,
                format!("{label}: a tap without offload gets one frame per datagram: {st}"),
            );
        }
    }
    let _ = std::fs::remove_file(&pcap);
}

// ---------------------------------------------------------------------------------------------
// 9. ICMP echo
// ---------------------------------------------------------------------------------------------

#[test]
fn ping_answered_only_by_real_hosts() {
    let Some(rig) = rig("ping_answered_only_by_real_hosts", &[]) else {
        return;
    };
    rig.daemon.assert_ping(&rig.g, HOST, 1);

    let echos_before = snmp_counter(&rig.s, "Icmp", "InEchos").unwrap_or(0);
    let st0 = rig.daemon.try_stats();
    rig.daemon.assert_ping(&rig.g, SERVER, 2);
    let echos_after = snmp_counter(&rig.s, "Icmp", "InEchos").unwrap_or(0);
    rig.check(
        echos_after > echos_before,
        format!(
            "the ping to {SERVER} was answered but S's kernel saw no echo request \
             (Icmp InEchos {echos_before} -> {echos_after}): someone else answered"
        ),
    );
    let st1 = rig.daemon.try_stats();

    rig.daemon.assert_no_ping(&rig.g, "10.200.0.77", 1);
    rig.daemon.assert_no_ping(&rig.g, "10.201.0.5", 1);
    let st2 = rig.daemon.try_stats();
    rig.daemon.assert_no_ping(&rig.g, UNROUTED, 1);

    // The stats agree: requests were sent for all three, replies came only from 10.200.0.2.
    let (st0, st1, st2) = match (st0, st1, st2) {
        (Ok(a), Ok(b), Ok(c)) => (a, b, c),
        (a, b, c) => rig.fail(format!("stats: {a:?} / {b:?} / {c:?}")),
    };
    let g = |v: &Value, k: &str| stat_u64(v, k).unwrap_or(0);
    let problems: Vec<String> = [
        (
            g(&st1, "icmp.echo_requests") >= g(&st0, "icmp.echo_requests") + 2,
            "echo_requests +2 for the pings to 10.200.0.2",
        ),
        (
            g(&st1, "icmp.echo_replies") >= g(&st0, "icmp.echo_replies") + 2,
            "echo_replies +2 for the pings to 10.200.0.2",
        ),
        (
            g(&st2, "icmp.echo_requests") >= g(&st1, "icmp.echo_requests") + 2,
            "echo_requests +2 for the unanswered pings",
        ),
        (
            g(&st2, "icmp.echo_replies") == g(&st1, "icmp.echo_replies"),
            "no echo_replies for the unanswered pings",
        ),
    ]
    .into_iter()
    .filter(|(ok, _)| !ok)
    .map(|(_, what)| what.to_string())
    .collect();
    if !problems.is_empty() {
        rig.fail(format!(
            "icmp stats: expected {}\n--- before: {st0}\n--- after 10.200.0.2: {st1}\n--- after unanswered: {st2}",
            problems.join("; ")
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// 10. Malformed frames
// ---------------------------------------------------------------------------------------------

#[test]
fn malformed_frames_are_counted_and_dropped() {
    let Some(rig) = rig("malformed_frames_are_counted_and_dropped", &[]) else {
        return;
    };
    let text = page_text();
    let (dir, _file) = temp_file("page.txt", &text);
    let mut web = rig.httpd(&rig.s, SERVER, 8081, dir.path());
    // Anything that got through would show up at these servers.
    let mut udp = rig.tool_server(&rig.s, &["udp-echo", SERVER, "9010"], 'u', 9010);
    let mut tcp = rig.tool_server(&rig.s, &["tcp-observe", SERVER, "9010"], 't', 9010);
    let mac = rig.router_mac();
    let src = rig.lease.ip.to_string();
    assert_curl(
        &rig,
        &format!("http://{SERVER}:8081/page.txt"),
        &text,
        &mut web,
    );

    let (kinds, _) = rig.tool_json(&rig.g, &["kinds"], Duration::from_secs(10));
    let kinds: Vec<String> = kinds
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|k| k.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    assert!(!kinds.is_empty(), "nettool lists no malformation kinds");

    let mut uncounted = Vec::new();
    let mut report = Vec::new();
    for kind in &kinds {
        let before = rig.daemon.stats();
        let drops = |v: &Value| stat_drops(v).values().sum::<u64>();
        let b = drops(&before);
        rig.tool_json(
            &rig.g,
            &["craft", "tap0", &mac, &src, SERVER, "9010", kind],
            Duration::from_secs(10),
        );
        let mut after = before.clone();
        let rose = poll_until(Duration::from_secs(3), || {
            after = rig.daemon.stats();
            drops(&after) > b
        });
        let (lb, la) = (stat_leaves(&before), stat_leaves(&after));
        let deltas: Vec<String> = la
            .iter()
            .filter(|(k, v)| lb.get(*k).copied().unwrap_or(0) != **v && !k.contains("bytes"))
            .map(|(k, v)| format!("{k} +{}", v.saturating_sub(lb.get(k).copied().unwrap_or(0))))
            .collect();
        report.push(format!(
            "{kind}: {}",
            if deltas.is_empty() {
                "no counter moved".to_string()
            } else {
                deltas.join(", ")
            }
        ));
        if !rose {
            uncounted.push(kind.clone());
        }
    }
    note(format!(
        "malformed frames -> counters that moved:\n  {}",
        report.join("\n  ")
    ));

    // The daemon survived and still serves.
    let mut d = rig.daemon.pid();
    rig.check(
        d.take()
            .is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists()),
        "the daemon died on malformed frames",
    );
    assert_curl(
        &rig,
        &format!("http://{SERVER}:8081/page.txt"),
        &text,
        &mut web,
    );

    let leaked_udp = json_lines(&udp.stdout());
    let leaked_tcp = json_lines(&tcp.stdout());
    let mut problems = Vec::new();
    if !uncounted.is_empty() {
        problems.push(format!(
            "these malformed frames raised no drop counter: {uncounted:?}"
        ));
    }
    if !leaked_udp.is_empty() || !leaked_tcp.is_empty() {
        problems.push(format!(
            "malformed packets reached the server namespace: udp {leaked_udp:?} tcp {leaked_tcp:?}\n{}\n{}",
            udp.describe(),
            tcp.describe()
        ));
    }
    if !problems.is_empty() {
        rig.fail(format!(
            "{}\n--- per kind:\n  {}",
            problems.join("\n"),
            report.join("\n  ")
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// 11. --no-host-loopback
// ---------------------------------------------------------------------------------------------

#[test]
fn no_host_loopback_refuses_the_host_address() {
    let Some(rig) = rig(
        "no_host_loopback_refuses_the_host_address",
        &["--no-host-loopback"],
    ) else {
        return;
    };
    let text = page_text();
    let (dir, _file) = temp_file("page.txt", &text);
    let mut on_d = rig.httpd(&rig.d, "127.0.0.1", 8080, dir.path());
    let mut on_s = rig.httpd(&rig.s, SERVER, 8081, dir.path());
    let mut udp_d = rig.tool_server(&rig.d, &["udp-echo", "127.0.0.1", "9009"], 'u', 9009);

    let (v, out) = rig.tool_json(
        &rig.g,
        &["connect", HOST, "8080", "10"],
        Duration::from_secs(20),
    );
    let elapsed = f(&v, "elapsed");
    if s(&v, "result") != "refused" || (elapsed.is_nan() || elapsed >= 1.0) {
        rig.fail(format!(
            "with --no-host-loopback, connecting to {HOST}:8080 (a server on D's loopback) must be \
             refused at once; got {} after {elapsed:.3} s\n{}\n{}",
            s(&v, "result"),
            out.describe(),
            on_d.describe()
        ));
    }
    let (v, out) = rig.tool_json(
        &rig.g,
        &["udp-refused", HOST, "9009"],
        Duration::from_secs(20),
    );
    if s(&v, "result") != "refused" {
        rig.fail(format!(
            "with --no-host-loopback, UDP to {HOST}:9009 must get ICMP port unreachable \
             (ECONNREFUSED); got {}\n{}\n{}",
            s(&v, "result"),
            out.describe(),
            udp_d.describe()
        ));
    }
    rig.check(
        json_lines(&udp_d.stdout()).is_empty(),
        format!(
            "with --no-host-loopback a datagram still reached D's loopback\n{}",
            udp_d.describe()
        ),
    );
    // Other destinations still work.
    assert_curl(
        &rig,
        &format!("http://{SERVER}:8081/page.txt"),
        &text,
        &mut on_s,
    );
}

/// A ping longer than the MTU, which the guest's kernel sends in fragments, is answered (in
/// fragments) by the DNS address (the gateway itself) and by the host address (the host's
/// loopback), with and without offload on the tap (without it, no frame over the MTU reaches
/// the guest: a whole 3 KB answer was dropped).
#[test]
fn pings_longer_than_the_mtu_are_answered() {
    let test = "pings_longer_than_the_mtu_are_answered";
    for extra in [&["--no-offload"][..], &[][..]] {
        let Some(rig) = rig(test, extra) else {
            return;
        };
        for addr in ["192.168.5.3", HOST] {
            let out = run_with_deadline(
                rig.g.exec(
                    "busybox",
                    &["ping", "-c", "2", "-W", "3", "-s", "3000", addr],
                ),
                Duration::from_secs(20),
            );
            rig.check(
                out.success() && out.stdout.contains("3008 bytes from"),
                format!(
                    "{extra:?}: a 3000-byte ping to {addr} is answered: {}",
                    out.describe()
                ),
            );
        }
    }
}
