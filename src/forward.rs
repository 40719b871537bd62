//! Port forwarding host -> guest: `-p [HOSTIP:]HOSTPORT[-END]:[GUESTIP:]GUESTPORT[-END][/tcp|/udp]`,
//! the YAML config and the API add forwards; each is a host listener whose connections (TCP)
//! or datagrams (UDP) the NAT carries into the guest from the host address. The guest address
//! defaults to the first DHCP lease, looked up when a connection arrives, so a forward may be
//! set up before the guest boots. This module owns the listeners, not the carrying.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use netstack::nat::Nat;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The transport protocol of a forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    /// TCP (the default).
    Tcp,
    /// UDP.
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// One forward: a host address and port to a guest port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Forward {
    /// Where the host listens.
    pub host: SocketAddr,
    /// The guest's address; `None`: the first lease.
    pub guest_ip: Option<Ipv4Addr>,
    /// The guest's port.
    pub guest_port: u16,
    /// TCP or UDP.
    pub proto: Proto,
}

impl fmt::Display for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.guest_ip {
            Some(ip) => write!(f, "{}->{ip}:{}/{}", self.host, self.guest_port, self.proto),
            None => write!(f, "{}->:{}/{}", self.host, self.guest_port, self.proto),
        }
    }
}

/// A `-p` value: one forward or a range of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec(pub Vec<Forward>);

fn parse_range(s: &str, what: &str) -> Result<(u16, u16), String> {
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (a, b),
        None => (s, s),
    };
    let p = |v: &str| {
        v.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{what} port {v:?} is not a port number"))
    };
    let (a, b) = (p(a)?, p(b)?);
    if a > b {
        return Err(format!("{what} port range {s} runs backwards"));
    }
    Ok((a, b))
}

impl FromStr for PortSpec {
    type Err = String;
    fn from_str(spec: &str) -> Result<Self, String> {
        let err = |m: String| format!("-p {spec}: {m}");
        let (body, proto) = match spec.rsplit_once('/') {
            Some((b, "tcp")) => (b, Proto::Tcp),
            Some((b, "udp")) => (b, Proto::Udp),
            Some((_, p)) => return Err(err(format!("protocol {p:?} is not tcp or udp"))),
            None => (spec, Proto::Tcp),
        };
        let parts: Vec<&str> = body.split(':').collect();
        let (host_ip, host_ports, guest_ip, guest_ports) = match parts[..] {
            [hp, gp] => (None, hp, None, gp),
            [a, b, c] => {
                // HOSTIP:HOSTPORT:GUESTPORT or HOSTPORT:GUESTIP:GUESTPORT
                if a.parse::<IpAddr>().is_ok() {
                    (Some(a), b, None, c)
                } else {
                    (None, a, Some(b), c)
                }
            }
            [hi, hp, gi, gp] => (Some(hi), hp, Some(gi), gp),
            _ => return Err(err("expected [HOSTIP:]HOSTPORT:[GUESTIP:]GUESTPORT".into())),
        };
        let host_ip: IpAddr = match host_ip {
            None | Some("") => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Some(ip) => ip
                .parse()
                .map_err(|_| err(format!("host address {ip:?} is not an IP address")))?,
        };
        let guest_ip: Option<Ipv4Addr> = match guest_ip {
            None | Some("") => None,
            Some(ip) => Some(
                ip.parse()
                    .map_err(|_| err(format!("guest address {ip:?} is not an IPv4 address")))?,
            ),
        };
        let (h0, h1) = parse_range(host_ports, "host").map_err(err)?;
        let (g0, g1) = parse_range(guest_ports, "guest").map_err(err)?;
        if h1 - h0 != g1 - g0 {
            return Err(err("host and guest port ranges differ in length".into()));
        }
        Ok(PortSpec(
            (0..=(h1 - h0))
                .map(|i| Forward {
                    host: SocketAddr::new(host_ip, h0 + i),
                    guest_ip,
                    guest_port: g0 + i,
                    proto,
                })
                .collect(),
        ))
    }
}

