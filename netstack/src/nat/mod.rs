//! The NAT: carries the guests' routed TCP, UDP and ICMP out through ordinary host sockets and
//! the answers back, as a router would. Refused is refused (RST, ICMP unreachable), silence is
//! silence, and a guest only hears an answer that the real destination gave.
//!
//! Every flow is its own tokio task with its own host socket; the tables here only map a flow
//! key to the task's inbox, so the cost of a packet does not grow with the number of flows.
//! Frames towards guests leave through the [`Uplink`]. Needs a tokio runtime.

mod forward;
mod hostsock;
mod icmp;
mod inbox;
mod tcp;
mod udp;
mod uplink;
mod workers;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use crate::{MacAddr, Routed};
pub use udp::{flush_sends as flush_udp_sends, gather_sends as gather_udp_sends};
pub use uplink::FrameSink;
use uplink::Uplink;
pub use workers::{Task, Workers};

/// The most guest addresses the NAT remembers the MACs of.
const MAX_NEIGHBORS: usize = 4096;

/// How the NAT behaves.
#[derive(Debug, Clone)]
pub struct NatConfig {
    /// The gateway's MAC (source of every frame to guests).
    pub gateway_mac: MacAddr,
    /// The link MTU (IP packets to guests are fragmented or segmented to fit).
    pub mtu: u16,
    /// The subnet's network address and prefix.
    pub network: Ipv4Addr,
    /// The subnet's prefix length.
    pub prefix: u8,
    /// The host address: traffic to it goes to the host's 127.0.0.1.
    pub host_ip: Ipv4Addr,
    /// Whether the host address reaches the host's loopback (`false`: refused).
    pub host_loopback: bool,
    /// More addresses that stand for the host's loopback, like the host address.
    pub host_aliases: Vec<Ipv4Addr>,
    /// The DNS address: served locally, never NATed.
    pub dns_ip: Ipv4Addr,
    /// Bind outgoing sockets to this address (`--outbound-addr`).
    pub outbound_addr: Option<Ipv4Addr>,
    /// How long a host-side TCP connect may take before the guest gets a RST.
    pub tcp_connect_timeout: Duration,
    /// TCP connections in the connecting state at most; more are refused.
    pub max_tcp_connecting: usize,
    /// Established TCP connections at most; more are refused.
    pub max_tcp_established: usize,
    /// The guest-side TCP buffer size, each direction (sets the advertised window).
    pub tcp_buffer: usize,
    /// A UDP flow with no traffic either way for this long is closed.
    pub udp_timeout: Duration,
    /// Where TCP to the DNS address port 53 goes (the DNS server's TCP listener); refused
    /// when `None`.
    pub dns_tcp: Option<SocketAddrV4>,
    /// Which guests take TCP segments larger than the MTU (their port segments them, like a
    /// tap with segmentation offload): their connections send segments of up to 64 KiB, and
    /// their TCP and UDP frames leave checksums partial (the port completes them or its
    /// guest's kernel takes them so). `None`: every segment fits the MTU, every frame whole.
    pub large_segments: Option<LargeSegments>,
}

/// Answers whether frames to a guest MAC may carry TCP segments of up to 64 KiB (and several
/// UDP datagrams in one frame).
#[derive(Clone)]
pub struct LargeSegments(pub Arc<dyn Fn(MacAddr) -> bool + Send + Sync>);

impl std::fmt::Debug for LargeSegments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LargeSegments(..)")
    }
}

impl NatConfig {
    /// A configuration for the given link with the documented defaults.
    pub fn new(
        gateway_mac: MacAddr,
        mtu: u16,
        network: Ipv4Addr,
        prefix: u8,
        host_ip: Ipv4Addr,
        dns_ip: Ipv4Addr,
    ) -> Self {
        NatConfig {
            gateway_mac,
            mtu,
            network,
            prefix,
            host_ip,
            host_loopback: true,
            host_aliases: Vec::new(),
            dns_ip,
            outbound_addr: None,
            tcp_connect_timeout: Duration::from_secs(30),
            max_tcp_connecting: 1024,
            max_tcp_established: 65536,
            tcp_buffer: 512 * 1024,
            udp_timeout: Duration::from_secs(180),
            dns_tcp: None,
            large_segments: None,
        }
    }
}

/// Where a guest's destination is on the host side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// Connect to this address.
    Host(Ipv4Addr),
    /// Refuse (RST / ICMP port unreachable), as a host with nothing there would.
    Refuse,
}

