//! Configuration: built-in defaults, overridden by a TOML file, overridden by `BREAKWATER_*` environment
//! variables and command-line flags (clap merges those two).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::secret::Secret;
use crate::upstream::UpstreamConfig;

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Settings of `breakwater serve`, resolved.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// The SQLite database when no metadata URL is given, the cache's spool, and the local content store by default.
    pub data: PathBuf,
    /// Where blob bytes live.
    pub storage: StorageConfig,
    /// `sqlite://...` or `postgres://...` (a PostgreSQL URL may hold a password).
    pub metadata: Secret,
    pub log_format: LogFormat,
    pub delete_enabled: bool,
    /// Registries this one caches, each under its own name.
    pub upstreams: Vec<UpstreamConfig>,
    pub cache: CacheConfig,
    /// `[[replication]]` policies, run on their schedules or through the API.
    pub replication: Vec<FileReplication>,
    /// Upload sessions older than this are discarded (a client that went away mid-upload never comes back).
    pub upload_ttl: Duration,
    /// Bounds on client connections: head and idle timeouts, how many are served at once.
    pub connections: crate::connection::Limits,
    /// How often the reconciliation sweep (`fsck::spawn_sweep`) runs after the one at start-up.
    pub sweep_interval: Duration,
    /// How long the sweep leaves a file or upload session alone before it counts as abandoned.
    pub sweep_grace: Duration,
    /// Access control; `None` when no users are configured (every client may do everything).
    pub auth: Option<crate::auth::AuthConfig>,
    /// Un-prefixed names that may be pushed although the default upstream serves un-prefixed names.
    pub allow_shadowing: Vec<String>,
    /// Serve HTTPS with this certificate and key; plain HTTP without.
    pub tls: Option<crate::tls::TlsConfig>,
    /// Garbage collection inside the server.
    pub gc: GcConfig,
    /// Membership of a cluster; `None`: the instance runs alone.
    pub cluster: Option<crate::cluster::Settings>,
}

/// The sweep's period by default: leftovers are rare (crashes, lost clients), an hourly look is plenty.
pub const DEFAULT_SWEEP_INTERVAL_SECS: u64 = 3600;

/// How long an abandoned upload session is kept, by default (distribution purges after a week; a day is plenty
/// for a client to finish or resume).
pub const DEFAULT_UPLOAD_TTL_SECS: u64 = 24 * 3600;

/// Limits of the pull-through cache.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// How long an upstream's "not found" is remembered.
    pub negative_ttl: Duration,
    pub eviction: crate::proxy::EvictionPolicy,
    /// Entries at most in each in-memory map of the cache (tag validations, not-found answers, recent accesses,
    /// each upstream's tokens).
    pub memory_entries: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            negative_ttl: Duration::from_secs(DEFAULT_NEGATIVE_TTL_SECS),
            eviction: Default::default(),
            memory_entries: crate::bounded::DEFAULT_ENTRIES,
        }
    }
}

pub const DEFAULT_TAG_TTL_SECS: u64 = 300;
pub const DEFAULT_UPSTREAM_TIMEOUT_SECS: u64 = 5;
pub const DEFAULT_NEGATIVE_TTL_SECS: u64 = 30;

/// The TOML file: every key optional, names as in the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub data: Option<PathBuf>,
    pub metadata: Option<Secret>,
    pub log_format: Option<LogFormat>,
    pub delete_enabled: Option<bool>,
    pub upload_ttl_secs: Option<u64>,
    pub header_timeout_secs: Option<u64>,
    pub idle_timeout_secs: Option<u64>,
    pub max_connections: Option<u32>,
    pub sweep_interval_secs: Option<u64>,
    pub sweep_grace_secs: Option<u64>,
    #[serde(default)]
    pub upstream: Vec<FileUpstream>,
    #[serde(default)]
    pub cache: FileCache,
    #[serde(default)]
    pub replication: Vec<FileReplication>,
    #[serde(default)]
    pub auth: FileAuth,
    #[serde(default)]
    pub allow_shadowing: Vec<String>,
    #[serde(default)]
    pub tls: FileTls,
    #[serde(default)]
    pub storage: FileStorage,
    #[serde(default)]
    pub gc: FileGc,
    #[serde(default)]
    pub cluster: FileCluster,
}

/// The `[cluster]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCluster {
    /// Shared by every member; turns membership on.
    pub secret: Option<Secret>,
    /// The base URL the other members reach this one at [default: http(s)://LISTEN].
    pub advertise: Option<String>,
    /// Seconds between heartbeats [default: 5].
    pub heartbeat_secs: Option<u64>,
    /// Whether this member works the queues of distributed replication jobs its policies name [default: true].
    pub replication_work: Option<bool>,
}

