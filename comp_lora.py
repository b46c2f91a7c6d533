"""LoRA (CLIP-LoRA: Zanella & Ben Ayed, CVPRW 2024, arXiv 2405.18541; MaxZanella/CLIP-LoRA
loralib/layers.py) and Comp-LoRA (arXiv 2501.15040) layers around a frozen nn.Linear, and the
functions that put them into any model (OpenAI CLIP, open_clip, Hugging Face's CLIPModel) and take
them out; torch alone. Names as loralib (`lora_A` r x in, `lora_B` out x r, `scaling`) and peft
(`merge_and_unload`). Merging is explicit (`merge()`), never a side effect of `.eval()`.

Whatever a client does with the model, a layer gives the right numbers or raises:
- its state dict always holds the unmerged W, so any copy of it (a plain dict, a prefix rewrite)
  loads right, and loading a W gives Comp-LoRA the bases of that W;
- its factors (and Comp-LoRA's bases) stay float32 through `model.half()` and `.to(dtype)`.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

# What a layer's settings accept; train.py checks its flags against the same table.
SETTINGS = {
    "r": ("a positive integer", lambda r: r >= 1),
    "alpha": ("a finite number other than 0", lambda alpha: alpha != 0 and math.isfinite(alpha)),
    "dropout": ("a number in [0, 1)", lambda p: 0 <= p < 1),
    "comp_ratio": ("a number in [0, 1)", lambda ratio: 0 <= ratio < 1),
}


def check_setting(key, value, name=None):
    """A ValueError naming the layer, the setting and what it accepts,
    unless SETTINGS accepts it."""
    expected, valid = SETTINGS[key]
    if not valid(value):
        raise ValueError(f"{name + ': ' if name else ''}{key}={value}: expected {expected}")


def adapter_dropout(x, p, training):
    """nn.Dropout's law on the adapter's input: each value kept with probability 1 - p and then
    scaled by 1 / (1 - p), in training only."""
    if not training or p == 0:
        return x
    return x * torch.rand_like(x).ge_(p).mul_(1 / (1 - p))  # the noise: 0 or 1 / (1 - p)


class LoRALinear(nn.Module):
    """h = W x + b + s B A dropout(x) (CLIP-LoRA's LinearLoRA), W and b frozen.

    lora_A: r x d_in, kaiming_uniform_(a=sqrt(5)); lora_B: d_out x r, zeros;
    s = alpha / sqrt(r), the official code's rule (not LoRA's alpha / r);
    dropout on the adapter branch, in training only. Takes the mode of `base`; `name` labels
    errors. Subclasses change `adapter_dims`, `factors`, `forward`."""

    def __init__(self, base: nn.Linear, r=2, alpha=1.0, dropout=0.25, name=None):
        super().__init__()
        for key, value in (("r", r), ("alpha", alpha), ("dropout", dropout)):
            check_setting(key, value, name)
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.dropout, self.merged = r, alpha, dropout, False
        self.scaling = alpha / math.sqrt(r)
        in_dim, out_dim = self.adapter_dims()
        device = base.weight.device
        # float32 whatever W's dtype (as peft's): a GradScaler cannot unscale fp16 gradients
        self.lora_A = nn.Parameter(torch.empty(r, in_dim, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_dim, r, dtype=torch.float32, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.train(base.training)  # wrapping an eval model must not switch its dropout on

    def adapter_dims(self):
        """(columns of lora_A, rows of lora_B)."""
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
        dropped = adapter_dropout(x, self.dropout, self.training)
        # (x A^T)(s B)^T: r (d_in + d_out) per token, not d_in d_out; s scales the small B
        low = F.linear(dropped, down.to(x.dtype))  # (..., r)
        return out + F.linear(low, (self.scaling * up).to(x.dtype))

    def merge(self, merged=True):
        """W <- W + Delta W; the adapter branch is then skipped (zero-overhead inference)."""
        if self.merged == merged:
            state = "already merged" if merged else "not merged"
            raise RuntimeError(f"{'merge' if merged else 'unmerge'}(): adapter is {state}")
        with torch.no_grad():
            delta = self.delta_weight().to(self.base.weight.dtype)
            self.base.weight.add_(delta, alpha=1 if merged else -1)
        self.merged = merged

    def unmerge(self):
        """W <- W - Delta W, undoing `merge()` (up to float rounding)."""
        self.merge(merged=False)

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """As nn.Module's, but always with the unmerged W: a merged layer writes W - Delta W."""
        state = super().state_dict(*args, destination=destination, prefix=prefix,
                                   keep_vars=keep_vars)
        if self.merged:
            delta = self.delta_weight().to(self.base.weight.dtype)
            state[prefix + "base.weight"] = self.base.weight.detach() - delta
        return state

    def _load_from_state_dict(self, state, prefix, *args):
        # a state holds an unmerged W and the factors: a merged layer unmerges before loading them
        ours = [prefix + key for key in ("lora_A", "lora_B", "base.weight")]
        if self.merged and any(key in state for key in ours):
            self.unmerge()
        super()._load_from_state_dict(state, prefix, *args)

    def _apply(self, fn, recurse=True):
        # model.half(), .to(dtype), .cuda(): W and b follow; the adapter's own tensors follow the
        # device only and stay float32
        if recurse:
            self.base._apply(fn)

        def same_dtype(tensor):
            moved = fn(tensor.new_empty(0))  # where and in what fn puts a tensor like this one
            return fn(tensor) if moved.dtype == tensor.dtype else tensor.to(moved.device)
        return super()._apply(same_dtype, recurse=False)

    def extra_repr(self):  # the factors' shapes show each subclass's own (k, blocks)
        return (f"r={self.r}, alpha={self.alpha}, dropout={self.dropout}, "
                f"scaling={self.scaling:.4g}, lora_A={tuple(self.lora_A.shape)}, "
                f"lora_B={tuple(self.lora_B.shape)}, merged={self.merged}")


