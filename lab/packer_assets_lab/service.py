"""`packer-assets lab up | down | status | publish KEY`: the lab as one background process.

`up` starts this module as a detached process that serves the fake PVE API (HTTPS, its own CA),
the ISO mirror and the guest SSH endpoint, and writes into the state folder:
  state.json   ports, pid, CA path, control token (mode 0600)
  lab.env      the env file that points the project at the lab (mode 0600: it holds passwords)
  lab.log      what the process printed
`down` stops exactly the process `up` started (pid and command line both checked).
`publish`/`corrupt` reach the running mirror through a control endpoint on loopback.
"""

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

from packer_assets.config.envfile import read_env_file, write_env_file
from packer_assets.errors import OperationError
from packer_assets.evidence.layout import atomic_write
from packer_assets.runs.procs import process_argv

SERVICE_MODULE = "packer_assets_lab.service"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


class LabError(OperationError):
    """The lab could not be started, reached or stopped; the message says what to look at."""


@dataclass(frozen=True)
class LabPaths:
    state: Path

    @property
    def state_json(self) -> Path:
        return self.state / "state.json"

    @property
    def env_file(self) -> Path:
        return self.state / "lab.env"

    @property
    def log(self) -> Path:
        return self.state / "lab.log"

    @property
    def credentials(self) -> Path:
        return self.state / "credentials.env"


# ------------------------------------------------------------------ control endpoint


class ControlServer:
    """POST /<action>/<key> with the token from state.json: the running lab's mirror controls."""

    def __init__(self, token: str, actions: dict[str, Callable[[str], object]], keys: list[str]):
        self.token, self.actions, self.keys = token, actions, keys
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                if self.headers.get("Authorization") != f"Bearer {server.token}":
                    return self._send(403, {"error": "bad control token"})
                _, action, key = [*self.path.split("/", 2), "", ""][:3]
                handler = server.actions.get(action)
                if handler is None:
                    return self._send(404, {"error": f"unknown action {action!r}"})
                if key not in server.keys:
                    return self._send(400, {"error": f"unknown key {key!r} (known: {', '.join(server.keys)})"})
                return self._send(200, {"result": handler(key)})

            def _send(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_args):  # keep the lab log for the services
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True, name="lab-control").start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# ------------------------------------------------------------------ the process itself


def _credentials(paths: LabPaths) -> dict[str, str]:
    """Passwords made once per state folder, so a restarted lab keeps its logins."""
    if paths.credentials.exists():
        return read_env_file(paths.credentials)
    creds = {"LAB_ROOT_PASSWORD": secrets.token_urlsafe(18), "LAB_GUEST_PASSWORD": secrets.token_urlsafe(18)}
    write_env_file(paths.credentials, creds)
    return creds


def serve(state: Path, catalog_path: Path, project_dir: Path, real_guests: tuple[str, ...] = ()) -> None:
    from .stack import LabStack  # the heavy imports (fakepve, paramiko) only in the lab process

    paths = LabPaths(state)
    creds = _credentials(paths)
    stack = LabStack.start(
        state,
        catalog_path,
        creds["LAB_ROOT_PASSWORD"],
        creds["LAB_GUEST_PASSWORD"],
        project_dir=project_dir,
        real_guests=real_guests,
    )
    token = secrets.token_urlsafe(24)
    control = ControlServer(
        token,
        {
            "publish": stack.mirror.publish,
            "corrupt": lambda k: stack.mirror.corrupt(k, True),
            "repair": lambda k: stack.mirror.corrupt(k, False),
        },
        keys=sorted(stack.mirror.items),
    )
    write_env_file(
        paths.env_file, stack.env(), header="Written by `packer-assets lab up`: points the project at the lab."
    )
    info = {
        "pid": os.getpid(),
        "argv": sys.argv,
        "started": time.time(),
        "control_port": control.port,
        "control_token": token,
        **stack.describe(),
    }
    atomic_write(paths.state_json, json.dumps(info, indent=2), mode=0o600)
    print(f"lab ready: {json.dumps(stack.describe())}", flush=True)

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    stopping.wait()
    control.stop()
    stack.stop()
    print("lab stopped", flush=True)


# ------------------------------------------------------------------ the commands


