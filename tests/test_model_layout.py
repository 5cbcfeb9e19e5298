"""The models' tensor/pipeline-parallel layout: separate q/k/v and MLP projections that start
from exactly the weights of the fused layout they replaced, load its checkpoints, run on a
tensor-parallel rank's local heads, and run as pipeline stages that drop the parts they do
not own."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeline.models.dit as dit_module
import pipeline.models.gpt as gpt_module
from pipeline.config.schema import DiTConfig, GPTConfig
from pipeline.models.dit import DiT
from pipeline.models.gpt import GPT, apply_rope, init_linear, init_norm, upgrade_legacy_keys

# ---------------------------------------------------------------------------------------------
# The fused layout, as it was before the split (reference copies of the old modules).


class FusedAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split([self.n_heads * self.head_dim, *(2 * [self.n_kv * self.head_dim])], dim=-1)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv != self.n_heads,
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class FusedMLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.d_model)
        self.swiglu = cfg.mlp == "swiglu"
        if self.swiglu:
            hidden = 64 * math.ceil(2 * hidden / 3 / 64)
        self.up = nn.Linear(cfg.d_model, hidden * (2 if self.swiglu else 1), bias=False)
        self.down = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.swiglu:
            a, g = h.chunk(2, dim=-1)
            return self.down(F.silu(g) * a)
        return self.down(F.gelu(h))


@torch.no_grad()
def fused_block_init(self) -> None:
    c = self.cfg
    residual_std = 0.02 / math.sqrt(2 * c.n_layers)
    init_norm(self.norm1)
    init_linear(self.attn.qkv.weight, c.init, 0.02)
    init_linear(self.attn.proj.weight, c.init, residual_std)
    init_norm(self.norm2)
    init_linear(self.mlp.up.weight, c.init, 0.02)
    init_linear(self.mlp.down.weight, c.init, residual_std)


def fused_gpt(monkeypatch: pytest.MonkeyPatch, cfg: GPTConfig, seed: int) -> GPT:
    """A GPT built and initialised exactly as the fused layout was, from `seed`."""
    with monkeypatch.context() as m:
        m.setattr(gpt_module, "Attention", FusedAttention)
        m.setattr(gpt_module, "MLP", FusedMLP)
        m.setattr(gpt_module.Block, "init_weights", fused_block_init)
        torch.manual_seed(seed)
        return GPT(cfg, vocab_size=50, max_seq_len=16).eval()


class FusedDiTBlock(dit_module.DiTBlock):
    def __init__(self, d: int, heads: int, mlp_ratio: float) -> None:
        nn.Module.__init__(self)
        self.heads = heads
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        hidden = int(d * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    @torch.no_grad()
    def init_weights(self) -> None:
        for m in (self.qkv, self.proj, self.mlp[0], self.mlp[2], self.ada[-1]):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        nn.init.zeros_(self.ada[-1].weight)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=-1)
        q, k, v = self.qkv(dit_module.modulate(self.norm1(x), sh1, sc1)).view(b, n, 3, self.heads, -1).permute(
            2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + g1.unsqueeze(1) * self.proj(a)
        return x + g2.unsqueeze(1) * self.mlp(dit_module.modulate(self.norm2(x), sh2, sc2))


def fused_dit(monkeypatch: pytest.MonkeyPatch, cfg: DiTConfig, seed: int) -> DiT:
    with monkeypatch.context() as m:
        m.setattr(dit_module, "DiTBlock", FusedDiTBlock)
        torch.manual_seed(seed)
        return DiT(cfg, (1, 8, 8), num_classes=10).eval()


def _gpt_cfg(**kw) -> GPTConfig:
    return GPTConfig(**{"d_model": 64, "n_layers": 2, "n_heads": 4, "mlp_ratio": 3.0, **kw})


def _fused_gpt_state(model: GPT) -> dict[str, torch.Tensor]:
    """`model`'s weights rearranged into the fused layout (concatenating the split rows back)."""
    state = {}
    for key, value in model.state_dict().items():
        stem = key.partition(".attn.")[0] if ".attn." in key else key.partition(".mlp.")[0]
        if key.endswith("attn.wq.weight"):
            a = model.get_submodule(stem).attn
            state[stem + ".attn.qkv.weight"] = torch.cat([a.wq.weight, a.wk.weight, a.wv.weight]).clone()
        elif key.endswith("attn.wo.weight"):
            state[stem + ".attn.proj.weight"] = value.clone()
        elif key.endswith("mlp.w1.weight"):
            mlp = model.get_submodule(stem).mlp
            up = torch.cat([mlp.w3.weight, mlp.w1.weight]) if mlp.swiglu else mlp.w1.weight
            state[stem + ".mlp.up.weight"] = up.clone()
        elif key.endswith("mlp.w2.weight"):
            state[stem + ".mlp.down.weight"] = value.clone()
        elif not key.endswith(("attn.wk.weight", "attn.wv.weight", "mlp.w3.weight")):
            state[key] = value.clone()
    return state


