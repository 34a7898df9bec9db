//! `remora check`: what is wrong with an install, as a list of named checks, each with
//! a hint. It reads what the chart installed (through the kubeconfig's credentials) and
//! follows the controller Deployment to the Secrets and ConfigMaps it mounts, whatever
//! the values named them. The controller reads its identity and the injector's
//! settings at start: what is checked is what a restarted controller would use.
//!
//! Names are stable (scripts match on them): `kubernetes-api`, `kubernetes-version`,
//! `crds`, `gateway-api`, `controller`, `controller-leader`, `injector-settings`,
//! `trust-anchors`, `issuer`, `webhook-config`, `webhook-certificate`,
//! `webhook-endpoints`, `meshed-pods`.

use std::{collections::BTreeMap, fmt::Write as _};

use k8s_openapi::{
    api::{
        admissionregistration::v1::MutatingWebhookConfiguration,
        apps::v1::Deployment,
        coordination::v1::Lease,
        core::v1::{ConfigMap, Pod, Secret, Service},
        discovery::v1::EndpointSlice,
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{Api, Client, api::ListParams};
use remora_k8s::{
    inject::Settings,
    pki::{self, Cert},
};
use serde::Serialize;

/// The names the chart gives what it installs.
pub const CONTROLLER: &str = "remora-controller";
pub const WEBHOOK_CONFIG: &str = "remora-injector";
pub const LEASE: &str = "remora-controller";
pub const HTTPROUTE_CRD: &str = "httproutes.gateway.networking.k8s.io";
/// The ConfigMap the chart writes the injector's settings to, and its key (the
/// controller's `--inject-config` file); the trust anchors' key.
pub const SETTINGS_CONFIG_MAP: &str = "remora-inject";
pub const SETTINGS_KEY: &str = "settings.yaml";
pub const ANCHORS_KEY: &str = "trust-anchors.pem";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

/// One check's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Where Remora is installed.
    pub mesh_namespace: String,
    /// Whose meshed pods to check; `None`: every namespace.
    pub pods_namespace: Option<String>,
    /// Certificates ending sooner than this (seconds) are a warning.
    pub expiry_warning: i64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            mesh_namespace: "remora-system".into(),
            pods_namespace: None,
            expiry_warning: 30 * 24 * 3600,
        }
    }
}

struct Report {
    findings: Vec<Finding>,
}

impl Report {
    fn add(&mut self, name: &'static str, status: Status, detail: String, hint: Option<&str>) {
        self.findings.push(Finding {
            name,
            status,
            detail,
            hint: hint.map(str::to_string),
        });
    }
    fn ok(&mut self, name: &'static str, detail: String) {
        self.add(name, Status::Ok, detail, None);
    }
    fn warn(&mut self, name: &'static str, detail: String, hint: &str) {
        self.add(name, Status::Warn, detail, Some(hint));
    }
    fn fail(&mut self, name: &'static str, detail: String, hint: &str) {
        self.add(name, Status::Fail, detail, Some(hint));
    }
}

/// What a failed API call says, briefly.
fn api_error(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({})", s.message, s.code),
        e => e.to_string(),
    }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// Runs every check; later checks that need what an earlier one could not read say
