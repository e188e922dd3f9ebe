"""The limits `serve` enforces itself, probed with raw sockets against a real `serve` process:
request-head size (431), idle and slow-head connections, connections per process."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support.config import API_TOKEN
from tests.support.harness import serve, service_env

MAX_HEADER_BYTES = 16_384
KEEPALIVE_S = 2
MAX_CONNECTIONS = 12


@pytest.fixture(scope="module")
def url(migrated: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("limits") / "serve.log"
    env = service_env(
        migrated,
        redis_url,
        MIRROR_MAX_HEADER_BYTES=str(MAX_HEADER_BYTES),
        MIRROR_KEEPALIVE_TIMEOUT_S=str(KEEPALIVE_S),
        MIRROR_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
    )
    with serve(env, log) as served:
        yield served
    assert "Traceback" not in log.read_text(), log.read_text()[-4000:]


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=KEEPALIVE_S + 5)


def _answer(sock: socket.socket) -> bytes:
    """Everything until the server closes (or a complete small answer arrived)."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            length = [
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ]
            if sep and length and len(body) >= length[0]:
                break
    return data


def _healthy(url: str) -> float:
    started = time.monotonic()
    assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    return time.monotonic() - started


def test_an_over_long_request_head_is_431_and_costs_nothing(url: str) -> None:
    with _connect(url) as sock:
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (4 * 1024 * 1024)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(head)
        answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert body["code"] == "header_too_large" and body["status"] == 431
    assert _healthy(url) < 1


def test_a_head_within_the_limit_is_served(url: str) -> None:
    response = httpx.get(f"{url}/healthz", headers={"X-Pad": "a" * (MAX_HEADER_BYTES // 2)})
    assert response.status_code == 200


def test_a_large_body_after_a_small_head_is_no_header_problem(url: str) -> None:
    """Head and body arrive in the same reads: only the head counts against the limit."""
    body = b"x" * 600_000
    with _connect(url) as sock:
        head = b"POST /webhooks/hatched HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
        sock.sendall(head % len(body) + body)
        answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]  # unsigned, read to its end


def test_a_head_near_the_limit_trickled_in_pieces_is_served(url: str) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * (MAX_HEADER_BYTES - 200)
    head += b"\r\n\r\n"
    with _connect(url) as sock:
        for i in range(0, len(head), 997):
            sock.sendall(head[i : i + 997])
        assert _answer(sock).startswith(b"HTTP/1.1 200")


def test_pipelined_requests_are_each_answered(url: str) -> None:
    one = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with _connect(url) as sock:
        sock.sendall(one * 3 + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                data += chunk
    assert data.count(b"HTTP/1.1 200") == 4, data


def test_a_streamed_answer_sends_its_head_before_any_event(url: str) -> None:
    """A response's first write waits for its next one, to leave with it (service/server.py);
    a stream with no event to send still gets its head at once."""
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    end = None  # past every change stored so far: the stream has nothing to send
    while True:
        page = httpx.get(f"{url}/v1/changes", params={"after": end} if end else {}, headers=auth)
        end = page.json()["next_cursor"]
        if not page.json()["data"]:
            break
    request = (
        f"GET /v1/changes/stream?after={end} HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {API_TOKEN}\r\n\r\n"
    )
    with _connect(url) as sock:
        sock.settimeout(KEEPALIVE_S)
        sock.sendall(request.encode())
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
    assert data.startswith(b"HTTP/1.1 200"), data
    assert b"content-type: text/event-stream" in data.lower()


@pytest.mark.parametrize("sends", [b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"])
def test_a_connection_without_a_complete_head_is_closed(url: str, sends: bytes) -> None:
    started = time.monotonic()
    with _connect(url) as sock:
        sock.sendall(sends)
        # A slow client keeps trickling header bytes; none of it buys more time.
        sock.settimeout(0.3)
        closed = False
        while time.monotonic() - started < KEEPALIVE_S + 3:
            try:
                if sock.recv(1024) == b"":
                    closed = True
                    break
            except TimeoutError:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.sendall(b"X")
            except ConnectionResetError:
                closed = True
                break
    assert closed
    assert time.monotonic() - started < KEEPALIVE_S + 2


def test_an_idle_keep_alive_connection_is_closed(url: str) -> None:
    with _connect(url) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _answer(sock).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert sock.recv(1024) == b""
    assert time.monotonic() - started < KEEPALIVE_S + 2


def test_connections_per_process_are_capped(url: str) -> None:
    held = [_connect(url) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)
        with _connect(url) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _answer(sock).startswith(b"HTTP/1.1 503")
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    assert _healthy(url) < 1
