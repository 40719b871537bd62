//! `--tap-netns PATH [--tap NAME]` (Linux): a tap device created inside another network
//! namespace (like slirp4netns `--netns-type=path`), one frame per read and write. Only the
//! creation happens in the target namespace, on a short-lived thread; the daemon's own sockets
//! stay in the daemon's namespace. The device disappears when the daemon closes it.
//!
//! With offload (the default) the device carries a virtio-net header before each frame
//! (`IFF_VNET_HDR`): TCP segments of up to 64 KiB go to the guest's kernel as one write with
//! a GSO header (`gso_size` = what fits the MTU), which its stack takes whole, as it takes
//! what GRO builds. The other way the kernel is told we take partial checksums and TCPv4
//! segmentation (`TUNSETOFFLOAD` `TUN_F_CSUM | TUN_F_TSO4`): the guest sends TCP in segments
//! of up to 64 KiB and computes no checksums (`NEEDS_CSUM`). Such a frame enters the switch
//! with its checksum marked partial ([`Partial`]): the gateway takes it as it is (nothing
//! crossed a wire), the switch completes it for any other port and cuts large segments for
//! ports that do not take them. Frames to the guest with a partial checksum (the NAT computes
//! none for a guest on this port) go out with `NEEDS_CSUM`, which the guest's kernel takes
//! as verified. Datagrams that the NAT sends the guest in one frame (UDP segmentation offload,
//! [`Partial::segment`]) go out with a UDP GSO header where the kernel takes one (Linux 6.2
//! and later, found by asking it for `TUN_F_USO4 | TUN_F_USO6` once), and are cut into
//! single datagrams here where it does not (counted as the switch's `large_frames_cut`).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};
use nix::sched::{setns, CloneFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Notify;

use super::busypoll::BusyPoll;
use crate::switch::{Fast, Partial, PortRx, PortTx, Switch, SwitchCounters};
use netstack::nat::{Task, Workers};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_VNET_HDR: libc::c_int = 0x4000;
const IFF_MULTI_QUEUE: libc::c_int = 0x0100;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
const IFF_ATTACH_QUEUE: libc::c_int = 0x0200;
const IFF_DETACH_QUEUE: libc::c_int = 0x0400;

/// `struct virtio_net_hdr` (the legacy 10-byte header; little-endian fields on the
/// little-endian machines this runs on, which the kernel assumes for tap by default).
const VNET_HDR_LEN: usize = 10;
const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;
const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const TUN_F_CSUM: libc::c_ulong = 0x01;
const TUN_F_TSO4: libc::c_ulong = 0x02;
const TUN_F_USO4: libc::c_ulong = 0x20;
const TUN_F_USO6: libc::c_ulong = 0x40;

/// What the virtio-net header `h` says of the frame after it: Ok(Some) for the partial
/// checksum of an IPv4 TCP or UDP packet, left so; Ok(None) for a whole frame (any other
/// partial checksum is completed here). Err for what we never enabled (other GSO types) and
/// for checksum offsets that lie.
fn accept_offloaded(h: &[u8], frame: &mut [u8]) -> Result<Option<Partial>, ()> {
    if h[1] & !VIRTIO_NET_HDR_GSO_ECN != 0
        && h[1] & !VIRTIO_NET_HDR_GSO_ECN != VIRTIO_NET_HDR_GSO_TCPV4
    {
        return Err(());
    }
    if h[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM == 0 {
        return Ok(None);
    }
    let said = Partial {
        start: u16::from_le_bytes([h[6], h[7]]),
        offset: u16::from_le_bytes([h[8], h[9]]),
        segment: 0,
    };
    // Left partial only where the frame's own TCP or UDP checksum is: the switch and the
    // gateway rely on that.
    match Partial::of_ipv4(frame) {
        Some(p) if p == said => Ok(Some(p)),
        _ if said.complete(frame) => Ok(None),
        _ => Err(()),
    }
}

/// The virtio-net header for `frame` on a link of `mtu`: all zero for a whole frame that
/// fits, `NEEDS_CSUM` for a partial checksum, a TCPv4 GSO header for a larger IPv4 TCP
/// segment, None for any other large frame.
fn vnet_header(frame: &[u8], mtu: usize, partial: Option<Partial>) -> Option<[u8; VNET_HDR_LEN]> {
    let mut h = [0u8; VNET_HDR_LEN];
    if let Some(p) = partial {
        h[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        h[6..8].copy_from_slice(&p.start.to_le_bytes());
        h[8..10].copy_from_slice(&p.offset.to_le_bytes());
    }
    if let Some(p) = partial.filter(|p| p.segment > 0) {
        // Several datagrams of `segment` bytes each (the last may be shorter), each fitting
        // the MTU, however short the frame: the guest's kernel cuts them apart.
        if frame.get(12..14)? != [0x08, 0x00] || *frame.get(14 + 9)? != 17 {
            return None;
        }
        let ihl = usize::from(*frame.get(14)? & 0x0f) * 4;
        let hdr_len = 14 + ihl + 8;
        if ihl < 20 || usize::from(p.segment) + ihl + 8 > mtu || frame.len() <= hdr_len {
            return None;
        }
        h[1] = VIRTIO_NET_HDR_GSO_UDP_L4;
        h[2..4].copy_from_slice(&(hdr_len as u16).to_le_bytes());
        h[4..6].copy_from_slice(&p.segment.to_le_bytes());
        return Some(h);
    }
    if frame.len() <= mtu + 14 {
        return Some(h);
    }
    if frame.get(12..14)? != [0x08, 0x00] || *frame.get(14 + 9)? != 6 {
        return None;
    }
    let ihl = usize::from(*frame.get(14)? & 0x0f) * 4;
    let doff = usize::from(*frame.get(14 + ihl + 12)? >> 4) * 4;
    let hdr_len = 14 + ihl + doff;
    let gso_size = mtu.checked_sub(ihl + doff)?;
    if ihl < 20 || doff < 20 || frame.len() <= hdr_len || gso_size == 0 {
        return None;
    }
    h[1] = VIRTIO_NET_HDR_GSO_TCPV4;
    h[2..4].copy_from_slice(&(hdr_len as u16).to_le_bytes());
    h[4..6].copy_from_slice(&(gso_size as u16).to_le_bytes());
    Some(h)
}

/// Create tap `name` in the namespace at `netns` with `mtu`, bring it up, serve it as a port
/// (with segmentation offload when `offload`).
///
/// The port runs on a thread of its own with a single-threaded runtime, and so do the NAT's
/// connections it opens (the gateway's fast path spawns them from the reader): a frame, its
/// connection and the answer stay on one thread, with no task handed between threads. In a
/// runtime of several threads the reactor's thread was woken for every frame the guest queued
/// while another thread was reading them, and a connection's every step woke another thread:
/// about a third more CPU per connection, and large datagrams a fifth slower. Each tap port
/// has its thread, so several guests use several cores. After each frame either way the thread
/// keeps polling for a while ([`BusyPoll`], up to `busy_poll`) before it sleeps.
///
/// With `queues` > 1 the device is multi-queue (`IFF_MULTI_QUEUE`, as a virtio NIC with
/// several queue pairs) and each queue has such a thread, but only queue 0 is attached at
/// first: every new connection comes in there, to the one thread that busy-polls. The queues'
/// threads are the NAT's workers ([`netstack::nat::Workers`]): a connection that turns out to
/// carry bulk data moves to the thread with the fewest such, whose queue is attached then
/// (and detached when no connection runs on that thread any more). It writes its frames through
/// that queue, and the guest's kernel sends the flow's frames where we last wrote it (tun's
/// flow table), so the connection again stays on one thread and several streams use several
/// cores. While a second queue is attached the guest's kernel spreads new flows over both by
/// hash. Frames from elsewhere (the gateway, other ports, threads of no queue) and from a
/// queue's thread while its queue is detached go out through queue 0, which also writes the
/// switch's queued frames.
///
/// Returns the workers when there are several queues (for [`netstack::nat::Nat::add_workers`]).
pub fn start(
    switch: &Arc<Switch>,
    netns: &Path,
    name: &str,
    mtu: u16,
    offload: bool,
    busy_poll: Duration,
    queues: usize,
) -> anyhow::Result<Option<Arc<dyn Workers>>> {
    let queues = queues.clamp(1, MAX_QUEUES);
    let fds = create_in_netns(netns, name, mtu, offload, queues)
        .map_err(|e| anyhow::anyhow!("tap-netns {}: creating {name}: {e}", netns.display()))?;
    let queues = fds.len();
    let uso = offload
        && takes_udp_segments(&fds[0])
            .map_err(|e| anyhow::anyhow!("tap {name}: setting its offloads: {e}"))?;
    tracing::info!(
        "serving tap {name} in {} ({queues} queue{}{})",
        netns.display(),
        if queues == 1 { "" } else { "s" },
        if uso {
            ", UDP segmentation offload"
        } else {
            ""
        }
    );
    let label = format!("tap {name}@{}", netns.display());
    let (port, rx) = if offload {
        switch.attach_large(label)
    } else {
        switch.attach(label)
    };
    let mut rx = Some(rx);
    let turn = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut egresses = Vec::new();
    let mut runtimes = Vec::new();
    for (i, fd) in fds.into_iter().enumerate() {
        super::fd::set_nonblocking(&fd)?;
        if i > 0 {
            set_queue(&fd, false)
                .map_err(|e| anyhow::anyhow!("tap {name}: detaching queue {i}: {e}"))?;
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let fd = {
            // Registered with the queue's own reactor.
            let _port_runtime = runtime.enter();
            // SAFETY: the OwnedFd keeps the fd open and the same for the AsyncFd's whole life.
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }
                .map_err(|e| e.into_parts().1)?
        };
        egresses.push(Arc::new(Egress {
            fd: Arc::new(fd),
            vnet: offload,
            uso,
            mtu: usize::from(mtu),
            state: Mutex::new(EgressState::default()),
            notify: Notify::new(),
            port: port.clone(),
            busy: BusyPoll::shared(busy_poll, Arc::clone(&turn), i),
            attached: Flag::new(i == 0),
            attach: Mutex::new(0),
        }));
        runtimes.push(runtime);
    }
    let tap = NEXT_TAP.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let direct = egresses.clone();
    switch.set_fast_path(
        &port,
        Arc::new(move |frame: &Bytes, partial| {
            let q = queue_of(tap).unwrap_or(0);
            let q = if direct[q].is_attached() { q } else { 0 };
            direct[q].offer(frame, partial)
        }),
    );
    // Each queue's thread owns its worker; the NAT's [`Queues`] only refer to them.
    let owned: Vec<Arc<Worker>> = egresses
        .iter()
        .zip(&runtimes)
        .map(|(egress, runtime)| {
            Arc::new(Worker {
                egress: Arc::clone(egress),
                handle: runtime.handle().clone(),
            })
        })
        .collect();
    let workers: Option<Arc<dyn Workers>> = (egresses.len() > 1).then(|| {
        Arc::new(Queues {
            tap,
            workers: owned.iter().map(Arc::downgrade).collect(),
        }) as Arc<dyn Workers>
    });
    let ended = Arc::new(Flag::default());
    for (i, ((egress, runtime), worker)) in
        egresses.into_iter().zip(runtimes).zip(owned).enumerate()
    {
        let thread_port = port.clone();
        let rx = rx.take();
        let ended = Arc::clone(&ended);
        let thread = if i == 0 {
            format!("tap {name}")
        } else {
            format!("tap {name} q{i}")
        };
        let spawned = std::thread::Builder::new().name(thread).spawn(move || {
            QUEUE.with(|q| q.set(Some((tap, i))));
            // The reader flushes them whenever the device has no more frames.
            netstack::nat::gather_udp_sends();
            runtime.block_on(serve(egress, thread_port, rx, &ended));
            drop(worker);
        });
        if let Err(e) = spawned {
            port.detach();
            return Err(e.into());
        }
    }
    Ok(workers)
}

/// Attach (`true`) or detach one queue of a multi-queue tap (`TUNSETQUEUE`).
fn set_queue(fd: &impl AsRawFd, attach: bool) -> io::Result<()> {
    // SAFETY: an all-zero ifreq is valid; only the flags are read.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let flag = if attach {
        IFF_ATTACH_QUEUE
    } else {
        IFF_DETACH_QUEUE
    };
    req.ifr_ifru.ifru_flags = flag as libc::c_short;
    // SAFETY: TUNSETQUEUE takes a pointer to an ifreq.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETQUEUE as _, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One queue's thread as a worker: its queue and its runtime. Owned by the thread, so that
/// they go (the device's fds with them) when the port ends, though the NAT keeps its
/// [`Queues`] for good.
struct Worker {
    egress: Arc<Egress>,
    handle: tokio::runtime::Handle,
}

/// The queues' threads as the NAT's workers.
struct Queues {
    /// This device's number in the threads' [`QUEUE`].
    tap: usize,
    workers: Vec<std::sync::Weak<Worker>>,
}

impl Workers for Queues {
    fn count(&self) -> usize {
        self.workers.len()
    }

    fn current(&self) -> Option<usize> {
        queue_of(self.tap)
    }

    /// A task handed to the thread of a port that has ended is dropped (its connection
    /// with it: the guest is gone).
    fn spawn(&self, to: usize, task: Task) {
        if let Some(w) = self.workers[to].upgrade() {
            w.handle.spawn(task);
        }
    }

    /// A queue past the first is attached while connection tasks run on its thread (failing
    /// that, they run there all the same and write through queue 0, as any thread of a
    /// detached queue does), and detached when the last has ended or moved away.
    fn arrived(&self, worker: usize) {
        if let Some(w) = self.workers[worker].upgrade().filter(|_| worker > 0) {
            w.egress.arrived();
        }
    }

    fn left(&self, worker: usize) {
        if let Some(w) = self.workers[worker].upgrade().filter(|_| worker > 0) {
            w.egress.left();
        }
    }
}

/// The most queues a tap device gets (`--tap-queues`).
pub const MAX_QUEUES: usize = 16;

thread_local! {
    /// The tap device (numbered by [`NEXT_TAP`]) and queue this thread serves: what it sends
    /// to that device's guest goes out through that queue (and the kernel then steers the
    /// guest's frames of that flow to the same queue). Any other thread writes through queue 0.
    static QUEUE: std::cell::Cell<Option<(usize, usize)>> = const { std::cell::Cell::new(None) };
}

static NEXT_TAP: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The queue of tap `tap` that this thread serves, if it serves one.
fn queue_of(tap: usize) -> Option<usize> {
    QUEUE
        .with(|q| q.get())
        .and_then(|(t, q)| (t == tap).then_some(q))
}

/// A flag that tasks can wait for: one queue of a tap device has ended (the others end with
/// it), a queue is attached.
#[derive(Default)]
struct Flag {
    on: std::sync::atomic::AtomicBool,
    notify: Notify,
}

impl Flag {
    fn new(on: bool) -> Flag {
        Flag {
            on: std::sync::atomic::AtomicBool::new(on),
            notify: Notify::new(),
        }
    }

    fn is_set(&self) -> bool {
        self.on.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn set(&self) {
        self.on.store(true, std::sync::atomic::Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    fn clear(&self) {
        self.on.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Until the flag is set.
    async fn wait(&self) {
        loop {
            let n = self.notify.notified();
            if self.is_set() {
                return;
            }
            n.await;
        }
    }
}

/// Frames to the guest: written at once by whoever sends them (a connection's task, the
/// gateway) when nothing is waiting before them and the device takes them; otherwise queued,
/// in order, for the port's writer task, which waits until the device is writable.
struct Egress {
    fd: Arc<AsyncFd<OwnedFd>>,
    vnet: bool,
    /// The kernel takes frames of several UDP datagrams with a GSO header.
    uso: bool,
    mtu: usize,
    state: Mutex<EgressState>,
    notify: Notify,
    port: PortTx,
    busy: BusyPoll,
    /// The queue is attached (queue 0 always is); its reader waits for it.
    attached: Flag,
    /// Connection tasks running on this queue's thread ([`Workers::arrived`]); the lock
    /// orders attaching and detaching.
    attach: Mutex<usize>,
}

#[derive(Default)]
struct EgressState {
    queue: VecDeque<(Bytes, Option<Partial>)>,
    /// The writer task has taken a frame from the queue and not yet written it.
    writing: bool,
}

impl Egress {
    fn is_attached(&self) -> bool {
        self.attached.is_set()
    }

    /// A connection task runs on this queue's thread (not queue 0's): attach the queue if it
    /// is not.
    fn arrived(&self) {
        let mut n = self.attach.lock().unwrap();
        *n += 1;
        if !self.is_attached() {
            match set_queue(self.fd.get_ref(), true) {
                Ok(()) => {
                    self.attached.set();
                    tracing::debug!(port = self.port.id(), "tap queue attached");
                }
                Err(e) => tracing::warn!(port = self.port.id(), "attaching a tap queue: {e}"),
            }
        }
    }

    /// A connection task has left this queue's thread (ended or moved): detach the queue
    /// after the last. (Frames of other flows still unread in it are lost then: UDP's, or
    /// those of a connection that has just ended.)
    fn left(&self) {
        let mut n = self.attach.lock().unwrap();
        *n = n.saturating_sub(1);
        if *n == 0 && self.is_attached() {
            // Marked first: from now on frames leave through queue 0.
            self.attached.clear();
            if let Err(e) = set_queue(self.fd.get_ref(), false) {
                tracing::warn!(port = self.port.id(), "detaching a tap queue: {e}");
            } else {
                tracing::debug!(port = self.port.id(), "tap queue detached");
            }
        }
    }

    /// The switch's fast path for this port: takes every unicast frame, save one whose checksum
    /// is left partial where the device takes no vnet header.
    fn offer(&self, frame: &Bytes, partial: Option<Partial>) -> Fast {
        if partial.is_some() && !self.vnet {
            return Fast::Declined; // the switch completes it and queues it
        }
        if let Some(datagrams) = self.cut(frame, partial) {
            for d in datagrams {
                self.offer(&d, None);
            }
            return Fast::Taken;
        }
        let Some(header) = self.header(frame, partial) else {
            return Fast::Taken;
        };
        let mut st = self.state.lock().unwrap();
        if st.queue.is_empty() && !st.writing {
            match write_frame(
                self.fd.get_ref().as_raw_fd(),
                &header,
                self.hdr_len(),
                frame,
            ) {
                Ok(()) => {
                    self.busy.frame();
                    return Fast::Taken;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // EIO: the link is down in the namespace; the frame is lost, the port stays.
                Err(e) if e.raw_os_error() == Some(libc::EIO) => return Fast::Taken,
                Err(e) => {
                    tracing::debug!(port = self.port.id(), "tap write: {e}");
                    return Fast::Taken;
                }
            }
        }
        if st.queue.len() >= crate::switch::PORT_QUEUE {
            SwitchCounters::bump(&self.port.switch().counters().drop_queue_full);
            return Fast::Taken;
        }
        st.queue.push_back((frame.clone(), partial));
        drop(st);
        self.notify.notify_one();
        Fast::Taken
    }

    /// A frame of several UDP datagrams for a kernel that takes no such frames: the
    /// datagrams one by one (an empty list, counted, when the frame does not hold together).
    fn cut(&self, frame: &[u8], partial: Option<Partial>) -> Option<Vec<Bytes>> {
        let p = partial.filter(|p| p.segment > 0 && !self.uso)?;
        let datagrams = netstack::offload::segment_udp4(frame, usize::from(p.segment));
        match datagrams {
            Some(_) => SwitchCounters::bump(&self.port.switch().counters().large_frames_cut),
            None => self.port.framing_error(),
        }
        Some(datagrams.unwrap_or_default())
    }

    fn hdr_len(&self) -> usize {
        if self.vnet {
            VNET_HDR_LEN
        } else {
            0
        }
    }

    /// The virtio-net header for `frame` (zeroes without offload); None (counted) for a frame
    /// this device cannot take.
    fn header(&self, frame: &[u8], partial: Option<Partial>) -> Option<[u8; VNET_HDR_LEN]> {
        if !self.vnet {
            return Some([0; VNET_HDR_LEN]);
        }
        let h = vnet_header(frame, self.mtu, partial);
        if h.is_none() {
            self.port.framing_error();
        }
        h
    }

    /// Write `frame`, waiting until the device takes it. Errors other than EIO and EINVAL
    /// (a frame the kernel refuses, counted) end the port.
    async fn write(&self, frame: &Bytes, partial: Option<Partial>) -> io::Result<()> {
        if let Some(datagrams) = self.cut(frame, partial) {
            for d in datagrams {
                Box::pin(self.write(&d, None)).await?;
            }
            return Ok(());
        }
        let Some(header) = self.header(frame, partial) else {
            return Ok(());
        };
        let r = self
            .fd
            .async_io(Interest::WRITABLE, |fd| {
                write_frame(fd.as_raw_fd(), &header, self.hdr_len(), frame)
            })
            .await;
        self.busy.frame();
        match r {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                self.port.framing_error();
                Ok(())
            }
            // EIO: the link is down in the namespace; the frame is lost, the port stays.
            // Likewise a frame queued here before the queue was detached.
            Err(e) if e.raw_os_error() != Some(libc::EIO) && self.is_attached() => Err(e),
            _ => Ok(()),
        }
    }

    /// The writer task: the queued frames, then the switch's queue (broadcasts), in order.
    async fn run_writer(&self, mut rx: Option<&mut PortRx>) -> io::Error {
        loop {
            loop {
                let (frame, partial) = {
                    let mut st = self.state.lock().unwrap();
                    let Some(f) = st.queue.pop_front() else {
                        break;
                    };
                    st.writing = true;
                    f
                };
                let r = self.write(&frame, partial).await;
                self.state.lock().unwrap().writing = false;
                if let Err(e) = r {
                    return e;
                }
            }
            tokio::select! {
                () = self.notify.notified() => {}
                f = async { match rx.as_mut() { Some(rx) => rx.frames.recv().await, None => std::future::pending().await } } => match f {
                    Some(f) => {
                        if let Err(e) = self.write(&f, None).await {
                            return e;
                        }
                    }
                    None => return io::Error::other("port closed"),
                },
            }
        }
    }
}

/// One nonblocking write of a frame after its `hdr` header bytes.
fn write_frame(fd: RawFd, header: &[u8; VNET_HDR_LEN], hdr: usize, frame: &[u8]) -> io::Result<()> {
    let iov = [
        libc::iovec {
            iov_base: header.as_ptr() as *mut _,
            iov_len: hdr,
        },
        libc::iovec {
            iov_base: frame.as_ptr() as *mut _,
            iov_len: frame.len(),
        },
    ];
    // SAFETY: writing from live buffers; the kernel only reads them.
    let n = unsafe { libc::writev(fd, iov.as_ptr(), 2) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// How long the reader waits for a frame before it checks that the device is still there.
const LIVENESS: Duration = Duration::from_secs(2);

/// One queue of the port (queue 0 also writes the switch's queued frames, `rx`).
async fn serve(egress: Arc<Egress>, port: PortTx, mut rx: Option<PortRx>, ended: &Flag) {
    let (fd, vnet) = (Arc::clone(&egress.fd), egress.vnet);
    let hdr = egress.hdr_len();
    let max = if vnet {
        crate::switch::LARGE_FRAME + hdr
    } else {
        port.switch().max_frame()
    };
    let busy = &egress.busy;
    let reader = {
        let (fd, port) = (Arc::clone(&fd), port.clone());
        let egress = &egress;
        async move {
            let mut buf = BytesMut::with_capacity(4 * 65536);
            loop {
                // A detached queue is not read (it polls as never readable).
                egress.attached.wait().await;
                if buf.capacity() - buf.len() < max + 1 {
                    buf.reserve(4 * 65536);
                }
                let read = |buf: &mut BytesMut| {
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
                };
                let waited = tokio::time::timeout(
                    LIVENESS,
                    fd.async_io(Interest::READABLE, |_| {
                        let r = read(&mut buf);
                        if r.as_ref()
                            .is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock)
                        {
                            // Nothing more for now: the guest's datagrams held to go out
                            // together go before this thread waits.
                            netstack::nat::flush_udp_sends();
                        }
                        r
                    }),
                )
                .await;
                // A deleted device wakes no reader: after a quiet while, read once anyway,
                // which fails (EBADFD) when the device is gone.
                let quiet = waited.is_err();
                let r = match waited {
                    Ok(r) => r,
                    Err(_) => match read(&mut buf) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        r => r,
                    },
                };
                if !matches!(r, Ok(n) if n >= hdr) {
                    // Whatever this is, no frame follows at once: what is held goes now.
                    netstack::nat::flush_udp_sends();
                }
                match r {
                    Ok(0) => return io::Error::other("tap closed"),
                    Ok(n) if n < hdr => port.framing_error(),
                    Ok(n) => {
                        // SAFETY: the kernel wrote n bytes.
                        unsafe { buf.set_len(n) };
                        let mut frame = buf.split_to(n);
                        let h = frame.split_to(hdr);
                        let partial = if vnet {
                            match accept_offloaded(&h, &mut frame) {
                                Ok(p) => p,
                                Err(()) => {
                                    port.framing_error();
                                    continue;
                                }
                            }
                        } else {
                            None
                        };
                        port.send_partial(frame.freeze(), partial);
                        busy.frame();
                        if quiet {
                            // Read after a quiet while, not because the device said so: the
                            // next read may not come soon.
                            netstack::nat::flush_udp_sends();
                        }
                    }
                    // Detached meanwhile: wait until it is attached again.
                    Err(_) if !egress.is_attached() => {}
                    Err(e) => return e,
                }
            }
        }
    };
    let writer = egress.run_writer(rx.as_mut());
    tokio::select! {
        e = reader => tracing::info!(port = port.id(), "tap read ended: {e}"),
        e = writer => tracing::info!(port = port.id(), "tap write ended: {e}"),
        () = busy.run() => {}
        () = ended.wait() => return,
    }
    ended.set();
    port.detach();
}

fn create_in_netns(
    netns: &Path,
    name: &str,
    mtu: u16,
    vnet: bool,
    queues: usize,
) -> io::Result<Vec<OwnedFd>> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::other(format!("bad interface name {name:?}")));
    }
    let ns = std::fs::File::open(netns)?;
    let name = name.to_string();
    let path: PathBuf = netns.to_path_buf();
    std::thread::spawn(move || -> io::Result<Vec<OwnedFd>> {
        // This thread alone moves into the target namespace and ends there.
        nix::sched::unshare(CloneFlags::CLONE_FS).map_err(io::Error::from)?;
        setns(&ns, CloneFlags::CLONE_NEWNET)
            .map_err(|e| io::Error::other(format!("setns {}: {e}", path.display())))?;
        let mut fds = Vec::new();
        let mut queues = queues;
        while fds.len() < queues {
            let tun = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")?;
            let fd = OwnedFd::from(tun);
            let mut req = ifreq(&name)?;
            let vnet_flag = if vnet { IFF_VNET_HDR } else { 0 };
            let mq_flag = if queues > 1 { IFF_MULTI_QUEUE } else { 0 };
            req.ifr_ifru.ifru_flags =
                (libc::IFF_TAP | libc::IFF_NO_PI | vnet_flag | mq_flag) as libc::c_short;
            // SAFETY: TUNSETIFF takes a pointer to an ifreq.
            if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut req) } < 0 {
                let e = io::Error::last_os_error();
                if mq_flag != 0 && fds.is_empty() && e.raw_os_error() == Some(libc::EINVAL) {
                    // A tap that exists already, made single-queue: serve it so.
                    tracing::info!("tap {name} exists without multiple queues: serving one");
                    queues = 1;
                    continue;
                }
                return Err(e);
            }
            if vnet {
                let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
                // SAFETY: TUNSETVNETHDRSZ takes a pointer to an int, TUNSETOFFLOAD an unsigned
                // long by value (what we take from the kernel: partial checksums, TCPv4 GSO).
                unsafe {
                    if libc::ioctl(fd.as_raw_fd(), TUNSETVNETHDRSZ as _, &size) < 0
                        || libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD as _, TUN_F_CSUM | TUN_F_TSO4)
                            < 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                }
            }
            fds.push(fd);
        }
        configure_link(&name, mtu)?;
        Ok(fds)
    })
    .join()
    .map_err(|_| io::Error::other("tap creation thread panicked"))?
}

/// Does the kernel take frames of several UDP datagrams with a UDP GSO header
/// (`VIRTIO_NET_HDR_GSO_UDP_L4`, Linux 6.2 and later)? Told by whether it knows `TUN_F_USO4`
/// and `TUN_F_USO6` (taken only together), which came with it; the device's offloads are set
/// back to what we take from the guest (not UDP segments), so that the kernel sends us none.
fn takes_udp_segments(fd: &OwnedFd) -> io::Result<bool> {
    let ours = TUN_F_CSUM | TUN_F_TSO4;
    let probe = ours | TUN_F_USO4 | TUN_F_USO6;
    // SAFETY: TUNSETOFFLOAD takes an unsigned long by value.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD as _, probe) } < 0 {
        return Ok(false);
    }
    // SAFETY: as above.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD as _, ours) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp_frame(payload: usize) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 32 + payload];
        f[12] = 0x08;
        f[14] = 0x45;
        f[14 + 9] = 6;
        f[14 + 20 + 12] = 8 << 4; // 32-byte TCP header (timestamps)
        f
    }

    #[test]
    fn headers_for_small_and_large_frames() {
        assert_eq!(vnet_header(&tcp_frame(1400), 1500, None), Some([0; 10]));
        let p = Partial {
            start: 34,
            offset: 16,
            segment: 0,
        };
        let h = vnet_header(&tcp_frame(1400), 1500, Some(p)).unwrap();
        assert_eq!(h[0], VIRTIO_NET_HDR_F_NEEDS_CSUM);
        assert_eq!(h[6..10], [34, 0, 16, 0]);
        let h = vnet_header(&tcp_frame(60000), 1500, None).unwrap();
        assert_eq!(h[1], VIRTIO_NET_HDR_GSO_TCPV4);
        assert_eq!(u16::from_le_bytes([h[2], h[3]]), 14 + 20 + 32);
        assert_eq!(u16::from_le_bytes([h[4], h[5]]), 1500 - 20 - 32);
        // Large but not IPv4 TCP, or truncated: not sent.
        let mut udp = tcp_frame(60000);
        udp[14 + 9] = 17;
        assert_eq!(vnet_header(&udp, 1500, None), None);
        assert_eq!(vnet_header(&[0u8; 1600], 1500, None), None);
        // Several UDP datagrams: a UDP GSO header with their size, the checksum partial.
        let p = Partial {
            start: 34,
            offset: 6,
            segment: 1472,
        };
        let h = vnet_header(&udp, 1500, Some(p)).unwrap();
        assert_eq!(h[0], VIRTIO_NET_HDR_F_NEEDS_CSUM);
        assert_eq!(h[1], VIRTIO_NET_HDR_GSO_UDP_L4);
        assert_eq!(u16::from_le_bytes([h[2], h[3]]), 14 + 20 + 8);
        assert_eq!(u16::from_le_bytes([h[4], h[5]]), 1472);
        assert_eq!(h[6..10], [34, 0, 6, 0]);
        // However short: five datagrams of one byte are five datagrams, not one of five bytes.
        let mut short = tcp_frame(0);
        short.truncate(14 + 20 + 8 + 5);
        short[14 + 9] = 17;
        let tiny = Partial { segment: 1, ..p };
        let h = vnet_header(&short, 1500, Some(tiny)).unwrap();
        assert_eq!(h[1], VIRTIO_NET_HDR_GSO_UDP_L4);
        assert_eq!(u16::from_le_bytes([h[4], h[5]]), 1);
        // Datagrams that would not fit the MTU one by one, or no size: not sent.
        let too_long = Partial { segment: 1473, ..p };
        assert_eq!(vnet_header(&udp, 1500, Some(too_long)), None);
        let no_size = Partial { segment: 0, ..p };
        assert_eq!(vnet_header(&udp, 1500, Some(no_size)), None);
    }

    #[test]
    fn offloaded_frames_are_left_partial_completed_or_refused() {
        let mut f = tcp_frame(100);
        let mut h = [0u8; VNET_HDR_LEN];
        assert_eq!(
            accept_offloaded(&h, &mut f),
            Ok(None),
            "no offload: taken as is"
        );
        h[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        h[6..8].copy_from_slice(&34u16.to_le_bytes());
        h[8..10].copy_from_slice(&16u16.to_le_bytes());
        let p = Partial {
            start: 34,
            offset: 16,
            segment: 0,
        };
        assert_eq!(
            accept_offloaded(&h, &mut f),
            Ok(Some(p)),
            "IPv4 TCP: left partial"
        );
        assert_eq!(f[34 + 16..34 + 18], [0, 0], "and untouched");
        // A partial checksum elsewhere (here: not IPv4) is completed.
        let mut v6 = tcp_frame(100);
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(accept_offloaded(&h, &mut v6), Ok(None));
        assert_ne!(v6[34 + 16..34 + 18], [0, 0], "the checksum was filled in");
        // An IPv4 TCP frame whose header names another checksum field: completed there.
        h[8..10].copy_from_slice(&6u16.to_le_bytes());
        assert_eq!(accept_offloaded(&h, &mut f), Ok(None));
        h[8..10].copy_from_slice(&60000u16.to_le_bytes());
        assert_eq!(
            accept_offloaded(&h, &mut f),
            Err(()),
            "a checksum offset past the frame"
        );
        h[0] = 0;
        h[1] = VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN;
        assert_eq!(accept_offloaded(&h, &mut f), Ok(None));
        h[1] = 4; // TCPv6 GSO, never enabled
        assert_eq!(accept_offloaded(&h, &mut f), Err(()));
    }
}
