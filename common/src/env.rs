//! The environment a job's `make` runs with.
//!
//! Precedence, low to high:
//! 1. a minimal base taken from the agent's own environment ([`BASE_VARS`]
//!    only: nothing else of the agent's, so never its token, its
//!    `HOBOTNICA_*` configuration, proxies or `VIRTUAL_ENV`);
//! 2. CI variables (`CI=true`, `HOBOTNICA_JOB_ID`, ...);
//! 3. the job's variables: repository env, then kind env, then one-time env,
//!    merged by the controller with [`merge_layers`].
//!
//! Job variables may not replace the reserved names ([`is_reserved`]); the
//! controller refuses them and the agent drops them should one slip through.

use std::collections::BTreeMap;

/// Variables passed from the agent's environment to every job.
pub const BASE_VARS: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR",
    "TERM",
];

/// What the CI variables are made of.
#[derive(Debug, Clone)]
pub struct CiVars<'a> {
    pub job_id: u64,
    pub attempt: u32,
    pub repo: &'a str,
    pub commit: &'a str,
    pub branch: &'a str,
    pub target: &'a str,
    pub kind: &'a str,
}

/// Whether a job variable may not set `name`.
pub fn is_reserved(name: &str) -> bool {
    matches!(name, "PATH" | "HOME" | "CI" | "HOBOTNICA") || name.starts_with("HOBOTNICA_")
}

/// Why a reserved name is refused, in the words of every refusal.
pub const RESERVED_NAMES: &str =
    "PATH, HOME, CI, HOBOTNICA and HOBOTNICA_* are set by Hobotnica and cannot be overridden";

/// Later layers win.
pub fn merge_layers<'a>(
    layers: impl IntoIterator<Item = &'a BTreeMap<String, String>>,
) -> BTreeMap<String, String> {
    let mut merged = BTreeMap::new();
    for layer in layers {
        merged.extend(layer.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    merged
}

/// The complete environment of a job's process.
pub fn compose(
    agent_env: impl IntoIterator<Item = (String, String)>,
    ci: &CiVars<'_>,
    job_env: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = agent_env
        .into_iter()
        .filter(|(name, _)| BASE_VARS.contains(&name.as_str()))
        .collect();
    env.entry("PATH".to_owned())
        .or_insert_with(|| "/usr/local/bin:/usr/bin:/bin".to_owned());
    env.entry("LANG".to_owned())
        .or_insert_with(|| "C.UTF-8".to_owned());
    let ci_vars = [
        ("CI", "true".to_owned()),
        ("HOBOTNICA", "true".to_owned()),
        ("HOBOTNICA_JOB_ID", ci.job_id.to_string()),
        ("HOBOTNICA_ATTEMPT", ci.attempt.to_string()),
        ("HOBOTNICA_REPO", ci.repo.to_owned()),
        ("HOBOTNICA_COMMIT", ci.commit.to_owned()),
        ("HOBOTNICA_BRANCH", ci.branch.to_owned()),
        ("HOBOTNICA_TARGET", ci.target.to_owned()),
        ("HOBOTNICA_JOB_KIND", ci.kind.to_owned()),
    ];
    env.extend(ci_vars.into_iter().map(|(k, v)| (k.to_owned(), v)));
    env.extend(
        job_env
            .iter()
            .filter(|(name, _)| !is_reserved(name))
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ci() -> CiVars<'static> {
        CiVars {
            job_id: 7,
            attempt: 1,
            repo: "local/demo",
            commit: "0123456789abcdef0123456789abcdef01234567",
            branch: "main",
            target: "test",
            kind: "test",
        }
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn agent_variables_other_than_the_base_are_not_inherited() {
        let agent_env = map(&[
            ("PATH", "/agent/bin"),
            ("HOME", "/home/agent"),
            ("HOBOTNICA_TOKEN", "hunter2"),
            ("HOBOTNICA_CONTROLLER", "http://x"),
            ("VIRTUAL_ENV", "/venv"),
            ("HTTPS_PROXY", "http://proxy"),
            ("AWS_SECRET_ACCESS_KEY", "x"),
        ]);
        let env = compose(agent_env, &ci(), &BTreeMap::new());
        assert_eq!(env["PATH"], "/agent/bin");
        assert_eq!(env["HOME"], "/home/agent");
        for absent in [
            "HOBOTNICA_TOKEN",
            "HOBOTNICA_CONTROLLER",
            "VIRTUAL_ENV",
            "HTTPS_PROXY",
            "AWS_SECRET_ACCESS_KEY",
        ] {
            assert!(!env.contains_key(absent), "{absent} leaked");
        }
    }

    #[test]
    fn precedence() {
        let repo = map(&[("A", "repo"), ("B", "repo"), ("C", "repo")]);
        let kind = map(&[("B", "kind"), ("C", "kind")]);
        let once = map(&[("C", "once"), ("CI", "false"), ("HOBOTNICA_JOB_ID", "1")]);
        let job_env = merge_layers([&repo, &kind, &once]);
        let env = compose(map(&[("PATH", "/bin")]), &ci(), &job_env);
        assert_eq!(env["A"], "repo");
        assert_eq!(env["B"], "kind");
        assert_eq!(env["C"], "once");
        assert_eq!(env["CI"], "true", "reserved names cannot be overridden");
        assert_eq!(env["HOBOTNICA_JOB_ID"], "7");
        assert_eq!(env["HOBOTNICA_COMMIT"], ci().commit);
        assert_eq!(env["HOBOTNICA_BRANCH"], "main");
        assert_eq!(env["HOBOTNICA_TARGET"], "test");
        assert_eq!(env["HOBOTNICA_REPO"], "local/demo");
    }

    #[test]
    fn a_missing_path_gets_a_default() {
        let env = compose(Vec::new(), &ci(), &BTreeMap::new());
        assert!(env["PATH"].contains("/usr/bin"));
    }
}
