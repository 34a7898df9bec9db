//! `/metrics` in the format the scraper asks for: OpenMetrics (what `prometheus-client`
//! writes) when the `Accept` header names it, as Prometheus' own scrapes do, and the
//! Prometheus text format 0.0.4 otherwise — what `curl`, `promtool check metrics` and
//! older scrapers read. The two differ only in framing: 0.0.4 has no `# EOF` or
//! `# UNIT`, names a counter's family by its `_total` sample, and has no `info` type.

/// The content type of the OpenMetrics text format.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of the Prometheus text format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether an `Accept` header asks for OpenMetrics (at any non-zero quality).
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',').any(|range| {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("");
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
        })
    })
}

/// The Prometheus text format (0.0.4) of `openmetrics`, an exposition as
/// `prometheus-client` writes it (`# HELP`, `# TYPE`, optional `# UNIT`, samples, one
/// family after another, `# EOF` last).
pub fn prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // A family's `# HELP` comes before its `# TYPE`: held until the type says what the
    // family is called in 0.0.4.
    let mut help: Option<&str> = None;
    let mut counter: Option<&str> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            flush_help(&mut out, help.take(), None);
            help = Some(rest);
            counter = None;
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (renamed, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "gaugehistogram" => (name.to_string(), "histogram"),
                "stateset" => (name.to_string(), "gauge"),
                "unknown" => (name.to_string(), "untyped"),
                other => (name.to_string(), other),
            };
            flush_help(&mut out, help.take(), Some(&renamed));
            out.push_str(&format!("# TYPE {renamed} {kind}\n"));
            counter = (kind == "counter").then_some(name);
        } else if line.starts_with("# UNIT ") || line == "# EOF" {
        } else if counter.is_some_and(|c| {
            line.strip_prefix(c)
                .is_some_and(|s| s.starts_with("_created"))
        }) {
            // A counter's creation time has no place in 0.0.4.
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    flush_help(&mut out, help, None);
    out
}

/// Writes a held `# HELP name text` line, under `renamed` if given. OpenMetrics escapes
/// `"` in help text; 0.0.4 does not.
fn flush_help(out: &mut String, help: Option<&str>, renamed: Option<&str>) {
    let Some(help) = help else { return };
    let (name, text) = help.split_once(' ').unwrap_or((help, ""));
    let text = text.replace("\\\"", "\"");
    out.push_str(&format!("# HELP {} {text}\n", renamed.unwrap_or(name)));
}

#[cfg(test)]
mod tests {
    use prometheus_client::{
        encoding::text::encode,
        metrics::{
            counter::Counter, family::Family, gauge::Gauge, histogram::Histogram, info::Info,
        },
        registry::Registry,
    };

    use super::*;

    #[test]
    fn accept_headers() {
        for (accept, openmetrics) in [
            (None, false),
            (Some("*/*"), false),
            (Some("text/plain"), false),
            (
                Some(
                    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                ),
                true,
            ),
            (Some("text/plain, Application/OpenMetrics-Text"), true),
            (Some("application/openmetrics-text; q=0"), false),
        ] {
            assert_eq!(wants_openmetrics(accept), openmetrics, "{accept:?}");
        }
    }

    #[test]
    fn every_family_kind_in_the_text_format() {
        let mut r = Registry::with_prefix("remora");
        let c = Family::<Vec<(String, String)>, Counter>::default();
        c.get_or_create(&vec![("direction".into(), "in\"bound".into())])
            .inc_by(3);
        r.register("requests", "Requests \"received\"", c);
        let g = Gauge::<i64>::default();
        g.set(-2);
        r.register("open", "Open now", g);
        let h = Histogram::new([0.5, 1.0]);
        h.observe(0.7);
        r.register_with_unit(
            "duration",
            "How long",
            prometheus_client::registry::Unit::Seconds,
            h,
        );
        r.register("build", "Build", Info::new(vec![("version", "1.0")]));
        let mut om = String::new();
        encode(&mut om, &r).unwrap();
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert_eq!(
            prometheus_text(&om),
            "# HELP remora_requests_total Requests \"received\".\n\
             # TYPE remora_requests_total counter\n\
             remora_requests_total{direction=\"in\\\"bound\"} 3\n\
             # HELP remora_open Open now.\n\
             # TYPE remora_open gauge\n\
             remora_open -2\n\
             # HELP remora_duration_seconds How long.\n\
             # TYPE remora_duration_seconds histogram\n\
             remora_duration_seconds_sum 0.7\n\
             remora_duration_seconds_count 1\n\
             remora_duration_seconds_bucket{le=\"0.5\"} 0\n\
             remora_duration_seconds_bucket{le=\"1.0\"} 1\n\
             remora_duration_seconds_bucket{le=\"+Inf\"} 1\n\
             # HELP remora_build_info Build.\n\
             # TYPE remora_build_info gauge\n\
             remora_build_info{version=\"1.0\"} 1\n",
            "from:\n{om}"
        );
    }

    #[test]
    fn a_created_sample_is_dropped_and_help_without_type_is_kept() {
        let om = "# HELP a_thing Things.\n# TYPE a_thing counter\na_thing_total 1\na_thing_created 1.7e9\n# HELP lone Lone.\n# EOF\n";
        assert_eq!(
            prometheus_text(om),
            "# HELP a_thing_total Things.\n# TYPE a_thing_total counter\na_thing_total 1\n# HELP lone Lone.\n"
        );
    }
}
