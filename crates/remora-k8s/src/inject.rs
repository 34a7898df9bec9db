//! Sidecar injection as a pure decision: a pod, its namespace's labels and annotations,
//! and the install's settings in; the pod to run (or why it is left alone) out. The
//! admission webhook and `remora inject` both call it, and both send the difference as
//! a JSON patch computed by a JSON-patch library.
//!
//! The proxy runs as a native sidecar by default (an init container that keeps
//! running, with a startup probe on `/ready`): the app starts only once the proxy is
//! ready, Jobs complete, and on shutdown the proxy outlives the app. Clusters without
//! native sidecars (before 1.29) get the proxy as the first container, and the next
//! containers wait for it through a `postStart` hook.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{
        Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, ExecAction, HTTPGetAction,
        Lifecycle, LifecycleHandler, ObjectFieldSelector, Pod, PodSpec, Probe,
        ProjectedVolumeSource, ResourceRequirements, SecurityContext,
        ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
    },
    apimachinery::pkg::{api::resource::Quantity, util::intstr::IntOrString},
};
use serde::{Deserialize, Serialize};

/// On a namespace (label) or a pod (label or annotation): `enabled` or `disabled`.
pub const INJECT: &str = "remora.io/inject";
/// Set on every injected pod; the controller gives identities to its endpoints.
pub const MESHED: &str = "remora.io/meshed";
pub const PROXY_CONTAINER: &str = "remora-proxy";
pub const INIT_CONTAINER: &str = "remora-init";

/// Pod (or namespace) annotations that tune the injected proxy.
pub mod annotations {
    /// `REMORA_LOG` of the proxy (`info`, `debug`, or an EnvFilter).
    pub const LOG_LEVEL: &str = "remora.io/proxy-log-level";
    /// Ports proxied as TCP without protocol detection.
    pub const OPAQUE_PORTS: &str = "remora.io/opaque-ports";
    /// Inbound ports not intercepted (the admin port 4191 always is not).
    pub const SKIP_INBOUND_PORTS: &str = "remora.io/skip-inbound-ports";
    /// Destination ports the pod reaches without the proxy.
    pub const SKIP_OUTBOUND_PORTS: &str = "remora.io/skip-outbound-ports";
    /// Who may connect where no AuthorizationPolicy selects a port.
    pub const DEFAULT_INBOUND_POLICY: &str = "remora.io/default-inbound-policy";
    pub const CPU_REQUEST: &str = "remora.io/proxy-cpu-request";
    pub const CPU_LIMIT: &str = "remora.io/proxy-cpu-limit";
    pub const MEMORY_REQUEST: &str = "remora.io/proxy-memory-request";
    pub const MEMORY_LIMIT: &str = "remora.io/proxy-memory-limit";
}

/// The proxy's UID: iptables never redirects its own traffic.
pub const PROXY_UID: i64 = 2102;
const ADMIN_PORT: i32 = 4191;
const INBOUND_PORT: i32 = 4143;
const OUTBOUND_PORT: i32 = 4140;
const IDENTITY_VOLUME: &str = "remora-identity";
const IDENTITY_DIR: &str = "/var/run/secrets/remora";
const INIT_RUN_VOLUME: &str = "remora-init-run";
/// The audience of the projected token the controller's TokenReview asks for.
pub const TOKEN_AUDIENCE: &str = "identity.remora.io";

