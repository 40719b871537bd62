//! The answer pipeline: one query in, one answer (or nothing) out, within the time bound.
//!
//! Order: static names (following static aliases), then by type: A/AAAA via getaddrinfo,
//! CNAME/TXT/NS/MX/SRV via the resolv.conf resolver, everything else forwarded unchanged.

use std::net::IpAddr;
use std::time::Instant;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use tokio::sync::Semaphore;

use crate::forward::forward;
use crate::host::{Family, HostAnswer, HostResolver};
use crate::names::{key_of, Names, Target};
use crate::stats::{bump, Counters};
use crate::upstream::UpstreamSource;
use crate::wire::{self, Incoming};
use crate::{DnsConfig, DnsError, LOCAL_TTL};

use hickory_resolver::net::{DnsError as HickoryDnsError, NetError};

/// How many static aliases a chain may follow.
const MAX_ALIASES: usize = 8;
/// Forwarded queries in flight at once (each holds a socket); more wait within the bound.
const MAX_FORWARDS: usize = 1024;

/// How an answer came about.
enum Outcome {
    /// Built from static names only.
    Local(Message),
    /// Built from getaddrinfo or the resolver.
    Host(Message),
    /// Forwarded, upstream bytes with the client's ID.
    Forwarded(Vec<u8>),
    /// Built from a forwarded answer (after a static alias).
    ForwardedBuilt(Message),
    /// SERVFAIL, with why (for the debug log).
    Fail(String),
}

/// What one name/type lookup found (below the static names).
enum Sub {
    Records {
        rcode: ResponseCode,
        answers: Vec<Record>,
        authorities: Vec<Record>,
        forwarded: bool,
    },
    Raw(Vec<u8>),
    Fail(String),
}

pub(crate) struct Inner {
    pub names: Names,
    pub stats: Counters,
    host: HostResolver,
    upstreams: UpstreamSource,
    ipv6: bool,
    host_resolver: bool,
    timeout: std::time::Duration,
    forwards: Semaphore,
    /// UDP queries being answered at once ([`crate::serve::MAX_UDP_IN_FLIGHT`]).
    pub udp_in_flight: std::sync::Arc<Semaphore>,
}

