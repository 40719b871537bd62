//! The command line: clap definitions, and turning flags into [`PlanSettings`] and a list of
//! transports. No I/O here beyond what clap does.

use std::net::Ipv4Addr;
use std::os::fd::RawFd;
use std::path::PathBuf;

use clap::Parser;
use ipnet::Ipv4Net;

use crate::plan::{Mac, PlanSettings, StaticLease};
use crate::transport::{parse_dgram_path, StreamAddr};

const ATTACH_HELP: &str = "\
Attaching a VM (any number of transports, each flag may be repeated):
  QEMU, usernet listens:    usernet --listen-qemu /tmp/usernet.sock
                            qemu-system-x86_64 ... -netdev stream,id=n0,server=off,addr.type=unix,addr.path=/tmp/usernet.sock \\
                                -device virtio-net-pci,netdev=n0
  QEMU listens:             qemu ... -netdev stream,id=n0,server=on,addr.type=unix,addr.path=/tmp/qemu.sock
                            usernet --connect-qemu /tmp/qemu.sock
  QEMU datagrams / vfkit:   usernet --listen-dgram /tmp/usernet.dgram
                            qemu ... -netdev dgram,id=n0,local.type=unix,local.path=/tmp/vm.dgram,remote.type=unix,remote.path=/tmp/usernet.dgram
  Lima (lima.yaml):         networks: [{socket: /tmp/usernet.sock}]   with   usernet --listen-qemu /tmp/usernet.sock
  fds over a socket (VZ):   usernet --listen-fd /tmp/usernet-fd.sock   (each SCM_RIGHTS fd is one VM)
  inherited socketpair:     usernet --fd 3                              (QEMU: -netdev socket,id=n0,fd=N)
  network namespace (root): usernet --tap-netns /run/netns/NAME [--tap tap0]
";

