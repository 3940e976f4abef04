"""The request-side tokenizer: text <-> ids, the chat template and the set of end-of-sequence ids.

Two backends behind one small surface, so that the rest of `jit_context` depends on neither:
- a folder with tokenizer.json whose tokenizer_config.json names transformers' generic fast tokenizer (the
  converted default model's, GGUF conversions', most recent checkpoints'): the `tokenizers` library set up as
  transformers would set it up (`jit_context.fast_tokenizer`), and chat templates rendered by
  `jit_context.chat_template`. No transformers import:
  that takes 1.4-2.4 s, at every start of a JIT context, against ~0.3 s for this whole load.
- anything else (a GGUF file, tokenizer classes whose Python code changes behaviour, folders without
  tokenizer.json): a transformers tokenizer, as loaded before.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Protocol

from ipc.errors import ModelLoadError
from jit_context.chat_template import check_chat_template, select_chat_template, tool_call_format
from jit_context.fast_tokenizer import FastBackend, Unsupported

__all__ = ["Tokenizer", "check_chat_template", "import_tokenizer_modules"]

# End-of-turn / end-of-text tokens that chat models emit instead of (or besides) their configured eos.
_EXTRA_EOS_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>")
_ROLES = ("system", "user", "assistant", "tool")
_MESSAGE_KEYS = ("role", "content", "tool_calls", "tool_call_id")

# tokenizer_config.json classes that are transformers' generic fast tokenizer (TokenizersBackend is its name since
# transformers 5): what the tokenizers library alone can load (`FastBackend`), and what AutoTokenizer would load.
_GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _read_config(folder: Path) -> dict | None:
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def import_tokenizer_modules() -> None:
    """Import what the first `Tokenizer.from_path` of a folder with the generic fast tokenizer (the converted
    default model's and most recent checkpoints') needs: tokenizers and jinja2, ~0.2 s on a small CPU. A process
    calls it while it waits for something else."""
    import jinja2.sandbox  # noqa: F401
    import tokenizers  # noqa: F401

    from jit_context.chat_template import _environment

    _environment()


class _Backend(Protocol):
    """What `Tokenizer` needs of a loaded tokenizer."""

    chat_template: str | dict[str, str] | None

    def __len__(self) -> int: ...
    def get_vocab(self) -> dict[str, int]: ...
    def eos_token_id(self) -> int | None: ...
    def encode(self, text: str) -> list[int]: ...
    def backend_json(self) -> str: ...
    def decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...
    def apply_chat_template(self, messages: list[dict], chat_template: str | None, add_generation_prompt: bool,
                            continue_final_message: bool, template_kwargs: dict) -> list[int]: ...
    def save(self, folder: Path) -> None: ...


class _HfBackend:
    """A transformers tokenizer (GGUF files, tokenizer classes with their own Python behaviour, folders without
    tokenizer.json)."""

    def __init__(self, hf_tokenizer) -> None:
        if not getattr(hf_tokenizer, "is_fast", False):
            raise ModelLoadError(f"a fast (tokenizers-backed) tokenizer is required, got {type(hf_tokenizer).__name__}")
        self._hf = hf_tokenizer

    @classmethod
    def load(cls, path: Path, generic: bool) -> _HfBackend:
        """`generic`: a folder whose tokenizer_config.json names transformers' generic fast class."""
        # Imported here: transformers takes seconds to import and only this loader needs it.
        if generic:
            from transformers import PreTrainedTokenizerFast

            return cls(PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True))
        from transformers import AutoTokenizer

        if path.is_file() and path.suffix == ".gguf":
            return cls(AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True))
        if path.is_dir():
            return cls(AutoTokenizer.from_pretrained(str(path), local_files_only=True))
        raise ModelLoadError(f"tokenizer path must be a folder or a .gguf file: {path}")

    @property
    def chat_template(self) -> str | dict[str, str] | None:
        return self._hf.chat_template

    def __len__(self) -> int:
        return len(self._hf)

    def get_vocab(self) -> dict[str, int]:
        return self._hf.get_vocab()

    def eos_token_id(self) -> int | None:
        return self._hf.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=True))

    def backend_json(self) -> str:
        # (a copy: transformers sets padding and truncation on its backend per call; the JSON must have neither)
        backend = copy.copy(self._hf.backend_tokenizer)
        backend.no_padding()
        backend.no_truncation()
        return backend.to_str()

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._hf.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    def apply_chat_template(self, messages: list[dict], chat_template: str | None, add_generation_prompt: bool,
                            continue_final_message: bool, template_kwargs: dict) -> list[int]:
        return list(self._hf.apply_chat_template(
            messages, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, tokenize=True, return_dict=False, **template_kwargs,
        ))

    def save(self, folder: Path) -> None:
        self._hf.save_pretrained(str(folder))


