//! `--listen-fd PATH`: a unix stream socket on which peers hand over socket fds by SCM_RIGHTS
//! (Lima's `_fd.sock`). Every fd received becomes one port (see [`super::fd`]); the connection
//! that carried it may stay open for more fds or close.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};

use crate::switch::Switch;

/// Bind PATH now and accept fd-passing peers forever.
pub fn listen(switch: &Arc<Switch>, path: &PathBuf) -> anyhow::Result<PathBuf> {
    super::claim_socket_path(path)?;
    let listener = UnixListener::bind(path)
        .map_err(|e| anyhow::anyhow!("listen-fd {}: {e}", path.display()))?;
    tracing::info!("listening for fd-passing peers on {}", path.display());
    let switch = Arc::clone(switch);
    let shown = path.display().to_string();
    tokio::spawn(async move {
        let mut n = 0u64;
        loop {
            match listener.accept().await {
                Ok((conn, _)) => {
                    n += 1;
                    let (switch, name) = (Arc::clone(&switch), format!("fd from {shown}#{n}"));
                    tokio::spawn(receive_fds(switch, conn, name));
                }
                Err(e) => {
                    tracing::warn!("accept on {shown}: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(path.clone())
}

async fn receive_fds(switch: Arc<Switch>, conn: UnixStream, name: String) {
    let mut count = 0;
    loop {
        let got = conn
            .async_io(Interest::READABLE, || {
                recv_fds(&conn).map_err(std::io::Error::from)
            })
            .await;
        match got {
            Ok((0, fds)) if fds.is_empty() => return, // EOF
            Ok((_, fds)) => {
                for fd in fds {
                    count += 1;
                    if let Err(e) = super::fd::adopt(&switch, fd, format!("{name}.{count}")) {
                        tracing::warn!("{e}");
                    }
                }
            }
            Err(e) => {
                tracing::debug!("{name}: {e}");
                return;
            }
        }
    }
}

fn recv_fds(conn: &UnixStream) -> nix::Result<(usize, Vec<OwnedFd>)> {
    let mut data = [0u8; 256];
    let mut iov = [IoSliceMut::new(&mut data)];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 16]);
    let msg = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel just installed these fds in our table; we own them now.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    Ok((msg.bytes, fds))
}
