//! UDP NAT: one connected host socket and one task per flow (guest address and port,
//! destination address and port).
//!
//! The host socket has `IP_RECVERR` set, so the ICMP errors the host receives about a flow's
//! datagrams (port or host unreachable, TTL exceeded) are read from its error queue and sent
//! on to the guest, from the address that reported them, as a router would. The guest's TTL
//! is carried over, less one, so traceroute works through the NAT.
//!
//! Towards a guest whose port takes offloaded frames, datagrams of one size that the host
//! socket holds one after the other go in one frame ([`Partial::segment`]: UDP segmentation
//! offload, as GRO would gather them), which the guest's kernel cuts apart: one write, one
//! trip through the switch and one set of headers for up to 64 datagrams.
//!
//! The socket helpers shared with the ICMP NAT (error queue, errno and ICMP translation, TTL)
//! live here too.
//!
//! [`Partial::segment`]: crate::offload::Partial::segment

use std::cell::RefCell;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::hostsock::HostSocket;
use bytes::{Bytes, BytesMut};
use smoltcp::wire::{Icmpv4DstUnreachable, IpProtocol, UDP_HEADER_LEN};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::Interest;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::uplink::{IcmpError, Original, UDP_HEADROOM};
use super::{FlowCounters, Shared, Target};
use crate::frame::IPV4_HEADER_LEN;
use crate::MacAddr;

/// Flows at most; datagrams that would open more are dropped (`drop_limit`).
pub(crate) const MAX_FLOWS: usize = 65536;
/// The receive buffer a flow's host socket asks for.
const FLOW_RCVBUF: usize = 1 << 20;
/// Datagrams queued towards one flow's host socket; more are dropped (`drop_queue_full`).
const INBOX: usize = 64;
/// The largest UDP payload in an IPv4 datagram.
pub(crate) const MAX_DATAGRAM: usize = 65507;
/// The receive buffer for host datagrams (a datagram never exceeds it).
const RECV_BUF: usize = 65536;
/// Datagrams or errors handled per wake-up before other branches get a turn.
const BATCH: usize = 64;
/// Datagrams sent to a guest in one frame at most (UDP segmentation offload).
const SEGMENTS: usize = 64;

/// A run of datagrams of one size (the last may be shorter) that go together, in one frame
/// to the guest or in one send from it (UDP segmentation offload): their sizes.
#[derive(Default)]
struct Group {
    /// The size of each (the first one's; a shorter one ends the group).
    segment: usize,
    count: usize,
    /// All of them together.
    bytes: usize,
    /// A shorter one came: the run is over.
    ended: bool,
}

impl Group {
    /// A group of one datagram of `n` bytes.
    fn first(n: usize) -> Group {
        Group {
            segment: n,
            count: 1,
            bytes: n,
            ended: false,
        }
    }

    /// May a datagram of `n` bytes join? Not an empty one, nor one longer than the first,
    /// nor any after a shorter one; at most [`SEGMENTS`], [`MAX_DATAGRAM`] bytes in all.
    fn takes(&self, n: usize) -> bool {
        !self.ended
            && n > 0
            && n <= self.segment
            && self.count < SEGMENTS
            && self.bytes + n <= MAX_DATAGRAM
    }

    /// Add a datagram of `n` bytes (one it [`takes`](Group::takes)).
    fn push(&mut self, n: usize) {
        self.count += 1;
        self.bytes += n;
        self.ended = n < self.segment;
    }

    /// Nothing more can join: a shorter one ended the run, or no room for another.
    fn full(&self) -> bool {
        self.ended || self.count == SEGMENTS || self.bytes + self.segment > MAX_DATAGRAM
    }
}

/// A UDP flow: the guest's address and port, and the destination's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    pub guest: SocketAddrV4,
    pub dst: SocketAddrV4,
}

/// The table's handle on a flow's task.
pub(crate) struct FlowHandle {
    /// Tells this flow from a later one with the same key.
    id: u64,
    inbox: mpsc::Sender<Datagram>,
    host: Arc<HostSide>,
}

/// A flow's host socket and what its task and the fast path ([`route_fast`]) share about it.
struct HostSide {
    sock: HostSocket,
    /// The IP_TTL set on the socket (0: none yet).
    ttl: AtomicU8,
    /// The guest's TTL (bits 32..40) and payload length of the last datagram sent, for ICMP
    /// errors about it.
    last: AtomicU64,
    /// A datagram went out on the fast path since the idle timer last looked.
    active: AtomicBool,
    /// The socket takes several datagrams in one call (`UDP_SEGMENT`); cleared when it
    /// refuses them for good.
    segments_ok: AtomicBool,
}

impl HostSide {
    /// Send a guest datagram (with the guest's `ttl`) now and count it; false when the
    /// socket does not take it.
    fn send_counted(&self, c: &FlowCounters, ttl: u8, payload: &[u8]) -> bool {
        self.set_ttl(ttl);
        self.set_last(ttl, payload.len());
        if self.sock.send(payload).is_err() {
            return false;
        }
        FlowCounters::add(&c.bytes_from_guest, payload.len() as u64);
        self.active.store(true, Ordering::Relaxed);
        true
    }