/// The install's injection settings (the chart writes them to a ConfigMap; the
/// controller reads them with `--inject-config`). Every field has a default.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Settings {
    pub proxy_image: String,
    pub init_image: String,
    /// `IfNotPresent`, `Always` or `Never`; unset leaves Kubernetes' default.
    pub image_pull_policy: Option<String>,
    /// Secrets (by name) for pulling the proxy and init images, added to each meshed
    /// pod that lacks them: they must exist in the pod's namespace.
    pub image_pull_secrets: Vec<String>,
    /// What proxies dial: the controller's Service.
    pub controller_addr: String,
    /// The mesh's trust anchors (PEM), given to each proxy inline: no ConfigMap is
    /// needed in every namespace. The controller fills them from its own CA.
    pub trust_anchors: String,
    pub trust_domain: String,
    /// The mesh's own namespace: never injected.
    pub mesh_namespace: String,
    /// The proxy as a native sidecar (Kubernetes 1.29+); else the first container.
    pub native_sidecar: bool,
    pub log_level: String,
    pub default_inbound_policy: String,
    /// Unset: the proxy's own default.
    pub opaque_ports: Option<String>,
    pub cpu_request: String,
    pub memory_request: String,
    pub cpu_limit: Option<String>,
    pub memory_limit: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            proxy_image: concat!("ghcr.io/remora-mesh/proxy:", env!("CARGO_PKG_VERSION")).into(),
            init_image: concat!("ghcr.io/remora-mesh/init:", env!("CARGO_PKG_VERSION")).into(),
            image_pull_policy: None,
            image_pull_secrets: Vec::new(),
            controller_addr: "https://remora-controller.remora-system.svc:8086".into(),
            trust_anchors: String::new(),
            trust_domain: "cluster.local".into(),
            mesh_namespace: "remora-system".into(),
            native_sidecar: true,
            log_level: "info".into(),
            default_inbound_policy: "all-unauthenticated".into(),
            opaque_ports: None,
            cpu_request: "10m".into(),
            memory_request: "20Mi".into(),
            cpu_limit: None,
            memory_limit: Some("250Mi".into()),
        }
    }
}

impl Settings {
    /// Reads settings (YAML or JSON), refusing unknown fields and bad values by name.
    pub fn from_yaml(text: &str) -> Result<Self, String> {
        let settings: Self = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        settings.validate()?;
        Ok(settings)
    }

    /// Every problem, in one message: an injected pod must be able to start.
    pub fn validate(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        if !self.trust_anchors.contains("-----BEGIN CERTIFICATE-----") {
            problems
                .push("trustAnchors: no PEM certificate: proxies could not verify anyone".into());
        }
        for (name, value) in [
            ("proxyImage", &self.proxy_image),
            ("initImage", &self.init_image),
            ("controllerAddr", &self.controller_addr),
            ("trustDomain", &self.trust_domain),
            ("meshNamespace", &self.mesh_namespace),
        ] {
            if value.trim().is_empty() {
                problems.push(format!("{name}: must not be empty"));
            }
        }
        if self.image_pull_secrets.iter().any(|n| n.trim().is_empty()) {
            problems.push("imagePullSecrets: a name is empty".into());
        }
        if !self.controller_addr.starts_with("https://") {
            problems.push(format!(
                "controllerAddr {:?}: injected proxies reach the controller over https://",
                self.controller_addr
            ));
        }
        const POLICIES: [&str; 4] = [
            "all-unauthenticated",
            "all-authenticated",
            "cluster-authenticated",
            "deny",
        ];
        if !POLICIES.contains(&self.default_inbound_policy.as_str()) {
            problems.push(format!(
                "defaultInboundPolicy {:?} is not one of {}",
                self.default_inbound_policy,
                POLICIES.join(", ")
            ));
        }
        if let Some(p) = &self.image_pull_policy
            && !["Always", "IfNotPresent", "Never"].contains(&p.as_str())
        {
            problems.push(format!(
                "imagePullPolicy {p:?} is not Always, IfNotPresent or Never"
            ));
        }
        match problems.is_empty() {
            true => Ok(()),
            false => Err(problems.join("; ")),
        }
    }
}

/// What injection needs of a pod's namespace.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Namespace {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// What to do with a pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Left as it is, and why.
    Skip(String),
    /// What the pod gets.
    Inject(Box<Injection>),
}

