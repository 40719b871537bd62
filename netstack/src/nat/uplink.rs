//! The NAT's way back to the guests: wraps IPv4 packets in Ethernet frames from the gateway's
//! MAC, fragments those over the MTU (UDP), and builds the ICMP errors a router sends.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    Icmpv4DstUnreachable, Icmpv4Packet, Icmpv4Repr, Icmpv4TimeExceeded, IpAddress, IpProtocol,
    Ipv4Repr, UdpPacket, UdpRepr, ETHERNET_HEADER_LEN, UDP_HEADER_LEN,
};

use crate::frame::{write_ethernet, write_ipv4, write_udp, IPV4_HEADER_LEN};
use crate::offload::Partial;
use crate::MacAddr;

/// Room before a UDP payload received in place: Ethernet, IPv4 and UDP headers.
pub(crate) const UDP_HEADROOM: usize = ETHERNET_HEADER_LEN + IPV4_HEADER_LEN + UDP_HEADER_LEN;

/// Where frames for the guests go (the gateway's switch port): the frame, and where its
/// checksum is left partial, if it is (only for guests that take that, see
/// [`crate::nat::NatConfig::large_segments`]).
pub type FrameSink = Arc<dyn Fn(Bytes, Option<Partial>) + Send + Sync>;

/// An ICMP error a router sends back about a guest's packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IcmpError {
    /// Destination unreachable with this code.
    Unreachable(Icmpv4DstUnreachable),
    /// Time exceeded in transit.
    TtlExceeded,
}

/// The guest packet an ICMP error is about: its IP header fields and first payload bytes.
pub(crate) struct Original<'a> {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: IpProtocol,
    pub ttl: u8,
    /// The original IP payload length.
    pub payload_len: usize,
    /// At least the first 8 bytes of the original IP payload (the transport header).
    pub head: &'a [u8],
}

pub(crate) struct Uplink {
    sink: FrameSink,
    mac: MacAddr,
    mtu: usize,
}

impl Uplink {
    pub(crate) fn new(sink: FrameSink, mac: MacAddr, mtu: u16) -> Uplink {
        Uplink {
            sink,
            mac,
            mtu: usize::from(mtu),
        }
    }

    /// The link MTU (largest IP packet).
    pub(crate) fn mtu(&self) -> usize {
        self.mtu
    }

    /// Send a frame of `ip_len` IP bytes written by `write` to `dst_mac`.
    pub(crate) fn send_with(&self, dst_mac: MacAddr, ip_len: usize, write: impl FnOnce(&mut [u8])) {
        let frame = scratch::build(ETHERNET_HEADER_LEN + ip_len, |frame| {
            write_ethernet(frame, self.mac, dst_mac);
            write(&mut frame[ETHERNET_HEADER_LEN..]);
        });
        scratch::send(frame, |f| (self.sink)(f, None));
    }

    /// Send a frame of `ip_len` IP bytes written by `write` (a TCP or UDP packet with no
    /// checksum computed) to `dst_mac`, whose port completes or trusts checksums: the
    /// checksum is left partial.
    pub(crate) fn send_partial_with(
        &self,
        dst_mac: MacAddr,
        ip_len: usize,
        write: impl FnOnce(&mut [u8]),
    ) {
        let mut partial = None;
        let frame = scratch::build(ETHERNET_HEADER_LEN + ip_len, |frame| {
            write_ethernet(frame, self.mac, dst_mac);
            write(&mut frame[ETHERNET_HEADER_LEN..]);
            partial = Partial::leave(frame);
        });
        scratch::send(frame, |f| (self.sink)(f, partial));
    }

    /// Send a whole IPv4 packet, in fragments if it is over the MTU (DF clear).
    pub(crate) fn send_ipv4(&self, dst_mac: MacAddr, packet: &[u8]) {
        if packet.len() <= self.mtu {
            self.send_with(dst_mac, packet.len(), |b| b.copy_from_slice(packet));
            return;
        }
        match crate::ipv4frag::fragment(packet, self.mtu) {
            Ok(fragments) => {
                for f in fragments {
                    self.send_with(dst_mac, f.len(), |b| b.copy_from_slice(&f));
                }
            }
            Err(e) => tracing::debug!("not sent to the guest: {e}"),
        }
    }

