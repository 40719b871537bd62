//! Every framing over real sockets in-process: frames round-trip through the switch, and bad
//! input on one port is dropped and counted while the other ports keep working.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixDatagram, UnixListener, UnixStream};
use tokio::time::timeout;
use usernet::switch::{PortRx, PortTx, Switch};
use usernet::transport::{dgram, fd, fdpass, stream, StreamAddr};

const PROBE_MAC: [u8; 6] = [0x52, 0x55, 0x55, 0xee, 0xee, 0xee];
const VM_A: [u8; 6] = [0x52, 0x55, 0x55, 0x00, 0x00, 0x0a];
const VM_B: [u8; 6] = [0x52, 0x55, 0x55, 0x00, 0x00, 0x0b];
const WAIT: Duration = Duration::from_secs(5);

fn frame(dst: [u8; 6], src: [u8; 6], body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + body.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x88, 0xb5]); // local experimental ethertype
    f.extend_from_slice(body);
    f
}

fn broadcast_from(src: [u8; 6], body: &[u8]) -> Vec<u8> {
    frame([0xff; 6], src, body)
}

fn prefixed(f: &[u8]) -> Vec<u8> {
    let mut v = (f.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(f);
    v
}

/// A station of our own on the switch, to send and receive frames.
struct Probe {
    tx: PortTx,
    rx: PortRx,
}

impl Probe {
    fn new(switch: &Arc<Switch>) -> Probe {
        let (tx, rx) = switch.attach("probe");
        // Announce the probe so unicasts to it are delivered.
        tx.send(Bytes::from(broadcast_from(PROBE_MAC, b"hello")));
        Probe { tx, rx }
    }
    async fn recv(&mut self) -> Vec<u8> {
        timeout(WAIT, self.rx.frames.recv())
            .await
            .expect("no frame reached the probe within 5 s")
            .expect("probe port closed")
            .to_vec()
    }
    fn send(&self, f: Vec<u8>) {
        self.tx.send(Bytes::from(f));
    }
}

async fn read_prefixed(s: &mut UnixStream) -> Vec<u8> {
    let mut len = [0u8; 4];
    timeout(WAIT, s.read_exact(&mut len))
        .await
        .expect("no frame within 5 s")
        .unwrap();
    let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut f).await.unwrap();
    f
}