/// Resolves cluster membership. A cluster shares its state: members need PostgreSQL and object storage, since
/// one's SQLite file or local disk is not the others'.
pub fn cluster(
    secret: Option<Secret>,
    advertise: Option<String>,
    file: FileCluster,
    metadata: &str,
    storage: &StorageConfig,
) -> anyhow::Result<Option<crate::cluster::Settings>> {
    let advertise = advertise.or(file.advertise);
    let Some(secret) = secret.or(file.secret) else {
        if advertise.is_some() || file.heartbeat_secs.is_some() || file.replication_work.is_some() {
            anyhow::bail!("--advertise and [cluster] settings need a cluster secret (--cluster-secret)");
        }
        return Ok(None);
    };
    if secret.len() < 16 {
        anyhow::bail!("the cluster secret must be at least 16 characters (it authenticates members to each other)");
    }
    if !metadata.starts_with("postgres://") && !metadata.starts_with("postgresql://") {
        anyhow::bail!("a cluster member needs shared metadata: --metadata postgres://... (SQLite is one instance's own)");
    }
    if !matches!(storage, StorageConfig::S3(_)) {
        anyhow::bail!("a cluster member needs shared storage: --storage s3://... (local disk is one machine's own)");
    }
    if let Some(a) = advertise.as_deref().filter(|a| !(a.starts_with("http://") || a.starts_with("https://"))) {
        anyhow::bail!("--advertise {a}: expected the base URL other members reach this one at (http://HOST:PORT)");
    }
    let heartbeat = match file.heartbeat_secs {
        Some(0) => anyhow::bail!("[cluster] heartbeat_secs must be at least 1"),
        Some(s) => Duration::from_secs(s),
        None => crate::cluster::DEFAULT_HEARTBEAT,
    };
    let advertise = advertise.map(|a| a.trim_end_matches('/').to_string());
    let replication_work = file.replication_work.unwrap_or(true);
    Ok(Some(crate::cluster::Settings { secret, advertise, heartbeat, replication_work }))
}

/// The `[gc]` table: garbage collection inside `serve` (on a schedule, and through `POST /api/gc`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileGc {
    /// Collect every this many seconds; no scheduled collection without it.
    pub interval_secs: Option<u64>,
    /// Blobs stored and links made within this many seconds are left alone [default: 3600].
    pub grace_secs: Option<u64>,
    /// Remove manifests no tag points at (children of an index and referrers of a stored manifest stay).
    pub delete_untagged: Option<bool>,
    /// `[[gc.retention]]` rules: which tags go (`crate::gc::Rule`).
    #[serde(default)]
    pub retention: Vec<FileRetention>,
}

/// A `[[gc.retention]]` entry: of the repositories `repositories` matches, the tags `tags` matches are kept if
/// they are among the `keep_last` newest or were pushed or pulled within `keep_within_secs`; the rest go.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRetention {
    pub repositories: String,
    /// Which tags the rule governs [default: "*", all].
    pub tags: Option<String>,
    pub keep_last: Option<u64>,
    pub keep_within_secs: Option<u64>,
}

/// Garbage collection inside `serve`, resolved.
#[derive(Debug, Clone)]
pub struct GcConfig {
    /// How often a scheduled collection runs; `None`: only on request (`POST /api/gc`).
    pub interval: Option<Duration>,
    /// What a scheduled or requested collection does (`dry_run` false; a request may ask for a dry run).
    pub options: crate::gc::Options,
}

