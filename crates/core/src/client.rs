//! The client side of talking to a drover server, shared by agents, proxies and name
//! servers: how a `--server` URL is read, and which certificates a wss:// server may
//! present.

use std::path::Path;
use std::sync::Arc;

/// `ws(s)://host:port[/path]`: http(s) become ws(s), a bare `host:port` becomes ws, and
/// a URL without a path gets `default_path` (the endpoint the caller speaks to).
pub fn ws_url(server: &str, default_path: &str) -> Result<String, String> {
    let s = server.trim();
    let (scheme, rest) = match s.split_once("://") {
        None => ("ws", s),
        Some((scheme, rest)) => match scheme.to_ascii_lowercase().as_str() {
            "ws" | "http" => ("ws", rest),
            "wss" | "https" => ("wss", rest),
            other => return Err(format!("server URL `{s}`: scheme `{other}` is not one of ws, wss, http, https")),
        },
    };
    let (authority, path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    if authority.is_empty() {
        return Err(format!("server URL `{s}` has no host"));
    }
    let path = match path {
        "" | "/" => default_path.to_string(),
        p if p.starts_with('?') => format!("{default_path}{p}"),
        p => p.to_string(),
    };
    Ok(format!("{scheme}://{authority}{path}"))
}

/// The trust roots for a wss:// server: the public web PKI, plus the PEM certificates in
/// `ca_file` (how a self-signed or private-CA control plane is trusted).
pub fn tls_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(path) = ca_file {
        let bad = |e: String| format!("`ca_file` {}: {e}", path.display());
        let mut n = 0;
        for cert in rustls_pki_types::CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))? {
            roots.add(cert.map_err(|e| bad(e.to_string()))?).map_err(|e| bad(e.to_string()))?;
            n += 1;
        }
        if n == 0 {
            return Err(bad("no PEM certificate found".into()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_get_the_callers_endpoint_when_they_have_no_path() {
        for (given, want) in [
            ("ws://srv:8080", "ws://srv:8080/x/ws"),
            ("ws://srv:8080/", "ws://srv:8080/x/ws"),
            ("http://srv:8080", "ws://srv:8080/x/ws"),
            ("https://srv", "wss://srv/x/ws"),
            ("wss://srv/custom/ws", "wss://srv/custom/ws"),
            ("srv:8080", "ws://srv:8080/x/ws"),
            (" HTTP://srv:1 ", "ws://srv:1/x/ws"),
            ("srv:1?a=b", "ws://srv:1/x/ws?a=b"),
        ] {
            assert_eq!(ws_url(given, "/x/ws").unwrap(), want, "{given}");
        }
        assert!(ws_url("ftp://srv", "/x").unwrap_err().contains("scheme `ftp`"));
        assert!(ws_url("ws:///path", "/x").unwrap_err().contains("has no host"));
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ca.pem");
        std::fs::write(&f, "not a certificate\n").unwrap();
        assert!(tls_config(Some(&f)).unwrap_err().contains("no PEM certificate found"));
        assert!(tls_config(None).is_ok());
    }
}
