"""Servers for tests: an ASGI app under uvicorn on 127.0.0.1 (a free port) in a thread of its own, and a
bounded wait. Loopback only."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn


def wait_for(cond, seconds: float, what: str) -> None:
    """Poll `cond` until it is true; AssertionError naming `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:g} s waiting for {what}")
        time.sleep(0.02)


class Served:
    """`app` served by uvicorn on 127.0.0.1 at `port` (`http_url`) while the `with` block runs."""

    def __init__(self, app):
        self.app = app
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.http_url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", backlog=256))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        wait_for(lambda: self.server.started, 20, "uvicorn to start")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(20)
        self.sock.close()

    def active(self) -> int:
        """Live sessions of a qguard app's Stream engine (0 before it is built)."""
        sg = self.app.state.live_guard
        return 0 if sg is None else sg.engine.active