def _complement_bases(weight, k):
    """U[:, k:], V[:, k:] of W = U S V^T in float64 on W's device, signs fixed (the largest entry
    of each right vector positive): the same bases on every machine, to float64 rounding, so that
    a saved adapter means the same update."""
    device = "cpu" if weight.device.type == "mps" else weight.device  # MPS has no float64
    u, _, vh = torch.linalg.svd(weight.detach().to(device, torch.float64), full_matrices=True)
    v = vh.t()
    sign = torch.sign(v.gather(0, v.abs().argmax(dim=0, keepdim=True)))  # (1, d_in)
    n = min(u.shape[1], v.shape[1])
    u[:, :n], v[:, :n] = u[:, :n] * sign[:, :n], v[:, :n] * sign[:, :n]
    return u[:, k:], v[:, k:]


class CompLoRALinear(LoRALinear):
    """Comp-LoRA: Delta W = s P_out B A P_in^T never touches W's top-k singular directions.

    Confirmed (arXiv 2501.15040, abstract, Fig. 1): learnt in the complement of W's most
    informative directions, input and output projected by fixed matrices, no parameters over LoRA.
    Our reconstruction (k our choice, flag comp_ratio): W = U S V^T, P_in = V[:, k:],
    P_out = U[:, k:], k = round(comp_ratio * min(d_out, d_in)), so Delta W V_k = 0 and
    U_k^T Delta W = 0; lora_A: r x (d_in - k), lora_B: (d_out - k) x r."""

    def __init__(self, base: nn.Linear, r=2, alpha=1.0, dropout=0.25, comp_ratio=0.5, name=None):
        check_setting("comp_ratio", comp_ratio, name)
        width = min(base.out_features, base.in_features)
        self.comp_ratio, self.k = comp_ratio, round(comp_ratio * width)  # k first: adapter_dims
        if self.k == width:  # no direction left to train
            raise ValueError(f"{name + ': ' if name else ''}comp_ratio={comp_ratio}: expected a "
                             f"number in [0, 1) that leaves a direction to train, at most "
                             f"{(width - 1) / width} for width {width}")
        super().__init__(base, r, alpha, dropout, name)
        self.set_bases(base.weight)

    def set_bases(self, weight):
        """P_in (d_in x (d_in - k)) and P_out (d_out x (d_out - k)) from W: fixed, and a function
        of W alone (see _complement_bases), so they are not saved."""
        p_out, p_in = _complement_bases(weight, self.k)
        device = self.lora_A.device
        self.register_buffer("P_in", p_in.to(device, torch.float32), persistent=False)
        self.register_buffer("P_out", p_out.to(device, torch.float32), persistent=False)

    def adapter_dims(self):
        return self.base.in_features - self.k, self.base.out_features - self.k

    def factors(self):
        # float32 under autocast too (fp16 leaks 2e-4 of the update into the protected directions)
        with torch.autocast(self.P_in.device.type, enabled=False):
            return self.lora_A @ self.P_in.t(), self.P_out @ self.lora_B

    def _load_from_state_dict(self, state, prefix, *args):
        super()._load_from_state_dict(state, prefix, *args)
        weight = state.get(prefix + "base.weight")  # the bases are those of the W that is loaded
        current = self.base.weight
        if weight is not None and weight.shape == current.shape and not torch.equal(
                weight.to(current.device, current.dtype), current):
            self.set_bases(weight.to(current.dtype))


