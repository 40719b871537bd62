//! The network plan: which subnet the guest lives in and which addresses,
//! MAC, MTU and DHCP parameters the virtual network uses.
//!
//! [`PlanSettings`] is what the user said (CLI flags, a config file, a Lima
//! `networks.yaml`), every field optional; several sources are layered with
//! [`PlanSettings::merge`]. [`Plan::resolve`] fills every unspecified field
//! from the subnet (the defaults are Lima's: 192.168.5.0/24, host .2, DNS .3,
//! first guest .15) and validates the result, so the rest of usernet only
//! ever sees a [`Plan`] that is consistent.
//!
//! This module does no I/O: reading YAML lives in `config`, and the host's
//! DNS search list is passed to [`Plan::resolve`] by the caller.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Default subnet (Lima's user-mode network).
pub const DEFAULT_SUBNET: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(192, 168, 5, 0), 24);
/// Default MTU.
pub const DEFAULT_MTU: u16 = 1500;
/// Smallest accepted MTU (the IPv4 minimum datagram every host must accept).
pub const MIN_MTU: u32 = 576;
/// Largest accepted MTU.
pub const MAX_MTU: u32 = 65520;
/// Default gateway MAC: gvproxy's, so guests that pinned it keep working.
pub const DEFAULT_GATEWAY_MAC: [u8; 6] = [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xdd];
/// Default DHCP lease time.
pub const DEFAULT_LEASE_TIME: Duration = Duration::from_secs(3600);
/// Shortest accepted DHCP lease time, in seconds.
pub const MIN_LEASE_SECS: u64 = 60;
/// Offset of the host/gateway address from the network address.
pub const HOST_OFFSET: u32 = 2;
/// Offset of the DNS address from the network address.
pub const DNS_OFFSET: u32 = 3;
/// Offset of the first guest address from the network address.
pub const GUEST_OFFSET: u32 = 15;

/// The validated network plan. Build it with [`Plan::resolve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The guest subnet (always a network address: host bits are zero).
    pub subnet: Ipv4Net,
    /// The gateway, and the host's loopback as seen from the guest.
    pub host_ip: Ipv4Addr,
    /// The built-in DNS server.
    pub dns_ip: Ipv4Addr,
    /// The first guest address (what a single guest gets).
    pub guest_ip: Ipv4Addr,
    /// First address of the DHCP pool (inclusive).
    pub pool_start: Ipv4Addr,
    /// Last address of the DHCP pool (inclusive). The pool may contain
    /// `host_ip` and `dns_ip`; those are reserved and never leased.
    pub pool_end: Ipv4Addr,
    pub mtu: u16,
    /// Locally administered unicast MAC of the gateway.
    pub gateway_mac: [u8; 6],
    pub lease_time: Duration,
    /// DHCP domain search list (option 119).
    pub search: Vec<String>,
    /// DNS servers handed out by DHCP (may be empty: no DNS option).
    pub dns_servers: Vec<Ipv4Addr>,
    /// Static leases (Lima `--leases ip=mac,...`), in the order given.
    pub static_leases: Vec<(Ipv4Addr, [u8; 6])>,
}

/// A MAC address, parsed from and shown as lowercase colon hex (the DHCP server's type).
pub use dhcp::{MacAddr as Mac, MacParseError};

/// A static DHCP lease, written `IP=MAC` (e.g. `192.168.5.20=52:55:55:12:34:56`),
/// both on the command line (`--leases`) and in YAML (`leases:` list items).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaticLease {
    pub ip: Ipv4Addr,
    pub mac: Mac,
}

/// What the user asked for; every field optional. YAML keys are the CLI flag
/// names. List fields (`search`, `dns`, `leases`) replace, not extend, the
/// value of an earlier source when merged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PlanSettings {
    /// `subnet`: CIDR, e.g. `10.66.0.0/24`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subnet: Option<Ipv4Net>,
    /// `host-ip`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<Ipv4Addr>,
    /// `dns-ip`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_ip: Option<Ipv4Addr>,
    /// `guest-ip`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_ip: Option<Ipv4Addr>,
    /// `dhcp-start`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dhcp_start: Option<Ipv4Addr>,
    /// `dhcp-end`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dhcp_end: Option<Ipv4Addr>,
    /// `mtu` (wider than u16 so that out-of-range values get a clear error).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// `gateway-mac`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_mac: Option<Mac>,
    /// `lease-time`, in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_time: Option<u64>,
    /// `search`: list of domains.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub search: Option<Vec<String>>,
    /// `dns`: list of IPv4 addresses handed out as DNS servers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<Vec<Ipv4Addr>>,
    /// `leases`: list of `IP=MAC` strings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leases: Option<Vec<StaticLease>>,
}

