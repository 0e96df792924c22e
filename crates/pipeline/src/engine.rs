//! The running pipeline: the bounded intake queue, the dispatcher (dependencies,
//! handler expansion, filters), one bounded queue and worker per handler, retries with
//! exponential backoff, the dead-letter list, handler-failure events, aggregates.
//!
//! ```text
//! submit ─try_send─▶ intake (queue_capacity) ─▶ dispatcher ─try_send─▶ handler queue ─▶ worker
//!   │ full: dropped++                 │ deps, sets, filters     │ full: dropped++     │ max_concurrent
//!   ▼                                 ▼                                               ▼ attempts, backoff
//! caller never waits            suppressed / filtered counts                    dead letters + handler-NAME event
//! ```

use crate::config::{Compiled, PipelineConfig, PipelineError, compile};
use crate::deliver::{Job, Runtime};
use crate::filter::{FilterInput, history_watermark};
use crate::{Context, KEEPALIVE, aggregate, deps, view};
use drover_core::event::CheckResult;
use drover_core::pipeline::{AggregateSpec, HandlerSpec, expand_handler_sets};
use drover_core::time::now_ms;
use drover_core::{Event, Status};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;

/// Backoff never waits longer than this between two attempts.
const RETRY_MAX_MS: u64 = 60_000;
/// Jobs a handler keeps in progress (running or waiting to retry) per allowed
/// concurrent attempt; beyond that its queue fills and further events are dropped.
const IN_PROGRESS_PER_SLOT: usize = 8;

/// An event a handler could not deliver within its attempts.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub id: u64,
    pub handler: String,
    pub entity: String,
    pub check: String,
    /// The last attempt's error.
    pub error: String,
    pub attempts: u32,
    /// When the last attempt failed (ms since the epoch).
    pub failed_ms: i64,
    pub event: Event,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct HandlerStats {
    /// Events waiting in this handler's queue.
    pub queued: usize,
    pub queue_capacity: usize,
    /// Events refused because this handler's queue was full.
    pub dropped: u64,
    /// Events this handler's filters stopped.
    pub filtered: u64,
    /// Attempts running right now.
    pub in_flight: u64,
    /// Events taken from the queue and not finished: running or waiting to retry.
    pub in_progress: u64,
    pub delivered: u64,
    /// Failed attempts (each retry that fails counts).
    pub failed: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    /// Its last delivery ended in the dead-letter list (its `handler-NAME` event is raised).
    pub failing: bool,
}

/// Counters since start, plus current queue depths. Totals over all handlers are
/// included so the lead's exporter does not need to add them up.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PipelineStats {
    /// Events waiting for the dispatcher.
    pub queued: usize,
    pub queue_capacity: usize,
    pub submitted: u64,
    /// Events `submit` refused because the intake queue was full.
    pub dropped: u64,
    /// Events not handled because a dependency (or the entity's keepalive) is failing.
    pub suppressed: u64,
    /// Events naming no handler.
    pub unhandled: u64,
    /// References to handlers that are not defined.
    pub unknown_handler: u64,
    pub filtered: u64,
    /// Events refused by full handler queues (sum over handlers).
    pub handler_dropped: u64,
    pub delivered: u64,
    pub failed: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    /// Dead letters held now.
    pub dead_letters: usize,
    /// Dead letters pushed out of the full list.
    pub dead_letters_evicted: u64,
    pub handlers: BTreeMap<String, HandlerStats>,
}

#[derive(Default)]
struct Counter(AtomicU64);

impl Counter {
    fn inc(&self) -> u64 {
        self.0.fetch_add(1, Relaxed) + 1
    }
    fn dec(&self) {
        self.0.fetch_sub(1, Relaxed);
    }
    fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

#[derive(Default)]
struct Counters {
    submitted: Counter,
    dropped: Counter,
    suppressed: Counter,
    unhandled: Counter,
    unknown_handler: Counter,
}

#[derive(Default)]
struct HandlerCounters {
    dropped: Counter,
    filtered: Counter,
    in_flight: Counter,
    in_progress: Counter,
    delivered: Counter,
    failed: Counter,
    retried: Counter,
    dead_lettered: Counter,
}

/// Counts something for as long as it lives.
struct Tracked<'a>(&'a Counter);

