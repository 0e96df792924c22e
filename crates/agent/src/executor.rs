//! Runs one check command and turns what happened into a [`CheckResult`].
//!
//! The contract is the Nagios plugin one, as Sensu applies it: `sh -c COMMAND`, exit
//! code 0..=3 is the status, anything else (including death by signal) is UNKNOWN,
//! stdout then stderr is the output. Each command runs in its own process group so a
//! timeout (or a cancelled run) can kill everything the check started, not only `sh`.

use drover_core::event::CheckResult;
use drover_core::metrics;
use drover_core::protocol::CheckRequest;
use drover_core::resource::Entity;
use drover_core::status::Status;
use drover_core::time::{now_ms, now_secs};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

/// Executes `request` for `own_entity` (or the request's proxy entity) and reports the
/// result. Never fails: every problem becomes an UNKNOWN (or CRITICAL on timeout) result,
/// because a check that cannot run is itself something to alert on.
pub(crate) async fn execute(request: &CheckRequest, own_entity: &Entity, output_limit: usize) -> CheckResult {
    let check = &request.check;
    let entity = request.proxy_entity.as_ref().unwrap_or(own_entity);
    let run = match drover_core::tokens::substitute(&check.command, entity) {
        Ok(command) => {
            // The request is what Sensu hands plugins on stdin; serialising a value we
            // just received cannot fail, but an empty stdin is the safe fallback.
            let stdin = check.stdin.then(|| serde_json::to_vec(request).unwrap_or_default());
            run_command(&command, check.timeout_secs, stdin, output_limit).await
        }
        Err(unmatched) => Run {
            status: Status::Unknown,
            output: format!("drover: {unmatched}; the command was not run"),
            executed_ms: now_ms(),
            duration_ms: 0,
        },
    };
    let metrics = metrics::extract(&run.output, check.output_metric_format, now_secs());
    CheckResult {
        check: check.name.clone(),
        entity: request.proxy_entity.as_ref().map(|e| e.name.clone()).unwrap_or_default(),
        status: run.status,
        output: run.output,
        issued_ms: request.issued_ms,
        executed_ms: run.executed_ms,
        duration_ms: run.duration_ms,
        metrics,
        check_config: None,
    }
}

/// The outcome of one command run.
#[derive(Debug)]
pub(crate) struct Run {
    pub status: Status,
    pub output: String,
    pub executed_ms: i64,
    pub duration_ms: u64,
}

/// Runs `command` with `sh -c` in a new process group. `timeout_secs == 0` means no
/// limit; `stdin` (if any) is written and then closed.
pub(crate) async fn run_command(command: &str, timeout_secs: u64, stdin: Option<Vec<u8>>, output_limit: usize) -> Run {
    let executed_ms = now_ms();
    let started = Instant::now();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .process_group(0)
        .kill_on_drop(true)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Run {
                status: Status::Unknown,
                output: format!("drover: cannot start `sh -c`: {e}"),
                executed_ms,
                duration_ms: 0,
            };
        }
    };
    let mut group = GroupGuard::new(child.id());
    let stdin_pipe = child.stdin.take();
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        // Unreachable with both set to piped; reported rather than panicking anyway.
        return Run {
            status: Status::Unknown,
            output: "drover: child process has no output pipes".into(),
            executed_ms,
            duration_ms: 0,
        };
    };

    let mut out = Capture::new(output_limit);
    let mut err = Capture::new(output_limit);
    let io = async {
        let feed = async {
            if let (Some(mut pipe), Some(data)) = (stdin_pipe, stdin) {
                // A command that exits without reading stdin closes the pipe (EPIPE);
                // that is its business, not an execution failure.
                let _ = pipe.write_all(&data).await;
                let _ = pipe.shutdown().await;
            }
        };
        let ((), (), (), status) = tokio::join!(feed, out.drain(stdout), err.drain(stderr), child.wait());
        status
    };
    let finished = if timeout_secs == 0 {
        Some(io.await)
    } else {
        tokio::time::timeout(Duration::from_secs(timeout_secs), io).await.ok()
    };
    let duration_ms = started.elapsed().as_millis() as u64;

    let Some(status) = finished else {
        group.kill();
        // Reap `sh` now that it is dead so it does not linger as a zombie.
        let _ = child.wait().await;
        let captured = combine(out, err, output_limit);
        let mut output = format!("Execution timed out after {timeout_secs} s");
        if !captured.is_empty() {
            output.push('\n');
            output.push_str(&captured);
        }
        return Run { status: Status::Critical, output, executed_ms, duration_ms };
    };
    // `sh` has exited and both pipes reached EOF: whatever is left of the group
    // detached from the check on purpose (a daemon it started), so leave it alone.
    group.disarm();
    let mut output = combine(out, err, output_limit);
    let status = match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => Status::from_exit_code(code),
            (None, Some(sig)) => {
                output.push_str(&format!("\n[drover: command killed by signal {sig}]"));
                Status::Unknown
            }
            (None, None) => Status::Unknown,
        },
        Err(e) => {
            output.push_str(&format!("\n[drover: waiting for the command failed: {e}]"));
            Status::Unknown
        }
    };
    Run { status, output, executed_ms, duration_ms }
}