    fn set_ttl(&self, guest_ttl: u8) {
        let ttl = guest_ttl.saturating_sub(1).max(1);
        if self.ttl.load(Ordering::Relaxed) != ttl {
            match SockRef::from(&self.sock).set_ttl_v4(u32::from(ttl)) {
                Ok(()) => self.ttl.store(ttl, Ordering::Relaxed),
                Err(e) => tracing::debug!("IP_TTL {ttl}: {e}"),
            }
        }
    }

    fn set_last(&self, ttl: u8, len: usize) {
        self.last
            .store((u64::from(ttl) << 32) | len as u64, Ordering::Relaxed);
    }

    fn last(&self) -> (u8, usize) {
        let v = self.last.load(Ordering::Relaxed);
        ((v >> 32) as u8, (v & 0xffff_ffff) as usize)
    }
}

/// The fast path for a guest datagram (one the gateway only routes, with TTL left): straight
/// out of its flow's host socket from the caller's task when the flow exists, its queue is
/// empty and the socket takes it at once; otherwise (or on any error, which the flow's task
/// then reports) the way [`route`] takes it, with the guest's address learnt.
pub(crate) fn route_fast(
    shared: &Arc<Shared>,
    src_mac: MacAddr,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    ttl: u8,
    payload: Bytes,
) {
    if ttl <= 1 || payload.len() > MAX_DATAGRAM {
        shared.learn(*src.ip(), src_mac);
        return route(shared, src_mac, src, dst, ttl, payload);
    }
    let key = Key { guest: src, dst };
    let Some(payload) = super::forward::deliver_reply(shared, &key, payload) else {
        return; // an answer to a forwarded flow
    };
    let gather = GATHERING.get() && !payload.is_empty() && payload.len() <= MAX_SEGMENT;
    // What this thread holds goes first when this datagram cannot join it (before the flow's
    // queue is looked at: what the held ones leave there, this one must not overtake).
    let joins = gather
        && SENDS.with_borrow(|held| {
            held.as_ref()
                .is_some_and(|h| h.takes(&key, ttl, payload.len()))
        });
    if !joins {
        flush_sends();
    }
    let host = {
        let flows = lock(&shared.udp_flows);
        match flows.get(&key) {
            // Datagrams still queued for the task go first.
            Some(h) if h.inbox.capacity() == h.inbox.max_capacity() => Some(Arc::clone(&h.host)),
            _ => None,
        }
    };
    let Some(host) = host else {
        flush_sends();
        shared.learn(*src.ip(), src_mac);
        return route_flow(shared, src_mac, key, ttl, payload);
    };
    if !gather || !host.segments_ok.load(Ordering::Relaxed) {
        return send_now(shared, src_mac, key, &host, ttl, payload);
    }
    // Taken out of the thread's slot before anything is sent (sending may reach code that
    // looks at the slot again).
    let full = SENDS.with_borrow_mut(|slot| match slot {
        Some(h) if h.takes(&key, ttl, payload.len()) => {
            h.push(payload);
            if h.full() {
                slot.take()
            } else {
                None
            }
        }
        _ => {
            *slot = Some(Held {
                shared: Arc::clone(shared),
                src_mac,
                key,
                host,
                ttl,
                group: Group::first(payload.len()),
                datagrams: vec![payload],
            });
            None
        }
    });
    if let Some(h) = full {
        h.send();
    }
}

/// Send a guest datagram out of its flow's host socket, or hand it to the flow's task when
/// the socket does not take it (the task sends it again and reports the error).
fn send_now(
    shared: &Arc<Shared>,
    src_mac: MacAddr,
    key: Key,
    host: &HostSide,
    ttl: u8,
    payload: Bytes,
) {
    if !host.send_counted(&shared.udp_counters, ttl, &payload) {
        shared.learn(*key.guest.ip(), src_mac);
        route_flow(shared, src_mac, key, ttl, payload);
    }
}

/// The largest guest datagram held to go out with others (a larger one goes alone).
const MAX_SEGMENT: usize = 16384;

thread_local! {
    /// This thread holds guest datagrams to send several in one call ([`gather_sends`]).
    static GATHERING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The datagrams held.
    static SENDS: RefCell<Option<Held>> = const { RefCell::new(None) };
}

/// From now on this thread holds the guest datagrams of one flow that come one after the
/// other on the fast path (same size, the last may be shorter), and sends them in one call
/// (UDP segmentation offload) when a datagram of another kind comes or [`flush_sends`] is
/// called, which the thread must do before it waits for anything (a port's reader, when its
/// device has no more frames for now).
pub fn gather_sends() {
    GATHERING.set(true);
}

/// Send the guest datagrams this thread holds ([`gather_sends`]).
pub fn flush_sends() {
    if let Some(h) = SENDS.with_borrow_mut(Option::take) {
        h.send();
    }
}

/// Guest datagrams of one flow held to go out in one call.
struct Held {
    shared: Arc<Shared>,
    src_mac: MacAddr,
    key: Key,
    host: Arc<HostSide>,
    ttl: u8,
    group: Group,
    datagrams: Vec<Bytes>,
}

