"""What every model-level defence shares: the subjects it protects, its card, and the simulated attacker.

- `ProtectionSubject`: one subject's photos (loaded with the attacks' loader), class noun and identifier token; its
  fingerprint is the SHA-256 of each photo file, never the photos.
- `protection_card` / `read_protection_card`: the `protection.json` written beside a protected pipeline (method,
  subjects' photo hashes, classes, tokens, hyperparameters, seed, noclone version, model fingerprints, metrics).
- `simulate_personalization`: N AdamW DreamBooth steps (or any loss) on the trainable parameters, with a callback
  after each step so a defence can take its protection gradient at every state of the attacker's path.
- `select_parameters`: which UNet weights a defence changes ('full', 'attention' = cross-attention, 'lora').
- checkpoint marker: a resumed run must be the same run (settings, subjects, base model).
- `Reference` (the frozen input UNet both methods compare against) and `make_optimizer` (AdamW, or bitsandbytes'
  8-bit AdamW), with the run-level choices both configs validate against (REFERENCE_DTYPES, OPTIMIZERS, ...).
- several processes (`accelerate launch`, noclone.training.distributed): `check_processes` refuses what they
  cannot run, `outer_step_gradients` turns each process's share of the subjects into the gradient the training
  loop averages.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from noclone.attacks.base import PersonalizationConfig, PromptTemplates, load_subject_images, subject_fingerprint
from noclone.errors import NocloneError
from noclone.training.precision import cast_parameters, upcast_trainable

log = logging.getLogger(__name__)

CARD_NAME = "protection.json"
PARAM_SETS = ("full", "attention", "lora")
OPTIMIZERS = ("adamw", "adamw8bit")
MULTI_SUBJECT = ("cycle", "sum")
# the frozen reference's dtype (params='full' only: otherwise the reference is the live UNet); 'same' keeps the UNet's
REFERENCE_DTYPES = {"same": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ProtectionSubject(PromptTemplates):
    """One subject to protect: its photos, class noun and the identifier token an attacker is assumed to use."""

    images: list[Image.Image]
    class_noun: str
    token: str = "sks"
    photo_sha256: list[str] = field(default_factory=list)
    template: str = "a photo of {token} {class_noun}"
    class_template: str = "a photo of a {class_noun}"
    positives: list[Image.Image] = field(default_factory=list)  # photos of other members of the class (APDM)
    positive_sha256: list[str] = field(default_factory=list)
    anchors: list[Image.Image] = field(default_factory=list)  # other members of the class to keep as they were (APDM)
    anchor_sha256: list[str] = field(default_factory=list)

    @classmethod
    def from_folder(cls, folder: str | Path, class_noun: str, token: str = "sks",
                    positives: str | Path | None = None, anchors: str | Path | None = None) -> "ProtectionSubject":
        if not class_noun or not class_noun.strip():
            raise NocloneError("--class-noun must not be empty")
        if not token.strip() or " " in token:
            raise NocloneError(f"--token {token!r} must be one non-empty word")
        paths, images = load_subject_images(folder)
        subject = cls(images, class_noun.strip(), token, subject_fingerprint(paths))
        if positives is not None:
            positive_paths, subject.positives = load_subject_images(positives)
            subject.positive_sha256 = subject_fingerprint(positive_paths)
        if anchors is not None:
            anchor_paths, subject.anchors = load_subject_images(anchors)
            subject.anchor_sha256 = subject_fingerprint(anchor_paths)
        return subject

    @property
    def fingerprint(self) -> str:
        """One hash of the (sorted) photo hashes, class and token: identifies the subject in cards and checkpoints."""
        text = json.dumps([sorted(self.photo_sha256), self.class_noun, self.token]
                          + ([sorted(self.positive_sha256)] if self.positive_sha256 else [])
                          + ([["anchors"] + sorted(self.anchor_sha256)] if self.anchor_sha256 else []))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def personalization_config(self, **settings) -> PersonalizationConfig:
        """The attacker's DreamBooth settings for this subject (what the simulated personalization path runs)."""
        return PersonalizationConfig(class_noun=self.class_noun, token=self.token, template=self.template,
                                     class_template=self.class_template, **settings)

    def card(self) -> dict:
        """What protection.json says about the subject: hashes and prompts, never image data."""
        return {"class_noun": self.class_noun, "token": self.token, "instance_prompt": self.instance_prompt,
                "class_prompt": self.class_prompt, "n_photos": len(self.images), "photo_sha256": list(self.photo_sha256),
                **({"positive_sha256": list(self.positive_sha256)} if self.positive_sha256 else {}),
                **({"anchor_sha256": list(self.anchor_sha256)} if self.anchor_sha256 else {}),
                "fingerprint": self.fingerprint}


