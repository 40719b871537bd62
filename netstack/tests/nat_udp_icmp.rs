//! The NAT's UDP and ICMP against real sockets on 127.0.0.1 (the host address maps there): echo
//! servers, closed ports, idle timeouts, ping. Only loopback traffic; safe as root in the root
//! namespace. The ping tests need an ICMP socket (ping sockets allowed by
//! `net.ipv4.ping_group_range`, or root for a raw socket) and pass vacuously without one.
//!
//! `routed_errors_through_a_router` (ignored) needs a router namespace; see its docs.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use netstack::ipv4frag::{Reassembler, Reassembly, ReassemblyConfig};
use netstack::nat::{Nat, NatConfig, NatStats};
use netstack::Routed;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, Icmpv4DstUnreachable, Icmpv4Packet, Icmpv4Repr, IpProtocol,
    Ipv4Packet, UdpPacket,
};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

const GW_MAC: [u8; 6] = [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xdd];
const GUEST_MAC: [u8; 6] = [0x52, 0x55, 0x55, 0x00, 0x00, 0x01];
const HOST: Ipv4Addr = Ipv4Addr::new(192, 168, 5, 2);
const DNS: Ipv4Addr = Ipv4Addr::new(192, 168, 5, 3);
const GUEST: Ipv4Addr = Ipv4Addr::new(192, 168, 5, 15);
const MTU: u16 = 1500;

struct Harness {
    nat: Nat,
    frames: mpsc::UnboundedReceiver<Bytes>,
    reassembler: Reassembler,
}

impl Harness {
    fn new() -> Harness {
        Harness::with(|_| {})
    }

    fn with(tweak: impl FnOnce(&mut NatConfig)) -> Harness {
        let mut config = NatConfig::new(GW_MAC, MTU, Ipv4Addr::new(192, 168, 5, 0), 24, HOST, DNS);
        tweak(&mut config);
        let (tx, frames) = mpsc::unbounded_channel();
        let sink = Arc::new(move |f: Bytes, _partial| {
            let _ = tx.send(f);
        });
        Harness {
            nat: Nat::new(config, sink),
            frames,
            reassembler: Reassembler::new(ReassemblyConfig::default()),
        }
    }

    fn udp(&self, src_port: u16, dst: SocketAddrV4, ttl: u8, payload: &[u8]) {
        self.nat.route(Routed::Udp {
            src_mac: GUEST_MAC,
            src: SocketAddrV4::new(GUEST, src_port),
            dst,
            ttl,
            payload: payload.to_vec(),
        });
    }

    fn icmp(&self, dst: Ipv4Addr, ttl: u8, message: Vec<u8>) {
        self.nat.route(Routed::Icmp {
            src_mac: GUEST_MAC,
            src: GUEST,
            dst,
            ttl,
            message,
        });
    }

    /// The next IPv4 packet to the guest (reassembled from fragments), within `timeout`.
    async fn next_ip(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.frames.recv())
                .await
                .ok()??;
            let eth = EthernetFrame::new_checked(&frame[..]).expect("ethernet frame");
            assert_eq!(eth.src_addr().0, GW_MAC);
            assert_eq!(eth.dst_addr().0, GUEST_MAC);
            assert_eq!(eth.ethertype(), EthernetProtocol::Ipv4);
            let ip = Ipv4Packet::new_checked(eth.payload()).expect("ipv4 packet");
            assert!(ip.verify_checksum());
            assert!(
                usize::from(ip.total_len()) <= usize::from(MTU),
                "frame over the MTU"
            );
            let ip = &eth.payload()[..usize::from(ip.total_len())];
            match self.reassembler.push(ip, Instant::now()) {
                Reassembly::NotFragment => return Some(ip.to_vec()),
                Reassembly::Complete(p) => return Some(p),
                Reassembly::Pending => continue,
                Reassembly::Dropped(why) => panic!("fragment dropped: {why}"),
            }
        }
    }

    async fn expect_ip(&mut self) -> Vec<u8> {
        match self.next_ip(Duration::from_secs(5)).await {
            Some(p) => p,
            None => panic!("no packet to the guest: {:?}", self.nat.stats()),
        }
    }

    /// Wait (bounded) until `cond` holds on the stats.
    async fn wait_stats(&self, what: &str, cond: impl Fn(&NatStats) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond(&self.nat.stats()) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {:?}",
                self.nat.stats()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A UDP echo server on 127.0.0.1.
async fn udp_echo() -> u16 {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = sock.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let _ = sock.send_to(&buf[..n], from).await;
        }
    });
    port
}

