//! Where a job's time goes: the p50/p95 of each gap between the phase
//! readings of many jobs (the client's trigger, the job's `timings`, the
//! recipe's own clock reading, the poller seeing it finished), printed
//! beside the machine's floor for the same work measured in this process
//! without Hobotnica: `make now` into a pipe, `git worktree add` + `make`
//! in a fresh clone, a `git fetch` with nothing new, a `git cat-file -e`,
//! a `git ls-remote` of the branch (what a trigger naming a branch runs).
//! Absolute times drift with the machine's load; the ratios to the floor
//! are what compare across runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use hobotnica_tests::{Api, Job};

use super::{JOB_TIMEOUT, now_ns, percentile, rfc3339_ns};

/// The phases of a job in the order they happen; a job's reading of each
/// is its end.
const PHASES: [&str; 15] = [
    "trigger",
    "accepted",
    "assigned",
    "sent",
    "received",
    "fetched",
    "work tree",
    "sandbox",
    "spawned",
    "recipe runs",
    "exited",
    "last byte acked",
    "completion sent",
    "recorded",
    "visible",
];

/// How often [`wait_visible`] asks whether a job has finished: short, so
/// that "recorded -> visible" says what the API adds rather than the
/// poller's interval (it still includes up to this much).
const VISIBLE_POLL_INTERVAL: Duration = Duration::from_millis(2);

/// Runs of each floor measurement.
const FLOOR_RUNS: usize = 30;

/// One job's readings, in nanoseconds since the Unix epoch.
pub struct Sample {
    /// `[PHASES[i]]`: `None` when the job has no such reading.
    at: [Option<i128>; PHASES.len()],
    fetch_ran: Option<bool>,
}

impl Sample {
    /// The readings of `job`, triggered at `trigger_ns`; `recipe_ns` is what
    /// the `now` recipe printed, `visible_ns` when a poller saw it finished.
    pub fn new(
        trigger_ns: i128,
        job: &Job,
        recipe_ns: Option<i128>,
        visible_ns: Option<i128>,
    ) -> Sample {
        let mut at = [None; PHASES.len()];
        at[0] = Some(trigger_ns);
        let ns = |time: chrono::DateTime<chrono::Utc>| time.timestamp_nanos_opt().map(i128::from);
        if let Some(timings) = &job.timings {
            // `phases()` is accepted .. recorded, without the recipe.
            for (slot, (_, time)) in (1..).zip(timings.phases()) {
                let slot = if slot >= 9 { slot + 1 } else { slot };
                at[slot] = time.and_then(ns);
            }
        } else {
            at[1] = rfc3339_ns(&job.created_at);
            at[2] = job.started_at.as_deref().and_then(rfc3339_ns);
            at[13] = job.finished_at.as_deref().and_then(rfc3339_ns);
        }
        at[9] = recipe_ns;
        at[14] = visible_ns;
        Sample {
            at,
            fetch_ran: job.timings.as_ref().and_then(|timings| timings.fetch_ran),
        }
    }
}

/// Waits until job `id` has ended, asking every [`VISIBLE_POLL_INTERVAL`];
/// returns it and when it was first seen ended.
pub async fn wait_visible(api: &Api, id: u64) -> (Job, i128) {
    let deadline = tokio::time::Instant::now() + JOB_TIMEOUT;
    loop {
        let job = api.job(id).await;
        if job.state.is_terminal() {
            return (job, now_ns());
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {id} did not end within {JOB_TIMEOUT:?}"
        );
        tokio::time::sleep(VISIBLE_POLL_INTERVAL).await;
    }
}

/// The same work without Hobotnica, measured here: milliseconds of each
/// run.
pub struct Floors {
    /// `make now` into a pipe: spawned -> the recipe's reading.
    make_to_recipe: Vec<f64>,
    /// `make now` into a pipe: spawned -> exited.
    make_to_exit: Vec<f64>,
    /// `git worktree add --detach` of the commit in a fresh clone.
    worktree_add: Vec<f64>,
    /// `git worktree add` then `make now` in it: start -> the recipe's reading.
    worktree_make_to_recipe: Vec<f64>,
    /// The same, start -> make exited.
    worktree_make_to_exit: Vec<f64>,
    /// `git fetch` with nothing new.
    fetch_noop: Vec<f64>,
    /// `git cat-file -e <commit>^{commit}`: one git process that finds
    /// the commit cached.
    cat_file: Vec<f64>,
    /// `git ls-remote` of the default branch: what the controller runs
    /// to resolve a trigger that names no commit.
    ls_remote: Vec<f64>,
}

