"""A tokenizer folder loaded with the `tokenizers` library alone, set up exactly as transformers would set it up
(`FastBackend`), so that a JIT context starts without importing transformers (1.4-2.4 s against ~0.3 s for this
whole load). `jit_context.tokenizer` picks it for folders whose tokenizer_config.json names transformers' generic
fast tokenizer and falls back to transformers where it raises `Unsupported`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ipc.errors import ModelLoadError
from jit_context.chat_template import compile_chat_template, render_chat, select_chat_template

# transformers' named special tokens, in its order (which decides the ids of any it has to add).
_SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Model types whose tokenizer.json transformers may patch (a Mistral pre-tokenizer regex) when loading.
_MISTRAL_TYPES = ("mistral", "mistral3", "voxtral", "ministral", "pixtral")


class Unsupported(Exception):
    """The folder needs something `_FastBackend` does not mirror: transformers loads it instead."""


class FastBackend:
    """tokenizer.json through the tokenizers library, set up as transformers 5's
    `PreTrainedTokenizerFast.from_pretrained(folder)` sets it up (`PreTrainedTokenizerBase.from_pretrained` and
    `_from_pretrained`, `PreTrainedTokenizerBase.__init__`, `TokenizersBackend.__init__`; Apache-2.0, (c) The
    HuggingFace Team): the same special and added tokens added in the same order (their ids and flags), the same
    post-processor, no truncation or padding (its encode turns them off). What it does not mirror (legacy
    special_tokens_map.json / added_tokens.json, alternative tokenizer files, Mistral regex patching, invalid
    settings that make transformers fail) raises `Unsupported`; tests/test_tokenizer.py compares the two."""

    def __init__(self, folder: Path, config: dict) -> None:
        from tokenizers import AddedToken, processors
        from tokenizers import Tokenizer as RustTokenizer

        self._folder = folder
        if "fast_tokenizer_files" in config or "fix_mistral_regex" in config:
            raise Unsupported("another tokenizer file, or a patched pre-tokenizer")
        try:
            tok = RustTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for unreadable or malformed files
            raise ModelLoadError(f"could not load a tokenizer from {folder}: tokenizer.json: {e}") from None

        # from_pretrained / _from_pretrained: the config as __init__'s keyword arguments.
        kw = dict(config)
        for key in ("tokenizer_class", "init_inputs", "add_bos_token", "add_eos_token"):
            kw.pop(key, None)  # add_bos/eos_token: with a tokenizer.json, its post-processor decides
        templates: dict[str, str] = {}
        if (folder / "chat_template.jinja").is_file():
            templates["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        extra_dir = folder / "additional_chat_templates"
        if extra_dir.is_dir():
            for file in extra_dir.glob("*.jinja"):
                templates[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
        if len(templates) == 1 and "default" in templates:
            kw["chat_template"] = templates["default"]  # files win over the config's template
        elif templates:
            kw["chat_template"] = templates
        if "additional_special_tokens" in kw and not kw.get("extra_special_tokens"):
            kw["extra_special_tokens"] = kw.pop("additional_special_tokens")
        model_specific = {key: kw.pop(key) for key in list(kw)
                          if key not in _SPECIAL_ATTRS and key.endswith("_token") and isinstance(kw[key], str)}
        if isinstance(kw.get("extra_special_tokens"), dict):
            model_specific.update(kw.pop("extra_special_tokens"))
        if model_specific:
            kw["model_specific_special_tokens"] = model_specific

        added_decoder: dict[int, AddedToken] = {}
        added_map: dict[str, AddedToken] = {}
        if "added_tokens_decoder" in kw:
            for index, token in kw["added_tokens_decoder"].items():
                token = AddedToken(**token) if isinstance(token, dict) else token
                if not isinstance(token, AddedToken):
                    raise Unsupported("an added token that is not a dict")
                added_decoder[int(index)] = token
                added_map[str(token)] = token
        else:
            if (folder / "special_tokens_map.json").is_file() or (folder / "added_tokens.json").is_file():
                raise Unsupported("legacy special-token files")
            # tokenizer.json's added tokens, as the library read them (parsing the file again in Python: ~0.1 s).
            for index, token in tok.get_added_tokens_decoder().items():
                added_decoder[index] = token
                added_map[str(token)] = token
        kw["added_tokens_decoder"] = added_decoder
        kw = _convert_added_tokens(kw, AddedToken)
        for key in _SPECIAL_ATTRS:
            if key in kw and added_map and kw[key] is not None:
                kw[key] = added_map.get(str(kw[key]), kw[key])

        # TokenizersBackend.__init__, up to the base class's.
        padding = tok.padding
        if padding is not None:
            kw.setdefault("pad_token", padding["pad_token"])
        should_update_post_processor = tok.post_processor is None
        # PreTrainedTokenizerBase.__init__: named, extra and model-specific special tokens.
        if "additional_special_tokens" in kw and "extra_special_tokens" not in kw:
            kw["extra_special_tokens"] = kw.pop("additional_special_tokens")
        attrs = list(_SPECIAL_ATTRS)
        special: dict[str, object] = dict.fromkeys(attrs)
        extra: list = []
        explicit = kw.pop("model_specific_special_tokens", None) or {}
        if not isinstance(explicit, dict):
            raise Unsupported("model_specific_special_tokens is not a dict")
        auto: dict[str, object] = {}

        def set_model_specific(tokens: dict) -> None:
            attrs.extend(tokens)
            for name, value in tokens.items():
                if not isinstance(value, (str, AddedToken)):
                    raise Unsupported(f"special token {name} is neither a string nor an added token")
                special[name] = value

        for key in list(kw):
            if key in attrs:
                value = kw.pop(key)
                if value is None:
                    continue
                if not isinstance(value, (str, AddedToken)):
                    raise Unsupported(f"special token {key} is neither a string nor an added token")
                special[key] = value
            elif key == "extra_special_tokens":
                value = kw.pop(key)
                if isinstance(value, dict):
                    set_model_specific(value)
                elif isinstance(value, (list, tuple)):
                    extra = list(value)
                elif value is not None:
                    raise Unsupported("extra_special_tokens is neither a list nor a dict")
            elif key.endswith("_token") and key not in attrs and isinstance(kw[key], (str, AddedToken)):
                auto[key] = kw.pop(key)
        if {**auto, **explicit}:
            set_model_specific({**auto, **explicit})
        control_tokens = kw.get("chat_control_tokens")
        if kw.get("padding_side", "right") not in ("right", "left") or \
                kw.get("truncation_side", "right") not in ("right", "left") or \
                (control_tokens is not None and not isinstance(control_tokens, (list, tuple))):
            raise Unsupported("a setting transformers rejects")
        split_special_tokens = kw.pop("split_special_tokens", False)
        chat_template = kw.pop("chat_template", None)
        if isinstance(chat_template, (list, tuple)):
            chat_template = {t["name"]: t["template"] for t in chat_template}

        # The rest of TokenizersBackend.__init__: tokens to add, then the post-processor.
        tok.encode_special_tokens = split_special_tokens
        # All of added_tokens_decoder, whether the tokenizer has them or not: transformers compares tokens with
        # hashes of the (integer) keys of its own added-token map, which never match.
        to_add = [token for _, token in sorted(added_decoder.items(), key=lambda item: item[0])]
        known = [t.content for _, t in sorted(tok.get_added_tokens_decoder().items(), key=lambda item: item[0])]
        known += [str(t) for t in to_add]
        for value in [*special.values(), *extra]:
            if value is not None and str(value) not in known and value not in to_add:
                to_add.append(value)
        if to_add:
            named = [str(t) for t in special.values() if t]
            tokens = []
            for token in to_add:
                if isinstance(token, str):
                    token = AddedToken(token, special=True)
                elif isinstance(token, AddedToken) and not token.special and str(token) in named:
                    token.special = True
                tokens.append(token)
            tok.add_tokens(tokens)
        if tok.get_vocab_size() > 100000 and tok.pre_tokenizer is not None and _may_patch_mistral_regex(folder):
            raise Unsupported("a Mistral tokenizer transformers may patch")
        if should_update_post_processor or tok.post_processor is None:
            # add_bos_token / add_eos_token are dropped with a tokenizer.json: neither is added.
            tok.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
        # What every transformers encode does first (truncation and padding are per-call arguments there).
        tok.no_truncation()
        tok.no_padding()

        self._tok = tok
        self.chat_template: str | dict[str, str] | None = chat_template
        self._special_tokens_map = {a: str(special[a]) for a in attrs if special.get(a) is not None}
        # The template's first compile (~50 ms with jinja2's import) in the load, which the JIT context runs while
        # the executor loads the model, not in the warm-up after it. A template that fails says so when rendered.
        default = chat_template.get("default") if isinstance(chat_template, dict) else chat_template
        if isinstance(default, str):
            try:
                compile_chat_template(default)
            except Exception:  # noqa: BLE001
                pass

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def eos_token_id(self) -> int | None:
        eos = self._special_tokens_map.get("eos_token")
        if eos is None:
            return None
        index = self._tok.token_to_id(eos)
        unk = self._special_tokens_map.get("unk_token")
        return index if index is not None or unk is None else self._tok.token_to_id(unk)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True).ids

    def backend_json(self) -> str:
        return self._tok.to_str()

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], chat_template: str | None, add_generation_prompt: bool,
                            continue_final_message: bool, template_kwargs: dict) -> list[int]:
        template = select_chat_template(self.chat_template, chat_template, tools=bool(template_kwargs.get("tools")))
        text = render_chat(template, messages, add_generation_prompt, continue_final_message,
                           {**self._special_tokens_map, **template_kwargs})  # the caller's variables win
        return self._tok.encode(text, add_special_tokens=False).ids

    def save(self, folder: Path) -> None:
        # The files it was loaded from: the saved folder then loads as this one did, on either path.
        folder.mkdir(parents=True, exist_ok=True)
        names = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
        extra_dir = self._folder / "additional_chat_templates"
        if extra_dir.is_dir():
            names += [f"additional_chat_templates/{f.name}" for f in extra_dir.glob("*.jinja")]
        else:
            shutil.rmtree(folder / "additional_chat_templates", ignore_errors=True)
        for name in names:
            source, target = self._folder / name, folder / name
            if not source.is_file():
                target.unlink(missing_ok=True)  # a stale template there would replace the config's
            elif not (target.exists() and target.samefile(source)):
                target.parent.mkdir(exist_ok=True)
                shutil.copyfile(source, target)


def _convert_added_tokens(obj, added_token_class):
    """transformers' `convert_added_tokens(obj, save=False)`: {"__type": "AddedToken", ...} dicts, wherever they
    are, become AddedTokens."""
    if isinstance(obj, dict) and obj.get("__type") == "AddedToken":
        return added_token_class(**{k: v for k, v in obj.items() if k != "__type"})
    if isinstance(obj, (list, tuple)):
        return [_convert_added_tokens(o, added_token_class) for o in obj]
    if isinstance(obj, dict):
        return {k: _convert_added_tokens(v, added_token_class) for k, v in obj.items()}
    return obj


def _may_patch_mistral_regex(folder: Path) -> bool:
    """Whether transformers' `_patch_mistral_regex` might act on this folder (a config.json from before
    transformers 5 of a Mistral model type, or with none): then transformers decides."""
    config_file = folder / "config.json"
    if not config_file.exists():
        return False
    from packaging import version

    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        saved_by = config.get("transformers_version")
        if saved_by and version.parse(saved_by) >= version.parse("5.0.0"):
            return False
        return config.get("model_type") is None or config.get("model_type") in _MISTRAL_TYPES
    except (OSError, ValueError, AttributeError, TypeError):  # transformers would fail reading it
        return True
