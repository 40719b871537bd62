//! IPv4 fragmentation and reassembly, sans-IO.
//!
//! [`Reassembler`] puts guest datagrams that arrive in fragments back together. It is strict and
//! bounded, because this is where libslirp had its CVEs (reassembly overflows, use-after-free,
//! packets shorter than their headers claim):
//!
//! - a bounded number of datagrams in progress, a bounded number of bytes buffered in total, each
//!   datagram at most 65535 bytes once reassembled, each dropped if not complete within a timeout;
//! - every offset and length is checked before it is used, and each datagram's payload lives in
//!   one owned buffer indexed only through checked slices (no unsafe, no raw offsets);
//! - any overlap between fragments of one datagram drops the whole datagram (RFC 5722 style),
//!   except a fragment that repeats bytes already held, identically: that is a retransmitted
//!   duplicate and is ignored;
//! - any inconsistent fragment (zero length, non-last fragment not a multiple of 8 bytes, data past
//!   the last fragment's end, two different last fragments) drops the whole datagram too, and
//!   the datagram's key is remembered until its timeout so its later fragments are dropped as
//!   well rather than starting a fresh datagram.
//!
//! [`fragment`] splits one IPv4 packet to fit an MTU.
//!
//! What it does not do: it does not verify header checksums or parse anything above IP (the
//! caller validated the header; the transport checksum is checked on the reassembled datagram);
//! it keeps no IP options in a reassembled datagram; it does not remember completed datagrams, so
//! a duplicate fragment arriving after its datagram completed starts a new datagram that simply
//! times out; and it owns no timers: call [`Reassembler::expire`] now and then (push calls it too).

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use smoltcp::wire::Ipv4Packet;

/// The header length of reassembled datagrams and of packets usernet builds.
const HEADER_LEN: usize = 20;
/// The largest IPv4 total length.
const MAX_TOTAL_LEN: usize = 65535;
/// The largest reassembled payload: a 20-byte header plus this is 65535.
const MAX_PAYLOAD: usize = MAX_TOTAL_LEN - HEADER_LEN;
/// One bit per 8-byte block of payload.
const BITMAP_WORDS: usize = MAX_PAYLOAD.div_ceil(8).div_ceil(64);

/// Bytes charged against [`ReassemblyConfig::max_bytes`] for each datagram in progress on top of
/// its payload buffer: the block bitmap and the entry itself.
pub const DATAGRAM_OVERHEAD: usize = BITMAP_WORDS * 8 + 128;

/// The smallest MTU [`fragment`] accepts (RFC 791's minimum).
pub const MIN_MTU: usize = 576;
/// The largest MTU [`fragment`] accepts.
pub const MAX_MTU: usize = 65520;

/// Limits for a [`Reassembler`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReassemblyConfig {
    /// Datagrams in progress at once; fragments of further datagrams are dropped. Also bounds
    /// how many dropped datagrams are remembered.
    pub max_datagrams: usize,
    /// Bytes buffered in total, payload buffers plus [`DATAGRAM_OVERHEAD`] per datagram.
    pub max_bytes: usize,
    /// How long a datagram may take to complete, from its first fragment to arrive.
    pub timeout: Duration,
}

impl Default for ReassemblyConfig {
    fn default() -> Self {
        ReassemblyConfig {
            max_datagrams: 64,
            max_bytes: 4 << 20,
            // Linux's net.ipv4.ipfrag_time.
            timeout: Duration::from_secs(30),
        }
    }
}

/// What [`Reassembler::push`] did with a packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reassembly {
    /// Not a fragment (MF clear and offset 0): use the packet as it is.
    NotFragment,
    /// Buffered, nothing complete yet.
    Pending,
    /// The whole datagram: an IPv4 packet with a 20-byte header (no options; the first
    /// fragment's header fields with all flags clear, offset 0, the total length fixed and the
    /// checksum recomputed) followed by the full payload.
    Complete(Vec<u8>),
    /// The packet was dropped, and counted, for this reason. Unless the reason is
    /// [`FragDrop::Duplicate`] or the datagram was never started ([`FragDrop::TooManyDatagrams`],
    /// [`FragDrop::OutOfMemory`] for a new datagram), its whole datagram was dropped with it.
    Dropped(FragDrop),
}

