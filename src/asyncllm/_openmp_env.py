"""Imported first by ``asyncllm/__init__``, before anything imports torch: bounds how long idle OpenMP
threads spin (``cpu_threads.set_openmp_wait_defaults``), which only works before torch loads the OpenMP
runtime. A user's own ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` is left as it is."""

from asyncllm.cpu_threads import set_openmp_wait_defaults

set_openmp_wait_defaults()
