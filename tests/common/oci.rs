//! Building and pushing test content over the plain distribution API (to breakwater or to a real upstream).
#![allow(dead_code)]

use sha2::Digest as _;

/// Deterministic incompressible bytes (xorshift), so tests can make large blobs without storing any.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", sha2::Sha256::digest(bytes))
}

/// Resolves a `Location` header against the registry's base URL.
fn absolute(base: &str, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        location.to_string()
    } else {
        format!("{base}{location}")
    }
}

/// Pushes a blob with POST + PUT (the form every registry supports) and returns its digest.
pub async fn push_blob(base: &str, repo: &str, bytes: &[u8]) -> String {
    let client = reqwest::Client::new();
    let digest = sha256(bytes);
    let r = client.post(format!("{base}/v2/{repo}/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 202, "POST upload to {base}");
    let location = absolute(base, r.headers()["location"].to_str().unwrap());
    let sep = if location.contains('?') { '&' } else { '?' };
    let r = client
        .put(format!("{location}{sep}digest={digest}"))
        .header("content-type", "application/octet-stream")
        .body(bytes.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "PUT upload to {base}: {:?}", r.text().await);
    digest
}

pub async fn push_manifest(base: &str, repo: &str, reference: &str, media_type: &str, bytes: &[u8]) -> String {
    let r = reqwest::Client::new()
        .put(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header("content-type", media_type)
        .body(bytes.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "PUT manifest to {base}: {:?}", r.text().await);
    sha256(bytes)
}

/// An image pushed for a test: its manifest and blobs, to compare against what clients get back.
pub struct Image {
    pub manifest: Vec<u8>,
    pub digest: String,
    pub config: Vec<u8>,
    pub config_digest: String,
    pub layers: Vec<Vec<u8>>,
    pub layer_digests: Vec<String>,
}

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Pushes an OCI image with layers of the given sizes (content from `seed`) to `base/repo:tag`.
pub async fn push_image(base: &str, repo: &str, tag: &str, layer_sizes: &[usize], seed: u64) -> Image {
    let config =
        format!(r#"{{"architecture":"amd64","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":[]}},"seed":{seed}}}"#)
            .into_bytes();
    let config_digest = push_blob(base, repo, &config).await;
    let mut layers = Vec::new();
    let mut layer_digests = Vec::new();
    for (i, size) in layer_sizes.iter().enumerate() {
        let layer = pseudo_random(*size, seed * 1000 + i as u64);
        layer_digests.push(push_blob(base, repo, &layer).await);
        layers.push(layer);
    }
    let layer_json: Vec<String> = layer_digests
        .iter()
        .zip(&layers)
        .map(|(d, l)| format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{d}","size":{}}}"#, l.len()))
        .collect();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{}]}}"#,
        config.len(),
        layer_json.join(",")
    )
    .into_bytes();
    let digest = push_manifest(base, repo, tag, OCI_MANIFEST, &manifest).await;
    Image { manifest, digest, config, config_digest, layers, layer_digests }
}

/// GETs every one of `urls` at once, each on a task of its own; a task gives (status, sha256 of the body).
pub fn spawn_gets(urls: impl IntoIterator<Item = String>) -> Vec<tokio::task::JoinHandle<Result<(u16, String), String>>> {
    urls.into_iter().map(|url| tokio::spawn(async move { get(&url).await.map(|(status, body)| (status, sha256(&body))) })).collect()
}

/// GETs `url` and returns (status, body); a body that breaks midway is an `Err`.
pub async fn get(url: &str) -> Result<(u16, Vec<u8>), String> {
    let r = reqwest::get(url).await.map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    let body = r.bytes().await.map_err(|e| format!("body: {e}"))?;
    Ok((status, body.to_vec()))
}

/// The value of one Prometheus sample whose line starts with `name` and contains every label in `labels`.
pub async fn metric(base: &str, name: &str, labels: &[&str]) -> f64 {
    let text = reqwest::get(format!("{base}/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
