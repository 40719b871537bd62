//! The integration-test rig shared by every end-to-end test (`mod support;`).
//!
//! It creates network namespaces with no route out, starts the usernet daemon inside one of them
//! (namespace D, only `lo` up) serving a tap device in another (guest namespace G), runs real DHCP
//! clients and pings in the guest namespaces, and tears everything down on drop, also when a test
//! panics. Names carry the test process id and a counter, so parallel tests and parallel runs
//! never collide. It deliberately sends traffic only to loopback and to namespaces it created.
//!
//! Every failure message carries what a person needs: the daemon's log tail and the client's
//! output. Nothing here sleeps and hopes: every wait is a condition polled against a deadline.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt::{Debug, Display};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The daemon binary under test.
pub const USERNET: &str = env!("CARGO_BIN_EXE_usernet");

/// How often every condition is polled.
pub const POLL: Duration = Duration::from_millis(20);

/// How long the daemon gets to create and raise its tap devices.
pub const TAP_DEADLINE: Duration = Duration::from_secs(10);

/// How long the daemon gets to exit after SIGTERM.
pub const STOP_DEADLINE: Duration = Duration::from_secs(10);

/// How long a DHCP client gets to report a lease.
pub const CLIENT_DEADLINE: Duration = Duration::from_secs(30);

