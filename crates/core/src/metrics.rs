//! Metric points extracted from check output.
//!
//! A check declares `output_metric_format`; the agent parses the output with it so the
//! server receives points ready to store and forward. Nagios perfdata is always parsed
//! from the part after `|`, because every Nagios plugin emits it.

use serde::{Deserialize, Serialize};

/// One measurement. `tags` keep their order so Graphite/Influx round trips are stable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricPoint {
    pub name: String,
    pub value: f64,
    /// Seconds since the Unix epoch.
    pub timestamp: i64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<(String, String)>,
    /// Unit of measure from perfdata (`s`, `%`, `B`, `KB`, `MB`, `TB`, `c`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

/// Formats a check's output can carry metrics in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricFormat {
    NagiosPerfdata,
    GraphitePlaintext,
    InfluxdbLine,
    PrometheusText,
}

/// Extracts metric points from `output` in `format`, stamping points that carry no
/// timestamp with `now_secs`. Lines that do not parse are skipped: a plugin's human
/// text mixed with its metrics must not lose the metrics.
pub fn extract(output: &str, format: Option<MetricFormat>, now_secs: i64) -> Vec<MetricPoint> {
    match format {
        None | Some(MetricFormat::NagiosPerfdata) => parse_perfdata(output, now_secs),
        Some(MetricFormat::GraphitePlaintext) => parse_graphite(output, now_secs),
        Some(MetricFormat::InfluxdbLine) => parse_influx(output, now_secs),
        Some(MetricFormat::PrometheusText) => parse_prometheus(output, now_secs),
    }
}

/// Nagios perfdata: `'label'=value[UOM];[warn];[crit];[min];[max]`, space separated,
/// after the first `|` of the first line and after `|` in the long text (Nagios
/// plugin guidelines, "Performance data").
pub fn parse_perfdata(output: &str, now_secs: i64) -> Vec<MetricPoint> {
    let mut perf = String::new();
    let mut lines = output.lines();
    if let Some(first) = lines.next()
        && let Some((_, p)) = first.split_once('|')
    {
        perf.push_str(p);
    }
    // Long text: perfdata continues after a `|` on any later line, and every line after it.
    let mut in_perf = false;
    for line in lines {
        if in_perf {
            perf.push(' ');
            perf.push_str(line);
        } else if let Some((_, p)) = line.split_once('|') {
            in_perf = true;
            perf.push(' ');
            perf.push_str(p);
        }
    }
    let mut points = Vec::new();
    for item in split_perf_items(&perf) {
        if let Some(p) = parse_perf_item(&item, now_secs) {
            points.push(p);
        }
    }
    points
}

/// Splits perfdata on spaces, keeping single-quoted labels (which may contain spaces,
/// and `''` for a literal quote) together.
fn split_perf_items(s: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' if quoted && chars.peek() == Some(&'\'') => {
                cur.push('\'');
                chars.next();
            }
            '\'' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    items.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        items.push(cur);
    }
    items
}

fn parse_perf_item(item: &str, now_secs: i64) -> Option<MetricPoint> {
    let (label, rest) = item.rsplit_once('=')?;
    if label.is_empty() {
        return None;
    }
    let value_uom = rest.split(';').next()?;
    let split = value_uom
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+' || c == 'e' || c == 'E'))
        .unwrap_or(value_uom.len());
    let (num, uom) = value_uom.split_at(split);
    let value: f64 = num.parse().ok()?;
    Some(MetricPoint {
        name: label.to_string(),
        value,
        timestamp: now_secs,
        tags: Vec::new(),
        unit: (!uom.is_empty()).then(|| uom.to_string()),
    })
}

/// Graphite plaintext: `metric.path value [timestamp]` per line.
pub fn parse_graphite(output: &str, now_secs: i64) -> Vec<MetricPoint> {
    output
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let name = f.next()?;
            let value: f64 = f.next()?.parse().ok()?;
            let ts = match f.next() {
                Some(t) => t.parse::<f64>().ok()? as i64,
                None => now_secs,
            };
            Some(MetricPoint { name: name.to_string(), value, timestamp: ts, tags: Vec::new(), unit: None })
        })
        .collect()
}

/// InfluxDB line protocol: `measurement[,tag=v...] field=value[,field=value...] [timestamp_ns]`.
/// Each field becomes a point named `measurement.field`.
pub fn parse_influx(output: &str, now_secs: i64) -> Vec<MetricPoint> {
    let mut points = Vec::new();
    for line in output.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(series), Some(fields)) = (parts.next(), parts.next()) else { continue };
        let ts = parts.next().and_then(|t| t.parse::<i64>().ok()).map(|ns| ns / 1_000_000_000).unwrap_or(now_secs);
        let mut series_parts = series.split(',');
        let measurement = series_parts.next().unwrap_or_default();
        let tags: Vec<(String, String)> =
            series_parts.filter_map(|t| t.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))).collect();
        for field in fields.split(',') {
            let Some((k, v)) = field.split_once('=') else { continue };
            let v = v.trim_end_matches('i');
            if let Ok(value) = v.parse::<f64>() {
                points.push(MetricPoint {
                    name: format!("{measurement}.{k}"),
                    value,
                    timestamp: ts,
                    tags: tags.clone(),
                    unit: None,
                });
            }
        }
    }
    points
}

