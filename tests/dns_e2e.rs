//! End-to-end tests of the DNS server at 192.168.5.3:53: real clients (dig, getent, python) in
//! the guest namespace G (192.168.5.15 by DHCP) ask usernet, which runs in namespace D with its
//! own /etc/resolv.conf and /etc/hosts (`ip netns exec` bind-mounts /etc/netns/D/*) pointing at
//! a dnsmasq upstream on D's 127.0.0.1:53. The guest's own resolv.conf (/etc/netns/G/) names
//! 192.168.5.3. Traffic goes only to loopback and the test's namespaces; every fallback is set
//! to D's 127.0.0.1. Needs root, dig (dnsutils), dnsmasq (dnsmasq-base), busybox, python3,
//! getent; prints `SKIPPED:` otherwise unless `USERNET_E2E=1`.

mod support;

use std::fs;
use std::io::Write;
use std::time::{Duration, Instant};

use support::*;

const DNS: &str = "192.168.5.3";
const TOOLS: &[&str] = &["busybox", "dig", "dnsmasq", "python3", "getent", "ss"];

/// /etc/hosts of the daemon's namespace: what the host's resolver knows beyond DNS.
const D_HOSTS: &str = "127.0.0.1 localhost\n10.1.2.3 hostsonly.test\n";
/// /etc/resolv.conf of the daemon's namespace: the dnsmasq upstream.
const D_RESOLV: &str = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n";

/// The 8 strings of the long TXT record (the answer is about 1650 bytes).
fn long_txt_strings() -> Vec<String> {
    (0..8u8)
        .map(|i| String::from_utf8(vec![b'a' + i; 200]).unwrap())
        .collect()
}

