//! The benchmark report: Markdown for `BENCHMARKS.md`, JSON for machines, and an honest
//! verdict on each aim.

use std::{fmt::Write as _, path::Path, process::Command};

use remora_config::json_string as json_str;

use super::{Memory, Options, PathKind, PathRun, Scenario, load::Mode};

/// Where and when the figures were taken.
#[derive(Debug)]
pub struct Info {
    pub date: String,
    pub commit: String,
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub command: String,
    /// What was measured: `Libc::describe`.
    pub binaries: String,
}

impl Info {
    pub fn collect(root: &Path, args: &[String], libc: super::Libc) -> Self {
        let out = |cmd: &mut Command| {
            cmd.output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default()
        };
        let commit =
            out(Command::new("git")
                .arg("-C")
                .arg(root)
                .args(["rev-parse", "--short", "HEAD"]));
        let dirty = !out(Command::new("git").arg("-C").arg(root).args([
            "status",
            "--porcelain",
            "--untracked-files=no",
        ]))
        .is_empty();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Self {
            date: out(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])),
            commit: if dirty {
                format!("{commit} (with uncommitted changes)")
            } else {
                commit
            },
            cpu: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
                .unwrap_or_else(|| "unknown".into()),
            cores: super::cores(),
            memory_gib: meminfo
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .map(|kib| kib / 1024.0 / 1024.0)
                .unwrap_or(0.0),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            command: format!("cargo xtask bench {}", args.join(" "))
                .trim_end()
                .to_string(),
            binaries: libc.describe(),
        }
    }
}

fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

fn find(paths: &[PathRun], kind: PathKind) -> Option<&PathRun> {
    paths.iter().find(|p| p.kind == kind)
}

fn scenario(path: &PathRun, mode: Mode, rate: Option<u32>) -> Option<&Scenario> {
    path.scenarios
        .iter()
        .find(|s| s.mode == mode && s.rate == rate)
}

/// One aim: what, the figure, and whether it was met.
struct Aim {
    what: String,
    figure: String,
    met: Option<bool>,
}

fn aims(paths: &[PathRun]) -> Vec<Aim> {
    let mut out = Vec::new();
    // The aims are the mTLS pair's when it ran, else the plaintext pair's.
    let remora = find(paths, PathKind::RemoraMtls).or_else(|| find(paths, PathKind::Remora));
    let (Some(direct), Some(remora)) = (find(paths, PathKind::Direct), remora) else {
        return out;
    };
    let pair = remora.kind.name();
    if let (Some(d), Some(r)) = (
        scenario(direct, Mode::Http1, Some(1000)),
        scenario(remora, Mode::Http1, Some(1000)),
    ) {
        let p50 = r.p50_us as f64 - d.p50_us as f64;
        let p99 = r.p99_us as f64 - d.p99_us as f64;
        out.push(Aim {
            what: format!("at 1,000 RPS the {pair} adds ≤ 0.2 ms at p50"),
            figure: format!("{:+.3} ms", p50 / 1000.0),
            met: Some(p50 <= 200.0),
        });
        out.push(Aim {
            what: format!("at 1,000 RPS the {pair} adds ≤ 0.5 ms at p99"),
            figure: format!("{:+.3} ms", p99 / 1000.0),
            met: Some(p99 <= 500.0),
        });
        let cores = r.proxy_cpu_s / r.wall_s;
        out.push(Aim {
            what: format!("at 1,000 RPS both proxies of the {pair} use ≤ 0.15 cores"),
            figure: format!("{cores:.3} cores"),
            met: Some(cores <= 0.15),
        });
    }
    let largest = |f: fn(&Memory) -> f64| remora.memory.iter().map(f).fold(0.0, f64::max);
    let peak = largest(|m| m.peak_rss_mib);
    out.push(Aim {
        what: format!("≤ 10 MiB peak RSS per proxy ({pair}, post-quantum key exchange on)"),
        figure: format!(
            "{peak:.1} MiB (the larger of the two; {:.1} MiB of it private)",
            largest(|m| m.private_mib)
        ),
        met: Some(peak <= 10.0),
    });
    for (kind, aim) in [(PathKind::Remora, 0.8), (PathKind::RemoraMtls, 0.6)] {
        if let Some(p) = find(paths, kind)
            && direct.throughput_mib_s > 0.0
        {
            let ratio = p.throughput_mib_s / direct.throughput_mib_s;
            out.push(Aim {
                what: format!(
                    "opaque TCP: the {} moves ≥ {aim}× direct's throughput",
                    kind.name()
                ),
                figure: format!("{ratio:.2}×"),
                met: Some(ratio >= aim),
            });
        }
    }
    let lost: u64 = paths
        .iter()
        .flat_map(|p| &p.scenarios)
        .filter(|s| s.mode == Mode::Grpc)
        .map(|s| s.errors)
        .sum();
    out.push(Aim {
        what: "no gRPC call fails or loses its trailers, on any path".into(),
        figure: format!("{lost} failed"),
        met: Some(lost == 0),
    });
    for (mode, times) in [(Mode::Http1, 2.5), (Mode::Grpc, 2.0)] {
        let r = scenario(remora, mode, None).map(|s| s.rps);
        let e = find(paths, PathKind::Envoy)
            .and_then(|p| scenario(p, mode, None))
            .map(|s| s.rps);
        out.push(match (r, e) {
            (Some(r), Some(e)) => Aim {
                what: format!(
                    "{}: max RPS of the {pair} ≥ {times}× the Envoy pair's",
                    mode.name()
                ),
                figure: format!("{:.2}×", r / e),
                met: Some(r >= times * e),
            },
            _ => Aim {
                what: format!("{}: max RPS ≥ {times}× the Envoy pair's", mode.name()),
                figure: "Envoy not run".into(),
                met: None,
            },
        });
    }
    out
}

