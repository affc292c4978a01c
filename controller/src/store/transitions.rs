//! The job transitions every backend applies, as pure functions on a `Job`
//! (the backend makes them atomic). Each checks the state machine
//! (`JobState::can_become`) and the attempt (fencing).

use chrono::{DateTime, Utc};
use hobotnica_common::ids::JobId;
use hobotnica_common::job::{Job, JobKind, JobState, RepoRef};

use super::{AgentRecord, Finish, NewJob, StoreError, StoreEvent, StoreResult};

/// A new queued job.
pub fn new_job(id: JobId, new: NewJob, now: DateTime<Utc>) -> Job {
    Job {
        id,
        repo: new.repo,
        git_url: new.git_url,
        kind: new.kind,
        target: new.target,
        commit: new.commit,
        branch: new.branch,
        env: new.env,
        from_fork: new.from_fork,
        requested_by: new.requested_by,
        trusted_labels: new.trusted_labels,
        trigger: new.trigger,
        state: JobState::Queued,
        attempt: 0,
        agent: None,
        agent_name: None,
        exit_code: None,
        message: None,
        timeout_secs: new.timeout_secs,
        cancel_requested: false,
        created_at: now,
        started_at: None,
        finished_at: None,
        lease_expires_at: None,
        timings: None,
    }
}

/// Whether `agent` may take `job`: the job is queued and the agent's token
/// vouches for the job's trusted labels (a deploy's `deploy_labels`). Every
/// store's claim uses it; the store adds only what it alone knows (the
/// oldest such job, one running deploy per repository).
pub fn may_claim(job: &Job, agent: &AgentRecord) -> bool {
    job.state == JobState::Queued && job.claimable_by(&agent.vouched_labels)
}

/// Whether `agent` may take `job` now: `may_claim`, and the job is not a
/// deploy of a repository whose previous deploy still runs (deploys of one
/// repository run one at a time). Every store takes the oldest queued job
/// for which this holds; `deploy_running` is asked only for deploys.
pub fn claimable(
    job: &Job,
    agent: &AgentRecord,
    deploy_running: impl FnOnce(&RepoRef) -> bool,
) -> bool {
    may_claim(job, agent) && !(job.kind == JobKind::Deploy && deploy_running(&job.repo))
}

/// An agent's registration against the record already holding its name:
/// the same token keeps the agent's id and first registration time;
/// another token is refused, so that no token can take over an agent it
/// did not register (its leases, log streams and completions).
pub fn register_agent(
    previous: Option<&AgentRecord>,
    mut agent: AgentRecord,
) -> StoreResult<AgentRecord> {
    if let Some(previous) = previous {
        if previous.token_id != agent.token_id {
            return Err(StoreError::AgentNameTaken { name: agent.name });
        }
        agent.id = previous.id.clone();
        agent.registered_at = previous.registered_at;
    }
    Ok(agent)
}

/// `agent` takes a queued job under a new attempt.
pub fn claim(
    job: &mut Job,
    agent: &AgentRecord,
    now: DateTime<Utc>,
    lease_until: DateTime<Utc>,
) -> StoreResult<()> {
    if !job.state.can_become(JobState::Running) {
        return Err(StoreError::Conflict(format!(
            "job {} is {}",
            job.id, job.state
        )));
    }
    job.state = JobState::Running;
    job.attempt += 1;
    job.agent = Some(agent.id.clone());
    job.agent_name = Some(agent.name.clone());
    job.started_at = Some(now);
    job.lease_expires_at = Some(lease_until);
    job.message = None;
    Ok(())
}

/// Whether `attempt` holds the job's lease.
pub fn check_lease(job: &Job, attempt: u32) -> StoreResult<()> {
    if job.state == JobState::Running && job.attempt == attempt {
        Ok(())
    } else {
        Err(StoreError::LeaseLost {
            job: job.id,
            attempt,
        })
    }
}

