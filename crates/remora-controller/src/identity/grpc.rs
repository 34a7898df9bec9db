//! `Identity.Certify` over gRPC.

use std::{sync::Arc, time::UNIX_EPOCH};

use remora_api::v1 as api;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::{Ca, TokenError, TokenValidator, ca::CertifyError, spiffe_id};

#[derive(Clone)]
pub struct IdentityService {
    ca: Option<Arc<Ca>>,
    tokens: Option<Arc<dyn TokenValidator>>,
    trust_domain: String,
}

impl IdentityService {
    /// Without a CA every request is answered UNAVAILABLE with what to configure.
    pub fn new(
        ca: Option<Arc<Ca>>,
        tokens: Option<Arc<dyn TokenValidator>>,
        trust_domain: String,
    ) -> Self {
        Self {
            ca,
            tokens,
            trust_domain,
        }
    }
}

#[tonic::async_trait]
impl api::identity_server::Identity for IdentityService {
    async fn certify(
        &self,
        req: Request<api::CertifyRequest>,
    ) -> Result<Response<api::CertifyResponse>, Status> {
        let (Some(ca), Some(tokens)) = (&self.ca, &self.tokens) else {
            return Err(Status::unavailable(
                "identity is not configured on this controller: start it with --dev-ca DIR or \
                 --issuer-cert/--issuer-key/--trust-anchors",
            ));
        };
        let req = req.into_inner();
        let sa = tokens.validate(&req.token).await.map_err(|e| match e {
            TokenError::Unavailable(why) => {
                Status::unavailable(format!("cannot check the token now: {why}"))
            }
            other => Status::unauthenticated(other.to_string()),
        })?;
        let entitled = spiffe_id(&self.trust_domain, &sa);
        if req.identity != entitled {
            warn!(asked = %req.identity, %entitled, "refusing a certificate for another identity");
            return Err(Status::permission_denied(format!(
                "the token is for {entitled}; it cannot certify {}",
                req.identity
            )));
        }
        let out = ca
            .certify(&sa, &req.certificate_signing_request)
            .map_err(|e| match e {
                CertifyError::Sign(_) => Status::internal(e.to_string()),
                _ => Status::invalid_argument(e.to_string()),
            })?;
        info!(identity = %entitled, "certified");
        let until = out.not_after.duration_since(UNIX_EPOCH).unwrap_or_default();
        Ok(Response::new(api::CertifyResponse {
            leaf_certificate: out.leaf_der,
            intermediate_certificates: out.chain_der,
            valid_until: Some(prost_types::Timestamp {
                seconds: until.as_secs() as i64,
                nanos: until.subsec_nanos() as i32,
            }),
        }))
    }
}
