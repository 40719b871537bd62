//! End-to-end, side by side: usernet against slirp4netns and pasta on the same rig in one run,
//! and a QEMU guest through usernet and through passt.
//!
//! `cargo bench --bench e2e` (root; see benches/README.md for the knobs and the results).
//!
//! The rig, built afresh for every stack and MTU: a guest network namespace G whose only link is
//! the stack's tap device, and the stack in its own namespace S. S has `lo` and one veth into an
//! empty namespace K (no address there, so nothing even answers ARP): pasta and passt refuse to
//! start without an interface that has an address and a default route, and every stack gets the
//! same rig. Every server (iperf3, the bench's echo and hold servers) listens on S's 127.0.0.1,
//! which each stack maps to an address the guest reaches (usernet 192.168.5.2, slirp4netns
//! 10.0.2.2, pasta and passt their gateway address). Nothing is ever sent to a real address.
//!
//! The bench re-executes its own binary (`__e2e_child ROLE ...`) inside G for the latency,
//! connection-rate and idle-connection clients and inside S for the matching servers: timing in
//! Rust with blocking sockets and TCP_NODELAY. Throughput is iperf3's. Every run has a deadline;
//! a run that fails or stalls is recorded with its reason and the bench moves on. Namespaces and
//! processes are removed on drop (and namespaces a killed earlier run left behind, at start).

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const CHILD: &str = "__e2e_child";
/// The usernet binary cargo built for this bench; the bench runs a private copy of it.
const USERNET_BUILT: &str = env!("CARGO_BIN_EXE_usernet");
static USERNET: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// The copy of the usernet binary taken at start: target/release/usernet is shared, and a
/// build running beside the bench would otherwise change the binary between its rows.
fn usernet() -> &'static Path {
    USERNET
        .get()
        .map(PathBuf::as_path)
        .unwrap_or(Path::new(USERNET_BUILT))
}
const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");
const POLL: Duration = Duration::from_millis(20);

/// Ports on S's loopback. iperf3 servers take a fresh port from IPERF_BASE up for every run.
const ECHO_PORT: u16 = 7001;
const HOLD_PORT: u16 = 7002;
const VM_UP_PORT: u16 = 7101;
const VM_DOWN_PORT: u16 = 7102;
const IPERF_BASE: u16 = 5201;
/// Ephemeral ports in G and S, above every port the bench listens on.
const EPHEMERAL: &str = "20000 65000";

/// The veth between S and the empty namespace K; S's default route points at K.
const S_ADDR: &str = "10.99.0.1/24";
const S_GATEWAY: &str = "10.99.0.2";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(CHILD) {
        std::process::exit(child::main(&args[2..]));
    }
    harness::main();
}

fn raise_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// A listener on 127.0.0.1:PORT with a backlog of 4096 (std's is 128: with SYN cookies a burst
/// of handshakes could then succeed for the stack and be dropped by the kernel later).
fn listen(port: u16) -> std::io::Result<TcpListener> {
    let l = TcpListener::bind(("127.0.0.1", port))?;
    // SAFETY: listen() again on a listening socket we own only changes its backlog.
    unsafe { libc::listen(l.as_raw_fd(), 4096) };
    Ok(l)
}

// =============================================================================================
// The child roles (run inside G or S by `ip netns exec NS /proc/self/exe __e2e_child ROLE ...`)
// =============================================================================================

mod child {
    use super::*;

    pub fn main(args: &[String]) -> i32 {
        raise_nofile();
        let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
        let num = |i: usize| arg(i).parse::<u64>().unwrap_or(0);
        let addr = || -> Result<SocketAddr, String> {
            format!("{}:{}", arg(1), arg(2))
                .parse()
                .map_err(|e| format!("bad address {}:{}: {e}", arg(1), arg(2)))
        };
        let result = match arg(0).as_str() {
            "echo-server" => echo_server(num(1) as u16).map(|_| Value::Null),
            "echo-server-epoll" => echo_server_epoll(num(1) as u16).map(|_| Value::Null),
            "hold-server" => hold_server(num(1) as u16).map(|_| Value::Null),
            "wait-connect" => addr().and_then(|a| wait_connect(a, num(3))),
            "latency" => addr().and_then(|a| latency(a, num(3))),
            "connrate" => addr().and_then(|a| connrate(a, num(3), num(4))),
            "open-idle" => addr().and_then(|a| open_idle(a, num(3) as usize)),
            "vm-serve" => vm_serve(num(1) as u16, num(2) as u16, num(3)).map(|_| Value::Null),
            other => Err(format!("unknown child role {other:?}")),
        };
        match result {
            Ok(Value::Null) => 0,
            Ok(v) => {
                println!("{v}");
                0
            }
            Err(e) => {
                println!("{}", json!({ "error": e }));
                1
            }
        }
    }

    /// Echoes every connection back (a thread each) until killed.
    fn echo_server(port: u16) -> Result<(), String> {
        let l = listen(port).map_err(|e| format!("listen 127.0.0.1:{port}: {e}"))?;
        println!("READY");
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
                let mut buf = [0u8; 4096];
                while echo_once(&mut s, &mut buf) {}
            });
        }
        Ok(())
    }

    /// One read of `s` written back whole; false at the end of the stream or on an error.
    fn echo_once(s: &mut TcpStream, buf: &mut [u8]) -> bool {
        match s.read(buf) {
            Ok(0) | Err(_) => false,
            Ok(n) => s.write_all(&buf[..n]).is_ok(),
        }
    }

    /// The same echo on one thread, with epoll: no thread started or ended per connection, as
    /// netperf's TCP_CRR server and event-driven servers go. Blocking sockets, level-triggered:
    /// one accept or one read per readiness, the echo written whole.
    fn echo_server_epoll(port: u16) -> Result<(), String> {
        use std::collections::HashMap;
        let l = listen(port).map_err(|e| format!("listen 127.0.0.1:{port}: {e}"))?;
        // SAFETY: no pointers; the fd is ours.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(format!(
                "epoll_create1: {}",
                std::io::Error::last_os_error()
            ));
        }
        let ctl = |op: i32, fd: i32| {
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: fd as u64,
            };
            // SAFETY: our epoll fd, an fd we own, an event on the stack.
            unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) };
        };
        ctl(libc::EPOLL_CTL_ADD, l.as_raw_fd());
        let mut conns: HashMap<i32, TcpStream> = HashMap::new();
        println!("READY");
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: `events` has room for the 64 events asked for.
            let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), 64, -1) };
            for e in &events[..n.max(0) as usize] {
                let fd = e.u64 as i32;
                if fd == l.as_raw_fd() {
                    if let Ok((s, _)) = l.accept() {
                        let _ = s.set_nodelay(true);
                        ctl(libc::EPOLL_CTL_ADD, s.as_raw_fd());
                        conns.insert(s.as_raw_fd(), s);
                    }
                    continue;
                }
                let Some(s) = conns.get_mut(&fd) else {
                    continue;
                };
                if !echo_once(s, &mut buf) {
                    ctl(libc::EPOLL_CTL_DEL, fd);
                    conns.remove(&fd);
                }
            }
        }
    }

    /// Accepts and holds every connection, never reading; prints `HELD n` every 1000.
    fn hold_server(port: u16) -> Result<(), String> {
        let l = listen(port).map_err(|e| format!("listen 127.0.0.1:{port}: {e}"))?;
        println!("READY");
        let mut held = Vec::new();
        for s in l.incoming() {
            match s {
                Ok(s) => held.push(s),
                Err(e) => println!("ACCEPT-ERROR {e}"),
            }
            if held.len() % 1000 == 0 {
                println!("HELD {}", held.len());
            }
        }
        Ok(())
    }

    fn wait_connect(addr: SocketAddr, ms: u64) -> Result<Value, String> {
        let start = Instant::now();
        let mut attempts = 0;
        loop {
            attempts += 1;
            match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                Ok(_) => {
                    return Ok(json!({
                        "ok": true, "attempts": attempts, "ms": start.elapsed().as_millis() as u64
                    }))
                }
                Err(e) if start.elapsed() >= Duration::from_millis(ms) => {
                    return Err(format!("no TCP connect to {addr} within {ms} ms: {e}"))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn pct(sorted: &[u64], p: usize) -> f64 {
        sorted[(sorted.len() - 1) * p / 1000] as f64 / 1000.0
    }

    /// 1-byte ping-pong on one connection for SECS seconds (after 200 warm-up round trips).
    fn latency(addr: SocketAddr, secs: u64) -> Result<Value, String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let mut b = [0u8; 1];
        let mut rt = |s: &mut TcpStream| -> Result<(), String> {
            s.write_all(&[1]).map_err(|e| format!("write: {e}"))?;
            s.read_exact(&mut b).map_err(|e| format!("read: {e}"))
        };
        for _ in 0..200 {
            rt(&mut s)?;
        }
        let mut ns = Vec::with_capacity(1 << 20);
        let start = Instant::now();
        let end = start + Duration::from_secs(secs);
        while Instant::now() < end && ns.len() < 5_000_000 {
            let t = Instant::now();
            rt(&mut s).map_err(|e| format!("after {} round trips: {e}", ns.len()))?;
            ns.push(t.elapsed().as_nanos() as u64);
        }
        ns.sort_unstable();
        let mean = ns.iter().sum::<u64>() as f64 / ns.len() as f64 / 1000.0;
        Ok(json!({
            "round_trips": ns.len(),
            "seconds": start.elapsed().as_secs_f64(),
            "min_us": pct(&ns, 0), "p50_us": pct(&ns, 500), "p90_us": pct(&ns, 900),
            "p99_us": pct(&ns, 990), "p999_us": pct(&ns, 999), "max_us": pct(&ns, 1000),
            "mean_us": mean,
        }))
    }

    /// One connection: how long its connect, its 1-byte echo and its close took (ns).
    fn one_connection(addr: &SocketAddr) -> std::io::Result<[u64; 3]> {
        let t0 = Instant::now();
        let mut s = TcpStream::connect_timeout(addr, Duration::from_secs(5))?;
        let t1 = Instant::now();
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(&[1])?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        let t2 = Instant::now();
        drop(s);
        let t3 = Instant::now();
        let ns = |a: Instant, b: Instant| (b - a).as_nanos() as u64;
        Ok([ns(t0, t1), ns(t1, t2), ns(t2, t3)])
    }

    /// What one connecting thread saw: connections made, errors, the first error, each
    /// connection's whole time and its phases (ns).
    #[derive(Default)]
    struct Connections {
        ok: u64,
        errors: u64,
        first_error: Option<String>,
        ns: Vec<u64>,
        phases: [Vec<u64>; 3],
    }

    /// Connections one at a time until `end` (or 20 errors).
    fn connect_until(addr: &SocketAddr, end: Instant) -> Connections {
        let mut c = Connections::default();
        while Instant::now() < end {
            match one_connection(addr) {
                Ok(p) => {
                    c.ok += 1;
                    c.ns.push(p.iter().sum());
                    for (v, t) in c.phases.iter_mut().zip(p) {
                        v.push(t);
                    }
                }
                Err(e) => {
                    c.errors += 1;
                    let ok = c.ok;
                    c.first_error
                        .get_or_insert_with(|| format!("after {ok} connections: {e}"));
                    if c.errors >= 20 {
                        break;
                    }
                }
            }
        }
        c
    }

    /// Connect, 1 byte each way, close, for SECS seconds, one connection at a time in each of
    /// CLIENTS threads; the rate of them all, p50 and p99 of the whole, and the p50 of each
    /// phase (where the time goes).
    fn connrate(addr: SocketAddr, secs: u64, clients: u64) -> Result<Value, String> {
        let start = Instant::now();
        let end = start + Duration::from_secs(secs);
        let threads: Vec<_> = (0..clients.max(1))
            .map(|_| std::thread::spawn(move || connect_until(&addr, end)))
            .collect();
        let mut all = Connections::default();
        for t in threads {
            let c = t
                .join()
                .map_err(|_| "a connecting thread panicked".to_string())?;
            all.ok += c.ok;
            all.errors += c.errors;
            all.first_error = all.first_error.or(c.first_error);
            all.ns.extend(c.ns);
            for (a, v) in all.phases.iter_mut().zip(c.phases) {
                a.extend(v);
            }
        }
        let el = start.elapsed().as_secs_f64();
        let Connections {
            ok,
            errors,
            first_error,
            mut ns,
            mut phases,
        } = all;
        if ok == 0 {
            return Err(first_error.unwrap_or_else(|| "no connection completed".into()));
        }
        ns.sort_unstable();
        for v in &mut phases {
            v.sort_unstable();
        }
        Ok(json!({
            "clients": clients.max(1),
            "connections": ok, "seconds": el, "per_second": ok as f64 / el, "errors": errors,
            "first_error": first_error, "p50_us": pct(&ns, 500), "p99_us": pct(&ns, 990),
            "connect_p50_us": pct(&phases[0], 500), "echo_p50_us": pct(&phases[1], 500),
            "close_p50_us": pct(&phases[2], 500),
        }))
    }

    /// Opens N connections one after another, prints `OPENED n` every 1000 and at the end, then
    /// holds them until killed.
    fn open_idle(addr: SocketAddr, n: usize) -> Result<Value, String> {
        let mut held = Vec::with_capacity(n);
        let start = Instant::now();
        for i in 0..n {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
                Ok(s) => held.push(s),
                Err(e) => return Err(format!("connection {} of {n} to {addr}: {e}", i + 1)),
            }
            if (i + 1) % 1000 == 0 || i + 1 == n {
                println!("OPENED {} {:.3}", i + 1, start.elapsed().as_secs_f64());
            }
        }
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }

    fn accept_within(l: &TcpListener, within: Duration) -> Result<TcpStream, String> {
        l.set_nonblocking(true).map_err(|e| e.to_string())?;
        let end = Instant::now() + within;
        loop {
            match l.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).map_err(|e| e.to_string())?;
                    return Ok(s);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= end {
                        return Err(format!("no connection within {within:?}"));
                    }
                    std::thread::sleep(POLL);
                }
                Err(e) => return Err(format!("accept: {e}")),
            }
        }
    }

    fn timeout_kind(e: &std::io::Error) -> bool {
        matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
    }

    /// Guest -> host: read for SECS seconds from the first byte, count, close (the guest's
    /// `nc < /dev/zero` then dies of the reset).
    fn vm_up(l: &TcpListener, secs: u64) -> Result<Value, String> {
        let mut s = accept_within(l, Duration::from_secs(240))?;
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 1 << 20];
        let wait_end = Instant::now() + Duration::from_secs(30);
        let mut bytes = loop {
            match s.read(&mut buf) {
                Ok(0) => return Err("EOF before the first byte".into()),
                Ok(n) => break n as u64,
                Err(e) if timeout_kind(&e) && Instant::now() < wait_end => {}
                Err(e) => return Err(format!("waiting for the first byte: {e}")),
            }
        };
        let t0 = Instant::now();
        let mut eof = false;
        while t0.elapsed() < Duration::from_secs(secs) {
            match s.read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => bytes += n as u64,
                Err(e) if timeout_kind(&e) => {}
                Err(e) => return Err(format!("after {bytes} bytes: {e}")),
            }
        }
        let el = t0.elapsed().as_secs_f64();
        Ok(json!({
            "dir": "g2h", "bytes": bytes, "seconds": el,
            "bits_per_second": bytes as f64 * 8.0 / el, "early_eof": eof,
        }))
    }

    /// Host -> guest: write for SECS seconds, shut down the write side, and count until the
    /// guest's close (its `nc` exits at EOF), so every byte counted has been delivered.
    fn vm_down(l: &TcpListener, secs: u64) -> Result<Value, String> {
        let mut s = accept_within(l, Duration::from_secs(120))?;
        s.set_write_timeout(Some(Duration::from_millis(200)))
            .map_err(|e| e.to_string())?;
        let chunk = vec![0x5au8; 256 << 10];
        let t0 = Instant::now();
        let mut bytes = 0u64;
        while t0.elapsed() < Duration::from_secs(secs) {
            match s.write(&chunk) {
                Ok(n) => bytes += n as u64,
                Err(e) if timeout_kind(&e) => {}
                Err(e) => return Err(format!("after {bytes} bytes: {e}")),
            }
        }
        s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        let mut b = [0u8; 4096];
        loop {
            match s.read(&mut b) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => return Err(format!("waiting for the guest's close: {e}")),
            }
        }
        let el = t0.elapsed().as_secs_f64();
        Ok(json!({
            "dir": "h2g", "bytes": bytes, "seconds": el, "bits_per_second": bytes as f64 * 8.0 / el,
        }))
    }

    fn vm_serve(up: u16, down: u16, secs: u64) -> Result<(), String> {
        let lu = listen(up).map_err(|e| format!("listen 127.0.0.1:{up}: {e}"))?;
        let ld = listen(down).map_err(|e| format!("listen 127.0.0.1:{down}: {e}"))?;
        println!("READY");
        for (dir, r) in [("g2h", vm_up(&lu, secs)), ("h2g", vm_down(&ld, secs))] {
            match r {
                Ok(v) => println!("{v}"),
                Err(e) => println!("{}", json!({ "dir": dir, "error": e })),
            }
        }
        Ok(())
    }
}

