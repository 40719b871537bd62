//! TCP NAT: each guest connection is its own task with its own host socket and its own
//! smoltcp interface (IP medium, any-IP) holding exactly one socket, so a segment costs the
//! same whatever the number of open connections, and smoltcp does the guest-side TCP
//! (retransmission, window scaling, MSS from the MTU, keep-alive).
//!
//! Connect first: the guest's SYN is held until the host-side connect succeeds; only then is it
//! fed to smoltcp, which answers SYN-ACK. A refused connect, a timeout or a limit reached gives
//! the guest a RST, as a host with nothing listening would. FIN and RST are carried both ways;
//! when both sides are done the task ends and everything of the connection is freed.

use std::collections::VecDeque;
use std::io;
use std::net::{Shutdown, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::phy::{self, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{
    HardwareAddress, IpAddress, IpCidr, IpListenEndpoint, IpProtocol, Ipv4Packet, TcpControl,
    TcpPacket, TcpRepr, TcpSeqNumber,
};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpStream, UnixStream};

use super::inbox::{self, TrySendError};
use super::workers;
use super::{FlowCounters, Held, Shared};
use crate::frame::{write_ipv4, IPV4_HEADER_LEN};
use crate::MacAddr;

/// A TCP connection: the guest's address and port, and the destination's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    pub guest: SocketAddrV4,
    pub dst: SocketAddrV4,
}

/// Tells one connection's table entry from a later one with the same key.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
/// Segments queued for one connection before they are dropped (TCP recovers).
const INBOX: usize = 512;
/// Keep-alive towards both sides.
const KEEPALIVE: Duration = Duration::from_secs(60);
/// When a host connection of the guest's gets its keep-alive probes ([`host_keepalive`]).
const HOST_KEEPALIVE_AFTER: Duration = Duration::from_secs(1);
/// How long the ACK of a guest's FIN waits for our next segment, while the host side is open.
/// The host usually answers or closes as soon as it reads the end (a request-response
/// connection): our FIN then carries the ACK, one segment to the guest instead of two (Linux
/// delays this ACK too, in CLOSE_WAIT's ping-pong mode). Past this, the ACK smoltcp built is
/// sent as it was (nothing has gone out since, so it is still current but for its window and
/// timestamp): well before the guest's kernel would send the FIN again (a lone segment in
/// flight waits at least 200 ms for its ACK; see [`GuestLink::held_back_fin`] for when the
/// ACK is held at all).
const FIN_ACK_DELAY: Duration = Duration::from_millis(20);
/// A guest that answers nothing (not even keep-alives) for this long loses the connection.
const GUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// TSval of the RFC 7323 timestamps on the guest side: the host's monotonic clock in
/// milliseconds (coarse: a tick of a few ms, which the RFC allows), one clock for every
/// connection and every daemon. With timestamps a guest's kernel may reuse a port still in
/// TIME_WAIT for a new connection to the same address (`tcp_tw_reuse`), which a client that
/// opens and closes connections quickly needs once its ephemeral ports are used up; a clock
/// that only grows keeps the new connection's segments past the guest's PAWS check.
fn tsval() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to; CLOCK_MONOTONIC_COARSE cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1000)
        .wrapping_add(ts.tv_nsec as u64 / 1_000_000) as u32
}

/// Route one TCP segment from a guest (the whole IPv4 packet). `partial`: its checksum is
/// left partial by the guest's kernel; otherwise it is verified here (smoltcp verifies none).
pub(crate) fn route(shared: &Arc<Shared>, src_mac: MacAddr, packet: Bytes, partial: bool) {
    let c = &shared.tcp_counters;
    let Some((key, flags)) = parse(&packet) else {
        FlowCounters::inc(&c.drop_malformed);
        return;
    };
    if !partial && !checksum_ok(&packet) {
        FlowCounters::inc(&c.drop_malformed);
        return;
    }
    let mut flows = shared.tcp_flows.lock().unwrap();
    if let Some((_, inbox)) = flows.get(&key) {
        match inbox.try_send(packet) {
            Ok(()) => return,
            Err(TrySendError::Full) => {
                FlowCounters::inc(&c.drop_queue_full);
                return;
            }
            Err(TrySendError::Closed(p)) => {
                // The task has just ended; treat the segment as for no connection.
                flows.remove(&key);
                drop(flows);
                return no_connection(shared, src_mac, &p, flags);
            }
        }
    }
    // Not a connection's segment: remember where the guest is (a connection's own segments
    // need not: it keeps its guest's MAC).
    shared.learn(*key.guest.ip(), src_mac);
    if !flags.syn || flags.ack {
        drop(flows);
        return no_connection(shared, src_mac, &packet, flags);
    }
    let cfg = &shared.config;
    let connecting = c.connecting.load(Ordering::Relaxed) as usize;
    let open = c.open.load(Ordering::Relaxed) as usize;
    if connecting >= cfg.max_tcp_connecting || open + connecting >= cfg.max_tcp_established {
        drop(flows);
        FlowCounters::inc(&c.drop_limit);
        FlowCounters::inc(&c.refused);
        tracing::warn!(
            "TCP limit reached ({connecting} connecting, {open} established): refusing {} -> {}",
            key.guest,
            key.dst
        );
        return reset(shared, src_mac, &packet);
    }
    let Some(target) = shared.tcp_target(key.dst) else {
        drop(flows);
        FlowCounters::inc(&c.refused);
        return reset(shared, src_mac, &packet);
    };
    let target = SocketAddr::V4(target);
    let (tx, rx) = inbox::channel(INBOX);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    flows.insert(key, (id, tx));
    drop(flows);
    FlowCounters::inc(&c.connecting);
    let conn = Conn {
        shared: Arc::clone(shared),
        key,
        id,
        mac: src_mac,
    };
    tokio::spawn(workers::Hop::new(
        &shared.workers,
        conn.run(target, packet, rx),
    ));
}

#[derive(Clone, Copy)]
struct Flags {
    syn: bool,
    ack: bool,
    rst: bool,
}

fn parse(packet: &[u8]) -> Option<(Key, Flags)> {
    let ip = Ipv4Packet::new_checked(packet).ok()?;
    if ip.next_header() != IpProtocol::Tcp {
        return None;
    }
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    let key = Key {
        guest: SocketAddrV4::new(ip.src_addr(), tcp.src_port()),
        dst: SocketAddrV4::new(ip.dst_addr(), tcp.dst_port()),
    };
    let flags = Flags {
        syn: tcp.syn(),
        ack: tcp.ack(),
        rst: tcp.rst(),
    };
    Some((key, flags))
}

