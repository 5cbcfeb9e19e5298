"""`GPT.generate`'s KV cache: the tokens are those of the plain loop that re-runs the whole
window every step (kept here as the reference), for every attention variant, and the cache is
really used (the window is not re-run while the sequence fits the context)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.config.schema import GPTConfig
from pipeline.models.gpt import GPT

VOCAB, CONTEXT = 61, 24


def _gpt(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(d_model=32, n_layers=2, n_heads=4, mlp_hidden=64, **kw)
    model = GPT(cfg, vocab_size=VOCAB, max_seq_len=CONTEXT).eval()
    with torch.no_grad():  # larger weights than the init's: logits far apart, so greedy ties cannot hide a bug
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    return model


@torch.no_grad()
def _uncached(model: GPT, idx: torch.Tensor, n: int, temperature: float = 0.0, top_k: int | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """The generation before the cache: the whole (sliding) window, every step."""
    for _ in range(n):
        logits = model(idx[:, -model.max_seq_len :])[:, -1, :]
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
        idx = torch.cat([idx, nxt], dim=1)
    return idx


VARIANTS = {
    "rope": {},
    "learned": {"pos_emb": "learned"},
    "gqa": {"n_kv_heads": 2},
    "gqa_mqa_learned_layernorm_gelu": {"n_kv_heads": 1, "pos_emb": "learned", "norm": "layernorm", "mlp": "gelu"},
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("prompt_len", "n_new"), [(1, 10), (5, CONTEXT - 5), (5, 30), (CONTEXT + 6, 8)],
                         ids=["one_token_prompt", "fills_the_context", "slides_past_the_context",
                              "prompt_longer_than_context"])
def test_greedy_generation_with_the_cache_equals_the_uncached_loop(variant, prompt_len, n_new):
    model = _gpt(**VARIANTS[variant])
    prompt = torch.randint(0, VOCAB, (3, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    want = _uncached(model, prompt, n_new)
    got = model.generate(prompt, n_new, temperature=0)
    assert got.shape == (3, prompt_len + n_new)
    assert torch.equal(got, want)


@pytest.mark.parametrize("variant", ["rope", "learned", "gqa"])
def test_seeded_sampling_with_the_cache_equals_the_uncached_loop(variant):
    model = _gpt(seed=1, **VARIANTS[variant])
    prompt = torch.randint(0, VOCAB, (4, 3), generator=torch.Generator().manual_seed(7))
    want = _uncached(model, prompt, 35, temperature=0.9, top_k=20, generator=torch.Generator().manual_seed(3))
    got = model.generate(prompt, 35, temperature=0.9, top_k=20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, want)


def test_cached_logits_match_the_full_forward_at_every_position():
    """A sharper check than argmax: each step's logits are the full forward's (up to rounding)."""
    model = _gpt(n_kv_heads=2)
    idx = torch.randint(0, VOCAB, (2, CONTEXT), generator=torch.Generator().manual_seed(0))
    from pipeline.models.generation import KVCache

    with torch.no_grad():
        full = model(idx)
        cache = KVCache(len(model.blocks), CONTEXT)
        steps = [model.forward_cached(idx[:, :4], cache)]  # a prefill, then one token at a time
        steps += [model.forward_cached(idx[:, i : i + 1], cache) for i in range(4, 10)]
        steps.append(model.forward_cached(idx[:, 10:], cache))  # a chunk onto a non-empty cache
    assert cache.pos == CONTEXT
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_generation_within_the_context_prefills_once_then_feeds_one_token_per_step(monkeypatch):
    """Behaviour, not time: while the sequence fits the context no step re-runs the window;
    past it, each step runs the whole window (the uncached path, which the cache cannot serve)."""
    model = _gpt()
    fed: list[tuple[str, int, int]] = []
    full_forward, cached_forward = GPT.forward, GPT.forward_cached

    def spy_full(self, idx):
        fed.append(("full", idx.shape[1], 0))
        return full_forward(self, idx)

    def spy_cached(self, idx, cache):
        fed.append(("cached", idx.shape[1], cache.pos))
        return cached_forward(self, idx, cache)

    monkeypatch.setattr(GPT, "forward", spy_full)
    monkeypatch.setattr(GPT, "forward_cached", spy_cached)
    prompt = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    out = model.generate(prompt, CONTEXT - 6 + 3, temperature=0)
    assert out.shape == (2, CONTEXT + 3)
    # the prompt once, one token per step while the context holds them all, then the window (twice)
    assert fed == [("cached", 6, 0)] + [("cached", 1, p) for p in range(6, CONTEXT)] + [("full", CONTEXT, 0)] * 2


def test_training_mode_generation_never_touches_the_cache(monkeypatch):
    """With dropout live, generation keeps the plain forward (the cached path has no dropout)."""
    model = _gpt(dropout=0.1).train()
    monkeypatch.setattr(GPT, "forward_cached", lambda *a: pytest.fail("cache used in training mode"))
    out = model.generate(torch.zeros(1, 2, dtype=torch.long), 4, temperature=0)
    assert out.shape == (1, 6)


# ------------------------------------------------------------------ several prompts in one batch
def _ragged(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 1, 9, 3, 12)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_batched_generation_gives_each_prompt_what_it_gets_alone(variant):
    """Prompts of five lengths left-padded into one batch: each row's greedy tokens are those of
    `generate` on its prompt alone, and so are its logits at every step (up to rounding)."""
    model = _gpt(**VARIANTS[variant])
    prompts = _ragged()
    got = model.generate_batch(prompts, 10, temperature=0)
    for p, tokens in zip(prompts, got, strict=True):
        alone = model.generate(torch.tensor([p]), 10, temperature=0)[0, len(p) :].tolist()
        assert tokens == alone, (len(p), tokens, alone)
    # the logits themselves, through the padded cache: the same as each row's own forward
    from pipeline.models.generation import KVCache

    longest = max(map(len, prompts))
    pad = torch.tensor([longest - len(p) for p in prompts])
    idx = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    cache = KVCache(len(model.blocks), CONTEXT, pad)
    with torch.no_grad():
        logits = model.forward_cached(idx, cache)
        assert all(bool(t[:, :, :longest].isfinite().all()) for t in cache.k + cache.v)  # the filler's too
        for row, p in enumerate(prompts):
            alone = model(torch.tensor([p]))[0]
            torch.testing.assert_close(logits[row, longest - len(p) :], alone, rtol=1e-4, atol=1e-4)


def test_batched_sampling_draws_each_row_from_its_own_generator():
    """Row i samples from generators[i] exactly as `generate` of its prompt alone with that
    generator does; the other rows' draws do not move its stream."""
    model = _gpt(seed=1, n_kv_heads=2)
    prompts = _ragged(3)
    got = model.generate_batch(prompts, 20, temperature=0.9, top_k=20,
                               generators=[torch.Generator().manual_seed(s) for s in range(len(prompts))])
    for s, (p, tokens) in enumerate(zip(prompts, got, strict=True)):
        alone = model.generate(torch.tensor([p]), 20, temperature=0.9, top_k=20,
                               generator=torch.Generator().manual_seed(s))[0, len(p) :].tolist()
        assert tokens == alone, s


