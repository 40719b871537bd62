//! The virtual L2 switch: every guest port and the gateway port hang off it.
//!
//! A learning switch: the source MAC of each frame is remembered for its port; a frame to a
//! known unicast MAC goes to that port only, a broadcast or multicast frame goes to every port
//! but its source, a frame to an unknown unicast MAC is dropped (every station on this link
//! announces itself by ARP or DHCP before anyone unicasts to it). Entries age out. Each port has
//! a bounded queue: a port that does not keep up loses frames (counted), it never stalls the
//! others. The switch does not parse anything above the Ethernet header.
//!
//! Ports that segment TCP themselves (a tap with segmentation offload) are attached with
//! [`Switch::attach_large`]: they may send and receive frames of up to 64 KiB (one large TCP
//! segment, or several UDP datagrams in one frame, cut apart by the kernel behind the port);
//! every other port gets frames of at most MTU + 14 bytes: large TCP segments and frames of
//! several datagrams are cut for it, anything else larger is dropped as oversize.
//!
//! A frame may enter with its TCP or UDP checksum left partial ([`Partial`]: a tap guest's
//! kernel computes none, the NAT computes none for such a guest). Only a port's fast path sees
//! it so (the tap hands it on with `NEEDS_CSUM`, the gateway trusts it); for everything else,
//! a port's queue, a broadcast, the capture, the switch completes the checksum first.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

pub use netstack::offload::Partial;
use netstack::MacAddr;

/// Identifies one port of the switch.
pub type PortId = u64;

/// Frames queued towards one port before it starts losing them.
pub const PORT_QUEUE: usize = 1024;

/// How long a learned MAC stays without being seen again.
pub const MAC_AGING: Duration = Duration::from_secs(300);

/// A MAC entry last seen at `seen` still stands at `now` (pinned ones are seen in the future).
fn fresh(seen: Instant, now: Instant) -> bool {
    seen > now || now.duration_since(seen) < MAC_AGING
}

/// Switch-wide counters (atomics: every port's task updates them).
#[derive(Debug, Default)]
pub struct SwitchCounters {
    /// Frames accepted from ports.
    pub frames_in: AtomicU64,
    /// Frames queued towards ports (a broadcast counts once per port).
    pub frames_out: AtomicU64,
    /// Bytes accepted from ports.
    pub bytes_in: AtomicU64,
    /// Bytes queued towards ports (a broadcast counts once per port).
    pub bytes_out: AtomicU64,
    /// Frames shorter than an Ethernet header.
    pub drop_runt: AtomicU64,
    /// Frames longer than MTU + 14 (from or to a port that takes no large frames).
    pub drop_oversize: AtomicU64,
    /// Frames longer than MTU + 14 (large TCP segments) or carrying several UDP datagrams
    /// queued towards ports.
    pub large_frames: AtomicU64,
    /// Of those, cut into MTU-sized segments or single datagrams for a port that takes no
    /// large frames.
    pub large_frames_cut: AtomicU64,
    /// Frames to a unicast MAC that no port has shown.
    pub drop_unknown_unicast: AtomicU64,
    /// Frames from a multicast/broadcast source MAC.
    pub drop_bad_source: AtomicU64,
    /// Source MACs not learned: the table was full ([`MAX_MACS`], [`MAX_MACS_PER_PORT`]).
    pub macs_not_learned: AtomicU64,
    /// Frames lost because the destination port's queue was full.
    pub drop_queue_full: AtomicU64,
    /// Framing errors reported by transports (bad length prefix, bad datagram).
    pub drop_framing: AtomicU64,
    /// Ports attached so far.
    pub ports_attached: AtomicU64,
    /// Ports detached so far.
    pub ports_detached: AtomicU64,
}

impl SwitchCounters {
    /// Add one to `counter`.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

struct Port {
    name: String,
    tx: mpsc::Sender<Bytes>,
    /// Takes (and may send) frames of up to [`LARGE_FRAME`] bytes.
    large: bool,
    /// Tried before the queue for unicast frames to this port (see [`Switch::set_fast_path`]).
    fast: Option<FastPath>,
}

/// A port's synchronous receiver for unicast frames ([`Fast`] says what it did). Runs on the
/// sending port's task, outside the switch's lock. `Some(partial)`: the frame's checksum is
/// left partial.
pub type FastPath = Arc<dyn Fn(&Bytes, Option<Partial>) -> Fast + Send + Sync>;

/// What a port's [`FastPath`] did with a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fast {
    /// It took the frame.
    Taken,
    /// Not taken: the frame goes to the port's queue as usual (its checksum completed).
    Declined,
    /// It took the frame and has this one queued to the port in its place, with the same
    /// source and destination (the fragments of a packet reassembled, that the port's task
    /// must handle whole). Longer than the MTU only for a port that takes large frames.
    Queue(Bytes),
}