/// Adding a forward failed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The host address is taken or cannot be bound.
    #[error("cannot listen on {addr}/{proto}: {error}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The protocol.
        proto: Proto,
        /// The OS error (shown in the message, so not a `source`: no doubled text).
        error: std::io::Error,
    },
    /// The same host address and protocol is forwarded already.
    #[error("{addr}/{proto} is forwarded already")]
    Exists {
        /// The address.
        addr: SocketAddr,
        /// The protocol.
        proto: Proto,
    },
}

/// The running forwards.
pub struct Forwarder {
    nat: Nat,
    leases: watch::Receiver<Vec<dhcp::Lease>>,
    active: Mutex<BTreeMap<ForwardKey, (Forward, JoinHandle<()>)>>,
    unix: Mutex<BTreeMap<std::path::PathBuf, (UnixForward, JoinHandle<()>)>>,
}

/// A forward from a host unix socket to a guest TCP port (gvproxy's `unix` protocol).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixForward {
    /// The socket usernet listens on.
    pub path: std::path::PathBuf,
    /// The guest's address; `None`: the first lease.
    pub guest_ip: Option<Ipv4Addr>,
    /// The guest's TCP port.
    pub guest_port: u16,
}

/// Forwards are told apart by protocol and host address.
type ForwardKey = (Proto, SocketAddr);

impl Forwarder {
    /// Forwards through `nat`; `leases` tells the default guest.
    pub fn new(nat: Nat, leases: watch::Receiver<Vec<dhcp::Lease>>) -> Arc<Forwarder> {
        Arc::new(Forwarder {
            nat,
            leases,
            active: Mutex::new(BTreeMap::new()),
            unix: Mutex::new(BTreeMap::new()),
        })
    }

    /// Start forwarding `f` (binds now; call inside the runtime).
    pub fn add(self: &Arc<Self>, f: Forward) -> Result<(), ForwardError> {
        let key = (f.proto, f.host);
        if self.active.lock().unwrap().contains_key(&key) {
            return Err(ForwardError::Exists {
                addr: f.host,
                proto: f.proto,
            });
        }
        let bind_err = |error| ForwardError::Bind {
            addr: f.host,
            proto: f.proto,
            error,
        };
        let me = Arc::clone(self);
        let task = match f.proto {
            Proto::Tcp => {
                let listener = std::net::TcpListener::bind(f.host)
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .and_then(TcpListener::from_std)
                    .map_err(bind_err)?;
                tokio::spawn(async move { me.serve_tcp(listener, f).await })
            }
            Proto::Udp => {
                let socket = std::net::UdpSocket::bind(f.host)
                    .and_then(|s| s.set_nonblocking(true).map(|()| s))
                    .and_then(UdpSocket::from_std)
                    .map_err(bind_err)?;
                tokio::spawn(async move { me.serve_udp(socket, f).await })
            }
        };
        tracing::info!("forwarding {f}");
        self.active.lock().unwrap().insert(key, (f, task));
        Ok(())
    }

    /// Stop forwarding `proto` on `host`; false if there was no such forward.
    pub fn remove(&self, proto: Proto, host: SocketAddr) -> bool {
        match self.active.lock().unwrap().remove(&(proto, host)) {
            Some((f, task)) => {
                task.abort();
                tracing::info!("no longer forwarding {f}");
                true
            }
            None => false,
        }
    }

