//! The lease table: who has which address, and how a new address is chosen.
//!
//! Tracks bindings (kept after they expire, so a returning client gets its old
//! address back), short-lived offer reservations, declined addresses in
//! quarantine, and the last address of each MAC. All times are unix seconds
//! passed in by the caller; nothing here reads a clock or does I/O, and nothing
//! here knows about DHCP messages (that is [`crate::server`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::config::{is_host, Config};
use crate::mac::MacAddr;

/// How long an OFFER holds its address for the client (seconds).
pub(crate) const OFFER_HOLD_SECS: u64 = 60;
/// How long a DECLINEd address is kept out of the pool (seconds).
pub(crate) const DECLINE_HOLD_SECS: u64 = 3600;

/// One binding of an address to a MAC, as reported by [`crate::Server::leases`] and
/// stored in the lease file.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub ip: Ipv4Addr,
    pub mac: MacAddr,
    /// Expiry time in unix seconds; may be in the past (the MAC still gets the
    /// address back first, unless the pool runs out).
    pub expires: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

#[derive(Debug, Clone)]
struct Binding {
    mac: MacAddr,
    expires: u64,
    hostname: Option<String>,
}

#[derive(Debug, Clone, Copy)]
struct Offer {
    ip: Ipv4Addr,
    until: u64,
}

#[derive(Debug)]
pub(crate) struct LeaseTable {
    subnet: Ipv4Net,
    pool: (u32, u32),
    /// Never handed out: reserved list, server, router, network, broadcast.
    excluded: HashSet<Ipv4Addr>,
    static_by_mac: HashMap<MacAddr, Ipv4Addr>,
    static_by_ip: HashMap<Ipv4Addr, MacAddr>,
    bound: BTreeMap<Ipv4Addr, Binding>,
    by_mac: HashMap<MacAddr, Ipv4Addr>,
    offers: HashMap<MacAddr, Offer>,
    /// The same offers by address.
    offered: HashMap<Ipv4Addr, MacAddr>,
    declined: HashMap<Ipv4Addr, u64>,
    last: HashMap<MacAddr, Ipv4Addr>,
}

/// The most offers held at once: a flood of DISCOVERs from ever new MACs gets no more (the
/// pool counts as exhausted for a MAC without an offer or a binding until some expire).
pub(crate) const MAX_OFFERS: usize = 1024;

impl LeaseTable {
    /// `config` must already be validated.
    pub(crate) fn new(config: &Config) -> Self {
        let subnet = config.subnet.trunc();
        let mut excluded: HashSet<Ipv4Addr> = config.reserved.iter().copied().collect();
        excluded.extend([
            config.server_ip,
            config.router,
            subnet.network(),
            subnet.broadcast(),
        ]);
        LeaseTable {
            subnet,
            pool: (config.pool_start.into(), config.pool_end.into()),
            excluded,
            static_by_mac: config.static_leases.iter().map(|&(i, m)| (m, i)).collect(),
            static_by_ip: config.static_leases.iter().copied().collect(),
            bound: BTreeMap::new(),
            by_mac: HashMap::new(),
            offers: HashMap::new(),
            offered: HashMap::new(),
            declined: HashMap::new(),
            last: HashMap::new(),
        }
    }

    /// Restore saved bindings. Ones that no longer fit the configuration are
    /// dropped with a warning; of two saved leases for the same IP or MAC, the one
    /// expiring later wins.
    pub(crate) fn restore(&mut self, mut saved: Vec<Lease>) {
        saved.sort_by_key(|l| std::cmp::Reverse(l.expires));
        for l in saved {
            let fits = match self.static_by_mac.get(&l.mac) {
                Some(&ip) => ip == l.ip,
                None => self.in_pool(l.ip) && !self.static_by_ip.contains_key(&l.ip),
            };
            if !fits || self.excluded.contains(&l.ip) {
                warn!(ip = %l.ip, mac = %l.mac, "dropping saved lease that does not fit the configuration");
                continue;
            }
            if self.bound.contains_key(&l.ip) || self.by_mac.contains_key(&l.mac) {
                warn!(ip = %l.ip, mac = %l.mac, "dropping conflicting older saved lease");
                continue;
            }
            self.last.insert(l.mac, l.ip);
            self.insert(l.ip, l.mac, l.expires, l.hostname);
        }
    }

