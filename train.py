"""Few-shot training and evaluation of CLIP with LoRA, Comp-LoRA or Block-LoRA.

    python train.py --method comp --dataset eurosat --shots 4 --root /data
    python train.py --dataset synthetic --backbone tiny --shots 4 --n_iters 15     # offline demo
    python train.py --summarize out/

Flags and defaults are those of the official CLIP-LoRA code (MaxZanella/CLIP-LoRA, run_utils.py and
lora.py), so its results are reproduced by default and its users only change the script name.
"""
import argparse
import contextlib
import csv
import io
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time

try:
    import fcntl  # POSIX: serialises concurrent runs' saves
except ImportError:  # Windows: saves are still atomic file by file
    fcntl = None

import torch
import torch.nn.functional as F

import clip_model
import data
from block_lora import BlockLoRALinear
from comp_lora import CompLoRALinear, LoRALinear

METHODS = ("lora", "comp", "block")
LOGIT_SCALE = 100  # CLIP-LoRA's fixed scale on the cosine similarities (main.py), not the learnt one
ADAPTER_FIELDS = ("method", "r", "alpha", "scaling_rule", "blocks", "comp_ratio", "encoder", "position",
                  "params", "backbone")  # what defines the adapted model; dropout only matters in training


MAX_SEED = 2 ** 32 - 1


class UserError(Exception):
    """A mistake in the command line or the files it names; printed as one line."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """One line, as every other user mistake (argparse prints its usage block first)."""
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="lora", help="lora, comp or block")
    p.add_argument("--dataset", default="dtd", help=f"one of {', '.join(data.DATASETS)}, or synthetic")
    p.add_argument("--root", "--root_path", dest="root", default="",
                   help="data root (CoOp layout); with --dataset synthetic, a new folder for the demo data "
                        "(default <save_path>/synthetic_data); an existing folder is never written into")
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--seed", type=int, default=1, help=f"0 to {MAX_SEED} (numpy's limit in CLIP-LoRA's seeding)")
    p.add_argument("--backbone", default="ViT-B/16", help=f"{clip_model.available_models()} or a weights file")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--n_iters", type=int, default=500, help="total iterations = n_iters x shots")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--r", type=int, default=2)
    p.add_argument("--alpha", type=float, default=1, help="scaling s = alpha / sqrt(r); 0 is refused (nothing "
                                                          "would train)")
    p.add_argument("--dropout_rate", type=float, default=0.25)
    p.add_argument("--encoder", default="both", choices=["text", "vision", "both"])
    p.add_argument("--params", nargs="+", default=["q", "k", "v"], help="projections among q k v o")
    p.add_argument("--position", default="all", choices=clip_model.POSITIONS)
    p.add_argument("--blocks", type=int, default=8, help="Block-LoRA: number of input chunks n")
    p.add_argument("--comp_ratio", type=float, default=0.5, help="Comp-LoRA: protected share k / min(d_out, d_in)")
    p.add_argument("--save_path", default="out",
                   help="results root: <save_path>/<dataset>/<method>/<shots>shots/seed<seed>/; a folder that "
                        "holds a run of another configuration is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a saved run of another configuration in the same folder")
    p.add_argument("--eval_only", action="store_true",
                   help="evaluate the saved adapter of this configuration (ours, or CLIP-LoRA's file at "
                        "<save_path>/<backbone>/<dataset>/<shots>shots/seed<seed>/<filename>.pt); writes no "
                        "result files, only --export_merged if given")
    p.add_argument("--adapter", default="", metavar="FILE",
                   help="evaluate this adapter file (ours or CLIP-LoRA's), like --eval_only")
    p.add_argument("--filename", default="lora_weights", help="CLIP-LoRA's adapter file name, without .pt")
    p.add_argument("--eval_datasets", default="",
                   help="comma-separated datasets for zero-shot retention after training")
    p.add_argument("--subsample", default="all", choices=["all", "base"], help="base: base-to-novel protocol")
    p.add_argument("--export_merged", default="", metavar="FILE",
                   help="also write a plain CLIP state dict with the adapters merged (with --eval_only or "
                        "--adapter: of the evaluated adapter)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="autocast dtype; auto: fp16 with a gradient scaler on CUDA (as the official lora.py), fp32 "
                        "elsewhere. fp16 also runs on CPU (slowly: the code path a GPU runs); bf16 needs no scaler")
    p.add_argument("--text_checkpoint", default="auto", choices=["auto", "on", "off"],
                   help="recompute the text tower's activations in the backward pass instead of storing them "
                        "(less memory, one more text forward per step); auto: on when the class prompts span more "
                        "than 4096 token positions (ImageNet's 1,000 prompts: 9,165)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="loader processes; results do not depend on it")
    p.add_argument("--print_every", type=int, default=50, help="iterations between progress lines")
    p.add_argument("--summarize", metavar="DIR", help="print mean and std over seeds of the results under DIR, "
                   "a table per configuration")
    p.add_argument("--format", choices=FORMATS, help="with --summarize: text (default), markdown or csv")
    p.add_argument("--plot", metavar="FILE.png", help="with --summarize: also draw accuracy against shots "
                   "(needs matplotlib)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------- adapters

def adapter_config(args):
    """The fields that define an adapted model, stored with the adapter weights."""
    return {"method": args.method, "r": args.r, "alpha": args.alpha, "scaling_rule": "alpha/sqrt(r)",
            "dropout": args.dropout_rate, "blocks": args.blocks if args.method == "block" else None,
            "comp_ratio": args.comp_ratio if args.method == "comp" else None, "encoder": args.encoder,
            "position": args.position, "params": canonical_params(args.params),
            "backbone": backbone_name(args.backbone)}


def canonical_params(params):
    """Projection letters in q, k, v, o order: --params v q and --params q v make the same model."""
    order = list(clip_model.PROJECTIONS)
    return sorted(params, key=lambda p: order.index(p) if p in order else len(order))


def backbone_name(backbone):
    """The model name for a known file of OpenAI's (so a named model and its local file compare equal)."""
    for name, (_, filename) in clip_model._MODELS.items():
        if os.path.basename(backbone) == filename:
            return name
    return backbone