@torch.no_grad()
def _perturb(model: nn.Module, seed: int = 7) -> None:
    """Move every weight off its init (adaLN-Zero and tied/zero inits would hide a mix-up)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        noise = 0.05 * torch.randn(p.shape, generator=g)  # a DTensor's shape is the whole one
        if hasattr(p, "device_mesh"):  # a tensor-parallel shard: add its slice of the whole noise
            from torch.distributed.tensor import distribute_tensor

            noise = distribute_tensor(noise, p.device_mesh, p.placements, src_data_rank=None)
        p.add_(noise)


# ---------------------------------------------------------------------------------------------
# Initialisation: bit-identical to the fused layout for the same seed.


@pytest.mark.parametrize(
    ("init", "mlp", "n_kv_heads", "pos_emb", "tie"),
    list(itertools.product(["normal", "xavier", "he"], ["swiglu", "gelu"], [None, 2], ["rope", "learned"],
                           [True, False])),
)
def test_model_layout_gpt_init_matches_fused_layout(monkeypatch, init, mlp, n_kv_heads, pos_emb, tie):
    cfg = _gpt_cfg(init=init, mlp=mlp, n_kv_heads=n_kv_heads, pos_emb=pos_emb, tie_weights=tie)
    old = fused_gpt(monkeypatch, cfg, seed=3)
    torch.manual_seed(3)
    new = GPT(cfg, vocab_size=50, max_seq_len=16).eval()
    hd, kv = cfg.d_model // cfg.n_heads, cfg.n_kv_heads or cfg.n_heads
    for ob, nb in zip(old.blocks, new.blocks, strict=True):
        q, k, v = ob.attn.qkv.weight.split([cfg.n_heads * hd, kv * hd, kv * hd])
        assert torch.equal(nb.attn.wq.weight, q) and torch.equal(nb.attn.wk.weight, k)
        assert torch.equal(nb.attn.wv.weight, v) and torch.equal(nb.attn.wo.weight, ob.attn.proj.weight)
        if mlp == "swiglu":
            value, gate = ob.mlp.up.weight.chunk(2)
            assert torch.equal(nb.mlp.w3.weight, value) and torch.equal(nb.mlp.w1.weight, gate)
        else:
            assert not hasattr(nb.mlp, "w3") and torch.equal(nb.mlp.w1.weight, ob.mlp.up.weight)
        assert torch.equal(nb.mlp.w2.weight, ob.mlp.down.weight)
    outside = [k for k in new.state_dict() if not k.startswith("blocks.")]
    for key in outside:
        assert torch.equal(new.state_dict()[key], old.state_dict()[key]), key
    assert (new.head.weight is new.embed.weight) == tie
    x = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        assert torch.allclose(new(x), old(x), atol=1e-6, rtol=0)
    # The fused model's own checkpoint loads into the split layout as the same weights.
    loaded = GPT(cfg, vocab_size=50, max_seq_len=16).eval()
    loaded.load_state_dict(old.state_dict(), strict=True)
    for key, value in new.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_model_layout_gpt_unit_by_unit_init_matches_whole_init():
    """The sharded route (root without blocks, then each block) draws the same weights."""
    cfg = _gpt_cfg(n_kv_heads=2, init="xavier", tie_weights=False)
    torch.manual_seed(1)
    whole = GPT(cfg, vocab_size=50, max_seq_len=16)
    torch.manual_seed(1)
    whole.init_weights()
    with torch.device("meta"):
        lazy = GPT(cfg, vocab_size=50, max_seq_len=16)
    lazy.to_empty(device="cpu")
    torch.manual_seed(1)
    lazy.init_weights(include_blocks=False)
    for block in lazy.blocks:
        block.init_weights()
    for (name, a), b in zip(whole.state_dict().items(), lazy.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("seed", [0, 1])
def test_model_layout_dit_init_matches_fused_layout(monkeypatch, seed):
    cfg = DiTConfig(d_model=32, depth=2, n_heads=2)
    old = fused_dit(monkeypatch, cfg, seed)
    torch.manual_seed(seed)
    new = DiT(cfg, (1, 8, 8), num_classes=10).eval()
    for ob, nb in zip(old.blocks, new.blocks, strict=True):
        for name, w, b in zip(("wq", "wk", "wv"), ob.qkv.weight.chunk(3), ob.qkv.bias.chunk(3), strict=True):
            assert torch.equal(getattr(nb, name).weight, w) and torch.equal(getattr(nb, name).bias, b)
    loaded = DiT(cfg, (1, 8, 8), num_classes=10).eval()
    loaded.load_state_dict(old.state_dict(), strict=True)
    for key, value in new.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    _perturb(old)
    new.load_state_dict(old.state_dict(), strict=True)
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 50, 900]), torch.tensor([0, 3, 10])
    with torch.no_grad():
        assert torch.allclose(new(x, t, y), old(x, t, y), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Checkpoints of the fused layout load into the split one.


@pytest.mark.parametrize("kw", [{"mlp": "swiglu", "n_kv_heads": 2}, {"mlp": "gelu", "pos_emb": "learned",
                                                                     "tie_weights": False}])
def test_model_layout_gpt_loads_legacy_checkpoints(kw):
    cfg = _gpt_cfg(**kw)
    torch.manual_seed(0)
    model = GPT(cfg, vocab_size=50, max_seq_len=16).eval()
    _perturb(model)
    legacy = _fused_gpt_state(model)
    assert "blocks.0.attn.qkv.weight" in legacy and "blocks.1.mlp.up.weight" in legacy
    assert not any(".wq." in k or ".w1." in k for k in legacy)
    torch.manual_seed(1)
    fresh = GPT(cfg, vocab_size=50, max_seq_len=16).eval()
    fresh.load_state_dict(legacy, strict=True)
    x = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    # Under a prefix (a wrapper holding the model), through the wrapper's load_state_dict.
    torch.manual_seed(2)
    wrapped = nn.Sequential(GPT(cfg, vocab_size=50, max_seq_len=16)).eval()
    wrapped.load_state_dict({f"0.{k}": v for k, v in legacy.items()}, strict=True)
    with torch.no_grad():
        assert torch.equal(wrapped(x), model(x))
    # The function itself, for safetensors files read outside load_state_dict.
    upgraded = upgrade_legacy_keys(dict(legacy), cfg)
    assert set(upgraded) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(upgraded[key], value), key
    assert upgrade_legacy_keys(model.state_dict(), cfg).keys() == model.state_dict().keys()  # new layout: as is


def test_model_layout_dit_loads_legacy_checkpoints():
    cfg = DiTConfig(d_model=32, depth=2, n_heads=4)
    torch.manual_seed(0)
    model = DiT(cfg, (1, 8, 8), num_classes=10).eval()
    _perturb(model)
    legacy = {}
    for key, value in model.state_dict().items():
        if ".wq." in key:
            stem, _, kind = key.partition(".wq.")
            parts = [model.state_dict()[f"{stem}.{n}.{kind}"] for n in ("wq", "wk", "wv")]
            legacy[f"{stem}.qkv.{kind}"] = torch.cat(parts).clone()
        elif ".wk." not in key and ".wv." not in key:
            legacy[key] = value.clone()
    assert "blocks.1.qkv.bias" in legacy
    fresh = DiT(cfg, (1, 8, 8), num_classes=10).eval()
    fresh.load_state_dict(legacy, strict=True)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 10])
    with torch.no_grad():
        assert torch.equal(fresh(x, t, y), model(x, t, y))


# ---------------------------------------------------------------------------------------------
# Pipeline stages: shallow copies that drop what they do not own.


def _stage(model: GPT, owned: range, first: bool, last: bool) -> GPT:
    stage = copy.copy(model)
    stage._modules = dict(model._modules)
    stage.blocks = nn.ModuleList(b if i in owned else nn.Identity() for i, b in enumerate(model.blocks))
    for part in () if first else GPT.pp_plan["first"]:
        setattr(stage, part, None)
    for part in () if last else GPT.pp_plan["last"]:
        setattr(stage, part, None)
    return stage


@pytest.mark.parametrize(("pos_emb", "tie"), [("rope", True), ("learned", True), ("learned", False)])
def test_model_layout_gpt_pipeline_stages_compose_to_the_whole_model(pos_emb, tie):
    cfg = _gpt_cfg(n_layers=4, pos_emb=pos_emb, tie_weights=tie, n_kv_heads=2)
    torch.manual_seed(0)
    model = GPT(cfg, vocab_size=50, max_seq_len=16).eval()
    s0 = _stage(model, range(0, 2), first=True, last=False)
    s1 = _stage(model, range(2, 4), first=False, last=True)
    assert s1.embed is None and s1.pos is None and s0.norm is None and s0.head is None
    assert model.embed is not None and model.head is not None and len(model.blocks) == 4  # the original is untouched
    x = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        hidden = s0(x)
        assert hidden.shape == (2, 12, cfg.d_model)
        assert torch.equal(s1(hidden), model(x))
        with pytest.raises(ValueError, match="exceeds"):
            s1(torch.zeros(1, 17, cfg.d_model))
    three = [_stage(model, range(0, 1), True, False), _stage(model, range(1, 3), False, False),
             _stage(model, range(3, 4), False, True)]
    with torch.no_grad():
        h = x
        for stage in three:
            h = stage(h)
        assert torch.equal(h, model(x))


def test_model_layout_plans_name_existing_modules():
    for kw in ({"mlp": "swiglu"}, {"mlp": "gelu"}):
        model = GPT(_gpt_cfg(**kw), vocab_size=50, max_seq_len=16)
        block = model.blocks[0]
        for path in GPT.tp_plan:
            if path == "mlp.w3" and kw["mlp"] == "gelu":
                with pytest.raises(AttributeError):
                    block.get_submodule(path)
                continue
            assert isinstance(block.get_submodule(path), nn.Linear), path
        assert isinstance(model.get_submodule(GPT.pp_plan["blocks"]), nn.ModuleList)
        for part in (*GPT.pp_plan["first"], *GPT.pp_plan["last"]):
            assert hasattr(model, part)
    dit = DiT(DiTConfig(d_model=32, depth=1, n_heads=2), (1, 8, 8), num_classes=10)
    for path in DiT.tp_plan:
        assert isinstance(dit.blocks[0].get_submodule(path), nn.Linear), path


# ---------------------------------------------------------------------------------------------
# Tensor parallelism: each rank runs the same modules on its local heads / hidden units.


def _shard(module: nn.Module, plan: dict[str, str], rank: int, world: int) -> nn.Module:
    """What a column/row-parallel rank holds, as plain Linear layers with the local slices."""
    local = copy.deepcopy(module)
    for path, style in plan.items():
        try:
            lin = local.get_submodule(path)
        except AttributeError:
            continue
        dim = 0 if style == "colwise" else 1
        lin.weight = nn.Parameter(lin.weight.chunk(world, dim=dim)[rank].clone())
        if lin.bias is not None:
            bias = lin.bias.chunk(world)[rank] if style == "colwise" else lin.bias / world
            lin.bias = nn.Parameter(bias.clone())
    return local


@pytest.mark.parametrize("kw", [{"mlp": "swiglu", "n_kv_heads": 2}, {"mlp": "gelu"}])
def test_model_layout_gpt_block_runs_on_local_heads(kw):
    """Summing the row-parallel outputs of the ranks' local shards gives the whole block's."""
    torch.manual_seed(0)
    model = GPT(_gpt_cfg(**kw), vocab_size=50, max_seq_len=16).eval()
    _perturb(model)
    block, x = model.blocks[0], torch.randn(2, 9, 64)
    rope = (model.rope_cos, model.rope_sin)
    with torch.no_grad():
        h = block.norm1(x)
        attn = sum(_shard(block, GPT.tp_plan, r, 2).attn(h, rope) for r in range(2))
        assert torch.allclose(attn, block.attn(h, rope), atol=1e-5)
        mlp = sum(_shard(block, GPT.tp_plan, r, 2).mlp(h) for r in range(2))
        assert torch.allclose(mlp, block.mlp(h), atol=1e-5)


def _tp_rank(rank: int, world: int) -> dict[str, float]:
    """On a real tp mesh of `world` gloo ranks: each model with its blocks split by its own
    `tp_plan` (torch's ColwiseParallel/RowwiseParallel) gives the unsplit model's output, and
    `init_weights` on the split (DTensor) parameters draws the unsplit model's weights."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world,))
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}

    def split(model: nn.Module) -> nn.Module:
        for block in model.blocks:
            plan = {}
            for path, style in type(model).tp_plan.items():
                try:
                    block.get_submodule(path)
                except AttributeError:
                    continue
                plan[path] = styles[style]()
            parallelize_module(block, mesh, plan)
        return model

    def whole(model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}

    errors = {}
    builds = {
        "gpt": (lambda: GPT(_gpt_cfg(n_kv_heads=2, init="xavier"), vocab_size=50, max_seq_len=16),
                lambda m: m(torch.arange(24).view(2, 12) % 50)),
        "gpt-gelu": (lambda: GPT(_gpt_cfg(mlp="gelu", pos_emb="learned"), vocab_size=50, max_seq_len=16),
                     lambda m: m(torch.arange(24).view(2, 12) % 50)),
        "dit": (lambda: DiT(DiTConfig(d_model=32, depth=2, n_heads=4), (1, 8, 8), num_classes=10),
                lambda m: m(torch.linspace(-1, 1, 128).view(2, 1, 8, 8), torch.tensor([3, 700]),
                            torch.tensor([1, 10]))),
    }
    for name, (build, run) in builds.items():
        torch.manual_seed(0)
        ref = build().eval()
        torch.manual_seed(0)
        tp = split(build()).eval()
        assert any(isinstance(p, DTensor) for p in tp.parameters())
        got = whole(tp)
        errors[f"{name} init"] = max((got[k] - v).abs().max().item() for k, v in ref.state_dict().items())
        _perturb(ref)
        _perturb(tp)  # the same perturbation, added to the local shards of the same whole tensors
        with torch.no_grad():
            errors[f"{name} forward"] = (run(tp) - run(ref)).abs().max().item()
        torch.manual_seed(5)
        ref.init_weights()
        torch.manual_seed(5)
        tp.init_weights()  # straight onto the split parameters
        got = whole(tp)
        errors[f"{name} init on shards"] = max((got[k] - v).abs().max().item() for k, v in ref.state_dict().items())
    return errors


