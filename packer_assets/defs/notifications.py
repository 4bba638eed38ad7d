"""Run-status sensors that tell people: a run failed, or a template was promoted (notify.py posts).

Off unless PACKER_ASSETS_WEBHOOKS is set (then they start RUNNING with the daemon). An up-to-date run
promotes nothing and says nothing; a failed run says its key, chain ID and first error line.
"""

import os

import dagster as dg
from pydantic import Field

from ..notify import Notification, first_line, notify, parse_webhooks, secret_values
from .assets import CHAIN_TAG

PARTITION_TAG = "dagster/partition"


class Notifier(dg.ConfigurableResource):
    """Where notifications go (secret: webhook URLs carry tokens) and the UI links they carry."""

    webhooks: str | None = Field(default=None, description="PACKER_ASSETS_WEBHOOKS: json:<url>,slack:<url>,...")
    ui_url: str | None = Field(default=None, description="PACKER_ASSETS_UI_URL: the Dagster webserver, for run links")

    def run_url(self, run_id: str) -> str | None:
        return f"{self.ui_url.rstrip('/')}/runs/{run_id}" if self.ui_url else None

    def send(self, context, notification: Notification) -> None:
        for delivery in notify(parse_webhooks(self.webhooks), notification):
            said = f"{notification.event} {notification.key or '-'} -> {delivery.webhook}: {delivery.said} " \
                   f"after {delivery.attempts} attempt(s)"
            (context.log.info if delivery.ok else context.log.warning)(said)


def _materializations(instance: dg.DagsterInstance, run_id: str) -> dict[str, dict]:
    """asset name -> metadata values of its (last) materialization in the run."""
    found = {}
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
        materialization = entry.asset_materialization
        if materialization is not None:
            found[materialization.asset_key.to_user_string()] = {k: v.value for k, v in materialization.metadata.items()}
    return found


def build_notification_sensors(enabled: bool) -> list:
    status = dg.DefaultSensorStatus.RUNNING if enabled else dg.DefaultSensorStatus.STOPPED

    @dg.run_failure_sensor(name="notify_on_failure", default_status=status,
                           description="Posts each failed run (key, chain ID, first error line) to PACKER_ASSETS_WEBHOOKS.")
    def notify_on_failure(context: dg.RunFailureSensorContext, notifier: Notifier):
        run = context.dagster_run
        message = context.failure_event.message if context.failure_event else None
        notifier.send(context, Notification(
            event="failed", key=run.tags.get(PARTITION_TAG), chain_id=run.tags.get(CHAIN_TAG), status=run.status.value,
            run_id=run.run_id, error=first_line(message, secret_values(dict(os.environ))),
            run_url=notifier.run_url(run.run_id)))

    @dg.run_status_sensor(run_status=dg.DagsterRunStatus.SUCCESS, name="notify_on_promotion", default_status=status,
                          description="Posts each run that promoted a new template to PACKER_ASSETS_WEBHOOKS "
                                      "(an up-to-date run promotes nothing and says nothing).")
    def notify_on_promotion(context: dg.RunStatusSensorContext, notifier: Notifier):
        run = context.dagster_run
        done = _materializations(context.instance, run.run_id)
        template = done.get("template") or {}
        if template.get("promoted") is not True:
            return dg.SkipReason(f"run {run.run_id} promoted no template")
        proof = (done.get("template_proof") or {}).get("proof")
        notifier.send(context, Notification(
            event="promoted", key=run.tags.get(PARTITION_TAG), chain_id=run.tags.get(CHAIN_TAG) or template.get("chain_id"),
            status=run.status.value, run_id=run.run_id, template_vmid=template.get("vmid"),
            proof=str(proof) if proof else None, run_url=notifier.run_url(run.run_id)))
        return None

    return [notify_on_failure, notify_on_promotion]