impl Held {
    /// May a datagram of `len` bytes of flow `key` with `ttl` join?
    fn takes(&self, key: &Key, ttl: u8, len: usize) -> bool {
        self.key == *key && self.ttl == ttl && self.group.takes(len)
    }

    fn push(&mut self, d: Bytes) {
        self.group.push(d.len());
        self.datagrams.push(d);
    }

    /// Nothing more can join.
    fn full(&self) -> bool {
        self.group.full()
    }

    fn send(self) {
        let Held {
            shared,
            src_mac,
            key,
            host,
            ttl,
            group,
            mut datagrams,
        } = self;
        if datagrams.len() == 1 {
            let d = datagrams.pop().unwrap();
            return send_now(&shared, src_mac, key, &host, ttl, d);
        }
        host.set_ttl(ttl);
        host.set_last(ttl, datagrams.last().map_or(0, Bytes::len));
        let c = &shared.udp_counters;
        match host.sock.send_segments(&datagrams, group.segment as u16) {
            Ok(()) => {
                FlowCounters::add(&c.bytes_from_guest, group.bytes as u64);
                FlowCounters::add(&c.gathered_from_guest, datagrams.len() as u64);
                host.active.store(true, Ordering::Relaxed);
            }
            // Not taken together: one by one, as the fast path sends them; from the first the
            // socket does not take, through the flow's task (in order), which reports what
            // fails. A kernel without UDP_SEGMENT or a path MTU below the size (the datagrams
            // would have to be fragmented, which segmentation offload does not do) refuses
            // every such call: the flow sends one by one from now on.
            Err(e) => {
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EMSGSIZE | libc::EINVAL | libc::EIO | libc::ENOPROTOOPT)
                ) {
                    host.segments_ok.store(false, Ordering::Relaxed);
                }
                let mut rest = datagrams.into_iter();
                for d in rest.by_ref() {
                    if !host.send_counted(c, ttl, &d) {
                        shared.learn(*key.guest.ip(), src_mac);
                        route_flow(&shared, src_mac, key, ttl, d);
                        break;
                    }
                }
                for d in rest {
                    route_flow(&shared, src_mac, key, ttl, d);
                }
            }
        }
    }
}

/// A guest datagram on its way to the host socket.
struct Datagram {
    ttl: u8,
    payload: Bytes,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Route one datagram from a guest (see the module docs).
pub(crate) fn route(
    shared: &Arc<Shared>,
    src_mac: MacAddr,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    ttl: u8,
    payload: Bytes,
) {
    // Datagrams held on this thread go first.
    flush_sends();
    let c = &shared.udp_counters;
    if payload.len() > MAX_DATAGRAM {
        FlowCounters::inc(&c.drop_malformed);
        return;
    }
    let key = Key { guest: src, dst };
    let Some(payload) = super::forward::deliver_reply(shared, &key, payload) else {
        return; // an answer to a forwarded flow
    };
    route_flow(shared, src_mac, key, ttl, payload);
}

/// A guest datagram that is not an answer to a forwarded flow: to its flow, or to a new one.
fn route_flow(shared: &Arc<Shared>, src_mac: MacAddr, key: Key, ttl: u8, payload: Bytes) {
    let c = &shared.udp_counters;
    let (src, dst) = (key.guest, key.dst);
    let orig = |kind: IcmpError, from: Ipv4Addr| {
        let head = udp_head(src, dst, payload.len());
        shared.uplink.send_icmp_error(
            src_mac,
            from,
            kind,
            &udp_original(src, dst, ttl, payload.len(), &head),
        );
        FlowCounters::inc(&shared.icmp_counters.errors_to_guest);
    };
    if ttl <= 1 {
        // A router does not forward a packet whose TTL runs out here.
        orig(IcmpError::TtlExceeded, shared.config.host_ip);
        return;
    }
    let datagram = Datagram {
        ttl,
        payload: payload.clone(),
    };
    let Some(datagram) = offer(shared, &lock(&shared.udp_flows), &key, datagram) else {
        return;
    };

    // A new flow.
    let target = match shared.target(*dst.ip()) {
        Target::Host(ip) => ip,
        Target::Refuse => {
            FlowCounters::inc(&c.refused);
            // RFC 1122 3.2.2: no ICMP errors about datagrams to broadcast or multicast.
            if !dst.ip().is_broadcast() && !dst.ip().is_multicast() {
                orig(
                    IcmpError::Unreachable(Icmpv4DstUnreachable::PortUnreachable),
                    *dst.ip(),
                );
            }
            return;
        }
    };
    if lock(&shared.udp_flows).len() >= MAX_FLOWS {
        FlowCounters::inc(&c.drop_limit);
        return;
    }
    let target = SocketAddrV4::new(target, dst.port());
    let sock = match open_socket(shared, target) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!("udp {src} -> {dst}: no host socket: {e}");
            match HostError::local(&e)
                .and_then(|h| h.translate(*target.ip(), *dst.ip(), shared.config.host_ip))
            {
                Some((kind, from)) => {
                    FlowCounters::inc(&c.refused);
                    orig(kind, from);
                }
                None if is_resource_error(&e) => FlowCounters::inc(&c.drop_limit),
                None => FlowCounters::inc(&c.drop_send_failed),
            }
            return;
        }
    };

    let host = Arc::new(HostSide {
        sock,
        ttl: AtomicU8::new(0),
        last: AtomicU64::new(0),
        active: AtomicBool::new(false),
        segments_ok: AtomicBool::new(true),
    });
    let (tx, rx) = mpsc::channel(INBOX);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    {
        let mut flows = lock(&shared.udp_flows);
        // Another thread may have opened the same flow meanwhile: use that one.
        let Some(datagram) = offer(shared, &flows, &key, datagram) else {
            return;
        };
        if flows.len() >= MAX_FLOWS {
            FlowCounters::inc(&c.drop_limit);
            return;
        }
        // The first datagram goes out now, so that the flow's queue stays empty and what
        // follows takes the fast path (a burst at a flow's start no longer fills the queue
        // while the task has not run yet); one the socket does not take goes to the task,
        // which sends it again and reports the error.
        if !host.send_counted(c, ttl, &datagram.payload) {
            // Cannot fail: the channel is new and empty.
            let _ = tx.try_send(datagram);
        }
        flows.insert(
            key,
            FlowHandle {
                id,
                inbox: tx,
                host: Arc::clone(&host),
            },
        );
    }
    FlowCounters::inc(&c.opened);
    FlowCounters::inc(&c.open);
    let flow = Flow {
        shared: shared.clone(),
        key,
        id,
        guest_mac: src_mac,
        partial: shared.offload_guest(src_mac),
        // The guest's port cuts such frames apart where its kernel does not, and the switch
        // for ports that take no large frames.
        segments: shared.offload_guest(src_mac),
        target,
        host,
    };
    flow.host.set_last(ttl, payload.len());
    let timeout = shared.config.udp_timeout;
    tokio::spawn(run_flow(flow, rx, timeout));
}

