//! The access log (`REMORA_ACCESS_LOG=json|plain`, off by default): one line per HTTP
//! request on standard output, written by a task of its own through a bounded queue.
//! The data path never waits for it: when the queue is full (standard output is slow,
//! or nobody reads it) the line is dropped and counted in
//! `remora_access_log_dropped_total`.

use std::{fmt::Write as _, io::Write, net::SocketAddr, time::Duration};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

/// How many lines may wait for the writer.
pub const QUEUE: usize = 1024;

/// How lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    Json,
    /// `key=value` pairs, values quoted where they need it.
    Plain,
}

impl Format {
    /// `json`, `plain`, or `off` (None).
    pub fn parse(s: &str) -> Result<Option<Self>, String> {
        match s {
            "json" => Ok(Some(Self::Json)),
            "plain" => Ok(Some(Self::Plain)),
            "off" | "" => Ok(None),
            _ => Err("expected json, plain or off".into()),
        }
    }
}

/// One request, as the access log tells it.
#[derive(Debug, Clone)]
pub struct Record<'a> {
    pub direction: &'static str,
    pub method: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    /// The status the client got (the proxy's own, when it answered itself).
    pub status: u16,
    /// From the request's arrival to its response headers.
    pub duration: Duration,
    pub retries: u32,
    /// `namespace/name` of the HTTPRoute the request matched, or empty.
    pub route: &'a str,
    /// The Service it went to (outbound), or empty.
    pub backend: &'a str,
    /// The endpoint that answered last (outbound), if any.
    pub endpoint: Option<SocketAddr>,
    /// The client's SPIFFE ID (inbound) or the server's (outbound), or empty.
    pub peer_identity: &'a str,
    /// The `target` label: the Service, `passthrough`, or the inbound port.
    pub target: &'a str,
}

/// Where the data path hands its lines; cheap to clone.
#[derive(Debug, Clone)]
pub struct AccessLog {
    format: Format,
    tx: mpsc::Sender<String>,
    dropped: Counter,
}

impl AccessLog {
    /// The log, writing to `out` on a thread of its own (standard output may block; the
    /// runtime's threads never wait for it). The thread ends when the last clone of the
    /// log is dropped.
    pub fn start<W: Write + Send + 'static>(
        format: Format,
        out: W,
        dropped: Counter,
    ) -> std::io::Result<(Self, std::thread::JoinHandle<()>)> {
        let (log, rx) = Self::queue(format, dropped);
        let writer = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(rx, out))?;
        Ok((log, writer))
    }

    fn queue(format: Format, dropped: Counter) -> (Self, mpsc::Receiver<String>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (
            Self {
                format,
                tx,
                dropped,
            },
            rx,
        )
    }

    /// Queues `r`'s line; drops and counts it if the queue is full (before formatting
    /// it: a line that cannot be queued costs nothing more).
    pub fn record(&self, r: &Record<'_>) {
        let Ok(slot) = self.tx.try_reserve() else {
            self.dropped.inc();
            return;
        };
        slot.send(match self.format {
            Format::Json => json_line(r),
            Format::Plain => plain_line(r),
        });
    }
}

/// Writes lines as they come, flushing whenever the queue is empty; ends when every
/// sender is gone or the output fails.
fn write_lines<W: Write>(mut rx: mpsc::Receiver<String>, out: W) {
    let mut out = std::io::BufWriter::new(out);
    while let Some(line) = rx.blocking_recv() {
        if out.write_all(line.as_bytes()).is_err() {
            return;
        }
        while let Ok(line) = rx.try_recv() {
            if out.write_all(line.as_bytes()).is_err() {
                return;
            }
        }
        if out.flush().is_err() {
            return;
        }
    }
}

fn timestamp() -> String {
    remora_admin::time::rfc3339_micros(std::time::SystemTime::now())
}

fn json_line(r: &Record<'_>) -> String {
    let endpoint = r.endpoint.map(|e| e.to_string()).unwrap_or_default();
    let value = serde_json::json!({
        "time": timestamp(),
        "direction": r.direction,
        "method": r.method,
        "authority": r.authority,
        "path": r.path,
        "status": r.status,
        "duration_ms": (r.duration.as_secs_f64() * 1e6).round() / 1e3,
        "retries": r.retries,
        "route": r.route,
        "backend": r.backend,
        "endpoint": endpoint,
        "peer_identity": r.peer_identity,
        "target": r.target,
    });
    let mut line = value.to_string();
    line.push('\n');
    line
}

