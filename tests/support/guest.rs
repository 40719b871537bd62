//! Real QEMU guests for tests/qemu_e2e.rs (included there as `mod guest;` beside `mod support;`).
//!
//! The guest is a Debian cloud kernel plus a busybox initramfs built once per cache by
//! tests/support/build-guest.sh (under a file lock, so parallel tests build it once). Its /init
//! takes DHCP on eth0 and runs the checks named on the kernel command line, printing one
//! `RESULT name ok|fail detail` line per check on the serial console; see the script.
//!
//! QEMU runs on the host (TCG) and reaches usernet only over unix sockets in a temp dir; usernet
//! runs in a namespace with only `lo`, and every server the guest reaches runs in that namespace.
//! QEMU is taken from PATH, else from `target/qemu/root` (tests/support/fetch-qemu.sh unpacks the
//! Debian packages there); `USERNET_QEMU` names a binary explicitly.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt::Display;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::support::{find_in_path, poll_until, require_root_and_tools, Daemon, Netns};

/// How long a guest gets from QEMU's start to its last boot check.
pub const BOOT_DEADLINE: Duration = Duration::from_secs(150);

/// How many serial log lines a failure shows at most.
const SERIAL_TAIL_LINES: usize = 120;

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where the unpacked QEMU/kernel (`root/`) and the built guest (`guest/`) live.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("USERNET_QEMU_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join("target/qemu"))
}

// ---------------------------------------------------------------------------------------------
// QEMU and the guest image
// ---------------------------------------------------------------------------------------------

/// A runnable qemu-system-x86_64: the binary, environment and firmware arguments it needs.
#[derive(Debug, Clone)]
pub struct Qemu {
    pub bin: PathBuf,
    pub env: Vec<(String, String)>,
    pub args: Vec<String>,
    pub version: (u32, u32, u32),
    pub version_line: String,
}

impl Qemu {
    pub fn find() -> Result<Qemu, String> {
        let unpacked = cache_dir().join("root");
        let (bin, env, args) = if let Some(b) = std::env::var_os("USERNET_QEMU") {
            (PathBuf::from(b), Vec::new(), Vec::new())
        } else if let Some(b) = find_in_path("qemu-system-x86_64") {
            (b, Vec::new(), Vec::new())
        } else {
            let b = unpacked.join("usr/bin/qemu-system-x86_64");
            if !b.exists() {
                return Err(format!(
                    "qemu-system-x86_64 is not in PATH and not in {} \
                     (install qemu-system-x86, or run tests/support/fetch-qemu.sh)",
                    unpacked.display()
                ));
            }
            let lib = unpacked.join("usr/lib/x86_64-linux-gnu");
            let env = vec![("LD_LIBRARY_PATH".to_string(), lib.display().to_string())];
            let args = vec![
                "-L".to_string(),
                unpacked.join("usr/share/qemu").display().to_string(),
                "-L".to_string(),
                unpacked.join("usr/share/seabios").display().to_string(),
            ];
            (b, env, args)
        };
        let mut cmd = Command::new(&bin);
        cmd.arg("--version").envs(env.iter().map(|(k, v)| (k, v)));
        let out = cmd
            .output()
            .map_err(|e| format!("cannot run {} --version: {e}", bin.display()))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = text.lines().next().unwrap_or("").to_string();
        let version = parse_qemu_version(&line)
            .ok_or_else(|| format!("cannot read the version of {}: {text:?}", bin.display()))?;
        Ok(Qemu {
            bin,
            env,
            args,
            version,
            version_line: line,
        })
    }

    /// `-netdev stream` reconnects on its own (8.0+: `reconnect=`, 9.2+: `reconnect-ms=`).
    pub fn stream_reconnect_option(&self) -> Option<&'static str> {
        if self.version >= (9, 2, 0) {
            Some("reconnect-ms=500")
        } else if self.version >= (8, 0, 0) {
            Some("reconnect=1")
        } else {
            None
        }
    }

    pub fn version_string(&self) -> String {
        let (a, b, c) = self.version;
        format!("{a}.{b}.{c}")
    }
}

