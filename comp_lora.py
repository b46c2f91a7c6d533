"""LoRA (CLIP-LoRA: Zanella & Ben Ayed, CVPRW 2024, arXiv 2405.18541; MaxZanella/CLIP-LoRA loralib/layers.py) and
Comp-LoRA (arXiv 2501.15040) layers around a frozen nn.Linear, and the functions that put them into any model (OpenAI
CLIP, open_clip, Hugging Face's CLIPModel) and take them out; torch alone. Names as loralib (`lora_A` r x in, `lora_B`
out x r, `scaling`) and peft (`merge_and_unload`). Merging is explicit (`merge()`), never a side effect of `.eval()`.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


def adapter_dropout(x, p, training):
    """nn.Dropout's law on the adapter's input; the mask from rand_like (on CPU bernoulli_ is 3x slower: bench.py)."""
    if not training or p == 0:
        return x
    return x * (torch.rand_like(x) >= p).to(x.dtype) * (1 / (1 - p))


class _DropoutLinear(torch.autograd.Function):
    """F.linear(adapter_dropout(x, p, True), down) keeping for backward x and a 1-byte mask instead of the float mask
    and the dropped copy (8 bytes an element for each adapter): x is one tensor for a block's q, k, v adapters."""

    @staticmethod
    def forward(ctx, x, down, p):
        keep = torch.rand_like(x) >= p  # the draws of adapter_dropout
        ctx.save_for_backward(x, keep, down)
        ctx.scale = 1 / (1 - p)
        return F.linear(x.mul(keep).mul_(ctx.scale), down)  # (..., r); autocast casts as in LoRALinear

    @staticmethod
    def backward(ctx, grad):  # grad: (..., r), in the dtype autocast gave the product; autograd casts back
        x, keep, down = ctx.saved_tensors
        grad_x = (grad @ down.to(grad.dtype)).to(x.dtype).mul_(keep).mul_(ctx.scale) if ctx.needs_input_grad[0] \
            else None
        dropped = x.mul(keep).mul_(ctx.scale).to(grad.dtype)
        return grad_x, grad.flatten(0, -2).t().mm(dropped.flatten(0, -2)), None  # (r, d_in), as F.linear's backward


