//! The `remora` command's library: what its subcommands do, testable without a
//! terminal.

pub mod check;
pub mod diagnose;
pub mod inject;
pub mod stat;
