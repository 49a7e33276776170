"""One export's graphs: the portable graph of each precision and its ONNX Runtime CPU graph, each profile checked."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from mrl.export import graph, int8, ortopt, parity, precision
from mrl.export.errors import ExportError, ParityError
from mrl.export.source_model import SourceModel
from mrl.runtime.manifest import OrtCpuChoice, OrtCpuGraph, Parity, Profile, Quantization, sha256_file
from mrl.runtime.tokenize import TextTokenizer

log = logging.getLogger(__name__)


class Builder:
    """Builds one export's graphs: portable and ONNX Runtime CPU graphs per precision, each profile checked."""

    def __init__(
        self,
        tmp: Path,
        work: Path,
        tokenizer: TextTokenizer,
        texts: list[str],
        reference: np.ndarray | None,
        source: SourceModel,
        progress: Callable[[str], None],
        layers: int | None = None,
    ) -> None:
        self.tmp, self.work, self.tokenizer, self.texts = tmp, work, tokenizer, texts
        self.reference, self.source, self.progress = reference, source, progress
        self.layers = layers
        """The depth the graphs keep (None: full depth): profiles are named and checked at it."""

    def check(self, prec: str) -> int8.Check | None:
        """Parity of a pooled graph of `prec` at the model's full width (None without validation)."""
        if self.reference is None:
            return None

        def run(model: onnx.ModelProto) -> Parity:
            path = self.work / f"check-{prec}-{self.layers}.onnx"
            head = graph.append_mrl_head(model, self.source.full_dims)
            onnx.save_model(head, str(path), save_as_external_data=True, location=f"{path.stem}.data")
            found = parity.embed_graph(path, self.tokenizer, self.texts)
            reference = ref_name(self.source, self.layers)
            return parity.compare(found, self.reference, self.source.full_dims, prec, reference)

        return run

    def int8(self, fp32: onnx.ModelProto, op_types: tuple[str, ...]) -> int8.Int8Graph:
        """int8 of `fp32` that holds parity: smoothed, and as a last resort with the worst products kept in fp32."""
        feeds = parity.batches(self.tokenizer, self.texts)
        return int8.quantise(fp32, self.work, check=self.check("int8"), feeds=feeds, op_types=op_types)

    def portable(self, fp32: onnx.ModelProto, prec: str) -> tuple[onnx.ModelProto, Quantization | None]:
        """The portable pooled graph of `prec` (and, for int8, how it was quantised)."""
        if prec != "int8":
            return precision.convert(fp32, prec), None
        try:
            result = self.int8(fp32, ("MatMul",))
        except int8.Int8ParityError as e:
            raise ParityError(self._int8_refusal(fp32, e.failure)) from None
        smoothing = result.smoothing
        self.progress(f"int8: smoothed {smoothing.smoothed} of {smoothing.inputs} matrix-product inputs")
        if result.kept_fp32:
            self.progress(f"int8: kept {len(result.kept_fp32)} matrix products in fp32 to hold parity")
        return result.model, Quantization(
            method=result.method,
            kept_fp32=result.kept_fp32,
            reason=result.reason,
            reduce_range=precision.REDUCE_RANGE,
            smoothed=smoothing.smoothed,
            smoothing_muls=smoothing.inserted,
        )

    def _int8_refusal(self, fp32: onnx.ModelProto, failure: int8.Int8Failure) -> str:
        """The refusal, advising only what was checked to work for this model."""
        self.progress("int8 cannot hold parity; checking whether fp16 would")
        check = self.check("fp16")
        fp16 = check(precision.to_fp16(fp32)) if check is not None else None
        return int8_refusal(failure.summary(), fp16)

    def optimize(self, fp32: onnx.ModelProto, *, strict: bool) -> ortopt.Optimized:
        """ONNX Runtime's fused graph of `fp32`; with `strict`, an onnxruntime too old to fuse is an error."""
        try:
            version = ortopt.check_fusing_support()
        except ExportError as e:
            if strict:
                raise
            log.warning("%s", e)
            return ortopt.Optimized(model=None, reason=str(e).split(":")[0])
        self.progress(f"fusing with onnxruntime {version}'s transformer optimizer")
        return ortopt.optimize(fp32, _model_config(self.source))

    def ort_cpu(self, optimized: ortopt.Optimized, prec: str) -> tuple[onnx.ModelProto | None, OrtCpuChoice]:
        """The ONNX Runtime CPU graph of `prec` (None: the portable graph runs there) and the manifest's note."""
        import onnxruntime

        note = {"fusions": optimized.fusions, "onnxruntime": onnxruntime.__version__}
        if optimized.model is None:
            return None, OrtCpuChoice(precision=prec, graph="portable", reason=optimized.reason, **note)
        if prec == "fp32":
            return optimized.model, OrtCpuChoice(precision=prec, graph="optimized", reason=optimized.reason, **note)
        try:
            result = self.int8(optimized.model, ("MatMul", "Attention"))
        except int8.Int8ParityError as e:
            reason = f"the fused int8 graph fails parity ({e.failure.summary()})"
            return None, OrtCpuChoice(precision=prec, graph="portable", reason=reason, **note)
        reason = f"{optimized.reason}; attention quantised too; {result.method}"
        reason += f"; {result.reason}" if result.reason else ""
        choice = OrtCpuChoice(precision=prec, graph="optimized", reason=reason, kept_fp32=result.kept_fp32, **note)
        return result.model, choice

    def profile(self, bases: dict[str, onnx.ModelProto], dims: int, prec: str) -> Profile:
        """Write each graph of one profile (portable, and the ONNX Runtime CPU one if any) and check its parity."""
        name = profile_name(dims, prec, self.layers)
        written = {}
        for suffix, base in bases.items():
            path = self.tmp / f"{name}{suffix}.onnx"
            graph.save_graph(graph.append_mrl_head(base, dims), path)
            result = None
            if self.reference is not None:
                self.progress(f"checking parity of {path.stem}")
                found = parity.embed_graph(path, self.tokenizer, self.texts)
                result = parity.compare(found, self.reference, dims, prec, ref_name(self.source, self.layers))
                if not result.passed:
                    raise ParityError(_parity_message(path.stem, prec, result))
            written[suffix] = (path, result, f"weights-{prec}{suffix}.bin")
        path, result, weights = written[""]
        ort_cpu = None
        if ".ort-cpu" in written:
            cpu_path, cpu_result, cpu_weights = written[".ort-cpu"]
            ort_cpu = OrtCpuGraph(
                file=cpu_path.name, sha256=sha256_file(cpu_path), weights=cpu_weights, parity=cpu_result
            )
        return Profile(
            name=name,
            dims=dims,
            precision=prec,
            file=path.name,
            sha256=sha256_file(path),
            weights=weights,
            parity=result,
            ort_cpu=ort_cpu,
            layers=self.layers,
        )


