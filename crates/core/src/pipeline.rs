//! Event pipeline resources: `[handlers.NAME]`, `[filters.NAME]`, `[mutators.NAME]` and
//! `[aggregates.NAME]`. The `drover-pipeline` crate runs them; this module only says
//! what a valid definition is, so `check-config`, the API and the server agree.
//!
//! Handlers are one flat struct with a `type` rather than a tagged enum: serde's
//! internally tagged enums buffer the table and lose field spans, and every error here
//! should point at its line.

use crate::resource::{FieldError, validate_name};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Filters every config can name without defining them.
pub const BUILTIN_FILTERS: &[&str] = &["is_incident", "not_silenced", "has_metrics"];
/// Mutators every config can name without defining them. `json` is also the default.
pub const BUILTIN_MUTATORS: &[&str] = &["json", "only_check_output"];

fn default_handler_timeout_secs() -> u64 {
    10
}
fn default_max_attempts() -> u32 {
    5
}
fn default_retry_initial_ms() -> u64 {
    1000
}
fn default_max_concurrent() -> usize {
    4
}
fn default_mutator_timeout_secs() -> u64 {
    10
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HandlerType {
    /// Runs `command` with the (mutated) event on stdin.
    Pipe,
    /// Writes the payload to a TCP connection to `address`, then closes it.
    Tcp,
    /// Sends the payload as one datagram to `address`.
    Udp,
    /// POSTs the payload (or `body_template`) to `url` with `headers`.
    Http,
    /// Sends an email through the SMTP server at `address`.
    Smtp,
    /// A named group of `handlers`.
    Set,
    /// Sends the event's metric points to `address` in Graphite plaintext over TCP.
    Graphite,
    /// POSTs the event's metric points to `url` in InfluxDB line protocol.
    Influxdb,
}

impl HandlerType {
    pub fn as_str(self) -> &'static str {
        match self {
            HandlerType::Pipe => "pipe",
            HandlerType::Tcp => "tcp",
            HandlerType::Udp => "udp",
            HandlerType::Http => "http",
            HandlerType::Smtp => "smtp",
            HandlerType::Set => "set",
            HandlerType::Graphite => "graphite",
            HandlerType::Influxdb => "influxdb",
        }
    }
}

/// How the SMTP handler secures its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SmtpTls {
    /// Plain SMTP; only sensible towards a relay on the same host.
    None,
    /// Upgrade with STARTTLS and refuse to continue without it (port 587).
    #[default]
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
}

/// `[handlers.NAME]`: where an event goes. Which fields apply depends on `type`; a field
/// that does not apply is refused rather than ignored, so a typo cannot pass silently.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerSpec {
    /// Filled from the table key.
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type")]
    pub kind: HandlerType,
    /// Built-in or `[filters.NAME]` names; every one must let the event through.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<String>,
    /// Built-in or `[mutators.NAME]`; the event JSON when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutator: Option<String>,
    /// One delivery attempt (process run, connection, request) is abandoned after this.
    #[serde(default = "default_handler_timeout_secs")]
    pub timeout_secs: u64,
    /// Attempts before the event goes to the dead-letter list; 1 means no retry.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Wait before the first retry; doubled for each further one (capped at 60 s).
    #[serde(default = "default_retry_initial_ms")]
    pub retry_initial_ms: u64,
    /// Deliveries of this handler in flight at once (processes for `pipe`).
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: usize,
    /// `pipe`: a shell command (`sh -c`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// `tcp`, `udp`, `graphite`, `smtp`: `host:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// `http`, `influxdb`: the full URL (for InfluxDB including `/write?db=..` or
    /// `/api/v2/write?org=..&bucket=..`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `http`, `influxdb`: extra request headers (e.g. `Authorization`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// `http`: the request body, `{{ .check.output }}` tokens replaced (JSON-escaped);
    /// `smtp`: the mail body. The mutated event when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_template: Option<String>,
    /// `smtp`: the subject line, with tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_template: Option<String>,
    /// `smtp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<SmtpTls>,
    /// `smtp`: PEM file of CA certificates to trust besides the public roots, for a
    /// relay with a certificate from a private CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// `smtp`: AUTH user; set `password` or `password_env` with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// `smtp`: name of an environment variable holding the password, so it need not be
    /// written in the config directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// `smtp`: sender address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// `smtp`: recipients.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<String>,
    /// `graphite`: prepended to every metric path (e.g. `drover`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// `set`: member handlers (sets may nest; cycles are refused).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub handlers: Vec<String>,
}

