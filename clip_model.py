"""OpenAI CLIP (ViT image and text transformers) in one file, loading OpenAI's released weights;
public names as openai/CLIP's. Architecture: Radford et al. 2021 (arXiv 2103.00020) and
openai/CLIP `model.py`, every size read from the checkpoint's tensor shapes. Ours: attention is
four nn.Linear per block (q/k/v/out_proj, so adapters can wrap each; the fused `in_proj_weight` is
split on load), and `encode_text` stops each prompt group at its last token."""
import contextlib
import gzip
import hashlib
import html
import math
import os
import warnings
from collections import OrderedDict
from functools import lru_cache
from operator import methodcaller

import ftfy
import regex
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

_URL = "https://openaipublic.azureedge.net/clip/models/{sha256}/{file}"
# name -> (sha256 of the file, file name); the same names as openai/CLIP's cache in ~/.cache/clip.
_MODELS = {
    "ViT-B/32": ("40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
    "ViT-B/16": ("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
    "ViT-L/14": ("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
    "ViT-L/14@336px": ("3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
                       "ViT-L-14-336px.pt"),
}
# ViT-B/16's sizes (OpenAI's ViT-B-16.pt read by build_model), for random models of that size.
VIT_B_16 = dict(embed_dim=512, image_resolution=224,
                vision_layers=12, vision_width=768, vision_patch_size=16,
                context_length=77, vocab_size=49408,
                transformer_width=512, transformer_layers=12)
# A randomly initialised small CLIP for tests and the offline demo
# (heads = width // 64, as OpenAI's rule).
TINY_CONFIG = dict(embed_dim=64, image_resolution=32,
                   vision_layers=3, vision_width=128, vision_patch_size=8,
                   context_length=77, vocab_size=49408,
                   transformer_width=128, transformer_layers=3)
MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's image normalisation (openai/CLIP clip.py)
STD = (0.26862954, 0.26130258, 0.27577711)


class LoadError(ValueError):
    """A model name, weights file or device that cannot be used; one line for the user."""


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation CLIP was trained with (openai/CLIP model.py)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections, so an adapter can wrap
    any of them."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(width, width) for _ in range(4))

    def forward(self, x, causal, read=None):
        """read: the one position (n,) of each row whose output is used, or None: all positions."""
        n, length, width = x.shape
        query = x if read is None else x[torch.arange(n), read].unsqueeze(1)  # (n, 1, width)
        pairs = ((self.q_proj, query), (self.k_proj, x), (self.v_proj, x))
        # each (n, positions, width) -> (n, heads, positions, head_dim)
        q, k, v = (proj(t).unflatten(-1, (self.heads, -1)).transpose(1, 2) for proj, t in pairs)
        mask = None
        if causal and read is not None:
            # causal and reading one position: that position sees itself and those before it;
            # (length,) <= (n, 1, 1, 1) -> (n, 1, 1, length), broadcast over heads
            mask = torch.arange(length, device=x.device) <= read[:, None, None, None]
        # SDPA scales by 1/sqrt(head_dim), as nn.MultiheadAttention
        y = F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal and read is None)
        return self.out_proj(y.transpose(1, 2).flatten(2))  # (n, positions, width)


class ResidualBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(), c_proj=nn.Linear(4 * width, width)))

    def forward(self, x, causal, read=None):
        """read: as Attention's; then only those positions are computed and returned,
        (n, 1, width)."""
        h = self.ln_1(x)
        if read is not None:  # the other positions' outputs are never used
            x = x[torch.arange(len(x)), read].unsqueeze(1)  # (n, 1, width)
        x = x + self.attn(h, causal, read)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, causal):
        super().__init__()
        self.width, self.layers, self.causal = width, layers, causal
        self.resblocks = nn.ModuleList(ResidualBlock(width, heads) for _ in range(layers))

    def forward(self, x, checkpoint=0, read=None):  # x: (n, length, width), batch first
        """The blocks in turn. Two savings, both exact:
        read: the one position (n,) of each row that is used after the last block, which computes
        only that one (ResidualBlock), or None: all. It saves the last block's compute on the other
        positions; the outputs equal openai/CLIP's (test_matches_openai_reference_tiny).
        checkpoint: the number of blocks, from the first, that keep only their input for the
        backward pass and recompute the rest there (True: all). The first ones, because the backward
        pass reaches them last, when the other blocks' activations are freed. It saves memory; the
        gradients are the same (test_checkpointed_text_tower_gives_the_same_adapter_gradients)."""
        checkpointed = self.layers if checkpoint is True else checkpoint
        for index, block in enumerate(self.resblocks):
            inputs = (x, self.causal, read if index == self.layers - 1 else None)
            if index >= checkpointed or not torch.is_grad_enabled():
                x = block(*inputs)
            else:
                # preserve_rng_state replays the random state of the forward, so adapter dropout
                # draws the same masks when the block is recomputed (torch.utils.checkpoint docs)
                x = torch.utils.checkpoint.checkpoint(block, *inputs, use_reentrant=False,
                                                      preserve_rng_state=True)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution, patch_size, width, layers, output_dim):
        super().__init__()
        self.input_resolution = input_resolution
        scale = width ** -0.5
        grid = input_resolution // patch_size  # patches along each side
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, width // 64, causal=False)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, images):
        x = self.conv1(images.to(self.conv1.weight.dtype))  # (n, width, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (n, grid * grid, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (n, 1, width)
        # (n, 1 + grid * grid, width)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        cls = torch.zeros(len(x), dtype=torch.long, device=x.device)  # the class token's position
        x = self.transformer(self.ln_pre(x), read=cls)[:, 0]  # (n, width)
        return self.ln_post(x) @ self.proj  # (n, output_dim)


