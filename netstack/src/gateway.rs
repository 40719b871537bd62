//! The gateway: the one station on the virtual link that is not a guest. It takes each frame
//! the switch hands it, parses and checks it once, answers ARP for its addresses and ping for
//! the DNS address, hands UDP for local services (DHCP broadcasts, anything to the DNS
//! address) to the caller as [`UdpDatagram`]s, and hands every packet to be routed (off-subnet,
//! or to the host address) to the caller as [`Routed`], for the NAT. It opens no sockets.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Instant;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, EthernetFrame, EthernetProtocol, IpAddress, IpProtocol, Ipv4Packet, UdpPacket,
    UdpRepr,
};

use crate::counters::Counters;
use crate::frame::{build_udp_frame, L2Dest};
use crate::ipv4frag::{FragCounters, Reassembly, ReassemblyConfig, SharedReassembler};
use crate::neighbor::Neighbors;
use crate::{arp, icmp, MacAddr};

/// The DHCP server port: broadcasts to it are local whatever their destination address.
const DHCP_SERVER_PORT: u16 = 67;

/// What the gateway is: its MAC, its addresses, the subnet it serves.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The gateway's MAC address.
    pub mac: MacAddr,
    /// The host address: the guests' router, and the host's loopback behind it.
    pub host_ip: Ipv4Addr,
    /// The DNS address: local services only.
    pub dns_ip: Ipv4Addr,
    /// More on-link addresses that stand for the host's loopback (gvproxy's .254).
    pub host_aliases: Vec<Ipv4Addr>,
    /// Answer ping to the host address here instead of routing it to the host's loopback
    /// (when the host loopback is not reachable, `--no-host-loopback`).
    pub answer_host_ping: bool,
    /// The network address of the subnet.
    pub network: Ipv4Addr,
    /// The subnet's prefix length.
    pub prefix: u8,
    /// The link MTU: an answer longer goes out in fragments.
    pub mtu: u16,
}

/// The netmask of a prefix length (as a number; 0 for /0).
pub(crate) fn subnet_mask(prefix: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0)
}

impl GatewayConfig {
    fn mask(&self) -> u32 {
        subnet_mask(self.prefix)
    }

    fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !self.mask())
    }

    fn on_link(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network)
    }

    fn owns(&self, ip: Ipv4Addr) -> bool {
        ip == self.host_ip || ip == self.dns_ip || self.host_aliases.contains(&ip)
    }

    /// A source no guest may use: ours, multicast, broadcast, loopback.
    fn bad_source(&self, src: Ipv4Addr) -> bool {
        self.owns(src) || src.is_multicast() || src.is_broadcast() || src.is_loopback()
    }

    /// An on-link destination other than ours: switched, never routed through the gateway.
    fn switched(&self, dst: Ipv4Addr) -> bool {
        dst != self.dns_ip && !self.owns(dst) && self.on_link(dst)
    }

    /// UDP to `dst:port` is for a local service (the DNS server). When the DNS address is the
    /// host address too (Lima's user-v2 plan), only port 53 is; the host address's other
    /// ports are the host's loopback.
    fn local_udp(&self, dst: Ipv4Addr, port: u16) -> bool {
        dst == self.dns_ip && (self.dns_ip != self.host_ip || port == 53)
    }

    /// The length of the IPv4 packet at the start of `ip` when [`Gateway::receive`] would
    /// route it to the NAT as TCP without anything else to do (a valid, unfragmented header
    /// from a guest address, to a routed destination); None otherwise. Lets a caller take
    /// that path without the gateway's state: the fast path of the daemon's switch.
    pub fn routed_tcp_len(&self, ip: &[u8]) -> Option<usize> {
        let (total, _) = self.routed_ipv4(ip, 6)?;
        Some(total)
    }

    /// The guest's UDP datagram in the IPv4 packet at the start of `ip` when
    /// [`Gateway::receive`] would route it to the NAT without anything else to do (as
    /// [`GatewayConfig::routed_tcp_len`], with a valid UDP header and checksum, for no local
    /// service, with TTL left): source, destination, TTL and where the payload is in `ip`.
    /// `partial`: the checksum is left partial by a local stack (see
    /// [`crate::offload::Partial`]), not verified.
    pub fn routed_udp(
        &self,
        ip: &[u8],
        partial: bool,
    ) -> Option<(SocketAddrV4, SocketAddrV4, u8, std::ops::Range<usize>)> {
        let (total, ihl) = self.routed_ipv4(ip, 17)?;
        let udp = UdpPacket::new_checked(&ip[ihl..total]).ok()?;
        let (src, dst) = (
            Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
            Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        );
        if !partial && !udp.verify_checksum(&IpAddress::Ipv4(src), &IpAddress::Ipv4(dst)) {
            return None;
        }
        let (sport, dport) = (udp.src_port(), udp.dst_port());
        let ttl = ip[8];
        if self.local_udp(dst, dport) || ttl <= 1 {
            return None;
        }
        let start = ihl + 8;
        let end = ihl + usize::from(udp.len());
        Some((
            SocketAddrV4::new(src, sport),
            SocketAddrV4::new(dst, dport),
            ttl,
            start..end,
        ))
    }

    /// (total length, header length) of an IPv4 packet of `protocol` that the gateway routes
    /// with nothing else to do.
    fn routed_ipv4(&self, ip: &[u8], protocol: u8) -> Option<(usize, usize)> {
        let ihl = usize::from(*ip.first()? & 0x0f) * 4;
        if ip[0] >> 4 != 4 || ihl < 20 || ip.len() < ihl || ip[9] != protocol {
            return None;
        }
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
        if total < ihl + 8 || total > ip.len() || fragment {
            return None;
        }
        if crate::offload::ones_sum(&ip[..ihl]) != 0xffff {
            return None;
        }
        let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
        let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        let not_routed = dst.is_broadcast()
            || dst == self.broadcast()
            || dst.is_multicast()
            || self.switched(dst);
        (!self.bad_source(src) && !not_routed).then_some((total, ihl))
    }
}

