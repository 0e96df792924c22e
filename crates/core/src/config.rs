//! Configuration files: TOML, typed, validated once at load.
//!
//! Every error names the file, the line and column, and the field, e.g.
//! `conf.d/checks.toml:7:1: checks.cpu.interval_secs: must be at least 1`.
//! Parse errors come from serde (unknown fields, wrong types); validation errors are
//! located by finding the offending key's span in the same text.
//!
//! A server config directory holds any number of `*.toml` files, each with optional
//! `[server]`, `[checks.NAME]`, `[entities.NAME]`, `[silences.NAME]`, and the event
//! pipeline's `[handlers.NAME]`, `[filters.NAME]`, `[mutators.NAME]` and
//! `[aggregates.NAME]` tables; they are merged, and a name defined twice is an error
//! naming both files. References between pipeline resources (a handler's filters and
//! mutator, a set's members, an aggregate's handlers) may cross files and are checked
//! after the merge.

use crate::pipeline::{AggregateSpec, BUILTIN_FILTERS, BUILTIN_MUTATORS, FilterSpec, HandlerSpec, MutatorSpec};
use crate::resource::{CheckSpec, Entity, EntityClass, FieldError, Silence};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A config problem with its location.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}:{column}: {field}{}{message}", file.display(), if field.is_empty() { "" } else { ": " })]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    /// Dotted path of the field, e.g. `checks.cpu.interval_secs`; empty when unknown.
    pub field: String,
    pub message: String,
}

impl ConfigError {
    fn io(file: &Path, e: std::io::Error) -> ConfigError {
        ConfigError { file: file.to_path_buf(), line: 0, column: 0, field: String::new(), message: e.to_string() }
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map(|nl| before.len() - nl).unwrap_or(before.len() + 1);
    (line, column)
}

/// Parses `text` as `T`, turning serde's complaint into a located [`ConfigError`].
pub fn parse_toml<T: serde::de::DeserializeOwned>(file: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((0, 0));
        let message = e.message().to_string();
        // serde names unknown/missing fields in the message; pull the name out as the field.
        let field =
            message.split('`').nth(1).filter(|_| message.contains("field")).map(str::to_string).unwrap_or_default();
        ConfigError { file: file.to_path_buf(), line, column, field, message }
    })
}

/// Locates `path` (table keys, then the field) in the TOML text; falls back to the
/// nearest enclosing key that exists.
pub fn locate(file: &Path, text: &str, path: &[&str], message: String) -> ConfigError {
    let owned: Vec<String> = path.iter().map(|p| p.to_string()).collect();
    locate_path(file, text, &owned, message)
}

