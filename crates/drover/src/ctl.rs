//! `drover ctl`: a blocking REST client for a running server.
//!
//! Blocking on purpose: one request at a time needs no async runtime, and the CLI starts
//! in a few milliseconds. `--format json` prints what the server returned (re-indented,
//! never reshaped) so scripts see the API's own schema; the table format is for people.

use crate::cli::{
    ChecksCmd, CtlArgs, CtlResource, DbCmd, DeadlettersCmd, EntitiesCmd, EventsCmd, OutputFormat, SilenceCreateArgs,
    SilencesCmd,
};
use drover_core::config::ServerConfig;
use drover_core::event::{Event, EventState};
use drover_core::resource::{CheckSpec, Entity, EntityClass, Silence};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where `drover server` writes the admin token it generates, relative to the usual cwd.
const DEFAULT_TOKEN_FILE: &str = "drover-data/admin.token";

/// A list can hold thousands of entities with their metrics; ureq's default cap is 10 MB.
const MAX_BODY_BYTES: u64 = 512 * 1024 * 1024;

/// Runs the command and prints its output on stdout.
pub fn run(args: &CtlArgs) -> Result<(), String> {
    let out = execute(args)?;
    if !out.is_empty() {
        println!("{}", out.trim_end_matches('\n'));
    }
    Ok(())
}

/// Runs the command and returns what it would print.
pub fn execute(args: &CtlArgs) -> Result<String, String> {
    let client = Client::new(&args.server, resolve_token(args)?, args.ca_file.as_deref())?;
    let json = args.format == OutputFormat::Json;
    match &args.resource {
        CtlResource::Entities(cmd) => entities(&client, cmd, json),
        CtlResource::Checks(cmd) => checks(&client, cmd, json),
        CtlResource::Events(cmd) => events(&client, cmd, json),
        CtlResource::Silences(cmd) => silences(&client, cmd, json),
        CtlResource::Deadletters(cmd) => deadletters(&client, cmd, json),
        CtlResource::Db(cmd) => db(&client, cmd, json),
    }
}

/// `--token`/`DROVER_TOKEN`, else `--token-file`, else the server's default token file
/// if it is in the current directory.
fn resolve_token(args: &CtlArgs) -> Result<Option<String>, String> {
    if let Some(t) = args.token.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
        return Ok(Some(t.to_string()));
    }
    let read = |p: &Path| -> Result<Option<String>, String> {
        let t = std::fs::read_to_string(p).map_err(|e| format!("--token-file {}: {e}", p.display()))?;
        Ok(Some(t.trim().to_string()).filter(|t| !t.is_empty()))
    };
    if let Some(p) = &args.token_file {
        return read(p);
    }
    let default = PathBuf::from(DEFAULT_TOKEN_FILE);
    if default.is_file() { read(&default) } else { Ok(None) }
}

struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    fn new(server: &str, token: Option<String>, ca_file: Option<&std::path::Path>) -> Result<Client, String> {
        let base = server.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(format!("--server: `{server}` must start with http:// or https://"));
        }
        let mut builder = ureq::Agent::config_builder();
        if let Some(path) = ca_file {
            let pem = std::fs::read(path).map_err(|e| format!("--ca-file {}: {e}", path.display()))?;
            let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect();
            if certs.is_empty() {
                return Err(format!("--ca-file {}: no PEM certificate found", path.display()));
            }
            let roots = ureq::tls::RootCerts::Specific(std::sync::Arc::new(certs));
            builder = builder.tls_config(ureq::tls::TlsConfig::builder().root_certs(roots).build());
        }
        let agent = builder
            // Error responses carry the server's explanation in the body; read it ourselves.
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        Ok(Client { base, token, agent })
    }

    /// Sends a request; returns the status and body of a 2xx response, or the error
    /// explained for a person.
    fn send(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, String), String> {
        let url = format!("{}{}", self.base, path);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        macro_rules! with_headers {
            ($req:expr) => {{
                let r = $req.header("Accept", "application/json");
                match &auth {
                    Some(a) => r.header("Authorization", a.as_str()),
                    None => r,
                }
            }};
        }
        let result = match (method, body) {
            ("GET", _) => with_headers!(self.agent.get(&url)).call(),
            ("DELETE", _) => with_headers!(self.agent.delete(&url)).call(),
            ("POST", Some(b)) => with_headers!(self.agent.post(&url)).send_json(b),
            ("POST", None) => with_headers!(self.agent.post(&url)).send_empty(),
            ("PUT", Some(b)) => with_headers!(self.agent.put(&url)).send_json(b),
            ("PUT", None) => with_headers!(self.agent.put(&url)).send_empty(),
            _ => unreachable!("unsupported method {method}"),
        };
        let mut resp = result.map_err(|e| format!("cannot reach drover server at {}: {e}", self.base))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(MAX_BODY_BYTES)
            .read_to_string()
            .map_err(|e| format!("reading the response from {}: {e}", self.base))?;
        if (200..300).contains(&status) { Ok((status, text)) } else { Err(explain_error(status, &text)) }
    }

    fn get(&self, path: &str) -> Result<String, String> {
        self.send("GET", path, None).map(|(_, t)| t)
    }
}

/// Turns an error response into one line: the server's message, its HTTP status, and
/// for authentication failures what to do about it.
fn explain_error(status: u16, text: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(text).ok();
    let message = parsed.as_ref().and_then(|v| v.get("error")).and_then(Value::as_str).map(|m| {
        match parsed.as_ref().and_then(|v| v.get("field")).and_then(Value::as_str) {
            Some(f) if !f.is_empty() => format!("{m} (field `{f}`)"),
            _ => m.to_string(),
        }
    });
    let message = message.unwrap_or_else(|| {
        let t = text.trim();
        if t.is_empty() { "no details".to_string() } else { truncate(first_line(t), 200) }
    });
    let mut out = format!("{message} (HTTP {status})");
    if status == 401 || status == 403 {
        out.push_str(&format!(
            "\nhint: pass the admin token with --token or DROVER_TOKEN, or --token-file (the server writes it to DATA_DIR/admin.token; default {DEFAULT_TOKEN_FILE})"
        ));
    }
    out
}

/// Percent-encodes one path segment, so a name can never change the URL's shape.
fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~:@*".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    serde_json::from_str(text).map_err(|e| format!("unexpected response from the server: {e}"))
}

/// The server's JSON, re-indented; checks it is the expected kind of value.
fn pretty(text: &str, want_array: bool) -> Result<String, String> {
    let v: Value = parse(text)?;
    if want_array && !v.is_array() {
        return Err("unexpected response from the server: expected a JSON array".into());
    }
    Ok(serde_json::to_string_pretty(&v).expect("a Value always serializes"))
}

fn entities(c: &Client, cmd: &EntitiesCmd, json: bool) -> Result<String, String> {
    match cmd {
        EntitiesCmd::List => {
            let text = c.get("/api/v1/entities")?;
            if json { pretty(&text, true) } else { Ok(entity_table(&parse::<Vec<Entity>>(&text)?, now_ms())) }
        }
        EntitiesCmd::Get { name } => {
            let text = c.get(&format!("/api/v1/entities/{}", seg(name)))?;
            if json { pretty(&text, false) } else { details(&text) }
        }
        EntitiesCmd::Delete { name } => {
            c.send("DELETE", &format!("/api/v1/entities/{}", seg(name)), None)?;
            Ok(if json { String::new() } else { format!("deleted entity {name}") })
        }
    }
}