def test_model_layout_tensor_parallel_on_two_gloo_ranks():
    from pipeline.runtime.local_group import run_group

    for errors in run_group(_tp_rank, 2):
        for what, err in errors.items():
            assert err < 1e-5 if what.endswith("forward") else err == 0, (what, err)


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_model_layout_init_from_reads_a_fused_layout_file(tmp_path, mlp):
    """`trainer.init_from` reads tensors one at a time by name: a safetensors file written before
    the split (attn.qkv, attn.proj, mlp.up, mlp.down) still gives every split weight its rows."""
    from safetensors.torch import save_file

    from pipeline.config.schema import GPTConfig
    from pipeline.distributed.sharded_init import copy_from_safetensors
    from pipeline.models.gpt import GPT

    torch.manual_seed(3)
    model = GPT(GPTConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp=mlp, tie_weights=False), 50, 16)
    new = {k: v.detach().clone() for k, v in model.state_dict().items()}
    old = {}
    for k, v in new.items():
        stem, leaf = (k.rsplit(".", 2)[0], k.rsplit(".", 2)[1]) if k.count(".") >= 2 else ("", "")
        if leaf in ("wq", "wk", "wv"):
            old[f"{stem}.qkv.weight"] = torch.cat([new[f"{stem}.wq.weight"], new[f"{stem}.wk.weight"],
                                                   new[f"{stem}.wv.weight"]])
        elif leaf == "wo":
            old[f"{stem}.proj.weight"] = v
        elif leaf in ("w1", "w3"):
            old[f"{stem}.up.weight"] = (torch.cat([new[f"{stem}.w3.weight"], new[f"{stem}.w1.weight"]])
                                        if mlp == "swiglu" else new[f"{stem}.w1.weight"])
        elif leaf == "w2":
            old[f"{stem}.down.weight"] = v
        else:
            old[k] = v
    assert not any(".wq." in k or ".w1." in k for k in old)
    save_file({k: v.contiguous() for k, v in old.items()}, str(tmp_path / "old.safetensors"))
    targets = {k: torch.empty_like(v) for k, v in new.items()}
    copy_from_safetensors(tmp_path / "old.safetensors", targets)
    for k, v in new.items():
        assert torch.equal(targets[k], v), k
