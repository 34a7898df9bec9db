//! Every knob of every Remora binary: one table entry gives its flag, its `REMORA_*`
//! environment variable, its default and its help. A [`Loader`] reads flags first,
//! then the environment (through a lookup function, so tests pass a map), parses
//! each value, and reports every bad value at once.

use std::fmt;

/// One configuration knob.
#[derive(Debug, Clone, Copy)]
pub struct Knob {
    /// The long flag, without dashes (`inbound-addr`).
    pub flag: &'static str,
    /// The environment variable (`REMORA_INBOUND_ADDR`).
    pub env: &'static str,
    /// The default, as the user would write it; `None` when the knob is optional.
    pub default: Option<&'static str>,
    /// One line for `--help` and the README.
    pub help: &'static str,
    /// A switch is a flag without a value (`--dry-run`); its env value is `true`/`false`.
    pub switch: bool,
}

impl Knob {
    /// A knob that takes a value.
    pub const fn value(
        flag: &'static str,
        env: &'static str,
        default: Option<&'static str>,
        help: &'static str,
    ) -> Self {
        Self {
            flag,
            env,
            default,
            help,
            switch: false,
        }
    }

    /// A knob without a value, off by default.
    pub const fn switch(flag: &'static str, env: &'static str, help: &'static str) -> Self {
        Self {
            flag,
            env,
            default: Some("false"),
            help,
            switch: true,
        }
    }
}

/// Where a knob's effective value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Flag,
    Env,
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Flag => "flag",
            Source::Env => "env",
            Source::Default => "default",
        })
    }
}

/// A knob's effective value, as written, for the start-up log and `/config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effective {
    pub env: &'static str,
    pub value: String,
    pub source: Source,
}

/// Everything wrong with a configuration, or a command line clap refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<String>),
    #[error(transparent)]
    Args(#[from] clap::Error),
}

/// For a binary's `main`: the configuration, or the exit code after telling the user
/// what is wrong (clap's own output and status for `--help`, `--version` and bad flags;
/// every invalid value and status 2 otherwise).
pub fn or_exit<C>(
    binary: &str,
    loaded: Result<C, ConfigError>,
) -> Result<C, std::process::ExitCode> {
    match loaded {
        Ok(c) => Ok(c),
        Err(ConfigError::Args(e)) => e.exit(),
        Err(e) => {
            eprintln!("{binary}: {e}");
            Err(std::process::ExitCode::from(2))
        }
    }
}

/// Builds the clap command for a binary from its knob table.
pub fn command(name: &'static str, about: &'static str, knobs: &[Knob]) -> clap::Command {
    let mut cmd = clap::Command::new(name)
        .about(about)
        .version(env!("CARGO_PKG_VERSION"));
    for knob in knobs {
        let mut arg = clap::Arg::new(knob.flag).long(knob.flag);
        let help = match knob.default {
            Some(d) if !knob.switch => format!("{} [env: {}] [default: {d}]", knob.help, knob.env),
            _ => format!("{} [env: {}]", knob.help, knob.env),
        };
        arg = arg.help(help);
        arg = if knob.switch {
            arg.action(clap::ArgAction::SetTrue)
        } else {
            arg.action(clap::ArgAction::Set).value_name("VALUE")
        };
        cmd = cmd.arg(arg);
    }
    cmd
}

/// Reads knobs from parsed flags and the environment, collecting every error.
pub struct Loader<'a> {
    matches: clap::ArgMatches,
    env: &'a dyn Fn(&str) -> Option<String>,
    errors: Vec<String>,
    effective: Vec<Effective>,
}

impl<'a> Loader<'a> {
    /// Parses `args` (including the program name) against `knobs`; `env` looks up
    /// environment variables (`|k| std::env::var(k).ok()` in a binary, a map in tests).
    pub fn new(
        cmd: clap::Command,
        args: impl IntoIterator<Item = String>,
        env: &'a dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let matches = cmd.try_get_matches_from(args)?;
        Ok(Self {
            matches,
            env,
            errors: Vec::new(),
            effective: Vec::new(),
        })
    }

