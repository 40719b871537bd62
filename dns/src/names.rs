//! Static names: exact names that answer a fixed address or an alias, changeable at run time.
//!
//! Only the exact names listed are overridden; a name below or beside them (`other.internal`
//! next to `host.lima.internal`) is not, unlike Lima's `internal.` zone which shadowed them all.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::RwLock;

use hickory_proto::rr::Name;

use crate::{DnsError, StaticTarget};

/// What a static name answers, ready to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    Ip(IpAddr),
    Alias(Name),
}

/// The lookup key of a name: its ASCII (punycode) form, lowercase, without the final dot.
pub(crate) fn key_of(name: &Name) -> String {
    let mut s = name.to_ascii().to_ascii_lowercase();
    while s.ends_with('.') {
        s.pop();
    }
    s
}

/// Parses a configured name (UTF-8 allowed, final dot optional) into its key.
pub(crate) fn parse_key(name: &str) -> Result<String, DnsError> {
    let bad = |reason: String| DnsError::InvalidName {
        name: name.to_string(),
        reason,
    };
    let trimmed = name.trim();
    if trimmed.is_empty() || trimmed == "." {
        return Err(bad("empty name".to_string()));
    }
    let parsed = Name::from_utf8(trimmed).map_err(|e| bad(e.to_string()))?;
    Ok(key_of(&parsed))
}

/// Parses an alias target into an absolute name.
pub(crate) fn parse_alias(name: &str) -> Result<Name, DnsError> {
    let key = parse_key(name)?;
    let mut n = Name::from_ascii(&key).map_err(|e| DnsError::InvalidName {
        name: name.to_string(),
        reason: e.to_string(),
    })?;
    n.set_fqdn(true);
    Ok(n)
}

/// Records added per zone (for gvproxy's `/services/dns/all`): zone -> relative name -> ips.
type Zones = BTreeMap<String, BTreeMap<String, Vec<IpAddr>>>;

#[derive(Default)]
pub(crate) struct Names {
    map: RwLock<BTreeMap<String, Vec<Target>>>,
    zones: RwLock<Zones>,
}

impl Names {
    /// The table from the configuration: `host.lima.internal` unless the configuration names
    /// it, then every configured entry (a name given twice keeps both targets).
    pub fn from_config(
        host_ip: std::net::Ipv4Addr,
        entries: &[(String, StaticTarget)],
    ) -> Result<Names, DnsError> {
        let mut map: BTreeMap<String, Vec<Target>> = BTreeMap::new();
        for (name, target) in entries {
            let key = parse_key(name)?;
            let t = match target {
                StaticTarget::Ip(ip) => Target::Ip(*ip),
                StaticTarget::Alias(a) => Target::Alias(parse_alias(a)?),
            };
            let v = map.entry(key).or_default();
            if !v.contains(&t) {
                v.push(t);
            }
        }
        map.entry("host.lima.internal".to_string())
            .or_insert_with(|| vec![Target::Ip(IpAddr::V4(host_ip))]);
        Ok(Names {
            map: RwLock::new(map),
            zones: RwLock::default(),
        })
    }

    /// The targets of exactly this name, if it is a static name.
    pub fn lookup(&self, key: &str) -> Option<Vec<Target>> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    /// gvproxy's zone add: `name.zone -> ip` for each record; a name's addresses are replaced
    /// by the ones this call gives it.
    pub fn add_zone_records(&self, zone: &str, records: &[(String, IpAddr)]) {
        let zone = zone.trim().trim_end_matches('.');
        let mut fresh: BTreeMap<String, Vec<Target>> = BTreeMap::new();
        let mut relative: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
        for (name, ip) in records {
            let name = name.trim().trim_end_matches('.');
            let full = match (name, zone) {
                ("" | "@", "") => continue,
                ("" | "@", z) => z.to_string(),
                (n, "") => n.to_string(),
                (n, z) => format!("{n}.{z}"),
            };
            match parse_key(&full) {
                Ok(key) => {
                    let v = fresh.entry(key).or_default();
                    let t = Target::Ip(*ip);
                    if !v.contains(&t) {
                        v.push(t);
                    }
                    let r = relative.entry(name.to_string()).or_default();
                    if !r.contains(ip) {
                        r.push(*ip);
                    }
                }
                Err(e) => tracing::warn!("dns: not adding a static name: {e}"),
            }
        }
        if fresh.is_empty() {
            return;
        }
        {
            let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
            for (key, targets) in fresh {
                tracing::info!(name = %key, ?targets, "dns: static name added");
                map.insert(key, targets);
            }
        }
        let zone_key = zone.to_ascii_lowercase();
        let mut zones = self.zones.write().unwrap_or_else(|e| e.into_inner());
        let z = zones.entry(zone_key).or_default();
        for (name, ips) in relative {
            z.insert(name, ips);
        }
    }

