//! The DHCP server state machine (RFC 2131): one client message in, at most one
//! reply out.
//!
//! Sans-IO: the caller receives UDP payloads on port 67, passes them to
//! [`Server::handle`] with the current wall-clock time, and sends any [`Reply`]
//! from port 67 to port 68 as its [`Destination`] says. No sockets, threads,
//! timers or persistence here; save [`Server::leases`] with [`crate::store`]
//! when it matters. Relayed messages (giaddr set) are not supported.

use std::net::Ipv4Addr;
use std::time::{SystemTime, UNIX_EPOCH};

use dhcproto::Name;
use serde::Serialize;
use thiserror::Error;
use tracing::{debug, info};

use crate::config::{Config, ConfigError};
use crate::lease::{Lease, LeaseTable};
use crate::mac::MacAddr;
use crate::packet::{self, ClientMessage, Malformed, ParseFailure, Request};
use crate::reply::{self, Kind};

/// A DHCPv4 server for one subnet.
#[derive(Debug)]
pub struct Server {
    config: Config,
    search: Vec<Name>,
    table: LeaseTable,
    counters: Counters,
}

/// A reply to send from UDP port 67 to port 68.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The UDP payload.
    pub payload: Vec<u8>,
    pub to: Destination,
}

/// Where a reply goes (RFC 2131 section 4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// To 255.255.255.255 at ff:ff:ff:ff:ff:ff.
    Broadcast,
    /// To `ip` at `mac`, without ARP: the client may not have the address yet.
    Unicast { ip: Ipv4Addr, mac: MacAddr },
}

/// Message counts since the server was created.
///
/// Every call to [`Server::handle`] increments `received` and then exactly one of:
/// `offers`, `acks`, `naks`, `informs` (a reply was sent), `declines`, `releases`
/// (accepted, no reply), `malformed` ([`DropReason::Malformed`] and
/// [`DropReason::MissingMessageType`]), `exhausted` ([`DropReason::PoolExhausted`]),
/// or `ignored` (every other [`DropReason`]).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub received: u64,
    pub offers: u64,
    pub acks: u64,
    pub naks: u64,
    pub informs: u64,
    pub declines: u64,
    pub releases: u64,
    pub malformed: u64,
    pub exhausted: u64,
    pub ignored: u64,
}

