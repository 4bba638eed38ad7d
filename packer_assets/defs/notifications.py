"""Run-status sensors that tell people: a run failed, or a template was promoted (notify.py posts).

Off unless PACKER_ASSETS_WEBHOOKS is set (then they start RUNNING with the daemon). An up-to-date run
promotes nothing and says nothing; a failed run says its key, chain ID and first error line.

Every run, however started: a run executed from a terminal (`make build`, `dagster job execute`,
`dagster asset materialize`) has no remote job origin, and a run-status sensor scoped to its code
location skips it (dagster 1.13 matches the run's origin with the sensor's). So the sensors watch the
whole instance (`monitor_all_code_locations`), less runs launched from another code location. Once per
run: the sensor tags the run `packer-assets/notified` before it posts and skips a run so tagged (a
run failed twice, e.g. a dead run closed by two runs at once, or a tick evaluated again after the
daemon died).
"""

import dagster as dg
from pydantic import Field

from packer_assets.config.settings import environment
from packer_assets.defs.assets import CHAIN_TAG
from packer_assets.defs.resources import secret
from packer_assets.runs.notify import Notification, first_line, notify, parse_webhooks, secret_values

PARTITION_TAG = "dagster/partition"
NOTIFIED_TAG = "packer-assets/notified"


class Notifier(dg.ConfigurableResource):
    """Where notifications go (secret: webhook URLs carry tokens) and the UI links they carry."""

    webhooks: str | None = Field(default=None, description="PACKER_ASSETS_WEBHOOKS: json:<url>,slack:<url>,...")
    ui_url: str | None = Field(default=None, description="PACKER_ASSETS_UI_URL: the Dagster webserver, for run links")

    def run_url(self, run_id: str) -> str | None:
        return f"{self.ui_url.rstrip('/')}/runs/{run_id}" if self.ui_url else None

    def send(self, context, notification: Notification) -> None:
        for delivery in notify(parse_webhooks(secret(self.webhooks, "PACKER_ASSETS_WEBHOOKS")), notification):
            said = (
                f"{notification.event} {notification.key or '-'} -> {delivery.webhook}: {delivery.said} "
                f"after {delivery.attempts} attempt(s)"
            )
            (context.log.info if delivery.ok else context.log.warning)(said)


def _materializations(instance: dg.DagsterInstance, run_id: str) -> dict[str, dict]:
    """asset name -> metadata values of its (last) materialization in the run."""
    found = {}
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
        materialization = entry.asset_materialization
        if materialization is not None:
            found[materialization.asset_key.to_user_string()] = {
                k: v.value for k, v in materialization.metadata.items()
            }
    return found


def claim(context: dg.RunStatusSensorContext, event: str) -> str | None:
    """Tag the run notified, before posting (at most once); why not, if it is not ours to tell of: a run
    launched from another code location (a run executed from a terminal names none: told of)."""
    run = context.dagster_run
    repository = context.repository_def
    if run.remote_job_origin is not None and repository is not None and not repository.has_job(run.job_name):
        return f"run {run.run_id}: job {run.job_name} is not one of these definitions"
    current = context.instance.get_run_by_id(run.run_id) or run
    if NOTIFIED_TAG in current.tags:
        return f"run {run.run_id} was notified already ({current.tags[NOTIFIED_TAG]})"
    context.instance.add_run_tags(run.run_id, {NOTIFIED_TAG: event})
    return None


def passed(context: dg.RunStatusSensorContext, why: str) -> None:
    """A run passed over, said in the tick's log. Not a SkipReason: that ends the tick, and after a run
    it notified in the same tick, Dagster refuses the tick (a SkipReason beside a run reaction)."""
    context.log.info(why)


def build_notification_sensors(enabled: bool) -> list:
    status = dg.DefaultSensorStatus.RUNNING if enabled else dg.DefaultSensorStatus.STOPPED

    @dg.run_failure_sensor(
        name="notify_on_failure",
        default_status=status,
        monitor_all_code_locations=True,
        description="Posts each failed run (key, chain ID, first error line) to PACKER_ASSETS_WEBHOOKS.",
    )
    def notify_on_failure(context: dg.RunFailureSensorContext, notifier: Notifier):
        run = context.dagster_run
        if skip := claim(context, "failed"):
            return passed(context, skip)
        message = context.failure_event.message if context.failure_event else None
        notifier.send(
            context,
            Notification(
                event="failed",
                key=run.tags.get(PARTITION_TAG),
                chain_id=run.tags.get(CHAIN_TAG),
                status=run.status.value,
                run_id=run.run_id,
                error=first_line(message, secret_values(dict(environment()))),
                run_url=notifier.run_url(run.run_id),
            ),
        )
        return None

    @dg.run_status_sensor(
        run_status=dg.DagsterRunStatus.SUCCESS,
        name="notify_on_promotion",
        default_status=status,
        monitor_all_code_locations=True,
        description="Posts each run that promoted a new template to PACKER_ASSETS_WEBHOOKS "
        "(an up-to-date run promotes nothing and says nothing).",
    )
    def notify_on_promotion(context: dg.RunStatusSensorContext, notifier: Notifier):
        run = context.dagster_run
        done = _materializations(context.instance, run.run_id)
        template = done.get("template") or {}
        if template.get("promoted") is not True:
            return passed(context, f"run {run.run_id} promoted no template")
        if skip := claim(context, "promoted"):
            return passed(context, skip)
        proof = template.get("proof")  # written in the template step, whatever the run selected
        notifier.send(
            context,
            Notification(
                event="promoted",
                key=run.tags.get(PARTITION_TAG),
                chain_id=run.tags.get(CHAIN_TAG) or template.get("chain_id"),
                status=run.status.value,
                run_id=run.run_id,
                template_vmid=template.get("vmid"),
                proof=str(proof) if proof else None,
                run_url=notifier.run_url(run.run_id),
            ),
        )
        return None

    return [notify_on_failure, notify_on_promotion]