impl FileGc {
    /// The resolved settings; `cache_namespaces` are the upstreams' names. Refuses a retention rule that keeps
    /// nothing or whose glob does not parse.
    pub fn resolve(&self, cache_namespaces: Vec<String>) -> anyhow::Result<GcConfig> {
        let retention = self
            .retention
            .iter()
            .map(|r| crate::gc::Rule::new(&r.repositories, r.tags.as_deref().unwrap_or("*"), r.keep_last, r.keep_within_secs.map(Duration::from_secs)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(GcConfig {
            interval: self.interval_secs.map(Duration::from_secs),
            options: crate::gc::Options {
                grace: self.grace_secs.map_or(crate::gc::DEFAULT_GRACE, Duration::from_secs),
                dry_run: false,
                delete_untagged: self.delete_untagged.unwrap_or(false),
                cache_namespaces,
                retention,
            },
        })
    }
}

/// Where blob bytes live, resolved.
#[derive(Debug, Clone)]
pub enum StorageConfig {
    /// A directory on local disk (`DATA/content` by default).
    Local(PathBuf),
    S3(crate::storage::S3Settings),
}

/// The `[storage]` table. Settings beyond `url` are for S3; the AWS environment variables (`AWS_ENDPOINT_URL`,
/// `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, ...) fill in what it does not say.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileStorage {
    /// `file://DIR` or `s3://BUCKET/PREFIX`.
    pub url: Option<String>,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Path-style addressing [default: on when an endpoint is given].
    pub path_style: Option<bool>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    /// Blob GETs answer 307 to a presigned URL of the object.
    pub redirect: Option<bool>,
    pub redirect_expiry_secs: Option<u64>,
    /// Bytes per multipart part, in MiB (at least 5, S3's minimum) [default: 8].
    pub part_size_mib: Option<usize>,
    /// The largest chunked upload the store copies under its digest itself, in MiB [default: 5120, AWS's
    /// CopyObject limit]; larger ones are streamed back into it through breakwater.
    pub copy_limit_mib: Option<u64>,
    /// A PEM file of CAs to trust for the endpoint [default: AWS_CA_BUNDLE, else the profile's ca_bundle].
    pub ca_file: Option<PathBuf>,
}

/// Resolves the blob store from `--storage` (or `[storage] url`) and the rest of `[storage]`.
pub fn storage(flag: Option<String>, file: FileStorage, data: &Path) -> anyhow::Result<StorageConfig> {
    let url = flag.or(file.url);
    let s3_only = file.endpoint.is_some()
        || file.region.is_some()
        || file.path_style.is_some()
        || file.access_key_id.is_some()
        || file.secret_access_key.is_some()
        || file.redirect.is_some()
        || file.redirect_expiry_secs.is_some()
        || file.part_size_mib.is_some()
        || file.copy_limit_mib.is_some()
        || file.ca_file.is_some();
    let url = match url {
        None => {
            if s3_only {
                anyhow::bail!("[storage] has S3 settings but no s3:// url (--storage s3://BUCKET/PREFIX)");
            }
            return Ok(StorageConfig::Local(data.join("content")));
        }
        Some(url) => url,
    };
    if let Some(dir) = url.strip_prefix("file://") {
        if s3_only {
            anyhow::bail!("--storage {url}: [storage]'s S3 settings apply to s3:// storage only");
        }
        if dir.is_empty() {
            anyhow::bail!("--storage file://DIR needs a directory");
        }
        return Ok(StorageConfig::Local(PathBuf::from(dir)));
    }
    if !url.starts_with("s3://") {
        anyhow::bail!("--storage {url}: expected file://DIR or s3://BUCKET/PREFIX");
    }
    let mut s = crate::storage::S3Settings::from_url(&url).map_err(anyhow::Error::msg)?;
    s.endpoint = file.endpoint;
    s.region = file.region;
    s.path_style = file.path_style;
    if file.access_key_id.is_some() != file.secret_access_key.is_some() {
        anyhow::bail!("[storage] access_key_id and secret_access_key go together");
    }
    s.access_key_id = file.access_key_id;
    s.secret_access_key = file.secret_access_key;
    s.redirect = file.redirect.unwrap_or(false);
    s.ca_file = file.ca_file;
    if let Some(secs) = file.redirect_expiry_secs {
        s.redirect_expiry = Duration::from_secs(secs.clamp(1, 7 * 24 * 3600));
    }
    if let Some(mib) = file.part_size_mib {
        if !(5..=5120).contains(&mib) {
            anyhow::bail!("[storage] part_size_mib = {mib}: S3 parts are 5 to 5120 MiB");
        }
        s.part_size = mib * 1024 * 1024;
    }
    if let Some(mib) = file.copy_limit_mib {
        if !(1..=5120).contains(&mib) {
            anyhow::bail!("[storage] copy_limit_mib = {mib}: from 1 to 5120 MiB (AWS copies at most 5 GiB at once)");
        }
        s.copy_limit = mib * 1024 * 1024;
    }
    Ok(StorageConfig::S3(s))
}

/// The `[auth]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAuth {
    /// `token` (default) or `basic`.
    pub mode: Option<crate::auth::Mode>,
    /// An htpasswd file of bcrypt entries (`htpasswd -B`), re-read when it changes.
    pub htpasswd: Option<PathBuf>,
    #[serde(default)]
    pub user: Vec<FileUser>,
    /// Group name to member names.
    #[serde(default)]
    pub groups: std::collections::HashMap<String, Vec<String>>,
    #[serde(default)]
    pub access: Vec<FileAccessRule>,
    #[serde(default)]
    pub admins: Vec<String>,
    #[serde(default)]
    pub admin_groups: Vec<String>,
    pub anonymous_pull: Option<bool>,
    pub service: Option<String>,
    pub realm: Option<String>,
    pub token_ttl_secs: Option<u64>,
    /// The token signing key (Ed25519, PKCS#8 PEM) [default: DATA/auth/token-signing-key.pem, generated].
    pub signing_key: Option<PathBuf>,
    pub metrics_public: Option<bool>,
    /// Another server's tokens, accepted (`[auth.issuer]`).
    pub issuer: Option<FileIssuer>,
}

/// The `[auth.issuer]` table: an existing token server whose tokens breakwater accepts.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileIssuer {
    pub realm: String,
    pub issuer: String,
    /// PEM bundle of its public keys or certificates.
    pub keys: Option<PathBuf>,
    /// Or a JWKS file.
    pub jwks: Option<PathBuf>,
}

/// An `[[auth.user]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUser {
    pub name: String,
    /// bcrypt (`$2y$...`) or argon2 (`$argon2id$...`).
    pub password_hash: Secret,
    #[serde(default)]
    pub groups: Vec<String>,
}

/// An `[[auth.access]]` rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAccessRule {
    pub repositories: Vec<String>,
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub anonymous: bool,
    pub actions: Vec<String>,
}

/// What the command line says about access control (flags override the file).
#[derive(Debug, Default)]
pub struct AuthFlags {
    pub htpasswd: Option<PathBuf>,
    pub mode: Option<crate::auth::Mode>,
    pub anonymous_pull: bool,
}

