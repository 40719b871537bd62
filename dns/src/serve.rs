//! Socket loops: UDP (one task per datagram) and TCP (2-byte length framing, several queries
//! per connection answered concurrently, answers written as they complete).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, Semaphore};

use crate::resolve::Inner;

/// The largest UDP payload over IPv4.
const MAX_UDP_PAYLOAD: usize = 65507;
/// UDP queries being answered at once; beyond this, new ones are dropped (and counted).
pub(crate) const MAX_UDP_IN_FLIGHT: usize = 4096;
/// Queries of one TCP connection being answered at once; beyond this the connection is not
/// read until one finishes.
const MAX_TCP_IN_FLIGHT: usize = 64;
/// A TCP connection with no query for this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(30);
/// A started TCP message must be complete within this.
const TCP_READ: Duration = Duration::from_secs(10);

/// Receive buffer asked for the UDP socket: a burst of queries must not overflow it.
const UDP_RCVBUF: usize = 4 << 20;

pub(crate) async fn serve_udp(inner: Arc<Inner>, socket: UdpSocket) {
    if let Err(e) = socket2::SockRef::from(&socket).set_recv_buffer_size(UDP_RCVBUF) {
        tracing::debug!("dns: cannot enlarge the UDP receive buffer: {e}");
    }
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                // ICMP errors of earlier sends surface here on Linux; nothing to do.
                tracing::trace!("dns: udp recv: {e}");
                // Never spin on a socket that keeps failing.
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        let Some(permit) = inner.udp_permit() else {
            continue;
        };
        let query = buf[..n].to_vec();
        let inner = inner.clone();
        let socket = socket.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(answer) = inner.answer_udp(&query, MAX_UDP_PAYLOAD).await {
                if let Err(e) = socket.send_to(&answer, peer).await {
                    tracing::trace!("dns: udp send to {peer}: {e}");
                }
            }
        });
    }
}

pub(crate) async fn serve_tcp(inner: Arc<Inner>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                let inner = inner.clone();
                tokio::spawn(serve_tcp_stream(inner, stream));
            }
            Err(e) => {
                // Out of file descriptors and the like: wait a little, keep serving.
                tracing::warn!("dns: tcp accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

pub(crate) async fn serve_tcp_stream<S>(inner: Arc<Inner>, stream: S)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(MAX_TCP_IN_FLIGHT);
    let writer = tokio::spawn(async move {
        while let Some(answer) = rx.recv().await {
            let Ok(len) = u16::try_from(answer.len()) else {
                continue;
            };
            let mut framed = Vec::with_capacity(answer.len() + 2);
            framed.extend_from_slice(&len.to_be_bytes());
            framed.extend_from_slice(&answer);
            if wr.write_all(&framed).await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
    });
    let permits = Arc::new(Semaphore::new(MAX_TCP_IN_FLIGHT));
    loop {
        let len = match tokio::time::timeout(TCP_IDLE, rd.read_u16()).await {
            Ok(Ok(l)) => usize::from(l),
            _ => break, // idle, closed, or error
        };
        let mut query = vec![0u8; len];
        match tokio::time::timeout(TCP_READ, rd.read_exact(&mut query)).await {
            Ok(Ok(_)) => {}
            _ => break,
        }
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let inner = inner.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(answer) = inner.answer_tcp(&query).await {
                let _ = tx.send(answer).await;
            }
        });
    }
    drop(tx);
    let _ = writer.await;
}