fn checksum_ok(packet: &[u8]) -> bool {
    let Ok(ip) = Ipv4Packet::new_checked(packet) else {
        return false;
    };
    let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
        return false;
    };
    tcp.verify_checksum(
        &IpAddress::Ipv4(ip.src_addr()),
        &IpAddress::Ipv4(ip.dst_addr()),
    )
}

/// A segment for no connection: answered with a RST unless it is one (RFC 793).
fn no_connection(shared: &Shared, mac: MacAddr, packet: &[u8], flags: Flags) {
    if !flags.rst {
        reset(shared, mac, packet);
    }
}

/// Send the guest the RST that answers `packet`.
fn reset(shared: &Shared, mac: MacAddr, packet: &[u8]) {
    let Ok(ip) = Ipv4Packet::new_checked(packet) else {
        return;
    };
    let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
        return;
    };
    let (seq, ack) = if tcp.ack() {
        (tcp.ack_number(), None)
    } else {
        let len = tcp.payload().len() + usize::from(tcp.syn()) + usize::from(tcp.fin());
        (TcpSeqNumber(0), Some(tcp.seq_number() + len))
    };
    let repr = TcpRepr {
        src_port: tcp.dst_port(),
        dst_port: tcp.src_port(),
        control: TcpControl::Rst,
        seq_number: seq,
        ack_number: ack,
        window_len: 0,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let (src, dst) = (ip.dst_addr(), ip.src_addr());
    let len = repr.buffer_len();
    shared.uplink.send_with(mac, IPV4_HEADER_LEN + len, |b| {
        write_ipv4(b, src, dst, IpProtocol::Tcp, len, false, |p| {
            repr.emit(
                &mut TcpPacket::new_unchecked(p),
                &IpAddress::Ipv4(src),
                &IpAddress::Ipv4(dst),
                &ChecksumCapabilities::default(),
            )
        })
    });
}

/// One connection's task.
struct Conn {
    shared: Arc<Shared>,
    key: Key,
    id: u64,
    mac: MacAddr,
}

impl Drop for Conn {
    fn drop(&mut self) {
        let mut flows = self.shared.tcp_flows.lock().unwrap();
        if flows.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
            flows.remove(&self.key);
        }
    }
}

