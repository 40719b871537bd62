//! Test helpers: a server config like usernet's default and a fake DHCP client
//! that builds messages the way udhcpc / dhclient do.
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dhcp::{Config, MacAddr, Reply, Server};
use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, OptionCode};
use dhcproto::{Decodable, Encodable};

pub const SERVER: Ipv4Addr = Ipv4Addr::new(192, 168, 5, 2);
pub const DNS: Ipv4Addr = Ipv4Addr::new(192, 168, 5, 3);

pub fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 5, last)
}

pub fn mac(last: u8) -> MacAddr {
    MacAddr([0x52, 0x55, 0x55, 0x12, 0x34, last])
}

/// A fixed "now" so tests are deterministic; `t(s)` is `s` seconds later.
pub const T0: u64 = 1_700_000_000;
pub fn t(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(T0 + secs)
}

pub fn config() -> Config {
    Config {
        server_ip: SERVER,
        subnet: "192.168.5.0/24".parse().unwrap(),
        router: SERVER,
        dns_servers: vec![DNS],
        pool_start: ip(15),
        pool_end: ip(254),
        lease_time: Duration::from_secs(3600),
        mtu: Some(1500),
        search_domains: vec!["example.com".into(), "corp.example.com".into()],
        static_leases: vec![],
        reserved: vec![DNS],
    }
}

pub fn server() -> Server {
    Server::new(config(), vec![]).unwrap()
}

pub fn decode(reply: &Reply) -> Message {
    Message::decode(&mut dhcproto::Decoder::new(&reply.payload)).unwrap()
}

pub fn msg_type(reply: &Reply) -> MessageType {
    decode(reply).opts().msg_type().unwrap()
}

pub fn encode(m: &Message) -> Vec<u8> {
    m.to_vec().unwrap()
}

/// A DHCP client with one MAC.
pub struct Client {
    pub mac: MacAddr,
    pub xid: u32,
    pub broadcast: bool,
    pub hostname: Option<String>,
}

impl Client {
    pub fn new(last: u8) -> Self {
        Client {
            mac: mac(last),
            xid: 0x1000 + u32::from(last),
            broadcast: true,
            hostname: None,
        }
    }

    pub fn base(&self, ty: MessageType, ciaddr: Ipv4Addr) -> Message {
        let mut m = Message::new_with_id(
            self.xid,
            ciaddr,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &self.mac.0,
        );
        if self.broadcast {
            m.set_flags(Flags::default().set_broadcast());
        }
        let o = m.opts_mut();
        o.insert(DhcpOption::MessageType(ty));
        o.insert(DhcpOption::ClientIdentifier(
            [&[1u8][..], &self.mac.0[..]].concat(),
        ));
        if ty != MessageType::Release && ty != MessageType::Decline {
            o.insert(DhcpOption::ParameterRequestList(vec![
                OptionCode::SubnetMask,
                OptionCode::Router,
                OptionCode::DomainNameServer,
                OptionCode::Hostname,
                OptionCode::DomainName,
                OptionCode::BroadcastAddr,
                OptionCode::InterfaceMtu,
                OptionCode::DomainSearch,
            ]));
            o.insert(DhcpOption::MaxMessageSize(576));
        }
        if let Some(h) = &self.hostname {
            o.insert(DhcpOption::Hostname(h.clone()));
        }
        m
    }

    pub fn discover(&self, requested: Option<Ipv4Addr>) -> Vec<u8> {
        let mut m = self.base(MessageType::Discover, Ipv4Addr::UNSPECIFIED);
        if let Some(r) = requested {
            m.opts_mut().insert(DhcpOption::RequestedIpAddress(r));
        }
        encode(&m)
    }

    pub fn select(&self, server: Ipv4Addr, requested: Ipv4Addr) -> Vec<u8> {
        let mut m = self.base(MessageType::Request, Ipv4Addr::UNSPECIFIED);
        m.opts_mut().insert(DhcpOption::ServerIdentifier(server));
        m.opts_mut()
            .insert(DhcpOption::RequestedIpAddress(requested));
        encode(&m)
    }

    pub fn init_reboot(&self, requested: Ipv4Addr) -> Vec<u8> {
        let mut m = self.base(MessageType::Request, Ipv4Addr::UNSPECIFIED);
        m.opts_mut()
            .insert(DhcpOption::RequestedIpAddress(requested));
        encode(&m)
    }

    /// RENEWING (unicast) or REBINDING (broadcast): ciaddr set, no option 50/54.
    pub fn renew(&self, ciaddr: Ipv4Addr) -> Vec<u8> {
        encode(&self.base(MessageType::Request, ciaddr))
    }

    pub fn decline(&self, addr: Ipv4Addr) -> Vec<u8> {
        let mut m = self.base(MessageType::Decline, Ipv4Addr::UNSPECIFIED);
        m.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
        m.opts_mut().insert(DhcpOption::RequestedIpAddress(addr));
        encode(&m)
    }

    pub fn release(&self, ciaddr: Ipv4Addr) -> Vec<u8> {
        let mut m = self.base(MessageType::Release, ciaddr);
        m.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
        encode(&m)
    }

    pub fn inform(&self, ciaddr: Ipv4Addr) -> Vec<u8> {
        encode(&self.base(MessageType::Inform, ciaddr))
    }

    /// DISCOVER + REQUEST; returns the bound address.
    pub fn dora(&self, s: &mut Server, now: SystemTime) -> Ipv4Addr {
        let offer = s.handle(&self.discover(None), now).unwrap().unwrap();
        assert_eq!(msg_type(&offer), MessageType::Offer);
        let yiaddr = decode(&offer).yiaddr();
        let ack = s
            .handle(&self.select(SERVER, yiaddr), now)
            .unwrap()
            .unwrap();
        assert_eq!(msg_type(&ack), MessageType::Ack);
        assert_eq!(decode(&ack).yiaddr(), yiaddr);
        yiaddr
    }
}