fn checks(c: &Client, cmd: &ChecksCmd, json: bool) -> Result<String, String> {
    match cmd {
        ChecksCmd::List => {
            let text = c.get("/api/v1/checks")?;
            if json { pretty(&text, true) } else { Ok(check_table(&parse::<Vec<CheckSpec>>(&text)?)) }
        }
        ChecksCmd::Get { name } => {
            let text = c.get(&format!("/api/v1/checks/{}", seg(name)))?;
            if json { pretty(&text, false) } else { details(&text) }
        }
        ChecksCmd::Delete { name } => {
            c.send("DELETE", &format!("/api/v1/checks/{}", seg(name)), None)?;
            Ok(if json { String::new() } else { format!("deleted check {name}") })
        }
        ChecksCmd::Execute { name } => {
            let (_, text) = c.send(
                "POST",
                &format!("/api/v1/checks/{}/execute", seg(name)),
                Some(&Value::Object(Default::default())),
            )?;
            if json {
                return pretty(&text, false);
            }
            let v: Value = parse(&text)?;
            match v.get("issued").and_then(Value::as_u64) {
                Some(n) => Ok(format!("check {name}: execution requested on {n} agent(s)")),
                None => Ok(format!("check {name}: execution requested")),
            }
        }
        ChecksCmd::Apply { file } => apply(c, file, json),
    }
}

/// PUTs every check of a server config file. Entities and silences in the same file are
/// reported, not applied: this command's promise is about checks only.
fn apply(c: &Client, file: &Path, json: bool) -> Result<String, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let parsed = ServerConfig::parse_file(file, &text).map_err(|e| e.to_string())?;
    if !parsed.entities.is_empty() || !parsed.silences.is_empty() || parsed.server.is_some() {
        eprintln!(
            "note: {}: only [checks.*] are applied; ignored {} entities, {} silences{}",
            file.display(),
            parsed.entities.len(),
            parsed.silences.len(),
            if parsed.server.is_some() { " and [server]" } else { "" }
        );
    }
    if parsed.checks.is_empty() {
        return Err(format!("{}: no [checks.NAME] tables to apply", file.display()));
    }
    let mut lines = Vec::new();
    let mut applied = Vec::new();
    for (name, spec) in &parsed.checks {
        let body = serde_json::to_value(spec).expect("a CheckSpec always serializes");
        let (status, resp) = c.send("PUT", &format!("/api/v1/checks/{}", seg(name)), Some(&body)).map_err(|e| {
            let done = if lines.is_empty() {
                String::new()
            } else {
                format!(" (applied before it: {})", applied_names(&lines))
            };
            format!("check {name}: {e}{done}")
        })?;
        applied.push(serde_json::from_str::<Value>(&resp).unwrap_or(body));
        lines.push(format!("applied check {name} ({})", if status == 201 { "created" } else { "updated" }));
    }
    if json {
        return Ok(serde_json::to_string_pretty(&Value::Array(applied)).expect("a Value always serializes"));
    }
    Ok(lines.join("\n"))
}

fn applied_names(lines: &[String]) -> String {
    lines.iter().filter_map(|l| l.split_whitespace().nth(2)).collect::<Vec<_>>().join(", ")
}

fn events(c: &Client, cmd: &EventsCmd, json: bool) -> Result<String, String> {
    let one = |e: &str, ch: &str| format!("/api/v1/events/{}/{}", seg(e), seg(ch));
    match cmd {
        EventsCmd::List { entity } => {
            let path = match entity {
                Some(e) => format!("/api/v1/events/{}", seg(e)),
                None => "/api/v1/events".to_string(),
            };
            let text = c.get(&path)?;
            if json { pretty(&text, true) } else { Ok(event_table(&parse::<Vec<Event>>(&text)?)) }
        }
        EventsCmd::Get { entity, check } => {
            let text = c.get(&one(entity, check))?;
            if json { pretty(&text, false) } else { details(&text) }
        }
        EventsCmd::Delete { entity, check } => {
            c.send("DELETE", &one(entity, check), None)?;
            Ok(if json { String::new() } else { format!("deleted event {entity}/{check}") })
        }
        EventsCmd::Resolve { entity, check } => {
            let (_, text) =
                c.send("POST", &format!("{}/resolve", one(entity, check)), Some(&Value::Object(Default::default())))?;
            if json { pretty(&text, false) } else { Ok(event_table(&[parse::<Event>(&text)?])) }
        }
    }
}

