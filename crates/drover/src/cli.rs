//! The command line: one binary, one subcommand per role or tool.
//!
//! Flags that also live in config files (`drover agent --config`) are `Option`s here so
//! that "not given" can be told apart from "given the default", and the flag overrides
//! the file only when it was actually passed.

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use drover_core::config::{AgentConfig, ConfigError};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "drover", version, about = "A monitoring control plane and its agents, in one binary")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log line format (logs go to stderr).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter: a level (`debug`) or tracing directives (`drover_server=debug,info`).
    #[arg(long, global = true, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the control plane: REST API, agent WebSocket endpoint, scheduler.
    Server(ServerArgs),
    /// Run an agent: register this node, send keepalives, run checks.
    Agent(AgentArgs),
    /// Run a server and a local agent in one process (a single-node setup).
    Up(UpArgs),
    /// Validate config files without starting anything.
    CheckConfig(CheckConfigArgs),
    /// Convert another tool's configuration into drover config files.
    Import(ImportArgs),
    /// Inspect and change a running server through its REST API.
    Ctl(CtlArgs),
    /// Run the load balancer: HTTP and TCP listeners in front of health-checked backends.
    /// SIGHUP reloads the config file; SIGTERM drains and exits.
    Proxy(ProxyArgs),
    /// Run an authoritative name server whose pool answers follow member health.
    Dns(DnsArgs),
}

#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("source").required(true).multiple(true).args(["config", "server"])))]
pub struct DnsArgs {
    /// Name server config file (TOML): `[[zones]]`, `[[pools]]`, `[discovery]`.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address for UDP and TCP; overrides the file's `listen`.
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<std::net::SocketAddr>,
    /// Control-plane server whose member health pools follow (`GET /api/v1/watch`).
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,
    /// Token to present to the server (the agent token is enough).
    #[arg(long, value_name = "TOKEN", env = "DROVER_AGENT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM CA certificate(s) to trust for a wss:// server.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Where the last known members are kept, so a restart without the server answers as before.
    #[arg(long, value_name = "FILE")]
    pub state_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("what").required(true).args(["config", "listen"])))]
pub struct ProxyArgs {
    /// Proxy config file (TOML): `[[listeners]]`, `[[routes]]`, `[services.NAME]`.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Instead of a file: `[http://|tcp://]BIND=SUBSCRIPTION:PORT`, a listener in front of
    /// the healthy members of a subscription (needs --server); repeatable.
    #[arg(long, value_name = "SPEC", requires = "server")]
    pub listen: Vec<drover_proxy::spec::ListenSpec>,
    /// Control-plane server whose member health `members` services follow (`GET /api/v1/watch`).
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,
    /// Token to present to the server (the agent token is enough).
    #[arg(long, value_name = "TOKEN", env = "DROVER_AGENT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM CA certificate(s) to trust for a wss:// server.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Where the last known members are kept, so a restart while the server is down
    /// still serves them.
    #[arg(long, value_name = "FILE", default_value = "drover-proxy.members.json")]
    pub state_file: PathBuf,
    /// Loopback address for the admin endpoint in --listen mode (`/backends`, `/metrics`).
    #[arg(long, value_name = "HOST:PORT")]
    pub admin_listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Directory of `*.toml` files with `[server]`, `[checks.*]`, `[entities.*]`, `[silences.*]`.
    #[arg(long, value_name = "DIR", default_value = "drover.d")]
    pub config_dir: PathBuf,
    /// Where the store and generated tokens are kept.
    #[arg(long, value_name = "DIR", default_value = "drover-data")]
    pub data_dir: PathBuf,
    /// Address for the REST API and the agent WebSocket endpoint.
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:8420")]
    pub listen: SocketAddr,
    /// Token for the REST API; generated into DATA_DIR/admin.token when not given.
    #[arg(long, value_name = "TOKEN", env = "DROVER_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Token agents must present; generated into DATA_DIR/agent.token when not given.
    #[arg(long, value_name = "TOKEN", env = "DROVER_AGENT_TOKEN", hide_env_values = true)]
    pub agent_token: Option<String>,
    /// PEM certificate chain: serve HTTPS and WSS on --listen (needs --tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// Agent config file (TOML); flags override its values.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Server URL: ws://, wss://, http:// or https://.
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,
    /// Entity name; defaults to the hostname.
    #[arg(long)]
    pub name: Option<String>,
    /// Subscriptions, comma separated; replace the file's list when given.
    #[arg(long, value_name = "SUB,...", value_delimiter = ',')]
    pub subscriptions: Vec<String>,
    /// A label KEY=VALUE; repeatable; added to (and overriding) the file's labels.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Token to present to the server.
    #[arg(long, value_name = "TOKEN", env = "DROVER_AGENT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Address other systems reach this node at (for checks' `{{ .address }}`).
    #[arg(long)]
    pub address: Option<String>,
    #[arg(long, value_name = "SECS")]
    pub keepalive_interval_secs: Option<u64>,
    /// Keepalive age that raises a WARNING for this entity.
    #[arg(long, value_name = "SECS")]
    pub keepalive_warning_secs: Option<u64>,
    /// Keepalive age that raises a CRITICAL for this entity.
    #[arg(long, value_name = "SECS")]
    pub keepalive_critical_secs: Option<u64>,
    /// Remove this entity without an alert when the agent stops cleanly.
    #[arg(long)]
    pub deregister: bool,
    /// Loopback HTTP endpoint for scripts to POST results; "" disables it.
    #[arg(long, value_name = "ADDR")]
    pub api_listen: Option<String>,
    /// PEM CA certificate(s) to trust for a wss:// server (self-signed or private CA).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
}

