//! End-to-end tests of the control plane, as a user drives it: the gvproxy-compatible HTTP API
//! on its unix socket (curl --unix-socket against the real daemon), port forwards into the guest
//! added through the API and with `-p`, `wait_port`, the drop-in command lines of Lima
//! (`usernet lima ...`) and gvproxy (`usernet gvproxy ...` and a binary called `gvproxy`), the
//! pcap file, `--pid-file`, `--ready-fd`, `--lease-file` and a clean SIGTERM.
//!
//! The daemon runs in its own namespace D (only `lo`); guests are namespaces attached either by
//! `--tap-netns` or, in the drop-in modes, by nettool's `tap-bridge` over the QEMU stream socket.
//! Host ports of forwards live in D's loopback, so clients for them run in D. Traffic goes only
//! to loopback and to the test's own namespaces. Without root and the tools the tests print
//! `SKIPPED:` unless `USERNET_E2E=1`.

mod support;

use std::fs;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

const TOOLS: &[&str] = &["busybox", "python3", "curl", "ss"];
const GUEST: &str = "192.168.5.15";
const PAGE: &str = "usernet control e2e: served from the guest namespace\n";

/// What the failure of a check needs: the daemon's log. Implemented by the rig's `Daemon` and by
/// `Proc` (a daemon started by hand here, for the drop-in modes and --ready-fd).
trait Ctl {
    fn fail_msg(&self, msg: String) -> !;

    #[track_caller]
    fn check_that(&self, cond: bool, msg: impl std::fmt::Display) {
        if !cond {
            self.fail_msg(msg.to_string());
        }
    }
}

impl Ctl for Daemon {
    fn fail_msg(&self, msg: String) -> ! {
        self.fail(msg)
    }
}

// ---------------------------------------------------------------------------------------------
// A daemon started by hand
// ---------------------------------------------------------------------------------------------

/// `ip netns exec D PROGRAM ARGS...` with stdout/stderr in a file, optionally an inherited fd 3
/// and a separate `--log-file`; killed on drop.
struct Proc {
    what: String,
    child: Option<Child>,
    out: PathBuf,
    log_file: Option<PathBuf>,
    dir: Option<tempfile::TempDir>,
}

impl Proc {
    fn spawn(
        ns: &Netns,
        program: &Path,
        args: &[String],
        log_file: Option<PathBuf>,
        fd3: Option<OwnedFd>,
        debug: bool,
    ) -> Proc {
        let dir = tempfile::Builder::new()
            .prefix("usernet-ctl-")
            .tempdir()
            .expect("temp dir for the daemon output");
        let out = dir.path().join("daemon.out");
        let f = fs::File::create(&out).expect("daemon output file");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns.name()]);
        cmd.arg(program);
        cmd.args(args);
        if debug && std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "debug");
        }
        if !debug {
            cmd.env_remove("RUST_LOG");
        }
        cmd.stdin(Stdio::null())
            .stdout(f.try_clone().expect("clone output file"))
            .stderr(f);
        if let Some(fd) = &fd3 {
            let raw = fd.as_raw_fd();
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if raw == 3 {
                        let fl = libc::fcntl(3, libc::F_GETFD);
                        if fl < 0 || libc::fcntl(3, libc::F_SETFD, fl & !libc::FD_CLOEXEC) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    } else if libc::dup2(raw, 3) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let what = format!(
            "ip netns exec {} {} {}",
            ns.name(),
            program.display(),
            args.join(" ")
        );
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn `{what}`: {e}"));
        // The daemon has its copy; ours must go so EOF means the daemon closed it or died.
        drop(fd3);
        Proc {
            what,
            child: Some(child),
            out,
            log_file,
            dir: Some(dir),
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    fn tail(path: &Path) -> String {
        let text = fs::read_to_string(path).unwrap_or_else(|e| format!("(unreadable: {e})"));
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(80)..].join("\n")
    }

    /// SIGTERM, then the exit status within STOP_DEADLINE (killed and failed otherwise).
    #[track_caller]
    fn stop(&mut self) -> (ExitStatus, Duration) {
        let pid = self.pid();
        if let Some(st) = self.exit_status() {
            self.fail_msg(format!("stop(): the daemon had already exited with {st}"));
        }
        let t0 = Instant::now();
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let mut status = None;
        poll_until(STOP_DEADLINE, || {
            status = self.exit_status();
            status.is_some()
        });
        match status {
            Some(st) => {
                self.child = None;
                (st, t0.elapsed())
            }
            None => {
                if let Some(mut c) = self.child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                self.fail_msg(format!(
                    "the daemon did not exit within {STOP_DEADLINE:?} of SIGTERM (killed it)"
                ))
            }
        }
    }
}

impl Ctl for Proc {
    fn fail_msg(&self, msg: String) -> ! {
        let mut s = format!(
            "{msg}\n--- daemon `{}`\n--- daemon stdout/stderr tail ({}):\n{}",
            self.what,
            self.out.display(),
            Proc::tail(&self.out)
        );
        if let Some(l) = &self.log_file {
            s.push_str(&format!(
                "\n--- daemon --log-file tail ({}):\n{}",
                l.display(),
                Proc::tail(l)
            ));
        }
        panic!("{s}\n--- end of daemon output");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            if let Some(d) = self.dir.take() {
                eprintln!("daemon output kept at {}", d.keep().display());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn skip(test: &str, extra: &[&str]) -> bool {
    let tools: Vec<&str> = TOOLS.iter().chain(extra).copied().collect();
    !require_root_and_tools(test, &tools)
}

fn quiet_guest(g: &Netns) {
    ns_sysctl(g, "net.ipv6.conf.all.disable_ipv6", "1");
    ns_sysctl(g, "net.ipv6.conf.default.disable_ipv6", "1");
}

fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("usernet-ctl-")
        .tempdir()
        .expect("temp dir")
}

fn p(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// `python3 -u nettool.py args...` in `ns`.
fn tool(ns: &Netns, args: &[&str]) -> Command {
    let t = nettool_path();
    let mut full = vec!["-u", t.as_str()];
    full.extend_from_slice(args);
    ns.exec("python3", &full)
}

/// One HTTP exchange over the API socket, made by curl.
struct Reply {
    status: u16,
    body: String,
    elapsed: Duration,
    curl: RunOutput,
}

impl Reply {
    fn describe(&self) -> String {
        format!(
            "HTTP {} after {:?}, body {:?}\n{}",
            self.status,
            self.elapsed,
            self.body,
            self.curl.describe()
        )
    }

    #[track_caller]
    fn json(&self, ctl: &impl Ctl) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            ctl.fail_msg(format!(
                "the API answer is not JSON ({e})\n{}",
                self.describe()
            ))
        })
    }
}

/// `curl --unix-socket SOCK -X METHOD [--data-binary BODY] http://usernet/PATH` (run in the root
/// namespace: a pathname unix socket is not namespaced).
fn api(sock: &Path, method: &str, path: &str, body: Option<&str>, max: Duration) -> Reply {
    let mut c = Command::new("curl");
    let max_s = format!("{}", max.as_secs().max(1));
    c.args(["-sS", "--max-time", &max_s, "--unix-socket"]);
    c.arg(sock);
    c.args(["-X", method, "-w", "\n%{http_code}"]);
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    c.arg(format!("http://usernet{path}"));
    let out = run_with_deadline(c, max + Duration::from_secs(5));
    let (body, code) = out
        .stdout
        .rsplit_once('\n')
        .map(|(b, c)| (b.to_string(), c.trim().parse().unwrap_or(0)))
        .unwrap_or((out.stdout.clone(), 0));
    Reply {
        status: code,
        body,
        elapsed: out.elapsed,
        curl: out,
    }
}

