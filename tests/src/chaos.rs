//! The fault-injection suite's engine: a cluster of real processes (a
//! controller on the embedded store, or two on one Redis; several agents,
//! each reaching every controller through a [`Proxy`]), a seeded workload
//! of jobs and deploys with deterministic output, and a seeded schedule of
//! faults (SIGKILL and SIGTERM of controllers and agents, also in the middle
//! of a log stream and just after `make` exits; Redis restarts; connections
//! cut, blackholed and slowed). Once the faults stop and everything is back,
//! the invariants are checked:
//!
//! - every job reaches a final state within [`SETTLE_TIMEOUT`];
//! - no job runs `make` to the end twice (a lost job retried is a new job);
//! - every succeeded job's log is byte-exact, and no job failed;
//! - a job whose cancel was accepted never succeeds nor runs to the end;
//! - no process of any job is left once every job is over;
//! - every controller answers and `/readyz` is green.
//!
//! The seed decides the workload and the faults (kind, target, timing); the
//! processes' own timing is not seeded, so a failing seed reproduces the
//! same schedule, which is usually enough to hit the same bug again.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::agent::{Agent, AgentOpts};
use crate::api::{Api, Job, RawResponse};
use crate::controller::{Controller, ControllerOpts};
use crate::git::GitRepo;
use crate::procs::processes_with_env;
use crate::proxy::{Link, Proxy};
use crate::redis::RedisServer;
use crate::{JobState, wait};

/// What a chaos run is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// One controller on the embedded store, several agents.
    Embedded,
    /// Two controllers on one Redis, several agents reaching both.
    Redis,
}

/// One run: a topology, a seed, how long faults are injected and how many
/// jobs are submitted meanwhile.
#[derive(Clone, Debug)]
pub struct Settings {
    pub topology: Topology,
    pub seed: u64,
    pub fault_phase: Duration,
    pub jobs: usize,
}

/// Variables that change the runs (for soaks): `HOBOTNICA_CHAOS_SEEDS`
/// (comma-separated), `HOBOTNICA_CHAOS_SECONDS` (fault phase),
/// `HOBOTNICA_CHAOS_JOBS`.
impl Settings {
    /// CI's fixed settings for `topology`, or those the environment asks for.
    ///
    /// # Panics
    /// On a variable that does not parse.
    pub fn from_env(topology: Topology, default_seed: u64) -> Vec<Settings> {
        let seeds: Vec<u64> = match std::env::var("HOBOTNICA_CHAOS_SEEDS") {
            Ok(seeds) => seeds
                .split(',')
                .map(|seed| {
                    seed.trim().parse().unwrap_or_else(|_| {
                        panic!("HOBOTNICA_CHAOS_SEEDS: {seed:?} is not a number")
                    })
                })
                .collect(),
            Err(_) => vec![default_seed],
        };
        let number = |name: &str, default: u64| match std::env::var(name) {
            Ok(value) => value
                .parse()
                .unwrap_or_else(|_| panic!("{name}: {value:?} is not a number")),
            Err(_) => default,
        };
        let seconds = number("HOBOTNICA_CHAOS_SECONDS", 25);
        let jobs = number("HOBOTNICA_CHAOS_JOBS", 24);
        seeds
            .into_iter()
            .map(|seed| Settings {
                topology,
                seed,
                fault_phase: Duration::from_secs(seconds),
                jobs: usize::try_from(jobs).unwrap_or(usize::MAX),
            })
            .collect()
    }

    /// The seed of the run's random choices: one seed gives each topology a
    /// schedule of its own.
    fn rng_seed(&self) -> u64 {
        match self.topology {
            Topology::Embedded => self.seed,
            Topology::Redis => self.seed ^ 0x7ed1_5000_0000_0000,
        }
    }
}

/// SplitMix64: small, seedable, good enough to pick faults.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// A duration between `low` and `high`.
    pub fn between(&mut self, low: Duration, high: Duration) -> Duration {
        let span = high.saturating_sub(low).as_millis() as u64;
        low + Duration::from_millis(self.next_u64() % (span + 1))
    }

    /// True with probability `percent`/100.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }
}