/// Counters of one protocol, updated by every flow of it.
#[derive(Debug, Default)]
pub struct FlowCounters {
    /// Flows open right now.
    pub open: AtomicU64,
    /// TCP: connects in flight right now.
    pub connecting: AtomicU64,
    /// Flows opened so far.
    pub opened: AtomicU64,
    /// Flows closed so far.
    pub closed: AtomicU64,
    /// Flows refused (host refused, timed out, limits, no host loopback).
    pub refused: AtomicU64,
    /// Payload bytes carried to guests.
    pub bytes_to_guest: AtomicU64,
    /// Payload bytes carried from guests.
    pub bytes_from_guest: AtomicU64,
    /// Packets dropped: malformed (bad checksum, truncated).
    pub drop_malformed: AtomicU64,
    /// Packets dropped: a flow's inbox was full.
    pub drop_queue_full: AtomicU64,
    /// Packets dropped: the host socket failed to send.
    pub drop_send_failed: AtomicU64,
    /// Packets dropped: limits reached.
    pub drop_limit: AtomicU64,
    /// TCP: idle connections' buffers returned to the kernel.
    pub buffers_released: AtomicU64,
    /// TCP: bulk connections moved to another worker thread ([`Nat::add_workers`]).
    pub moved: AtomicU64,
    /// UDP: datagrams that went to a guest gathered with others in one frame (UDP
    /// segmentation offload).
    pub gathered_to_guest: AtomicU64,
    /// UDP: datagrams from a guest sent out with others in one call (UDP segmentation
    /// offload).
    pub gathered_from_guest: AtomicU64,
}

/// One count of a gauge of [`FlowCounters`] (`open`, `connecting`), given back when dropped:
/// also when the task holding it is cancelled (a tap port's runtime ends with the port, and
/// with it the connections it opened), so the limits that read the gauges never drift.
pub(crate) struct Held<'a> {
    gauge: &'a AtomicU64,
    /// Counted up when the count is given back (`closed` for `open`).
    then: Option<&'a AtomicU64>,
}

impl<'a> Held<'a> {
    /// Take over a count already made in `gauge`.
    pub(crate) fn taken(gauge: &'a AtomicU64) -> Held<'a> {
        Held { gauge, then: None }
    }

    /// Take over a count already made in `open`; `closed` counts one more when it is given
    /// back.
    pub(crate) fn open(open: &'a AtomicU64, closed: &'a AtomicU64) -> Held<'a> {
        Held {
            gauge: open,
            then: Some(closed),
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        FlowCounters::dec(self.gauge);
        if let Some(then) = self.then {
            FlowCounters::inc(then);
        }
    }
}

/// A snapshot of [`FlowCounters`].
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FlowStats {
    /// Flows open right now.
    pub open: u64,
    /// TCP: connects in flight right now.
    pub connecting: u64,
    /// Flows opened so far.
    pub opened: u64,
    /// Flows closed so far.
    pub closed: u64,
    /// Flows refused.
    pub refused: u64,
    /// Payload bytes carried to guests.
    pub bytes_to_guest: u64,
    /// Payload bytes carried from guests.
    pub bytes_from_guest: u64,
    /// Packets dropped: malformed.
    pub drop_malformed: u64,
    /// Packets dropped: a flow's inbox was full.
    pub drop_queue_full: u64,
    /// Packets dropped: the host socket failed to send.
    pub drop_send_failed: u64,
    /// Packets dropped: limits reached.
    pub drop_limit: u64,
    /// TCP: idle connections' buffers returned to the kernel.
    pub buffers_released: u64,
    /// TCP: bulk connections moved to another worker thread.
    pub moved: u64,
    /// UDP: datagrams that went to a guest gathered with others in one frame.
    pub gathered_to_guest: u64,
    /// UDP: datagrams from a guest sent out with others in one call.
    pub gathered_from_guest: u64,
}

impl FlowCounters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn dec(c: &AtomicU64) {
        c.fetch_sub(1, Ordering::Relaxed);
    }
    fn snapshot(&self) -> FlowStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FlowStats {
            open: g(&self.open),
            connecting: g(&self.connecting),
            opened: g(&self.opened),
            closed: g(&self.closed),
            refused: g(&self.refused),
            bytes_to_guest: g(&self.bytes_to_guest),
            bytes_from_guest: g(&self.bytes_from_guest),
            drop_malformed: g(&self.drop_malformed),
            drop_queue_full: g(&self.drop_queue_full),
            drop_send_failed: g(&self.drop_send_failed),
            drop_limit: g(&self.drop_limit),
            buffers_released: g(&self.buffers_released),
            moved: g(&self.moved),
            gathered_to_guest: g(&self.gathered_to_guest),
            gathered_from_guest: g(&self.gathered_from_guest),
        }
    }
}

