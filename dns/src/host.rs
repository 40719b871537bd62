//! A and AAAA from the host's native resolver: libc `getaddrinfo` on a blocking thread.
//!
//! At most `max_host_lookups` calls run at once (each occupies a tokio blocking thread); the
//! rest wait for a permit. The caller bounds the wait and the call with its deadline; a call
//! that outlives it keeps its permit until libc returns, so the cap holds even for hung lookups.
//! getaddrinfo reports no TTL and no CNAME chain: answers carry the question name and
//! `LOCAL_TTL`.

use std::net::IpAddr;
use std::sync::Arc;

use dns_lookup::{AddrInfoHints, LookupErrorKind};
use tokio::sync::Semaphore;

/// The family asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    V4,
    V6,
}

/// What getaddrinfo said about a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostAnswer {
    /// Addresses of the asked family (never empty).
    Addrs(Vec<IpAddr>),
    /// The name exists but has no address of that family.
    NoData,
    /// The name does not exist.
    NxDomain,
    /// The lookup failed (temporary failure, system error).
    Failed(String),
}

pub(crate) struct HostResolver {
    permits: Arc<Semaphore>,
}

impl HostResolver {
    pub fn new(max_lookups: usize) -> HostResolver {
        HostResolver {
            permits: Arc::new(Semaphore::new(max_lookups.max(1))),
        }
    }

    /// Looks `name` (no final dot: the host's search list applies as for any host program)
    /// up for `family`. Not bounded in time here: the caller wraps it in its deadline.
    pub async fn lookup(&self, name: String, family: Family) -> HostAnswer {
        let permit = match self.permits.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => return HostAnswer::Failed("lookup pool closed".into()),
        };
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            lookup_blocking(&name, family)
        });
        match task.await {
            Ok(a) => a,
            Err(e) => HostAnswer::Failed(format!("lookup thread failed: {e}")),
        }
    }
}

fn gai(name: &str, family: i32) -> Result<Vec<IpAddr>, (LookupErrorKind, String)> {
    let hints = AddrInfoHints {
        // No AI_ADDRCONFIG: the guest's families are not the host's.
        flags: 0,
        address: family,
        socktype: libc::SOCK_STREAM,
        protocol: 0,
    };
    match dns_lookup::getaddrinfo(Some(name), None, Some(hints)) {
        Ok(iter) => {
            let mut out: Vec<IpAddr> = Vec::new();
            for ai in iter.flatten() {
                let ip = ai.sockaddr.ip();
                if !out.contains(&ip) {
                    out.push(ip);
                }
            }
            Ok(out)
        }
        Err(e) => {
            let kind = e.kind();
            let io: std::io::Error = e.into();
            Err((kind, io.to_string()))
        }
    }
}

fn lookup_blocking(name: &str, family: Family) -> HostAnswer {
    let (af, other) = match family {
        Family::V4 => (libc::AF_INET, libc::AF_INET6),
        Family::V6 => (libc::AF_INET6, libc::AF_INET),
    };
    let want = |ip: &IpAddr| match family {
        Family::V4 => ip.is_ipv4(),
        Family::V6 => ip.is_ipv6(),
    };
    match gai(name, af) {
        Ok(addrs) => {
            let addrs: Vec<IpAddr> = addrs.into_iter().filter(want).collect();
            if addrs.is_empty() {
                HostAnswer::NoData
            } else {
                HostAnswer::Addrs(addrs)
            }
        }
        Err((LookupErrorKind::NoData, _)) => HostAnswer::NoData,
        Err((LookupErrorKind::NoName, _)) => {
            // glibc says EAI_NONAME also when only the other family exists (a name from
            // /etc/hosts with one family): then the name exists and the answer is empty.
            match gai(name, other) {
                Ok(a) if !a.is_empty() => HostAnswer::NoData,
                Err((LookupErrorKind::NoData, _)) => HostAnswer::NoData,
                Err((LookupErrorKind::Again | LookupErrorKind::Fail, msg)) => {
                    HostAnswer::Failed(msg)
                }
                _ => HostAnswer::NxDomain,
            }
        }
        Err((_, msg)) => HostAnswer::Failed(msg),
    }
}