/// A UDP port on 127.0.0.1 that nothing listens on: the discard port, which no test binds (a
/// port picked free and let go could be another test process's by now).
fn closed_port() -> u16 {
    9
}

/// (src, dst, src port, dst port, payload) of a UDP packet.
fn parse_udp(ip: &[u8]) -> (Ipv4Addr, Ipv4Addr, u16, u16, Vec<u8>) {
    let ip = Ipv4Packet::new_checked(ip).unwrap();
    assert_eq!(ip.next_header(), IpProtocol::Udp);
    let udp = UdpPacket::new_checked(ip.payload()).unwrap();
    assert!(udp.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()));
    (
        ip.src_addr(),
        ip.dst_addr(),
        udp.src_port(),
        udp.dst_port(),
        udp.payload().to_vec(),
    )
}

/// (src, dst, ICMP message) of an ICMP packet, checksum checked.
fn parse_icmp(ip: &[u8]) -> (Ipv4Addr, Ipv4Addr, Vec<u8>) {
    let ip = Ipv4Packet::new_checked(ip).unwrap();
    assert_eq!(ip.next_header(), IpProtocol::Icmp);
    let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
    assert!(icmp.verify_checksum());
    (ip.src_addr(), ip.dst_addr(), ip.payload().to_vec())
}

fn echo_request(ident: u16, seq_no: u16, data: &[u8]) -> Vec<u8> {
    let repr = Icmpv4Repr::EchoRequest {
        ident,
        seq_no,
        data,
    };
    let mut m = vec![0u8; repr.buffer_len()];
    repr.emit(
        &mut Icmpv4Packet::new_unchecked(&mut m[..]),
        &ChecksumCapabilities::default(),
    );
    m
}

/// What an ICMP error to the guest says: (type, code, quoted IP header, quoted 8 bytes).
fn parse_error(message: &[u8]) -> (u8, u8, Ipv4Packet<Vec<u8>>, Vec<u8>) {
    let p = Icmpv4Packet::new_checked(message).unwrap();
    let quoted = p.data().to_vec();
    let inner = Ipv4Packet::new_unchecked(quoted[..20].to_vec());
    (
        p.msg_type().into(),
        p.msg_code(),
        inner,
        quoted[20..28].to_vec(),
    )
}

fn type_code(message: &[u8]) -> (u8, u8) {
    let (t, c, _, _) = parse_error(message);
    (t, c)
}

#[tokio::test]
async fn udp_echo_through_the_host_address() {
    let mut h = Harness::new();
    let port = udp_echo().await;
    let dst = SocketAddrV4::new(HOST, port);
    let mut carried = 0;
    for (i, len) in [1usize, 1400, 60000].into_iter().enumerate() {
        let payload: Vec<u8> = (0..len).map(|b| (b * 7 + i) as u8).collect();
        h.udp(40000, dst, 64, &payload);
        let ip = h.expect_ip().await;
        let (src, to, sport, dport, got) = parse_udp(&ip);
        // From the address the guest sent to, not 127.0.0.1.
        assert_eq!((src, to, sport, dport), (HOST, GUEST, port, 40000));
        assert_eq!(got.len(), len);
        assert!(got == payload, "payload of {len} bytes changed");
        carried += len as u64;
    }
    let s = h.nat.stats().udp;
    assert_eq!(
        (s.opened, s.open),
        (1, 1),
        "one flow for one guest port and destination"
    );
    assert_eq!((s.bytes_from_guest, s.bytes_to_guest), (carried, carried));

    // Another guest port is another flow.
    h.udp(40001, dst, 64, b"second");
    let (_, _, _, dport, got) = parse_udp(&h.expect_ip().await);
    assert_eq!((dport, &got[..]), (40001, &b"second"[..]));
    assert_eq!(h.nat.stats().udp.opened, 2);
}

#[tokio::test]
async fn udp_largest_datagram_both_ways() {
    let mut h = Harness::new();
    let port = udp_echo().await;
    let payload: Vec<u8> = (0..65507usize).map(|b| (b % 251) as u8).collect();
    h.udp(40000, SocketAddrV4::new(HOST, port), 64, &payload);
    let (_, _, _, _, got) = parse_udp(&h.expect_ip().await);
    assert!(got == payload);
}