fn dnsmasq_args() -> Vec<String> {
    let mut a: Vec<String> = [
        "-k",
        "--no-resolv",
        "--no-hosts",
        "--port=53",
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        "--pid-file=",
        "--user=root",
        "--log-queries",
        "--log-facility=-",
        "--local-ttl=123",
        "--local=/test/",
        "--local=/internal/",
        "--host-record=web.test,10.0.0.10,fd00::10",
        "--host-record=other.internal,10.0.0.77",
        "--cname=alias.test,web.test",
        "--txt-record=txt.test,hello world",
        "--mx-host=test,mail.test,10",
        "--srv-host=_http._tcp.test,web.test,80,0,0",
        "--ptr-record=10.0.0.10.in-addr.arpa,web.test",
        "--caa-record=test,0,issue,ca.test",
        "--dns-rr=test,2,03:6e:73:31:04:74:65:73:74:00",
        "--dns-rr=test,65,00:01:00:00:01:00:03:02:68:32",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push(format!(
        "--txt-record=long.test,{}",
        long_txt_strings().join(",")
    ));
    a
}

/// Files under /etc/netns/NAME/ for the namespaces of one test; removed on drop.
struct EtcNetns {
    dirs: Vec<String>,
}

impl EtcNetns {
    fn write(&mut self, ns: &Netns, file: &str, text: &str) {
        let dir = format!("/etc/netns/{}", ns.name());
        fs::create_dir_all(&dir).expect("create /etc/netns/NAME");
        fs::write(format!("{dir}/{file}"), text).expect("write /etc/netns file");
        if !self.dirs.contains(&dir) {
            self.dirs.push(dir);
        }
    }
}

impl Drop for EtcNetns {
    fn drop(&mut self) {
        for d in &self.dirs {
            let _ = fs::remove_dir_all(d);
        }
    }
}

/// Namespace D (usernet + dnsmasq on 127.0.0.1:53), namespace G (the guest, tap0 by DHCP).
struct DnsRig {
    // Dropped in this order: the upstream, the daemon, the namespaces, then their /etc files.
    upstream: Option<BgProcess>,
    daemon: Daemon,
    lease: LeaseInfo,
    g: Netns,
    d: Netns,
    _etc: EtcNetns,
}

fn note(msg: impl std::fmt::Display) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

fn usernet_has_dns_flags() -> bool {
    let out = run_with_deadline(
        {
            let mut c = std::process::Command::new(USERNET);
            c.arg("--help");
            c
        },
        Duration::from_secs(10),
    );
    out.stdout.contains("--dns-host")
}

impl DnsRig {
    /// `None` when the test must be skipped.
    fn new(test: &str, extra: &[&str]) -> Option<DnsRig> {
        Self::start(test, extra, true)
    }

    /// `serving`: whether a DNS server is expected at 192.168.5.3 (waited for).
    fn start(test: &str, extra: &[&str], serving: bool) -> Option<DnsRig> {
        if !require_root_and_tools(test, TOOLS) {
            return None;
        }
        assert!(
            usernet_has_dns_flags(),
            "{test}: `usernet --help` shows no --dns-host: the DNS server is not wired into the \
             daemon yet"
        );
        let d = Netns::new("dnsd");
        let g = Netns::new("dnsg");
        let mut etc = EtcNetns { dirs: Vec::new() };
        etc.write(&d, "hosts", D_HOSTS);
        etc.write(&d, "resolv.conf", D_RESOLV);
        etc.write(&g, "hosts", "127.0.0.1 localhost\n");
        etc.write(
            &g,
            "resolv.conf",
            &format!("nameserver {DNS}\noptions timeout:5 attempts:1\n"),
        );
        ns_sysctl(&g, "net.ipv6.conf.all.disable_ipv6", "1");
        ns_sysctl(&g, "net.ipv6.conf.default.disable_ipv6", "1");

        let mut upstream = BgProcess::spawn(d.exec("dnsmasq", &dnsmasq_args()));
        let up = poll_until(Duration::from_secs(10), || {
            upstream.running() && listening(&d, 'u', 53) && listening(&d, 't', 53)
        });
        assert!(
            up,
            "dnsmasq did not start in {}\n{}",
            d.name(),
            upstream.describe()
        );

        let mut args = vec![
            "--dns-fallback",
            "127.0.0.1",
            "--dns-host",
            "myhost.internal=10.9.9.9",
        ];
        args.extend_from_slice(extra);
        let daemon = Daemon::start_tap(&d, &g, &args);
        let lease = daemon.udhcpc(&g, "tap0", &[]);
        daemon.check_eq(
            "guest address",
            lease.ip,
            ip4("192.168.5.15"),
            &lease.client_output,
        );
        let rig = DnsRig {
            upstream: Some(upstream),
            daemon,
            lease,
            g,
            d,
            _etc: etc,
        };
        if !serving {
            return Some(rig);
        }
        // The DNS server must be reachable before a test relies on it.
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let r = rig.dig(&["host.lima.internal", "A"]);
            if r.status.as_deref() == Some("NOERROR") {
                break;
            }
            if Instant::now() >= end {
                rig.fail(format!(
                    "the DNS server at {DNS} never answered\n{}",
                    r.out.describe()
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Some(rig)
    }

    #[track_caller]
    fn fail(&self, msg: impl std::fmt::Display) -> ! {
        self.daemon.fail(msg)
    }

    /// `dig @192.168.5.3 +time=8 +tries=1 args...` in the guest.
    fn dig(&self, args: &[&str]) -> Dig {
        let server = format!("@{DNS}");
        let mut full = vec![server.as_str(), "+time=8", "+tries=1"];
        full.extend_from_slice(args);
        let t0 = Instant::now();
        let out = run_with_deadline(self.g.exec("dig", &full), Duration::from_secs(30));
        Dig::parse(out, t0.elapsed())
    }

    /// Asserts a NOERROR answer whose records of `rtype` include `want` in their data.
    #[track_caller]
    fn expect(&self, name: &str, rtype: &str, transport: &[&str], want: &str) {
        let mut args = vec![name, rtype];
        args.extend_from_slice(transport);
        let r = self.dig(&args);
        let ok = r.status.as_deref() == Some("NOERROR")
            && r.answers
                .iter()
                .any(|a| a.rtype == rtype && a.data.contains(want));
        if !ok {
            self.fail(format!(
                "dig {name} {rtype} {transport:?}: want {want:?} in the {rtype} answers\n{}",
                r.out.describe()
            ));
        }
    }

    #[track_caller]
    fn expect_status(&self, name: &str, rtype: &str, transport: &[&str], status: &str) -> Dig {
        let mut args = vec![name, rtype];
        args.extend_from_slice(transport);
        let r = self.dig(&args);
        if r.status.as_deref() != Some(status) {
            self.fail(format!(
                "dig {name} {rtype} {transport:?}: want status {status}\n{}",
                r.out.describe()
            ));
        }
        r
    }
}

/// One answer record as dig prints it.
#[derive(Debug)]
struct Rr {
    ttl: u32,
    rtype: String,
    data: String,
}

/// What dig said.
struct Dig {
    status: Option<String>,
    flags: Vec<String>,
    answers: Vec<Rr>,
    size: Option<usize>,
    retried_tcp: bool,
    elapsed: Duration,
    out: RunOutput,
}

impl Dig {
    fn parse(out: RunOutput, elapsed: Duration) -> Dig {
        let mut status = None;
        let mut flags = Vec::new();
        let mut answers = Vec::new();
        let mut size = None;
        let mut in_answer = false;
        for line in out.stdout.lines() {
            if let Some(i) = line.find("status: ") {
                let rest = &line[i + 8..];
                status = rest.split(',').next().map(|s| s.trim().to_string());
            } else if let Some(rest) = line.strip_prefix(";; flags: ") {
                let f = rest.split(';').next().unwrap_or("");
                flags = f.split_whitespace().map(str::to_string).collect();
            } else if let Some(rest) = line.strip_prefix(";; MSG SIZE  rcvd: ") {
                size = rest.trim().parse().ok();
            } else if line.starts_with(";; ANSWER SECTION:") {
                in_answer = true;
            } else if line.trim().is_empty() {
                in_answer = false;
            } else if in_answer && !line.starts_with(';') {
                let mut w = line.split_whitespace();
                let (Some(_name), Some(ttl), Some(_class), Some(rtype)) =
                    (w.next(), w.next(), w.next(), w.next())
                else {
                    continue;
                };
                answers.push(Rr {
                    ttl: ttl.parse().unwrap_or(0),
                    rtype: rtype.to_string(),
                    data: w.collect::<Vec<_>>().join(" "),
                });
            }
        }
        let retried_tcp = out.stdout.contains("Truncated, retrying in TCP mode");
        Dig {
            status,
            flags,
            answers,
            size,
            retried_tcp,
            elapsed,
            out,
        }
    }

    fn has_flag(&self, f: &str) -> bool {
        self.flags.iter().any(|x| x == f)
    }

    /// The strings of every TXT record, in order.
    fn txt_strings(&self) -> Vec<String> {
        self.answers
            .iter()
            .filter(|a| a.rtype == "TXT")
            .flat_map(|a| {
                a.data
                    .split('"')
                    .enumerate()
                    .filter(|(i, _)| i % 2 == 1)
                    .map(|(_, s)| s.to_string())
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

const UDP: &[&str] = &[];
const TCP: &[&str] = &["+tcp"];

#[test]
fn dig_every_type_over_udp_and_tcp() {
    let Some(rig) = DnsRig::new("dig_every_type_over_udp_and_tcp", &[]) else {
        return;
    };
    for t in [UDP, TCP] {
        // The host's native resolver: DNS via resolv.conf, and the hosts file.
        rig.expect("web.test", "A", t, "10.0.0.10");
        rig.expect("web.test", "AAAA", t, "fd00::10");
        rig.expect("hostsonly.test", "A", t, "10.1.2.3");
        rig.expect_status("nope.test", "A", t, "NXDOMAIN");
        // From the host's resolver configuration, with the upstream's TTL.
        rig.expect("alias.test", "CNAME", t, "web.test.");
        rig.expect("txt.test", "TXT", t, "\"hello world\"");
        rig.expect("test", "MX", t, "10 mail.test.");
        rig.expect("_http._tcp.test", "SRV", t, "0 0 80 web.test.");
        rig.expect("test", "NS", t, "ns1.test.");
        let r = rig.dig(&["txt.test", "TXT"]);
        rig.daemon.check(
            r.answers.iter().all(|a| a.ttl > 0 && a.ttl <= 123),
            format!("TXT TTL from the upstream (123)\n{}", r.out.describe()),
        );
        // Forwarded as is.
        rig.expect("10.0.0.10.in-addr.arpa", "PTR", t, "web.test.");
        rig.expect("test", "CAA", t, "issue \"ca.test\"");
        rig.expect("test", "HTTPS", t, "alpn=\"h2\"");
        rig.expect_status("test", "SOA", t, "NOERROR");
        // Static names; a neighbour of one still reaches the upstream.
        rig.expect("host.lima.internal", "A", t, "192.168.5.2");
        rig.expect("myhost.internal", "A", t, "10.9.9.9");
        rig.expect("other.internal", "A", t, "10.0.0.77");
        let r = rig.expect_status("host.lima.internal", "AAAA", t, "NOERROR");
        rig.daemon.check(
            r.answers.is_empty(),
            format!("no AAAA for host.lima.internal\n{}", r.out.describe()),
        );
    }
    // Flags: RA set, RD copied, the question answered.
    let r = rig.dig(&["web.test", "A"]);
    rig.daemon.check(
        r.has_flag("ra") && r.has_flag("rd") && r.has_flag("qr"),
        format!("flags qr rd ra\n{}", r.out.describe()),
    );
    let r = rig.dig(&["+norecurse", "myhost.internal", "A"]);
    rig.daemon.check(
        !r.has_flag("rd"),
        format!("RD not set when not asked\n{}", r.out.describe()),
    );
    // The guest's own resolver (glibc via the guest's resolv.conf) sees the host's hosts file.
    let out = run_with_deadline(
        rig.g.exec("getent", &["hosts", "hostsonly.test"]),
        Duration::from_secs(20),
    );
    rig.daemon.check(
        out.success() && out.stdout.contains("10.1.2.3"),
        format!(
            "getent hosts hostsonly.test in the guest\n{}",
            out.describe()
        ),
    );
    let out = run_with_deadline(
        rig.g.exec("getent", &["ahostsv4", "web.test"]),
        Duration::from_secs(20),
    );
    rig.daemon.check(
        out.success() && out.stdout.contains("10.0.0.10"),
        format!("getent ahostsv4 web.test in the guest\n{}", out.describe()),
    );
    let out = run_with_deadline(
        rig.g.exec("getent", &["hosts", "host.lima.internal"]),
        Duration::from_secs(20),
    );
    rig.daemon.check(
        out.success() && out.stdout.contains("192.168.5.2"),
        format!(
            "getent hosts host.lima.internal in the guest\n{}",
            out.describe()
        ),
    );
}

#[test]
fn long_txt_is_truncated_on_udp_and_whole_over_tcp() {
    let Some(rig) = DnsRig::new("long_txt_is_truncated_on_udp_and_whole_over_tcp", &[]) else {
        return;
    };
    let want = long_txt_strings();
    for extra in [
        &["+ignore", "+noedns"][..],
        &["+ignore"],
        &["+notcp", "+ignore", "+bufsize=1232"],
    ] {
        let mut args = vec!["long.test", "TXT"];
        args.extend_from_slice(extra);
        let r = rig.dig(&args);
        let limit = if extra.contains(&"+noedns") {
            512
        } else {
            1232
        };
        rig.daemon.check(
            r.has_flag("tc") && r.size.map(|s| s <= limit).unwrap_or(false),
            format!(
                "UDP {extra:?}: TC and at most {limit} bytes\n{}",
                r.out.describe()
            ),
        );
    }
    let r = rig.dig(&["long.test", "TXT", "+tcp"]);
    rig.daemon.check(
        !r.has_flag("tc") && r.txt_strings() == want,
        format!("+tcp: the whole TXT set\n{}", r.out.describe()),
    );
    // dig's default: UDP, sees TC, retries over TCP.
    let r = rig.dig(&["long.test", "TXT"]);
    rig.daemon.check(
        r.retried_tcp && r.txt_strings() == want,
        format!(
            "default: retried over TCP and got everything\n{}",
            r.out.describe()
        ),
    );
    // EDNS large enough: whole over UDP.
    let r = rig.dig(&["long.test", "TXT", "+notcp", "+bufsize=4096"]);
    rig.daemon.check(
        !r.has_flag("tc") && r.txt_strings() == want,
        format!("+bufsize=4096: whole over UDP\n{}", r.out.describe()),
    );
}

#[test]
fn ipv6_false_answers_aaaa_empty() {
    let Some(rig) = DnsRig::new("ipv6_false_answers_aaaa_empty", &["--dns-ipv6=false"]) else {
        return;
    };
    for t in [UDP, TCP] {
        let r = rig.expect_status("web.test", "AAAA", t, "NOERROR");
        rig.daemon.check(
            r.answers.is_empty(),
            format!("no AAAA with --dns-ipv6=false\n{}", r.out.describe()),
        );
        rig.expect("web.test", "A", t, "10.0.0.10");
    }
}

#[test]
fn no_host_resolver_runs_no_dns_server() {
    let Some(rig) = DnsRig::start(
        "no_host_resolver_runs_no_dns_server",
        &["--no-host-resolver", "--dns", "192.0.2.53"],
        false,
    ) else {
        return;
    };
    // DHCP hands out the --dns list, and nothing answers at the DNS address.
    rig.daemon.check_eq(
        "DNS servers in the lease",
        rig.lease.dns.clone(),
        vec![ip4("192.0.2.53")],
        &rig.lease.client_output,
    );
    let r = rig.dig(&["+time=2", "host.lima.internal", "A"]);
    rig.daemon.check(
        r.status.is_none(),
        format!(
            "no DNS answer at {DNS} with --no-host-resolver\n{}",
            r.out.describe()
        ),
    );
}

#[test]
fn stopped_upstream_gives_servfail_within_five_seconds() {
    let Some(mut rig) = DnsRig::new("stopped_upstream_gives_servfail_within_five_seconds", &[])
    else {
        return;
    };
    rig.expect("txt.test", "TXT", UDP, "hello world");
    if let Some(mut up) = rig.upstream.take() {
        up.kill();
    }
    wait_until(Duration::from_secs(10), "dnsmasq to stop listening", || {
        !listening(&rig.d, 'u', 53)
    });
    for t in [UDP, TCP] {
        for (name, rtype) in [
            ("web2.test", "A"),
            ("txt2.test", "TXT"),
            ("test", "MX"),
            ("10.0.0.10.in-addr.arpa", "PTR"),
        ] {
            let r = rig.expect_status(name, rtype, t, "SERVFAIL");
            rig.daemon.check(
                r.elapsed < Duration::from_millis(6000),
                format!(
                    "{name} {rtype}: SERVFAIL within 5 s (+1 s margin), took {:?}",
                    r.elapsed
                ),
            );
        }
    }
    // What does not need the upstream still works.
    rig.expect("host.lima.internal", "A", UDP, "192.168.5.2");
    rig.expect("hostsonly.test", "A", UDP, "10.1.2.3");
}

/// Sends N queries at once from the guest (one UDP socket each) and reports how many were
/// answered, as JSON.
const PARALLEL_PY: &str = r#"
import json, random, select, socket, struct, sys, time
server, n = sys.argv[1], int(sys.argv[2])
names = [("host.lima.internal", 1), ("myhost.internal", 1), ("web.test", 1),
         ("hostsonly.test", 1), ("txt.test", 16), ("10.0.0.10.in-addr.arpa", 12)]
def q(i, name, qtype):
    h = struct.pack(">HHHHHH", i, 0x0100, 1, 0, 0, 0)
    b = b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0"
    return h + b + struct.pack(">HH", qtype, 1)
socks = {}
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    name, qtype = names[i % len(names)]
    s.sendto(q(i, name, qtype), (server, 53))
    socks[s.fileno()] = (s, i)
ok, bad, end = 0, {}, time.time() + 15
poll = select.poll()
for fd in socks: poll.register(fd, select.POLLIN)
while socks and time.time() < end:
    for fd, _ in poll.poll(200):
        s, i = socks.pop(fd)
        poll.unregister(fd)
        data = s.recv(4096)
        rid, flags, qd, an = struct.unpack(">HHHH", data[:8])
        rcode = flags & 0xf
        if rid == i and rcode == 0 and an >= 1:
            ok += 1
        else:
            bad[str(rcode)] = bad.get(str(rcode), 0) + 1
        s.close()
print(json.dumps({"sent": n, "answered_ok": ok, "bad": bad, "unanswered": len(socks)}))
"#;

#[test]
fn a_thousand_parallel_queries_are_all_answered() {
    let Some(rig) = DnsRig::new("a_thousand_parallel_queries_are_all_answered", &[]) else {
        return;
    };
    let (_dir, script) = temp_file("parallel.py", PARALLEL_PY);
    let script = script.to_string_lossy().into_owned();
    let t0 = Instant::now();
    let out = run_with_deadline(
        rig.g.exec("python3", &[script.as_str(), DNS, "1000"]),
        Duration::from_secs(60),
    );
    let v = parse_last_json(&out.stdout).unwrap_or_else(|| {
        rig.fail(format!(
            "parallel client printed no JSON\n{}",
            out.describe()
        ))
    });
    note(format!(
        "1000 parallel DNS queries from the guest: {v} in {:?}",
        t0.elapsed()
    ));
    rig.daemon.check(
        v.get("answered_ok").and_then(|x| x.as_u64()) == Some(1000),
        format!("all 1000 answered: {v}\n{}", out.describe()),
    );
}
