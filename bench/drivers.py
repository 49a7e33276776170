"""Who runs a target's closed loop: this process, or a worker process in the environment that has the target's client.

Triton's client (tritonclient[grpc]) needs protobuf<7 and cannot live beside this project's stubs,
so a Triton target can run in another Python (`--client-python`, such as .venv-triton's). The
worker then runs whole levels, the same `run_level` code with the same target class, and sends the
outcomes back when a level ends: nothing crosses the pipe while a level is timed, and this process
waits idle meanwhile, so each target is loaded by exactly one client process either way.
`python -m mrl.bench.drivers` is that worker.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from mrl.bench.load import Outcome, ServeConfig, run_level
from mrl.bench.targets import TargetSpec, open_target
from mrl.runtime.errors import InvalidInputError

_LIMIT = 1 << 30  # outcomes of a long level as one JSON line


class Driver(Protocol):
    """Runs levels against one target."""

    label: str
    pids: tuple[int, ...]  # client processes besides this one, whose CPU is ours, not other load

    async def run_level(
        self, concurrency: int, mix: tuple[int, ...] | None, layers_mix: tuple[int, ...] | None = None
    ) -> list[Any]:
        """One level's outcomes."""
        ...

    async def close(self) -> None:
        """Stop and release."""
        ...


def spec_to_json(spec: TargetSpec) -> dict[str, Any]:
    """A TargetSpec as JSON-safe data."""
    data = dataclasses.asdict(spec)
    if spec.root_certificates is not None:
        data["root_certificates"] = base64.b64encode(spec.root_certificates).decode()
    return data


def spec_from_json(data: dict[str, Any]) -> TargetSpec:
    """The inverse of `spec_to_json`."""
    roots = data.get("root_certificates")
    outputs = tuple((d, e) for d, e in data.get("outputs", ()))  # JSON made the pairs lists
    return TargetSpec(**{**data, "root_certificates": base64.b64decode(roots) if roots else None, "outputs": outputs})


class LocalDriver:
    """The target's client runs on this process's event loop."""

    pids: tuple[int, ...] = ()

    def __init__(self, spec: TargetSpec, config: Any) -> None:
        self.label = spec.label
        self._target = open_target(spec)
        self._config = config

    async def start(self) -> None:
        """Connect."""
        await self._target.connect()

    async def run_level(
        self, concurrency: int, mix: tuple[int, ...] | None, layers_mix: tuple[int, ...] | None = None
    ) -> list[Any]:
        """One level, here."""

        return await run_level(self._target, self._config, concurrency, mix, layers_mix)

    async def close(self) -> None:
        """Disconnect."""
        await self._target.close()


class WorkerDriver:
    """The target's client runs in `python -m mrl.bench.drivers` under another interpreter."""

    def __init__(self, spec: TargetSpec, config: Any, python: str) -> None:
        self.label = spec.label
        self.pids: tuple[int, ...] = ()
        self._spec, self._config, self._python = spec, config, python
        self._proc: asyncio.subprocess.Process | None = None

    async def _ask(self, message: dict[str, Any]) -> dict[str, Any]:
        self._proc.stdin.write((json.dumps(message) + "\n").encode())
        await self._proc.stdin.drain()
        line = await self._proc.stdout.readline()
        if not line:
            err = (await self._proc.stderr.read()).decode(errors="replace").strip().splitlines()
            raise InvalidInputError(f"the client worker ({self._python}) stopped: {err[-1] if err else 'no message'}")
        answer = json.loads(line)
        if "error" in answer:
            raise InvalidInputError(f"client worker for {self.label}: {answer['error']}")
        return answer

    async def start(self) -> None:
        """Start the worker and have it connect."""
        try:
            self._proc = await asyncio.create_subprocess_exec(
                self._python,
                "-m",
                "mrl.bench.drivers",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                limit=_LIMIT,
            )
        except OSError as e:
            raise InvalidInputError(f"cannot start the client worker {self._python}: {e.strerror}") from None
        self.pids = (self._proc.pid,)
        config = {k: v for k, v in dataclasses.asdict(self._config).items() if k in _WORKER_FIELDS}
        await self._ask({"target": spec_to_json(self._spec), "config": config})

    async def run_level(
        self, concurrency: int, mix: tuple[int, ...] | None, layers_mix: tuple[int, ...] | None = None
    ) -> list[Any]:
        """One level, in the worker; its outcomes back."""

        ask = {"concurrency": concurrency, "mix": None if mix is None else list(mix)}
        answer = await self._ask({**ask, "layers_mix": None if layers_mix is None else list(layers_mix)})
        return [Outcome(**o) for o in answer["outcomes"]]

    async def close(self) -> None:
        """End the worker (closing its input is its signal to disconnect and exit)."""
        if self._proc is None or self._proc.returncode is not None:
            return
        self._proc.stdin.close()
        try:
            await asyncio.wait_for(self._proc.wait(), timeout=30)
        except asyncio.TimeoutError:
            self._proc.kill()
            await self._proc.wait()


# ServeConfig fields a worker needs to run levels the same way (targets, pids and rounds stay here).
_WORKER_FIELDS = ("texts", "requests", "duration_s", "warmup_requests", "texts_per_request", "request_timeout_s")


async def open_driver(spec: TargetSpec, config: Any, python: str | None) -> Driver:
    """A started driver for `spec`: in this process, or in a worker under `python`."""
    driver = LocalDriver(spec, config) if python is None else WorkerDriver(spec, config, python)
    await driver.start()
    return driver


def process_tree(pids: Sequence[int]) -> tuple[int, ...]:
    """The pids and all their descendants (Triton runs each Python-backend model in a child process)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            parents[int(stat.parent.name)] = int(text[text.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = set(pids), set(pids)
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return tuple(sorted(found))


async def _serve_worker() -> None:
    """The worker's side: a setup line, then one line per level; outcomes back as one line each."""

    loop = asyncio.get_running_loop()
    read = sys.stdin.readline
    setup = json.loads(await loop.run_in_executor(None, read))
    spec = spec_from_json(setup["target"])
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in setup["config"].items()}
    config = ServeConfig(targets=(spec,), **fields)
    target = open_target(spec)
    try:
        await target.connect()
    except Exception as e:  # the parent reports it in one line
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        return
    print(json.dumps({"ready": True}), flush=True)
    try:
        while line := await loop.run_in_executor(None, read):
            ask = json.loads(line)
            mix = None if ask["mix"] is None else tuple(ask["mix"])
            layers_mix = None if ask.get("layers_mix") is None else tuple(ask["layers_mix"])
            outcomes = await run_level(target, config, ask["concurrency"], mix, layers_mix)
            print(json.dumps({"outcomes": [dataclasses.asdict(o) for o in outcomes]}), flush=True)
    finally:
        await target.close()


if __name__ == "__main__":
    asyncio.run(_serve_worker())
