"""Batch samplers, registered in `shitu.registry.SAMPLERS`."""

from shitu.registry import SAMPLERS, import_submodules

import_submodules(__name__)

from shitu.data.samplers.distributed import DistributedBatchSampler  # noqa: E402
from shitu.data.samplers.pk import PKSampler  # noqa: E402

__all__ = ["SAMPLERS", "DistributedBatchSampler", "PKSampler"]
