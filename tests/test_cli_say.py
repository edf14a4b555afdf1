"""``say``, the CLI's status line: what it is given is printed as text, whatever it holds.

Its messages carry the user's paths (the demo's "vector written to PATH", model and prompt
files), and a path can look like rich markup: the directories ``a[`` and ``x]`` make
``a[/x]``, a closing tag with nothing to close.
"""

from __future__ import annotations

import pytest

from rs_local.cli.options import say


@pytest.mark.parametrize("message", [
    "vector written to /tmp/a[/x]/vector.gguf",  # rich raised MarkupError
    "read /data/runs[bold]/keep.jsonl",  # the brackets went, the rest turned bold
    "read keep:warning:.jsonl",  # became a warning sign
    "scale -1: refusal a 0% [3s] in C:\\runs\\",  # a trailing backslash escaped the closing tag
    "vector written to /home/someone/projects/refusal-steering/runs/2026-11-23/qwen2.5-coder-0.5b/v.gguf (312s)",
    # ^ cut at column 80 by a newline when stderr is not a terminal
])
def test_say_prints_its_message_as_text(message, capsys):
    say(message)
    captured = capsys.readouterr()
    assert captured.err == message + "\n" and captured.out == ""


def test_say_escapes_control_characters(capsys):
    """An ESC in a file name would otherwise reach the terminal as an escape sequence."""
    say("read /data/\x1b]0;owned\x07keep.jsonl\nsecond line")
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err
    assert err == "read /data/\\x1b]0;owned\\x07keep.jsonl\nsecond line\n"
