"""Structured output (`SamplingParams.structured`): the form and its wire dict, the sampler's mask against a float64
reference of the allowed argmax, and the batch-1 and batched generators over a model with SmolLM2's vocabulary
against a teacher-forced replay of the same grammar: every token the one the grammar allows and the logits pick."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from graph_executor.runner import ModelRunner
from jit_context.grammar_mask import Constraint, Grammars, mask_words
from jit_context.sampler import Sampler
from jit_context.sampling_params import SamplingParams
from jit_context.structured_output import MAX_SPEC_CHARS, StructuredOutput
from jit_context.tokenizer import Tokenizer
from tests.test_batching import _drain

VOCAB = 49152  # SmolLM2's
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["answer", "count", "name"],
          "properties": {"answer": {"enum": ["yes", "no"]}, "count": {"type": "integer", "minimum": 0, "maximum": 9},
                         "name": {"type": "string", "maxLength": 12}}}
# forms whose every match is short: a reply of random logits ends within a few dozen tokens
SHORT = {"json": StructuredOutput(json=json.dumps(SCHEMA)), "choice": StructuredOutput(choice=("red", "green", "blue")),
         "regex": StructuredOutput(regex=r"[a-z]{2,5}@(ab|cd)\.(com|org)"),
         "grammar": StructuredOutput(grammar='root ::= "(" [0-9] ("+" [0-9]){0,3} ")"')}


@pytest.fixture(scope="module")
def tokenizer(request) -> Tokenizer:
    """SmolLM2's: $HYBRIDRT_TEST_TOKENIZER (GPU machines without the default model package), else the converted
    default model's."""
    return Tokenizer.from_path(os.environ.get("HYBRIDRT_TEST_TOKENIZER")
                               or request.getfixturevalue("default_model_dir"))


@pytest.fixture(scope="module")
def grammars(tokenizer) -> Grammars:
    return Grammars(tokenizer.backend_json, VOCAB, tokenizer.eos_token_ids)


def matches(spec: StructuredOutput, text: str) -> bool:
    """Whether text is a whole match of spec (by Python's own reading of each form)."""
    if spec.choice:
        return text in spec.choice
    if spec.regex is not None:
        return re.fullmatch(spec.regex, text) is not None
    if spec.grammar is not None:
        return re.fullmatch(r"\([0-9](\+[0-9]){0,3}\)", text) is not None
    value = json.loads(text)
    if spec.json_object:
        return isinstance(value, dict)
    return (set(value) == {"answer", "count", "name"} and value["answer"] in ("yes", "no")
            and isinstance(value["count"], int) and 0 <= value["count"] <= 9 and len(value["name"]) <= 12)


def allowed(grammars: Grammars, spec: StructuredOutput, reply: list[int]) -> list[torch.Tensor]:
    """The allowed tokens before each token of reply ([V] bool each), from a matcher of our own that consumes reply
    (llguidance's, built here: not a copy of the one `grammars` keeps)."""
    from llguidance import LLMatcher

    constraint = Constraint(LLMatcher(grammars.tokenizer, spec.checked_grammar(grammars.tokenizer), log_level=0),
                            VOCAB, pin=False)
    masks = []
    for token in reply:
        masks.append(bits(constraint))
        constraint.advance(token)
    return masks