impl AgentArgs {
    /// The agent's effective config: the file (if any), then the flags on top, validated.
    pub fn to_config(&self) -> Result<AgentConfig, String> {
        let mut cfg = match &self.config {
            Some(path) => AgentConfig::load(path).map_err(|e: ConfigError| e.to_string())?,
            None => AgentConfig::default(),
        };
        if let Some(v) = &self.server {
            cfg.server = Some(v.clone());
        }
        if let Some(v) = &self.name {
            cfg.name = Some(v.clone());
        }
        if !self.subscriptions.is_empty() {
            cfg.subscriptions =
                self.subscriptions.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        }
        for (k, v) in &self.labels {
            cfg.labels.insert(k.clone(), v.clone());
        }
        if let Some(v) = &self.token {
            cfg.token = Some(v.clone());
        }
        if let Some(v) = &self.address {
            cfg.address = Some(v.clone());
        }
        if let Some(v) = &self.ca_file {
            cfg.ca_file = Some(v.clone());
        }
        if let Some(v) = self.keepalive_interval_secs {
            cfg.keepalive_interval_secs = v;
        }
        if let Some(v) = self.keepalive_warning_secs {
            cfg.keepalive_warning_secs = Some(v);
        }
        if let Some(v) = self.keepalive_critical_secs {
            cfg.keepalive_critical_secs = Some(v);
        }
        // A bool flag cannot say "false"; absent means "keep what the file says".
        if self.deregister {
            cfg.deregister = true;
        }
        if let Some(v) = &self.api_listen {
            cfg.api_listen = v.clone();
        }
        validate_agent_config(&cfg)?;
        Ok(cfg)
    }
}

/// Checks the merged agent config. The file alone was validated by `AgentConfig::load`,
/// so a failure here almost always comes from a flag: name it as the flag.
fn validate_agent_config(cfg: &AgentConfig) -> Result<(), String> {
    cfg.validate().map_err(|e| format!("{}: {}", flag_for(&e.field), e.message))?;
    if let Some(server) = &cfg.server {
        let ok =
            ["ws://", "wss://", "http://", "https://"].iter().any(|p| server.starts_with(p) && server.len() > p.len());
        if !ok {
            return Err(format!("--server: `{server}` must be a ws://, wss://, http:// or https:// URL"));
        }
    }
    if let (Some(w), Some(c)) = (cfg.keepalive_warning_secs, cfg.keepalive_critical_secs) {
        if w == 0 {
            return Err("--keepalive-warning-secs: must be at least 1".into());
        }
        if c < w {
            return Err(format!("--keepalive-critical-secs: {c} must not be below --keepalive-warning-secs ({w})"));
        }
    }
    if !cfg.api_listen.is_empty() && cfg.api_listen.parse::<SocketAddr>().is_err() {
        return Err(format!("--api-listen: `{}` is not HOST:PORT (use \"\" to disable)", cfg.api_listen));
    }
    Ok(())
}