/// "QEMU emulator version 7.2.22 (Debian ...)" -> (7, 2, 22).
pub fn parse_qemu_version(line: &str) -> Option<(u32, u32, u32)> {
    let rest = line.split("version ").nth(1)?;
    let v = rest.split_whitespace().next()?;
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((
        parts.next()??,
        parts.next().flatten().unwrap_or(0),
        parts.next().flatten().unwrap_or(0),
    ))
}

/// The kernel and initramfs the guests boot.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// A cloud kernel and its module directory: `USERNET_GUEST_KERNEL`, else the newest
/// /boot/vmlinuz-*-cloud-amd64 with its /lib/modules, else the same under `target/qemu/root`.
fn find_kernel() -> Result<(PathBuf, PathBuf), String> {
    let modules_for = |root: &Path, kernel: &Path| -> Option<PathBuf> {
        let name = kernel.file_name()?.to_str()?;
        let ver = name.strip_prefix("vmlinuz-")?;
        let m = root.join("lib/modules").join(ver);
        m.join("modules.builtin").exists().then_some(m)
    };
    if let Some(k) = std::env::var_os("USERNET_GUEST_KERNEL") {
        let k = PathBuf::from(k);
        let m = modules_for(Path::new("/"), &k)
            .or_else(|| modules_for(&cache_dir().join("root"), &k))
            .ok_or_else(|| format!("no /lib/modules for USERNET_GUEST_KERNEL={}", k.display()))?;
        return Ok((k, m));
    }
    for root in [PathBuf::from("/"), cache_dir().join("root")] {
        let Ok(rd) = fs::read_dir(root.join("boot")) else {
            continue;
        };
        let mut kernels: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .map(|n| n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64"))
                    .unwrap_or(false)
            })
            .collect();
        kernels.sort();
        if let Some(k) = kernels
            .into_iter()
            .rev()
            .find(|k| modules_for(&root, k).is_some())
        {
            let m = modules_for(&root, &k).expect("checked");
            return Ok((k, m));
        }
    }
    Err(format!(
        "no vmlinuz-*-cloud-amd64 with modules in /boot or {}/root/boot \
         (install linux-image-cloud-amd64, or run tests/support/fetch-qemu.sh)",
        cache_dir().display()
    ))
}

fn script_path() -> PathBuf {
    manifest_dir().join("tests/support/build-guest.sh")
}

/// A cheap fingerprint of what the image is built from (FNV-1a over the script and the kernel
/// path and size), so a changed script or kernel gets a new image.
fn fingerprint(kernel: &Path, moddir: &Path) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x100000001b3);
        }
    };
    feed(&fs::read(script_path()).unwrap_or_default());
    feed(kernel.as_os_str().as_encoded_bytes());
    feed(moddir.as_os_str().as_encoded_bytes());
    feed(
        &fs::metadata(kernel)
            .map(|m| m.len())
            .unwrap_or(0)
            .to_le_bytes(),
    );
    format!("{h:016x}")
}

/// An exclusive flock on `path`, released on drop.
struct FileLock(File);

