//! The forms of a secret that are masked in job logs, built once by the
//! controller (for each secret variable and the git token) and sent to the
//! agent with the job; the agent also uses them for the git header's parts.
//!
//! For a value `v` the forms are:
//! - `v` itself, and each line of a multi-line `v` (4 characters or more);
//! - the base64 **cores** of `v` and of each of those lines: for each of the
//!   three byte alignments (`k` = 0, 1, 2 unknown bytes before the value),
//!   the characters of base64(`k` bytes ‖ `v` ‖ anything) that depend on the
//!   bytes of `v` alone. The leading characters that mix in the unknown
//!   prefix and the trailing ones that mix in what follows (or padding) are
//!   dropped, so a core appears whatever surrounds the value:
//!   `echo "$S" | base64` (the value and a newline),
//!   `printf 'user:%s' "$S" | base64` (a prefix), the value in the middle of
//!   a file. Each core is given in the standard and the URL-safe alphabet.
//!   Cores shorter than [`MIN_CORE_CHARS`] are skipped: a 4-byte value at a
//!   bad alignment leaves 4 characters, which would mask random text.
//! - the ends of its whole padded encoding and of that of the value and a
//!   newline (`printf %s "$S" | base64`, `echo "$S" | base64`), both
//!   alphabets: the last [`END_OVERLAP`] characters of the alignment-0 core
//!   and what follows them. Such an end overlaps the core, so the two are
//!   masked as one and no last character or padding is left beside the
//!   marker. For a short value, whose cores are short or missing, the end
//!   is the whole encoding.
//!
//! Base64 wrapped over several lines (`base64` wraps at 76 columns) is the
//! masker's part: a form made only of base64 characters is also matched
//! with a line break between any two of its characters.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};

/// Forms shorter than this are not masked (the agent skips them too).
pub const MIN_FORM_BYTES: usize = 4;

/// Base64 cores shorter than this are not masked.
pub const MIN_CORE_CHARS: usize = 6;

/// Characters of the alignment-0 core an encoding's end form starts with.
pub const END_OVERLAP: usize = 8;

/// Every form of `value` to mask (sorted, without duplicates).
pub fn mask_forms(value: &str) -> Vec<String> {
    let mut bases = vec![value];
    if value.contains('\n') {
        bases.extend(
            value
                .lines()
                .map(str::trim_end)
                .filter(|line| line.len() >= MIN_FORM_BYTES),
        );
    }
    let mut forms: Vec<String> = bases.iter().map(|base| (*base).to_owned()).collect();
    for base in bases {
        let bytes = base.as_bytes();
        for core in base64_cores(bytes) {
            forms.push(to_url_safe(&core));
            forms.push(core);
        }
        // The alignment-0 core is the first 8n/6 characters.
        let start = (8 * bytes.len() / 6).saturating_sub(END_OVERLAP);
        for ending in ["", "\n"] {
            let whole = STANDARD.encode([base, ending].concat());
            let end = whole.get(start..).unwrap_or_default();
            forms.push(to_url_safe(end));
            forms.push(end.to_owned());
        }
    }
    forms.retain(|form| form.len() >= MIN_FORM_BYTES);
    forms.sort();
    forms.dedup();
    forms
}

/// The standard-alphabet base64 cores of `value` at the three alignments,
/// each at least [`MIN_CORE_CHARS`] long: the characters that do not depend
/// on what comes before or after `value`.
pub fn base64_cores(value: &[u8]) -> Vec<String> {
    let mut cores = Vec::new();
    for unknown in 0..3usize {
        let mut input = vec![0u8; unknown];
        input.extend_from_slice(value);
        let encoded = STANDARD_NO_PAD.encode(&input);
        // Character `i` holds bits 6i..6i+6 of the input: bytes 6i/8 to
        // (6i+5)/8. It is fixed when those are all bytes of `value`.
        let end_bit = 8 * (unknown + value.len());
        let core: String = encoded
            .char_indices()
            .filter(|(i, _)| 6 * i >= 8 * unknown && 6 * i + 6 <= end_bit)
            .map(|(_, c)| c)
            .collect();
        if core.len() >= MIN_CORE_CHARS {
            cores.push(core);
        }
    }
    cores
}

/// `core` in the URL-safe alphabet (`-` and `_` for `+` and `/`).
fn to_url_safe(core: &str) -> String {
    core.replace('+', "-").replace('/', "_")
}

