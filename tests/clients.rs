//! Real clients against the real `breakwater` binary: images are built offline with umoci, moved with skopeo
//! (OCI and Docker schema2 media types, single images and multi-platform indexes), copied to and from a real
//! CNCF distribution registry, and pulled by podman. Every test asserts digests and media types end to end.
//!
//! The tools are required, not optional: a missing tool fails the test (run `scripts/test.sh`, which installs them).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

use common::oci::pseudo_random;
use common::images::{
    build_image, build_multiarch, host_arch, layout_blob, layout_descriptor, oci_ref, output, require, run, scratch,
    sha256, skopeo, skopeo_copy, skopeo_raw, MultiArch, OCI_INDEX, OCI_MANIFEST,
};

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

// ---------------------------------------------------------------------------------------------------------------
// Tools and processes
// ---------------------------------------------------------------------------------------------------------------

/// `docker://ADDR/REPO:TAG` (or `@DIGEST` when `reference` is a digest).
fn docker_ref(addr: &str, repo: &str, reference: &str) -> String {
    if reference.contains(':') {
        format!("docker://{addr}/{repo}@{reference}")
    } else {
        format!("docker://{addr}/{repo}:{reference}")
    }
}

/// The `Digest` that `skopeo inspect` reports for an image (resolved through the registry).
fn skopeo_inspect_digest(tmp: &Path, image: &str) -> String {
    let text = run(skopeo(tmp).args(["inspect", "--tls-verify=false", image]));
    let v: Value = serde_json::from_str(&text).expect("skopeo inspect JSON");
    v["Digest"]
        .as_str()
        .expect("Digest in skopeo inspect")
        .to_string()
}

// ---------------------------------------------------------------------------------------------------------------
// OCI layouts built with umoci
// ---------------------------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------------------------
// Plain HTTP against the registries
// ---------------------------------------------------------------------------------------------------------------

struct Response {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("ASCII header").to_string())
    }
}

fn http(method: reqwest::Method, url: &str, accept: &[&str]) -> Response {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut req = reqwest::Client::new().request(method.clone(), url);
        if !accept.is_empty() {
            req = req.header(reqwest::header::ACCEPT, accept.join(", "));
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .bytes()
            .await
            .unwrap_or_else(|e| panic!("{method} {url} body: {e}"))
            .to_vec();
        Response {
            status,
            headers,
            body,
        }
    })
}

const ALL_MANIFEST_TYPES: &[&str] = &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

/// GETs a manifest from `base` (`http://ADDR`) and checks the response is self-consistent: 200, the body hashes to
/// `Docker-Content-Digest` (and to `expect_digest`), `Content-Type` is `expect_type` and matches the body's own
/// `mediaType`. Returns the body.
fn get_manifest(
    base: &str,
    repo: &str,
    reference: &str,
    expect_digest: &str,
    expect_type: &str,
) -> Vec<u8> {
    let url = format!("{base}/v2/{repo}/manifests/{reference}");
    let resp = http(reqwest::Method::GET, &url, ALL_MANIFEST_TYPES);
    assert_eq!(
        resp.status,
        200,
        "GET {url}: {}",
        String::from_utf8_lossy(&resp.body)
    );
    assert_eq!(sha256(&resp.body), expect_digest, "GET {url}: body digest");
    assert_eq!(
        resp.header("docker-content-digest").as_deref(),
        Some(expect_digest),
        "GET {url}: Docker-Content-Digest header"
    );
    assert_eq!(
        resp.header("content-type").as_deref(),
        Some(expect_type),
        "GET {url}: Content-Type"
    );
    let v: Value = serde_json::from_slice(&resp.body).expect("manifest is JSON");
    // `mediaType` is optional in OCI manifests (umoci omits it); when present it must agree with Content-Type.
    if !v["mediaType"].is_null() {
        assert_eq!(
            v["mediaType"], expect_type,
            "GET {url}: mediaType inside the manifest"
        );
    }

    let head = http(reqwest::Method::HEAD, &url, ALL_MANIFEST_TYPES);
    assert_eq!(head.status, 200, "HEAD {url}");
    assert_eq!(
        head.header("docker-content-digest").as_deref(),
        Some(expect_digest),
        "HEAD {url}: digest"
    );
    assert_eq!(
        head.header("content-type").as_deref(),
        Some(expect_type),
        "HEAD {url}: Content-Type"
    );
    assert_eq!(
        head.header("content-length").as_deref(),
        Some(resp.body.len().to_string().as_str()),
        "HEAD {url}: Content-Length"
    );
    resp.body
}

