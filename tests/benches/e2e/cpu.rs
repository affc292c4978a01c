//! Where the CPU goes during a run: each process's own CPU time (from
//! `/proc/<pid>/stat`), the agents' jobs (every `git`, sandbox and `make`
//! they ran), this process (the bench's clients), and the machine's busy
//! time, so that "other" is what nothing here ran. Divided by the jobs
//! run, and beside the CPU the same work costs without Hobotnica: on a
//! machine with few cores, a throughput figure is CPU per job, and this
//! says whose.
//!
//! A sandboxed job's processes live in a pid namespace of their own, whose
//! CPU time never reaches the agent's children count, so the agents are
//! put in a CPU accounting cgroup (v1 `cpuacct`, or v2) when one is
//! writable here (as root), and their jobs' share is the group's usage
//! less the agents' own. Without one, it is part of "other".

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use hobotnica_tests::procs::{children_cpu_time, cpu_time, machine_busy_time};

/// Runs of the floor measurement.
const FLOOR_RUNS: usize = 40;

enum Source {
    Own(u32),
    /// Every process in the group, less these processes' own time.
    Group(CpuGroup, Vec<u32>),
}

impl Source {
    fn read(&self) -> Duration {
        match self {
            Source::Own(pid) => cpu_time(*pid).unwrap_or_default(),
            Source::Group(group, own) => group.usage().saturating_sub(
                own.iter()
                    .filter_map(|pid| cpu_time(*pid))
                    .sum::<Duration>(),
            ),
        }
    }
}

/// A CPU accounting cgroup made for one run: processes put in it, and all
/// they start, are counted, whatever namespaces they enter.
struct CpuGroup {
    dir: PathBuf,
    /// cgroup v2: `cpu.stat`'s `usage_usec`; v1: `cpuacct.usage` (ns).
    v2: bool,
}

impl CpuGroup {
    fn create() -> Option<CpuGroup> {
        let name = format!("hobotnica-bench-{}", std::process::id());
        let v1 = Path::new("/sys/fs/cgroup/cpuacct");
        let (parent, v2) = if v1.join("cpuacct.usage").exists() {
            (v1.to_owned(), false)
        } else if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            (PathBuf::from("/sys/fs/cgroup"), true)
        } else {
            return None;
        };
        let dir = parent.join(name);
        std::fs::create_dir(&dir).ok()?;
        Some(CpuGroup { dir, v2 })
    }

    fn add(&self, pid: u32) -> bool {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).is_ok()
    }

    fn usage(&self) -> Duration {
        if self.v2 {
            let stat = std::fs::read_to_string(self.dir.join("cpu.stat")).unwrap_or_default();
            let usec = stat
                .lines()
                .find_map(|line| line.strip_prefix("usage_usec "))
                .and_then(|value| value.trim().parse().ok())
                .unwrap_or(0);
            Duration::from_micros(usec)
        } else {
            let ns = std::fs::read_to_string(self.dir.join("cpuacct.usage"))
                .ok()
                .and_then(|text| text.trim().parse().ok())
                .unwrap_or(0);
            Duration::from_nanos(ns)
        }
    }
}

