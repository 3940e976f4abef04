"""Acceptance of speculative proposals, on the device: which of k proposed tokens the target model keeps, and
the one token it adds after them.

- Greedy requests keep the longest prefix of the proposals that equals the target's argmax (after the
  repetition penalty, as `Sampler.sample` would apply it token by token), then add the target's argmax at the
  first mismatch (or after the last proposal): exactly the tokens greedy decoding would produce.
- Sampled requests use the rejection-sampling rule of Leviathan et al. / Chen et al.: proposal x_j drawn from
  q_j is kept with probability min(1, p_j(x_j) / q_j(x_j)); at the first rejection the added token is drawn from
  max(0, p_j - q_j) renormalised, and after k acceptances from p_k. The output then has the target's
  distribution p exactly, whatever q is. p is the request's filtered distribution (`Sampler.filtered_probs`:
  temperature, top-k, top-p, min-p, repetition penalty); q is one-hot at the proposal for n-gram and greedy
  draft proposals (`q=None`), or a full distribution [k, V].

Everything stays on the device; the caller copies the [k + 2] result to the host once.
"""

from __future__ import annotations

import torch

from jit_context.sampler import Sampler

_MIN_NOISE = 1e-20  # as the sampler: Exponential(1) noise must not round to 0


def warm_up(vocab_size: int, device: torch.device) -> None:
    """Run both acceptance paths once on throwaway state, so that a server's first speculating request does not
    pay for loading their kernels (CUDA loads each kernel's module at its first launch: ~ms each)."""
    from jit_context.sampling_params import SamplingParams

    sampler = Sampler(vocab_size, device)
    logits = torch.zeros(3, vocab_size, device=device)
    proposals = torch.zeros(2, dtype=torch.int64, device=device)
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_p=0.9, seed=0,
                                                                    repetition_penalty=1.1)):
        sampler.start_request(params, [0])
        accept(sampler, logits, proposals)


def accept(sampler: Sampler, logits: torch.Tensor, proposals: torch.Tensor,
           q: torch.Tensor | None = None) -> torch.Tensor:
    """logits [k + 1, V] (row j: the target after the last accepted token and proposals[:j]); proposals [k] int64;
    q None (one-hot at the proposals) or [k, V] float32. Returns [k + 2] int64 on the device: tokens [k + 1]
    (the first `accepted + 1` are the output: accepted proposals, then the added token), then `accepted`."""
    k = proposals.shape[0]
    if logits.shape[0] != k + 1 or (q is not None and q.shape != (k, logits.shape[1])):
        raise ValueError(f"{k} proposals need {k + 1} logits rows and q [{k}, V]; got logits "
                         f"{tuple(logits.shape)}, q {None if q is None else tuple(q.shape)}")
    x = sampler.penalized_rows(logits, proposals)  # [k + 1, V]
    if sampler.greedy:
        target = torch.argmax(x, dim=-1)  # [k + 1]
        accepted = torch.cumprod((target[:k] == proposals).long(), 0).sum().view(1)  # [1]
        return torch.cat([target, accepted])  # accepted proposals equal the target's argmax
    p = sampler.filtered_probs(x)  # [k + 1, V]
    rows = torch.arange(k, device=x.device)
    p_x = p[rows, proposals]  # [k]
    q_x = torch.ones_like(p_x) if q is None else q[rows, proposals]
    u = torch.rand(k, generator=sampler.generator, device=x.device)
    keep = u * q_x < p_x  # u < p/q without dividing by a q_x of 0 (never proposed, never accepted)
    accepted = torch.cumprod(keep.long(), 0).sum()  # []
    # The added token for every possible stopping point: row j < k from max(0, p_j - q_j), row k from p_k.
    onehot = torch.zeros_like(p[:k]).scatter_(1, proposals.view(-1, 1), 1.0) if q is None else q
    residual = torch.cat([(p[:k] - onehot).clamp_min_(0.0), p[k:]])  # [k + 1, V]
    # p_j = q_j up to rounding leaves nothing to draw from; p_j is then the right distribution.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
    noise = torch.empty_like(residual).exponential_(generator=sampler.generator).clamp_min_(_MIN_NOISE)
    added = torch.argmax(residual / noise, dim=-1)  # [k + 1]: exponential race, a draw per row
    positions = torch.arange(k + 1, device=x.device)
    padded = torch.cat([proposals, proposals.new_zeros(1)])  # [k + 1]; the last entry is never an accepted one
    tokens = torch.where(positions < accepted, padded, added[accepted])
    return torch.cat([tokens, accepted.view(1)])