// =============================================================================================
// Processes, namespaces
// =============================================================================================

mod proc {
    use super::*;

    pub fn describe(cmd: &Command) -> String {
        let mut s = cmd.get_program().to_string_lossy().into_owned();
        for a in cmd.get_args() {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }

    pub struct Out {
        pub status: Option<ExitStatus>,
        pub stdout: String,
        pub stderr: String,
        pub timed_out: bool,
        pub elapsed: Duration,
    }

    impl Out {
        pub fn success(&self) -> bool {
            self.status.map(|s| s.success()).unwrap_or(false)
        }
        pub fn last_json(&self) -> Option<Value> {
            let line = self.stdout.lines().rev().find(|l| l.starts_with('{'))?;
            serde_json::from_str(line).ok()
        }
        pub fn stderr_tail(&self) -> String {
            tail_lines(&self.stderr, 3)
        }
    }

    pub fn tail_lines(text: &str, n: usize) -> String {
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("Failed to send"))
            .collect();
        lines[lines.len().saturating_sub(n)..].join(" | ")
    }

    fn read_back(mut f: File) -> String {
        use std::io::Seek;
        let _ = f.seek(std::io::SeekFrom::Start(0));
        let mut b = Vec::new();
        let _ = f.read_to_end(&mut b);
        String::from_utf8_lossy(&b).into_owned()
    }

    /// Runs to completion; killed at `deadline`. Output goes to files, not pipes.
    pub fn run(mut cmd: Command, deadline: Duration) -> Out {
        let what = describe(&cmd);
        let out = tempfile::tempfile().expect("tempfile");
        let err = tempfile::tempfile().expect("tempfile");
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone"))
            .stderr(err.try_clone().expect("clone"));
        let start = Instant::now();
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                return Out {
                    status: None,
                    stdout: String::new(),
                    stderr: format!("cannot spawn `{what}`: {e}"),
                    timed_out: false,
                    elapsed: start.elapsed(),
                }
            }
        };
        let mut timed_out = false;
        let status = loop {
            if let Ok(Some(st)) = child.try_wait() {
                break Some(st);
            }
            if start.elapsed() >= deadline {
                timed_out = true;
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(POLL);
        };
        Out {
            status,
            stdout: read_back(out),
            stderr: read_back(err),
            timed_out,
            elapsed: start.elapsed(),
        }
    }

    /// `ip ARGS`; Err with its stderr.
    pub fn ip(args: &[&str]) -> Result<String, String> {
        let mut c = Command::new("ip");
        c.args(args);
        let what = describe(&c);
        let out = run(c, Duration::from_secs(10));
        if out.success() {
            Ok(out.stdout)
        } else {
            Err(format!("`{what}`: {}", out.stderr.trim()))
        }
    }

    /// A background process; stdout lines are collected (and copied to its log), stderr goes to
    /// its log. Stopped on drop: SIGTERM, then SIGKILL after 3 s.
    pub struct Bg {
        pub what: String,
        child: Option<Child>,
        status: Option<ExitStatus>,
        lines: Arc<Mutex<Vec<String>>>,
        pub log: PathBuf,
    }

    impl Bg {
        pub fn spawn(mut cmd: Command, log: &Path) -> Result<Bg, String> {
            let what = describe(&cmd);
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .map_err(|e| format!("open {}: {e}", log.display()))?;
            let _ = writeln!(f, "=== {what}");
            cmd.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(f.try_clone().map_err(|e| e.to_string())?);
            let mut child = cmd
                .spawn()
                .map_err(|e| format!("cannot spawn `{what}`: {e}"))?;
            let lines = Arc::new(Mutex::new(Vec::new()));
            let stdout = child.stdout.take().expect("piped");
            let l2 = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let _ = writeln!(f, "{line}");
                    l2.lock().unwrap().push(line);
                }
            });
            Ok(Bg {
                what,
                child: Some(child),
                status: None,
                lines,
                log: log.to_path_buf(),
            })
        }

        pub fn pid(&self) -> u32 {
            self.child.as_ref().map(|c| c.id()).unwrap_or(0)
        }

        pub fn running(&mut self) -> bool {
            if self.status.is_some() {
                return false;
            }
            match self.child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(None)) => true,
                Some(Ok(Some(st))) => {
                    self.status = Some(st);
                    false
                }
                _ => false,
            }
        }

        pub fn lines(&self) -> Vec<String> {
            self.lines.lock().unwrap().clone()
        }

        /// The last lines of its log, for a failure reason.
        pub fn tail(&self) -> String {
            tail_lines(&fs::read_to_string(&self.log).unwrap_or_default(), 4)
        }

        /// Waits for a stdout line matching `pred`; Err if the process exits or `within` passes.
        pub fn wait_line(
            &mut self,
            within: Duration,
            pred: impl Fn(&str) -> bool,
        ) -> Result<String, String> {
            let end = Instant::now() + within;
            loop {
                if let Some(l) = self.lines.lock().unwrap().iter().find(|l| pred(l)) {
                    return Ok(l.clone());
                }
                if !self.running() {
                    std::thread::sleep(Duration::from_millis(100)); // the reader's last lines
                    if let Some(l) = self.lines.lock().unwrap().iter().find(|l| pred(l)) {
                        return Ok(l.clone());
                    }
                    return Err(format!(
                        "`{}` exited ({:?}): {}",
                        self.what,
                        self.status,
                        self.tail()
                    ));
                }
                if Instant::now() >= end {
                    return Err(format!(
                        "`{}`: nothing after {within:?}: {}",
                        self.what,
                        self.tail()
                    ));
                }
                std::thread::sleep(POLL);
            }
        }

        pub fn stop(&mut self) {
            let Some(mut c) = self.child.take() else {
                return;
            };
            if self.status.is_none() {
                // SAFETY: signalling our own child.
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
                let end = Instant::now() + Duration::from_secs(3);
                while Instant::now() < end {
                    if let Ok(Some(st)) = c.try_wait() {
                        self.status = Some(st);
                        return;
                    }
                    std::thread::sleep(POLL);
                }
                let _ = c.kill();
                self.status = c.wait().ok();
            }
        }
    }

    impl Drop for Bg {
        fn drop(&mut self) {
            self.stop();
        }
    }

    /// User+system CPU seconds of `pid` and its descendants (/proc stat, clock ticks of 1/100 s).
    pub fn cpu_tree(pid: u32) -> f64 {
        let mut total = 0.0;
        if let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) {
            if let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) {
                let f: Vec<&str> = rest.split_whitespace().collect();
                // after "pid (comm) ": state=0 ... utime=11 stime=12
                let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
                total += (t(11) + t(12)) / 100.0;
            }
        }
        if let Ok(kids) = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
            for k in kids.split_whitespace().filter_map(|k| k.parse().ok()) {
                total += cpu_tree(k);
            }
        }
        total
    }

    /// Whether process `pid`'s namespace has a TCP listener on 127.0.0.1:PORT.
    pub fn listening(pid: u32, port: u16) -> bool {
        let v4 = format!("0100007F:{port:04X}");
        let v6 = format!("0000000000000000FFFF00000100007F:{port:04X}");
        ["tcp", "tcp6"].iter().any(|f| {
            fs::read_to_string(format!("/proc/{pid}/net/{f}"))
                .map(|t| {
                    t.lines().skip(1).any(|l| {
                        let w: Vec<&str> = l.split_whitespace().collect();
                        w.len() > 3 && (w[1] == v4 || w[1] == v6) && w[3] == "0A"
                    })
                })
                .unwrap_or(false)
        })
    }

    pub fn poll_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
        let end = Instant::now() + within;
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
}

