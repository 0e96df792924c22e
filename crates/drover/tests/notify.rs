//! The event pipeline through a real server and agent: alerts reach a real SMTP server
//! and a real HTTP receiver, survive the receiver being down, and end in the
//! dead-letter list when they cannot be delivered.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const T: Duration = Duration::from_secs(40);

/// A separate process that stores every POST body on its own line in `out`.
const RECEIVER: &str = r#"
import http.server, sys
out = sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get('Content-Length', 0)))
        with open(out, 'ab') as f:
            f.write(body.replace(b'\n', b' ') + b'\n')
        self.send_response(200)
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()
"#;

/// The helpers below run as `Proc`s, so a failing test prints what they said.
fn http_receiver(port: u16, out: &Path) -> Proc {
    let log = out.with_extension("receiver.log");
    let child = Command::new("python3")
        .args(["-c", RECEIVER, &port.to_string(), out.to_str().unwrap()])
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Proc { child, log }
}

/// aiosmtpd on `port`, once it is the one answering there: it greets with `220` and is
/// still running (a process that lost the bind exits, and something else may answer).
fn smtp_server(port: u16, maildir: &Path) -> Proc {
    use std::io::Read;
    let log = maildir.with_extension("smtp.log");
    let child = Command::new("python3")
        .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}"), "-c", "aiosmtpd.handlers.Mailbox"])
        .arg(maildir)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("python3 with aiosmtpd (scripts/test.sh installs it)");
    let mut k = Proc { child, log };
    wait_for(Duration::from_secs(15), "aiosmtpd greeting on its port", || {
        if let Ok(Some(status)) = k.child.try_wait() {
            panic!("aiosmtpd exited ({status}): {}", k.log_text());
        }
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut greeting = [0u8; 4];
        conn.read_exact(&mut greeting).ok()?;
        (&greeting[..3] == b"220").then_some(())
    });
    k
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p).unwrap_or_default().lines().map(str::to_string).collect()
}

#[test]
fn alert_reaches_mail_and_a_webhook_that_was_down_once_per_incident() {
    let dir = tempfile::tempdir().unwrap();
    let (hook_port, smtp_port) = (free_port(), free_port());
    let maildir = dir.path().join("mail");
    let _smtp = smtp_server(smtp_port, &maildir);
    let cfg = format!(
        r#"
[checks.replication]
command = "echo 'DB CRITICAL - replication stopped'; exit 2"
subscriptions = ["db"]
interval_secs = 1
splay = false
handlers = ["oncall"]

[handlers.oncall]
type = "set"
handlers = ["hook", "mail"]

[filters.first_only]
occurrences = 1
refresh_secs = 3600

[handlers.hook]
type = "http"
url = "http://127.0.0.1:{hook_port}/alert"
filters = ["is_incident", "not_silenced", "first_only"]
max_attempts = 50
retry_initial_ms = 200
body_template = '{{"text": "{{{{ .entity.name }}}}/{{{{ .check.name }}}}: {{{{ .check.output }}}}"}}'

[handlers.mail]
type = "smtp"
address = "127.0.0.1:{smtp_port}"
tls = "none"
from = "drover@test.invalid"
to = ["ops@test.invalid"]
filters = ["is_incident", "first_only"]
subject_template = "[{{{{ .check.status_name }}}}] {{{{ .entity.name }}}}/{{{{ .check.name }}}}"
"#
    );
    let server = Server::start(&[("alerts.toml", &cfg)]);
    let _db = server.agent("db1", "db", &[]);
    server.wait_event("db1", "replication", T, |e| status(e) == 2);

    // The mail arrives with the templated subject.
    let subject = wait_for(T, "alert email in the maildir", || {
        let new = maildir.join("new");
        let f = std::fs::read_dir(&new).ok()?.filter_map(|e| e.ok()).next()?;
        let text = std::fs::read_to_string(f.path()).ok()?;
        text.lines().find(|l| l.starts_with("Subject:")).map(str::to_string)
    });
    assert_eq!(subject, "Subject: [CRITICAL] db1/replication");

    // The webhook receiver starts only now: the alert was retried until it arrived.
    std::thread::sleep(Duration::from_secs(2));
    let got = dir.path().join("hook.txt");
    let _hook = http_receiver(hook_port, &got);
    let body = wait_for(T, "webhook delivery after the receiver came up", || lines(&got).into_iter().next());
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["text"], "db1/replication: DB CRITICAL - replication stopped\n");
    // Throttled: one alert for the incident, although the check keeps failing.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(lines(&got).len(), 1, "one webhook per incident: {:?}", lines(&got));
    assert_eq!(std::fs::read_dir(maildir.join("new")).unwrap().count(), 1, "one mail per incident");

    let (_, stats) = server.get("/api/v1/pipeline");
    assert!(stats["delivered"].as_u64().unwrap() >= 2, "{stats}");
    assert!(stats["retried"].as_u64().unwrap() >= 1, "the webhook needed retries: {stats}");
}