fn counter(
    switch: &Switch,
    pick: impl Fn(&usernet::switch::SwitchCounters) -> &std::sync::atomic::AtomicU64,
) -> u64 {
    pick(switch.counters()).load(Ordering::Relaxed)
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn stream_framing_round_trips_both_ways() {
    let switch = Switch::new(1500);
    let mut probe = Probe::new(&switch);
    let (ours, mut vm) = UnixStream::pair().unwrap();
    stream::spawn_unix(&switch, ours, "vm".into());

    let out = broadcast_from(VM_A, &[7u8; 1486]); // a full 1500-byte-MTU frame
    vm.write_all(&prefixed(&out)).await.unwrap();
    assert_eq!(probe.recv().await, out);

    // Many frames in one write, and one frame split over several writes.
    let many: Vec<Vec<u8>> = (0..50u8)
        .map(|i| frame(PROBE_MAC, VM_A, &[i; 100]))
        .collect();
    vm.write_all(&many.iter().flat_map(|f| prefixed(f)).collect::<Vec<_>>())
        .await
        .unwrap();
    for f in &many {
        assert_eq!(&probe.recv().await, f);
    }
    let split = prefixed(&frame(PROBE_MAC, VM_A, b"split"));
    for chunk in split.chunks(3) {
        vm.write_all(chunk).await.unwrap();
        vm.flush().await.unwrap();
    }
    assert_eq!(probe.recv().await, frame(PROBE_MAC, VM_A, b"split"));

    let back = frame(VM_A, PROBE_MAC, b"to the vm");
    probe.send(back.clone());
    assert_eq!(read_prefixed(&mut vm).await, back);
}

#[tokio::test]
async fn stream_bad_input_is_counted_and_other_ports_keep_working() {
    let switch = Switch::new(1500);
    let mut probe = Probe::new(&switch);
    let (a, mut vm_a) = UnixStream::pair().unwrap();
    let (b, mut vm_b) = UnixStream::pair().unwrap();
    stream::spawn_unix(&switch, a, "a".into());
    stream::spawn_unix(&switch, b, "b".into());

    // Zero length, a runt, an oversize frame: each dropped and counted, the port stays.
    let mut bad = vec![0, 0, 0, 0];
    bad.extend(prefixed(&[1, 2, 3, 4, 5]));
    bad.extend(prefixed(&broadcast_from(VM_A, &[0u8; 1501]))); // 1515 > 1500 + 14
    let good = broadcast_from(VM_A, b"still here");
    bad.extend(prefixed(&good));
    vm_a.write_all(&bad).await.unwrap();
    assert_eq!(probe.recv().await, good);
    assert_eq!(counter(&switch, |c| &c.drop_framing), 1);
    assert_eq!(counter(&switch, |c| &c.drop_runt), 1);
    assert_eq!(counter(&switch, |c| &c.drop_oversize), 1);

    // Garbage: a length no peer sends. Port a is closed; b does not notice.
    vm_a.write_all(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3])
        .await
        .unwrap();
    let mut rest = Vec::new();
    let n = timeout(WAIT, vm_a.read_to_end(&mut rest))
        .await
        .expect("port a was not closed")
        .unwrap();
    assert_eq!(n, 0);
    until("port a detached", || {
        counter(&switch, |c| &c.ports_detached) == 1
    })
    .await;

    let from_b = broadcast_from(VM_B, b"b works");
    vm_b.write_all(&prefixed(&from_b)).await.unwrap();
    assert_eq!(probe.recv().await, from_b);
    // b saw a's good broadcast (flooded to every port), then gets its unicast.
    assert_eq!(read_prefixed(&mut vm_b).await, good);
    probe.send(frame(VM_B, PROBE_MAC, b"reply"));
    assert_eq!(
        read_prefixed(&mut vm_b).await,
        frame(VM_B, PROBE_MAC, b"reply")
    );
}

#[tokio::test]
async fn a_peer_closing_mid_frame_removes_only_its_port() {
    let switch = Switch::new(1500);
    let mut probe = Probe::new(&switch);
    let (a, mut vm_a) = UnixStream::pair().unwrap();
    let (b, mut vm_b) = UnixStream::pair().unwrap();
    stream::spawn_unix(&switch, a, "a".into());
    stream::spawn_unix(&switch, b, "b".into());
    vm_a.write_all(&prefixed(&broadcast_from(VM_A, b"a")))
        .await
        .unwrap();
    assert_eq!(probe.recv().await, broadcast_from(VM_A, b"a"));
    vm_a.write_all(&[0, 0, 0, 100, 1, 2, 3, 4, 5])
        .await
        .unwrap();
    drop(vm_a);
    until("port a detached", || {
        counter(&switch, |c| &c.ports_detached) == 1
    })
    .await;
    assert_eq!(
        counter(&switch, |c| &c.drop_framing),
        1,
        "the cut frame is counted"
    );
    vm_b.write_all(&prefixed(&broadcast_from(VM_B, b"b")))
        .await
        .unwrap();
    assert_eq!(probe.recv().await, broadcast_from(VM_B, b"b"));
}

#[tokio::test]
async fn two_vms_on_one_listener_reach_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qemu.sock");
    let switch = Switch::new(1500);
    let created = stream::listen(&switch, &StreamAddr::Unix(path.clone()))
        .await
        .unwrap();
    assert_eq!(created.as_deref(), Some(path.as_path()));
    let mut a = UnixStream::connect(&path).await.unwrap();
    let mut b = UnixStream::connect(&path).await.unwrap();
    // a announces itself; b hears the broadcast and answers by unicast.
    a.write_all(&prefixed(&broadcast_from(VM_A, b"who is there")))
        .await
        .unwrap();
    assert_eq!(
        read_prefixed(&mut b).await,
        broadcast_from(VM_A, b"who is there")
    );
    b.write_all(&prefixed(&frame(VM_A, VM_B, b"b here")))
        .await
        .unwrap();
    assert_eq!(read_prefixed(&mut a).await, frame(VM_A, VM_B, b"b here"));
    a.write_all(&prefixed(&frame(VM_B, VM_A, b"hi b")))
        .await
        .unwrap();
    assert_eq!(read_prefixed(&mut b).await, frame(VM_B, VM_A, b"hi b"));
    // A second daemon cannot take the live socket.
    let other = Switch::new(1500);
    let err = stream::listen(&other, &StreamAddr::Unix(path.clone()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("in use"), "{err}");
}