/// A UDP datagram for a local service, with where it came from on the link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpDatagram {
    /// The sender's MAC (a DHCP client has no address yet: reply by MAC).
    pub src_mac: MacAddr,
    /// Source address and port.
    pub src: SocketAddrV4,
    /// Destination address and port (one of the gateway's, or a broadcast).
    pub dst: SocketAddrV4,
    /// The UDP payload.
    pub payload: Vec<u8>,
}

/// A checked IPv4 packet from a guest that the gateway routes (to the NAT).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routed {
    /// A TCP segment: the whole IPv4 packet (header checked; the TCP checksum is the
    /// receiver's to check).
    Tcp {
        /// The guest's MAC.
        src_mac: MacAddr,
        /// The IPv4 packet.
        packet: Vec<u8>,
    },
    /// A UDP datagram (checksum checked, reassembled if it came in fragments).
    Udp {
        /// The guest's MAC.
        src_mac: MacAddr,
        /// Source address and port.
        src: SocketAddrV4,
        /// Destination address and port.
        dst: SocketAddrV4,
        /// The guest's TTL.
        ttl: u8,
        /// The UDP payload.
        payload: Vec<u8>,
    },
    /// An ICMP message (checksum checked).
    Icmp {
        /// The guest's MAC.
        src_mac: MacAddr,
        /// Source address.
        src: Ipv4Addr,
        /// Destination address.
        dst: Ipv4Addr,
        /// The guest's TTL.
        ttl: u8,
        /// The ICMP message (header and data).
        message: Vec<u8>,
    },
}

/// What to do after a frame was received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send this frame to the switch from the gateway's port.
    Frame(Vec<u8>),
    /// A datagram for a local service (DHCP, DNS).
    Udp(UdpDatagram),
    /// A packet to route out (NAT).
    Route(Routed),
    /// A guest address was seen at a MAC for the first time (or at a new MAC).
    Neighbor {
        /// The guest's address.
        ip: Ipv4Addr,
        /// Its MAC.
        mac: MacAddr,
    },
}

/// The gateway state machine (see the module docs).
#[derive(Debug)]
pub struct Gateway {
    config: GatewayConfig,
    neighbors: Neighbors,
    /// Shared with whoever reassembles on other threads ([`Gateway::reassembler`]).
    reassembler: SharedReassembler,
    counters: Counters,
}

impl Gateway {
    /// A gateway with `config`.
    pub fn new(config: GatewayConfig) -> Gateway {
        Gateway {
            config,
            neighbors: Neighbors::default(),
            reassembler: SharedReassembler::new(ReassemblyConfig::default()),
            counters: Counters::default(),
        }
    }

    /// The gateway's MAC address.
    pub fn mac(&self) -> MacAddr {
        self.config.mac
    }