/// Checks that an image index is served intact by `base`: by tag and by digest, and every child by digest.
fn assert_index_served(base: &str, repo: &str, tag: &str, index_digest: &str, index_bytes: &[u8]) {
    let by_tag = get_manifest(base, repo, tag, index_digest, OCI_INDEX);
    assert_eq!(by_tag, index_bytes, "index bytes by tag");
    let by_digest = get_manifest(base, repo, index_digest, index_digest, OCI_INDEX);
    assert_eq!(by_digest, index_bytes, "index bytes by digest");
    let index: Value = serde_json::from_slice(index_bytes).unwrap();
    for child in index["manifests"].as_array().unwrap() {
        let digest = child["digest"].as_str().unwrap();
        let body = get_manifest(base, repo, digest, digest, OCI_MANIFEST);
        assert_eq!(
            body.len() as u64,
            child["size"].as_u64().unwrap(),
            "child {digest} size"
        );
    }
}

/// Checks that a fresh OCI layout received `tag` as exactly `digest` and that it (and, for an index, every child)
/// is stored under its digest.
fn assert_layout_holds(layout: &Path, tag: &str, digest: &str, media_type: &str) {
    let d = layout_descriptor(layout, tag);
    assert_eq!(
        d["digest"], digest,
        "digest of {tag} in the copied-out layout"
    );
    assert_eq!(
        d["mediaType"], media_type,
        "media type of {tag} in the copied-out layout"
    );
    let bytes = layout_blob(layout, digest);
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    if media_type == OCI_INDEX {
        for child in v["manifests"].as_array().unwrap() {
            let child_bytes = layout_blob(layout, child["digest"].as_str().unwrap());
            let m: Value = serde_json::from_slice(&child_bytes).unwrap();
            layout_blob(layout, m["config"]["digest"].as_str().unwrap());
            for layer in m["layers"].as_array().unwrap() {
                layout_blob(layout, layer["digest"].as_str().unwrap());
            }
        }
    } else {
        layout_blob(layout, v["config"]["digest"].as_str().unwrap());
        for layer in v["layers"].as_array().unwrap() {
            layout_blob(layout, layer["digest"].as_str().unwrap());
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------------------------

/// umoci image → skopeo push (OCI manifest) → skopeo pull into a fresh layout: same manifest digest everywhere.
#[test]
fn skopeo_oci_image_round_trip() {
    let dir = scratch();
    let tmp = dir.path();
    let layout = dir.path().join("src");
    // A layer of several MiB, so that uploads and downloads span many reads and writes.
    let big = pseudo_random(6 << 20, 0x5eed);
    let digest = build_image(
        &layout,
        "v1",
        host_arch(),
        &[
            ("hello.txt", &b"hello from breakwater\n"[..]),
            ("var/big.bin", &big[..]),
        ],
    );
    let manifest_bytes = layout_blob(&layout, &digest);
    let manifest: Value = serde_json::from_slice(&manifest_bytes).unwrap();
    assert!(
        manifest["layers"][0]["size"].as_u64().unwrap() > 6 << 20,
        "the layer did not compress: {manifest}"
    );

    let bw = common::Breakwater::start();
    let base = bw.url("");
    skopeo_copy(
        tmp,
        &[],
        &oci_ref(&layout, "v1"),
        &docker_ref(&bw.addr, "some/repo", "v1"),
    );

    // What the registry serves is byte for byte what was pushed.
    assert_eq!(
        skopeo_raw(tmp, &docker_ref(&bw.addr, "some/repo", "v1")),
        manifest_bytes
    );
    assert_eq!(
        skopeo_inspect_digest(tmp, &docker_ref(&bw.addr, "some/repo", "v1")),
        digest
    );
    assert_eq!(
        get_manifest(&base, "some/repo", "v1", &digest, OCI_MANIFEST),
        manifest_bytes
    );
    assert_eq!(
        get_manifest(&base, "some/repo", &digest, &digest, OCI_MANIFEST),
        manifest_bytes
    );

    // The config and layer blobs are served intact.
    let mut blobs = vec![manifest["config"].clone()];
    blobs.extend(manifest["layers"].as_array().unwrap().iter().cloned());
    for blob in blobs {
        let digest = blob["digest"].as_str().unwrap();
        let resp = http(
            reqwest::Method::GET,
            &bw.url(&format!("/v2/some/repo/blobs/{digest}")),
            &[],
        );
        assert_eq!(resp.status, 200, "GET blob {digest}");
        assert_eq!(sha256(&resp.body), digest, "blob {digest} content");
        assert_eq!(
            resp.body.len() as u64,
            blob["size"].as_u64().unwrap(),
            "blob {digest} size"
        );
    }

    // Back out, by tag and by digest, into fresh layouts.
    let out = dir.path().join("out");
    skopeo_copy(
        tmp,
        &["--preserve-digests"],
        &docker_ref(&bw.addr, "some/repo", "v1"),
        &oci_ref(&out, "v1"),
    );
    assert_layout_holds(&out, "v1", &digest, OCI_MANIFEST);
    let out2 = dir.path().join("out-by-digest");
    skopeo_copy(
        tmp,
        &["--preserve-digests"],
        &docker_ref(&bw.addr, "some/repo", &digest),
        &oci_ref(&out2, "v1"),
    );
    assert_layout_holds(&out2, "v1", &digest, OCI_MANIFEST);
    assert_eq!(
        layout_blob(&out, &digest),
        manifest_bytes,
        "the manifest that comes back is byte for byte the one that was pushed"
    );
}

/// Multi-platform OCI index pushed with `skopeo copy --all` and copied back out: index and child digests survive.
#[test]
fn skopeo_multiarch_index_round_trip() {
    let dir = scratch();
    let tmp = dir.path();
    let src = build_multiarch_in(dir.path());
    let index_bytes = layout_blob(&src.layout, &src.index);

    let bw = common::Breakwater::start();
    let base = bw.url("");
    let remote = docker_ref(&bw.addr, "multi/arch", "v1");
    skopeo_copy(tmp, &["--all"], &oci_ref(&src.layout, "multi"), &remote);

    assert_eq!(
        skopeo_raw(tmp, &remote),
        index_bytes,
        "index served byte for byte"
    );
    assert_eq!(skopeo_inspect_digest(tmp, &remote), src.index);
    assert_index_served(&base, "multi/arch", "v1", &src.index, &index_bytes);
    assert_eq!(
        skopeo_raw(tmp, &docker_ref(&bw.addr, "multi/arch", &src.amd64)),
        layout_blob(&src.layout, &src.amd64)
    );
    assert_eq!(
        skopeo_raw(tmp, &docker_ref(&bw.addr, "multi/arch", &src.arm64)),
        layout_blob(&src.layout, &src.arm64)
    );

    // skopeo picks each platform out of the index served by breakwater.
    for arch in ["amd64", "arm64"] {
        let text = run(skopeo(tmp)
            .args(["--override-arch", arch, "--override-os", "linux"])
            .args(["inspect", "--tls-verify=false", &remote]));
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v["Architecture"], arch,
            "skopeo inspect --override-arch {arch}: {text}"
        );
        // `Digest` is that of the top-level reference, the index.
        assert_eq!(v["Digest"], src.index.as_str());
    }

    let out = dir.path().join("out");
    skopeo_copy(
        tmp,
        &["--all", "--preserve-digests"],
        &remote,
        &oci_ref(&out, "v1"),
    );
    assert_layout_holds(&out, "v1", &src.index, OCI_INDEX);
    assert_eq!(layout_blob(&out, &src.index), index_bytes);
    assert_eq!(
        layout_blob(&out, &src.amd64),
        layout_blob(&src.layout, &src.amd64)
    );
    assert_eq!(
        layout_blob(&out, &src.arm64),
        layout_blob(&src.layout, &src.arm64)
    );
}

/// `skopeo copy --format v2s2`: breakwater serves the Docker schema2 manifest with its own media type and digest,
/// and copying it back out keeps it byte for byte.
#[test]
fn skopeo_docker_schema2_round_trip() {
    let dir = scratch();
    let tmp = dir.path();
    let layout = dir.path().join("src");
    let oci_digest = build_image(
        &layout,
        "v1",
        host_arch(),
        &[("schema2.txt", "docker media types\n")],
    );

    let bw = common::Breakwater::start();
    let base = bw.url("");
    let remote = docker_ref(&bw.addr, "docker/schema2", "v1");
    skopeo_copy(tmp, &["--format", "v2s2"], &oci_ref(&layout, "v1"), &remote);

    let raw = skopeo_raw(tmp, &remote);
    let digest = sha256(&raw);
    assert_ne!(digest, oci_digest, "the manifest was converted to schema2");
    let manifest: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(manifest["mediaType"], DOCKER_MANIFEST);
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.docker.container.image.v1+json"
    );
    assert_eq!(skopeo_inspect_digest(tmp, &remote), digest);

    // Over HTTP: Content-Type is the Docker media type, by tag and by digest.
    assert_eq!(
        get_manifest(&base, "docker/schema2", "v1", &digest, DOCKER_MANIFEST),
        raw
    );
    assert_eq!(
        get_manifest(&base, "docker/schema2", &digest, &digest, DOCKER_MANIFEST),
        raw
    );

    // Back out to a `dir:` copy (which keeps manifests as they are): same bytes, same digest.
    let out = dir.path().join("out-dir");
    skopeo_copy(
        tmp,
        &["--preserve-digests"],
        &remote,
        &format!("dir:{}", out.display()),
    );
    let copied = std::fs::read(out.join("manifest.json")).expect("manifest.json in dir: copy");
    assert_eq!(sha256(&copied), digest);
    assert_eq!(copied, raw);
    // And to another repository of the same registry (skopeo tries cross-repository mounts here).
    let other = docker_ref(&bw.addr, "docker/schema2-copy", "v1");
    skopeo_copy(tmp, &["--preserve-digests"], &remote, &other);
    assert_eq!(
        get_manifest(&base, "docker/schema2-copy", "v1", &digest, DOCKER_MANIFEST),
        raw
    );
}

/// A real CNCF distribution registry as the source and as the destination; indexes and single images.
#[test]
fn skopeo_between_distribution_and_breakwater() {
    let dir = scratch();
    let tmp = dir.path();
    let src = build_multiarch_in(dir.path());
    let index_bytes = layout_blob(&src.layout, &src.index);
    let single = layout_blob(&src.layout, &src.amd64);

    let upstream = common::Distribution::start();
    let bw = common::Breakwater::start();
    let bw_base = bw.url("");
    let up_base = upstream.url("");

    // Seed distribution, check it holds what we built.
    skopeo_copy(
        tmp,
        &["--all"],
        &oci_ref(&src.layout, "multi"),
        &docker_ref(&upstream.addr, "lib/multi", "v1"),
    );
    skopeo_copy(
        tmp,
        &[],
        &oci_ref(&src.layout, "v1"),
        &docker_ref(&upstream.addr, "lib/single", "v1"),
    );
    assert_index_served(&up_base, "lib/multi", "v1", &src.index, &index_bytes);

    // distribution → breakwater
    skopeo_copy(
        tmp,
        &["--all", "--preserve-digests"],
        &docker_ref(&upstream.addr, "lib/multi", "v1"),
        &docker_ref(&bw.addr, "mirror/multi", "v1"),
    );
    skopeo_copy(
        tmp,
        &["--preserve-digests"],
        &docker_ref(&upstream.addr, "lib/single", "v1"),
        &docker_ref(&bw.addr, "mirror/single", "v1"),
    );
    assert_eq!(
        skopeo_inspect_digest(tmp, &docker_ref(&bw.addr, "mirror/multi", "v1")),
        src.index
    );
    assert_index_served(&bw_base, "mirror/multi", "v1", &src.index, &index_bytes);
    assert_eq!(
        get_manifest(&bw_base, "mirror/single", "v1", &src.amd64, OCI_MANIFEST),
        single
    );

    // breakwater → distribution (new repositories, so every blob really travels from breakwater)
    skopeo_copy(
        tmp,
        &["--all", "--preserve-digests"],
        &docker_ref(&bw.addr, "mirror/multi", "v1"),
        &docker_ref(&upstream.addr, "back/multi", "v1"),
    );
    skopeo_copy(
        tmp,
        &["--preserve-digests"],
        &docker_ref(&bw.addr, "mirror/single", "v1"),
        &docker_ref(&upstream.addr, "back/single", "v1"),
    );
    assert_eq!(
        skopeo_inspect_digest(tmp, &docker_ref(&upstream.addr, "back/multi", "v1")),
        src.index
    );
    assert_index_served(&up_base, "back/multi", "v1", &src.index, &index_bytes);
    assert_eq!(
        get_manifest(&up_base, "back/single", "v1", &src.amd64, OCI_MANIFEST),
        single
    );

    // And a Docker schema2 image pushed to breakwater travels to distribution unchanged.
    skopeo_copy(
        tmp,
        &["--format", "v2s2"],
        &oci_ref(&src.layout, "v1"),
        &docker_ref(&bw.addr, "s2/app", "v1"),
    );
    let s2 = skopeo_raw(tmp, &docker_ref(&bw.addr, "s2/app", "v1"));
    let s2_digest = sha256(&s2);
    skopeo_copy(
        tmp,
        &["--preserve-digests"],
        &docker_ref(&bw.addr, "s2/app", "v1"),
        &docker_ref(&upstream.addr, "s2/app", "v1"),
    );
    assert_eq!(
        get_manifest(&up_base, "s2/app", "v1", &s2_digest, DOCKER_MANIFEST),
        s2
    );
}

/// Copies inside breakwater, tag listing and deletion as skopeo does them.
#[test]
fn skopeo_copy_between_repositories_list_tags_and_delete() {
    let dir = scratch();
    let tmp = dir.path();
    let layout = dir.path().join("src");
    let digest = build_image(&layout, "v1", host_arch(), &[("a.txt", "a\n")]);
    let manifest_bytes = layout_blob(&layout, &digest);

    let bw = common::Breakwater::start();
    let base = bw.url("");
    skopeo_copy(
        tmp,
        &[],
        &oci_ref(&layout, "v1"),
        &docker_ref(&bw.addr, "team/app", "v1"),
    );
    // Same registry, other repository: skopeo reuses the blobs with cross-repository mounts.
    skopeo_copy(
        tmp,
        &[],
        &docker_ref(&bw.addr, "team/app", "v1"),
        &docker_ref(&bw.addr, "team/app", "v2"),
    );
    skopeo_copy(
        tmp,
        &[],
        &docker_ref(&bw.addr, "team/app", "v1"),
        &docker_ref(&bw.addr, "other/app", "v1"),
    );
    assert_eq!(
        get_manifest(&base, "team/app", "v2", &digest, OCI_MANIFEST),
        manifest_bytes
    );
    assert_eq!(
        get_manifest(&base, "other/app", "v1", &digest, OCI_MANIFEST),
        manifest_bytes
    );

    let tags_text = run(skopeo(tmp).args([
        "list-tags",
        "--tls-verify=false",
        &format!("docker://{}/team/app", bw.addr),
    ]));
    let tags: Value = serde_json::from_str(&tags_text).unwrap();
    let mut tags: Vec<&str> = tags["Tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    tags.sort();
    assert_eq!(tags, ["v1", "v2"]);

    // `skopeo delete` resolves the tag and deletes the manifest by digest: gone from that repository only.
    run(skopeo(tmp).args([
        "delete",
        "--tls-verify=false",
        &docker_ref(&bw.addr, "team/app", "v1"),
    ]));
    for reference in ["v1", "v2", digest.as_str()] {
        let resp = http(
            reqwest::Method::GET,
            &bw.url(&format!("/v2/team/app/manifests/{reference}")),
            ALL_MANIFEST_TYPES,
        );
        assert_eq!(resp.status, 404, "team/app:{reference} after delete");
        let err: Value = serde_json::from_slice(&resp.body).expect("error body is JSON");
        assert_eq!(err["errors"][0]["code"], "MANIFEST_UNKNOWN", "{err}");
    }
    let out = output(skopeo(tmp).args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &docker_ref(&bw.addr, "team/app", "v1"),
    ]));
    assert!(
        !out.status.success(),
        "skopeo inspect after delete must fail"
    );
    assert_eq!(
        get_manifest(&base, "other/app", "v1", &digest, OCI_MANIFEST),
        manifest_bytes
    );
}

