"""``python -m bridge_child.tcp``: a worker that serves the framed protocol over a TCP connection.

Used where the worker does not run beside its host (a Ray node, ``dspex_trio._ray_launcher``) and by
the host's TCP launcher (``dspex_trio._tcp_worker``). The process is started with a pipe on its stdin:

1. it reads the pool's secret (hex, one line, at most ``MAX_SECRET_LINE_BYTES``) from stdin, so the
   secret is in neither its argv nor its environment; the pipe then stays open as its *lifeline*:
   when the process that started it (the host's launcher or the node's agent) is gone, stdin hangs up
   and the worker exits, taking its process group with it;
2. it connects to ``--connect HOST:PORT`` (the host's worker listener), receives the host's challenge
   (``MAGIC`` + a random nonce) and answers with its claims (its token, pid and node) authenticated by
   ``HMAC-SHA256(secret, nonce + claims)``; the host compares in constant time and answers ``ACCEPT``
   or closes the connection (refused: the worker exits with ``EXIT_REFUSED``);
3. it serves the same framed protocol as a stdio worker (``bridge_child._server``) on the socket.

The handshake's encoding (``challenge``, ``auth_message``, ``parse_auth_header``, ``verify_auth``) is
pure and sans-IO, like ``wire``; the host uses the same functions. Every step is bounded in size and
time. The challenge makes a recorded answer useless on another connection.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import select
import socket
import struct
import sys
import threading
from typing import Any, Final

MAGIC: Final = b"DSPXTCP1"
"""First bytes of the challenge and of the answer: a stray client is refused at once."""
NONCE_BYTES: Final = 32
MAC_BYTES: Final = hashlib.sha256().digest_size
CHALLENGE_BYTES: Final = len(MAGIC) + NONCE_BYTES
AUTH_HEADER: Final = struct.Struct(">8sI")
"""The answer's header: ``MAGIC`` and the length of the claims (JSON) that follow, then the MAC."""
MAX_CLAIMS_BYTES: Final = 4096
"""Largest claims document accepted (token, pid, node)."""
ACCEPT: Final = b"\x01"
"""The host's one-byte answer to a valid handshake."""
MAX_SECRET_LINE_BYTES: Final = 1024
"""Most bytes of the secret line read from stdin."""
MIN_SECRET_BYTES: Final = 16
"""Shortest secret accepted (bytes, before hex encoding)."""
CONNECT_TIMEOUT_S: Final = 10.0
"""Connecting to the host and completing the handshake, each step at most this long."""
EXIT_REFUSED: Final = 5
"""Exit code when the host refused the handshake (or never answered it)."""
EXIT_NO_SECRET: Final = 6
"""Exit code when stdin did not carry a usable secret."""


ACCELERATOR_ENV: Final = frozenset(
    {
        "CUDA_VISIBLE_DEVICES",  # NVIDIA and MetaX GPUs
        "HIP_VISIBLE_DEVICES",  # AMD GPUs
        "ZE_AFFINITY_MASK", "ONEAPI_DEVICE_SELECTOR",  # Intel GPUs
        "NEURON_RT_VISIBLE_CORES",  # AWS Neuron cores
        "TPU_VISIBLE_CHIPS",  # TPUs
        "HABANA_VISIBLE_MODULES",  # Intel Gaudi HPUs
        "ASCEND_RT_VISIBLE_DEVICES",  # Huawei Ascend NPUs
        "RBLN_DEVICES",  # Rebellions NPUs
        "FURIOSA_DEVICES",  # FuriosaAI NPUs
        "QBRUNTIME_VISIBLE_DEVICES",  # Mobilint NPUs
        "TT_VISIBLE_DEVICES",  # Tenstorrent NPUs
    }
)  # fmt: skip
"""The variables Ray (2.60) sets to give a task or actor its accelerators: the only ones a TCP spawn's
``env`` may set (``bridge_child._zygote``)."""
MAX_ACCELERATOR_ENV_CHARS: Final = 1024
"""Longest value of one of them (a list of device ids)."""


class AuthError(ValueError):
    """A handshake message is malformed, too large, or not authenticated by the pool's secret."""


def challenge(nonce: bytes) -> bytes:
    """The host's first message."""
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"a nonce is {NONCE_BYTES} bytes")
    return MAGIC + nonce


def parse_challenge(data: bytes) -> bytes:
    """The nonce of a challenge (``CHALLENGE_BYTES`` long)."""
    if len(data) != CHALLENGE_BYTES or not data.startswith(MAGIC):
        raise AuthError("not a dspex-trio worker listener")
    return data[len(MAGIC) :]


def _mac(secret: bytes, nonce: bytes, body: bytes) -> bytes:
    return hmac.new(secret, nonce + body, hashlib.sha256).digest()


def auth_message(secret: bytes, nonce: bytes, claims: dict[str, Any]) -> bytes:
    """The worker's answer to ``nonce``: header, claims (JSON), MAC."""
    body = json.dumps(claims, separators=(",", ":"), sort_keys=True).encode()
    if len(body) > MAX_CLAIMS_BYTES:
        raise ValueError(f"claims of {len(body)} bytes exceed {MAX_CLAIMS_BYTES}")
    return AUTH_HEADER.pack(MAGIC, len(body)) + body + _mac(secret, nonce, body)


