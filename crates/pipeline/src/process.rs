//! Running handler and mutator commands: `sh -c`, the payload on stdin, in their own
//! process group so a timeout (or a stopped pipeline) kills everything they started,
//! not only the shell.

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

/// Output kept per stream; a handler that prints more is not a reason to run out of memory.
const OUTPUT_LIMIT_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug)]
pub struct Finished {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Kills the process group when dropped unless disarmed: covers timeouts and tasks
/// aborted mid-run alike.
struct GroupGuard(Option<Pid>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            let _ = killpg(pid, Signal::SIGKILL);
        }
    }
}

/// Runs `command`, feeding `stdin`; Ok only for exit status 0 within `timeout`.
pub async fn run(command: &str, stdin: &[u8], timeout: Duration) -> Result<Finished, String> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start `{command}`: {e}"))?;
    let mut guard = GroupGuard(child.id().map(|id| Pid::from_raw(id as i32)));

    let mut child_stdin = child.stdin.take();
    let payload = stdin.to_vec();
    let writer = async move {
        if let Some(mut w) = child_stdin.take() {
            // A command that does not read its stdin is not a failure (EPIPE is fine).
            let _ = w.write_all(&payload).await;
            let _ = w.shutdown().await;
        }
    };
    let stdout = read_limited(child.stdout.take());
    let stderr = read_limited(child.stderr.take());
    let work = async {
        let ((), out, err, status) = tokio::join!(writer, stdout, stderr, child.wait());
        (out, err, status)
    };
    let (stdout, stderr, status) = match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => {
            drop(guard);
            let _ = child.wait().await;
            return Err(format!("timed out after {} s; process group killed", timeout.as_secs_f64()));
        }
    };
    let status = status.map_err(|e| format!("waiting for `{command}`: {e}"))?;
    // Finished on its own: whatever it deliberately left running (with its output
    // redirected, or the pipes would have kept us waiting) is its business.
    guard.0 = None;
    if status.success() {
        Ok(Finished { stdout, stderr })
    } else {
        let tail = String::from_utf8_lossy(&stderr);
        let tail = tail.trim();
        let tail: String = tail.chars().rev().take(500).collect::<Vec<_>>().into_iter().rev().collect();
        Err(format!("{status}{}{tail}", if tail.is_empty() { "" } else { ": " }))
    }
}

async fn read_limited<R: AsyncRead + Unpin>(r: Option<R>) -> Vec<u8> {
    let Some(mut r) = r else { return Vec::new() };
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = OUTPUT_LIMIT_BYTES.saturating_sub(out.len());
                out.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stdin_reaches_the_command_and_stdout_comes_back() {
        let f = run("tr a-z A-Z", b"hello", Duration::from_secs(5)).await.unwrap();
        assert_eq!(f.stdout, b"HELLO");
    }

    #[tokio::test]
    async fn nonzero_exit_is_an_error_with_stderr() {
        let e = run("echo boom >&2; exit 3", b"", Duration::from_secs(5)).await.unwrap_err();
        assert!(e.contains("3") && e.contains("boom"), "{e}");
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("survived");
        let cmd = format!("(sleep 2; touch {}) & sleep 30", marker.display());
        let started = std::time::Instant::now();
        let e = run(&cmd, b"", Duration::from_millis(300)).await.unwrap_err();
        assert!(e.contains("timed out"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!marker.exists(), "the background child of the killed command kept running");
    }
}