def int8_refusal(summary: str, fp16: Parity | None) -> str:
    """Why int8 was refused and what to use instead, from what was checked (fp16's parity, if run)."""
    if fp16 is None:
        advice = "use fp32 (fp16 was not checked: validation is off)"
    elif fp16.passed:
        advice = f"use fp16 (checked: min cosine {fp16.min_cosine:.6f}) or fp32"
    else:
        why = "NaN: its activations overflow fp16" if fp16.min_cosine <= -1.0 else f"min cosine {fp16.min_cosine:.6f}"
        advice = f"use fp32 (fp16 fails on this model too, checked: {why})"
    return f"int8 cannot hold parity for this model: {summary}. {advice}; --no-validate skips this check."


def _model_config(source: SourceModel) -> dict | None:
    """The transformers config of the source model, for the optimizer's head count and width."""
    if source.st_model is not None:
        return source.st_model[0].auto_model.config.to_dict()
    path = source.path / "config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None
    return None


def profile_name(dims: int, prec: str, layers: int | None) -> str:
    """`d64-fp32` at full depth (as before layers existed), `l3-d64-fp32` for a profile that keeps 3 layers."""
    return f"d{dims}-{prec}" if layers is None else f"l{layers}-d{dims}-{prec}"


def ref_name(source: SourceModel, layers: int | None = None) -> str:
    """What a profile's parity was checked against."""
    if source.kind == "onnx":
        return "onnx-source-graph"
    if layers is None:
        return "pytorch-sentence-transformers"
    return f"pytorch-sentence-transformers at hidden_states[{layers}], as AdaptiveLayerLoss evaluates it"


def _parity_message(name: str, prec: str, result: Parity) -> str:
    hint = {
        "fp16": " fp16 overflows in some models (activations above 65504); use fp32 or int8 for this model.",
        "int8": " int8 loses too much at these dims; use fp32.",
        "fp32": " the exported graph does not reproduce the model; try --exporter dynamo.",
    }[prec]
    return (
        f"profile {name} failed parity: min cosine {result.min_cosine:.6f}, mean {result.mean_cosine:.6f} "
        f"(needs {result.threshold}).{hint} --no-validate skips this check."
    )
