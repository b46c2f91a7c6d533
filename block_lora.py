"""Block-LoRA layer around a frozen nn.Linear. Depends on torch alone.

"One Head Eight Arms: Block Matrix based Low Rank Adaptation for CLIP-based Few-Shot Learning",
arXiv 2501.16720. Confirmed (abstract): LoRA's low-rank matrices are partitioned into sub-matrices, all
down-projection sub-matrices are shared, some products become additions, with fewer parameters and less
compute than LoRA. Our reconstruction (only the abstract is public to us): split A by input columns into n
blocks and share them, A = [A_s A_s ... A_s]; then A x = A_s (x_1 + ... + x_n) with x_j the n equal chunks of
x, so the down-projection of n chunks becomes n - 1 additions and one r x (d_in / n) product (flag `blocks`).

Vocabulary as microsoft/LoRA's loralib: `lora_A` (r x d_in/n), `lora_B` (out x r), `scaling`. Merging is
explicit (`merge()` / `unmerge()`), never a side effect of `.eval()`.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


def adapter_dropout(x, p, training):
    """Dropout of the adapter's input with nn.Dropout's law (zero with probability p, survivors scaled by
    1 / (1 - p)). The mask comes from rand_like: on CPU bernoulli_ is about 3x slower, and it was 70% of the
    adapters' training overhead (bench.py)."""
    if not training or p == 0:
        return x
    return x * (torch.rand_like(x) >= p).to(x.dtype) * (1 / (1 - p))


class BlockLoRALinear(nn.Module):
    """h = W x + b + s * B A_s sum_j dropout(x)_j, with W, b frozen and x split into `blocks` equal chunks.

    Equal to LoRA with Delta W = s * B [A_s A_s ... A_s]. lora_A (A_s): r x (d_in / n), kaiming_uniform_(a=sqrt(5));
    lora_B: d_out x r, zeros. s = alpha / sqrt(r) and adapter-only dropout, as the CLIP-LoRA code we build on.
    """

    def __init__(self, base: nn.Linear, r=2, alpha=1.0, dropout=0.25, blocks=8, name="layer"):
        super().__init__()
        if r < 1:
            raise ValueError(f"rank r={r}: expected a positive integer")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout={dropout}: expected a number in [0, 1)")
        if blocks < 1 or base.in_features % blocks:
            raise ValueError(f"{name}: input size {base.in_features} is not divisible by blocks={blocks}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha, self.blocks = r, alpha, blocks
        self.scaling = alpha / math.sqrt(r)
        self.dropout = dropout
        self.merged = False
        self.lora_A = nn.Parameter(base.weight.new_empty(r, base.in_features // blocks))
        self.lora_B = nn.Parameter(base.weight.new_zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta_weight(self):
        """The dense update s * B [A_s ... A_s] (d_out x d_in) this adapter adds to W."""
        return self.scaling * (self.lora_B @ self.lora_A.repeat(1, self.blocks))

    def forward(self, x):
        out = self.base(x)
        if self.merged:
            return out
        chunks = adapter_dropout(x, self.dropout, self.training).unflatten(-1, (self.blocks, -1))  # (..., n, d_in/n)
        low = F.linear(chunks.sum(dim=-2), self.lora_A.to(x.dtype))  # shared A_s: the sum replaces n products
        return out + F.linear(low, (self.scaling * self.lora_B).to(x.dtype))  # s scales B, not the activations

    @torch.no_grad()
    def merge(self):
        """W <- W + Delta W; the adapter branch is then skipped (zero-overhead inference)."""
        if self.merged:
            raise RuntimeError("merge(): adapter is already merged")
        self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W <- W - Delta W, undoing `merge()` (up to float rounding)."""
        if not self.merged:
            raise RuntimeError("unmerge(): adapter is not merged")
        self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
        self.merged = False

    def extra_repr(self):
        return (f"r={self.r}, alpha={self.alpha}, dropout={self.dropout}, blocks={self.blocks}, "
                f"scaling={self.scaling:.4g}, merged={self.merged}")