/// Prometheus text exposition: `name{label="v",...} value [timestamp_ms]`; `#` lines skipped.
pub fn parse_prometheus(output: &str, now_secs: i64) -> Vec<MetricPoint> {
    let mut points = Vec::new();
    for line in output.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, tags, rest) = match line.find('{') {
            Some(open) => {
                let Some(close) = line[open..].find('}').map(|c| open + c) else { continue };
                let tags = parse_prom_labels(&line[open + 1..close]);
                (&line[..open], tags, &line[close + 1..])
            }
            None => match line.split_once(char::is_whitespace) {
                Some((n, r)) => (n, Vec::new(), r),
                None => continue,
            },
        };
        let mut f = rest.split_whitespace();
        let Some(value) = f.next().and_then(|v| v.parse::<f64>().ok()) else { continue };
        let ts = f.next().and_then(|t| t.parse::<i64>().ok()).map(|ms| ms / 1000).unwrap_or(now_secs);
        points.push(MetricPoint { name: name.to_string(), value, timestamp: ts, tags, unit: None });
    }
    points
}

fn parse_prom_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some((k, after)) = rest.split_once('=') {
        let after = after.trim_start();
        let Some(after) = after.strip_prefix('"') else { break };
        let mut val = String::new();
        let mut end = after.len();
        let mut chars = after.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        val.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => val.push(c),
            }
        }
        out.push((k.trim().trim_start_matches(',').trim().to_string(), val));
        rest = &after[end.min(after.len())..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfdata_from_check_load_parses_all_points() {
        let out = "LOAD OK - total load average: 0.10, 0.20, 0.30|load1=0.100;5.000;10.000;0; load5=0.200;4.000;6.000;0; load15=0.300;3.000;4.000;0;";
        let p = parse_perfdata(out, 100);
        let names: Vec<_> = p.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["load1", "load5", "load15"]);
        assert_eq!(p[2].value, 0.3);
        assert_eq!(p[0].timestamp, 100);
    }

    #[test]
    fn perfdata_keeps_units_and_quoted_labels() {
        let out = "DISK OK | '/var log'=512MB;800;900;0;1000 time=0.25s pct=12.5%";
        let p = parse_perfdata(out, 0);
        assert_eq!(p[0].name, "/var log");
        assert_eq!(p[0].value, 512.0);
        assert_eq!(p[0].unit.as_deref(), Some("MB"));
        assert_eq!(p[1].unit.as_deref(), Some("s"));
        assert_eq!(p[2].unit.as_deref(), Some("%"));
    }

    #[test]
    fn perfdata_in_long_text_is_collected() {
        let out = "OK - first | a=1\nlong text line\nmore | b=2\nc=3";
        let p = parse_perfdata(out, 0);
        let names: Vec<_> = p.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
    }

    #[test]
    fn output_without_perfdata_has_no_points() {
        assert!(parse_perfdata("OK - all good", 0).is_empty());
        assert!(parse_perfdata("OK | garbage noequals", 0).is_empty());
    }

    #[test]
    fn graphite_lines_parse_with_and_without_timestamp() {
        let p = parse_graphite("a.b.c 1.5 1700000000\nd.e 2\nnot a metric line\n", 42);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].timestamp, 1700000000);
        assert_eq!(p[1].timestamp, 42);
    }

    #[test]
    fn influx_line_fields_become_points_with_tags() {
        let p = parse_influx("cpu,host=a,zone=z1 user=1.5,idle=90i 1700000000000000000", 0);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].name, "cpu.user");
        assert_eq!(p[1].value, 90.0);
        assert_eq!(p[0].timestamp, 1700000000);
        assert_eq!(p[0].tags, vec![("host".into(), "a".into()), ("zone".into(), "z1".into())]);
    }

    #[test]
    fn prometheus_text_parses_labels_and_skips_comments() {
        let out = "# HELP x y\n# TYPE x gauge\nx{a=\"1\",b=\"two\"} 3.5\nplain 7 1700000000000\n";
        let p = parse_prometheus(out, 5);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].tags, vec![("a".into(), "1".into()), ("b".into(), "two".into())]);
        assert_eq!(p[0].value, 3.5);
        assert_eq!(p[1].timestamp, 1700000000);
    }
}
