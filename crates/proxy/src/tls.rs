//! TLS termination for https listeners: rustls on ring, certificates chosen by SNI
//! (exact name, then `*.suffix`, then the listener's first certificate), ALPN `h2`
//! and `http/1.1`.

use crate::config::TlsCertConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::HashMap;
use std::sync::Arc;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads and checks one certificate and its key; errors name the field at fault.
pub(crate) fn load_cert(t: &TlsCertConfig) -> Result<CertifiedKey, (&'static str, String)> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&t.cert)
        .map_err(|e| ("cert", format!("{}: {e}", t.cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| ("cert", format!("{}: {e}", t.cert.display())))?;
    if certs.is_empty() {
        return Err(("cert", format!("{}: no PEM certificate found", t.cert.display())));
    }
    let key = PrivateKeyDer::from_pem_file(&t.key).map_err(|e| ("key", format!("{}: {e}", t.key.display())))?;
    CertifiedKey::from_der(certs, key, &provider())
        .map_err(|e| ("key", format!("{} does not go with {}: {e}", t.key.display(), t.cert.display())))
}

#[derive(Debug)]
struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// (`.suffix`, key), in config order.
    wildcard: Vec<(String, Arc<CertifiedKey>)>,
    default: Arc<CertifiedKey>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name().map(str::to_ascii_lowercase) else {
            return Some(self.default.clone());
        };
        if let Some(k) = self.exact.get(&name) {
            return Some(k.clone());
        }
        let hit = self.wildcard.iter().find(|(suffix, _)| name.ends_with(suffix.as_str()) && name.len() > suffix.len());
        Some(hit.map(|(_, k)| k.clone()).unwrap_or_else(|| self.default.clone()))
    }
}

/// The acceptor for one https listener (its config was validated, so files load).
pub(crate) fn acceptor(certs: &[TlsCertConfig]) -> Result<tokio_rustls::TlsAcceptor, String> {
    let mut exact = HashMap::new();
    let mut wildcard = Vec::new();
    let mut default = None;
    for t in certs {
        let key = Arc::new(load_cert(t).map_err(|(_, m)| m)?);
        default.get_or_insert_with(|| key.clone());
        for n in &t.server_names {
            let n = n.to_ascii_lowercase();
            match n.strip_prefix('*') {
                Some(suffix) => wildcard.push((suffix.to_string(), key.clone())),
                None => {
                    exact.entry(n).or_insert_with(|| key.clone());
                }
            }
        }
    }
    let default = default.ok_or("no certificate")?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver { exact, wildcard, default }));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}
