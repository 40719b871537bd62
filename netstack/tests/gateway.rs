//! The gateway against crafted frames: what it answers, and that bad input is dropped and
//! counted, never panicked on.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Instant;

use netstack::{build_udp_frame, Gateway, GatewayConfig, L2Dest, Output};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Icmpv4Packet, Icmpv4Repr, IpProtocol, Ipv4Packet, Ipv4Repr,
};

const GW_MAC: [u8; 6] = [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xdd];
const GUEST_MAC: [u8; 6] = [0x52, 0x55, 0x55, 0x00, 0x00, 0x01];
const HOST: Ipv4Addr = Ipv4Addr::new(192, 168, 5, 2);
const DNS: Ipv4Addr = Ipv4Addr::new(192, 168, 5, 3);
const GUEST: Ipv4Addr = Ipv4Addr::new(192, 168, 5, 15);

fn gateway() -> Gateway {
    Gateway::new(GatewayConfig {
        mac: GW_MAC,
        host_ip: HOST,
        dns_ip: DNS,
        host_aliases: vec![],
        answer_host_ping: true,
        network: Ipv4Addr::new(192, 168, 5, 0),
        prefix: 24,
        mtu: 1500,
    })
}

fn arp_request(target: Ipv4Addr) -> Vec<u8> {
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(GUEST_MAC),
        source_protocol_addr: GUEST,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(GUEST_MAC),
        dst_addr: EthernetAddress::BROADCAST,
        ethertype: EthernetProtocol::Arp,
    };
    let mut buf = vec![0u8; eth.buffer_len() + arp.buffer_len()];
    let mut f = EthernetFrame::new_unchecked(&mut buf[..]);
    eth.emit(&mut f);
    arp.emit(&mut ArpPacket::new_unchecked(f.payload_mut()));
    buf
}

fn ping(dst: Ipv4Addr, data: &[u8]) -> Vec<u8> {
    let icmp = Icmpv4Repr::EchoRequest {
        ident: 7,
        seq_no: 9,
        data,
    };
    let ip = Ipv4Repr {
        src_addr: GUEST,
        dst_addr: dst,
        next_header: IpProtocol::Icmp,
        payload_len: icmp.buffer_len(),
        hop_limit: 64,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(GUEST_MAC),
        dst_addr: EthernetAddress(GW_MAC),
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut buf = vec![0u8; 14 + ip.buffer_len() + icmp.buffer_len()];
    let mut f = EthernetFrame::new_unchecked(&mut buf[..]);
    eth.emit(&mut f);
    let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
    ip.emit(&mut p, &ChecksumCapabilities::default());
    icmp.emit(
        &mut Icmpv4Packet::new_unchecked(p.payload_mut()),
        &ChecksumCapabilities::default(),
    );
    buf
}

fn frames(out: &[Output]) -> Vec<&Vec<u8>> {
    out.iter()
        .filter_map(|o| match o {
            Output::Frame(f) => Some(f),
            _ => None,
        })
        .collect()
}

#[test]
fn answers_arp_for_its_own_addresses_only() {
    let mut gw = gateway();
    let now = Instant::now();
    for ours in [HOST, DNS] {
        let mut out = Vec::new();
        gw.receive(&arp_request(ours), now, &mut out);
        let f = frames(&out);
        assert_eq!(f.len(), 1);
        let eth = EthernetFrame::new_checked(&f[0][..]).unwrap();
        assert_eq!(eth.dst_addr().0, GUEST_MAC);
        let arp = ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).unwrap()).unwrap();
        match arp {
            ArpRepr::EthernetIpv4 {
                operation,
                source_hardware_addr,
                source_protocol_addr,
                target_protocol_addr,
                ..
            } => {
                assert_eq!(operation, ArpOperation::Reply);
                assert_eq!(source_hardware_addr.0, GW_MAC);
                assert_eq!(source_protocol_addr, ours);
                assert_eq!(target_protocol_addr, GUEST);
            }
            _ => panic!("not an Ethernet/IPv4 ARP reply"),
        }
    }
    let mut out = Vec::new();
    gw.receive(&arp_request(Ipv4Addr::new(192, 168, 5, 16)), now, &mut out);
    assert!(
        out.is_empty(),
        "answered ARP for an address it does not own"
    );
    assert_eq!(gw.neighbor(GUEST, now), Some(GUEST_MAC));
    assert_eq!(gw.counters().arp_replies, 2);
}