/// How long every job may take to reach a final state once faults stop.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a job's processes may outlive its end.
const REAP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a REST call is retried (against each controller in turn).
const REST_TIMEOUT: Duration = Duration::from_secs(90);
/// The agents' `--keepalive`.
const KEEPALIVE: &str = "1s";
/// Agents in a run, each running two jobs at once.
const AGENTS: usize = 3;
/// The repository the runs use.
const REPO: &str = "local/chaos";

/// `make test` and `make deploy`: a header, `$CHAOS_LINES` numbered lines of
/// 100 bytes, an optional sleep (jobs that get cancelled), a line in
/// `$CHAOS_DIR/finished` when make ran to the end, and a last line.
const MAKEFILE: &str = r#".PHONY: test deploy
test deploy:
	@echo "chaos $$CHAOS_ID lines $$CHAOS_LINES"
	@awk -v n="$$CHAOS_LINES" -v id="$$CHAOS_ID" 'BEGIN { for (i = 1; i <= n; i++) printf "%-12s %08d %s\n", id, i, "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx" }'
	@if [ -n "$$CHAOS_SLEEP" ]; then sleep "$$CHAOS_SLEEP"; fi
	@echo "$$CHAOS_ID $$HOBOTNICA_JOB_ID $$HOBOTNICA_ATTEMPT" >> "$$CHAOS_DIR/finished"
	@echo "done $$CHAOS_ID"
"#;

/// The log a job of chaos id `id` with `lines` lines prints.
fn expected_log(id: &str, lines: u64) -> Vec<u8> {
    let mut log = format!("chaos {id} lines {lines}\n");
    for n in 1..=lines {
        let _ = writeln!(log, "{id:<12} {n:08} {}", "x".repeat(77));
    }
    let _ = writeln!(log, "done {id}");
    log.into_bytes()
}

/// What a submitted piece of work is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Work {
    /// `make test`, a few lines.
    Tiny,
    /// `make test`, 2 MB.
    Medium,
    /// `make test`, 12 MB: streams for a while.
    Large,
    /// `make test` that sleeps after its output and gets cancelled.
    Cancelled,
    /// `make deploy`, a few lines to 2 MB.
    Deploy,
}

/// A piece of work and what became of its submission.
#[derive(Clone, Debug)]
struct Submission {
    chaos_id: String,
    work: Work,
    lines: u64,
    /// The job, when an answer named it (a request whose answer was lost
    /// may have created one anyway: it is checked like the others).
    job: Option<u64>,
    /// A cancel the controller accepted (202) while the job ran or waited.
    cancel_accepted: bool,
}

/// REST against whichever controller answers.
#[derive(Clone)]
struct Rest {
    apis: Vec<Api>,
}

impl Rest {
    /// Sends until a controller answers with a status below 500 (a 503 of
    /// a controller whose store is away is retried too), trying each
    /// controller in turn; `None` when none did within [`REST_TIMEOUT`].
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Option<RawResponse> {
        let body = body.map(Value::to_string);
        let deadline = Instant::now() + REST_TIMEOUT;
        let mut attempt = 0usize;
        while Instant::now() < deadline {
            let api = &self.apis[attempt % self.apis.len()];
            attempt += 1;
            match api
                .try_raw(
                    method.clone(),
                    path,
                    body.as_deref().map(str::as_bytes),
                    headers,
                )
                .await
            {
                Ok(response) if response.status < 500 => return Some(response),
                Ok(_) | Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        None
    }

    async fn job(&self, id: u64) -> Option<Job> {
        let response = self
            .send(Method::GET, &format!("/api/v1/jobs/{id}"), None, &[])
            .await?;
        (response.status == 200).then(|| serde_json::from_value(response.json()).expect("a job"))
    }

    /// Every job of the chaos repository.
    async fn all_jobs(&self) -> Option<Vec<Job>> {
        let mut jobs = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!("/api/v1/jobs?repo={REPO}&limit=100");
            if let Some(cursor) = &cursor {
                path.push_str(&format!("&cursor={cursor}"));
            }
            let response = self.send(Method::GET, &path, None, &[]).await?;
            if response.status != 200 {
                return None;
            }
            let page = response.json();
            for item in page["items"].as_array().into_iter().flatten() {
                jobs.push(serde_json::from_value(item.clone()).expect("a job"));
            }
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => return Some(jobs),
            }
        }
    }
}

