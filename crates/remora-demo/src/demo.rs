//! `make demo`: the mesh on this machine, in five acts, with a live table of what the
//! proxies count (the code of `remora stat`) and a summary at the end.

use std::{
    collections::{BTreeMap, VecDeque},
    io::IsTerminal,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context;
use nix::sys::signal::Signal;
use remora_cli::stat::{self, Kind, Row, Scrape};
use serde::Serialize;

use crate::{
    cluster::{self, CONTROLLER_IP, CONTROLLER_POD, Machine, NAMESPACE, PREFIX, Plan},
    load::{self, Tally},
};

/// The manifests the demo runs, as `kubectl apply` would take them.
pub const MANIFESTS: &str = include_str!("../../../deploy/demo/demo.yaml");
const CANARY_10: &str = include_str!("../../../deploy/demo/canary-10.yaml");
const CANARY_50: &str = include_str!("../../../deploy/demo/canary-50.yaml");
const DENY_INTRUDER: &str = include_str!("../../../deploy/demo/deny-intruder.yaml");

/// The pods the acts name.
const CALLER: &str = "web-1";
const INTRUDER: &str = "intruder-1";
const FAULTY: &str = "api-2";
const CANARY_PREFIX: &str = "api-v2-";
/// The Service the callers call.
const SERVICE: &str = "api";
/// The shortest run whose acts each last long enough to judge.
pub const MIN_DURATION: Duration = Duration::from_secs(15);
/// How long after a change its effect is judged: the controller's folder poll and the
/// stream to the proxies take well under it.
const SETTLE: Duration = Duration::from_secs(1);
/// The table's window.
const WINDOW: Duration = Duration::from_secs(5);

pub struct Options {
    pub duration: Duration,
    /// Keep the demo's folder (logs, objects) after it ends.
    pub keep_files: bool,
}

/// The figures the demo ends with.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub duration_seconds: f64,
    /// What web's application saw, the whole run.
    pub web: Outcome,
    /// web, from the moment api-2 turned faulty to the end.
    pub during_fault: Outcome,
    /// web, while the controller was stopped.
    pub controller_down: Outcome,
    /// Responses over mTLS over all responses, as the proxies counted them (the lowest of
    /// web's calls to the api and what the api's pods served).
    pub mtls_share: Option<f64>,
    /// The share of web's successful requests api-v2 served, at each canary step.
    pub canary_10: Option<f64>,
    pub canary_50: Option<f64>,
    /// The intruder's requests the api allowed before the AuthorizationPolicy.
    pub intruder_allowed_before: u64,
    /// After it (once applied): refused with 403, and let through.
    pub intruder_refused_after: u64,
    pub intruder_allowed_after: u64,
    /// From web's proxy: retries made and endpoints ejected.
    pub retries: u64,
    pub ejections: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub requests: u64,
    pub succeeded: u64,
    pub success_rate: Option<f64>,
}

impl Outcome {
    fn of(t: &Tally) -> Self {
        let done = t.done();
        Self {
            requests: done,
            succeeded: t.ok(),
            success_rate: (done > 0).then(|| t.ok() as f64 / done as f64),
        }
    }
}

/// One step of the timeline, at a share of the run.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Step {
    Fault,
    Canary10,
    Canary50,
    DenyIntruder,
    StopController,
}

/// A moment the demo notes the apps' tallies (and the proxies' counters) at: each act,
/// once its change has settled (what the summary judges from), and when to tell what it
/// did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Mark {
    Fault,
    FaultTold,
    Canary10,
    Canary10Settled,
    Canary50,
    Canary50Settled,
    Deny,
    DenySettled,
    DenyTold,
    Controller,
    ControllerTold,
}

const ACTS: [(f64, Step); 5] = [
    (0.15, Step::Fault),
    (0.35, Step::Canary10),
    (0.50, Step::Canary50),
    (0.65, Step::DenyIntruder),
    (0.80, Step::StopController),
];

/// The binaries the demo runs, copied where the proxy's UID can run them.
struct Binaries {
    proxy: PathBuf,
    controller: PathBuf,
    init: PathBuf,
    demo: PathBuf,
}

