//! DNS server tests against dnsmasq, with the host resolver (getaddrinfo) on. Each test runs in
//! a network namespace of its own (only `lo`), where /etc/hosts and /etc/resolv.conf are the
//! test's (`ip netns exec` bind-mounts /etc/netns/NAME/*) and dnsmasq serves the test records
//! on 127.0.0.1:53. Needs root, `ip` and dnsmasq (Debian: dnsmasq-base); skipped otherwise
//! (a failure with USERNET_E2E=1).

mod common;

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, RecordType};

use common::*;
use dns::{DnsConfig, DnsServer, StaticTarget, LOCAL_TTL};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn addrs(m: &Message) -> Vec<IpAddr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

/// The server of these tests: resolv.conf = the namespace's (dnsmasq), fallback = dnsmasq.
fn config(resolv: std::path::PathBuf) -> DnsConfig {
    DnsConfig {
        resolv_conf: resolv,
        fallback: vec!["127.0.0.1:53".parse().unwrap()],
        static_names: vec![
            ("myhost.internal".into(), StaticTarget::Ip(ip("10.9.9.9"))),
            (
                "webalias.internal".into(),
                StaticTarget::Alias("web.test".into()),
            ),
        ],
        ..DnsConfig::default()
    }
}

/// What a test expects of an answer.
enum Want {
    Addrs(&'static [&'static str], u32),
    Empty,
    NxDomain,
    /// Records of this type whose text form contains this, with the upstream TTL.
    Has(RecordType, &'static str),
    /// Exactly what dnsmasq itself answers (apart from the ID).
    SameAsUpstream,
}

fn rdata_text(m: &Message, t: RecordType) -> Vec<String> {
    m.answers
        .iter()
        .filter(|r| r.record_type() == t)
        .map(|r| r.data.to_string())
        .collect()
}

async fn check_all(server: std::net::SocketAddr, cases: &[(&str, RecordType, Want)]) {
    let upstream: std::net::SocketAddr = "127.0.0.1:53".parse().unwrap();
    for tcp_too in [false, true] {
        for (name, t, want) in cases {
            let q = query(name, *t, Some(1232));
            let (a, raw) = if tcp_too {
                tcp(server, &q).await
            } else {
                udp(server, &q).await
            };
            let what = format!("{name} {t} over {}", if tcp_too { "TCP" } else { "UDP" });
            assert!(a.metadata.recursion_available, "{what}: RA");
            assert!(a.metadata.recursion_desired, "{what}: RD copied");
            assert_eq!(a.queries, q.queries, "{what}: question");
            let rc = a.metadata.response_code;
            match want {
                Want::Addrs(list, ttl) => {
                    assert_eq!(rc, ResponseCode::NoError, "{what}: {a:?}");
                    let want: Vec<IpAddr> = list.iter().map(|s| ip(s)).collect();
                    assert_eq!(addrs(&a), want, "{what}");
                    assert!(a.answers.iter().all(|r| r.ttl == *ttl), "{what}: TTL {a:?}");
                    assert!(a.edns.is_some(), "{what}: OPT answered");
                }
                Want::Empty => {
                    assert_eq!(rc, ResponseCode::NoError, "{what}: {a:?}");
                    assert!(a.answers.is_empty(), "{what}: {a:?}");
                }
                Want::NxDomain => assert_eq!(rc, ResponseCode::NXDomain, "{what}: {a:?}"),
                Want::Has(rt, text) => {
                    assert_eq!(rc, ResponseCode::NoError, "{what}: {a:?}");
                    let texts = rdata_text(&a, *rt);
                    assert!(
                        texts.iter().any(|x| x.contains(text)),
                        "{what}: want {text:?} in {texts:?}"
                    );
                    assert!(
                        a.answers.iter().all(|r| r.ttl > 0 && r.ttl <= UPSTREAM_TTL),
                        "{what}: upstream TTL: {a:?}"
                    );
                }
                Want::SameAsUpstream => {
                    let direct = if tcp_too {
                        tcp(upstream, &q).await.1
                    } else {
                        udp(upstream, &q).await.1
                    };
                    assert_eq!(raw, direct, "{what}: the upstream's bytes");
                }
            }
        }
    }
}