def protection_card(method: str, subjects: Sequence[ProtectionSubject], hyperparameters: dict, seed: int,
                    base_model_fingerprint: str, protected_model_fingerprint: str | None = None,
                    metrics: dict | None = None, previous: dict | None = None, extra: dict | None = None) -> dict:
    """The protection.json content. `previous` is the card of an already protected input model (kept as history)."""
    from noclone import __version__

    card = {
        "method": method,
        "noclone_version": __version__,
        "seed": seed,
        "base_model_fingerprint": base_model_fingerprint,
        "protected_model_fingerprint": protected_model_fingerprint,
        "subjects": [s.card() for s in subjects],
        "hyperparameters": hyperparameters,
    }
    if metrics:
        card["metrics"] = metrics
    if previous is not None:
        card["previous_protection"] = previous
    if extra:
        card.update(extra)
    return card


def read_protection_card(model: str | Path | None) -> dict | None:
    """The protection.json of a model directory, or None (not a directory, or never protected)."""
    if model is None:
        return None
    path = Path(model)
    card = path / CARD_NAME if path.is_dir() else None
    if card is None or not card.is_file():
        return None
    try:
        return json.loads(card.read_text())
    except (OSError, ValueError) as exc:
        raise NocloneError(f"{card}: unreadable protection card ({exc})") from None


def earlier_subjects(card: dict | None) -> list[dict]:
    """Every subject protected in the history of a card (most recent first, duplicates by fingerprint removed)."""
    found, seen = [], set()
    while card:
        for subject in card.get("subjects", []):
            key = subject.get("fingerprint") or json.dumps(subject.get("photo_sha256"))
            if key not in seen:
                seen.add(key)
                found.append(subject)
        card = card.get("previous_protection")
    return found


# ------------------------------------------------------------------------------------------ trainable weights


def select_parameters(unet, params: str, lora_rank: int = 4) -> dict[str, torch.nn.Parameter]:
    """Make only the chosen UNet weights trainable and return them by name.

    'full': every UNet weight (the paper). 'attention': the cross-attention blocks (`attn2`, text -> image), as
    Custom Diffusion trains. 'lora': a rank-r LoRA adapter on the attention projections (merge it with
    `merge_lora` before saving).
    """
    if params not in PARAM_SETS:
        raise NocloneError(f"unknown parameter set {params!r}; choose from {', '.join(PARAM_SETS)}")
    unet.requires_grad_(False)
    if params == "lora":
        from noclone.attacks.lora import add_lora

        add_lora(unet, lora_rank)
        chosen = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    elif params == "attention":
        chosen = {n: p for n, p in unet.named_parameters() if ".attn2." in n}
    else:
        chosen = dict(unet.named_parameters())
    if not chosen:
        raise NocloneError(f"parameter set {params!r} selects no weight of this UNet")
    for p in chosen.values():
        p.requires_grad_(True)
    return chosen


def merge_lora(unet) -> None:
    """Fold a LoRA adapter into the UNet weights and remove it: the result saves as a stock UNet. Adapters trained
    as fp32 master weights beside a half UNet are folded into it in fp32 (settle the pipeline afterwards)."""
    if getattr(unet, "peft_config", None):
        if any(p.dtype == torch.float32 for n, p in unet.named_parameters() if "lora_" in n):
            torch.nn.Module.to(unet, torch.float32)  # rounding the merged weights to half would undo small steps
        unet.fuse_lora()
        unet.unload_lora()


# ------------------------------------------------------------------------------ simulated personalization


