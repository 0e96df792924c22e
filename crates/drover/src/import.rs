//! `drover import sensu DIR`: Sensu 1.x JSON config to drover TOML.
//!
//! Sensu merges every JSON fragment under its config dir into one document; so does
//! this importer (objects merge key by key, arrays are unioned, later files win for
//! scalars), so a check split across files imports the same way Sensu would run it.
//!
//! Anything without a faithful drover equivalent is dropped with a warning naming the
//! check and attribute: an import that silently loses a setting is worse than one that
//! asks for a look. The output is re-parsed with the real config loaders before anything
//! is written, so a successful import is always loadable.
//!
//! Checks go to `OUT/checks.toml`. The client and standalone checks go to
//! `OUT/agent/agent.toml`: a subdirectory, because the server loads every `*.toml`
//! directly in its config dir and an agent file there would not parse as server config.

use crate::cli::SensuImportArgs;
use drover_core::config::{AgentConfig, ServerConfig};
use drover_core::metrics::MetricFormat;
use drover_core::resource::CheckSpec;
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Sensu keys that belong to the pipeline, imported by a later issue.
const PIPELINE_KEYS: &[&str] = &["handlers", "filters", "mutators"];

/// Sensu 1.x check attributes that drover does not model.
const UNSUPPORTED_CHECK_ATTRS: &[&str] = &[
    "extension",
    "ttl_status",
    "auto_resolve",
    "force_resolve",
    "handle",
    "truncate_output",
    "truncate_output_length",
    "aggregate",
    "aggregates",
    "subdue",
    "hooks",
    "proxy_requests",
    "contacts",
    "splay",
    "splay_coverage",
];

/// Sensu 1.x filter attributes some sites set on checks; in drover they belong to filters.
const FILTER_CHECK_ATTRS: &[&str] = &["occurrences", "refresh"];

/// Sensu 1.x client attributes that drover does not model.
const UNSUPPORTED_CLIENT_ATTRS: &[&str] = &[
    "safe_mode",
    "redact",
    "signature",
    "socket",
    "http_socket",
    "registration",
    "deregistration",
    "keepalives",
    "keepalive",
];

/// Top-level entity fields a Sensu token may name as is; everything else is a label.
const ENTITY_TOKEN_FIELDS: &[&str] = &["name", "address", "subscriptions", "labels", "class", "system"];

/// The result of converting a Sensu config dir, before anything is written.
#[derive(Debug, Default)]
pub struct Converted {
    pub checks: BTreeMap<String, CheckSpec>,
    /// `standalone: true` checks, which the agent schedules itself.
    pub standalone: BTreeMap<String, CheckSpec>,
    pub client: Option<AgentConfig>,
    pub warnings: Vec<String>,
}

/// What an import did.
#[derive(Debug)]
pub struct ImportReport {
    pub checks: usize,
    pub standalone: usize,
    pub client: bool,
    pub warnings: Vec<String>,
    pub written: Vec<PathBuf>,
}

impl ImportReport {
    pub fn summary(&self) -> String {
        format!(
            "imported {} checks ({} standalone), client: {}; {} warnings",
            self.checks + self.standalone,
            self.standalone,
            if self.client { "yes" } else { "no" },
            self.warnings.len()
        )
    }
}