impl<'a> Tracked<'a> {
    fn new(c: &'a Counter) -> Tracked<'a> {
        c.inc();
        Tracked(c)
    }
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

struct Slot {
    rt: Runtime,
    tx: mpsc::Sender<Job>,
    capacity: usize,
    /// Attempts in flight at once (`max_concurrent`).
    exec: Arc<Semaphore>,
    counters: HandlerCounters,
    failing: AtomicBool,
}

struct DeadLetters {
    next_id: u64,
    list: VecDeque<DeadLetter>,
    capacity: usize,
    evicted: u64,
}

struct Shared {
    ctx: Arc<dyn Context>,
    tx: mpsc::Sender<Event>,
    queue_capacity: usize,
    specs: BTreeMap<String, HandlerSpec>,
    slots: BTreeMap<String, Slot>,
    /// Each handler name (sets included) expanded to the handlers that deliver, computed
    /// once so `would_accept` costs a lookup per name.
    expansion: HashMap<String, Vec<String>>,
    counters: Counters,
    dead: Mutex<DeadLetters>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// The event pipeline. Cheap to clone; all clones drive the same workers.
#[derive(Clone)]
pub struct Pipeline {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline").field("handlers", &self.shared.slots.keys().collect::<Vec<_>>()).finish()
    }
}

impl Pipeline {
    /// Compiles `cfg` (refusing bad expressions, time zones, templates, addresses) and
    /// spawns the dispatcher, one worker per handler and the aggregate evaluator on
    /// the current tokio runtime.
    pub fn start(cfg: PipelineConfig, ctx: Arc<dyn Context>) -> Result<Pipeline, PipelineError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| PipelineError::NoRuntime)?;
        let Compiled { handlers, specs } = compile(&cfg)?;
        let server = ctx.server_entity();
        let mut slots = BTreeMap::new();
        let mut receivers = Vec::new();
        for (name, compiled) in handlers {
            if compiled.spec.kind == drover_core::pipeline::HandlerType::Set {
                continue;
            }
            let max_concurrent = compiled.spec.max_concurrent;
            let rt = Runtime::new(compiled).map_err(|message| {
                PipelineError::Config(drover_core::config::ConfigError {
                    file: cfg.sources.get(&format!("handlers.{name}")).cloned().unwrap_or_default(),
                    line: 0,
                    column: 0,
                    field: format!("handlers.{name}"),
                    message,
                })
            })?;
            let (tx, rx) = mpsc::channel(cfg.handler_queue_capacity);
            // A failure event raised before a restart is resolved by the first success after it.
            let failing = ctx.event(&server, &failure_check(&name)).is_some_and(|e| !e.status.is_ok());
            slots.insert(
                name.clone(),
                Slot {
                    rt,
                    tx,
                    capacity: cfg.handler_queue_capacity,
                    exec: Arc::new(Semaphore::new(max_concurrent)),
                    counters: HandlerCounters::default(),
                    failing: AtomicBool::new(failing),
                },
            );
            receivers.push((name, max_concurrent, rx));
        }
        let (tx, rx) = mpsc::channel(cfg.queue_capacity);
        let expansion = specs
            .keys()
            .filter_map(|n| expand_handler_sets(&specs, std::slice::from_ref(n)).ok().map(|leaves| (n.clone(), leaves)))
            .collect();
        let shared = Arc::new(Shared {
            ctx,
            tx,
            queue_capacity: cfg.queue_capacity,
            specs,
            slots,
            expansion,
            counters: Counters::default(),
            dead: Mutex::new(DeadLetters {
                next_id: 1,
                list: VecDeque::new(),
                capacity: cfg.dead_letter_capacity,
                evicted: 0,
            }),
            tasks: Mutex::new(Vec::new()),
        });
        let mut tasks = vec![runtime.spawn(dispatcher(shared.clone(), rx))];
        for (name, max_concurrent, rx) in receivers {
            tasks.push(runtime.spawn(handler_worker(shared.clone(), name, max_concurrent, rx)));
        }
        if !cfg.aggregates.is_empty() {
            let specs: Vec<AggregateSpec> = cfg.aggregates.values().cloned().collect();
            let every = Duration::from_millis(cfg.aggregate_interval_ms.max(10));
            tasks.push(runtime.spawn(aggregates(shared.clone(), specs, every)));
        }
        *shared.tasks.lock().expect("tasks lock") = tasks;
        Ok(Pipeline { shared })
    }