def add_adapters(model, config):
    """Wrap the configured attention projections with the configured adapter; freeze everything else."""
    def make_layer(linear, name):
        kwargs = dict(r=config["r"], alpha=config["alpha"], dropout=config["dropout"])
        if config["method"] == "comp":
            return CompLoRALinear(linear, comp_ratio=config["comp_ratio"], **kwargs)
        if config["method"] == "block":
            return BlockLoRALinear(linear, blocks=config["blocks"], name=name, **kwargs)
        return LoRALinear(linear, **kwargs)

    try:
        layers = clip_model.adapt_attention(model, make_layer, config["encoder"], config["position"], config["params"])
    except ValueError as error:
        raise UserError(str(error)) from None
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_key(name))
    return [layer for _, layer in layers]


def parameter_line(model):
    """peft's summary line: trainable params: N || all params: M || trainable%: P."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def is_adapter_key(key):
    return key.rsplit(".", 1)[-1].startswith("lora_")


def adapter_tensors(model):
    """The lora_ tensors of `model`, on the CPU: what an adapter file holds."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if is_adapter_key(k)}


def write_adapters(file, model, config):
    """One torch.save file: {"config": adapter config, "state_dict": the lora_ tensors}."""
    torch.save({"config": config, "state_dict": adapter_tensors(model)}, file)


def save_adapters(path, model, config):
    """Write an adapter file for `model`, all or nothing (see save_files)."""
    save_files([(path, lambda f: write_adapters(f, model, config))])


def load_adapters(path, model, config):
    """Load an adapter file into a model already adapted with `config`. The file's config must equal
    `config` field by field, and its tensors must be exactly the model's lora_ tensors, shapes included;
    anything else is a UserError naming the file and the first offending field or key."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        raise UserError(f"{path}: cannot be read as an adapter file ({reason})") from None
    fields = ADAPTER_FIELDS
    if is_clip_lora(saved):  # the official code's file: it records no backbone (nor dropout)
        depths = {"text": model.transformer.layers, "vision": model.visual.transformer.layers}
        saved_config, tensors = from_clip_lora(saved, path, depths)
        fields = [field for field in ADAPTER_FIELDS if field in saved_config]
    elif (isinstance(saved, dict) and isinstance(saved.get("config"), dict)
          and isinstance(saved.get("state_dict"), dict)):
        saved_config, tensors = saved["config"], saved["state_dict"]
    else:
        raise UserError(f"{path}: not an adapter file of train.py or CLIP-LoRA (expected a dict with a 'config' "
                        "dict and a 'state_dict' dict, or CLIP-LoRA's 'weights' and 'metadata')")
    for field in fields:
        saved_value = saved_config.get(field)
        if field == "params" and isinstance(saved_value, list):  # the same projections in any order
            saved_value = canonical_params(saved_value)
        if saved_value != config[field]:
            raise UserError(f"{path}: adapter {field} is {saved_config.get(field)!r}, "
                            f"but this run has {field} {config[field]!r}")
    expected = {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}
    for key, value in tensors.items():
        if key not in expected:
            raise UserError(f"{path}: unexpected tensor {key!r}: this configuration has no such adapter tensor")
        if not isinstance(value, torch.Tensor) or value.shape != expected[key].shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise UserError(f"{path}: tensor {key!r} has shape {shape}, expected {tuple(expected[key].shape)}")
        if not torch.isfinite(value).all():
            raise UserError(f"{path}: tensor {key!r} holds NaN or infinite values")
    missing = [key for key in expected if key not in tensors]
    if missing:
        raise UserError(f"{path}: adapter tensor {missing[0]!r} is missing ({len(missing)} of {len(expected)})")
    model.load_state_dict(tensors, strict=False)


def merge_all(layers):
    """Merge every adapter into its frozen weight, for export or zero-overhead inference."""
    for layer in layers:
        layer.merge()


def merged_state_dict(model):
    """A plain CLIP state dict (OpenAI layout) of a model whose adapters are all merged."""
    plain = {key.replace(".base.", "."): value for key, value in model.state_dict().items()
             if not is_adapter_key(key)}
    return clip_model.fuse_attention(plain)


# ----------------------------------------------------------------------------------- saving

def save_files(files, log=None, before_commit=None):
    """Write a set of files all or nothing, then append one line to a log.

    Each (path, write) is written by write(binary file) under a temporary name beside `path`, flushed, fsynced
    and closed. Then, holding a lock on the log (log = (path, line); concurrent runs take turns), before_commit()
    may refuse, every file is renamed into place and the line is appended whole. On any failure, Ctrl-C
    included, the files that were there before are put back and no temporary file or new folder stays; an
    OSError (disk full, permission, missing folder) becomes a one-line UserError naming the path.
    """
    if not files and not log:
        return
    staged, replaced, created = [], [], []  # (tmp, path); (path, backup or None); new folders
    current = files[0][0] if files else log[0]
    try:
        for path, write in files:
            current = path
            created += make_folders(os.path.dirname(os.path.abspath(path)))
            tmp = f"{path}.tmp{os.getpid()}"
            staged.append((tmp, path))
            with open(tmp, "xb") as f:  # leaving the block closes it: an error at close is raised too
                write(f)
                f.flush()
                os.fsync(f.fileno())
        current = log[0] if log else current
        with locked_append(log) as append:
            if before_commit:
                before_commit()
            for tmp, path in staged:
                current = path
                backup = f"{path}.old{os.getpid()}" if os.path.lexists(path) else None
                if backup:
                    os.replace(path, backup)
                replaced.append((path, backup))
                os.replace(tmp, path)
            current = log[0] if log else current
            append()
    except BaseException as error:
        for path, backup in reversed(replaced):  # put back what was there
            if backup:
                os.replace(backup, path)
            elif os.path.lexists(path):
                os.remove(path)
        for tmp, _ in staged:
            if os.path.lexists(tmp):
                os.remove(tmp)
        for folder in created:  # deepest first; only the ones this call made, and only if still empty
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        if isinstance(error, OSError):
            raise UserError(f"{error.filename or current}: cannot write ({error.strerror or error}); "
                            "nothing was saved, earlier results are unchanged") from None
        raise
    for path, backup in replaced:
        if backup:
            os.remove(backup)
    for folder in {os.path.dirname(os.path.abspath(path)) for _, path in staged}:
        sync_folder(folder)  # make the renames themselves durable


def make_folders(folder):
    """Create `folder` and its missing parents; returns the ones created, deepest first."""
    missing = []
    while not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    created = []
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another run may create it at the same moment
            os.mkdir(path)
            created.insert(0, path)
    return created


@contextlib.contextmanager
def locked_append(log):
    """Hold an exclusive lock on the log file (where fcntl exists); yields append(), which writes the line
    whole and fsyncs it, or cuts the file back to its size if that fails."""
    if not log:
        yield lambda: None
        return
    path, line = log
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if fcntl:
            fcntl.flock(fd, fcntl.LOCK_EX)

        def append():
            size = os.fstat(fd).st_size
            try:
                remaining = line.encode()
                while remaining:
                    remaining = remaining[os.write(fd, remaining):]
                os.fsync(fd)
            except BaseException:
                os.ftruncate(fd, size)
                raise
        yield append
    finally:
        os.close(fd)  # also releases the lock


def sync_folder(folder):
    with contextlib.suppress(OSError):  # not every system can fsync a folder; the data itself is synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------- CLIP-LoRA's adapter files
# The official code's save_lora / load_lora (MaxZanella/CLIP-LoRA loralib/utils.py, commit 358f0d7) write
#   {"weights": {"layer_<i>": {"q_proj" | "k_proj" | "v_proj" | "proj":
#                                  {"w_lora_A": r x d_in, "w_lora_B": d_out x r}}},
#    "metadata": {"r": int, "alpha": int, "encoder": str, "params": [letters as given], "position": str}}
# where layer_<i> is the i-th attention module apply_lora adapted: text tower blocks first, then vision blocks,
# each in block order. Its LinearLoRA is ours: h = W x + b + alpha/sqrt(r) B A dropout(x) (loralib/layers.py).
CLIP_LORA_KEYS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "proj"}  # their key for each of our letters
CLIP_LORA_METADATA = ("r", "alpha", "encoder", "params", "position")


def is_int(value):
    """An int that is not a bool (JSON and torch.load give both)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
    """A finite int or float that is not a bool."""
    try:
        return (is_int(value) or isinstance(value, float)) and math.isfinite(value)
    except OverflowError:  # an int beyond float range
        return False


