"""Token ids as native int32 bytes, the encoders' output format.

A kept list of Python ints costs a fresh 32-byte object per id in cold memory, which was most of what the ChatML
encoder spent on top of tiktoken; bytes are 4 per id and are joined with memcpy. Ids are < 2**31, so tiktoken's
uint32 buffers are the same bytes. Arrow takes the bytes as int32 arrays without unboxing anything.
"""

from __future__ import annotations

import functools
from array import array
from typing import TYPE_CHECKING

from ..constants import IGNORE_INDEX

if TYPE_CHECKING:
    import numpy as np

IGNORE_I32: bytes = array("i", [IGNORE_INDEX]).tobytes()


def i32(ids: list[int] | array) -> bytes:
    """The int32 bytes of a list of ids."""
    return array("i", ids).tobytes()


def as_list(v: list[int] | bytes) -> list[int]:
    return array("i", v).tolist() if type(v) is bytes else v  # type: ignore[return-value]


@functools.cache
def id_bytes(tid: int) -> bytes:
    """One id's bytes (control tokens: a few per turn, so cached)."""
    return array("i", [tid]).tobytes()


def any_trained(labels: bytes) -> bool:
    """Whether some label is not IGNORE_INDEX (a memset and a memcmp: array.count would box every label)."""
    return labels != IGNORE_I32 * (len(labels) >> 2)


def int32_array(v: list[int] | bytes) -> np.ndarray:
    """An int32 array of the ids: a view of bytes, or a converted list."""
    # numpy is imported here, not with the module: the tokenize path has it loaded already (datasets), and the
    # ChatML `data check` / `data tokenize` commands, which never call this, do not pay its ~0.1 s.
    import numpy as np

    return np.frombuffer(v, dtype=np.int32) if type(v) is bytes else np.asarray(v, dtype=np.int32)
