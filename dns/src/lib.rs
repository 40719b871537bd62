//! usernet's DNS server: the "host resolver" at the network's DNS address (Lima's 192.168.5.3).
//!
//! A guest query is answered the way the host itself would resolve it:
//! - exact static names first (`host.lima.internal`, `--dns-host`, names added at run time);
//! - A and AAAA through the host's libc `getaddrinfo` (so /etc/hosts, nsswitch, mDNS and VPN
//!   split DNS behave as on the host), on a bounded pool of blocking threads;
//! - CNAME, TXT, NS, MX, SRV through hickory-resolver configured from the host's resolv.conf
//!   (nameservers, search, ndots, timeout, attempts), with the upstream records and TTLs;
//! - every other type (and every class but IN) forwarded unchanged to the resolv.conf
//!   nameservers, then to the fallback list; the answer goes back byte for byte (only the ID is
//!   the client's again).
//!
//! Every answer comes within `DnsConfig::timeout` (SERVFAIL otherwise); UDP answers are truncated
//! (TC) to 512 bytes or the query's EDNS size. This crate does not parse frames: the daemon hands
//! it DNS payloads (`answer_udp`) or sockets (`serve_udp`, `serve_tcp`, `serve_tcp_stream`).
//! No DNSSEC validation, no zone transfers, no caching beyond hickory-resolver's own.

mod forward;
mod host;
mod names;
mod resolve;
mod serve;
mod stats;
mod upstream;
mod wire;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use stats::DnsStats;

/// TTL of answers we make up: static names and getaddrinfo results (getaddrinfo reports no
/// TTL). Short, so a changed host network (VPN up or down) reaches the guest quickly.
pub const LOCAL_TTL: u32 = 30;

/// The UDP payload size this server advertises in its EDNS OPT record.
pub const EDNS_PAYLOAD: u16 = 1232;

/// What a static name answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StaticTarget {
    /// An A (IPv4) or AAAA (IPv6) record.
    Ip(IpAddr),
    /// A CNAME to this name, which is then resolved like any other name.
    Alias(String),
}

impl StaticTarget {
    /// Lima's `hostResolver.hosts` value: an address is an address, anything else an alias.
    pub fn parse(value: &str) -> StaticTarget {
        match value.trim().parse::<IpAddr>() {
            Ok(ip) => StaticTarget::Ip(ip),
            Err(_) => StaticTarget::Alias(value.trim().to_string()),
        }
    }
}

/// How the DNS server answers; `DnsConfig::default()` is Lima's default network.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// `host.lima.internal` answers this address.
    pub host_ip: Ipv4Addr,
    /// Exact names (no wildcards, no zones): `(name, target)`; a name given twice gets both
    /// targets (e.g. an IPv4 and an IPv6 address). An entry named `host.lima.internal`
    /// replaces the default one.
    pub static_names: Vec<(String, StaticTarget)>,
    /// Answer AAAA (Lima `hostResolver.ipv6`); false answers AAAA with NOERROR and no records.
    pub ipv6: bool,
    /// The host's resolver configuration: nameservers, search, ndots, timeout, attempts.
    /// Read at start and again when it changes. A missing file means no nameservers.
    pub resolv_conf: PathBuf,
    /// Where forwarded queries go after the resolv.conf nameservers; also the resolver's
    /// nameservers when resolv.conf names none.
    pub fallback: Vec<SocketAddr>,
    /// Upper bound for any answer: an upstream that is down or slow gives SERVFAIL by then.
    pub timeout: Duration,
    /// When not empty, these replace the nameservers of `resolv_conf` (whose search and
    /// options still apply): resolv.conf has no port syntax, tests and benches need one.
    pub nameservers: Vec<SocketAddr>,
    /// Answer A and AAAA through getaddrinfo (true) or forward them like other types (false,
    /// for a daemon that must not use the host's libc resolver).
    pub host_resolver: bool,
    /// At most this many getaddrinfo calls run at once (each holds a blocking thread); more
    /// wait their turn within `timeout`.
    pub max_host_lookups: usize,
}

impl Default for DnsConfig {
    fn default() -> DnsConfig {
        DnsConfig {
            host_ip: Ipv4Addr::new(192, 168, 5, 2),
            static_names: Vec::new(),
            ipv6: true,
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            fallback: vec![
                SocketAddr::from(([8, 8, 8, 8], 53)),
                SocketAddr::from(([1, 1, 1, 1], 53)),
            ],
            timeout: Duration::from_secs(5),
            nameservers: Vec::new(),
            host_resolver: true,
            max_host_lookups: 64,
        }
    }
}