/// Resolves access control: on when any user is configured (an htpasswd file or `[[auth.user]]`), off
/// otherwise; asking for a mode without users is an error, not an open server.
pub fn auth(file: FileAuth, flags: AuthFlags, data: &Path, memory_entries: u64) -> anyhow::Result<Option<crate::auth::AuthConfig>> {
    use crate::auth::{AccessRule, Action, AuthConfig, Mode, PolicyConfig, UserEntry, UsersConfig};
    let users = UsersConfig {
        htpasswd: flags.htpasswd.or(file.htpasswd),
        users: file.user.into_iter().map(|u| UserEntry { name: u.name, password_hash: u.password_hash, groups: u.groups }).collect(),
        groups: file.groups,
    };
    for u in &users.users {
        if !crate::auth::users::is_supported_hash(&u.password_hash) {
            anyhow::bail!("[[auth.user]] {}: password_hash must be a bcrypt ($2y$...) or argon2 ($argon2id$...) hash", u.name);
        }
    }
    let mode = flags.mode.or(file.mode);
    let issuer = file.issuer.map(|i| crate::auth::issuer::IssuerConfig { realm: i.realm, issuer: i.issuer, keys: i.keys, jwks: i.jwks });
    if let Some(i) = &issuer {
        if i.keys.is_none() && i.jwks.is_none() {
            anyhow::bail!("[auth.issuer] needs keys (a PEM bundle) or jwks (a JWKS file)");
        }
        if mode == Some(Mode::Basic) {
            anyhow::bail!("[auth.issuer] issues tokens: it cannot be combined with --auth basic");
        }
    }
    if users.is_empty() && issuer.is_none() {
        if mode.is_some() {
            anyhow::bail!("--auth needs users: give --htpasswd FILE or [[auth.user]] entries");
        }
        return Ok(None);
    }
    let mut rules = Vec::new();
    for r in file.access {
        let actions = r.actions.iter().map(|a| a.parse::<Action>()).collect::<Result<Vec<_>, _>>().map_err(anyhow::Error::msg)?;
        rules.push(AccessRule { repositories: r.repositories, users: r.users, groups: r.groups, anonymous: r.anonymous, actions });
    }
    let policy = PolicyConfig {
        rules,
        admins: file.admins,
        admin_groups: file.admin_groups,
        anonymous_pull: flags.anonymous_pull || file.anonymous_pull.unwrap_or(false),
    };
    crate::auth::Policy::new(policy.clone()).map_err(anyhow::Error::msg)?;
    Ok(Some(AuthConfig {
        mode: mode.unwrap_or(Mode::Token),
        users,
        policy,
        service: file.service.unwrap_or_else(|| crate::auth::DEFAULT_SERVICE.to_string()),
        realm: file.realm,
        token_ttl: Duration::from_secs(file.token_ttl_secs.unwrap_or(crate::auth::DEFAULT_TOKEN_TTL_SECS).max(1)),
        signing_key: file.signing_key.unwrap_or_else(|| data.join("auth").join("token-signing-key.pem")),
        metrics_public: file.metrics_public.unwrap_or(false),
        memory_entries,
        issuer,
    }))
}

/// The `[tls]` table: both keys, or neither (plain HTTP).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    /// PEM certificate chain, the server's certificate first.
    pub cert: Option<PathBuf>,
    /// PEM private key of that certificate.
    pub key: Option<PathBuf>,
}

/// The TLS settings from a certificate and a key path, each given or not: both or neither.
pub fn tls(cert: Option<PathBuf>, key: Option<PathBuf>) -> anyhow::Result<Option<crate::tls::TlsConfig>> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(crate::tls::TlsConfig { cert, key })),
        (None, None) => Ok(None),
        (Some(_), None) => anyhow::bail!("a TLS certificate is configured without its key (--tls-key, [tls] key)"),
        (None, Some(_)) => anyhow::bail!("a TLS key is configured without its certificate (--tls-cert, [tls] cert)"),
    }
}

/// A `[[replication]]` policy; the same fields as `breakwater replicate`'s flags.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileReplication {
    /// The policy's name, which is also its job name (checkpoint and failures are kept under it).
    pub name: String,
    /// Source registry URL.
    pub from: String,
    /// `registry` (the catalog API, default) or `harbor` (Harbor's project and repository API).
    #[serde(default)]
    pub from_kind: crate::replicate::SourceKind,
    /// Destination registry URL, or `local` for this breakwater.
    pub to: String,
    pub from_username: Option<String>,
    pub from_password: Option<Secret>,
    pub to_username: Option<String>,
    pub to_password: Option<Secret>,
    /// PEM CA certificates to trust for the source besides the system's (a private CA).
    pub from_ca: Option<PathBuf>,
    /// The same for the destination.
    pub to_ca: Option<PathBuf>,
    #[serde(default)]
    pub include: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub exclude_tags: Vec<String>,
    pub latest: Option<usize>,
    /// `tag` (default: the last tags in tag order) or `created` (the newest by the image config's `created`).
    #[serde(default)]
    pub latest_by: crate::replicate::LatestBy,
    /// `FROM=TO` namespace prefixes.
    #[serde(default)]
    pub rewrite: Vec<String>,
    /// `os/arch[/variant]` to keep from indexes.
    #[serde(default)]
    pub platforms: Vec<String>,
    #[serde(default)]
    pub referrers: bool,
    #[serde(default, rename = "override")]
    pub override_tags: bool,
    pub concurrency: Option<usize>,
    pub page_size: Option<u64>,
    /// Catalog walkers: key ranges of the source's catalog listed at once (a catalog's pages, not its copies,
    /// set the pace when the source answers each page slowly).
    pub walkers: Option<usize>,
    /// Requests per second to each registry, at most.
    pub rate: Option<f64>,
    /// Bytes per second read from the source, at most.
    pub bandwidth: Option<u64>,
    /// Inside `breakwater serve`: run every this many seconds.
    pub schedule_secs: Option<u64>,
    /// The bearer token a source's notifications (`POST /api/replication/NAME/events`) may carry instead of an
    /// admin's credentials; when set, it is required even with access control off.
    pub events_secret: Option<Secret>,
}