class CLIP(nn.Module):
    """CLIP with a ViT image encoder; constructor arguments as openai/CLIP's `CLIP`
    (vision_layers an int)."""

    def __init__(self, embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
                 context_length, vocab_size, transformer_width, transformer_layers):
        super().__init__()
        self.context_length = context_length
        self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width,
                                        vision_layers, embed_dim)
        self.transformer = Transformer(transformer_width, transformer_layers,
                                       transformer_width // 64, causal=True)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = nn.LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        # the temperature, stored as a log (paper, sec. 2.5)
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self._init_parameters()

    def _init_parameters(self):
        # The initialisation of openai/CLIP model.py (initialize_parameters);
        # only random models depend on it.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for tower in (self.transformer, self.visual.transformer):
            proj_std = tower.width ** -0.5 * (2 * tower.layers) ** -0.5
            for block in tower.resblocks:
                attn = block.attn
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
                    std = proj_std if proj is attn.out_proj else tower.width ** -0.5
                    nn.init.normal_(proj.weight, std=std)
                    nn.init.zeros_(proj.bias)
                nn.init.normal_(block.mlp.c_fc.weight, std=(2 * tower.width) ** -0.5)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)

    def encode_image(self, images):
        """Unnormalised image features, (n, embed_dim), from normalised images (n, 3, res, res)."""
        return self.visual(images)

    def encode_text(self, tokens, checkpoint=False, group_cost=None):
        """Unnormalised text features, (n, embed_dim), from `tokenize` output (n, context_length).

        Exact truncation: under the causal mask position i sees only positions <= i, and the
        feature is read at each row's end-of-text token (its highest id), so later positions change
        nothing. Each group of prompts (`length_groups`, `group_cost` as there) runs up to its
        longest one; features come back in input order. checkpoint: as Transformer.forward's."""
        eot = tokens.argmax(dim=-1)  # (n,)
        cost = group_cost
        if cost is None:  # the device type's own, else CUDA's
            cost = GROUP_COST.get(tokens.device.type, GROUP_COST["cuda"])
        groups = length_groups(eot, cost)
        features = []
        for rows in groups:
            ends = eot[rows]
            length = int(ends.max()) + 1
            # the group's prompts up to its longest one's end token: (rows, length, width)
            x = self.token_embedding(tokens[rows, :length]) + self.positional_embedding[:length]
            # each row at its end-of-text token: (rows, 1, width) -> (rows, width)
            x = self.transformer(x, checkpoint, read=ends)[:, 0]
            features.append(self.ln_final(x) @ self.text_projection)  # (rows, embed_dim)
        # back to the input order: (n, embed_dim)
        return torch.cat(features)[torch.argsort(torch.cat(groups))]

    def forward(self, images, tokens):
        """Logits (images x texts and texts x images) with the learnt temperature,
        as openai/CLIP."""
        image = F.normalize(self.encode_image(images), dim=-1)
        text = F.normalize(self.encode_text(tokens), dim=-1)
        logits = self.logit_scale.exp() * image @ text.t()  # (images, texts)
        return logits, logits.t()  # and (texts, images)

    def openai_state_dict(self):
        """The state dict in OpenAI's key layout (fused in_proj),
        loadable by openai/CLIP and by `load`."""
        return fuse_attention(self.state_dict())


