"""Row-wise L2 normalisation, shared by feature extraction and gallery search, and the
check of rows for NaN or inf.

Both ends must agree exactly: cosine scores are inner products of rows normalised here.
"""

from __future__ import annotations

import numpy as np


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """float32 rows of unit length (all-zero rows stay zero). Norms are taken in float64:
    float32 squares overflow from about 1e19, which made such a row all zeros."""
    squares = np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64)
    norms = np.maximum(np.sqrt(squares), 1e-12)[:, None]
    # divided in the rows' own precision: a float32 gallery needs no float64 copy
    norms = norms.astype(np.result_type(vectors, np.float32))
    return (vectors / norms).astype(np.float32, copy=False)


def finite_rows(vectors: np.ndarray) -> np.ndarray:
    """Boolean mask of the [N, D] rows without NaN or inf: those a model failed on (a broken
    export, a runtime overflowing) are told apart from the rest by it, and named."""
    return np.isfinite(vectors).all(axis=1)
