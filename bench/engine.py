"""`mrl-bench engine`: backends x profiles x batch sizes x sequence lengths, against the PyTorch baseline."""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mrl.bench import flops, memory
from mrl.bench.runners import (
    BASELINE,
    EmbedderRunner,
    Runner,
    SentenceTransformerRunner,
    Variant,
    cuda_available,
    plan_baseline,
    torch_present,
)
from mrl.bench.stats import block_schedule, ratio, summarize, throughput
from mrl.bench.texts import cycle, texts_of_length
from mrl.runtime.errors import InvalidInputError
from mrl.runtime.manifest import Manifest, load_manifest
from mrl.runtime.tokenize import TextTokenizer

Progress = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """What `mrl-bench engine` measures and how often."""

    artifact: Path
    also: tuple[Path, ...] = ()  # other artifacts of the same model, timed beside it (e.g. an earlier export)
    backends: tuple[str, ...] = ("onnxruntime",)
    variants: tuple[Variant, ...] = ()  # each backend x precision once per variant (none: once, as configured)
    precisions: tuple[str, ...] | None = None  # None: every precision the artifact has
    dims: tuple[int, ...] | None = None  # None: every dims it serves
    layers: tuple[int, ...] | None = None  # None: every depth it serves (the model's total is full depth)
    batch_sizes: tuple[int, ...] = (1, 32)
    seq_lens: tuple[int, ...] = (32,)
    texts: tuple[str, ...] | None = None  # real texts replace the synthetic seq lens
    length_sorted: bool = False  # batches of neighbours in length order, as Embedder.embed cuts a corpus
    warmup: int = 5
    repeats: int = 50
    block: int = 5  # timed calls in a row per runner before the next runner's turn
    settle_ms: float = 100.0  # pause between blocks: onnxruntime's threads spin for tens of ms after a call
    baseline: str = "auto"
    threads: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    ceiling: bool = True

    def __post_init__(self) -> None:
        if self.warmup < 1 or self.repeats < 2:
            raise InvalidInputError("need at least 1 warm-up call and 2 repetitions per cell")
        if self.block < 1 or self.settle_ms < 0:
            raise InvalidInputError("block must be at least 1 and settle time at least 0 ms")
        if self.baseline not in ("auto", "none", "cpu", "cuda"):
            raise InvalidInputError(f"baseline must be auto, none, cpu or cuda, not {self.baseline!r}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise InvalidInputError("batch sizes must be at least 1")
        if self.texts is not None and not self.texts:
            raise InvalidInputError("the texts file holds no texts")


@dataclass(frozen=True, kw_only=True)
class CellTiming:
    """One runner's measurements in one cell."""

    seconds: list[float]
    peak_rss_mib: float | None
    peak_device_mib: float | None


def pair_baseline(precision: str, baseline_precisions: Sequence[str]) -> str | None:
    """The baseline precision a backend's precision is compared with: its own where it runs, else fp32."""
    if precision in baseline_precisions:
        return precision
    return "fp32" if "fp32" in baseline_precisions else None


def measure_cell(
    runners: Sequence[Runner], batches: Sequence[list[str]], dims: int, warmup: int, *, block: int, settle_s: float
) -> dict[str, CellTiming]:
    """Warm each runner up alone (its peak-memory window), then time them in alternating blocks.

    Every runner embeds `batches` in the same order. Before each block: a pause of `settle_s` so
    the previous runner's threads stop spinning, and one untimed call so this runner's thread pool
    is awake, as a steady caller finds it.
    """
    peaks: dict[str, tuple[float | None, float | None]] = {}
    for r in runners:
        memory.reset_peak_rss()
        r.reset_device_peak()
        for i in range(warmup):
            r.timed(batches[i % len(batches)], dims)
        peaks[r.label] = (memory.peak_rss_mib(), r.device_peak_mib())
    seconds: dict[str, list[float]] = {r.label: [] for r in runners}
    by_label = {r.label: r for r in runners}
    for label, calls in block_schedule(list(by_label), len(batches), block):
        runner, done = by_label[label], len(seconds[label])
        time.sleep(settle_s)
        runner.timed(batches[done], dims)
        for i in range(done, done + calls):
            seconds[label].append(runner.timed(batches[i], dims)[0])
    return {
        label: CellTiming(seconds=s, peak_rss_mib=peaks[label][0], peak_device_mib=peaks[label][1])
        for label, s in seconds.items()
    }


def cosine_stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Min and mean row-wise cosine of two `[n, d]` arrays."""
    an = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    bn = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    cos = np.sum(an * bn, axis=1)
    return {"min": float(cos.min()), "mean": float(cos.mean())}


def depth_keys(requested: Sequence[int] | None, manifest: Manifest) -> list[int | None]:
    """The `Profile.layers` to run, full depth (None) first: the requested depths, else every one served."""
    served = {p.layers for p in manifest.profiles}
    keys = served if requested is None else {None if n == manifest.total_layers else n for n in requested}
    missing = keys - served
    if missing:
        names = ", ".join(str(n) for n in manifest.layers)
        raise InvalidInputError(f"the artifact has no profiles that keep {min(missing)} layers; it serves {names}")
    return sorted(keys, key=lambda k: -(k or float("inf")))


def reference_label(runners: Sequence[Runner]) -> str | None:
    """Which runner others are checked against: the PyTorch fp32 baseline, else the first fp32 runner."""
    fp32 = [r for r in runners if r.precision == "fp32"]
    for r in fp32:
        if r.backend == BASELINE:
            return r.label
    return fp32[0].label if fp32 else None


def load_runners(config: EngineConfig, manifest: Manifest, progress: Progress) -> tuple[list[Runner], dict[str, Any]]:
    """Load every backend x precision and the planned baseline; also what loading each one cost in RSS."""
    precisions = config.precisions or tuple(manifest.precisions)
    missing = [p for p in precisions if p not in manifest.precisions]
    if missing:
        raise InvalidInputError(
            f"the artifact has no {', '.join(missing)} profiles; it has {', '.join(manifest.precisions)}"
        )
    depths = depth_keys(config.layers, manifest)
    present = torch_present()
    plan = plan_baseline(
        config.baseline,
        manifest.source,
        torch_present=present,
        cuda=present and config.baseline != "none" and cuda_available(),
    )
    if config.baseline in ("cpu", "cuda") and plan.device is None:
        raise InvalidInputError(f"cannot run the baseline: {plan.reason}")
    progress(f"baseline: {plan.reason}")
    runners: list[Runner] = []
    load_mib: dict[str, float | None] = {}
    makers: list[Callable[[], Runner]] = []
    for artifact in (config.artifact, *config.also):
        tag = "" if artifact == config.artifact else artifact.name
        other = load_manifest(artifact, verify=False)
        for n, b, p, v in itertools.product(depths, config.backends, precisions, config.variants or (None,)):
            why_not = variant_skipped(v, other, p)
            if why_not:
                progress(f"skipping {tag or artifact.name} {p} [{v.name if v else ''}]: {why_not}")
                continue
            makers.append(
                lambda a=artifact, b=b, p=p, n=n, v=v, t=tag: EmbedderRunner(a, b, p, config.threads, n, v, t)
            )
    makers += [
        (lambda p=p: SentenceTransformerRunner(manifest.source["path"], plan.device, p, config.threads))
        for p in plan.precisions
    ]
    for make in makers:
        before = memory.rss_mib()
        runner = make()
        after = memory.rss_mib()
        load_mib[runner.label] = None if before is None or after is None else after - before
        progress(f"loaded {runner.label} on {', '.join(runner.providers)}")
        runners.append(runner)
    return runners, {"baseline": dataclasses.asdict(plan), "load_rss_mib": load_mib}


def variant_skipped(variant: Variant | None, manifest: Manifest, precision: str) -> str | None:
    """Why a variant cannot run on an artifact's precision (it asks for graphs the artifact lacks), else None."""
    if variant is None or variant.options.get("graph") != "optimized":
        return None
    if any(p.ort_cpu is None for p in manifest.profiles if p.precision == precision):
        return "the artifact has no ONNX Runtime CPU graphs for it"
    return None


def measure_peaks(baseline_device: str | None, threads: int, progress: Progress) -> dict[tuple[str, str], flops.Peak]:
    """GEMM peaks on this machine's CPU (and the baseline's GPU), keyed (device, dtype), best library per key."""
    progress("measuring GEMM peaks (the ceiling)")
    found = [("cpu", p) for p in [flops.numpy_fp32_peak(), *flops.onnxruntime_peaks(threads=threads)]]
    if baseline_device is not None:  # torch is loaded already for the baseline: measure its GEMM too
        found += [(baseline_device, p) for p in flops.torch_peaks(baseline_device)]
    best: dict[tuple[str, str], flops.Peak] = {}
    for device, p in found:
        key = (device, p.dtype)
        if key not in best or p.flops_per_s > best[key].flops_per_s:
            best[key] = p
    return best


def peaks_list(peaks: dict[tuple[str, str], flops.Peak]) -> list[dict[str, Any]]:
    """Peaks as JSON rows: device, dtype, FLOP/s, library and matrix size."""
    return [{"device": device, **dataclasses.asdict(p)} for (device, _), p in peaks.items()]


def quality(runners: Sequence[Runner], texts: Sequence[str], dims: int) -> dict[str, dict[str, Any] | None]:
    """Each runner's min / mean cosine to the reference runner of its depth on the same texts (batches of 32)."""
    result: dict[str, dict[str, Any] | None] = {}
    for depth in dict.fromkeys(r.layers for r in runners):
        group = [r for r in runners if r.layers == depth]
        ref = reference_label(group)
        if ref is None:
            result.update({r.label: None for r in group})
            continue
        outputs = {}
        for r in group:
            outputs[r.label] = np.concatenate([r.timed(texts[i : i + 32], dims)[1] for i in range(0, len(texts), 32)])
        result.update({r.label: {"reference": ref, **cosine_stats(outputs[r.label], outputs[ref])} for r in group})
    return result


def build_row(
    runner: Runner,
    timing: CellTiming,
    *,
    cell: dict[str, Any],
    tokens_per_text: float,
    flops_per_token: float | None,
    peak: flops.Peak | None,
) -> dict[str, Any]:
    """One result row: latency percentiles, throughput, memory, FLOP/s against the peak."""
    texts_per_s = throughput(cell["batch_size"], timing.seconds)
    tokens_per_s = texts_per_s * tokens_per_text
    achieved = None if flops_per_token is None else flops_per_token * tokens_per_s
    return {
        "backend": runner.backend,
        "variant": runner.variant,
        "precision": runner.precision,
        "device": runner.device,
        "providers": runner.providers,
        **cell,
        "tokens_per_text": tokens_per_text,
        "latency": dataclasses.asdict(summarize(timing.seconds)),
        "texts_per_s": texts_per_s,
        "tokens_per_s": tokens_per_s,
        "peak_rss_mib": timing.peak_rss_mib,
        "peak_device_mib": timing.peak_device_mib,
        "speedup": None,
        "flops_per_token": flops_per_token,
        "flops_per_s": achieved,
        "peak": None if peak is None else dataclasses.asdict(peak),
        "fraction_of_peak": ratio(achieved, None if peak is None else peak.flops_per_s),
        "samples_ms": [round(s * 1000, 4) for s in timing.seconds],
    }


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Fill `speedup` (texts/s over the paired full-depth baseline's) and `vs_full_depth` in each row's cell."""
    key = ("dims", "batch_size", "seq_len")
    full = {(tuple(r[k] for k in key), r["backend"], r["precision"], r["device"]): r for r in rows if r["full_depth"]}
    for row in rows:
        same = full.get((tuple(row[k] for k in key), row["backend"], row["precision"], row["device"]))
        row["vs_full_depth"] = None if same is None else ratio(row["texts_per_s"], same["texts_per_s"])
    baselines = {(tuple(r[k] for k in key), r["precision"]): r for r in rows if r["backend"] == BASELINE}
    for row in rows:
        if not row["full_depth"]:
            continue  # the baseline runs every layer: a cut profile's gain over it is vs_full_depth x speedup
        cell = tuple(row[k] for k in key)
        available = [p for (c, p) in baselines if c == cell]
        paired = pair_baseline(row["precision"], available)
        if paired is None:
            continue
        base = baselines[(cell, paired)]
        row["speedup"] = {
            "vs": f"{BASELINE} {paired} {base['device']}",
            "ratio": ratio(row["texts_per_s"], base["texts_per_s"]),
        }


def batch_plan(pool: Sequence[str], batch: int, repeats: int, *, spread: bool) -> list[list[str]]:
    """The texts of each timed round: consecutive runs of `batch` texts from the pool.

    `spread`: rounds start at evenly spaced points of the pool (for a length-sorted pool, so every
    length range is measured); otherwise round i takes the i-th run, wrapping around.
    """
    if not spread:
        return [cycle(pool, batch, i * batch) for i in range(repeats)]
    return [cycle(pool, batch, (i * len(pool)) // repeats) for i in range(repeats)]


def _cells(config: EngineConfig, tokenizer: TextTokenizer, progress: Progress) -> list[tuple[int | None, list[str]]]:
    if config.texts is not None:
        if not config.length_sorted:
            return [(None, list(config.texts))]
        lengths = [e.n_tokens for e in tokenizer.encode(config.texts, truncate=True)]
        return [(None, [t for _, t in sorted(zip(lengths, config.texts, strict=True), key=lambda p: p[0])])]
    pool = max(config.batch_sizes) * 2  # two batches' worth: rounds see different texts
    pools = []
    for n in config.seq_lens:
        progress(f"making {pool} texts of {n} tokens")
        pools.append((n, texts_of_length(tokenizer, n, pool)))
    return pools


def run_engine(config: EngineConfig, progress: Progress) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run every cell; returns result rows and extra facts (baseline plan, peaks, load memory)."""
    manifest = load_manifest(config.artifact)
    tokenizer = TextTokenizer.load(config.artifact, manifest.tokenizer)
    dims_list = config.dims or tuple(manifest.dims)
    above = [d for d in dims_list if d > max(manifest.dims)]
    if above:
        raise InvalidInputError(f"dims {above[0]} is above the largest served dims {max(manifest.dims)}")
    runners, extra = load_runners(config, manifest, progress)
    try:
        baseline_device = extra["baseline"]["device"]
        peaks = measure_peaks(baseline_device, config.threads, progress) if config.ceiling else {}
        extra["peaks"] = peaks_list(peaks)
        model_config = flops.find_model_config(manifest.source.get("path"))
        extra["model_config_found"] = model_config is not None
        rows: list[dict[str, Any]] = []
        pools = _cells(config, tokenizer, progress)
        n_cells = len(dims_list) * len(pools) * len(config.batch_sizes)
        done = 0
        for dims in dims_list:
            for seq_len, pool in pools:
                checked = quality(runners, pool[:64], dims)
                for batch in config.batch_sizes:
                    done += 1
                    batches = batch_plan(pool, batch, config.repeats, spread=config.length_sorted)
                    tokens = float(np.mean([e.n_tokens for b in batches for e in tokenizer.encode(b, truncate=True)]))
                    progress(f"cell {done}/{n_cells}: dims {dims}, batch {batch}, {tokens:.1f} tokens/text")
                    before = memory.cpu_snapshot()
                    timings = measure_cell(
                        runners, batches, dims, config.warmup, block=config.block, settle_s=config.settle_ms / 1000
                    )
                    busy = memory.other_load(before, memory.cpu_snapshot(), os.cpu_count() or 1)
                    for r in runners:
                        row = build_row(
                            r,
                            timings[r.label],
                            cell={"dims": dims, "batch_size": batch, "seq_len": seq_len},
                            tokens_per_text=tokens,
                            flops_per_token=None
                            if model_config is None
                            else flops.flops_per_token(model_config, tokens, r.layers),
                            peak=flops.peak_for(r.precision, {k[1]: v for k, v in peaks.items() if k[0] == r.device}),
                        )
                        depth = {"layers": r.layers or manifest.total_layers, "full_depth": r.layers is None}
                        rows.append({**row, **depth, "cosine_vs_reference": checked[r.label], "other_load_cores": busy})
        add_speedups(rows)
    finally:
        for r in runners:
            r.close()
    return rows, extra


def engine_table(rows: Sequence[dict[str, Any]]) -> str:
    """The Markdown table `mrl-bench engine` prints."""
    from mrl.bench.report import markdown_table

    headers = [
        "backend", "precision", "layers", "dims", "batch", "seq", "tok/text", "p50 ms", "p90 ms", "p99 ms",
        "texts/s", "tokens/s", "vs full depth", "speed-up", "vs", "GFLOP/s", "% of peak", "peak RSS MiB", "cos mean",
        "cos min", "other load",
    ]  # fmt: skip
    body = []
    for r in rows:
        lat, sp, cos = r["latency"], r.get("speedup") or {}, r.get("cosine_vs_reference") or {}
        body.append(
            [
                r["backend"]
                + (f" [{r['variant']}]" if r.get("variant") else "")
                + ("" if r["device"] == "cpu" else f" ({r['device']})"),
                r["precision"],
                r.get("layers") or "all",
                r["dims"],
                r["batch_size"],
                r["seq_len"] if r["seq_len"] is not None else "file",
                r["tokens_per_text"],
                lat["p50_ms"],
                lat["p90_ms"],
                lat["p99_ms"],
                r["texts_per_s"],
                r["tokens_per_s"],
                None if r.get("vs_full_depth") is None else f"{r['vs_full_depth']:.2f}x",
                None if sp.get("ratio") is None else f"{sp['ratio']:.2f}x",
                sp.get("vs"),
                None if r["flops_per_s"] is None else r["flops_per_s"] / 1e9,
                None if r["fraction_of_peak"] is None else 100 * r["fraction_of_peak"],
                r["peak_rss_mib"],
                None if not cos else f"{cos['mean']:.5f}",
                None if not cos else f"{cos['min']:.5f}",
                r.get("other_load_cores"),
            ]
        )
    return markdown_table(headers, body) + busy_note(rows)


def busy_note(rows: Sequence[dict[str, Any]], limit: float = 0.25) -> str:
    """A warning line when other processes used more than `limit` cores while rows were measured."""
    busy = [r["other_load_cores"] for r in rows if (r.get("other_load_cores") or 0) > limit]
    if not busy:
        return ""
    return (
        f"\nwarning: other processes used up to {max(busy):.2f} cores during {len(busy)} of {len(rows)} rows "
        "(column 'other load'): those timings are skewed; rerun on an idle machine"
    )