/// The largest frame between ports that take large frames: a 64 KiB IP packet and its
/// Ethernet header.
pub const LARGE_FRAME: usize = 65535 + 14;

/// The most MACs the switch learns, and the most behind one port: a guest sending from
/// ever new source MACs must not grow the table without end, nor crowd out the others.
pub const MAX_MACS: usize = 4096;
pub const MAX_MACS_PER_PORT: usize = 1024;

#[derive(Default)]
struct State {
    ports: HashMap<PortId, Port>,
    macs: HashMap<MacAddr, (PortId, Instant)>,
    /// How many of `macs` each port has.
    per_port: HashMap<PortId, usize>,
    /// When a full table was last swept of aged entries (at most once per second).
    swept: Option<Instant>,
    next_id: PortId,
}

impl State {
    /// `mac` lives on `port` (seen at `seen`); false when the table is full, aged entries
    /// swept out.
    fn learn(&mut self, mac: MacAddr, port: PortId, seen: Instant, now: Instant) -> bool {
        // A new MAC needs room in the table and in its port's share; one moving from another
        // port, room in this port's share.
        let full = |st: &State| {
            let own = st.per_port.get(&port).copied().unwrap_or(0);
            match st.macs.get(&mac) {
                Some((p, _)) if *p == port => false,
                Some(_) => own >= MAX_MACS_PER_PORT,
                None => st.macs.len() >= MAX_MACS || own >= MAX_MACS_PER_PORT,
            }
        };
        if full(self) {
            if self
                .swept
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
            {
                self.swept = Some(now);
                self.macs.retain(|_, (_, seen)| fresh(*seen, now));
                self.per_port.clear();
                for (p, _) in self.macs.values() {
                    *self.per_port.entry(*p).or_default() += 1;
                }
            }
            if full(self) {
                return false;
            }
        }
        if let Some((old, _)) = self.macs.insert(mac, (port, seen)) {
            self.uncount(old);
        }
        *self.per_port.entry(port).or_default() += 1;
        true
    }

    fn forget(&mut self, mac: &MacAddr) {
        if let Some((port, _)) = self.macs.remove(mac) {
            self.uncount(port);
        }
    }

    fn uncount(&mut self, port: PortId) {
        if let Some(n) = self.per_port.get_mut(&port) {
            *n = n.saturating_sub(1);
        }
    }
}

/// The switch. Share it as `Arc<Switch>`.
pub struct Switch {
    state: Mutex<State>,
    max_frame: usize,
    counters: SwitchCounters,
    capture: std::sync::OnceLock<crate::pcap::Capture>,
}

/// A port's receiving end: the frames the switch sends to this port. Dropping it (and its
/// [`PortTx`]) detaches the port.
pub struct PortRx {
    /// Frames for this port, in order.
    pub frames: mpsc::Receiver<Bytes>,
}

/// A port's sending end: frames entering the switch from this port.
#[derive(Clone)]
pub struct PortTx {
    id: PortId,
    large: bool,
    switch: Arc<Switch>,
}

impl Switch {
    /// A switch for frames of at most `mtu + 14` bytes.
    pub fn new(mtu: u16) -> Arc<Switch> {
        Arc::new(Switch {
            state: Mutex::new(State::default()),
            max_frame: usize::from(mtu) + 14,
            counters: SwitchCounters::default(),
            capture: std::sync::OnceLock::new(),
        })
    }

    /// Record every frame that enters the switch from now on (`--pcap`); once only.
    pub fn capture_to(&self, capture: crate::pcap::Capture) {
        let _ = self.capture.set(capture);
    }

    /// Frames the capture lost, if capturing.
    pub fn capture_dropped(&self) -> Option<u64> {
        self.capture.get().map(|c| c.dropped())
    }

    /// The largest frame accepted (MTU + Ethernet header).
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// The switch's counters.
    pub fn counters(&self) -> &SwitchCounters {
        &self.counters
    }

    /// Attach a new port named `name` (for logs).
    pub fn attach(self: &Arc<Self>, name: impl Into<String>) -> (PortTx, PortRx) {
        self.attach_port(name.into(), false)
    }

