//! YAML configuration sources for the network plan.
//!
//! [`load_file`] reads either usernet's own config file (`--config FILE`: a
//! mapping whose keys are the plan flag names, see [`ConfigFile`]) or a Lima
//! `networks.yaml` (recognised by its top-level `networks:` key), and turns it
//! into [`PlanSettings`] to be merged with the CLI flags and resolved by
//! [`Plan::resolve`](crate::plan::Plan::resolve). It also reads the host's
//! DNS search list from /etc/resolv.conf ([`host_search_domains`]).
//!
//! It does not validate the plan (that is `plan`'s job) nor merge sources.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::Deserialize;

use crate::plan::{Mac, PlanSettings, StaticLease, DNS_OFFSET, HOST_OFFSET};

/// The Lima network taken from a `networks.yaml` when none is named.
pub const DEFAULT_LIMA_NETWORK: &str = "user-v2";

/// The host resolver configuration read by [`host_search_domains`].
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// usernet's own config file. Same keys as [`PlanSettings`] (the CLI flag
/// names); unknown keys are rejected. Later sections (e.g. `hosts:`,
/// `forwards:`) are added here as fields of their own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConfigFile {
    pub subnet: Option<Ipv4Net>,
    pub host_ip: Option<Ipv4Addr>,
    pub dns_ip: Option<Ipv4Addr>,
    pub guest_ip: Option<Ipv4Addr>,
    pub dhcp_start: Option<Ipv4Addr>,
    pub dhcp_end: Option<Ipv4Addr>,
    pub mtu: Option<u32>,
    pub gateway_mac: Option<Mac>,
    /// Seconds.
    pub lease_time: Option<u64>,
    pub search: Option<Vec<String>>,
    pub dns: Option<Vec<Ipv4Addr>>,
    /// `IP=MAC` strings.
    pub leases: Option<Vec<StaticLease>>,
    /// Static DNS names (Lima `hostResolver.hosts`): name -> IP, or name -> another name.
    pub hosts: Option<std::collections::BTreeMap<String, String>>,
    /// Port forwards, each as `-p` takes it (`2222:22`, `0.0.0.0:8080:80/tcp`).
    pub publish: Option<Vec<String>>,
}

/// The sections of usernet's own config file that are not the plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extras {
    /// `hosts:` as `NAME=VALUE` entries, in name order.
    pub dns_hosts: Vec<String>,
    /// `publish:` entries.
    pub publish: Vec<String>,
}

/// The non-plan sections of `path` (a Lima networks.yaml has none).
pub fn load_extras(path: &Path) -> Result<Extras, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let yaml_err = |e: serde_norway::Error| ConfigError::Yaml {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let value: serde_norway::Value = serde_norway::from_str(&text).map_err(yaml_err)?;
    if value.get("networks").is_some() || value.is_null() {
        return Ok(Extras::default());
    }
    let file: ConfigFile = serde_norway::from_value(value).map_err(yaml_err)?;
    Ok(Extras {
        dns_hosts: file
            .hosts
            .unwrap_or_default()
            .into_iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect(),
        publish: file.publish.unwrap_or_default(),
    })
}

impl ConfigFile {
    /// The plan part of the file.
    pub fn plan_settings(&self) -> PlanSettings {
        let c = self.clone();
        PlanSettings {
            subnet: c.subnet,
            host_ip: c.host_ip,
            dns_ip: c.dns_ip,
            guest_ip: c.guest_ip,
            dhcp_start: c.dhcp_start,
            dhcp_end: c.dhcp_end,
            mtu: c.mtu,
            gateway_mac: c.gateway_mac,
            lease_time: c.lease_time,
            search: c.search,
            dns: c.dns,
            leases: c.leases,
        }
    }
}

