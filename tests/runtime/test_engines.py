"""Pure engine decisions: shape-range planning, cache keys, engine lookup, shape range per batch, padding."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mrl.runtime.backends.gpu import GpuInfo, parse_nvidia_smi
from mrl.runtime.engines import (
    Chunk,
    cache_key,
    default_shape_ranges,
    envelope,
    explain_missing,
    find_engine,
    numpy_dtype,
    pad_feed,
    plan_chunks,
    plan_shape_ranges,
)
from mrl.runtime.errors import ArtifactError, InvalidInputError
from mrl.runtime.manifest import (
    Engine,
    Manifest,
    Profile,
    ShapeRange,
    Span,
    TokenizerSettings,
    WeightsFile,
    load_manifest,
    manifest_from_dict,
)

H100 = GpuInfo(name="NVIDIA H100 80GB HBM3", compute_capability="9.0")
A10 = GpuInfo(name="NVIDIA A10", compute_capability="8.6")
TRT = "10.13.3"


def ranges(*specs: tuple[tuple[int, int, int], tuple[int, int, int]]) -> tuple[ShapeRange, ...]:
    return tuple(ShapeRange(batch=Span(*b), seq=Span(*s)) for b, s in specs)


# --- value objects -----------------------------------------------------------------------------


@pytest.mark.parametrize("values", [(0, 1, 2), (5, 3, 8), (1, 9, 8), (1.0, 2, 3), (True, 2, 3)])
def test_span_rejects_bad_values(values):
    with pytest.raises(ValueError, match="span"):
        Span(*values)


def test_shape_range_prints():
    r = ShapeRange(batch=Span(1, 32, 128), seq=Span(8, 128, 512))
    assert str(r) == "batch 1:32:128 x seq 8:128:512"


# --- planning ----------------------------------------------------------------------------------


def test_long_tail_is_split_into_short_and_long_ranges():
    planned = plan_shape_ranges(Span(1, 32, 128), [Span(8, 128, 512)], max_length=512)
    assert planned == ranges(((1, 32, 128), (8, 128, 128)), ((1, 8, 128), (129, 512, 512)))
    # The long range keeps the short range's token budget at its opt shape: 32 x 128 = 8 x 512.
    short, long = planned
    assert short.batch.opt * short.seq.opt == long.batch.opt * long.seq.opt


def test_no_split_and_near_max_opt_keep_one_range():
    one = plan_shape_ranges(Span(1, 32, 128), [Span(8, 128, 512)], max_length=512, split=False)
    assert one == ranges(((1, 32, 128), (8, 128, 512)))
    near = plan_shape_ranges(Span(1, 32, 128), [Span(8, 300, 512)], max_length=512)
    assert near == ranges(((1, 32, 128), (8, 300, 512)))


def test_sequence_spans_are_cut_to_the_model_max_length():
    assert plan_shape_ranges(Span(1, 8, 16), [Span(1, 128, 512)], max_length=64) == ranges(((1, 8, 16), (1, 64, 64)))
    with pytest.raises(InvalidInputError, match="max length of 64"):
        plan_shape_ranges(Span(1, 8, 16), [Span(100, 128, 512)], max_length=64)
    with pytest.raises(InvalidInputError, match="at least one"):
        plan_shape_ranges(Span(1, 8, 16), [], max_length=64)


def test_explicit_sequence_spans_become_sorted_ranges():
    planned = plan_shape_ranges(Span(1, 8, 64), [Span(65, 256, 512), Span(1, 32, 64)], max_length=512)
    assert planned == ranges(((1, 8, 64), (1, 32, 64)), ((1, 8, 64), (65, 256, 512)))


def test_default_ranges_follow_the_model_max_length():
    assert default_shape_ranges(512) == ranges(((1, 32, 128), (1, 128, 128)), ((1, 8, 128), (129, 512, 512)))
    assert default_shape_ranges(48) == ranges(((1, 32, 128), (1, 48, 48)))


def test_envelope_covers_every_range_at_the_first_opt():
    env = envelope(default_shape_ranges(512))
    assert env == ShapeRange(batch=Span(1, 32, 128), seq=Span(1, 128, 512))


# --- cache key and engine lookup --------------------------------------------------------------


def test_cache_key_is_stable_and_changes_with_every_input():
    r = default_shape_ranges(512)
    base = cache_key(H100, TRT, "a" * 64, "b" * 64, r)
    assert base == cache_key(H100, TRT, "a" * 64, "b" * 64, r) and len(base) == 64
    variants = [
        cache_key(A10, TRT, "a" * 64, "b" * 64, r),
        cache_key(GpuInfo(name=H100.name, compute_capability="9.1"), TRT, "a" * 64, "b" * 64, r),
        cache_key(H100, "10.13.4", "a" * 64, "b" * 64, r),
        cache_key(H100, TRT, "c" * 64, "b" * 64, r),
        cache_key(H100, TRT, "a" * 64, None, r),
        cache_key(H100, TRT, "a" * 64, "b" * 64, default_shape_ranges(256)),
    ]
    assert len({base, *variants}) == 7


def _manifest(engines: tuple[Engine, ...] = ()) -> Manifest:
    profile = Profile(
        name="d16-fp32", dims=16, precision="fp32", file="d16-fp32.onnx", sha256="a" * 64, weights="w.bin"
    )
    return Manifest(
        name="tiny",
        source={"kind": "sentence-transformers", "path": "/nowhere"},
        tokenizer=TokenizerSettings(max_length=512),
        full_dims=32,
        pooling="mean",
        profiles=(profile,),
        weights=(WeightsFile(file="w.bin", precision="fp32", sha256="b" * 64, bytes=1),),
        engines=engines,
    )


def _engine(gpu: GpuInfo, version: str, onnx: str = "a" * 64, weights: str = "b" * 64) -> Engine:
    r = default_shape_ranges(512)
    key = cache_key(gpu, version, onnx, weights, r)
    return Engine(
        profile="d16-fp32",
        file=f"engines/d16-fp32-{key[:16]}.engine",
        sha256="e" * 64,
        cache_key=key,
        gpu=gpu.name,
        compute_capability=gpu.compute_capability,
        tensorrt_version=version,
        onnx_sha256=onnx,
        weights_sha256=weights,
        shape_ranges=r,
    )


def test_find_engine_takes_only_the_engine_for_this_gpu_tensorrt_and_graph():
    mine, foreign, stale = _engine(H100, TRT), _engine(A10, TRT), _engine(H100, TRT, weights="f" * 64)
    manifest = _manifest((foreign, stale, mine))
    profile = manifest.profiles[0]
    assert find_engine(manifest, profile, H100, TRT) == mine
    assert find_engine(manifest, profile, A10, TRT) == foreign
    assert find_engine(manifest, profile, H100, "10.14.1") is None
    assert find_engine(_manifest((foreign, stale)), profile, H100, TRT) is None


def test_explain_missing_says_why_and_what_to_run():
    manifest = _manifest((_engine(A10, TRT), _engine(H100, TRT, onnx="0" * 64)))
    message = explain_missing(manifest, manifest.profiles[0], H100, TRT)
    assert "NVIDIA A10 (sm_86), TensorRT 10.13.3" in message
    assert "is stale" in message
    assert message.endswith("mrl-export build-engine ARTIFACT")
    assert "none was built" in explain_missing(_manifest(), manifest.profiles[0], H100, TRT)


def test_engine_entries_round_trip_through_manifest_json(tmp_path):
    manifest = _manifest((_engine(H100, TRT),))
    manifest.save(tmp_path)
    loaded = load_manifest(tmp_path, verify=False)
    assert loaded.engines == manifest.engines
    assert isinstance(loaded.engines[0].shape_ranges[1], ShapeRange)
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["engines"][0]["shape_ranges"][0] == {
        "batch": {"min": 1, "opt": 32, "max": 128},
        "seq": {"min": 1, "opt": 128, "max": 128},
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e: e.update(shape_ranges=[]), "lists no shape ranges"),
        (
            lambda e: e.update(
                shape_ranges=[{"batch": {"min": 4, "opt": 2, "max": 8}, "seq": {"min": 1, "opt": 1, "max": 1}}]
            ),
            r"engines\[0\]\.shape_ranges\[0\]\.batch is invalid: a span needs 1 <= min <= opt <= max",
        ),
        (lambda e: e.pop("cache_key"), r"engines\[0\] lacks the field 'cache_key'"),
    ],
)
def test_malformed_engine_entries_are_artifact_errors(change, message):
    data = json.loads(_manifest((_engine(H100, TRT),)).to_json())
    change(data["engines"][0])
    with pytest.raises(ArtifactError, match=message):
        manifest_from_dict(data)


# --- the shape range for a batch --------------------------------------------------------------

TWO = ranges(((1, 32, 128), (1, 128, 128)), ((1, 8, 128), (129, 512, 512)))


def test_short_batches_take_the_short_range_and_long_ones_the_long_range():
    assert plan_chunks(32, 40, TWO) == [Chunk(start=0, stop=32, range_index=0, seq=40)]
    assert plan_chunks(4, 300, TWO) == [Chunk(start=0, stop=4, range_index=1, seq=300)]
    assert plan_chunks(1, 128, TWO) == [Chunk(start=0, stop=1, range_index=0, seq=128)]


def test_sequences_below_a_range_minimum_are_padded_up():
    only_long = ranges(((1, 8, 16), (64, 128, 256)))
    assert plan_chunks(3, 10, only_long) == [Chunk(start=0, stop=3, range_index=0, seq=64)]


def test_batches_above_the_max_run_in_chunks():
    assert plan_chunks(300, 20, TWO) == [
        Chunk(start=0, stop=128, range_index=0, seq=20),
        Chunk(start=128, stop=256, range_index=0, seq=20),
        Chunk(start=256, stop=300, range_index=0, seq=20),
    ]


def test_the_tightest_range_wins_when_several_fit():
    nested = ranges(((1, 8, 64), (1, 256, 512)), ((1, 8, 64), (1, 32, 64)))
    assert plan_chunks(8, 30, nested)[0].range_index == 1


def test_a_sequence_longer_than_every_range_is_refused_with_the_fix():
    with pytest.raises(InvalidInputError, match="rebuild the engine"):
        plan_chunks(2, 600, TWO)


def test_pad_feed_appends_masked_tokens_on_the_right():
    feed = {
        "input_ids": np.array([[2, 101, 7, 102]], dtype=np.int64),
        "attention_mask": np.array([[0, 1, 1, 1]], dtype=np.int64),  # as a left-padding tokenizer gives it
    }
    padded = pad_feed(feed, 6, pad_token_id=2)
    assert padded["input_ids"].tolist() == [[2, 101, 7, 102, 2, 2]]
    assert padded["attention_mask"].tolist() == [[0, 1, 1, 1, 0, 0]]
    assert pad_feed(feed, 4, 0)["input_ids"] is feed["input_ids"]


def _padding_leaves_embeddings_unchanged(artifact: Path, texts: list[str]) -> None:
    """Pad each batch up by 17 masked tokens, as the tensorrt backend does below a range's min; compare on ORT."""
    from mrl.runtime import Embedder

    # Padding only: the BERT told to pad left computes other vectors than its source, which its acceptance test
    # refuses (tests/runtime/test_acceptance.py), so it is not run here.
    embedder = Embedder.load(artifact, "onnxruntime-cpu", acceptance=False)
    try:
        for batch in ([texts[0]], texts):  # one text (no tokenizer padding at all), then a padded batch
            feed = embedder.tokenizer.pad(embedder.tokenizer.encode(batch))
            backend = embedder.backend_for(embedder.profiles[0])
            padded = pad_feed(feed, feed["input_ids"].shape[1] + 17, embedder.tokenizer.settings.pad_token_id)
            np.testing.assert_allclose(backend.run(padded), backend.run(feed), atol=1e-5)
    finally:
        embedder.close()


