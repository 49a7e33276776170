"""A served model's acceptance test, at warm-up: refuse to serve vectors this machine computes differently from
what the export checked, or, where the operator asked for it, serve them loudly."""

from __future__ import annotations

import logging

from mrl.runtime import Embedder
from mrl.runtime.acceptance import check
from mrl.runtime.errors import AcceptanceError

log = logging.getLogger(__name__)


def check_acceptance(name: str, embedder: Embedder, serve_unverified: bool) -> bool:
    """Whether `embedder` passed its artifact's acceptance test here; AcceptanceError where it failed, unless
    `serve_unverified` (then a WARNING)."""
    verdict = check(embedder)
    if verdict.passed or not verdict.checked:  # an artifact without a test: `check` has warned
        return verdict.passed
    if not serve_unverified:
        raise AcceptanceError(f"model {name!r}: refusing {verdict.refusal()} (--serve-unverified serves it anyway)")
    log.warning("model %s is served UNVERIFIED (--serve-unverified): %s", name, verdict.refusal())
    return False
