//! Identity: the certificate authority proxies certify with. A proxy sends its
//! ServiceAccount token and a CSR; the token says who it is, the CSR must name exactly
//! that identity, and the controller signs a short-lived leaf with its issuer.

pub mod ca;
pub mod grpc;
pub mod rotation;
pub mod serving;
pub mod throttle;
pub mod token;

pub use ca::{Ca, CaError, CaFiles};
pub use rotation::{CaHandle, Rotation};
pub use token::{ServiceAccount, TokenError, TokenValidator};

/// The audience projected tokens must carry.
pub const TOKEN_AUDIENCE: &str = "identity.remora.io";

/// The SPIFFE ID of a ServiceAccount.
pub fn spiffe_id(trust_domain: &str, sa: &ServiceAccount) -> String {
    format!("spiffe://{trust_domain}/ns/{}/sa/{}", sa.namespace, sa.name)
}

/// The DNS-form name (TLS server name) of a ServiceAccount.
pub fn server_name(trust_domain: &str, sa: &ServiceAccount) -> String {
    format!(
        "{}.{}.serviceaccount.identity.{trust_domain}",
        sa.name, sa.namespace
    )
}