use proc::{Bg, Out};

mod ns {
    use super::*;

    static COUNTER: AtomicU32 = AtomicU32::new(0);
    const PREFIX: &str = "e2e-";

    /// A network namespace `e2e-TAG-PID-N` with `lo` up; on drop every process in it is killed
    /// (they are the bench's) and it is deleted.
    pub struct Netns {
        pub name: String,
    }

    impl Netns {
        pub fn new(tag: &str) -> Result<Netns, String> {
            let name = format!(
                "{PREFIX}{tag}-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            );
            proc::ip(&["netns", "add", &name])?;
            let ns = Netns { name };
            ns.ip(&["link", "set", "dev", "lo", "up"])?;
            Ok(ns)
        }

        pub fn path(&self) -> String {
            format!("/run/netns/{}", self.name)
        }

        pub fn ip(&self, args: &[&str]) -> Result<String, String> {
            let mut full = vec!["-n", self.name.as_str()];
            full.extend_from_slice(args);
            proc::ip(&full)
        }

        /// `ip netns exec NAME prog` (which execs prog in place: the child's pid is prog's).
        pub fn exec(&self, prog: impl AsRef<OsStr>) -> Command {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &self.name]);
            c.arg(prog);
            c
        }

        pub fn sysctl(&self, key: &str, value: &str) -> Result<(), String> {
            let mut c = self.exec("sysctl");
            c.args(["-q", "-w", &format!("{key}={value}")]);
            let out = proc::run(c, Duration::from_secs(10));
            if out.success() {
                Ok(())
            } else {
                Err(format!(
                    "sysctl {key} in {}: {}",
                    self.name,
                    out.stderr.trim()
                ))
            }
        }

        pub fn has_link(&self, dev: &str) -> bool {
            self.ip(&["-o", "link", "show", "dev", dev]).is_ok()
        }

        pub fn has_ipv4(&self, dev: &str) -> bool {
            self.ip(&["-o", "-4", "addr", "show", "dev", dev])
                .map(|o| o.contains("inet "))
                .unwrap_or(false)
        }

        fn pids(name: &str) -> Vec<i32> {
            proc::ip(&["netns", "pids", name])
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        }

        fn remove(name: &str) {
            for _ in 0..3 {
                let pids = Netns::pids(name);
                if pids.is_empty() {
                    break;
                }
                for p in pids {
                    // SAFETY: kill(2) on a pid that lives in a namespace this bench created.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
                proc::poll_until(Duration::from_secs(2), || Netns::pids(name).is_empty());
            }
            if let Err(e) = proc::ip(&["netns", "del", name]) {
                eprintln!("e2e: warning: {e}");
            }
        }

        /// Deletes `e2e-*-PID-N` namespaces whose PID is no longer running (a killed run's).
        pub fn remove_stale() {
            let list = proc::ip(&["netns", "list"]).unwrap_or_default();
            for line in list.lines() {
                let Some(name) = line.split_whitespace().next() else {
                    continue;
                };
                let Some(rest) = name.strip_prefix(PREFIX) else {
                    continue;
                };
                let parts: Vec<&str> = rest.split('-').collect();
                if parts.len() != 3 {
                    continue;
                }
                let Ok(pid) = parts[1].parse::<u32>() else {
                    continue;
                };
                if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                    eprintln!("e2e: removing namespace {name} left by an earlier run");
                    Netns::remove(name);
                }
            }
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            Netns::remove(&self.name);
        }
    }

    /// G (the guest), S (the stack) and K (the empty namespace S's only route leads into).
    /// Field order is drop order: G, S, K.
    pub struct Rig {
        pub guest: Netns,
        pub stack: Netns,
        pub sink: Netns,
    }

    impl Rig {
        pub fn new() -> Result<Rig, String> {
            let rig = Rig {
                guest: Netns::new("g")?,
                stack: Netns::new("s")?,
                sink: Netns::new("k")?,
            };
            let (s, k) = (&rig.stack, &rig.sink);
            s.ip(&[
                "link", "add", "e2e0", "type", "veth", "peer", "name", "e2e1", "netns", &k.name,
            ])?;
            s.ip(&["addr", "add", S_ADDR, "dev", "e2e0"])?;
            s.ip(&["link", "set", "dev", "e2e0", "up"])?;
            k.ip(&["link", "set", "dev", "e2e1", "up"])?;
            s.ip(&["route", "add", "default", "via", S_GATEWAY])?;
            for n in [&rig.guest, &rig.stack] {
                n.sysctl("net.ipv4.ip_local_port_range", EPHEMERAL)?;
                n.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
            }
            Ok(rig)
        }
    }
}

use ns::Rig;

// =============================================================================================
// The harness
// =============================================================================================

mod harness {
    use super::*;

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub enum Stack {
        Usernet,
        Slirp4netns,
        Pasta,
    }

    impl Stack {
        fn name(self) -> &'static str {
            match self {
                Stack::Usernet => "usernet",
                Stack::Slirp4netns => "slirp4netns",
                Stack::Pasta => "pasta",
            }
        }

        fn parse(s: &str) -> Option<Stack> {
            [Stack::Usernet, Stack::Slirp4netns, Stack::Pasta]
                .into_iter()
                .find(|k| k.name() == s)
        }