def clip_lora_path(save_path, backbone, dataset, shots, seed, filename="lora_weights"):
    """Where CLIP-LoRA's save_lora writes: <save_path>/<backbone>/<dataset>/<shots>shots/seed<seed>/<filename>.pt,
    with the backbone name stripped of '/' and '-' and lower-cased (ViT-B/16 -> vitb16)."""
    folder = backbone.replace("/", "").replace("-", "").lower()
    return os.path.join(save_path, folder, dataset, f"{shots}shots", f"seed{seed}", f"{filename}.pt")


def is_clip_lora(saved):
    """Whether a loaded adapter file is in CLIP-LoRA's layout rather than ours ({"config", "state_dict"})."""
    return isinstance(saved, dict) and ("weights" in saved or "metadata" in saved)


def clip_lora_modules(encoder, position, depths):
    """Our attention modules in the order apply_lora adapts them; depths: {"text": blocks, "vision": blocks}."""
    towers = (("text", "transformer"), ("vision", "visual.transformer"))
    return [f"{prefix}.resblocks.{block}.attn" for tower, prefix in towers if encoder in (tower, "both")
            for block in clip_model._position_blocks(position, depths[tower])]


def from_clip_lora(saved, path, depths):
    """(config, tensors) of a loaded CLIP-LoRA file: our adapter config (method lora) and the lora_ tensors under
    our state-dict names. depths: {"text": blocks, "vision": blocks} of the model, which fix the blocks that
    `position` names. A malformed file is a UserError naming `path` and the first offending key."""
    def bad(key, problem):
        return UserError(f"{path}: CLIP-LoRA adapter file: {key} {problem}")

    if not isinstance(saved, dict):
        raise bad("the file", f"holds a {type(saved).__name__}, expected a dict with 'weights' and 'metadata'")
    for key in saved:
        if key not in ("weights", "metadata"):
            raise bad(repr(key), "is not a key of this format (expected 'weights' and 'metadata')")
    for key in ("metadata", "weights"):
        if not isinstance(saved.get(key), dict):
            raise bad(repr(key), "is missing" if key not in saved else "is not a dict")
    meta = saved["metadata"]
    for field in meta:
        if field not in CLIP_LORA_METADATA:
            raise bad(f"metadata[{field!r}]", f"is not a field of this format ({', '.join(CLIP_LORA_METADATA)})")
    for field in CLIP_LORA_METADATA:
        if field not in meta:
            raise bad(f"metadata[{field!r}]", "is missing")
    r, alpha, encoder, params, position = (meta[field] for field in CLIP_LORA_METADATA)
    if not is_int(r) or r < 1:
        raise bad("metadata['r']", f"is {r!r}, expected a positive integer")
    if not is_number(alpha):
        raise bad("metadata['alpha']", f"is {alpha!r}, expected a number")
    if encoder not in ("text", "vision", "both"):
        raise bad("metadata['encoder']", f"is {encoder!r}, expected text, vision or both")
    if (not isinstance(params, list) or not params or len(set(map(repr, params))) != len(params)
            or not all(isinstance(p, str) and p in CLIP_LORA_KEYS for p in params)):
        raise bad("metadata['params']", f"is {params!r}, expected distinct letters among q k v o")
    if position not in clip_model.POSITIONS:
        raise bad("metadata['position']", f"is {position!r}, expected one of {', '.join(clip_model.POSITIONS)}")

    modules = clip_lora_modules(encoder, position, depths)
    layers = [f"layer_{i}" for i in range(len(modules))]
    built = (f"encoder {encoder} and position {position} adapt {len(modules)} attention modules "
             f"(layer_0 to layer_{len(modules) - 1}) on a model of {depths['text']} text and "
             f"{depths['vision']} vision blocks")
    for key in saved["weights"]:
        if key not in layers:
            raise bad(f"weights[{key!r}]", f"is not expected: {built}")
    expected = [CLIP_LORA_KEYS[p] for p in params]
    tensors = {}
    for layer, module in zip(layers, modules):
        where = f"weights[{layer!r}]"
        if layer not in saved["weights"]:
            raise bad(where, f"is missing: {built}")
        entry = saved["weights"][layer]
        if not isinstance(entry, dict):
            raise bad(where, "is not a dict")
        for key in entry:
            if key not in expected:
                raise bad(f"{where}[{key!r}]", f"is not expected: params {params} adapt {', '.join(expected)}")
        for letter, key in zip(params, expected):
            pair = entry.get(key)
            if not isinstance(pair, dict) or set(pair) != {"w_lora_A", "w_lora_B"}:
                raise bad(f"{where}[{key!r}]", "is missing" if pair is None else
                          "is not a dict of exactly 'w_lora_A' and 'w_lora_B'")
            a, b = pair["w_lora_A"], pair["w_lora_B"]
            for name, tensor, r_dim in (("w_lora_A", a, 0), ("w_lora_B", b, 1)):
                if (not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dim() != 2
                        or tensor.shape[r_dim] != r):
                    shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                    wanted = "r x d_in" if r_dim == 0 else "d_out x r"
                    raise bad(f"{where}[{key!r}][{name!r}]", f"is {shape}, expected a float tensor {wanted}, r={r}")
            name = f"{module}.{clip_model.PROJECTIONS[letter]}"
            tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = a, b
    config = {"method": "lora", "r": r, "alpha": float(alpha), "scaling_rule": "alpha/sqrt(r)", "blocks": None,
              "comp_ratio": None, "encoder": encoder, "position": position, "params": list(params)}
    return config, tensors


