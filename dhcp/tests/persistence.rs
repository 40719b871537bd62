//! Leases survive a restart through store::save / store::load.

mod common;

use common::*;
use dhcp::{store, Lease, Server};
use dhcproto::v4::MessageType;

#[test]
fn restored_mac_gets_its_address() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dhcp-leases.json");
    let (a, b) = (Client::new(1), Client::new(2));
    {
        let mut s = server();
        assert_eq!(a.dora(&mut s, t(0)), ip(15));
        assert_eq!(b.dora(&mut s, t(0)), ip(16));
        store::save(&path, &s.leases()).unwrap();
    }
    let saved = store::load(&path).unwrap();
    assert_eq!(saved.len(), 2);
    let mut s = Server::new(config(), saved.clone()).unwrap();
    assert_eq!(s.leases(), saved);
    // B comes back first; it still gets .16, and a new guest gets .17.
    assert_eq!(b.dora(&mut s, t(100)), ip(16));
    assert_eq!(Client::new(3).dora(&mut s, t(100)), ip(17));
    // A renews straight away (its client kept running across our restart).
    let r = s.handle(&a.renew(ip(15)), t(200)).unwrap().unwrap();
    assert_eq!(msg_type(&r), MessageType::Ack);
}

#[test]
fn expired_saved_lease_still_preferred() {
    let saved = vec![Lease {
        ip: ip(42),
        mac: mac(1),
        expires: T0 - 100_000,
        hostname: Some("old".into()),
    }];
    let mut s = Server::new(config(), saved).unwrap();
    assert_eq!(Client::new(2).dora(&mut s, t(0)), ip(15));
    let a = Client::new(1);
    let r = s.handle(&a.init_reboot(ip(42)), t(0)).unwrap().unwrap();
    assert_eq!(msg_type(&r), MessageType::Ack);
    let l = s.leases().into_iter().find(|l| l.mac == a.mac).unwrap();
    assert_eq!(
        (l.ip, l.expires, l.hostname.as_deref()),
        (ip(42), T0 + 3600, Some("old"))
    );
}

#[test]
fn saved_leases_that_no_longer_fit_are_dropped() {
    let mut cfg = config();
    cfg.static_leases = vec![(ip(30), mac(9))];
    let lease = |last, m, expires| Lease {
        ip: ip(last),
        mac: mac(m),
        expires,
        hostname: None,
    };
    let saved = vec![
        lease(10, 1, T0),      // outside the pool
        lease(3, 2, T0),       // reserved
        lease(30, 3, T0),      // someone else's static address
        lease(31, 9, T0),      // static MAC with another address
        lease(40, 4, T0),      // duplicate IP, older: dropped
        lease(40, 5, T0 + 10), // duplicate IP, newer: kept
        lease(50, 6, T0),      // duplicate MAC, older: dropped
        lease(51, 6, T0 + 10), // kept
        lease(30, 9, T0),      // the static binding itself: kept
        Lease {
            ip: "10.0.0.5".parse().unwrap(),
            mac: mac(7),
            expires: T0,
            hostname: None,
        },
    ];
    let s = Server::new(cfg, saved).unwrap();
    let kept: Vec<_> = s.leases().iter().map(|l| (l.ip, l.mac)).collect();
    assert_eq!(
        kept,
        vec![(ip(30), mac(9)), (ip(40), mac(5)), (ip(51), mac(6))]
    );
}

#[test]
fn invalid_config_is_rejected() {
    let mut cfg = config();
    cfg.pool_start = ip(200);
    cfg.pool_end = ip(100);
    let e = Server::new(cfg, vec![]).unwrap_err();
    assert!(e.to_string().contains("after pool end"), "{e}");
}