TEXTS = ["a short one", "and a somewhat longer sentence with more words"]


def test_padding_up_leaves_embeddings_unchanged(tiny_artifact):
    """A right-padding BERT (absolute positions, mean pooling)."""
    _padding_leaves_embeddings_unchanged(tiny_artifact, TEXTS)


@pytest.fixture(scope="module")
def left_padded_artifacts(tiny_artifact, tmp_path_factory):
    """A left-padding Llama with last-token pooling (rotary positions), and the tiny BERT told to pad left.

    The BERT (absolute positions) cannot be exported with a left-padding tokenizer: sentence-transformers
    then embeds each text differently depending on its batch, and parity fails. Its manifest is edited
    instead, so the runtime tokenizer pads on the left and the graph sees what such a model would.
    """
    from tinymodels import export, save_sentence_transformer

    root = tmp_path_factory.mktemp("left")
    llama = export(
        save_sentence_transformer(root / "llama", arch="llama", pooling="lasttoken"), root / "llama-art", (8,)
    )
    bert = Path(shutil.copytree(tiny_artifact, root / "bert-art"))
    data = json.loads((bert / "manifest.json").read_text())
    data["tokenizer"]["padding_side"] = "left"
    (bert / "manifest.json").write_text(json.dumps(data))
    return llama, bert