fn plain_line(r: &Record<'_>) -> String {
    let mut line = String::with_capacity(256);
    let endpoint = r.endpoint.map(|e| e.to_string()).unwrap_or_default();
    let _ = write!(
        line,
        "time={} direction={} method={} authority={} path={} status={} duration_ms={:.3} \
         retries={} route={} backend={} endpoint={} peer_identity={} target={}",
        timestamp(),
        r.direction,
        quoted(r.method),
        quoted(r.authority),
        quoted(r.path),
        r.status,
        r.duration.as_secs_f64() * 1e3,
        r.retries,
        quoted(r.route),
        quoted(r.backend),
        quoted(&endpoint),
        quoted(r.peer_identity),
        quoted(r.target),
    );
    line.push('\n');
    line
}

/// A value as it is when it is plain, otherwise in double quotes with `"`, `\` and
/// control characters escaped: a hostile path cannot forge fields or lines.
fn quoted(v: &str) -> String {
    let plain = !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_graphic() && c != '"' && c != '\\' && c != '=');
    if plain {
        return v.to_string();
    }
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record<'static> {
        Record {
            direction: "outbound",
            method: "GET",
            authority: "web.shop.svc.cluster.local",
            path: "/a b\"\n\\x=1",
            status: 503,
            duration: Duration::from_micros(1_234),
            retries: 2,
            route: "shop/web-split",
            backend: "web-v2.shop:80",
            endpoint: Some("10.0.0.7:8080".parse().unwrap()),
            peer_identity: "spiffe://cluster.local/ns/shop/sa/web",
            target: "web.shop:80",
        }
    }

    #[test]
    fn json_lines_carry_every_field() {
        let line = json_line(&record());
        assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["path"], "/a b\"\n\\x=1");
        assert_eq!(v["status"], 503);
        assert_eq!(v["duration_ms"], 1.234);
        assert_eq!(v["retries"], 2);
        assert_eq!(v["endpoint"], "10.0.0.7:8080");
        assert_eq!(v["route"], "shop/web-split");
        let time = v["time"].as_str().unwrap();
        assert_eq!(time.len(), "2026-12-01T05:19:00.000000Z".len(), "{time}");
        assert!(time.starts_with("20") && time.ends_with('Z'), "{time}");
    }

    #[test]
    fn plain_lines_cannot_be_forged() {
        let line = plain_line(&record());
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        assert!(line.contains(r#" path="/a b\"\u{a}\\x=1" "#), "{line}");
        assert!(
            line.contains(" status=503 duration_ms=1.234 retries=2 "),
            "{line}"
        );
        assert!(line.contains(" route=shop/web-split "), "{line}");
        assert!(line.contains(" endpoint=10.0.0.7:8080 "), "{line}");
        let empty = Record {
            route: "",
            endpoint: None,
            ..record()
        };
        assert!(plain_line(&empty).contains(" route=\"\" "));
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let dropped = Counter::default();
        // No writer: nothing leaves the queue.
        let (log, _rx) = AccessLog::queue(Format::Plain, dropped.clone());
        for _ in 0..QUEUE + 10 {
            log.record(&record());
        }
        assert_eq!(dropped.get(), 10);
    }

    #[test]
    fn the_writer_writes_every_line_in_order() {
        #[derive(Clone, Default)]
        struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = Shared::default();
        let (log, writer) =
            AccessLog::start(Format::Json, out.clone(), Counter::default()).unwrap();
        for status in [200, 404, 503] {
            log.record(&Record { status, ..record() });
        }
        drop(log);
        writer.join().unwrap();
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let statuses: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["status"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(statuses, [200, 404, 503]);
    }

    #[test]
    fn formats() {
        assert_eq!(Format::parse("json"), Ok(Some(Format::Json)));
        assert_eq!(Format::parse("plain"), Ok(Some(Format::Plain)));
        assert_eq!(Format::parse("off"), Ok(None));
        assert!(Format::parse("yes").is_err());
    }
}
