"""A live Hobotnica for the tests: the real controller and agent binaries, run
as subprocesses on free ports with their state in a temporary directory, and a
real git repository for them to deploy."""
import os
import secrets
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

CHECKOUT = Path(__file__).resolve().parents[5]
CONTROLLER = CHECKOUT / "target" / "debug" / "hobotnica-controller"
AGENT = CHECKOUT / "target" / "debug" / "hobotnica-agent"

FINISHED_STATES = {"succeeded", "failed", "cancelled", "timed_out", "lost"}
# Generous: the agent's first job clones the repository.
DEADLINE_SECONDS = 30


def free_ports(count):
    """Ports nothing listens on now (bound together, so all different)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_until(what, check, deadline_seconds=DEADLINE_SECONDS, on_timeout=lambda: ""):
    """Polls `check` until it returns something truthy, and returns that."""
    deadline = time.monotonic() + deadline_seconds
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {deadline_seconds}s{on_timeout()}")
        time.sleep(0.05)


class GitRepository:
    """A git repository in a directory, committed to with a fixed identity."""

    def __init__(self, path: Path):
        self.path = path
        path.mkdir()
        self._git("init", "--quiet")
        self._git("symbolic-ref", "HEAD", "refs/heads/main")

    @property
    def url(self):
        return self.path.as_uri()

    def commit(self, files: dict[str, str], message: str) -> str:
        """Commits the files on the current branch; returns the commit's sha."""
        for name, text in files.items():
            (self.path / name).write_text(text)
        self._git("add", "--all")
        self._git(
            "-c", "user.name=Deployer Tests", "-c", "user.email=tests@example.com", "-c", "commit.gpgsign=false",
            "commit", "--quiet", "--message", message,
        )
        return self._git("rev-parse", "HEAD")

    def new_branch(self, branch: str):
        """Creates `branch` at the current commit and switches to it."""
        self._git("checkout", "--quiet", "-b", branch)

    def _git(self, *args):
        done = subprocess.run(["git", *args], cwd=self.path, check=True, capture_output=True, text=True)
        return done.stdout.strip()


class LiveHobotnica:
    """A controller and an agent; the admin token authenticates `api`."""

    def __init__(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="deployer-tests-")
        self.root = Path(self._tmp.name)
        self.admin_token = secrets.token_urlsafe(24)
        self._agent_token = secrets.token_urlsafe(24)
        self._processes = {}
        self._http = None
        http_port, self._grpc_port, closed_port = free_ports(3)
        self.url = f"http://127.0.0.1:{http_port}"
        # Nothing listens there: the controller cannot reach "GitHub".
        self.github_api_url = f"http://127.0.0.1:{closed_port}"

    def start(self):
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self):
        for binary in (CONTROLLER, AGENT):
            if not binary.exists():
                raise FileNotFoundError(f"{binary} is missing: run cargo build --workspace --bins")
        self._spawn("controller", [
            CONTROLLER,
            "--data-dir", self.root / "controller",
            "--listen", self.url.removeprefix("http://"),
            "--grpc-listen", f"127.0.0.1:{self._grpc_port}",
            "--github-api-url", self.github_api_url,
        ], tokens={"HOBOTNICA_ADMIN_TOKEN": self.admin_token, "HOBOTNICA_AGENT_TOKEN": self._agent_token})
        self._http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.admin_token}"})
        self._wait_until("the controller's /healthz", self._healthy)
        self._spawn("agent", [
            AGENT,
            "--controller", f"http://127.0.0.1:{self._grpc_port}",
            "--work-dir", self.root / "agent",
            "--name", "deployer-tests",
            "--concurrency", "4",
            "--drain-timeout", "5s",
        ], tokens={"HOBOTNICA_AGENT_TOKEN": self._agent_token})
        self._wait_until("the agent to connect", self._agent_connected)

    def stop(self):
        """Stops the agent, then the controller (SIGTERM, then a wait)."""
        for name in ("agent", "controller"):
            process = self._processes.pop(name, None)
            if process is None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._http is not None:
            self._http.close()
        self._tmp.cleanup()

    def register(self, name, git_url, branch="main"):
        """Registers a repository by URL (its owner is `local`)."""
        response = self.api("POST", "/api/v1/repos", json={"name": name, "git_url": git_url, "branch": branch})
        assert response.status_code == 201, response.text
        return response.json()

    def deploy(self, repo, commit=None):
        """Queues a deploy through the API directly; returns the job."""
        response = self.api("POST", f"/api/v1/repos/local/{repo}/deploy", json={"commit": commit} if commit else {})
        assert response.status_code == 202, response.text
        return response.json()

    def job(self, job_id):
        response = self.api("GET", f"/api/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def wait_for_job(self, job_id):
        """The job once it has finished."""

        def finished():
            job = self.job(job_id)
            return job if job["state"] in FINISHED_STATES else None

        return self._wait_until(f"job {job_id} to finish", finished)

    def deploys(self, repo):
        """All the repository's deploys, newest first."""
        found, cursor = [], None
        while True:
            params = {"cursor": cursor} if cursor else {}
            response = self.api("GET", f"/api/v1/repos/local/{repo}/deploys", params=params)
            assert response.status_code == 200, response.text
            page = response.json()
            found += page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                return found

    def api(self, method, path, **kwargs) -> httpx.Response:
        return self._http.request(method, path, **kwargs)

    def _spawn(self, name, argv, tokens):
        """Starts a binary; tokens go in its environment (`tokens`), never
        its argv, where any process on the host could read them."""
        with open(self.root / f"{name}.log", "wb") as log:
            self._processes[name] = subprocess.Popen(
                [str(arg) for arg in argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._environment() | tokens,
            )

    @staticmethod
    def _environment():
        # The binaries read HOBOTNICA_* variables too: only the flags and the
        # given tokens count here.
        return {key: value for key, value in os.environ.items() if not key.startswith("HOBOTNICA_")}

    def _wait_until(self, what, check):
        def alive_and(check):
            for name, process in self._processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"the {name} exited with {process.returncode}{self._logs()}")
            return check()

        return wait_until(what, lambda: alive_and(check), on_timeout=self._logs)

    def _logs(self):
        """The processes' logs, for a failure's message: the start and the end of each."""
        text = ""
        for log in sorted(self.root.glob("*.log")):
            content = log.read_text(errors="replace")
            if len(content) > 4000:
                content = f"{content[:2000]}\n[...]\n{content[-2000:]}"
            text += f"\n--- {log.name} ---\n{content}"
        return text

    def _healthy(self):
        try:
            return self._http.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def _agent_connected(self):
        agents = self.api("GET", "/api/v1/agents").json()["items"]
        return any(agent["connected"] for agent in agents)
