//! Declared resources. Each struct is both the TOML config shape and the API JSON shape,
//! so a resource written in a file and one POSTed to the API are the same thing.
//!
//! Field names carry their units (`interval_secs`), unknown fields are refused, and
//! [`CheckSpec::validate`] and friends run once, at load or at the API edge.

use crate::metrics::{MetricFormat, MetricPoint};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

fn default_true() -> bool {
    true
}
fn default_timeout_secs() -> u64 {
    60
}
fn default_splay_coverage() -> u8 {
    90
}

/// A validation failure: which field, and why. The config loader adds file and line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError { field: field.into(), message: message.into() }
    }
}

/// Names are used in store keys and URLs, so they are restricted to a safe alphabet.
pub fn validate_name(field: &str, name: &str) -> Result<(), FieldError> {
    if name.is_empty() || name.len() > 253 {
        return Err(FieldError::new(field, "must be 1 to 253 characters"));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@')) {
        return Err(FieldError::new(field, format!("`{name}` may contain only letters, digits and - _ . : @")));
    }
    Ok(())
}

/// A check: a command the agents of some subscriptions run on a schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    /// Filled from the table key (`[checks.NAME]`) or the API path.
    #[serde(default)]
    pub name: String,
    pub command: String,
    #[serde(default)]
    pub subscriptions: Vec<String>,
    /// Run every N seconds. Exactly one of `interval_secs` and `cron` for scheduled checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_secs: Option<u64>,
    /// A cron expression (5 or 6 fields), evaluated in UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// The whole process group is killed after this long; 0 means no limit.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// An event is raised when no result arrives for this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    #[serde(default)]
    pub handlers: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// One agent of the subscription runs each execution, in turn.
    #[serde(default)]
    pub round_robin: bool,
    /// When false the check is not scheduled; results still arrive from agents that
    /// run it themselves, or via `execute`.
    #[serde(default = "default_true")]
    pub publish: bool,
    /// Spread each run's start over `splay_coverage_percent` of the interval by entity,
    /// so thousands of agents do not fire at once.
    #[serde(default = "default_true")]
    pub splay: bool,
    #[serde(default = "default_splay_coverage")]
    pub splay_coverage_percent: u8,
    /// The result is reported for this entity instead of the agent that ran it
    /// (a website, a switch: things with no agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_entity_name: Option<String>,
    /// Run once per proxy entity matching these attributes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_requests: Option<ProxyRequests>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_flap_threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_flap_threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_metric_format: Option<MetricFormat>,
    /// Write the check request JSON to the command's stdin, as Sensu does.
    #[serde(default)]
    pub stdin: bool,
    /// Checks this one depends on: `check` (same entity) or `entity/check`. While any
    /// of them fails, this check's events are recorded but not handled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dependencies: Vec<String>,
}

/// Selects proxy entities for a proxy check: all entities of class `proxy` whose labels
/// contain every pair in `labels` (and, if given, whose names are in `names`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyRequests {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub names: Vec<String>,
}

impl ProxyRequests {
    pub fn matches(&self, e: &Entity) -> bool {
        e.class == EntityClass::Proxy
            && (self.names.is_empty() || self.names.iter().any(|n| n == &e.name))
            && self.labels.iter().all(|(k, v)| e.labels.get(k) == Some(v))
    }
}

impl CheckSpec {
    /// A minimal check for tests and the API; every other field takes its default.
    pub fn new(name: &str, command: &str) -> CheckSpec {
        CheckSpec {
            name: name.to_string(),
            command: command.to_string(),
            subscriptions: Vec::new(),
            interval_secs: None,
            cron: None,
            timeout_secs: default_timeout_secs(),
            ttl_secs: None,
            handlers: Vec::new(),
            labels: BTreeMap::new(),
            round_robin: false,
            publish: true,
            splay: true,
            splay_coverage_percent: default_splay_coverage(),
            proxy_entity_name: None,
            proxy_requests: None,
            low_flap_threshold: None,
            high_flap_threshold: None,
            output_metric_format: None,
            stdin: false,
            dependencies: Vec::new(),
        }
    }

