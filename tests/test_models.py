"""Model correctness: causality, RoPE, the noising closed form, DDIM determinism, overfitting."""

from __future__ import annotations

import pytest
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
    cfg = DiTConfig(d_model=32, depth=2, n_heads=2)
    model = DiT(cfg, (1, 8, 8), num_classes=10).eval()
    x = torch.randn(4, 1, 8, 8)
    assert model(x, torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 10])).shape == x.shape
    p = GaussianDiffusion(cfg.diffusion)
    a = p.sample(model, torch.tensor([1, 2]), (1, 8, 8), 10, 5, 1.0, 0.0, generator=torch.Generator().manual_seed(1))
    b = p.sample(model, torch.tensor([1, 2]), (1, 8, 8), 10, 5, 1.0, 0.0, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 1, 8, 8) and torch.equal(a, b)
    # more steps than the 1000 timesteps would repeat timesteps (no-op model calls): capped
    small = GaussianDiffusion(DiffusionProcessConfig(timesteps=30))
    capped = small.sample(model, torch.tensor([1]), (1, 8, 8), 10, 500, 1.0, 1.0, torch.Generator().manual_seed(2))
    assert torch.equal(capped, small.sample(model, torch.tensor([1]), (1, 8, 8), 10, 30, 1.0, 1.0,
                                            torch.Generator().manual_seed(2)))


def test_ddim_visits_distinct_timesteps_at_large_timestep_counts():
    """The timestep grid was float32: at 10,000 timesteps and 9,998 steps two neighbours rounded to
    one (a no-op model call) and an extra timestep was skipped. Each step now visits its own."""

    class Seen(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.t: list[int] = []

        def forward(self, x, t, y):
            self.t.append(int(t[0]))
            return torch.zeros_like(x)

    model = Seen()
    GaussianDiffusion(DiffusionProcessConfig(timesteps=10000)).sample(model, torch.tensor([1]), (1, 2, 2), 10, 9998,
                                                                       0.0, 0.0, torch.Generator().manual_seed(0))
    assert len(model.t) == len(set(model.t)) == 9998 and model.t[0] == 9999 and model.t[-1] == 0


def test_diffusion_loss_weights_examples():
    """Unit weights give the plain loss; weighting one example scales its share of the loss."""
    torch.manual_seed(0)
    cfg = DiTConfig(d_model=32, depth=2, n_heads=2, diffusion=DiffusionProcessConfig(cond_drop_prob=0.0))
    model = DiT(cfg, (1, 8, 8), num_classes=10)
    p = GaussianDiffusion(cfg.diffusion)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])

    def loss(w=None):
        return p.loss(model, x, y, 10, torch.Generator().manual_seed(5), w)

    plain = loss()
    assert torch.allclose(loss(torch.ones(4)), plain, atol=1e-6)
    per = torch.stack([loss(torch.eye(4)[i] * 4) for i in range(4)])  # each example's own loss
    assert torch.allclose(per.mean(), plain, atol=1e-6)  # the weighted parts add up to the plain loss
    w = torch.tensor([3.0, 1.0, 0.0, 0.0])
    assert torch.allclose(loss(w), (3 * per[0] + per[1]) / 4, atol=1e-6)


@pytest.mark.parametrize(
    ("preset", "vocab", "nominal"),
    [("gpt_125m", 50304, 124e6), ("gpt_350m", 50304, 355e6), ("gpt_1b", 50304, 1.3e9), ("gpt_7b", 32000, 6.7e9)],
)
def test_preset_parameter_counts_on_meta_device(preset, vocab, nominal):
    """Presets match their nominal sizes; built on the meta device, not one byte of weights is allocated."""
    from pipeline.config import compose
    from tests.conftest import ROOT

    raw = compose(ROOT / "configs", [f"model@tasks.lm.model={preset}"])
    cfg = GPTConfig.model_validate(raw["tasks"]["lm"]["model"])
    with torch.device("meta"):
        model = GPT(cfg, vocab_size=vocab, max_seq_len=2048)
    assert abs(model.num_params() - nominal) / nominal < 0.03, model.num_params()
    assert all(p.is_meta for p in model.parameters())
    assert model.flops_per_token(2048) > 6 * model.num_params(non_embedding=True)


