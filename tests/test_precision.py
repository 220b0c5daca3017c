"""Mixed precision (noclone.training.precision) on every training path, with a bf16 tiny pipeline on the CPU.

At lr 5e-6 most AdamW updates of a bf16 weight are below bf16 resolution: training in the pipeline's dtype silently
does nothing. Each method must step fp32 master weights (so every element with a gradient moves) while the frozen
weights stay bf16 and bit-identical. `StepProbe` watches every optimizer step of a run, whatever optimizer it uses.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from noclone.training.precision import autocast, compute_dtype, settle, upcast_trainable

torch.set_num_threads(1)

LR = 5e-6
BF16 = torch.bfloat16


class StepProbe:
    """At every optimizer step: the stepped parameters' dtypes, how many of their elements with a gradient (above
    AdamW's eps) changed, and the dtypes of the weights `frozen()` lists that this optimizer does not step."""

    def __init__(self, frozen=lambda: ()):
        self.frozen = frozen
        self.steps, self.moved, self.total = 0, 0, 0
        self.dtypes: set[torch.dtype] = set()
        self.frozen_dtypes: set[torch.dtype] = set()

    def _pre(self, optimizer, args, kwargs):
        self.before = [[p.detach().clone() for p in g["params"]] for g in optimizer.param_groups]

    def _post(self, optimizer, args, kwargs):
        for group, before in zip(optimizer.param_groups, self.before):
            for p, b in zip(group["params"], before):
                if p.grad is None:
                    continue
                self.dtypes.add(p.dtype)
                live = p.grad.abs() > 1e-8  # AdamW's eps: a smaller gradient takes a smaller step than lr
                self.total += int(live.sum())
                self.moved += int(((p.detach() != b) & live).sum())
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.frozen_dtypes |= {p.dtype for p in self.frozen() if id(p) not in stepped}
        self.steps += 1

    @property
    def fraction_moved(self) -> float:
        return self.moved / max(self.total, 1)

    @contextlib.contextmanager
    def watching(self):
        handles = [register_optimizer_step_pre_hook(self._pre), register_optimizer_step_post_hook(self._post)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def _weights(*modules) -> list[torch.nn.Parameter]:
    return [p for m in modules for p in m.parameters()]


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _identical(before: dict, after: dict) -> bool:
    """Same values (compared in fp32: bf16 -> fp32 is exact), same keys."""
    return before.keys() == after.keys() and all(torch.equal(before[k].float(), after[k].float()) for k in before)


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k].float(), after[k].float())}


@pytest.fixture
def bf16_pipe(tiny_model_dir):
    from noclone.models.pipeline import load_pipeline

    return load_pipeline(tiny_model_dir, device="cpu", dtype="bf16")


# ------------------------------------------------------------------------------------------------ the helpers


def test_without_master_weights_an_lr_5e6_adamw_step_moves_few_bf16_weights(bf16_pipe):
    """The failure the policy prevents, measured with the probe the method tests use: the test can fail."""
    weights = {"bf16": [p for p in bf16_pipe.unet.parameters()]}
    weights["fp32"] = [torch.nn.Parameter(p.detach().float()) for p in weights["bf16"]]
    fractions = {}
    for name, params in weights.items():
        for p in params:
            p.requires_grad_(True)
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(p.dtype)
        with StepProbe().watching() as probe:
            torch.optim.AdamW(params, lr=LR).step()
        fractions[name] = probe.fraction_moved
    assert fractions["bf16"] < 0.5, fractions  # most updates are rounded away
    assert fractions["fp32"] > 0.99, fractions


def test_upcast_keeps_the_parameter_objects_and_only_casts_what_trains():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)).to(BF16)
    model[1].requires_grad_(False)
    weight = model[0].weight
    assert upcast_trainable(model) == [model[0].weight, model[0].bias]
    assert model[0].weight is weight and weight.dtype == torch.float32 and model[1].weight.dtype == BF16
    assert compute_dtype(model) == BF16 and compute_dtype(torch.nn.Linear(2, 2)) == torch.float32
    with autocast(BF16, "cpu"):  # fp32 trained layer + bf16 frozen one in one forward
        out = model(torch.randn(2, 4))
    out.float().sum().backward()
    assert weight.grad.dtype == torch.float32
    assert all(isinstance(autocast(d), contextlib.nullcontext) for d in (torch.float32, None))
    assert settle(model) == torch.float32 and {p.dtype for p in model.parameters()} == {torch.float32}


def test_settle_ignores_lora_adapters(bf16_pipe):
    from noclone.attacks.lora import add_lora

    add_lora(bf16_pipe.unet, 2)
    upcast_trainable(bf16_pipe.unet)
    assert {p.dtype for n, p in bf16_pipe.unet.named_parameters() if "lora_" in n} == {torch.float32}
    assert settle(bf16_pipe.unet, bf16_pipe.vae) == BF16  # the half base stays; peft casts around its adapters
    assert bf16_pipe.unet.conv_in.weight.dtype == BF16


