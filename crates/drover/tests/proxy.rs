//! `drover proxy` as a real process: signals, reload, drain, config errors.
//!
//! Backends are tiny blocking HTTP/1.1 servers on threads in this process; clients are
//! raw sockets, so every status (502, 503) is seen as-is.

mod common;

use common::{Proc, free_port, wait_for};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Answers `NAME PATH` to every request; `/slow` takes 1.5 s. Counts non-health hits.
struct Backend {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

fn backend(name: &'static str) -> Backend {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let h = h.clone();
            std::thread::spawn(move || serve_one(s, name, &h));
        }
    });
    Backend { addr, hits }
}

fn serve_one(mut s: TcpStream, name: &str, hits: &AtomicUsize) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
    if path != "/healthz" {
        hits.fetch_add(1, Ordering::SeqCst);
    }
    if path == "/slow" {
        std::thread::sleep(Duration::from_millis(1500));
    }
    let body = format!("{name} {path}");
    let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
}

/// One request on a fresh connection; `(status, body)`.
fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    let status = out.split(' ').nth(1).and_then(|c| c.parse().ok()).ok_or(format!("no status in {out:?}"))?;
    Ok((status, out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string()))
}

fn config(port: u16, routes: &[(&str, &[SocketAddr])]) -> String {
    let mut s = format!(
        "drain_timeout_secs = 5\n\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:{port}\"\nprotocol = \"http\"\n"
    );
    for (prefix, _) in routes {
        let svc = prefix.trim_matches('/');
        let svc = if svc.is_empty() { "root" } else { svc };
        s += &format!("\n[[routes]]\nlistener = \"web\"\npath_prefix = \"{prefix}\"\nservice = \"{svc}\"\n");
    }
    for (prefix, addrs) in routes {
        let svc = prefix.trim_matches('/');
        let svc = if svc.is_empty() { "root" } else { svc };
        let bs: Vec<String> = addrs.iter().map(|a| format!("{{ address = \"{a}\" }}")).collect();
        s += &format!(
            "\n[services.{svc}]\nbackends = [{}]\n[services.{svc}.health]\nkind = \"http\"\npath = \"/healthz\"\ninterval_ms = 50\ntimeout_ms = 50\n",
            bs.join(", ")
        );
    }
    s
}

fn start(dir: &Path, text: &str) -> (Proc, std::path::PathBuf) {
    start_with(dir, text, &[])
}

fn start_with(dir: &Path, text: &str, extra: &[&str]) -> (Proc, std::path::PathBuf) {
    start_with_env(dir, text, extra, &[])
}

fn start_with_env(dir: &Path, text: &str, extra: &[&str], env: &[(&str, &str)]) -> (Proc, std::path::PathBuf) {
    let file = dir.join("proxy.toml");
    std::fs::write(&file, text).unwrap();
    let mut args = vec!["proxy", "--config", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    let p = Proc::spawn_with_env(&args, env, dir.join("proxy.log"));
    (p, file)
}

fn threads_of(p: &Proc) -> usize {
    std::fs::read_dir(format!("/proc/{}/task", p.pid())).unwrap().count()
}

/// Starts `/slow` on `a` through the proxy at `addr`, sends SIGTERM while it is at the
/// backend, and checks that it still gets its answer and the proxy then exits 0.
fn slow_request_outlives_sigterm(p: &mut Proc, a: &Backend, addr: SocketAddr) {
    let before = a.hits.load(Ordering::SeqCst);
    let slow = std::thread::spawn(move || get(addr, "/slow"));
    wait_for(Duration::from_secs(5), "slow request at the backend", || {
        (a.hits.load(Ordering::SeqCst) > before).then_some(())
    });
    let t0 = Instant::now();
    let status = p.term();
    assert!(status.success(), "exit status {status:?}\n{}", p.log_text());
    assert_eq!(slow.join().unwrap().unwrap(), (200, "a /slow".to_string()));
    assert!(t0.elapsed() >= Duration::from_millis(800), "exited before the request finished");
    assert!(TcpStream::connect(addr).is_err(), "still accepting after exit");
}

fn signal(p: &Proc, sig: &str) {
    assert!(
        std::process::Command::new("kill").arg(format!("-{sig}")).arg(p.pid().to_string()).status().unwrap().success()
    );
}

#[test]
fn sighup_applies_a_valid_config_and_keeps_the_old_one_when_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (backend("a"), backend("b"));
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (p, file) = start(dir.path(), &config(port, &[("/", &[a.addr])]));
    wait_for(Duration::from_secs(10), "proxy serving a", || get(addr, "/x").ok().filter(|r| r.0 == 200));

    let good = config(port, &[("/", &[a.addr]), ("/b", &[b.addr])]);
    let b_health = good.find("[services.b.health]").unwrap();
    let bad =
        format!("{}{}", &good[..b_health], good[b_health..].replacen("interval_ms = 50\n", "interval_ms = 0\n", 1));
    let line = bad.lines().position(|l| l == "interval_ms = 0").unwrap() + 1;
    std::fs::write(&file, &bad).unwrap();
    signal(&p, "HUP");
    wait_for(Duration::from_secs(5), "the reload error in the log", || {
        p.log_text().contains("invalid config, keeping the running one").then_some(())
    });
    let log = p.log_text();
    let want = format!("proxy.toml:{line}:1: services.b.health.interval_ms: must be at least 10");
    assert!(log.contains(&want), "{want}\n{log}");
    assert_eq!(get(addr, "/b/1").unwrap(), (200, "a /b/1".to_string()), "old routes still serve");

    std::fs::write(&file, config(port, &[("/b", &[b.addr]), ("/", &[a.addr])])).unwrap();
    signal(&p, "HUP");
    wait_for(Duration::from_secs(5), "/b routed to the new backend", || {
        get(addr, "/b/2").ok().filter(|r| r.1 == "b /b/2")
    });
    assert_eq!(get(addr, "/other").unwrap(), (200, "a /other".to_string()));
    drop(p);
}

