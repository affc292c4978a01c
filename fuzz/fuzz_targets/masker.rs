//! The masker: for secrets and output drawn from bytes the marker
//! `[MASKED]` does not use, no secret (4 bytes or more) survives, and the
//! output does not depend on how the input is cut into reads.
#![no_main]

use hobotnica_agent::fuzzing::Secrets;
use libfuzzer_sys::fuzz_target;

/// Bytes that appear in no marker, with a line break (wrapping) in them.
const ALPHABET: &[u8] = b"abcxyz+/=\n";

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let to_text = |bytes: &[u8]| -> Vec<u8> {
        bytes
            .iter()
            .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()])
            .collect()
    };
    let count = 1 + usize::from(data[0] % 3);
    let cut = usize::from(data[1]);
    let mut rest = &data[2..];
    let mut secrets = Vec::new();
    for _ in 0..count {
        let len = (usize::from(*rest.first().unwrap_or(&0)) % 12).min(rest.len());
        let (secret, tail) = rest.split_at(len);
        secrets.push(to_text(secret));
        rest = tail.get(1..).unwrap_or_default();
    }
    let text = to_text(rest);
    let set = Secrets::new(&secrets);
    let whole = mask(&set, &[&text]);
    // Any cutting gives the same output.
    let pieces: Vec<&[u8]> = text.chunks(1 + cut % 7).collect();
    assert_eq!(mask(&set, &pieces), whole);
    let (a, b) = text.split_at(cut.min(text.len()));
    assert_eq!(mask(&set, &[a, b]), whole);
    for secret in secrets.iter().filter(|s| s.len() >= 4) {
        assert!(
            !whole.windows(secret.len()).any(|w| w == secret.as_slice()),
            "{:?} survived in {:?}",
            String::from_utf8_lossy(secret),
            String::from_utf8_lossy(&whole)
        );
    }
});

fn mask(secrets: &Secrets, pieces: &[&[u8]]) -> Vec<u8> {
    let mut masker = secrets.masker();
    let mut out = Vec::new();
    for piece in pieces {
        masker.push(piece, &mut out);
    }
    masker.finish(&mut out);
    out
}
