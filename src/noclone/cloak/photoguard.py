r"""PhotoGuard encoder attack (Salman et al., ICML 2023): push the image's VAE latent toward a target latent.

    z_target = E(x_target).mean                      (x_target: a flat mid-grey image, 0 in [-1, 1] space)
    L(delta) = || E(x + delta).mean - z_target ||^2  (mean over elements; minimized)
    delta <- clip_{[-eta, eta]}( delta - alpha_i * sign(grad_delta L) ),   x + delta kept in [-1, 1]
    alpha_i = alpha - (alpha - alpha / 100) * i / steps      (the public code's linearly decaying step)

A diffusion model then starts its edits or its personalization from a latent close to grey. As in the public
code, PGD starts from a uniform random point of the ball (`random_start`). The encoder sees the R x R crops of
the working image (see `noclone.cloak.base`).

Presets: `paper` = the public demo's immunization call (eps 0.12, step 0.01, 200 iterations in [-1, 1] space,
i.e. budget 0.06 and step 0.005 here); `sandbox` = 8/255, step 2/255, 30 steps at 64 px.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from noclone.cloak.base import CloakConfig, OptimizationCloak
from noclone.errors import NocloneError

TARGETS = ("gray", "black", "white")


@dataclass
class PhotoGuardConfig(CloakConfig):
    target: str = "gray"         # flat target image: gray (0 in [-1, 1]), black (-1) or white (1)
    decay_step: bool = True      # the public code's linearly decaying step size
    random_start: bool = True

    def validate(self) -> None:
        super().validate()
        if self.target not in TARGETS:
            raise NocloneError(f"target {self.target!r}: choose from {', '.join(TARGETS)}")


class PhotoGuard(OptimizationCloak):
    """Encoder attack: PGD pulling E(x + delta) toward the latent of a flat target image."""

    name: ClassVar[str] = "photoguard"
    config_class = PhotoGuardConfig
    maximize: ClassVar[bool] = False
    PRESETS: ClassVar[dict[str, dict]] = {
        "sandbox": dict(budget=8 / 255, step_size=2 / 255, steps=30),
        "paper": dict(budget=0.06, step_size=0.005, steps=200, batch_size=1),
    }

    def __init__(self, model=None, config=None, preset: str = "sandbox", **settings):
        super().__init__(model, config, preset, **settings)
        value = {"gray": 0.0, "black": -1.0, "white": 1.0}[self.config.target]
        flat = torch.full((1, 3, self.resolution, self.resolution), value)
        with torch.no_grad():
            self.target_latent = self.encode(flat)

    def objective(self, views: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        latents = self.encode(views)
        return F.mse_loss(latents, self.target_latent.expand_as(latents))

    def compute_deltas(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        c = self.config
        if c.decay_step:
            def step_size(i: int) -> float:
                return c.alpha - (c.alpha - c.alpha / 100) * i / c.steps
        else:
            step_size = None
        deltas, losses = self.pgd(xs, self.start(xs), c.steps, self.name, step_size=step_size)
        self.stats = {"objective_first_last": [losses[0], losses[-1]]}
        return deltas
