//! The registry: entities, checks, silences and events, held in memory and persisted
//! through the [`Persister`](crate::persist::Persister).
//!
//! Memory is the working copy; the store is the truth across restarts. Every mutation
//! updates memory under a short lock, then marks the key dirty; nothing here awaits
//! while holding a lock. Ingesting a result is the hot path: one map lookup, one
//! [`Event::apply`], one dirty mark.

use crate::keys;
use crate::persist::{Persister, Render};
use crate::telemetry::Metrics;
use drover_core::config::ServerSettings;
use drover_core::event::{CheckResult, EventAction, EventCheckConfig};
use drover_core::health::{MemberHealth, WatchMessage};
use drover_core::resource::{CheckSpec, Entity, EntityClass, Silence};
use drover_core::time::{now_ms, now_secs};
use drover_core::{Event, Status};
use drover_store::{Store, StoreError, from_json, to_json};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::watch;

/// The check name of keepalive events, as in Sensu.
pub const KEEPALIVE: &str = "keepalive";

/// The members published on the watch stream, and when that set last changed (an
/// upsert's time, or a removal's, which no remaining member records).
struct MemberTable {
    by_name: HashMap<String, MemberHealth>,
    changed_ms: i64,
}

/// Moves the view's `clock` to the time to stamp a change with and returns it: now, but
/// always later than the last change, so the clock only moves forward (a clock stepped
/// back, or two changes in one ms, would give a removal a time a live watcher had
/// already passed).
fn tick(clock: &mut i64) -> i64 {
    *clock = now_ms().max(*clock + 1);
    *clock
}

pub struct State {
    pub settings: ServerSettings,
    /// When this server process started; monitors measure ages from no earlier than
    /// this, so agents get a full window to reconnect after a server restart, and an
    /// agent that died while the server was down is still caught one window later.
    pub started_ms: i64,
    pub store: Arc<dyn Store>,
    pub persister: Arc<Persister>,
    pub metrics: Arc<Metrics>,
    entities: RwLock<HashMap<String, Entity>>,
    checks: RwLock<BTreeMap<String, CheckSpec>>,
    silences: RwLock<BTreeMap<String, Silence>>,
    events: Mutex<HashMap<String, Event>>,
    /// Bumped whenever the set of checks changes, for the scheduler.
    checks_generation: watch::Sender<u64>,
    /// Where events with handlers go; set once at start (the pipeline needs the state).
    pub pipeline: std::sync::OnceLock<drover_pipeline::Pipeline>,
    /// Member health as published to proxies and name servers, kept incrementally: it
    /// changes only when an entity does or an event's status does, never per result.
    members: Mutex<MemberTable>,
    watch_tx: tokio::sync::broadcast::Sender<WatchMessage>,
    /// Database members' reports and pending orders.
    pub databases: crate::databases::Registry,
}

/// An agent past its keepalive warning threshold (see [`State::overdue_agents`]).
pub struct OverdueAgent {
    pub name: String,
    pub age_ms: i64,
    pub warning_secs: u64,
    pub critical_secs: u64,
    pub interval_ms: i64,
}

/// Frames a slow watcher may fall behind by before it is sent a fresh snapshot.
const WATCH_BACKLOG: usize = 8192;

impl Render for State {
    fn render(&self, key: &str) -> Option<Vec<u8>> {
        if let Some(name) = key.strip_prefix(keys::ENTITIES) {
            self.entities.read().expect("entities lock").get(name).map(to_json)
        } else if key.starts_with(keys::EVENTS) {
            self.events.lock().expect("events lock").get(key).map(to_json)
        } else if let Some(name) = key.strip_prefix(keys::CHECKS) {
            self.checks.read().expect("checks lock").get(name).map(to_json)
        } else if let Some(name) = key.strip_prefix(keys::SILENCES) {
            self.silences.read().expect("silences lock").get(name).map(to_json)
        } else {
            None
        }
    }
}

/// Why an ingest was refused.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("field `check`: {0}")]
    BadCheckName(String),
    #[error("field `entity`: {0}")]
    BadEntityName(String),
}

