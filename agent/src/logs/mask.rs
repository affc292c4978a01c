//! Secret masking: the filter between a job's output pipe and its spool, and
//! the same rule for every line the agent itself writes about a job (git's
//! errors, the completion message).
//!
//! A [`Secrets`] set is made of exact byte strings: the job's secret values
//! (`Assignment.secrets`) and the secret parts of its git HTTP header. Values
//! shorter than [`MIN_SECRET_BYTES`] are skipped (masking `1` or `on` would
//! destroy the log and hide nothing). Every occurrence is replaced by
//! [`MASK`]; occurrences that overlap are masked as one region, so no tail of
//! a secret survives next to the marker.
//!
//! [`Masker`] does it on a stream: it holds back only a tail that is the
//! start of some secret (fewer than `max_len` bytes, `max_len` = the longest
//! secret), so a secret split across reads is still caught while a quiet
//! job's last line is not kept waiting, and flushes it at the end.
//!
//! The controller sends, for each secret, the forms to mask: the value, each
//! line of a multi-line value (4 characters or more) and its base64 form.
//! (The git HTTP header's forms are derived by
//! `workspace::GitHttpHeader::secret_parts`.)

use std::sync::Arc;

/// What replaces a secret.
pub const MASK: &[u8] = b"[MASKED]";

/// Values shorter than this are not masked.
pub const MIN_SECRET_BYTES: usize = 4;

/// The values one job masks. Cheap to clone.
#[derive(Clone)]
pub struct Secrets {
    /// Distinct values, at least [`MIN_SECRET_BYTES`] long.
    values: Arc<[Vec<u8>]>,
    /// `first_byte[b]`: some value starts with byte `b`.
    first_byte: Arc<[bool; 256]>,
    /// The longest value: the bound on what is held back (checked in tests).
    #[cfg_attr(not(test), allow(dead_code))]
    max_len: usize,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secrets([{} values REDACTED])", self.values.len())
    }
}

impl Default for Secrets {
    /// The empty set: nothing is masked.
    fn default() -> Secrets {
        Secrets::new::<[&str; 0], &str>([])
    }
}

