"""``wss://``: TLS in the server (``serve_websocket(ssl_context=...)``, ``dspex-trio serve --certfile
--keyfile``) and in the remote client (``connect("wss://...", ssl_context=...)``).

A throwaway certificate for 127.0.0.1 is made per test module with the ``openssl`` command (skipped
where there is none). Real processes (openssl, ``dspex-trio serve``), real time, bounded waits.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import trio

import dspex_trio
from dspex_trio._mock import MockBackend
from tests.helpers import kill_quietly, read_until

BOUND_S = 30.0
CLI = [sys.executable, "-m", "dspex_trio"]

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost (valid 2 days) and its key, in PEM."""
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-keyout", str(key), "-out", str(cert), "-days", "2", "-nodes", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=BOUND_S,
    )  # fmt: skip
    return cert, key


def contexts(certificate: tuple[Path, Path]) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert, key = certificate
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    return server, ssl.create_default_context(cafile=str(cert))


async def test_the_remote_client_over_wss(certificate: tuple[Path, Path]) -> None:
    server_context, client_context = contexts(certificate)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(dspex_trio.serve_websocket, MockBackend(), "127.0.0.1", 0, ssl_context=server_context)
        )
        assert server.url.startswith("wss://127.0.0.1:")
        async with dspex_trio.open_backend(server.url, ssl_context=client_context) as remote:
            pid = await remote.create_program("question -> answer", session="s")
            assert (await remote.execute(pid, {"question": "q"}, session="s"))["answer"]

        with trio.fail_after(BOUND_S), pytest.raises(dspex_trio.PoolUnavailable, match="CERTIFICATE_VERIFY"):
            async with dspex_trio.connect(server.url, connect_timeout=BOUND_S):  # the system's CAs: refused
                pass  # at once: a certificate that fails is not retried
        with trio.fail_after(BOUND_S), pytest.raises(dspex_trio.PoolUnavailable):
            async with dspex_trio.connect(server.url.replace("wss", "ws", 1), connect_timeout=1.0):
                pass
        assert server.statistics().connections == 0
        nursery.cancel_scope.cancel()


async def test_serve_with_certfile_and_keyfile_serves_wss(
    certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, key = certificate
    process = await trio.lowlevel.open_process(
        [*CLI, "serve", "--port", "0", "--workers", "1", "--certfile", str(cert), "--keyfile", str(key)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        with trio.fail_after(BOUND_S):
            output = await read_until(
                process.stdout,
                lambda data: b"\n" in data,
                lambda: f"serve exited early ({process.returncode})",
            )
        url = output.decode().split()[2]
        assert url.startswith("wss://127.0.0.1:")
        async with dspex_trio.connect(url, ssl_context=contexts(certificate)[1]) as remote:
            assert remote.name == "pool"
            pid = await remote.create_program("question -> answer")
            assert (await remote.execute(pid, {"question": "q"}))["answer"]
    finally:
        kill_quietly(process.pid)
        with trio.move_on_after(BOUND_S):
            await process.wait()

    result = await trio.run_process(
        [*CLI, "serve", "--port", "0", "--certfile", str(key)], capture_stderr=True, check=False
    )
    assert result.returncode == 1
    assert b"not a certificate chain and its private key" in result.stderr
    assert len(result.stderr.decode().strip().splitlines()) == 1