    /// Forget offers and declines whose time is up.
    pub(crate) fn expire(&mut self, now: u64) {
        let offered = &mut self.offered;
        self.offers.retain(|mac, o| {
            let keep = o.until > now;
            if !keep && offered.get(&o.ip) == Some(mac) {
                offered.remove(&o.ip);
            }
            keep
        });
        self.declined.retain(|_, until| *until > now);
    }

    fn in_pool(&self, ip: Ipv4Addr) -> bool {
        let n = u32::from(ip);
        self.pool.0 <= n && n <= self.pool.1
    }

    pub(crate) fn in_subnet(&self, ip: Ipv4Addr) -> bool {
        is_host(&self.subnet, ip)
    }

    pub(crate) fn static_for(&self, mac: MacAddr) -> Option<Ipv4Addr> {
        self.static_by_mac.get(&mac).copied()
    }

    pub(crate) fn binding_of(&self, mac: MacAddr) -> Option<Ipv4Addr> {
        self.by_mac.get(&mac).copied()
    }

    pub(crate) fn offer_of(&self, mac: MacAddr) -> Option<Ipv4Addr> {
        self.offers.get(&mac).map(|o| o.ip)
    }

    /// May `ip` be given to `mac` right now? Static addresses are only ever for
    /// their MAC; dynamic ones must be in the pool, not excluded, not in
    /// quarantine, and neither bound (even expired) nor offered to another MAC.
    pub(crate) fn is_free_for(&self, ip: Ipv4Addr, mac: MacAddr) -> bool {
        if let Some(&owner) = self.static_by_ip.get(&ip) {
            return owner == mac;
        }
        self.in_pool(ip)
            && !self.excluded.contains(&ip)
            && !self.declined.contains_key(&ip)
            && self.bound.get(&ip).is_none_or(|b| b.mac == mac)
            && self.offered.get(&ip).is_none_or(|m| *m == mac)
    }

    /// Pick the address to offer `mac` (RFC 2131 4.3.1), reclaiming the
    /// longest-expired binding when the pool is full. `None`: nothing left.
    pub(crate) fn choose(
        &mut self,
        mac: MacAddr,
        requested: Option<Ipv4Addr>,
        now: u64,
    ) -> Option<Ipv4Addr> {
        if let Some(ip) = self.static_for(mac) {
            return Some(ip);
        }
        if self.offers.len() >= MAX_OFFERS
            && !self.offers.contains_key(&mac)
            && self.binding_of(mac).is_none()
        {
            return None;
        }
        let preferred = [
            self.binding_of(mac),
            self.offer_of(mac),
            requested,
            self.last.get(&mac).copied(),
        ];
        if let Some(ip) = preferred
            .into_iter()
            .flatten()
            .find(|&ip| self.is_free_for(ip, mac))
        {
            return Some(ip);
        }
        if let Some(ip) = (self.pool.0..=self.pool.1)
            .map(Ipv4Addr::from)
            .find(|&ip| self.is_free_for(ip, mac))
        {
            return Some(ip);
        }
        // Pool exhausted: take over the binding that expired longest ago.
        let victim = self
            .bound
            .iter()
            .filter(|(ip, b)| {
                b.expires <= now
                    && !self.static_by_ip.contains_key(ip)
                    && !self.declined.contains_key(ip)
                    && !self.offered.contains_key(ip)
            })
            .min_by_key(|(_, b)| b.expires)
            .map(|(ip, _)| *ip)?;
        let old = self.remove(victim);
        if let Some(old) = old {
            tracing::info!(ip = %victim, from = %old.mac, to = %mac, "pool exhausted, reclaiming expired lease");
            if self.last.get(&old.mac) == Some(&victim) {
                self.last.remove(&old.mac);
            }
        }
        Some(victim)
    }

    /// Reserve `ip` for `mac` for a short while (between OFFER and REQUEST).
    pub(crate) fn hold_offer(&mut self, mac: MacAddr, ip: Ipv4Addr, now: u64) {
        self.cancel_offer(mac);
        self.offers.insert(
            mac,
            Offer {
                ip,
                until: now.saturating_add(OFFER_HOLD_SECS),
            },
        );
        self.offered.insert(ip, mac);
    }

    pub(crate) fn cancel_offer(&mut self, mac: MacAddr) {
        if let Some(o) = self.offers.remove(&mac) {
            if self.offered.get(&o.ip) == Some(&mac) {
                self.offered.remove(&o.ip);
            }
        }
    }

