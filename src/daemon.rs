//! The daemon: from parsed flags to a running network. Builds the [`Plan`] (defaults < YAML <
//! flags), starts the switch, the gateway and every transport, and on SIGTERM/SIGINT stops,
//! writes the lease file and removes the sockets it created.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use crate::cli::{Cli, TransportSpec};
use crate::config;
use crate::gateway::{self, GatewaySetup};
use crate::plan::{Plan, PlanSettings};
use crate::switch::Switch;
use crate::transport::{dgram, fd, fdpass, stream, tap};

/// A configuration error: reported in one line, exit status 2, nothing started.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// The plan the flags (and the file they name) ask for.
pub fn plan_from(cli: &Cli) -> Result<Plan, ConfigError> {
    let mut settings = PlanSettings::default();
    if let Some(path) = &cli.config {
        let file = config::load_file(path, cli.network.as_deref())
            .map_err(|e| ConfigError(e.to_string()))?;
        settings = settings.merge(file);
    } else if let Some(name) = &cli.network {
        return Err(ConfigError(format!(
            "network {name:?} needs --config FILE (a Lima networks.yaml)"
        )));
    }
    let settings = settings.merge(cli.plan_settings());
    let mut plan = Plan::resolve(settings, &config::host_search_domains())
        .map_err(|e| ConfigError(e.to_string()))?;
    if cli.no_host_resolver && cli.dns.is_none() {
        // No DNS server in the network, and none named: DHCP hands out none.
        plan.dns_servers.clear();
    }
    for &alias in &cli.host_alias {
        let in_pool = u32::from(plan.pool_start) <= u32::from(alias)
            && u32::from(alias) <= u32::from(plan.pool_end);
        if !plan.subnet.contains(&alias) || in_pool || alias == plan.guest_ip {
            return Err(ConfigError(format!(
                "host-alias {alias} must be inside {} and outside the DHCP pool {}-{}",
                plan.subnet, plan.pool_start, plan.pool_end
            )));
        }
    }
    Ok(plan)
}

/// Everything `run` needs besides the plan.
#[derive(Debug, Default)]
pub struct Options {
    /// The transports to start.
    pub transports: Vec<TransportSpec>,
    /// `--lease-file`
    pub lease_file: Option<PathBuf>,
    /// The NAT's settings (from the plan and the outbound flags).
    pub nat: Option<netstack::nat::NatConfig>,
    /// Host ports to forward into the guest.
    pub forwards: Vec<crate::forward::Forward>,
    /// `--api`
    pub api: Option<PathBuf>,
    /// `--pcap`
    pub pcap: Option<PathBuf>,
    /// `--pid-file`
    pub pid_file: Option<PathBuf>,
    /// `--ready-fd`
    pub ready_fd: Option<std::os::fd::RawFd>,
    /// The DNS server's configuration (`None`: no DNS server, `--no-host-resolver`).
    pub dns: Option<dns::DnsConfig>,
    /// Host unix sockets carried to guest unix sockets over SSH, and where sshd is.
    pub sock_forwards: Vec<crate::sshforward::SockForward>,
    /// Where the guest's sshd is reachable (`--forward-ssh`).
    pub forward_ssh: Option<std::net::SocketAddr>,
}

/// Take the config file's `hosts:` and `publish:` sections into the flags (the file's entries
/// first; flags add to them).
pub fn apply_config_extras(cli: &mut Cli) -> Result<(), ConfigError> {
    let Some(path) = cli.config.clone() else {
        return Ok(());
    };
    let extras = config::load_extras(&path).map_err(|e| ConfigError(e.to_string()))?;
    let mut hosts = extras.dns_hosts;
    hosts.append(&mut cli.dns_host);
    cli.dns_host = hosts;
    let mut publish = extras
        .publish
        .iter()
        .map(|p| {
            p.parse::<crate::forward::PortSpec>()
                .map_err(|e| ConfigError(format!("{}: publish: {e}", path.display())))
        })
        .collect::<Result<Vec<_>, _>>()?;
    publish.append(&mut cli.publish);
    cli.publish = publish;
    Ok(())
}

