//! HTTPS: the server's certificate, kept current while the server runs.
//!
//! The accept loop (`connection`) only needs a [`TlsAcceptor`]; this module builds it (rustls with the ring
//! provider, ALPN offering `h2` then `http/1.1`) around a certificate resolver whose certificate can be swapped.
//! A reload (on SIGHUP, or when the files' modification times or sizes change) reads and checks the whole new
//! pair first and swaps it in only if it is good: new handshakes get the new certificate, connections already
//! established keep theirs, and a bad pair (unreadable, not PEM, key not matching the certificate) is logged and
//! the old one kept.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

/// Where the server's certificate and key are, as given by the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM: the server certificate first, then any intermediates clients need to reach their root.
    pub cert: PathBuf,
    /// PEM: the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// How often the files are looked at for changes: cheap (two `stat`s), and soon enough after a renewal tool
/// (certbot, cert-manager) replaced them.
pub const RELOAD_POLL: Duration = Duration::from_secs(2);

/// Why a certificate and key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: {what}", path.display())]
    Pem { path: PathBuf, what: String },
    #[error("the key in {} does not fit the certificate in {}: {source}", key.display(), cert.display())]
    Mismatch { cert: PathBuf, key: PathBuf, source: rustls::Error },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The server's TLS: the acceptor handshakes use, and what a reload needs to replace their certificate.
pub struct Tls {
    config: TlsConfig,
    /// The one provider, passed explicitly: rustls's process default would be ambiguous (and panic) if another
    /// crate in the tree ever enabled a second one.
    provider: Arc<CryptoProvider>,
    resolver: Arc<Current>,
    acceptor: TlsAcceptor,
    /// The files' stamps when they were last read, to tell a change from the poll.
    stamps: Mutex<Stamps>,
}

/// A file's modification time and size (`None` when it cannot be looked at): a replaced file differs in one.
type Stamp = Option<(SystemTime, u64)>;
type Stamps = (Stamp, Stamp);

impl Tls {
    /// Reads the pair named by `config`; fails if it is not a usable certificate and matching key.
    pub fn load(config: TlsConfig) -> Result<Tls, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let stamps = stamps(&config);
        let resolver = Arc::new(Current(RwLock::new(Arc::new(read_pair(&config, &provider)?))));
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&resolver) as Arc<dyn ResolvesServerCert>);
        // h2 first: clients that speak it get multiplexed streams; the rest keep HTTP/1.1.
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(server));
        Ok(Tls { config, provider, resolver, acceptor, stamps: Mutex::new(stamps) })
    }

    /// What the accept loop handshakes with; its certificate follows reloads.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// Reads the pair again and, if it is good, makes it the one new handshakes present.
    pub fn reload(&self) -> Result<(), TlsError> {
        // Stamped before reading: a file replaced while it is read is seen as changed at the next poll.
        *self.stamps.lock().unwrap_or_else(|e| e.into_inner()) = stamps(&self.config);
        let key = read_pair(&self.config, &self.provider)?;
        *self.resolver.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
        Ok(())
    }

    /// Whether either file looks different from when it was last read.
    fn changed(&self) -> bool {
        *self.stamps.lock().unwrap_or_else(|e| e.into_inner()) != stamps(&self.config)
    }

    /// Reloads on SIGHUP and when the files change, for as long as the server runs. A failed reload is
    /// logged and leaves the current certificate in place; the poll retries only after the files change again
    /// (a renewal that writes the certificate and then the key is read twice, the second time whole).
    /// It runs as one of `tasks` until the drain is over (connections still draining may renegotiate nothing,
    /// but new handshakes during the drain get the current certificate).
    pub fn spawn_reloader(self: Arc<Self>, tasks: &crate::shutdown::Tasks) {
        let stop = tasks.token();
        tasks.spawn("tls reloader", async move {
            let mut hup = hangups();
            let mut tick = tokio::time::interval(RELOAD_POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let why = tokio::select! {
                    () = stop.cancelled() => return,
                    _ = hup.recv() => "SIGHUP",
                    _ = tick.tick() => {
                        if !self.changed() {
                            continue;
                        }
                        "files changed"
                    }
                };
                match self.reload() {
                    Ok(()) => tracing::info!(cert = %self.config.cert.display(), why, "TLS certificate reloaded"),
                    Err(e) => tracing::error!(error = %e, why, "TLS certificate not reloaded; still serving the previous one"),
                }
            }
        });
    }
}