#[tokio::test]
async fn udp_to_a_closed_port_is_port_unreachable() {
    let mut h = Harness::new();
    let port = closed_port();
    h.udp(40000, SocketAddrV4::new(HOST, port), 64, b"anyone?");
    let (src, to, msg) = parse_icmp(&h.expect_ip().await);
    assert_eq!((src, to), (HOST, GUEST));
    let (ty, code, inner, head) = parse_error(&msg);
    assert_eq!((ty, code), (3, 3), "port unreachable");
    assert_eq!(
        (inner.src_addr(), inner.dst_addr(), inner.next_header()),
        (GUEST, HOST, IpProtocol::Udp)
    );
    assert_eq!(&head[..4], &[0x9c, 0x40, (port >> 8) as u8, port as u8]);
    assert_eq!(u16::from_be_bytes([head[4], head[5]]), 8 + 7);
    h.wait_stats("errors_to_guest", |s| s.icmp.errors_to_guest == 1)
        .await;

    // The flow stays usable, and each datagram to the closed port is answered again.
    h.udp(40000, SocketAddrV4::new(HOST, port), 64, b"still?");
    let (_, _, msg) = parse_icmp(&h.expect_ip().await);
    assert_eq!(type_code(&msg), (3, 3));
    let s = h.nat.stats();
    assert_eq!((s.udp.opened, s.icmp.errors_to_guest), (1, 2));
}

#[tokio::test]
async fn udp_to_a_refused_destination() {
    let mut h = Harness::with(|c| c.host_loopback = false);
    h.udp(40000, SocketAddrV4::new(HOST, udp_echo().await), 64, b"x");
    let (src, _, msg) = parse_icmp(&h.expect_ip().await);
    assert_eq!(src, HOST);
    assert_eq!(type_code(&msg), (3, 3));
    h.udp(40000, SocketAddrV4::new(DNS, 9999), 64, b"x");
    let (src, _, msg) = parse_icmp(&h.expect_ip().await);
    assert_eq!(src, DNS);
    assert_eq!(type_code(&msg), (3, 3));
    let s = h.nat.stats().udp;
    assert_eq!((s.refused, s.opened), (2, 0));
}

#[tokio::test]
async fn udp_ttl_one_is_exceeded_at_the_gateway() {
    let mut h = Harness::new();
    h.udp(
        40000,
        SocketAddrV4::new(HOST, udp_echo().await),
        1,
        b"trace",
    );
    let (src, _, msg) = parse_icmp(&h.expect_ip().await);
    assert_eq!(src, HOST);
    let (ty, code, inner, _) = parse_error(&msg);
    assert_eq!((ty, code), (11, 0));
    assert_eq!(
        (inner.next_header(), inner.hop_limit()),
        (IpProtocol::Udp, 1)
    );
    assert_eq!(h.nat.stats().udp.opened, 0);
    // TTL 2 goes through (one hop left: the host's loopback).
    h.udp(
        40000,
        SocketAddrV4::new(HOST, udp_echo().await),
        2,
        b"trace",
    );
    let (_, _, _, _, got) = parse_udp(&h.expect_ip().await);
    assert_eq!(got, b"trace");
}

#[tokio::test]
async fn udp_flows_time_out_when_idle() {
    let mut h = Harness::with(|c| c.udp_timeout = Duration::from_millis(300));
    let port = udp_echo().await;
    for guest_port in [40000, 40001, 40002] {
        h.udp(guest_port, SocketAddrV4::new(HOST, port), 64, b"ping");
        h.expect_ip().await;
    }
    assert_eq!(h.nat.stats().udp.open, 3);
    h.wait_stats("the flows to close", |s| s.udp.open == 0)
        .await;
    assert_eq!(h.nat.stats().udp.closed, 3);
    // And a new datagram opens a new flow.
    h.udp(40000, SocketAddrV4::new(HOST, port), 64, b"again");
    let (_, _, _, _, got) = parse_udp(&h.expect_ip().await);
    assert_eq!(got, b"again");
    assert_eq!(h.nat.stats().udp.opened, 4);
}