impl HandlerSpec {
    pub fn validate(&self) -> Result<(), FieldError> {
        use HandlerType::*;
        validate_name("name", &self.name)?;
        let k = self.kind;
        // (field, is set, types it applies to)
        let specific: [(&str, bool, &[HandlerType]); 15] = [
            ("command", self.command.is_some(), &[Pipe]),
            ("address", self.address.is_some(), &[Tcp, Udp, Graphite, Smtp]),
            ("url", self.url.is_some(), &[Http, Influxdb]),
            ("headers", !self.headers.is_empty(), &[Http, Influxdb]),
            ("body_template", self.body_template.is_some(), &[Http, Smtp]),
            ("subject_template", self.subject_template.is_some(), &[Smtp]),
            ("tls", self.tls.is_some(), &[Smtp]),
            ("ca_file", self.ca_file.is_some(), &[Smtp]),
            ("username", self.username.is_some(), &[Smtp]),
            ("password", self.password.is_some(), &[Smtp]),
            ("password_env", self.password_env.is_some(), &[Smtp]),
            ("from", self.from.is_some(), &[Smtp]),
            ("to", !self.to.is_empty(), &[Smtp]),
            ("prefix", self.prefix.is_some(), &[Graphite]),
            ("handlers", !self.handlers.is_empty(), &[Set]),
        ];
        for (field, set, applies) in specific {
            if set && !applies.contains(&k) {
                return Err(FieldError::new(field, format!("does not apply to type = \"{}\"", k.as_str())));
            }
        }
        let need = |field: &str, ok: bool| {
            if ok { Ok(()) } else { Err(FieldError::new(field, format!("is required for type = \"{}\"", k.as_str()))) }
        };
        match k {
            Pipe => need("command", self.command.as_deref().is_some_and(|c| !c.trim().is_empty()))?,
            Tcp | Udp | Graphite => need("address", self.address.is_some())?,
            Http | Influxdb => need("url", self.url.is_some())?,
            Smtp => {
                need("address", self.address.is_some())?;
                need("from", self.from.is_some())?;
                need("to", !self.to.is_empty())?;
                if self.username.is_some() != (self.password.is_some() || self.password_env.is_some()) {
                    return Err(FieldError::new("username", "give `username` with `password` or `password_env`"));
                }
                if self.ca_file.is_some() && self.tls == Some(SmtpTls::None) {
                    return Err(FieldError::new("ca_file", "needs tls = \"starttls\" or \"tls\""));
                }
                if self.password.is_some() && self.password_env.is_some() {
                    return Err(FieldError::new("password_env", "give either `password` or `password_env`"));
                }
            }
            Set => {
                need("handlers", !self.handlers.is_empty())?;
                for (field, set) in [("filters", !self.filters.is_empty()), ("mutator", self.mutator.is_some())] {
                    if set {
                        return Err(FieldError::new(
                            field,
                            "a set has no filters or mutator of its own; its members do",
                        ));
                    }
                }
            }
        }
        if let Some(a) = &self.address {
            validate_address("address", a)?;
        }
        if let Some(u) = &self.url
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            return Err(FieldError::new("url", format!("`{u}` must start with http:// or https://")));
        }
        if self.timeout_secs == 0 {
            return Err(FieldError::new("timeout_secs", "must be at least 1"));
        }
        if self.max_attempts == 0 {
            return Err(FieldError::new("max_attempts", "must be at least 1 (1 means no retry)"));
        }
        if self.max_concurrent == 0 {
            return Err(FieldError::new("max_concurrent", "must be at least 1"));
        }
        for f in &self.filters {
            validate_name("filters", f)?;
        }
        for h in &self.handlers {
            validate_name("handlers", h)?;
        }
        Ok(())
    }
}

