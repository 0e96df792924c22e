//! When checks run: server requests (after their splay) and the agent's own local
//! checks (interval or cron), all sharing one concurrency limit.
//!
//! Each run happens in a task that ends on shutdown; dropping a run mid-way kills its
//! process group (see the executor), so a stopping agent leaves no checks behind.

use crate::Shared;
use crate::executor;
use drover_core::event::EventCheckConfig;
use drover_core::protocol::CheckRequest;
use drover_core::resource::CheckSpec;
use rand::Rng;
use std::cmp::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{Instant, MissedTickBehavior};

/// Runs a server's check request in the background.
pub(crate) fn spawn_request(shared: Arc<Shared>, request: CheckRequest) {
    tokio::spawn(async move {
        let run = async {
            tokio::time::sleep(Duration::from_millis(request.splay_ms)).await;
            let result = run_limited(&shared, &request).await;
            shared.outbox.enqueue(result);
        };
        tokio::select! {
            () = shared.stopped() => {}
            () = run => {}
        }
    });
}

/// Executes under the shared concurrency limit; requests beyond it queue here.
async fn run_limited(shared: &Shared, request: &CheckRequest) -> drover_core::event::CheckResult {
    // The semaphore is never closed, so acquire cannot fail; running without a permit
    // would still be better than losing the result.
    let _permit = shared.check_slots.acquire().await.ok();
    executor::execute(request, &shared.entity, shared.output_limit_bytes).await
}

/// How a local check is scheduled.
#[derive(Debug)]
pub(crate) enum Schedule {
    Every(Duration),
    Cron(Box<croner::Cron>),
}

impl Schedule {
    pub fn of(check: &CheckSpec) -> Result<Schedule, String> {
        match (check.interval_secs, &check.cron) {
            (Some(secs), None) if secs > 0 => Ok(Schedule::Every(Duration::from_secs(secs))),
            (None, Some(expr)) => drover_core::resource::parse_cron(expr).map(|c| Schedule::Cron(Box::new(c))),
            _ => Err("a local check needs exactly one of `interval_secs` (at least 1) or `cron`".into()),
        }
    }
}

/// Runs one local check on its schedule until shutdown. Runs of the same check never
/// overlap: a run that overruns its interval delays the next one instead of piling up.
pub(crate) async fn run_local(shared: Arc<Shared>, check: CheckSpec, schedule: Schedule) {
    let check_config = EventCheckConfig::from(&check);
    // Local checks report for the agent's own entity unless they name a proxy entity.
    let entity = check.proxy_entity_name.clone().unwrap_or_default();
    let request = CheckRequest { check, issued_ms: 0, splay_ms: 0, proxy_entity: None };
    let run_once = || async {
        let mut result = run_limited(&shared, &request).await;
        result.entity = entity.clone();
        result.check_config = Some(check_config.clone());
        shared.outbox.enqueue(result);
    };
    let schedule_loop = async {
        match schedule {
            Schedule::Every(every) => {
                // A random first run within the interval spreads checks (and agents
                // started together) instead of firing them all at once.
                let splay = rand::rng().random_range(Duration::ZERO..every);
                let mut ticks = tokio::time::interval_at(Instant::now() + splay, every);
                ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
                loop {
                    ticks.tick().await;
                    run_once().await;
                }
            }
            Schedule::Cron(cron) => {
                let mut last_ms = 0;
                loop {
                    // Searching from the last target too keeps a wall clock that lags the
                    // timer from firing the same occurrence twice.
                    let now_ms = drover_core::time::now_ms();
                    let Some(next) = next_cron_ms(&cron, now_ms.max(last_ms)) else {
                        tracing::warn!(check = %request.check.name, "cron expression has no future occurrence; not scheduling");
                        return;
                    };
                    last_ms = next;
                    tokio::time::sleep(Duration::from_millis((next - now_ms).max(0) as u64)).await;
                    run_once().await;
                }
            }
        }
    };
    tokio::select! {
        () = shared.stopped() => {}
        () = schedule_loop => {}
    }
}