#[tokio::test]
async fn udp_replies_keep_a_flow_alive() {
    let mut h = Harness::with(|c| c.udp_timeout = Duration::from_millis(400));
    // A server that keeps sending to the guest's flow, every 100 ms.
    let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = server.local_addr().unwrap().port();
    h.udp(40000, SocketAddrV4::new(HOST, port), 64, b"subscribe");
    let mut buf = [0u8; 64];
    let (_, flow) = tokio::time::timeout(Duration::from_secs(5), server.recv_from(&mut buf))
        .await
        .expect("the datagram reaches the server")
        .unwrap();
    for _ in 0..8 {
        server.send_to(b"tick", flow).await.unwrap();
        let (_, _, _, _, got) = parse_udp(&h.expect_ip().await);
        assert_eq!(got, b"tick");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = h.nat.stats().udp;
    assert_eq!((s.opened, s.open, s.closed), (1, 1, 0));
}

/// Whether the NAT found an ICMP socket; if not, the ping tests pass vacuously.
fn no_icmp_socket(h: &Harness) -> bool {
    let s = h.nat.stats().icmp;
    if s.drop_no_socket > 0 {
        eprintln!("no ICMP socket on this host (not root, ping_group_range): ping not tested");
        return true;
    }
    false
}

#[tokio::test]
async fn ping_through_the_host_address() {
    let mut h = Harness::new();
    let data: Vec<u8> = (0..56u8).collect();
    h.icmp(HOST, 64, echo_request(0x4242, 1, &data));
    let Some(ip) = h.next_ip(Duration::from_secs(3)).await else {
        assert!(no_icmp_socket(&h), "no echo reply: {:?}", h.nat.stats());
        return;
    };
    let (src, to, msg) = parse_icmp(&ip);
    assert_eq!((src, to), (HOST, GUEST));
    let p = Icmpv4Packet::new_checked(&msg[..]).unwrap();
    let repr = Icmpv4Repr::parse(&p, &ChecksumCapabilities::default()).unwrap();
    assert_eq!(
        repr,
        Icmpv4Repr::EchoReply {
            ident: 0x4242,
            seq_no: 1,
            data: &data
        }
    );
    // More echoes of the same ping, a big one among them (its reply comes in fragments).
    for (seq, len) in [(2u16, 56usize), (3, 4000), (4, 0)] {
        let data: Vec<u8> = (0..len).map(|b| (b as u8) ^ seq as u8).collect();
        h.icmp(HOST, 64, echo_request(0x4242, seq, &data));
        let (_, _, msg) = parse_icmp(&h.expect_ip().await);
        let p = Icmpv4Packet::new_checked(&msg[..]).unwrap();
        assert_eq!(
            Icmpv4Repr::parse(&p, &ChecksumCapabilities::default()).unwrap(),
            Icmpv4Repr::EchoReply {
                ident: 0x4242,
                seq_no: seq,
                data: &data
            }
        );
    }
    // Another identifier (another ping process) gets its own replies.
    h.icmp(HOST, 64, echo_request(7, 1, b"other"));
    let (_, _, msg) = parse_icmp(&h.expect_ip().await);
    let p = Icmpv4Packet::new_checked(&msg[..]).unwrap();
    assert_eq!(
        (p.echo_ident(), p.echo_seq_no(), p.data()),
        (7, 1, &b"other"[..])
    );
    let s = h.nat.stats().icmp;
    assert_eq!((s.echo_requests, s.echo_replies), (5, 5));
    // Nothing else came (no duplicates).
    assert!(h.next_ip(Duration::from_millis(200)).await.is_none());
}

#[tokio::test]
async fn ping_to_a_refused_destination_is_not_answered() {
    let mut h = Harness::new();
    h.icmp(DNS, 64, echo_request(1, 1, b"hello"));
    assert!(
        h.next_ip(Duration::from_secs(1)).await.is_none(),
        "no reply may be made up"
    );
    let s = h.nat.stats().icmp;
    assert_eq!((s.refused, s.echo_requests, s.echo_replies), (1, 0, 0));

    let mut h = Harness::with(|c| c.host_loopback = false);
    h.icmp(HOST, 64, echo_request(1, 1, b"hello"));
    assert!(h.next_ip(Duration::from_secs(1)).await.is_none());
}

#[tokio::test]
async fn ping_ttl_one_is_exceeded_at_the_gateway() {
    let mut h = Harness::new();
    let req = echo_request(9, 3, b"trace");
    h.icmp(HOST, 1, req.clone());
    let (src, _, msg) = parse_icmp(&h.expect_ip().await);
    assert_eq!(src, HOST);
    let (ty, code, inner, head) = parse_error(&msg);
    assert_eq!((ty, code, inner.next_header()), (11, 0, IpProtocol::Icmp));
    assert_eq!(head, req[..8]);
    assert_eq!(h.nat.stats().icmp.echo_requests, 0);
}

#[tokio::test]
async fn other_icmp_from_guests_is_not_forwarded() {
    let mut h = Harness::new();
    // An echo reply and a port unreachable from the guest.
    let repr = Icmpv4Repr::EchoReply {
        ident: 1,
        seq_no: 1,
        data: b"x",
    };
    let mut m = vec![0u8; repr.buffer_len()];
    repr.emit(
        &mut Icmpv4Packet::new_unchecked(&mut m[..]),
        &ChecksumCapabilities::default(),
    );
    h.icmp(HOST, 64, m);
    h.icmp(HOST, 64, vec![3, 3, 0, 0, 0, 0, 0, 0]);
    h.icmp(HOST, 64, vec![8, 0, 0]);
    assert!(h.next_ip(Duration::from_millis(300)).await.is_none());
    let s = h.nat.stats().icmp;
    assert_eq!((s.drop_unsupported, s.echo_requests), (3, 0));
}

/// Host-side ICMP errors from a router. Needs a router: run the test binary, with `--ignored`,
/// in a namespace whose default route goes to another namespace that forwards, with
/// `NAT_TEST_ROUTER` its address, `NAT_TEST_FAR` an address past it and `NAT_TEST_UNREACHABLE`
/// one it has an `unreachable` route for. As root:
///
/// ```sh
/// ip netns add nat-a; ip netns add nat-r
/// ip link add va netns nat-a type veth peer name vr netns nat-r
/// ip -n nat-a addr add 10.1.0.1/24 dev va; ip -n nat-r addr add 10.1.0.2/24 dev vr
/// for n in nat-a nat-r; do ip -n $n link set lo up; done
/// ip -n nat-a link set va up; ip -n nat-r link set vr up
/// ip -n nat-a route add default via 10.1.0.2
/// ip netns exec nat-r sysctl -qw net.ipv4.ip_forward=1
/// ip -n nat-r link add d0 type dummy; ip -n nat-r link set d0 up
/// ip -n nat-r route add 10.9.0.0/16 dev d0; ip -n nat-r route add unreachable 10.8.0.0/16
/// NAT_TEST_ROUTER=10.1.0.2 NAT_TEST_FAR=10.9.9.9 NAT_TEST_UNREACHABLE=10.8.8.8 \
///   ip netns exec nat-a target/debug/deps/nat_udp_icmp-* --ignored
/// ip netns del nat-a; ip netns del nat-r
/// ```
#[tokio::test]
#[ignore]
async fn routed_errors_through_a_router() {
    let env = |k: &str| {
        std::env::var(k)
            .unwrap_or_else(|_| panic!("{k} not set"))
            .parse::<Ipv4Addr>()
            .unwrap()
    };
    let (router, far, unreachable) = (
        env("NAT_TEST_ROUTER"),
        env("NAT_TEST_FAR"),
        env("NAT_TEST_UNREACHABLE"),
    );
    let mut h = Harness::new();

    // UDP with TTL 2: one hop left after the gateway, which the router uses up.
    h.udp(40000, SocketAddrV4::new(far, 33434), 2, b"probe");
    let (src, _, msg) = parse_icmp(&h.expect_ip().await);
    let (ty, code, inner, head) = parse_error(&msg);
    assert_eq!(
        (src, ty, code),
        (router, 11, 0),
        "TTL exceeded from the router"
    );
    assert_eq!((inner.src_addr(), inner.dst_addr()), (GUEST, far));
    assert_eq!(&head[..4], &[0x9c, 0x40, 0x82, 0x9a]);

    // Ping with TTL 2: likewise, quoting the guest's echo.
    let req = echo_request(0x77, 1, b"probe");
    h.icmp(far, 2, req.clone());
    if let Some(ip) = h.next_ip(Duration::from_secs(3)).await {
        let (src, _, msg) = parse_icmp(&ip);
        let (ty, code, inner, head) = parse_error(&msg);
        assert_eq!(
            (src, ty, code, inner.next_header()),
            (router, 11, 0, IpProtocol::Icmp)
        );
        assert_eq!(head, req[..8]);
    } else {
        assert!(no_icmp_socket(&h));
    }

    // UDP to an unreachable network: host unreachable from the router.
    h.udp(40000, SocketAddrV4::new(unreachable, 9), 64, b"x");
    let (src, _, msg) = parse_icmp(&h.expect_ip().await);
    let (ty, code, _, _) = parse_error(&msg);
    assert_eq!((src, ty), (router, 3));
    let net_or_host = [
        Icmpv4DstUnreachable::NetUnreachable,
        Icmpv4DstUnreachable::HostUnreachable,
    ];
    assert!(
        net_or_host.map(u8::from).contains(&code),
        "unreachable code {code}"
    );

    let s = h.nat.stats();
    assert!(s.icmp.errors_to_guest >= 2, "{s:?}");
}

/// A UDP forward listening on IPv6 takes datagrams no IPv4 packet carries (65508-65527
/// bytes): each is dropped and counted, and the forward goes on (it used to panic building
/// the IPv4 header, which ended the forward's task).
#[tokio::test]
async fn forward_drops_datagrams_too_long_for_ipv4_and_goes_on() {
    let mut h = Harness::new();
    h.nat.learn_neighbor(GUEST, GUEST_MAC);
    let Ok(sock) = UdpSocket::bind("[::1]:0").await else {
        eprintln!("SKIPPED: no IPv6 loopback");
        return;
    };
    let addr = sock.local_addr().unwrap();
    let nat = h.nat.clone();
    let forward =
        tokio::spawn(async move { nat.forward_udp(sock, SocketAddrV4::new(GUEST, 9)).await });
    let client = UdpSocket::bind("[::1]:0").await.unwrap();
    let delivered = |p: &[u8]| {
        UdpPacket::new_checked(Ipv4Packet::new_checked(p).unwrap().payload())
            .unwrap()
            .payload()
            .len()
    };
    client.send_to(&[1u8; 100], addr).await.unwrap();
    let p = h.expect_ip().await;
    assert_eq!(delivered(&p), 100);
    for n in [65508usize, 65527] {
        client.send_to(&vec![7u8; n], addr).await.unwrap();
    }
    h.wait_stats("two datagrams dropped at the limit", |s| {
        s.udp.drop_limit >= 2
    })
    .await;
    client.send_to(&[2u8; 200], addr).await.unwrap();
    let p = h.expect_ip().await;
    assert_eq!(delivered(&p), 200, "the forward carries on after them");
    assert!(
        !forward.is_finished(),
        "the forward's task is still running"
    );
    // The largest IPv4 datagram still goes through (in fragments).
    client.send_to(&vec![3u8; 65507], addr).await.unwrap();
    let p = h.expect_ip().await;
    assert_eq!(delivered(&p), 65507);
    forward.abort();
}

/// A guest sending from ever new source addresses outside the subnet does not make the NAT
/// forget the others (it cleared its whole neighbour table at 4096): a forward still
/// reaches the guest it knew.
#[tokio::test]
async fn sprayed_source_addresses_do_not_wipe_the_neighbours() {
    let mut h = Harness::new();
    h.nat.learn_neighbor(GUEST, GUEST_MAC);
    for i in 0..10_000u32 {
        let mac = [0x52, 0x56, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8];
        h.nat.learn_neighbor(Ipv4Addr::from(0x0a00_0000 + i), mac);
    }
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let nat = h.nat.clone();
    let forward =
        tokio::spawn(async move { nat.forward_udp(sock, SocketAddrV4::new(GUEST, 9)).await });
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.send_to(&[1u8; 100], addr).await.unwrap();
    let p = h.expect_ip().await;
    assert_eq!(Ipv4Packet::new_checked(&p[..]).unwrap().dst_addr(), GUEST);
    forward.abort();
}

/// Host datagrams that a flow's socket holds one after the other reach a guest that takes
/// offloaded frames gathered by size: a run of one size in one frame (`Partial::segment`),
/// a shorter one ending its run, an empty one on its own (never swallowed by a run), one
/// longer than the run's starting a new one, one too long for the MTU alone (fragmented).
/// Cut apart, the frames give back every datagram in order.
#[tokio::test]
async fn host_datagrams_are_gathered_by_size_for_an_offload_guest() {
    use netstack::nat::LargeSegments;
    use netstack::offload::Partial;
    let mut config = NatConfig::new(GW_MAC, MTU, Ipv4Addr::new(192, 168, 5, 0), 24, HOST, DNS);
    config.large_segments = Some(LargeSegments(Arc::new(|_| true)));
    let (tx, mut frames) = mpsc::unbounded_channel::<(Bytes, Option<Partial>)>();
    let nat = Nat::new(
        config,
        Arc::new(move |f: Bytes, p| {
            let _ = tx.send((f, p));
        }),
    );
    let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let dst = SocketAddrV4::new(HOST, server.local_addr().unwrap().port());
    nat.route(Routed::Udp {
        src_mac: GUEST_MAC,
        src: SocketAddrV4::new(GUEST, 40300),
        dst,
        ttl: 64,
        payload: b"open".to_vec(),
    });
    let mut buf = [0u8; 2048];
    let (_, flow) = server.recv_from(&mut buf).expect("the guest's datagram");
    // Sent back to back without yielding: all queued on the flow's socket before it reads.
    let sizes = [800, 800, 0, 800, 800, 300, 1472, 2000, 600];
    let sent: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| (0..n).map(|j| (i * 31 + j) as u8).collect())
        .collect();
    for d in &sent {
        server.send_to(d, flow).unwrap();
    }
    // What reaches the guest, cut apart and reassembled.
    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut segments = Vec::new();
    let mut reassembler = Reassembler::new(ReassemblyConfig::default());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while got.len() < sent.len() {
        let Ok(Some((frame, partial))) = tokio::time::timeout_at(deadline, frames.recv()).await
        else {
            panic!("only {} of {} datagrams: {got:?}", got.len(), sent.len());
        };
        let pieces = match partial.filter(|p| p.segment > 0) {
            Some(p) => {
                segments.push((usize::from(p.segment), frame.len()));
                netstack::offload::segment_udp4(&frame, usize::from(p.segment))
                    .expect("a frame of datagrams that holds together")
            }
            None => vec![frame],
        };
        for piece in pieces {
            let ip = Ipv4Packet::new_checked(&piece[14..]).expect("ipv4");
            let ip = &piece[14..14 + usize::from(ip.total_len())];
            let whole = match reassembler.push(ip, Instant::now()) {
                Reassembly::NotFragment => ip.to_vec(),
                Reassembly::Complete(p) => p,
                Reassembly::Pending => continue,
                Reassembly::Dropped(why) => panic!("fragment dropped: {why}"),
            };
            let ip = Ipv4Packet::new_checked(&whole[..]).unwrap();
            let udp = UdpPacket::new_checked(ip.payload()).unwrap();
            got.push(udp.payload().to_vec());
        }
    }
    let lens: Vec<usize> = got.iter().map(Vec::len).collect();
    assert_eq!(
        lens, sizes,
        "every datagram, in order, none merged or swallowed"
    );
    assert_eq!(got, sent);
    // 800+800 (ended by the empty one), 800+800+300; the rest alone.
    assert_eq!(
        segments,
        [(800, 14 + 28 + 1600), (800, 14 + 28 + 1900)],
        "runs gathered"
    );
    assert_eq!(nat.stats().udp.gathered_to_guest, 5);
}

