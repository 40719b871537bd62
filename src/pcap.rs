//! `--pcap FILE`: every frame that enters the switch, in pcap format (Ethernet link type),
//! written by a thread of its own and flushed to the file whenever it catches up, so tshark or
//! tcpdump can read the file while usernet runs. A capture that cannot keep up loses frames
//! (counted) rather than slowing the network.

use std::cell::RefCell;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use crossbeam::channel::{bounded, Sender, TrySendError};
use pcap_file::pcap::{PcapPacket, PcapWriter};

/// Frames waiting for the writer thread before new ones are dropped.
const BACKLOG: usize = 8192;

/// The capture's sending end.
pub struct Capture {
    tx: Sender<(Duration, Bytes)>,
    dropped: AtomicU64,
}

/// The in-memory stream the pcap encoder writes to; drained into the file after each batch.
#[derive(Clone, Default)]
struct Staging(Rc<RefCell<Vec<u8>>>);

impl Write for Staging {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.borrow_mut().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    /// Create (truncate) `path` and start the writer thread.
    pub fn start(path: &Path) -> anyhow::Result<Capture> {
        let mut file =
            File::create(path).map_err(|e| anyhow::anyhow!("pcap {}: {e}", path.display()))?;
        let (tx, rx) = bounded::<(Duration, Bytes)>(BACKLOG);
        let shown = path.display().to_string();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("pcap".into())
            .spawn(move || {
                let staging = Staging::default();
                let mut writer = match PcapWriter::new(staging.clone()) {
                    Ok(w) => w,
                    Err(e) => return drop(ready_tx.send(Err(e.to_string()))),
                };
                let drain = |file: &mut File| {
                    let bytes = std::mem::take(&mut *staging.0.borrow_mut());
                    file.write_all(&bytes)
                };
                // The header is on disk before the first frame, for a reader that opens it now.
                if let Err(e) = drain(&mut file) {
                    return drop(ready_tx.send(Err(e.to_string())));
                }
                let _ = ready_tx.send(Ok(()));
                while let Ok((ts, frame)) = rx.recv() {
                    let mut ok = writer
                        .write_packet(&PcapPacket::new(ts, frame.len() as u32, &frame))
                        .is_ok();
                    while let Ok((ts, frame)) = rx.try_recv() {
                        ok &= writer
                            .write_packet(&PcapPacket::new(ts, frame.len() as u32, &frame))
                            .is_ok();
                    }
                    if !ok || drain(&mut file).is_err() {
                        tracing::warn!("pcap {shown}: write failed; capture stopped");
                        return;
                    }
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| anyhow::anyhow!("pcap {}: writer thread died", path.display()))?
            .map_err(|e| anyhow::anyhow!("pcap {}: {e}", path.display()))?;
        Ok(Capture {
            tx,
            dropped: AtomicU64::new(0),
        })
    }

    /// Record one frame (never blocks).
    pub fn record(&self, frame: &Bytes) {
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        if let Err(TrySendError::Full(_)) = self.tx.try_send((ts, frame.clone())) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Frames the capture lost because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}
