"""The HTTP door as an attacker tries it (issue 20): compressed bodies, bytes that are not HTTP, every error in
OpenAI's shape with the field at fault."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import re
import socket
import subprocess
import sys
import time
import zlib

import aiohttp
from serving_helpers import GatedModel, Served, running, wait_until

from mrl.serving.config import RequestLimits


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=300))


def raw_http(port: int, data: bytes, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """Send `data` as is and read the answer until the server closes: (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        with contextlib.suppress(OSError):  # the server may answer and close before reading it all
            s.sendall(data)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
            if b"\r\n\r\n" in reply:
                head, _, body = reply.partition(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                if length and len(body) >= int(length.group(1)):
                    break
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def assert_openai_error(status: int, headers: dict[str, str], body: bytes, want_status: int | None = None) -> dict:
    """The answer is OpenAI's error shape, as JSON; returns its `error`."""
    assert headers.get("content-type", "").startswith("application/json"), (status, headers, body[:300])
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if want_status is not None:
        assert status == want_status, (status, error)
    return error


# Requests aiohttp's own parser refuses before any route runs: these came back as plain text.
MALFORMED = {
    "a header line over 8 KiB": b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
    "Content-Length with Transfer-Encoding": (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "a 100 KB request line": b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "200 headers": b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n",
    "a chunk size that is not hex": (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"
    ),
    "a bad Content-Length": b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "not HTTP at all": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 64 + b"\r\n\r\n",
}


def test_bytes_that_are_not_http_get_an_openai_shaped_json_error(tiny_artifact):
    model = GatedModel.open(tiny_artifact)

    async def scenario():
        async with running([model], http_port=0) as server:
            port = server.http_port
            replies = {name: await asyncio.to_thread(raw_http, port, data) for name, data in MALFORMED.items()}
            after = await asyncio.to_thread(raw_http, port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            return replies, after

    replies, after = run(scenario())
    for name, (status, headers, body) in replies.items():
        error = assert_openai_error(status, headers, body)
        assert 400 <= status < 500 and error["type"] == "invalid_request_error", (name, status, error)
    assert after[0] == 200  # and the server is fine after them


# (body, the field OpenAI's `param` must name): found by the protocol, the core or the model's plan.
PARAMS = [
    ({"input": "a", "dimensions": 33}, "dimensions"),
    ({"input": "a", "dimensions": 0}, "dimensions"),
    ({"input": "a", "layers": 3}, "layers"),
    ({"input": "a", "prompt_name": "nope"}, "prompt_name"),
    ({"input": "word " * 200}, "input"),
    ({"input": ["a"] * 5}, "input"),
    ({"input": ""}, "input"),
    ({"input": "a", "model": "nope"}, "model"),
    ({"input": "a", "dimensions": 12, "encoding_format": "int8"}, "output_dtype"),  # the encoding asked for
    ({"input": "a", "dimensions": 12, "output_dtype": "int8"}, "output_dtype"),
    ({"input": "a", "encoding_format": "int4"}, "encoding_format"),
    ({"input": "a", "truncate": "yes"}, "truncate"),
]


def test_every_error_names_the_field_at_fault_wherever_it_was_found(tiny_artifact):
    model = GatedModel.open(tiny_artifact)
    limits = RequestLimits(max_inputs_per_request=4)

    async def scenario():
        async with running([model], http_port=0, limits=limits) as server, aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{server.http_port}/v1/embeddings"
            replies = []
            for body, _ in PARAMS:
                async with s.post(url, json=body) as r:
                    replies.append((r.status, (await r.json())["error"]))
            return replies

    for (body, param), (status, error) in zip(PARAMS, run(scenario()), strict=True):
        assert 400 <= status < 500 and error["param"] == param, (body, status, error)


def gzip_bomb(inflated: int = 1 << 30) -> bytes:
    """About 1 MB of gzip that inflates to `inflated` bytes of zeros."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = b"\0" * (1 << 20)
    return b"".join(packer.compress(zeros) for _ in range(inflated >> 20)) + packer.flush()


PROBE = """
import json, sys, time, urllib.request
url, seconds = sys.argv[1], float(sys.argv[2])
seen, failed, stop = [], [], time.monotonic() + seconds
print("probing", flush=True)
while time.monotonic() < stop:
    start = time.perf_counter()
    try:
        urllib.request.urlopen(url, timeout=1).read()
        seen.append(time.perf_counter() - start)
    except Exception as e:
        failed.append(repr(e))
    time.sleep(0.02)
print(json.dumps({"seen": seen, "failed": failed}))
"""


def http_port(served: Served) -> int:
    for line in served.lines:
        if m := re.search(r"HTTP on http://127\.0\.0\.1:(\d+)", line):
            return int(m.group(1))
    raise AssertionError("no HTTP port in the log:\n" + "".join(served.lines))


def test_a_gzip_bomb_is_refused_at_once_and_health_keeps_answering(tiny_artifact, tmp_path):
    """~1 MB of gzip that inflates to 1 GiB, sent to the embeddings route, with and without the token, and to a
    route that takes no POST: refused, and a probe in a process of its own sees health answer throughout."""
    bomb = gzip_bomb()
    (tmp_path / "token").write_text("secret\n")
    served = Served(str(tiny_artifact), "--port", "0", "--http-port", "0", "--auth-token-file", str(tmp_path / "token"))
    try:
        assert served.ready.wait(timeout=120) and served.proc.poll() is None, "".join(served.lines)
        port = http_port(served)
        probe = subprocess.Popen(
            [sys.executable, "-c", PROBE, f"http://127.0.0.1:{port}/health", "20"], stdout=subprocess.PIPE, text=True
        )
        assert probe.stdout.readline().strip() == "probing"
        time.sleep(1)  # a quiet second first
        gz = b"Content-Encoding: gzip\r\nContent-Type: application/json\r\n"
        length = b"Content-Length: %d\r\n\r\n" % len(bomb)
        replies = []
        for head in (
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer secret\r\n",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n",  # no token: 401
            b"POST /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer secret\r\n",  # 405
        ):
            replies.append(raw_http(port, head + gz + length + bomb))
            time.sleep(2)  # what followed each bomb: the event loop inflated the unread body for seconds
        probed = json.loads(probe.communicate(timeout=60)[0])
    finally:
        served.stop()
    assert probed["seen"] and not probed["failed"], probed["failed"][:5]  # a 1 s stall would fail a probe
    statuses = [assert_openai_error(*reply) and reply[0] for reply in replies]
    assert statuses == [415, 401, 405], replies
    error = json.loads(replies[0][2])["error"]
    assert "Content-Encoding" in error["message"] and error["param"] == "Content-Encoding", error


def test_a_body_that_never_arrives_is_answered_408_and_the_connection_freed(tiny_artifact):
    """A client that sends its headers and then one byte a minute held a connection and a handler for ever
    (the idle timeout does not apply in the middle of a request): the body's read is bounded too."""
    model = GatedModel.open(tiny_artifact)

    async def scenario():
        async with running([model], http_port=0, idle_timeout_s=1.0) as server:
            head = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
            return await asyncio.to_thread(raw_http, server.http_port, head, 30)

    status, headers, body = run(scenario())
    error = assert_openai_error(status, headers, body, 408)
    assert "body" in error["message"] and headers.get("connection") == "close", (error, headers)


def test_cohere_s_route_refuses_a_compressed_or_stalled_body_in_cohere_s_shape(tiny_artifact):
    """Cohere's SDK reads {"id", "message"}: the door's refusals before any parsing keep to the route's shape."""
    model = GatedModel.open(tiny_artifact)
    gzipped = b"POST /v2/embed HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nContent-Length: 2\r\n\r\n{}"
    stalled = b"POST /v2/embed HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"

    async def scenario():
        async with running([model], http_port=0, idle_timeout_s=1.0) as server:
            return [await asyncio.to_thread(raw_http, server.http_port, head, 30) for head in (gzipped, stalled)]

    replies = run(scenario())
    assert [status for status, _, _ in replies] == [415, 408], replies
    for _, _, body in replies:
        error = json.loads(body)
        assert set(error) == {"id", "message"}, error


def test_a_body_of_millions_of_tiny_values_is_refused_while_health_keeps_answering(tiny_artifact):
    """16 MiB of `{},` in `outputs` (5.6 million outputs; 8 are taken), of `"",` and `[],` in `input` and of `"",`
    in Cohere's `texts`: each item was parsed and read before the count was checked, which held the event loop
    for seconds (`outputs`: 13 s). Now the values are counted before parsing, and a probe in a process of its
    own sees health answer throughout."""
    many = (16 << 20) // 3 - 16
    bodies = [
        ("/v1/embeddings", b'{"input": "a", "outputs": [' + b"{}," * many + b"{}]}", "more JSON values"),
        ("/v1/embeddings", b'{"input": [' + b'"",' * many + b'""]}', "more JSON values"),
        ("/v1/embeddings", b'{"input": [' + b"[]," * many + b"[]]}", "more JSON values"),
        ("/v2/embed", b'{"texts": [' + b'"",' * many + b'""]}', "more JSON values"),
    ]
    served = Served(str(tiny_artifact), "--port", "0", "--http-port", "0")
    try:
        assert served.ready.wait(timeout=120) and served.proc.poll() is None, "".join(served.lines)
        port = http_port(served)
        probe = subprocess.Popen(
            [sys.executable, "-c", PROBE, f"http://127.0.0.1:{port}/health", "14"], stdout=subprocess.PIPE, text=True
        )
        assert probe.stdout.readline().strip() == "probing"
        time.sleep(1)
        replies = []
        for path, body, _ in bodies:
            head = b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" % path.encode()
            replies.append(raw_http(port, head + b"Content-Length: %d\r\n\r\n" % len(body) + body))
            time.sleep(1)
        probed = json.loads(probe.communicate(timeout=60)[0])
    finally:
        served.stop()
    for (path, _, words), (status, _, body) in zip(bodies, replies, strict=True):
        message = json.loads(body)["error"]["message"] if path == "/v1/embeddings" else json.loads(body)["message"]
        assert status == 400 and words in message, (path, status, body[:300])
    assert probed["seen"] and not probed["failed"], probed["failed"][:5]  # a 1 s stall would fail a probe


def test_bodies_past_what_the_server_holds_at_once_are_refused_before_they_are_read(tiny_artifact):
    """Connections that each send most of a body as large as allowed and then wait: their bodies were all held
    in memory (a thousand 16 MiB bodies: 16 GB). Past 8 bodies of the largest size, a request is answered 429
    with Retry-After before its body is read; one over the size limit gets 413 at once, not after its upload."""
    model = GatedModel.open(tiny_artifact)
    limit = 1 << 20
    head = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"

    def answer(s: socket.socket) -> bytes:
        s.settimeout(1.5)
        try:
            return s.recv(65536)
        except TimeoutError:
            return b""  # still waiting for the rest of its body

    async def scenario():
        async with running([model], http_port=0, limits=RequestLimits(max_message_bytes=limit)) as server:

            def attack() -> tuple[list[bytes], bytes]:
                with contextlib.ExitStack() as stack:
                    socks = []
                    for _ in range(12):
                        s = stack.enter_context(socket.create_connection(("127.0.0.1", server.http_port)))
                        s.sendall(head % (limit - 10) + b" " * (limit - 100))
                        socks.append(s)
                        time.sleep(0.05)
                    too_large = stack.enter_context(socket.create_connection(("127.0.0.1", server.http_port)))
                    too_large.sendall(head % (limit + 1))
                    return [answer(s) for s in socks], answer(too_large)

            return await asyncio.to_thread(attack)

    answers, too_large = run(scenario())
    assert answers[:8] == [b""] * 8, [a[:60] for a in answers]
    for reply in answers[8:]:
        assert reply.startswith(b"HTTP/1.1 429") and b"Retry-After: 1" in reply and b"retry shortly" in reply, reply
    assert too_large.startswith(b"HTTP/1.1 413") and b"over this server's limit" in too_large, too_large


def test_small_chunked_bodies_hold_only_their_size_once_read(tiny_artifact):
    """A chunked body counts as the largest allowed until it is read; it held that through the whole embed, so
    nine small chunked requests waiting on a busy model got a 429 (streaming clients, proxies that do not buffer)."""
    model = GatedModel.open(tiny_artifact)
    payload = b'{"input": ["hello"]}'
    chunked = (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload)
    )

    async def scenario():
        async with running([model], http_port=0) as server:
            model.gate.clear()
            loop = asyncio.get_running_loop()
            with concurrent.futures.ThreadPoolExecutor(9) as pool:  # the default pool has too few threads here
                calls = []
                for _ in range(9):  # one after another: each is read, then waits on the model
                    calls.append(loop.run_in_executor(pool, raw_http, server.http_port, chunked, 60))
                    await asyncio.sleep(0.2)
                await wait_until(lambda: model.batches or all(c.done() for c in calls), "a batch")
                await asyncio.sleep(1.0)  # the other eight have been read and wait on the model
                model.gate.set()
                return await asyncio.gather(*calls)

    statuses = [status for status, _, _ in run(scenario())]
    assert statuses == [200] * 9, statuses
