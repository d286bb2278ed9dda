"""ADM networks (Dhariwal & Nichol 2021) with guided-diffusion's state-dict layout.

UNetModel (also the super-resolution variant) and EncoderUNetModel (the noisy
classifier).  Parameter names, shapes and registration order equal the original's,
so released `.pt` files load with strict matching.  Timesteps are the original
ones (0..T-1, int or float).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from .configs import ClassifierConfig, UNetConfig

GROUPS = 32


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(t f_i), sin(t f_i)], f_i = max_period^(-i/half); zero column if dim is odd."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def conv3x3(ch_in: int, ch_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(ch_in, ch_out, 3, stride=stride, padding=1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32) computed in fp32 whatever the surrounding dtype."""

    def __init__(self, channels: int):
        super().__init__(GROUPS, channels)

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def upsample2x(x):
    return F.interpolate(x, scale_factor=2, mode="nearest")


def downsample2x(x):
    return F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample(nn.Module):
    """Nearest 2x then 3x3 conv (levels joined without resblock_updown)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x):
        return self.conv(upsample2x(x))


class Downsample(nn.Module):
    """Stride-2 3x3 conv (levels joined without resblock_updown)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = conv3x3(channels, channels, stride=2)

    def forward(self, x):
        return self.op(x)


class ResBlock(nn.Module):
    """GN-SiLU-conv, timestep FiLM (scale-shift) or add, GN-SiLU-dropout-conv, plus skip; optional 2x resample."""

    def __init__(self, ch_in: int, emb_dim: int, ch_out: int, dropout: float, scale_shift: bool,
                 resample: str | None = None):
        super().__init__()
        self.scale_shift = scale_shift
        self.resample = {None: None, "up": upsample2x, "down": downsample2x}[resample]
        self.in_layers = nn.Sequential(GroupNorm32(ch_in), nn.SiLU(), conv3x3(ch_in, ch_out))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * ch_out if scale_shift else ch_out))
        self.out_layers = nn.Sequential(
            GroupNorm32(ch_out), nn.SiLU(), nn.Dropout(dropout), zero_init(conv3x3(ch_out, ch_out)))
        self.skip_connection = nn.Identity() if ch_in == ch_out else nn.Conv2d(ch_in, ch_out, 1)

    def forward(self, x, emb):
        if self.resample is None:
            h = self.in_layers(x)
        else:  # resample between the activation and the conv, and the skip path alike
            h = self.resample(self.in_layers[:-1](x))
            h = self.in_layers[-1](h)
            x = self.resample(x)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        norm, rest = self.out_layers[0], self.out_layers[1:]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = rest(norm(h + e))
        return self.skip_connection(x) + h


def qkv_attention(qkv: torch.Tensor, heads: int, new_order: bool) -> torch.Tensor:
    """[B, 3*H*d, T] -> [B, H*d, T] softmax attention, scale 1/sqrt(d).

    Channel layout of qkv: new order = [q | k | v], each head-major; legacy order =
    per head [q_h | k_h | v_h].
    """
    b, _, length = qkv.shape
    q, k, v = split_qkv(qkv, heads, new_order)
    out = F.scaled_dot_product_attention(q, k, v)  # [B, H, T, d]
    return out.permute(0, 1, 3, 2).reshape(b, -1, length)


def split_qkv(qkv: torch.Tensor, heads: int, new_order: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, 3*H*d, T] -> q, k, v each [B, H, T, d] with d contiguous, for either channel layout.

    One copy puts channels last; SDPA's fused CPU kernel needs the head dimension at stride 1 and otherwise
    falls back to explicit matmuls (2x slower on the 64x64 ADM with attention at 32x32).
    """
    b, width, length = qkv.shape
    d = width // (3 * heads)
    channels_last = qkv.transpose(1, 2).contiguous()  # [B, T, 3*H*d]
    if new_order:
        return channels_last.view(b, length, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    return channels_last.view(b, length, heads, 3, d).permute(3, 0, 2, 1, 4).unbind(0)


def legacy_to_new_qkv(param: torch.Tensor, heads: int) -> torch.Tensor:
    """Permute a legacy-order qkv weight/bias (rows h*3d + p*d + i) to new order (rows p*C + h*d + i)."""
    rows = param.shape[0]
    d = rows // (3 * heads)
    return param.reshape(heads, 3, d, *param.shape[1:]).transpose(0, 1).reshape(param.shape)


def _num_heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    if num_head_channels == -1:
        heads = num_heads
    else:
        if channels % num_head_channels:
            raise ValueError(f"{channels} channels are not divisible by num_head_channels {num_head_channels}")
        heads = channels // num_head_channels
    if heads < 1 or channels % heads:
        raise ValueError(f"{channels} channels cannot be split into {heads} attention heads")
    return heads


class AttentionBlock(nn.Module):
    """Self-attention over all pixels, residual."""

    def __init__(self, channels: int, heads: int, new_order: bool):
        super().__init__()
        self.heads, self.new_order = heads, new_order
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_init(nn.Conv1d(channels, channels, 1))

    def forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = qkv_attention(self.qkv(self.norm(x)), self.heads, self.new_order)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class AttentionPool2d(nn.Module):
    """CLIP-style pooling: the mean token attends to all pixels (new qkv order); returns its projection."""

    def __init__(self, grid: int, channels: int, head_channels: int, out_channels: int):
        super().__init__()
        self.heads = _num_heads(channels, 1, head_channels)
        self.positional_embedding = nn.Parameter(torch.randn(channels, grid * grid + 1) / channels ** 0.5)
        self.qkv_proj = nn.Conv1d(channels, 3 * channels, 1)
        self.c_proj = nn.Conv1d(channels, out_channels, 1)

    def forward(self, x):
        x = x.reshape(*x.shape[:2], -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding.to(x.dtype)
        x = qkv_attention(self.qkv_proj(x), self.heads, new_order=True)
        return self.c_proj(x)[:, :, 0]


class EmbedSequential(nn.Sequential):
    """Sequential that hands the timestep embedding to the ResBlocks in it."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


