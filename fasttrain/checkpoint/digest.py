"""A checkpoint's content hash: what it holds, not how torch serialized it.

Every checkpoint fasttrain writes carries `digest`, the SHA-256 of all its other entries walked in a
fixed order (keys sorted, each value's type, a tensor's dtype, shape and bytes), and every load
computes it again: a bit flipped on disk, in a copy or by hand is refused before any of it is used.
The walk accepts only what a checkpoint may hold (tensors, numbers, strings, None and the dicts,
lists and tuples of them), so it also refuses anything else before it is written.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

DIGEST_KEY = "digest"


def content_digest(state: dict) -> str:
    """SHA-256 (hex) of every entry of `state` but its digest."""
    hasher = hashlib.sha256()
    _feed(hasher, {key: value for key, value in state.items() if key != DIGEST_KEY})
    return hasher.hexdigest()


def _feed(hasher: "hashlib._Hash", value: Any) -> None:
    if isinstance(value, torch.Tensor):
        flat = value.detach().to("cpu").contiguous().reshape(-1)  # a device tensor: read back (host sync)
        hasher.update(f"T{flat.dtype}{tuple(value.shape)}".encode())
        hasher.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    elif isinstance(value, dict):
        hasher.update(f"D{len(value)}".encode())
        for key in sorted(value, key=lambda k: (type(k).__name__, repr(k))):  # int keys (optimizer state) too
            _feed(hasher, key)
            _feed(hasher, value[key])
    elif isinstance(value, (list, tuple)):
        hasher.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)}".encode())
        for item in value:
            _feed(hasher, item)
    elif type(value) is str:
        encoded = value.encode("utf-8", "surrogatepass")
        hasher.update(f"S{len(encoded)}:".encode() + encoded)
    elif value is None or type(value) in (bool, int, float):  # not NumPy's scalars: they would need pickle
        hasher.update(f"{type(value).__name__[0]}{value!r};".encode())  # repr: exact for floats, nan and -0.0 too
    else:
        raise TypeError(f"a checkpoint holds only tensors, numbers, strings and their dicts and lists, "
                        f"not a {type(value).__module__}.{type(value).__qualname__}")
