//! Protocol detection: decides from a connection's first bytes whether it speaks
//! HTTP/1, HTTP/2 (prior knowledge, as gRPC does) or something else ([`classify`]),
//! racing the client's first bytes against the server's ([`race`]).

mod race;

pub use race::{Detection, RaceError, race};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The most bytes read while detecting. A request line longer than this is still
/// proxied, as opaque TCP: detection never refuses a connection.
pub const MAX_DETECT_BYTES: usize = 8 * 1024;

/// The longest method name accepted (`PROPPATCH`, `MKCALENDAR` and friends fit).
const MAX_METHOD_LEN: usize = 24;

/// What the bytes seen so far say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Http1,
    Http2,
    /// A whole TLS ClientHello record: its SNI decides what happens.
    Tls,
    /// Not HTTP: proxy as TCP.
    Opaque,
    /// Could still be HTTP: read more.
    NeedMore,
}

/// Classifies a connection's first bytes.
pub fn classify(buf: &[u8]) -> Verdict {
    if buf.is_empty() {
        return Verdict::NeedMore;
    }
    if buf[0] == TLS_HANDSHAKE {
        return classify_tls(buf);
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Verdict::Http2
        } else {
            Verdict::NeedMore
        };
    }
    let verdict = classify_http1(buf);
    if verdict == Verdict::NeedMore && buf.len() >= MAX_DETECT_BYTES {
        return Verdict::Opaque;
    }
    verdict
}

/// The content type of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// Waits for a whole ClientHello, which a client may split over several handshake
/// records (`16 03 0x len len`); one too long to buffer, or records that are not a
/// ClientHello, are opaque.
fn classify_tls(buf: &[u8]) -> Verdict {
    // The handshake bytes so far: their count, and the header (type 1 = ClientHello,
    // then a 3-byte length), which may itself be split between records.
    let mut header = [0u8; 4];
    let mut seen = 0usize;
    let mut at = 0usize;
    while at < buf.len() {
        let rest = &buf[at..];
        if rest[0] != TLS_HANDSHAKE || rest.get(1).is_some_and(|&v| v != 0x03) {
            return Verdict::Opaque;
        }
        if rest.len() < 5 {
            break;
        }
        let len = u16::from_be_bytes([rest[3], rest[4]]) as usize;
        if len == 0 || at + 5 + len > MAX_DETECT_BYTES {
            return Verdict::Opaque;
        }
        let body = &rest[5..rest.len().min(5 + len)];
        for (i, &b) in body.iter().take(4usize.saturating_sub(seen)).enumerate() {
            header[seen + i] = b;
        }
        seen += body.len();
        if seen >= 4 && header[0] == 0x01 {
            let want = 4 + u32::from_be_bytes([0, header[1], header[2], header[3]]) as usize;
            if seen >= want && want <= MAX_DETECT_BYTES {
                // Whatever follows the ClientHello is the client's next flight.
                return Verdict::Tls;
            }
        }
        if body.len() < len {
            break;
        }
        at += 5 + len;
    }
    if seen > 0 && header[0] != 0x01 {
        return Verdict::Opaque;
    }
    if seen >= 4 {
        let want = 4 + u32::from_be_bytes([0, header[1], header[2], header[3]]) as usize;
        if want > MAX_DETECT_BYTES {
            return Verdict::Opaque;
        }
        if seen >= want {
            return Verdict::Tls;
        }
    }
    Verdict::NeedMore
}

/// Checks for an HTTP/1 request line: `token SP request-target SP HTTP/1.x CRLF`.
fn classify_http1(buf: &[u8]) -> Verdict {
    let method_len = buf.iter().take_while(|&&b| is_token(b)).count();
    if method_len > MAX_METHOD_LEN {
        return Verdict::Opaque;
    }
    let Some(&after_method) = buf.get(method_len) else {
        return Verdict::NeedMore;
    };
    if method_len == 0 || after_method != b' ' {
        return Verdict::Opaque;
    }
    let rest = &buf[method_len + 1..];
    let target_len = rest.iter().take_while(|&&b| b.is_ascii_graphic()).count();
    let Some(&after_target) = rest.get(target_len) else {
        return Verdict::NeedMore;
    };
    if target_len == 0 || after_target != b' ' {
        return Verdict::Opaque;
    }
    let version = &rest[target_len + 1..];
    for want in [b"HTTP/1.1\r\n".as_slice(), b"HTTP/1.0\r\n".as_slice()] {
        let n = version.len().min(want.len());
        if version[..n] == want[..n] {
            return if n == want.len() {
                Verdict::Http1
            } else {
                Verdict::NeedMore
            };
        }
    }
    Verdict::Opaque
}

/// RFC 9110 `tchar`.
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Verdict::*;

    #[test]
    fn table() {
        // A request line that has not ended within the detect buffer is not waited for.
        let long_target = format!("GET /{}", "a".repeat(MAX_DETECT_BYTES));
        let cases: &[(&[u8], Verdict)] = &[
            (b"", NeedMore),
            (b"G", NeedMore),
            (b"GET", NeedMore),
            (b"GET /", NeedMore),
            (b"GET / HTTP/1.1", NeedMore),
            (b"GET / HTTP/1.1\r", NeedMore),
            (b"GET / HTTP/1.1\r\n", Http1),
            (b"GET /x?y=1 HTTP/1.0\r\nHost: a\r\n\r\n", Http1),
            (b"M-SEARCH * HTTP/1.1\r\n", Http1),
            (b"CONNECT example.com:443 HTTP/1.1\r\n", Http1),
            (b"P", NeedMore),
            (b"PRI * HTTP/2.0\r\n", NeedMore),
            (H2_PREFACE, Http2),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04", Http2),
            // A PRI request line that is not the preface is not HTTP/1.x either.
            (b"PRI * HTTP/2.0\r\n\r\nXX", Opaque),
            (b"GET / HTTP/2.0\r\n", Opaque),
            (b"GET / SPDY/3\r\n", Opaque),
            (b"GET  / HTTP/1.1\r\n", Opaque),
            (b"GET /\x00 HTTP/1.1\r\n", Opaque),
            (b" GET / HTTP/1.1\r\n", Opaque),
            (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", NeedMore),
            // A ClientHello of 4 bytes in one record, then in two records.
            (b"\x16\x03\x01\x00\x04\x01\x00\x00\x00", Tls),
            (b"\x16\x03\x01\x00\x04\x01\x00\x00\x00more", Tls),
            (b"\x16\x03\x01\x00\x02\x01\x00", NeedMore),
            (
                b"\x16\x03\x01\x00\x02\x01\x00\x16\x03\x01\x00\x02\x00\x00",
                Tls,
            ),
            (b"\x16\x03\x01\x00\x02\x01\x00\x17\x03", Opaque),
            (b"\x16\x03\x01\xff\xff", Opaque),
            (b"\x16\x05", Opaque),
            (b"\x16\x03\x01\x00\xffnot a hello", Opaque),
            (b"SSH-2.0-OpenSSH_9.2\r\n", Opaque),
            (b"\x00\x00\x00\x00", Opaque),
            (b"*3\r\n$3\r\nSET\r\n", Opaque),
            (
                b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                Opaque,
            ),
            (long_target.as_bytes(), Opaque),
        ];
        for (input, want) in cases {
            assert_eq!(
                classify(input),
                *want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn every_prefix_of_a_request_waits_for_more() {
        for full in [b"DELETE /items/7 HTTP/1.1\r\n".as_slice(), H2_PREFACE] {
            for n in 1..full.len() {
                assert_eq!(classify(&full[..n]), NeedMore, "prefix of {n} bytes");
            }
        }
    }
}