#[test]
fn every_type_over_udp_and_tcp() {
    in_netns("every_type_over_udp_and_tcp", |_env| async move {
        let (_d, resolv) = resolv_conf(NS_RESOLV);
        let server = DnsServer::new(config(resolv)).unwrap();
        let addr = start(&server).await;
        use RecordType::*;
        let cases: Vec<(&str, RecordType, Want)> = vec![
            // getaddrinfo: via dnsmasq, via /etc/hosts; families kept apart.
            ("web.test.", A, Want::Addrs(&["10.0.0.10"], LOCAL_TTL)),
            ("web.test.", AAAA, Want::Addrs(&["fd00::10"], LOCAL_TTL)),
            ("v4only.test.", AAAA, Want::Empty),
            ("hostsonly.test.", A, Want::Addrs(&["10.1.2.3"], LOCAL_TTL)),
            ("hostsonly.test.", AAAA, Want::Empty),
            (
                "hostsonly6.test.",
                AAAA,
                Want::Addrs(&["fd00::99"], LOCAL_TTL),
            ),
            ("nope.test.", A, Want::NxDomain),
            ("nope.test.", AAAA, Want::NxDomain),
            // The resolver: real records, real TTLs.
            ("alias.test.", CNAME, Want::Has(CNAME, "web.test.")),
            ("txt.test.", TXT, Want::Has(TXT, "hello world")),
            ("test.", MX, Want::Has(MX, "mail.test.")),
            ("_http._tcp.test.", SRV, Want::Has(SRV, "80 web.test.")),
            ("test.", NS, Want::Has(NS, "ns1.test.")),
            ("nope.test.", TXT, Want::NxDomain),
            ("web.test.", TXT, Want::Empty),
            // Forwarded as is.
            ("10.0.0.10.in-addr.arpa.", PTR, Want::SameAsUpstream),
            ("test.", CAA, Want::SameAsUpstream),
            ("test.", HTTPS, Want::SameAsUpstream),
            ("test.", SOA, Want::SameAsUpstream),
            ("nope.test.", PTR, Want::SameAsUpstream),
            // Static names, and a neighbour that is not one.
            (
                "host.lima.internal.",
                A,
                Want::Addrs(&["192.168.5.2"], LOCAL_TTL),
            ),
            ("host.lima.internal.", AAAA, Want::Empty),
            ("myhost.internal.", A, Want::Addrs(&["10.9.9.9"], LOCAL_TTL)),
            ("other.internal.", A, Want::Addrs(&["10.0.0.77"], LOCAL_TTL)),
        ];
        check_all(addr, &cases).await;
        // A static alias to a name of the upstream.
        let (a, _) = udp(addr, &query("webalias.internal.", A, None)).await;
        assert_eq!(addrs(&a), vec![ip("10.0.0.10")]);
        assert_eq!(rdata_text(&a, CNAME), vec!["web.test.".to_string()]);
        let (a, _) = udp(addr, &query("webalias.internal.", TXT, None)).await;
        assert_eq!(rdata_text(&a, CNAME), vec!["web.test.".to_string()]);
        let c = server.counters();
        assert!(
            c.answered_host >= 30 && c.forwarded >= 10 && c.answered_local >= 6,
            "{c:?}"
        );
        assert_eq!(c.servfail, 0, "{c:?}");
    });
}

#[test]
fn ipv6_false_answers_aaaa_empty() {
    in_netns("ipv6_false_answers_aaaa_empty", |_env| async move {
        let (_d, resolv) = resolv_conf(NS_RESOLV);
        let mut c = config(resolv);
        c.ipv6 = false;
        let server = DnsServer::new(c).unwrap();
        let addr = start(&server).await;
        use RecordType::*;
        check_all(
            addr,
            &[
                ("web.test.", AAAA, Want::Empty),
                ("hostsonly6.test.", AAAA, Want::Empty),
                ("web.test.", A, Want::Addrs(&["10.0.0.10"], LOCAL_TTL)),
            ],
        )
        .await;
    });
}

#[test]
fn long_txt_truncated_on_udp_whole_on_tcp() {
    in_netns(
        "long_txt_truncated_on_udp_whole_on_tcp",
        |_env| async move {
            let (_d, resolv) = resolv_conf(NS_RESOLV);
            let server = DnsServer::new(config(resolv)).unwrap();
            let addr = start(&server).await;
            let want: Vec<String> = long_txt_strings();
            let strings = |m: &Message| -> Vec<String> {
                m.answers
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::TXT(t) => Some(
                            t.txt_data
                                .iter()
                                .map(|b| String::from_utf8_lossy(b).into_owned())
                                .collect::<Vec<_>>(),
                        ),
                        _ => None,
                    })
                    .flatten()
                    .collect()
            };
            for edns in [None, Some(512), Some(1232)] {
                let (a, raw) = udp(addr, &query("long.test.", RecordType::TXT, edns)).await;
                assert!(a.metadata.truncation, "UDP edns {edns:?}: TC");
                assert!(raw.len() <= 512.max(edns.unwrap_or(0) as usize));
                assert_eq!(a.queries.len(), 1);
            }
            let (a, raw) = udp(addr, &query("long.test.", RecordType::TXT, Some(4096))).await;
            assert!(!a.metadata.truncation, "EDNS 4096 fits");
            assert!(raw.len() > 1232);
            assert_eq!(strings(&a), want);
            for edns in [None, Some(1232)] {
                let (a, _) = tcp(addr, &query("long.test.", RecordType::TXT, edns)).await;
                assert!(!a.metadata.truncation, "TCP");
                assert_eq!(strings(&a), want);
                assert_eq!(a.answers[0].ttl, UPSTREAM_TTL);
            }
            assert!(server.counters().truncated >= 3);
        },
    );
}

