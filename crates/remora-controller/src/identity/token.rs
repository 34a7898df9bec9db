//! Who a token belongs to: `static:FILE` for tests and clusters-in-a-folder, `kube`
//! (TokenReview with the identity audience) in Kubernetes.

use std::{collections::HashMap, future::Future, path::Path, pin::Pin, sync::Arc, time::Duration};

use parking_lot::Mutex;
use tokio::time::Instant;

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

#[derive(Debug, Clone, thiserror::Error)]
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

/// How long a TokenReview answer is reused at most: a token whose pod was deleted
/// stops certifying within this long, and a client repeating one token costs the API
/// server one review per this long.
pub const CACHE_TTL: Duration = Duration::from_secs(60);
/// Tokens remembered at most (each is a few hundred bytes).
const CACHE_MAX: usize = 10_000;

/// Remembers another validator's answers for a token until it expires, at most
/// [`CACHE_TTL`]; an answer that could not be had (the API server unreachable) is never
/// remembered.
pub struct CachedTokens {
    inner: Arc<dyn TokenValidator>,
    /// Token → the answer, and until when it may be reused.
    cache: Mutex<HashMap<String, (Answer, Instant)>>,
}

type Answer = Result<ServiceAccount, TokenError>;

impl CachedTokens {
    pub fn new(inner: Arc<dyn TokenValidator>) -> Self {
        Self {
            inner,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn remember(&self, token: &str, answer: &Answer) {
        if matches!(answer, Err(TokenError::Unavailable(_))) {
            return;
        }
        let now = Instant::now();
        let ttl = match (answer, expires_in(token)) {
            (Ok(_), Some(left)) => left.min(CACHE_TTL),
            _ => CACHE_TTL,
        };
        let mut cache = self.cache.lock();
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, (_, until)| *until > now);
            if cache.len() >= CACHE_MAX {
                return;
            }
        }
        cache.insert(token.to_string(), (answer.clone(), now + ttl));
    }
}

impl TokenValidator for CachedTokens {
    fn validate<'a>(&'a self, token: &'a str) -> TokenFuture<'a> {
        Box::pin(async move {
            if let Some((answer, until)) = self.cache.lock().get(token)
                && *until > Instant::now()
            {
                return answer.clone();
            }
            let answer = self.inner.validate(token).await;
            self.remember(token, &answer);
            answer
        })
    }
}

/// How long until a JWT's `exp`, read without checking its signature (the answer it
/// bounds comes from a review that did check it). None when it cannot be read.
fn expires_in(token: &str) -> Option<Duration> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let exp = serde_json::from_slice::<serde_json::Value>(&json)
        .ok()?
        .get("exp")?
        .as_u64()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    Some(Duration::from_secs(exp.saturating_sub(now)))
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

    /// Counts the reviews it is asked for; `bad` tokens are refused, `down` ones
    /// cannot be checked.
    #[derive(Default)]
    struct Counting(std::sync::atomic::AtomicUsize);

    impl TokenValidator for Counting {
        fn validate<'a>(&'a self, token: &'a str) -> TokenFuture<'a> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async move {
                match token {
                    "down" => Err(TokenError::Unavailable("no API server".into())),
                    t if t.starts_with("bad") => Err(TokenError::Invalid),
                    _ => Ok(ServiceAccount {
                        namespace: "shop".into(),
                        name: "web".into(),
                    }),
                }
            })
        }
    }

    fn jwt_expiring_in(secs: u64) -> String {
        use base64::Engine;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let b64 = |s: String| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!(
            "{}.{}.sig",
            b64(r#"{"alg":"RS256"}"#.into()),
            b64(format!(r#"{{"exp":{}}}"#, now + secs))
        )
    }

    /// Issue 11: one TokenReview per Certify attempt, however often a token repeated.
    #[tokio::test(start_paused = true)]
    async fn reviews_are_reused_until_the_token_expires_at_most_a_minute() {
        let inner = Arc::new(Counting::default());
        let cached = CachedTokens::new(inner.clone());
        let reviews = || inner.0.load(std::sync::atomic::Ordering::SeqCst);
        for _ in 0..50 {
            assert!(cached.validate("good").await.is_ok());
            assert!(matches!(
                cached.validate("bad").await,
                Err(TokenError::Invalid)
            ));
        }
        assert_eq!(reviews(), 2, "one review each");
        // An unreachable API server is asked again every time.
        for _ in 0..3 {
            assert!(cached.validate("down").await.is_err());
        }
        assert_eq!(reviews(), 5);
        tokio::time::advance(CACHE_TTL + Duration::from_secs(1)).await;
        assert!(cached.validate("good").await.is_ok());
        assert_eq!(reviews(), 6, "reviewed again after the TTL");
        // A token expiring in 5 s is not trusted past then.
        let short = jwt_expiring_in(5);
        assert!(cached.validate(&short).await.is_ok());
        assert!(cached.validate(&short).await.is_ok());
        assert_eq!(reviews(), 7);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(cached.validate(&short).await.is_ok());
        assert_eq!(reviews(), 8, "reviewed again once expired");
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
