//! An already-connected socket fd as a port: `--fd N` (inherited from the parent, e.g. one end
//! of a socketpair) and every fd received on `--listen-fd`. As QEMU's `-netdev socket,fd=`
//! does, SO_TYPE decides the framing: SOCK_STREAM takes the length prefix, SOCK_DGRAM one
//! frame per datagram.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use nix::sys::socket::{getsockopt, sockopt, AddressFamily, SockType};

use super::{dgram, stream};
use crate::switch::Switch;

/// Adopt `fd` as a new port named `name`. Errors when the fd is not a socket we can frame.
pub fn adopt(switch: &Arc<Switch>, fd: OwnedFd, name: String) -> anyhow::Result<()> {
    let kind = getsockopt(&fd, sockopt::SockType)
        .map_err(|e| anyhow::anyhow!("{name}: not a socket ({e})"))?;
    let family = socket_family(&fd);
    set_nonblocking(&fd)?;
    match (kind, family) {
        (SockType::Stream, Some(AddressFamily::Unix)) => {
            let s = tokio::net::UnixStream::from_std(std::os::unix::net::UnixStream::from(fd))?;
            stream::spawn_unix(switch, s, name);
        }
        (SockType::Stream, Some(AddressFamily::Inet | AddressFamily::Inet6)) => {
            let s = tokio::net::TcpStream::from_std(std::net::TcpStream::from(fd))?;
            stream::spawn_tcp(switch, s, name);
        }
        (SockType::Datagram, Some(AddressFamily::Unix)) => {
            let s = std::os::unix::net::UnixDatagram::from(fd);
            dgram::set_buffers(&s);
            let s = tokio::net::UnixDatagram::from_std(s)?;
            let (port, rx) = switch.attach(name);
            tokio::spawn(dgram::serve_connected(s, port, rx));
        }
        (kind, family) => anyhow::bail!("{name}: unsupported socket ({kind:?}, {family:?})"),
    }
    Ok(())
}

fn socket_family(fd: &OwnedFd) -> Option<AddressFamily> {
    let mut domain: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid fd and a c_int-sized out buffer with its length.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&mut domain as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (r == 0).then(|| AddressFamily::from_i32(domain)).flatten()
}

pub(crate) fn set_nonblocking(fd: &OwnedFd) -> anyhow::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}
