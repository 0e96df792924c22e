//! Member health as the control plane publishes it to data planes (proxies, name
//! servers): one [`MemberHealth`] per entity, streamed as a snapshot then changes.
//!
//! Health has one meaning across drover: a member is healthy when its agent's keepalive
//! is passing (a member that has never sent one is not: new members start out of
//! rotation until proven). Consumers add their own rules on top — a proxy may also
//! require named checks to pass (`checks`), and applies rise/fall thresholds to its own
//! active checks.

use crate::Event;
use crate::resource::{Entity, EntityClass};
use crate::status::Status;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberHealth {
    pub entity: String,
    #[serde(default)]
    pub class: EntityClass,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default)]
    pub subscriptions: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Keepalive passing (agents) or no failing check (proxy entities).
    pub healthy: bool,
    /// Why, for people: "keepalive passing", "keepalive CRITICAL: No keepalive ...".
    pub reason: String,
    /// Latest status of every check on this member, keepalive included.
    #[serde(default)]
    pub checks: BTreeMap<String, Status>,
    /// When the server last changed this view (ms since the epoch, server clock): one
    /// clock for every data plane, so name servers fed the same view derive the same
    /// SOA serial. Not part of the view's content (see [`MemberHealth::same_view`]).
    #[serde(default)]
    pub changed_ms: i64,
}

impl MemberHealth {
    /// A member with no results yet: an agent is not healthy until its first keepalive.
    pub fn new(entity: &Entity) -> MemberHealth {
        let mut m = MemberHealth {
            entity: entity.name.clone(),
            class: entity.class,
            address: None,
            subscriptions: Vec::new(),
            labels: BTreeMap::new(),
            healthy: false,
            reason: "no keepalive yet".to_string(),
            checks: BTreeMap::new(),
            changed_ms: 0,
        };
        m.set_entity(entity);
        if m.class == EntityClass::Proxy {
            m.recompute_proxy();
        }
        m
    }

    /// Derives a member's health from its entity and its events.
    pub fn derive<'a>(entity: &Entity, events: impl Iterator<Item = &'a Event>) -> MemberHealth {
        let mut m = MemberHealth::new(entity);
        for ev in events {
            m.set_check(&ev.check, ev.status, &ev.output);
        }
        m
    }

    /// Takes the entity's registration data (address, subscriptions, labels, class).
    pub fn set_entity(&mut self, entity: &Entity) {
        self.address = entity.address.clone();
        self.subscriptions = entity.subscriptions.clone();
        self.labels = entity.labels.clone();
        if self.class != entity.class {
            self.class = entity.class;
            self.recompute_proxy();
        }
    }

    /// Records a check's latest status; `output` explains a failing keepalive.
    pub fn set_check(&mut self, check: &str, status: Status, output: &str) {
        self.checks.insert(check.to_string(), status);
        match self.class {
            EntityClass::Agent if check == KEEPALIVE => {
                self.healthy = status.is_ok();
                self.reason = if status.is_ok() {
                    "keepalive passing".to_string()
                } else {
                    format!("keepalive {status}: {}", output.lines().next().unwrap_or(""))
                };
            }
            EntityClass::Agent => {}
            EntityClass::Proxy => self.recompute_proxy(),
        }
    }

    pub fn remove_check(&mut self, check: &str) {
        self.checks.remove(check);
        if self.class == EntityClass::Agent && check == KEEPALIVE {
            self.healthy = false;
            self.reason = "no keepalive yet".to_string();
        } else if self.class == EntityClass::Proxy {
            self.recompute_proxy();
        }
    }

    fn recompute_proxy(&mut self) {
        if self.class != EntityClass::Proxy {
            return;
        }
        match self.checks.iter().find(|(_, s)| !s.is_ok()) {
            None => {
                self.healthy = true;
                self.reason = "no failing check".to_string();
            }
            Some((name, s)) => {
                self.healthy = false;
                self.reason = format!("check {name} {s}");
            }
        }
    }

    /// Equal apart from `changed_ms`.
    pub fn same_view(&self, other: &MemberHealth) -> bool {
        self.entity == other.entity
            && self.class == other.class
            && self.address == other.address
            && self.subscriptions == other.subscriptions
            && self.labels == other.labels
            && self.healthy == other.healthy
            && self.reason == other.reason
            && self.checks == other.checks
    }

    /// Healthy, and every check named in `required` is passing (a missing one is not).
    pub fn passes(&self, required: &[String]) -> bool {
        self.healthy && required.iter().all(|c| self.checks.get(c).is_some_and(|s| s.is_ok()))
    }
}

const KEEPALIVE: &str = "keepalive";

/// Every member by entity name, as a data plane holds it: swapped whole on each change,
/// so readers take one consistent view without a lock.
pub type Members = std::sync::Arc<View>;

