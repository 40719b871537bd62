//! What a NIC with checksum and segmentation offload does, in software, for the ports that
//! exchange offloaded frames (a tap with virtio-net headers) and the ports that do not:
//! completing a partial checksum (`VIRTIO_NET_HDR_F_NEEDS_CSUM`), cutting a large TCP
//! segment over IPv4 into segments that fit the MTU (GSO), and cutting a UDP packet that
//! carries several datagrams into those datagrams (UDP segmentation offload).

use bytes::Bytes;

/// The Ethernet header's length.
const ETH: usize = 14;

/// The one's complement sum of `data` as big-endian 16-bit words (odd length: a zero byte
/// padded), folded to 16 bits, not complemented.
pub fn ones_sum(data: &[u8]) -> u16 {
    // 32-bit native-endian words into four 64-bit accumulators: no carries to propagate (a
    // frame is far below 2^32 words) and the loop vectorizes (about 45 GB/s here, smoltcp's
    // checksum 35, a carry-propagating u64 loop 18).
    let mut chunks = data.chunks_exact(16);
    let mut lanes = [0u64; 4];
    for c in &mut chunks {
        for (i, lane) in lanes.iter_mut().enumerate() {
            *lane += u64::from(u32::from_ne_bytes(c[i * 4..i * 4 + 4].try_into().unwrap()));
        }
    }
    let mut acc: u64 = lanes.iter().sum();
    let mut words = chunks.remainder().chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_ne_bytes(w.try_into().unwrap()));
    }
    let tail = words.remainder();
    let mut last = [0u8; 4];
    last[..tail.len()].copy_from_slice(tail);
    acc += u64::from(u32::from_ne_bytes(last));
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    // Native-endian words sum to the byte-swapped big-endian sum on little-endian machines.
    u16::from_be(acc as u16)
}

/// One's complement addition of two folded sums.
fn add(a: u16, b: u16) -> u16 {
    let s = u32::from(a) + u32::from(b);
    ((s & 0xffff) + (s >> 16)) as u16
}

/// The checksum to store for a folded sum (0 is sent as 0xffff, as UDP requires and TCP
/// accepts).
fn finish(sum: u16) -> u16 {
    match !sum {
        0 => 0xffff,
        c => c,
    }
}

/// Complete a partial checksum: the 16-bit field at `start + offset` holds the pseudo-header
/// sum, the checksum covers everything from `start` to the end. False (frame unchanged) when
/// the offsets lie outside the frame.
pub fn complete_checksum(frame: &mut [u8], start: usize, offset: usize) -> bool {
    let Some(at) = start.checked_add(offset) else {
        return false;
    };
    if at + 2 > frame.len() {
        return false;
    }
    let c = finish(ones_sum(&frame[start..]));
    frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
    true
}

/// A checksum left for the receiver, as virtio-net's `NEEDS_CSUM` and Linux's
/// `CHECKSUM_PARTIAL` leave it: the 16-bit field at `start + offset` (offsets into the frame)
/// holds the folded pseudo-header sum, and the one's complement sum of everything from `start`
/// to the end, stored there complemented, completes it. Frames carrying one come from a local
/// stack that computed nothing (a tap guest's kernel) or go to one that verifies nothing: no
/// wire crossed, so there is nothing to verify. Whoever hands such a frame to a port that
/// wants whole frames completes it first ([`Partial::complete`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Partial {
    pub start: u16,
    pub offset: u16,
    /// For a UDP packet that carries several datagrams (UDP segmentation offload, a
    /// frame longer than the link's MTU): the payload size of each (the last may be
    /// shorter). 0 for everything else.
    pub segment: u16,
}

impl Partial {
    /// The partial checksum of the TCP or UDP packet after the IPv4 header of the Ethernet
    /// frame `frame`: None unless it is IPv4 TCP or UDP with a header that holds together.
    pub fn of_ipv4(frame: &[u8]) -> Option<Partial> {
        if frame.get(12..14)? != [0x08, 0x00] || *frame.get(ETH)? >> 4 != 4 {
            return None;
        }
        let ihl = usize::from(*frame.get(ETH)? & 0x0f) * 4;
        let offset = match *frame.get(ETH + 9)? {
            6 => 16,
            17 => 6,
            _ => return None,
        };
        let start = ETH + ihl;
        (ihl >= 20 && start + offset + 2 <= frame.len()).then_some(Partial {
            start: start as u16,
            offset: offset as u16,
            segment: 0,
        })
    }

