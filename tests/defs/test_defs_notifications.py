"""Notifications against a local HTTP receiver, for real runs in the lab: one message per failed run, one per
promotion, none for an up-to-date run; retries with backoff; no secret in a payload. And the sensors as the
daemon evaluates them (its code location in the context): one message per failed run however it was started
(executed in process, without a remote origin, or launched), never two."""

import json

import dagster as dg
import pytest
from dagster._core.remote_origin import RegisteredCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin
from support.builds import crashing_packer, rebuild
from support.webhooks import Receiver

from packer_assets.defs.notifications import NOTIFIED_TAG, Notifier, build_notification_sensors
from packer_assets.runs.notify import Notification, Webhook, deliver, parse_webhooks


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def evaluate(sensor, instance, result, notifier, event_type):
    run = instance.get_run_by_id(result.run_id)
    event = instance.all_logs(result.run_id, of_type=event_type)[0].dagster_event
    context = dg.build_run_status_sensor_context(sensor_name=sensor.name, dagster_event=event, dagster_instance=instance,
                                                 dagster_run=run, resources={"notifier": notifier})
    if event_type == dg.DagsterEventType.RUN_FAILURE:
        context = context.for_run_failure()
    return sensor(context)


@pytest.mark.packer
def test_one_message_per_promotion_and_failure_none_for_up_to_date(lab_project, receiver, tmp_path):
    on_failure, on_promotion = build_notification_sensors(enabled=True)
    notifier = Notifier(webhooks=f"json:{receiver.url('/generic')}, slack:{receiver.url('/slack/T000/B000/XXXX')}",
                        ui_url="http://127.0.0.1:3000")
    with dg.instance_for_test() as instance:
        built = rebuild(lab_project, instance)
        assert built.success
        evaluate(on_promotion, instance, built, notifier, dg.DagsterEventType.RUN_SUCCESS)
        assert [path for path, _ in receiver.posts] == ["/generic", "/slack/T000/B000/XXXX"]
        generic, slack = receiver.posts[0][1], receiver.posts[1][1]
        assert generic["event"] == "promoted" and generic["key"] == "debian-12" and generic["status"] == "SUCCESS"
        assert generic["chain_id"].startswith("CHAIN-") and generic["template_vmid"] >= 9300
        assert generic["proof"].endswith(generic["chain_id"][6:22]) and generic["run_url"].endswith(built.run_id)
        assert set(slack) == {"text"} and f"template {generic['template_vmid']} promoted" in slack["text"]

        again = rebuild(lab_project, instance)  # up to date: nothing promoted, nothing said
        assert again.success
        evaluate(on_promotion, instance, again, notifier, dg.DagsterEventType.RUN_SUCCESS)
        assert len(receiver.posts) == 2

        failed = rebuild(lab_project, instance, force=True, binary=crashing_packer(tmp_path))
        assert not failed.success
        evaluate(on_failure, instance, failed, notifier, dg.DagsterEventType.RUN_FAILURE)
        assert len(receiver.posts) == 4
        said = receiver.posts[2][1]
        assert said["event"] == "failed" and said["status"] == "FAILURE" and said["key"] == "debian-12"
        assert said["error"] and "\n" not in said["error"] and said["template_vmid"] is None
        # no secret of the lab in any payload
        secrets = [lab_project.stack.root_password, lab_project.stack.guest_password]
        assert not [s for s in secrets for _, body in receiver.posts if s in json.dumps(body)]


def test_a_failing_webhook_is_retried_with_backoff_and_named_without_its_path():
    flaky = Receiver(fail_first=2)
    waits = []
    try:
        hook = parse_webhooks(f"json:{flaky.url('/hooks/secret-token')}")[0]
        note = Notification("failed", "debian-12", None, "FAILURE", "run-1", error="boom")
        delivery = deliver(hook, note, sleep=waits.append, backoff=0.5)
        assert delivery.ok and delivery.attempts == 3 and waits == [0.5, 1.0] and len(flaky.posts) == 1
        flaky.fail_first = 5
        delivery = deliver(hook, note, sleep=waits.append, retries=2)
        assert not delivery.ok and delivery.said == "HTTP 503" and "secret-token" not in repr(delivery)
    finally:
        flaky.close()
    gone = deliver(Webhook("json", flaky.url("/hooks/secret-token")), note, sleep=lambda s: None, timeout=2)
    assert not gone.ok and gone.said == "ConnectionError" and "secret-token" not in gone.webhook