class LoRALinear(nn.Module):
    """h = W x + b + s * B A dropout(x), W and b frozen (CLIP-LoRA's LinearLoRA): lora_A r x d_in, kaiming_uniform_(a=
    sqrt(5)); lora_B d_out x r, zeros; s = alpha / sqrt(r), the official code's rule (not LoRA's alpha / r); dropout on
    the adapter branch in training only. Takes the mode of `base`; `name` labels errors. Subclasses change
    `adapter_dims`, `factors`, `forward`."""

    def __init__(self, base: nn.Linear, r=2, alpha=1.0, dropout=0.25, name=None):
        super().__init__()
        if r < 1 or not 0 <= dropout < 1:
            raise ValueError(f"{name + ': ' if name else ''}rank r={r}, dropout={dropout}: expected r >= 1 and "
                             "dropout in [0, 1)")
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.dropout, self.merged = r, alpha, dropout, False
        self.scaling = alpha / math.sqrt(r)
        in_dim, out_dim = self.adapter_dims()
        # float32 whatever W's dtype (as peft's): fp16 gradients cannot be unscaled by a GradScaler (cast in forward)
        self.lora_A = nn.Parameter(torch.empty(r, in_dim, dtype=torch.float32, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_dim, r, dtype=torch.float32, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.train(base.training)  # wrapping an eval model must not switch its dropout on

    def adapter_dims(self):  # (columns of lora_A, rows of lora_B)
        return self.base.in_features, self.base.out_features

    def factors(self):
        """(down, up) with Delta W = scaling * up @ down; down: r x d_in, up: d_out x r."""
        return self.lora_A, self.lora_B

    def delta_weight(self):
        """The dense update Delta W (d_out x d_in, float32) this adapter adds to W."""
        down, up = self.factors()
        with torch.autocast(down.device.type, enabled=False):  # float32 products
            return self.scaling * (up @ down)

    def forward(self, x):
        out = self.base(x)
        if self.merged:
            return out
        down, up = self.factors()
        # (x A^T)(s B)^T: r * (d_in + d_out) per token, not d_in * d_out; s scales the small B, not activations. In
        # place: nothing keeps the frozen product, and one allocation fewer leaves the heap less fragmented
        if self.training and self.dropout > 0 and torch.is_grad_enabled():
            low = _DropoutLinear.apply(x, down.to(x.dtype), self.dropout)  # (..., r)
        else:
            low = F.linear(adapter_dropout(x, self.dropout, self.training), down.to(x.dtype))  # (..., r)
        return out.add_(F.linear(low, (self.scaling * up).to(x.dtype)))

    def merge(self, merged=True):
        """W <- W + Delta W; the adapter branch is then skipped (zero-overhead inference)."""
        if self.merged == merged:
            state = "already merged" if merged else "not merged"
            raise RuntimeError(f"{'merge' if merged else 'unmerge'}(): adapter is {state}")
        with torch.no_grad():
            self.base.weight.add_(self.delta_weight().to(self.base.weight.dtype), alpha=1 if merged else -1)
        self.merged = merged

    def unmerge(self):
        """W <- W - Delta W, undoing `merge()` (up to float rounding)."""
        self.merge(merged=False)

    # A merged state loaded into an unmerged adapter would add the update twice. Our choice: the state dict's metadata
    # says whether W holds it, and loading honours it (a plain-dict copy drops it: export with merge_and_unload).
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if hasattr(destination, "_metadata"):
            destination._metadata[prefix[:-1]]["lora_merged"] = self.merged

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        if prefix + "base.weight" in state_dict:  # W comes with the state, and whether it holds the update
            self.merged = bool(local_metadata.get("lora_merged", False))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def extra_repr(self):  # the factors' shapes show each subclass's own (Comp-LoRA's k, Block-LoRA's blocks)
        return (f"r={self.r}, alpha={self.alpha}, dropout={self.dropout}, scaling={self.scaling:.4g}, "
                f"lora_A={tuple(self.lora_A.shape)}, lora_B={tuple(self.lora_B.shape)}, merged={self.merged}")


def _complement_bases(weight, k):
    """U[:, k:], V[:, k:] of W = U S V^T in float64 (on W's GPU, else the CPU), signs fixed (largest entry of each right
    vector positive): the same bases on every machine (to float64 rounding): a saved adapter means the same update."""
    device = weight.device if weight.device.type == "cuda" else "cpu"  # MPS has no float64
    u, _, vh = torch.linalg.svd(weight.detach().to(device, torch.float64), full_matrices=True)
    v = vh.t()
    sign = torch.sign(v.gather(0, v.abs().argmax(dim=0, keepdim=True)))  # (1, d_in)
    n = min(u.shape[1], v.shape[1])
    u[:, :n], v[:, :n] = u[:, :n] * sign[:, :n], v[:, :n] * sign[:, :n]
    return u[:, k:], v[:, k:]


class CompLoRALinear(LoRALinear):
    """Comp-LoRA: Delta W = s * P_out B A P_in^T never touches W's top-k singular directions. Confirmed (arXiv
    2501.15040, abstract, Fig. 1): learnt in the complement of W's most informative directions, input and output
    projected by fixed matrices, no parameters over LoRA. Our reconstruction (k our choice, flag comp_ratio):
    W = U S V^T, P_in = V[:, k:], P_out = U[:, k:], k = round(comp_ratio * min(d_out, d_in)), so Delta W V_k = 0
    and U_k^T Delta W = 0; lora_A: r x (d_in - k), lora_B: (d_out - k) x r."""

    def __init__(self, base: nn.Linear, r=2, alpha=1.0, dropout=0.25, comp_ratio=0.5, name=None):
        width = min(base.out_features, base.in_features)  # k is set first: LoRALinear.__init__ calls adapter_dims
        self.comp_ratio, self.k = comp_ratio, round(comp_ratio * width) if 0 <= comp_ratio < 1 else width
        if self.k == width:  # k = width would leave no direction to train
            raise ValueError(f"{name + ': ' if name else ''}comp_ratio={comp_ratio}: expected a number in [0, 1) that "
                             f"leaves a direction to train, at most {(width - 1) / width} for width {width}")
        super().__init__(base, r, alpha, dropout, name)
        p_out, p_in = _complement_bases(base.weight, self.k)
        # fixed, recomputed from W at wrap time (deterministic, see _complement_bases), so not saved
        self.register_buffer("P_in", p_in.to(base.weight.device, torch.float32), persistent=False)  # d_in x (d_in-k)
        self.register_buffer("P_out", p_out.to(base.weight.device, torch.float32), persistent=False)  # d_out x ...

    def adapter_dims(self):
        return self.base.in_features - self.k, self.base.out_features - self.k

    def factors(self):
        # float32 under autocast too (fp16 leaks 2e-4 of the update into the protected directions); once per forward
        with torch.autocast(self.P_in.device.type, enabled=False):
            return self.lora_A @ self.P_in.t(), self.P_out @ self.lora_B


def _additive(mask, dtype):
    """An attention mask to add to the scores: a bool mask (True: may not attend) becomes 0 / -inf."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class SplitAttention(nn.Module):
    """nn.MultiheadAttention with its fused in_proj split into nn.Linear q_proj, k_proj, v_proj (beside out_proj), so
    adapters can wrap them by name; same call and outputs to float rounding (batched; is_causal is only a hint)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = (mha.embed_dim, mha.num_heads, mha.dropout,
                                                                          mha.batch_first)
        bias = mha.in_proj_bias
        for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
            rows = slice(i * self.embed_dim, (i + 1) * self.embed_dim)
            linear = nn.Linear(self.embed_dim, self.embed_dim, bias=bias is not None, device="meta")
            linear.weight = nn.Parameter(mha.in_proj_weight[rows].detach().clone(), mha.in_proj_weight.requires_grad)
            if bias is not None:
                linear.bias = nn.Parameter(bias[rows].detach().clone(), bias.requires_grad)
            setattr(self, name, linear)
        self.out_proj = mha.out_proj
        self.train(mha.training)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.batch_first:  # (length, n, width) -> (n, length, width)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, length = query.shape[:2]
        q, k, v = (proj(t).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (n, heads, length, head_dim)
                   for proj, t in ((self.q_proj, query), (self.k_proj, key), (self.v_proj, value)))
        mask = None if attn_mask is None else _additive(attn_mask, q.dtype)  # (length, source) or (n * heads, ...)
        mask = mask.view(n, self.num_heads, length, -1) if mask is not None and mask.dim() == 3 else mask
        if key_padding_mask is not None:  # (n, source), True or -inf at padding
            padding = _additive(key_padding_mask, q.dtype).view(n, 1, 1, -1)
            mask = padding if mask is None else mask + padding
        if need_weights:  # the attention weights are returned: computed explicitly, as nn.MultiheadAttention
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + (0 if mask is None else mask)
            weights = torch.softmax(scores, dim=-1)  # (n, heads, length, source)
            y = F.dropout(weights, self.dropout, self.training) @ v
        else:
            weights, y = None, F.scaled_dot_product_attention(q, k, v, mask, self.dropout if self.training else 0.0)
        y = self.out_proj(y.transpose(1, 2).flatten(2))  # (n, length, width)
        weights = weights.mean(dim=1) if need_weights and average_attn_weights else weights
        return (y if self.batch_first else y.transpose(0, 1)), weights

    def fused(self):
        """An nn.MultiheadAttention with this module's weights (in_proj_weight = [q; k; v])."""
        parts = (self.q_proj, self.k_proj, self.v_proj)
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, self.dropout, bias=parts[0].bias is not None,
                                    batch_first=self.batch_first, device="meta")
        mha.in_proj_weight = nn.Parameter(torch.cat([p.weight.detach() for p in parts]), parts[0].weight.requires_grad)
        if mha.in_proj_bias is not None:
            mha.in_proj_bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), parts[0].bias.requires_grad)
        mha.out_proj = self.out_proj
        return mha.train(self.training)