/// Every byte string a base64 text may hide (the oracle of the masking
/// tests, independent of how the forms are built): each maximal run of base64
/// characters (either alphabet, padding skipped) once line breaks are
/// removed, decoded from each of its first four characters (so a run that
/// joins two outputs is read at the alignment of each).
pub fn base64_decodings(log: &[u8]) -> Vec<Vec<u8>> {
    let sextet = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' | b'-' => Some(62),
        b'/' | b'_' => Some(63),
        _ => None,
    };
    let joined: Vec<u8> = log
        .iter()
        .copied()
        .filter(|b| *b != b'\n' && *b != b'\r' && *b != b'=')
        .collect();
    let mut decoded = Vec::new();
    for run in joined.split(|b| sextet(*b).is_none()) {
        for skip in 0..4.min(run.len()) {
            let mut bytes = Vec::new();
            let (mut bits, mut count) = (0u32, 0);
            for c in &run[skip..] {
                bits = (bits << 6) | u32::from(sextet(*c).unwrap_or(0));
                count += 6;
                if count >= 8 {
                    count -= 8;
                    bytes.push((bits >> count) as u8);
                    bits &= (1 << count) - 1;
                }
            }
            decoded.push(bytes);
        }
    }
    decoded
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every base64 encoding of `prefix ‖ value ‖ suffix`, for prefixes and
    /// suffixes of every length modulo 3, contains one of the cores.
    #[test]
    fn a_core_is_in_every_encoding_whatever_surrounds_the_value() {
        for value in [
            "hunter22",
            "s3cr3t-v",
            "a longer secret value!",
            "\u{1F511}key",
        ] {
            let cores = base64_cores(value.as_bytes());
            assert_eq!(cores.len(), 3, "{value}");
            for prefix in ["", "u", "us", "user:", "x-access-token:"] {
                for suffix in ["", "\n", "\r\n", "tail"] {
                    let encoded = STANDARD.encode(format!("{prefix}{value}{suffix}"));
                    assert!(
                        cores.iter().any(|core| encoded.contains(core.as_str())),
                        "{prefix:?} {value:?} {suffix:?}: {encoded} has none of {cores:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn cores_drop_the_characters_that_mix_in_other_bytes() {
        // "hunter22" alone is aHVudGVyMjI= ; the last "I" mixes in what
        // follows.
        let cores = base64_cores(b"hunter22");
        assert_eq!(cores[0], "aHVudGVyMj");
        // Short values lose their short cores.
        assert!(base64_cores(b"abcd").is_empty());
        let cores = base64_cores(b"abcde");
        assert_eq!(cores.len(), 3);
        assert_eq!(cores[0], "YWJjZG");
    }

    #[test]
    fn forms_cover_lines_both_alphabets_and_short_whole_encodings() {
        let forms = mask_forms("-----BEGIN KEY-----\nabcdefgh\nxy\n-----END KEY-----");
        assert!(forms.contains(&"abcdefgh".to_owned()));
        assert!(forms.contains(&"-----BEGIN KEY-----".to_owned()));
        assert!(
            !forms.contains(&"xy".to_owned()),
            "short lines are not masked"
        );
        assert!(forms.iter().any(|f| f.starts_with("LS0tLS1CRUdJTi")));
        // The end of a line's encoding, also after `echo`.
        assert!(forms.contains(&"JjZGVmZ2g=".to_owned()));
        assert!(forms.contains(&"JjZGVmZ2gK".to_owned()));
        // A short value's whole encoding.
        let forms = mask_forms("abcde");
        assert!(forms.contains(&"YWJjZGU=".to_owned()));
        assert!(forms.contains(&"YWJjZGUK".to_owned()));
        let forms = mask_forms("hunter2?>");
        assert!(forms.contains(&"hunter2?>".to_owned()));
        assert!(forms.contains(&"aHVudGVyMj8+".to_owned()));
        assert!(forms.contains(&"aHVudGVyMj8-".to_owned()));
        // A longer value: the end of its encoding, overlapping its core.
        let value = "a secret value of some length";
        let whole = STANDARD.encode(value);
        let forms = mask_forms(value);
        assert!(
            forms
                .iter()
                .any(|form| form.len() < whole.len() && whole.ends_with(form.as_str()))
        );
        assert!(forms.contains(&whole[..8 * value.len() / 6].to_owned()));
        assert!(forms.iter().all(|form| form.len() >= MIN_FORM_BYTES));
    }
}