pub const DEFAULT_REPLICATION_CONCURRENCY: usize = 8;
/// Catalog walkers by default: a few pages in flight at once, which a registry serves without strain.
pub const DEFAULT_REPLICATION_WALKERS: usize = 4;
/// More walkers than this would only queue behind the tag listings (and hold a page each).
pub const MAX_REPLICATION_WALKERS: usize = 64;
/// distribution's largest catalog page.
pub const DEFAULT_REPLICATION_PAGE: u64 = 1000;
/// Bound on a replication request's wait for an answer, and on silence inside a body (downloads, and uploads
/// the destination stops taking); a transfer that keeps moving may take as long as it needs.
const REPLICATION_TIMEOUT_SECS: u64 = 60;

impl FileReplication {
    /// The policy, with `local` standing for `local_url` (this breakwater).
    pub fn policy(&self, local_url: &str) -> anyhow::Result<crate::replicate::Policy> {
        let endpoint = |name: &str, url: &str, user: &Option<String>, pass: &Option<Secret>, ca: &Option<PathBuf>| -> anyhow::Result<UpstreamConfig> {
            let url = if url == "local" { local_url } else { url };
            let mut u = upstream(name, url, 0, REPLICATION_TIMEOUT_SECS, false, Some(false))?;
            u.username = user.clone();
            u.password = pass.clone();
            u.ca = ca.clone();
            u.requests_per_sec = self.rate;
            Ok(u)
        };
        if let Some(rate) = self.rate.filter(|r| r.is_nan() || *r <= 0.0) {
            anyhow::bail!("replication {}: rate {rate} must be a positive number of requests per second", self.name);
        }
        if self.events_secret.as_deref().is_some_and(|s| s.trim().is_empty()) {
            anyhow::bail!("replication {}: events_secret is empty (leave it out for admins only)", self.name);
        }
        if self.name.is_empty() || !self.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
            anyhow::bail!("replication name {:?} must be letters, digits, '-', '_' or '.'", self.name);
        }
        Ok(crate::replicate::Policy {
            job: self.name.clone(),
            from: endpoint("source", &self.from, &self.from_username, &self.from_password, &self.from_ca)?,
            from_kind: self.from_kind,
            to: endpoint("destination", &self.to, &self.to_username, &self.to_password, &self.to_ca)?,
            include: self.include.clone(),
            exclude: self.exclude.clone(),
            tags: self.tags.clone(),
            exclude_tags: self.exclude_tags.clone(),
            latest: self.latest,
            latest_by: self.latest_by,
            rewrite: self.rewrite.clone(),
            platforms: self.platforms.clone(),
            referrers: self.referrers,
            override_tags: self.override_tags,
            concurrency: self.concurrency.unwrap_or(DEFAULT_REPLICATION_CONCURRENCY).max(1),
            // distribution refuses n > 1000 (400 PAGINATION_NUMBER_INVALID); registries may answer fewer anyway.
            page_size: self.page_size.unwrap_or(DEFAULT_REPLICATION_PAGE).clamp(1, DEFAULT_REPLICATION_PAGE),
            walkers: self.walkers.unwrap_or(DEFAULT_REPLICATION_WALKERS).clamp(1, MAX_REPLICATION_WALKERS),
            dry_run: false,
            bandwidth: self.bandwidth,
        })
    }
}

/// An `[[upstream]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUpstream {
    pub name: String,
    pub url: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub tag_ttl_secs: Option<u64>,
    pub timeout_secs: Option<u64>,
    #[serde(default)]
    pub default: bool,
    /// Defaults to true for Docker Hub URLs.
    pub library_shorthand: Option<bool>,
    /// PEM CA certificates to trust for this upstream besides the system's (a private CA).
    pub ca: Option<PathBuf>,
    /// Repository globs that may be proxied (others are `NAME_UNKNOWN`); empty or absent: every repository.
    #[serde(default)]
    pub repositories: Vec<String>,
    /// A HEAD of an uncached blob starts its download too (default: answered by an upstream HEAD alone).
    #[serde(default)]
    pub prefetch_on_head: bool,
    /// Token realms (URLs or hosts) that may receive the credentials besides the upstream's host and domain.
    #[serde(default)]
    pub token_realms: Vec<String>,
    /// Tag revalidations wait while the upstream's `ratelimit-remaining` is at most this (default 10).
    pub ratelimit_reserve: Option<u64>,
}

/// Requests of an upstream's rate-limit window kept for fetches the cache cannot do without.
pub const DEFAULT_RATELIMIT_RESERVE: u64 = 10;

/// The `[cache]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCache {
    pub negative_ttl_secs: Option<u64>,
    pub max_bytes: Option<u64>,
    pub max_age_secs: Option<u64>,
    pub memory_entries: Option<u64>,
}

/// Builds and checks one upstream's settings.
pub fn upstream(
    name: &str,
    url: &str,
    tag_ttl_secs: u64,
    timeout_secs: u64,
    default: bool,
    library_shorthand: Option<bool>,
) -> anyhow::Result<UpstreamConfig> {
    // The name is the first path component of cached repositories, so it must be one valid component.
    if name.contains('/') || name.parse::<crate::oci::RepoName>().is_err() {
        anyhow::bail!("upstream name {name:?} must be one lowercase repository path component, like docker.io");
    }
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        anyhow::bail!("upstream {name}: url {url:?} must start with http:// or https://");
    }
    Ok(UpstreamConfig {
        name: name.to_string(),
        url: url.to_string(),
        username: None,
        password: None,
        tag_ttl: Duration::from_secs(tag_ttl_secs),
        timeout: Duration::from_secs(timeout_secs.max(1)),
        default,
        library_shorthand: library_shorthand.unwrap_or(url.contains("docker.io")),
        requests_per_sec: None,
        token_entries: crate::bounded::DEFAULT_ENTRIES,
        ca: None,
        repositories: Vec::new(),
        prefetch_on_head: false,
        token_realms: Vec::new(),
        ratelimit_reserve: DEFAULT_RATELIMIT_RESERVE,
    })
}

