//! The gateway side of usernet's virtual network: everything between an Ethernet frame from a
//! guest and the services and sockets behind the gateway.
//!
//! This crate is sans-IO: [`Gateway::receive`] takes one frame and the current time and reports
//! what to do ([`Output`]): frames to send back to the switch, datagrams for local services
//! (DHCP, DNS). It owns no sockets, threads or timers; `usernet` (the daemon) wires it up.
//!
//! Wire formats are parsed with smoltcp's checked wire types: a frame is parsed once, here, and
//! everything malformed is dropped and counted in [`Counters`], never panicked on.

mod arp;
mod counters;
mod frame;
mod gateway;
mod icmp;
pub mod ipv4frag;
pub mod nat;
mod neighbor;
pub mod offload;

pub use counters::Counters;
pub use frame::{build_udp_frame, L2Dest};
pub use gateway::{Gateway, GatewayConfig, Output, Routed, UdpDatagram};

/// An Ethernet MAC address as six bytes.
pub type MacAddr = [u8; 6];

/// The broadcast MAC address.
pub const BROADCAST_MAC: MacAddr = [0xff; 6];
