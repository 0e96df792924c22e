//! Small JSON state files that survive a restart: the feed's last view, the name
//! server's serials, the agent's fencing term. Written whole to a temp file beside the
//! target and renamed over it, so a reader (or the process after a crash) finds the old
//! content or the new, never half of one.

use serde::Serialize;
use std::io::Write;
use std::path::Path;

/// Writes `value` as JSON to `path` (creating its directory). `durable`: fsync before the
/// rename, for state that must outlive the machine, not just the process.
pub fn write_json(path: &Path, value: &impl Serialize, durable: bool) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp_name);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&bytes)?;
    if durable {
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// Reads JSON written by [`write_json`]: `Ok(None)` when there is no file; an error says
/// the path and what was wrong (unreadable, or not the expected JSON).
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_gives_none_for_no_file_and_names_the_path_for_bad_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        assert_eq!(read_json::<serde_json::Value>(&path), Ok(None));
        write_json(&path, &serde_json::json!({"a": 1}), false).unwrap();
        assert_eq!(read_json::<serde_json::Value>(&path), Ok(Some(serde_json::json!({"a": 1}))));
        std::fs::write(&path, b"{not json").unwrap();
        let e = read_json::<serde_json::Value>(&path).unwrap_err();
        assert!(e.starts_with(&format!("{}: ", path.display())), "{e}");
    }

    #[test]
    fn a_written_file_replaces_the_old_one_whole_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.json");
        write_json(&path, &serde_json::json!({"a": 1}), true).unwrap();
        write_json(&path, &serde_json::json!({"a": 2}), false).unwrap();
        let back: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back["a"], 2);
        let names: Vec<_> =
            std::fs::read_dir(path.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["state.json"]);
    }
}
