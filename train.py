"""Few-shot training and evaluation of CLIP with LoRA, Comp-LoRA or Block-LoRA.

    python train.py --method comp --dataset eurosat --shots 4 --root /data
    python train.py --dataset synthetic --backbone tiny --shots 4 --n_iters 15     # offline demo
    python train.py --summarize out/

Flags and defaults are those of the official CLIP-LoRA code (MaxZanella/CLIP-LoRA, run_utils.py and
lora.py), so its results are reproduced by default and its users only change the script name.
"""
import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

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


class UserError(Exception):
    """A mistake in the command line or the files it names; printed as one line."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="lora", help="lora, comp or block")
    p.add_argument("--dataset", default="dtd", help=f"one of {', '.join(data.DATASETS)}, or synthetic")
    p.add_argument("--root", "--root_path", dest="root", default="", help="data root (CoOp layout)")
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--backbone", default="ViT-B/16", help=f"{clip_model.available_models()} or a weights file")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--n_iters", type=int, default=500, help="total iterations = n_iters x shots")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--r", type=int, default=2)
    p.add_argument("--alpha", type=float, default=1)
    p.add_argument("--dropout_rate", type=float, default=0.25)
    p.add_argument("--encoder", default="both", choices=["text", "vision", "both"])
    p.add_argument("--params", nargs="+", default=["q", "k", "v"], help="projections among q k v o")
    p.add_argument("--position", default="all", choices=clip_model.POSITIONS)
    p.add_argument("--blocks", type=int, default=8, help="Block-LoRA: number of input chunks n")
    p.add_argument("--comp_ratio", type=float, default=0.5, help="Comp-LoRA: protected share k / min(d_out, d_in)")
    p.add_argument("--save_path", default="out",
                   help="results root: <save_path>/<dataset>/<method>/<shots>shots/seed<seed>/")
    p.add_argument("--eval_only", action="store_true", help="evaluate the saved adapter of this configuration")
    p.add_argument("--eval_datasets", default="",
                   help="comma-separated datasets for zero-shot retention after training")
    p.add_argument("--subsample", default="all", choices=["all", "base"], help="base: base-to-novel protocol")
    p.add_argument("--export_merged", default="", help="also write a plain CLIP state dict with adapters merged")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="autocast dtype; auto: fp16 with a gradient scaler on CUDA (as the official lora.py), fp32 "
                        "elsewhere. fp16 also runs on CPU (slowly: the code path a GPU runs); bf16 needs no scaler")
    p.add_argument("--text_checkpoint", default="auto", choices=["auto", "on", "off"],
                   help="recompute the text tower's activations in the backward pass instead of storing them "
                        "(less memory, one more text forward per step); auto: on when the class prompts span more "
                        "than 4096 token positions (ImageNet's 1,000 prompts: 9,165)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
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
        param.requires_grad_(name.rsplit(".", 1)[-1].startswith("lora_"))
    return [layer for _, layer in layers]


def parameter_line(model):
    """peft's summary line: trainable params: N || all params: M || trainable%: P."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def atomic_write(path, write):
    """Call write(tmp_path), then rename into place: readers never see a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_adapters(path, model, config):
    """One torch.save file: {"config": adapter config, "state_dict": the lora_ tensors}."""
    tensors = {k: v.detach().cpu() for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1].startswith("lora_")}
    atomic_write(path, lambda tmp: torch.save({"config": config, "state_dict": tensors}, tmp))


def load_adapters(path, model, config):
    """Load a save_adapters file into a model already adapted with `config`; a mismatch is a UserError."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        saved_config, tensors = saved["config"], saved["state_dict"]
    except Exception:
        raise UserError(f"{path}: not an adapter file written by train.py") from None
    for field in ADAPTER_FIELDS:
        if saved_config.get(field) != config[field]:
            raise UserError(f"{path}: adapter {field} is {saved_config.get(field)!r}, "
                            f"but this run has {field} {config[field]!r}")
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k.rsplit(".", 1)[-1].startswith("lora_")]
    if missing or unexpected:
        raise UserError(f"{path}: adapter tensors do not fit the model "
                        f"({len(missing)} missing, {len(unexpected)} unexpected)")


def merge_all(layers):
    """Merge every adapter into its frozen weight, for export or zero-overhead inference."""
    for layer in layers:
        layer.merge()


def merged_state_dict(model):
    """A plain CLIP state dict (OpenAI layout) of a model whose adapters are all merged."""
    plain = {key.replace(".base.", "."): value for key, value in model.state_dict().items()
             if not key.rsplit(".", 1)[-1].startswith("lora_")}
    return clip_model.fuse_attention(plain)


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
    return clip_model.tokenize([template.format(name.replace("_", " ")) for name in classnames])


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
                              shuffle=True, workers=args.workers)
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


