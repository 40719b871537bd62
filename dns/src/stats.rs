//! Counters of the DNS server: one atomic per event, a serializable snapshot.

use std::sync::atomic::{AtomicU64, Ordering};

/// What the DNS server has done since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DnsStats {
    /// Queries received over UDP (including malformed ones).
    pub queries_udp: u64,
    /// Queries received over TCP (including malformed ones).
    pub queries_tcp: u64,
    /// Answered from static names.
    pub answered_local: u64,
    /// Answered from the host: getaddrinfo (A, AAAA) or the resolv.conf resolver (CNAME, TXT,
    /// NS, MX, SRV), including NXDOMAIN and empty answers.
    pub answered_host: u64,
    /// Answered by forwarding the query to an upstream server.
    pub forwarded: u64,
    /// Answered SERVFAIL by us (upstream down or slow, lookup failed, timeout).
    pub servfail: u64,
    /// Answered FORMERR (the query could not be parsed or had no single question).
    pub formerr: u64,
    /// UDP answers truncated (TC set) to fit 512 bytes or the client's EDNS size.
    pub truncated: u64,
    /// Queries dropped without an answer (too short, a response, overload).
    pub dropped: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub queries_udp: AtomicU64,
    pub queries_tcp: AtomicU64,
    pub answered_local: AtomicU64,
    pub answered_host: AtomicU64,
    pub forwarded: AtomicU64,
    pub servfail: AtomicU64,
    pub formerr: AtomicU64,
    pub truncated: AtomicU64,
    pub dropped: AtomicU64,
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    pub fn snapshot(&self) -> DnsStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DnsStats {
            queries_udp: g(&self.queries_udp),
            queries_tcp: g(&self.queries_tcp),
            answered_local: g(&self.answered_local),
            answered_host: g(&self.answered_host),
            forwarded: g(&self.forwarded),
            servfail: g(&self.servfail),
            formerr: g(&self.formerr),
            truncated: g(&self.truncated),
            dropped: g(&self.dropped),
        }
    }
}
