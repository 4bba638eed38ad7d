"""notify.py without Dagster: one deadline bounds a whole delivery (every read, attempt and pause), and a
malformed PACKER_ASSETS_WEBHOOKS entry is named by its position, never echoed. Time is a fake clock."""

import itertools
import os
import socket
import subprocess
import sys
import threading

import pytest

from packer_assets.runs.notify import Notification, Webhook, WebhookConfigError, deliver, parse_webhooks

NOTE = Notification("failed", "debian-12", None, "FAILURE", "run-1", error="boom")


class FakeClock:
    """Each reading is `step` seconds after the last; sleeping moves it on by the sleep."""

    def __init__(self, step: float = 0.0):
        self.now, self.step, self.slept = 0.0, step, []

    def __call__(self) -> float:
        self.now += self.step
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class Trickler:
    """A loopback receiver that answers `200 OK`, then one more header line at a time, never ending the headers."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.lines = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            for n in itertools.count():
                if self.stop.wait(0.01):  # paces the lines; no assertion depends on it
                    return
                try:
                    conn.sendall(f"X-Trickle-{n}: x\r\n".encode())
                except OSError:  # the client hung up
                    return
                self.lines += 1

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.getsockname()[1]}/hooks/secret-token"

    def close(self):
        self.stop.set()
        self.thread.join(10)
        self.server.close()


def test_a_trickled_answer_cannot_outlast_the_deadline():
    trickler = Trickler()
    clock = FakeClock(step=1.0)  # every reading of the clock: a second later
    try:
        delivery = deliver(Webhook("json", trickler.url), NOTE, deadline=30, clock=clock, sleep=clock.sleep)
        assert not delivery.ok and delivery.attempts == 1 and not clock.slept  # no attempt after the deadline
        assert delivery.said == "gave up at the 30 s deadline (ReadTimeout)"
        assert 30 <= clock.now <= 40  # gave up at the first read past the deadline
        assert trickler.thread.is_alive()  # the receiver was still answering when deliver returned
    finally:
        trickler.close()


def test_retries_and_pauses_stop_at_the_deadline():
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]  # nothing listens once closed: each attempt is refused
    clock = FakeClock()
    hook = Webhook("json", f"http://127.0.0.1:{port}/hooks/secret-token")
    delivery = deliver(hook, NOTE, retries=5, backoff=1.0, deadline=2.5, clock=clock, sleep=clock.sleep)
    # attempt 1, pause 1 s, attempt 2; a pause of 2 s would pass the deadline: no third attempt
    assert (delivery.ok, delivery.attempts, clock.slept) == (False, 2, [1.0])
    assert delivery.said == "gave up at the 2.5 s deadline (ConnectionError)"
    assert "secret-token" not in repr(delivery)


BAD = "json:http://u:x@[::1/x"


@pytest.mark.parametrize("text, entry", [(BAD, 1), (f"slack:https://ok.example.org/T/B/tok, {BAD}", 2),
                                         ("json:http://u:x@host.example.org:99999/x", 1)])
def test_a_webhook_urlsplit_rejects_is_named_by_position_without_its_url(text, entry):
    with pytest.raises(WebhookConfigError, match=f"^PACKER_ASSETS_WEBHOOKS entry {entry}: ") as caught:
        parse_webhooks(text)
    assert "u:x" not in str(caught.value) and "example.org" not in str(caught.value)


def test_settings_says_one_line_for_a_bad_ipv6_webhook(tmp_path):
    env = {**os.environ, "PACKER_ASSETS_ROOT": str(tmp_path), "PACKER_ASSETS_WEBHOOKS": BAD}
    env.pop("PACKER_ASSETS_ENV_FILE", None)
    shown = subprocess.run([sys.executable, "-m", "packer_assets.cli", "settings"], capture_output=True, text=True,
                           env=env, timeout=120)
    said = (shown.stdout + shown.stderr).strip()
    assert shown.returncode != 0 and "Traceback" not in said and len(said.splitlines()) == 1, said
    assert "PACKER_ASSETS_WEBHOOKS entry 1" in said and "u:x" not in said and "::1" not in said