def check_args(args):
    if args.method not in METHODS:
        raise UserError(f"--method {args.method!r}: expected one of {', '.join(METHODS)}")
    if args.dataset not in data.DATASETS and args.dataset != "synthetic":
        raise UserError(f"--dataset {args.dataset!r}: expected one of {', '.join(data.DATASETS)}, synthetic")
    for flag in ("shots", "n_iters", "batch_size", "r", "blocks", "print_every"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: expected a positive integer")
    if not 0 <= args.dropout_rate < 1:
        raise UserError(f"--dropout_rate {args.dropout_rate}: expected a number in [0, 1)")
    if args.workers < 0:
        raise UserError(f"--workers {args.workers}: expected 0 or more")
    try:
        return torch.device(args.device)
    except RuntimeError:
        raise UserError(f"--device {args.device!r}: expected cpu, cuda or cuda:N") from None


def load_dataset(name, args, subsample="all"):
    if name == "synthetic":  # the offline demo: a tiny dataset in EuroSAT's real layout
        root = data.write_synthetic(args.root or os.path.join(args.save_path, "synthetic_data"))
        return data.build_dataset("eurosat", root, args.shots, args.seed, subsample)
    return data.build_dataset(name, args.root, args.shots, args.seed, subsample)


def ensure_writable(directory):
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".write_test{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as error:
        raise UserError(f"output directory {directory}: cannot write ({error.strerror})") from None


def run(args):
    """Train (or with --eval_only, re-evaluate) one configuration; returns the results dict."""
    device = check_args(args)
    out = run_dir(args)
    adapter_path = os.path.join(out, "adapter.pt")
    if args.eval_only and not os.path.isfile(adapter_path):
        raise UserError(f"{adapter_path}: no adapter file (train first, or check --save_path)")
    if not args.eval_only:
        ensure_writable(out)
    random.seed(args.seed)
    torch.manual_seed(args.seed)  # CLIP-LoRA's set_random_seed (run_utils.py), before anything draws
    model, preprocess = clip_model.load(args.backbone, device=device)
    resolution = model.visual.input_resolution
    dataset = load_dataset(args.dataset, args, args.subsample)
    config = adapter_config(args)
    print(f"{args.dataset}: {len(dataset.classnames)} classes, {len(dataset.train)} training images "
          f"({args.shots} shots), {len(dataset.test)} test images; device {device}")

    template = dataset.template[0]
    test_cache = image_features(model, test_loader(dataset, preprocess, args), device, args.precision)
    zero_shot = zero_shot_accuracy(model, dataset, template, preprocess, args, device, cached=test_cache)
    print(f"zero-shot accuracy of the plain model: {zero_shot:.2f}")
    others = {name: load_dataset(name, args) for name in filter(None, args.eval_datasets.split(","))}
    plain_others = {name: zero_shot_accuracy(model, ds, ds.zeroshot_template, preprocess, args, device)
                    for name, ds in others.items()}

    layers = add_adapters(model, config)
    print(parameter_line(model))
    seconds = 0.0
    if args.eval_only:
        load_adapters(adapter_path, model, config)
    else:
        seconds = train(model, dataset, args, device, resolution)
    cached = test_cache if args.encoder == "text" else None  # the image tower is unchanged when only text adapts
    final = zero_shot_accuracy(model, dataset, template, preprocess, args, device, cached=cached)
    print(f"test accuracy: {final:.2f}")

    results = {"args": vars(args), "zero_shot_accuracy": zero_shot, "accuracy": final,
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
    if args.subsample == "base":
        novel = load_dataset(args.dataset, args, "new")
        new = zero_shot_accuracy(model, novel, template, preprocess, args, device)
        results.update(base_accuracy=final, new_accuracy=new,
                       harmonic_mean=2 * final * new / (final + new) if final + new else 0.0)
        print(f"base {final:.2f}  new {new:.2f}  harmonic mean {results['harmonic_mean']:.2f}")
    if args.eval_only:
        return results

    save_adapters(adapter_path, model, config)
    if args.export_merged:
        merge_all(layers)
        atomic_write(args.export_merged, lambda tmp: torch.save(merged_state_dict(model), tmp))
    atomic_write(os.path.join(out, "results.json"),
                 lambda tmp: open(tmp, "w").write(json.dumps(results, indent=2)))
    with open(os.path.join(args.save_path, "results.jsonl"), "a") as f:
        f.write(json.dumps(results) + "\n")
    print(f"saved {adapter_path} and results.json")
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


if __name__ == "__main__":
    main()
