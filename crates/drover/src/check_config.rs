//! `drover check-config`: load config exactly as `server` and `agent` would, and stop.
//!
//! The loaders already produce `file:line:col: field: message`, so a failure is passed
//! through untouched; CI and editors can jump to the line.

use crate::cli::CheckConfigArgs;
use drover_core::config::{AgentConfig, ServerConfig};

/// One summary line per target on success; the first error otherwise.
pub fn run(args: &CheckConfigArgs) -> Result<String, String> {
    let mut lines = Vec::new();
    if let Some(dir) = &args.config_dir {
        // load_dir treats a missing directory as empty config (the server's first start);
        // here that is almost always a typo.
        if !dir.is_dir() {
            return Err(format!("{}: not a directory", dir.display()));
        }
        let cfg = ServerConfig::load_dir(dir).map_err(|e| e.to_string())?;
        // Handlers, filters (their expressions compile here) and aggregates, as the server
        // would build them.
        drover_pipeline::PipelineConfig::from_server_config(&cfg).validate().map_err(|e| e.to_string())?;
        lines.push(format!(
            "ok: {}: {} checks, {} entities, {} silences, {} handlers, {} filters",
            dir.display(),
            cfg.checks.len(),
            cfg.entities.len(),
            cfg.silences.len(),
            cfg.handlers.len(),
            cfg.filters.len()
        ));
    }
    if let Some(file) = &args.agent_config {
        let cfg = AgentConfig::load(file).map_err(|e| e.to_string())?;
        let name = cfg.name.as_deref().unwrap_or("(hostname)");
        lines.push(format!(
            "ok: {}: agent {name}, {} subscriptions, {} local checks",
            file.display(),
            cfg.subscriptions.len(),
            cfg.checks.len()
        ));
    }
    if let Some(file) = &args.proxy_config {
        let cfg = drover_proxy::config::ProxyConfig::load(file).map_err(|e| e.to_string())?;
        let backends: usize = cfg.services.values().map(|s| s.backends.len()).sum();
        lines.push(format!(
            "ok: {}: {} listeners, {} routes, {} services, {} backends",
            file.display(),
            cfg.listeners.len(),
            cfg.routes.len(),
            cfg.services.len(),
            backends
        ));
    }
    if let Some(file) = &args.dns_config {
        let cfg = drover_dns::DnsConfig::load(file).map_err(|e| e.to_string())?;
        let records: usize = cfg.zones.iter().map(|z| z.records.len()).sum();
        lines.push(format!(
            "ok: {}: {} zones, {} config records, {} pools",
            file.display(),
            cfg.zones.len(),
            records,
            cfg.pools.len()
        ));
    }
    Ok(lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn args(dir: Option<PathBuf>, agent: Option<PathBuf>) -> CheckConfigArgs {
        CheckConfigArgs { config_dir: dir, agent_config: agent, proxy_config: None, dns_config: None }
    }

    #[test]
    fn valid_dir_is_summarised_with_counts() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("a.toml"),
            "[checks.cpu]\ncommand = \"true\"\nsubscriptions = [\"a\"]\ninterval_secs = 5\n[entities.site]\n",
        )
        .unwrap();
        let out = run(&args(Some(d.path().into()), None)).unwrap();
        assert!(out.starts_with("ok: "), "{out}");
        assert!(out.ends_with(": 1 checks, 1 entities, 0 silences, 0 handlers, 0 filters"), "{out}");
    }

    #[test]
    fn invalid_dir_reports_file_line_and_field() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("a.toml"),
            "[checks.cpu]\ncommand = \"true\"\nsubscriptions = [\"a\"]\ninterval_secs = 0\n",
        )
        .unwrap();
        let e = run(&args(Some(d.path().into()), None)).unwrap_err();
        assert!(e.contains("a.toml:4:1: checks.cpu.interval_secs: must be at least 1"), "{e}");
    }

    #[test]
    fn missing_dir_is_an_error_not_empty_config() {
        let d = tempfile::tempdir().unwrap();
        assert!(run(&args(Some(d.path().join("nope")), None)).is_err());
    }

    #[test]
    fn agent_config_is_checked_too() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("agent.toml");
        std::fs::write(&f, "name = \"n1\"\nsubscriptions = [\"web\"]\n").unwrap();
        let out = run(&args(None, Some(f.clone()))).unwrap();
        assert!(out.contains("agent n1, 1 subscriptions, 0 local checks"), "{out}");
        std::fs::write(&f, "nme = \"n1\"\n").unwrap();
        let e = run(&args(None, Some(f))).unwrap_err();
        assert!(e.contains("agent.toml:1:"), "{e}");
    }

    #[test]
    fn proxy_config_is_checked_with_located_errors() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("proxy.toml");
        let good = "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\n\n[[routes]]\nlistener = \"web\"\nservice = \"app\"\n\n[services.app]\nbackends = [{ address = \"127.0.0.1:9001\" }]\n";
        std::fs::write(&f, good).unwrap();
        let a =
            CheckConfigArgs { config_dir: None, agent_config: None, proxy_config: Some(f.clone()), dns_config: None };
        let out = run(&a).unwrap();
        assert!(out.ends_with("1 listeners, 1 routes, 1 services, 1 backends"), "{out}");
        std::fs::write(&f, good.replace("service = \"app\"", "service = \"nope\"")).unwrap();
        let e = run(&a).unwrap_err();
        assert!(e.contains("proxy.toml:8:1: routes.0.service: unknown service `nope`"), "{e}");
    }
}