# encode_text's savings. Each is exact: a test shows the same features and gradients without it.
#
# Length groups save the compute of the positions after each prompt's end token; the features and
# gradients equal the full context's (test_length_groups_equal_full_context_outputs_and_gradients).
# GROUP_COST: the fixed cost of one more length group through the text tower, in token positions
# of compute; only speed depends on it. Our choice: on CPU measured (ViT-B/16 text tower with
# LoRA, forward and backward: 30 to 45 positions on 2 cores); on CUDA an unmeasured estimate (small
# kernels are launch-bound there, so few large groups).
GROUP_COST = {"cpu": 32, "cuda": 4096}


def length_groups(eot, cost):
    """Row indices (LongTensor each) of the groups `encode_text` runs, from the end-of-text
    positions (n,).

    Longest first, a shorter length joins the current group while the padding it adds (rows x
    length difference) costs less than `cost` positions. cost=0: one group per length; cost=inf:
    one group (one truncation)."""
    lengths, counts = torch.unique(eot, return_counts=True)  # ascending
    groups, group_length = [], None
    for length, count in zip(lengths.tolist()[::-1], counts.tolist()[::-1]):
        if group_length is not None and count * (group_length - length) < cost:
            groups[-1].append(length)
        else:
            groups.append([length])
            group_length = length
    # each group's rows: nonzero() is (rows, 1), squeezed to (rows,)
    return [torch.isin(eot, torch.tensor(members, device=eot.device)).nonzero().squeeze(1)
            for members in groups]


# Text checkpointing saves memory and is exact (Transformer.forward); the rule below picks how many
# text blocks (test_checkpointing_some_blocks_and_the_rule_for_how_many).
# --text_checkpoint auto: the bytes the text tower may keep for backward (our choice). ImageNet's
# 1,000 prompts checkpoint 7 of 12 blocks in float32, none in fp16.
TEXT_ACTIVATION_BUDGET = 2 * 2 ** 30
# What a text block keeps for backward, in values of its width per position: 18.9 with LoRA on
# q, k, v (counted by bench.saved_bytes); a checkpointed block keeps only its input, 1.
BLOCK_VALUES = 19


def text_checkpoint_blocks(model, tokens, element_size=4, budget=TEXT_ACTIVATION_BUDGET):
    """The fewest text blocks `encode_text(tokens, checkpoint=k)` must checkpoint so that the text
    tower keeps at most `budget` bytes for the backward pass (BLOCK_VALUES), each prompt computed
    up to its end token. element_size: 4 for float32, 2 under fp16 or bf16 autocast."""
    # the bytes of one value (width numbers) at every position computed
    position = int((tokens.argmax(dim=-1) + 1).sum()) * model.transformer.width * element_size
    layers = model.transformer.layers
    kept = BLOCK_VALUES * layers * position  # without checkpointing
    return min(layers, max(0, math.ceil((kept - budget) / ((BLOCK_VALUES - 1) * position))))