async fn connect(shared: &Shared, target: SocketAddr) -> io::Result<TcpStream> {
    let sock = Socket::new(
        Domain::IPV4,
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    if let SocketAddr::V4(t) = target {
        if let Some(bind) = shared.bind_addr(*t.ip()) {
            bind_address_no_port(&sock);
            sock.bind(&bind.into())?;
        }
    }
    let state = start_connect(&sock, target)?;
    let stream = TcpStream::from_std(std::net::TcpStream::from(sock))?;
    if state == Connect::Pending {
        stream.writable().await?;
    }
    if state != Connect::Done {
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
    }
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// `IP_BIND_ADDRESS_NO_PORT`: a socket bound to `--outbound-addr` gets its port at connect
/// time, for its destination, as an unbound one does. Otherwise bind() reserves a port of its
/// own for every socket, and all connections together (TIME_WAIT included) could never
/// outnumber the ephemeral ports, whatever their destinations.
fn bind_address_no_port(sock: &Socket) {
    let one: libc::c_int = 1;
    // SAFETY: an int option of our own socket; a kernel without it fails harmlessly.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// Keep-alive probes on a host connection that has lived [`HOST_KEEPALIVE_AFTER`] (not before:
/// the two system calls would be most of what a short connection costs). (Turns SO_KEEPALIVE
/// on too.)
fn host_keepalive<S: HostStream>(stream: &S) {
    let _ =
        SockRef::from(stream).set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(KEEPALIVE));
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Connect {
    /// Connected.
    Done,
    /// Failed or maybe failed: `SO_ERROR` says.
    Error,
    Pending,
}

/// Start the nonblocking connect of `sock` to `target`. A connect to a listener on this
/// machine is usually done when the call returns (the handshake runs within it): the reactor
/// is waited for only when it is not.
fn start_connect(sock: &Socket, target: SocketAddr) -> io::Result<Connect> {
    match sock.connect(&target.into()) {
        Ok(()) => Ok(Connect::Done),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(connect_state(sock)),
        Err(e) => Err(e),
    }
}

/// Where the nonblocking connect of `sock` stands: writable without an error or a hang-up is
/// connected (a failed connect reports `POLLERR`).
fn connect_state(sock: &Socket) -> Connect {
    let mut p = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one pollfd of ours, no waiting.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    if n != 1 {
        Connect::Pending
    } else if p.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
        Connect::Error
    } else if p.revents & libc::POLLOUT != 0 {
        Connect::Done
    } else {
        Connect::Pending
    }
}

impl Conn {
    async fn run(self, target: SocketAddr, syn: Bytes, mut inbox: inbox::Receiver) {
        let c = &self.shared.tcp_counters;
        let connecting = Held::taken(&c.connecting); // counted by route()

        // In a function of its own, so that the task's future holds the connect's state or
        // the relay's, never both.
        let stream = self.establish(target, &syn, &mut inbox).await;
        drop(connecting);
        let Some(stream) = stream else {
            return;
        };
        FlowCounters::inc(&c.opened);
        FlowCounters::inc(&c.open);
        let _open = Held::open(&c.open, &c.closed);
        if let Err(e) = self.relay(stream, Opening::Accept(syn), &mut inbox).await {
            tracing::debug!("{} -> {target}: {e}", self.key.guest);
        }
    }

    /// Connect to `target` while the guest's SYN waits: the host stream, or None when the
    /// connect failed (the guest got a RST) or the guest gave up.
    async fn establish(
        &self,
        target: SocketAddr,
        syn: &[u8],
        inbox: &mut inbox::Receiver,
    ) -> Option<TcpStream> {
        let c = &self.shared.tcp_counters;
        let timeout = self.shared.config.tcp_connect_timeout;
        let connecting = tokio::time::timeout(timeout, connect(&self.shared, target));
        tokio::pin!(connecting);
        let mut early = VecDeque::new();
        let result = loop {
            tokio::select! {
                r = &mut connecting => break r,
                more = inbox.recv_all(&mut early) => {
                    if !more {
                        return None;
                    }
                    // The guest gave up on the connect.
                    if early.drain(..).any(|p| parse(&p).is_some_and(|(_, f)| f.rst)) {
                        FlowCounters::inc(&c.refused);
                        return None;
                    }
                    // Otherwise retransmitted SYNs: still connecting.
                }
            }
        };
        match result {
            Ok(Ok(s)) => Some(s),
            Ok(Err(e)) => {
                tracing::debug!("{} -> {target}: {e}", self.key.guest);
                FlowCounters::inc(&c.refused);
                reset(&self.shared, self.mac, syn);
                None
            }
            Err(_) => {
                tracing::debug!("{} -> {target}: connect timed out", self.key.guest);
                FlowCounters::inc(&c.refused);
                reset(&self.shared, self.mac, syn);
                None
            }
        }
    }

    /// Carry the connection until both sides are done.
    async fn relay<S: HostStream>(
        &self,
        mut stream: S,
        opening: Opening,
        inbox: &mut inbox::Receiver,
    ) -> io::Result<()> {
        let shared = &self.shared;
        let c = &shared.tcp_counters;
        let mut dev = GuestLink::new(shared, self.mac);
        let mut iface = guest_interface(shared, &self.key, &mut dev);
        let buffers = Buffers::new(shared.config.tcp_buffer)?;
        // SAFETY: `buffers` is declared before `sockets`, so it outlives the socket.
        let mut socket = unsafe { buffers.socket() };
        let mut dirty = false; // data went through the buffers since they were last released
        let mut last_activity = tokio::time::Instant::now();
        // Our side of the guest connection is the destination the guest used (outbound) or
        // the gateway's forwarding port (inbound): `key.dst` either way.
        let ours = endpoint(self.key.dst);
        // Host connections the guest opened get keep-alive probes once they last.
        // Only connections the guest opened (whose task runs in a [`workers::Hop`]) may move.
        let movable = matches!(opening, Opening::Accept(_));
        let mut keepalive_at = movable.then(|| tokio::time::Instant::now() + HOST_KEEPALIVE_AFTER);
        match opening {
            Opening::Accept(syn) => {
                socket.set_timeout(Some(GUEST_TIMEOUT.into()));
                socket
                    .listen(ours)
                    .map_err(|e| io::Error::other(format!("listen: {e}")))?;
                dev.rx.push_back(syn);
            }
            Opening::Connect => {
                // Until the guest answers: a guest that never does must not hold the host
                // client for long.
                socket.set_timeout(Some(shared.config.tcp_connect_timeout.into()));
                let remote = (IpAddress::Ipv4(*self.key.guest.ip()), self.key.guest.port());
                socket
                    .connect(iface.context(), remote, ours)
                    .map_err(|e| io::Error::other(format!("connect: {e}")))?;
            }
        }
        let mut sockets = SocketSet::new(Vec::with_capacity(1));
        let handle = sockets.add(socket);
        let mut established = false;
        let mut guest_fin = false; // the guest closed its side gracefully

        let mut host_read_open = true; // the host may still send to the guest
        let mut host_write_open = true; // the guest may still send to the host

        // Bytes carried both ways until the connection counts as bulk, and in all.
        let mut carried = 0u64;
        let mut lifetime = 0u64;
        let mut bulk = None;
        // The ACK of the guest's FIN, held back ([`FIN_ACK_DELAY`]): the segment, where the
        // FIN ends, when to send the segment anyway. Only the first FIN taken is held.
        let mut fin_ack: Option<(Vec<u8>, u32, tokio::time::Instant)> = None;
        let mut fin_taken = false;

        // One timer for the connection's life, moved rather than made anew at every wait (a
        // new one is a registration and a removal in the runtime's timer wheel, and often a
        // wake-up of the runtime's own thread); moved later it costs nothing until it fires.
        let sleep = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(sleep);
        loop {
            if movable && bulk.is_none() && carried >= workers::BULK_BYTES {
                carried = 0;
                if let Some((to, counted)) = workers::bulk(&shared.workers) {
                    bulk = Some(counted);
                    if let Some(to) = to.filter(|&to| workers::request(&shared.workers, to)) {
                        // The task's hop hands it to worker `to`, where this resumes: the
                        // host socket and the timer move to that thread's runtime, and
                        // what goes to the guest from now on leaves from there.
                        workers::yield_once().await;
                        stream = match stream.rehome() {
                            Ok(s) => s,
                            Err(e) => {
                                // No host socket any more (its registration failed): reset
                                // the guest rather than leave it retransmitting.
                                sockets.get_mut::<tcp::Socket>(handle).abort();
                                iface.poll(smoltcp::time::Instant::now(), &mut dev, &mut sockets);
                                return Err(e);
                            }
                        };
                        let at = sleep.deadline();
                        sleep.set(tokio::time::sleep_until(at));
                        FlowCounters::inc(&c.moved);
                        tracing::debug!(
                            "{} -> {}: moved to worker {to}",
                            self.key.guest,
                            self.key.dst
                        );
                    }
                }
            }
            let now = tokio::time::Instant::now();
            if let Some((ack, _, _)) = fin_ack.take_if(|(_, _, at)| now >= *at) {
                dev.send_now(&ack); // nothing else went out since: still current
            }
            let fin = (!fin_taken && host_read_open)
                .then(|| dev.held_back_fin())
                .flatten();
            dev.hold_ack = fin.is_some();
            iface.poll(smoltcp::time::Instant::now(), &mut dev, &mut sockets);
            dev.hold_ack = false;
            if let Some(fin) = fin {
                let taken = fin_received(sockets.get::<tcp::Socket>(handle).state());
                if let Some(ack) = dev.held.take() {
                    match fin_end(&fin) {
                        Some(end) if taken => {
                            fin_ack = Some((ack, end, tokio::time::Instant::now() + FIN_ACK_DELAY))
                        }
                        // Not taken in order (its ACK may be a duplicate the guest counts on):
                        // sent at once.
                        _ => dev.send_now(&ack),
                    }
                }
                fin_taken = taken;
            }
            let sock = sockets.get_mut::<tcp::Socket>(handle);
            // A segment since has carried the ACK.
            fin_ack.take_if(|(_, end, _)| acked_through(Some(*end), dev.acked));
            if !established && sock.state() == tcp::State::Established {
                established = true;
                sock.set_timeout(Some(GUEST_TIMEOUT.into()));
            }
            let mut moved = false;
            // Guest -> host.
            while host_write_open && sock.can_recv() {
                let r = sock.recv(|buf| match stream.try_write(buf) {
                    Ok(n) => (n, Ok(n)),
                    Err(e) => (0, Err(e)),
                });
                match r {
                    Ok(Ok(n)) => {
                        FlowCounters::add(&c.bytes_from_guest, n as u64);
                        carried += n as u64;
                        lifetime += n as u64;
                        moved = true;
                    }
                    Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Ok(Err(e)) => {
                        sock.abort();
                        iface.poll(smoltcp::time::Instant::now(), &mut dev, &mut sockets);
                        return Err(e);
                    }
                    Err(_) => break,
                }
            }
            let sock = sockets.get_mut::<tcp::Socket>(handle);
            // The guest sent FIN (not RST: a reset is carried as a reset, below).
            guest_fin |= fin_received(sock.state());
            if host_write_open && guest_fin && sock.recv_queue() == 0 {
                // The guest sent FIN and everything before it is written: half-close the host side.
                let _ = SockRef::from(&stream).shutdown(Shutdown::Write);
                host_write_open = false;
            }
            // Host -> guest. (Read until the socket says EAGAIN: a short read does not mean
            // it is drained, e.g. at TCP's urgent mark or a Unix stream's out-of-band byte.)
            while host_read_open && sock.can_send() {
                let r = sock.send(|buf| match stream.try_read(buf) {
                    Ok(n) => (n, Ok(n)),
                    Err(e) => (0, Err(e)),
                });
                match r {
                    Ok(Ok(0)) => {
                        // The host closed its side: FIN to the guest after the data.
                        host_read_open = false;
                        sock.close();
                        moved = true;
                    }
                    Ok(Ok(n)) => {
                        FlowCounters::add(&c.bytes_to_guest, n as u64);
                        carried += n as u64;
                        lifetime += n as u64;
                        moved = true;
                    }
                    Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Ok(Err(e)) => {
                        // Reset by the host: reset the guest.
                        sock.abort();
                        iface.poll(smoltcp::time::Instant::now(), &mut dev, &mut sockets);
                        return Err(e);
                    }
                    Err(_) => break,
                }
            }
            let sock = sockets.get_mut::<tcp::Socket>(handle);
            // Both sides closed gracefully: done once everything the guest sent is written
            // to the host (the host socket may have been slower than the guest).
            let state = sock.state();
            let finished =
                state == tcp::State::TimeWait || (state == tcp::State::Closed && guest_fin);
            if finished && !host_write_open {
                // Reusable when no more than the first page of either ring was written (a
                // short connection): nothing written past what was carried in order.
                buffers.spare.set(lifetime < PAGE as u64 && dev.all_acked());
                // The teardown (host socket closed and deregistered, buffers) waits behind
                // what is ready on this thread: a segment of another connection read in the
                // same batch (the guest's next request, often) goes first.
                workers::yield_once().await;
                return Ok(());
            }
            if state == tcp::State::Closed && !guest_fin {
                if host_read_open || host_write_open {
                    // The guest reset (or timed out): reset the host side too.
                    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                }
                return Ok(());
            }
            if moved {
                dirty = true;
                last_activity = tokio::time::Instant::now();
                continue; // push what just moved before waiting
            }
            let empty = sock.send_queue() == 0;
            if dirty && empty && last_activity.elapsed() >= RELEASE_AFTER {
                // The receive half only when nothing is queued in it, in order or not.
                let rx_too = sock.recv_queue() == 0 && dev.all_acked();
                buffers.release(rx_too);
                inbox.shrink();
                dev.rx = VecDeque::new();
                if rx_too {
                    FlowCounters::inc(&c.buffers_released);
                    dirty = false;
                } else {
                    last_activity = tokio::time::Instant::now(); // try again later
                }
            }
            let want_read = host_read_open && sock.can_send();
            let want_write = host_write_open && sock.can_recv();
            let delay = iface.poll_delay(smoltcp::time::Instant::now(), &sockets);
            let now = tokio::time::Instant::now();
            let mut wake = now
                + delay
                    .map(Duration::from)
                    .unwrap_or(Duration::from_secs(3600));
            if dirty && empty {
                wake = wake.min(last_activity + RELEASE_AFTER);
            }
            if let Some((_, _, at)) = &fin_ack {
                wake = wake.min(*at);
            }
            if let Some(at) = keepalive_at {
                if now >= at {
                    host_keepalive(&stream);
                    keepalive_at = None;
                } else {
                    wake = wake.min(at);
                }
            }
            if sleep.deadline() != wake || sleep.is_elapsed() {
                sleep.as_mut().reset(wake);
            }
            tokio::select! {
                more = inbox.recv_all(&mut dev.rx) => if !more { return Ok(()) },
                r = stream.readable(), if want_read => r?,
                w = stream.writable(), if want_write => w?,
                _ = &mut sleep => {}
            }
        }
    }
}

/// The guest's FIN has been taken in order: the socket is in a state only it leads to.
fn fin_received(state: tcp::State) -> bool {
    matches!(
        state,
        tcp::State::CloseWait | tcp::State::LastAck | tcp::State::Closing | tcp::State::TimeWait
    )
}

/// The smoltcp interface of one connection: IP medium, any-IP, on the subnet.
fn guest_interface(shared: &Shared, key: &Key, dev: &mut GuestLink<'_>) -> Interface {
    let mut config = Config::new(HardwareAddress::Ip);
    config.random_seed = seed(key);
    let mut iface = Interface::new(config, dev, smoltcp::time::Instant::now());
    iface.set_any_ip(true);
    iface.update_ip_addrs(|a| {
        let _ = a.push(IpCidr::new(
            IpAddress::Ipv4(shared.config.host_ip),
            shared.config.prefix,
        ));
    });
    iface
}

/// The two guest-side buffers of one connection, in one anonymous mapping of their own: pages
/// become resident only when data passes through them, and [`Buffers::release`] gives the
/// transmit half back to the kernel once the connection has gone idle with it empty (an empty
/// transmit ring holds nothing, not even unacknowledged data). The receive half is kept: smoltcp
/// may hold out-of-order segments past its queued length there.
struct Buffers {
    ptr: *mut u8,
    size: usize,
    /// Set by the connection when it ends having written at most the first page of each
    /// half: the mapping is then kept for another connection ([`SPARE`]).
    spare: std::cell::Cell<bool>,
}

// SAFETY: the mapping is owned by one connection task; only raw pointers cross threads.
unsafe impl Send for Buffers {}

/// Mappings of connections that ended having written at most the first page of each half
/// (a short connection: connect, a request, a reply, close), kept for the next connections
/// so that starting one costs no mmap, munmap or page faults. At most [`SPARE_MAX`], so
/// what they hold stays under 2 pages each.
static SPARE: Mutex<Vec<SpareMapping>> = Mutex::new(Vec::new());
const SPARE_MAX: usize = 64;
const PAGE: usize = 4096;

struct SpareMapping {
    ptr: usize,
    size: usize,
}

impl Buffers {
    fn new(size: usize) -> io::Result<Buffers> {
        let spare = {
            let mut spare = SPARE.lock().unwrap();
            let at = spare.iter().rposition(|m| m.size == size);
            at.map(|i| spare.swap_remove(i))
        };
        if let Some(m) = spare {
            return Ok(Buffers {
                ptr: m.ptr as *mut u8,
                size,
                spare: false.into(),
            });
        }
        // SAFETY: a fresh private anonymous mapping; checked for failure below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Buffers {
            ptr: ptr.cast(),
            size,
            spare: false.into(),
        })
    }

    /// The guest-side socket over these buffers.
    ///
    /// SAFETY: the socket must be dropped before `self` (declare the `Buffers` first).
    unsafe fn socket(&self) -> tcp::Socket<'static> {
        let rx = std::slice::from_raw_parts_mut(self.ptr, self.size);
        let tx = std::slice::from_raw_parts_mut(self.ptr.add(self.size), self.size);
        let mut socket = tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx));
        socket.set_nagle_enabled(false);
        socket.set_keep_alive(Some(KEEPALIVE.into()));
        // Offered, and dropped by smoltcp when the guest's SYN (or SYN-ACK) has none.
        socket.set_tsval_generator(Some(tsval));
        socket
    }

    /// Return the transmit half's pages to the kernel, and the receive half's with
    /// `rx_too`. Only while the transmit buffer is empty (`send_queue() == 0`: everything
    /// sent was acknowledged) and, for the receive half, while it holds nothing, neither
    /// queued (`recv_queue() == 0`) nor out of order ([`GuestLink::all_acked`]).
    fn release(&self, rx_too: bool) {
        let (start, len) = if rx_too {
            (self.ptr, 2 * self.size)
        } else {
            // SAFETY: the transmit half starts `size` bytes into the mapping.
            (unsafe { self.ptr.add(self.size) }, self.size)
        };
        // SAFETY: our own mapping; MADV_DONTNEED makes it read back as zeroes, which an empty
        // ring buffer does not look at.
        unsafe { libc::madvise(start.cast(), len, libc::MADV_DONTNEED) };
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        if self.spare.get() && self.size >= PAGE && self.size % PAGE == 0 {
            let mut spare = SPARE.lock().unwrap();
            if spare.len() < SPARE_MAX {
                // What the next connection's rings find there is never read: a ring buffer
                // only reads what was written into it.
                spare.push(SpareMapping {
                    ptr: self.ptr as usize,
                    size: self.size,
                });
                return;
            }
        }
        // SAFETY: unmapping what `new` mapped; the socket over it is gone (see `socket`).
        unsafe { libc::munmap(self.ptr.cast(), 2 * self.size) };
    }
}

