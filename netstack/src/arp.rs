//! ARP: the gateway answers requests for the addresses it owns (host, DNS) and learns who is
//! who from every ARP packet it sees. It never answers for a guest's address.

use std::net::Ipv4Addr;

use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr,
};

use crate::MacAddr;

/// A parsed ARP packet of interest (Ethernet/IPv4 only).
pub(crate) struct Arp {
    pub op: ArpOperation,
    pub sender_mac: MacAddr,
    pub sender_ip: Ipv4Addr,
    pub target_ip: Ipv4Addr,
}

pub(crate) fn parse(payload: &[u8]) -> Option<Arp> {
    let packet = ArpPacket::new_checked(payload).ok()?;
    match ArpRepr::parse(&packet).ok()? {
        ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        } => Some(Arp {
            op: operation,
            sender_mac: source_hardware_addr.0,
            sender_ip: source_protocol_addr,
            target_ip: target_protocol_addr,
        }),
        _ => None,
    }
}

/// The reply to `req`, sent from `our_mac` claiming `req.target_ip`.
pub(crate) fn reply(req: &Arp, our_mac: MacAddr) -> Vec<u8> {
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Reply,
        source_hardware_addr: EthernetAddress(our_mac),
        source_protocol_addr: req.target_ip,
        target_hardware_addr: EthernetAddress(req.sender_mac),
        target_protocol_addr: req.sender_ip,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(our_mac),
        dst_addr: EthernetAddress(req.sender_mac),
        ethertype: EthernetProtocol::Arp,
    };
    let mut buf = vec![0u8; eth.buffer_len() + arp.buffer_len()];
    let mut frame = EthernetFrame::new_unchecked(&mut buf[..]);
    eth.emit(&mut frame);
    arp.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
    buf
}
