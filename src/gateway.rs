//! The gateway port: the netstack gateway, the local services behind it (DHCP today) and the
//! NAT, fed by one port of the switch. The task owns the DHCP lease table and writes the lease
//! file whenever the bindings change; routed packets go to the NAT, whose flows run as tasks of
//! their own and send their frames straight into the switch.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use netstack::ipv4frag::{self, Reassembly, SharedReassembler};
use netstack::nat::{LargeSegments, Nat, NatConfig};
use netstack::{Gateway, GatewayConfig, L2Dest, Output, UdpDatagram};
use tokio::sync::{mpsc, oneshot, watch};

use crate::plan::Plan;
use crate::switch::{Fast, PortRx, PortTx, Switch};

const DHCP_SERVER_PORT: u16 = 67;
const DHCP_CLIENT_PORT: u16 = 68;
const DNS_PORT: u16 = 53;
/// The largest UDP payload the link carries (the NAT fragments what exceeds the MTU).
const MAX_UDP: usize = 65507;

/// What the gateway task needs to start.
pub struct GatewaySetup {
    /// The DHCP server, leases restored.
    pub dhcp: dhcp::Server,
    /// Where to keep the leases, if anywhere.
    pub lease_file: Option<PathBuf>,
    /// The NAT's settings.
    pub nat: NatConfig,
    /// The DNS server at the DNS address, if any.
    pub dns: Option<dns::DnsServer>,
}

/// What the gateway task counted, on request.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GatewayStats {
    /// The gateway's per-frame counters.
    pub gateway: netstack::Counters,
    /// IPv4 reassembly's counters.
    pub fragments: netstack::ipv4frag::FragCounters,
    /// The DHCP server's counters.
    pub dhcp: dhcp::Counters,
}

/// A handle on the running gateway task.
pub struct GatewayHandle {
    task: tokio::task::JoinHandle<dhcp::Server>,
    stop: oneshot::Sender<()>,
    stats: mpsc::Sender<oneshot::Sender<GatewayStats>>,
    lease_file: Option<PathBuf>,
    nat: Nat,
    dns: Option<dns::DnsServer>,
    leases: watch::Receiver<Vec<dhcp::Lease>>,
}

/// A cloneable handle for asking the gateway task what it counted.
#[derive(Clone)]
pub struct GatewayProbe {
    stats: mpsc::Sender<oneshot::Sender<GatewayStats>>,
    nat: Nat,
    dns: Option<dns::DnsServer>,
}

impl GatewayProbe {
    /// The gateway's and DHCP server's counters.
    pub async fn stats(&self) -> Option<GatewayStats> {
        let (tx, rx) = oneshot::channel();
        self.stats.send(tx).await.ok()?;
        rx.await.ok()
    }

    /// The NAT.
    pub fn nat(&self) -> &Nat {
        &self.nat
    }

    /// The DNS server, if any.
    pub fn dns(&self) -> Option<&dns::DnsServer> {
        self.dns.as_ref()
    }
}

impl GatewayHandle {
    /// A cloneable handle on the counters.
    pub fn probe(&self) -> GatewayProbe {
        GatewayProbe {
            stats: self.stats.clone(),
            nat: self.nat.clone(),
            dns: self.dns.clone(),
        }
    }

    /// The DHCP bindings, updated as they change.
    pub fn leases(&self) -> watch::Receiver<Vec<dhcp::Lease>> {
        self.leases.clone()
    }

