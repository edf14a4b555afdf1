"""The llama.cpp runner with real control vectors on the real SmolLM2 GGUF (greedy decoding)."""

from __future__ import annotations

import numpy as np
import pytest

from rs_local.converters.gguf_io import read_control_vector, write_control_vector
from rs_local.errors import RsLocalError, VectorFileError
from rs_local.runtime import Runner
from rs_local.runtime.session import ChatSession
from rs_local.vectors import ControlVector

PROMPT = [{"role": "user", "content": "Name three colours of the rainbow."}]
N_TOKENS = 24


def random_vector(seed: int, layers, n_embd: int = 576, norm: float = 6.0) -> ControlVector:
    rng = np.random.default_rng(seed)
    dirs = {}
    for layer in layers:
        v = rng.normal(size=n_embd)
        dirs[layer] = v / np.linalg.norm(v) * norm
    return ControlVector(dirs, "llama")


@pytest.fixture(scope="module")
def runner(smollm2_path) -> Runner:
    return Runner(smollm2_path, n_ctx=512)


@pytest.fixture()
def plain(runner) -> list[int]:
    runner.clear_vectors()
    return runner.chat(PROMPT, max_tokens=N_TOKENS).tokens


def answer(runner: Runner) -> list[int]:
    return runner.chat(PROMPT, max_tokens=N_TOKENS).tokens


def test_model_facts(runner):
    assert (runner.n_embd, runner.n_layer, runner.model_hint) == (576, 30, "llama")


def test_greedy_is_deterministic_and_scale_zero_is_plain(runner, plain):
    assert answer(runner) == plain
    runner.set_vectors([(random_vector(1, range(4, 20)), 0.0)])
    assert answer(runner) == plain


def test_vector_changes_output_and_clearing_restores_it(runner, plain):
    runner.set_vectors([(random_vector(1, range(4, 20)), 1.0)])
    steered = answer(runner)
    assert steered != plain
    runner.clear_vectors()
    assert answer(runner) == plain


def test_swapping_vector_or_scale_takes_effect_without_reload(runner, smollm2_path, plain):
    """After a swap the KV cache must be dropped: compare with a fresh context steered from the start."""
    a, b = random_vector(1, range(4, 20)), random_vector(2, range(4, 20))
    runner.set_vectors([(a, 1.0)])
    first = answer(runner)
    runner.set_vectors([(b, 1.0)])
    second = answer(runner)
    runner.set_vectors([(b, 0.5)])
    third = answer(runner)
    fresh = Runner(smollm2_path, n_ctx=512)
    for vec, scale, seen in ((b, 0.5, third), (a, 1.0, first), (b, 1.0, second)):
        fresh.set_vectors([(vec, scale)])
        assert answer(fresh) == seen
    assert len({tuple(first), tuple(second), tuple(third), tuple(plain)}) == 4


def test_two_files_with_scales_equal_one_merged_vector(runner, tmp_path):
    v1, v2 = random_vector(3, range(4, 16)), random_vector(4, range(10, 22))
    p1, p2 = write_control_vector(v1, tmp_path / "a.gguf"), write_control_vector(v2, tmp_path / "b.gguf")
    runner.set_vectors([(read_control_vector(p1), 0.8), (read_control_vector(p2), -0.5)])
    two = answer(runner)
    merged = write_control_vector(ControlVector.merge([(v1, 0.8), (v2, -0.5)]), tmp_path / "m.gguf")
    runner.set_vectors([(read_control_vector(merged), 1.0)])
    assert answer(runner) == two
    runner.set_vectors([(read_control_vector(p1), 0.8)])
    assert answer(runner) != two  # the second file really contributed


def test_layer_range_excludes_layers_outside_it(runner, plain):
    only_25 = random_vector(5, [25], norm=40.0)
    runner.set_vectors([(only_25, 1.0)])
    assert answer(runner) != plain  # the vector does act when its layer is in range
    both = ControlVector({**only_25.directions, 6: random_vector(7, [6], norm=40.0).directions[6]}, only_25.model_hint)
    runner.set_vectors([(both, 1.0)], layer_range=(20, 25))
    assert answer(runner) == answer_with(runner, only_25)  # block 6 is outside the range: only 25 acts
    runner.set_vectors([(only_25, 1.0)], layer_range=(20, 25))
    assert answer(runner) != plain
    with pytest.raises(RsLocalError, match="misses every direction"):  # a silent no-op before, as the CLI refuses
        runner.set_vectors([(only_25, 1.0)], layer_range=(8, 20))


def answer_with(runner, vec):
    runner.set_vectors([(vec, 1.0)])
    return answer(runner)