/// How long a connection stays quiet, buffers empty, before its buffer pages are returned.
const RELEASE_AFTER: Duration = Duration::from_secs(2);

fn endpoint(a: SocketAddrV4) -> IpListenEndpoint {
    IpListenEndpoint {
        addr: Some(IpAddress::Ipv4(*a.ip())),
        port: a.port(),
    }
}

/// Reserve a gateway port for a connection into `guest` and register its inbox.
fn reserve_inbound(shared: &Shared, guest: SocketAddrV4) -> Option<(Key, u64, inbox::Receiver)> {
    let mut flows = shared.tcp_flows.lock().unwrap();
    for _ in 0..FORWARD_PORTS.len() {
        let mut port = NEXT_FORWARD_PORT.fetch_add(1, Ordering::Relaxed);
        if !FORWARD_PORTS.contains(&port) {
            NEXT_FORWARD_PORT.store(FORWARD_PORTS.start + 1, Ordering::Relaxed);
            port = FORWARD_PORTS.start;
        }
        let key = Key {
            guest,
            dst: SocketAddrV4::new(shared.config.host_ip, port),
        };
        if let std::collections::hash_map::Entry::Vacant(slot) = flows.entry(key) {
            let (tx, rx) = inbox::channel(INBOX);
            let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
            slot.insert((id, tx));
            return Some((key, id, rx));
        }
    }
    None
}