/// How many lines of the daemon log a failure shows.
const LOG_TAIL_LINES: usize = 80;

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn unique(tag: &str) -> String {
    format!(
        "un-{tag}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

// ---------------------------------------------------------------------------------------------
// Preconditions and waiting
// ---------------------------------------------------------------------------------------------

/// Whether this end-to-end test can run here. Without root or a needed tool the test is skipped
/// (a `SKIPPED:` line on stderr, returns false) unless `USERNET_E2E=1`, which turns it into a
/// failure so CI cannot pass by skipping.
pub fn require_root_and_tools(test: &str, tools: &[&str]) -> bool {
    let mut reasons = Vec::new();
    if !is_root() {
        reasons.push("not running as root".to_string());
    }
    if !Path::new("/dev/net/tun").exists() {
        reasons.push("/dev/net/tun is missing".to_string());
    }
    for tool in ["ip"].iter().chain(tools) {
        if find_in_path(tool).is_none() {
            reasons.push(format!("tool `{tool}` not found in PATH"));
        }
    }
    if reasons.is_empty() {
        return true;
    }
    let reason = reasons.join("; ");
    if std::env::var("USERNET_E2E").as_deref() == Ok("1") {
        panic!("{test}: cannot run end-to-end test with USERNET_E2E=1: {reason}");
    }
    // Straight to the stderr handle, not eprintln!, so libtest's capture does not hide it.
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {reason}");
    false
}

fn is_root() -> bool {
    // "Uid:\treal\teffective\tsaved\tfs"
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// The full path of an executable found in PATH.
pub fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].iter().map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Polls `cond` every 20 ms until it holds or `deadline` has passed; returns whether it held.
pub fn poll_until(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// Polls `cond` until it holds; panics naming `what` was waited for when `deadline` passes.
#[track_caller]
pub fn wait_until(deadline: Duration, what: &str, cond: impl FnMut() -> bool) {
    if !poll_until(deadline, cond) {
        panic!("timed out after {deadline:?} waiting for {what}");
    }
}

// ---------------------------------------------------------------------------------------------
// Running commands with a deadline
// ---------------------------------------------------------------------------------------------

/// What a command did: exit status (None if it was killed by the rig), its output.
#[derive(Debug)]
pub struct RunOutput {
    pub what: String,
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    /// The deadline passed and the rig killed the command.
    pub timed_out: bool,
    /// The `until` condition held and the rig killed the command.
    pub stopped: bool,
    pub elapsed: Duration,
}

impl RunOutput {
    pub fn success(&self) -> bool {
        self.status.map(|s| s.success()).unwrap_or(false)
    }

    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// A multi-line account for failure messages.
    pub fn describe(&self) -> String {
        let how = if self.timed_out {
            "killed at its deadline".to_string()
        } else if self.stopped {
            "stopped by the rig once done".to_string()
        } else {
            format!("{:?}", self.status)
        };
        format!(
            "--- `{}`: {how} after {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.what,
            self.elapsed,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

fn describe_command(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn read_back(mut f: File) -> String {
    let mut s = String::new();
    let _ = f.seek(SeekFrom::Start(0));
    let mut bytes = Vec::new();
    let _ = f.read_to_end(&mut bytes);
    s.push_str(&String::from_utf8_lossy(&bytes));
    s
}

/// Runs `cmd` to completion, killing it at `deadline`.
pub fn run_with_deadline(cmd: Command, deadline: Duration) -> RunOutput {
    run_until(cmd, deadline, || false)
}

/// Runs `cmd` until it exits, `until` holds (then it is killed: for daemons like dhclient -d
/// that keep running once done), or `deadline` passes (then it is killed too).
/// Output goes to files, not pipes, so a grandchild holding a pipe cannot hang the rig.
pub fn run_until(
    mut cmd: Command,
    deadline: Duration,
    mut until: impl FnMut() -> bool,
) -> RunOutput {
    let what = describe_command(&cmd);
    let out = tempfile::tempfile().expect("tempfile for stdout");
    let err = tempfile::tempfile().expect("tempfile for stderr");
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone().expect("clone stdout file"))
        .stderr(err.try_clone().expect("clone stderr file"));
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn `{what}`: {e}"));
    let mut timed_out = false;
    let mut stopped = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) => {}
            Err(e) => panic!("waiting for `{what}`: {e}"),
        }
        if until() {
            stopped = true;
        } else if start.elapsed() >= deadline {
            timed_out = true;
        }
        if stopped || timed_out {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(POLL);
    };
    RunOutput {
        what,
        status,
        stdout: read_back(out),
        stderr: read_back(err),
        timed_out,
        stopped,
        elapsed: start.elapsed(),
    }
}

fn ip_cmd(args: &[&str]) -> RunOutput {
    let mut c = Command::new("ip");
    c.args(args);
    run_with_deadline(c, Duration::from_secs(10))
}

// ---------------------------------------------------------------------------------------------
// Network namespaces
// ---------------------------------------------------------------------------------------------

/// A network namespace `un-<tag>-<pid>-<n>` with `lo` up and nothing else; deleted on drop after
/// every process inside it is killed.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = unique(tag);
        let out = ip_cmd(&["netns", "add", &name]);
        if !out.success() {
            panic!(
                "cannot create network namespace {name}:\n{}",
                out.describe()
            );
        }
        let ns = Netns { name };
        ns.ip_ok(&["link", "set", "dev", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`, what `--tap-netns` takes.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip netns exec NAME cmd args...`
    pub fn exec<S: AsRef<std::ffi::OsStr>>(&self, cmd: &str, args: &[S]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, cmd]);
        c.args(args);
        c
    }

    /// `ip -n NAME args...`, whatever the outcome.
    pub fn ip(&self, args: &[&str]) -> RunOutput {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip_cmd(&full)
    }

    /// `ip -n NAME args...`; panics with its output when it fails; returns stdout.
    pub fn ip_ok(&self, args: &[&str]) -> String {
        let out = self.ip(args);
        if !out.success() {
            panic!("in namespace {}: {}", self.name, out.describe());
        }
        out.stdout
    }

    /// The one-line `ip -o link show IFACE`, if the link exists.
    pub fn link(&self, iface: &str) -> Option<String> {
        let out = self.ip(&["-o", "link", "show", "dev", iface]);
        out.success().then_some(out.stdout)
    }

    /// Whether IFACE exists and is administratively UP.
    pub fn link_is_up(&self, iface: &str) -> bool {
        self.link(iface).map(|l| link_flags_up(&l)).unwrap_or(false)
    }

    /// The MTU of IFACE.
    pub fn link_mtu(&self, iface: &str) -> Option<u32> {
        let l = self.link(iface)?;
        let mut words = l.split_whitespace();
        while let Some(w) = words.next() {
            if w == "mtu" {
                return words.next()?.parse().ok();
            }
        }
        None
    }

    /// The MAC address of IFACE (lowercase).
    pub fn link_mac(&self, iface: &str) -> Option<String> {
        let l = self.link(iface)?;
        let mut words = l.split_whitespace();
        while let Some(w) = words.next() {
            if w == "link/ether" {
                return words.next().map(|m| m.to_lowercase());
            }
        }
        None
    }

    /// Sets the MAC address of IFACE (bringing it down and up again if the live change fails)
    /// and checks it took.
    pub fn set_mac(&self, iface: &str, mac: &str) {
        if !self
            .ip(&["link", "set", "dev", iface, "address", mac])
            .success()
        {
            self.ip_ok(&["link", "set", "dev", iface, "down"]);
            self.ip_ok(&["link", "set", "dev", iface, "address", mac]);
            self.ip_ok(&["link", "set", "dev", iface, "up"]);
        }
        let now = self.link_mac(iface);
        assert_eq!(
            now.as_deref(),
            Some(mac.to_lowercase().as_str()),
            "MAC of {iface} in {} did not change",
            self.name
        );
    }

    /// The IPv4 addresses on IFACE, as `a.b.c.d/len`.
    pub fn addrs(&self, iface: &str) -> Vec<String> {
        let out = self.ip(&["-o", "-4", "addr", "show", "dev", iface]);
        out.stdout
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                w.position(|x| x == "inet")?;
                w.next().map(str::to_string)
            })
            .collect()
    }

    /// Process ids inside this namespace.
    pub fn pids(&self) -> Vec<u32> {
        ip_cmd(&["netns", "pids", &self.name])
            .stdout
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

fn link_flags_up(line: &str) -> bool {
    match (line.find('<'), line.find('>')) {
        (Some(a), Some(b)) if a < b => line[a + 1..b].split(',').any(|f| f == "UP"),
        _ => false,
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill what lives in the namespace (processes this test started there), then delete it.
        for _ in 0..3 {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                let _ = Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
            poll_until(Duration::from_secs(2), || self.pids().is_empty());
        }
        let out = ip_cmd(&["netns", "del", &self.name]);
        if !out.success() {
            eprintln!(
                "warning: cannot delete namespace {}:\n{}",
                self.name,
                out.describe()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------------

/// A usernet daemon running inside namespace D, serving `tap0` in each guest namespace.
/// Its stdout and stderr go to a log file; it is killed on drop.
pub struct Daemon {
    daemon_ns: String,
    guest_ns: Vec<String>,
    args: Vec<String>,
    child: Option<Child>,
    dir: Option<tempfile::TempDir>,
    log: PathBuf,
    starts: u32,
}

impl Daemon {
    /// Starts `usernet --tap-netns G extra...` inside `daemon_ns` and waits until `tap0` is UP
    /// in `guest_ns`.
    #[track_caller]
    pub fn start_tap(daemon_ns: &Netns, guest_ns: &Netns, extra: &[&str]) -> Daemon {
        Daemon::start_taps(daemon_ns, &[guest_ns], extra)
    }

    /// Starts one daemon serving `tap0` in every namespace of `guests` (one `--tap-netns` each).
    #[track_caller]
    pub fn start_taps(daemon_ns: &Netns, guests: &[&Netns], extra: &[&str]) -> Daemon {
        let mut args = Vec::new();
        for g in guests {
            args.push("--tap-netns".to_string());
            args.push(g.path());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let dir = tempfile::Builder::new()
            .prefix("usernet-e2e-")
            .tempdir()
            .expect("temp dir for the daemon log");
        let log = dir.path().join("daemon.log");
        let mut d = Daemon {
            daemon_ns: daemon_ns.name().to_string(),
            guest_ns: guests.iter().map(|g| g.name().to_string()).collect(),
            args,
            child: None,
            dir: Some(dir),
            log,
            starts: 0,
        };
        d.spawn();
        d
    }

    pub fn args(&self) -> &[String] {
        &self.args
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    #[track_caller]
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open daemon log");
        let _ = writeln!(
            log,
            "=== rig: start #{} in {}: usernet {}",
            self.starts,
            self.daemon_ns,
            self.args.join(" ")
        );
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.daemon_ns, USERNET]);
        cmd.args(&self.args);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "debug");
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log);
        // `ip netns exec` execs the command in place, so this pid is the daemon's.
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {USERNET} via ip netns exec: {e}"));
        self.child = Some(child);
        self.wait_ready();
    }

    /// Waits until every guest's tap0 exists and is UP; fails with the log tail if the daemon
    /// exits first or the deadline passes.
    #[track_caller]
    fn wait_ready(&mut self) {
        let guests = self.guest_ns.clone();
        let mut exited = None;
        let ready = poll_until(TAP_DEADLINE, || {
            if let Some(st) = self.try_exit_status() {
                exited = Some(st);
                return true;
            }
            guests.iter().all(|g| {
                let out = ip_cmd(&["-n", g, "-o", "link", "show", "dev", "tap0"]);
                out.success() && link_flags_up(&out.stdout)
            })
        });
        if let Some(st) = exited {
            self.child = None;
            self.fail(format!(
                "daemon exited with {st} before tap0 was up in {}",
                guests.join(", ")
            ));
        }
        if !ready {
            let links: Vec<String> = guests
                .iter()
                .map(|g| {
                    let out = ip_cmd(&["-n", g, "-o", "link", "show"]);
                    format!("links in {g}:\n{}", out.stdout.trim_end())
                })
                .collect();
            self.fail(format!(
                "tap0 was not UP in every guest namespace within {TAP_DEADLINE:?}\n{}",
                links.join("\n")
            ));
        }
    }

    fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Whether the daemon process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_exit_status().is_none()
    }

    /// The last lines of the daemon's log.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(no log: {e})"));
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(LOG_TAIL_LINES);
        lines[from..].join("\n")
    }

    /// Panics with `msg` and the daemon's log tail.
    #[track_caller]
    pub fn fail(&self, msg: impl Display) -> ! {
        panic!(
            "{msg}\n--- daemon log tail ({}):\n{}\n--- end of daemon log",
            self.log.display(),
            self.log_tail()
        );
    }

    /// Asserts `actual == expected` for `what`; a failure shows the daemon log tail and `context`.
    #[track_caller]
    pub fn check_eq<T: PartialEq + Debug>(
        &self,
        what: &str,
        actual: T,
        expected: T,
        context: &str,
    ) {
        if actual != expected {
            self.fail(format!(
                "{what}: got {actual:?}, expected {expected:?}\n{context}"
            ));
        }
    }

    /// Asserts `cond`; a failure shows `msg` and the daemon log tail.
    #[track_caller]
    pub fn check(&self, cond: bool, msg: impl Display) {
        if !cond {
            self.fail(msg);
        }
    }

    /// Sends SIGTERM and waits for the daemon to exit; returns its exit status.
    #[track_caller]
    pub fn stop(&mut self) -> ExitStatus {
        let Some(mut child) = self.child.take() else {
            self.fail("stop(): daemon is not running");
        };
        if let Ok(Some(st)) = child.try_wait() {
            self.fail(format!("stop(): daemon had already exited with {st}"));
        }
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let mut status = None;
        poll_until(STOP_DEADLINE, || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        });
        match status {
            Some(st) => st,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                self.fail(format!(
                    "daemon did not exit within {STOP_DEADLINE:?} of SIGTERM (killed it)"
                ));
            }
        }
    }

    /// Stops the daemon if it is running (SIGTERM, must exit 0) and starts it again with the
    /// same arguments, waiting again until the taps are up (they are new devices: set MACs
    /// again).
    #[track_caller]
    pub fn restart(&mut self) {
        if self.child.is_some() {
            let st = self.stop();
            self.check(
                st.success(),
                format!("daemon exited with {st} on SIGTERM, expected 0"),
            );
        }
        self.spawn();
    }

    // Client helpers that fail with the daemon's log as well as the client's output.

    /// Runs busybox udhcpc in `ns` on `iface`; panics with client output and daemon log.
    #[track_caller]
    pub fn udhcpc(&self, ns: &Netns, iface: &str, extra: &[&str]) -> LeaseInfo {
        match try_udhcpc(ns, iface, extra) {
            Ok(lease) => lease,
            Err(e) => self.fail(e),
        }
    }

    /// Runs ISC dhclient in `ns` on `iface`; panics with client output and daemon log.
    #[track_caller]
    pub fn dhclient(&self, ns: &Netns, iface: &str) -> LeaseInfo {
        match try_dhclient(ns, iface) {
            Ok(lease) => lease,
            Err(e) => self.fail(e),
        }
    }

    /// Asserts that `addr` answers a ping from `ns`.
    #[track_caller]
    pub fn assert_ping(&self, ns: &Netns, addr: &str, count: u32) {
        let out = ping_output(ns, addr, count);
        if !out.success() {
            self.fail(format!(
                "ping {addr} from {} got no answer\n{}\n{}",
                ns.name(),
                out.describe(),
                describe_ns(ns)
            ));
        }
    }

    /// Asserts that `addr` does not answer a ping from `ns`.
    #[track_caller]
    pub fn assert_no_ping(&self, ns: &Netns, addr: &str, count: u32) {
        let out = ping_output(ns, addr, count);
        if out.success() {
            self.fail(format!(
                "ping {addr} from {} was answered, expected silence\n{}",
                ns.name(),
                out.describe()
            ));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                let kept = dir.keep();
                eprintln!("daemon log kept at {}", kept.join("daemon.log").display());
            }
        }
    }
}

