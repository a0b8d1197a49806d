//! The `breakwater` command line.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};

use breakwater::config::{self, Config, FileConfig, LogFormat};
use breakwater::secret::Secret;

#[derive(Parser)]
#[command(name = "breakwater", version, about = "A container registry, pull-through cache and replicator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the registry.
    Serve(Box<ServeArgs>),
    /// Pull artifacts through a running breakwater so its cache holds them (e.g. docker.io/library/alpine:3.20).
    Warm(WarmArgs),
    /// Copy repositories from one registry to another, page by page, resumably.
    Replicate(Box<ReplicateArgs>),
    /// Work a distributed replication job's queue (enqueued by `replicate --distributed`) until it is done.
    Worker(Box<ReplicateArgs>),
    /// Check a store (bytes against digests, records against bytes, leftovers); --repair fixes what it finds.
    Fsck(FsckArgs),
    /// Remove unreferenced blobs (and, with delete_untagged, untagged manifests), online: safe while serve runs.
    Gc(GcArgs),
    /// Robot tokens for CI: create (prints the secret once), list, revoke.
    Token(TokenArgs),
    /// Copy the blobs of a local store into another store (e.g. S3), resumably: run it again to continue.
    MigrateStorage(MigrateArgs),
}

#[derive(clap::Args)]
struct MigrateArgs {
    /// The local store to copy from: file://DIR (a server's is DATA/content).
    #[arg(long)]
    from: String,
    /// The store to copy into: s3://BUCKET/PREFIX or file://DIR.
    #[arg(long)]
    to: String,
    /// A TOML configuration file whose [storage] table has the destination's S3 settings (endpoint, region,
    /// credentials); the AWS_* environment otherwise.
    #[arg(long, env = "BREAKWATER_CONFIG")]
    config: Option<PathBuf>,
    /// Copies at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
}

async fn migrate_storage(args: MigrateArgs) -> anyhow::Result<std::process::ExitCode> {
    use std::io::IsTerminal;
    init_logging(LogFormat::Text);
    let root = PathBuf::from(args.from.strip_prefix("file://").context("--from must be file://DIR")?);
    anyhow::ensure!(root.join("blobs").is_dir(), "{} holds no breakwater store (no blobs/)", root.display());
    let mut file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    file.storage.url = None;
    let dest = config::storage(Some(args.to.clone()), file.storage, Path::new("."))?;
    if let config::StorageConfig::Local(dir) = &dest {
        anyhow::ensure!(*dir != root, "--from and --to are the same store");
    }
    let (to, _backend) = breakwater::server::open_store(&dest).await?;
    let bar = if std::io::stderr().is_terminal() { indicatif::ProgressBar::new_spinner() } else { indicatif::ProgressBar::hidden() };
    let report = breakwater::storage::migrate::migrate(&root, to, args.concurrency, |r| {
        bar.set_message(format!("{} copied ({} bytes), {} already there, {} failed", r.copied, r.bytes_copied, r.skipped, r.failed.len()));
        bar.tick();
    })
    .await?;
    bar.finish_and_clear();
    for (digest, why) in &report.failed {
        println!("failed {digest}: {why}");
    }
    println!(
        "copied {} blobs ({} bytes), {} already in {}, {} failed",
        report.copied,
        report.bytes_copied,
        report.skipped,
        args.to,
        report.failed.len()
    );
    Ok(if report.failed.is_empty() { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE })
}

#[derive(clap::Args)]
struct TokenArgs {
    #[command(subcommand)]
    action: TokenAction,
    /// The server's TOML configuration file (its data directory and metadata store).
    #[arg(long, env = "BREAKWATER_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Data directory whose embedded metadata store keeps the robots [default: ./breakwater-data].
    #[arg(long, env = "BREAKWATER_DATA", global = true)]
    data: Option<PathBuf>,
    /// Metadata store URL (the one the servers use).
    #[arg(long, env = "BREAKWATER_METADATA", global = true)]
    metadata: Option<String>,
}

#[derive(Subcommand)]
enum TokenAction {
    /// Creates robot NAME; it logs in as `robot$NAME` with the secret printed on stdout (shown only this once).
    Create {
        name: String,
        /// What it may do: REPOSITORY-GLOB:ACTIONS, e.g. `ci/**:pull,push` (repeatable; actions pull, push, delete, *).
        #[arg(long, required = true)]
        scope: Vec<String>,
        /// Lifetime, e.g. `90d`, `12h`, `3600s` [default: no expiry].
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<std::time::Duration>,
    },
    /// Lists robots: name, scopes, created, expiry, state.
    List,
    /// Revokes robot NAME: its secret is refused from now on (tokens it already holds expire within minutes).
    Revoke { name: String },
}