/// Does the guest accept TCP connections on `guest`? Connects from the gateway, and resets
/// the connection once it is established. False on refusal or when `timeout` runs out.
pub(crate) async fn probe(
    shared: &Arc<Shared>,
    guest: SocketAddrV4,
    mac: MacAddr,
    timeout: Duration,
) -> bool {
    let Some((key, id, mut inbox)) = reserve_inbound(shared, guest) else {
        return false;
    };
    let conn = Conn {
        shared: Arc::clone(shared),
        key,
        id,
        mac,
    };
    let mut dev = GuestLink::new(shared, mac);
    let mut iface = guest_interface(shared, &key, &mut dev);
    let buffers = match Buffers::new(4096) {
        Ok(b) => b,
        Err(_) => return false,
    };
    // SAFETY: `buffers` is declared before `sockets`, so it outlives the socket.
    let mut socket = unsafe { buffers.socket() };
    let remote = (IpAddress::Ipv4(*guest.ip()), guest.port());
    if socket
        .connect(iface.context(), remote, endpoint(key.dst))
        .is_err()
    {
        return false;
    }
    let mut sockets = SocketSet::new(Vec::with_capacity(1));
    let handle = sockets.add(socket);
    let deadline = tokio::time::Instant::now() + timeout;
    let accepted = loop {
        iface.poll(smoltcp::time::Instant::now(), &mut dev, &mut sockets);
        match sockets.get::<tcp::Socket>(handle).state() {
            tcp::State::Established => break true,
            tcp::State::Closed => break false,
            _ => {}
        }
        let delay = iface
            .poll_delay(smoltcp::time::Instant::now(), &sockets)
            .map(Duration::from)
            .unwrap_or(Duration::from_secs(1));
        tokio::select! {
            more = inbox.recv_all(&mut dev.rx) => if !more { break false },
            _ = tokio::time::sleep(delay) => {}
            _ = tokio::time::sleep_until(deadline) => break false,
        }
    };
    sockets.get_mut::<tcp::Socket>(handle).abort();
    iface.poll(smoltcp::time::Instant::now(), &mut dev, &mut sockets);
    drop(conn);
    accepted
}

