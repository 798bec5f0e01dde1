"""The docs stay true to the tree: what they cite exists, their links resolve, and nothing in
the repository points outside it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
# Backticked repository paths, optionally with a symbol: `router/api.py:OpenAIServing.serve`.
CITED = re.compile(r"`((?:[\w.-]+/)+[\w.-]*?)(?::([\w.]+))?`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
TEXT_SUFFIXES = {".py", ".pyi", ".md", ".proto", ".yaml", ".yml", ".toml", ".json", ".txt",
                 ".tpl", ".cfg", ".ini", ".sh", ""}
SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "__pycache__", ".pytest_cache",
             ".ruff_cache", "node_modules"}


def _cited(doc: Path) -> list[tuple[str, str | None]]:
    return [(m.group(1), m.group(2)) for m in CITED.finditer(doc.read_text())]


def _defines(path: Path, symbol: str) -> bool:
    """Whether `symbol` ("name" or "Class.member") is defined at the top of `path`."""
    body = ast.parse(path.read_text()).body
    for part in symbol.split("."):
        found = None
        for node in body:
            names = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names = [node.target.id]
            if part in names:
                found = node
                break
        if found is None:
            return False
        body = getattr(found, "body", [])
    return True


def _is_repo_path(text: str) -> bool:
    # `baton.dev/last-applied`, `app.kubernetes.io/*`, `kubernetes.io/service-name` are not
    # files; repository paths start with a folder of the tree.
    head = text.split("/")[0]
    return head not in ("", ".", "..", "~") and (ROOT / head).exists()


@pytest.mark.parametrize("doc", [ROOT / "docs" / name for name in ("architecture.md", "decisions.md", "performance.md")],
                         ids=lambda p: p.name)
def test_every_file_and_function_the_map_names_exists(doc):
    missing = []
    for path, symbol in _cited(doc):
        if not _is_repo_path(path):
            continue
        target = ROOT / path
        if not target.exists():
            missing.append(path)
        elif symbol and target.suffix == ".py" and not _defines(target, symbol):
            missing.append(f"{path}:{symbol}")
    assert not missing, f"{doc.name} names what is not in the tree: {missing}"


def test_result_files_cited_in_the_performance_history_exist():
    # A bare `name.json` there is a file under bench/results/, unless its line says where in
    # git history it is now (a removed file is cited as "... (removed; in git at <commit>)").
    missing = []
    for line in (ROOT / "docs" / "performance.md").read_text().splitlines():
        for name in re.findall(r"`([\w.-]+\.(?:json|png))`", line):
            if not (ROOT / "bench" / "results" / name).exists() and "in git at" not in line:
                missing.append(name)
    assert not missing, f"docs/performance.md cites result files that are gone: {missing}"


def _anchors(doc: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for line in doc.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_between_the_docs_resolve(doc):
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):  # http(s), mailto
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert not broken, f"{doc.name} links to what does not exist: {broken}"


def test_nothing_in_the_repository_points_outside_it():
    # Built from parts so that this file does not match itself.
    outside = re.compile("|".join(re.escape(s) for s in ("DESIGN" + ".md", "../" + "shared")))
    hits = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts):
            continue
        if not path.is_file() or path.is_symlink() or path.suffix not in TEXT_SUFFIXES:
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        hits += [f"{rel}:{n}" for n, line in enumerate(text.splitlines(), 1) if outside.search(line)]
    assert not hits, f"these lines point outside the repository: {hits}"


def _table_flags(section: str, doc: str = "operations.md") -> list[set[str]]:
    """The flags named in the first column of each table of a section of docs/`doc`."""
    text = (ROOT / "docs" / doc).read_text()
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    tables, current = [], None
    for line in body.splitlines():
        if line.startswith("|"):
            if current is None:
                current = set()
                tables.append(current)
            # "`--no-...`" names no flag: a name ends in a letter or digit
            current |= set(re.findall(r"--[a-z][a-z0-9-]*[a-z0-9](?![a-z0-9-])", line.split("|")[1]))
        else:
            current = None
    return tables


def _documented(option_strings: list[str], table: set[str]) -> bool:
    # `--no-x` documents the BooleanOptionalAction `--x` and the other way round.
    names = {o for o in option_strings if o.startswith("--")}
    names |= {o.replace("--no-", "--", 1) for o in names} | {"--no-" + o[2:] for o in names}
    return bool(names & table)


def test_the_command_line_tables_match_the_parsers(monkeypatch):
    from baton.cell import build_parser as cell_parser
    from baton.router.config import build_parser as router_parser
    from baton.worker import flags

    # The flags derived from EngineArgs fields are documented as a group, not one by one;
    # leaving them out also keeps torch unimported here.
    monkeypatch.setattr(flags, "_engine_field_flags", lambda group, explicit: [])
    worker_table, cell_table, router_table = _table_flags("Process command lines")
    worker = flags.build_parser("baton serve-decode", "decode")
    for parser, table in ((worker, worker_table), (cell_parser(), cell_table), (router_parser(), router_table)):
        _assert_table_matches(parser, table, "docs/operations.md")


def _assert_table_matches(parser, table: set[str], doc: str) -> None:
    """Every flag of `parser` is in `table`, and every flag of `table` is one of `parser`'s."""
    actions = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    undocumented = [a.option_strings[0] for a in actions if not _documented(a.option_strings, table)]
    known = {o for a in actions for o in a.option_strings}
    known |= {o.replace("--no-", "--", 1) for o in known}
    gone = sorted(f for f in table if f not in known)
    assert not undocumented, f"{parser.prog}: flags missing from {doc}: {undocumented}"
    assert not gone, f"{parser.prog}: {doc} names flags it does not accept: {gone}"