/// The processes of one run.
struct Cluster {
    topology: Topology,
    redis: Option<RedisServer>,
    controllers: Vec<Controller>,
    agents: Vec<Agent>,
    /// `links[agent]`: the agent's proxies, one per controller.
    links: Vec<Vec<Proxy>>,
    _repo: GitRepo,
}

impl Cluster {
    async fn start(topology: Topology, run: &Run) -> Cluster {
        let opts = ControllerOpts {
            lease_timeout: Duration::from_secs(3),
            ..ControllerOpts::default()
        };
        let (redis, controllers) = match topology {
            Topology::Embedded => (None, vec![Controller::start(opts).await]),
            Topology::Redis => {
                let redis = RedisServer::start().await;
                let a = Controller::start(ControllerOpts {
                    redis_url: Some(redis.url()),
                    ..opts
                })
                .await;
                let b = Controller::start(a.peer_opts()).await;
                (Some(redis), vec![a, b])
            }
        };
        let repo = GitRepo::new();
        repo.commit(&[("Makefile", MAKEFILE)], "chaos workload");
        controllers[0]
            .api()
            .register_repo("chaos", &repo.url())
            .await;
        let mut agents = Vec::new();
        let mut links = Vec::new();
        for index in 0..AGENTS {
            let mut proxies = Vec::new();
            for offset in 0..controllers.len() {
                let controller = &controllers[(index + offset) % controllers.len()];
                proxies.push(Proxy::start(controller.grpc_addr).await);
            }
            let agent = Agent::start(
                &controllers[0],
                AgentOpts {
                    name: Some(format!("{}-agent-{index}", run.name)),
                    concurrency: 2,
                    drain_timeout: Duration::from_secs(3),
                    controller_urls: Some(proxies.iter().map(Proxy::url).collect()),
                    args: vec!["--keepalive".into(), KEEPALIVE.into()],
                    ..AgentOpts::default()
                },
            )
            .await;
            agents.push(agent);
            links.push(proxies);
        }
        Cluster {
            topology,
            redis,
            controllers,
            agents,
            links,
            _repo: repo,
        }
    }

    fn rest(&self) -> Rest {
        Rest {
            apis: self.controllers.iter().map(Controller::api).collect(),
        }
    }

    /// Everything running again and every link open.
    async fn repair(&mut self) {
        if let Some(redis) = &mut self.redis
            && !redis.is_running()
        {
            redis.restart().await;
        }
        for controller in &mut self.controllers {
            if !controller.is_running() {
                controller.restart().await;
            }
        }
        for proxy in self.links.iter().flatten() {
            proxy.set_link(Link::Open);
        }
        for agent in &mut self.agents {
            if !agent.is_running() {
                agent.restart();
            }
        }
    }
}

/// Names and files of one run.
struct Run {
    name: String,
    /// `chaos <topology> seed <seed>`, before every line the run prints.
    label: String,
    /// Where jobs note that make ran to the end (under the shared dir).
    dir: PathBuf,
    /// `CHAOS_RUN=<name>`: in every job's environment, to find its
    /// processes.
    marker: String,
}

/// A fault the schedule can inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillController,
    StopController,
    KillAgent,
    StopAgent,
    KillAgentMidStream,
    KillControllerMidStream,
    KillAgentAfterMake,
    RestartRedis,
    CutLinks,
    Blackhole,
    SlowLinks,
}

impl Fault {
    fn choose(rng: &mut Rng, topology: Topology) -> Fault {
        const ALL: [Fault; 11] = [
            Fault::KillController,
            Fault::StopController,
            Fault::KillAgent,
            Fault::StopAgent,
            Fault::KillAgentMidStream,
            Fault::KillControllerMidStream,
            Fault::KillAgentAfterMake,
            Fault::RestartRedis,
            Fault::CutLinks,
            Fault::Blackhole,
            Fault::SlowLinks,
        ];
        loop {
            let fault = ALL[rng.below(ALL.len())];
            if fault != Fault::RestartRedis || topology == Topology::Redis {
                return fault;
            }
        }
    }
}

