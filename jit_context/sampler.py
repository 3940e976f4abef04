"""Next-token sampling with per-request parameters held in device tensors.

Every request runs the same sequence of device ops: the parameters (temperature, top-k, top-p,
min-p, repetition penalty, greedy flag) live in tensors written once by `start_request`, and
`sample` never reads a tensor value on the host (no `.item()`, no branching on values). That keeps
the step free of host syncs: the ops run eagerly on the JIT context's stream (dynamic, per-request work,
not captured), ordered after the executor's step by an IPC event, and only the token's asynchronous copy
reaches the host.

Order (as vLLM): logit bias, repetition penalty (tokens of the prompt and the reply), frequency and presence
penalties (tokens of the reply), temperature, top-k, top-p on the top-k-renormalised distribution, min-p, then one
draw. Each of the first three costs nothing unless the request asks for it (a host-known flag). The kept set is
built on a full sort of the vocabulary: simple and exact; a partial sort / radix select can replace it once it
shows in profiles.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable

import torch

from jit_context.grammar_mask import Constraint, mask_words
from jit_context.sampling_params import SamplingParams

LOGPROB_FLOOR = -9999.0
# Exponential(1) noise can round to 0 in float32; 0 would turn a masked token's 0/0 into NaN,
# which argmax treats as the maximum.
_MIN_NOISE = 1e-20


class Sampler:
    """Picks one token per step from a [V] logits vector; owns the per-request device state."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        f32 = {"dtype": torch.float32, "device": self.device}
        # Per-request parameters, [1] each so they broadcast against [V] without host reads.
        self._greedy = torch.ones(1, dtype=torch.bool, device=self.device)
        self._temperature = torch.ones(1, **f32)
        self._top_k = torch.full((1,), vocab_size, dtype=torch.int64, device=self.device)
        self._top_p = torch.ones(1, **f32)
        self._min_p = torch.zeros(1, **f32)
        self._repetition_penalty = torch.ones(1, **f32)
        self._presence_penalty = torch.zeros(1, **f32)
        self._frequency_penalty = torch.zeros(1, **f32)
        self._seen = torch.zeros(vocab_size, dtype=torch.bool, device=self.device)  # [V]
        self._counts = torch.zeros(vocab_size, **f32)  # [V]: occurrences in the reply (presence / frequency)
        self._one = torch.ones(1, **f32)  # [1]: what observe adds to a token's count
        self._bias = torch.zeros(vocab_size, **f32)  # [V]: the request's logit bias, 0 elsewhere
        self._banned = torch.zeros(vocab_size, dtype=torch.bool, device=self.device)  # [V]: while _ban_left > 0
        self._ban_left = 0  # host count of the draws that may not pick a banned token (min_tokens)
        self._ranks = torch.arange(vocab_size, device=self.device)  # [V] int64, sorted positions
        self._noise = torch.empty(vocab_size, **f32)  # [V]
        self._generator = torch.Generator(device=self.device)
        # the greedy token in one short kernel on a GPU (graph_executor/kernels/argmax.py, the executor's too);
        # torch's argmax on the CPU, where Triton is not imported (a CPU install need not have it; CUDA builds of
        # torch bring it)
        self._argmax = None
        if self.device.type == "cuda":
            from graph_executor.kernels.argmax import Argmax

            self._argmax = Argmax(self.device)
        self._all_greedy = True  # host copy of the request's greedy flag (set from params, never read back)
        self._penalize = False  # host copy: does the request use a repetition penalty?
        self._counting = False  # host copy: a presence or frequency penalty?
        self._biased = False  # host copy: a logit bias?
        self.logprobs_k: int | None = None  # host copy of params.logprobs: None, or how many top tokens to list
        # [1 + 2k] float32: the drawn token's log-probability, the top k's, then their ids (exact in float32 below
        # 2^24), written by each draw of a request that asks for them (`last_logprobs`)
        self.last_logprobs = torch.zeros(1, **f32)
        self.seed: int | None = None  # the seed in use, drawn at random when the request gave none
        self._constraint: Constraint | None = None  # the request's structured output (start_request)
        self._mask_words: torch.Tensor | None = None  # [W] int32: its next draw's mask, on the device
        self._bit_shifts = torch.arange(32, dtype=torch.int32, device=self.device)  # [32]

    def start_request(self, params: SamplingParams, prompt_ids: list[int], end_ids: Iterable[int] = (),
                      constraint: Constraint | None = None) -> None:
        """Write this request's parameters into the device tensors and mark the prompt tokens as seen. `end_ids`:
        the tokens that end a reply (EOS, stop_token_ids), which the first params.min_tokens draws may not pick.
        `constraint`: the request's structured output (params.structured), whose mask each draw obeys; the host
        moves it on with `accept` after reading each token, before the next draw is queued."""
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt_ids must be in [0, {self.vocab_size}), got {bad[:4]}")
        params.check_vocabulary(self.vocab_size)
        if (constraint is None) != (params.structured is None):
            raise ValueError("start_request: a constraint goes with params.structured, and only with it")
        self._constraint = constraint
        if constraint is not None:
            if self._mask_words is None:  # [W] int32 on the device, made at the first such request
                self._mask_words = torch.zeros(mask_words(self.vocab_size), dtype=torch.int32, device=self.device)
            self._upload_mask()
        banned = sorted({t for t in end_ids if 0 <= t < self.vocab_size}) if params.min_tokens else []
        self._ban_left = params.min_tokens if banned else 0
        if banned:
            self._banned.zero_()
            self._banned[torch.tensor(banned, dtype=torch.int64)] = True
        # fill_ with a Python scalar enqueues a kernel; it does not wait for the device.
        self._greedy.fill_(params.greedy)
        self._all_greedy = params.greedy
        self._penalize = params.repetition_penalty != 1.0
        # Greedy still runs the sampled branch (its result is discarded): temperature 1 keeps it finite.
        self._temperature.fill_(1.0 if params.greedy else params.temperature)
        self._top_k.fill_(self.vocab_size if params.top_k == 0 else min(params.top_k, self.vocab_size))
        self._top_p.fill_(params.top_p)
        self._min_p.fill_(params.min_p)
        self._repetition_penalty.fill_(params.repetition_penalty)
        self._counting = params.counts_tokens
        if self._counting:  # counts of the reply's tokens, none yet
            self._presence_penalty.fill_(params.presence_penalty)
            self._frequency_penalty.fill_(params.frequency_penalty)
            self._counts.zero_()
        self.logprobs_k = None if params.logprobs is None else min(params.logprobs, self.vocab_size)
        if self.logprobs_k is not None and self.last_logprobs.numel() != 1 + 2 * self.logprobs_k:
            self.last_logprobs = torch.zeros(1 + 2 * self.logprobs_k, dtype=torch.float32, device=self.device)
        self._biased = bool(params.logit_bias)
        if self._biased:
            ids, biases = zip(*params.logit_bias, strict=True)
            self._bias.zero_()
            # both on the device: index_put_ moves only a 0-dim CPU value to a CUDA tensor's device
            self._bias[torch.tensor(ids, dtype=torch.int64, device=self.device)] = \
                torch.tensor(biases, dtype=torch.float32, device=self.device)
        if self._penalize:  # only the penalty reads the marks: no copy up (and no wait on it) for the rest
            self._seen.zero_()
            if prompt_ids:
                ids = torch.tensor(prompt_ids, dtype=torch.int64).to(self.device, non_blocking=True)
                self._seen.index_fill_(0, ids, True)
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self._generator.manual_seed(self.seed)

    def end_request(self) -> None:
        """The request ended: let its matcher go (a large grammar's may hold much host memory)."""
        self._constraint = None

    def accept(self, token_id: int) -> None:
        """The host read the drawn token token_id: with a constraint, move its matcher past it and queue its next
        mask's copy up (the next draw is queued after this). Nothing without one."""
        if self._constraint is not None:
            self._constraint.advance(token_id)
            self._upload_mask()

    @property
    def constrained(self) -> bool:
        """Whether the request's draws obey a structured output's mask (the host must `accept` each token before
        the next draw is queued)."""
        return self._constraint is not None

    def _upload_mask(self) -> None:
        # Pinned host words on a GPU: an asynchronous copy on the stream, ordered before the draw that reads it. The
        # host writes them again only after reading the token of that draw, so the copy has run by then.
        self._mask_words.copy_(self._constraint.words, non_blocking=True)

    def _allowed(self) -> torch.Tensor:
        """[V] bool: the tokens the constraint's mask allows (bit t % 32 of word t // 32)."""
        bits = (self._mask_words.view(-1, 1) >> self._bit_shifts) & 1  # [W, 32] int32
        return bits.view(-1)[:self.vocab_size].bool()

    def observe(self, token: torch.Tensor) -> None:
        """Mark a generated token ([1] int64, on the device) as seen for the repetition penalty and count it for the
        presence and frequency penalties (only a request with one reads them: nothing is queued without)."""
        if self._penalize:
            self._seen.index_fill_(0, token.view(-1), True)
        if self._counting:
            self._counts.index_add_(0, token.view(-1), self._one)

    def sample(self, logits: torch.Tensor, out: torch.Tensor | None = None,
               host: torch.Tensor | None = None) -> torch.Tensor:
        """Pick the next token from logits [V] (any float dtype); returns [1] int64 on the same device. `host` (with
        `out`, on a GPU): a [1] int64 pinned host tensor (`TokenReader.next_host`) that receives the token too, from
        the greedy kernel itself where it runs (no copy on the stream after it), else by an asynchronous copy."""
        if host is not None and out is None:
            raise ValueError("sample: host needs out")
        if logits.shape != (self.vocab_size,):
            raise ValueError(f"logits must have shape ({self.vocab_size},), got {tuple(logits.shape)}")
        raw = logits.float()  # [V] f32, before any bias, penalty or temperature (vLLM's raw logprobs)
        token = self._pick(raw, out, host)
        if self.logprobs_k is not None:
            self._record_logprobs(raw, token)
        return token

    def _pick(self, x: torch.Tensor, out: torch.Tensor | None, host: torch.Tensor | None) -> torch.Tensor:
        """The token drawn from raw logits x [V] float32 (left as they are: each step below makes a new tensor)."""
        if self._constraint is not None:  # first, as vLLM applies its grammar's bitmask
            x = x.masked_fill(~self._allowed(), float("-inf"))
        if self._biased:
            x = x + self._bias
        if self._penalize:  # host-known per request: no penalty, no three passes over the vocabulary
            x = self._apply_repetition_penalty(x)
        if self._counting:
            x = self._apply_counts(x, self._counts)
        if self._ban_left > 0:  # min_tokens not reached: the reply can't end here
            self._ban_left -= 1
            x = x.masked_fill(self._banned, float("-inf"))
        if self._all_greedy and out is not None:  # one kernel: the next step waits on this one only
            if self._argmax is not None and x.is_contiguous() and out.dtype == torch.int64:
                return self._argmax(x, out.view(1), host)
            return _mirror(torch.argmax(x, dim=0, keepdim=True, out=out), host)
        greedy_token = torch.argmax(x).view(1)  # [1]
        if self._all_greedy:
            # A host-known flag of the request, not a tensor value: greedy requests skip the sort (about
            # 4.6 ms per token on the CPU at V=49152).
            token = greedy_token
        else:
            sampled_token = self._draw(x / self._temperature)  # [1]
            token = torch.where(self._greedy, greedy_token, sampled_token)  # [1] int64
        if out is None:
            return token
        return _mirror(out.copy_(token), host)

    def _record_logprobs(self, raw: torch.Tensor, token: torch.Tensor) -> None:
        """last_logprobs <- [log p(token), the top k log-probabilities, their ids] of raw [V] (device work only)."""
        # [V]; a token the model rules out (-inf logit) reads -9999, as vLLM reports it: JSON has no infinities
        lp = torch.log_softmax(raw, dim=-1).nan_to_num_(nan=LOGPROB_FLOOR, neginf=LOGPROB_FLOOR)
        k = self.logprobs_k
        self.last_logprobs[:1].copy_(lp.gather(0, token.view(1)))
        if k:
            values, ids = torch.topk(lp, k)  # [k] each, most likely first
            self.last_logprobs[1:1 + k].copy_(values)
            self.last_logprobs[1 + k:].copy_(ids)

    @property
    def plain(self) -> bool:
        """Whether the draw is the argmax of the raw logits and nothing else is asked of it: no penalty, no bias,
        no log-probabilities, no structured output (greedy aside)."""
        return not (self._penalize or self._counting or self._biased or self.logprobs_k is not None
                    or self._constraint is not None)

    def _apply_repetition_penalty(self, x: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., V] with the penalty on the tokens `seen` marks (default: the prompt's and the reply's so far)."""
        # HF/vLLM rule: dividing a negative logit would raise it, so negatives are multiplied.
        penalised = torch.where(x > 0, x / self._repetition_penalty, x * self._repetition_penalty)
        return torch.where(self._seen if seen is None else seen, penalised, x)

    def _apply_counts(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [..., V] less frequency x counts and presence where a count is positive (OpenAI's and vLLM's rule)."""
        return x - self._frequency_penalty * counts - self._presence_penalty * (counts > 0)

    def _draw(self, x: torch.Tensor) -> torch.Tensor:
        probs, order = torch.softmax(x, dim=-1).sort(descending=True)  # [V], [V] (rank -> token id)
        keep = self._kept(probs)  # [V] bool, in rank order
        # Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) is a draw from p (normalisation not needed).
        noise = self._noise.exponential_(generator=self._generator).clamp_min_(_MIN_NOISE)
        rank = torch.argmax(torch.where(keep, probs, 0.0) / noise)  # [] int64
        return order[rank].view(1)  # [1]

    def _kept(self, probs: torch.Tensor) -> torch.Tensor:
        """probs [..., V] sorted descending -> [..., V] bool: the tokens top-k, top-p and min-p all keep."""
        keep = self._ranks < self._top_k
        topk_probs = torch.where(keep, probs, 0.0)
        topk_probs = topk_probs / topk_probs.sum(-1, keepdim=True)
        # Smallest prefix whose mass reaches top_p: keep a token if the mass ranked before it is short.
        # top_p = 1 is "off": rounding in the cumulative sum must not drop the tail.
        mass_before = torch.cumsum(topk_probs, dim=-1) - topk_probs
        keep = keep & ((mass_before < self._top_p) | (self._top_p >= 1.0))
        keep &= probs >= self._min_p * probs[..., :1]
        keep[..., 0] = True  # the top token always survives (also covers ties and rounding)
        return keep

    # -- the target distribution of several rows at once (speculative verification) ----------------------

    @property
    def greedy(self) -> bool:
        """The request's greedy flag, as the host knows it."""
        return self._all_greedy

    @property
    def plain_greedy(self) -> bool:
        """Greedy without a penalty or a logit bias: the token is the argmax of the raw logits, which the executor
        can take itself (a verify step's acceptance, `Verify.accept`; speculation waits until min_tokens,
        `banning`)."""
        return self._all_greedy and self.plain

    @property
    def banning(self) -> bool:
        """Whether the next draw still may not end the reply (min_tokens): only `sample` applies that."""
        return self._ban_left > 0

    @property
    def generator(self) -> torch.Generator:
        """The request's random stream (seeded by start_request): acceptance draws from it too."""
        return self._generator

    def penalized_rows(self, logits: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
        """logits [R, V] of consecutive positions, proposals [R - 1] int64 (the tokens between them) -> [R, V]
        float32 with the logit bias and the penalties applied as a token-by-token run would: row j also counts
        proposals[:j] as seen (and once more each for the presence and frequency penalties)."""
        if self._constraint is not None:  # (its mask is known one token ahead only; Generator keeps them apart)
            raise ValueError("speculative verification does not take structured output")
        x = logits.float()
        if self._biased:
            x = x + self._bias
        if not (self._penalize or self._counting):
            return x
        rows, vocab = x.shape
        earlier = torch.ones(rows, rows - 1, device=x.device).tril_(-1)  # [R, R-1]: row j sees proposals[:j]
        marks = torch.zeros(rows, vocab, device=x.device).scatter_add_(1, proposals.view(1, -1).expand(rows, -1),
                                                                        earlier)  # [R, V]: proposals[:j]'s counts
        if self._penalize:
            x = self._apply_repetition_penalty(x, self._seen | (marks > 0))
        if self._counting:
            x = self._apply_counts(x, self._counts + marks)
        return x

    def filtered_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Penalized logits [R, V] -> [R, V] float32: the distribution `sample` draws from, per row (temperature,
        top-k, top-p, min-p applied, renormalised)."""
        probs, order = torch.softmax(x / self._temperature, dim=-1).sort(dim=-1, descending=True)  # [R, V] each
        kept = torch.where(self._kept(probs), probs, 0.0)
        kept = kept / kept.sum(-1, keepdim=True)
        return torch.zeros_like(kept).scatter_(-1, order, kept)

    def observe_ids(self, ids: list[int]) -> None:
        """Mark tokens the host knows (accepted proposals) as seen and count them; nothing to do without a
        penalty."""
        if not ids or not (self._penalize or self._counting):
            return
        tokens = torch.tensor(ids, dtype=torch.int64).to(self.device, non_blocking=True)
        if self._penalize:
            self._seen.index_fill_(0, tokens, True)
        if self._counting:
            self._counts.index_add_(0, tokens, torch.ones(len(ids), dtype=torch.float32, device=self.device))


def _mirror(token: torch.Tensor, host: torch.Tensor | None) -> torch.Tensor:
    """token; with host, an asynchronous copy of it there first (pinned memory: a plain DMA on the stream)."""
    if host is not None:
        host.copy_(token, non_blocking=True)
    return token


def warm_up(logits: torch.Tensor) -> None:
    """Run every sampling path once on a throwaway sampler over a zero copy of `logits` ([V], the executor's
    logits buffer), token read-back included, so that a server's first request does not pay for loading their
    kernels: CUDA loads a kernel's module at its first launch (~0.1-1 ms each, ~ms per path). A no-op on the CPU."""
    if logits.device.type != "cuda":
        return
    run_every_path(logits)
    torch.cuda.synchronize(logits.device)


def run_every_path(logits: torch.Tensor) -> list[int]:
    """`warm_up`'s work on any device: each path's draws over a zero copy of `logits` [V] (the CPU tests run it).
    Returns the width of each token's extra values as read back (0: none), in draw order."""
    from jit_context.token_reader import TokenReader

    scratch = torch.zeros_like(logits)  # [V]
    sampler = Sampler(scratch.shape[0], scratch.device)
    reader = TokenReader(scratch.device)
    token = torch.zeros(1, dtype=torch.int64, device=scratch.device)
    last = min(1, scratch.shape[0] - 1)
    widths = []
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, repetition_penalty=1.1),
                   SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, seed=0,
                                  repetition_penalty=1.1, min_tokens=2),
                   # the OpenAI API's penalties, logit bias and logprobs (their kernels: scatter, gather, topk,
                   # log_softmax), greedy and sampled
                   SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.5,
                                  logit_bias=((last, 1.0),), logprobs=2),
                   SamplingParams(temperature=0.7, top_p=0.9, seed=0, presence_penalty=0.5, logit_bias=((last, -1.0),),
                                  logprobs=0)):
        sampler.start_request(params, [0], end_ids=[0])
        extra = sampler.last_logprobs if sampler.logprobs_k is not None else None
        for out in (token, None):
            picked = sampler.sample(scratch, out=out)
            sampler.observe(picked)
            reader.push(picked, extra=extra)
            reader.pop()
            widths.append(len(reader.popped_extra or ()))
        host = reader.next_host()  # the decode loop's form: the token written to the host by the sampling
        sampler.observe(sampler.sample(scratch, out=token, host=host))
        reader.push(token, written=True, extra=extra)
        reader.pop()
        widths.append(len(reader.popped_extra or ()))
    return widths