#[test]
fn stopped_upstream_gives_servfail_within_the_bound() {
    in_netns(
        "stopped_upstream_gives_servfail_within_the_bound",
        |env| async move {
            let (_d, resolv) = resolv_conf(NS_RESOLV);
            let server = DnsServer::new(config(resolv)).unwrap();
            let addr = start(&server).await;
            let (a, _) = udp(addr, &query("txt.test.", RecordType::TXT, None)).await;
            assert_eq!(a.answers.len(), 1, "answers while the upstream is up");
            env.stop_upstream().await;
            use RecordType::*;
            for (n, t) in [
                ("web2.test.", A),
                ("web2.test.", AAAA),
                ("txt2.test.", TXT),
                ("test.", MX),
                ("10.0.0.10.in-addr.arpa.", PTR),
                ("test.", SOA),
            ] {
                for over_tcp in [false, true] {
                    let q = query(n, t, None);
                    let t0 = Instant::now();
                    let (a, _) = if over_tcp {
                        tcp(addr, &q).await
                    } else {
                        udp(addr, &q).await
                    };
                    let took = t0.elapsed();
                    assert_eq!(a.metadata.response_code, ResponseCode::ServFail, "{n} {t}");
                    assert!(took < Duration::from_millis(5500), "{n} {t}: {took:?}");
                }
            }
            // Local answers are unaffected.
            let (a, _) = udp(addr, &query("host.lima.internal.", A, None)).await;
            assert_eq!(addrs(&a), vec![ip("192.168.5.2")]);
            let (a, _) = udp(addr, &query("hostsonly.test.", A, None)).await;
            assert_eq!(addrs(&a), vec![ip("10.1.2.3")]);
        },
    );
}