fn silences(c: &Client, cmd: &SilencesCmd, json: bool) -> Result<String, String> {
    match cmd {
        SilencesCmd::List => {
            let text = c.get("/api/v1/silences")?;
            if json { pretty(&text, true) } else { Ok(silence_table(&parse::<Vec<Silence>>(&text)?, now_ms() / 1000)) }
        }
        SilencesCmd::Get { name } => {
            let text = c.get(&format!("/api/v1/silences/{}", seg(name)))?;
            if json { pretty(&text, false) } else { details(&text) }
        }
        SilencesCmd::Delete { name } => {
            c.send("DELETE", &format!("/api/v1/silences/{}", seg(name)), None)?;
            Ok(if json { String::new() } else { format!("deleted silence {name}") })
        }
        SilencesCmd::Create(a) => {
            let body = serde_json::to_value(silence_from_args(a)?).expect("a Silence always serializes");
            let (_, text) = c.send("POST", "/api/v1/silences", Some(&body))?;
            if json { pretty(&text, false) } else { Ok(silence_table(&[parse::<Silence>(&text)?], now_ms() / 1000)) }
        }
    }
}

fn deadletters(c: &Client, cmd: &DeadlettersCmd, json: bool) -> Result<String, String> {
    match cmd {
        DeadlettersCmd::List => {
            let text = c.get("/api/v1/deadletters")?;
            if json {
                return pretty(&text, true);
            }
            let items: Vec<Value> = parse(&text)?;
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|d| {
                    let s = |k: &str| d[k].as_str().map(str::to_string).unwrap_or_else(|| d[k].to_string());
                    vec![
                        s("id"),
                        s("handler"),
                        s("entity"),
                        s("check"),
                        s("attempts"),
                        truncate(first_line(&s("error")), 60),
                    ]
                })
                .collect();
            Ok(table(&["ID", "HANDLER", "ENTITY", "CHECK", "ATTEMPTS", "ERROR"], &rows))
        }
        DeadlettersCmd::Retry { id } => {
            let (_, text) = c.send("POST", &format!("/api/v1/deadletters/{id}/retry"), Some(&serde_json::json!({})))?;
            Ok(if json { text } else { format!("retrying dead letter {id}") })
        }
        DeadlettersCmd::Delete { id } => {
            c.send("DELETE", &format!("/api/v1/deadletters/{id}"), None)?;
            Ok(if json { String::new() } else { format!("deleted dead letter {id}") })
        }
    }
}

fn db(c: &Client, cmd: &DbCmd, json: bool) -> Result<String, String> {
    match cmd {
        DbCmd::List => {
            let text = c.get("/api/v1/databases")?;
            if json {
                return pretty(&text, true);
            }
            let items: Vec<Value> = parse(&text)?;
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|d| {
                    let primaries: Vec<String> = d["roles"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|r| r["check"] == "db-replica" && r["ok"] == true)
                        .filter_map(|r| r["member"].as_str().map(str::to_string))
                        .collect();
                    vec![
                        d["name"].as_str().unwrap_or("").to_string(),
                        d["leader"]["member"].as_str().unwrap_or("").to_string(),
                        d["leader"]["term"].to_string(),
                        primaries.join(","),
                        truncate(d["note"].as_str().unwrap_or(""), 60),
                    ]
                })
                .collect();
            Ok(table(&["NAME", "PRIMARY", "TERM", "REPLICAS IN ROTATION", "NOTE"], &rows))
        }
        DbCmd::Get { name } => pretty(&c.get(&format!("/api/v1/databases/{name}"))?, true),
        DbCmd::Switchover { name, to } => {
            let body = serde_json::json!({ "to": to });
            let (_, text) = c.send("POST", &format!("/api/v1/databases/{name}/switchover"), Some(&body))?;
            if json {
                return Ok(text);
            }
            let v: Value = parse(&text)?;
            Ok(v["result"].as_str().unwrap_or(&text).to_string())
        }
    }
}

