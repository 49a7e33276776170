"""The acceptance test an artifact carries, run on the machine that loads it.

Export stores the validation texts, the source model's vectors of them at full width (one set per depth
exported) and the parity thresholds per precision in `acceptance.npz`, hashed in the manifest. Loading runs
the texts through the graph each served depth runs, on this machine's backend, cuts every served dims from
its rows as requests get them (`Embedder.plan`, `Plan.finish`), and compares each with the reference cut
to the same dims. A machine whose kernels compute other vectors than the export checked (another CPU's int8
kernels, a GPU, another onnxruntime) is then refused with the numbers, instead of serving them silently.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mrl.runtime.errors import AcceptanceError, ArtifactError
from mrl.runtime.machine import Machine, this_machine
from mrl.runtime.manifest import AcceptanceFile, Parity, sha256_file
from mrl.runtime.plan import MAX_OUTPUTS, EmbedOptions, OutputSpec, truncate_normalize

if TYPE_CHECKING:
    from mrl.runtime.embedder import Embedder

log = logging.getLogger(__name__)

ACCEPTANCE_NAME = "acceptance.npz"
FORMAT = 1
STATISTICS = ("min_cosine", "mean_cosine")
BATCH_SIZE = 8  # as export's parity batches (parity.batches)


def depth_key(layers: int | None) -> str:
    """The file's name for a depth (`Profile.layers`): "full", or "l3" for a profile that keeps 3 layers."""
    return "full" if layers is None else f"l{layers}"


@dataclass(frozen=True, kw_only=True)
class AcceptanceTest:
    """Texts, the source model's full-width vectors of them per depth, and the thresholds per precision."""

    texts: tuple[str, ...]
    prompt: str
    """Prepended to every text, as it was when the references were computed ("" for none)."""
    references: dict[int | None, np.ndarray]
    """`Profile.layers` (None: full depth) -> `[len(texts), full_dims]` float32 vectors of the source model."""
    sources: dict[int | None, str]
    """What each depth's references came from (as parity rows name it)."""
    thresholds: dict[str, dict[str, float]]
    """Precision -> statistic (min_cosine, mean_cosine) -> the least a profile may reach."""

    def save(self, directory: Path) -> AcceptanceFile:
        """Write `acceptance.npz` into `directory` and return its manifest entry."""
        meta = {
            "format": FORMAT,
            "texts": list(self.texts),
            "prompt": self.prompt,
            "thresholds": self.thresholds,
            "sources": {depth_key(k): v for k, v in self.sources.items()},
        }
        arrays = {f"reference_{depth_key(k)}": np.asarray(v, dtype=np.float32) for k, v in self.references.items()}
        path = Path(directory) / ACCEPTANCE_NAME
        np.savez_compressed(path, meta=np.array(json.dumps(meta)), **arrays)
        return AcceptanceFile(file=ACCEPTANCE_NAME, sha256=sha256_file(path))

    @classmethod
    def load(cls, directory: Path, entry: AcceptanceFile, full_dims: int) -> AcceptanceTest:
        """Read and check an artifact's acceptance test; ArtifactError naming the file if it is malformed."""
        path = Path(directory) / entry.file
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise ArtifactError(f"cannot read the acceptance test {path}: {e}") from None
        return _parse(path, arrays, full_dims)


