//! Webhook deliveries: any event name and body is parsed or refused, never
//! a panic; a push that parses runs a real commit sha; a signature check
//! answers for any header value, and the right signature always verifies.
#![no_main]

use hmac::{Hmac, KeyInit, Mac};
use hobotnica_controller::fuzzing::{WebhookEvent, parse_event, signature_matches};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;

const EVENTS: [&str; 4] = ["push", "pull_request", "ping", "other"];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let event = EVENTS[usize::from(selector) % EVENTS.len()];
    if let Ok(WebhookEvent::Test { commit, .. }) = parse_event(event, rest) {
        let sha = commit.to_string();
        assert!(sha.len() == 40 && sha.bytes().all(|b| b.is_ascii_hexdigit()));
    }
    // The first bytes as a header value, the rest as a body.
    let split = rest.len().min(usize::from(selector));
    let (header, body) = rest.split_at(split);
    let header = String::from_utf8_lossy(header);
    let secret = b"fuzz-secret";
    let _ = signature_matches(secret, body, &header);
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("any key");
    mac.update(body);
    let right = format!("sha256={}", hex(&mac.finalize().into_bytes()));
    assert!(signature_matches(secret, body, &right));
    assert!(header == right || !signature_matches(secret, body, &header));
});

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
