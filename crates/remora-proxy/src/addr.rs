//! Address newtypes, so a client's address is never passed where a destination is meant.

use std::{fmt, net::SocketAddr};

/// Where the client meant to connect, before iptables redirected it to the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OrigDst(pub SocketAddr);

/// The address a connection came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub SocketAddr);

impl fmt::Display for OrigDst {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
