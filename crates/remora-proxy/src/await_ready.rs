//! `remora-proxy await-ready [--timeout 120s]`: waits until the proxy beside it answers
//! `/ready`. Where native sidecars are missing, the injector runs it as the proxy
//! container's `postStart` hook, so the kubelet starts the app only once the proxy
//! carries its traffic.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    process::ExitCode,
    time::{Duration, Instant},
};

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(100);

/// Runs the subcommand; `args` are those after `await-ready`.
pub fn main(args: &[String], env: &dyn Fn(&str) -> Option<String>) -> ExitCode {
    let (addr, timeout) = match parse(args, env) {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("remora-proxy await-ready: {e}");
            return ExitCode::from(2);
        }
    };
    let deadline = Instant::now() + timeout;
    let mut last = String::from("not tried");
    while Instant::now() < deadline {
        match ready(addr) {
            Ok(true) => return ExitCode::SUCCESS,
            Ok(false) => last = "not ready yet".into(),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(POLL);
    }
    eprintln!("remora-proxy await-ready: http://{addr}/ready after {timeout:?}: {last}");
    ExitCode::FAILURE
}

/// The admin address to ask (the first of `REMORA_ADMIN_ADDR`, on loopback) and the
/// timeout.
fn parse(
    args: &[String],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(SocketAddr, Duration), String> {
    let mut timeout = DEFAULT_TIMEOUT;
    let mut args = args.iter();
    while let Some(a) = args.next() {
        let value = match a.strip_prefix("--timeout") {
            Some("") => args.next().ok_or("--timeout needs a value")?.as_str(),
            Some(v) if v.starts_with('=') => &v[1..],
            _ => {
                return Err(format!(
                    "unexpected argument {a:?}; usage: await-ready [--timeout 120s]"
                ));
            }
        };
        timeout = remora_config::parse_duration(value).map_err(|e| format!("--timeout: {e}"))?;
    }
    let admin = env(crate::config::ADMIN_ADDR.env)
        .or(crate::config::ADMIN_ADDR.default.map(String::from))
        .unwrap_or_default();
    let first = admin.split(',').next().unwrap_or_default().trim();
    let mut addr: SocketAddr = first
        .parse()
        .map_err(|_| format!("REMORA_ADMIN_ADDR {first:?} is not an IP:port address"))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        });
    }
    Ok((addr, timeout))
}

/// One `GET /ready`: whether it answered 200.
fn ready(addr: SocketAddr) -> std::io::Result<bool> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.write_all(b"GET /ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)?;
    Ok(head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asks_loopback_and_reads_the_timeout() {
        let none = |_: &str| None;
        let (addr, timeout) = parse(&[], &none).unwrap();
        assert_eq!(addr, "127.0.0.1:4191".parse().unwrap());
        assert_eq!(timeout, DEFAULT_TIMEOUT);
        let env = |k: &str| (k == "REMORA_ADMIN_ADDR").then(|| "[::]:9999".to_string());
        let args = ["--timeout=5s".to_string()];
        assert_eq!(
            parse(&args, &env).unwrap(),
            ("[::1]:9999".parse().unwrap(), Duration::from_secs(5))
        );
        assert!(parse(&["--wait".into()], &none).is_err());
        assert!(parse(&["--timeout".into()], &none).is_err());
    }

    /// The admin port answering 503 to the first request and 200 after: `await-ready`
    /// polls through the 503 (and through any connection that fails on the way, as a
    /// loaded machine may make one) and succeeds at the 200.
    #[test]
    fn waits_for_a_200() {
        use std::sync::{
            Arc,
            atomic::{AtomicBool, AtomicUsize, Ordering},
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (answered, done) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let server = {
            let (answered, done) = (answered.clone(), done.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if done.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(mut s) = conn else { continue };
                    // The whole request head, then the answer, then a clean close.
                    let mut head = Vec::new();
                    let mut buf = [0u8; 512];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let status = match answered.fetch_add(1, Ordering::SeqCst) {
                        0 => "503 Service Unavailable",
                        _ => "200 OK",
                    };
                    let _ = write!(s, "HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                    let _ = s.shutdown(std::net::Shutdown::Write);
                    let _ = s.read(&mut buf);
                }
            })
        };
        let env = |k: &str| (k == "REMORA_ADMIN_ADDR").then(|| addr.to_string());
        assert_eq!(
            main(&["--timeout=10s".to_string()], &env),
            ExitCode::SUCCESS
        );
        assert!(
            answered.load(Ordering::SeqCst) >= 2,
            "a 503 first, then a 200"
        );
        done.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(addr);
        server.join().unwrap();
        // Nobody there: an error, not ready.
        assert!(ready(addr).is_err());
    }
}