/// Why a fragment was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum FragDrop {
    /// It overlaps bytes already held for its datagram, and is not an identical repeat of them.
    #[error("overlapping fragment")]
    Overlap,
    /// Its end lies past what a 65535-byte datagram (20-byte header) can hold.
    #[error("fragment past the maximum datagram size")]
    Oversize,
    /// It would start a new datagram while `max_datagrams` are in progress.
    #[error("too many datagrams in reassembly")]
    TooManyDatagrams,
    /// Buffering it would exceed `max_bytes`.
    #[error("reassembly memory exhausted")]
    OutOfMemory,
    /// Malformed or inconsistent: not a valid IPv4 packet, zero-length, a non-last fragment whose
    /// payload is not a multiple of 8 bytes, or data past the last fragment's end.
    #[error("bad fragment")]
    BadFragment,
    /// It repeats, identically, bytes already held: ignored, the datagram stays in progress.
    #[error("duplicate fragment")]
    Duplicate,
    /// A second last fragment (MF clear) with a different end than the first.
    #[error("conflicting last fragments")]
    ConflictingLast,
}

/// Counters for a [`Reassembler`]. Each `push` that returns `Dropped(reason)` adds one to the
/// counter for `reason`, including fragments dropped because their datagram was dropped earlier.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct FragCounters {
    /// Fragments pushed (packets with MF set or a nonzero offset).
    pub fragments_in: u64,
    /// Datagrams reassembled.
    pub reassembled: u64,
    /// [`FragDrop::Overlap`].
    pub drop_overlap: u64,
    /// [`FragDrop::Oversize`].
    pub drop_oversize: u64,
    /// [`FragDrop::TooManyDatagrams`].
    pub drop_too_many: u64,
    /// [`FragDrop::OutOfMemory`].
    pub drop_memory: u64,
    /// [`FragDrop::BadFragment`] and [`FragDrop::ConflictingLast`].
    pub drop_bad: u64,
    /// [`FragDrop::Duplicate`].
    pub duplicates: u64,
    /// Datagrams dropped incomplete at their timeout.
    pub timeouts: u64,
}

/// RFC 791: fragments belong together when source, destination, protocol and ident match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    ident: u16,
}

/// A datagram in progress.
struct Partial {
    seq: u64,
    created: Instant,
    /// The first 20 bytes of the offset-0 fragment's header, once it arrived.
    header: Option<[u8; HEADER_LEN]>,
    /// The payload length, once the last fragment (MF clear) arrived.
    total: Option<usize>,
    /// The largest fragment end seen.
    max_end: usize,
    /// Payload bytes held; fragments never overlap, so this is complete at `total`.
    received: usize,
    /// The payload, at its offsets; its length is what is allocated (zero-filled).
    buf: Vec<u8>,
    /// One bit per 8-byte block received.
    blocks: Box<[u64; BITMAP_WORDS]>,
}

impl Partial {
    fn cost(&self) -> usize {
        DATAGRAM_OVERHEAD + self.buf.len()
    }

    /// Add one fragment, or say why not. `room` is how many more bytes may be allocated.
    fn add(
        &mut self,
        header: &[u8],
        offset: usize,
        payload: &[u8],
        more: bool,
        room: usize,
    ) -> Result<(), FragDrop> {
        let end = offset + payload.len();
        if more {
            if self.total.is_some_and(|total| end > total) {
                return Err(FragDrop::BadFragment);
            }
        } else {
            match self.total {
                Some(total) if total != end => return Err(FragDrop::ConflictingLast),
                None if self.max_end > end => return Err(FragDrop::BadFragment),
                _ => {}
            }
        }

        let (first, last) = (offset / 8, end.div_ceil(8));
        let held = count_blocks(&self.blocks, first, last);
        if held != 0 {
            if held == last - first && self.buf.get(offset..end) == Some(payload) {
                return Err(FragDrop::Duplicate);
            }
            return Err(FragDrop::Overlap);
        }

        let target = match (more, self.total) {
            (false, _) => end,
            (true, Some(total)) => total,
            // Grow geometrically while the size is unknown.
            (true, None) => end.max(self.buf.len() * 2).min(MAX_PAYLOAD),
        };
        if end > self.buf.len() {
            if target - self.buf.len() > room {
                return Err(FragDrop::OutOfMemory);
            }
            self.buf.reserve_exact(target - self.buf.len());
            self.buf.resize(target, 0);
        } else if !more && self.buf.len() > end {
            // The last fragment: the size is known, give back what geometric growth overshot.
            self.buf.truncate(end);
            self.buf.shrink_to_fit();
        }

        let Some(dest) = self.buf.get_mut(offset..end) else {
            return Err(FragDrop::BadFragment);
        };
        dest.copy_from_slice(payload);
        set_blocks(&mut self.blocks, first, last);
        self.received += payload.len();
        self.max_end = self.max_end.max(end);
        if !more {
            self.total = Some(end);
        }
        if offset == 0 {
            let mut first_header = [0; HEADER_LEN];
            first_header.copy_from_slice(header.get(..HEADER_LEN).ok_or(FragDrop::BadFragment)?);
            self.header = Some(first_header);
        }
        Ok(())
    }