def simulate_personalization(
    params: dict[str, torch.nn.Parameter],
    personalization_loss: Callable[[int], torch.Tensor],
    steps: int,
    lr: float,
    on_step: Callable[[int], None] | None = None,
    *,
    text_encoder: torch.nn.Module | None = None,
    text_lr: float | None = None,
    keep_personalization_grads: bool = False,
    weight_decay: float = 1e-2,
    max_grad_norm: float | None = 1.0,
) -> list[float]:
    """The attacker's path, simulated: `steps` AdamW steps of `personalization_loss(i)` on `params`, then restored.

    The steps run in place on the module that owns `params` (only the trainable weights are snapshotted and put
    back afterwards, even on an exception), so it behaves as if run on a deepcopy while copying only the trainable
    parameters. With `text_encoder`, the attacker fine-tunes it too (at `text_lr`, default `lr`), as the sandbox
    DreamBooth does; it is in train mode during the path (so prompt caches are bypassed) and restored, frozen and
    in eval mode, afterwards. The optimizer is fresh each call. After inner step i the weights are theta'_{i+1};
    then `on_step(i)` runs: a defence computes its loss there, calls backward() and reads each parameter's `.grad`.
    Before `on_step` the personalization gradients are cleared, unless `keep_personalization_grads` (APDM's
    official-code behaviour: `.grad` then holds grad L_per(theta'_i) + what on_step adds).
    Returns the personalization losses. The parameters' `.grad` are None afterwards. The path trains fp32 master
    weights (half ones are upcast for it and cast back after; noclone.training.precision).
    """
    named = list(params.items())
    text_named = list(text_encoder.named_parameters()) if text_encoder is not None else []
    snapshot = {name: p.detach().clone() for name, p in named}
    text_snapshot = [p.detach().clone() for _, p in text_named]
    groups = [{"params": [p for _, p in named], "lr": lr}]
    if text_named:
        text_encoder.train().requires_grad_(True)
        groups.append({"params": [p for _, p in text_named], "lr": text_lr or lr})
    everything = [p for group in groups for p in group["params"]]
    dtypes = [p.dtype for p in everything]
    upcast_trainable(everything)
    optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay)
    losses: list[float] = []
    try:
        for i in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = personalization_loss(i)
            if not torch.isfinite(loss):
                raise NocloneError(f"simulated personalization: loss became {loss.item()} at inner step {i}")
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(everything, max_grad_norm)
            optimizer.step()
            losses.append(float(loss.detach()))
            if not keep_personalization_grads:
                optimizer.zero_grad(set_to_none=True)
            for _, p in text_named:  # the defence's gradient is for the UNet weights only
                p.grad = None
            if on_step is not None:
                on_step(i)
    finally:
        with torch.no_grad():
            for name, p in named:
                p.copy_(snapshot[name])
                p.grad = None
            for (_, p), value in zip(text_named, text_snapshot):
                p.copy_(value)
                p.grad = None
        for p, dtype in zip(everything, dtypes):
            cast_parameters([p], dtype)
        if text_encoder is not None:
            text_encoder.eval().requires_grad_(False)
        del optimizer
    return losses


