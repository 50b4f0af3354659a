"""README.md, ARCHITECTURE.md and docs/*.md point only at files in this repository.

A reader of a clone has the repository and nothing else: a link or a path that
leaves it (``../``, an absolute path of somebody's machine) or names a file that
is not there sends them nowhere. Checked: every Markdown link to a file, and every
inline-code span that looks like a repository path (it starts with a top-level
entry of the repository or of the ``ringkv`` package, or ends in a file suffix,
and has a directory in it); a path under a directory the project's own commands
write (.gitignore's, such as bench/results/) need not exist in a fresh clone.
Absolute paths are allowed only for URL paths of the API and the usual system
locations (``/etc``, ``/var``, ``/proc``...), which are not repository files.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "ringkv"
DOCS = sorted([REPO / "README.md", REPO / "ARCHITECTURE.md", *(REPO / "docs").glob("*.md")])

FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\n]+)`")
FILE_SUFFIX = re.compile(r"\.(py|md|ya?ml|json|toml|txt|png|svg|service|cfg|ini|sh|csv)$")
# Absolute paths that are not files of the repository: the API's URL paths (etcd's /v3/ too) and
# the system's own places (where a deployment puts its config, data, /proc).
ABSOLUTE_OK = ("/v1/", "/v3/", "/metrics", "/etc/", "/var/", "/proc", "/usr/", "/run/", "/dev/",
               "/sys/", "/opt/")
URL = re.compile(r"https?://[^\s)>]+")
PLACEHOLDER = re.compile(r"<[^>]*>|\{[^}]*\}|\*")


def _top_level_names() -> frozenset[str]:
    names = {entry.name for entry in REPO.iterdir() if not entry.name.startswith(".")}
    names |= {entry.name for entry in PACKAGE.iterdir() if entry.is_dir()}
    return frozenset(names - {"data"})  # `make run`'s data directory is made, not shipped


TOP = _top_level_names()


def _exists(path: str, doc_dir: Path) -> bool:
    """``path`` names a repository file or directory: from the repository's root, the
    document's directory, or the ``ringkv`` package (module paths such as
    ``sim/bank.py``, or ``sim/linearizability`` for the module)."""
    for base in (REPO, doc_dir, PACKAGE):
        target = base / path
        if target.exists() or target.with_name(target.name + ".py").exists():
            return True
    return False


def _placeholder_dir(path: str) -> str:
    """The part of a path before its first placeholder (``bench/results/txn-<phase>.txt``:
    ``bench/results``), which must exist."""
    match = PLACEHOLDER.search(path)
    return path if match is None else path[:match.start()].rsplit("/", 1)[0]


def _generated_dirs() -> tuple[str, ...]:
    """Directories the project's own commands write into the clone (``make bench``'s
    bench/results/): .gitignore lists them, so they are named but not shipped."""
    lines = (REPO / ".gitignore").read_text().splitlines()
    return tuple(line.strip("/") + "/" for line in lines
                 if line.endswith("/") and "*" not in line and not line.startswith("#"))


GENERATED = _generated_dirs()


def looks_like_repo_path(text: str) -> bool:
    """A path with a directory in it (a bare file name is often an output file's)."""
    if " " in text or "://" in text or "/" not in text or text.startswith(("-", "$", "~")):
        return False
    first = text.split("/", 1)[0]
    if re.fullmatch(r"[A-Z][A-Z0-9_]*", first):
        return False  # DATA_DIR/cluster.json: a place the operator chooses, not a repo path
    return first in TOP or bool(FILE_SUFFIX.search(text))


def outside_pointers(text: str, doc_dir: Path) -> list[str]:
    """Every link or path in the Markdown ``text`` that leaves the repository or names
    nothing in it."""
    problems = []
    prose = FENCE.sub("", text)
    for target in LINK.findall(prose):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        path = target.split("#", 1)[0]
        if ".." in Path(path).parts or path.startswith("/"):
            problems.append(f"link {target} leaves the repository")
        elif not _exists(path, doc_dir):
            problems.append(f"link {target} names no file of the repository")
    for span in CODE.findall(prose):
        token = span.strip().rstrip(".,:;")
        if "../" in token or token.startswith(".."):
            problems.append(f"`{span}` leaves the repository")
            continue
        if token.startswith("/"):
            if not token.startswith(ABSOLUTE_OK) and token.count("/") > 1:
                problems.append(f"`{span}` is a path outside the repository")
            continue
        if not looks_like_repo_path(token):
            continue
        path = _placeholder_dir(token)
        if path and not (path + "/").startswith(GENERATED) and not _exists(path, doc_dir):
            problems.append(f"`{span}` names no file of the repository")
    for line in text.splitlines():  # prose and code blocks alike, URLs aside
        bare = URL.sub("", line)
        if re.search(r"(?<![\w.])\.\./", bare) or re.search(r"(?<!\w)/(work|home|root)/", bare):
            problems.append(f"a path outside the repository: {line.strip()}")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_the_docs_point_only_at_files_in_the_repository(doc: Path) -> None:
    assert outside_pointers(doc.read_text(), doc.parent) == []


def test_pointers_out_of_the_repository_are_caught() -> None:
    planted = "\n".join([
        "The design is in [the spec](../shared/design.md) and `../shared/notes.md`.",
        "See `/work/main/README.md`, `tests/test_nothing_here.py` and [x](docs/nope.md).",
        "```",
        "cp /home/someone/ringkv.yaml conf/",
        "```",
        # All of these are fine:
        "Run `tests/test_layering.py`; read `sim/bank.py`, `sim/linearizability`,",
        "`docs/native-protocol.md`, [config](conf/ringkv.yaml), `/v1/kv/{keyspace}/{key}`,",
        "`/etc/ringkv/ringkv.yaml`, `bench/proc_<x>.py`, `bench/results/ycsb.png`, `ops/s`,",
        "`10.213.0.0/16`, [a section](#guarantees), <https://example.org/x/../y>.",
    ])
    assert outside_pointers(planted, REPO) == [
        "link ../shared/design.md leaves the repository",
        "link docs/nope.md names no file of the repository",
        "`../shared/notes.md` leaves the repository",
        "`/work/main/README.md` is a path outside the repository",
        "`tests/test_nothing_here.py` names no file of the repository",
        "a path outside the repository: The design is in [the spec](../shared/design.md) and "
        "`../shared/notes.md`.",
        "a path outside the repository: See `/work/main/README.md`, "
        "`tests/test_nothing_here.py` and [x](docs/nope.md).",
        "a path outside the repository: cp /home/someone/ringkv.yaml conf/",
    ]
