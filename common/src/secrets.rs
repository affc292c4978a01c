//! Secrets at rest: XChaCha20-Poly1305 with a 256-bit key, a random 192-bit
//! nonce per value, and associated data that binds a sealed value to what it
//! belongs to (a sealed token of one repository cannot be moved to another).
//!
//! Sealed form: `v1.` followed by base64url(nonce ‖ ciphertext ‖ tag).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

const VERSION_PREFIX: &str = "v1.";
const NONCE_BYTES: usize = 24;
/// Length of a key in its file: 64 hexadecimal characters.
pub const KEY_HEX_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("the secret key must be {KEY_HEX_LEN} hexadecimal characters (32 bytes)")]
    BadKey,
    /// Wrong key, wrong associated data, or tampered value.
    #[error("a stored secret cannot be decrypted with this key")]
    CannotOpen,
}

/// The key that seals secrets. `Debug` never prints it.
#[derive(Clone)]
pub struct SecretKey {
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey([REDACTED])")
    }
}

impl SecretKey {
    /// A new random key, in its file form (hex).
    pub fn generate_hex() -> String {
        crate::token::random_hex(32)
    }

    /// Reads a key from its file form (hex, surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Result<SecretKey, SecretError> {
        let bytes = hex::decode(text.trim()).map_err(|_| SecretError::BadKey)?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| SecretError::BadKey)?;
        Ok(SecretKey {
            cipher: XChaCha20Poly1305::new(&key.into()),
        })
    }

    /// Encrypts `plaintext`, bound to `context` (e.g. `github-token:owner/name`).
    pub fn seal(&self, plaintext: &[u8], context: &str) -> String {
        let mut nonce = [0u8; NONCE_BYTES];
        #[allow(clippy::expect_used)]
        getrandom::fill(&mut nonce).expect("the operating system's random source failed");
        let nonce = XNonce::from(nonce);
        // Encryption with a valid key and nonce cannot fail.
        #[allow(clippy::expect_used)]
        let ciphertext = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: context.as_bytes(),
                },
            )
            .expect("XChaCha20-Poly1305 encryption");
        let mut sealed = Vec::with_capacity(NONCE_BYTES + ciphertext.len());
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&ciphertext);
        format!("{VERSION_PREFIX}{}", URL_SAFE_NO_PAD.encode(sealed))
    }

    /// Decrypts what [`SecretKey::seal`] made with the same `context`.
    pub fn open(&self, sealed: &str, context: &str) -> Result<Vec<u8>, SecretError> {
        let encoded = sealed
            .strip_prefix(VERSION_PREFIX)
            .ok_or(SecretError::CannotOpen)?;
        let bytes = URL_SAFE_NO_PAD
            .decode(encoded)
            .map_err(|_| SecretError::CannotOpen)?;
        if bytes.len() < NONCE_BYTES {
            return Err(SecretError::CannotOpen);
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE_BYTES);
        let nonce: [u8; NONCE_BYTES] = nonce.try_into().map_err(|_| SecretError::CannotOpen)?;
        self.cipher
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| SecretError::CannotOpen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecretKey {
        SecretKey::from_hex(&SecretKey::generate_hex()).unwrap()
    }

    #[test]
    fn sealed_values_open_with_the_same_key_and_context_only() {
        let key = key();
        let sealed = key.seal(b"ghp_secret", "github-token:o/r");
        assert!(sealed.starts_with("v1."));
        assert!(!sealed.contains("ghp_secret"));
        assert_eq!(
            key.open(&sealed, "github-token:o/r").unwrap(),
            b"ghp_secret"
        );
        assert_eq!(
            key.open(&sealed, "github-token:o/other"),
            Err(SecretError::CannotOpen)
        );
        assert_eq!(
            super::tests::key().open(&sealed, "github-token:o/r"),
            Err(SecretError::CannotOpen)
        );
        let mut tampered = sealed.clone();
        tampered.pop();
        assert!(key.open(&tampered, "github-token:o/r").is_err());
    }

    #[test]
    fn every_seal_uses_a_fresh_nonce() {
        let key = key();
        assert_ne!(key.seal(b"x", "c"), key.seal(b"x", "c"));
    }

    #[test]
    fn keys_are_64_hex_characters() {
        assert!(SecretKey::from_hex("abcd").is_err());
        assert!(SecretKey::from_hex(&"zz".repeat(32)).is_err());
        assert!(SecretKey::from_hex(&format!("{}\n", "ab".repeat(32))).is_ok());
        assert_eq!(format!("{:?}", key()), "SecretKey([REDACTED])");
    }
}

/// Overwrites every occurrence of each secret (4 bytes or longer) with `*`,
/// keeping the length: the controller's second masking pass, which must not
/// move log offsets. (The agent's streaming masker is the first.) Built once
/// per job; all secrets are found in one pass (Aho-Corasick).
pub struct InPlaceMasker {
    automaton: Option<aho_corasick::AhoCorasick>,
}

impl InPlaceMasker {
    pub fn new(secrets: &[Vec<u8>]) -> InPlaceMasker {
        let patterns: Vec<&Vec<u8>> = secrets.iter().filter(|secret| secret.len() >= 4).collect();
        let automaton = if patterns.is_empty() {
            None
        } else {
            // A contiguous NFA builds in linear time even for 64 KiB values
            // (a DFA could take far longer).
            aho_corasick::AhoCorasick::builder()
                .kind(Some(aho_corasick::AhoCorasickKind::ContiguousNFA))
                .build(patterns)
                .ok()
        };
        InPlaceMasker { automaton }
    }

    pub fn mask(&self, data: &mut [u8]) {
        let Some(automaton) = &self.automaton else {
            return;
        };
        let found: Vec<std::ops::Range<usize>> = automaton
            .find_overlapping_iter(&*data)
            .map(|found| found.range())
            .collect();
        for range in found {
            data[range].fill(b'*');
        }
    }
}

/// [`InPlaceMasker`] for one use.
pub fn mask_in_place(data: &mut [u8], secrets: &[Vec<u8>]) {
    InPlaceMasker::new(secrets).mask(data);
}

#[cfg(test)]
mod mask_tests {
    use super::mask_in_place;

    #[test]
    fn large_secrets_are_masked_whole() {
        let big = vec![b'v'; 64 * 1024];
        let masker = super::InPlaceMasker::new(&[big.clone(), b"other-secret".to_vec()]);
        let mut data = [b"x".as_slice(), &big, b"y"].concat();
        masker.mask(&mut data);
        assert_eq!(data[0], b'x');
        assert!(data[1..=big.len()].iter().all(|b| *b == b'*'));
    }

    #[test]
    fn masking_in_place_keeps_the_length() {
        let mut data = b"token=hunter22; again hunter22; abc".to_vec();
        mask_in_place(&mut data, &[b"hunter22".to_vec(), b"abc".to_vec()]);
        assert_eq!(&data, b"token=********; again ********; abc");
    }
}