#[test]
fn undeliverable_alert_is_dead_lettered_and_raises_a_handler_event() {
    let dead_port = free_port(); // nothing listens here
    let cfg = format!(
        r#"
[checks.disk]
command = "echo 'DISK CRITICAL | used=99%;80;90'; exit 2"
subscriptions = ["s"]
interval_secs = 1
handlers = ["nowhere"]

[handlers.nowhere]
type = "tcp"
address = "127.0.0.1:{dead_port}"
max_attempts = 2
retry_initial_ms = 100
"#
    );
    let server = Server::start(&[("dead.toml", &cfg)]);
    let _a = server.agent("n1", "s", &[]);
    let letters = wait_for(T, "a dead letter", || {
        let out = Command::new(drover_bin())
            .args(["ctl", "--server", &server.url(), "--token", ADMIN, "deadletters", "list", "--format", "json"])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v.as_array().filter(|a| !a.is_empty()).cloned()
    });
    assert_eq!(letters[0]["handler"], "nowhere");
    assert_eq!(letters[0]["entity"], "n1");
    assert_eq!(letters[0]["attempts"], 2);
    let ev = server.wait_event("drover-server", "handler-nowhere", T, |e| status(e) == 2);
    assert!(ev["output"].as_str().unwrap().contains("nowhere"), "{ev}");

    // Dead letters can be dropped through the API.
    let id = letters[0]["id"].as_u64().unwrap();
    assert_eq!(server.request("DELETE", &format!("/api/v1/deadletters/{id}"), None, Some(ADMIN)).0, 204);

    // Metric points are exposed for Prometheus with entity and check labels.
    let body = ureq::get(&format!("{}/metrics", server.url())).call().unwrap().body_mut().read_to_string().unwrap();
    let line = body
        .lines()
        .find(|l| l.starts_with("drover_check_metric{") && l.contains("check=\"disk\""))
        .unwrap_or_default();
    assert!(line.contains("entity=\"n1\"") && line.contains("name=\"used\"") && line.ends_with(" 99"), "{line}");
    assert!(body.contains("drover_pipeline_dead_lettered_total"), "pipeline counters exported");
}

#[test]
fn bad_filter_expression_is_refused_at_load_with_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("conf.d");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(conf.join("f.toml"), "[filters.prod]\nexpressions = ['event.check.occurrences >= ']\n").unwrap();
    let out =
        Command::new(drover_bin()).args(["check-config", "--config-dir", conf.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("f.toml:2:") && err.contains("filters.prod"), "names file, line and filter: {err}");
    let out = Command::new(drover_bin())
        .args(["server", "--config-dir", conf.to_str().unwrap(), "--data-dir", dir.path().join("d").to_str().unwrap()])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .output()
        .unwrap();
    assert!(!out.status.success(), "the server refuses to start with it");
    assert!(String::from_utf8_lossy(&out.stderr).contains("f.toml:2:"));
}

#[test]
fn dead_node_alert_goes_to_the_keepalive_handlers() {
    let dir = tempfile::tempdir().unwrap();
    let hook_port = free_port();
    let got = dir.path().join("hook.txt");
    let _hook = http_receiver(hook_port, &got);
    let cfg = format!(
        "[server]\nkeepalive_handlers = [\"pager\"]\n\n\
         [handlers.pager]\ntype = \"http\"\nurl = \"http://127.0.0.1:{hook_port}/page\"\nfilters = [\"is_incident\"]\n"
    );
    let server = Server::start(&[("server.toml", &cfg)]);
    let mut node = server.agent(
        "www3",
        "web",
        &["--keepalive-interval-secs", "1", "--keepalive-warning-secs", "2", "--keepalive-critical-secs", "3"],
    );
    server.wait_connected("www3");
    node.kill9();
    let page = wait_for(T, "keepalive alert delivered", || {
        lines(&got).into_iter().find(|l| l.contains("\"status\":2") || l.contains("CRITICAL"))
    });
    let v: serde_json::Value = serde_json::from_str(&page).unwrap();
    assert_eq!(v["entity"]["name"], "www3", "{v}");
    assert_eq!(v["check"]["name"], "keepalive", "{v}");
    assert!(v["check"]["output"].as_str().unwrap().contains("No keepalive"), "{v}");
}