/// Hand `datagram` to the flow `key` if it exists (`None`: handled, or dropped and counted);
/// give it back if there is no such flow.
fn offer(
    shared: &Shared,
    flows: &MutexGuard<'_, std::collections::HashMap<Key, FlowHandle>>,
    key: &Key,
    datagram: Datagram,
) -> Option<Datagram> {
    let Some(handle) = flows.get(key) else {
        return Some(datagram);
    };
    match handle.inbox.try_send(datagram) {
        Ok(()) => None,
        Err(mpsc::error::TrySendError::Full(_)) => {
            FlowCounters::inc(&shared.udp_counters.drop_queue_full);
            None
        }
        // The task is gone (it removes its entry before it ends, so this is a panic): the
        // caller opens a new flow and replaces the entry.
        Err(mpsc::error::TrySendError::Closed(d)) => Some(d),
    }
}

fn open_socket(shared: &Shared, target: SocketAddrV4) -> io::Result<HostSocket> {
    let sock = Socket::new(Domain::IPV4, Type::DGRAM.nonblocking(), Some(Protocol::UDP))?;
    set_recverr(sock.as_raw_fd())?;
    // Room for a host's burst while the thread is busy elsewhere: the kernel caps the request
    // at net.core.rmem_max and doubles it (2 x 208 KiB where that is the default, against
    // 208 KiB without asking). Memory is charged only for what is queued.
    let _ = sock.set_recv_buffer_size(FLOW_RCVBUF);
    let bind = shared
        .bind_addr(*target.ip())
        .unwrap_or(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)));
    sock.bind(&bind.into())?;
    sock.connect(&SocketAddr::V4(target).into())?;
    HostSocket::new(sock.into())
}

/// One flow's task state.
struct Flow {
    shared: Arc<Shared>,
    key: Key,
    id: u64,
    guest_mac: MacAddr,
    /// The guest takes UDP checksums left partial (see [`Shared::offload_guest`]).
    partial: bool,
    /// The guest takes several datagrams in one frame (UDP segmentation offload).
    segments: bool,
    /// The host side's destination (the host address mapped to 127.0.0.1).
    target: SocketAddrV4,
    host: Arc<HostSide>,
}

/// A flow with a host socket of its own (a UDP flow, a ping flow): what [`run_flow`], the
/// one event loop they share, needs from it.
pub(crate) trait HostFlow: Send {
    /// What the guest sends on the flow.
    type Msg: Send;
    /// The flow's host socket.
    fn sock(&self) -> &HostSocket;
    /// Send one of the guest's messages out of the host socket.
    fn send(&mut self, m: Self::Msg) -> impl std::future::Future<Output = ()> + Send;
    /// Carry what the host socket received to the guest; whether anything arrived.
    fn receive(&mut self) -> bool;
    /// Pass an error from the socket's error queue on to the guest.
    fn report(&self, e: Option<HostError>);
    /// Read the error queue dry (bounded), passing each error on; how many it held.
    fn drain_errors(&self) -> usize {
        let fd = self.sock().as_raw_fd();
        let mut n = 0;
        while n < BATCH {
            match recv_error(fd) {
                Ok(e) => {
                    n += 1;
                    self.report(e);
                }
                Err(_) => break,
            }
        }
        n
    }