/// Kills the command's whole process group when dropped while armed, so cancelling a
/// run (agent shutdown) cleans up grandchildren too; `kill_on_drop` alone reaches only
/// `sh`.
struct GroupGuard {
    pgid: Option<Pid>,
}

impl GroupGuard {
    fn new(pid: Option<u32>) -> Self {
        // process_group(0) makes the child the leader of a group with its own pid.
        GroupGuard { pgid: pid.and_then(|p| i32::try_from(p).ok()).map(Pid::from_raw) }
    }

    fn kill(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            // ESRCH (group already gone) is the outcome we want anyway.
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }

    fn disarm(&mut self) {
        self.pgid = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One output stream: keeps the first `limit` bytes and counts the rest, which is still
/// read so the command never blocks on a full pipe.
struct Capture {
    kept: Vec<u8>,
    total: u64,
    limit: usize,
}

impl Capture {
    fn new(limit: usize) -> Self {
        Capture { kept: Vec::new(), total: 0, limit }
    }

    async fn drain(&mut self, mut pipe: impl AsyncRead + Unpin) {
        let mut chunk = [0u8; 4096];
        loop {
            match pipe.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    self.total += n as u64;
                    let room = self.limit.saturating_sub(self.kept.len());
                    self.kept.extend_from_slice(&chunk[..n.min(room)]);
                }
            }
        }
    }
}