impl Secrets {
    /// The set of `values`, skipping those shorter than [`MIN_SECRET_BYTES`].
    pub fn new<I, S>(values: I) -> Secrets
    where
        I: IntoIterator<Item = S>,
        S: AsRef<[u8]>,
    {
        let mut kept: Vec<Vec<u8>> = values
            .into_iter()
            .map(|v| v.as_ref().to_vec())
            .filter(|v| v.len() >= MIN_SECRET_BYTES)
            .collect();
        kept.sort();
        kept.dedup();
        let mut first_byte = [false; 256];
        for value in &kept {
            first_byte[usize::from(value[0])] = true;
        }
        let max_len = kept.iter().map(Vec::len).max().unwrap_or(0);
        Secrets {
            values: kept.into(),
            first_byte: Arc::new(first_byte),
            max_len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// A streaming masker over this set.
    pub fn masker(&self) -> Masker {
        Masker {
            secrets: self.clone(),
            pending: Vec::new(),
            covered: 0,
        }
    }

    /// `text` with every secret masked (for lines and messages the agent
    /// writes itself).
    pub fn mask(&self, text: &str) -> String {
        if self.is_empty() {
            return text.to_owned();
        }
        let mut masker = self.masker();
        let mut out = Vec::with_capacity(text.len());
        masker.push(text.as_bytes(), &mut out);
        masker.finish(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Whether some value starts with all of `data[at..]` and is longer: it
    /// may be completed by bytes not given yet. Only such bytes are held
    /// back, so a quiet job's last line is not kept waiting.
    fn could_continue(&self, data: &[u8], at: usize) -> bool {
        if !self.first_byte[usize::from(data[at])] {
            return false;
        }
        let rest = &data[at..];
        self.values
            .iter()
            .any(|value| value.len() > rest.len() && value.starts_with(rest))
    }

    /// The length of the longest value that starts at `data[at..]` and fits
    /// in `data`.
    fn longest_match_at(&self, data: &[u8], at: usize) -> Option<usize> {
        if !self.first_byte[usize::from(data[at])] {
            return None;
        }
        let rest = &data[at..];
        self.values
            .iter()
            .filter(|value| rest.starts_with(value))
            .map(Vec::len)
            .max()
    }
}

/// Streams output through, replacing secrets with [`MASK`].
#[derive(Debug)]
pub struct Masker {
    secrets: Secrets,
    /// Bytes given but not yet decided on (at most `max_len - 1` between
    /// calls).
    pending: Vec<u8>,
    /// `pending[..covered]` lies in a masked region whose marker was already
    /// written.
    covered: usize,
}

impl Masker {
    /// Filters `input`, appending what may leave the host now to `out`. Bytes
    /// may be held back until a later call or [`Masker::finish`].
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        if self.secrets.is_empty() {
            out.extend_from_slice(input);
            return;
        }
        self.pending.extend_from_slice(input);
        self.process(false, out);
    }

    /// Flushes whatever was held back, at end of output.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        self.process(true, out);
    }

    /// Decides on every pending byte from which no secret can still begin
    /// beyond the pending bytes (all of them when `at_end`).
    fn process(&mut self, at_end: bool, out: &mut Vec<u8>) {
        let data = &self.pending;
        let mut at = 0;
        // Start of the run of plain bytes not yet copied to `out`.
        let mut plain_from = 0;
        while at < data.len() {
            if !at_end && self.secrets.could_continue(data, at) {
                // A secret starting here might end in the next input.
                break;
            }
            if let Some(len) = self.secrets.longest_match_at(data, at)
                && at + len > self.covered
            {
                if at >= self.covered {
                    out.extend_from_slice(&data[plain_from..at]);
                    out.extend_from_slice(MASK);
                }
                self.covered = at + len;
            }
            at += 1;
            if at <= self.covered {
                plain_from = at;
            }
        }
        out.extend_from_slice(&data[plain_from..at]);
        self.pending.drain(..at);
        self.covered = self.covered.saturating_sub(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: &str = "[MASKED]";

    /// Masks `text` fed in the given pieces.
    fn stream(secrets: &Secrets, pieces: &[&[u8]]) -> String {
        let mut masker = secrets.masker();
        let mut out = Vec::new();
        for piece in pieces {
            masker.push(piece, &mut out);
            assert!(
                masker.pending.len() < secrets.max_len.max(1),
                "held back {} bytes",
                masker.pending.len()
            );
        }
        masker.finish(&mut out);
        String::from_utf8(out).unwrap()
    }

    /// The reference: mask the union of every occurrence of every secret,
    /// one marker per maximal run of overlapping occurrences.
    fn reference(values: &[&str], text: &str) -> String {
        let text = text.as_bytes();
        let mut out = Vec::new();
        // End of the masked region seen so far.
        let mut region_end = 0;
        for at in 0..text.len() {
            let longest = values
                .iter()
                .map(|v| v.as_bytes())
                .filter(|v| v.len() >= MIN_SECRET_BYTES && text[at..].starts_with(v))
                .map(<[u8]>::len)
                .max();
            if let Some(len) = longest {
                if at >= region_end {
                    out.extend_from_slice(MASK);
                }
                region_end = region_end.max(at + len);
            }
            if at >= region_end {
                out.push(text[at]);
            }
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn passes_bytes_through_in_order() {
        let secrets = Secrets::new(["s3cret"]);
        assert_eq!(stream(&secrets, &[b"hello ", b"world\n"]), "hello world\n");
        assert_eq!(stream(&Secrets::new([""; 0]), &[b"a", b"b"]), "ab");
    }

    #[test]
    fn table() {
        let cases: &[(&[&str], &str, String)] = &[
            (&["s3cret"], "a s3cret b", format!("a {M} b")),
            (&["s3cret"], "s3cret", M.to_owned()),
            (&["s3cret"], "xs3cret", format!("x{M}")),
            (&["s3cret"], "s3crets3cret", format!("{M}{M}")),
            (&["s3cret"], "s3cre", "s3cre".to_owned()),
            // Too short to mask.
            (&["abc"], "abc abc", "abc abc".to_owned()),
            // Overlapping: one region.
            (&["abcd", "cdef"], "xabcdefx", format!("x{M}x")),
            (&["abcdef", "bcd"], "abcdefg", format!("{M}g")),
            (&["bcde", "abcdefgh"], "abcdefgh!", format!("{M}!")),
            // A secret inside another.
            (&["token", "mytoken1"], "mytoken1 token", format!("{M} {M}")),
            // Repeated characters overlapping themselves.
            (&["aaaa"], "aaaaaa", M.to_owned()),
        ];
        for (values, text, expected) in cases {
            let secrets = Secrets::new(values.iter());
            assert_eq!(
                &stream(&secrets, &[text.as_bytes()]),
                expected,
                "{values:?} {text:?}"
            );
            assert_eq!(
                &reference(values, text),
                expected,
                "reference {values:?} {text:?}"
            );
            assert_eq!(&secrets.mask(text), expected);
        }
    }

    #[test]
    fn every_secret_split_at_every_offset_across_two_writes() {
        let values = [
            "ghp_0123456789abcdef",
            "x-access-token:ghp_0123456789abcdef",
            "hunter22",
        ];
        let secrets = Secrets::new(values);
        for value in values {
            let text = format!("before {value} middle {value}\nafter");
            let expected = reference(&values, &text);
            assert!(!expected.contains(value));
            let bytes = text.as_bytes();
            for split in 0..=bytes.len() {
                let (a, b) = bytes.split_at(split);
                assert_eq!(stream(&secrets, &[a, b]), expected, "split at {split}");
            }
        }
    }

    #[test]
    fn one_byte_at_a_time() {
        let values = ["s3cret-value", "other secret"];
        let secrets = Secrets::new(values);
        let text = "s3cret-value, other secret, s3cret-valu, other secret";
        let pieces: Vec<&[u8]> = text.as_bytes().chunks(1).collect();
        let expected = format!("{M}, {M}, s3cret-valu, {M}");
        assert_eq!(stream(&secrets, &pieces), expected);
    }

    #[test]
    fn a_secret_at_the_very_end_is_caught_by_finish() {
        // A possible start of a secret is held back until finish decides.
        let secrets = Secrets::new(["tail-secret", "a-much-longer-secret-value"]);
        let mut masker = secrets.masker();
        let mut out = Vec::new();
        masker.push(b"line\ntail-secret", &mut out);
        masker.push(b"a-much", &mut out);
        // "a-much" may begin the longer secret: only it is held back.
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            format!("line\n{M}")
        );
        masker.finish(&mut out);
        assert_eq!(String::from_utf8(out).unwrap(), format!("line\n{M}a-much"));
        // A prefix of a secret at the end is flushed as it is.
        assert_eq!(stream(&secrets, &[b"x tail-secre"]), "x tail-secre");
        assert_eq!(
            stream(&secrets, &[b"x a-much-longer-secret-valu"]),
            "x a-much-longer-secret-valu"
        );
    }

    /// xorshift64*: deterministic pseudo-random numbers for the property tests.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
        }
    }

    #[test]
    fn random_texts_and_splits_match_the_reference() {
        // A small alphabet makes overlaps and near misses frequent; it shares
        // no byte with the marker, so no secret can appear in the output.
        let alphabet = b"abc\n";
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for round in 0..3000 {
            let count = 1 + rng.below(3);
            let values: Vec<String> = (0..count)
                .map(|_| {
                    let len = 1 + rng.below(8);
                    (0..len)
                        .map(|_| char::from(alphabet[rng.below(3)]))
                        .collect()
                })
                .collect();
            let text: String = (0..rng.below(60))
                .map(|_| char::from(alphabet[rng.below(alphabet.len())]))
                .collect();
            let value_refs: Vec<&str> = values.iter().map(String::as_str).collect();
            let secrets = Secrets::new(&values);
            let expected = reference(&value_refs, &text);
            for value in value_refs.iter().filter(|v| v.len() >= MIN_SECRET_BYTES) {
                assert!(!expected.contains(value), "{round}: {value} in {expected}");
            }
            // Random pieces.
            let bytes = text.as_bytes();
            let mut pieces = Vec::new();
            let mut at = 0;
            while at < bytes.len() {
                let len = (1 + rng.below(10)).min(bytes.len() - at);
                pieces.push(&bytes[at..at + len]);
                at += len;
            }
            assert_eq!(
                stream(&secrets, &pieces),
                expected,
                "round {round}: {values:?} {text:?} {pieces:?}"
            );
            // Every split into two.
            for split in 0..=bytes.len() {
                let (a, b) = bytes.split_at(split);
                assert_eq!(
                    stream(&secrets, &[a, b]),
                    expected,
                    "{values:?} {text:?} {split}"
                );
            }
        }
    }
}