def _replace(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _is_lora(key):
    return key.rpartition(".")[2].startswith("lora_")


def add_adapters(model, layer_class, names=("q_proj", "k_proj", "v_proj"), **layer_args):
    """Wrap every nn.Linear whose own or full dotted name is in `names` as layer_class(linear, name=full name,
    **layer_args); returns the full names. Each self-attention nn.MultiheadAttention (fused in_proj, no bias_kv or
    zero_attn: OpenAI CLIP, open_clip) first becomes a SplitAttention, so q_proj, k_proj, v_proj can be named. A model
    that holds adapters, or where no name matches (or a layer refuses), is a ValueError and left as it was."""
    names = {names} if isinstance(names, str) else set(names)
    found = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if found:
        raise ValueError(f"the model already holds {len(found)} adapters (first {found[0]}); merge_and_unload it first")
    originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
                 and m.in_proj_weight is not None and m.bias_k is None and not m.add_zero_attn}
    grads = [(p, p.requires_grad) for p in model.parameters()]
    for n, m in originals.items():
        _replace(model, n, SplitAttention(m))
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
               and (n in names or n.rpartition(".")[2] in names)]
    try:
        if not targets:
            linears = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise ValueError(f"no nn.Linear of {type(model).__name__} is named {sorted(names)}; their names: {linears}")
        layers = [layer_class(model.get_submodule(n), name=n, **layer_args) for n in targets]
    except Exception:
        for n, m in originals.items():
            _replace(model, n, m)
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)
        raise
    for n, layer in zip(targets, layers):
        _replace(model, n, layer)
    return targets


