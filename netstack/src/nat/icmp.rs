//! ICMP NAT: the guests' echo requests go out through host ICMP sockets, and only the echo
//! replies the destinations really send come back. Nothing is answered here.
//!
//! Each "ping flow" (guest address, guest echo identifier, destination) has its own host socket
//! and task, and times out when idle like a UDP flow (at most 60 s). The socket is an
//! unprivileged ping socket (`SOCK_DGRAM`, `IPPROTO_ICMP`, allowed by
//! `net.ipv4.ping_group_range`) when the host allows one, whose identifier the kernel picks;
//! otherwise, as root, a raw ICMP socket connected to the destination, with an identifier
//! chosen here and replies matched by identifier and sequence number. Either way the guest's
//! identifier is put back into each reply. Host-side ICMP errors about the echoes (`IP_RECVERR`)
//! go to the guest as errors about its echo request.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::hostsock::HostSocket;
use bytes::Bytes;
use smoltcp::wire::{Icmpv4Packet, IpProtocol, Ipv4Packet};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::mpsc;

use super::udp::{
    is_resource_error, lock, run_flow, set_recverr, with_buffer, HostError, HostFlow, HostTtl,
};
use super::uplink::{IcmpError, Original};
use super::{FlowCounters, Shared, Target};
use crate::frame::{write_ipv4, IPV4_HEADER_LEN};
use crate::MacAddr;

/// Ping flows at most; echo requests that would open more are dropped (`drop_limit`).
const MAX_FLOWS: usize = 4096;
/// Echo requests queued towards one flow's socket; more are dropped.
const INBOX: usize = 64;
/// The longest a ping flow idles (shorter when the UDP timeout is shorter).
const MAX_IDLE: Duration = Duration::from_secs(60);
/// Echo requests remembered per flow (to match replies and errors to them).
const SENT: usize = 256;
/// Replies or errors handled per wake-up.
const BATCH: usize = 64;

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
/// `ICMP_FILTER` (linux/icmp.h): a raw ICMP socket's bitmask of types not to receive.
const ICMP_FILTER: libc::c_int = 1;

const MODE_UNKNOWN: u8 = 0;
const MODE_PING: u8 = 1;
const MODE_RAW: u8 = 2;
const MODE_NONE: u8 = 3;

/// A ping flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    guest: Ipv4Addr,
    ident: u16,
    dst: Ipv4Addr,
}

struct Handle {
    id: u64,
    /// The identifier on the host side (raw sockets; ping sockets: the kernel's).
    host_ident: u16,
    inbox: mpsc::Sender<Echo>,
}

/// A guest's echo request: the whole ICMP message.
struct Echo {
    ttl: u8,
    message: Bytes,
}

/// The host-side ping sockets: which kind the host allows, and the ping flows.
pub(crate) struct Pinger {
    mode: AtomicU8,
    warned: AtomicBool,
    next_ident: AtomicU16,
    next_id: AtomicU64,
    flows: Mutex<HashMap<Key, Handle>>,
}

impl Pinger {
    pub(crate) fn new() -> Pinger {
        Pinger {
            mode: AtomicU8::new(MODE_UNKNOWN),
            warned: AtomicBool::new(false),
            // Away from the process-id identifiers classic ping uses on raw sockets.
            next_ident: AtomicU16::new((std::process::id() as u16) ^ 0xa55a),
            next_id: AtomicU64::new(1),
            flows: Mutex::new(HashMap::new()),
        }
    }

