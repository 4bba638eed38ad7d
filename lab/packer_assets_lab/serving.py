"""Serve a FakePve (or LabPve) from synchronous code: its own event loop in a daemon thread.

The same idea as fakepve's pytest plugin (_Serving), as a public, reusable piece: the lab runner,
the demo and the test fixtures all serve the fake this way, so none of them needs an event loop.
"""

import asyncio
import threading

from fakepve import settle

TIMEOUT = 30.0


class ServedPve:
    """`pve` listening on https://host:port with the lab's certificate (a LabPki).

    host and port default to the pve's own (LabPve: 127.0.0.1 and port 0). Port 0 asks the system
    for a free port; pve.port holds the real one once started. The certificate must name the host.
    """

    def __init__(self, pve, pki, host=None, port=None):
        self.pve = pve
        self.pki = pki
        if host is not None:
            pve.host = host
        if port is not None:
            pve.port = port
        self.loop = None
        self.thread = None

    @property
    def url(self):
        return self.pve.url

    @property
    def ca_file(self):
        return self.pki.ca_file

    def start(self):
        if self.thread is not None:
            raise RuntimeError("already started")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="lab-pve", daemon=True)
        self.thread.start()
        try:
            self.call(self.pve.start(self.pki.cert_file, self.pki.key_file))
        except BaseException:
            self._halt()
            raise
        return self

    def call(self, coro, timeout=TIMEOUT):
        """Run a coroutine on the fake's loop (state changes must happen there) and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self):
        if self.thread is None:
            return
        try:
            self.call(settle())
            self.call(self.pve.stop())
        finally:
            self._halt()

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def _halt(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        if not self.thread.is_alive():
            self.loop.close()
        self.thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