# ------------------------------------------------------------------------------ evaluation

def resolve_precision(requested, device):
    """The --precision that runs on `device`: auto is fp16 on CUDA (the official lora.py), fp32 elsewhere (our
    choice: bf16 is slow on CPUs without bf16 units, fp16 on nearly all CPUs)."""
    if requested == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return requested


def autocast(device, precision):
    """Autocast to fp16 or bf16 on the device's own type (CPU included); none for fp32. precision: --precision."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(resolve_precision(precision, device))
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


def class_prompts(classnames, template):
    """CLIP-LoRA's prompts: the template filled with each class name, underscores as spaces (lora.py)."""
    prompts = [template.format(name.replace("_", " ")) for name in classnames]
    try:
        return clip_model.tokenize(prompts)
    except ValueError:  # tokenize refuses texts over the context length rather than cutting them
        for prompt in prompts:
            with contextlib.suppress(ValueError):
                clip_model.tokenize(prompt)
                continue
            raise UserError(f"class prompt {prompt[:60]!r}... has more than CLIP's 77 tokens; shorten that class "
                            "name") from None
        raise


TEXT_CHECKPOINT_POSITIONS = 4096  # --text_checkpoint auto: our threshold, from bench.py --imagenet (README, Cost)


def text_checkpointing(mode, tokens):
    """--text_checkpoint for these prompts: on, off, or auto = on above TEXT_CHECKPOINT_POSITIONS positions."""
    if mode == "auto":
        return int((tokens.argmax(dim=-1) + 1).sum()) > TEXT_CHECKPOINT_POSITIONS  # each prompt up to its end token
    return mode == "on"


def text_features(model, tokens, device, precision, checkpoint=False):
    """Normalised float32 features of tokenized prompts; checkpoint: recompute the text tower in backward."""
    with autocast(device, precision):
        features = model.encode_text(tokens.to(device), checkpoint=checkpoint)
    return F.normalize(features.float(), dim=-1)


@torch.no_grad()
def image_features(model, loader, device, precision):
    """Normalised image features and labels of a whole loader."""
    features, labels = [], []
    for images, target in loader:
        with autocast(device, precision):
            features.append(F.normalize(model.encode_image(images.to(device)).float(), dim=-1))
        labels.append(target.to(device))
    return torch.cat(features), torch.cat(labels)


def accuracy(logits, labels):
    return 100.0 * (logits.argmax(dim=-1) == labels).float().mean().item()


@torch.no_grad()
def zero_shot_accuracy(model, dataset, template, preprocess, args, device, cached=None):
    """Test accuracy of `model` on `dataset` with prompts from `template`; `cached` = precomputed image features."""
    model.eval()
    text = text_features(model, class_prompts(dataset.classnames, template), device, args.precision)
    images, labels = cached or image_features(model, test_loader(dataset, preprocess, args), device, args.precision)
    return accuracy(images @ text.t(), labels)


def test_loader(dataset, preprocess, args):
    return data.make_loader(dataset.test, preprocess, batch_size=256, shuffle=False, workers=args.workers)


# -------------------------------------------------------------------------------- training