    /// The NAT.
    pub fn nat(&self) -> &Nat {
        &self.nat
    }

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

/// The NAT configuration for `plan` with the defaults (callers adjust the rest).
pub fn nat_config(plan: &Plan) -> NatConfig {
    NatConfig::new(
        plan.gateway_mac,
        plan.mtu,
        plan.subnet.network(),
        plan.subnet.prefix_len(),
        plan.host_ip,
        plan.dns_ip,
    )
}

/// Attach the gateway to `switch` and run it.
pub fn start(switch: &Arc<Switch>, plan: &Plan, setup: GatewaySetup) -> GatewayHandle {
    // Large: the NAT sends TCP segments of up to 64 KiB to guests whose port takes them.
    let (port, rx) = switch.attach_large("gateway");
    switch.pin_mac(&port, plan.gateway_mac);
    let mut nat_config = setup.nat.clone();
    let sw = Arc::clone(switch);
    nat_config.large_segments = Some(LargeSegments(Arc::new(move |mac| sw.takes_large(mac))));
    let gateway_config = GatewayConfig {
        mac: plan.gateway_mac,
        host_ip: plan.host_ip,
        dns_ip: plan.dns_ip,
        host_aliases: setup.nat.host_aliases.clone(),
        answer_host_ping: !setup.nat.host_loopback,
        network: plan.subnet.network(),
        prefix: plan.subnet.prefix_len(),
        mtu: plan.mtu,
    };
    let gateway = Gateway::new(gateway_config.clone());
    let sink_port = port.clone();
    let nat = Nat::new(
        nat_config,
        Arc::new(move |f: Bytes, partial| sink_port.send_partial(f, partial)),
    );
    let fast = FastPath {
        config: gateway_config.clone(),
        nat: nat.clone(),
        reassembler: gateway.reassembler(),
    };
    switch.set_fast_path(
        &port,
        Arc::new(move |frame: &Bytes, partial| fast.offer(frame, partial.is_some())),
    );
    let (stop, stopped) = oneshot::channel();
    let (stats, stats_rx) = mpsc::channel(4);
    let lease_file = setup.lease_file.clone();
    let (leases_tx, leases) = watch::channel(setup.dhcp.leases());
    let task = tokio::spawn(run(
        Task {
            leases: leases_tx,
            gateway,
            dhcp: setup.dhcp,
            lease_file: setup.lease_file,
            server_ip: plan.host_ip,
            nat: nat.clone(),
            dns: setup.dns.clone(),
            port,
        },
        rx,
        stopped,
        stats_rx,
    ));
    GatewayHandle {
        task,
        stop,
        stats,
        lease_file,
        nat,
        dns: setup.dns,
        leases,
    }
}

/// The gateway's fast path: a guest's TCP segment or UDP datagram goes to the NAT from the
/// sending port's task, without a copy or a trip through the gateway's queue and task, when
/// it is one the gateway would only route (everything else takes the full path); fragments
/// are reassembled there ([`FastPath::reassemble`]).
struct FastPath {
    config: GatewayConfig,
    nat: Nat,
    reassembler: SharedReassembler,
}

impl FastPath {
    /// `partial`: the frame's checksum is left partial by the guest's kernel, nothing to
    /// verify.
    fn offer(&self, frame: &Bytes, partial: bool) -> Fast {
        if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] || frame[6] & 1 == 1 {
            return Fast::Declined;
        }
        let ip = &frame[14..];
        if !partial && ipv4frag::is_fragment(ip) {
            return self.reassemble(frame);
        }
        let (config, nat) = (&self.config, &self.nat);
        let src_mac: netstack::MacAddr = frame[6..12].try_into().unwrap();
        match ip[9] {
            6 => {
                let Some(len) = config.routed_tcp_len(ip) else {
                    return Fast::Declined;
                };
                nat.route_tcp(src_mac, frame.slice(14..14 + len), partial);
            }
            17 => {
                let Some((src, dst, ttl, payload)) = config.routed_udp(ip, partial) else {
                    return Fast::Declined;
                };
                let payload = frame.slice(14 + payload.start..14 + payload.end);
                nat.route_udp(src_mac, src, dst, ttl, payload);
            }
            _ => return Fast::Declined,
        }
        Fast::Taken
    }

    /// A guest's IPv4 fragment (header checked) is reassembled on the thread of the port that
    /// sent it, in the gateway's reassembler. A whole datagram that the fast path routes goes
    /// to the NAT from here, so that it leaves before the flow's next datagrams, which take the
    /// fast path on this thread (reassembled in the gateway's task, on another thread, a large
    /// datagram was overtaken by the small ones the guest sent after it). Any other whole
    /// packet (a large ping, a query to the DNS address) goes to the gateway's queue in place
    /// of the fragment.
    fn reassemble(&self, frame: &Bytes) -> Fast {
        let whole = match self.reassembler.push(&frame[14..], Instant::now()) {
            Reassembly::Complete(whole) => whole,
            // Held, or dropped and counted there.
            Reassembly::Pending | Reassembly::Dropped(_) => return Fast::Taken,
            Reassembly::NotFragment => return Fast::Declined,
        };
        let mut f = BytesMut::with_capacity(14 + whole.len());
        f.extend_from_slice(&frame[..14]);
        f.extend_from_slice(&whole);
        let f = f.freeze();
        match self.offer(&f, false) {
            Fast::Declined => Fast::Queue(f),
            taken => taken,
        }
    }
}

