//! Metric points out of drover: Graphite plaintext and InfluxDB line protocol for the
//! metric handlers, and Prometheus text for the server's `/metrics`.
//!
//! Every point is tagged with the entity and check it came from; a point's own tags
//! follow (and cannot override those two).

use drover_core::{Event, MetricPoint};

fn extra_tags(p: &MetricPoint) -> impl Iterator<Item = &(String, String)> {
    p.tags.iter().filter(|(k, _)| k != "entity" && k != "check")
}

/// Graphite 1.1 tagged plaintext: `[prefix.]name;entity=E;check=C;k=v value timestamp`.
pub fn graphite_lines(prefix: Option<&str>, entity: &str, check: &str, points: &[MetricPoint]) -> String {
    // Graphite splits paths on `.` and tags on `;`, `=`, `~`; spaces end the path.
    fn path(s: &str) -> String {
        s.chars().map(|c| if c.is_whitespace() || matches!(c, ';' | '~' | '=' | '!' | '^') { '_' } else { c }).collect()
    }
    fn tag(s: &str) -> String {
        let t: String =
            s.chars().map(|c| if c.is_whitespace() || matches!(c, ';' | '~' | '=') { '_' } else { c }).collect();
        if t.is_empty() { "_".into() } else { t }
    }
    let mut out = String::new();
    for p in points {
        if let Some(pre) = prefix.filter(|p| !p.is_empty()) {
            out.push_str(&path(pre));
            out.push('.');
        }
        out.push_str(&path(&p.name));
        out.push_str(&format!(";entity={};check={}", tag(entity), tag(check)));
        for (k, v) in extra_tags(p) {
            out.push_str(&format!(";{}={}", tag(k), tag(v)));
        }
        out.push_str(&format!(" {} {}\n", p.value, p.timestamp));
    }
    out
}

/// InfluxDB line protocol, one line per point: `name,entity=E,check=C,k=v value=1.5 ts`,
/// timestamps in nanoseconds (the default precision of both /write and /api/v2/write).
pub fn influx_lines(entity: &str, check: &str, points: &[MetricPoint]) -> String {
    fn esc(s: &str, extra: &[char]) -> String {
        let mut o = String::with_capacity(s.len());
        for c in s.chars() {
            if c == ',' || c == ' ' || c == '\\' || extra.contains(&c) {
                o.push('\\');
            }
            if c == '\n' {
                o.push_str("\\n");
                continue;
            }
            o.push(c);
        }
        o
    }
    let mut out = String::new();
    for p in points.iter().filter(|p| p.value.is_finite()) {
        out.push_str(&esc(&p.name, &[]));
        out.push_str(&format!(",check={},entity={}", esc(check, &['=']), esc(entity, &['='])));
        for (k, v) in extra_tags(p).filter(|(_, v)| !v.is_empty()) {
            out.push_str(&format!(",{}={}", esc(k, &['=']), esc(v, &['='])));
        }
        out.push_str(&format!(" value={} {}\n", p.value, p.timestamp.saturating_mul(1_000_000_000)));
    }
    out
}

/// Each event's latest metric points as a Prometheus gauge family:
/// `drover_check_metric{entity="..",check="..",name=".."} value`, point tags as extra
/// labels (names made valid; `entity`, `check` and `name` cannot be overridden).
pub fn prometheus_text(events: &[Event]) -> String {
    fn label_value(s: &str) -> String {
        let mut o = String::with_capacity(s.len());
        for c in s.chars() {
            match c {
                '\\' => o.push_str("\\\\"),
                '"' => o.push_str("\\\""),
                '\n' => o.push_str("\\n"),
                c => o.push(c),
            }
        }
        o
    }
    fn label_name(s: &str) -> String {
        let mut o: String = s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
        if o.is_empty() || o.starts_with(|c: char| c.is_ascii_digit()) || o.starts_with("__") {
            o.insert_str(0, "tag_");
        }
        o
    }
    fn value(v: f64) -> String {
        if v.is_nan() {
            "NaN".into()
        } else if v.is_infinite() {
            if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
        } else {
            v.to_string()
        }
    }
    let mut out = String::new();
    if events.iter().any(|e| !e.metrics.is_empty()) {
        out.push_str("# HELP drover_check_metric Latest metric points from check output.\n");
        out.push_str("# TYPE drover_check_metric gauge\n");
    }
    for e in events {
        for p in &e.metrics {
            out.push_str(&format!(
                "drover_check_metric{{entity=\"{}\",check=\"{}\",name=\"{}\"",
                label_value(&e.entity),
                label_value(&e.check),
                label_value(&p.name)
            ));
            let mut seen = vec!["entity".to_string(), "check".to_string(), "name".to_string()];
            for (k, v) in &p.tags {
                let k = label_name(k);
                if seen.contains(&k) {
                    continue;
                }
                out.push_str(&format!(",{k}=\"{}\"", label_value(v)));
                seen.push(k);
            }
            out.push_str(&format!("}} {}\n", value(p.value)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(name: &str, value: f64, tags: &[(&str, &str)]) -> MetricPoint {
        MetricPoint {
            name: name.into(),
            value,
            timestamp: 1_700_000_000,
            tags: tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            unit: None,
        }
    }

    #[test]
    fn graphite_lines_carry_entity_and_check_tags() {
        let s =
            graphite_lines(Some("drover"), "web-1.example", "disk", &[point("disk.used pct", 42.5, &[("mount", "/")])]);
        assert_eq!(s, "drover.disk.used_pct;entity=web-1.example;check=disk;mount=/ 42.5 1700000000\n");
    }

    #[test]
    fn influx_lines_escape_and_use_nanoseconds() {
        let s = influx_lines("web 1", "cpu", &[point("load,1m", 0.5, &[("core", "a=b")]), point("x", f64::NAN, &[])]);
        assert_eq!(s, "load\\,1m,check=cpu,entity=web\\ 1,core=a\\=b value=0.5 1700000000000000000\n");
    }

    #[test]
    fn prometheus_text_escapes_label_values() {
        let ev: Event = serde_json::from_value(serde_json::json!({
            "entity": "we\"b", "check": "c\\d", "status": 0, "output": "", "state": "passing", "action": "create",
            "occurrences": 1, "occurrences_watermark": 1, "history": [], "total_state_change": 0, "last_ok_ms": 0,
            "issued_ms": 0, "executed_ms": 0, "received_ms": 0, "duration_ms": 0,
            "metrics": [{"name": "line\nbreak", "value": 1.0, "timestamp": 0, "tags": [["entity", "spoof"], ["9x", "y"]]}]
        }))
        .unwrap();
        let text = prometheus_text(&[ev]);
        assert!(text.contains("# TYPE drover_check_metric gauge\n"));
        assert!(
            text.contains(
                "drover_check_metric{entity=\"we\\\"b\",check=\"c\\\\d\",name=\"line\\nbreak\",tag_9x=\"y\"} 1\n"
            ),
            "{text}"
        );
    }
}
