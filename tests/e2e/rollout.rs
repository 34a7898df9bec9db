//! A rolling restart in Kubernetes' order, under load, between meshed pods: each old
//! endpoint gets its replacement, then SIGTERM, and a second later leaves the Service's
//! endpoints. No request may fail, neither the clients' nor those the terminating pods'
//! apps make. The proxies speak mTLS over shared HTTP/2 connections, so a terminating
//! proxy's GOAWAY is part of what is tested; and the EndpointSlice names no `targetRef`,
//! as some controllers write it, so each endpoint's identity comes from the pod at its
//! address (issue 12).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use http::Request;
use http_body_util::BodyExt;
use remora_tests::{
    Binaries, Cluster, Pod, backend,
    client::{self, metrics, sample},
    e2e_enabled, eventually,
    mesh::{Control, pod_object, spiffe},
    write_atomically,
};

const CLUSTER_IP: &str = "10.96.0.10:80";
const OLD: [(&str, &str); 3] = [
    ("old1", "10.77.0.11"),
    ("old2", "10.77.0.12"),
    ("old3", "10.77.0.13"),
];
const NEW: [(&str, &str); 3] = [
    ("new1", "10.77.0.21"),
    ("new2", "10.77.0.22"),
    ("new3", "10.77.0.23"),
];

/// The Service `web` over `endpoints`.
fn service(endpoints: &[&str]) -> String {
    let mut yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
         spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}]}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}\n\
         addressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n"
        .to_string();
    for ip in endpoints {
        yaml.push_str(&format!(
            "  - {{addresses: [\"{ip}\"], conditions: {{ready: true}}}}\n"
        ));
    }
    yaml
}

/// One GET to the Service from `pod`: its status, or 0 without an answer in time.
async fn get(pod: &Pod) -> u16 {
    let call = async {
        let mut h1 = client::http1(pod, CLUSTER_IP.parse()?).await?;
        let req = Request::get("/work")
            .header("host", "web.shop.svc.cluster.local")
            .body(client::empty())?;
        let rsp = h1.send_request(req).await?;
        let status = rsp.status().as_u16();
        rsp.into_body().collect().await?;
        anyhow::Ok(status)
    };
    match tokio::time::timeout(Duration::from_secs(5), call).await {
        Ok(Ok(status)) => status,
        _ => 0,
    }
}

/// Issue 12: on SIGTERM the proxy closed its listeners at once and ended its HTTP/2
/// connections; Kubernetes removes the endpoint about when it sends SIGTERM, so every
/// rollout failed requests (about 300 a run with SIGTERM 1 s before the removal), and
/// the app's own calls during its shutdown were refused (307 of 400).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_loses_no_request() -> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    let roles = [("client", "10.77.0.1"), ("ctl", "10.77.0.100")];
    let cluster = Cluster::new(&[&roles[..], &OLD[..], &NEW[..]].concat());
    let sa = |role: &str| if role == "client" { "client" } else { "web" };
    let pods: String = OLD
        .iter()
        .chain(&NEW)
        .chain(&roles[..1])
        .map(|(role, ip)| pod_object(&cluster.pod(role).name, role, ip, sa(role)))
        .collect();
    let control = Control::start(&bins, &cluster, "24h", &["client", "web"], &pods).await;
    let objects = control.objects.clone();
    let olds: Vec<&str> = OLD.iter().map(|(_, ip)| *ip).collect();
    write_atomically(&objects, "web.yaml", &service(&olds));
    let mut proxies = std::collections::HashMap::new();
    let mut faults = std::collections::HashMap::new();
    for (role, ip) in OLD.iter().chain(&NEW).chain(&roles[..1]) {
        let pod = cluster.pod(role);
        if *role != "client" {
            faults.insert(*role, backend::faulty(pod, "0.0.0.0:8080".parse()?));
        }
        let shutdown = [
            ("REMORA_SHUTDOWN_DELAY", "3s"),
            ("REMORA_SHUTDOWN_GRACE_PERIOD", "20s"),
        ];
        let proxy = control.proxy(&bins, pod, ip, sa(role), &shutdown).await;
        proxies.insert(*role, proxy);
    }

    // 100 requests a second from the client pod, for the whole rollout.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let client = Pod::borrowed(cluster.pod("client").name.clone(), cluster.pod("client").ip);
        let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut calls = Vec::new();
            while !stop.load(Relaxed) {
                tick.tick().await;
                let (pod, sent, failed) = (
                    Pod::borrowed(client.name.clone(), client.ip),
                    sent.clone(),
                    failed.clone(),
                );
                calls.push(tokio::spawn(async move {
                    sent.fetch_add(1, Relaxed);
                    let status = get(&pod).await;
                    if status != 200 {
                        failed.fetch_add(1, Relaxed);
                        eprintln!("a request failed: status {status}");
                    }
                }));
            }
            for c in calls {
                let _ = c.await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Kubernetes' order, one pod at a time: the replacement is ready and listed; the old
    // pod gets SIGTERM; a second later it leaves the endpoints.
    let mut listed: Vec<&str> = olds.clone();
    for (i, (old, old_ip)) in OLD.iter().enumerate() {
        listed.push(NEW[i].1);
        write_atomically(&objects, "web.yaml", &service(&listed));
        tokio::time::sleep(Duration::from_secs(1)).await;
        proxies[old].terminate();
        // The terminating pod's app goes on calling out while it winds down.
        let old_pod = Pod::borrowed(cluster.pod(old).name.clone(), cluster.pod(old).ip);
        let own_calls = tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..20 {
                statuses.push(get(&old_pod).await);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            statuses
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        listed.retain(|ip| ip != old_ip);
        write_atomically(&objects, "web.yaml", &service(&listed));
        let statuses = own_calls.await?;
        assert!(
            statuses.iter().all(|s| *s == 200),
            "{old}'s app had calls fail during its shutdown: {statuses:?}"
        );
        let proxy = proxies.get_mut(old).expect("the old proxy");
        assert_eq!(
            proxy.wait(Duration::from_secs(20)).await,
            Some(0),
            "{old}'s proxy exits cleanly once drained"
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Relaxed);
    load.await?;
    let (sent, failed) = (sent.load(Relaxed), failed.load(Relaxed));
    assert!(sent >= 1000, "{sent} requests sent");
    assert_eq!(
        failed, 0,
        "{failed} of {sent} requests failed during the rollout"
    );
    let served_by_new: u64 = NEW.iter().map(|(r, _)| faults[r].gets.load(Relaxed)).sum();
    assert!(served_by_new > 0, "the replacements served nothing");
    // Every request went over mTLS to the `web` identity, found by address.
    let outbound = [("direction", "outbound"), ("target", "web.shop:80")];
    let web = spiffe("web");
    let mtls_labels = [&outbound[..], &[("tls", "true"), ("peer_identity", &web)]].concat();
    let (mut mtls, mut all, mut text) = (0.0, 0.0, String::new());
    // A response is counted when its stream ends, a moment after the client read it.
    eventually("every request counted", async || {
        text = metrics(cluster.pod("client")).await;
        mtls = sample(&text, "remora_http_requests_total", &mtls_labels);
        all = sample(&text, "remora_http_requests_total", &outbound);
        if all >= sent as f64 {
            Ok(())
        } else {
            Err(format!("{all} counted for {sent} sent\n{text}"))
        }
    })
    .await;
    eprintln!("{sent} requests sent, {failed} failed; {mtls} of {all} over mTLS to {web}");
    assert_eq!(mtls, all, "requests without mTLS to {web}\n{text}");
    Ok(())
}
