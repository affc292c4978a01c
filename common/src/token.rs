//! Random tokens, token hashing and constant-time comparison.
//!
//! Tokens are stored only as SHA-256 hashes; a token's value is shown once,
//! when it is created.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The prefix of agent tokens (`hbag_<64 hex>`): the pool token a local
/// `hobot up` makes and the per-agent tokens the API mints.
pub const AGENT_TOKEN_PREFIX: &str = "hbag";
/// The prefix of the admin token a controller makes for itself.
pub const ADMIN_TOKEN_PREFIX: &str = "hbad";

/// `n` random bytes from the OS, hex-encoded (2n characters).
///
/// # Panics
/// When the operating system has no randomness to give, which leaves nothing
/// safe to do.
pub fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    #[allow(clippy::expect_used)]
    getrandom::fill(&mut bytes).expect("the operating system's random source failed");
    hex::encode(bytes)
}

/// A new secret token: 32 random bytes with a recognisable prefix.
pub fn new_token(prefix: &str) -> String {
    format!("{prefix}_{}", random_hex(32))
}

/// Hex SHA-256 of a token, the form in which tokens are stored.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Constant-time equality of two byte strings (length is not secret).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_prefixed() {
        let a = new_token("hbt");
        let b = new_token("hbt");
        assert_ne!(a, b);
        assert!(a.starts_with("hbt_"));
        assert_eq!(a.len(), 4 + 64);
    }

    #[test]
    fn hashes_compare_in_constant_time() {
        let h = hash_token("secret");
        assert!(constant_time_eq(
            h.as_bytes(),
            hash_token("secret").as_bytes()
        ));
        assert!(!constant_time_eq(
            h.as_bytes(),
            hash_token("other").as_bytes()
        ));
        assert!(!constant_time_eq(b"a", b"ab"));
    }
}
