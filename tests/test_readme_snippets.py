"""The README's ```python blocks run as written, and what they import is installed by what the README names.

Each block runs in this process against the tiny random Llama of ``conftest.tiny_hf_dir``: the one
substitution is the model path, ``"path/to/model.gguf"`` (the README's placeholder for any model) becomes
that directory. A block that would name the real GGUF or a hub id would have to be added to
``MODEL_PLACEHOLDERS`` the same way. Blocks that only build an object (the FastAPI app) run without serving.

A third-party module a block imports must be a core dependency in ``pyproject.toml`` or come with an
extra that the block's README section names as ``asyncllm[extra]``.
"""

from __future__ import annotations

import ast
import asyncio
import re
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MODEL_PLACEHOLDERS = ('"path/to/model.gguf"',)
DISTRIBUTION_OF_MODULE = {"yaml": "pyyaml"}  # import name -> pip name, where they differ


def readme_snippets() -> list[tuple[str, str, str]]:
    """``(id, section text before the block, code)`` for each ```python block, in README order."""
    text = README.read_text()
    snippets = []
    for match in re.finditer(r"```python\n(.*?)```", text, re.DOTALL):
        heading = text.rfind("\n## ", 0, match.start())
        line = text.count("\n", 0, match.start()) + 1
        snippets.append((f"README.md:{line}", text[heading:match.start()], match.group(1)))
    return snippets


SNIPPETS = readme_snippets()


def _requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _project() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib")
    return dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"])


def third_party_imports(code: str) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module.split(".")[0])
    return {m for m in modules if m != "asyncllm" and m not in sys.stdlib_module_names}


def test_the_readme_has_python_snippets() -> None:
    assert len(SNIPPETS) >= 3
    assert any("fastapi" in third_party_imports(code) for _, _, code in SNIPPETS)


@pytest.mark.parametrize(("where", "section", "code"), SNIPPETS, ids=[s[0] for s in SNIPPETS])
def test_snippet_imports_come_with_the_extras_its_section_names(where: str, section: str, code: str) -> None:
    project = _project()
    core = {_requirement_name(r) for r in project["dependencies"]}
    extras = {name: {_requirement_name(r) for r in reqs} for name, reqs in project["optional-dependencies"].items()}
    named = set(re.findall(r"asyncllm\[([a-z0-9_-]+)\]", section))
    assert named <= set(extras), f"{where}: the README names extras pyproject lacks: {named - set(extras)}"
    provided = core.union(*(extras[name] for name in named))
    for module in sorted(third_party_imports(code)):
        dist = DISTRIBUTION_OF_MODULE.get(module, module).replace("_", "-")
        assert dist in provided, (f"{where} imports {module!r}, which neither the core dependencies nor the "
                                  f"extras its section names ({sorted(named)}) install")


@pytest.mark.parametrize(("where", "section", "code"), SNIPPETS, ids=[s[0] for s in SNIPPETS])
def test_snippet_runs_against_the_tiny_model(where: str, section: str, code: str, tiny_hf_dir: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    for module in third_party_imports(code):
        pytest.importorskip(module)
    runnable = code
    for placeholder in MODEL_PLACEHOLDERS:
        runnable = runnable.replace(placeholder, repr(str(tiny_hf_dir)))
    if runnable == code and re.search(r"from_pretrained\(|pipeline\(", code):
        pytest.fail(f"{where} loads a model none of MODEL_PLACEHOLDERS names: add its model reference there")
    namespace: dict[str, Any] = {"__name__": "readme_snippet"}
    exec(compile(runnable, where, "exec"), namespace)
    engine = namespace.get("engine")
    if engine is not None and hasattr(engine, "aclose"):  # built but never served
        asyncio.run(engine.aclose())
    printed = capsys.readouterr().out
    if "print(" in code:
        assert printed.strip(), f"{where} printed nothing"