def text_checkpoint(mode, model, tokens, precision):
    """encode_text's checkpoint for --text_checkpoint `mode`: on (every block), off, or auto (the
    blocks of text_checkpoint_blocks, 2 bytes a value under fp16 or bf16 autocast)."""
    if mode == "auto":
        element_size = 4 if precision == "fp32" else 2
        return text_checkpoint_blocks(model, tokens, element_size=element_size)
    return mode == "on"


def split_attention(state_dict):
    """OpenAI layout -> ours:
    each `attn.in_proj_weight` (3 width x width) becomes q/k/v_proj weights."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("attn.in_proj_weight") or key.endswith("attn.in_proj_bias"):
            prefix, kind = key.rsplit(".in_proj_", 1)  # kind: "weight" or "bias"
            keys = (f"{prefix}.{name}.{kind}" for name in ("q_proj", "k_proj", "v_proj"))
            out.update(zip(keys, value.chunk(3)))  # (3 width, ...) -> 3 x (width, ...)
        else:
            out[key] = value
    return out


def fuse_attention(state_dict):
    """Ours -> OpenAI layout: q/k/v_proj are concatenated back into
    `attn.in_proj_weight`/`in_proj_bias`."""
    out = {}
    for key, value in state_dict.items():
        if ".attn.q_proj." in key:
            prefix, kind = key.split(".attn.q_proj.")
            parts = [state_dict[f"{prefix}.attn.{name}.{kind}"]
                     for name in ("q_proj", "k_proj", "v_proj")]
            # 3 x (width, ...) -> (3 width, ...)
            out[f"{prefix}.attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
        elif ".attn.k_proj." not in key and ".attn.v_proj." not in key:
            out[key] = value
    return out


def build_model(state_dict, source="state dict"):
    """A float32 CLIP whose every size is read from the tensor shapes of `state_dict`
    (either key layout)."""
    sd = split_attention({k: v for k, v in state_dict.items()
                          if k not in ("input_resolution", "context_length", "vocab_size")})
    try:
        patch = sd["visual.conv1.weight"].shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        config = dict(
            embed_dim=sd["text_projection"].shape[1],
            image_resolution=patch * grid,
            vision_layers=len({k.split(".")[3] for k in sd
                               if k.startswith("visual.transformer.resblocks.")}),
            vision_width=sd["visual.conv1.weight"].shape[0],
            vision_patch_size=patch,
            context_length=sd["positional_embedding"].shape[0],
            vocab_size=sd["token_embedding.weight"].shape[0],
            transformer_width=sd["ln_final.weight"].shape[0],
            transformer_layers=len({k.split(".")[2] for k in sd
                                    if k.startswith("transformer.resblocks.")}))
    except KeyError as missing:
        raise LoadError(f"{source}: not a CLIP ViT state dict (missing key {missing})") from None
    except (IndexError, AttributeError):
        raise LoadError(f"{source}: not a CLIP ViT state dict "
                        "(a size-giving tensor has too few dimensions)") from None
    with torch.device("meta"):  # skip the random initialisation that the weights overwrite anyway
        model = CLIP(**config)
    expected, found = set(model.state_dict()), set(sd)
    if expected != found:
        missing, extra = sorted(expected - found), sorted(found - expected)
        raise LoadError(f"{source}: state dict does not fit CLIP "
                        f"({len(missing)} missing keys, e.g. {missing[:3]}; "
                        f"{len(extra)} unexpected, e.g. {extra[:3]})")
    try:
        model.load_state_dict({k: v.float() for k, v in sd.items()}, assign=True)
    except (RuntimeError, AttributeError) as error:  # a tensor whose shape does not fit the others
        mismatches = (line.strip() for line in str(error).splitlines() if "size mismatch" in line)
        first = next(mismatches, str(error))
        raise LoadError(f"{source}: tensor shapes do not fit one CLIP ({first[:200]})") from None
    return model.eval()


def build_random(seed=0, **config):
    """A randomly initialised CLIP (OpenAI's initialisation) from a config such as TINY_CONFIG."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream untouched
        # CPU only: torch.manual_seed would also reseed CUDA and MPS
        torch.default_generator.manual_seed(seed)
        return CLIP(**config).eval()


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(name, root):
    """Path of the verified weights of `name` in `root`, downloading them when absent or corrupt."""
    sha256, filename = _MODELS[name]
    path = os.path.join(root, filename)
    if os.path.isfile(path) and _sha256(path) == sha256:
        return path
    corrupt = os.path.isfile(path)
    os.makedirs(root, exist_ok=True)
    url = _URL.format(sha256=sha256, file=filename)
    # download_url_to_file writes a temporary file, checks the hash, then renames it into place
    try:
        torch.hub.download_url_to_file(url, path, hash_prefix=sha256)
    except Exception as error:
        state = "is corrupt (sha256 mismatch)" if corrupt else "is not cached"
        todo = "delete it and retry online" if corrupt else "retry online"
        reason = str(error).splitlines()[0] if str(error) else ""
        raise LoadError(f"{path} {state} and the download failed "
                        f"({type(error).__name__}: {reason}); "
                        f"{todo}, or pass the path of a good copy of {filename} "
                        "as the backbone") from None
    return path


def _read_state_dict(path):
    """Tensors of an OpenAI TorchScript archive (never executed) or of a plain state-dict file."""
    # not TorchScript: try a state dict below
    with contextlib.suppress(Exception), warnings.catch_warnings():
        # torch marks torch.jit deprecated; OpenAI's files need it
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(path, map_location="cpu").state_dict()
    state_dict = None
    with contextlib.suppress(Exception):
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    of_tensors = isinstance(state_dict, dict) and all(
        isinstance(v, torch.Tensor) for v in state_dict.values())
    if not of_tensors:
        raise LoadError(f"{path}: neither a TorchScript archive nor a state dict of tensors")
    return state_dict


def available_models():
    """Names `load` accepts besides a file path ("tiny": a random model for tests and demos; "toy":
    the toy world's pretrained small CLIP)."""
    return list(_MODELS) + ["tiny", "toy"]


def model_name(name_or_path):
    """The model name of OpenAI's file for one
    (so that a named model and its local copy compare equal)."""
    filename = os.path.basename(name_or_path)
    return next((name for name, (_, file) in _MODELS.items() if file == filename), name_or_path)


def load(name_or_path, device="cpu", download_root=None):
    """(model, preprocess) for an OpenAI model name, "tiny", or a weights file;
    the model is float32, in eval mode."""
    if name_or_path == "tiny":
        model = build_random(**TINY_CONFIG)
    elif name_or_path == "toy":  # pretrained on first use, then cached in download_root
        import toy_world  # here: toy_world imports this module
        model = toy_world.load_pretrained(download_root)
    elif name_or_path in _MODELS or os.path.isfile(name_or_path):
        path = (_download(name_or_path, download_root or os.path.expanduser("~/.cache/clip"))
                if name_or_path in _MODELS else name_or_path)
        model = build_model(_read_state_dict(path), source=path)
    else:
        raise LoadError(f"unknown model {name_or_path!r}: expected one of {available_models()} "
                        "or the path of a weights file")
    return model.to(device), preprocess(model.visual.input_resolution)


def device(name):
    """The torch.device `--device name` names if this machine has one; else a LoadError."""
    try:
        found = torch.device(name)
    except RuntimeError:
        found = None
    if found is None or found.type not in ("cpu", "cuda", "mps"):
        raise LoadError(f"--device {name!r}: expected cpu, cuda, cuda:N or mps")
    count = torch.cuda.device_count()
    if found.type == "cuda" and not count:
        raise LoadError(f"--device {name}: no CUDA device is available here; use --device cpu")
    if found.type == "cuda" and (found.index or 0) >= count:
        raise LoadError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to "
                        f"cuda:{count - 1}")
    if found.type == "mps" and not torch.backends.mps.is_available():
        raise LoadError(f"--device {name}: MPS is not available here; use --device cpu")
    return found


