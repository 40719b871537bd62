//! What both benches share: a NAT wired to a frame channel, a tiny guest-side TCP that talks to
//! it with IPv4 packets built from smoltcp's wire types, and a host-side listener on
//! 127.0.0.1 that accepts everything.
//!
//! Traffic stays on this machine: the guest only ever addresses the host address
//! (192.168.5.2), which the NAT maps to 127.0.0.1, where the listener is.

// Each bench uses a different part of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use netstack::nat::{Nat, NatConfig};
use netstack::{MacAddr, Routed};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl,
    TcpPacket, TcpRepr, TcpSeqNumber,
};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;

pub const GATEWAY_MAC: MacAddr = [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xdd];
pub const GUEST_MAC: MacAddr = [0x52, 0x55, 0x55, 0x00, 0x00, 0x01];
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 5, 15);
/// The host address: the NAT maps it to 127.0.0.1.
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 5, 2);
pub const DNS_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 5, 3);
pub const NETWORK: Ipv4Addr = Ipv4Addr::new(192, 168, 5, 0);
pub const PREFIX: u8 = 24;
pub const MTU: u16 = 1500;
/// The guest's MSS (MTU less IPv4 and TCP headers), and the size of every data segment.
pub const MSS: usize = 1460;
/// The guest's window scale (Linux's usual 7) and raw window field (so 8 MiB).
const GUEST_WSCALE: u8 = 7;
const GUEST_WINDOW: u16 = 0xffff;
/// The first guest port; connection `i` of a [`Guest`] uses `BASE_PORT + i`.
pub const BASE_PORT: u16 = 20000;
/// Connections a [`Guest`] can hold.
pub const MAX_CONNS: usize = 12_000;
/// SYNs in flight at once while opening connections (under the NAT's `max_tcp_connecting`
/// and the listener's backlog).
pub const OPEN_BATCH: usize = 256;

/// The NAT's configuration for the benches: the documented defaults on the usual slirp link.
/// `USERNET_BENCH_TCP_BUFFER=BYTES` sets `tcp_buffer` instead (a diagnostic: how much of a
/// figure the guest-side buffers are).
pub fn nat_config() -> NatConfig {
    let mut c = NatConfig::new(GATEWAY_MAC, MTU, NETWORK, PREFIX, HOST_IP, DNS_IP);
    if let Ok(v) = std::env::var("USERNET_BENCH_TCP_BUFFER") {
        c.tcp_buffer = v.parse().expect("USERNET_BENCH_TCP_BUFFER: bytes");
    }
    c
}

/// Raise RLIMIT_NOFILE so that `want` descriptors can be open: the soft limit to the hard one,
/// and the hard one too when it is below `want` and we may (root). Returns (soft, hard) after.
pub fn raise_nofile(want: u64) -> (u64, u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    if hard < want && setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
        return getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    }
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit")
}

/// A new NAT whose frames to the guest arrive on the returned channel.
pub fn new_nat() -> (Nat, mpsc::UnboundedReceiver<Bytes>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let nat = Nat::new(
        nat_config(),
        Arc::new(move |f: Bytes, _partial| {
            let _ = tx.send(f);
        }),
    );
    (nat, rx)
}

/// Set in the environment of the host-side child process.
const ACCEPTOR_ENV: &str = "USERNET_BENCH_ACCEPTOR";