    /// A host socket for echoes to `target`, and whether it is raw. `Err(None)`: the host
    /// allows neither kind.
    fn open(
        &self,
        shared: &Shared,
        target: Ipv4Addr,
    ) -> Result<(HostSocket, bool), Option<io::Error>> {
        let mode = self.mode.load(Ordering::Relaxed);
        if mode == MODE_NONE {
            return Err(None);
        }
        if mode != MODE_RAW {
            match Socket::new(
                Domain::IPV4,
                Type::DGRAM.nonblocking(),
                Some(Protocol::ICMPV4),
            ) {
                Ok(s) => {
                    self.mode.store(MODE_PING, Ordering::Relaxed);
                    return setup(shared, s, target, false)
                        .map(|s| (s, false))
                        .map_err(Some);
                }
                Err(e) if denied(&e) => {
                    tracing::debug!("no ping socket ({e}), trying a raw socket")
                }
                Err(e) => return Err(Some(e)),
            }
        }
        match Socket::new(
            Domain::IPV4,
            Type::RAW.nonblocking(),
            Some(Protocol::ICMPV4),
        ) {
            Ok(s) => {
                self.mode.store(MODE_RAW, Ordering::Relaxed);
                setup(shared, s, target, true)
                    .map(|s| (s, true))
                    .map_err(Some)
            }
            Err(e) if denied(&e) => {
                self.mode.store(MODE_NONE, Ordering::Relaxed);
                if !self.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "ping is not forwarded: no ICMP socket ({e}); allow ping sockets with \
                         sysctl net.ipv4.ping_group_range"
                    );
                }
                Err(None)
            }
            Err(e) => Err(Some(e)),
        }
    }
}

/// The host does not allow this kind of socket (as opposed to running out of something).
fn denied(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EACCES
                | libc::EPERM
                | libc::EPROTONOSUPPORT
                | libc::EAFNOSUPPORT
                | libc::ESOCKTNOSUPPORT
        )
    )
}