/// What injection adds to a pod: nothing is changed or removed, so the patch holds only
/// `add` operations, and every field of the pod as the API server sent it (even those
/// this build's Kubernetes types do not know) stays as it was.
#[derive(Debug, Clone, PartialEq)]
pub struct Injection {
    /// Put first among the init containers, in this order.
    pub init_containers: Vec<Container>,
    /// Put first among the containers (the proxy, without native sidecars).
    pub containers: Vec<Container>,
    pub volumes: Vec<Volume>,
    /// Image pull secrets, by name, added where the pod does not list them.
    pub image_pull_secrets: Vec<String>,
    /// Labels and annotations the pod does not have yet.
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

impl Injection {
    /// The JSON patch that makes `pod` (the object as sent, any fields) meshed.
    pub fn patch(&self, pod: &serde_json::Value) -> json_patch::Patch {
        use json_patch::{AddOperation, PatchOperation, jsonptr::PointerBuf};
        let mut ops = Vec::new();
        let mut add = |path: &[&str], value: serde_json::Value| {
            ops.push(PatchOperation::Add(AddOperation {
                path: PointerBuf::from_tokens(path.iter().copied()),
                value,
            }));
        };
        let has = |path: &[&str]| path.iter().try_fold(pod, |v, k| v.get(*k)).is_some();
        for (field, items) in [
            ("initContainers", json(&self.init_containers)),
            ("containers", json(&self.containers)),
        ] {
            let items = items.as_array().cloned().unwrap_or_default();
            if items.is_empty() {
                continue;
            }
            if !has(&["spec", field]) {
                add(&["spec", field], serde_json::Value::Array(items));
                continue;
            }
            for (i, item) in items.into_iter().enumerate() {
                add(&["spec", field, &i.to_string()], item);
            }
        }
        let volumes = json(&self.volumes).as_array().cloned().unwrap_or_default();
        if !has(&["spec", "volumes"]) {
            add(&["spec", "volumes"], serde_json::Value::Array(volumes));
        } else {
            for v in volumes {
                add(&["spec", "volumes", "-"], v);
            }
        }
        let listed = |name: &str| {
            pod.pointer("/spec/imagePullSecrets")
                .and_then(|v| v.as_array())
                .is_some_and(|a| a.iter().any(|s| s["name"] == name))
        };
        let secrets: Vec<serde_json::Value> = self
            .image_pull_secrets
            .iter()
            .filter(|n| !listed(n))
            .map(|n| serde_json::json!({ "name": n }))
            .collect();
        if !secrets.is_empty() {
            if !has(&["spec", "imagePullSecrets"]) {
                add(
                    &["spec", "imagePullSecrets"],
                    serde_json::Value::Array(secrets),
                );
            } else {
                for s in secrets {
                    add(&["spec", "imagePullSecrets", "-"], s);
                }
            }
        }
        let maps = [("labels", &self.labels), ("annotations", &self.annotations)];
        if !has(&["metadata"]) {
            // A template may have no metadata at all.
            let metadata: serde_json::Map<_, _> = maps
                .iter()
                .filter(|(_, m)| !m.is_empty())
                .map(|(field, m)| (field.to_string(), json(m)))
                .collect();
            add(&["metadata"], serde_json::Value::Object(metadata));
            return json_patch::Patch(ops);
        }
        for (field, map) in maps {
            if map.is_empty() {
                continue;
            }
            if !has(&["metadata", field]) {
                add(&["metadata", field], json(map));
                continue;
            }
            for (k, v) in map {
                add(
                    &["metadata", field, k],
                    serde_json::Value::String(v.clone()),
                );
            }
        }
        json_patch::Patch(ops)
    }

    /// `pod` meshed: [`Injection::patch`], applied.
    pub fn apply(&self, pod: &mut serde_json::Value) -> Result<(), json_patch::PatchError> {
        let patch = self.patch(pod);
        json_patch::patch(pod, &patch)
    }
}

/// What became of one manifest object given to [`inject_manifest`].
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Its pod (template) got the proxy.
    Injected,
    /// A workload left alone, and why.
    Skipped(String),
    /// Not a kind that makes pods: passed through.
    NotAWorkload,
}