impl Inner {
    /// A permit to answer one more UDP query, or `None` (the query counted as dropped) when
    /// [`crate::serve::MAX_UDP_IN_FLIGHT`] are being answered already.
    pub fn udp_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let permit = self.udp_in_flight.clone().try_acquire_owned().ok();
        if permit.is_none() {
            bump(&self.stats.queries_udp);
            bump(&self.stats.dropped);
        }
        permit
    }

    pub fn new(config: DnsConfig) -> Result<Inner, DnsError> {
        if config.timeout.is_zero() {
            return Err(DnsError::InvalidSetting {
                field: "timeout",
                reason: "must be more than 0".into(),
            });
        }
        if config.max_host_lookups == 0 {
            return Err(DnsError::InvalidSetting {
                field: "max_host_lookups",
                reason: "must be at least 1".into(),
            });
        }
        let names = Names::from_config(config.host_ip, &config.static_names)?;
        Ok(Inner {
            names,
            stats: Counters::default(),
            host: HostResolver::new(config.max_host_lookups),
            upstreams: UpstreamSource::new(
                config.resolv_conf,
                config.nameservers,
                config.fallback,
                config.timeout,
            ),
            ipv6: config.ipv6,
            host_resolver: config.host_resolver,
            timeout: config.timeout,
            forwards: Semaphore::new(MAX_FORWARDS),
            udp_in_flight: std::sync::Arc::new(Semaphore::new(crate::serve::MAX_UDP_IN_FLIGHT)),
        })
    }

    pub async fn answer_udp(&self, query: &[u8], max_udp: usize) -> Option<Vec<u8>> {
        bump(&self.stats.queries_udp);
        self.answer(query, Some(max_udp)).await
    }

    pub async fn answer_tcp(&self, query: &[u8]) -> Option<Vec<u8>> {
        bump(&self.stats.queries_tcp);
        self.answer(query, None).await
    }

    /// `max_udp`: Some(what the transport carries) for UDP, None for TCP.
    async fn answer(&self, bytes: &[u8], max_udp: Option<usize>) -> Option<Vec<u8>> {
        let req = match wire::classify(bytes) {
            Incoming::Drop => {
                bump(&self.stats.dropped);
                return None;
            }
            Incoming::Refuse(resp, code) => {
                if code == ResponseCode::FormErr {
                    bump(&self.stats.formerr);
                }
                return Some(resp);
            }
            Incoming::Query(m) => m,
        };
        let limit = match max_udp {
            Some(m) => wire::udp_limit(&req, m),
            None => wire::TCP_MAX,
        };
        let deadline = Instant::now() + self.timeout;
        let outcome = match tokio::time::timeout(
            self.timeout,
            self.resolve(&req, bytes, max_udp.is_none(), deadline),
        )
        .await
        {
            Ok(o) => o,
            Err(_) => Outcome::Fail(format!("no answer within {:?}", self.timeout)),
        };
        let (out, truncated) = match outcome {
            Outcome::Local(m) => {
                bump(&self.stats.answered_local);
                self.encode(&req, &m, limit)
            }
            Outcome::Host(m) => {
                bump(&self.stats.answered_host);
                self.encode(&req, &m, limit)
            }
            Outcome::ForwardedBuilt(m) => {
                bump(&self.stats.forwarded);
                self.encode(&req, &m, limit)
            }
            Outcome::Forwarded(raw) => {
                bump(&self.stats.forwarded);
                wire::fit(raw, limit)
            }
            Outcome::Fail(why) => {
                tracing::debug!(query = %req.queries[0], "dns: SERVFAIL: {why}");
                bump(&self.stats.servfail);
                self.encode(&req, &wire::servfail(&req), limit)
            }
        };
        if truncated {
            bump(&self.stats.truncated);
        }
        Some(out)
    }

    fn encode(&self, req: &Message, m: &Message, limit: usize) -> (Vec<u8>, bool) {
        match wire::encode(m, limit) {
            Some(r) => r,
            None => {
                bump(&self.stats.servfail);
                let sf = wire::servfail(req);
                let mut bare = sf.to_vec().unwrap_or_default();
                if bare.len() > limit || bare.is_empty() {
                    bare = wire::encode(&sf, limit).map(|r| r.0).unwrap_or_default();
                }
                (bare, false)
            }
        }
    }

    async fn resolve(
        &self,
        req: &Message,
        raw: &[u8],
        client_tcp: bool,
        deadline: Instant,
    ) -> Outcome {
        let q = &req.queries[0];
        let qtype = q.query_type();
        if q.query_class() != DNSClass::IN {
            return self.forward_raw(raw, client_tcp, deadline).await;
        }
        if qtype == RecordType::AAAA && !self.ipv6 {
            return Outcome::Local(wire::answer(req, ResponseCode::NoError, vec![], vec![]));
        }
        // Static names, following static aliases.
        let mut chain: Vec<Record> = Vec::new();
        let mut current = q.name().clone();
        let mut hops = 0;
        while let Some(targets) = self.names.lookup(&key_of(&current)) {
            let alias = targets.iter().find_map(|t| match t {
                Target::Alias(a) => Some(a.clone()),
                Target::Ip(_) => None,
            });
            if let Some(alias) = alias {
                chain.push(Record::from_rdata(
                    current.clone(),
                    LOCAL_TTL,
                    RData::CNAME(CNAME(alias.clone())),
                ));
                if qtype == RecordType::CNAME {
                    return Outcome::Local(wire::answer(req, ResponseCode::NoError, chain, vec![]));
                }
                hops += 1;
                if hops > MAX_ALIASES {
                    return Outcome::Fail("static alias loop".into());
                }
                current = alias;
                continue;
            }
            let records = targets
                .iter()
                .filter_map(|t| match (t, qtype) {
                    (Target::Ip(IpAddr::V4(ip)), RecordType::A | RecordType::ANY) => {
                        Some(RData::A(A(*ip)))
                    }
                    (Target::Ip(IpAddr::V6(ip)), RecordType::AAAA) => Some(RData::AAAA(AAAA(*ip))),
                    (Target::Ip(IpAddr::V6(ip)), RecordType::ANY) if self.ipv6 => {
                        Some(RData::AAAA(AAAA(*ip)))
                    }
                    _ => None,
                })
                .map(|d| Record::from_rdata(current.clone(), LOCAL_TTL, d));
            chain.extend(records);
            return Outcome::Local(wire::answer(req, ResponseCode::NoError, chain, vec![]));
        }
        let via_alias = !chain.is_empty();
        let sub = self
            .lookup(
                req,
                &current,
                qtype,
                (!via_alias).then_some(raw),
                client_tcp,
                deadline,
            )
            .await;
        match sub {
            Sub::Raw(bytes) => Outcome::Forwarded(bytes),
            Sub::Fail(why) => Outcome::Fail(why),
            Sub::Records {
                rcode,
                answers,
                authorities,
                forwarded,
            } => {
                chain.extend(answers);
                let m = wire::answer(req, rcode, chain, authorities);
                if forwarded {
                    Outcome::ForwardedBuilt(m)
                } else {
                    Outcome::Host(m)
                }
            }
        }
    }

    async fn forward_raw(&self, raw: &[u8], client_tcp: bool, deadline: Instant) -> Outcome {
        let _permit = match self.forwards.acquire().await {
            Ok(p) => p,
            Err(_) => return Outcome::Fail("forwarder closed".into()),
        };
        let ups = self.upstreams.get();
        match forward(raw, &ups.forward, deadline, client_tcp).await {
            Ok(b) => Outcome::Forwarded(b),
            Err(e) => Outcome::Fail(format!("forwarding failed: {e}")),
        }
    }

    /// Looks `name`/`qtype` up below the static names. `raw` is the client's query when it
    /// can be forwarded as is (no static alias in front).
    async fn lookup(
        &self,
        req: &Message,
        name: &Name,
        qtype: RecordType,
        raw: Option<&[u8]>,
        client_tcp: bool,
        deadline: Instant,
    ) -> Sub {
        let key = key_of(name);
        let family = match qtype {
            RecordType::A => Some(Family::V4),
            RecordType::AAAA => Some(Family::V6),
            _ => None,
        };
        // getaddrinfo would answer an address literal with itself, and the root has no host.
        let hostlike = !key.is_empty() && key.parse::<IpAddr>().is_err();
        if let (Some(family), true, true) = (family, self.host_resolver, hostlike) {
            return self.lookup_host(name, key, family).await;
        }
        // The root (". NS", a priming query) has no relative form for the search list.
        if !key.is_empty()
            && matches!(
                qtype,
                RecordType::CNAME
                    | RecordType::TXT
                    | RecordType::NS
                    | RecordType::MX
                    | RecordType::SRV
            )
        {
            let ups = self.upstreams.get();
            if let Some(resolver) = &ups.resolver {
                return lookup_resolver(resolver, name, qtype).await;
            }
        }
        // Forward.
        let _permit = match self.forwards.acquire().await {
            Ok(p) => p,
            Err(_) => return Sub::Fail("forwarder closed".into()),
        };
        let ups = self.upstreams.get();
        match raw {
            Some(raw) => match forward(raw, &ups.forward, deadline, client_tcp).await {
                Ok(b) => Sub::Raw(b),
                Err(e) => Sub::Fail(format!("forwarding failed: {e}")),
            },
            None => {
                // After a static alias: ask for the target, keep the upstream's sections.
                let mut m = Message::new(rand::random(), MessageType::Query, OpCode::Query);
                m.metadata.recursion_desired = req.metadata.recursion_desired;
                m.metadata.checking_disabled = req.metadata.checking_disabled;
                let mut query = Query::query(name.clone(), qtype);
                query.set_query_class(DNSClass::IN);
                m.add_query(query);
                if let Some(e) = &req.edns {
                    m.set_edns(e.clone());
                }
                let Ok(bytes) = m.to_vec() else {
                    return Sub::Fail("cannot encode the alias query".into());
                };
                match forward(&bytes, &ups.forward, deadline, true).await {
                    Ok(b) => match Message::from_vec(&b) {
                        Ok(r) => Sub::Records {
                            rcode: r.metadata.response_code,
                            answers: r.answers,
                            authorities: r.authorities,
                            forwarded: true,
                        },
                        Err(e) => Sub::Fail(format!("unparsable upstream answer: {e}")),
                    },
                    Err(e) => Sub::Fail(format!("forwarding failed: {e}")),
                }
            }
        }
    }

    async fn lookup_host(&self, name: &Name, key: String, family: Family) -> Sub {
        let (rcode, answers) = match self.host.lookup(key, family).await {
            HostAnswer::Addrs(addrs) => (
                ResponseCode::NoError,
                addrs
                    .into_iter()
                    .map(|ip| {
                        let data = match ip {
                            IpAddr::V4(v4) => RData::A(A(v4)),
                            IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
                        };
                        Record::from_rdata(name.clone(), LOCAL_TTL, data)
                    })
                    .collect(),
            ),
            HostAnswer::NoData => (ResponseCode::NoError, vec![]),
            HostAnswer::NxDomain => (ResponseCode::NXDomain, vec![]),
            HostAnswer::Failed(why) => return Sub::Fail(format!("getaddrinfo: {why}")),
        };
        Sub::Records {
            rcode,
            answers,
            authorities: vec![],
            forwarded: false,
        }
    }
}

