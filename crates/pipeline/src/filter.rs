//! Filters: the built-ins, Sensu's occurrence throttle ("fatigue check"), CEL
//! expressions over the event view, and time windows.

use crate::view;
use chrono::{DateTime, Datelike, Duration, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use drover_core::Event;
use drover_core::pipeline::{FilterAction, FilterSpec, TimeWindow, parse_hhmm, parse_weekday};
use std::sync::OnceLock;

/// What a filter looks at besides the event itself.
pub struct FilterInput<'a> {
    pub event: &'a Event,
    /// The event view (lazily converted to CEL once per event, shared by all filters).
    pub view: &'a serde_json::Value,
    pub cel: &'a OnceLock<cel::Value>,
    pub now: DateTime<Utc>,
    /// Seconds between results of this check (its interval, or keepalive interval);
    /// None when unknown (cron checks).
    pub interval_secs: Option<u64>,
    /// Highest consecutive occurrences of the incident this event belongs to or ends.
    pub incident_watermark: u64,
}

#[derive(Debug)]
pub enum Filter {
    IsIncident,
    NotSilenced,
    HasMetrics,
    Custom(Box<CustomFilter>),
}

impl Filter {
    pub fn builtin(name: &str) -> Option<Filter> {
        match name {
            "is_incident" => Some(Filter::IsIncident),
            "not_silenced" => Some(Filter::NotSilenced),
            "has_metrics" => Some(Filter::HasMetrics),
            _ => None,
        }
    }

    /// Does the event get through?
    pub fn passes(&self, input: &FilterInput) -> bool {
        match self {
            Filter::IsIncident => view::is_incident(input.event),
            Filter::NotSilenced => !input.event.is_silenced(),
            Filter::HasMetrics => !input.event.metrics.is_empty(),
            Filter::Custom(f) => f.passes(input),
        }
    }
}

#[derive(Debug)]
pub struct CustomFilter {
    pub name: String,
    pub action: FilterAction,
    pub expressions: Vec<(String, cel::Program)>,
    pub occurrences: Option<u64>,
    pub refresh_secs: Option<u64>,
    pub windows: Windows,
}

