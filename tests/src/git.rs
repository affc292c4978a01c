//! A real git repository in a temp directory, served as a `file://` URL,
//! whose Makefile has the targets the tests run. Commits can be added.

use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

/// The fixture's Makefile. Targets:
/// - `test`: a line on stdout, one on stderr, one on stdout; exit 0;
/// - `fail`: a line, then exit 3;
/// - `sleep`: a line, then `sleep 300`;
/// - `big`: exactly [`BIG_OUTPUT_BYTES`] on stdout ([`big_output_line`]);
/// - `env`: `env | sort`;
/// - `interleave`: [`INTERLEAVED_OUTPUT`], stdout and stderr alternating;
/// - `version`: the content of `version.txt` (changes with each commit);
/// - `concurrent`: `version.txt`, then waits until two jobs have touched a
///   file in `$E2E_SYNC_DIR`;
/// - `gate`: waits until the file `$E2E_GATE` exists;
/// - `id`: `job <HOBOTNICA_JOB_ID>`;
/// - `now`: nanoseconds since the epoch when make ran the recipe;
/// - `count`: appends `$HOBOTNICA_JOB_ID` to the file `$E2E_COUNT_FILE`;
/// - `deploy`: `deploying <git rev-parse HEAD>`; with `$E2E_DEPLOY_LOG`,
///   appends `start <job> <attempt> <ns>` and, at the end, `end ...` lines to
///   it; waits for `$E2E_GATE` when set, sleeps `$E2E_DEPLOY_SECONDS` when
///   set, prints the `P_*` variables when `$E2E_SHOW_ENV` is set; `deployed`;
/// - `penv`: the `P_*` variables, sorted (a `custom` job);
/// - `secrets`: `gate` (when `$E2E_GATE` is set), then `$E2E_SECRET` printed
///   whole (`secret-whole`), one byte per write (`secret-bytes`), in base64
///   (`secret-base64`), and each line of `$E2E_SECRET_LINES` behind a prefix
///   (`secret-lines`); `secrets done`;
/// - `secret-encodings`: `$E2E_SECRET` and `$E2E_SECRET_LINES` in base64 the
///   ways a job may print them: after `echo` (a newline), behind `user:`,
///   base64url, wrapped at 76 and 20 columns, wrapped with CRLF, unwrapped;
///   then `encodings done`.
pub const MAKEFILE: &str = r#"# Targets used by Hobotnica's end-to-end tests.
.PHONY: test fail sleep big env interleave version concurrent gate id now count deploy penv secrets secret-whole secret-bytes secret-lines secret-base64 secret-encodings

test:
	@echo "hello from stdout"
	@echo "hello from stderr" >&2
	@echo "tests passed"

fail:
	@echo "about to fail"
	@exit 3

sleep:
	@echo "sleeping"
	@sleep 300

big:
	@seq -f 'line %094.0f' 1 524288

env:
	@env | sort

interleave:
	@for i in 1 2 3 4 5; do echo "out $$i"; sleep 0.1; echo "err $$i" >&2; sleep 0.1; done

version:
	@cat version.txt

concurrent:
	@cat version.txt
	@touch "$$E2E_SYNC_DIR/job-$$HOBOTNICA_JOB_ID"
	@n=0; while [ "$$(ls "$$E2E_SYNC_DIR" | wc -l)" -lt 2 ]; do n=$$((n+1)); if [ $$n -gt 1200 ]; then echo "the other job never started" >&2; exit 7; fi; sleep 0.05; done
	@echo "both jobs running"

gate:
	@echo "waiting for the gate"
	@n=0; while [ ! -e "$$E2E_GATE" ]; do n=$$((n+1)); if [ $$n -gt 2400 ]; then echo "the gate never opened" >&2; exit 9; fi; sleep 0.05; done
	@echo "gate opened"

id:
	@echo "job $$HOBOTNICA_JOB_ID"

now:
	@date +%s%N

count:
	@echo "$$HOBOTNICA_JOB_ID" >> "$$E2E_COUNT_FILE"
	@echo "counted $$HOBOTNICA_JOB_ID"

deploy:
	@echo "deploying $$(git rev-parse HEAD)"
	@if [ -n "$$E2E_DEPLOY_LOG" ]; then echo "start $$HOBOTNICA_JOB_ID $$HOBOTNICA_ATTEMPT $$(date +%s%N)" >> "$$E2E_DEPLOY_LOG"; fi
	@if [ -n "$$E2E_GATE" ]; then echo "waiting for the gate"; n=0; while [ ! -e "$$E2E_GATE" ]; do n=$$((n+1)); if [ $$n -gt 2400 ]; then echo "the gate never opened" >&2; exit 9; fi; sleep 0.05; done; echo "gate opened"; fi
	@if [ -n "$$E2E_DEPLOY_SECONDS" ]; then sleep "$$E2E_DEPLOY_SECONDS"; fi
	@if [ -n "$$E2E_SHOW_ENV" ]; then env | grep '^P_' | sort; fi
	@if [ -n "$$E2E_DEPLOY_LOG" ]; then echo "end $$HOBOTNICA_JOB_ID $$HOBOTNICA_ATTEMPT $$(date +%s%N)" >> "$$E2E_DEPLOY_LOG"; fi
	@echo "deployed"

penv:
	@env | grep '^P_' | sort

secrets: $(if $(E2E_GATE),gate) secret-whole secret-bytes secret-base64 secret-lines
	@echo "secrets done"

secret-whole:
	@echo "whole: $$E2E_SECRET"

secret-bytes:
	@printf 'bytes: '; printf '%s\n' "$$E2E_SECRET" | fold -w1 | while read -r c; do printf '%s' "$$c"; sleep 0.01; done; echo

