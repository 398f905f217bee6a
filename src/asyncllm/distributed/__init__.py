"""Tensor parallelism: the per-rank view of a process group (``parallel_state``), the rank's worker
process (``worker``) and the driver-side runner that stands in for ``ModelRunner`` (``driver``).

Only ``parallel_state`` is imported by the layers; the worker and driver modules are imported on use.
"""
