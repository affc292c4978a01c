"""Keeps the Deploy rows in step with the controller's jobs."""
from hobotnica_client.models import JobView
from hobotnica_client.types import Unset

from . import controller
from .models import Deploy, Repository


def record(repository: Repository, job: JobView) -> Deploy:
    """Stores the job as the controller shows it now."""
    deploy, _ = Deploy.objects.update_or_create(
        job_id=job.id,
        defaults={
            "repository": repository,
            "commit": job.commit,
            "branch": _text(job.branch),
            "state": job.state.value,
            "exit_code": _value(job.exit_code),
            "message": _text(job.message),
            "requested_by": _text(job.requested_by),
            "created_at": job.created_at,
            "finished_at": _value(job.finished_at),
        },
    )
    return deploy


def refresh_repository(repository: Repository) -> int:
    """Reads the repository's deploys from the controller; returns how many it has."""
    jobs = controller.deploys(repository.owner, repository.name)
    for job in jobs:
        record(repository, job)
    return len(jobs)


def refresh_deploy(deploy: Deploy) -> Deploy:
    """Reads the deploy's current status from the controller."""
    return record(deploy.repository, controller.job(deploy.job_id))


def describe(deploy: Deploy) -> str:
    """The deploy's status in a sentence, e.g. "Deploy job 12 of abc1234 is queued"."""
    phrase = _STATE_PHRASES.get(deploy.state, f"is {deploy.state}")
    sentence = f"Deploy job {deploy.job_id} of {deploy.short_commit} {phrase}"
    if deploy.exit_code is not None:
        sentence += f" (exit code {deploy.exit_code})"
    if deploy.message:
        sentence += f": {deploy.message}"
    return sentence


_STATE_PHRASES = {
    "queued": "is queued",
    "running": "is running",
    "succeeded": "succeeded",
    "failed": "failed",
    "cancelled": "was cancelled",
    "timed_out": "timed out",
    "lost": "was lost (its agent stopped answering)",
}


def _value(value):
    return None if isinstance(value, Unset) else value


def _text(value) -> str:
    return _value(value) or ""
