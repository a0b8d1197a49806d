//! Cache eviction against a real upstream (Debian's `docker-registry`): it never removes bytes that a manifest
//! record or pushed content refers to, not even when a push of the same digest races it, and a manifest push
//! needs its blobs' bytes, not only their links.
//!
//! The first and last tests drive the real binary over HTTP. The race test builds the real `Registry` and
//! `Proxy` in-process (LocalStore, SQLite, the real upstream client) around a store wrapper that holds each
//! eviction's delete until the test releases it, which widens the window between eviction's decision and the
//! removal of the bytes from microseconds to as long as a push takes, on every iteration.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

use breakwater::flight::BlobFlights;
use breakwater::oci::{Digest, Reference, RepoName};
use breakwater::proxy::{EvictionPolicy, ProxiedBlob, Proxy, Target};
use breakwater::registry::{Registry, RegistryError};
use breakwater::storage::{BlobStore, ByteRange, ByteStream, LocalStore, StorageError, UploadClaim};
use breakwater::upstream::Upstream;
use common::oci::{get, metric, pseudo_random, push_blob, push_image, sha256, OCI_MANIFEST};
use common::relay::Relay;
use common::{Breakwater, Distribution};

/// Where a store keeps blob `digest` (`sha256:...`) under a server's data directory.
fn blob_file(data: &Path, digest: &str) -> std::path::PathBuf {
    data.join("content/blobs/sha256").join(&digest[7..9]).join(&digest[7..])
}

/// Waits until eviction has removed `file` (eviction runs in the background after the fill that triggers it).
async fn wait_for_removal(file: &Path) {
    for _ in 0..3000 {
        if !file.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} was never evicted", file.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_bytes_pulled_through_blobs_survive_an_eviction_that_takes_everything_else() {
    const LAYER: usize = 256 << 10;
    let upstream = Distribution::start();
    let relay = Relay::start(&upstream.addr);
    let up_url = format!("http://{}", upstream.addr);
    let image = push_image(&up_url, "team/app", "v1", &[LAYER, LAYER], 71).await;
    // The upstream also holds the manifest's bytes as a blob, as registries that share one content store do, so a
    // client may fetch them through `/blobs/` (tools that copy "everything by digest" do).
    push_blob(&up_url, "team/app", &image.manifest).await;
    // A budget that holds the manifest but not one layer: every layer fill evicts down to the budget.
    let spec = format!("up=http://{}", relay.addr);
    let budget = (LAYER / 2).to_string();
    let bw = Breakwater::start_with(&["--upstream", &spec, "--cache-max-bytes", &budget]);
    let base = format!("http://{}", bw.addr);

    // The manifest's bytes arrive through /blobs/ first (recorded as cache content), then as a manifest.
    let (status, body) = get(&bw.url(&format!("/v2/up/team/app/blobs/{}", image.digest))).await.unwrap();
    assert_eq!((status, sha256(&body)), (200, image.digest.clone()));
    let (status, body) = get(&bw.url("/v2/up/team/app/manifests/v1")).await.unwrap();
    assert_eq!((status, body.as_slice()), (200, image.manifest.as_slice()));
    // Each layer fill runs an eviction pass that must evict down to the budget: oldest first, the manifest's
    // bytes are the first candidates, then the layers themselves.
    for d in &image.layer_digests {
        let (status, body) = get(&bw.url(&format!("/v2/up/team/app/blobs/{d}"))).await.unwrap();
        assert_eq!((status, sha256(&body)), (200, d.clone()));
        wait_for_removal(&blob_file(bw.data.path(), d)).await;
    }
    assert!(metric(&base, "breakwater_cache_evictions_total", &[]).await >= 2.0);
    assert!(blob_file(bw.data.path(), &image.digest).exists(), "the manifest's bytes were kept");

    // The manifest is still served, by tag and by digest and through /blobs/, without asking the upstream.
    relay.reset();
    for reference in ["v1", image.digest.as_str()] {
        let (status, body) = get(&bw.url(&format!("/v2/up/team/app/manifests/{reference}"))).await.unwrap();
        assert_eq!((status, sha256(&body)), (200, image.digest.clone()), "manifest by {reference}");
    }
    let (status, body) = get(&bw.url(&format!("/v2/up/team/app/blobs/{}", image.digest))).await.unwrap();
    assert_eq!((status, sha256(&body)), (200, image.digest.clone()));
    assert_eq!(relay.count("GET", "/manifests/"), 0, "the manifest came from the cache");
    // An evicted layer is simply fetched again.
    let (status, body) = get(&bw.url(&format!("/v2/up/team/app/blobs/{}", image.layer_digests[0]))).await.unwrap();
    assert_eq!((status, sha256(&body)), (200, image.layer_digests[0].clone()));
    assert_eq!(relay.count("GET", "/blobs/sha256:"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_push_needs_the_bytes_of_its_blobs_not_only_their_links() {
    let bw = Breakwater::start();
    let base = format!("http://{}", bw.addr);
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let layer = pseudo_random(4096, 5);
    let config_digest = push_blob(&base, "mine/app", config).await;
    let layer_digest = push_blob(&base, "mine/app", &layer).await;
    // The layer's link stays but its bytes are lost (a disk fault, or an eviction racing the push before this fix).
    std::fs::remove_file(blob_file(bw.data.path(), &layer_digest)).unwrap();
    let manifest = manifest_json(&config_digest, config.len(), &layer_digest, layer.len());
    let r = reqwest::Client::new()
        .put(bw.url("/v2/mine/app/manifests/v1"))
        .header("content-type", OCI_MANIFEST)
        .body(manifest)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    assert_eq!(status, 400, "refused: {text}");
    assert!(text.contains("MANIFEST_BLOB_UNKNOWN"), "{text}");
    assert!(text.contains(&layer_digest), "the error names the missing blob: {text}");
    let (status, _) = get(&bw.url("/v2/mine/app/manifests/v1")).await.unwrap();
    assert_eq!(status, 404, "nothing was stored");
}

fn manifest_json(config: &str, config_len: usize, layer: &str, layer_len: usize) -> Vec<u8> {
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":{config_len}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":{layer_len}}}]}}"#
    )
    .into_bytes()
}