/// A bad expression: which one (0-based), and where in it (1-based line and column).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpressionError {
    pub index: usize,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl CustomFilter {
    /// Compiles the spec; errors are for the caller to locate in the config file.
    pub fn compile(spec: &FilterSpec) -> Result<CustomFilter, CompileError> {
        let mut expressions = Vec::new();
        for (index, src) in spec.expressions.iter().enumerate() {
            let program = compile_expression(src).map_err(|(line, column, message)| {
                CompileError::Expression(ExpressionError { index, line, column, message })
            })?;
            expressions.push((src.clone(), program));
        }
        let tz = match &spec.time_zone {
            Some(name) => name.parse::<Tz>().map_err(|_| CompileError::TimeZone(name.clone()))?,
            None => Tz::UTC,
        };
        Ok(CustomFilter {
            name: spec.name.clone(),
            action: spec.action,
            expressions,
            occurrences: spec.occurrences,
            refresh_secs: spec.refresh_secs,
            windows: Windows::new(&spec.when, tz),
        })
    }

    fn matches(&self, input: &FilterInput) -> bool {
        if let Some(n) = self.occurrences
            && !fatigue_check(input.event, n, self.refresh_secs, input.interval_secs, input.incident_watermark)
        {
            return false;
        }
        if !self.windows.is_empty() && !self.windows.contains(input.now) {
            return false;
        }
        if self.expressions.is_empty() {
            return true;
        }
        let event = input.cel.get_or_init(|| view::to_cel(input.view));
        let mut ctx = cel::Context::default();
        ctx.add_variable_from_value("event", event.clone());
        self.expressions.iter().all(|(src, program)| match program.execute(&ctx) {
            Ok(cel::Value::Bool(b)) => b,
            // An expression that cannot be evaluated for this event (a missing label, a
            // type mismatch) does not match, as in Sensu; it must not stop the pipeline.
            Ok(other) => {
                tracing::debug!(filter = %self.name, expression = %src, result = ?other, "filter expression is not a bool");
                false
            }
            Err(e) => {
                tracing::debug!(filter = %self.name, expression = %src, error = %e, "filter expression failed");
                false
            }
        })
    }

    pub fn passes(&self, input: &FilterInput) -> bool {
        let m = self.matches(input);
        match self.action {
            FilterAction::Allow => m,
            FilterAction::Deny => !m,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompileError {
    Expression(ExpressionError),
    TimeZone(String),
}

/// Compiles one CEL expression; on failure (line, column, message) of the first error.
pub fn compile_expression(src: &str) -> Result<cel::Program, (usize, usize, String)> {
    // The parser's errors hold Rc's; turn them into plain data right here.
    let result = std::panic::catch_unwind(|| {
        cel::Program::compile(src).map_err(|errs| {
            errs.errors.first().map(|e| (e.pos.0.max(1) as usize, e.pos.1.max(1) as usize, e.msg.clone())).unwrap_or((
                1,
                1,
                "invalid expression".to_string(),
            ))
        })
    });
    match result {
        Ok(r) => r,
        // The generated parser panics on a few malformed inputs; that must be a load
        // error, not a crash of the server.
        Err(_) => Err((1, 1, "the expression could not be parsed".to_string())),
    }
}

/// Sensu's fatigue check: the `n`-th consecutive occurrence, then every
/// `refresh_secs / interval_secs` occurrences; a resolution only if its incident
/// reached `n` (was alerted). Without a known interval only the `n`-th is alerted.
/// OK events that resolve nothing never match: Sensu counts their occurrences too, so
/// its filter alone would "alert" on the n-th OK in a row.
pub fn fatigue_check(e: &Event, n: u64, refresh_secs: Option<u64>, interval: Option<u64>, watermark: u64) -> bool {
    if e.status.is_ok() {
        return e.action == drover_core::event::EventAction::Resolve && watermark >= n;
    }
    if e.occurrences == n {
        return true;
    }
    if e.occurrences < n {
        return false;
    }
    match (refresh_secs, interval) {
        (Some(refresh), Some(interval)) if interval > 0 => {
            let every = (refresh / interval).max(1);
            (e.occurrences - n).is_multiple_of(every)
        }
        _ => false,
    }
}

/// The highest run of one non-OK status in the incident `e` is in (or, for a
/// resolution, the one it ends), read from the history. Used because the event's own
/// watermark restarts at a resolution.
pub fn history_watermark(e: &Event) -> u64 {
    let mut hist = e.history.iter().rev().map(|h| h.status);
    if e.status.is_ok() {
        hist.next();
    }
    let mut best = 0u64;
    let mut run = 0u64;
    let mut prev = None;
    for s in hist {
        if s.is_ok() {
            break;
        }
        run = if prev == Some(s) { run + 1 } else { 1 };
        best = best.max(run);
        prev = Some(s);
    }
    best
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    /// Bit d set = weekday d (0 = Monday) included; all bits when no days were given.
    days: u8,
    begin_min: u32,
    end_min: u32,
}

/// A filter's `when`, in its time zone.
#[derive(Debug, Clone)]
pub struct Windows {
    windows: Vec<Window>,
    tz: Tz,
}

impl Windows {
    /// The specs must have passed `TimeWindow::validate`.
    pub fn new(specs: &[TimeWindow], tz: Tz) -> Windows {
        let windows = specs
            .iter()
            .map(|w| {
                let days = if w.days.is_empty() {
                    0x7f
                } else {
                    w.days.iter().filter_map(|d| parse_weekday(d)).fold(0u8, |acc, d| acc | (1 << d))
                };
                Window { days, begin_min: parse_hhmm(&w.begin).unwrap_or(0), end_min: parse_hhmm(&w.end).unwrap_or(0) }
            })
            .collect();
        Windows { windows, tz }
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    pub fn contains(&self, now: DateTime<Utc>) -> bool {
        let local = self.tz.from_utc_datetime(&now.naive_utc());
        let minute = local.hour() * 60 + local.minute();
        let today = local.weekday().num_days_from_monday();
        let yesterday = (local - Duration::days(1)).weekday().num_days_from_monday();
        let on = |mask: u8, day: u32| mask & (1 << day) != 0;
        self.windows.iter().any(|w| {
            if w.begin_min == w.end_min {
                on(w.days, today)
            } else if w.begin_min < w.end_min {
                on(w.days, today) && minute >= w.begin_min && minute < w.end_min
            } else {
                // Past midnight: the window belongs to the day it began.
                (on(w.days, today) && minute >= w.begin_min) || (on(w.days, yesterday) && minute < w.end_min)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_core::Status;
    use drover_core::event::{CheckResult, EventAction};

    fn result(status: Status) -> CheckResult {
        CheckResult::made_by_drover("", "c", status, String::new(), 0)
    }

    fn run(statuses: &[Status]) -> Event {
        let mut e = Event::first("n", &result(statuses[0]), Default::default(), 0);
        for (i, s) in statuses[1..].iter().enumerate() {
            e.apply(&result(*s), i as i64 + 1);
        }
        e
    }

    fn spec(expressions: &[&str]) -> FilterSpec {
        FilterSpec {
            name: "f".into(),
            action: FilterAction::Allow,
            expressions: expressions.iter().map(|s| s.to_string()).collect(),
            occurrences: None,
            refresh_secs: None,
            when: vec![],
            time_zone: None,
        }
    }

    fn passes(f: &CustomFilter, e: &Event, now: DateTime<Utc>) -> bool {
        let mut entity = drover_core::Entity::new("n", drover_core::EntityClass::Agent);
        entity.labels.insert("env".into(), "prod".into());
        let view = view::event_view(e, Some(&entity));
        let cel = OnceLock::new();
        f.passes(&FilterInput {
            event: e,
            view: &view,
            cel: &cel,
            now,
            interval_secs: Some(60),
            incident_watermark: history_watermark(e),
        })
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn throttle_alerts_at_nth_occurrence_then_once_per_refresh() {
        let mut statuses = vec![Status::Ok];
        let mut alerted = Vec::new();
        for occ in 1..=12u64 {
            statuses.push(Status::Critical);
            let e = run(&statuses);
            assert_eq!(e.occurrences, occ);
            // interval 60 s, refresh 300 s: every 5th occurrence after the 3rd.
            if fatigue_check(&e, 3, Some(300), Some(60), history_watermark(&e)) {
                alerted.push(occ);
            }
        }
        assert_eq!(alerted, vec![3, 8]);
    }

    #[test]
    fn throttle_passes_resolution_only_of_alerted_incidents() {
        let alerted = run(&[Status::Ok, Status::Critical, Status::Critical, Status::Critical, Status::Ok]);
        assert_eq!(alerted.action, EventAction::Resolve);
        assert!(fatigue_check(&alerted, 3, None, Some(60), history_watermark(&alerted)));
        let short = run(&[Status::Ok, Status::Critical, Status::Critical, Status::Ok]);
        assert!(!fatigue_check(&short, 3, None, Some(60), history_watermark(&short)));
        let steady_ok = run(&[Status::Ok, Status::Ok, Status::Ok]);
        assert!(!fatigue_check(&steady_ok, 3, None, Some(60), 3));
    }

    #[test]
    fn history_watermark_takes_the_longest_status_run_of_the_incident() {
        let e = run(&[Status::Critical, Status::Ok, Status::Warning, Status::Critical, Status::Critical, Status::Ok]);
        assert_eq!(history_watermark(&e), 2);
        let e = run(&[Status::Ok, Status::Warning, Status::Warning]);
        assert_eq!(history_watermark(&e), 2);
    }

    #[test]
    fn expression_over_occurrences_and_entity_labels_matches() {
        let f = CustomFilter::compile(&spec(&[
            "event.check.occurrences >= 3 && event.entity.labels.env == \"prod\"",
            "event.check.status != 0",
        ]))
        .unwrap();
        let now = at("2024-01-01T00:00:00Z");
        assert!(!passes(&f, &run(&[Status::Critical, Status::Critical]), now));
        assert!(passes(&f, &run(&[Status::Critical, Status::Critical, Status::Critical]), now));
    }

    #[test]
    fn expression_error_at_runtime_does_not_match() {
        let f = CustomFilter::compile(&spec(&["event.entity.labels.missing == \"x\""])).unwrap();
        assert!(!passes(&f, &run(&[Status::Critical]), at("2024-01-01T00:00:00Z")));
        let f = CustomFilter::compile(&spec(&["has(event.entity.labels.missing)"])).unwrap();
        assert!(!passes(&f, &run(&[Status::Critical]), at("2024-01-01T00:00:00Z")));
        let f = CustomFilter::compile(&spec(&["\"env\" in event.entity.labels"])).unwrap();
        assert!(passes(&f, &run(&[Status::Critical]), at("2024-01-01T00:00:00Z")));
    }

    #[test]
    fn deny_action_inverts_the_match() {
        let mut s = spec(&["event.check.status == 2"]);
        s.action = FilterAction::Deny;
        let f = CustomFilter::compile(&s).unwrap();
        let now = at("2024-01-01T00:00:00Z");
        assert!(!passes(&f, &run(&[Status::Critical]), now));
        assert!(passes(&f, &run(&[Status::Warning]), now));
    }

    #[test]
    fn bad_expression_reports_its_column() {
        let err = compile_expression("event.check.status == ").unwrap_err();
        assert_eq!(err.0, 1);
        assert!(err.1 >= 20, "{err:?}");
        let err = compile_expression("event.check.status = 2").unwrap_err();
        assert_eq!((err.0, err.1), (1, 20), "{err:?}");
    }

    #[test]
    fn time_window_in_office_hours_of_a_time_zone() {
        let w = TimeWindow { days: vec!["mon".into(), "fri".into()], begin: "09:00".into(), end: "17:00".into() };
        let ws = Windows::new(&[w], "Europe/Berlin".parse().unwrap());
        // 2024-01-05 is a Friday; Berlin is UTC+1 in winter.
        assert!(ws.contains(at("2024-01-05T08:00:00Z")));
        assert!(!ws.contains(at("2024-01-05T07:59:00Z")));
        assert!(!ws.contains(at("2024-01-05T16:00:00Z")));
        assert!(!ws.contains(at("2024-01-04T10:00:00Z")), "a Thursday");
        // Summer time: UTC+2.
        assert!(ws.contains(at("2024-07-05T07:00:00Z")));
    }

    #[test]
    fn time_window_past_midnight_belongs_to_its_start_day() {
        let w = TimeWindow { days: vec!["fri".into()], begin: "22:00".into(), end: "06:00".into() };
        let ws = Windows::new(&[w], Tz::UTC);
        assert!(ws.contains(at("2024-01-05T23:00:00Z")), "Friday night");
        assert!(ws.contains(at("2024-01-06T05:59:00Z")), "Saturday early morning");
        assert!(!ws.contains(at("2024-01-06T23:00:00Z")), "Saturday night");
        assert!(!ws.contains(at("2024-01-05T05:00:00Z")), "Friday early morning belongs to Thursday");
    }

    #[test]
    fn deny_filter_with_window_never_alerts_during_it() {
        let mut s = spec(&[]);
        s.action = FilterAction::Deny;
        s.when = vec![TimeWindow { days: vec![], begin: "00:00".into(), end: "06:00".into() }];
        s.time_zone = Some("America/New_York".into());
        let f = CustomFilter::compile(&s).unwrap();
        let e = run(&[Status::Critical]);
        assert!(!passes(&f, &e, at("2024-01-05T06:00:00Z")), "01:00 in New York");
        assert!(passes(&f, &e, at("2024-01-05T12:00:00Z")), "07:00 in New York");
    }

    #[test]
    fn unknown_time_zone_is_refused() {
        let mut s = spec(&[]);
        s.when = vec![TimeWindow { days: vec![], begin: "00:00".into(), end: "06:00".into() }];
        s.time_zone = Some("Mars/Olympus".into());
        assert_eq!(CustomFilter::compile(&s).unwrap_err(), CompileError::TimeZone("Mars/Olympus".into()));
    }
}