/// What a run did and found.
#[derive(Debug, Default)]
pub struct Report {
    pub faults: BTreeMap<String, usize>,
    pub timeline: Vec<String>,
    pub jobs: BTreeMap<String, usize>,
    /// What was submitted, by kind of work.
    pub submitted: BTreeMap<String, usize>,
    pub log_bytes_checked: u64,
    pub violations: Vec<String>,
}

impl Report {
    pub fn fault_count(&self) -> usize {
        self.faults.values().sum()
    }

    pub fn job_count(&self) -> usize {
        self.jobs.values().sum()
    }
}

/// Runs one chaos run and returns what it did; panics (naming the seed)
/// when an invariant does not hold.
pub async fn run(settings: &Settings) -> Report {
    let name = crate::unique(&format!("chaos-{}", settings.seed));
    let dir = crate::shared_dir().join(&name);
    std::fs::create_dir_all(&dir).expect("the run's directory");
    let run = Run {
        label: format!("chaos {:?} seed {}", settings.topology, settings.seed),
        marker: format!("CHAOS_RUN={name}"),
        name,
        dir,
    };
    let rerun = format!(
        "HOBOTNICA_CHAOS_SEEDS={} HOBOTNICA_CHAOS_SECONDS={} HOBOTNICA_CHAOS_JOBS={} \
         cargo test -p hobotnica-tests --test chaos -- {:?}",
        settings.seed,
        settings.fault_phase.as_secs(),
        settings.jobs,
        settings.topology,
    );
    eprintln!("{}: starting (rerun: {rerun})", run.label);
    let mut cluster = Cluster::start(settings.topology, &run).await;
    let rest = cluster.rest();
    let started = Instant::now();
    let submissions = Arc::new(Mutex::new(Vec::new()));
    let mut report = Report::default();

    let workload = workload(settings, &run, rest.clone(), Arc::clone(&submissions));
    let faults = faults(settings, &run, &mut cluster, &rest, started, &mut report);
    let ((), ()) = tokio::join!(workload, faults);

    note(
        &mut report,
        &run,
        started,
        "faults stop: everything restarted, every link open".into(),
    );
    cluster.repair().await;
    let submissions = submissions.lock().expect("submissions").clone();
    for submission in &submissions {
        *report
            .submitted
            .entry(format!("{:?}", submission.work))
            .or_default() += 1;
    }
    check(&run, &cluster, &rest, &submissions, &mut report).await;

    eprintln!(
        "{}: {} faults {:?}; submitted {:?}; {} jobs {:?}; {} log bytes checked; {:.1?}",
        run.label,
        report.fault_count(),
        report.faults,
        report.submitted,
        report.job_count(),
        report.jobs,
        report.log_bytes_checked,
        started.elapsed(),
    );
    if !report.violations.is_empty() {
        panic!(
            "{}: {} invariant(s) broken:\n  {}\n\nfaults:\n  {}\n\nrerun: {rerun}",
            run.label,
            report.violations.len(),
            report.violations.join("\n  "),
            report.timeline.join("\n  "),
        );
    }
    let _ = std::fs::remove_dir_all(&run.dir);
    report
}

fn note(report: &mut Report, run: &Run, started: Instant, what: String) {
    let line = format!("{:>6.1}s  {what}", started.elapsed().as_secs_f64());
    eprintln!("{}: {line}", run.label);
    report.timeline.push(line);
}