    /// Attach a port that takes and sends frames of up to [`LARGE_FRAME`] bytes.
    pub fn attach_large(self: &Arc<Self>, name: impl Into<String>) -> (PortTx, PortRx) {
        self.attach_port(name.into(), true)
    }

    /// Does the port where `mac` lives take large frames?
    pub fn takes_large(&self, mac: MacAddr) -> bool {
        let st = self.state.lock().unwrap();
        st.macs
            .get(&mac)
            .and_then(|(id, _)| st.ports.get(id))
            .is_some_and(|p| p.large)
    }

    fn attach_port(self: &Arc<Self>, name: String, large: bool) -> (PortTx, PortRx) {
        let (tx, rx) = mpsc::channel(PORT_QUEUE);
        let id = {
            let mut st = self.state.lock().unwrap();
            st.next_id += 1;
            let id = st.next_id;
            st.ports.insert(
                id,
                Port {
                    name: name.clone(),
                    tx,
                    large,
                    fast: None,
                },
            );
            id
        };
        SwitchCounters::bump(&self.counters.ports_attached);
        tracing::info!(port = id, %name, "port attached");
        (
            PortTx {
                id,
                large,
                switch: Arc::clone(self),
            },
            PortRx { frames: rx },
        )
    }

    /// Hand unicast frames for `port` to `fast` first (the gateway routes the guests' TCP
    /// segments and UDP datagrams without a trip through its queue and task, and reassembles
    /// their fragments, queueing what it does not route as a whole packet, [`Fast::Queue`]).
    pub fn set_fast_path(&self, port: &PortTx, fast: FastPath) {
        if let Some(p) = self.state.lock().unwrap().ports.get_mut(&port.id) {
            p.fast = Some(fast);
        }
    }

    /// Remember `mac` as living on `port` for good (the gateway's own MAC).
    pub fn pin_mac(&self, port: &PortTx, mac: MacAddr) {
        let now = Instant::now();
        let far = now + Duration::from_secs(100 * 365 * 24 * 3600);
        let mut st = self.state.lock().unwrap();
        if !st.learn(mac, port.id, far, now) {
            SwitchCounters::bump(&self.counters.macs_not_learned);
        }
    }

    fn detach(&self, id: PortId) {
        let mut st = self.state.lock().unwrap();
        if let Some(port) = st.ports.remove(&id) {
            st.macs.retain(|_, (p, _)| *p != id);
            st.per_port.remove(&id);
            SwitchCounters::bump(&self.counters.ports_detached);
            tracing::info!(port = id, name = %port.name, "port detached");
        }
    }

    fn forward(&self, from: PortId, from_large: bool, frame: Bytes, partial: Option<Partial>) {
        self.forward_at(from, from_large, frame, partial, Instant::now())
    }