def _time_mlp(channels: int, emb_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))


def _down_path(cfg, in_channels: int, emb_dim: int, heads, new_order: bool):
    """input_blocks and middle_block shared by UNet and classifier; returns them, the skip widths and the width."""
    res = dict(emb_dim=emb_dim, dropout=cfg.dropout, scale_shift=cfg.use_scale_shift_norm)
    ch = int(cfg.channel_mult[0] * cfg.model_channels)
    blocks = [EmbedSequential(conv3x3(in_channels, ch))]
    skips, ds = [ch], 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers = [ResBlock(ch, ch_out=int(mult * cfg.model_channels), **res)]
            ch = int(mult * cfg.model_channels)
            if ds in cfg.attention_ds:
                layers.append(AttentionBlock(ch, heads(ch), new_order))
            blocks.append(EmbedSequential(*layers))
            skips.append(ch)
        if level < len(cfg.channel_mult) - 1:
            down = ResBlock(ch, ch_out=ch, resample="down", **res) if cfg.resblock_updown else Downsample(ch)
            blocks.append(EmbedSequential(down))
            skips.append(ch)
            ds *= 2
    middle = EmbedSequential(
        ResBlock(ch, ch_out=ch, **res), AttentionBlock(ch, heads(ch), new_order), ResBlock(ch, ch_out=ch, **res))
    return nn.ModuleList(blocks), middle, skips, ch, ds


class _TorsoDtype:
    """Mixed precision as the original: convs of the torso in half, norms/embeddings/head in fp32."""

    _torso_names: tuple[str, ...]

    @property
    def torso_dtype(self) -> torch.dtype:
        return self.input_blocks[0][0].weight.dtype

    def convert_torso(self, dtype: torch.dtype):
        for name in self._torso_names:
            for m in getattr(self, name).modules():
                if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                    m.to(dtype)
        return self

    def torso_copy(self, dtype: torch.dtype) -> nn.Module:
        """An inference copy with a `dtype` torso, channels-last (what oneDNN's bf16 convolutions want)."""
        module = copy.deepcopy(self).convert_torso(dtype)
        return module.to(memory_format=torch.channels_last).eval().requires_grad_(False)

    def convert_to_fp16(self):
        """Cast the Conv1d/Conv2d weights of the torso to float16 (guided-diffusion's use_fp16)."""
        return self.convert_torso(torch.float16)

    def convert_to_fp32(self):
        return self.convert_torso(torch.float32)

    def _embed(self, t: torch.Tensor, batch: int, device) -> torch.Tensor:
        t = torch.as_tensor(t, device=device)
        if t.ndim == 0:
            t = t.expand(batch)
        temb = timestep_embedding(t, self.cfg.model_channels).to(self.time_embed[0].weight.dtype)
        return self.time_embed(temb)