fn setup(shared: &Shared, sock: Socket, target: Ipv4Addr, raw: bool) -> io::Result<HostSocket> {
    set_recverr(sock.as_raw_fd())?;
    if raw {
        // Echo replies only; errors about our echoes arrive in the error queue regardless.
        let filter: u32 = !(1u32 << ICMP_ECHO_REPLY);
        // SAFETY: a valid fd and a u32 option of the right size.
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_RAW,
                ICMP_FILTER,
                (&raw const filter).cast(),
                std::mem::size_of::<u32>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    if let Some(bind) = shared.bind_addr(target) {
        sock.bind(&bind.into())?;
    }
    sock.connect(&SocketAddr::V4(SocketAddrV4::new(target, 0)).into())?;
    HostSocket::new(std::net::UdpSocket::from(sock))
}

/// Route one ICMP message from a guest (see the module docs).
pub(crate) fn route(
    shared: &Arc<Shared>,
    src_mac: MacAddr,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ttl: u8,
    message: Bytes,
) {
    let ic = &shared.icmp_counters;
    if message.len() < 8 || message[0] != ICMP_ECHO_REQUEST {
        FlowCounters::inc(&ic.drop_unsupported);
        return;
    }
    if ttl <= 1 {
        let orig = echo_original(src, dst, ttl, &message);
        shared.uplink.send_icmp_error(
            src_mac,
            shared.config.host_ip,
            IcmpError::TtlExceeded,
            &orig,
        );
        FlowCounters::inc(&ic.errors_to_guest);
        return;
    }
    let target = match shared.target(dst) {
        Target::Host(ip) => ip,
        // As a host that does not answer: silence.
        Target::Refuse => {
            FlowCounters::inc(&ic.refused);
            return;
        }
    };
    let key = Key {
        guest: src,
        ident: u16::from_be_bytes([message[4], message[5]]),
        dst,
    };
    let pinger = &shared.icmp;
    let echo = Echo {
        ttl,
        message: message.clone(),
    };
    let Some(echo) = offer(shared, &lock(&pinger.flows), &key, echo) else {
        return;
    };
    if lock(&pinger.flows).len() >= MAX_FLOWS {
        FlowCounters::inc(&ic.drop_limit);
        return;
    }
    let (sock, raw) = match pinger.open(shared, target) {
        Ok(s) => s,
        Err(None) => {
            FlowCounters::inc(&ic.drop_no_socket);
            return;
        }
        Err(Some(e)) => {
            tracing::debug!("ping {src} -> {dst}: no host socket: {e}");
            match HostError::local(&e).and_then(|h| h.translate(target, dst, shared.config.host_ip))
            {
                Some((kind, from)) => {
                    FlowCounters::inc(&ic.refused);
                    shared.uplink.send_icmp_error(
                        src_mac,
                        from,
                        kind,
                        &echo_original(src, dst, ttl, &message),
                    );
                    FlowCounters::inc(&ic.errors_to_guest);
                }
                None if is_resource_error(&e) => FlowCounters::inc(&ic.drop_limit),
                None => FlowCounters::inc(&ic.drop_send_failed),
            }
            return;
        }
    };

    let (tx, rx) = mpsc::channel(INBOX);
    let id = pinger.next_id.fetch_add(1, Ordering::Relaxed);
    let host_ident;
    {
        let mut flows = lock(&pinger.flows);
        let Some(echo) = offer(shared, &flows, &key, echo) else {
            return;
        };
        if flows.len() >= MAX_FLOWS {
            FlowCounters::inc(&ic.drop_limit);
            return;
        }
        // Raw sockets: an identifier no other flow to this destination uses.
        let mut ident = pinger.next_ident.fetch_add(1, Ordering::Relaxed);
        for _ in 0..MAX_FLOWS {
            if !flows
                .iter()
                .any(|(k, h)| k.dst == dst && h.host_ident == ident)
            {
                break;
            }
            ident = pinger.next_ident.fetch_add(1, Ordering::Relaxed);
        }
        host_ident = ident;
        let _ = tx.try_send(echo);
        flows.insert(
            key,
            Handle {
                id,
                host_ident,
                inbox: tx,
            },
        );
    }
    let flow = PingFlow {
        shared: shared.clone(),
        key,
        id,
        guest_mac: src_mac,
        target,
        sock,
        raw,
        host_ident,
        host_ttl: HostTtl::default(),
        sent: VecDeque::new(),
    };
    let timeout = shared.config.udp_timeout.min(MAX_IDLE);
    tokio::spawn(run_flow(flow, rx, timeout));
}

/// Hand `echo` to the flow `key` if it exists (`None`: handled, or dropped); give it back if
/// there is no such flow (or its task is gone).
fn offer(
    shared: &Shared,
    flows: &MutexGuard<'_, HashMap<Key, Handle>>,
    key: &Key,
    echo: Echo,
) -> Option<Echo> {
    let Some(handle) = flows.get(key) else {
        return Some(echo);
    };
    match handle.inbox.try_send(echo) {
        Ok(()) => None,
        Err(mpsc::error::TrySendError::Full(_)) => {
            FlowCounters::inc(&shared.icmp_counters.drop_limit);
            None
        }
        Err(mpsc::error::TrySendError::Closed(e)) => Some(e),
    }
}

/// The guest's echo request as quoted in an ICMP error about it.
fn echo_original<'a>(src: Ipv4Addr, dst: Ipv4Addr, ttl: u8, message: &'a [u8]) -> Original<'a> {
    Original {
        src,
        dst,
        protocol: IpProtocol::Icmp,
        ttl,
        payload_len: message.len(),
        head: &message[..message.len().min(8)],
    }
}

/// An echo request sent out, remembered for matching.
struct Sent {
    seq: u16,
    /// The guest's first 8 bytes (its identifier and checksum), for ICMP errors.
    head: [u8; 8],
    len: usize,
    ttl: u8,
}

struct PingFlow {
    shared: Arc<Shared>,
    key: Key,
    id: u64,
    guest_mac: MacAddr,
    target: Ipv4Addr,
    sock: HostSocket,
    raw: bool,
    host_ident: u16,
    host_ttl: HostTtl,
    sent: VecDeque<Sent>,
}

impl HostFlow for PingFlow {
    type Msg = Echo;

    fn sock(&self) -> &HostSocket {
        &self.sock
    }

    fn send(&mut self, e: Echo) -> impl std::future::Future<Output = ()> + Send {
        PingFlow::send(self, e)
    }

    fn receive(&mut self) -> bool {
        PingFlow::receive(self)
    }

    fn report(&self, e: Option<HostError>) {
        PingFlow::report(self, e)
    }

