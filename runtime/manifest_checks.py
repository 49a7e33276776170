"""What makes sense in a manifest: values that type-check but cannot be right, refused at load naming the field.

`manifest.py` reads each field with its type; this module checks what the fields mean, alone and together
(a length of 0, a default prompt that names no prompt, a file outside the artifact), so a hand-edited or
tampered manifest fails when loaded, not in the middle of a request or in a loop that never ends.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from mrl.runtime.errors import ArtifactError, shorten

if TYPE_CHECKING:
    from mrl.runtime.manifest import Manifest

PRECISIONS = ("fp32", "fp16", "int8")
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
"""The graph inputs a tokenizer can feed (`TextTokenizer.pad` builds exactly these)."""
PADDING_SIDES = ("left", "right")
LONGEST_MAX_LENGTH = 1 << 20
"""More tokens than any embedding model reads: a larger max length is a typo (and texts of that length would
be built to check it)."""


def _refuse(message: str) -> ArtifactError:
    return ArtifactError(f"manifest.json: {message}")


def _at_least(where: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        what = "0 or more" if low == 0 else f"at least {low}"
        raise _refuse(f"{where} must be {what}, not {value}")


def _within(where: str, values: Iterable[int] | None, high: int | None) -> None:
    for value in values or ():
        if value < 1 or (high is not None and value > high):
            raise _refuse(f"{where} holds {value}, outside 1..{high if high is not None else 'n'}")


def check_tokenizer(manifest: Manifest) -> None:
    """The tokenizer settings' sense (what needs `tokenizer.json` itself is checked when it is loaded)."""
    settings = manifest.tokenizer
    _at_least("tokenizer.max_length", settings.max_length, 1)
    if settings.max_length > LONGEST_MAX_LENGTH:
        raise _refuse(
            f"tokenizer.max_length {settings.max_length} is more than any model reads (at most {LONGEST_MAX_LENGTH})"
        )
    _at_least("tokenizer.pad_token_id", settings.pad_token_id, 0)
    if settings.padding_side not in PADDING_SIDES:
        raise _refuse(f"tokenizer.padding_side must be left or right, not {shorten(settings.padding_side)}")
    unknown = [name for name in settings.inputs if name not in TOKEN_INPUTS]
    if unknown:
        raise _refuse(f"tokenizer.inputs names {shorten(unknown[0])}; a graph takes {', '.join(TOKEN_INPUTS)}")
    if "input_ids" not in settings.inputs or len(set(settings.inputs)) != len(settings.inputs):
        raise _refuse(f"tokenizer.inputs must include input_ids, each input once, not {list(settings.inputs)}")


def check_files(manifest: Manifest) -> None:
    """Every file the manifest names lies inside the artifact."""
    files = [manifest.tokenizer.file, *(p.file for p in manifest.profiles), *(w.file for w in manifest.weights)]
    files += [p.weights for p in manifest.profiles if p.weights] + [e.file for e in manifest.engines]
    cpu_graphs = [p.ort_cpu for p in manifest.profiles if p.ort_cpu is not None]
    files += [g.file for g in cpu_graphs] + [g.weights for g in cpu_graphs if g.weights]
    files += [manifest.acceptance.file] if manifest.acceptance else []
    for name in files:
        path = PurePosixPath(name)
        if path.is_absolute() or ".." in path.parts or not name:
            raise ArtifactError(f"manifest.json names the file {shorten(name)}, outside the artifact: refusing it")


def check_profiles(manifest: Manifest) -> None:
    """Profiles: at least one, distinct names, known precisions, dims and depths within the model's."""
    if not manifest.profiles:
        raise _refuse("profiles lists none: export the artifact again")
    names: set[str] = set()
    for i, p in enumerate(manifest.profiles):
        if p.name in names:
            raise _refuse(f"profiles name {shorten(p.name)} twice")
        names.add(p.name)
        if p.precision not in PRECISIONS:
            raise _refuse(f"profile {p.name} has unknown precision {shorten(p.precision)}")
        if p.dims < 1 or p.dims > manifest.full_dims:
            raise _refuse(f"profile {p.name} has dims {p.dims}, outside 1..{manifest.full_dims}")
        _at_least(f"profiles[{i}].layers", p.layers, 1)
        if p.layers is not None and manifest.total_layers is not None and p.layers > manifest.total_layers:
            raise _refuse(f"profile {p.name} keeps {p.layers} layers, outside 1..{manifest.total_layers}")
    for i, w in enumerate(manifest.weights):
        _at_least(f"weights[{i}].bytes", w.bytes, 0)
        if w.precision not in PRECISIONS:
            raise _refuse(f"weights[{i}] has unknown precision {shorten(w.precision)}")
    for e in manifest.engines:
        if not e.shape_ranges:
            raise _refuse(f"engine {shorten(e.file)} lists no shape ranges")


def check_calibration(manifest: Manifest) -> None:
    """Calibration ranges: one value per dims of their profile, finite, each minimum at most its maximum."""
    if manifest.calibration is None:
        return
    _at_least("calibration.n_texts", manifest.calibration.n_texts, 0)
    dims = {p.name: p.dims for p in manifest.profiles}
    for name, r in manifest.calibration.ranges.items():
        where = f"calibration.ranges.{shorten(name)[1:-1]}"
        # Ranges of a profile no longer listed (removed by hand) are unused, not wrong.
        if name in dims and dims[name] != len(r.min):
            raise _refuse(f"{where} does not match a profile's dims")
        if not all(math.isfinite(v) for v in (*r.min, *r.max)):
            raise _refuse(f"{where} holds a value that is not a finite number: calibrate again")
        if any(low > high for low, high in zip(r.min, r.max, strict=True)):
            raise _refuse(f"{where}: a minimum is above its maximum: calibrate again")


def check_sense(manifest: Manifest) -> None:
    """Refuse a manifest whose values type-check but cannot be right, naming the field."""
    _at_least("full_dims", manifest.full_dims, 1)
    _at_least("total_layers", manifest.total_layers, 1)
    _within("trained_dims", manifest.trained_dims, manifest.full_dims)
    _within("trained_layers", manifest.trained_layers, manifest.total_layers)
    if manifest.default_prompt is not None and manifest.default_prompt not in manifest.prompts:
        known = ", ".join(sorted(manifest.prompts)) or "none"
        raise _refuse(f"default_prompt {shorten(manifest.default_prompt)} names no prompt; prompts: {known}")
    check_tokenizer(manifest)
    check_files(manifest)
    check_profiles(manifest)
    check_calibration(manifest)