/// A plan validation error. Its `Display` is one line that starts with the
/// offending field's flag name, followed by the bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PlanError {
    field: &'static str,
    message: String,
}

impl PlanError {
    fn new(field: &'static str, message: String) -> Self {
        PlanError { field, message }
    }

    /// The flag name of the field at fault (`subnet`, `dns-ip`, ...).
    pub fn field(&self) -> &'static str {
        self.field
    }
}

/// A string that is not an `IP=MAC` static lease.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a lease IP=MAC: {reason}")]
pub struct LeaseParseError {
    input: String,
    reason: String,
}

/// Parses `5a:94:ef:e4:0c:dd` (also upper case, and `-` as separator).
pub fn parse_mac(s: &str) -> Result<[u8; 6], MacParseError> {
    s.parse::<Mac>().map(|m| m.0)
}

/// Formats a MAC as lowercase colon hex: `5a:94:ef:e4:0c:dd`.
pub fn format_mac(mac: [u8; 6]) -> String {
    Mac(mac).to_string()
}

/// Formats a lease as `IP=MAC`, the form `--leases` takes.
pub fn format_lease(ip: Ipv4Addr, mac: [u8; 6]) -> String {
    format!("{ip}={}", format_mac(mac))
}

impl FromStr for StaticLease {
    type Err = LeaseParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| LeaseParseError {
            input: s.to_string(),
            reason,
        };
        let (ip, mac) = s
            .split_once('=')
            .ok_or_else(|| err("missing '='".to_string()))?;
        let ip = ip
            .trim()
            .parse::<Ipv4Addr>()
            .map_err(|_| err(format!("{:?} is not an IPv4 address", ip.trim())))?;
        let mac = mac.trim().parse::<Mac>().map_err(|e| err(e.to_string()))?;
        Ok(StaticLease { ip, mac })
    }
}

impl fmt::Display for StaticLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.ip, self.mac)
    }
}

impl Serialize for StaticLease {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for StaticLease {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl PlanSettings {
    /// Layers `later` over `self`: each field `later` sets wins; fields it
    /// leaves unset keep `self`'s value. Lists are replaced as a whole.
    /// Use as `defaults.merge(file).merge(flags)`.
    pub fn merge(self, later: PlanSettings) -> PlanSettings {
        PlanSettings {
            subnet: later.subnet.or(self.subnet),
            host_ip: later.host_ip.or(self.host_ip),
            dns_ip: later.dns_ip.or(self.dns_ip),
            guest_ip: later.guest_ip.or(self.guest_ip),
            dhcp_start: later.dhcp_start.or(self.dhcp_start),
            dhcp_end: later.dhcp_end.or(self.dhcp_end),
            mtu: later.mtu.or(self.mtu),
            gateway_mac: later.gateway_mac.or(self.gateway_mac),
            lease_time: later.lease_time.or(self.lease_time),
            search: later.search.or(self.search),
            dns: later.dns.or(self.dns),
            leases: later.leases.or(self.leases),
        }
    }
}

fn offset(base: Ipv4Addr, n: u32) -> Option<Ipv4Addr> {
    u32::from(base).checked_add(n).map(Ipv4Addr::from)
}

impl Plan {
    /// Fills every field `settings` leaves unset and validates the result.
    ///
    /// Unset addresses derive from the (given or default) subnet: host
    /// network+2, DNS network+3, first guest network+15 (or, when that does
    /// not fit or is taken, the first free address after host and DNS), pool
    /// from the first guest (or `dhcp-start`) to broadcast-1.
    ///
    /// `host_search` is the search list used when `settings.search` is unset,
    /// normally `config::host_search_domains()` (the host's /etc/resolv.conf);
    /// this function itself never touches the filesystem.
    pub fn resolve(settings: PlanSettings, host_search: &[String]) -> Result<Plan, PlanError> {
        let given = settings.subnet.unwrap_or(DEFAULT_SUBNET);
        let subnet = given.trunc();
        if subnet.addr() != given.addr() {
            return Err(PlanError::new(
                "subnet",
                format!("subnet {given} is not a network address (did you mean {subnet}?)"),
            ));
        }
        let no_room =
            || PlanError::new("subnet", format!("subnet {subnet} has no room for a guest"));
        if subnet.prefix_len() >= 31 {
            return Err(no_room());
        }
        let network = subnet.network();
        let broadcast = subnet.broadcast();
        let usable = |ip: Ipv4Addr| subnet.contains(&ip) && ip != network && ip != broadcast;
        // An address derived from the subnet that does not fit means the subnet is too small.
        let derive = |n: u32| {
            offset(network, n)
                .filter(|ip| usable(*ip))
                .ok_or_else(no_room)
        };

        let check_in_subnet = |field: &'static str, ip: Ipv4Addr| -> Result<(), PlanError> {
            if !subnet.contains(&ip) {
                Err(PlanError::new(
                    field,
                    format!("{field} {ip} is outside {subnet}"),
                ))
            } else if ip == network {
                Err(PlanError::new(
                    field,
                    format!("{field} {ip} is the network address of {subnet}"),
                ))
            } else if ip == broadcast {
                Err(PlanError::new(
                    field,
                    format!("{field} {ip} is the broadcast address of {subnet}"),
                ))
            } else {
                Ok(())
            }
        };