    /// The reassembled packet, once every byte is held.
    fn assemble(&self) -> Option<Vec<u8>> {
        let total = self.total.filter(|&total| total == self.received)?;
        let header = self.header?;
        let payload = self.buf.get(..total)?;
        let mut packet = Vec::with_capacity(HEADER_LEN + total);
        packet.extend_from_slice(&header);
        packet.extend_from_slice(payload);
        let mut ip = Ipv4Packet::new_unchecked(&mut packet[..]);
        ip.set_header_len(HEADER_LEN as u8);
        ip.set_total_len(u16::try_from(HEADER_LEN + total).ok()?);
        ip.clear_flags();
        ip.set_frag_offset(0);
        ip.fill_checksum();
        Some(packet)
    }
}

/// How many bits are set in `[first, last)`.
fn count_blocks(bits: &[u64; BITMAP_WORDS], first: usize, last: usize) -> usize {
    let mut count = 0;
    let mut bit = first;
    while bit < last {
        let (word, shift) = (bit / 64, bit % 64);
        let n = (64 - shift).min(last - bit);
        let mask = if n == 64 {
            !0
        } else {
            ((1u64 << n) - 1) << shift
        };
        count += (bits[word] & mask).count_ones() as usize;
        bit += n;
    }
    count
}

/// Set the bits in `[first, last)`.
fn set_blocks(bits: &mut [u64; BITMAP_WORDS], first: usize, last: usize) {
    let mut bit = first;
    while bit < last {
        let (word, shift) = (bit / 64, bit % 64);
        let n = (64 - shift).min(last - bit);
        let mask = if n == 64 {
            !0
        } else {
            ((1u64 << n) - 1) << shift
        };
        bits[word] |= mask;
        bit += n;
    }
}

/// Reassembles IPv4 fragments from guests. Bounded: at most `max_datagrams` in progress, at most
/// `max_bytes` buffered in total, each datagram at most 65535 bytes (IP total length), each
/// dropped if not complete within `timeout`.
///
/// When full, new datagrams are refused (their fragments dropped) rather than older ones
/// evicted. A datagram whose buffer would grow past `max_bytes` is dropped whole.
pub struct Reassembler {
    config: ReassemblyConfig,
    partials: HashMap<Key, Partial>,
    /// `partials` by age, for expiry.
    partials_by_age: BTreeMap<(Instant, u64), Key>,
    /// Dropped datagrams, remembered until their timeout so their later fragments are dropped.
    dead: HashMap<Key, FragDrop>,
    /// `dead` by age, for expiry and eviction.
    dead_by_age: BTreeMap<(Instant, u64), Key>,
    next_seq: u64,
    buffered: usize,
    counters: FragCounters,
}

impl Reassembler {
    /// A reassembler with these limits.
    pub fn new(config: ReassemblyConfig) -> Self {
        Reassembler {
            config,
            partials: HashMap::new(),
            partials_by_age: BTreeMap::new(),
            dead: HashMap::new(),
            dead_by_age: BTreeMap::new(),
            next_seq: 0,
            buffered: 0,
            counters: FragCounters::default(),
        }
    }

