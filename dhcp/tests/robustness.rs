//! Bad input never panics and is reported as a typed drop reason with a counter.

mod common;

use common::*;
use dhcp::{DropReason, Malformed};
use dhcproto::v4::{DhcpOption, MessageType};

/// xorshift64: deterministic pseudo-random bytes without a rand dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn byte(&mut self) -> u8 {
        (self.next() >> 24) as u8
    }
}

fn discover() -> Vec<u8> {
    let mut c = Client::new(1);
    c.hostname = Some("guest".into());
    c.discover(Some(ip(20)))
}

#[test]
fn every_truncated_prefix_is_rejected() {
    let mut s = server();
    let full = discover();
    for len in 0..full.len() {
        let r = s.handle(&full[..len], t(0));
        assert!(
            matches!(r, Err(DropReason::Malformed(_))),
            "prefix of {len} bytes gave {r:?}"
        );
    }
    assert_eq!(s.counters().malformed, full.len() as u64);
    assert!(s.leases().is_empty());
    // The whole packet is fine.
    assert!(s.handle(&full, t(0)).unwrap().is_some());
}

#[test]
fn random_bytes_never_panic() {
    let mut s = server();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..20_000 {
        let len = (rng.next() % 700) as usize;
        let buf: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
        let _ = s.handle(&buf, t(0));
    }
    // Random bytes with a valid-looking header reach the option parser.
    let header = discover()[..240].to_vec();
    for _ in 0..20_000 {
        let len = (rng.next() % 400) as usize;
        let mut buf = header.clone();
        buf.extend((0..len).map(|_| rng.byte()));
        let _ = s.handle(&buf, t(0));
    }
    assert_eq!(s.counters().received, 40_000);
}

#[test]
fn mutated_valid_packets_never_panic() {
    let mut s = server();
    let mut rng = Rng(12345);
    let base = discover();
    let renew = Client::new(2).renew(ip(15));
    for i in 0..20_000 {
        let mut buf = if i % 2 == 0 {
            base.clone()
        } else {
            renew.clone()
        };
        for _ in 0..(1 + rng.next() % 4) {
            let at = (rng.next() as usize) % buf.len();
            buf[at] = rng.byte();
        }
        let _ = s.handle(&buf, t(i));
    }
    let c = s.counters();
    let handled = c.offers + c.acks + c.naks + c.informs + c.declines + c.releases;
    let dropped = c.malformed + c.exhausted + c.ignored;
    assert_eq!(handled + dropped, 20_000);
}

#[test]
fn lying_option_lengths() {
    let mut s = server();
    let good = discover();
    // Walk the options and, one at a time, make each length byte claim more
    // than is left in the packet.
    let mut i = 240;
    let mut lied = 0;
    while good[i] != 255 {
        if good[i] == 0 {
            i += 1;
            continue;
        }
        let mut bad = good.clone();
        bad[i + 1] = 255;
        let r = s.handle(&bad, t(0));
        assert!(
            matches!(r, Err(DropReason::Malformed(Malformed::OptionOverrun { code, .. })) if code == good[i]),
            "option {} at {i}: {r:?}",
            good[i]
        );
        lied += 1;
        i += 2 + good[i + 1] as usize;
    }
    assert!(lied >= 5);
    // A length that swallows the End option and the rest.
    let mut bad = good.clone();
    let end = bad.len() - 1;
    bad.truncate(end);
    assert_eq!(
        s.handle(&bad, t(0)),
        Err(DropReason::Malformed(Malformed::MissingEnd))
    );
}

#[test]
fn wrong_option_lengths_for_used_options() {
    let mut s = server();
    let c = Client::new(1);
    let mut base = c.base(MessageType::Discover, std::net::Ipv4Addr::UNSPECIFIED);
    base.opts_mut()
        .remove(dhcproto::v4::OptionCode::MessageType);
    let body = encode(&base);
    // Insert hand-made options right after the magic cookie.
    for (opt, code, len) in [
        (vec![53u8, 0], 53u8, 0),
        (vec![53, 2, 1, 1], 53, 2),
        (vec![53, 1, 1, 50, 2, 1, 2], 50, 2),
        (vec![53, 1, 1, 54, 5, 1, 2, 3, 4, 5], 54, 5),
        (vec![53, 1, 1, 12, 0], 12, 0),
    ] {
        let mut p = body[..240].to_vec();
        p.extend_from_slice(&opt);
        p.extend_from_slice(&body[240..]);
        assert_eq!(
            s.handle(&p, t(0)),
            Err(DropReason::Malformed(Malformed::BadOptionLength {
                code,
                len
            })),
            "{opt:?}"
        );
    }
}

