//! Real-VM end-to-end tests: QEMU guests (TCG, a Debian cloud kernel and a busybox initramfs)
//! attached to usernet the way each real consumer attaches them, then lifecycle cases.
//!
//! usernet runs in its own network namespace D with only `lo`; QEMU runs on the host and talks to
//! it only over unix sockets in a temp dir; every server a guest reaches (an HTTP file server,
//! stream sources and sinks) runs on D's loopback, which the guest sees as 192.168.5.2. Each
//! guest checks its lease (192.168.5.15/24, router .2, DNS .3, MTU), resolves
//! `host.lima.internal` at .3, downloads a file and checks its sha256, pings .2, and serves a page
//! with busybox httpd that the test fetches from D through a usernet port forward.
//!
//! Needs root, QEMU (qemu-system-x86 in PATH or unpacked by tests/support/fetch-qemu.sh) and a
//! cloud kernel; skipped with a SKIPPED line otherwise, a failure with USERNET_E2E=1.

mod support;

#[path = "support/guest.rs"]
mod guest;

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use guest::{sha256_repeated, Env, Scene, VmSpec, BOOT_DEADLINE};
use nix::sys::socket::{
    sendmsg, setsockopt, socketpair, sockopt, AddressFamily, ControlMessage, MsgFlags, SockFlag,
    SockType,
};

const GUEST1: &str = "192.168.5.15";
const GUEST2: &str = "192.168.5.16";
const FWD_PORT: u16 = 8080;
const POWEROFF_DEADLINE: Duration = Duration::from_secs(30);

/// The MAC of test VM `n` (Lima's 52:55:55 prefix).
fn mac(n: u8) -> String {
    format!("52:55:55:e2:e0:{n:02x}")
}

/// The checks every attachment runs at boot (all must pass; a check still being wired in usernet
/// can be moved to the second, soft list).
fn boot_checks(_env: &Env) -> (Vec<&'static str>, Vec<&'static str>) {
    (vec!["dhcp", "dns", "http", "ping", "serve"], vec![])
}

fn standard_vm(s: &Scene, name: &str, mac: &str, netdev: String) -> VmSpec {
    VmSpec::new(name, mac, netdev)
        .param("checks", "dhcp,dns,http,ping,serve")
        .param("http", s.blob_url())
        .param("sha", &s.blob_sha)
}

fn sock_str(p: &Path) -> String {
    p.display().to_string()
}

#[derive(Clone, Copy, PartialEq)]
enum Attach {
    /// `-netdev stream,server=off` to `--listen-qemu` (forward added through the API).
    StreamClient,
    /// `-netdev socket,fd=3` on a stream the test connected to `--listen-qemu`.
    SocketFdStream,
    /// `-netdev stream,server=on` with `--connect-qemu`.
    StreamServer,
    /// `-netdev dgram` to `--listen-dgram`.
    Dgram,
    /// `-netdev socket,fd=3` on a datagram socketpair whose other end went to `--listen-fd`.
    FdDgramPair,
}

/// A connected AF_UNIX SOCK_DGRAM pair, both ends with Lima's SO_SNDBUF 1 MiB / SO_RCVBUF 4 MiB.
fn dgram_socketpair() -> (OwnedFd, OwnedFd) {
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::Datagram,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .expect("socketpair");
    for fd in [&a, &b] {
        setsockopt(fd, sockopt::SndBuf, &(1 << 20)).expect("SO_SNDBUF");
        setsockopt(fd, sockopt::RcvBuf, &(4 << 20)).expect("SO_RCVBUF");
    }
    (a, b)
}