    fn retire(&self, busy: &dyn Fn() -> bool) -> bool {
        let mut flows = lock(&self.shared.icmp.flows);
        if busy() {
            return false;
        }
        if flows.get(&self.key).is_some_and(|h| h.id == self.id) {
            flows.remove(&self.key);
        }
        true
    }
}

impl PingFlow {
    async fn send(&mut self, echo: Echo) {
        let ic = &self.shared.icmp_counters;
        self.host_ttl.set(&self.sock, echo.ttl);
        let mut msg = echo.message.to_vec();
        let seq = u16::from_be_bytes([msg[6], msg[7]]);
        let mut head = [0u8; 8];
        head.copy_from_slice(&msg[..8]);
        if self.sent.len() >= SENT {
            self.sent.pop_front();
        }
        self.sent.push_back(Sent {
            seq,
            head,
            len: msg.len(),
            ttl: echo.ttl,
        });
        // Ping sockets insist on code 0 and put in their own identifier and checksum.
        msg[1] = 0;
        if self.raw {
            msg[4..6].copy_from_slice(&self.host_ident.to_be_bytes());
        }
        Icmpv4Packet::new_unchecked(&mut msg[..]).fill_checksum();
        for attempt in 0..2 {
            match self.sock.send(&msg) {
                Ok(_) => {
                    FlowCounters::inc(&ic.echo_requests);
                    return;
                }
                Err(e) => {
                    if self.drain_errors() > 0 && attempt == 0 {
                        continue;
                    }
                    tracing::debug!("ping {} -> {}: send: {e}", self.key.guest, self.key.dst);
                    FlowCounters::inc(&ic.drop_send_failed);
                    self.report(HostError::local(&e));
                    return;
                }
            }
        }
    }

    /// Carry echo replies to the guest; whether any arrived.
    fn receive(&self) -> bool {
        let mut any = false;
        for _ in 0..BATCH {
            let r: io::Result<bool> = with_buffer(|buf| {
                let n = self.sock.try_recv(buf)?;
                Ok(self.deliver(&buf[..n]))
            });
            match r {
                Ok(delivered) => any |= delivered,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    if self.drain_errors() == 0 {
                        self.report(HostError::local(&e));
                    }
                }
            }
        }
        any
    }

    /// Pass one received packet on to the guest if it is a reply to this flow's echoes.
    fn deliver(&self, packet: &[u8]) -> bool {
        let icmp = if self.raw {
            // Raw sockets receive the IP header too; connected, only from the target.
            match Ipv4Packet::new_checked(packet) {
                Ok(ip) if ip.src_addr() == self.target => {
                    &packet[ip.header_len().into()..usize::from(ip.total_len())]
                }
                _ => return false,
            }
        } else {
            packet
        };
        let sent = |seq| self.sent.iter().any(|s| s.seq == seq);
        let Some(reply) = guest_reply(
            icmp,
            self.key.ident,
            self.raw.then_some(self.host_ident),
            sent,
        ) else {
            return false;
        };
        send_ip(
            &self.shared,
            self.guest_mac,
            self.key.dst,
            self.key.guest,
            IpProtocol::Icmp,
            &reply,
        );
        FlowCounters::inc(&self.shared.icmp_counters.echo_replies);
        true
    }

    /// Send the guest the ICMP error `e` (if it is one to pass on) about its echo request.
    fn report(&self, e: Option<HostError>) {
        let Some(e) = e else { return };
        let shared = &self.shared;
        let Some((kind, from)) = e.translate(self.target, self.key.dst, shared.config.host_ip)
        else {
            return;
        };
        // Which echo: the one the error quotes, else (an errno) the last one sent.
        let sent = if e.quoted_len >= 8 && e.quoted[0] == ICMP_ECHO_REQUEST {
            let ident = u16::from_be_bytes([e.quoted[4], e.quoted[5]]);
            let seq = u16::from_be_bytes([e.quoted[6], e.quoted[7]]);
            if self.raw && ident != self.host_ident {
                return; // about someone else's echo to the same destination
            }
            self.sent.iter().rev().find(|s| s.seq == seq)
        } else {
            self.sent.back()
        };
        let Some(s) = sent else { return };
        let orig = Original {
            src: self.key.guest,
            dst: self.key.dst,
            protocol: IpProtocol::Icmp,
            ttl: s.ttl,
            payload_len: s.len,
            head: &s.head,
        };
        shared
            .uplink
            .send_icmp_error(self.guest_mac, from, kind, &orig);
        FlowCounters::inc(&shared.icmp_counters.errors_to_guest);
    }
}