fn silence_from_args(a: &SilenceCreateArgs) -> Result<Silence, String> {
    let nonempty = |o: &Option<String>| o.clone().filter(|s| !s.is_empty());
    let s = Silence {
        // Empty: the server derives `entity:subscription:check`.
        name: String::new(),
        entity: nonempty(&a.entity),
        subscription: nonempty(&a.subscription),
        check: nonempty(&a.check),
        begin_unix_secs: a.begin_unix_secs.unwrap_or(0),
        expire_secs: a.expire_secs,
        expire_on_resolve: a.expire_on_resolve,
        reason: a.reason.clone(),
        creator: a.creator.clone(),
    };
    if s.entity.is_none() && s.subscription.is_none() && s.check.is_none() {
        return Err("give at least one of --entity, --subscription, --check".into());
    }
    if s.expire_secs == Some(0) {
        return Err("--expire-secs: must be at least 1 (omit it for no expiry)".into());
    }
    Ok(s)
}

fn now_ms() -> i64 {
    drover_core::time::now_ms()
}

/// Aligned columns, two spaces apart; the last column is not padded.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            s.push_str(cell);
            if i + 1 < cells.len() {
                let pad = widths[i] - cell.chars().count() + 2;
                s.extend(std::iter::repeat_n(' ', pad));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = vec![line(headers.to_vec())];
    for row in rows {
        out.push(line(row.iter().map(String::as_str).collect()));
    }
    out.join("\n")
}

/// A cell must stay on one line and one column, whatever the server sent.
fn cell(s: &str) -> String {
    let s: String = s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if s.is_empty() { "-".to_string() } else { s }
}

