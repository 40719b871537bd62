//! Drop-in command lines: `usernet lima ARGS` (what Lima gives its usernet process) and
//! `usernet gvproxy ARGS` or a binary called `gvproxy` (gvproxy's flags as Podman machine
//! passes them), translated into usernet's own flags with those projects' address plans.
//! Anything else passes through untouched. Unknown flags in these modes are an error that
//! names them.

use std::ffi::OsString;

/// gvproxy's plan: gateway (router, DNS) .1, host .254 -> 127.0.0.1, the guest .2 by a
/// static lease for Podman's MAC.
const GVPROXY_PLAN: &[&str] = &[
    "--subnet",
    "192.168.127.0/24",
    "--host-ip",
    "192.168.127.1",
    "--dns-ip",
    "192.168.127.1",
    "--guest-ip",
    "192.168.127.2",
    "--dhcp-start",
    "192.168.127.2",
    "--dhcp-end",
    "192.168.127.253",
    "--host-alias",
    "192.168.127.254",
    "--gateway-mac",
    "5a:94:ef:e4:0c:dd",
    "--leases",
    "192.168.127.2=5a:94:ef:e4:0c:ee",
    "--dns-host",
    "gateway.containers.internal=192.168.127.1",
    "--dns-host",
    "host.containers.internal=192.168.127.254",
    "--dns-host",
    "gateway.docker.internal=192.168.127.1",
    "--dns-host",
    "host.docker.internal=192.168.127.254",
];

/// Rewrite `args` (argv, program name first) for the drop-in modes.
pub fn translate(args: Vec<OsString>) -> Result<Vec<OsString>, String> {
    let program = args.first().cloned().unwrap_or_else(|| "usernet".into());
    let invoked_as = std::path::Path::new(&program)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("")
        .to_string();
    let strings = |from: usize| -> Result<Vec<String>, String> {
        args[from..]
            .iter()
            .map(|a| {
                a.to_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("argument {a:?} is not UTF-8"))
            })
            .collect()
    };
    if invoked_as == "gvproxy" {
        return gvproxy(&program, strings(1)?);
    }
    match args.get(1).and_then(|a| a.to_str()) {
        Some("gvproxy") => gvproxy(&program, strings(2)?),
        Some("lima") => lima(&program, strings(2)?),
        _ => Ok(args),
    }
}

/// Split `-flag=value` / `--flag=value` and take the value of a flag that needs one.
struct Args {
    items: std::vec::IntoIter<String>,
}

impl Args {
    fn next_flag(&mut self) -> Option<(String, Option<String>)> {
        let a = self.items.next()?;
        Some(match a.split_once('=') {
            Some((f, v)) if a.starts_with('-') => (f.to_string(), Some(v.to_string())),
            _ => (a, None),
        })
    }
    fn value(&mut self, flag: &str, inline: Option<String>) -> Result<String, String> {
        inline
            .or_else(|| self.items.next())
            .ok_or_else(|| format!("{flag} needs a value"))
    }
}

fn strip(scheme: &str, v: &str, flag: &str) -> Result<String, String> {
    v.strip_prefix(scheme)
        .map(str::to_string)
        .ok_or_else(|| format!("{flag} {v}: expected {scheme}PATH"))
}

fn gvproxy(program: &OsString, args: Vec<String>) -> Result<Vec<OsString>, String> {
    let mut out: Vec<String> = GVPROXY_PLAN.iter().map(|s| s.to_string()).collect();
    let mut ssh_port: i64 = 2222; // gvproxy's default
    let mut forward_socks = 0;
    let mut a = Args {
        items: args.into_iter(),
    };
    while let Some((flag, inline)) = a.next_flag() {
        let name = flag.trim_start_matches('-');
        match name {
            "listen-qemu" => {
                let v = a.value(&flag, inline)?;
                out.extend(["--listen-qemu".into(), v]);
            }
            "listen-vfkit" => {
                let v = a.value(&flag, inline)?;
                out.extend(["--listen-dgram".into(), strip("unixgram://", &v, &flag)?]);
            }
            "listen" => {
                let v = a.value(&flag, inline)?;
                out.extend(["--api".into(), strip("unix://", &v, &flag)?]);
            }
            "ssh-port" => {
                let v = a.value(&flag, inline)?;
                ssh_port = v.parse().map_err(|_| format!("{flag} {v} is not a port"))?;
            }
            "pid-file" => {
                let v = a.value(&flag, inline)?;
                out.extend(["--pid-file".into(), v]);
            }
            "log-file" => {
                let v = a.value(&flag, inline)?;
                out.extend(["--log-file".into(), v]);
            }
            "mtu" => {
                let v = a.value(&flag, inline)?;
                out.extend(["--mtu".into(), v]);
            }
            "pcap" => {
                let v = a.value(&flag, inline)?;
                out.extend(["--pcap".into(), v]);
            }
            "debug" => {
                if std::env::var_os("RUST_LOG").is_none() {
                    std::env::set_var("RUST_LOG", "debug");
                }
            }
            "forward-sock" | "forward-dest" | "forward-user" | "forward-identity" => {
                let v = a.value(&flag, inline)?;
                if name == "forward-sock" {
                    forward_socks += 1;
                }
                out.extend([format!("--{name}"), v]);
            }
            _ => return Err(format!("gvproxy mode: unknown flag {flag}")),
        }
    }
    if ssh_port > 0 {
        out.extend([
            "-p".into(),
            format!("127.0.0.1:{ssh_port}:192.168.127.2:22"),
        ]);
        // gvproxy reaches the guest's sshd for -forward-sock through its own stack; usernet
        // through the host side of the -ssh-port forward.
        out.extend(["--forward-ssh".into(), format!("127.0.0.1:{ssh_port}")]);
    } else if forward_socks > 0 {
        return Err("gvproxy mode: -forward-sock needs -ssh-port".into());
    }
    Ok(std::iter::once(program.clone())
        .chain(out.into_iter().map(OsString::from))
        .collect())
}