/// so rather than vanish.
pub async fn run(client: Client, opts: &Options) -> Vec<Finding> {
    let mut r = Report {
        findings: Vec::new(),
    };
    let ns = opts.mesh_namespace.as_str();

    // --- kubernetes ---
    let version = match client.apiserver_version().await {
        Ok(v) => {
            r.ok(
                "kubernetes-api",
                format!("reachable, Kubernetes {}", v.git_version),
            );
            Some(v)
        }
        Err(e) => {
            r.fail(
                "kubernetes-api",
                format!("cannot reach the API server: {e}"),
                "check KUBECONFIG and the current context (kubectl cluster-info)",
            );
            return r.findings;
        }
    };

    // --- the controller and what it mounts ---
    let deploy = Api::<Deployment>::namespaced(client.clone(), ns)
        .get(CONTROLLER)
        .await;
    let mounts = match &deploy {
        Ok(d) => Mounts::of(d),
        Err(_) => Mounts::default(),
    };
    let settings = injector_settings(&client, ns, &mounts, &mut r).await;

    let minor = version.as_ref().and_then(|v| {
        v.minor
            .trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse::<u32>()
            .ok()
    });
    match (minor, &settings) {
        (Some(m), _) if m < 26 => r.fail(
            "kubernetes-version",
            format!("Kubernetes 1.{m}: Remora needs 1.26 or later"),
            "upgrade the cluster",
        ),
        (Some(m), Some(s)) if m < 29 && s.native_sidecar => r.fail(
            "kubernetes-version",
            format!(
                "Kubernetes 1.{m} has no native sidecars, but the injector makes them: pods \
                 would be refused"
            ),
            "helm upgrade ... --set proxy.nativeSidecar=false (or upgrade to 1.29+)",
        ),
        (Some(m), _) => r.ok("kubernetes-version", format!("1.{m} is supported")),
        (None, _) => r.warn(
            "kubernetes-version",
            format!(
                "cannot read the minor version from {:?}",
                version.as_ref().map(|v| v.minor.clone())
            ),
            "native sidecars need Kubernetes 1.29 or later",
        ),
    }

    crds(&client, &mut r).await;

    match &deploy {
        Ok(d) => {
            let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            let ready = d
                .status
                .as_ref()
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0);
            let hint = format!(
                "kubectl -n {ns} describe deploy/{CONTROLLER}; kubectl -n {ns} logs deploy/{CONTROLLER}"
            );
            if ready == 0 {
                r.fail(
                    "controller",
                    format!("no replica of {ns}/{CONTROLLER} is ready (of {want})"),
                    &hint,
                );
            } else if ready < want {
                r.warn(
                    "controller",
                    format!("{ready} of {want} replicas ready: no spare while one restarts"),
                    &hint,
                );
            } else {
                r.ok("controller", format!("{ready} of {want} replicas ready"));
            }
        }
        Err(e) => r.fail(
            "controller",
            format!("Deployment {ns}/{CONTROLLER}: {}", api_error(e)),
            &format!(
                "install Remora: helm install remora charts/remora -n {ns} --create-namespace"
            ),
        ),
    }
    leader(&client, ns, &mut r).await;

    let anchors = trust_anchors(&client, ns, &mounts, settings.as_ref(), opts, &mut r).await;
    issuer(&client, ns, &mounts, anchors.as_deref(), opts, &mut r).await;
    webhook(&client, ns, &mounts, opts, &mut r).await;
    meshed_pods(&client, opts, &mut r).await;
    r.findings
}

/// The Secrets and ConfigMaps the controller's pod mounts, by volume name (the
/// chart's names: issuer, trust-anchors, webhook-tls, inject).
#[derive(Debug, Default)]
struct Mounts {
    issuer_secret: Option<String>,
    anchors_config_map: Option<String>,
    webhook_secret: Option<String>,
    inject_config_map: Option<String>,
}

impl Mounts {
    fn of(d: &Deployment) -> Self {
        let mut m = Self::default();
        let volumes = d
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|s| s.volumes.as_ref());
        for v in volumes.into_iter().flatten() {
            let secret = v.secret.as_ref().and_then(|s| s.secret_name.clone());
            let cm = v.config_map.as_ref().map(|c| c.name.clone());
            match v.name.as_str() {
                "issuer" => m.issuer_secret = secret,
                "trust-anchors" => m.anchors_config_map = cm,
                "webhook-tls" => m.webhook_secret = secret,
                "inject" => m.inject_config_map = cm,
                _ => {}
            }
        }
        m
    }
}

