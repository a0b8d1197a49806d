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
use crate::storage::LocalStore;

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
    // Held for the server's lifetime (by the sweep task): an offline `fsck --repair` cannot start meanwhile.
    let content = config.data.join("content");
    std::fs::create_dir_all(&content).with_context(|| format!("creating {}", content.display()))?;
    let store_lock = crate::fsck::StoreLock::shared(&content)?;
    let store = LocalStore::open(&config.data.join("content"))
        .await
        .with_context(|| format!("opening the content store in {}", config.data.display()))?;
    let meta = crate::meta::open(&config.metadata).await.context("opening the metadata store")?;
    for p in &config.replication {
        p.policy(local_url).with_context(|| format!("replication policy {}", p.name))?;
    }
    let replication =
        crate::replicate::Scheduler::new(config.replication.clone(), Arc::clone(&meta), local_url.to_string(), tasks.clone());
    replication.spawn_schedules();
    let store: Arc<dyn crate::storage::BlobStore> = Arc::new(store);
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
    let flights = BlobFlights::new(store, config.data.join("content").join("spool"), tasks.clone())
        .await
        .context("preparing the cache's spool directory")?;
    crate::fsck::spawn_sweep(
        crate::fsck::SweepContext {
            root: content,
            meta: Arc::clone(&meta),
            flights: Arc::clone(&flights),
            cache_namespaces: config.upstreams.iter().map(|u| u.name.clone()).collect(),
            lock: store_lock,
            grace: config.sweep_grace,
        },
        config.sweep_interval,
        tasks,
    );
    let mut upstreams = Vec::new();
    for u in &config.upstreams {
        let name = u.name.clone();
        let mut u = u.clone();
        u.token_entries = config.cache.memory_entries;
        upstreams.push(Upstream::new(u).with_context(|| format!("upstream {name}"))?);
    }
    let proxy = Proxy::new(
        Arc::clone(&registry),
        upstreams,
        flights,
        config.cache.negative_ttl,
        config.cache.eviction,
        config.cache.memory_entries,
    );
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
    Ok(Arc::new(App { registry, proxy, replication, metrics, auth, https: config.tls.is_some() }))
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