#[test]
fn sigterm_lets_the_in_flight_slow_request_finish_then_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let a = backend("a");
    let a_addr = a.addr;
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (mut p, _) = start_with(dir.path(), &config(port, &[("/", &[a.addr])]), &["--log-format", "json"]);
    wait_for(Duration::from_secs(10), "proxy serving", || get(addr, "/x").ok().filter(|r| r.0 == 200));
    slow_request_outlives_sigterm(&mut p, &a, addr);
    let log = p.log_text();
    let access = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["target"] == "drover_proxy::access" && v["fields"]["path"] == "/slow")
        .unwrap_or_else(|| panic!("no JSON access line for /slow:\n{log}"));
    assert_eq!(access["fields"]["status"], 200, "{access}");
    assert_eq!(access["fields"]["backend"], a_addr.to_string(), "{access}");
}

#[test]
fn one_worker_is_one_thread_that_serves_checks_and_drains() {
    // TOKIO_WORKER_THREADS=1 is nginx's `worker_processes 1`: accepting, health checks
    // and connections share one thread, and the process starts no other.
    let dir = tempfile::tempdir().unwrap();
    let (a, dead) = (backend("a"), common::free_port());
    let dead: SocketAddr = format!("127.0.0.1:{dead}").parse().unwrap();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let text = config(port, &[("/", &[a.addr, dead])]).replacen(
        "protocol = \"http\"\n",
        "protocol = \"http\"\nrequest_head_timeout_secs = 1\n",
        1,
    );
    let (mut p, _) = start_with_env(dir.path(), &text, &[], &[("TOKIO_WORKER_THREADS", "1")]);
    wait_for(Duration::from_secs(10), "proxy serving", || get(addr, "/x").ok().filter(|r| r.0 == 200));
    for i in 0..20 {
        assert_eq!(get(addr, &format!("/{i}")).unwrap(), (200, format!("a /{i}")));
    }
    assert_eq!(threads_of(&p), 1, "threads of a one-worker proxy");
    // Its timers run on that thread too: a client that connects and sends nothing is
    // closed after request_head_timeout_secs.
    let mut silent = TcpStream::connect(addr).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let connected = Instant::now();
    let mut sink = [0u8; 64];
    assert!(matches!(silent.read(&mut sink), Ok(0)), "a silent client was not closed within 5 s");
    let took = connected.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(4), "closed after {took:?}");
    slow_request_outlives_sigterm(&mut p, &a, addr);

    // The same config with two workers runs them on threads of their own.
    let (p, _) = start_with_env(dir.path(), &text, &[], &[("TOKIO_WORKER_THREADS", "2")]);
    wait_for(Duration::from_secs(10), "proxy serving", || get(addr, "/x").ok().filter(|r| r.0 == 200));
    assert!(threads_of(&p) > 2, "threads of a two-worker proxy: {}", threads_of(&p));
}

#[test]
fn check_config_locates_proxy_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    std::fs::write(&file, "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:1\"\nprotocol = \"udp\"\n").unwrap();
    let out = std::process::Command::new(common::drover_bin())
        .args(["check-config", "--proxy-config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("p.toml:4:12:"), "{err}");
}

/// A keep-alive HTTP/1.1 backend in its own process, so it can really be `kill -9`ed.
const PY_BACKEND: &str = r#"
import http.server, sys
class S(http.server.ThreadingHTTPServer):
    request_queue_size = 256
    daemon_threads = True
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        b = sys.argv[2].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)
    def log_message(self, *a):
        pass
