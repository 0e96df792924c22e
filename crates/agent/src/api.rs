//! The local HTTP API: lets scripts and cron jobs on the node report results through
//! the agent (and so through its buffer and connection) instead of talking to the
//! server themselves.
//!
//! - `POST /results` `{"check", "status", "output"?, "ttl_secs"?, "handlers"?,
//!   "entity"?, "output_metric_format"?}` → 202 `{"accepted":true,"seq":N}`, or 400
//!   `{"error":"field `…`: …"}`.
//! - `GET /healthz` → 200 `{"connected":bool,"buffered":N}`.

use crate::{AgentError, Shared};
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use drover_core::event::{CheckResult, EventCheckConfig};
use drover_core::metrics::MetricFormat;
use drover_core::resource::{FieldError, validate_name};
use drover_core::status::Status;
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::net::TcpListener;

/// Binds exactly the configured address; the default is loopback, because anything that
/// can reach this endpoint can report results in this node's name.
pub(crate) async fn bind(listen: &str) -> Result<TcpListener, AgentError> {
    TcpListener::bind(listen).await.map_err(|source| {
        if source.kind() == std::io::ErrorKind::InvalidInput {
            AgentError::Config(format!("`api_listen` = `{listen}` is not an address:port ({source})"))
        } else {
            AgentError::Io { context: format!("cannot listen on `api_listen` = `{listen}`"), source }
        }
    })
}

pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) -> Result<(), AgentError> {
    let app = axum::Router::new()
        .route("/results", post(post_result))
        .route("/healthz", get(healthz))
        .with_state(shared.clone());
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shared.stopped().await })
        .await
        .map_err(|source| AgentError::Io { context: "local API".into(), source })
}

async fn healthz(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(json!({
        "connected": shared.connected.load(Ordering::Relaxed),
        "buffered": shared.outbox.len(),
    }))
}

async fn post_result(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    match parse_result(&body, shared.output_limit_bytes) {
        Ok(result) => {
            let seq = shared.outbox.enqueue(result);
            (StatusCode::ACCEPTED, Json(json!({ "accepted": true, "seq": seq }))).into_response()
        }
        Err(e) => (StatusCode::BAD_REQUEST, Json(json!({ "error": e.to_string() }))).into_response(),
    }
}

const FIELDS: [&str; 7] = ["check", "status", "output", "ttl_secs", "handlers", "entity", "output_metric_format"];

