//! bench/agents: simulates many drover agents in one process against a real server.
//!
//! Modes:
//! - `flood`: every simulated agent streams results as fast as acknowledgements allow
//!   (a window of unacknowledged results per agent); reports results stored per second
//!   and per server CPU-second — the "results per second per core" figure.
//! - `hold`: N agents connect and keep default keepalive rates and answer every check
//!   request the server publishes; reports whether all stay connected, and server
//!   CPU and RSS while holding them.
//! - `agent-idle`: starts one real `drover agent` and measures its RSS and idle CPU.
//!
//! The server is started by the bench (a release `drover server` on loopback) so its
//! CPU time and RSS can be read from /proc.

use anyhow::{Context, bail};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[derive(Parser)]
struct Args {
    /// flood | hold | agent-idle
    #[arg(long, default_value = "flood")]
    mode: String,
    #[arg(long, default_value_t = 100)]
    agents: usize,
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Unacknowledged results in flight per agent (flood).
    #[arg(long, default_value_t = 256)]
    window: u64,
    /// Distinct checks each agent reports (flood): more keys, less coalescing.
    #[arg(long, default_value_t = 10)]
    checks: u64,
    #[arg(long, default_value = "target/release/drover")]
    drover: String,
    /// Check interval for hold mode.
    #[arg(long, default_value_t = 10)]
    check_interval_secs: u64,
    /// flood only: attach a handler to every result's check — none | slow | http | tcp.
    /// `slow` is a pipe handler that sleeps 5 s (4 at once): ingestion must not notice.
    #[arg(long, default_value = "none")]
    handler: String,
    /// flood only: offered results per second across all agents (0 = as fast as acks allow).
    #[arg(long, default_value_t = 0)]
    rate: u64,
}

const TOKEN: &str = "bench-agent";

struct ServerProc {
    child: Child,
    port: u16,
    _dir: tempfile_dir::Dir,
}

mod tempfile_dir {
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// (utime + stime) in seconds and RSS in KiB, from /proc.
fn proc_usage(pid: u32) -> anyhow::Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = &stat[stat.rfind(')').context("stat format")? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok((ticks / 100.0, rss))
}

/// Server config that gives the flood's checks `c0..cN` a handler.
fn handler_config(kind: &str, checks: u64, sink_port: u16) -> anyhow::Result<String> {
    let handler = match kind {
        // The same checks, defined on the server, with no handler: the baseline that
        // isolates what attaching a handler costs.
        "none" => {
            return Ok((0..checks)
                .map(|c| format!("[checks.c{c}]\ncommand = \"true\"\npublish = false\n\n"))
                .collect());
        }
        "slow" => "type = \"pipe\"\ncommand = \"sleep 5\"\nmax_concurrent = 4\ntimeout_secs = 10\n".to_string(),
        "http" => format!("type = \"http\"\nurl = \"http://127.0.0.1:{sink_port}/\"\nmax_concurrent = 64\n"),
        "tcp" => format!("type = \"tcp\"\naddress = \"127.0.0.1:{sink_port}\"\nmax_concurrent = 64\n"),
        other => bail!("--handler {other}: expected none, slow, http or tcp"),
    };
    let mut cfg = format!("[handlers.h]\n{handler}\n");
    for c in 0..checks {
        cfg.push_str(&format!("[checks.c{c}]\ncommand = \"true\"\npublish = false\nhandlers = [\"h\"]\n\n"));
    }
    Ok(cfg)
}

/// Counts what handlers deliver: newline-separated JSON over TCP, or HTTP requests
/// answered 200 (a minimal sink, so the bench measures drover, not the receiver).
async fn sink(listener: tokio::net::TcpListener, http: bool, count: Arc<AtomicU64>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut sock, _)) = listener.accept().await else { return };
        let count = count.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut pending: Vec<u8> = Vec::new();
            loop {
                let n = match sock.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if !http {
                    count.fetch_add(buf[..n].iter().filter(|b| **b == b'\n').count() as u64, Ordering::Relaxed);
                    continue;
                }
                pending.extend_from_slice(&buf[..n]);
                // One request per header block + Content-Length body.
                while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
                        .unwrap_or(0);
                    if pending.len() < end + 4 + len {
                        break;
                    }
                    pending.drain(..end + 4 + len);
                    count.fetch_add(1, Ordering::Relaxed);
                    if sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await.is_err() {
                        return;
                    }
                }
            }
        });
    }
}

fn pipeline_stats(port: u16) -> serde_json::Value {
    ureq::get(&format!("http://127.0.0.1:{port}/api/v1/pipeline"))
        .header("Authorization", "Bearer bench-admin")
        .call()
        .ok()
        .and_then(|mut r| r.body_mut().read_json::<serde_json::Value>().ok())
        .unwrap_or_default()
}

