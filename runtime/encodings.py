"""Output encodings of unit embeddings, with the meanings sentence-transformers' `quantize_embeddings` and
Cohere's API give them: float32, float16, int8, uint8 (per-dimension scalar quantisation over calibrated
ranges), ubinary (sign bits packed 8 a byte, most significant first) and binary (the same bytes minus 128).
"""

from __future__ import annotations

import math

import numpy as np

from mrl.runtime.errors import EncodingError, shorten

ENCODINGS = ("float32", "float16", "int8", "uint8", "binary", "ubinary")
CALIBRATED = ("int8", "uint8")
"""Encodings that need per-dimension ranges (from `calibration_ranges`)."""
PACKED = ("binary", "ubinary")
"""Encodings that pack 8 dims into a byte: a row of d dims has ceil(d / 8) values."""
_DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "int8": np.int8,
    "uint8": np.uint8,
    "binary": np.int8,
    "ubinary": np.uint8,
}


def check_encoding(encoding: str) -> str:
    """`encoding` if it is one of ENCODINGS; else EncodingError listing them."""
    if encoding not in _DTYPES:
        raise EncodingError(f"unknown encoding {shorten(encoding)}; choose from {', '.join(ENCODINGS)}")
    return encoding


def dtype_of(encoding: str) -> np.dtype:
    """The numpy dtype of one encoded value."""
    return np.dtype(_DTYPES[check_encoding(encoding)])


def width(encoding: str, dims: int) -> int:
    """Values per encoded vector of `dims` components."""
    return math.ceil(dims / 8) if check_encoding(encoding) in PACKED else dims


def bytes_per_vector(encoding: str, dims: int) -> int:
    """Storage for one vector of `dims` components."""
    return width(encoding, dims) * dtype_of(encoding).itemsize


def calibration_ranges(vectors: np.ndarray) -> np.ndarray:
    """Per-dimension `[min, max]` of calibration vectors, shape `(2, dims)`, as `quantize_embeddings` takes them."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise EncodingError("calibration needs at least one vector (a [n, dims] array)")
    return np.stack([vectors.min(axis=0), vectors.max(axis=0)]).astype(np.float32)


def encode(vectors: np.ndarray, encoding: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """Encode `[n, dims]` float vectors; int8/uint8 need `ranges` (`(2, dims)`: min and max per dimension).

    int8/uint8: each dimension's [min, max] is cut into 256 equal buckets and a value gets its bucket's
    number (values outside the range are clipped to the end buckets); int8 is that number minus 128.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise EncodingError(f"encode takes a [n, dims] array, not shape {vectors.shape}")
    check_encoding(encoding)
    if encoding == "float32":
        return np.ascontiguousarray(vectors)
    if encoding == "float16":
        return vectors.astype(np.float16)
    if encoding in PACKED:
        bits = np.packbits(vectors > 0, axis=1)
        return bits if encoding == "ubinary" else (bits ^ 0x80).view(np.int8)  # x ^ 0x80 == x - 128 as int8
    if ranges is None:
        raise EncodingError(f"{encoding} needs per-dimension ranges from calibration vectors")
    ranges = np.asarray(ranges, dtype=np.float32)
    if ranges.shape != (2, vectors.shape[1]):
        raise EncodingError(f"ranges have shape {ranges.shape}, need (2, {vectors.shape[1]}) for these vectors")
    starts = ranges[0]
    steps = (ranges[1] - starts) / 255
    steps = np.where(steps == 0, 1, steps)  # a constant dimension: everything in bucket 0
    buckets = np.clip(np.floor((vectors - starts) / steps), 0, 255)
    return buckets.astype(np.uint8) if encoding == "uint8" else (buckets - 128).astype(np.int8)


def unpack_bits(codes: np.ndarray, encoding: str, dims: int) -> np.ndarray:
    """The sign bits (1: the component was > 0) of binary or ubinary codes, `[n, dims]` uint8."""
    if encoding not in PACKED:
        raise EncodingError(f"only {' and '.join(PACKED)} codes hold bits, not {encoding}")
    codes = np.asarray(codes)
    raw = codes.view(np.uint8) ^ 0x80 if encoding == "binary" else codes.view(np.uint8)
    return np.unpackbits(raw, axis=1, count=dims)


def little_endian(vectors: np.ndarray) -> np.ndarray:
    """`vectors` in little-endian byte order, the order every wire format here uses (a copy only where the
    machine is big-endian)."""
    return vectors.astype(vectors.dtype.newbyteorder("<"), copy=False)


def from_little_endian(data: bytes, encoding: str, rows: int) -> np.ndarray:
    """`rows` encoded vectors from their little-endian bytes, in the machine's byte order."""
    dtype = dtype_of(encoding).newbyteorder("<")
    return np.frombuffer(data, dtype=dtype).reshape(rows, -1).astype(dtype.newbyteorder("="))