impl Drop for CpuGroup {
    fn drop(&mut self) {
        // Processes still running go back to the parent group, so that
        // this one can be removed.
        let parent_procs = self.dir.with_file_name("cgroup.procs");
        let procs = std::fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines() {
            let _ = std::fs::write(&parent_procs, pid);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// CPU readings taken at [`CpuMeter::start`], compared at
/// [`CpuMeter::report`].
pub struct CpuMeter {
    /// `(part, source, reading at start)`: parts may repeat (two
    /// controllers are one part).
    sources: Vec<(&'static str, Source, Duration)>,
    machine: Option<(Duration, usize)>,
}

impl CpuMeter {
    pub fn new() -> CpuMeter {
        CpuMeter {
            sources: vec![(
                "this process (clients)",
                Source::Own(std::process::id()),
                Duration::ZERO,
            )],
            machine: None,
        }
    }

    /// Counts process `pid`'s own CPU time as `part`.
    pub fn process(&mut self, part: &'static str, pid: Option<u32>) {
        if let Some(pid) = pid {
            self.sources.push((part, Source::Own(pid), Duration::ZERO));
        }
    }

    /// Counts the CPU time of every process `pids` start (not their own)
    /// as `part`, when a CPU accounting cgroup can be made here; otherwise
    /// says so, and that time is part of "other".
    pub fn descendants(&mut self, part: &'static str, pids: &[Option<u32>]) {
        let pids: Vec<u32> = pids.iter().flatten().copied().collect();
        let group = CpuGroup::create();
        match group {
            Some(group) if pids.iter().all(|pid| group.add(*pid)) => {
                self.sources
                    .push((part, Source::Group(group, pids), Duration::ZERO));
            }
            _ => println!(
                "cpu: {part}: not counted apart (no CPU accounting cgroup writable here); in \"other\""
            ),
        }
    }

    pub fn start(&mut self) {
        for (_, source, at_start) in &mut self.sources {
            *at_start = source.read();
        }
        self.machine = machine_busy_time();
    }

    /// Prints the CPU each part used since [`CpuMeter::start`], per job of
    /// `jobs`, over `wall` seconds; with `floor_ms`, the CPU the same work
    /// costs without Hobotnica and the throughput each would allow.
    pub fn report(&self, title: &str, jobs: usize, wall: f64, floor_ms: Option<f64>) {
        let per_job = |cpu: Duration| cpu.as_secs_f64() * 1e3 / jobs as f64;
        let mut parts: Vec<(&str, Duration)> = Vec::new();
        for (part, source, at_start) in &self.sources {
            let used = source.read().saturating_sub(*at_start);
            match parts.iter_mut().find(|(name, _)| name == part) {
                Some((_, sum)) => *sum += used,
                None => parts.push((part, used)),
            }
        }
        let counted: Duration = parts.iter().map(|(_, used)| *used).sum();
        let Some(((busy, cpus), (busy_before, _))) = machine_busy_time().zip(self.machine) else {
            println!("cpu ({title}): /proc/stat unreadable");
            return;
        };
        let busy = busy.saturating_sub(busy_before);
        println!(
            "cpu ({title}): the machine was busy {:.2}s of {:.2}s ({cpus} CPUs x {wall:.2}s, {:.0} %); per job:",
            busy.as_secs_f64(),
            wall * cpus as f64,
            busy.as_secs_f64() * 100.0 / (wall * cpus as f64),
        );
        for (part, used) in &parts {
            println!("    {part:<44} {:>6.2} ms", per_job(*used));
        }
        println!(
            "    {:<44} {:>6.2} ms",
            "other (nothing of this run)",
            per_job(busy.saturating_sub(counted))
        );
        let total = per_job(busy);
        let ceiling = cpus as f64 * 1e3 / total;
        println!(
            "    {:<44} {total:>6.2} ms: at this CPU per job, {cpus} CPUs run at most {ceiling:.0} jobs/s",
            "machine busy"
        );
        if let Some(floor) = floor_ms {
            println!(
                "    floor: git worktree add + make + remove, no Hobotnica {floor:>6.2} ms ({:.0} jobs/s on {cpus} CPUs); x{:.1}",
                cpus as f64 * 1e3 / floor,
                total / floor
            );
        }
    }
}

/// CPU milliseconds (median of [`FLOOR_RUNS`]) of the work of one trivial
/// job without Hobotnica: `git worktree add` of `commit` in a clone of
/// `origin`, `make now` in it, `git worktree remove`. Counted as this
/// process's waited-for children. Blocking.
#[allow(clippy::disallowed_methods)]
pub fn floor_cpu_ms(origin: &Path, commit: &str, scratch: &Path) -> f64 {
    let run = |program: &str, args: &[&str], cwd: &Path| {
        let status = Command::new(program)
            .args(args)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .unwrap_or_else(|error| panic!("{program} {args:?}: {error}"));
        assert!(status.success(), "{program} {args:?}: {status}");
    };
    let clone = scratch.join("cpu-floor");
    let clone_str = clone.to_str().unwrap();
    run(
        "git",
        &["clone", "--quiet", origin.to_str().unwrap(), clone_str],
        scratch,
    );
    let me = std::process::id();
    // Ticks are 10 ms: time all runs together, then divide.
    let before = children_cpu_time(me).unwrap_or_default();
    for n in 0..FLOOR_RUNS {
        let tree = scratch.join(format!("cpu-floor-tree-{n}"));
        let tree_str = tree.to_str().unwrap();
        run(
            "git",
            &["worktree", "add", "--quiet", "--detach", tree_str, commit],
            &clone,
        );
        run("make", &["now"], &tree);
        run("git", &["worktree", "remove", "--force", tree_str], &clone);
    }
    let used = children_cpu_time(me)
        .unwrap_or_default()
        .saturating_sub(before);
    used.as_secs_f64() * 1e3 / FLOOR_RUNS as f64
}
