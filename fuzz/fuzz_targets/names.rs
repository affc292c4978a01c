//! Names from the network — branches, targets, repository names, env
//! names and values, labels, git URLs — are accepted or refused, never a
//! panic; what is accepted holds none of the characters that would make it
//! an option, an assignment or a command.
#![no_main]

use hobotnica_common::validate;
use hobotnica_controller::fuzzing::check_git_url;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if validate::branch("branch", text).is_ok() {
        assert!(!text.starts_with(['-', '.', '/']) && !text.contains(".."));
        assert!(
            text.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b))
        );
        assert!(text != "HEAD" && !text.split('/').any(|part| part.ends_with(".lock")));
    }
    for accepted in [
        validate::target("target", text).is_ok(),
        validate::repo_component("name", text).is_ok(),
        validate::env_name("key", text).is_ok(),
    ] {
        if accepted {
            assert!(!text.starts_with('-') && !text.contains(['=', ' ', '$', ';', '\n']));
        }
    }
    let _ = validate::env_value("value", text);
    let _ = validate::label(text);
    if check_git_url(text).is_ok() {
        assert!(!text.starts_with('-'));
        let helper = text.split_once("::").is_some_and(|(before, _)| {
            before
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
        });
        assert!(!helper, "a remote helper: {text}");
        // A URL git reads as one (`scheme://`); "/a://b@c" is a path.
        if let Some((scheme, rest)) = text.split_once("://")
            && scheme.chars().all(|c| c.is_ascii_alphanumeric())
        {
            let authority = rest.split('/').next().unwrap_or_default();
            if let Some((userinfo, _)) = authority.split_once('@') {
                assert!(
                    scheme == "ssh" && !userinfo.contains(':'),
                    "credentials: {text}"
                );
            }
        }
    }
});
