//! Table tests over real k8s-openapi objects (written as the YAML `kubectl apply` takes).

use super::*;
use crate::source::yaml;

const OBJECTS: &str = r#"
apiVersion: v1
kind: Service
metadata: { name: web, namespace: shop }
spec:
  clusterIPs: ["10.96.0.10", "fd00::10"]
  ports:
    - { name: http, port: 80, targetPort: http, appProtocol: http }
    - { name: admin, port: 9000, targetPort: 9001 }
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: { name: web-a, namespace: shop, labels: { kubernetes.io/service-name: web } }
addressType: IPv4
ports: [ { name: http, port: 8080 }, { name: admin, port: 9001 } ]
endpoints:
  - addresses: ["10.0.0.1"]
    conditions: { ready: true }
    targetRef: { kind: Pod, name: web-1 }
    zone: zone-a
  - addresses: ["10.0.0.2"]
    conditions: { ready: false, serving: false }
    targetRef: { kind: Pod, name: web-2 }
  - addresses: ["10.0.0.3"]
    conditions: { ready: false, serving: true, terminating: true }
    targetRef: { kind: Pod, name: web-3 }
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: { name: web-b, namespace: shop, labels: { kubernetes.io/service-name: web } }
addressType: IPv4
ports: [ { name: http, port: 8080 }, { name: admin, port: 9001 } ]
endpoints:
  - addresses: ["10.0.0.4"]
    targetRef: { kind: Pod, name: web-4 }
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: { name: web-v6, namespace: shop, labels: { kubernetes.io/service-name: web } }
addressType: IPv6
ports: [ { name: http, port: 8080 } ]
endpoints:
  - addresses: ["fd00::1"]
    targetRef: { kind: Pod, name: web-1 }
---
apiVersion: v1
kind: Pod
metadata: { name: web-1, namespace: shop, labels: { remora.io/meshed: "true" } }
spec: { serviceAccountName: web, containers: [] }
status: { podIP: 10.0.0.1, podIPs: [ { ip: 10.0.0.1 }, { ip: "fd00::1" } ] }
---
apiVersion: v1
kind: Pod
metadata: { name: web-4, namespace: shop }
spec: { containers: [] }
status: { podIP: 10.0.0.4 }
---
apiVersion: v1
kind: Service
metadata: { name: db, namespace: shop }
spec:
  clusterIP: None
  ports: [ { port: 5432 } ]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: { name: db-x, namespace: shop, labels: { kubernetes.io/service-name: db } }
addressType: IPv4
ports: [ { port: 5432 } ]
endpoints:
  - addresses: ["10.0.1.1"]
    conditions: { ready: false, serving: true, terminating: true }
"#;

