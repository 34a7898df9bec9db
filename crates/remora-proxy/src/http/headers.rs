//! Hop-by-hop header handling (RFC 9110 §7.6.1): fields that describe one connection
//! are removed before a message is sent on another.

use http::{HeaderMap, HeaderValue, Method, Request, header};

/// Connection-specific fields a proxy never forwards (besides those `Connection` names).
const HOP_BY_HOP: [&str; 5] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
];

/// True when `req` asks to switch protocols (`Connection: upgrade` + `Upgrade`) or to
/// tunnel (`CONNECT`): after a successful response its connection carries raw bytes.
pub fn wants_upgrade<B>(req: &Request<B>) -> bool {
    upgrade_requested(req.method(), req.headers())
}

/// [`wants_upgrade`] for a request taken apart.
pub fn upgrade_requested(method: &Method, headers: &HeaderMap) -> bool {
    if method == Method::CONNECT {
        return true;
    }
    // An h2c upgrade is not carried: between proxies requests travel as HTTP/2 anyway,
    // and passing it on would let a client smuggle a second protocol past the proxy.
    let h2c = headers.get_all(header::UPGRADE).iter().any(|v| {
        v.to_str()
            .unwrap_or("")
            .to_ascii_lowercase()
            .contains("h2c")
    });
    headers.contains_key(header::UPGRADE)
        && !h2c
        && connection_tokens(headers).any(|t| t == "upgrade")
}

/// Removes hop-by-hop fields from `headers`. With `keep_upgrade`, `Connection: upgrade`
/// and `Upgrade` stay: the next hop must see the upgrade request or its acceptance.
/// `TE` is kept only as `trailers`, which gRPC relies on.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<String> = connection_tokens(headers)
        .filter(|t| !(keep_upgrade && t == "upgrade"))
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    for name in HOP_BY_HOP {
        if keep_upgrade && (name == "connection" || name == "upgrade") {
            continue;
        }
        headers.remove(name);
    }
    if keep_upgrade && headers.contains_key(header::CONNECTION) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The lower-cased tokens of every `Connection` field.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = String> + '_ {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<String> {
        let mut n: Vec<String> = h
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap()))
            .collect();
        n.sort();
        n
    }

    #[test]
    fn strips_listed_and_standard_hop_by_hop_fields() {
        let mut h = headers(&[
            ("connection", "keep-alive, X-Secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("proxy-connection", "keep-alive"),
            ("te", "gzip, trailers"),
            ("host", "svc"),
            ("content-length", "3"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(
            names(&h),
            ["content-length: 3", "host: svc", "te: trailers"]
        );
    }

    #[test]
    fn te_without_trailers_is_dropped() {
        let mut h = headers(&[("te", "gzip")]);
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty());
    }

    #[test]
    fn upgrade_survives_when_asked() {
        let mut h = headers(&[
            ("connection", "Upgrade, keep-alive"),
            ("upgrade", "websocket"),
            ("keep-alive", "1"),
            ("sec-websocket-key", "k"),
        ]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(
            names(&h),
            [
                "connection: upgrade",
                "sec-websocket-key: k",
                "upgrade: websocket"
            ]
        );
    }

    #[test]
    fn detects_upgrade_and_connect() {
        let ws = Request::get("/")
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        assert!(wants_upgrade(&ws));
        let no_token = Request::get("/")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        assert!(!wants_upgrade(&no_token));
        let connect = Request::connect("example.com:443").body(()).unwrap();
        assert!(wants_upgrade(&connect));
        // h2c is never passed on: its Upgrade header is stripped as hop-by-hop.
        let h2c = Request::get("/")
            .header("connection", "Upgrade, HTTP2-Settings")
            .header("upgrade", "h2c")
            .body(())
            .unwrap();
        assert!(!wants_upgrade(&h2c));
    }
}