/// A ping longer than the MTU (the guest fragments it) is answered in fragments that fit,
/// which reassemble to the whole reply (one frame of 3 KB was dropped by the switch for
/// every port that takes no large frames).
#[test]
fn answers_a_fragmented_ping_in_fragments() {
    use netstack::ipv4frag::{fragment, Reassembler, Reassembly, ReassemblyConfig};
    let mut gw = gateway();
    let data: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
    let whole = ping(DNS, &data);
    let mut ip = whole[14..].to_vec();
    Ipv4Packet::new_unchecked(&mut ip[..]).set_dont_frag(false);
    Ipv4Packet::new_unchecked(&mut ip[..]).fill_checksum();
    let mut out = Vec::new();
    for piece in fragment(&ip, 1500).unwrap() {
        let mut f = whole[..14].to_vec();
        f.extend_from_slice(&piece);
        gw.receive(&f, Instant::now(), &mut out);
    }
    let f = frames(&out);
    assert!(f.len() >= 3, "{} frames", f.len());
    let mut r = Reassembler::new(ReassemblyConfig::default());
    let mut reply = None;
    for frame in &f {
        assert!(frame.len() <= 14 + 1500, "a frame of {} bytes", frame.len());
        let eth = EthernetFrame::new_checked(&frame[..]).unwrap();
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        assert!(ip.verify_checksum());
        if let Reassembly::Complete(p) = r.push(eth.payload(), Instant::now()) {
            reply = Some(p);
        }
    }
    let reply = reply.expect("the fragments reassemble");
    let ip = Ipv4Packet::new_checked(&reply[..]).unwrap();
    assert_eq!((ip.src_addr(), ip.dst_addr()), (DNS, GUEST));
    let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
    match Icmpv4Repr::parse(&icmp, &ChecksumCapabilities::default()).unwrap() {
        Icmpv4Repr::EchoReply { data: d, .. } => assert_eq!(d, &data[..]),
        other => panic!("not an echo reply: {other:?}"),
    }
}

#[test]
fn answers_ping_to_its_addresses_with_the_same_payload() {
    let mut gw = gateway();
    let mut out = Vec::new();
    gw.receive(&ping(HOST, b"hello gateway"), Instant::now(), &mut out);
    let f = frames(&out);
    assert_eq!(f.len(), 1);
    let eth = EthernetFrame::new_checked(&f[0][..]).unwrap();
    let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
    assert!(ip.verify_checksum());
    assert_eq!((ip.src_addr(), ip.dst_addr()), (HOST, GUEST));
    let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
    assert!(icmp.verify_checksum());
    match Icmpv4Repr::parse(&icmp, &ChecksumCapabilities::default()).unwrap() {
        Icmpv4Repr::EchoReply {
            ident,
            seq_no,
            data,
        } => assert_eq!((ident, seq_no, data), (7, 9, &b"hello gateway"[..])),
        other => panic!("not an echo reply: {other:?}"),
    }
    // Nobody else is answered by the gateway itself.
    out.clear();
    gw.receive(
        &ping(Ipv4Addr::new(192, 168, 5, 77), b"x"),
        Instant::now(),
        &mut out,
    );
    assert!(frames(&out).is_empty());
}

#[test]
fn hands_dhcp_broadcasts_to_the_caller() {
    let mut gw = gateway();
    let frame = build_udp_frame(
        GUEST_MAC,
        L2Dest::Broadcast,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68),
        SocketAddrV4::new(Ipv4Addr::BROADCAST, 67),
        b"dhcp payload",
    );
    let mut out = Vec::new();
    gw.receive(&frame, Instant::now(), &mut out);
    match &out[..] {
        [Output::Udp(d)] => {
            assert_eq!(d.payload, b"dhcp payload");
            assert_eq!(d.src_mac, GUEST_MAC);
            assert_eq!(d.dst.port(), 67);
        }
        other => panic!("expected one UDP datagram, got {other:?}"),
    }
}

/// Nothing sent, delivered or routed (learning a neighbour is not an answer).
fn quiet(out: &[Output]) -> bool {
    out.iter().all(|o| matches!(o, Output::Neighbor { .. }))
}

