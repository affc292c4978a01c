//! Looking at processes through `/proc`: which ones carry a marker in their
//! environment or run inside a directory, their peak memory, and signals.

use std::path::Path;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn all_pids() -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Processes (of this user) whose environment holds exactly `entry`
/// (`NAME=value`).
pub fn processes_with_env(entry: &str) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|environ| {
                environ
                    .split(|b| *b == 0)
                    .any(|var| var == entry.as_bytes())
            })
        })
        .collect()
}

/// Processes (of this user) whose working directory is `dir` or below it.
pub fn processes_in_dir(dir: &Path) -> Vec<i32> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    all_pids()
        .into_iter()
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(&dir))
        })
        .filter(|pid| *pid != i32::try_from(std::process::id()).unwrap_or(-1))
        .collect()
}

/// Sends `signal` to each process, ignoring those already gone.
pub fn signal_all(pids: &[i32], signal: Signal) {
    for pid in pids {
        let _ = kill(Pid::from_raw(*pid), signal);
    }
}

/// Sends `signal` to one process.
pub fn send(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

/// Peak resident memory (`VmHWM`) of a process, in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

/// Resident memory now (`VmRSS`) of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// A `<field> <n> kB` line of `/proc/<pid>/status`.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU time a process has used so far (user + system), from
/// `/proc/<pid>/stat`, which counts in `USER_HZ` ticks: 100 a second on
/// Linux whatever the kernel's own tick rate.
pub fn cpu_time(pid: u32) -> Option<std::time::Duration> {
    // utime and stime are fields 14 and 15.
    stat_ticks(pid, 14)
}

/// The processes whose parent is `pid` (e.g. a PostgreSQL server's
/// backends).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    // Field 4, the parent, two after the command's `)`.
                    let rest = &stat[stat.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// CPU time (user + system) of the children a process has waited for,
/// each with its own waited-for children: of an agent, every `git`,
/// sandbox and `make` of the jobs it ran.
pub fn children_cpu_time(pid: u32) -> Option<std::time::Duration> {
    // cutime and cstime are fields 16 and 17.
    stat_ticks(pid, 16)
}

/// The sum of fields `first` and `first + 1` of `/proc/<pid>/stat`, which
/// count in `USER_HZ` ticks: 100 a second on Linux whatever the kernel's
/// own tick rate.
fn stat_ticks(pid: u32, first: usize) -> Option<std::time::Duration> {
    const USER_HZ: u64 = 100;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count after its `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3.
    let a: u64 = fields.get(first - 3)?.parse().ok()?;
    let b: u64 = fields.get(first - 2)?.parse().ok()?;
    Some(std::time::Duration::from_millis((a + b) * 1000 / USER_HZ))
}

/// CPU time every CPU of the machine has spent busy since boot (user,
/// nice, system, irq, softirq, steal: `/proc/stat`'s first line), and how
/// many CPUs that counts.
pub fn machine_busy_time() -> Option<(std::time::Duration, usize)> {
    const USER_HZ: u64 = 100;
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpus = stat
        .lines()
        .filter(|line| line.starts_with("cpu") && !line.starts_with("cpu "))
        .count();
    let total = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = total
        .split_whitespace()
        .map(|field| field.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: u64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|index| ticks.get(*index))
        .sum();
    Some((
        std::time::Duration::from_millis(busy * 1000 / USER_HZ),
        cpus,
    ))
}
