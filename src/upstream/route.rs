//! Routing: which upstream a merchant's requests go to, and the links `[[upstreams]]` asks for.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::ring;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::link::LinkConfig;
use crate::config::{RoutesConfig, UpstreamConfig};

/// Merchant (DE42) → upstream name, with an optional default.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    merchants: HashMap<String, String>,
    default: Option<String>,
}

impl Routes {
    /// Routes from `[routes]`.
    pub fn from_config(config: &RoutesConfig) -> Routes {
        Routes {
            merchants: config
                .merchants
                .iter()
                .map(|(m, u)| (m.clone(), u.clone()))
                .collect(),
            default: config.default.clone(),
        }
    }

    /// Routes every listed merchant to its upstream, the rest to `default` (or locally).
    pub fn new<'a>(
        merchants: impl IntoIterator<Item = (&'a str, &'a str)>,
        default: Option<&str>,
    ) -> Routes {
        Routes {
            merchants: merchants
                .into_iter()
                .map(|(m, u)| (m.to_string(), u.to_string()))
                .collect(),
            default: default.map(str::to_string),
        }
    }

    /// The upstream of `merchant` (DE42 as sent, or with trailing spaces trimmed); `None`:
    /// decide locally.
    pub fn upstream_for(&self, merchant: &str) -> Option<&str> {
        self.merchants
            .get(merchant)
            .or_else(|| self.merchants.get(merchant.trim_end()))
            .or(self.default.as_ref())
            .map(String::as_str)
    }
}

/// The link settings of one validated `[[upstreams]]` table; errors name the key.
pub fn link_config(
    index: usize,
    u: &UpstreamConfig,
    clock: Arc<dyn crate::clock::Clock>,
) -> Result<LinkConfig, String> {
    let key = |k: &str| format!("upstreams[{index}].{k}");
    let server_name = match &u.server_name {
        Some(n) => Some(
            ServerName::try_from(n.clone()).map_err(|e| format!("{}: {e}", key("server_name")))?,
        ),
        None => None,
    };
    let mac = match &u.mac {
        Some(m) => {
            let k = crate::mac::key_from_config(&m.algorithm, &m.key)
                .map_err(|e| format!("{}.{e}", key("mac")))?;
            if crate::mac::field_for(&k, u.dialect.spec(), false).is_none() {
                return Err(format!(
                    "{}: the {} MAC element cannot carry a {} MAC",
                    key("mac.algorithm"),
                    u.dialect.name(),
                    m.algorithm
                ));
            }
            Some(k)
        }
        None => None,
    };
    Ok(LinkConfig {
        name: Arc::from(u.name.as_str()),
        mac,
        addrs: u.addrs.clone(),
        dialect: u.dialect,
        framing: u.framing,
        tls: Arc::new(client_tls(index, u)?),
        server_name,
        timeout: Duration::from_millis(u.timeout_ms),
        write_timeout: Duration::from_millis(u.write_timeout_ms),
        read_timeout: Duration::from_millis(u.read_timeout_ms.unwrap_or(u.timeout_ms)),
        max_pending: u.max_pending,
        echo_interval: Duration::from_millis(u.echo_interval_ms),
        reconnect_min: Duration::from_millis(u.reconnect_min_ms),
        reconnect_max: Duration::from_millis(u.reconnect_max_ms),
        clock,
        connector: None,
    })
}

/// A rustls client configuration trusting `roots` (for tests and tools).
pub fn client_tls_trusting(roots: &[CertificateDer<'static>]) -> Result<ClientConfig, String> {
    let mut store = RootCertStore::empty();
    for c in roots {
        store.add(c.clone()).map_err(|e| e.to_string())?;
    }
    Ok(builder()?
        .with_root_certificates(store)
        .with_no_client_auth())
}

fn builder() -> Result<rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>, String> {
    ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())
}

fn client_tls(index: usize, u: &UpstreamConfig) -> Result<ClientConfig, String> {
    let key = |k: &str| format!("upstreams[{index}].tls.{k}");
    let wants_client_cert = if u.tls.insecure_skip_verify {
        tracing::warn!(upstream = %u.name, "tls.insecure_skip_verify: the host's certificate is not checked");
        builder()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(
                crate::server::tls::danger::AnyServerCertificate::new(Arc::new(
                    ring::default_provider(),
                )),
            ))
    } else {
        let ca = u.tls.ca.as_deref().ok_or_else(|| key("ca") + ": missing")?;
        let mut store = RootCertStore::empty();
        for c in load_certs(ca).map_err(|e| format!("{}: {e}", key("ca")))? {
            store.add(c).map_err(|e| format!("{}: {e}", key("ca")))?;
        }
        builder()?.with_root_certificates(store)
    };
    match (&u.tls.cert, &u.tls.key) {
        (Some(cert), Some(k)) => {
            let chain = load_certs(cert).map_err(|e| format!("{}: {e}", key("cert")))?;
            let private = PrivateKeyDer::from_pem_file(k)
                .map_err(|e| format!("{}: {}: {e}", key("key"), k.display()))?;
            wants_client_cert
                .with_client_auth_cert(chain, private)
                .map_err(|e| format!("{}: {e}", key("key")))
        }
        _ => Ok(wants_client_cert.with_no_client_auth()),
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate", path.display()));
    }
    Ok(certs)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn listed_merchants_go_to_their_upstream_others_to_the_default() {
        let r = Routes::new([("MERCHANT 000001", "a")], Some("b"));
        assert_eq!(r.upstream_for("MERCHANT 000001"), Some("a"));
        assert_eq!(r.upstream_for("MERCHANT 000002"), Some("b"));
        let local = Routes::new([("M1", "a")], None);
        assert_eq!(local.upstream_for("M1     "), Some("a"));
        assert_eq!(local.upstream_for("M2"), None);
    }
}
