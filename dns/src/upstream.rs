//! The host's resolver configuration: resolv.conf read into a hickory resolver (for CNAME, TXT,
//! NS, MX, SRV) and the list of servers forwarded queries go to. Re-read when the file changes
//! (checked at most every 2 s, on use), so a host that changes networks is followed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use hickory_proto::rr::Name;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;

const RECHECK: Duration = Duration::from_secs(2);

/// What resolv.conf said (the parts we use).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ResolvConf {
    pub nameservers: Vec<SocketAddr>,
    pub search: Vec<String>,
    pub ndots: usize,
    pub timeout: Duration,
    pub attempts: usize,
    pub edns0: bool,
}

pub(crate) fn parse_resolv_conf(data: &[u8]) -> ResolvConf {
    let (conf, errors) = resolv_conf::Config::parse_with_errors(data);
    for e in errors {
        tracing::debug!("dns: resolv.conf: {e}");
    }
    ResolvConf {
        nameservers: conf
            .nameservers
            .iter()
            .map(|ip| SocketAddr::new(ip.into(), 53))
            .collect(),
        search: conf
            .get_last_search_or_domain()
            .filter(|s| s.as_str() != "--")
            .cloned()
            .collect(),
        ndots: conf.ndots as usize,
        timeout: Duration::from_secs(u64::from(conf.timeout.max(1))),
        attempts: (conf.attempts as usize).max(1),
        edns0: conf.edns0,
    }
}

/// The upstream side built from one reading of resolv.conf.
pub(crate) struct Upstreams {
    /// For CNAME, TXT, NS, MX, SRV: resolv.conf nameservers (or the override, or the
    /// fallback list when there are none), its search list and options.
    pub resolver: Option<TokioResolver>,
    /// Forwarded queries go to these in order: nameservers, then the fallback list.
    pub forward: Vec<SocketAddr>,
}

fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn build(
    path: &Path,
    override_ns: &[SocketAddr],
    fallback: &[SocketAddr],
    bound: Duration,
) -> Upstreams {
    let conf = match std::fs::read(path) {
        Ok(data) => parse_resolv_conf(&data),
        Err(e) => {
            tracing::warn!(
                "dns: cannot read {}: {e}; using the fallback servers only",
                path.display()
            );
            ResolvConf::default()
        }
    };
    let nameservers: Vec<SocketAddr> = if override_ns.is_empty() {
        conf.nameservers.clone()
    } else {
        override_ns.to_vec()
    };
    let mut forward = nameservers.clone();
    for f in fallback {
        if !forward.contains(f) {
            forward.push(*f);
        }
    }
    let resolver_ns = if nameservers.is_empty() {
        fallback.to_vec()
    } else {
        nameservers
    };
    let resolver = if resolver_ns.is_empty() {
        None
    } else {
        let servers = resolver_ns
            .iter()
            .map(|sa| {
                let mut udp = ConnectionConfig::udp();
                udp.port = sa.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = sa.port();
                NameServerConfig::new(sa.ip(), true, vec![udp, tcp])
            })
            .collect();
        let search = conf
            .search
            .iter()
            .filter_map(|s| Name::from_str(s).ok())
            .map(|mut n| {
                n.set_fqdn(true);
                n
            })
            .collect();
        let config = ResolverConfig::from_parts(None, search, servers);
        let mut opts = ResolverOpts::default();
        opts.ndots = conf.ndots;
        // resolv.conf's per-try timeout, but never beyond our own bound.
        opts.timeout = if conf.timeout.is_zero() {
            bound
        } else {
            conf.timeout.min(bound)
        };
        opts.attempts = conf.attempts.max(1);
        opts.edns0 = true;
        opts.use_hosts_file = hickory_resolver::config::ResolveHosts::Never;
        // Many guest queries at once must not be refused as "busy".
        opts.max_active_requests = 4096;
        opts.preserve_intermediates = true;
        opts.try_tcp_on_error = true;
        let mut b = hickory_resolver::Resolver::builder_with_config(
            config,
            TokioRuntimeProvider::default(),
        );
        *b.options_mut() = opts;
        match b.build() {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!("dns: cannot build the resolver: {e}");
                None
            }
        }
    };
    tracing::info!(
        resolv_conf = %path.display(),
        ?forward,
        search = ?conf.search,
        ndots = conf.ndots,
        "dns: upstream configuration loaded"
    );
    Upstreams { resolver, forward }
}

struct State {
    current: Arc<Upstreams>,
    stamp: Option<(SystemTime, u64)>,
}

/// The current upstreams, rebuilt when resolv.conf changes.
pub(crate) struct UpstreamSource {
    path: PathBuf,
    override_ns: Vec<SocketAddr>,
    fallback: Vec<SocketAddr>,
    bound: Duration,
    state: RwLock<State>,
    checked: Mutex<Instant>,
}

impl UpstreamSource {
    pub fn new(
        path: PathBuf,
        override_ns: Vec<SocketAddr>,
        fallback: Vec<SocketAddr>,
        bound: Duration,
    ) -> UpstreamSource {
        let stamp = file_stamp(&path);
        let current = Arc::new(build(&path, &override_ns, &fallback, bound));
        UpstreamSource {
            path,
            override_ns,
            fallback,
            bound,
            state: RwLock::new(State { current, stamp }),
            checked: Mutex::new(Instant::now()),
        }
    }

    pub fn get(&self) -> Arc<Upstreams> {
        let due = {
            let mut c = self.checked.lock().unwrap_or_else(|e| e.into_inner());
            if c.elapsed() >= RECHECK {
                *c = Instant::now();
                true
            } else {
                false
            }
        };
        if due {
            let stamp = file_stamp(&self.path);
            let changed = self.state.read().unwrap_or_else(|e| e.into_inner()).stamp != stamp;
            if changed {
                let fresh = Arc::new(build(
                    &self.path,
                    &self.override_ns,
                    &self.fallback,
                    self.bound,
                ));
                let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
                st.current = fresh;
                st.stamp = stamp;
            }
        }
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .current
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nameservers_search_options() {
        let c = parse_resolv_conf(
            b"# comment\nnameserver 127.0.0.1\nnameserver ::1\nsearch a.test b.test\noptions ndots:2 timeout:1 attempts:3\n",
        );
        assert_eq!(
            c.nameservers,
            vec!["127.0.0.1:53".parse().unwrap(), "[::1]:53".parse().unwrap()]
        );
        assert_eq!(c.search, vec!["a.test".to_string(), "b.test".to_string()]);
        assert_eq!(c.ndots, 2);
        assert_eq!(c.timeout, Duration::from_secs(1));
        assert_eq!(c.attempts, 3);
    }

    #[test]
    fn empty_conf_has_no_nameservers() {
        let c = parse_resolv_conf(b"");
        assert!(c.nameservers.is_empty());
        assert_eq!(c.ndots, 1);
    }
}
