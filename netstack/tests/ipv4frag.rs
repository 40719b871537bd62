//! IPv4 fragmentation and reassembly: round trips, the overlap and size rules, the bounds, and a
//! fuzz loop. No sockets.

use std::time::{Duration, Instant};

use netstack::ipv4frag::{
    fragment, FragDrop, FragmentError, Reassembler, Reassembly, ReassemblyConfig, DATAGRAM_OVERHEAD,
};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Address, Ipv4Packet, Ipv4Repr, UdpPacket, UdpRepr};

const GUEST: Ipv4Address = Ipv4Address::new(10, 0, 2, 15);
const REMOTE: Ipv4Address = Ipv4Address::new(192, 0, 2, 1);

/// A small xorshift PRNG, so the tests need no rand crate.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

/// A UDP datagram from the guest as an IPv4 packet, DF clear, with this ident.
fn udp_packet(ident: u16, payload_len: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..payload_len).map(|i| (i * 7 + i / 251) as u8).collect();
    let udp = UdpRepr {
        src_port: 40000,
        dst_port: 53,
    };
    let ip = Ipv4Repr {
        src_addr: GUEST,
        dst_addr: REMOTE,
        next_header: IpProtocol::Udp,
        payload_len: 8 + payload_len,
        hop_limit: 64,
    };
    let mut buf = vec![0; ip.buffer_len() + 8 + payload_len];
    let caps = ChecksumCapabilities::default();
    let mut packet = Ipv4Packet::new_unchecked(&mut buf[..]);
    ip.emit(&mut packet, &caps);
    udp.emit(
        &mut UdpPacket::new_unchecked(packet.payload_mut()),
        &IpAddress::Ipv4(GUEST),
        &IpAddress::Ipv4(REMOTE),
        payload_len,
        |out| out.copy_from_slice(&payload),
        &caps,
    );
    packet.set_ident(ident);
    packet.set_dont_frag(false);
    packet.set_dscp(10);
    packet.fill_checksum();
    buf
}

/// A raw fragment: 20-byte header, these fields, this payload.
fn raw_fragment(ident: u16, offset: usize, more: bool, payload: &[u8]) -> Vec<u8> {
    let mut buf = udp_packet(ident, 0);
    buf.truncate(20);
    buf.extend_from_slice(payload);
    let mut packet = Ipv4Packet::new_unchecked(&mut buf[..]);
    packet.set_total_len((20 + payload.len()) as u16);
    packet.clear_flags();
    packet.set_more_frags(more);
    packet.set_frag_offset(offset as u16);
    packet.fill_checksum();
    buf
}

fn push_all(r: &mut Reassembler, fragments: &[Vec<u8>], now: Instant) -> Option<Vec<u8>> {
    let mut complete = None;
    for (i, frag) in fragments.iter().enumerate() {
        match r.push(frag, now) {
            Reassembly::Complete(datagram) => {
                assert_eq!(i, fragments.len() - 1, "complete before the last fragment");
                complete = Some(datagram);
            }
            Reassembly::Pending => {}
            other => panic!("fragment {i}: {other:?}"),
        }
    }
    complete
}

fn check_fragments(original: &[u8], fragments: &[Vec<u8>], mtu: usize) {
    let orig = Ipv4Packet::new_checked(original).unwrap();
    let mut expected_offset = 0;
    for (i, frag) in fragments.iter().enumerate() {
        let last = i == fragments.len() - 1;
        assert!(frag.len() <= mtu);
        let ip = Ipv4Packet::new_checked(&frag[..]).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(usize::from(ip.total_len()), frag.len());
        assert_eq!(ip.ident(), orig.ident());
        assert_eq!(ip.more_frags(), !last);
        assert!(!ip.dont_frag());
        assert_eq!(usize::from(ip.frag_offset()), expected_offset);
        let len = ip.payload().len();
        if !last {
            assert_eq!(len % 8, 0);
            assert_eq!(len, (mtu - 20) / 8 * 8);
        }
        expected_offset += len;
    }
    assert_eq!(expected_offset, orig.payload().len());
}

