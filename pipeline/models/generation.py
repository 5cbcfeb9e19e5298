"""Generation from a `GPT`: the KV cache, sampling, and the decode loops (one batch of equal
prompts, or prompts of any lengths left-padded into one cache). The model's own part is
`forward_cached`; `GPT.generate` and `GPT.generate_batch` call these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from pipeline.models.gpt import GPT

# Temperatures below this sample greedily, as 0 does: `logits / temperature` overflows to inf
# (softmax NaN, a multinomial crash) for tiny positive ones, and near it the draw is argmax anyway.
GREEDY_BELOW = 1e-5


def greedy(temperature: float) -> bool:
    """Whether `temperature` means argmax: 0, or too small to divide the logits by."""
    return temperature < GREEDY_BELOW


class KVCache:
    """Each layer's keys and values of the tokens seen so far (nanochat's engine keeps the same),
    so that generation computes one new position per step instead of the whole window again.

    A layer's buffer is allocated on its first insert, at the length the model can attend to,
    with that layer's local head count and dtype (a tensor-parallel rank's, an autocast one's).
    `pos` is how many positions are cached; `GPT.forward_cached` advances it after the last layer.

    Rows of different lengths share one cache left-padded (`pad`: each row's count of leading
    filler tokens): a row's token at slot j sits at position j - pad, its queries never see the
    filler, and a filler query sees only itself (no query row is wholly masked: sdpa kernels
    differ on what such a row gives, NaN in some).
    """

    def __init__(self, n_layers: int, max_len: int, pad: torch.Tensor | None = None) -> None:
        self.max_len, self.pos = max_len, 0
        self.pad = pad if pad is not None and bool(pad.any()) else None  # (B,) long, or None: no filler
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self._mask: tuple[int, int, torch.Tensor | None] | None = None  # (pos, t, mask): one per step, not per layer

    def positions(self, t: int, device: torch.device) -> torch.Tensor:
        """Each row's positions of the next `t` slots: (B, t) with filler, else (t,)."""
        slots = torch.arange(self.pos, self.pos + t, device=device)
        return slots if self.pad is None else (slots - self.pad[:, None]).clamp(min=0)

    def mask(self, t: int, device: torch.device) -> torch.Tensor | None:
        """Which cached slots each of the next `t` queries sees: (B, 1, t, pos + t) with filler;
        without it, None for one query (it sees every slot) and the causal band otherwise."""
        start = self.pos
        if self._mask is not None and self._mask[:2] == (start, t):  # every layer of this step asks
            return self._mask[2]
        if self.pad is None:
            mask = None if t == 1 else torch.ones(t, start + t, dtype=torch.bool, device=device).tril(start)
        else:
            q = torch.arange(start, start + t, device=device)[:, None]
            k = torch.arange(start + t, device=device)[None, :]
            real = k >= self.pad[:, None, None]  # (B, 1, pos + t): not filler
            mask = ((real & (k <= q)) | (k == q))[:, None]
        self._mask = (start, t, mask)
        return mask

    def insert(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, T, D) at `pos` and return the layer's keys and values up to them."""
        if self.k[layer] is None:
            b, h, _, d = k.shape
            self.k[layer] = k.new_empty(b, h, self.max_len, d)
            self.v[layer] = v.new_empty(b, h, self.max_len, d)
        end = self.pos + k.shape[2]
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


@torch.no_grad()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None,
             eos_id: int | None = None, min_new_tokens: int = 0, vocab: int | None = None) -> torch.Tensor:
    """Sample continuations; temperature 0 (or below `GREEDY_BELOW`) means greedy. Sampling
    draws on the generator's device (a CPU generator gives the same tokens wherever the model
    runs, up to rounding).
    With `eos_id`, generation stops once every row has produced it (a row's tokens after its
    first `eos_id` are whatever came next: cut them with `until_eos`), and the first
    `min_new_tokens` tokens are never it (`transformers`' min_new_tokens). With `vocab` (the
    tokenizer's size) no id at or above it is drawn: a head padded to `model.vocab_multiple` has
    rows no token has, which the tokenizer's decode drops silently.

    In eval mode a KV cache makes each step one position's work: the prompt is prefilled
    once, then only the newest token is fed. Once the sequence outgrows the context, the
    window slides (its oldest token drops out and every position shifts), which leaves
    nothing cached valid, so each step then runs the whole window, as without a cache: the
    tokens are those of the uncached loop either way. In training mode (dropout) every step
    runs the plain forward."""
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device) if eos_id is not None else None
    cache = None if model.training else KVCache(len(model.blocks), model.max_seq_len)
    for step in range(max_new_tokens):
        if cache is None or idx.shape[1] > model.max_seq_len:
            logits = model(idx[:, -model.max_seq_len :])[:, -1, :]
        else:  # the cache holds every token but the newest (none, before the prefill)
            logits = model.forward_cached(idx[:, cache.pos :], cache)[:, -1, :]
        _forbid(logits, step, eos_id, min_new_tokens, vocab)
        nxt = _sample(logits, temperature, top_k, generator).to(idx.device)
        idx = torch.cat([idx, nxt], dim=1)
        if done is not None:
            done |= nxt[:, 0] == eos_id
            if bool(done.all()):
                break
    return idx

