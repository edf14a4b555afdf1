"""Library use across threads and lifetimes: the Runner, the activation reader and the batch engine on one
real SmolLM2 model. Each case here aborted, segfaulted or answered wrongly before; each now is a one-line
RsLocalError or the right answer. Races are made deterministic by acting from inside llama.cpp's calls."""

from __future__ import annotations

import gc
import threading
import weakref

import numpy as np
import pytest

from rs_local.errors import RsLocalError
from rs_local.runtime import Runner
from rs_local.runtime.activations import BlockReader
from rs_local.runtime.batched import BatchEngine
from rs_local.vectors import ControlVector

PROMPT = [{"role": "user", "content": "Name three colours of the rainbow."}]


def elsewhere(call) -> str:
    """Run ``call`` on another thread now and say how it ended ("ok" or the error's text)."""
    seen: list[str] = []

    def run() -> None:
        try:
            call()
            seen.append("ok")
        except RsLocalError as exc:
            seen.append(str(exc))

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(30)
    return seen[0]


@pytest.fixture(scope="module")
def runner(smollm2_path) -> Runner:
    with Runner(smollm2_path, n_ctx=512) as r:
        yield r


def strong_vector(seed: int = 3) -> ControlVector:
    rng = np.random.default_rng(seed)
    return ControlVector({k: (v := rng.normal(size=576)) / np.linalg.norm(v) * 8 for k in range(4, 12)}, "llama")


def test_closing_from_another_thread_while_logits_are_read_is_refused(smollm2_path):
    """The logits were read after the decode's hold was released: a close() from another thread in that gap
    freed the context under the read (a segfault in 3 of 3 runs of a race)."""
    outcomes: list[str] = []

    class Watched(Runner):
        def _logits(self) -> np.ndarray:
            if not outcomes:
                outcomes.append(elsewhere(self.close))
            return super()._logits() if not self.closed else np.zeros(self.n_vocab, np.float32)

    with Watched(smollm2_path, n_ctx=256) as r:
        r.generate("Hello", max_tokens=2)
        assert "in use by another thread" in outcomes[0]
        assert not r.closed


def test_a_reader_is_one_thread_at_a_time_and_holds_its_model(runner):
    """Two threads on one BlockReader aborted the process (GGML_ASSERT); closing the reader, or the Runner
    whose weights it runs on, from another thread mid-read freed them under the decode."""
    seen: dict[str, str] = {}

    class Watched(BlockReader):
        def _take(self, tensor, ask):
            if not seen:
                seen["read"] = elsewhere(lambda: self.read_tokens([1, 2, 3]))
                seen["close reader"] = elsewhere(self.close)
                seen["close runner"] = elsewhere(runner.close)
            return super()._take(tensor, ask)

    with Watched(runner, [8], n_ctx=256) as reader:
        rows = reader.read(PROMPT)
    assert rows[8].shape == (576,)
    assert "in a call on another thread" in seen["read"] and "close it when the call has returned" in seen["close reader"]
    assert "in use by a reader or batch engine" in seen["close runner"] and not runner.closed


def test_closing_or_calling_again_from_a_calls_own_callback_is_refused(runner):
    """A stream's ``cancelled`` that closed its Runner segfaulted; an engine closed from its progress callback
    failed with AttributeError mid-call; a second generate_many from that callback cleared the outer call's
    sequences (wrong answers, no error). Each is a one-line error now, and both stay usable."""
    def close_runner() -> bool:
        runner.close()
        return False

    with pytest.raises(RsLocalError, match="close it when the call has returned"):
        list(runner.stream(PROMPT, max_tokens=2, cancelled=close_runner))
    assert not runner.closed
    with BatchEngine(runner, n_seq=1, seq_ctx=256) as engine:
        for meddle, message in ((lambda done, total: engine.close(), "close it when the call has returned"),
                                (lambda done, total: engine.generate_many(["x"], max_tokens=1), "from its own callback")):
            with pytest.raises(RsLocalError, match=message):
                engine.generate_many([PROMPT, PROMPT], max_tokens=2, progress=meddle)
        assert engine.generate_many([PROMPT], max_tokens=2)[0].tokens


def test_a_reader_dropped_without_close_is_freed_at_once(runner):
    """The ctypes callback held a bound method of the reader: a reference cycle, so a dropped reader kept its
    llama.cpp context until the cyclic collector ran (1.2 GB over 60 readers)."""
    gc.disable()
    try:
        reader = BlockReader(runner, [8], n_ctx=256)
        reader.read_tokens([1, 2, 3])
        gone = weakref.ref(reader)
        del reader
        assert gone() is None
    finally:
        gc.enable()