S(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

/// One python backend process per name (killable on their own), and their addresses.
fn python_backends(names: &[&str]) -> (Vec<Child>, Vec<SocketAddr>) {
    let mut kids = Vec::new();
    let mut addrs = Vec::new();
    for name in names {
        let port = free_port();
        let child = std::process::Command::new("python3")
            .args(["-c", PY_BACKEND, &port.to_string(), name])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("python3");
        kids.push(Child(child));
        addrs.push(format!("127.0.0.1:{port}").parse::<SocketAddr>().unwrap());
    }
    (kids, addrs)
}

struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn kill_9_of_a_backend_under_load_fails_no_get() {
    let dir = tempfile::tempdir().unwrap();
    let (mut kids, addrs) = python_backends(&["a", "b", "c"]);
    let port = free_port();
    let admin = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let text = format!("admin_listen = \"127.0.0.1:{admin}\"\n{}", config(port, &[("/", &addrs)]));
    let (p, _) = start(dir.path(), &text);
    let admin: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    wait_for(Duration::from_secs(15), "all three backends healthy", || {
        let (_, body) = get(admin, "/backends").ok()?;
        (body.matches("\"state\":\"healthy\"").count() == 3).then_some(())
    });
    let done = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..20)
        .map(|_| {
            let done = done.clone();
            std::thread::spawn(move || {
                let mut failed = Vec::new();
                for _ in 0..100 {
                    match get(addr, "/x") {
                        Ok((200, _)) => {}
                        other => failed.push(format!("{other:?}")),
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
                failed
            })
        })
        .collect();
    wait_for(Duration::from_secs(20), "500 requests done", || (done.load(Ordering::SeqCst) >= 500).then_some(()));
    kids[1].0.kill().unwrap(); // SIGKILL
    let failed: Vec<String> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    assert!(
        failed.is_empty(),
        "{} of 2000 GETs failed: {:?}\n{}",
        failed.len(),
        &failed[..failed.len().min(3)],
        p.log_text()
    );
    let (_, body) = get(admin, "/backends").unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let dead = v["services"]["root"].as_array().unwrap().iter().find(|b| b["address"] == addrs[1].to_string()).unwrap();
    assert_ne!(dead["state"], "healthy", "{dead}");
}

/// `drover proxy --server … --listen …` as an operator runs it.
fn fed_proxy(srv: &common::Server, dir: &Path, port: u16, admin: u16, log: &str) -> Proc {
    let url = srv.url();
    let listen = format!("127.0.0.1:{port}=web:1");
    let admin = format!("127.0.0.1:{admin}");
    let state = dir.join("members.json");
    let args = [
        "proxy",
        "--server",
        &url,
        "--token",
        common::AGENT,
        "--listen",
        &listen,
        "--admin-listen",
        &admin,
        "--state-file",
        state.to_str().unwrap(),
    ];
    Proc::spawn(&args, dir.join(log))
}

fn backends_doc(admin: SocketAddr) -> Option<serde_json::Value> {
    let (_, body) = get(admin, "/backends").ok()?;
    serde_json::from_str(&body).ok()
}

/// Names of the backends that answer `n` GETs in a row (any failure is returned as an error).
fn answering(addr: SocketAddr, n: usize) -> Result<std::collections::BTreeSet<String>, String> {
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..n {
        match get(addr, "/x")? {
            (200, body) => seen.insert(body.split(' ').next().unwrap_or("").to_string()),
            other => return Err(format!("{other:?}")),
        };
    }
    Ok(seen)
}

#[test]
fn fed_proxy_follows_member_health_and_keeps_serving_through_server_and_own_restarts() {
    let mut srv = common::Server::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (backend("one"), backend("two"));
    let ka = ["--keepalive-interval-secs", "1", "--keepalive-warning-secs", "2", "--keepalive-critical-secs", "3"];
    let member = |name: &str, port: u16| {
        let label = format!("port={port}");
        let mut extra = vec!["--address", "127.0.0.1", "--label", &label];
        extra.extend(ka);
        srv.agent(name, "web", &extra)
    };
    let _web1 = member("web1", one.addr.port());
    let mut web2 = member("web2", two.addr.port());
    let (port, admin_port) = (free_port(), free_port());
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let mut proxy = fed_proxy(&srv, dir.path(), port, admin_port, "proxy-1.log");

    let t = Duration::from_secs(20);
    wait_for(t, "both members serving through the proxy", || {
        answering(addr, 6).ok().filter(|s| s.len() == 2).map(|_| ())
    });

    // A member whose agent is up but whose port is closed never gets a request.
    let closed = free_port();
    let _web3 = member("web3", closed);
    srv.wait_connected("web3");
    wait_for(t, "web3 listed as a backend", || {
        let doc = backends_doc(admin)?;
        let list = doc["services"]["web-1"].as_array()?.clone();
        list.iter().find(|b| b["entity"] == "web3").cloned()
    });
    let seen =
        answering(addr, 30).unwrap_or_else(|e| panic!("a GET failed while web3 was out: {e}\n{}", proxy.log_text()));
    assert_eq!(seen.len(), 2, "{seen:?}");
    let doc = backends_doc(admin).unwrap();
    let web3 = doc["services"]["web-1"].as_array().unwrap().iter().find(|b| b["entity"] == "web3").unwrap().clone();
    assert_eq!(web3["state"], "unhealthy", "{web3}");

    // web2's node dies: its keepalive lapses and the control plane takes it out.
    let killed = Instant::now();
    web2.kill9();
    wait_for(t, "web2 out of rotation", || {
        let doc = backends_doc(admin)?;
        let b = doc["services"]["web-1"].as_array()?.iter().find(|b| b["entity"] == "web2")?.clone();
        (b["state"] == "unhealthy" && b["reason"].as_str()?.contains("control plane")).then_some(())
    });
    eprintln!("web2 out of rotation {} ms after its agent died", killed.elapsed().as_millis());
    assert_eq!(answering(addr, 20).unwrap(), ["one".to_string()].into());

    // The control plane dies: the proxy keeps the last known members.
    srv.stop(true);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(answering(addr, 20).unwrap(), ["one".to_string()].into(), "{}", proxy.log_text());

    // And the proxy restarts while the control plane is still down: it serves from disk.
    proxy.kill9();
    let proxy2 = fed_proxy(&srv, dir.path(), port, admin_port, "proxy-2.log");
    wait_for(t, "the restarted proxy serving from its state file", || {
        answering(addr, 10).ok().filter(|s| s == &["one".to_string()].into()).map(|_| ())
    });
    assert!(proxy2.log_text().contains("from disk"), "{}", proxy2.log_text());
    drop(proxy2);
    drop(proxy);
}

#[test]
fn tcp_listener_fronts_a_real_redis() {
    let dir = tempfile::tempdir().unwrap();
    let redis_port = free_port();
    let _redis = Child(
        std::process::Command::new("redis-server")
            .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (scripts/test.sh installs it)"),
    );
    let port = free_port();
    let text = format!(
        "[[listeners]]\nname = \"redis\"\nbind = \"127.0.0.1:{port}\"\nprotocol = \"tcp\"\nservice = \"redis\"\n\n\
         [services.redis]\nbackends = [{{ address = \"127.0.0.1:{redis_port}\" }}]\n\
         [services.redis.health]\nkind = \"tcp\"\ninterval_ms = 100\ntimeout_ms = 100\nrise = 1\n"
    );
    let (p, _) = start(dir.path(), &text);
    let cli = |args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    wait_for(Duration::from_secs(15), "redis PONG through the proxy", || (cli(&["PING"]) == "PONG").then_some(()));
    assert_eq!(cli(&["SET", "drover", "front door"]), "OK");
    assert_eq!(cli(&["GET", "drover"]), "front door", "{}", p.log_text());
    // Many round trips on one connection: the byte stream is relayed as is.
    let out = std::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-r", "200", "INCR", "n"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(cli(&["GET", "n"]), "200");
}

#[test]
fn hey_load_with_a_backend_killed_sees_no_failed_get() {
    let dir = tempfile::tempdir().unwrap();
    let (mut kids, addrs) = python_backends(&["a", "b", "c"]);
    let (port, admin) = (free_port(), free_port());
    let text = format!("admin_listen = \"127.0.0.1:{admin}\"\n{}", config(port, &[("/", &addrs)]));
    let (p, _) = start(dir.path(), &text);
    let admin: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    wait_for(Duration::from_secs(15), "all three backends healthy", || {
        let (_, body) = get(admin, "/backends").ok()?;
        (body.matches("\"state\":\"healthy\"").count() == 3).then_some(())
    });
    let hey = std::process::Command::new("hey")
        .args(["-z", "4s", "-c", "16", &format!("http://127.0.0.1:{port}/x")])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("hey (scripts/test.sh installs it)");
    std::thread::sleep(Duration::from_millis(1500));
    kids[0].0.kill().unwrap(); // SIGKILL, mid-load
    let out = hey.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout).to_string();
    let ok: u64 = report
        .lines()
        .find_map(|l| l.trim().strip_prefix("[200]")?.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no 200s in hey's report:\n{report}"));
    assert!(ok > 100, "hey got only {ok} responses:\n{report}");
    let other_status = report.lines().filter(|l| l.trim().starts_with('[') && !l.trim().starts_with("[200]")).count();
    assert!(
        other_status == 0 && !report.contains("Error distribution"),
        "failed requests under load:\n{report}\n{}",
        p.log_text()
    );
}
