//! Checks the test rig itself, independent of usernet: the DHCP client helpers and ping against
//! busybox udhcpd across a veth pair between two test namespaces. When an end-to-end test fails
//! and this passes, the failure is the daemon's, not the rig's.

mod support;

use std::time::Duration;

use support::*;

const UDHCPD_CONF: &str = "\
start 10.77.0.15
end 10.77.0.40
interface vs
max_leases 20
lease_file @DIR@/udhcpd.leases
pidfile @DIR@/udhcpd.pid
opt subnet 255.255.255.0
opt router 10.77.0.2
opt dns 10.77.0.3
opt mtu 1400
";

#[test]
fn client_helpers_work_against_busybox_udhcpd() {
    if !require_root_and_tools(
        "client_helpers_work_against_busybox_udhcpd",
        &["busybox", "dhclient"],
    ) {
        return;
    }
    let s = Netns::new("s");
    let g = Netns::new("g");
    let g2 = Netns::new("g");
    s.ip_ok(&[
        "link",
        "add",
        "vs",
        "type",
        "veth",
        "peer",
        "name",
        "tap0",
        "netns",
        g.name(),
    ]);
    s.ip_ok(&["addr", "add", "10.77.0.2/24", "dev", "vs"]);
    s.ip_ok(&["link", "set", "dev", "vs", "up"]);

    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path().to_string_lossy().into_owned();
    std::fs::write(dir.path().join("udhcpd.leases"), "").unwrap();
    let conf = dir.path().join("udhcpd.conf");
    std::fs::write(&conf, UDHCPD_CONF.replace("@DIR@", &d)).unwrap();
    let mut server = s
        .exec("busybox", &["udhcpd", "-f", conf.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn udhcpd");
    // udhcpd is listening once its socket on :67 shows up.
    wait_until(Duration::from_secs(5), "udhcpd to listen on :67", || {
        let out = run_with_deadline(s.exec("cat", &["/proc/net/udp"]), Duration::from_secs(5));
        out.stdout.lines().any(|l| l.contains(":0043 "))
    });

    let lease = udhcpc(&g, "tap0", &[]);
    // udhcpd picks its own order within the pool.
    let last = lease.ip.octets()[3];
    assert!(
        lease.ip.octets()[..3] == [10, 77, 0] && (15..=40).contains(&last),
        "{}",
        lease.client_output
    );
    assert_eq!(lease.prefix, 24, "{}", lease.client_output);
    assert_eq!(lease.router, Some(ip4("10.77.0.2")));
    assert_eq!(lease.dns, vec![ip4("10.77.0.3")]);
    assert_eq!(lease.mtu, Some(1400));
    assert_eq!(g.link_mtu("tap0"), Some(1400));
    assert!(g.addrs("tap0").contains(&format!("{}/24", lease.ip)));
    assert!(
        ping(&g, "10.77.0.2", 1),
        "{}",
        ping_output(&g, "10.77.0.2", 1).describe()
    );
    assert!(!ping(&g, "10.77.0.77", 1));

    // dhclient from a second namespace with a fixed MAC.
    s.ip_ok(&[
        "link",
        "add",
        "vs2",
        "type",
        "veth",
        "peer",
        "name",
        "tap0",
        "netns",
        g2.name(),
    ]);
    g2.set_mac("tap0", "52:55:55:00:00:42");
    // udhcpd serves one interface: bridge the second veth into it.
    s.ip_ok(&["link", "add", "br0", "type", "bridge"]);
    s.ip_ok(&["link", "set", "dev", "br0", "up"]);
    s.ip_ok(&["link", "set", "dev", "vs2", "master", "br0", "up"]);
    let _ = server.kill();
    let _ = server.wait();
    s.ip_ok(&["addr", "flush", "dev", "vs"]);
    s.ip_ok(&["link", "set", "dev", "vs", "master", "br0"]);
    s.ip_ok(&["addr", "add", "10.77.0.2/24", "dev", "br0"]);
    std::fs::write(
        &conf,
        UDHCPD_CONF
            .replace("@DIR@", &d)
            .replace("interface vs", "interface br0"),
    )
    .unwrap();
    let mut server = s
        .exec("busybox", &["udhcpd", "-f", conf.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn udhcpd");
    wait_until(Duration::from_secs(5), "udhcpd to listen on :67", || {
        let out = run_with_deadline(s.exec("cat", &["/proc/net/udp"]), Duration::from_secs(5));
        out.stdout.lines().any(|l| l.contains(":0043 "))
    });
    let lease2 = dhclient(&g2, "tap0");
    assert_ne!(lease2.ip, lease.ip, "{}", lease2.client_output);
    assert_eq!(lease2.prefix, 24, "{}", lease2.client_output);
    assert_eq!(lease2.vars["subnet"], "255.255.255.0");
    assert_eq!(lease2.router, Some(ip4("10.77.0.2")));
    assert_eq!(lease2.dns, vec![ip4("10.77.0.3")]);
    assert_eq!(lease2.mtu, Some(1400), "{}", lease2.client_output);
    assert!(ping(&g2, &lease.ip.to_string(), 1));
    let _ = server.kill();
    let _ = server.wait();
}