/// Converts `args.dir`, checks the output loads, then writes it under `args.out`.
pub fn run(args: &SensuImportArgs) -> Result<ImportReport, String> {
    let conv = convert_dir(&args.dir)?;
    let checks_path = args.out.join("checks.toml");
    let agent_path = args.out.join("agent").join("agent.toml");
    let (checks_text, agent_text) = render(&conv, &args.dir)?;
    verify(&conv, &checks_path, &checks_text, &agent_path, agent_text.as_deref())?;

    let mut targets = vec![(checks_path, checks_text)];
    if let Some(t) = agent_text {
        targets.push((agent_path, t));
    }
    for (path, _) in &targets {
        if path.exists() && !args.force {
            return Err(format!(
                "{} already exists; pass --force to replace it, or choose another --out",
                path.display()
            ));
        }
    }
    let mut written = Vec::new();
    for (path, text) in targets {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(ImportReport {
        checks: conv.checks.len(),
        standalone: conv.standalone.len(),
        client: conv.client.is_some(),
        warnings: conv.warnings,
        written,
    })
}

/// Reads and merges every `*.json` under `dir` (or `dir` itself if it is a file).
pub fn convert_dir(dir: &Path) -> Result<Converted, String> {
    let mut files = Vec::new();
    if dir.is_file() {
        files.push(dir.to_path_buf());
    } else {
        collect_json(dir, &mut files)?;
    }
    if files.is_empty() {
        return Err(format!("{}: no *.json files found", dir.display()));
    }
    files.sort();
    let mut merged = Map::new();
    for f in &files {
        let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: invalid JSON: {e}", f.display()))?;
        let Value::Object(obj) = v else {
            return Err(format!("{}: expected a JSON object at the top level", f.display()));
        };
        merge_objects(&mut merged, obj);
    }
    Ok(convert(&merged))
}

fn collect_json(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
    let rd = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in rd {
        let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        if path.is_dir() {
            collect_json(&path, out)?;
        } else if path.extension().is_some_and(|x| x == "json") {
            out.push(path);
        }
    }
    Ok(())
}

/// Sensu's deep merge: objects recursively, arrays unioned in order, scalars replaced.
fn merge_objects(into: &mut Map<String, Value>, from: Map<String, Value>) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(Value::Object(a)), Value::Object(b)) => merge_objects(a, b),
            (Some(Value::Array(a)), Value::Array(b)) => {
                for item in b {
                    if !a.contains(&item) {
                        a.push(item);
                    }
                }
            }
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// Converts one merged Sensu document.
pub fn convert(doc: &Map<String, Value>) -> Converted {
    let mut conv = Converted::default();
    for (key, value) in doc {
        match key.as_str() {
            "checks" => match value {
                Value::Object(checks) => {
                    for (name, def) in checks {
                        let Value::Object(def) = def else {
                            conv.warnings.push(format!("check {name}: definition is not an object; skipped"));
                            continue;
                        };
                        if let Some((spec, standalone)) = convert_check(name, def, &mut conv.warnings) {
                            if standalone {
                                conv.standalone.insert(name.clone(), spec);
                            } else {
                                conv.checks.insert(name.clone(), spec);
                            }
                        }
                    }
                }
                _ => conv.warnings.push("checks: not an object; skipped".into()),
            },
            "client" => match value {
                Value::Object(c) => conv.client = convert_client(c, &mut conv.warnings),
                _ => conv.warnings.push("client: not an object; skipped".into()),
            },
            k if PIPELINE_KEYS.contains(&k) => conv.warnings.push(format!("skipped: {k} (issue #3 will import them)")),
            k => conv.warnings.push(format!("skipped: {k} (no drover equivalent)")),
        }
    }
    conv
}

fn as_secs(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64().or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f.ceil() as u64)),
        _ => None,
    }
}

fn as_string_list(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::Array(items) => items.iter().map(|i| i.as_str().map(str::to_string)).collect(),
        _ => None,
    }
}

fn scalar_to_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Sensu 1.x tokens name client attributes; drover's entities keep custom attributes
/// under `labels`, flattened with `_` (see [`flatten_into_labels`]).
fn rewrite_tokens(command: &str) -> String {
    let mut out = String::with_capacity(command.len());
    let mut rest = command;
    while let Some(start) = rest.find(":::") {
        let after = &rest[start + 3..];
        let Some(end) = after.find(":::") else { break };
        let inner = &after[..end];
        let (path, default) = match inner.split_once('|') {
            Some((p, d)) => (p.trim(), Some(d)),
            None => (inner.trim(), None),
        };
        let first = path.split('.').next().unwrap_or_default();
        let new_path = if ENTITY_TOKEN_FIELDS.contains(&first) {
            path.to_string()
        } else {
            format!("labels.{}", path.replace('.', "_"))
        };
        out.push_str(&rest[..start]);
        out.push_str(":::");
        out.push_str(&new_path);
        if let Some(d) = default {
            out.push('|');
            out.push_str(d);
        }
        out.push_str(":::");
        rest = &after[end + 3..];
    }
    out.push_str(rest);
    out
}

