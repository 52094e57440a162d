"""Content hashes: what identifies an array, a set or a settings record across processes
and runs (checkpoint metadata, resume checks, synthetic sets' `content_hash`, split hashes).
Only hashlib, JSON and numpy: any module may use it without loading a checkpoint library."""

from __future__ import annotations

import hashlib
import json

import jax
import numpy as np

__all__ = ["fingerprint"]


def fingerprint(*items) -> str:
    """sha256 hex digest of ``items`` in order: an array by its dtype, shape and bytes, any
    other value by its sorted-key JSON text. Stored hashes depend on this encoding (a
    synthetic set's ``content_hash`` is ``fingerprint(images, labels)``): changing it needs a
    format version bump of those artifacts."""
    h, after_json = hashlib.sha256(), False
    for x in items:
        is_array = isinstance(x, (np.ndarray, jax.Array))
        if is_array:
            a = np.ascontiguousarray(x)
            h.update(f"{a.dtype.str}{a.shape};".encode())  # delimits: bytes follow the shape
            h.update(a.tobytes())
        else:  # a newline parts two JSON texts in a row: ("1", "2") is not ("12")
            h.update(b"\n" * after_json + json.dumps(x, sort_keys=True, default=str).encode())
        after_json = not is_array
    return h.hexdigest()
