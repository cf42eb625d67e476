//! rustls server configuration of a listener: certificate from PEM files or self-signed at
//! start, optional client authentication (mTLS), TLS 1.2 and 1.3 with rustls' safe defaults
//! and the `ring` provider.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::ring;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use tokio_rustls::TlsAcceptor;

use crate::config::{ConfigError, TlsConfig};

/// Longest client certificate subject rendered into [`super::RequestCtx`].
const SUBJECT_CHARS_MAX: usize = 256;

/// The TLS side of one listener, ready to accept.
#[derive(Clone)]
pub struct ListenerTls {
    /// Accepts TLS on an accepted TCP stream.
    pub acceptor: TlsAcceptor,
    /// The leaf certificate the listener presents (DER).
    pub cert_der: CertificateDer<'static>,
    /// Lower-case hex SHA-256 of [`Self::cert_der`].
    pub cert_sha256: String,
    /// Whether clients must present a certificate signed by `client_ca`.
    pub client_auth: bool,
}

/// A certificate and key generated at start when a listener has none configured.
pub struct SelfSigned {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl std::fmt::Debug for SelfSigned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SelfSigned")
            .field("cert_sha256", &sha256_hex(&self.cert))
            .field("key", &"<redacted>")
            .finish()
    }
}

impl SelfSigned {
    /// A new self-signed certificate for `localhost` and `127.0.0.1`.
    pub fn generate() -> Result<SelfSigned, rcgen::Error> {
        let generated = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ])?;
        Ok(SelfSigned {
            cert: generated.cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(generated.signing_key.serialize_der()),
        })
    }
}

