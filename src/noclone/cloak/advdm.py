r"""AdvDM (Liang et al., ICML 2023): PGD that maximizes the frozen model's diffusion loss on the photo.

    z_0 = E(x + delta) * s           (VAE posterior mean times the scaling factor; gradients flow through E)
    L(delta) = E_{t, eps} || eps_theta(sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps, t, c) - eps ||^2
    delta <- clip_{[-eta, eta]}( delta + alpha * sign(grad_delta L) ),   x + delta kept in [-1, 1]

c is the instance prompt ("a photo of sks person", the attacker's), t ~ U{0..T-1} and eps ~ N(0, I) are drawn
fresh at every step (`samples` Monte-Carlo draws per step; the paper uses one). v-prediction models use the
velocity target (`diffusion_target`). Choice: the posterior mean, not a sample, so the gradient is deterministic
given (t, eps).

Presets: `sandbox` (the 64 px embedded model: 8/255, step 1/255, 20 steps, seconds per image on a CPU) and `paper`
(the Anti-DreamBooth comparison budget, since the method facts give no AdvDM-specific numbers: eps 0.05 and
step 0.005 in [-1, 1] space = budget 0.025, step 0.0025 here, 100 steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from noclone.cloak.base import CloakConfig, OptimizationCloak
from noclone.training.diffusion import diffusion_loss, training_scheduler


@dataclass
class AdvDMConfig(CloakConfig):
    samples: int = 1  # Monte-Carlo (t, eps) draws per PGD step

    def validate(self) -> None:
        super().validate()
        if self.samples < 1:
            from noclone.errors import NocloneError

            raise NocloneError(f"samples {self.samples} must be at least 1")


def instance_diffusion_loss(cloak: OptimizationCloak, unet, views: torch.Tensor, generator: torch.Generator,
                            samples: int = 1) -> torch.Tensor:
    """The DreamBooth instance term on [-1, 1] views: E||eps_unet(z_t, t, c_instance) - eps||^2, z_0 = E(views)."""
    latents = cloak.encode(views)
    cond = cloak.cond(cloak.config.instance_prompt).expand(len(latents), -1, -1)
    scheduler = training_scheduler(cloak.pipe)
    return sum(diffusion_loss(unet, scheduler, latents, cond, generator) for _ in range(samples)) / samples


class AdvDM(OptimizationCloak):
    """PGD maximizing the frozen model's denoising loss under the instance prompt."""

    name: ClassVar[str] = "advdm"
    config_class = AdvDMConfig
    PRESETS: ClassVar[dict[str, dict]] = {
        "sandbox": dict(budget=8 / 255, step_size=1 / 255, steps=20),
        "paper": dict(budget=0.025, step_size=0.0025, steps=100, batch_size=4),
    }

    def objective(self, views: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return instance_diffusion_loss(self, self.pipe.unet, views, generator, self.config.samples)