# ------------------------------------------------------------------------------------------------ every method


def _personalize(method: str, **settings):
    def run(pipe, subject_dir, tmp_path):
        from noclone.attacks.base import PersonalizationConfig, load_subject_images
        from noclone.attacks.dreambooth import DreamBooth
        from noclone.attacks.lora import LoRA
        from noclone.attacks.textual_inversion import TextualInversion

        cls = {"dreambooth": DreamBooth, "lora": LoRA, "ti": TextualInversion}[method]
        config = PersonalizationConfig(class_noun="person", steps=2, lr=LR, batch_size=1, prior_preservation=False,
                                       progress=False, **settings)
        cls(config).train(pipe, load_subject_images(subject_dir)[1])
    return run


def _apdm(**settings):
    def run(pipe, subject_dir, tmp_path):
        from noclone.defenses import APDM, APDMConfig, ProtectionSubject

        config = APDMConfig(outer_steps=2, inner_steps=1, batch_size=1, num_class_images=2, class_image_steps=1,
                            lr_protect=LR, lr_per=LR, progress=False, **settings)
        APDM(config).protect(pipe, [ProtectionSubject.from_folder(subject_dir, "person")])
    return run


def _persguard(**settings):
    def run(pipe, subject_dir, tmp_path):
        from noclone.defenses import PersGuard, PersGuardConfig, ProtectionSubject

        config = PersGuardConfig(steps=2, inner_steps=1, batch_size=1, num_class_images=2, num_target_images=2,
                                 class_image_steps=1, lr=LR, lr_per=LR, progress=False, **settings)
        PersGuard(config).protect(pipe, [ProtectionSubject.from_folder(subject_dir, "person")])
    return run


# name: (run, the modules whose weights train, the modules left bit-identical)
PIPELINE_METHODS = {
    "dreambooth": (_personalize("dreambooth"), ("unet",), ("vae", "text_encoder")),
    "dreambooth+text": (_personalize("dreambooth", train_text_encoder=True), ("unet", "text_encoder"), ("vae",)),
    "lora+text": (_personalize("lora", lora_rank=2, train_text_encoder=True), (), ("vae",)),
    # the encoder holding the learned embedding runs fp32 whole (diffusers' textual_inversion.py does the same)
    "ti": (_personalize("ti"), ("text_encoder",), ("unet", "vae")),
    "apdm": (_apdm(), ("unet",), ("vae", "text_encoder")),
    "apdm-attention": (_apdm(params="attention"), ("unet",), ("vae", "text_encoder")),
    "apdm+text-attacker": (_apdm(train_text_encoder=True), ("unet",), ("vae",)),
    "apdm-lora": (_apdm(params="lora", lora_rank=2), ("unet",), ("vae", "text_encoder")),  # merged in fp32
    "persguard": (_persguard(), ("unet",), ("vae", "text_encoder")),
    "persguard-persistent-attacker": (_persguard(br_horizon=2), ("unet",), ("vae", "text_encoder")),
}


@pytest.mark.parametrize("name", list(PIPELINE_METHODS))
def test_pipeline_method_steps_fp32_master_weights(name, bf16_pipe, subject_dir, tmp_path):
    run, trained, frozen = PIPELINE_METHODS[name]
    pipe = bf16_pipe
    before = {m: _state(getattr(pipe, m)) for m in ("unet", "vae", "text_encoder")}
    # the frozen weights of every module must stay bf16 while it trains (TI's encoder is fp32 whole on purpose)
    probe = StepProbe(lambda: _weights(pipe.unet, pipe.vae, *(() if name == "ti" else (pipe.text_encoder,))))
    with probe.watching():
        run(pipe, subject_dir, tmp_path)
    assert probe.steps >= 2
    assert probe.dtypes == {torch.float32}, probe.dtypes  # every stepped weight is an fp32 master weight
    assert probe.fraction_moved > 0.99, probe.fraction_moved  # so every element with a gradient moved
    assert probe.frozen_dtypes == {BF16}, probe.frozen_dtypes  # the frozen modules stayed bf16 while it trained
    after = {m: _state(getattr(pipe, m)) for m in ("unet", "vae", "text_encoder")}
    for m in frozen:
        assert _identical(before[m], after[m]), m
    for m in trained:
        assert len(_changed(before[m], after[m])) > 0, m  # what was learned is still there after the run
    if name == "ti":  # one new row learned (the probe saw it move), every other weight as it was
        key = "embeddings.token_embedding.weight"
        assert _changed(before["text_encoder"], after["text_encoder"]) == {key}
        assert torch.equal(after["text_encoder"][key][:-1], before["text_encoder"][key].float())
    # one dtype when it ends: fp32 once whole weights trained, bf16 beside fp32 LoRA adapters
    dtypes = {p.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder) for n, p in m.named_parameters()
              if "lora_" not in n}
    assert dtypes == ({BF16} if name.startswith("lora") else {torch.float32}), dtypes


