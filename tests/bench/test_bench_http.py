"""`mrl-bench serve` over OpenAI-compatible HTTP: the http target against a real `mrl-serve --http-port 0`,
its errors by HTTP status, and one CLI run over gRPC and HTTP together."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import shutil
import subprocess
import urllib.request

import numpy as np
import pytest
from bench_servers import serve

from mrl.bench.cli import main as bench_main
from mrl.bench.drivers import spec_from_json, spec_to_json
from mrl.bench.load import ServeConfig
from mrl.bench.report import load_report
from mrl.bench.serve import sweep
from mrl.bench.targets import HttpTarget, TargetError, TargetSpec, error_message, openai_vectors, target_specs
from mrl.runtime.errors import InvalidInputError
from mrl.serving.client import EmbedClient

TEXTS = ["the river runs past the mill", "a small library on the square", "the first train leaves at six"]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


async def embed_once(spec: TargetSpec, texts: list[str], dims: int | None, timeout: float = 30.0):
    """One request through a fresh HttpTarget: its Reply, or the TargetError it raised."""
    target = HttpTarget(spec)
    await target.connect()
    try:
        return await target.embed(texts, dims, timeout)
    except TargetError as e:
        return e
    finally:
        await target.close()


def post(address: str, body: dict) -> bytes:
    request = urllib.request.Request(f"http://{address}/v1/embeddings", data=json.dumps(body).encode())
    return urllib.request.urlopen(request, timeout=30).read()


def test_specs_carry_token_tls_and_encoding_to_http_targets():
    mrl, http, triton = target_specs(
        ["127.0.0.1:1", "http=127.0.0.1:2", "triton=127.0.0.1:3"],
        triton_model="m",
        token="t",
        root_certificates=b"PEM",
        http_encoding_format="float",
    )
    assert (http.kind, http.token, http.root_certificates, http.encoding_format) == ("http", "t", b"PEM", "float")
    assert mrl.encoding_format == triton.encoding_format == "base64"  # the default; only http reads it
    assert spec_from_json(spec_to_json(http)) == http  # a worker process can rebuild it
    with pytest.raises(InvalidInputError, match="choose from base64, float"):
        TargetSpec(kind="http", address="127.0.0.1:1", encoding_format="float32")


def test_openai_vectors_decodes_both_formats_and_refuses_malformed_bodies():
    rows = np.arange(6, dtype=np.float32).reshape(2, 3) / 7

    def body(embeddings, indices=(0, 1)):
        data = [{"object": "embedding", "index": i, "embedding": e} for i, e in zip(indices, embeddings, strict=True)]
        return json.dumps({"object": "list", "data": data, "usage": {"prompt_tokens": 9}}).encode()

    b64 = [base64.b64encode(r.astype("<f4").tobytes()).decode() for r in rows]
    decoded, tokens, _ = openai_vectors(body(b64), "base64")
    assert np.array_equal(decoded, rows) and tokens == 9
    decoded, _, layers = openai_vectors(body([r.tolist() for r in rows]), "float")
    assert np.array_equal(decoded, rows) and layers is None  # no `layers` field: not said
    with_depth = json.dumps({**json.loads(body(b64)), "layers": 3}).encode()
    assert openai_vectors(with_depth, "base64")[2] == 3  # mrl-serve's extra field: the depth that ran
    bad = {
        "not JSON": (b"<html>", "base64"),
        "no data": (b'{"object": "list"}', "base64"),
        "out of order": (body(b64, indices=(1, 0)), "base64"),
        "ragged base64": (body([b64[0], base64.b64encode(b"\0" * 8).decode()]), "base64"),
        "not float32": (body([base64.b64encode(b"\0" * 6).decode()] * 2), "base64"),
        "not base64": (body(["!!", "!!"]), "base64"),
        "ragged floats": (body([[0.1, 0.2], [0.3]]), "float"),
        "base64 sent as floats": (body(b64), "float"),
    }
    for name, (payload, encoding) in bad.items():
        with pytest.raises(TargetError) as e:
            openai_vectors(payload, encoding)
        assert e.value.code == "BAD_RESPONSE", name
    assert error_message(b'{"error": {"message": "dimensions must be at least 1"}}') == "dimensions must be at least 1"
    assert error_message(b"Bad Gateway") == "Bad Gateway"


@pytest.mark.parametrize("encoding_format", ["base64", "float"])
def test_http_target_against_a_real_server(http_server, server, encoding_format):
    spec = TargetSpec(kind="http", address=http_server, encoding_format=encoding_format)
    reply = run(embed_once(spec, TEXTS, 16))
    assert (reply.texts, reply.dims) == (3, 16) and reply.tokens > len(TEXTS)
    default = run(embed_once(spec, TEXTS[:1], None))
    with EmbedClient(server) as client:
        grpc_vectors = client.embed(TEXTS, dims=16)
        assert default.dims == client.get_model().default_dimensions  # unset dims: the server's default
    # What the target decodes from the server's real body is what gRPC returns for the same texts.
    http_vectors, tokens, _ = openai_vectors(
        post(http_server, {"input": TEXTS, "dimensions": 16, "encoding_format": encoding_format}), encoding_format
    )
    assert tokens == reply.tokens
    np.testing.assert_allclose(http_vectors, grpc_vectors, atol=1e-6)


def test_errors_are_counted_by_http_status(http_server, free_port):
    bad_dims = TargetSpec(kind="http", address=http_server)
    no_model = TargetSpec(kind="http", address=http_server, model="no-such-model")
    nothing = TargetSpec(kind="http", address=f"127.0.0.1:{free_port}")
    replies = [run(embed_once(spec, TEXTS[:1], dims)) for spec, dims in ((bad_dims, 999), (no_model, 8), (nothing, 8))]
    assert [r.code for r in replies] == ["HTTP_400", "HTTP_404", "CONNECTION_ERROR"]
    assert "999" in str(replies[0]) and "no-such-model" in str(replies[1])  # the server's message comes along
    config = ServeConfig(targets=(bad_dims,), texts=tuple(TEXTS), concurrency=(2,), requests=4, warmup_requests=0)
    (row,) = asyncio.run(sweep(dataclasses.replace(config, dims_mixes=((999,),)), lambda _: None))
    assert row["ok"] == 0 and row["errors"] == {"HTTP_400": 4} and row["latency"] is None


def test_a_server_that_never_answers_is_a_timeout_not_a_hang():
    async def scenario():
        accepted = []

        async def silent(reader, writer):
            accepted.append(writer)  # read nothing, answer nothing, keep the connection open

        listener = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        try:
            return await embed_once(TargetSpec(kind="http", address=f"127.0.0.1:{port}"), TEXTS[:1], 8, timeout=0.5)
        finally:
            for writer in accepted:
                writer.close()
            listener.close()

    error = run(scenario())
    assert isinstance(error, TargetError) and error.code == "TIMEOUT"


def _self_signed(directory) -> bytes:
    """A certificate for 127.0.0.1 (cert.pem, returned) and its key (key.pem) in `directory`, made with openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make a test certificate")
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert.read_bytes()