fn metric_format(s: &str) -> Option<MetricFormat> {
    match s {
        "nagios_perfdata" => Some(MetricFormat::NagiosPerfdata),
        "graphite_plaintext" => Some(MetricFormat::GraphitePlaintext),
        "influxdb_line" => Some(MetricFormat::InfluxdbLine),
        "prometheus_text" => Some(MetricFormat::PrometheusText),
        _ => None,
    }
}

/// Returns the check and whether it is standalone, or `None` (with a warning) when it
/// cannot be imported at all.
fn convert_check(name: &str, def: &Map<String, Value>, warnings: &mut Vec<String>) -> Option<(CheckSpec, bool)> {
    let Some(command) = def.get("command").and_then(Value::as_str) else {
        let why = if def.contains_key("extension") { "is a Sensu extension check" } else { "has no `command`" };
        warnings.push(format!("check {name}: {why}; not imported"));
        return None;
    };
    let mut spec = CheckSpec::new(name, &rewrite_tokens(command));
    let standalone = def.get("standalone").and_then(Value::as_bool).unwrap_or(false);
    let mut handlers: Vec<String> = Vec::new();
    let mut warn = |attr: &str, msg: String| warnings.push(format!("check {name}: `{attr}` {msg}"));

    for (attr, v) in def {
        let bad_type = |expected: &str| format!("must be {expected}, got {}; dropped", kind_of(v));
        match attr.as_str() {
            "command" | "name" | "standalone" => {}
            "subscribers" => match as_string_list(v) {
                Some(subs) => {
                    let mut rr = 0;
                    for s in &subs {
                        let mapped = if let Some(r) = s.strip_prefix("roundrobin:") {
                            rr += 1;
                            r.to_string()
                        } else if let Some(c) = s.strip_prefix("client:") {
                            // Sensu's per-client subscription is `entity:NAME` in drover.
                            format!("entity:{c}")
                        } else {
                            s.clone()
                        };
                        if !spec.subscriptions.contains(&mapped) {
                            spec.subscriptions.push(mapped);
                        }
                    }
                    if rr > 0 {
                        spec.round_robin = true;
                        if rr < subs.len() {
                            warn(
                                attr,
                                "mixes round-robin and broadcast subscribers; drover rotates over all of them".into(),
                            );
                        }
                    }
                }
                None => warn(attr, bad_type("an array of strings")),
            },
            "interval" => match as_secs(v) {
                Some(s) => spec.interval_secs = Some(s),
                None => warn(attr, bad_type("a number of seconds")),
            },
            "cron" => match v.as_str() {
                Some(c) => spec.cron = Some(c.to_string()),
                None => warn(attr, bad_type("a string")),
            },
            "timeout" => match as_secs(v) {
                Some(s) => spec.timeout_secs = s,
                None => warn(attr, bad_type("a number of seconds")),
            },
            "ttl" => match as_secs(v) {
                Some(s) => spec.ttl_secs = Some(s),
                None => warn(attr, bad_type("a number of seconds")),
            },
            "handlers" => match as_string_list(v) {
                Some(hs) => handlers.extend(hs),
                None => warn(attr, bad_type("an array of strings")),
            },
            "handler" => match v.as_str() {
                Some(h) => handlers.push(h.to_string()),
                None => warn(attr, bad_type("a string")),
            },
            "source" => match v.as_str() {
                Some(s) => spec.proxy_entity_name = Some(s.to_string()),
                None => warn(attr, bad_type("a string")),
            },
            "low_flap_threshold" | "high_flap_threshold" => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
                Some(n) if attr == "low_flap_threshold" => spec.low_flap_threshold = Some(n),
                Some(n) => spec.high_flap_threshold = Some(n),
                None => warn(attr, bad_type("a whole percentage")),
            },
            "publish" => match v.as_bool() {
                Some(b) => spec.publish = b,
                None => warn(attr, bad_type("a bool")),
            },
            "stdin" => match v.as_bool() {
                Some(b) => spec.stdin = b,
                None => warn(attr, bad_type("a bool")),
            },
            "type" => match v.as_str() {
                Some("metric") => {
                    spec.labels.insert("type".into(), "metric".into());
                }
                Some("standard") => {}
                _ => warn(attr, format!("{v} is not `standard` or `metric`; dropped")),
            },
            "output_format" | "output_metric_format" => match v.as_str().and_then(metric_format) {
                Some(f) => spec.output_metric_format = Some(f),
                None => warn(
                    attr,
                    format!(
                        "{v} is not one of nagios_perfdata, graphite_plaintext, influxdb_line, prometheus_text; dropped"
                    ),
                ),
            },
            a if UNSUPPORTED_CHECK_ATTRS.contains(&a) => warn(attr, "has no drover equivalent; dropped".into()),
            a if FILTER_CHECK_ATTRS.contains(&a) => match scalar_to_string(v) {
                Some(s) => {
                    spec.labels.insert(a.to_string(), s);
                    warn(attr, "is a filter setting in drover; kept as a label for the handler's filter".into());
                }
                None => warn(attr, bad_type("a scalar")),
            },
            a => match scalar_to_string(v) {
                Some(s) => {
                    spec.labels.insert(a.to_string(), s);
                }
                None => warn(attr, format!("is {}; drover labels are strings only; dropped", kind_of(v))),
            },
        }
    }
    for h in handlers {
        if !spec.handlers.contains(&h) {
            spec.handlers.push(h);
        }
    }

    if standalone {
        if !spec.subscriptions.is_empty() {
            warn("subscribers", "ignored: a standalone check runs on the agent that defines it".into());
            spec.subscriptions.clear();
            spec.round_robin = false;
        }
        if spec.interval_secs.is_none() && spec.cron.is_none() {
            warnings.push(format!("check {name}: standalone check needs `interval` or `cron`; not imported"));
            return None;
        }
    }
    if let Err(e) = spec.validate() {
        warnings.push(format!("check {name}: not imported: {e}"));
        return None;
    }
    Some((spec, standalone))
}

