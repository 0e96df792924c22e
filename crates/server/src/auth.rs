//! Tokens. On first start the server writes an admin token and an agent join token to
//! the data directory (mode 0600) unless they are given; later starts reuse them.
//! The agent token opens only the agent WebSocket; the admin token opens everything.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Agent,
}

#[derive(Clone)]
pub struct Tokens {
    pub admin: String,
    pub agent: String,
}

fn random_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 24];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Returns `given`, else the token in `dir/file`, else a new one written there (0600).
fn load_or_create(dir: &Path, file: &str, given: Option<String>) -> std::io::Result<String> {
    if let Some(t) = given.filter(|t| !t.is_empty()) {
        return Ok(t);
    }
    let path = dir.join(file);
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let token = random_token();
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path)?;
    f.write_all(token.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    tracing::info!(path = %path.display(), "wrote a new {file}");
    Ok(token)
}

impl Tokens {
    pub fn load(data_dir: &Path, admin: Option<String>, agent: Option<String>) -> std::io::Result<Tokens> {
        Ok(Tokens {
            admin: load_or_create(data_dir, "admin.token", admin)?,
            agent: load_or_create(data_dir, "agent.token", agent)?,
        })
    }

    /// Which role a bearer token grants, compared in constant time.
    pub fn role(&self, presented: &str) -> Option<Role> {
        if ct_eq(presented.as_bytes(), self.admin.as_bytes()) {
            Some(Role::Admin)
        } else if ct_eq(presented.as_bytes(), self.agent.as_bytes()) {
            Some(Role::Agent)
        } else {
            None
        }
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn tokens_are_created_once_with_mode_0600_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let t1 = Tokens::load(dir.path(), None, None).unwrap();
        let mode = std::fs::metadata(dir.path().join("admin.token")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let t2 = Tokens::load(dir.path(), None, None).unwrap();
        assert_eq!(t1.admin, t2.admin);
        assert_ne!(t1.admin, t1.agent);
        assert_eq!(t2.role(&t1.agent), Some(Role::Agent));
        assert_eq!(t2.role("nope"), None);
    }

    #[test]
    fn given_tokens_win() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tokens::load(dir.path(), Some("a".into()), Some("b".into())).unwrap();
        assert_eq!(t.role("a"), Some(Role::Admin));
        assert_eq!(t.role("b"), Some(Role::Agent));
    }
}