struct Task {
    leases: watch::Sender<Vec<dhcp::Lease>>,
    gateway: Gateway,
    dhcp: dhcp::Server,
    lease_file: Option<PathBuf>,
    server_ip: Ipv4Addr,
    nat: Nat,
    dns: Option<dns::DnsServer>,
    port: PortTx,
}

async fn run(
    mut t: Task,
    mut rx: PortRx,
    mut stopped: oneshot::Receiver<()>,
    mut stats: mpsc::Receiver<oneshot::Sender<GatewayStats>>,
) -> dhcp::Server {
    let mut out = Vec::new();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let frame = tokio::select! {
            f = rx.frames.recv() => match f { Some(f) => f, None => break },
            _ = tick.tick() => {
                t.gateway.expire(Instant::now());
                continue;
            }
            Some(reply) = stats.recv() => {
                let _ = reply.send(GatewayStats {
                    gateway: t.gateway.counters().clone(),
                    fragments: t.gateway.fragment_counters(),
                    dhcp: t.dhcp.counters().clone(),
                });
                continue;
            }
            _ = &mut stopped => break,
        };
        t.gateway.receive(&frame, Instant::now(), &mut out);
        for o in out.drain(..) {
            match o {
                Output::Frame(f) => t.port.send(Bytes::from(f)),
                Output::Route(r) => t.nat.route(r),
                Output::Neighbor { ip, mac } => t.nat.learn_neighbor(ip, mac),
                Output::Udp(d) if d.dst.port() == DHCP_SERVER_PORT => t.serve_dhcp(&d),
                Output::Udp(d) if d.dst.port() == DNS_PORT => t.serve_dns(d),
                Output::Udp(_) => {} // no other local UDP service
            }
        }
    }
    t.port.detach();
    t.dhcp
}

impl Task {
    /// Answer a query to the DNS address on a task of its own: a slow lookup delays nothing.
    fn serve_dns(&self, d: UdpDatagram) {
        let Some(dns) = &self.dns else { return };
        // Beyond the in-flight limit the query is dropped (and counted): a guest's flood of
        // queries holds no more tasks.
        let Some(answer) = dns.try_answer_udp(d.payload, MAX_UDP) else {
            return;
        };
        let nat = self.nat.clone();
        let (mac, from, to) = (d.src_mac, d.dst, d.src);
        tokio::spawn(async move {
            if let Some(answer) = answer.await {
                nat.send_udp(mac, from, to, &answer);
            }
        });
    }