    /// Bind `ip` to `mac` until `expires`, replacing any other binding of `mac`.
    /// A `None` hostname keeps the one already recorded.
    pub(crate) fn bind(
        &mut self,
        mac: MacAddr,
        ip: Ipv4Addr,
        expires: u64,
        hostname: Option<String>,
    ) {
        self.cancel_offer(mac);
        let mut hostname = hostname;
        if let Some(old_ip) = self.by_mac.get(&mac).copied() {
            if let Some(old) = self.remove(old_ip) {
                hostname = hostname.or(old.hostname);
            }
        }
        if let Some(other) = self.remove(ip) {
            // Only reachable for an expired binding being reclaimed or a static
            // address; either way the old holder loses it.
            self.last.remove(&other.mac);
        }
        self.remember(mac, ip);
        self.insert(ip, mac, expires, hostname);
    }

    /// `ip` is the address to give `mac` back first, and no other MAC's any more: the map
    /// holds at most one MAC per address, however many MACs come and go.
    fn remember(&mut self, mac: MacAddr, ip: Ipv4Addr) {
        self.last.retain(|m, i| *i != ip || *m == mac);
        self.last.insert(mac, ip);
    }

    /// RELEASE: drop `mac`'s binding of `ip`. The address goes back to the pool
    /// but stays the MAC's preferred one. `false` if there was no such binding.
    pub(crate) fn release(&mut self, mac: MacAddr, ip: Ipv4Addr) -> bool {
        if self.binding_of(mac) != Some(ip) {
            return false;
        }
        self.remove(ip);
        self.last.insert(mac, ip);
        true
    }

    /// DECLINE: `ip` is in use by someone we don't know. Quarantine it (unless it
    /// is static) and drop `mac`'s binding or offer of it. `false` if `ip` was
    /// neither offered nor bound to `mac`.
    pub(crate) fn decline(&mut self, mac: MacAddr, ip: Ipv4Addr, now: u64) -> bool {
        let is_static = self.static_for(mac) == Some(ip);
        if !(is_static || self.binding_of(mac) == Some(ip) || self.offer_of(mac) == Some(ip)) {
            return false;
        }
        if self.binding_of(mac) == Some(ip) {
            self.remove(ip);
        }
        self.cancel_offer(mac);
        if self.last.get(&mac) == Some(&ip) {
            self.last.remove(&mac);
        }
        if !is_static {
            self.declined
                .insert(ip, now.saturating_add(DECLINE_HOLD_SECS));
        }
        true
    }

    /// All bindings, expired ones included, ordered by address.
    pub(crate) fn leases(&self) -> Vec<Lease> {
        self.bound
            .iter()
            .map(|(ip, b)| Lease {
                ip: *ip,
                mac: b.mac,
                expires: b.expires,
                hostname: b.hostname.clone(),
            })
            .collect()
    }

    fn insert(&mut self, ip: Ipv4Addr, mac: MacAddr, expires: u64, hostname: Option<String>) {
        self.by_mac.insert(mac, ip);
        self.bound.insert(
            ip,
            Binding {
                mac,
                expires,
                hostname,
            },
        );
    }

    fn remove(&mut self, ip: Ipv4Addr) -> Option<Binding> {
        let b = self.bound.remove(&ip)?;
        if self.by_mac.get(&b.mac) == Some(&ip) {
            self.by_mac.remove(&b.mac);
        }
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn macs_that_come_and_go_leave_one_preference_per_address() {
        let ip = |n: u8| Ipv4Addr::new(192, 168, 5, n);
        let config = Config {
            server_ip: ip(2),
            subnet: "192.168.5.0/24".parse().unwrap(),
            router: ip(2),
            dns_servers: vec![ip(3)],
            pool_start: ip(15),
            pool_end: ip(20),
            lease_time: Duration::from_secs(3600),
            mtu: None,
            search_domains: vec![],
            static_leases: vec![],
            reserved: vec![ip(3)],
        };
        let mut t = LeaseTable::new(&config);
        // 10,000 MACs each bind an address and release it (a container with a new MAC at
        // every start).
        for i in 0..10_000u32 {
            let mac = MacAddr([0x52, 0x55, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
            let got = t.choose(mac, None, 0).expect("an address");
            t.bind(mac, got, 3600, None);
            assert!(t.release(mac, got));
        }
        assert!(
            t.last.len() <= 6,
            "{} preferences kept for a pool of 6",
            t.last.len()
        );
        // The last MAC still gets its address back first.
        let mac = MacAddr([0x52, 0x55, 0, 0, 0x27, 0x0f]);
        let back = t.last[&mac];
        assert_eq!(t.choose(mac, None, 0), Some(back));
    }
}