    /// Queues `event` for handling without waiting. False when the queue is full; the
    /// event is then dropped and counted in [`PipelineStats::dropped`].
    pub fn submit(&self, event: Event) -> bool {
        let s = &self.shared;
        s.counters.submitted.inc();
        match s.tx.try_send(event) {
            Ok(()) => true,
            Err(e) => {
                let n = s.counters.dropped.inc();
                if n == 1 || n.is_multiple_of(1000) {
                    let ev = match &e {
                        mpsc::error::TrySendError::Full(ev) | mpsc::error::TrySendError::Closed(ev) => ev,
                    };
                    tracing::warn!(dropped = n, entity = %ev.entity, check = %ev.check, "event pipeline queue full; event not handled");
                }
                false
            }
        }
    }

    /// Whether an event naming `handlers` could be taken now: the intake queue has room
    /// and at least one of the handlers it reaches has room in its queue. The server asks
    /// before copying an event, so a handler that cannot keep up (its queue full) costs
    /// ingestion a lookup, not a copy and a dispatch. Refusals are counted as drops,
    /// exactly as if the event had been queued and then dropped.
    pub fn would_accept(&self, handlers: &[String]) -> bool {
        let s = &self.shared;
        if s.tx.capacity() == 0 {
            s.counters.submitted.inc();
            s.counters.dropped.inc();
            return false;
        }
        let mut any_known = false;
        for name in handlers {
            let Some(leaves) = s.expansion.get(name) else { continue };
            for leaf in leaves {
                if let Some(slot) = s.slots.get(leaf) {
                    any_known = true;
                    if slot.tx.capacity() > 0 {
                        return true;
                    }
                }
            }
        }
        if !any_known {
            // Unknown handler names: let the dispatcher count and log them.
            return true;
        }
        for name in handlers {
            for leaf in s.expansion.get(name).into_iter().flatten() {
                if let Some(slot) = s.slots.get(leaf) {
                    slot.counters.dropped.inc();
                }
            }
        }
        false
    }

    /// Oldest first.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.shared.dead.lock().expect("dead letters lock").list.iter().cloned().collect()
    }

    /// Queues the dead letter's event for its handler again (its mutator runs again; its
    /// filters do not). False if there is no such dead letter, its handler is gone, or
    /// the handler's queue is full (it then stays in the list).
    pub fn retry_dead_letter(&self, id: u64) -> bool {
        let s = &self.shared;
        let mut dead = s.dead.lock().expect("dead letters lock");
        let Some(pos) = dead.list.iter().position(|d| d.id == id) else { return false };
        let Some(slot) = s.slots.get(&dead.list[pos].handler) else { return false };
        let event = dead.list[pos].event.clone();
        let entity = s.ctx.entity(&event.entity);
        let job = Job {
            view: Arc::new(view::event_view(&event, entity.as_ref())),
            entity: entity.map(Arc::new),
            event: Arc::new(event),
        };
        if slot.tx.try_send(job).is_err() {
            return false;
        }
        dead.list.remove(pos);
        true
    }

    pub fn drop_dead_letter(&self, id: u64) -> bool {
        let mut dead = self.shared.dead.lock().expect("dead letters lock");
        let before = dead.list.len();
        dead.list.retain(|d| d.id != id);
        dead.list.len() != before
    }

    pub fn stats(&self) -> PipelineStats {
        let s = &self.shared;
        let mut st = PipelineStats {
            queued: s.queue_capacity - s.tx.capacity(),
            queue_capacity: s.queue_capacity,
            submitted: s.counters.submitted.get(),
            dropped: s.counters.dropped.get(),
            suppressed: s.counters.suppressed.get(),
            unhandled: s.counters.unhandled.get(),
            unknown_handler: s.counters.unknown_handler.get(),
            ..Default::default()
        };
        {
            let dead = s.dead.lock().expect("dead letters lock");
            st.dead_letters = dead.list.len();
            st.dead_letters_evicted = dead.evicted;
        }
        for (name, slot) in &s.slots {
            let c = &slot.counters;
            let h = HandlerStats {
                queued: slot.capacity - slot.tx.capacity(),
                queue_capacity: slot.capacity,
                dropped: c.dropped.get(),
                filtered: c.filtered.get(),
                in_flight: c.in_flight.get(),
                in_progress: c.in_progress.get(),
                delivered: c.delivered.get(),
                failed: c.failed.get(),
                retried: c.retried.get(),
                dead_lettered: c.dead_lettered.get(),
                failing: slot.failing.load(Relaxed),
            };
            st.filtered += h.filtered;
            st.handler_dropped += h.dropped;
            st.delivered += h.delivered;
            st.failed += h.failed;
            st.retried += h.retried;
            st.dead_lettered += h.dead_lettered;
            st.handlers.insert(name.clone(), h);
        }
        st
    }

    /// Stops the dispatcher, workers and aggregates. Attempts already running finish
    /// (or time out) on their own; queued events are not handled.
    pub fn stop(&self) {
        for t in self.shared.tasks.lock().expect("tasks lock").drain(..) {
            t.abort();
        }
    }
}