/// A config file that cannot be used. `Display` is one line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Bad YAML, a wrong type, or an unknown key (the message names it).
    #[error("{}: {message}", path.display())]
    Yaml { path: PathBuf, message: String },
    #[error("network {name:?} not found in {} (have: {have})", path.display())]
    NetworkNotFound {
        path: PathBuf,
        name: String,
        have: String,
    },
    #[error("network {name:?} in {} is a bridged network: bridged networks need socket_vmnet, not usernet", path.display())]
    Bridged { path: PathBuf, name: String },
    #[error("network {name:?} in {}: {message}", path.display())]
    LimaNetwork {
        path: PathBuf,
        name: String,
        message: String,
    },
    #[error("network {name:?} was asked for, but {} is not a Lima networks.yaml (it has no top-level `networks:` key)", path.display())]
    NotLima { path: PathBuf, name: String },
}

/// Reads `path` as usernet's own config file or as a Lima `networks.yaml`.
///
/// `network` names the Lima network to use (default `user-v2`); pass `None`
/// unless the user asked for one: naming a network for a file that is not a
/// Lima `networks.yaml` is an error.
pub fn load_file(path: &Path, network: Option<&str>) -> Result<PlanSettings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    load_str(&text, path, network)
}

/// [`load_file`] on text already read; `path` is only used in messages.
pub fn load_str(
    text: &str,
    path: &Path,
    network: Option<&str>,
) -> Result<PlanSettings, ConfigError> {
    let yaml_err = |e: serde_norway::Error| ConfigError::Yaml {
        path: path.to_path_buf(),
        message: one_line(&e.to_string()),
    };
    let value: serde_norway::Value = serde_norway::from_str(text).map_err(yaml_err)?;
    if let Some(networks) = value.get("networks") {
        return lima_settings(networks, path, network.unwrap_or(DEFAULT_LIMA_NETWORK));
    }
    if let Some(name) = network {
        return Err(ConfigError::NotLima {
            path: path.to_path_buf(),
            name: name.to_string(),
        });
    }
    if value.is_null() {
        return Ok(PlanSettings::default()); // empty file, or only comments
    }
    // Parse the text again (not the Value) so errors carry line numbers.
    let file: ConfigFile = serde_norway::from_str(text).map_err(yaml_err)?;
    Ok(file.plan_settings())
}

/// One entry of Lima's `networks:` mapping (unknown keys ignored, as Lima
/// adds some over time).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LimaNetwork {
    mode: Option<String>,
    gateway: Option<String>,
    netmask: Option<String>,
    dhcp_end: Option<String>,
}

