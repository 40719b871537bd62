//! Server configuration, its validation, and parsing of Lima-style static lease lists.
//!
//! Validation catches configurations that would make the server hand out unusable
//! addresses (pool outside the subnet, static lease on the broadcast address, ...).
//! It does not check anything about the host (whether `server_ip` is really
//! configured anywhere): this crate never touches the network.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use dhcproto::v4::DhcpOption;
use dhcproto::{Encodable, Name};
use ipnet::Ipv4Net;
use thiserror::Error;

use crate::mac::{MacAddr, MacParseError};

/// Smallest interface MTU a client may be told to use (RFC 2132 section 5.1).
const MIN_MTU: u16 = 68;
/// Upper bound for the encoded domain search list, so it fits one option and the
/// whole reply stays within the 576 bytes every client must accept.
const MAX_SEARCH_LIST_BYTES: usize = 255;

/// What the server hands out and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Server identifier (option 54) and `siaddr`; normally the gateway/host address.
    pub server_ip: Ipv4Addr,
    /// The guest network; gives the subnet mask (option 1) and broadcast address (option 28).
    pub subnet: Ipv4Net,
    /// Default gateway (option 3).
    pub router: Ipv4Addr,
    /// DNS servers (option 6); the option is omitted when empty.
    pub dns_servers: Vec<Ipv4Addr>,
    /// First address of the dynamic pool.
    pub pool_start: Ipv4Addr,
    /// Last address of the dynamic pool (inclusive).
    pub pool_end: Ipv4Addr,
    /// Lease time (option 51); T1 (58) is half of it, T2 (59) seven eighths.
    pub lease_time: Duration,
    /// Interface MTU (option 26), sent when `Some`.
    pub mtu: Option<u16>,
    /// Domain search list (option 119, RFC 3397), sent when non-empty.
    pub search_domains: Vec<String>,
    /// Fixed bindings: this MAC always gets this address (may lie outside the pool).
    pub static_leases: Vec<(Ipv4Addr, MacAddr)>,
    /// Addresses never handed out. `server_ip`, `router`, and the subnet's network
    /// and broadcast addresses are always excluded, listed here or not.
    pub reserved: Vec<Ipv4Addr>,
}

/// A [`Config`] that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("subnet {0} is too small for DHCP (need a prefix of /30 or shorter)")]
    SubnetTooSmall(Ipv4Net),
    #[error("{what} {ip} is not a host address of subnet {subnet}")]
    OutsideSubnet {
        what: &'static str,
        ip: Ipv4Addr,
        subnet: Ipv4Net,
    },
    #[error("pool start {start} is after pool end {end}")]
    EmptyPool { start: Ipv4Addr, end: Ipv4Addr },
    #[error("lease time {0:?} must be between 1 second and 2^32-1 seconds")]
    BadLeaseTime(Duration),
    #[error("MTU {0} is below the minimum of 68")]
    BadMtu(u16),
    #[error("invalid search domain {domain:?}: {reason}")]
    BadSearchDomain { domain: String, reason: String },
    #[error("domain search list encodes to {0} bytes, more than the limit of 255")]
    SearchListTooLong(usize),
    #[error("static lease {ip}={mac}: {reason}")]
    BadStaticLease {
        ip: Ipv4Addr,
        mac: MacAddr,
        reason: &'static str,
    },
}

impl Config {
    /// Check the configuration; returns the parsed search domains on success.
    pub(crate) fn validate(&self) -> Result<Vec<Name>, ConfigError> {
        let subnet = self.subnet.trunc();
        if subnet.prefix_len() > 30 {
            return Err(ConfigError::SubnetTooSmall(self.subnet));
        }
        let host = |what: &'static str, ip: Ipv4Addr| {
            if is_host(&subnet, ip) {
                Ok(())
            } else {
                Err(ConfigError::OutsideSubnet { what, ip, subnet })
            }
        };
        host("server address", self.server_ip)?;
        host("router", self.router)?;
        host("pool start", self.pool_start)?;
        host("pool end", self.pool_end)?;
        if self.pool_start > self.pool_end {
            return Err(ConfigError::EmptyPool {
                start: self.pool_start,
                end: self.pool_end,
            });
        }
        let secs = self.lease_time.as_secs();
        if secs == 0 || secs > u64::from(u32::MAX) {
            return Err(ConfigError::BadLeaseTime(self.lease_time));
        }
        if let Some(mtu) = self.mtu {
            if mtu < MIN_MTU {
                return Err(ConfigError::BadMtu(mtu));
            }
        }

