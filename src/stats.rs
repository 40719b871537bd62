//! The daemon's counters as one JSON document: switch, gateway, DHCP and NAT (per protocol).
//! Read by SIGUSR1 today and by the HTTP API's `/stats`.

use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use crate::gateway::GatewayProbe;
use crate::switch::Switch;

/// Everything counted so far.
pub async fn collect(switch: &Switch, gw: &GatewayProbe) -> Value {
    let c = switch.counters();
    let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let nat = gw.nat().stats();
    let local = gw.stats().await;
    json!({
        "switch": {
            "frames_in": g(&c.frames_in),
            "frames_out": g(&c.frames_out),
            "bytes_in": g(&c.bytes_in),
            "bytes_out": g(&c.bytes_out),
            "pcap_dropped": switch.capture_dropped(),
            "drop_runt": g(&c.drop_runt),
            "drop_oversize": g(&c.drop_oversize),
            "large_frames": g(&c.large_frames),
            "large_frames_cut": g(&c.large_frames_cut),
            "drop_unknown_unicast": g(&c.drop_unknown_unicast),
            "drop_bad_source": g(&c.drop_bad_source),
            "macs_not_learned": g(&c.macs_not_learned),
            "drop_queue_full": g(&c.drop_queue_full),
            "drop_framing": g(&c.drop_framing),
            "ports_attached": g(&c.ports_attached),
            "ports_detached": g(&c.ports_detached),
        },
        "gateway": local.as_ref().map(|l| json!(l.gateway)),
        "fragments": local.as_ref().map(|l| json!(l.fragments)),
        "dhcp": local.as_ref().map(|l| json!(l.dhcp)),
        "tcp": nat.tcp,
        "udp": nat.udp,
        "icmp": nat.icmp,
        "dns": gw.dns().map(|d| json!(d.counters())),
    })
}