#[test]
fn silent_upstream_gives_servfail_and_slow_lookups_block_nothing() {
    in_netns(
        "silent_upstream_gives_servfail_and_slow_lookups_block_nothing",
        |env| async move {
            // A server that takes queries and never answers, as glibc's only nameserver.
            let silent = tokio::net::UdpSocket::bind("127.0.0.2:53").await.unwrap();
            let _keep = silent;
            env.set_system_resolv_conf("nameserver 127.0.0.2\noptions timeout:3 attempts:1\n");
            let (_d, resolv) = resolv_conf("nameserver 127.0.0.2\noptions timeout:3 attempts:1\n");
            let mut c = config(resolv);
            c.timeout = Duration::from_secs(2);
            c.fallback = vec!["127.0.0.2:53".parse().unwrap()];
            let server = DnsServer::new(c).unwrap();
            let addr = start(&server).await;
            // 100 getaddrinfo calls that hang (more than the 64 threads allowed)...
            let mut slow = tokio::task::JoinSet::new();
            for i in 0..100 {
                slow.spawn(async move {
                    let t0 = Instant::now();
                    let name = format!("slow{i}.test.");
                    let (a, _) = udp(addr, &query(&name, RecordType::A, None)).await;
                    (a.metadata.response_code, t0.elapsed())
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            // ...do not delay a static name.
            let t0 = Instant::now();
            let (a, _) = udp(addr, &query("myhost.internal.", RecordType::A, None)).await;
            assert_eq!(addrs(&a), vec![ip("10.9.9.9")]);
            // Well under the 2 s the slow ones wait (a loaded machine may take a while).
            assert!(
                t0.elapsed() < Duration::from_millis(1000),
                "{:?}",
                t0.elapsed()
            );
            while let Some(r) = slow.join_next().await {
                let (rc, took) = r.unwrap();
                assert_eq!(rc, ResponseCode::ServFail);
                assert!(took < Duration::from_millis(2600), "{took:?}");
            }
            // Once libc gives up (3 s), the threads are free again: the hosts file answers.
            let end = Instant::now() + Duration::from_secs(10);
            loop {
                let (a, _) = udp(addr, &query("hostsonly.test.", RecordType::A, None)).await;
                if addrs(&a) == vec![ip("10.1.2.3")] {
                    break;
                }
                assert!(
                    Instant::now() < end,
                    "hosts file never answered again: {a:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // Resolver and forwarded types: SERVFAIL within the bound.
            for t in [RecordType::TXT, RecordType::PTR] {
                let t0 = Instant::now();
                let (a, _) = udp(addr, &query("x.test.", t, None)).await;
                assert_eq!(a.metadata.response_code, ResponseCode::ServFail, "{t}");
                assert!(
                    t0.elapsed() < Duration::from_millis(2600),
                    "{t}: {:?}",
                    t0.elapsed()
                );
            }
        },
    );
}

#[test]
fn fallback_is_used_when_resolv_conf_servers_fail() {
    in_netns(
        "fallback_is_used_when_resolv_conf_servers_fail",
        |_env| async move {
            // Nothing listens on 127.0.0.9: refused at once, the fallback (dnsmasq) answers.
            let (_d, resolv) = resolv_conf("nameserver 127.0.0.9\n");
            let server = DnsServer::new(config(resolv)).unwrap();
            let addr = start(&server).await;
            let t0 = Instant::now();
            let (a, _) = udp(
                addr,
                &query("10.0.0.10.in-addr.arpa.", RecordType::PTR, None),
            )
            .await;
            assert_eq!(
                rdata_text(&a, RecordType::PTR),
                vec!["web.test.".to_string()]
            );
            assert!(t0.elapsed() < Duration::from_secs(1));
        },
    );
}

#[test]
fn resolv_conf_search_and_changes_are_followed() {
    in_netns(
        "resolv_conf_search_and_changes_are_followed",
        |_env| async move {
            let (_d, resolv) = resolv_conf("nameserver 127.0.0.1\nsearch test\n");
            let server = DnsServer::new(config(resolv.clone())).unwrap();
            let addr = start(&server).await;
            // "txt." does not exist; with "search test" the host finds txt.test., and so do we,
            // answering for the asked name.
            let (a, _) = udp(addr, &query("txt.", RecordType::TXT, None)).await;
            let texts = rdata_text(&a, RecordType::TXT);
            assert!(texts.iter().any(|t| t.contains("hello world")), "{a:?}");
            assert_eq!(a.answers[0].name.to_ascii(), "txt.");
            // The host moves to another network: resolv.conf names another server.
            let other = tokio::net::UdpSocket::bind("127.0.0.3:53").await.unwrap();
            let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let n = answered.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok((len, peer)) = other.recv_from(&mut buf).await {
                    n.fetch_add(1, Ordering::Relaxed);
                    let mut r = buf[..len].to_vec();
                    r[2] |= 0x80;
                    r[3] = 0x83; // RA, NXDOMAIN
                    let _ = other.send_to(&r, peer).await;
                }
            });
            tokio::time::sleep(Duration::from_millis(1100)).await; // a different mtime
            std::fs::write(&resolv, "nameserver 127.0.0.3\n").unwrap();
            let end = Instant::now() + Duration::from_secs(10);
            loop {
                let (a, _) = udp(
                    addr,
                    &query("10.0.0.10.in-addr.arpa.", RecordType::PTR, None),
                )
                .await;
                if a.metadata.response_code == ResponseCode::NXDomain {
                    break;
                }
                assert!(
                    Instant::now() < end,
                    "resolv.conf change not followed: {a:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            assert!(answered.load(Ordering::Relaxed) > 0);
        },
    );
}

#[test]
fn a_thousand_parallel_queries_are_all_answered() {
    in_netns(
        "a_thousand_parallel_queries_are_all_answered",
        |_env| async move {
            let (_d, resolv) = resolv_conf(NS_RESOLV);
            let server = DnsServer::new(config(resolv)).unwrap();
            let addr = start(&server).await;
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..1000u32 {
                tasks.spawn(async move {
                    let (n, t) = match i % 5 {
                        0 => ("myhost.internal.", RecordType::A),
                        1 => ("web.test.", RecordType::A),
                        2 => ("hostsonly.test.", RecordType::A),
                        3 => ("txt.test.", RecordType::TXT),
                        _ => ("10.0.0.10.in-addr.arpa.", RecordType::PTR),
                    };
                    let (a, _) = udp(addr, &query(n, t, None)).await;
                    assert_eq!(a.metadata.response_code, ResponseCode::NoError, "{n} {t}");
                    assert_eq!(a.answers.len(), 1, "{n} {t}");
                    a.metadata.id
                });
            }
            let mut ids = HashSet::new();
            while let Some(r) = tasks.join_next().await {
                ids.insert(r.unwrap());
            }
            let c = server.counters();
            assert_eq!(c.queries_udp, 1000, "{c:?}");
            assert_eq!(c.servfail + c.dropped, 0, "{c:?}");
        },
    );
}