    /// Take one IPv4 packet. `packet` is an IPv4 packet whose header was already validated by
    /// the caller (`Ipv4Packet::new_checked` and the checksum); bytes past its total length (link
    /// padding) are ignored. Fragments are keyed by (src, dst, protocol, ident) per RFC 791.
    /// Anything that does not pass `Ipv4Packet::new_checked` is dropped as a bad fragment.
    pub fn push(&mut self, packet: &[u8], now: Instant) -> Reassembly {
        self.expire(now);

        let ip = match Ipv4Packet::new_checked(packet) {
            Ok(ip) if ip.version() == 4 => ip,
            _ => return self.reject(FragDrop::BadFragment),
        };
        let more = ip.more_frags();
        let offset = usize::from(ip.frag_offset());
        if !more && offset == 0 {
            return Reassembly::NotFragment;
        }
        self.counters.fragments_in += 1;

        let key = Key {
            src: ip.src_addr(),
            dst: ip.dst_addr(),
            protocol: ip.next_header().into(),
            ident: ip.ident(),
        };
        if let Some(&reason) = self.dead.get(&key) {
            tracing::trace!(?key, ?reason, "fragment of a dropped datagram");
            return self.reject(reason);
        }

        let payload = ip.payload();
        let end = offset + payload.len();
        if end > MAX_PAYLOAD {
            return self.kill(key, FragDrop::Oversize, now);
        }
        if payload.is_empty() || (more && payload.len() & 7 != 0) {
            return self.kill(key, FragDrop::BadFragment, now);
        }

        let fresh = !self.partials.contains_key(&key);
        if fresh {
            if self.partials.len() >= self.config.max_datagrams {
                return self.reject(FragDrop::TooManyDatagrams);
            }
            if self.buffered + DATAGRAM_OVERHEAD > self.config.max_bytes {
                return self.reject(FragDrop::OutOfMemory);
            }
            let seq = self.seq();
            self.partials.insert(
                key,
                Partial {
                    seq,
                    created: now,
                    header: None,
                    total: None,
                    max_end: 0,
                    received: 0,
                    buf: Vec::new(),
                    blocks: Box::new([0; BITMAP_WORDS]),
                },
            );
            self.partials_by_age.insert((now, seq), key);
            self.buffered += DATAGRAM_OVERHEAD;
        }

        let room = self.config.max_bytes.saturating_sub(self.buffered);
        let Some(partial) = self.partials.get_mut(&key) else {
            return self.reject(FragDrop::BadFragment);
        };
        let before = partial.cost();
        let added = partial.add(packet, offset, payload, more, room);
        self.buffered = self.buffered - before + partial.cost();
        match added {
            Ok(()) => {}
            Err(FragDrop::Duplicate) => return self.reject(FragDrop::Duplicate),
            Err(FragDrop::OutOfMemory) if fresh => {
                // Nothing of this datagram was held: refuse it like a full table would.
                self.remove(&key);
                return self.reject(FragDrop::OutOfMemory);
            }
            Err(reason) => return self.kill(key, reason, now),
        }

        match partial.assemble() {
            Some(datagram) => {
                self.remove(&key);
                self.counters.reassembled += 1;
                Reassembly::Complete(datagram)
            }
            None => Reassembly::Pending,
        }
    }

    /// Drop datagrams older than the timeout; returns how many were dropped (counted as
    /// timeouts). Also forgets dropped datagrams whose timeout has passed.
    pub fn expire(&mut self, now: Instant) -> usize {
        let timeout = self.config.timeout;
        let mut expired = 0;
        while let Some(oldest) = self.partials_by_age.first_entry() {
            if now.saturating_duration_since(oldest.key().0) < timeout {
                break;
            }
            let key = oldest.remove();
            if let Some(partial) = self.partials.remove(&key) {
                self.buffered -= partial.cost();
                tracing::debug!(
                    ?key,
                    held = partial.received,
                    "fragment reassembly timed out"
                );
            }
            expired += 1;
        }
        while let Some(oldest) = self.dead_by_age.first_entry() {
            if now.saturating_duration_since(oldest.key().0) < timeout {
                break;
            }
            self.dead.remove(&oldest.remove());
        }
        self.counters.timeouts += expired as u64;
        expired
    }

    /// The counters so far.
    pub fn counters(&self) -> &FragCounters {
        &self.counters
    }

