"""The docs stay true to the code: every flag of every `danlu` subcommand is in its section of
docs/cli.md, and every relative link of README.md and docs/ names a file that exists."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def flags(parser: argparse.ArgumentParser, name: str = "danlu"):
    """(command, long flag) for every option of every subcommand, recursively."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from flags(p, f"{name} {sub}")
        else:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    yield name, option


def sections(text: str) -> dict[str, str]:
    """'danlu X' -> the text of docs/cli.md's "### `danlu X`" section."""
    parts = re.split(r"^### `(danlu[^`]*)`\s*$", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def test_every_flag_is_in_its_section_of_cli_md():
    from danlu.cli import build_parser

    docs = sections((ROOT / "docs" / "cli.md").read_text())
    missing = [f"{command} {flag}" for command, flag in flags(build_parser())
               if flag not in docs.get(command, "")]
    assert not missing, f"docs/cli.md lacks: {missing}"


def test_relative_links_resolve():
    bad = []
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", md.read_text()):
            if "://" not in target and not target.startswith("mailto:") and not (md.parent / target).exists():
                bad.append(f"{md.relative_to(ROOT)} -> {target}")
    assert not bad, bad
