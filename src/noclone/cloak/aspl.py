r"""Anti-DreamBooth ASPL (Van Le et al., ICCV 2023): alternate surrogate DreamBooth learning with PGD.

Following the public code's loop (f: a DreamBooth model that keeps learning from the perturbed photos):

    f = copy of the pipeline's UNet
    for round r = 1..R:                                         (R = `steps`)
        f' = copy(f); K DreamBooth steps of f' on the clean photos          (`surrogate_steps`, fresh AdamW)
        N PGD steps on delta maximizing  E||eps_{f'}(z_t, t, c_instance) - eps||^2,  z_0 = E(x + delta) * s
        K DreamBooth steps of f on the current perturbed photos x + delta   (the attacker learning from them)

PGD: delta <- clip_{[-eta, eta]}(delta + alpha * sign(grad)), x + delta kept in [-1, 1]; (t, eps) fresh per step.
The DreamBooth loss is noclone's (`noclone.attacks.base.dreambooth_loss`, optional prior preservation with class
images from the frozen model); the text encoder stays frozen (the papers' attacker also trains it). The paper
uses a separate clean set A for f'; with one folder we use the clean photos being protected.

Presets: `paper` (SD1.5 at 512: R = 50 rounds, K = 3 steps at lr 5e-7 with prior preservation, N = 6 PGD steps,
eps 0.05 / step 0.005 in [-1, 1] space = budget 0.025, step 0.0025 here, the 4 photos as one batch) and
`sandbox` (64 px, a few seconds per photo on a CPU: R = 6, K = 2 at lr 2e-4, N = 4 at 8/255 and step 1/255,
no prior).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch

from noclone.cloak.advdm import instance_diffusion_loss
from noclone.cloak.base import OptimizationCloak
from noclone.cloak.fsmg import SurrogateConfig, clean_subject_data, dreambooth_steps
from noclone.errors import NocloneError
from noclone.training.data import LatentSet, SubjectData
from noclone.training.diffusion import encode_images


@dataclass
class ASPLConfig(SurrogateConfig):
    """`steps` = outer rounds R; `pgd_steps` = PGD steps N per round; `surrogate_steps` = K per round."""

    pgd_steps: int = 4

    def validate(self) -> None:
        super().validate()
        if self.pgd_steps < 1:
            raise NocloneError(f"pgd_steps {self.pgd_steps} must be at least 1")


class ASPL(OptimizationCloak):
    """Alternating Surrogate and Perturbation Learning."""

    name: ClassVar[str] = "aspl"
    config_class = ASPLConfig
    PRESETS: ClassVar[dict[str, dict]] = {
        "sandbox": dict(budget=8 / 255, step_size=1 / 255, steps=6, pgd_steps=4, surrogate_steps=2,
                        surrogate_lr=2e-4, surrogate_batch_size=4),
        "paper": dict(budget=0.025, step_size=0.0025, steps=50, pgd_steps=6, surrogate_steps=3, surrogate_lr=5e-7,
                      surrogate_batch_size=4, prior_preservation=True, num_class_images=200, class_image_steps=50,
                      batch_size=4),
    }

    def __init__(self, model=None, config=None, preset: str = "sandbox", **settings):
        super().__init__(model, config, preset, **settings)
        self.surrogate = self.pipe.unet  # f' of the last round (what `objective` attacks)

    def objective(self, views: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return instance_diffusion_loss(self, self.surrogate, views, generator)

    def perturbed_data(self, xs: list[torch.Tensor], deltas: list[torch.Tensor], clean: SubjectData) -> SubjectData:
        """The attacker's data from the current perturbed photos (centre crops), with the clean run's class set."""
        views = self.views([(x + d).clamp(-1, 1) for x, d in zip(xs, deltas)], None)
        mean, std = encode_images(self.pipe.vae, views)
        return SubjectData(LatentSet(mean, std, clean.instance.prompt), clean.prior)

    def compute_deltas(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        c = self.config
        clean = clean_subject_data(self, xs)
        model = copy.deepcopy(self.pipe.unet).requires_grad_(False)
        deltas, losses = self.start(xs), []
        for r in range(c.steps):
            self.surrogate = copy.deepcopy(model)
            dreambooth_steps(self, self.surrogate, clean, c.surrogate_steps, f"{self.name}/surrogate/{r}")
            deltas, round_losses = self.pgd(xs, deltas, c.pgd_steps, f"{self.name}/pgd", first_step=r * c.pgd_steps)
            losses += round_losses
            dreambooth_steps(self, model, self.perturbed_data(xs, deltas, clean), c.surrogate_steps,
                             f"{self.name}/model/{r}")
        self.model = model
        self.stats = {"objective_first_last": [losses[0], losses[-1]], "rounds": c.steps}
        return deltas
