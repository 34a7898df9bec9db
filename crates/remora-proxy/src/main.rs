//! `remora-proxy`: reads its configuration, starts logging and runs the proxy until
//! SIGTERM, SIGINT or `POST /shutdown`. `remora-proxy await-ready` waits for the proxy
//! beside it instead (the injector's `postStart` hook where native sidecars are missing).

use std::process::ExitCode;

use remora_proxy::{App, Config};

// mimalloc, not the libc's: the images ship static musl binaries, and musl's malloc made
// the proxy spend about 1.5x the CPU per request of the same build on glibc's
// (BENCHMARKS.md, "the allocator"). Built without transparent huge pages, which took
// peak RSS from 12.9 to 19.8 MiB.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("await-ready") {
        return remora_proxy::await_ready::main(&args[2..], &|k| std::env::var(k).ok());
    }
    let loaded = Config::load(args, &|k| std::env::var(k).ok());
    let config = match remora_config::or_exit("remora-proxy", loaded) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let threads = Some(config.worker_threads);
    let (log, runtime) =
        match remora_admin::start("remora-proxy", &config.log, config.log_format, threads) {
            Ok(started) => started,
            Err(code) => return code,
        };
    runtime.block_on(async move {
        match App::build(config, log).await {
            Ok(app) => {
                app.run(remora_admin::shutdown_signal()).await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::FAILURE
            }
        }
    })
}