/// Where a kind keeps the pod it makes: the pod itself, or a template.
fn template_path(api_version: &str, kind: &str) -> Option<&'static [&'static str]> {
    match (api_version, kind) {
        ("v1", "Pod") => Some(&[]),
        ("v1", "ReplicationController")
        | ("apps/v1", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet")
        | ("batch/v1", "Job") => Some(&["spec", "template"]),
        ("batch/v1", "CronJob") => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

/// Injects the pod a manifest object makes (a Pod, or a workload's template), as the
/// webhook would once it is applied: the object asks for injection by being given,
/// unless its pod says `remora.io/inject: disabled`. The pod keeps every field it had;
/// the template is marked `remora.io/inject: enabled`, so the webhook leaves it as it is.
pub fn inject_manifest(
    object: &mut serde_json::Value,
    settings: &Settings,
) -> Result<Outcome, String> {
    let text =
        |v: &serde_json::Value, k: &str| v.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let (api_version, kind) = (
        text(object, "apiVersion").unwrap_or_default(),
        text(object, "kind").unwrap_or_default(),
    );
    let Some(path) = template_path(&api_version, &kind) else {
        return Ok(Outcome::NotAWorkload);
    };
    let namespace = object
        .get("metadata")
        .and_then(|m| text(m, "namespace"))
        .unwrap_or_else(|| "default".into());
    let mut template = &mut *object;
    for key in path {
        template = template
            .get_mut(*key)
            .ok_or_else(|| format!("{kind} has no {}", path.join(".")))?;
    }
    if !template.is_object() {
        return Err(format!("{kind}: {} is not an object", path.join(".")));
    }
    // A template is a pod without apiVersion and kind.
    let mut pod_json = template.clone();
    pod_json["apiVersion"] = "v1".into();
    pod_json["kind"] = "Pod".into();
    let mut pod: Pod =
        serde_json::from_value(pod_json).map_err(|e| format!("{kind}: {}: {e}", path.join(".")))?;
    // Asked by being given, unless the pod says otherwise (annotation or label).
    let said = get(&pod.metadata.annotations, INJECT).or(get(&pod.metadata.labels, INJECT));
    let asked = said.is_none();
    if asked {
        pod.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(INJECT.into(), "enabled".into());
    }
    let ns = Namespace {
        name: namespace,
        ..Namespace::default()
    };
    let injection = match decide(&pod, &ns, settings) {
        Decision::Skip(why) => return Ok(Outcome::Skipped(why)),
        Decision::Inject(injection) => injection,
    };
    let mut injection = *injection;
    if asked {
        injection
            .annotations
            .insert(INJECT.into(), "enabled".into());
    }
    injection
        .apply(template)
        .map_err(|e| format!("{kind}: the patch does not apply: {e}"))?;
    Ok(Outcome::Injected)
}

/// What injection adds, as JSON (Kubernetes types always serialize).
fn json<T: Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).expect("Kubernetes types serialize")
}

/// Whether and how to inject `pod`, created in `namespace`.
pub fn decide(pod: &Pod, namespace: &Namespace, settings: &Settings) -> Decision {
    let meta = &pod.metadata;
    let on_pod = get(&meta.annotations, INJECT).or(get(&meta.labels, INJECT));
    let on_namespace = namespace
        .labels
        .get(INJECT)
        .or(namespace.annotations.get(INJECT))
        .map(String::as_str);
    let spec = pod.spec.clone().unwrap_or_default();
    let skip = |why: &str| Decision::Skip(why.to_string());
    if namespace.name == settings.mesh_namespace || namespace.name == "kube-system" {
        return skip("the mesh's own namespace and kube-system are never injected");
    }
    match (on_pod, on_namespace) {
        (Some("disabled"), _) => return skip("the pod opts out (remora.io/inject: disabled)"),
        (Some("enabled"), _) | (None, Some("enabled")) => {}
        _ => return skip("neither the pod nor its namespace has remora.io/inject: enabled"),
    }
    if spec.host_network == Some(true) {
        return skip("a hostNetwork pod shares the node's network: it cannot be intercepted");
    }
    let all = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten());
    if all.into_iter().any(|c| c.name == PROXY_CONTAINER) {
        return skip("already injected");
    }
    Decision::Inject(Box::new(inject(pod, namespace, settings)))
}