    /// Traffic the loop did not see (a fast path) since it last asked.
    fn active(&self) -> bool {
        false
    }
    /// Under the flow table's lock: stay (false) when `busy()` says datagrams are queued,
    /// else take the flow's entry out if it is still this flow's (true).
    fn retire(&self, busy: &dyn Fn() -> bool) -> bool;
}

enum Event<M> {
    Msg(Option<M>),
    Readable(io::Result<()>),
    Error(io::Result<()>),
    Idle,
}

/// One flow's task: the guest's messages out, the host's in, ICMP errors from the error
/// queue on to the guest, until the flow is idle for `timeout` or its socket fails.
pub(crate) async fn run_flow<F: HostFlow>(
    mut f: F,
    mut inbox: mpsc::Receiver<F::Msg>,
    timeout: std::time::Duration,
) {
    let idle = tokio::time::sleep(timeout);
    tokio::pin!(idle);
    loop {
        let event = tokio::select! {
            m = inbox.recv() => Event::Msg(m),
            r = f.sock().readable() => Event::Readable(r),
            r = f.sock().ready(Interest::ERROR) => Event::Error(r),
            () = &mut idle => Event::Idle,
        };
        match event {
            Event::Msg(None) => break,
            Event::Msg(Some(m)) => {
                f.send(m).await;
                idle.as_mut().reset(Instant::now() + timeout);
            }
            Event::Readable(Err(_)) | Event::Error(Err(_)) => break,
            Event::Readable(Ok(())) => {
                if f.receive() {
                    idle.as_mut().reset(Instant::now() + timeout);
                }
            }
            Event::Error(Ok(_)) => {
                let fd = f.sock().as_raw_fd();
                for _ in 0..BATCH {
                    match f.sock().try_io(Interest::ERROR, || recv_error(fd)) {
                        Ok(e) => f.report(e),
                        Err(_) => break,
                    }
                }
            }
            Event::Idle => {
                // route() queues under the table's lock: nothing can slip in after retire.
                if f.active() || !f.retire(&|| !inbox.is_empty()) {
                    idle.as_mut().reset(Instant::now() + timeout);
                    continue;
                }
                return;
            }
        }
    }
    // The socket failed: take the entry out (if still ours) so the next message opens anew.
    f.retire(&|| false);
}

impl HostFlow for Flow {
    type Msg = Datagram;

    fn sock(&self) -> &HostSocket {
        &self.host.sock
    }

    fn send(&mut self, d: Datagram) -> impl std::future::Future<Output = ()> + Send {
        Flow::send(self, d)
    }

    fn receive(&mut self) -> bool {
        Flow::receive(self)
    }

    fn report(&self, e: Option<HostError>) {
        Flow::report(self, e)
    }

    fn active(&self) -> bool {
        self.host.active.swap(false, Ordering::Relaxed)
    }

    fn retire(&self, busy: &dyn Fn() -> bool) -> bool {
        let mut flows = lock(&self.shared.udp_flows);
        if busy() {
            return false;
        }
        if flows.get(&self.key).is_some_and(|h| h.id == self.id) {
            flows.remove(&self.key);
        }
        true
    }
}

impl Drop for Flow {
    /// The flow has ended (also when its task was cancelled: the runtime of the tap port whose
    /// fast path opened it ended with the port).
    fn drop(&mut self) {
        let c = &self.shared.udp_counters;
        FlowCounters::inc(&c.closed);
        FlowCounters::dec(&c.open);
    }
}

impl Flow {
    /// Send a guest datagram out of the host socket.
    async fn send(&mut self, d: Datagram) {
        let c = &self.shared.udp_counters;
        self.host.set_ttl(d.ttl);
        self.host.set_last(d.ttl, d.payload.len());
        for attempt in 0..2 {
            match self.host.sock.send(&d.payload) {
                Ok(_) => {
                    FlowCounters::add(&c.bytes_from_guest, d.payload.len() as u64);
                    return;
                }
                Err(e) => {
                    // A pending error about an earlier datagram fails this send: report it and
                    // send this one again.
                    if self.drain_errors() > 0 && attempt == 0 {
                        continue;
                    }
                    tracing::debug!("udp {} -> {}: send: {e}", self.key.guest, self.key.dst);
                    FlowCounters::inc(&c.drop_send_failed);
                    self.report(HostError::local(&e));
                    return;
                }
            }
        }
    }

