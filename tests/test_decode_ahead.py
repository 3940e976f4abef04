"""Generator(decode_ahead=): the plain decode loop keeps that many steps queued past the token the host waits for.
The tokens, the stop and the finish reason must not depend on it; the steps sent are exactly those the loop's
contract allows (the stop token's own decode plus decode_ahead - 1 more, none past max_tokens). In-process on the
CPU (the GPU's default, 2, runs through the cuda tests of the served paths)."""

from __future__ import annotations

import itertools

import pytest
import torch

from jit_context.generator import (
    AUTO,
    DECODE_AHEAD_SHORT,
    SHORT_STEP_MS,
    GenerationResult,
    Generator,
    ahead_for,
    default_decode_ahead,
)
from jit_context.sampling_params import SamplingParams
from tests.test_robustness import tiny_runner


class RecordingPort:
    """The real runner, with the decode steps it is sent recorded: (position, argmax, own_input) each (also used by
    tests/test_speculative.py and tests/test_executor_argmax.py)."""

    def __init__(self, runner) -> None:
        self.runner, self.sent = runner, []

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def decode(self, position: int, argmax: bool = False, own_input: bool = False) -> None:
        self.sent.append((position, argmax, own_input))
        self.runner.decode(position, argmax, own_input)

    @property
    def decodes(self) -> int:
        return len(self.sent)


PROMPT = torch.randint(3, 300, (9,), generator=torch.Generator().manual_seed(11)).tolist()


def run(port, ahead: int | None, params: SamplingParams, eos: frozenset[int] = frozenset({2}),
        prompt: list[int] = PROMPT) -> GenerationResult:
    """The request's result; also checks that every token was sampled once (no extra draws at the end)."""
    gen = Generator(port, None, eos, decode_ahead=ahead)
    draws = []
    sample = gen.sampler.sample
    gen.sampler.sample = lambda *a, **k: draws.append(1) or sample(*a, **k)
    items = list(gen.generate(prompt, params))
    assert all(not isinstance(i, GenerationResult) for i in items[:-1])
    result = items[-1]
    assert len(draws) >= len(result.token_ids)
    if result.finish_reason == "length":
        assert len(draws) == len(result.token_ids)
    return result


@pytest.fixture(scope="module")
def runner():
    return tiny_runner()


def test_the_tokens_and_steps_do_not_depend_on_how_far_ahead(runner) -> None:
    params = SamplingParams(max_tokens=17, temperature=0.0, ignore_eos=True)
    port = RecordingPort(runner)
    reference = run(port, 1, params)
    assert len(reference.token_ids) == 17 and port.decodes == 16 and reference.finish_reason == "length"
    for ahead in (2, 3):
        port.sent.clear()
        got = run(port, ahead, params)
        assert got.token_ids == reference.token_ids and got.finish_reason == "length"
        assert port.decodes == 16  # none past max_tokens
        assert len(got.token_times_ms) == 17


def test_a_stop_token_ends_the_output_at_once_and_discards_only_the_steps_in_flight(runner) -> None:
    free = run(runner, 1, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)).token_ids
    # every first occurrence of a token as the stop: the first token, the middle, and the last ones (where the loop
    # drains what it still holds: max_tokens 2 past the stop puts it among the last ones read)
    for stop_at in [i for i in range(24) if free[i] not in free[:i]]:
        for ahead, max_tokens in itertools.product((1, 2, 3), (24, stop_at + 2)):
            port = RecordingPort(runner)
            got = run(port, ahead, SamplingParams(max_tokens=max_tokens, temperature=0.0),
                      eos=frozenset({free[stop_at]}))
            assert got.token_ids == free[:stop_at + 1] and got.finish_reason == "stop", (stop_at, ahead)
            # the stop token's own decode was sent before the host read it, and ahead - 1 more, none past max_tokens
            sent = 1 if stop_at == 0 else min(stop_at + ahead, max_tokens - 1)
            assert port.decodes == sent, (stop_at, ahead, max_tokens)


def test_short_replies_and_a_full_context(runner) -> None:
    for ahead in (1, 2, 3):
        for max_tokens in (1, 2):
            port = RecordingPort(runner)
            got = run(port, ahead, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
            assert len(got.token_ids) == max_tokens and port.decodes == max_tokens - 1
        # a prompt 3 positions short of the context: its reply ends there
        prompt = (PROMPT * 11)[:runner.max_context - 3]
        got = run(RecordingPort(runner), ahead, SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True),
                  prompt=prompt)
        assert len(got.token_ids) == 3 and got.finish_reason == "length"


def test_the_first_token_is_read_before_any_step_past_its_own_decode(runner) -> None:
    port = RecordingPort(runner)
    stream = Generator(port, None, frozenset({2}), decode_ahead=3).generate(
        PROMPT, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    next(stream)  # the first token's chunk (TTFT): only the decode that consumes it is queued
    assert port.decodes == 1
    list(stream)


def test_the_default_is_one_on_the_cpu_auto_on_a_gpu_and_bad_values_are_refused(runner) -> None:
    assert Generator(runner, None, frozenset({2})).decode_ahead == 1 == default_decode_ahead(torch.device("cpu"))
    assert default_decode_ahead(torch.device("cuda")) == AUTO
    for bad in (0, 4, -1, "2", 1.5):
        with pytest.raises(ValueError, match="decode_ahead"):
            Generator(runner, None, frozenset({2}), decode_ahead=bad)


def test_auto_keeps_two_ahead_only_while_the_steps_are_short(runner) -> None:
    """AUTO: 2 once the token period (a moving average of the plain steps' token gaps) is under SHORT_STEP_MS, 1
    before it is known and above it; the tokens do not depend on it."""
    assert ahead_for(None) == 1 and ahead_for(SHORT_STEP_MS) == 1 and ahead_for(3.7) == 1
    assert ahead_for(0.4) == DECODE_AHEAD_SHORT == 2
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    reference = run(runner, 1, params)
    port = RecordingPort(runner)
    gen = Generator(port, None, frozenset({2}), decode_ahead=AUTO)
    assert gen.step_ms is None and gen.ahead() == 1
    got = list(gen.generate(PROMPT, params))[-1]
    assert got.token_ids == reference.token_ids and port.decodes == 19
    assert gen.step_ms is not None and gen.step_ms > 0 and gen.ahead() == ahead_for(gen.step_ms)
    # a short period known (as on a GPU with a small model): at a stop two steps are in flight, not one
    stop = reference.token_ids[1]
    assert stop not in reference.token_ids[:1]
    for step_ms, sent in ((0.3, 3), (5.0, 2)):
        port.sent.clear()
        gen = Generator(port, None, frozenset({stop}), decode_ahead=AUTO)
        gen.step_ms = step_ms
        got = list(gen.generate(PROMPT, SamplingParams(max_tokens=20, temperature=0.0)))[-1]
        assert got.token_ids == reference.token_ids[:2] and port.decodes == sent, step_ms