/// The host side, in a child process (this same executable) so that its accepted sockets do
/// not count against this process's RLIMIT_NOFILE (the NAT's own host sockets do): a listener
/// on 127.0.0.1 that accepts every connection as it comes, keeps idle ones open without
/// reading, and reads and discards the measured one as fast as possible. Commands on its stdin,
/// one line each, answered with "ok" on its stdout once done.
pub struct Host {
    pub port: u16,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Host {
    /// Start the child and wait for its listening port.
    pub fn new() -> Host {
        let mut child = Command::new(std::env::current_exe().expect("current_exe"))
            .env(ACCEPTOR_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the host-side process");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).expect("host-side port");
        let port = line.trim().parse().expect("host-side port");
        Host {
            port,
            child,
            stdin,
            stdout,
        }
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn command(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").expect("host-side command");
        self.stdin.flush().expect("host-side command");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("host-side answer");
        assert_eq!(line.trim(), "ok", "host side answered {line:?} to {cmd:?}");
    }

    /// Wait until `n` more connections are accepted and keep them open, idle.
    pub fn keep_idle(&mut self, n: usize) {
        self.command(&format!("idle {n}"));
    }

    /// Wait until one more connection is accepted and read it as fast as possible, discarding.
    pub fn discard_next(&mut self) {
        self.command("discard");
    }

    /// Close the idle connections.
    pub fn close_idle(&mut self) {
        self.command("close");
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Call first in a bench's `main`: in the host-side child, runs it and exits.
pub fn maybe_host_process() {
    if std::env::var_os(ACCEPTOR_ENV).is_none() {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(host_process());
    std::process::exit(0);
}

async fn next(accepted: &mut mpsc::UnboundedReceiver<TcpStream>, have: usize) -> TcpStream {
    tokio::time::timeout(Duration::from_secs(60), accepted.recv())
        .await
        .unwrap_or_else(|_| panic!("host side: accept timed out with {have} accepted"))
        .unwrap()
}

async fn host_process() {
    // A backlog well over OPEN_BATCH: a full accept queue would turn away handshakes the NAT
    // (and so the guest) already counts as done (SYN cookies leave no state to retry from).
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind((Ipv4Addr::LOCALHOST, 0).into())
        .expect("bind 127.0.0.1");
    let listener = socket.listen(4096).expect("listen");
    println!("{}", listener.local_addr().unwrap().port());
    let (acc_tx, mut accepted) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((s, _)) => {
                    let _ = acc_tx.send(s);
                }
                Err(e) => {
                    eprintln!("host side: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    });
    let (cmd_tx, mut commands) = mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if cmd_tx.send(line).is_err() {
                break;
            }
        }
        std::process::exit(0); // the bench is gone
    });
    let mut idle: Vec<TcpStream> = Vec::with_capacity(MAX_CONNS);
    while let Some(cmd) = commands.recv().await {
        let mut words = cmd.split_whitespace();
        match (words.next(), words.next()) {
            (Some("idle"), Some(n)) => {
                for _ in 0..n.parse::<usize>().expect("idle N") {
                    idle.push(next(&mut accepted, idle.len()).await);
                }
            }
            (Some("discard"), None) => {
                let mut s = next(&mut accepted, idle.len()).await;
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 256 * 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                    }
                });
            }
            (Some("close"), None) => idle.clear(),
            _ => panic!("host side: unknown command {cmd:?}"),
        }
        println!("ok");
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed,
    SynSent,
    Established,
    Reset,
}

/// One guest connection's state. Sequence numbers are plain wrapping u32.
#[derive(Debug, Clone, Copy)]
struct Conn {
    state: State,
    snd_una: u32,
    snd_nxt: u32,
    /// The highest sequence number sent (snd_nxt goes back on a retransmission).
    snd_max: u32,
    rcv_nxt: u32,
    /// The NAT's window scale (from its SYN-ACK) and its last window, in bytes.
    peer_shift: u8,
    peer_window: usize,
}

impl Conn {
    const NEW: Conn = Conn {
        state: State::Closed,
        snd_una: 0,
        snd_nxt: 0,
        snd_max: 0,
        rcv_nxt: 0,
        peer_shift: 0,
        peer_window: 0,
    };
}

/// `a > b` in sequence space.
fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// What the guest sees of one TCP segment from the NAT.
struct Seg {
    guest_port: u16,
    control: TcpControl,
    seq: u32,
    ack: Option<u32>,
    window_len: u16,
    window_scale: Option<u8>,
    payload_len: usize,
}

/// Parse a frame to the guest (Ethernet, IPv4, TCP, checksums checked).
fn parse_frame(frame: &[u8]) -> Option<Seg> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 || eth.dst_addr().0 != GUEST_MAC {
        return None;
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if ip.next_header() != IpProtocol::Tcp || ip.dst_addr() != GUEST_IP || !ip.verify_checksum() {
        return None;
    }
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    let repr = TcpRepr::parse(
        &tcp,
        &IpAddress::Ipv4(ip.src_addr()),
        &IpAddress::Ipv4(ip.dst_addr()),
        &ChecksumCapabilities::default(),
    )
    .ok()?;
    Some(Seg {
        guest_port: repr.dst_port,
        control: repr.control,
        seq: repr.seq_number.0 as u32,
        ack: repr.ack_number.map(|a| a.0 as u32),
        window_len: repr.window_len,
        window_scale: repr.window_scale,
        payload_len: repr.payload.len(),
    })
}

/// What the guest has seen, for the reports.
#[derive(Debug, Default, Clone, Copy)]
pub struct GuestCounters {
    pub frames_in: u64,
    pub frames_out: u64,
    /// Keep-alives from the NAT answered.
    pub keepalives: u64,
    /// Resets from the NAT.
    pub resets: u64,
    /// Data segments sent again after no ACK progress.
    pub retransmits: u64,
    /// Frames not for a known connection.
    pub stray: u64,
}

/// The guest: a minimal TCP (handshake, bulk send within the window, ACKs for anything that
/// occupies sequence space, such as keep-alives) over the NAT.
pub struct Guest {
    pub nat: Nat,
    frames: mpsc::UnboundedReceiver<Bytes>,
    host_port: u16,
    /// Indexed by `port - BASE_PORT`; allocated and touched up front so that the guest's own
    /// state does not show in RSS growth.
    conns: Vec<Conn>,
    /// Connections opened so far (the next port is `BASE_PORT + opened`).
    pub opened: usize,
    pub counters: GuestCounters,
    payload: Vec<u8>,
}

impl Guest {
    pub fn new(nat: Nat, frames: mpsc::UnboundedReceiver<Bytes>, host_port: u16) -> Guest {
        Guest {
            nat,
            frames,
            host_port,
            conns: vec![Conn::NEW; MAX_CONNS],
            opened: 0,
            counters: GuestCounters::default(),
            payload: vec![0x5a; MSS],
        }
    }

    fn conn(&mut self, port: u16) -> Option<&mut Conn> {
        let i = usize::from(port.checked_sub(BASE_PORT)?);
        self.conns.get_mut(i)
    }

    /// Send one segment from `port` to the host address.
    fn send(&mut self, port: u16, control: TcpControl, seq: u32, ack: Option<u32>, data: bool) {
        let syn = control == TcpControl::Syn;
        let tcp = TcpRepr {
            src_port: port,
            dst_port: self.host_port,
            control,
            seq_number: TcpSeqNumber(seq as i32),
            ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
            window_len: if syn { 64240 } else { GUEST_WINDOW },
            window_scale: syn.then_some(GUEST_WSCALE),
            max_seg_size: syn.then_some(MSS as u16),
            sack_permitted: syn,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: if data { &self.payload } else { &[] },
        };
        let ip = Ipv4Repr {
            src_addr: GUEST_IP,
            dst_addr: HOST_IP,
            next_header: IpProtocol::Tcp,
            payload_len: tcp.buffer_len(),
            hop_limit: 64,
        };
        let mut packet = vec![0u8; ip.buffer_len() + tcp.buffer_len()];
        let caps = ChecksumCapabilities::default();
        let mut ipp = Ipv4Packet::new_unchecked(&mut packet[..]);
        ip.emit(&mut ipp, &caps);
        tcp.emit(
            &mut TcpPacket::new_unchecked(ipp.payload_mut()),
            &IpAddress::Ipv4(GUEST_IP),
            &IpAddress::Ipv4(HOST_IP),
            &caps,
        );
        self.counters.frames_out += 1;
        self.nat.route(Routed::Tcp {
            src_mac: GUEST_MAC,
            packet,
        });
    }

    fn send_ack(&mut self, port: u16) {
        let c = *self.conn(port).expect("known port");
        self.send(port, TcpControl::None, c.snd_nxt, Some(c.rcv_nxt), false);
    }

    /// Handle one frame from the NAT.
    fn handle(&mut self, frame: &[u8]) {
        self.counters.frames_in += 1;
        let Some(seg) = parse_frame(frame) else {
            self.counters.stray += 1;
            return;
        };
        let port = seg.guest_port;
        let Some(c) = self.conn(port) else {
            self.counters.stray += 1;
            return;
        };
        let c = *c;
        match c.state {
            State::Closed | State::Reset => {
                self.counters.stray += 1;
                return;
            }
            _ if seg.control == TcpControl::Rst => {
                self.conn(port).unwrap().state = State::Reset;
                self.counters.resets += 1;
                return;
            }
            State::SynSent if seg.control == TcpControl::Syn => {
                let ack = seg.ack.expect("SYN-ACK");
                let c = self.conn(port).unwrap();
                c.state = State::Established;
                c.snd_una = ack;
                c.snd_nxt = ack;
                c.snd_max = ack;
                c.rcv_nxt = seg.seq.wrapping_add(1);
                c.peer_shift = seg.window_scale.unwrap_or(0);
                c.peer_window = usize::from(seg.window_len);
                self.send_ack(port);
                return;
            }
            State::SynSent => {
                self.counters.stray += 1;
                return;
            }
            State::Established => {}
        }
        if seg.control == TcpControl::Syn {
            // A SYN-ACK again: our ACK was lost.
            self.send_ack(port);
            return;
        }
        let conn = self.conn(port).unwrap();
        if let Some(ack) = seg.ack {
            if after(ack, conn.snd_una) && !after(ack, conn.snd_max) {
                conn.snd_una = ack;
                if after(ack, conn.snd_nxt) {
                    conn.snd_nxt = ack; // what we went back to resend had arrived after all
                }
            }
            conn.peer_window = usize::from(seg.window_len) << conn.peer_shift;
        }
        let end = seg
            .seq
            .wrapping_add(seg.payload_len as u32)
            .wrapping_add(u32::from(seg.control == TcpControl::Fin));
        if seg.payload_len > 0 || seg.control == TcpControl::Fin {
            if after(end, conn.rcv_nxt) {
                conn.rcv_nxt = end; // data from the host (none expected): taken as read
            } else if seg.payload_len == 1 && end == conn.rcv_nxt {
                self.counters.keepalives += 1;
            }
            self.send_ack(port);
        }
    }

    /// Handle every frame that is waiting; wait up to `timeout` for the first. False when
    /// nothing came.
    async fn drain(&mut self, timeout: Duration) -> bool {
        let first = match tokio::time::timeout(timeout, self.frames.recv()).await {
            Ok(Some(f)) => f,
            Ok(None) => panic!("the NAT's frame sink is gone"),
            Err(_) => return false,
        };
        self.handle(&first);
        while let Ok(f) = self.frames.try_recv() {
            self.handle(&f);
        }
        true
    }

    /// Handle what is waiting without waiting.
    pub fn poll(&mut self) {
        while let Ok(f) = self.frames.try_recv() {
            self.handle(&f);
        }
    }

    /// Let frames arrive for `d`, answering them (keep-alives, stray SYN-ACKs).
    pub async fn idle_for(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            self.drain(left).await;
        }
    }

    /// Open `n` more connections (handshakes complete on the guest side). Returns their ports.
    pub async fn open(&mut self, n: usize) -> std::ops::Range<u16> {
        assert!(self.opened + n <= MAX_CONNS, "too many connections");
        let first = self.opened;
        let ports = (BASE_PORT + first as u16)..(BASE_PORT + (first + n) as u16);
        let mut next = first;
        while next < first + n {
            let batch = (first + n - next).min(OPEN_BATCH);
            let batch_ports: Vec<u16> =
                (next..next + batch).map(|i| BASE_PORT + i as u16).collect();
            for &p in &batch_ports {
                let iss = u32::from(p).wrapping_mul(2_654_435_761);
                let c = self.conn(p).unwrap();
                *c = Conn {
                    state: State::SynSent,
                    snd_una: iss,
                    snd_nxt: iss.wrapping_add(1),
                    snd_max: iss.wrapping_add(1),
                    ..Conn::NEW
                };
                self.send(p, TcpControl::Syn, iss, None, false);
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let pending: Vec<u16> = batch_ports
                    .iter()
                    .copied()
                    .filter(|&p| self.conn(p).unwrap().state == State::SynSent)
                    .collect();
                if pending.is_empty() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{} handshakes not done after 60 s",
                    pending.len()
                );
                if !self.drain(Duration::from_secs(1)).await {
                    for p in pending {
                        let iss = self.conn(p).unwrap().snd_una;
                        self.send(p, TcpControl::Syn, iss, None, false);
                    }
                }
            }
            let reset = batch_ports
                .iter()
                .filter(|&&p| self.conn(p).unwrap().state == State::Reset)
                .count();
            assert_eq!(reset, 0, "connections refused while opening");
            next += batch;
        }
        self.opened = first + n;
        ports
    }

    /// Send `segments` full-size data segments on `port`, within the NAT's advertised window,
    /// and return when all are ACKed. Goes back to the first unACKed segment when nothing has
    /// moved for 200 ms.
    pub async fn push(&mut self, port: u16, segments: usize) {
        let start = self.conn(port).expect("known port").snd_nxt;
        assert_eq!(self.conn(port).unwrap().state, State::Established);
        let end = start.wrapping_add((segments * MSS) as u32);
        let (mut last_una, mut progress) = (start, Instant::now());
        let mut next_report = Duration::from_secs(5);
        loop {
            loop {
                let c = *self.conn(port).unwrap();
                let in_flight = c.snd_nxt.wrapping_sub(c.snd_una) as usize;
                if c.snd_nxt == end || in_flight + MSS > c.peer_window {
                    break;
                }
                self.send(port, TcpControl::Psh, c.snd_nxt, Some(c.rcv_nxt), true);
                let c = self.conn(port).unwrap();
                c.snd_nxt = c.snd_nxt.wrapping_add(MSS as u32);
                if after(c.snd_nxt, c.snd_max) {
                    c.snd_max = c.snd_nxt;
                }
            }
            let c = *self.conn(port).unwrap();
            assert_eq!(
                c.state,
                State::Established,
                "connection reset while sending"
            );
            if c.snd_una == end {
                return;
            }
            if !self.drain(Duration::from_millis(200)).await {
                let c = self.conn(port).unwrap();
                c.snd_nxt = c.snd_una;
                self.counters.retransmits += 1;
            }
            let una = self.conn(port).unwrap().snd_una;
            if una != last_una {
                (last_una, progress) = (una, Instant::now());
                next_report = Duration::from_secs(5);
            } else if progress.elapsed() >= next_report {
                let c = *self.conn(port).unwrap();
                eprintln!(
                    "guest: port {port} no progress for {:.0?}: una {} nxt {} end {} window {} \
                     {:?}; guest {:?}; NAT {:?}",
                    progress.elapsed(),
                    c.snd_una,
                    c.snd_nxt,
                    end,
                    c.peer_window,
                    c.state,
                    self.counters,
                    self.nat.stats().tcp
                );
                next_report += Duration::from_secs(5);
            }
        }
    }

    /// Reset every open connection (the NAT's tasks end and close their host sockets).
    pub fn reset_all(&mut self) {
        for i in 0..self.opened {
            let port = BASE_PORT + i as u16;
            let c = *self.conn(port).unwrap();
            if c.state == State::Established {
                self.send(port, TcpControl::Rst, c.snd_nxt, None, false);
            }
            *self.conn(port).unwrap() = Conn::NEW;
        }
        self.opened = 0;
    }
}

/// Wait until the NAT has `open` established connections and none connecting.
pub async fn wait_open(guest: &mut Guest, open: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = guest.nat.stats().tcp;
        if s.open == open && s.connecting == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "NAT has {} open, {} connecting; want {open}",
            s.open,
            s.connecting
        );
        guest.idle_for(Duration::from_millis(20)).await;
    }
}