    /// Carry the host socket's datagrams to the guest; whether any arrived.
    ///
    /// Datagrams are received in place, after room for their headers, into one chunk per
    /// wake-up that the frames then share. For a guest that takes UDP segmentation offload
    /// ([`Flow::segments`]), datagrams of one size that follow each other go to the guest as
    /// one frame (as UDP GRO would gather them), which its kernel cuts apart: one write and
    /// one trip through the switch for up to [`SEGMENTS`] datagrams.
    fn receive(&mut self) -> bool {
        let mut any = false;
        let mut chunk = BytesMut::new();
        let mut group = Group::default();
        let max_segment = if self.segments {
            self.shared.uplink.mtu() - IPV4_HEADER_LEN - UDP_HEADER_LEN
        } else {
            0
        };
        for _ in 0..BATCH {
            if chunk.capacity() - chunk.len() < RECV_BUF {
                self.flush(&mut chunk, &mut group);
            }
            if group.count == 0 {
                if chunk.capacity() < UDP_HEADROOM + RECV_BUF {
                    chunk = BytesMut::with_capacity(4 * (UDP_HEADROOM + RECV_BUF));
                }
                chunk.resize(UDP_HEADROOM, 0);
            }
            match self.host.sock.try_recv_buf(&mut chunk) {
                Ok(n) => {
                    FlowCounters::add(&self.shared.udp_counters.bytes_to_guest, n as u64);
                    any = true;
                    if group.count == 0 {
                        group = Group::first(n);
                    } else if group.takes(n) {
                        group.push(n);
                    } else {
                        // Not one of the group: it starts the next, moved behind headroom
                        // of its own in the rest of the buffer.
                        let mut late = chunk.split_off(UDP_HEADROOM + group.bytes);
                        self.flush(&mut chunk, &mut group);
                        late.resize(UDP_HEADROOM + n, 0);
                        late.copy_within(0..n, UDP_HEADROOM);
                        chunk = late;
                        group = Group::first(n);
                    }
                    if group.segment == 0 || group.segment > max_segment || group.full() {
                        // Empty, too long to ride with others, ended by a shorter one, or no
                        // room for another of its size: sent now (the next one starts a group
                        // of its own, in place).
                        self.flush(&mut chunk, &mut group);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // An ICMP error reported through recv: its details are in the error queue.
                    if self.drain_errors() == 0 {
                        self.report(HostError::local(&e));
                    }
                }
            }
        }
        self.flush(&mut chunk, &mut group);
        any
    }

    /// Send the guest the datagrams of `group`, received into `chunk` after its headroom.
    fn flush(&self, chunk: &mut BytesMut, group: &mut Group) {
        let g = std::mem::take(group);
        if g.count == 0 {
            return;
        }
        debug_assert!(g.count == 1 || g.segment <= usize::from(u16::MAX));
        let frame = chunk.split_to(UDP_HEADROOM + g.bytes);
        // Replies come from the address the guest sent to, not the one we talked to.
        let (uplink, key, mac) = (&self.shared.uplink, self.key, self.guest_mac);
        if g.count == 1 {
            uplink.send_udp_frame(mac, key.dst, key.guest, frame, self.partial);
        } else {
            FlowCounters::add(&self.shared.udp_counters.gathered_to_guest, g.count as u64);
            uplink.send_udp_segments(mac, key.dst, key.guest, frame, g.segment as u16);
        }
    }

    /// Send the guest the ICMP error `e` (if it is one to pass on) about its last datagram.
    fn report(&self, e: Option<HostError>) {
        let shared = &self.shared;
        let Some((kind, from)) = e.and_then(|e| {
            e.translate(*self.target.ip(), *self.key.dst.ip(), shared.config.host_ip)
        }) else {
            return;
        };
        let (ttl, len) = self.host.last();
        let head = udp_head(self.key.guest, self.key.dst, len);
        let orig = udp_original(self.key.guest, self.key.dst, ttl, len, &head);
        shared
            .uplink
            .send_icmp_error(self.guest_mac, from, kind, &orig);
        FlowCounters::inc(&shared.icmp_counters.errors_to_guest);
    }
}

/// The 8-byte UDP header of a guest datagram, as quoted in ICMP errors (checksum 0: "none").
pub(crate) fn udp_head(src: SocketAddrV4, dst: SocketAddrV4, payload_len: usize) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[0..2].copy_from_slice(&src.port().to_be_bytes());
    h[2..4].copy_from_slice(&dst.port().to_be_bytes());
    let len = u16::try_from(UDP_HEADER_LEN + payload_len).unwrap_or(u16::MAX);
    h[4..6].copy_from_slice(&len.to_be_bytes());
    h
}

fn udp_original<'a>(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    ttl: u8,
    payload_len: usize,
    head: &'a [u8; 8],
) -> Original<'a> {
    Original {
        src: *src.ip(),
        dst: *dst.ip(),
        protocol: IpProtocol::Udp,
        ttl,
        payload_len: UDP_HEADER_LEN + payload_len,
        head,
    }
}

thread_local! {
    static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Run `f` on a receive buffer of [`RECV_BUF`] bytes shared by the flows of this thread.
pub(crate) fn with_buffer<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    BUFFER.with(|b| match b.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < RECV_BUF {
                buf.resize(RECV_BUF, 0);
            }
            f(&mut buf)
        }
        // Re-entered (cannot happen unless a frame sink routes synchronously): a fresh one.
        Err(_) => f(&mut vec![0u8; RECV_BUF]),
    })
}

/// Lock a flow table, ignoring poisoning (the tables stay consistent across a panic).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Running out of descriptors or memory (a limit, not an answer from the network).
pub(crate) fn is_resource_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// The host socket's TTL, set from the guest's TTL less one when that changes.
#[derive(Debug, Default)]
pub(crate) struct HostTtl(Option<u8>);

impl HostTtl {
    pub(crate) fn set(&mut self, sock: &HostSocket, guest_ttl: u8) {
        let ttl = guest_ttl.saturating_sub(1).max(1);
        if self.0 != Some(ttl) {
            match SockRef::from(sock).set_ttl_v4(u32::from(ttl)) {
                Ok(()) => self.0 = Some(ttl),
                Err(e) => tracing::debug!("IP_TTL {ttl}: {e}"),
            }
        }
    }
}