/// Submits `settings.jobs` pieces of work spread over the fault phase, and
/// cancels the ones meant to be cancelled.
async fn workload(
    settings: &Settings,
    run: &Run,
    rest: Rest,
    submissions: Arc<Mutex<Vec<Submission>>>,
) {
    let mut rng = Rng::new(settings.rng_seed() ^ 0x5eed_0f30);
    let gap = settings.fault_phase / u32::try_from(settings.jobs.max(1)).unwrap_or(u32::MAX);
    let large_at = rng.below(settings.jobs.max(1) / 2 + 1);
    let mut cancels = tokio::task::JoinSet::new();
    for index in 0..settings.jobs {
        tokio::time::sleep(rng.between(gap / 2, gap * 3 / 2)).await;
        let work = if index == large_at {
            Work::Large
        } else {
            match rng.below(20) {
                0..=9 => Work::Tiny,
                10..=13 => Work::Medium,
                14..=16 => Work::Cancelled,
                _ => Work::Deploy,
            }
        };
        let lines = match work {
            Work::Tiny | Work::Cancelled => 1 + rng.below(20) as u64,
            Work::Medium => 20_000,
            Work::Large => 120_000,
            Work::Deploy if rng.percent(50) => 20_000,
            Work::Deploy => 3,
        };
        let chaos_id = format!("c{}-{index}", settings.seed % 1000);
        let mut env = json!({
            "CHAOS_ID": chaos_id,
            "CHAOS_LINES": lines.to_string(),
            "CHAOS_DIR": run.dir.to_str().expect("a UTF-8 path"),
            "CHAOS_RUN": run.name,
        });
        if work == Work::Cancelled {
            // Long enough never to finish before its cancel, short enough
            // that a lost one retried automatically ends within the settle
            // time.
            env["CHAOS_SLEEP"] = json!("25");
        }
        let answer = match work {
            Work::Deploy => {
                let key = format!("{}-{index}", run.name);
                rest.send(
                    Method::POST,
                    &format!("/api/v1/repos/{REPO}/deploy"),
                    Some(&json!({ "env": env })),
                    &[("idempotency-key", &key)],
                )
                .await
            }
            _ => {
                rest.send(
                    Method::POST,
                    &format!("/api/v1/repos/{REPO}/jobs"),
                    Some(&json!({ "target": "test", "env": env })),
                    &[],
                )
                .await
            }
        };
        let job = answer
            .as_ref()
            .filter(|answer| matches!(answer.status, 200 | 202))
            .and_then(|answer| answer.json()["id"].as_u64());
        let index_in_list = {
            let mut list = submissions.lock().expect("submissions");
            list.push(Submission {
                chaos_id,
                work,
                lines,
                job,
                cancel_accepted: false,
            });
            list.len() - 1
        };
        if let (Work::Cancelled, Some(job)) = (work, job) {
            let delay = rng.between(Duration::from_millis(200), Duration::from_secs(3));
            let rest = rest.clone();
            let submissions = Arc::clone(&submissions);
            cancels.spawn(async move {
                tokio::time::sleep(delay).await;
                let answer = rest
                    .send(
                        Method::POST,
                        &format!("/api/v1/jobs/{job}/cancel"),
                        None,
                        &[],
                    )
                    .await;
                let accepted = answer.is_some_and(|answer| answer.status == 202);
                submissions.lock().expect("submissions")[index_in_list].cancel_accepted = accepted;
            });
        }
    }
    while cancels.join_next().await.is_some() {}
}

/// Injects faults until the fault phase is over.
async fn faults(
    settings: &Settings,
    run: &Run,
    cluster: &mut Cluster,
    rest: &Rest,
    started: Instant,
    report: &mut Report,
) {
    let mut rng = Rng::new(settings.rng_seed());
    while started.elapsed() < settings.fault_phase {
        tokio::time::sleep(rng.between(Duration::from_millis(200), Duration::from_millis(1500)))
            .await;
        let fault = Fault::choose(&mut rng, cluster.topology);
        let hold = rng.between(Duration::from_millis(100), Duration::from_millis(2500));
        let what = inject(fault, &mut rng, hold, run, cluster, rest).await;
        *report.faults.entry(format!("{fault:?}")).or_default() += 1;
        note(report, run, started, what);
        cluster.repair().await;
    }
}