    fn serve_dhcp(&mut self, d: &UdpDatagram) {
        let before = self.dhcp.leases();
        let reply = match self.dhcp.handle(&d.payload, SystemTime::now()) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("dhcp: dropped a message: {e}");
                None
            }
        };
        if let Some(reply) = reply {
            let (to, ip) = match reply.to {
                dhcp::Destination::Broadcast => (L2Dest::Broadcast, Ipv4Addr::BROADCAST),
                dhcp::Destination::Unicast { ip, mac } => (L2Dest::Mac(mac.0), ip),
            };
            // A DHCP server answers from its server identifier, whatever address the client used.
            let src = SocketAddrV4::new(self.server_ip, DHCP_SERVER_PORT);
            let dst = SocketAddrV4::new(ip, DHCP_CLIENT_PORT);
            let frame = self.gateway.udp_frame(to, src, dst, &reply.payload);
            self.port.send(Bytes::from(frame));
        }
        let now = self.dhcp.leases();
        if now != before {
            if let Some(path) = &self.lease_file {
                if let Err(e) = dhcp::store::save(path, &now) {
                    tracing::warn!("lease-file {}: {e}", path.display());
                }
            }
            // A guest that only did DHCP is reachable for forwarded connections too.
            for l in &now {
                self.nat.learn_neighbor(l.ip, l.mac.0);
            }
            self.leases.send_replace(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::PlanSettings;
    use smoltcp::wire::Ipv4Packet;

    /// A gateway on a switch, with the default plan (the host address is the host's loopback).
    fn gateway() -> (Plan, Arc<Switch>, GatewayHandle) {
        let plan = Plan::resolve(PlanSettings::default(), &[]).unwrap();
        let switch = Switch::new(plan.mtu);
        let dhcp = dhcp::Server::new(dhcp_config(&plan), Vec::new()).unwrap();
        let setup = GatewaySetup {
            dhcp,
            lease_file: None,
            nat: nat_config(&plan),
            dns: None,
        };
        let handle = start(&switch, &plan, setup);
        (plan, switch, handle)
    }

    /// Send the IPv4 packet of `frame` from `guest` in fragments of at most 1500 bytes, as a
    /// guest's kernel sends a datagram longer than the MTU (DF cleared); how many.
    fn send_in_fragments(guest: &PortTx, mut frame: Vec<u8>) -> usize {
        let mut ip = Ipv4Packet::new_unchecked(&mut frame[14..]);
        ip.set_dont_frag(false);
        ip.fill_checksum();
        let pieces = ipv4frag::fragment(&frame[14..], 1500).unwrap();
        for piece in &pieces {
            let mut f = frame[..14].to_vec();
            f.extend_from_slice(piece);
            guest.send(Bytes::from(f));
        }
        pieces.len()
    }

    /// A guest datagram that came in fragments leaves for the host from the thread that
    /// received its last fragment, ahead of the guest's next datagram of the flow: both reach
    /// the host socket, in order, while the gateway's task has not run at all.
    #[tokio::test(flavor = "current_thread")]
    async fn a_fragmented_datagram_leaves_before_the_next_one() {
        let (plan, switch, _gateway) = gateway();
        let (guest, _rx) = switch.attach("guest");
        let host = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // Blocking, and no await below: the gateway's task cannot run meanwhile.
        host.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let port = host.local_addr().unwrap().port();

        let mac = [0x52, 0x55, 0x55, 0, 0, 0x15];
        let src = SocketAddrV4::new(Ipv4Addr::new(192, 168, 5, 15), 40000);
        let dst = SocketAddrV4::new(plan.host_ip, port);
        let to = L2Dest::Mac(plan.gateway_mac);
        let big: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let frame = netstack::build_udp_frame(mac, to, src, dst, &big);
        assert_eq!(send_in_fragments(&guest, frame), 3);
        guest.send(Bytes::from(netstack::build_udp_frame(
            mac, to, src, dst, b"next",
        )));

        let mut buf = [0u8; 4096];
        let n = host.recv(&mut buf).expect("the whole datagram first");
        assert_eq!(&buf[..n], &big[..]);
        let n = host.recv(&mut buf).expect("and the next one after it");
        assert_eq!(&buf[..n], b"next");
    }

    /// A packet reassembled on the sending port's thread that the fast path does not route
    /// (a ping to the DNS address, longer than the MTU) reaches the gateway's task whole, which
    /// answers it in fragments.
    #[tokio::test(flavor = "current_thread")]
    async fn a_fragmented_ping_to_the_gateway_is_answered() {
        let (plan, switch, _gateway) = gateway();
        let (guest, mut rx) = switch.attach("guest");

        // An echo request of 3000 bytes: a UDP frame of that length made ICMP.
        let mac = [0x52, 0x55, 0x55, 0, 0, 0x15];
        let src = SocketAddrV4::new(Ipv4Addr::new(192, 168, 5, 15), 0);
        let dst = SocketAddrV4::new(plan.dns_ip, 0);
        let to = L2Dest::Mac(plan.gateway_mac);
        let mut frame = netstack::build_udp_frame(mac, to, src, dst, &[0; 3000 - 8]);
        let data: Vec<u8> = (0..3000 - 8).map(|i: u32| (i * 7) as u8).collect();
        {
            let ip = &mut frame[14..];
            ip[9] = 1;
            let icmp = &mut ip[20..];
            icmp[..8].copy_from_slice(&[8, 0, 0, 0, 0x12, 0x34, 0, 1]);
            icmp[8..].copy_from_slice(&data);
            smoltcp::wire::Icmpv4Packet::new_unchecked(icmp).fill_checksum();
        }
        assert_eq!(send_in_fragments(&guest, frame), 3);

        let mut reassembler = ipv4frag::Reassembler::default();
        let reply = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                let f = rx.frames.recv().await.expect("the switch is up");
                assert!(f.len() <= 14 + 1500, "each piece fits the MTU");
                if let Reassembly::Complete(whole) = reassembler.push(&f[14..], Instant::now()) {
                    return whole;
                }
            }
        })
        .await
        .expect("an answer within 5 s");
        assert_eq!(reply[9], 1, "ICMP");
        assert_eq!(&reply[20..22], &[0, 0], "an echo reply");
        assert_eq!(&reply[24..28], &[0x12, 0x34, 0, 1], "its id and sequence");
        assert_eq!(&reply[28..], &data[..]);
    }
}