async fn crds(client: &Client, r: &mut Report) {
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    let mut missing = Vec::new();
    let mut stale = Vec::new();
    let mut errors = Vec::new();
    let wanted = remora_k8s::crds();
    for want in &wanted {
        let name = want.metadata.name.clone().unwrap_or_default();
        match api.get(&name).await {
            Ok(have) => {
                // Helm installs crds/ once and never upgrades them.
                let schemas = |c: &CustomResourceDefinition| {
                    c.spec
                        .versions
                        .iter()
                        .map(|v| {
                            (
                                v.name.clone(),
                                serde_json::to_value(&v.schema).unwrap_or_default(),
                            )
                        })
                        .collect::<BTreeMap<_, _>>()
                };
                let (w, h) = (schemas(want), schemas(&have));
                if w.iter().any(|(v, s)| h.get(v) != Some(s)) {
                    stale.push(name);
                }
            }
            Err(e) if is_not_found(&e) => missing.push(name),
            Err(e) => errors.push(format!("{name}: {}", api_error(&e))),
        }
    }
    if !missing.is_empty() || !errors.is_empty() {
        let mut detail = String::new();
        if !missing.is_empty() {
            let _ = write!(detail, "not installed: {}", missing.join(", "));
        }
        if !errors.is_empty() {
            let _ = write!(
                detail,
                "{}cannot read: {}",
                if detail.is_empty() { "" } else { "; " },
                errors.join(", ")
            );
        }
        r.fail(
            "crds",
            detail,
            "kubectl apply -f charts/remora/crds/ (Helm installs them only on first install)",
        );
    } else if !stale.is_empty() {
        r.warn(
            "crds",
            format!(
                "{} differ from this remora's ({}): fields may be pruned or refused",
                stale.join(", "),
                env!("CARGO_PKG_VERSION")
            ),
            "kubectl apply -f charts/remora/crds/ (helm upgrade does not upgrade CRDs)",
        );
    } else {
        r.ok(
            "crds",
            format!("{} Remora CRDs installed and current", wanted.len()),
        );
    }
    match api.get(HTTPROUTE_CRD).await {
        Ok(_) => r.ok("gateway-api", "HTTPRoute CRD installed".into()),
        Err(e) if is_not_found(&e) => r.warn(
            "gateway-api",
            "the Gateway API's HTTPRoute CRD is not installed: HTTPRoutes are off (the \
             controller picks them up once it is)"
                .into(),
            "install the Gateway API CRDs (standard channel) for routes, canaries and \
             header matching",
        ),
        Err(e) => r.warn(
            "gateway-api",
            format!("cannot read {HTTPROUTE_CRD}: {}", api_error(&e)),
            "check your RBAC: remora check reads CRDs",
        ),
    }
}

async fn leader(client: &Client, ns: &str, r: &mut Report) {
    let hint = format!(
        "statuses of policies and routes are not written: check the controller's logs \
         (kubectl -n {ns} logs deploy/{CONTROLLER}) and its RBAC for leases"
    );
    match Api::<Lease>::namespaced(client.clone(), ns)
        .get(LEASE)
        .await
    {
        Ok(lease) => {
            let spec = lease.spec.unwrap_or_default();
            let holder = spec.holder_identity.unwrap_or_default();
            let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
            let renewed = spec.renew_time.map(|t| t.0.as_second());
            // Renewed every third of the lease; the reader's clock may be off a little.
            let fresh = |t: i64| pki::now() - t <= 2 * duration;
            match renewed {
                Some(t) if holder.is_empty() && fresh(t) => r.warn(
                    "controller-leader",
                    format!(
                        "Lease {ns}/{LEASE} was just given up ({}s ago): a replica takes it \
                         within {duration}s",
                        (pki::now() - t).max(0)
                    ),
                    "run remora check again in a few seconds",
                ),
                _ if holder.is_empty() => r.fail(
                    "controller-leader",
                    format!("Lease {ns}/{LEASE} has no holder"),
                    &hint,
                ),
                Some(t) if fresh(t) => r.ok(
                    "controller-leader",
                    format!("{holder} leads (renewed {}s ago)", (pki::now() - t).max(0)),
                ),
                Some(t) => r.fail(
                    "controller-leader",
                    format!(
                        "{holder} holds Lease {ns}/{LEASE} but last renewed it {}s ago \
                         (lease {duration}s): no replica leads",
                        pki::now() - t
                    ),
                    &hint,
                ),
                None => r.fail(
                    "controller-leader",
                    format!("Lease {ns}/{LEASE} was never renewed"),
                    &hint,
                ),
            }
        }
        Err(e) => r.fail(
            "controller-leader",
            format!("Lease {ns}/{LEASE}: {}", api_error(&e)),
            &hint,
        ),
    }
}

/// One key of a ConfigMap, or what is wrong (named).
pub async fn config_map_key(
    client: &Client,
    ns: &str,
    name: &str,
    key: &str,
) -> Result<String, String> {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .map_err(|e| format!("ConfigMap {ns}/{name}: {}", api_error(&e)))?;
    cm.data
        .and_then(|mut d| d.remove(key))
        .ok_or_else(|| format!("ConfigMap {ns}/{name} has no {key}"))
}

/// Reading a Secret may be forbidden to whoever runs the check: that is no failure of
/// the install.
const FORBIDDEN: &str = "forbidden: ";
const SECRETS_HINT: &str =
    "run remora check with a role that may get Secrets in the mesh's namespace";

