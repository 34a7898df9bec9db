//! `remora-init`: validates its flags, then installs (or removes) the pod's interception
//! rules, or with `--dry-run` prints them.

use std::process::ExitCode;

use remora_init::{Config, Family, Ipv6, System, apply, ipv6_available};

fn main() -> ExitCode {
    let loaded = Config::load(std::env::args(), &|k| std::env::var(k).ok());
    let config = match remora_config::or_exit("remora-init", loaded) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let ipv6 = ipv6_available();
    if ipv6 && config.ipv6 == Ipv6::Off && !config.cleanup {
        eprintln!(
            "remora-init: WARNING: the pod has IPv6 and --no-ipv6 leaves it alone: IPv6 \
             connections bypass the proxy and every AuthorizationPolicy"
        );
    }
    match apply(&System, &config, ipv6) {
        Ok(inputs) => {
            if config.dry_run {
                for (family, input) in inputs {
                    let tool = match family {
                        Family::V4 => "iptables-restore",
                        Family::V6 => "ip6tables-restore",
                    };
                    println!("# {tool} input");
                    print!("{input}");
                }
            } else {
                let what = if config.cleanup {
                    "removed"
                } else {
                    "installed"
                };
                let families = match inputs.len() {
                    1 => "IPv4",
                    _ => "IPv4 and IPv6",
                };
                eprintln!("remora-init: interception rules {what} ({families})");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("remora-init: {e}");
            ExitCode::FAILURE
        }
    }
}
