"""Load and save Stable Diffusion pipelines: local files only, no pickle unless allowed, device/dtype policy.

Accepted inputs: a diffusers directory (`model_index.json`), a noclone single-file `.safetensors` (components'
diffusers weights plus their configs in the header), or an original-layout single-file checkpoint (`.safetensors`,
or `.ckpt` with --allow-pickle) converted by diffusers given a local diffusers `config` directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from noclone.data.atomic import atomic_output_dir
from noclone.errors import NocloneError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
_SINGLE_FILE_TAG = "noclone_single_file"
_COMPONENTS = ("unet", "vae", "text_encoder")


def resolve_device(device: str | None = None) -> torch.device:
    """'auto' or None picks cuda, then mps, then cpu."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise NocloneError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise NocloneError(f"device {device!r} requested but CUDA is not available in this torch build")
    return resolved


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """'auto' or None: bf16 on CUDA when supported else fp16, fp16 on MPS, fp32 on CPU."""
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    if dtype not in names:
        raise NocloneError(f"unknown dtype {dtype!r}; use auto, fp32, fp16 or bf16")
    if device.type == "cpu" and names[dtype] == torch.float16:
        raise NocloneError("fp16 is not supported for CPU work; use fp32 or bf16")
    return names[dtype]


def load_pipeline(
    path: str | Path,
    *,
    device: str | None = "cpu",
    dtype: str | None = None,
    allow_pickle: bool = False,
    config: str | Path | None = None,
    gradient_checkpointing: bool = False,
):
    """Load a StableDiffusionPipeline from local files, placed on the device with the policy's dtype."""
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    if not path.exists():
        raise NocloneError(f"{path}: no such model file or directory")
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise NocloneError(f"{path}/: not a diffusers pipeline directory (no model_index.json)")
        has_safetensors = any(path.glob("*/*.safetensors"))
        if not has_safetensors and not allow_pickle:
            raise NocloneError(f"{path}/: weights are pickle files (.bin); refused unless --allow-pickle is given")
        pipe = StableDiffusionPipeline.from_pretrained(
            str(path), local_files_only=True, dtype=torch_dtype, use_safetensors=has_safetensors,
            safety_checker=None, requires_safety_checker=False,
        )
    elif path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise NocloneError(f"{path}: pickle checkpoint refused (it can run arbitrary code); pass --allow-pickle if you trust it")
    elif path.suffix.lower() == ".safetensors" and _is_noclone_single_file(path):
        pipe = _load_noclone_single_file(path, torch_dtype)
    elif path.suffix.lower() in (".safetensors",) + PICKLE_SUFFIXES:
        if config is None:
            raise NocloneError(f"{path}: an original-layout checkpoint needs --config DIR (a local diffusers directory of the same architecture)")
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(config), local_files_only=True, dtype=torch_dtype,
            safety_checker=None, requires_safety_checker=False,
        )
    else:
        raise NocloneError(f"{path}: unsupported model format (expected a diffusers directory or a .safetensors file)")
    pipe.set_progress_bar_config(disable=True)
    use_sdpa(pipe)
    if gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        pipe.text_encoder.gradient_checkpointing_enable()
    pipe.noclone_fingerprint = model_fingerprint(pipe)
    return pipe.to(target)


def load_lora(pipe, path: str, allow_pickle: bool = False) -> None:
    """Load diffusers-format LoRA weights from a local directory or .safetensors file."""
    lora = Path(path)
    if not lora.exists():
        raise NocloneError(f"{lora}: no such LoRA file or directory")
    files = [lora] if lora.is_file() else sorted(lora.glob("*.safetensors"))
    if not files:
        if any(lora.glob("*.bin")) and not allow_pickle:
            raise NocloneError(f"{lora}/: LoRA weights are pickle files (.bin); refused unless --allow-pickle is given")
        raise NocloneError(f"{lora}/: no LoRA weights (*.safetensors) found")
    if files[0].suffix != ".safetensors" and not allow_pickle:
        raise NocloneError(f"{lora}: pickle LoRA file refused; pass --allow-pickle if you trust it")
    pipe.load_lora_weights(str(files[0].parent), weight_name=files[0].name)