def train(model, dataset, args, device, resolution):
    """CLIP-LoRA's loop (lora.py): AdamW, cosine to 1e-6 stepped per iteration, n_iters x shots iterations."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, betas=(0.9, 0.999), weight_decay=1e-2)
    total = args.n_iters * args.shots
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total, eta_min=1e-6)
    precision = resolve_precision(args.precision, device)
    # fp16 needs loss scaling against gradient underflow, and skips a step whose gradients overflowed (official
    # lora.py; GradScaler's defaults); bf16 has float32's range and needs none
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    loader = data.make_loader(dataset.train, data.train_transform(resolution), batch_size=args.batch_size,
                              shuffle=True, workers=args.workers, seed=args.seed)
    tokens = class_prompts(dataset.classnames, dataset.template[0]).to(device)
    checkpoint = text_checkpointing(args.text_checkpoint, tokens)
    if args.encoder == "vision":  # the text tower is frozen: its features never change
        with torch.no_grad():
            fixed_text = text_features(model, tokens, device, precision)
    iteration, window = 0, {"loss": 0.0, "correct": 0, "seen": 0, "iterations": 0}
    start = last_print = time.time()
    while iteration < total:
        model.train()
        for images, target in loader:
            images, target = images.to(device), target.to(device)
            if args.encoder == "vision":
                text = fixed_text
            else:
                text = text_features(model, tokens, device, precision, checkpoint)
            with autocast(device, precision), torch.set_grad_enabled(args.encoder != "text"):
                image = F.normalize(model.encode_image(images).float(), dim=-1)
            logits = LOGIT_SCALE * image @ text.t()
            loss = F.cross_entropy(logits, target)
            if not torch.isfinite(loss):
                raise UserError(f"loss became {loss.item()} at iteration {iteration + 1}/{total}; nothing was saved "
                                "(try a lower --lr)")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            iteration += 1
            window["loss"] += loss.item() * len(target)
            window["correct"] += (logits.argmax(-1) == target).sum().item()
            window["seen"] += len(target)
            window["iterations"] += 1
            if iteration % args.print_every == 0 or iteration == total:
                now = time.time()
                eta = (total - iteration) * (now - start) / iteration
                print(f"iter {iteration}/{total}  loss {window['loss'] / window['seen']:.4f}  "
                      f"train acc {100 * window['correct'] / window['seen']:.2f}  lr {scheduler.get_last_lr()[0]:.3g}  "
                      f"{window['iterations'] / max(now - last_print, 1e-9):.2f} it/s  eta {eta:.0f}s", flush=True)
                last_print, window = now, dict.fromkeys(window, 0)
            if iteration == total:
                break
    return time.time() - start


# ------------------------------------------------------------------------------------ runs

def run_dir(args):
    return os.path.join(args.save_path, args.dataset, args.method, f"{args.shots}shots", f"seed{args.seed}")


RUN_FIELDS = ("dataset", "shots", "method", "backbone", "r", "alpha", "dropout_rate", "encoder", "params", "position",
              "blocks", "comp_ratio", "lr", "n_iters", "batch_size", "subsample", "precision")


def run_config(args, device):
    """Every setting that changes a run's result (not the seed, paths, device, workers or printing): what
    --summarize groups by, and what a run folder may only be replaced with (unless --overwrite). The adapter's
    settings come from adapter_config, the others from the flags."""
    adapter = adapter_config(args)
    config = {field: adapter[field] if field in adapter else getattr(args, field) for field in RUN_FIELDS
              if field != "precision"}
    config["precision"] = resolve_precision(args.precision, device)
    return config


def check_number(value, flag, valid, expected):
    if not (math.isfinite(value) and valid(value)):
        raise UserError(f"--{flag} {value}: expected {expected}")


def check_device(name):
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA device is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name!r}: expected cpu, cuda, cuda:N or mps")
    return device


def check_args(args):
    """Every flag and cheap precondition, before any download, data pass or folder creation; returns the device."""
    if args.method not in METHODS:
        raise UserError(f"--method {args.method!r}: expected one of {', '.join(METHODS)}")
    eval_datasets = list(filter(None, args.eval_datasets.split(",")))
    for flag, names in (("dataset", [args.dataset]), ("eval_datasets", eval_datasets)):
        for name in names:
            if name not in data.DATASETS and name != "synthetic":
                raise UserError(f"--{flag} {name!r}: expected one of {', '.join(data.DATASETS)}, synthetic")
    if data.DATASETS.get(args.dataset) and data.DATASETS[args.dataset].eval_only:
        raise UserError(f"--dataset {args.dataset}: an evaluation-only dataset (no train split); "
                        "use it in --eval_datasets")
    for flag in ("shots", "n_iters", "batch_size", "r", "blocks", "print_every"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: expected a positive integer")
    if not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed {args.seed}: expected an integer from 0 to {MAX_SEED}")
    check_number(args.lr, "lr", lambda lr: lr > 0, "a positive number")
    check_number(args.alpha, "alpha", lambda alpha: alpha != 0, "a finite number other than 0")
    for flag in ("dropout_rate", "comp_ratio"):
        check_number(getattr(args, flag), flag, lambda share: 0 <= share < 1, "a number in [0, 1)")
    unknown = [p for p in args.params if p not in clip_model.PROJECTIONS]
    if unknown or len(set(args.params)) != len(args.params):
        what = f"unknown {unknown[0]!r}" if unknown else "a projection named twice"
        raise UserError(f"--params {' '.join(args.params)}: {what}; expected distinct names among "
                        f"{' '.join(clip_model.PROJECTIONS)}")
    if not args.save_path:
        raise UserError("--save_path '': expected a folder name")
    if args.workers < 0:
        raise UserError(f"--workers {args.workers}: expected 0 or more")
    if args.backbone not in clip_model.available_models() and not os.path.isfile(args.backbone):
        raise UserError(f"--backbone {args.backbone!r}: expected one of {clip_model.available_models()} "
                        "or the path of a weights file")
    if args.adapter and not os.path.isfile(args.adapter):
        raise UserError(f"--adapter {args.adapter}: no such file")
    if args.export_merged:
        check_new_file(args.export_merged, "--export_merged")
    return check_device(args.device)


def check_new_file(path, flag):
    """`path` can be written: its folder exists and takes a file, and it is not itself a folder."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"{flag} {path}: is a folder; expected a file name")
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: folder {folder} does not exist")
    probe_writable(folder, flag)


def probe_writable(folder, what):
    try:
        fd, probe = tempfile.mkstemp(prefix=".write_test", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as error:
        raise UserError(f"{what} {folder}: cannot write ({error.strerror})") from None


def check_output_folder(directory):
    """The run folder can be created later: its nearest existing ancestor is a folder we can write in."""
    ancestor = os.path.abspath(directory)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise UserError(f"output directory {directory}: cannot write ({ancestor} is a file)")
    probe_writable(ancestor, f"output directory {directory}:")


def check_run_identity(out, config, overwrite):
    """Refuse to replace a saved run of another configuration (unless --overwrite); same config: replace."""
    path = os.path.join(out, "results.json")
    if overwrite or not (os.path.lexists(path) or os.path.lexists(os.path.join(out, "adapter.pt"))):
        return
    hint = "choose another --save_path, or pass --overwrite to replace it"
    try:
        with open(path) as f:
            saved = json.load(f)["config"]
        differing = next((field for field in RUN_FIELDS if saved.get(field) != config[field]), None)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{out} holds a run whose results.json is missing, unreadable or from an older "
                        f"version; {hint}") from None
    if differing:
        raise UserError(f"{out} holds a run with {differing} {saved.get(differing)!r}, this run has {differing} "
                        f"{config[differing]!r}; {hint}")


