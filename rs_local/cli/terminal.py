"""Text from files anyone can write, made safe to print on a terminal (inspect, error lines),
and given to rich as text, never as markup (:func:`plain`, :func:`styled`)."""

from __future__ import annotations

from rich.text import Text


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def terminal_safe(text: str, limit: int | None = None) -> str:
    """``text`` with every non-printable character (ESC, newlines, C1 controls, bidi
    overrides, U+2028, lone surrogates ...) shown as a backslash escape, optionally cut.

    Metadata and file names come from files anyone can write; printed raw, an escape sequence
    can rewrite the terminal (move the cursor, change the title, hide text) and a newline can
    fake extra output lines.
    """
    if limit is not None and len(text) > limit:
        text = f"{text[:limit]}... ({len(text) - limit} more characters)"
    return "".join(ch if ch.isprintable() else _escape_char(ch) for ch in text)


def plain(text: object, style: str = "", *, multiline: bool = False) -> Text:
    """``text`` for rich as it is: never read as markup or ``:emoji:`` codes, non-printables escaped.

    The CLI's lines carry paths, set names, prompts, model answers and exception messages; given
    to rich as a string, ``runs/a[/x]`` raises MarkupError (after the work is done), ``a[bold]``
    loses its brackets and ``:warning:`` turns into a sign. ``multiline`` keeps newlines (answers).
    """
    s = str(text)
    safe = "\n".join(terminal_safe(part) for part in s.split("\n")) if multiline else terminal_safe(s)
    return Text(safe, style=style)


def styled(*pieces: str | Text | tuple[str, str]) -> Text:
    """One line from pieces: a str is shown as it is (:func:`plain`), a ``(text, style)`` pair
    is that text styled, a Text is kept. ``styled(("error:", "red"), " ", str(exc))`` replaces the
    markup string ``f"[red]error:[/] {exc}"``, which reads ``exc`` as markup."""
    out = Text()
    for piece in pieces:
        out.append(piece if isinstance(piece, Text) else plain(piece) if isinstance(piece, str) else plain(*piece))
    return out
