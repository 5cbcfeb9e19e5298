"""Model correctness: causality, RoPE, the noising closed form, DDIM determinism, overfitting."""

from __future__ import annotations

import torch

from pipeline.config.schema import DiffusionProcessConfig, DiTConfig, GPTConfig
from pipeline.models.diffusion import GaussianDiffusion
from pipeline.models.dit import DiT
from pipeline.models.gpt import GPT, apply_rope, rope_tables


def _gpt(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(d_model=32, n_layers=2, n_heads=4, **kw), vocab_size=50, max_seq_len=16).eval()


def test_gpt_is_causal():
    model = _gpt()
    x = torch.randint(0, 50, (2, 12))
    y = x.clone()
    y[:, 8:] = (y[:, 8:] + 1) % 50  # change only the future
    with torch.no_grad():
        assert torch.allclose(model(x)[:, :8], model(y)[:, :8], atol=1e-6)
        assert not torch.allclose(model(x)[:, 8:], model(y)[:, 8:])


def test_gqa_and_learned_positions_build_and_run():
    for kw in ({"n_kv_heads": 2}, {"pos_emb": "learned", "norm": "layernorm", "mlp": "gelu"}):
        assert _gpt(**kw)(torch.randint(0, 50, (1, 5))).shape == (1, 5, 50)


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = rope_tables(32, 8, 10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(i: int, j: int) -> float:
        qs = torch.zeros(1, 1, 32, 8)
        ks = torch.zeros(1, 1, 32, 8)
        qs[0, 0, i], ks[0, 0, j] = q, k
        return (apply_rope(qs, cos, sin)[0, 0, i] @ apply_rope(ks, cos, sin)[0, 0, j]).item()

    assert abs(score(5, 2) - score(20, 17)) < 1e-4
    assert abs(score(5, 2) - score(5, 4)) > 1e-4


def test_tiny_gpt_overfits_one_batch():
    model = _gpt().train()
    x = torch.randint(0, 50, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_forward_noising_matches_closed_form():
    p = GaussianDiffusion(DiffusionProcessConfig(schedule="linear", timesteps=1000))
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ab = torch.cumprod(1 - betas, 0)
    assert torch.allclose(p.alpha_bar.double(), ab, atol=1e-6)
    x0, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 499, 999])
    expected = ab[t].float().sqrt().view(-1, 1, 1, 1) * x0 + (1 - ab[t].float()).sqrt().view(-1, 1, 1, 1) * eps
    assert torch.allclose(p.q_sample(x0, t, eps), expected, atol=1e-6)


def test_dit_shapes_and_deterministic_ddim():
    torch.manual_seed(0)
    cfg = DiTConfig(d_model=32, depth=2, n_heads=2, diffusion=DiffusionProcessConfig(sample_steps=5))
    model = DiT(cfg, (1, 8, 8), num_classes=10).eval()
    x = torch.randn(4, 1, 8, 8)
    assert model(x, torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 10])).shape == x.shape
    p = GaussianDiffusion(cfg.diffusion)
    a = p.sample(model, torch.tensor([1, 2]), (1, 8, 8), 10, generator=torch.Generator().manual_seed(1))
    b = p.sample(model, torch.tensor([1, 2]), (1, 8, 8), 10, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 1, 8, 8) and torch.equal(a, b)