    fn forward_at(
        &self,
        from: PortId,
        from_large: bool,
        mut frame: Bytes,
        mut partial: Option<Partial>,
        now: Instant,
    ) {
        let c = &self.counters;
        if frame.len() < 14 {
            SwitchCounters::bump(&c.drop_runt);
            return;
        }
        if frame.len()
            > if from_large {
                LARGE_FRAME
            } else {
                self.max_frame
            }
        {
            SwitchCounters::bump(&c.drop_oversize);
            return;
        }
        let dst: MacAddr = frame[0..6].try_into().unwrap();
        let src: MacAddr = frame[6..12].try_into().unwrap();
        if src[0] & 1 == 1 {
            SwitchCounters::bump(&c.drop_bad_source);
            return;
        }
        SwitchCounters::bump(&c.frames_in);
        c.bytes_in.fetch_add(frame.len() as u64, Ordering::Relaxed);
        if let Some(capture) = self.capture.get() {
            match partial {
                // Several datagrams in one frame stay so, partial (a port cuts them apart or
                // hands them on whole); the capture gets the datagrams, as the guest does.
                Some(p) if p.segment > 0 => {
                    for d in cut_datagrams(&frame, p).unwrap_or_default() {
                        capture.record(&d);
                    }
                }
                _ => {
                    frame = complete(frame, partial.take());
                    capture.record(&frame);
                }
            }
        }
        let mut st = self.state.lock().unwrap();
        match st.macs.get_mut(&src) {
            Some(entry) if entry.0 == from => {
                if entry.1 < now + MAC_AGING {
                    entry.1 = now;
                }
            }
            Some(entry) if entry.1 > now + MAC_AGING => {
                // A pinned MAC (the gateway's) is not taken over by a guest claiming it.
                SwitchCounters::bump(&c.drop_bad_source);
                return;
            }
            _ => {
                if !st.learn(src, from, now, now) {
                    SwitchCounters::bump(&c.macs_not_learned);
                }
            }
        }
        if dst[0] & 1 == 1 {
            let frames = match partial.filter(|p| p.segment > 0) {
                Some(p) => self.cut(&frame, p),
                None => vec![complete(frame, partial)],
            };
            for (id, port) in st.ports.iter() {
                if *id != from {
                    for f in &frames {
                        self.enqueue(port, f.clone());
                    }
                }
            }
            return;
        }
        let target = match st.macs.get(&dst) {
            Some((id, seen)) if fresh(*seen, now) => Some(*id),
            _ => None,
        };
        match target.and_then(|id| st.ports.get(&id).map(|p| (id, p))) {
            Some((id, port)) if id != from => {
                // Outside the lock: the fast path and cutting large frames take a while.
                let (tx, large, fast) = (port.tx.clone(), port.large, port.fast.clone());
                drop(st);
                // Several datagrams in one frame: whole only to a port that takes large frames
                // through its fast path, else cut apart (below), however short the frame.
                let datagrams = partial.filter(|p| p.segment > 0);
                // A large frame for a port that takes none is cut first (below).
                if let Some(fast) =
                    fast.filter(|_| large || (datagrams.is_none() && frame.len() <= self.max_frame))
                {
                    match fast(&frame, partial) {
                        Fast::Taken => {
                            if frame.len() > self.max_frame {
                                SwitchCounters::bump(&c.large_frames);
                            }
                            SwitchCounters::bump(&c.frames_out);
                            c.bytes_out.fetch_add(frame.len() as u64, Ordering::Relaxed);
                            return;
                        }
                        Fast::Queue(instead) => return self.enqueue_to(&tx, large, instead),
                        Fast::Declined => {}
                    }
                }
                if let Some(p) = datagrams {
                    for d in self.cut(&frame, p) {
                        self.enqueue_to(&tx, large, d);
                    }
                    return;
                }
                // Cutting a large frame computes every piece's checksum anyway.
                if large || frame.len() <= self.max_frame {
                    frame = complete(frame, partial);
                }
                self.enqueue_to(&tx, large, frame);
            }
            Some(_) => {} // to itself: a switch drops it
            None => {
                st.forget(&dst);
                SwitchCounters::bump(&c.drop_unknown_unicast);
            }
        }
    }

    /// The datagrams of a frame that carries several (`p.segment`), counted; none (counted
    /// as oversize) when it does not hold together.
    fn cut(&self, frame: &[u8], p: Partial) -> Vec<Bytes> {
        let c = &self.counters;
        SwitchCounters::bump(&c.large_frames);
        match cut_datagrams(frame, p) {
            Some(datagrams) => {
                SwitchCounters::bump(&c.large_frames_cut);
                datagrams
            }
            None => {
                SwitchCounters::bump(&c.drop_oversize);
                Vec::new()
            }
        }
    }

    fn enqueue(&self, port: &Port, frame: Bytes) {
        self.enqueue_to(&port.tx, port.large, frame)
    }

    fn enqueue_to(&self, tx: &mpsc::Sender<Bytes>, large: bool, frame: Bytes) {
        let c = &self.counters;
        if frame.len() > self.max_frame {
            SwitchCounters::bump(&c.large_frames);
            if !large {
                // Do for this port what segmentation offload would: cut it to the MTU.
                match netstack::offload::segment_tcp4(&frame, self.max_frame - 14) {
                    Some(segments) => {
                        SwitchCounters::bump(&c.large_frames_cut);
                        for s in segments {
                            self.enqueue_to(tx, large, s);
                        }
                    }
                    None => SwitchCounters::bump(&c.drop_oversize),
                }
                return;
            }
        }
        let len = frame.len() as u64;
        match tx.try_send(frame) {
            Ok(()) => {
                SwitchCounters::bump(&c.frames_out);
                c.bytes_out.fetch_add(len, Ordering::Relaxed);
            }
            Err(_) => SwitchCounters::bump(&c.drop_queue_full),
        }
    }
}

impl PortTx {
    /// This port's id.
    pub fn id(&self) -> PortId {
        self.id
    }