/// stdout then stderr, cut to `limit` bytes in total, with a marker saying how much was
/// dropped.
fn combine(out: Capture, err: Capture, limit: usize) -> String {
    let total = out.total + err.total;
    let mut bytes = out.kept;
    let room = limit.saturating_sub(bytes.len());
    bytes.extend_from_slice(&err.kept[..err.kept.len().min(room)]);
    let cut = total > bytes.len() as u64;
    if cut {
        // Do not leave half a UTF-8 character at the cut; it would become U+FFFD.
        if let Err(e) = std::str::from_utf8(&bytes)
            && e.error_len().is_none()
        {
            bytes.truncate(e.valid_up_to());
        }
    }
    let mut output = String::from_utf8_lossy(&bytes).into_owned();
    if cut {
        let dropped = total - bytes.len() as u64;
        output.push_str(&format!("\n[drover: output truncated, {dropped} bytes dropped]"));
    }
    output
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_core::resource::{CheckSpec, EntityClass};

    const LIMIT: usize = 64 * 1024;

    fn entity() -> Entity {
        let mut e = Entity::new("node1", EntityClass::Agent);
        e.labels.insert("zone".into(), "z1".into());
        e
    }

    fn request(command: &str) -> CheckRequest {
        CheckRequest { check: CheckSpec::new("c", command), issued_ms: 5, splay_ms: 0, proxy_entity: None }
    }

    #[tokio::test]
    async fn exit_codes_map_to_nagios_statuses() {
        for (code, status) in
            [(0, Status::Ok), (1, Status::Warning), (2, Status::Critical), (3, Status::Unknown), (42, Status::Unknown)]
        {
            let r = execute(&request(&format!("echo out; exit {code}")), &entity(), LIMIT).await;
            assert_eq!(r.status, status, "exit {code}");
            assert_eq!(r.output, "out\n");
            assert_eq!(r.check, "c");
            assert_eq!(r.entity, "");
            assert_eq!(r.issued_ms, 5);
            assert!(r.executed_ms > 0);
        }
    }

    #[tokio::test]
    async fn output_is_stdout_then_stderr() {
        let r = run_command("echo err >&2; sleep 0.1; echo out", 5, None, LIMIT).await;
        assert_eq!(r.output, "out\nerr\n");
    }

    #[tokio::test]
    async fn death_by_signal_is_unknown() {
        let r = run_command("kill -TERM $$", 5, None, LIMIT).await;
        assert_eq!(r.status, Status::Unknown);
        assert!(r.output.contains("signal 15"), "{}", r.output);
    }

    #[tokio::test]
    async fn timeout_kills_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("bg.pid");
        let command = format!("echo started; sleep 30 & echo $! > {}; sleep 30", pidfile.display());
        let started = Instant::now();
        let r = run_command(&command, 1, None, LIMIT).await;
        assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
        assert_eq!(r.status, Status::Critical);
        assert!(r.output.starts_with("Execution timed out after 1 s"), "{}", r.output);
        assert!(r.output.contains("started"), "captured output kept: {}", r.output);

        let pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_string();
        // The background sleep was reparented away from us; until its new parent reaps
        // it, a killed process shows as a zombie, which is just as gone.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
            if matches!(state, None | Some('Z') | Some('X')) {
                break;
            }
            assert!(Instant::now() < deadline, "background sleep {pid} survived: {stat}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn timeout_zero_means_no_limit() {
        let r = run_command("sleep 1.2; exit 1", 0, None, LIMIT).await;
        assert_eq!(r.status, Status::Warning);
        assert!(r.duration_ms >= 1000);
    }

    #[tokio::test]
    async fn output_beyond_limit_is_truncated_with_marker() {
        // 10000 bytes on stdout and 100 on stderr against a 1000-byte limit.
        let r =
            run_command("head -c 10000 /dev/zero | tr '\\0' a; head -c 100 /dev/zero | tr '\\0' b >&2", 5, None, 1000)
                .await;
        assert_eq!(r.status, Status::Ok);
        let (kept, marker) = r.output.split_at(1000);
        assert!(kept.bytes().all(|b| b == b'a'));
        assert_eq!(marker, "\n[drover: output truncated, 9100 bytes dropped]");
    }

    #[tokio::test]
    async fn output_that_fits_has_no_marker() {
        let r = run_command("printf 12345", 5, None, 64).await;
        assert_eq!(r.output, "12345");
    }

    #[tokio::test]
    async fn truncation_does_not_split_a_utf8_character() {
        // "é" is two bytes; a 65-byte limit falls inside the 33rd one.
        let r = run_command("for i in $(seq 40); do printf 'é'; done", 5, None, 65).await;
        let (kept, marker) = r.output.split_once('\n').unwrap();
        assert_eq!(kept, "é".repeat(32));
        assert_eq!(marker, "[drover: output truncated, 16 bytes dropped]");
    }

    #[tokio::test]
    async fn stdin_receives_the_request_json() {
        let mut req = request("cat");
        req.check.stdin = true;
        let r = execute(&req, &entity(), LIMIT).await;
        assert_eq!(r.status, Status::Ok);
        let got: CheckRequest = serde_json::from_str(&r.output).unwrap();
        assert_eq!(got, req);
    }

    #[tokio::test]
    async fn stdin_is_empty_when_not_requested() {
        let r = run_command("wc -c", 5, None, LIMIT).await;
        assert_eq!(r.output.trim(), "0");
    }

    #[tokio::test]
    async fn tokens_are_substituted_from_the_entity() {
        let r = execute(&request("echo {{ .name }} :::labels.zone:::"), &entity(), LIMIT).await;
        assert_eq!(r.output, "node1 z1\n");
    }

    #[tokio::test]
    async fn proxy_entity_supplies_tokens_and_result_entity() {
        let mut req = request("echo {{ .name }}");
        req.proxy_entity = Some(Entity::new("site", EntityClass::Proxy));
        let r = execute(&req, &entity(), LIMIT).await;
        assert_eq!(r.output, "site\n");
        assert_eq!(r.entity, "site");
    }

    #[tokio::test]
    async fn unmatched_token_is_unknown_and_command_not_run() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let command = format!("touch {} {{{{ .labels.missing }}}}", marker.display());
        let r = execute(&request(&command), &entity(), LIMIT).await;
        assert_eq!(r.status, Status::Unknown);
        assert!(r.output.contains("labels.missing"), "{}", r.output);
        assert!(!marker.exists(), "command must not run");
    }

    #[tokio::test]
    async fn missing_plugin_is_unknown() {
        // sh reports a command it cannot find with exit 127, outside the Nagios range.
        let r = run_command("/nonexistent/plugin", 5, None, LIMIT).await;
        assert_eq!(r.status, Status::Unknown);
        assert!(r.output.contains("nonexistent"), "{}", r.output);
    }

    #[tokio::test]
    async fn perfdata_becomes_metrics() {
        let r = execute(&request("echo 'OK | load1=0.5;1;2'"), &entity(), LIMIT).await;
        assert_eq!(r.metrics.len(), 1);
        assert_eq!(r.metrics[0].name, "load1");
        assert_eq!(r.metrics[0].value, 0.5);
    }
}