# ------------------------------------------------------------------------------ attention
def _additive(mask, dtype):
    """An attention mask to add to the scores: a bool mask (True: may not attend) -> 0 / -inf."""
    if mask.dtype == torch.bool:
        zeros = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        return zeros.masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class SplitAttention(nn.Module):
    """nn.MultiheadAttention with its fused in_proj split into nn.Linear q_proj, k_proj, v_proj
    (beside out_proj), so adapters can wrap them by name; the same call and outputs, to float
    rounding, for every argument it accepts. What it cannot represent is a ValueError when built:
    add_bias_kv, add_zero_attn, kdim or vdim other than embed_dim."""

    # torch's nn.TransformerEncoder(Layer) read these to choose a fused fast path, which would
    # bypass the adapters: they say it is not for this module
    _qkv_same_embed_dim = False
    in_proj_bias = None

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        unsupported = {"add_bias_kv=True": mha.bias_k is not None,
                       "add_zero_attn=True": mha.add_zero_attn,
                       "kdim or vdim other than embed_dim": not mha._qkv_same_embed_dim}
        for argument, present in unsupported.items():
            if present:
                raise ValueError(f"nn.MultiheadAttention with {argument}: SplitAttention cannot "
                                 "represent it, so its projections cannot be adapted")
        self.embed_dim, self.num_heads = mha.embed_dim, mha.num_heads
        self.dropout, self.batch_first = mha.dropout, mha.batch_first
        weight, bias = mha.in_proj_weight, mha.in_proj_bias
        for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
            rows = slice(i * self.embed_dim, (i + 1) * self.embed_dim)
            linear = nn.Linear(self.embed_dim, self.embed_dim, bias=bias is not None, device="meta")
            linear.weight = nn.Parameter(weight[rows].detach().clone(), weight.requires_grad)
            if bias is not None:
                linear.bias = nn.Parameter(bias[rows].detach().clone(), bias.requires_grad)
            setattr(self, name, linear)
        self.out_proj = mha.out_proj
        self.train(mha.training)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if is_causal and attn_mask is None:  # as nn.MultiheadAttention: a hint about attn_mask
            raise ValueError("is_causal=True needs attn_mask (the causal mask), as "
                             "nn.MultiheadAttention does")
        batched = query.dim() == 3
        if not batched:  # (length, width) -> (1, length, width)
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
        elif not self.batch_first:  # (length, n, width) -> (n, length, width)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, length = query.shape[:2]
        heads = (self.q_proj(query), self.k_proj(key), self.v_proj(value))
        # each (n, length, width) -> (n, heads, length, head_dim)
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in heads)
        mask = None if attn_mask is None else _additive(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 3:  # (n * heads or 1, length, source)
            mask = mask.unflatten(0, (-1, self.num_heads)) if len(mask) > 1 else mask[None]
        if key_padding_mask is not None:  # (n, source) or (source,): True or -inf at padding
            padding = _additive(key_padding_mask, q.dtype).view(n, 1, 1, -1)
            mask = padding if mask is None else mask + padding
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:  # computed explicitly, as nn.MultiheadAttention; returned after dropout
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores + mask
            weights = F.dropout(torch.softmax(scores, dim=-1), dropout)  # (n, heads, length, src)
            y = weights @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
        else:
            y = F.scaled_dot_product_attention(q, k, v, mask, dropout)
        y = self.out_proj(y.transpose(1, 2).flatten(2))  # (n, length, width)
        if not batched:
            return y[0], None if weights is None else weights[0]
        return (y if self.batch_first else y.transpose(0, 1)), weights

    def fused(self):
        """An nn.MultiheadAttention with this module's weights (in_proj_weight = [q; k; v])."""
        parts = (self.q_proj, self.k_proj, self.v_proj)
        has_bias = parts[0].bias is not None
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, self.dropout, bias=has_bias,
                                    batch_first=self.batch_first, device="meta")
        weight = torch.cat([p.weight.detach() for p in parts])
        mha.in_proj_weight = nn.Parameter(weight, parts[0].weight.requires_grad)
        if has_bias:
            bias = torch.cat([p.bias.detach() for p in parts])
            mha.in_proj_bias = nn.Parameter(bias, parts[0].bias.requires_grad)
        mha.out_proj = self.out_proj
        return mha.train(self.training)


