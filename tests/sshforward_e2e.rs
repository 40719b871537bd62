//! `-forward-sock` (`usernet::sshforward`) against a real OpenSSH sshd (Debian's openssh-server).
//!
//! sshd runs as this test's child on 127.0.0.1 at a free high port, with a config, host key and
//! authorized keys of the test's own in a temp dir; the "guest socket" is an echo server on a
//! unix socket in that temp dir, served by this test process; `serve()` runs in-process. All
//! traffic stays on loopback and unix sockets. Needs root (sshd) and /usr/sbin/sshd plus
//! ssh-keygen: otherwise a `SKIPPED:` line, or a failure with `USERNET_E2E=1`.

use std::fs;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use usernet::sshforward::{serve, SockForward};

const SSHD: &str = "/usr/sbin/sshd";
/// How long any one client exchange may take before the test calls it a hang.
const EXCHANGE_DEADLINE: Duration = Duration::from_secs(60);
const MIB: usize = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Preconditions, logs
// ---------------------------------------------------------------------------------------------

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn in_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// Whether the test can run; prints `SKIPPED:` (or panics with USERNET_E2E=1) when not.
fn require(test: &str, need_sshd: bool) -> bool {
    let mut reasons = Vec::new();
    if need_sshd && !is_root() {
        reasons.push("not running as root".to_string());
    }
    if need_sshd && !Path::new(SSHD).is_file() {
        reasons.push(format!(
            "{SSHD} is missing (apt-get install openssh-server)"
        ));
    }
    if !in_path("ssh-keygen") {
        reasons.push("ssh-keygen not found in PATH (apt-get install openssh-client)".to_string());
    }
    if reasons.is_empty() {
        return true;
    }
    let reason = reasons.join("; ");
    if std::env::var("USERNET_E2E").as_deref() == Ok("1") {
        panic!("{test}: cannot run end-to-end test with USERNET_E2E=1: {reason}");
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {reason}");
    false
}

/// Everything the code under test logs, also copied to stderr.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn logs() -> Logs {
    static LOGS: OnceLock<Logs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "usernet::sshforward=debug,russh=warn",
            ))
            .with_ansi(false)
            .with_writer(logs.clone())
            .init();
        logs
    })
    .clone()
}

