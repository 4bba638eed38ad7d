"""Notifications against a local HTTP receiver, for real runs in the lab: one message per failed run, one per
promotion, none for an up-to-date run; retries with backoff; no secret in a payload."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dagster as dg
import pytest
from support.builds import crashing_packer, rebuild

from packer_assets.defs.notifications import Notifier, build_notification_sensors
from packer_assets.notify import Notification, Webhook, deliver, parse_webhooks

pytestmark = pytest.mark.packer


class Receiver:
    """Records each POST; answers `fail_first` of them with 503 first."""

    def __init__(self, fail_first=0):
        self.posts: list[tuple[str, dict]] = []
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if receiver.fail_first:
                    receiver.fail_first -= 1
                    self.send_response(503)
                else:
                    receiver.posts.append((self.path, body))
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path):
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


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
        skipped = evaluate(on_promotion, instance, again, notifier, dg.DagsterEventType.RUN_SUCCESS)
        assert isinstance(skipped, dg.SkipReason) and len(receiver.posts) == 2

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
    from packer_assets.notify import WebhookConfigError

    with pytest.raises(WebhookConfigError, match="entry 1") as caught:
        parse_webhooks(text)
    assert "example.org" not in str(caught.value)