def bits(constraint: Constraint) -> torch.Tensor:
    """constraint's mask as [V] bool, read in Python (bit t % 32 of word t // 32)."""
    words = constraint.words.tolist()
    return torch.tensor([bool(words[t // 32] >> (t % 32) & 1) for t in range(VOCAB)])


# -- the form ---------------------------------------------------------------------------------------------------------

def test_the_wire_form_round_trips_and_bad_forms_name_the_problem() -> None:
    for spec in SHORT.values():
        params = SamplingParams(structured=spec)
        assert SamplingParams.from_dict(json.loads(json.dumps(params.to_dict()))) == params
    # a schema may come as an object, choice as a list (kept as JSON text and a tuple)
    assert StructuredOutput.from_dict({"json": SCHEMA}) == StructuredOutput(json=json.dumps(SCHEMA))
    assert StructuredOutput.from_dict({"choice": ["a", "b"], "regex": None}).choice == ("a", "b")
    assert SamplingParams().to_dict()["structured"] is None
    bad = {"exactly one": {}, "exactly one of json": {"regex": "a", "choice": ["b"]},
           "unknown structured output keys": {"schema": {}}, "must be a JSON schema": {"json": "{x"},
           "non-empty strings": {"choice": ["a", ""]}, "a non-empty string": {"regex": ""},
           "must be a bool": {"json_object": "yes"}, "more than": {"grammar": "x" * (MAX_SPEC_CHARS + 1)}}
    for message, wire in bad.items():
        with pytest.raises(ValueError, match=message):
            SamplingParams.from_dict({"structured": wire})
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=2, structured=SHORT["regex"])
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(ignore_eos=True, structured=SHORT["regex"])
    deep: dict = {}
    inner = deep
    for _ in range(5000):
        inner["a"] = inner = {}
    for wire in ({"json": deep}, {"json": "[" * 5000}, {"json": "true"}):  # RecursionError or not an object: a 400
        with pytest.raises(ValueError, match="must be a JSON schema"):
            StructuredOutput.from_dict(wire)


def test_llguidance_s_checks_name_what_is_wrong_on_one_line(grammars) -> None:
    """Without a tokenizer (the launcher's check), then against the vocabulary (the JIT context's, at arrival): a
    special token the vocabulary lacks, a token range past it."""
    nested = '{"type": "object", "properties": {"a": ' + '{"type": "array", "items": ' * 300 + "{}" + "}" * 302
    for spec, message in [(StructuredOutput(regex="(unclosed"), "unclosed group"),
                          (StructuredOutput(grammar="start: foo"), "unknown name"),
                          (StructuredOutput(json='{"type": "bogus"}'), "bogus"),
                          (StructuredOutput(json=nested), "recursion limit"),
                          (StructuredOutput(grammar='x ::= "y"'), "root")]:
        with pytest.raises(ValueError, match=message) as error:
            spec.checked_grammar()
        assert "\n" not in str(error.value) and str(error.value).startswith(f"structured output {spec.form}: ")
    for spec in SHORT.values():
        spec.checked_grammar()
        grammars.check(spec)
    for grammar, message in [("start: <|nope|>", "unknown special token"), ("start: <[99999]>", "too large")]:
        StructuredOutput(grammar=grammar).checked_grammar()  # (no vocabulary: it passes)
        with pytest.raises(ValueError, match=message) as error:
            grammars.check(StructuredOutput(grammar=grammar))
        assert "\n" not in str(error.value)


# -- the sampler ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", sorted(SHORT))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_draw_is_an_allowed_token_and_greedy_the_allowed_argmax(grammars, tokenizer, form: str,
                                                                      temperature: float) -> None:
    """Random logits [V]: each draw obeys the mask (a matcher of our own, float64 argmax over what it allows for
    greedy); the reply ends with EOS and is a whole match."""
    spec = SHORT[form]
    sampler = Sampler(VOCAB, torch.device("cpu"))
    sampler.start_request(SamplingParams(temperature=temperature, seed=4, structured=spec), [1, 2],
                          constraint=grammars.constraint(spec, pin=False))
    assert sampler.constrained and not sampler.plain_greedy
    gen = torch.Generator().manual_seed(7)
    logits, reply = [], []
    for _ in range(48):
        logits.append(torch.randn(VOCAB, generator=gen) * 4)
        reply.append(int(sampler.sample(logits[-1])))
        if reply[-1] in tokenizer.eos_token_ids:
            break
        sampler.accept(reply[-1])
    assert reply[-1] in tokenizer.eos_token_ids, tokenizer.decode(reply)
    assert matches(spec, tokenizer.decode(reply[:-1])), tokenizer.decode(reply)
    for step, (mask, token) in enumerate(zip(allowed(grammars, spec, reply), reply, strict=True)):
        assert mask[token], step
        if temperature == 0.0:
            assert token == int(torch.where(mask, logits[step].double(), -torch.inf).argmax()), step


def test_a_kept_form_s_matchers_are_independent_copies_and_the_cache_is_bounded(tokenizer) -> None:
    """Requests with one form get copies of one pristine matcher: a copy moved on leaves the next copy at the
    start, every copy's masks are a fresh matcher's, and only the last CACHED forms are kept."""
    from jit_context import grammar_mask

    kept = Grammars(tokenizer.backend_json, VOCAB, tokenizer.eos_token_ids)
    spec = SHORT["json"]
    reply = tokenizer.encode('{"answer":"no","count":3,"name":"Al"}')  # (SmolLM2 adds no BOS)
    first = kept.constraint(spec, pin=False)
    start = first.words.clone()
    for token in reply[:5]:
        first.advance(token)
    assert not torch.equal(first.words, start)
    second = kept.constraint(spec, pin=False)
    assert kept.cached == 1 and torch.equal(second.words, start)
    fresh = allowed(kept, spec, reply)
    for step, token in enumerate(reply):
        assert torch.equal(bits(second), fresh[step])
        second.advance(token)
    assert second.accepting
    others = [StructuredOutput(choice=(f"c{n}",)) for n in range(grammar_mask.CACHED)]
    for n, other in enumerate(others):
        kept.constraint(other, pin=False)
        if n == 0:
            kept.constraint(spec, pin=False)  # used again: now newer than others[0]
    assert kept.cached == grammar_mask.CACHED  # spec's entry stayed (used recently), others[0]'s went first
    assert kept.kept(spec) and not kept.kept(others[0]) and all(kept.kept(o) for o in others[1:])
    assert torch.equal(kept.constraint(others[0], pin=False).words, kept.constraint(others[0], pin=False).words)
    assert kept.kept(others[0]) and not kept.kept(spec)  # built again, dropping the least recently used


def test_the_mask_reads_every_word_s_bits() -> None:
    """The sampler's unpacking of llguidance's words (bit t % 32 of word t // 32) against a Python reading, on
    random words over a vocabulary that is not a multiple of 32 (the last word's high bits are past it)."""

    class Words:
        def __init__(self, words: torch.Tensor) -> None:
            self.words = words

    vocab = 1000
    words = torch.randint(-2**31, 2**31 - 1, (mask_words(vocab),), dtype=torch.int32,
                          generator=torch.Generator().manual_seed(1))
    sampler = Sampler(vocab, torch.device("cpu"))
    sampler._mask_words = torch.zeros_like(words)
    sampler._constraint = Words(words)
    sampler._upload_mask()
    got = sampler._allowed()
    want = [bool(int(words[t // 32]) >> (t % 32) & 1) for t in range(vocab)]
    assert got.tolist() == want


# -- the generators ---------------------------------------------------------------------------------------------------

def smol_vocab_runner(slots: int = 1, device: str = "cpu"):
    """A 2-layer Llama with SmolLM2's vocabulary, random weights (its replies are the grammar's doing)."""
    from graph_executor.loading.config import ModelConfig
    from graph_executor.loading.loader import _fill_random
    from graph_executor.model import LlamaModel
    from graph_executor.runner import ModelRunner

    cfg = ModelConfig("llama", VOCAB, 64, 128, 2, 4, 2, 16, 256, eos_token_ids=(2,))
    model = LlamaModel(cfg, 128, torch.device(device), torch.float32, slots=slots)
    _fill_random(model, seed=3)
    return ModelRunner(model)


def replay_greedy(grammars, spec: StructuredOutput, prompt: list[int], reply: list[int], device: str = "cpu") -> None:
    """Each token of a greedy reply is the argmax of the model's logits at its step (teacher-forced) over what the
    grammar allows there."""
    from tests.test_quant_model import run_steps

    logits, _ = run_steps(smol_vocab_runner(device=device), prompt, reply[:-1], len(reply) - 1)
    for step, (mask, token) in enumerate(zip(allowed(grammars, spec, reply), reply, strict=True)):
        assert token == int(torch.where(mask, logits[step].cpu().double(), -torch.inf).argmax()), step


@pytest.mark.parametrize("form", ["json", "regex"])
def test_the_generator_s_reply_is_the_grammar_s_greedy_reply_of_the_model(grammars, tokenizer, form: str) -> None:
    """decode_ahead 2: the host would read token k only after step k + 1 is queued; a structured request reads each
    token before the next draw (its mask), so every draw has its own step's mask. The reply is a whole match that
    ends with EOS, and equals the teacher-forced replay."""
    from jit_context.generator import Generator

    spec, prompt = SHORT[form], tokenizer.encode("Answer in JSON:")
    gen = Generator(smol_vocab_runner(), tokenizer, tokenizer.eos_token_ids, decode_ahead=2, grammars=grammars)
    result = list(gen.generate(prompt, SamplingParams(max_tokens=48, temperature=0.0, structured=spec)))[-1]
    assert result.finish_reason == "stop" and result.token_ids[-1] in tokenizer.eos_token_ids
    assert matches(spec, result.text), result.text
    replay_greedy(grammars, spec, prompt, result.token_ids)
    # the same generator, the same prompt without the grammar: the model's own (unconstrained) reply differs
    free = list(gen.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0)))[-1]
    assert free.token_ids != result.token_ids[:len(free.token_ids)]


@pytest.mark.cuda
@pytest.mark.parametrize("form", ["json", "grammar"])
def test_on_a_gpu_each_draw_takes_its_own_mask(grammars, tokenizer, form: str) -> None:
    """On a GPU the mask goes up from pinned memory on the sampling stream, and decode_ahead 3 would leave two steps
    queued while the host reads a token: each draw must still obey its own step's mask (the greedy replay of the
    same model on the card), and a sampled reply must be a whole match."""
    from jit_context.generator import Generator

    spec, prompt = SHORT[form], tokenizer.encode("Answer:")
    gen = Generator(smol_vocab_runner(device="cuda"), tokenizer, tokenizer.eos_token_ids, decode_ahead=3,
                    grammars=grammars)
    greedy = list(gen.generate(prompt, SamplingParams(max_tokens=48, temperature=0.0, structured=spec)))[-1]
    assert greedy.finish_reason == "stop" and matches(spec, greedy.text), greedy.text
    replay_greedy(grammars, spec, prompt, greedy.token_ids, device="cuda")
    sampled = list(gen.generate(prompt, SamplingParams(max_tokens=48, temperature=1.0, seed=3, structured=spec)))[-1]
    assert sampled.finish_reason == "stop" and matches(spec, sampled.text), sampled.text


def test_without_a_tokenizer_structured_output_is_refused() -> None:
    from jit_context.generator import Generator

    gen = Generator(smol_vocab_runner(), None, frozenset({2}))
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        list(gen.generate([5, 6], SamplingParams(max_tokens=4, structured=SHORT["choice"])))


def test_speculation_is_off_for_a_structured_request(grammars, tokenizer) -> None:
    from jit_context.generator import Generator
    from jit_context.speculative_config import SpeculativeConfig

    spec, prompt = SHORT["grammar"], tokenizer.encode("Sum:")
    params = SamplingParams(max_tokens=24, temperature=0.0, structured=spec)
    speculating = Generator(smol_vocab_runner(), tokenizer, tokenizer.eos_token_ids, grammars=grammars,
                            speculation=SpeculativeConfig("ngram", 3))
    result = list(speculating.generate(prompt, params))[-1]
    assert result.speculation is None and matches(spec, result.text), result.text
    replay_greedy(grammars, spec, prompt, result.token_ids)


def test_a_matcher_failing_mid_reply_ends_its_lane_alone(tokenizer) -> None:
    """A grammar too ambiguous for llguidance's limits fails some tokens in (here a row limit of 40 items, met at
    the 19th "a"): in the batch engine that request ends with its own RequestFailed, one line, its slot freed, and
    the plain request beside it gets the tokens it gets alone; in the batch-1 loop the request's generation raises
    the same ValueError (the server's Error for that request)."""
    from jit_context.batch import BatchEngine, RequestFailed
    from jit_context.generator import Generator

    tight = Grammars(tokenizer.backend_json, VOCAB, tokenizer.eos_token_ids, limits={"max_items_in_row": 40})
    ambiguous = SamplingParams(max_tokens=40, temperature=0.0,
                               structured=StructuredOutput(grammar='start: s\ns: s s | "a"'))
    plain = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    engine = BatchEngine(smol_vocab_runner(slots=2), tokenizer, tokenizer.eos_token_ids, 4, grammars=tight)
    ends, log = _drain(engine, [("grammar", tokenizer.encode("a"), ambiguous),
                                ("plain", tokenizer.encode("Hi"), plain)])
    ends.update((key, item) for step in log for key, item in step if isinstance(item, RequestFailed))
    assert isinstance(ends["grammar"], RequestFailed) and "max is 40" in ends["grammar"].message
    assert "\n" not in ends["grammar"].message and engine.running == 0
    alone = Generator(smol_vocab_runner(), tokenizer, tokenizer.eos_token_ids, grammars=tight)
    assert ends["plain"].token_ids == list(alone.generate(tokenizer.encode("Hi"), plain))[-1].token_ids
    with pytest.raises(ValueError, match="max is 40"):
        list(alone.generate(tokenizer.encode("a"), ambiguous))


def test_batched_structured_requests_give_what_they_give_alone(grammars, tokenizer) -> None:
    """Three slots: a JSON reply, a sampled regex reply and a plain one side by side, each as alone (the lanes'
    tokens are read, and the matchers moved on, before the steps sent ahead are drawn)."""
    from jit_context.batch import BatchEngine
    from jit_context.generator import Generator

    requests = {
        "json": (tokenizer.encode("JSON:"), SamplingParams(max_tokens=40, temperature=0.0, structured=SHORT["json"])),
        "regex": (tokenizer.encode("Mail:"), SamplingParams(max_tokens=40, temperature=0.9, seed=2,
                                                           structured=SHORT["regex"])),
        "plain": (tokenizer.encode("Hi"), SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)),
    }
    engine = BatchEngine(smol_vocab_runner(slots=3), tokenizer, tokenizer.eos_token_ids, 4, grammars=grammars)
    results, _ = _drain(engine, [(key, prompt, params) for key, (prompt, params) in requests.items()])
    alone = Generator(smol_vocab_runner(), tokenizer, tokenizer.eos_token_ids, grammars=grammars)
    for key, (prompt, params) in requests.items():
        assert results[key].token_ids == list(alone.generate(prompt, params))[-1].token_ids, key
    for key in ("json", "regex"):
        assert matches(SHORT[key], results[key].text), results[key].text


def test_a_batching_server_refuses_a_bad_grammar_alone_and_serves_the_rest(default_model_dir, tokenizer) -> None:
    """The JIT context's serving loop (in process, over the real executor on a thread, as test_jit_server's rig)
    with two slots: a grammar naming a special token the vocabulary lacks is an invalid_request Error at arrival (one
    line), while a JSON reply and a plain one run side by side and each equals its in-process generation. With a
    Hermes-style --chat-template, its status names that tool-call format (what serve's --tool-call-parser auto
    takes) and a TokenizeRequest with tools counts the prompt the template writes with them (/tokenize's)."""
    from graph_executor.loading.loader import LoadedModel, _fill_random
    from graph_executor.model import LlamaModel
    from ipc.messages import Error, Finished, TokenizeReply, TokenizeRequest
    from jit_context.generator import Generator
    from tests.test_jit_server import TINY, Rig
    from tests.test_tokenizer import HERMES_TOOLS_TEMPLATE

    model = LlamaModel(TINY, 64, torch.device("cpu"), torch.float32, slots=2)
    _fill_random(model, seed=0)
    rig = Rig(LoadedModel(model, "tiny", "dummy", default_model_dir, 0.0, False),
              jit_args=("--chat-template", HERMES_TOOLS_TEMPLATE))
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    chat = [{"role": "user", "content": "Weather in Paris?"}]
    try:
        assert rig.jit.engine is not None and rig.jit.status()["tool_call_format"] == "hermes"
        peer = rig.peer()
        peer.send(TokenizeRequest("plain-count", messages=chat))
        peer.send(TokenizeRequest("tools-count", messages=chat, tools=tools))
        json_params = {"max_tokens": 40, "temperature": 0.0, "structured": {"json": SCHEMA}}
        plain_params = {"max_tokens": 12, "temperature": 0.0, "ignore_eos": True}
        peer.generate("json", [5, 6, 7], params=json_params)
        peer.generate("bad", [5, 6], params={"max_tokens": 5, "structured": {"grammar": "start: <|nope|>"}})
        peer.generate("plain", [900, 901], params=plain_params)
        rig.until(lambda: all(peer.final(r) is not None for r in ("json", "bad", "plain")))
        bad = peer.final("bad")
        assert isinstance(bad, Error) and bad.code == "invalid_request" and "unknown special token" in bad.message
        assert "\n" not in bad.message
        served = {r: peer.final(r) for r in ("json", "plain")}
        assert all(isinstance(f, Finished) for f in served.values()), served
        assert matches(SHORT["json"], served["json"].text), served["json"].text
        counts = {r.request_id: r.token_ids for r in peer.inbox if isinstance(r, TokenizeReply)}
    finally:
        rig.close()
    templated = Tokenizer(tokenizer._backend)
    templated.use_chat_template(HERMES_TOOLS_TEMPLATE)
    assert counts["tools-count"] == templated.apply_chat_template(chat, tools=tools)
    assert counts["plain-count"] == templated.apply_chat_template(chat)
    assert len(counts["plain-count"]) < len(counts["tools-count"])
    alone = Generator(ModelRunner(model), tokenizer, frozenset(TINY.eos_token_ids) | tokenizer.eos_token_ids,
                      grammars=Grammars(tokenizer.backend_json, VOCAB, tokenizer.eos_token_ids))
    for key, prompt, params in (("json", [5, 6, 7], json_params), ("plain", [900, 901], plain_params)):
        assert served[key].token_ids == list(alone.generate(prompt, SamplingParams.from_dict(params)))[-1].token_ids


def test_the_vocabulary_built_in_the_background_is_the_one_requests_use(tokenizer) -> None:
    """Grammars.prepare_in_background (a GPU server's start): the view is built once, on its thread; a request's
    constraint then uses it (no second build), and its masks are those of a view built on first use."""
    early = Grammars(tokenizer.backend_json, VOCAB, tokenizer.eos_token_ids)
    assert not early.prepared
    early.prepare_in_background().join(timeout=60)
    assert early.prepared
    built = early.tokenizer
    lazy = Grammars(tokenizer.backend_json, VOCAB, tokenizer.eos_token_ids)
    spec = SHORT["regex"]
    assert torch.equal(early.constraint(spec, pin=False).words, lazy.constraint(spec, pin=False).words)
    assert early.tokenizer is built and lazy.prepared
