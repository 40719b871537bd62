//! Forwarding: the query as received (with a fresh random ID) to each upstream in turn, the
//! first usable answer back as received (with the client's ID again).
//!
//! UDP first, from a fresh socket with a random source port per query, sent again every
//! second without an answer; TCP to the same
//! server when its answer is truncated and the client asked over TCP (a UDP client gets the
//! TC answer and retries over TCP itself). SERVFAIL or REFUSED from one server moves on to
//! the next; if none does better, that answer is passed back. The time left is shared among
//! the servers not tried yet, so a silent first server cannot use up the whole bound.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// A UDP query without an answer is sent again after this (a lost datagram must not cost the
/// whole time of a server).
const RESEND: Duration = Duration::from_millis(1000);

/// The least time one server gets (unless less is left overall).
const MIN_ATTEMPT: Duration = Duration::from_millis(800);

const RCODE_SERVFAIL: u8 = 2;
const RCODE_REFUSED: u8 = 5;

/// The length of the question section of a well-formed single-question query (name + type +
/// class), starting at byte 12. The query was already parsed, so this only walks labels.
fn question_len(msg: &[u8]) -> Option<usize> {
    let mut i = 12;
    loop {
        let l = *msg.get(i)? as usize;
        if l == 0 {
            i += 1;
            break;
        }
        if l & 0xC0 != 0 {
            // A compression pointer in a question: two bytes, end of the name.
            i += 2;
            break;
        }
        i += 1 + l;
    }
    let end = i + 4;
    (end <= msg.len()).then_some(end - 12)
}

/// Whether `resp` answers `query` (same ID, a response, the same question).
fn matches(query: &[u8], qlen: usize, resp: &[u8]) -> bool {
    resp.len() >= 12 + qlen
        && resp[0..2] == query[0..2]
        && resp[2] & 0x80 != 0
        && resp[4..6] == [0, 1]
        && resp[12..8 + qlen].eq_ignore_ascii_case(&query[12..8 + qlen])
        && resp[8 + qlen..12 + qlen] == query[8 + qlen..12 + qlen]
}

fn rcode(resp: &[u8]) -> u8 {
    resp[3] & 0x0F
}

fn truncated(resp: &[u8]) -> bool {
    resp[2] & 0x02 != 0
}

async fn via_udp(server: SocketAddr, query: &[u8], qlen: usize) -> std::io::Result<Vec<u8>> {
    let bind: SocketAddr = if server.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(server).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        sock.send(query).await?;
        let resend = tokio::time::sleep(RESEND);
        tokio::pin!(resend);
        loop {
            tokio::select! {
                r = sock.recv(&mut buf) => {
                    let n = r?;
                    if matches(query, qlen, &buf[..n]) {
                        buf.truncate(n);
                        return Ok(buf);
                    }
                    // Not ours (late, spoofed, garbage): keep waiting.
                }
                _ = &mut resend => break,
            }
        }
    }
}

async fn via_tcp(server: SocketAddr, query: &[u8], qlen: usize) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(server).await?;
    s.set_nodelay(true)?;
    let len = u16::try_from(query.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "query too long"))?;
    let mut out = Vec::with_capacity(query.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(query);
    s.write_all(&out).await?;
    loop {
        let n = s.read_u16().await? as usize;
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf).await?;
        if matches(query, qlen, &buf) {
            return Ok(buf);
        }
    }
}

/// Forwards `query` (the client's bytes) to `servers` in order, within `deadline`.
/// Returns the answer with the client's ID, or why none came.
pub(crate) async fn forward(
    query: &[u8],
    servers: &[SocketAddr],
    deadline: Instant,
    client_tcp: bool,
) -> Result<Vec<u8>, String> {
    let qlen = question_len(query).ok_or("query has no question")?;
    if servers.is_empty() {
        return Err("no upstream servers configured".into());
    }
    let client_id = [query[0], query[1]];
    let mut q = query.to_vec();
    let mut last_bad: Option<Vec<u8>> = None;
    let mut errors = Vec::new();
    for (i, server) in servers.iter().enumerate() {
        let now = Instant::now();
        if now >= deadline {
            errors.push("out of time".to_string());
            break;
        }
        let left = deadline - now;
        let share = (left / (servers.len() - i) as u32)
            .max(MIN_ATTEMPT)
            .min(left);
        let id: u16 = rand::random();
        q[0..2].copy_from_slice(&id.to_be_bytes());
        let attempt_end = now + share;
        let udp = tokio::time::timeout(share, via_udp(*server, &q, qlen)).await;
        let mut resp = match udp {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                errors.push(format!("{server}: {e}"));
                continue;
            }
            Err(_) => {
                errors.push(format!("{server}: no answer within {share:?}"));
                continue;
            }
        };
        if truncated(&resp) && client_tcp {
            let left = attempt_end.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, via_tcp(*server, &q, qlen)).await {
                Ok(Ok(r)) => resp = r,
                Ok(Err(e)) => errors.push(format!("{server} (tcp): {e}")),
                Err(_) => errors.push(format!("{server} (tcp): no answer in time")),
            }
        }
        resp[0..2].copy_from_slice(&client_id);
        let rc = rcode(&resp);
        if rc == RCODE_SERVFAIL || rc == RCODE_REFUSED {
            errors.push(format!("{server}: rcode {rc}"));
            last_bad = Some(resp);
            continue;
        }
        return Ok(resp);
    }
    match last_bad {
        Some(r) => Ok(r),
        None => Err(errors.join("; ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query() -> Vec<u8> {
        // ID 0x1234, RD, one question: "a.test." PTR IN
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(b"\x01a\x04test\x00\x00\x0c\x00\x01");
        q
    }

    #[test]
    fn question_length() {
        let q = query();
        assert_eq!(question_len(&q), Some(12));
        assert_eq!(question_len(&q[..20]), None);
    }

    #[test]
    fn response_matching() {
        let q = query();
        let mut r = q.clone();
        r[2] |= 0x80;
        assert!(matches(&q, 12, &r));
        r[13] = b'A';
        assert!(matches(&q, 12, &r), "case-insensitive question");
        r[0] = 0;
        assert!(!matches(&q, 12, &r), "other ID");
        let mut r2 = q.clone();
        r2[2] &= 0x7f;
        assert!(!matches(&q, 12, &r2), "not a response");
    }

    #[tokio::test]
    async fn no_servers_fails_at_once() {
        let r = forward(
            &query(),
            &[],
            Instant::now() + Duration::from_secs(1),
            false,
        )
        .await;
        assert!(r.is_err());
    }
}