fn failure_check(handler: &str) -> String {
    format!("handler-{handler}")
}

async fn dispatcher(shared: Arc<Shared>, mut rx: mpsc::Receiver<Event>) {
    // Highest occurrences of each failing event's incident, so a resolution can tell
    // whether its incident was ever alerted even past the 21-result history.
    let mut incidents: HashMap<(String, String), u64> = HashMap::new();
    while let Some(event) = rx.recv().await {
        let what = format!("{}/{}", event.entity, event.check);
        // One event that trips a bug (in an expression library, in the server's
        // Context) must not end handling for every event after it.
        let run = std::panic::AssertUnwindSafe(|| shared.dispatch(event, &mut incidents));
        if std::panic::catch_unwind(run).is_err() {
            tracing::error!(event = %what, "handling this event panicked; it was skipped");
        }
    }
}

impl Shared {
    fn dispatch(&self, event: Event, incidents: &mut HashMap<(String, String), u64>) {
        let key = (event.entity.clone(), event.check.clone());
        let tracked = if event.status.is_ok() {
            incidents.remove(&key).unwrap_or(0)
        } else {
            let new_incident = event.history.len() < 2 || event.history[event.history.len() - 2].status.is_ok();
            let entry = incidents.entry(key).or_insert(0);
            if new_incident {
                *entry = 0;
            }
            *entry = (*entry).max(event.occurrences);
            *entry
        };
        let watermark = tracked.max(history_watermark(&event));

        if event.check_config.handlers.is_empty() {
            self.counters.unhandled.inc();
            return;
        }
        let names = match expand_handler_sets(&self.specs, &event.check_config.handlers) {
            Ok(n) => n,
            // Cycles are refused at load; specs do not change after.
            Err(_) => return,
        };
        if let Some(reason) = deps::suppressed_by(&*self.ctx, &event) {
            self.counters.suppressed.inc();
            tracing::debug!(entity = %event.entity, check = %event.check, %reason, "event not handled");
            return;
        }
        let entity = self.ctx.entity(&event.entity);
        // The spacing of results, which turns refresh_secs into a number of occurrences.
        let interval_secs = event.check_config.interval_secs.or(event.check_config.ttl_secs).or_else(|| {
            (event.check == KEEPALIVE).then(|| entity.as_ref().and_then(|e| e.keepalive_interval_secs).unwrap_or(20))
        });
        let view = Arc::new(view::event_view(&event, entity.as_ref()));
        let event = Arc::new(event);
        let entity = entity.map(Arc::new);
        let cel = OnceLock::new();
        let now = chrono::Utc::now();
        let input =
            FilterInput { event: &event, view: &view, cel: &cel, now, interval_secs, incident_watermark: watermark };
        for name in names {
            let Some(slot) = self.slots.get(&name) else {
                let n = self.counters.unknown_handler.inc();
                if n == 1 || n.is_multiple_of(1000) {
                    tracing::warn!(handler = %name, check = %event.check, "event names a handler that is not defined");
                }
                continue;
            };
            if !slot.rt.compiled.filters.iter().all(|f| f.passes(&input)) {
                slot.counters.filtered.inc();
                continue;
            }
            let job = Job { event: event.clone(), entity: entity.clone(), view: view.clone() };
            if slot.tx.try_send(job).is_err() {
                let n = slot.counters.dropped.inc();
                if n == 1 || n.is_multiple_of(1000) {
                    tracing::warn!(handler = %name, dropped = n, "handler queue full; event not handled by it");
                }
            }
        }
    }

