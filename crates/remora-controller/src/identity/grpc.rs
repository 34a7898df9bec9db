//! `Identity.Certify` over gRPC: each client address is throttled, and every call is
//! counted by how it ended.

use std::{sync::Arc, time::UNIX_EPOCH};

use remora_api::v1 as api;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::{
    CaHandle, TokenError, TokenValidator,
    ca::{Certified, CertifyError},
    spiffe_id,
    throttle::Throttle,
};
use crate::{
    access::Caller,
    metrics::{CertifyResult, Metrics},
};

#[derive(Clone)]
pub struct IdentityService {
    ca: Option<CaHandle>,
    tokens: Option<Arc<dyn TokenValidator>>,
    trust_domain: String,
    throttle: Arc<Throttle>,
    metrics: Metrics,
}

impl IdentityService {
    /// Without a CA every request is answered UNAVAILABLE with what to configure.
    pub fn new(
        ca: Option<CaHandle>,
        tokens: Option<Arc<dyn TokenValidator>>,
        trust_domain: String,
        metrics: Metrics,
    ) -> Self {
        Self {
            ca,
            tokens,
            trust_domain,
            throttle: Arc::default(),
            metrics,
        }
    }

    /// Counts how a call ended, and passes its answer on.
    fn counted<T>(&self, result: CertifyResult, answer: T) -> T {
        self.metrics.certified(result);
        answer
    }
}

#[tonic::async_trait]
impl api::identity_server::Identity for IdentityService {
    async fn certify(
        &self,
        req: Request<api::CertifyRequest>,
    ) -> Result<Response<api::CertifyResponse>, Status> {
        let (Some(ca), Some(tokens)) = (&self.ca, &self.tokens) else {
            return self.counted(
                CertifyResult::Unavailable,
                Err(Status::unavailable(
                    "identity is not configured on this controller: start it with --dev-ca DIR \
                     or --issuer-cert/--issuer-key/--trust-anchors",
                )),
            );
        };
        let addr = req.extensions().get::<Caller>().and_then(|c| c.addr);
        if let Some(addr) = addr
            && let Err(wait) = self.throttle.admit(addr.ip())
        {
            warn!(%addr, "Certify asked too often: refused");
            return self.counted(
                CertifyResult::RateLimited,
                Err(Status::resource_exhausted(format!(
                    "too many Certify requests from {}: retry in {} ms",
                    addr.ip(),
                    wait.as_millis().max(1)
                ))),
            );
        }
        let req = req.into_inner();
        let sa = match tokens.validate(&req.token).await {
            Ok(sa) => sa,
            Err(TokenError::Unavailable(why)) => {
                return self.counted(
                    CertifyResult::Unavailable,
                    Err(Status::unavailable(format!(
                        "cannot check the token now: {why}"
                    ))),
                );
            }
            Err(other) => {
                info!(?addr, error = %other, "Certify refused: bad token");
                return self.counted(
                    CertifyResult::BadToken,
                    Err(Status::unauthenticated(other.to_string())),
                );
            }
        };
        let entitled = spiffe_id(&self.trust_domain, &sa);
        if req.identity != entitled {
            warn!(asked = %req.identity, %entitled, "refusing a certificate for another identity");
            return self.counted(
                CertifyResult::WrongIdentity,
                Err(Status::permission_denied(format!(
                    "the token is for {entitled}; it cannot certify {}",
                    req.identity
                ))),
            );
        }
        let out = match ca.current().certify(&sa, &req.certificate_signing_request) {
            Ok(out) => out,
            Err(e @ CertifyError::Sign(_)) => {
                return self.counted(
                    CertifyResult::Unavailable,
                    Err(Status::internal(e.to_string())),
                );
            }
            Err(e) => {
                return self.counted(
                    CertifyResult::BadCsr,
                    Err(Status::invalid_argument(e.to_string())),
                );
            }
        };
        self.metrics.certified(CertifyResult::Issued);
        info!(identity = %entitled, "certified");
        Ok(Response::new(out.into()))
    }
}

impl From<Certified> for api::CertifyResponse {
    fn from(out: Certified) -> Self {
        let until = out.not_after.duration_since(UNIX_EPOCH).unwrap_or_default();
        Self {
            leaf_certificate: out.leaf_der,
            intermediate_certificates: out.chain_der,
            valid_until: Some(prost_types::Timestamp {
                seconds: until.as_secs() as i64,
                nanos: until.subsec_nanos() as i32,
            }),
            trust_anchors: out.anchors_der,
        }
    }
}