def test_batched_generation_stops_at_eos_and_sends_overlong_prompts_alone(monkeypatch):
    """With `eos_id` each row's tokens up to its first end are its own generation's, and the batch
    stops once every row has ended; a prompt whose continuation would slide past the context goes
    through `generate` alone; the rest are one batch: one cached forward per step, not per row."""
    from pipeline.models.generation import until_eos

    model = _gpt(seed=2)
    prompts = [*_ragged(5), list(range(CONTEXT - 4))]  # the last: 20 tokens + 8 new > 24
    eos = model.generate(torch.tensor([prompts[0]]), 3, temperature=0)[0, -1].item()  # row 0 ends at step 3
    calls = []
    cached = GPT.forward_cached
    monkeypatch.setattr(GPT, "forward_cached", lambda self, idx, cache: calls.append(idx.shape) or
                        cached(self, idx, cache))
    got = model.generate_batch(prompts, 8, temperature=0, eos_id=eos, min_new_tokens=0)
    monkeypatch.setattr(GPT, "forward_cached", cached)
    for p, tokens in zip(prompts, got, strict=True):
        alone = model.generate(torch.tensor([p]), 8, temperature=0, eos_id=eos)[0, len(p) :].tolist()
        assert until_eos(tokens, eos) == until_eos(alone, eos)
    assert eos in got[0][:3]  # row 0 did end
    batched = [s for s in calls if s[0] == len(prompts) - 1]
    assert batched and batched[0] == (5, 12) and all(s == (5, 1) for s in batched[1:]) and len(batched) <= 8
    assert len(calls) - len(batched) >= 1  # the overlong prompt: its own prefill (then the sliding window)


def test_no_new_tokens_is_an_empty_completion_for_every_prompt():
    """`generate_batch` with max_new_tokens 0 was torch.cat of nothing (a ValueError); `generate`
    returns the prompt."""
    model = _gpt()
    assert model.generate_batch([[1, 2], [3]], 0) == [[], []]
    assert model.generate(torch.tensor([[1, 2]]), 0).tolist() == [[1, 2]]


def test_ids_beyond_the_tokenizer_are_never_drawn():
    """A head padded to `vocab_multiple` has rows no token has: drawn, the tokenizer's decode drops
    them silently (a shorter completion, conditioned on an untrained id). With `vocab` they are
    never drawn, alone or batched; the control without it draws some."""
    model, limit = _gpt(), VOCAB // 4
    prompts = [[1, 2, 3], [4], [5, 6]]

    def draws(**kw) -> list[int]:
        batched = model.generate_batch(prompts, 6, temperature=5.0, **kw,
                                       generators=[torch.Generator().manual_seed(i) for i in range(len(prompts))])
        alone = model.generate(torch.tensor([prompts[0]]), 6, temperature=5.0, generator=torch.Generator(), **kw)
        return [t for row in batched for t in row] + alone[0, 3:].tolist()

    assert max(draws()) >= limit  # (the control: the hot distribution reaches the upper ids)
    assert max(draws(vocab=limit)) < limit
