//! Secret masking: the filter between a job's output pipe and its spool, and
//! the same rule for every line the agent itself writes about a job (git's
//! errors, the completion message).
//!
//! A [`Secrets`] set is made of byte strings: the forms of the job's secrets
//! (`Assignment.secrets`, built by `hobotnica_common::mask_forms`: each value,
//! its lines, and their base64 at every alignment in both alphabets) and the
//! secret parts of its git HTTP header. Values shorter than
//! [`MIN_SECRET_BYTES`] are skipped (masking `1` or `on` would destroy the
//! log and hide nothing). Every occurrence is replaced by [`MASK`];
//! occurrences that overlap are masked as one region, so no tail of a secret
//! survives next to the marker.
//!
//! A value made only of base64 characters (`A-Z a-z 0-9 + / - _ =`) is also
//! found with a line break (`\n` or `\r\n`) between any two of its
//! characters: base64 wrapped at any width (`base64` wraps at 76 columns,
//! `openssl base64` at 64). One break at most between two characters, none
//! before the first or after the last; the whole span, breaks included,
//! becomes one [`MASK`].
//!
//! [`Masker`] does it on a stream: it holds back only a tail that could be
//! the start of some value (shorter than the longest span a value can cover:
//! its length, or 3 × its length for a wrapped one), so a secret split
//! across reads is still caught while a quiet job's last line is not kept
//! waiting, and flushes it at the end. Values are indexed by their first
//! byte: at a byte no value starts with, nothing is compared.

use std::sync::Arc;

/// What replaces a secret.
pub const MASK: &[u8] = b"[MASKED]";

/// Values shorter than this are not masked.
pub const MIN_SECRET_BYTES: usize = 4;

/// One value to mask.
struct Value {
    bytes: Vec<u8>,
    /// Made only of base64 characters: may be wrapped over lines.
    wrappable: bool,
}

/// How a value lies at the start of some bytes.
enum Fit {
    /// It is not there.
    Mismatch,
    /// The bytes end inside it: more input may complete it.
    Partial,
    /// It is there, covering this many bytes (line breaks included).
    Full(usize),
}

impl Value {
    fn new(bytes: Vec<u8>) -> Value {
        let wrappable = bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"+/-_=".contains(b));
        Value { bytes, wrappable }
    }

    /// The most bytes a match can cover.
    fn max_span(&self) -> usize {
        if self.wrappable {
            // A `\r\n` between every two characters.
            3 * self.bytes.len() - 2
        } else {
            self.bytes.len()
        }
    }

    fn fit(&self, data: &[u8]) -> Fit {
        let value = &self.bytes;
        if data.starts_with(value) {
            // Without a break: a base64 character is never a break, so no
            // other match exists.
            return Fit::Full(value.len());
        }
        if !self.wrappable {
            return if value.starts_with(data) {
                Fit::Partial
            } else {
                Fit::Mismatch
            };
        }
        let mut at = 0;
        for (i, &byte) in value.iter().enumerate() {
            if i > 0 {
                // One optional line break between two characters.
                match data.get(at) {
                    None => return Fit::Partial,
                    Some(b'\n') => at += 1,
                    Some(b'\r') => match data.get(at + 1) {
                        None => return Fit::Partial,
                        Some(b'\n') => at += 2,
                        Some(_) => return Fit::Mismatch,
                    },
                    Some(_) => {}
                }
            }
            match data.get(at) {
                None => return Fit::Partial,
                Some(&found) if found == byte => at += 1,
                Some(_) => return Fit::Mismatch,
            }
        }
        Fit::Full(at)
    }
}