/// Addresses and routes of a namespace, for failure messages.
pub fn describe_ns(ns: &Netns) -> String {
    let a = ns.ip(&["-o", "addr", "show"]);
    let r = ns.ip(&["route", "show"]);
    let n = ns.ip(&["neigh", "show"]);
    format!(
        "--- {} addresses:\n{}\n--- routes:\n{}\n--- neighbours:\n{}",
        ns.name(),
        a.stdout.trim_end(),
        r.stdout.trim_end(),
        n.stdout.trim_end()
    )
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// What a real DHCP client was given, read from the environment its script saw.
#[derive(Debug, Clone)]
pub struct LeaseInfo {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub mtu: Option<u16>,
    /// Every variable the script recorded for the lease event (`subnet` is the dotted mask).
    pub vars: BTreeMap<String, String>,
    /// The sequence of script events (e.g. deconfig, bound; PREINIT, BOUND).
    pub events: Vec<String>,
    /// The client's stdout/stderr and the raw script record, for messages.
    pub client_output: String,
}

impl LeaseInfo {
    /// The dotted subnet mask.
    pub fn mask(&self) -> Ipv4Addr {
        prefix_to_mask(self.prefix)
    }
}

pub fn prefix_to_mask(prefix: u8) -> Ipv4Addr {
    let bits: u32 = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    };
    Ipv4Addr::from(bits)
}