/// The value of `key` in an optional map.
fn get<'a>(map: &'a Option<BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    map.as_ref().and_then(|m| m.get(key)).map(String::as_str)
}

/// A setting: the pod's annotation, else its namespace's.
fn setting<'a>(pod: &'a Pod, namespace: &'a Namespace, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .or(namespace.annotations.get(key))
        .map(String::as_str)
}

fn inject(pod: &Pod, namespace: &Namespace, settings: &Settings) -> Injection {
    let value = |key: &str| setting(pod, namespace, key).map(str::to_string);
    let log = value(annotations::LOG_LEVEL).unwrap_or_else(|| settings.log_level.clone());
    let opaque = value(annotations::OPAQUE_PORTS).or(settings.opaque_ports.clone());
    let skip_in = value(annotations::SKIP_INBOUND_PORTS);
    let skip_out = value(annotations::SKIP_OUTBOUND_PORTS);
    let default_policy = value(annotations::DEFAULT_INBOUND_POLICY)
        .unwrap_or_else(|| settings.default_inbound_policy.clone());
    let resources = resources(pod, namespace, settings);
    let spec = pod.spec.clone().unwrap_or_default();
    // The ports the app serves, and the kubelet's HTTP probes on them (always allowed,
    // so a `deny` default never fails a probe, even before the controller answers).
    let ports: Vec<i32> = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
        .map(|p| p.container_port)
        .collect();
    let probes: Vec<String> = probe_paths(&spec)
        .into_iter()
        .flat_map(|(port, paths)| paths.into_iter().map(move |p| format!("{port}:{p}")))
        .collect();

    let mut vars = vec![
        env("REMORA_CONTROLLER_ADDR", &settings.controller_addr),
        // The controller's own identity: ServiceAccount remora-controller of the mesh's
        // namespace.
        env_var(
            "REMORA_CONTROLLER_NAME",
            format!(
                "remora-controller.{}.serviceaccount.identity.{}",
                settings.mesh_namespace, settings.trust_domain
            ),
        ),
        env("REMORA_TRUST_DOMAIN", &settings.trust_domain),
        env("REMORA_TRUST_ANCHORS_PEM", settings.trust_anchors.trim()),
        env(
            "REMORA_IDENTITY_TOKEN_FILE",
            &format!("{IDENTITY_DIR}/token"),
        ),
        field("REMORA_NAMESPACE", "metadata.namespace"),
        field("REMORA_POD_NAME", "metadata.name"),
        field("REMORA_POD_IP", "status.podIP"),
        field("REMORA_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        env("REMORA_LOG", &log),
        env("REMORA_DEFAULT_INBOUND_POLICY", &default_policy),
    ];
    if !ports.is_empty() {
        let list: Vec<String> = ports.iter().map(i32::to_string).collect();
        vars.push(env_var("REMORA_INBOUND_PORTS", list.join(",")));
    }
    if !probes.is_empty() {
        vars.push(env_var("REMORA_PROBE_PATHS", probes.join(",")));
    }
    if let Some(opaque) = &opaque {
        vars.push(env("REMORA_OPAQUE_PORTS", opaque));
    }
    let admin = |path: &str| {
        Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(ADMIN_PORT),
            ..Default::default()
        })
    };
    let mut proxy = Container {
        name: PROXY_CONTAINER.into(),
        image: Some(settings.proxy_image.clone()),
        image_pull_policy: settings.image_pull_policy.clone(),
        env: Some(vars),
        ports: Some(vec![ContainerPort {
            name: Some("remora-admin".into()),
            container_port: ADMIN_PORT,
            ..Default::default()
        }]),
        readiness_probe: Some(Probe {
            http_get: admin("/ready"),
            period_seconds: Some(10),
            ..Default::default()
        }),
        liveness_probe: Some(Probe {
            http_get: admin("/live"),
            period_seconds: Some(10),
            failure_threshold: Some(3),
            ..Default::default()
        }),
        resources: Some(resources),
        security_context: Some(SecurityContext {
            run_as_user: Some(PROXY_UID),
            run_as_group: Some(PROXY_UID),
            run_as_non_root: Some(true),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![mount(IDENTITY_VOLUME, IDENTITY_DIR)]),
        ..Default::default()
    };
    let mut init_args = vec![
        "--proxy-uid".to_string(),
        PROXY_UID.to_string(),
        "--inbound-port".into(),
        INBOUND_PORT.to_string(),
        "--outbound-port".into(),
        OUTBOUND_PORT.to_string(),
        "--skip-inbound-ports".into(),
        match &skip_in {
            Some(more) => format!("{ADMIN_PORT},{more}"),
            None => ADMIN_PORT.to_string(),
        },
    ];
    if let Some(out) = &skip_out {
        init_args.extend(["--skip-outbound-ports".into(), out.clone()]);
    }
    let init = Container {
        name: INIT_CONTAINER.into(),
        image: Some(settings.init_image.clone()),
        image_pull_policy: settings.image_pull_policy.clone(),
        args: Some(init_args),
        // Only what iptables needs; /run for its lock on an otherwise read-only root.
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: INIT_RUN_VOLUME.into(),
            mount_path: "/run".into(),
            ..Default::default()
        }]),
        ..Default::default()
    };
    let mut injection = Injection {
        init_containers: vec![init],
        containers: Vec::new(),
        volumes: Vec::new(),
        image_pull_secrets: settings.image_pull_secrets.clone(),
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
    };
    if settings.native_sidecar {
        // Starts before the app, which waits for its startup probe; keeps running.
        proxy.restart_policy = Some("Always".into());
        proxy.startup_probe = Some(Probe {
            http_get: admin("/ready"),
            period_seconds: Some(1),
            failure_threshold: Some(300),
            ..Default::default()
        });
        injection.init_containers.push(proxy);
    } else {
        // The kubelet starts containers in order and runs each postStart hook before
        // the next container: the app starts once the proxy is ready.
        proxy.lifecycle = Some(Lifecycle {
            post_start: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec!["/remora-proxy".into(), "await-ready".into()]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        injection.containers.push(proxy);
    }
    injection.volumes.push(Volume {
        name: IDENTITY_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(TOKEN_AUDIENCE.into()),
                    expiration_seconds: Some(3600),
                    path: "token".into(),
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    });
    injection.volumes.push(Volume {
        name: INIT_RUN_VOLUME.into(),
        empty_dir: Some(Default::default()),
        ..Default::default()
    });

    let labels = pod.metadata.labels.clone().unwrap_or_default();
    if labels.get(MESHED).is_none_or(|v| v != "true") {
        injection.labels.insert(MESHED.into(), "true".into());
    }
    // What the controller reads from the pod itself: the namespace's values are copied
    // onto it, so both sides agree.
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    for key in [
        annotations::SKIP_INBOUND_PORTS,
        annotations::DEFAULT_INBOUND_POLICY,
    ] {
        if let (false, Some(v)) = (
            annotations.contains_key(key),
            namespace.annotations.get(key),
        ) {
            injection.annotations.insert(key.into(), v.clone());
        }
    }
    injection
}

/// The proxy's resources: annotations over the settings.
fn resources(pod: &Pod, namespace: &Namespace, settings: &Settings) -> ResourceRequirements {
    let value = |key: &str, fallback: Option<&String>| {
        setting(pod, namespace, key)
            .map(str::to_string)
            .or(fallback.cloned())
    };
    let pair = |cpu: Option<String>, memory: Option<String>| {
        let mut m = BTreeMap::new();
        if let Some(cpu) = cpu {
            m.insert("cpu".to_string(), Quantity(cpu));
        }
        if let Some(memory) = memory {
            m.insert("memory".to_string(), Quantity(memory));
        }
        (!m.is_empty()).then_some(m)
    };
    ResourceRequirements {
        requests: pair(
            value(annotations::CPU_REQUEST, Some(&settings.cpu_request)),
            value(annotations::MEMORY_REQUEST, Some(&settings.memory_request)),
        ),
        limits: pair(
            value(annotations::CPU_LIMIT, settings.cpu_limit.as_ref()),
            value(annotations::MEMORY_LIMIT, settings.memory_limit.as_ref()),
        ),
        ..Default::default()
    }
}

/// The kubelet's HTTP probe paths of the app's containers, by port (named ports
/// resolved), each as the proxy compares it: absolute, without its query. The injector
/// gives them to the proxy and the controller to its policy answer, so both agree.
pub fn probe_paths(spec: &PodSpec) -> BTreeMap<u16, Vec<String>> {
    let mut out: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    for c in &spec.containers {
        let named = |name: &str| {
            c.ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .and_then(|p| u16::try_from(p.container_port).ok())
        };
        let probes = [&c.liveness_probe, &c.readiness_probe, &c.startup_probe];
        for get in probes
            .into_iter()
            .flatten()
            .filter_map(|p| p.http_get.as_ref())
        {
            let port = match &get.port {
                IntOrString::Int(n) => u16::try_from(*n).ok(),
                IntOrString::String(name) => named(name),
            };
            if let Some(port) = port {
                let raw = get.path.as_deref().unwrap_or("/");
                let raw = raw.split('?').next().unwrap_or("");
                let path = match raw.starts_with('/') {
                    true => raw.to_string(),
                    false => format!("/{raw}"),
                };
                let paths = out.entry(port).or_default();
                if !paths.contains(&path) {
                    paths.push(path);
                }
            }
        }
    }
    out
}

fn env(name: &str, value: &str) -> EnvVar {
    env_var(name, value.to_string())
}

fn env_var(name: &str, value: String) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value),
        value_from: None,
    }
}

