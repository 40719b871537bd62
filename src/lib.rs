//! usernet: a user-mode virtual network for VMs and containers. This library is the daemon's
//! wiring: the network plan and its config sources, the frame transports, the L2 switch and the
//! gateway port that connects them to `netstack` and `dhcp`. `main.rs` only parses and calls.

pub mod api;
pub mod cli;
pub mod compat;
pub mod config;
pub mod control;
pub mod daemon;
pub mod forward;
pub mod gateway;
pub mod pcap;
pub mod plan;
pub mod sshforward;
pub mod stats;
pub mod switch;
pub mod transport;