/// Resident set size of process `pid` ("self" for this one) from /proc/PID/statm (resident
/// pages × page size), in bytes.
pub fn statm_rss_of(pid: &str) -> u64 {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).expect("statm");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * page_size()
}

/// Resident set size from /proc/self/statm (resident pages × page size), in bytes.
pub fn statm_rss() -> u64 {
    statm_rss_of("self")
}

pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as u64
    } else {
        4096
    }
}

/// A field of /proc/self/status in kB (VmRSS, VmSize, ...).
pub fn status_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{field} not in /proc/self/status"))
}

/// The largest resident mappings of this process from /proc/self/smaps: (Rss kB, size kB,
/// name), largest first.
pub fn top_mappings(n: usize) -> Vec<(u64, u64, String)> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
    let mut maps = Vec::new();
    let (mut name, mut size) = (String::new(), 0);
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // "start-end perms offset dev inode [name]"
            name = words.nth(4).unwrap_or("[anon]").to_string();
            let (a, b) = first.split_once('-').unwrap();
            let a = u64::from_str_radix(a, 16).unwrap();
            let b = u64::from_str_radix(b, 16).unwrap();
            size = (b - a) / 1024;
        } else if first == "Rss:" {
            let rss: u64 = words.next().unwrap().parse().unwrap();
            maps.push((rss, size, name.clone()));
        }
    }
    maps.sort_by(|a, b| b.cmp(a));
    maps.truncate(n);
    maps
}