class UNetModel(_TorsoDtype, nn.Module):
    """ADM denoiser: forward(x, t, y=None, low_res=None) -> [B, out_channels, H, W] (eps, and v if learned sigma)."""

    _torso_names = ("input_blocks", "middle_block", "output_blocks")

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        emb_dim = 4 * cfg.model_channels
        heads_up = cfg.num_heads if cfg.num_heads_upsample == -1 else cfg.num_heads_upsample
        heads = lambda ch: _num_heads(ch, cfg.num_heads, cfg.num_head_channels)  # noqa: E731
        heads_out = lambda ch: _num_heads(ch, heads_up, cfg.num_head_channels)  # noqa: E731
        res = dict(emb_dim=emb_dim, dropout=cfg.dropout, scale_shift=cfg.use_scale_shift_norm)

        self.time_embed = _time_mlp(cfg.model_channels, emb_dim)
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_dim)
        in_channels = cfg.in_channels * (2 if cfg.super_res else 1)
        self.input_blocks, self.middle_block, skips, ch, ds = _down_path(
            cfg, in_channels, emb_dim, heads, cfg.use_new_attention_order)

        output_blocks = []
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                width = int(mult * cfg.model_channels)
                layers = [ResBlock(ch + skips.pop(), ch_out=width, **res)]
                ch = width
                if ds in cfg.attention_ds:
                    layers.append(AttentionBlock(ch, heads_out(ch), cfg.use_new_attention_order))
                if level and i == cfg.num_res_blocks:
                    layers.append(ResBlock(ch, ch_out=ch, resample="up", **res) if cfg.resblock_updown
                                  else Upsample(ch))
                    ds //= 2
                output_blocks.append(EmbedSequential(*layers))
        self.output_blocks = nn.ModuleList(output_blocks)
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), zero_init(conv3x3(ch, cfg.out_channels)))

    def forward(self, x, t, y=None, low_res=None):
        if self.cfg.super_res:
            if low_res is None:
                raise ValueError("a super-resolution model needs low_res")
            up = F.interpolate(low_res.to(x.dtype), size=x.shape[-2:], mode="bilinear",
                               align_corners=False, antialias=False)
            x = torch.cat([x, up], dim=1)
        elif low_res is not None:
            raise ValueError("low_res given to a model that is not a super-resolution model")
        if (y is not None) != (self.cfg.num_classes is not None):
            raise ValueError("class labels y must be given exactly when the model is class-conditional "
                             f"(num_classes={self.cfg.num_classes})")

        emb = self._embed(t, x.shape[0], x.device)
        if y is not None:
            emb = emb + self.label_emb(y)
        h = x.to(self.torso_dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.to(x.dtype))


class SuperResModel(UNetModel):
    """UNetModel conditioned on a low-resolution image: forward(x, t, low_res=..., y=...)."""

    def __init__(self, cfg: UNetConfig):
        if not cfg.super_res:
            raise ValueError("SuperResModel needs a UNetConfig with super_res=True")
        super().__init__(cfg)


class EncoderUNetModel(_TorsoDtype, nn.Module):
    """Noisy classifier: forward(x, t) -> logits [B, out_channels].

    With `cfg.signal_gate` the logits are multiplied by sqrt(abar_t). For x_t = sqrt(abar) x0 + sqrt(1 - abar) z,
    the true d/dx_t log p(y | x_t) = sqrt(abar) / (1 - abar) (E[x0 | x_t, y] - E[x0 | x_t]) vanishes with
    sqrt(abar); an ungated network trained by cross-entropy need not, and score-form guidance multiplies the
    gradient by (1 - abar) / sqrt(abar) (2e4 at the cosine schedule's last timestep) on its way to x0.
    """

    _torso_names = ("input_blocks", "middle_block")

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        emb_dim = 4 * cfg.model_channels
        heads = lambda ch: _num_heads(ch, 1, cfg.num_head_channels)  # noqa: E731
        self.time_embed = _time_mlp(cfg.model_channels, emb_dim)
        self.input_blocks, self.middle_block, _, ch, ds = _down_path(cfg, cfg.in_channels, emb_dim, heads, False)
        if cfg.pool == "attention":
            pool = AttentionPool2d(cfg.image_size // ds, ch, cfg.num_head_channels, cfg.out_channels)
            self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), pool)
        else:  # 'adaptive'
            self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
                                     zero_init(nn.Conv2d(ch, cfg.out_channels, 1)), nn.Flatten())
        self._gate_log_sigmas = None
        if cfg.signal_gate is not None:
            from explore.denoisers import log_sigma_table
            from explore.schedules import Schedule
            self._gate_log_sigmas = log_sigma_table(Schedule.named(cfg.signal_gate, cfg.signal_gate_steps))

    def forward(self, x, t):
        emb = self._embed(t, x.shape[0], x.device)
        h = x.to(self.torso_dtype)
        for block in self.input_blocks:
            h = block(h, emb)
        h = self.middle_block(h, emb)
        logits = self.out(h.to(x.dtype))
        if self._gate_log_sigmas is None:
            return logits
        return logits * self._signal(t, x.shape[0], x.device).to(logits.dtype)[:, None]

    def _signal(self, t, batch: int, device) -> torch.Tensor:
        """sqrt(abar) at timesteps t (fractional ones interpolated in log sigma)."""
        from explore.denoisers import alpha_bar_at
        if self._gate_log_sigmas.device != torch.device(device):
            self._gate_log_sigmas = self._gate_log_sigmas.to(device)
        t = torch.as_tensor(t, device=device)
        return alpha_bar_at(self._gate_log_sigmas, t.expand(batch) if t.ndim == 0 else t).sqrt()
