//! End-to-end tests of the foundation: a real DHCP client in a guest namespace gets its lease
//! from usernet over a tap device, and the gateway answers ARP and ping for its own addresses.
//! Each test creates its own namespaces and daemon (see `support`); without root and the tools
//! the tests print `SKIPPED:` unless `USERNET_E2E=1`.

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

const ROUTER: &str = "192.168.5.2";
const DNS: &str = "192.168.5.3";

/// Asserts the default plan's lease: .15/24, router .2, DNS .3, MTU 1500.
fn check_default_lease(daemon: &Daemon, lease: &LeaseInfo, want_ip: &str) {
    let ctx = &lease.client_output;
    daemon.check_eq("leased ip", lease.ip, ip4(want_ip), ctx);
    daemon.check_eq("prefix", lease.prefix, 24, ctx);
    daemon.check_eq("router", lease.router, Some(ip4(ROUTER)), ctx);
    daemon.check_eq("dns", lease.dns.clone(), vec![ip4(DNS)], ctx);
    daemon.check_eq("mtu (option 26)", lease.mtu, Some(1500), ctx);
}

/// The address the client's script put on the interface.
fn check_applied(daemon: &Daemon, ns: &Netns, lease: &LeaseInfo) {
    let want = format!("{}/{}", lease.ip, lease.prefix);
    let have = ns.addrs("tap0");
    daemon.check(
        have.contains(&want),
        format!("tap0 in {} should carry {want}, has {have:?}", ns.name()),
    );
}

#[test]
fn udhcpc_gets_default_plan_and_gateway_answers_ping() {
    if !require_root_and_tools(
        "udhcpc_gets_default_plan_and_gateway_answers_ping",
        &["busybox"],
    ) {
        return;
    }
    let d = Netns::new("d");
    let g = Netns::new("g");
    let daemon = Daemon::start_tap(&d, &g, &[]);

    let lease = daemon.udhcpc(&g, "tap0", &[]);
    check_default_lease(&daemon, &lease, "192.168.5.15");
    daemon.check_eq(
        "dotted subnet",
        lease.vars.get("subnet").map(String::as_str),
        Some("255.255.255.0"),
        &lease.client_output,
    );
    check_applied(&daemon, &g, &lease);

    daemon.assert_ping(&g, ROUTER, 1);
    daemon.assert_ping(&g, DNS, 1);
    daemon.assert_no_ping(&g, "192.168.5.77", 1);
}

#[test]
fn dhclient_gets_default_plan() {
    if !require_root_and_tools("dhclient_gets_default_plan", &["busybox", "dhclient"]) {
        return;
    }
    let d = Netns::new("d");
    let g = Netns::new("g");
    let daemon = Daemon::start_tap(&d, &g, &[]);

    let lease = daemon.dhclient(&g, "tap0");
    check_default_lease(&daemon, &lease, "192.168.5.15");
    daemon.check_eq(
        "new_subnet_mask",
        lease.vars.get("subnet").map(String::as_str),
        Some("255.255.255.0"),
        &lease.client_output,
    );
    check_applied(&daemon, &g, &lease);
    daemon.assert_ping(&g, ROUTER, 1);
}

#[test]
fn mtu_9000_is_served_and_applied() {
    if !require_root_and_tools("mtu_9000_is_served_and_applied", &["busybox"]) {
        return;
    }
    let d = Netns::new("d");
    let g = Netns::new("g");
    let daemon = Daemon::start_tap(&d, &g, &["--mtu", "9000"]);

    let lease = daemon.udhcpc(&g, "tap0", &[]);
    daemon.check_eq(
        "mtu (option 26)",
        lease.mtu,
        Some(9000),
        &lease.client_output,
    );
    daemon.check_eq(
        "leased ip",
        lease.ip,
        ip4("192.168.5.15"),
        &lease.client_output,
    );
    daemon.check_eq(
        "tap0 mtu in guest",
        g.link_mtu("tap0"),
        Some(9000),
        &lease.client_output,
    );
    daemon.assert_ping(&g, ROUTER, 1);
}

