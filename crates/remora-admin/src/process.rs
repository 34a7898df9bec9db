//! The standard `process_*` metrics, read from `/proc/self` on each scrape.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Unit,
};

/// Clock ticks per second in `/proc/<pid>/stat` and `/proc/stat` (USER_HZ, 100 on every
/// Linux ABI).
pub const TICKS_PER_SECOND: f64 = 100.0;

/// The fields of a `/proc/<pid>/stat` line, numbered as proc(5) numbers them (1 is the
/// pid, 2 the command name in parentheses, which may hold spaces and parentheses).
pub struct Stat<'a>(Vec<&'a str>);

impl<'a> Stat<'a> {
    pub fn parse(text: &'a str) -> Self {
        Self(
            text.rsplit_once(')')
                .map(|(_, rest)| rest.split_whitespace().collect())
                .unwrap_or_default(),
        )
    }

    /// Field `n` (3 or above: the state and after) as a number.
    pub fn field(&self, n: usize) -> Option<f64> {
        self.0.get(n.checked_sub(3)?)?.parse().ok()
    }

    /// User plus system CPU time (fields 14 and 15), in seconds.
    pub fn cpu_seconds(&self) -> Option<f64> {
        Some((self.field(14)? + self.field(15)?) / TICKS_PER_SECOND)
    }
}

/// A `kB` field (`VmRSS:`, `VmHWM:`, `Private_Dirty:`…) of a `/proc` file's text
/// (`status`, `smaps_rollup`), in KiB.
pub fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A process's resident memory now (VmRSS), in KiB; `None` for this process.
pub fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".into(),
    };
    kib_field(&std::fs::read_to_string(path).ok()?, "VmRSS:")
}

#[derive(Debug, Clone, Copy)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let text = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let stat = Stat::parse(&text);
        if let Some(seconds) = stat.cpu_seconds() {
            let cpu = ConstCounter::new(seconds);
            let e = encoder.encode_descriptor(
                "process_cpu",
                "User and system CPU time spent",
                Some(&Unit::Seconds),
                MetricType::Counter,
            )?;
            cpu.encode(e)?;
        }
        if let Some(threads) = stat.field(20) {
            gauge(&mut encoder, "process_threads", "OS threads", None, threads)?;
        }
        if let (Some(start), Some(boot)) = (stat.field(22), boot_time()) {
            let at = boot + start / TICKS_PER_SECOND;
            gauge(
                &mut encoder,
                "process_start_time",
                "Start time since the epoch",
                Some(Unit::Seconds),
                at,
            )?;
        }
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let kib = |key: &str| kib_field(&status, key).map(|v| v as f64 * 1024.0);
        if let Some(rss) = kib("VmRSS:") {
            gauge(
                &mut encoder,
                "process_resident_memory",
                "Resident memory",
                Some(Unit::Bytes),
                rss,
            )?;
        }
        if let Some(vsz) = kib("VmSize:") {
            gauge(
                &mut encoder,
                "process_virtual_memory",
                "Virtual memory",
                Some(Unit::Bytes),
                vsz,
            )?;
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            gauge(
                &mut encoder,
                "process_open_fds",
                "Open file descriptors",
                None,
                fds.count() as f64,
            )?;
        }
        Ok(())
    }
}

fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let e = encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
    ConstGauge::new(value).encode(e)
}

/// The system's boot time, seconds since the epoch.
fn boot_time() -> Option<f64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kib_fields_are_read_from_proc_text() {
        let status = "Name:\tremora\nVmHWM:\t   20480 kB\nVmRSS:\t   12345 kB\nThreads:\t4\n";
        assert_eq!(kib_field(status, "VmRSS:"), Some(12_345));
        assert_eq!(kib_field(status, "VmHWM:"), Some(20_480));
        assert_eq!(kib_field(status, "VmSwap:"), None);
        assert_eq!(kib_field(status, "Name:"), None, "not a number");
        let own = rss_kib(None).expect("this process's VmRSS");
        assert!(own > 100, "{own} KiB");
        assert_eq!(rss_kib(Some(u32::MAX)), None, "no such process");
    }

    #[test]
    fn stat_fields_are_counted_past_a_command_name_with_spaces_and_parentheses() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt
        // cmajflt utime stime cutime cstime priority nice threads itrealvalue starttime
        let text = "42 (a) b (c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 9000 0";
        let stat = Stat::parse(text);
        assert_eq!(stat.field(3), None, "the state is not a number");
        assert_eq!(stat.field(14), Some(250.0));
        assert_eq!(stat.field(20), Some(3.0), "threads");
        assert_eq!(stat.field(22), Some(9000.0), "start time");
        assert_eq!(stat.cpu_seconds(), Some(3.0), "(250 + 50) ticks at 100 Hz");
        assert_eq!(stat.field(2), None, "the command name is not a field here");
        assert_eq!(Stat::parse("").cpu_seconds(), None);
        let own = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
        assert!(Stat::parse(&own).cpu_seconds().is_some(), "{own}");
    }
}
