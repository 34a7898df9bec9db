//! `cargo xtask <command>`: chores that keep generated files in step with the code.
//!
//! - `codegen` rewrites the generated parts of the docs (the README's configuration
//!   reference, from each binary's knob table).
//! - `codegen --check` fails when a committed copy is stale (CI runs it).
//! - `bench [options]` measures the data path against a direct connection and Envoy,
//!   `bench controller [options]` the control plane under load;
//!   and writes `BENCHMARKS.md` (see docs/benchmarks.md).

mod bench;

use std::{fs, path::PathBuf};

use anyhow::{Context, bail};
use remora_config::Knob;

const BEGIN: &str = "<!-- BEGIN GENERATED: config-reference (cargo xtask codegen) -->";
const END: &str = "<!-- END GENERATED: config-reference -->";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["codegen"] => codegen(false),
        ["codegen", "--check"] => codegen(true),
        ["bench", ..] => bench::run(&root(), &args[1..]),
        _ => {
            eprintln!("usage: cargo xtask codegen [--check] | cargo xtask bench [options]");
            std::process::exit(2);
        }
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn codegen(check: bool) -> anyhow::Result<()> {
    let path = root().join("README.md");
    let readme = fs::read_to_string(&path).context("read README.md")?;
    let (before, rest) = readme
        .split_once(BEGIN)
        .context("README.md lacks the config-reference BEGIN marker")?;
    let (_, after) = rest
        .split_once(END)
        .context("README.md lacks the config-reference END marker")?;
    let updated = format!("{before}{BEGIN}\n{}{END}{after}", config_reference());
    if updated == readme {
        return Ok(());
    }
    if check {
        bail!("README.md's configuration reference is stale: run `cargo xtask codegen` and commit");
    }
    fs::write(&path, updated).context("write README.md")?;
    eprintln!("updated README.md");
    Ok(())
}

fn config_reference() -> String {
    let mut out = String::new();
    for (binary, knobs) in [
        ("remora-proxy", remora_proxy::config::KNOBS),
        ("remora-init", remora_init::KNOBS),
        ("remora-controller", remora_controller::KNOBS),
    ] {
        out.push_str(&format!("\n**`{binary}`**\n\n"));
        out.push_str("| environment | flag | default | meaning |\n| --- | --- | --- | --- |\n");
        for k in knobs {
            out.push_str(&row(k));
        }
    }
    out.push('\n');
    out
}

fn row(k: &Knob) -> String {
    let default = match (k.switch, k.default) {
        (true, _) => "off".to_string(),
        (false, Some("")) => "(none)".to_string(),
        (false, Some(d)) => format!("`{d}`"),
        (false, None) => "(required)".to_string(),
    };
    let flag = if k.switch {
        format!("`--{}`", k.flag)
    } else {
        format!("`--{} VALUE`", k.flag)
    };
    format!(
        "| `{}` | {flag} | {default} | {} |\n",
        k.env,
        k.help.replace('|', "\\|")
    )
}