def _parse(path: Path, arrays: dict[str, np.ndarray], full_dims: int) -> AcceptanceTest:
    def bad(what: str) -> ArtifactError:
        return ArtifactError(f"{path}: {what}; export the artifact again")

    if "meta" not in arrays:
        raise bad("lacks its meta entry")
    try:
        meta = json.loads(str(arrays["meta"]))
    except ValueError:
        raise bad("meta is not JSON") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("format"), int):
        raise bad("meta has no format number")
    if meta["format"] > FORMAT:
        raise ArtifactError(f"{path} was written by a newer mrl-toolkit (format {meta['format']}): upgrade")
    texts = meta.get("texts")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise bad("texts must be a non-empty list of non-empty strings")
    thresholds = meta.get("thresholds")
    ok = isinstance(thresholds, dict) and all(
        isinstance(t, dict) and t and all(k in STATISTICS and isinstance(v, (int, float)) for k, v in t.items())
        for t in thresholds.values()
    )
    if not ok or not isinstance(meta.get("prompt"), str) or not isinstance(meta.get("sources"), dict):
        raise bad(f"meta needs a prompt, sources and thresholds of {', '.join(STATISTICS)} per precision")
    references, sources = {}, {}
    for key, source in meta["sources"].items():
        depth = None if key == "full" else int(key[1:]) if key[:1] == "l" and key[1:].isdigit() else -1
        array = arrays.get(f"reference_{key}")
        if depth == -1 or array is None:
            raise bad(f"has no references for depth {key!r}")
        if array.shape != (len(texts), full_dims) or array.dtype != np.float32 or not np.isfinite(array).all():
            raise bad(f"references at {key} must be {len(texts)} x {full_dims} finite float32, not {array.shape}")
        references[depth], sources[depth] = array, str(source)
    return AcceptanceTest(
        texts=tuple(texts),
        prompt=meta["prompt"],
        references=references,
        sources=sources,
        thresholds={p: {k: float(v) for k, v in t.items()} for p, t in thresholds.items()},
    )


def threshold_text(thresholds: dict[str, float]) -> str:
    """Thresholds as parity rows say them: "mean_cosine >= 0.99 and min_cosine >= 0.97"."""
    return " and ".join(f"{stat} >= {minimum}" for stat, minimum in thresholds.items())


def measure(
    candidate: np.ndarray, reference_full: np.ndarray, dims: int, thresholds: dict[str, float], reference: str
) -> Parity:
    """Parity of unit vectors `candidate` against the reference cut to `dims` and re-normalised."""
    ref = truncate_normalize(reference_full, dims)
    if candidate.shape != ref.shape:
        raise ValueError(f"the graph returned shape {candidate.shape}, expected {ref.shape}")
    # NaN (fp16 overflow) counts as the worst possible result for unit vectors, so it fails.
    diff = np.nan_to_num(np.abs(candidate - ref), nan=2.0)
    cosine = np.nan_to_num(np.sum(candidate * ref, axis=1), nan=-1.0)
    values = {"min_cosine": float(cosine.min()), "mean_cosine": float(cosine.mean())}
    return Parity(
        reference=reference,
        n_texts=len(ref),
        max_abs_diff=float(diff.max()),
        min_cosine=values["min_cosine"],
        mean_cosine=values["mean_cosine"],
        threshold=threshold_text(thresholds),
        passed=all(values[stat] >= minimum for stat, minimum in thresholds.items()),
        machine=this_machine(),
    )


@dataclass(frozen=True, kw_only=True)
class ProfileCheck:
    """One served profile's vectors on this machine against the source model's."""

    profile: str
    layers: int | None
    """Encoder layers it runs (None: full depth, count not recorded)."""
    dims: int
    precision: str
    parity: Parity

    @property
    def numbers(self) -> str:
        """`d256-int8: mean cosine 0.961234, min 0.927512`."""
        return f"{self.profile}: mean cosine {self.parity.mean_cosine:.6f}, min {self.parity.min_cosine:.6f}"

    @property
    def summary(self) -> str:
        """The numbers and the thresholds: `... min 0.927512 (needs mean_cosine >= 0.99 and min_cosine >= 0.97)`."""
        return f"{self.numbers} (needs {self.parity.threshold})"


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """The acceptance test of one artifact's profiles of one precision on one backend of this machine."""

    directory: Path
    precision: str
    backend: str
    providers: tuple[str, ...]
    machine: Machine
    checks: tuple[ProfileCheck, ...]
    """Empty where the artifact carries no acceptance test."""
    seconds: float

    @property
    def checked(self) -> bool:
        """Whether anything was checked (False: the artifact has no acceptance test)."""
        return bool(self.checks)

    @property
    def passed(self) -> bool:
        """Whether every served profile held its thresholds (False where nothing was checked)."""
        return self.checked and all(c.parity.passed for c in self.checks)

    @property
    def failures(self) -> list[ProfileCheck]:
        """The profiles below their thresholds."""
        return [c for c in self.checks if not c.parity.passed]

    @property
    def runs_on(self) -> str:
        """`onnxruntime-cpu [CPUExecutionProvider]`."""
        return f"{self.backend} [{', '.join(self.providers)}]" if self.providers else self.backend

    def refusal(self) -> str:
        """One line naming the failing profiles, their numbers, the backend and this machine."""
        failures = self.failures
        numbers = "; ".join(c.numbers for c in failures)
        return (
            f"{self.directory}: {self.precision} profiles compute other vectors here than the export checked: "
            f"{numbers} (needs {failures[0].parity.threshold}); on {self.runs_on}, {self.machine}"
        )