        /// The address at which the guest reaches S's 127.0.0.1.
        fn host_addr(self) -> &'static str {
            match self {
                Stack::Usernet => "192.168.5.2",
                Stack::Slirp4netns => "10.0.2.2",
                Stack::Pasta => S_GATEWAY,
            }
        }

        fn tool(self) -> Option<&'static str> {
            match self {
                Stack::Usernet => None,
                Stack::Slirp4netns => Some("slirp4netns"),
                Stack::Pasta => Some("pasta"),
            }
        }
    }

    pub struct Config {
        stacks: Vec<Stack>,
        mtus: Vec<u32>,
        secs: u64,
        idle: usize,
        /// Extra arguments for usernet (`E2E_USERNET_ARGS`, split at whitespace).
        usernet_args: Vec<String>,
        /// The echo server of the ping-pong and the connection rate (`E2E_ECHO`).
        echo: Echo,
        /// `E2E_PIN=STACK/CLIENT/SERVER`: the CPUs (`taskset -c` lists) of the stack, of the
        /// guest's clients and of the servers, the same for every stack and the reference;
        /// None: the scheduler places them.
        pin: Option<[String; 3]>,
        /// Measure the no-stack reference (`E2E_SKIP_REFERENCE=1` to leave it out).
        reference: bool,
        /// `E2E_ROUNDS`: how many times the stacks are measured, one after another in turn
        /// (usernet, slirp4netns, pasta, usernet, ...); each figure is the median of its rounds.
        rounds: usize,
        /// `E2E_ONLY`: the metrics to measure, as key prefixes (`conn_rate`, `rr_`, `tcp_h2g`);
        /// empty for all.
        only: Vec<String>,
        vm: bool,
        vm_stacks: Vec<String>,
        vm_mtus: Vec<u32>,
        budget: Duration,
        json: PathBuf,
        logs: PathBuf,
        guest_cache: PathBuf,
        exe: PathBuf,
        start: Instant,
    }

    /// `E2E_ECHO`: how the echo server on S's loopback serves its connections.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Echo {
        /// A thread started for each connection (the default).
        Thread,
        /// One thread with epoll (no thread per connection).
        Epoll,
    }

    impl Echo {
        fn parse(v: &str) -> Echo {
            [Echo::Thread, Echo::Epoll]
                .into_iter()
                .find(|e| e.name() == v)
                .unwrap_or_else(|| panic!("E2E_ECHO: thread or epoll; got {v:?}"))
        }

        fn name(self) -> &'static str {
            match self {
                Echo::Thread => "thread",
                Echo::Epoll => "epoll",
            }
        }

        fn role(self) -> &'static str {
            match self {
                Echo::Thread => "echo-server",
                Echo::Epoll => "echo-server-epoll",
            }
        }
    }

    fn env_or(name: &str, default: &str) -> String {
        std::env::var(name)
            .ok()
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| default.to_string())
    }

    /// A comma-separated list; `none` is the empty list.
    fn list(v: &str) -> Vec<String> {
        if v.trim() == "none" {
            return Vec::new();
        }
        v.split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    }

    /// `STACK/CLIENT/SERVER` CPU lists (empty: none).
    fn pin(v: &str) -> Option<[String; 3]> {
        if v.is_empty() {
            return None;
        }
        let parts: Vec<&str> = v.split('/').map(str::trim).collect();
        match parts[..] {
            [s, c, v]
                if [s, c, v].iter().all(|p| {
                    !p.is_empty() && p.chars().all(|ch| ch.is_ascii_digit() || ",-".contains(ch))
                }) =>
            {
                Some([s.into(), c.into(), v.into()])
            }
            _ => panic!("E2E_PIN: STACK/CLIENT/SERVER CPU lists, e.g. 0/0/1; got {v:?}"),
        }
    }

    /// Who runs a command, for `E2E_PIN`.
    #[derive(Clone, Copy)]
    enum Part {
        Stack,
        Client,
        Server,
    }

    fn nums(v: &str, what: &str) -> Vec<u32> {
        list(v)
            .iter()
            .map(|m| {
                m.parse()
                    .unwrap_or_else(|_| panic!("{what}: not a number: {m}"))
            })
            .collect()
    }

    impl Config {
        /// Whether a metric is measured (`prefix` is matched both ways, so `rr_` selects the
        /// latency group and `rr_p50` selects it too).
        fn wants(&self, prefix: &str) -> bool {
            self.only.is_empty()
                || self
                    .only
                    .iter()
                    .any(|o| o.starts_with(prefix) || prefix.starts_with(o.as_str()))
        }

        /// Whether the metric `key` is to be measured: `E2E_ONLY` names it or a prefix of it.
        fn wants_key(&self, key: &str) -> bool {
            self.only.is_empty() || self.only.iter().any(|o| key.starts_with(o.as_str()))
        }

        fn from_env() -> Config {
            let target = PathBuf::from(MANIFEST_DIR).join("target");
            let stacks = list(&env_or("E2E_STACKS", "usernet,slirp4netns,pasta"))
                .iter()
                .map(|s| {
                    Stack::parse(s).unwrap_or_else(|| {
                        panic!("E2E_STACKS: unknown stack {s} (usernet, slirp4netns, pasta)")
                    })
                })
                .collect();
            Config {
                stacks,
                mtus: nums(&env_or("E2E_MTUS", "1500,65520"), "E2E_MTUS"),
                secs: env_or("E2E_SECONDS", "3").parse().expect("E2E_SECONDS"),
                idle: env_or("E2E_IDLE", "10000").parse().expect("E2E_IDLE"),
                reference: env_or("E2E_SKIP_REFERENCE", "0") != "1",
                rounds: env_or("E2E_ROUNDS", "1").parse().expect("E2E_ROUNDS"),
                only: list(&env_or("E2E_ONLY", "")),
                pin: pin(&env_or("E2E_PIN", "")),
                echo: Echo::parse(&env_or("E2E_ECHO", "thread")),
                usernet_args: env_or("E2E_USERNET_ARGS", "")
                    .split_whitespace()
                    .map(String::from)
                    .collect(),
                vm: env_or("E2E_SKIP_VM", "0") != "1",
                vm_stacks: list(&env_or("E2E_VM_STACKS", "usernet,passt")),
                vm_mtus: nums(&env_or("E2E_VM_MTUS", "1500,65520"), "E2E_VM_MTUS"),
                budget: Duration::from_secs(
                    env_or("E2E_BUDGET", "570").parse().expect("E2E_BUDGET"),
                ),
                json: PathBuf::from(env_or(
                    "E2E_JSON",
                    &target.join("e2e-bench.json").display().to_string(),
                )),
                logs: target.join("e2e-bench"),
                guest_cache: target.join("e2e-bench-guest"),
                exe: std::env::current_exe().expect("current_exe"),
                start: Instant::now(),
            }
        }

        fn elapsed(&self) -> f64 {
            self.start.elapsed().as_secs_f64()
        }

        /// Err when fewer than `need` seconds of the budget are left.
        fn budget_for(&self, need: u64) -> Result<(), String> {
            if self.start.elapsed() + Duration::from_secs(need) > self.budget {
                Err(format!(
                    "skipped: the run's {}s budget (E2E_BUDGET) would be exceeded",
                    self.budget.as_secs()
                ))
            } else {
                Ok(())
            }
        }

        fn child(&self, ns: &ns::Netns, role: &str, args: &[String]) -> Command {
            let part = if role.ends_with("-server") || role == "vm-serve" {
                Part::Server
            } else {
                Part::Client
            };
            let mut c = self.exec(ns, part, &self.exe);
            c.arg(CHILD).arg(role).args(args);
            c
        }

        /// `prog` in `ns`, on the CPUs `E2E_PIN` gives its part.
        fn exec(&self, ns: &ns::Netns, part: Part, prog: impl AsRef<OsStr>) -> Command {
            let Some(pin) = &self.pin else {
                return ns.exec(prog);
            };
            // taskset execs prog in place, as `ip netns exec` does: the pid stays prog's.
            let mut c = ns.exec("taskset");
            c.args(["-c", &pin[part as usize]]).arg(prog);
            c
        }
    }

    fn progress(cfg: &Config, msg: &str) {
        eprintln!("[e2e {:6.1}s] {msg}", cfg.elapsed());
    }

    /// One figure: its value or why there is none, and the detail behind it.
    #[derive(Clone)]
    struct Metric {
        key: &'static str,
        value: Result<f64, String>,
        /// Shown beside the value in the table (UDP loss).
        note: Option<String>,
        detail: Value,
    }

    impl Metric {
        fn ok(key: &'static str, v: f64, detail: Value) -> Metric {
            Metric {
                key,
                value: Ok(v),
                note: None,
                detail,
            }
        }
        fn err(key: &'static str, e: impl Into<String>) -> Metric {
            Metric {
                key,
                value: Err(e.into()),
                note: None,
                detail: Value::Null,
            }
        }
        fn json(&self) -> Value {
            match &self.value {
                Ok(v) => json!({ "value": v, "unit": unit(self.key), "note": self.note,
                                 "detail": self.detail }),
                Err(e) => json!({ "value": null, "unit": unit(self.key), "error": e,
                                  "detail": self.detail }),
            }
        }
    }

    /// (key, label, unit); `rr_*` lower is better, the rest higher.
    const METRICS: &[(&str, &str, &str)] = &[
        ("tcp_g2h_1", "TCP guest->host, 1 stream", "Gbit/s"),
        ("tcp_h2g_1", "TCP host->guest, 1 stream", "Gbit/s"),
        ("tcp_g2h_4", "TCP guest->host, 4 streams", "Gbit/s"),
        ("tcp_h2g_4", "TCP host->guest, 4 streams", "Gbit/s"),
        (
            "udp_g2h",
            "UDP guest->host, MTU-28 datagrams, received",
            "Gbit/s",
        ),
        (
            "udp_h2g",
            "UDP host->guest, MTU-28 datagrams, received",
            "Gbit/s",
        ),
        ("rr_min", "1-byte ping-pong min (lower is better)", "us"),
        ("rr_p50", "1-byte ping-pong p50 (lower is better)", "us"),
        ("rr_p99", "1-byte ping-pong p99 (lower is better)", "us"),
        ("conn_rate", "connect + 1 byte each way + close", "conn/s"),
        (
            "conn_rate_4",
            "the same, 4 clients at once, each one at a time",
            "conn/s",
        ),
    ];

    fn unit(key: &str) -> &'static str {
        METRICS
            .iter()
            .find(|m| m.0 == key)
            .map(|m| m.2)
            .unwrap_or("Gbit/s")
    }

    struct Row {
        stack: String,
        variant: &'static str,
        mtu: u32,
        setup: Result<Value, String>,
        metrics: Vec<Metric>,
    }

    impl Row {
        fn get(&self, key: &str) -> Option<&Metric> {
            self.metrics.iter().find(|m| m.key == key)
        }
        fn json(&self) -> Value {
            let mut m = serde_json::Map::new();
            for x in &self.metrics {
                m.insert(x.key.to_string(), x.json());
            }
            json!({
                "stack": self.stack, "variant": self.variant, "mtu": self.mtu,
                "setup": match &self.setup { Ok(v) => v.clone(), Err(e) => json!({ "error": e }) },
                "metrics": m,
            })
        }
    }

    // -----------------------------------------------------------------------------------------
    // Starting each stack
    // -----------------------------------------------------------------------------------------

    fn start_stack(cfg: &Config, rig: &Rig, stack: Stack, mtu: u32) -> Result<Bg, String> {
        let log = cfg.logs.join(format!("{}-{mtu}.log", stack.name()));
        let g = &rig.guest;
        let m = mtu.to_string();
        let mut bg = match stack {
            Stack::Usernet => {
                let mut c = cfg.exec(&rig.stack, Part::Stack, usernet());
                c.args(["--tap-netns", &g.path(), "--mtu", &m]);
                c.args(cfg.usernet_args.iter());
                c.env("RUST_LOG", "info");
                Bg::spawn(c, &log)?
            }
            Stack::Slirp4netns => {
                let mut c = cfg.exec(&rig.stack, Part::Stack, "slirp4netns");
                c.args(["--configure", &format!("--mtu={m}"), "--disable-dns"]);
                c.args(["--netns-type=path", &g.path(), "tap0"]);
                Bg::spawn(c, &log)?
            }
            Stack::Pasta => {
                // Old pasta can hang: a hard timeout as well as the bench's own kill.
                let mut c = cfg.exec(&rig.stack, Part::Stack, "timeout");
                c.args(["-k", "5", "300", "pasta", "--runas", "0", "-f", "-q", "-4"]);
                c.args(["--netns", &g.path(), "-I", "tap0", "--config-net", "-m", &m]);
                c.args(["-t", "none", "-u", "none", "-T", "none", "-U", "none"]);
                Bg::spawn(c, &log)?
            }
        };
        let mut exited = false;
        let up = proc::poll_until(Duration::from_secs(10), || {
            if !bg.running() {
                exited = true;
                return true;
            }
            match stack {
                Stack::Usernet => g.has_link("tap0"),
                _ => g.has_ipv4("tap0"),
            }
        });
        if exited {
            return Err(format!("{} exited at start: {}", stack.name(), bg.tail()));
        }
        if !up {
            return Err(format!(
                "{}: no configured tap0 in the guest namespace within 10 s: {}",
                stack.name(),
                bg.tail()
            ));
        }
        if stack == Stack::Usernet {
            // Static configuration, the address DHCP would hand out.
            g.ip(&["link", "set", "dev", "tap0", "mtu", &m])?;
            g.ip(&["addr", "add", "192.168.5.15/24", "dev", "tap0"])?;
            g.ip(&["link", "set", "dev", "tap0", "up"])?;
            g.ip(&["route", "add", "default", "via", "192.168.5.2"])?;
        }
        Ok(bg)
    }

    /// The echo server on S's loopback, once it says it is listening.
    fn start_echo(cfg: &Config, rig: &Rig, log: &Path) -> Result<Bg, String> {
        let mut echo = Bg::spawn(
            cfg.child(&rig.stack, cfg.echo.role(), &[ECHO_PORT.to_string()]),
            log,
        )?;
        echo.wait_line(Duration::from_secs(10), |l| l == "READY")?;
        Ok(echo)
    }

    /// Starts the stack and the echo server, and waits for a TCP connect through the stack.
    fn bring_up(
        cfg: &Config,
        rig: &Rig,
        stack: Stack,
        mtu: u32,
    ) -> Result<(Bg, Bg, Value), String> {
        if let Some(t) = stack.tool() {
            if which(t).is_none() {
                return Err(format!("{t} is not installed (apt-get install {t})"));
            }
        }
        let log = cfg.logs.join(format!("{}-{mtu}-servers.log", stack.name()));
        let echo = start_echo(cfg, rig, &log)?;
        let t0 = Instant::now();
        let bg = start_stack(cfg, rig, stack, mtu)?;
        let out = proc::run(
            cfg.child(
                &rig.guest,
                "wait-connect",
                &[
                    stack.host_addr().into(),
                    ECHO_PORT.to_string(),
                    "15000".into(),
                ],
            ),
            Duration::from_secs(20),
        );
        let v = out.last_json().unwrap_or(Value::Null);
        if v.get("ok") != Some(&Value::Bool(true)) {
            return Err(format!(
                "no TCP connection from the guest through {}: {} {}",
                stack.name(),
                v.get("error").and_then(Value::as_str).unwrap_or(""),
                out.stderr_tail()
            ));
        }
        let link = rig
            .guest
            .ip(&["-o", "addr", "show", "dev", "tap0"])
            .unwrap_or_default();
        let mtu_seen = rig
            .guest
            .ip(&["-o", "link", "show", "dev", "tap0"])
            .unwrap_or_default()
            .split_whitespace()
            .skip_while(|w| *w != "mtu")
            .nth(1)
            .unwrap_or("")
            .to_string();
        Ok((
            bg,
            echo,
            json!({
                "ready_ms": t0.elapsed().as_millis() as u64,
                "guest_tap_mtu": mtu_seen,
                "guest_addrs": link.lines().filter_map(|l| l.split_whitespace().nth(3)).collect::<Vec<_>>(),
            }),
        ))
    }

    fn which(tool: &str) -> Option<PathBuf> {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .chain(["/usr/sbin", "/sbin"].iter().map(PathBuf::from))
            .map(|d| d.join(tool))
            .find(|p| {
                p.metadata()
                    .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                    .unwrap_or(false)
            })
    }

    // -----------------------------------------------------------------------------------------
    // Measurements
    // -----------------------------------------------------------------------------------------

    static NEXT_PORT: AtomicU16 = AtomicU16::new(IPERF_BASE);

    struct Ctx<'a> {
        cfg: &'a Config,
        rig: &'a Rig,
        /// Where the clients run: the guest namespace G, or S for the reference (no stack).
        client_ns: &'a ns::Netns,
        host: &'static str,
        stack_pid: u32,
        /// The stack's own log (usernet writes its SIGUSR1 stats line there).
        stack_log: PathBuf,
        log: PathBuf,
    }

    impl Ctx<'_> {
        fn cpu(&self) -> f64 {
            proc::cpu_tree(self.stack_pid)
        }
    }

    /// One iperf3 run, retried once when iperf3 reports it was interrupted by a signal: on a
    /// shared machine someone's `pkill iperf3` (a namespace does not scope pkill) hits ours too.
    fn iperf(
        ctx: &Ctx,
        key: &'static str,
        streams: u32,
        reverse: bool,
        udp: Option<u32>,
    ) -> Metric {
        let m = iperf_once(ctx, key, streams, reverse, udp);
        match &m.value {
            Err(e) if e.contains("interrupt - ") => {
                progress(ctx.cfg, &format!("  {key}: {e}; retrying once"));
                let mut again = iperf_once(ctx, key, streams, reverse, udp);
                if let Value::Object(o) = &mut again.detail {
                    o.insert("retried_after".into(), json!(e));
                }
                again
            }
            _ => m,
        }
    }

    /// One iperf3 run: a one-off server on S's 127.0.0.1, the client in G.
    fn iperf_once(
        ctx: &Ctx,
        key: &'static str,
        streams: u32,
        reverse: bool,
        udp: Option<u32>,
    ) -> Metric {
        let secs = ctx.cfg.secs;
        if let Err(e) = ctx.cfg.budget_for(secs + 5) {
            return Metric::err(key, e);
        }
        let port = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
        let mut sc = ctx.cfg.exec(&ctx.rig.stack, Part::Server, "iperf3");
        sc.args(["-s", "-1", "-B", "127.0.0.1", "-p", &port.to_string()]);
        let mut server = match Bg::spawn(sc, &ctx.log) {
            Ok(s) => s,
            Err(e) => return Metric::err(key, e),
        };
        let pid = server.pid();
        if !proc::poll_until(Duration::from_secs(5), || proc::listening(pid, port)) {
            return Metric::err(
                key,
                format!("iperf3 server did not listen: {}", server.tail()),
            );
        }
        let mut c = ctx.cfg.exec(&ctx.rig.guest, Part::Client, "iperf3");
        c.args([
            "-c",
            ctx.host,
            "-p",
            &port.to_string(),
            "-t",
            &secs.to_string(),
        ]);
        c.args([
            "-P",
            &streams.to_string(),
            "-J",
            "--connect-timeout",
            "5000",
        ]);
        if reverse {
            c.arg("-R");
        }
        if let Some(len) = udp {
            c.args(["-u", "-b", "0", "-l", &len.to_string()]);
        }
        let deadline = Duration::from_secs(secs + 12);
        let cpu0 = ctx.cpu();
        let out = proc::run(c, deadline);
        let cpu = ctx.cpu() - cpu0;
        server.stop();
        let text = out.stdout.trim();
        let j: Option<Value> = text
            .find('{')
            .and_then(|i| serde_json::from_str(&text[i..]).ok());
        if out.timed_out {
            return Metric::err(
                key,
                format!(
                    "iperf3 client killed at its {}s deadline without a result (stalled)",
                    deadline.as_secs()
                ),
            );
        }
        let Some(j) = j else {
            return Metric::err(
                key,
                format!(
                    "iperf3 gave no JSON ({:?}): {}",
                    out.status,
                    out.stderr_tail()
                ),
            );
        };
        if let Some(e) = j.get("error").and_then(Value::as_str) {
            return Metric::err(key, format!("iperf3: {e} {}", out.stderr_tail()).trim_end());
        }
        let end = &j["end"];
        let rx = &end["sum_received"];
        let Some(bps) = rx["bits_per_second"].as_f64() else {
            return Metric::err(key, "iperf3 JSON has no end.sum_received.bits_per_second");
        };
        let mut detail = json!({
            "bits_per_second": bps,
            "bytes_received": rx["bytes"],
            "seconds": rx["seconds"],
            "stack_cpu_seconds": cpu,
            "port": port,
        });
        let mut note = None;
        if udp.is_some() {
            detail["datagram_bytes"] = json!(udp);
            detail["lost_percent"] = end["sum_received"]["lost_percent"].clone();
            detail["sent_bits_per_second"] = end["sum_sent"]["bits_per_second"].clone();
            if let Some(l) = end["sum_received"]["lost_percent"].as_f64() {
                note = Some(format!("{l:.0}% lost"));
            }
        } else {
            detail["retransmits"] = end["sum_sent"]["retransmits"].clone();
        }
        let mut m = Metric::ok(key, bps / 1e9, detail);
        m.note = note;
        m
    }

    /// Run the bench's client `role` in the guest against the echo server for the run's
    /// seconds: its JSON, with the stack's CPU time during the run.
    fn timed_client(ctx: &Ctx, role: &str, extra: &[String]) -> Result<Value, String> {
        let secs = ctx.cfg.secs;
        ctx.cfg.budget_for(secs + 5)?;
        let cpu0 = ctx.cpu();
        let out = proc::run(
            ctx.cfg.child(
                ctx.client_ns,
                role,
                &[
                    &[ctx.host.into(), ECHO_PORT.to_string(), secs.to_string()],
                    extra,
                ]
                .concat(),
            ),
            Duration::from_secs(secs + 15),
        );
        let cpu = ctx.cpu() - cpu0;
        let mut v = client_result(&out)?;
        v["stack_cpu_seconds"] = json!(cpu);
        Ok(v)
    }

    fn latency(ctx: &Ctx) -> [Metric; 3] {
        match timed_client(ctx, "latency", &[]) {
            Ok(v) => {
                let min = v["min_us"].as_f64().unwrap_or(f64::NAN);
                let p50 = v["p50_us"].as_f64().unwrap_or(f64::NAN);
                let p99 = v["p99_us"].as_f64().unwrap_or(f64::NAN);
                [
                    Metric::ok("rr_min", min, v.clone()),
                    Metric::ok("rr_p50", p50, v.clone()),
                    Metric::ok("rr_p99", p99, v),
                ]
            }
            Err(e) => [
                Metric::err("rr_min", &e),
                Metric::err("rr_p50", &e),
                Metric::err("rr_p99", e),
            ],
        }
    }

    /// The connection rate with `clients` connecting at once, each one connection at a time,
    /// as `key`.
    fn connrate(ctx: &Ctx, key: &'static str, clients: u32) -> Metric {
        match timed_client(ctx, "connrate", &[clients.to_string()]) {
            Ok(v) => {
                let r = v["per_second"].as_f64().unwrap_or(f64::NAN);
                let mut m = Metric::ok(key, r, v.clone());
                if v["errors"].as_u64().unwrap_or(0) > 0 {
                    m.note = Some(format!("{} errors", v["errors"]));
                }
                m
            }
            Err(e) => Metric::err(key, e),
        }
    }

    /// The connection rate one connection at a time, and with 4 clients at once (the rate
    /// of a server under load, where the stack's own cost per connection counts rather than
    /// the wake-ups along one connection's round trips); as many as `E2E_ONLY` asks for.
    fn connrates(ctx: &Ctx) -> Vec<Metric> {
        let mut v = Vec::new();
        if ctx.cfg.wants_key("conn_rate") {
            v.push(connrate(ctx, "conn_rate", 1));
        }
        if ctx.cfg.wants_key("conn_rate_4") {
            v.push(connrate(ctx, "conn_rate_4", 4));
        }
        v
    }

    fn client_result(out: &Out) -> Result<Value, String> {
        if out.timed_out {
            return Err(format!(
                "client killed at its deadline after {:?}",
                out.elapsed
            ));
        }
        match out.last_json() {
            Some(v) if v.get("error").is_some() => Err(v["error"].as_str().unwrap_or("").into()),
            Some(v) => Ok(v),
            None => Err(format!(
                "client gave no result ({:?}): {}",
                out.status,
                out.stderr_tail()
            )),
        }
    }

    fn measure_all(ctx: &Ctx, mtu: u32) -> Vec<Metric> {
        let want = |key: &str| ctx.cfg.wants(key);
        let mut v = Vec::new();
        for (key, streams, reverse, udp) in [
            ("tcp_g2h_1", 1, false, None),
            ("tcp_h2g_1", 1, true, None),
            ("tcp_g2h_4", 4, false, None),
            ("tcp_h2g_4", 4, true, None),
            ("udp_g2h", 1, false, Some(mtu - 28)),
            ("udp_h2g", 1, true, Some(mtu - 28)),
        ] {
            if want(key) {
                v.push(iperf(ctx, key, streams, reverse, udp));
            }
        }
        if want("rr_") {
            v.extend(latency(ctx));
        }
        v.extend(connrates(ctx));
        v
    }

    /// Opens `n` idle connections from G to a holder on S's loopback through the stack; returns
    /// the opener and the holder (drop them to close the connections) and what it took.
    fn open_idle(ctx: &Ctx, n: usize) -> Result<(Bg, Bg, Value), String> {
        let log = ctx.log.clone();
        let mut holder = Bg::spawn(
            ctx.cfg
                .child(&ctx.rig.stack, "hold-server", &[HOLD_PORT.to_string()]),
            &log,
        )?;
        holder.wait_line(Duration::from_secs(10), |l| l == "READY")?;
        let t0 = Instant::now();
        let mut opener = Bg::spawn(
            ctx.cfg.child(
                &ctx.rig.guest,
                "open-idle",
                &[ctx.host.into(), HOLD_PORT.to_string(), n.to_string()],
            ),
            &log,
        )?;
        let want = format!("OPENED {n} ");
        opener
            .wait_line(Duration::from_secs(120), |l| l.starts_with(&want))
            .map_err(|e| {
                let last = opener.lines().last().cloned().unwrap_or_default();
                format!("opening {n} connections: {e} (last progress: {last})")
            })?;
        let opened_s = t0.elapsed().as_secs_f64();
        let held = format!("HELD {}", n - n % 1000);
        holder.wait_line(Duration::from_secs(30), |l| l == held)?;
        let cpu = ctx.cpu();
        // Settle: the stack may still be finishing handshakes' bookkeeping.
        std::thread::sleep(Duration::from_millis(500));
        let idle_cpu = ctx.cpu() - cpu;
        let rss = fs::read_to_string(format!("/proc/{}/status", ctx.stack_pid))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            });
        Ok((
            opener,
            holder,
            json!({ "connections": n, "open_seconds": opened_s, "stack_rss_kb": rss,
                    "stack_cpu_seconds_idle_500ms": idle_cpu, "usernet_stats": usernet_stats(ctx) }),
        ))
    }

    /// usernet's `usernet stats: {JSON}` line, asked for by SIGUSR1 (Null if none comes).
    fn usernet_stats(ctx: &Ctx) -> Value {
        let count = || {
            fs::read_to_string(&ctx.stack_log)
                .unwrap_or_default()
                .matches("usernet stats: ")
                .count()
        };
        let before = count();
        // SAFETY: signalling the usernet process this bench started.
        unsafe { libc::kill(ctx.stack_pid as i32, libc::SIGUSR1) };
        if !proc::poll_until(Duration::from_secs(3), || count() > before) {
            return Value::Null;
        }
        let text = fs::read_to_string(&ctx.stack_log).unwrap_or_default();
        text.rsplit("usernet stats: ")
            .next()
            .and_then(|t| t.lines().next())
            .and_then(|l| serde_json::from_str(l.trim()).ok())
            .unwrap_or(Value::Null)
    }

    /// The reference: the same clients and echo server with no stack between them, both on S's
    /// loopback. Not a peer to beat: what the machine allows for the ping-pong and the
    /// connection rate, which every stack's figure is a share of.
    fn run_reference(cfg: &Config) -> Row {
        progress(
            cfg,
            "reference: no stack, client and server on one loopback",
        );
        let mut row = Row {
            stack: "no stack".into(),
            variant: "reference",
            mtu: 0,
            setup: Err(String::new()),
            metrics: Vec::new(),
        };
        let rig = match cfg.budget_for(2 * cfg.secs + 20).and_then(|_| Rig::new()) {
            Ok(r) => r,
            Err(e) => {
                row.setup = Err(e);
                return row;
            }
        };
        let log = cfg.logs.join("reference-servers.log");
        let echo = match start_echo(cfg, &rig, &log) {
            Ok(e) => e,
            Err(e) => {
                row.setup = Err(format!("echo server: {e}"));
                return row;
            }
        };
        let ctx = Ctx {
            cfg,
            rig: &rig,
            client_ns: &rig.stack,
            host: "127.0.0.1",
            stack_pid: echo.pid(),
            stack_log: log.clone(),
            log,
        };
        if cfg.wants("rr_") {
            row.metrics.extend(latency(&ctx));
        }
        row.metrics.extend(connrates(&ctx));
        row.setup = Ok(json!({ "what": "client and echo server on S's loopback, no stack" }));
        row
    }

    fn run_stack(cfg: &Config, stack: Stack, mtu: u32, rows: &mut Vec<Row>) {
        progress(cfg, &format!("{} MTU {mtu}", stack.name()));
        let row = |setup, metrics| Row {
            stack: stack.name().into(),
            variant: "",
            mtu,
            setup,
            metrics,
        };
        if let Err(e) = cfg.budget_for(40) {
            rows.push(row(Err(e), Vec::new()));
            return;
        }
        let rig = match Rig::new() {
            Ok(r) => r,
            Err(e) => {
                rows.push(row(Err(format!("rig: {e}")), Vec::new()));
                return;
            }
        };
        let (stack_bg, _echo, setup) = match bring_up(cfg, &rig, stack, mtu) {
            Ok(x) => x,
            Err(e) => {
                progress(cfg, &format!("  {} MTU {mtu} failed: {e}", stack.name()));
                rows.push(row(Err(e), Vec::new()));
                return;
            }
        };
        let ctx = Ctx {
            cfg,
            rig: &rig,
            client_ns: &rig.guest,
            host: stack.host_addr(),
            stack_pid: stack_bg.pid(),
            stack_log: stack_bg.log.clone(),
            log: cfg.logs.join(format!("{}-{mtu}-servers.log", stack.name())),
        };
        let metrics = measure_all(&ctx, mtu);
        for m in &metrics {
            if let Err(e) = &m.value {
                progress(cfg, &format!("  {}: {e}", m.key));
            }
        }
        rows.push(row(Ok(setup), metrics));

        if stack == Stack::Usernet && cfg.idle > 0 {
            let n = cfg.idle;
            progress(cfg, &format!("usernet MTU {mtu} with {n} idle connections"));
            let mut r = Row {
                stack: "usernet".into(),
                variant: "idle",
                mtu,
                setup: Err(String::new()),
                metrics: Vec::new(),
            };
            match cfg
                .budget_for(3 * cfg.secs + 40)
                .and_then(|_| open_idle(&ctx, n))
            {
                Ok((_opener, _holder, setup)) => {
                    r.metrics = vec![
                        iperf(&ctx, "tcp_g2h_1", 1, false, None),
                        iperf(&ctx, "tcp_h2g_1", 1, true, None),
                    ];
                    r.metrics.extend(latency(&ctx));
                    r.setup = Ok(setup);
                }
                Err(e) => {
                    progress(cfg, &format!("  idle connections failed: {e}"));
                    r.setup = Err(e);
                }
            }
            rows.push(r);
        }
        drop(stack_bg);
    }

    /// The rows of several rounds as one row per stack, variant and MTU: each metric the
    /// median of the rounds that measured it (its detail that round's, with every round's
    /// figure in `rounds`), an error only where no round measured it.
    fn medians(rows: Vec<Row>) -> Vec<Row> {
        let mut merged: Vec<(Row, Vec<Vec<Metric>>)> = Vec::new();
        for mut r in rows {
            let metrics = std::mem::take(&mut r.metrics);
            let same = |m: &Row| (&m.stack, m.variant, m.mtu) == (&r.stack, r.variant, r.mtu);
            match merged.iter_mut().find(|(m, _)| same(m)) {
                Some((head, rounds)) => {
                    if head.setup.is_err() && r.setup.is_ok() {
                        head.setup = r.setup;
                    }
                    rounds.push(metrics);
                }
                None => merged.push((r, vec![metrics])),
            }
        }
        merged
            .into_iter()
            .map(|(mut row, rounds)| {
                if rounds.len() == 1 {
                    row.metrics = rounds.into_iter().next().unwrap_or_default();
                    return row;
                }
                let mut all: Vec<Metric> = rounds.into_iter().flatten().collect();
                while let Some(key) = all.first().map(|m| m.key) {
                    let (these, rest): (Vec<Metric>, Vec<Metric>) =
                        all.into_iter().partition(|m| m.key == key);
                    all = rest;
                    let (mut ok, errs): (Vec<Metric>, Vec<Metric>) =
                        these.into_iter().partition(|m| m.value.is_ok());
                    let v = |m: &Metric| m.value.clone().unwrap_or(f64::NAN);
                    let figures: Vec<f64> = ok.iter().map(v).collect();
                    ok.sort_by(|a, b| v(a).total_cmp(&v(b)));
                    if ok.is_empty() {
                        row.metrics.extend(errs.into_iter().next());
                        continue;
                    }
                    let mut m = ok.swap_remove((ok.len() - 1) / 2);
                    if let Value::Object(o) = &mut m.detail {
                        o.insert("rounds".into(), json!(figures));
                        o.insert("rounds_failed".into(), json!(errs.len()));
                    }
                    row.metrics.push(m);
                }
                row
            })
            .collect()
    }

    // -----------------------------------------------------------------------------------------
    // The VM row
    // -----------------------------------------------------------------------------------------

    struct Qemu {
        bin: PathBuf,
        env: Vec<(String, String)>,
        args: Vec<String>,
    }

    fn find_qemu(cfg: &Config) -> Result<Qemu, String> {
        if let Some(b) = which("qemu-system-x86_64") {
            return Ok(Qemu {
                bin: b,
                env: Vec::new(),
                args: Vec::new(),
            });
        }
        let root = PathBuf::from(MANIFEST_DIR).join("target/qemu/root");
        let bin = root.join("usr/bin/qemu-system-x86_64");
        if !bin.exists() {
            progress(cfg, "no QEMU: running tests/support/fetch-qemu.sh");
            let mut c = Command::new("sh");
            c.arg(PathBuf::from(MANIFEST_DIR).join("tests/support/fetch-qemu.sh"));
            let out = proc::run(c, Duration::from_secs(240));
            if !out.success() || !bin.exists() {
                return Err(format!(
                    "no qemu-system-x86_64 in PATH or {}, and fetch-qemu.sh failed: {}",
                    root.display(),
                    out.stderr_tail()
                ));
            }
        }
        Ok(Qemu {
            bin,
            env: vec![(
                "LD_LIBRARY_PATH".into(),
                root.join("usr/lib/x86_64-linux-gnu").display().to_string(),
            )],
            args: vec![
                "-L".into(),
                root.join("usr/share/qemu").display().to_string(),
                "-L".into(),
                root.join("usr/share/seabios").display().to_string(),
            ],
        })
    }

    /// The guest's /init for the bench (appended to the test guest's initramfs as /bench-init,
    /// run by `rdinit=`): DHCP, then `nc` to the host address (the lease's router, which both
    /// usernet and passt map to the host's loopback), guest->host from /dev/zero, then
    /// host->guest to /dev/null (stdin stays the console, so nc never half-closes early).
    const BENCH_INIT: &str = r#"#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
