//! Certificates made at test time (rcgen): a CA and a server certificate it signed, for the servers the tests
//! run behind TLS (breakwater itself, and a TLS front for the S3 server).

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};

/// A CA and a server certificate it signed for 127.0.0.1 and localhost, written into a directory of their own:
/// `certs/ca.crt` is the directory clients get as `--cert-dir` (containers-image reads every `*.crt` in it as a
/// CA), the server's pair is beside it.
pub struct Pki {
    pub dir: tempfile::TempDir,
    /// The server certificate, DER: what a handshake must present.
    pub der: Vec<u8>,
    /// The server's private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
}

impl Pki {
    /// `n` makes each CA and certificate different (names and serial numbers).
    pub fn new(n: u64) -> Pki {
        let dir = tempfile::Builder::new().prefix("bw-tls-").tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("certs")).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, format!("breakwater test CA {n}"));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut server = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        server.distinguished_name.push(DnType::CommonName, format!("breakwater test server {n}"));
        server.serial_number = Some(n.into());
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = server.signed_by(&key, &ca, &ca_key).unwrap();
        std::fs::write(dir.path().join("certs/ca.crt"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("server.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("server.key"), key.serialize_pem()).unwrap();
        Pki { der: cert.der().to_vec(), key_der: key.serialize_der(), dir }
    }

    pub fn cert_dir(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    pub fn ca(&self) -> PathBuf {
        self.cert_dir().join("ca.crt")
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    pub fn key(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }

    /// `--tls-cert CERT --tls-key KEY`, plus `extra`.
    pub fn flags(&self, extra: &[&str]) -> Vec<String> {
        let mut flags = vec!["--tls-cert".to_string(), path(&self.cert()), "--tls-key".to_string(), path(&self.key())];
        flags.extend(extra.iter().map(|s| s.to_string()));
        flags
    }

    /// Copies this pair over the files the server reads, the way a renewal replaces them.
    pub fn install_over(&self, other: &Pki) {
        std::fs::copy(self.cert(), other.cert()).unwrap();
        std::fs::copy(self.key(), other.key()).unwrap();
    }
}

pub fn path(p: &Path) -> String {
    p.to_str().expect("UTF-8 path").to_string()
}