    /// Send a UDP datagram from `src` to a guest at `dst` whose payload is already in
    /// `frame`, after [`UDP_HEADROOM`] bytes for the headers (no copy when it fits the MTU).
    /// `partial`: the guest takes the checksum left partial.
    pub(crate) fn send_udp_frame(
        &self,
        dst_mac: MacAddr,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        mut frame: BytesMut,
        partial: bool,
    ) {
        let n = frame.len() - UDP_HEADROOM;
        if IPV4_HEADER_LEN + UDP_HEADER_LEN + n > self.mtu {
            return self.send_udp(dst_mac, src, dst, &frame[UDP_HEADROOM..]);
        }
        self.write_udp_headers(&mut frame, dst_mac, src, dst, partial);
        let partial = if partial {
            Partial::leave(&mut frame)
        } else {
            None
        };
        (self.sink)(frame.freeze(), partial);
    }

    /// Send datagrams from `src` to a guest at `dst` in one frame (UDP segmentation
    /// offload): their payloads lie one after the other in `frame` after [`UDP_HEADROOM`]
    /// bytes, each `segment` bytes but the last, which may be shorter. Only for a guest that
    /// takes such frames, with `segment` plus headers within the MTU and at most 65,507 bytes
    /// in all.
    pub(crate) fn send_udp_segments(
        &self,
        dst_mac: MacAddr,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        mut frame: BytesMut,
        segment: u16,
    ) {
        self.write_udp_headers(&mut frame, dst_mac, src, dst, true);
        let partial = Partial::leave(&mut frame).map(|p| Partial { segment, ..p });
        (self.sink)(frame.freeze(), partial);
    }

    /// The Ethernet, IPv4 and UDP headers in the [`UDP_HEADROOM`] bytes before the payload
    /// in `frame`; the UDP checksum computed, or left for [`Partial::leave`] (`partial`).
    fn write_udp_headers(
        &self,
        frame: &mut BytesMut,
        dst_mac: MacAddr,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        partial: bool,
    ) {
        let n = frame.len() - UDP_HEADROOM;
        write_ethernet(frame, self.mac, dst_mac);
        let mut caps = ChecksumCapabilities::default();
        if partial {
            caps.udp = smoltcp::phy::Checksum::None;
        }
        write_ipv4(
            &mut frame[ETHERNET_HEADER_LEN..],
            *src.ip(),
            *dst.ip(),
            IpProtocol::Udp,
            UDP_HEADER_LEN + n,
            false,
            |p| {
                UdpRepr {
                    src_port: src.port(),
                    dst_port: dst.port(),
                }
                .emit(
                    &mut UdpPacket::new_unchecked(p),
                    &IpAddress::Ipv4(*src.ip()),
                    &IpAddress::Ipv4(*dst.ip()),
                    n,
                    |_| {}, // the payload is in place
                    &caps,
                )
            },
        );
    }

    /// Send a UDP datagram from `src` to a guest at `dst`.
    pub(crate) fn send_udp(
        &self,
        dst_mac: MacAddr,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        payload: &[u8],
    ) {
        if payload.len() > super::udp::MAX_DATAGRAM {
            return; // no IPv4 datagram carries it (callers count it)
        }
        let len = IPV4_HEADER_LEN + UDP_HEADER_LEN + payload.len();
        if len <= self.mtu {
            self.send_with(dst_mac, len, |b| {
                write_ipv4(
                    b,
                    *src.ip(),
                    *dst.ip(),
                    IpProtocol::Udp,
                    UDP_HEADER_LEN + payload.len(),
                    false,
                    |p| write_udp(p, src, dst, payload),
                )
            });
            return;
        }
        let mut packet = vec![0u8; len];
        write_ipv4(
            &mut packet,
            *src.ip(),
            *dst.ip(),
            IpProtocol::Udp,
            UDP_HEADER_LEN + payload.len(),
            true,
            |p| write_udp(p, src, dst, payload),
        );
        self.send_ipv4(dst_mac, &packet);
    }

