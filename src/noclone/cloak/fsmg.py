r"""Anti-DreamBooth FSMG (Van Le et al., ICCV 2023): PGD against a fixed surrogate DreamBooth model.

    theta_sur = DreamBooth(theta_0; clean photos)        (once: `surrogate_steps` AdamW steps, the attacker's loss)
    L(delta)  = E_{t, eps} || eps_{theta_sur}(z_t, t, c_instance) - eps ||^2,   z_0 = E(x + delta) * s
    delta <- clip_{[-eta, eta]}( delta + alpha * sign(grad_delta L) )

The surrogate is a copy of the pipeline's UNet (the input pipeline is never changed) fine-tuned with noclone's own
DreamBooth loss (`noclone.attacks.base.dreambooth_loss`, prior preservation optional) on the centre crops of the
clean photos at the model resolution, i.e. what the attacker trains on. The text encoder stays frozen (the
papers' attacker also trains it; a frozen one keeps the surrogate a UNet copy). Anti-DreamBooth fine-tunes on a
separate clean set A of the same person; with one folder we use the photos being protected.

Presets: `paper` (SD1.5 at 512: DreamBooth 1000 steps at lr 5e-7, batch 2, prior preservation with 200 class
images; then 100 PGD steps, eps 0.05 / step 0.005 in [-1, 1] space = budget 0.025, step 0.0025 here) and
`sandbox` (64 px: 40 surrogate steps at the sandbox DreamBooth lr 2e-4, batch 4, no prior; 20 PGD steps at 8/255).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch

from noclone.attacks.base import PersonalizationConfig, build_subject_data, dreambooth_loss
from noclone.cloak.advdm import instance_diffusion_loss
from noclone.cloak.base import CloakConfig, OptimizationCloak
from noclone.data.images import tensor_to_images
from noclone.errors import NocloneError
from noclone.training.data import SubjectData
from noclone.training.diffusion import step_generator, training_scheduler
from noclone.training.precision import autocast, compute_dtype, upcast_trainable


@dataclass
class SurrogateConfig(CloakConfig):
    """Settings of a cloak that fine-tunes a surrogate DreamBooth model."""

    surrogate_steps: int = 40
    surrogate_lr: float = 2e-4
    surrogate_batch_size: int = 4
    prior_preservation: bool = False
    prior_weight: float = 1.0
    num_class_images: int = 50
    class_image_steps: int = 25
    max_grad_norm: float | None = 1.0  # gradient clipping of the surrogate's DreamBooth steps; None: none

    def validate(self) -> None:
        super().validate()
        from noclone.presets import check_max_grad_norm

        check_max_grad_norm(self.max_grad_norm)
        if self.surrogate_steps < 1 or self.surrogate_batch_size < 1:
            raise NocloneError("surrogate_steps and surrogate_batch_size must be at least 1")
        if not (0 < self.surrogate_lr < 1):
            raise NocloneError(f"surrogate_lr {self.surrogate_lr} is outside (0, 1)")

    def personalization(self) -> PersonalizationConfig:
        """The attacker's DreamBooth settings the surrogate simulates."""
        return PersonalizationConfig(
            class_noun=self.class_noun, token=self.token, template=self.template, class_template=self.class_template,
            steps=self.surrogate_steps, lr=self.surrogate_lr, batch_size=self.surrogate_batch_size, seed=self.seed,
            prior_preservation=self.prior_preservation, prior_weight=self.prior_weight,
            num_class_images=self.num_class_images, class_image_steps=self.class_image_steps, progress=self.progress)


def clean_subject_data(cloak: OptimizationCloak, xs: list[torch.Tensor]) -> SubjectData:
    """The attacker's data from the clean working images: centre crops (+ class images with prior preservation)."""
    views = cloak.views(xs, None)
    return build_subject_data(cloak.pipe, tensor_to_images(views), cloak.config.personalization())