fn validate_address(field: &str, a: &str) -> Result<(), FieldError> {
    match a.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => Ok(()),
        _ => Err(FieldError::new(field, format!("`{a}` must be host:port"))),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FilterAction {
    /// Handle only events the filter matches.
    #[default]
    Allow,
    /// Handle only events the filter does not match.
    Deny,
}

/// One window of a filter's `when`: on `days` (all days when empty), from `begin` to
/// `end` (`HH:MM`, local to the filter's `time_zone`). `end` before `begin` runs past
/// midnight into the next day; `begin == end` is the whole day.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeWindow {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub days: Vec<String>,
    pub begin: String,
    pub end: String,
}

/// Parses `mon`..`sun` (or full English names) to 0 = Monday .. 6 = Sunday.
pub fn parse_weekday(s: &str) -> Option<u32> {
    const DAYS: [&str; 7] = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"];
    let s = s.to_ascii_lowercase();
    DAYS.iter().position(|d| *d == s || (s.len() == 3 && d.starts_with(&s))).map(|i| i as u32)
}

/// Parses `HH:MM` (00:00..=24:00) to minutes after midnight.
pub fn parse_hhmm(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    let total = h * 60 + m;
    (m < 60 && total <= 24 * 60).then_some(total)
}

impl TimeWindow {
    pub fn validate(&self) -> Result<(), FieldError> {
        for d in &self.days {
            if parse_weekday(d).is_none() {
                return Err(FieldError::new("days", format!("`{d}` is not a day (mon, tue, .. sun)")));
            }
        }
        for (field, v) in [("begin", &self.begin), ("end", &self.end)] {
            if parse_hhmm(v).is_none() {
                return Err(FieldError::new(field, format!("`{v}` must be HH:MM, 00:00 to 24:00")));
            }
        }
        Ok(())
    }
}

/// `[filters.NAME]`: decides whether a handler handles an event. The filter *matches*
/// when every expression is true, the occurrence throttle (if set) says "alert now", and
/// the current time is in one of the `when` windows (if any). `action` then says
/// whether a match lets the event through (`allow`) or stops it (`deny`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterSpec {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub action: FilterAction,
    /// CEL expressions over `event` (see the drover-pipeline docs for its shape).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expressions: Vec<String>,
    /// Sensu's fatigue check: alert at the N-th consecutive occurrence, …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occurrences: Option<u64>,
    /// … then again every `refresh_secs` while it lasts; resolutions only of incidents
    /// that were alerted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<TimeWindow>,
    /// IANA name for `when`, e.g. `Europe/Berlin`; UTC when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
}

impl FilterSpec {
    pub fn validate(&self) -> Result<(), FieldError> {
        validate_name("name", &self.name)?;
        if BUILTIN_FILTERS.contains(&self.name.as_str()) {
            return Err(FieldError::new("name", format!("`{}` is a built-in filter", self.name)));
        }
        if self.expressions.is_empty() && self.occurrences.is_none() && self.when.is_empty() {
            return Err(FieldError::new("expressions", "a filter needs `expressions`, `occurrences` or `when`"));
        }
        if self.expressions.iter().any(|e| e.trim().is_empty()) {
            return Err(FieldError::new("expressions", "an expression must not be empty"));
        }
        if self.occurrences == Some(0) {
            return Err(FieldError::new("occurrences", "must be at least 1"));
        }
        if self.refresh_secs.is_some() && self.occurrences.is_none() {
            return Err(FieldError::new("refresh_secs", "needs `occurrences`"));
        }
        if self.refresh_secs == Some(0) {
            return Err(FieldError::new("refresh_secs", "must be at least 1"));
        }
        if self.time_zone.is_some() && self.when.is_empty() {
            return Err(FieldError::new("time_zone", "only applies to `when`"));
        }
        for w in &self.when {
            w.validate().map_err(|e| FieldError::new(format!("when.{}", e.field), e.message))?;
        }
        Ok(())
    }
}