/// Nested objects of scalars become `parent_child` labels, which is what
/// [`rewrite_tokens`] turns `:::parent.child:::` into.
fn flatten_into_labels(prefix: &str, v: &Value, labels: &mut BTreeMap<String, String>, warnings: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                flatten_into_labels(&format!("{prefix}_{k}"), child, labels, warnings);
            }
        }
        other => match scalar_to_string(other) {
            Some(s) => {
                labels.insert(prefix.to_string(), s);
            }
            None => warnings.push(format!(
                "client: `{}` is {}; drover labels are strings only; dropped",
                prefix.replace('_', "."),
                kind_of(other)
            )),
        },
    }
}

fn convert_client(c: &Map<String, Value>, warnings: &mut Vec<String>) -> Option<AgentConfig> {
    let mut cfg = AgentConfig::default();
    for (attr, v) in c {
        let mut warn = |msg: String| warnings.push(format!("client: `{attr}` {msg}"));
        match attr.as_str() {
            "name" => match v.as_str() {
                Some(n) => cfg.name = Some(n.to_string()),
                None => warn(format!("must be a string, got {}; dropped", kind_of(v))),
            },
            "address" => match v.as_str() {
                Some(a) => cfg.address = Some(a.to_string()),
                None => warn(format!("must be a string, got {}; dropped", kind_of(v))),
            },
            "subscriptions" => match as_string_list(v) {
                Some(subs) => {
                    for s in subs {
                        // `client:NAME` is implicit in drover (as `entity:NAME`).
                        if s.starts_with("client:") {
                            continue;
                        }
                        let s = s.strip_prefix("roundrobin:").map(str::to_string).unwrap_or(s);
                        if !cfg.subscriptions.contains(&s) {
                            cfg.subscriptions.push(s);
                        }
                    }
                }
                None => warn(format!("must be an array of strings, got {}; dropped", kind_of(v))),
            },
            "deregister" => match v.as_bool() {
                Some(b) => cfg.deregister = b,
                None => warn(format!("must be a bool, got {}; dropped", kind_of(v))),
            },
            "keepalive" => convert_keepalive(v, &mut cfg, warnings),
            a if UNSUPPORTED_CLIENT_ATTRS.contains(&a) => warn("has no drover equivalent; dropped".into()),
            _ => flatten_into_labels(attr, v, &mut cfg.labels, warnings),
        }
    }
    if let Err(e) = cfg.validate() {
        warnings.push(format!("client: not imported: {e}"));
        return None;
    }
    if let (Some(w), Some(c)) = (cfg.keepalive_warning_secs, cfg.keepalive_critical_secs)
        && c < w
    {
        warnings.push(format!("client: keepalive critical threshold {c} is below warning {w}; thresholds dropped"));
        cfg.keepalive_warning_secs = None;
        cfg.keepalive_critical_secs = None;
    }
    Some(cfg)
}

