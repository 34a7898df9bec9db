//! `remora-demo`: the whole mesh on one Linux machine (`make demo`), and the apps it
//! runs in its pods.
//!
//! ```text
//! remora-demo [--duration 60s] [--summary FILE]   the demo (root; DURATION= also sets it)
//! remora-demo serve --listen ADDR                 the api: 200 naming $POD_NAME; SIGUSR1 toggles 503s
//! remora-demo load --url URL --rps N [--timeout 2s]  a steady load, counted
//! ```

mod app;
mod cluster;
mod demo;
mod load;

use std::{process::ExitCode, time::Duration};

use anyhow::Context;

const USAGE: &str = "usage:
  remora-demo [--duration 60s] [--summary FILE]
      the demo: pods as network namespaces, the controller, a proxy in every pod, five
      acts and a live table; needs root, ip, iptables and setpriv. DURATION=60s in the
      environment sets the length too; REMORA_DEMO_KEEP=1 keeps its folder (logs).
  remora-demo serve --listen ADDR
      the demo's api: 200 naming the pod ($POD_NAME) that served; SIGUSR1 toggles a
      fault (503 to everything)
  remora-demo load --url URL --rps N [--timeout 2s]
      a steady load on URL, counted (written to $REMORA_DEMO_STATS as JSON)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => runtime().and_then(|rt| rt.block_on(serve(&args[1..]))),
        Some("load") => runtime().and_then(|rt| rt.block_on(run_load(&args[1..]))),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        _ => runtime().and_then(|rt| rt.block_on(run_demo(&args))),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("remora-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// `--name value` pairs (and `--name=value`), with the names allowed.
fn flags(args: &[String], allowed: &[&str]) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let name = arg
            .strip_prefix("--")
            .with_context(|| format!("unexpected argument {arg:?}\n{USAGE}"))?;
        let (name, value) = match name.split_once('=') {
            Some((n, v)) => (n.to_string(), v.to_string()),
            None => (
                name.to_string(),
                it.next()
                    .with_context(|| format!("--{name} needs a value"))?
                    .clone(),
            ),
        };
        anyhow::ensure!(
            allowed.contains(&name.as_str()),
            "unknown flag --{name}\n{USAGE}"
        );
        out.push((name, value));
    }
    Ok(out)
}

fn flag<'a>(flags: &'a [(String, String)], name: &str) -> Option<&'a str> {
    flags
        .iter()
        .rev()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// `60s`, `500ms`, `2m` (`60` alone is seconds), as every Remora flag reads them.
fn duration(text: &str) -> anyhow::Result<Duration> {
    let d =
        remora_config::parse_duration(text.trim()).map_err(|e| anyhow::anyhow!("{text:?}: {e}"))?;
    anyhow::ensure!(!d.is_zero(), "{text:?}: must be longer than zero");
    Ok(d)
}

async fn serve(args: &[String]) -> anyhow::Result<ExitCode> {
    let f = flags(args, &["listen"])?;
    let listen = flag(&f, "listen")
        .unwrap_or("0.0.0.0:8080")
        .parse()
        .context("--listen")?;
    let name = std::env::var("POD_NAME").unwrap_or_else(|_| "api".into());
    app::serve(listen, name).await?;
    Ok(ExitCode::SUCCESS)
}

async fn run_load(args: &[String]) -> anyhow::Result<ExitCode> {
    let f = flags(args, &["url", "rps", "timeout"])?;
    let url = flag(&f, "url")
        .context("--url is required")?
        .parse()
        .context("--url")?;
    let rps = flag(&f, "rps").unwrap_or("10").parse().context("--rps")?;
    let timeout = duration(flag(&f, "timeout").unwrap_or("2s"))?;
    load::run(url, rps, timeout).await?;
    Ok(ExitCode::SUCCESS)
}

async fn run_demo(args: &[String]) -> anyhow::Result<ExitCode> {
    let f = flags(args, &["duration", "summary"])?;
    let env_duration = std::env::var("DURATION").ok().filter(|d| !d.is_empty());
    let length = match flag(&f, "duration").map(str::to_string).or(env_duration) {
        Some(d) => duration(&d).context("the demo's duration")?,
        None => Duration::from_secs(60),
    };
    anyhow::ensure!(
        length >= demo::MIN_DURATION,
        "the demo needs at least {}s for its five acts",
        demo::MIN_DURATION.as_secs()
    );
    let missing = cluster::missing_prerequisites();
    if !missing.is_empty() {
        eprintln!("remora-demo cannot run here; it needs:");
        for m in &missing {
            eprintln!("  - {m}");
        }
        return Ok(ExitCode::from(2));
    }
    let opts = demo::Options {
        duration: length,
        keep_files: std::env::var("REMORA_DEMO_KEEP").is_ok_and(|v| v == "1"),
    };
    // Ctrl-C or a SIGTERM drops the demo where it stands: dropping it removes all it made.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let summary = tokio::select! {
        s = demo::run(opts) => s?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("\ninterrupted: everything the demo made has been removed");
            return Ok(ExitCode::from(130));
        }
        _ = term.recv() => {
            eprintln!("terminated: everything the demo made has been removed");
            return Ok(ExitCode::from(143));
        }
    };
    println!("\n{}", demo::render(&summary));
    println!("Everything the demo made (namespaces, processes, rules, files) has been removed.");
    if let Some(path) = flag(&f, "summary") {
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("writing {path}"))?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_users_write_them() {
        for (text, secs) in [("60", 60.0), ("60s", 60.0), ("2m", 120.0), ("1500ms", 1.5)] {
            assert_eq!(
                duration(text).unwrap(),
                Duration::from_secs_f64(secs),
                "{text}"
            );
        }
        for bad in ["", "s", "10x", "ten", "0s"] {
            assert!(duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn flags_are_named_and_checked() {
        let args: Vec<String> = ["--url", "http://a/", "--rps=5"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let f = flags(&args, &["url", "rps"]).unwrap();
        assert_eq!(
            (flag(&f, "url"), flag(&f, "rps")),
            (Some("http://a/"), Some("5"))
        );
        assert!(flags(&args, &["url"]).is_err());
        assert!(flags(&["--url".to_string()], &["url"]).is_err());
        assert!(flags(&["stray".to_string()], &["url"]).is_err());
    }
}
