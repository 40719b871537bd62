//! Per-packet event counters of the gateway. Counters, not logs, for per-packet events.

/// What the gateway saw and did, frame by frame. Plain numbers: the daemon exposes them.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// Frames handed to [`crate::Gateway::receive`].
    pub frames_in: u64,
    /// Frames the gateway produced.
    pub frames_out: u64,
    /// ARP requests for one of the gateway's addresses that were answered.
    pub arp_replies: u64,
    /// ICMP echo requests to the gateway's own addresses that were answered.
    pub icmp_echo_replies: u64,
    /// UDP datagrams delivered to local services.
    pub udp_local: u64,
    /// Packets handed to the NAT.
    pub routed: u64,
    /// Frames too short for an Ethernet header or otherwise unparseable at L2.
    pub drop_malformed_ethernet: u64,
    /// Ethertypes the gateway does not handle (IPv6 today, LLDP, ...).
    pub drop_unsupported_ethertype: u64,
    /// Truncated or nonsensical ARP packets.
    pub drop_malformed_arp: u64,
    /// IPv4 headers that lie about their lengths, wrong version, options past the end.
    pub drop_malformed_ipv4: u64,
    /// IPv4 header checksum mismatch.
    pub drop_bad_ipv4_checksum: u64,
    /// IPv4 fragments that reached the gateway and were dropped by reassembly (overlaps,
    /// oversize, bounds). The reassembler's own counters ([`crate::ipv4frag::FragCounters`])
    /// hold every drop, of fragments reassembled elsewhere too ([`crate::Gateway::reassembler`]).
    pub drop_fragment: u64,
    /// Truncated UDP packets, lying UDP length, bad UDP checksum.
    pub drop_malformed_udp: u64,
    /// Truncated ICMP packets or bad ICMP checksum.
    pub drop_malformed_icmp: u64,
    /// Well-formed packets to an on-link address that is not the gateway's.
    pub drop_no_route: u64,
    /// IP protocols other than TCP, UDP and ICMP.
    pub drop_unsupported_protocol: u64,
    /// Frames from a source MAC that is broadcast/multicast, or from the gateway's own MAC.
    pub drop_bad_source: u64,
}
