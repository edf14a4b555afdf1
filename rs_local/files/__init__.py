"""One package for files: bounded reading of text and JSON inputs, and atomic writing of outputs.

Everything a user hands rs-local as text (prompt sets, scores, responses, verdict logs,
labelled answers) is read through :func:`read_text`, and every file rs-local writes goes
through :func:`atomic_output` (or :func:`atomic_write_text` / :func:`atomic_write_bytes`),
so the rules below hold everywhere instead of in most places:

Reading
    Only regular files are read (a FIFO would block forever, ``/dev/zero`` never ends), and
    only up to :data:`MAX_INPUT_BYTES`. Text is strict UTF-8: a UTF-8 byte-order mark is
    stripped, UTF-16/32 (with or without a BOM) and NUL bytes are refused, with the line of the
    first bad byte. Lines end at ``\\n`` (a ``\\r`` before it is dropped) and nowhere else:
    ``str.splitlines`` would also cut at U+2028, U+0085, ``\\v`` and ``\\f``, which can sit
    inside a prompt or a JSON string. JSON is parsed with a nesting limit
    (:data:`MAX_JSON_DEPTH`), a digit limit on integers (:data:`MAX_INT_DIGITS`), no
    ``NaN``/``Infinity`` (not JSON, and they would become scores), no numbers that overflow
    to infinity, and no lone UTF-16 surrogates (``"\\ud800"`` parses, but cannot be encoded
    again and would fail minutes later). Every problem is one :class:`FileProblem` line that
    names the user's file (and the line where one is known).

Writing
    A write goes to a hidden temp file beside the target (``.NAME.<random>.tmp``), is flushed
    and fsynced, and is renamed over the target in one step, so a reader (or a crash) sees
    the old file or the whole new one, never half. The temp file is created like a plain
    ``open()`` would (mode ``0666`` minus the umask, not ``mkstemp``'s ``0600``) and is removed
    on any exception, ``KeyboardInterrupt`` included, and on SIGTERM while the write runs
    (the signal is turned into :class:`Terminated` for the duration). SIGKILL cannot be
    handled: a killed write leaves its temp file, and the next write to the same target
    removes such leftovers of ours older than :data:`STALE_TEMP_SECONDS`. Errors name the
    target, never the temp file. :func:`check_output_path` is the pre-flight every command
    runs before minutes of work.
"""

from rs_local.files.reading import (
    MAX_INPUT_BYTES, MAX_INT_DIGITS, MAX_JSON_DEPTH, JsonProblem, decode_utf8, edge_digest, is_json_int, is_json_number,
    is_cached_file, iter_jsonl,
    json_depth, json_type, jsonl_lines, load_json, parse_json, partial_tail, read_bytes, read_text, split_lines,
    stat_regular,
)
from rs_local.files.writing import (
    STALE_TEMP_SECONDS, Terminated, append_line, atomic_output, atomic_write_bytes, atomic_write_text,
    check_distinct, check_output_path, cut_partial_tail, dumps, file_mode, is_stale_dir, make_output_dir, new_temp, open_append,
    output_target, sweep_stale_temps, write_jsonl,
)

__all__ = [
    "MAX_INPUT_BYTES", "MAX_INT_DIGITS", "MAX_JSON_DEPTH", "STALE_TEMP_SECONDS", "JsonProblem", "Terminated",
    "append_line", "atomic_output", "atomic_write_bytes", "atomic_write_text", "check_distinct", "check_output_path", "cut_partial_tail",
    "output_target",
    "decode_utf8", "dumps", "edge_digest", "file_mode", "is_cached_file", "is_stale_dir", "is_json_int", "is_json_number", "iter_jsonl", "json_depth", "json_type",
    "jsonl_lines", "load_json", "make_output_dir", "new_temp",
    "open_append", "parse_json", "partial_tail", "read_bytes", "read_text", "split_lines", "stat_regular",
    "sweep_stale_temps", "write_jsonl",
]