    pub fn validate(&self) -> Result<(), FieldError> {
        validate_name("name", &self.name)?;
        if self.command.trim().is_empty() {
            return Err(FieldError::new("command", "must not be empty"));
        }
        match (self.interval_secs, &self.cron) {
            (Some(_), Some(_)) => {
                return Err(FieldError::new("cron", "give either `interval_secs` or `cron`, not both"));
            }
            (Some(0), None) => return Err(FieldError::new("interval_secs", "must be at least 1")),
            (None, None) if self.publish && !self.subscriptions.is_empty() => {
                return Err(FieldError::new("interval_secs", "a published check needs `interval_secs` or `cron`"));
            }
            (None, Some(expr)) => {
                parse_cron(expr).map_err(|m| FieldError::new("cron", m))?;
            }
            _ => {}
        }
        if self.ttl_secs == Some(0) {
            return Err(FieldError::new("ttl_secs", "must be at least 1"));
        }
        if let (Some(ttl), Some(interval)) = (self.ttl_secs, self.interval_secs)
            && ttl <= interval
        {
            return Err(FieldError::new(
                "ttl_secs",
                format!("must exceed interval_secs ({interval}), or every run would be late"),
            ));
        }
        if self.splay_coverage_percent > 100 {
            return Err(FieldError::new("splay_coverage_percent", "must be 0..=100"));
        }
        for s in &self.subscriptions {
            validate_name("subscriptions", s)?;
        }
        match (self.low_flap_threshold, self.high_flap_threshold) {
            (Some(l), Some(h)) if l >= h => {
                return Err(FieldError::new("low_flap_threshold", "must be below high_flap_threshold"));
            }
            (Some(_), None) => {
                return Err(FieldError::new("high_flap_threshold", "set both flap thresholds or neither"));
            }
            (None, Some(_)) => {
                return Err(FieldError::new("low_flap_threshold", "set both flap thresholds or neither"));
            }
            (_, Some(h)) if h > 100 => return Err(FieldError::new("high_flap_threshold", "is a percentage, 1..=100")),
            _ => {}
        }
        if self.round_robin && self.subscriptions.is_empty() {
            return Err(FieldError::new("round_robin", "needs at least one subscription to rotate over"));
        }
        for d in &self.dependencies {
            let dep = crate::pipeline::Dependency::parse(d)?;
            if dep.entity.is_none() && dep.check == self.name {
                return Err(FieldError::new("dependencies", "a check cannot depend on itself"));
            }
        }
        if self.proxy_entity_name.is_some() && self.proxy_requests.is_some() {
            return Err(FieldError::new(
                "proxy_requests",
                "give either `proxy_entity_name` or `proxy_requests`, not both",
            ));
        }
        Ok(())
    }
}

/// Parses a cron expression the way the scheduler will: 5 fields, or 6 with seconds first.
pub fn parse_cron(expr: &str) -> Result<croner::Cron, String> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .build()
        .parse(expr)
        .map_err(|e| format!("invalid cron expression `{expr}`: {e}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntityClass {
    /// Registered by a running agent.
    #[default]
    Agent,
    /// Declared for something with no agent (a website, a switch); checked by proxy checks.
    Proxy,
}

/// Facts an agent reports about its host when it connects.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SystemFacts {
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub os_version: String,
    #[serde(default)]
    pub kernel: String,
    #[serde(default)]
    pub arch: String,
    #[serde(default)]
    pub cpus: usize,
    #[serde(default)]
    pub memory_total_bytes: u64,
    #[serde(default)]
    pub agent_version: String,
}