/// ICMP counters.
#[derive(Debug, Default)]
pub struct IcmpCounters {
    /// Echo requests from guests sent out.
    pub echo_requests: AtomicU64,
    /// Echo replies from destinations delivered to guests.
    pub echo_replies: AtomicU64,
    /// ICMP errors (unreachable, TTL exceeded) delivered to guests.
    pub errors_to_guest: AtomicU64,
    /// Echo requests dropped: no ping socket and no raw socket could be opened.
    pub drop_no_socket: AtomicU64,
    /// ICMP messages from guests that are not echo requests (not forwarded).
    pub drop_unsupported: AtomicU64,
    /// Echo requests to refused destinations (not answered).
    pub refused: AtomicU64,
    /// Echo requests dropped: limits reached (ping flows, a flow's queue, descriptors).
    pub drop_limit: AtomicU64,
    /// Echo requests dropped: the host socket failed to send.
    pub drop_send_failed: AtomicU64,
}

/// A snapshot of [`IcmpCounters`].
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IcmpStats {
    /// Echo requests sent out.
    pub echo_requests: u64,
    /// Echo replies delivered.
    pub echo_replies: u64,
    /// ICMP errors delivered to guests.
    pub errors_to_guest: u64,
    /// Echo requests dropped for want of a socket.
    pub drop_no_socket: u64,
    /// Unsupported ICMP messages from guests.
    pub drop_unsupported: u64,
    /// Echo requests to refused destinations.
    pub refused: u64,
    /// Echo requests dropped: limits reached.
    pub drop_limit: u64,
    /// Echo requests dropped: the host socket failed to send.
    pub drop_send_failed: u64,
}

/// What the NAT has done, per protocol.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NatStats {
    /// TCP.
    pub tcp: FlowStats,
    /// UDP.
    pub udp: FlowStats,
    /// ICMP.
    pub icmp: IcmpStats,
}

pub(crate) struct Shared {
    pub(crate) config: NatConfig,
    pub(crate) uplink: Uplink,
    pub(crate) tcp_counters: FlowCounters,
    pub(crate) udp_counters: FlowCounters,
    pub(crate) icmp_counters: IcmpCounters,
    pub(crate) tcp_flows: Mutex<HashMap<tcp::Key, (u64, inbox::Sender)>>,
    pub(crate) udp_flows: Mutex<HashMap<udp::Key, udp::FlowHandle>>,
    pub(crate) icmp: icmp::Pinger,
    /// Forwarded UDP flows: the guest-side key -> the host client and its forward's inbox.
    pub(crate) udp_inbound: Mutex<HashMap<udp::Key, InboundUdp>>,
    /// Which MAC each guest address was last seen at.
    pub(crate) neighbors: Mutex<HashMap<Ipv4Addr, MacAddr>>,
    /// Threads bulk TCP connections may move to.
    pub(crate) workers: workers::Slot,
}

/// A forwarded UDP flow's way back to its host client.
pub(crate) type InboundUdp = (SocketAddr, tokio::sync::mpsc::Sender<(SocketAddr, Bytes)>);

impl Shared {
    /// Where `dst` (a guest's destination) is on the host side.
    pub(crate) fn target(&self, dst: Ipv4Addr) -> Target {
        let c = &self.config;
        if dst == c.host_ip || c.host_aliases.contains(&dst) {
            return if c.host_loopback {
                Target::Host(Ipv4Addr::LOCALHOST)
            } else {
                Target::Refuse
            };
        }
        // The host's loopback is reachable only through the host address (and not at all with
        // `host_loopback` off); 0.0.0.0/8 means "this host" too.
        if dst == c.dns_ip
            || dst.is_loopback()
            || dst.octets()[0] == 0
            || dst.is_broadcast()
            || dst.is_multicast()
        {
            return Target::Refuse;
        }
        Target::Host(dst)
    }

    /// Where a TCP connection to `dst` goes: the DNS address's port 53 is the local DNS
    /// server, everything else as [`Shared::target`].
    pub(crate) fn tcp_target(&self, dst: SocketAddrV4) -> Option<SocketAddrV4> {
        if *dst.ip() == self.config.dns_ip && dst.port() == 53 {
            return self.config.dns_tcp;
        }
        match self.target(*dst.ip()) {
            Target::Host(ip) => Some(SocketAddrV4::new(ip, dst.port())),
            Target::Refuse => None,
        }
    }

