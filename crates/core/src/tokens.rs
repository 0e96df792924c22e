//! Entity attribute substitution into check commands.
//!
//! Two syntaxes, so checks from both Sensu generations work unchanged:
//! - Sensu Go: `{{ .labels.disk_warning | default "80" }}`, `{{ .name }}`
//! - Sensu 1.x: `:::labels.disk_warning|80:::`, `:::address:::`
//!
//! A token that names a missing attribute and has no default is an error: running the
//! command with a blank in it could do harm, so the check reports UNKNOWN instead.

use crate::resource::Entity;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unmatched token(s) with no default: {}", .0.join(", "))]
pub struct UnmatchedTokens(pub Vec<String>);

/// Replaces every token in `command` with the entity attribute it names.
pub fn substitute(command: &str, entity: &Entity) -> Result<String, UnmatchedTokens> {
    if !command.contains("{{") && !command.contains(":::") {
        return Ok(command.to_string());
    }
    let attrs = serde_json::to_value(entity).unwrap_or(Value::Null);
    let mut missing = Vec::new();
    let go = replace_delimited(command, "{{", "}}", |inner| {
        let (path, default) = match inner.split_once('|') {
            Some((p, d)) => (p.trim(), parse_go_default(d)),
            None => (inner.trim(), None),
        };
        resolve(&attrs, path.trim_start_matches('.'), default, &mut missing)
    });
    let out = replace_delimited(&go, ":::", ":::", |inner| {
        let (path, default) = match inner.split_once('|') {
            Some((p, d)) => (p.trim(), Some(d.to_string())),
            None => (inner.trim(), None),
        };
        resolve(&attrs, path, default, &mut missing)
    });
    if missing.is_empty() { Ok(out) } else { Err(UnmatchedTokens(missing)) }
}

fn parse_go_default(s: &str) -> Option<String> {
    let s = s.trim().strip_prefix("default")?.trim();
    let s = s.strip_prefix('"').and_then(|s| s.strip_suffix('"')).unwrap_or(s);
    Some(s.to_string())
}

fn resolve(attrs: &Value, path: &str, default: Option<String>, missing: &mut Vec<String>) -> String {
    let mut v = attrs;
    for part in path.split('.') {
        match v.get(part) {
            Some(next) => v = next,
            None => {
                return default.unwrap_or_else(|| {
                    missing.push(path.to_string());
                    String::new()
                });
            }
        }
    }
    match v {
        Value::String(s) => s.clone(),
        Value::Null => default.unwrap_or_else(|| {
            missing.push(path.to_string());
            String::new()
        }),
        other => other.to_string(),
    }
}

fn replace_delimited(s: &str, open: &str, close: &str, mut f: impl FnMut(&str) -> String) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find(open) {
        let after = &rest[start + open.len()..];
        let Some(end) = after.find(close) else { break };
        out.push_str(&rest[..start]);
        out.push_str(&f(&after[..end]));
        rest = &after[end + close.len()..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::EntityClass;

    fn entity() -> Entity {
        let mut e = Entity::new("web1", EntityClass::Agent);
        e.address = Some("10.0.0.5".into());
        e.labels.insert("zone".into(), "z1".into());
        e
    }

    #[test]
    fn sensu_go_tokens_substitute_with_defaults() {
        let out =
            substitute("check_disk -w {{ .labels.warn | default \"80\" }} -H {{ .address }} {{.name}}", &entity())
                .unwrap();
        assert_eq!(out, "check_disk -w 80 -H 10.0.0.5 web1");
    }

    #[test]
    fn sensu_1x_tokens_substitute_with_defaults() {
        let out = substitute("check -z :::labels.zone::: -p :::labels.port|8080:::", &entity()).unwrap();
        assert_eq!(out, "check -z z1 -p 8080");
    }

    #[test]
    fn missing_token_without_default_is_an_error() {
        let err = substitute("check {{ .labels.nope }}", &entity()).unwrap_err();
        assert_eq!(err.0, vec!["labels.nope".to_string()]);
    }

    #[test]
    fn command_without_tokens_is_unchanged() {
        assert_eq!(substitute("echo a:b", &entity()).unwrap(), "echo a:b");
    }
}