    /// What has been counted so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// What IPv4 reassembly has counted so far (here and through [`Gateway::reassembler`]).
    pub fn fragment_counters(&self) -> FragCounters {
        self.reassembler.counters()
    }

    /// The gateway's reassembler, for a caller that reassembles a guest's fragments on the
    /// thread that received them (a fast path: the whole datagram then goes on from there, in
    /// order with what the guest sent after it). One reassembler, so one memory bound and one
    /// count; [`Gateway::expire`] expires what is held there too.
    pub fn reassembler(&self) -> SharedReassembler {
        self.reassembler.clone()
    }

    /// Forget incomplete datagrams past their time; call about once a second.
    pub fn expire(&mut self, now: Instant) {
        self.reassembler.expire(now);
    }

    /// The MAC a guest address was last seen at.
    pub fn neighbor(&self, ip: Ipv4Addr, now: Instant) -> Option<MacAddr> {
        self.neighbors.lookup(ip, now)
    }

    /// Build a UDP frame from a local service to a guest (counted as sent).
    pub fn udp_frame(
        &mut self,
        to: L2Dest,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        payload: &[u8],
    ) -> Vec<u8> {
        self.counters.frames_out += 1;
        build_udp_frame(self.config.mac, to, src, dst, payload)
    }

    /// Handle one frame from the link; results are appended to `out`.
    pub fn receive(&mut self, frame: &[u8], now: Instant, out: &mut Vec<Output>) {
        self.counters.frames_in += 1;
        let before = out.len();
        self.dispatch(frame, now, out);
        self.counters.frames_out += out[before..]
            .iter()
            .filter(|o| matches!(o, Output::Frame(_)))
            .count() as u64;
    }

