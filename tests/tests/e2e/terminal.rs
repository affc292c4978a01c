//! A job's output on the operator's terminal: `hobot logs` on a real
//! pseudo-terminal (util-linux `script`) keeps colours and drops what would
//! take over the terminal (an OSC 52 clipboard write, a title change, a
//! screen clear); `--raw` passes everything, and a pipe gets the log byte
//! for byte.

use super::*;

/// `make test` prints a colour, a clipboard write, a title change and a
/// screen clear, each followed by a word.
const HOSTILE_RECIPE: &[&str] = &[
    r"printf '\033[31mred\033[0m\n'",
    r"printf '\033]52;c;cHduZWQ=\007clip\n'",
    r"printf '\033]0;pwned-title\033\\title\n'",
    r"printf '\033[2Jcleared\n'",
];

const COLOUR: &str = "\x1b[31mred\x1b[0m";
const CLIPBOARD: &str = "\x1b]52;c;cHduZWQ=\x07";
const TITLE: &str = "\x1b]0;pwned-title\x1b\\";
const CLEAR: &str = "\x1b[2J";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hobot_logs_on_a_terminal_keeps_colours_and_drops_other_escapes() {
    let s = setup().await;
    let hostile = s.repo.commit(
        &[(
            "Makefile",
            &hobotnica_tests::git::makefile_with_test_recipe(HOSTILE_RECIPE),
        )],
        "a pull request that prints escape sequences",
    );
    let job = s
        .api
        .run_job(REPO, json!({ "target": "test", "commit": hostile }))
        .await;
    s.api.wait_for_success(job.id, JOB_TIMEOUT).await;
    let log = text(&s.api.log(job.id).await);
    for sequence in [COLOUR, CLIPBOARD, TITLE, CLEAR] {
        assert!(
            log.contains(sequence),
            "the job printed {sequence:?}: {log:?}"
        );
    }
    let cwd = tempfile::tempdir().unwrap();
    let id = job.id.to_string();

    // On a terminal: the colour arrives, the rest does not; the words do.
    let shown = on_terminal(&s.controller, cwd.path(), &["logs", id.as_str()]).await;
    assert!(shown.contains(COLOUR), "colours are kept: {shown:?}");
    for word in ["red", "clip", "title", "cleared"] {
        assert!(shown.contains(word), "{word:?} is shown: {shown:?}");
    }
    for sequence in ["\x1b]", "pwned-title", CLEAR] {
        assert!(
            !shown.contains(sequence),
            "{sequence:?} reached the terminal: {shown:?}"
        );
    }

    // `--raw`: everything, as the job printed it.
    let shown = on_terminal(&s.controller, cwd.path(), &["logs", "--raw", id.as_str()]).await;
    for sequence in [COLOUR, CLIPBOARD, TITLE, CLEAR] {
        assert!(
            shown.contains(sequence),
            "--raw passes {sequence:?}: {shown:?}"
        );
    }

    // Not a terminal: the log byte for byte.
    let out = cli::run(Some(&s.controller), cwd.path(), &["logs", &id]).await;
    assert_eq!(out.code(), Some(0), "{out:#?}");
    assert_eq!(text(&out.stdout), log);
}

/// What `hobot <args>` shows on a pseudo-terminal (it must succeed).
async fn on_terminal(controller: &Controller, cwd: &std::path::Path, args: &[&str]) -> String {
    let child = cli::in_terminal(Some(controller), cwd, args)
        .spawn()
        .unwrap();
    cli::finish(child, args).await.success()
}
