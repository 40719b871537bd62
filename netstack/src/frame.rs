//! Building the frames the gateway sends: Ethernet + IPv4 + a payload writer. Builders only;
//! parsing lives with each protocol.

use std::net::{Ipv4Addr, SocketAddrV4};

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
    fn mac(self) -> MacAddr {
        match self {
            L2Dest::Broadcast => BROADCAST_MAC,
            L2Dest::Mac(m) => m,
        }
    }
}

/// The TTL of packets the gateway originates.
pub(crate) const TTL: u8 = 64;

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
    let ip = Ipv4Repr {
        src_addr: src_ip,
        dst_addr: dst_ip,
        next_header: protocol,
        payload_len,
        hop_limit: TTL,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(src_mac),
        dst_addr: EthernetAddress(dst.mac()),
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut buf = vec![0u8; ETHERNET_HEADER_LEN + ip.buffer_len() + payload_len];
    let mut frame = EthernetFrame::new_unchecked(&mut buf[..]);
    eth.emit(&mut frame);
    let mut packet = Ipv4Packet::new_unchecked(frame.payload_mut());
    ip.emit(&mut packet, &ChecksumCapabilities::default());
    emit(packet.payload_mut());
    buf
}

/// Build a complete UDP/IPv4/Ethernet frame (checksums filled in).
pub fn build_udp_frame(
    src_mac: MacAddr,
    dst: L2Dest,
    src: SocketAddrV4,
    dst_addr: SocketAddrV4,
    payload: &[u8],
) -> Vec<u8> {
    let udp = UdpRepr {
        src_port: src.port(),
        dst_port: dst_addr.port(),
    };
    let (s, d) = (*src.ip(), *dst_addr.ip());
    ipv4_frame(
        src_mac,
        dst,
        s,
        d,
        IpProtocol::Udp,
        UDP_HEADER_LEN + payload.len(),
        |buf| {
            let mut packet = UdpPacket::new_unchecked(buf);
            udp.emit(
                &mut packet,
                &IpAddress::Ipv4(s),
                &IpAddress::Ipv4(d),
                payload.len(),
                |p| p.copy_from_slice(payload),
                &ChecksumCapabilities::default(),
            );
        },
    )
}
