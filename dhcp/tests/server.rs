//! Protocol behaviour: DORA, allocation order, static leases, NAKs, renewal,
//! DECLINE, RELEASE, INFORM, pool exhaustion.

mod common;

use common::*;
use dhcp::{Destination, DropReason, Server};
use dhcproto::v4::{DhcpOption, MessageType, OptionCode};

#[test]
fn full_dora() {
    let mut s = server();
    let mut c = Client::new(1);
    c.hostname = Some("guest".into());
    let offer = s.handle(&c.discover(None), t(0)).unwrap().unwrap();
    let o = decode(&offer);
    assert_eq!(o.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(o.yiaddr(), ip(15));
    assert_eq!(o.xid(), c.xid);
    assert_eq!(offer.to, Destination::Broadcast);
    // An offer is not a lease yet.
    assert!(s.leases().is_empty());

    let ack = s.handle(&c.select(SERVER, ip(15)), t(1)).unwrap().unwrap();
    let a = decode(&ack);
    assert_eq!(a.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(a.yiaddr(), ip(15));
    assert_eq!(a.xid(), c.xid);
    let leases = s.leases();
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].ip, ip(15));
    assert_eq!(leases[0].mac, c.mac);
    assert_eq!(leases[0].expires, T0 + 1 + 3600);
    assert_eq!(leases[0].hostname.as_deref(), Some("guest"));

    let n = s.counters();
    assert_eq!((n.received, n.offers, n.acks, n.naks), (2, 1, 1, 0));
}

#[test]
fn first_guests_get_pool_start_upwards() {
    let mut s = server();
    let (a, b, c) = (Client::new(1), Client::new(2), Client::new(3));
    // Two clients discovering at once get different addresses.
    let oa = decode(&s.handle(&a.discover(None), t(0)).unwrap().unwrap()).yiaddr();
    let ob = decode(&s.handle(&b.discover(None), t(0)).unwrap().unwrap()).yiaddr();
    assert_eq!((oa, ob), (ip(15), ip(16)));
    // A repeated DISCOVER gets the same offer.
    let oa2 = decode(&s.handle(&a.discover(None), t(1)).unwrap().unwrap()).yiaddr();
    assert_eq!(oa2, ip(15));
    assert_eq!(
        msg_type(&s.handle(&b.select(SERVER, ip(16)), t(1)).unwrap().unwrap()),
        MessageType::Ack
    );
    assert_eq!(
        msg_type(&s.handle(&a.select(SERVER, ip(15)), t(1)).unwrap().unwrap()),
        MessageType::Ack
    );
    assert_eq!(c.dora(&mut s, t(2)), ip(17));
    // A bound client discovering again gets its binding.
    assert_eq!(a.dora(&mut s, t(3)), ip(15));
    assert_eq!(s.leases().len(), 3);
}

#[test]
fn offer_reservation_expires() {
    let mut s = server();
    let (a, b) = (Client::new(1), Client::new(2));
    s.handle(&a.discover(None), t(0)).unwrap();
    // Long after, A never requested: its reservation is gone.
    let ob = decode(&s.handle(&b.discover(None), t(600)).unwrap().unwrap()).yiaddr();
    assert_eq!(ob, ip(15));
    // A's late REQUEST for the address now offered to B is refused.
    let r = s
        .handle(&a.select(SERVER, ip(15)), t(601))
        .unwrap()
        .unwrap();
    assert_eq!(msg_type(&r), MessageType::Nak);
}

#[test]
fn requested_address_in_discover() {
    let mut s = server();
    let a = Client::new(1);
    let o = decode(&s.handle(&a.discover(Some(ip(100))), t(0)).unwrap().unwrap());
    assert_eq!(o.yiaddr(), ip(100));
    // Outside the pool, reserved, or the server's own: ignored.
    for bad in [ip(3), ip(2), ip(10), "10.0.0.7".parse().unwrap()] {
        let b = Client::new(2);
        let o = decode(&s.handle(&b.discover(Some(bad)), t(0)).unwrap().unwrap());
        assert_eq!(o.yiaddr(), ip(15), "requested {bad}");
    }
    // Someone else's binding: ignored.
    a.dora(&mut s, t(1));
    let c = Client::new(3);
    let o = decode(&s.handle(&c.discover(Some(ip(100))), t(2)).unwrap().unwrap());
    assert_ne!(o.yiaddr(), ip(100));
}