/// Ask for ICMP errors about this socket's packets in its error queue (`IP_RECVERR`).
pub(crate) fn set_recverr(fd: RawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid fd and an int option of the right size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_RECVERR,
            (&raw const on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An error the host reported about a socket's packet: from its error queue, or an errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HostError {
    /// The errno it maps to.
    pub errno: i32,
    /// `SO_EE_ORIGIN_*`.
    pub origin: u8,
    /// ICMP type and code (origin ICMP).
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// The address that sent the ICMP error.
    pub offender: Option<Ipv4Addr>,
    /// The first bytes of the offending packet's payload as queued (ICMP: its header).
    pub quoted: [u8; 8],
    pub quoted_len: usize,
}

impl HostError {
    /// An errno from a syscall (no error-queue details).
    pub(crate) fn local(e: &io::Error) -> Option<HostError> {
        Some(HostError {
            errno: e.raw_os_error()?,
            origin: libc::SO_EE_ORIGIN_LOCAL,
            icmp_type: 0,
            icmp_code: 0,
            offender: None,
            quoted: [0; 8],
            quoted_len: 0,
        })
    }

    /// The ICMP error to send the guest, and where from, if this is one to pass on. `target` is
    /// the host socket's peer, `orig_dst` the destination as the guest addressed it, `gateway`
    /// the gateway's address (errors the host itself raises come from the gateway, as from a
    /// router).
    pub(crate) fn translate(
        &self,
        target: Ipv4Addr,
        orig_dst: Ipv4Addr,
        gateway: Ipv4Addr,
    ) -> Option<(IcmpError, Ipv4Addr)> {
        match self.origin {
            libc::SO_EE_ORIGIN_ICMP => {
                let kind = match (self.icmp_type, self.icmp_code) {
                    // Fragmentation needed: the host handles path MTU itself.
                    (3, 4) => return None,
                    (3, code) if code <= 15 => {
                        IcmpError::Unreachable(Icmpv4DstUnreachable::from(code))
                    }
                    (11, 0) => IcmpError::TtlExceeded,
                    _ => return None,
                };
                let from = match self.offender {
                    None => orig_dst,
                    Some(o) if o == target => orig_dst,
                    // The host's own stack answered for the loopback destination.
                    Some(o) if o.is_loopback() && target.is_loopback() => orig_dst,
                    Some(o) if o.is_loopback() || o.is_unspecified() => gateway,
                    Some(o) => o,
                };
                Some((kind, from))
            }
            libc::SO_EE_ORIGIN_LOCAL | libc::SO_EE_ORIGIN_NONE => {
                use Icmpv4DstUnreachable as U;
                let (reason, from) = match self.errno {
                    libc::ECONNREFUSED => (U::PortUnreachable, orig_dst),
                    libc::EHOSTUNREACH | libc::EHOSTDOWN => (U::HostUnreachable, gateway),
                    libc::ENETUNREACH | libc::ENETDOWN => (U::NetUnreachable, gateway),
                    libc::EACCES | libc::EPERM => (U::CommProhibited, gateway),
                    _ => return None,
                };
                Some((IcmpError::Unreachable(reason), from))
            }
            _ => None,
        }
    }
}

/// Dequeue one entry of the socket's error queue (`Ok(None)`: one without `IP_RECVERR` data).
/// `WouldBlock` when it is empty.
pub(crate) fn recv_error(fd: RawFd) -> io::Result<Option<HostError>> {
    use std::mem::{size_of, size_of_val, zeroed};
    let mut data = [0u8; 8];
    let mut control = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: plain C structs, all-zero is valid.
    let mut name: libc::sockaddr_in = unsafe { zeroed() };
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = (&raw mut name).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control) as _;
    // SAFETY: msg points at live buffers of the sizes given.
    let n = unsafe { libc::recvmsg(fd, &raw mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let quoted_len = usize::try_from(n).unwrap_or(0).min(data.len());
    let mut found = None;
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled in, bounded by
    // msg_controllen; every read is bounds-checked against cmsg_len and unaligned.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            let c = &*cmsg;
            if c.cmsg_level == libc::IPPROTO_IP && c.cmsg_type == libc::IP_RECVERR {
                let p = libc::CMSG_DATA(cmsg);
                let len = (c.cmsg_len as usize).saturating_sub(p as usize - cmsg as usize);
                let ee_len = size_of::<libc::sock_extended_err>();
                if len >= ee_len {
                    let ee: libc::sock_extended_err = std::ptr::read_unaligned(p.cast());
                    let mut offender = None;
                    if len >= ee_len + size_of::<libc::sockaddr_in>() {
                        let sa: libc::sockaddr_in = std::ptr::read_unaligned(p.add(ee_len).cast());
                        if libc::c_int::from(sa.sin_family) == libc::AF_INET {
                            offender = Some(Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)));
                        }
                    }
                    found = Some(HostError {
                        errno: ee.ee_errno as i32,
                        origin: ee.ee_origin,
                        icmp_type: ee.ee_type,
                        icmp_code: ee.ee_code,
                        offender,
                        quoted: data,
                        quoted_len,
                    });
                }
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const T: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
    const GW: Ipv4Addr = Ipv4Addr::new(192, 168, 5, 2);

    fn icmp(t: u8, c: u8, offender: Option<Ipv4Addr>) -> HostError {
        HostError {
            errno: libc::EHOSTUNREACH,
            origin: libc::SO_EE_ORIGIN_ICMP,
            icmp_type: t,
            icmp_code: c,
            offender,
            quoted: [0; 8],
            quoted_len: 0,
        }
    }

    #[test]
    fn icmp_errors_translate() {
        let router = Ipv4Addr::new(198, 51, 100, 1);
        let port = IcmpError::Unreachable(Icmpv4DstUnreachable::PortUnreachable);
        assert_eq!(icmp(3, 3, Some(T)).translate(T, T, GW), Some((port, T)));
        assert_eq!(
            icmp(11, 0, Some(router)).translate(T, T, GW),
            Some((IcmpError::TtlExceeded, router))
        );
        assert_eq!(
            icmp(3, 1, Some(router)).translate(T, T, GW),
            Some((
                IcmpError::Unreachable(Icmpv4DstUnreachable::HostUnreachable),
                router
            ))
        );
        assert_eq!(icmp(3, 3, None).translate(T, T, GW), Some((port, T)));
        // Fragmentation needed, reassembly timeout, parameter problem, redirects: not passed on.
        assert_eq!(icmp(3, 4, Some(router)).translate(T, T, GW), None);
        assert_eq!(icmp(11, 1, Some(router)).translate(T, T, GW), None);
        assert_eq!(icmp(12, 0, Some(router)).translate(T, T, GW), None);
        assert_eq!(icmp(5, 0, Some(router)).translate(T, T, GW), None);
        assert_eq!(icmp(3, 200, Some(router)).translate(T, T, GW), None);
    }

    #[test]
    fn loopback_errors_come_from_the_guests_destination() {
        let lo = Ipv4Addr::LOCALHOST;
        let port = IcmpError::Unreachable(Icmpv4DstUnreachable::PortUnreachable);
        // The host address maps to 127.0.0.1: the guest hears from the host address.
        assert_eq!(icmp(3, 3, Some(lo)).translate(lo, GW, GW), Some((port, GW)));
        // The host's stack reporting about a remote target: from the gateway.
        assert_eq!(
            icmp(3, 1, Some(lo)).translate(T, T, GW).map(|x| x.1),
            Some(GW)
        );
    }

    #[test]
    fn errnos_translate() {
        use Icmpv4DstUnreachable as U;
        let e = |n| {
            HostError::local(&io::Error::from_raw_os_error(n))
                .unwrap()
                .translate(T, T, GW)
        };
        assert_eq!(
            e(libc::ECONNREFUSED),
            Some((IcmpError::Unreachable(U::PortUnreachable), T))
        );
        assert_eq!(
            e(libc::ENETUNREACH),
            Some((IcmpError::Unreachable(U::NetUnreachable), GW))
        );
        assert_eq!(
            e(libc::EHOSTUNREACH),
            Some((IcmpError::Unreachable(U::HostUnreachable), GW))
        );
        assert_eq!(
            e(libc::EPERM),
            Some((IcmpError::Unreachable(U::CommProhibited), GW))
        );
        assert_eq!(e(libc::ENOBUFS), None);
        assert_eq!(e(libc::EMSGSIZE), None);
        assert!(HostError::local(&io::Error::other("x")).is_none());
    }

    #[test]
    fn udp_head_quotes_ports_and_length() {
        let s = SocketAddrV4::new(Ipv4Addr::new(192, 168, 5, 15), 4000);
        let d = SocketAddrV4::new(T, 53);
        assert_eq!(udp_head(s, d, 10), [0x0f, 0xa0, 0, 53, 0, 18, 0, 0]);
    }

    #[tokio::test]
    async fn error_queue_reports_port_unreachable_from_loopback() {
        // A closed port on 127.0.0.1: the discard port, which no test binds (a port picked
        // free and let go could be another test process's by now).
        let port = 9;
        let sock =
            Socket::new(Domain::IPV4, Type::DGRAM.nonblocking(), Some(Protocol::UDP)).unwrap();
        set_recverr(sock.as_raw_fd()).unwrap();
        sock.connect(&SocketAddr::from(([127, 0, 0, 1], port)).into())
            .unwrap();
        sock.send(b"x").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let e = loop {
            match recv_error(sock.as_raw_fd()) {
                Ok(e) => break e.unwrap(),
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => panic!("no error queued: {e}"),
            }
        };
        assert_eq!(
            (e.origin, e.icmp_type, e.icmp_code),
            (libc::SO_EE_ORIGIN_ICMP, 3, 3)
        );
        assert_eq!(e.errno, libc::ECONNREFUSED);
        assert_eq!(e.offender, Some(Ipv4Addr::LOCALHOST));
        // Reading the queue cleared the pending error: the next send goes out.
        sock.send(b"y").unwrap();
    }
}