fn index() -> Index {
    Index::from_yaml(OBJECTS)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Each endpoint's address and readiness.
type Seen = Vec<(String, bool)>;

fn endpoints(r: &Resolution) -> Seen {
    match r {
        Resolution::Known { endpoints, .. } => endpoints
            .values()
            .map(|e| (e.addr.to_string(), e.ready))
            .collect(),
        Resolution::Unknown => panic!("unknown"),
    }
}

fn svc(ns: &str, name: &str, port: u16) -> Target {
    Target::Service {
        id: NsName::new(ns, name),
        port,
    }
}

#[test]
fn resolutions() {
    let index = index();
    let ready = |a: &str| (a.to_string(), true);
    let cases: Vec<(&str, Target, Seen)> = vec![
        // Named targetPort through the slices' port names; ready from both slices; the
        // not-serving endpoint dropped; the terminating one held back while others are ready.
        (
            "by name",
            svc("shop", "web", 80),
            vec![
                ready("10.0.0.1:8080"),
                ready("10.0.0.4:8080"),
                ready("[fd00::1]:8080"),
            ],
        ),
        (
            "second port",
            svc("shop", "web", 9000),
            vec![ready("10.0.0.1:9001"), ready("10.0.0.4:9001")],
        ),
        (
            "v4 ClusterIP keeps v4",
            Target::Addr(addr("10.96.0.10:80")),
            vec![ready("10.0.0.1:8080"), ready("10.0.0.4:8080")],
        ),
        (
            "v6 ClusterIP keeps v6",
            Target::Addr(addr("[fd00::10]:80")),
            vec![ready("[fd00::1]:8080")],
        ),
        (
            "pod IP",
            Target::Addr(addr("10.0.0.4:8080")),
            vec![ready("10.0.0.4:8080")],
        ),
        // Only terminating endpoints: offered, not ready.
        (
            "terminating only",
            svc("shop", "db", 5432),
            vec![("10.0.1.1:5432".into(), false)],
        ),
    ];
    for (what, target, want) in cases {
        assert_eq!(endpoints(&index.resolve(&target)), want, "{what}");
    }
    assert_eq!(
        index.resolve(&Target::Addr(addr("10.96.0.99:80"))),
        Resolution::Unknown
    );
    assert_eq!(
        index.resolve(&svc("shop", "web", 81)),
        Resolution::Unknown,
        "not a Service port"
    );
    assert_eq!(index.resolve(&svc("shop", "nope", 80)), Resolution::Unknown);
}

#[test]
fn identities_labels_and_target_facts() {
    let index = index();
    let Resolution::Known {
        service,
        protocol,
        headless,
        endpoints,
    } = index.resolve(&svc("shop", "web", 80))
    else {
        panic!()
    };
    assert_eq!(
        (service.as_str(), protocol, headless),
        ("web.shop:80", Protocol::Http1, false)
    );
    let meshed = &endpoints[&addr("10.0.0.1:8080")];
    let id = meshed
        .identity
        .as_ref()
        .expect("meshed pod has an identity");
    assert_eq!(id.spiffe_id, "spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(
        id.server_name,
        "web.shop.serviceaccount.identity.cluster.local"
    );
    assert_eq!(meshed.zone.as_deref(), Some("zone-a"));
    let plain = &endpoints[&addr("10.0.0.4:8080")];
    assert!(
        plain.identity.is_none(),
        "a pod without the proxy gets no identity"
    );
    assert_eq!(plain.labels["serviceaccount"], "default");
    let Resolution::Known { headless, .. } = index.resolve(&svc("shop", "db", 5432)) else {
        panic!()
    };
    assert!(headless);
}

#[test]
fn changes_touch_what_depends_on_them() {
    let mut index = index();
    let web = svc("shop", "web", 80);
    let cluster_ip = Target::Addr(addr("10.96.0.10:80"));
    let pod = Target::Addr(addr("10.0.0.4:8080"));

    // Removing a slice touches its Service, by name and by ClusterIP, not the pod target.
    let mut t = Touched::default();
    index.apply(
        Event::Delete(ObjectKey {
            kind: Kind::Slice,
            id: NsName::new("shop", "web-b"),
        }),
        &mut t,
    );
    assert!(index.affects(&web, &t) && index.affects(&cluster_ip, &t) && !index.affects(&pod, &t));
    assert_eq!(
        endpoints(&index.resolve(&web)),
        vec![
            ("10.0.0.1:8080".into(), true),
            ("[fd00::1]:8080".into(), true)
        ]
    );

    // With no ready endpoint left, the terminating one is offered.
    let mut t = Touched::default();
    index.apply(
        Event::Delete(ObjectKey {
            kind: Kind::Slice,
            id: NsName::new("shop", "web-v6"),
        }),
        &mut t,
    );
    let slice = yaml::parse(
        "x",
        r#"{apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {name: web-a, namespace: shop, labels: {kubernetes.io/service-name: web}}, addressType: IPv4, ports: [{name: http, port: 8080}], endpoints: [{addresses: ["10.0.0.3"], conditions: {ready: false, serving: true, terminating: true}}]}"#,
    )
    .unwrap();
    index.apply(Event::Apply(slice.into_iter().next().unwrap()), &mut t);
    assert_eq!(
        endpoints(&index.resolve(&web)),
        vec![("10.0.0.3:8080".into(), false)]
    );

    // A pod that becomes meshed touches the Services whose slices name it.
    let mut index = self::index();
    let mut t = Touched::default();
    let meshed = yaml::parse(
        "x",
        "{apiVersion: v1, kind: Pod, metadata: {name: web-4, namespace: shop, labels: {remora.io/meshed: 'true'}}, spec: {containers: [], serviceAccountName: web}, status: {podIP: 10.0.0.4}}",
    )
    .unwrap();
    index.apply(Event::Apply(meshed.into_iter().next().unwrap()), &mut t);
    assert!(index.affects(&web, &t) && index.affects(&pod, &t));
    let Resolution::Known { endpoints, .. } = index.resolve(&web) else {
        panic!()
    };
    assert!(endpoints[&addr("10.0.0.4:8080")].identity.is_some());

    // Deleting the Service: unknown again, its ClusterIP too.
    let mut t = Touched::default();
    index.apply(
        Event::Delete(ObjectKey {
            kind: Kind::Service,
            id: NsName::new("shop", "web"),
        }),
        &mut t,
    );
    assert!(index.affects(&cluster_ip, &t));
    assert_eq!(index.resolve(&cluster_ip), Resolution::Unknown);
}

#[test]
fn malformed_objects_are_refused_with_the_reason() {
    let cases = [
        (
            "{apiVersion: v1, kind: Service, metadata: {namespace: a}}",
            "metadata.name is missing",
        ),
        (
            "{apiVersion: v1, kind: Service, metadata: {name: s}, spec: {clusterIP: 999.1.1.1}}",
            "is not an IP address",
        ),
        (
            "{apiVersion: v1, kind: Service, metadata: {name: s}, spec: {ports: [{port: 70000}]}}",
            "not between 1 and 65535",
        ),
        (
            "{apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {name: e}, addressType: IPv4, endpoints: []}",
            "kubernetes.io/service-name",
        ),
        ("{kind: Service}", "apiVersion and kind are required"),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: [\n",
            "line",
        ),
    ];
    for (text, want) in cases {
        let err = yaml::parse("bad.yaml", text).unwrap_err().to_string();
        assert!(
            err.contains(want) && err.starts_with("bad.yaml"),
            "{text}: {err}"
        );
    }
    // Kinds the index does not use are skipped; a policy without its spec is refused.
    assert!(
        yaml::parse(
            "x",
            "{apiVersion: apps/v1, kind: Deployment, metadata: {name: d}}"
        )
        .unwrap()
        .is_empty()
    );
    let err = yaml::parse(
        "x",
        "{apiVersion: policy.remora.io/v1alpha1, kind: TrafficPolicy, metadata: {name: t}}",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("missing field `spec`"), "{err}");
}

/// Issue 12: an EndpointSlice endpoint without `targetRef` that is a meshed pod's IP got
/// plaintext (no identity), while the same pod addressed by IP got mTLS.
#[test]
fn an_endpoint_without_target_ref_is_the_pod_at_its_address() {
    let objects = r#"
apiVersion: v1
kind: Service
metadata: { name: api, namespace: shop }
spec: { clusterIP: 10.96.0.30, ports: [ { port: 80, targetPort: 8080 } ] }
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: { name: api-1, namespace: shop, labels: { kubernetes.io/service-name: api } }
addressType: IPv4
ports: [ { port: 8080 } ]
endpoints:
  - addresses: ["10.0.2.1"]
  - addresses: ["10.0.2.2"]
"#;
    let pod = r#"
apiVersion: v1
kind: Pod
metadata: { name: api-1, namespace: shop, labels: { remora.io/meshed: "true" } }
spec: { serviceAccountName: api, containers: [] }
status: { podIP: 10.0.2.1 }
"#;
    let identities = |index: &Index| match index.resolve(&svc("shop", "api", 80)) {
        Resolution::Known { endpoints, .. } => endpoints
            .values()
            .map(|e| e.identity.as_ref().map(|i| i.spiffe_id.clone()))
            .collect::<Vec<_>>(),
        Resolution::Unknown => panic!("unknown"),
    };
    let mut index = Index::from_yaml(objects);
    assert_eq!(identities(&index), [None, None], "no pod known yet");
    // The pod arriving later touches the Service, and its address gets its identity.
    let mut touched = Touched::default();
    for object in yaml::parse("pod.yaml", pod).unwrap() {
        index.apply(Event::Apply(object), &mut touched);
    }
    assert!(index.affects(&svc("shop", "api", 80), &touched));
    assert_eq!(
        identities(&index),
        [
            Some("spiffe://cluster.local/ns/shop/sa/api".to_string()),
            None
        ]
    );
}