    /// A frame entered the switch from this port.
    pub fn send(&self, frame: Bytes) {
        self.switch.forward(self.id, self.large, frame, None);
    }

    /// A frame whose checksum is left partial entered the switch from this port.
    pub fn send_partial(&self, frame: Bytes, partial: Option<Partial>) {
        self.switch.forward(self.id, self.large, frame, partial);
    }

    /// Count a framing error seen by this port's transport.
    pub fn framing_error(&self) {
        SwitchCounters::bump(&self.switch.counters.drop_framing);
    }

    /// The switch this port belongs to.
    pub fn switch(&self) -> &Arc<Switch> {
        &self.switch
    }

    /// Detach the port now (also done when the transport ends).
    pub fn detach(&self) {
        self.switch.detach(self.id);
    }
}

/// The datagrams of a frame that carries several ([`Partial::segment`]), whole.
fn cut_datagrams(frame: &[u8], p: Partial) -> Option<Vec<Bytes>> {
    netstack::offload::segment_udp4(frame, usize::from(p.segment))
}

/// `frame` with its partial checksum (if any) completed: in place when nothing else holds
/// the frame, in a copy otherwise.
fn complete(frame: Bytes, partial: Option<Partial>) -> Bytes {
    let Some(p) = partial else {
        return frame;
    };
    let mut m = frame
        .try_into_mut()
        .unwrap_or_else(|shared| bytes::BytesMut::from(&shared[..]));
    // Partial::of_ipv4 checked the offsets against the frame, so this cannot fail.
    p.complete(&mut m);
    m.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: MacAddr = [0x52, 0x55, 0x55, 0, 0, 0xa];
    const B: MacAddr = [0x52, 0x55, 0x55, 0, 0, 0xb];
    const C: MacAddr = [0x52, 0x55, 0x55, 0, 0, 0xc];

    fn frame(dst: MacAddr, src: MacAddr) -> Bytes {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x88, 0xb5, 1, 2, 3]);
        Bytes::from(f)
    }

    fn drain(rx: &mut PortRx) -> Vec<Bytes> {
        std::iter::from_fn(|| rx.frames.try_recv().ok()).collect()
    }

    #[test]
    fn learns_floods_and_forwards_unicast_only_to_its_port() {
        let sw = Switch::new(1500);
        let (pa, mut ra) = sw.attach("a");
        let (pb, mut rb) = sw.attach("b");
        let (_pc, mut rc) = sw.attach("c");
        pa.send(frame([0xff; 6], A)); // broadcast: everyone but a
        assert!(drain(&mut ra).is_empty());
        assert_eq!(drain(&mut rb).len(), 1);
        assert_eq!(drain(&mut rc).len(), 1);
        pb.send(frame(A, B)); // a is known: only a
        assert_eq!(drain(&mut ra), vec![frame(A, B)]);
        assert!(drain(&mut rc).is_empty());
        pa.send(frame(C, A)); // c never spoke: dropped, not flooded
        assert!(drain(&mut rb).is_empty() && drain(&mut rc).is_empty());
        assert_eq!(
            sw.counters().drop_unknown_unicast.load(Ordering::Relaxed),
            1
        );
        pa.send(frame([0x33, 0x33, 0, 0, 0, 1], A)); // multicast floods too
        assert_eq!(drain(&mut rb).len(), 1);
    }

    #[test]
    fn a_port_sending_from_ever_new_macs_fills_only_its_share() {
        let sw = Switch::new(1500);
        let (pa, _ra) = sw.attach("a");
        let (pb, mut rb) = sw.attach("b");
        let (pc, mut rc) = sw.attach("c");
        let t0 = Instant::now();
        let mac = |i: usize| [0x52, 0x54, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8];
        // Port a floods from 100,000 source MACs (unicast to nobody: dropped).
        for i in 0..100_000 {
            sw.forward_at(pa.id(), false, frame(C, mac(i)), None, t0);
        }
        let learned = sw.state.lock().unwrap().macs.len();
        assert_eq!(learned, MAX_MACS_PER_PORT, "port a's share of the table");
        let c = sw.counters();
        assert_eq!(
            c.macs_not_learned.load(Ordering::Relaxed),
            (100_000 - MAX_MACS_PER_PORT) as u64
        );
        // The others are still learned and reached.
        sw.forward_at(pb.id(), false, frame([0xff; 6], B), None, t0);
        sw.forward_at(pc.id(), false, frame(B, A), None, t0);
        assert_eq!(
            drain(&mut rb).len(),
            1,
            "b, learned after the flood, is reached"
        );
        drain(&mut rc);
        sw.forward_at(pb.id(), false, frame(A, B), None, t0);
        assert_eq!(drain(&mut rc).len(), 1, "so is c");
        // Nor does port a take over b's MAC: its share is full.
        sw.forward_at(pa.id(), false, frame([0xff; 6], B), None, t0);
        drain(&mut rb);
        sw.forward_at(pc.id(), false, frame(B, A), None, t0);
        assert_eq!(drain(&mut rb).len(), 1, "b's MAC stays at b");
        assert_eq!(
            c.macs_not_learned.load(Ordering::Relaxed),
            (100_000 - MAX_MACS_PER_PORT + 1) as u64
        );
        // Aged out, port a's MACs make room again (a sweep at most once a second).
        let later = t0 + MAC_AGING + Duration::from_secs(1);
        sw.forward_at(pa.id(), false, frame(C, mac(200_000)), None, later);
        let st = sw.state.lock().unwrap();
        assert!(st.macs.contains_key(&mac(200_000)) && st.macs.len() <= 3);
        assert_eq!(st.per_port.get(&pa.id()), Some(&1));
    }

    #[test]
    fn stale_macs_age_out_and_moved_macs_follow() {
        let sw = Switch::new(1500);
        let (pa, mut ra) = sw.attach("a");
        let (pb, _rb) = sw.attach("b");
        let (pc, mut rc) = sw.attach("c");
        let t0 = Instant::now();
        sw.forward_at(pa.id(), false, frame([0xff; 6], A), None, t0);
        sw.forward_at(
            pb.id(),
            false,
            frame(A, B),
            None,
            t0 + MAC_AGING + Duration::from_secs(1),
        );
        assert!(
            drain(&mut ra).is_empty(),
            "an aged-out MAC still got unicast"
        );
        // A moves to port c (a VM restarted on another connection).
        sw.forward_at(pc.id(), false, frame([0xff; 6], A), None, t0);
        sw.forward_at(pb.id(), false, frame(A, B), None, t0);
        drain(&mut rc);
        sw.forward_at(pb.id(), false, frame(A, B), None, t0);
        assert_eq!(drain(&mut rc).len(), 1);
    }

    #[test]
    fn large_frames_only_between_ports_that_take_them() {
        let sw = Switch::new(1500);
        let (gw, _rgw) = sw.attach_large("gateway");
        let (tap, mut rtap) = sw.attach_large("tap");
        let (qemu, mut rqemu) = sw.attach("qemu");
        tap.send(frame([0xff; 6], A));
        qemu.send(frame([0xff; 6], B));
        drain(&mut rtap);
        drain(&mut rqemu);
        assert!(sw.takes_large(A) && !sw.takes_large(B) && !sw.takes_large(C));
        let big = |dst: MacAddr, src: MacAddr, n: usize| {
            let mut f = frame(dst, src).to_vec();
            f.resize(n, 0);
            Bytes::from(f)
        };
        gw.send(big(A, C, LARGE_FRAME));
        assert_eq!(
            drain(&mut rtap).len(),
            1,
            "a large frame to a port that takes them"
        );
        gw.send(big(B, C, 1515));
        assert!(
            drain(&mut rqemu).is_empty(),
            "a large frame that is no IPv4 TCP segment to a port that takes no large frames"
        );
        qemu.send(big(A, B, 1515));
        assert!(
            drain(&mut rtap).is_empty(),
            "a large frame from a port that may not send it"
        );
        gw.send(big(A, C, LARGE_FRAME + 1));
        assert!(drain(&mut rtap).is_empty(), "over 64 KiB for anyone");
        let c = sw.counters();
        assert_eq!(c.large_frames.load(Ordering::Relaxed), 2);
        assert_eq!(c.large_frames_cut.load(Ordering::Relaxed), 0);
        assert_eq!(c.drop_oversize.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn detached_ports_forget_their_macs_and_pinned_macs_stay_put() {
        let sw = Switch::new(1500);
        let (gw, mut rgw) = sw.attach("gateway");
        sw.pin_mac(&gw, C);
        let (pa, _ra) = sw.attach("a");
        let (pb, mut rb) = sw.attach("b");
        pa.send(frame([0xff; 6], C)); // a guest claiming the gateway's MAC
        assert!(drain(&mut rb).is_empty());
        pb.send(frame(C, B));
        assert_eq!(drain(&mut rgw).len(), 1, "the pinned MAC was taken over");
        pa.send(frame([0xff; 6], A));
        pa.detach();
        pb.send(frame(A, B));
        assert_eq!(
            sw.counters().drop_unknown_unicast.load(Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn runts_oversize_and_multicast_sources_are_counted() {
        let sw = Switch::new(1500);
        let (pa, _ra) = sw.attach("a");
        let (_pb, mut rb) = sw.attach("b");
        pa.send(Bytes::from_static(&[0u8; 13]));
        pa.send(Bytes::from(vec![0xffu8; 1515]));
        pa.send(frame([0xff; 6], [0x01, 0, 0x5e, 0, 0, 1]));
        assert!(drain(&mut rb).is_empty());
        let c = sw.counters();
        assert_eq!(c.drop_runt.load(Ordering::Relaxed), 1);
        assert_eq!(c.drop_oversize.load(Ordering::Relaxed), 1);
        assert_eq!(c.drop_bad_source.load(Ordering::Relaxed), 1);
        let mut full = frame([0xff; 6], A).to_vec();
        full.resize(1514, 0); // exactly MTU + 14 passes
        pa.send(Bytes::from(full));
        assert_eq!(drain(&mut rb).len(), 1);
    }

    /// The frames a fast path was offered.
    type Offered = Arc<Mutex<Vec<(Bytes, Option<Partial>)>>>;

    /// What a fast path set on `port` (taking every frame) was offered.
    fn recording_fast_path(sw: &Switch, port: &PortTx) -> Offered {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::clone(&seen);
        sw.set_fast_path(
            port,
            Arc::new(move |f: &Bytes, p| {
                s.lock().unwrap().push((f.clone(), p));
                Fast::Taken
            }),
        );
        seen
    }

    /// A UDP frame from A to B with its checksum left partial, and the same frame whole.
    fn partial_udp(dst: MacAddr, src: MacAddr) -> (Bytes, Partial, Bytes) {
        let mut f = frame(dst, src)[..12].to_vec();
        f.extend_from_slice(&[0x08, 0x00, 0x45, 0, 0, 32, 0, 0, 0, 0, 64, 17, 0, 0]);
        f.extend_from_slice(&[192, 168, 5, 15, 192, 168, 5, 2]);
        f.extend_from_slice(&[0x9c, 0x40, 0x14, 0x51, 0, 12, 0, 0, b'p', b'i', b'n', b'g']);
        let p = Partial::leave(&mut f).expect("IPv4 UDP");
        let mut whole = f.clone();
        assert!(p.complete(&mut whole));
        (Bytes::from(f), p, Bytes::from(whole))
    }

    #[test]
    fn partial_checksums_reach_fast_paths_and_are_completed_for_queues() {
        let sw = Switch::new(1500);
        let (pa, mut ra) = sw.attach("a");
        let (pb, mut rb) = sw.attach("b");
        let (pc, mut rc) = sw.attach("c");
        let seen = recording_fast_path(&sw, &pc);
        pb.send(frame([0xff; 6], B));
        pc.send(frame([0xff; 6], C));
        drain(&mut ra);
        drain(&mut rb);
        drain(&mut rc);
        // To a port with a queue: completed, and valid.
        let (f, p, whole) = partial_udp(B, A);
        pa.send_partial(f, Some(p));
        let got = drain(&mut rb);
        assert_eq!(got, vec![whole]);
        let udp = smoltcp::wire::UdpPacket::new_checked(&got[0][34..]).unwrap();
        assert!(udp.verify_checksum(
            &smoltcp::wire::IpAddress::v4(192, 168, 5, 15),
            &smoltcp::wire::IpAddress::v4(192, 168, 5, 2)
        ));
        // To a fast path: as it is, said partial.
        let (f, p, _) = partial_udp(C, A);
        pa.send_partial(f.clone(), Some(p));
        assert_eq!(seen.lock().unwrap().as_slice(), &[(f, Some(p))]);
        // Broadcast: completed for everyone.
        let (f, p, whole) = partial_udp([0xff; 6], A);
        pa.send_partial(f, Some(p));
        assert_eq!(drain(&mut rb), vec![whole.clone()]);
        assert_eq!(drain(&mut rc), vec![whole]);
    }

    /// What a fast path hands back to be queued in place of a frame reaches the port's queue,
    /// large (a reassembled packet) when the port takes large frames; a declined frame is
    /// queued as it is, and a taken one not at all.
    #[test]
    fn fast_paths_take_decline_or_queue_another_frame() {
        let sw = Switch::new(1500);
        let (pa, mut ra) = sw.attach("a");
        let (pb, mut rb) = sw.attach_large("b");
        pb.send(frame([0xff; 6], B));
        drain(&mut ra);
        let whole = Bytes::from(vec![7u8; 9000]);
        let instead = whole.clone();
        sw.set_fast_path(
            &pb,
            Arc::new(move |f: &Bytes, _| match f.last() {
                Some(1) => Fast::Taken,
                Some(2) => Fast::Queue(instead.clone()),
                _ => Fast::Declined,
            }),
        );
        let with_last = |b: u8| {
            let mut f = frame(B, A).to_vec();
            f.push(b);
            Bytes::from(f)
        };
        for b in [1, 2, 3] {
            pa.send(with_last(b));
        }
        assert_eq!(drain(&mut rb), vec![whole, with_last(3)]);
        assert_eq!(sw.counters().drop_oversize.load(Ordering::Relaxed), 0);
    }

    /// A frame of `n` UDP datagrams of `seg` bytes (numbered by their first byte) from A to
    /// `dst`, partial, with its [`Partial::segment`].
    fn udp_segments(dst: MacAddr, n: usize, seg: usize) -> (Bytes, Partial) {
        let len = 20 + 8 + n * seg;
        let mut f = frame(dst, A)[..12].to_vec();
        f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
        f.extend_from_slice(&(len as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0, 192, 168, 5, 2, 192, 168, 5, 15]);
        f.extend_from_slice(&[0, 53, 0x9c, 0x40]);
        f.extend_from_slice(&((8 + n * seg) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        for i in 0..n {
            f.extend(std::iter::repeat_n(i as u8, seg));
        }
        let p = Partial::leave(&mut f).expect("IPv4 UDP");
        (
            Bytes::from(f),
            Partial {
                segment: seg as u16,
                ..p
            },
        )
    }

    #[test]
    fn frames_of_several_datagrams_are_cut_for_ports_that_take_no_large_frames() {
        let sw = Switch::new(1500);
        let (gw, _rgw) = sw.attach_large("gateway");
        let (tap, _rtap) = sw.attach_large("tap");
        let (qemu, mut rqemu) = sw.attach("qemu");
        let seen = recording_fast_path(&sw, &tap);
        tap.send(frame([0xff; 6], B));
        qemu.send(frame([0xff; 6], C));
        drain(&mut rqemu);
        // To the port that takes them: whole, still partial, segment size and all.
        let (f, p) = udp_segments(B, 5, 1400);
        gw.send_partial(f.clone(), Some(p));
        assert_eq!(seen.lock().unwrap().as_slice(), &[(f, Some(p))]);
        // To a port that takes none: five whole datagrams with valid checksums.
        let (f, p) = udp_segments(C, 5, 1400);
        gw.send_partial(f, Some(p));
        let got = drain(&mut rqemu);
        assert_eq!(got.len(), 5);
        for (i, d) in got.iter().enumerate() {
            assert!(d.len() <= 1514);
            let ip = smoltcp::wire::Ipv4Packet::new_checked(&d[14..]).unwrap();
            assert!(ip.verify_checksum());
            let udp = smoltcp::wire::UdpPacket::new_checked(ip.payload()).unwrap();
            assert!(udp.verify_checksum(
                &smoltcp::wire::IpAddress::v4(192, 168, 5, 2),
                &smoltcp::wire::IpAddress::v4(192, 168, 5, 15)
            ));
            assert_eq!(udp.payload(), &[i as u8; 1400][..]);
        }
        // However short the frame: three datagrams of ten bytes are three datagrams.
        let (f, p) = udp_segments(C, 3, 10);
        assert!(f.len() <= 1514);
        gw.send_partial(f, Some(p));
        let got = drain(&mut rqemu);
        assert_eq!(
            got.len(),
            3,
            "cut, not passed on as one datagram of 30 bytes"
        );
        for (i, d) in got.iter().enumerate() {
            assert_eq!(&d[42..], &[i as u8; 10][..]);
        }
        let c = sw.counters();
        assert_eq!(c.large_frames_cut.load(Ordering::Relaxed), 2);
        assert_eq!(c.drop_oversize.load(Ordering::Relaxed), 0);
    }
}
