//! `remora-proxy`: the sidecar that carries a meshed pod's intercepted TCP traffic.
//!
//! Outbound connections (redirected by iptables OUTPUT to 127.0.0.1:4140) and inbound
//! ones (redirected by PREROUTING to :4143) are accepted, their original destination is
//! read from the NAT table, their protocol is detected, and they are forwarded: HTTP per
//! request with hyper, everything else as a byte stream. [`App`] is the whole proxy;
//! `main.rs` only reads the configuration and calls it.

pub mod accept;
pub mod access_log;
pub mod addr;
pub mod app;
pub mod await_ready;
pub mod config;
pub mod connect;
pub mod control;
pub mod crypto;
pub mod debug;
pub mod detect;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod io;
pub mod metrics;
pub mod outbound;
pub mod reconnect;
pub mod rng;
pub mod tcp;
pub mod tls;

pub use app::{App, BuildError};
pub use config::Config;