    fn raw(&self, knob: &Knob) -> Option<(String, Source)> {
        if knob.switch {
            if self.matches.get_flag(knob.flag) {
                return Some(("true".to_string(), Source::Flag));
            }
        } else if let Some(v) = self.matches.get_one::<String>(knob.flag) {
            return Some((v.clone(), Source::Flag));
        }
        if let Some(v) = (self.env)(knob.env) {
            return Some((v, Source::Env));
        }
        knob.default.map(|d| (d.to_string(), Source::Default))
    }

    /// The knob's value parsed with `parse`; `None` when it is unset (no default) or
    /// invalid (the error is kept for [`Loader::finish`]).
    pub fn get<T>(
        &mut self,
        knob: &Knob,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let Some((raw, source)) = self.raw(knob) else {
            // Unset and without a default: still listed, so /config shows every knob.
            self.effective.push(Effective {
                env: knob.env,
                value: String::new(),
                source: Source::Default,
            });
            return None;
        };
        match parse(raw.trim()) {
            Ok(v) => {
                self.effective.push(Effective {
                    env: knob.env,
                    value: raw,
                    source,
                });
                Some(v)
            }
            Err(e) => {
                let from = match source {
                    Source::Flag => format!("--{}", knob.flag),
                    Source::Env => knob.env.to_string(),
                    Source::Default => format!("default of {}", knob.env),
                };
                self.errors.push(format!("{from}={raw:?}: {e}"));
                None
            }
        }
    }

    /// A knob that must have a value: its default, or an error naming it.
    pub fn required<T>(
        &mut self,
        knob: &Knob,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        if self.raw(knob).is_none() {
            self.errors.push(format!(
                "{} (--{}) must be set: {}",
                knob.env, knob.flag, knob.help
            ));
            return None;
        }
        self.get(knob, parse)
    }

    /// A switch's value.
    pub fn flag(&mut self, knob: &Knob) -> bool {
        self.get(knob, parse_bool).unwrap_or(false)
    }

    /// Records an error that involves several knobs at once.
    pub fn error(&mut self, message: impl Into<String>) {
        self.errors.push(message.into());
    }

    /// The effective values on success, every error otherwise.
    pub fn finish(self) -> Result<Vec<Effective>, ConfigError> {
        if self.errors.is_empty() {
            Ok(self.effective)
        } else {
            Err(ConfigError::Invalid(self.errors))
        }
    }
}

/// A knob's value after [`Loader::finish`] succeeded: every knob with a default or a
/// validated value is present, so `None` here is a bug in the caller, reported as such.
pub fn present<T>(value: Option<T>) -> Result<T, ConfigError> {
    value.ok_or_else(|| ConfigError::Invalid(vec!["internal: a knob read without a value".into()]))
}

/// `true`/`false` (also `1`/`0`, `yes`/`no`).
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" | "" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

/// A duration such as `500ms`, `10s`, `5m`, `24h` (a bare number is seconds).
/// A non-empty path.
pub fn parse_path(s: &str) -> Result<std::path::PathBuf, String> {
    if s.is_empty() {
        Err("expected a path".to_string())
    } else {
        Ok(std::path::PathBuf::from(s))
    }
}

pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| "expected a duration such as 500ms, 10s, 5m or 24h".to_string())?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("unknown unit {unit:?}: use ms, s, m or h")),
    };
    std::time::Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

/// A TCP port, 1..=65535.
pub fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(0) | Err(_) => Err("expected a port number from 1 to 65535".into()),
        Ok(p) => Ok(p),
    }
}

/// A port or an inclusive range (`8000-8100`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}:{}", self.first, self.last)
        }
    }
}

/// A comma-separated list of ports and ranges (`25,587,8000-8100`); empty is none.
pub fn parse_port_ranges(s: &str) -> Result<Vec<PortRange>, String> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (a, b) = item.split_once(['-', ':']).unwrap_or((item, item));
        let first = parse_port(a.trim()).map_err(|e| format!("{item:?}: {e}"))?;
        let last = parse_port(b.trim()).map_err(|e| format!("{item:?}: {e}"))?;
        if first > last {
            return Err(format!("{item:?}: range starts after it ends"));
        }
        out.push(PortRange { first, last });
    }
    Ok(out)
}