pub fn markdown(info: &Info, opts: &Options, paths: &[PathRun]) -> String {
    let mut md = String::new();
    let w = &mut md;
    let _ = writeln!(w, "# Benchmarks\n");
    let _ = writeln!(
        w,
        "What the mesh costs, measured by `cargo xtask bench` (see [docs/benchmarks.md](docs/benchmarks.md) \
         for the method). Every path runs the same load back to back in one run; figures are \
         compared with the direct path measured in the same run. Regenerate with the command \
         below; the figures are this machine's, not a promise.\n"
    );
    let _ = writeln!(w, "| | |\n| --- | --- |");
    let _ = writeln!(w, "| date | {} |", info.date);
    let _ = writeln!(w, "| commit | {} |", info.commit);
    let _ = writeln!(
        w,
        "| machine | {} × {}, {:.0} GiB, Linux {} |",
        info.cores, info.cpu, info.memory_gib, info.kernel
    );
    let _ = writeln!(w, "| command | `{}` |", info.command);
    let _ = writeln!(w, "| binaries | {} |", info.binaries);
    let _ = writeln!(
        w,
        "| load | {} s measured after {} s warm-up per scenario; {} connections (HTTP/1.1) or up to 2 (HTTP/2); closed loop with {} callers |",
        opts.duration.as_secs_f64(),
        opts.warmup.as_secs_f64(),
        opts.concurrency,
        opts.concurrency
    );
    let _ = writeln!(
        w,
        "| paths | {} |\n",
        paths
            .iter()
            .map(|p| p.kind.name())
            .collect::<Vec<_>>()
            .join(", ")
    );

    let _ = writeln!(
        w,
        "## Aims\n\n| aim | this run | met |\n| --- | --- | --- |"
    );
    for a in aims(paths) {
        let met = match a.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "not measured",
        };
        let _ = writeln!(w, "| {} | {} | {met} |", a.what, a.figure);
    }

    let direct = find(paths, PathKind::Direct);
    for mode in [Mode::Http1, Mode::Grpc] {
        for rate in opts.rates.iter().map(|&r| Some(r)).chain([None]) {
            let title = match rate {
                Some(r) => format!("{}, open loop at {r} RPS", mode.name()),
                None => format!("{}, closed loop (maximum)", mode.name()),
            };
            let _ = writeln!(w, "\n## {title}\n");
            let _ = writeln!(
                w,
                "| path | p50 ms | p90 ms | p99 ms | p99.9 ms | +p50 | +p99 | RPS | vs direct | errors | proxy CPU s / 1k req | proxy cores | steal % |"
            );
            let _ = writeln!(
                w,
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
            );
            let base = direct.and_then(|d| scenario(d, mode, rate));
            for p in paths {
                let Some(s) = scenario(p, mode, rate) else {
                    continue;
                };
                let (add50, add99, ratio) = match base {
                    Some(b) => (
                        format!("{:+.3}", (s.p50_us as f64 - b.p50_us as f64) / 1000.0),
                        format!("{:+.3}", (s.p99_us as f64 - b.p99_us as f64) / 1000.0),
                        format!("{:.2}", s.rps / b.rps),
                    ),
                    None => ("".into(), "".into(), "".into()),
                };
                let (cpu_per_k, cores) = if p.kind == PathKind::Direct {
                    ("—".into(), "—".into())
                } else {
                    (
                        format!(
                            "{:.3}",
                            s.proxy_cpu_s / (s.completed.max(1) as f64 / 1000.0)
                        ),
                        format!("{:.3}", s.proxy_cpu_s / s.wall_s),
                    )
                };
                let steal = match s.tries {
                    1 => format!("{:.1}", s.steal_pct),
                    n => format!("{:.1} (least of {n} tries)", s.steal_pct),
                };
                let errors = match &s.first_error {
                    Some(e) => format!("{} ({e})", s.errors),
                    None => s.errors.to_string(),
                };
                let _ = writeln!(
                    w,
                    "| {} | {} | {} | {} | {} | {add50} | {add99} | {:.0} | {ratio} | {errors} | {cpu_per_k} | {cores} | {steal} |",
                    p.kind.name(),
                    ms(s.p50_us),
                    ms(s.p90_us),
                    ms(s.p99_us),
                    ms(s.p999_us),
                    s.rps
                );
            }
        }
    }

    let _ = writeln!(w, "\n## Memory per proxy (after the load)\n");
    let _ = writeln!(
        w,
        "| path | proxy | peak RSS MiB | private MiB |\n| --- | --- | ---: | ---: |"
    );
    for p in paths {
        for m in &p.memory {
            let _ = writeln!(
                w,
                "| {} | {} | {:.1} | {:.1} |",
                p.kind.name(),
                m.side,
                m.peak_rss_mib,
                m.private_mib
            );
        }
    }

    let _ = writeln!(
        w,
        "\n## Memory per connection (1,000 HTTP/1.1 connections through the path)\n"
    );
    let _ = writeln!(
        w,
        "| path | proxy | RSS before MiB | idle MiB | busy MiB (peak) | KiB per idle connection | KiB per busy connection | errors |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for p in paths {
        for c in &p.per_connection {
            let per = |mib: f64| (mib - c.base_mib) * 1024.0 / c.connections as f64;
            let _ = writeln!(
                w,
                "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
                p.kind.name(),
                c.side,
                c.base_mib,
                c.idle_mib,
                c.active_mib,
                per(c.idle_mib),
                per(c.active_mib),
                c.errors
            );
        }
    }

    let _ = writeln!(
        w,
        "\n## Opaque TCP throughput ({} MiB, one connection)\n",
        opts.throughput_mib
    );
    let _ = writeln!(w, "| path | MiB/s | vs direct |\n| --- | ---: | ---: |");
    let base = direct.map(|d| d.throughput_mib_s);
    for p in paths {
        let ratio = base
            .map(|b| format!("{:.2}", p.throughput_mib_s / b))
            .unwrap_or_default();
        let _ = writeln!(
            w,
            "| {} | {:.0} | {ratio} |",
            p.kind.name(),
            p.throughput_mib_s
        );
    }
    md
}

