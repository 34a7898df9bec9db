//! Readings of a process from `/proc`: CPU time, peak and private memory.

use remora_admin::TICKS_PER_SECOND;

/// User + system CPU seconds `pid` has used; 0 once it is gone.
pub fn cpu_seconds(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    remora_admin::Stat::parse(&text)
        .cpu_seconds()
        .unwrap_or(0.0)
}

/// CPU seconds the hypervisor has taken from this machine's cores since boot ("steal",
/// the eighth figure of `/proc/stat`'s `cpu` line): time a vCPU was ready to run and
/// another guest ran instead. 0 where the kernel does not count it.
pub fn steal_seconds() -> f64 {
    steal_ticks(&std::fs::read_to_string("/proc/stat").unwrap_or_default())
        .map_or(0.0, |ticks| ticks as f64 / TICKS_PER_SECOND)
}

/// The steal figure of `/proc/stat`'s all-CPU line, in clock ticks.
fn steal_ticks(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("cpu "))
        .and_then(|rest| rest.split_whitespace().nth(7))
        .and_then(|v| v.parse().ok())
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

#[cfg(test)]
mod tests {
    use super::steal_ticks;

    #[test]
    fn steal_is_the_eighth_figure_of_the_all_cpu_line() {
        // As this machine's kernel (6.18) writes it: user nice system idle iowait irq
        // softirq steal guest guest_nice.
        let stat = "cpu  1154700 0 186397 10057944 10836 0 19890 19046 0 0\n\
                    cpu0 577350 0 93198 5028972 5418 0 9945 9523 0 0\n\
                    intr 1 2 3\n";
        assert_eq!(steal_ticks(stat), Some(19046));
        assert_eq!(
            steal_ticks("cpu0 1 2 3 4 5 6 7 8\n"),
            None,
            "per-CPU lines only"
        );
        assert_eq!(
            steal_ticks("cpu  1 2 3\n"),
            None,
            "a kernel without the figure"
        );
    }
}
