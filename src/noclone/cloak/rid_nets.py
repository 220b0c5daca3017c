r"""The two RID generator architectures: image [N, 3, H, W] in [-1, 1] -> unbounded map of the same shape.

RID applies delta = eta * tanh(net(x)); both nets end in a zero-initialised layer, so delta starts at 0.

- `ConvNet` ('conv', the default): a small residual U-Net (pixel-unshuffle stem, two stride-2 levels, GroupNorm
  residual blocks, skip connections, pixel-shuffle head). Fully convolutional: any H, W (padded by replication to
  a multiple of 8 and cropped back). About 0.6 M parameters (1.2 MB in fp16), ~0.15 GMAC per 64 px image.
- `DiT` ('dit', the paper's shape): patchify (patch p) -> transformer blocks with adaLN-Zero -> linear head ->
  unpatchify. The paper conditions every block on an all-zero vector c, so the modulation MLP(c) reduces to its
  bias: we store those per-block modulation vectors directly (same function; the paper's 342 M-parameter shape
  becomes ~232 M because the MLP weights that only ever multiply zero are dropped). 2D sin-cos position embeddings
  are computed for the input's patch grid, so any size works (padded to a multiple of p).
- 'dit-paper': the DiT with the paper's shape `DIT_PAPER` (patch 16, hidden 1152, depth 14, 8 heads; trained at
  512 px), selectable by name (`noclone rid train --arch dit-paper`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from noclone.errors import NocloneError

ARCHS = ("conv", "dit", "dit-paper")
# the paper's generator: DiT with patch 16, hidden 1152, depth 14, 8 heads, MLP ratio 4, at 512 px
DIT_PAPER = dict(patch=16, hidden=1152, depth=14, heads=8, mlp_ratio=4.0)
DIT_PAPER_RESOLUTION = 512


def _pad_to(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, (h, w)


class ResBlock(nn.Module):
    def __init__(self, channels: int, groups: int = 8):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ConvNet(nn.Module):
    """Light residual U-Net: [N, 3, H, W] -> [N, 3, H, W]."""

    def __init__(self, channels: int = 32, blocks: int = 1):
        super().__init__()
        c = channels
        self.stem = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(12, c, 3, padding=1))  # H/2
        self.enc1 = nn.Sequential(*[ResBlock(c) for _ in range(blocks)])
        self.down1 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)                          # H/4
        self.enc2 = nn.Sequential(*[ResBlock(2 * c) for _ in range(blocks)])
        self.down2 = nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1)                      # H/8
        self.mid = nn.Sequential(*[ResBlock(4 * c) for _ in range(blocks)])
        self.up2 = nn.Conv2d(4 * c, 2 * c, 3, padding=1)
        self.dec2 = nn.Sequential(*[ResBlock(2 * c) for _ in range(blocks)])
        self.up1 = nn.Conv2d(2 * c, c, 3, padding=1)
        self.dec1 = nn.Sequential(*[ResBlock(c) for _ in range(blocks)])
        self.head = nn.Sequential(nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, 12, 3, padding=1), nn.PixelShuffle(2))
        nn.init.zeros_(self.head[2].weight)
        nn.init.zeros_(self.head[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, (h, w) = _pad_to(x, 8)
        s1 = self.enc1(self.stem(x))
        s2 = self.enc2(self.down1(s1))
        m = self.mid(self.down2(s2))
        d2 = self.dec2(self.up2(F.interpolate(m, scale_factor=2.0, mode="nearest")) + s2)
        d1 = self.dec1(self.up1(F.interpolate(d2, scale_factor=2.0, mode="nearest")) + s1)
        return self.head(d1)[..., :h, :w]


def sincos_2d(dim: int, gh: int, gw: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embeddings [gh * gw, dim] (as in DiT / MAE), for any grid."""
    if dim % 4:
        raise NocloneError(f"DiT hidden size {dim} must be a multiple of 4")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij")

    def embed(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([embed(xs), embed(ys)], dim=1).float()


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block; the modulation (shift, scale, gate) x 2 is a learned vector (c = 0)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        inner = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden))
        self.modulation = nn.Parameter(torch.zeros(6, hidden))  # zero: every block starts as the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation
        n, length, d = x.shape
        qkv = self.qkv(_modulate(self.norm1(x), shift1, scale1)).reshape(n, length, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, d)
        x = x + gate1 * self.proj(attn)
        return x + gate2 * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """Image-to-image DiT: [N, 3, H, W] -> [N, 3, H, W] (zero-initialised head)."""

    def __init__(self, patch: int = 8, hidden: int = 192, depth: int = 4, heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        if hidden % heads:
            raise NocloneError(f"DiT hidden size {hidden} must be divisible by heads {heads}")
        self.patch, self.hidden = patch, hidden
        self.embed = nn.Conv2d(3, hidden, patch, stride=patch)
        self.blocks = nn.ModuleList([DiTBlock(hidden, heads, mlp_ratio) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Parameter(torch.zeros(2, hidden))
        self.head = nn.Linear(hidden, patch * patch * 3)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, (h, w) = _pad_to(x, self.patch)
        n, _, hp, wp = x.shape
        gh, gw, p = hp // self.patch, wp // self.patch, self.patch
        tokens = self.embed(x).flatten(2).transpose(1, 2) + sincos_2d(self.hidden, gh, gw).to(x.device, x.dtype)
        for block in self.blocks:
            tokens = block(tokens)
        shift, scale = self.final_modulation
        out = self.head(_modulate(self.final_norm(tokens), shift, scale))     # [N, gh*gw, p*p*3]
        out = out.reshape(n, gh, gw, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(n, 3, hp, wp)
        return out[..., :h, :w]


def build_net(arch: str, **kwargs) -> nn.Module:
    """A generator body by architecture name ('conv', 'dit' or 'dit-paper': the DiT, by default of the paper's
    shape) and its keyword arguments."""
    if arch == "conv":
        return ConvNet(**kwargs)
    if arch == "dit":
        return DiT(**kwargs)
    if arch == "dit-paper":
        return DiT(**{**DIT_PAPER, **kwargs})
    raise NocloneError(f"unknown RID architecture {arch!r}; choose from {', '.join(ARCHS)}")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def paper_dit_parameters() -> int:
    """Parameter count of the paper-shaped DiT without building it (for docs/tests): ~232 M."""
    d, p, r = DIT_PAPER["hidden"], DIT_PAPER["patch"], DIT_PAPER["mlp_ratio"]
    inner = int(d * r)
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * inner + inner) + (inner * d + d) + 6 * d
    return (3 * p * p * d + d) + DIT_PAPER["depth"] * block + 2 * d + (d * p * p * 3 + p * p * 3)


__all__ = ["ARCHS", "DIT_PAPER", "DIT_PAPER_RESOLUTION", "ConvNet", "DiT", "build_net", "count_parameters", "paper_dit_parameters"]
