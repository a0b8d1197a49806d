//! Assembles a running registry from a `Config`: opens the stores, binds the socket, serves until shutdown.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::http::{self, App};
use crate::flight::BlobFlights;
use crate::proxy::Proxy;
use crate::registry::Registry;
use crate::shutdown::Tasks;
use crate::upstream::Upstream;
use crate::storage::{LocalStore, S3Store};

/// Opens the stores named by `config` and returns the HTTP application. `local_url` is where this instance
/// answers (replication policies reach `local` there). Every background task (schedules, runs, flights, purge,
/// eviction, sweep) is spawned on `tasks`, which `serve` stops after the drain.
pub async fn build(
    config: &Config,
    local_url: &str,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    tasks: &Tasks,
) -> anyhow::Result<Arc<App>> {
    std::fs::create_dir_all(&config.data).with_context(|| format!("creating {}", config.data.display()))?;
    let (store, backend) = open_store(&config.storage).await?;
    let meta = crate::meta::open(&config.metadata).await.context("opening the metadata store")?;
    for p in &config.replication {
        p.policy(local_url).with_context(|| format!("replication policy {}", p.name))?;
    }
    let replication =
        crate::replicate::Scheduler::new(config.replication.clone(), Arc::clone(&meta), local_url.to_string(), tasks.clone());
    replication.spawn_schedules();
    replication.spawn_event_workers();
    let registry = Arc::new(Registry::new(Arc::clone(&store), Arc::clone(&meta), config.delete_enabled));
    {
        // Abandoned upload sessions are discarded, checked as often as a tenth of their lifetime (at most hourly).
        let (registry, ttl) = (Arc::clone(&registry), config.upload_ttl);
        let period = (ttl / 10).clamp(std::time::Duration::from_secs(1), std::time::Duration::from_secs(3600));
        tasks.spawn(
            "upload purge",
            crate::shutdown::every(period, tasks.closing(), move || {
                let registry = Arc::clone(&registry);
                async move {
                    match registry.purge_uploads(ttl).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(purged = n, "discarded abandoned upload sessions"),
                        Err(e) => tracing::warn!(error = %e, "purging upload sessions failed"),
                    }
                }
            }),
        );
    }
    // Flights spool on local disk whatever the store: next to a local store's blobs (a commit is then a rename),
    // in the data directory otherwise (a commit uploads the verified file).
    let spool = match &backend {
        Backend::Local { root, .. } => root.join("spool"),
        Backend::S3(_) => config.data.join("spool"),
    };
    let flights = BlobFlights::new(Arc::clone(&store), spool, tasks.clone(), crate::flight::downloads()).await.context("preparing the cache's spool directory")?;
    let cluster = match &config.cluster {
        Some(settings) => {
            let cluster = crate::cluster::Cluster::join(settings.clone(), local_url, Arc::clone(&meta)).await.context("joining the cluster")?;
            cluster.spawn_heartbeat(tasks);
            if settings.replication_work {
                spawn_replication_work(config, local_url, &cluster, Arc::clone(&meta), tasks)?;
            }
            Some(cluster)
        }
        None => None,
    };
    match backend {
        Backend::Local { root, lock } => crate::fsck::spawn_sweep(
            crate::fsck::SweepContext {
                root,
                meta: Arc::clone(&meta),
                flights: Arc::clone(&flights),
                cache_namespaces: config.upstreams.iter().map(|u| u.name.clone()).collect(),
                lock,
                grace: config.sweep_grace,
            },
            config.sweep_interval,
            tasks,
        ),
        Backend::S3(store) => spawn_s3_sweep(store, Arc::clone(&meta), cluster.clone(), config, tasks),
    }
    let mut upstreams = Vec::new();
    for u in &config.upstreams {
        let name = u.name.clone();
        let mut u = u.clone();
        u.token_entries = config.cache.memory_entries;
        upstreams.push(Upstream::new(u).with_context(|| format!("upstream {name}"))?);
    }
    let mut proxy = Proxy::new(
        Arc::clone(&registry),
        upstreams,
        flights,
        config.cache.negative_ttl,
        config.cache.eviction,
        config.cache.memory_entries,
    );
    if let Some(cluster) = &cluster {
        let flights = crate::cluster::flights::ClusterFlights::new(Arc::clone(cluster), Arc::clone(&meta), Arc::clone(&store));
        let checks = Arc::new(crate::cluster::checks::SharedChecks::new(Arc::clone(cluster), Arc::clone(&meta)));
        proxy = proxy.in_cluster(flights, Arc::clone(&checks));
        checks.spawn_pruning(proxy.checks_keep(), tasks);
    }
    let proxy = Arc::new(proxy.allow_shadowing(&config.allow_shadowing).map_err(anyhow::Error::msg).context("allow_shadowing")?);
    let auth = match &config.auth {
        Some(a) => Some(Arc::new(crate::auth::Auth::open(a.clone(), Arc::clone(&meta)).context("setting up access control")?)),
        None => None,
    };
    if config.cache.eviction.max_age.is_some() {
        // Age limits expire content even when nothing new is fetched; budget overruns are handled after each fill.
        let proxy = Arc::clone(&proxy);
        tasks.spawn(
            "cache eviction",
            crate::shutdown::every(std::time::Duration::from_secs(60), tasks.closing(), move || {
                let proxy = Arc::clone(&proxy);
                async move {
                    if let Err(e) = proxy.evict().await {
                        tracing::warn!(error = %e, "cache eviction failed");
                    }
                }
            }),
        );
    }
    if let Some(interval) = config.gc.interval {
        spawn_gc(Arc::clone(&registry), config.gc.options.clone(), interval, tasks);
    }
    let gc = config.gc.options.clone();
    Ok(Arc::new(App { registry, proxy, replication, metrics, auth, https: config.tls.is_some(), gc, cluster }))
}