fn mask_to_prefix(mask: Ipv4Addr) -> Option<u8> {
    let bits = u32::from(mask);
    let ones = bits.leading_ones();
    (bits.checked_shl(ones).unwrap_or(0) == 0).then_some(ones as u8)
}

/// Events after which a client has a usable lease.
const LEASE_EVENTS: &[&str] = &["bound", "renew", "BOUND", "RENEW", "REBIND", "REBOOT"];

/// One recorded script invocation: `event=...`, `key=value` lines, `end`.
fn parse_record(text: &str) -> Vec<(String, BTreeMap<String, String>)> {
    let mut blocks = Vec::new();
    let mut cur: Option<(String, BTreeMap<String, String>)> = None;
    for line in text.lines() {
        if let Some(ev) = line.strip_prefix("event=") {
            cur = Some((ev.to_string(), BTreeMap::new()));
        } else if line == "end" {
            if let Some(b) = cur.take() {
                blocks.push(b);
            }
        } else if let (Some((_, vars)), Some((k, v))) = (cur.as_mut(), line.split_once('=')) {
            vars.insert(k.to_string(), v.to_string());
        }
    }
    blocks
}

fn lease_from_record(record: &str, client_output: String) -> Result<LeaseInfo, String> {
    let blocks = parse_record(record);
    let events = blocks.iter().map(|(e, _)| e.clone()).collect();
    let Some((ev, vars)) = blocks
        .iter()
        .rev()
        .find(|(e, _)| LEASE_EVENTS.contains(&e.as_str()))
    else {
        return Err(format!(
            "the client's script never saw a lease event\n{client_output}"
        ));
    };
    let get = |k: &str| vars.get(k).map(|s| s.trim()).filter(|s| !s.is_empty());
    let bad = |what: &str| format!("lease event {ev}: {what}\n{client_output}");
    if let Some(applied) = get("applied") {
        if applied != "ok" {
            return Err(bad(&format!(
                "the script could not apply the lease: {applied}"
            )));
        }
    }
    let ip: Ipv4Addr = get("ip")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no valid ip"))?;
    let prefix = match get("mask").and_then(|m| m.parse::<u8>().ok()) {
        Some(p) if p <= 32 => p,
        _ => get("subnet")
            .and_then(|s| s.parse().ok())
            .and_then(mask_to_prefix)
            .ok_or_else(|| bad("no valid subnet mask"))?,
    };
    let router = match get("router") {
        Some(r) => Some(
            r.split_whitespace()
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("router is not an address"))?,
        ),
        None => None,
    };
    let dns = match get("dns") {
        Some(d) => d
            .split_whitespace()
            .map(|s| s.parse().map_err(|_| bad("dns is not a list of addresses")))
            .collect::<Result<Vec<Ipv4Addr>, String>>()?,
        None => Vec::new(),
    };
    let mtu = match get("mtu") {
        Some(m) => Some(m.parse().map_err(|_| bad("mtu is not a number"))?),
        None => None,
    };
    Ok(LeaseInfo {
        ip,
        prefix,
        router,
        dns,
        mtu,
        vars: vars.clone(),
        events,
        client_output,
    })
}