/// [`locate`] for paths through arrays too: a numeric part steps into an array of
/// tables (`[[listeners]]`) or an inline array (`backends = [...]`) when the node there
/// is one, and is an ordinary key otherwise.
pub fn locate_path(file: &Path, text: &str, path: &[String], message: String) -> ConfigError {
    enum Node<'a> {
        Item(&'a toml_edit::Item),
        Table(&'a toml_edit::Table),
        Value(&'a toml_edit::Value),
    }
    let mut span = None;
    if let Ok(doc) = toml_edit::Document::parse(text) {
        let mut node = Node::Item(doc.as_item());
        for part in path {
            let indexed = part.parse::<usize>().ok().and_then(|i| match node {
                Node::Item(it) => match (it.as_array_of_tables(), it.as_array()) {
                    (Some(a), _) => a.get(i).map(|t| (t.span(), Node::Table(t))),
                    (_, Some(a)) => a.get(i).map(|v| (v.span(), Node::Value(v))),
                    _ => None,
                },
                Node::Value(v) => v.as_array().and_then(|a| a.get(i)).map(|v| (v.span(), Node::Value(v))),
                Node::Table(_) => None,
            });
            let next = indexed.or_else(|| {
                let table: Option<&dyn toml_edit::TableLike> = match node {
                    Node::Item(it) => it.as_table_like(),
                    Node::Table(t) => Some(t),
                    Node::Value(v) => v.as_inline_table().map(|t| t as &dyn toml_edit::TableLike),
                };
                table.and_then(|t| t.get_key_value(part)).map(|(k, it)| (k.span(), Node::Item(it)))
            });
            let Some((s, n)) = next else { break };
            span = s.or(span);
            node = n;
        }
    }
    let (line, column) = span.map(|s| line_col(text, s.start)).unwrap_or((0, 0));
    ConfigError { file: file.to_path_buf(), line, column, field: path.join("."), message }
}

fn field_error(file: &Path, text: &str, prefix: &[&str], e: FieldError) -> ConfigError {
    let mut path: Vec<&str> = prefix.to_vec();
    path.extend(e.field.split('.'));
    locate(file, text, &path, e.message)
}

fn default_keepalive_warning_secs() -> u64 {
    120
}
fn default_keepalive_critical_secs() -> u64 {
    180
}
fn default_keepalive_interval_secs() -> u64 {
    20
}

/// `[server]`: control-plane settings that may also come from flags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Keepalive age that raises a WARNING, unless the agent sets its own.
    #[serde(default = "default_keepalive_warning_secs")]
    pub keepalive_warning_secs: u64,
    /// Keepalive age that raises a CRITICAL, unless the agent sets its own.
    #[serde(default = "default_keepalive_critical_secs")]
    pub keepalive_critical_secs: u64,
    /// Handlers for keepalive events when the entity names none.
    #[serde(default)]
    pub keepalive_handlers: Vec<String>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            keepalive_warning_secs: default_keepalive_warning_secs(),
            keepalive_critical_secs: default_keepalive_critical_secs(),
            keepalive_handlers: Vec::new(),
        }
    }
}

impl ServerSettings {
    fn validate(&self) -> Result<(), FieldError> {
        if self.keepalive_warning_secs == 0 {
            return Err(FieldError::new("keepalive_warning_secs", "must be at least 1"));
        }
        if self.keepalive_critical_secs < self.keepalive_warning_secs {
            return Err(FieldError::new("keepalive_critical_secs", "must not be below keepalive_warning_secs"));
        }
        Ok(())
    }
}

/// One file of a server config directory.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfigFile {
    #[serde(default)]
    pub server: Option<ServerSettings>,
    #[serde(default)]
    pub checks: BTreeMap<String, CheckSpec>,
    #[serde(default)]
    pub entities: BTreeMap<String, Entity>,
    #[serde(default)]
    pub silences: BTreeMap<String, Silence>,
    #[serde(default)]
    pub handlers: BTreeMap<String, HandlerSpec>,
    #[serde(default)]
    pub filters: BTreeMap<String, FilterSpec>,
    #[serde(default)]
    pub mutators: BTreeMap<String, MutatorSpec>,
    #[serde(default)]
    pub aggregates: BTreeMap<String, AggregateSpec>,
    #[serde(default)]
    pub databases: BTreeMap<String, crate::database::DatabaseSpec>,
}

/// A whole config directory, merged.
#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    pub server: ServerSettings,
    pub checks: BTreeMap<String, CheckSpec>,
    pub entities: BTreeMap<String, Entity>,
    pub silences: BTreeMap<String, Silence>,
    pub handlers: BTreeMap<String, HandlerSpec>,
    pub filters: BTreeMap<String, FilterSpec>,
    pub mutators: BTreeMap<String, MutatorSpec>,
    pub aggregates: BTreeMap<String, AggregateSpec>,
    pub databases: BTreeMap<String, crate::database::DatabaseSpec>,
    /// Which file each resource came from, for duplicate reports.
    pub sources: BTreeMap<String, PathBuf>,
}

