//! Building what the gateway sends: IPv4 packets (header + a payload writer) and the Ethernet
//! frames around them. Builders only; parsing lives with each protocol.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU16, Ordering};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpAddress, IpProtocol,
    Ipv4Packet, Ipv4Repr, UdpPacket, UdpRepr, ETHERNET_HEADER_LEN, UDP_HEADER_LEN,
};

use crate::{MacAddr, BROADCAST_MAC};

/// Where on the link a frame goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Dest {
    /// ff:ff:ff:ff:ff:ff
    Broadcast,
    /// One station.
    Mac(MacAddr),
}

impl L2Dest {
    pub(crate) fn mac(self) -> MacAddr {
        match self {
            L2Dest::Broadcast => BROADCAST_MAC,
            L2Dest::Mac(m) => m,
        }
    }
}

/// The TTL of packets the gateway originates.
pub(crate) const TTL: u8 = 64;
/// The IPv4 header the gateway writes (no options).
pub(crate) const IPV4_HEADER_LEN: usize = 20;

static NEXT_IDENT: AtomicU16 = AtomicU16::new(1);

/// Write an IPv4 header for `payload_len` bytes at the start of `buf` (which must hold
/// `IPV4_HEADER_LEN + payload_len` bytes); the payload is written by `emit`. Packets that may
/// be fragmented (`may_fragment`) get a fresh identification and DF clear.
pub(crate) fn write_ipv4(
    buf: &mut [u8],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: IpProtocol,
    payload_len: usize,
    may_fragment: bool,
    emit: impl FnOnce(&mut [u8]),
) {
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: protocol,
        payload_len,
        hop_limit: TTL,
    };
    let mut packet = Ipv4Packet::new_unchecked(buf);
    ip.emit(&mut packet, &ChecksumCapabilities::ignored());
    if may_fragment {
        packet.set_dont_frag(false);
        packet.set_ident(NEXT_IDENT.fetch_add(1, Ordering::Relaxed));
    }
    packet.fill_checksum();
    emit(packet.payload_mut());
}

/// Let `packet` (an IPv4 packet of ours) be fragmented: DF cleared, an ident of its own.
pub(crate) fn allow_fragments(packet: &mut [u8]) {
    let mut p = Ipv4Packet::new_unchecked(packet);
    p.set_dont_frag(false);
    p.set_ident(NEXT_IDENT.fetch_add(1, Ordering::Relaxed));
    p.fill_checksum();
}

/// Write the Ethernet header at the start of `buf`.
pub(crate) fn write_ethernet(buf: &mut [u8], src: MacAddr, dst: MacAddr) {
    let eth = EthernetRepr {
        src_addr: EthernetAddress(src),
        dst_addr: EthernetAddress(dst),
        ethertype: EthernetProtocol::Ipv4,
    };
    eth.emit(&mut EthernetFrame::new_unchecked(buf));
}

/// Build Ethernet + IPv4 around a payload of `payload_len` bytes written by `emit`.
pub(crate) fn ipv4_frame(
    src_mac: MacAddr,
    dst: L2Dest,
    src_ip: Ipv4Addr,
    dst_ip: Ipv4Addr,
    protocol: IpProtocol,
    payload_len: usize,
    emit: impl FnOnce(&mut [u8]),
) -> Vec<u8> {
    let mut buf = vec![0u8; ETHERNET_HEADER_LEN + IPV4_HEADER_LEN + payload_len];
    write_ethernet(&mut buf, src_mac, dst.mac());
    write_ipv4(
        &mut buf[ETHERNET_HEADER_LEN..],
        src_ip,
        dst_ip,
        protocol,
        payload_len,
        false,
        emit,
    );
    buf
}

/// Write a UDP header and payload into `buf` (checksum filled).
pub(crate) fn write_udp(buf: &mut [u8], src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) {
    let udp = UdpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
    };
    udp.emit(
        &mut UdpPacket::new_unchecked(buf),
        &IpAddress::Ipv4(*src.ip()),
        &IpAddress::Ipv4(*dst.ip()),
        payload.len(),
        |p| p.copy_from_slice(payload),
        &ChecksumCapabilities::default(),
    );
}

/// Build a complete UDP/IPv4/Ethernet frame (checksums filled in).
pub fn build_udp_frame(
    src_mac: MacAddr,
    dst: L2Dest,
    src: SocketAddrV4,
    dst_addr: SocketAddrV4,
    payload: &[u8],
) -> Vec<u8> {
    ipv4_frame(
        src_mac,
        dst,
        *src.ip(),
        *dst_addr.ip(),
        IpProtocol::Udp,
        UDP_HEADER_LEN + payload.len(),
        |buf| write_udp(buf, src, dst_addr, payload),
    )
}
