"""Row-wise L2 normalisation, shared by feature extraction and gallery search.

Both ends must agree exactly: cosine scores are inner products of rows normalised here.
"""

from __future__ import annotations

import numpy as np


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """float32 rows of unit length (all-zero rows stay zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
