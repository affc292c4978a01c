//! The env composer: later layers win, and a job's variables never replace
//! a reserved name (PATH, HOME, CI, HOBOTNICA, HOBOTNICA_*).
#![no_main]

use std::collections::BTreeMap;

use hobotnica_common::env::{CiVars, compose, is_reserved, merge_layers};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|layers: [Vec<(String, String)>; 3]| {
    let [repo, kind, once] = layers.map(|layer| layer.into_iter().collect::<BTreeMap<_, _>>());
    let merged = merge_layers([&repo, &kind, &once]);
    for (name, value) in &merged {
        let expected = once
            .get(name)
            .or_else(|| kind.get(name))
            .or_else(|| repo.get(name));
        assert_eq!(Some(value), expected);
    }
    let ci = CiVars {
        job_id: 1,
        attempt: 1,
        repo: "local/demo",
        commit: "0123456789abcdef0123456789abcdef01234567",
        branch: "main",
        target: "test",
        kind: "test",
    };
    let env = compose([("PATH".to_owned(), "/usr/bin".to_owned())], &ci, &merged);
    assert_eq!(env.get("PATH").map(String::as_str), Some("/usr/bin"));
    assert_eq!(env.get("CI").map(String::as_str), Some("true"));
    // Reserved names hold what Hobotnica sets, whatever the job asked.
    let base = compose(
        [("PATH".to_owned(), "/usr/bin".to_owned())],
        &ci,
        &BTreeMap::new(),
    );
    for name in merged.keys().filter(|name| is_reserved(name)) {
        assert_eq!(env.get(name), base.get(name), "{name}");
    }
});