        let host_ip = match settings.host_ip {
            Some(ip) => {
                check_in_subnet("host-ip", ip)?;
                ip
            }
            None => derive(HOST_OFFSET)?,
        };
        let dns_ip = match settings.dns_ip {
            Some(ip) => {
                check_in_subnet("dns-ip", ip)?;
                ip
            }
            None => derive(DNS_OFFSET)?,
        };
        if let Some(ip) = settings.dhcp_start {
            check_in_subnet("dhcp-start", ip)?;
        }
        if let Some(ip) = settings.dhcp_end {
            check_in_subnet("dhcp-end", ip)?;
        }
        let reserved = |ip: Ipv4Addr| ip == host_ip || ip == dns_ip;

        let guest_ip = match settings.guest_ip {
            Some(ip) => {
                check_in_subnet("guest-ip", ip)?;
                if ip == host_ip {
                    return Err(PlanError::new(
                        "guest-ip",
                        format!("guest-ip {ip} is the same as host-ip"),
                    ));
                }
                if ip == dns_ip {
                    return Err(PlanError::new(
                        "guest-ip",
                        format!("guest-ip {ip} is the same as dns-ip"),
                    ));
                }
                ip
            }
            None => match settings.dhcp_start.filter(|ip| !reserved(*ip)) {
                Some(start) => start,
                None => Self::first_guest(subnet, host_ip, dns_ip).ok_or_else(no_room)?,
            },
        };

        let pool_start = settings.dhcp_start.unwrap_or(guest_ip);
        let pool_end = match settings.dhcp_end {
            Some(ip) => ip,
            // broadcast - 1; the prefix check above keeps this above the network address.
            None => Ipv4Addr::from(u32::from(broadcast) - 1),
        };
        if pool_start > pool_end {
            return Err(if settings.dhcp_start.is_some() {
                PlanError::new(
                    "dhcp-start",
                    format!("dhcp-start {pool_start} is after dhcp-end {pool_end}"),
                )
            } else {
                PlanError::new(
                    "dhcp-end",
                    format!("dhcp-end {pool_end} is before guest-ip {pool_start}"),
                )
            });
        }
        if guest_ip < pool_start || guest_ip > pool_end {
            return Err(PlanError::new(
                "guest-ip",
                format!("guest-ip {guest_ip} is outside the DHCP pool {pool_start}-{pool_end}"),
            ));
        }

        let mtu = settings.mtu.unwrap_or(u32::from(DEFAULT_MTU));
        if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
            return Err(PlanError::new(
                "mtu",
                format!("mtu {mtu} is out of range {MIN_MTU}..{MAX_MTU}"),
            ));
        }
        let mtu = mtu as u16; // in range, checked above

        let gateway_mac = settings.gateway_mac.map_or(DEFAULT_GATEWAY_MAC, |m| m.0);
        if let Some(problem) = gateway_mac_problem(gateway_mac) {
            return Err(PlanError::new(
                "gateway-mac",
                format!("gateway-mac {} {problem}", format_mac(gateway_mac)),
            ));
        }

        let lease_secs = settings.lease_time.unwrap_or(DEFAULT_LEASE_TIME.as_secs());
        if lease_secs < MIN_LEASE_SECS {
            return Err(PlanError::new(
                "lease-time",
                format!("lease-time {lease_secs} is under the minimum of {MIN_LEASE_SECS} seconds"),
            ));
        }
        if lease_secs > u64::from(u32::MAX) {
            return Err(PlanError::new(
                "lease-time",
                format!(
                    "lease-time {lease_secs} is out of range {MIN_LEASE_SECS}..{}",
                    u32::MAX
                ),
            ));
        }
        let lease_time = Duration::from_secs(lease_secs);

        let search = settings.search.unwrap_or_else(|| host_search.to_vec());
        for domain in &search {
            if !is_domain_name(domain) {
                return Err(PlanError::new(
                    "search",
                    format!("search {domain:?} is not a domain name"),
                ));
            }
        }

