//! Encoding of server replies (OFFER, ACK, NAK) with dhcproto.
//!
//! Decides which header fields and options go into a reply of a given kind; it
//! does not decide whether to reply, to which address, or with which lease (that
//! is [`crate::server`]). Replies are padded to the 300-byte BOOTP minimum.

use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, Flags, HType, Message, MessageType, Opcode};
use dhcproto::{Encodable, Name};

use crate::config::Config;
use crate::packet::Request;

/// Minimum BOOTP message size some old clients insist on.
const MIN_REPLY_LEN: usize = 300;

/// Which reply to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// OFFER or ACK carrying a lease for `yiaddr`.
    Lease {
        ack: bool,
        yiaddr: Ipv4Addr,
    },
    /// ACK to an INFORM: configuration only, no address, no lease times.
    InformAck,
    Nak,
}

pub(crate) fn build(
    config: &Config,
    search: &[Name],
    req: &Request,
    kind: Kind,
) -> Result<Vec<u8>, dhcproto::error::EncodeError> {
    let (msg_type, ciaddr, yiaddr, siaddr) = match kind {
        Kind::Lease { ack: false, yiaddr } => (
            MessageType::Offer,
            Ipv4Addr::UNSPECIFIED,
            yiaddr,
            config.server_ip,
        ),
        Kind::Lease { ack: true, yiaddr } => {
            (MessageType::Ack, req.ciaddr, yiaddr, config.server_ip)
        }
        Kind::InformAck => (
            MessageType::Ack,
            req.ciaddr,
            Ipv4Addr::UNSPECIFIED,
            config.server_ip,
        ),
        Kind::Nak => (
            MessageType::Nak,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
        ),
    };
    let mut msg = Message::new_with_id(
        req.xid,
        ciaddr,
        yiaddr,
        siaddr,
        req.giaddr,
        &req.chaddr.octets(),
    );
    msg.set_opcode(Opcode::BootReply)
        .set_htype(HType::Eth)
        .set_flags(Flags::new(req.flags));

    let opts = msg.opts_mut();
    opts.insert(DhcpOption::MessageType(msg_type));
    opts.insert(DhcpOption::ServerIdentifier(config.server_ip));
    if kind == Kind::Nak {
        opts.insert(DhcpOption::Message("address not available".into()));
    } else {
        let subnet = config.subnet.trunc();
        opts.insert(DhcpOption::SubnetMask(subnet.netmask()));
        opts.insert(DhcpOption::BroadcastAddr(subnet.broadcast()));
        opts.insert(DhcpOption::Router(vec![config.router]));
        if !config.dns_servers.is_empty() {
            opts.insert(DhcpOption::DomainNameServer(config.dns_servers.clone()));
        }
        if let Some(mtu) = config.mtu {
            opts.insert(DhcpOption::InterfaceMtu(mtu));
        }
        if !search.is_empty() {
            opts.insert(DhcpOption::DomainSearch(search.to_vec()));
        }
        if let Kind::Lease { .. } = kind {
            // Validated to fit in u32 by Config::validate.
            let secs = u32::try_from(config.lease_time.as_secs()).unwrap_or(u32::MAX);
            opts.insert(DhcpOption::AddressLeaseTime(secs));
            opts.insert(DhcpOption::Renewal(secs / 2));
            opts.insert(DhcpOption::Rebinding((u64::from(secs) * 7 / 8) as u32));
        }
    }

    let mut buf = msg.to_vec()?;
    if buf.len() < MIN_REPLY_LEN {
        buf.resize(MIN_REPLY_LEN, 0);
    }
    Ok(buf)
}
