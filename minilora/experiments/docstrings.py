"""Real text that ships with Python: standard-library docstrings (the domain) and sentences of the
language reference (general text the domain task never sees). Nothing is downloaded or imported.

Domain: the docstrings of module families of the standard library, read from the library's source
files with `ast` (no module is imported, so nothing runs):

    family        modules (a package counts with every file under it)
    text          string, re, textwrap, difflib, html, gettext, locale, shlex, codecs, ...
    files         os, pathlib, shutil, glob, tempfile, zipfile, tarfile, gzip, ...
    internet      http, urllib, email, smtplib, socket, ssl, xmlrpc, ...
    concurrency   threading, multiprocessing, concurrent, asyncio, subprocess, queue, ...
    debugging     unittest, doctest, pdb, trace, traceback, inspect, dis, profile, ...
    data          json, csv, pickle, shelve, sqlite3, configparser, xml, ...

The task: which family does a docstring come from? Each docstring is cleaned (`inspect.cleandoc`)
and kept when it has at least `MIN_CHARS` characters; one that occurs twice is kept once, and one
that occurs in two families is dropped. A fixed number per family is drawn with a seeded shuffle
of the files' sorted order, so the examples and the split are the same on every machine with the
same Python version (another version's library has slightly different docstrings).

General sentences: `pydoc_data/topics.py`, the Python Language Reference as plain text (what
`help("if")` prints). It ships with every CPython, it is prose written for people rather than API
docstrings, and no module of the domain families is in it. Paragraphs that are indented (code and
grammar), headings and their underlines are skipped; the rest is cut into sentences.
"""

from __future__ import annotations

import ast
import functools
import random
import re
import sysconfig
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

FAMILIES = {  # label -> the modules (or packages) whose docstrings carry it
    "text": ("string", "re", "textwrap", "difflib", "html", "gettext", "locale", "shlex", "stringprep", "codecs"),
    "files": ("os", "pathlib", "shutil", "glob", "fnmatch", "tempfile", "filecmp", "fileinput", "stat", "zipfile",
              "tarfile", "gzip", "bz2", "lzma", "posixpath", "ntpath", "genericpath"),
    "internet": ("http", "urllib", "email", "smtplib", "ftplib", "imaplib", "poplib", "socket", "socketserver", "ssl",
                 "mimetypes", "xmlrpc", "wsgiref", "ipaddress"),
    "concurrency": ("threading", "multiprocessing", "concurrent", "asyncio", "subprocess", "queue", "sched",
                    "selectors"),
    "debugging": ("unittest", "doctest", "pdb", "bdb", "trace", "traceback", "inspect", "dis", "profile", "cProfile",
                  "pstats", "timeit", "pydoc", "tracemalloc", "warnings", "linecache"),
    "data": ("json", "csv", "pickle", "shelve", "dbm", "sqlite3", "configparser", "plistlib", "xml", "copyreg",
             "tomllib", "pickletools"),
}
MIN_CHARS = 40  # shorter docstrings ("Return the name.") say too little about their family
DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")  # a full stop, space, then a capital


class MissingSource(FileNotFoundError):
    """The standard library's source files are not installed (some minimal Python builds strip them)."""


@dataclass
class Docstrings:
    """The domain examples, split: texts and family indices."""

    train_texts: list[str]
    train_labels: list[int]  # index into `families`
    val_texts: list[str]
    val_labels: list[int]
    families: list[str]  # the class names, in FAMILIES' order


def stdlib_dir() -> Path:
    """Where this Python's standard library source lives."""
    return Path(sysconfig.get_paths()["stdlib"])


def module_files(root: Path, module: str) -> list[Path]:
    """The source files of one module: `root/module.py`, or every .py under the package `root/module/`
    (its tests excluded), in sorted order."""
    package = root / module
    if package.is_dir():
        return sorted(p for p in package.rglob("*.py") if not {"test", "tests"} & set(p.relative_to(root).parts))
    single = root / f"{module}.py"
    return [single] if single.is_file() else []