/// The values one job masks. Cheap to clone.
#[derive(Clone)]
pub struct Secrets {
    /// Distinct values, at least [`MIN_SECRET_BYTES`] long.
    values: Arc<[Value]>,
    /// `by_first_byte[b]`: the indices of the values that start with `b`.
    by_first_byte: Arc<[Vec<usize>]>,
    /// Bit `256 * a + b`: some value starts with the bytes `a b` (a
    /// prefilter: most positions of a log are rejected by two lookups).
    first_pairs: Arc<[u64]>,
    /// The longest span a value can cover: the bound on what is held back
    /// (checked in tests).
    #[cfg_attr(not(test), allow(dead_code))]
    max_span: usize,
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
        let values: Vec<Value> = kept.into_iter().map(Value::new).collect();
        let mut by_first_byte = vec![Vec::new(); 256];
        let mut first_pairs = vec![0u64; 65536 / 64];
        for (index, value) in values.iter().enumerate() {
            by_first_byte[usize::from(value.bytes[0])].push(index);
            let pair = pair_index(value.bytes[0], value.bytes[1]);
            first_pairs[pair / 64] |= 1 << (pair % 64);
        }
        let max_span = values.iter().map(Value::max_span).max().unwrap_or(0);
        Secrets {
            values: values.into(),
            by_first_byte: by_first_byte.into(),
            first_pairs: first_pairs.into(),
            max_span,
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

    /// The values found at `data[at..]`: the span of the longest one that
    /// is there whole, and whether some value may still be completed by
    /// bytes not given yet (only then are bytes held back, so a quiet job's
    /// last line is not kept waiting).
    fn probe(&self, data: &[u8], at: usize) -> (Option<usize>, bool) {
        let rest = &data[at..];
        let candidates = &self.by_first_byte[usize::from(rest[0])];
        if candidates.is_empty() {
            return (None, false);
        }
        if let Some(&second) = rest.get(1)
            && second != b'\n'
            && second != b'\r'
        {
            let pair = pair_index(rest[0], second);
            if self.first_pairs[pair / 64] & (1 << (pair % 64)) == 0 {
                return (None, false);
            }
        }
        let mut longest = None;
        let mut partial = false;
        for &index in candidates {
            match self.values[index].fit(rest) {
                Fit::Mismatch => {}
                Fit::Partial => partial = true,
                Fit::Full(span) => longest = longest.max(Some(span)),
            }
        }
        (longest, partial)
    }
}

/// The bit of the pair of bytes `a b` in `Secrets::first_pairs`.
fn pair_index(a: u8, b: u8) -> usize {
    256 * usize::from(a) + usize::from(b)
}

/// Streams output through, replacing secrets with [`MASK`].
#[derive(Debug)]
pub struct Masker {
    secrets: Secrets,
    /// Bytes given but not yet decided on (fewer than `max_span` between
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

    /// Whether what is held back ends with a line break: a whole line kept
    /// waiting only because wrapped base64 of a secret may go on after it.
    pub fn holds_a_line_end(&self) -> bool {
        matches!(self.pending.last(), Some(b'\n' | b'\r'))
    }

    /// Flushes whatever was held back, as at the end of output, and goes on
    /// masking what comes next (for a job that has gone quiet).
    pub fn release(&mut self, out: &mut Vec<u8>) {
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
            let (longest, partial) = self.secrets.probe(data, at);
            if partial && !at_end {
                // A secret starting here might end in the next input.
                break;
            }
            if let Some(span) = longest
                && at + span > self.covered
            {
                if at >= self.covered {
                    out.extend_from_slice(&data[plain_from..at]);
                    out.extend_from_slice(MASK);
                }
                self.covered = at + span;
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
                masker.pending.len() < secrets.max_span.max(1),
                "held back {} bytes",
                masker.pending.len()
            );
        }
        masker.finish(&mut out);
        String::from_utf8(out).unwrap()
    }