/// A tiny deterministic PRNG so the fuzz cases are the same on every run.
struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn truncated_frames_are_dropped_and_counted() {
    let mut gw = gateway();
    let now = Instant::now();
    let samples = [
        ping(HOST, b"0123456789abcdef"),
        arp_request(HOST),
        build_udp_frame(
            GUEST_MAC,
            L2Dest::Mac(GW_MAC),
            SocketAddrV4::new(GUEST, 1000),
            SocketAddrV4::new(DNS, 53),
            b"query bytes",
        ),
    ];
    for s in &samples {
        for len in 0..s.len() {
            let mut out = Vec::new();
            gw.receive(&s[..len], now, &mut out);
            assert!(
                frames(&out).is_empty(),
                "answered a truncated frame of {len} bytes"
            );
            assert!(out.is_empty(), "delivered a truncated frame of {len} bytes");
        }
    }
    let c = gw.counters();
    let drops = c.drop_malformed_ethernet
        + c.drop_malformed_arp
        + c.drop_malformed_ipv4
        + c.drop_malformed_udp
        + c.drop_malformed_icmp;
    assert_eq!(
        c.frames_in,
        samples.iter().map(|s| s.len() as u64).sum::<u64>()
    );
    assert!(drops > 0);
    assert_eq!(c.icmp_echo_replies + c.arp_replies + c.udp_local, 0);
}

#[test]
fn bad_checksums_and_lying_lengths_are_dropped_and_counted() {
    let mut gw = gateway();
    let now = Instant::now();
    let good = ping(HOST, b"payload");

    let mut bad_ip_sum = good.clone();
    bad_ip_sum[14 + 10] ^= 0xff;
    let mut out = Vec::new();
    gw.receive(&bad_ip_sum, now, &mut out);
    assert!(quiet(&out));
    assert_eq!(gw.counters().drop_bad_ipv4_checksum, 1);

    let mut bad_icmp_sum = good.clone();
    bad_icmp_sum[14 + 20 + 2] ^= 0xff;
    gw.receive(&bad_icmp_sum, now, &mut out);
    assert!(quiet(&out));
    assert_eq!(gw.counters().drop_malformed_icmp, 1);

    // IPv4 total length larger than the frame (checksum fixed up so only the length lies).
    let mut long = good.clone();
    {
        let mut ip = Ipv4Packet::new_unchecked(&mut long[14..]);
        ip.set_total_len(1400);
        ip.fill_checksum();
    }
    gw.receive(&long, now, &mut out);
    // Header length claiming options past the end (the length check comes before the
    // checksum, so the stale checksum does not matter).
    let mut ihl = good.clone();
    Ipv4Packet::new_unchecked(&mut ihl[14..]).set_header_len(60);
    gw.receive(&ihl, now, &mut out);
    assert!(quiet(&out));
    assert_eq!(gw.counters().drop_malformed_ipv4, 2);

    // UDP length field lying upwards.
    let mut udp = build_udp_frame(
        GUEST_MAC,
        L2Dest::Mac(GW_MAC),
        SocketAddrV4::new(GUEST, 1000),
        SocketAddrV4::new(DNS, 53),
        b"q",
    );
    udp[14 + 20 + 4] = 0x10;
    gw.receive(&udp, now, &mut out);
    assert!(quiet(&out));
    assert_eq!(gw.counters().drop_malformed_udp, 1);

    // A fragment.
    let mut frag = good.clone();
    {
        let mut ip = Ipv4Packet::new_unchecked(&mut frag[14..]);
        ip.set_more_frags(true);
        ip.fill_checksum();
    }
    gw.receive(&frag, now, &mut out);
    assert!(
        quiet(&out),
        "a lone first fragment is held for reassembly, not answered"
    );
    assert_eq!(gw.fragment_counters().fragments_in, 1);

    // And the gateway still answers a good one.
    gw.receive(&good, now, &mut out);
    assert_eq!(frames(&out).len(), 1);
}

#[test]
fn random_and_mutated_frames_never_panic() {
    let mut gw = gateway();
    let now = Instant::now();
    let mut rng = XorShift(0x9e3779b97f4a7c15);
    let base = [ping(HOST, b"abcdefgh"), arp_request(DNS)];
    let mut out = Vec::new();
    for i in 0..20_000 {
        let mut f = if i % 2 == 0 {
            base[(i / 2) % 2].clone()
        } else {
            let len = (rng.next() % 200) as usize;
            (0..len).map(|_| rng.next() as u8).collect()
        };
        if i % 2 == 0 && !f.is_empty() {
            for _ in 0..(1 + rng.next() % 4) {
                let at = (rng.next() as usize) % f.len();
                f[at] = rng.next() as u8;
            }
        }
        gw.receive(&f, now, &mut out);
        out.clear();
    }
    assert_eq!(gw.counters().frames_in, 20_000);
}