async fn token(args: TokenArgs) -> anyhow::Result<std::process::ExitCode> {
    use breakwater::auth::robots;
    init_logging(LogFormat::Text);
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let (data, metadata) = store_location(args.data.or(file.data), args.metadata.map(Into::into).or(file.metadata));
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    let meta = breakwater::meta::open(&metadata).await.context("opening the metadata store")?;
    match args.action {
        TokenAction::Create { name, scope, expires } => {
            let secret = robots::create(&meta, &name, &scope, expires).await?;
            eprintln!("created robot${name}: it logs in as robot${name} with the secret below, which is shown only this once");
            println!("{secret}");
        }
        TokenAction::List => {
            let mut last: Option<String> = None;
            println!("{:<24} {:<8} {:<21} {:<21} scopes", "name", "state", "created", "expires");
            loop {
                let page = meta.robots(last.as_deref(), 1000).await?;
                for r in &page.items {
                    let state = if r.revoked_at.is_some() { "revoked" } else if robots::usable(r) { "active" } else { "expired" };
                    let when = |t: i64| breakwater::auth::token::rfc3339(u64::try_from(t).unwrap_or(0));
                    let expires = r.expires_at.map_or_else(|| "never".to_string(), when);
                    println!("{:<24} {:<8} {:<21} {:<21} {}", format!("robot${}", r.name), state, when(r.created_at), expires, r.scopes);
                }
                match page.items.last() {
                    Some(r) if page.more => last = Some(r.name.clone()),
                    _ => break,
                }
            }
        }
        TokenAction::Revoke { name } => {
            let name = name.strip_prefix(robots::PREFIX).unwrap_or(&name).to_string();
            let at = i64::try_from(breakwater::auth::token::now_secs()).unwrap_or(i64::MAX);
            if !meta.revoke_robot(&name, at).await? {
                eprintln!("no active robot named {name}");
                return Ok(std::process::ExitCode::FAILURE);
            }
            eprintln!("revoked robot${name}");
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

#[derive(clap::Args)]
struct ReplicateArgs {
    /// Run the `[[replication]]` policy of this name from the config file (other policy flags are ignored).
    #[arg(long)]
    policy: Option<String>,
    /// TOML configuration file holding `[[replication]]` policies.
    #[arg(long, env = "BREAKWATER_CONFIG")]
    config: Option<PathBuf>,
    /// Source registry URL.
    #[arg(long, required_unless_present = "policy")]
    from: Option<String>,
    /// Destination registry URL, or `local` for the breakwater at --local-url.
    #[arg(long, required_unless_present = "policy")]
    to: Option<String>,
    /// How the source lists its repositories: the catalog API, or Harbor's project/repository API.
    #[arg(long, value_enum, default_value = "registry")]
    from_kind: breakwater::replicate::SourceKind,
    #[arg(long, env = "BREAKWATER_FROM_USERNAME")]
    from_username: Option<String>,
    #[arg(long, env = "BREAKWATER_FROM_PASSWORD", hide_env_values = true)]
    from_password: Option<String>,
    #[arg(long, env = "BREAKWATER_TO_USERNAME")]
    to_username: Option<String>,
    #[arg(long, env = "BREAKWATER_TO_PASSWORD", hide_env_values = true)]
    to_password: Option<String>,
    /// Where `local` is.
    #[arg(long, default_value = "http://127.0.0.1:5000")]
    local_url: String,
    /// Repositories to copy (glob: `*`, `**`, `?`, `{a,b}`; repeatable; default all).
    #[arg(long)]
    include: Vec<String>,
    /// Repositories to leave out (glob; repeatable).
    #[arg(long)]
    exclude: Vec<String>,
    /// Tags to copy (glob, or `regex:RE`; repeatable; default all).
    #[arg(long)]
    tags: Vec<String>,
    /// Tags to leave out (glob or `regex:RE`; repeatable).
    #[arg(long)]
    exclude_tags: Vec<String>,
    /// Only the last N tags of each repository, in tag order (v1.9 before v1.10).
    #[arg(long)]
    latest: Option<usize>,
    /// What --latest counts: `tag` (tag order) or `created` (the image config's `created`, newest first; tags
    /// without one count as oldest).
    #[arg(long, value_enum, default_value = "tag")]
    latest_by: breakwater::replicate::LatestBy,
    /// Destination names: replace the prefix FROM with TO (repeatable; first match wins).
    #[arg(long, value_name = "FROM=TO")]
    rewrite: Vec<String>,
    /// Keep only this platform from indexes (os/arch[/variant]; repeatable). An index that loses entries gets a new
    /// digest; one whose every platform is kept is copied unchanged.
    #[arg(long)]
    platform: Vec<String>,
    /// Also copy the signatures, SBOMs and other artifacts that refer to copied manifests.
    #[arg(long)]
    referrers: bool,
    /// Replace destination tags that point at another digest (default: leave them and report them).
    #[arg(long = "override")]
    override_tags: bool,
    /// Tag listings and artifact copies in flight at once.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Catalog page size asked of the source.
    #[arg(long)]
    page_size: Option<u64>,
    /// Catalog walkers: key ranges of the source's catalog listed at once [default: 4].
    #[arg(long)]
    walkers: Option<usize>,
    /// Requests per second to each registry, at most.
    #[arg(long)]
    rate: Option<f64>,
    /// Bytes per second read from the source, at most.
    #[arg(long)]
    bandwidth: Option<u64>,
    /// Show what would be copied; copy nothing.
    #[arg(long)]
    dry_run: bool,
    /// Job name under which the checkpoint and failures are kept.
    #[arg(long, default_value = "default")]
    job: String,
    /// Continue the job from its checkpoint.
    #[arg(long, conflicts_with = "retry_failed")]
    resume: bool,
    /// Retry only the items the job recorded as failed.
    #[arg(long)]
    retry_failed: bool,
    /// Data directory whose embedded metadata store keeps job state [default: ./breakwater-data].
    #[arg(long, env = "BREAKWATER_DATA")]
    data: Option<PathBuf>,
    /// Metadata store URL for job state (e.g. the PostgreSQL a breakwater cluster shares).
    #[arg(long, env = "BREAKWATER_METADATA")]
    metadata: Option<String>,
    /// Put the job's work in a queue in the metadata store (once per job) and work it; `breakwater worker`s with
    /// the same --metadata and --job work it too.
    #[arg(long, conflicts_with_all = ["resume", "retry_failed"])]
    distributed: bool,
    /// How long a distributed worker's claim on a unit lasts unrenewed (a dead worker's unit waits that long).
    #[arg(long, default_value_t = 15)]
    lease_secs: u64,
}

impl ReplicateArgs {
    fn policy(&self) -> anyhow::Result<breakwater::replicate::Policy> {
        let file_policy = match &self.policy {
            Some(name) => {
                let path = self.config.as_ref().context("--policy needs --config FILE")?;
                let file = FileConfig::load(path)?;
                let p = file.replication.into_iter().find(|p| &p.name == name);
                Some(p.with_context(|| format!("no [[replication]] named {name} in {}", path.display()))?)
            }
            None => None,
        };
        let from_flags = || config::FileReplication {
            name: self.job.clone(),
            from: self.from.clone().unwrap_or_default(),
            from_kind: self.from_kind,
            to: self.to.clone().unwrap_or_default(),
            from_username: self.from_username.clone(),
            from_password: self.from_password.clone().map(Into::into),
            to_username: self.to_username.clone(),
            to_password: self.to_password.clone().map(Into::into),
            from_ca: None,
            to_ca: None,
            include: self.include.clone(),
            exclude: self.exclude.clone(),
            tags: self.tags.clone(),
            exclude_tags: self.exclude_tags.clone(),
            latest: self.latest,
            latest_by: self.latest_by,
            rewrite: self.rewrite.clone(),
            platforms: self.platform.clone(),
            referrers: self.referrers,
            override_tags: self.override_tags,
            concurrency: self.concurrency,
            page_size: self.page_size,
            walkers: self.walkers,
            rate: self.rate,
            bandwidth: self.bandwidth,
            schedule_secs: None,
            events_secret: None,
        };
        let mut policy = file_policy.unwrap_or_else(from_flags).policy(&self.local_url)?;
        policy.dry_run = self.dry_run;
        if let Some(c) = self.concurrency {
            policy.concurrency = c.max(1);
        }
        if let Some(w) = self.walkers {
            policy.walkers = w.clamp(1, config::MAX_REPLICATION_WALKERS);
        }
        Ok(policy)
    }
}

impl ReplicateArgs {
    /// The metadata store holding the job's state: --metadata, or the embedded one in --data.
    async fn meta(&self) -> anyhow::Result<std::sync::Arc<dyn breakwater::meta::Meta>> {
        let data = self.data.clone().unwrap_or_else(|| PathBuf::from(config::DEFAULT_DATA));
        let metadata = match &self.metadata {
            Some(m) => m.clone(),
            None => {
                std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
                config::sqlite_url(&data)
            }
        };
        breakwater::meta::open(&metadata).await.context("opening the metadata store")
    }
}

/// `replicate --distributed` (`enqueue`) and `worker`: work the job's queue until it is done, or a signal
/// (then the unit in hand is given back, its lease released, and the exit is 128 + the signal).
async fn work_queue(args: ReplicateArgs, enqueue: bool) -> anyhow::Result<std::process::ExitCode> {
    init_logging(LogFormat::Text);
    let policy = args.policy()?;
    let meta = args.meta().await?;
    let job = policy.job.clone();
    let worker = breakwater::replicate::distributed::Worker::new(std::time::Duration::from_secs(args.lease_secs.max(1)), enqueue);
    let cancel = tokio_util::sync::CancellationToken::new();
    let signalled = tokio::spawn(stop_on_signal(cancel.clone()));
    let record = breakwater::replicate::distributed::work(policy, std::sync::Arc::clone(&meta), worker, cancel).await?;
    print_failures(&*meta, &job).await?;
    print_summary(&job, &record, 0, 0);
    exit_code(&record, signalled).await
}

/// Prints the failures job `job` recorded, one a line, on stderr.
async fn print_failures(meta: &dyn breakwater::meta::Meta, job: &str) -> anyhow::Result<()> {
    let mut last: Option<(String, String)> = None;
    loop {
        let page = meta.failures(job, last.as_ref().map(|(r, t)| (r.as_str(), t.as_str())), 1000).await?;
        for f in &page.items {
            eprintln!("failed: {}{}{}: {}", f.repo, if f.tag.is_empty() { "" } else { ":" }, f.tag, f.reason);
        }
        match page.items.last() {
            Some(f) if page.more => last = Some((f.repo.clone(), f.tag.clone())),
            _ => return Ok(()),
        }
    }
}

/// The run's summary: a line for people on stderr, and the JSON line scripts read on stdout.
fn print_summary(job: &str, record: &breakwater::meta::JobRecord, conflicts: u64, tags_held_max: u64) {
    eprintln!(
        "{job}: {} pages, {} repositories seen, {} matched; {} artifacts copied, {} skipped ({conflicts} left alone because the destination tag differs), {} failed; {} bytes",
        record.pages, record.repos_seen, record.repos_matched, record.copied, record.skipped, record.failed, record.bytes
    );
    let summary = serde_json::json!({
        "job": job, "pages": record.pages, "repos_seen": record.repos_seen, "repos_matched": record.repos_matched,
        "copied": record.copied, "skipped": record.skipped, "failed": record.failed, "bytes": record.bytes,
        "conflicts": conflicts, "mark": record.mark, "status": record.status,
        "tags_held_max": tags_held_max,
    });
    println!("{summary}");
}

/// 0 for a finished job, 1 for a failed one, 128 + the signal for one a signal interrupted.
async fn exit_code(record: &breakwater::meta::JobRecord, signalled: tokio::task::JoinHandle<Signal>) -> anyhow::Result<std::process::ExitCode> {
    if record.status == breakwater::replicate::INTERRUPTED {
        // The shell's convention for a process stopped by a signal: 128 + its number.
        // Only a signal interrupts this run, so the watcher has returned it (or is about to).
        let signal = signalled.await.unwrap_or(Signal::Terminate);
        return Ok(std::process::ExitCode::from(signal.exit_code()));
    }
    Ok(if record.status == "finished" { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE })
}

async fn replicate(args: ReplicateArgs) -> anyhow::Result<std::process::ExitCode> {
    if args.distributed {
        return work_queue(args, true).await;
    }
    init_logging(LogFormat::Text);
    let policy = args.policy()?;
    let meta = args.meta().await?;
    let mode = match (args.resume, args.retry_failed) {
        (true, _) => breakwater::replicate::Mode::Resume,
        (_, true) => breakwater::replicate::Mode::RetryFailed,
        _ => breakwater::replicate::Mode::Fresh,
    };
    let job = policy.job.clone();
    let progress = std::sync::Arc::new(breakwater::replicate::Progress::default());
    let reporter = breakwater::replicate::Reporter::start(&job, std::sync::Arc::clone(&progress));
    let cancel = tokio_util::sync::CancellationToken::new();
    let signalled = tokio::spawn(stop_on_signal(cancel.clone()));
    let result =
        breakwater::replicate::run(policy, std::sync::Arc::clone(&meta), mode, Some(std::sync::Arc::clone(&progress)), cancel).await;
    drop(reporter);
    let record = result?;
    print_failures(&*meta, &job).await?;
    let conflicts = progress.conflicts.load(std::sync::atomic::Ordering::Relaxed);
    print_summary(&job, &record, conflicts, progress.tags_held_max.load(std::sync::atomic::Ordering::Relaxed));
    exit_code(&record, signalled).await
}

/// Stops the run at the first SIGINT or SIGTERM (it saves its checkpoint and ends `interrupted`); a second one
/// exits at once, for someone who will not wait for the save. Returns the first signal.
async fn stop_on_signal(cancel: tokio_util::sync::CancellationToken) -> Signal {
    let first = signal().await;
    eprintln!("interrupted: saving the checkpoint (signal again to quit at once; --resume continues)");
    cancel.cancel();
    let _quit = tokio::spawn(async move {
        signal().await;
        std::process::exit(first.exit_code().into());
    });
    first
}

/// Bound on `warm`'s wait for an answer and on silence inside a body (a cold blob is fetched upstream first).
const WARM_TIMEOUT_SECS: u64 = 60;

#[derive(clap::Args)]
struct WarmArgs {
    /// The breakwater to warm.
    #[arg(long, env = "BREAKWATER_SERVER", default_value = "http://127.0.0.1:5000")]
    server: String,
    /// Only this platform of a multi-platform image (os/arch[/variant]); default: every platform.
    #[arg(long)]
    platform: Option<String>,
    /// References as the server names them: UPSTREAM/REPO:TAG or UPSTREAM/REPO@DIGEST.
    #[arg(required = true)]
    refs: Vec<String>,
    /// A user (or robot) of a breakwater with access control, with pull rights on the references.
    #[arg(long, env = "BREAKWATER_USERNAME")]
    username: Option<String>,
    #[arg(long, env = "BREAKWATER_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// PEM CA certificate(s) to verify an HTTPS server with, beside the system's roots.
    #[arg(long)]
    ca: Option<PathBuf>,
}

async fn warm(args: WarmArgs) -> anyhow::Result<()> {
    init_logging(LogFormat::Text);
    let refs = args
        .refs
        .iter()
        .map(|r| r.parse().map_err(|e: String| anyhow::anyhow!(e)))
        .collect::<anyhow::Result<Vec<breakwater::warm::WarmRef>>>()?;
    let mut server = config::upstream("server", args.server.trim_end_matches('/'), 0, WARM_TIMEOUT_SECS, false, Some(false))?;
    server.username = args.username;
    server.password = args.password.map(Into::into);
    server.ca = args.ca;
    let stats = breakwater::warm::warm(server, &refs, args.platform.as_deref()).await?;
    eprintln!("warmed {} manifests and {} blobs ({} bytes)", stats.manifests, stats.blobs, stats.bytes);
    Ok(())
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML configuration file; flags and environment variables override it.
    #[arg(long, env = "BREAKWATER_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:5000]. Port 0 picks a free port.
    #[arg(long, env = "BREAKWATER_LISTEN")]
    listen: Option<SocketAddr>,
    /// Data directory (content store and embedded metadata) [default: ./breakwater-data].
    #[arg(long, env = "BREAKWATER_DATA")]
    data: Option<PathBuf>,
    /// Metadata store URL: sqlite://PATH or postgres://USER@HOST/DB [default: SQLite in the data directory].
    #[arg(long, env = "BREAKWATER_METADATA")]
    metadata: Option<String>,
    /// Where blob bytes live: file://DIR, or s3://BUCKET/PREFIX (an S3-compatible store; endpoint, region and
    /// credentials from [storage] or the AWS_* environment) [default: file://DATA/content].
    #[arg(long, env = "BREAKWATER_STORAGE")]
    storage: Option<String>,
    /// Log format on stderr [default: text].
    #[arg(long, env = "BREAKWATER_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Refuse every DELETE (405 UNSUPPORTED).
    #[arg(long, env = "BREAKWATER_NO_DELETE")]
    no_delete: bool,
    /// Discard upload sessions older than this [default: 86400].
    #[arg(long, env = "BREAKWATER_UPLOAD_TTL_SECS")]
    upload_ttl_secs: Option<u64>,
    /// Seconds between reconciliation sweeps (the first runs at start-up) [default: 3600].
    #[arg(long, env = "BREAKWATER_SWEEP_INTERVAL_SECS")]
    sweep_interval_secs: Option<u64>,
    /// Files and upload sessions left alone this long are abandoned, for the sweep [default: 600].
    #[arg(long, env = "BREAKWATER_SWEEP_GRACE_SECS")]
    sweep_grace_secs: Option<u64>,
    /// Cache an upstream registry: NAME=URL (repeatable). Clients pull HOST/NAME/REPO:TAG.
    #[arg(long = "upstream", value_name = "NAME=URL", env = "BREAKWATER_UPSTREAMS", value_delimiter = ',')]
    upstreams: Vec<String>,
    /// The upstream that un-prefixed names go to (registry-mirror mode without `ns=`).
    #[arg(long, env = "BREAKWATER_DEFAULT_UPSTREAM")]
    default_upstream: Option<String>,
    /// How long a cached tag is trusted before it is revalidated upstream, for --upstream entries [default: 300].
    #[arg(long, env = "BREAKWATER_TAG_TTL_SECS")]
    tag_ttl_secs: Option<u64>,
    /// Bound on waiting for an upstream, for --upstream entries [default: 5].
    #[arg(long, env = "BREAKWATER_UPSTREAM_TIMEOUT_SECS")]
    upstream_timeout_secs: Option<u64>,
    /// How long an upstream's "not found" is remembered [default: 30].
    #[arg(long, env = "BREAKWATER_NEGATIVE_TTL_SECS")]
    negative_ttl_secs: Option<u64>,
    /// Budget of the pull-through cache in bytes; least recently pulled blobs are evicted beyond it.
    #[arg(long, env = "BREAKWATER_CACHE_MAX_BYTES")]
    cache_max_bytes: Option<u64>,
    /// Cached blobs not pulled for this long are evicted.
    #[arg(long, env = "BREAKWATER_CACHE_MAX_AGE_SECS")]
    cache_max_age_secs: Option<u64>,
    /// A request head must arrive whole within this many seconds [default: 30].
    #[arg(long, env = "BREAKWATER_HEADER_TIMEOUT_SECS")]
    header_timeout_secs: Option<u64>,
    /// Close kept-alive connections idle this long, and fail bodies that make no progress for this long
    /// [default: 60].
    #[arg(long, env = "BREAKWATER_IDLE_TIMEOUT_SECS")]
    idle_timeout_secs: Option<u64>,
    /// Connections served at once; more wait unaccepted until one closes [default: 8192].
    #[arg(long, env = "BREAKWATER_MAX_CONNECTIONS")]
    max_connections: Option<u32>,
    /// Entries at most in each in-memory map: tag validations, not-found answers, recent accesses, each
    /// upstream's tokens [default: 100000].
    #[arg(long, env = "BREAKWATER_CACHE_MEMORY_ENTRIES")]
    cache_memory_entries: Option<u64>,
    /// Users from an htpasswd file (bcrypt, `htpasswd -B`); turns access control on. Re-read when it changes.
    #[arg(long, env = "BREAKWATER_HTPASSWD")]
    htpasswd: Option<PathBuf>,
    /// How clients authenticate: the registry token flow, or a password on every request [default: token].
    #[arg(long = "auth", value_enum, env = "BREAKWATER_AUTH")]
    auth_mode: Option<breakwater::auth::Mode>,
    /// Anyone may pull every repository without credentials (pushes and deletes still need a user).
    #[arg(long, env = "BREAKWATER_ANONYMOUS_PULL")]
    anonymous_pull: bool,
    /// Un-prefixed names (glob; repeatable) that may be pushed although the default upstream serves them.
    #[arg(long, value_name = "GLOB")]
    allow_shadowing: Vec<String>,
    /// Serve HTTPS with this PEM certificate chain (server certificate first); needs --tls-key. Reloaded on
    /// SIGHUP and when the file changes.
    #[arg(long, env = "BREAKWATER_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "BREAKWATER_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Join the cluster of the instances started with this secret (at least 16 characters), the same
    /// PostgreSQL --metadata and the same s3:// --storage.
    #[arg(long, env = "BREAKWATER_CLUSTER_SECRET", hide_env_values = true)]
    cluster_secret: Option<String>,
    /// The base URL the other cluster members reach this one at [default: the listen address].
    #[arg(long, env = "BREAKWATER_ADVERTISE")]
    advertise: Option<String>,
}

impl ServeArgs {
    fn resolve(self) -> anyhow::Result<Config> {
        let file = match &self.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let (data, metadata) = store_location(self.data.or(file.data), self.metadata.map(Into::into).or(file.metadata));
        let mut upstreams = Vec::new();
        for u in file.upstream {
            upstreams.push(u.resolve()?);
        }
        for spec in &self.upstreams {
            let (name, url) = spec.split_once('=').with_context(|| format!("--upstream {spec:?}: expected NAME=URL"))?;
            upstreams.push(config::upstream(
                name,
                url,
                self.tag_ttl_secs.unwrap_or(config::DEFAULT_TAG_TTL_SECS),
                self.upstream_timeout_secs.unwrap_or(config::DEFAULT_UPSTREAM_TIMEOUT_SECS),
                false,
                None,
            )?);
        }
        if let Some(default) = &self.default_upstream {
            let u = upstreams.iter_mut().find(|u| &u.name == default);
            u.with_context(|| format!("--default-upstream {default}: no upstream has that name"))?.default = true;
        }
        for (i, u) in upstreams.iter().enumerate() {
            if upstreams[..i].iter().any(|v| v.name == u.name) {
                anyhow::bail!("upstream {} is configured twice", u.name);
            }
        }
        if upstreams.iter().filter(|u| u.default).count() > 1 {
            anyhow::bail!("only one upstream can be the default");
        }
        let negative_ttl = self.negative_ttl_secs.or(file.cache.negative_ttl_secs).unwrap_or(config::DEFAULT_NEGATIVE_TTL_SECS);
        let mut names = std::collections::HashSet::new();
        for r in &file.replication {
            if !names.insert(r.name.clone()) {
                anyhow::bail!("replication policy {} is configured twice", r.name);
            }
        }
        let upload_ttl = self.upload_ttl_secs.or(file.upload_ttl_secs).unwrap_or(config::DEFAULT_UPLOAD_TTL_SECS);
        let connections = config::connection_limits(
            self.header_timeout_secs.or(file.header_timeout_secs),
            self.idle_timeout_secs.or(file.idle_timeout_secs),
            self.max_connections.or(file.max_connections),
        )?;
        let sweep_interval =
            self.sweep_interval_secs.or(file.sweep_interval_secs).unwrap_or(config::DEFAULT_SWEEP_INTERVAL_SECS);
        let memory_entries = self
            .cache_memory_entries
            .or(file.cache.memory_entries)
            .unwrap_or(breakwater::bounded::DEFAULT_ENTRIES)
            .max(1);
        let auth_flags = config::AuthFlags { htpasswd: self.htpasswd, mode: self.auth_mode, anonymous_pull: self.anonymous_pull };
        let auth = config::auth(file.auth, auth_flags, &data, memory_entries)?;
        let mut allow_shadowing = file.allow_shadowing;
        allow_shadowing.extend(self.allow_shadowing);
        let tls = config::tls(self.tls_cert.or(file.tls.cert), self.tls_key.or(file.tls.key))?;
        let storage = config::storage(self.storage, file.storage, &data)?;
        let cluster = config::cluster(self.cluster_secret.map(Into::into), self.advertise, file.cluster, &metadata, &storage)?;
        let cache_namespaces = upstreams.iter().map(|u| u.name.clone()).collect();
        Ok(Config {
            cluster,
            storage,
            tls,
            connections,
            upload_ttl: std::time::Duration::from_secs(upload_ttl),
            sweep_interval: std::time::Duration::from_secs(sweep_interval),
            sweep_grace: self
                .sweep_grace_secs
                .or(file.sweep_grace_secs)
                .map_or(breakwater::fsck::DEFAULT_GRACE, std::time::Duration::from_secs),
            replication: file.replication,
            upstreams,
            cache: config::CacheConfig {
                negative_ttl: std::time::Duration::from_secs(negative_ttl),
                eviction: breakwater::proxy::EvictionPolicy {
                    max_bytes: self.cache_max_bytes.or(file.cache.max_bytes),
                    max_age: self.cache_max_age_secs.or(file.cache.max_age_secs).map(std::time::Duration::from_secs),
                },
                memory_entries,
            },
            auth,
            allow_shadowing,
            listen: self.listen.or(file.listen).unwrap_or_else(|| config::DEFAULT_LISTEN.parse().expect("valid default")),
            data,
            metadata,
            log_format: self.log_format.or(file.log_format).unwrap_or(LogFormat::Text),
            delete_enabled: !self.no_delete && file.delete_enabled.unwrap_or(true),
            gc: file.gc.resolve(cache_namespaces)?,
        })
    }
}

/// The data directory and metadata URL of a store, given by flags or the config file, or the defaults: the same
/// for every command that opens a store.
fn store_location(data: Option<PathBuf>, metadata: Option<Secret>) -> (PathBuf, Secret) {
    let data = data.unwrap_or_else(|| PathBuf::from(config::DEFAULT_DATA));
    let metadata = metadata.unwrap_or_else(|| config::sqlite_url(&data).into());
    (data, metadata)
}

#[derive(clap::Args)]
struct FsckArgs {
    // Where the store is, named as for `serve` and `gc`; the upstreams' repositories are caches, whose manifests may
    // lack blobs nobody has pulled yet.
    #[command(flatten)]
    store: StoreArgs,
    /// Fix what is found: quarantine corrupt blobs, remove records that point at nothing and leftovers.
    #[arg(long)]
    repair: bool,
    /// Blobs, files and upload sessions younger than this many seconds are work in progress, not leftovers.
    #[arg(long, default_value_t = breakwater::fsck::DEFAULT_GRACE.as_secs())]
    grace_secs: u64,
    /// Blobs hashed at once [default: one per core, at most 8, on local disk; 16 on object storage].
    #[arg(long)]
    concurrency: Option<usize>,
}

/// The store `fsck` checks, and its directory if it is a local one. A local store is taken as it is (opening it
/// as `serve` does would empty `tmp/`, whose files a running server may be writing, and which fsck reports);
/// object storage is opened as `serve` opens it: the same settings, and its credentials checked at once.
async fn fsck_store(
    storage: &config::StorageConfig,
) -> anyhow::Result<(std::sync::Arc<dyn breakwater::storage::BlobStore>, Option<PathBuf>)> {
    match storage {
        config::StorageConfig::Local(root) => {
            anyhow::ensure!(root.join("blobs").is_dir(), "{} holds no breakwater store (no blobs/)", root.display());
            Ok((std::sync::Arc::new(breakwater::storage::LocalStore::existing(root)), Some(root.clone())))
        }
        config::StorageConfig::S3(_) => Ok((breakwater::server::open_store(storage).await?.0, None)),
    }
}

/// Where a store is: what `serve` would open with the same flags, environment and configuration file.
#[derive(clap::Args)]
struct StoreArgs {
    /// The server's TOML configuration file (its data directory, metadata store, storage and upstreams).
    #[arg(long, env = "BREAKWATER_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory of the store [default: ./breakwater-data].
    #[arg(long, env = "BREAKWATER_DATA")]
    data: Option<PathBuf>,
    /// Metadata store URL [default: SQLite in the data directory].
    #[arg(long, env = "BREAKWATER_METADATA")]
    metadata: Option<String>,
    /// The server's blob store, file://DIR or s3://BUCKET/PREFIX [default: file://DATA/content]. S3 settings
    /// come from the configuration file's [storage] table and the AWS_* environment, as for `serve`.
    #[arg(long, env = "BREAKWATER_STORAGE")]
    storage: Option<String>,
    /// The server's upstreams, NAME=URL or NAME (repeatable): their repositories are the cache's.
    #[arg(long = "upstream", value_name = "NAME=URL", env = "BREAKWATER_UPSTREAMS", value_delimiter = ',')]
    upstreams: Vec<String>,
}

/// A store as `StoreArgs` name it, resolved: its configuration file, metadata URL, blob store and the names of
/// the cache's namespaces.
struct StoreLocation {
    file: FileConfig,
    metadata: Secret,
    storage: config::StorageConfig,
    cache_namespaces: Vec<String>,
}

impl StoreArgs {
    fn resolve(self) -> anyhow::Result<StoreLocation> {
        let mut file = match &self.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let mut cache_namespaces: Vec<String> = file.upstream.iter().map(|u| u.name.clone()).collect();
        cache_namespaces.extend(self.upstreams.iter().map(|u| u.split_once('=').map_or(u.as_str(), |(name, _)| name).to_string()));
        let (data, metadata) = store_location(self.data.or(file.data.take()), self.metadata.map(Into::into).or(file.metadata.take()));
        let storage = config::storage(self.storage, std::mem::take(&mut file.storage), &data)?;
        Ok(StoreLocation { file, metadata, storage, cache_namespaces })
    }
}

#[derive(clap::Args)]
struct GcArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Report what would be removed (and how many bytes); remove nothing.
    #[arg(long)]
    dry_run: bool,
    /// Blobs stored and links made within this many seconds are left alone [default: [gc] grace_secs, or 3600].
    #[arg(long)]
    grace_secs: Option<u64>,
    /// Also remove manifests no tag points at (children of an index and referrers of a stored manifest stay)
    /// [default: [gc] delete_untagged, or off].
    #[arg(long)]
    delete_untagged: bool,
}

async fn gc(args: GcArgs) -> anyhow::Result<std::process::ExitCode> {
    init_logging(LogFormat::Text);
    let store = args.store.resolve()?;
    let mut options = store.file.gc.resolve(store.cache_namespaces)?.options;
    options.dry_run = args.dry_run;
    options.delete_untagged |= args.delete_untagged;
    if let Some(secs) = args.grace_secs {
        options.grace = std::time::Duration::from_secs(secs);
    }
    // The local store's shared lock: a running server holds it too, only `fsck --repair` excludes it.
    let (blobs, _backend) = breakwater::server::open_store(&store.storage).await?;
    let meta = breakwater::meta::open(&store.metadata).await.context("opening the metadata store")?;
    let r = breakwater::gc::collect(blobs.as_ref(), meta.as_ref(), &options).await?;
    let verb = if r.dry_run { "would remove" } else { "removed" };
    println!("examined {} blobs; {verb} {} blobs ({} bytes) and {} untagged manifests", r.blobs_examined, r.blobs_removed, r.bytes_freed, r.manifests_removed);
    if !options.retention.is_empty() {
        println!("retention: {verb} {} tags and {} manifests ({} bytes)", r.tags_removed, r.manifests_retired, r.retention_bytes);
    }
    if r.manifests_indexed > 0 || r.manifests_unreadable > 0 {
        println!("read the references of {} older manifests ({} unreadable: their repositories' blobs were kept)", r.manifests_indexed, r.manifests_unreadable);
    }
    if r.pending_finished > 0 {
        println!("finished {} removals an earlier collection left halfway", r.pending_finished);
    }
    if r.delete_failures > 0 {
        println!("{} blobs could not be deleted (see the log); the next collection retries them", r.delete_failures);
        return Ok(std::process::ExitCode::FAILURE);
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Problem lines printed per kind; beyond that they are counted (a huge damaged store must not flood the terminal).
const FSCK_LINES_PER_KIND: u64 = 100;

async fn fsck(args: FsckArgs) -> anyhow::Result<std::process::ExitCode> {
    use breakwater::fsck::{self, Kind, Options, Plan, Repair, StoreLock};
    use std::io::IsTerminal;
    init_logging(LogFormat::Text);
    let location = args.store.resolve()?;
    let (store, local) = fsck_store(&location.storage).await?;
    // Offline (no server holds the store), a repair may remove unreferenced bytes; the lock also keeps a server
    // from starting until the repair is done. Object storage has no such lock: its unreferenced blobs stay.
    let lock = match &local {
        Some(root) if args.repair => StoreLock::exclusive(root)?,
        _ => None,
    };
    let server_running = args.repair && local.is_some() && lock.is_none();
    let meta = breakwater::meta::open(&location.metadata).await.context("opening the metadata store")?;
    let progress = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(indicatif::ProgressStyle::with_template("{spinner} {msg}: {pos} files, {elapsed}").expect("valid template"));
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let opts = Options {
        concurrency: args.concurrency.unwrap_or_else(|| Options::default_concurrency(local.is_some())),
        store,
        local,
        cache_namespaces: location.cache_namespaces,
        grace: std::time::Duration::from_secs(args.grace_secs),
        plan: Plan {
            hash_blobs: true,
            records: true,
            repair: if args.repair { Repair::Everything } else { Repair::Nothing },
            remove_unreferenced_bytes: lock.is_some(),
        },
        flights: None,
        progress: progress.clone(),
    };
    let mut printed: std::collections::BTreeMap<Kind, u64> = Default::default();
    let mut print = |p: &fsck::Problem| {
        let n = printed.entry(p.kind).or_default();
        *n += 1;
        if *n <= FSCK_LINES_PER_KIND {
            progress.suspend(|| println!("{p}"));
        }
    };
    let report = fsck::check(&opts, meta.as_ref(), &mut print).await?;
    progress.finish_and_clear();
    drop(lock);
    let c = &report.checked;
    println!(
        "checked {} blobs ({} bytes), {} links, {} manifests, {} tags, {} cache records, {} upload sessions",
        c.blobs, c.blob_bytes, c.links, c.manifests, c.tags, c.cache_records, c.uploads
    );
    for (kind, count) in &report.counts {
        if count.found > FSCK_LINES_PER_KIND {
            println!("... {} more {kind} problems not listed", count.found - FSCK_LINES_PER_KIND);
        }
    }
    if report.found() == 0 {
        println!("clean");
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let kinds: Vec<String> = report.counts.iter().map(|(k, c)| format!("{k} {} ({} repaired)", c.found, c.repaired)).collect();
    println!("{} problems: {}", report.found(), kinds.join(", "));
    if server_running && report.counts.contains_key(&Kind::OrphanBlob) {
        println!("a server is running on this store: unreferenced blobs are removed only with it stopped");
    }
    if args.repair && opts.local.is_none() && report.counts.contains_key(&Kind::OrphanBlob) {
        println!("unreferenced blobs in object storage are left to garbage collection (`breakwater gc`)");
    }
    // 2: everything found was repaired; 3: problems remain (not asked to repair, or not repairable).
    Ok(std::process::ExitCode::from(if report.repaired() == report.found() { 2 } else { 3 }))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// The signals that stop breakwater.
#[derive(Debug, Clone, Copy)]
enum Signal {
    Interrupt,
    Terminate,
}

impl Signal {
    /// 128 + the signal's number, as a shell reports a process the signal killed.
    fn exit_code(self) -> u8 {
        match self {
            Signal::Interrupt => 130,
            Signal::Terminate => 143,
        }
    }
}

/// Resolves on SIGINT or SIGTERM, with which.
async fn signal() -> Signal {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => Signal::Interrupt,
        _ = term => Signal::Terminate,
    }
}

/// Resolves on SIGINT or SIGTERM: where `serve` begins its shutdown.
async fn shutdown_signal() {
    let signal = signal().await;
    tracing::info!(?signal, "shutdown requested; finishing in-flight requests, then stopping background tasks");
}

/// How long `serve` waits for its background tasks to stop once the requests in progress are done: a replication
/// run saves its checkpoint and a flight removes its spool well within it; what is still running after it is
/// abandoned (and is no worse off than after a crash).
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.resolve()?;
    init_logging(config.log_format);
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    // Read before binding: a bad certificate stops the start, with nothing listening.
    let tls = match &config.tls {
        Some(t) => Some(std::sync::Arc::new(breakwater::tls::Tls::load(t.clone()).context("loading the TLS certificate")?)),
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let listener = breakwater::connection::bind(config.listen).with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let mut local = addr;
    if local.ip().is_unspecified() {
        local.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    if config.cluster.as_ref().is_some_and(|c| c.advertise.is_none()) && addr.ip().is_unspecified() {
        tracing::warn!(%addr, "a cluster member listening on every interface advertises {local} to the others, which only this machine reaches: give --advertise URL");
    }
    let tasks = breakwater::shutdown::Tasks::new();
    let app = breakwater::server::build(&config, &format!("{scheme}://{local}"), Some(metrics), &tasks).await?;
    // The one line on stdout: scripts and tests read the bound address from it (useful with port 0).
    let mut out = std::io::stdout();
    writeln!(out, "breakwater listening on {scheme}://{addr}")?;
    out.flush()?;
    if let Some(warning) = breakwater::server::plain_http_warning(addr, tls.is_some()) {
        tracing::warn!("{warning}");
    }
    if !addr.ip().is_loopback() && config.auth.is_none() {
        tracing::warn!(%addr, "listening beyond loopback without access control: anyone who reaches this address may push, delete and read everything (give --htpasswd FILE)");
    }
    tracing::info!(%addr, tls = tls.is_some(), data = %config.data.display(), "serving");
    breakwater::server::serve(listener, app, config.connections, tls, tasks, SHUTDOWN_GRACE, shutdown_signal()).await
}

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    match Cli::parse().command {
        Command::Serve(args) => serve(*args).await.map(|()| std::process::ExitCode::SUCCESS),
        Command::Warm(args) => warm(args).await.map(|()| std::process::ExitCode::SUCCESS),
        Command::Replicate(args) => replicate(*args).await,
        Command::Worker(args) => work_queue(*args, false).await,
        Command::Fsck(args) => fsck(args).await,
        Command::Gc(args) => gc(args).await,
        Command::Token(args) => token(args).await,
        Command::MigrateStorage(args) => migrate_storage(args).await,
    }
}
