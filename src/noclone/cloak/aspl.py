r"""Anti-DreamBooth ASPL (Van Le et al., ICCV 2023): alternate surrogate DreamBooth learning with PGD.

Following the public code's loop (f: a DreamBooth model that keeps learning from the perturbed photos):

    f = copy of the pipeline's UNet
    for round r = 1..R:                                         (R = `steps`)
        f' = copy(f); K DreamBooth steps of f' on the clean photos          (`surrogate_steps`, fresh AdamW)
        N PGD steps on delta maximizing  E||eps_{f'}(z_t, t, c_instance) - eps||^2,  z_0 = E(x + delta) * s
        K DreamBooth steps of f on the current perturbed photos x + delta   (the attacker learning from them)

PGD: delta <- clip_{[-eta, eta]}(delta + alpha * sign(grad)), x + delta kept in [-1, 1]; (t, eps) fresh per step.
The DreamBooth loss is noclone's (`noclone.attacks.base.dreambooth_loss`, optional prior preservation with class
images from the frozen model). By default the text encoder stays frozen and f' fine-tunes on the clean photos
being protected (one folder). The official script differs in both, and can be followed:
- `clean_images` (CLI `--clean-images DIR`): a separate clean set A of the same subject; f' fine-tunes on A while
  PGD perturbs the user's photos (set B) and f learns from the perturbed B (`clean_set=True` requires it);
- `train_text_encoder=True`: f and f' each fine-tune a copy of the text encoder too (same lr), and PGD's instance
  prompt is encoded by f''s text encoder. The pipeline's own weights never change.
The surrogate's DreamBooth steps clip gradients at `max_grad_norm` (1.0, as the official script; None: no clip).

Presets: `paper` (SD1.5 at 512: R = 50 rounds, K = 3 steps at lr 5e-7 with prior preservation, N = 6 PGD steps,
eps 0.05 / step 0.005 in [-1, 1] space = budget 0.025, step 0.0025 here, the 4 photos as one batch),
`sandbox` (64 px, a few seconds per photo on a CPU: R = 6, K = 2 at lr 2e-4, N = 4 at 8/255 and step 1/255,
no prior), `official` (`paper` plus the official script's clean set A (needs `clean_images`), trained text
encoder and fp32 model) and `paper-sd21` / `official-sd21` (the same; the working resolution is the model's,
768 for SD2.1: ASPL has no resolution setting of its own).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from noclone.cloak.advdm import instance_diffusion_loss
from noclone.cloak.base import OptimizationCloak, to_working
from noclone.cloak.fsmg import SurrogateConfig, clean_subject_data, dreambooth_steps
from noclone.errors import NocloneError
from noclone.training.data import LatentSet, SubjectData
from noclone.training.diffusion import diffusion_loss, encode_images, encode_prompts, training_scheduler

DTYPES = ("auto", "fp32", "bf16", "fp16")
ASPL_PAPER = dict(budget=0.025, step_size=0.0025, steps=50, pgd_steps=6, surrogate_steps=3, surrogate_lr=5e-7,
                  surrogate_batch_size=4, prior_preservation=True, num_class_images=200, class_image_steps=50,
                  batch_size=4)
# What the official Anti-DreamBooth ASPL script does beyond the paper's description: f' learns from a clean set A,
# the text encoder is trained, the model runs in fp32
ASPL_OFFICIAL_QUIRKS = dict(clean_set=True, train_text_encoder=True, dtype="fp32")


@dataclass
class ASPLConfig(SurrogateConfig):
    """`steps` = outer rounds R; `pgd_steps` = PGD steps N per round; `surrogate_steps` = K per round."""

    pgd_steps: int = 4
    clean_set: bool = False           # f' fine-tunes on a separate clean set A (`clean_images`), not the photos
    train_text_encoder: bool = False  # f and f' also fine-tune (copies of) the text encoder
    dtype: str = "auto"               # the model's dtype the run needs ('auto': --dtype as given)

    def validate(self) -> None:
        super().validate()
        if self.pgd_steps < 1:
            raise NocloneError(f"pgd_steps {self.pgd_steps} must be at least 1")
        if self.dtype not in DTYPES:
            raise NocloneError(f"dtype {self.dtype!r}: choose from {', '.join(DTYPES)}")


class ASPL(OptimizationCloak):
    """Alternating Surrogate and Perturbation Learning."""

    name: ClassVar[str] = "aspl"
    config_class = ASPLConfig
    PRESETS: ClassVar[dict[str, dict]] = {
        "sandbox": dict(budget=8 / 255, step_size=1 / 255, steps=6, pgd_steps=4, surrogate_steps=2,
                        surrogate_lr=2e-4, surrogate_batch_size=4),
        "paper": ASPL_PAPER,
        "paper-sd21": ASPL_PAPER,
        "official": {**ASPL_PAPER, **ASPL_OFFICIAL_QUIRKS},
        "official-sd21": {**ASPL_PAPER, **ASPL_OFFICIAL_QUIRKS},
    }

    def __init__(self, model=None, config=None, preset: str = "sandbox", clean_images=None, **settings):
        """`clean_images`: a folder or a list of PIL images, the clean set A the surrogate f' fine-tunes on
        (turns `clean_set` on)."""
        from noclone.attacks.base import load_subject_images, subject_fingerprint

        if clean_images is not None and config is None and settings.get("clean_set") is None:
            settings["clean_set"] = True
        super().__init__(model, config, preset, **settings)
        self.clean_images, self.clean_sha256 = None, None
        if isinstance(clean_images, (str, bytes)) or hasattr(clean_images, "is_dir"):
            paths, self.clean_images = load_subject_images(clean_images)
            self.clean_sha256 = subject_fingerprint(paths)
        elif clean_images is not None:
            self.clean_images = list(clean_images)
            if not self.clean_images:
                raise NocloneError("the clean set is empty")
        if self.clean_images is not None and not self.config.clean_set:
            self.config = replace(self.config, clean_set=True)
        if self.config.clean_set and self.clean_images is None:
            raise NocloneError("aspl with clean_set (the official script) fine-tunes the surrogate on a separate "
                               "clean set of the subject: give --clean-images DIR")
        self.surrogate = self.pipe.unet  # f' of the last round (what `objective` attacks)
        self.surrogate_text_encoder = None  # f''s text encoder with train_text_encoder
        self._surrogate_cond: torch.Tensor | None = None

    @classmethod
    def preset_notes(cls, preset: str) -> list[str]:
        notes = []
        if preset.startswith("official"):
            notes.append("'official' mirrors the official Anti-DreamBooth script (clean set A, text encoder "
                         "trained, fp32); it needs --clean-images DIR")
        if preset.endswith("sd21"):
            notes.append("the sd21 variants are aliases: the working resolution is the model's (768 for SD2.1)")
        return notes

    def objective(self, views: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self._surrogate_cond is None:
            return instance_diffusion_loss(self, self.surrogate, views, generator)
        latents = self.encode(views)  # the instance prompt as f''s fine-tuned text encoder encodes it
        return diffusion_loss(self.surrogate, training_scheduler(self.pipe), latents,
                              self._surrogate_cond.expand(len(latents), -1, -1), generator)

    def perturbed_data(self, xs: list[torch.Tensor], deltas: list[torch.Tensor], clean: SubjectData) -> SubjectData:
        """The attacker's data from the current perturbed photos (centre crops), with the clean run's class set."""
        views = self.views([(x + d).clamp(-1, 1) for x, d in zip(xs, deltas)], None)
        mean, std = encode_images(self.pipe.vae, views)
        return SubjectData(LatentSet(mean, std, clean.instance.prompt), clean.prior)

    def compute_deltas(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        c = self.config
        if c.clean_set:  # set A: what f' learns from (centre crops at the working resolution)
            clean = clean_subject_data(self, [to_working(im, self.resolution) for im in self.clean_images])
        else:
            clean = clean_subject_data(self, xs)
        model = copy.deepcopy(self.pipe.unet).requires_grad_(False)
        model_text = copy.deepcopy(self.pipe.text_encoder).requires_grad_(False) if c.train_text_encoder else None
        deltas, losses = self.start(xs), []
        self._surrogate_cond = None
        for r in range(c.steps):
            self.surrogate = copy.deepcopy(model)
            self.surrogate_text_encoder = copy.deepcopy(model_text) if model_text is not None else None
            dreambooth_steps(self, self.surrogate, clean, c.surrogate_steps, f"{self.name}/surrogate/{r}",
                             text_encoder=self.surrogate_text_encoder)
            if self.surrogate_text_encoder is not None:
                with torch.no_grad():
                    self._surrogate_cond = encode_prompts(self.surrogate_text_encoder, self.pipe.tokenizer,
                                                          [c.instance_prompt])
            deltas, round_losses = self.pgd(xs, deltas, c.pgd_steps, f"{self.name}/pgd", first_step=r * c.pgd_steps)
            losses += round_losses
            dreambooth_steps(self, model, self.perturbed_data(xs, deltas, clean), c.surrogate_steps,
                             f"{self.name}/model/{r}", text_encoder=model_text)
        self.model, self.model_text_encoder = model, model_text
        self.stats = {"objective_first_last": [losses[0], losses[-1]], "rounds": c.steps}
        return deltas

    def manifest(self) -> dict:
        info = super().manifest()
        if self.clean_images is not None:  # hashes only, never image data
            info["clean_set"] = {"n_photos": len(self.clean_images),
                                 **({"photo_sha256": list(self.clean_sha256)} if self.clean_sha256 else {})}
        return info