def rng_state(device):
    """The state of the device's own random generator (CUDA's of that device, or MPS's), which
    draws dropout masks there; None on the CPU, whose generator torch.get_rng_state() holds."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.mps.get_rng_state() if device.type == "mps" else None


def set_rng_state(state, device):
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    elif device.type == "mps":
        torch.mps.set_rng_state(state)


def resolve_precision(requested, device):
    """The --precision that runs on `device`: auto is fp16 on CUDA (the official lora.py), fp32
    elsewhere (our choice: bf16 is slow on CPUs without bf16 units, fp16 on nearly all CPUs)."""
    return ("fp16" if device.type == "cuda" else "fp32") if requested == "auto" else requested


def autocast(device, precision):
    """Autocast to fp16 or bf16 on the device's own type (CPU included); none for fp32.
    precision: --precision."""
    precision = resolve_precision(precision, device)  # auto: fp16 or fp32
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


def text_features(model, tokens, device, precision, checkpoint=False):
    """Normalised float32 features of tokenized prompts, under `precision`'s autocast; checkpoint
    as encode_text's."""
    with autocast(device, precision):
        features = model.encode_text(tokens.to(device), checkpoint=checkpoint)
    return F.normalize(features.float(), dim=-1)


@torch.no_grad()
def image_features(model, loader, device, precision):
    """Normalised float32 features and the labels of a loader's images, under `precision`."""
    features, labels = [], []
    for images, target in loader:  # pinned memory (CUDA only): the copies overlap
        with autocast(device, precision):
            image = model.encode_image(images.to(device, non_blocking=True))
        features.append(F.normalize(image.float(), dim=-1))
        labels.append(target.to(device, non_blocking=True))
    return torch.cat(features), torch.cat(labels)


