//! Reply encoding: header fields, every option's value and wire encoding, and
//! the RFC 2131 4.1 destination rules.

mod common;

use std::net::Ipv4Addr;

use common::*;
use dhcp::{Destination, Server};
use dhcproto::v4::{DhcpOption, HType, MessageType, Opcode, OptionCode};
use dhcproto::Name;

/// Find option `code` in the raw option area (after the 240-byte header).
fn raw_option(payload: &[u8], code: u8) -> Option<Vec<u8>> {
    let mut i = 240;
    let mut out: Option<Vec<u8>> = None;
    while i < payload.len() {
        match payload[i] {
            0 => i += 1,
            255 => break,
            c => {
                let len = payload[i + 1] as usize;
                if c == code {
                    out.get_or_insert_with(Vec::new)
                        .extend_from_slice(&payload[i + 2..i + 2 + len]);
                }
                i += 2 + len;
            }
        }
    }
    out
}

#[test]
fn offer_and_ack_carry_all_options() {
    let mut s = server();
    let c = Client::new(1);
    let offer = s.handle(&c.discover(None), t(0)).unwrap().unwrap();
    let ack = s.handle(&c.select(SERVER, ip(15)), t(0)).unwrap().unwrap();
    for (reply, ty) in [(&offer, MessageType::Offer), (&ack, MessageType::Ack)] {
        assert!(reply.payload.len() >= 300);
        let m = decode(reply);
        assert_eq!(m.opcode(), Opcode::BootReply);
        assert_eq!(m.htype(), HType::Eth);
        assert_eq!(m.hlen(), 6);
        assert_eq!(m.xid(), c.xid);
        assert!(m.flags().broadcast());
        assert_eq!(m.chaddr(), &c.mac.0);
        assert_eq!(m.yiaddr(), ip(15));
        assert_eq!(m.siaddr(), SERVER);
        assert_eq!(m.giaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(m.ciaddr(), Ipv4Addr::UNSPECIFIED);
        let o = m.opts();
        let get = |code| o.get(code).cloned();
        assert_eq!(o.msg_type(), Some(ty));
        assert_eq!(
            get(OptionCode::ServerIdentifier),
            Some(DhcpOption::ServerIdentifier(SERVER))
        );
        assert_eq!(
            get(OptionCode::AddressLeaseTime),
            Some(DhcpOption::AddressLeaseTime(3600))
        );
        assert_eq!(get(OptionCode::Renewal), Some(DhcpOption::Renewal(1800)));
        assert_eq!(
            get(OptionCode::Rebinding),
            Some(DhcpOption::Rebinding(3150))
        );
        assert_eq!(
            get(OptionCode::SubnetMask),
            Some(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)))
        );
        assert_eq!(
            get(OptionCode::Router),
            Some(DhcpOption::Router(vec![SERVER]))
        );
        assert_eq!(
            get(OptionCode::DomainNameServer),
            Some(DhcpOption::DomainNameServer(vec![DNS]))
        );
        assert_eq!(
            get(OptionCode::BroadcastAddr),
            Some(DhcpOption::BroadcastAddr(ip(255)))
        );
        assert_eq!(
            get(OptionCode::InterfaceMtu),
            Some(DhcpOption::InterfaceMtu(1500))
        );
        assert_eq!(
            get(OptionCode::DomainSearch),
            Some(DhcpOption::DomainSearch(vec![
                Name::from_ascii("example.com.").unwrap(),
                Name::from_ascii("corp.example.com.").unwrap(),
            ]))
        );
        assert!(get(OptionCode::Hostname).is_none());
        assert_eq!(o.len(), 11, "{o:?}");

        // Wire encoding of the less common ones.
        let p = &reply.payload;
        assert_eq!(raw_option(p, 53), Some(vec![ty.into()]));
        assert_eq!(raw_option(p, 26), Some(vec![0x05, 0xdc]));
        assert_eq!(raw_option(p, 51), Some(3600u32.to_be_bytes().to_vec()));
        // RFC 3397: "example.com" then "corp" + pointer to offset 0.
        let mut search = b"\x07example\x03com\x00\x04corp".to_vec();
        search.extend_from_slice(&[0xc0, 0x00]);
        assert_eq!(raw_option(p, 119), Some(search));
    }
}

