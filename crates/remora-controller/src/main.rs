//! `remora-controller`: reads its configuration, starts logging and runs the controller
//! until SIGTERM, SIGINT or `POST /shutdown`.

use std::process::ExitCode;

use remora_controller::{App, Config};

// mimalloc, not the libc's, as in the proxy: under musl's malloc the static controller
// the images ship took about twice the CPU and twice the time to be ready in `cargo xtask
// bench controller` (BENCHMARKS.md, "Controller").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let loaded = Config::load(std::env::args(), &|k| std::env::var(k).ok());
    let config = match remora_config::or_exit("remora-controller", loaded) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let threads = None;
    let (log, runtime) =
        match remora_admin::start("remora-controller", &config.log, config.log_format, threads) {
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
