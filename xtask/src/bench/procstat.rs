//! Readings of a process from `/proc`: CPU time, peak and private memory.

/// Clock ticks per second in `/proc/<pid>/stat` (USER_HZ).
const TICKS_PER_SECOND: f64 = 100.0;

/// User + system CPU seconds `pid` has used.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (field(14) + field(15)) / TICKS_PER_SECOND
}

/// Peak resident memory (VmHWM) in MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    kib_field(&format!("/proc/{pid}/status"), "VmHWM:") / 1024.0
}

/// Resident memory now (VmRSS) in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    kib_field(&format!("/proc/{pid}/status"), "VmRSS:") / 1024.0
}

/// Private (not shared with any other process) memory in MiB, clean plus dirty.
pub fn private_mib(pid: u32) -> f64 {
    let path = format!("/proc/{pid}/smaps_rollup");
    (kib_field(&path, "Private_Clean:") + kib_field(&path, "Private_Dirty:")) / 1024.0
}

fn kib_field(path: &str, key: &str) -> f64 {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    remora_admin::kib_field(&text, key).unwrap_or(0) as f64
}
