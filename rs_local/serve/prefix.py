"""The chat template's prefix, evaluated once per steering and kept, without changing any answer.

Profiling ``benchmarks/serve_load.py`` (SmolLM2-135M, 16-token answers) showed where the server
lost to llama-cpp-python's: not in Python, HTTP or sampling (about 1 ms a token on both) but in
the prompt. The server dropped the KV cache before every request and evaluated all 37 prompt
tokens, of which 24 are the chat template's system part and ``<|im_start|>user``, the same in
every request; llama-cpp-python's server keeps the longest common prefix and evaluated 13. On a
CPU a prompt token costs a third to a half of a decode step, so that was 15-20% of a request.

Reusing "whatever happens to be cached" makes an answer depend on what ran before it (a prompt
evaluated partly from the cache is not bit-identical to one evaluated whole). So the prompt is
split at a boundary that depends only on the prompt: the end of the template text before the
last message's content. Every prompt is evaluated as the same two batches, prefix then rest,
whether the prefix comes from the cache or not. The prefix's keys and values are a pure function
of (prefix tokens, steering), so a snapshot of them (llama.cpp's per-sequence state) restored
later gives bit-identical logits; ``tests/test_serve.py`` checks it. Snapshots are kept per
steering, so switching steering between requests costs a restore (a memory copy), not a prompt.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Sequence

from rs_local.errors import RsLocalError
from rs_local.runtime.runner import Prompt, Runner

#: Default memory for cached template heads (``serve --head-cache-mib`` sets it; the CLI's default matches).
HEAD_CACHE_BYTES = 64 << 20

#: Stands in for the last message's content to find where the template's fixed text ends.
SENTINEL = "\x01rs-local-split\x01"
#: A prefix shorter than this is not worth a second batch.
MIN_PREFIX = 8


def template_boundary(runner: Runner, prompt: Prompt, tokens: Sequence[int]) -> int:
    """How many leading tokens of ``tokens`` are template text before the last message's content; 0: no split.

    Raw completion prompts have no template and are not split. The boundary must tokenise the
    same alone as inside the whole prompt, or it is not used.
    """
    if isinstance(prompt, str) or not prompt:
        return 0
    messages = list(prompt)
    text = runner.format_chat(messages[:-1] + [{**messages[-1], "content": SENTINEL}])
    cut = text.find(SENTINEL)
    if cut <= 0:
        return 0
    head = runner.llama.tokenize(text[:cut].encode("utf-8"), add_bos=False, special=True)
    n = len(head)
    if n < MIN_PREFIX or n >= len(tokens) or list(tokens[:n]) != head:
        return 0
    return n


class PrefixStore:
    """KV snapshots by (steering key, prefix tokens), least recently used dropped past ``max_bytes``.

    One snapshot may take at most a quarter of the budget: the head of a long multi-turn chat is
    never asked for again (the next turn's head is longer), and must not evict the short system
    heads that every request shares.
    """

    def __init__(self, max_bytes: int = HEAD_CACHE_BYTES):
        self.max_bytes = max_bytes
        self.max_entry = max_bytes // 4
        self.bytes = 0
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, steering: Hashable, prefix: Sequence[int]) -> bytes | None:
        key = (steering, tuple(prefix))
        data = self._items.get(key)
        if data is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return data

    def put(self, steering: Hashable, prefix: Sequence[int], data: bytes) -> None:
        if len(data) > self.max_entry:
            return
        key = (steering, tuple(prefix))
        old = self._items.pop(key, None)
        self.bytes += len(data) - (len(old) if old is not None else 0)
        self._items[key] = data
        while self.bytes > self.max_bytes:
            _, dropped = self._items.popitem(last=False)
            self.bytes -= len(dropped)


def load_prompt(runner: Runner, store: PrefixStore, steering: Hashable, tokens: Sequence[int],
                boundary: int) -> bool:
    """Make the context hold ``tokens[:boundary]`` under the current vector; True when it came from ``store``.

    The caller has just set the vector for ``steering``; :meth:`Runner.stream` then evaluates the
    rest of the prompt as one batch.
    """
    prefix = tokens[:boundary]
    data = store.get(steering, prefix)
    if data is not None:
        try:
            runner.kv_restore(prefix, data)
            return True
        except RsLocalError:  # llama.cpp refused the snapshot: evaluate the head, as on a miss
            pass
    runner.prefill(prefix)
    try:
        data = runner.kv_snapshot(store.max_entry)
    except RsLocalError:  # the head is evaluated: the request goes on, only the cache entry is lost
        data = None
    if data is not None:
        store.put(steering, prefix, data)
    return False