    async fn deliver_with_retries(&self, name: &str, job: Job) {
        let Some(slot) = self.slots.get(name) else { return };
        let spec = &slot.rt.compiled.spec;
        let mut delay_ms = spec.retry_initial_ms;
        let mut last_error = String::new();
        for attempt in 1..=spec.max_attempts {
            let result = {
                let _permit = slot.exec.acquire().await.expect("semaphore never closed");
                let _in_flight = Tracked::new(&slot.counters.in_flight);
                slot.rt.deliver(&job).await
            };
            match result {
                Ok(()) => {
                    slot.counters.delivered.inc();
                    if slot.failing.swap(false, Relaxed) {
                        self.raise_failure(name, Status::Ok, format!("handler {name} delivers again"));
                    }
                    return;
                }
                Err(e) => {
                    slot.counters.failed.inc();
                    tracing::debug!(handler = name, attempt, error = %e, "delivery failed");
                    last_error = e;
                }
            }
            if attempt < spec.max_attempts {
                slot.counters.retried.inc();
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                delay_ms = delay_ms.saturating_mul(2).min(RETRY_MAX_MS);
            }
        }
        tracing::warn!(handler = name, entity = %job.event.entity, check = %job.event.check, error = %last_error,
            attempts = spec.max_attempts, "delivery failed; moved to dead letters");
        slot.counters.dead_lettered.inc();
        {
            let mut dead = self.dead.lock().expect("dead letters lock");
            let id = dead.next_id;
            dead.next_id += 1;
            if dead.list.len() >= dead.capacity {
                dead.list.pop_front();
                dead.evicted += 1;
            }
            dead.list.push_back(DeadLetter {
                id,
                handler: name.to_string(),
                entity: job.event.entity.clone(),
                check: job.event.check.clone(),
                error: last_error.clone(),
                attempts: spec.max_attempts,
                failed_ms: now_ms(),
                event: (*job.event).clone(),
            });
        }
        if !slot.failing.swap(true, Relaxed) {
            let output = format!("handler {name} failed {} attempts: {last_error}", spec.max_attempts);
            self.raise_failure(name, Status::Critical, output);
        }
    }

    fn raise_failure(&self, handler: &str, status: Status, output: String) {
        let now = now_ms();
        self.ctx.ingest(CheckResult::made_by_drover(
            &self.ctx.server_entity(),
            &failure_check(handler),
            status,
            output,
            now,
        ));
    }
}

async fn handler_worker(shared: Arc<Shared>, name: String, max_concurrent: usize, mut rx: mpsc::Receiver<Job>) {
    let in_progress = Arc::new(Semaphore::new(max_concurrent.saturating_mul(IN_PROGRESS_PER_SLOT)));
    while let Some(job) = rx.recv().await {
        // Waiting here (not spawning unboundedly) leaves further events in the bounded
        // queue, where a full queue is counted.
        let Ok(permit) = in_progress.clone().acquire_owned().await else { return };
        let shared = shared.clone();
        let name = name.clone();
        tokio::spawn(async move {
            let Some(slot) = shared.slots.get(&name) else { return };
            // Decrements even if the delivery panics or the task is cancelled.
            let _in_progress = Tracked::new(&slot.counters.in_progress);
            shared.deliver_with_retries(&name, job).await;
            drop(permit);
        });
    }
}

async fn aggregates(shared: Arc<Shared>, specs: Vec<AggregateSpec>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        for a in &specs {
            let run = std::panic::AssertUnwindSafe(|| aggregate::evaluate(&*shared.ctx, a, now_ms()));
            if std::panic::catch_unwind(run).is_err() {
                tracing::error!(aggregate = %a.name, "evaluating this aggregate panicked");
            }
        }
    }
}