# ------------------------------------------------------------------ adapters in any model
def _replace(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _is_lora(key):
    return key.rpartition(".")[2].startswith("lora_")


def add_adapters(model, layer_class, names=("q_proj", "k_proj", "v_proj"), **layer_args):
    """Wrap every nn.Linear whose own or full dotted name is in `names` as
    layer_class(linear, name=full name, **layer_args); returns the full names.

    An nn.MultiheadAttention holding such a projection (OpenAI CLIP, open_clip) first becomes a
    SplitAttention, so that q_proj, k_proj, v_proj can be named. A model that holds adapters, no
    name that matches, or a layer or attention that refuses is an error,
    the model left as it was."""
    if not (isinstance(layer_class, type) and issubclass(layer_class, LoRALinear)):
        raise TypeError(f"layer_class {layer_class!r}: expected LoRALinear or a subclass")
    names = {names} if isinstance(names, str) else set(names)
    found = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if found:
        raise ValueError(f"the model already holds {len(found)} adapters (first {found[0]}); "
                         "merge_and_unload it first")

    def wanted(name):
        return name in names or name.rpartition(".")[2] in names
    projections = ("q_proj", "k_proj", "v_proj", "out_proj")  # of an attention once split
    attentions = {n: m for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
                  and any(wanted(f"{n}.{p}") for p in projections)}
    split = {}
    for n, m in attentions.items():  # built first: the model is not changed until all are
        try:
            split[n] = SplitAttention(m)
        except ValueError as error:
            raise ValueError(f"{n}: {error}") from None
    grads = [(p, p.requires_grad) for p in model.parameters()]
    for n, attention in split.items():
        _replace(model, n, attention)
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and wanted(n)]
    try:
        if not targets:
            linears = {n.rpartition(".")[2] for n, m in model.named_modules()
                       if isinstance(m, nn.Linear)}
            if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
                linears.update(projections)  # what a split attention would hold
            raise ValueError(f"no nn.Linear of {type(model).__name__} is named {sorted(names)}; "
                             f"their names: {sorted(linears)}")
        layers = [layer_class(model.get_submodule(n), name=n, **layer_args) for n in targets]
    except Exception:
        for n in split:
            _replace(model, n, attentions[n])
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)
        raise
    for n, layer in zip(targets, layers):
        _replace(model, n, layer)
    for module in model.modules():  # torch's encoder decided at construction that its layers
        if isinstance(module, nn.TransformerEncoder) and any(  # take nested tensors: not these
                isinstance(m, SplitAttention) for m in module.modules()):
            module.use_nested_tensor = False
    return targets


def mark_only_lora_as_trainable(model):
    """Freeze every parameter but the adapters' lora_ tensors."""
    for name, param in model.named_parameters():
        param.requires_grad_(_is_lora(name))


def trainable_count(model):
    """The number of values in the model's trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parameter_line(model):
    """peft's summary line: trainable params: N || all params: M || trainable%: P."""
    trainable = trainable_count(model)
    total = sum(p.numel() for p in model.parameters())
    return (f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}")


def lora_state_dict(model):
    """The adapters' lora_ tensors by full name, on the CPU: all that an adapter file needs."""
    return {key: value.detach().cpu() for key, value in model.state_dict().items() if _is_lora(key)}


def load_lora_state_dict(model, state):
    """Load lora_ tensors into a model adapted the same way; a missing, extra, reshaped or
    non-finite one is a ValueError first, and nothing is loaded."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()
                if _is_lora(key)}
    for key in sorted(set(expected) | set(state)):
        value = state.get(key)
        theirs = tuple(value.shape) if isinstance(value, torch.Tensor) else None
        if theirs != expected.get(key):
            raise ValueError(f"adapter tensor {key!r}: the state has {theirs or 'no such tensor'}, "
                             f"the model {expected.get(key) or 'no such tensor'} (adapters added "
                             "with other names or arguments?)")
        if not torch.isfinite(value).all():
            raise ValueError(f"adapter tensor {key!r}: holds NaN or infinite values")
    model.load_state_dict(state, strict=False)


def merge_and_unload(model):
    """Merge every adapter and put the plain modules back (nn.Linear, nn.MultiheadAttention),
    with the original keys."""
    for name, module in reversed(list(model.named_modules())):  # adapters before their attention
        if isinstance(module, LoRALinear):
            if not module.merged:
                module.merge()
            _replace(model, name, module.base)
        elif isinstance(module, SplitAttention):
            _replace(model, name, module.fused())
    return model