def load_dataset(name, args, subsample="all"):
    if name == "synthetic":  # the offline demo: a tiny dataset in EuroSAT's real layout, in a folder of its own
        root = data.write_synthetic(args.root or os.path.join(args.save_path, "synthetic_data"))
        return data.build_dataset("eurosat", root, args.shots, args.seed, subsample)
    return data.build_dataset(name, args.root, args.shots, args.seed, subsample)


def adapter_to_evaluate(args):
    """The adapter file --eval_only/--adapter reads: --adapter; else ours in the run folder; else the file
    CLIP-LoRA's code saves for the same flags (--save_path, --backbone, --dataset, --shots, --seed, --filename)."""
    if args.adapter:
        return args.adapter
    ours = os.path.join(run_dir(args), "adapter.pt")
    theirs = clip_lora_path(args.save_path, backbone_name(args.backbone), args.dataset, args.shots, args.seed,
                            args.filename)
    if os.path.isfile(ours):
        return ours
    if os.path.isfile(theirs):
        print(f"no {ours}: evaluating CLIP-LoRA's adapter file {theirs}")
        return theirs
    raise UserError(f"{ours}: no adapter file, nor CLIP-LoRA's {theirs} (train first, or check --save_path)")


def check_fits(model, config):
    """Flags that depend on the model's widths, checked right after loading it and before any data pass."""
    def check(linear, name):
        if config["method"] == "block" and linear.in_features % config["blocks"]:
            raise UserError(f"--blocks {config['blocks']}: {name} has {linear.in_features} inputs, not divisible "
                            f"by {config['blocks']} (Block-LoRA splits the input into equal chunks)")
        return linear  # unchanged: this pass only checks
    try:
        clip_model.adapt_attention(model, check, config["encoder"], config["position"], config["params"])
    except ValueError as error:
        raise UserError(str(error)) from None


def run(args):
    """Train (or with --eval_only/--adapter, re-evaluate) one configuration; returns the results dict."""
    device = check_args(args)
    evaluate_only = args.eval_only or bool(args.adapter)
    config = adapter_config(args)
    identity = run_config(args, device)
    out = run_dir(args)
    adapter_path = adapter_to_evaluate(args) if evaluate_only else None
    if not evaluate_only:
        check_output_folder(out)
        check_run_identity(out, identity, args.overwrite)
    # What a seed fixes: the few-shot images (CLIP-LoRA's draw item for item, seeded again in build_dataset),
    # and our own training randomness: lora_A's initialisation and the dropout masks (torch's global stream,
    # seeded here; nothing else draws from it), shuffling and crops (generators seeded per pass and sample,
    # data.make_loader). It does not replay the official code's streams for those (CLIP-LoRA run_utils.py).
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    dataset = load_dataset(args.dataset, args, args.subsample)  # reads split files and lists images: cheap
    others = {name: load_dataset(name, args) for name in filter(None, args.eval_datasets.split(","))}
    novel = load_dataset(args.dataset, args, "new") if args.subsample == "base" else None
    model, preprocess = clip_model.load(args.backbone, device=device)
    check_fits(model, config)
    resolution = model.visual.input_resolution
    print(f"{args.dataset}: {len(dataset.classnames)} classes, {len(dataset.train)} training images "
          f"({args.shots} shots), {len(dataset.test)} test images; device {device}")

    template = dataset.template[0]
    test_cache = image_features(model, test_loader(dataset, preprocess, args), device, args.precision)
    zero_shot = zero_shot_accuracy(model, dataset, template, preprocess, args, device, cached=test_cache)
    print(f"zero-shot accuracy of the plain model: {zero_shot:.2f}")
    plain_others = {name: zero_shot_accuracy(model, ds, ds.zeroshot_template, preprocess, args, device)
                    for name, ds in others.items()}

    layers = add_adapters(model, config)
    print(parameter_line(model))
    seconds = 0.0
    if evaluate_only:
        load_adapters(adapter_path, model, config)
        print(f"evaluating {adapter_path}")
    else:
        seconds = train(model, dataset, args, device, resolution)
    cached = test_cache if args.encoder == "text" else None  # the image tower is unchanged when only text adapts
    final = zero_shot_accuracy(model, dataset, template, preprocess, args, device, cached=cached)
    print(f"test accuracy: {final:.2f}")

    results = {"config": identity, "args": vars(args), "zero_shot_accuracy": zero_shot, "accuracy": final,
               "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
               "train_seconds": seconds, "torch": torch.__version__, "device": device_name(device)}
    if others:
        adapted = {name: zero_shot_accuracy(model, ds, ds.zeroshot_template, preprocess, args, device)
                   for name, ds in others.items()}
        results["retention"] = {name: {"plain": plain_others[name], "adapted": adapted[name],
                                       "retention": adapted[name] / plain_others[name] if plain_others[name] else None}
                                for name in others}
        for name, row in results["retention"].items():
            kept = "n/a" if row["retention"] is None else f"{row['retention']:.3f}"
            print(f"{name}: zero-shot plain {row['plain']:.2f}  adapted {row['adapted']:.2f}  retention {kept}")
    if novel is not None:
        new = zero_shot_accuracy(model, novel, template, preprocess, args, device)
        results.update(base_accuracy=final, new_accuracy=new,
                       harmonic_mean=2 * final * new / (final + new) if final + new else 0.0)
        print(f"base {final:.2f}  new {new:.2f}  harmonic mean {results['harmonic_mean']:.2f}")

    files = []
    if args.export_merged:
        merge_all(layers)
        merged = merged_state_dict(model)
        files.append((args.export_merged, lambda f: torch.save(merged, f)))
    if evaluate_only:
        save_files(files)
        return results
    # merging (for the export) changed only the frozen weights: the lora_ tensors saved here are as trained
    files += [(os.path.join(out, "adapter.pt"), lambda f: write_adapters(f, model, config)),
              (os.path.join(out, "results.json"), lambda f: f.write(json.dumps(results, indent=2).encode()))]
    save_files(files, log=(os.path.join(args.save_path, "results.jsonl"), json.dumps(results) + "\n"),
               before_commit=lambda: check_run_identity(out, identity, args.overwrite))
    print(f"saved {os.path.join(out, 'adapter.pt')} and results.json")
    return results


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ------------------------------------------------------------------------------- summary
# Named above a lone configuration's table; with several configurations, the settings that differ are named.
KEY_SETTINGS = ("backbone", "r", "alpha", "encoder", "params", "position", "blocks", "comp_ratio")
# CLIP-LoRA's datasets with the names and in the order of its paper's tables (arXiv 2405.18541, as issue #13
# lists them); other datasets follow, sorted by name.
PAPER_DATASETS = {"imagenet": "ImageNet", "sun397": "SUN397", "fgvc": "Aircraft", "eurosat": "EuroSAT",
                  "stanford_cars": "Cars", "food101": "Food101", "oxford_pets": "Pets", "oxford_flowers": "Flowers",
                  "caltech101": "Caltech101", "dtd": "DTD", "ucf101": "UCF101"}