impl FileUpstream {
    pub fn resolve(self) -> anyhow::Result<UpstreamConfig> {
        let mut u = upstream(
            &self.name,
            &self.url,
            self.tag_ttl_secs.unwrap_or(DEFAULT_TAG_TTL_SECS),
            self.timeout_secs.unwrap_or(DEFAULT_UPSTREAM_TIMEOUT_SECS),
            self.default,
            self.library_shorthand,
        )?;
        u.username = self.username;
        u.password = self.password;
        u.ca = self.ca;
        // Checked here, so that a bad pattern is a configuration error rather than a failure at start-up.
        crate::pattern::glob_set(&self.repositories).map_err(|e| anyhow::anyhow!("upstream {}: repositories: {e}", self.name))?;
        u.repositories = self.repositories;
        u.prefetch_on_head = self.prefetch_on_head;
        for realm in &self.token_realms {
            crate::upstream::realm::check_allowed(realm).map_err(|e| anyhow::anyhow!("upstream {}: {e}", self.name))?;
        }
        u.token_realms = self.token_realms;
        u.ratelimit_reserve = self.ratelimit_reserve.unwrap_or(DEFAULT_RATELIMIT_RESERVE);
        Ok(u)
    }
}

impl FileConfig {
    pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("parsing {}: {e}", path.display()))
    }
}

