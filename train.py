"""Few-shot training and evaluation of CLIP with LoRA, Comp-LoRA or Block-LoRA.

    python train.py --method comp --dataset eurosat --shots 4 --root /data
    python train.py --dataset synthetic --backbone tiny --shots 4 --n_iters 15     # offline demo
    python train.py --summarize out/

Flags and defaults are those of the official CLIP-LoRA code (MaxZanella/CLIP-LoRA, run_utils.py and
lora.py), so its results are reproduced by default and its users only change the script name.
"""
import argparse
import contextlib
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
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="loader processes; results do not depend on it")
    p.add_argument("--print_every", type=int, default=50, help="iterations between progress lines")
    p.add_argument("--summarize", metavar="DIR", help="print mean and std over seeds of the results under DIR")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------- adapters

def adapter_config(args):
    """The fields that define an adapted model, stored with the adapter weights."""
    return {"method": args.method, "r": args.r, "alpha": args.alpha, "scaling_rule": "alpha/sqrt(r)",
            "dropout": args.dropout_rate, "blocks": args.blocks if args.method == "block" else None,
            "comp_ratio": args.comp_ratio if args.method == "comp" else None, "encoder": args.encoder,
            "position": args.position, "params": list(args.params), "backbone": backbone_name(args.backbone)}


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
    if not (isinstance(saved, dict) and isinstance(saved.get("config"), dict)
            and isinstance(saved.get("state_dict"), dict)):
        raise UserError(f"{path}: not an adapter file written by train.py "
                        "(expected a dict with a 'config' dict and a 'state_dict' dict)")
    saved_config, tensors = saved["config"], saved["state_dict"]
    for field in ADAPTER_FIELDS:
        if saved_config.get(field) != config[field]:
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


# ------------------------------------------------------------------------------ evaluation

def autocast(device):
    """fp16 autocast on CUDA, as the official code; float32 elsewhere (bf16 is very slow on most CPUs)."""
    return torch.autocast(device_type="cuda", dtype=torch.float16, enabled=device.type == "cuda")


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


def text_features(model, tokens, device):
    with autocast(device):
        features = model.encode_text(tokens.to(device))
    return F.normalize(features.float(), dim=-1)


@torch.no_grad()
def image_features(model, loader, device):
    """Normalised image features and labels of a whole loader."""
    features, labels = [], []
    for images, target in loader:
        with autocast(device):
            features.append(F.normalize(model.encode_image(images.to(device)).float(), dim=-1))
        labels.append(target.to(device))
    return torch.cat(features), torch.cat(labels)


def accuracy(logits, labels):
    return 100.0 * (logits.argmax(dim=-1) == labels).float().mean().item()


@torch.no_grad()
def zero_shot_accuracy(model, dataset, template, preprocess, args, device, cached=None):
    """Test accuracy of `model` on `dataset` with prompts from `template`; `cached` = precomputed image features."""
    model.eval()
    text = text_features(model, class_prompts(dataset.classnames, template), device)
    images, labels = cached or image_features(model, test_loader(dataset, preprocess, args), device)
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
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    loader = data.make_loader(dataset.train, data.train_transform(resolution), batch_size=args.batch_size,
                              shuffle=True, workers=args.workers, seed=args.seed)
    tokens = class_prompts(dataset.classnames, dataset.template[0]).to(device)
    if args.encoder == "vision":  # the text tower is frozen: its features never change
        with torch.no_grad():
            fixed_text = text_features(model, tokens, device)
    iteration, window = 0, {"loss": 0.0, "correct": 0, "seen": 0, "iterations": 0}
    start = last_print = time.time()
    while iteration < total:
        model.train()
        for images, target in loader:
            images, target = images.to(device), target.to(device)
            text = fixed_text if args.encoder == "vision" else text_features(model, tokens, device)
            with autocast(device), torch.set_grad_enabled(args.encoder != "text"):
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
    --summarize groups by, and what a run folder may only be replaced with (unless --overwrite)."""
    config = {field: getattr(args, field, None) for field in RUN_FIELDS}
    config.update(backbone=backbone_name(args.backbone), params=list(args.params),
                  blocks=args.blocks if args.method == "block" else None,
                  comp_ratio=args.comp_ratio if args.method == "comp" else None,
                  precision="fp16" if device.type == "cuda" else "fp32")
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
    for flag, names in (("dataset", [args.dataset]), ("eval_datasets", list(filter(None, args.eval_datasets.split(","))))):
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
    if overwrite or not os.path.lexists(path) and not os.path.lexists(os.path.join(out, "adapter.pt")):
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
    """The adapter file --eval_only/--adapter reads: --adapter, else ours in the run folder."""
    if args.adapter:
        return args.adapter
    path = os.path.join(run_dir(args), "adapter.pt")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no adapter file (train first, or check --save_path)")
    return path


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
    test_cache = image_features(model, test_loader(dataset, preprocess, args), device)
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
    if novel:
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
    files += [(os.path.join(out, "adapter.pt"), lambda f: write_adapters(f, model, config)),  # merging leaves lora_ as is
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

def summarize(directory):
    """Table of mean and standard deviation over seeds, read from the results.json files (never from logs)."""
    groups = {}
    for folder, _, files in os.walk(directory):
        if "results.json" in files:
            with open(os.path.join(folder, "results.json")) as f:
                result = json.load(f)
            a = result["args"]
            groups.setdefault((a["dataset"], a["method"], a["shots"]), []).append(result["accuracy"])
    if not groups:
        raise UserError(f"{directory}: no results.json found")
    lines = [f"{'dataset':<16}{'method':<8}{'shots':>6}{'seeds':>7}{'mean':>8}{'std':>7}"]
    for (dataset, method, shots), values in sorted(groups.items()):
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"{dataset:<16}{method:<8}{shots:>6}{len(values):>7}{statistics.mean(values):>8.2f}{std:>7.2f}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.summarize:
            print(summarize(args.summarize))
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