pub fn json(info: &Info, opts: &Options, paths: &[PathRun]) -> String {
    let mut j = String::new();
    let _ = write!(
        j,
        "{{\"date\":{},\"commit\":{},\"cpu\":{},\"cores\":{},\"memory_gib\":{:.1},\"kernel\":{},\"command\":{},\"binaries\":{},\
         \"duration_s\":{},\"warmup_s\":{},\"paths\":[",
        json_str(&info.date),
        json_str(&info.commit),
        json_str(&info.cpu),
        info.cores,
        info.memory_gib,
        json_str(&info.kernel),
        json_str(&info.command),
        json_str(&info.binaries),
        opts.duration.as_secs_f64(),
        opts.warmup.as_secs_f64()
    );
    for (i, p) in paths.iter().enumerate() {
        if i > 0 {
            j.push(',');
        }
        let _ = write!(
            j,
            "{{\"path\":{},\"throughput_mib_s\":{:.1},\"scenarios\":[",
            json_str(p.kind.name()),
            p.throughput_mib_s
        );
        for (k, s) in p.scenarios.iter().enumerate() {
            if k > 0 {
                j.push(',');
            }
            let _ = write!(
                j,
                "{{\"mode\":{},\"rate\":{},\"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"p999_us\":{},\"rps\":{:.1},\
                 \"completed\":{},\"errors\":{},\"proxy_cpu_s\":{:.3},\"wall_s\":{:.3},\"steal_pct\":{:.1},\"tries\":{}}}",
                json_str(s.mode.name()),
                s.rate
                    .map(|r| r.to_string())
                    .unwrap_or_else(|| "null".into()),
                s.p50_us,
                s.p90_us,
                s.p99_us,
                s.p999_us,
                s.rps,
                s.completed,
                s.errors,
                s.proxy_cpu_s,
                s.wall_s,
                s.steal_pct,
                s.tries
            );
        }
        j.push_str("],\"memory\":[");
        for (k, m) in p.memory.iter().enumerate() {
            if k > 0 {
                j.push(',');
            }
            let _ = write!(
                j,
                "{{\"proxy\":{},\"peak_rss_mib\":{:.2},\"private_mib\":{:.2}}}",
                json_str(m.side),
                m.peak_rss_mib,
                m.private_mib
            );
        }
        j.push_str("],\"per_connection\":[");
        for (k, c) in p.per_connection.iter().enumerate() {
            if k > 0 {
                j.push(',');
            }
            let _ = write!(
                j,
                "{{\"proxy\":{},\"connections\":{},\"base_mib\":{:.2},\"idle_mib\":{:.2},\"active_mib\":{:.2},\"errors\":{}}}",
                json_str(c.side),
                c.connections,
                c.base_mib,
                c.idle_mib,
                c.active_mib,
                c.errors
            );
        }
        j.push_str("]}");
    }
    j.push_str("]}");
    j
}
