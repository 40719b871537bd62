//! A tiny upstream DNS server for loopback tests and benchmarks (UDP and TCP on one port).
//!
//! Answers: PTR -> `up.test.` (TTL 77), A -> 10.7.7.7, TXT -> "mini", `big.test.` A -> 60
//! addresses (about 1 KB), `silent.test.` -> no answer at all. A silent server answers nothing.

use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use hickory_proto::op::{Message, MessageType};
use hickory_proto::rr::rdata::{A, PTR, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

pub struct MiniUpstream {
    pub addr: SocketAddr,
    pub queries: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for MiniUpstream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn answer(query: &[u8]) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    let question = q.queries.first()?.clone();
    let name = question.name().clone();
    if name.to_ascii().eq_ignore_ascii_case("silent.test.") {
        return None;
    }
    let mut r = Message::new(q.metadata.id, MessageType::Response, q.metadata.op_code);
    r.metadata.recursion_desired = q.metadata.recursion_desired;
    r.metadata.recursion_available = true;
    r.add_query(question.clone());
    let rec = |d: RData| Record::from_rdata(name.clone(), 77, d);
    match question.query_type() {
        RecordType::A if name.to_ascii().eq_ignore_ascii_case("big.test.") => {
            for i in 0..60u8 {
                r.add_answer(rec(RData::A(A(Ipv4Addr::new(10, 8, 0, i)))));
            }
        }
        RecordType::A => {
            r.add_answer(rec(RData::A(A(Ipv4Addr::new(10, 7, 7, 7)))));
        }
        RecordType::PTR => {
            r.add_answer(rec(RData::PTR(PTR(Name::from_str("up.test.").unwrap()))));
        }
        RecordType::TXT => {
            r.add_answer(rec(RData::TXT(TXT::new(vec!["mini".to_string()]))));
        }
        _ => {}
    }
    if let Some(e) = &q.edns {
        r.set_edns(e.clone());
    }
    r.to_vec().ok()
}

/// A TCP listener and a UDP socket on the same random port of 127.0.0.1.
pub async fn bind_pair() -> (TcpListener, UdpSocket, SocketAddr) {
    // The kernel picks the TCP port; the same UDP port may be in use by another test's
    // socket at that moment: then try another port (bounded).
    let mut attempt = 0;
    loop {
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind tcp");
        let addr = tcp.local_addr().expect("tcp addr");
        match UdpSocket::bind(addr).await {
            Ok(udp) => return (tcp, udp, addr),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && attempt < 20 => attempt += 1,
            Err(e) => panic!("bind udp on the same port {addr}: {e}"),
        }
    }
}

impl MiniUpstream {
    /// Starts on 127.0.0.1:random on the current tokio runtime.
    pub async fn start() -> MiniUpstream {
        Self::start_with(true).await
    }

    /// Binds UDP and TCP but never answers (a server that is up but stuck).
    pub async fn silent() -> MiniUpstream {
        Self::start_with(false).await
    }

    async fn start_with(answering: bool) -> MiniUpstream {
        let (tcp, udp, addr) = bind_pair().await;
        // A burst of forwarded queries must not overflow the default buffer.
        let _ = socket2::SockRef::from(&udp).set_recv_buffer_size(4 << 20);
        let udp = Arc::new(udp);
        let queries = Arc::new(AtomicUsize::new(0));
        let qn = queries.clone();
        let u = tokio::spawn(async move {
            let mut buf = vec![0u8; 65535];
            loop {
                let Ok((n, peer)) = udp.recv_from(&mut buf).await else {
                    continue;
                };
                qn.fetch_add(1, Ordering::Relaxed);
                if !answering {
                    continue;
                }
                if let Some(a) = answer(&buf[..n]) {
                    let _ = udp.send_to(&a, peer).await;
                }
            }
        });
        let qn = queries.clone();
        let t = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = tcp.accept().await else {
                    continue;
                };
                let qn = qn.clone();
                tokio::spawn(async move {
                    loop {
                        let Ok(n) = s.read_u16().await else { return };
                        let mut buf = vec![0u8; n as usize];
                        if s.read_exact(&mut buf).await.is_err() {
                            return;
                        }
                        qn.fetch_add(1, Ordering::Relaxed);
                        if !answering {
                            continue;
                        }
                        if let Some(a) = answer(&buf) {
                            let mut out = (a.len() as u16).to_be_bytes().to_vec();
                            out.extend_from_slice(&a);
                            if s.write_all(&out).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        MiniUpstream {
            addr,
            queries,
            tasks: vec![u, t],
        }
    }
}