def test_bearer_token_and_tls(tiny_artifact, tmp_path):
    cert = _self_signed(tmp_path)
    (tmp_path / "token").write_text("s3cret\n")
    flags = ["--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem")]
    with serve(tiny_artifact, *flags, "--auth-token-file", str(tmp_path / "token")) as served:

        def spec(**options) -> TargetSpec:
            return TargetSpec(kind="http", address=served.http, **options)

        good = run(embed_once(spec(token="s3cret", root_certificates=cert), TEXTS, 8))
        wrong = run(embed_once(spec(token="guess", root_certificates=cert), TEXTS, 8))
        plain = run(embed_once(spec(token="s3cret"), TEXTS, 8))
    assert (good.texts, good.dims) == (3, 8)
    assert wrong.code == "HTTP_401" and "Bearer" in str(wrong)
    assert plain.code == "CONNECTION_ERROR"  # plain HTTP to a TLS port


def test_cli_one_run_over_grpc_and_http(server, http_server, tiny_artifact, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    for encoding_format in ("base64", "float"):
        out = tmp_path / f"{encoding_format}.json"
        argv = ["serve", "--target", f"mrl={server}", "--target", f"http={http_server}", "--texts", str(texts)]
        argv += ["--concurrency", "1,4", "--requests", "8", "--rounds", "2", "--threads", "1", "--out", str(out)]
        argv += ["--offline-baseline", str(tiny_artifact), "--offline-seconds", "0.1"]
        argv += ["--http-encoding-format", encoding_format]
        assert bench_main(argv) == 0
        report = load_report(out)
        rows = report["results"]
        assert [(r["target"], r["concurrency"]) for r in rows] == [
            (f"mrl={server}", 1),
            (f"http={http_server}", 1),
            (f"mrl={server}", 4),
            (f"http={http_server}", 4),
        ]
        for row in rows:
            assert row["ok"] == row["requests"] == 16 and row["errors"] == {} and row["rounds"] == 2
            assert row["texts_per_s"] > 0 and row["tokens_per_s"] > row["texts_per_s"]
            assert row["p50_over_offline_batch1_ms"] is not None
        assert all(r["vs_first_target"] > 0 for r in rows if r["target"].startswith("http="))
        assert report["config"]["http_encoding_format"] == encoding_format
        table = capsys.readouterr().out
        assert f"| http={http_server} |" in table and "vs first target" in table


def test_cli_refuses_an_unknown_encoding_format(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_main(["serve", "--target", "http=127.0.0.1:1", "--http-encoding-format", "float32"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "base64" in err


def test_targets_asking_for_several_outputs_run_beside_the_one_vector_targets(server, http_server, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    outputs = ";outputs=8:ubinary,:int8"
    targets = [f"mrl={server}", f"mrl={server}{outputs}", f"http={http_server}{outputs}"]
    out = tmp_path / "outputs.json"
    argv = ["serve", *(a for t in targets for a in ("--target", t)), "--texts", str(texts)]
    argv += ["--concurrency", "2", "--requests", "6", "--threads", "1", "--out", str(out)]
    assert bench_main(argv) == 0
    rows = load_report(out)["results"]
    assert [r["target"] for r in rows] == targets
    for row in rows:
        assert row["ok"] == row["requests"] == 6 and row["errors"] == {}, row
    mrl, http = target_specs(targets[1:], triton_model=None, token=None, root_certificates=None)
    assert mrl.outputs == http.outputs == ((8, "ubinary"), (None, "int8"))
    assert spec_from_json(json.loads(json.dumps(spec_to_json(http)))) == http
    with pytest.raises(InvalidInputError, match="use DIMS:ENCODING"):
        target_specs([f"mrl={server};outputs=8"], triton_model=None, token=None, root_certificates=None)
    with pytest.raises(InvalidInputError, match="leave out --dims-mix"):
        ServeConfig(targets=(mrl,), texts=tuple(TEXTS), dims_mixes=((8,),))
