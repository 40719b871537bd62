//! The daemon's side of the HTTP API: what `api::ApiBackend` asks of the running network
//! (leases, forwards, DNS names, counters, wait_port), answered from the switch, the gateway
//! and the forwarder. The HTTP layer and its validation live in `api`.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::api::{ApiBackend, ApiError, BoxFuture, Forward, LocalAddr, Protocol, Zone};
use crate::forward::{self, ForwardError, Forwarder, Proto};
use crate::gateway::GatewayProbe;
use crate::plan::format_mac;
use crate::switch::Switch;

/// The running network, as the API sees it.
pub struct Control {
    /// The switch (counters).
    pub switch: Arc<Switch>,
    /// The gateway (counters, NAT).
    pub gateway: GatewayProbe,
    /// The DHCP bindings.
    pub leases: tokio::sync::watch::Receiver<Vec<dhcp::Lease>>,
    /// Port forwards.
    pub forwarder: Arc<Forwarder>,
    /// DNS zones added through the API (served by the DNS server).
    pub zones: Mutex<Vec<Zone>>,
    /// Called with each zone added, to teach the DNS server its names.
    pub on_zone: Box<dyn Fn(&Zone) + Send + Sync>,
}

fn proto(p: Protocol) -> Result<Proto, ApiError> {
    match p {
        Protocol::Tcp => Ok(Proto::Tcp),
        Protocol::Udp => Ok(Proto::Udp),
        Protocol::Unix => Err(ApiError::BadRequest(
            "unix forwards take a socket path as local".into(),
        )),
    }
}

fn inet(f: &Forward) -> Result<SocketAddr, ApiError> {
    match f.local_addr()? {
        LocalAddr::Inet(a) => Ok(a),
        LocalAddr::Path(p) => Err(ApiError::BadRequest(format!(
            "local {} is a path; tcp and udp take IP:PORT",
            p.display()
        ))),
    }
}

impl ApiBackend for Control {
    fn leases(&self) -> Vec<(Ipv4Addr, String)> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.leases
            .borrow()
            .iter()
            .filter(|l| l.expires > now)
            .map(|l| (l.ip, format_mac(l.mac.0)))
            .collect()
    }

    fn expose(&self, f: Forward) -> Result<(), ApiError> {
        if f.protocol == Protocol::Unix {
            let LocalAddr::Path(path) = f.local_addr()? else {
                return Err(ApiError::BadRequest(format!(
                    "local {} is not a path",
                    f.local
                )));
            };
            let (guest_ip, guest_port) = f.remote_addr()?;
            return self
                .forwarder
                .add_unix(forward::UnixForward {
                    path,
                    guest_ip,
                    guest_port,
                })
                .map_err(ApiError::Busy);
        }
        let proto = proto(f.protocol)?;
        let host = inet(&f)?;
        let (guest_ip, guest_port) = f.remote_addr()?;
        self.forwarder
            .add(forward::Forward {
                host,
                guest_ip,
                guest_port,
                proto,
            })
            .map_err(|e| match e {
                ForwardError::Bind { .. } | ForwardError::Exists { .. } => {
                    ApiError::Busy(e.to_string())
                }
            })
    }

    fn unexpose(&self, local: &str, protocol: Protocol) -> Result<(), ApiError> {
        if protocol == Protocol::Unix {
            return if self.forwarder.remove_unix(std::path::Path::new(local)) {
                Ok(())
            } else {
                Err(ApiError::NotFound(format!("no unix forward on {local}")))
            };
        }
        let proto = proto(protocol)?;
        let host = match crate::api::parse_local(protocol, local).map_err(ApiError::BadRequest)? {
            LocalAddr::Inet(a) => a,
            LocalAddr::Path(_) => return Err(ApiError::NotFound(format!("no forward on {local}"))),
        };
        if self.forwarder.remove(proto, host) {
            Ok(())
        } else {
            Err(ApiError::NotFound(format!("no {proto} forward on {local}")))
        }
    }

    fn forwards(&self) -> Vec<Forward> {
        let unix = self.forwarder.list_unix().into_iter().map(|f| Forward {
            local: f.path.display().to_string(),
            remote: match f.guest_ip {
                Some(ip) => format!("{ip}:{}", f.guest_port),
                None => format!(":{}", f.guest_port),
            },
            protocol: Protocol::Unix,
        });
        self.forwarder
            .list()
            .into_iter()
            .map(|f| Forward {
                local: f.host.to_string(),
                remote: match f.guest_ip {
                    Some(ip) => format!("{ip}:{}", f.guest_port),
                    None => format!(":{}", f.guest_port),
                },
                protocol: match f.proto {
                    Proto::Tcp => Protocol::Tcp,
                    Proto::Udp => Protocol::Udp,
                },
            })
            .chain(unix)
            .collect()
    }

    fn dns_add(&self, zone: Zone) -> Result<(), ApiError> {
        (self.on_zone)(&zone);
        let mut zones = self.zones.lock().unwrap();
        // As gvproxy: a zone added again replaces the old one, its new records first.
        if let Some(old) = zones.iter_mut().find(|z| z.name == zone.name) {
            let mut records = zone.records;
            records.append(&mut old.records);
            old.records = records;
            old.default_ip = zone.default_ip.or(old.default_ip);
        } else {
            zones.push(zone);
        }
        Ok(())
    }

    fn dns_zones(&self) -> Vec<Zone> {
        self.zones.lock().unwrap().clone()
    }

    fn stats(&self) -> BoxFuture<'_, Value> {
        Box::pin(crate::stats::collect(&self.switch, &self.gateway))
    }

    fn wait_port(
        &self,
        ip: Ipv4Addr,
        port: u16,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<(), ApiError>> {
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            let guest = SocketAddrV4::new(ip, port);
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    return Err(ApiError::Timeout(format!(
                        "{guest} did not accept within {timeout:?}"
                    )));
                }
                let attempt = left.min(Duration::from_secs(2));
                let started = tokio::time::Instant::now();
                if self.gateway.nat().probe_tcp(guest, attempt).await {
                    return Ok(());
                }
                // Refused (or the guest is not on the link yet): try again shortly.
                let spent = started.elapsed();
                if spent < Duration::from_millis(200) {
                    tokio::time::sleep(Duration::from_millis(200) - spent).await;
                }
            }
        })
    }
}