/// Injects one fault, holds it for `hold` where that means something, and
/// says what it did. The caller repairs.
async fn inject(
    fault: Fault,
    rng: &mut Rng,
    hold: Duration,
    run: &Run,
    cluster: &mut Cluster,
    rest: &Rest,
) -> String {
    let controllers = cluster.controllers.len();
    let agents = cluster.agents.len();
    match fault {
        Fault::KillController => {
            let c = rng.below(controllers);
            cluster.controllers[c].kill9();
            tokio::time::sleep(hold).await;
            format!("SIGKILL controller {c}, back after {hold:?}")
        }
        Fault::StopController => {
            let c = rng.below(controllers);
            let begun = Instant::now();
            cluster.controllers[c].stop().await;
            let stopping = begun.elapsed();
            tokio::time::sleep(hold).await;
            format!("SIGTERM controller {c} (exited after {stopping:.1?}), back after {hold:?}")
        }
        Fault::KillAgent => {
            let a = rng.below(agents);
            cluster.agents[a].kill9();
            tokio::time::sleep(hold).await;
            format!("SIGKILL agent {a}, back after {hold:?}")
        }
        Fault::StopAgent => {
            let a = rng.below(agents);
            let begun = Instant::now();
            cluster.agents[a].sigterm();
            // It drains (3 s), then stops what still runs.
            cluster.agents[a].wait(Duration::from_secs(60)).await;
            format!("SIGTERM agent {a} (exited after {:.1?})", begun.elapsed())
        }
        Fault::KillAgentMidStream | Fault::KillControllerMidStream => {
            let Some(job) = streaming_job(rest).await else {
                return format!("{fault:?}: no job was streaming");
            };
            if fault == Fault::KillAgentMidStream {
                match agent_of(cluster, &job) {
                    Some(a) => {
                        cluster.agents[a].kill9();
                        tokio::time::sleep(hold).await;
                        format!("SIGKILL agent {a} while job {} streams its log", job.id)
                    }
                    None => format!("{fault:?}: job {} has no agent", job.id),
                }
            } else {
                let c = rng.below(controllers);
                cluster.controllers[c].kill9();
                tokio::time::sleep(hold).await;
                format!(
                    "SIGKILL controller {c} while job {} streams its log",
                    job.id
                )
            }
        }
        Fault::KillAgentAfterMake => {
            let Some(job_id) = next_finished(run).await else {
                return "KillAgentAfterMake: no make finished".to_owned();
            };
            let job = rest.job(job_id).await;
            match job.as_ref().and_then(|job| agent_of(cluster, job)) {
                Some(a) => {
                    cluster.agents[a].kill9();
                    tokio::time::sleep(hold).await;
                    format!("SIGKILL agent {a} just after make of job {job_id} exited")
                }
                None => format!("KillAgentAfterMake: job {job_id} has no agent"),
            }
        }
        Fault::RestartRedis => {
            let Some(redis) = &mut cluster.redis else {
                return "no Redis".to_owned();
            };
            let kill = rng.percent(50);
            if kill {
                redis.kill9();
            } else {
                redis.stop().await;
            }
            tokio::time::sleep(hold).await;
            let how = if kill { "SIGKILL" } else { "SIGTERM" };
            format!("{how} Redis, back after {hold:?}")
        }
        Fault::CutLinks => {
            let a = rng.below(agents);
            for proxy in &cluster.links[a] {
                proxy.cut();
            }
            format!("reset every connection of agent {a}")
        }
        Fault::Blackhole => {
            let a = rng.below(agents);
            let c = rng.below(cluster.links[a].len());
            cluster.links[a][c].set_link(Link::Blackhole);
            let hold = hold * 2;
            tokio::time::sleep(hold).await;
            format!("blackhole agent {a}'s link {c} for {hold:?}")
        }
        Fault::SlowLinks => {
            let a = rng.below(agents);
            let delay = rng.between(Duration::from_millis(5), Duration::from_millis(60));
            for proxy in &cluster.links[a] {
                proxy.set_link(Link::Slow(delay));
            }
            let hold = hold * 2;
            tokio::time::sleep(hold).await;
            format!("slow agent {a}'s links ({delay:?} a read) for {hold:?}")
        }
    }
}

/// The index of the agent `job` runs on.
fn agent_of(cluster: &Cluster, job: &Job) -> Option<usize> {
    let name = job.agent.as_deref()?;
    cluster.agents.iter().position(|agent| agent.name == name)
}