fn flag_for(field: &str) -> String {
    match field {
        "name"
        | "server"
        | "token"
        | "address"
        | "subscriptions"
        | "keepalive_interval_secs"
        | "keepalive_warning_secs"
        | "keepalive_critical_secs"
        | "api_listen" => format!("--{}", field.replace('_', "-")),
        "labels" => "--label".to_string(),
        // Not settable by flag: it came from the file.
        other => format!("{other} (in --config file)"),
    }
}

/// Parses `KEY=VALUE`; the value may itself contain `=`.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not KEY=VALUE (for example --label zone=eu-1)")),
    }
}

#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// Server config directory.
    #[arg(long, value_name = "DIR", default_value = "drover.d")]
    pub config_dir: PathBuf,
    #[arg(long, value_name = "DIR", default_value = "drover-data")]
    pub data_dir: PathBuf,
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:8420")]
    pub listen: SocketAddr,
    /// The local agent's entity name; defaults to the hostname.
    #[arg(long)]
    pub name: Option<String>,
    /// The local agent's subscriptions, comma separated.
    #[arg(long, value_name = "SUB,...", value_delimiter = ',', default_value = "default")]
    pub subscriptions: Vec<String>,
    /// A label KEY=VALUE for the local agent; repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Proxy listeners in front of the healthy members of a subscription:
    /// `[http://|tcp://]BIND=SUBSCRIPTION:PORT` (a member's `port` label overrides PORT); repeatable.
    #[arg(long = "proxy", value_name = "SPEC", default_value = "127.0.0.1:8480=web:8000")]
    pub proxy: Vec<drover_proxy::spec::ListenSpec>,
    /// The proxy's admin endpoint (`/backends` says why each member is in or out).
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:8481")]
    pub proxy_admin: SocketAddr,
    /// Run without the proxy.
    #[arg(long, conflicts_with = "proxy")]
    pub no_proxy: bool,
    /// The name server's address (UDP and TCP).
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:8453")]
    pub dns: SocketAddr,
    /// The zone the name server is authoritative for: `web.service.DOMAIN` answers the
    /// healthy members of `web`, `web1.node.DOMAIN` the node `web1`.
    #[arg(long, value_name = "DOMAIN", default_value = "drover.")]
    pub dns_domain: String,
    /// Run without the name server.
    #[arg(long, conflicts_with = "dns")]
    pub no_dns: bool,
}

impl UpArgs {
    /// `--name`, or this host's name.
    pub fn agent_name(&self) -> String {
        self.name.clone().unwrap_or_else(hostname)
    }
}

/// This host's name, from the kernel where it says, else `$HOSTNAME`, else "localhost".
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "localhost".to_string())
}

#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("target").required(true).multiple(true).args(["config_dir", "agent_config", "proxy_config", "dns_config"])))]
pub struct CheckConfigArgs {
    /// A server config directory to validate.
    #[arg(long, value_name = "DIR")]
    pub config_dir: Option<PathBuf>,
    /// An agent config file to validate.
    #[arg(long, value_name = "FILE")]
    pub agent_config: Option<PathBuf>,
    /// A proxy config file to validate.
    #[arg(long, value_name = "FILE")]
    pub proxy_config: Option<PathBuf>,
    /// A name server (`drover dns`) config file to validate, zone files included.
    #[arg(long, value_name = "FILE")]
    pub dns_config: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct ImportArgs {
    #[command(subcommand)]
    pub source: ImportSource,
}

#[derive(Debug, Clone, Subcommand)]
pub enum ImportSource {
    /// Sensu 1.x JSON config (conf.d): checks become `checks.toml`, the client `agent.toml`.
    Sensu(SensuImportArgs),
}

#[derive(Debug, Clone, Args)]
pub struct SensuImportArgs {
    /// Directory of Sensu `*.json` files, read recursively.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Where to write drover config files.
    #[arg(long, value_name = "DIR", default_value = "drover.d")]
    pub out: PathBuf,
    /// Replace files a previous import wrote.
    #[arg(long)]
    pub force: bool,
}

/// The connection and format options are global so they may also follow the
/// subcommand (`drover ctl events list --format json`).
#[derive(Debug, Clone, Args)]
pub struct CtlArgs {
    /// Server base URL.
    #[arg(long, global = true, value_name = "URL", env = "DROVER_SERVER", default_value = "http://127.0.0.1:8420")]
    pub server: String,
    /// Admin API token.
    #[arg(long, global = true, value_name = "TOKEN", env = "DROVER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the admin token, used when no token is given
    /// [default: drover-data/admin.token, if it exists].
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// PEM CA certificate(s) to trust for an https:// server (self-signed or private CA).
    #[arg(long, global = true, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
    #[command(subcommand)]
    pub resource: CtlResource,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Clone, Subcommand)]
