"""Client for modeld using only the Python standard library.

    from modeld_client import Client
    with Client() as c:
        print(c.call("status"))
        for event in c.stream("events.subscribe"):
            print(event)

The daemon speaks JSON-RPC 2.0, one JSON object per line, on a Unix socket.
Also a command line: ``python3 modeld_client.py status`` or
``python3 modeld_client.py --stream events.subscribe``.
"""

import itertools
import json
import os
import socket
import sys

__all__ = ["Client", "ModeldError", "call", "stream", "default_socket"]


def default_socket():
    """The socket modeld listens on by default (same rules as the daemon)."""
    if os.environ.get("MODELD_SOCKET"):
        return os.environ["MODELD_SOCKET"]
    if os.environ.get("RUNTIME_DIRECTORY"):
        return os.path.join(os.environ["RUNTIME_DIRECTORY"].split(":")[0], "modeld.sock")
    if os.geteuid() == 0:
        return "/run/modeld/modeld.sock"
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "modeld", "modeld.sock")
    return "/tmp/modeld-%d/modeld.sock" % os.geteuid()


class ModeldError(Exception):
    """An error reply. ``kind`` is the stable ``data.kind`` string."""

    def __init__(self, error):
        self.code = error.get("code")
        self.message = error.get("message", "")
        self.data = error.get("data") or {}
        self.kind = self.data.get("kind")
        super().__init__("%s (%s)" % (self.message, self.kind or self.code))


class Client:
    def __init__(self, path=None, timeout=None):
        self.path = path or default_socket()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError):
            self._sock.close()
            raise ConnectionError("modeld is not running (no daemon at %s)" % self.path)
        self._reader = self._sock.makefile("rb")
        self._ids = itertools.count(1)
        self._pending = []  # notifications that arrived while waiting for a reply

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._reader.close()
        self._sock.close()

    def call(self, method, params=None):
        """Calls ``method`` and returns its result; raises ModeldError."""
        request_id = next(self._ids)
        self._send({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {}})
        while True:
            message = self._read()
            if message.get("id") == request_id:
                if "error" in message:
                    raise ModeldError(message["error"])
                return message.get("result")
            if "method" in message:
                self._pending.append(message)

    def subscribe(self, method, params=None):
        """Subscribes now and returns an iterator over the notifications.

        Unlike ``stream``, the subscription is in place when this returns,
        so nothing that happens afterwards is missed.
        """
        return self._notifications(self.call(method, params))

    def stream(self, method, params=None):
        """Subscribes with ``method`` and yields each notification's result.

        Ends after a result marked ``"done": true`` (yielded too), or when
        the daemon closes the connection; an error notification raises.
        """
        yield from self.subscribe(method, params)

    def _notifications(self, subscription):
        while True:
            message = self._pending.pop(0) if self._pending else self._read_or_none()
            if message is None:
                return
            payload = message.get("params") or {}
            if payload.get("subscription") != subscription:
                continue
            if "error" in payload:
                raise ModeldError(payload["error"])
            result = payload.get("result")
            yield result
            if isinstance(result, dict) and result.get("done") is True:
                return

    def _send(self, message):
        self._sock.sendall(json.dumps(message).encode() + b"\n")

    def _read_or_none(self):
        line = self._reader.readline()
        return json.loads(line) if line else None

    def _read(self):
        message = self._read_or_none()
        if message is None:
            raise ConnectionError("modeld closed the connection")
        return message


def call(method, params=None, path=None):
    """One call on a fresh connection."""
    with Client(path) as client:
        return client.call(method, params)


def stream(method, params=None, path=None):
    """Streams a subscription on a fresh connection."""
    with Client(path) as client:
        yield from client.stream(method, params)


def _main(argv):
    streaming = "--stream" in argv
    args = [a for a in argv if a != "--stream"]
    if not args:
        print("usage: modeld_client.py [--stream] METHOD [JSON-PARAMS]", file=sys.stderr)
        return 2
    params = json.loads(args[1]) if len(args) > 1 else {}
    try:
        if streaming:
            for item in stream(args[0], params):
                print(json.dumps(item), flush=True)
        else:
            print(json.dumps(call(args[0], params), indent=2))
    except (ModeldError, ConnectionError) as err:
        print("modeld_client: %s" % err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