const API_MAX: Duration = Duration::from_secs(10);

fn get(sock: &Path, path: &str) -> Reply {
    api(sock, "GET", path, None, API_MAX)
}

fn post(sock: &Path, path: &str, body: &str) -> Reply {
    api(sock, "POST", path, Some(body), API_MAX)
}

/// Asserts the status; for errors also that the body is one line with a reason in it.
#[track_caller]
fn expect_status(ctl: &impl Ctl, what: &str, r: &Reply, want: u16) {
    ctl.check_that(
        r.status == want,
        format!("{what}: expected HTTP {want}\n{}", r.describe()),
    );
    if want >= 400 {
        let b = r.body.trim_end_matches('\n');
        ctl.check_that(
            !b.trim().is_empty() && !b.contains('\n'),
            format!(
                "{what}: an error must carry a one-line reason\n{}",
                r.describe()
            ),
        );
    }
}

/// Waits until `path` exists and is a unix socket.
#[track_caller]
fn wait_socket(ctl: &impl Ctl, path: &Path, what: &str) {
    let ok = poll_until(Duration::from_secs(10), || {
        fs::symlink_metadata(path)
            .map(|m| m.file_type().is_socket())
            .unwrap_or(false)
    });
    ctl.check_that(
        ok,
        format!("{what} socket {} did not appear", path.display()),
    );
}

/// Starts a server in `ns` and waits until it listens on `port` (`proto` 't' or 'u').
#[track_caller]
fn server(ctl: &impl Ctl, ns: &Netns, cmd: Command, proto: char, port: u16) -> BgProcess {
    let mut bg = BgProcess::spawn(cmd);
    let mut exited = false;
    let ok = poll_until(Duration::from_secs(10), || {
        if !bg.running() {
            exited = true;
            return true;
        }
        listening(ns, proto, port)
    });
    if exited || !ok {
        let desc = bg.describe();
        ctl.fail_msg(format!(
            "server in {} on {port}/{proto} did not come up\n{desc}",
            ns.name()
        ));
    }
    bg
}

/// busybox httpd serving `dir` on BIND:PORT in `ns`.
#[track_caller]
fn httpd(ctl: &impl Ctl, ns: &Netns, bind: &str, port: u16, dir: &Path) -> BgProcess {
    let addr = format!("{bind}:{port}");
    let cmd = ns.exec(
        "busybox",
        &["httpd", "-f", "-vv", "-p", addr.as_str(), "-h", &p(dir)],
    );
    server(ctl, ns, cmd, 't', port)
}

/// The guest side of a QEMU stream transport: nettool's tap-bridge in `g`, creating tap0
/// (optionally with MAC) and relaying it to `sock`; waits until it relays and tap0 is up.
#[track_caller]
fn bridge(ctl: &impl Ctl, g: &Netns, sock: &Path, mac: Option<&str>) -> BgProcess {
    let sock_s = p(sock);
    let mut args = vec!["tap-bridge", "tap0", sock_s.as_str()];
    if let Some(m) = mac {
        args.push(m);
    }
    let mut bg = BgProcess::spawn(tool(g, &args));
    let mut exited = false;
    let ok = poll_until(Duration::from_secs(10), || {
        if !bg.running() {
            exited = true;
            return true;
        }
        bg.stdout().contains("\"ready\"") && g.link_is_up("tap0")
    });
    if exited || !ok {
        let d = bg.describe();
        ctl.fail_msg(format!("tap-bridge in {} did not come up\n{d}", g.name()));
    }
    bg
}

/// udhcpc on tap0 in `g`, failing with the daemon's log (and the bridge's account).
#[track_caller]
fn lease(ctl: &impl Ctl, g: &Netns, bridge: Option<&mut BgProcess>) -> LeaseInfo {
    match try_udhcpc(g, "tap0", &[]) {
        Ok(l) => l,
        Err(e) => {
            let b = bridge.map(|b| b.describe()).unwrap_or_default();
            ctl.fail_msg(format!("{e}\n{b}"))
        }
    }
}

#[track_caller]
fn check_lease(ctl: &impl Ctl, l: &LeaseInfo, ip: &str, router: &str, dns: &str, mtu: Option<u16>) {
    let ctx = &l.client_output;
    ctl.check_that(
        l.ip == ip4(ip) && l.prefix == 24,
        format!("leased {}/{}, expected {ip}/24\n{ctx}", l.ip, l.prefix),
    );
    ctl.check_that(
        l.router == Some(ip4(router)),
        format!("router {:?}, expected {router}\n{ctx}", l.router),
    );
    ctl.check_that(
        l.dns == vec![ip4(dns)],
        format!("dns {:?}, expected [{dns}]\n{ctx}", l.dns),
    );
    if let Some(m) = mtu {
        ctl.check_that(
            l.mtu == Some(m),
            format!("mtu {:?}, expected {m}\n{ctx}", l.mtu),
        );
    }
}

/// The leases answer must be exactly `{ip: mac}`.
#[track_caller]
fn check_leases(ctl: &impl Ctl, sock: &Path, path: &str, ip: &str, mac: &str) {
    let r = get(sock, path);
    expect_status(ctl, path, &r, 200);
    let v = r.json(ctl);
    ctl.check_that(
        v == json!({ ip: mac }),
        format!("GET {path}: expected {{{ip:?}: {mac:?}}}\n{}", r.describe()),
    );
}

/// Whether a TCP connect from `ns` to ADDR:PORT is refused (nothing listens any more).
fn connect_result(ns: &Netns, host: &str, port: u16) -> String {
    let port_s = port.to_string();
    let out = run_with_deadline(
        tool(ns, &["connect", host, &port_s, "3"]),
        Duration::from_secs(10),
    );
    parse_last_json(&out.stdout)
        .and_then(|v| v.get("result").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| format!("no result: {}", out.describe()))
}

/// curl from `ns`, returning the body (and the account).
fn curl_in(ns: &Netns, url: &str) -> RunOutput {
    run_with_deadline(
        ns.exec("curl", &["-sS", "--max-time", "10", url]),
        Duration::from_secs(20),
    )
}

#[track_caller]
fn assert_curl(ctl: &impl Ctl, ns: &Netns, url: &str, want: &str, srv: &mut BgProcess) {
    let out = curl_in(ns, url);
    if !out.success() || out.stdout != want {
        let d = srv.describe();
        ctl.fail_msg(format!(
            "curl {url} in {} should fetch {want:?}\n{}\n{d}",
            ns.name(),
            out.describe()
        ));
    }
}