fn lima(program: &OsString, args: Vec<String>) -> Result<Vec<OsString>, String> {
    let mut out: Vec<String> = vec!["--mtu".into(), "1500".into()];
    let mut subnet: Option<ipnet::Ipv4Net> = None;
    let mut a = Args {
        items: args.into_iter(),
    };
    while let Some((flag, inline)) = a.next_flag() {
        match flag.as_str() {
            "-p" | "--pidfile" | "--pid-file" => {
                let v = a.value(&flag, inline)?;
                out.extend(["--pid-file".into(), v]);
            }
            "-e" | "--endpoint" => {
                let v = a.value(&flag, inline)?;
                out.extend(["--api".into(), v]);
            }
            "--listen-qemu" => {
                let v = a.value(&flag, inline)?;
                out.extend(["--listen-qemu".into(), v]);
            }
            "--listen" => {
                let v = a.value(&flag, inline)?;
                out.extend(["--listen-fd".into(), v]);
            }
            "--subnet" => {
                let v = a.value(&flag, inline)?;
                subnet = Some(
                    v.parse()
                        .map_err(|_| format!("{flag} {v} is not a CIDR subnet"))?,
                );
            }
            "--leases" => {
                let v = a.value(&flag, inline)?;
                if !v.is_empty() {
                    out.extend(["--leases".into(), v]);
                }
            }
            "--mtu" => {
                let v = a.value(&flag, inline)?;
                out.extend(["--mtu".into(), v]);
            }
            _ => return Err(format!("lima mode: unknown flag {flag}")),
        }
    }
    // Lima's user-v2 plan: the gateway, the host and DNS all at network+2.
    let subnet = subnet.unwrap_or_else(|| "192.168.104.0/24".parse().unwrap());
    let net = u32::from(subnet.network());
    let plus2 = std::net::Ipv4Addr::from(net + 2).to_string();
    out.extend([
        "--subnet".into(),
        subnet.to_string(),
        "--host-ip".into(),
        plus2.clone(),
        "--dns-ip".into(),
        plus2,
    ]);
    Ok(std::iter::once(program.clone())
        .chain(out.into_iter().map(OsString::from))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Vec<String>, String> {
        translate(args.iter().map(OsString::from).collect())
            .map(|v| v.into_iter().map(|s| s.into_string().unwrap()).collect())
    }

    #[test]
    fn plain_arguments_pass_through() {
        assert_eq!(
            run(&["usernet", "--mtu", "9000"]).unwrap(),
            ["usernet", "--mtu", "9000"]
        );
    }

    #[test]
    fn lima_argv() {
        let out = run(&[
            "usernet",
            "lima",
            "-p",
            "/r/pid",
            "-e",
            "/r/ep.sock",
            "--listen-qemu",
            "/r/q.sock",
            "--listen",
            "/r/fd.sock",
            "--subnet",
            "192.168.104.0/24",
            "--leases",
            "192.168.104.3=52:55:55:00:00:01",
        ])
        .unwrap()
        .join(" ");
        for want in [
            "--pid-file /r/pid",
            "--api /r/ep.sock",
            "--listen-qemu /r/q.sock",
            "--listen-fd /r/fd.sock",
            "--subnet 192.168.104.0/24",
            "--host-ip 192.168.104.2",
            "--dns-ip 192.168.104.2",
            "--leases 192.168.104.3=52:55:55:00:00:01",
            "--mtu 1500",
        ] {
            assert!(out.contains(want), "{want} missing from {out}");
        }
        assert!(run(&["usernet", "lima", "--bogus"])
            .unwrap_err()
            .contains("--bogus"));
    }

    #[test]
    fn gvproxy_argv() {
        let out = run(&[
            "/usr/libexec/podman/gvproxy",
            "-listen-vfkit",
            "unixgram:///r/vf.sock",
            "-listen-qemu",
            "unix:///r/q.sock",
            "-listen",
            "unix:///r/api.sock",
            "-ssh-port",
            "50022",
            "-pid-file",
            "/r/pid",
            "-mtu",
            "1500",
        ])
        .unwrap()
        .join(" ");
        for want in [
            "--listen-dgram /r/vf.sock",
            "--listen-qemu unix:///r/q.sock",
            "--api /r/api.sock",
            "-p 127.0.0.1:50022:192.168.127.2:22",
            "--subnet 192.168.127.0/24",
            "--host-alias 192.168.127.254",
            "--leases 192.168.127.2=5a:94:ef:e4:0c:ee",
        ] {
            assert!(out.contains(want), "{want} missing from {out}");
        }
        let err = run(&["usernet", "gvproxy", "-listen-bess", "unix:///x"]).unwrap_err();
        assert!(err.contains("-listen-bess"), "{err}");
        assert!(run(&["gvproxy", "-listen-vfkit", "/no/scheme"]).is_err());
    }
}
