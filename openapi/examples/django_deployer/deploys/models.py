from django.db import models

# States after which a job never changes again (the schema's JobState).
FINISHED_STATES = frozenset({"succeeded", "failed", "cancelled", "timed_out", "lost"})


class Repository(models.Model):
    """A repository registered in the controller, named as it names it."""

    owner = models.CharField(max_length=100, default="local", help_text="`local` when registered by git URL")
    name = models.CharField(max_length=100)

    class Meta:
        ordering = ["owner", "name"]
        verbose_name_plural = "repositories"
        constraints = [models.UniqueConstraint(fields=["owner", "name"], name="unique_repository")]

    def __str__(self):
        return f"{self.owner}/{self.name}"


class Deploy(models.Model):
    """A deploy job of the controller, as last seen there."""

    repository = models.ForeignKey(Repository, on_delete=models.CASCADE, related_name="deploys")
    job_id = models.PositiveBigIntegerField(unique=True, verbose_name="job")
    commit = models.CharField(max_length=40)
    branch = models.CharField(max_length=255, blank=True)
    state = models.CharField(max_length=20)
    exit_code = models.IntegerField(null=True, blank=True)
    message = models.TextField(blank=True, help_text="Why the job is in its state")
    requested_by = models.CharField(max_length=100, blank=True)
    created_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)
    synced_at = models.DateTimeField(auto_now=True, help_text="When this row was last read from the controller")

    class Meta:
        ordering = ["-created_at", "-job_id"]

    def __str__(self):
        return f"deploy job {self.job_id} of {self.short_commit}"

    @property
    def short_commit(self):
        return self.commit[:7]

    @property
    def finished(self):
        return self.state in FINISHED_STATES
