//! The images, as far as they can be checked without pulling a base image: the binaries
//! build static (musl), run with nothing around them, and the `FROM scratch` proxy and
//! controller images build from the real `Dockerfile` with Debian's `buildah`, with the
//! entrypoint, user and ports the chart and the injector rely on.
//!
//! The binaries checked are `make test`'s own static dev build (`make static-test`, which
//! puts them in dist/test/<arch>/); run alone, this suite builds them itself. The
//! release binaries `make static` makes are built the same way, with the release
//! profile. Without buildah it fails and says what to install.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

fn musl_target() -> String {
    format!("{}-unknown-linux-musl", std::env::consts::ARCH)
}

fn ok(out: Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The Docker name of this machine's architecture (dist/<arch>/).
fn dist_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => panic!("no image architecture for {other}"),
    }
}

/// `make static-test`: a no-op when `make test` already built them. Returns
/// dist/test/<arch>/.
fn static_binaries() -> PathBuf {
    let mut make = Command::new("make");
    // The variables cargo sets for this test (CARGO_PKG_NAME=remora-tests, …) would
    // look like a changed environment to build scripts that watch them (aws-lc-sys's
    // do) and rebuild everything; an outer make's jobserver is not ours to use.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_PRIMARY_",
            "CARGO_TARGET_TMPDIR",
            "MAKEFLAGS",
            "MFLAGS",
            "MAKELEVEL",
        ]
        .iter()
        .any(|p| key.starts_with(p))
        {
            make.env_remove(key.as_ref());
        }
    }
    let out = make
        .current_dir(root())
        .arg("static-test")
        .output()
        .expect("make runs");
    ok(
        out,
        &format!(
            "make static-test (needs `rustup target add {}` and Debian's musl-tools; .ci/run \
             installs both)",
            musl_target()
        ),
    );
    root().join("dist").join("test").join(dist_arch())
}

/// The ELF program header types of a 64-bit little-endian executable.
fn program_headers(elf: &[u8]) -> Vec<u32> {
    assert_eq!(&elf[..4], b"\x7fELF", "an ELF file");
    assert_eq!(elf[4], 2, "64-bit");
    assert_eq!(elf[5], 1, "little-endian");
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum)
        .map(|i| {
            let o = phoff + i * phentsize;
            u32::from_le_bytes(elf[o..o + 4].try_into().unwrap())
        })
        .collect()
}

const PT_INTERP: u32 = 3;