fn write_script(path: &Path, text: &str) {
    fs::write(path, text).expect("write client script");
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod client script");
}

/// The udhcpc event script: records its environment, applies the lease on bound/renew.
/// busybox udhcpc gives `subnet` as the dotted mask and `mask` as the prefix length.
const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
rec='@RECORD@'
apply() {
    ip addr flush dev "$interface" || return 1
    ip addr add "$ip/$mask" dev "$interface" || return 1
    if [ -n "$mtu" ]; then ip link set dev "$interface" mtu "$mtu" || return 1; fi
    for r in $router; do ip route replace default via "$r" dev "$interface" || return 1; break; done
    return 0
}
applied=
case "$1" in
    deconfig) ip addr flush dev "$interface"; ip link set dev "$interface" up ;;
    bound|renew) if apply; then applied=ok; else applied="FAILED (see client stderr)"; fi ;;
esac
{
    printf 'event=%s\n' "$1"
    printf 'interface=%s\n' "$interface"
    printf 'ip=%s\n' "$ip"
    printf 'subnet=%s\n' "$subnet"
    printf 'mask=%s\n' "$mask"
    printf 'router=%s\n' "$router"
    printf 'dns=%s\n' "$dns"
    printf 'mtu=%s\n' "$mtu"
    printf 'domain=%s\n' "$domain"
    printf 'search=%s\n' "$search"
    printf 'broadcast=%s\n' "$broadcast"
    printf 'lease=%s\n' "$lease"
    printf 'serverid=%s\n' "$serverid"
    printf 'message=%s\n' "$message"
    printf 'applied=%s\n' "$applied"
    echo end
} >> "$rec"
exit 0
"#;

