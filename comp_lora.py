"""LoRA (as CLIP-LoRA) and Comp-LoRA layers around a frozen nn.Linear. Depends on torch alone.

LoRA:      Zanella & Ben Ayed, "Low-Rank Few-Shot Adaptation of Vision-Language Models", CVPRW 2024
           (arXiv 2405.18541), official code MaxZanella/CLIP-LoRA, loralib/layers.py (LinearLoRA).
Comp-LoRA: arXiv 2501.15040: the update lives in the complement of the weight's top singular directions.

Vocabulary as microsoft/LoRA's loralib: `lora_A` (r x in), `lora_B` (out x r), `scaling`. Only parameters
whose names start with `lora_` are trainable. Merging is explicit (`merge()` / `unmerge()`), never a side
effect of `.eval()`.
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


class _DropoutLinear(torch.autograd.Function):
    """F.linear(adapter_dropout(x, p, True), down), keeping for backward x and a 1-byte mask: autograd would
    keep the float mask and the dropped copy, 8 bytes per element for each adapter, while x is the same tensor
    for the q, k and v adapters of a block, so it is kept once for the three. Same draws, same numbers."""

    @staticmethod
    def forward(ctx, x, down, p):
        keep = torch.rand_like(x) >= p  # the draws of adapter_dropout
        low = F.linear(x.mul(keep).mul_(1 / (1 - p)), down)  # (..., r); autocast casts as in LoRALinear
        ctx.save_for_backward(x, keep, down)
        ctx.p = p
        return low

    @staticmethod
    def backward(ctx, grad):  # grad: (..., r)
        x, keep, down = ctx.saved_tensors
        grad_x = grad_down = None
        # the products in the dtype autocast gave them in forward (grad's); autograd casts the results back
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ down.to(grad.dtype)).to(x.dtype).mul_(keep).mul_(1 / (1 - ctx.p))  # a new tensor
        if ctx.needs_input_grad[1]:
            dropped = x.mul(keep).mul_(1 / (1 - ctx.p)).to(grad.dtype)
            grad_down = grad.flatten(0, -2).t().mm(dropped.flatten(0, -2))  # (r, d_in), as F.linear's backward
        return grad_x, grad_down, None


class LoRALinear(nn.Module):
    """h = W x + b + s * B A dropout(x), with W, b frozen (CLIP-LoRA's LinearLoRA).

    lora_A: r x d_in, kaiming_uniform_(a=sqrt(5)); lora_B: d_out x r, zeros, so the layer starts as W.
    s = alpha / sqrt(r): the official CLIP-LoRA code's rule (loralib/layers.py), not LoRA's alpha / r.
    Dropout acts on the adapter branch only, and only in training, as the official code.
    """

    def __init__(self, base: nn.Linear, r=2, alpha=1.0, dropout=0.25, adapter_dims=None):
        # adapter_dims: (columns of A, rows of B) when the adapter works in a subspace (Comp-LoRA)
        super().__init__()
        if r < 1:
            raise ValueError(f"rank r={r}: expected a positive integer")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout={dropout}: expected a number in [0, 1)")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha = r, alpha
        self.scaling = alpha / math.sqrt(r)
        self.dropout = dropout
        self.merged = False
        in_dim, out_dim = adapter_dims or (base.in_features, base.out_features)
        self.lora_A = nn.Parameter(base.weight.new_empty(r, in_dim))
        self.lora_B = nn.Parameter(base.weight.new_zeros(out_dim, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def factors(self):
        """(down, up) with Delta W = scaling * up @ down; down: r x d_in, up: d_out x r."""
        return self.lora_A, self.lora_B

    def delta_weight(self):
        """The dense update Delta W (d_out x d_in) this adapter adds to W."""
        down, up = self.factors()
        return self.scaling * (up @ down)

    def forward(self, x):
        out = self.base(x)
        if self.merged:
            return out
        down, up = self.factors()
        # (x A^T)(s B)^T costs r * (d_in + d_out) per token, instead of d_in * d_out for x (s B A)^T;
        # s multiplies the small factor B, not the activations
        if self.training and self.dropout > 0 and torch.is_grad_enabled():
            low = _DropoutLinear.apply(x, down.to(x.dtype), self.dropout)  # (..., r)
        else:
            low = F.linear(adapter_dropout(x, self.dropout, self.training), down.to(x.dtype))  # (..., r)
        # in place: the frozen product is kept by nothing, and one allocation fewer leaves the heap less fragmented
        return out.add_(F.linear(low, (self.scaling * up).to(x.dtype)))

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
        return (f"r={self.r}, alpha={self.alpha}, dropout={self.dropout}, scaling={self.scaling:.4g}, "
                f"merged={self.merged}")


def _complement_bases(weight, k):
    """U[:, k:], V[:, k:] of W = U S V^T, in float64 on the CPU, each column's sign fixed.

    Fixing the sign (largest-magnitude entry of each right vector positive, the left vector flipped with it)
    makes the bases the same on every machine, so a saved adapter means the same update when reloaded.
    """
    u, _, vh = torch.linalg.svd(weight.detach().to("cpu", torch.float64), full_matrices=True)
    v = vh.t()
    sign = torch.sign(v.gather(0, v.abs().argmax(dim=0, keepdim=True)))  # (1, d_in)
    n = min(u.shape[1], v.shape[1])
    v[:, :n] *= sign[:, :n]
    u[:, :n] *= sign[:, :n]
    return u[:, k:], v[:, k:]


class CompLoRALinear(LoRALinear):
    """Comp-LoRA: Delta W = s * P_out B A P_in^T, so the update never touches W's top-k singular directions.

    Confirmed (arXiv 2501.15040, abstract and Fig. 1): the update is learnt in the complement of the most
    informative directions of W, the input is projected in by a fixed matrix and the output back by another,
    and no parameters are added over LoRA. Our reconstruction: with W = U S V^T, P_in = V[:, k:],
    P_out = U[:, k:], k = round(comp_ratio * min(d_out, d_in)) (the choice of k is ours; flag comp_ratio).
    Then Delta W V_k = 0 and U_k^T Delta W = 0. lora_A: r x (d_in - k), lora_B: (d_out - k) x r.
    """

    def __init__(self, base: nn.Linear, r=2, alpha=1.0, dropout=0.25, comp_ratio=0.5):
        if not 0 <= comp_ratio < 1:
            raise ValueError(f"comp_ratio={comp_ratio}: expected a number in [0, 1)")
        k = round(comp_ratio * min(base.out_features, base.in_features))
        p_out, p_in = _complement_bases(base.weight, k)
        super().__init__(base, r, alpha, dropout, adapter_dims=(p_in.shape[1], p_out.shape[1]))
        self.comp_ratio, self.k = comp_ratio, k
        # fixed, recomputed from W at wrap time (deterministic, see _complement_bases), so not saved
        self.register_buffer("P_in", p_in.to(base.weight), persistent=False)    # d_in x (d_in - k)
        self.register_buffer("P_out", p_out.to(base.weight), persistent=False)  # d_out x (d_out - k)

    def factors(self):
        # formed once per forward (r x d_in and d_out x r), so the per-token cost equals LoRA's
        return self.lora_A @ self.P_in.t(), self.P_out @ self.lora_B

    def extra_repr(self):
        return super().extra_repr() + f", comp_ratio={self.comp_ratio}, k={self.k}"