def test_padding_up_leaves_embeddings_unchanged_with_left_padding_tokenizers(left_padded_artifacts):
    """Left padding by the tokenizer; the range padding still goes on the right, after every real token.

    Padding on the left instead would move the real tokens, and the BERT's absolute positions would
    change its embeddings (by up to 0.28 on this model, measured when this test was written).
    """
    for artifact in left_padded_artifacts:
        assert load_manifest(artifact).tokenizer.padding_side == "left"
        _padding_leaves_embeddings_unchanged(artifact, TEXTS)


def test_numpy_dtypes_of_tensorrt_types():
    assert numpy_dtype("DataType.INT64") is np.int64
    assert numpy_dtype("DataType.INT32") is np.int32
    assert numpy_dtype("DataType.FLOAT") is np.float32
    with pytest.raises(ArtifactError):
        numpy_dtype("DataType.FP8")


def test_gpu_identity_from_nvidia_smi_and_slug():
    text = "NVIDIA H100 80GB HBM3, 9.0\nNVIDIA A10, 8.6\n\nTesla K80, [N/A]\n"
    assert parse_nvidia_smi(text) == [H100, A10]
    assert H100.slug == "nvidia-h100-80gb-hbm3-sm90"
    assert str(A10) == "NVIDIA A10 (sm_86)"


def test_engine_is_a_frozen_value():
    with pytest.raises(dataclasses.FrozenInstanceError):
        _engine(H100, TRT).gpu = "other"
