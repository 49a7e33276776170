"""A JSON body's values counted before it is parsed, at the speed of `bytes.count`.

orjson holds the interpreter's lock while it parses, so the event loop (health included) waits for it: 16 MiB
of `[],` is 5.6 million lists, about a second to build and free. A request holds few values besides its texts
(at most --max-inputs strings and a few fields), so a body with far more is refused before it is parsed.
"""

from __future__ import annotations

FIELD_VALUES = 128
"""Strings, and brackets, commas and colons outside them, that a request's fields may add to its texts (keys,
a model name, up to 8 outputs of two fields each): generous, as a legitimate body is never near it."""


def too_many_values(body: bytes, max_inputs: int) -> str | None:
    """What to say if the JSON `body` holds more values than a request of `max_inputs` texts can (None: fine).

    Counts its strings (quotes, escaped ones aside) and the `[`, `{`, `,` and `:` outside them: every value
    but a string or a lone scalar comes with one. An upper bound for any body, exact enough for a request's.
    """
    plain = body.replace(b"\\\\", b"").replace(b'\\"', b"")  # escaped backslashes first: \\" ends a string
    strings = plain.count(b'"') // 2
    if strings <= max_inputs + FIELD_VALUES:
        outside = b"".join(plain.split(b'"')[0::2])  # at most ~2 * (max_inputs + FIELD_VALUES) pieces
        marks = sum(outside.count(mark) for mark in (b"[", b"{", b",", b":"))
        if marks <= max_inputs + FIELD_VALUES:
            return None
    return (
        f"the body holds more JSON values than a request of at most {max_inputs} texts can (--max-inputs): "
        "send the texts as a list of strings and each field once"
    )
