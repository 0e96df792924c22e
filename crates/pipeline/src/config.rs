//! [`PipelineConfig`]: the pipeline resources of a server config plus queue sizes, and
//! their compilation (expressions, time zones, templates, mail addresses) with errors
//! located in the config files.

use crate::filter::{CompileError, CustomFilter, Filter};
use crate::template::Template;
use drover_core::config::{ConfigError, ServerConfig, locate};
use drover_core::pipeline::{AggregateSpec, FilterSpec, HandlerSpec, HandlerType, MutatorSpec, SmtpTls};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A definition that cannot be used, located in its file when it came from one.
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("Pipeline::start must run inside a tokio runtime")]
    NoRuntime,
}

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub handlers: BTreeMap<String, HandlerSpec>,
    pub filters: BTreeMap<String, FilterSpec>,
    pub mutators: BTreeMap<String, MutatorSpec>,
    pub aggregates: BTreeMap<String, AggregateSpec>,
    /// `"filters.NAME"` → file, as in [`ServerConfig::sources`]; lets errors name lines.
    pub sources: BTreeMap<String, PathBuf>,
    /// Events waiting for the dispatcher; `submit` refuses (and counts) beyond this.
    pub queue_capacity: usize,
    /// Events waiting per handler; more are dropped (and counted) for that handler only.
    pub handler_queue_capacity: usize,
    /// Dead letters kept; the oldest go first.
    pub dead_letter_capacity: usize,
    /// How often aggregates are evaluated.
    pub aggregate_interval_ms: u64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            handlers: BTreeMap::new(),
            filters: BTreeMap::new(),
            mutators: BTreeMap::new(),
            aggregates: BTreeMap::new(),
            sources: BTreeMap::new(),
            queue_capacity: 10_000,
            handler_queue_capacity: 1_000,
            dead_letter_capacity: 1_000,
            aggregate_interval_ms: 1_000,
        }
    }
}

impl PipelineConfig {
    pub fn from_server_config(cfg: &ServerConfig) -> PipelineConfig {
        PipelineConfig {
            handlers: cfg.handlers.clone(),
            filters: cfg.filters.clone(),
            mutators: cfg.mutators.clone(),
            aggregates: cfg.aggregates.clone(),
            sources: cfg.sources.clone(),
            ..Default::default()
        }
    }

    /// Everything `start` checks, without starting: for `check-config`.
    pub fn validate(&self) -> Result<(), PipelineError> {
        compile(self).map(|_| ())
    }

    fn error(&self, path: &[&str], message: String) -> PipelineError {
        let key = path.iter().take(2).copied().collect::<Vec<_>>().join(".");
        match self.sources.get(&key) {
            Some(file) => {
                let text = std::fs::read_to_string(file).unwrap_or_default();
                PipelineError::Config(locate(file, &text, path, message))
            }
            None => PipelineError::Config(ConfigError {
                file: PathBuf::from("<pipeline config>"),
                line: 0,
                column: 0,
                field: path.join("."),
                message,
            }),
        }
    }

    /// A bad expression: located at the string in the file when possible, the message
    /// pointing into the expression itself.
    fn expression_error(&self, filter: &str, e: &crate::filter::ExpressionError) -> PipelineError {
        let src = &self.filters[filter].expressions[e.index];
        let line_text = src.lines().nth(e.line.saturating_sub(1)).unwrap_or(src);
        let caret = format!("{}^", " ".repeat(e.column.saturating_sub(1)));
        let message = format!(
            "expression {} is invalid at line {}, column {}: {}\n    {line_text}\n    {caret}",
            e.index, e.line, e.column, e.message
        );
        let field = format!("filters.{filter}.expressions[{}]", e.index);
        let mut err = match self.error(&["filters", filter, "expressions"], message) {
            PipelineError::Config(c) => c,
            other => return other,
        };
        if let Some(file) = self.sources.get(&format!("filters.{filter}"))
            && let Ok(text) = std::fs::read_to_string(file)
            && let Some((line, column)) = array_element_position(&text, filter, e.index)
        {
            err.line = line;
            err.column = column;
        }
        err.field = field;
        PipelineError::Config(err)
    }
}

/// Line and column of `filters.NAME.expressions[i]` in the TOML text.
fn array_element_position(text: &str, filter: &str, index: usize) -> Option<(usize, usize)> {
    let doc = toml_edit::Document::parse(text).ok()?;
    let arr = doc.get("filters")?.get(filter)?.get("expressions")?.as_array()?;
    let span = arr.get(index)?.span()?;
    let before = &text[..span.start];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map(|nl| before.len() - nl).unwrap_or(before.len() + 1);
    Some((line, column))
}

/// A handler ready to run: its spec plus everything parsed from it once.
#[derive(Debug)]
pub struct CompiledHandler {
    pub spec: HandlerSpec,
    pub filters: Vec<Arc<Filter>>,
    pub mutator: Mutator,
    pub subject: Option<Template>,
    pub body: Option<Template>,
    pub smtp: Option<SmtpSettings>,
}

#[derive(Debug, Clone)]
pub enum Mutator {
    Json,
    OnlyCheckOutput,
    Command { name: String, command: String, timeout_secs: u64 },
}

#[derive(Debug, Clone)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    pub credentials: Option<(String, String)>,
    /// Extra trusted CA certificates (PEM), from `ca_file`.
    pub ca_pem: Option<Vec<u8>>,
    pub from: lettre::message::Mailbox,
    pub to: Vec<lettre::message::Mailbox>,
}

#[derive(Debug)]
pub struct Compiled {
    pub handlers: BTreeMap<String, Arc<CompiledHandler>>,
    pub specs: BTreeMap<String, HandlerSpec>,
}

