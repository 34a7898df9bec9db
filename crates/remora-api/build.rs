//! Generates the Rust types and tonic clients/servers from `proto/remora/v1`,
//! with the pure-Rust `protox` compiler so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = ["common", "destination", "policy", "identity"]
        .map(|name| root.join(format!("remora/v1/{name}.proto")));
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let fds = protox::compile(&files, [&root])?;
    // Maps as BTreeMaps: a message encodes the same bytes every time, so its digest
    // (`revision`) is the same on every controller replica.
    tonic_prost_build::configure()
        .btree_map(".")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
