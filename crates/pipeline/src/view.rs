//! The event as handlers, filters and templates see it.
//!
//! One JSON document, shaped like a Sensu event so Sensu handlers and filter habits
//! carry over. It is the `event` variable of filter expressions, the root of
//! `{{ .check.name }}` templates, and what the `json` mutator (the default) sends:
//!
//! ```text
//! {
//!   "entity":  { the Entity JSON: name, class, address, subscriptions, labels, system,
//!                metrics (keepalive system metrics), last_seen_ms, ... }
//!                (only {"name": ...} when the entity is not registered),
//!   "check": {
//!     "name", "status" (0..3), "status_name" ("OK", "WARNING", "CRITICAL", "UNKNOWN"),
//!     "output", "state" ("passing" | "failing" | "flapping"),
//!     "action" ("create" | "update" | "resolve" | "flapping"),
//!     "occurrences", "occurrences_watermark", "total_state_change",
//!     "history" ([{"status", "executed_ms"}], oldest first, at most 21),
//!     "last_ok_ms", "issued_ms", "executed_ms", "received_ms", "duration_ms",
//!     "interval_secs", "ttl_secs" (null when unset), "handlers", "labels",
//!     "silenced_by" ([silence names])
//!   },
//!   "metrics": [{"name", "value", "timestamp", "tags": [[k, v]], "unit"}],
//!   "silenced": bool, "is_incident": bool, "is_resolution": bool, "has_metrics": bool,
//!   "timestamp_ms": when the server received the result
//! }
//! ```

use drover_core::event::EventAction;
use drover_core::{Entity, Event};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;

/// `status != OK`, or the return to OK of a non-OK status.
pub fn is_incident(e: &Event) -> bool {
    !e.status.is_ok() || e.action == EventAction::Resolve
}

pub fn event_view(event: &Event, entity: Option<&Entity>) -> Value {
    let entity = match entity {
        Some(e) => serde_json::to_value(e).unwrap_or_else(|_| json!({ "name": event.entity })),
        None => json!({ "name": event.entity }),
    };
    let cfg = &event.check_config;
    json!({
        "entity": entity,
        "check": {
            "name": event.check,
            "status": event.status,
            "status_name": event.status.as_str(),
            "output": event.output,
            "state": event.state,
            "action": event.action,
            "occurrences": event.occurrences,
            "occurrences_watermark": event.occurrences_watermark,
            "total_state_change": event.total_state_change,
            "history": event.history,
            "last_ok_ms": event.last_ok_ms,
            "issued_ms": event.issued_ms,
            "executed_ms": event.executed_ms,
            "received_ms": event.received_ms,
            "duration_ms": event.duration_ms,
            "interval_secs": cfg.interval_secs,
            "ttl_secs": cfg.ttl_secs,
            "handlers": cfg.handlers,
            "labels": cfg.labels,
            "silenced_by": event.silenced_by,
        },
        "metrics": event.metrics,
        "silenced": event.is_silenced(),
        "is_incident": is_incident(event),
        "is_resolution": event.action == EventAction::Resolve,
        "has_metrics": !event.metrics.is_empty(),
        "timestamp_ms": event.received_ms,
    })
}

/// Converts JSON to a CEL value. Integers become CEL `int` where they fit so that
/// `event.check.occurrences >= 3` compares like with like.
pub fn to_cel(v: &Value) -> cel::Value {
    use cel::Value as C;
    match v {
        Value::Null => C::Null,
        Value::Bool(b) => C::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => C::Int(i),
            (None, Some(u)) => C::UInt(u),
            _ => C::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => C::String(Arc::new(s.clone())),
        Value::Array(a) => C::List(Arc::new(a.iter().map(to_cel).collect())),
        Value::Object(o) => {
            let map: HashMap<cel::objects::Key, C> =
                o.iter().map(|(k, v)| (cel::objects::Key::from(k.as_str()), to_cel(v))).collect();
            C::Map(cel::objects::Map { map: Arc::new(map) })
        }
    }
}