pub fn compile(cfg: &PipelineConfig) -> Result<Compiled, PipelineError> {
    for (field, v) in [
        ("queue_capacity", cfg.queue_capacity),
        ("handler_queue_capacity", cfg.handler_queue_capacity),
        ("dead_letter_capacity", cfg.dead_letter_capacity),
    ] {
        if v == 0 {
            return Err(cfg.error(&[field], "must be at least 1".into()));
        }
    }
    let mut filters: BTreeMap<String, Arc<Filter>> = BTreeMap::new();
    for (name, spec) in &cfg.filters {
        let f = CustomFilter::compile(spec).map_err(|e| match e {
            CompileError::Expression(e) => cfg.expression_error(name, &e),
            CompileError::TimeZone(tz) => cfg.error(
                &["filters", name, "time_zone"],
                format!("unknown time zone `{tz}` (use an IANA name such as Europe/Berlin)"),
            ),
        })?;
        filters.insert(name.clone(), Arc::new(Filter::Custom(Box::new(f))));
    }
    let mut handlers = BTreeMap::new();
    for (name, spec) in &cfg.handlers {
        if let Err(cycle) = drover_core::pipeline::expand_handler_sets(&cfg.handlers, std::slice::from_ref(name)) {
            return Err(cfg
                .error(&["handlers", name, "handlers"], format!("handler sets form a cycle: {}", cycle.join(" -> "))));
        }
        for m in &spec.handlers {
            if !cfg.handlers.contains_key(m) {
                return Err(cfg.error(&["handlers", name, "handlers"], format!("unknown handler `{m}`")));
            }
        }
        let mut hf = Vec::new();
        for f in &spec.filters {
            match Filter::builtin(f).map(Arc::new).or_else(|| filters.get(f).cloned()) {
                Some(f) => hf.push(f),
                None => return Err(cfg.error(&["handlers", name, "filters"], format!("unknown filter `{f}`"))),
            }
        }
        let mutator = match spec.mutator.as_deref() {
            None | Some("json") => Mutator::Json,
            Some("only_check_output") => Mutator::OnlyCheckOutput,
            Some(m) => match cfg.mutators.get(m) {
                Some(ms) => {
                    Mutator::Command { name: m.to_string(), command: ms.command.clone(), timeout_secs: ms.timeout_secs }
                }
                None => return Err(cfg.error(&["handlers", name, "mutator"], format!("unknown mutator `{m}`"))),
            },
        };
        let template = |field: &str, t: &Option<String>| -> Result<Option<Template>, PipelineError> {
            t.as_deref()
                .map(Template::parse)
                .transpose()
                .map_err(|e| cfg.error(&["handlers", name, field], e.to_string()))
        };
        let subject = template("subject_template", &spec.subject_template)?;
        let body = template("body_template", &spec.body_template)?;
        let smtp = if spec.kind == HandlerType::Smtp { Some(smtp_settings(cfg, name, spec)?) } else { None };
        if let Some(url) = &spec.url
            && url.parse::<ureq::http::Uri>().is_err()
        {
            return Err(cfg.error(&["handlers", name, "url"], format!("`{url}` is not a valid URL")));
        }
        for (k, v) in &spec.headers {
            if ureq::http::HeaderName::from_bytes(k.as_bytes()).is_err()
                || ureq::http::HeaderValue::from_str(v).is_err()
            {
                return Err(cfg.error(&["handlers", name, "headers"], format!("`{k}: {v}` is not a valid header")));
            }
        }
        handlers.insert(
            name.clone(),
            Arc::new(CompiledHandler { spec: spec.clone(), filters: hf, mutator, subject, body, smtp }),
        );
    }
    for (name, a) in &cfg.aggregates {
        for h in &a.handlers {
            if !cfg.handlers.contains_key(h) {
                return Err(cfg.error(&["aggregates", name, "handlers"], format!("unknown handler `{h}`")));
            }
        }
    }
    Ok(Compiled { handlers, specs: cfg.handlers.clone() })
}

fn smtp_settings(cfg: &PipelineConfig, name: &str, spec: &HandlerSpec) -> Result<SmtpSettings, PipelineError> {
    let address = spec.address.clone().unwrap_or_default();
    let (host, port) = address.rsplit_once(':').unwrap_or((&address, "25"));
    let port: u16 = port.parse().map_err(|_| cfg.error(&["handlers", name, "address"], "bad port".into()))?;
    let mailbox = |field: &str, s: &str| {
        s.parse::<lettre::message::Mailbox>()
            .map_err(|e| cfg.error(&["handlers", name, field], format!("`{s}` is not a mail address: {e}")))
    };
    let from = mailbox("from", spec.from.as_deref().unwrap_or_default())?;
    let to = spec.to.iter().map(|t| mailbox("to", t)).collect::<Result<Vec<_>, _>>()?;
    let password = match (&spec.password, &spec.password_env) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(var)) => Some(std::env::var(var).map_err(|_| {
            cfg.error(&["handlers", name, "password_env"], format!("environment variable `{var}` is not set"))
        })?),
        (None, None) => None,
    };
    let ca_pem = match &spec.ca_file {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| cfg.error(&["handlers", name, "ca_file"], format!("cannot read `{path}`: {e}")))?;
            lettre::transport::smtp::client::Certificate::from_pem(&pem).map_err(|e| {
                cfg.error(&["handlers", name, "ca_file"], format!("`{path}` holds no usable PEM certificate: {e}"))
            })?;
            Some(pem)
        }
        None => None,
    };
    Ok(SmtpSettings {
        host: host.trim_start_matches('[').trim_end_matches(']').to_string(),
        port,
        tls: spec.tls.unwrap_or_default(),
        credentials: spec.username.clone().zip(password),
        ca_pem,
        from,
        to,
    })
}
