"""Offline text for calibration and evaluation: the standard library's own documentation, and text files.

Every Python installation ships its standard library's source, and with it thousands of docstrings of
English prose about the library (with some code examples). ``stdlib_text(part)`` reads them with ``ast``
(nothing is imported or executed) from a fixed list of modules, in source order, one docstring per
paragraph. Two disjoint parts:

* ``"calibration"``: ~60 modules (``typing``, ``asyncio``, ``collections``, ...), the default calibration
  text of ``asyncllm quantize``;
* ``"heldout"``: five other modules (``argparse``, ``logging``, ``json``, ``dataclasses``, ``functools``),
  the default text of ``asyncllm eval perplexity``: no module of it is in the calibration part.

The text depends on the running Python's version (docstrings change between releases), never on the
machine; modules a version lacks are skipped. ``read_text_file`` reads a user's file: plain text, or JSON
Lines whose objects carry a ``text`` field (``.jsonl`` / ``.json`` suffix).
"""

from __future__ import annotations

import ast
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

CorpusPart = Literal["calibration", "heldout"]

HELDOUT_MODULES = ("argparse", "logging/__init__", "json/__init__", "dataclasses", "functools")
"""Modules of the held-out part, in order."""

CALIBRATION_MODULES = (
    "typing", "collections/__init__", "asyncio/tasks", "asyncio/events", "asyncio/streams", "asyncio/locks",
    "subprocess", "threading", "tempfile", "shutil", "textwrap", "difflib", "heapq", "bisect", "inspect",
    "contextlib", "enum", "random", "statistics", "fractions", "_pydecimal", "_pydatetime", "datetime",
    "calendar", "csv", "zipfile/__init__", "zipfile", "tarfile", "gzip", "pickle", "copy", "ast", "tokenize",
    "email/message", "http/client", "http/server", "urllib/parse", "urllib/request", "unittest/case",
    "unittest/mock", "configparser", "optparse", "pprint", "doctest", "traceback", "warnings", "weakref",
    "queue", "sched", "selectors", "smtplib", "locale", "gettext", "codecs", "string", "uuid", "secrets",
    "base64", "shlex", "glob", "fnmatch", "platform", "imaplib", "ftplib", "mailbox", "pdb", "timeit", "trace",
    "cmd", "socket", "ssl", "multiprocessing/pool", "concurrent/futures/_base", "xml/dom/minidom",
    "html/parser", "operator", "numbers", "abc", "_pyio", "pathlib", "pathlib/_local", "os", "importlib/abc",
)
"""Modules of the calibration part, in order (a file missing from this Python is skipped)."""

_PARTS: dict[str, tuple[str, ...]] = {"calibration": CALIBRATION_MODULES, "heldout": HELDOUT_MODULES}


def stdlib_text(part: CorpusPart) -> str:
    """The docstrings of ``part``'s modules (see the module docstring), paragraphs joined by blank lines.

    Raises ``ValueError`` for an unknown part, ``FileNotFoundError`` when this Python ships none of the
    part's modules as source."""
    if part not in _PARTS:
        raise ValueError(f"part: expected one of {sorted(_PARTS)}, got {part!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    paragraphs: list[str] = []
    found = False
    for module in _PARTS[part]:
        path = root / f"{module}.py"
        if not path.is_file():
            continue
        found = True
        paragraphs.extend(_docstrings(path.read_text(encoding="utf-8")))
    if not found:
        raise FileNotFoundError(f"no standard-library source under {root} for the {part!r} corpus")
    return "\n\n".join(paragraphs)


def _docstrings(source: str) -> Iterator[str]:
    """The docstrings of a module, its classes and functions, in source order."""
    tree = ast.parse(source)
    nodes: list[ast.AST] = [tree]
    while nodes:
        node = nodes.pop(0)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc
            children = [child for child in ast.iter_child_nodes(node)
                        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
            nodes[:0] = children


def read_text_file(path: str | os.PathLike[str]) -> str:
    """A text file's content; ``.jsonl`` / ``.json`` files are JSON Lines whose objects each carry a string
    ``text`` field, joined by blank lines. Raises ``ValueError`` naming the line of a malformed record and
    ``FileNotFoundError`` for a missing file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    content = path.read_text(encoding="utf-8")
    if path.suffix.lower() not in (".jsonl", ".json"):
        return content
    texts: list[str] = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON object ({error.msg})") from None
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{path}:{number}: expected an object with a string 'text' field")
        texts.append(text)
    return "\n\n".join(texts)