/// The connection bounds from their settings, defaults filled in; zero is refused (it would close every
/// connection at once, or serve none).
pub fn connection_limits(
    header_timeout_secs: Option<u64>,
    idle_timeout_secs: Option<u64>,
    max_connections: Option<u32>,
) -> anyhow::Result<crate::connection::Limits> {
    use crate::connection as c;
    let header = header_timeout_secs.unwrap_or(c::DEFAULT_HEADER_TIMEOUT_SECS);
    let idle = idle_timeout_secs.unwrap_or(c::DEFAULT_IDLE_TIMEOUT_SECS);
    let max = max_connections.unwrap_or(c::DEFAULT_MAX_CONNECTIONS);
    if header == 0 || idle == 0 || max == 0 {
        anyhow::bail!("header_timeout_secs, idle_timeout_secs and max_connections must be at least 1");
    }
    Ok(c::Limits {
        header_timeout: Duration::from_secs(header),
        idle_timeout: Duration::from_secs(idle),
        max_connections: max,
    })
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:5000";
pub const DEFAULT_DATA: &str = "./breakwater-data";

/// The embedded metadata store's URL for a data directory.
pub fn sqlite_url(data: &Path) -> String {
    format!("sqlite://{}?mode=rwc", data.join("metadata.db").display())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every TOML example in the README is a valid configuration file.
    #[test]
    fn readme_examples_parse() {
        let readme = include_str!("../README.md");
        let mut blocks = 0;
        for block in readme.split("```toml\n").skip(1) {
            let text = block.split("```").next().unwrap_or("");
            let parsed: FileConfig = toml::from_str(text).unwrap_or_else(|e| panic!("README example does not parse: {e}\n{text}"));
            for u in parsed.upstream {
                u.resolve().unwrap();
            }
            for r in parsed.replication {
                r.policy("http://127.0.0.1:5000").unwrap();
            }
            auth(parsed.auth, AuthFlags::default(), Path::new("/var/lib/breakwater"), 10)
                .unwrap_or_else(|e| panic!("README example's [auth] does not resolve: {e}\n{text}"));
            storage(None, parsed.storage, Path::new("/var/lib/breakwater"))
                .unwrap_or_else(|e| panic!("README example's [storage] does not resolve: {e}\n{text}"));
            parsed.gc.resolve(Vec::new()).unwrap_or_else(|e| panic!("README example's [gc] does not resolve: {e}\n{text}"));
            blocks += 1;
        }
        assert!(blocks >= 2, "the README shows its configuration examples");
    }

    /// The README's retention example resolves to its two rules; a rule that keeps nothing is refused, saying so.
    #[test]
    fn retention_rules_resolve_or_are_refused() {
        let readme = include_str!("../README.md");
        let block = readme.split("```toml\n").find(|b| b.starts_with("[[gc.retention]]")).expect("the README shows retention rules");
        let file: FileConfig = toml::from_str(block.split("```").next().unwrap_or("")).unwrap();
        let gc = file.gc.resolve(Vec::new()).unwrap();
        assert_eq!(gc.options.retention.len(), 2);
        let keeps_nothing: FileConfig = toml::from_str("[[gc.retention]]\nrepositories = \"ci/**\"\ntags = \"pr-*\"\n").unwrap();
        let e = keeps_nothing.gc.resolve(Vec::new()).unwrap_err().to_string();
        assert!(e.contains("keeps nothing") && e.contains("keep_last or keep_within_secs"), "{e}");
        assert!(toml::from_str::<FileConfig>("[[gc.retention]]\nkeep_last = 1\n").is_err(), "repositories is required");
        assert!(toml::from_str::<FileConfig>("[[gc.retention]]\nrepositories = \"a\"\nkeep = 1\n").is_err(), "unknown keys are refused");
    }

    /// No password reaches the `{:?}` of any configuration struct (they are logged and shown in panics), while
    /// the code that needs one still gets it.
    #[test]
    fn debug_output_holds_no_password() {
        let text = r#"
metadata = "postgres://bw:pg-secret-1@db.example/bw"
[[upstream]]
name = "hub"
url = "https://registry-1.docker.io"
username = "puller"
password = "up-secret-2"
[[replication]]
name = "mirror"
from = "https://src.example"
to = "local"
from_username = "reader"
from_password = "from-secret-3"
to_username = "writer"
to_password = "to-secret-4"
events_secret = "events-secret-7"
[storage]
url = "s3://bucket/prefix"
access_key_id = "AKIDEXAMPLE"
secret_access_key = "s3-secret-5"
[cluster]
secret = "cluster-secret-6-long-enough"
"#;
        let file: FileConfig = toml::from_str(text).unwrap();
        let secrets = ["pg-secret-1", "up-secret-2", "from-secret-3", "to-secret-4", "s3-secret-5", "cluster-secret-6", "events-secret-7"];
        let check = |what: &str, debug: String| {
            assert!(debug.contains("***"), "{what}: the redaction shows: {debug}");
            for s in secrets {
                assert!(!debug.contains(s), "{what}'s Debug shows a password ({s}): {debug}");
            }
        };
        check("FileConfig", format!("{file:?}"));
        check("FileUpstream", format!("{:?}", file.upstream[0]));
        check("FileReplication", format!("{:?}", file.replication[0]));
        let policy = file.replication[0].policy("http://127.0.0.1:5000").unwrap();
        check("Policy", format!("{policy:?}"));
        check("Policy (alternate form)", format!("{policy:#?}"));
        let storage = storage(None, file.storage, Path::new(DEFAULT_DATA)).unwrap();
        let metadata = file.metadata.clone().unwrap();
        let cluster = cluster(None, None, file.cluster, &metadata, &storage).unwrap();
        check("cluster::Settings", format!("{:?}", cluster.clone().unwrap()));
        let config = Config {
            cluster,
            storage,
            listen: DEFAULT_LISTEN.parse().unwrap(),
            data: PathBuf::from(DEFAULT_DATA),
            metadata: file.metadata.clone().unwrap(),
            log_format: LogFormat::Text,
            delete_enabled: false,
            upstreams: file.upstream.into_iter().map(|u| u.resolve().unwrap()).collect(),
            cache: CacheConfig::default(),
            replication: file.replication.clone(),
            upload_ttl: Duration::from_secs(DEFAULT_UPLOAD_TTL_SECS),
            connections: crate::connection::Limits::default(),
            sweep_interval: Duration::from_secs(DEFAULT_SWEEP_INTERVAL_SECS),
            sweep_grace: crate::fsck::DEFAULT_GRACE,
            auth: None,
            allow_shadowing: Vec::new(),
            tls: None,
            gc: FileGc::default().resolve(Vec::new()).unwrap(),
        };
        check("Config", format!("{config:?}"));
        check("UpstreamConfig", format!("{:?}", config.upstreams[0]));
        // The values are all still there for the code that uses them.
        assert_eq!(policy.from.password.as_deref(), Some("from-secret-3"));
        assert_eq!(policy.to.password.as_deref(), Some("to-secret-4"));
        assert_eq!(config.upstreams[0].password.as_deref(), Some("up-secret-2"));
        assert_eq!(config.replication[0].events_secret.as_deref(), Some("events-secret-7"));
        assert_eq!(&*config.metadata, "postgres://bw:pg-secret-1@db.example/bw");
        let StorageConfig::S3(s3) = &config.storage else { panic!("[storage] url is s3://") };
        assert_eq!(s3.secret_access_key.as_deref(), Some("s3-secret-5"));
    }

    #[test]
    fn cluster_membership_needs_shared_stores_and_a_real_secret() {
        let s3 = storage(Some("s3://bkt".into()), FileStorage::default(), Path::new("/d")).unwrap();
        let local = storage(None, FileStorage::default(), Path::new("/d")).unwrap();
        let pg = "postgres://bw@db/bw";
        let secret = || Some(Secret::from("a-secret-of-16-chars".to_string()));
        let resolve = |secret, advertise: Option<&str>, file, metadata, storage| {
            cluster(secret, advertise.map(String::from), file, metadata, storage)
        };
        let alone = resolve(None, None, FileCluster::default(), pg, &s3).unwrap();
        assert!(alone.is_none());
        let member = resolve(secret(), None, FileCluster::default(), pg, &s3).unwrap().unwrap();
        assert_eq!((member.advertise, member.heartbeat, member.replication_work), (None, crate::cluster::DEFAULT_HEARTBEAT, true));
        let file = FileCluster {
            advertise: Some("http://10.0.0.5:5000/".into()),
            heartbeat_secs: Some(2),
            replication_work: Some(false),
            ..Default::default()
        };
        let member = resolve(secret(), None, file, pg, &s3).unwrap().unwrap();
        assert_eq!(
            (member.advertise.as_deref(), member.heartbeat, member.replication_work),
            (Some("http://10.0.0.5:5000"), Duration::from_secs(2), false)
        );
        let refused = [
            resolve(secret(), None, FileCluster::default(), "sqlite:///d/meta.db", &s3).unwrap_err(),
            resolve(secret(), None, FileCluster::default(), pg, &local).unwrap_err(),
            resolve(Some(Secret::from("short".to_string())), None, FileCluster::default(), pg, &s3).unwrap_err(),
            resolve(None, Some("http://h:1"), FileCluster::default(), pg, &s3).unwrap_err(),
            resolve(None, None, FileCluster { replication_work: Some(false), ..Default::default() }, pg, &s3).unwrap_err(),
            resolve(secret(), Some("h:1"), FileCluster::default(), pg, &s3).unwrap_err(),
            resolve(secret(), None, FileCluster { heartbeat_secs: Some(0), ..Default::default() }, pg, &s3).unwrap_err(),
        ];
        for (e, expected) in refused.iter().zip(["postgres", "s3://", "16 characters", "cluster secret", "cluster secret", "base URL", "at least 1"]) {
            assert!(e.to_string().contains(expected), "{e}");
        }
    }

    #[test]
    fn storage_urls_resolve_or_are_refused() {
        let data = Path::new("/srv/bw");
        let none = || FileStorage::default();
        assert!(matches!(storage(None, none(), data).unwrap(), StorageConfig::Local(p) if p == data.join("content")));
        assert!(matches!(storage(Some("file:///mnt/blobs".into()), none(), data).unwrap(), StorageConfig::Local(p) if p == Path::new("/mnt/blobs")));
        let StorageConfig::S3(s) = storage(Some("s3://bkt/a/b/".into()), none(), data).unwrap() else { panic!("s3") };
        assert_eq!((s.bucket.as_str(), s.prefix.as_str(), s.redirect), ("bkt", "a/b", false));
        for bad in ["s3://", "gs://bkt", "file://", "/plain/path"] {
            assert!(storage(Some(bad.into()), none(), data).is_err(), "{bad}");
        }
        let s3_settings = || FileStorage { endpoint: Some("http://minio:9000".into()), ..Default::default() };
        assert!(storage(None, s3_settings(), data).is_err(), "S3 settings without an s3:// url");
        assert!(storage(Some("file:///x".into()), s3_settings(), data).is_err());
        let small = FileStorage { part_size_mib: Some(4), ..Default::default() };
        assert!(storage(Some("s3://bkt".into()), small, data).is_err());
        for (mib, ok) in [(0, false), (1, true), (5120, true), (5121, false)] {
            let limit = FileStorage { copy_limit_mib: Some(mib), ..Default::default() };
            assert_eq!(storage(Some("s3://bkt".into()), limit, data).is_ok(), ok, "copy_limit_mib = {mib}");
        }
        let half = FileStorage { access_key_id: Some("id".into()), ..Default::default() };
        assert!(storage(Some("s3://bkt".into()), half, data).is_err());
    }

    #[test]
    fn replication_rates_must_be_positive() {
        let policy = |rate| FileReplication { name: "r".into(), from: "http://a".into(), to: "http://b".into(), rate, ..Default::default() };
        for bad in [0.0, -1.0, f64::NAN] {
            assert!(policy(Some(bad)).policy("http://l").is_err(), "{bad}");
        }
        // A tiny rate is allowed (the pacer caps what one request may wait).
        assert_eq!(policy(Some(1e-300)).policy("http://l").unwrap().from.requests_per_sec, Some(1e-300));
    }

    #[test]
    fn an_empty_events_secret_is_refused() {
        let policy = |secret: &str| FileReplication {
            name: "r".into(),
            from: "http://a".into(),
            to: "http://b".into(),
            events_secret: Some(secret.into()),
            ..Default::default()
        };
        assert!(policy("  ").policy("http://l").unwrap_err().to_string().contains("events_secret is empty"));
        assert!(policy("s3cret").policy("http://l").is_ok());
    }

    #[test]
    fn connection_limits_default_and_refuse_zero() {
        assert_eq!(connection_limits(None, None, None).unwrap(), crate::connection::Limits::default());
        let l = connection_limits(Some(2), Some(3), Some(4)).unwrap();
        assert_eq!((l.header_timeout, l.idle_timeout, l.max_connections), (Duration::from_secs(2), Duration::from_secs(3), 4));
        assert!(connection_limits(Some(0), None, None).is_err());
        assert!(connection_limits(None, Some(0), None).is_err());
        assert!(connection_limits(None, None, Some(0)).is_err());
    }

    #[test]
    fn tls_needs_both_files() {
        let (c, k) = (Some(PathBuf::from("c.pem")), Some(PathBuf::from("k.pem")));
        assert_eq!(tls(None, None).unwrap(), None);
        assert_eq!(tls(c.clone(), k.clone()).unwrap(), Some(crate::tls::TlsConfig { cert: "c.pem".into(), key: "k.pem".into() }));
        assert!(tls(c, None).is_err());
        assert!(tls(None, k).is_err());
    }

    #[test]
    fn upstream_names_are_one_path_component() {
        assert!(upstream("docker.io", "https://registry-1.docker.io", 1, 1, false, None).unwrap().library_shorthand);
        assert!(!upstream("ghcr.io", "https://ghcr.io", 1, 1, false, None).unwrap().library_shorthand);
        assert!(upstream("a/b", "https://x", 1, 1, false, None).is_err());
        assert!(upstream("Hub", "https://x", 1, 1, false, None).is_err());
        assert!(upstream("hub", "ftp://x", 1, 1, false, None).is_err());
    }
}
