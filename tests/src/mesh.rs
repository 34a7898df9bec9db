//! An mTLS mesh for end-to-end tests: a controller pod with a development CA, static
//! tokens and a `dir:` folder, and three meshed pods (`frontend`, `other`, and `web`
//! serving the Service `web.shop` on `10.96.0.10:80`), each with real iptables rules and
//! a proxy certified as its own ServiceAccount.

use std::{path::PathBuf, process::Command};

use crate::{Binaries, Cluster, Pod, Proxy, backend, write_atomically};

pub const CLUSTER_IP: &str = "10.96.0.10:80";
pub const WEB_IP: &str = "10.77.0.11";
pub const CONTROLLER: &str = "https://10.77.0.100:8086";
pub const ROLES: [(&str, &str, &str); 3] = [
    ("frontend", "10.77.0.1", "frontend"),
    ("other", "10.77.0.2", "other"),
    ("web", WEB_IP, "web"),
];
/// What `/hello` answers: the plaintext a capture must never show.
pub const MARKER: &str = "hello from the backend";

pub fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/shop/sa/{sa}")
}

/// The Service over `web`, and the three pods, as `kubectl apply` takes them.
pub fn objects(cluster: &Cluster) -> String {
    let web = &cluster.pod("web").name;
    let mut out = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\n\
         spec: {{clusterIP: 10.96.0.10, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n\
         - {{addresses: [\"{WEB_IP}\"], conditions: {{ready: true}}, targetRef: {{kind: Pod, name: {web}}}}}\n"
    );
    for (role, ip, sa) in ROLES {
        out.push_str(&pod_object(&cluster.pod(role).name, role, ip, sa));
    }
    out
}

/// A meshed pod in `shop` (labelled `app: role`) as the controller's index reads it,
/// after a `---`.
pub fn pod_object(name: &str, role: &str, ip: &str, sa: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, \
         labels: {{app: {role}, remora.io/meshed: \"true\"}}}}\n\
         spec: {{serviceAccountName: {sa}, containers: [{{name: app, ports: [{{containerPort: 8080}}, {{containerPort: 7001}}]}}]}}\n\
         status: {{podIP: {ip}}}\n"
    )
}

/// An AuthorizationPolicy letting only `sa` call `web`.
pub fn allow_only(sa: &str) -> String {
    format!(
        "apiVersion: policy.remora.io/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {{name: web-callers, namespace: shop}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: web}}}}\n\
         \x20 from:\n  - identities: [\"{}\"]\n",
        spiffe(sa)
    )
}

/// A controller in a cluster's `ctl` pod (10.77.0.100) with a development CA, static
/// tokens (`{sa}-token` for each ServiceAccount it was given) and a `dir:` folder.
pub struct Control {
    /// The controller's `dir:` folder.
    pub objects: PathBuf,
    /// The controller's CA folder (`--dev-ca`): `issuer.pem`, `issuer.key`,
    /// `trust-anchors.pem`, re-read as they change.
    pub ca: PathBuf,
    pub controller: Proxy,
    root: PathBuf,
    anchors: String,
}

impl Control {
    /// Starts the controller over `objects` (written first as `shop.yaml`), issuing
    /// certificates that live `lifetime` to the ServiceAccounts `sas` of `shop`.
    pub async fn start(
        bins: &Binaries,
        cluster: &Cluster,
        lifetime: &str,
        sas: &[&str],
        objects: &str,
    ) -> Self {
        let root = bins.dir().join(format!("mesh-{lifetime}"));
        let ca = root.join("ca");
        let folder = root.join("objects");
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::create_dir_all(&ca).unwrap();
        // The controller and proxies run as UID 2102: let them write the CA folder.
        Command::new("chown")
            .args(["-R", "2102:2102"])
            .arg(&root)
            .status()
            .unwrap();
        let mut tokens = String::new();
        for sa in sas {
            tokens.push_str(&format!(
                "- {{token: {sa}-token, namespace: shop, serviceAccount: {sa}}}\n"
            ));
            std::fs::write(root.join(format!("{sa}.token")), format!("{sa}-token\n")).unwrap();
        }
        std::fs::write(root.join("tokens.yaml"), tokens).unwrap();
        write_atomically(&folder, "shop.yaml", objects);

        let source = format!("dir:{}", folder.display());
        let dev_ca = ca.display().to_string();
        let token_validator = format!("static:{}", root.join("tokens.yaml").display());
        let args = [
            "--source",
            &source,
            "--dev-ca",
            &dev_ca,
            "--token-validator",
            &token_validator,
            "--cert-lifetime",
            lifetime,
            "--log",
            "info,remora_controller=debug",
        ];
        let controller = Proxy::controller(cluster.pod("ctl"), bins, &args).await;
        // Inline, as the injector sets them (identity.rs covers the file).
        let anchors = std::fs::read_to_string(ca.join("trust-anchors.pem")).unwrap();
        Self {
            objects: folder,
            ca,
            controller,
            root,
            anchors,
        }
    }

    /// Intercepts `pod` (at `ip`) and starts its proxy running as `sa`, given what the
    /// injector gives it to be certified and find the controller, and `extra` on top.
    pub async fn proxy(
        &self,
        bins: &Binaries,
        pod: &Pod,
        ip: &str,
        sa: &str,
        extra: &[(&str, &str)],
    ) -> Proxy {
        pod.intercept(bins);
        let token = self.root.join(format!("{sa}.token")).display().to_string();
        let mut env = vec![
            ("REMORA_CONTROLLER_ADDR", CONTROLLER),
            ("REMORA_NAMESPACE", "shop"),
            ("REMORA_POD_NAME", pod.name.as_str()),
            ("REMORA_POD_IP", ip),
            ("REMORA_SERVICE_ACCOUNT", sa),
            ("REMORA_TRUST_ANCHORS_PEM", self.anchors.as_str()),
            ("REMORA_IDENTITY_TOKEN_FILE", token.as_str()),
        ];
        env.extend_from_slice(extra);
        Proxy::start(pod, bins, &env).await
    }
}

pub struct Mesh {
    pub cluster: Cluster,
    /// The controller's `dir:` folder.
    pub objects: PathBuf,
    /// The controller's CA folder (`--dev-ca`): `issuer.pem`, `issuer.key`,
    /// `trust-anchors.pem`, re-read as they change.
    pub ca: PathBuf,
    pub controller: Proxy,
    /// The proxies of `ROLES`, in that order.
    pub proxies: Vec<Proxy>,
}

impl Mesh {
    /// The controller (dev CA, static tokens, certificates living `lifetime`) and the
    /// three pods, each intercepted, with its proxy certified and ready.
    pub async fn start(bins: &Binaries, lifetime: &str) -> Self {
        let roles: Vec<(&str, &str)> = ROLES
            .iter()
            .map(|(r, ip, _)| (*r, *ip))
            .chain([("ctl", "10.77.0.100")])
            .collect();
        let cluster = Cluster::new(&roles);
        let sas: Vec<&str> = ROLES.iter().map(|(_, _, sa)| *sa).collect();
        let control = Control::start(bins, &cluster, lifetime, &sas, &objects(&cluster)).await;
        let mut proxies = Vec::new();
        for (role, ip, sa) in ROLES {
            proxies.push(control.proxy(bins, cluster.pod(role), ip, sa, &[]).await);
        }
        let web = cluster.pod("web");
        let _ = backend::http(web, "0.0.0.0:8080".parse().unwrap());
        backend::echo(web, "0.0.0.0:7001".parse().unwrap());
        let Control {
            objects,
            ca,
            controller,
            ..
        } = control;
        Self {
            cluster,
            objects,
            ca,
            controller,
            proxies,
        }
    }
}