    fn dispatch(&mut self, frame: &[u8], now: Instant, out: &mut Vec<Output>) {
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            self.counters.drop_malformed_ethernet += 1;
            return;
        };
        let src_mac = eth.src_addr().0;
        if src_mac[0] & 1 == 1 || src_mac == self.config.mac {
            self.counters.drop_bad_source += 1;
            return;
        }
        match eth.ethertype() {
            EthernetProtocol::Arp => self.on_arp(eth.payload(), now, out),
            EthernetProtocol::Ipv4 => self.on_ipv4(src_mac, eth.payload(), now, out),
            _ => self.counters.drop_unsupported_ethertype += 1,
        }
    }

    fn on_arp(&mut self, payload: &[u8], now: Instant, out: &mut Vec<Output>) {
        let Some(req) = arp::parse(payload) else {
            self.counters.drop_malformed_arp += 1;
            return;
        };
        if self.config.owns(req.sender_ip) {
            // Someone claims one of our addresses: do not learn it, do not answer it.
            self.counters.drop_bad_source += 1;
            return;
        }
        if self.neighbors.learn(req.sender_ip, req.sender_mac, now) {
            out.push(Output::Neighbor {
                ip: req.sender_ip,
                mac: req.sender_mac,
            });
        }
        if req.op == ArpOperation::Request && self.config.owns(req.target_ip) {
            self.counters.arp_replies += 1;
            out.push(Output::Frame(arp::reply(&req, self.config.mac)));
        }
    }

    fn on_ipv4(&mut self, src_mac: MacAddr, payload: &[u8], now: Instant, out: &mut Vec<Output>) {
        let Ok(ip) = Ipv4Packet::new_checked(payload) else {
            self.counters.drop_malformed_ipv4 += 1;
            return;
        };
        if ip.version() != 4 {
            self.counters.drop_malformed_ipv4 += 1;
            return;
        }
        if !ip.verify_checksum() {
            self.counters.drop_bad_ipv4_checksum += 1;
            return;
        }
        if ip.more_frags() || ip.frag_offset() != 0 {
            match self.reassembler.push(payload, now) {
                Reassembly::Complete(whole) => self.on_ipv4(src_mac, &whole, now, out),
                Reassembly::Pending | Reassembly::NotFragment => {}
                Reassembly::Dropped(_) => self.counters.drop_fragment += 1,
            }
            return;
        }
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        if self.config.bad_source(src) {
            self.counters.drop_bad_source += 1;
            return;
        }
        if self.neighbors.learn(src, src_mac, now) {
            out.push(Output::Neighbor {
                ip: src,
                mac: src_mac,
            });
        }
        let broadcast = dst.is_broadcast() || dst == self.config.broadcast();
        if broadcast || dst.is_multicast() {
            // Only DHCP is served to broadcasts; multicast is not routed.
            if ip.next_header() == IpProtocol::Udp {
                self.on_udp(src_mac, &ip, out);
            }
            return;
        }
        if self.config.switched(dst) {
            self.counters.drop_no_route += 1;
            return;
        }
        match ip.next_header() {
            IpProtocol::Udp => self.on_udp(src_mac, &ip, out),
            IpProtocol::Icmp => self.on_icmp(src_mac, &ip, out),
            IpProtocol::Tcp => {
                self.counters.routed += 1;
                let len = usize::from(ip.total_len());
                out.push(Output::Route(Routed::Tcp {
                    src_mac,
                    packet: payload[..len].to_vec(),
                }));
            }
            _ => self.counters.drop_unsupported_protocol += 1,
        }
    }

    fn on_udp(&mut self, src_mac: MacAddr, ip: &Ipv4Packet<&[u8]>, out: &mut Vec<Output>) {
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        let Ok(udp) = UdpPacket::new_checked(ip.payload()) else {
            self.counters.drop_malformed_udp += 1;
            return;
        };
        let (s, d) = (IpAddress::Ipv4(src), IpAddress::Ipv4(dst));
        let Ok(repr) = UdpRepr::parse(&udp, &s, &d, &ChecksumCapabilities::default()) else {
            self.counters.drop_malformed_udp += 1;
            return;
        };
        let src = SocketAddrV4::new(src, repr.src_port);
        let dst = SocketAddrV4::new(dst, repr.dst_port);
        let payload = udp.payload().to_vec();
        let to_broadcast = dst.ip().is_broadcast() || *dst.ip() == self.config.broadcast();
        if self.config.local_udp(*dst.ip(), repr.dst_port)
            || (repr.dst_port == DHCP_SERVER_PORT && to_broadcast)
        {
            self.counters.udp_local += 1;
            out.push(Output::Udp(UdpDatagram {
                src_mac,
                src,
                dst,
                payload,
            }));
            return;
        }
        if dst.ip().is_broadcast()
            || dst.ip().is_multicast()
            || *dst.ip() == self.config.broadcast()
        {
            return; // not ours to forward
        }
        self.counters.routed += 1;
        out.push(Output::Route(Routed::Udp {
            src_mac,
            src,
            dst,
            ttl: ip.hop_limit(),
            payload,
        }));
    }

    /// `frame` (an IPv4 packet of ours) to the guest, in fragments when it is longer than
    /// the MTU (a big ping's answer: the guest fragmented the request).
    fn push_fitting(&self, mut frame: Vec<u8>, out: &mut Vec<Output>) {
        let (eth, mtu) = (
            smoltcp::wire::ETHERNET_HEADER_LEN,
            usize::from(self.config.mtu),
        );
        if frame.len() > eth + mtu {
            crate::frame::allow_fragments(&mut frame[eth..]);
            if let Ok(pieces) = crate::ipv4frag::fragment(&frame[eth..], mtu) {
                for piece in pieces {
                    let mut f = Vec::with_capacity(eth + piece.len());
                    f.extend_from_slice(&frame[..eth]);
                    f.extend_from_slice(&piece);
                    out.push(Output::Frame(f));
                }
                return;
            }
        }
        out.push(Output::Frame(frame));
    }

    fn on_icmp(&mut self, src_mac: MacAddr, ip: &Ipv4Packet<&[u8]>, out: &mut Vec<Output>) {
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        let answer_here = dst == self.config.dns_ip
            || (dst == self.config.host_ip && self.config.answer_host_ping);
        match icmp::parse(ip.payload()) {
            None => self.counters.drop_malformed_icmp += 1,
            Some(icmp::Icmp::EchoRequest {
                ident,
                seq_no,
                data,
            }) if answer_here => {
                self.counters.icmp_echo_replies += 1;
                let reply =
                    icmp::echo_reply(self.config.mac, src_mac, dst, src, ident, seq_no, data);
                self.push_fitting(reply, out);
            }
            Some(_) if answer_here => {}
            Some(_) => {
                self.counters.routed += 1;
                out.push(Output::Route(Routed::Icmp {
                    src_mac,
                    src,
                    dst,
                    ttl: ip.hop_limit(),
                    message: ip.payload().to_vec(),
                }));
            }
        }
    }
}
