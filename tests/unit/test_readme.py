"""The README and docs/: a small front door, links that resolve, and commands and examples the code still has.

The README is the front door (what budgetflow is, the two commands, an example, a picture, a table of contents);
everything else lives in docs/*.md. These tests read them as text: no broker, no network. The checks of links, size
and wording import no budgetflow code, so they run even while the code does not import.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import shlex
import textwrap
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
SETTINGS_PAGE = DOCS / "operations.md"
README_MAX_BYTES = 12 * 1024
FIRST_SCREEN_LINES = 25
BEGIN, END = "<!-- settings:begin -->\n", "\n<!-- settings:end -->"

FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```[ \t]*$", re.M | re.S)
INLINE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"\[([^\]]*)\]\(([^()\s]+)\)")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def pages() -> list[Path]:
    """The README and every page of docs/."""
    return [README, *sorted(DOCS.glob("*.md"))]


def markdown_files(root: Path = ROOT) -> list[Path]:
    """Every markdown file of the repository, outside hidden folders, builds and installed metadata."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "build" and not d.endswith(".egg-info")]
        found += [Path(folder) / f for f in files if f.endswith(".md")]
    return sorted(found)


def fences(text: str, lang: str | None = None) -> list[str]:
    return [body for kind, body in FENCE.findall(text) if lang is None or kind == lang]


def prose(text: str) -> str:
    """The text without its fenced blocks (links and headings in code are not links and headings)."""
    return FENCE.sub("", text)


def code_snippets(text: str) -> list[str]:
    """Every piece of code: the lines of sh blocks and the inline code spans of the prose."""
    out = [line for body in fences(text, "sh") for line in body.splitlines()]
    return out + INLINE.findall(prose(text))