/// A cluster member works the queues of distributed replication jobs its `[[replication]]` policies name,
/// claiming as this member (the units' `claimed_by` is its id), until shutdown begins: then its unit is given
/// back and its lease released, like a `breakwater worker`'s at SIGTERM.
fn spawn_replication_work(
    config: &Config,
    local_url: &str,
    cluster: &crate::cluster::Cluster,
    meta: Arc<dyn crate::meta::Meta>,
    tasks: &Tasks,
) -> anyhow::Result<()> {
    use crate::replicate::distributed::{self, Worker};
    if config.replication.is_empty() {
        return Ok(());
    }
    let policies = config.replication.iter().map(|p| p.policy(local_url)).collect::<anyhow::Result<Vec<_>>>()?;
    // The lease a member's claim lasts unrenewed: as long as its membership does without a beat.
    let lease = cluster.heartbeat() * crate::cluster::ALIVE_BEATS;
    let me = Worker { id: cluster.id().to_string(), ..Worker::new(lease, false) };
    tasks.spawn("replication work", distributed::work_policies(policies, meta, me, tasks.closing()));
    Ok(())
}

/// Garbage collection every `interval`, the first at start-up. A collection while another instance or `breakwater
/// gc` runs one is skipped, not waited for. Cancelled by a shutdown mid-run, it leaves marks that the next run
/// finishes (and its lease, which lapses).
fn spawn_gc(registry: Arc<Registry>, options: crate::gc::Options, interval: std::time::Duration, tasks: &Tasks) {
    tasks.spawn(
        "garbage collection",
        crate::shutdown::every(interval, tasks.closing(), move || {
            let (registry, options) = (Arc::clone(&registry), options.clone());
            async move {
                match registry.collect(&options).await {
                    Ok(_) => {}
                    Err(crate::gc::GcError::Busy) => tracing::info!("garbage collection skipped: another collector is running"),
                    Err(e) => tracing::warn!(error = %e, "garbage collection failed"),
                }
            }
        }),
    );
}

/// What the housekeeping of a blob store needs beyond the `BlobStore` trait.
pub enum Backend {
    /// A directory, with the shared lock that keeps an offline `fsck --repair` out while the server runs (held
    /// by the sweep task).
    Local { root: std::path::PathBuf, lock: crate::fsck::StoreLock },
    S3(S3Store),
}

