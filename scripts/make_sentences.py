"""Write serve_kit/recipes/data/sentences.txt: real English sentences for the `minilm` recipe.

The sentences come from the docstrings of a fixed list of Python standard-library modules: real
prose written by people, shipped with every Python, so the recipe needs no download. Docstrings are
read with `ast` (nothing is imported or executed), split into sentences, and filtered to plain
prose (no code, no markup, a sensible length). A fixed seed then shuffles the de-duplicated
sentences so that the recipe's calibration and evaluation slices are varied and disjoint.

The output depends on the Python version whose standard library is read (recorded in the file's
header); re-running it with that version reproduces the file byte for byte (`--check`).

    python scripts/make_sentences.py            # writes the file
    python scripts/make_sentences.py --check    # exits 1 if the committed file differs
"""

from __future__ import annotations

import argparse
import ast
import platform
import random
import re
import sys
import sysconfig
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "serve_kit" / "recipes" / "data" / "sentences.txt"
SEED = 20261129
COUNT = 480
MAX_PER_MODULE = 40

# Modules with plenty of prose in their docstrings, across many subjects (text, numbers, time,
# networking, files, concurrency, data formats), so the sentences are not all alike.
MODULES = [
    "argparse", "ast", "asyncio/events.py", "asyncio/locks.py", "asyncio/queues.py", "asyncio/tasks.py",
    "base64", "bisect", "calendar", "cmd", "codecs", "collections/__init__.py", "concurrent/futures/_base.py",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "_pydecimal",
    "difflib", "email/message.py", "email/utils.py", "enum", "fileinput", "fnmatch", "fractions", "ftplib",
    "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html/parser.py",
    "http/client.py", "http/cookiejar.py", "http/server.py", "imaplib", "inspect", "ipaddress",
    "json/__init__.py", "json/decoder.py", "json/encoder.py", "locale", "logging/__init__.py",
    "logging/handlers.py", "mailbox", "mimetypes", "multiprocessing/pool.py", "netrc", "numbers",
    "optparse", "os", "pathlib", "pickle", "pdb", "pkgutil", "platform", "poplib", "pprint", "queue",
    "random", "re/__init__.py", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib",
    "socket", "socketserver", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "trace", "traceback", "turtle", "typing", "unittest/case.py",
    "urllib/parse.py", "urllib/request.py", "uuid", "warnings", "wave", "weakref", "webbrowser",
    "zipfile/__init__.py", "zipfile.py",
]

_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
# Anything that smells of code or markup: calls, operators, identifiers with underscores, reST roles,
# doctest prompts, paths, numbers with dots (versions), quotes of code.
_CODE = re.compile(r"[_=<>{}\[\]`*|\\#@$~^]|\(\)|>>>|\.\.\.|::|\w\.\w|\w\(|--|https?:|\bself\b|\bNone\b|\bTrue\b|\bFalse\b")
_ALLOWED = re.compile(r"[A-Za-z0-9 ,.;:'\"()!?%&/-]+")
_ABBREV = re.compile(r"\b(e\.g|i\.e|etc|vs|cf|Mr|Dr)\.$")


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for m in MODULES:
        p = root / m if m.endswith(".py") else root / f"{m}.py"
        if p.is_file():
            files.append(p)
    return files


def docstrings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                out.append(doc)
    return out


def sentences(doc: str) -> list[str]:
    # Paragraphs: a blank line or an indented block (examples, tables) ends a run of prose.
    result = []
    for para in re.split(r"\n\s*\n", doc):
        lines = [ln for ln in para.splitlines() if ln and not ln.startswith((" ", "\t"))]
        text = " ".join(ln.strip() for ln in lines)
        text = re.sub(r"\s+", " ", text).strip()
        parts = _SPLIT.split(text)
        merged: list[str] = []
        for part in parts:  # re-join splits after abbreviations such as "e.g."
            if merged and _ABBREV.search(merged[-1]):
                merged[-1] += " " + part
            else:
                merged.append(part)
        result.extend(merged)
    return result


def is_prose(s: str) -> bool:
    words = s.split()
    if not 8 <= len(words) <= 40 or not s[0].isupper() or not s.endswith("."):
        return False
    if _CODE.search(s) or not _ALLOWED.fullmatch(s):
        return False
    if s.count("(") != s.count(")") or s.count('"') % 2:
        return False
    # Mostly lower-case words: filters out titles, lists of names and constants.
    lower = sum(1 for w in words if w[:1].islower())
    return lower >= 0.6 * len(words)


def collect() -> list[str]:
    seen, picked = set(), []
    for path in stdlib_files():
        ours = []
        for doc in docstrings(path):
            for s in sentences(doc):
                key = s.lower()
                if is_prose(s) and key not in seen:
                    seen.add(key)
                    ours.append(s)
        picked.extend(ours[:MAX_PER_MODULE])  # no single module dominates
    random.Random(SEED).shuffle(picked)
    return picked[:COUNT]


def render(lines: list[str]) -> str:
    header = [
        "# Real English sentences from the docstrings of Python's standard library",
        f"# (Python {platform.python_version()}), written by scripts/make_sentences.py"
        f" (seed {SEED}). One sentence a line.",
    ]
    return "\n".join(header + lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed file instead of writing")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    lines = collect()
    if len(lines) < COUNT:
        print(f"only {len(lines)} sentences found (wanted {COUNT})", file=sys.stderr)
        return 1
    text = render(lines)
    if args.check:
        same = args.out.is_file() and args.out.read_text(encoding="utf-8") == text
        print("up to date" if same else f"{args.out} differs from what this Python produces")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {len(lines)} sentences, {len(text.encode())} bytes -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