    /// The MAC a guest address was last seen at.
    pub(crate) fn neighbor(&self, ip: Ipv4Addr) -> Option<MacAddr> {
        self.neighbors.lock().unwrap().get(&ip).copied()
    }

    /// Remember that the guest address `ip` lives at `mac`. When 4096 are known, an address
    /// outside the subnet is not learned, and one of the subnet takes the place of one other
    /// (one outside the subnet if there is one): a guest spraying source addresses churns
    /// one entry at a time, not the table, and from outside the subnet none of the guests'.
    fn learn(&self, ip: Ipv4Addr, mac: MacAddr) {
        let mask = crate::gateway::subnet_mask(self.config.prefix);
        let net = u32::from(self.config.network) & mask;
        let in_subnet = |ip: Ipv4Addr| u32::from(ip) & mask == net;
        let mut n = self.neighbors.lock().unwrap();
        if n.get(&ip) != Some(&mac) {
            if n.len() >= MAX_NEIGHBORS && !n.contains_key(&ip) {
                if !in_subnet(ip) {
                    return;
                }
                let other = n
                    .keys()
                    .find(|k| !in_subnet(**k))
                    .or_else(|| n.keys().next());
                if let Some(other) = other.copied() {
                    n.remove(&other);
                }
            }
            n.insert(ip, mac);
        }
    }

    /// The local address to bind outgoing sockets to, if any.
    /// Does the guest at `mac` sit behind a port with offload ([`NatConfig::large_segments`])?
    /// It then takes TCP segments of up to 64 KiB and TCP and UDP checksums left partial.
    pub(crate) fn offload_guest(&self, mac: MacAddr) -> bool {
        (self.config.large_segments.as_ref()).is_some_and(|f| (f.0)(mac))
    }

    pub(crate) fn bind_addr(&self, target: Ipv4Addr) -> Option<SocketAddr> {
        match self.config.outbound_addr {
            Some(a) if !target.is_loopback() => Some(SocketAddr::V4(SocketAddrV4::new(a, 0))),
            _ => None,
        }
    }
}

/// The NAT. Cheap to clone; all clones share the flow tables.
#[derive(Clone)]
pub struct Nat {
    shared: Arc<Shared>,
}

impl Nat {
    /// A NAT sending its frames to `sink`.
    pub fn new(config: NatConfig, sink: FrameSink) -> Nat {
        let uplink = Uplink::new(sink, config.gateway_mac, config.mtu);
        Nat {
            shared: Arc::new(Shared {
                icmp: icmp::Pinger::new(),
                config,
                uplink,
                tcp_counters: FlowCounters::default(),
                udp_counters: FlowCounters::default(),
                icmp_counters: IcmpCounters::default(),
                tcp_flows: Mutex::new(HashMap::new()),
                udp_flows: Mutex::new(HashMap::new()),
                udp_inbound: Mutex::new(HashMap::new()),
                neighbors: Mutex::new(HashMap::new()),
                workers: workers::Slot::default(),
            }),
        }
    }

    /// Threads of one port that its guest's connection tasks run on (a multi-queue tap):
    /// a connection that turns out to carry bulk data moves to the one with the fewest such
    /// (see `workers.rs`). Connections start on the thread that read their SYN. Workers
    /// added by a second port turn moving off.
    pub fn add_workers(&self, workers: std::sync::Arc<dyn Workers>) {
        workers::add(&self.shared.workers, workers);
    }

    /// Route a guest's TCP segment (the whole, unfragmented IPv4 packet that the gateway
    /// routes, see [`crate::GatewayConfig::routed_tcp_len`]) without copying it. `partial`:
    /// its checksum is left partial by the guest's kernel (see [`crate::offload::Partial`]),
    /// nothing to verify. Must be called inside a tokio runtime.
    pub fn route_tcp(&self, src_mac: MacAddr, packet: Bytes, partial: bool) {
        tcp::route(&self.shared, src_mac, packet, partial);
    }

    /// Route a guest's UDP datagram (one the gateway routes, see
    /// [`crate::GatewayConfig::routed_udp`]) without copying it; straight out of its flow's
    /// host socket when it can. Must be called inside a tokio runtime.
    pub fn route_udp(
        &self,
        src_mac: MacAddr,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        ttl: u8,
        payload: Bytes,
    ) {
        udp::route_fast(&self.shared, src_mac, src, dst, ttl, payload);
    }