/// The members and the view's own clock. Reads as the map of members (`Deref`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    pub members: BTreeMap<String, MemberHealth>,
    /// The server's clock for the view as of its snapshot, moved on by each removal since
    /// (ms since the epoch; 0 when not known): the members' own `changed_ms` cannot say
    /// when one of them left. [`View::clock_ms`] adds theirs.
    pub changed_ms: i64,
}

impl View {
    pub fn new(members: BTreeMap<String, MemberHealth>, changed_ms: i64) -> View {
        View { members, changed_ms }
    }

    /// The newest change the view records: its own clock or a member's, whichever is later.
    pub fn clock_ms(&self) -> i64 {
        self.members.values().map(|m| m.changed_ms).fold(self.changed_ms, i64::max)
    }
}

/// A view of these members whose own clock is not known (0).
impl FromIterator<(String, MemberHealth)> for View {
    fn from_iter<I: IntoIterator<Item = (String, MemberHealth)>>(iter: I) -> View {
        View::new(iter.into_iter().collect(), 0)
    }
}

impl std::ops::Deref for View {
    type Target = BTreeMap<String, MemberHealth>;

    fn deref(&self) -> &Self::Target {
        &self.members
    }
}

impl MemberHealth {
    /// Why the member is out for a consumer requiring `required` checks, or `None` when
    /// it [`passes`](MemberHealth::passes).
    pub fn failing_reason(&self, required: &[String]) -> Option<String> {
        if !self.healthy {
            return Some(self.reason.clone());
        }
        required.iter().find_map(|c| match self.checks.get(c) {
            None => Some(format!("check {c} has no result yet")),
            Some(s) if !s.is_ok() => Some(format!("check {c} {s}")),
            Some(_) => None,
        })
    }
}

/// Frames of `GET /api/v1/watch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WatchMessage {
    /// Every member; sent first, and again whenever the watcher fell behind.
    /// `changed_ms`: the view's clock ([`View::changed_ms`]; absent from older servers).
    Snapshot {
        members: Vec<MemberHealth>,
        #[serde(default)]
        changed_ms: i64,
    },
    /// A member appeared or its health view changed.
    Upsert { member: MemberHealth },
    /// A member is gone (deregistered or deleted), at `changed_ms` (server clock).
    Remove {
        entity: String,
        #[serde(default)]
        changed_ms: i64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::CheckResult;

    fn ev(entity: &str, check: &str, status: Status) -> Event {
        Event::first(
            entity,
            &CheckResult::made_by_drover(entity, check, status, "out".into(), 1),
            Default::default(),
            1,
        )
    }

    #[test]
    fn watch_frames_without_the_view_clock_still_parse() {
        // Frames from a server that predates the view's clock.
        let remove: WatchMessage = serde_json::from_str(r#"{"type":"remove","entity":"x"}"#).unwrap();
        assert_eq!(remove, WatchMessage::Remove { entity: "x".into(), changed_ms: 0 });
        let snapshot: WatchMessage = serde_json::from_str(r#"{"type":"snapshot","members":[]}"#).unwrap();
        assert_eq!(snapshot, WatchMessage::Snapshot { members: vec![], changed_ms: 0 });
    }

    #[test]
    fn agent_without_keepalive_is_not_yet_healthy() {
        let e = Entity::new("web1", EntityClass::Agent);
        let m = MemberHealth::derive(&e, std::iter::empty());
        assert!(!m.healthy);
        assert_eq!(m.reason, "no keepalive yet");
    }

    #[test]
    fn agent_health_follows_keepalive_and_named_checks_are_separate() {
        let e = Entity::new("web1", EntityClass::Agent);
        let evs = [ev("web1", "keepalive", Status::Ok), ev("web1", "http", Status::Critical)];
        let m = MemberHealth::derive(&e, evs.iter());
        assert!(m.healthy, "keepalive decides the base health");
        assert!(!m.passes(&["http".to_string()]), "a consumer requiring http sees it failing");
        assert!(!m.passes(&["missing".to_string()]), "a required check that never ran is not passing");
        let evs = [ev("web1", "keepalive", Status::Critical)];
        let m = MemberHealth::derive(&e, evs.iter());
        assert!(!m.healthy);
        assert!(m.reason.starts_with("keepalive CRITICAL"), "{}", m.reason);
    }

    #[test]
    fn proxy_entity_is_healthy_until_a_check_fails() {
        let e = Entity::new("site", EntityClass::Proxy);
        assert!(MemberHealth::derive(&e, std::iter::empty()).healthy);
        let evs = [ev("site", "http", Status::Warning)];
        assert!(!MemberHealth::derive(&e, evs.iter()).healthy);
    }
}
