//! The gateway's neighbour cache: which MAC a guest IPv4 address lives at, learned from the
//! frames the guests send (ARP and IPv4). It does not send ARP requests itself.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::MacAddr;

/// Entries not refreshed for this long are forgotten.
const MAX_AGE: Duration = Duration::from_secs(300);
/// A bound on the table so a guest spraying source addresses cannot grow it without limit.
const MAX_ENTRIES: usize = 4096;

#[derive(Debug, Default)]
pub(crate) struct Neighbors {
    table: HashMap<Ipv4Addr, (MacAddr, Instant)>,
}

impl Neighbors {
    /// Remember `ip` at `mac`; true when that is news (a new address or a changed MAC).
    pub(crate) fn learn(&mut self, ip: Ipv4Addr, mac: MacAddr, now: Instant) -> bool {
        if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
            return false;
        }
        if self.table.len() >= MAX_ENTRIES && !self.table.contains_key(&ip) {
            self.table
                .retain(|_, (_, seen)| now.duration_since(*seen) < MAX_AGE);
            if self.table.len() >= MAX_ENTRIES {
                return false;
            }
        }
        self.table
            .insert(ip, (mac, now))
            .is_none_or(|(old, _)| old != mac)
    }

    pub(crate) fn lookup(&self, ip: Ipv4Addr, now: Instant) -> Option<MacAddr> {
        self.table
            .get(&ip)
            .filter(|(_, seen)| now.duration_since(*seen) < MAX_AGE)
            .map(|(mac, _)| *mac)
    }
}
