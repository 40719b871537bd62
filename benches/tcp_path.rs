//! Frames per second through the NAT's TCP path (guest -> host), with 10 and with 10,000 idle
//! established connections open beside the measured one.
//!
//! One measured iteration: the guest pushes `BATCH` data segments of 1460 bytes on one
//! connection, within the window the NAT advertises, until all are ACKed; the host side reads
//! and discards. Opening the idle connections is setup, outside the measured time.
//!
//! `cargo bench --bench tcp_path`

mod common;

use std::time::{Duration, Instant};

use common::{Guest, Host};
use criterion::{criterion_group, Criterion, Throughput};

/// Data segments per measured iteration.
const BATCH: usize = 2000;
/// The idle counts, in this order; `TCP_PATH_IDLE=10000,10` to change (order, subset).
const IDLE: [usize; 2] = [10, 10_000];

fn idle_counts() -> Vec<usize> {
    match std::env::var("TCP_PATH_IDLE") {
        Ok(v) => v
            .split(',')
            .map(|n| n.trim().parse().expect("TCP_PATH_IDLE: numbers"))
            .collect(),
        Err(_) => IDLE.to_vec(),
    }
}

struct Rig {
    guest: Guest,
    host: Host,
    port: u16,
}

async fn rig(idle: usize) -> Rig {
    let (nat, frames) = common::new_nat();
    let mut host = Host::new();
    let mut guest = Guest::new(nat, frames, host.port);
    let t = Instant::now();
    guest.open(idle).await;
    host.keep_idle(idle);
    let port = guest.open(1).await.start;
    host.discard_next();
    common::wait_open(&mut guest, idle as u64 + 1).await;
    // Let the last ACKs settle.
    guest.idle_for(Duration::from_millis(500)).await;
    eprintln!(
        "tcp_path: {idle} idle connections + 1 measured open in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Rig { guest, host, port }
}

fn tcp_frames(c: &mut Criterion) {
    // This process holds the NAT's host sockets; the accepted ends are in the host-side child.
    let counts = idle_counts();
    let want = counts.iter().max().unwrap() + 1024;
    let (soft, hard) = common::raise_nofile(want as u64);
    eprintln!("tcp_path: RLIMIT_NOFILE {soft}/{hard} (want {want})");
    assert!(
        soft >= want as u64,
        "RLIMIT_NOFILE hard limit {hard} is too low for {want} descriptors"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");

    let mut group = c.benchmark_group("tcp_frames");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(3))
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Elements(BATCH as u64));
    for idle in counts {
        let mut rig = rt.block_on(rig(idle));
        let before = rig.guest.counters;
        let stats_before = rig.guest.nat.stats().tcp;
        let (cpu_before, host_cpu_before) = (common::cpu_self(), common::cpu_of(rig.host.pid()));
        group.bench_function(format!("idle_{idle}"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let t = Instant::now();
                    for _ in 0..iters {
                        rig.guest.push(rig.port, BATCH).await;
                    }
                    t.elapsed()
                })
            })
        });
        let after = rig.guest.counters;
        let stats = rig.guest.nat.stats().tcp;
        // CPU time per data segment over warm-up and measurement: less sensitive than wall
        // time to whatever else the machine runs.
        let data =
            (stats.bytes_from_guest - stats_before.bytes_from_guest) as f64 / common::MSS as f64;
        let us = |d: Duration| d.as_secs_f64() * 1e6 / data;
        eprintln!(
            "tcp_path idle_{idle}: CPU per data frame: NAT process (with the bench's guest) {:.3} us, \
             host side {:.3} us ({data:.0} data frames)",
            us(common::cpu_self() - cpu_before),
            us(common::cpu_of(rig.host.pid()) - host_cpu_before),
        );
        eprintln!(
            "tcp_path idle_{idle}: frames to NAT {}, frames from NAT {}, keep-alives answered {}, \
             guest retransmits {}, resets {}, NAT inbox drops {}, NAT open {}",
            after.frames_out - before.frames_out,
            after.frames_in - before.frames_in,
            after.keepalives - before.keepalives,
            after.retransmits - before.retransmits,
            after.resets - before.resets,
            stats.drop_queue_full - stats_before.drop_queue_full,
            stats.open,
        );
        rt.block_on(async {
            rig.guest.reset_all();
            rig.guest.idle_for(Duration::from_millis(500)).await;
        });
        drop(rig);
    }
    group.finish();
}

criterion_group!(benches, tcp_frames);

fn main() {
    common::maybe_host_process();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