/// Everything besides the plan that the flags ask for.
pub fn options_from(cli: &Cli, plan: &Plan) -> Result<Options, ConfigError> {
    let mut nat = gateway::nat_config(plan);
    cli.apply_nat(&mut nat);
    let dns = cli.dns_config(plan.host_ip).map_err(ConfigError)?;
    Ok(Options {
        dns,
        sock_forwards: cli.sock_forwards().map_err(ConfigError)?,
        forward_ssh: cli.forward_ssh,
        transports: cli.transports(),
        lease_file: cli.lease_file.clone(),
        nat: Some(nat),
        forwards: cli
            .publish
            .iter()
            .flat_map(|p| p.0.iter().copied())
            .collect(),
        api: cli.api.clone(),
        pcap: cli.pcap.clone(),
        pid_file: cli.pid_file.clone(),
        ready_fd: cli.ready_fd,
    })
}

/// The DHCP server for `plan`, with the leases saved in `lease_file` restored.
pub fn dhcp_server(
    plan: &Plan,
    lease_file: Option<&std::path::Path>,
) -> Result<dhcp::Server, ConfigError> {
    let saved = match lease_file {
        Some(p) => dhcp::store::load(p)
            .map_err(|e| ConfigError(format!("lease-file {}: {e}", p.display())))?,
        None => Vec::new(),
    };
    dhcp::Server::new(gateway::dhcp_config(plan), saved).map_err(|e| ConfigError(e.to_string()))
}

/// Run the network until SIGTERM or SIGINT.
pub async fn run(plan: Plan, dhcp: dhcp::Server, opts: Options) -> anyhow::Result<()> {
    let switch = Switch::new(plan.mtu);
    let mut nat = opts
        .nat
        .clone()
        .unwrap_or_else(|| gateway::nat_config(&plan));
    let dns = match &opts.dns {
        Some(config) => {
            let server =
                dns::DnsServer::new(config.clone()).map_err(|e| anyhow::anyhow!("dns: {e}"))?;
            // DNS over TCP: the NAT carries the guest's connections to the DNS address's port
            // 53 to this listener on our own loopback.
            let listener =
                tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
            if let std::net::SocketAddr::V4(a) = listener.local_addr()? {
                nat.dns_tcp = Some(a);
            }
            let tcp = server.clone();
            tokio::spawn(async move { tcp.serve_tcp(listener).await });
            Some(server)
        }
        None => None,
    };
    if let Some(path) = &opts.pcap {
        switch.capture_to(crate::pcap::Capture::start(path)?);
    }
    let gw = gateway::start(
        &switch,
        &plan,
        GatewaySetup {
            dhcp,
            lease_file: opts.lease_file.clone(),
            nat,
            dns: dns.clone(),
        },
    );
    let forwarder = crate::forward::Forwarder::new(gw.nat().clone(), gw.leases());
    for f in &opts.forwards {
        forwarder.add(*f)?;
    }
    let mut created: Vec<PathBuf> = Vec::new();
    let started = start_transports(&switch, &plan, &opts.transports, gw.nat(), &mut created).await;
    if let Err(e) = started {
        remove_all(&created);
        return Err(e);
    }
    if let Some(path) = &opts.api {
        let listener = match crate::api::bind(path) {
            Ok(l) => l,
            Err(e) => {
                remove_all(&created);
                return Err(e.context(format!("api {}", path.display())));
            }
        };
        created.push(path.clone());
        let control = Arc::new(crate::control::Control {
            switch: Arc::clone(&switch),
            gateway: gw.probe(),
            leases: gw.leases(),
            forwarder: Arc::clone(&forwarder),
            zones: Default::default(),
            on_zone: Box::new(move |zone| {
                if let Some(dns) = &dns {
                    let records: Vec<(String, std::net::IpAddr)> = zone
                        .records
                        .iter()
                        .map(|r| (r.name.clone(), r.ip.into()))
                        .collect();
                    dns.add_names(&zone.name, &records);
                }
            }),
        });
        tokio::spawn(async move {
            if let Err(e) = crate::api::serve(listener, control).await {
                tracing::warn!("api: {e}");
            }
        });
    }
    if let Some(ssh) = opts.forward_ssh {
        for f in opts.sock_forwards.iter().cloned() {
            created.push(f.local.clone());
            tokio::spawn(async move {
                if let Err(e) = crate::sshforward::serve(f, ssh).await {
                    tracing::warn!("{e:#}");
                }
            });
        }
    }
    if let Some(path) = &opts.pid_file {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .with_context(|| format!("pid-file {}", path.display()))?;
        created.push(path.clone());
    }
    if let Some(fd) = opts.ready_fd {
        signal_ready(fd);
    }
    tracing::info!(
        "usernet serving {} (host {}, dns {}, first guest {}, mtu {})",
        plan.subnet,
        plan.host_ip,
        plan.dns_ip,
        plan.guest_ip,
        plan.mtu
    );
    wait_for_stop(&switch, &gw).await?;
    tracing::info!("stopping");
    let saved = gw.shutdown().await;
    remove_all(&created);
    saved
}

