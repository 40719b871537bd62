//! A flow's host datagram socket (a UDP flow's, a ping flow's), watched by the reactor for
//! reading and errors only.
//!
//! tokio's `UdpSocket` registers for writing too, edge-triggered: every datagram sent frees
//! send-buffer space and the kernel reports the socket writable again, which wakes a parked
//! runtime thread once per datagram for nothing (about one wake-up per datagram a guest sends,
//! the better part of the cost of a large one). A datagram socket's send does not wait here:
//! one the kernel cannot take (`EAGAIN`) is a datagram lost, as on any full queue.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use bytes::BytesMut;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

pub(crate) struct HostSocket(AsyncFd<std::net::UdpSocket>);

impl HostSocket {
    /// Watch `sock` (nonblocking, connected) for reading and errors.
    pub(crate) fn new(sock: std::net::UdpSocket) -> io::Result<HostSocket> {
        // SAFETY: the socket is owned by the AsyncFd, so its fd stays open and the same for
        // the registration's whole life.
        unsafe { AsyncFd::register_with_interest(sock, Interest::READABLE | Interest::ERROR) }
            .map(HostSocket)
            .map_err(|e| e.into_parts().1)
    }

    /// Wait until a datagram may be there.
    pub(crate) async fn readable(&self) -> io::Result<()> {
        self.0.readable().await.map(|_| ())
    }

    /// Wait until `interest` (the error queue: [`Interest::ERROR`]) may be ready.
    pub(crate) async fn ready(&self, interest: Interest) -> io::Result<()> {
        self.0.ready(interest).await.map(|_| ())
    }

    /// Run `f`; a `WouldBlock` from it clears `interest`'s readiness.
    pub(crate) fn try_io<R>(
        &self,
        interest: Interest,
        f: impl FnOnce() -> io::Result<R>,
    ) -> io::Result<R> {
        self.0.try_io(interest, |_| f())
    }

    /// Receive a datagram after what `buf` holds (into its spare capacity).
    pub(crate) fn try_recv_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
        self.0.try_io(Interest::READABLE, |s| {
            let spare = buf.spare_capacity_mut();
            // SAFETY: receiving into the spare capacity of `buf`.
            let n = unsafe { libc::recv(s.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = n as usize;
            // SAFETY: the kernel wrote n bytes into the spare capacity.
            unsafe { buf.set_len(buf.len() + n) };
            Ok(n)
        })
    }

    /// Receive a datagram into `buf`.
    pub(crate) fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_io(Interest::READABLE, |s| s.recv(buf))
    }

    /// Send a datagram now (see the module docs: no waiting).
    pub(crate) fn send(&self, datagram: &[u8]) -> io::Result<usize> {
        self.0.get_ref().send(datagram)
    }

    /// Send `datagrams`, each `segment` bytes but the last (which may be shorter), in one
    /// call: UDP segmentation offload (`UDP_SEGMENT`, Linux 4.18 and later), which cuts them
    /// apart below the socket. At most 64 of them, 65,507 bytes in all. All or none are sent.
    pub(crate) fn send_segments(&self, datagrams: &[bytes::Bytes], segment: u16) -> io::Result<()> {
        let mut iov: Vec<libc::iovec> = datagrams
            .iter()
            .map(|d| libc::iovec {
                iov_base: d.as_ptr() as *mut libc::c_void,
                iov_len: d.len(),
            })
            .collect();
        // SAFETY: CMSG_SPACE is a pure computation.
        const SPACE: usize = unsafe { libc::CMSG_SPACE(2) } as usize;
        let mut control = [0u64; SPACE.div_ceil(8)];
        // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len() as _;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = SPACE as _;
        // SAFETY: the control buffer holds one cmsg with 2 bytes of data (CMSG_SPACE(2)).
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_UDP;
            (*cmsg).cmsg_type = libc::UDP_SEGMENT;
            (*cmsg).cmsg_len = libc::CMSG_LEN(2) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment);
        }
        // SAFETY: msg points at live iovecs and control data; the socket is ours.
        let n = unsafe { libc::sendmsg(self.as_raw_fd(), &msg, libc::MSG_DONTWAIT) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsRawFd for HostSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.0.get_ref().as_raw_fd()
    }
}

impl AsFd for HostSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.get_ref().as_fd()
    }
}