#[test]
fn optional_options_are_omitted() {
    let mut cfg = config();
    cfg.dns_servers.clear();
    cfg.mtu = None;
    cfg.search_domains.clear();
    cfg.lease_time = std::time::Duration::from_secs(86_400);
    cfg.dns_servers = vec![];
    let mut s = Server::new(cfg, vec![]).unwrap();
    let c = Client::new(1);
    let offer = decode(&s.handle(&c.discover(None), t(0)).unwrap().unwrap());
    for absent in [
        OptionCode::DomainNameServer,
        OptionCode::InterfaceMtu,
        OptionCode::DomainSearch,
    ] {
        assert!(offer.opts().get(absent).is_none(), "{absent:?}");
    }
    assert_eq!(
        offer.opts().get(OptionCode::Rebinding),
        Some(&DhcpOption::Rebinding(75_600))
    );
}

#[test]
fn several_dns_servers_and_other_subnet() {
    let mut cfg = config();
    cfg.subnet = "10.0.0.0/16".parse().unwrap();
    cfg.server_ip = Ipv4Addr::new(10, 0, 0, 1);
    cfg.router = Ipv4Addr::new(10, 0, 0, 1);
    cfg.pool_start = Ipv4Addr::new(10, 0, 1, 0);
    cfg.pool_end = Ipv4Addr::new(10, 0, 1, 255);
    cfg.reserved = vec![];
    cfg.dns_servers = vec![Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(8, 8, 8, 8)];
    let mut s = Server::new(cfg, vec![]).unwrap();
    let m = decode(
        &s.handle(&Client::new(1).discover(None), t(0))
            .unwrap()
            .unwrap(),
    );
    assert_eq!(m.yiaddr(), Ipv4Addr::new(10, 0, 1, 0));
    let o = m.opts();
    assert_eq!(
        o.get(OptionCode::SubnetMask),
        Some(&DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 0, 0)))
    );
    assert_eq!(
        o.get(OptionCode::BroadcastAddr),
        Some(&DhcpOption::BroadcastAddr(Ipv4Addr::new(10, 0, 255, 255)))
    );
    assert_eq!(
        o.get(OptionCode::DomainNameServer),
        Some(&DhcpOption::DomainNameServer(vec![
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(8, 8, 8, 8)
        ]))
    );
    assert_eq!(
        o.get(OptionCode::ServerIdentifier),
        Some(&DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 0, 0, 1)))
    );
}

#[test]
fn destination_rules() {
    let mut s = server();
    // Broadcast flag set, no ciaddr: broadcast.
    let a = Client::new(1);
    let r = s.handle(&a.discover(None), t(0)).unwrap().unwrap();
    assert_eq!(r.to, Destination::Broadcast);
    // No broadcast flag (udhcpc's and dhclient's default): unicast to yiaddr at chaddr.
    let mut b = Client::new(2);
    b.broadcast = false;
    let r = s.handle(&b.discover(None), t(0)).unwrap().unwrap();
    assert_eq!(
        r.to,
        Destination::Unicast {
            ip: ip(16),
            mac: b.mac
        }
    );
    assert!(!decode(&r).flags().broadcast());
    let r = s.handle(&b.select(SERVER, ip(16)), t(0)).unwrap().unwrap();
    assert_eq!(
        r.to,
        Destination::Unicast {
            ip: ip(16),
            mac: b.mac
        }
    );
    // ciaddr set (renew): unicast to ciaddr, even with the broadcast flag.
    let r = s.handle(&a.select(SERVER, ip(15)), t(0)).unwrap().unwrap();
    assert_eq!(r.to, Destination::Broadcast);
    let r = s.handle(&a.renew(ip(15)), t(1)).unwrap().unwrap();
    assert_eq!(
        r.to,
        Destination::Unicast {
            ip: ip(15),
            mac: a.mac
        }
    );
    // NAK: always broadcast.
    let r = s.handle(&b.renew(ip(15)), t(1)).unwrap().unwrap();
    assert_eq!(msg_type(&r), MessageType::Nak);
    assert_eq!(r.to, Destination::Broadcast);
    let r = s.handle(&b.init_reboot(ip(15)), t(1)).unwrap().unwrap();
    assert_eq!(r.to, Destination::Broadcast);
}
