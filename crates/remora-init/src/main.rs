//! `remora-init`: validates its flags, then installs (or removes) the pod's interception
//! rules, or with `--dry-run` prints them.

use std::process::ExitCode;

use remora_init::{Config, System, apply};

fn main() -> ExitCode {
    let loaded = Config::load(std::env::args(), &|k| std::env::var(k).ok());
    let config = match remora_config::or_exit("remora-init", loaded) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match apply(&System, &config) {
        Ok(inputs) => {
            if config.dry_run {
                for input in inputs {
                    print!("{input}");
                }
            } else {
                let what = if config.cleanup {
                    "removed"
                } else {
                    "installed"
                };
                eprintln!("remora-init: interception rules {what}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("remora-init: {e}");
            ExitCode::FAILURE
        }
    }
}