fn lima_settings(
    networks: &serde_norway::Value,
    path: &Path,
    name: &str,
) -> Result<PlanSettings, ConfigError> {
    let bad = |message: String| ConfigError::LimaNetwork {
        path: path.to_path_buf(),
        name: name.to_string(),
        message,
    };
    let empty = serde_norway::Mapping::new();
    let map = match networks {
        serde_norway::Value::Mapping(m) => m,
        serde_norway::Value::Null => &empty,
        _ => {
            return Err(ConfigError::Yaml {
                path: path.to_path_buf(),
                message: "`networks` is not a mapping".to_string(),
            })
        }
    };
    let Some(entry) = map.get(name) else {
        let mut have = String::new();
        for key in map.keys() {
            if !have.is_empty() {
                have.push_str(", ");
            }
            match key.as_str() {
                Some(k) => have.push_str(k),
                None => {
                    let _ = write!(have, "{key:?}");
                }
            }
        }
        if have.is_empty() {
            have.push_str("none");
        }
        return Err(ConfigError::NetworkNotFound {
            path: path.to_path_buf(),
            name: name.to_string(),
            have,
        });
    };
    let net: LimaNetwork =
        serde_norway::from_value(entry.clone()).map_err(|e| bad(one_line(&e.to_string())))?;
    let mode = net
        .mode
        .as_deref()
        .ok_or_else(|| bad("no `mode`".to_string()))?;
    let addr = |key: &str, value: &Option<String>| -> Result<Option<Ipv4Addr>, ConfigError> {
        value
            .as_deref()
            .map(|v| {
                v.trim()
                    .parse::<Ipv4Addr>()
                    .map_err(|_| bad(format!("{key} {v:?} is not an IPv4 address")))
            })
            .transpose()
    };
    let subnet = || -> Result<(Ipv4Net, Ipv4Addr), ConfigError> {
        let gateway =
            addr("gateway", &net.gateway)?.ok_or_else(|| bad("no `gateway`".to_string()))?;
        let netmask =
            addr("netmask", &net.netmask)?.ok_or_else(|| bad("no `netmask`".to_string()))?;
        let subnet = Ipv4Net::with_netmask(gateway, netmask)
            .map_err(|_| bad(format!("netmask {netmask} is not a contiguous netmask")))?
            .trunc();
        Ok((subnet, gateway))
    };
    match mode {
        "user-v2" => {
            // As Lima does: the gateway written in the file only gives the subnet.
            let (subnet, _) = subnet()?;
            let at = |n: u32| {
                u32::from(subnet.network())
                    .checked_add(n)
                    .map(Ipv4Addr::from)
            };
            Ok(PlanSettings {
                subnet: Some(subnet),
                host_ip: at(HOST_OFFSET),
                dns_ip: at(DNS_OFFSET),
                ..Default::default()
            })
        }
        "shared" | "host" => {
            let (subnet, gateway) = subnet()?;
            Ok(PlanSettings {
                subnet: Some(subnet),
                host_ip: Some(gateway),
                dns_ip: Some(gateway),
                dhcp_end: addr("dhcpEnd", &net.dhcp_end)?,
                ..Default::default()
            })
        }
        "bridged" => Err(ConfigError::Bridged {
            path: path.to_path_buf(),
            name: name.to_string(),
        }),
        other => Err(bad(format!(
            "unknown mode {other:?} (expected user-v2, shared, host or bridged)"
        ))),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The search list of a resolv.conf text: the last `search` or `domain`
/// line wins, as in resolv.conf(5). A lone `.` is dropped.
pub fn resolv_conf_search(text: &str) -> Vec<String> {
    let mut search = Vec::new();
    for line in text.lines() {
        let line = line.trim_start();
        if line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let mut words = line.split_whitespace();
        match words.next() {
            Some("search") => {
                search = words
                    .take_while(|w| !w.starts_with('#') && !w.starts_with(';'))
                    .filter(|w| *w != ".")
                    .map(str::to_string)
                    .collect();
            }
            Some("domain") => {
                search = words
                    .next()
                    .filter(|w| *w != "." && !w.starts_with('#') && !w.starts_with(';'))
                    .map(|w| vec![w.to_string()])
                    .unwrap_or_default();
            }
            _ => {}
        }
    }
    search
}

/// The search list of the resolv.conf at `path`; empty when it cannot be read.
pub fn read_search_domains(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|t| resolv_conf_search(&t))
        .unwrap_or_default()
}

/// The host's search list (from /etc/resolv.conf), the default for the
/// plan's `search`: pass it to `Plan::resolve`.
pub fn host_search_domains() -> Vec<String> {
    read_search_domains(Path::new(RESOLV_CONF))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Plan;

    const LIMA: &str = "\
paths:
  socketVMNet: /opt/socket_vmnet/bin/socket_vmnet
  varRun: /private/var/run/lima
group: everyone
networks:
  user-v2:
    mode: user-v2
    gateway: 192.168.104.1
    netmask: 255.255.255.0
  shared:
    mode: shared
    gateway: 192.168.105.1
    dhcpEnd: 192.168.105.254
    netmask: 255.255.255.0
  host:
    mode: host
    gateway: 192.168.106.1
    dhcpEnd: 192.168.106.254
    netmask: 255.255.255.0
  bridged:
    mode: bridged
    interface: en0
";

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn lima(network: Option<&str>) -> Result<Plan, String> {
        let s = load_str(LIMA, Path::new("networks.yaml"), network).map_err(|e| e.to_string())?;
        Plan::resolve(s, &[]).map_err(|e| e.to_string())
    }

    #[test]
    fn lima_user_v2_default() {
        let p = lima(None).unwrap();
        assert_eq!(p.subnet, "192.168.104.0/24".parse::<Ipv4Net>().unwrap());
        assert_eq!(p.host_ip, ip("192.168.104.2"));
        assert_eq!(p.dns_ip, ip("192.168.104.3"));
        assert_eq!(p.guest_ip, ip("192.168.104.15"));
        assert_eq!(
            (p.pool_start, p.pool_end),
            (ip("192.168.104.15"), ip("192.168.104.254"))
        );
        assert_eq!(lima(Some("user-v2")).unwrap(), p);
    }

    #[test]
    fn lima_fixture_file() {
        let s = load_file(&fixture("lima-networks.yaml"), None).unwrap();
        let p = Plan::resolve(s, &[]).unwrap();
        assert_eq!(p.host_ip, ip("192.168.104.2"));
        assert_eq!(p.dns_ip, ip("192.168.104.3"));
    }

    #[test]
    fn lima_shared_and_host() {
        let p = lima(Some("shared")).unwrap();
        assert_eq!(p.subnet, "192.168.105.0/24".parse::<Ipv4Net>().unwrap());
        assert_eq!(p.host_ip, ip("192.168.105.1"));
        assert_eq!(p.dns_ip, ip("192.168.105.1"));
        assert_eq!(p.pool_end, ip("192.168.105.254"));
        let p = lima(Some("host")).unwrap();
        assert_eq!(p.host_ip, ip("192.168.106.1"));
    }

    #[test]
    fn lima_errors() {
        assert_eq!(
            lima(Some("foo")).unwrap_err(),
            "network \"foo\" not found in networks.yaml (have: user-v2, shared, host, bridged)"
        );
        assert_eq!(
            lima(Some("bridged")).unwrap_err(),
            "network \"bridged\" in networks.yaml is a bridged network: bridged networks need socket_vmnet, not usernet"
        );
        let bad_mask = "networks:\n  user-v2:\n    mode: user-v2\n    gateway: 10.0.0.1\n    netmask: 255.0.255.0\n";
        assert_eq!(
            load_str(bad_mask, Path::new("n.yaml"), None)
                .unwrap_err()
                .to_string(),
            "network \"user-v2\" in n.yaml: netmask 255.0.255.0 is not a contiguous netmask"
        );
        let bad_gw = "networks:\n  user-v2:\n    mode: user-v2\n    gateway: 10.0.0\n    netmask: 255.255.0.0\n";
        assert_eq!(
            load_str(bad_gw, Path::new("n.yaml"), None)
                .unwrap_err()
                .to_string(),
            "network \"user-v2\" in n.yaml: gateway \"10.0.0\" is not an IPv4 address"
        );
        let no_mode = "networks:\n  user-v2:\n    gateway: 10.0.0.1\n";
        assert_eq!(
            load_str(no_mode, Path::new("n.yaml"), None)
                .unwrap_err()
                .to_string(),
            "network \"user-v2\" in n.yaml: no `mode`"
        );
        assert_eq!(
            load_str("networks:\n", Path::new("n.yaml"), None)
                .unwrap_err()
                .to_string(),
            "network \"user-v2\" not found in n.yaml (have: none)"
        );
        // A /16 user-v2 network.
        let wide = "networks:\n  user-v2:\n    mode: user-v2\n    gateway: 10.5.0.1\n    netmask: 255.255.0.0\n";
        let p = Plan::resolve(load_str(wide, Path::new("n.yaml"), None).unwrap(), &[]).unwrap();
        assert_eq!(
            (p.host_ip, p.dns_ip, p.pool_end),
            (ip("10.5.0.2"), ip("10.5.0.3"), ip("10.5.255.254"))
        );
    }

    #[test]
    fn own_file() {
        let s = load_file(&fixture("usernet.yaml"), None).unwrap();
        assert_eq!(s.subnet, Some("10.66.0.0/24".parse().unwrap()));
        assert_eq!(s.mtu, Some(1400));
        assert_eq!(s.search, Some(vec!["corp.example".to_string()]));
        let p = Plan::resolve(s, &["ignored.example".into()]).unwrap();
        assert_eq!(p.host_ip, ip("10.66.0.2"));
        assert_eq!(p.guest_ip, ip("10.66.0.15"));
        assert_eq!(p.lease_time.as_secs(), 600);
        assert_eq!(
            p.static_leases,
            vec![(ip("10.66.0.20"), [0x52, 0x55, 0x55, 0x12, 0x34, 0x56])]
        );
    }

    #[test]
    fn precedence_defaults_file_flags() {
        let file = load_file(&fixture("usernet.yaml"), None).unwrap();
        let flags = PlanSettings {
            mtu: Some(9000),
            ..Default::default()
        };
        let p = Plan::resolve(PlanSettings::default().merge(file).merge(flags), &[]).unwrap();
        assert_eq!(p.mtu, 9000); // flag over file
        assert_eq!(p.subnet, "10.66.0.0/24".parse::<Ipv4Net>().unwrap()); // file over default
        assert_eq!(p.gateway_mac, crate::plan::DEFAULT_GATEWAY_MAC); // default
    }

    #[test]
    fn own_file_errors() {
        let e = load_str(
            "subnet: 10.0.0.0/24\nsubnett: 1\n",
            Path::new("my.yaml"),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("my.yaml: unknown field `subnett`"), "{e}");
        assert!(!e.contains('\n'));
        let e = load_str("mtu: big\n", Path::new("my.yaml"), None)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("my.yaml: mtu: invalid type"), "{e}");
        let e = load_str("gateway-mac: 01:02\n", Path::new("my.yaml"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid MAC address"), "{e}");
        let e = load_str("leases: [10.0.0.1]\n", Path::new("my.yaml"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a lease IP=MAC"), "{e}");
        assert_eq!(
            load_str("mtu: 1400\n", Path::new("my.yaml"), Some("user-v2")).unwrap_err().to_string(),
            "network \"user-v2\" was asked for, but my.yaml is not a Lima networks.yaml (it has no top-level `networks:` key)"
        );
        let e = load_file(Path::new("/nonexistent/usernet.yaml"), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cannot read /nonexistent/usernet.yaml: "),
            "{e}"
        );
        assert_eq!(
            load_str("# nothing\n", Path::new("my.yaml"), None).unwrap(),
            PlanSettings::default()
        );
        assert_eq!(
            load_str("", Path::new("my.yaml"), None).unwrap(),
            PlanSettings::default()
        );
    }

    #[test]
    fn resolv_conf() {
        assert_eq!(
            resolv_conf_search("nameserver 1.1.1.1\n"),
            Vec::<String>::new()
        );
        assert_eq!(
            resolv_conf_search("# c\nsearch a.example b.example\nnameserver 1.1.1.1\n"),
            vec!["a.example", "b.example"]
        );
        assert_eq!(
            resolv_conf_search("search a.example\ndomain d.example\n"),
            vec!["d.example"]
        );
        assert_eq!(
            resolv_conf_search("domain d.example\nsearch  a  b\n"),
            vec!["a", "b"]
        );
        assert_eq!(resolv_conf_search("search .\n"), Vec::<String>::new());
        assert_eq!(
            resolv_conf_search("; search x\n#search y\n"),
            Vec::<String>::new()
        );
        assert_eq!(
            resolv_conf_search("search\ta.example # trailing\n"),
            vec!["a.example"]
        );
        assert_eq!(
            read_search_domains(Path::new("/nonexistent/resolv.conf")),
            Vec::<String>::new()
        );
    }

    #[test]
    fn extras_hosts_and_publish() {
        let dir = tempfile::tempdir().unwrap();
        let own = dir.path().join("usernet.yaml");
        std::fs::write(
            &own,
            "subnet: 10.77.0.0/24\nhosts:\n  web.internal: db.internal\n  db.internal: 10.77.0.2\npublish:\n  - \"8080:80\"\n",
        )
        .unwrap();
        let e = load_extras(&own).unwrap();
        assert_eq!(
            e.dns_hosts,
            ["db.internal=10.77.0.2", "web.internal=db.internal"]
        );
        assert_eq!(e.publish, ["8080:80"]);
        assert_eq!(
            load_file(&own, None).unwrap().subnet,
            Some("10.77.0.0/24".parse().unwrap())
        );
        let lima = dir.path().join("networks.yaml");
        std::fs::write(&lima, "networks:\n  user-v2:\n    mode: user-v2\n    gateway: 192.168.104.1\n    netmask: 255.255.255.0\n").unwrap();
        assert_eq!(load_extras(&lima).unwrap(), Extras::default());
        std::fs::write(&own, "hosts: [1, 2]\n").unwrap();
        assert!(load_extras(&own).is_err());
    }
}
