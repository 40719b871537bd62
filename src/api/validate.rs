//! Request parsing and validation: every error is one line for the 400 body.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Map, Value};

use super::{Forward, LocalAddr, Protocol, Zone, ZoneRecord, DEFAULT_WAIT_TIMEOUT};

/// The longest unix socket path Linux takes (`sun_path` less the terminating NUL).
const MAX_UNIX_PATH: usize = 107;

/// Parse a forward's `local`: for tcp and udp `IP:PORT`, `[IPv6]:PORT` or `:PORT` (all IPv4
/// interfaces, as gvproxy's examples use it), port not 0; for unix an absolute path.
pub fn parse_local(protocol: Protocol, local: &str) -> Result<LocalAddr, String> {
    match protocol {
        Protocol::Unix => {
            if local.is_empty() {
                return Err("missing \"local\": the unix socket path".to_string());
            }
            if !local.starts_with('/') {
                return Err(format!(
                    "invalid local {local:?}: a unix socket path must be absolute"
                ));
            }
            if local.contains('\0') {
                return Err("invalid local: the path contains a NUL byte".to_string());
            }
            if local.len() > MAX_UNIX_PATH {
                return Err(format!(
                    "invalid local: unix socket path longer than {MAX_UNIX_PATH} bytes"
                ));
            }
            Ok(LocalAddr::Path(PathBuf::from(local)))
        }
        Protocol::Tcp | Protocol::Udp => {
            let bad = || format!("invalid local address {local:?}: expected IP:PORT");
            let addr = match local.strip_prefix(':') {
                Some(port) => SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::UNSPECIFIED,
                    port.parse().map_err(|_| bad())?,
                )),
                None => local.parse::<SocketAddr>().map_err(|_| bad())?,
            };
            if addr.port() == 0 {
                return Err(format!("invalid local address {local:?}: port 0"));
            }
            Ok(LocalAddr::Inet(addr))
        }
    }
}

/// Parse a forward's `remote`: `IP:PORT` with an IPv4 address or an empty one (the first
/// guest), port not 0. For unix gvproxy's `tcp://IP:PORT` is accepted too. Returns the IP, the
/// port and the normalised form (`IP:PORT` or `:PORT`).
pub fn parse_remote(
    protocol: Protocol,
    remote: &str,
) -> Result<(Option<Ipv4Addr>, u16, String), String> {
    let mut addr = remote;
    if protocol == Protocol::Unix {
        if let Some(rest) = addr.strip_prefix("tcp://") {
            addr = rest.strip_suffix('/').unwrap_or(rest);
        } else if let Some((scheme, _)) = addr.split_once("://") {
            return Err(format!(
                "remote scheme {scheme:?} is not supported: expected tcp://IP:PORT or IP:PORT"
            ));
        }
    }
    let bad = || format!("invalid remote address {remote:?}: expected IP:PORT or :PORT");
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 {
        return Err(format!("invalid remote address {remote:?}: port 0"));
    }
    if host.is_empty() {
        return Ok((None, port, format!(":{port}")));
    }
    let ip: Ipv4Addr = host.parse().map_err(|_| {
        format!("invalid remote address {remote:?}: the guest IP must be IPv4 or empty")
    })?;
    Ok((Some(ip), port, format!("{ip}:{port}")))
}

fn object(body: &[u8]) -> Result<Map<String, Value>, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err("empty request body: expected a JSON object".to_string());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err("request body must be a JSON object".to_string()),
        Err(e) => Err(format!("invalid JSON: {e}")),
    }
}

/// A key as Go's `encoding/json` finds it: the exact name, else any case-insensitive match.
fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).or_else(|| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    })
}