fn ms(from_ns: i128, to_ns: i128) -> f64 {
    (to_ns - from_ns) as f64 / 1e6
}

#[allow(clippy::disallowed_methods)]
fn run(program: &str, args: &[&str], cwd: &Path) -> Output {
    let output = Command::new(program)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("{program} {args:?}: {error}"));
    assert!(
        output.status.success(),
        "{program} {args:?} in {}: {}",
        cwd.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The recipe's reading in `make now`'s output.
fn recipe_ns(output: &Output) -> i128 {
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("make now prints the time in nanoseconds")
}

impl Floors {
    /// Measures every floor in `scratch` against the repository at `origin`
    /// (a fresh clone of it is made first). Blocking: run it off the
    /// runtime's workers.
    pub fn measure(origin: &Path, commit: &str, scratch: &Path) -> Floors {
        let clone = scratch.join("clone");
        let clone_str = clone.to_str().unwrap();
        run(
            "git",
            &["clone", "--quiet", origin.to_str().unwrap(), clone_str],
            scratch,
        );
        let mut floors = Floors {
            make_to_recipe: Vec::new(),
            make_to_exit: Vec::new(),
            worktree_add: Vec::new(),
            worktree_make_to_recipe: Vec::new(),
            worktree_make_to_exit: Vec::new(),
            fetch_noop: Vec::new(),
            cat_file: Vec::new(),
            ls_remote: Vec::new(),
        };
        let object = format!("{commit}^{{commit}}");
        for n in 0..FLOOR_RUNS {
            let start = now_ns();
            let output = run("make", &["now"], &clone);
            let exited = now_ns();
            floors.make_to_recipe.push(ms(start, recipe_ns(&output)));
            floors.make_to_exit.push(ms(start, exited));

            let tree: PathBuf = scratch.join(format!("tree-{n}"));
            let tree_str = tree.to_str().unwrap();
            let start = now_ns();
            run(
                "git",
                &["worktree", "add", "--quiet", "--detach", tree_str, commit],
                &clone,
            );
            let added = now_ns();
            let output = run("make", &["now"], &tree);
            let exited = now_ns();
            floors.worktree_add.push(ms(start, added));
            floors
                .worktree_make_to_recipe
                .push(ms(start, recipe_ns(&output)));
            floors.worktree_make_to_exit.push(ms(start, exited));
            run("git", &["worktree", "remove", "--force", tree_str], &clone);

            let start = now_ns();
            run("git", &["fetch", "--quiet", "origin"], &clone);
            floors.fetch_noop.push(ms(start, now_ns()));

            let start = now_ns();
            run("git", &["cat-file", "-e", &object], &clone);
            floors.cat_file.push(ms(start, now_ns()));

            let start = now_ns();
            run(
                "git",
                &["ls-remote", "--exit-code", "origin", "refs/heads/main"],
                &clone,
            );
            floors.ls_remote.push(ms(start, now_ns()));
        }
        for runs in [
            &mut floors.make_to_recipe,
            &mut floors.make_to_exit,
            &mut floors.worktree_add,
            &mut floors.worktree_make_to_recipe,
            &mut floors.worktree_make_to_exit,
            &mut floors.fetch_noop,
            &mut floors.cat_file,
            &mut floors.ls_remote,
        ] {
            runs.sort_by(f64::total_cmp);
        }
        floors
    }

    /// The floor of the gap `from -> to`, with what it measures.
    fn of(&self, from: &str, to: &str, fetch_ran: bool) -> Option<(&'static str, &[f64])> {
        Some(match (from, to) {
            ("trigger", "accepted") => ("git ls-remote of the branch", &self.ls_remote),
            ("received", "fetched") if fetch_ran => ("git fetch, nothing new", &self.fetch_noop),
            ("received", "fetched") => ("git cat-file -e", &self.cat_file),
            ("fetched", "work tree") => ("git worktree add", &self.worktree_add),
            ("spawned", "recipe runs") => ("make into a pipe, to the recipe", &self.make_to_recipe),
            ("spawned", "exited") => ("make into a pipe, to its exit", &self.make_to_exit),
            ("trigger" | "received", "recipe runs") => (
                "git worktree add + make, to the recipe",
                &self.worktree_make_to_recipe,
            ),
            ("trigger" | "received", "exited" | "recorded" | "visible") => (
                "git worktree add + make, to its exit",
                &self.worktree_make_to_exit,
            ),
            _ => return None,
        })
    }

    fn print(&self) {
        println!("  floors ({FLOOR_RUNS} runs each, this process, no Hobotnica):");
        for (name, runs) in [
            ("make now into a pipe, to the recipe", &self.make_to_recipe),
            ("make now into a pipe, to its exit", &self.make_to_exit),
            ("git worktree add (fresh clone)", &self.worktree_add),
            (
                "git worktree add + make now, to the recipe",
                &self.worktree_make_to_recipe,
            ),
            (
                "git worktree add + make now, to its exit",
                &self.worktree_make_to_exit,
            ),
            ("git fetch, nothing new", &self.fetch_noop),
            ("git cat-file -e", &self.cat_file),
            ("git ls-remote of the branch", &self.ls_remote),
        ] {
            println!(
                "    {name:<44} p50 {:>7.2} ms  p95 {:>7.2} ms",
                percentile(runs, 50.0),
                percentile(runs, 95.0)
            );
        }
    }
}

/// Prints, for `samples`, the p50/p95 of each gap between consecutive
/// readings (a missing reading joins its neighbours into one gap), then
/// the totals, each with its floor and the ratio of the p50s.
pub fn report(title: &str, samples: &[Sample], floors: Option<&Floors>) {
    let fetches = samples
        .iter()
        .filter(|sample| sample.fetch_ran == Some(true))
        .count();
    let fetch_ran = fetches * 2 > samples.len();
    println!(
        "breakdown ({title}): {} jobs, git fetch ran in {fetches}; gap p50 / p95, floor p50, ratio p50/floor",
        samples.len()
    );
    let mut gaps: BTreeMap<(usize, usize), Vec<f64>> = BTreeMap::new();
    for sample in samples {
        let mut previous: Option<(usize, i128)> = None;
        for (index, at) in sample.at.iter().enumerate() {
            let Some(at) = *at else { continue };
            if let Some((from, from_at)) = previous {
                gaps.entry((from, index)).or_default().push(ms(from_at, at));
            }
            previous = Some((index, at));
        }
    }
    for ((from, to), values) in gaps {
        print_line(PHASES[from], PHASES[to], values, floors, fetch_ran);
    }
    println!("  totals:");
    let total = |from: usize, to: usize| -> Vec<f64> {
        samples
            .iter()
            .filter_map(|sample| Some(ms(sample.at[from]?, sample.at[to]?)))
            .collect()
    };
    for (from, to) in [(0, 9), (0, 13), (0, 14), (4, 9), (4, 10)] {
        let values = total(from, to);
        if !values.is_empty() {
            print_line(PHASES[from], PHASES[to], values, floors, fetch_ran);
        }
    }
    if let Some(floors) = floors {
        floors.print();
    }
}

fn print_line(
    from: &str,
    to: &str,
    mut values: Vec<f64>,
    floors: Option<&Floors>,
    fetch_ran: bool,
) {
    values.sort_by(f64::total_cmp);
    let p50 = percentile(&values, 50.0);
    let gap = format!("{from} -> {to}");
    let floor = floors
        .and_then(|floors| floors.of(from, to, fetch_ran))
        .map(|(name, runs)| {
            let floor = percentile(runs, 50.0);
            format!("  floor {floor:>6.2} ms  x{:<5.1} ({name})", p50 / floor)
        })
        .unwrap_or_default();
    println!(
        "    {gap:<34} {p50:>7.2} / {:>7.2} ms  (n={}){floor}",
        percentile(&values, 95.0),
        values.len()
    );
}