fn list(items: &[String]) -> String {
    cell(&items.join(","))
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

fn duration(secs: i64) -> String {
    let secs = secs.max(0);
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn age(now_ms: i64, then_ms: i64) -> String {
    if then_ms <= 0 { "never".to_string() } else { format!("{} ago", duration((now_ms - then_ms) / 1000)) }
}

fn entity_table(entities: &[Entity], now_ms: i64) -> String {
    let rows: Vec<Vec<String>> = entities
        .iter()
        .map(|e| {
            vec![
                cell(&e.name),
                match e.class {
                    EntityClass::Agent => "agent".into(),
                    EntityClass::Proxy => "proxy".into(),
                },
                list(&e.subscriptions),
                age(now_ms, e.last_seen_ms),
                if e.class == EntityClass::Proxy { "-".into() } else { yes_no(e.connected) },
            ]
        })
        .collect();
    table(&["NAME", "CLASS", "SUBSCRIPTIONS", "LAST_SEEN", "CONNECTED"], &rows)
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

fn check_table(checks: &[CheckSpec]) -> String {
    let rows: Vec<Vec<String>> = checks
        .iter()
        .map(|c| {
            let schedule = match (&c.interval_secs, &c.cron) {
                (Some(i), _) => format!("{i}s"),
                (None, Some(cron)) => cron.clone(),
                (None, None) => "-".into(),
            };
            let mut subs = list(&c.subscriptions);
            if c.round_robin {
                subs.push_str(" (round robin)");
            }
            vec![cell(&c.name), cell(&truncate(&c.command, 40)), cell(&schedule), subs, list(&c.handlers)]
        })
        .collect();
    table(&["NAME", "COMMAND", "INTERVAL/CRON", "SUBSCRIPTIONS", "HANDLERS"], &rows)
}

fn event_table(events: &[Event]) -> String {
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            vec![
                cell(&e.entity),
                cell(&e.check),
                e.status.as_str().to_string(),
                match e.state {
                    EventState::Passing => "passing",
                    EventState::Failing => "failing",
                    EventState::Flapping => "flapping",
                }
                .to_string(),
                e.occurrences.to_string(),
                yes_no(e.is_silenced()),
                cell(&truncate(first_line(&e.output), 60)),
            ]
        })
        .collect();
    table(&["ENTITY", "CHECK", "STATUS", "STATE", "OCCURRENCES", "SILENCED", "OUTPUT"], &rows)
}

fn silence_expiry(s: &Silence, now_secs: i64) -> String {
    let base = match (s.expire_secs, s.begin_unix_secs) {
        (None, _) => None,
        // Not yet stamped by the server: all we know is the lifetime.
        (Some(e), 0) => Some(format!("{} after start", duration(e as i64))),
        (Some(_), _) => s
            .expires_at_unix_secs()
            .map(|at| if at <= now_secs { "expired".to_string() } else { format!("in {}", duration(at - now_secs)) }),
    };
    match (base, s.expire_on_resolve) {
        (None, false) => "never".into(),
        (None, true) => "on resolve".into(),
        (Some(b), false) => b,
        (Some(b), true) => format!("{b} or on resolve"),
    }
}

fn silence_table(silences: &[Silence], now_secs: i64) -> String {
    let opt = |o: &Option<String>| cell(o.as_deref().unwrap_or(""));
    let rows: Vec<Vec<String>> = silences
        .iter()
        .map(|s| {
            vec![
                cell(&s.name),
                opt(&s.entity),
                opt(&s.subscription),
                opt(&s.check),
                silence_expiry(s, now_secs),
                cell(&truncate(first_line(&s.reason), 60)),
            ]
        })
        .collect();
    table(&["NAME", "ENTITY", "SUBSCRIPTION", "CHECK", "EXPIRES", "REASON"], &rows)
}

/// `get` in table format: one `key: value` line per field, multi-line strings indented
/// below their key, nested values as compact JSON.
fn details(text: &str) -> Result<String, String> {
    let v: Value = parse(text)?;
    let Value::Object(map) = v else { return Ok(serde_json::to_string_pretty(&v).expect("a Value always serializes")) };
    let width = map.keys().map(|k| k.len()).max().unwrap_or(0);
    let mut out = Vec::new();
    for (k, v) in &map {
        let rendered = match v {
            Value::String(s) if s.contains('\n') => {
                out.push(format!("{k}:"));
                for l in s.lines() {
                    out.push(format!("  {l}"));
                }
                continue;
            }
            Value::String(s) => s.clone(),
            Value::Array(items) if items.iter().all(|i| i.is_string()) => {
                items.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(",")
            }
            other => other.to_string(),
        };
        out.push(format!("{k:width$}  {rendered}", k = format!("{k}:"), width = width + 1));
    }
    Ok(out.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;
    use drover_core::Status;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::sync::mpsc;

    /// What the fake server saw: method, path, Authorization header, body.
    type Seen = (String, String, Option<String>, String);

    /// Serves the given (status, body) responses in order, one per connection.
    fn fake_server(responses: Vec<(u16, &'static str)>) -> (String, mpsc::Receiver<Seen>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for (status, body) in responses {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut first = String::new();
                reader.read_line(&mut first).unwrap();
                let mut parts = first.split_whitespace();
                let (method, path) = (parts.next().unwrap().to_string(), parts.next().unwrap().to_string());
                let (mut auth, mut len) = (None, 0usize);
                loop {
                    let mut h = String::new();
                    reader.read_line(&mut h).unwrap();
                    if h.trim().is_empty() {
                        break;
                    }
                    let (name, value) = h.split_once(':').unwrap();
                    match name.to_ascii_lowercase().as_str() {
                        "authorization" => auth = Some(value.trim().to_string()),
                        "content-length" => len = value.trim().parse().unwrap(),
                        _ => {}
                    }
                }
                let mut body_in = vec![0; len];
                reader.read_exact(&mut body_in).unwrap();
                tx.send((method, path, auth, String::from_utf8(body_in).unwrap())).unwrap();
                let mut s = stream;
                write!(
                    s,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
            }
        });
        (url, rx)
    }

    fn ctl(url: &str, rest: &[&str]) -> CtlArgs {
        let mut argv = vec!["drover", "ctl", "--server", url, "--token", "t0k"];
        argv.extend_from_slice(rest);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Ctl(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn json_list_prints_the_servers_array_and_sends_the_token() {
        let (url, seen) = fake_server(vec![(200, r#"[{"name":"web1","subscriptions":["web"]}]"#)]);
        let out = execute(&ctl(&url, &["--format", "json", "entities", "list"])).unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v[0]["name"], "web1");
        let (method, path, auth, _) = seen.recv().unwrap();
        assert_eq!((method.as_str(), path.as_str(), auth.as_deref()), ("GET", "/api/v1/entities", Some("Bearer t0k")));
    }

    #[test]
    fn unauthorized_shows_the_server_message_and_a_token_hint() {
        let (url, _seen) = fake_server(vec![(401, r#"{"error":"missing or invalid token"}"#)]);
        let e = execute(&ctl(&url, &["checks", "list"])).unwrap_err();
        assert!(e.starts_with("missing or invalid token (HTTP 401)"), "{e}");
        assert!(e.contains("--token") && e.contains("DROVER_TOKEN"), "{e}");
    }

    #[test]
    fn validation_error_names_the_field() {
        let (url, _seen) = fake_server(vec![(400, r#"{"error":"must be at least 1","field":"expire_secs"}"#)]);
        let e = execute(&ctl(&url, &["silences", "create", "--check", "cpu", "--expire-secs", "5"])).unwrap_err();
        assert_eq!(e, "must be at least 1 (field `expire_secs`) (HTTP 400)");
    }

    #[test]
    fn unreachable_server_is_named() {
        // Never bound by this process (see drover_testkit).
        let port = drover_testkit::free_port();
        let url = format!("http://127.0.0.1:{port}");
        let e = execute(&ctl(&url, &["entities", "list"])).unwrap_err();
        assert!(e.starts_with(&format!("cannot reach drover server at {url}: ")), "{e}");
    }

    #[test]
    fn silence_create_posts_selectors_and_leaves_the_name_to_the_server() {
        let (url, seen) = fake_server(vec![(
            201,
            r#"{"name":"*:web:http","subscription":"web","check":"http","begin_unix_secs":100,"expire_secs":60,"reason":"deploy","creator":"ann"}"#,
        )]);
        let args = ctl(
            &url,
            &[
                "silences",
                "create",
                "--subscription",
                "web",
                "--check",
                "http",
                "--expire-secs",
                "60",
                "--reason",
                "deploy",
                "--creator",
                "ann",
            ],
        );
        let out = execute(&args).unwrap();
        assert!(out.lines().nth(1).unwrap().starts_with("*:web:http"), "{out}");
        let (method, path, _, body) = seen.recv().unwrap();
        assert_eq!((method.as_str(), path.as_str()), ("POST", "/api/v1/silences"));
        let sent: Silence = serde_json::from_str(&body).unwrap();
        assert_eq!(sent.name, "");
        assert_eq!(sent.subscription.as_deref(), Some("web"));
        assert_eq!(sent.expire_secs, Some(60));
        assert_eq!(sent.creator, "ann");
    }

    #[test]
    fn execute_posts_an_empty_object_and_reports_the_count() {
        let (url, seen) = fake_server(vec![(202, r#"{"issued":3}"#)]);
        let out = execute(&ctl(&url, &["checks", "execute", "cpu"])).unwrap();
        assert_eq!(out, "check cpu: execution requested on 3 agent(s)");
        let (method, path, _, body) = seen.recv().unwrap();
        assert_eq!((method.as_str(), path.as_str(), body.as_str()), ("POST", "/api/v1/checks/cpu/execute", "{}"));
    }

    #[test]
    fn apply_puts_each_check_of_the_file() {
        let (url, seen) = fake_server(vec![(201, ""), (200, "")]);
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("c.toml");
        std::fs::write(
            &f,
            "[checks.a]\ncommand = \"x\"\nsubscriptions = [\"s\"]\ninterval_secs = 5\n[checks.b]\ncommand = \"y\"\npublish = false\n",
        )
        .unwrap();
        let out = execute(&ctl(&url, &["checks", "apply", f.to_str().unwrap()])).unwrap();
        assert_eq!(out, "applied check a (created)\napplied check b (updated)");
        let (m, p, _, body) = seen.recv().unwrap();
        assert_eq!((m.as_str(), p.as_str()), ("PUT", "/api/v1/checks/a"));
        let sent: CheckSpec = serde_json::from_str(&body).unwrap();
        assert_eq!((sent.name.as_str(), sent.interval_secs), ("a", Some(5)));
        assert_eq!(seen.recv().unwrap().1, "/api/v1/checks/b");
    }

    #[test]
    fn invalid_apply_file_fails_before_any_request() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("c.toml");
        std::fs::write(&f, "[checks.a]\ncommand = \"x\"\nsubscriptions = [\"s\"]\ninterval_secs = 0\n").unwrap();
        let e = execute(&ctl("http://127.0.0.1:9", &["checks", "apply", f.to_str().unwrap()])).unwrap_err();
        assert!(e.contains("c.toml:4:1: checks.a.interval_secs"), "{e}");
    }

    #[test]
    fn names_are_escaped_in_paths() {
        assert_eq!(seg("*:web:http"), "*:web:http");
        assert_eq!(seg("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn tables_align_columns_and_show_ages() {
        let mut e = Entity::new("web1", EntityClass::Agent);
        e.subscriptions = vec!["web".into(), "linux".into()];
        e.last_seen_ms = 88_000;
        e.connected = true;
        let site = Entity::new("example-site", EntityClass::Proxy);
        let t = entity_table(&[e, site], 100_000);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "NAME          CLASS  SUBSCRIPTIONS  LAST_SEEN  CONNECTED");
        assert_eq!(lines[1], "web1          agent  web,linux      12s ago    yes");
        assert_eq!(lines[2], "example-site  proxy  -              never      -");
    }

    #[test]
    fn event_table_shows_status_name_and_first_output_line_truncated() {
        let result = drover_core::event::CheckResult {
            check: "disk".into(),
            entity: String::new(),
            status: Status::Critical,
            output: format!("DISK CRITICAL {}\nsecond line", "x".repeat(80)),
            issued_ms: 0,
            executed_ms: 0,
            duration_ms: 0,
            metrics: vec![],
            check_config: None,
        };
        let mut ev = Event::first("web1", &result, Default::default(), 1);
        ev.silenced_by = vec!["s".into()];
        let t = event_table(&[ev]);
        let row = t.lines().nth(1).unwrap();
        assert!(row.starts_with("web1    disk   CRITICAL  failing  1            yes       DISK CRITICAL x"), "{row}");
        assert!(row.ends_with('…') && !row.contains("second"), "{row}");
        assert_eq!(row.split("  ").last().unwrap().trim().chars().count(), 60);
    }

    #[test]
    fn silence_expiry_is_relative_to_now() {
        let mut s = Silence {
            name: "n".into(),
            entity: None,
            subscription: None,
            check: Some("c".into()),
            begin_unix_secs: 1000,
            expire_secs: Some(600),
            expire_on_resolve: false,
            reason: String::new(),
            creator: String::new(),
        };
        assert_eq!(silence_expiry(&s, 1300), "in 5m");
        assert_eq!(silence_expiry(&s, 1700), "expired");
        s.expire_secs = None;
        s.expire_on_resolve = true;
        assert_eq!(silence_expiry(&s, 1300), "on resolve");
    }
}