        let reserved: HashSet<Ipv4Addr> = self.reserved.iter().copied().collect();
        let mut by_ip: HashMap<Ipv4Addr, MacAddr> = HashMap::new();
        let mut by_mac: HashMap<MacAddr, Ipv4Addr> = HashMap::new();
        for &(ip, mac) in &self.static_leases {
            let bad = |reason| ConfigError::BadStaticLease { ip, mac, reason };
            if !is_host(&subnet, ip) {
                return Err(bad("address is not a host address of the subnet"));
            }
            if ip == self.server_ip || ip == self.router || reserved.contains(&ip) {
                return Err(bad("address is reserved"));
            }
            match by_ip.insert(ip, mac) {
                Some(other) if other != mac => {
                    return Err(bad("address is also given to another MAC"));
                }
                _ => {}
            }
            match by_mac.insert(mac, ip) {
                Some(other) if other != ip => {
                    return Err(bad("MAC also has another static address"));
                }
                _ => {}
            }
        }

        let names = self
            .search_domains
            .iter()
            .map(|d| parse_domain(d))
            .collect::<Result<Vec<_>, _>>()?;
        if !names.is_empty() {
            let len = DhcpOption::DomainSearch(names.clone())
                .to_vec()
                .map_err(|e| ConfigError::BadSearchDomain {
                    domain: self.search_domains.join(","),
                    reason: e.to_string(),
                })?
                .len()
                - 2;
            if len > MAX_SEARCH_LIST_BYTES {
                return Err(ConfigError::SearchListTooLong(len));
            }
        }
        Ok(names)
    }
}

/// Is `ip` inside `subnet` and neither its network nor its broadcast address?
pub(crate) fn is_host(subnet: &Ipv4Net, ip: Ipv4Addr) -> bool {
    subnet.contains(&ip) && ip != subnet.network() && ip != subnet.broadcast()
}

fn parse_domain(d: &str) -> Result<Name, ConfigError> {
    let bad = |reason: String| ConfigError::BadSearchDomain {
        domain: d.to_string(),
        reason,
    };
    let trimmed = d.trim_end_matches('.');
    if trimmed.is_empty() {
        return Err(bad("empty name".into()));
    }
    if !trimmed
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.')
    {
        return Err(bad(
            "only letters, digits, '-', '_' and '.' are allowed".into()
        ));
    }
    if trimmed.split('.').any(str::is_empty) {
        return Err(bad("empty label".into()));
    }
    let mut name = Name::from_ascii(trimmed).map_err(|e| bad(e.to_string()))?;
    name.set_fqdn(true);
    Ok(name)
}

/// A bad item in a static lease list.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParseError {
    #[error("static lease {item:?}: expected IP=MAC")]
    MissingEquals { item: String },
    #[error("static lease {item:?}: invalid IPv4 address")]
    BadIp { item: String },
    #[error("static lease {item:?}: {source}")]
    BadMac {
        item: String,
        #[source]
        source: MacParseError,
    },
}

