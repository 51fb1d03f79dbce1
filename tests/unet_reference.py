"""CompVis openaimodel's UNet with legacy attention, written out in PyTorch from its formulas.

An independent reference for the UNets diffusers cannot hold (legacy AttentionBlock,
ResBlocks that resample, scale-shift norm): module names follow the CompVis state dict
(`input_blocks.N.M`, `middle_block`, `output_blocks`, `time_embed`, `label_emb`, `out`),
so its `state_dict()` is a CompVis checkpoint. NCHW, float32, no dropout.
"""

import math

import torch
from torch import nn

F = nn.functional


def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
  half = dim // 2
  freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
  args = t.float()[:, None] * freqs[None]
  return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _norm(channels):
  return nn.GroupNorm(32, channels, eps=1e-5)


def _nearest_x2(x):
  return F.interpolate(x, scale_factor=2, mode="nearest")


class Down(nn.Module):

  def __init__(self, channels):
    super().__init__()
    self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

  def forward(self, x, emb):
    return self.op(x)


class Up(nn.Module):

  def __init__(self, channels):
    super().__init__()
    self.conv = nn.Conv2d(channels, channels, 3, padding=1)

  def forward(self, x, emb):
    return self.conv(_nearest_x2(x))


class Res(nn.Module):

  def __init__(self, channels, emb_dim, out, scale_shift, resample=None):
    super().__init__()
    self.scale_shift, self.resample = scale_shift, resample
    self.in_layers = nn.Sequential(_norm(channels), nn.SiLU(),
                                   nn.Conv2d(channels, out, 3, padding=1))
    self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out if scale_shift
                                                         else out))
    self.out_layers = nn.Sequential(_norm(out), nn.SiLU(), nn.Dropout(0.0),
                                    nn.Conv2d(out, out, 3, padding=1))
    self.skip_connection = nn.Conv2d(channels, out, 1) if channels != out else nn.Identity()

  def _resize(self, x):
    if self.resample == "up":
      return _nearest_x2(x)
    if self.resample == "down":
      return F.avg_pool2d(x, 2)
    return x

  def forward(self, x, emb):
    h = self.in_layers[1](self.in_layers[0](x))
    h, x = self._resize(h), self._resize(x)
    h = self.in_layers[2](h)
    e = self.emb_layers(emb)[:, :, None, None]
    if self.scale_shift:
      scale, shift = e.chunk(2, dim=1)
      h = self.out_layers[0](h) * (1 + scale) + shift
      h = self.out_layers[3](self.out_layers[1](h))
    else:
      h = self.out_layers(h + e)
    return self.skip_connection(x) + h


class Attn(nn.Module):
  """qkv holds, per head, that head's q, k and v channels one after another."""

  def __init__(self, channels, heads):
    super().__init__()
    self.heads = heads
    self.norm = _norm(channels)
    self.qkv = nn.Conv1d(channels, 3 * channels, 1)
    self.proj_out = nn.Conv1d(channels, channels, 1)

  def forward(self, x, emb):
    b, c, height, width = x.shape
    flat = x.reshape(b, c, -1)
    qkv = self.qkv(self.norm(flat)).reshape(b * self.heads, 3 * c // self.heads, -1)
    q, k, v = qkv.split(c // self.heads, dim=1)
    scale = (c // self.heads)**-0.25
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    out = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1)
    return (flat + self.proj_out(out)).reshape(b, c, height, width)


class Seq(nn.ModuleList):

  def forward(self, x, emb):
    for layer in self:
      x = layer(x, emb) if isinstance(layer, (Res, Attn, Down, Up)) else layer(x)
    return x


class ReferenceUNet(nn.Module):
  """Built from a UNetSpec's fields (legacy attention, conv resampling or resblock_updown)."""

  def __init__(self, spec):
    super().__init__()
    mc, emb_dim, ss = spec.model_channels, 4 * spec.model_channels, spec.use_scale_shift_norm
    heads = lambda ch: (spec.num_heads if spec.num_head_channels == -1
                        else ch // spec.num_head_channels)
    self.mc = mc
    self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(),
                                    nn.Linear(emb_dim, emb_dim))
    if spec.num_classes:
      self.label_emb = nn.Embedding(spec.num_classes, emb_dim)
    self.input_blocks = nn.ModuleList([Seq([nn.Conv2d(spec.in_channels, mc, 3, padding=1)])])
    skips, ch, ds = [mc], mc, 1
    for level, mult in enumerate(spec.channel_mult):
      for _ in range(spec.num_res_blocks):
        layers = [Res(ch, emb_dim, mult * mc, ss)]
        ch = mult * mc
        if ds in spec.attention_resolutions:
          layers.append(Attn(ch, heads(ch)))
        self.input_blocks.append(Seq(layers))
        skips.append(ch)
      if level != len(spec.channel_mult) - 1:
        down = Res(ch, emb_dim, ch, ss, "down") if spec.resblock_updown else Down(ch)
        self.input_blocks.append(Seq([down]))
        skips.append(ch)
        ds *= 2
    self.middle_block = Seq([Res(ch, emb_dim, ch, ss), Attn(ch, heads(ch)),
                             Res(ch, emb_dim, ch, ss)])
    self.output_blocks = nn.ModuleList()
    for level, mult in reversed(list(enumerate(spec.channel_mult))):
      for i in range(spec.num_res_blocks + 1):
        layers = [Res(ch + skips.pop(), emb_dim, mult * mc, ss)]
        ch = mult * mc
        if ds in spec.attention_resolutions:
          layers.append(Attn(ch, heads(ch)))
        if level and i == spec.num_res_blocks:
          layers.append(Res(ch, emb_dim, ch, ss, "up") if spec.resblock_updown else Up(ch))
          ds //= 2
        self.output_blocks.append(Seq(layers))
    self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, spec.out_channels, 3,
                                                             padding=1))

  def forward(self, x, t, y=None):
    emb = self.time_embed(timestep_features(t, self.mc))
    if y is not None:
      emb = emb + self.label_emb(y)
    h, skips = x, []
    for block in self.input_blocks:
      h = block(h, emb)
      skips.append(h)
    h = self.middle_block(h, emb)
    for block in self.output_blocks:
      h = block(torch.cat([h, skips.pop()], dim=1), emb)
    return self.out(h)