/// Writes the effective configuration as a flat JSON object (for `/config`).
pub fn to_json(effective: &[Effective]) -> String {
    let mut out = String::from("{");
    for (i, e) in effective.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(
            "\n  {}: {{\"value\": {}, \"source\": \"{}\"}}",
            json_string(e.env),
            json_string(&e.value),
            e.source
        ));
    }
    out.push_str("\n}\n");
    out
}

/// `s` as a JSON string literal.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const ADDR: Knob = Knob::value("addr", "REMORA_ADDR", Some("127.0.0.1:1"), "an address");
    const PORT: Knob = Knob::value("port", "REMORA_PORT", None, "a port");
    const DRY: Knob = Knob::switch("dry-run", "REMORA_DRY_RUN", "print only");

    fn loader<'a>(args: &[&str], env: &'a dyn Fn(&str) -> Option<String>) -> Loader<'a> {
        let cmd = command("t", "test", &[ADDR, PORT, DRY]);
        let args = std::iter::once("t")
            .chain(args.iter().copied())
            .map(String::from);
        Loader::new(cmd, args, env).unwrap()
    }

    #[test]
    fn flag_beats_env_beats_default() {
        let env: HashMap<&str, &str> = [("REMORA_ADDR", "env"), ("REMORA_PORT", "80")].into();
        let lookup = |k: &str| env.get(k).map(|v| v.to_string());
        let mut l = loader(&["--addr", "flag"], &lookup);
        assert_eq!(l.get(&ADDR, |s| Ok(s.to_string())).unwrap(), "flag");
        assert_eq!(l.get(&PORT, parse_port).unwrap(), 80);
        assert!(!l.flag(&DRY));
        let eff = l.finish().unwrap();
        assert_eq!(eff[0].source, Source::Flag);
        assert_eq!(eff[1].source, Source::Env);
    }

    #[test]
    fn all_errors_are_reported_at_once() {
        let env: HashMap<&str, &str> =
            [("REMORA_PORT", "99999"), ("REMORA_DRY_RUN", "maybe")].into();
        let lookup = |k: &str| env.get(k).map(|v| v.to_string());
        let mut l = loader(&["--addr", "nope"], &lookup);
        assert!(
            l.get(&ADDR, |s| s
                .parse::<std::net::SocketAddr>()
                .map_err(|e| e.to_string()))
                .is_none()
        );
        assert!(l.get(&PORT, parse_port).is_none());
        l.flag(&DRY);
        let msg = l.finish().unwrap_err().to_string();
        assert!(msg.contains("--addr=\"nope\""), "{msg}");
        assert!(msg.contains("REMORA_PORT=\"99999\""), "{msg}");
        assert!(msg.contains("REMORA_DRY_RUN=\"maybe\""), "{msg}");
    }

    #[test]
    fn required_knob_names_itself() {
        let lookup = |_: &str| None;
        let mut l = loader(&[], &lookup);
        assert!(l.required(&PORT, parse_port).is_none());
        assert!(
            l.finish()
                .unwrap_err()
                .to_string()
                .contains("REMORA_PORT (--port) must be set")
        );
    }

    #[test]
    fn durations_and_port_ranges() {
        assert_eq!(parse_duration("250ms").unwrap().as_millis(), 250);
        assert_eq!(parse_duration("10").unwrap().as_secs(), 10);
        assert_eq!(parse_duration("2h").unwrap().as_secs(), 7200);
        assert!(parse_duration("10parsecs").is_err());
        assert!(parse_duration("").is_err());
        let r = parse_port_ranges("25, 8000-8100,6379:6380").unwrap();
        assert_eq!(r.len(), 3);
        assert!(r[1].contains(8050) && !r[1].contains(8101));
        assert_eq!(r[2].to_string(), "6379:6380");
        assert!(parse_port_ranges("0").is_err());
        assert!(parse_port_ranges("90-80").is_err());
        assert!(parse_port_ranges("").unwrap().is_empty());
    }

    #[test]
    fn json_escapes() {
        let e = [Effective {
            env: "REMORA_X",
            value: "a\"b\n".into(),
            source: Source::Env,
        }];
        assert_eq!(
            to_json(&e),
            "{\n  \"REMORA_X\": {\"value\": \"a\\\"b\\u000a\", \"source\": \"env\"}\n}\n"
        );
    }
}