/// Waits until the logs contain `needle` (they are written from other tasks).
async fn wait_log(logs: &Logs, needle: &str, deadline: Duration) {
    let end = Instant::now() + deadline;
    while !logs.text().contains(needle) {
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting for a log line with {needle:?}; logs:\n{}",
            logs.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Keys and sshd
// ---------------------------------------------------------------------------------------------

fn keygen(path: &Path, kind: &str) {
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-q", "-N", "", "-C", "usernet-test", "-t", kind, "-f"])
        .arg(path);
    if kind == "rsa" {
        cmd.args(["-b", "2048"]);
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .expect("running ssh-keygen");
    assert!(
        out.status.success(),
        "ssh-keygen -t {kind} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An sshd of the test's own, on 127.0.0.1:`port`.
struct Sshd {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
    starts: u32,
}

impl Sshd {
    fn new(dir: &Path, authorized: &[&Path]) -> Sshd {
        keygen(&dir.join("host_ed25519"), "ed25519");
        let mut keys = String::new();
        for k in authorized {
            keys += &fs::read_to_string(k.with_extension("pub")).unwrap();
        }
        fs::write(dir.join("authorized_keys"), keys).unwrap();
        let port = free_port();
        let config = format!(
            "Port {port}\n\
             ListenAddress 127.0.0.1\n\
             HostKey {d}/host_ed25519\n\
             AuthorizedKeysFile {d}/authorized_keys\n\
             PermitRootLogin prohibit-password\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             AllowStreamLocalForwarding yes\n\
             X11Forwarding no\n\
             UsePAM no\n\
             StrictModes no\n\
             PidFile {d}/sshd.pid\n\
             LogLevel VERBOSE\n",
            d = dir.display()
        );
        fs::write(dir.join("sshd_config"), config).unwrap();
        // sshd's privilege-separation directory; Debian makes it at boot, a container may lack it.
        if !Path::new("/run/sshd").is_dir() {
            fs::create_dir_all("/run/sshd").unwrap();
            fs::set_permissions("/run/sshd", fs::Permissions::from_mode(0o755)).unwrap();
        }
        Sshd {
            dir: dir.to_path_buf(),
            port,
            child: None,
            starts: 0,
        }
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("sshd.{}.log", self.starts))
    }

    fn log_tail(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts sshd and waits until it accepts TCP connections.
    fn start(&mut self) {
        assert!(self.child.is_none(), "sshd already running");
        self.starts += 1;
        let log = fs::File::create(self.log_path()).unwrap();
        let child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(self.dir.join("sshd_config"))
            .args(["-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting sshd");
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            if TcpStream::connect(self.addr()).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "sshd exited ({status}) at start; its log:\n{}",
                    self.log_tail()
                );
            }
            assert!(
                Instant::now() < end,
                "sshd did not listen in 15 s; log:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills sshd and every process under it (the per-connection sshd children call setsid, so
    /// they are found by parent pid, not by process group), as a guest reboot would.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let mut pids = vec![child.id() as i32];
        let mut i = 0;
        while i < pids.len() {
            pids.extend(children_of(pids[i]));
            i += 1;
        }
        for pid in &pids {
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        let _ = child.wait();
        // Wait for the port to be free again, so the restart can bind it.
        let end = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(self.addr()).is_ok() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The pids whose parent is `pid`, from /proc.
fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and
        // parentheses: split after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        if rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<i32>().ok())
            == Some(pid)
        {
            out.push(child);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The guest sockets and the clients
// ---------------------------------------------------------------------------------------------

/// Echoes every connection's bytes back; half-closes its side after the client's EOF.
fn echo_server(path: &Path) {
    let listener = UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut rd, mut wr) = conn.into_split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
                let _ = wr.shutdown().await;
            });
        }
    });
}

/// Says HELLO and half-closes at once, then counts what it receives until EOF and reports it.
fn hello_server(path: &Path) -> mpsc::UnboundedReceiver<usize> {
    let listener = UnixListener::bind(path).unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let (mut rd, mut wr) = conn.into_split();
                let _ = wr.write_all(b"HELLO").await;
                let _ = wr.shutdown().await;
                let mut n = 0;
                let mut buf = vec![0; 65536];
                while let Ok(k) = rd.read(&mut buf).await {
                    if k == 0 {
                        break;
                    }
                    n += k;
                }
                let _ = tx.send(n);
            });
        }
    });
    rx
}

/// Deterministic pseudo-random bytes.
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Sends `data` through the forward at `sock`, half-closes, reads until EOF; returns what came
/// back.
async fn exchange(sock: &Path, data: Vec<u8>) -> std::io::Result<Vec<u8>> {
    let conn = UnixStream::connect(sock).await?;
    let (mut rd, mut wr) = conn.into_split();
    let writer = tokio::spawn(async move {
        wr.write_all(&data).await?;
        wr.shutdown().await
    });
    let mut back = Vec::new();
    rd.read_to_end(&mut back).await?;
    // A write error after the peer closed is not the point here; the bytes are.
    let _ = writer.await;
    Ok(back)
}

/// `exchange`, which must finish within the deadline and echo `data` byte for byte.
async fn assert_echo(sock: &Path, len: usize, seed: u64, what: &str) {
    let data = payload(len, seed);
    let back = tokio::time::timeout(EXCHANGE_DEADLINE, exchange(sock, data.clone()))
        .await
        .unwrap_or_else(|_| panic!("{what}: no complete echo within {EXCHANGE_DEADLINE:?}"))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(back.len(), data.len(), "{what}: echoed length");
    assert!(back == data, "{what}: echoed bytes differ");
}