def preprocess(resolution):
    """The test-time transform of openai/CLIP:
    bicubic resize, center crop, RGB, CLIP normalisation."""
    from torchvision import transforms as T  # only preprocessing needs torchvision
    # methodcaller, not a lambda: DataLoader workers started by spawn or forkserver
    # must unpickle the transform
    return T.Compose([T.Resize(resolution, interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(resolution),
                      methodcaller("convert", "RGB"),
                      T.ToTensor(),
                      T.Normalize(MEAN, STD)])


def _position_blocks(position, depth):
    """Block indices of CLIP-LoRA's position names as fractions of the depth (our rule), giving
    exactly the official tables (MaxZanella/CLIP-LoRA loralib/utils.py
    INDEX_POSITIONS_TEXT/_VISION, commit 358f0d7):
    at 12 blocks (text towers, ViT-B vision towers)
    bottom 0-3, mid 4-7, up 8-11, half-bottom 0-5, half-up 6-11, top3 9-11, all 0-11;
    at ViT-L/14's 24 (since e6bf706; all was 0-20 before)
    half-bottom 0-11, half-up 12-23, all 0-23.
    Where apply_lora has no entry (KeyError) ours goes on: top3 on ViT-B/32's vision tower;
    bottom 0-7, mid 8-15, up 16-23, top3 21-23 on ViT-L/14's; every position on ViT-L/14@336px's."""
    ranges = {"all": (0, depth),
              "bottom": (0, depth // 3),
              "mid": (depth // 3, 2 * depth // 3),
              "up": (2 * depth // 3, depth),
              "half-up": (depth // 2, depth),
              "half-bottom": (0, depth // 2),
              "top3": (max(depth - 3, 0), depth)}
    if position not in ranges:
        raise ValueError(f"position {position!r}: expected one of {list(ranges)}")
    return range(*ranges[position])


POSITIONS = ("all", "bottom", "mid", "up", "half-up", "half-bottom", "top3")
PROJECTIONS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}


def adapter_names(model, encoder="both", position="all", projections=("q", "k", "v")):
    """Full names of the attention projections CLIP-LoRA's flags choose, for
    `comp_lora.add_adapters`.
    encoder: "vision", "text" or "both"; position: one of POSITIONS;
    projections: subset of "q", "k", "v", "o"."""
    if encoder not in ("vision", "text", "both"):
        raise ValueError(f"encoder {encoder!r}: expected vision, text or both")
    unknown = [p for p in projections if p not in PROJECTIONS]
    if unknown or not projections:
        raise ValueError(f"projections {list(projections)}: "
                         f"expected a non-empty subset of {list(PROJECTIONS)}")
    towers = [t for e, t in (("vision", "visual.transformer"), ("text", "transformer"))
              if encoder in (e, "both")]
    names = [f"{tower}.resblocks.{index}.attn.{PROJECTIONS[p]}"
             for tower in towers
             for index in _position_blocks(position, model.get_submodule(tower).layers)
             for p in projections]
    if not names:
        raise ValueError(f"position {position!r} selects no block of this model")
    return names


def _bytes_to_unicode():
    """OpenAI's reversible map of the 256 bytes to printable characters (GPT-2's byte-level BPE).
    Order matters: printable bytes first, then the others as chr(256), chr(257), ...;
    the vocabulary's first 256 ids follow it."""
    printable = [*range(ord("!"), ord("~") + 1),
                 *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


class Tokenizer:
    """OpenAI CLIP's byte-level BPE (49,408 tokens) over the vendored
    `bpe_simple_vocab_16e6.txt.gz`."""

    SPLIT = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|"""
                          r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                          regex.IGNORECASE)

    def __init__(self, vocab_path=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "bpe_simple_vocab_16e6.txt.gz")):
        self.byte_encoder = _bytes_to_unicode()
        with gzip.open(vocab_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # the first 48,894 merges
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
        symbols, specials = list(self.byte_encoder.values()), ["<|startoftext|>", "<|endoftext|>"]
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + specials
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.merge_rank = {pair: i for i, pair in enumerate(merges)}
        self.sot, self.eot = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]

    @lru_cache(maxsize=100_000)
    def _bpe(self, word):
        """Apply the merges to one pre-token, lowest rank first; returns the list of sub-tokens."""
        if word in ("<|startoftext|>", "<|endoftext|>"):
            return [word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda pair: self.merge_rank.get(pair, math.inf))
            if best not in self.merge_rank:
                break
            i = 0
            while i < len(parts) - 1:  # merge every occurrence, left to right, without overlaps
                if (parts[i], parts[i + 1]) == best:
                    parts[i:i + 2] = [parts[i] + parts[i + 1]]
                i += 1
        return parts

    def encode(self, text):
        """Token ids of `text` without start/end tokens
        (ftfy fix, HTML unescape, whitespace, lower case)."""
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        text = regex.sub(r"\s+", " ", text).strip().lower()
        ids = []
        for word in self.SPLIT.findall(text):
            word = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[part] for part in self._bpe(word))
        return ids


# one Tokenizer, read from the vocabulary file at the first tokenize
_tokenizer = lru_cache(maxsize=1)(Tokenizer)


def tokenize(texts, context_length=77, truncate=False):
    """(n, context_length) LongTensor of start + BPE ids + end tokens, zero padded,
    as openai/CLIP."""
    if isinstance(texts, str):
        texts = [texts]
    tok = _tokenizer()
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [tok.sot] + tok.encode(text) + [tok.eot]
        if len(ids) > context_length:
            if not truncate:
                # truncate=True cuts it instead
                raise ValueError(f"{text[:60]!r}... has {len(ids)} tokens, "
                                 f"more than the context length {context_length}")
            ids = ids[:context_length - 1] + [tok.eot]
        result[row, :len(ids)] = torch.tensor(ids)
    return result
