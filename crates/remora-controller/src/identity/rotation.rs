//! Rotating the trust anchors and the issuer without a restart. The controller re-reads
//! its issuer files every few seconds; a good, changed set is used at once for the trust
//! anchors, which every proxy receives with its next certificate
//! (`CertifyResponse.trust_anchors`). A new issuer signs only once a root it chains to
//! has been handed out for one certificate lifetime: by then every proxy still serving
//! has renewed and trusts that root, so no peer refuses what the new issuer signs.
//! Until then the issuer in use goes on signing. The whole procedure, and what the
//! operator waits for, is in docs/identity.md.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use parking_lot::Mutex;
use remora_k8s::pki::Cert;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::ca::{Ca, CaError, CaFiles};
use crate::metrics::{IssuerReload, Metrics};

/// The CA in use, followed as it rotates.
#[derive(Debug, Clone)]
pub struct CaHandle(watch::Receiver<Arc<Ca>>);

impl CaHandle {
    pub fn current(&self) -> Arc<Ca> {
        self.0.borrow().clone()
    }

    /// Waits for the next rotation; never returns for a CA that cannot rotate.
    pub async fn changed(&mut self) {
        if self.0.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Which issuer signs, given the one in use and the files'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// The files' issuer (with the files' anchors).
    Files,
    /// The issuer in use, with the files' anchors, until `until`: the new issuer's root
    /// has not yet reached every proxy.
    Hold { until: Instant },
}

/// The files' issuer signs once a root it chains to has been everywhere, that is
/// handed out for one certificate lifetime (`everywhere` says since when each root
/// handed out is, or will be). Until then the issuer in use goes on signing, if the
/// files' bundle still holds its root. If it does not, the operator removed that root:
/// the files win at once, as trust is never kept wider than the files say.
pub fn choose(
    in_use: &Ca,
    files: &Ca,
    everywhere: &HashMap<Vec<u8>, Instant>,
    now: Instant,
) -> Choice {
    let new = files.issuer_cert();
    if new.der == in_use.issuer_cert().der || !in_use.issuer_cert().chains_to(files.anchors()) {
        return Choice::Files;
    }
    let roots = files.anchors().iter().filter(|a| new.signed_by(a));
    // A root not handed out yet is everywhere one lifetime after it is.
    let soonest = roots
        .map(|a| {
            everywhere
                .get(&a.der)
                .copied()
                .unwrap_or(now + files.lifetime())
        })
        .min()
        .unwrap_or(now);
    if soonest <= now {
        Choice::Files
    } else {
        Choice::Hold { until: soonest }
    }
}

/// What the files last held, and what the rotation remembers.
struct State {
    /// The files' bytes last read.
    raw: Vec<u8>,
    /// The files' set, parsed, while a new issuer is held back.
    pending: Option<(Arc<Ca>, Instant)>,
    /// From when each root handed out has been everywhere. At start, the root of the
    /// issuer in use counts as everywhere already; any other is taken as handed out
    /// just now (a controller that restarts cannot know better, and waits).
    everywhere: HashMap<Vec<u8>, Instant>,
    /// Issuers replaced, with when the last certificate each signed expires.
    retired: Vec<(Cert, Instant)>,
}

/// Follows the issuer files and decides what is used.
pub struct Rotation {
    files: CaFiles,
    trust_domain: String,
    lifetime: Duration,
    tx: watch::Sender<Arc<Ca>>,
    state: Mutex<State>,
}

impl Rotation {
    /// Reads `files` once: the CA to start with, or why it cannot be used.
    pub fn load(
        files: CaFiles,
        trust_domain: &str,
        lifetime: Duration,
    ) -> Result<Arc<Self>, CaError> {
        let texts = files.read()?;
        let raw = texts.concat().into_bytes();
        let ca = Ca::parse(&files, texts, trust_domain, lifetime)?;
        let now = Instant::now();
        let everywhere = ca
            .anchors()
            .iter()
            .map(|a| {
                let since = match ca.issuer_cert().signed_by(a) {
                    true => now,
                    false => now + lifetime,
                };
                (a.der.clone(), since)
            })
            .collect();
        Ok(Arc::new(Self {
            files,
            trust_domain: trust_domain.to_string(),
            lifetime,
            tx: watch::channel(Arc::new(ca)).0,
            state: Mutex::new(State {
                raw,
                pending: None,
                everywhere,
                retired: Vec::new(),
            }),
        }))
    }

    /// The CA in use now.
    pub fn current(&self) -> Arc<Ca> {
        self.tx.borrow().clone()
    }

    pub fn handle(&self) -> CaHandle {
        CaHandle(self.tx.subscribe())
    }

    /// Compares the files with what is in use, every [`crate::reread::EVERY`], until
    /// `stop`.
    pub async fn run(self: Arc<Self>, metrics: Metrics, stop: CancellationToken) {
        crate::reread::every(stop, move || self.reload(&metrics, Instant::now())).await
    }

    /// Re-reads the files; a changed, good set is applied (its issuer perhaps held back,
    /// see [`choose`]); a bad one is refused, said once and counted, and what is in use
    /// stays.
    pub fn reload(&self, metrics: &Metrics, now: Instant) {
        let mut st = self.state.lock();
        let texts = self.files.read();
        let raw = texts
            .as_ref()
            .map(|t| t.concat().into_bytes())
            .unwrap_or_default();
        let files = if raw != st.raw {
            st.raw = raw;
            let parsed = texts.and_then(|t| {
                Ca::parse(&self.files, t, &self.trust_domain, self.lifetime).map(Arc::new)
            });
            match parsed {
                Ok(ca) => ca,
                Err(error) => {
                    // Mid-rotation the files may disagree for a moment: the next change
                    // is tried again.
                    warn!(%error, "the issuer files changed but cannot be used; the CA in use stays");
                    metrics.issuer_reloaded(IssuerReload::Failed);
                    st.pending = None;
                    return;
                }
            }
        } else {
            match &st.pending {
                Some((ca, until)) if *until <= now => ca.clone(),
                _ => return,
            }
        };
        let in_use = self.tx.borrow().clone();
        let (next, choice) = match choose(&in_use, &files, &st.everywhere, now) {
            Choice::Files => ((*files).clone(), Choice::Files),
            hold @ Choice::Hold { .. } => (in_use.with_anchors_of(&files), hold),
        };
        // Roots handed out from now on are everywhere one lifetime later.
        st.everywhere
            .retain(|der, _| next.anchors().iter().any(|a| &a.der == der));
        for a in next.anchors() {
            st.everywhere
                .entry(a.der.clone())
                .or_insert(now + self.lifetime);
        }
        st.retired.retain(|(_, until)| *until > now);
        let issuer_changed = next.issuer_cert().der != in_use.issuer_cert().der;
        if issuer_changed {
            st.retired
                .push((in_use.issuer_cert().clone(), now + self.lifetime));
            let until = SystemTime::now() + self.lifetime;
            let secs = until
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            metrics.set_issuer_retired_until(secs as i64);
        }
        for (old, until) in &st.retired {
            if !old.chains_to(next.anchors()) {
                warn!(
                    issuer = %old.subject,
                    for_secs = until.saturating_duration_since(now).as_secs(),
                    "the trust anchors no longer hold the root of certificates that are still \
                     in use: peers refuse them until they are renewed"
                );
            }
        }
        match choice {
            Choice::Hold { until } => {
                let wait = until.saturating_duration_since(now);
                info!(
                    new_issuer = %files.issuer_cert().subject,
                    in_use = %in_use.issuer_cert().subject,
                    in_secs = wait.as_secs(),
                    "trust anchors updated; the new issuer signs once every proxy trusts its root \
                     (one certificate lifetime after the root was first handed out)"
                );
                if st.pending.is_none() {
                    metrics.issuer_reloaded(IssuerReload::Held);
                }
                st.pending = Some((files, until));
            }
            Choice::Files => {
                st.pending = None;
                info!(
                    issuer = %next.issuer_cert().subject,
                    anchors = next.anchors().len(),
                    issuer_changed,
                    "issuer files reloaded"
                );
                metrics.issuer_reloaded(IssuerReload::Reloaded);
            }
        }
        if !next.same_as(&in_use) {
            metrics.set_ca(next.anchors().len(), next.issuer_cert().not_after);
            self.tx.send_replace(Arc::new(next));
        }
    }
}

#[cfg(test)]
mod tests;