#[test]
fn largest_udp_round_trips_in_any_order() {
    let t0 = Instant::now();
    let original = udp_packet(0x1234, 65507);
    assert_eq!(original.len(), 65535);
    for mtu in [1500, 576] {
        let fragments = fragment(&original, mtu).unwrap();
        check_fragments(&original, &fragments, mtu);
        let mut r = Reassembler::default();

        assert_eq!(push_all(&mut r, &fragments, t0).unwrap(), original);

        let mut reversed = fragments.clone();
        reversed.reverse();
        assert_eq!(push_all(&mut r, &reversed, t0).unwrap(), original);

        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ mtu as u64);
        for _ in 0..5 {
            let mut shuffled = fragments.clone();
            rng.shuffle(&mut shuffled);
            assert_eq!(push_all(&mut r, &shuffled, t0).unwrap(), original);
        }
        assert_eq!(r.in_progress(), 0);
        assert_eq!(r.buffered_bytes(), 0);
        assert_eq!(r.counters().reassembled, 7);
        assert_eq!(r.counters().fragments_in, 7 * fragments.len() as u64);
    }
}

#[test]
fn exact_duplicates_are_ignored() {
    let t0 = Instant::now();
    let original = udp_packet(7, 4000);
    let fragments = fragment(&original, 1500).unwrap();
    assert_eq!(fragments.len(), 3);
    let mut r = Reassembler::default();
    assert_eq!(r.push(&fragments[2], t0), Reassembly::Pending);
    assert_eq!(
        r.push(&fragments[2], t0),
        Reassembly::Dropped(FragDrop::Duplicate)
    );
    assert_eq!(r.push(&fragments[0], t0), Reassembly::Pending);
    assert_eq!(
        r.push(&fragments[0], t0),
        Reassembly::Dropped(FragDrop::Duplicate)
    );
    assert_eq!(
        r.push(&fragments[2], t0),
        Reassembly::Dropped(FragDrop::Duplicate)
    );
    assert_eq!(r.push(&fragments[1], t0), Reassembly::Complete(original));
    assert_eq!(r.counters().duplicates, 3);
    assert_eq!(r.counters().drop_overlap, 0);
}

#[test]
fn overlap_drops_the_datagram_and_its_later_fragments() {
    let t0 = Instant::now();
    let mut r = Reassembler::default();
    assert_eq!(
        r.push(&raw_fragment(9, 0, true, &[1; 1480]), t0),
        Reassembly::Pending
    );
    // Starts inside the first fragment, different bytes.
    assert_eq!(
        r.push(&raw_fragment(9, 1472, true, &[2; 1480]), t0),
        Reassembly::Dropped(FragDrop::Overlap)
    );
    assert_eq!(r.in_progress(), 0);
    assert_eq!(r.buffered_bytes(), 0);
    // Later fragments of that datagram are dropped too, even ones that would have fitted.
    assert_eq!(
        r.push(&raw_fragment(9, 1480, true, &[3; 1480]), t0),
        Reassembly::Dropped(FragDrop::Overlap)
    );
    assert_eq!(
        r.push(&raw_fragment(9, 2960, false, &[4; 100]), t0),
        Reassembly::Dropped(FragDrop::Overlap)
    );
    assert_eq!(r.in_progress(), 0);
    assert_eq!(r.counters().drop_overlap, 3);

    // Partial overlap with identical bytes is still an overlap, not a duplicate.
    assert_eq!(
        r.push(&raw_fragment(10, 0, true, &[5; 16]), t0),
        Reassembly::Pending
    );
    assert_eq!(
        r.push(&raw_fragment(10, 8, true, &[5; 16]), t0),
        Reassembly::Dropped(FragDrop::Overlap)
    );

    // Same range, different bytes: an overlap too.
    assert_eq!(
        r.push(&raw_fragment(11, 0, true, &[5; 16]), t0),
        Reassembly::Pending
    );
    assert_eq!(
        r.push(&raw_fragment(11, 0, true, &[6; 16]), t0),
        Reassembly::Dropped(FragDrop::Overlap)
    );

    // Other datagrams are unaffected.
    let original = udp_packet(12, 3000);
    assert_eq!(
        push_all(&mut r, &fragment(&original, 1500).unwrap(), t0).unwrap(),
        original
    );

    // Once the dropped datagram's timeout passes, its key starts afresh.
    let later = t0 + Duration::from_secs(30);
    assert_eq!(r.expire(later), 0);
    let original = udp_packet(9, 3000);
    assert_eq!(
        push_all(&mut r, &fragment(&original, 1500).unwrap(), later).unwrap(),
        original
    );
}

