"""The real default model (SmolLM2-135M-Instruct GGUF) against transformers' own load of the same GGUF: our greedy
ids are transformers' greedy choice at every step, and equal its `generate`, token for token."""

from __future__ import annotations

import pytest
import torch
import transformers

from graph_executor.loading.default_model import gguf_path
from jit_context.sampling_params import SamplingParams
from launch.local import PromptInput

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def engine(cpu_engine):
    """The default model in this process, float32 (conftest: one per session, shared with test_runtime.py)."""
    return cpu_engine


@pytest.fixture(scope="module")
def hf_model():
    """transformers' own GGUF reader and weight mapping. It parses the file twice and builds gguf's tensor-name map
    once per module (~400 times): ~30 s on 2 cores. While it loads, two gguf helpers that it imports at call time
    are swapped for equivalents that compute the same: the reader over a plain ndarray view of its memory map (as
    our loader uses it) and the name map memoized: ~12 s."""
    import functools

    import gguf

    from graph_executor.loading.gguf_loader import reader_class

    path = gguf_path()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", reader_class())
        patch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def test_greedy_ids_equal_transformers_generate(engine, hf_model) -> None:
    """Each of our ids is the argmax of transformers' logits for the prompt and our ids before it (one forward
    pass over the whole sequence per prompt: that is greedy decoding, checked at every step); for the first
    prompt transformers' `generate` gives the same ids too."""
    # ignore_eos, so that ours makes exactly NEW_TOKENS (eos_token_id=None for transformers' generate).
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        ids = engine.prompt_ids(PromptInput(prompt=prompt))
        *_, result = engine.generator.generate(ids, params)
        assert result.finish_reason == "length" and result.prompt_tokens == len(ids)
        assert len(result.token_ids) == NEW_TOKENS
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids + result.token_ids[:-1]])).logits[0]  # [len(ids) + N - 1, V]
        assert logits[len(ids) - 1:].argmax(-1).tolist() == result.token_ids, f"prompt {prompt!r}"
        if i == 0:
            with torch.no_grad():
                # An explicit mask: <|im_end|> (id 2) is also SmolLM2's pad id, and transformers would
                # otherwise infer a mask that hides every <|im_end|> of the chat template.
                ref = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                        max_new_tokens=NEW_TOKENS, do_sample=False,
                                        pad_token_id=2, eos_token_id=None)[0, len(ids):].tolist()
            assert result.token_ids == ref, f"prompt {prompt!r}"


def test_answer_is_correct_and_stops_at_eos(engine) -> None:
    ids = engine.prompt_ids(PromptInput(prompt=PROMPTS[0]))
    chunks = list(engine.generator.generate(ids, SamplingParams(max_tokens=64, temperature=0.0)))
    result = chunks[-1]
    assert "Paris" in result.text
    assert result.finish_reason == "stop" and result.token_ids[-1] in engine.tokenizer.eos_token_ids
    assert "".join(c.text for c in chunks[:-1]) == result.text
    assert result.ttft_ms > 0 and result.tokens_per_s > 0