def test_decoder_guard_steps_fp32_master_weights(bf16_pipe):
    from noclone.defenses import decoder_backdoor as db

    vae = bf16_pipe.vae
    before = _state(vae)
    z = torch.randn(4, vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    probe = StepProbe(lambda: _weights(vae.encoder, vae.quant_conv))
    with probe.watching():
        db.implant(vae, z[:2], z[2:], db.DecoderBackdoorConfig(steps=2, batch_size=2, lr=LR, held_out_fraction=0.0,
                                                                progress=False))
    assert probe.steps == 2 and probe.dtypes == {torch.float32} and probe.fraction_moved > 0.99, vars(probe)
    assert probe.frozen_dtypes == {BF16}
    after = _state(vae)
    assert {v.dtype for v in after.values()} == {BF16}  # a VAE alone is handed back in its own dtype
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("encoder.", "quant_conv.")))


def test_rid_generator_steps_fp32_master_weights(bf16_pipe):
    from noclone.cloak.rid import RIDConfig, RIDGenerator, RIDTrainConfig, sandbox_training_images, train_rid

    generator = RIDGenerator(RIDConfig(resolution=32, net=dict(channels=8))).to(BF16)  # even a half generator
    images = sandbox_training_images(1, photos=2, size=32)
    before = {m: _state(getattr(bf16_pipe, m)) for m in ("unet", "vae", "text_encoder")}
    probe = StepProbe(lambda: _weights(bf16_pipe.unet, bf16_pipe.vae, bf16_pipe.text_encoder))
    with probe.watching():
        train_rid(generator, [bf16_pipe], images, RIDTrainConfig(steps=2, batch_size=2, lr=LR, progress=False))
    assert probe.steps == 2 and probe.dtypes == {torch.float32} and probe.fraction_moved > 0.99, vars(probe)
    assert probe.frozen_dtypes == {BF16}
    assert all(_identical(before[m], _state(getattr(bf16_pipe, m))) for m in before)


@pytest.mark.parametrize("method,settings", [
    ("fsmg", dict(steps=1, surrogate_steps=2)),
    ("aspl", dict(steps=1, pgd_steps=1, surrogate_steps=2)),
])
def test_cloak_surrogate_steps_fp32_master_weights(method, settings, bf16_pipe):
    from noclone.cloak import get_cloak
    from noclone.sandbox.render import render
    from noclone.sandbox.splits import held_out

    pipe = bf16_pipe
    before = {m: _state(getattr(pipe, m)) for m in ("unet", "vae", "text_encoder")}
    cloak = get_cloak(method, pipe, surrogate_lr=LR, **settings)
    probe = StepProbe(lambda: _weights(pipe.unet, pipe.vae, pipe.text_encoder))
    with probe.watching():
        cloak.protect([render("person", held_out(7), i, size=32) for i in range(2)])
    assert probe.steps >= 2 and probe.dtypes == {torch.float32} and probe.fraction_moved > 0.99, vars(probe)
    assert probe.frozen_dtypes == {BF16}
    assert all(_identical(before[m], _state(getattr(pipe, m))) for m in before)  # the input pipeline never changes
    surrogate = cloak.surrogate.state_dict()
    assert {v.dtype for v in surrogate.values() if v.is_floating_point()} == {torch.float32}
    assert _changed(before["unet"], surrogate)  # the surrogate's learning was kept


# ------------------------------------------------------------------------------------------------ saving


def test_trained_half_pipeline_saves_one_dtype_with_what_it_learned(bf16_pipe, subject_dir, tmp_path):
    from safetensors.torch import load_file

    from noclone.attacks.base import PersonalizationConfig
    from noclone.attacks.dreambooth import DreamBooth

    before = _state(bf16_pipe.unet)
    config = PersonalizationConfig(class_noun="person", steps=2, lr=LR, batch_size=1, prior_preservation=False,
                                   progress=False)
    out = DreamBooth(config).run(bf16_pipe, subject_dir, tmp_path / "db")
    saved = {m: load_file(str(next((out / m).glob("*.safetensors")))) for m in ("unet", "vae", "text_encoder")}
    assert {t.dtype for part in saved.values() for t in part.values() if t.is_floating_point()} == {torch.float32}
    assert all(torch.equal(saved["unet"][k], v) for k, v in _state(bf16_pipe.unet).items())
    assert len(_changed(before, saved["unet"])) > 0.9 * len(before)  # the lr 5e-6 steps are in the saved weights