/// `[mutators.NAME]`: a command that gets the event JSON on stdin; its stdout becomes
/// the payload the handler sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MutatorSpec {
    #[serde(default)]
    pub name: String,
    pub command: String,
    #[serde(default = "default_mutator_timeout_secs")]
    pub timeout_secs: u64,
}

impl MutatorSpec {
    pub fn validate(&self) -> Result<(), FieldError> {
        validate_name("name", &self.name)?;
        if BUILTIN_MUTATORS.contains(&self.name.as_str()) {
            return Err(FieldError::new("name", format!("`{}` is a built-in mutator", self.name)));
        }
        if self.command.trim().is_empty() {
            return Err(FieldError::new("command", "must not be empty"));
        }
        if self.timeout_secs == 0 {
            return Err(FieldError::new("timeout_secs", "must be at least 1"));
        }
        Ok(())
    }
}

/// `[aggregates.NAME]`: one event (entity `aggregate:NAME`, check `NAME`) summarising
/// `check` over the entities subscribed to `subscription`. CRITICAL when the critical
/// members reach `critical_count` or `critical_percent`; WARNING when the non-OK members
/// reach `warning_count` or `warning_percent`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateSpec {
    #[serde(default)]
    pub name: String,
    pub check: String,
    pub subscription: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub critical_count: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub critical_percent: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning_count: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning_percent: Option<u8>,
    /// Handlers for the aggregate's own event.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub handlers: Vec<String>,
}

impl AggregateSpec {
    /// The entity the aggregate's event is recorded on.
    pub fn entity_name(&self) -> String {
        format!("aggregate:{}", self.name)
    }

    pub fn validate(&self) -> Result<(), FieldError> {
        validate_name("name", &self.name)?;
        validate_name("check", &self.check)?;
        validate_name("subscription", &self.subscription)?;
        validate_name("name", &self.entity_name())?;
        if self.critical_count.is_none()
            && self.critical_percent.is_none()
            && self.warning_count.is_none()
            && self.warning_percent.is_none()
        {
            return Err(FieldError::new(
                "critical_count",
                "give at least one of critical_count, critical_percent, warning_count, warning_percent",
            ));
        }
        for (field, v) in [("critical_count", self.critical_count), ("warning_count", self.warning_count)] {
            if v == Some(0) {
                return Err(FieldError::new(field, "must be at least 1"));
            }
        }
        for (field, v) in [("critical_percent", self.critical_percent), ("warning_percent", self.warning_percent)] {
            if v.is_some_and(|p| p == 0 || p > 100) {
                return Err(FieldError::new(field, "is a percentage, 1..=100"));
            }
        }
        for h in &self.handlers {
            validate_name("handlers", h)?;
        }
        Ok(())
    }
}

/// A check dependency as written in `CheckSpec::dependencies`: `check` (same entity) or
/// `entity/check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dependency {
    pub entity: Option<String>,
    pub check: String,
}

impl Dependency {
    pub fn parse(s: &str) -> Result<Dependency, FieldError> {
        let (entity, check) = match s.split_once('/') {
            Some((e, c)) => (Some(e.to_string()), c.to_string()),
            None => (None, s.to_string()),
        };
        if let Some(e) = &entity {
            validate_name("dependencies", e)?;
        }
        validate_name("dependencies", &check)?;
        Ok(Dependency { entity, check })
    }
}