fn convert_keepalive(v: &Value, cfg: &mut AgentConfig, warnings: &mut Vec<String>) {
    let Value::Object(k) = v else {
        warnings.push(format!("client: `keepalive` must be an object, got {}; dropped", kind_of(v)));
        return;
    };
    for (attr, v) in k {
        match attr.as_str() {
            "thresholds" => {
                let Value::Object(t) = v else {
                    warnings.push("client: `keepalive.thresholds` must be an object; dropped".into());
                    continue;
                };
                for (level, secs) in t {
                    match (level.as_str(), as_secs(secs)) {
                        ("warning", Some(s)) => cfg.keepalive_warning_secs = Some(s),
                        ("critical", Some(s)) => cfg.keepalive_critical_secs = Some(s),
                        _ => warnings.push(format!("client: `keepalive.thresholds.{level}` is not understood; dropped")),
                    }
                }
            }
            "handler" | "handlers" => warnings.push(format!(
                "client: `keepalive.{attr}` ignored: keepalive handlers are set per server ([server] keepalive_handlers)"
            )),
            other => warnings.push(format!("client: `keepalive.{other}` has no drover equivalent; dropped")),
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}
fn is_true(b: &bool) -> bool {
    *b
}
fn is_default_timeout(t: &u64) -> bool {
    *t == CheckSpec::new("", "").timeout_secs
}

/// The TOML shape of a check, in `CheckSpec` field order, leaving out defaults so the
/// generated file shows only what the Sensu definition said.
#[derive(Serialize)]
struct CheckOut<'a> {
    command: &'a str,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    subscriptions: &'a [String],
    #[serde(skip_serializing_if = "is_false")]
    round_robin: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    interval_secs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cron: Option<&'a str>,
    #[serde(skip_serializing_if = "is_default_timeout")]
    timeout_secs: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl_secs: Option<u64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    handlers: &'a [String],
    #[serde(skip_serializing_if = "is_true")]
    publish: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    proxy_entity_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    low_flap_threshold: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    high_flap_threshold: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_metric_format: Option<MetricFormat>,
    #[serde(skip_serializing_if = "is_false")]
    stdin: bool,
    // Last: a table must follow the plain keys in TOML.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    labels: &'a BTreeMap<String, String>,
}

impl<'a> From<&'a CheckSpec> for CheckOut<'a> {
    fn from(c: &'a CheckSpec) -> Self {
        CheckOut {
            command: &c.command,
            subscriptions: &c.subscriptions,
            round_robin: c.round_robin,
            interval_secs: c.interval_secs,
            cron: c.cron.as_deref(),
            timeout_secs: c.timeout_secs,
            ttl_secs: c.ttl_secs,
            handlers: &c.handlers,
            publish: c.publish,
            proxy_entity_name: c.proxy_entity_name.as_deref(),
            low_flap_threshold: c.low_flap_threshold,
            high_flap_threshold: c.high_flap_threshold,
            output_metric_format: c.output_metric_format,
            stdin: c.stdin,
            labels: &c.labels,
        }
    }
}