/// The host side of a connection: a TCP stream, or a unix stream (forwards from a host unix
/// socket into the guest).
pub(crate) trait HostStream: std::os::fd::AsFd + Send + Sync + 'static {
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;
    fn readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send;
    fn writable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send;
    /// The same socket registered with the current thread's runtime (after a move to it).
    fn rehome(self) -> io::Result<Self>
    where
        Self: Sized;
}

macro_rules! host_stream {
    ($t:ty) => {
        impl HostStream for $t {
            fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
                <$t>::try_read(self, buf)
            }
            fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
                <$t>::try_write(self, buf)
            }
            fn readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send {
                <$t>::readable(self)
            }
            fn writable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send {
                <$t>::writable(self)
            }
            fn rehome(self) -> io::Result<Self> {
                <$t>::from_std(self.into_std()?)
            }
        }
    };
}
host_stream!(TcpStream);
host_stream!(UnixStream);

/// How the guest side of a connection starts.
enum Opening {
    /// The guest connected out: feed smoltcp the guest's SYN (held until the host connected).
    Accept(Bytes),
    /// A host client connected to a forwarded port: smoltcp connects into the guest.
    Connect,
}

/// Ports of the gateway (host address) that forwarded connections into guests come from.
const FORWARD_PORTS: std::ops::Range<u16> = 40000..61000;
static NEXT_FORWARD_PORT: std::sync::atomic::AtomicU16 =
    std::sync::atomic::AtomicU16::new(FORWARD_PORTS.start);

/// Carry an accepted host connection into the guest at `guest` (at `mac`): a connection from
/// the gateway's host address. Refused by the guest: the host side is closed at once.
pub(crate) fn forward_in<S: HostStream>(
    shared: &Arc<Shared>,
    stream: S,
    guest: SocketAddrV4,
    mac: MacAddr,
) {
    let c = &shared.tcp_counters;
    let Some((key, id, mut rx)) = reserve_inbound(shared, guest) else {
        FlowCounters::inc(&c.drop_limit);
        tracing::warn!("no free gateway port to forward a connection to {guest}");
        return;
    };
    let conn = Conn {
        shared: Arc::clone(shared),
        key,
        id,
        mac,
    };
    FlowCounters::inc(&c.opened);
    FlowCounters::inc(&c.open);
    tokio::spawn(async move {
        let c = &conn.shared.tcp_counters;
        let _open = Held::open(&c.open, &c.closed);
        if let Err(e) = conn.relay(stream, Opening::Connect, &mut rx).await {
            tracing::debug!("forward to {guest}: {e}");
        }
    });
}

/// A per-connection random seed for smoltcp (initial sequence numbers, ports).
fn seed(key: &Key) -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(key)
}

/// The guest side of one connection as a smoltcp device: segments from the inbox in, IP
/// packets out through the uplink.
struct GuestLink<'a> {
    rx: VecDeque<Bytes>,
    shared: &'a Shared,
    mac: MacAddr,
    /// Sequence number just past the last data byte any segment from the guest carried.
    guest_end: Option<u32>,
    /// Acknowledgement number of the last segment sent to the guest.
    acked: Option<u32>,
    /// The guest's port takes segments of up to 64 KiB (segmentation offload): smoltcp sends
    /// them, and sees the guest's MSS raised to match.
    large: bool,
    /// Hold back a pure ACK that smoltcp sends (set for the poll that takes the guest's FIN,
    /// see [`FIN_ACK_DELAY`]); `held` is the one held back (its IPv4 packet).
    hold_ack: bool,
    held: Option<Vec<u8>>,
}

/// The IP MTU of a connection whose guest takes large segments.
const LARGE_MTU: usize = 65535;

impl<'a> GuestLink<'a> {
    fn new(shared: &'a Shared, mac: MacAddr) -> GuestLink<'a> {
        let large = shared.offload_guest(mac);
        GuestLink {
            rx: VecDeque::new(),
            shared,
            mac,
            guest_end: None,
            acked: None,
            large,
            hold_ack: false,
            held: None,
        }
    }

    /// Everything the guest sent has been acknowledged in order, so smoltcp's assembler
    /// holds no out-of-order data in the receive buffer (it only ever holds bytes the guest
    /// sent past the acknowledgement point).
    fn all_acked(&self) -> bool {
        acked_through(self.guest_end, self.acked)
    }

    /// Send a segment built earlier (a held-back ACK) as it is.
    fn send_now(&mut self, packet: &[u8]) {
        send_built(self.shared, self.mac, self.large, &mut self.acked, packet);
    }

    /// The guest's FIN among the segments to take, if its ACK may be held back: everything
    /// the guest sent before it is acknowledged already and the segments before it carry no
    /// data, so that the FIN (with its own data) is all the guest waits on. With more in
    /// flight its kernel would probe for loss within a few milliseconds (twice the round
    /// trip); with that one segment it waits at least 200 ms.
    fn held_back_fin(&self) -> Option<Bytes> {
        if !self.all_acked() {
            return None;
        }
        for p in &self.rx {
            if fin_end(p).is_some() {
                return Some(p.clone());
            }
            if segment_data(p).is_none_or(|(_, len)| len > 0) {
                return None;
            }
        }
        None
    }
}

/// Does acknowledgement `acked` cover every byte up to `guest_end` (sequence numbers
/// compared modulo 2^32)?
fn acked_through(guest_end: Option<u32>, acked: Option<u32>) -> bool {
    match (guest_end, acked) {
        (None, _) => true,
        (Some(end), Some(ack)) => ack.wrapping_sub(end) as i32 >= 0,
        (Some(_), None) => false,
    }
}

/// (sequence number, payload length) of the TCP segment in IPv4 `packet`.
fn segment_data(packet: &[u8]) -> Option<(u32, usize)> {
    let ihl = usize::from(*packet.first()? & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*packet.get(2)?, *packet.get(3)?]));
    let tcp = packet.get(ihl..total.min(packet.len()))?;
    let seq = u32::from_be_bytes(tcp.get(4..8)?.try_into().ok()?);
    let doff = usize::from(*tcp.get(12)? >> 4) * 4;
    Some((seq, tcp.len().checked_sub(doff)?))
}

