"""The docs' config examples load, links between docs resolve, commands use real options.

Which ```toml blocks are checked as configs (the heuristic, deliberately):

- A block whose top-level keys are all config sections (gateway, broker,
  outbox, health, checkpoints, sparkplug, devices) is a config example.
  With a ``[gateway]`` table it is a complete config and is loaded as it is;
  without one it is a fragment of a config (a ``[broker]`` or ``[[devices]]``
  excerpt) and is loaded after a minimal ``[gateway] id = "docs-gw"``, so
  that its keys and values are still checked against the models.
- Any other block is not a gateway config (a serial profile, pyproject.toml,
  a sub-table excerpt such as ``[checksum]``) and is skipped.
- A block right after the line ``<!-- docs-test: skip -->`` is skipped too:
  for an example of a config that cannot load here on purpose (a driver the
  reader is about to write, say).

Every block (skipped or not) is listed in the test ids, so a reader can see
what was and was not checked with ``pytest --collect-only``.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

import pytest

from gateway.config import load_config, parse_config

REPO = Path(__file__).resolve().parent.parent
DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("**/*.md")])
CONFIG_FILES = sorted((REPO / "config").glob("*.toml"))
SECTIONS = {"gateway", "broker", "outbox", "health", "checkpoints", "sparkplug", "devices"}
SKIP_MARK = "<!-- docs-test: skip -->"
# Values for the ${VAR} references in the examples that have no default.
ENV = {"GATEWAY_ID": "line1-gw", "CREDENTIALS_DIRECTORY": "/run/credentials/gateway.service"}

_BLOCK = re.compile(r"^```toml\n(.*?)^```", re.S | re.M)
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _blocks() -> list[tuple[str, str, bool]]:
    """(id, text, skipped-by-marker) for every ```toml block in the docs."""
    out = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in _BLOCK.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            before = text[: m.start()].rstrip().rsplit("\n", 1)[-1].strip()
            out.append((f"{doc.relative_to(REPO)}:{line}", m.group(1), before == SKIP_MARK))
    return out


BLOCKS = _blocks()


@pytest.mark.parametrize(("where", "text", "marked"), BLOCKS, ids=[b[0] for b in BLOCKS])
def test_doc_config_example_loads(where: str, text: str, marked: bool) -> None:
    if marked:
        pytest.skip(f"{where}: marked {SKIP_MARK}")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        data = {}
    if not data or not set(data) <= SECTIONS:
        pytest.skip(f"{where}: not a gateway config (top-level keys {sorted(data)})")
    if "gateway" not in data:
        text = f'[gateway]\nid = "docs-gw"\n\n{text}'
    cfg = parse_config(text, Path(where), ENV)
    assert cfg.gateway.id


def test_some_doc_examples_are_checked() -> None:
    """Guards the heuristic: if it stopped matching, every example would be skipped."""
    complete = [w for w, t, m in BLOCKS if not m and re.search(r"^\[gateway\]", t, re.M)]
    assert len(complete) >= 3, complete


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_shipped_config_loads(path: Path) -> None:
    assert load_config(path, env={}).devices


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    text = _FENCE.sub("", doc.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*$", text, re.M):
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_doc_links_resolve(doc: Path) -> None:
    text = _FENCE.sub("", doc.read_text(encoding="utf-8"))
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target}: no such file {dest.relative_to(REPO)}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    assert not broken, f"{doc.relative_to(REPO)}:\n  " + "\n  ".join(broken)


def _subcommands() -> dict[str, set[str]]:
    from gateway.cli import _parser

    action = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {
        name: {o for act in sub._actions for o in act.option_strings}
        for name, sub in action.choices.items()
    }


def test_doc_commands_use_real_options() -> None:
    """Every `gateway SUB --option` written in the docs is an option SUB has.

    `simulate` is left out: what follows it are the simulator's own options.
    """
    subs = _subcommands()
    wrong = []
    for doc in DOCS:
        for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            for m in re.finditer(r"\bgateway ([a-z][a-z-]*)([^`|\n#]*)", line):
                sub, rest = m.group(1), m.group(2)
                if sub not in subs or sub == "simulate":
                    continue
                for opt in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-zA-Z])\b", rest):
                    if opt not in subs[sub]:
                        wrong.append(f"{doc.relative_to(REPO)}:{n}: gateway {sub} {opt}")
    assert not wrong, "options the command does not have:\n  " + "\n  ".join(wrong)