/// Parse Lima's `--leases` value: `192.168.104.3=52:55:55:aa:bb:cc,192.168.104.4=...`.
///
/// Whitespace around items is ignored, as are empty items (so `""` is an empty list).
/// Conflicts between items (one IP for two MACs) are reported by [`crate::Server::new`].
pub fn parse_static_leases(s: &str) -> Result<Vec<(Ipv4Addr, MacAddr)>, ParseError> {
    s.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            let (ip, mac) = item
                .split_once('=')
                .ok_or_else(|| ParseError::MissingEquals {
                    item: item.to_string(),
                })?;
            let ip = ip.trim().parse().map_err(|_| ParseError::BadIp {
                item: item.to_string(),
            })?;
            let mac = mac.trim().parse().map_err(|source| ParseError::BadMac {
                item: item.to_string(),
                source,
            })?;
            Ok((ip, mac))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn config() -> Config {
        Config {
            server_ip: Ipv4Addr::new(192, 168, 5, 2),
            subnet: "192.168.5.0/24".parse().unwrap(),
            router: Ipv4Addr::new(192, 168, 5, 2),
            dns_servers: vec![Ipv4Addr::new(192, 168, 5, 3)],
            pool_start: Ipv4Addr::new(192, 168, 5, 15),
            pool_end: Ipv4Addr::new(192, 168, 5, 254),
            lease_time: Duration::from_secs(3600),
            mtu: Some(1500),
            search_domains: vec!["example.com".into()],
            static_leases: vec![],
            reserved: vec![Ipv4Addr::new(192, 168, 5, 3)],
        }
    }

    const MAC: MacAddr = MacAddr([0x52, 0x55, 0x55, 0, 0, 1]);

    #[test]
    fn default_like_config_is_valid() {
        let names = config().validate().unwrap();
        assert_eq!(names.len(), 1);
        assert!(names[0].is_fqdn());
    }

    #[test]
    fn rejects_bad_configs() {
        fn ip(s: &str) -> Ipv4Addr {
            s.parse().unwrap()
        }
        type Mutation = Box<dyn Fn(&mut Config)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|c| c.subnet = "192.168.5.0/31".parse().unwrap()),
                "too small",
            ),
            (Box::new(|c| c.server_ip = ip("10.0.0.1")), "server address"),
            (Box::new(|c| c.router = ip("192.168.5.255")), "router"),
            (
                Box::new(|c| c.pool_start = ip("192.168.4.10")),
                "pool start",
            ),
            (Box::new(|c| c.pool_end = ip("192.168.5.255")), "pool end"),
            (
                Box::new(|c| c.pool_end = ip("192.168.5.10")),
                "after pool end",
            ),
            (Box::new(|c| c.lease_time = Duration::ZERO), "lease time"),
            (
                Box::new(|c| c.lease_time = Duration::from_secs(1 << 33)),
                "lease time",
            ),
            (Box::new(|c| c.mtu = Some(67)), "MTU"),
            (
                Box::new(|c| c.search_domains = vec!["".into()]),
                "empty name",
            ),
            (
                Box::new(|c| c.search_domains = vec!["a..b".into()]),
                "empty label",
            ),
            (
                Box::new(|c| c.search_domains = vec!["a b".into()]),
                "allowed",
            ),
            (
                Box::new(|c| c.search_domains = vec!["a".repeat(64)]),
                "search domain",
            ),
            (
                Box::new(|c| {
                    c.search_domains = (0..30).map(|i| format!("d{i}.example{i}.org")).collect()
                }),
                "search list",
            ),
            (
                Box::new(|c| c.static_leases = vec![(ip("10.0.0.5"), MAC)]),
                "static",
            ),
            (
                Box::new(|c| c.static_leases = vec![(ip("192.168.5.0"), MAC)]),
                "static",
            ),
            (
                Box::new(|c| c.static_leases = vec![(ip("192.168.5.2"), MAC)]),
                "reserved",
            ),
            (
                Box::new(|c| c.static_leases = vec![(ip("192.168.5.3"), MAC)]),
                "reserved",
            ),
            (
                Box::new(|c| {
                    c.static_leases = vec![(ip("192.168.5.5"), MAC), (ip("192.168.5.6"), MAC)]
                }),
                "another static",
            ),
            (
                Box::new(|c| {
                    c.static_leases = vec![
                        (ip("192.168.5.5"), MAC),
                        (ip("192.168.5.5"), MacAddr([2, 0, 0, 0, 0, 2])),
                    ]
                }),
                "another MAC",
            ),
        ];
        for (mutate, needle) in cases {
            let mut c = config();
            mutate(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{e:?} should mention {needle:?}");
        }
    }

    #[test]
    fn static_lease_repeated_identically_is_fine() {
        let mut c = config();
        let ip = Ipv4Addr::new(192, 168, 5, 5);
        c.static_leases = vec![(ip, MAC), (ip, MAC)];
        c.validate().unwrap();
    }

    #[test]
    fn parses_lima_leases() {
        let v = parse_static_leases(
            "192.168.104.3=52:55:55:aa:bb:cc, 192.168.104.4=52:55:55:aa:bb:cd,",
        )
        .unwrap();
        assert_eq!(
            v,
            vec![
                (
                    Ipv4Addr::new(192, 168, 104, 3),
                    MacAddr([0x52, 0x55, 0x55, 0xaa, 0xbb, 0xcc])
                ),
                (
                    Ipv4Addr::new(192, 168, 104, 4),
                    MacAddr([0x52, 0x55, 0x55, 0xaa, 0xbb, 0xcd])
                ),
            ]
        );
        assert_eq!(parse_static_leases("").unwrap(), vec![]);
    }

    #[test]
    fn parse_errors_name_the_item() {
        let e = parse_static_leases("192.168.104.3=52:55:55:aa:bb:cc,oops").unwrap_err();
        assert_eq!(
            e,
            ParseError::MissingEquals {
                item: "oops".into()
            }
        );
        assert!(e.to_string().contains("\"oops\""));
        let e = parse_static_leases("192.168.104.300=52:55:55:aa:bb:cc").unwrap_err();
        assert!(matches!(e, ParseError::BadIp { .. }));
        assert!(e.to_string().contains("192.168.104.300=52:55:55:aa:bb:cc"));
        let e = parse_static_leases("192.168.104.3=52:55:55:aa:bb").unwrap_err();
        assert!(matches!(e, ParseError::BadMac { .. }));
        assert!(
            e.to_string().contains("192.168.104.3=52:55:55:aa:bb"),
            "{e}"
        );
    }
}