/// The echo reply for the guest from a reply `icmp` received on the host: the same message with
/// the guest's identifier and the checksum redone. `None` if it is not an echo reply, or (raw
/// sockets, `host_ident` given) not one to this flow's identifier and a sequence number it sent.
fn guest_reply(
    icmp: &[u8],
    guest_ident: u16,
    host_ident: Option<u16>,
    sent: impl Fn(u16) -> bool,
) -> Option<Vec<u8>> {
    if icmp.len() < 8 || icmp[0] != ICMP_ECHO_REPLY || icmp[1] != 0 {
        return None;
    }
    if let Some(ident) = host_ident {
        let seq = u16::from_be_bytes([icmp[6], icmp[7]]);
        if u16::from_be_bytes([icmp[4], icmp[5]]) != ident || !sent(seq) {
            return None;
        }
    }
    let mut reply = icmp.to_vec();
    reply[4..6].copy_from_slice(&guest_ident.to_be_bytes());
    Icmpv4Packet::new_unchecked(&mut reply[..]).fill_checksum();
    Some(reply)
}

/// Send an IP packet with `payload` from `src` to a guest at `dst`, fragmented if over the MTU.
fn send_ip(
    shared: &Shared,
    dst_mac: MacAddr,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: IpProtocol,
    payload: &[u8],
) {
    let len = IPV4_HEADER_LEN + payload.len();
    let up = &shared.uplink;
    if len <= up.mtu() {
        up.send_with(dst_mac, len, |b| {
            write_ipv4(b, src, dst, protocol, payload.len(), false, |p| {
                p.copy_from_slice(payload)
            })
        });
        return;
    }
    let mut packet = vec![0u8; len];
    write_ipv4(&mut packet, src, dst, protocol, payload.len(), true, |p| {
        p.copy_from_slice(payload)
    });
    up.send_ipv4(dst_mac, &packet);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(ident: u16, seq: u16, data: &[u8]) -> Vec<u8> {
        let mut m = vec![ICMP_ECHO_REPLY, 0, 0, 0];
        m.extend_from_slice(&ident.to_be_bytes());
        m.extend_from_slice(&seq.to_be_bytes());
        m.extend_from_slice(data);
        Icmpv4Packet::new_unchecked(&mut m[..]).fill_checksum();
        m
    }

    #[test]
    fn reply_gets_the_guests_identifier_back() {
        let host = reply(0x1234, 7, b"hello");
        let out = guest_reply(&host, 0xbeef, None, |_| false).unwrap();
        let p = Icmpv4Packet::new_checked(&out[..]).unwrap();
        assert!(p.verify_checksum());
        assert_eq!(
            (p.echo_ident(), p.echo_seq_no(), p.data()),
            (0xbeef, 7, &b"hello"[..])
        );
    }

    #[test]
    fn raw_replies_must_match_identifier_and_sequence() {
        let host = reply(0x1234, 7, b"x");
        assert!(guest_reply(&host, 1, Some(0x1234), |s| s == 7).is_some());
        assert!(guest_reply(&host, 1, Some(0x1235), |s| s == 7).is_none());
        assert!(guest_reply(&host, 1, Some(0x1234), |s| s == 8).is_none());
    }

    #[test]
    fn only_echo_replies_are_passed_on() {
        let mut req = reply(1, 1, b"x");
        req[0] = ICMP_ECHO_REQUEST;
        assert!(guest_reply(&req, 1, None, |_| true).is_none());
        assert!(guest_reply(&[0, 0, 0], 1, None, |_| true).is_none());
    }
}
