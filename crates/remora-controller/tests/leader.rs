//! Two real `remora-controller` processes against one fake API server: exactly one (the
//! Lease's holder) writes statuses; killed with SIGKILL (no chance to give the Lease
//! up), it is replaced by the other once the Lease expires, which then writes the
//! statuses that were missed.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use remora_fake_kube::FakeApi;
use serde_json::{Value, json};

const LEASE: Duration = Duration::from_secs(3);

struct Controller {
    child: Child,
    token: String,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(fake: &FakeApi, dir: &Path, name: &str) -> Controller {
    let token = format!("token-{name}");
    let kubeconfig = dir.join(format!("{name}.kubeconfig"));
    std::fs::write(&kubeconfig, fake.kubeconfig(&token)).unwrap();
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_remora-controller"))
        .args([
            "--source",
            "kube",
            "--grpc-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .arg("--dev-ca")
        .arg(dir.join(format!("ca-{name}")))
        .args(["--lease-duration", &format!("{}s", LEASE.as_secs())])
        .args(["--pod-name", name])
        .env("KUBECONFIG", &kubeconfig)
        .env("REMORA_LOG", "info,remora_controller=debug")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("the controller binary runs");
    Controller { child, token }
}

fn policy(name: &str) -> Value {
    json!({"apiVersion": "policy.remora.io/v1alpha1", "kind": "TrafficPolicy",
        "metadata": {"name": name, "namespace": "shop", "generation": 1},
        "spec": {"targetRef": {"name": "web"}, "timeouts": {"request": "3s"}}})
}

/// Who wrote a status for `name` (their tokens), waiting up to `within` for one.
async fn status_writers(fake: &FakeApi, name: &str, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    loop {
        let writers: Vec<String> = fake
            .writes()
            .into_iter()
            .filter(|w| w.status && w.name == name)
            .filter_map(|w| w.token)
            .collect();
        if !writers.is_empty() || Instant::now() > deadline {
            return writers;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn holder(fake: &FakeApi) -> Option<String> {
    let lease = fake.get(
        "coordination.k8s.io/v1",
        "Lease",
        "remora-system",
        "remora-controller",
    )?;
    lease["spec"]["holderIdentity"].as_str().map(str::to_string)
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("remora-leader-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_writes_statuses_and_another_takes_over_when_it_dies() {
    let fake = FakeApi::start().await;
    let dir = tempdir();
    fake.apply(policy("first"));
    let mut a = start(&fake, &dir, "a");
    let mut b = start(&fake, &dir, "b");

    // One of them leads and writes the status; the other writes nothing.
    let writers = status_writers(&fake, "first", Duration::from_secs(30)).await;
    assert_eq!(
        writers.len(),
        1,
        "written once, by one replica: {writers:?}"
    );
    let leader_token = writers[0].clone();
    let leader_name = holder(&fake).expect("a Lease holder");
    assert_eq!(format!("token-{leader_name}"), leader_token);
    fake.apply(policy("second"));
    let writers = status_writers(&fake, "second", Duration::from_secs(15)).await;
    assert_eq!(writers, std::slice::from_ref(&leader_token));
    // Both replicas lived through it, each serving: the follower wrote no status.
    tokio::time::sleep(LEASE).await;
    let all: Vec<String> = fake
        .writes()
        .into_iter()
        .filter(|w| w.status)
        .filter_map(|w| w.token)
        .collect();
    assert!(
        all.iter().all(|t| *t == leader_token),
        "only the leader wrote: {all:?}"
    );

    // The leader dies without giving the Lease up.
    let (dead, survivor) = match leader_name.as_str() {
        "a" => (&mut a, &b),
        _ => (&mut b, &a),
    };
    assert_eq!(dead.token, leader_token);
    dead.child.kill().unwrap();
    dead.child.wait().unwrap();
    let killed = Instant::now();
    fake.apply(policy("third"));

    // The survivor takes the Lease once it expires (renewals come every third of it)
    // and writes the missed status.
    let writers = status_writers(&fake, "third", Duration::from_secs(30)).await;
    let took = killed.elapsed();
    assert_eq!(
        writers,
        std::slice::from_ref(&survivor.token),
        "the survivor wrote it"
    );
    assert_eq!(
        holder(&fake),
        Some(survivor.token.trim_start_matches("token-").to_string())
    );
    assert!(
        took < LEASE + LEASE + Duration::from_secs(5),
        "handed over in {took:?} with a {LEASE:?} Lease"
    );
    let lease = fake
        .get(
            "coordination.k8s.io/v1",
            "Lease",
            "remora-system",
            "remora-controller",
        )
        .unwrap();
    assert!(
        lease["spec"]["leaseTransitions"].as_i64().unwrap() >= 1,
        "{lease}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
