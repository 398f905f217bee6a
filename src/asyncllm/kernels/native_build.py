"""Build and load the CPU kernels written in C (``kernels/csrc``) with the machine's C compiler.

A kernel compiles once per machine: the shared library is cached under ``$ASYNCLLM_CACHE/native``
(default ``~/.cache/asyncllm/native``) under a name keyed by the source, the flags, the compiler's
version and the CPU's feature flags (it is built with ``-march=native``), so later processes only
``dlopen`` it. A compile writes to a temporary file and renames it into place, so processes racing to
build the same kernel never load a half-written library.

The libraries use OpenMP through GCC's runtime, ``libgomp.so.1``, which is the runtime torch's Linux
CPU builds load: the dynamic loader resolves both to the one already mapped, so the kernels and torch
share one thread pool instead of two teams competing for the cores. Hence the requirements: Linux, torch
parallelised with OpenMP, and GCC as ``$CC`` or ``cc``. When any is missing, or the compile fails,
``load_native_library`` returns ``None`` (logging why) and callers keep their torch ops. Whether a
model uses the native kernels at all is its kernel bundle's choice (``kernels.cpu.cpu_ops``, from
``EngineConfig.native_kernels``, whose default ``ASYNCLLM_NATIVE_KERNELS=0`` turns off).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

import torch

from asyncllm.assets import cache_dir
from asyncllm.config import NATIVE_KERNELS_ENV, native_kernels_default

logger = logging.getLogger("asyncllm.kernels")

COMPILE_FLAGS: tuple[str, ...] = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC")
"""``-ffast-math`` lets the compiler vectorise reductions and call glibc's vector ``expf``; it applies to
compiling only: linking runs without it, so loading the library never switches the process's
floating-point mode (denormals flushed to zero), which GCC's fast-math start-up file would do."""
LINK_FLAGS: tuple[str, ...] = ("-shared", "-fopenmp")
COMPILE_TIMEOUT_S = 120.0


def load_native_library(source_name: str) -> ctypes.CDLL | None:
    """The compiled library of ``kernels/csrc/<source_name>``, building it on first use; ``None`` when
    native kernels are off or cannot be built here (the reason is logged)."""
    loaded = _load(source_name)
    if isinstance(loaded, str):
        level = logging.WARNING if "failed" in loaded else logging.INFO
        logger.log(level, "native CPU kernel %s unavailable, using torch ops: %s", source_name, loaded)
        return None
    return loaded


def native_kernels_status() -> str:
    """``"on"`` when every native CPU kernel builds and loads here, else ``"off: <why>"`` (one line, for
    reports such as ``asyncllm bench``'s); ``$ASYNCLLM_NATIVE_KERNELS`` switched off counts as off."""
    if not native_kernels_default():
        return f"off: {NATIVE_KERNELS_ENV}={os.environ.get(NATIVE_KERNELS_ENV)}"
    for entry in resources.files("asyncllm.kernels").joinpath("csrc").iterdir():
        if entry.name.endswith(".c"):
            loaded = _load(entry.name)
            if isinstance(loaded, str):
                return f"off: {loaded}"
    return "on"


def _load(source_name: str) -> ctypes.CDLL | str:
    """The library, or why there is none."""
    problem = _unsupported_reason()
    if problem is not None:
        return problem
    compiler = _compiler()
    if compiler is None:
        return "no GCC found ($CC or cc)"
    source, headers = _source(source_name), _headers()
    target = _library_path(source_name, source, headers, compiler)
    if not target.exists():
        try:
            _compile(source_name, source, headers, compiler, target)
        except (OSError, subprocess.SubprocessError) as error:
            return f"{source_name} failed to build: {error}"
    try:
        return ctypes.CDLL(str(target))
    except OSError as error:
        return f"{source_name} failed to load: {error}"


def _source(source_name: str) -> bytes:
    return resources.files("asyncllm.kernels").joinpath("csrc", source_name).read_bytes()


def _headers() -> dict[str, bytes]:
    """Every header in ``csrc`` (the sources include them by name), by file name."""
    folder = resources.files("asyncllm.kernels").joinpath("csrc")
    return {entry.name: entry.read_bytes() for entry in folder.iterdir() if entry.name.endswith(".h")}


def _unsupported_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return f"needs Linux, this is {sys.platform}"
    backend = re.search(r"parallel backend:\s*(\S+)", torch.__config__.parallel_info())
    if backend is None or backend.group(1) != "OpenMP":
        return "torch is not parallelised with OpenMP"
    return None


def _compiler() -> tuple[str, str] | None:
    """``(path, version banner)`` of the C compiler when it is GCC."""
    path = shutil.which(os.environ.get("CC", "cc"))
    if path is None:
        return None
    try:
        banner = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return (path, banner) if "Free Software Foundation" in banner else None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _library_path(source_name: str, source: bytes, headers: dict[str, bytes], compiler: tuple[str, str]) -> Path:
    digest = hashlib.sha256()
    parts = [source, *(name.encode() + b"\0" + text for name, text in sorted(headers.items()))]
    for part in (*parts, " ".join(COMPILE_FLAGS + LINK_FLAGS).encode(), compiler[1].encode(),
                 platform.machine().encode(), _cpu_flags().encode()):
        digest.update(part)
        digest.update(b"\0")
    stem = Path(source_name).stem
    return cache_dir() / "native" / f"{stem}-{digest.hexdigest()[:20]}.so"


def _compile(
    source_name: str, source: bytes, headers: dict[str, bytes], compiler: tuple[str, str], target: Path
) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        for name, text in headers.items():
            (Path(work) / name).write_bytes(text)
        src = Path(work) / source_name
        src.write_bytes(source)
        obj, lib = src.with_suffix(".o"), src.with_suffix(".so")
        for command in ([compiler[0], *COMPILE_FLAGS, "-c", str(src), "-o", str(obj)],
                        [compiler[0], *LINK_FLAGS, str(obj), "-o", str(lib), "-lm"]):
            done = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
            if done.returncode != 0:
                raise subprocess.SubprocessError(f"{' '.join(command)}: {done.stderr.strip()[-2000:]}")
        os.replace(lib, target)
    logger.info("built native CPU kernel %s", target)