/// usernet: a user-mode virtual network for VMs and containers (slirp / gvproxy replacement).
///
/// The guest gets Lima's plan by default: subnet 192.168.5.0/24, guest 192.168.5.15, host
/// (gateway, the host's loopback) 192.168.5.2, DNS 192.168.5.3, by DHCP.
#[derive(Debug, Parser)]
#[command(name = "usernet", version, after_help = ATTACH_HELP)]
pub struct Cli {
    /// Listen for QEMU `-netdev stream` peers (4-byte length prefix), many VMs at once.
    /// PATH, unix://PATH or tcp://127.0.0.1:PORT. Example: --listen-qemu /tmp/usernet.sock
    #[arg(long, value_name = "ADDR", help_heading = "Transports")]
    pub listen_qemu: Vec<StreamAddr>,
    /// Connect to a QEMU `-netdev stream,server=on` socket; retry until it accepts, reconnect
    /// when it goes away. Example: --connect-qemu /tmp/qemu.sock
    #[arg(long, value_name = "ADDR", help_heading = "Transports")]
    pub connect_qemu: Vec<StreamAddr>,
    /// Bind a unix datagram socket, one frame per datagram (QEMU `-netdev dgram`, VZ, vfkit);
    /// the peer is learned from its first datagram. Example: --listen-dgram unixgram:///tmp/un.dgram
    #[arg(long, value_name = "PATH", value_parser = parse_dgram_path, help_heading = "Transports")]
    pub listen_dgram: Vec<PathBuf>,
    /// Listen on a unix socket for fds passed by SCM_RIGHTS (Lima's `_fd.sock`); each fd is one
    /// VM, framed by its SO_TYPE. Example: --listen-fd /tmp/usernet-fd.sock
    #[arg(long, value_name = "PATH", help_heading = "Transports")]
    pub listen_fd: Vec<PathBuf>,
    /// Serve an inherited socket fd (stream: length prefix; datagram: one frame each).
    /// Example: --fd 3
    #[arg(long = "fd", value_name = "N", help_heading = "Transports")]
    pub fds: Vec<RawFd>,
    /// Create a tap device in the network namespace at PATH and serve it (Linux, needs
    /// CAP_NET_ADMIN there). Example: --tap-netns /run/netns/guest
    #[arg(long, value_name = "PATH", help_heading = "Transports")]
    pub tap_netns: Vec<PathBuf>,
    /// The tap device name for the --tap-netns given at the same position (default tap0).
    /// Example: --tap eth0
    #[arg(long, value_name = "NAME", help_heading = "Transports")]
    pub tap: Vec<String>,
    /// Serve tap devices without segmentation offload: every frame fits the MTU (by default
    /// TCP to a tap guest goes in segments of up to 64 KiB that its kernel takes whole).
    #[arg(long, help_heading = "Transports")]
    pub no_offload: bool,
    /// After a frame to or from a tap guest, keep its port's thread polling for up to MICROS
    /// microseconds before it sleeps (adaptive: the window shrinks for a guest that is mostly
    /// quiet; 0: never). The answer to what the guest sent and its next frame are then taken
    /// without waking a sleeping thread (a halted vCPU, on a virtual machine). The price: a
    /// guest that sends a frame at least every MICROS keeps one core busy.
    #[arg(
        long,
        value_name = "MICROS",
        default_value_t = crate::transport::busypoll::DEFAULT_LIMIT.as_micros() as u64,
        value_parser = clap::value_parser!(u64).range(0..=10_000),
        help_heading = "Transports"
    )]
    pub busy_poll: u64,
    /// Queues of each tap device (IFF_MULTI_QUEUE), each served by a thread of its own. New
    /// connections come in on the first; one that carries bulk data (1 MiB) moves to the
    /// thread with the fewest such, whose queue is attached while it has some, so several
    /// streams use several cores and short connections are not slowed. 1: one thread.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=16), help_heading = "Transports")]
    pub tap_queues: u16,

    /// A YAML file with plan keys (subnet, host-ip, ...), or a Lima networks.yaml.
    /// Example: --config ~/.lima/_config/networks.yaml --network user-v2
    #[arg(long, value_name = "FILE", help_heading = "Network plan")]
    pub config: Option<PathBuf>,
    /// The entry to take from a Lima networks.yaml (default user-v2). Example: --network shared
    #[arg(long, value_name = "NAME", help_heading = "Network plan")]
    pub network: Option<String>,
    /// The guest subnet. Example: --subnet 10.66.0.0/24 [default: 192.168.5.0/24]
    #[arg(long, value_name = "CIDR", help_heading = "Network plan")]
    pub subnet: Option<Ipv4Net>,
    /// The host address: the guest's gateway, and the host's loopback as the guest sees it.
    /// Example: --host-ip 192.168.5.2 [default: network+2]
    #[arg(long, value_name = "IP", help_heading = "Network plan")]
    pub host_ip: Option<Ipv4Addr>,
    /// The DNS server address inside the network. Example: --dns-ip 192.168.5.3 [default: network+3]
    #[arg(long, value_name = "IP", help_heading = "Network plan")]
    pub dns_ip: Option<Ipv4Addr>,
    /// The first guest's address. Example: --guest-ip 192.168.5.15 [default: network+15]
    #[arg(long, value_name = "IP", help_heading = "Network plan")]
    pub guest_ip: Option<Ipv4Addr>,
    /// First address of the DHCP pool. Example: --dhcp-start 192.168.5.15 [default: guest-ip]
    #[arg(long, value_name = "IP", help_heading = "Network plan")]
    pub dhcp_start: Option<Ipv4Addr>,
    /// Last address of the DHCP pool. Example: --dhcp-end 192.168.5.100 [default: last usable]
    #[arg(long, value_name = "IP", help_heading = "Network plan")]
    pub dhcp_end: Option<Ipv4Addr>,
    /// The link MTU, 576 to 65520, handed out by DHCP (option 26). Example: --mtu 65520 [default: 1500]
    #[arg(long, value_name = "N", help_heading = "Network plan")]
    pub mtu: Option<u32>,
    /// The gateway's MAC address. Example: --gateway-mac 5a:94:ef:e4:0c:dd
    #[arg(long, value_name = "MAC", help_heading = "Network plan")]
    pub gateway_mac: Option<Mac>,
    /// DHCP lease time in seconds. Example: --lease-time 3600
    #[arg(long, value_name = "SECS", help_heading = "Network plan")]
    pub lease_time: Option<u64>,
    /// DHCP domain search list (option 119). Example: --search lima.internal,example.com
    /// [default: the host's resolv.conf search]
    #[arg(
        long,
        value_name = "DOMAIN",
        value_delimiter = ',',
        help_heading = "Network plan"
    )]
    pub search: Option<Vec<String>>,
    /// DNS servers handed out by DHCP. Example: --dns 192.168.5.3 [default: dns-ip]
    #[arg(
        long,
        value_name = "IP",
        value_delimiter = ',',
        help_heading = "Network plan"
    )]
    pub dns: Option<Vec<Ipv4Addr>>,
    /// Static DHCP leases, as Lima passes them. Example: --leases 192.168.5.20=52:55:55:12:34:56
    #[arg(
        long,
        value_name = "IP=MAC",
        value_delimiter = ',',
        help_heading = "DHCP"
    )]
    pub leases: Option<Vec<StaticLease>>,
    /// Keep DHCP leases in this JSON file across restarts. Example: --lease-file /tmp/leases.json
    #[arg(long, value_name = "FILE", help_heading = "DHCP")]
    pub lease_file: Option<PathBuf>,

    /// A static DNS name: NAME=IP, or NAME=OTHERNAME for an alias (Lima hostResolver.hosts).
    /// Only the exact name is overridden. Repeatable. Example: --dns-host db.internal=192.168.5.2
    #[arg(long, value_name = "NAME=VALUE", help_heading = "DNS")]
    pub dns_host: Vec<String>,
    /// Answer AAAA queries (Lima hostResolver.ipv6). Example: --dns-ipv6=false
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set, help_heading = "DNS")]
    pub dns_ipv6: bool,
    /// Where queries go when the host's resolv.conf nameservers do not answer: IP or IP:PORT,
    /// repeatable. [default: 8.8.8.8, 1.1.1.1] Example: --dns-fallback 192.0.2.53
    #[arg(long, value_name = "ADDR", help_heading = "DNS")]
    pub dns_fallback: Vec<String>,
    /// Seconds before a query whose upstream does not answer gets SERVFAIL. Example: --dns-timeout 3
    #[arg(long, value_name = "SECS", default_value_t = 5, help_heading = "DNS")]
    pub dns_timeout: u64,
    /// Run no DNS server in the network (Lima hostResolver.enabled: false); DHCP hands out the
    /// --dns list instead. Example: --no-host-resolver --dns 192.0.2.53
    #[arg(long, help_heading = "DNS")]
    pub no_host_resolver: bool,

    /// Carry each connection to this host unix socket to a unix socket in the guest over SSH
    /// (gvproxy -forward-sock, Podman's API socket). Repeatable; the Nth --forward-dest,
    /// --forward-user and --forward-identity go with the Nth --forward-sock.
    /// Example: --forward-sock /tmp/podman.sock --forward-dest /run/podman/podman.sock
    /// --forward-user root --forward-identity ~/.ssh/id_ed25519 --forward-ssh 127.0.0.1:2222
    #[arg(long, value_name = "PATH", help_heading = "SSH socket forwarding")]
    pub forward_sock: Vec<PathBuf>,
    /// The guest socket path for the --forward-sock at the same position.
    #[arg(long, value_name = "PATH", help_heading = "SSH socket forwarding")]
    pub forward_dest: Vec<String>,
    /// The guest user for the --forward-sock at the same position (default root).
    #[arg(long, value_name = "USER", help_heading = "SSH socket forwarding")]
    pub forward_user: Vec<String>,
    /// The private key for the --forward-sock at the same position.
    #[arg(long, value_name = "FILE", help_heading = "SSH socket forwarding")]
    pub forward_identity: Vec<PathBuf>,
    /// Where the guest's sshd is reachable from usernet (the host side of a forward to the
    /// guest's port 22). Example: --forward-ssh 127.0.0.1:2222
    #[arg(long, value_name = "ADDR", help_heading = "SSH socket forwarding")]
    pub forward_ssh: Option<std::net::SocketAddr>,

    /// Serve the gvproxy-compatible HTTP API on this unix socket (mode 0600): leases,
    /// forwards, DNS names, stats, wait_port. Example: --api /tmp/usernet-api.sock
    #[arg(long, value_name = "PATH", help_heading = "Control")]
    pub api: Option<PathBuf>,
    /// Write every frame through the switch to this pcap file (readable while running).
    /// Example: --pcap /tmp/usernet.pcap
    #[arg(long, value_name = "FILE", help_heading = "Control")]
    pub pcap: Option<PathBuf>,
    /// Write the log here instead of standard error. Example: --log-file /tmp/usernet.log
    #[arg(long, value_name = "FILE", help_heading = "Control")]
    pub log_file: Option<PathBuf>,
    /// Write the daemon's pid here once serving; removed at exit. Example: --pid-file /tmp/usernet.pid
    #[arg(long, value_name = "FILE", help_heading = "Control")]
    pub pid_file: Option<PathBuf>,
    /// Write one byte to this inherited fd once serving, then close it (as slirp4netns
    /// --ready-fd). Example: --ready-fd 3
    #[arg(long, value_name = "N", help_heading = "Control")]
    pub ready_fd: Option<RawFd>,

    /// Forward a host port into the guest: [HOSTIP:]HOSTPORT[-END]:[GUESTIP:]GUESTPORT[-END][/tcp|/udp]
    /// (host address default 127.0.0.1, guest default the first DHCP lease). Repeatable.
    /// Example: -p 2222:22 -p 0.0.0.0:8080:192.168.5.15:80 -p 5353:53/udp
    #[arg(
        short = 'p',
        long = "publish",
        value_name = "SPEC",
        help_heading = "Port forwarding"
    )]
    pub publish: Vec<crate::forward::PortSpec>,

    /// Refuse traffic to the host address instead of carrying it to the host's 127.0.0.1
    /// (like slirp4netns --disable-host-loopback). Example: --no-host-loopback
    #[arg(long, help_heading = "Outbound")]
    pub no_host_loopback: bool,
    /// Another on-link address that stands for the host's loopback, besides the host address
    /// (gvproxy's plan has the gateway at .1 and the host at .254). Repeatable.
    /// Example: --host-alias 192.168.127.254
    #[arg(long, value_name = "IP", help_heading = "Outbound")]
    pub host_alias: Vec<Ipv4Addr>,
    /// Bind outgoing sockets to this host address (TCP ports are still chosen per
    /// destination at connect time). Example: --outbound-addr 10.0.0.5
    #[arg(long, value_name = "IP", help_heading = "Outbound")]
    pub outbound_addr: Option<Ipv4Addr>,
    /// Seconds a host-side TCP connect may take before the guest gets a RST.
    /// Example: --tcp-connect-timeout 10
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 30,
        help_heading = "Outbound"
    )]
    pub tcp_connect_timeout: u64,
    /// TCP connects in flight at most; more are refused. Example: --max-tcp-connecting 4096
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1024,
        help_heading = "Outbound"
    )]
    pub max_tcp_connecting: usize,
    /// Established TCP connections at most; more are refused. Example: --max-tcp-established 100000
    #[arg(
        long,
        value_name = "N",
        default_value_t = 65536,
        help_heading = "Outbound"
    )]
    pub max_tcp_established: usize,
    /// Guest-side TCP buffer per direction, in bytes (sets the window). Example: --tcp-buffer-size 1048576
    #[arg(long, value_name = "BYTES", default_value_t = 512 * 1024, help_heading = "Outbound")]
    pub tcp_buffer_size: usize,
    /// Seconds a UDP flow may stay idle (no traffic either way) before it is closed.
    /// Example: --udp-timeout 60
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 180,
        help_heading = "Outbound"
    )]
    pub udp_timeout: u64,
}