#[test]
fn oversize_fragments_are_dropped() {
    let t0 = Instant::now();
    let mut r = Reassembler::default();
    // offset + len > 65535 (the classic ping of death).
    assert_eq!(
        r.push(&raw_fragment(1, 65528, false, &[0; 16]), t0),
        Reassembly::Dropped(FragDrop::Oversize)
    );
    // Fits 65535 with the original header, but not with a 20-byte header in front: 65520 + 20.
    assert_eq!(
        r.push(&raw_fragment(2, 65512, false, &[0; 8]), t0),
        Reassembly::Dropped(FragDrop::Oversize)
    );
    // The largest allowed end is accepted.
    assert_eq!(
        r.push(&raw_fragment(3, 65512, false, &[0; 3]), t0),
        Reassembly::Pending
    );
    // An oversize fragment drops the datagram it belongs to.
    assert_eq!(
        r.push(&raw_fragment(3, 0, true, &[0; 8]), t0),
        Reassembly::Pending
    );
    assert_eq!(
        r.push(&raw_fragment(3, 65512, true, &[0; 16]), t0),
        Reassembly::Dropped(FragDrop::Oversize)
    );
    assert_eq!(r.in_progress(), 0);
    assert_eq!(r.counters().drop_oversize, 3);
}

#[test]
fn bad_fragments_are_dropped() {
    let t0 = Instant::now();
    let mut r = Reassembler::default();
    // Non-last fragment, payload not a multiple of 8.
    assert_eq!(
        r.push(&raw_fragment(1, 0, true, &[0; 100]), t0),
        Reassembly::Dropped(FragDrop::BadFragment)
    );
    // Zero-length fragments.
    assert_eq!(
        r.push(&raw_fragment(2, 0, true, &[]), t0),
        Reassembly::Dropped(FragDrop::BadFragment)
    );
    assert_eq!(
        r.push(&raw_fragment(3, 800, false, &[]), t0),
        Reassembly::Dropped(FragDrop::BadFragment)
    );
    // A non-last fragment past the last one's end.
    assert_eq!(
        r.push(&raw_fragment(4, 800, false, &[0; 10]), t0),
        Reassembly::Pending
    );
    assert_eq!(
        r.push(&raw_fragment(4, 808, true, &[0; 8]), t0),
        Reassembly::Dropped(FragDrop::BadFragment)
    );
    // A last fragment before data already held.
    assert_eq!(
        r.push(&raw_fragment(5, 800, true, &[0; 16]), t0),
        Reassembly::Pending
    );
    assert_eq!(
        r.push(&raw_fragment(5, 8, false, &[0; 16]), t0),
        Reassembly::Dropped(FragDrop::BadFragment)
    );
    // Two different last fragments.
    assert_eq!(
        r.push(&raw_fragment(6, 800, false, &[0; 10]), t0),
        Reassembly::Pending
    );
    assert_eq!(
        r.push(&raw_fragment(6, 800, false, &[0; 9]), t0),
        Reassembly::Dropped(FragDrop::ConflictingLast)
    );
    // Truncated packets never get this far in the gateway, but are not trusted here either.
    let mut short = raw_fragment(7, 0, true, &[0; 16]);
    short.truncate(30);
    assert_eq!(
        r.push(&short, t0),
        Reassembly::Dropped(FragDrop::BadFragment)
    );
    assert_eq!(r.in_progress(), 0);
    assert_eq!(r.buffered_bytes(), 0);
    assert_eq!(r.counters().drop_bad, 7);
}

