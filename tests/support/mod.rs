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

// ---------------------------------------------------------------------------------------------
// Outbound rig: daemon statistics, background servers, a server namespace behind the daemon
// ---------------------------------------------------------------------------------------------

/// How long the daemon gets to answer SIGUSR1 with a stats line.
pub const STATS_DEADLINE: Duration = Duration::from_secs(5);

/// The prefix of the daemon's stats line (the JSON follows it).
pub const STATS_PREFIX: &str = "usernet stats: ";

/// Every `usernet stats: {...}` JSON in `log`, in order (unparsable ones as None).
fn stats_lines(log: &str) -> Vec<Option<serde_json::Value>> {
    log.lines()
        .filter_map(|l| l.find(STATS_PREFIX).map(|i| &l[i + STATS_PREFIX.len()..]))
        .map(|rest| {
            serde_json::Deserializer::from_str(rest)
                .into_iter::<serde_json::Value>()
                .next()
                .and_then(|r| r.ok())
        })
        .collect()
}

/// Whether process `pid` exists and is not a zombie.
fn process_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ..." — the state follows the last ')'.
        Ok(s) => s
            .rfind(')')
            .and_then(|i| s[i + 1..].split_whitespace().next())
            .map(|st| st != "Z" && st != "X")
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// The number at a dotted `path` ("tcp.open") of a stats value.
pub fn stat_u64(v: &serde_json::Value, path: &str) -> Option<u64> {
    let mut cur = v;
    for k in path.split('.') {
        cur = cur.get(k)?;
    }
    cur.as_u64()
}

/// The sum of every number anywhere under `v` (e.g. all drop counters of `gateway`).
pub fn stat_sum(v: &serde_json::Value) -> u64 {
    match v {
        serde_json::Value::Number(n) => n.as_u64().unwrap_or(0),
        serde_json::Value::Object(m) => m.values().map(stat_sum).sum(),
        serde_json::Value::Array(a) => a.iter().map(stat_sum).sum(),
        _ => 0,
    }
}

/// Every numeric leaf under `v` as `dotted.path -> value`.
pub fn stat_leaves(v: &serde_json::Value) -> BTreeMap<String, u64> {
    fn walk(v: &serde_json::Value, prefix: &str, out: &mut BTreeMap<String, u64>) {
        match v {
            serde_json::Value::Number(n) => {
                out.insert(prefix.to_string(), n.as_u64().unwrap_or(0));
            }
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(x, &p, out);
                }
            }
            _ => {}
        }
    }
    let mut out = BTreeMap::new();
    walk(v, "", &mut out);
    out
}

/// The drop counters of a stats value: every numeric leaf whose own name starts with `drop`
/// or is `malformed` (e.g. `gateway.drop_malformed_ipv4`, `tcp.drop_malformed`,
/// `fragments.drop_overlap`), as `dotted.path -> value`.
pub fn stat_drops(v: &serde_json::Value) -> BTreeMap<String, u64> {
    stat_leaves(v)
        .into_iter()
        .filter(|(k, _)| {
            let last = k.rsplit('.').next().unwrap_or(k);
            last.starts_with("drop") || last == "malformed"
        })
        .collect()
}

impl Daemon {
    /// Sends SIGUSR1 and returns the JSON of the `usernet stats: {...}` line the daemon writes
    /// to its log in answer; fails (with the log tail) if no new parsable line comes within
    /// `STATS_DEADLINE` or the daemon dies.
    #[track_caller]
    pub fn stats(&self) -> serde_json::Value {
        match self.try_stats() {
            Ok(v) => v,
            Err(e) => self.fail(e),
        }
    }

