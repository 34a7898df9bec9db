//! `remora-fuzz seeds DIR`: writes every target's seeds to `DIR/<target>/` (what
//! `make fuzz` starts from). `remora-fuzz replay TARGET FILE...`: runs a target over
//! inputs without a sanitizer, to read a crash's panic and backtrace.

use std::{path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["seeds", dir] => {
            let dir = PathBuf::from(dir);
            let seeds = remora_fuzz::seeds::all();
            for (target, name, bytes) in &seeds {
                let folder = dir.join(target);
                let written = std::fs::create_dir_all(&folder)
                    .and_then(|()| std::fs::write(folder.join(name), bytes));
                if let Err(e) = written {
                    eprintln!("remora-fuzz: {}: {e}", folder.join(name).display());
                    return ExitCode::FAILURE;
                }
            }
            println!("remora-fuzz: {} seeds in {}", seeds.len(), dir.display());
            ExitCode::SUCCESS
        }
        ["replay", target, files @ ..] if !files.is_empty() => {
            let Some(t) = remora_fuzz::target(target) else {
                let names: Vec<_> = remora_fuzz::TARGETS.iter().map(|t| t.name).collect();
                eprintln!("remora-fuzz: no target {target:?}; there are {names:?}");
                return ExitCode::FAILURE;
            };
            for file in files {
                match std::fs::read(file) {
                    Ok(bytes) => {
                        (t.run)(&bytes);
                        println!("{file}: ok");
                    }
                    Err(e) => {
                        eprintln!("remora-fuzz: {file}: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("usage: remora-fuzz seeds DIR | remora-fuzz replay TARGET FILE...");
            ExitCode::FAILURE
        }
    }
}