def test_wrong_width_is_refused_before_llama_cpp(runner, plain):
    wrong = random_vector(6, range(4, 10), n_embd=896)
    wrong.source = "qwen-vector.gguf"
    with pytest.raises(VectorFileError, match="qwen-vector.gguf.*896.*576"):
        runner.set_vectors([(wrong, 1.0)])
    too_deep = random_vector(7, [30])
    with pytest.raises(VectorFileError, match="30"):
        runner.set_vectors([(too_deep, 1.0)])
    assert answer(runner) == plain  # a refused vector leaves the model as it was


def test_bad_layer_range_is_an_error(runner):
    with pytest.raises(RsLocalError, match="outside"):
        runner.set_vectors([(random_vector(1, [5]), 1.0)], layer_range=(0, 40))


def test_logprobs_are_reported_and_consistent(runner):
    runner.clear_vectors()
    gen = runner.chat(PROMPT, max_tokens=8)
    assert len(gen.logprobs) == len(gen.tokens) == 8
    assert all(lp <= 0 for lp in gen.logprobs)
    first = runner.next_token_logprobs(PROMPT)
    assert np.isclose(np.exp(first).sum(), 1.0, atol=1e-6)
    assert int(np.argmax(first)) == gen.tokens[0]
    assert np.isclose(first[gen.tokens[0]], gen.logprobs[0], atol=1e-5)
    forced = runner.forced_logprobs(PROMPT, gen.tokens)
    assert forced.shape == (8, runner.n_vocab)
    assert np.allclose(forced[np.arange(8), gen.tokens], gen.logprobs, atol=1e-4)


def test_sampling_is_seeded(runner):
    from rs_local.runtime import SamplingParams

    runner.clear_vectors()
    a = runner.chat(PROMPT, max_tokens=12, sampling=SamplingParams(temperature=1.0, seed=7)).tokens
    b = runner.chat(PROMPT, max_tokens=12, sampling=SamplingParams(temperature=1.0, seed=7)).tokens
    c = runner.chat(PROMPT, max_tokens=12, sampling=SamplingParams(temperature=1.0, seed=8)).tokens
    assert a == b and a != c


def test_session_keeps_history_and_partial_replies(runner):
    session = ChatSession(runner, max_tokens=6)
    stream = session.reply("Say hello.")
    next(stream)
    stream.close()  # what Ctrl-C does to the reply
    assert session.history[0] == {"role": "user", "content": "Say hello."}
    assert session.history[1]["role"] == "assistant" and session.history[1]["content"]
    list(session.reply("And goodbye."))
    assert len(session.history) == 4
    session.reset()
    assert session.history == []


def test_a_vector_for_another_model_is_refused_at_scale_0_too(runner):
    """Taken while the scale was 0, a vector of the wrong width made every later /scale fail, and the
    failed /scale stayed set."""
    from rs_local.errors import RsLocalError

    session = ChatSession(runner, max_tokens=2)
    session.set_scale(0.0)
    other = ControlVector({3: np.ones(896, np.float32)}, "qwen2", source="/x/qwen.gguf")
    with pytest.raises(RsLocalError, match="qwen.gguf"):
        session.set_vectors([(other, 1.0)])
    assert session.vectors == []
    fits = ControlVector({3: np.ones(runner.n_embd, np.float32)}, "llama")
    session.set_vectors([(fits, 1.0)])
    session.layer_range = (20, 25)  # misses the vector's only block: llama.cpp is never asked
    with pytest.raises(RsLocalError):
        session.set_scale(1.0)
    assert session.scale == 0.0  # the failed change did not stick
    session.layer_range = None
    session.set_scale(1.0)
    runner.clear_vectors()


def test_llama_cpp_warnings_stay_off_the_terminal(runner, capfd):
    """A pooled batched context larger than SmolLM2's 8192 trained tokens makes llama.cpp warn
    "n_ctx_seq (16384) > n_ctx_train (8192)"; llama-cpp-python's filter, numbering ggml's levels the
    old way, let it through to the user's terminal (see runtime.loading.install_log_filter)."""
    from rs_local.runtime.batched import BatchEngine

    capfd.readouterr()
    with BatchEngine(runner, n_seq=16, seq_ctx=1024, kv_unified=True):
        pass
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_sampling_limits_fall_back_to_the_top_token():
    """Temperatures near the smallest float and top_p 0 pick the most likely token, never NaN
    probabilities (the server answered such a request with a 500)."""
    from rs_local.runtime.sampling import Sampler, SamplingParams

    logits = np.array([1.0, 3.0, 2.5, -np.inf, 0.0], dtype=np.float32)
    for params in (SamplingParams(temperature=5e-324, seed=0), SamplingParams(temperature=1e-310, seed=1),
                   SamplingParams(temperature=2.0, top_p=0.0, seed=2)):
        sampler = Sampler(params)
        picks = {sampler.pick(logits)[0] for _ in range(20)}
        assert picks == {1}, params
    spread = {Sampler(SamplingParams(temperature=2.0, seed=s)).pick(logits)[0] for s in range(40)}
    assert len(spread) > 1  # an ordinary temperature still samples


