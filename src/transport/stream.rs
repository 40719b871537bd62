//! Stream framing: each frame is sent as a 4-byte big-endian length, then the frame (QEMU
//! `-netdev stream` and `-netdev socket` with a stream fd, socket_vmnet, Lima's `_qemu.sock`).
//! Also the listeners and the connector that produce such streams.
//!
//! A zero length is skipped, a runt or oversize frame (up to the stream limit) is read and
//! dropped, both counted; a length over [`STREAM_LIMIT`] means the stream is garbage and the
//! port is closed. A peer that closes, even mid-frame, only removes its own port.

use std::path::PathBuf;
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use super::StreamAddr;
use crate::switch::{PortRx, PortTx, Switch};
use std::sync::Arc;

/// The largest length prefix accepted at all (gvproxy caps at 128 KiB too).
pub const STREAM_LIMIT: usize = 128 * 1024;
/// How much the writer batches into one write.
const WRITE_BATCH: usize = 256 * 1024;
/// The reader's buffer.
const READ_BUF: usize = 256 * 1024;

/// Serve one stream (already split into halves) as one switch port until either side ends.
pub async fn serve<R, W>(reader: R, writer: W, port: PortTx, rx: PortRx)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let writer_port = port.clone();
    let mut write_task = tokio::spawn(async move {
        if let Err(e) = write_frames(writer, rx).await {
            tracing::debug!(port = writer_port.id(), "stream write ended: {e}");
        }
    });
    tokio::select! {
        r = read_frames(reader, &port) => {
            if let Err(e) = r {
                tracing::debug!(port = port.id(), "stream read ended: {e}");
            }
            write_task.abort();
        }
        _ = &mut write_task => {}
    }
    port.detach();
}

async fn read_frames<R: AsyncRead + Unpin>(mut reader: R, port: &PortTx) -> std::io::Result<()> {
    let mut buf = BytesMut::with_capacity(READ_BUF);
    loop {
        // Take every complete frame out of the buffer.
        while buf.len() >= 4 {
            let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
            if len > STREAM_LIMIT {
                port.framing_error();
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("length prefix {len} over {STREAM_LIMIT}: closing the port"),
                ));
            }
            if buf.len() < 4 + len {
                buf.reserve(4 + len - buf.len());
                break;
            }
            buf.advance(4);
            let frame = buf.split_to(len).freeze();
            if len == 0 {
                port.framing_error();
            } else {
                // The switch drops and counts runts and frames over MTU + 14.
                port.send(frame);
            }
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(READ_BUF);
        }
        if reader.read_buf(&mut buf).await? == 0 {
            if !buf.is_empty() {
                port.framing_error();
            }
            return Ok(());
        }
    }
}

async fn write_frames<W: AsyncWrite + Unpin>(mut writer: W, mut rx: PortRx) -> std::io::Result<()> {
    let mut out = BytesMut::with_capacity(WRITE_BATCH);
    while let Some(frame) = rx.frames.recv().await {
        out.clear();
        out.put_u32(frame.len() as u32);
        out.put_slice(&frame);
        while out.len() < WRITE_BATCH {
            match rx.frames.try_recv() {
                Ok(frame) => {
                    out.put_u32(frame.len() as u32);
                    out.put_slice(&frame);
                }
                Err(_) => break,
            }
        }
        writer.write_all(&out).await?;
    }
    Ok(())
}

/// Attach a connected unix stream as a new port and serve it.
pub fn spawn_unix(switch: &Arc<Switch>, stream: UnixStream, name: String) {
    let (port, rx) = switch.attach(name);
    let (r, w) = stream.into_split();
    tokio::spawn(serve(r, w, port, rx));
}

/// Attach a connected TCP stream as a new port and serve it.
pub fn spawn_tcp(switch: &Arc<Switch>, stream: TcpStream, name: String) {
    let _ = stream.set_nodelay(true);
    let (port, rx) = switch.attach(name);
    let (r, w) = stream.into_split();
    tokio::spawn(serve(r, w, port, rx));
}

/// `--listen-qemu`: bind now (errors surface at start-up), accept peers forever, one port each.
/// Returns the socket path created, for removal at exit.
pub async fn listen(switch: &Arc<Switch>, addr: &StreamAddr) -> anyhow::Result<Option<PathBuf>> {
    match addr {
        StreamAddr::Unix(path) => {
            super::claim_socket_path(path)?;
            let listener = UnixListener::bind(path)
                .map_err(|e| anyhow::anyhow!("listen-qemu {}: {e}", path.display()))?;
            tracing::info!("listening for QEMU stream peers on {}", addr);
            let switch = Arc::clone(switch);
            let shown = addr.to_string();
            tokio::spawn(async move {
                let mut n = 0u64;
                loop {
                    match listener.accept().await {
                        Ok((s, _)) => {
                            n += 1;
                            spawn_unix(&switch, s, format!("{shown}#{n}"));
                        }
                        Err(e) => {
                            tracing::warn!("accept on {shown}: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            });
            Ok(Some(path.clone()))
        }
        StreamAddr::Tcp(sa) => {
            let listener = TcpListener::bind(sa)
                .await
                .map_err(|e| anyhow::anyhow!("listen-qemu {addr}: {e}"))?;
            tracing::info!("listening for QEMU stream peers on {}", addr);
            let switch = Arc::clone(switch);
            let shown = addr.to_string();
            tokio::spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok((s, peer)) => spawn_tcp(&switch, s, format!("{shown}<-{peer}")),
                        Err(e) => {
                            tracing::warn!("accept on {shown}: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            });
            Ok(None)
        }
    }
}

/// `--connect-qemu`: connect to a QEMU `server=on` stream socket, retrying until it accepts,
/// and again whenever it goes away.
pub fn connect(switch: &Arc<Switch>, addr: StreamAddr) {
    let switch = Arc::clone(switch);
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(50);
        let mut logged = false;
        loop {
            let name = format!("connect {addr}");
            let connected = match &addr {
                StreamAddr::Unix(p) => UnixStream::connect(p).await.map(|s| {
                    let (port, rx) = switch.attach(name);
                    let (r, w) = s.into_split();
                    tokio::spawn(serve(r, w, port, rx))
                }),
                StreamAddr::Tcp(a) => TcpStream::connect(a).await.map(|s| {
                    let _ = s.set_nodelay(true);
                    let (port, rx) = switch.attach(name);
                    let (r, w) = s.into_split();
                    tokio::spawn(serve(r, w, port, rx))
                }),
            };
            match connected {
                Ok(serving) => {
                    tracing::info!("connected to {addr}");
                    logged = false;
                    backoff = Duration::from_millis(50);
                    let _ = serving.await;
                    tracing::info!("{addr} went away; reconnecting");
                }
                Err(e) => {
                    if !logged {
                        tracing::info!("waiting for {addr} to accept: {e}");
                        logged = true;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    });
}