#[derive(Serialize)]
struct ServerOut<'a> {
    checks: BTreeMap<&'a str, CheckOut<'a>>,
}

#[derive(Serialize)]
struct AgentOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    address: Option<&'a str>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    subscriptions: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    keepalive_warning_secs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    keepalive_critical_secs: Option<u64>,
    #[serde(skip_serializing_if = "is_false")]
    deregister: bool,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    labels: &'a BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    checks: BTreeMap<&'a str, CheckOut<'a>>,
}

/// The text of `checks.toml`, and of `agent.toml` when there is a client or a
/// standalone check.
pub fn render(conv: &Converted, source: &Path) -> Result<(String, Option<String>), String> {
    let header = format!("# Generated by `drover import sensu {}`.\n", source.display());
    let server = ServerOut { checks: conv.checks.iter().map(|(n, c)| (n.as_str(), CheckOut::from(c))).collect() };
    let body = toml::to_string(&server).map_err(|e| format!("cannot render checks.toml: {e}"))?;
    let checks_text = format!("{header}\n{body}");

    if conv.client.is_none() && conv.standalone.is_empty() {
        return Ok((checks_text, None));
    }
    let empty = AgentConfig::default();
    let client = conv.client.as_ref().unwrap_or(&empty);
    let agent = AgentOut {
        name: client.name.as_deref(),
        address: client.address.as_deref(),
        subscriptions: &client.subscriptions,
        keepalive_warning_secs: client.keepalive_warning_secs,
        keepalive_critical_secs: client.keepalive_critical_secs,
        deregister: client.deregister,
        labels: &client.labels,
        checks: conv.standalone.iter().map(|(n, c)| (n.as_str(), CheckOut::from(c))).collect(),
    };
    let body = toml::to_string(&agent).map_err(|e| format!("cannot render agent.toml: {e}"))?;
    let agent_text =
        format!("{header}# The server URL and token come from `server`/`token` here or --server/--token.\n\n{body}");
    Ok((checks_text, Some(agent_text)))
}