    /// Whether `value` may be wrapped (made only of base64 characters).
    fn wrappable(value: &[u8]) -> bool {
        value
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"+/-_=".contains(b))
    }

    /// The longest span of `text` from its start that spells `value`, with
    /// nothing, `\n` or `\r\n` between two characters when `wrapped`.
    fn reference_span(value: &[u8], text: &[u8], wrapped: bool) -> Option<usize> {
        let (first, more) = value.split_first()?;
        if text.first() != Some(first) {
            return None;
        }
        if more.is_empty() {
            return Some(1);
        }
        let breaks: &[&[u8]] = if wrapped {
            &[b"", b"\n", b"\r\n"]
        } else {
            &[b""]
        };
        breaks
            .iter()
            .filter_map(|line_break| {
                let rest = text[1..].strip_prefix(*line_break)?;
                Some(1 + line_break.len() + reference_span(more, rest, wrapped)?)
            })
            .max()
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
                .filter(|v| v.len() >= MIN_SECRET_BYTES)
                .filter_map(|v| reference_span(v, &text[at..], wrappable(v)))
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
            // Base64 characters only: found wrapped, one break at a time.
            (&["YWJjZGVm"], "YWJj\nZGVm\n", format!("{M}\n")),
            (&["YWJjZGVm"], "x YW\r\nJjZ\nGV\r\nm", format!("x {M}")),
            (&["YWJjZGVm"], "YWJj\n\nZGVm", "YWJj\n\nZGVm".to_owned()),
            (&["YWJjZGVm"], "YWJj\rZGVm", "YWJj\rZGVm".to_owned()),
            (&["YWJjZGVm"], "\nYWJjZGVm\n", format!("\n{M}\n")),
            // Other values are found exactly.
            (&["ab:cdef"], "ab:c\ndef", "ab:c\ndef".to_owned()),
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

    #[test]
    fn a_line_that_wrapped_base64_may_continue_is_held_until_released() {
        let secrets = Secrets::new(["YWJjZGVmZ2g"]);
        let mut masker = secrets.masker();
        let mut out = Vec::new();
        masker.push(b"line\nYWJj\n", &mut out);
        assert_eq!(String::from_utf8_lossy(&out), "line\n");
        assert!(masker.holds_a_line_end());
        // The next output completes it.
        masker.push(b"ZGVmZ2g\nok\n", &mut out);
        assert!(!masker.holds_a_line_end());
        masker.finish(&mut out);
        assert_eq!(String::from_utf8_lossy(&out), format!("line\n{M}\nok\n"));
        // Or the job goes quiet: the line leaves as it is, and masking goes on.
        let mut masker = secrets.masker();
        let mut out = Vec::new();
        masker.push(b"YWJj\n", &mut out);
        masker.release(&mut out);
        assert_eq!(String::from_utf8_lossy(&out), "YWJj\n");
        masker.push(b"YWJjZGVmZ2g", &mut out);
        masker.finish(&mut out);
        assert_eq!(String::from_utf8_lossy(&out), format!("YWJj\n{M}"));
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
        let alphabet = b"abc:\n\r";
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for round in 0..3000 {
            let count = 1 + rng.below(3);
            let values: Vec<String> = (0..count)
                .map(|_| {
                    let len = 1 + rng.below(8);
                    // Some with `:`, found exactly; the others also wrapped.
                    let letters = if rng.below(2) == 0 { 3 } else { 4 };
                    (0..len)
                        .map(|_| char::from(alphabet[rng.below(letters)]))
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

    /// Throughput of the masker on a 64 MiB log with 20 secrets (the forms
    /// the controller sends for them), in 64 KiB reads:
    /// `cargo test --release -p hobotnica-agent --lib masker_throughput -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, run by hand in release"]
    fn masker_throughput() {
        let mut rng = Rng(0x2545_F491_4F6C_DD1D);
        let alnum = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        let word = |rng: &mut Rng, len: usize| -> String {
            (0..len)
                .map(|_| char::from(alnum[rng.below(alnum.len())]))
                .collect()
        };
        let values: Vec<String> = (0..20)
            .map(|_| {
                let len = 24 + rng.below(17);
                word(&mut rng, len)
            })
            .collect();
        let forms: Vec<String> = values
            .iter()
            .flat_map(|value| hobotnica_common::mask_forms::mask_forms(value))
            .collect();
        let secrets = Secrets::new(&forms);
        // Build-log-like lines: words, paths, hashes, some base64.
        let mut log = Vec::with_capacity(64 << 20);
        while log.len() < 64 << 20 {
            match rng.below(4) {
                0 => log
                    .extend_from_slice(b"   Compiling some-crate v1.2.3 (/build/src/some-crate)\n"),
                1 => {
                    log.extend_from_slice(b"test module::tests::");
                    log.extend_from_slice(word(&mut rng, 20).as_bytes());
                    log.extend_from_slice(b" ... ok\n");
                }
                2 => {
                    log.extend_from_slice(word(&mut rng, 76).as_bytes());
                    log.push(b'\n');
                }
                _ => log.extend_from_slice(b"warning: unused variable: `x` at src/main.rs:10:5\n"),
            }
        }
        let mut out = Vec::with_capacity(log.len());
        let mut masker = secrets.masker();
        let started = std::time::Instant::now();
        for chunk in log.chunks(64 * 1024) {
            masker.push(chunk, &mut out);
        }
        masker.finish(&mut out);
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "{} forms: {:.1} MB/s ({} bytes out)",
            forms.len(),
            log.len() as f64 / seconds / 1e6,
            out.len()
        );
    }

    mod properties {
        //! Property: no form of a secret a job may print survives the masker,
        //! whatever surrounds it and however the output is cut into reads.

        use base64::Engine as _;
        use base64::engine::general_purpose::{
            STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD,
        };
        use hobotnica_common::mask_forms::mask_forms;
        use proptest::prelude::*;
        use proptest::sample::Index;

        use super::super::Secrets;

        /// How the job prints the secret (or one of its lines).
        #[derive(Debug, Clone, Copy)]
        enum Print {
            Raw,
            Base64,
            Base64NoPad,
            Url,
            UrlNoPad,
            /// `printf 'PREFIX%s' "$S" | base64`
            PrefixedBase64,
            /// `echo "$S" | base64`
            EchoBase64,
        }

        fn print_strategy() -> impl Strategy<Value = Print> {
            prop_oneof![
                Just(Print::Raw),
                Just(Print::Base64),
                Just(Print::Base64NoPad),
                Just(Print::Url),
                Just(Print::UrlNoPad),
                Just(Print::PrefixedBase64),
                Just(Print::EchoBase64),
            ]
        }

        /// Inserts `line_break` every `width` characters.
        fn wrap(encoded: &str, width: usize, line_break: &str) -> String {
            let chars: Vec<char> = encoded.chars().collect();
            chars
                .chunks(width)
                .map(|line| line.iter().collect::<String>())
                .collect::<Vec<_>>()
                .join(line_break)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn no_form_of_a_secret_survives_any_chunking(
                // No upper case nor brackets: a secret is then never made
                // of the marker's letters.
                secret in "[a-z0-9 !-/:-@\\n\u{e9}\u{1F511}]{1,200}",
                which_line in any::<Index>(),
                print in print_strategy(),
                encoded_prefix in "[ -~]{0,5}",
                wrap_width in prop::option::of(4usize..100),
                crlf in any::<bool>(),
                before in "[ -~\\n]{0,20}",
                after in "[ -~\\n]{0,20}",
                cuts in prop::collection::vec(any::<Index>(), 0..6),
            ) {
                let forms = mask_forms(&secret);
                let secrets = Secrets::new(&forms);
                // The whole secret, or one of its lines.
                let lines: Vec<&str> = secret
                    .lines()
                    .map(str::trim_end)
                    .filter(|line| line.len() >= 4)
                    .collect();
                let shown = if lines.len() > 1 && which_line.index(2) == 1 {
                    lines[which_line.index(lines.len())]
                } else {
                    secret.as_str()
                };
                let encoded = match print {
                    Print::Raw => shown.to_owned(),
                    Print::Base64 => STANDARD.encode(shown),
                    Print::Base64NoPad => STANDARD_NO_PAD.encode(shown),
                    Print::Url => URL_SAFE.encode(shown),
                    Print::UrlNoPad => URL_SAFE_NO_PAD.encode(shown),
                    Print::PrefixedBase64 => STANDARD.encode(format!("{encoded_prefix}{shown}")),
                    Print::EchoBase64 => STANDARD.encode(format!("{shown}\n")),
                };
                let printed = match (print, wrap_width) {
                    (Print::Raw, _) | (_, None) => encoded,
                    (_, Some(width)) => wrap(&encoded, width, if crlf { "\r\n" } else { "\n" }),
                };
                let text = format!("{before}{printed}{after}");

                // Cut into reads at random places.
                let bytes = text.as_bytes();
                let mut at: Vec<usize> = cuts.iter().map(|cut| cut.index(bytes.len() + 1)).collect();
                at.push(0);
                at.push(bytes.len());
                at.sort_unstable();
                let mut masker = secrets.masker();
                let mut out = Vec::new();
                for window in at.windows(2) {
                    masker.push(&bytes[window[0]..window[1]], &mut out);
                    prop_assert!(masker.pending.len() < secrets.max_span.max(1));
                }
                masker.finish(&mut out);
                let out = String::from_utf8_lossy(&out).into_owned();

                if shown.len() >= 4 {
                    prop_assert!(!out.contains(shown), "{shown:?} in {out:?}");
                }
                // Whatever base64 is left, read at every alignment, does
                // not hold the secret: at most a few bits of its first and
                // last byte are beside the marker.
                if shown.len() >= 6 {
                    let inner = &shown.as_bytes()[1..shown.len() - 1];
                    for decoded in hobotnica_common::mask_forms::base64_decodings(out.as_bytes()) {
                        prop_assert!(
                            !decoded.windows(inner.len()).any(|window| window == inner),
                            "{shown:?} decodes from {out:?}"
                        );
                    }
                }
            }
        }
    }
}