    /// Datagrams in progress.
    pub fn in_progress(&self) -> usize {
        self.partials.len()
    }

    /// Bytes charged against `max_bytes`: payload buffers plus [`DATAGRAM_OVERHEAD`] each.
    pub fn buffered_bytes(&self) -> usize {
        self.buffered
    }

    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// Count a dropped fragment.
    fn reject(&mut self, reason: FragDrop) -> Reassembly {
        let counter = match reason {
            FragDrop::Overlap => &mut self.counters.drop_overlap,
            FragDrop::Oversize => &mut self.counters.drop_oversize,
            FragDrop::TooManyDatagrams => &mut self.counters.drop_too_many,
            FragDrop::OutOfMemory => &mut self.counters.drop_memory,
            FragDrop::BadFragment | FragDrop::ConflictingLast => &mut self.counters.drop_bad,
            FragDrop::Duplicate => &mut self.counters.duplicates,
        };
        *counter += 1;
        Reassembly::Dropped(reason)
    }

    /// Forget a datagram in progress.
    fn remove(&mut self, key: &Key) -> Option<Partial> {
        let partial = self.partials.remove(key)?;
        self.partials_by_age.remove(&(partial.created, partial.seq));
        self.buffered -= partial.cost();
        Some(partial)
    }

    /// Drop a fragment and its whole datagram, and remember the datagram as dropped until its
    /// timeout.
    fn kill(&mut self, key: Key, reason: FragDrop, now: Instant) -> Reassembly {
        let created = self.remove(&key).map_or(now, |partial| partial.created);
        tracing::debug!(?key, ?reason, "dropping fragmented datagram");
        if self.config.max_datagrams > 0 {
            while self.dead.len() >= self.config.max_datagrams {
                let Some((_, oldest)) = self.dead_by_age.pop_first() else {
                    break;
                };
                self.dead.remove(&oldest);
            }
            let seq = self.seq();
            self.dead.insert(key, reason);
            self.dead_by_age.insert((created, seq), key);
        }
        self.reject(reason)
    }
}

impl Default for Reassembler {
    fn default() -> Self {
        Reassembler::new(ReassemblyConfig::default())
    }
}

impl std::fmt::Debug for Reassembler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reassembler")
            .field("config", &self.config)
            .field("in_progress", &self.partials.len())
            .field("dropped_remembered", &self.dead.len())
            .field("buffered", &self.buffered)
            .field("counters", &self.counters)
            .finish()
    }
}

/// Why [`fragment`] could not split a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FragmentError {
    /// The packet does not fit and has DF set: the sender should get ICMP "fragmentation
    /// needed" with this next-hop MTU.
    #[error("packet larger than MTU {mtu} with DF set")]
    NeedsFragmentation {
        /// The MTU it did not fit.
        mtu: usize,
    },
    /// The MTU is outside [`MIN_MTU`]..=[`MAX_MTU`].
    #[error("MTU {mtu} outside {MIN_MTU}..={MAX_MTU}")]
    InvalidMtu {
        /// The MTU asked for.
        mtu: usize,
    },
    /// Not a valid IPv4 packet (fails `Ipv4Packet::new_checked`, bad options, or a fragment
    /// whose payload runs past offset 65535).
    #[error("malformed IPv4 packet")]
    Malformed,
}

/// A [`Reassembler`] that several threads use (a gateway's task, and the ports' threads that
/// reassemble what they send it): one memory bound and one count for all. Clones share it.
#[derive(Debug, Clone, Default)]
pub struct SharedReassembler(Arc<Mutex<Reassembler>>);

impl SharedReassembler {
    /// A shared reassembler with these limits.
    pub fn new(config: ReassemblyConfig) -> Self {
        SharedReassembler(Arc::new(Mutex::new(Reassembler::new(config))))
    }

    /// [`Reassembler::push`].
    pub fn push(&self, packet: &[u8], now: Instant) -> Reassembly {
        self.lock().push(packet, now)
    }

    /// [`Reassembler::expire`].
    pub fn expire(&self, now: Instant) -> usize {
        self.lock().expire(now)
    }

    /// The counters so far.
    pub fn counters(&self) -> FragCounters {
        self.lock().counters().clone()
    }