#[test]
fn static_lease_honoured() {
    let mut cfg = config();
    let st = Client::new(9);
    cfg.static_leases = vec![(ip(15), st.mac), (ip(5), mac(10))];
    let mut s = Server::new(cfg, vec![]).unwrap();
    let a = Client::new(1);
    // The static address is never handed to anyone else, even when requested.
    let o = decode(&s.handle(&a.discover(Some(ip(15))), t(0)).unwrap().unwrap());
    assert_eq!(o.yiaddr(), ip(16));
    let r = s.handle(&a.init_reboot(ip(15)), t(0)).unwrap().unwrap();
    assert_eq!(msg_type(&r), MessageType::Nak);
    // The static MAC gets its address, even if it asks for another.
    let o = decode(&s.handle(&st.discover(Some(ip(50))), t(0)).unwrap().unwrap());
    assert_eq!(o.yiaddr(), ip(15));
    assert_eq!(st.dora(&mut s, t(1)), ip(15));
    // Static outside the pool works too.
    assert_eq!(Client::new(10).dora(&mut s, t(1)), ip(5));
    let leases = s.leases();
    assert!(leases.iter().any(|l| l.ip == ip(15) && l.mac == st.mac));
    assert!(leases.iter().any(|l| l.ip == ip(5) && l.mac == mac(10)));
    // INIT-REBOOT for anything but the static address is NAKed.
    let r = s.handle(&st.init_reboot(ip(50)), t(2)).unwrap().unwrap();
    assert_eq!(msg_type(&r), MessageType::Nak);
    let r = s.handle(&st.init_reboot(ip(15)), t(2)).unwrap().unwrap();
    assert_eq!(msg_type(&r), MessageType::Ack);
}

#[test]
fn nak_for_someone_elses_address() {
    let mut s = server();
    let (a, b) = (Client::new(1), Client::new(2));
    assert_eq!(a.dora(&mut s, t(0)), ip(15));

    // INIT-REBOOT asking for A's address.
    let nak = s.handle(&b.init_reboot(ip(15)), t(1)).unwrap().unwrap();
    let m = decode(&nak);
    assert_eq!(m.opts().msg_type(), Some(MessageType::Nak));
    assert_eq!(nak.to, Destination::Broadcast);
    assert_eq!(m.yiaddr(), std::net::Ipv4Addr::UNSPECIFIED);
    assert_eq!(m.siaddr(), std::net::Ipv4Addr::UNSPECIFIED);
    assert_eq!(m.xid(), b.xid);
    assert_eq!(m.chaddr(), &b.mac.0);
    let codes: Vec<_> = m.opts().iter().map(|(c, _)| *c).collect();
    assert_eq!(
        codes,
        vec![
            OptionCode::MessageType,
            OptionCode::ServerIdentifier,
            OptionCode::Message
        ]
    );
    assert_eq!(
        m.opts().get(OptionCode::ServerIdentifier),
        Some(&DhcpOption::ServerIdentifier(SERVER))
    );

    // SELECTING an address we never offered.
    let r = s.handle(&b.select(SERVER, ip(15)), t(1)).unwrap().unwrap();
    assert_eq!(msg_type(&r), MessageType::Nak);
    let r = s.handle(&b.select(SERVER, ip(40)), t(1)).unwrap().unwrap();
    assert_eq!(msg_type(&r), MessageType::Nak);
    // INIT-REBOOT from another network.
    let r = s
        .handle(&b.init_reboot("10.0.2.15".parse().unwrap()), t(1))
        .unwrap()
        .unwrap();
    assert_eq!(msg_type(&r), MessageType::Nak);
    // RENEWING an address that is not B's.
    let r = s.handle(&b.renew(ip(15)), t(1)).unwrap().unwrap();
    assert_eq!(msg_type(&r), MessageType::Nak);
    assert_eq!(r.to, Destination::Broadcast);
    // A still has its lease.
    assert_eq!(s.leases().len(), 1);
    assert_eq!(s.leases()[0].mac, a.mac);

    // INIT-REBOOT for a free pool address is granted.
    let r = s.handle(&b.init_reboot(ip(40)), t(2)).unwrap().unwrap();
    assert_eq!(msg_type(&r), MessageType::Ack);
    assert_eq!(decode(&r).yiaddr(), ip(40));
    assert_eq!(s.counters().naks, 5);
}

