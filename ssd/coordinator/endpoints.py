"""Sockets of the control plane: endpoints chosen at start-up (never a fixed port) and their options."""
from __future__ import annotations

import zmq

# Control messages are few and small (one per request, one per round): never drop or block on them.
UNLIMITED = 0


def configure(socket: zmq.Socket, linger_ms: int = 1000) -> zmq.Socket:
    socket.setsockopt(zmq.SNDHWM, UNLIMITED)
    socket.setsockopt(zmq.RCVHWM, UNLIMITED)
    socket.setsockopt(zmq.LINGER, linger_ms)  # a last error message still leaves; exit never hangs
    return socket


def bind_fresh(socket: zmq.Socket, directory: str, name: str) -> str:
    """Bind to an ipc endpoint in the caller's fresh temporary directory, or to an OS-chosen TCP port
    on loopback where ipc is unavailable. Returns the endpoint peers connect to."""
    if zmq.has("ipc"):
        endpoint = f"ipc://{directory}/{name}.sock"
        socket.bind(endpoint)
        return endpoint
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    return f"tcp://127.0.0.1:{port}"
