//! The proxy's one crypto provider, below every module that does TLS or checks a
//! certificate (`tls`, `control`, `identity`).

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// aws-lc-rs, whose key exchanges put the post-quantum hybrid X25519MLKEM768 first
/// (rustls' `prefer-post-quantum`), then X25519, P-256 and P-384 for peers without it.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}