def test_gpu_presets_pad_the_vocabulary_to_a_multiple_of_64(tiny_cfg):
    """GPT-2's 50,257 tokens become 50,304 embedding rows in the GPU presets (fast matmul kernels
    for the head); an explicit model.vocab_size wins; the tiny preset keeps the tokenizer's size."""
    from pipeline.config import compose, validate
    from pipeline.config.loading import apply_overrides
    from pipeline.tasks import task_named
    from tests.conftest import ROOT

    lm = task_named("lm")
    manifest = {"vocab_size": 50257, "seq_len": 2048}
    for preset, extra, rows in (("gpt_1b", [], 50304), ("gpt_7b", [], 50304), ("gpt_tiny", [], 50257),
                                ("gpt_1b", ["tasks.lm.model.vocab_size=50400"], 50400)):
        cfg = validate(apply_overrides(compose(ROOT / "configs", [f"model@tasks.lm.model={preset}"]), extra))
        assert lm.model_spec(cfg.task("lm"), manifest)["vocab_size"] == rows, (preset, extra)
    assert lm.model_spec(tiny_cfg.task("lm"), {"vocab_size": 300, "seq_len": 32})["vocab_size"] == 300


def test_meta_built_model_materialises_like_an_eager_one():
    cfg = GPTConfig(d_model=32, n_layers=2, n_heads=4)
    eager = GPT(cfg, vocab_size=50, max_seq_len=16)
    torch.manual_seed(1)
    eager.init_weights()
    with torch.device("meta"):
        lazy = GPT(cfg, vocab_size=50, max_seq_len=16)
    lazy.to_empty(device="cpu")
    torch.manual_seed(1)
    lazy.init_weights()
    assert lazy.head.weight is lazy.embed.weight  # tying survives materialisation
    for (name, a), b in zip(eager.state_dict().items(), lazy.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    x = torch.randint(0, 50, (2, 8))
    assert torch.equal(eager.eval()(x), lazy.eval()(x))


def test_attention_matches_explicit_softmax():
    model = _gpt(n_kv_heads=2)
    attn, x = model.blocks[0].attn, torch.randn(2, 7, 32)
    rope = (model.rope_cos, model.rope_sin)
    q, k, v = attn.wq(x), attn.wk(x), attn.wv(x)
    q = apply_rope(q.view(2, 7, 4, 8).transpose(1, 2), *rope)
    k = apply_rope(k.view(2, 7, 2, 8).transpose(1, 2), *rope).repeat_interleave(2, dim=1)
    v = v.view(2, 7, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
    scores = (q @ k.transpose(-1, -2)) / 8**0.5
    scores = scores.masked_fill(torch.triu(torch.ones(7, 7, dtype=torch.bool), 1), float("-inf"))
    expected = attn.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 32))
    with torch.no_grad():
        assert torch.allclose(attn(x, rope), expected, atol=1e-5)


def test_ddim_with_row_generators_samples_each_image_alone():
    """With one generator per image (`row_generators`), an image depends on its label and its
    generator only: the same alone as in a batch of others, at any place in it (one generator for
    the batch made a label's image change with its neighbours)."""
    from pipeline.models.diffusion import row_generators

    torch.manual_seed(0)
    cfg = DiffusionProcessConfig(timesteps=25, schedule="linear")
    model = DiT(DiTConfig(d_model=32, depth=1, n_heads=2, diffusion=cfg), (1, 4, 4), num_classes=3).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    p = GaussianDiffusion(cfg)
    batch = p.sample(model, torch.tensor([0, 2, 2]), (1, 4, 4), 3, steps=5, guidance=1.0, eta=1.0,
                     generator=row_generators(7, 3))
    for row, label in enumerate([0, 2, 2]):
        alone = p.sample(model, torch.tensor([label]), (1, 4, 4), 3, steps=5, guidance=1.0, eta=1.0,
                         generator=row_generators(7 + row, 1))
        assert torch.allclose(alone[0], batch[row], atol=1e-5), row
    assert not torch.allclose(batch[1], batch[2])  # the same label, another seed: another image
    assert row_generators(-1, 1)[0].initial_seed() == 2**64 - 1  # negative seeds wrap as torch's do
    with pytest.raises(ValueError, match="2 generators for 3 labels"):
        p.sample(model, torch.tensor([0, 1, 2]), (1, 4, 4), 3, 5, 1.0, 1.0, generator=row_generators(0, 2))


