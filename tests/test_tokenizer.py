"""Tokenizer wrapper: loading (GGUF and folder), chat template vs transformers, eos ids, errors."""

from __future__ import annotations

import json

import pytest

from ipc.errors import HybridrtError, ModelLoadError
from jit_context.tokenizer import Tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? 日本"},
]


@pytest.fixture(scope="module")
def tok(gguf_tokenizer) -> Tokenizer:
    """Loaded from the GGUF file (conftest: one load per session, shared with test_detokenizer.py)."""
    return gguf_tokenizer


@pytest.fixture(scope="module")
def hf_reference(default_model_dir):
    """transformers' own tokenizer for the default model, from the converted folder that servers load it from (a
    second load from the GGUF would go through the same transformers code as `tok`, for seconds more)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir))


@pytest.mark.parametrize("messages", [CONVERSATION, [{"role": "user", "content": "hi"}]], ids=["multi", "one"])
def test_chat_template_matches_transformers(tok, hf_reference, messages):
    expected = hf_reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok.apply_chat_template(messages)
    assert ids == hf_reference.encode(expected, add_special_tokens=False)
    assert ids == list(hf_reference.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
    assert tok.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "non-empty"),
        ({"role": "user", "content": "hi"}, "list"),
        (["hi"], r"messages\[0\]"),
        ([{"role": "tool", "content": "x"}], "role"),
        ([{"content": "x"}], "role"),
        ([{"role": "user", "content": None}], "content"),
        ([{"role": "user", "content": [{"type": "text", "text": "x"}]}], "content"),
        ([{"role": "user", "content": "x", "name": "bob"}], "name"),
    ],
)
def test_bad_messages_rejected(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)


def test_converted_folder_gives_the_gguf_tokenizer(tok, default_model_dir):
    """The default model's converted folder (tokenizer written and read as the generic fast class, without
    AutoTokenizer's lookups) tokenizes as AutoTokenizer's load of the GGUF does."""
    folder = Tokenizer.from_path(default_model_dir)
    texts = ["Hello world", "  leading spaces, tabs\tand\nnewlines", "Ünïcödé — emoji 🙂 and 中文",
             "<|im_start|>user\nhi<|im_end|>", "numbers 1234567890 and code: def f(x): return x**2"]
    for text in texts:
        assert folder.encode(text) == tok.encode(text), text
        assert folder.decode(tok.encode(text), skip_special_tokens=False) == tok.decode(tok.encode(text), False)
    assert folder.apply_chat_template(CONVERSATION) == tok.apply_chat_template(CONVERSATION)
    assert (folder.vocab_size, folder.eos_token_ids) == (tok.vocab_size, tok.eos_token_ids)


def test_encode_decode_vocab_and_eos(tok):
    ids = tok.encode("Hello world")
    assert 1 not in ids  # SmolLM2 (add_bos_token false) puts no <|im_start|> BOS on plain text
    assert tok.decode(ids) == "Hello world"
    assert tok.vocab_size == 49152
    assert tok.eos_token_ids == frozenset({2, 0})  # <|im_end|> (configured eos) and <|endoftext|>
    assert tok.has_chat_template
    with pytest.raises(ValueError, match="text"):
        tok.encode(["Hello"])


def test_save_round_trip_and_missing_chat_template(tok, tmp_path):
    tok.save(tmp_path)
    reloaded = Tokenizer.from_path(tmp_path)
    assert reloaded.apply_chat_template(CONVERSATION) == tok.apply_chat_template(CONVERSATION)
    assert reloaded.eos_token_ids == tok.eos_token_ids
    # Strip the template both where transformers 5 writes it and where older versions did.
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    bare = Tokenizer.from_path(tmp_path)
    assert not bare.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])


def test_load_errors_are_model_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        Tokenizer.from_path(tmp_path / "missing")
    with pytest.raises(ModelLoadError):
        Tokenizer.from_path(tmp_path)  # an empty folder
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"\0" * 64)
    with pytest.raises(ModelLoadError, match="gguf"):
        Tokenizer.from_path(not_gguf)
    corrupt = tmp_path / "model.gguf"
    corrupt.write_bytes(b"GGUF" + b"\xff" * 60)
    with pytest.raises(HybridrtError):
        Tokenizer.from_path(corrupt)


PLAIN_TEMPLATE = ("{%- for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                  "{% if add_generation_prompt %}[assistant]{% endif %}")


def test_chat_template_override(tok, tmp_path) -> None:
    """--chat-template: the given template formats the messages instead of the tokenizer's own."""
    tok.save(tmp_path)  # its own instance (from a folder: fast): the override must not leak into other tests
    tok = Tokenizer.from_path(tmp_path)
    own = tok.apply_chat_template(CONVERSATION)
    tok.use_chat_template(PLAIN_TEMPLATE)
    rendered = "".join(f"[{m['role']}] {m['content']}\n" for m in CONVERSATION) + "[assistant]"
    assert tok.apply_chat_template(CONVERSATION) == tok.encode(rendered) != own
    with pytest.raises(ValueError, match="does not compile"):
        tok.use_chat_template("{% for %}")
    assert tok.apply_chat_template(CONVERSATION) == tok.encode(rendered)  # a bad one leaves the last good one


def test_chat_template_kwargs_and_continue_final_message(tok) -> None:
    """Template variables reach the template; continue_final_message leaves the last (assistant) message open."""
    from jit_context.tokenizer import Tokenizer

    own = Tokenizer(tok._tok)  # the shared instance stays as it is
    own.use_chat_template("{{ flavour | default('plain') }}:{% for m in messages %}[{{ m.role }}] {{ m.content }}"
                          "{% if not loop.last or add_generation_prompt %}<|im_end|>{% endif %}{% endfor %}")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello th"}]
    assert own.decode(own.apply_chat_template(messages[:1], template_kwargs={"flavour": "SPICY"}),
                      skip_special_tokens=False).startswith("SPICY:")
    assert own.decode(own.apply_chat_template(messages[:1]), skip_special_tokens=False).startswith("plain:")
    opened = tok.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    closed = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert tok.decode(opened, skip_special_tokens=False).endswith("Hello th")
    assert len(opened) < len(closed) and closed[:len(opened)] == opened
    with pytest.raises(ValueError, match="assistant"):
        tok.apply_chat_template(messages[:1], add_generation_prompt=False, continue_final_message=True)