@torch.no_grad()
def generate_batch(model: GPT, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
              top_k: int | None = None, generators: list[torch.Generator | None] | None = None,
                   eos_id: int | None = None, min_new_tokens: int = 0, vocab: int | None = None) -> list[list[int]]:
    """`generate` for several prompts of any lengths in one batch: each row's new tokens are
    those `generate` gives its prompt alone (row i sampling from `generators[i]`), up to the
    rounding of batched arithmetic. The prompts are left-padded into one KV cache
    (`KVCache.pad`), so each step is one position's work for every row. Rows that ended (at
    `eos_id`: cut with `until_eos`) ride along until all have. A prompt whose continuation
    would outgrow the context (the window slides, which has no batched form) goes alone
    through `generate`, as do all in training mode."""
    device = next(model.parameters()).device
    gens = list(generators) if generators is not None else [None] * len(prompts)
    out: list[list[int]] = [[] for _ in prompts]
    rows = [i for i, p in enumerate(prompts) if not model.training and len(p) + max_new_tokens <= model.max_seq_len]
    for i in sorted(set(range(len(prompts))) - set(rows)):
        ids = torch.tensor([prompts[i]], device=device)
        out[i] = generate(model, ids, max_new_tokens, temperature, top_k, gens[i], eos_id,
                          min_new_tokens, vocab)[0, len(prompts[i]) :].tolist()
    if not rows or max_new_tokens <= 0:
        return out
    longest = max(len(prompts[i]) for i in rows)
    pad = torch.tensor([longest - len(prompts[i]) for i in rows], device=device)
    idx = torch.tensor([[0] * (longest - len(prompts[i])) + list(prompts[i]) for i in rows], device=device)
    cache, done, new = KVCache(len(model.blocks), model.max_seq_len, pad), None, []
    for step in range(max_new_tokens):
        logits = model.forward_cached(idx, cache)[:, -1, :]
        _forbid(logits, step, eos_id, min_new_tokens, vocab)
        if greedy(temperature):
            idx = logits.argmax(-1, keepdim=True)
        else:  # each row its own draw, from its own generator: as if it were alone
            idx = torch.cat([_sample(logits[r : r + 1], temperature, top_k, gens[i]).to(device)
                             for r, i in enumerate(rows)])
        new.append(idx)
        if eos_id is not None:
            done = (idx[:, 0] == eos_id) if done is None else done | (idx[:, 0] == eos_id)
            if bool(done.all()):
                break
    for r, tokens in zip(rows, torch.cat(new, dim=1).tolist(), strict=True):
        out[r] = tokens
    return out


def _forbid(logits: torch.Tensor, step: int, eos_id: int | None, min_new_tokens: int, vocab: int | None) -> None:
    """In place: no eos before `min_new_tokens`, no id the tokenizer lacks."""
    if eos_id is not None and step < min_new_tokens:
        logits[:, eos_id] = float("-inf")
    if vocab is not None and vocab < logits.shape[-1]:
        logits[:, vocab:] = float("-inf")


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None,
            generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row of `logits` (B, vocab): argmax at temperature 0 (or below
    `GREEDY_BELOW`), else a draw from the tempered, top-k-truncated distribution on the
    generator's device."""
    if greedy(temperature):
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if generator is not None:
        probs = probs.to(generator.device)
    return torch.multinomial(probs, 1, generator=generator)


def until_eos(tokens: list[int], eos_id: int | None) -> list[int]:
    """`tokens` up to (not including) the first `eos_id`: a completion ends with its document."""
    return tokens[: tokens.index(eos_id)] if eos_id is not None and eos_id in tokens else tokens
