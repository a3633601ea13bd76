"""Qwen-1 rotary position embedding with the original's dynamic-NTK context extension (see modeling_qwen)."""

import math

import torch
from torch import nn

from .configuration_qwen import QWenConfig


def ntk_alpha(context_length: int, seq_length: int) -> int:
    """Dynamic-NTK alpha of the original for a context of `context_length` tokens (1 while within `seq_length`)."""
    context_value = math.log(max(context_length, 1) / seq_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


class QWenRotaryEmbedding(nn.Module):
    """Rotary embedding over the first `rotary_pct` of each head, with a per-token NTK alpha.

    No buffers: inv_freq is tiny and depends on alpha, so it is computed per call (which also keeps meta-device
    loading free of non-persistent buffers to re-initialise).
    """

    def __init__(self, config: QWenConfig):
        super().__init__()
        self.dim = config.kv_channels if config.rotary_pct == 1.0 else int(config.kv_channels * config.rotary_pct)
        self.base = config.rotary_emb_base
        self.seq_length = config.seq_length

    def inv_freq(self, alpha: float, device: torch.device) -> torch.Tensor:
        # Same float32 arithmetic as the original so long-context logits match to the last bits.
        base = self.base * alpha ** (self.dim / (self.dim - 2))
        return 1.0 / (base ** (torch.arange(0, self.dim, 2, device=device).float() / self.dim))

    def forward(
        self, positions: torch.Tensor, ntk_lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape (batch, seq, 1, rotary_dim) in fp32; `ntk_lengths` (batch, seq) picks each token's alpha."""
        if ntk_lengths is None:
            inv_freq = self.inv_freq(1.0, positions.device)
        else:
            # Few distinct context lengths (one per row or packed sample): build one inv_freq per length and gather.
            lengths, index = torch.unique(ntk_lengths, return_inverse=True)
            alphas = [ntk_alpha(n, self.seq_length) for n in lengths.tolist()]
            table = torch.stack([self.inv_freq(alpha, positions.device) for alpha in alphas])
            inv_freq = table[index]
        freqs = positions[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return emb.cos(), emb.sin()


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] channels of t (batch, seq, heads, head_dim), in fp32 like the original."""
    rot_dim = cos.shape[-1]
    tf = t.float()
    t_rot, t_pass = tf[..., :rot_dim], tf[..., rot_dim:]
    x1, x2 = t_rot.chunk(2, dim=-1)
    t_rot = t_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((t_rot, t_pass), dim=-1).type_as(t)