    fn lock(&self) -> MutexGuard<'_, Reassembler> {
        // A panic elsewhere while holding it leaves nothing half-done that matters here.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Whether `packet` is an IPv4 fragment (MF set or an offset) whose header is valid, its
/// checksum checked: what a caller of [`Reassembler::push`] must have made sure of.
pub fn is_fragment(packet: &[u8]) -> bool {
    match Ipv4Packet::new_checked(packet) {
        Ok(ip) => {
            ip.version() == 4 && (ip.more_frags() || ip.frag_offset() != 0) && ip.verify_checksum()
        }
        Err(_) => false,
    }
}

/// Split one IPv4 packet into fragments that each fit `mtu` (IP total length <= `mtu`).
///
/// Returns the packet unchanged (one element, trimmed to its total length) if it fits. If DF is
/// set and it does not fit, returns [`FragmentError::NeedsFragmentation`]. Otherwise each
/// fragment has the same ident, a payload that is a multiple of 8 bytes except the last's, MF set
/// on all but the last (or on all if the packet was itself a non-last fragment), offsets in
/// 8-byte units (relative to the packet's own offset) and its checksum filled. The first fragment
/// keeps the whole header, options included; the others keep only the options with the copied
/// flag set (RFC 791). With no options the payload per fragment is `(mtu - 20)` rounded down to a
/// multiple of 8.
pub fn fragment(packet: &[u8], mtu: usize) -> Result<Vec<Vec<u8>>, FragmentError> {
    if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
        return Err(FragmentError::InvalidMtu { mtu });
    }
    let ip = match Ipv4Packet::new_checked(packet) {
        Ok(ip) if ip.version() == 4 => ip,
        _ => return Err(FragmentError::Malformed),
    };
    let total_len = usize::from(ip.total_len());
    let header_len = usize::from(ip.header_len());
    if total_len <= mtu {
        return Ok(vec![packet[..total_len].to_vec()]);
    }
    if ip.dont_frag() {
        return Err(FragmentError::NeedsFragmentation { mtu });
    }

    let first_header = &packet[..header_len];
    let later_header = copied_header(first_header)?;
    let payload = ip.payload();
    let base = usize::from(ip.frag_offset());
    if base + payload.len() > MAX_TOTAL_LEN {
        return Err(FragmentError::Malformed);
    }
    let more_after = ip.more_frags();

    let mut fragments = Vec::new();
    let mut pos = 0;
    while pos < payload.len() {
        let header = if pos == 0 {
            first_header
        } else {
            &later_header[..]
        };
        // mtu >= 576 and headers are at most 60 bytes: always room for some payload.
        let room = (mtu - header.len()) & !7;
        let len = room.min(payload.len() - pos);
        let last = pos + len == payload.len();

        let mut frag = Vec::with_capacity(header.len() + len);
        frag.extend_from_slice(header);
        frag.extend_from_slice(&payload[pos..pos + len]);
        let mut out = Ipv4Packet::new_unchecked(&mut frag[..]);
        out.set_header_len(header.len() as u8);
        out.set_total_len((header.len() + len) as u16);
        out.clear_flags();
        out.set_more_frags(!last || more_after);
        out.set_frag_offset((base + pos) as u16);
        out.fill_checksum();
        fragments.push(frag);
        pos += len;
    }
    Ok(fragments)
}

/// The header for fragments after the first: the fixed 20 bytes plus the options whose copied
/// flag is set, padded with end-of-options to a multiple of 4 bytes.
fn copied_header(header: &[u8]) -> Result<Vec<u8>, FragmentError> {
    let mut copied = header[..HEADER_LEN].to_vec();
    let mut i = HEADER_LEN;
    while i < header.len() {
        match header[i] {
            // End of options.
            0 => break,
            // No operation.
            1 => i += 1,
            kind => {
                let len = usize::from(*header.get(i + 1).ok_or(FragmentError::Malformed)?);
                if len < 2 || i + len > header.len() {
                    return Err(FragmentError::Malformed);
                }
                if kind & 0x80 != 0 {
                    copied.extend_from_slice(&header[i..i + len]);
                }
                i += len;
            }
        }
    }
    while copied.len() & 3 != 0 {
        copied.push(0);
    }
    Ok(copied)
}