#[tokio::test]
async fn tcp_listener_serves_stream_peers() {
    let switch = Switch::new(1500);
    let mut probe = Probe::new(&switch);
    // A port that was free a moment ago; another test's process may take it meanwhile: then
    // another.
    let mut tries = 0;
    let port = loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        match stream::listen(&switch, &StreamAddr::Tcp(port)).await {
            Ok(_) => break port,
            Err(e) if tries < 10 => {
                tries += 1;
                eprintln!("listening on {port}: {e}; another port");
            }
            Err(e) => panic!("listening on {port}: {e}"),
        }
    };
    let mut vm = tokio::net::TcpStream::connect(port).await.unwrap();
    vm.write_all(&prefixed(&broadcast_from(VM_A, b"over tcp")))
        .await
        .unwrap();
    assert_eq!(probe.recv().await, broadcast_from(VM_A, b"over tcp"));
}

#[tokio::test]
async fn connect_qemu_retries_and_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qemu-server.sock");
    let switch = Switch::new(1500);
    let mut probe = Probe::new(&switch);
    // usernet starts first and waits for QEMU to listen.
    stream::connect(&switch, StreamAddr::Unix(path.clone()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let listener = UnixListener::bind(&path).unwrap();
    for round in 0..2u8 {
        let (mut qemu, _) = timeout(WAIT, listener.accept())
            .await
            .expect("usernet did not connect")
            .unwrap();
        let f = broadcast_from(VM_A, &[round; 20]);
        qemu.write_all(&prefixed(&f)).await.unwrap();
        assert_eq!(probe.recv().await, f);
        drop(qemu); // QEMU goes away; usernet must come back
    }
}

fn dgram_pair() -> (OwnedFd, UnixDatagram) {
    let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
    b.set_nonblocking(true).unwrap();
    (OwnedFd::from(a), UnixDatagram::from_std(b).unwrap())
}

#[tokio::test]
async fn inherited_fds_are_framed_by_their_socket_type() {
    let switch = Switch::new(1500);
    let mut probe = Probe::new(&switch);

    let (ours, vm) = dgram_pair();
    fd::adopt(&switch, ours, "dgram fd".into()).unwrap();
    let f = broadcast_from(VM_A, b"one datagram, one frame");
    vm.send(&f).await.unwrap();
    assert_eq!(probe.recv().await, f);
    vm.send(&[]).await.unwrap(); // empty datagram: counted
    probe.send(frame(VM_A, PROBE_MAC, b"back"));
    let mut buf = vec![0u8; 2000];
    let n = timeout(WAIT, vm.recv(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf[..n], &frame(VM_A, PROBE_MAC, b"back")[..]);
    until("empty datagram counted", || {
        counter(&switch, |c| &c.drop_framing) == 1
    })
    .await;

    let (ours, mut vm) = UnixStream::pair().unwrap();
    let ours = OwnedFd::from(ours.into_std().unwrap());
    fd::adopt(&switch, ours, "stream fd".into()).unwrap();
    let f = broadcast_from(VM_B, b"prefixed");
    vm.write_all(&prefixed(&f)).await.unwrap();
    assert_eq!(probe.recv().await, f);

    let file = OwnedFd::from(tempfile::tempfile().unwrap());
    assert!(fd::adopt(&switch, file, "a file".into()).is_err());
}

#[tokio::test]
async fn listen_dgram_learns_its_peer_and_eats_the_vfkit_magic() {
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("usernet.dgram");
    let theirs = dir.path().join("vm.dgram");
    let switch = Switch::new(1500);
    let mut probe = Probe::new(&switch);
    dgram::listen(&switch, &ours).unwrap();
    let vm = UnixDatagram::bind(&theirs).unwrap();
    vm.send_to(b"VFKT", &ours).await.unwrap();
    let f = broadcast_from(VM_A, b"after the magic");
    vm.send_to(&f, &ours).await.unwrap();
    assert_eq!(probe.recv().await, f, "the magic must not reach the switch");
    probe.send(frame(VM_A, PROBE_MAC, b"to the learned peer"));
    let mut buf = vec![0u8; 2000];
    let n = timeout(WAIT, vm.recv(&mut buf)).await.unwrap().unwrap();
    assert_eq!(
        &buf[..n],
        &frame(VM_A, PROBE_MAC, b"to the learned peer")[..]
    );
    // A datagram over MTU + 14 is dropped and counted.
    vm.send_to(&broadcast_from(VM_A, &[0; 3000]), &ours)
        .await
        .unwrap();
    until("oversize counted", || {
        counter(&switch, |c| &c.drop_oversize) == 1
    })
    .await;
}

#[tokio::test]
async fn listen_fd_takes_socketpair_ends_over_scm_rights() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fd.sock");
    let switch = Switch::new(1500);
    let mut probe = Probe::new(&switch);
    fdpass::listen(&switch, &path).unwrap();
    let conn = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let mut vms = Vec::new();
    for mac in [VM_A, VM_B] {
        let (theirs, vm) = dgram_pair();
        let fds = [theirs.as_raw_fd()];
        sendmsg::<()>(
            conn.as_raw_fd(),
            &[IoSlice::new(b"fd")],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        drop(theirs);
        let f = broadcast_from(mac, b"via a passed fd");
        // The port exists once the daemon took the fd: resend until it arrives.
        vm.send(&f).await.unwrap();
        assert_eq!(probe.recv().await, f);
        vms.push(vm);
    }
    drop(conn); // the carrier connection may go; the ports stay
    probe.send(frame(VM_B, PROBE_MAC, b"b"));
    let mut buf = vec![0u8; 2000];
    let n = timeout(WAIT, vms[1].recv(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf[..n], &frame(VM_B, PROBE_MAC, b"b")[..]);
}

#[tokio::test]
async fn a_full_datagram_peer_loses_frames_but_stalls_nobody() {
    let switch = Switch::new(1500);
    let mut probe = Probe::new(&switch);
    let (ours, slow) = dgram_pair();
    fd::adopt(&switch, ours, "slow".into()).unwrap();
    slow.send(&broadcast_from(VM_A, b"slow vm")).await.unwrap();
    probe.recv().await;
    let (b, mut vm_b) = UnixStream::pair().unwrap();
    stream::spawn_unix(&switch, b, "b".into());
    // Far more than the slow peer's socket and queue can hold; it never reads.
    for i in 0..20_000u32 {
        probe.send(frame(VM_A, PROBE_MAC, &i.to_be_bytes().repeat(100)));
    }
    until("queue drops counted", || {
        counter(&switch, |c| &c.drop_queue_full) > 0
    })
    .await;
    // The other VM is served at once.
    vm_b.write_all(&prefixed(&broadcast_from(VM_B, b"fast")))
        .await
        .unwrap();
    assert_eq!(probe.recv().await, broadcast_from(VM_B, b"fast"));
    probe.send(frame(VM_B, PROBE_MAC, b"to b"));
    assert_eq!(
        read_prefixed(&mut vm_b).await,
        frame(VM_B, PROBE_MAC, b"to b")
    );
    // And the slow VM, once it reads, gets frames again, in order.
    let mut buf = vec![0u8; 2000];
    let n = timeout(WAIT, slow.recv(&mut buf)).await.unwrap().unwrap();
    assert_eq!(
        &buf[..n],
        &frame(VM_A, PROBE_MAC, &0u32.to_be_bytes().repeat(100))[..]
    );
}