    /// Send an ICMP error from `from` about the guest's packet `orig`.
    pub(crate) fn send_icmp_error(
        &self,
        dst_mac: MacAddr,
        from: Ipv4Addr,
        kind: IcmpError,
        orig: &Original<'_>,
    ) {
        let header = Ipv4Repr {
            src_addr: orig.src,
            dst_addr: orig.dst,
            next_header: orig.protocol,
            payload_len: orig.payload_len,
            hop_limit: orig.ttl,
        };
        let data = &orig.head[..orig.head.len().min(8)];
        let repr = match kind {
            IcmpError::Unreachable(reason) => Icmpv4Repr::DstUnreachable {
                reason,
                header,
                data,
            },
            IcmpError::TtlExceeded => Icmpv4Repr::TimeExceeded {
                reason: Icmpv4TimeExceeded::TtlExpired,
                header,
                data,
            },
        };
        let icmp_len = repr.buffer_len();
        self.send_with(dst_mac, IPV4_HEADER_LEN + icmp_len, |b| {
            write_ipv4(b, from, orig.src, IpProtocol::Icmp, icmp_len, false, |p| {
                repr.emit(
                    &mut Icmpv4Packet::new_unchecked(p),
                    &ChecksumCapabilities::default(),
                )
            })
        });
    }
}

/// Where the frames the NAT builds are built: one buffer per thread, built into again once
/// the sink has let go of the last frame (the tap wrote it out at once), so that a frame costs
/// no allocation and no zeroing of its 64 KiB.
mod scratch {
    use std::cell::{Cell, RefCell};

    use bytes::{Bytes, BytesMut};

    /// Room for the largest frame (a 64 KiB IP packet and its Ethernet header).
    const SIZE: usize = 65535 + 14;
    /// The headers a writer may leave bytes of unwritten (Ethernet, IPv4 and TCP with their
    /// longest options): zeroed before every frame, as a fresh buffer would be.
    const HEADERS: usize = 14 + 60 + 60;

    thread_local! {
        static BUF: RefCell<BytesMut> = RefCell::new(BytesMut::new());
        /// How much of `BUF` has been initialized (written) since it was allocated.
        static INIT: Cell<usize> = const { Cell::new(0) };
    }

    /// A frame of `len` bytes written by `write` (after its headers are zeroed).
    pub(super) fn build(len: usize, write: impl FnOnce(&mut [u8])) -> BytesMut {
        let mut buf = BUF.with(|b| std::mem::take(&mut *b.borrow_mut()));
        if len > SIZE || buf.capacity() < SIZE {
            buf = BytesMut::with_capacity(SIZE.max(len));
            INIT.with(|i| i.set(0));
        }
        let init = INIT.with(Cell::get);
        if init < len {
            buf.clear();
            buf.resize(len, 0);
            INIT.with(|i| i.set(len));
        } else {
            // SAFETY: the first `init` bytes of this allocation were written before (zeroes
            // or earlier frames) and nothing has uninitialized them since.
            unsafe { buf.set_len(len) };
            buf[..HEADERS.min(len)].fill(0);
        }
        write(&mut buf);
        buf
    }

    /// Hand `frame` to `sink`; keep its buffer for the next frame if the sink kept no copy.
    pub(super) fn send(frame: BytesMut, sink: impl FnOnce(Bytes)) {
        let frame = frame.freeze();
        sink(frame.clone());
        if let Ok(buf) = frame.try_into_mut() {
            if buf.capacity() >= SIZE {
                BUF.with(|b| *b.borrow_mut() = buf);
            }
        } else {
            INIT.with(|i| i.set(0)); // the next frame gets a buffer of its own
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_reused_buffer_carries_nothing_of_earlier_frames_in_its_headers() {
            // A large frame written full, let go of by its sink: its buffer is reused.
            let big = build(60_000, |b| b.fill(0xaa));
            let first = big.as_ptr();
            send(big, drop);
            // A smaller frame whose writer leaves its headers unwritten.
            let small = build(200, |b| b[HEADERS..].fill(0x55));
            assert_eq!(small.as_ptr(), first, "the buffer was reused");
            assert_eq!(small.len(), 200);
            assert!(small[..HEADERS].iter().all(|&b| b == 0), "headers zeroed");
            assert!(small[HEADERS..].iter().all(|&b| b == 0x55));
            // A sink that keeps the frame: the next one gets a fresh, zeroed buffer.
            let mut kept = None;
            send(small, |f| kept = Some(f));
            let next = build(70_000, |_| {});
            assert_ne!(next.as_ptr(), first);
            assert!(next.iter().all(|&b| b == 0), "a fresh buffer is all zeroes");
            assert!(
                kept.unwrap()[HEADERS..].iter().all(|&b| b == 0x55),
                "the kept frame intact"
            );
        }
    }
}
