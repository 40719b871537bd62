//! ICMP echo for the gateway's own addresses. Echo to other destinations is the outbound
//! path's business (through a host ping socket), not answered here.

use std::net::Ipv4Addr;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, IpProtocol};

use crate::frame::{ipv4_frame, L2Dest};
use crate::MacAddr;

pub(crate) enum Icmp<'a> {
    EchoRequest {
        ident: u16,
        seq_no: u16,
        data: &'a [u8],
    },
    Other,
}

/// Parse and verify an ICMP message; `None` when truncated or its checksum is wrong.
pub(crate) fn parse(payload: &[u8]) -> Option<Icmp<'_>> {
    let packet = Icmpv4Packet::new_checked(payload).ok()?;
    if !packet.verify_checksum() {
        return None;
    }
    match Icmpv4Repr::parse(&packet, &ChecksumCapabilities::ignored()) {
        Ok(Icmpv4Repr::EchoRequest {
            ident,
            seq_no,
            data,
        }) => Some(Icmp::EchoRequest {
            ident,
            seq_no,
            data,
        }),
        _ => Some(Icmp::Other),
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn echo_reply(
    src_mac: MacAddr,
    dst_mac: MacAddr,
    src_ip: Ipv4Addr,
    dst_ip: Ipv4Addr,
    ident: u16,
    seq_no: u16,
    data: &[u8],
) -> Vec<u8> {
    let repr = Icmpv4Repr::EchoReply {
        ident,
        seq_no,
        data,
    };
    ipv4_frame(
        src_mac,
        L2Dest::Mac(dst_mac),
        src_ip,
        dst_ip,
        IpProtocol::Icmp,
        repr.buffer_len(),
        |buf| {
            repr.emit(
                &mut Icmpv4Packet::new_unchecked(buf),
                &ChecksumCapabilities::default(),
            )
        },
    )
}