/// A guest's datagrams on the fast path, from a thread that gathers them (a tap's reader):
/// runs of one size leave in one call, and the host gets every datagram in order, whole,
/// whatever the sizes (an empty one, a longer one, one over 16 KiB that goes alone).
#[tokio::test]
async fn guest_datagrams_gathered_on_the_fast_path_arrive_in_order() {
    let h = Harness::new();
    let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let dst = SocketAddrV4::new(HOST, server.local_addr().unwrap().port());
    let sizes = [
        1000, 1000, 1000, 0, 1000, 1000, 500, 2000, 20000, 1000, 1000,
    ];
    let sent: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| (0..n).map(|j| (i * 17 + j) as u8).collect())
        .collect();
    netstack::nat::gather_udp_sends();
    for d in &sent {
        h.nat.route_udp(
            GUEST_MAC,
            SocketAddrV4::new(GUEST, 40301),
            dst,
            64,
            Bytes::from(d.clone()),
        );
    }
    netstack::nat::flush_udp_sends();
    let mut buf = vec![0u8; 65536];
    let mut got = Vec::new();
    while got.len() < sent.len() {
        let n = server
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("after {} datagrams: {e}: {:?}", got.len(), h.nat.stats()));
        got.push(buf[..n].to_vec());
    }
    assert_eq!(got, sent, "every datagram, in order, whole");
    let st = h.nat.stats();
    assert!(
        st.udp.gathered_from_guest >= 4,
        "runs left gathered: {st:?}"
    );
}
