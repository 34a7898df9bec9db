//! `remora`: the command users run beside kubectl.
//!
//! - `remora inject [FILE|-]` — the webhook's injection, offline.
//! - `remora check` — what is wrong with an install, check by check.
//! - `remora stat ADDR...` — success rate, RPS, latency and mTLS share from proxies.
//! - `remora diagnose endpoints|policy|proxy-metrics|config ADDR` — one proxy's view.
//! - `remora version`

use std::{
    io::{Read, Write},
    path::PathBuf,
    process::ExitCode,
};

use anyhow::Context;
use clap::{Arg, ArgAction, ArgMatches, Command};
use remora_cli::{check, diagnose, inject, stat};
use remora_k8s::inject::{Outcome, Settings};

fn mesh_namespace() -> Arg {
    Arg::new("mesh-namespace")
        .long("mesh-namespace")
        .value_name("NAMESPACE")
        .default_value("remora-system")
        .help("Where Remora is installed")
}

/// The runtime every subcommand's requests run on: one thread is plenty for a CLI.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// `-o text|json`, with `help` saying what json is.
fn output(help: &'static str) -> Arg {
    Arg::new("output")
        .long("output")
        .short('o')
        .value_parser(["text", "json"])
        .default_value("text")
        .help(help)
}

fn cli() -> Command {
    Command::new("remora")
        .about("Remora, the service mesh: inject workloads, check an install")
        .version(env!("CARGO_PKG_VERSION"))
        .subcommand_required(true)
        .arg_required_else_help(true)
        .subcommand(
            Command::new("inject")
                .about(
                    "Add the proxy to the Pods and workloads in a YAML stream, as the \
                     webhook would; other objects pass through unchanged",
                )
                .arg(
                    Arg::new("file")
                        .value_name("FILE|-")
                        .default_value("-")
                        .help("A file of YAML documents, or - for standard input"),
                )
                .arg(Arg::new("config").long("config").value_name("FILE").help(
                    "The injector's settings (the controller's --inject-config); \
                             default: the remora-inject ConfigMap of the cluster in your \
                             kubeconfig",
                ))
                .arg(mesh_namespace())
                .arg(
                    Arg::new("quiet")
                        .long("quiet")
                        .short('q')
                        .action(ArgAction::SetTrue)
                        .help("No report on standard error"),
                ),
        )
        .subcommand(
            Command::new("check")
                .about(
                    "Check an install through your kubeconfig: CRDs, controller, leader, \
                     identity, webhook and meshed pods, each with a hint; exits non-zero \
                     when a check fails",
                )
                .arg(mesh_namespace())
                .arg(
                    Arg::new("namespace")
                        .long("namespace")
                        .short('n')
                        .value_name("NAMESPACE")
                        .help("Check the meshed pods of this namespace only (default: all)"),
                )
                .arg(
                    Arg::new("expiry-warning")
                        .long("expiry-warning")
                        .value_name("DAYS")
                        .default_value("30")
                        .value_parser(clap::value_parser!(u32))
                        .help("Warn about certificates that end within this many days"),
                )
                .arg(output("text, or json for scripts")),
        )
        .subcommand(
            Command::new("stat")
                .about(
                    "Success rate, requests per second, p50/p95/p99 latency and the share \
                     of mTLS per workload, per Service called and per HTTPRoute backend, \
                     from two scrapes of the proxies' /metrics a window apart",
                )
                .arg(
                    Arg::new("proxies")
                        .value_name("[WORKLOAD=]HOST[:PORT]")
                        .num_args(1..)
                        .required_unless_present("namespace")
                        .conflicts_with("namespace")
                        .help(
                            "Proxies' admin addresses (port 4191 unless given), each \
                             optionally named by the workload it serves",
                        ),
                )
                .arg(
                    Arg::new("namespace")
                        .long("namespace")
                        .short('n')
                        .value_name("NAMESPACE")
                        .help(
                            "Instead of addresses: the running meshed pods of this \
                             namespace, through your kubeconfig's API server (its pod \
                             proxy), each named by its Deployment, StatefulSet, \
                             DaemonSet or Job",
                        ),
                )
                .arg(
                    Arg::new("window")
                        .long("window")
                        .short('w')
                        .value_name("DURATION")
                        .default_value("5s")
                        .value_parser(|s: &str| remora_config::parse_duration(s))
                        .help("How long between the two scrapes (e.g. 5s, 500ms)"),
                )
                .arg(
                    Arg::new("watch")
                        .long("watch")
                        .action(ArgAction::SetTrue)
                        .help("Print a table every window until interrupted"),
                )
                .arg(output(
                    "text, or json (one document per window) for scripts",
                )),
        )
        .subcommand(
            Command::new("diagnose")
                .about(
                    "One proxy's live view from its admin port: endpoints (destinations, \
                     policies, routes, each endpoint's state), policy (inbound \
                     authorization by port), proxy-metrics, config. A pod is reached by \
                     port-forwarding through the API server, as kubectl port-forward does \
                     (the /debug pages answer the pod's loopback only)",
                )
                .arg(
                    Arg::new("view")
                        .value_name("VIEW")
                        .required(true)
                        .value_parser(["endpoints", "policy", "proxy-metrics", "config"]),
                )
                .arg(
                    Arg::new("proxy")
                        .value_name("pod/NAME|HOST[:PORT]")
                        .default_value("127.0.0.1:4191")
                        .help(
                            "A meshed pod (pod/NAME, or NAME with -n), or the proxy's admin \
                             address (port 4191 unless given)",
                        ),
                )
                .arg(
                    Arg::new("namespace")
                        .long("namespace")
                        .short('n')
                        .value_name("NAMESPACE")
                        .help("The pod's namespace (default: the kubeconfig's)"),
                )
                .arg(output("text, or json as the proxy answered it")),
        )
        .subcommand(Command::new("version").about("Print the version"))
}

