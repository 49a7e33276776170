"""The OpenAI protocol's pure functions: request parsing, output encodings, responses, the error table."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from mrl.runtime import DimsError, EmbedOptions, LayersError, Output, OutputSpec, Plan, Profile
from mrl.serving.errors import ErrorKind, NotReadyError, QueueFullError, RequestExpiredError, RequestTooLargeError
from mrl.serving.http_errors import STATUS
from mrl.serving.model import EmbedResult, ModelInfo, ProfileInfo
from mrl.serving.openai_protocol import (
    ERROR_TYPES,
    ProtocolError,
    embeddings_response,
    error_response,
    models_response,
    output_encoding,
    parse_embeddings_request,
)


def parse(**fields):
    return parse_embeddings_request(json.dumps(fields).encode(), deadline=12.5)


def test_a_full_request_becomes_the_cores_query():
    parsed = parse(
        input=["a", "b"],
        model="m",
        dimensions=64,
        encoding_format="int8",
        user="u-1",
        prompt_name="query",
        truncate=True,
        layers=3,
    )
    q = parsed.query
    assert (q.texts, q.model, q.deadline) == (["a", "b"], "m", 12.5) and not parsed.base64
    assert q.options == EmbedOptions(
        outputs=(OutputSpec(dims=64, encoding="int8"),), layers=3, prompt_name="query", truncate=True
    )


def test_defaults_and_nulls_mean_the_servers_defaults():
    q = parse(input="one text").query
    assert (q.texts, q.model, q.options) == (["one text"], "", EmbedOptions())
    nulls = parse(
        input="x", model=None, dimensions=None, encoding_format=None, prompt_name=None, truncate=None, layers=None
    ).query
    assert (nulls.model, nulls.options) == ("", EmbedOptions())


@pytest.mark.parametrize(
    ("encoding_format", "output_dtype", "raw_bytes", "expected"),
    [
        (None, None, False, ("float32", False)),
        ("float", None, False, ("float32", False)),
        ("float", "float32", False, ("float32", False)),
        ("base64", None, False, ("float32", True)),  # OpenAI's meaning: float32 bytes
        ("base64", "float", False, ("float32", True)),
        ("base64", "float", True, ("float32", True)),
        ("base64", "int8", True, ("int8", True)),  # the raw bytes, asked for knowingly
        ("base64", "ubinary", True, ("ubinary", True)),
        ("int8", None, False, ("int8", False)),
        ("binary", "binary", False, ("binary", False)),
        ("float16", None, False, ("float16", False)),
        (None, "uint8", False, ("uint8", False)),
    ],
)
def test_output_encoding(encoding_format, output_dtype, raw_bytes, expected):
    assert output_encoding(encoding_format, output_dtype, raw_bytes) == expected


def test_a_missing_truncate_takes_the_servers_default():
    assert parse_embeddings_request(b'{"input": "a"}', truncate_default=True).query.options.truncate
    assert parse_embeddings_request(b'{"input": "a", "truncate": null}', truncate_default=True).query.options.truncate
    assert not parse_embeddings_request(
        b'{"input": "a", "truncate": false}', truncate_default=True
    ).query.options.truncate
    assert not parse_embeddings_request(b'{"input": "a"}').query.options.truncate


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"\xff\xfe", None, "not valid JSON"),
        (b"[1, 2]", None, "must be a JSON object"),
        (b"{}", "input", "input is missing"),
        (b'{"input": 12}', "input", "string or a list of strings, not a number"),
        (b'{"input": []}', "input", "at least one text"),
        (b'{"input": [1, 2, 3]}', "input", "token-id arrays are not supported"),
        (b'{"input": [[1, 2], [3]]}', "input", "token-id arrays are not supported"),
        (b'{"input": ["a", null]}', "input", "input[1] must be a string, not null"),
        (b'{"input": "a", "dimensions": "128"}', "dimensions", "whole number like 256"),
        (b'{"input": "a", "dimensions": 12.5}', "dimensions", "whole number"),
        (b'{"input": "a", "dimensions": true}', "dimensions", "whole number"),
        (b'{"input": "a", "layers": "3"}', "layers", "whole number like 3"),
        (b'{"input": "a", "layers": 2.5}', "layers", "whole number"),
        (b'{"input": "a", "layers": false}', "layers", "whole number"),
        (b'{"input": "a", "layer": 3}', "layer", "unknown field 'layer'"),
        (b'{"input": "a", "model": 7}', "model", "model must be a string, not a number"),
        (b'{"input": "a", "truncate": "yes"}', "truncate", "true or false"),
        (b'{"input": "a", "user": {"id": 1}}', "user", "user must be a string, not an object"),
        (b'{"input": "a", "prompt_name": ["q"]}', "prompt_name", "a string, not a list"),
        (b'{"input": "a", "encoding_format": "bf16"}', "encoding_format", "choose from float, base64, float16"),
        (b'{"input": "a", "encoding_format": 3}', "encoding_format", "a string"),
        (b'{"input": "a", "output_dtype": "int4"}', "output_dtype", "choose from float, float32"),
        (b'{"input": "a", "encoding_format": "float", "output_dtype": "int8"}', "output_dtype", "float32 numbers"),
        (b'{"input": "a", "encoding_format": "int8", "output_dtype": "uint8"}', "output_dtype", "disagree"),
        # What the openai SDK sends with extra_body={"output_dtype": "int8"}: it would decode int8 bytes as float32.
        (
            b'{"input": "a", "encoding_format": "base64", "output_dtype": "int8"}',
            "output_dtype",
            "decodes it as float32",
        ),
        (b'{"input": "a", "encoding_format": "int8", "raw_bytes": true}', "raw_bytes", "encoding_format to base64"),
        (b'{"input": "a", "raw_bytes": 1}', "raw_bytes", "true or false"),
        (b'{"input": [1, 2]}', "input", "check_embedding_ctx_length=False"),
        (b'{"input": "a", "dimension": 64}', "dimension", "unknown field 'dimension'; this endpoint takes input"),
    ],
)
def test_bad_bodies_say_what_to_fix(body, param, words):
    with pytest.raises(ProtocolError) as info:
        parse_embeddings_request(body)
    assert info.value.param == param and words in str(info.value)
    status, _, reply = error_response(info.value)
    error = json.loads(reply)["error"]
    assert status == 400 and error["param"] == param and error["type"] == "invalid_request_error"


def test_counts_are_checked_before_each_value_is_read():
    """A body may hold millions of tiny values: counting after reading each held the event loop for seconds, so
    a list over its limit is refused by its length alone (here: its last item would be refused otherwise)."""
    outputs = [{"dimensions": 8}] * 9 + [[]]
    with pytest.raises(ProtocolError, match=r"ask for 1 to 8 outputs, not 10") as info:
        parse_embeddings_request(json.dumps({"input": "a", "outputs": outputs}).encode())
    assert info.value.param == "outputs"
    with pytest.raises(ProtocolError, match=r"5 inputs in one request; this server takes at most 4") as info:
        parse_embeddings_request(json.dumps({"input": ["a", "b", "c", "d", 5]}).encode(), max_inputs=4)
    assert info.value.param == "input"
    assert len(parse_embeddings_request(b'{"input": ["a", "b", "c", "d"]}', max_inputs=4).query.texts) == 4


def test_a_body_of_more_values_than_a_request_holds_is_refused_before_it_is_parsed():
    """16 MiB of `[],` is 5.6 million lists, about a second of the event loop to parse and free: a body holding
    more values than --max-inputs texts and the fields can is refused by counting, not parsing."""
    for body in (
        b'{"input": [' + b"[]," * 3000 + b"[]]}",
        b'{"input": [' + b'"",' * 3000 + b'""]}',
        b'{"input": "a", "outputs": [' + b"{}," * 3000 + b"{}]}",
        b'{"input": "a", "user": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    ):
        with pytest.raises(ProtocolError, match=r"more JSON values than a request of at most 2048 texts") as info:
            parse_embeddings_request(body, max_inputs=2048)
        assert info.value.param == "input"
    # Texts full of quotes, brackets, commas, colons and backslashes are counted as the strings they are.
    texts = ['He said: "[a, {b: c}]", \\ and \\" then \\' * 50] * 2048
    body = json.dumps({"input": texts, "outputs": [{"dimensions": 8, "output_dtype": "int8"}] * 8, "user": "u"})
    assert parse_embeddings_request(body.encode(), max_inputs=2048).query.texts == texts


def test_echoed_values_are_cut_short():
    with pytest.raises(ProtocolError) as info:
        parse_embeddings_request(json.dumps({"input": "a", "x" * 5000: 1}).encode())
    assert len(str(info.value)) < 400 and len(info.value.param) == 100


GRAPH = Profile(name="d8-fp32", dims=8, precision="fp32", file="d8-fp32.onnx", sha256="0" * 64)


def result(vectors, encoding, dims):
    plan = Plan(graph=GRAPH, layers=6, outputs=(Output(dims=dims, encoding=encoding),), prompt="", truncate=False)
    return EmbedResult(plan=plan, vectors=(vectors,), input_tokens=7, queue_seconds=0.0, inference_seconds=0.0)


def test_float_and_base64_responses_in_openais_shape():
    vectors = np.array([[0.1, -0.5, 0.25], [1.0, 0.0, -1.0]], dtype=np.float32)
    plain = json.loads(embeddings_response(result(vectors, "float32", 3), "m", as_base64=False))
    assert plain["object"] == "list" and plain["model"] == "m"
    assert plain["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    assert [(d["object"], d["index"]) for d in plain["data"]] == [("embedding", 0), ("embedding", 1)]
    np.testing.assert_array_equal(np.array([d["embedding"] for d in plain["data"]], dtype=np.float32), vectors)
    b64 = json.loads(embeddings_response(result(vectors, "float32", 3), "m", as_base64=True))
    rows = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in b64["data"]]
    np.testing.assert_array_equal(np.stack(rows), vectors)
    assert (b64["dimensions"], b64["output_dtype"], b64["layers"]) == (3, "float32", 6)


def test_integer_encodings_are_json_integers_or_their_bytes():
    codes = np.array([[-128, 0, 127], [5, -6, 7]], dtype=np.int8)
    plain = json.loads(embeddings_response(result(codes, "int8", 3), "m", as_base64=False))
    assert [d["embedding"] for d in plain["data"]] == codes.tolist() and plain["output_dtype"] == "int8"
    b64 = json.loads(embeddings_response(result(codes, "int8", 3), "m", as_base64=True))
    assert base64.b64decode(b64["data"][0]["embedding"]) == codes[0].tobytes()


def test_models_list_in_openais_shape_with_extra_fields():
    info = ModelInfo(
        name="minilm", full_dims=384, default_dims=256, trained_dims=(256, 128), max_input_tokens=256,
        layers=(3, 6), default_layers=6, total_layers=6, trained_layers=(3, 6),
        profiles=(
            ProfileInfo(name="d256-fp32", dims=256, precision="fp32", layers=6),
            ProfileInfo(name="l3-d256-fp32", dims=256, precision="fp32", layers=3),
        ),
        prompts={"query": "q: "}, default_prompt=None, precision="fp32", ready=True, encodings=("float32", "int8"),
    )  # fmt: skip
    (entry,) = json.loads(models_response([info], 1700000000))["data"]
    assert (entry["id"], entry["object"], entry["created"], entry["owned_by"]) == (
        "minilm", "model", 1700000000, "mrl-toolkit",
    )  # fmt: skip
    assert entry["trained_dimensions"] == [256, 128] and entry["prompts"] == {"query": "q: "}
    assert entry["profiles"] == [
        {"name": "d256-fp32", "dimensions": 256, "precision": "fp32", "layers": 6},
        {"name": "l3-d256-fp32", "dimensions": 256, "precision": "fp32", "layers": 3},
    ]
    assert (entry["layers"], entry["default_layers"], entry["total_layers"], entry["trained_layers"]) == (
        [3, 6], 6, 6, [3, 6],
    )  # fmt: skip
    assert entry["encodings"] == ["float32", "int8"] and entry["default_dimensions"] == 256


@pytest.mark.parametrize(
    ("error", "status", "retry_after"),
    [
        (QueueFullError("q"), 429, "1"),
        (NotReadyError("w"), 503, "1"),
        (RequestTooLargeError("t"), 413, None),
        (RequestExpiredError("d"), 504, None),
        (RuntimeError("secret detail"), 500, None),
    ],
)
def test_error_table(error, status, retry_after):
    got, headers, body = error_response(error)
    assert got == status and headers.get("Retry-After") == retry_after
    assert "secret" not in body.decode()
    assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("error", "param"),
    [
        (DimsError("dims 0: at least 1"), "dimensions"),
        (DimsError("dims 257 is above the largest profile"), "dimensions"),
        (LayersError("layers 3 is not served"), "layers"),
    ],
)
def test_errors_the_models_plan_finds_name_the_bodys_field(error, param):
    status, _, body = error_response(error)
    assert status == 400 and json.loads(body)["error"]["param"] == param


def test_every_error_kind_has_an_http_status():
    assert set(STATUS) == set(ERROR_TYPES) == set(ErrorKind) - {ErrorKind.OK}
