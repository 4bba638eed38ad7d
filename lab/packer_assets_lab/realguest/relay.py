"""One guest connection joined to a host TCP port: `python -I relay.py PORT`.

QEMU's `guestfwd=tcp:ADDR:PORT-cmd:...` starts this once per connection the guest makes to ADDR:PORT,
with that connection as stdin and stdout (and stderr: nothing may be written there, it would reach the
guest). It copies both ways until either side closes. Standard library only: run with `-I`, it imports
nothing of the project.
"""

import os
import socket
import sys
import threading


def _copy_to_guest(upstream: socket.socket) -> None:
    try:
        while data := upstream.recv(65536):
            os.write(1, data)
    except OSError:
        pass
    finally:
        os._exit(0)  # the host side closed: so does the guest's connection


def main() -> None:
    try:
        upstream = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30)
    except (OSError, IndexError, ValueError):
        sys.exit(1)
    upstream.settimeout(None)
    threading.Thread(target=_copy_to_guest, args=(upstream,), daemon=True).start()
    try:
        while data := os.read(0, 65536):
            upstream.sendall(data)
        upstream.shutdown(socket.SHUT_WR)
    except OSError:
        os._exit(0)
    threading.Event().wait()  # until the host side closes (_copy_to_guest exits the process)


if __name__ == "__main__":
    main()
