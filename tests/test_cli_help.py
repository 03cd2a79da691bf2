"""`latentrt --help` and every subcommand's help read as plain text (issue 17, item 6)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from latentrt.cli import COMMANDS, DESCRIPTION, build_parser

MARKUP = ("``", ":mod:", ":func:", ":class:", ":meth:")


def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_top_level_help_is_one_plain_sentence():
    out = subprocess.run([sys.executable, "-m", "latentrt.cli", "--help"], capture_output=True, text=True, encoding="utf-8", errors="replace",
                         timeout=120, check=True).stdout
    assert "\n" not in DESCRIPTION and DESCRIPTION.endswith(".")
    assert " ".join(DESCRIPTION.split()[:4]) in " ".join(out.split())
    assert not any(m in out for m in MARKUP), out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", COMMANDS)
def test_subcommand_help_describes_every_argument(name):
    sub = _subparsers()[name]
    assert sub.description and sub.description[0].isupper() and sub.description.endswith("."), sub.description
    undocumented = [a.dest for a in sub._actions if not a.help]
    assert not undocumented, f"`latentrt {name}` arguments without help: {undocumented}"
    text = sub.format_help()
    assert not any(m in text for m in MARKUP), text