        let dns_servers = settings.dns.unwrap_or_else(|| vec![dns_ip]);
        for &ip in &dns_servers {
            if ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() {
                return Err(PlanError::new(
                    "dns",
                    format!("dns {ip} is not a usable DNS server address"),
                ));
            }
            if ip == network || ip == broadcast {
                return Err(PlanError::new(
                    "dns",
                    format!("dns {ip} is not a usable DNS server address in {subnet}"),
                ));
            }
        }

        let mut static_leases: Vec<(Ipv4Addr, [u8; 6])> = Vec::new();
        for lease in settings.leases.unwrap_or_default() {
            let StaticLease { ip, mac: Mac(mac) } = lease;
            check_in_subnet("leases", ip)?;
            let text = format_lease(ip, mac);
            if ip == host_ip {
                return Err(PlanError::new(
                    "leases",
                    format!("leases {text}: {ip} is the host-ip"),
                ));
            }
            if ip == dns_ip {
                return Err(PlanError::new(
                    "leases",
                    format!("leases {text}: {ip} is the dns-ip"),
                ));
            }
            if mac[0] & 1 != 0 {
                return Err(PlanError::new(
                    "leases",
                    format!("leases {text}: {} is a multicast MAC", format_mac(mac)),
                ));
            }
            if mac == gateway_mac {
                return Err(PlanError::new(
                    "leases",
                    format!("leases {text}: {} is the gateway-mac", format_mac(mac)),
                ));
            }
            if let Some(&(_, other)) = static_leases.iter().find(|(i, _)| *i == ip) {
                if other == mac {
                    continue; // exact duplicate: harmless
                }
                return Err(PlanError::new(
                    "leases",
                    format!(
                        "leases {text}: {ip} is already leased to {}",
                        format_mac(other)
                    ),
                ));
            }
            if let Some(&(other, _)) = static_leases.iter().find(|(_, m)| *m == mac) {
                return Err(PlanError::new(
                    "leases",
                    format!(
                        "leases {text}: {} already has the lease {other}",
                        format_mac(mac)
                    ),
                ));
            }
            static_leases.push((ip, mac));
        }

        Ok(Plan {
            subnet,
            host_ip,
            dns_ip,
            guest_ip,
            pool_start,
            pool_end,
            mtu,
            gateway_mac,
            lease_time,
            search,
            dns_servers,
            static_leases,
        })
    }

    /// network+15 if usable and free; else the first free address after
    /// host and DNS; else the first free usable address.
    fn first_guest(subnet: Ipv4Net, host_ip: Ipv4Addr, dns_ip: Ipv4Addr) -> Option<Ipv4Addr> {
        let network = u32::from(subnet.network());
        let broadcast = u32::from(subnet.broadcast());
        let free = |ip: u32| {
            ip > network && ip < broadcast && ip != u32::from(host_ip) && ip != u32::from(dns_ip)
        };
        let preferred = network.checked_add(GUEST_OFFSET);
        let after = u32::from(host_ip).max(u32::from(dns_ip));
        preferred
            .filter(|ip| free(*ip))
            .or_else(|| (after.saturating_add(1)..broadcast).find(|ip| free(*ip)))
            .or_else(|| (network + 1..broadcast).find(|ip| free(*ip)))
            .map(Ipv4Addr::from)
    }

    /// The subnet's network address.
    pub fn network(&self) -> Ipv4Addr {
        self.subnet.network()
    }

    /// The subnet's broadcast address.
    pub fn broadcast(&self) -> Ipv4Addr {
        self.subnet.broadcast()
    }

    /// The subnet mask (for DHCP option 1).
    pub fn netmask(&self) -> Ipv4Addr {
        self.subnet.netmask()
    }

    /// The subnet's prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.subnet.prefix_len()
    }

    /// Whether `ip` is in the subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.subnet.contains(&ip)
    }

    /// Whether `ip` is one the stack itself answers on (host or DNS).
    pub fn is_reserved(&self, ip: Ipv4Addr) -> bool {
        ip == self.host_ip || ip == self.dns_ip
    }

    /// Whether DHCP may hand out `ip` dynamically: inside the pool and not
    /// reserved. (Static leases may lie outside the pool.)
    pub fn in_pool(&self, ip: Ipv4Addr) -> bool {
        ip >= self.pool_start && ip <= self.pool_end && !self.is_reserved(ip)
    }

    /// The fully specified settings that resolve back to this plan.
    pub fn to_settings(&self) -> PlanSettings {
        PlanSettings {
            subnet: Some(self.subnet),
            host_ip: Some(self.host_ip),
            dns_ip: Some(self.dns_ip),
            guest_ip: Some(self.guest_ip),
            dhcp_start: Some(self.pool_start),
            dhcp_end: Some(self.pool_end),
            mtu: Some(u32::from(self.mtu)),
            gateway_mac: Some(Mac(self.gateway_mac)),
            lease_time: Some(self.lease_time.as_secs()),
            search: Some(self.search.clone()),
            dns: Some(self.dns_servers.clone()),
            leases: Some(
                self.static_leases
                    .iter()
                    .map(|&(ip, mac)| StaticLease { ip, mac: Mac(mac) })
                    .collect(),
            ),
        }
    }
}

