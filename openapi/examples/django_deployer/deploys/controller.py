"""The controller's REST API, through the generated client `hobotnica_client`.

Every call raises ControllerError with words for a person: the `detail` of the
controller's RFC 9457 problem, or why the controller could not be reached.
"""
import json
import logging
import uuid
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import httpx
from django.conf import settings
from hobotnica_client import AuthenticatedClient
from hobotnica_client.api.jobs import deploy, list_deploys, show_job
from hobotnica_client.models import DeployRequest, JobList, JobView
from hobotnica_client.types import UNSET, Response

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The most jobs one page of a listing may hold.
PAGE_SIZE = 200


class ControllerError(Exception):
    """The controller refused a request, or could not be reached."""

    def __init__(self, detail: str, status: int | None = None):
        super().__init__(detail)
        self.detail = detail
        self.status = status


class _Client(AuthenticatedClient):
    """An AuthenticatedClient whose repr leaves the token out (error pages and
    logs print reprs)."""

    def __repr__(self):
        return f"<Hobotnica client of {self._base_url}>"


def connect() -> AuthenticatedClient:
    """A client with the configured credentials; use it in a `with` block."""
    if not settings.HOBOTNICA_TOKEN:
        raise ControllerError("HOBOTNICA_TOKEN is not set: give the deployer an admin token or a GitHub token")
    headers = {}
    if settings.HOBOTNICA_GITHUB_USERNAME:
        # The token is a GitHub token: the controller checks it belongs to this login.
        headers["X-GitHub-Username"] = settings.HOBOTNICA_GITHUB_USERNAME
    return _Client(
        base_url=settings.HOBOTNICA_URL,
        token=settings.HOBOTNICA_TOKEN,
        headers=headers,
        timeout=httpx.Timeout(settings.HOBOTNICA_TIMEOUT),
    )


def deploy_commit(owner: str, name: str, commit: str | None = None) -> JobView:
    """Queues `make deploy` at `commit`, or at the tip of the repository's
    default branch when `commit` is None.

    The request carries a fresh Idempotency-Key and is sent once more, with
    the same key, if its answer is lost: the controller then answers with the
    job the first request queued instead of deploying twice."""
    body = DeployRequest(commit=commit or UNSET)
    key = str(uuid.uuid4())
    with connect() as client:
        response = _call(
            partial(deploy.sync_detailed, owner, name, body=body, idempotency_key=key), client, attempts=2
        )
    return _expect(response, JobView)


def job(job_id: int) -> JobView:
    """The job's current status."""
    with connect() as client:
        response = _call(partial(show_job.sync_detailed, job_id), client)
    return _expect(response, JobView)


def deploys(owner: str, name: str) -> list[JobView]:
    """The repository's deploys, newest first (every page)."""
    found = []
    cursor = UNSET
    with connect() as client:
        while True:
            request = partial(list_deploys.sync_detailed, owner, name, limit=PAGE_SIZE, cursor=cursor)
            page = _expect(_call(request, client), JobList)
            found.extend(page.items)
            if not page.next_cursor:
                return found
            cursor = page.next_cursor


def _call(request: Callable[..., Response], client: AuthenticatedClient, attempts: int = 1) -> Response:
    """Sends `request(client=client)`, up to `attempts` times while no answer
    comes. No answer, or one the client cannot read, is a ControllerError."""
    for attempt in range(1, attempts + 1):
        try:
            return request(client=client)
        except httpx.TransportError as err:
            if attempt == attempts:
                raise ControllerError(f"the controller at {settings.HOBOTNICA_URL} did not answer: {err}") from err
            logger.warning("no answer from the controller (%s): sending the request again", err)
        except (KeyError, TypeError, ValueError) as err:
            logger.exception("an answer of the controller does not fit the client")
            raise ControllerError(
                "the controller's answer does not fit the client: regenerate it (openapi/generate-python-client)"
            ) from err


def _expect(response: Response, expected: type[T]) -> T:
    """The parsed answer if it is the expected one; otherwise the problem.

    The client parses only the problems the schema documents for an operation,
    so the body is read here: an undocumented problem keeps its detail too."""
    if isinstance(response.parsed, expected):
        return response.parsed
    status = int(response.status_code)
    try:
        problem = json.loads(response.content)
    except ValueError:
        problem = None
    if isinstance(problem, dict) and problem.get("detail"):
        detail = f"{problem.get('title') or status}: {problem['detail']}"
    else:
        detail = f"unexpected answer {status} {response.status_code.phrase}"
    raise ControllerError(detail, status)