fn main() -> ExitCode {
    let matches = cli().get_matches();
    let result = match matches.subcommand() {
        Some(("inject", m)) => run_inject(m),
        Some(("check", m)) => run_check(m),
        Some(("stat", m)) => run_stat(m),
        Some(("diagnose", m)) => run_diagnose(m),
        Some(("version", _)) => {
            println!("remora {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
        _ => unreachable!("clap requires a subcommand"),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("remora: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_inject(m: &ArgMatches) -> anyhow::Result<ExitCode> {
    let file = m.get_one::<String>("file").expect("defaulted");
    let input = match file.as_str() {
        "-" => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading standard input")?;
            s
        }
        path => std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?,
    };
    let settings = match m.get_one::<String>("config") {
        Some(path) => {
            let path = PathBuf::from(path);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            Settings::from_yaml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        None => {
            let ns = m.get_one::<String>("mesh-namespace").expect("defaulted");
            settings_from_cluster(ns)?
        }
    };
    let (out, report) =
        inject::run(&input, &settings).map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
    std::io::stdout().write_all(out.as_bytes())?;
    if !m.get_flag("quiet") {
        let mut err = std::io::stderr().lock();
        for r in report {
            let what = match r.outcome {
                Outcome::Injected => "injected".to_string(),
                Outcome::Skipped(why) => format!("skipped: {why}"),
                Outcome::NotAWorkload => continue,
            };
            writeln!(err, "{} {what}", r.object)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn run_check(m: &ArgMatches) -> anyhow::Result<ExitCode> {
    let opts = check::Options {
        mesh_namespace: m
            .get_one::<String>("mesh-namespace")
            .expect("defaulted")
            .clone(),
        pods_namespace: m.get_one::<String>("namespace").cloned(),
        expiry_warning: i64::from(*m.get_one::<u32>("expiry-warning").expect("defaulted")) * 86_400,
    };
    let runtime = runtime()?;
    let findings = runtime.block_on(async {
        let client = kube::Client::try_default()
            .await
            .context("no cluster to check: point KUBECONFIG (or ~/.kube/config) at the cluster")?;
        anyhow::Ok(check::run(client, &opts).await)
    })?;
    match m.get_one::<String>("output").map(String::as_str) {
        Some("json") => println!("{}", serde_json::to_string_pretty(&findings)?),
        _ => print!("{}", check::render(&findings)),
    }
    let failed = findings.iter().any(|f| f.status == check::Status::Fail);
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn run_diagnose(m: &ArgMatches) -> anyhow::Result<ExitCode> {
    let view = diagnose::View::parse(m.get_one::<String>("view").expect("required"))
        .expect("clap checked the value");
    let target = diagnose::Target::parse(
        m.get_one::<String>("proxy").expect("defaulted"),
        m.get_one::<String>("namespace").map(String::as_str),
    )?;
    let json = m.get_one::<String>("output").map(String::as_str) == Some("json");
    let body = runtime()?.block_on(target.get(view.path(), std::time::Duration::from_secs(10)))?;
    print!("{}", diagnose::render(view, &body, json)?);
    Ok(ExitCode::SUCCESS)
}

fn run_stat(m: &ArgMatches) -> anyhow::Result<ExitCode> {
    let namespace = m.get_one::<String>("namespace").cloned();
    let sources = m
        .get_many::<String>("proxies")
        .into_iter()
        .flatten()
        .map(|a| stat::Source::parse(a))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let window = *m
        .get_one::<std::time::Duration>("window")
        .expect("defaulted");
    anyhow::ensure!(!window.is_zero(), "--window must be longer than zero");
    let json = m.get_one::<String>("output").map(String::as_str) == Some("json");
    let watch = m.get_flag("watch");
    let runtime = runtime()?;
    runtime.block_on(async {
        let timeout = window.max(std::time::Duration::from_secs(5));
        let (kube, mut sources) = match &namespace {
            Some(ns) => {
                let client = kube::Client::try_default().await.context(
                    "no cluster: point KUBECONFIG (or ~/.kube/config) at it, or give addresses",
                )?;
                let sources = stat::cluster_sources(&client, ns).await?;
                (Some(client), sources)
            }
            None => (None, sources),
        };
        // Watching, a proxy that does not answer (a pod replaced in a rollout) is told on
        // standard error and left out of that window; once, it is an error.
        let scrape_all = async |sources: &[stat::Source]| {
            let mut out = Vec::new();
            for s in sources {
                match s.scrape(kube.as_ref(), timeout).await {
                    Ok(scrape) => out.push(scrape),
                    Err(e) if watch => eprintln!("remora stat: {e:#}"),
                    Err(e) => return Err(e),
                }
            }
            anyhow::Ok(out)
        };
        let mut before = scrape_all(&sources).await?;
        let mut at = std::time::Instant::now();
        loop {
            tokio::time::sleep(window).await;
            // The namespace's pods as they are now: rollouts come and go under a watch.
            if watch && let (Some(client), Some(ns)) = (&kube, &namespace) {
                match stat::cluster_sources(client, ns).await {
                    Ok(now) => sources = now,
                    Err(e) => eprintln!("remora stat: {e:#}"),
                }
            }
            let after = scrape_all(&sources).await?;
            let now = std::time::Instant::now();
            let rows = stat::rows(&before, &after, now.duration_since(at).as_secs_f64());
            if json {
                println!("{}", serde_json::to_string(&rows)?);
            } else {
                print!("{}", stat::render(&rows, window));
                if watch {
                    println!();
                }
            }
            if !watch {
                return Ok(ExitCode::SUCCESS);
            }
            (before, at) = (after, now);
        }
    })
}

/// The settings the installed chart wrote, read with the kubeconfig's credentials.
fn settings_from_cluster(namespace: &str) -> anyhow::Result<Settings> {
    let runtime = runtime()?;
    runtime.block_on(async {
        let hint = "pass --config FILE (the injector's settings), or point KUBECONFIG at a \
                    cluster with Remora installed";
        let client = kube::Client::try_default()
            .await
            .with_context(|| format!("no cluster to read the injector's settings from; {hint}"))?;
        let text = check::config_map_key(
            &client,
            namespace,
            check::SETTINGS_CONFIG_MAP,
            check::SETTINGS_KEY,
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}; {hint}"))?;
        Settings::from_yaml(&text).map_err(|e| {
            anyhow::anyhow!("ConfigMap {namespace}/{}: {e}", check::SETTINGS_CONFIG_MAP)
        })
    })
}