/// Runs `busybox udhcpc -i IFACE -n -q -f -t 5 -T 1 -O mtu -s SCRIPT extra...` in `ns`.
pub fn try_udhcpc(ns: &Netns, iface: &str, extra: &[&str]) -> Result<LeaseInfo, String> {
    let dir = tempfile::Builder::new()
        .prefix("usernet-udhcpc-")
        .tempdir()
        .expect("temp dir for udhcpc");
    let record = dir.path().join("record");
    let script = dir.path().join("script");
    write_script(
        &script,
        &UDHCPC_SCRIPT.replace("@RECORD@", record.to_str().expect("utf-8 temp path")),
    );
    let script_s = script.to_string_lossy().into_owned();
    let mut args = vec![
        "udhcpc", "-i", iface, "-n", "-q", "-f", "-t", "5", "-T", "1", "-O", "mtu", "-s", &script_s,
    ];
    args.extend_from_slice(extra);
    let out = run_with_deadline(ns.exec("busybox", &args), CLIENT_DEADLINE);
    let rec = fs::read_to_string(&record).unwrap_or_default();
    let report = format!(
        "{}\n--- udhcpc script record:\n{}\n{}",
        out.describe(),
        rec.trim_end(),
        describe_ns(ns)
    );
    if !out.success() {
        return Err(format!("udhcpc in {} got no lease\n{report}", ns.name()));
    }
    lease_from_record(&rec, report)
}