impl FileLock {
    fn take(path: &Path) -> FileLock {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open lock file {}: {e}", path.display()));
        // SAFETY: flock on an fd we own.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock {}", path.display());
        FileLock(f)
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

impl GuestImage {
    /// The guest image, built into the cache on first use.
    pub fn get() -> Result<GuestImage, String> {
        let (kernel, moddir) = find_kernel()?;
        let dir = cache_dir()
            .join("guest")
            .join(fingerprint(&kernel, &moddir));
        fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let img = GuestImage {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.gz"),
        };
        let _lock = FileLock::take(&dir.join(".lock"));
        if img.kernel.exists() && img.initrd.exists() {
            return Ok(img);
        }
        let out = Command::new("sh")
            .arg(script_path())
            .arg(&dir)
            .arg(&kernel)
            .arg(&moddir)
            .output()
            .map_err(|e| format!("cannot run build-guest.sh: {e}"))?;
        if !out.status.success() || !img.initrd.exists() {
            return Err(format!(
                "build-guest.sh failed ({}):\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(img)
    }
}

/// Everything a QEMU test needs, or None after a SKIPPED line (a panic with USERNET_E2E=1).
pub struct Env {
    pub qemu: Qemu,
    pub image: GuestImage,
}

impl Env {
    pub fn require(test: &str) -> Option<Env> {
        if !require_root_and_tools(test, &["python3", "curl", "busybox", "ss", "sha256sum"]) {
            return None;
        }
        let got = Qemu::find().and_then(|q| GuestImage::get().map(|i| (q, i)));
        match got {
            Ok((qemu, image)) => Some(Env { qemu, image }),
            Err(reason) => {
                if std::env::var("USERNET_E2E").as_deref() == Ok("1") {
                    panic!("{test}: cannot run QEMU end-to-end test with USERNET_E2E=1: {reason}");
                }
                let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {reason}");
                None
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One VM
// ---------------------------------------------------------------------------------------------

/// How a VM is started.
pub struct VmSpec {
    pub name: String,
    pub mac: String,
    /// The `-netdev` value without `id=` (the rig adds `id=n0`), e.g. `stream,server=off,...`.
    pub netdev: String,
    /// `usernet.KEY=VALUE` kernel parameters (checks=..., http=..., sha=...).
    pub params: Vec<(String, String)>,
    /// Inherited by QEMU as fd 3, 4, ... in order.
    pub fds: Vec<OwnedFd>,
}

impl VmSpec {
    pub fn new(name: &str, mac: &str, netdev: impl Into<String>) -> VmSpec {
        VmSpec {
            name: name.to_string(),
            mac: mac.to_string(),
            netdev: netdev.into(),
            params: Vec::new(),
            fds: Vec::new(),
        }
    }

    pub fn param(mut self, key: &str, value: impl Display) -> VmSpec {
        self.params.push((key.to_string(), value.to_string()));
        self
    }

    pub fn fd(mut self, fd: OwnedFd) -> VmSpec {
        self.fds.push(fd);
        self
    }
}

/// One check's outcome as the guest printed it.
#[derive(Debug, Clone)]
pub struct CheckResult {
    pub ok: bool,
    pub status: String,
    pub detail: String,
}

/// A running QEMU guest; killed on drop. Its dir (serial log, pcap, QEMU output) is kept when the
/// test fails.
pub struct Vm {
    pub name: String,
    pub mac: String,
    child: Option<Child>,
    status: Option<ExitStatus>,
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    console: Option<UnixStream>,
    started: Instant,
    cmdline: String,
}

impl Vm {
    pub fn start(env: &Env, spec: VmSpec) -> Vm {
        let dir = tempfile::Builder::new()
            .prefix(&format!("usernet-vm-{}-", spec.name))
            .tempdir()
            .expect("temp dir for a VM");
        let path = dir.path().to_path_buf();
        let mut append = String::from("console=ttyS0 quiet panic=-1");
        for (k, v) in &spec.params {
            append.push_str(&format!(" usernet.{k}={v}"));
        }
        let mut cmd = Command::new(&env.qemu.bin);
        cmd.envs(env.qemu.env.iter().map(|(k, v)| (k, v)));
        cmd.args(&env.qemu.args);
        cmd.args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]);
        cmd.args(["-m", "256", "-accel", "tcg", "-smp", "1"]);
        cmd.arg("-kernel").arg(&env.image.kernel);
        cmd.arg("-initrd").arg(&env.image.initrd);
        cmd.arg("-append").arg(&append);
        cmd.arg("-chardev").arg(format!(
            "socket,id=s0,path={},server=on,wait=off,logfile={}",
            path.join("serial.sock").display(),
            path.join("serial.log").display()
        ));
        cmd.args(["-serial", "chardev:s0"]);
        cmd.arg("-netdev").arg(netdev_with_id(&spec.netdev));
        cmd.arg("-device").arg(format!(
            "virtio-net-pci,netdev=n0,romfile=,mac={}",
            spec.mac
        ));
        cmd.arg("-object").arg(format!(
            "filter-dump,id=f0,netdev=n0,maxlen=2048,file={}",
            path.join("guest.pcap").display()
        ));
        let cmdline = format!(
            "{} {}",
            env.qemu.bin.display(),
            cmd.get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let out = File::create(path.join("qemu.out")).expect("qemu.out");
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone qemu.out"))
            .stderr(out);
        let raw: Vec<i32> = spec.fds.iter().map(|f| f.as_raw_fd()).collect();
        if !raw.is_empty() {
            // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    for (i, &fd) in raw.iter().enumerate() {
                        let target = 3 + i as i32;
                        if fd == target {
                            let flags = libc::fcntl(fd, libc::F_GETFD);
                            if flags < 0
                                || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0
                            {
                                return Err(std::io::Error::last_os_error());
                            }
                        } else if libc::dup2(fd, target) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start QEMU {}: {e}", env.qemu.bin.display()));
        drop(spec.fds); // QEMU holds its copies now
        Vm {
            name: spec.name,
            mac: spec.mac,
            child: Some(child),
            status: None,
            dir: Some(dir),
            path,
            console: None,
            started: Instant::now(),
            cmdline,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// The serial console so far (CRs removed).
    pub fn serial(&self) -> String {
        fs::read(self.path.join("serial.log"))
            .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
            .unwrap_or_default()
    }

    /// Every `RESULT name status detail` line so far (a later line for a name wins).
    pub fn results(&self) -> BTreeMap<String, CheckResult> {
        let mut m = BTreeMap::new();
        for line in self.serial().lines() {
            let Some(rest) = line.trim().strip_prefix("RESULT ") else {
                continue;
            };
            let mut it = rest.splitn(3, ' ');
            let name = it.next().unwrap_or("").to_string();
            let status = it.next().unwrap_or("").to_string();
            let detail = it.next().unwrap_or("").to_string();
            m.insert(
                name,
                CheckResult {
                    ok: status == "ok",
                    status,
                    detail,
                },
            );
        }
        m
    }

    pub fn result(&self, name: &str) -> Option<CheckResult> {
        self.results().remove(name)
    }

    /// Whether QEMU is still running (records its exit status once it has exited).
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

    /// Waits until the guest printed `RESULT name`, QEMU exited, or `deadline` passed.
    pub fn wait_result(&mut self, name: &str, deadline: Duration) -> Result<CheckResult, String> {
        let mut exited = false;
        poll_until(deadline, || {
            if self.result(name).is_some() {
                return true;
            }
            if !self.running() {
                exited = true;
                return true;
            }
            false
        });
        if let Some(r) = self.result(name) {
            return Ok(r);
        }
        Err(if exited {
            format!(
                "{}: QEMU exited ({:?}) before the guest printed RESULT {name}",
                self.name, self.status
            )
        } else {
            format!(
                "{}: no RESULT {name} within {deadline:?} ({:?} since QEMU started)",
                self.name,
                self.started.elapsed()
            )
        })
    }

    /// Waits until QEMU exits (the guest powered off); false if the deadline passed.
    pub fn wait_exit(&mut self, deadline: Duration) -> bool {
        poll_until(deadline, || !self.running())
    }

    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.status
    }

    /// Sends one command line to the guest's console (`run TAG check...`, `poweroff`).
    pub fn send(&mut self, line: &str) -> Result<(), String> {
        if self.console.is_none() {
            let sock = self.path.join("serial.sock");
            let s = UnixStream::connect(&sock)
                .map_err(|e| format!("{}: connect {}: {e}", self.name, sock.display()))?;
            // Drain what QEMU echoes there (the log file has it) so it never blocks.
            let mut r = s.try_clone().map_err(|e| e.to_string())?;
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while matches!(r.read(&mut buf), Ok(n) if n > 0) {}
            });
            self.console = Some(s);
        }
        let s = self.console.as_mut().expect("console");
        s.write_all(format!("{line}\n").as_bytes())
            .map_err(|e| format!("{}: write to console: {e}", self.name))
    }

    /// Asks the guest to power off and waits for QEMU to exit; kills it if it does not.
    pub fn poweroff(&mut self, deadline: Duration) -> bool {
        if !self.running() {
            return true;
        }
        let _ = self.send("poweroff");
        if self.wait_exit(deadline) {
            return true;
        }
        self.kill();
        false
    }

    /// SIGTERM (QEMU exits cleanly), then SIGKILL if needed.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            if self.status.is_none() {
                // SAFETY: signalling our own child.
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
                let end = Instant::now() + Duration::from_secs(5);
                while Instant::now() < end {
                    if let Ok(Some(st)) = c.try_wait() {
                        self.status = Some(st);
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                if self.status.is_none() {
                    let _ = c.kill();
                    self.status = c.wait().ok();
                }
            }
        }
    }

    /// The serial log tail, QEMU's output and where the pcap is, for failure messages.
    pub fn describe(&mut self) -> String {
        let running = self.running();
        let serial = self.serial();
        let lines: Vec<&str> = serial.lines().collect();
        let from = lines.len().saturating_sub(SERIAL_TAIL_LINES);
        let qemu_out = fs::read_to_string(self.path.join("qemu.out")).unwrap_or_default();
        format!(
            "--- VM {} (mac {}, {}, {:?} since start)\n--- qemu: {}\n--- qemu output:\n{}\n\
             --- guest serial console ({}):\n{}\n--- guest pcap: {}",
            self.name,
            self.mac,
            if running {
                "running".to_string()
            } else {
                format!("exited: {:?}", self.status)
            },
            self.started.elapsed(),
            self.cmdline,
            qemu_out.trim_end(),
            self.path.join("serial.log").display(),
            lines[from..].join("\n"),
            self.path.join("guest.pcap").display()
        )
    }
}

fn netdev_with_id(netdev: &str) -> String {
    match netdev.split_once(',') {
        Some((kind, rest)) => format!("{kind},id=n0,{rest}"),
        None => format!("{netdev},id=n0"),
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                let kept = dir.keep();
                eprintln!(
                    "VM {} files kept at {} (serial.log, guest.pcap, qemu.out)",
                    self.name,
                    kept.display()
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The scene: namespace D with usernet and the servers the guests reach, and the VMs
// ---------------------------------------------------------------------------------------------

/// The HTTP file server's port in D (the guest reaches it as 192.168.5.2:8000).
pub const HTTP_PORT: u16 = 8000;
/// The blob every guest downloads.
pub const BLOB_SIZE: usize = 1 << 20;

/// Fields drop in order: VMs, then the daemon, then the servers, then the namespace (which kills
/// anything left in it), then the temp dir.
pub struct Scene {
    pub vms: Vec<Vm>,
    pub daemon: Option<Daemon>,
    pub servers: Vec<crate::support::BgProcess>,
    pub d: Netns,
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    pub blob_sha: String,
}

impl Scene {
    /// Namespace D (only `lo`, unprivileged pings allowed), a temp dir for sockets, and a python
    /// HTTP server on D's 127.0.0.1:8000 serving `blob` (1 MiB of pseudo-random bytes).
    pub fn new(tag: &str) -> Scene {
        let d = Netns::new(tag);
        crate::support::ns_sysctl(&d, "net.ipv4.ping_group_range", "0 2147483647");
        let dir = tempfile::Builder::new()
            .prefix("usernet-q-")
            .tempdir()
            .expect("temp dir for the scene");
        let path = dir.path().to_path_buf();
        let www = path.join("www");
        fs::create_dir(&www).expect("mkdir www");
        let blob = pseudo_random(BLOB_SIZE, std::process::id() as u64);
        fs::write(www.join("blob"), &blob).expect("write blob");
        let blob_sha = sha256_file(&www.join("blob"));
        let mut s = Scene {
            vms: Vec::new(),
            daemon: None,
            servers: Vec::new(),
            d,
            dir: Some(dir),
            path,
            blob_sha,
        };
        let www_s = www.display().to_string();
        let port = HTTP_PORT.to_string();
        let cmd = s.d.exec(
            "python3",
            &[
                "-m",
                "http.server",
                port.as_str(),
                "--bind",
                "127.0.0.1",
                "--directory",
                www_s.as_str(),
            ],
        );
        s.server(cmd, HTTP_PORT);
        s
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path in the scene's temp dir (sockets go here).
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn blob_url(&self) -> String {
        format!("http://192.168.5.2:{HTTP_PORT}/blob")
    }

    /// Starts a server in D and waits until it listens on TCP `port`.
    pub fn server(&mut self, cmd: Command, port: u16) {
        let mut p = crate::support::BgProcess::spawn(cmd);
        let mut exited = false;
        let ok = poll_until(Duration::from_secs(15), || {
            if !p.running() {
                exited = true;
                return true;
            }
            crate::support::listening(&self.d, 't', port)
        });
        let desc = (exited || !ok).then(|| p.describe());
        self.servers.push(p);
        if let Some(desc) = desc {
            self.fail(format!(
                "server in {} on port {port} did not come up\n{desc}",
                self.d.name()
            ));
        }
    }

    /// A nettool server (tests/support/nettool.py) in D.
    pub fn nettool_server(&mut self, args: &[&str], port: u16) {
        let tool = crate::support::nettool_path();
        let mut full: Vec<&str> = vec!["-u", tool.as_str()];
        full.extend_from_slice(args);
        let cmd = self.d.exec("python3", &full);
        self.server(cmd, port);
    }

    /// Starts `usernet extra...` in D (no tap) and waits until each of `sockets` exists.
    pub fn start_daemon(&mut self, extra: &[&str], sockets: &[PathBuf]) {
        let mut daemon = Daemon::start_taps(&self.d, &[], extra);
        let mut exited = false;
        let ok = poll_until(Duration::from_secs(10), || {
            if !daemon.is_running() {
                exited = true;
                return true;
            }
            sockets.iter().all(|s| s.exists())
        });
        self.daemon = Some(daemon);
        if exited {
            self.fail("usernet exited right after start");
        }
        if !ok {
            self.fail(format!("usernet did not create {sockets:?} within 10 s"));
        }
    }

    pub fn daemon(&mut self) -> &mut Daemon {
        self.daemon.as_mut().expect("daemon started")
    }

    pub fn vm(&mut self, i: usize) -> &mut Vm {
        &mut self.vms[i]
    }

    /// Starts a VM and returns its index.
    pub fn start_vm(&mut self, env: &Env, spec: VmSpec) -> usize {
        self.vms.push(Vm::start(env, spec));
        self.vms.len() - 1
    }

    /// Panics with `msg`, every VM's serial log and QEMU output, the servers' output and the
    /// daemon log tail.
    #[track_caller]
    pub fn fail(&mut self, msg: impl Display) -> ! {
        let mut text = format!("{msg}\n");
        for vm in &mut self.vms {
            text.push_str(&vm.describe());
            text.push('\n');
        }
        for s in &mut self.servers {
            let d = s.describe();
            let lines: Vec<&str> = d.lines().collect();
            let from = lines.len().saturating_sub(30);
            text.push_str(&lines[from..].join("\n"));
            text.push('\n');
        }
        match &self.daemon {
            Some(d) => d.fail(text),
            None => panic!("{text}\n(no daemon was started)"),
        }
    }

    #[track_caller]
    pub fn check(&mut self, cond: bool, msg: impl Display) {
        if !cond {
            self.fail(msg);
        }
    }

    /// Waits for `RESULT name` from VM `i`, failing on timeout or early exit.
    #[track_caller]
    pub fn wait_result(&mut self, i: usize, name: &str, deadline: Duration) -> CheckResult {
        match self.vms[i].wait_result(name, deadline) {
            Ok(r) => r,
            Err(e) => self.fail(e),
        }
    }

    /// Waits for VM `i` to finish its boot checks (`RESULT done`) and asserts that each check
    /// in `must` passed; checks in `soft` (for a feature still being wired) are reported on
    /// stderr but may fail.
    #[track_caller]
    pub fn expect_checks(&mut self, i: usize, must: &[&str], soft: &[&str]) {
        self.wait_result(i, "done", BOOT_DEADLINE);
        let results = self.vms[i].results();
        let mut bad = Vec::new();
        for name in must.iter().chain(soft) {
            match results.get(*name) {
                Some(r) if r.ok => {}
                Some(r) if soft.contains(name) => {
                    let _ = writeln!(
                        std::io::stderr(),
                        "NOTE: {}: soft check {name} failed (expected until it is wired): {}",
                        self.vms[i].name,
                        r.detail
                    );
                }
                Some(r) => bad.push(format!("{name}: {} {}", r.status, r.detail)),
                None if soft.contains(name) => {}
                None => bad.push(format!("{name}: no result")),
            }
        }
        if !bad.is_empty() {
            let name = self.vms[i].name.clone();
            self.fail(format!(
                "{name}: failed guest checks:\n  {}",
                bad.join("\n  ")
            ));
        }
    }

    /// `curl http://127.0.0.1:PORT/` inside D (through a usernet port forward).
    pub fn curl_in_d(&self, port: u16) -> crate::support::RunOutput {
        let url = format!("http://127.0.0.1:{port}/");
        crate::support::run_with_deadline(
            self.d
                .exec("curl", &["-sS", "--max-time", "20", url.as_str()]),
            Duration::from_secs(30),
        )
    }

    /// Asserts that D's 127.0.0.1:PORT serves the page of the guest at `guest_ip`.
    #[track_caller]
    pub fn expect_forward(&mut self, port: u16, guest_ip: &str) {
        let out = self.curl_in_d(port);
        let want = format!("usernet-guest ip={guest_ip} ");
        if !(out.success() && out.stdout.contains(&want)) {
            self.fail(format!(
                "port forward 127.0.0.1:{port} in D did not return the page of {guest_ip}\n{}",
                out.describe()
            ));
        }
    }

    /// One HTTP request to the daemon's API socket; returns (status, body).
    pub fn api(
        &mut self,
        sock: &Path,
        method: &str,
        target: &str,
        body: Option<&str>,
    ) -> (u16, String) {
        match api_request(sock, method, target, body) {
            Ok(r) => r,
            Err(e) => self.fail(format!("API {method} {target} on {}: {e}", sock.display())),
        }
    }

    /// Drops a VM (killing QEMU) and forgets it.
    pub fn remove_vm(&mut self, i: usize) {
        let mut vm = self.vms.remove(i);
        vm.kill();
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        if std::env::var_os("USERNET_QEMU_SHOW").is_some() {
            let mut text = String::new();
            for vm in &mut self.vms {
                text.push_str(&vm.describe());
                text.push('\n');
            }
            if let Some(d) = &self.daemon {
                text.push_str(&format!("--- daemon log tail:\n{}\n", d.log_tail()));
            }
            let _ = writeln!(std::io::stderr(), "{text}");
        }
        self.vms.clear();
        self.daemon = None;
        self.servers.clear();
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                let kept = dir.keep();
                eprintln!("scene files kept at {}", kept.display());
            }
        }
    }
}

/// A minimal HTTP/1.1 client over a unix socket (Connection: close).
pub fn api_request(
    sock: &Path,
    method: &str,
    target: &str,
    body: Option<&str>,
) -> Result<(u16, String), String> {
    let mut s = UnixStream::connect(sock).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {target} HTTP/1.1\r\nHost: usernet\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Deterministic pseudo-random bytes (xorshift64*), different per seed.
pub fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545F4914F6CDD1D).to_le_bytes());
    }
    v.truncate(n);
    v
}

/// sha256 of a file, by sha256sum.
pub fn sha256_file(path: &Path) -> String {
    sha256_cmd(&format!("sha256sum '{}'", path.display()))
}

/// sha256 of `path` repeated `n` times, by sha256sum.
pub fn sha256_repeated(path: &Path, n: usize) -> String {
    sha256_cmd(&format!(
        "i=0; while [ $i -lt {n} ]; do cat '{}'; i=$((i+1)); done | sha256sum",
        path.display()
    ))
}

fn sha256_cmd(script: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", script])
        .output()
        .expect("run sha256sum");
    let text = String::from_utf8_lossy(&out.stdout);
    let sha = text.split_whitespace().next().unwrap_or("").to_string();
    assert!(out.status.success() && sha.len() == 64, "{script}: {text}");
    sha
}