/// A string field; missing or null is empty (as Go leaves it).
fn string(obj: &Map<String, Value>, name: &str) -> Result<String, String> {
    match field(obj, name) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("{name:?} must be a string, not {}", kind(other))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn protocol(obj: &Map<String, Value>) -> Result<Protocol, String> {
    let p = string(obj, "protocol")?;
    if p.is_empty() {
        Ok(Protocol::Tcp)
    } else {
        p.parse()
    }
}

/// `{"local","remote","protocol"}` -> a validated [`Forward`].
pub(super) fn expose_request(body: &[u8]) -> Result<Forward, String> {
    let obj = object(body)?;
    let protocol = protocol(&obj)?;
    let local = string(&obj, "local")?;
    if local.is_empty() {
        return Err("missing \"local\"".to_string());
    }
    parse_local(protocol, &local)?;
    let remote = string(&obj, "remote")?;
    if remote.is_empty() {
        return Err("missing \"remote\"".to_string());
    }
    let (_, _, remote) = parse_remote(protocol, &remote)?;
    Ok(Forward {
        local,
        remote,
        protocol,
    })
}

/// `{"local","protocol"}` -> the local as given and the protocol.
pub(super) fn unexpose_request(body: &[u8]) -> Result<(String, Protocol), String> {
    let obj = object(body)?;
    let protocol = protocol(&obj)?;
    let local = string(&obj, "local")?;
    if local.is_empty() {
        return Err("missing \"local\"".to_string());
    }
    parse_local(protocol, &local)?;
    Ok((local, protocol))
}

fn ipv4(s: &str, what: &str) -> Result<Ipv4Addr, String> {
    s.parse()
        .map_err(|_| format!("{what}: invalid IPv4 address {s:?}"))
}

/// gvproxy's zone JSON -> a validated [`Zone`].
pub(super) fn zone(body: &[u8]) -> Result<Zone, String> {
    let obj = object(body)?;
    let name = string(&obj, "Name")?;
    if name.is_empty() {
        return Err("missing zone \"Name\"".to_string());
    }
    let default_ip = match string(&obj, "DefaultIP")?.as_str() {
        "" => None,
        s => Some(ipv4(s, "DefaultIP")?),
    };
    let raw = match field(&obj, "Records") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(other) => return Err(format!("\"Records\" must be an array, not {}", kind(other))),
    };
    let mut records = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        let Value::Object(r) = r else {
            return Err(format!("record {i} must be an object, not {}", kind(r)));
        };
        if !string(r, "Regexp")?.is_empty() {
            return Err(format!("record {i}: Regexp records are not supported"));
        }
        let rname = string(r, "Name")?;
        if rname.is_empty() {
            return Err(format!("record {i}: missing \"Name\""));
        }
        let ip = string(r, "IP")?;
        if ip.is_empty() {
            return Err(format!("record {rname:?}: missing \"IP\""));
        }
        records.push(ZoneRecord {
            ip: ipv4(&ip, &format!("record {rname:?}"))?,
            name: rname,
        });
    }
    Ok(Zone {
        name,
        records,
        default_ip,
    })
}

/// `ip`, `port` and the optional `timeout` (whole seconds, 0..=65535, as Lima parses it).
pub(super) fn wait_query(
    q: &BTreeMap<String, String>,
) -> Result<(Ipv4Addr, u16, Duration), String> {
    let ip = q.get("ip").map(String::as_str).unwrap_or("");
    let ip: Ipv4Addr = ip
        .parse()
        .map_err(|_| format!("invalid ip address: {ip:?} (expected the guest's IPv4 address)"))?;
    let port = q.get("port").map(String::as_str).unwrap_or("");
    let port: u16 = match port.parse() {
        Ok(p) if p != 0 => p,
        _ => return Err(format!("invalid port: {port:?} (expected 1-65535)")),
    };
    let timeout = match q.get("timeout").map(String::as_str) {
        None | Some("") => DEFAULT_WAIT_TIMEOUT,
        Some(t) => Duration::from_secs(
            t.parse::<u16>()
                .map_err(|_| format!("invalid timeout: {t:?} (expected whole seconds, 0-65535)"))?
                .into(),
        ),
    };
    Ok((ip, port, timeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locals() {
        assert_eq!(
            parse_local(Protocol::Tcp, ":8080").unwrap(),
            LocalAddr::Inet("0.0.0.0:8080".parse().unwrap())
        );
        assert_eq!(
            parse_local(Protocol::Udp, "[::1]:53").unwrap(),
            LocalAddr::Inet("[::1]:53".parse().unwrap())
        );
        for bad in [
            "",
            "127.0.0.1",
            "127.0.0.1:0",
            "localhost:22",
            "1.2.3.4:99999",
            "/tmp/x",
        ] {
            assert!(parse_local(Protocol::Tcp, bad).is_err(), "{bad}");
        }
        assert!(parse_local(Protocol::Unix, "/run/x.sock").is_ok());
        assert!(parse_local(Protocol::Unix, "x.sock").is_err());
        assert!(parse_local(Protocol::Unix, &format!("/{}", "a".repeat(200))).is_err());
    }

    #[test]
    fn remotes() {
        let r = parse_remote;
        assert_eq!(
            r(Protocol::Tcp, "192.168.5.15:22").unwrap(),
            (
                Some(Ipv4Addr::new(192, 168, 5, 15)),
                22,
                "192.168.5.15:22".into()
            )
        );
        assert_eq!(r(Protocol::Udp, ":53").unwrap(), (None, 53, ":53".into()));
        assert_eq!(
            r(Protocol::Unix, "tcp://192.168.5.15:22").unwrap().2,
            "192.168.5.15:22"
        );
        for bad in [
            "",
            "22",
            "host:22",
            "[::1]:22",
            "1.2.3.4:0",
            "1.2.3.4:x",
            "tcp://1.2.3.4:22",
        ] {
            assert!(r(Protocol::Tcp, bad).is_err(), "{bad}");
        }
        assert!(r(Protocol::Unix, "ssh-tunnel://u@1.2.3.4:22/run/x.sock").is_err());
    }

    #[test]
    fn case_insensitive_keys_and_default_protocol() {
        let f = expose_request(br#"{"Local":"127.0.0.1:1","REMOTE":":2"}"#).unwrap();
        assert_eq!(f.protocol, Protocol::Tcp);
        assert_eq!(f.local, "127.0.0.1:1");
        assert_eq!(f.remote, ":2");
    }
}