class PersistentAttacker:
    """A simulated attacker that keeps its progress across outer steps (deep backdoor retention).

    `simulate_personalization` restarts from theta at every outer step, so a defence only sees the first N states
    of an attack. This attacker's weights are theta + delta, where delta (its displacement) and its AdamW state
    carry over from one call to the next: each call takes N more steps from theta + delta, so after k calls the
    defence sees depth k*N of an attack that follows the defence's own updates of theta. It restarts (delta = 0,
    fresh AdamW) once it has taken `horizon` steps. `state_dict` / `load_state_dict` let a checkpoint resume it.
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], lr: float, horizon: int, *,
                 weight_decay: float = 1e-2, max_grad_norm: float | None = 1.0):
        if horizon < 1:
            raise NocloneError(f"the persistent attacker's horizon {horizon} must be at least 1")
        self.params, self.lr, self.horizon = params, lr, horizon
        self.weight_decay, self.max_grad_norm = weight_decay, max_grad_norm
        self.depth = 0
        self.delta: dict[str, torch.Tensor] = {}
        self.optimizer = self._fresh_optimizer()

    def _fresh_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(list(self.params.values()), lr=self.lr, weight_decay=self.weight_decay)

    def run(self, personalization_loss: Callable[[int], torch.Tensor], steps: int,
            on_step: Callable[[int], None] | None = None) -> list[float]:
        """`steps` more attacker steps from theta + delta, `on_step(i)` after each; theta is restored afterwards."""
        if self.depth >= self.horizon:
            self.depth, self.delta, self.optimizer = 0, {}, self._fresh_optimizer()
        named = list(self.params.items())
        snapshot = {name: p.detach().clone() for name, p in named}
        losses: list[float] = []
        try:
            with torch.no_grad():
                for name, p in named:
                    if name in self.delta:
                        p.add_(self.delta[name])
            for i in range(steps):
                self.optimizer.zero_grad(set_to_none=True)
                loss = personalization_loss(i)
                if not torch.isfinite(loss):
                    raise NocloneError(f"simulated personalization: loss became {loss.item()} at depth {self.depth}")
                loss.backward()
                if self.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_([p for _, p in named], self.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.depth += 1
                losses.append(float(loss.detach()))
                if on_step is not None:
                    on_step(i)
            with torch.no_grad():
                self.delta = {name: p.detach() - snapshot[name] for name, p in named}
        finally:
            with torch.no_grad():
                for name, p in named:
                    p.copy_(snapshot[name])
                    p.grad = None
        return losses

    def state_dict(self) -> dict:
        return {"depth": self.depth, "delta": dict(self.delta), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        # checkpoints are read onto the CPU: the displacement goes back beside the weights it is added to
        self.depth = int(state["depth"])
        self.delta = {name: d.to(self.params[name].device) for name, d in state["delta"].items()}
        self.optimizer = self._fresh_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])


def add_grads_into(accumulator: dict[str, torch.Tensor], params: dict[str, torch.nn.Parameter],
                   scale: float = 1.0) -> None:
    """accumulator[name] += scale * params[name].grad (missing gradients count as zero)."""
    for name, p in params.items():
        if p.grad is None:
            continue
        if name in accumulator:
            accumulator[name].add_(p.grad, alpha=scale)
        else:
            accumulator[name] = p.grad.detach().clone() if scale == 1.0 else p.grad.detach() * scale


def to_cpu(obj):
    """`obj` with every tensor in it (nested dicts, lists, tuples) moved to the CPU: what one process sends
    another, which may not see its GPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


# ------------------------------------------------------------------------------------------- several processes


def check_processes(dist, multi_subject: str, n_subjects: int, implant: str) -> None:
    """Refuse, before any work, what a defence cannot run on several processes (`dist`: `current()`)."""
    if not dist.enabled:
        return
    if implant != "unet":
        raise NocloneError(f"--implant {implant}: the decoder guard runs on one process only; run it without "
                           "`accelerate launch`, or with --implant unet")
    if multi_subject == "sum" and n_subjects < dist.world_size:
        raise NocloneError(f"--multi-subject sum gives each process whole subjects: {n_subjects} subject(s) cannot "
                           f"keep {dist.world_size} processes busy; launch at most {n_subjects} processes")


def log_subject_split(dist, multi_subject: str, n_subjects: int, label: str) -> None:
    """Say on the main process how the outer steps' subjects are spread over the processes."""
    if not dist.enabled or not dist.is_main:
        return
    if multi_subject == "sum":
        log.info("%s: %d subjects spread over %d processes (subject k on process k mod %d)", label, n_subjects,
                 dist.world_size, dist.world_size)
    else:
        log.info("%s: --multi-subject cycle protects one subject per outer step, so all %d processes compute the "
                 "same step (correct, but no faster than one); --multi-subject sum spreads the subjects over them",
                 label, dist.world_size)


def outer_step_gradients(params: dict[str, torch.nn.Parameter], grads: dict[str, torch.Tensor],
                         stats: dict[str, list[float]], dist, sharded: bool, mean: bool = False) -> dict[str, torch.Tensor]:
    """Set each parameter's `.grad` from `grads` (this process's sum over its subjects' gradient terms) and return
    the step's logged means of `stats` (one list of values per key; "loss" has one value per gradient term).

    `mean`: the gradient is the mean over the gradient terms instead of their sum. `sharded`: the subjects are
    spread over the processes (`dist.owned`); `run_training` then averages `.grad` over the processes, so each
    process's sum is multiplied by the number of processes (and divided by the number of terms of all of them), and
    the logged values are scaled the same way: their average over processes is the mean over every subject. On one
    process this is `grad = g` (or `g / terms`) and plain means, as before processes existed. `grads`' tensors are
    scaled in place (they are the step's own accumulators)."""
    keys, world = list(stats), 1
    if sharded and dist.enabled:
        world = dist.world_size
        # a key only some subjects log (e.g. "anchor") must be in every process's record, in one order
        keys = sorted({k for r in range(world) for k in dist.broadcast_object(keys, src=r)})
        counts = dist.all_reduce_sum(torch.tensor([float(len(stats.get(k, ()))) for k in keys])).tolist()
    else:
        counts = [len(stats[k]) for k in keys]
    terms = counts[keys.index("loss")]
    for name, p in params.items():
        g = grads.get(name)
        if g is not None:
            if world != 1:
                g.mul_(world)
            if mean:
                g.div_(terms)
        p.grad = g
    return {k: torch.tensor(sum(stats.get(k, ())) * world / n) for k, n in zip(keys, counts)}