    /// Start forwarding connections to the unix socket `f.path` into the guest (binds now;
    /// call inside the runtime).
    pub fn add_unix(self: &Arc<Self>, f: UnixForward) -> Result<(), String> {
        if self.unix.lock().unwrap().contains_key(&f.path) {
            return Err(format!("{} is forwarded already", f.path.display()));
        }
        crate::transport::claim_socket_path(&f.path).map_err(|e| e.to_string())?;
        let listener = std::os::unix::net::UnixListener::bind(&f.path)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(tokio::net::UnixListener::from_std)
            .map_err(|e| format!("cannot listen on {}: {e}", f.path.display()))?;
        let me = Arc::clone(self);
        let shown = f.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                let ip = shown.guest_ip.or_else(|| first_lease(&me.leases.borrow()));
                let Some(ip) = ip else { continue };
                let _ = me
                    .nat
                    .forward_unix(stream, SocketAddrV4::new(ip, shown.guest_port));
            }
        });
        tracing::info!("forwarding {} -> :{}", f.path.display(), f.guest_port);
        self.unix.lock().unwrap().insert(f.path.clone(), (f, task));
        Ok(())
    }

    /// Stop forwarding the unix socket `path` (and remove it); false if there was none.
    pub fn remove_unix(&self, path: &std::path::Path) -> bool {
        match self.unix.lock().unwrap().remove(path) {
            Some((_, task)) => {
                task.abort();
                let _ = std::fs::remove_file(path);
                true
            }
            None => false,
        }
    }

    /// The unix-socket forwards, in path order.
    pub fn list_unix(&self) -> Vec<UnixForward> {
        self.unix
            .lock()
            .unwrap()
            .values()
            .map(|(f, _)| f.clone())
            .collect()
    }

    /// The forwards, in address order.
    pub fn list(&self) -> Vec<Forward> {
        self.active
            .lock()
            .unwrap()
            .values()
            .map(|(f, _)| *f)
            .collect()
    }

    /// The guest address `f` goes to now: its own, or the first live lease's.
    pub fn guest_of(&self, f: &Forward) -> Option<Ipv4Addr> {
        f.guest_ip.or_else(|| first_lease(&self.leases.borrow()))
    }

    async fn serve_tcp(self: Arc<Self>, listener: TcpListener, f: Forward) {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let Some(ip) = self.guest_of(&f) else {
                tracing::debug!("{f}: no guest has a lease yet; closing {peer}");
                continue;
            };
            if self
                .nat
                .forward_tcp(stream, SocketAddrV4::new(ip, f.guest_port))
                .is_err()
            {
                tracing::debug!("{f}: guest {ip} not seen on the link yet; closing {peer}");
            }
        }
    }

    async fn serve_udp(self: Arc<Self>, socket: UdpSocket, f: Forward) {
        // The guest is fixed when the first datagram arrives.
        let mut leases = self.leases.clone();
        let ip = loop {
            if let Some(ip) = self.guest_of(&f) {
                break ip;
            }
            if leases.changed().await.is_err() {
                return;
            }
        };
        let task = self
            .nat
            .forward_udp(socket, SocketAddrV4::new(ip, f.guest_port));
        let _ = task.await;
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        for (_, task) in self.active.lock().unwrap().values() {
            task.abort();
        }
        for (path, (_, task)) in self.unix.lock().unwrap().iter() {
            task.abort();
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The lowest-addressed live lease (the first guest).
pub fn first_lease(leases: &[dhcp::Lease]) -> Option<Ipv4Addr> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    leases
        .iter()
        .filter(|l| l.expires > now)
        .map(|l| l.ip)
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_specs() {
        let one: PortSpec = "8080:80".parse().unwrap();
        assert_eq!(
            one.0,
            vec![Forward {
                host: "127.0.0.1:8080".parse().unwrap(),
                guest_ip: None,
                guest_port: 80,
                proto: Proto::Tcp
            }]
        );
        let full: PortSpec = "0.0.0.0:5000-5002:192.168.5.20:6000-6002/udp"
            .parse()
            .unwrap();
        assert_eq!(full.0.len(), 3);
        assert_eq!(full.0[2].host, "0.0.0.0:5002".parse().unwrap());
        assert_eq!(full.0[2].guest_ip, Some(Ipv4Addr::new(192, 168, 5, 20)));
        assert_eq!(full.0[2].guest_port, 6002);
        assert_eq!(full.0[2].proto, Proto::Udp);
        let guest: PortSpec = "2222:192.168.5.15:22".parse().unwrap();
        assert_eq!(guest.0[0].guest_ip, Some(Ipv4Addr::new(192, 168, 5, 15)));
        let host: PortSpec = "127.0.0.2:2222:22".parse().unwrap();
        assert_eq!(host.0[0].host, "127.0.0.2:2222".parse().unwrap());
        for bad in [
            "80",
            "a:80",
            "80:0",
            "10-5:10-5",
            "1-3:1-2",
            "80:80/sctp",
            "1.2.3:80:80:80",
        ] {
            assert!(bad.parse::<PortSpec>().is_err(), "{bad} parsed");
        }
    }
}