/// SIGHUP as a stream of wake-ups; never ready where there are no signals (or the handler cannot be set, which
/// leaves the file poll).
struct Hangups(#[cfg(unix)] Option<tokio::signal::unix::Signal>);

fn hangups() -> Hangups {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(s) => Hangups(Some(s)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot handle SIGHUP; the certificate reloads only when its files change");
                Hangups(None)
            }
        }
    }
    #[cfg(not(unix))]
    Hangups()
}

impl Hangups {
    async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(s) = &mut self.0 {
            if s.recv().await.is_some() {
                return;
            }
        }
        std::future::pending::<()>().await
    }
}

fn stamps(config: &TlsConfig) -> Stamps {
    (stamp(&config.cert), stamp(&config.key))
}

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// The certificate chain and key of `config`, parsed and checked to belong together.
fn read_pair(config: &TlsConfig, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let read = |path: &Path| std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_path_buf(), source });
    let (cert_pem, key_pem) = (read(&config.cert)?, read(&config.key)?);
    let pem_error = |path: &Path, what: String| TlsError::Pem { path: path.to_path_buf(), what };
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(&config.cert, format!("not PEM certificates: {e}")))?;
    if chain.is_empty() {
        return Err(pem_error(&config.cert, "holds no PEM certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| pem_error(&config.key, format!("no PEM private key: {e}")))?;
    CertifiedKey::from_der(chain, key, provider).map_err(|source| TlsError::Mismatch {
        cert: config.cert.clone(),
        key: config.key.clone(),
        source,
    })
}

/// The certificate every new handshake presents; replaced whole by a reload.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0.read().unwrap_or_else(|e| e.into_inner())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path, name: &str) -> TlsConfig {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap().self_signed(&key).unwrap();
        let config = TlsConfig { cert: dir.join(format!("{name}.crt")), key: dir.join(format!("{name}.key")) };
        std::fs::write(&config.cert, cert.pem()).unwrap();
        std::fs::write(&config.key, key.serialize_pem()).unwrap();
        config
    }

    /// Copies `from` over `to` and gives it a modification time of its own: the test does not depend on the
    /// file system's timestamp granularity to see the change.
    fn replace(from: &Path, to: &Path, secs: u64) {
        std::fs::copy(from, to).unwrap();
        let file = std::fs::File::options().write(true).open(to).unwrap();
        file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(secs)).unwrap();
    }

    fn presented(tls: &Tls) -> Vec<u8> {
        tls.resolver.0.read().unwrap().cert[0].to_vec()
    }

    #[test]
    fn bad_pairs_are_refused_and_a_failed_reload_keeps_the_old_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let a = pair(dir.path(), "a.test");
        let b = pair(dir.path(), "b.test");
        // A key that is not the certificate's, an empty file, a missing file.
        let mismatched = TlsConfig { cert: a.cert.clone(), key: b.key.clone() };
        assert!(matches!(Tls::load(mismatched), Err(TlsError::Mismatch { .. })));
        std::fs::write(dir.path().join("empty"), "").unwrap();
        let empty = TlsConfig { cert: dir.path().join("empty"), key: a.key.clone() };
        assert!(matches!(Tls::load(empty), Err(TlsError::Pem { .. })));
        let missing = TlsConfig { cert: dir.path().join("nope"), key: a.key.clone() };
        assert!(matches!(Tls::load(missing), Err(TlsError::Read { .. })));

        let tls = Tls::load(a.clone()).unwrap();
        let first = presented(&tls);
        assert!(!tls.changed());
        // Half a renewal: the certificate replaced, the key not yet.
        replace(&b.cert, &a.cert, 1_000_000);
        assert!(tls.changed());
        assert!(tls.reload().is_err());
        assert_eq!(presented(&tls), first, "a failed reload keeps the certificate");
        assert!(!tls.changed(), "the failed attempt is not retried until the files change again");
        replace(&b.key, &a.key, 1_000_000);
        assert!(tls.changed());
        tls.reload().unwrap();
        assert_ne!(presented(&tls), first);
        assert_eq!(presented(&tls), std::fs::read(&b.cert).map(|pem| CertificateDer::from_pem_slice(&pem).unwrap().to_vec()).unwrap());
    }
}