/// Like `try_udhcpc`, panicking with the client's output on failure.
#[track_caller]
pub fn udhcpc(ns: &Netns, iface: &str, extra: &[&str]) -> LeaseInfo {
    match try_udhcpc(ns, iface, extra) {
        Ok(lease) => lease,
        Err(e) => panic!("{e}"),
    }
}

/// The dhclient script: records its environment, applies the lease on BOUND/RENEW/REBIND/REBOOT.
const DHCLIENT_SCRIPT: &str = r#"#!/bin/sh
rec='@RECORD@'
apply() {
    ip addr flush dev "$interface" || return 1
    ip addr add "$new_ip_address/$new_subnet_mask" dev "$interface" || return 1
    if [ -n "$new_interface_mtu" ]; then ip link set dev "$interface" mtu "$new_interface_mtu" || return 1; fi
    for r in $new_routers; do ip route replace default via "$r" dev "$interface" || return 1; break; done
    return 0
}
applied=
case "$reason" in
    PREINIT) ip link set dev "$interface" up ;;
    BOUND|RENEW|REBIND|REBOOT) if apply; then applied=ok; else applied="FAILED (see client stderr)"; fi ;;
esac
{
    printf 'event=%s\n' "$reason"
    printf 'interface=%s\n' "$interface"
    printf 'ip=%s\n' "$new_ip_address"
    printf 'subnet=%s\n' "$new_subnet_mask"
    printf 'router=%s\n' "$new_routers"
    printf 'dns=%s\n' "$new_domain_name_servers"
    printf 'mtu=%s\n' "$new_interface_mtu"
    printf 'domain=%s\n' "$new_domain_name"
    printf 'search=%s\n' "$new_domain_search"
    printf 'broadcast=%s\n' "$new_broadcast_address"
    printf 'lease=%s\n' "$new_dhcp_lease_time"
    printf 'serverid=%s\n' "$new_dhcp_server_identifier"
    printf 'applied=%s\n' "$applied"
    echo end
} >> "$rec"
exit 0
"#;

