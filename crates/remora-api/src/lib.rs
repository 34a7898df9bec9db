//! The one contract between `remora-proxy` and `remora-controller`: message types and
//! tonic clients/servers generated from `proto/remora/v1/*.proto`.

/// Version 1 of the Remora control-plane API.
pub mod v1 {
    #![allow(clippy::all, missing_docs, rust_2018_idioms, unreachable_pub)]
    tonic::include_proto!("remora.v1");
}