secret-base64:
	@printf 'base64: '; printf '%s' "$$E2E_SECRET" | base64

secret-lines:
	@printf '%s\n' "$$E2E_SECRET_LINES" | while read -r l; do echo "line: $$l"; done

secret-encodings:
	@for s in "$$E2E_SECRET" "$$E2E_SECRET_LINES"; do \
	  echo "echo:"; echo "$$s" | base64; \
	  echo "user:"; printf 'user:%s' "$$s" | base64; \
	  echo "url:"; printf '%s' "$$s" | basenc --base64url; \
	  echo "w76:"; printf '%s' "$$s" | base64 -w 76; \
	  echo "w20:"; printf '%s' "$$s" | base64 -w 20; \
	  echo "crlf:"; printf '%s' "$$s" | base64 -w 30 | sed 's/$$/\r/'; \
	  echo "w0:"; printf '%s' "$$s" | base64 -w0; echo; \
	done
	@echo "encodings done"
"#;

/// The `test` rule of [`MAKEFILE`], whole.
const TEST_RULE: &str = "test:\n\t@echo \"hello from stdout\"\n\t@echo \"hello from stderr\" >&2\n\t@echo \"tests passed\"\n";

/// [`MAKEFILE`] with the recipe of `test` replaced by `lines` (each run
/// silently, `@`; `$$` is a shell `$`), for commits whose `make test` does
/// something else: fail, print the commit it runs at, take a while.
///
/// # Panics
/// When [`MAKEFILE`] no longer has the expected `test` rule.
pub fn makefile_with_test_recipe(lines: &[&str]) -> String {
    assert!(
        MAKEFILE.contains(TEST_RULE),
        "the fixture's test rule changed"
    );
    let mut rule = "test:\n".to_owned();
    for line in lines {
        rule.push_str(&format!("\t@{line}\n"));
    }
    MAKEFILE.replacen(TEST_RULE, &rule, 1)
}

/// What `make interleave` prints, in order, stdout and stderr alternating.
pub const INTERLEAVED_OUTPUT: &str =
    "out 1\nerr 1\nout 2\nerr 2\nout 3\nerr 3\nout 4\nerr 4\nout 5\nerr 5\n";

/// Lines `make big` prints.
pub const BIG_OUTPUT_LINES: u64 = 524_288;
/// Bytes `make big` prints: 50 MiB.
pub const BIG_OUTPUT_BYTES: u64 = BIG_OUTPUT_LINES * 100;

/// Line `n` (from 1) of `make big`: 100 bytes.
pub fn big_output_line(n: u64) -> String {
    format!("line {n:094}\n")
}

/// Hex SHA-256 of the whole output of `make big`.
pub fn big_output_sha256() -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for n in 1..=BIG_OUTPUT_LINES {
        hasher.update(big_output_line(n).as_bytes());
    }
    hex::encode(hasher.finalize())
}

/// A git repository fixture on branch `main`.
pub struct GitRepo {
    path: PathBuf,
    _dir: TempDir,
}

impl GitRepo {
    /// A repository with the Makefile and `version.txt` = `version 1`,
    /// committed on `main`.
    pub fn new() -> GitRepo {
        let dir = tempfile::Builder::new()
            .prefix("hobotnica-repo-")
            .tempdir()
            .expect("temp dir");
        let path = dir.path().join("repo");
        std::fs::create_dir(&path).expect("repo dir");
        let repo = GitRepo { path, _dir: dir };
        repo.git(&["init", "--quiet", "--initial-branch=main"]);
        repo.commit(
            &[("Makefile", MAKEFILE), ("version.txt", "version 1\n")],
            "initial commit",
        );
        repo
    }

    /// The repository's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `file://<path>`.
    pub fn url(&self) -> String {
        format!("file://{}", self.path.display())
    }

    /// Writes `files`, commits them on the current branch, returns the sha.
    pub fn commit(&self, files: &[(&str, &str)], message: &str) -> String {
        for (name, content) in files {
            let file = self.path.join(name);
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent).expect("directory in repo");
            }
            std::fs::write(&file, content).expect("write file in repo");
            self.git(&["add", "--", name]);
        }
        self.git(&["commit", "--quiet", "--allow-empty", "-m", message]);
        self.head()
    }

    /// Commits a new `version.txt` = `version <label>`; returns the sha.
    pub fn commit_version(&self, label: &str) -> String {
        self.commit(
            &[("version.txt", &format!("version {label}\n"))],
            &format!("version {label}"),
        )
    }

    /// The sha of `HEAD`.
    pub fn head(&self) -> String {
        self.rev_parse("HEAD")
    }

    /// The sha `rev` names.
    pub fn rev_parse(&self, rev: &str) -> String {
        self.git(&["rev-parse", "--verify", rev]).trim().to_owned()
    }

    /// Creates branch `name` at `HEAD` and switches to it.
    pub fn create_branch(&self, name: &str) {
        self.git(&["switch", "--quiet", "-c", name]);
    }

    /// Switches to an existing branch.
    pub fn switch(&self, name: &str) {
        self.git(&["switch", "--quiet", name]);
    }

    /// Runs git in the repository, returning stdout.
    ///
    /// # Panics
    /// When git fails.
    pub fn git(&self, args: &[&str]) -> String {
        let output = Command::new("git")
            .args([
                "-c",
                "user.name=Hobotnica Tests",
                "-c",
                "user.email=tests@hobotnica.invalid",
                "-c",
                "commit.gpgsign=false",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(&self.path)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .output()
            .expect("run git");
        assert!(
            output.status.success(),
            "git {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("git output is UTF-8")
    }
}

impl Default for GitRepo {
    fn default() -> Self {
        GitRepo::new()
    }
}