// ---- the push/evict race --------------------------------------------------------------------------------------

/// A `LocalStore` whose deletes (only eviction deletes) wait until the test releases them: each announces its
/// digest with a sender the test fires (or drops) to let it go on.
struct HeldDeletes {
    inner: LocalStore,
    entered: mpsc::UnboundedSender<(Digest, oneshot::Sender<()>)>,
}

#[async_trait::async_trait]
impl BlobStore for HeldDeletes {
    async fn size(&self, d: &Digest) -> Result<Option<u64>, StorageError> {
        self.inner.size(d).await
    }
    async fn read(&self, d: &Digest, range: Option<ByteRange>) -> Result<ByteStream, StorageError> {
        self.inner.read(d, range).await
    }
    async fn put(&self, d: &Digest, body: ByteStream) -> Result<u64, StorageError> {
        self.inner.put(d, body).await
    }
    async fn adopt_file(&self, d: &Digest, path: &Path) -> Result<u64, StorageError> {
        self.inner.adopt_file(d, path).await
    }
    async fn list(&self, after: Option<&Digest>, limit: usize) -> Result<Vec<breakwater::storage::StoredBlob>, StorageError> {
        self.inner.list(after, limit).await
    }
    async fn delete(&self, d: &Digest) -> Result<(), StorageError> {
        let (release, held) = oneshot::channel();
        if self.entered.send((d.clone(), release)).is_ok() {
            let _ = held.await;
        }
        self.inner.delete(d).await
    }
    async fn upload_start(&self, id: &str) -> Result<(), StorageError> {
        self.inner.upload_start(id).await
    }
    async fn upload_size(&self, id: &str) -> Result<Option<u64>, StorageError> {
        self.inner.upload_size(id).await
    }
    fn upload_claim(&self, id: &str) -> Result<UploadClaim, StorageError> {
        self.inner.upload_claim(id)
    }
    async fn upload_append(&self, claim: UploadClaim, body: ByteStream) -> Result<(u64, UploadClaim), StorageError> {
        self.inner.upload_append(claim, body).await
    }
    async fn upload_commit(&self, claim: UploadClaim, d: &Digest) -> Result<u64, StorageError> {
        self.inner.upload_commit(claim, d).await
    }
    async fn upload_abort(&self, claim: UploadClaim) -> Result<(), StorageError> {
        self.inner.upload_abort(claim).await
    }
}

fn body_of(bytes: Vec<u8>) -> ByteStream {
    Box::pin(futures_util::stream::once(async move { Ok(Bytes::from(bytes)) }))
}

async fn read_all(registry: &Registry, d: &Digest) -> Result<Vec<u8>, RegistryError> {
    let mut stream = registry.read_blob(d, None).await?;
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.map_err(StorageError::Io)?);
    }
    Ok(out)
}

