"""The admin against a live controller and agent (see live.py): every deploy
here really runs `make deploy` on the agent."""
import contextlib
import logging
import re
import secrets

from django.contrib.auth.models import User
from django.test import TestCase, override_settings
from django.urls import reverse

from deploys import controller
from deploys.models import Deploy, Repository

from .live import GitRepository, LiveHobotnica, free_ports, wait_until


def makefile(deploy_recipe):
    return f"test:\n\t@echo testing\n\ndeploy:\n\t{deploy_recipe}\n"


class LiveControllerTestCase(TestCase):
    """Starts a controller and an agent once for the class, with a git
    repository registered twice: `demo` deploys branch main (two commits),
    `slow` deploys branch slow, whose deploy takes a second."""

    @classmethod
    def setUpClass(cls):
        cls.live = LiveHobotnica()
        # Class cleanups run after tearDownClass, and also when setUpClass fails.
        cls.addClassCleanup(cls.live.stop)
        cls.live.start()
        git = GitRepository(cls.live.root / "demo.git")
        cls.first_commit = git.commit({"Makefile": makefile("@echo deploying v1")}, "v1")
        cls.tip_commit = git.commit({"Makefile": makefile("@echo deploying v2")}, "v2")
        git.new_branch("slow")
        git.commit({"Makefile": makefile("@sleep 1 && echo deployed slowly")}, "slow deploy")
        cls.live.register("demo", git.url)
        cls.live.register("slow", git.url, branch="slow")
        cls.enterClassContext(
            override_settings(
                HOBOTNICA_URL=cls.live.url, HOBOTNICA_TOKEN=cls.live.admin_token, HOBOTNICA_GITHUB_USERNAME=""
            )
        )
        super().setUpClass()

    @classmethod
    def setUpTestData(cls):
        cls.user = User.objects.create_superuser("operator", "operator@example.com", "unused")
        cls.demo = Repository.objects.create(owner="local", name="demo")
        cls.slow = Repository.objects.create(owner="local", name="slow")

    def setUp(self):
        self.client.force_login(self.user)

    def run_action(self, action, objects):
        """Runs an admin action on the objects' changelist; returns the page
        it leads to."""
        model = type(objects[0])._meta.model_name
        response = self.client.post(
            reverse(f"admin:deploys_{model}_changelist"),
            {"action": action, "_selected_action": [obj.pk for obj in objects]},
            follow=True,
        )
        self.assertEqual(response.status_code, 200)
        return response

    def run_action_for_message(self, action, objects):
        """Runs an action that answers with one message: (level, text)."""
        response = self.run_action(action, objects)
        found = messages(response)
        self.assertEqual(len(found), 1, found)
        return found[0]

    def deploy_row(self, job):
        """The Deploy row of a job created through the API."""
        owner, name = job["repo"].split("/")
        self.run_action("refresh_deploys", [Repository.objects.get(owner=owner, name=name)])
        return Deploy.objects.get(job_id=job["id"])

    def assert_deploy_message(self, message, commit):
        """A successful deploy's message; returns its job id."""
        level, text = message
        self.assertIn(level, ("info", "success"), text)
        # A queued job's message says what it waits for.
        match = re.fullmatch(rf"Deploy job (\d+) of {commit[:7]} (is queued|is running)(: .+)?", text)
        self.assertIsNotNone(match, text)
        return int(match[1])


def messages(response):
    return [(message.level_tag, message.message) for message in response.context["messages"]]