/// Builds the TLS side of listener `index` from its configuration; a missing certificate uses
/// `self_signed`, generated on first need. Errors name the configuration key at fault.
pub fn listener_tls(
    config: &TlsConfig,
    index: usize,
    self_signed: &mut Option<SelfSigned>,
) -> Result<ListenerTls, ConfigError> {
    let key_name = |k: &str| format!("listeners[{index}].tls.{k}");
    let (chain, key) = match (&config.cert, &config.key) {
        (Some(cert), Some(key)) => (
            load_certs(cert).map_err(|m| err(key_name("cert"), m))?,
            PrivateKeyDer::from_pem_file(key)
                .map_err(|e| err(key_name("key"), format!("{}: {e}", key.display())))?,
        ),
        _ => {
            if self_signed.is_none() {
                let generated = SelfSigned::generate()
                    .map_err(|e| err(key_name("cert"), format!("self-signed: {e}")))?;
                tracing::info!(
                    sha256 = %sha256_hex(&generated.cert),
                    "generated a self-signed TLS certificate (localhost, 127.0.0.1)"
                );
                *self_signed = Some(generated);
            }
            match self_signed.as_ref() {
                Some(s) => (
                    vec![s.cert.clone()],
                    PrivateKeyDer::Pkcs8(s.key.clone_key()),
                ),
                None => return Err(err(key_name("cert"), "no certificate")),
            }
        }
    };
    let Some(leaf) = chain.first().cloned() else {
        return Err(err(key_name("cert"), "no certificate in the file"));
    };
    let provider = Arc::new(ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(key_name("cert"), e.to_string()))?;
    let builder = match &config.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in load_certs(ca).map_err(|m| err(key_name("client_ca"), m))? {
                roots
                    .add(cert)
                    .map_err(|e| err(key_name("client_ca"), e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| err(key_name("client_ca"), e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let server_config = builder
        .with_single_cert(chain, key)
        .map_err(|e| err(key_name("key"), e.to_string()))?;
    Ok(ListenerTls {
        acceptor: TlsAcceptor::from(Arc::new(server_config)),
        cert_sha256: sha256_hex(&leaf),
        cert_der: leaf,
        client_auth: config.client_ca.is_some(),
    })
}

/// Lower-case hex SHA-256 of DER bytes (a certificate fingerprint).
pub fn sha256_hex(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The subject of a DER certificate as `CN=…, O=…` (common attributes only), or `None` when
/// it cannot be read. A minimal DER walk: enough to name a client, not a validator (rustls has
/// already verified the certificate).
pub fn subject_of(cert_der: &[u8]) -> Option<String> {
    let (_, cert, _) = der_next(cert_der, 0x30)?;
    let (_, mut tbs, _) = der_next(cert, 0x30)?;
    if tbs.first() == Some(&0xa0) {
        tbs = der_next(tbs, 0xa0)?.2; // explicit version
    }
    for _ in 0..4 {
        // serial, signature algorithm, issuer, validity
        tbs = der_any(tbs)?.2;
    }
    let (_, mut name, _) = der_next(tbs, 0x30)?;
    let mut out = String::new();
    while !name.is_empty() {
        let (_, mut rdn, rest) = der_next(name, 0x31)?;
        name = rest;
        while !rdn.is_empty() {
            let (_, attribute, rest) = der_next(rdn, 0x30)?;
            rdn = rest;
            let (_, oid, value) = der_next(attribute, 0x06)?;
            let (_, value, _) = der_any(value)?;
            let label = match oid {
                [0x55, 0x04, 0x03] => "CN",
                [0x55, 0x04, 0x05] => "serialNumber",
                [0x55, 0x04, 0x06] => "C",
                [0x55, 0x04, 0x07] => "L",
                [0x55, 0x04, 0x08] => "ST",
                [0x55, 0x04, 0x0a] => "O",
                [0x55, 0x04, 0x0b] => "OU",
                _ => continue,
            };
            if !out.is_empty() {
                out.push_str(", ");
            }
            out.push_str(label);
            out.push('=');
            out.extend(
                String::from_utf8_lossy(value)
                    .chars()
                    .filter(|c| !c.is_control()),
            );
        }
    }
    if out.is_empty() {
        return None;
    }
    Some(out.chars().take(SUBJECT_CHARS_MAX).collect())
}

/// What a verified client certificate says about its holder: what a listener's identity map
/// (`identities`) is matched against.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientCert {
    /// The subject as [`subject_of`] renders it (`CN=…, O=…`).
    pub subject: Option<String>,
    /// Subject alternative names: DNS names, URIs and e-mail addresses, as written.
    pub sans: Vec<String>,
    /// Lower-case hex SHA-256 of the certificate's DER (its fingerprint).
    pub sha256: String,
}

/// Most subject alternative names read from one client certificate.
const SANS_MAX: usize = 16;

/// The identity of a client certificate (DER), already verified by rustls.
pub fn client_cert(cert_der: &[u8]) -> ClientCert {
    ClientCert {
        subject: subject_of(cert_der),
        sans: sans_of(cert_der).unwrap_or_default(),
        sha256: sha256_hex(cert_der),
    }
}

/// The DNS, URI and e-mail subject alternative names of a DER certificate; `None` when the
/// certificate cannot be walked.
fn sans_of(cert_der: &[u8]) -> Option<Vec<String>> {
    let (_, cert, _) = der_next(cert_der, 0x30)?;
    let (_, mut tbs, _) = der_next(cert, 0x30)?;
    if tbs.first() == Some(&0xa0) {
        tbs = der_next(tbs, 0xa0)?.2;
    }
    for _ in 0..6 {
        // serial, signature algorithm, issuer, validity, subject, subject public key info
        tbs = der_any(tbs)?.2;
    }
    let mut out = Vec::new();
    while !tbs.is_empty() {
        let (tag, content, rest) = der_any(tbs)?;
        tbs = rest;
        if tag != 0xa3 {
            continue; // issuer or subject unique id
        }
        let (_, mut extensions, _) = der_next(content, 0x30)?;
        while !extensions.is_empty() {
            let (_, extension, rest) = der_next(extensions, 0x30)?;
            extensions = rest;
            let (_, oid, mut value) = der_next(extension, 0x06)?;
            if oid != [0x55, 0x1d, 0x11] {
                continue;
            }
            if value.first() == Some(&0x01) {
                value = der_any(value)?.2; // critical
            }
            let (_, octets, _) = der_next(value, 0x04)?;
            let (_, mut names, _) = der_next(octets, 0x30)?;
            while !names.is_empty() && out.len() < SANS_MAX {
                let (tag, name, rest) = der_any(names)?;
                names = rest;
                // rfc822Name [1], dNSName [2], uniformResourceIdentifier [6]
                if matches!(tag, 0x81 | 0x82 | 0x86) {
                    out.push(String::from_utf8_lossy(name).into_owned());
                }
            }
        }
    }
    Some(out)
}

/// One DER element with the expected tag: (tag, content, rest).
fn der_next(input: &[u8], tag: u8) -> Option<(u8, &[u8], &[u8])> {
    let element = der_any(input)?;
    (element.0 == tag).then_some(element)
}

/// One DER element of any (single-byte) tag: (tag, content, rest).
fn der_any(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 {
            return None;
        }
        let (digits, rest) = (rest.get(..count)?, rest.get(count..)?);
        let len = digits
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, rest)
    };
    Some((tag, rest.get(..len)?, rest.get(len..)?))
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate", path.display()));
    }
    Ok(certs)
}

fn err(key: String, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key,
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn subject_of_a_generated_certificate_names_its_cn() {
        let mut params = rcgen::CertificateParams::new(vec!["t1".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "terminal 10000001");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Acme");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let subject = subject_of(cert.der()).unwrap();
        assert!(subject.contains("CN=terminal 10000001"), "{subject}");
        assert!(subject.contains("O=Acme"), "{subject}");
        let identity = client_cert(cert.der());
        assert_eq!(identity.sans, vec!["t1".to_string()]);
        assert_eq!(identity.sha256, sha256_hex(cert.der()));
        assert_eq!(subject_of(b"\x30\x03garbage"), None);
        assert_eq!(subject_of(b""), None);
    }

    #[test]
    fn self_signed_tls_builds_and_has_a_fingerprint() {
        let mut generated = None;
        let tls = listener_tls(&TlsConfig::default(), 0, &mut generated).unwrap();
        assert_eq!(tls.cert_sha256.len(), 64);
        assert!(!tls.client_auth);
        let again = listener_tls(&TlsConfig::default(), 1, &mut generated).unwrap();
        assert_eq!(
            tls.cert_sha256, again.cert_sha256,
            "one certificate per process"
        );
    }
}

pub mod danger {
    //! Accepting any server certificate: only behind `--insecure-skip-verify`, for test
    //! responders such as `ceiling serve` whose certificate is made at start. Handshake
    //! signatures are still checked, so the peer must hold the key of the certificate it shows.

    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};

    /// A verifier that trusts every certificate chain (rustls' `dangerous()` seam); shared by
    /// `refundgate load --insecure-skip-verify` and upstream links with `insecure_skip_verify`.
    #[derive(Debug)]
    pub struct AnyServerCertificate(Arc<CryptoProvider>);

    impl AnyServerCertificate {
        /// A verifier checking handshake signatures with `provider`'s algorithms.
        pub fn new(provider: Arc<CryptoProvider>) -> Self {
            AnyServerCertificate(provider)
        }
    }

    impl ServerCertVerifier for AnyServerCertificate {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}
