"""Model identity shared across replicas: draft and target must tokenize alike."""

from __future__ import annotations

import hashlib
import json


def vocab_hash(vocab: dict[str, int]) -> str:
    """A short, order-independent hash of a tokenizer's vocabulary (token string -> id)."""
    blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