# -- anchors and links ----------------------------------------------------------------------------------------------
def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lowercase, punctuation other than - and _ dropped, spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, heading in HEADING.findall(prose(path.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(paths: list[Path]) -> list[str]:
    """Relative links to a file that does not exist, or to a heading its page does not have."""
    wrong = []
    for page in paths:
        for _, target in LINK.findall(INLINE.sub("", prose(page.read_text()))):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue  # https:, mailto: ...
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                wrong.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                wrong.append(f"{page.name}: {target} (no such heading in {dest.name})")
    return wrong


def citing_design(paths: list[Path]) -> list[Path]:
    return [p for p in paths if "design.md" in p.read_text().lower()]


def test_slug_follows_githubs_rule() -> None:
    assert slug("How long `make demo` takes") == "how-long-make-demo-takes"
    assert slug("Does the shift pay?") == "does-the-shift-pay"
    assert slug("`streams/` by sub-package") == "streams-by-sub-package"
    assert slug("Exactly once, and how it is proven") == "exactly-once-and-how-it-is-proven"
    assert (
        slug("Who can write (secure broker, `kafka start --secure`)")
        == "who-can-write-secure-broker-kafka-start---secure"
    )
    assert slug("snake_case and Grüße") == "snake_case-and-grüße"


def test_every_relative_link_points_to_a_file_and_heading_that_exist() -> None:
    assert broken_links(pages()) == []


def test_the_link_checker_sees_a_missing_file_and_a_missing_heading(tmp_path: Path) -> None:
    (tmp_path / "b.md").write_text("# B\n\n## Real heading\n")
    (tmp_path / "a.md").write_text(
        "# A\n\n[ok](b.md#real-heading) [ok](#a) [ok](https://example.com/x#y)\n"
        "[gone](missing.md) [bad anchor](b.md#no-such-heading) [bad here](#nowhere)\n"
        "```sh\n[in code](not-a-link.md)\n```\n"
    )
    assert broken_links([tmp_path / "a.md"]) == [
        "a.md: missing.md (no such file)",
        "a.md: b.md#no-such-heading (no such heading in b.md)",
        "a.md: #nowhere (no such heading in a.md)",
    ]


def test_no_markdown_file_cites_the_design_document() -> None:
    """The original design is not in this repository: the docs say what the code does, in their own words."""
    files = markdown_files()
    assert README in files
    assert SETTINGS_PAGE in files
    assert citing_design(files) == []


def test_the_design_check_sees_a_citation(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "x.md").write_text("As Design.md says.\n")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "y.md").write_text("design.md\n")
    assert citing_design(markdown_files(tmp_path)) == [tmp_path / "docs" / "x.md"]


# -- the front door -------------------------------------------------------------------------------------------------
def test_readme_is_a_small_front_door() -> None:
    size = README.stat().st_size
    assert size < README_MAX_BYTES, f"README.md is {size} bytes; move detail into docs/ (limit {README_MAX_BYTES})"


def test_readme_first_screen_gives_the_two_commands() -> None:
    first = "\n".join(README.read_text().splitlines()[:FIRST_SCREEN_LINES])
    assert "make demo" in first
    assert "make test" in first


def test_every_number_in_the_readme_is_in_the_docs_too() -> None:
    """The README claims nothing the docs do not hold: each of its numbers appears in docs/ as well."""
    docs = set(NUMBER.findall("\n".join(p.read_text() for p in pages()[1:])))
    missing = sorted(set(NUMBER.findall(README.read_text())) - docs)
    assert missing == [], f"numbers in README.md that no page of docs/ has: {missing}"


def test_the_readmes_picture_and_commands_are_the_docs_own() -> None:
    """The flow picture and the command block of the README are copies of the docs' (the example is shortened)."""
    docs = "\n".join(p.read_text() for p in pages()[1:])
    blocks = [body for kind, body in FENCE.findall(README.read_text()) if kind != "python"]
    assert len(blocks) >= 2
    assert [b.splitlines()[0] for b in blocks if b not in docs] == []


# -- what the pages show is what the code has -----------------------------------------------------------------------
def test_settings_table_is_current() -> None:
    from budgetflow.streams.cli import settings_markdown

    holders = [p for p in markdown_files() if BEGIN in p.read_text()]
    assert holders == [SETTINGS_PAGE], f"the settings table belongs in {SETTINGS_PAGE.relative_to(ROOT)} only"
    text = SETTINGS_PAGE.read_text()
    assert END in text
    table = text.split(BEGIN, 1)[1].split(END, 1)[0]
    assert table == settings_markdown(), "run `budgetflow settings --write docs/operations.md`"


def _command_lines() -> list[tuple[str, str]]:
    out = []
    for page in pages():
        for snippet in code_snippets(page.read_text()):
            words = snippet.split()
            while words and re.match(r"^[A-Z_]+=", words[0]):
                words.pop(0)  # VAR=value before the command
            if words and words[0] in ("budgetflow", ".venv/bin/budgetflow"):
                out.append((page.name, snippet))
    return out


def test_every_budgetflow_command_shown_exists_with_its_options() -> None:
    from budgetflow.streams.cli import cli
    from budgetflow.streams.dev.bench import KAFKA_SECTIONS, SECTIONS

    sections = set(SECTIONS) | set(KAFKA_SECTIONS)
    lines = _command_lines()
    assert len(lines) > 20  # the pages show commands; a parser that finds none proves nothing
    wrong = []
    for page, line in lines:
        words = [w.strip("[]") for w in shlex.split(line, comments=True)]
        while re.match(r"^[A-Z_]+=", words[0]):
            words.pop(0)
        command: click.Command = cli
        rest = words[1:]
        while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
            sub = command.commands.get(rest.pop(0))
            if sub is None:
                wrong.append(f"{page}: {line} (no such command)")
                break
            command = sub
        else:
            options = {o: p for p in command.params for o in p.opts if o.startswith("-")} | {"--help": None}
            for i, word in enumerate(rest):
                name = word.split("=", 1)[0]
                if not name.startswith("--"):
                    continue
                if name not in options:
                    wrong.append(f"{page}: {line} ({name} is not an option of {command.name})")
                    continue
                value = word.split("=", 1)[1] if "=" in word else (rest[i + 1] if i + 1 < len(rest) else "")
                param = options[name]
                if param is not None and isinstance(param.type, click.Choice) and value and not value.isupper():
                    wrong += [
                        f"{page}: {line} ({v} is not a {name})" for v in value.split("|") if v not in param.type.choices
                    ]
                if name == "--only" and command.name == "bench" and value not in sections:
                    wrong.append(f"{page}: {line} (no bench section {value})")
    assert wrong == []


def test_every_make_target_shown_exists() -> None:
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))
    shown = {
        (page.name, t)
        for page in pages()
        for s in code_snippets(page.read_text())
        for t in re.findall(r"\bmake ([a-z][a-z-]*)", s)
    }
    assert {t for _, t in shown} >= {"demo", "test", "run", "setup", "bench", "soak", "chart"}
    assert sorted((page, t) for page, t in shown if t not in targets) == []


