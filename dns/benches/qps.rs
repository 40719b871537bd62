//! Queries per second of the DNS server, on loopback only: a static name and a forwarded name
//! (PTR, to an in-process upstream on 127.0.0.1), both answered in process (`answer_udp`) and
//! over a real UDP socket with 100 queries in flight. Throughput is reported in queries/s.
//!
//! `cargo bench -p dns --bench qps`

#[path = "../tests/common/upstream.rs"]
#[allow(dead_code)]
mod upstream;

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use tokio::net::UdpSocket;

use dns::{DnsConfig, DnsServer, StaticTarget};

const IN_FLIGHT: usize = 100;

fn query_bytes(name: &str, t: RecordType, id: u16) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_str(name).unwrap(), t));
    m.to_vec().unwrap()
}

/// Sends `IN_FLIGHT` queries from one socket and waits for all answers.
async fn burst(client: &UdpSocket, server: SocketAddr, name: &str, t: RecordType) {
    for id in 0..IN_FLIGHT as u16 {
        client
            .send_to(&query_bytes(name, t, id), server)
            .await
            .unwrap();
    }
    let mut buf = vec![0u8; 4096];
    for _ in 0..IN_FLIGHT {
        tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .expect("answer within 5 s")
            .unwrap();
    }
}

fn qps(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.1\n").unwrap();
    let (server, addr, _up) = rt.block_on(async {
        let up = upstream::MiniUpstream::start().await;
        let config = DnsConfig {
            resolv_conf: resolv.clone(),
            nameservers: vec![up.addr],
            fallback: vec![],
            // Loopback only: no getaddrinfo (it would read the machine's resolv.conf).
            host_resolver: false,
            static_names: vec![(
                "bench.internal".to_string(),
                StaticTarget::Ip("10.0.0.1".parse().unwrap()),
            )],
            ..DnsConfig::default()
        };
        let server = DnsServer::new(config).unwrap();
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let s = server.clone();
        tokio::spawn(async move { s.serve_udp(sock).await });
        (server, addr, up)
    });

    let mut g = c.benchmark_group("answer_udp");
    g.throughput(Throughput::Elements(1));
    let q_static = query_bytes("bench.internal.", RecordType::A, 1);
    g.bench_function("static", |b| {
        b.to_async(&rt)
            .iter(|| async { server.answer_udp(&q_static, 65507).await.unwrap() })
    });
    let q_fwd = query_bytes("10.0.0.1.in-addr.arpa.", RecordType::PTR, 2);
    g.bench_function("forwarded", |b| {
        b.to_async(&rt)
            .iter(|| async { server.answer_udp(&q_fwd, 65507).await.unwrap() })
    });
    g.finish();

    let client = rt.block_on(UdpSocket::bind("127.0.0.1:0")).unwrap();
    let mut g = c.benchmark_group("udp_socket_100_in_flight");
    g.throughput(Throughput::Elements(IN_FLIGHT as u64));
    g.bench_function("static", |b| {
        b.to_async(&rt)
            .iter(|| burst(&client, addr, "bench.internal.", RecordType::A))
    });
    g.bench_function("forwarded", |b| {
        b.to_async(&rt)
            .iter(|| burst(&client, addr, "10.0.0.1.in-addr.arpa.", RecordType::PTR))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = qps
}
criterion_main!(benches);