/// CNAME/TXT/NS/MX/SRV through the resolv.conf resolver. The name is passed as relative, so
/// resolv.conf's search list and ndots apply as for a host program; when a search domain
/// produced the answer, its records are given the asked name.
async fn lookup_resolver(
    resolver: &hickory_resolver::TokioResolver,
    name: &Name,
    qtype: RecordType,
) -> Sub {
    let mut relative = name.clone();
    relative.set_fqdn(false);
    match resolver.lookup(relative, qtype).await {
        Ok(lookup) => {
            let used = lookup.query().name().clone();
            let answers = lookup
                .answers()
                .iter()
                .cloned()
                .map(|mut r| {
                    if !used.eq_ignore_root(name) && r.name.eq_ignore_root(&used) {
                        r.name = name.clone();
                    }
                    r
                })
                .collect();
            Sub::Records {
                rcode: ResponseCode::NoError,
                answers,
                authorities: vec![],
                forwarded: false,
            }
        }
        Err(NetError::Dns(HickoryDnsError::NoRecordsFound(nr)))
            if matches!(
                nr.response_code,
                ResponseCode::NoError | ResponseCode::NXDomain
            ) =>
        {
            let authorities = nr
                .soa
                .map(|soa| {
                    let mut r = (*soa).into_record_of_rdata();
                    if let Some(ttl) = nr.negative_ttl {
                        r.ttl = r.ttl.min(ttl);
                    }
                    vec![r]
                })
                .unwrap_or_default();
            Sub::Records {
                rcode: nr.response_code,
                answers: vec![],
                authorities,
                forwarded: false,
            }
        }
        Err(e) => Sub::Fail(format!("resolver: {e}")),
    }
}