/// A monitored thing: a node with an agent, or a declared proxy entity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entity {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub class: EntityClass,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default)]
    pub subscriptions: Vec<String>,
    /// Labels such as `zone` and `role`; substituted into commands as `{{ .labels.zone }}`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<SystemFacts>,
    /// Remove this entity without an alert when its agent stops cleanly.
    #[serde(default)]
    pub deregister: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_interval_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_warning_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_critical_secs: Option<u64>,
    /// Handlers for this entity's keepalive events (issue-level: the keepalive handler set).
    #[serde(default)]
    pub keepalive_handlers: Vec<String>,
    /// Milliseconds since the epoch of the last keepalive (set by the server).
    #[serde(default)]
    pub last_seen_ms: i64,
    /// Whether the agent holds a connection to a server right now (set by the server).
    #[serde(default)]
    pub connected: bool,
    /// The latest system metrics from a keepalive (set by the server).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<MetricPoint>,
}

impl Entity {
    pub fn new(name: &str, class: EntityClass) -> Entity {
        Entity {
            name: name.to_string(),
            class,
            address: None,
            subscriptions: Vec::new(),
            labels: BTreeMap::new(),
            system: None,
            deregister: false,
            keepalive_interval_secs: None,
            keepalive_warning_secs: None,
            keepalive_critical_secs: None,
            keepalive_handlers: Vec::new(),
            last_seen_ms: 0,
            connected: false,
            metrics: Vec::new(),
        }
    }

    /// Every entity implicitly subscribes to `entity:NAME`, so a check can target one node.
    pub fn entity_subscription(&self) -> String {
        format!("entity:{}", self.name)
    }

    pub fn is_subscribed(&self, sub: &str) -> bool {
        self.subscriptions.iter().any(|s| s == sub) || sub.strip_prefix("entity:") == Some(self.name.as_str())
    }

    pub fn validate(&self) -> Result<(), FieldError> {
        validate_name("name", &self.name)?;
        for s in &self.subscriptions {
            validate_name("subscriptions", s)?;
        }
        if let (Some(w), Some(c)) = (self.keepalive_warning_secs, self.keepalive_critical_secs)
            && c < w
        {
            return Err(FieldError::new("keepalive_critical_secs", "must not be below keepalive_warning_secs"));
        }
        if self.keepalive_interval_secs == Some(0) {
            return Err(FieldError::new("keepalive_interval_secs", "must be at least 1"));
        }
        Ok(())
    }
}

/// Suppresses handling of matching events. At least one of entity, subscription and
/// check must be set; every set one must match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Silence {
    /// Derived from the selectors when not given: `entity/subscription/check` with `*`.
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscription: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
    /// Unix seconds when the silence starts; 0 means at creation.
    #[serde(default)]
    pub begin_unix_secs: i64,
    /// Lifetime from `begin_unix_secs`; none means until removed (or resolved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_secs: Option<u64>,
    #[serde(default)]
    pub expire_on_resolve: bool,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub creator: String,
}

impl Silence {
    pub fn default_name(&self) -> String {
        let part = |o: &Option<String>| o.clone().unwrap_or_else(|| "*".to_string());
        format!("{}/{}/{}", part(&self.entity), part(&self.subscription), part(&self.check)).replace('/', ":")
    }

    pub fn validate(&self) -> Result<(), FieldError> {
        if self.entity.is_none() && self.subscription.is_none() && self.check.is_none() {
            return Err(FieldError::new("check", "a silence needs at least one of `entity`, `subscription`, `check`"));
        }
        validate_name("name", &self.name.replace('*', "_"))?;
        if self.expire_secs == Some(0) {
            return Err(FieldError::new("expire_secs", "must be at least 1 (omit it for no expiry)"));
        }
        Ok(())
    }

    pub fn expires_at_unix_secs(&self) -> Option<i64> {
        self.expire_secs.map(|e| self.begin_unix_secs + e as i64)
    }