async fn start_transports(
    switch: &std::sync::Arc<Switch>,
    plan: &Plan,
    specs: &[TransportSpec],
    nat: &netstack::nat::Nat,
    created: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    for spec in specs {
        match spec {
            TransportSpec::ListenQemu(addr) => created.extend(stream::listen(switch, addr).await?),
            TransportSpec::ConnectQemu(addr) => stream::connect(switch, addr.clone()),
            TransportSpec::ListenDgram(path) => created.push(dgram::listen(switch, path)?),
            TransportSpec::ListenFd(path) => created.push(fdpass::listen(switch, path)?),
            TransportSpec::Fd(n) => {
                // SAFETY: F_GETFD only asks whether the number is an open fd.
                if unsafe { libc::fcntl(*n, libc::F_GETFD) } < 0 {
                    anyhow::bail!("fd {n} is not an open file descriptor");
                }
                // SAFETY: the fd is open and was handed to us to own (`--fd N`).
                let owned = unsafe { OwnedFd::from_raw_fd(*n) };
                fd::adopt(switch, owned, format!("fd {n}")).with_context(|| format!("fd {n}"))?;
            }
            TransportSpec::Tap {
                netns,
                name,
                offload,
                busy_poll,
                queues,
            } => {
                if let Some(workers) =
                    tap::start(switch, netns, name, plan.mtu, *offload, *busy_poll, *queues)?
                {
                    nat.add_workers(workers);
                }
            }
        }
    }
    Ok(())
}

/// Tell the parent we are serving: one byte on its fd, then close it.
fn signal_ready(fd: std::os::fd::RawFd) {
    // SAFETY: F_GETFD only asks whether the number is an open fd.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        tracing::warn!("ready-fd {fd} is not open");
        return;
    }
    // SAFETY: the fd is open and was handed to us to own (`--ready-fd N`).
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    use std::io::Write;
    if let Err(e) = file.write_all(b"1") {
        tracing::warn!("ready-fd {fd}: {e}");
    }
}

fn remove_all(paths: &[PathBuf]) {
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
}

/// Wait for SIGTERM or SIGINT; on SIGUSR1 write the counters to the log as one line,
/// `usernet stats: {JSON}`.
async fn wait_for_stop(switch: &Switch, gw: &gateway::GatewayHandle) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = usr1.recv() => {
                let stats = crate::stats::collect(switch, &gw.probe()).await;
                eprintln!("usernet stats: {stats}");
            }
        }
    }
}