#[test]
fn custom_subnet_plan() {
    if !require_root_and_tools("custom_subnet_plan", &["busybox"]) {
        return;
    }
    let d = Netns::new("d");
    let g = Netns::new("g");
    let daemon = Daemon::start_tap(&d, &g, &["--subnet", "10.66.0.0/24"]);

    let lease = daemon.udhcpc(&g, "tap0", &[]);
    let ctx = &lease.client_output;
    daemon.check_eq("leased ip", lease.ip, ip4("10.66.0.15"), ctx);
    daemon.check_eq("prefix", lease.prefix, 24, ctx);
    daemon.check_eq("router", lease.router, Some(ip4("10.66.0.2")), ctx);
    daemon.check_eq("dns", lease.dns.clone(), vec![ip4("10.66.0.3")], ctx);
    check_applied(&daemon, &g, &lease);
    daemon.assert_ping(&g, "10.66.0.2", 1);
}

#[test]
fn lima_networks_yaml_user_v2() {
    if !require_root_and_tools("lima_networks_yaml_user_v2", &["busybox"]) {
        return;
    }
    let yaml = "\
networks:
  user-v2:
    mode: user-v2
    gateway: 192.168.104.1
    netmask: 255.255.255.0
";
    let (_dir, file) = temp_file("networks.yaml", yaml);
    let file = file.to_string_lossy().into_owned();
    let d = Netns::new("d");
    let g = Netns::new("g");
    let daemon = Daemon::start_tap(&d, &g, &["--config", &file, "--network", "user-v2"]);

    let lease = daemon.udhcpc(&g, "tap0", &[]);
    let ctx = &lease.client_output;
    daemon.check_eq("leased ip", lease.ip, ip4("192.168.104.15"), ctx);
    daemon.check_eq("prefix", lease.prefix, 24, ctx);
    daemon.check_eq("router", lease.router, Some(ip4("192.168.104.2")), ctx);
    daemon.check_eq("dns", lease.dns.clone(), vec![ip4("192.168.104.3")], ctx);
    daemon.assert_ping(&g, "192.168.104.2", 1);
}

#[test]
fn two_guests_on_one_daemon_get_distinct_leases_and_reach_each_other() {
    if !require_root_and_tools(
        "two_guests_on_one_daemon_get_distinct_leases_and_reach_each_other",
        &["busybox"],
    ) {
        return;
    }
    let d = Netns::new("d");
    let g1 = Netns::new("g1");
    let g2 = Netns::new("g2");
    let daemon = Daemon::start_taps(&d, &[&g1, &g2], &[]);

    // Both ask at once: the order of the answers is theirs to choose.
    let (r1, r2) = std::thread::scope(|s| {
        let a = s.spawn(|| try_udhcpc(&g1, "tap0", &[]));
        let b = s.spawn(|| try_udhcpc(&g2, "tap0", &[]));
        (
            a.join().expect("udhcpc thread"),
            b.join().expect("udhcpc thread"),
        )
    });
    let l1 = r1.unwrap_or_else(|e| daemon.fail(e));
    let l2 = r2.unwrap_or_else(|e| daemon.fail(e));
    let mut got = [l1.ip, l2.ip];
    got.sort();
    daemon.check_eq(
        "the two leases",
        got,
        [ip4("192.168.5.15"), ip4("192.168.5.16")],
        &format!("{}\n{}", l1.client_output, l2.client_output),
    );
    for l in [&l1, &l2] {
        daemon.check_eq("router", l.router, Some(ip4(ROUTER)), &l.client_output);
    }
    check_applied(&daemon, &g1, &l1);
    check_applied(&daemon, &g2, &l2);

    daemon.assert_ping(&g1, &l2.ip.to_string(), 1);
    daemon.assert_ping(&g2, &l1.ip.to_string(), 1);
    daemon.assert_ping(&g1, ROUTER, 1);
    daemon.assert_ping(&g2, ROUTER, 1);
}