def mark_only_lora_as_trainable(model):
    """Freeze every parameter but the adapters' lora_ tensors."""
    for name, param in model.named_parameters():
        param.requires_grad_(_is_lora(name))


def lora_state_dict(model):
    """The adapters' lora_ tensors by full name, on the CPU: all that an adapter file needs."""
    return {key: value.detach().cpu() for key, value in model.state_dict().items() if _is_lora(key)}


def load_lora_state_dict(model, state):
    """Load lora_ tensors into a model adapted the same way; a missing, extra or reshaped one is a ValueError first."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items() if _is_lora(key)}
    for key in sorted(set(expected) | set(state)):
        theirs = tuple(state[key].shape) if isinstance(state.get(key), torch.Tensor) else None
        if theirs != expected.get(key):
            raise ValueError(f"adapter tensor {key!r}: the state has {theirs or 'no such tensor'}, the model "
                             f"{expected.get(key) or 'no such tensor'} (adapters added with other names or arguments?)")
    merged = [n for n, m in model.named_modules() if isinstance(m, LoRALinear) and m.merged]
    if merged:
        raise ValueError(f"adapter {merged[0]} is merged: unmerge() it before loading other lora_ tensors")
    model.load_state_dict(state, strict=False)


def merge_and_unload(model):
    """Merge every adapter and put the plain modules back (nn.Linear, nn.MultiheadAttention): the original keys."""
    for name, module in reversed(list(model.named_modules())):  # children first: adapters before their attention
        if isinstance(module, LoRALinear):
            if not module.merged:
                module.merge()
            _replace(model, name, module.base)
        elif isinstance(module, SplitAttention):
            _replace(model, name, module.fused())
    return model