    /// Route one packet from a guest. Must be called inside a tokio runtime.
    pub fn route(&self, packet: Routed) {
        // (TCP learns the guest's MAC in tcp::route, for segments of no connection.)
        match &packet {
            Routed::Tcp { .. } => {}
            Routed::Udp { src_mac, src, .. } => self.shared.learn(*src.ip(), *src_mac),
            Routed::Icmp { src_mac, src, .. } => self.shared.learn(*src, *src_mac),
        }
        match packet {
            Routed::Tcp { src_mac, packet } => {
                tcp::route(&self.shared, src_mac, Bytes::from(packet), false)
            }
            Routed::Udp {
                src_mac,
                src,
                dst,
                ttl,
                payload,
            } => udp::route(&self.shared, src_mac, src, dst, ttl, Bytes::from(payload)),
            Routed::Icmp {
                src_mac,
                src,
                dst,
                ttl,
                message,
            } => icmp::route(&self.shared, src_mac, src, dst, ttl, Bytes::from(message)),
        }
    }

    /// Remember that guest `ip` is at `mac` (from ARP, DHCP, routed packets); forwarded
    /// connections into the guest need it.
    pub fn learn_neighbor(&self, ip: Ipv4Addr, mac: MacAddr) {
        self.shared.learn(ip, mac);
    }

    /// The MAC guest `ip` was last seen at.
    pub fn neighbor(&self, ip: Ipv4Addr) -> Option<MacAddr> {
        self.shared.neighbor(ip)
    }

    /// Carry an accepted host TCP connection into the guest at `guest` (port forwarding).
    /// Returns the stream back when the guest's MAC is not known yet.
    pub fn forward_tcp(
        &self,
        stream: tokio::net::TcpStream,
        guest: SocketAddrV4,
    ) -> Result<(), tokio::net::TcpStream> {
        let _ = stream.set_nodelay(true);
        match self.shared.neighbor(*guest.ip()) {
            Some(mac) => {
                tcp::forward_in(&self.shared, stream, guest, mac);
                Ok(())
            }
            None => Err(stream),
        }
    }

    /// Carry an accepted host unix-socket connection into the guest's TCP port `guest`
    /// (gvproxy's unix forwards). Returns the stream back when the guest's MAC is unknown.
    pub fn forward_unix(
        &self,
        stream: tokio::net::UnixStream,
        guest: SocketAddrV4,
    ) -> Result<(), tokio::net::UnixStream> {
        match self.shared.neighbor(*guest.ip()) {
            Some(mac) => {
                tcp::forward_in(&self.shared, stream, guest, mac);
                Ok(())
            }
            None => Err(stream),
        }
    }

    /// Does the guest at `guest` accept TCP connections there (Lima's wait_port)? Connects
    /// from the gateway and resets once established; false on refusal, an unknown guest, or
    /// when `timeout` runs out.
    pub async fn probe_tcp(&self, guest: SocketAddrV4, timeout: Duration) -> bool {
        match self.shared.neighbor(*guest.ip()) {
            Some(mac) => tcp::probe(&self.shared, guest, mac, timeout).await,
            None => false,
        }
    }

    /// Serve a bound host UDP socket as a forward into `guest` until the socket fails, or
    /// until the future is dropped (which closes the socket and forgets the forward's flows).
    pub async fn forward_udp(&self, socket: tokio::net::UdpSocket, guest: SocketAddrV4) {
        forward::serve_udp(Arc::clone(&self.shared), socket, guest).await
    }

    /// Send a UDP datagram from a local service (e.g. DNS at the DNS address) to a guest,
    /// fragmented if it is over the MTU.
    pub fn send_udp(
        &self,
        guest_mac: MacAddr,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        payload: &[u8],
    ) {
        self.shared.uplink.send_udp(guest_mac, src, dst, payload);
    }

    /// What the NAT has done so far.
    pub fn stats(&self) -> NatStats {
        let s = &self.shared;
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let i = &s.icmp_counters;
        NatStats {
            tcp: s.tcp_counters.snapshot(),
            udp: s.udp_counters.snapshot(),
            icmp: IcmpStats {
                echo_requests: g(&i.echo_requests),
                echo_replies: g(&i.echo_replies),
                errors_to_guest: g(&i.errors_to_guest),
                drop_no_socket: g(&i.drop_no_socket),
                drop_unsupported: g(&i.drop_unsupported),
                refused: g(&i.refused),
                drop_limit: g(&i.drop_limit),
                drop_send_failed: g(&i.drop_send_failed),
            },
        }
    }
}