def check(embedder: Embedder) -> Verdict:
    """Run the artifact's acceptance test on every profile `embedder` serves (nothing where it carries none)."""
    start = time.perf_counter()
    manifest = embedder.manifest
    checks: list[ProfileCheck] = []
    if manifest.acceptance is None:
        log.warning(
            "%s carries no acceptance test (exported with --no-validate, or by an mrl-toolkit without them): "
            "nothing can check that this machine computes the vectors its export checked",
            embedder.directory,
        )
    else:
        test = AcceptanceTest.load(embedder.directory, manifest.acceptance, manifest.full_dims)
        thresholds = test.thresholds.get(embedder.precision)
        if thresholds is None:
            raise ArtifactError(f"{embedder.directory}: its acceptance test has no {embedder.precision} thresholds")
        for depth in embedder.layers_served:
            checks += _check_depth(embedder, test, thresholds, depth)
    verdict = Verdict(
        directory=embedder.directory,
        precision=embedder.precision,
        backend=embedder.backend_name,
        providers=tuple(embedder.providers),
        machine=this_machine(),
        checks=tuple(checks),
        seconds=time.perf_counter() - start,
    )
    if verdict.passed:
        worst = min(c.parity.min_cosine for c in checks)
        log.info(
            "acceptance test of %s passed: %d %s profiles on %s, min cosine %.6f, %.2f s",
            embedder.directory,
            len(checks),
            embedder.precision,
            verdict.runs_on,
            worst,
            verdict.seconds,
        )
    return verdict


def _check_depth(
    embedder: Embedder, test: AcceptanceTest, thresholds: dict[str, float], depth: int | None
) -> list[ProfileCheck]:
    """One forward pass of the graph `depth` runs; every dims served there cut from it, as requests get them."""
    widest = embedder.plan(EmbedOptions(layers=depth, truncate=True))
    layers = widest.graph.layers
    if layers not in test.references:
        raise ArtifactError(
            f"{embedder.directory}: its acceptance test has no references at {depth_key(layers)} "
            f"for profile {widest.graph.name}"
        )
    encoded = embedder.tokenize(dataclasses.replace(widest, prompt=test.prompt), test.texts)
    # In the texts' order, as export's parity batches them: batches that mix lengths check padding, and int8's
    # per-batch activation scales see the same batches, so on the export's machine this repeats its numbers.
    rows = np.concatenate(
        [embedder.run(widest.graph, encoded[i : i + BATCH_SIZE]) for i in range(0, len(encoded), BATCH_SIZE)]
    )
    profiles = sorted((p for p in embedder.profiles if p.layers == layers), key=lambda p: -p.dims)
    checks = []
    for start in range(0, len(profiles), MAX_OUTPUTS):
        chunk = profiles[start : start + MAX_OUTPUTS]
        outputs = tuple(OutputSpec(dims=p.dims) for p in chunk)
        plan = embedder.plan(EmbedOptions(outputs=outputs, layers=depth, truncate=True))
        for profile, vectors in zip(chunk, plan.finish(rows), strict=True):
            parity = measure(vectors, test.references[layers], profile.dims, thresholds, test.sources[layers])
            where = {"layers": widest.layers, "dims": profile.dims, "precision": profile.precision}
            checks.append(ProfileCheck(profile=profile.name, parity=parity, **where))
    return checks


def require(embedder: Embedder, anyway: str) -> Verdict:
    """`check`, raising AcceptanceError where a profile fails; `anyway` says how the caller may load it regardless."""
    verdict = check(embedder)
    if verdict.checked and not verdict.passed:
        raise AcceptanceError(f"refusing {verdict.refusal()} ({anyway})")
    return verdict
