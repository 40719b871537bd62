//! `--tap-netns PATH [--tap NAME]` (Linux): a tap device created inside another network
//! namespace (like slirp4netns `--netns-type=path`), one frame per read and write. Only the
//! creation happens in the target namespace, on a short-lived thread; the daemon's own sockets
//! stay in the daemon's namespace. The device disappears when the daemon closes it.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::BytesMut;
use nix::sched::{setns, CloneFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::switch::{PortRx, PortTx, Switch};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Create tap `name` in the namespace at `netns` with `mtu`, bring it up, serve it as a port.
pub fn start(switch: &Arc<Switch>, netns: &Path, name: &str, mtu: u16) -> anyhow::Result<()> {
    let fd = create_in_netns(netns, name, mtu)
        .map_err(|e| anyhow::anyhow!("tap-netns {}: creating {name}: {e}", netns.display()))?;
    super::fd::set_nonblocking(&fd)?;
    // SAFETY: the OwnedFd keeps the fd open and the same for the AsyncFd's whole life.
    let fd =
        unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }
            .map_err(|e| e.into_parts().1)?;
    tracing::info!("serving tap {name} in {}", netns.display());
    let (port, rx) = switch.attach(format!("tap {name}@{}", netns.display()));
    tokio::spawn(serve(Arc::new(fd), port, rx));
    Ok(())
}

async fn serve(fd: Arc<AsyncFd<OwnedFd>>, port: PortTx, mut rx: PortRx) {
    let max = port.switch().max_frame();
    let reader = {
        let (fd, port) = (Arc::clone(&fd), port.clone());
        async move {
            let mut buf = BytesMut::with_capacity(4 * 65536);
            loop {
                if buf.capacity() - buf.len() < max + 1 {
                    buf.reserve(4 * 65536);
                }
                let r = fd
                    .async_io(Interest::READABLE, |fd| {
                        let spare = buf.spare_capacity_mut();
                        // SAFETY: reading into the spare capacity of our own buffer.
                        let n = unsafe {
                            libc::read(fd.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len())
                        };
                        if n < 0 {
                            Err(io::Error::last_os_error())
                        } else {
                            Ok(n as usize)
                        }
                    })
                    .await;
                match r {
                    Ok(0) => return io::Error::other("tap closed"),
                    Ok(n) => {
                        // SAFETY: the kernel wrote n bytes.
                        unsafe { buf.set_len(n) };
                        port.send(buf.split_to(n).freeze());
                    }
                    Err(e) => return e,
                }
            }
        }
    };
    let writer = async {
        while let Some(frame) = rx.frames.recv().await {
            let r = fd
                .async_io(Interest::WRITABLE, |fd| {
                    // SAFETY: writing from a live buffer.
                    let n =
                        unsafe { libc::write(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
                    if n < 0 {
                        Err(io::Error::last_os_error())
                    } else {
                        Ok(())
                    }
                })
                .await;
            if let Err(e) = r {
                if e.raw_os_error() != Some(libc::EIO) {
                    return e;
                }
                // EIO: the link is down in the namespace; the frame is lost, the port stays.
            }
        }
        io::Error::other("port closed")
    };
    tokio::select! {
        e = reader => tracing::info!(port = port.id(), "tap read ended: {e}"),
        e = writer => tracing::info!(port = port.id(), "tap write ended: {e}"),
    }
    port.detach();
}

fn create_in_netns(netns: &Path, name: &str, mtu: u16) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::other(format!("bad interface name {name:?}")));
    }
    let ns = std::fs::File::open(netns)?;
    let name = name.to_string();
    let path: PathBuf = netns.to_path_buf();
    std::thread::spawn(move || -> io::Result<OwnedFd> {
        // This thread alone moves into the target namespace and ends there.
        nix::sched::unshare(CloneFlags::CLONE_FS).map_err(io::Error::from)?;
        setns(&ns, CloneFlags::CLONE_NEWNET)
            .map_err(|e| io::Error::other(format!("setns {}: {e}", path.display())))?;
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        let fd = OwnedFd::from(tun);
        let mut req = ifreq(&name)?;
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF takes a pointer to an ifreq.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        configure_link(&name, mtu)?;
        Ok(fd)
    })
    .join()
    .map_err(|_| io::Error::other("tap creation thread panicked"))?
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let c = CString::new(name).map_err(|_| io::Error::other("interface name has a NUL"))?;
    for (dst, src) in req.ifr_name.iter_mut().zip(c.as_bytes_with_nul()) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

/// Set the MTU and bring the link up, through an ioctl socket of the current namespace.
fn configure_link(name: &str, mtu: u16) -> io::Result<()> {
    // SAFETY: plain socket call; the fd is owned right away.
    let raw: RawFd =
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
    // SAFETY: SIOCSIFMTU / SIOCGIFFLAGS / SIOCSIFFLAGS take a pointer to an ifreq.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFMTU as _, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut req = ifreq(name)?;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
