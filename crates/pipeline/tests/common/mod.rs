//! An in-memory [`Context`]: the real interface the server implements, holding entities,
//! checks and events the way `State` does, folding ingested results with
//! `Event::apply` and submitting them back to the pipeline as the server will.
#![allow(dead_code)]

use drover_core::event::{CheckResult, EventCheckConfig};
use drover_core::{CheckSpec, Entity, EntityClass, Event, Status};
use drover_pipeline::{Context, Pipeline, PipelineConfig};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const SERVER: &str = "drover-server";

#[derive(Default)]
pub struct FakeContext {
    pub entities: Mutex<HashMap<String, Entity>>,
    pub checks: Mutex<HashMap<String, CheckSpec>>,
    pub events: Mutex<HashMap<(String, String), Event>>,
    /// Every result the pipeline ingested, in order.
    pub ingested: Mutex<Vec<CheckResult>>,
    pub pipeline: OnceLock<Pipeline>,
    /// Looking up this entity panics: stands in for a bug on the server's side.
    pub poisoned_entity: Mutex<Option<String>>,
}

impl FakeContext {
    pub fn new() -> Arc<FakeContext> {
        Arc::new(FakeContext::default())
    }

    pub fn add_entity(&self, name: &str, class: EntityClass, subscriptions: &[&str]) {
        let mut e = Entity::new(name, class);
        e.subscriptions = subscriptions.iter().map(|s| s.to_string()).collect();
        self.entities.lock().unwrap().insert(name.to_string(), e);
    }

    pub fn add_check(&self, spec: CheckSpec) {
        self.checks.lock().unwrap().insert(spec.name.clone(), spec);
    }

    /// Folds a result into its event as the server does, returning the new event.
    pub fn record(&self, entity: &str, check: &str, status: Status, handlers: &[&str]) -> Event {
        let cfg = EventCheckConfig {
            interval_secs: Some(10),
            handlers: handlers.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        self.record_result(result(entity, check, status), cfg)
    }

    pub fn record_result(&self, r: CheckResult, cfg: EventCheckConfig) -> Event {
        let now = drover_core::time::now_ms();
        let mut events = self.events.lock().unwrap();
        let key = (r.entity.clone(), r.check.clone());
        match events.get_mut(&key) {
            Some(ev) => {
                ev.check_config = cfg;
                ev.apply(&r, now);
                ev.clone()
            }
            None => {
                let ev = Event::first(&r.entity, &r, cfg, now);
                events.insert(key, ev.clone());
                ev
            }
        }
    }

    pub fn event_of(&self, entity: &str, check: &str) -> Option<Event> {
        self.events.lock().unwrap().get(&(entity.to_string(), check.to_string())).cloned()
    }

    pub fn ingested_for(&self, check: &str) -> Vec<CheckResult> {
        self.ingested.lock().unwrap().iter().filter(|r| r.check == check).cloned().collect()
    }
}

pub fn result(entity: &str, check: &str, status: Status) -> CheckResult {
    CheckResult {
        check: check.to_string(),
        entity: entity.to_string(),
        status,
        output: format!("{check} is {status}"),
        issued_ms: 0,
        executed_ms: 0,
        duration_ms: 0,
        metrics: vec![],
        check_config: None,
    }
}

impl Context for FakeContext {
    fn entity(&self, name: &str) -> Option<Entity> {
        if self.poisoned_entity.lock().unwrap().as_deref() == Some(name) {
            panic!("simulated bug looking up {name}");
        }
        self.entities.lock().unwrap().get(name).cloned()
    }
    fn event(&self, entity: &str, check: &str) -> Option<Event> {
        self.event_of(entity, check)
    }
    fn events_of_check(&self, check: &str) -> Vec<Event> {
        self.events.lock().unwrap().values().filter(|e| e.check == check).cloned().collect()
    }
    fn ingest(&self, r: CheckResult) {
        self.ingested.lock().unwrap().push(r.clone());
        let cfg = r.check_config.clone().unwrap_or_default();
        let ev = self.record_result(r, cfg);
        if let Some(p) = self.pipeline.get() {
            p.submit(ev);
        }
    }
    fn server_entity(&self) -> String {
        SERVER.to_string()
    }
    fn check(&self, name: &str) -> Option<CheckSpec> {
        self.checks.lock().unwrap().get(name).cloned()
    }
}

/// Parses handler/filter/mutator/aggregate tables the way the server's config does.
pub fn config(toml_text: &str) -> PipelineConfig {
    let f = drover_core::config::ServerConfig::parse_file(std::path::Path::new("test.toml"), toml_text)
        .unwrap_or_else(|e| panic!("test config: {e}"));
    PipelineConfig {
        handlers: f.handlers,
        filters: f.filters,
        mutators: f.mutators,
        aggregates: f.aggregates,
        ..Default::default()
    }
}

pub fn start(ctx: &Arc<FakeContext>, cfg: PipelineConfig) -> Pipeline {
    let p = Pipeline::start(cfg, ctx.clone()).unwrap_or_else(|e| panic!("start: {e}"));
    let _ = ctx.pipeline.set(p.clone());
    p
}

/// Polls `f` every 20 ms until it returns Some or `within` passes.
pub async fn wait_for<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Accepts TCP connections and keeps each one's full payload.
pub async fn tcp_receiver() -> (SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            let sink = sink.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buf = Vec::new();
                let _ = s.read_to_end(&mut buf).await;
                sink.lock().unwrap().push(buf);
            });
        }
    });
    (addr, got)
}

/// The JSON payloads a TCP receiver got, parsed.
pub fn json_payloads(got: &Mutex<Vec<Vec<u8>>>) -> Vec<serde_json::Value> {
    got.lock().unwrap().iter().map(|b| serde_json::from_slice(b).expect("payload is JSON")).collect()
}