impl Default for Plan {
    /// Lima's default plan with an empty search list.
    fn default() -> Self {
        Plan::resolve(PlanSettings::default(), &[]).expect("the default plan is valid")
    }
}

/// Why `mac` cannot be the gateway's MAC, if it cannot.
fn gateway_mac_problem(mac: [u8; 6]) -> Option<&'static str> {
    if mac == [0xff; 6] {
        Some("is the broadcast address")
    } else if mac[0] & 1 != 0 {
        Some("is a multicast address")
    } else if mac == [0; 6] {
        Some("is the all-zero address")
    } else if mac[0] & 2 == 0 {
        Some("is not locally administered (the second-lowest bit of the first byte must be set)")
    } else {
        None
    }
}

/// A loose RFC 1035 check: dot-separated labels of 1..=63 letters, digits,
/// `-` or `_`, at most 253 characters; one trailing dot allowed.
fn is_domain_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn resolve(s: PlanSettings) -> Result<Plan, PlanError> {
        Plan::resolve(s, &[])
    }

    fn err(s: PlanSettings) -> String {
        resolve(s).unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_the_lima_plan() {
        let p = Plan::resolve(PlanSettings::default(), &["example.com".to_string()]).unwrap();
        assert_eq!(p.subnet, net("192.168.5.0/24"));
        assert_eq!(p.host_ip, ip("192.168.5.2"));
        assert_eq!(p.dns_ip, ip("192.168.5.3"));
        assert_eq!(p.guest_ip, ip("192.168.5.15"));
        assert_eq!(p.pool_start, ip("192.168.5.15"));
        assert_eq!(p.pool_end, ip("192.168.5.254"));
        assert_eq!(p.mtu, 1500);
        assert_eq!(p.gateway_mac, [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xdd]);
        assert_eq!(p.lease_time, Duration::from_secs(3600));
        assert_eq!(p.search, vec!["example.com".to_string()]);
        assert_eq!(p.dns_servers, vec![ip("192.168.5.3")]);
        assert!(p.static_leases.is_empty());
        assert_eq!(p.netmask(), ip("255.255.255.0"));
        assert_eq!(Plan::default().search, Vec::<String>::new());
    }

    #[test]
    fn subnet_alone_derives_everything() {
        let p = resolve(PlanSettings {
            subnet: Some(net("10.66.0.0/24")),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(p.host_ip, ip("10.66.0.2"));
        assert_eq!(p.dns_ip, ip("10.66.0.3"));
        assert_eq!(p.guest_ip, ip("10.66.0.15"));
        assert_eq!(
            (p.pool_start, p.pool_end),
            (ip("10.66.0.15"), ip("10.66.0.254"))
        );
        assert_eq!(p.dns_servers, vec![ip("10.66.0.3")]);
    }

    #[test]
    fn wide_subnet() {
        let p = resolve(PlanSettings {
            subnet: Some(net("10.0.0.0/8")),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(p.guest_ip, ip("10.0.0.15"));
        assert_eq!(p.pool_end, ip("10.255.255.254"));
    }

    #[test]
    fn small_subnets() {
        let p = resolve(PlanSettings {
            subnet: Some(net("10.1.2.8/29")),
            ..Default::default()
        })
        .unwrap();
        assert_eq!((p.host_ip, p.dns_ip), (ip("10.1.2.10"), ip("10.1.2.11")));
        assert_eq!(p.guest_ip, ip("10.1.2.12"));
        assert_eq!(
            (p.pool_start, p.pool_end),
            (ip("10.1.2.12"), ip("10.1.2.14"))
        );

        // /28: +15 is the broadcast address, so the guest follows dns.
        let p = resolve(PlanSettings {
            subnet: Some(net("10.1.2.16/28")),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(p.guest_ip, ip("10.1.2.20"));
        assert_eq!(
            (p.pool_start, p.pool_end),
            (ip("10.1.2.20"), ip("10.1.2.30"))
        );

        // /30 is too small for the default layout, but fine with explicit addresses.
        assert_eq!(
            err(PlanSettings {
                subnet: Some(net("10.1.2.0/30")),
                ..Default::default()
            }),
            "subnet 10.1.2.0/30 has no room for a guest"
        );
        let p = resolve(PlanSettings {
            subnet: Some(net("10.1.2.0/30")),
            host_ip: Some(ip("10.1.2.1")),
            dns_ip: Some(ip("10.1.2.1")),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(p.guest_ip, ip("10.1.2.2"));
        assert_eq!((p.pool_start, p.pool_end), (ip("10.1.2.2"), ip("10.1.2.2")));
        // /30 whose both usable addresses are taken.
        assert_eq!(
            err(PlanSettings {
                subnet: Some(net("10.1.2.0/30")),
                host_ip: Some(ip("10.1.2.1")),
                dns_ip: Some(ip("10.1.2.2")),
                ..Default::default()
            }),
            "subnet 10.1.2.0/30 has no room for a guest"
        );
    }

    #[test]
    fn guest_moves_off_a_taken_plus_15() {
        let p = resolve(PlanSettings {
            host_ip: Some(ip("192.168.5.15")),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(p.guest_ip, ip("192.168.5.16"));
    }

    #[test]
    fn dhcp_start_moves_the_default_guest() {
        let p = resolve(PlanSettings {
            dhcp_start: Some(ip("192.168.5.100")),
            dhcp_end: Some(ip("192.168.5.200")),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(p.guest_ip, ip("192.168.5.100"));
        assert_eq!(
            (p.pool_start, p.pool_end),
            (ip("192.168.5.100"), ip("192.168.5.200"))
        );
        // A pool that contains host and dns is fine; they are reserved.
        let p = resolve(PlanSettings {
            dhcp_start: Some(ip("192.168.5.1")),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(p.guest_ip, ip("192.168.5.1"));
        assert!(!p.in_pool(ip("192.168.5.2")));
        assert!(p.in_pool(ip("192.168.5.4")));
    }

    #[test]
    fn merge_later_wins() {
        let file = PlanSettings {
            subnet: Some(net("10.66.0.0/24")),
            mtu: Some(9000),
            search: Some(vec!["a.example".into()]),
            ..Default::default()
        };
        let flags = PlanSettings {
            mtu: Some(1400),
            dns_ip: Some(ip("10.66.0.53")),
            ..Default::default()
        };
        let merged = PlanSettings::default().merge(file).merge(flags);
        assert_eq!(merged.subnet, Some(net("10.66.0.0/24")));
        assert_eq!(merged.mtu, Some(1400));
        assert_eq!(merged.dns_ip, Some(ip("10.66.0.53")));
        assert_eq!(merged.search, Some(vec!["a.example".to_string()]));
        let p = Plan::resolve(merged, &["host.example".into()]).unwrap();
        assert_eq!(p.mtu, 1400);
        assert_eq!(p.host_ip, ip("10.66.0.2"));
        assert_eq!(p.dns_servers, vec![ip("10.66.0.53")]);
        assert_eq!(p.search, vec!["a.example".to_string()]);
    }

    #[test]
    fn subnet_errors() {
        assert_eq!(
            err(PlanSettings {
                subnet: Some(net("192.168.5.0/31")),
                ..Default::default()
            }),
            "subnet 192.168.5.0/31 has no room for a guest"
        );
        assert_eq!(
            err(PlanSettings {
                subnet: Some(net("192.168.5.1/32")),
                ..Default::default()
            }),
            "subnet 192.168.5.1/32 has no room for a guest"
        );
        let e = resolve(PlanSettings {
            subnet: Some(net("192.168.5.7/24")),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.field(), "subnet");
        assert_eq!(
            e.to_string(),
            "subnet 192.168.5.7/24 is not a network address (did you mean 192.168.5.0/24?)"
        );
    }

    #[test]
    fn address_errors() {
        let e = resolve(PlanSettings {
            dns_ip: Some(ip("10.0.0.3")),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.field(), "dns-ip");
        assert_eq!(e.to_string(), "dns-ip 10.0.0.3 is outside 192.168.5.0/24");
        let cases: Vec<(PlanSettings, &str)> = vec![
            (
                PlanSettings {
                    host_ip: Some(ip("10.0.0.2")),
                    ..Default::default()
                },
                "host-ip 10.0.0.2 is outside 192.168.5.0/24",
            ),
            (
                PlanSettings {
                    host_ip: Some(ip("192.168.5.0")),
                    ..Default::default()
                },
                "host-ip 192.168.5.0 is the network address of 192.168.5.0/24",
            ),
            (
                PlanSettings {
                    dns_ip: Some(ip("192.168.5.255")),
                    ..Default::default()
                },
                "dns-ip 192.168.5.255 is the broadcast address of 192.168.5.0/24",
            ),
            (
                PlanSettings {
                    guest_ip: Some(ip("10.0.0.15")),
                    ..Default::default()
                },
                "guest-ip 10.0.0.15 is outside 192.168.5.0/24",
            ),
            (
                PlanSettings {
                    guest_ip: Some(ip("192.168.5.2")),
                    ..Default::default()
                },
                "guest-ip 192.168.5.2 is the same as host-ip",
            ),
            (
                PlanSettings {
                    guest_ip: Some(ip("192.168.5.3")),
                    ..Default::default()
                },
                "guest-ip 192.168.5.3 is the same as dns-ip",
            ),
            (
                PlanSettings {
                    dhcp_start: Some(ip("10.0.0.1")),
                    ..Default::default()
                },
                "dhcp-start 10.0.0.1 is outside 192.168.5.0/24",
            ),
            (
                PlanSettings {
                    dhcp_end: Some(ip("192.168.6.1")),
                    ..Default::default()
                },
                "dhcp-end 192.168.6.1 is outside 192.168.5.0/24",
            ),
            (
                PlanSettings {
                    dhcp_start: Some(ip("192.168.5.200")),
                    dhcp_end: Some(ip("192.168.5.100")),
                    ..Default::default()
                },
                "dhcp-start 192.168.5.200 is after dhcp-end 192.168.5.100",
            ),
            (
                PlanSettings {
                    dhcp_end: Some(ip("192.168.5.10")),
                    ..Default::default()
                },
                "dhcp-end 192.168.5.10 is before guest-ip 192.168.5.15",
            ),
            (
                PlanSettings {
                    guest_ip: Some(ip("192.168.5.10")),
                    dhcp_start: Some(ip("192.168.5.100")),
                    ..Default::default()
                },
                "guest-ip 192.168.5.10 is outside the DHCP pool 192.168.5.100-192.168.5.254",
            ),
            (
                PlanSettings {
                    leases: Some(vec!["10.0.0.9=52:55:55:00:00:01".parse().unwrap()]),
                    ..Default::default()
                },
                "leases 10.0.0.9 is outside 192.168.5.0/24",
            ),
            (
                PlanSettings {
                    leases: Some(vec!["192.168.5.2=52:55:55:00:00:01".parse().unwrap()]),
                    ..Default::default()
                },
                "leases 192.168.5.2=52:55:55:00:00:01: 192.168.5.2 is the host-ip",
            ),
            (
                PlanSettings {
                    leases: Some(vec![
                        "192.168.5.20=52:55:55:00:00:01".parse().unwrap(),
                        "192.168.5.20=52:55:55:00:00:02".parse().unwrap(),
                    ]),
                    ..Default::default()
                },
                "leases 192.168.5.20=52:55:55:00:00:02: 192.168.5.20 is already leased to 52:55:55:00:00:01",
            ),
            (
                PlanSettings {
                    leases: Some(vec![
                        "192.168.5.20=52:55:55:00:00:01".parse().unwrap(),
                        "192.168.5.21=52:55:55:00:00:01".parse().unwrap(),
                    ]),
                    ..Default::default()
                },
                "leases 192.168.5.21=52:55:55:00:00:01: 52:55:55:00:00:01 already has the lease 192.168.5.20",
            ),
            (
                PlanSettings {
                    dns: Some(vec![ip("0.0.0.0")]),
                    ..Default::default()
                },
                "dns 0.0.0.0 is not a usable DNS server address",
            ),
            (
                PlanSettings {
                    search: Some(vec!["bad domain".into()]),
                    ..Default::default()
                },
                "search \"bad domain\" is not a domain name",
            ),
        ];
        for (settings, want) in cases {
            let got = err(settings);
            assert_eq!(got, want);
            assert!(!got.contains('\n'));
        }
    }

    #[test]
    fn scalar_errors() {
        assert_eq!(
            err(PlanSettings {
                mtu: Some(70000),
                ..Default::default()
            }),
            "mtu 70000 is out of range 576..65520"
        );
        assert_eq!(
            err(PlanSettings {
                mtu: Some(575),
                ..Default::default()
            }),
            "mtu 575 is out of range 576..65520"
        );
        for mtu in [576, 65520] {
            let p = resolve(PlanSettings {
                mtu: Some(mtu),
                ..Default::default()
            })
            .unwrap();
            assert_eq!(u32::from(p.mtu), mtu);
        }
        let mac = |s: &str| PlanSettings {
            gateway_mac: Some(s.parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(
            err(mac("01:00:5e:00:00:01")),
            "gateway-mac 01:00:5e:00:00:01 is a multicast address"
        );
        assert_eq!(
            err(mac("FF:FF:FF:FF:FF:FF")),
            "gateway-mac ff:ff:ff:ff:ff:ff is the broadcast address"
        );
        assert!(err(mac("00:11:22:33:44:55"))
            .starts_with("gateway-mac 00:11:22:33:44:55 is not locally administered"));
        assert_eq!(
            resolve(mac("52:55:55:00:00:01")).unwrap().gateway_mac[0],
            0x52
        );
        assert_eq!(
            err(PlanSettings {
                lease_time: Some(59),
                ..Default::default()
            }),
            "lease-time 59 is under the minimum of 60 seconds"
        );
        assert_eq!(
            resolve(PlanSettings {
                lease_time: Some(60),
                ..Default::default()
            })
            .unwrap()
            .lease_time,
            Duration::from_secs(60)
        );
    }

    #[test]
    fn leases() {
        let p = resolve(PlanSettings {
            leases: Some(vec![
                "192.168.5.1=52:55:55:b3:bc:d9".parse().unwrap(),
                " 192.168.5.20 = 5A:94:EF:E4:0C:DF".parse().unwrap(),
                "192.168.5.20=5a:94:ef:e4:0c:df".parse().unwrap(),
            ]),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            p.static_leases,
            vec![
                (ip("192.168.5.1"), [0x52, 0x55, 0x55, 0xb3, 0xbc, 0xd9]),
                (ip("192.168.5.20"), [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xdf]),
            ]
        );
        assert!("192.168.5.1".parse::<StaticLease>().is_err());
        assert!("x=52:55:55:b3:bc:d9".parse::<StaticLease>().is_err());
        assert!("192.168.5.1=52:55".parse::<StaticLease>().is_err());
        let l: StaticLease = "192.168.5.1=52-55-55-B3-BC-D9".parse().unwrap();
        assert_eq!(l.to_string(), "192.168.5.1=52:55:55:b3:bc:d9");
    }

    #[test]
    fn mac_parse_and_format() {
        assert_eq!(parse_mac("5a:94:ef:e4:0c:dd").unwrap(), DEFAULT_GATEWAY_MAC);
        assert_eq!(parse_mac("5A-94-EF-E4-0C-DD").unwrap(), DEFAULT_GATEWAY_MAC);
        assert_eq!(format_mac(DEFAULT_GATEWAY_MAC), "5a:94:ef:e4:0c:dd");
        for bad in [
            "",
            "5a:94:ef:e4:0c",
            "5a:94:ef:e4:0c:dd:00",
            "5a:94:ef:e4:0c:d",
            "5a:94:ef:e4:0c:zz",
            "5a:94-ef:e4:0c:dd",
            "+a:94:ef:e4:0c:dd",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_mac("zz").unwrap_err().to_string(),
            "invalid MAC address \"zz\" (expected six hex octets like 52:55:55:12:34:56)"
        );
    }

    #[test]
    fn to_settings_round_trips() {
        let p = resolve(PlanSettings {
            subnet: Some(net("10.1.2.16/28")),
            leases: Some(vec!["10.1.2.17=52:55:55:00:00:01".parse().unwrap()]),
            search: Some(vec!["x.example".into()]),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(resolve(p.to_settings()).unwrap(), p);
    }

    #[test]
    fn settings_yaml_keys() {
        let yaml = "subnet: 10.66.0.0/24\nhost-ip: 10.66.0.2\ndns-ip: 10.66.0.3\nguest-ip: 10.66.0.20\n\
                    dhcp-start: 10.66.0.20\ndhcp-end: 10.66.0.100\nmtu: 1400\ngateway-mac: 5a:94:ef:e4:0c:dd\n\
                    lease-time: 600\nsearch: [a.example, b.example]\ndns: [1.1.1.1]\n\
                    leases:\n  - 10.66.0.21=52:55:55:00:00:01\n";
        let s: PlanSettings = serde_norway::from_str(yaml).unwrap();
        let p = resolve(s.clone()).unwrap();
        assert_eq!(p.guest_ip, ip("10.66.0.20"));
        assert_eq!(p.pool_end, ip("10.66.0.100"));
        assert_eq!(p.mtu, 1400);
        assert_eq!(p.lease_time, Duration::from_secs(600));
        assert_eq!(p.dns_servers, vec![ip("1.1.1.1")]);
        assert_eq!(p.static_leases.len(), 1);
        // Serialising and reading back gives the same settings.
        let back: PlanSettings =
            serde_norway::from_str(&serde_norway::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        // All-digit MACs stay strings (no YAML 1.1 sexagesimal integers).
        let s: PlanSettings = serde_norway::from_str("gateway-mac: 52:55:55:12:34:56\n").unwrap();
        assert_eq!(
            s.gateway_mac,
            Some(Mac([0x52, 0x55, 0x55, 0x12, 0x34, 0x56]))
        );
        let e = serde_norway::from_str::<PlanSettings>("subnett: 10.0.0.0/24\n").unwrap_err();
        assert!(e.to_string().contains("subnett"), "{e}");
    }
}