/// A SYN in IPv4 `packet` with its MSS option raised to `mss` (checksum updated), or None
/// when it is no SYN, has no MSS option or one already as large.
fn raise_mss(packet: &[u8], mss: u16) -> Option<Bytes> {
    let ihl = usize::from(*packet.first()? & 0x0f) * 4;
    let tcp = packet.get(ihl..)?;
    if tcp.get(13)? & 0x02 == 0 {
        return None;
    }
    let doff = usize::from(*tcp.get(12)? >> 4) * 4;
    let options = tcp.get(20..doff)?;
    let mut i = 0;
    while i < options.len() {
        match options[i] {
            0 => return None,
            1 => i += 1,
            kind => {
                let len = usize::from(*options.get(i + 1)?);
                if len < 2 {
                    return None;
                }
                if kind == 2 && len == 4 {
                    let old = u16::from_be_bytes([*options.get(i + 2)?, *options.get(i + 3)?]);
                    if old >= mss {
                        return None;
                    }
                    let at = ihl + 20 + i + 2;
                    let mut out = packet.to_vec();
                    out[at..at + 2].copy_from_slice(&mss.to_be_bytes());
                    // RFC 1624: HC' = ~(~HC + ~m + m').
                    let c = ihl + 16;
                    let hc = u16::from_be_bytes([out[c], out[c + 1]]);
                    let mut sum = u32::from(!hc) + u32::from(!old) + u32::from(mss);
                    while sum > 0xffff {
                        sum = (sum & 0xffff) + (sum >> 16);
                    }
                    out[c..c + 2].copy_from_slice(&(!(sum as u16)).to_be_bytes());
                    return Some(Bytes::from(out));
                }
                i += len;
            }
        }
    }
    None
}

/// The acknowledgement number of the TCP segment in IPv4 `packet`, if it has ACK set.
fn segment_ack(packet: &[u8]) -> Option<u32> {
    let ihl = usize::from(*packet.first()? & 0x0f) * 4;
    let tcp = packet.get(ihl..)?;
    if tcp.get(13)? & 0x10 == 0 {
        return None;
    }
    Some(u32::from_be_bytes(tcp.get(8..12)?.try_into().ok()?))
}

/// Send a TCP segment already built (the IPv4 packet) to the guest at `mac`, its checksum left
/// `partial` or not as it was built, and note its acknowledgement in `acked`.
fn send_built(
    shared: &Shared,
    mac: MacAddr,
    partial: bool,
    acked: &mut Option<u32>,
    packet: &[u8],
) {
    let copy = |b: &mut [u8]| b.copy_from_slice(packet);
    if partial {
        shared.uplink.send_partial_with(mac, packet.len(), copy);
    } else {
        shared.uplink.send_with(mac, packet.len(), copy);
    }
    if let Some(ack) = segment_ack(packet) {
        *acked = Some(ack);
    }
}

/// The sequence number just past the FIN of the TCP segment in IPv4 `packet`, if it has one.
fn fin_end(packet: &[u8]) -> Option<u32> {
    let ihl = usize::from(*packet.first()? & 0x0f) * 4;
    let flags = *packet.get(ihl + 13)?;
    if flags & 0x01 == 0 {
        return None;
    }
    let (seq, len) = segment_data(packet)?;
    let syn = u32::from(flags & 0x02 != 0);
    Some(
        seq.wrapping_add(len as u32)
            .wrapping_add(syn)
            .wrapping_add(1),
    )
}

/// A TCP segment with nothing but an acknowledgement (no data, no SYN, FIN or RST).
fn pure_ack(packet: &[u8]) -> bool {
    let Some((_, len)) = segment_data(packet) else {
        return false;
    };
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    len == 0 && packet.get(ihl + 13).is_some_and(|f| f & 0x07 == 0)
}