/// Loads the generated text with the real loaders and compares it with what was meant,
/// so a mistake in rendering cannot produce a file that loads differently.
fn verify(
    conv: &Converted,
    checks_path: &Path,
    checks_text: &str,
    agent_path: &Path,
    agent_text: Option<&str>,
) -> Result<(), String> {
    let loud = |what: &Path, e: String| format!("bug: generated {} does not load: {e}", what.display());
    let parsed = ServerConfig::parse_file(checks_path, checks_text).map_err(|e| loud(checks_path, e.to_string()))?;
    if parsed.checks != conv.checks {
        return Err(loud(checks_path, "checks differ from the converted ones after a round trip".into()));
    }
    if let Some(text) = agent_text {
        let parsed = AgentConfig::parse(agent_path, text).map_err(|e| loud(agent_path, e.to_string()))?;
        if parsed.checks != conv.standalone {
            return Err(loud(agent_path, "local checks differ from the converted ones after a round trip".into()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPU: &str = r#"{"checks":{"check_cpu":{"command":"check-cpu.rb -w 80 -c 90","subscribers":["base"],"interval":60,"handlers":["mail"],"occurrences":3}}}"#;

    fn import(files: &[(&str, &str)]) -> (tempfile::TempDir, Result<ImportReport, String>) {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("conf.d");
        for (name, text) in files {
            let p = src.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        let args = SensuImportArgs { dir: src, out: d.path().join("out"), force: false };
        let r = run(&args);
        (d, r)
    }

    fn checks_of(d: &tempfile::TempDir) -> BTreeMap<String, CheckSpec> {
        ServerConfig::load_dir(&d.path().join("out")).unwrap().checks
    }

    #[test]
    fn plain_check_maps_fields_and_filter_attrs_become_labels_with_warning() {
        let (d, r) = import(&[("checks/cpu.json", CPU)]);
        let r = r.unwrap();
        let c = &checks_of(&d)["check_cpu"];
        assert_eq!(c.command, "check-cpu.rb -w 80 -c 90");
        assert_eq!(c.subscriptions, vec!["base"]);
        assert_eq!(c.interval_secs, Some(60));
        assert_eq!(c.handlers, vec!["mail"]);
        assert_eq!(c.labels["occurrences"], "3");
        assert!(r.warnings.iter().any(|w| w.contains("check_cpu") && w.contains("occurrences")), "{:?}", r.warnings);
        assert_eq!(r.summary(), "imported 1 checks (0 standalone), client: no; 1 warnings");
        assert!(!d.path().join("out/agent/agent.toml").exists());
    }

    #[test]
    fn roundrobin_subscriber_becomes_subscription_with_round_robin() {
        let (d, r) = import(&[(
            "a.json",
            r#"{"checks":{"web":{"command":"check-http","subscribers":["roundrobin:web"],"interval":30}}}"#,
        )]);
        r.unwrap();
        let c = &checks_of(&d)["web"];
        assert_eq!(c.subscriptions, vec!["web"]);
        assert!(c.round_robin);
    }

    #[test]
    fn handler_string_and_handlers_array_both_become_handlers() {
        let (d, r) = import(&[(
            "a.json",
            r#"{"checks":{"a":{"command":"x","subscribers":["s"],"interval":10,"handler":"pager"},
                          "b":{"command":"y","subscribers":["s"],"interval":10,"handlers":["mail","slack"]}}}"#,
        )]);
        r.unwrap();
        let checks = checks_of(&d);
        assert_eq!(checks["a"].handlers, vec!["pager"]);
        assert_eq!(checks["b"].handlers, vec!["mail", "slack"]);
    }

    #[test]
    fn standalone_check_and_client_go_to_the_agent_file() {
        let (d, r) = import(&[
            (
                "checks.json",
                r#"{"checks":{"disk":{"command":"check-disk -w :::disk.warning|80:::","standalone":true,"interval":60}}}"#,
            ),
            (
                "client.json",
                r#"{"client":{"name":"web1","address":"10.0.0.5","subscriptions":["base","roundrobin:web","client:web1"],
                   "environment":"prod","disk":{"warning":85},"deregister":true,
                   "keepalive":{"thresholds":{"warning":60,"critical":120},"handlers":["pager"]}}}"#,
            ),
        ]);
        let r = r.unwrap();
        assert_eq!(r.summary(), "imported 1 checks (1 standalone), client: yes; 1 warnings");
        assert!(checks_of(&d).is_empty());
        let agent = AgentConfig::load(&d.path().join("out/agent/agent.toml")).unwrap();
        assert_eq!(agent.name.as_deref(), Some("web1"));
        assert_eq!(agent.address.as_deref(), Some("10.0.0.5"));
        assert_eq!(agent.subscriptions, vec!["base", "web"]);
        assert_eq!(agent.labels["environment"], "prod");
        assert_eq!(agent.labels["disk_warning"], "85");
        assert_eq!((agent.keepalive_warning_secs, agent.keepalive_critical_secs), (Some(60), Some(120)));
        assert!(agent.deregister);
        assert_eq!(agent.checks["disk"].command, "check-disk -w :::labels.disk_warning|80:::");
        assert!(r.warnings[0].contains("keepalive.handlers"), "{:?}", r.warnings);
    }

    #[test]
    fn custom_scalar_attributes_become_labels_and_metric_type_is_kept() {
        let (d, r) = import(&[(
            "a.json",
            r#"{"checks":{"m":{"command":"metrics-cpu.rb","subscribers":["s"],"interval":10,"type":"metric",
                 "output_format":"graphite_plaintext","team":"ops","priority":2,"paging":false}}}"#,
        )]);
        assert_eq!(r.unwrap().warnings, Vec::<String>::new());
        let c = &checks_of(&d)["m"];
        assert_eq!(c.labels["type"], "metric");
        assert_eq!(c.labels["team"], "ops");
        assert_eq!(c.labels["priority"], "2");
        assert_eq!(c.labels["paging"], "false");
        assert_eq!(c.output_metric_format, Some(MetricFormat::GraphitePlaintext));
    }

    #[test]
    fn nested_custom_attribute_is_dropped_with_a_warning_naming_check_and_attribute() {
        let (d, r) = import(&[(
            "a.json",
            r#"{"checks":{"c":{"command":"x","subscribers":["s"],"interval":10,"thresholds":{"warn":1},"subdue":{"days":{}}}}}"#,
        )]);
        let w = r.unwrap().warnings;
        assert!(w.iter().any(|w| w.starts_with("check c: `thresholds`") && w.contains("an object")), "{w:?}");
        assert!(w.iter().any(|w| w.starts_with("check c: `subdue`")), "{w:?}");
        assert!(checks_of(&d)["c"].labels.is_empty());
    }

    #[test]
    fn other_top_level_keys_are_skipped_with_a_warning() {
        let (_d, r) = import(&[
            ("a.json", CPU),
            ("h.json", r#"{"handlers":{"mail":{"type":"pipe","command":"mail"}},"transport":{}}"#),
        ]);
        let w = r.unwrap().warnings;
        assert!(w.contains(&"skipped: handlers (issue #3 will import them)".to_string()), "{w:?}");
        assert!(w.iter().any(|w| w.starts_with("skipped: transport")), "{w:?}");
    }

    #[test]
    fn fragments_of_one_check_in_two_files_are_merged() {
        let (d, r) = import(&[
            ("a.json", r#"{"checks":{"c":{"command":"x","subscribers":["a"],"interval":10}}}"#),
            ("b.json", r#"{"checks":{"c":{"subscribers":["b"],"interval":20}}}"#),
        ]);
        r.unwrap();
        let c = &checks_of(&d)["c"];
        assert_eq!(c.subscriptions, vec!["a", "b"]);
        assert_eq!(c.interval_secs, Some(20));
    }

    #[test]
    fn check_that_drover_would_refuse_is_skipped_with_the_reason() {
        let (d, r) = import(&[
            ("a.json", CPU),
            ("b.json", r#"{"checks":{"late":{"command":"x","subscribers":["s"],"interval":60,"ttl":30}}}"#),
        ]);
        let w = r.unwrap().warnings;
        assert!(w.iter().any(|w| w.starts_with("check late: not imported") && w.contains("ttl_secs")), "{w:?}");
        assert!(!checks_of(&d).contains_key("late"));
    }

    #[test]
    fn generated_toml_reloads_to_the_same_checks() {
        let doc: Value = serde_json::from_str(
            r#"{"checks":{"a":{"command":"x \"quoted\"","subscribers":["roundrobin:s"],"cron":"*/5 * * * *","timeout":30,
                 "ttl":900,"publish":false,"source":"router1","low_flap_threshold":20,"high_flap_threshold":60,"stdin":true,
                 "weird key":"v"}}}"#,
        )
        .unwrap();
        let conv = convert(doc.as_object().unwrap());
        assert!(conv.warnings.is_empty(), "{:?}", conv.warnings);
        let (text, agent) = render(&conv, Path::new("conf.d")).unwrap();
        assert!(agent.is_none());
        let parsed = ServerConfig::parse_file(Path::new("checks.toml"), &text).unwrap();
        assert_eq!(parsed.checks, conv.checks, "{text}");
        assert!(!text.contains("splay"), "defaults are left out:\n{text}");
    }

    #[test]
    fn existing_output_is_not_overwritten() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("a.json");
        std::fs::write(&src, CPU).unwrap();
        let out = d.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("checks.toml"), "# mine\n").unwrap();
        let e = run(&SensuImportArgs { dir: src, out: out.clone(), force: false }).unwrap_err();
        assert!(e.contains("already exists"), "{e}");
        assert_eq!(std::fs::read_to_string(out.join("checks.toml")).unwrap(), "# mine\n");
    }

    #[test]
    fn invalid_json_names_the_file() {
        let (_d, r) = import(&[("bad.json", "{\"checks\": ")]);
        let e = r.unwrap_err();
        assert!(e.contains("bad.json: invalid JSON"), "{e}");
    }
}
