//! Real client tools for tests: running skopeo, umoci and podman, and building real images offline with umoci (OCI
//! layouts whose layers are complete tars, so podman can unpack them), single-platform and multi-platform.
//!
//! The tools are required, not optional: a missing tool fails the test (run `scripts/test.sh`, which installs them).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Panics (never skips) when a tool the tests need is not installed.
pub fn require(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` is not installed: run scripts/test.sh (it installs docker-registry, skopeo, umoci, podman and curl)"
    );
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Runs a command to completion and returns its output, whatever its exit status.
pub fn output(cmd: &mut Command) -> Output {
    let line = describe(cmd);
    eprintln!("+ {line}");
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("could not run `{line}`: {e}"))
}

/// Runs a command, panics with its output unless it succeeds, returns its stdout.
pub fn run(cmd: &mut Command) -> String {
    let line = describe(cmd);
    let out = output(cmd);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "`{line}` failed ({})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        out.status
    );
    stdout
}

/// A private scratch directory for one test; removed on drop.
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("bw-tools-").tempdir().expect("tempdir")
}

/// `skopeo` with no dependency on the machine's policy.json and with its temporary files in `tmp`.
/// The command timeout only guards against a hung server; no test measures time.
pub fn skopeo(tmp: &Path) -> Command {
    require("skopeo");
    let mut cmd = Command::new("skopeo");
    cmd.arg("--insecure-policy")
        .args(["--command-timeout", "300s"])
        .arg("--tmpdir")
        .arg(tmp);
    cmd
}

pub fn umoci() -> Command {
    require("umoci");
    Command::new("umoci")
}

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// `oci:DIR:TAG`
pub fn oci_ref(layout: &Path, tag: &str) -> String {
    format!("oci:{}:{tag}", layout.display())
}

/// `skopeo copy` with TLS verification off on both sides (only docker:// references use it).
pub fn skopeo_copy(tmp: &Path, extra: &[&str], src: &str, dest: &str) {
    run(skopeo(tmp)
        .arg("copy")
        .args(["--src-tls-verify=false", "--dest-tls-verify=false"])
        .args(extra)
        .args([src, dest]));
}

/// The manifest bytes exactly as a registry serves them, via `skopeo inspect --raw`.
pub fn skopeo_raw(tmp: &Path, image: &str) -> Vec<u8> {
    let out = output(skopeo(tmp).args(["inspect", "--raw", "--tls-verify=false", image]));
    assert!(
        out.status.success(),
        "skopeo inspect --raw {image} failed\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

pub fn read_json(path: &Path) -> Value {
    let text = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_slice(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// The descriptor that a layout's index.json holds for `tag`.
pub fn layout_descriptor(layout: &Path, tag: &str) -> Value {
    let index = read_json(&layout.join("index.json"));
    let found: Vec<&Value> = index["manifests"]
        .as_array()
        .expect("index.json manifests")
        .iter()
        .filter(|d| d["annotations"][REF_NAME] == tag)
        .collect();
    assert_eq!(found.len(), 1, "exactly one entry for tag {tag} in {}/index.json: {index}", layout.display());
    found[0].clone()
}

pub fn layout_digest(layout: &Path, tag: &str) -> String {
    layout_descriptor(layout, tag)["digest"].as_str().expect("digest").to_string()
}

pub fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    let (algo, hex) = digest.split_once(':').expect("algo:hex digest");
    layout.join("blobs").join(algo).join(hex)
}

/// Reads a blob from a layout and checks that its bytes match its name.
pub fn layout_blob(layout: &Path, digest: &str) -> Vec<u8> {
    let path = blob_path(layout, digest);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("blob {digest} missing in {}: {e}", layout.display()));
    assert_eq!(sha256(&bytes), digest, "blob {} does not hash to its name", path.display());
    bytes
}

/// Every blob digest (config and layers) of the image manifest `digest` in `layout`.
pub fn layout_image_blobs(layout: &Path, digest: &str) -> Vec<String> {
    let m: Value = serde_json::from_slice(&layout_blob(layout, digest)).expect("manifest JSON");
    let mut out = vec![m["config"]["digest"].as_str().expect("config digest").to_string()];
    for l in m["layers"].as_array().expect("layers") {
        out.push(l["digest"].as_str().expect("layer digest").to_string());
    }
    out
}

/// Builds a one-layer image `layout:tag` for `linux/arch` whose layer holds `files`, with umoci alone (no network).
/// The layer is produced by `umoci repack`, so it is a complete tar that any client can extract.
/// Returns the manifest digest recorded in index.json.
pub fn build_image<C: AsRef<[u8]>>(layout: &Path, tag: &str, arch: &str, files: &[(&str, C)]) -> String {
    let image = format!("{}:{tag}", layout.display());
    if !layout.join("index.json").exists() {
        run(umoci().args(["init", "--layout"]).arg(layout));
    }
    run(umoci().args(["new", "--image", &image]));
    let bundle = layout.with_file_name(format!(
        "{}-bundle-{tag}",
        layout.file_name().expect("layout name").to_string_lossy()
    ));
    run(umoci().args(["unpack", "--rootless", "--image", &image]).arg(&bundle));
    for (name, content) in files {
        let path = bundle.join("rootfs").join(name);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir in rootfs");
        std::fs::write(&path, content.as_ref()).expect("write file in rootfs");
    }
    run(umoci().args(["repack", "--image", &image]).arg(&bundle));
    run(umoci().args(["config", "--image", &image, "--os", "linux", "--architecture", arch]));
    std::fs::remove_dir_all(&bundle).expect("remove bundle");
    let digest = layout_digest(layout, tag);
    let manifest: Value = serde_json::from_slice(&layout_blob(layout, &digest)).expect("manifest JSON");
    assert_eq!(manifest["layers"].as_array().map(|l| l.len()), Some(1), "umoci built one layer: {manifest}");
    let config_digest = manifest["config"]["digest"].as_str().expect("config digest");
    let config: Value = serde_json::from_slice(&layout_blob(layout, config_digest)).expect("config JSON");
    assert_eq!(config["architecture"], arch);
    assert_eq!(config["os"], "linux");
    digest
}

/// Writes an OCI image index over the given `(tag, arch)` images of `layout` and tags it `index_tag`.
/// Returns the index digest.
pub fn build_index(layout: &Path, index_tag: &str, children: &[(&str, &str)]) -> String {
    let manifests: Vec<Value> = children
        .iter()
        .map(|(tag, arch)| {
            let d = layout_descriptor(layout, tag);
            json!({
                "mediaType": d["mediaType"],
                "digest": d["digest"],
                "size": d["size"],
                "platform": { "architecture": arch, "os": "linux" },
            })
        })
        .collect();
    let index = json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests });
    let bytes = serde_json::to_vec(&index).unwrap();
    let digest = sha256(&bytes);
    std::fs::write(blob_path(layout, &digest), &bytes).expect("write index blob");
    let index_json = layout.join("index.json");
    let mut top = read_json(&index_json);
    top["manifests"].as_array_mut().unwrap().push(json!({
        "mediaType": OCI_INDEX,
        "digest": digest,
        "size": bytes.len(),
        "annotations": { REF_NAME: index_tag },
    }));
    std::fs::write(&index_json, serde_json::to_vec(&top).unwrap()).expect("write index.json");
    assert_eq!(layout_digest(layout, index_tag), digest);
    digest
}

/// The GOARCH name of this machine, the platform podman selects from an index.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => panic!("no GOARCH mapping for {other}"),
    }
}

/// A layout with `v1` (amd64), `v1-arm64` (arm64) and `multi`, an OCI index over both.
pub struct MultiArch {
    pub layout: PathBuf,
    pub amd64: String,
    pub arm64: String,
    pub index: String,
}

pub fn build_multiarch(layout: &Path) -> MultiArch {
    let amd64 = build_image(layout, "v1", "amd64", &[("etc/breakwater-test", "amd64\n")]);
    let arm64 = build_image(layout, "v1-arm64", "arm64", &[("etc/breakwater-test", "arm64\n")]);
    assert_ne!(amd64, arm64);
    let index = build_index(layout, "multi", &[("v1", "amd64"), ("v1-arm64", "arm64")]);
    MultiArch { layout: layout.to_path_buf(), amd64, arm64, index }
}

/// A podman root, runroot and tmpdir private to one test, with the vfs driver (the one that works here). As
/// non-root, podman starts a pause process for its user namespace; it is told to keep its state under our
/// directory and the process is stopped on drop.
pub struct Podman {
    pub dir: tempfile::TempDir,
    /// `CONTAINERS_REGISTRIES_CONF` for every command (e.g. a mirror configuration).
    pub registries_conf: Option<PathBuf>,
}

impl Podman {
    pub fn new() -> Self {
        require("podman");
        let dir = tempfile::Builder::new().prefix("bw-podman-").tempdir().expect("tempdir");
        for sub in ["root", "run", "tmp", "xdg", "vartmp"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        Podman { dir, registries_conf: None }
    }

    /// A podman that reads `registries_conf` (`registries.conf` syntax) instead of the machine's.
    pub fn with_registries(registries_conf: &str) -> Self {
        let mut p = Self::new();
        let path = p.dir.path().join("registries.conf");
        std::fs::write(&path, registries_conf).expect("write registries.conf");
        p.registries_conf = Some(path);
        p
    }

    pub fn cmd(&self) -> Command {
        let d = self.dir.path();
        let mut cmd = Command::new("podman");
        cmd.arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("run"))
            .arg("--tmpdir")
            .arg(d.join("tmp"))
            .args(["--storage-driver", "vfs", "--events-backend", "none"])
            .env("TMPDIR", d.join("vartmp"))
            .env("XDG_RUNTIME_DIR", d.join("xdg"));
        if let Some(conf) = &self.registries_conf {
            cmd.env("CONTAINERS_REGISTRIES_CONF", conf);
        }
        cmd
    }

    /// `podman image inspect REF`, parsed (the first image).
    pub fn inspect(&self, image: &str) -> Value {
        let text = run(self.cmd().args(["image", "inspect", image]));
        let v: Value = serde_json::from_str(&text).expect("podman image inspect JSON");
        v[0].clone()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // vfs layers of a rootless pull are owned by sub-uids: let podman remove what it stored before the temp dir
        // goes. (Not `podman system reset`, which also touches the machine's network configuration.)
        let _ = self
            .cmd()
            .args(["rmi", "--all", "--force"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // Rootless podman leaves a pause process holding its user namespace; its pid file is under our directories.
        for pidfile in [self.dir.path().join("xdg/libpod/tmp/pause.pid"), self.dir.path().join("tmp/pause.pid")] {
            if let Some(pid) = std::fs::read_to_string(&pidfile).ok().and_then(|s| s.trim().parse::<u32>().ok()) {
                let _ = Command::new("kill").arg(pid.to_string()).status();
            }
        }
    }
}