/// UDP datagrams of these sizes from `ns` to HOST:PORT must come back identical.
#[track_caller]
fn assert_udp_echo(ctl: &impl Ctl, ns: &Netns, host: &str, port: u16, srv: &mut BgProcess) {
    let port_s = port.to_string();
    let out = run_with_deadline(
        tool(
            ns,
            &["udp-echo-client", host, &port_s, "0", "1", "100", "1400"],
        ),
        Duration::from_secs(30),
    );
    let ok = parse_last_json(&out.stdout)
        .and_then(|v| v.get("results").and_then(Value::as_array).cloned())
        .map(|rs| rs.len() == 3 && rs.iter().all(|r| r["ok"] == json!(true)))
        .unwrap_or(false);
    if !ok {
        let d = srv.describe();
        ctl.fail_msg(format!(
            "UDP echo through {host}:{port} from {}\n{}\n{d}",
            ns.name(),
            out.describe()
        ));
    }
}

fn page_dir() -> tempfile::TempDir {
    let (dir, _) = temp_file("page.txt", PAGE);
    dir
}

// ---------------------------------------------------------------------------------------------
// 1. The API, every path, good and bad bodies
// ---------------------------------------------------------------------------------------------

#[test]
fn api_every_path_with_good_and_bad_requests() {
    if skip("api_every_path_with_good_and_bad_requests", &[]) {
        return;
    }
    let d = Netns::new("d");
    let g = Netns::new("g");
    quiet_guest(&g);
    let dir = tmpdir();
    let sock = dir.path().join("api.sock");
    let daemon = Daemon::start_tap(&d, &g, &["--api", &p(&sock)]);
    wait_socket(&daemon, &sock, "--api");
    let l = daemon.udhcpc(&g, "tap0", &[]);
    check_lease(&daemon, &l, GUEST, "192.168.5.2", "192.168.5.3", Some(1500));

    // The socket: a unix socket, mode 0600.
    let meta = fs::symlink_metadata(&sock).expect("api socket metadata");
    daemon.check_that(
        meta.file_type().is_socket() && meta.permissions().mode() & 0o777 == 0o600,
        format!(
            "the api socket must be a socket with mode 0600, is {:o}",
            meta.permissions().mode()
        ),
    );

    // Leases: the guest's real MAC, on both paths.
    let mac = g.link_mac("tap0").expect("tap0 MAC in the guest");
    check_leases(&daemon, &sock, "/services/dhcp/leases", GUEST, &mac);
    check_leases(&daemon, &sock, "/leases", GUEST, &mac);

    // Forwarder: empty at first; expose, list, bad bodies, unexpose.
    let r = get(&sock, "/services/forwarder/all");
    expect_status(&daemon, "forwarder/all (empty)", &r, 200);
    daemon.check_that(
        r.json(&daemon) == json!([]),
        format!("no forwards yet\n{}", r.describe()),
    );

    let good = r#"{"local":"127.0.0.1:18080","remote":":80","protocol":"tcp"}"#;
    let r = post(&sock, "/services/forwarder/expose", good);
    expect_status(&daemon, "expose tcp", &r, 200);
    let good_udp =
        format!(r#"{{"local":"127.0.0.1:15353","remote":"{GUEST}:5353","protocol":"udp"}}"#);
    let r = post(&sock, "/services/forwarder/expose", &good_udp);
    expect_status(&daemon, "expose udp", &r, 200);
    let r = get(&sock, "/services/forwarder/all");
    expect_status(&daemon, "forwarder/all", &r, 200);
    let want = json!([
        {"local": "127.0.0.1:15353", "remote": format!("{GUEST}:5353"), "protocol": "udp"},
        {"local": "127.0.0.1:18080", "remote": ":80", "protocol": "tcp"},
    ]);
    daemon.check_that(
        r.json(&daemon) == want,
        format!("forwarder/all: expected {want}\n{}", r.describe()),
    );
    daemon.check_that(
        listening(&d, 't', 18080),
        "exposed 127.0.0.1:18080/tcp is not listening in D",
    );
    daemon.check_that(
        listening(&d, 'u', 15353),
        "exposed 127.0.0.1:15353/udp is not bound in D",
    );

    // The same forward again: refused (it exists), like gvproxy.
    let r = post(&sock, "/services/forwarder/expose", good);
    daemon.check_that(
        r.status >= 400,
        format!("exposing the same local twice must fail\n{}", r.describe()),
    );

    let bad_expose: &[(&str, &str, &str)] = &[
        ("not JSON", "{local: nonsense", "json"),
        ("empty body", "", "empty"),
        ("a JSON array", "[1,2]", "object"),
        (
            "unknown protocol",
            r#"{"local":"127.0.0.1:18081","remote":":80","protocol":"sctp"}"#,
            "sctp",
        ),
        (
            "bad local",
            r#"{"local":"localhost-ish","remote":":80","protocol":"tcp"}"#,
            "local",
        ),
        (
            "local port 0",
            r#"{"local":"127.0.0.1:0","remote":":80","protocol":"tcp"}"#,
            "port 0",
        ),
        (
            "bad remote",
            r#"{"local":"127.0.0.1:18082","remote":"guest:eighty","protocol":"tcp"}"#,
            "remote",
        ),
        (
            "missing remote",
            r#"{"local":"127.0.0.1:18083","protocol":"tcp"}"#,
            "remote",
        ),
        (
            "IPv6 remote",
            r#"{"local":"127.0.0.1:18084","remote":"[::1]:80","protocol":"tcp"}"#,
            "remote",
        ),
        (
            "local of the wrong type",
            r#"{"local":18085,"remote":":80","protocol":"tcp"}"#,
            "local",
        ),
    ];
    for (what, body, needle) in bad_expose {
        let r = post(&sock, "/services/forwarder/expose", body);
        expect_status(&daemon, &format!("expose with {what}"), &r, 400);
        daemon.check_that(
            r.body.to_lowercase().contains(needle),
            format!(
                "expose with {what}: the reason should mention {needle:?}\n{}",
                r.describe()
            ),
        );
    }
    // None of the bad requests left a forward behind.
    let r = get(&sock, "/services/forwarder/all");
    daemon.check_that(
        r.json(&daemon) == want,
        format!(
            "bad requests must not change the forwards\n{}",
            r.describe()
        ),
    );

    let r = post(
        &sock,
        "/services/forwarder/unexpose",
        r#"{"local":"127.0.0.1:19999","protocol":"tcp"}"#,
    );
    expect_status(&daemon, "unexpose of an unknown forward", &r, 404);
    // Same local, other protocol: unknown too.
    let r = post(
        &sock,
        "/services/forwarder/unexpose",
        r#"{"local":"127.0.0.1:18080","protocol":"udp"}"#,
    );
    expect_status(&daemon, "unexpose with the wrong protocol", &r, 404);
    let r = post(&sock, "/services/forwarder/unexpose", "{oops");
    expect_status(&daemon, "unexpose with bad JSON", &r, 400);
    let r = post(
        &sock,
        "/services/forwarder/unexpose",
        r#"{"local":"127.0.0.1:18080","protocol":"quic"}"#,
    );
    expect_status(&daemon, "unexpose with an unknown protocol", &r, 400);
    let r = post(
        &sock,
        "/services/forwarder/unexpose",
        r#"{"local":"127.0.0.1:18080","protocol":"tcp"}"#,
    );
    expect_status(&daemon, "unexpose tcp", &r, 200);
    let r = post(
        &sock,
        "/services/forwarder/unexpose",
        r#"{"local":"127.0.0.1:15353","protocol":"udp"}"#,
    );
    expect_status(&daemon, "unexpose udp", &r, 200);
    let r = get(&sock, "/services/forwarder/all");
    daemon.check_that(
        r.json(&daemon) == json!([]),
        format!("all forwards removed\n{}", r.describe()),
    );
    // (That the unexposed UDP port is closed too is checked by the forwards test.)
    daemon.check_that(
        poll_until(Duration::from_secs(5), || !listening(&d, 't', 18080)),
        "the unexposed 127.0.0.1:18080/tcp is still listening in D",
    );

    // DNS zones.
    let r = get(&sock, "/services/dns/all");
    expect_status(&daemon, "dns/all", &r, 200);
    let before = r.json(&daemon);
    daemon.check_that(
        before.is_array(),
        format!("dns/all must be a list\n{}", r.describe()),
    );
    let zone = r#"{"Name":"internal.","Records":[{"Name":"x","IP":"1.2.3.4"},{"Name":"host.lima","IP":"192.168.5.2"}]}"#;
    let r = post(&sock, "/services/dns/add", zone);
    expect_status(&daemon, "dns/add", &r, 200);
    let r = get(&sock, "/services/dns/all");
    let all = r.json(&daemon);
    let z = all
        .as_array()
        .and_then(|a| a.iter().find(|z| z["Name"] == "internal."))
        .cloned();
    daemon.check_that(
        z.as_ref().map(|z| {
            let recs = z["Records"].as_array().cloned().unwrap_or_default();
            recs.contains(&json!({"Name": "x", "IP": "1.2.3.4"}))
                && recs.contains(&json!({"Name": "host.lima", "IP": "192.168.5.2"}))
        }) == Some(true),
        format!(
            "dns/all should list zone internal. with both records\n{}",
            r.describe()
        ),
    );
    for (what, body) in [
        ("bad JSON", "{\"Name\":"),
        (
            "a bad IP",
            r#"{"Name":"internal.","Records":[{"Name":"y","IP":"1.2.3"}]}"#,
        ),
        (
            "no zone name",
            r#"{"Records":[{"Name":"y","IP":"1.2.3.4"}]}"#,
        ),
        (
            "Records not a list",
            r#"{"Name":"internal.","Records":"y"}"#,
        ),
    ] {
        let r = post(&sock, "/services/dns/add", body);
        expect_status(&daemon, &format!("dns/add with {what}"), &r, 400);
    }

    // Stats: gvproxy's counters plus usernet's document; the guest's DHCP traffic is counted.
    let r = get(&sock, "/stats");
    expect_status(&daemon, "stats", &r, 200);
    let v = r.json(&daemon);
    let sent = v.get("BytesSent").and_then(Value::as_u64);
    let recv = v.get("BytesReceived").and_then(Value::as_u64);
    daemon.check_that(
        sent.unwrap_or(0) > 0 && recv.unwrap_or(0) > 0 && v["usernet"].is_object(),
        format!(
            "stats: BytesSent and BytesReceived > 0 and a usernet object\n{}",
            r.describe()
        ),
    );

    // wait_port: bad queries are 400.
    for q in [
        "ip=not-an-ip&port=80",
        "ip=192.168.5.15&port=0",
        "ip=192.168.5.15&port=99999",
        "ip=192.168.5.15&port=80&timeout=soon",
        "port=80",
    ] {
        let r = get(&sock, &format!("/extension/wait_port?{q}"));
        expect_status(&daemon, &format!("wait_port?{q}"), &r, 400);
    }

    // Unknown paths and wrong methods.
    let r = get(&sock, "/no/such/path");
    daemon.check_that(
        r.status == 404,
        format!("unknown path: expected 404\n{}", r.describe()),
    );
    let r = get(&sock, "/services/forwarder/expose");
    daemon.check_that(
        r.status == 405 || r.status == 404,
        format!("GET on expose: expected 405 (or 404)\n{}", r.describe()),
    );
    let r = post(&sock, "/services/dhcp/leases", "{}");
    daemon.check_that(
        r.status == 405 || r.status == 404,
        format!("POST on leases: expected 405 (or 404)\n{}", r.describe()),
    );

    // Still serving after all that.
    check_leases(&daemon, &sock, "/leases", GUEST, &mac);
}

// ---------------------------------------------------------------------------------------------
// 2. Forwards reach servers in the guest
// ---------------------------------------------------------------------------------------------

#[test]
fn forwards_reach_guest_servers_and_go_away_when_removed() {
    if skip("forwards_reach_guest_servers_and_go_away_when_removed", &[]) {
        return;
    }
    let d = Netns::new("d");
    let g = Netns::new("g");
    quiet_guest(&g);
    let dir = tmpdir();
    let sock = dir.path().join("api.sock");
    // One forward from the command line, to the first guest's port 80.
    let daemon = Daemon::start_tap(&d, &g, &["--api", &p(&sock), "-p", "127.0.0.1:18022:80"]);
    wait_socket(&daemon, &sock, "--api");
    let l = daemon.udhcpc(&g, "tap0", &[]);
    check_lease(&daemon, &l, GUEST, "192.168.5.2", "192.168.5.3", None);

    let pages = page_dir();
    let mut web = httpd(&daemon, &g, "0.0.0.0", 80, pages.path());
    let mut echo = server(
        &daemon,
        &g,
        tool(&g, &["udp-echo", "0.0.0.0", "5353"]),
        'u',
        5353,
    );

    // -p on the command line.
    daemon.check_that(
        listening(&d, 't', 18022),
        "-p 127.0.0.1:18022:80 is not listening in D",
    );
    assert_curl(
        &daemon,
        &d,
        "http://127.0.0.1:18022/page.txt",
        PAGE,
        &mut web,
    );

    // Through the API.
    let r = post(
        &sock,
        "/services/forwarder/expose",
        r#"{"local":"127.0.0.1:18080","remote":":80","protocol":"tcp"}"#,
    );
    expect_status(&daemon, "expose tcp", &r, 200);
    let r = post(
        &sock,
        "/services/forwarder/expose",
        &format!(r#"{{"local":"127.0.0.1:15353","remote":"{GUEST}:5353","protocol":"udp"}}"#),
    );
    expect_status(&daemon, "expose udp", &r, 200);
    let r = get(&sock, "/services/forwarder/all");
    let all = r.json(&daemon);
    let has = |local: &str, proto: &str| {
        all.as_array()
            .map(|a| {
                a.iter()
                    .any(|f| f["local"] == local && f["protocol"] == proto)
            })
            .unwrap_or(false)
    };
    daemon.check_that(
        has("127.0.0.1:18080", "tcp") && has("127.0.0.1:15353", "udp"),
        format!(
            "forwarder/all should list both exposed forwards\n{}",
            r.describe()
        ),
    );
    assert_curl(
        &daemon,
        &d,
        "http://127.0.0.1:18080/page.txt",
        PAGE,
        &mut web,
    );
    assert_curl(
        &daemon,
        &d,
        "http://127.0.0.1:18080/page.txt",
        PAGE,
        &mut web,
    );
    assert_udp_echo(&daemon, &d, "127.0.0.1", 15353, &mut echo);

    // A unix-socket forward (gvproxy's "unix" protocol): a host socket to the guest's port 80.
    let unix = dir.path().join("guest-web.sock");
    let r = post(
        &sock,
        "/services/forwarder/expose",
        &format!(
            r#"{{"local":"{}","remote":":80","protocol":"unix"}}"#,
            p(&unix)
        ),
    );
    expect_status(&daemon, "expose unix", &r, 200);
    let mut curl = Command::new("curl");
    curl.args([
        "-sS",
        "--max-time",
        "10",
        "--unix-socket",
        &p(&unix),
        "http://localhost/page.txt",
    ]);
    let got = run_with_deadline(curl, Duration::from_secs(15));
    daemon.check_that(
        got.stdout == PAGE,
        format!("curl over the unix forward\n{}", got.describe()),
    );
    let r = post(
        &sock,
        "/services/forwarder/unexpose",
        &format!(r#"{{"local":"{}","protocol":"unix"}}"#, p(&unix)),
    );
    expect_status(&daemon, "unexpose unix", &r, 200);
    daemon.check_that(
        !unix.exists(),
        "the unix forward's socket is removed by unexpose",
    );

    // Removed through the API: the host ports close.
    for body in [
        r#"{"local":"127.0.0.1:18080","protocol":"tcp"}"#,
        r#"{"local":"127.0.0.1:15353","protocol":"udp"}"#,
    ] {
        let r = post(&sock, "/services/forwarder/unexpose", body);
        expect_status(&daemon, &format!("unexpose {body}"), &r, 200);
    }
    let gone = poll_until(Duration::from_secs(5), || !listening(&d, 't', 18080));
    let ss = run_with_deadline(d.exec("ss", &["-ltnu"]), Duration::from_secs(5));
    daemon.check_that(
        gone,
        format!(
            "the unexposed 127.0.0.1:18080/tcp is still listening in D:\n{}",
            ss.stdout
        ),
    );
    let res = connect_result(&d, "127.0.0.1", 18080);
    daemon.check_that(
        res == "refused",
        format!("connect to the unexposed 127.0.0.1:18080 should be refused, got {res}"),
    );
    let r = get(&sock, "/services/forwarder/all");
    let all = r.json(&daemon);
    daemon.check_that(
        !all.to_string().contains("18080") && !all.to_string().contains("15353"),
        format!("forwarder/all after unexpose\n{}", r.describe()),
    );
    // The command-line forward is unaffected.
    assert_curl(
        &daemon,
        &d,
        "http://127.0.0.1:18022/page.txt",
        PAGE,
        &mut web,
    );

    // A host port in use: 500 naming the OS error, for TCP and UDP.
    let _tcp_busy = server(
        &daemon,
        &d,
        tool(&d, &["tcp-echo", "127.0.0.1", "18090"]),
        't',
        18090,
    );
    let _udp_busy = server(
        &daemon,
        &d,
        tool(&d, &["udp-echo", "127.0.0.1", "15390"]),
        'u',
        15390,
    );
    for (body, what) in [
        (
            r#"{"local":"127.0.0.1:18090","remote":":80","protocol":"tcp"}"#,
            "tcp",
        ),
        (
            r#"{"local":"127.0.0.1:15390","remote":":5353","protocol":"udp"}"#,
            "udp",
        ),
    ] {
        let r = post(&sock, "/services/forwarder/expose", body);
        expect_status(&daemon, &format!("expose onto a busy {what} port"), &r, 500);
        daemon.check_that(
            r.body.to_lowercase().contains("in use"),
            format!(
                "busy {what} port: the reason should name the OS error (address in use)\n{}",
                r.describe()
            ),
        );
    }
    let r = get(&sock, "/services/forwarder/all");
    daemon.check_that(
        !r.body.contains("18090") && !r.body.contains("15390"),
        format!("a failed expose must not be listed\n{}", r.describe()),
    );

    // Last (so the checks above run either way): the unexposed UDP port is closed as well,
    // and can be exposed again.
    let gone = poll_until(Duration::from_secs(5), || !listening(&d, 'u', 15353));
    let ss = run_with_deadline(d.exec("ss", &["-lnu"]), Duration::from_secs(5));
    daemon.check_that(
        gone,
        format!(
            "the unexposed 127.0.0.1:15353/udp is still bound in D:\n{}",
            ss.stdout
        ),
    );
    let r = post(
        &sock,
        "/services/forwarder/expose",
        &format!(r#"{{"local":"127.0.0.1:15353","remote":"{GUEST}:5353","protocol":"udp"}}"#),
    );
    expect_status(&daemon, "expose udp again after unexpose", &r, 200);
    assert_udp_echo(&daemon, &d, "127.0.0.1", 15353, &mut echo);
}

#[test]
fn publish_onto_a_busy_port_fails_startup_naming_it() {
    if skip("publish_onto_a_busy_port_fails_startup_naming_it", &[]) {
        return;
    }
    let d = Netns::new("d");
    let g = Netns::new("g");
    let dir = tmpdir();
    let busy = BgProcess::spawn(tool(&d, &["tcp-echo", "127.0.0.1", "18022"]));
    wait_until(
        Duration::from_secs(10),
        "the port squatter to listen",
        || listening(&d, 't', 18022),
    );
    let mut cmd = d.exec(
        USERNET,
        &[
            "--tap-netns",
            &g.path(),
            "--pid-file",
            &p(&dir.path().join("pid")),
            "-p",
            "127.0.0.1:18022:80",
        ],
    );
    cmd.env("RUST_LOG", "info");
    let out = run_with_deadline(cmd, Duration::from_secs(15));
    drop(busy);
    assert!(
        !out.timed_out && out.code().map(|c| c != 0).unwrap_or(false),
        "usernet -p onto a busy port must exit non-zero at startup\n{}",
        out.describe()
    );
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(
        text.contains("18022"),
        "the startup error should name the busy port 18022\n{}",
        out.describe()
    );
    assert!(
        !dir.path().join("pid").exists(),
        "a failed start must not leave a pid file"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. wait_port
// ---------------------------------------------------------------------------------------------

#[test]
fn wait_port_answers_200_when_the_guest_accepts_and_504_after_the_timeout() {
    if skip(
        "wait_port_answers_200_when_the_guest_accepts_and_504_after_the_timeout",
        &[],
    ) {
        return;
    }
    let d = Netns::new("d");
    let g = Netns::new("g");
    quiet_guest(&g);
    let dir = tmpdir();
    let sock = dir.path().join("api.sock");
    let daemon = Daemon::start_tap(&d, &g, &["--api", &p(&sock)]);
    wait_socket(&daemon, &sock, "--api");
    daemon.udhcpc(&g, "tap0", &[]);
    let pages = page_dir();
    let _web = httpd(&daemon, &g, "0.0.0.0", 80, pages.path());

    // Open port: 200, quickly.
    let r = api(
        &sock,
        "GET",
        &format!("/extension/wait_port?ip={GUEST}&port=80&timeout=5"),
        None,
        Duration::from_secs(15),
    );
    expect_status(&daemon, "wait_port on the guest's httpd", &r, 200);
    daemon.check_that(
        r.elapsed < Duration::from_secs(4),
        format!("wait_port on an open port took too long\n{}", r.describe()),
    );

    // Closed port: 504 after about the timeout.
    let r = api(
        &sock,
        "GET",
        &format!("/extension/wait_port?ip={GUEST}&port=81&timeout=2"),
        None,
        Duration::from_secs(20),
    );
    expect_status(&daemon, "wait_port on a closed port", &r, 504);
    daemon.check_that(
        r.elapsed >= Duration::from_millis(1500) && r.elapsed <= Duration::from_secs(2 + 5),
        format!(
            "wait_port timeout=2 on a closed port should answer 504 after ~2 s\n{}",
            r.describe()
        ),
    );

    // A port that opens while waiting: 200 once it accepts.
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "30", "--unix-socket"])
        .arg(&sock);
    c.args(["-o", "/dev/null", "-w", "%{http_code}"]);
    c.arg(format!(
        "http://usernet/extension/wait_port?ip={GUEST}&port=8081&timeout=20"
    ));
    let mut waiter = BgProcess::spawn(c);
    std::thread::sleep(Duration::from_secs(1));
    daemon.check_that(
        waiter.running(),
        format!(
            "wait_port answered before the port opened\n{}",
            waiter.describe()
        ),
    );
    let opened = Instant::now();
    let _late = server(
        &daemon,
        &g,
        tool(&g, &["tcp-echo", "0.0.0.0", "8081"]),
        't',
        8081,
    );
    let out = waiter.finish(Duration::from_secs(25));
    daemon.check_that(
        out.success() && out.stdout.trim() == "200" && opened.elapsed() < Duration::from_secs(10),
        format!(
            "wait_port should answer 200 soon after the port opens\n{}",
            out.describe()
        ),
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Lima's command line
// ---------------------------------------------------------------------------------------------

struct LimaFiles {
    dir: tempfile::TempDir,
}

impl LimaFiles {
    fn new() -> LimaFiles {
        LimaFiles { dir: tmpdir() }
    }
    fn f(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn args(&self, leases: Option<&str>) -> Vec<String> {
        let mut a = strings(&[
            "lima",
            "-p",
            &p(&self.f("usernet.pid")),
            "-e",
            &p(&self.f("ep.sock")),
            "--listen-qemu",
            &p(&self.f("qemu.sock")),
            "--listen",
            &p(&self.f("fd.sock")),
            "--subnet",
            "192.168.104.0/24",
        ]);
        if let Some(l) = leases {
            a.extend(strings(&["--leases", l]));
        }
        a
    }
}

#[test]
fn lima_argv_serves_its_plan_leases_and_pid_file() {
    if skip("lima_argv_serves_its_plan_leases_and_pid_file", &[]) {
        return;
    }
    let d = Netns::new("d");
    let g = Netns::new("g");
    quiet_guest(&g);
    let files = LimaFiles::new();
    let args = files.args(None);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let daemon = Daemon::start_taps(&d, &[], &argv);
    wait_socket(&daemon, &files.f("qemu.sock"), "--listen-qemu");
    wait_socket(&daemon, &files.f("ep.sock"), "-e (endpoint)");
    wait_socket(&daemon, &files.f("fd.sock"), "--listen (fd)");

    // Pid file: the daemon's pid.
    let pid = daemon.pid().expect("daemon pid");
    let mut text = String::new();
    poll_until(Duration::from_secs(5), || {
        text = fs::read_to_string(files.f("usernet.pid")).unwrap_or_default();
        !text.trim().is_empty()
    });
    daemon.check_that(
        text.trim() == pid.to_string(),
        format!("pid file holds {text:?}, the daemon is {pid}"),
    );
    let mode = fs::metadata(files.f("ep.sock"))
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0);
    daemon.check_that(
        mode == 0o600,
        format!("the endpoint socket's mode is {mode:o}, expected 600"),
    );

    let mut br = bridge(&daemon, &g, &files.f("qemu.sock"), None);
    let l = lease(&daemon, &g, Some(&mut br));
    check_lease(
        &daemon,
        &l,
        "192.168.104.15",
        "192.168.104.2",
        "192.168.104.2",
        Some(1500),
    );
    let ping = ping_output(&g, "192.168.104.2", 2);
    daemon.check_that(
        ping.success(),
        format!(
            "the guest cannot ping the gateway .2\n{}\n{}",
            ping.describe(),
            br.describe()
        ),
    );

    let mac = g.link_mac("tap0").expect("tap0 MAC");
    check_leases(
        &daemon,
        &files.f("ep.sock"),
        "/services/dhcp/leases",
        "192.168.104.15",
        &mac,
    );
}

#[test]
fn lima_static_lease_gives_the_guest_its_address() {
    if skip("lima_static_lease_gives_the_guest_its_address", &[]) {
        return;
    }
    let d = Netns::new("d");
    let g = Netns::new("g");
    quiet_guest(&g);
    let files = LimaFiles::new();
    let mac = "52:55:55:12:34:56";
    let args = files.args(Some(&format!("192.168.104.3={mac}")));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let daemon = Daemon::start_taps(&d, &[], &argv);
    wait_socket(&daemon, &files.f("qemu.sock"), "--listen-qemu");
    wait_socket(&daemon, &files.f("ep.sock"), "-e (endpoint)");
    let mut br = bridge(&daemon, &g, &files.f("qemu.sock"), Some(mac));
    daemon.check_that(
        g.link_mac("tap0").as_deref() == Some(mac),
        format!(
            "the bridge's tap0 should have MAC {mac}: {:?}",
            g.link("tap0")
        ),
    );
    let l = lease(&daemon, &g, Some(&mut br));
    check_lease(
        &daemon,
        &l,
        "192.168.104.3",
        "192.168.104.2",
        "192.168.104.2",
        Some(1500),
    );
    check_leases(
        &daemon,
        &files.f("ep.sock"),
        "/leases",
        "192.168.104.3",
        mac,
    );
}

// ---------------------------------------------------------------------------------------------
// 5. gvproxy's command line
// ---------------------------------------------------------------------------------------------

const GV_MAC: &str = "5a:94:ef:e4:0c:ee";
const GV_GUEST: &str = "192.168.127.2";

#[test]
fn gvproxy_argv_plan_host_alias_ssh_port_and_log_file() {
    if skip("gvproxy_argv_plan_host_alias_ssh_port_and_log_file", &[]) {
        return;
    }
    let d = Netns::new("d");
    let g = Netns::new("g");
    quiet_guest(&g);
    let dir = tmpdir();
    let f = |n: &str| dir.path().join(n);
    let log = f("gvproxy.log");
    let args = vec![
        "gvproxy".to_string(),
        "-listen-qemu".into(),
        format!("unix://{}", p(&f("qemu.sock"))),
        "-listen-vfkit".into(),
        format!("unixgram://{}", p(&f("vfkit.sock"))),
        "-listen".into(),
        format!("unix://{}", p(&f("api.sock"))),
        "-ssh-port".into(),
        "2022".into(),
        "-pid-file".into(),
        p(&f("gvproxy.pid")),
        "-log-file".into(),
        p(&log),
        "-mtu".into(),
        "1500".into(),
        "-pcap".into(),
        p(&f("gvproxy.pcap")),
        "-debug".into(),
    ];
    let daemon = Proc::spawn(
        &d,
        Path::new(USERNET),
        &args,
        Some(log.clone()),
        None,
        false,
    );
    wait_socket(&daemon, &f("qemu.sock"), "-listen-qemu");
    wait_socket(&daemon, &f("api.sock"), "-listen");
    wait_socket(&daemon, &f("vfkit.sock"), "-listen-vfkit");
    let mut pid_text = String::new();
    poll_until(Duration::from_secs(5), || {
        pid_text = fs::read_to_string(f("gvproxy.pid")).unwrap_or_default();
        !pid_text.trim().is_empty()
    });
    daemon.check_that(
        pid_text.trim() == daemon.pid().to_string(),
        format!(
            "-pid-file holds {pid_text:?}, the daemon is {}",
            daemon.pid()
        ),
    );

    let mut br = bridge(&daemon, &g, &f("qemu.sock"), Some(GV_MAC));
    let l = lease(&daemon, &g, Some(&mut br));
    check_lease(
        &daemon,
        &l,
        GV_GUEST,
        "192.168.127.1",
        "192.168.127.1",
        Some(1500),
    );
    check_leases(
        &daemon,
        &f("api.sock"),
        "/services/dhcp/leases",
        GV_GUEST,
        GV_MAC,
    );

    // 192.168.127.254 is the daemon's 127.0.0.1.
    let pages = page_dir();
    let mut web = httpd(&daemon, &d, "127.0.0.1", 8080, pages.path());
    assert_curl(
        &daemon,
        &g,
        "http://192.168.127.254:8080/page.txt",
        PAGE,
        &mut web,
    );

    // -ssh-port 2022: 127.0.0.1:2022 in D -> the guest's :22 (a plain TCP echo stands in for sshd).
    let mut sshd = server(
        &daemon,
        &g,
        tool(&g, &["tcp-echo", "0.0.0.0", "22"]),
        't',
        22,
    );
    daemon.check_that(
        listening(&d, 't', 2022),
        "-ssh-port 2022 is not listening in D",
    );
    let out = run_with_deadline(
        tool(&d, &["echo-many", "127.0.0.1", "2022", "3", "4000", "20"]),
        Duration::from_secs(30),
    );
    let ok = parse_last_json(&out.stdout)
        .map(|v| v["ok"] == json!(3))
        .unwrap_or(false);
    if !ok {
        let s = sshd.describe();
        daemon.fail_msg(format!(
            "echo through -ssh-port 2022 to the guest's :22\n{}\n{s}",
            out.describe()
        ));
    }

    // The log went to -log-file (and -debug made it verbose).
    let text = fs::read_to_string(&log).unwrap_or_default();
    daemon.check_that(
        text.contains("192.168.127.0/24") && text.contains("DEBUG"),
        format!(
            "-log-file should hold the daemon's (debug) log, has {} bytes",
            text.len()
        ),
    );
    let pcap_len = fs::metadata(f("gvproxy.pcap"))
        .map(|m| m.len())
        .unwrap_or(0);
    daemon.check_that(pcap_len > 24, format!("-pcap file has {pcap_len} bytes"));
}

#[test]
fn gvproxy_symlink_serves_the_same_plan_and_unknown_flags_exit_2() {
    if skip(
        "gvproxy_symlink_serves_the_same_plan_and_unknown_flags_exit_2",
        &[],
    ) {
        return;
    }
    let bin = tmpdir();
    let link = bin.path().join("gvproxy");
    std::os::unix::fs::symlink(USERNET, &link).expect("symlink gvproxy -> usernet");

    // Unknown flags: exit 2 naming them, both ways of invoking gvproxy mode.
    for (program, pre) in [
        (link.clone(), None),
        (PathBuf::from(USERNET), Some("gvproxy")),
    ] {
        let mut cmd = Command::new(&program);
        if let Some(a) = pre {
            cmd.arg(a);
        }
        cmd.args([
            "-listen",
            "unix:///nonexistent/api.sock",
            "-no-such-flag",
            "x",
        ]);
        let out = run_with_deadline(cmd, Duration::from_secs(10));
        assert!(
            out.code() == Some(2) && out.stderr.contains("-no-such-flag"),
            "{} with an unknown flag: expected exit 2 naming it\n{}",
            program.display(),
            out.describe()
        );
    }

    let d = Netns::new("d");
    let g = Netns::new("g");
    quiet_guest(&g);
    let dir = tmpdir();
    let f = |n: &str| dir.path().join(n);
    let args = vec![
        "-listen-qemu".to_string(),
        format!("unix://{}", p(&f("qemu.sock"))),
        "-listen".into(),
        format!("unix://{}", p(&f("api.sock"))),
        "-pid-file".into(),
        p(&f("gvproxy.pid")),
    ];
    let daemon = Proc::spawn(&d, &link, &args, None, None, true);
    wait_socket(&daemon, &f("qemu.sock"), "-listen-qemu");
    wait_socket(&daemon, &f("api.sock"), "-listen");
    let mut br = bridge(&daemon, &g, &f("qemu.sock"), Some(GV_MAC));
    let l = lease(&daemon, &g, Some(&mut br));
    check_lease(
        &daemon,
        &l,
        GV_GUEST,
        "192.168.127.1",
        "192.168.127.1",
        Some(1500),
    );
    check_leases(&daemon, &f("api.sock"), "/leases", GV_GUEST, GV_MAC);
    // gvproxy's default -ssh-port is 2222.
    daemon.check_that(
        listening(&d, 't', 2222),
        "the default ssh port 2222 is not listening in D",
    );
}

// ---------------------------------------------------------------------------------------------
// 6. pcap, read while running
// ---------------------------------------------------------------------------------------------

#[test]
fn pcap_shows_the_dhcp_handshake_while_running() {
    if skip("pcap_shows_the_dhcp_handshake_while_running", &["tshark"]) {
        return;
    }
    let d = Netns::new("d");
    let g = Netns::new("g");
    quiet_guest(&g);
    let dir = tmpdir();
    let pcap = dir.path().join("usernet.pcap");
    let mut daemon = Daemon::start_tap(&d, &g, &["--pcap", &p(&pcap)]);
    let mac = g.link_mac("tap0").expect("tap0 MAC");
    daemon.udhcpc(&g, "tap0", &[]);
    let alive = daemon.is_running();
    daemon.check_that(alive, "the daemon died");

    // dhcp.option.dhcp: 1 Discover, 2 Offer, 3 Request, 5 ACK; chaddr is the client's MAC.
    let mut last = None;
    let seen = poll_until(Duration::from_secs(10), || {
        let mut c = Command::new("tshark");
        c.args(["-n", "-r"]).arg(&pcap);
        c.args([
            "-Y",
            "dhcp",
            "-T",
            "fields",
            "-e",
            "dhcp.option.dhcp",
            "-e",
            "dhcp.hw.mac_addr",
            "-e",
            "eth.src",
        ]);
        let out = run_with_deadline(c, Duration::from_secs(20));
        let types: Vec<String> = out
            .stdout
            .lines()
            .filter(|l| l.to_lowercase().contains(&mac))
            .filter_map(|l| l.split('\t').next().map(str::to_string))
            .collect();
        let from_guest = out
            .stdout
            .lines()
            .filter(|l| l.split('\t').nth(2).map(|s| s.to_lowercase()) == Some(mac.clone()))
            .count();
        let ok = ["1", "2", "3", "5"]
            .iter()
            .all(|t| types.iter().any(|x| x == t))
            && from_guest >= 2;
        last = Some(out);
        ok
    });
    let pcap_len = fs::metadata(&pcap).map(|m| m.len()).unwrap_or(0);
    daemon.check_that(
        seen,
        format!(
            "tshark should show DHCP Discover/Offer/Request/ACK for {mac} in the running daemon's pcap ({pcap_len} bytes)\n{}",
            last.map(|o| o.describe()).unwrap_or_default()
        ),
    );
    let alive = daemon.is_running();
    daemon.check_that(alive, "the daemon died while its pcap was read");
}

// ---------------------------------------------------------------------------------------------
// 7. --ready-fd, SIGTERM, lease file, cleanup; --listen-qemu in plain mode
// ---------------------------------------------------------------------------------------------

/// Whether `v` holds the lease ip -> mac anywhere: an object with both as string values, or an
/// object mapping the ip to the mac.
fn json_has_lease(v: &Value, ip: &str, mac: &str) -> bool {
    match v {
        Value::Object(m) => {
            let vals: Vec<String> = m
                .values()
                .filter_map(Value::as_str)
                .map(str::to_lowercase)
                .collect();
            (vals.iter().any(|s| s == ip) && vals.iter().any(|s| s == mac))
                || m.get(ip)
                    .and_then(Value::as_str)
                    .map(str::to_lowercase)
                    .as_deref()
                    == Some(mac)
                || m.values().any(|x| json_has_lease(x, ip, mac))
        }
        Value::Array(a) => a.iter().any(|x| json_has_lease(x, ip, mac)),
        _ => false,
    }
}

#[test]
fn ready_fd_then_sigterm_exits_0_saves_leases_and_removes_its_files() {
    if skip(
        "ready_fd_then_sigterm_exits_0_saves_leases_and_removes_its_files",
        &[],
    ) {
        return;
    }
    let d = Netns::new("d");
    let g = Netns::new("g");
    quiet_guest(&g);
    let dir = tmpdir();
    let f = |n: &str| dir.path().join(n);
    // CLOEXEC: the daemon must inherit the write end only as fd 3 (dup2 clears the flag there).
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
    let args = strings(&[
        "--tap-netns",
        &g.path(),
        "--api",
        &p(&f("api.sock")),
        "--listen-qemu",
        &p(&f("qemu.sock")),
        "--pid-file",
        &p(&f("usernet.pid")),
        "--lease-file",
        &p(&f("leases.json")),
        "--ready-fd",
        "3",
    ]);
    let started = Instant::now();
    let mut daemon = Proc::spawn(&d, Path::new(USERNET), &args, None, Some(wr), true);

    // The first thing: one byte on the pipe (EOF or nothing in time is a failure).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut file = fs::File::from(rd);
        let mut buf = [0u8; 8];
        let first = file.read(&mut buf).map(|n| buf[..n].to_vec());
        let _ = tx.send(first.map_err(|e| e.to_string()));
        // After the byte the daemon closes its end: EOF follows.
        let rest = file.read(&mut buf).map_err(|e| e.to_string());
        let _ = tx.send(rest.map(|n| buf[..n].to_vec()));
    });
    let first = match rx.recv_timeout(Duration::from_secs(15)) {
        Ok(v) => v,
        Err(_) => daemon.fail_msg("no byte on --ready-fd 3 within 15 s".to_string()),
    };
    let rest = rx.recv_timeout(Duration::from_secs(5));
    let ready_after = started.elapsed();
    match &first {
        Ok(b) if b.len() == 1 => {}
        other => daemon.fail_msg(format!("--ready-fd 3: expected one byte, read {other:?}")),
    }
    daemon.check_that(
        matches!(&rest, Ok(Ok(b)) if b.is_empty()),
        format!("--ready-fd: after the byte the fd should be closed (EOF), read {rest:?}"),
    );

    // Serving now, with no other wait: DHCP through the tap, the API and the files.
    let l = lease(&daemon, &g, None);
    check_lease(&daemon, &l, GUEST, "192.168.5.2", "192.168.5.3", None);
    let mac = g.link_mac("tap0").expect("tap0 MAC");
    check_leases(&daemon, &f("api.sock"), "/leases", GUEST, &mac);
    for (name, sock) in [
        ("api.sock", true),
        ("qemu.sock", true),
        ("usernet.pid", false),
    ] {
        let m = fs::symlink_metadata(f(name));
        daemon.check_that(
            m.as_ref()
                .map(|m| m.file_type().is_socket() == sock)
                .unwrap_or(false),
            format!("{name} should exist once ready ({ready_after:?} after start): {m:?}"),
        );
    }
    let pid_text = fs::read_to_string(f("usernet.pid")).unwrap_or_default();
    daemon.check_that(
        pid_text.trim() == daemon.pid().to_string(),
        format!(
            "pid file holds {pid_text:?}, the daemon is {}",
            daemon.pid()
        ),
    );

    let (st, took) = daemon.stop();
    daemon.check_that(
        st.success(),
        format!("SIGTERM: exit status {st}, expected 0 (after {took:?})"),
    );
    let leases = fs::read_to_string(f("leases.json")).unwrap_or_default();
    let v: Value = serde_json::from_str(&leases).unwrap_or(Value::Null);
    daemon.check_that(
        json_has_lease(&v, GUEST, &mac),
        format!("the lease file should hold {GUEST} = {mac} as JSON, holds:\n{leases}"),
    );
    for name in ["api.sock", "qemu.sock", "usernet.pid"] {
        daemon.check_that(
            fs::symlink_metadata(f(name)).is_err(),
            format!("{name} must be removed at exit"),
        );
    }
}

#[test]
fn listen_qemu_in_plain_mode_serves_a_bridged_guest() {
    if skip("listen_qemu_in_plain_mode_serves_a_bridged_guest", &[]) {
        return;
    }
    let d = Netns::new("d");
    let g = Netns::new("g");
    quiet_guest(&g);
    let dir = tmpdir();
    let q = dir.path().join("qemu.sock");
    let sock = dir.path().join("api.sock");
    let mut daemon = Daemon::start_taps(&d, &[], &["--listen-qemu", &p(&q), "--api", &p(&sock)]);
    wait_socket(&daemon, &q, "--listen-qemu");
    wait_socket(&daemon, &sock, "--api");
    let mut br = bridge(&daemon, &g, &q, Some("52:55:55:aa:bb:01"));
    let l = lease(&daemon, &g, Some(&mut br));
    check_lease(&daemon, &l, GUEST, "192.168.5.2", "192.168.5.3", Some(1500));
    let ping = ping_output(&g, "192.168.5.2", 2);
    daemon.check_that(
        ping.success(),
        format!(
            "ping the gateway through the bridge\n{}\n{}",
            ping.describe(),
            br.describe()
        ),
    );
    check_leases(&daemon, &sock, "/leases", GUEST, "52:55:55:aa:bb:01");
    // Stop: the bridge sees the socket close and exits; the listen socket is removed.
    let st = daemon.stop();
    daemon.check_that(st.success(), format!("SIGTERM: exit status {st}"));
    let out = br.finish(Duration::from_secs(10));
    daemon.check_that(
        !out.timed_out && out.stdout.contains("socket closed"),
        format!(
            "the bridge should see the daemon close its socket\n{}",
            out.describe()
        ),
    );
    daemon.check_that(
        !q.exists() && !sock.exists(),
        "listen/api sockets left behind after SIGTERM",
    );
}
