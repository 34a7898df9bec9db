//! The standard `process_*` metrics, read from `/proc/self` on each scrape.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Unit,
};

/// Clock ticks per second in `/proc/<pid>/stat` (USER_HZ, 100 on every Linux ABI).
const TICKS_PER_SECOND: f64 = 100.0;

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
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // Fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
        if let (Some(utime), Some(stime)) = (field(14), field(15)) {
            let cpu = ConstCounter::new((utime + stime) / TICKS_PER_SECOND);
            let e = encoder.encode_descriptor(
                "process_cpu",
                "User and system CPU time spent",
                Some(&Unit::Seconds),
                MetricType::Counter,
            )?;
            cpu.encode(e)?;
        }
        if let Some(threads) = field(20) {
            gauge(&mut encoder, "process_threads", "OS threads", None, threads)?;
        }
        if let (Some(start), Some(boot)) = (field(22), boot_time()) {
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
}
