//! Definitions the pipeline cannot use are refused when it starts, with file, line and
//! the position inside the offending expression.

mod common;

use common::*;
use drover_core::config::ServerConfig;
use drover_pipeline::{Pipeline, PipelineConfig, PipelineError};

fn load(files: &[(&str, &str)]) -> (tempfile::TempDir, PipelineConfig) {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let cfg = ServerConfig::load_dir(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    (dir, PipelineConfig::from_server_config(&cfg))
}

fn start_err(cfg: PipelineConfig) -> drover_core::config::ConfigError {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _guard = rt.enter();
    match Pipeline::start(cfg, FakeContext::new()) {
        Err(PipelineError::Config(e)) => e,
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("bad config was accepted"),
    }
}

#[test]
fn bad_filter_expression_is_refused_at_load_with_its_position() {
    let (_dir, cfg) = load(&[(
        "filters.toml",
        "# production only\n[filters.prod]\nexpressions = [\n  \"event.check.occurrences >= 3\",\n  \"event.entity.labels.env = \\\"prod\\\"\",\n]\n",
    )]);
    assert!(cfg.validate().is_err(), "validate must refuse what start refuses");
    let e = start_err(cfg);
    assert!(e.file.ends_with("filters.toml"), "{e}");
    assert_eq!((e.line, e.column), (5, 3), "points at the second expression: {e}");
    assert_eq!(e.field, "filters.prod.expressions[1]");
    assert!(e.message.contains("line 1, column 25"), "{e}");
    // The message shows the expression with a caret under the column.
    let lines: Vec<&str> = e.message.lines().collect();
    assert_eq!(lines[1].trim(), "event.entity.labels.env = \"prod\"");
    assert_eq!(lines[2].find('^'), Some(4 + 24), "{}", e.message);
}

#[test]
fn unknown_time_zone_is_refused_at_its_line() {
    let (_dir, cfg) = load(&[(
        "f.toml",
        "[filters.office]\naction = \"allow\"\ntime_zone = \"Europe/Atlantis\"\n[[filters.office.when]]\nbegin = \"09:00\"\nend = \"17:00\"\n",
    )]);
    let e = start_err(cfg);
    assert_eq!((e.line, e.field.as_str()), (3, "filters.office.time_zone"), "{e}");
    assert!(e.message.contains("Europe/Atlantis"));
}

#[test]
fn malformed_template_and_mail_address_are_refused() {
    let (_dir, cfg) = load(&[(
        "h.toml",
        "[handlers.mail]\ntype = \"smtp\"\naddress = \"localhost:25\"\nfrom = \"drover@x\"\nto = [\"ops@x\"]\nsubject_template = \"{{ .check.name \"\n",
    )]);
    let e = start_err(cfg);
    assert_eq!((e.line, e.field.as_str()), (6, "handlers.mail.subject_template"), "{e}");

    let (_dir, cfg) = load(&[(
        "h.toml",
        "[handlers.mail]\ntype = \"smtp\"\naddress = \"localhost:25\"\nfrom = \"not an address\"\nto = [\"ops@x\"]\n",
    )]);
    let e = start_err(cfg);
    assert_eq!(e.field, "handlers.mail.from", "{e}");
}

#[test]
fn start_outside_a_runtime_is_an_error_not_a_panic() {
    let r = Pipeline::start(PipelineConfig::default(), FakeContext::new());
    assert!(matches!(r, Err(PipelineError::NoRuntime)));
}