FORMATS = ("text", "markdown", "csv")


def skipped(path, reason):
    print(f"skipped {path}: {reason}", file=sys.stderr)


def read_result(path):
    """(config, seed, accuracy) of one results.json; ValueError(reason) if it cannot be read or lacks a field."""
    if not os.path.isfile(path):
        raise ValueError("not a regular file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as error:
        raise ValueError(f"cannot read ({error.strerror})") from None
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    if not text.strip():
        raise ValueError("empty file")
    try:
        result = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise ValueError(f"not valid JSON ({error})") from None
    if not isinstance(result, dict):
        raise ValueError(f"holds a JSON {type(result).__name__}, expected an object")
    config, args, accuracy = result.get("config"), result.get("args"), result.get("accuracy")
    if not isinstance(config, dict):
        raise ValueError("lacks 'config', the run's settings" if config is None else "'config' is not an object")
    for field in RUN_FIELDS:
        if field not in config:
            raise ValueError(f"config lacks {field!r}")
    if (not isinstance(config["dataset"], str) or not config["dataset"] or not is_int(config["shots"])
            or config["shots"] < 1):
        raise ValueError(f"config has dataset {config['dataset']!r} and shots {config['shots']!r}, expected "
                         "a name and a positive integer")
    if not isinstance(args, dict) or not is_int(args.get("seed")):
        raise ValueError("args['seed'] is missing or not an integer")
    if not is_number(accuracy):
        raise ValueError(f"'accuracy' is {accuracy!r}, expected a number")
    return config, args["seed"], float(accuracy)


def read_results(directory):
    """[(path, config, seed, accuracy)] of the results.json files under `directory`; each file that cannot be
    read or lacks a field is named on stderr and skipped. A (configuration, seed) found twice (e.g. in a copied
    folder) counts once: the first path in sorted order is kept, the others are named, so no mean repeats a run."""
    if not os.path.isdir(directory):
        raise UserError(f"--summarize {directory}: not a folder")
    found, records, first = 0, [], {}
    walk = os.walk(directory, onerror=lambda error: skipped(error.filename, f"cannot list ({error.strerror})"))
    for folder, subfolders, files in walk:
        subfolders.sort()
        if "results.json" not in files:
            continue
        found += 1
        path = os.path.join(folder, "results.json")
        try:
            config, seed, accuracy = read_result(path)
        except ValueError as reason:
            skipped(path, reason)
            continue
        run_key = (json.dumps(config, sort_keys=True), seed)
        if run_key in first:
            earlier, earlier_accuracy = first[run_key]
            other = "" if accuracy == earlier_accuracy else f" (accuracy {accuracy} here, {earlier_accuracy} there)"
            skipped(path, f"same configuration and seed {seed} as {earlier}{other}; counted once")
            continue
        first[run_key] = (path, accuracy)
        records.append((path, config, seed, accuracy))
    if not records:
        raise UserError(f"{directory}: no results.json found" if not found else
                        f"{directory}: none of its {found} results.json files could be read (each is named above)")
    return records


def setting_text(value, none="none"):
    if value is None:
        return none
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def summary_groups(records):
    """One group per configuration (config without dataset and shots), ordered by the settings that differ
    between groups: [{"settings", "label", "fields", "cells": {(dataset, shots): {seed: accuracy}}}]."""
    groups = {}
    for _, config, seed, accuracy in records:
        settings = {k: v for k, v in config.items() if k not in ("dataset", "shots")}
        group = groups.setdefault(json.dumps(settings, sort_keys=True), {"settings": settings, "cells": {}})
        group["cells"].setdefault((config["dataset"], config["shots"]), {})[seed] = accuracy
    groups = list(groups.values())
    known = [f for f in RUN_FIELDS if f not in ("dataset", "shots")]
    fields = known + sorted({k for g in groups for k in g["settings"]} - set(known))
    differing = [f for f in fields if len({json.dumps(g["settings"].get(f), sort_keys=True) for g in groups}) > 1]
    shown = differing if len(groups) > 1 else [f for f in KEY_SETTINGS if groups[0]["settings"].get(f) is not None]

    def natural(value):  # numbers by value (r=4 before r=16), anything else by its JSON text
        return (0, value, "") if is_number(value) else (1, 0, json.dumps(value, sort_keys=True))

    groups.sort(key=lambda g: [natural(g["settings"].get(f)) for f in differing])
    for g in groups:
        g["fields"] = fields
        g["label"] = " ".join([setting_text(g["settings"].get("method"))] + [
            f"{f}={setting_text(g['settings'].get(f))}" for f in shown if f != "method"])
    return groups


def dataset_order(dataset):
    return (0, list(PAPER_DATASETS).index(dataset), "") if dataset in PAPER_DATASETS else (1, 0, dataset)


def group_table(group):
    """(shot counts, rows [(dataset, {shots: (mean, std, seeds)})] in CLIP-LoRA's order, average
    {shots: (mean of the dataset means, datasets missing at these shots)}); std: sample std, 0 for one seed."""
    cells = group["cells"]
    shots = sorted({s for _, s in cells})
    rows = []
    for dataset in sorted({d for d, _ in cells}, key=dataset_order):
        stats = {}
        for s in shots:
            if (dataset, s) in cells:
                values = list(cells[dataset, s].values())
                stats[s] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0,
                            sorted(cells[dataset, s]))
        rows.append((dataset, stats))
    average = {s: (statistics.mean(stats[s][0] for _, stats in rows if s in stats),
                   [dataset for dataset, stats in rows if s not in stats]) for s in shots}
    return shots, rows, average