@pytest.mark.parametrize("text", ["https://example.org/hook", "json:ftp://example.org/x", "teams:https://x.org/y"])
def test_a_malformed_webhook_list_names_the_entry_not_the_url(text):
    from packer_assets.runs.notify import WebhookConfigError

    with pytest.raises(WebhookConfigError, match="entry 1") as caught:
        parse_webhooks(text)
    assert "example.org" not in str(caught.value)


# ------------------------------------------------------------------ the sensors as the daemon runs them

LOCATION = RegisteredCodeLocationOrigin("packer_assets")


@dg.asset
def doomed() -> None:
    raise RuntimeError("the build broke")


doomed_job = dg.define_asset_job("doomed_job", selection=[doomed])


def daemon_tick(sensor, defs: dg.Definitions, instance, cursor: str | None, notifier: Notifier) -> str | None:
    """One evaluation of `sensor` as the daemon makes it: the context names the sensor's code location (a
    test's bare context names none, and then matches runs without an origin by accident)."""
    repository = defs.get_repository_def()
    with dg.SensorEvaluationContext(instance_ref=None, cursor=cursor, repository_name=repository.name,
                                    repository_def=repository, instance=instance, sensor_name=sensor.name,
                                    resources={"notifier": notifier}, code_location_origin=LOCATION) as context:
        return sensor.evaluate_tick(context).cursor


def launched_run_failed(instance, job: dg.JobDefinition, repository_name: str) -> dg.DagsterRun:
    """A run as `dagster job launch` or the UI creates it (with its remote origin), then failed."""
    origin = RemoteJobOrigin(RemoteRepositoryOrigin(LOCATION, repository_name), job.name)
    run = instance.create_run_for_job(job, remote_job_origin=origin, job_code_origin=None)
    instance.report_run_failed(run, message="the worker failed")
    return run


def test_every_failed_run_is_posted_once_however_started(receiver):
    on_failure, _ = build_notification_sensors(enabled=True)
    defs = dg.Definitions(assets=[doomed], jobs=[doomed_job], sensors=[on_failure])
    elsewhere = dg.Definitions(assets=[doomed], jobs=[dg.define_asset_job("another_projects_job", selection=[doomed])])
    foreign_job = elsewhere.resolve_job_def("another_projects_job")
    notifier = Notifier(webhooks=f"json:{receiver.url('/generic')}")
    with dg.instance_for_test() as instance:
        cursor = daemon_tick(on_failure, defs, instance, None, notifier)  # the first tick starts the cursor
        executed = defs.resolve_job_def("doomed_job").execute_in_process(instance=instance, raise_on_error=False)
        materialized = dg.materialize([doomed], instance=instance, raise_on_error=False)
        launched = launched_run_failed(instance, defs.resolve_job_def("doomed_job"), defs.get_repository_def().name)
        launched_run_failed(instance, foreign_job, "another_project")  # launched from other definitions: not ours
        assert not (executed.success or materialized.success)
        before = cursor
        cursor = daemon_tick(on_failure, defs, instance, cursor, notifier)
        posted = [body["run_id"] for _, body in receiver.posts]
        assert sorted(posted) == sorted([executed.run_id, materialized.run_id, launched.run_id])
        assert instance.get_run_by_id(executed.run_id).tags[NOTIFIED_TAG] == "failed"

        # A run failed a second time (two runs closing one dead run at once), and a tick evaluated again
        # from an old cursor (the daemon died before it stored the new one): nobody is told twice.
        instance.report_run_failed(instance.get_run_by_id(executed.run_id), message="closed again")
        daemon_tick(on_failure, defs, instance, cursor, notifier)
        daemon_tick(on_failure, defs, instance, before, notifier)
        assert len(receiver.posts) == 3


@dg.asset(name="template")
def promoting_template() -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"promoted": True, "vmid": 9301, "chain_id": "CHAIN-0123"})


def test_a_promotion_executed_in_process_is_posted_once(receiver):
    _, on_promotion = build_notification_sensors(enabled=True)
    defs = dg.Definitions(assets=[promoting_template], sensors=[on_promotion])
    notifier = Notifier(webhooks=f"json:{receiver.url('/generic')}")
    with dg.instance_for_test() as instance:
        before = daemon_tick(on_promotion, defs, instance, None, notifier)
        built = defs.resolve_implicit_global_asset_job_def().execute_in_process(instance=instance)  # as the CLI
        daemon_tick(on_promotion, defs, instance, before, notifier)
        daemon_tick(on_promotion, defs, instance, before, notifier)  # the tick evaluated again: still one post
        assert [(body["event"], body["run_id"], body["template_vmid"]) for _, body in receiver.posts] == [
            ("promoted", built.run_id, 9301)]
