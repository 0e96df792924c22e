//! `{{ .check.name }}` templates over the event view (see [`crate::view`]), the same
//! token syntax check commands use for entity attributes (`drover_core::tokens`),
//! including `{{ .entity.labels.team | default "ops" }}`.
//!
//! Unlike command tokens, a missing value does not fail: an alert with a blank in its
//! subject is better than no alert. It renders as `<no value>`, as Go templates do.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("`{{{{` at byte {0} is never closed with `}}}}`")]
    Unclosed(usize),
    #[error("token `{{{{{0}}}}}` must be a path starting with `.`, e.g. {{{{ .check.output }}}}")]
    BadToken(String),
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Literal(String),
    Token { path: Vec<String>, default: Option<String> },
}

/// How substituted values are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escape {
    /// As text.
    None,
    /// Strings JSON-escaped without their quotes, so `"{{ .check.output }}"` inside a
    /// JSON body stays valid; other values as JSON, so `{{ .check.labels }}` is an object.
    Json,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = text;
        let mut offset = 0;
        while let Some(start) = rest.find("{{") {
            let after = &rest[start + 2..];
            let Some(end) = after.find("}}") else { return Err(TemplateError::Unclosed(offset + start)) };
            if start > 0 {
                parts.push(Part::Literal(rest[..start].to_string()));
            }
            parts.push(parse_token(&after[..end])?);
            offset += start + 2 + end + 2;
            rest = &after[end + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        Ok(Template { parts })
    }

    pub fn render(&self, data: &Value, escape: Escape) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Literal(s) => out.push_str(s),
                Part::Token { path, default } => {
                    let found = path.iter().try_fold(data, |v, k| v.get(k)).filter(|v| !v.is_null());
                    match (found, default) {
                        (Some(Value::String(s)), _) => push_str(&mut out, s, escape),
                        (Some(v), _) => out.push_str(&v.to_string()),
                        (None, Some(d)) => push_str(&mut out, d, escape),
                        (None, None) => out.push_str("<no value>"),
                    }
                }
            }
        }
        out
    }
}

fn push_str(out: &mut String, s: &str, escape: Escape) {
    match escape {
        Escape::None => out.push_str(s),
        Escape::Json => {
            let quoted = serde_json::to_string(s).unwrap_or_default();
            out.push_str(&quoted[1..quoted.len() - 1]);
        }
    }
}

fn parse_token(inner: &str) -> Result<Part, TemplateError> {
    let (path, default) = match inner.split_once('|') {
        Some((p, d)) => {
            let d = d.trim();
            let Some(d) = d.strip_prefix("default") else { return Err(TemplateError::BadToken(inner.to_string())) };
            let d = d.trim();
            (p.trim(), Some(d.strip_prefix('"').and_then(|s| s.strip_suffix('"')).unwrap_or(d).to_string()))
        }
        None => (inner.trim(), None),
    };
    let Some(path) = path.strip_prefix('.') else { return Err(TemplateError::BadToken(inner.to_string())) };
    if path.is_empty() || path.split('.').any(str::is_empty) {
        return Err(TemplateError::BadToken(inner.to_string()));
    }
    Ok(Part::Token { path: path.split('.').map(str::to_string).collect(), default })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn data() -> Value {
        json!({"check": {"name": "disk", "status": 2, "output": "line \"1\"\nline 2", "labels": {"a": "b"}},
               "entity": {"name": "web1", "labels": {}}})
    }

    #[test]
    fn tokens_render_strings_numbers_and_defaults() {
        let t = Template::parse("{{ .check.name }} on {{.entity.name}} is {{ .check.status }}, team {{ .entity.labels.team | default \"ops\" }}").unwrap();
        assert_eq!(t.render(&data(), Escape::None), "disk on web1 is 2, team ops");
    }

    #[test]
    fn missing_value_renders_as_no_value() {
        let t = Template::parse("[{{ .check.nope }}]").unwrap();
        assert_eq!(t.render(&data(), Escape::None), "[<no value>]");
    }

    #[test]
    fn json_escape_keeps_a_json_body_valid() {
        let t = Template::parse("{\"text\": \"{{ .check.output }}\", \"labels\": {{ .check.labels }}}").unwrap();
        let body = t.render(&data(), Escape::Json);
        let parsed: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(parsed["text"], "line \"1\"\nline 2");
        assert_eq!(parsed["labels"]["a"], "b");
    }

    #[test]
    fn unclosed_and_malformed_tokens_are_refused_at_parse() {
        assert_eq!(Template::parse("ab {{ .x").unwrap_err(), TemplateError::Unclosed(3));
        assert!(matches!(Template::parse("{{ check }}").unwrap_err(), TemplateError::BadToken(_)));
        assert!(matches!(Template::parse("{{ .a | upper }}").unwrap_err(), TemplateError::BadToken(_)));
    }
}