exec 0</dev/console 1>/dev/console 2>&1
param() {
    for w in $(cat /proc/cmdline); do
        case "$w" in "e2e.$1="*) echo "${w#e2e.$1=}"; return 0 ;; esac
    done
    echo "$2"
}
for m in $(cat /lib/modules/order); do insmod "/lib/modules/$m.ko" || echo "BENCH insmod $m failed"; done
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do usleep 100000; i=$((i+1)); done
sysctl -q -w net.ipv6.conf.all.disable_ipv6=1 >/dev/null 2>&1
ip link set lo up
ip link set eth0 up
udhcpc -i eth0 -O mtu -s /udhcpc.script -n -q -t 10 -T 1 > /tmp/udhcpc.log 2>&1
if [ ! -f /tmp/lease ]; then
    echo "BENCH fail no DHCP lease: $(tr '\n' ' ' < /tmp/udhcpc.log)"
    poweroff -f
fi
host=$(sed -n 's/^router=//p' /tmp/lease | cut -d' ' -f1)
echo "BENCH lease $(tr '\n' ' ' < /tmp/lease) linkmtu=$(cat /sys/class/net/eth0/mtu)"
nc "$host" "$(param up 0)" < /dev/zero > /dev/null
echo "BENCH up-exit $?"
nc "$host" "$(param down 0)" > /dev/null
echo "BENCH down-exit $?"
echo "BENCH done"
sleep 30
poweroff -f
"#;

    fn guest_image(cfg: &Config) -> Result<(PathBuf, PathBuf), String> {
        let qroot = PathBuf::from(MANIFEST_DIR).join("target/qemu/root");
        let mut found = None;
        for root in [PathBuf::from("/"), qroot] {
            let Ok(rd) = fs::read_dir(root.join("boot")) else {
                continue;
            };
            let mut ks: Vec<PathBuf> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64")
                })
                .collect();
            ks.sort();
            for k in ks.into_iter().rev() {
                let ver = k.file_name().unwrap().to_str().unwrap()["vmlinuz-".len()..].to_string();
                let m = root.join("lib/modules").join(ver);
                if m.join("modules.builtin").exists() {
                    found = Some((k, m));
                    break;
                }
            }
            if found.is_some() {
                break;
            }
        }
        let (kernel, moddir) = found.ok_or("no vmlinuz-*-cloud-amd64 with modules in /boot or target/qemu/root/boot (tests/support/fetch-qemu.sh)")?;
        let dir = &cfg.guest_cache;
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let base = dir.join("initrd.gz");
        if !base.exists() || !dir.join("vmlinuz").exists() {
            let mut c = Command::new("sh");
            c.arg(PathBuf::from(MANIFEST_DIR).join("tests/support/build-guest.sh"));
            c.arg(dir).arg(&kernel).arg(&moddir);
            let out = proc::run(c, Duration::from_secs(120));
            if !out.success() {
                return Err(format!("build-guest.sh failed: {}", out.stderr_tail()));
            }
        }
        // The bench's own /init as a second cpio archive: the kernel unpacks both in order.
        let extra = tempfile::tempdir().map_err(|e| e.to_string())?;
        let init = extra.path().join("bench-init");
        fs::write(&init, BENCH_INIT).map_err(|e| e.to_string())?;
        fs::set_permissions(&init, fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
        let mut c = Command::new("sh");
        c.args([
            "-c",
            "echo bench-init | busybox cpio -o -H newc 2>/dev/null | busybox gzip -9 > extra.gz",
        ]);
        c.current_dir(extra.path());
        let out = proc::run(c, Duration::from_secs(20));
        if !out.success() {
            return Err(format!("packing bench-init: {}", out.stderr_tail()));
        }
        let mut img = fs::read(&base).map_err(|e| e.to_string())?;
        img.extend(fs::read(extra.path().join("extra.gz")).map_err(|e| e.to_string())?);
        let initrd = dir.join("bench-initrd.gz");
        fs::write(&initrd, img).map_err(|e| e.to_string())?;
        Ok((dir.join("vmlinuz"), initrd))
    }

    fn run_vm(
        cfg: &Config,
        qemu: &Qemu,
        image: &(PathBuf, PathBuf),
        stack: &str,
        mtu: u32,
    ) -> Result<(Value, Value, Value), String> {
        cfg.budget_for(2 * cfg.secs + 45)?;
        let rig = Rig::new().map_err(|e| format!("rig: {e}"))?;
        let dir = cfg.logs.join(format!("vm-{stack}-{mtu}"));
        fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let sock = dir.join("net.sock");
        let _ = fs::remove_file(&sock);
        let log = dir.join("servers.log");
        let mut server = Bg::spawn(
            cfg.child(
                &rig.stack,
                "vm-serve",
                &[
                    VM_UP_PORT.to_string(),
                    VM_DOWN_PORT.to_string(),
                    cfg.secs.to_string(),
                ],
            ),
            &log,
        )?;
        server.wait_line(Duration::from_secs(10), |l| l == "READY")?;
        let m = mtu.to_string();
        let s = sock.display().to_string();
        let mut net = match stack {
            "usernet" => {
                let mut c = rig.stack.exec(usernet());
                c.args(["--listen-qemu", &s, "--mtu", &m]);
                c.args(cfg.usernet_args.iter());
                c.env("RUST_LOG", "info");
                Bg::spawn(c, &dir.join("stack.log"))?
            }
            "passt" => {
                if which("passt").is_none() {
                    return Err("passt is not installed (apt-get install passt)".into());
                }
                let mut c = rig.stack.exec("timeout");
                c.args([
                    "-k", "5", "300", "passt", "--runas", "0", "-f", "-q", "-1", "-4",
                ]);
                c.args(["-s", &s, "-m", &m, "-t", "none", "-u", "none"]);
                Bg::spawn(c, &dir.join("stack.log"))?
            }
            other => return Err(format!("unknown VM stack {other}")),
        };
        let mut exited = false;
        if !proc::poll_until(Duration::from_secs(10), || {
            exited = !net.running();
            exited || sock.exists()
        }) || exited
        {
            return Err(format!("{stack} did not create {s}: {}", net.tail()));
        }
        let stack_pid = net.pid();
        let serial = dir.join("serial.log");
        let mut c = rig.stack.exec(&qemu.bin);
        c.envs(qemu.env.iter().map(|(k, v)| (k, v)));
        c.args(&qemu.args);
        c.args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]);
        c.args(["-m", "256", "-accel", "tcg", "-smp", "1"]);
        c.arg("-kernel").arg(&image.0).arg("-initrd").arg(&image.1);
        c.arg("-append").arg(format!(
            "console=ttyS0 quiet panic=-1 rdinit=/bench-init e2e.up={VM_UP_PORT} e2e.down={VM_DOWN_PORT}"
        ));
        c.arg("-serial").arg(format!("file:{}", serial.display()));
        c.arg("-netdev").arg(format!(
            "stream,id=n0,server=off,addr.type=unix,addr.path={s}"
        ));
        c.args([
            "-device",
            "virtio-net-pci,netdev=n0,romfile=,mac=52:55:55:12:34:01",
        ]);
        let t0 = Instant::now();
        let cpu0 = proc::cpu_tree(stack_pid);
        let mut vm = Bg::spawn(c, &dir.join("qemu.log"))?;
        let serial_tail = || {
            let t = fs::read_to_string(&serial).unwrap_or_default();
            let bench: Vec<&str> = t.lines().filter(|l| l.contains("BENCH")).collect();
            format!(
                "guest: {} | last console line: {}",
                bench.join(" | "),
                proc::tail_lines(&t, 1)
            )
        };
        let mut results = Vec::new();
        for (dir_key, within) in [("g2h", 180), ("h2g", cfg.secs + 70)] {
            let want = format!("\"dir\":\"{dir_key}\"");
            let line = server
                .wait_line(Duration::from_secs(within), |l| l.contains(&want))
                .map_err(|e| {
                    let q = if vm.running() {
                        "QEMU running".to_string()
                    } else {
                        format!("QEMU exited: {}", vm.tail())
                    };
                    format!("{dir_key}: {e}; {q}; {}", serial_tail())
                })?;
            let v: Value = serde_json::from_str(&line).map_err(|e| e.to_string())?;
            results.push(v);
        }
        let cpu = proc::cpu_tree(stack_pid) - cpu0;
        let setup = json!({ "seconds": t0.elapsed().as_secs_f64(), "stack_cpu_seconds": cpu,
                            "guest": serial_tail() });
        vm.stop();
        drop(net);
        Ok((results.remove(0), results.remove(0), setup))
    }

    fn vm_metric(key: &'static str, v: &Value) -> Metric {
        match (
            v.get("error").and_then(Value::as_str),
            v["bits_per_second"].as_f64(),
        ) {
            (Some(e), _) => Metric::err(key, e),
            (None, Some(b)) => Metric::ok(key, b / 1e9, v.clone()),
            _ => Metric::err(key, format!("no figure: {v}")),
        }
    }

    fn run_vms(cfg: &Config) -> Vec<Row> {
        let mut rows = Vec::new();
        let env = find_qemu(cfg).and_then(|q| guest_image(cfg).map(|i| (q, i)));
        for &mtu in &cfg.vm_mtus {
            for stack in &cfg.vm_stacks {
                progress(cfg, &format!("VM through {stack}, MTU {mtu}"));
                let mut row = Row {
                    stack: stack.clone(),
                    variant: "vm",
                    mtu,
                    setup: Err(String::new()),
                    metrics: Vec::new(),
                };
                match env
                    .as_ref()
                    .map_err(|e| e.clone())
                    .and_then(|(q, i)| run_vm(cfg, q, i, stack, mtu))
                {
                    Ok((up, down, setup)) => {
                        row.metrics =
                            vec![vm_metric("tcp_g2h_1", &up), vm_metric("tcp_h2g_1", &down)];
                        row.setup = Ok(setup);
                    }
                    Err(e) => {
                        progress(cfg, &format!("  failed: {e}"));
                        row.setup = Err(e);
                    }
                }
                rows.push(row);
            }
        }
        rows
    }

    // -----------------------------------------------------------------------------------------
    // Report
    // -----------------------------------------------------------------------------------------

    fn fmt_value(key: &str, v: f64) -> String {
        match unit(key) {
            "Gbit/s" if v < 1.0 => format!("{v:.3}"),
            "Gbit/s" => format!("{v:.2}"),
            "us" => format!("{v:.1}"),
            _ => format!("{v:.0}"),
        }
    }

    /// Collects failure reasons and hands out their footnote numbers.
    struct Notes(Vec<String>);

    impl Notes {
        fn add(&mut self, s: String) -> usize {
            if let Some(i) = self.0.iter().position(|x| *x == s) {
                return i + 1;
            }
            self.0.push(s);
            self.0.len()
        }
    }

    fn cell(row: Option<&Row>, key: &str, notes: &mut Notes, label: &str) -> (String, Option<f64>) {
        let Some(row) = row else {
            return ("-".into(), None);
        };
        if let Err(e) = &row.setup {
            let n = notes.add(format!("{label}: {e}"));
            return (format!("FAIL[{n}]"), None);
        }
        match row.get(key) {
            None => ("-".into(), None),
            Some(m) => match &m.value {
                Ok(v) => {
                    let mut s = fmt_value(key, *v);
                    if let Some(n) = &m.note {
                        s.push_str(&format!(" ({n})"));
                    }
                    (s, Some(*v))
                }
                Err(e) => {
                    let n = notes.add(format!("{label} {key}: {e}"));
                    (format!("FAIL[{n}]"), None)
                }
            },
        }
    }

    fn ratio(a: Option<f64>, b: Option<f64>) -> (String, Option<f64>) {
        match (a, b) {
            (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => {
                (format!("{:.2}", a / b), Some(a / b))
            }
            _ => ("-".into(), None),
        }
    }

    fn report(cfg: &Config, rows: &[Row], vms: &[Row]) -> (String, Vec<Value>) {
        let mut out = String::new();
        let mut ratios = Vec::new();
        let mut notes = Notes(Vec::new());
        let has_usernet = cfg.stacks.contains(&Stack::Usernet);
        let mtus = if cfg.stacks.is_empty() {
            &[][..]
        } else {
            &cfg.mtus[..]
        };
        for &mtu in mtus {
            let find = |stack: &str, variant: &str| {
                rows.iter()
                    .find(|r| r.mtu == mtu && r.stack == stack && r.variant == variant)
            };
            out.push_str(&format!(
                "\n### MTU {mtu} ({} s per iperf3 run; ratio = usernet / peer, same run)\n\n",
                cfg.secs
            ));
            let mut head = vec!["metric".to_string(), "unit".into()];
            for s in &cfg.stacks {
                head.push(s.name().into());
                if *s != Stack::Usernet && has_usernet {
                    head.push(format!("usernet/{}", s.name()));
                }
            }
            let idle = has_usernet && cfg.idle > 0;
            if idle {
                head.push(format!("usernet, {} idle conns", cfg.idle));
                head.push("idle/usernet".into());
            }
            out.push_str(&format!("| {} |\n", head.join(" | ")));
            out.push_str(&format!("|{}\n", "---|".repeat(head.len())));
            for (key, label, unit) in METRICS {
                if !cfg.wants_key(key) {
                    continue;
                }
                let mut cells = vec![label.to_string(), unit.to_string()];
                let (u, uv) = if has_usernet {
                    cell(
                        find("usernet", ""),
                        key,
                        &mut notes,
                        &format!("usernet MTU {mtu}"),
                    )
                } else {
                    ("-".into(), None)
                };
                for s in &cfg.stacks {
                    if *s == Stack::Usernet {
                        cells.push(u.clone());
                        continue;
                    }
                    let (c, v) = cell(
                        find(s.name(), ""),
                        key,
                        &mut notes,
                        &format!("{} MTU {mtu}", s.name()),
                    );
                    cells.push(c);
                    if has_usernet {
                        let (r, rv) = ratio(uv, v);
                        cells.push(r);
                        ratios.push(json!({ "mtu": mtu, "metric": key, "peer": s.name(), "usernet_over_peer": rv }));
                    }
                }
                if idle {
                    let r = find("usernet", "idle");
                    let measured = r
                        .map(|r| r.get(key).is_some() || r.setup.is_err())
                        .unwrap_or(false);
                    if measured {
                        let (c, v) = cell(r, key, &mut notes, &format!("usernet idle MTU {mtu}"));
                        let (q, qv) = ratio(v, uv);
                        cells.push(c);
                        cells.push(q);
                        ratios.push(json!({ "mtu": mtu, "metric": key, "peer": "usernet", "variant": "idle", "idle_over_base": qv }));
                    } else {
                        cells.push("".into());
                        cells.push("".into());
                    }
                }
                out.push_str(&format!("| {} |\n", cells.join(" | ")));
            }
        }
        if let Some(reference) = rows.iter().find(|r| r.variant == "reference") {
            out.push_str(
                "\n### Reference: no stack (the same clients and echo server on S's loopback); in brackets each stack's figure over it\n\n",
            );
            let mut head = vec!["metric".to_string(), "unit".into(), "no stack".into()];
            let mut cols = Vec::new();
            for &mtu in mtus {
                for s in &cfg.stacks {
                    head.push(format!("{} {mtu}", s.name()));
                    cols.push((s.name(), mtu));
                }
            }
            out.push_str(&format!("| {} |\n", head.join(" | ")));
            out.push_str(&format!("|{}\n", "---|".repeat(head.len())));
            for (key, label, unit) in METRICS {
                if !cfg.wants_key(key) || (reference.get(key).is_none() && reference.setup.is_ok())
                {
                    continue;
                }
                let (c, base) = cell(Some(reference), key, &mut notes, "no stack");
                let mut cells = vec![label.to_string(), unit.to_string(), c];
                for &(stack, mtu) in &cols {
                    let r = rows
                        .iter()
                        .find(|r| r.mtu == mtu && r.stack == stack && r.variant.is_empty());
                    let (c, v) = cell(r, key, &mut notes, &format!("{stack} MTU {mtu}"));
                    let (q, qv) = ratio(v, base);
                    cells.push(if v.is_some() { format!("{c} ({q})") } else { c });
                    ratios.push(json!({ "reference": true, "mtu": mtu, "metric": key, "stack": stack, "over_no_stack": qv }));
                }
                out.push_str(&format!("| {} |\n", cells.join(" | ")));
            }
        }
        if !vms.is_empty() {
            out.push_str(&format!(
                "\n### QEMU TCG guest over -netdev stream (busybox nc, timed on the host side, {} s each way)\n\n",
                cfg.secs
            ));
            let stacks = &cfg.vm_stacks;
            let mut head = vec!["MTU".to_string(), "direction".into()];
            for (i, s) in stacks.iter().enumerate() {
                head.push(format!("{s} Gbit/s"));
                if i > 0 && stacks[0] == "usernet" {
                    head.push(format!("usernet/{s}"));
                }
            }
            out.push_str(&format!("| {} |\n", head.join(" | ")));
            out.push_str(&format!("|{}\n", "---|".repeat(head.len())));
            for &mtu in &cfg.vm_mtus {
                for (key, label) in [("tcp_g2h_1", "guest->host"), ("tcp_h2g_1", "host->guest")] {
                    let mut cells = vec![mtu.to_string(), label.to_string()];
                    let mut first = None;
                    for (i, s) in stacks.iter().enumerate() {
                        let r = vms.iter().find(|r| r.mtu == mtu && &r.stack == s);
                        let (c, v) = cell(r, key, &mut notes, &format!("VM {s} MTU {mtu}"));
                        cells.push(c);
                        if i == 0 {
                            first = v;
                        } else if stacks[0] == "usernet" {
                            let (q, qv) = ratio(first, v);
                            cells.push(q);
                            ratios.push(json!({ "vm": true, "mtu": mtu, "metric": key, "peer": s, "usernet_over_peer": qv }));
                        }
                    }
                    out.push_str(&format!("| {} |\n", cells.join(" | ")));
                }
            }
        }
        if !notes.0.is_empty() {
            out.push_str("\nFailures:\n");
            for (i, n) in notes.0.iter().enumerate() {
                out.push_str(&format!("[{}] {}\n", i + 1, n));
            }
        }
        (out, ratios)
    }

    fn sh(cmd: &str) -> String {
        Command::new("sh")
            .args(["-c", cmd])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    }

    fn loadavg() -> String {
        fs::read_to_string("/proc/loadavg")
            .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    }

    pub fn main() {
        let cfg = Config::from_env();
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/net/tun").exists() {
            eprintln!(
                "e2e: needs root and /dev/net/tun (namespaces, tap devices); nothing measured"
            );
            return;
        }
        for t in ["ip", "iperf3"] {
            if which(t).is_none() {
                eprintln!("e2e: `{t}` is not installed (apt-get install iproute2 iperf3); nothing measured");
                return;
            }
        }
        raise_nofile();
        ns::Netns::remove_stale();
        let _ = fs::remove_dir_all(&cfg.logs);
        fs::create_dir_all(&cfg.logs).expect("create target/e2e-bench");
        let load_start = loadavg();
        let date = sh("date -u +%Y-%m-%dT%H:%M:%SZ");
        let tree = sh(&format!(
            "git -C '{MANIFEST_DIR}' describe --always --dirty"
        ));
        let uncommitted: Vec<String> =
            sh(&format!("git -C '{MANIFEST_DIR}' status --porcelain -uno"))
                .lines()
                .map(|l| l.trim().to_string())
                .collect();
        // `E2E_USERNET_BIN`: another build to measure (an A/B comparison of two trees).
        let built = std::env::var("E2E_USERNET_BIN").unwrap_or_else(|_| USERNET_BUILT.into());
        let copy = cfg.logs.join("usernet");
        match fs::copy(&built, &copy) {
            Ok(_) => {
                let _ = USERNET.set(copy);
            }
            Err(e) => {
                eprintln!("e2e: cannot copy {built}: {e}; running it in place");
                let _ = USERNET.set(PathBuf::from(&built));
            }
        }
        let usernet_built = sh(&format!("date -u -r '{built}' +%Y-%m-%dT%H:%M:%SZ"));
        progress(
            &cfg,
            &format!(
                "start {date}, tree {tree}, load {load_start}; logs in {}",
                cfg.logs.display()
            ),
        );

        let mut rows = Vec::new();
        for round in 0..cfg.rounds.max(1) {
            if cfg.rounds > 1 {
                progress(&cfg, &format!("round {} of {}", round + 1, cfg.rounds));
            }
            if cfg.reference && !cfg.stacks.is_empty() {
                rows.push(run_reference(&cfg));
            }
            for &mtu in &cfg.mtus {
                for &stack in &cfg.stacks {
                    run_stack(&cfg, stack, mtu, &mut rows);
                }
            }
        }
        let rows = medians(rows);
        let vms = if cfg.vm { run_vms(&cfg) } else { Vec::new() };

        let (table, ratios) = report(&cfg, &rows, &vms);
        let load_end = loadavg();
        println!(
            "\n## e2e: {date}, tree {tree}{}, usernet built {usernet_built}{}{}{}{}, load average {load_start} at start, {load_end} at end, {:.0} s",
            if uncommitted.is_empty() { String::new() } else { format!(" (uncommitted: {})", uncommitted.join(", ")) },
            if cfg.usernet_args.is_empty() { String::new() } else { format!(", usernet args {}", cfg.usernet_args.join(" ")) },
            match &cfg.pin { None => String::new(), Some([s, c, v]) => format!(", pinned: stack on CPU {s}, clients {c}, servers {v}") },
            if cfg.echo == Echo::Thread { String::new() } else { format!(", echo server: {}", cfg.echo.name()) },
            if cfg.rounds > 1 { format!(", each figure the median of {} rounds", cfg.rounds) } else { String::new() },
            cfg.elapsed()
        );
        println!("{table}");
        let versions = json!({
            "usernet": sh(&format!("'{}' --version", usernet().display())),
            "usernet_built": usernet_built,
            "usernet_args": cfg.usernet_args,
            "slirp4netns": sh("slirp4netns --version 2>/dev/null | head -n 1"),
            "passt": sh("dpkg-query -W -f '${Version}' passt 2>/dev/null"),
            "iperf3": sh("iperf3 --version 2>/dev/null | head -n 1"),
            "kernel": sh("uname -r"),
        });
        let doc = json!({
            "bench": "e2e",
            "date": date,
            "tree": tree,
            "tree_uncommitted": uncommitted,
            "load_average_start": load_start,
            "load_average_end": load_end,
            "seconds": cfg.elapsed(),
            "seconds_per_run": cfg.secs,
            "idle_connections": cfg.idle,
            "pin": cfg.pin.as_ref().map(|[s, c, v]| json!({ "stack": s, "clients": c, "servers": v })),
            "echo_server": cfg.echo.name(),
            "rounds": cfg.rounds,
            "versions": versions,
            "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
            "vm": vms.iter().map(Row::json).collect::<Vec<_>>(),
            "ratios": ratios,
            "table": table,
            "logs": cfg.logs,
        });
        match fs::write(&cfg.json, serde_json::to_string_pretty(&doc).unwrap()) {
            Ok(()) => println!("JSON: {}", cfg.json.display()),
            Err(e) => eprintln!("e2e: cannot write {}: {e}", cfg.json.display()),
        }
    }
}
