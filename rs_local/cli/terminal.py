"""Text from files anyone can write, made safe to print on a terminal (inspect, error lines)."""

from __future__ import annotations


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