async fn secret_key(client: &Client, ns: &str, name: &str, key: &str) -> Result<String, String> {
    let s = Api::<Secret>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .map_err(|e| match &e {
            kube::Error::Api(s) if s.code == 403 => {
                format!("{FORBIDDEN}you may not read Secret {ns}/{name}, so it was not checked")
            }
            e => format!("Secret {ns}/{name}: {}", api_error(e)),
        })?;
    let bytes = s
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .ok_or_else(|| format!("Secret {ns}/{name} has no {key}"))?;
    String::from_utf8(bytes.0.clone()).map_err(|_| format!("Secret {ns}/{name} {key}: not text"))
}

async fn injector_settings(
    client: &Client,
    ns: &str,
    mounts: &Mounts,
    r: &mut Report,
) -> Option<Settings> {
    let name = mounts
        .inject_config_map
        .as_deref()
        .unwrap_or(SETTINGS_CONFIG_MAP);
    let hint = "the chart writes it from values; helm upgrade to restore it";
    match config_map_key(client, ns, name, SETTINGS_KEY).await {
        Ok(text) => match Settings::from_yaml(&text) {
            Ok(s) => {
                r.ok(
                    "injector-settings",
                    format!(
                        "{} ({}), proxy {}",
                        name,
                        if s.native_sidecar {
                            "native sidecar"
                        } else {
                            "legacy sidecar"
                        },
                        s.proxy_image
                    ),
                );
                Some(s)
            }
            Err(e) => {
                r.fail(
                    "injector-settings",
                    format!("ConfigMap {ns}/{name}: {e}"),
                    hint,
                );
                None
            }
        },
        Err(e) => {
            r.fail("injector-settings", e, hint);
            None
        }
    }
}

/// Says how a bundle's certificates stand in time: failing when one has expired (or is
/// not yet valid), warning when one ends within the window.
fn validity(what: &str, certs: &[Cert], opts: &Options) -> Result<Option<String>, String> {
    let now = pki::now();
    for c in certs {
        if !c.valid_at(now) {
            return Err(format!(
                "{what} {} is not valid now (from {} to {})",
                c.subject,
                pki::date(c.not_before),
                pki::date(c.not_after)
            ));
        }
    }
    let soonest = certs.iter().min_by_key(|c| c.not_after);
    Ok(soonest
        .filter(|c| c.not_after - now < opts.expiry_warning)
        .map(|c| {
            format!(
                "{what} {} expires in {} days ({})",
                c.subject,
                (c.not_after - now) / 86_400,
                pki::date(c.not_after)
            )
        }))
}

async fn trust_anchors(
    client: &Client,
    ns: &str,
    mounts: &Mounts,
    settings: Option<&Settings>,
    opts: &Options,
    r: &mut Report,
) -> Option<Vec<Cert>> {
    let name = mounts
        .anchors_config_map
        .as_deref()
        .unwrap_or("remora-trust-anchors");
    let hint = "make a new root and rotate it in (docs/install.md, \"Rotating the trust \
                anchors\"): old and new in one bundle, then restart meshed pods";
    let text = match config_map_key(client, ns, name, ANCHORS_KEY).await {
        Ok(t) => t,
        Err(e) => {
            r.fail("trust-anchors", e, hint);
            return None;
        }
    };
    let certs = match pki::bundle(&text) {
        Ok(c) => c,
        Err(e) => {
            r.fail("trust-anchors", format!("ConfigMap {ns}/{name}: {e}"), hint);
            return None;
        }
    };
    if let Some(s) = settings {
        let injected = pki::bundle(&s.trust_anchors).unwrap_or_default();
        let same = injected.len() == certs.len()
            && injected.iter().zip(&certs).all(|(a, b)| a.der == b.der);
        if !same {
            r.fail(
                "trust-anchors",
                format!(
                    "the injector gives proxies other anchors than ConfigMap {ns}/{name}: \
                     new pods would not trust the controller"
                ),
                "helm upgrade so that both come from the same values",
            );
            return Some(certs);
        }
    }
    match validity("anchor", &certs, opts) {
        Err(e) => r.fail("trust-anchors", e, hint),
        Ok(Some(w)) => r.warn("trust-anchors", w, hint),
        Ok(None) => r.ok(
            "trust-anchors",
            format!(
                "{} anchor(s), valid for {} days or more",
                certs.len(),
                opts.expiry_warning / 86_400
            ),
        ),
    }
    Some(certs)
}