impl Binaries {
    fn copy(to: &Path) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding remora-demo's own path")?;
        let built = exe.parent().context("remora-demo's folder")?;
        std::fs::create_dir_all(to)?;
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755))?;
        let copy = |name: &str| -> anyhow::Result<PathBuf> {
            let from = built.join(name);
            anyhow::ensure!(
                from.is_file(),
                "{} is missing: build it beside remora-demo (make demo does: cargo build \
                 --release -p remora-proxy -p remora-controller -p remora-init -p remora-demo)",
                from.display()
            );
            let dest = to.join(name);
            std::fs::copy(&from, &dest).with_context(|| format!("copying {name}"))?;
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755))?;
            Ok(dest)
        };
        Ok(Self {
            proxy: copy("remora-proxy")?,
            controller: copy("remora-controller")?,
            init: copy("remora-init")?,
            demo: copy("remora-demo")?,
        })
    }
}

/// What the screen shows: the narration so far and the latest table.
struct Screen {
    tty: bool,
    /// When the acts began; None while the pods are being set up.
    start: Option<Instant>,
    story: Vec<String>,
    last_table: Option<Instant>,
}

impl Screen {
    fn say(&mut self, text: &str) {
        let line = match self.start {
            Some(start) => format!("[{:>4.1}s] {text}", start.elapsed().as_secs_f64()),
            None => format!("[setup] {text}"),
        };
        if !self.tty {
            println!("{line}");
        }
        self.story.push(line);
    }

    fn elapsed(&self) -> Duration {
        self.start.map_or(Duration::ZERO, |s| s.elapsed())
    }

    fn show(&mut self, table: &str, duration: Duration) {
        if self.tty {
            let mut out = String::from("\x1b[2J\x1b[H");
            out.push_str(&format!(
                "Remora demo — {:.0}s of {:.0}s (Ctrl-C ends it and cleans up)\n\n",
                self.elapsed().as_secs_f64(),
                duration.as_secs_f64()
            ));
            for line in self.story.iter().rev().take(24).rev() {
                out.push_str(line);
                out.push('\n');
            }
            out.push('\n');
            out.push_str(table);
            print!("{out}");
        } else if self
            .last_table
            .is_none_or(|t| t.elapsed() >= WINDOW - Duration::from_millis(100))
        {
            self.last_table = Some(Instant::now());
            println!("{table}");
        }
    }
}