fn start_server(drover: &str, check_interval: u64, mode: &str, handler_cfg: &str) -> anyhow::Result<ServerProc> {
    let dir = std::env::temp_dir().join(format!("drover-bench-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("conf.d"))?;
    if !handler_cfg.is_empty() {
        std::fs::write(dir.join("conf.d/handlers.toml"), handler_cfg)?;
    }
    if mode == "hold" {
        std::fs::write(
            dir.join("conf.d/bench.toml"),
            format!(
                "[checks.bench]\ncommand = \"true\"\nsubscriptions = [\"bench\"]\ninterval_secs = {check_interval}\n"
            ),
        )?;
    }
    let port = drover_testkit::free_port();
    let child = Command::new(drover)
        .args([
            "server",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--agent-token",
            TOKEN,
            "--admin-token",
            "bench-admin",
        ])
        .arg("--config-dir")
        .arg(dir.join("conf.d"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {drover} (build it with cargo build --release)"))?;
    let s = ServerProc { child, port, _dir: tempfile_dir::Dir(dir) };
    for _ in 0..100 {
        if ureq::get(&format!("http://127.0.0.1:{port}/health")).call().is_ok() {
            return Ok(s);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("server did not become healthy")
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(port: u16, name: &str) -> anyhow::Result<Ws> {
    let mut req = format!("ws://127.0.0.1:{port}/api/v1/agent/ws").into_client_request()?;
    req.headers_mut().insert("Authorization", format!("Bearer {TOKEN}").parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
    let hello = serde_json::json!({
        "type": "hello", "protocol_version": 1, "session": format!("bench-{name}"),
        "entity": { "name": name, "subscriptions": ["bench"], "keepalive_interval_secs": 20 }
    });
    ws.send(Message::Text(hello.to_string().into())).await?;
    let _welcome = ws.next().await.context("no welcome")??;
    Ok(ws)
}

fn result_frame(seq: u64, check: u64) -> String {
    format!(
        r#"{{"type":"result","seq":{seq},"result":{{"check":"c{check}","status":{},"output":"bench result {seq} | value={seq}"}}}}"#,
        if seq.is_multiple_of(7) { 1 } else { 0 }
    )
}

fn ack_of(text: &str) -> Option<u64> {
    let rest = text.split("\"up_to\":").nth(1)?;
    rest.trim_end_matches('}').trim().parse().ok()
}

/// Paces an agent at `per_sec` results per second (0: unpaced).
struct Pace {
    per_sec: f64,
    started: Instant,
}

impl Pace {
    /// How many results may have been sent by now.
    fn allowed(&self) -> u64 {
        if self.per_sec <= 0.0 { u64::MAX } else { (self.started.elapsed().as_secs_f64() * self.per_sec) as u64 }
    }
}

async fn flood_agent(
    port: u16,
    name: String,
    window: u64,
    checks: u64,
    pace: Pace,
    acked: Arc<AtomicU64>,
    stop: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let ws = connect(port, &name).await?;
    let (mut tx, mut rx) = ws.split();
    let mut sent = 0u64;
    let mut last_ack = 0u64;
    while stop.load(Ordering::Relaxed) == 0 {
        if sent >= pace.allowed() && sent == last_ack {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        while sent - last_ack < window && sent < pace.allowed() {
            sent += 1;
            tx.feed(Message::Text(result_frame(sent, sent % checks).into())).await?;
        }
        tx.flush().await?;
        if sent == last_ack {
            continue;
        }
        match tokio::time::timeout(Duration::from_secs(5), rx.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                if let Some(up) = ack_of(&t) {
                    acked.fetch_add(up - last_ack, Ordering::Relaxed);
                    last_ack = up;
                }
            }
            Ok(Some(Ok(_))) => {}
            Ok(_) => bail!("{name}: connection closed"),
            Err(_) => bail!("{name}: no ack for 5 s"),
        }
    }
    Ok(())
}

async fn hold_agent(port: u16, name: String, answered: Arc<AtomicU64>, stop: Arc<AtomicU64>) -> anyhow::Result<()> {
    let ws = connect(port, &name).await?;
    let (mut tx, mut rx) = ws.split();
    let mut seq = 0u64;
    let mut keepalive = tokio::time::interval(Duration::from_secs(20));
    while stop.load(Ordering::Relaxed) == 0 {
        tokio::select! {
            _ = keepalive.tick() => {
                tx.send(Message::Text(r#"{"type":"keepalive","metrics":[]}"#.into())).await?;
            }
            m = rx.next() => match m {
                Some(Ok(Message::Text(t))) if t.contains("\"type\":\"request\"") => {
                    seq += 1;
                    let frame = format!(r#"{{"type":"result","seq":{seq},"result":{{"check":"bench","status":0,"output":"ok"}}}}"#);
                    tx.send(Message::Text(frame.into())).await?;
                    answered.fetch_add(1, Ordering::Relaxed);
                }
                Some(Ok(_)) => {}
                _ => bail!("{name}: connection closed"),
            },
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.mode == "agent-idle" {
        return agent_idle(&args);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let delivered = Arc::new(AtomicU64::new(0));
    let sink_listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let sink_port = sink_listener.local_addr()?.port();
    rt.spawn(sink(sink_listener, args.handler == "http", delivered.clone()));
    let handler_cfg = handler_config(&args.handler, args.checks, sink_port)?;
    let server = start_server(&args.drover, args.check_interval_secs, &args.mode, &handler_cfg)?;
    let pid = server.child.id();
    let counter = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..args.agents {
            let (c, s, f) = (counter.clone(), stop.clone(), failed.clone());
            let name = format!("sim-{i:05}");
            let (port, window, checks, mode) = (server.port, args.window, args.checks, args.mode.clone());
            let pace = Pace { per_sec: args.rate as f64 / args.agents as f64, started: Instant::now() };
            tasks.push(tokio::spawn(async move {
                let r = if mode == "flood" {
                    flood_agent(port, name, window, checks, pace, c, s).await
                } else {
                    hold_agent(port, name, c, s).await
                };
                if let Err(e) = r
                    && f.fetch_add(1, Ordering::Relaxed) < 5
                {
                    eprintln!("agent failed: {e:#}");
                }
            }));
            if i % 500 == 499 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // Warm up, then measure a steady window.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (cpu0, _) = proc_usage(pid).unwrap();
        let n0 = counter.load(Ordering::Relaxed);
        let d0 = delivered.load(Ordering::Relaxed);
        let p0 = pipeline_stats(server.port);
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(args.seconds)).await;
        let elapsed = t0.elapsed().as_secs_f64();
        let (cpu1, rss) = proc_usage(pid).unwrap();
        let n = counter.load(Ordering::Relaxed) - n0;
        let connected = health_connected(server.port);
        let sunk = delivered.load(Ordering::Relaxed) - d0;
        let p1 = pipeline_stats(server.port);
        stop.store(1, Ordering::Relaxed);
        let cpu = cpu1 - cpu0;
        println!("mode={} agents={} seconds={elapsed:.1}", args.mode, args.agents);
        if args.handler != "none" {
            let delta = |k: &str| p1[k].as_u64().unwrap_or(0).saturating_sub(p0[k].as_u64().unwrap_or(0));
            println!(
                "handler={} events_delivered_per_sec={:.0} sink_received_per_sec={:.0} pipeline_dropped={} dead_lettered={}",
                args.handler,
                delta("delivered") as f64 / elapsed,
                sunk as f64 / elapsed,
                delta("dropped") + delta("handler_dropped"),
                delta("dead_lettered"),
            );
        }
        match args.mode.as_str() {
            "flood" => println!(
                "offered_per_sec={} results_stored_per_sec={:.0} server_cpu_secs={cpu:.2} results_per_server_cpu_sec={:.0} server_rss_mib={:.1} failed_agents={}",
                if args.rate == 0 { "max".to_string() } else { args.rate.to_string() },
                n as f64 / elapsed,
                n as f64 / cpu.max(1e-9),
                rss as f64 / 1024.0,
                failed.load(Ordering::Relaxed)
            ),
            _ => println!(
                "agents_connected={connected} checks_answered_per_sec={:.0} server_cpu_percent={:.1} server_rss_mib={:.1} failed_agents={}",
                n as f64 / elapsed,
                cpu / elapsed * 100.0,
                rss as f64 / 1024.0,
                failed.load(Ordering::Relaxed)
            ),
        }
        for t in tasks {
            t.abort();
        }
    });
    Ok(())
}

fn health_connected(port: u16) -> i64 {
    ureq::get(&format!("http://127.0.0.1:{port}/health"))
        .call()
        .ok()
        .and_then(|mut r| r.body_mut().read_json::<serde_json::Value>().ok())
        .and_then(|v| v["agents_connected"].as_i64())
        .unwrap_or(-1)
}

/// A real agent, connected, with nothing to do: its resident memory and idle CPU.
fn agent_idle(args: &Args) -> anyhow::Result<()> {
    let server = start_server(&args.drover, 10, "flood", "")?;
    let mut agent = Command::new(&args.drover)
        .args(["agent", "--server", &format!("ws://127.0.0.1:{}", server.port), "--name", "idle", "--token", TOKEN])
        .args(["--subscriptions", "idle", "--api-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let pid = agent.id();
    std::thread::sleep(Duration::from_secs(5));
    let (cpu0, _) = proc_usage(pid)?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(args.seconds));
    let (cpu1, rss) = proc_usage(pid)?;
    let elapsed = t0.elapsed().as_secs_f64();
    println!(
        "agent_rss_mib={:.2} agent_idle_cpu_percent={:.3} over {elapsed:.0}s (default keepalive 20 s)",
        rss as f64 / 1024.0,
        (cpu1 - cpu0) / elapsed * 100.0
    );
    let _ = agent.kill();
    let _ = agent.wait();
    Ok(())
}