async fn issuer(
    client: &Client,
    ns: &str,
    mounts: &Mounts,
    anchors: Option<&[Cert]>,
    opts: &Options,
    r: &mut Report,
) {
    let name = mounts
        .issuer_secret
        .as_deref()
        .unwrap_or("remora-identity-issuer");
    let hint = "issue a new issuer certificate from the root (docs/install.md) and update \
                the Secret; the controller reads it at start";
    let text = match secret_key(client, ns, name, "tls.crt").await {
        Ok(t) => t,
        Err(e) if e.starts_with(FORBIDDEN) => {
            r.warn("issuer", e, SECRETS_HINT);
            return;
        }
        Err(e) => {
            r.fail("issuer", e, hint);
            return;
        }
    };
    let certs = match pki::bundle(&text) {
        Ok(c) => c,
        Err(e) => {
            r.fail("issuer", format!("Secret {ns}/{name} tls.crt: {e}"), hint);
            return;
        }
    };
    if let Some(why) = certs[0].not_a_ca() {
        r.fail(
            "issuer",
            format!(
                "the issuer ({}) {why}: proxies would refuse every certificate it signs",
                certs[0].subject
            ),
            hint,
        );
        return;
    }
    if let Some(anchors) = anchors
        && !certs[0].chains_to(anchors)
    {
        r.fail(
            "issuer",
            format!(
                "the issuer ({}) is not signed by the trust anchors: proxies would trust \
                 nothing it signs",
                certs[0].subject
            ),
            hint,
        );
        return;
    }
    match validity("issuer", &certs[..1], opts) {
        Err(e) => r.fail("issuer", e, hint),
        Ok(Some(w)) => r.warn("issuer", w, hint),
        Ok(None) => r.ok(
            "issuer",
            format!(
                "{} chains to the anchors, valid until {}",
                certs[0].subject,
                pki::date(certs[0].not_after)
            ),
        ),
    }
}