/// Why a DNS server could not be created.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// A static name (or an alias target) is not a valid domain name.
    #[error("invalid DNS name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    /// A setting that cannot work (the field and the value are named).
    #[error("invalid DNS setting {field}: {reason}")]
    InvalidSetting { field: &'static str, reason: String },
}

/// The DNS server. Cheap to clone (one `Arc` inside); every clone serves the same names and
/// counts into the same counters.
#[derive(Clone)]
pub struct DnsServer {
    inner: Arc<resolve::Inner>,
}

impl DnsServer {
    /// Validates `config` and prepares the server. Reads `config.resolv_conf` (nothing else of
    /// the host's configuration), opens no socket.
    pub fn new(config: DnsConfig) -> Result<DnsServer, DnsError> {
        Ok(DnsServer {
            inner: Arc::new(resolve::Inner::new(config)?),
        })
    }

    /// Answers one query received over UDP. The answer is truncated (TC set, sections emptied)
    /// to fit min(max(512, the query's EDNS size), `max_udp`), where `max_udp` is what the
    /// transport can carry. `None` = drop (too short to answer, or not a query).
    pub async fn answer_udp(&self, query: &[u8], max_udp: usize) -> Option<Vec<u8>> {
        self.inner.answer_udp(query, max_udp).await
    }

    /// [`DnsServer::answer_udp`] as a task of its own, for a caller that takes queries from
    /// a guest: `None` (the query dropped and counted) when 4096 UDP queries are being
    /// answered already, so that a flood of them holds no more.
    pub fn try_answer_udp(
        &self,
        query: Vec<u8>,
        max_udp: usize,
    ) -> Option<impl std::future::Future<Output = Option<Vec<u8>>> + Send + 'static> {
        let permit = self.inner.udp_permit()?;
        let inner = self.inner.clone();
        Some(async move {
            let _permit = permit;
            inner.answer_udp(&query, max_udp).await
        })
    }

    /// Answers one query received over TCP (no truncation below 65535 bytes). `None` = drop.
    pub async fn answer_tcp(&self, query: &[u8]) -> Option<Vec<u8>> {
        self.inner.answer_tcp(query).await
    }

    /// Serves DNS over TCP on this listener, forever: several queries per connection (2-byte
    /// length prefix), answered concurrently, each connection closed after 30 s idle.
    pub async fn serve_tcp(&self, listener: tokio::net::TcpListener) {
        serve::serve_tcp(self.inner.clone(), listener).await
    }

    /// Serves DNS over one already accepted stream (for example a guest TCP connection the
    /// netstack terminates) until the peer closes it or it idles for 30 s.
    pub async fn serve_tcp_stream<S>(&self, stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
    {
        serve::serve_tcp_stream(self.inner.clone(), stream).await
    }

    /// Serves DNS over UDP on this socket, forever (for tests and for a host-side listener).
    pub async fn serve_udp(&self, socket: tokio::net::UdpSocket) {
        serve::serve_udp(self.inner.clone(), socket).await
    }

    /// gvproxy's `/services/dns/add`: each record `(name, ip)` makes the exact name
    /// `name.zone` answer `ip` (`name` empty or `@` = the zone itself; `zone` empty or `.` =
    /// names are absolute). A name added again gets the addresses of the latest call (all the
    /// addresses given for it in that call). Other names in the zone are not affected: they
    /// still resolve upstream. Invalid names are skipped (and logged).
    pub fn add_names(&self, zone: &str, records: &[(String, IpAddr)]) {
        self.inner.names.add_zone_records(zone, records)
    }

    /// Every static name that answers an address, as `(name without the final dot, ip)`,
    /// sorted (for `/services/dns/all`).
    pub fn names(&self) -> Vec<(String, IpAddr)> {
        self.inner.names.addresses()
    }

    /// What `add_names` added, per zone, as given: `("internal.", [("host.lima", ip), ..])`
    /// (gvproxy's `/services/dns/all` shape). Configured static names are not listed here.
    pub fn zones(&self) -> Vec<(String, Vec<(String, IpAddr)>)> {
        self.inner.names.zones()
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> DnsStats {
        self.inner.stats.snapshot()
    }
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer")
            .field("counters", &self.counters())
            .finish()
    }
}