# -------------------------------------------------------------------------------------------- checkpoints


def config_from_preset(cls, name: str, label: str, overrides: dict):
    """`cls(**cls.PRESETS[name])` with `overrides` applied; unknown presets or settings are one-line errors."""
    from dataclasses import fields, replace

    if name not in cls.PRESETS:
        raise NocloneError(f"unknown {label} preset {name!r}; choose from {', '.join(cls.PRESETS)}")
    unknown = set(overrides) - {f.name for f in fields(cls)}
    if unknown:
        raise NocloneError(f"unknown {label} settings: {', '.join(sorted(unknown))}")
    return replace(cls(**cls.PRESETS[name]), **overrides)


def check_checkpoint(directory: Path, identity: dict) -> None:
    """Refuse to resume a checkpoint written by another run (settings, subjects or base model differ)."""
    marker = directory / "run_fingerprint.txt"
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    if marker.is_file() and marker.read_text().strip() != key:
        raise NocloneError(f"{directory}: checkpoint belongs to a run with other settings, subjects or base model; "
                           "delete it or change --out")
    directory.mkdir(parents=True, exist_ok=True)
    marker.write_text(key)


def frozen_copy(module: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A deep copy with no gradients, in eval mode, optionally cast (e.g. bf16 to halve a reference model)."""
    import copy

    clone = copy.deepcopy(module).requires_grad_(False).eval()
    # torch's Module.to: diffusers' override warns about casting a loaded model, which is what we mean here
    return torch.nn.Module.to(clone, dtype=dtype) if dtype is not None else clone



class Reference:
    """The UNet as it was before protection, never updated, called like a UNet (APDM's phi, PersGuard's f).

    params='full': a frozen deep copy (optionally bf16/fp16). Otherwise the live UNet evaluated with the
    original values of the trainable weights (the frozen rest is shared): no third UNet in memory.
    """

    def __init__(self, unet, trainable: dict[str, torch.nn.Parameter], full: bool, dtype: torch.dtype | None = None):
        self.unet = frozen_copy(unet, dtype) if full else unet
        # fp32, like the trainable weights they stand in for (master weights: noclone.training.precision)
        self.overrides = None if full else {n: p.detach().to(torch.float32, copy=True) for n, p in trainable.items()}

    @property
    def device(self):
        return self.unet.device

    @property
    def dtype(self):
        return self.unet.dtype

    def __call__(self, *args, **kwargs):
        if self.overrides is None:
            return self.unet(*args, **kwargs)
        return torch.func.functional_call(self.unet, self.overrides, args, kwargs, strict=False)

    def state(self) -> dict[str, torch.Tensor]:
        """What the reference is (for tests): its weights, or the frozen UNet weights plus the overrides."""
        if self.overrides is None:
            return {k: v.detach().clone() for k, v in self.unet.state_dict().items()}
        return {k: v.detach().clone() for k, v in self.overrides.items()}


def require_bitsandbytes():
    """The bitsandbytes module, or a one-line error saying how to install it (--optimizer adamw8bit)."""
    try:
        import bitsandbytes
    except ImportError:
        raise NocloneError("--optimizer adamw8bit needs the bitsandbytes package (pip install bitsandbytes)") from None
    return bitsandbytes


def make_optimizer(params, lr: float, weight_decay: float, kind: str = "adamw") -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (`kind` 'adamw8bit': both moment tensors 4x smaller)."""
    if kind == "adamw8bit":
        return require_bitsandbytes().optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
