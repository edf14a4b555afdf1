"""Real GGUF models that differ from a built-in one in one respect, written with the gguf library.

Users bring models the developers never ran: a chat template that refuses a system message
(Gemma-2's), one that does not parse, a shorter trained context, a file with no weights. Tests
make such a model from SmolLM2 by copying every key and tensor, changing only what the test is
about, so llama.cpp and Transformers load a real file with a real difference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: A Gemma-2-style template: ChatML turns, but any system message is an error raised by the template.
SYSTEMLESS_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] | trim }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: A template with a Jinja syntax error.
BROKEN_TEMPLATE = "{% for m in messages %}{{ m.content }{% endfor"


def _value(field: Any, gguf: Any) -> tuple[Any, Any, Any]:
    """(value, type, sub-type) of a reader field, as GGUFWriter.add_key_value takes them."""
    kind = field.types[0]
    if kind != gguf.GGUFValueType.ARRAY:
        return field.contents(), kind, None
    sub = field.types[-1]
    if sub == gguf.GGUFValueType.STRING:
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data], kind, sub
    return [field.parts[i].tolist()[0] for i in field.data], kind, sub


def rewrite(src: Path, out: Path, *, strings: dict[str, str] | None = None, uint32: dict[str, int] | None = None,
            float32: dict[str, float] | None = None,
            drop: tuple[str, ...] = (), tensors: bool = True, blocks: int | None = None,
            arch: str | None = None) -> Path:
    """Copy ``src`` to ``out`` with keys dropped or set, optionally without its tensors, with only
    its first ``blocks`` blocks (the caller sets ``<arch>.block_count`` to match), or under another
    architecture name (its ``<arch>.`` keys renamed)."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    old = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(out), arch or old)
    changed = set(drop) | set(strings or {}) | set(uint32 or {}) | set(float32 or {})
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in changed:
            continue
        value, kind, sub = _value(field, gguf)
        if arch and key.startswith(old + "."):
            key = arch + key[len(old):]
        writer.add_key_value(key, value, kind, sub_type=sub)
    for key, text in (strings or {}).items():
        writer.add_string(key, text)
    for key, number in (uint32 or {}).items():
        writer.add_uint32(key, number)
    for key, number in (float32 or {}).items():
        writer.add_float32(key, number)
    if tensors:
        for t in reader.tensors:
            if blocks is not None and t.name.startswith("blk.") and int(t.name.split(".")[1]) >= blocks:
                continue
            writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