async fn webhook(client: &Client, ns: &str, mounts: &Mounts, opts: &Options, r: &mut Report) {
    let hint = "helm upgrade restores the webhook; without it new pods start unmeshed";
    let config = match Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get(WEBHOOK_CONFIG)
        .await
    {
        Ok(c) => c,
        Err(e) => {
            r.fail(
                "webhook-config",
                format!(
                    "MutatingWebhookConfiguration {WEBHOOK_CONFIG}: {}",
                    api_error(&e)
                ),
                hint,
            );
            return;
        }
    };
    let Some(hook) = config.webhooks.as_ref().and_then(|w| w.first()) else {
        r.fail(
            "webhook-config",
            format!("{WEBHOOK_CONFIG} has no webhook"),
            hint,
        );
        return;
    };
    let service = hook.client_config.service.as_ref();
    let (svc_ns, svc_name) = match service {
        Some(s) => (s.namespace.clone(), s.name.clone()),
        None => {
            r.fail(
                "webhook-config",
                format!("{WEBHOOK_CONFIG} calls a URL, not the controller's Service"),
                hint,
            );
            return;
        }
    };
    if svc_ns != ns || svc_name != CONTROLLER {
        r.fail(
            "webhook-config",
            format!("{WEBHOOK_CONFIG} calls {svc_ns}/{svc_name}, not {ns}/{CONTROLLER}"),
            hint,
        );
    } else {
        r.ok(
            "webhook-config",
            format!(
                "{WEBHOOK_CONFIG} calls {ns}/{CONTROLLER}{} (failurePolicy {})",
                service.and_then(|s| s.path.clone()).unwrap_or_default(),
                hook.failure_policy.as_deref().unwrap_or("Fail")
            ),
        );
    }

    // The CA the API server trusts must vouch for the certificate the controller
    // serves, for the name the API server dials.
    let cert_hint = "helm upgrade regenerates the webhook certificate (or let cert-manager \
                     issue it: webhook.certManager.enabled)";
    let ca = hook
        .client_config
        .ca_bundle
        .as_ref()
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .unwrap_or_default();
    let secret = mounts
        .webhook_secret
        .as_deref()
        .unwrap_or("remora-webhook-tls");
    let checked = async {
        let ca = pki::bundle(&ca).map_err(|e| format!("{WEBHOOK_CONFIG} caBundle: {e}"))?;
        let text = secret_key(client, ns, secret, "tls.crt").await?;
        let certs = pki::bundle(&text).map_err(|e| format!("Secret {ns}/{secret} tls.crt: {e}"))?;
        let leaf = &certs[0];
        let dns = format!("{svc_name}.{svc_ns}.svc");
        if !leaf.dns_names.contains(&dns) {
            return Err(format!(
                "the serving certificate names {:?}, not {dns}: the API server refuses it",
                leaf.dns_names
            ));
        }
        if !leaf.chains_to(&ca)
            && !certs[1..]
                .iter()
                .any(|c| c.chains_to(&ca) && leaf.signed_by(c))
        {
            return Err(format!(
                "the caBundle of {WEBHOOK_CONFIG} does not vouch for the certificate in \
                 Secret {ns}/{secret}: the API server refuses it"
            ));
        }
        validity("serving certificate", &certs[..1], opts)
    };
    match checked.await {
        Ok(None) => r.ok(
            "webhook-certificate",
            format!("Secret {ns}/{secret} is vouched for by the caBundle"),
        ),
        Ok(Some(w)) => r.warn("webhook-certificate", w, cert_hint),
        Err(e) if e.starts_with(FORBIDDEN) => r.warn("webhook-certificate", e, SECRETS_HINT),
        Err(e) => r.fail("webhook-certificate", e, cert_hint),
    }

    // Somewhere to send reviews: the Service and a ready endpoint behind it.
    let svc = Api::<Service>::namespaced(client.clone(), ns)
        .get(CONTROLLER)
        .await;
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={CONTROLLER}")))
        .await;
    let ep_hint = format!(
        "kubectl -n {ns} get endpointslices -l kubernetes.io/service-name={CONTROLLER}; \
         with failurePolicy Ignore, pods created now start unmeshed"
    );
    match (svc, slices) {
        (Err(e), _) => r.fail(
            "webhook-endpoints",
            format!("Service {ns}/{CONTROLLER}: {}", api_error(&e)),
            &ep_hint,
        ),
        (_, Err(e)) => r.fail(
            "webhook-endpoints",
            format!("EndpointSlices of {ns}/{CONTROLLER}: {}", api_error(&e)),
            &ep_hint,
        ),
        (Ok(_), Ok(list)) => {
            let ready = list
                .items
                .iter()
                .flat_map(|s| &s.endpoints)
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
                .count();
            match ready {
                0 => r.fail(
                    "webhook-endpoints",
                    format!("Service {ns}/{CONTROLLER} has no ready endpoint: the webhook is unreachable"),
                    &ep_hint,
                ),
                n => r.ok("webhook-endpoints", format!("{n} ready endpoint(s) behind {ns}/{CONTROLLER}")),
            }
        }
    }
}

/// What a container's state says, when it is not running.
fn container_state(c: &k8s_openapi::api::core::v1::ContainerStatus) -> String {
    let state = c.state.as_ref();
    state
        .and_then(|s| s.waiting.as_ref())
        .map(|w| {
            format!(
                "waiting: {}{}",
                w.reason.as_deref().unwrap_or("?"),
                w.message
                    .as_deref()
                    .map(|m| format!(" ({m})"))
                    .unwrap_or_default()
            )
        })
        .or_else(|| {
            state.and_then(|s| s.terminated.as_ref()).map(|t| {
                format!(
                    "terminated: {} (exit {})",
                    t.reason.as_deref().unwrap_or("?"),
                    t.exit_code
                )
            })
        })
        .unwrap_or_else(|| "running, not ready".into())
}