impl ServerConfig {
    /// Loads every `*.toml` in `dir` (sorted, not recursive). A missing dir is empty config.
    pub fn load_dir(dir: &Path) -> Result<ServerConfig, ConfigError> {
        let mut cfg = ServerConfig::default();
        let mut files = Vec::new();
        match std::fs::read_dir(dir) {
            Ok(rd) => {
                for entry in rd {
                    let p = entry.map_err(|e| ConfigError::io(dir, e))?.path();
                    if p.extension().is_some_and(|x| x == "toml") {
                        files.push(p);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(cfg),
            Err(e) => return Err(ConfigError::io(dir, e)),
        }
        files.sort();
        let mut server_from: Option<PathBuf> = None;
        // Kept so cross-file reference errors can be located after the merge.
        let mut texts: BTreeMap<PathBuf, String> = BTreeMap::new();
        for file in files {
            let text = std::fs::read_to_string(&file).map_err(|e| ConfigError::io(&file, e))?;
            let f = Self::parse_file(&file, &text)?;
            if let Some(s) = f.server {
                if let Some(prev) = &server_from {
                    return Err(locate(
                        &file,
                        &text,
                        &["server"],
                        format!("[server] is already set in {}", prev.display()),
                    ));
                }
                server_from = Some(file.clone());
                cfg.server = s;
            }
            for (kind, names) in [
                ("checks", f.checks.keys().cloned().collect::<Vec<_>>()),
                ("entities", f.entities.keys().cloned().collect()),
                ("silences", f.silences.keys().cloned().collect()),
                ("handlers", f.handlers.keys().cloned().collect()),
                ("filters", f.filters.keys().cloned().collect()),
                ("mutators", f.mutators.keys().cloned().collect()),
                ("aggregates", f.aggregates.keys().cloned().collect()),
                ("databases", f.databases.keys().cloned().collect()),
            ] {
                for n in names {
                    let key = format!("{kind}.{n}");
                    if let Some(prev) = cfg.sources.get(&key) {
                        return Err(locate(
                            &file,
                            &text,
                            &[kind, &n],
                            format!("already defined in {}", prev.display()),
                        ));
                    }
                    cfg.sources.insert(key, file.clone());
                }
            }
            cfg.checks.extend(f.checks);
            cfg.entities.extend(f.entities);
            cfg.silences.extend(f.silences);
            cfg.handlers.extend(f.handlers);
            cfg.filters.extend(f.filters);
            cfg.mutators.extend(f.mutators);
            cfg.aggregates.extend(f.aggregates);
            cfg.databases.extend(f.databases);
            texts.insert(file, text);
        }
        cfg.check_pipeline_references().map_err(|(kind, name, e)| {
            let file = cfg.sources.get(&format!("{kind}.{name}")).cloned().unwrap_or_default();
            let text = texts.get(&file).map(String::as_str).unwrap_or_default();
            field_error(&file, text, &[kind, &name], e)
        })?;
        Ok(cfg)
    }

    /// Every name a handler, set or aggregate refers to must exist, and sets must not
    /// contain themselves. Errors say which resource (kind, name) holds the reference.
    pub fn check_pipeline_references(&self) -> Result<(), (&'static str, String, FieldError)> {
        let unknown = |what: &str, n: &str, builtins: &[&str]| {
            let mut m = format!("unknown {what} `{n}`");
            if !builtins.is_empty() {
                m.push_str(&format!(" (built-in: {})", builtins.join(", ")));
            }
            m
        };
        for (name, h) in &self.handlers {
            for f in &h.filters {
                if !BUILTIN_FILTERS.contains(&f.as_str()) && !self.filters.contains_key(f) {
                    let e = FieldError::new("filters", unknown("filter", f, BUILTIN_FILTERS));
                    return Err(("handlers", name.clone(), e));
                }
            }
            if let Some(m) = &h.mutator
                && !BUILTIN_MUTATORS.contains(&m.as_str())
                && !self.mutators.contains_key(m)
            {
                let e = FieldError::new("mutator", unknown("mutator", m, BUILTIN_MUTATORS));
                return Err(("handlers", name.clone(), e));
            }
            for member in &h.handlers {
                if !self.handlers.contains_key(member) {
                    return Err((
                        "handlers",
                        name.clone(),
                        FieldError::new("handlers", unknown("handler", member, &[])),
                    ));
                }
            }
            if let Err(cycle) = crate::pipeline::expand_handler_sets(&self.handlers, std::slice::from_ref(name)) {
                let e = FieldError::new("handlers", format!("handler sets form a cycle: {}", cycle.join(" -> ")));
                return Err(("handlers", name.clone(), e));
            }
        }
        for (name, a) in &self.aggregates {
            if self.checks.contains_key(name) {
                // The server gives an event of a defined check that check's handlers.
                let e = FieldError::new("name", format!("`{name}` is also a check; name the aggregate differently"));
                return Err(("aggregates", name.clone(), e));
            }
            for h in &a.handlers {
                if !self.handlers.contains_key(h) {
                    return Err(("aggregates", name.clone(), FieldError::new("handlers", unknown("handler", h, &[]))));
                }
            }
        }
        Ok(())
    }

    /// Parses and validates one file's text. Names come from table keys.
    pub fn parse_file(file: &Path, text: &str) -> Result<ServerConfigFile, ConfigError> {
        let mut f: ServerConfigFile = parse_toml(file, text)?;
        if let Some(s) = &f.server {
            s.validate().map_err(|e| field_error(file, text, &["server"], e))?;
        }
        for (name, c) in f.checks.iter_mut() {
            c.name = name.clone();
            c.validate().map_err(|e| field_error(file, text, &["checks", name], e))?;
        }
        for (name, e) in f.entities.iter_mut() {
            e.name = name.clone();
            // Entities declared in config have no agent: they are proxy entities.
            e.class = EntityClass::Proxy;
            e.validate().map_err(|err| field_error(file, text, &["entities", name], err))?;
        }
        for (name, s) in f.silences.iter_mut() {
            s.name = name.clone();
            s.validate().map_err(|e| field_error(file, text, &["silences", name], e))?;
        }
        for (name, h) in f.handlers.iter_mut() {
            h.name = name.clone();
            h.validate().map_err(|e| field_error(file, text, &["handlers", name], e))?;
        }
        for (name, x) in f.filters.iter_mut() {
            x.name = name.clone();
            x.validate().map_err(|e| field_error(file, text, &["filters", name], e))?;
        }
        for (name, m) in f.mutators.iter_mut() {
            m.name = name.clone();
            m.validate().map_err(|e| field_error(file, text, &["mutators", name], e))?;
        }
        for (name, a) in f.aggregates.iter_mut() {
            a.name = name.clone();
            a.validate().map_err(|e| field_error(file, text, &["aggregates", name], e))?;
        }
        for (name, d) in f.databases.iter_mut() {
            d.name = name.clone();
            crate::resource::validate_name("name", name)
                .map_err(|e| field_error(file, text, &["databases", name], e))?;
            d.validate().map_err(|e| field_error(file, text, &["databases", name], e))?;
        }
        Ok(f)
    }
}

/// `drover agent --config FILE`: everything the flags can say, plus local checks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    #[serde(default)]
    pub name: Option<String>,
    /// ws://host:port or wss://host:port (a http:// URL is accepted and converted).
    #[serde(default)]
    pub server: Option<String>,
    #[serde(default)]
    pub token: Option<String>,
    /// PEM CA certificate(s) to trust for a wss:// server, in addition to the public roots
    /// (a self-signed or private-CA server certificate).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub subscriptions: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default = "default_keepalive_interval_secs")]
    pub keepalive_interval_secs: u64,
    #[serde(default)]
    pub keepalive_warning_secs: Option<u64>,
    #[serde(default)]
    pub keepalive_critical_secs: Option<u64>,
    /// On a clean stop, remove this entity from the registry without an alert.
    #[serde(default)]
    pub deregister: bool,
    /// Loopback HTTP endpoint for scripts to POST results; empty string disables it.
    #[serde(default = "default_api_listen")]
    pub api_listen: String,
    #[serde(default = "default_max_concurrent_checks")]
    pub max_concurrent_checks: usize,
    /// stdout+stderr kept per run; the rest is replaced by a truncation marker.
    #[serde(default = "default_output_limit_bytes")]
    pub output_limit_bytes: usize,
    /// Results kept while disconnected; the oldest are dropped past this (and counted).
    #[serde(default = "default_buffer_max_results")]
    pub buffer_max_results: usize,
    /// Local (standalone) checks scheduled by the agent itself.
    #[serde(default)]
    pub checks: BTreeMap<String, CheckSpec>,
    /// The local PostgreSQL this agent probes and operates for a `[databases.*]` cluster.
    #[serde(default)]
    pub postgres: Option<crate::database::PostgresAgentConfig>,
}

fn default_api_listen() -> String {
    "127.0.0.1:3031".to_string()
}
fn default_max_concurrent_checks() -> usize {
    16
}
fn default_output_limit_bytes() -> usize {
    64 * 1024
}
fn default_buffer_max_results() -> usize {
    100_000
}

impl Default for AgentConfig {
    fn default() -> Self {
        toml::from_str("").expect("empty agent config is valid")
    }
}

impl AgentConfig {
    pub fn load(file: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| ConfigError::io(file, e))?;
        Self::parse(file, &text)
    }

    pub fn parse(file: &Path, text: &str) -> Result<AgentConfig, ConfigError> {
        let mut c: AgentConfig = parse_toml(file, text)?;
        for (name, check) in c.checks.iter_mut() {
            check.name = name.clone();
            if check.interval_secs.is_none() && check.cron.is_none() {
                return Err(locate(
                    file,
                    text,
                    &["checks", name],
                    "a local check needs `interval_secs` or `cron`".into(),
                ));
            }
            check.validate().map_err(|e| field_error(file, text, &["checks", name], e))?;
        }
        c.validate().map_err(|e| field_error(file, text, &[], e))?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), FieldError> {
        if let Some(n) = &self.name {
            crate::resource::validate_name("name", n)?;
        }
        if self.keepalive_interval_secs == 0 {
            return Err(FieldError::new("keepalive_interval_secs", "must be at least 1"));
        }
        if self.max_concurrent_checks == 0 {
            return Err(FieldError::new("max_concurrent_checks", "must be at least 1"));
        }
        if self.output_limit_bytes < 64 {
            return Err(FieldError::new("output_limit_bytes", "must be at least 64"));
        }
        for s in &self.subscriptions {
            crate::resource::validate_name("subscriptions", s)?;
        }
        if let Some(pg) = &self.postgres {
            pg.validate()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> PathBuf {
        PathBuf::from("conf.d/checks.toml")
    }

    #[test]
    fn valid_file_loads_and_names_come_from_keys() {
        let text = "[checks.cpu]\ncommand = \"check_load\"\nsubscriptions = [\"linux\"]\ninterval_secs = 10\n\n[entities.site]\naddress = \"example.org\"\n";
        let f = ServerConfig::parse_file(&p(), text).unwrap();
        assert_eq!(f.checks["cpu"].name, "cpu");
        assert_eq!(f.entities["site"].class, EntityClass::Proxy);
    }

    #[test]
    fn unknown_field_names_file_line_and_field() {
        let text = "[checks.cpu]\ncommand = \"x\"\nintervl_secs = 10\n";
        let e = ServerConfig::parse_file(&p(), text).unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        assert_eq!(e.field, "intervl_secs");
        assert!(e.to_string().starts_with("conf.d/checks.toml:3:"), "{e}");
    }

    #[test]
    fn wrong_type_names_the_line() {
        let text = "[checks.cpu]\ncommand = \"x\"\nsubscriptions = [\"a\"]\ninterval_secs = \"ten\"\n";
        let e = ServerConfig::parse_file(&p(), text).unwrap_err();
        assert_eq!(e.line, 4, "{e}");
    }

    #[test]
    fn validation_error_points_at_the_field_line() {
        let text = "# comment\n[checks.cpu]\ncommand = \"x\"\nsubscriptions = [\"a\"]\ninterval_secs = 0\n";
        let e = ServerConfig::parse_file(&p(), text).unwrap_err();
        assert_eq!((e.line, e.column), (5, 1), "{e}");
        assert_eq!(e.field, "checks.cpu.interval_secs");
        assert_eq!(e.to_string(), "conf.d/checks.toml:5:1: checks.cpu.interval_secs: must be at least 1");
    }

    #[test]
    fn duplicate_names_across_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("drover-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let c = "[checks.cpu]\ncommand = \"x\"\nsubscriptions = [\"a\"]\ninterval_secs = 5\n";
        std::fs::write(dir.join("a.toml"), c).unwrap();
        std::fs::write(dir.join("b.toml"), c).unwrap();
        let e = ServerConfig::load_dir(&dir).unwrap_err();
        assert!(e.message.contains("a.toml"), "{e}");
        assert!(e.file.ends_with("b.toml"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pipeline_resources_load_with_names_from_keys() {
        let text = "[handlers.ops]\ntype = \"set\"\nhandlers = [\"mail\"]\n\n[handlers.mail]\ntype = \"smtp\"\naddress = \"localhost:25\"\nfrom = \"drover@x\"\nto = [\"ops@x\"]\nfilters = [\"is_incident\", \"third\"]\n\n[filters.third]\noccurrences = 3\nrefresh_secs = 600\n\n[mutators.short]\ncommand = \"jq .check.output\"\n\n[aggregates.web]\ncheck = \"http\"\nsubscription = \"web\"\ncritical_percent = 30\n";
        let f = ServerConfig::parse_file(&p(), text).unwrap();
        assert_eq!(f.handlers["mail"].name, "mail");
        assert_eq!(f.filters["third"].occurrences, Some(3));
        assert_eq!(f.mutators["short"].timeout_secs, 10);
        assert_eq!(f.aggregates["web"].entity_name(), "aggregate:web");
    }

    #[test]
    fn handler_validation_error_points_at_the_field_line() {
        let text = "[handlers.hook]\ntype = \"http\"\nurl = \"ftp://x\"\n";
        let e = ServerConfig::parse_file(&p(), text).unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (3, "handlers.hook.url"), "{e}");
    }

    #[test]
    fn unknown_filter_and_set_cycles_are_refused_across_files() {
        let dir = tempdir("refs");
        std::fs::write(dir.join("a.toml"), "[handlers.a]\ntype = \"set\"\nhandlers = [\"b\"]\n").unwrap();
        std::fs::write(dir.join("b.toml"), "[handlers.b]\ntype = \"set\"\nhandlers = [\"a\"]\n").unwrap();
        let e = ServerConfig::load_dir(&dir).unwrap_err();
        assert!(e.message.contains("cycle: a -> b -> a"), "{e}");
        assert!(e.file.ends_with("a.toml") && e.line == 3, "{e}");
        std::fs::write(dir.join("b.toml"), "[handlers.b]\ntype = \"pipe\"\ncommand = \"cat\"\nfilters = [\"nope\"]\n")
            .unwrap();
        let e = ServerConfig::load_dir(&dir).unwrap_err();
        assert_eq!(e.field, "handlers.b.filters", "{e}");
        assert!(e.message.contains("unknown filter `nope`"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn duplicate_handler_across_files_is_refused() {
        let dir = tempdir("duph");
        let h = "[handlers.h]\ntype = \"udp\"\naddress = \"127.0.0.1:9\"\n";
        std::fs::write(dir.join("a.toml"), h).unwrap();
        std::fs::write(dir.join("b.toml"), h).unwrap();
        let e = ServerConfig::load_dir(&dir).unwrap_err();
        assert!(e.message.contains("a.toml") && e.file.ends_with("b.toml"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempdir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("drover-cfg-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn agent_config_defaults_and_local_checks() {
        let text = "name = \"n1\"\nsubscriptions = [\"web\"]\n[checks.local]\ncommand = \"true\"\ninterval_secs = 5\n";
        let c = AgentConfig::parse(Path::new("agent.toml"), text).unwrap();
        assert_eq!(c.keepalive_interval_secs, 20);
        assert_eq!(c.checks["local"].name, "local");
        let bad = "keepalive_interval_secs = 0\n";
        let e = AgentConfig::parse(Path::new("agent.toml"), bad).unwrap_err();
        assert_eq!(e.line, 1, "{e}");
    }
}