/// Why a message got no reply. `Ok(None)` from [`Server::handle`] means the
/// message was accepted and needs none (DECLINE, RELEASE).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DropReason {
    #[error("malformed packet: {0}")]
    Malformed(#[from] Malformed),
    #[error("not a client request (BOOTREPLY or server message type)")]
    NotRequest,
    #[error("unsupported hardware type {htype} / length {hlen} (only Ethernet)")]
    UnsupportedHardware { htype: u8, hlen: u8 },
    #[error("no DHCP message type option")]
    MissingMessageType,
    #[error("unsupported DHCP message type {0}")]
    UnsupportedMessageType(u8),
    #[error("relayed message (giaddr {0}); relays are not supported")]
    Relayed(Ipv4Addr),
    #[error("message is for server {0}, not us")]
    NotForUs(Ipv4Addr),
    #[error("invalid {0}: required fields missing")]
    InvalidRequest(&'static str),
    #[error("no address left to offer {0}")]
    PoolExhausted(MacAddr),
    #[error("{mac} has no lease on {ip}")]
    UnknownLease { mac: MacAddr, ip: Ipv4Addr },
    #[error("could not encode reply: {0}")]
    Encode(String),
}

impl From<ParseFailure> for DropReason {
    fn from(f: ParseFailure) -> Self {
        match f {
            ParseFailure::Malformed(m) => DropReason::Malformed(m),
            ParseFailure::NotRequest => DropReason::NotRequest,
            ParseFailure::UnsupportedHardware { htype, hlen } => {
                DropReason::UnsupportedHardware { htype, hlen }
            }
            ParseFailure::MissingMessageType => DropReason::MissingMessageType,
            ParseFailure::UnsupportedMessageType(t) => DropReason::UnsupportedMessageType(t),
        }
    }
}

/// What handling a message led to, before counting.
enum Outcome {
    Offer(Reply),
    Ack(Reply),
    Nak(Reply),
    Inform(Reply),
    Declined,
    Released,
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Server {
    /// Validate `config` and restore `saved` bindings (from [`crate::store::load`]).
    /// Saved leases that no longer fit the configuration are dropped, not an error.
    pub fn new(config: Config, saved: Vec<Lease>) -> Result<Server, ConfigError> {
        let search = config.validate()?;
        let mut table = LeaseTable::new(&config);
        table.restore(saved);
        Ok(Server {
            config,
            search,
            table,
            counters: Counters::default(),
        })
    }

    /// Handle one DHCP message (the UDP payload received on port 67). `now` is
    /// wall-clock time; lease expiry is stored as unix seconds.
    pub fn handle(&mut self, payload: &[u8], now: SystemTime) -> Result<Option<Reply>, DropReason> {
        self.counters.received += 1;
        let result = self.handle_inner(payload, unix_secs(now));
        let c = &mut self.counters;
        match result {
            Ok(outcome) => Ok(match outcome {
                Outcome::Offer(r) => {
                    c.offers += 1;
                    Some(r)
                }
                Outcome::Ack(r) => {
                    c.acks += 1;
                    Some(r)
                }
                Outcome::Nak(r) => {
                    c.naks += 1;
                    Some(r)
                }
                Outcome::Inform(r) => {
                    c.informs += 1;
                    Some(r)
                }
                Outcome::Declined => {
                    c.declines += 1;
                    None
                }
                Outcome::Released => {
                    c.releases += 1;
                    None
                }
            }),
            Err(reason) => {
                match reason {
                    DropReason::Malformed(_) | DropReason::MissingMessageType => c.malformed += 1,
                    DropReason::PoolExhausted(_) => c.exhausted += 1,
                    _ => c.ignored += 1,
                }
                debug!(%reason, "dropped DHCP message");
                Err(reason)
            }
        }
    }

    /// All bindings ordered by address, including expired ones a client may still
    /// come back for (check [`Lease::expires`]). This is what to persist.
    pub fn leases(&self) -> Vec<Lease> {
        self.table.leases()
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    fn handle_inner(&mut self, payload: &[u8], now: u64) -> Result<Outcome, DropReason> {
        let req = packet::parse(payload)?;
        if !req.giaddr.is_unspecified() {
            return Err(DropReason::Relayed(req.giaddr));
        }
        self.table.expire(now);
        debug!(kind = ?req.kind, mac = %req.chaddr, xid = req.xid, "DHCP message");
        match req.kind {
            ClientMessage::Discover => self.discover(&req, now),
            ClientMessage::Request => self.request(&req, now),
            ClientMessage::Decline => self.decline(&req, now),
            ClientMessage::Release => self.release(&req),
            ClientMessage::Inform => self.inform(&req),
        }
    }

    fn check_server_id(&self, req: &Request) -> Result<(), DropReason> {
        match req.server_id {
            Some(id) if id != self.config.server_ip => Err(DropReason::NotForUs(id)),
            _ => Ok(()),
        }
    }

    fn discover(&mut self, req: &Request, now: u64) -> Result<Outcome, DropReason> {
        let mac = req.chaddr;
        let ip = self
            .table
            .choose(mac, req.requested_ip, now)
            .ok_or(DropReason::PoolExhausted(mac))?;
        self.table.hold_offer(mac, ip, now);
        debug!(%mac, %ip, "offer");
        let kind = Kind::Lease {
            ack: false,
            yiaddr: ip,
        };
        Ok(Outcome::Offer(self.reply(req, kind)?))
    }

    fn request(&mut self, req: &Request, now: u64) -> Result<Outcome, DropReason> {
        let mac = req.chaddr;
        let t = &self.table;
        let ok = if let Some(id) = req.server_id {
            // SELECTING: the client picked a server among the offers.
            if id != self.config.server_ip {
                self.table.cancel_offer(mac);
                return Err(DropReason::NotForUs(id));
            }
            let ip = req
                .requested_ip
                .or((!req.ciaddr.is_unspecified()).then_some(req.ciaddr))
                .ok_or(DropReason::InvalidRequest("REQUEST (no requested address)"))?;
            let ours = t.static_for(mac) == Some(ip)
                || t.offer_of(mac) == Some(ip)
                || t.binding_of(mac) == Some(ip);
            (ours && t.is_free_for(ip, mac)).then_some(ip)
        } else if !req.ciaddr.is_unspecified() {
            // RENEWING / REBINDING: the client already uses ciaddr.
            let ip = req.ciaddr;
            let ours = t.static_for(mac) == Some(ip) || t.binding_of(mac) == Some(ip);
            ours.then_some(ip)
        } else if let Some(ip) = req.requested_ip {
            // INIT-REBOOT: the client wants to keep an address it remembers.
            let ok = t.in_subnet(ip)
                && match t.static_for(mac) {
                    Some(s) => s == ip,
                    None => t.is_free_for(ip, mac),
                };
            ok.then_some(ip)
        } else {
            return Err(DropReason::InvalidRequest(
                "REQUEST (no server id, requested address or ciaddr)",
            ));
        };

        let Some(ip) = ok else {
            self.table.cancel_offer(mac);
            info!(%mac, requested = ?req.requested_ip, ciaddr = %req.ciaddr, "NAK");
            return Ok(Outcome::Nak(self.reply(req, Kind::Nak)?));
        };
        let expires = now.saturating_add(self.config.lease_time.as_secs());
        if self.table.binding_of(mac) != Some(ip) {
            info!(%mac, %ip, hostname = ?req.hostname, "new lease");
        }
        self.table.bind(mac, ip, expires, req.hostname.clone());
        let kind = Kind::Lease {
            ack: true,
            yiaddr: ip,
        };
        Ok(Outcome::Ack(self.reply(req, kind)?))
    }

    fn decline(&mut self, req: &Request, now: u64) -> Result<Outcome, DropReason> {
        self.check_server_id(req)?;
        let ip = req
            .requested_ip
            .ok_or(DropReason::InvalidRequest("DECLINE (no requested address)"))?;
        if !self.table.decline(req.chaddr, ip, now) {
            return Err(DropReason::UnknownLease {
                mac: req.chaddr,
                ip,
            });
        }
        info!(mac = %req.chaddr, %ip, "address declined, quarantined");
        Ok(Outcome::Declined)
    }

    fn release(&mut self, req: &Request) -> Result<Outcome, DropReason> {
        self.check_server_id(req)?;
        let ip = req.ciaddr;
        if ip.is_unspecified() {
            return Err(DropReason::InvalidRequest("RELEASE (no ciaddr)"));
        }
        if !self.table.release(req.chaddr, ip) {
            return Err(DropReason::UnknownLease {
                mac: req.chaddr,
                ip,
            });
        }
        info!(mac = %req.chaddr, %ip, "lease released");
        Ok(Outcome::Released)
    }

    fn inform(&mut self, req: &Request) -> Result<Outcome, DropReason> {
        if req.ciaddr.is_unspecified() {
            return Err(DropReason::InvalidRequest("INFORM (no ciaddr)"));
        }
        Ok(Outcome::Inform(self.reply(req, Kind::InformAck)?))
    }

    fn reply(&self, req: &Request, kind: Kind) -> Result<Reply, DropReason> {
        let payload = reply::build(&self.config, &self.search, req, kind)
            .map_err(|e| DropReason::Encode(e.to_string()))?;
        let to = match kind {
            Kind::Nak => Destination::Broadcast,
            _ if !req.ciaddr.is_unspecified() => Destination::Unicast {
                ip: req.ciaddr,
                mac: req.chaddr,
            },
            _ if req.broadcast_flag() => Destination::Broadcast,
            Kind::Lease { yiaddr, .. } => Destination::Unicast {
                ip: yiaddr,
                mac: req.chaddr,
            },
            // INFORM always has ciaddr (checked above).
            Kind::InformAck => Destination::Broadcast,
        };
        Ok(Reply { payload, to })
    }
}