/// The next occurrence strictly after `now_ms`, in ms since the epoch, evaluated in UTC
/// (as the server evaluates its own cron checks).
pub(crate) fn next_cron_ms(cron: &croner::Cron, now_ms: i64) -> Option<i64> {
    let now = UtcSecs(now_ms.div_euclid(1000));
    cron.find_next_occurrence(&now, false).ok().map(|t| t.0 * 1000)
}

/// Whole seconds since the Unix epoch in UTC: the minimum croner needs, without pulling
/// in a date library for one computation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct UtcSecs(i64);

impl croner::CronDateTime for UtcSecs {
    fn to_civil(&self) -> croner::CivilDateTime {
        let days = self.0.div_euclid(86_400);
        let secs = self.0.rem_euclid(86_400) as u32;
        let (y, m, d) = civil_from_days(days);
        croner::CivilDateTime::new(
            croner::CivilDate::from_parts_unchecked(y, m, d),
            croner::CivilTime::from_parts_unchecked(secs / 3600, secs / 60 % 60, secs % 60),
        )
    }

    fn civil_weekday(&self) -> croner::Weekday {
        // 1970-01-01 was a Thursday, four days after a Sunday.
        croner::Weekday::from_days_from_sunday((self.0.div_euclid(86_400) + 4).rem_euclid(7) as u32)
    }

    fn resolve_civil(
        &self,
        civil: croner::CivilDateTime,
    ) -> Result<croner::Resolution<Self>, croner::errors::CronError> {
        // UTC has no daylight saving time, so every wall clock time happens exactly once.
        let days = days_from_civil(civil.year(), civil.month(), civil.day());
        let secs = i64::from(civil.hour() * 3600 + civil.minute() * 60 + civil.second());
        Ok(croner::Resolution::Single(UtcSecs(days * 86_400 + secs)))
    }

    fn checked_add_seconds(&self, seconds: i64) -> Option<Self> {
        self.0.checked_add(seconds).map(UtcSecs)
    }

    fn cmp_instant(&self, other: &Self) -> Ordering {
        self.0.cmp(&other.0)
    }
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (year, month, day).
fn civil_from_days(days: i64) -> (i32, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y as i32, m, d)
}

/// The inverse of [`civil_from_days`].
fn days_from_civil(year: i32, month: u32, day: u32) -> i64 {
    let y = i64::from(year) - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_round_trip() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        for days in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn cron_next_occurrence_is_in_utc() {
        // 2024-02-29T10:17:30Z
        let now_ms = (19_782 * 86_400 + 10 * 3600 + 17 * 60 + 30) * 1000;
        let cron = |e: &str| drover_core::resource::parse_cron(e).unwrap();
        let hourly = cron("0 * * * *");
        assert_eq!(next_cron_ms(&hourly, now_ms), Some((19_782 * 86_400 + 11 * 3600) * 1000));
        // Fridays at 00:00: 2024-03-01 was a Friday.
        let fridays = cron("0 0 * * FRI");
        assert_eq!(next_cron_ms(&fridays, now_ms), Some(19_783 * 86_400 * 1000));
        let every_5s = cron("*/5 * * * * *");
        assert_eq!(next_cron_ms(&every_5s, now_ms), Some(now_ms + 5000));
    }

    #[test]
    fn schedule_requires_interval_or_cron() {
        let mut c = CheckSpec::new("c", "true");
        assert!(Schedule::of(&c).is_err());
        c.interval_secs = Some(10);
        assert!(matches!(Schedule::of(&c), Ok(Schedule::Every(d)) if d == Duration::from_secs(10)));
        c.interval_secs = None;
        c.cron = Some("not cron".into());
        assert!(Schedule::of(&c).unwrap_err().contains("not cron"));
    }
}