/// A running job (one printing its log, most likely), waiting a little for
/// one to appear.
async fn streaming_job(rest: &Rest) -> Option<Job> {
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let response = rest
            .send(
                Method::GET,
                &format!("/api/v1/jobs?repo={REPO}&state=running&limit=10"),
                None,
                &[],
            )
            .await?;
        let page = response.json();
        if let Some(item) = page["items"].as_array().and_then(|items| items.first()) {
            return serde_json::from_value(item.clone()).ok();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// The job whose make writes the next line of `finished` (it just ran to
/// the end), waiting up to a few seconds.
async fn next_finished(run: &Run) -> Option<u64> {
    let path = run.dir.join("finished");
    let before = std::fs::read_to_string(&path).unwrap_or_default().len();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let now = std::fs::read_to_string(&path).unwrap_or_default();
        if now.len() > before
            && let Some(line) = now[before..].lines().next()
            && now[before..].contains('\n')
        {
            return line.split_whitespace().nth(1)?.parse().ok();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

/// Checks every invariant, adding what is broken to `report.violations`.
async fn check(
    run: &Run,
    cluster: &Cluster,
    rest: &Rest,
    submissions: &[Submission],
    report: &mut Report,
) {
    let violations = &mut report.violations;
    // Every job ends.
    let mut jobs = Vec::new();
    let settle = Instant::now();
    while settle.elapsed() < SETTLE_TIMEOUT {
        match rest.all_jobs().await {
            Some(all) if all.iter().all(|job| job.state.is_terminal()) => {
                jobs = all;
                break;
            }
            Some(all) => jobs = all,
            None => {}
        }
        tokio::time::sleep(wait::POLL_INTERVAL * 4).await;
    }
    if jobs.iter().all(|job| job.state.is_terminal()) {
        eprintln!(
            "{}: every job ended {:.1?} after the faults stopped",
            run.label,
            settle.elapsed()
        );
    }
    for job in jobs.iter().filter(|job| !job.state.is_terminal()) {
        violations.push(format!(
            "job {} still {:?} {SETTLE_TIMEOUT:?} after the faults stopped: {job:?}",
            job.id, job.state
        ));
    }
    for submission in submissions {
        if let Some(id) = submission.job
            && !jobs.iter().any(|job| job.id == id)
        {
            violations.push(format!("accepted job {id} ({submission:?}) is not listed"));
        }
    }

    // make ran to the end at most once per job.
    let finished = std::fs::read_to_string(run.dir.join("finished")).unwrap_or_default();
    let mut ran_to_end: BTreeMap<u64, usize> = BTreeMap::new();
    for line in finished.lines() {
        match line
            .split_whitespace()
            .nth(1)
            .and_then(|id| id.parse().ok())
        {
            Some(id) => *ran_to_end.entry(id).or_default() += 1,
            None => violations.push(format!("a torn line in finished: {line:?}")),
        }
    }
    for (id, times) in &ran_to_end {
        if *times > 1 {
            violations.push(format!("job {id} ran make to the end {times} times"));
        }
    }

    // Final states, logs and cancels.
    let by_id: BTreeMap<&str, &Submission> = submissions
        .iter()
        .map(|submission| (submission.chaos_id.as_str(), submission))
        .collect();
    for job in &jobs {
        *report.jobs.entry(format!("{:?}", job.state)).or_default() += 1;
        let cancelled = submissions
            .iter()
            .any(|submission| submission.job == Some(job.id) && submission.cancel_accepted);
        match job.state {
            JobState::Succeeded => {
                if cancelled {
                    violations.push(format!(
                        "job {} succeeded after its cancel was accepted",
                        job.id
                    ));
                }
                if ran_to_end.get(&job.id).copied().unwrap_or(0) != 1 {
                    violations.push(format!(
                        "job {} succeeded but make never ran to the end",
                        job.id
                    ));
                }
                match check_log(rest, job.id, &by_id).await {
                    Ok(bytes) => report.log_bytes_checked += bytes,
                    Err(problem) => violations.push(format!("job {}: {problem}", job.id)),
                }
            }
            JobState::Failed | JobState::TimedOut => violations.push(format!(
                "job {} {:?}: {}",
                job.id,
                job.state,
                job.message.as_deref().unwrap_or("no message")
            )),
            // Not running any more is all a cancelled or lost job owes;
            // one still queued or running was reported above.
            JobState::Cancelled | JobState::Lost | JobState::Queued | JobState::Running => {}
        }
        if cancelled && ran_to_end.contains_key(&job.id) {
            violations.push(format!(
                "job {} ran make to the end after its cancel was accepted",
                job.id
            ));
        }
    }

    // No process of a job outlives it.
    let reaped = Instant::now();
    let mut left = processes_with_env(&run.marker);
    while !left.is_empty() && reaped.elapsed() < REAP_TIMEOUT {
        tokio::time::sleep(wait::POLL_INTERVAL).await;
        left = processes_with_env(&run.marker);
    }
    if !left.is_empty() {
        let described: Vec<String> = left
            .iter()
            .map(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                format!(
                    "{pid}: {}",
                    String::from_utf8_lossy(&cmdline).replace('\0', " ")
                )
            })
            .collect();
        violations.push(format!(
            "processes of jobs left {REAP_TIMEOUT:?} after every job ended: {}",
            described.join("; ")
        ));
    }

    // The controllers answer and are ready.
    for (index, controller) in cluster.controllers.iter().enumerate() {
        let ready = controller
            .api()
            .try_raw(Method::GET, "/readyz", None, &[])
            .await
            .map(|answer| answer.status);
        if !matches!(ready, Ok(200)) {
            violations.push(format!("controller {index}: /readyz answered {ready:?}"));
        }
    }
}

/// Compares a succeeded job's log with what its make printed; the bytes
/// checked.
async fn check_log(
    rest: &Rest,
    id: u64,
    submissions: &BTreeMap<&str, &Submission>,
) -> Result<u64, String> {
    let answer = rest
        .send(Method::GET, &format!("/api/v1/jobs/{id}/log"), None, &[])
        .await
        .ok_or("its log could not be read")?;
    if answer.status != 200 {
        return Err(format!("reading its log answered {}", answer.status));
    }
    // The agent's own lines (`[hobotnica] fetching ...`) may come first;
    // from make's first line on, the log is what make printed.
    let mut log = answer.body.as_slice();
    while log.starts_with(b"[hobotnica] ") {
        let end = log
            .iter()
            .position(|byte| *byte == b'\n')
            .map_or(log.len(), |end| end + 1);
        log = &log[end..];
    }
    let header = log.split(|byte| *byte == b'\n').next().unwrap_or_default();
    let header = String::from_utf8_lossy(header);
    let chaos_id = header
        .strip_prefix("chaos ")
        .and_then(|rest| rest.split_whitespace().next())
        .ok_or_else(|| format!("its log starts with {header:?}"))?;
    let submission = submissions
        .get(chaos_id)
        .ok_or_else(|| format!("its log names {chaos_id:?}, never submitted"))?;
    let expected = expected_log(chaos_id, submission.lines);
    if log != expected {
        let first_difference = log
            .iter()
            .zip(&expected)
            .position(|(got, want)| got != want)
            .unwrap_or(log.len().min(expected.len()));
        return Err(format!(
            "its log is not byte-exact: {} bytes (sha256 {}), expected {} (sha256 {}); first difference at byte {first_difference}",
            log.len(),
            hex::encode(Sha256::digest(log)),
            expected.len(),
            hex::encode(Sha256::digest(&expected)),
        ));
    }
    Ok(answer.body.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        let draw = |seed| {
            let mut rng = Rng::new(seed);
            (0..20)
                .map(|_| Fault::choose(&mut rng, Topology::Redis))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn expected_lines_are_a_hundred_bytes() {
        let log = expected_log("c1-2", 2);
        let lines: Vec<&[u8]> = log.split(|byte| *byte == b'\n').collect();
        assert_eq!(lines[1].len() + 1, 100);
        assert_eq!(lines[2].len() + 1, 100);
        assert_eq!(lines[3], b"done c1-2");
    }
}