class DeployAdminTests(LiveControllerTestCase):
    def test_the_changelist_lists_the_repositorys_deploys_newest_first(self):
        older = self.live.wait_for_job(self.live.deploy("demo", self.first_commit)["id"])
        newer = self.live.wait_for_job(self.live.deploy("demo")["id"])

        level, text = self.run_action_for_message("refresh_deploys", [self.demo])

        in_controller = self.live.deploys("demo")
        self.assertEqual((level, text), ("success", f"local/demo: {len(in_controller)} deploys in the controller"))
        page = self.client.get(reverse("admin:deploys_deploy_changelist"))
        listed = [deploy.job_id for deploy in page.context["cl"].result_list]
        self.assertEqual(listed, [job["id"] for job in in_controller])
        self.assertLess(listed.index(newer["id"]), listed.index(older["id"]))
        self.assertContains(page, self.first_commit[:7])
        self.assertContains(page, self.tip_commit[:7])
        row = Deploy.objects.get(job_id=older["id"])
        self.assertEqual((row.commit, row.state, row.exit_code, row.requested_by),
                         (self.first_commit, "succeeded", 0, "admin"))

    def test_deploy_selected_commit_deploys_exactly_that_commit(self):
        selected = self.deploy_row(self.live.wait_for_job(self.live.deploy("demo", self.first_commit)["id"]))

        message = self.run_action_for_message("deploy_selected_commit", [selected])

        job_id = self.assert_deploy_message(message, self.first_commit)
        self.assertNotEqual(job_id, selected.job_id)
        job = self.live.wait_for_job(job_id)
        self.assertEqual((job["kind"], job["commit"], job["state"]), ("deploy", self.first_commit, "succeeded"))
        self.assertEqual(Deploy.objects.get(job_id=job_id).commit, self.first_commit)

    def test_deploy_latest_commit_deploys_the_tip_of_the_default_branch(self):
        message = self.run_action_for_message("deploy_latest_commit", [self.demo])

        job_id = self.assert_deploy_message(message, self.tip_commit)
        job = self.live.wait_for_job(job_id)
        self.assertEqual((job["commit"], job["branch"], job["state"]), (self.tip_commit, "main", "succeeded"))
        self.assertEqual(Deploy.objects.get(job_id=job_id).repository, self.demo)

    def test_refresh_status_follows_a_deploy_until_it_ends(self):
        self.run_action("deploy_latest_commit", [self.slow])
        deploy = Deploy.objects.get(repository=self.slow)
        seen = [deploy.state]

        def finished():
            level, text = self.run_action_for_message("refresh_status", [deploy])
            state = Deploy.objects.get(pk=deploy.pk).state
            if state != seen[-1]:
                seen.append(state)
            return (level, text) if state not in ("queued", "running") else None

        level, text = wait_until("the slow deploy to finish", finished)

        self.assertEqual(seen[-2:], ["running", "succeeded"], seen)
        self.assertEqual(level, "success")
        self.assertRegex(text, rf"^Deploy job {deploy.job_id} of [0-9a-f]{{7}} succeeded \(exit code 0\)$")
        page = self.client.get(reverse("admin:deploys_deploy_changelist"), {"repository__id__exact": self.slow.pk})
        self.assertContains(page, "succeeded")

    def test_a_deploy_of_a_missing_commit_reports_why_it_failed(self):
        missing = "0" * 40
        selected = self.deploy_row(self.live.wait_for_job(self.live.deploy("demo", missing)["id"]))

        job_id = self.assert_deploy_message(self.run_action_for_message("deploy_selected_commit", [selected]), missing)
        self.live.wait_for_job(job_id)
        level, text = self.run_action_for_message("refresh_status", [Deploy.objects.get(job_id=job_id)])

        self.assertEqual(level, "error")
        self.assertRegex(text, rf"^Deploy job {job_id} of 0000000 failed: commit {missing} not found in ")

    def test_only_one_selected_deploy_is_deployed(self):
        jobs = [self.live.deploy("demo", self.first_commit), self.live.deploy("demo", self.tip_commit)]
        self.deploy_row(jobs[0])
        rows = list(Deploy.objects.filter(job_id__in=[job["id"] for job in jobs]))
        before = len(self.live.deploys("demo"))

        level, text = self.run_action_for_message("deploy_selected_commit", rows)

        self.assertEqual((level, text), ("warning", "Select exactly one deploy: its commit is deployed again."))
        self.assertEqual(len(self.live.deploys("demo")), before)

    def test_problems_of_the_controller_are_shown_with_their_detail(self):
        missing = Repository.objects.create(owner="local", name="missing")
        problem = self.live.api("POST", "/api/v1/repos/local/missing/deploy", json={}).json()
        self.assertEqual(problem["status"], 404)
        self.assertEqual(
            self.run_action_for_message("deploy_latest_commit", [missing]),
            ("error", f"Deploying local/missing failed: {problem['title']}: {problem['detail']}"),
        )
        self.assertEqual(
            self.run_action_for_message("refresh_deploys", [missing]),
            ("error", f"local/missing: {problem['title']}: {problem['detail']}"),
        )

        wrong_token = secrets.token_urlsafe(24)
        problem = self.live.api(
            "POST", "/api/v1/repos/local/demo/deploy", json={}, headers={"Authorization": f"Bearer {wrong_token}"}
        ).json()
        self.assertEqual(problem["status"], 401)
        with self.settings(HOBOTNICA_TOKEN=wrong_token):
            self.assertEqual(
                self.run_action_for_message("deploy_latest_commit", [self.demo]),
                ("error", f"Deploying local/demo failed: {problem['title']}: {problem['detail']}"),
            )

        with self.settings(HOBOTNICA_TOKEN=""):
            level, text = self.run_action_for_message("deploy_latest_commit", [self.demo])
            self.assertEqual(level, "error")
            self.assertIn("HOBOTNICA_TOKEN is not set", text)
        nowhere = f"http://127.0.0.1:{free_ports(1)[0]}"
        with self.settings(HOBOTNICA_URL=nowhere):
            with self.assertLogs("deploys.controller", "WARNING") as retried:
                level, text = self.run_action_for_message("deploy_latest_commit", [self.demo])
            self.assertIn("sending the request again", retried.output[0])
            self.assertEqual(level, "error")
            expected = f"Deploying local/demo failed: the controller at {nowhere} did not answer:"
            self.assertTrue(text.startswith(expected), text)

    def test_github_credentials_are_sent_with_the_username(self):
        github_token = "ghp_" + secrets.token_hex(18)
        with self.settings(HOBOTNICA_TOKEN=github_token, HOBOTNICA_GITHUB_USERNAME="octocat"):
            with controller.connect() as client:
                sent = client.get_httpx_client().build_request("GET", "/api/v1/jobs/1").headers
            self.assertEqual(sent["Authorization"], f"Bearer {github_token}")
            self.assertEqual(sent["X-GitHub-Username"], "octocat")
            # The controller checks the token with GitHub, which it cannot reach
            # here (see LiveHobotnica.github_api_url): 502, "GitHub could not be reached".
            level, text = self.run_action_for_message("deploy_latest_commit", [self.demo])
            self.assertEqual(level, "error")
            self.assertRegex(text, r"^Deploying local/demo failed: Bad Gateway: GitHub could not be reached; retry later .+")
            # The same problem on a read (GET .../deploys).
            level, text = self.run_action_for_message("refresh_deploys", [self.demo])
            self.assertEqual(level, "error")
            self.assertRegex(text, r"^local/demo: Bad Gateway: GitHub could not be reached; retry later .+")
        with self.settings(HOBOTNICA_TOKEN=github_token):
            level, text = self.run_action_for_message("deploy_latest_commit", [self.demo])
            self.assertEqual(level, "error")
            self.assertIn("the token is not the admin token", text)

    def test_tokens_are_never_shown_or_logged(self):
        wrong_token = secrets.token_urlsafe(24)
        github_token = "ghp_" + secrets.token_hex(18)
        with capture_logs() as logs:
            pages = [self.run_action(action, [self.demo]) for action in ("deploy_latest_commit", "refresh_deploys")]
            deploy = Deploy.objects.filter(repository=self.demo).first()
            pages.append(self.run_action("refresh_status", [deploy]))
            with self.settings(HOBOTNICA_TOKEN=wrong_token):
                pages.append(self.run_action("deploy_latest_commit", [self.demo]))
            with self.settings(HOBOTNICA_TOKEN=github_token, HOBOTNICA_GITHUB_USERNAME="octocat"):
                pages.append(self.run_action("refresh_deploys", [self.demo]))
            for url in (
                reverse("admin:index"),
                reverse("admin:deploys_repository_changelist"),
                reverse("admin:deploys_repository_change", args=[self.demo.pk]),
                reverse("admin:deploys_deploy_changelist"),
                reverse("admin:deploys_deploy_change", args=[deploy.pk]),
            ):
                pages.append(self.client.get(url))
                self.assertEqual(pages[-1].status_code, 200, url)

        self.assertTrue(any("HTTP Request: POST" in line for line in logs), "httpx's requests are not in the logs")
        for token in (self.live.admin_token, wrong_token, github_token):
            for page in pages:
                self.assertNotContains(page, token)
            self.assertFalse([line for line in logs if token in line])
        with controller.connect() as client:
            self.assertNotIn(self.live.admin_token, repr(client))


@contextlib.contextmanager
def capture_logs():
    """Every log record, at every level, formatted (with tracebacks)."""
    lines = []

    class Capture(logging.Handler):
        def emit(self, record):
            lines.append(self.format(record))

    root = logging.getLogger()
    handler = Capture(logging.DEBUG)
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)