pub fn renew(job: &mut Job, attempt: u32, lease_until: DateTime<Utc>) -> StoreResult<()> {
    check_lease(job, attempt)?;
    job.lease_expires_at = Some(lease_until);
    Ok(())
}

/// Queued: cancelled now. Running: flagged for the agent. Finished: conflict.
pub fn request_cancel(job: &mut Job, now: DateTime<Utc>) -> StoreResult<()> {
    match job.state {
        JobState::Queued => {
            job.state = JobState::Cancelled;
            job.finished_at = Some(now);
            job.message = Some("cancelled before it started".to_owned());
            Ok(())
        }
        JobState::Running => {
            job.cancel_requested = true;
            Ok(())
        }
        state => Err(StoreError::Conflict(format!(
            "job {} has already finished ({state})",
            job.id
        ))),
    }
}

/// The event a cancel request publishes.
pub fn cancel_event(job: &Job) -> StoreEvent {
    match (&job.state, &job.agent) {
        (JobState::Running, Some(agent)) => StoreEvent::CancelRequested {
            job: job.id,
            attempt: job.attempt,
            agent: agent.clone(),
        },
        _ => StoreEvent::JobFinished { job: job.id },
    }
}

/// Records how an attempt ended; `Ok(false)` when the same ending was
/// already recorded (a repeated completion).
pub fn finish(
    job: &mut Job,
    attempt: u32,
    finish: Finish,
    now: DateTime<Utc>,
) -> StoreResult<bool> {
    let state = finish.outcome.state();
    // A job stopped before make ended on its own has no exit code, whatever
    // an agent sends (older agents sent what make exited with when stopped).
    let exit_code = match state {
        JobState::Cancelled | JobState::TimedOut => None,
        _ => finish.exit_code,
    };
    if job.attempt != attempt {
        return Err(StoreError::LeaseLost {
            job: job.id,
            attempt,
        });
    }
    if job.state == state && job.exit_code == exit_code {
        return Ok(false);
    }
    if !job.state.can_become(state) {
        return Err(StoreError::LeaseLost {
            job: job.id,
            attempt,
        });
    }
    job.state = state;
    job.exit_code = exit_code;
    job.message = finish.message;
    job.finished_at = Some(now);
    job.lease_expires_at = None;
    job.timings = finish.timings;
    Ok(true)
}

/// A running job whose lease ended before `now` becomes lost.
pub fn expire(job: &mut Job, now: DateTime<Utc>) -> bool {
    let expired =
        job.state == JobState::Running && job.lease_expires_at.is_some_and(|until| until < now);
    if expired {
        let message = format!(
            "agent {} stopped renewing the lease",
            job.agent_name.as_deref().unwrap_or("?")
        );
        lose(job, now, message);
    }
    expired
}

/// A job that was running when its store was exported becomes `lost` as it
/// is imported, as if its lease had expired: no agent holds it in the new
/// store. Returns the line the controller appends to its log, `None` for a
/// job that was not running.
pub fn lose_on_import(job: &mut Job, now: DateTime<Utc>) -> Option<String> {
    if job.state != JobState::Running {
        return None;
    }
    let message = format!(
        "the job was running on agent {} when its store was exported; it was imported as lost",
        job.agent_name.as_deref().unwrap_or("?")
    );
    lose(job, now, message.clone());
    Some(message)
}

/// A running job ends `lost`: nobody holds its lease any more.
fn lose(job: &mut Job, now: DateTime<Utc>, message: String) {
    job.state = JobState::Lost;
    job.finished_at = Some(now);
    job.lease_expires_at = None;
    job.message = Some(message);
}

/// Gives a running job a lease until at least `until`.
pub fn extend(job: &mut Job, until: DateTime<Utc>) -> bool {
    let extend = job.state == JobState::Running
        && job.lease_expires_at.is_none_or(|current| current < until);
    if extend {
        job.lease_expires_at = Some(until);
    }
    extend
}