    pub fn is_active(&self, now_secs: i64) -> bool {
        now_secs >= self.begin_unix_secs && self.expires_at_unix_secs().is_none_or(|x| now_secs < x)
    }

    pub fn is_expired(&self, now_secs: i64) -> bool {
        self.expires_at_unix_secs().is_some_and(|x| now_secs >= x)
    }

    /// Does this silence cover `check` on `entity`?
    pub fn matches(&self, entity: &Entity, check: &str) -> bool {
        self.entity.as_ref().is_none_or(|e| e == &entity.name)
            && self.subscription.as_ref().is_none_or(|s| entity.is_subscribed(s))
            && self.check.as_ref().is_none_or(|c| c == check)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check() -> CheckSpec {
        let mut c = CheckSpec::new("cpu", "check_load");
        c.subscriptions = vec!["linux".into()];
        c.interval_secs = Some(10);
        c
    }

    #[test]
    fn valid_check_passes() {
        check().validate().unwrap();
    }

    #[test]
    fn interval_and_cron_together_are_refused() {
        let mut c = check();
        c.cron = Some("* * * * *".into());
        assert_eq!(c.validate().unwrap_err().field, "cron");
    }

    #[test]
    fn bad_cron_is_refused_with_reason() {
        let mut c = check();
        c.interval_secs = None;
        c.cron = Some("every tuesday".into());
        let e = c.validate().unwrap_err();
        assert_eq!(e.field, "cron");
        assert!(e.message.contains("every tuesday"));
    }

    #[test]
    fn ttl_not_above_interval_is_refused() {
        let mut c = check();
        c.ttl_secs = Some(10);
        assert_eq!(c.validate().unwrap_err().field, "ttl_secs");
    }

    #[test]
    fn published_check_without_schedule_is_refused() {
        let mut c = check();
        c.interval_secs = None;
        assert_eq!(c.validate().unwrap_err().field, "interval_secs");
    }

    #[test]
    fn names_with_slashes_are_refused() {
        let mut c = check();
        c.name = "a/b".into();
        assert_eq!(c.validate().unwrap_err().field, "name");
    }

    #[test]
    fn dependencies_accept_check_and_entity_slash_check() {
        let mut c = check();
        c.dependencies = vec!["db".into(), "router1/ping".into()];
        c.validate().unwrap();
        c.dependencies = vec!["a/b/c".into()];
        assert_eq!(c.validate().unwrap_err().field, "dependencies");
        c.dependencies = vec!["cpu".into()];
        assert_eq!(c.validate().unwrap_err().field, "dependencies");
    }

    #[test]
    fn silence_matches_by_subscription_and_check() {
        let mut e = Entity::new("web1", EntityClass::Agent);
        e.subscriptions = vec!["web".into()];
        let s = Silence {
            name: String::new(),
            entity: None,
            subscription: Some("web".into()),
            check: Some("http".into()),
            begin_unix_secs: 100,
            expire_secs: Some(60),
            expire_on_resolve: false,
            reason: String::new(),
            creator: String::new(),
        };
        assert!(s.matches(&e, "http"));
        assert!(!s.matches(&e, "disk"));
        assert!(s.is_active(120) && !s.is_active(99) && !s.is_active(160));
        let mut by_entity = s.clone();
        by_entity.subscription = Some("entity:web1".into());
        assert!(by_entity.matches(&e, "http"));
        assert_eq!(s.default_name(), "*:web:http");
    }

    #[test]
    fn proxy_requests_match_only_proxy_entities_with_labels() {
        let mut site = Entity::new("site", EntityClass::Proxy);
        site.labels.insert("role".into(), "website".into());
        let mut agent = site.clone();
        agent.class = EntityClass::Agent;
        let pr = ProxyRequests { labels: [("role".to_string(), "website".to_string())].into(), names: vec![] };
        assert!(pr.matches(&site));
        assert!(!pr.matches(&agent));
    }
}