/// One transport to start, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportSpec {
    /// `--listen-qemu`
    ListenQemu(StreamAddr),
    /// `--connect-qemu`
    ConnectQemu(StreamAddr),
    /// `--listen-dgram`
    ListenDgram(PathBuf),
    /// `--listen-fd`
    ListenFd(PathBuf),
    /// `--fd`
    Fd(RawFd),
    /// `--tap-netns` with its `--tap`
    Tap {
        /// The namespace file.
        netns: PathBuf,
        /// The device name.
        name: String,
        /// Exchange large TCP segments with the kernel (virtio-net headers).
        offload: bool,
        /// The longest busy polling after a frame from the guest (zero: none).
        busy_poll: std::time::Duration,
        /// The device's queues, a thread each.
        queues: usize,
    },
}

impl Cli {
    /// The plan settings the flags give (every unset flag is `None`).
    pub fn plan_settings(&self) -> PlanSettings {
        PlanSettings {
            subnet: self.subnet,
            host_ip: self.host_ip,
            dns_ip: self.dns_ip,
            guest_ip: self.guest_ip,
            dhcp_start: self.dhcp_start,
            dhcp_end: self.dhcp_end,
            mtu: self.mtu,
            gateway_mac: self.gateway_mac,
            lease_time: self.lease_time,
            search: self.search.clone(),
            dns: self.dns.clone(),
            leases: self.leases.clone(),
        }
    }