def dreambooth_steps(cloak: OptimizationCloak, unet, data: SubjectData, steps: int, stream: str,
                     text_encoder=None) -> list[float]:
    """`steps` AdamW DreamBooth steps on `unet` in place (fresh optimizer each call, as Anti-DreamBooth's code).

    With `text_encoder` (a copy owned by the caller) it fine-tunes too, at the same lr, as the official
    Anti-DreamBooth script does; the pipeline's own text encoder is never changed. Gradients are clipped at
    the config's `max_grad_norm` (None: not clipped)."""
    c = cloak.config
    unet.train().requires_grad_(True)
    params = [p for p in unet.parameters() if p.requires_grad]
    if text_encoder is not None:
        text_encoder.train().requires_grad_(True)
        params += list(text_encoder.parameters())
        cache = None  # the prompts are re-encoded by the learning text encoder at every step
    else:
        cache = {data.instance.prompt: cloak.cond(data.instance.prompt)}
        if data.prior is not None:
            cache[data.prior.prompt] = cloak.cond(data.prior.prompt)
    # fp32 master weights (the copies stay fp32 for later rounds), forwards under autocast in the pipeline's dtype
    upcast_trainable(params)
    dtype = compute_dtype(cloak.pipe.unet, cloak.pipe.vae, cloak.pipe.text_encoder)
    optimizer = torch.optim.AdamW(params, lr=c.surrogate_lr, weight_decay=1e-2)
    scheduler = training_scheduler(cloak.pipe)
    prior_weight = c.prior_weight if c.prior_preservation else 0.0
    max_grad_norm = getattr(c, "max_grad_norm", 1.0)
    losses = []
    try:
        for i in range(steps):
            optimizer.zero_grad(set_to_none=True)
            with autocast(dtype, unet.device):
                out = dreambooth_loss(unet, text_encoder if text_encoder is not None else cloak.pipe.text_encoder,
                                      cloak.pipe.tokenizer, scheduler, data, step_generator(c.seed, i, stream),
                                      c.surrogate_batch_size, prior_weight, cache)
            if not torch.isfinite(out["loss"]):
                raise NocloneError(f"{cloak.name}: surrogate loss became {out['loss'].item()}; lower surrogate_lr")
            out["loss"].backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            losses.append(float(out["loss"].detach()))
    finally:
        unet.eval().requires_grad_(False)
        if text_encoder is not None:
            text_encoder.eval().requires_grad_(False)
        for p in params:
            p.grad = None
    return losses


class FSMG(OptimizationCloak):
    """Fully-trained Surrogate Model Guidance: PGD against a DreamBooth model fine-tuned once on the clean photos."""

    name: ClassVar[str] = "fsmg"
    config_class = SurrogateConfig
    PRESETS: ClassVar[dict[str, dict]] = {
        "sandbox": dict(budget=8 / 255, step_size=1 / 255, steps=20, surrogate_steps=40, surrogate_lr=2e-4,
                        surrogate_batch_size=4),
        "paper": dict(budget=0.025, step_size=0.0025, steps=100, surrogate_steps=1000, surrogate_lr=5e-7,
                      surrogate_batch_size=2, prior_preservation=True, num_class_images=200, class_image_steps=50,
                      batch_size=4),
    }

    def __init__(self, model=None, config=None, preset: str = "sandbox", **settings):
        super().__init__(model, config, preset, **settings)
        self.surrogate = self.pipe.unet  # until a run fine-tunes one

    def objective(self, views: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return instance_diffusion_loss(self, self.surrogate, views, generator)

    def compute_deltas(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        c = self.config
        self.surrogate = copy.deepcopy(self.pipe.unet)
        sur_losses = dreambooth_steps(self, self.surrogate, clean_subject_data(self, xs), c.surrogate_steps,
                                      f"{self.name}/surrogate")
        deltas, losses = self.pgd(xs, self.start(xs), c.steps, self.name)
        self.stats = {"surrogate_loss_first_last": [sur_losses[0], sur_losses[-1]],
                      "objective_first_last": [losses[0], losses[-1]]}
        return deltas