/// Opens the blob store `storage` names (`serve`, and `migrate-storage`'s destination). Keep the `Backend` for as
/// long as the store is used: a local one holds the store lock.
pub async fn open_store(storage: &crate::config::StorageConfig) -> anyhow::Result<(Arc<dyn crate::storage::BlobStore>, Backend)> {
    match storage {
        crate::config::StorageConfig::Local(root) => {
            std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
            // Alone on the store (no server, collector or repair has it open), what a crash left in `tmp/` goes
            // now rather than at the sweep after its grace period; not alone, it may be another process's writes.
            if let Some(alone) = crate::fsck::StoreLock::exclusive(root)? {
                let removed = LocalStore::remove_interrupted_writes(root).await.with_context(|| format!("cleaning {}/tmp", root.display()))?;
                if removed > 0 {
                    tracing::info!(removed, "removed the staging files of writes a crash interrupted");
                }
                drop(alone);
            }
            let lock = crate::fsck::StoreLock::shared_soon(root)?;
            let store = LocalStore::open(root).await.with_context(|| format!("opening the content store in {}", root.display()))?;
            Ok((Arc::new(store), Backend::Local { root: root.clone(), lock }))
        }
        crate::config::StorageConfig::S3(s) => {
            let store = S3Store::open(s).await.with_context(|| format!("opening the S3 store s3://{}/{}", s.bucket, s.prefix))?;
            Ok((Arc::new(store.clone()), Backend::S3(store)))
        }
    }
}

/// The object store's own sweep, for what a crash leaves there once older than the upload lifetime (no live push
/// lasts that long): whole-blob writes cut short, and sessions whose row is gone (sessions with a row go with it,
/// `purge_uploads`). A session whose row cannot be read is left for the next pass.
fn spawn_s3_sweep(store: S3Store, meta: Arc<dyn crate::meta::Meta>, cluster: Option<Arc<crate::cluster::Cluster>>, config: &Config, tasks: &Tasks) {
    let grace = config.upload_ttl;
    tasks.spawn(
        "object store sweep",
        crate::shutdown::every(config.sweep_interval, tasks.closing(), move || {
            let (store, meta, cluster) = (store.clone(), Arc::clone(&meta), cluster.clone());
            async move {
                // The store is the cluster's: one member sweeps it at a time.
                let _turn = match &cluster {
                    Some(c) => match c.take_turn("sweep").await {
                        Some(turn) => Some(turn),
                        None => return,
                    },
                    None => None,
                };
                let live = |id: String| {
                    let meta = Arc::clone(&meta);
                    async move { !matches!(meta.upload_repo(&id).await, Ok(None)) }
                };
                match store.sweep_abandoned(grace, live).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(aborted = n, "aborted abandoned multipart uploads"),
                    Err(e) => tracing::warn!(error = %e, "sweeping the object store failed"),
                }
            }
        }),
    );
}

/// Serves `app` on `listener` within `limits`, over TLS when `tls` is given (its certificate reloaded on SIGHUP
/// and when its files change), until `shutdown` resolves, then shuts down in order: stop accepting (and refuse
/// new background work), let the requests in progress finish, then cancel the background `tasks` and wait for
/// them, at most `grace`.
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    limits: crate::connection::Limits,
    tls: Option<Arc<crate::tls::Tls>>,
    tasks: Tasks,
    grace: std::time::Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let acceptor = tls.map(|tls| {
        let acceptor = tls.acceptor();
        tls.spawn_reloader(&tasks);
        acceptor
    });
    let closing = tasks.clone();
    let signal = async move {
        shutdown.await;
        closing.close();
    };
    // Background work is cancelled only after the drain: a client still streaming a flight gets its blob.
    crate::connection::serve(listener, http::router(app), limits, acceptor, signal).await;
    let abandoned = tasks.shutdown(grace).await;
    if abandoned.tasks.is_empty() {
        tracing::info!("background tasks stopped");
    }
    Ok(())
}

/// The warning to log at start when serving plain HTTP where other machines can connect, if it is so: their
/// requests, credentials included, would cross the network in clear.
pub fn plain_http_warning(addr: std::net::SocketAddr, tls: bool) -> Option<String> {
    if tls || addr.ip().is_loopback() {
        return None;
    }
    Some(format!(
        "serving plain HTTP on {addr}, which is not a loopback address: requests, credentials included, cross the \
         network unencrypted and clients need insecure-registry settings; give --tls-cert and --tls-key to serve HTTPS"
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn plain_http_is_flagged_beyond_loopback_only() {
        let warn = |addr: &str, tls| super::plain_http_warning(addr.parse().unwrap(), tls);
        assert!(warn("0.0.0.0:5000", false).is_some_and(|w| w.contains("--tls-cert")));
        assert!(warn("[::]:5000", false).is_some());
        assert!(warn("192.0.2.7:5000", false).is_some());
        assert_eq!(warn("0.0.0.0:5000", true), None);
        assert_eq!(warn("127.0.0.1:5000", false), None);
        assert_eq!(warn("[::1]:5000", false), None);
    }
}