#[test]
fn header_errors() {
    let mut s = server();
    let good = discover();

    let mut p = good.clone();
    p[0] = 2; // BOOTREPLY
    assert_eq!(s.handle(&p, t(0)), Err(DropReason::NotRequest));
    p[0] = 0;
    assert_eq!(
        s.handle(&p, t(0)),
        Err(DropReason::Malformed(Malformed::BadOp(0)))
    );

    let mut p = good.clone();
    p[1] = 6; // IEEE 802
    assert_eq!(
        s.handle(&p, t(0)),
        Err(DropReason::UnsupportedHardware { htype: 6, hlen: 6 })
    );
    let mut p = good.clone();
    p[2] = 16;
    assert_eq!(
        s.handle(&p, t(0)),
        Err(DropReason::UnsupportedHardware { htype: 1, hlen: 16 })
    );

    let mut p = good.clone();
    p[236] = 0;
    assert!(matches!(
        s.handle(&p, t(0)),
        Err(DropReason::Malformed(Malformed::BadMagic(_)))
    ));

    // A server's message sent to us.
    let c = Client::new(1);
    for ty in [MessageType::Offer, MessageType::Ack, MessageType::Nak] {
        let p = encode(&c.base(ty, std::net::Ipv4Addr::UNSPECIFIED));
        assert_eq!(s.handle(&p, t(0)), Err(DropReason::NotRequest));
    }
    let p = encode(&c.base(MessageType::LeaseQuery, std::net::Ipv4Addr::UNSPECIFIED));
    assert_eq!(
        s.handle(&p, t(0)),
        Err(DropReason::UnsupportedMessageType(10))
    );

    // No message type at all (plain BOOTP).
    let mut m = c.base(MessageType::Discover, std::net::Ipv4Addr::UNSPECIFIED);
    m.opts_mut().remove(dhcproto::v4::OptionCode::MessageType);
    assert_eq!(
        s.handle(&encode(&m), t(0)),
        Err(DropReason::MissingMessageType)
    );
    // No options at all (dhcproto writes nothing, not even End).
    let mut m = c.base(MessageType::Discover, std::net::Ipv4Addr::UNSPECIFIED);
    m.opts_mut().clear();
    assert_eq!(
        s.handle(&encode(&m), t(0)),
        Err(DropReason::Malformed(Malformed::MissingEnd))
    );

    let n = s.counters();
    assert_eq!(n.malformed, 4);
    assert_eq!(n.ignored, 7);
    assert_eq!(n.received, 11);
    assert_eq!(n.offers, 0);
}

#[test]
fn unknown_and_garbage_options_are_skipped() {
    let mut s = server();
    let c = Client::new(1);
    let mut m = c.base(MessageType::Discover, std::net::Ipv4Addr::UNSPECIFIED);
    // Options we don't use, with contents dhcproto itself can't decode.
    m.opts_mut()
        .insert(DhcpOption::Unknown(dhcproto::v4::UnknownOption::new(
            dhcproto::v4::OptionCode::Unknown(224),
            vec![0xff; 40],
        )));
    let mut p = encode(&m);
    // Hand-insert a non-UTF-8 domain name (15) and a 1-byte MTU (26).
    let extra = [15u8, 3, 0xff, 0xfe, 0xfd, 26, 1, 9];
    p.splice(240..240, extra);
    let r = s.handle(&p, t(0)).unwrap().unwrap();
    assert_eq!(msg_type(&r), MessageType::Offer);
}

/// A flood of DISCOVERs from ever new MACs on a large pool: offers stop at the limit (the
/// rest count as exhausted), every offer is a different address, a known client still gets
/// its address, and once the offers expire new clients are served again.
#[test]
fn discover_flood_from_new_macs_is_capped() {
    let mut cfg = config();
    cfg.subnet = "10.0.0.0/16".parse().unwrap();
    cfg.server_ip = "10.0.0.2".parse().unwrap();
    cfg.router = cfg.server_ip;
    cfg.dns_servers = vec!["10.0.0.3".parse().unwrap()];
    cfg.reserved = cfg.dns_servers.clone();
    cfg.pool_start = "10.0.0.15".parse().unwrap();
    cfg.pool_end = "10.0.255.254".parse().unwrap();
    let mut s = dhcp::Server::new(cfg, vec![]).unwrap();
    let known = Client::new(200);
    let server: std::net::Ipv4Addr = "10.0.0.2".parse().unwrap();
    let offer = s.handle(&known.discover(None), t(0)).unwrap().unwrap();
    let bound = decode(&offer).yiaddr();
    let ack = s
        .handle(&known.select(server, bound), t(0))
        .unwrap()
        .unwrap();
    assert_eq!(msg_type(&ack), MessageType::Ack);
    let flooder = |i: u32| {
        let mut c = Client::new(1);
        c.mac = dhcp::MacAddr([0x52, 0x56, (i >> 16) as u8, (i >> 8) as u8, i as u8, 7]);
        c
    };
    let mut offered = std::collections::HashSet::new();
    for i in 0..3000 {
        if let Ok(Some(r)) = s.handle(&flooder(i).discover(None), t(1)) {
            assert!(
                offered.insert(decode(&r).yiaddr()),
                "an address offered twice"
            );
        }
    }
    assert_eq!(offered.len(), 1024, "offers held at once");
    assert!(
        !offered.contains(&bound),
        "the bound address is not offered to others"
    );
    assert_eq!(s.counters().exhausted, 3000 - 1024);
    // Asking for a free address of its own does not get a new MAC past the limit either.
    for i in 0..100u32 {
        let want = std::net::Ipv4Addr::new(10, 0, 200, i as u8 + 1);
        let r = s.handle(&flooder(10_000 + i).discover(Some(want)), t(1));
        assert!(
            matches!(r, Err(dhcp::DropReason::PoolExhausted(..))),
            "{r:?}"
        );
    }
    // The known client renews its binding and rediscovers its address all the same.
    let r = s.handle(&known.discover(None), t(2)).unwrap().unwrap();
    assert_eq!(decode(&r).yiaddr(), bound);
    // The offers expire: a new client gets one again.
    let r = s
        .handle(&flooder(5000).discover(None), t(100))
        .unwrap()
        .unwrap();
    assert_eq!(msg_type(&r), MessageType::Offer);
}