#[test]
fn not_fragments_pass_through() {
    let t0 = Instant::now();
    let mut r = Reassembler::default();
    let packet = udp_packet(1, 100);
    assert_eq!(r.push(&packet, t0), Reassembly::NotFragment);
    assert_eq!(r.counters().fragments_in, 0);
}

#[test]
fn interleaved_datagrams() {
    let t0 = Instant::now();
    let a = udp_packet(100, 5000);
    let b = udp_packet(101, 7000);
    // Same ident as `a`, different protocol: a different datagram too.
    let mut c = udp_packet(100, 5000);
    {
        let mut ip = Ipv4Packet::new_unchecked(&mut c[..]);
        ip.set_next_header(IpProtocol::Unknown(253));
        ip.payload_mut()[20] ^= 0xff;
        ip.fill_checksum();
    }
    let fa = fragment(&a, 1500).unwrap();
    let fb = fragment(&b, 576).unwrap();
    let fc = fragment(&c, 1500).unwrap();
    let mut all: Vec<(usize, &Vec<u8>)> = Vec::new();
    let longest = fa.len().max(fb.len()).max(fc.len());
    for i in 0..longest {
        for (which, frags) in [(0, &fa), (1, &fb), (2, &fc)] {
            if let Some(f) = frags.get(i) {
                all.push((which, f));
            }
        }
    }
    let mut r = Reassembler::default();
    let mut done = [None, None, None];
    for (which, f) in all {
        match r.push(f, t0) {
            Reassembly::Complete(d) => done[which] = Some(d),
            Reassembly::Pending => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(done, [Some(a), Some(b), Some(c)]);
    assert_eq!(r.in_progress(), 0);
}

#[test]
fn flood_is_bounded_by_max_datagrams() {
    let t0 = Instant::now();
    let config = ReassemblyConfig::default();
    let mut r = Reassembler::new(config);
    let first = raw_fragment(0, 0, true, &[0xaa; 1480]);
    for ident in 0..10_000u16 {
        let mut f = first.clone();
        let mut ip = Ipv4Packet::new_unchecked(&mut f[..]);
        ip.set_ident(ident);
        ip.fill_checksum();
        let result = r.push(&f, t0);
        if usize::from(ident) < config.max_datagrams {
            assert_eq!(result, Reassembly::Pending);
        } else {
            assert_eq!(result, Reassembly::Dropped(FragDrop::TooManyDatagrams));
        }
        assert!(r.in_progress() <= config.max_datagrams);
        assert!(r.buffered_bytes() <= config.max_bytes);
    }
    assert_eq!(r.counters().drop_too_many, 10_000 - 64);
    // Full: even a legitimate datagram waits for the flood to time out.
    let original = udp_packet(20_000, 3000);
    let fragments = fragment(&original, 1500).unwrap();
    assert_eq!(
        r.push(&fragments[0], t0 + Duration::from_secs(1)),
        Reassembly::Dropped(FragDrop::TooManyDatagrams)
    );
    let later = t0 + Duration::from_secs(30);
    assert_eq!(push_all(&mut r, &fragments, later).unwrap(), original);
    assert_eq!(r.counters().timeouts, 64);
    assert_eq!(r.buffered_bytes(), 0);
}

#[test]
fn flood_is_bounded_by_max_bytes() {
    let t0 = Instant::now();
    let config = ReassemblyConfig {
        max_datagrams: 100_000,
        max_bytes: 256 * 1024,
        timeout: Duration::from_secs(30),
    };
    let mut r = Reassembler::new(config);
    let first = raw_fragment(0, 0, true, &[0xaa; 1480]);
    let mut peak = 0;
    for ident in 0..10_000u16 {
        let mut f = first.clone();
        let mut ip = Ipv4Packet::new_unchecked(&mut f[..]);
        ip.set_ident(ident);
        ip.fill_checksum();
        let _ = r.push(&f, t0);
        // Also a far fragment for some, which makes the buffer big.
        if ident % 3 == 0 {
            let far = {
                let mut g = raw_fragment(ident, 60_000, true, &[0xbb; 1480]);
                Ipv4Packet::new_unchecked(&mut g[..]).fill_checksum();
                g
            };
            let _ = r.push(&far, t0);
        }
        assert!(r.buffered_bytes() <= config.max_bytes);
        peak = peak.max(r.buffered_bytes());
    }
    assert!(peak > config.max_bytes / 2);
    assert!(r.counters().drop_memory > 0);
    assert_eq!(r.counters().drop_too_many, 0);
    assert!(r.in_progress() <= config.max_bytes / DATAGRAM_OVERHEAD);
}

#[test]
fn a_datagram_growing_past_max_bytes_is_dropped() {
    let t0 = Instant::now();
    let config = ReassemblyConfig {
        max_bytes: 20_000,
        ..ReassemblyConfig::default()
    };
    let mut r = Reassembler::new(config);
    let original = udp_packet(1, 30_000);
    let fragments = fragment(&original, 1500).unwrap();
    let mut dropped = false;
    for f in &fragments {
        match r.push(f, t0) {
            Reassembly::Pending => assert!(!dropped),
            Reassembly::Dropped(FragDrop::OutOfMemory) => dropped = true,
            other => panic!("{other:?}"),
        }
        assert!(r.buffered_bytes() <= config.max_bytes);
    }
    assert!(dropped);
    assert_eq!(r.in_progress(), 0);
    // A small one still fits.
    let small = udp_packet(2, 5000);
    assert_eq!(
        push_all(&mut r, &fragment(&small, 1500).unwrap(), t0).unwrap(),
        small
    );
}

#[test]
fn incomplete_datagrams_time_out() {
    let t0 = Instant::now();
    let mut r = Reassembler::default();
    let original = udp_packet(5, 4000);
    let fragments = fragment(&original, 1500).unwrap();
    assert_eq!(r.push(&fragments[0], t0), Reassembly::Pending);
    assert_eq!(
        r.push(&fragments[1], t0 + Duration::from_secs(10)),
        Reassembly::Pending
    );
    assert!(r.buffered_bytes() > 0);
    assert_eq!(r.expire(t0 + Duration::from_millis(29_999)), 0);
    assert_eq!(r.in_progress(), 1);
    assert_eq!(r.expire(t0 + Duration::from_secs(30)), 1);
    assert_eq!(r.in_progress(), 0);
    assert_eq!(r.buffered_bytes(), 0);
    assert_eq!(r.counters().timeouts, 1);
    // The last fragment, late, starts a new datagram of its own.
    assert_eq!(
        r.push(&fragments[2], t0 + Duration::from_secs(31)),
        Reassembly::Pending
    );

    // push expires too.
    let other = udp_packet(6, 4000);
    let other_fragments = fragment(&other, 1500).unwrap();
    assert_eq!(
        r.push(&other_fragments[0], t0 + Duration::from_secs(61)),
        Reassembly::Pending
    );
    assert_eq!(r.in_progress(), 1);
    assert_eq!(r.counters().timeouts, 2);
}

#[test]
fn df_set_and_too_big_is_an_error() {
    let mut packet = udp_packet(1, 3000);
    let mut ip = Ipv4Packet::new_unchecked(&mut packet[..]);
    ip.set_dont_frag(true);
    ip.fill_checksum();
    assert_eq!(
        fragment(&packet, 1500),
        Err(FragmentError::NeedsFragmentation { mtu: 1500 })
    );
    // It fits a bigger MTU unchanged, DF and all.
    assert_eq!(fragment(&packet, 9000).unwrap(), vec![packet]);
}

#[test]
fn a_packet_that_fits_is_unchanged() {
    let packet = udp_packet(1, 1472);
    assert_eq!(packet.len(), 1500);
    assert_eq!(fragment(&packet, 1500).unwrap(), vec![packet.clone()]);
    // Link padding past the total length is not part of the packet.
    let mut padded = packet.clone();
    padded.extend_from_slice(&[0; 4]);
    assert_eq!(fragment(&padded, 1500).unwrap(), vec![packet.clone()]);
    // One byte more does not fit.
    let bigger = udp_packet(1, 1473);
    let fragments = fragment(&bigger, 1500).unwrap();
    assert_eq!(fragments.len(), 2);
    check_fragments(&bigger, &fragments, 1500);
}

#[test]
fn invalid_input_to_fragment() {
    let packet = udp_packet(1, 3000);
    assert_eq!(
        fragment(&packet, 575),
        Err(FragmentError::InvalidMtu { mtu: 575 })
    );
    assert_eq!(
        fragment(&packet, 65521),
        Err(FragmentError::InvalidMtu { mtu: 65521 })
    );
    assert_eq!(
        fragment(&packet[..100], 1500),
        Err(FragmentError::Malformed)
    );
}

#[test]
fn options_are_copied_only_when_flagged() {
    // Header with a Router Alert option (copied) and a Record Route option (not copied).
    let plain = udp_packet(77, 3000);
    let options: [u8; 12] = [
        0x94, 4, 0, 0, // Router Alert, copied flag set.
        0x07, 7, 4, 0, 0, 0, 0,    // Record Route, not copied.
        0x00, // End of options.
    ];
    let mut packet = plain[..20].to_vec();
    packet.extend_from_slice(&options);
    packet.extend_from_slice(&plain[20..]);
    {
        let mut ip = Ipv4Packet::new_unchecked(&mut packet[..]);
        ip.set_header_len(32);
        ip.set_total_len(plain.len() as u16 + 12);
        ip.fill_checksum();
    }
    let fragments = fragment(&packet, 1500).unwrap();
    assert_eq!(fragments.len(), 3);
    for (i, f) in fragments.iter().enumerate() {
        let ip = Ipv4Packet::new_checked(&f[..]).unwrap();
        assert!(ip.verify_checksum());
        assert!(f.len() <= 1500);
        if i == 0 {
            assert_eq!(&f[20..32], &options);
            assert_eq!(ip.payload().len(), (1500 - 32) / 8 * 8);
        } else {
            assert_eq!(ip.header_len(), 24);
            assert_eq!(&f[20..24], &options[..4]);
        }
    }
    // Reassembled without options: the same as the plain packet.
    let mut r = Reassembler::default();
    assert_eq!(push_all(&mut r, &fragments, Instant::now()).unwrap(), plain);
}

#[test]
fn fragments_can_be_fragmented_again() {
    let original = udp_packet(3, 9000);
    let mut fragments = Vec::new();
    for f in fragment(&original, 4000).unwrap() {
        fragments.extend(fragment(&f, 576).unwrap());
    }
    for f in &fragments {
        assert!(f.len() <= 576);
    }
    let mut rng = XorShift(42);
    rng.shuffle(&mut fragments);
    let mut r = Reassembler::default();
    assert_eq!(
        push_all(&mut r, &fragments, Instant::now()).unwrap(),
        original
    );
}

#[test]
fn fuzz_never_panics_and_stays_bounded() {
    let config = ReassemblyConfig {
        max_datagrams: 16,
        max_bytes: 300_000,
        timeout: Duration::from_secs(30),
    };
    let mut r = Reassembler::new(config);
    let mut rng = XorShift(0xdead_beef_cafe_f00d);
    let mut now = Instant::now();
    let seeds: Vec<Vec<u8>> = (0..4)
        .flat_map(|ident| fragment(&udp_packet(ident, 6000 + 3000 * ident as usize), 576).unwrap())
        .collect();
    let mut fed = 0;
    let mut completes = 0;
    let mut whole_ident = 1000u16;
    while fed < 50_000 {
        if rng.below(300) == 0 {
            // Now and then a whole datagram, shuffled, with an ident of its own: it completes
            // unless the table is full of junk.
            whole_ident += 1;
            let original = udp_packet(whole_ident, 1000 + rng.below(20_000));
            let mut fragments = fragment(&original, 576 + rng.below(1000)).unwrap();
            rng.shuffle(&mut fragments);
            for f in &fragments {
                fed += 1;
                if let Reassembly::Complete(datagram) = r.push(f, now) {
                    assert_eq!(datagram, original);
                    completes += 1;
                }
            }
            continue;
        }
        let mut packet = match rng.below(4) {
            // Pure random bytes, usually with a plausible first byte.
            0 => {
                let len = rng.below(200);
                let mut p: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                if let Some(b) = p.first_mut() {
                    if rng.below(2) == 0 {
                        *b = 0x45;
                    }
                }
                p
            }
            // A real fragment, unchanged (these make datagrams complete now and then).
            1 => seeds[rng.below(seeds.len())].clone(),
            // A real fragment with random bytes flipped.
            2 => {
                let mut p = seeds[rng.below(seeds.len())].clone();
                for _ in 0..1 + rng.below(4) {
                    let i = rng.below(p.len().min(40));
                    p[i] ^= 1 << rng.below(8);
                }
                p
            }
            // A fragment with random fields: offset, MF, length, ident from a small set.
            _ => {
                let len = rng.below(3000);
                let payload: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                let offset = (rng.below(8192) * 8) as u16 as usize;
                let mut p = raw_fragment(rng.below(6) as u16, offset, rng.below(3) != 0, &payload);
                if rng.below(2) == 0 {
                    // Near the end of the offset space.
                    let mut ip = Ipv4Packet::new_unchecked(&mut p[..]);
                    ip.set_frag_offset((65535 - rng.below(4000)) as u16 & !7);
                    ip.fill_checksum();
                }
                p
            }
        };
        if rng.below(8) == 0 {
            let len = packet.len();
            packet.truncate(rng.below(len + 1));
        }
        if Ipv4Packet::new_checked(&packet[..]).is_err() {
            continue;
        }
        fed += 1;
        if rng.below(100) == 0 {
            now += Duration::from_secs(rng.below(20) as u64);
        }
        match r.push(&packet, now) {
            Reassembly::Complete(datagram) => {
                completes += 1;
                let ip = Ipv4Packet::new_checked(&datagram[..]).unwrap();
                assert!(ip.verify_checksum());
                assert_eq!(usize::from(ip.total_len()), datagram.len());
                assert_eq!(ip.header_len(), 20);
                assert!(!ip.more_frags());
                assert_eq!(ip.frag_offset(), 0);
            }
            Reassembly::NotFragment | Reassembly::Pending | Reassembly::Dropped(_) => {}
        }
        assert!(r.in_progress() <= config.max_datagrams);
        assert!(r.buffered_bytes() <= config.max_bytes);
        if rng.below(1000) == 0 {
            r.expire(now);
        }
    }
    assert!(completes > 0);
    let c = r.counters();
    assert!(c.drop_overlap > 0 && c.drop_bad > 0 && c.drop_oversize > 0);
    r.expire(now + Duration::from_secs(60));
    assert_eq!(r.in_progress(), 0);
    assert_eq!(r.buffered_bytes(), 0);
}