const DHCLIENT_CONF: &str = "\
timeout 20;
retry 1;
initial-interval 1;
request subnet-mask, broadcast-address, routers, domain-name-servers, domain-search, interface-mtu;
";

/// Runs ISC dhclient in the foreground (`-1 -d -v`, own conf, script, lease and pid files) in
/// `ns`, and stops it once its script recorded a lease.
pub fn try_dhclient(ns: &Netns, iface: &str) -> Result<LeaseInfo, String> {
    let dir = tempfile::Builder::new()
        .prefix("usernet-dhclient-")
        .tempdir()
        .expect("temp dir for dhclient");
    let record = dir.path().join("record");
    let script = dir.path().join("script");
    let conf = dir.path().join("dhclient.conf");
    let leases = dir.path().join("dhclient.leases");
    let pidfile = dir.path().join("dhclient.pid");
    write_script(
        &script,
        &DHCLIENT_SCRIPT.replace("@RECORD@", record.to_str().expect("utf-8 temp path")),
    );
    fs::write(&conf, DHCLIENT_CONF).expect("write dhclient.conf");
    fs::write(&leases, "").expect("write dhclient lease file");
    let p = |p: &Path| p.to_string_lossy().into_owned();
    let args = [
        "-4".to_string(),
        "-1".to_string(),
        "-d".to_string(),
        "-v".to_string(),
        "-sf".to_string(),
        p(&script),
        "-cf".to_string(),
        p(&conf),
        "-lf".to_string(),
        p(&leases),
        "-pf".to_string(),
        p(&pidfile),
        iface.to_string(),
    ];
    let has_lease = || {
        let rec = fs::read_to_string(&record).unwrap_or_default();
        parse_record(&rec)
            .iter()
            .any(|(e, _)| LEASE_EVENTS.contains(&e.as_str()))
    };
    let out = run_until(ns.exec("dhclient", &args), CLIENT_DEADLINE, has_lease);
    let rec = fs::read_to_string(&record).unwrap_or_default();
    let report = format!(
        "{}\n--- dhclient script record:\n{}\n{}",
        out.describe(),
        rec.trim_end(),
        describe_ns(ns)
    );
    if !out.stopped {
        return Err(format!("dhclient in {} got no lease\n{report}", ns.name()));
    }
    lease_from_record(&rec, report)
}

/// Like `try_dhclient`, panicking with the client's output on failure.
#[track_caller]
pub fn dhclient(ns: &Netns, iface: &str) -> LeaseInfo {
    match try_dhclient(ns, iface) {
        Ok(lease) => lease,
        Err(e) => panic!("{e}"),
    }
}

/// `busybox ping -c COUNT -W 2 ADDR` in `ns`, with its output.
pub fn ping_output(ns: &Netns, addr: &str, count: u32) -> RunOutput {
    let count_s = count.to_string();
    let cmd = ns.exec("busybox", &["ping", "-c", &count_s, "-W", "2", addr]);
    run_with_deadline(cmd, Duration::from_secs(u64::from(count) + 10))
}

/// Whether `addr` answers at least one of COUNT pings from `ns`.
pub fn ping(ns: &Netns, addr: &str, count: u32) -> bool {
    ping_output(ns, addr, count).success()
}

/// A file in a fresh temp dir (kept alive by the returned TempDir).
pub fn temp_file(name: &str, contents: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("usernet-e2e-")
        .tempdir()
        .expect("temp dir");
    let path = dir.path().join(name);
    fs::write(&path, contents).expect("write temp file");
    (dir, path)
}

pub fn ip4(s: &str) -> Ipv4Addr {
    s.parse().expect("test address literal")
}
