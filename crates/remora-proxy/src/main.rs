//! `remora-proxy`: reads its configuration, starts logging and runs the proxy until
//! SIGTERM or SIGINT.

use std::process::ExitCode;

use remora_admin::LogLevel;
use remora_proxy::{App, Config, config::ConfigError};

fn main() -> ExitCode {
    let config = match Config::load(std::env::args(), &|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(ConfigError::Args(e)) => e.exit(),
        Err(e) => {
            eprintln!("remora-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let log = match LogLevel::init(&config.log, config.log_format) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("remora-proxy: cannot start logging: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .thread_name("remora-proxy")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("remora-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
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
