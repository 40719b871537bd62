//! The gateway: the one station on the virtual link that is not a guest. It takes each frame
//! the switch hands it, parses it once, and answers ARP and ping for its own addresses and
//! hands UDP for local services (DHCP on port 67, DNS) to the caller as [`UdpDatagram`]s.
//! Routing off-subnet traffic out through host sockets is not done here yet; such packets are
//! counted as `drop_no_route`.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Instant;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, EthernetFrame, EthernetProtocol, IpAddress, IpProtocol, Ipv4Packet, UdpPacket,
    UdpRepr,
};

use crate::counters::Counters;
use crate::frame::{build_udp_frame, L2Dest};
use crate::neighbor::Neighbors;
use crate::{arp, icmp, MacAddr};

/// The DHCP server port: broadcasts to it are local whatever their destination address.
const DHCP_SERVER_PORT: u16 = 67;

/// What the gateway is: its MAC, the addresses it owns, the subnet it serves.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The gateway's MAC address.
    pub mac: MacAddr,
    /// Addresses the gateway owns (answers ARP and ping for): the host and DNS addresses.
    pub addrs: Vec<Ipv4Addr>,
    /// The network address of the subnet.
    pub network: Ipv4Addr,
    /// The subnet's prefix length.
    pub prefix: u8,
}

impl GatewayConfig {
    fn broadcast(&self) -> Ipv4Addr {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        Ipv4Addr::from(u32::from(self.network) | !mask)
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

/// What to do after a frame was received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send this frame to the switch from the gateway's port.
    Frame(Vec<u8>),
    /// A datagram for a local service (DHCP, DNS).
    Udp(UdpDatagram),
}

/// The gateway state machine (see the module docs).
#[derive(Debug)]
pub struct Gateway {
    config: GatewayConfig,
    neighbors: Neighbors,
    counters: Counters,
}

impl Gateway {
    /// A gateway with `config`.
    pub fn new(config: GatewayConfig) -> Gateway {
        Gateway {
            config,
            neighbors: Neighbors::default(),
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
        if self.config.addrs.contains(&req.sender_ip) {
            // Someone claims one of our addresses: do not learn it, do not answer it.
            self.counters.drop_bad_source += 1;
            return;
        }
        self.neighbors.learn(req.sender_ip, req.sender_mac, now);
        if req.op == ArpOperation::Request && self.config.addrs.contains(&req.target_ip) {
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
            self.counters.drop_fragment += 1;
            return;
        }
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        if self.config.addrs.contains(&src) || src.is_multicast() || src.is_broadcast() {
            self.counters.drop_bad_source += 1;
            return;
        }
        self.neighbors.learn(src, src_mac, now);
        let ours = self.config.addrs.contains(&dst);
        let broadcast = dst.is_broadcast() || dst == self.config.broadcast();
        match ip.next_header() {
            IpProtocol::Udp => self.on_udp(src_mac, src, dst, ours, broadcast, ip.payload(), out),
            IpProtocol::Icmp if ours => self.on_icmp(src_mac, src, dst, ip.payload(), out),
            IpProtocol::Icmp if broadcast => {}
            _ => self.counters.drop_no_route += 1,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_udp(
        &mut self,
        src_mac: MacAddr,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        ours: bool,
        broadcast: bool,
        payload: &[u8],
        out: &mut Vec<Output>,
    ) {
        let Ok(udp) = UdpPacket::new_checked(payload) else {
            self.counters.drop_malformed_udp += 1;
            return;
        };
        let (s, d) = (IpAddress::Ipv4(src), IpAddress::Ipv4(dst));
        let Ok(repr) = UdpRepr::parse(&udp, &s, &d, &ChecksumCapabilities::default()) else {
            self.counters.drop_malformed_udp += 1;
            return;
        };
        if ours || (broadcast && repr.dst_port == DHCP_SERVER_PORT) {
            self.counters.udp_local += 1;
            out.push(Output::Udp(UdpDatagram {
                src_mac,
                src: SocketAddrV4::new(src, repr.src_port),
                dst: SocketAddrV4::new(dst, repr.dst_port),
                payload: udp.payload().to_vec(),
            }));
        } else if !broadcast {
            self.counters.drop_no_route += 1;
        }
    }

    fn on_icmp(
        &mut self,
        src_mac: MacAddr,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        payload: &[u8],
        out: &mut Vec<Output>,
    ) {
        match icmp::parse(payload) {
            None => self.counters.drop_malformed_icmp += 1,
            Some(icmp::Icmp::EchoRequest {
                ident,
                seq_no,
                data,
            }) => {
                self.counters.icmp_echo_replies += 1;
                let reply =
                    icmp::echo_reply(self.config.mac, src_mac, dst, src, ident, seq_no, data);
                out.push(Output::Frame(reply));
            }
            Some(icmp::Icmp::Other) => {}
        }
    }
}