def _check_messages(messages: list[dict]) -> None:
    """Chat messages as OpenAI's chat API has them: a role and a string content; an assistant message may carry
    tool_calls (its content then may be None), a tool message the tool_call_id it answers."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict, got {type(m).__name__}")
        extra = sorted(str(k) for k in m if k not in _MESSAGE_KEYS)
        if extra:
            raise ValueError(f"messages[{i}] has unknown keys: {', '.join(extra)}")
        role = m.get("role")
        if role not in _ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(_ROLES)}, got {role!r}")
        calls = m.get("tool_calls")
        if calls is not None and (role != "assistant" or not isinstance(calls, list)
                                  or not all(isinstance(c, dict) for c in calls)):
            raise ValueError(f"messages[{i}].tool_calls must be a list of dicts, on an assistant message")
        if (role == "tool") != isinstance(m.get("tool_call_id"), str) or (role != "tool" and "tool_call_id" in m):
            raise ValueError(f"messages[{i}]: a message of role 'tool' needs the tool_call_id (a string) of the call "
                             f"it answers, and only a tool message has one")
        if not isinstance(m.get("content"), str) and not (calls and m.get("content") is None):
            raise ValueError(f"messages[{i}].content must be a string, got {type(m.get('content')).__name__}")


class Tokenizer:
    """Text <-> token ids for one model, with its chat template and end-of-sequence ids."""

    def __init__(self, backend: _Backend) -> None:
        self._backend = backend
        self.eos_token_ids: frozenset[int] = self._find_eos_ids()
        self._chat_template: str | None = None  # replaces the tokenizer's own (`use_chat_template`)

    @classmethod
    def from_path(cls, path: str | Path) -> Tokenizer:
        """Load from a folder of tokenizer files or a .gguf file; ModelLoadError if that fails."""
        path = Path(path)
        if not path.exists():
            raise ModelLoadError(f"tokenizer path does not exist: {path}")
        try:
            config = _read_config(path) if path.is_dir() else None
            generic = config is not None and config.get("tokenizer_class") in _GENERIC_CLASSES
            if generic and (path / "tokenizer.json").is_file():
                try:
                    return cls(FastBackend(path, config))
                except Unsupported:
                    pass
                except ModelLoadError:
                    raise
                except Exception:  # noqa: BLE001 - a config it misreads: transformers' load says what is wrong
                    pass
            return cls(_HfBackend.load(path, generic))
        except ModelLoadError:
            raise
        except Exception as e:  # transformers raises OSError, ValueError, KeyError... depending on the file
            raise ModelLoadError(f"could not load a tokenizer from {path}: {type(e).__name__}: {e}") from e

    def _find_eos_ids(self) -> frozenset[int]:
        # Membership in the vocab, not a token -> id lookup: that returns the unk id for unknown tokens.
        vocab = self._backend.get_vocab()
        ids = {vocab[t] for t in _EXTRA_EOS_TOKENS if t in vocab}
        eos = self._backend.eos_token_id()
        if eos is not None:
            ids.add(eos)
        return frozenset(ids)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows (added tokens included); the model's lm_head may be padded wider."""
        return len(self._backend)

    @property
    def has_chat_template(self) -> bool:
        return bool(self._chat_template or self._backend.chat_template)

    @property
    def tool_call_format(self) -> str | None:
        """How the chat template teaches the model to call a tool (`chat_template.tool_call_format`), or None."""
        own = self._chat_template or self._backend.chat_template
        try:  # (the template a conversation with tools renders: a tokenizer's "tool_use" one where it has it)
            return tool_call_format(select_chat_template(own, None, tools=True)) if own else None
        except ValueError:  # several templates, none the default
            return None

    def use_chat_template(self, template: str) -> None:
        """Format chat messages with `template` (Jinja, as in HF tokenizer configs) instead of the tokenizer's
        own; ValueError if it does not compile."""
        check_chat_template(template)
        self._chat_template = template

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids; BOS is added only where the tokenizer's own post-processor is set to add it."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a string, got {type(text).__name__}")
        return self._backend.encode(text)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            continue_final_message: bool = False, template_kwargs: dict | None = None,
                            tools: list[dict] | None = None) -> list[int]:
        """Chat messages -> prompt ids, by default ending with the assistant turn's opening; with
        `continue_final_message`, ending inside the last (assistant) message instead, so that a reply continues it.
        `template_kwargs`: extra variables for the template (ipc.messages.ChatOptions checks their names); `tools`:
        the tools the template describes to the model (OpenAI's `tools` entries; its `tools` variable, as
        transformers passes them)."""
        _check_messages(messages)
        if not self.has_chat_template:
            raise ValueError("this tokenizer has no chat template; send a plain prompt instead")
        if continue_final_message and messages[-1]["role"] != "assistant":
            raise ValueError("continue_final_message needs the last message to be the assistant's (the reply "
                             "continues it)")
        try:
            return self._backend.apply_chat_template(messages, self._chat_template, add_generation_prompt,
                                                     continue_final_message,
                                                     {**(template_kwargs or {}), **({"tools": tools} if tools else {})})
        except ValueError:
            raise
        except Exception as e:  # jinja2 errors raised by the template itself (raise_exception, undefined names)
            raise ValueError(f"the chat template failed: {type(e).__name__}: {e}") from None

    def backend_json(self) -> str:
        """The tokenizers library's JSON of this tokenizer, added tokens included (what llguidance reads:
        jit_context.grammar_mask)."""
        return self._backend.backend_json()

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        # No space clean-up: it rewrites " ." across token boundaries, so streamed pieces would
        # stop adding up to the full decode.
        return self._backend.decode(list(ids), skip_special_tokens)

    def warm_up(self) -> None:
        """Encode, decode and render the chat template once: the first render compiles the Jinja template (~5-13 ms
        on our machines), which would otherwise land in the first chat request's TTFT. A template that fails on
        this sample conversation fails the same way for a real one, and says so there."""
        ids = self.encode("Hello, world.")
        self.decode(ids)
        if self.has_chat_template:
            try:
                self.apply_chat_template([{"role": "user", "content": "Hello, world."}])
            except ValueError:
                pass

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and the chat template into folder."""
        self._backend.save(Path(folder))