impl Device for GuestLink<'_> {
    type RxToken<'b>
        = RxToken
    where
        Self: 'b;
    type TxToken<'b>
        = TxToken<'b>
    where
        Self: 'b;

    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(RxToken, TxToken<'_>)> {
        let mut packet = self.rx.pop_front()?;
        if self.large {
            if let Some(raised) = raise_mss(&packet, (LARGE_MTU - 40) as u16) {
                packet = raised;
            }
        }
        if let Some((seq, len)) = segment_data(&packet) {
            let end = seq.wrapping_add(len as u32);
            let later = match self.guest_end {
                Some(e) => end.wrapping_sub(e) as i32 > 0,
                None => true,
            };
            if len > 0 && later {
                self.guest_end = Some(end);
            }
        }
        Some((
            RxToken(packet),
            TxToken {
                shared: self.shared,
                mac: self.mac,
                acked: &mut self.acked,
                partial: self.large,
                hold: self.hold_ack.then_some(&mut self.held),
            },
        ))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<TxToken<'_>> {
        Some(TxToken {
            shared: self.shared,
            mac: self.mac,
            acked: &mut self.acked,
            partial: self.large,
            hold: self.hold_ack.then_some(&mut self.held),
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = if self.large {
            LARGE_MTU
        } else {
            self.shared.uplink.mtu()
        };
        // The IPv4 header checksum both ways (20 bytes); TCP's is verified in `route` (or
        // left partial by the guest's kernel) and computed here only for guests that do not
        // take it partial.
        caps.checksum = ChecksumCapabilities::default();
        caps.checksum.tcp = if self.large {
            phy::Checksum::None
        } else {
            phy::Checksum::Tx
        };
        caps
    }
}

struct RxToken(Bytes);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

struct TxToken<'a> {
    shared: &'a Shared,
    mac: MacAddr,
    acked: &'a mut Option<u32>,
    /// Leave the TCP checksum partial (the guest's port takes it so; smoltcp computes none).
    partial: bool,
    /// Hold back a pure ACK (not sent, not counted as sent): here.
    hold: Option<&'a mut Option<Vec<u8>>>,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        if let Some(held) = self.hold {
            // Built aside first, to see what it is (only in the poll that takes a FIN).
            let mut segment = vec![0u8; len];
            let result = f(&mut segment);
            if pure_ack(&segment) {
                *held = Some(segment);
            } else {
                send_built(self.shared, self.mac, self.partial, self.acked, &segment);
            }
            return result;
        }
        let mut result = None;
        let acked = self.acked;
        let write = |b: &mut [u8]| {
            result = Some(f(b));
            if let Some(ack) = segment_ack(b) {
                *acked = Some(ack);
            }
        };
        if self.partial {
            self.shared.uplink.send_partial_with(self.mac, len, write);
        } else {
            self.shared.uplink.send_with(self.mac, len, write);
        }
        result.expect("send_with calls its writer")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's answer to a nonblocking connect on loopback, as `start_connect` reads it:
    /// a listener accepts within the call (connected, no `SO_ERROR` needed), a closed port
    /// refuses within it (an error to read).
    #[test]
    fn connect_state_reads_loopback_connects() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open = listener.local_addr().unwrap();
        // The discard port, which no test binds (a port picked free and let go could be
        // another test process's by now).
        let closed = SocketAddr::from(([127, 0, 0, 1], 9));
        let attempt = |addr: SocketAddr| {
            let sock = Socket::new(
                Domain::IPV4,
                Type::STREAM.nonblocking(),
                Some(Protocol::TCP),
            )
            .unwrap();
            let state = match start_connect(&sock, addr) {
                Ok(state) => state,
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => Connect::Error,
                Err(e) => panic!("connect {addr}: {e}"),
            };
            (state, sock.take_error().unwrap())
        };
        let (state, err) = attempt(open);
        assert!(state == Connect::Done && err.is_none(), "{err:?}");
        let (state, err) = attempt(closed);
        assert!(state == Connect::Error, "a refused connect is no success");
        assert_eq!(
            err.and_then(|e| e.raw_os_error()),
            Some(libc::ECONNREFUSED),
            "SO_ERROR holds the refusal"
        );
    }

    /// An IPv4 packet with a TCP header (no options) and `payload` bytes.
    fn segment(seq: u32, ack: Option<u32>, payload: usize) -> Vec<u8> {
        let total = 20 + 20 + payload;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[9] = 6;
        let t = &mut p[20..];
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[12] = 5 << 4;
        if let Some(a) = ack {
            t[8..12].copy_from_slice(&a.to_be_bytes());
            t[13] = 0x10;
        }
        p
    }

    #[test]
    fn segment_fields() {
        assert_eq!(segment_data(&segment(7, None, 100)), Some((7, 100)));
        assert_eq!(segment_ack(&segment(7, Some(99), 0)), Some(99));
        assert_eq!(segment_ack(&segment(7, None, 0)), None);
        // Truncated or lying headers give nothing rather than a panic.
        let mut lying = segment(7, None, 10);
        lying[32] = 15 << 4; // data offset 60 > what is there
        assert_eq!(segment_data(&lying), None);
        assert_eq!(segment_data(&[0x45, 0, 0]), None);
        assert_eq!(segment_ack(&[0x4f]), None);
    }

    #[test]
    fn raise_mss_keeps_the_checksum_valid() {
        use smoltcp::wire::{
            IpAddress, Ipv4Address, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr,
        };
        let src = Ipv4Address::new(192, 168, 5, 15);
        let dst = Ipv4Address::new(192, 168, 5, 2);
        let mut repr = TcpRepr {
            src_port: 40000,
            dst_port: 80,
            control: TcpControl::Syn,
            seq_number: smoltcp::wire::TcpSeqNumber(12345),
            ack_number: None,
            window_len: 64240,
            window_scale: Some(7),
            max_seg_size: Some(1460),
            sack_permitted: true,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        };
        let build = |repr: &TcpRepr| {
            let mut p = vec![0u8; 20 + repr.buffer_len()];
            let ip = Ipv4Repr {
                src_addr: src,
                dst_addr: dst,
                next_header: smoltcp::wire::IpProtocol::Tcp,
                payload_len: repr.buffer_len(),
                hop_limit: 64,
            };
            let caps = smoltcp::phy::ChecksumCapabilities::default();
            ip.emit(&mut Ipv4Packet::new_unchecked(&mut p[..]), &caps);
            repr.emit(
                &mut TcpPacket::new_unchecked(&mut p[20..]),
                &IpAddress::Ipv4(src),
                &IpAddress::Ipv4(dst),
                &caps,
            );
            p
        };
        let syn = build(&repr);
        let raised = raise_mss(&syn, 65495).expect("a SYN with MSS 1460 is raised");
        let tcp = TcpPacket::new_checked(&raised[20..]).unwrap();
        assert!(tcp.verify_checksum(&IpAddress::Ipv4(src), &IpAddress::Ipv4(dst)));
        let parsed = TcpRepr::parse(
            &tcp,
            &IpAddress::Ipv4(src),
            &IpAddress::Ipv4(dst),
            &smoltcp::phy::ChecksumCapabilities::default(),
        )
        .unwrap();
        assert_eq!(parsed.max_seg_size, Some(65495));
        assert_eq!(parsed.window_scale, Some(7));
        // Already large enough, no SYN, no MSS option, lying option lengths: left alone.
        assert!(raise_mss(&raised, 65495).is_none());
        repr.max_seg_size = None;
        assert!(raise_mss(&build(&repr), 65495).is_none());
        assert!(raise_mss(&segment(1, Some(1), 0), 65495).is_none());
        let mut lying = syn.clone();
        lying[41] = 0; // the first option's length
        assert!(raise_mss(&lying, 65495).is_none());
        assert!(raise_mss(&syn[..30], 65495).is_none());
    }

    #[test]
    fn all_acked_compares_sequence_numbers_modulo() {
        assert!(acked_through(None, None));
        assert!(acked_through(Some(100), Some(100)));
        assert!(
            !acked_through(Some(101), Some(100)),
            "a byte past the ack: out of order data"
        );
        assert!(!acked_through(Some(5), None));
        assert!(
            acked_through(Some(u32::MAX - 10), Some(20)),
            "across the wrap"
        );
        assert!(!acked_through(Some(20), Some(u32::MAX - 10)));
    }
}