/// CPU time (user + system) used so far by this process.
pub fn cpu_self() -> Duration {
    use nix::sys::resource::{getrusage, UsageWho};
    let u = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage");
    let tv =
        |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
    tv(u.user_time()) + tv(u.system_time())
}

/// CPU time (user + system) used so far by process `pid`, from /proc/PID/stat.
pub fn cpu_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command (which may hold spaces) start at field 3.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|w| w.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 (11 and 12 here), in clock ticks.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros((f[11] + f[12]) * 1_000_000 / hz)
}

/// Resident kB of this process's `[heap]` (the main thread's malloc arena) and of its other
/// anonymous mappings (other threads' arenas, mmapped allocations, stacks), from
/// /proc/self/smaps.
pub fn heap_and_anon_kb() -> (u64, u64) {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
    let (mut heap, mut anon) = (0, 0);
    let mut kind = 0; // 0: file or other, 1: [heap], 2: anonymous
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            kind = match words.nth(4) {
                Some("[heap]") => 1,
                None => 2,
                Some(_) => 0,
            };
        } else if first == "Rss:" {
            let rss: u64 = words.next().unwrap().parse().unwrap();
            match kind {
                1 => heap += rss,
                2 => anon += rss,
                _ => {}
            }
        }
    }
    (heap, anon)
}