/// How a meshed pod's mesh containers stand.
enum PodState {
    Ready,
    /// Scheduled or being deleted: not a fault yet.
    Settling(String),
    /// Which container is at fault, and why.
    Broken(&'static str, String),
}

/// A meshed pod: `remora-init` must have exited 0, then `remora-proxy` (a native
/// sidecar, or the first container) must be ready.
fn mesh_containers(pod: &Pod) -> PodState {
    if pod.metadata.deletion_timestamp.is_some() {
        return PodState::Settling("terminating".into());
    }
    let status = pod.status.as_ref();
    let inits = status
        .and_then(|s| s.init_container_statuses.as_deref())
        .unwrap_or_default();
    let containers = status
        .and_then(|s| s.container_statuses.as_deref())
        .unwrap_or_default();
    if let Some(init) = inits.iter().find(|c| c.name == "remora-init") {
        let done = init
            .state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .is_some_and(|t| t.exit_code == 0);
        if !done
            && init
                .state
                .as_ref()
                .and_then(|s| s.running.as_ref())
                .is_none()
        {
            return PodState::Broken(
                "remora-init",
                format!(
                    "{}, {} restart(s)",
                    container_state(init),
                    init.restart_count
                ),
            );
        }
        if !done {
            return PodState::Settling("remora-init running".into());
        }
    }
    let Some(proxy) = inits
        .iter()
        .chain(containers)
        .find(|c| c.name == "remora-proxy")
    else {
        return PodState::Settling("not started yet".into());
    };
    if proxy.ready {
        return PodState::Ready;
    }
    PodState::Broken(
        "remora-proxy",
        format!(
            "{}, {} restart(s)",
            container_state(proxy),
            proxy.restart_count
        ),
    )
}

async fn meshed_pods(client: &Client, opts: &Options, r: &mut Report) {
    let api = match &opts.pods_namespace {
        Some(ns) => Api::<Pod>::namespaced(client.clone(), ns),
        None => Api::<Pod>::all(client.clone()),
    };
    let pods = match api
        .list(&ListParams::default().labels("remora.io/meshed=true"))
        .await
    {
        Ok(p) => p.items,
        Err(e) => {
            r.fail(
                "meshed-pods",
                format!("cannot list meshed pods: {}", api_error(&e)),
                "check your RBAC: remora check lists pods",
            );
            return;
        }
    };
    let mut broken = Vec::new();
    let mut settling = Vec::new();
    let mut checked = 0;
    for pod in &pods {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            continue; // finished Jobs: the proxy stopped with them
        }
        checked += 1;
        let name = format!(
            "{}/{}",
            pod.metadata.namespace.as_deref().unwrap_or(""),
            pod.metadata.name.as_deref().unwrap_or("")
        );
        match mesh_containers(pod) {
            PodState::Ready => {}
            PodState::Settling(why) => settling.push(format!("{name}: {why}")),
            PodState::Broken(container, why) => {
                broken.push((container, format!("{name}: {container} {why}")))
            }
        }
    }
    let list = |items: &[String]| {
        let shown = items.len().min(10);
        format!(
            "{}{}",
            items[..shown].join("; "),
            if items.len() > shown { "; …" } else { "" }
        )
    };
    if !broken.is_empty() {
        let lines: Vec<String> = broken.iter().map(|(_, l)| l.clone()).collect();
        let hint = if broken.iter().any(|(c, _)| *c == "remora-init") {
            "kubectl logs <pod> -c remora-init (iptables: the init image needs NET_ADMIN \
             and NET_RAW, which Pod Security 'baseline' forbids); then -c remora-proxy"
        } else {
            "kubectl logs <pod> -c remora-proxy; remora-proxy names the setting or the \
             controller it is waiting for"
        };
        r.fail(
            "meshed-pods",
            format!(
                "{} of {checked} meshed pods are not ready: {}",
                broken.len(),
                list(&lines)
            ),
            hint,
        );
    } else if !settling.is_empty() {
        r.warn(
            "meshed-pods",
            format!(
                "{} of {checked} meshed pods are starting or stopping: {}",
                settling.len(),
                list(&settling)
            ),
            "run remora check again once they have settled",
        );
    } else {
        r.ok(
            "meshed-pods",
            format!("{checked} meshed pod(s), every proxy ready"),
        );
    }
}

/// The report as people read it.
pub fn render(findings: &[Finding]) -> String {
    let mut out = String::new();
    for f in findings {
        let mark = match f.status {
            Status::Ok => "[ok]  ",
            Status::Warn => "[warn]",
            Status::Fail => "[FAIL]",
        };
        let _ = writeln!(out, "{mark} {}: {}", f.name, f.detail);
        if f.status != Status::Ok
            && let Some(h) = &f.hint
        {
            let _ = writeln!(out, "       hint: {h}");
        }
    }
    let count = |s| findings.iter().filter(|f| f.status == s).count();
    let _ = writeln!(
        out,
        "\n{} passed, {} warning(s), {} failed",
        count(Status::Ok),
        count(Status::Warn),
        count(Status::Fail)
    );
    out
}