fn attachment_test(test: &str, attach: Attach) {
    let Some(env) = Env::require(test) else {
        return;
    };
    let mut s = Scene::new("qa");
    let qemu_sock = s.file("un.sock");
    let api_sock = s.file("api.sock");
    let fwd = format!("127.0.0.1:{FWD_PORT}:80");
    let m = mac(1);
    let reconnect = env
        .qemu
        .stream_reconnect_option()
        .map(|o| format!(",{o}"))
        .unwrap_or_default();
    match attach {
        Attach::StreamClient => {
            s.start_daemon(
                &[
                    "--listen-qemu",
                    &sock_str(&qemu_sock),
                    "--api",
                    &sock_str(&api_sock),
                ],
                &[qemu_sock.clone(), api_sock.clone()],
            );
            let netdev = format!(
                "stream,server=off,addr.type=unix,addr.path={}{reconnect}",
                qemu_sock.display()
            );
            let spec = standard_vm(&s, "stream-client", &m, netdev);
            s.start_vm(&env, spec);
        }
        Attach::SocketFdStream => {
            s.start_daemon(
                &["--listen-qemu", &sock_str(&qemu_sock), "-p", &fwd],
                std::slice::from_ref(&qemu_sock),
            );
            let conn = match UnixStream::connect(&qemu_sock) {
                Ok(c) => c,
                Err(e) => s.fail(format!("connect {}: {e}", qemu_sock.display())),
            };
            let spec = standard_vm(&s, "socket-fd-stream", &m, "socket,fd=3".into())
                .fd(OwnedFd::from(conn));
            s.start_vm(&env, spec);
        }
        Attach::StreamServer => {
            let listen = s.file("qemu.sock");
            let netdev = format!(
                "stream,server=on,addr.type=unix,addr.path={}",
                listen.display()
            );
            let spec = standard_vm(&s, "stream-server", &m, netdev);
            s.start_vm(&env, spec);
            let up = support::poll_until(Duration::from_secs(20), || listen.exists());
            s.check(up, format!("QEMU did not create {}", listen.display()));
            s.start_daemon(&["--connect-qemu", &sock_str(&listen), "-p", &fwd], &[]);
        }
        Attach::Dgram => {
            let ours = s.file("un.dgram");
            let theirs = s.file("vm.dgram");
            s.start_daemon(
                &["--listen-dgram", &sock_str(&ours), "-p", &fwd],
                std::slice::from_ref(&ours),
            );
            let netdev = format!(
                "dgram,local.type=unix,local.path={},remote.type=unix,remote.path={}",
                theirs.display(),
                ours.display()
            );
            let spec = standard_vm(&s, "dgram", &m, netdev);
            s.start_vm(&env, spec);
        }
        Attach::FdDgramPair => {
            let fd_sock = s.file("fd.sock");
            s.start_daemon(
                &["--listen-fd", &sock_str(&fd_sock), "-p", &fwd],
                std::slice::from_ref(&fd_sock),
            );
            let (vm_end, daemon_end) = dgram_socketpair();
            let conn = match UnixStream::connect(&fd_sock) {
                Ok(c) => c,
                Err(e) => s.fail(format!("connect {}: {e}", fd_sock.display())),
            };
            let fds = [daemon_end.as_raw_fd()];
            if let Err(e) = sendmsg::<()>(
                conn.as_raw_fd(),
                &[IoSlice::new(b"\0")],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::empty(),
                None,
            ) {
                s.fail(format!("SCM_RIGHTS to {}: {e}", fd_sock.display()));
            }
            drop(daemon_end);
            drop(conn);
            let spec = standard_vm(&s, "fd-dgram-pair", &m, "socket,fd=3".into()).fd(vm_end);
            s.start_vm(&env, spec);
        }
    }
    let (must, soft) = boot_checks(&env);
    s.expect_checks(0, &must, &soft);
    if attach == Attach::StreamClient {
        let body = format!(r#"{{"local":"127.0.0.1:{FWD_PORT}","remote":":80","protocol":"tcp"}}"#);
        let (code, text) = s.api(&api_sock, "POST", "/services/forwarder/expose", Some(&body));
        s.check(code == 200, format!("expose answered {code}: {text}"));
        let (code, leases) = s.api(&api_sock, "GET", "/services/dhcp/leases", None);
        let v: serde_json::Value = serde_json::from_str(&leases).unwrap_or_default();
        s.check(
            code == 200 && v[GUEST1].as_str() == Some(m.as_str()),
            format!("API leases: {code} {leases}, expected {GUEST1} -> {m}"),
        );
    }
    s.expect_forward(FWD_PORT, GUEST1);
    let off = s.vm(0).poweroff(POWEROFF_DEADLINE);
    s.check(off, "the guest did not power off on request");
    let st = s.daemon().stop();
    s.check(st.success(), format!("usernet exited with {st} on SIGTERM"));
}

#[test]
fn qemu_stream_client_to_listen_qemu() {
    attachment_test("qemu_stream_client_to_listen_qemu", Attach::StreamClient);
}

#[test]
fn qemu_socket_fd_stream_to_listen_qemu() {
    attachment_test(
        "qemu_socket_fd_stream_to_listen_qemu",
        Attach::SocketFdStream,
    );
}

#[test]
fn qemu_stream_server_with_connect_qemu() {
    attachment_test("qemu_stream_server_with_connect_qemu", Attach::StreamServer);
}

#[test]
fn qemu_dgram_to_listen_dgram() {
    attachment_test("qemu_dgram_to_listen_dgram", Attach::Dgram);
}

#[test]
fn qemu_socket_fd_dgram_pair_via_listen_fd() {
    attachment_test(
        "qemu_socket_fd_dgram_pair_via_listen_fd",
        Attach::FdDgramPair,
    );
}

// ---------------------------------------------------------------------------------------------
// Lifecycle
// ---------------------------------------------------------------------------------------------

fn listen_qemu_scene(s: &mut Scene, extra: &[&str]) -> (String, std::path::PathBuf) {
    let qemu_sock = s.file("un.sock");
    let api_sock = s.file("api.sock");
    let mut args = vec![
        "--listen-qemu".to_string(),
        sock_str(&qemu_sock),
        "--api".to_string(),
        sock_str(&api_sock),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    s.start_daemon(&args, &[qemu_sock.clone(), api_sock.clone()]);
    (
        format!(
            "stream,server=off,addr.type=unix,addr.path={}",
            qemu_sock.display()
        ),
        api_sock,
    )
}

fn lease_ip(s: &Scene, i: usize) -> String {
    s.vms[i]
        .result("dhcp")
        .and_then(|r| {
            r.detail
                .split_whitespace()
                .find_map(|w| w.strip_prefix("ip=").map(str::to_string))
        })
        .unwrap_or_default()
}

#[test]
fn two_vms_on_one_listen_qemu_reach_each_other() {
    let Some(env) = Env::require("two_vms_on_one_listen_qemu_reach_each_other") else {
        return;
    };
    let mut s = Scene::new("q2");
    let (netdev, api) = listen_qemu_scene(&mut s, &[]);
    for (n, name) in [(1u8, "vm-a"), (2, "vm-b")] {
        let spec = VmSpec::new(name, &mac(n), netdev.clone())
            .param("checks", "dhcp,serve,ping,peer")
            .param("ip", "any");
        s.start_vm(&env, spec);
    }
    s.expect_checks(0, &["dhcp", "serve", "ping", "peer"], &[]);
    s.expect_checks(1, &["dhcp", "serve", "ping", "peer"], &[]);
    let (a, b) = (lease_ip(&s, 0), lease_ip(&s, 1));
    let mut got = [a.clone(), b.clone()];
    got.sort();
    s.check(
        got == [GUEST1.to_string(), GUEST2.to_string()],
        format!("the two VMs got {a} and {b}, expected {GUEST1} and {GUEST2}"),
    );
    let (code, leases) = s.api(&api, "GET", "/services/dhcp/leases", None);
    let v: serde_json::Value = serde_json::from_str(&leases).unwrap_or_default();
    s.check(
        code == 200
            && v[&a].as_str() == Some(mac(1).as_str())
            && v[&b].as_str() == Some(mac(2).as_str()),
        format!(
            "API leases {code} {leases}: expected {a} -> {}, {b} -> {}",
            mac(1),
            mac(2)
        ),
    );
    // A forward to each guest by address, as Lima's hostagent adds them.
    for (port, ip) in [(8081u16, GUEST1), (8082, GUEST2)] {
        let body = format!(r#"{{"local":"127.0.0.1:{port}","remote":"{ip}:80","protocol":"tcp"}}"#);
        let (code, text) = s.api(&api, "POST", "/services/forwarder/expose", Some(&body));
        s.check(
            code == 200,
            format!("expose {port} -> {ip}:80 answered {code}: {text}"),
        );
        s.expect_forward(port, ip);
    }
    for i in 0..2 {
        let off = s.vm(i).poweroff(POWEROFF_DEADLINE);
        s.check(off, "a guest did not power off on request");
    }
}

#[test]
fn vm_booted_again_with_the_same_mac_gets_the_same_address() {
    let Some(env) = Env::require("vm_booted_again_with_the_same_mac_gets_the_same_address") else {
        return;
    };
    let mut s = Scene::new("qr");
    let (netdev, _api) = listen_qemu_scene(&mut s, &[]);
    // Each boot checks its lease and powers off (no `serve`, so the guest does not wait).
    let boot = |name: &str, n: u8, ip: &str| {
        VmSpec::new(name, &mac(n), netdev.clone())
            .param("checks", "dhcp,ping")
            .param("ip", ip)
    };
    let a1 = s.start_vm(&env, boot("a-first", 1, GUEST1));
    s.expect_checks(a1, &["dhcp", "ping"], &[]);
    let off = s.vm(a1).wait_exit(POWEROFF_DEADLINE);
    s.check(off, "the first boot of VM a did not power off");
    // Another VM now gets the next address, while a booted again gets its old one.
    let b = s.start_vm(&env, boot("b", 2, GUEST2));
    let a2 = s.start_vm(&env, boot("a-again", 1, GUEST1));
    s.expect_checks(b, &["dhcp", "ping"], &[]);
    s.expect_checks(a2, &["dhcp", "ping"], &[]);
    for i in [b, a2] {
        let off = s.vm(i).wait_exit(POWEROFF_DEADLINE);
        s.check(off, "a guest did not power off after its checks");
    }
}

/// After the boot checks: restart usernet, then the guest pings, downloads, resolves, renews its lease
/// (same address, kept in --lease-file) and the port forward works again.
fn restart_under_vm(s: &mut Scene, vm: usize) {
    s.expect_forward(FWD_PORT, GUEST1);
    s.daemon().restart();
    if let Err(e) = s.vm(vm).send("run r2 ping http dns renew") {
        s.fail(e);
    }
    s.wait_result(vm, "r2.done", BOOT_DEADLINE);
    let results = s.vms[vm].results();
    let bad: Vec<String> = ["r2.ping", "r2.http", "r2.dns", "r2.dhcp"]
        .iter()
        .filter_map(|n| match results.get(*n) {
            Some(r) if r.ok => None,
            Some(r) => Some(format!("{n}: {} {}", r.status, r.detail)),
            None => Some(format!("{n}: no result")),
        })
        .collect();
    if !bad.is_empty() {
        s.fail(format!(
            "after restarting usernet under the running VM:\n  {}",
            bad.join("\n  ")
        ));
    }
    s.expect_forward(FWD_PORT, GUEST1);
    let off = s.vm(vm).poweroff(POWEROFF_DEADLINE);
    s.check(off, "the guest did not power off on request");
}

#[test]
fn usernet_restarted_under_a_running_vm_connect_qemu() {
    let Some(env) = Env::require("usernet_restarted_under_a_running_vm_connect_qemu") else {
        return;
    };
    let mut s = Scene::new("qx");
    let listen = s.file("qemu.sock");
    let leases = s.file("leases.json");
    let netdev = format!(
        "stream,server=on,addr.type=unix,addr.path={}",
        listen.display()
    );
    let spec = standard_vm(&s, "restart-server", &mac(1), netdev);
    let vm = s.start_vm(&env, spec);
    let up = support::poll_until(Duration::from_secs(20), || listen.exists());
    s.check(up, format!("QEMU did not create {}", listen.display()));
    let fwd = format!("127.0.0.1:{FWD_PORT}:80");
    s.start_daemon(
        &[
            "--connect-qemu",
            &sock_str(&listen),
            "-p",
            &fwd,
            "--lease-file",
            &sock_str(&leases),
        ],
        &[],
    );
    let (must, soft) = boot_checks(&env);
    s.expect_checks(vm, &must, &soft);
    restart_under_vm(&mut s, vm);
}

#[test]
fn usernet_restarted_under_a_running_vm_listen_qemu() {
    let test = "usernet_restarted_under_a_running_vm_listen_qemu";
    let Some(env) = Env::require(test) else {
        return;
    };
    let Some(reconnect) = env.qemu.stream_reconnect_option() else {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: {test}: QEMU {} ({}) has no -netdev stream reconnect (needs 8.0+)",
            env.qemu.version_string(),
            env.qemu.version_line
        );
        return;
    };
    let mut s = Scene::new("ql");
    let leases = s.file("leases.json");
    let fwd = format!("127.0.0.1:{FWD_PORT}:80");
    let (netdev, _api) =
        listen_qemu_scene(&mut s, &["-p", &fwd, "--lease-file", &sock_str(&leases)]);
    let spec = standard_vm(
        &s,
        "restart-client",
        &mac(1),
        format!("{netdev},{reconnect}"),
    );
    let vm = s.start_vm(&env, spec);
    let (must, soft) = boot_checks(&env);
    s.expect_checks(vm, &must, &soft);
    restart_under_vm(&mut s, vm);
}

/// The largest original frame length in a pcap file (QEMU's filter-dump).
/// The sha256 of the first `n` bytes of nettool's test stream (what `tcp-source` sends).
fn nettool_sha(n: usize) -> String {
    let code = format!(
        "import sys; sys.path.insert(0, {:?}); import nettool; print(nettool.gen_sha({n}))",
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support")
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &code])
        .output()
        .expect("python3 gen_sha");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn max_frame_len(pcap: &Path) -> u32 {
    let data = std::fs::read(pcap).unwrap_or_default();
    if data.len() < 24 {
        return 0;
    }
    let le = data[0..4] == [0xd4, 0xc3, 0xb2, 0xa1];
    let rd = |b: &[u8]| {
        let a = [b[0], b[1], b[2], b[3]];
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let (mut off, mut max) = (24usize, 0u32);
    while off + 16 <= data.len() {
        let incl = rd(&data[off + 8..]) as usize;
        max = max.max(rd(&data[off + 12..]));
        off += 16 + incl;
    }
    max
}

#[test]
fn mtu_65520_is_applied_and_256_mib_move_both_ways() {
    let Some(env) = Env::require("mtu_65520_is_applied_and_256_mib_move_both_ways") else {
        return;
    };
    const BIG: usize = 256 << 20;
    let mut s = Scene::new("qm");
    let (netdev, _api) = listen_qemu_scene(&mut s, &["--mtu", "65520"]);
    let big = BIG.to_string();
    s.nettool_server(&["tcp-source", "127.0.0.1", "9002", &big], 9002);
    s.nettool_server(&["tcp-sink", "127.0.0.1", "9001"], 9001);
    let down_sha = nettool_sha(BIG);
    let n = BIG / guest::BLOB_SIZE;
    let up_sha = sha256_repeated(&s.file("www/blob"), n);
    let spec = VmSpec::new("mtu", &mac(1), netdev)
        .param("checks", "dhcp,http,ping,bigdown,bigup")
        .param("mtu", 65520)
        .param("http", s.blob_url())
        .param("sha", &s.blob_sha)
        .param("bigdown", "192.168.5.2:9002")
        .param("bigdownsha", &down_sha)
        .param("bigup", "192.168.5.2:9001")
        .param("bigupn", n)
        .param("bigupsha", &up_sha);
    let vm = s.start_vm(&env, spec);
    s.wait_result(vm, "done", Duration::from_secs(400));
    s.expect_checks(vm, &["dhcp", "http", "ping", "bigdown", "bigup"], &[]);
    // Both servers saw the whole stream.
    let source = s.servers[1].stdout();
    let sink = s.servers[2].stdout();
    let sent_all = support::json_lines(&source)
        .iter()
        .any(|v| v["sent"].as_u64() == Some(BIG as u64));
    let got_all = support::json_lines(&sink).iter().any(|v| {
        v["got"].as_u64() == Some(BIG as u64) && v["sha"].as_str() == Some(up_sha.as_str())
    });
    s.check(
        sent_all && got_all,
        format!("servers: source {source:?}, sink {sink:?}"),
    );
    let _ = s.vm(vm).wait_exit(POWEROFF_DEADLINE);
    let biggest = max_frame_len(&s.vms[vm].dir().join("guest.pcap"));
    s.check(
        biggest > 1514,
        format!("the largest frame QEMU saw was {biggest} bytes: the 65520 MTU was not used"),
    );
    for (what, r) in [
        ("down", s.vms[vm].result("bigdown")),
        ("up", s.vms[vm].result("bigup")),
    ] {
        if let Some(r) = r {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "256 MiB {what}: {}", r.detail);
        }
    }
}

/// A namespace guest on a tap (segmentation offload: it sends TCP in segments of up to
/// 64 KiB) and a QEMU guest on a stream socket (no offload) on one daemon: the switch cuts the
/// tap guest's large segments for the VM, and a 32 MiB stream each way arrives whole.
#[test]
fn tap_guest_large_segments_reach_a_vm_cut_to_its_mtu() {
    let Some(env) = Env::require("tap_guest_large_segments_reach_a_vm_cut_to_its_mtu") else {
        return;
    };
    const BIG: usize = 32 << 20;
    const TAP_GUEST: &str = "192.168.5.30";
    let mut s = Scene::new("qt");
    let t = support::Netns::new("qt-g");
    let tap_path = t.path();
    let (netdev, api) = listen_qemu_scene(&mut s, &["--tap-netns", &tap_path]);
    let up = support::poll_until(Duration::from_secs(10), || t.link_is_up("tap0"));
    s.check(up, format!("tap0 in {} did not come up", t.name()));
    t.ip_ok(&["addr", "add", &format!("{TAP_GUEST}/24"), "dev", "tap0"]);
    let big = BIG.to_string();
    let tool = support::nettool_path();
    let mut servers = Vec::new();
    for (args, port) in [
        (vec!["tcp-source", "0.0.0.0", "9002", big.as_str()], 9002u16),
        (vec!["tcp-sink", "0.0.0.0", "9001"], 9001),
    ] {
        let mut full = vec!["-u", tool.as_str()];
        full.extend(args);
        servers.push(support::BgProcess::spawn(t.exec("python3", &full)));
        let ok = support::poll_until(Duration::from_secs(15), || {
            support::listening(&t, 't', port)
        });
        s.check(
            ok,
            format!("nettool server on {TAP_GUEST}:{port} did not listen"),
        );
    }
    let down_sha = nettool_sha(BIG);
    let n = BIG / guest::BLOB_SIZE;
    let up_sha = sha256_repeated(&s.file("www/blob"), n);
    let spec = VmSpec::new("mixed", &mac(1), netdev)
        .param("checks", "dhcp,http,bigdown,bigup")
        .param("http", s.blob_url())
        .param("sha", &s.blob_sha)
        .param("bigdown", format!("{TAP_GUEST}:9002"))
        .param("bigdownsha", &down_sha)
        .param("bigup", format!("{TAP_GUEST}:9001"))
        .param("bigupn", n)
        .param("bigupsha", &up_sha);
    let vm = s.start_vm(&env, spec);
    s.wait_result(vm, "done", Duration::from_secs(300));
    s.expect_checks(vm, &["dhcp", "http", "bigdown", "bigup"], &[]);
    let (code, text) = s.api(&api, "GET", "/stats", None);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let cut = v["usernet"]["switch"]["large_frames_cut"]
        .as_u64()
        .unwrap_or(0);
    s.check(
        code == 200 && cut > 0,
        format!("switch.large_frames_cut should be > 0 (the tap guest's segments cut for the VM): {text}"),
    );
    let _ = s.vm(vm).wait_exit(POWEROFF_DEADLINE);
    let biggest = max_frame_len(&s.vms[vm].dir().join("guest.pcap"));
    s.check(
        biggest > 0 && biggest <= 1514,
        format!(
            "the VM's largest frame was {biggest} bytes: expected 1..=1514 on its 1500-byte link"
        ),
    );
    drop(servers);
}
