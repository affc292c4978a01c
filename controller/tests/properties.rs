//! Properties of the controller's parsers of outside input, on random
//! input (the stable-toolchain side of the fuzz targets in `fuzz/`):
//! webhook payloads and signatures, git URLs, agents' registrations.

use std::collections::BTreeMap;

use hmac::{Hmac, KeyInit, Mac};
use hobotnica_controller::fuzzing::{
    Registration, WebhookEvent, check_git_url, parse_event, signature_matches,
    validate_registration,
};
use proptest::prelude::*;
use sha2::Sha256;

fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A branch as GitHub sends it: letters, digits, `._/-`.
fn branch() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9_/-]{0,30}[a-z0-9]"
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    /// Any event name and any body: an answer, never a panic.
    #[test]
    fn any_delivery_is_parsed_or_refused(
        event in prop::sample::select(vec!["push", "pull_request", "ping", "issues", ""]),
        body in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let _ = parse_event(event, &body);
    }

    /// JSON of the right shape with wrong types or values is refused or
    /// ignored, never run with a commit that is not one.
    #[test]
    fn a_push_runs_exactly_the_commit_it_names(
        sha in "[0-9a-f]{40}",
        junk in "[0-9a-zA-Z ;$`'\"]{0,40}",
        branch in branch(),
        deleted in any::<bool>(),
    ) {
        let body = serde_json::json!({
            "ref": format!("refs/heads/{branch}"),
            "after": sha,
            "deleted": deleted,
        });
        let parsed = parse_event("push", body.to_string().as_bytes());
        match parsed {
            Ok(WebhookEvent::Test { commit, branch: Some(got), from_fork }) => {
                prop_assert!(!deleted);
                prop_assert_eq!(commit.to_string(), sha);
                prop_assert_eq!(&got, &branch);
                prop_assert!(!from_fork);
            }
            // A branch git would not accept is not run either.
            Ok(WebhookEvent::Ignored(_)) => prop_assert!(
                deleted || hobotnica_common::validate::branch("branch", &branch).is_err()
            ),
            other => prop_assert!(false, "unexpected {:?}", other),
        }
        let bad = serde_json::json!({
            "ref": format!("refs/heads/{branch}"),
            "after": junk,
        });
        prop_assert!(
            !matches!(parse_event("push", bad.to_string().as_bytes()), Ok(WebhookEvent::Test { .. })),
            "{junk:?} ran as a commit"
        );
    }

    /// The right signature verifies; changing any byte of the body, or any
    /// character of the signature, does not; any string is an answer.
    #[test]
    fn only_the_right_signature_verifies(
        secret in prop::collection::vec(any::<u8>(), 1..64),
        body in prop::collection::vec(any::<u8>(), 0..256),
        flip in any::<prop::sample::Index>(),
        garbage in ".{0,80}",
    ) {
        let signature = sign(&secret, &body);
        prop_assert!(signature_matches(&secret, &body, &signature));
        if !body.is_empty() {
            let mut changed = body.clone();
            changed[flip.index(body.len())] ^= 1;
            prop_assert!(!signature_matches(&secret, &changed, &signature));
        }
        let mut wrong = signature.clone().into_bytes();
        let at = "sha256=".len() + flip.index(64);
        wrong[at] = if wrong[at] == b'0' { b'1' } else { b'0' };
        let wrong = String::from_utf8(wrong).expect("hex stays ASCII");
        prop_assert!(!signature_matches(&secret, &body, &wrong));
        prop_assert!(garbage == signature || !signature_matches(&secret, &body, &garbage));
    }

    /// An accepted git URL never carries credentials before its host (an
    /// ssh account excepted), never starts like an option and never names a
    /// command-running transport.
    #[test]
    fn accepted_git_urls_carry_no_credentials(
        scheme in prop::sample::select(vec!["https://", "http://", "ssh://", "git://", "file://", "ext::", "", "HTTPS://"]),
        user in prop::option::of("[a-z0-9:%@]{1,12}"),
        host in "[a-z0-9.-]{1,20}",
        path in "[a-zA-Z0-9/._@:?#-]{0,30}",
    ) {
        let url = match &user {
            Some(user) => format!("{scheme}{user}@{host}/{path}"),
            None => format!("{scheme}{host}/{path}"),
        };
        if check_git_url(&url).is_ok() {
            prop_assert!(!url.starts_with('-'));
            // `<transport>::<address>` runs a remote helper (`ext::sh -c ...`).
            let helper = url
                .split_once("::")
                .is_some_and(|(before, _)| before.chars().all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c)));
            prop_assert!(!helper, "{url}");
            if let Some((scheme, rest)) = url.split_once("://") {
                let authority = rest.split('/').next().unwrap_or_default();
                if let Some((userinfo, _)) = authority.split_once('@') {
                    prop_assert!(scheme == "ssh" && !userinfo.contains(':'), "{url}");
                }
            }
        }
    }

    /// Whatever an agent registers with is refused or bounded and
    /// printable: what `GET /api/v1/agents` and `hobot agents ls` show.
    #[test]
    fn an_accepted_registration_is_bounded_and_printable(
        name in "[\\PC\\p{Cc}]{0,120}",
        version in "[\\PC\\p{Cc}\u{202e}]{0,80}",
        labels in prop::collection::btree_map("[a-z\\PC]{0,70}", "[\\PC\\p{Cc}\u{2066}]{0,300}", 0..70),
        concurrency in 0u32..300,
    ) {
        let registration = Registration {
            name,
            labels: labels.clone(),
            concurrency,
            version: version.clone(),
            protocol_version: hobotnica_common::proto::PROTOCOL_VERSION,
        };
        if validate_registration(&registration).is_ok() {
            prop_assert!(version.len() <= 64);
            prop_assert!(version.chars().all(|c| c.is_ascii_graphic() || c == ' '), "{version:?}");
            prop_assert!(labels.len() <= 64);
            for (key, value) in &labels {
                prop_assert!(!key.is_empty() && key.len() <= 64);
                prop_assert!(value.chars().count() <= 256);
                prop_assert!(!value.chars().any(char::is_control), "{value:?}");
                prop_assert!(!value.chars().any(|c| matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')), "{value:?}");
            }
        }
    }
}

#[test]
fn a_registration_this_suite_builds_can_pass() {
    // The generators above reach the accepting side too.
    let registration = Registration {
        name: "builder-1".to_owned(),
        labels: BTreeMap::from([("os".to_owned(), "linux".to_owned())]),
        concurrency: 2,
        version: "0.1.0".to_owned(),
        protocol_version: hobotnica_common::proto::PROTOCOL_VERSION,
    };
    assert_eq!(validate_registration(&registration), Ok(()));
}