    /// Every transport the flags name.
    pub fn transports(&self) -> Vec<TransportSpec> {
        let mut t = Vec::new();
        t.extend(
            self.listen_qemu
                .iter()
                .cloned()
                .map(TransportSpec::ListenQemu),
        );
        t.extend(
            self.connect_qemu
                .iter()
                .cloned()
                .map(TransportSpec::ConnectQemu),
        );
        t.extend(
            self.listen_dgram
                .iter()
                .cloned()
                .map(TransportSpec::ListenDgram),
        );
        t.extend(self.listen_fd.iter().cloned().map(TransportSpec::ListenFd));
        t.extend(self.fds.iter().copied().map(TransportSpec::Fd));
        for (i, netns) in self.tap_netns.iter().enumerate() {
            let name = self.tap.get(i).cloned().unwrap_or_else(|| "tap0".into());
            t.push(TransportSpec::Tap {
                netns: netns.clone(),
                name,
                offload: !self.no_offload,
                busy_poll: std::time::Duration::from_micros(self.busy_poll),
                queues: usize::from(self.tap_queues),
            });
        }
        t
    }

    /// Apply the outbound flags to a NAT configuration.
    pub fn apply_nat(&self, nat: &mut netstack::nat::NatConfig) {
        use std::time::Duration;
        nat.host_loopback = !self.no_host_loopback;
        nat.host_aliases = self.host_alias.clone();
        nat.outbound_addr = self.outbound_addr;
        nat.tcp_connect_timeout = Duration::from_secs(self.tcp_connect_timeout);
        nat.max_tcp_connecting = self.max_tcp_connecting;
        nat.max_tcp_established = self.max_tcp_established;
        nat.tcp_buffer = self.tcp_buffer_size;
        nat.udp_timeout = Duration::from_secs(self.udp_timeout);
    }