def parse_auth_header(data: bytes) -> int:
    """How many bytes follow the header (claims + MAC); ``AuthError`` for a bad header."""
    if len(data) != AUTH_HEADER.size:
        raise AuthError("short header")
    magic, length = AUTH_HEADER.unpack(data)
    if magic != MAGIC:
        raise AuthError("bad magic")
    if length > MAX_CLAIMS_BYTES:
        raise AuthError(f"claims of {length} bytes exceed {MAX_CLAIMS_BYTES}")
    return int(length) + MAC_BYTES


def verify_auth(secret: bytes, nonce: bytes, rest: bytes) -> dict[str, Any]:
    """The claims of an answer's ``rest`` (what follows the header), if its MAC is the secret's for
    ``nonce`` (compared in constant time); ``AuthError`` otherwise. The claims are parsed only once
    authenticated, and must be an object with a string ``token``, an int ``pid`` and a string ``node``."""
    if len(rest) < MAC_BYTES:
        raise AuthError("short answer")
    body, mac = rest[:-MAC_BYTES], rest[-MAC_BYTES:]
    if not hmac.compare_digest(mac, _mac(secret, nonce, body)):
        raise AuthError("wrong secret")
    try:
        claims = json.loads(body)
    except ValueError as exc:
        raise AuthError(f"claims are not JSON: {exc}") from None
    if (
        not isinstance(claims, dict)
        or not isinstance(claims.get("token"), str)
        or not isinstance(claims.get("pid"), int)
        or isinstance(claims.get("pid"), bool)
        or not isinstance(claims.get("node"), str)
    ):
        raise AuthError("claims need a string token, an int pid and a string node")
    return claims


def parse_secret_line(line: bytes) -> bytes:
    """The secret of the stdin line (hex); ``ValueError`` if it is not one."""
    secret = bytes.fromhex(line.strip().decode("ascii"))
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"a secret is at least {MIN_SECRET_BYTES} bytes")
    return secret


# -- the process ---------------------------------------------------------------------------------------
def _read_line(fd: int) -> bytes:
    data = b""
    while not data.endswith(b"\n") and len(data) < MAX_SECRET_LINE_BYTES:
        chunk = os.read(fd, 1)
        if not chunk:
            break
        data += chunk
    return data


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the host closed the connection")
        data += chunk
    return data


def connect(address: tuple[str, int], secret: bytes, claims: dict[str, Any]) -> socket.socket:
    """A connection to the host, authenticated (blocking, each step bounded by ``CONNECT_TIMEOUT_S``).

    Raises ``OSError`` if it cannot connect, ``AuthError`` if the host refused or is no listener."""
    sock = socket.create_connection(address, timeout=CONNECT_TIMEOUT_S)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        nonce = parse_challenge(_recv_exactly(sock, CHALLENGE_BYTES))
        sock.sendall(auth_message(secret, nonce, claims))
        try:
            answer = _recv_exactly(sock, len(ACCEPT))
        except ConnectionError:
            raise AuthError("the host refused the handshake") from None
        if answer != ACCEPT:
            raise AuthError("the host refused the handshake")
        sock.settimeout(None)
        return sock
    except BaseException:
        sock.close()
        raise


def _watch_lifelines(lifeline_fd: int, sock_fd: int) -> None:
    """Exit when the process that started us is gone (stdin hangs up) or the host half-closed the
    connection (``POLLRDHUP``), whatever the worker's reader is doing (it may be stuck in a call)."""
    from bridge_child._server import _parent_gone

    def watch() -> None:
        poller = select.poll()
        poller.register(lifeline_fd, 0)  # POLLHUP and POLLERR are always reported
        poller.register(sock_fd, getattr(select, "POLLRDHUP", 0))
        gone = select.POLLHUP | select.POLLERR | select.POLLNVAL | getattr(select, "POLLRDHUP", 0)
        while True:
            for _fd, events in poller.poll():
                if events & gone:
                    _parent_gone()

    threading.Thread(target=watch, name="bridge-lifeline", daemon=True).start()


def split_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--connect takes HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


def main(argv: list[str]) -> int:
    """``--connect HOST:PORT --token TOKEN [--node NAME]``, then the arguments of ``bridge_child``."""
    os.dup2(2, 1)  # stdout hygiene: nothing printed reaches a frame stream (frames go to the socket)
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bridge_child.tcp", add_help=False)
    parser.add_argument("--connect", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--node", default="")
    ours, rest = parser.parse_known_args(argv)
    return serve(ours.connect, ours.token, ours.node, rest)


def serve(connect_to: str, token: str, node: str, worker_argv: list[str]) -> int:
    """Steps 1-3 of the module doc, in this process: fd 0 carries the secret then is the lifeline, fds
    1 and 2 are stderr. Used by :func:`main` and by a worker a node agent's zygote forked
    (``bridge_child._zygote``, a ``spawn`` with ``tcp``)."""
    from bridge_child import _server

    args = _server.parse_args(worker_argv)
    _server.prepare_process()
    try:
        secret = parse_secret_line(_read_line(0))
    except ValueError as exc:
        print(f"bridge_child: no usable secret on stdin: {exc}", file=sys.stderr)
        return EXIT_NO_SECRET
    claims = {"token": token, "pid": os.getpid(), "node": node or socket.gethostname()}
    try:
        sock = connect(split_address(connect_to), secret, claims)
    except (OSError, AuthError) as exc:
        print(f"bridge_child: cannot connect to the host {connect_to}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    del secret
    fd = sock.detach()
    _watch_lifelines(0, fd)
    return _server.run_worker(args, fd, fd)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