/// Connects to a forward that cannot reach the guest: the connection must be closed, not hang.
async fn assert_closed(sock: &Path, what: &str) {
    let back = tokio::time::timeout(EXCHANGE_DEADLINE, async {
        let mut conn = UnixStream::connect(sock).await?;
        let _ = conn
            .write_all(b"GET /_ping HTTP/1.1\r\nHost: d\r\n\r\n")
            .await;
        let mut back = Vec::new();
        let _ = conn.read_to_end(&mut back).await; // EOF or ECONNRESET: both are a close
        std::io::Result::Ok(back)
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: connection still open after {EXCHANGE_DEADLINE:?}"))
    .unwrap_or_else(|e| panic!("{what}: connecting: {e}"));
    assert!(
        back.is_empty(),
        "{what}: got {} bytes from a forward that cannot work",
        back.len()
    );
}

/// Starts `serve` for `f` and waits for its socket.
async fn start_serve(
    f: SockForward,
    ssh: SocketAddr,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let local = f.local.clone();
    let task = tokio::spawn(serve(f, ssh));
    let end = Instant::now() + Duration::from_secs(10);
    while !local.exists() {
        assert!(
            Instant::now() < end,
            "serve() did not bind {}",
            local.display()
        );
        assert!(
            !task.is_finished(),
            "serve() for {} returned early",
            local.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    task
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_sock_over_real_sshd() {
    if !require("forward_sock_over_real_sshd", true) {
        return;
    }
    let logs = logs();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (id_ed, id_rsa, id_wrong) = (
        dir.join("id_ed25519"),
        dir.join("id_rsa"),
        dir.join("id_wrong"),
    );
    keygen(&id_ed, "ed25519");
    keygen(&id_rsa, "rsa");
    keygen(&id_wrong, "ed25519");
    let mut sshd = Sshd::new(dir, &[&id_ed, &id_rsa]);
    sshd.start();
    let ssh = sshd.addr();

    let guest = dir.join("guest.sock");
    echo_server(&guest);
    let hello = dir.join("hello.sock");
    let mut hello_counts = hello_server(&hello);
    let fwd = |local: &str, dest: &Path, identity: &Path| SockForward {
        local: dir.join(local),
        dest: dest.display().to_string(),
        user: "root".to_string(),
        identity: identity.to_path_buf(),
    };

    // 1 MiB through the forward, echoed byte for byte, with half-close carried both ways.
    let main = dir.join("podman.sock");
    let _serve_main = start_serve(fwd("podman.sock", &guest, &id_ed), ssh).await;
    let mode = fs::metadata(&main).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "host socket mode");
    assert_echo(&main, MIB, 1, "first connection").await;
    eprintln!("ok: 1 MiB echoed byte-identical");

    // A second connection after the first has closed, on the same session.
    assert_echo(&main, 4096, 2, "second connection").await;
    eprintln!("ok: second connection");

    // Two at once.
    let (a, b) = tokio::join!(
        assert_echo(&main, MIB, 3, "concurrent client A"),
        assert_echo(&main, MIB, 4, "concurrent client B")
    );
    let _ = (a, b);
    eprintln!("ok: two concurrent clients");

    // Half-close from the guest side: the client sees HELLO then EOF, and can still send.
    {
        let _serve_hello = start_serve(fwd("hello-host.sock", &hello, &id_ed), ssh).await;
        let res = tokio::time::timeout(EXCHANGE_DEADLINE, async {
            let mut conn = UnixStream::connect(dir.join("hello-host.sock"))
                .await
                .unwrap();
            let mut greeting = Vec::new();
            conn.read_to_end(&mut greeting).await.unwrap();
            assert_eq!(greeting, b"HELLO", "guest's greeting before its EOF");
            conn.write_all(&payload(100_000, 5)).await.unwrap();
            conn.shutdown().await.unwrap();
            hello_counts.recv().await.unwrap()
        })
        .await
        .expect("guest-side half-close exchange hung");
        assert_eq!(res, 100_000, "bytes the guest got after its own EOF");
        eprintln!("ok: guest-side half-close");
    }

    // RSA identity (rsa-sha2-256/512 chosen from the server's server-sig-algs).
    {
        let sock = dir.join("rsa.sock");
        let _serve_rsa = start_serve(fwd("rsa.sock", &guest, &id_rsa), ssh).await;
        assert_echo(&sock, 65536, 6, "RSA identity").await;
        eprintln!("ok: RSA identity");
    }

    // A guest socket that does not exist: closed, and the refusal logged.
    {
        let sock = dir.join("missing.sock");
        let _serve_missing = start_serve(
            fwd("missing.sock", &dir.join("nothing-here.sock"), &id_ed),
            ssh,
        )
        .await;
        assert_closed(&sock, "missing guest socket").await;
        wait_log(&logs, "guest refused to connect to", Duration::from_secs(5)).await;
        eprintln!("ok: missing guest socket -> closed, logged");
    }

    // A key sshd does not accept: closed at once (no retry loop), and the refusal logged.
    {
        let sock = dir.join("wrong.sock");
        let _serve_wrong = start_serve(fwd("wrong.sock", &guest, &id_wrong), ssh).await;
        let t0 = Instant::now();
        assert_closed(&sock, "wrong key").await;
        let took = t0.elapsed();
        wait_log(
            &logs,
            "refused user root with the key",
            Duration::from_secs(5),
        )
        .await;
        assert!(
            logs.text()
                .lines()
                .any(|l| l.contains("ERROR") && l.contains("wrong.sock")),
            "no ERROR line naming wrong.sock; logs:\n{}",
            logs.text()
        );
        assert!(
            took < Duration::from_secs(10),
            "wrong key took {took:?} to close"
        );
        eprintln!("ok: wrong key -> closed in {took:?}, logged");
    }

    // sshd restarted (the session with it killed, as in a guest reboot): the next connection
    // makes a new session.
    sshd.stop();
    sshd.start();
    assert_echo(&main, MIB, 7, "after sshd restart").await;
    eprintln!("ok: reconnect after sshd restart");

    // sshd down when a client comes, up a moment later: the client waits and gets through.
    sshd.stop();
    let client = {
        let main = main.clone();
        tokio::spawn(async move { assert_echo(&main, 65536, 8, "while sshd comes back").await })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!client.is_finished(), "client finished while sshd was down");
    sshd.start();
    client.await.expect("client while sshd comes back");
    eprintln!("ok: retry with backoff while sshd is down");

    let log = logs.text();
    let sessions = log
        .lines()
        .filter(|l| l.contains("SSH session to") && l.contains("podman.sock ->"))
        .count();
    assert!(
        sessions >= 3,
        "expected 3 sessions for podman.sock (start, restart, comeback), saw {sessions}; \
         logs:\n{log}"
    );
    drop(sshd);
}

/// The host socket: a live one is refused, a stale one replaced, a non-socket file refused,
/// and the socket is removed when `serve` is dropped. Needs no sshd (nothing connects).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_sock_binding_rules() {
    if !require("forward_sock_binding_rules", false) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let id = dir.join("id_ed25519");
    keygen(&id, "ed25519");
    // Nothing listens here; the warm-up merely keeps retrying in the background.
    let ssh = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let fwd = |local: &Path| SockForward {
        local: local.to_path_buf(),
        dest: "/run/podman/podman.sock".to_string(),
        user: "root".to_string(),
        identity: id.clone(),
    };

    let live = dir.join("live.sock");
    let _holder = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), serve(fwd(&live), ssh))
        .await
        .expect("serve() on a live socket did not return")
        .expect_err("serve() took over a live socket");
    assert!(
        format!("{err:#}").contains("in use"),
        "error for a live socket: {err:#}"
    );

    let file = dir.join("plain-file");
    fs::write(&file, "keep me").unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), serve(fwd(&file), ssh))
        .await
        .expect("serve() on a regular file did not return")
        .expect_err("serve() replaced a regular file");
    assert!(
        format!("{err:#}").contains("not a socket"),
        "error for a file: {err:#}"
    );
    assert_eq!(fs::read_to_string(&file).unwrap(), "keep me");

    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let task = tokio::spawn(serve(fwd(&stale), ssh));
    // The stale file exists from the start: wait for the new listener, not for the file.
    let end = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&stale).is_err() {
        assert!(
            Instant::now() < end,
            "the stale socket was not replaced by a live one"
        );
        assert!(
            !task.is_finished(),
            "serve() on a stale socket returned: {:?}",
            task.await
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    task.abort();
    let _ = task.await;
    assert!(
        !stale.exists(),
        "socket left behind after serve() was dropped"
    );

    let err = serve(
        SockForward {
            identity: dir.join("no-such-key"),
            ..fwd(&dir.join("k.sock"))
        },
        ssh,
    )
    .await
    .expect_err("serve() with a missing identity");
    assert!(
        format!("{err:#}").contains("no-such-key"),
        "error for a missing key: {err:#}"
    );
    assert!(
        !dir.join("k.sock").exists(),
        "bound although the key could not be loaded"
    );
}