def test_a_runner_used_from_its_own_cancel_callback_is_an_error(runner):
    """``cancelled`` runs while the prompt's evaluation holds the context; a call made from it re-based the KV
    cache, and the outer answer went on over the inner one's cache: a wrong answer, no error."""
    inner: list[int] = []

    def meddle() -> bool:
        if not inner:
            inner.append(len(runner.generate("Hi", max_tokens=1).tokens))
        return False

    with pytest.raises(RsLocalError, match="another prompt in the middle"):
        list(runner.stream(PROMPT, max_tokens=4, cancelled=meddle))
    runner.clear_vectors()
    assert runner.chat(PROMPT, max_tokens=6).text == runner.chat(PROMPT, max_tokens=6).text


def test_the_batch_engine_follows_the_runners_vector(runner):
    """A vector set on the Runner before the engine was made, or cleared on it afterwards, did not reach the
    engine's own context: it answered plain under a steered Runner, and steered under a plain one."""
    runner.clear_vectors()
    with BatchEngine(runner, n_seq=1, seq_ctx=256) as engine:
        plain = engine.generate_many([PROMPT], max_tokens=8)[0].text
    runner.set_vectors([(strong_vector(), 1.0)])
    with BatchEngine(runner, n_seq=1, seq_ctx=256) as engine:
        steered = engine.generate_many([PROMPT], max_tokens=8)[0].text
        assert steered != plain
        runner.clear_vectors()
        assert engine.generate_many([PROMPT], max_tokens=8)[0].text == plain
        engine.set_vectors([(strong_vector(), 1.0)])
        assert engine.generate_many([PROMPT], max_tokens=8)[0].text == steered
    runner.clear_vectors()


def test_token_ids_and_arguments_outside_their_range_are_one_line_errors(runner):
    """ctypes wrapped 2**40 and 2**32+5 around to valid ids (an answer for the wrong token), a string of
    prompts was answered character by character, and an empty KV snapshot counted as restored."""
    with pytest.raises(RsLocalError, match="outside this model's vocabulary"):
        runner.is_end_token(2 ** 40)
    with pytest.raises(RsLocalError, match="whole number"):
        runner.token_bytes(3.5)
    with BatchEngine(runner, n_seq=1, seq_ctx=256) as engine:
        with pytest.raises(RsLocalError, match="outside this model's vocabulary"):
            engine.forced_logprobs(["hi"], [[5, 2 ** 32 + 5, 7]])
        with pytest.raises(RsLocalError, match="list of prompts"):
            engine.generate_many("hello")
        with pytest.raises(RsLocalError, match="max_tokens"):
            engine.generate_many(["hello"], max_tokens="3")
    tokens = runner.tokenize("Hello there")
    with pytest.raises(RsLocalError, match="refused a KV cache snapshot"):
        runner.kv_restore(tokens, b"")
    with pytest.raises(RsLocalError, match="does not fit the context"):
        runner.kv_restore([1] * 600, b"x")
    assert runner.generate("Hello there", max_tokens=2).tokens  # the failed restores left it usable


def test_vectors_in_the_wrong_shape_are_one_line_errors(runner):
    """A bare vector, a list of vectors or a text scale was a TypeError from deep inside set_vectors or the chat
    session's scale; each is now an RsLocalError that says the shape expected."""
    from rs_local.runtime.session import ChatSession

    vec = strong_vector()
    for parts in (vec, [vec], "v.gguf"):
        with pytest.raises(RsLocalError, match=r"\[\(vector, scale\), \.\.\.\]"):
            runner.set_vectors(parts)
    session = ChatSession(runner, max_tokens=2)
    with pytest.raises(RsLocalError, match=r"\[\(vector, scale\), \.\.\.\]"):
        session.set_vectors([vec])
    session.set_vectors([(vec, 0.5)])
    with pytest.raises(RsLocalError, match="expected a number"):
        session.set_scale("2")
    assert session.scale == 1.0 and [s for _v, s in runner.vectors] == [0.5]
    runner.clear_vectors()


def test_a_reader_stops_between_batches_when_its_caller_says(smollm2_path):
    """A policy's gate read the whole prompt of a server's client that had left (up to the context's size);
    it now stops before the next batch, and the next read of that prompt gives the same rows as a fresh one."""
    from rs_local.runtime.runner import PromptCancelled

    prompt = "count: " + " ".join(str(i) for i in range(300))  # ~1100 tokens: five batches of 256
    with Runner(smollm2_path, n_ctx=2048) as r:
        tokens = r.tokenize(prompt)
        with BlockReader(r, [8], n_ctx=2048, n_batch=256) as reader:
            asked: list[bool] = []
            with pytest.raises(PromptCancelled):
                reader.read_tokens(tokens, cancelled=lambda: asked.append(True) or len(asked) > 1)
            assert reader.tokens_evaluated == 0 and len(asked) == 2  # one batch read, then it stopped
            again = reader.read_tokens(tokens)[8]
        with BlockReader(r, [8], n_ctx=2048, n_batch=256) as fresh:
            assert np.allclose(fresh.read_tokens(tokens)[8], again, atol=1e-4)
