//! Who a token belongs to: `static:FILE` for tests and clusters-in-a-folder, `kube`
//! (TokenReview with the identity audience) in Kubernetes.

use std::{collections::HashMap, future::Future, path::Path, pin::Pin};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::{Api, Client, api::PostParams};
use serde::Deserialize;

use super::TOKEN_AUDIENCE;

/// A Kubernetes ServiceAccount.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the token is not valid")]
    Invalid,
    #[error("the token is not a ServiceAccount's (user {0})")]
    NotAServiceAccount(String),
    #[error("cannot check the token: {0}")]
    Unavailable(String),
}

type TokenFuture<'a> =
    Pin<Box<dyn Future<Output = Result<ServiceAccount, TokenError>> + Send + 'a>>;

pub trait TokenValidator: Send + Sync {
    fn validate<'a>(&'a self, token: &'a str) -> TokenFuture<'a>;
}

/// Tokens listed in a file: `[{token, namespace, serviceAccount}, …]` (YAML or JSON).
#[derive(Debug)]
pub struct StaticTokens(HashMap<String, ServiceAccount>);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Entry {
    token: String,
    namespace: String,
    service_account: String,
}

impl StaticTokens {
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let entries: Vec<Entry> = serde_yaml_ng::from_str(text)
            .map_err(|e| format!("expected a list of {{token, namespace, serviceAccount}}: {e}"))?;
        Ok(Self(
            entries
                .into_iter()
                .map(|e| {
                    (
                        e.token,
                        ServiceAccount {
                            namespace: e.namespace,
                            name: e.service_account,
                        },
                    )
                })
                .collect(),
        ))
    }
}

impl TokenValidator for StaticTokens {
    fn validate<'a>(&'a self, token: &'a str) -> TokenFuture<'a> {
        Box::pin(async move { self.0.get(token).cloned().ok_or(TokenError::Invalid) })
    }
}

/// TokenReview against the API server, requiring the identity audience.
pub struct KubeTokens(Client);

impl KubeTokens {
    pub fn new(client: Client) -> Self {
        Self(client)
    }
}

impl TokenValidator for KubeTokens {
    fn validate<'a>(&'a self, token: &'a str) -> TokenFuture<'a> {
        Box::pin(async move {
            let api: Api<TokenReview> = Api::all(self.0.clone());
            let review = TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token.to_string()),
                    audiences: Some(vec![TOKEN_AUDIENCE.into()]),
                },
                ..Default::default()
            };
            let done = api
                .create(&PostParams::default(), &review)
                .await
                .map_err(|e| TokenError::Unavailable(e.to_string()))?;
            let status = done.status.unwrap_or_default();
            if status.authenticated != Some(true) {
                return Err(TokenError::Invalid);
            }
            if let Some(aud) = &status.audiences
                && !aud.iter().any(|a| a == TOKEN_AUDIENCE)
            {
                return Err(TokenError::Invalid);
            }
            let user = status.user.and_then(|u| u.username).unwrap_or_default();
            parse_service_account_user(&user).ok_or(TokenError::NotAServiceAccount(user))
        })
    }
}

/// `system:serviceaccount:<ns>:<name>`.
pub fn parse_service_account_user(user: &str) -> Option<ServiceAccount> {
    let rest = user.strip_prefix("system:serviceaccount:")?;
    let (ns, name) = rest.split_once(':')?;
    (!ns.is_empty() && !name.is_empty() && !name.contains(':')).then(|| ServiceAccount {
        namespace: ns.into(),
        name: name.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn static_tokens() {
        let t =
            StaticTokens::parse("- {token: abc, namespace: shop, serviceAccount: web}\n").unwrap();
        assert_eq!(
            t.validate("abc").await.unwrap(),
            ServiceAccount {
                namespace: "shop".into(),
                name: "web".into()
            }
        );
        assert!(matches!(t.validate("nope").await, Err(TokenError::Invalid)));
        assert!(
            StaticTokens::parse("{token: x}")
                .unwrap_err()
                .contains("expected a list")
        );
    }

    #[test]
    fn service_account_users() {
        assert_eq!(
            parse_service_account_user("system:serviceaccount:shop:web"),
            Some(ServiceAccount {
                namespace: "shop".into(),
                name: "web".into()
            })
        );
        for bad in [
            "alice",
            "system:serviceaccount:shop",
            "system:serviceaccount::web",
            "system:serviceaccount:a:b:c",
        ] {
            assert_eq!(parse_service_account_user(bad), None, "{bad}");
        }
    }
}
