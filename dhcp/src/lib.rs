//! usernet's DHCPv4 server core: lease allocation, RFC 2131 message handling,
//! option encoding and lease persistence, without any I/O.
//!
//! Feed each UDP payload received on port 67 to [`Server::handle`] and send the
//! returned [`Reply`] (from port 67 to port 68) as its [`Destination`] says.
//! Persist [`Server::leases`] with [`store::save`] and pass [`store::load`]'s
//! result to [`Server::new`] on the next start, so guests keep their addresses.
//!
//! Not included: sockets, timers, relay agents (giaddr), client identifiers
//! (leases are keyed by MAC), DHCPv6.
//!
//! ```
//! use std::{net::Ipv4Addr, time::Duration};
//! let config = dhcp::Config {
//!     server_ip: Ipv4Addr::new(192, 168, 5, 2),
//!     subnet: "192.168.5.0/24".parse().unwrap(),
//!     router: Ipv4Addr::new(192, 168, 5, 2),
//!     dns_servers: vec![Ipv4Addr::new(192, 168, 5, 3)],
//!     pool_start: Ipv4Addr::new(192, 168, 5, 15),
//!     pool_end: Ipv4Addr::new(192, 168, 5, 254),
//!     lease_time: Duration::from_secs(3600),
//!     mtu: Some(1500),
//!     search_domains: vec![],
//!     static_leases: dhcp::parse_static_leases("192.168.5.5=52:55:55:aa:bb:cc").unwrap(),
//!     reserved: vec![Ipv4Addr::new(192, 168, 5, 3)],
//! };
//! let mut server = dhcp::Server::new(config, vec![]).unwrap();
//! assert!(server.handle(b"garbage", std::time::SystemTime::now()).is_err());
//! assert_eq!(server.counters().malformed, 1);
//! ```

mod config;
mod lease;
mod mac;
mod packet;
mod reply;
mod server;
pub mod store;

pub use config::{parse_static_leases, Config, ConfigError, ParseError};
pub use lease::Lease;
pub use mac::{MacAddr, MacParseError};
pub use packet::Malformed;
pub use server::{Counters, Destination, DropReason, Reply, Server};
pub use store::StoreError;