/// A podman root, runroot and tmpdir private to one test. As non-root, podman starts a pause process for its user
/// namespace; it is told to keep its state under our directory and the process is stopped on drop.
struct Podman {
    dir: tempfile::TempDir,
}

impl Podman {
    fn new() -> Self {
        require("podman");
        let dir = scratch();
        for sub in ["root", "run", "tmp", "xdg", "vartmp"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        Podman { dir }
    }

    fn cmd(&self) -> Command {
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
        cmd
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
        for pidfile in [
            self.dir.path().join("xdg/libpod/tmp/pause.pid"),
            self.dir.path().join("tmp/pause.pid"),
        ] {
            if let Some(pid) = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
            {
                let _ = Command::new("kill").arg(pid.to_string()).status();
            }
        }
    }
}

/// podman pulls a single image and a multi-platform index from breakwater and records their digests.
#[test]
fn podman_pulls_from_breakwater() {
    let dir = scratch();
    let tmp = dir.path();
    let layout = dir.path().join("src");
    let single = build_image(
        &layout,
        "single",
        host_arch(),
        &[("etc/motd", "pulled by podman\n")],
    );
    let src = build_multiarch_in(dir.path());

    let bw = common::Breakwater::start();
    skopeo_copy(
        tmp,
        &[],
        &oci_ref(&layout, "single"),
        &docker_ref(&bw.addr, "pod/single", "v1"),
    );
    skopeo_copy(
        tmp,
        &["--all"],
        &oci_ref(&src.layout, "multi"),
        &docker_ref(&bw.addr, "pod/multi", "v1"),
    );

    let podman = Podman::new();
    let single_ref = format!("{}/pod/single:v1", bw.addr);
    let multi_ref = format!("{}/pod/multi:v1", bw.addr);
    run(podman
        .cmd()
        .args(["pull", "--tls-verify=false", &single_ref]));
    run(podman
        .cmd()
        .args(["pull", "--tls-verify=false", &multi_ref]));

    let listing = run(podman.cmd().args([
        "images",
        "--digests",
        "--no-trunc",
        "--format",
        "{{.Repository}}:{{.Tag}} {{.Digest}}",
    ]));
    let lines: Vec<&str> = listing.lines().collect();
    assert!(
        lines.contains(&format!("{single_ref} {single}").as_str()),
        "podman images --digests:\n{listing}"
    );
    assert!(
        lines.contains(&format!("{multi_ref} {}", src.index).as_str()),
        "podman images --digests:\n{listing}"
    );

    // From the index, podman picked this machine's platform and knows both digests.
    let inspect = run(podman.cmd().args(["image", "inspect", &multi_ref]));
    let v: Value = serde_json::from_str(&inspect).unwrap();
    let image = &v[0];
    assert_eq!(image["Architecture"], host_arch(), "{inspect}");
    assert_eq!(image["Digest"], src.index.as_str(), "{inspect}");
    let platform_digest = if host_arch() == "arm64" {
        &src.arm64
    } else {
        &src.amd64
    };
    let repo_digests: Vec<&str> = image["RepoDigests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    let repo = format!("{}/pod/multi", bw.addr);
    assert!(
        repo_digests.contains(&format!("{repo}@{}", src.index).as_str()),
        "RepoDigests: {repo_digests:?}"
    );
    assert!(
        repo_digests.contains(&format!("{repo}@{platform_digest}").as_str()),
        "RepoDigests: {repo_digests:?}"
    );

    // podman verified every blob's digest while pulling and unpacked the layers into its vfs store.
    let inspect = run(podman.cmd().args(["image", "inspect", &single_ref]));
    let v: Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(v[0]["Digest"], single.as_str());

    // Pull by digest too (a pinned reference, as Kubernetes manifests use).
    let pinned = format!("{}/pod/single@{single}", bw.addr);
    run(podman.cmd().args(["pull", "--tls-verify=false", &pinned]));
    let inspect = run(podman.cmd().args(["image", "inspect", &pinned]));
    let v: Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(v[0]["Digest"], single.as_str(), "{inspect}");
}

/// The multi-platform test image, built in `dir/src`.
fn build_multiarch_in(dir: &Path) -> MultiArch {
    build_multiarch(&dir.join("src"))
}
