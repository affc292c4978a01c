import logging

from django.contrib import admin, messages

from . import controller, sync
from .models import Deploy, Repository

logger = logging.getLogger(__name__)


@admin.register(Repository)
class RepositoryAdmin(admin.ModelAdmin):
    list_display = ["__str__", "deploy_count", "latest_deploy"]
    actions = ["refresh_deploys", "deploy_latest_commit"]

    @admin.display(description="deploys")
    def deploy_count(self, repository):
        return repository.deploys.count()

    @admin.display(description="latest deploy")
    def latest_deploy(self, repository):
        latest = repository.deploys.first()
        return sync.describe(latest) if latest else "-"

    @admin.action(description="Refresh deploys from the controller")
    def refresh_deploys(self, request, queryset):
        for repository in queryset:
            try:
                count = sync.refresh_repository(repository)
            except controller.ControllerError as err:
                self.message_user(request, f"{repository}: {err.detail}", messages.ERROR)
            else:
                self.message_user(request, f"{repository}: {count} deploys in the controller", messages.SUCCESS)

    @admin.action(description="Deploy latest commit")
    def deploy_latest_commit(self, request, queryset):
        for repository in queryset:
            _deploy(self, request, repository, commit=None)


@admin.register(Deploy)
class DeployAdmin(admin.ModelAdmin):
    list_display = [
        "job_id", "repository", "short_commit", "state", "exit_code", "requested_by", "created_at", "finished_at",
    ]
    list_filter = ["repository", "state"]
    search_fields = ["commit", "requested_by"]
    actions = ["deploy_selected_commit", "refresh_status"]

    # Rows mirror the controller's jobs: they come from it, never from a form.
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    @admin.display(description="commit", ordering="commit")
    def short_commit(self, deploy):
        return deploy.short_commit

    @admin.action(description="Deploy selected commit")
    def deploy_selected_commit(self, request, queryset):
        if queryset.count() != 1:
            self.message_user(request, "Select exactly one deploy: its commit is deployed again.", messages.WARNING)
            return
        selected = queryset.get()
        _deploy(self, request, selected.repository, commit=selected.commit)

    @admin.action(description="Refresh status from the controller")
    def refresh_status(self, request, queryset):
        for deploy in queryset.select_related("repository"):
            try:
                deploy = sync.refresh_deploy(deploy)
            except controller.ControllerError as err:
                self.message_user(request, f"{deploy}: {err.detail}", messages.ERROR)
            else:
                self.message_user(request, sync.describe(deploy), _level(deploy))


def _deploy(model_admin, request, repository, commit):
    """Asks the controller to deploy and reports the new job to the user."""
    try:
        job = controller.deploy_commit(repository.owner, repository.name, commit)
    except controller.ControllerError as err:
        model_admin.message_user(request, f"Deploying {repository} failed: {err.detail}", messages.ERROR)
        return
    deploy = sync.record(repository, job)
    logger.info("%s: %s, asked by %s", repository, sync.describe(deploy), request.user)
    model_admin.message_user(request, sync.describe(deploy), _level(deploy))


def _level(deploy):
    if deploy.state == "succeeded":
        return messages.SUCCESS
    if deploy.finished:
        return messages.ERROR
    return messages.INFO
