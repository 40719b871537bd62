//! RSS growth per idle established TCP connection through the NAT.
//!
//! Opens 1,000 and then (9,000 more, so) 10,000 idle connections from the bench's guest through
//! the NAT to a listener on 127.0.0.1, and prints the process's RSS growth from before the first
//! (from /proc/self/statm, and VmRSS from /proc/self/status) in total and per connection. The
//! host side's accepted sockets are in the figure (their userspace part; kernel socket memory is
//! not RSS); the guest's own state is allocated before the baseline. Then, as an extra figure,
//! 1,000 of the connections each carry 64 KiB from the guest and go idle again.
//!
//! `cargo bench --bench idle_rss`

mod common;

use std::time::Duration;

use common::{Guest, Host};
use smoltcp::iface::{Interface, SocketStorage};
use smoltcp::socket::tcp;

const STEPS: [usize; 2] = [1_000, 10_000];
/// Connections opened and reset before the baseline, to warm up one-time allocations (and, as
/// in a daemon that has run a while, the allocator's state after connections have come and
/// gone). `IDLE_RSS_WARM_UP=N` to change.
const WARM_UP: usize = 500;

fn warm_up() -> usize {
    std::env::var("IDLE_RSS_WARM_UP")
        .map(|v| v.parse().expect("IDLE_RSS_WARM_UP: a count"))
        .unwrap_or(WARM_UP)
}
/// Extra figure: connections that carry data before going idle, and how much each.
const USED: usize = 1_000;
const USED_SEGMENTS: usize = 45; // 65,700 bytes

struct Mem {
    statm: u64,
    vm_rss_kb: u64,
    vm_size_kb: u64,
    /// The host-side child's RSS (its accepted sockets' userspace part).
    host_statm: u64,
    /// Resident kB in [heap] and in other anonymous mappings.
    heap_kb: u64,
    anon_kb: u64,
}

fn mem(host: &Host) -> Mem {
    Mem {
        statm: common::statm_rss(),
        vm_rss_kb: common::status_kb("VmRSS"),
        vm_size_kb: common::status_kb("VmSize"),
        host_statm: common::statm_rss_of(&host.pid().to_string()),
        heap_kb: common::heap_and_anon_kb().0,
        anon_kb: common::heap_and_anon_kb().1,
    }
}

fn report(what: &str, n: usize, base: &Mem, now: &Mem) {
    let kib = |a: u64, b: u64| (a as f64 - b as f64) / 1024.0;
    let d = kib(now.statm, base.statm);
    let h = kib(now.host_statm, base.host_statm);
    let dk = now.vm_rss_kb as f64 - base.vm_rss_kb as f64;
    let dv = now.vm_size_kb as f64 - base.vm_size_kb as f64;
    let n = n as f64;
    println!("{what}:");
    println!(
        "  NAT process, statm RSS:   +{d:>10.1} KiB = {:>8.2} KiB/conn",
        d / n
    );
    println!(
        "  NAT process, VmRSS:       +{dk:>10.0} kB  = {:>8.2} kB/conn",
        dk / n
    );
    println!(
        "  NAT process, VmSize:      +{dv:>10.0} kB  = {:>8.1} kB/conn",
        dv / n
    );
    let dh = now.heap_kb as f64 - base.heap_kb as f64;
    let da = now.anon_kb as f64 - base.anon_kb as f64;
    println!(
        "    of which [heap]:        +{dh:>10.0} kB  = {:>8.2} kB/conn (main thread's arena)",
        dh / n
    );
    println!(
        "    of which other anon:    +{da:>10.0} kB  = {:>8.2} kB/conn (worker arenas, mmaps)",
        da / n
    );
    println!(
        "  host side (child), RSS:   +{h:>10.1} KiB = {:>8.2} KiB/conn",
        h / n
    );
    println!(
        "  NAT + host side, RSS:     +{:>10.1} KiB = {:>8.2} KiB/conn",
        d + h,
        (d + h) / n
    );
}

async fn settle(guest: &mut Guest, open: u64) {
    common::wait_open(guest, open).await;
    guest.idle_for(Duration::from_secs(3)).await;
}

async fn run() {
    let (nat, frames) = common::new_nat();
    let max = *STEPS.iter().max().unwrap();
    let mut host = Host::new();
    let mut guest = Guest::new(nat, frames, host.port);

    // Warm up: open and reset some connections so that thread-local caches, the flow table's
    // first allocations and the runtime's slabs exist before the baseline.
    let warm = warm_up();
    guest.open(warm).await;
    host.keep_idle(warm);
    settle(&mut guest, warm as u64).await;
    guest.reset_all();
    settle(&mut guest, 0).await;
    host.close_idle(); // capacity kept: the host side's Vec is not part of the figure

    let base = mem(&host);
    println!(
        "baseline: statm RSS {:.1} MiB, VmRSS {} kB, VmSize {} kB",
        base.statm as f64 / 1048576.0,
        base.vm_rss_kb,
        base.vm_size_kb
    );
    for n in STEPS {
        let more = n - guest.opened;
        guest.open(more).await;
        host.keep_idle(more);
        settle(&mut guest, n as u64).await;
        let s = guest.nat.stats().tcp;
        assert_eq!(s.open, n as u64);
        report(&format!("{n} idle connections"), n, &base, &mem(&host));
    }
    println!("largest resident mappings (Rss kB, size kB, name):");
    for (rss, size, name) in common::top_mappings(6) {
        println!("  {rss:>9} {size:>9} {name}");
    }
    let c = guest.counters;
    println!(
        "guest: {} frames out, {} in, {} keep-alives answered, {} resets",
        c.frames_out, c.frames_in, c.keepalives, c.resets
    );

    // Extra: connections that have carried data, then idle. Host side never reads: the data
    // sits in its kernel socket buffer, not in RSS.
    let before = mem(&host);
    for i in 0..USED {
        guest
            .push(common::BASE_PORT + i as u16, USED_SEGMENTS)
            .await;
    }
    settle(&mut guest, max as u64).await;
    report(
        &format!("+ {USED} carried {} B each", USED_SEGMENTS * common::MSS),
        USED,
        &before,
        &mem(&host),
    );

    println!(
        "sizes: smoltcp Interface {} B, tcp::Socket {} B, SocketStorage {} B; NAT tcp_buffer {} B x 2 per connection (vec![0; n] each)",
        std::mem::size_of::<Interface>(),
        std::mem::size_of::<tcp::Socket<'static>>(),
        std::mem::size_of::<SocketStorage<'static>>(),
        common::nat_config().tcp_buffer,
    );
    guest.reset_all();
    guest.idle_for(Duration::from_millis(500)).await;
}

fn main() {
    common::maybe_host_process();
    let max = *STEPS.iter().max().unwrap();
    // This process holds the NAT's host sockets; the accepted ends are in the host-side child.
    let want = max + 1024;
    let (soft, hard) = common::raise_nofile(want as u64);
    println!(
        "idle_rss: RLIMIT_NOFILE {soft}/{hard} (want {want}), page size {}",
        common::page_size()
    );
    assert!(
        soft >= want as u64,
        "RLIMIT_NOFILE hard limit {hard} is too low for {want} descriptors"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run());
}