/// Pushes a manifest referencing `config` and `layer` into `repo`: the config by upload, the layer by upload or
/// (with `mount`) by cross-repository mount from the cache repository `from`, as clients do. Returns the
/// manifest's push outcome.
async fn push(
    registry: Arc<Registry>,
    repo: RepoName,
    from: RepoName,
    tag: String,
    (config, config_bytes): (Digest, Vec<u8>),
    (layer, layer_bytes): (Digest, Vec<u8>),
    mount: bool,
) -> Result<(), RegistryError> {
    let manifest = manifest_json(&config.to_string(), config_bytes.len(), &layer.to_string(), layer_bytes.len());
    registry.put_blob(&repo, &config, body_of(config_bytes)).await?;
    if mount {
        // A client whose mount is refused would upload the layer; this one pushes the manifest anyway, to see the
        // registry refuse it for lack of the layer.
        registry.mount(&repo, &layer, Some(&from)).await?;
    } else {
        registry.put_blob(&repo, &layer, body_of(layer_bytes)).await?;
    }
    registry.put_manifest(&repo, &Reference::Tag(tag.parse().unwrap()), Some(OCI_MANIFEST), Bytes::from(manifest)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_racing_the_eviction_of_its_layer_never_leaves_a_manifest_without_bytes() {
    const ITERATIONS: u64 = 50;
    let upstream = Distribution::start();
    let up_url = format!("http://{}", upstream.addr);
    let dir = tempfile::tempdir().unwrap();
    let (entered_tx, mut entered) = mpsc::unbounded_channel();
    let store: Arc<dyn BlobStore> =
        Arc::new(HeldDeletes { inner: LocalStore::open(&dir.path().join("content")).await.unwrap(), entered: entered_tx });
    let meta = breakwater::meta::open(&format!("sqlite://{}?mode=rwc", dir.path().join("meta.db").display())).await.unwrap();
    let registry = Arc::new(Registry::new(Arc::clone(&store), meta, false));
    let flights = BlobFlights::new(Arc::clone(&store), dir.path().join("content/spool"), breakwater::shutdown::Tasks::new(), breakwater::flight::downloads())
        .await
        .unwrap();
    let up = Upstream::new(breakwater::config::upstream("up", &up_url, 300, 30, false, Some(false)).unwrap()).unwrap();
    // A budget of nothing: the pass after each fill evicts the blob just fetched.
    let policy = EvictionPolicy { max_bytes: Some(0), max_age: None };
    let proxy = Arc::new(Proxy::new(Arc::clone(&registry), vec![up], flights, Duration::from_secs(1), policy, 100_000));
    let Ok(Target::Cached(cached)) = proxy.target("up/src/app", None) else { panic!("up/src/app is a cached name") };
    let repo: RepoName = "local/app".parse().unwrap();
    let (mut refused, mut stored) = (0, 0);

    for i in 0..ITERATIONS {
        let layer_bytes = pseudo_random(64 << 10, 1000 + i);
        let layer: Digest = push_blob(&up_url, "src/app", &layer_bytes).await.parse().unwrap();
        let config_bytes = format!(r#"{{"architecture":"amd64","os":"linux","iteration":{i}}}"#).into_bytes();
        let config: Digest = sha256(&config_bytes).parse().unwrap();

        // Fill the cache with the layer; the fill's eviction pass decides to remove it and reaches the delete.
        match proxy.blob(&cached, &layer).await.unwrap() {
            ProxiedBlob::Flight(f, _) => f.finished().await.unwrap(),
            ProxiedBlob::Stored(_) => panic!("iteration {i}: the layer was not cached yet"),
            ProxiedBlob::Upstream(_) => panic!("iteration {i}: a GET is answered by a download, never by an upstream HEAD"),
        }
        let (evicting, release) = tokio::time::timeout(Duration::from_secs(60), entered.recv())
            .await
            .expect("the eviction pass reaches the delete")
            .unwrap();
        assert_eq!(evicting, layer);

        // A client pushes an image with that layer while the eviction is between its decision and the removal.
        let mount = i % 2 == 1;
        let mut pushing = tokio::spawn(push(
            Arc::clone(&registry),
            repo.clone(),
            cached.local.clone(),
            format!("v{i}"),
            (config.clone(), config_bytes.clone()),
            (layer.clone(), layer_bytes.clone()),
            mount,
        ));
        // Give the push time to complete inside the window (unless it waits for the eviction), then let the
        // eviction finish.
        let early = tokio::time::timeout(Duration::from_millis(300), &mut pushing).await;
        let _ = release.send(());
        let outcome = match early {
            Ok(joined) => joined.unwrap(),
            Err(_) => pushing.await.unwrap(),
        };
        // Wait for the eviction pass to be over before looking (it runs in the fill's background task): a pass of
        // our own starts only after it, and any delete it makes is let through.
        let mut settled = tokio::spawn({
            let proxy = Arc::clone(&proxy);
            async move { proxy.evict().await }
        });
        loop {
            tokio::select! {
                done = &mut settled => {
                    done.unwrap().unwrap();
                    break;
                }
                Some((_, release)) = entered.recv() => {
                    let _ = release.send(());
                }
            }
        }

        match outcome {
            Err(RegistryError::ManifestBlobUnknown(d)) => {
                assert_eq!(d, layer, "iteration {i}: only the evicted layer can be missing");
                refused += 1;
            }
            Err(e) => panic!("iteration {i}: the push failed with {e}"),
            Ok(()) => {
                for (d, want) in [(&config, &config_bytes), (&layer, &layer_bytes)] {
                    registry.blob_size(&repo, d).await.unwrap_or_else(|e| panic!("iteration {i}: {d} of the pushed manifest: {e}"));
                    let got = read_all(&registry, d).await.unwrap_or_else(|e| panic!("iteration {i}: reading {d}: {e}"));
                    assert_eq!(sha256(&got), d.to_string(), "iteration {i}: {d} reads back with its digest");
                    assert_eq!(&got, want);
                }
                stored += 1;
            }
        }
    }
    eprintln!("{stored} pushes stored whole, {refused} refused for lack of the layer");
    assert_eq!(stored + refused, ITERATIONS);
    // Uploading the layer always works: a push by upload never loses to the eviction.
    assert!(stored >= ITERATIONS / 2, "every push that uploaded its layer was stored ({stored})");
}

/// Eviction follows the collector's claim protocol, which is what orders it against writes on other instances
/// sharing the metadata store (the digest locks it also takes are this process's only): a digest claimed
/// recently, as another instance's push does before it checks the bytes and records its link, is left alone,
/// and evicted once the claim is old.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_leaves_a_digest_that_a_write_elsewhere_has_claimed() {
    const LAYER: usize = 128 << 10;
    let upstream = Distribution::start();
    let up_url = format!("http://{}", upstream.addr);
    let mut layers = Vec::new();
    for seed in 0..3 {
        layers.push(push_blob(&up_url, "team/app", &pseudo_random(LAYER, 90 + seed)).await);
    }
    let spec = format!("up={up_url}");
    let budget = LAYER.to_string();
    let bw = Breakwater::start_with(&["--upstream", &spec, "--cache-max-bytes", &budget]);
    let pull = |d: String| {
        let url = bw.url(&format!("/v2/up/team/app/blobs/{d}"));
        async move {
            let (status, body) = get(&url).await.unwrap();
            assert_eq!((status, sha256(&body)), (200, d));
        }
    };
    pull(layers[0].clone()).await;
    // What another instance's push of layers[0] writes first: its claim.
    sqlx::any::install_default_drivers();
    let db = sqlx::AnyPool::connect(&format!("sqlite://{}", bw.data.path().join("metadata.db").display())).await.unwrap();
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let claim = "INSERT INTO blob_state (digest, claimed_at, deleting, pushed_at) VALUES ($1, $2, 0, $3) \
                 ON CONFLICT (digest) DO UPDATE SET claimed_at = excluded.claimed_at, pushed_at = excluded.pushed_at";
    sqlx::query(claim).bind(&layers[0]).bind(now_ms).bind(now_ms).execute(&db).await.unwrap();
    // Over budget: the pass skips the claimed oldest layer and evicts the next one instead.
    pull(layers[1].clone()).await;
    wait_for_removal(&blob_file(bw.data.path(), &layers[1])).await;
    assert!(blob_file(bw.data.path(), &layers[0]).exists(), "a claimed digest was evicted");
    // The claim ages past the hold: the next pass evicts the layer, and clears its mark.
    sqlx::query(claim).bind(&layers[0]).bind(0i64).bind(0i64).execute(&db).await.unwrap();
    pull(layers[2].clone()).await;
    wait_for_removal(&blob_file(bw.data.path(), &layers[0])).await;
    // The mark is cleared just after the bytes go (the same pass): looked at until then, within a hang guard.
    let mut left = 1;
    for _ in 0..500 {
        let row = sqlx::query("SELECT COUNT(*) FROM blob_state WHERE deleting = 1").fetch_one(&db).await.unwrap();
        left = sqlx::Row::try_get::<i64, _>(&row, 0).unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(left, 0, "an eviction left its mark");
}
