"""Seeds for independent random streams.

Every random choice gets its own stream, named by everything it belongs to: a sample's label is
drawn from `derive_seed(data.seed, split, index, "label")` and its rendering from
`derive_seed(data.seed, split, index, "render")`. Two different names give unrelated 63-bit
seeds (a cryptographic hash), so no stream can replay another's numbers.
"""
from __future__ import annotations

import hashlib


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts, e.g. derive_seed(0, "train", 17, "label")."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