#[test]
fn request_for_other_server_drops_offer() {
    let mut s = server();
    let (a, b) = (Client::new(1), Client::new(2));
    s.handle(&a.discover(None), t(0)).unwrap();
    let other = "192.168.5.1".parse().unwrap();
    assert_eq!(
        s.handle(&a.select(other, ip(15)), t(0)),
        Err(DropReason::NotForUs(other))
    );
    // The reservation is released: B gets .15 right away.
    assert_eq!(b.dora(&mut s, t(1)), ip(15));
    assert_eq!(s.counters().ignored, 1);
}

#[test]
fn renew_and_rebind_extend_the_lease() {
    let mut s = server();
    let mut a = Client::new(1);
    a.dora(&mut s, t(0));
    a.broadcast = false;
    let r = s.handle(&a.renew(ip(15)), t(1800)).unwrap().unwrap();
    let m = decode(&r);
    assert_eq!(m.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(m.yiaddr(), ip(15));
    assert_eq!(m.ciaddr(), ip(15));
    assert_eq!(
        r.to,
        Destination::Unicast {
            ip: ip(15),
            mac: a.mac
        }
    );
    assert_eq!(s.leases()[0].expires, T0 + 1800 + 3600);
    // Rebinding after expiry still works while nobody else took the address.
    let r = s.handle(&a.renew(ip(15)), t(10_000)).unwrap().unwrap();
    assert_eq!(msg_type(&r), MessageType::Ack);
    assert_eq!(s.leases()[0].expires, T0 + 10_000 + 3600);
    // INIT-REBOOT for its own address too.
    let r = s
        .handle(&a.init_reboot(ip(15)), t(10_001))
        .unwrap()
        .unwrap();
    assert_eq!(msg_type(&r), MessageType::Ack);
}

#[test]
fn hostname_updates_and_is_kept() {
    let mut s = server();
    let mut a = Client::new(1);
    a.hostname = Some("old".into());
    a.dora(&mut s, t(0));
    a.hostname = None;
    s.handle(&a.renew(ip(15)), t(10)).unwrap().unwrap();
    assert_eq!(s.leases()[0].hostname.as_deref(), Some("old"));
    a.hostname = Some("new name\u{7}with-junk".into());
    s.handle(&a.renew(ip(15)), t(20)).unwrap().unwrap();
    assert_eq!(s.leases()[0].hostname.as_deref(), Some("newnamewith-junk"));
    a.hostname = Some("x".repeat(200));
    s.handle(&a.renew(ip(15)), t(30)).unwrap().unwrap();
    assert_eq!(s.leases()[0].hostname.as_deref().map(str::len), Some(63));
}

#[test]
fn decline_quarantines_the_address() {
    let mut s = server();
    let (a, b) = (Client::new(1), Client::new(2));
    assert_eq!(a.dora(&mut s, t(0)), ip(15));
    assert_eq!(s.handle(&a.decline(ip(15)), t(1)), Ok(None));
    assert!(s.leases().is_empty());
    assert_eq!(s.counters().declines, 1);
    // Nobody gets .15 for a while, not even A.
    assert_eq!(a.dora(&mut s, t(2)), ip(16));
    assert_eq!(b.dora(&mut s, t(3)), ip(17));
    let r = s
        .handle(&Client::new(3).init_reboot(ip(15)), t(4))
        .unwrap()
        .unwrap();
    assert_eq!(msg_type(&r), MessageType::Nak);
    // An hour later it is back in the pool.
    assert_eq!(Client::new(4).dora(&mut s, t(3700)), ip(15));
    // Declining an address that isn't yours does nothing.
    assert_eq!(
        s.handle(&b.decline(ip(15)), t(3701)),
        Err(DropReason::UnknownLease {
            mac: b.mac,
            ip: ip(15)
        })
    );
    assert_eq!(s.leases().len(), 3);
}

#[test]
fn decline_of_an_offer() {
    let mut s = server();
    let a = Client::new(1);
    s.handle(&a.discover(None), t(0)).unwrap();
    // udhcpc declines after ACK; some clients decline the offer's address.
    assert_eq!(s.handle(&a.decline(ip(15)), t(1)), Ok(None));
    assert_eq!(a.dora(&mut s, t(2)), ip(16));
}

#[test]
fn release_returns_address_and_remembers_it() {
    let mut s = server();
    let (a, b) = (Client::new(1), Client::new(2));
    assert_eq!(a.dora(&mut s, t(0)), ip(15));
    assert_eq!(b.dora(&mut s, t(0)), ip(16));
    assert_eq!(s.handle(&b.release(ip(16)), t(1)), Ok(None));
    assert_eq!(s.leases().len(), 1);
    assert_eq!(s.counters().releases, 1);
    // Releasing again, or someone else's address: nothing to release.
    assert_eq!(
        s.handle(&b.release(ip(16)), t(1)),
        Err(DropReason::UnknownLease {
            mac: b.mac,
            ip: ip(16)
        })
    );
    assert!(matches!(
        s.handle(&b.release(ip(15)), t(1)),
        Err(DropReason::UnknownLease { .. })
    ));
    assert_eq!(s.handle(&a.release(ip(15)), t(2)), Ok(None));
    assert!(s.leases().is_empty());
    // B comes back first: it gets its old .16, not the lowest free .15.
    assert_eq!(b.dora(&mut s, t(3)), ip(16));
    // A released .15 and it's still free: A gets it back.
    assert_eq!(a.dora(&mut s, t(4)), ip(15));
    // A released address is genuinely free for others.
    assert_eq!(s.handle(&a.release(ip(15)), t(5)), Ok(None));
    assert_eq!(Client::new(3).dora(&mut s, t(6)), ip(15));
    assert_eq!(a.dora(&mut s, t(7)), ip(17));
}

#[test]
fn release_for_other_server_is_ignored() {
    let mut s = server();
    let a = Client::new(1);
    a.dora(&mut s, t(0));
    let mut m = a.base(MessageType::Release, ip(15));
    m.opts_mut().insert(DhcpOption::ServerIdentifier(ip(1)));
    assert_eq!(
        s.handle(&encode(&m), t(1)),
        Err(DropReason::NotForUs(ip(1)))
    );
    assert_eq!(s.leases().len(), 1);
}

#[test]
fn inform_gets_configuration_only() {
    let mut s = server();
    let mut a = Client::new(1);
    a.broadcast = false;
    let r = s.handle(&a.inform(ip(77)), t(0)).unwrap().unwrap();
    let m = decode(&r);
    assert_eq!(m.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(m.yiaddr(), std::net::Ipv4Addr::UNSPECIFIED);
    assert_eq!(m.ciaddr(), ip(77));
    assert_eq!(
        r.to,
        Destination::Unicast {
            ip: ip(77),
            mac: a.mac
        }
    );
    for absent in [
        OptionCode::AddressLeaseTime,
        OptionCode::Renewal,
        OptionCode::Rebinding,
    ] {
        assert!(m.opts().get(absent).is_none(), "{absent:?}");
    }
    for present in [
        OptionCode::ServerIdentifier,
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::DomainNameServer,
        OptionCode::BroadcastAddr,
        OptionCode::InterfaceMtu,
        OptionCode::DomainSearch,
    ] {
        assert!(m.opts().get(present).is_some(), "{present:?}");
    }
    assert!(s.leases().is_empty());
    assert_eq!(s.counters().informs, 1);
    assert_eq!(s.counters().acks, 0);
    // INFORM without ciaddr is invalid.
    assert!(matches!(
        s.handle(&a.inform(std::net::Ipv4Addr::UNSPECIFIED), t(0)),
        Err(DropReason::InvalidRequest(_))
    ));
}

#[test]
fn request_without_any_address_is_dropped() {
    let mut s = server();
    let a = Client::new(1);
    let m = a.base(MessageType::Request, std::net::Ipv4Addr::UNSPECIFIED);
    assert!(matches!(
        s.handle(&encode(&m), t(0)),
        Err(DropReason::InvalidRequest(_))
    ));
    let mut m = a.base(MessageType::Request, std::net::Ipv4Addr::UNSPECIFIED);
    m.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
    assert!(matches!(
        s.handle(&encode(&m), t(0)),
        Err(DropReason::InvalidRequest(_))
    ));
}

#[test]
fn pool_exhaustion_reclaims_longest_expired() {
    let mut cfg = config();
    cfg.pool_end = ip(17);
    cfg.lease_time = std::time::Duration::from_secs(60);
    let mut s = Server::new(cfg, vec![]).unwrap();
    let (a, b, c, d) = (
        Client::new(1),
        Client::new(2),
        Client::new(3),
        Client::new(4),
    );
    assert_eq!(b.dora(&mut s, t(0)), ip(15));
    assert_eq!(a.dora(&mut s, t(10)), ip(16));
    assert_eq!(c.dora(&mut s, t(20)), ip(17));
    // Full and nothing expired: no offer.
    assert_eq!(
        s.handle(&d.discover(None), t(30)),
        Err(DropReason::PoolExhausted(d.mac))
    );
    assert_eq!(s.counters().exhausted, 1);
    // B renews; A's lease (expired at t=70) is now the oldest.
    s.handle(&b.renew(ip(15)), t(50)).unwrap().unwrap();
    assert_eq!(d.dora(&mut s, t(200)), ip(16));
    let leases = s.leases();
    assert_eq!(leases.len(), 3);
    assert!(!leases.iter().any(|l| l.mac == a.mac));
    // A comes back and gets the next-oldest expired lease (C's, expired at t=80).
    assert_eq!(a.dora(&mut s, t(201)), ip(17));
    // B's expired lease is still B's.
    assert_eq!(b.dora(&mut s, t(202)), ip(15));
}

#[test]
fn expired_binding_is_kept_for_its_owner() {
    let mut s = server();
    let (a, b) = (Client::new(1), Client::new(2));
    assert_eq!(a.dora(&mut s, t(0)), ip(15));
    // Long expired, but the pool isn't exhausted: B gets a fresh address.
    assert_eq!(b.dora(&mut s, t(100_000)), ip(16));
    assert_eq!(a.dora(&mut s, t(100_001)), ip(15));
}

#[test]
fn relayed_messages_are_dropped() {
    let mut s = server();
    let a = Client::new(1);
    let mut m = a.base(MessageType::Discover, std::net::Ipv4Addr::UNSPECIFIED);
    m.set_giaddr(ip(1));
    assert_eq!(s.handle(&encode(&m), t(0)), Err(DropReason::Relayed(ip(1))));
    assert_eq!(s.counters().ignored, 1);
}

#[test]
fn counters_add_up() {
    let mut s = server();
    let a = Client::new(1);
    a.dora(&mut s, t(0));
    let _ = s.handle(&a.renew(ip(15)), t(1));
    let _ = s.handle(&Client::new(2).init_reboot(ip(15)), t(1));
    let _ = s.handle(&a.inform(ip(15)), t(1));
    let _ = s.handle(b"junk", t(1));
    let _ = s.handle(&a.release(ip(15)), t(1));
    let _ = s.handle(&a.release(ip(15)), t(1));
    let c = s.counters().clone();
    assert_eq!(c.received, 8);
    assert_eq!(
        c.offers
            + c.acks
            + c.naks
            + c.informs
            + c.declines
            + c.releases
            + c.malformed
            + c.exhausted
            + c.ignored,
        c.received
    );
    assert_eq!(
        (
            c.offers,
            c.acks,
            c.naks,
            c.informs,
            c.releases,
            c.malformed,
            c.ignored
        ),
        (1, 2, 1, 1, 1, 1, 1)
    );
}

#[test]
fn server_can_move_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Server>();
    assert_send_sync::<dhcp::Reply>();
    assert_send_sync::<DropReason>();
}
