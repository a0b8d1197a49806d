//! A TLS front for a plain-HTTP server of the tests (the S3 server): terminates TLS with a test certificate and
//! passes the bytes through unchanged, so that the server behind it sees the client's own requests (and checks
//! their signatures, which cover the Host header, as sent to the front).

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::pki::Pki;

pub struct TlsFront {
    pub port: u16,
    /// Dropping it stops the accept loop; the thread is joined on drop.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TlsFront {
    /// Listens on a free port of 127.0.0.1 with `pki`'s server certificate, forwarding to `backend`.
    pub fn start(pki: &Pki, backend: SocketAddr) -> TlsFront {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.key_der.clone()));
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![CertificateDer::from(pki.der.clone())], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let conn = tokio::select! {
                        _ = &mut stopped => break,
                        conn = listener.accept() => conn,
                    };
                    let Ok((socket, _)) = conn else { continue };
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        // A client that refuses the certificate ends its handshake here; nothing to forward.
                        let Ok(mut tls) = acceptor.accept(socket).await else { return };
                        let Ok(mut plain) = tokio::net::TcpStream::connect(backend).await else { return };
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                    });
                }
            });
        });
        TlsFront { port, stop: Some(stop), thread: Some(thread) }
    }

    /// The front's address as an https URL, under the name the certificate has.
    pub fn endpoint(&self) -> String {
        format!("https://localhost:{}", self.port)
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