PATH_PREFIXES = (
    "schemas/",
    "tokenizers/",
    "streams/",
    "tests/",
    "helm/",
    "examples/",
    "docs/",
    "unit/",
    "integration/",
)


def test_every_repository_path_and_test_named_exists() -> None:
    wrong = []
    for page in pages():
        for span in INLINE.findall(prose(page.read_text())) + [
            m for b in fences(page.read_text(), "sh") for m in b.split()
        ]:
            for token in re.findall(r"[\w./-]+\.py(?:::\w+)?|[\w./-]+/", span):
                path, _, test = token.partition("::")
                if not (path.startswith(PATH_PREFIXES) or re.match(r"^test_\w+\.py$", path)):
                    continue
                if path.startswith(("unit/", "integration/")):
                    path = "tests/" + path
                found = [ROOT / path] if (ROOT / path).exists() else sorted((ROOT / "tests").rglob(path))
                if not found or not found[0].exists():
                    wrong.append(f"{page.name}: {token} (no such file)")
                elif test and not re.search(rf"^(async )?def {test}\(", found[0].read_text(), re.M):
                    wrong.append(f"{page.name}: {token} (no such test)")
    assert wrong == []


def _python_examples() -> list[tuple[str, str]]:
    return [(page.name, body) for page in pages() for body in fences(page.read_text(), "python")]


@pytest.mark.parametrize(("page", "code"), _python_examples(), ids=lambda v: v if v.endswith(".md") else "")
def test_python_examples_compile_and_use_real_names(page: str, code: str) -> None:
    """Each example parses (as the body of an async function), imports names that exist, and calls real methods."""
    tree = ast.parse("async def _example():\n" + textwrap.indent(code, "    "))
    from budgetflow.streams import BudgetPublisher, BudgetView

    receivers = {"publisher": BudgetPublisher, "view": BudgetView}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("budgetflow"):
            module = importlib.import_module(node.module or "")
            assert [a.name for a in node.names if not hasattr(module, a.name)] == [], f"{page}: {node.module}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            if isinstance(owner, ast.Name) and owner.id in receivers:
                method = getattr(receivers[owner.id], node.func.attr, None)
                assert method is not None, f"{page}: {owner.id}.{node.func.attr} does not exist"
                params = inspect.signature(method).parameters
                unknown = [k.arg for k in node.keywords if k.arg not in params]
                assert unknown == [], f"{page}: {owner.id}.{node.func.attr} takes no {unknown}"


def test_the_readme_example_imports_from_the_public_package() -> None:
    import budgetflow.streams

    (example,) = fences(README.read_text(), "python")
    imports = [
        n
        for n in ast.walk(ast.parse("async def _e():\n" + textwrap.indent(example, "    ")))
        if isinstance(n, ast.ImportFrom)
    ]
    assert [n.module for n in imports] == ["budgetflow.streams"]
    assert {a.name for a in imports[0].names} <= set(budgetflow.streams.__all__)


def test_the_topics_table_lists_every_topic() -> None:
    from budgetflow.schemas.settings import TopicSettings
    from budgetflow.streams.kafka.topics import Topics

    text = (DOCS / "architecture.md").read_text()
    missing = [t.name for t in Topics(TopicSettings()).all() if f"| `{t.name}` |" not in text]
    assert missing == [], f"topics docs/architecture.md#topics-and-keys does not list: {missing}"


def test_policy_files_shown_are_valid() -> None:
    """Every policy file the docs show (YAML or TOML) is read as `budgetflow policy apply` reads it."""
    from budgetflow.schemas.policy import parse_policy_text

    shown = [(p.name, b, False) for p in pages() for b in fences(p.read_text(), "yaml") if b.startswith("budgets:")]
    shown += [(p.name, b, True) for p in pages() for b in fences(p.read_text(), "toml") if "[[budgets]]" in b]
    assert shown, "the docs show a policy file"
    for page, body, toml in shown:
        assert parse_policy_text(body, source=page, toml=toml).budgets
