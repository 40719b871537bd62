//! Datagram framing: one frame per datagram, no header (QEMU `-netdev dgram`, `-netdev socket`
//! with a datagram fd, VZ file-handle attachments, vfkit, Lima's `_fd.sock` socketpairs).
//!
//! A full socket (ENOBUFS on macOS, EAGAIN) is waited out and retried; a peer that is gone
//! loses the frame (counted). `--listen-dgram` learns its peer from the first datagram and
//! follows it when it changes; vfkit's leading `VFKT` datagram is consumed.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::net::UnixDatagram;
use tokio::sync::watch;

use crate::switch::{PortRx, PortTx, Switch};

/// vfkit's greeting datagram.
pub const VFKIT_MAGIC: &[u8; 4] = b"VFKT";
/// A datagram buffer large enough for any frame we accept, plus one byte to see oversize.
const RECV_BUF: usize = 65536 + 64;
/// How long one frame may wait for room in a full socket before it is dropped.
const FULL_RETRY: Duration = Duration::from_secs(1);

/// Serve a connected datagram socket (socketpair end, connected fd) as one port.
pub async fn serve_connected(sock: UnixDatagram, port: PortTx, mut rx: PortRx) {
    let sock = Arc::new(sock);
    let reader = {
        let (sock, port) = (Arc::clone(&sock), port.clone());
        async move {
            let mut buf = BytesMut::with_capacity(RECV_BUF);
            loop {
                reserve(&mut buf);
                match sock.recv_buf(&mut buf).await {
                    Ok(n) => deliver(&port, &mut buf, n),
                    Err(e) => return e,
                }
            }
        }
    };
    let writer = async {
        while let Some(frame) = rx.frames.recv().await {
            if let Err(e) = send_retrying(&sock, &frame, None).await {
                if is_peer_gone(&e) {
                    return e;
                }
                port.framing_error();
            }
        }
        io::Error::other("port closed")
    };
    tokio::select! {
        e = reader => tracing::debug!(port = port.id(), "datagram read ended: {e}"),
        e = writer => tracing::debug!(port = port.id(), "datagram write ended: {e}"),
    }
    port.detach();
}

/// `--listen-dgram PATH`: bind PATH now; one port, whose peer is whoever sent last.
pub fn listen(switch: &Arc<Switch>, path: &PathBuf) -> anyhow::Result<PathBuf> {
    super::claim_socket_path(path)?;
    let sock = UnixDatagram::bind(path)
        .map_err(|e| anyhow::anyhow!("listen-dgram {}: {e}", path.display()))?;
    set_buffers(&sock);
    tracing::info!(
        "listening for datagram peers on unixgram://{}",
        path.display()
    );
    let (port, mut rx) = switch.attach(format!("unixgram://{}", path.display()));
    let sock = Arc::new(sock);
    let (peer_tx, peer_rx) = watch::channel::<Option<PathBuf>>(None);
    let reader = {
        let (sock, port) = (Arc::clone(&sock), port.clone());
        async move {
            let mut buf = BytesMut::with_capacity(RECV_BUF);
            loop {
                reserve(&mut buf);
                match sock.recv_buf_from(&mut buf).await {
                    Ok((n, from)) => {
                        learn_peer(&peer_tx, &from);
                        if n == VFKIT_MAGIC.len() && &buf[..n] == VFKIT_MAGIC {
                            let _ = buf.split_to(n);
                            continue;
                        }
                        deliver(&port, &mut buf, n);
                    }
                    Err(e) => {
                        tracing::warn!("listen-dgram recv: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some(frame) = rx.frames.recv().await {
            let peer = peer_rx.borrow().clone();
            let Some(peer) = peer else { continue };
            if send_retrying(&sock, &frame, Some(&peer)).await.is_err() {
                port.framing_error();
            }
        }
    };
    tokio::spawn(async move {
        tokio::select! {
            _ = reader => {}
            _ = writer => {}
        }
    });
    Ok(path.clone())
}

fn learn_peer(peer: &watch::Sender<Option<PathBuf>>, from: &tokio::net::unix::SocketAddr) {
    let Some(path) = from.as_pathname() else {
        return;
    };
    if peer.borrow().as_deref() != Some(path) {
        tracing::info!("datagram peer is now {}", path.display());
        peer.send_replace(Some(path.to_path_buf()));
    }
}

fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < RECV_BUF {
        buf.reserve(RECV_BUF * 4);
    }
}

fn deliver(port: &PortTx, buf: &mut BytesMut, n: usize) {
    let frame: Bytes = buf.split_to(n).freeze();
    if frame.is_empty() {
        port.framing_error();
    } else {
        port.send(frame);
    }
}

/// Send one datagram, waiting out a full socket (EAGAIN is handled by tokio; ENOBUFS, which
/// macOS returns instead, is retried here) for up to [`FULL_RETRY`].
async fn send_retrying(sock: &UnixDatagram, frame: &[u8], to: Option<&PathBuf>) -> io::Result<()> {
    let deadline = tokio::time::Instant::now() + FULL_RETRY;
    let mut pause = Duration::from_micros(50);
    loop {
        let r = match to {
            Some(p) => sock.send_to(frame, p).await,
            None => sock.send(frame).await,
        };
        match r {
            Ok(_) => return Ok(()),
            Err(e)
                if e.raw_os_error() == Some(libc::ENOBUFS)
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    }
}

fn is_peer_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNREFUSED)
            | Some(libc::EPIPE)
            | Some(libc::ENOTCONN)
            | Some(libc::ECONNRESET)
    )
}

/// Large socket buffers: Apple wants the receiver's SO_RCVBUF at least 2x (recommends 4x) the
/// sender's SO_SNDBUF; Lima uses 1 MiB / 4 MiB. Best effort.
pub(crate) fn set_buffers<S: std::os::fd::AsFd>(sock: &S) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = setsockopt(sock, sockopt::SndBuf, &(1 << 20));
    let _ = setsockopt(sock, sockopt::RcvBuf, &(4 << 20));
}