#[test]
fn lease_file_survives_restart() {
    if !require_root_and_tools("lease_file_survives_restart", &["busybox"]) {
        return;
    }
    const MAC_A: &str = "52:55:55:00:00:42";
    const MAC_B: &str = "52:55:55:00:00:43";
    let dir = tempfile::Builder::new()
        .prefix("usernet-leases-")
        .tempdir()
        .expect("temp dir");
    let lease_file = dir.path().join("leases.json");
    let lease_file_s = lease_file.to_string_lossy().into_owned();
    let d = Netns::new("d");
    let ga = Netns::new("ga");
    let gb = Netns::new("gb");
    let mut daemon = Daemon::start_taps(&d, &[&ga, &gb], &["--lease-file", &lease_file_s]);

    // First run: only A asks.
    ga.set_mac("tap0", MAC_A);
    gb.set_mac("tap0", MAC_B);
    let first = daemon.udhcpc(&ga, "tap0", &[]);
    daemon.check_eq(
        "A's first lease",
        first.ip,
        ip4("192.168.5.15"),
        &first.client_output,
    );

    let st = daemon.stop();
    daemon.check(
        st.success(),
        format!("daemon exited with {st} on SIGTERM, expected 0"),
    );
    let saved = std::fs::read_to_string(&lease_file)
        .unwrap_or_else(|e| daemon.fail(format!("lease file {lease_file_s} after stop: {e}")));
    let saved_lc = saved.to_lowercase();
    daemon.check(
        saved.trim_start().starts_with('{') || saved.trim_start().starts_with('['),
        format!("lease file is not JSON:\n{saved}"),
    );
    daemon.check(
        saved_lc.contains(MAC_A) && saved.contains(&first.ip.to_string()),
        format!("lease file should hold {MAC_A} -> {}:\n{saved}", first.ip),
    );

    // Second run, same lease file: B asks first and must not be given A's saved address.
    daemon.restart();
    ga.set_mac("tap0", MAC_A);
    gb.set_mac("tap0", MAC_B);
    let b = daemon.udhcpc(&gb, "tap0", &[]);
    daemon.check(
        b.ip != first.ip,
        format!(
            "B ({MAC_B}) was given A's saved address {}\nlease file:\n{saved}\n{}",
            first.ip, b.client_output
        ),
    );
    let b_last = b.ip.octets()[3];
    daemon.check(
        b.ip.octets()[..3] == [192, 168, 5] && (15..255).contains(&b_last),
        format!("B's address {} is outside the pool", b.ip),
    );
    let a = daemon.udhcpc(&ga, "tap0", &[]);
    daemon.check_eq("A's lease after restart", a.ip, first.ip, &a.client_output);
    daemon.assert_ping(&gb, &a.ip.to_string(), 1);
}

#[test]
fn static_lease_flag() {
    if !require_root_and_tools("static_lease_flag", &["busybox"]) {
        return;
    }
    const MAC: &str = "52:55:55:00:00:50";
    let d = Netns::new("d");
    let g = Netns::new("g");
    let daemon = Daemon::start_tap(&d, &g, &["--leases", &format!("192.168.5.50={MAC}")]);
    g.set_mac("tap0", MAC);

    let lease = daemon.udhcpc(&g, "tap0", &[]);
    let ctx = &lease.client_output;
    daemon.check_eq("static lease", lease.ip, ip4("192.168.5.50"), ctx);
    daemon.check_eq("router", lease.router, Some(ip4(ROUTER)), ctx);
    check_applied(&daemon, &g, &lease);
    daemon.assert_ping(&g, ROUTER, 1);
}

/// No root needed: the binary is run directly with no transport flags; a bad plan must be
/// refused before anything starts.
#[test]
fn invalid_config_exits_2_naming_field_and_value() {
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--subnet", "192.168.5.0/31"],
            &["subnet 192.168.5.0/31 has no room for a guest"],
        ),
        (
            &["--dns-ip", "10.0.0.3"],
            &["dns-ip 10.0.0.3 is outside 192.168.5.0/24"],
        ),
        (&["--mtu", "70000"], &["mtu", "70000"]),
    ];
    let mut failures = Vec::new();
    for (args, wants) in cases {
        let mut cmd = Command::new(USERNET);
        cmd.args(*args).env_remove("RUST_LOG");
        let out = run_with_deadline(cmd, Duration::from_secs(10));
        if out.timed_out {
            failures.push(format!(
                "usernet {args:?} kept running (killed after 10 s)\n{}",
                out.describe()
            ));
            continue;
        }
        if out.code() != Some(2) {
            failures.push(format!(
                "usernet {args:?}: exit {:?}, expected 2\n{}",
                out.status,
                out.describe()
            ));
            continue;
        }
        let lines: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        if lines.len() != 1 {
            failures.push(format!(
                "usernet {args:?}: expected a one-line error on stderr\n{}",
                out.describe()
            ));
        }
        for want in *wants {
            if !out.stderr.contains(want) {
                failures.push(format!(
                    "usernet {args:?}: stderr lacks {want:?}\n{}",
                    out.describe()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