fn field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                api_version: None,
            }),
            ..Default::default()
        }),
    }
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn testdata(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata/inject")
            .join(name)
    }

    /// The pod as sent: every field, known or not.
    fn raw() -> Value {
        serde_yaml_ng::from_str(&std::fs::read_to_string(testdata("pod.yaml")).unwrap()).unwrap()
    }

    fn pod() -> Pod {
        serde_json::from_value(raw()).unwrap()
    }

    fn settings() -> Settings {
        let text = std::fs::read_to_string(testdata("settings.yaml")).unwrap();
        Settings::from_yaml(&text).unwrap()
    }

    fn namespace(labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> Namespace {
        let map = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        Namespace {
            name: "shop".into(),
            labels: map(labels),
            annotations: map(annotations),
        }
    }

    /// `raw`, injected as the webhook would: decided on the typed pod, patched raw.
    fn injected(raw: &Value, ns: &Namespace, settings: &Settings) -> Value {
        let pod: Pod = serde_json::from_value(raw.clone()).unwrap();
        let Decision::Inject(injection) = decide(&pod, ns, settings) else {
            panic!("not injected");
        };
        let patch = injection.patch(raw);
        assert!(
            patch
                .0
                .iter()
                .all(|op| matches!(op, json_patch::PatchOperation::Add(_))),
            "injection only adds: {patch:?}"
        );
        let mut after = raw.clone();
        json_patch::patch(&mut after, &patch).unwrap();
        after
    }

    /// Compares `pod` with the golden file `name` (`REMORA_BLESS=1` rewrites it).
    fn golden(name: &str, pod: &Value) {
        remora_fake_kube::assert_golden(&testdata(name), &serde_yaml_ng::to_string(pod).unwrap());
    }

    #[test]
    fn a_namespace_that_asks_gets_a_native_sidecar_and_keeps_every_field() {
        let ns = namespace(
            &[(INJECT, "enabled")],
            &[(annotations::DEFAULT_INBOUND_POLICY, "deny")],
        );
        let after = injected(&raw(), &ns, &settings());
        golden("pod.native.yaml", &after);
        let inits = after["spec"]["initContainers"].as_array().unwrap();
        let names: Vec<_> = inits.iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(names, [INIT_CONTAINER, PROXY_CONTAINER, "migrate"]);
        // Fields these types do not know stay with their owners.
        assert_eq!(inits[2]["futureField"], "kept");
        assert!(inits[..2].iter().all(|c| c.get("futureField").is_none()));
        assert_eq!(after["spec"]["futureField"], "kept");
        // Injecting again changes nothing.
        let again: Pod = serde_json::from_value(after).unwrap();
        assert_eq!(
            decide(&again, &ns, &settings()),
            Decision::Skip("already injected".into())
        );
    }

    #[test]
    fn without_native_sidecars_the_proxy_is_the_first_container() {
        let settings = Settings {
            native_sidecar: false,
            ..settings()
        };
        let mut before = raw();
        before["metadata"]["labels"][INJECT] = "enabled".into();
        // A pod with no volumes, labels or init containers of its own gets them made.
        before["spec"]
            .as_object_mut()
            .unwrap()
            .remove("initContainers");
        let after = injected(&before, &namespace(&[], &[]), &settings);
        golden("pod.legacy.yaml", &after);
        let first = &after["spec"]["containers"][0];
        assert_eq!(first["name"], PROXY_CONTAINER);
        assert_eq!(after["spec"]["initContainers"][0]["name"], INIT_CONTAINER);
    }

    #[test]
    fn image_pull_secrets_are_added_where_the_pod_lacks_them() {
        let settings = Settings {
            image_pull_secrets: vec!["regcred".into(), "mirror".into()],
            ..settings()
        };
        let ns = namespace(&[(INJECT, "enabled")], &[]);
        // A pod without any: the list is made.
        let after = injected(&raw(), &ns, &settings);
        assert_eq!(
            after["spec"]["imagePullSecrets"],
            serde_json::json!([{"name": "regcred"}, {"name": "mirror"}])
        );
        // A pod with one of them, and its own: only the missing one is added, last.
        let mut before = raw();
        before["spec"]["imagePullSecrets"] =
            serde_json::json!([{"name": "own"}, {"name": "mirror"}]);
        let after = injected(&before, &ns, &settings);
        assert_eq!(
            after["spec"]["imagePullSecrets"],
            serde_json::json!([{"name": "own"}, {"name": "mirror"}, {"name": "regcred"}])
        );
    }

    #[test]
    fn settings_that_would_break_pods_are_refused_by_name() {
        let text = std::fs::read_to_string(testdata("settings.yaml")).unwrap();
        let typo = text.replace("logLevel:", "loglevel:");
        let err = Settings::from_yaml(&typo).unwrap_err();
        assert!(err.contains("unknown field `loglevel`"), "{err}");
        let err =
            Settings::from_yaml("proxyImage: x\ndefaultInboundPolicy: sometimes\n").unwrap_err();
        for part in ["trustAnchors", "defaultInboundPolicy \"sometimes\""] {
            assert!(err.contains(part), "{part}: {err}");
        }
        let err = Settings::from_yaml(&text.replace("https://", "http://")).unwrap_err();
        assert!(err.contains("controllerAddr"), "{err}");
    }

    #[test]
    fn who_is_left_alone() {
        let settings = settings();
        let enabled = namespace(&[(INJECT, "enabled")], &[]);
        let with = |f: &dyn Fn(&mut Pod)| {
            let mut p = pod();
            f(&mut p);
            p
        };
        let opted_out = with(&|p| {
            p.metadata
                .annotations
                .as_mut()
                .unwrap()
                .insert(INJECT.into(), "disabled".into());
        });
        let host = with(&|p| p.spec.as_mut().unwrap().host_network = Some(true));
        let mesh = Namespace {
            name: "remora-system".into(),
            ..enabled.clone()
        };
        let system = Namespace {
            name: "kube-system".into(),
            ..enabled.clone()
        };
        let cases = [
            (pod(), namespace(&[], &[]), "neither"),
            (opted_out, enabled.clone(), "opts out"),
            (host, enabled.clone(), "hostNetwork"),
            (pod(), mesh, "never injected"),
            (pod(), system, "never injected"),
        ];
        for (p, ns, why) in cases {
            match decide(&p, &ns, &settings) {
                Decision::Skip(reason) => assert!(reason.contains(why), "{reason}"),
                Decision::Inject(_) => panic!("{why}: injected"),
            }
        }
    }
}