def test_the_decisions_list_every_handoff_failure_reason():
    from baton.kvtransfer.errors import REASONS

    text = (ROOT / "docs" / "decisions.md").read_text()
    listed = text.split("### Failure reasons", 1)[1].split("\n### ", 1)[0]
    missing = [r for r in REASONS if f"`{r}`" not in listed]
    assert not missing, f"docs/decisions.md, KV transfer, lacks failure reasons {missing}"


def test_sections_the_code_cites_exist():
    # Comments and docstrings point to docs as `docs/<file>.md, "<section>"`; the section
    # must be (the start of) a heading of that file.
    cited = re.compile(r"docs/([\w-]+\.md)\"?,? \"([^\"]+)\"")
    missing = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts):
            continue
        text = " ".join(line.strip().lstrip("#").strip() for line in path.read_text().splitlines())
        for doc, section in cited.findall(text):
            headings = [h.lstrip("#").strip() for h in (ROOT / "docs" / doc).read_text().splitlines()
                        if h.startswith("#")] if (ROOT / "docs" / doc).exists() else []
            if not any(h.startswith(section) for h in headings):
                missing.append(f"{rel}: docs/{doc}, {section!r}")
    assert not missing, f"code cites doc sections that do not exist: {missing}"


def test_the_components_table_lists_every_package_folder():
    import tomllib

    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text.split("## Components", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip() for line in table.splitlines() if line.startswith("|")}
    missing = [f"{folder}/ ({package})" for package, folder in package_dir.items()
               if f"`{folder}/`" not in rows or f"`{package}`" not in table]
    assert not missing, f"docs/architecture.md, Components, lacks {missing}"


def test_the_quickstart_tables_match_baton_up_and_baton_serve():
    from baton.serve import build_parser as serve_parser
    from baton.up import build_parser as up_parser

    (up_table,) = _table_flags("Options", "quickstart.md")
    serve_table = _table_flags("Coming from vLLM", "quickstart.md")[0]
    for parser, table in ((up_parser(), up_table), (serve_parser(), serve_table)):
        _assert_table_matches(parser, table, "docs/quickstart.md")
