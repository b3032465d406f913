"""What every service's wire shares: the error shape, health replies, packed token ids and the two body
encodings (JSON for people, msgpack for the services' own clients).

Token ids travel as `TokenIds`: in JSON a plain list of integers; in msgpack one `bin` value holding the ids
as little-endian uint32 (4 bytes per id). Inside Python a validated `TokenIds` is always those packed bytes,
so a server can store, slice and return them without building one Python int per token. Both encodings
carry the same models, validated the same way. Importable without FastAPI, torch or vLLM.
"""

from __future__ import annotations

import array
import sys
from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypeVar

import msgpack
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
)

JSON_MEDIA_TYPE = "application/json"
MSGPACK_MEDIA_TYPE = "application/msgpack"
MSGPACK_MEDIA_TYPES = (MSGPACK_MEDIA_TYPE, "application/x-msgpack", "application/vnd.msgpack")

TOKEN_ID_BYTES = 4
"""Bytes per packed token id (uint32, little-endian)."""
MAX_TOKEN_ID = 2**32 - 1

if (
    array.array("I").itemsize != TOKEN_ID_BYTES
):  # pragma: no cover - every mainstream platform has 4-byte uint
    raise ImportError("this platform's array('I') is not 4 bytes wide; packed token ids need uint32")
_BIG_ENDIAN = sys.byteorder == "big"
_MSGPACK_BUFFER_BYTES = 8 * 2**20


class Wire(BaseModel):
    """Base of every wire model: unknown fields are rejected, field docs become the OpenAPI descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


MAX_INT64 = 2**63 - 1
"""Versions and steps are stored as 64-bit integers (Redis, safetensors metadata): anything larger is refused."""
Version = Annotated[int, Field(ge=0, le=MAX_INT64)]
"""A policy version: 0 is the weights a replica started from; each pushed update is the next integer."""


RELATIVE_LIMIT_PATTERN = r"^(0?\.[0-9]+|1(\.0+)?)?l$"
"""A share of l: "l", "0.5l", "0.1l", ".25l" (a decimal from 0 to 1, then "l")."""
TruncationLimit = (
    Annotated[int, Field(ge=0, strict=True)]
    | Annotated[str, StringConstraints(pattern=RELATIVE_LIMIT_PATTERN)]
)
"""RPO's truncation limit L: a token count >= 0, or a share of l ("0.5l", "0.1l", "l"), relative to the question's last group's
shortest response (docs/algorithm.md). The one declaration: the config, both wire schemas and the algorithm
use it. Strict: "300" on the wire is a mistake, not 300 (the config turns text from the environment into a
number before it gets here)."""


# ---------------------------------------------------------------------------------------------------------
# Packed token ids


def pack_token_ids(ids: Sequence[int]) -> bytes:
    """Token ids -> little-endian uint32 bytes. Raises ValueError naming the first bad id."""
    if any(type(v) is not int for v in ids):
        bad = next(i for i, v in enumerate(ids) if type(v) is not int)
        raise ValueError(f"token id at index {bad} must be an integer, got {ids[bad]!r}")
    try:
        packed = array.array("I", ids)
    except OverflowError:
        bad = next(i for i, v in enumerate(ids) if not 0 <= v <= MAX_TOKEN_ID)
        raise ValueError(f"token id at index {bad} must be in [0, {MAX_TOKEN_ID}], got {ids[bad]}") from None
    if _BIG_ENDIAN:  # pragma: no cover
        packed.byteswap()
    return packed.tobytes()


def unpack_token_ids(packed: bytes | bytearray | memoryview) -> list[int]:
    """Little-endian uint32 bytes -> token ids."""
    values = array.array("I")
    values.frombytes(packed)
    if _BIG_ENDIAN:  # pragma: no cover
        values.byteswap()
    return values.tolist()


def token_count(packed: bytes) -> int:
    """Number of token ids in a packed value."""
    return len(packed) // TOKEN_ID_BYTES


def _validate_token_ids(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        packed = bytes(value)
        if len(packed) % TOKEN_ID_BYTES:
            raise ValueError(
                f"packed token ids must be a multiple of {TOKEN_ID_BYTES} bytes (little-endian uint32), "
                f"got {len(packed)} bytes"
            )
        return packed
    if isinstance(value, list | tuple):
        return pack_token_ids(value)
    raise ValueError(f"expected a list of token ids, got {type(value).__name__}")


def _serialize_token_ids_json(value: bytes) -> list[int]:
    return unpack_token_ids(value)


TokenIds = Annotated[
    bytes,
    PlainValidator(_validate_token_ids),
    PlainSerializer(_serialize_token_ids_json, return_type=list[int], when_used="json"),
    WithJsonSchema(
        {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": MAX_TOKEN_ID},
            "description": "Token ids. In msgpack bodies: one bin value, little-endian uint32 per id.",
        }
    ),
]
"""Token ids: a JSON list of ints, or msgpack bin of little-endian uint32; packed bytes once validated."""


# ---------------------------------------------------------------------------------------------------------
# Errors and health


class ErrorDetail(Wire):
    type: str
    """Machine-readable class: validation_error, unauthorized, not_found, conflict, payload_too_large,
    unavailable, internal_error, ..."""
    message: str
    """What went wrong, for a person; never a traceback or a secret."""
    field: str | None = None
    """Dotted path of the offending field (e.g. `groups.3.epsilon`, `run_id`), when one is to blame."""


class ErrorResponse(Wire):
    """The one error shape of every service."""

    error: ErrorDetail


class HealthResponse(Wire):
    status: Literal["ok", "ready"]
    """`ok` from /healthz (the process answers), `ready` from /readyz (its dependencies answer too)."""


# ---------------------------------------------------------------------------------------------------------
# Body encodings

M = TypeVar("M", bound=BaseModel)


def is_msgpack(media_type: str | None) -> bool:
    """True when a Content-Type or Accept value names msgpack."""
    if not media_type:
        return False
    return any(t in media_type.lower() for t in MSGPACK_MEDIA_TYPES)


def encode_model(model: BaseModel, msgpack_body: bool) -> bytes:
    """A model as a body: msgpack (token ids as bin) or JSON (token ids as lists)."""
    if msgpack_body:
        # A large initial buffer saves the repeated grow-and-copy of msgpack's default 256 KiB one (a
        # 576-question update is ~6 MB: 5 ms -> 1 ms); the memory is only touched as far as it is written.
        packer = msgpack.Packer(use_bin_type=True, buf_size=_MSGPACK_BUFFER_BYTES)
        return packer.pack(model.model_dump(mode="python"))
    return model.model_dump_json().encode()


def decode_model(model_type: type[M], body: bytes, msgpack_body: bool) -> M:
    """A body as a model. Raises pydantic's ValidationError (bad fields, bad JSON) or ValueError (bad msgpack)."""
    if not msgpack_body:
        return model_type.model_validate_json(body)
    try:
        data = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ValueError(f"body is not valid msgpack: {exc}") from None
    return model_type.model_validate(data)


__all__ = [
    "JSON_MEDIA_TYPE",
    "MSGPACK_MEDIA_TYPE",
    "ErrorDetail",
    "ErrorResponse",
    "HealthResponse",
    "TokenIds",
    "ValidationError",
    "Wire",
    "decode_model",
    "encode_model",
    "is_msgpack",
    "pack_token_ids",
    "token_count",
    "unpack_token_ids",
]