/// Names that the set handlers reach from `start`, or the cycle that prevents it.
/// Returns leaf (non-set) handler names in first-seen order; unknown names are
/// returned as leaves for the caller to report.
pub fn expand_handler_sets(
    handlers: &BTreeMap<String, HandlerSpec>,
    start: &[String],
) -> Result<Vec<String>, Vec<String>> {
    fn walk(
        handlers: &BTreeMap<String, HandlerSpec>,
        name: &str,
        path: &mut Vec<String>,
        out: &mut Vec<String>,
    ) -> Result<(), Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == name) {
            let mut cycle = path[i..].to_vec();
            cycle.push(name.to_string());
            return Err(cycle);
        }
        match handlers.get(name) {
            Some(h) if h.kind == HandlerType::Set => {
                path.push(name.to_string());
                for m in &h.handlers {
                    walk(handlers, m, path, out)?;
                }
                path.pop();
            }
            _ => {
                if !out.iter().any(|o| o == name) {
                    out.push(name.to_string());
                }
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for s in start {
        walk(handlers, s, &mut Vec::new(), &mut out)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handler(toml_text: &str) -> HandlerSpec {
        let mut h: HandlerSpec = toml::from_str(toml_text).unwrap();
        h.name = "h".into();
        h
    }

    #[test]
    fn pipe_handler_needs_a_command() {
        let h = handler("type = \"pipe\"\n");
        assert_eq!(h.validate().unwrap_err().field, "command");
        handler("type = \"pipe\"\ncommand = \"cat\"\n").validate().unwrap();
    }

    #[test]
    fn field_of_another_handler_type_is_refused() {
        let h = handler("type = \"tcp\"\naddress = \"h:1\"\nurl = \"http://x\"\n");
        let e = h.validate().unwrap_err();
        assert_eq!(e.field, "url");
        assert!(e.message.contains("tcp"), "{e}");
    }

    #[test]
    fn smtp_username_without_password_is_refused() {
        let h = handler("type = \"smtp\"\naddress = \"m:25\"\nfrom = \"a@b\"\nto = [\"c@d\"]\nusername = \"u\"\n");
        assert_eq!(h.validate().unwrap_err().field, "username");
    }

    #[test]
    fn address_without_port_is_refused() {
        let h = handler("type = \"udp\"\naddress = \"localhost\"\n");
        assert_eq!(h.validate().unwrap_err().field, "address");
    }

    #[test]
    fn weekdays_and_times_parse() {
        assert_eq!(parse_weekday("Mon"), Some(0));
        assert_eq!(parse_weekday("sunday"), Some(6));
        assert_eq!(parse_weekday("mo"), None);
        assert_eq!(parse_hhmm("09:30"), Some(570));
        assert_eq!(parse_hhmm("24:00"), Some(1440));
        assert_eq!(parse_hhmm("24:01"), None);
        assert_eq!(parse_hhmm("9:30"), None);
    }

    #[test]
    fn filter_needs_something_to_match_on() {
        let f = FilterSpec {
            name: "f".into(),
            action: FilterAction::Allow,
            expressions: vec![],
            occurrences: None,
            refresh_secs: Some(60),
            when: vec![],
            time_zone: None,
        };
        assert_eq!(f.validate().unwrap_err().field, "expressions");
        let f = FilterSpec { occurrences: Some(3), ..f };
        f.validate().unwrap();
        let f = FilterSpec { name: "is_incident".into(), ..f };
        assert_eq!(f.validate().unwrap_err().field, "name");
    }

    #[test]
    fn dependency_parses_entity_and_check() {
        assert_eq!(Dependency::parse("db").unwrap(), Dependency { entity: None, check: "db".into() });
        assert_eq!(
            Dependency::parse("db1/postgres").unwrap(),
            Dependency { entity: Some("db1".into()), check: "postgres".into() }
        );
        assert!(Dependency::parse("a/b/c").is_err());
    }

    #[test]
    fn handler_set_cycles_are_reported_with_their_path() {
        let mut m = BTreeMap::new();
        for (n, members) in [("a", vec!["b"]), ("b", vec!["c", "a"])] {
            let mut h = handler("type = \"set\"\nhandlers = [\"x\"]\n");
            h.name = n.into();
            h.handlers = members.into_iter().map(String::from).collect();
            m.insert(n.to_string(), h);
        }
        let err = expand_handler_sets(&m, &["a".into()]).unwrap_err();
        assert_eq!(err, vec!["a", "b", "a"]);
        m.get_mut("b").unwrap().handlers = vec!["c".into(), "d".into(), "c".into()];
        assert_eq!(expand_handler_sets(&m, &["a".into()]).unwrap(), vec!["c", "d"]);
    }
}