    /// Like `stats`, returning the reason instead of failing.
    pub fn try_stats(&self) -> Result<serde_json::Value, String> {
        let Some(pid) = self.pid() else {
            return Err("stats(): daemon is not running".to_string());
        };
        if !process_alive(pid) {
            return Err(format!("stats(): daemon (pid {pid}) has exited"));
        }
        // Only what is written after the signal counts, and only complete lines.
        let start = fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        let read_new = || {
            let mut bytes = Vec::new();
            if let Ok(mut f) = File::open(&self.log) {
                let _ = f.seek(SeekFrom::Start(start));
                let _ = f.read_to_end(&mut bytes);
            }
            let text = String::from_utf8_lossy(&bytes).into_owned();
            match text.rfind('\n') {
                Some(i) => text[..=i].to_string(),
                None => String::new(),
            }
        };
        let st = Command::new("kill")
            .args(["-USR1", &pid.to_string()])
            .status();
        if !st.map(|s| s.success()).unwrap_or(false) {
            return Err(format!("stats(): kill -USR1 {pid} failed"));
        }
        let mut found = None;
        let mut unparsable = false;
        let mut died = false;
        poll_until(STATS_DEADLINE, || {
            let lines = stats_lines(&read_new());
            if let Some(v) = lines.iter().flatten().next() {
                found = Some(v.clone());
                return true;
            }
            unparsable = !lines.is_empty();
            if !process_alive(pid) {
                died = true;
                return true;
            }
            false
        });
        match found {
            Some(v) => Ok(v),
            None if died => Err(format!(
                "stats(): the daemon (pid {pid}) died on SIGUSR1 (no stats handler?)"
            )),
            None if unparsable => Err(format!(
                "stats(): the daemon's `{STATS_PREFIX}` line after SIGUSR1 is not JSON"
            )),
            None => Err(format!(
                "stats(): no `{STATS_PREFIX}{{...}}` line in the log within {STATS_DEADLINE:?} of SIGUSR1"
            )),
        }
    }