/// Runs the demo to its end; everything it made is removed before this returns.
pub async fn run(opts: Options) -> anyhow::Result<Summary> {
    let mut machine = Machine::new(opts.keep_files)?;
    let root = machine.root.clone();
    let bins = Binaries::copy(&root.join("bin"))?;
    let plan = cluster::plan(MANIFESTS).context("deploy/demo/demo.yaml")?;
    let mut screen = Screen {
        tty: std::io::stdout().is_terminal(),
        start: None,
        story: Vec::new(),
        last_table: None,
    };
    screen.say(&format!(
        "{} pods from deploy/demo/demo.yaml as network namespaces ({PREFIX}*), logs in {}",
        plan.pods.len(),
        root.join("logs").display()
    ));

    // The network, the controller's folder and credentials.
    let controller_netns = format!("{PREFIX}{CONTROLLER_POD}");
    let mut netns: Vec<(String, std::net::Ipv4Addr)> =
        plan.pods.iter().map(|p| (p.netns(), p.ip)).collect();
    netns.push((controller_netns.clone(), CONTROLLER_IP));
    machine.network(&netns, &plan.hosts())?;
    let objects = root.join("objects");
    let ca = root.join("ca");
    std::fs::create_dir_all(&objects)?;
    std::fs::create_dir_all(&ca)?;
    std::fs::create_dir_all(root.join("stats"))?;
    std::fs::write(objects.join("demo.yaml"), &plan.objects)?;
    let mut tokens = String::new();
    for sa in plan
        .pods
        .iter()
        .map(|p| p.service_account.as_str())
        .collect::<std::collections::BTreeSet<_>>()
    {
        tokens.push_str(&format!(
            "- {{token: {sa}-demo-token, namespace: {NAMESPACE}, serviceAccount: {sa}}}\n"
        ));
        std::fs::write(
            root.join(format!("{sa}.token")),
            format!("{sa}-demo-token\n"),
        )?;
    }
    std::fs::write(root.join("tokens.yaml"), tokens)?;
    chown_tree(&root, cluster::PROXY_UID.parse()?)?;

    // The controller: the folder, a development CA, static tokens.
    let args: Vec<String> = [
        "--source".to_string(),
        format!("dir:{}", objects.display()),
        "--dev-ca".into(),
        ca.display().to_string(),
        "--token-validator".into(),
        format!("static:{}", root.join("tokens.yaml").display()),
        "--log".into(),
        "warn".into(),
    ]
    .into();
    machine.spawn(
        "controller",
        &controller_netns,
        &bins.controller,
        &args,
        &[],
        true,
    )?;
    ready(&mut machine, &controller_netns, "127.0.0.1:9990").await?;
    screen.say("controller up: discovery, policy and certificates from the demo's objects");
    let anchors = std::fs::read_to_string(ca.join("trust-anchors.pem"))
        .context("the development CA's trust anchors")?;

    // Each pod: remora-init's rules, then the proxy, then the app.
    for pod in &plan.pods {
        machine.run(&pod.netns(), &bins.init, &[])?;
        let env: Vec<(String, String)> = [
            (
                "REMORA_CONTROLLER_ADDR",
                format!("https://{CONTROLLER_IP}:8086"),
            ),
            ("REMORA_NAMESPACE", NAMESPACE.to_string()),
            ("REMORA_POD_NAME", pod.name.clone()),
            ("REMORA_POD_IP", pod.ip.to_string()),
            ("REMORA_SERVICE_ACCOUNT", pod.service_account.clone()),
            ("REMORA_TRUST_ANCHORS_PEM", anchors.clone()),
            (
                "REMORA_IDENTITY_TOKEN_FILE",
                root.join(format!("{}.token", pod.service_account))
                    .display()
                    .to_string(),
            ),
            ("REMORA_LOG", "warn".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        machine.spawn(
            &format!("proxy-{}", pod.name),
            &pod.netns(),
            &bins.proxy,
            &[],
            &env,
            true,
        )?;
    }
    for pod in &plan.pods {
        ready(&mut machine, &pod.netns(), "127.0.0.1:4191").await?;
    }
    screen.say("every pod intercepted by remora-init's iptables rules, its proxy certified");
    for pod in &plan.pods {
        for c in &pod.containers {
            let mut env = c.env.clone();
            env.push((
                "REMORA_DEMO_STATS".into(),
                stats_file(&root, &pod.name).display().to_string(),
            ));
            machine.spawn(&pod.name, &pod.netns(), &bins.demo, &c.args, &env, false)?;
        }
    }

    // Traffic flows before the clock starts.
    let deadline = Instant::now() + Duration::from_secs(20);
    while load::read(&stats_file(&root, CALLER)).ok() == 0 {
        if let Some(exited) = machine.exited() {
            anyhow::bail!("{exited}");
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no request from {CALLER} succeeded within 20s (logs in {})",
            root.join("logs").display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    screen.start = Some(Instant::now());
    let tallies = |root: &Path| {
        (
            load::read(&stats_file(root, CALLER)),
            load::read(&stats_file(root, INTRUDER)),
        )
    };
    let first = scrape_all(&plan, &controller_netns).await?;
    let start_tallies = tallies(&root);
    let mut marks: BTreeMap<Mark, (Tally, Tally)> = BTreeMap::new();
    // The pods serving the api (what the AuthorizationPolicy of act 4 selects).
    let servers: Vec<&str> = plan
        .pods
        .iter()
        .filter(|p| p.labels.get("app").map(String::as_str) == Some(SERVICE))
        .map(|p| p.name.as_str())
        .collect();
    let mut history: VecDeque<(Instant, Vec<Scrape>)> = VecDeque::new();
    history.push_back((Instant::now(), first.clone()));

    // Act 1, at once: who is who, from web's proxy's own view.
    screen.say("ACT 1 — every connection between pods is mTLS, each side a SPIFFE identity:");
    for line in identities(&plan).await {
        screen.say(&format!("  {line}"));
    }

    let duration = opts.duration;
    let mut acts = ACTS.iter().peekable();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    // Marks to take later: once a change has settled, and when to tell what it did.
    let mut pending: Vec<(Instant, Mark)> = Vec::new();
    let mut scrapes_at: BTreeMap<Mark, Vec<Scrape>> = BTreeMap::new();
    let mut last = first.clone();
    loop {
        tick.tick().await;
        let elapsed = screen.elapsed();
        while let Some((at, step)) = acts.peek().copied() {
            if elapsed.as_secs_f64() < at * duration.as_secs_f64() {
                break;
            }
            acts.next();
            let key = act(*step, &mut machine, &objects, &mut screen).await?;
            marks.insert(key, tallies(&root));
            scrapes_at.insert(key, last.clone());
            for (after, mark) in follow_ups(key) {
                pending.push((Instant::now() + *after, *mark));
            }
            // What the previous canary step did, now that it is over.
            if let Some(line) = canary_report(key, &marks) {
                screen.say(&line);
            }
        }
        if let Some(exited) = machine.exited() {
            anyhow::bail!("{exited}");
        }
        let now = scrape_all(&plan, &controller_netns).await?;
        let at = Instant::now();
        let current = tallies(&root);
        let due: Vec<Mark> = pending
            .iter()
            .filter(|(t, _)| at >= *t)
            .map(|(_, k)| *k)
            .collect();
        pending.retain(|(t, _)| at < *t);
        for key in due {
            marks.insert(key, current.clone());
            if let Some(line) = tell(key, &servers, &marks, &current, &scrapes_at, &now) {
                screen.say(&line);
            }
        }
        while history
            .front()
            .is_some_and(|(t, _)| at.duration_since(*t) > WINDOW + Duration::from_millis(500))
        {
            history.pop_front();
        }
        let (since, before) = history.front().expect("the first scrape stays").clone();
        let table = table(
            &plan,
            &before,
            &now,
            at.duration_since(since).as_secs_f64(),
            &current.0.since(&start_tallies.0),
            &current.1.since(&start_tallies.1),
        );
        screen.show(&table, duration);
        history.push_back((at, now.clone()));
        last = now;
        if elapsed >= duration {
            break;
        }
    }
    let end = tallies(&root);
    let seconds = screen.elapsed().as_secs_f64();
    let whole = rows_of(&plan, &first, &last, seconds);
    drop(machine);
    Ok(summarize(
        seconds,
        &start_tallies,
        &marks,
        &end,
        &whole,
        &last,
    ))
}

fn stats_file(root: &Path, pod: &str) -> PathBuf {
    root.join("stats").join(format!("{pod}.json"))
}

/// The marks an act's mark leads to, and how long after it each is taken.
fn follow_ups(key: Mark) -> &'static [(Duration, Mark)] {
    const S: Duration = SETTLE;
    const TELL: Duration = Duration::from_secs(4);
    match key {
        Mark::Fault => &[(TELL, Mark::FaultTold)],
        Mark::Canary10 => &[(S, Mark::Canary10Settled)],
        Mark::Canary50 => &[(S, Mark::Canary50Settled)],
        Mark::Deny => &[(S, Mark::DenySettled), (TELL, Mark::DenyTold)],
        Mark::Controller => &[(TELL, Mark::ControllerTold)],
        _ => &[],
    }
}

fn pct(part: u64, whole: u64) -> String {
    match whole {
        0 => "-".into(),
        _ => format!("{:.2}%", part as f64 * 100.0 / whole as f64),
    }
}

/// The share of web's successful requests api-v2 served in `t`.
fn canary_share(t: &Tally) -> Option<f64> {
    let v2: u64 = t
        .served_by
        .iter()
        .filter(|(pod, _)| pod.starts_with(CANARY_PREFIX))
        .map(|(_, n)| n)
        .sum();
    (t.ok() > 0).then(|| v2 as f64 / t.ok() as f64)
}

/// When a canary step ends (the next act begins), what share api-v2 served during it.
fn canary_report(key: Mark, marks: &BTreeMap<Mark, (Tally, Tally)>) -> Option<String> {
    let (from, weight) = match key {
        Mark::Canary50 => (Mark::Canary10Settled, 10),
        Mark::Deny => (Mark::Canary50Settled, 50),
        _ => return None,
    };
    let t = marks.get(&key)?.0.since(&marks.get(&from)?.0);
    let share = canary_share(&t)?;
    Some(format!(
        "        at {weight}%, api-v2 served {:.1}% of web's {} successful requests",
        share * 100.0,
        t.ok()
    ))
}

/// The sum of a counter in one pod's scrape, over the series whose labels include `with`.
fn counter_where(scrape: &[Scrape], pod: &str, name: &str, with: &[(&str, &str)]) -> u64 {
    scrape
        .iter()
        .filter(|s| s.source == pod)
        .flat_map(|s| &s.samples)
        .filter(|s| s.name == name && with.iter().all(|(k, v)| s.label(k) == *v))
        .map(|s| s.value)
        .sum::<f64>() as u64
}

/// What an act did, told a few seconds after it, from the apps' tallies and the proxies'
/// counters.
fn tell(
    key: Mark,
    servers: &[&str],
    marks: &BTreeMap<Mark, (Tally, Tally)>,
    now: &(Tally, Tally),
    scrapes_at: &BTreeMap<Mark, Vec<Scrape>>,
    scrape: &[Scrape],
) -> Option<String> {
    let grown = |act: Mark, pod: &str, name: &str, with: &[(&str, &str)]| {
        let before = scrapes_at
            .get(&act)
            .map_or(0, |s| counter_where(s, pod, name, with));
        counter_where(scrape, pod, name, with).saturating_sub(before)
    };
    match key {
        Mark::FaultTold => {
            let web = now.0.since(&marks.get(&Mark::Fault)?.0);
            let failed = grown(
                Mark::Fault,
                FAULTY,
                "remora_http_responses_total",
                &[("direction", "inbound"), ("status_code", "503")],
            );
            let retries = grown(Mark::Fault, CALLER, "remora_http_retries_total", &[]);
            let ejections = grown(Mark::Fault, CALLER, "remora_endpoint_ejections_total", &[]);
            Some(format!(
                "        since: {FAULTY} answered {failed} requests with 503; web's proxy \
                 retried {retries} on another replica, ejected {ejections}, and now sends \
                 {FAULTY} almost nothing (failures cost it in the balancer); web's app saw \
                 {} of {} succeed",
                pct(web.ok(), web.done()),
                web.done()
            ))
        }
        Mark::DenyTold => {
            let t = now.1.since(&marks.get(&Mark::Deny)?.1);
            let web = now.0.since(&marks.get(&Mark::Deny)?.0);
            let denied = servers
                .iter()
                .map(|pod| grown(Mark::Deny, pod, "remora_authz_denied_total", &[]))
                .sum::<u64>();
            Some(format!(
                "        since: the intruder got {} 403s of {} requests (the api's proxies \
                 counted {denied} denials); web's app saw {} succeed",
                t.status(403),
                t.done(),
                pct(web.ok(), web.done())
            ))
        }
        Mark::ControllerTold => {
            let web = now.0.since(&marks.get(&Mark::Controller)?.0);
            Some(format!(
                "        since: web sent {} requests with no controller, {} succeeded",
                web.done(),
                pct(web.ok(), web.done())
            ))
        }
        _ => None,
    }
}

/// Makes one act happen, says so, and names its mark.
async fn act(
    step: Step,
    machine: &mut Machine,
    objects: &Path,
    screen: &mut Screen,
) -> anyhow::Result<Mark> {
    Ok(match step {
        Step::Fault => {
            machine.signal(FAULTY, Signal::SIGUSR1)?;
            screen.say(&format!(
                "ACT 2 — {FAULTY} starts answering 503 to everything (kill -USR1): the \
                 TrafficPolicy api retries on another replica, the balancer shuns {FAULTY}, \
                 the breaker ejects it after 5 failures in a row"
            ));
            Mark::Fault
        }
        Step::Canary10 => {
            write_atomically(objects, "canary.yaml", CANARY_10)?;
            screen.say(
                "ACT 3 — HTTPRoute api-canary (deploy/demo/canary-10.yaml): 10% of api's \
                 traffic to api-v2",
            );
            Mark::Canary10
        }
        Step::Canary50 => {
            write_atomically(objects, "canary.yaml", CANARY_50)?;
            screen.say("        canary-50.yaml: the split goes to 50%");
            Mark::Canary50
        }
        Step::DenyIntruder => {
            write_atomically(objects, "deny-intruder.yaml", DENY_INTRUDER)?;
            screen.say(
                "ACT 4 — AuthorizationPolicy api-callers (deploy/demo/deny-intruder.yaml): \
                 only web's identity may call the api; the intruder now gets 403",
            );
            Mark::Deny
        }
        Step::StopController => {
            machine.stop("controller", Duration::from_secs(2)).await?;
            machine.forget("controller");
            screen.say(
                "ACT 5 — the controller is stopped: the proxies keep the last policy, \
                 endpoints and certificates, and traffic goes on",
            );
            Mark::Controller
        }
    })
}

fn write_atomically(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

/// Waits for `GET /ready` on `addr` inside `netns` to answer, failing at once if a
/// process the demo started has exited.
async fn ready(machine: &mut Machine, netns: &str, addr: &str) -> anyhow::Result<()> {
    let addr: SocketAddr = addr.parse()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if cluster::get(netns, addr, "/ready").await.is_ok() {
            return Ok(());
        }
        if let Some(exited) = machine.exited() {
            anyhow::bail!("{exited}");
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{addr} in {netns} was not ready within 20s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every meshed pod's `/metrics`, read from the controller's pod over the bridge (as
/// Prometheus scrapes), each pod named by its Deployment.
async fn scrape_all(plan: &Plan, from: &str) -> anyhow::Result<Vec<Scrape>> {
    let mut out = Vec::new();
    for pod in &plan.pods {
        let addr = SocketAddr::from((pod.ip, stat::ADMIN_PORT));
        let text = cluster::get(from, addr, "/metrics")
            .await
            .with_context(|| format!("scraping {}'s proxy", pod.name))?;
        out.push(Scrape {
            source: pod.name.clone(),
            workload: pod.deployment.clone(),
            samples: stat::parse(&text)?,
        });
    }
    Ok(out)
}

/// What each caller's proxy says about where its requests to the api go: the endpoints
/// and the identity each proved (`/debug/targets`, which answers the pod's loopback only:
/// read from inside the pod).
async fn identities(plan: &Plan) -> Vec<String> {
    let mut out = Vec::new();
    for caller in [CALLER, INTRUDER] {
        let Some(pod) = plan.pod(caller) else {
            continue;
        };
        let admin = SocketAddr::from(([127, 0, 0, 1], stat::ADMIN_PORT));
        let own = format!(
            "spiffe://cluster.local/ns/{NAMESPACE}/sa/{}",
            pod.service_account
        );
        let page = cluster::get(&pod.netns(), admin, "/debug/targets").await;
        let targets: serde_json::Value = page
            .ok()
            .and_then(|p| serde_json::from_str(&p).ok())
            .unwrap_or_default();
        let service = plan
            .services
            .iter()
            .find(|s| s.name == SERVICE)
            .map(|s| s.target())
            .unwrap_or_default();
        let endpoints: Vec<String> = targets
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["service"] == service.as_str())
            .flat_map(|t| t["endpoints"].as_array().cloned().unwrap_or_default())
            .map(|e| {
                format!(
                    "{} {}",
                    e["addr"].as_str().unwrap_or("?"),
                    e["identity"].as_str().unwrap_or("(no identity)")
                )
            })
            .collect();
        out.push(format!("{caller} is {own}; its proxy sends {service} to:"));
        out.extend(endpoints.into_iter().map(|e| format!("  {e}")));
    }
    out
}

/// The rows between two scrapes of every pod: web's and the intruder's calls (each
/// caller's proxy alone, so one's refusals do not blur the other's), and what each
/// workload served.
fn rows_of(plan: &Plan, before: &[Scrape], after: &[Scrape], seconds: f64) -> Vec<(String, Row)> {
    let only = |scrapes: &[Scrape], pods: &[&str]| -> Vec<Scrape> {
        scrapes
            .iter()
            .filter(|s| pods.contains(&s.source.as_str()))
            .cloned()
            .collect()
    };
    let mut out = Vec::new();
    for caller in [CALLER, INTRUDER] {
        let from = plan.pod(caller).map_or(caller, |p| p.deployment.as_str());
        for r in stat::rows(&only(before, &[caller]), &only(after, &[caller]), seconds) {
            if r.kind != Kind::Workload {
                out.push((format!("{from} →"), r));
            }
        }
    }
    for r in stat::rows(before, after, seconds) {
        if r.kind == Kind::Workload {
            out.push(("serving".to_string(), r));
        }
    }
    out
}

fn table(
    plan: &Plan,
    before: &[Scrape],
    after: &[Scrape],
    seconds: f64,
    web: &Tally,
    intruder: &Tally,
) -> String {
    let rows = rows_of(plan, before, after, seconds);
    let mut out = String::new();
    let mut section = "";
    let mut group: Vec<Row> = Vec::new();
    let flush = |section: &str, group: &mut Vec<Row>, out: &mut String| {
        if !group.is_empty() {
            out.push_str(&format!("{section}\n"));
            for line in stat::render(group, WINDOW).lines() {
                out.push_str(&format!("  {line}\n"));
            }
            group.clear();
        }
    };
    for (s, r) in &rows {
        if s != section {
            flush(section, &mut group, &mut out);
            section = s;
        }
        group.push(r.clone());
    }
    flush(section, &mut group, &mut out);
    let pct = |t: &Tally| match t.done() {
        0 => "-".to_string(),
        n => format!("{:.2}%", t.ok() as f64 * 100.0 / n as f64),
    };
    out.push_str(&format!(
        "as the apps saw it, from the start: web {} requests, {} succeeded; intruder {} \
         requests, {} refused (403)\n",
        web.done(),
        pct(web),
        intruder.done(),
        intruder.status(403)
    ));
    out
}

fn summarize(
    seconds: f64,
    start: &(Tally, Tally),
    marks: &BTreeMap<Mark, (Tally, Tally)>,
    end: &(Tally, Tally),
    whole: &[(String, Row)],
    last: &[Scrape],
) -> Summary {
    let web_between = |from: Option<&(Tally, Tally)>, to: Option<&(Tally, Tally)>| {
        from.zip(to).map(|(a, b)| b.0.since(&a.0))
    };
    let canary = |from: Mark, to: Mark| {
        web_between(marks.get(&from), marks.get(&to)).and_then(|t| canary_share(&t))
    };
    let none = Tally::default();
    let since = |key: Mark, i: usize| -> Tally {
        marks.get(&key).map_or(none.clone(), |m| {
            let (a, b) = if i == 0 {
                (&m.0, &end.0)
            } else {
                (&m.1, &end.1)
            };
            b.since(a)
        })
    };
    let deny_settled = since(Mark::DenySettled, 1);
    let intruder_before = marks
        .get(&Mark::Deny)
        .map_or(none.clone(), |m| m.1.since(&start.1));
    let mtls_share = whole
        .iter()
        .filter(|(section, r)| {
            (section.starts_with("web") && r.kind == Kind::Service)
                || (r.kind == Kind::Workload && r.name.starts_with(SERVICE))
        })
        .filter_map(|(_, r)| r.mtls_share)
        .reduce(f64::min);
    Summary {
        duration_seconds: seconds,
        web: Outcome::of(&end.0.since(&start.0)),
        during_fault: Outcome::of(&since(Mark::Fault, 0)),
        controller_down: Outcome::of(&since(Mark::Controller, 0)),
        mtls_share,
        canary_10: canary(Mark::Canary10Settled, Mark::Canary50),
        canary_50: canary(Mark::Canary50Settled, Mark::Deny),
        intruder_allowed_before: intruder_before.ok(),
        intruder_refused_after: deny_settled.status(403),
        intruder_allowed_after: deny_settled.ok(),
        retries: counter_where(last, CALLER, "remora_http_retries_total", &[]),
        ejections: counter_where(last, CALLER, "remora_endpoint_ejections_total", &[]),
    }
}

/// The summary for a terminal.
pub fn render(s: &Summary) -> String {
    let pct = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.2}%", v * 100.0));
    let outcome = |o: &Outcome| {
        format!(
            "{} of {} requests succeeded ({})",
            o.succeeded,
            o.requests,
            pct(o.success_rate)
        )
    };
    format!(
        "Summary of {:.0}s:\n\
         \x20 mTLS share:          {} of the requests between pods\n\
         \x20 web, whole run:      {}\n\
         \x20 through api-2's fault: {} ({} retries, {} ejections)\n\
         \x20 canary to api-v2:    {} at 10%, {} at 50%\n\
         \x20 intruder:            {} allowed before the policy; after it {} refused (403), {} let through\n\
         \x20 controller stopped:  {}\n",
        s.duration_seconds,
        pct(s.mtls_share),
        outcome(&s.web),
        outcome(&s.during_fault),
        s.retries,
        s.ejections,
        pct(s.canary_10),
        pct(s.canary_50),
        s.intruder_allowed_before,
        s.intruder_refused_after,
        s.intruder_allowed_after,
        outcome(&s.controller_down),
    )
}

/// Gives the folder to `uid`: the controller writes its CA there, the proxies read tokens.
fn chown_tree(path: &Path, uid: u32) -> std::io::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(uid))?;
    if path.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid)?;
        }
    }
    Ok(())
}