def test_ddim_with_every_step_and_eta_1_is_ddpm_ancestral_sampling():
    """DDIM(eta=1) over all T steps must equal DDPM's posterior sampling, step for step."""
    torch.manual_seed(0)
    cfg = DiffusionProcessConfig(timesteps=25, schedule="linear")
    model = DiT(DiTConfig(d_model=32, depth=1, n_heads=2, diffusion=cfg), (1, 4, 4), num_classes=3).eval()
    with torch.no_grad():  # adaLN-Zero starts as identity; perturb so the denoiser does something
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    labels = torch.tensor([0, 2])
    p = GaussianDiffusion(cfg)
    got = p.sample(model, labels, (1, 4, 4), 3, steps=25, guidance=0.0, eta=1.0,
                   generator=torch.Generator().manual_seed(5))

    betas = torch.linspace(1e-4 * 40, 0.02 * 40, 25, dtype=torch.float64).float()
    ab = torch.cumprod(1 - betas, 0)
    g = torch.Generator().manual_seed(5)
    x = torch.randn((2, 1, 4, 4), generator=g)
    with torch.no_grad():
        for t in range(24, -1, -1):
            eps = model(x, torch.full((2,), t), labels)
            x0 = ((x - (1 - ab[t]).sqrt() * eps) / ab[t].sqrt()).clamp(-1, 1)
            ab_prev = ab[t - 1] if t > 0 else torch.tensor(1.0)
            c0 = ab_prev.sqrt() * betas[t] / (1 - ab[t])
            ct = (1 - betas[t]).sqrt() * (1 - ab_prev) / (1 - ab[t])
            mean = c0 * x0 + ct * x
            var = (1 - ab_prev) / (1 - ab[t]) * betas[t]
            x = mean + (var.sqrt() * torch.randn(x.shape, generator=g) if t > 0 else 0)
    assert torch.allclose(got, x, atol=1e-4), (got - x).abs().max()


def test_unet_shapes_and_zero_initial_output():
    from pipeline.config.schema import UNetConfig
    from pipeline.models.unet import UNet

    model = UNet(UNetConfig(base_channels=8, channel_mults=[1, 2], num_res_blocks=1), (1, 8, 8), num_classes=10)
    x = torch.randn(3, 1, 8, 8)
    out = model(x, torch.tensor([0, 10, 999]), torch.tensor([1, 2, 10]))
    assert out.shape == x.shape and torch.count_nonzero(out) == 0  # zero-initialised output conv
    with pytest.raises(ValueError, match="not divisible"):
        UNet(UNetConfig(channel_mults=[1, 2, 2, 2]), (1, 6, 6), num_classes=10)


@pytest.mark.parametrize("kind", ["gpt", "dit", "unet"])
def test_init_weights_covers_every_parameter_after_meta_construction(kind):
    """The loop builds on the meta device; `init_weights` must then leave nothing uninitialised."""
    from pipeline.config.schema import UNetConfig
    from pipeline.models.unet import UNet

    def build() -> torch.nn.Module:
        if kind == "gpt":
            return GPT(GPTConfig(d_model=32, n_layers=2, n_heads=4), vocab_size=50, max_seq_len=16)
        if kind == "dit":
            return DiT(DiTConfig(d_model=32, depth=2, n_heads=2), (1, 8, 8), num_classes=10)
        return UNet(UNetConfig(base_channels=8), (1, 8, 8), num_classes=10)

    with torch.device("meta"):
        model = build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.init_weights()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name


def test_generate_stops_at_the_end_of_document_token():
    """With `eos_id`, generation stops once every row has produced it (a served completion or
    the evaluation's sample ends with its document instead of gluing on the next one), and
    `until_eos` cuts a row at its first one; the tokens before it are those generated without."""
    from pipeline.models.generation import until_eos

    torch.manual_seed(0)
    model = GPT(GPTConfig(d_model=32, n_layers=1, n_heads=2, mlp_hidden=64), 50, 64).eval()
    prompt = torch.tensor([[5, 9, 11]])
    full = model.generate(prompt, 30, temperature=1.0, generator=torch.Generator().manual_seed(1))[0, 3:].tolist()
    eos = full[4]
    first = full.index(eos)
    stopped = model.generate(prompt, 30, temperature=1.0, generator=torch.Generator().manual_seed(1), eos_id=eos)
    assert stopped[0, 3:].tolist() == full[: first + 1]  # the same tokens, ending at the first eos
    assert until_eos(stopped[0, 3:].tolist(), eos) == full[:first]
    assert until_eos(full, None) == full and until_eos([1, 2], 7) == [1, 2]
    never_first = model.generate(prompt, 30, temperature=0, eos_id=full[0], min_new_tokens=1)
    assert never_first.shape[1] > 4 and never_first[0, 3].item() != full[0]  # min_new_tokens: not eos first
    both = model.generate(torch.cat([prompt, prompt]), 30, temperature=0, eos_id=eos)  # stops when all rows have
    greedy = model.generate(prompt, 30, temperature=0)[0, 3:].tolist()
    assert both.shape[1] - 3 == (greedy.index(eos) + 1 if eos in greedy else 30)