def format_summary(groups, fmt):
    """The tables as aligned text, Markdown pipe tables, or CSV (one row per configuration, dataset and shots)."""
    if fmt == "csv":
        return summary_csv(groups)
    markdown = fmt == "markdown"
    blocks = []
    for number, group in enumerate(groups, 1):
        shots, rows, average = group_table(group)
        star = "\\*" if markdown else "*"
        table = [["dataset"] + [f"{s}-shot" for s in shots]]
        for dataset, stats in rows:
            table.append([PAPER_DATASETS.get(dataset, dataset)] + [
                f"{stats[s][0]:.2f} ± {stats[s][1]:.2f} ({len(stats[s][2])})" if s in stats else "-" for s in shots])
        table.append(["Average"] + [f"{average[s][0]:.2f}{star if average[s][1] else ''}" for s in shots])
        notes = [f"{star} {s}-shot: average over {len(rows) - len(average[s][1])} of {len(rows)} datasets, without "
                 f"{', '.join(PAPER_DATASETS.get(d, d) for d in average[s][1])}" for s in shots if average[s][1]]
        heading = f"configuration {number}/{len(groups)}: {group['label']}"
        if markdown:
            def escape(text):
                return text.replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*")
            lines = [f"**{escape(heading)}**", ""]
            lines += ["| " + " | ".join([escape(row[0])] + row[1:]) + " |" for row in table]
            lines.insert(3, "|:---|" + "---:|" * len(shots))
            lines += [""] + notes if notes else []
        else:
            widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
            lines = [heading] + ["  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in
                                           enumerate(zip(row, widths))).rstrip() for row in table] + notes
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def summary_csv(groups):
    """One row per (configuration, dataset, shots): mean, std, number and list of seeds, then every setting."""
    fields = groups[0]["fields"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["configuration", "dataset", "shots", "mean", "std", "seeds", "seed_list", *fields])
    for number, group in enumerate(groups, 1):
        shots, rows, _ = group_table(group)
        settings = [setting_text(group["settings"].get(f), none="") for f in fields]
        for dataset, stats in rows:
            for s in shots:
                if s in stats:
                    mean, std, seeds = stats[s]
                    writer.writerow([number, dataset, s, mean, std, len(seeds), " ".join(map(str, seeds)), *settings])
    return out.getvalue().rstrip("\n")


def plot_summary(groups, path):
    """Accuracy against shots as CLIP-LoRA's figure few_shot.png: a panel per dataset and one for the average,
    a line per configuration. matplotlib is an optional extra, imported here only; the PNG appears whole or not
    at all."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("--plot needs matplotlib, which is not installed: pip install matplotlib") from None
    tables = [group_table(g) for g in groups]
    datasets = sorted({d for _, rows, _ in tables for d, _ in rows}, key=dataset_order)
    titles = [PAPER_DATASETS.get(d, d) for d in datasets] + ["Average"]
    cells = len(titles) + 1  # one cell more for the legend, as in few_shot.png
    grid_rows = -(-cells // min(5, cells))
    columns = -(-cells // grid_rows)  # at most 5 columns, as few rows as that allows, the rows filled evenly
    figure = Figure(figsize=(3.2 * columns, 2.6 * grid_rows))
    FigureCanvasAgg(figure)
    axes = figure.subplots(grid_rows, columns, squeeze=False).ravel()
    incomplete = False
    for index, (group, (shots, rows, average)) in enumerate(zip(groups, tables)):
        style = dict(color=f"C{index % 10}", marker="o", markersize=3)
        for dataset, stats in rows:
            x = [s for s in shots if s in stats]
            axes[datasets.index(dataset)].errorbar(x, [stats[s][0] for s in x], yerr=[stats[s][1] for s in x],
                                                   capsize=2, **style)
        ax = axes[len(datasets)]
        ax.plot(shots, [average[s][0] for s in shots], label=group["label"], **style)
        partial = [s for s in shots if average[s][1]]  # hollow: the average misses some dataset there
        ax.plot(partial, [average[s][0] for s in partial], linestyle="none", markerfacecolor="white", **style)
        incomplete = incomplete or bool(partial)
    all_shots = sorted({s for shots, _, _ in tables for s in shots})
    for index, (ax, title) in enumerate(zip(axes, titles)):
        ax.set_title(title + (" (hollow: incomplete)" if title == "Average" and incomplete else ""), fontsize=10)
        ax.set_xticks(all_shots)
        ax.set_xlabel("shots", fontsize=8)
        if index % columns == 0:
            ax.set_ylabel("top-1 accuracy (%)", fontsize=8)
    for ax in axes[len(titles):]:
        ax.axis("off")
    axes[len(titles)].legend(*axes[len(datasets)].get_legend_handles_labels(), loc="center", fontsize=8)
    figure.tight_layout()
    save_files([(path, lambda f: figure.savefig(f, format="png", dpi=100))])


def summarize(directory, fmt="text", plot=None):
    """Per configuration, the papers' table (a row per dataset, a column per shot count, mean ± std (seeds) over
    seeds, an Average row) from the results.json files under `directory` (never from logs); `plot`: a PNG too."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if plot is not None and not plot.lower().endswith(".png"):
        raise UserError(f"--plot {plot}: expected a file name ending in .png")
    if plot is not None:
        check_new_file(plot, "--plot")
    groups = summary_groups(read_results(directory))
    if plot is not None:
        plot_summary(groups, plot)
    return format_summary(groups, fmt)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.summarize is not None:
            print(summarize(args.summarize, args.format or "text", args.plot))
        elif args.format or args.plot is not None:
            raise UserError("--format and --plot only apply with --summarize DIR")
        else:
            run(args)
    except (UserError, clip_model.LoadError, data.DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: no result files were written for this run", file=sys.stderr)
        sys.exit(130)
    except OSError as error:  # a fault no check foresaw (disk, permissions): still one line, with the path
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{error.strerror or error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
