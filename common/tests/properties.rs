//! Properties of the parsers and rules every crate shares, on random input
//! (the stable-toolchain side of the fuzz targets in `fuzz/`): branch and
//! name validation against git itself, log offset arithmetic, the job
//! environment's layers.

use std::collections::BTreeMap;
use std::process::Command;

use hobotnica_common::env::{CiVars, compose, is_reserved, merge_layers};
use hobotnica_common::logs::{AppendPlan, plan_append};
use hobotnica_common::validate;
use proptest::prelude::*;

/// Whether git itself takes `name` as a branch name (the oracle: git, not
/// a copy of its rules).
#[allow(clippy::disallowed_methods)] // a fixed argv, in a test
fn git_accepts_branch(name: &str) -> bool {
    Command::new("git")
        .args(["check-ref-format", "--branch", name])
        .output()
        .expect("git runs (scripts/setup installs it)")
        .status
        .success()
}

fn layer() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(
        prop::sample::select(vec![
            "A",
            "B",
            "PATH",
            "HOME",
            "CI",
            "HOBOTNICA",
            "HOBOTNICA_JOB_ID",
            "LANG",
        ])
        .prop_map(str::to_owned),
        "[a-z]{0,4}",
        0..6,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    /// What `validate::branch` accepts, git accepts: a name Hobotnica takes
    /// never makes `git fetch` or `git checkout` fail, or read as an option.
    #[test]
    fn every_accepted_branch_is_a_git_branch(
        name in prop_oneof![
            "[a-z0-9./_-]{1,16}",
            "[a-z./_@{}~^: -]{1,12}",
            // Components git has rules for.
            prop::collection::vec(
                prop::sample::select(vec!["a", "b.lock", "c.", ".d", "-e", "f.lockx", "HEAD"]),
                1..4,
            )
            .prop_map(|parts| parts.join("/")),
        ],
    ) {
        if validate::branch("branch", &name).is_ok() {
            prop_assert!(git_accepts_branch(&name), "git refuses {name:?}");
        }
    }

    /// Names, targets and env names never reach a shell or make as options
    /// or assignments: whatever is accepted has none of their characters.
    #[test]
    fn accepted_names_hold_no_option_or_assignment(value in "[\\PC\\p{Cc}=$`;]{0,20}") {
        for (accepted, what) in [
            (validate::repo_component("name", &value).is_ok(), "name"),
            (validate::target("target", &value).is_ok(), "target"),
            (validate::env_name("key", &value).is_ok(), "env name"),
        ] {
            if accepted {
                prop_assert!(!value.starts_with('-'), "{what} {value:?}");
                prop_assert!(!value.contains(['=', '$', '`', ';', ' ']), "{what} {value:?}");
                prop_assert!(!value.chars().any(char::is_control), "{what} {value:?}");
            }
        }
    }

    /// A chunk is a duplicate iff it ends at or below the committed length,
    /// a gap iff it starts past it; otherwise exactly the bytes past the
    /// committed length are appended. No overflow at the extremes.
    #[test]
    fn log_offsets_append_each_byte_once(
        committed in prop_oneof![0u64..200, Just(u64::MAX), Just(u64::MAX - 1)],
        offset in prop_oneof![0u64..200, Just(u64::MAX), Just(u64::MAX - 3)],
        len in 0usize..100,
    ) {
        let end = offset.saturating_add(len as u64);
        match plan_append(committed, offset, len) {
            AppendPlan::Gap => prop_assert!(offset > committed),
            AppendPlan::Duplicate => prop_assert!(offset <= committed && end <= committed),
            AppendPlan::Append { skip } => {
                prop_assert!(offset <= committed && end > committed);
                prop_assert!(skip < len);
                prop_assert_eq!(offset + skip as u64, committed);
            }
        }
    }

    /// Later layers win (one-time over kind over repository); a job's
    /// variables never replace a reserved name, which always holds
    /// Hobotnica's value.
    #[test]
    fn job_layers_win_in_order_and_never_replace_reserved_names(
        repo in layer(), kind in layer(), once in layer(),
    ) {
        let merged = merge_layers([&repo, &kind, &once]);
        for (name, value) in &merged {
            let expected = once.get(name).or_else(|| kind.get(name)).or_else(|| repo.get(name));
            prop_assert_eq!(Some(value), expected);
        }
        let ci = CiVars {
            job_id: 7,
            attempt: 1,
            repo: "local/demo",
            commit: "0123456789abcdef0123456789abcdef01234567",
            branch: "main",
            target: "test",
            kind: "test",
        };
        let env = compose([("PATH".to_owned(), "/usr/bin".to_owned())], &ci, &merged);
        prop_assert_eq!(env.get("CI").map(String::as_str), Some("true"));
        prop_assert_eq!(env.get("HOBOTNICA").map(String::as_str), Some("true"));
        prop_assert_eq!(env.get("HOBOTNICA_JOB_ID").map(String::as_str), Some("7"));
        prop_assert_eq!(env.get("PATH").map(String::as_str), Some("/usr/bin"));
        for (name, value) in &merged {
            if !is_reserved(name) && name != "LANG" {
                prop_assert_eq!(env.get(name), Some(value));
            }
        }
    }
}