def file_docstrings(path: Path) -> list[str]:
    """The cleaned docstrings of a source file's module, classes and functions, in `ast.walk` order."""
    with tokenize.open(path) as f:  # honours the file's encoding declaration
        tree = ast.parse(f.read(), filename=str(path))
    found = (ast.get_docstring(node, clean=True) for node in ast.walk(tree) if isinstance(node, DOCUMENTED))
    return [text for text in found if text and len(text) >= MIN_CHARS]


def family_docstrings(root: Optional[Path] = None) -> dict[str, list[str]]:
    """Every usable docstring of each family, deduplicated, in the files' sorted order."""
    return {family: list(texts) for family, texts in _parsed(Path(root or stdlib_dir()).resolve()).items()}


@functools.lru_cache(maxsize=4)
def _parsed(root: Path) -> dict[str, tuple[str, ...]]:
    """family_docstrings, parsed once per process (the library's files do not change while it runs)."""
    if not (root / "os.py").is_file():
        raise MissingSource(f"the standard library's source files are not in {root} (no os.py): this Python was "
                            "installed without them; use a Python that ships its .py files (python.org's, "
                            "pyenv's, a distribution's full python3 package)")
    texts: dict[str, list[str]] = {}
    owners: dict[str, set[str]] = {}  # text -> the families it occurs in
    for family, modules in FAMILIES.items():
        seen: list[str] = []
        for module in modules:
            for path in module_files(root, module):
                seen += file_docstrings(path)
        texts[family] = list(dict.fromkeys(seen))  # first occurrence of each text, order kept
        for text in texts[family]:
            owners.setdefault(text, set()).add(family)
    return {family: tuple(t for t in found if len(owners[t]) == 1) for family, found in texts.items()}


def load_docstrings(per_family: int, n_val: int, seed: int = 0, root: Optional[Path] = None) -> Docstrings:
    """`per_family` docstrings of each family, `n_val` of them held out for validation."""
    if not 0 < n_val < per_family:
        raise ValueError(f"n_val must be in (0, per_family={per_family}), got {n_val}")
    found = family_docstrings(root)
    train_texts, train_labels, val_texts, val_labels = [], [], [], []
    for label, (family, texts) in enumerate(found.items()):
        if len(texts) < per_family:
            raise ValueError(f"family {family!r} has {len(texts)} docstrings, fewer than per_family={per_family}; "
                             "ask for fewer")
        chosen = list(texts)
        random.Random(f"{seed}:{family}").shuffle(chosen)  # a string seed: the same draw on every platform
        val_texts += chosen[:n_val]
        val_labels += [label] * n_val
        train_texts += chosen[n_val:per_family]
        train_labels += [label] * (per_family - n_val)
    return Docstrings(train_texts, train_labels, val_texts, val_labels, list(found))


def reference_sentences(root: Optional[Path] = None, min_chars: int = 40, max_chars: int = 200) -> list[str]:
    """Sentences of the language reference (pydoc_data/topics.py), in topic order, deduplicated."""
    root = root or stdlib_dir()
    path = root / "pydoc_data" / "topics.py"
    if not path.is_file():
        raise MissingSource(f"{path} is missing: this Python was installed without pydoc's topics (the text "
                            "help('if') prints); use a Python that ships its standard library's .py files")
    topics = _topics_dict(path)
    sentences = []
    for name in sorted(topics):
        for paragraph in topics[name].split("\n\n"):
            lines = paragraph.strip("\n").splitlines()
            if not lines or any(line.startswith((" ", "\t")) for line in lines):
                continue  # code, grammar rules, indented notes
            if len(lines) == 2 and set(lines[1]) <= set("*=-~^"):
                continue  # a heading and its underline
            flat = " ".join(line.strip() for line in lines)
            for sentence in SENTENCE_END.split(flat):
                if min_chars <= len(sentence) <= max_chars and sentence[-1] in ".!?" and "::=" not in sentence:
                    sentences.append(sentence)
    return list(dict.fromkeys(sentences))


def _topics_dict(path: Path) -> dict[str, str]:
    """The `topics = {...}` literal of pydoc_data/topics.py, read without importing it."""
    with tokenize.open(path) as f:
        tree = ast.parse(f.read(), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            return ast.literal_eval(node.value)
    raise MissingSource(f"{path} has no `topics = {{...}}` dictionary: not pydoc's topics file")