    /// Write the folded pseudo-header sum of the IPv4 TCP or UDP frame `frame` into its
    /// checksum field, leaving the rest for the receiver: the frame's [`Partial`], or None
    /// (frame unchanged) when it is not one of those.
    pub fn leave(frame: &mut [u8]) -> Option<Partial> {
        let p = Partial::of_ipv4(frame)?;
        let ip = &frame[14..];
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        let len = total.checked_sub(usize::from(p.start) - 14)?;
        let mut pseudo = [0u8; 12];
        pseudo[0..8].copy_from_slice(&ip[12..20]);
        pseudo[9] = ip[9];
        pseudo[10..12].copy_from_slice(&(len as u16).to_be_bytes());
        let at = usize::from(p.start + p.offset);
        frame[at..at + 2].copy_from_slice(&ones_sum(&pseudo).to_be_bytes());
        Some(p)
    }

    /// Complete the checksum in `frame`. False (frame unchanged) when the offsets lie outside
    /// the frame.
    pub fn complete(self, frame: &mut [u8]) -> bool {
        complete_checksum(frame, usize::from(self.start), usize::from(self.offset))
    }
}

/// The IPv4 packet in Ethernet frame `frame` (to its total length) and its header length,
/// when it carries protocol `proto` and its header holds together.
fn ipv4_carrying(frame: &[u8], proto: u8) -> Option<(&[u8], usize)> {
    if frame.get(12..14)? != [0x08, 0x00] {
        return None;
    }
    let ip = frame.get(ETH..)?;
    let ihl = usize::from(*ip.first()? & 0x0f) * 4;
    if *ip.first()? >> 4 != 4 || ihl < 20 || *ip.get(9)? != proto {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    Some((ip.get(..total)?, ihl))
}

/// Piece `i` of a frame being cut: the frame's first `headers` bytes (Ethernet, IPv4 with
/// header length `ihl`, the transport header), then `chunk`; the IPv4 header's total length,
/// identification (`id` + i) and checksum set.
fn piece(frame: &[u8], headers: usize, ihl: usize, id: u16, i: usize, chunk: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(headers + chunk.len());
    f.extend_from_slice(&frame[..headers]);
    f.extend_from_slice(chunk);
    let iph = &mut f[ETH..ETH + ihl];
    iph[2..4].copy_from_slice(&((headers - ETH + chunk.len()) as u16).to_be_bytes());
    iph[4..6].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
    iph[10..12].copy_from_slice(&[0, 0]);
    let ipsum = !ones_sum(iph);
    iph[10..12].copy_from_slice(&ipsum.to_be_bytes());
    f
}

/// The pseudo-header of IPv4 packet `ip` for protocol `proto` (its length field left zero).
fn pseudo_header(ip: &[u8], proto: u8) -> [u8; 12] {
    let mut pseudo = [0u8; 12];
    pseudo[0..8].copy_from_slice(&ip[12..20]);
    pseudo[9] = proto;
    pseudo
}

/// Cut the Ethernet frame `frame` (IPv4, TCP, valid headers) into frames whose IP packets fit
/// `mtu`, each with its own IP length, identification and checksum, TCP sequence number,
/// flags (FIN and PSH on the last only, CWR on the first only) and checksum. None when the
/// frame is not IPv4 TCP or its headers do not hold together.
pub fn segment_tcp4(frame: &[u8], mtu: usize) -> Option<Vec<Bytes>> {
    let (ip, ihl) = ipv4_carrying(frame, 6)?;
    let total = ip.len();
    let doff = usize::from(*ip.get(ihl + 12)? >> 4) * 4;
    if doff < 20 || ihl + doff > total {
        return None;
    }
    let headers = ETH + ihl + doff;
    let payload = &frame[headers..ETH + total];
    let mss = mtu.checked_sub(ihl + doff).filter(|m| *m > 0)?;
    let id = u16::from_be_bytes([ip[4], ip[5]]);
    let seq = u32::from_be_bytes(ip[ihl + 4..ihl + 8].try_into().ok()?);
    let flags = ip[ihl + 13];
    let mut pseudo = pseudo_header(ip, 6);
    let count = payload.len().div_ceil(mss).max(1);
    let mut out = Vec::with_capacity(count);
    for (i, chunk) in payload.chunks(mss).enumerate() {
        let mut f = piece(frame, headers, ihl, id, i, chunk);
        let tcp = &mut f[ETH + ihl..];
        let off = (i * mss) as u32;
        tcp[4..8].copy_from_slice(&seq.wrapping_add(off).to_be_bytes());
        let last = i + 1 == count;
        let mut fl = flags;
        if !last {
            fl &= !(0x01 | 0x08); // FIN, PSH
        }
        if i > 0 {
            fl &= !0x80; // CWR
        }
        tcp[13] = fl;
        tcp[16..18].copy_from_slice(&[0, 0]);
        pseudo[10..12].copy_from_slice(&(tcp.len() as u16).to_be_bytes());
        let sum = add(ones_sum(&pseudo), ones_sum(tcp));
        tcp[16..18].copy_from_slice(&finish(sum).to_be_bytes());
        out.push(Bytes::from(f));
    }
    Some(out)
}

/// Cut the Ethernet frame `frame` (IPv4, UDP, valid headers) that carries several datagrams
/// of `segment` bytes each (the last may be shorter; UDP segmentation offload) into one frame
/// per datagram, each with its own IP length, identification and checksum, UDP length and
/// checksum. None when the frame is not IPv4 UDP, its headers do not hold together, it
/// carries nothing or `segment` is 0.
pub fn segment_udp4(frame: &[u8], segment: usize) -> Option<Vec<Bytes>> {
    let (ip, ihl) = ipv4_carrying(frame, 17)?;
    if segment == 0 || ihl + 8 > ip.len() {
        return None;
    }
    let headers = ETH + ihl + 8;
    let payload = &frame[headers..ETH + ip.len()];
    if payload.is_empty() {
        return None;
    }
    let id = u16::from_be_bytes([ip[4], ip[5]]);
    let mut pseudo = pseudo_header(ip, 17);
    let mut out = Vec::with_capacity(payload.len().div_ceil(segment));
    for (i, chunk) in payload.chunks(segment).enumerate() {
        let mut f = piece(frame, headers, ihl, id, i, chunk);
        let udp = &mut f[ETH + ihl..];
        let len = (8 + chunk.len()) as u16;
        udp[4..6].copy_from_slice(&len.to_be_bytes());
        udp[6..8].copy_from_slice(&[0, 0]);
        pseudo[10..12].copy_from_slice(&len.to_be_bytes());
        let sum = finish(add(ones_sum(&pseudo), ones_sum(udp)));
        udp[6..8].copy_from_slice(&sum.to_be_bytes());
        out.push(Bytes::from(f));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        IpAddress, IpProtocol, Ipv4Address, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr,
        TcpSeqNumber,
    };

    /// RFC 1071's reference: sum 16-bit big-endian words one at a time.
    fn slow_sum(data: &[u8]) -> u16 {
        let mut s: u32 = 0;
        for c in data.chunks(2) {
            let w = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
            s += u32::from(w);
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    #[test]
    fn ones_sum_matches_the_reference_at_every_length() {
        let data: Vec<u8> = (0..3000u32).map(|i| (i * 7919 % 251) as u8).collect();
        for n in (0..64).chain([1499, 1500, 2999, 3000]) {
            assert_eq!(ones_sum(&data[..n]), slow_sum(&data[..n]), "length {n}");
        }
        assert_eq!(ones_sum(&[0xff; 4096]), 0xffff);
    }

    const SRC: Ipv4Address = Ipv4Address::new(192, 168, 5, 15);
    const DST: Ipv4Address = Ipv4Address::new(192, 168, 5, 2);

    /// An Ethernet frame with one TCP segment carrying `payload` (checksums filled).
    fn tcp_frame(payload: &[u8], control: TcpControl) -> Vec<u8> {
        let tcp = TcpRepr {
            src_port: 40000,
            dst_port: 5201,
            control,
            seq_number: TcpSeqNumber(0x7fff_f000),
            ack_number: Some(TcpSeqNumber(99)),
            window_len: 512,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload,
        };
        let ip = Ipv4Repr {
            src_addr: SRC,
            dst_addr: DST,
            next_header: IpProtocol::Tcp,
            payload_len: tcp.buffer_len(),
            hop_limit: 64,
        };
        let mut f = vec![0u8; 14 + 20 + tcp.buffer_len()];
        f[12] = 0x08;
        let caps = ChecksumCapabilities::default();
        ip.emit(&mut Ipv4Packet::new_unchecked(&mut f[14..]), &caps);
        tcp.emit(
            &mut TcpPacket::new_unchecked(&mut f[34..]),
            &IpAddress::Ipv4(SRC),
            &IpAddress::Ipv4(DST),
            &caps,
        );
        f
    }

    #[test]
    fn partial_checksums_left_and_completed_are_valid() {
        let payload: Vec<u8> = (0..999u32).map(|i| (i * 31 % 256) as u8).collect();
        let whole = tcp_frame(&payload, TcpControl::Psh);
        let mut f = whole.clone();
        let p = Partial::leave(&mut f).expect("IPv4 TCP");
        assert_eq!((p.start, p.offset), (34, 16));
        assert_ne!(
            f[50..52],
            whole[50..52],
            "only the pseudo-header sum is there"
        );
        assert!(p.complete(&mut f));
        assert_eq!(f, whole, "completed, it is the checksum computed whole");
        // Not TCP or UDP, not IPv4, truncated: none.
        let mut icmp = whole.clone();
        icmp[14 + 9] = 1;
        let before = icmp.clone();
        assert_eq!(Partial::leave(&mut icmp), None);
        assert_eq!(icmp, before, "left unchanged");
        assert_eq!(Partial::of_ipv4(&whole[..40]), None);
        let mut v6 = whole.clone();
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(Partial::of_ipv4(&v6), None);
        // Offsets past the frame complete nothing.
        let lying = Partial {
            start: 34,
            offset: 60000,
            segment: 0,
        };
        assert!(!lying.complete(&mut f));
    }

    #[test]
    fn segments_are_valid_and_carry_the_whole_stream() {
        let payload: Vec<u8> = (0..60000u32).map(|i| (i % 253) as u8).collect();
        let big = tcp_frame(&payload, TcpControl::Fin);
        let segs = segment_tcp4(&big, 1500).expect("an IPv4 TCP frame");
        assert_eq!(segs.len(), 60000_usize.div_ceil(1460));
        let mut got = Vec::new();
        let mut seq = 0x7fff_f000u32;
        for (i, s) in segs.iter().enumerate() {
            assert!(s.len() <= 1514);
            let ip = Ipv4Packet::new_checked(&s[14..]).unwrap();
            assert!(ip.verify_checksum(), "IP checksum of segment {i}");
            let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
            assert!(
                tcp.verify_checksum(&IpAddress::Ipv4(SRC), &IpAddress::Ipv4(DST)),
                "TCP checksum of segment {i}"
            );
            assert_eq!(tcp.seq_number(), TcpSeqNumber(seq as i32));
            assert_eq!(tcp.fin(), i + 1 == segs.len(), "FIN only on the last");
            seq = seq.wrapping_add(tcp.payload().len() as u32);
            got.extend_from_slice(tcp.payload());
        }
        assert_eq!(got, payload);
    }

    /// An IPv4 UDP frame carrying `payload`, its checksum left partial (as the NAT sends a
    /// frame of several datagrams).
    fn udp_frame(payload: &[u8]) -> Vec<u8> {
        let ip = Ipv4Repr {
            src_addr: DST,
            dst_addr: SRC,
            next_header: IpProtocol::Udp,
            payload_len: 8 + payload.len(),
            hop_limit: 64,
        };
        let mut f = vec![0u8; 14 + 20 + 8 + payload.len()];
        f[12] = 0x08;
        ip.emit(
            &mut Ipv4Packet::new_unchecked(&mut f[14..]),
            &ChecksumCapabilities::default(),
        );
        f[34..36].copy_from_slice(&53u16.to_be_bytes());
        f[36..38].copy_from_slice(&40000u16.to_be_bytes());
        f[38..40].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        f[42..].copy_from_slice(payload);
        Partial::leave(&mut f).expect("IPv4 UDP");
        f
    }

    #[test]
    fn udp_segments_are_whole_datagrams_in_order() {
        let payload: Vec<u8> = (0..(7 * 1200 + 333) as u32)
            .map(|i| (i % 251) as u8)
            .collect();
        let segs = segment_udp4(&udp_frame(&payload), 1200).expect("an IPv4 UDP frame");
        assert_eq!(segs.len(), 8);
        let mut got = Vec::new();
        let mut ids = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            let ip = Ipv4Packet::new_checked(&s[14..]).unwrap();
            assert!(ip.verify_checksum(), "IP checksum of datagram {i}");
            assert_eq!(ip.next_header(), IpProtocol::Udp);
            let udp = smoltcp::wire::UdpPacket::new_checked(ip.payload()).unwrap();
            assert!(
                udp.verify_checksum(&IpAddress::Ipv4(DST), &IpAddress::Ipv4(SRC)),
                "UDP checksum of datagram {i}"
            );
            assert_ne!(udp.checksum(), 0, "a checksum, not 'none'");
            assert_eq!((udp.src_port(), udp.dst_port()), (53, 40000));
            let want = if i == 7 { 333 } else { 1200 };
            assert_eq!(udp.payload().len(), want, "datagram {i}");
            assert_eq!(usize::from(udp.len()), 8 + want);
            assert_eq!(s.len(), 14 + 20 + 8 + want);
            ids.push(ip.ident());
            got.extend_from_slice(udp.payload());
        }
        assert_eq!(got, payload);
        ids.dedup();
        assert_eq!(ids.len(), 8, "each its own identification");
        // Exactly divisible: no empty datagram at the end.
        let even = segment_udp4(&udp_frame(&payload[..2400]), 1200).unwrap();
        assert_eq!(even.len(), 2);
    }

    #[test]
    fn udp_frames_that_lie_are_refused() {
        let f = udp_frame(&[7; 3000]);
        assert!(segment_udp4(&f, 0).is_none(), "no segment size");
        let mut tcp = f.clone();
        tcp[14 + 9] = 6;
        assert!(segment_udp4(&tcp, 1000).is_none());
        let mut long = f.clone();
        long[16..18].copy_from_slice(&60000u16.to_be_bytes());
        assert!(segment_udp4(&long, 1000).is_none());
        let mut short = f.clone();
        short[16..18].copy_from_slice(&24u16.to_be_bytes()); // shorter than IP + UDP
        assert!(segment_udp4(&short, 1000).is_none());
        assert!(
            segment_udp4(&udp_frame(&[]), 1000).is_none(),
            "nothing to carry"
        );
        assert!(segment_udp4(&f[..30], 1000).is_none());
    }

    #[test]
    fn partial_checksums_are_completed() {
        let mut f = tcp_frame(b"hello, offload", TcpControl::Psh);
        let good = f.clone();
        // What a sender with checksum offload hands over: the pseudo-header sum in the field.
        let tcp_len = f.len() - 34;
        let mut pseudo = [0u8; 12];
        pseudo[0..8].copy_from_slice(&f[26..34]);
        pseudo[9] = 6;
        pseudo[10..12].copy_from_slice(&(tcp_len as u16).to_be_bytes());
        f[50..52].copy_from_slice(&ones_sum(&pseudo).to_be_bytes());
        assert!(complete_checksum(&mut f, 34, 16));
        let tcp = TcpPacket::new_checked(&f[34..]).unwrap();
        assert!(tcp.verify_checksum(&IpAddress::Ipv4(SRC), &IpAddress::Ipv4(DST)));
        assert_eq!(f, good);
        // Offsets that lie: nothing written.
        assert!(!complete_checksum(&mut f, 34, 10_000));
        assert!(!complete_checksum(&mut f, usize::MAX, 16));
        assert_eq!(f, good);
    }

    #[test]
    fn frames_that_are_not_ipv4_tcp_or_lie_are_refused() {
        let f = tcp_frame(&[1; 3000], TcpControl::None);
        let mut udp = f.clone();
        udp[14 + 9] = 17;
        assert!(segment_tcp4(&udp, 1500).is_none());
        let mut v6 = f.clone();
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert!(segment_tcp4(&v6, 1500).is_none());
        let mut long = f.clone();
        long[16..18].copy_from_slice(&60000u16.to_be_bytes()); // total length past the end
        assert!(segment_tcp4(&long, 1500).is_none());
        let mut doff = f.clone();
        doff[14 + 20 + 12] = 0x30; // data offset 12 < 20
        assert!(segment_tcp4(&doff, 1500).is_none());
        assert!(segment_tcp4(&f[..40], 1500).is_none());
        assert!(
            segment_tcp4(&f, 40).is_none(),
            "an MTU that leaves no room for data"
        );
    }
}