pub enum CtlResource {
    /// Nodes with agents, and declared proxy entities.
    #[command(subcommand)]
    Entities(EntitiesCmd),
    /// Check definitions.
    #[command(subcommand)]
    Checks(ChecksCmd),
    /// The latest state of each check on each entity.
    #[command(subcommand)]
    Events(EventsCmd),
    /// Suppressions of event handling.
    #[command(subcommand)]
    Silences(SilencesCmd),
    /// Handler deliveries that failed every retry.
    #[command(subcommand)]
    Deadletters(DeadlettersCmd),
    /// Database clusters (`[databases.NAME]`): leader, members, switchover.
    #[command(subcommand)]
    Db(DbCmd),
}

#[derive(Debug, Clone, Subcommand)]
pub enum DbCmd {
    List,
    /// The leader, the last decision and what each member reports.
    Get {
        name: String,
    },
    /// Move the primary with no lost write: the target catches up first.
    Switchover {
        name: String,
        /// The member to promote; the best replica when not given.
        #[arg(long)]
        to: Option<String>,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum DeadlettersCmd {
    List,
    /// Deliver it again (from the first attempt).
    Retry {
        id: u64,
    },
    Delete {
        id: u64,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum EntitiesCmd {
    List,
    Get { name: String },
    Delete { name: String },
}

#[derive(Debug, Clone, Subcommand)]
pub enum ChecksCmd {
    List,
    Get {
        name: String,
    },
    Delete {
        name: String,
    },
    /// Run the check now on its subscribers.
    Execute {
        name: String,
    },
    /// Create or replace every `[checks.NAME]` of a TOML file.
    Apply {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum EventsCmd {
    List {
        /// Only this entity's events.
        #[arg(long)]
        entity: Option<String>,
    },
    Get {
        entity: String,
        check: String,
    },
    Delete {
        entity: String,
        check: String,
    },
    /// Mark the event OK without waiting for the next result.
    Resolve {
        entity: String,
        check: String,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum SilencesCmd {
    List,
    Get {
        name: String,
    },
    Delete {
        name: String,
    },
    /// Create a silence; at least one of --entity, --subscription, --check.
    Create(SilenceCreateArgs),
}

#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("selector").required(true).multiple(true).args(["entity", "subscription", "check"])))]
pub struct SilenceCreateArgs {
    #[arg(long)]
    pub entity: Option<String>,
    #[arg(long)]
    pub subscription: Option<String>,
    #[arg(long)]
    pub check: Option<String>,
    /// Lifetime in seconds from the start; omit for no expiry.
    #[arg(long, value_name = "N")]
    pub expire_secs: Option<u64>,
    /// Remove the silence when the silenced event resolves.
    #[arg(long)]
    pub expire_on_resolve: bool,
    #[arg(long, default_value = "")]
    pub reason: String,
    #[arg(long, env = "USER", default_value = "")]
    pub creator: String,
    /// Start time in Unix seconds; omit to start now.
    #[arg(long, value_name = "N")]
    pub begin_unix_secs: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("drover").chain(args.iter().copied()))
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn server_defaults_match_the_documented_ones() {
        let Command::Server(a) = parse(&["server"]).unwrap().command else { panic!() };
        assert_eq!(a.config_dir, PathBuf::from("drover.d"));
        assert_eq!(a.data_dir, PathBuf::from("drover-data"));
        assert_eq!(a.listen.to_string(), "127.0.0.1:8420");
    }

    #[test]
    fn label_without_equals_is_a_usage_error() {
        let e = parse(&["agent", "--label", "zone"]).unwrap_err();
        assert!(e.to_string().contains("KEY=VALUE"), "{e}");
        assert_eq!(parse_label("a=b=c").unwrap(), ("a".into(), "b=c".into()));
    }

    #[test]
    fn agent_flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, "name = \"from-file\"\nsubscriptions = [\"a\"]\nkeepalive_interval_secs = 30\n[labels]\nzone = \"z1\"\nrole = \"db\"\n").unwrap();
        let f = file.to_str().unwrap();
        let Command::Agent(a) = parse(&[
            "agent",
            "--config",
            f,
            "--name",
            "n2",
            "--subscriptions",
            "b,c",
            "--label",
            "zone=z2",
            "--api-listen",
            "",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        let c = a.to_config().unwrap();
        assert_eq!(c.name.as_deref(), Some("n2"));
        assert_eq!(c.subscriptions, vec!["b", "c"]);
        assert_eq!(c.labels["zone"], "z2");
        assert_eq!(c.labels["role"], "db");
        assert_eq!(c.keepalive_interval_secs, 30);
        assert_eq!(c.api_listen, "");
    }

    #[test]
    fn invalid_flag_value_is_reported_as_the_flag() {
        let Command::Agent(a) = parse(&["agent", "--name", "a/b"]).unwrap().command else { panic!() };
        let e = a.to_config().unwrap_err();
        assert!(e.starts_with("--name: "), "{e}");
        let Command::Agent(a) = parse(&["agent", "--keepalive-interval-secs", "0"]).unwrap().command else { panic!() };
        assert!(a.to_config().unwrap_err().starts_with("--keepalive-interval-secs: "));
        let Command::Agent(a) = parse(&["agent", "--server", "127.0.0.1:8420"]).unwrap().command else { panic!() };
        assert!(a.to_config().unwrap_err().starts_with("--server: "));
    }

    #[test]
    fn bad_agent_file_error_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, "name = \"n\"\nkeepalive_interval_secs = 0\n").unwrap();
        let Command::Agent(a) = parse(&["agent", "--config", file.to_str().unwrap()]).unwrap().command else {
            panic!()
        };
        let e = a.to_config().unwrap_err();
        assert!(e.contains("agent.toml:2:"), "{e}");
    }

    #[test]
    fn check_config_needs_a_target() {
        assert!(parse(&["check-config"]).is_err());
        assert!(parse(&["check-config", "--agent-config", "a.toml"]).is_ok());
    }

    #[test]
    fn silence_create_needs_a_selector() {
        assert!(parse(&["ctl", "silences", "create", "--reason", "x"]).is_err());
        let Command::Ctl(c) =
            parse(&["ctl", "--format", "json", "silences", "create", "--check", "cpu"]).unwrap().command
        else {
            panic!()
        };
        assert_eq!(c.format, OutputFormat::Json);
        assert!(
            matches!(c.resource, CtlResource::Silences(SilencesCmd::Create(ref s)) if s.check.as_deref() == Some("cpu"))
        );
    }

    #[test]
    fn ctl_options_may_follow_the_subcommand() {
        let argv = ["ctl", "events", "list", "--server", "http://h:1", "--token", "t", "--format", "json"];
        let Command::Ctl(c) = parse(&argv).unwrap().command else { panic!() };
        assert_eq!((c.server.as_str(), c.token.as_deref(), c.format), ("http://h:1", Some("t"), OutputFormat::Json));
    }

    #[test]
    fn up_defaults_to_the_default_subscription() {
        let Command::Up(u) = parse(&["up"]).unwrap().command else { panic!() };
        assert_eq!(u.subscriptions, vec!["default"]);
        assert!(!u.agent_name().is_empty());
    }
}
