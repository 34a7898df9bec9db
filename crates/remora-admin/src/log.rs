//! Logging: `tracing` with a filter that `/log-level` can change at run time.

use std::sync::Arc;

use parking_lot::Mutex;
use tracing_subscriber::{
    EnvFilter, Registry, layer::SubscriberExt, reload, util::SubscriberInitExt,
};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Plain,
    Json,
}

impl LogFormat {
    /// Parses a `REMORA_LOG_FORMAT` value.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "plain" => Ok(LogFormat::Plain),
            "json" => Ok(LogFormat::Json),
            _ => Err("expected plain or json".into()),
        }
    }
}

/// Checks a `REMORA_LOG` filter.
pub fn parse_filter(s: &str) -> Result<String, String> {
    EnvFilter::try_new(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

type SetFilter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Reads and changes the log filter.
#[derive(Clone)]
pub struct LogLevel {
    current: Arc<Mutex<String>>,
    set: Arc<SetFilter>,
}

impl std::fmt::Debug for LogLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogLevel")
            .field("current", &*self.current.lock())
            .finish()
    }
}

impl LogLevel {
    /// Installs the global subscriber. Call once, from `main`.
    pub fn init(filter: &str, format: LogFormat) -> Result<Self, String> {
        let env_filter = EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
        let (filter_layer, handle) = reload::Layer::<EnvFilter, Registry>::new(env_filter);
        let (plain, json) = match format {
            LogFormat::Plain => (Some(tracing_subscriber::fmt::layer()), None),
            LogFormat::Json => (None, Some(tracing_subscriber::fmt::layer().json())),
        };
        tracing_subscriber::registry()
            .with(filter_layer)
            .with(plain)
            .with(json)
            .try_init()
            .map_err(|e| e.to_string())?;
        let set: SetFilter = Box::new(move |f: &str| {
            let new =
                EnvFilter::try_new(f).map_err(|e| format!("invalid log filter {f:?}: {e}"))?;
            handle.reload(new).map_err(|e| e.to_string())
        });
        Ok(Self {
            current: Arc::new(Mutex::new(filter.to_string())),
            set: Arc::new(set),
        })
    }

    /// A handle that only remembers the filter: for a proxy embedded in tests, where the
    /// process's subscriber belongs to the test harness.
    pub fn detached(filter: &str) -> Self {
        let set: SetFilter = Box::new(|f: &str| {
            EnvFilter::try_new(f)
                .map(drop)
                .map_err(|e| format!("invalid log filter {f:?}: {e}"))
        });
        Self {
            current: Arc::new(Mutex::new(filter.to_string())),
            set: Arc::new(set),
        }
    }

    pub fn get(&self) -> String {
        self.current.lock().clone()
    }

    pub fn set(&self, filter: &str) -> Result<(), String> {
        (self.set)(filter)?;
        *self.current.lock() = filter.to_string();
        Ok(())
    }
}