    /// The records added with `add_zone_records`, per zone (`"internal."`; `"."` for absolute
    /// names), as the relative names given, sorted.
    pub fn zones(&self) -> Vec<(String, Vec<(String, IpAddr)>)> {
        let zones = self.zones.read().unwrap_or_else(|e| e.into_inner());
        zones
            .iter()
            .map(|(zone, names)| {
                let records = names
                    .iter()
                    .flat_map(|(n, ips)| ips.iter().map(move |ip| (n.clone(), *ip)))
                    .collect();
                let z = if zone.is_empty() {
                    ".".to_string()
                } else {
                    format!("{zone}.")
                };
                (z, records)
            })
            .collect()
    }

    /// Every name that answers an address, sorted by name.
    pub fn addresses(&self) -> Vec<(String, IpAddr)> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .flat_map(|(k, v)| {
                v.iter().filter_map(move |t| match t {
                    Target::Ip(ip) => Some((k.clone(), *ip)),
                    Target::Alias(_) => None,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_ignore_case_and_final_dot() {
        assert_eq!(
            parse_key("Host.Lima.Internal.").unwrap(),
            "host.lima.internal"
        );
        let n = Name::from_ascii("HOST.lima.internal.").unwrap();
        assert_eq!(key_of(&n), "host.lima.internal");
        assert!(parse_key("").is_err());
        assert!(parse_key("a..b").is_err());
    }

    #[test]
    fn default_host_name_and_override() {
        let n = Names::from_config("192.168.5.2".parse().unwrap(), &[]).unwrap();
        assert_eq!(
            n.lookup("host.lima.internal"),
            Some(vec![Target::Ip("192.168.5.2".parse().unwrap())])
        );
        let n = Names::from_config(
            "192.168.5.2".parse().unwrap(),
            &[(
                "host.lima.internal".into(),
                StaticTarget::Ip("10.0.0.1".parse().unwrap()),
            )],
        )
        .unwrap();
        assert_eq!(
            n.lookup("host.lima.internal"),
            Some(vec![Target::Ip("10.0.0.1".parse().unwrap())])
        );
        assert_eq!(n.lookup("other.internal"), None);
    }

    #[test]
    fn zone_records_exact_and_replacing() {
        let n = Names::default();
        n.add_zone_records(
            "internal.",
            &[
                ("host.lima".into(), "192.168.104.2".parse().unwrap()),
                ("lima-vm".into(), "192.168.104.3".parse().unwrap()),
                ("lima-vm".into(), "fd00::3".parse().unwrap()),
            ],
        );
        assert_eq!(n.lookup("lima-vm.internal").unwrap().len(), 2);
        n.add_zone_records(
            "internal",
            &[("lima-vm".into(), "192.168.104.9".parse().unwrap())],
        );
        assert_eq!(
            n.lookup("lima-vm.internal"),
            Some(vec![Target::Ip("192.168.104.9".parse().unwrap())])
        );
        assert_eq!(n.lookup("internal"), None);
        assert_eq!(n.lookup("x.internal"), None);
        n.add_zone_records("example.", &[("@".into(), "10.1.1.1".parse().unwrap())]);
        assert!(n.lookup("example").is_some());
        assert_eq!(
            n.zones(),
            vec![
                (
                    "example.".to_string(),
                    vec![("@".to_string(), "10.1.1.1".parse().unwrap())]
                ),
                (
                    "internal.".to_string(),
                    vec![
                        ("host.lima".to_string(), "192.168.104.2".parse().unwrap()),
                        ("lima-vm".to_string(), "192.168.104.9".parse().unwrap()),
                    ]
                ),
            ]
        );
        assert_eq!(
            n.addresses(),
            vec![
                ("example".to_string(), "10.1.1.1".parse().unwrap()),
                (
                    "host.lima.internal".to_string(),
                    "192.168.104.2".parse().unwrap()
                ),
                (
                    "lima-vm.internal".to_string(),
                    "192.168.104.9".parse().unwrap()
                ),
            ]
        );
    }

    #[test]
    fn static_target_parse() {
        assert_eq!(
            StaticTarget::parse("10.0.0.1"),
            StaticTarget::Ip("10.0.0.1".parse().unwrap())
        );
        assert_eq!(
            StaticTarget::parse("fd00::1"),
            StaticTarget::Ip("fd00::1".parse().unwrap())
        );
        assert_eq!(
            StaticTarget::parse("example.com"),
            StaticTarget::Alias("example.com".into())
        );
    }
}
