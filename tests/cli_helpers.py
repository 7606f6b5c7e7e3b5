"""Running the CLI in-process as a user's shell would, for the tests of its messages."""
from __future__ import annotations

import sys


def run_cli(monkeypatch, capsys, *args):
    """(exit code, output with whitespace collapsed) of `jointcompress ARGS` through its main(), which turns
    a JointCompressError into one message and exit 2."""
    from jointcompress import cli

    monkeypatch.setattr(sys, "argv", ["jointcompress", *map(str, args)])
    cli.STATE["debug"] = False
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, " ".join((out.out + out.err).split())
