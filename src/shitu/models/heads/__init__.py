"""Classification heads used for training embeddings, registered in `shitu.registry.HEADS`.

Every head takes `(features, label=None)`; margin heads return plain cosine
similarities in eval mode or without labels.
"""

from shitu.registry import HEADS, import_submodules

import_submodules(__name__)

__all__ = ["HEADS"]
