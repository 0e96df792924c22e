//! Check dependencies: events of a check whose dependency is failing are recorded by
//! the server but not handled, so one broken router does not page for every service
//! behind it.

use crate::{Context, KEEPALIVE};
use drover_core::pipeline::Dependency;
use drover_core::{EntityClass, Event};

/// Why `event` must not be handled now, if it must not.
pub fn suppressed_by(ctx: &dyn Context, event: &Event) -> Option<String> {
    if event.check != KEEPALIVE
        && ctx.entity(&event.entity).is_some_and(|e| e.class == EntityClass::Agent)
        && ctx.event(&event.entity, KEEPALIVE).is_some_and(|k| !k.status.is_ok())
    {
        // A node that stopped sending keepalives is the one alert; its checks'
        // results are stale or caused by the same outage.
        return Some(format!("keepalive of {} is failing", event.entity));
    }
    let spec = ctx.check(&event.check)?;
    for d in &spec.dependencies {
        // Validated at load; a bad entry here came from somewhere else and is ignored.
        let Ok(dep) = Dependency::parse(d) else { continue };
        let entity = dep.entity.as_deref().unwrap_or(&event.entity);
        if entity == event.entity && dep.check == event.check {
            continue;
        }
        if ctx.event(entity, &dep.check).is_some_and(|e| !e.status.is_ok()) {
            return Some(format!("dependency {entity}/{} is failing", dep.check));
        }
    }
    None
}