def use_sdpa(pipe) -> None:
    """Route UNet and VAE attention through torch's scaled_dot_product_attention."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())


def model_fingerprint(pipe) -> str:
    """Content hash of the UNet, VAE, text encoder weights and the tokenizer vocabulary (16 hex chars)."""
    cached = getattr(pipe, "noclone_fingerprint", None)
    digest = hashlib.sha256()
    for name in _COMPONENTS:
        state = getattr(pipe, name).state_dict()
        for key in sorted(state):
            tensor = state[key].detach()
            digest.update(f"{name}.{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(str(len(pipe.tokenizer)).encode())
    fingerprint = digest.hexdigest()[:16]
    if cached is not None and cached != fingerprint:
        log.debug("fingerprint changed since load: %s -> %s", cached, fingerprint)
    return fingerprint


def save_pipeline(pipe, out: str | Path, *, single_file: str | Path | None = None, overwrite: bool = False,
                  extra_files: dict[str, str] | None = None, max_shard_size: str | None = None) -> Path:
    """Write a diffusers directory loadable by stock `StableDiffusionPipeline.from_pretrained`, atomically.

    The text encoder is always written in fp32; the UNet and VAE keep the pipeline's dtype. Stock loading with
    default arguments then gives one dtype: diffusers loads its models in fp32 whatever their stored dtype, while
    transformers 5 keeps a model's saved dtype (its config's `dtype`), so an fp16 text encoder beside an fp32 UNet
    fails ("mat1 and mat2 must have the same dtype") and diffusers' DreamBooth script refuses it for
    --train_text_encoder. The values are the pipeline's own, upcast exactly.
    `extra_files` maps relative names to text written beside it (cards such as protection.json); `max_shard_size`
    (e.g. "15MB") splits large weight files. `single_file` also writes one noclone-format `.safetensors` with every component.
    """
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True,
                             **({"max_shard_size": max_shard_size} if max_shard_size else {}))
        if getattr(pipe, "text_encoder", None) is not None:
            write_text_encoder_fp32(pipe.text_encoder, tmp / "text_encoder")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    if single_file is not None:
        save_single_file(pipe, single_file)
    return Path(out)


def write_text_encoder_fp32(text_encoder, folder: str | Path) -> Path:
    """(Re)write a transformers text encoder into `folder` with fp32 weights and `"dtype": "float32"` in its config,
    so `CLIPTextModel.from_pretrained` with default arguments gives fp32 (transformers 5 loads the saved dtype).
    The model in memory is left as it is; a text encoder already all-fp32 is written unchanged."""
    folder = Path(folder)
    state = text_encoder.state_dict()
    if all(not t.is_floating_point() or t.dtype == torch.float32 for t in state.values()) \
            and (folder / "config.json").is_file():
        return folder
    for stale in folder.glob("model*.safetensors*"):  # a sharded or differently named earlier write
        stale.unlink()
    fp32 = {k: (v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().to("cpu"))
            for k, v in state.items()}
    text_encoder.save_pretrained(str(folder), state_dict=fp32, safe_serialization=True)
    config_file = folder / "config.json"  # save_pretrained records the model's in-memory dtype: say what was written
    config = json.loads(config_file.read_text())
    config["dtype"] = "float32"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def save_single_file(pipe, path: str | Path) -> Path:
    """One `.safetensors` with `unet.*`, `vae.*`, `text_encoder.*` weights and all configs in its metadata."""
    from safetensors.torch import save_file

    from noclone.data.atomic import atomic_write_bytes

    path = Path(path)
    if path.suffix != ".safetensors":
        raise NocloneError(f"{path}: single-file output must end in .safetensors")
    tensors = {}
    for name in _COMPONENTS:
        for key, value in getattr(pipe, name).state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().to("cpu").contiguous()
    with tempfile.TemporaryDirectory() as tok_dir:
        pipe.tokenizer.save_pretrained(tok_dir)
        tokenizer_files = {f.name: f.read_text() for f in Path(tok_dir).iterdir() if f.is_file()}
    metadata = {
        _SINGLE_FILE_TAG: "1",
        "unet_config": json.dumps(dict(pipe.unet.config)),
        "vae_config": json.dumps(dict(pipe.vae.config)),
        "text_encoder_config": pipe.text_encoder.config.to_json_string(),
        "scheduler_config": json.dumps(dict(pipe.scheduler.config)),
        "scheduler_class": type(pipe.scheduler).__name__,
        "tokenizer_files": json.dumps(tokenizer_files),
    }
    with tempfile.TemporaryDirectory(dir=path.parent if path.parent.exists() else None) as tmp:
        tmp_file = Path(tmp) / "model.safetensors"
        save_file(tensors, str(tmp_file), metadata=metadata)
        atomic_write_bytes(path, lambda handle: shutil.copyfileobj(tmp_file.open("rb"), handle))
    return path


def _is_noclone_single_file(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get(_SINGLE_FILE_TAG) == "1"
    except Exception as exc:  # a corrupt header is the user's file problem, say so
        raise NocloneError(f"{path}: not a readable safetensors file ({exc})") from None


def _load_noclone_single_file(path: Path, torch_dtype: torch.dtype):
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel

    from noclone.models.tokenizer import load_clip_tokenizer

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        state = {key: handle.get_tensor(key) for key in handle.keys()}

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}

    unet = UNet2DConditionModel.from_config(json.loads(meta["unet_config"]))
    unet.load_state_dict(part("unet"))
    vae = AutoencoderKL.from_config(json.loads(meta["vae_config"]))
    vae.load_state_dict(part("vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig(**json.loads(meta["text_encoder_config"])))
    text_encoder.load_state_dict(part("text_encoder"), strict=False)
    scheduler = getattr(diffusers, meta["scheduler_class"]).from_config(json.loads(meta["scheduler_config"]))
    with tempfile.TemporaryDirectory() as tok_dir:
        for name, text in json.loads(meta["tokenizer_files"]).items():
            Path(tok_dir, name).write_text(text)
        tokenizer = load_clip_tokenizer(tok_dir)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return pipe.to(dtype=torch_dtype)