def test_a_context_that_is_not_a_multiple_of_256_holds_what_was_asked(smollm2_path):
    """llama.cpp rounds --ctx 128 up to 256, llama-cpp-python's token buffer stays at 128: a prompt and
    answer past 128 tokens overflowed it with a numpy traceback. The smaller size is the limit."""
    from rs_local.errors import RsLocalError
    from rs_local.runtime.runner import Runner

    small = Runner(smollm2_path, n_ctx=128)
    try:
        assert small.n_ctx == 128
        with pytest.raises(RsLocalError, match="the context holds 128"):
            small.generate("word " * 130, max_tokens=4)
        out = small.generate("word " * 90, max_tokens=64)  # the answer stops where the context ends
        assert out.prompt_tokens + len(out.tokens) < 128 and out.finish_reason == "length"
    finally:
        small.llama.close()


def test_degenerate_logits_are_an_error_naming_the_steering():
    """NaN or flat logits (an overflowed steering) used to give an empty answer and exit 0."""
    import numpy as np

    from rs_local.errors import RsLocalError
    from rs_local.runtime.runner import checked_logits
    from rs_local.vectors.control_vector import ControlVector

    fine = np.linspace(-3, 3, 100, dtype=np.float32)
    assert checked_logits(fine) is fine
    vec = ControlVector({4: np.ones(8, np.float32)}, "llama", source="/x/huge.gguf")
    for bad in (np.zeros(100, np.float32), np.full(100, np.nan, np.float32)):
        with pytest.raises(RsLocalError, match=r"degenerate .* under the steering huge.gguf at -1: its values are too large"):
            checked_logits(bad, [(vec, -1.0)])


def test_a_second_thread_and_use_after_close_are_one_line_errors(smollm2_path):
    """Two threads decoding on one context aborted the process in ggml; use after close segfaulted."""
    import threading

    runner = Runner(smollm2_path, n_ctx=512)
    ask = [{"role": "user", "content": "Count to ten."}]
    whole = runner.generate(ask, max_tokens=8).tokens
    stream = runner.stream(ask, max_tokens=8)
    picked: list[int] = []
    for _ in range(4):  # one stream advanced from one thread after another (a thread pool's way): fine
        worker = threading.Thread(target=lambda: picked.append(next(stream).token))
        worker.start()
        worker.join()
    assert picked == whole[:4]
    runner.generate("hi", max_tokens=2)  # another prompt between two of the stream's tokens
    with pytest.raises(RsLocalError, match="used for another prompt in the middle of this answer"):
        next(stream)
    runner._guard.acquire()  # a llama.cpp call in progress on this thread, as another thread sees it
    runner._owner = threading.get_ident()
    seen: list[BaseException] = []
    other = threading.Thread(target=lambda: _catch(seen, lambda: runner.generate("hi", max_tokens=2)))
    runner._guard.release()
    other.start()
    other.join()
    runner._owner = None
    assert len(seen) == 1 and "in use by another thread" in str(seen[0])
    assert runner.generate("hi", max_tokens=2).tokens  # usable again
    with runner:
        pass
    for call in (lambda: runner.generate("hi", max_tokens=2), lambda: runner.token_bytes(5), lambda: runner.is_end_token(5)):
        with pytest.raises(RsLocalError, match="this Runner is closed"):
            call()


def _catch(seen: list, call) -> None:
    try:
        call()
    except RsLocalError as exc:
        seen.append(exc)


def test_bad_library_arguments_are_one_line_errors(runner):
    """Each of these ended in numpy, ctypes or a llama.cpp abort (std::out_of_range) before."""
    from rs_local.runtime.sampling import SamplingParams

    msg = [{"role": "user", "content": "hi"}]
    cases = [
        (lambda: runner.chat("hello"), "chat takes a list of messages"),
        (lambda: runner.generate(None), "a prompt is a string or a list"),
        (lambda: runner.set_vectors([None]), "given as \\[\\(vector, scale\\), \\.\\.\\.\\]"),
        (lambda: runner.set_vectors([(random_vector(1, [5]), float("nan"))]), "must be finite"),
        (lambda: runner.set_vectors([(random_vector(1, [5]), 1.0)], layer_range="5-10"), "two whole numbers"),
        (lambda: runner.chat(msg, max_tokens=None), "max_tokens must be a whole number"),
        (lambda: runner.chat(msg, sampling=SamplingParams(temperature=float("nan"))), "temperature"),
        (lambda: runner.chat(msg, sampling=SamplingParams(seed=-1)), "seed"),
        (lambda: runner.token_bytes(10**9), "outside this model's vocabulary"),
        (lambda: runner.forced_logprobs(msg, [10**9, 5]), "outside this model's vocabulary"),
        (lambda: runner.prefill([]), "no tokens"),
        (lambda: list(runner.stream(msg, tokens=[])), "no tokens"),
    ]
    for call, message in cases:
        with pytest.raises(RsLocalError, match=message):
            call()
    assert runner.chat(msg, max_tokens=2).tokens  # nothing was left half-done
    # what library callers pass and worked before the checks: numpy ints, list pairs, generators
    assert runner.chat(msg, max_tokens=np.int64(2)).tokens
    runner.set_vectors([[random_vector(1, [5]), np.float32(0.5)]])
    assert runner.forced_logprobs(msg, (t for t in [5, 6])).shape == (2, runner.n_vocab)
    runner.clear_vectors()


