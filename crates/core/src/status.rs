//! Nagios plugin exit codes, the contract that lets every Nagios and Sensu plugin run
//! unchanged as a drover check.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The four Nagios states. Serialized as the plain integer exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "u8", try_from = "u8")]
pub enum Status {
    Ok = 0,
    Warning = 1,
    Critical = 2,
    Unknown = 3,
}

impl Status {
    /// Maps a process exit code to a status. The Nagios plugin guidelines define only
    /// 0..=3; anything else (a crashed interpreter, a signal) is UNKNOWN.
    pub fn from_exit_code(code: i32) -> Status {
        match code {
            0 => Status::Ok,
            1 => Status::Warning,
            2 => Status::Critical,
            _ => Status::Unknown,
        }
    }

    pub fn is_ok(self) -> bool {
        self == Status::Ok
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Warning => "WARNING",
            Status::Critical => "CRITICAL",
            Status::Unknown => "UNKNOWN",
        }
    }
}

impl From<Status> for u8 {
    fn from(s: Status) -> u8 {
        s as u8
    }
}

impl TryFrom<u8> for Status {
    type Error = String;
    fn try_from(v: u8) -> Result<Status, String> {
        match v {
            0..=3 => Ok(Status::from_exit_code(v as i32)),
            other => Err(format!("status must be 0..=3 (OK, WARNING, CRITICAL, UNKNOWN), got {other}")),
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_outside_nagios_range_are_unknown() {
        assert_eq!(Status::from_exit_code(0), Status::Ok);
        assert_eq!(Status::from_exit_code(1), Status::Warning);
        assert_eq!(Status::from_exit_code(2), Status::Critical);
        assert_eq!(Status::from_exit_code(3), Status::Unknown);
        assert_eq!(Status::from_exit_code(127), Status::Unknown);
        assert_eq!(Status::from_exit_code(-9), Status::Unknown);
    }

    #[test]
    fn status_serializes_as_integer() {
        assert_eq!(serde_json::to_string(&Status::Critical).unwrap(), "2");
        let s: Status = serde_json::from_str("1").unwrap();
        assert_eq!(s, Status::Warning);
        assert!(serde_json::from_str::<Status>("7").is_err());
    }
}
