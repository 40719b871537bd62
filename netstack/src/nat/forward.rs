//! Host -> guest port forwarding: connections and datagrams that arrive on host sockets are
//! carried into a guest from the gateway's host address, as if the host address had connected.
//! TCP reuses the NAT's connection task (smoltcp connects into the guest); UDP keeps one flow
//! per host client, idle-timed like outbound UDP flows. The listeners themselves belong to the
//! caller (the daemon's forwarder); this module only carries what they accept.

use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{FlowCounters, Shared};

/// Gateway ports that forwarded UDP flows come from.
const UDP_PORTS: std::ops::Range<u16> = 40000..61000;
static NEXT_UDP_PORT: AtomicU16 = AtomicU16::new(UDP_PORTS.start);

fn next_udp_port() -> u16 {
    let p = NEXT_UDP_PORT.fetch_add(1, Ordering::Relaxed);
    if UDP_PORTS.contains(&p) {
        p
    } else {
        NEXT_UDP_PORT.store(UDP_PORTS.start + 1, Ordering::Relaxed);
        UDP_PORTS.start
    }
}

/// Serve a bound host UDP socket as a forward to `guest`, until the socket fails or the
/// returned task is aborted.
pub(crate) async fn serve_udp(shared: Arc<Shared>, socket: UdpSocket, guest: SocketAddrV4) {
    let socket = Arc::new(socket);
    let c = &shared.udp_counters;
    // host client -> (gateway port, last activity); forgotten however this future ends.
    let mut clients = Clients {
        shared: &shared,
        guest,
        map: HashMap::new(),
    };
    let (replies_tx, mut replies) = mpsc::channel::<(SocketAddr, Bytes)>(256);
    let mut buf = vec![0u8; 65536];
    let timeout = shared.config.udp_timeout;
    let mut sweep = tokio::time::interval(timeout.min(std::time::Duration::from_secs(5)));
    loop {
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                let Ok((n, client)) = r else { break };
                if n > super::udp::MAX_DATAGRAM {
                    // Legal over IPv6 (a forward may listen there), too long for IPv4.
                    FlowCounters::inc(&c.drop_limit);
                    continue;
                }
                let Some(mac) = shared.neighbor(*guest.ip()) else {
                    FlowCounters::inc(&c.drop_send_failed);
                    continue;
                };
                let now = Instant::now();
                let port = match clients.map.get_mut(&client) {
                    Some((port, seen)) => {
                        *seen = now;
                        *port
                    }
                    None => {
                        let port = next_udp_port();
                        let key = super::udp::Key {
                            guest,
                            dst: SocketAddrV4::new(shared.config.host_ip, port),
                        };
                        shared.udp_inbound.lock().unwrap().insert(key, (client, replies_tx.clone()));
                        clients.map.insert(client, (port, now));
                        FlowCounters::inc(&c.opened);
                        FlowCounters::inc(&c.open);
                        port
                    }
                };
                FlowCounters::add(&c.bytes_to_guest, n as u64);
                let from = SocketAddrV4::new(shared.config.host_ip, port);
                shared.uplink.send_udp(mac, from, guest, &buf[..n]);
            }
            Some((client, payload)) = replies.recv() => {
                if let Some((_, seen)) = clients.map.get_mut(&client) {
                    *seen = Instant::now();
                }
                FlowCounters::add(&c.bytes_from_guest, payload.len() as u64);
                if socket.send_to(&payload, client).await.is_err() {
                    FlowCounters::inc(&c.drop_send_failed);
                }
            }
            _ = sweep.tick() => {
                let now = Instant::now();
                let stale: Vec<SocketAddr> = clients
                    .map
                    .iter()
                    .filter(|(_, (_, seen))| now.duration_since(*seen) >= timeout)
                    .map(|(client, _)| *client)
                    .collect();
                for client in stale {
                    clients.forget(&client);
                }
            }
        }
    }
}

/// The host clients of one UDP forward, each with its gateway port.
struct Clients<'a> {
    shared: &'a Shared,
    guest: SocketAddrV4,
    map: HashMap<SocketAddr, (u16, Instant)>,
}

impl Clients<'_> {
    fn forget(&mut self, client: &SocketAddr) {
        if let Some((port, _)) = self.map.remove(client) {
            let key = super::udp::Key {
                guest: self.guest,
                dst: SocketAddrV4::new(self.shared.config.host_ip, port),
            };
            self.shared.udp_inbound.lock().unwrap().remove(&key);
            let c = &self.shared.udp_counters;
            FlowCounters::dec(&c.open);
            FlowCounters::inc(&c.closed);
        }
    }
}

impl Drop for Clients<'_> {
    fn drop(&mut self) {
        let all: Vec<SocketAddr> = self.map.keys().copied().collect();
        for client in all {
            self.forget(&client);
        }
    }
}

/// A guest's datagram that answers a forwarded UDP flow: hand it to the forward. Returns the
/// datagram back when it belongs to no forward.
pub(crate) fn deliver_reply(
    shared: &Shared,
    key: &super::udp::Key,
    payload: Bytes,
) -> Option<Bytes> {
    let inbound = shared.udp_inbound.lock().unwrap();
    let Some((client, tx)) = inbound.get(key) else {
        return Some(payload);
    };
    if tx.try_send((*client, payload)).is_err() {
        FlowCounters::inc(&shared.udp_counters.drop_queue_full);
    }
    None
}
