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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
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

fn start_server(drover: &str, check_interval: u64, mode: &str) -> anyhow::Result<ServerProc> {
    let dir = std::env::temp_dir().join(format!("drover-bench-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("conf.d"))?;
    if mode == "hold" {
        std::fs::write(
            dir.join("conf.d/bench.toml"),
            format!(
                "[checks.bench]\ncommand = \"true\"\nsubscriptions = [\"bench\"]\ninterval_secs = {check_interval}\n"
            ),
        )?;
    }
    let port = free_port();
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

async fn flood_agent(
    port: u16,
    name: String,
    window: u64,
    checks: u64,
    acked: Arc<AtomicU64>,
    stop: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let ws = connect(port, &name).await?;
    let (mut tx, mut rx) = ws.split();
    let mut sent = 0u64;
    let mut last_ack = 0u64;
    while stop.load(Ordering::Relaxed) == 0 {
        while sent - last_ack < window {
            sent += 1;
            tx.feed(Message::Text(result_frame(sent, sent % checks).into())).await?;
        }
        tx.flush().await?;
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
    let server = start_server(&args.drover, args.check_interval_secs, &args.mode)?;
    let pid = server.child.id();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let counter = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..args.agents {
            let (c, s, f) = (counter.clone(), stop.clone(), failed.clone());
            let name = format!("sim-{i:05}");
            let (port, window, checks, mode) = (server.port, args.window, args.checks, args.mode.clone());
            tasks.push(tokio::spawn(async move {
                let r = if mode == "flood" {
                    flood_agent(port, name, window, checks, c, s).await
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
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(args.seconds)).await;
        let elapsed = t0.elapsed().as_secs_f64();
        let (cpu1, rss) = proc_usage(pid).unwrap();
        let n = counter.load(Ordering::Relaxed) - n0;
        let connected = health_connected(server.port);
        stop.store(1, Ordering::Relaxed);
        let cpu = cpu1 - cpu0;
        println!("mode={} agents={} seconds={elapsed:.1}", args.mode, args.agents);
        match args.mode.as_str() {
            "flood" => println!(
                "results_stored_per_sec={:.0} server_cpu_secs={cpu:.2} results_per_server_cpu_sec={:.0} server_rss_mib={:.1} failed_agents={}",
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
    let server = start_server(&args.drover, 10, "flood")?;
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