#[test]
fn the_binaries_are_static_and_run_with_nothing_around_them() {
    let built = static_binaries();
    // An empty root: no libc, no /etc, no /tmp — what a scratch image gives.
    let empty = std::env::temp_dir().join(format!("remora-scratch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&empty);
    std::fs::create_dir_all(&empty).unwrap();
    for (bin, args) in [
        ("remora-proxy", &["--help"][..]),
        ("remora-controller", &["--help"][..]),
        ("remora-init", &["--help"][..]),
        ("remora", &["version"][..]),
        ("remora-demo", &["--help"][..]),
    ] {
        let path = built.join(bin);
        let elf = std::fs::read(&path).unwrap_or_else(|e| {
            panic!("{}: {e} (the static build made no binary)", path.display())
        });
        let headers = program_headers(&elf);
        assert!(!headers.is_empty(), "{bin}: no program headers");
        assert!(
            !headers.contains(&PT_INTERP),
            "{bin} asks for a dynamic loader (PT_INTERP): it would not run on an empty base"
        );
        std::fs::copy(&path, empty.join(bin)).unwrap();
        let out = Command::new("chroot")
            .arg("--userspec=2102:2102")
            .arg(&empty)
            .arg(format!("/{bin}"))
            .args(args)
            .output()
            .expect("chroot runs (as root)");
        let text = ok(out, &format!("{bin} {} in an empty root", args.join(" ")));
        assert!(
            text.to_lowercase().contains("usage") || text.contains(env!("CARGO_PKG_VERSION")),
            "{bin} printed neither usage nor its version: {text}"
        );
    }
    std::fs::remove_dir_all(&empty).unwrap();
}

struct Buildah {
    root: PathBuf,
}

impl Buildah {
    fn new() -> Self {
        let root = std::env::temp_dir().join(format!("remora-buildah-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        Self { root }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("buildah")
            .arg("--root")
            .arg(self.root.join("storage"))
            .arg("--runroot")
            .arg(self.root.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .output()
            .unwrap_or_else(|e| {
                panic!("`buildah` cannot run ({e}): apt-get install -y buildah (.ci/run does)")
            })
    }

    /// Builds one stage of the Dockerfile from the prebuilt static binaries.
    fn build(&self, stage: &str) -> Value {
        let tag = format!("localhost/remora-test/{stage}:test");
        let context = root();
        let out = self.run(&[
            "build",
            "--isolation",
            "chroot",
            "--build-arg",
            "BINARIES=prebuilt",
            "--build-arg",
            "DIST=dist/test",
            "--target",
            stage,
            "-t",
            &tag,
            "-f",
            context.join("Dockerfile").to_str().unwrap(),
            context.to_str().unwrap(),
        ]);
        ok(out, &format!("buildah build --target {stage}"));
        let out = self.run(&["inspect", "--type", "image", &tag]);
        serde_json::from_str(&ok(out, "buildah inspect")).expect("inspect prints JSON")
    }

    /// The files of an image, as `buildah mount` shows them.
    fn files(&self, image: &str) -> (String, PathBuf) {
        let container = ok(self.run(&["from", image]), "buildah from")
            .trim()
            .to_string();
        let mnt = ok(self.run(&["mount", &container]), "buildah mount")
            .trim()
            .to_string();
        (container, PathBuf::from(mnt))
    }
}

impl Drop for Buildah {
    fn drop(&mut self) {
        let _ = self.run(&["rm", "--all"]);
        let _ = self.run(&["rmi", "--all", "--force"]);
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.root.join("storage"))
            .output();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn walk(dir: &Path, out: &mut Vec<String>, base: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            walk(&path, out, base);
        } else {
            out.push(format!(
                "/{}",
                path.strip_prefix(base).unwrap().to_string_lossy()
            ));
        }
    }
}

#[test]
fn scratch_images_of_the_proxy_controller_and_demo_build_from_the_dockerfile() {
    let built = static_binaries();
    let buildah = Buildah::new();
    for (stage, binary, user, ports) in [
        (
            "proxy",
            "remora-proxy",
            "2102:2102",
            &["4140/tcp", "4143/tcp", "4191/tcp"][..],
        ),
        (
            "controller",
            "remora-controller",
            "2103:2103",
            &["8086/tcp", "8443/tcp", "9990/tcp"][..],
        ),
        ("demo", "remora-demo", "65532:65532", &["8080/tcp"][..]),
    ] {
        let inspect = buildah.build(stage);
        let config = &inspect["OCIv1"]["config"];
        assert_eq!(
            config["Entrypoint"],
            serde_json::json!([format!("/{binary}")]),
            "{stage}: entrypoint (the injector runs /remora-proxy await-ready)"
        );
        assert_eq!(config["User"], user, "{stage}: user");
        let mut exposed: Vec<&str> = config["ExposedPorts"]
            .as_object()
            .map(|m| m.keys().map(String::as_str).collect())
            .unwrap_or_default();
        exposed.sort();
        assert_eq!(exposed, ports, "{stage}: exposed ports");
        assert_eq!(
            inspect["OCIv1"]["rootfs"]["diff_ids"]
                .as_array()
                .map(Vec::len),
            Some(1),
            "{stage}: one layer on an empty base"
        );

        // The image holds the one binary and nothing else, byte for byte the static
        // build's.
        let (_container, mnt) = buildah.files(&format!("localhost/remora-test/{stage}:test"));
        let mut files = Vec::new();
        walk(&mnt, &mut files, &mnt);
        assert_eq!(files, [format!("/{binary}")], "{stage}: files in the image");
        assert_eq!(
            std::fs::read(mnt.join(binary)).unwrap(),
            std::fs::read(built.join(binary)).unwrap(),
            "{stage}: the binary is the static build's"
        );
    }
}
