//! Store key layout. Every key lives under `/drover/` so an etcd cluster can be shared.

pub const ENTITIES: &str = "/drover/entities/";
pub const CHECKS: &str = "/drover/checks/";
pub const SILENCES: &str = "/drover/silences/";
pub const EVENTS: &str = "/drover/events/";

pub fn entity(name: &str) -> String {
    format!("{ENTITIES}{name}")
}
pub fn check(name: &str) -> String {
    format!("{CHECKS}{name}")
}
pub fn silence(name: &str) -> String {
    format!("{SILENCES}{name}")
}
pub fn event(entity: &str, check: &str) -> String {
    format!("{EVENTS}{entity}/{check}")
}
pub fn events_of(entity: &str) -> String {
    format!("{EVENTS}{entity}/")
}
