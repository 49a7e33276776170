"""Configuration is validated when built, with messages that say what to do; errors map to status codes."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from mrl.runtime.errors import (
    ArtifactError,
    DimsError,
    InputTooLongError,
    IntegrityError,
    MrlError,
    NotFoundError,
    UnknownPromptError,
)
from mrl.serving.auth import token_matches
from mrl.serving.config import BatcherConfig, ModelSpec, RequestLimits, ServerConfig
from mrl.serving.errors import (
    NotReadyError,
    QueueFullError,
    RequestExpiredError,
    RequestTooLargeError,
    UnsupportedError,
)
from mrl.serving.grpc_protocol import status_for


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_tokens": 0}, "max_batch_tokens must be a positive number.*try 16384"),
        ({"max_batch_size": -1}, "max_batch_size must be a positive number"),
        ({"max_queue_delay_ms": -1}, "max_queue_delay_ms must be 0 or more"),
        ({"max_queue_delay_ms": float("nan")}, "max_queue_delay_ms must be 0 or more, not nan"),  # was served
        ({"max_queue_delay_ms": float("inf")}, "max_queue_delay_ms must be 0 or more, not inf"),
        ({"max_queue_tokens": 100, "max_batch_tokens": 200}, "raise max_queue_tokens"),
        ({"max_batch_size": True}, "positive number"),
        ({"max_padding": 1.5}, "max_padding must be in 0..1"),
        ({"workers": 0}, "workers must be a positive number"),
    ],
)
def test_batcher_config_refuses_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BatcherConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"port": 70000}, "port must be an integer in 0..65535"),
        ({"metrics_port": -1}, "metrics_port must be an integer"),
        ({"host": ""}, "host must be an address"),
        ({"auth_token": "two words"}, "no whitespace"),
        ({"shutdown_grace_s": -1}, "shutdown_grace_s must be 0 or more"),
        ({"shutdown_grace_s": float("nan")}, "shutdown_grace_s must be 0 or more, not nan"),  # was served
        ({"idle_timeout_s": float("nan")}, "idle_timeout_s must be a positive number, not nan"),  # a bare NaN error
        ({"idle_timeout_s": float("inf")}, "idle_timeout_s must be a positive number, not inf"),  # a traceback
        ({"idle_timeout_s": 3e6}, "idle_timeout_s at most 2147483 .gRPC's limits"),  # 35 days: gRPC's OverflowError
        ({"max_connections": 2**31}, "max_connections must be at most 2147483647"),
        ({"http_port": 70000}, "http_port must be an integer"),
        ({"http_port": 50051}, "give HTTP and gRPC different ports"),
        ({"http_metrics": True}, "set http_port too"),
    ],
)
def test_server_config_refuses_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ServerConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_inputs_per_request": 0}, "max_inputs_per_request must be a positive number.*try 2048"),
        ({"max_message_bytes": -5}, "max_message_bytes must be a positive number"),
        ({"max_message_bytes": 3 << 30}, r"max_message_bytes must be at most 2147483647 \(gRPC's limit\)"),
    ],
)
def test_request_limits_refuse_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RequestLimits(**kwargs)


def test_configs_are_frozen_and_keyword_only():
    config = ServerConfig()
    with pytest.raises(AttributeError):
        config.port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        BatcherConfig(10)  # type: ignore[misc]
    assert "secret" not in repr(ServerConfig(auth_token="secret"))
    with pytest.raises(ValueError, match="without spaces"):
        ModelSpec(artifact_dir=Path("x"), name="a b")


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (DimsError("d"), grpc.StatusCode.INVALID_ARGUMENT),
        (UnknownPromptError("p"), grpc.StatusCode.INVALID_ARGUMENT),
        (InputTooLongError("l"), grpc.StatusCode.INVALID_ARGUMENT),
        (UnsupportedError("u"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFoundError("n"), grpc.StatusCode.NOT_FOUND),
        (QueueFullError("q"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (RequestTooLargeError("t"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (RequestExpiredError("r"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (NotReadyError("w"), grpc.StatusCode.UNAVAILABLE),
        (IntegrityError("i"), grpc.StatusCode.FAILED_PRECONDITION),
        (ArtifactError("a"), grpc.StatusCode.FAILED_PRECONDITION),
        (MrlError("m"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_table_maps_each_error_and_keeps_its_message(error, code):
    assert status_for(error) == (code, str(error))


def test_unexpected_errors_become_internal_without_leaking_their_text():
    code, message = status_for(KeyError("/secret/path"))
    assert code == grpc.StatusCode.INTERNAL
    assert "secret" not in message and "server log" in message


def test_token_matching():
    assert token_matches((("authorization", "Bearer abc"),), "abc")
    assert token_matches((("Authorization", b"bearer abc"),), "abc")
    assert not token_matches((("authorization", "Bearer abcd"),), "abc")
    assert not token_matches((("authorization", "Basic abc"),), "abc")
    assert not token_matches((("x-token", "Bearer abc"),), "abc")
    assert not token_matches(None, "abc")


def test_unset_thread_settings_default_as_mrl_serve_documents():
    spec = ModelSpec(artifact_dir=Path("a"))
    assert (spec.intra_op_threads, spec.spinning, spec.lone_batch_threads) == (None, None, None)
    two = spec.with_defaults(workers=2, cores=2)
    assert (two.intra_op_threads, two.spinning, two.lone_batch_threads) == (1, False, 2)  # cores shared out
    assert spec.with_defaults(workers=2, cores=16).intra_op_threads == 8
    assert spec.with_defaults(workers=4, cores=1).intra_op_threads == 1
    one = spec.with_defaults(workers=1, cores=4)
    assert (one.intra_op_threads, one.spinning, one.lone_batch_threads) == (4, True, 4)  # alone: spin
    given = ModelSpec(artifact_dir=Path("a"), intra_op_threads=3, spinning=True, lone_batch_threads=0)
    assert given.with_defaults(workers=2, cores=2) == given
    with pytest.raises(ValueError, match="intra_op_threads must be 0"):
        ModelSpec(artifact_dir=Path("a"), intra_op_threads=-1)