    /// The SSH socket forwards, checked: every --forward-sock needs its --forward-dest and
    /// --forward-identity, and --forward-ssh.
    pub fn sock_forwards(&self) -> Result<Vec<crate::sshforward::SockForward>, String> {
        if self.forward_sock.is_empty() {
            return Ok(Vec::new());
        }
        if self.forward_ssh.is_none() {
            return Err("forward-sock needs --forward-ssh (gvproxy: -ssh-port)".into());
        }
        self.forward_sock
            .iter()
            .enumerate()
            .map(|(i, local)| {
                let dest = self.forward_dest.get(i).cloned().ok_or_else(|| {
                    format!("forward-sock {} has no --forward-dest", local.display())
                })?;
                let identity = self.forward_identity.get(i).cloned().ok_or_else(|| {
                    format!("forward-sock {} has no --forward-identity", local.display())
                })?;
                Ok(crate::sshforward::SockForward {
                    local: local.clone(),
                    dest,
                    user: self
                        .forward_user
                        .get(i)
                        .cloned()
                        .unwrap_or_else(|| "root".into()),
                    identity,
                })
            })
            .collect()
    }

    /// The DNS server's configuration, or `None` with --no-host-resolver.
    pub fn dns_config(&self, host_ip: Ipv4Addr) -> Result<Option<dns::DnsConfig>, String> {
        if self.no_host_resolver {
            return Ok(None);
        }
        let mut c = dns::DnsConfig {
            host_ip,
            ipv6: self.dns_ipv6,
            timeout: std::time::Duration::from_secs(self.dns_timeout.max(1)),
            ..dns::DnsConfig::default()
        };
        for entry in &self.dns_host {
            let (name, value) = entry
                .split_once('=')
                .filter(|(n, v)| !n.is_empty() && !v.is_empty())
                .ok_or_else(|| format!("dns-host {entry:?} is not NAME=IP or NAME=ALIAS"))?;
            c.static_names
                .push((name.to_string(), dns::StaticTarget::parse(value)));
        }
        if !self.dns_fallback.is_empty() {
            c.fallback = self
                .dns_fallback
                .iter()
                .map(|a| {
                    a.parse::<std::net::SocketAddr>()
                        .or_else(|_| a.parse::<std::net::IpAddr>().map(|ip| (ip, 53).into()))
                        .map_err(|_| format!("dns-fallback {a} is not IP or IP:PORT"))
                })
                .collect::<Result<_, _>>()?;
        }
        Ok(Some(c))
    }

    /// How to attach a VM, for `usernet` run with no transport.
    pub fn attach_help() -> &'static str {
        ATTACH_HELP
    }
}
