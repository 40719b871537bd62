//! The gateway port: the netstack gateway and the local services behind it (DHCP today) on one
//! task, fed by one port of the switch. It owns the DHCP lease table and writes the lease file
//! whenever the bindings change. It does not open sockets to the outside.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use netstack::{Gateway, GatewayConfig, L2Dest, Output, UdpDatagram};

use crate::plan::Plan;
use crate::switch::{PortRx, PortTx, Switch};

const DHCP_SERVER_PORT: u16 = 67;
const DHCP_CLIENT_PORT: u16 = 68;

/// What the gateway task needs to start.
pub struct GatewaySetup {
    /// The DHCP server, leases restored.
    pub dhcp: dhcp::Server,
    /// Where to keep the leases, if anywhere.
    pub lease_file: Option<PathBuf>,
}

/// A handle on the running gateway task.
pub struct GatewayHandle {
    task: tokio::task::JoinHandle<dhcp::Server>,
    stop: tokio::sync::oneshot::Sender<()>,
    lease_file: Option<PathBuf>,
}

impl GatewayHandle {
    /// Stop the task and write the lease file one last time.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        let dhcp = self.task.await?;
        if let Some(path) = &self.lease_file {
            dhcp::store::save(path, &dhcp.leases())
                .map_err(|e| anyhow::anyhow!("lease-file {}: {e}", path.display()))?;
        }
        Ok(())
    }
}

/// The DHCP server configuration for `plan`.
pub fn dhcp_config(plan: &Plan) -> dhcp::Config {
    dhcp::Config {
        server_ip: plan.host_ip,
        subnet: plan.subnet,
        router: plan.host_ip,
        dns_servers: plan.dns_servers.clone(),
        pool_start: plan.pool_start,
        pool_end: plan.pool_end,
        lease_time: plan.lease_time,
        mtu: Some(plan.mtu),
        search_domains: plan.search.clone(),
        static_leases: plan
            .static_leases
            .iter()
            .map(|(ip, mac)| (*ip, dhcp::MacAddr(*mac)))
            .collect(),
        reserved: vec![plan.host_ip, plan.dns_ip],
    }
}

/// Attach the gateway to `switch` and run it.
pub fn start(switch: &Arc<Switch>, plan: &Plan, setup: GatewaySetup) -> GatewayHandle {
    let (port, rx) = switch.attach("gateway");
    switch.pin_mac(&port, plan.gateway_mac);
    let gateway = Gateway::new(GatewayConfig {
        mac: plan.gateway_mac,
        addrs: vec![plan.host_ip, plan.dns_ip],
        network: plan.subnet.network(),
        prefix: plan.subnet.prefix_len(),
    });
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let lease_file = setup.lease_file.clone();
    let task = tokio::spawn(run(gateway, setup, plan.host_ip, port, rx, stopped));
    GatewayHandle {
        task,
        stop,
        lease_file,
    }
}

async fn run(
    mut gateway: Gateway,
    setup: GatewaySetup,
    server_ip: Ipv4Addr,
    port: PortTx,
    mut rx: PortRx,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) -> dhcp::Server {
    let GatewaySetup {
        mut dhcp,
        lease_file,
    } = setup;
    let mut saved = dhcp.leases();
    let mut out = Vec::new();
    loop {
        let frame = tokio::select! {
            f = rx.frames.recv() => match f { Some(f) => f, None => break },
            _ = &mut stopped => break,
        };
        gateway.receive(&frame, Instant::now(), &mut out);
        for o in out.drain(..) {
            match o {
                Output::Frame(f) => port.send(Bytes::from(f)),
                Output::Udp(d) if d.dst.port() == DHCP_SERVER_PORT => {
                    if let Some(f) = serve_dhcp(&mut gateway, &mut dhcp, server_ip, &d) {
                        port.send(Bytes::from(f));
                    }
                }
                Output::Udp(_) => {} // no other local UDP service yet
            }
        }
        if let Some(path) = &lease_file {
            let now = dhcp.leases();
            if now != saved {
                if let Err(e) = dhcp::store::save(path, &now) {
                    tracing::warn!("lease-file {}: {e}", path.display());
                }
                saved = now;
            }
        }
    }
    port.detach();
    dhcp
}

fn serve_dhcp(
    gateway: &mut Gateway,
    dhcp: &mut dhcp::Server,
    server_ip: Ipv4Addr,
    d: &UdpDatagram,
) -> Option<Vec<u8>> {
    let reply = match dhcp.handle(&d.payload, SystemTime::now()) {
        Ok(Some(r)) => r,
        Ok(None) => return None,
        Err(e) => {
            tracing::debug!("dhcp: dropped a message: {e}");
            return None;
        }
    };
    let (to, ip) = match reply.to {
        dhcp::Destination::Broadcast => (L2Dest::Broadcast, Ipv4Addr::BROADCAST),
        dhcp::Destination::Unicast { ip, mac } => (L2Dest::Mac(mac.0), ip),
    };
    // A DHCP server answers from its server identifier, whatever address the client used.
    let src = SocketAddrV4::new(server_ip, DHCP_SERVER_PORT);
    let dst = SocketAddrV4::new(ip, DHCP_CLIENT_PORT);
    Some(gateway.udp_frame(to, src, dst, &reply.payload))
}