impl State {
    /// Loads everything from the store. Corrupt records are logged and skipped: one bad
    /// value must not keep the control plane down.
    pub async fn load(
        store: Arc<dyn Store>,
        settings: ServerSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<State>, StoreError> {
        fn load_map<T: serde::de::DeserializeOwned>(
            kvs: Vec<drover_store::KeyValue>,
            prefix: &str,
        ) -> BTreeMap<String, T> {
            let mut out = BTreeMap::new();
            for kv in kvs {
                match from_json::<T>(&kv) {
                    Ok(v) => {
                        out.insert(kv.key[prefix.len()..].to_string(), v);
                    }
                    Err(e) => tracing::error!(error = %e, "skipping corrupt record"),
                }
            }
            out
        }
        let (ents, _) = store.range(keys::ENTITIES).await?;
        let (chks, _) = store.range(keys::CHECKS).await?;
        let (sils, _) = store.range(keys::SILENCES).await?;
        let (evs, _) = store.range(keys::EVENTS).await?;
        let mut entities: HashMap<String, Entity> = load_map(ents, keys::ENTITIES).into_iter().collect();
        for e in entities.values_mut() {
            // Nobody is connected to a server that just started.
            e.connected = false;
        }
        let events: HashMap<String, Event> = load_map::<Event>(evs, "").into_iter().collect();
        let failing = events.values().filter(|e| !e.status.is_ok()).count();
        metrics.events_failing.set(failing as i64);
        let (checks_generation, _) = watch::channel(0);
        let members = {
            let mut by_entity: HashMap<&str, Vec<&Event>> = HashMap::new();
            for ev in events.values() {
                by_entity.entry(ev.entity.as_str()).or_default().push(ev);
            }
            entities
                .values()
                .map(|e| {
                    let evs = by_entity.remove(e.name.as_str()).unwrap_or_default();
                    let mut m = MemberHealth::derive(e, evs.into_iter());
                    m.changed_ms = now_ms();
                    (e.name.clone(), m)
                })
                .collect()
        };
        let (watch_tx, _) = tokio::sync::broadcast::channel(WATCH_BACKLOG);
        Ok(Arc::new(State {
            settings,
            started_ms: now_ms(),
            store,
            persister: Persister::new(),
            metrics,
            entities: RwLock::new(entities),
            checks: RwLock::new(load_map(chks, keys::CHECKS)),
            silences: RwLock::new(load_map(sils, keys::SILENCES)),
            events: Mutex::new(events),
            checks_generation,
            pipeline: std::sync::OnceLock::new(),
            // Every member was just stamped now, so the view's clock starts there too.
            members: Mutex::new(MemberTable { by_name: members, changed_ms: now_ms() }),
            watch_tx,
            databases: crate::databases::Registry::default(),
        }))
    }

    /// Waits until the change with sequence `seq` is durable.
    pub async fn wait_durable(&self, seq: u64) {
        let mut rx = self.persister.flushed.clone();
        let _ = rx.wait_for(|v| *v >= seq).await;
    }

    // ---- member health (the watch stream) --------------------------------------

    /// A snapshot of the current members (with the view's clock) and a receiver for every
    /// change after it, taken together so nothing falls between the two.
    pub fn watch(&self) -> (WatchMessage, tokio::sync::broadcast::Receiver<WatchMessage>) {
        let members = self.members.lock().expect("members lock");
        let rx = self.watch_tx.subscribe();
        let mut snapshot: Vec<MemberHealth> = members.by_name.values().cloned().collect();
        snapshot.sort_by(|a, b| a.entity.cmp(&b.entity));
        (WatchMessage::Snapshot { members: snapshot, changed_ms: members.changed_ms }, rx)
    }

    pub fn member(&self, name: &str) -> Option<MemberHealth> {
        self.members.lock().expect("members lock").by_name.get(name).cloned()
    }

    fn member_entity(&self, e: &Entity) {
        use std::collections::hash_map::Entry;
        let mut members = self.members.lock().expect("members lock");
        let table = &mut *members;
        let (changed, m) = match table.by_name.entry(e.name.clone()) {
            // A new member is published at once, though it starts unhealthy.
            Entry::Vacant(v) => (true, v.insert(MemberHealth::new(e))),
            Entry::Occupied(o) => {
                let m = o.into_mut();
                let before = m.clone();
                m.set_entity(e);
                (!m.same_view(&before), m)
            }
        };
        if changed {
            m.changed_ms = tick(&mut table.changed_ms);
            let _ = self.watch_tx.send(WatchMessage::Upsert { member: m.clone() });
        }
    }

    fn member_update(&self, name: &str, f: impl FnOnce(&mut MemberHealth)) {
        let mut members = self.members.lock().expect("members lock");
        let table = &mut *members;
        let Some(m) = table.by_name.get_mut(name) else { return };
        let before = m.clone();
        f(m);
        if !m.same_view(&before) {
            m.changed_ms = tick(&mut table.changed_ms);
            let _ = self.watch_tx.send(WatchMessage::Upsert { member: m.clone() });
        }
    }

    fn member_remove(&self, name: &str) {
        let mut members = self.members.lock().expect("members lock");
        if members.by_name.remove(name).is_some() {
            let changed_ms = tick(&mut members.changed_ms);
            let _ = self.watch_tx.send(WatchMessage::Remove { entity: name.to_string(), changed_ms });
        }
    }

    // ---- entities -------------------------------------------------------------

    pub fn entities(&self) -> Vec<Entity> {
        let mut v: Vec<Entity> = self.entities.read().expect("entities lock").values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn entity(&self, name: &str) -> Option<Entity> {
        self.entities.read().expect("entities lock").get(name).cloned()
    }

    /// An agent said hello: store what it reports, keep what the server owns.
    pub fn agent_connected(&self, mut e: Entity) -> u64 {
        e.class = EntityClass::Agent;
        e.connected = true;
        e.last_seen_ms = now_ms();
        let key = keys::entity(&e.name);
        self.member_entity(&e);
        self.entities.write().expect("entities lock").insert(e.name.clone(), e);
        self.persister.mark(key)
    }

    pub fn agent_disconnected(&self, name: &str) {
        let mut ents = self.entities.write().expect("entities lock");
        if let Some(e) = ents.get_mut(name) {
            e.connected = false;
            drop(ents);
            self.persister.mark(keys::entity(name));
        }
    }

    /// Records a keepalive and folds an OK keepalive result into its event.
    pub fn keepalive(&self, name: &str, metrics: Vec<drover_core::MetricPoint>) -> Option<u64> {
        let now = now_ms();
        {
            let mut ents = self.entities.write().expect("entities lock");
            let e = ents.get_mut(name)?;
            e.last_seen_ms = now;
            e.metrics = metrics;
        }
        self.persister.mark(keys::entity(name));
        let output = format!("Keepalive last sent from {name} at {}", now / 1000);
        let result = CheckResult::made_by_drover(name, KEEPALIVE, Status::Ok, output, now);
        self.ingest(None, result).ok()
    }

    /// Agents whose last keepalive is older than their warning threshold, measured from
    /// no earlier than the server's start. Computed under the read lock so the monitor's
    /// tick copies out only the late ones, not every entity with its metrics.
    pub fn overdue_agents(&self, now_ms: i64) -> Vec<OverdueAgent> {
        let ents = self.entities.read().expect("entities lock");
        ents.values()
            .filter(|e| e.class == EntityClass::Agent)
            .filter_map(|e| {
                let warning_secs = e.keepalive_warning_secs.unwrap_or(self.settings.keepalive_warning_secs);
                let age_ms = now_ms - e.last_seen_ms.max(self.started_ms);
                (age_ms >= warning_secs as i64 * 1000).then(|| OverdueAgent {
                    name: e.name.clone(),
                    age_ms,
                    warning_secs,
                    critical_secs: e.keepalive_critical_secs.unwrap_or(self.settings.keepalive_critical_secs),
                    interval_ms: e.keepalive_interval_secs.unwrap_or(20) as i64 * 1000,
                })
            })
            .collect()
    }

    /// Creates or replaces an entity from the API or config (proxy entities).
    pub fn put_entity(&self, e: Entity) -> u64 {
        let key = keys::entity(&e.name);
        self.member_entity(&e);
        self.entities.write().expect("entities lock").insert(e.name.clone(), e);
        self.persister.mark(key)
    }

    /// Removes an entity and all its events, raising nothing (deregistration).
    pub fn delete_entity(&self, name: &str) -> Option<u64> {
        let removed = self.entities.write().expect("entities lock").remove(name);
        self.member_remove(name);
        let prefix = keys::events_of(name);
        let mut seq = removed.as_ref().map(|_| self.persister.mark(keys::entity(name)));
        let gone: Vec<String> = {
            let mut evs = self.events.lock().expect("events lock");
            let gone: Vec<String> = evs.keys().filter(|k| k.starts_with(&prefix)).cloned().collect();
            for k in &gone {
                if let Some(ev) = evs.remove(k)
                    && !ev.status.is_ok()
                {
                    self.metrics.events_failing.dec();
                }
            }
            gone
        };
        for k in gone {
            seq = Some(self.persister.mark(k));
        }
        seq
    }

    // ---- checks ---------------------------------------------------------------

    pub fn checks(&self) -> Vec<CheckSpec> {
        self.checks.read().expect("checks lock").values().cloned().collect()
    }

    pub fn check(&self, name: &str) -> Option<CheckSpec> {
        self.checks.read().expect("checks lock").get(name).cloned()
    }

    pub fn put_check(&self, c: CheckSpec) -> u64 {
        let key = keys::check(&c.name);
        self.checks.write().expect("checks lock").insert(c.name.clone(), c);
        self.checks_generation.send_modify(|g| *g += 1);
        self.persister.mark(key)
    }

    pub fn delete_check(&self, name: &str) -> Option<u64> {
        self.checks.write().expect("checks lock").remove(name)?;
        self.checks_generation.send_modify(|g| *g += 1);
        Some(self.persister.mark(keys::check(name)))
    }

    pub fn watch_checks(&self) -> watch::Receiver<u64> {
        self.checks_generation.subscribe()
    }

    // ---- silences -------------------------------------------------------------

    pub fn silences(&self) -> Vec<Silence> {
        self.silences.read().expect("silences lock").values().cloned().collect()
    }

    pub fn silence(&self, name: &str) -> Option<Silence> {
        self.silences.read().expect("silences lock").get(name).cloned()
    }

    pub fn put_silence(&self, s: Silence) -> u64 {
        let key = keys::silence(&s.name);
        self.silences.write().expect("silences lock").insert(s.name.clone(), s);
        let seq = self.persister.mark(key);
        self.refresh_silenced().unwrap_or(seq)
    }

    pub fn delete_silence(&self, name: &str) -> Option<u64> {
        self.silences.write().expect("silences lock").remove(name)?;
        let seq = self.persister.mark(keys::silence(name));
        Some(self.refresh_silenced().unwrap_or(seq))
    }

    /// Re-marks which events are silenced after the set of silences changed, so the
    /// API shows a new silence at once rather than at each check's next result.
    fn refresh_silenced(&self) -> Option<u64> {
        let now = now_secs();
        let changed: Vec<String> = {
            let ents = self.entities.read().expect("entities lock");
            let mut evs = self.events.lock().expect("events lock");
            let mut changed = Vec::new();
            for (key, ev) in evs.iter_mut() {
                let by = ents.get(&ev.entity).map(|e| self.silenced_by(e, &ev.check, now)).unwrap_or_default();
                if by != ev.silenced_by {
                    ev.silenced_by = by;
                    changed.push(key.clone());
                }
            }
            changed
        };
        changed.into_iter().map(|k| self.persister.mark(k)).max()
    }

    /// Drops silences whose time is up.
    pub fn expire_silences(&self, now_secs: i64) {
        let expired: Vec<String> = self
            .silences
            .read()
            .expect("silences lock")
            .values()
            .filter(|s| s.is_expired(now_secs))
            .map(|s| s.name.clone())
            .collect();
        for name in expired {
            tracing::info!(silence = %name, "silence expired");
            self.delete_silence(&name);
        }
    }

    fn silenced_by(&self, entity: &Entity, check: &str, now_secs: i64) -> Vec<String> {
        let sils = self.silences.read().expect("silences lock");
        if sils.is_empty() {
            return Vec::new();
        }
        sils.values().filter(|s| s.is_active(now_secs) && s.matches(entity, check)).map(|s| s.name.clone()).collect()
    }

    // ---- events ---------------------------------------------------------------

    pub fn events(&self, entity: Option<&str>) -> Vec<Event> {
        let evs = self.events.lock().expect("events lock");
        let mut v: Vec<Event> = match entity {
            Some(e) => {
                let prefix = keys::events_of(e);
                evs.iter().filter(|(k, _)| k.starts_with(&prefix)).map(|(_, v)| v.clone()).collect()
            }
            None => evs.values().cloned().collect(),
        };
        drop(evs);
        v.sort_by(|a, b| (&a.entity, &a.check).cmp(&(&b.entity, &b.check)));
        v
    }

    /// Every entity's event for `check` (aggregates).
    pub fn events_of_check(&self, check: &str) -> Vec<Event> {
        self.events.lock().expect("events lock").values().filter(|e| e.check == check).cloned().collect()
    }

    pub fn event(&self, entity: &str, check: &str) -> Option<Event> {
        self.events.lock().expect("events lock").get(&keys::event(entity, check)).cloned()
    }

    pub fn delete_event(&self, entity: &str, check: &str) -> Option<u64> {
        let key = keys::event(entity, check);
        let ev = self.events.lock().expect("events lock").remove(&key)?;
        if !ev.status.is_ok() {
            self.metrics.events_failing.dec();
        }
        self.member_update(entity, |m| m.remove_check(check));
        Some(self.persister.mark(key))
    }

    /// Snapshot of (key, event) pairs for the monitors.
    pub fn with_events<R>(&self, f: impl FnOnce(&HashMap<String, Event>) -> R) -> R {
        f(&self.events.lock().expect("events lock"))
    }

    /// Folds one result into its event. `reporter` is the agent that sent it; the
    /// result's own `entity` (proxy checks, scripts) takes precedence.
    pub fn ingest(&self, reporter: Option<&str>, result: CheckResult) -> Result<u64, IngestError> {
        drover_core::resource::validate_name("check", &result.check)
            .map_err(|e| IngestError::BadCheckName(e.message))?;
        let entity_name =
            if result.entity.is_empty() { reporter.unwrap_or_default().to_string() } else { result.entity.clone() };
        drover_core::resource::validate_name("entity", &entity_name)
            .map_err(|e| IngestError::BadEntityName(e.message))?;
        let now = now_ms();

        // A result for an unknown entity creates a proxy entity for it (as Sensu Go does),
        // so a website checked by proxy shows up without being declared first.
        if !self.entities.read().expect("entities lock").contains_key(&entity_name) {
            self.put_entity(Entity::new(&entity_name, EntityClass::Proxy));
        }
        // Read what the event needs from the entity under the lock; cloning the entity
        // (with its metrics) per result would dominate the hot path.
        let (cfg, silenced_by) = {
            let ents = self.entities.read().expect("entities lock");
            let entity = ents.get(&entity_name);
            let cfg = if result.check == KEEPALIVE {
                let handlers = match entity {
                    Some(e) if !e.keepalive_handlers.is_empty() => e.keepalive_handlers.clone(),
                    _ => self.settings.keepalive_handlers.clone(),
                };
                EventCheckConfig { handlers, ..Default::default() }
            } else {
                match self.checks.read().expect("checks lock").get(&result.check) {
                    Some(c) => EventCheckConfig::from(c),
                    None => result.check_config.clone().unwrap_or_default(),
                }
            };
            let silenced_by = entity.map(|e| self.silenced_by(e, &result.check, now_secs())).unwrap_or_default();
            (cfg, silenced_by)
        };

        let key = keys::event(&entity_name, &result.check);
        let (action, to_handle, status_change) = {
            let mut evs = self.events.lock().expect("events lock");
            let was_failing;
            let mut previous = None;
            let ev = match evs.get_mut(&key) {
                Some(ev) => {
                    was_failing = !ev.status.is_ok();
                    previous = Some(ev.status);
                    ev.check_config = cfg;
                    ev.apply(&result, now);
                    ev
                }
                None => {
                    was_failing = false;
                    evs.entry(key.clone()).or_insert_with(|| Event::first(&entity_name, &result, cfg, now))
                }
            };
            ev.silenced_by = silenced_by;
            match (was_failing, ev.status.is_ok()) {
                (false, false) => self.metrics.events_failing.inc(),
                (true, true) => self.metrics.events_failing.dec(),
                _ => 0,
            };
            // Only events that name handlers go to the pipeline: the copy costs, and an
            // event without handlers has nothing to notify.
            let to_handle = match self.pipeline.get() {
                Some(p) if !ev.check_config.handlers.is_empty() && p.would_accept(&ev.check_config.handlers) => {
                    Some(ev.clone())
                }
                _ => None,
            };
            let status_change = (previous != Some(ev.status)).then(|| (ev.status, ev.output.clone()));
            (ev.action, to_handle, status_change)
        };
        if let Some((status, output)) = status_change {
            self.member_update(&entity_name, |m| m.set_check(&result.check, status, &output));
        }
        self.metrics.results_received.inc();
        if let (Some(ev), Some(p)) = (to_handle, self.pipeline.get())
            && !p.submit(ev)
        {
            tracing::warn!(entity = %entity_name, check = %result.check, "pipeline queue full; event not handled");
        }
        let seq = self.persister.mark(key);
        if action == EventAction::Resolve
            && let Some(entity) = self.entity(&entity_name)
        {
            self.end_silences_on_resolve(&entity, &result.check);
        }
        Ok(seq)
    }

    fn end_silences_on_resolve(&self, entity: &Entity, check: &str) {
        let done: Vec<String> = self
            .silences
            .read()
            .expect("silences lock")
            .values()
            .filter(|s| s.expire_on_resolve && s.matches(entity, check))
            .map(|s| s.name.clone())
            .collect();
        for name in done {
            tracing::info!(silence = %name, entity = %entity.name, check, "silence ended: its event resolved");
            self.delete_silence(&name);
        }
    }

    /// Names of connected agents subscribed to any of `subs`, sorted (the scheduler's
    /// targets; sorted so round robin rotates in a stable order).
    pub fn subscribed_agents(&self, subs: &[String]) -> Vec<String> {
        let mut v: Vec<String> = self
            .entities
            .read()
            .expect("entities lock")
            .values()
            .filter(|e| e.class == EntityClass::Agent && e.connected && subs.iter().any(|s| e.is_subscribed(s)))
            .map(|e| e.name.clone())
            .collect();
        v.sort();
        v
    }

    /// Proxy entities a proxy check runs for.
    pub fn proxy_targets(&self, check: &CheckSpec) -> Vec<Entity> {
        let ents = self.entities.read().expect("entities lock");
        if let Some(name) = &check.proxy_entity_name {
            let e = ents.get(name).cloned().unwrap_or_else(|| Entity::new(name, EntityClass::Proxy));
            return vec![e];
        }
        match &check.proxy_requests {
            Some(pr) => {
                let mut v: Vec<Entity> = ents.values().filter(|e| pr.matches(e)).cloned().collect();
                v.sort_by(|a, b| a.name.cmp(&b.name));
                v
            }
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_view_clock_never_goes_back_even_when_the_wall_clock_does() {
        // The last change was stamped ahead of this machine's clock now (it was stepped
        // back since), or in this very millisecond: the next one still comes after it.
        let ahead = now_ms() + 60_000;
        let mut clock = ahead;
        assert_eq!(tick(&mut clock), ahead + 1);
        assert_eq!(clock, ahead + 1);
        let before = now_ms();
        assert!(tick(&mut 0) >= before);
    }
}