    /// Polls `stats()` (every 200 ms) until `cond` holds; fails naming `what`, with the last
    /// stats, when `deadline` passes. Returns the stats that satisfied `cond`.
    #[track_caller]
    pub fn wait_stats(
        &self,
        deadline: Duration,
        what: &str,
        mut cond: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let end = Instant::now() + deadline;
        loop {
            let v = self.stats();
            if cond(&v) {
                return v;
            }
            if Instant::now() >= end {
                self.fail(format!(
                    "timed out after {deadline:?} waiting for stats: {what}\n--- last stats: {v}"
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A process started in a namespace in the background (a server, or a client that runs while
/// the test does something else). Its stdout and stderr go to files; it is killed on drop.
pub struct BgProcess {
    what: String,
    child: Option<Child>,
    _dir: tempfile::TempDir,
    out: PathBuf,
    err: PathBuf,
    start: Instant,
    status: Option<ExitStatus>,
}

impl BgProcess {
    pub fn spawn(mut cmd: Command) -> BgProcess {
        let what = describe_command(&cmd);
        let dir = tempfile::Builder::new()
            .prefix("usernet-bg-")
            .tempdir()
            .expect("temp dir for a background process");
        let out = dir.path().join("stdout");
        let err = dir.path().join("stderr");
        let open = |p: &Path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .expect("open background output file")
        };
        cmd.stdin(Stdio::null())
            .stdout(open(&out))
            .stderr(open(&err));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn `{what}`: {e}"));
        BgProcess {
            what,
            child: Some(child),
            _dir: dir,
            out,
            err,
            start: Instant::now(),
            status: None,
        }
    }

    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.out).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Whether it is still running (records its exit status once it has exited).
    pub fn running(&mut self) -> bool {
        if self.status.is_some() {
            return false;
        }
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(st))) => {
                self.status = Some(st);
                false
            }
            Some(Ok(None)) => true,
            _ => false,
        }
    }

    /// Waits until it exits or `deadline` passes (then it is killed); returns the account.
    pub fn finish(&mut self, deadline: Duration) -> RunOutput {
        let done = poll_until(deadline, || !self.running());
        let timed_out = !done;
        if timed_out {
            self.kill();
        }
        RunOutput {
            what: self.what.clone(),
            status: self.status,
            stdout: self.stdout(),
            stderr: self.stderr(),
            timed_out,
            stopped: false,
            elapsed: self.start.elapsed(),
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// An account of it so far, for failure messages.
    pub fn describe(&mut self) -> String {
        let running = self.running();
        format!(
            "--- background `{}` ({}, {:?} since start)\n--- stdout:\n{}\n--- stderr:\n{}",
            self.what,
            if running {
                "running".to_string()
            } else {
                format!("exited: {:?}", self.status)
            },
            self.start.elapsed(),
            self.stdout().trim_end(),
            self.stderr().trim_end()
        )
    }
}

impl Drop for BgProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The python helper with the test servers and clients (tests/support/nettool.py).
pub fn nettool_path() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/nettool.py").to_string()
}

/// Whether `ss -Hln{proto}` in `ns` shows a socket listening on local `port` (proto `t`/`u`).
pub fn listening(ns: &Netns, proto: char, port: u16) -> bool {
    let flags = format!("-Hln{proto}");
    let filter = format!("sport = :{port}");
    let out = run_with_deadline(
        ns.exec("ss", &[flags.as_str(), filter.as_str()]),
        Duration::from_secs(5),
    );
    out.success() && !out.stdout.trim().is_empty()
}

/// How many TCP sockets in `ns` are in SYN-SENT towards `dst` (`a.b.c.d:port`).
pub fn syn_sent_count(ns: &Netns, dst: &str) -> usize {
    let out = run_with_deadline(
        ns.exec("ss", &["-Htn", "state", "syn-sent"]),
        Duration::from_secs(5),
    );
    out.stdout
        .lines()
        .filter(|l| l.split_whitespace().any(|w| w == dst))
        .count()
}

/// A counter from `/proc/net/snmp` in `ns`, e.g. ("Icmp", "InEchos").
pub fn snmp_counter(ns: &Netns, group: &str, field: &str) -> Option<u64> {
    let out = run_with_deadline(ns.exec("cat", &["/proc/net/snmp"]), Duration::from_secs(5));
    let prefix = format!("{group}:");
    let mut lines = out.stdout.lines().filter(|l| l.starts_with(&prefix));
    let names: Vec<&str> = lines.next()?.split_whitespace().skip(1).collect();
    let values: Vec<&str> = lines.next()?.split_whitespace().skip(1).collect();
    let i = names.iter().position(|n| *n == field)?;
    values.get(i)?.parse().ok()
}

/// Writes `value` to `/proc/sys/<key with / for .>` inside `ns`; panics on failure.
pub fn ns_sysctl(ns: &Netns, key: &str, value: &str) {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let script = format!("echo '{value}' > {path}");
    let out = run_with_deadline(
        ns.exec("sh", &["-c", script.as_str()]),
        Duration::from_secs(5),
    );
    if !out.success() {
        panic!("sysctl {key}={value} in {}: {}", ns.name(), out.describe());
    }
}

/// The D side of the veth pair between the daemon's namespace and the server namespace.
pub const VETH_D_IP: &str = "10.200.0.1";
/// The server namespace's address, reachable from the daemon's namespace.
pub const VETH_S_IP: &str = "10.200.0.2";
/// A subnet routed from D via S, where S drops everything (no forwarding): SYNs go unanswered.
pub const BLACKHOLE_NET: &str = "10.201.0.0/24";

/// The outbound rig: namespace D runs the daemon (only `lo` and a veth to S, a route to
/// 10.201.0.0/24 via S, no default route); S is a server namespace at 10.200.0.2 with forwarding
/// off (so 10.201.0.x silently drops SYNs); G is the guest with usernet's tap0, configured by
/// udhcpc (192.168.5.15/24, default route via usernet's 192.168.5.2).
pub struct OutboundRig {
    // Dropped first: the daemon, then the namespaces (which kill whatever runs in them).
    pub daemon: Daemon,
    pub lease: LeaseInfo,
    pub g: Netns,
    pub s: Netns,
    pub d: Netns,
}

impl OutboundRig {
    #[track_caller]
    pub fn new(extra_daemon_args: &[&str]) -> OutboundRig {
        let d = Netns::new("d");
        let s = Netns::new("s");
        let g = Netns::new("g");
        // The veth pair D <-> S (names are per namespace, so fixed names cannot collide).
        d.ip_ok(&[
            "link",
            "add",
            "veth-d",
            "type",
            "veth",
            "peer",
            "name",
            "veth-s",
            "netns",
            s.name(),
        ]);
        d.ip_ok(&["addr", "add", &format!("{VETH_D_IP}/24"), "dev", "veth-d"]);
        s.ip_ok(&["addr", "add", &format!("{VETH_S_IP}/24"), "dev", "veth-s"]);
        d.ip_ok(&["link", "set", "dev", "veth-d", "up"]);
        s.ip_ok(&["link", "set", "dev", "veth-s", "up"]);
        d.ip_ok(&["route", "add", BLACKHOLE_NET, "via", VETH_S_IP]);
        // S must not forward (the silent SYN drop for 10.201.0.x relies on it).
        ns_sysctl(&s, "net.ipv4.ip_forward", "0");
        // The daemon may use unprivileged ICMP ping sockets (as most distributions allow).
        ns_sysctl(&d, "net.ipv4.ping_group_range", "0 2147483647");
        // No IPv6 chatter from the guest (router solicitations, MLD): keeps counters quiet.
        ns_sysctl(&g, "net.ipv6.conf.all.disable_ipv6", "1");
        ns_sysctl(&g, "net.ipv6.conf.default.disable_ipv6", "1");

        let daemon = Daemon::start_tap(&d, &g, extra_daemon_args);
        let lease = daemon.udhcpc(&g, "tap0", &[]);
        daemon.check_eq(
            "guest address",
            lease.ip,
            ip4("192.168.5.15"),
            &lease.client_output,
        );
        daemon.check_eq(
            "guest router",
            lease.router,
            Some(ip4("192.168.5.2")),
            &lease.client_output,
        );
        // The veth must be usable before any test relies on it.
        let rig = OutboundRig {
            daemon,
            lease,
            g,
            s,
            d,
        };
        let ping = ping_output(&rig.d, VETH_S_IP, 1);
        if !ping.success() {
            rig.fail(format!(
                "rig: D cannot ping S over the veth\n{}\n{}\n{}",
                ping.describe(),
                describe_ns(&rig.d),
                describe_ns(&rig.s)
            ));
        }
        rig
    }

    #[track_caller]
    pub fn fail(&self, msg: impl Display) -> ! {
        self.daemon.fail(msg)
    }

    #[track_caller]
    pub fn check(&self, cond: bool, msg: impl Display) {
        self.daemon.check(cond, msg)
    }

    /// `python3 nettool.py args...` in `ns`.
    pub fn tool(&self, ns: &Netns, args: &[&str]) -> Command {
        let tool = nettool_path();
        let mut full: Vec<&str> = vec!["-u", tool.as_str()];
        full.extend_from_slice(args);
        ns.exec("python3", &full)
    }

    /// Runs a nettool client in `ns` to completion (killed at `deadline`) and parses the JSON
    /// on its last stdout line; fails with its output and the daemon log otherwise.
    #[track_caller]
    pub fn tool_json(
        &self,
        ns: &Netns,
        args: &[&str],
        deadline: Duration,
    ) -> (serde_json::Value, RunOutput) {
        let out = run_with_deadline(self.tool(ns, args), deadline);
        match parse_last_json(&out.stdout) {
            Some(v) if out.success() => (v, out),
            _ => self.fail(format!(
                "client in {} failed or printed no JSON\n{}",
                ns.name(),
                out.describe()
            )),
        }
    }

    /// Starts a server in `ns` and waits until it listens on `port` (`proto` 't' or 'u').
    #[track_caller]
    pub fn server(&self, ns: &Netns, cmd: Command, proto: char, port: u16) -> BgProcess {
        let mut p = BgProcess::spawn(cmd);
        let mut exited = false;
        let ok = poll_until(Duration::from_secs(10), || {
            if !p.running() {
                exited = true;
                return true;
            }
            listening(ns, proto, port)
        });
        if exited || !ok {
            let why = if exited {
                "exited"
            } else {
                "did not listen within 10 s"
            };
            self.fail(format!(
                "server in {} on port {port}/{proto} {why}\n{}",
                ns.name(),
                p.describe()
            ));
        }
        p
    }

    /// A nettool server in `ns`.
    #[track_caller]
    pub fn tool_server(&self, ns: &Netns, args: &[&str], proto: char, port: u16) -> BgProcess {
        self.server(ns, self.tool(ns, args), proto, port)
    }

    /// `busybox httpd -f -p BIND:PORT -h DIR` in `ns`.
    #[track_caller]
    pub fn httpd(&self, ns: &Netns, bind: &str, port: u16, dir: &Path) -> BgProcess {
        let addr = format!("{bind}:{port}");
        let dir = dir.to_string_lossy().into_owned();
        let cmd = ns.exec(
            "busybox",
            &[
                "httpd",
                "-f",
                "-vv",
                "-p",
                addr.as_str(),
                "-h",
                dir.as_str(),
            ],
        );
        self.server(ns, cmd, 't', port)
    }

    /// The guest's neighbour entry (MAC) for the router (a ping, answered or not, makes the
    /// guest resolve it first).
    #[track_caller]
    pub fn router_mac(&self) -> String {
        let _ = ping_output(&self.g, "192.168.5.2", 1);
        let out = self
            .g
            .ip_ok(&["neigh", "show", "192.168.5.2", "dev", "tap0"]);
        let mut w = out.split_whitespace();
        while let Some(x) = w.next() {
            if x == "lladdr" {
                if let Some(m) = w.next() {
                    return m.to_string();
                }
            }
        }
        self.fail(format!(
            "no neighbour entry for 192.168.5.2 in the guest: {out}"
        ))
    }
}

/// The JSON value on the last non-empty line of `text`.
pub fn parse_last_json(text: &str) -> Option<serde_json::Value> {
    let line = text.lines().rev().find(|l| !l.trim().is_empty())?;
    serde_json::from_str(line).ok()
}

/// Every JSON line of `text` (servers print one per connection).
pub fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}