def test_a_closed_batch_engine_is_an_error_not_a_segfault(runner):
    from rs_local.runtime.batched import BatchEngine

    engine = BatchEngine(runner, n_seq=2, seq_ctx=256)
    assert engine.generate_many(["hi"], max_tokens=2)[0].tokens
    engine.close()
    for call in (lambda: engine.generate_many(["hi"], max_tokens=2), lambda: engine.set_vectors([])):
        with pytest.raises(RsLocalError, match="this BatchEngine is closed"):
            call()


def test_a_long_prompt_stops_between_slices_when_its_caller_says(smollm2_path):
    """A server's client that left during an 8000-token prompt held the worker until it was evaluated."""
    from rs_local.errors import RsLocalError
    from rs_local.runtime.runner import PromptCancelled

    prompt = "count: " + " ".join(str(i) for i in range(300))  # ~1100 tokens: five slices of 256
    with Runner(smollm2_path, n_ctx=2048, n_batch=256) as runner:
        asked = []

        def leave_after_one_slice() -> bool:
            asked.append(True)
            return len(asked) > 1

        before = runner.counters.prompt_tokens
        with pytest.raises(PromptCancelled):
            list(runner.stream(prompt, max_tokens=4, cancelled=leave_after_one_slice))
        assert runner.counters.prompt_tokens - before == 256  # one slice, then it stopped
        assert issubclass(PromptCancelled, RsLocalError)
        reused = runner.counters.reused_tokens
        after = runner.generate(prompt, max_tokens=6).tokens  # the slice evaluated stays valid for reuse
        assert runner.counters.reused_tokens - reused == 256
    with Runner(smollm2_path, n_ctx=2048, n_batch=256) as fresh:
        assert fresh.generate(prompt, max_tokens=6).tokens == after


def test_a_load_that_fails_for_memory_says_so(smollm2_path, tmp_path):
    """Under `ulimit -v` llama.cpp says only "Failed to create llama_context"; the error now names the limit."""
    import resource
    import subprocess
    import sys

    from rs_local.runtime.loading import memory_hint

    assert "ulimit -v" in memory_hint(smollm2_path, limit=300 << 20)
    assert "of memory is free" in memory_hint(smollm2_path, limit=None, free=1 << 20)
    assert memory_hint(smollm2_path, limit=None, free=64 << 30) == ""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (400 << 20, 400 << 20))

    res = subprocess.run([sys.executable, "-m", "rs_local.cli.main", "generate", "--model", str(smollm2_path), "-n", "2",
                          "hi"], capture_output=True, text=True, timeout=120, preexec_fn=limit)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-800:]
    assert res.stderr.strip().startswith("Error:") and len(res.stderr.strip().splitlines()) == 1, res.stderr[-800:]


def test_an_answer_cut_inside_a_character_leaves_the_character_out(smollm2_path):
    """``-n 4`` that ended between an emoji's bytes stored "😀\ufffd" in respond's log and eval's answers:
    a character's first bytes are no character. Both the Runner and the batch engine drop them."""
    from rs_local.runtime.batched import BatchEngine

    runner = Runner(smollm2_path, n_ctx=256)
    messages = [{"role": "user", "content": "Reply with three emoji only: 😀🚀🌪"}]
    try:
        cut = 0
        engine = BatchEngine(runner)
        for n in range(1, 7):
            single = runner.generate(messages, max_tokens=n)
            raw = b"".join(runner.token_bytes(t) for t in single.tokens)
            whole = raw.decode("utf-8", errors="ignore")
            cut += whole.encode() != raw
            assert single.text == whole and "\ufffd" not in single.text, (n, single.text, raw)
            (batched,) = engine.generate_many([messages], max_tokens=n)
            assert batched.tokens == single.tokens and batched.text == single.text
        assert cut >= 2  # the budgets did end inside characters
        engine.close()
    finally:
        runner.close()
