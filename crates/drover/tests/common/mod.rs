//! Test harness: real `drover` processes on loopback, driven over HTTP.
//!
//! Every process is killed when its handle drops, so a failing test leaves nothing
//! running. Waits are polls with deadlines, never bare sleeps, so tests are as fast as
//! the system under test and fail with a message instead of hanging.
#![allow(dead_code)]

use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ADMIN: &str = "test-admin-token";
pub const AGENT: &str = "test-agent-token";

pub fn drover_bin() -> &'static str {
    env!("CARGO_BIN_EXE_drover")
}

pub fn plugins_dir() -> PathBuf {
    PathBuf::from(std::env::var("DROVER_NAGIOS_PLUGINS").unwrap_or_else(|_| "/usr/lib/nagios/plugins".into()))
}

/// Ports for the processes a test starts: one record for the whole test process, the
/// db harness included (see `drover_testkit`).
pub use drover_testkit::free_port;

/// Polls `f` every 100 ms until it returns Some, or panics with `what` after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A child process that is killed (SIGKILL) on drop unless already reaped.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(args: &[&str], log: PathBuf) -> Proc {
        Proc::spawn_with_env(args, &[], log)
    }

    /// [`Proc::spawn`] with these environment variables set as well.
    pub fn spawn_with_env(args: &[&str], env: &[(&str, &str)], log: PathBuf) -> Proc {
        let mut cmd = Command::new(drover_bin());
        cmd.args(args).envs(env.iter().copied());
        Proc::run(cmd, std::fs::File::create(&log).unwrap(), log)
    }

    /// drover with `args` inside network namespace `ns` (`ip netns exec`, which execs
    /// it, so the pid is drover's). The log is appended to, so a restarted process's
    /// log follows its predecessor's.
    pub fn spawn_in_netns(ns: &str, args: &[&str], log: PathBuf) -> Proc {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, drover_bin()]).args(args);
        Proc::run(cmd, std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap(), log)
    }

    /// Starts `cmd` (drover, or `ip netns exec` of it) with its output in `out`, the
    /// file at `log`.
    fn run(mut cmd: Command, out: std::fs::File, log: PathBuf) -> Proc {
        let child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        Proc { child, log }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn term(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "process did not exit after SIGTERM; log:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // A failing test shows what its processes said (the harness prints the test's
        // captured output), so a failure in CI can be read without running it again.
        if std::thread::panicking() {
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!("--- last lines of {} ---", self.log.display());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// A running `drover server` with its own config and data directories.
pub struct Server {
    pub proc: Proc,
    pub host: String,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Server {
    /// `files` are (name, content) pairs written into the config dir.
    pub fn start(files: &[(&str, &str)]) -> Server {
        Self::start_on("127.0.0.1", files)
    }

    /// Listening on `host` (an address of this machine, such as a veth's for tests
    /// with network namespaces).
    pub fn start_on(host: &str, files: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("conf.d")).unwrap();
        for (name, content) in files {
            std::fs::write(dir.path().join("conf.d").join(name), content).unwrap();
        }
        let port = free_port();
        let s = Server { proc: Self::spawn_proc(dir.path(), host, port), host: host.to_string(), port, dir };
        s.wait_healthy();
        s
    }

    fn spawn_proc(dir: &Path, host: &str, port: u16) -> Proc {
        let listen = format!("{host}:{port}");
        let conf = dir.join("conf.d");
        let data = dir.join("data");
        Proc::spawn(
            &[
                "server",
                "--config-dir",
                conf.to_str().unwrap(),
                "--data-dir",
                data.to_str().unwrap(),
                "--listen",
                &listen,
                "--admin-token",
                ADMIN,
                "--agent-token",
                AGENT,
            ],
            dir.join(format!("server-{port}.log")),
        )
    }

    pub fn wait_healthy(&self) {
        let url = format!("{}/health", self.url());
        wait_for(Duration::from_secs(20), "server /health", || {
            ureq::get(&url).call().ok().filter(|r| r.status() == 200).map(|_| ())
        });
    }

    /// Restarts on the same port and data dir; `kill9` chooses a crash or a clean stop.
    pub fn restart(&mut self, kill9: bool) {
        self.stop(kill9);
        self.start_again();
    }

    pub fn stop(&mut self, kill9: bool) {
        if kill9 {
            self.proc.kill9();
        } else {
            assert!(self.proc.term().success(), "server exited uncleanly:\n{}", self.proc.log_text());
        }
    }

    pub fn start_again(&mut self) {
        self.proc = Self::spawn_proc(self.dir.path(), &self.host, self.port);
        self.wait_healthy();
    }

    pub fn url(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}:{}", self.host, self.port)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn agent_http() -> ureq::Agent {
        ureq::Agent::config_builder().http_status_as_error(false).build().into()
    }

    /// GET with the admin token; returns (status, JSON body).
    pub fn get(&self, path: &str) -> (u16, Value) {
        self.request("GET", path, None, Some(ADMIN))
    }

    pub fn request(&self, method: &str, path: &str, body: Option<&str>, token: Option<&str>) -> (u16, Value) {
        let url = format!("{}{}", self.url(), path);
        let agent = Self::agent_http();
        let auth = token.map(|t| format!("Bearer {t}"));
        let resp = match (method, body) {
            ("GET", _) => {
                let mut r = agent.get(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            ("DELETE", _) => {
                let mut r = agent.delete(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            (m, b) => {
                let mut r = match m {
                    "POST" => agent.post(&url),
                    "PUT" => agent.put(&url),
                    other => panic!("method {other}"),
                };
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.header("Content-Type", "application/json").send(b.unwrap_or(""))
            }
        };
        let mut resp = resp.expect("HTTP request");
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub fn events(&self) -> Vec<Value> {
        let (st, v) = self.get("/api/v1/events");
        assert_eq!(st, 200, "{v}");
        v.as_array().unwrap().clone()
    }

    pub fn event(&self, entity: &str, check: &str) -> Option<Value> {
        let (st, v) = self.get(&format!("/api/v1/events/{entity}/{check}"));
        (st == 200).then_some(v)
    }

    pub fn entity(&self, name: &str) -> Option<Value> {
        let (st, v) = self.get(&format!("/api/v1/entities/{name}"));
        (st == 200).then_some(v)
    }

    /// Waits until `entity`'s event for `check` satisfies `pred`.
    pub fn wait_event(&self, entity: &str, check: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        wait_for(timeout, &format!("event {entity}/{check} to match"), || self.event(entity, check).filter(|e| pred(e)))
    }

    pub fn agent(&self, name: &str, subs: &str, extra: &[&str]) -> Proc {
        let url = self.ws_url();
        let mut args = vec!["agent", "--server", &url, "--name", name, "--token", AGENT];
        if !extra.contains(&"--api-listen") {
            // No loopback results endpoint unless a test asks: parallel agents would collide on 3031.
            args.extend(["--api-listen", ""]);
        }
        if !subs.is_empty() {
            args.extend(["--subscriptions", subs]);
        }
        args.extend_from_slice(extra);
        Proc::spawn(&args, self.dir.path().join(format!("agent-{name}-{}.log", free_port())))
    }

    /// Waits until `name` is registered and connected.
    pub fn wait_connected(&self, name: &str) {
        wait_for(Duration::from_secs(20), &format!("agent {name} connected"), || {
            self.entity(name).filter(|e| e["connected"] == true).map(|_| ())
        });
    }
}

pub fn status(ev: &Value) -> i64 {
    ev["status"].as_i64().unwrap_or(-1)
}

/// `dig +short` against `addr:port`, lines sorted (answers are shuffled).
pub fn dig_short(addr: &str, port: u16, name: &str, rtype: &str) -> Vec<String> {
    let out = Command::new("dig")
        .args([&format!("@{addr}"), "-p", &port.to_string(), "+norec", "+time=1", "+tries=1", "+short", name, rtype])
        .output()
        .expect("dig is installed (scripts/test.sh)");
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    v.sort();
    v
}

/// `ip ARGS` (iproute2), for tests that build network namespaces; panics on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip (iproute2) is installed");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}
