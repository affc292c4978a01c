//! Identifier newtypes with `Display`/`FromStr`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A job's id: a positive number assigned in creation order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub u64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for JobId {
    type Err = InvalidId;
    /// Written plainly, as `Display` writes it: digits only, no sign, no
    /// leading zero.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let plain = !s.starts_with('0') && s.bytes().all(|b| b.is_ascii_digit());
        match s.parse::<u64>() {
            Ok(n) if plain && n > 0 => Ok(JobId(n)),
            _ => Err(InvalidId {
                what: "job id",
                expected: "a positive integer",
            }),
        }
    }
}

/// An agent's id: 8 random bytes in hex (16 characters), assigned at first
/// registration.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AgentId(pub String);

impl AgentId {
    pub fn generate() -> AgentId {
        AgentId(crate::token::random_hex(8))
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A commit sha: exactly 40 lowercase hex characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CommitSha(String);

impl CommitSha {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CommitSha {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for CommitSha {
    type Err = InvalidId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(CommitSha(s.to_ascii_lowercase()))
        } else {
            Err(InvalidId {
                what: "commit",
                expected: "40 hexadecimal characters",
            })
        }
    }
}

impl TryFrom<String> for CommitSha {
    type Error = InvalidId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<CommitSha> for String {
    fn from(sha: CommitSha) -> String {
        sha.0
    }
}

/// Returned when a string is not a valid id of some kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what}: expected {expected}")]
pub struct InvalidId {
    pub what: &'static str,
    pub expected: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_are_positive_integers() {
        assert_eq!("42".parse::<JobId>(), Ok(JobId(42)));
        assert!("0".parse::<JobId>().is_err());
        assert!("-1".parse::<JobId>().is_err());
        assert!("abc".parse::<JobId>().is_err());
        for unplain in ["+1", "01", "00", " 1", ""] {
            assert!(unplain.parse::<JobId>().is_err(), "{unplain:?}");
        }
    }

    #[test]
    fn commit_shas_are_40_hex_characters() {
        let sha = "0123456789ABCDEF0123456789abcdef01234567";
        assert_eq!(
            sha.parse::<CommitSha>().map(|s| s.to_string()),
            Ok(sha.to_ascii_lowercase())
        );
        assert!("0123456".parse::<CommitSha>().is_err());
        assert!(
            "g123456789abcdef0123456789abcdef01234567"
                .parse::<CommitSha>()
                .is_err()
        );
        assert!(
            "0123456789abcdef0123456789abcdef012345678"
                .parse::<CommitSha>()
                .is_err()
        );
    }
}
