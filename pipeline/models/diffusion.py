"""DDPM forward process, training loss and the DDIM sampler with classifier-free guidance.

Independent of the denoiser: anything mapping (x_t, t, label) to a prediction of the same
shape as x_t works. Label `num_classes` is the "no label" token used for guidance.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config.schema import DiffusionProcessConfig


def beta_schedule(kind: str, timesteps: int) -> torch.Tensor:
    if kind == "linear":
        scale = 1000 / timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    # Cosine schedule (Nichol & Dhariwal 2021): alpha_bar follows a squared cosine.
    s = 0.008
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)


class GaussianDiffusion(nn.Module):
    def __init__(self, cfg: DiffusionProcessConfig) -> None:
        super().__init__()
        self.cfg = cfg
        betas = beta_schedule(cfg.schedule, cfg.timesteps)
        alpha_bar = torch.cumprod(1.0 - betas, dim=0)
        self.register_buffer("alpha_bar", alpha_bar.float(), persistent=False)

    def _ab(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # (the table follows the timesteps' device: a process built on the CPU samples a GPU model)
        return self.alpha_bar.to(t.device)[t].view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps (closed form of the forward process)."""
        ab = self._ab(t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if self.cfg.prediction == "eps":
            return noise
        ab = self._ab(t, x0)
        return ab.sqrt() * noise - (1 - ab).sqrt() * x0  # v-prediction

    def loss(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor, num_classes: int,
             generator: torch.Generator | None = None, weight: torch.Tensor | None = None,
             t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Mean squared error of the prediction at a uniformly drawn timestep per example
        (optionally weighted per example, e.g. by class). Timesteps and noise given (validation's
        fixed draws) are used instead of drawn."""
        b = x0.shape[0]
        draw = generator.device if generator is not None else x0.device  # (a CPU generator for a GPU model)
        if t is None:
            t = torch.randint(0, self.cfg.timesteps, (b,), generator=generator, device=draw).to(x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=draw, dtype=x0.dtype).to(x0.device)
        noise = noise.to(x0.dtype)
        if self.cfg.cond_drop_prob > 0 and model.training:
            drop = torch.rand(b, generator=generator, device=draw).to(x0.device) < self.cfg.cond_drop_prob
            y = torch.where(drop, torch.full_like(y, num_classes), y)
        pred = model(self.q_sample(x0, t, noise), t, y)
        if weight is None:
            return F.mse_loss(pred.float(), self.target(x0, t, noise).float())
        per_example = F.mse_loss(pred.float(), self.target(x0, t, noise).float(), reduction="none").flatten(1).mean(1)
        return (per_example * weight).mean()

    def _eps_x0(self, pred: torch.Tensor, x: torch.Tensor, ab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.prediction == "eps":
            eps = pred
            x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        else:
            x0 = ab.sqrt() * x - (1 - ab).sqrt() * pred
            eps = (1 - ab).sqrt() * x + ab.sqrt() * pred
        return eps, x0

    @torch.no_grad()
    def sample(self, model: nn.Module, labels: torch.Tensor, shape: tuple[int, ...], num_classes: int,
               steps: int, guidance: float, eta: float,
               generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """DDIM sampling over `steps` of the timesteps (eta=0 deterministic, eta=1 ancestral) with
        classifier-free guidance weight `guidance` (0: conditional only), on the model's device; the
        settings are the task's `eval` section's. Noise is drawn on the generator's device (the CPU
        when there is none), so a CPU generator gives the same samples wherever the model runs, up
        to rounding. A list of generators, one per label (`row_generators`), draws each image's
        noise from its own: an image then depends on its label and its generator only, whatever
        else the batch holds and however it is cut into batches. More steps than timesteps would
        repeat timesteps (each repeat a no-op model call): they are capped at the timesteps."""
        w, steps = guidance, min(steps, self.cfg.timesteps)
        # (in float64: float32's rounding made neighbours equal near 10,000 timesteps, a step repeated and one lost)
        ts = torch.linspace(self.cfg.timesteps - 1, 0, steps, dtype=torch.float64).round().long().tolist()
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        labels = labels.to(device)
        if isinstance(generator, list) and len(generator) != len(labels):
            raise ValueError(f"{len(generator)} generators for {len(labels)} labels: one per label")
        x = _normal((len(labels), *shape), generator, device)
        null = torch.full_like(labels, num_classes)
        for i, t in enumerate(ts):
            tt = torch.full((len(labels),), t, dtype=torch.long, device=device)
            if w > 0:
                both = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null]))
                cond, uncond = both.chunk(2)
                pred = uncond + (1 + w) * (cond - uncond)
            else:
                pred = model(x, tt, labels)
            ab = self._ab(tt, x)
            _, x0 = self._eps_x0(pred, x, ab)
            x0 = x0.clamp(-1, 1)
            eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()  # consistent with the clamped x0
            ab_prev = self._ab(torch.full_like(tt, ts[i + 1]), x) if i + 1 < len(ts) else torch.ones_like(ab)
            sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
            x = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * eps
            if eta > 0 and i + 1 < len(ts):
                x = x + sigma * _normal(x.shape, generator, device)
        return x


def row_generators(seed: int, rows: int) -> list[torch.Generator]:
    """One CPU generator per image, row i's seeded with `seed + i` (modulo 2**64, as torch takes
    seeds): row i of a sampled batch is the image a batch of its label alone gets with seed + i."""
    return [torch.Generator().manual_seed((seed + i) % (1 << 64)) for i in range(rows)]


def row_draws(rows: Iterable[int], seed: int, timesteps: int,
              shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, noise) on the CPU for the rows at positions `rows`, each from its own generator
    (`row_generators`, seeded `seed` + position): a row's draw does not depend on the batch it is
    in, so validation and evaluation losses do not depend on how the rows are batched."""
    draws = [(torch.randint(0, timesteps, (), generator=g), torch.randn(shape, generator=g))
             for g in (row_generators(seed + int(r), 1)[0] for r in rows)]
    return torch.stack([t for t, _ in draws]), torch.stack([n for _, n in draws])


def _normal(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | list[torch.Generator] | None,
            device: torch.device) -> torch.Tensor:
    """Standard normal noise of `shape` on `device`, drawn on the generator's device (the CPU
    when there is none); with one generator per row, each row from its own."""
    if isinstance(generator, list):
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=g.device).to(device)
                            for g in generator])
    draw = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(tuple(shape), generator=generator, device=draw).to(device)