def _read_state(paths: LabPaths) -> dict | None:
    try:
        return json.loads(paths.state_json.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _ours(pid: int, paths: LabPaths) -> bool:
    """True if pid is a running lab process for this state folder (never signal a recycled pid)."""
    args = process_argv(pid) or []
    return SERVICE_MODULE in args and str(paths.state.resolve()) in args


def running_state(state: Path) -> dict | None:
    paths = LabPaths(state)
    info = _read_state(paths)
    if info and _ours(int(info["pid"]), paths):
        return info
    return None


def up(
    state: Path, catalog_path: Path | None = None, project_dir: Path | None = None, real_guests: tuple[str, ...] = ()
) -> dict:
    """Start the lab for the catalog (default: the project's, as `catalog check` finds it); the VMs of the
    keys in real_guests run for real (the base image is built here, with progress lines, if not cached)."""
    from packer_assets.catalog import load_catalog

    paths = LabPaths(state.resolve())
    info = running_state(paths.state)
    if info:
        running = sorted(info.get("real_guests") or {})
        if running != sorted(real_guests) and real_guests:
            raise LabError(
                f"a lab is already running for {state} with real guests for "
                f"{', '.join(running) or 'no key'}: stop it first (`packer-assets lab down`)"
            )
        return info
    project_dir = (project_dir or Path.cwd()).resolve()
    catalog = load_catalog(catalog_path, project_dir=project_dir)  # a broken catalog fails here, before any process
    if real_guests:
        from .realguest.image import real_guest_unavailable
        from .stack import check_real_guest_keys, real_guest_accel, real_guest_images

        for suite in sorted(set(check_real_guest_keys(catalog, tuple(real_guests)).values())):
            why = real_guest_unavailable(suite)
            if why:
                raise LabError(f"--real-guest: this machine cannot run real guests: {why}")
        say = lambda line: print(line, flush=True)  # noqa: E731
        images = real_guest_images(catalog, tuple(real_guests), say)  # minutes the first time per suite
        # The accelerator is chosen here, in the open (its probe is bounded); the service then finds it remembered.
        real_guest_accel(images, say)
    paths.state.mkdir(parents=True, exist_ok=True)
    paths.state_json.unlink(missing_ok=True)
    argv = [
        sys.executable,
        "-m",
        SERVICE_MODULE,
        "--state",
        str(paths.state),
        "--catalog",
        str(catalog.path),
        "--project-dir",
        str(project_dir),
        *(["--real-guest", ",".join(real_guests)] if real_guests else []),
    ]
    with open(paths.log, "ab") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True, cwd=paths.state
        )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        info = _read_state(paths)
        if info and info.get("pid") == proc.pid:
            return info
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    if proc.poll() is None:
        proc.terminate()
    tail = paths.log.read_text(errors="replace").splitlines()[-15:]
    raise LabError(f"the lab did not start (see {paths.log}):\n" + "\n".join(tail))


def down(state: Path) -> bool:
    """Stop the lab this state folder's `up` started. False if none was running."""
    paths = LabPaths(state.resolve())
    info = _read_state(paths)
    if not info or not _ours(int(info["pid"]), paths):
        return False
    pid = int(info["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline and _ours(pid, paths):
        time.sleep(0.1)
    if _ours(pid, paths):
        os.kill(pid, signal.SIGKILL)
    paths.state_json.unlink(missing_ok=True)
    return True


def control(state: Path, action: str, key: str) -> object:
    info = running_state(state.resolve())
    if not info:
        raise LabError(f"no lab is running for {state} (start it with `packer-assets lab up`)")
    response = requests.post(
        f"http://127.0.0.1:{info['control_port']}/{action}/{key}",
        headers={"Authorization": f"Bearer {info['control_token']}"},
        timeout=30,
    )
    try:
        body = response.json()
    except ValueError:  # not the control server's JSON (e.g. a 404 page for a key with a slash)
        body = {"error": f"HTTP {response.status_code}, not an answer of the lab's control server"}
    if response.status_code != 200 or not isinstance(body, dict) or "result" not in body:
        raise LabError(f"lab {action} {key!r}: {body.get('error') if isinstance(body, dict) else body}")
    return body["result"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=SERVICE_MODULE)
    parser.add_argument("--state", required=True, type=Path)
    parser.add_argument("--catalog", type=Path, required=True)
    parser.add_argument("--project-dir", type=Path, required=True)
    parser.add_argument("--real-guest", default="", help="comma-separated keys whose VMs run for real")
    args = parser.parse_args(argv)
    serve(args.state, args.catalog, args.project_dir, tuple(k for k in args.real_guest.split(",") if k))


if __name__ == "__main__":
    main()