/// Parses field by field (rather than with a derived Deserialize) so every error names
/// the offending field, which serde's type errors do not.
fn parse_result(body: &[u8], output_limit: usize) -> Result<CheckResult, FieldError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| FieldError::new("body", format!("invalid JSON: {e}")))?;
    let Value::Object(mut obj) = value else {
        return Err(FieldError::new("body", "must be a JSON object"));
    };
    if let Some(unknown) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(FieldError::new(unknown.clone(), format!("unknown field; expected one of {}", FIELDS.join(", "))));
    }

    let check = take_string(&mut obj, "check")?.ok_or_else(|| FieldError::new("check", "is required"))?;
    validate_name("check", &check)?;
    let status =
        match take(&mut obj, "status") {
            None => return Err(FieldError::new("status", "is required")),
            Some(v) => v.as_u64().filter(|s| *s <= 3).map(|s| Status::from_exit_code(s as i32)).ok_or_else(|| {
                FieldError::new("status", "must be an integer 0..=3 (OK, WARNING, CRITICAL, UNKNOWN)")
            })?,
        };
    let mut output = take_string(&mut obj, "output")?.unwrap_or_default();
    if output.len() > output_limit {
        // Same cap and marker as command output, so one script cannot flood the buffer.
        let mut cut = output_limit;
        while !output.is_char_boundary(cut) {
            cut -= 1;
        }
        let dropped = output.len() - cut;
        output.truncate(cut);
        output.push_str(&format!("\n[drover: output truncated, {dropped} bytes dropped]"));
    }
    let ttl_secs = match take(&mut obj, "ttl_secs") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|t| *t > 0)
                .ok_or_else(|| FieldError::new("ttl_secs", "must be a positive integer (seconds)"))?,
        ),
    };
    let handlers = match take(&mut obj, "handlers") {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|h| match h {
                Value::String(s) => validate_name("handlers", &s).map(|()| s),
                _ => Err(FieldError::new("handlers", "must be an array of handler names")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(FieldError::new("handlers", "must be an array of handler names")),
    };
    let entity = take_string(&mut obj, "entity")?.unwrap_or_default();
    if !entity.is_empty() {
        validate_name("entity", &entity)?;
    }
    let format = match take(&mut obj, "output_metric_format") {
        None => None,
        Some(v) => Some(serde_json::from_value::<MetricFormat>(v).map_err(|_| {
            FieldError::new(
                "output_metric_format",
                "must be one of nagios_perfdata, graphite_plaintext, influxdb_line, prometheus_text",
            )
        })?),
    };

    let now_ms = drover_core::time::now_ms();
    let metrics = drover_core::metrics::extract(&output, format, now_ms / 1000);
    Ok(CheckResult {
        check,
        entity,
        status,
        output,
        issued_ms: 0,
        executed_ms: now_ms,
        duration_ms: 0,
        metrics,
        check_config: Some(EventCheckConfig { ttl_secs, handlers, ..Default::default() }),
    })
}

/// Removes a field; an explicit `null` counts as absent.
fn take(obj: &mut Map<String, Value>, field: &str) -> Option<Value> {
    obj.remove(field).filter(|v| !v.is_null())
}

fn take_string(obj: &mut Map<String, Value>, field: &str) -> Result<Option<String>, FieldError> {
    match take(obj, field) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(FieldError::new(field, "must be a string")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<CheckResult, FieldError> {
        parse_result(body.as_bytes(), 1024)
    }

    #[test]
    fn full_body_becomes_a_result_with_check_config() {
        let r = parse(
            r#"{"check":"backup","status":1,"output":"late | age=90s","ttl_secs":600,"handlers":["mail"],"entity":"db1"}"#,
        )
        .unwrap();
        assert_eq!(r.check, "backup");
        assert_eq!(r.status, Status::Warning);
        assert_eq!(r.entity, "db1");
        assert_eq!(r.metrics.len(), 1, "perfdata parsed by default");
        let cfg = r.check_config.unwrap();
        assert_eq!(cfg.ttl_secs, Some(600));
        assert_eq!(cfg.handlers, ["mail"]);
    }

    #[test]
    fn minimal_body_is_accepted() {
        let r = parse(r#"{"check":"c","status":0}"#).unwrap();
        assert_eq!(r.output, "");
        assert_eq!(r.entity, "");
        assert!(r.check_config.is_some());
    }

    #[test]
    fn errors_name_the_field() {
        for (body, field) in [
            (r#"{"status":0}"#, "check"),
            (r#"{"check":"a/b","status":0}"#, "check"),
            (r#"{"check":"c"}"#, "status"),
            (r#"{"check":"c","status":4}"#, "status"),
            (r#"{"check":"c","status":"0"}"#, "status"),
            (r#"{"check":"c","status":0,"output":5}"#, "output"),
            (r#"{"check":"c","status":0,"ttl_secs":0}"#, "ttl_secs"),
            (r#"{"check":"c","status":0,"handlers":"mail"}"#, "handlers"),
            (r#"{"check":"c","status":0,"entity":"a b"}"#, "entity"),
            (r#"{"check":"c","status":0,"output_metric_format":"csv"}"#, "output_metric_format"),
            (r#"{"check":"c","status":0,"bogus":1}"#, "bogus"),
            (r#"[1]"#, "body"),
            (r#"{"check":"#, "body"),
        ] {
            let e = parse(body).unwrap_err();
            assert_eq!(e.field, field, "{body}: {e}");
        }
    }

    #[test]
    fn long_output_is_truncated_with_marker() {
        let body = json!({"check": "c", "status": 0, "output": "x".repeat(2000)}).to_string();
        let r = parse(&body).unwrap();
        assert!(r.output.ends_with("\n[drover: output truncated, 976 bytes dropped]"), "{}", r.output);
    }
}
