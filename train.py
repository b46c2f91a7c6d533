"""Few-shot training and evaluation of CLIP with LoRA, Comp-LoRA or Block-LoRA, in the order a run happens: flags and
their checks, adapters on the model, evaluation, the training loop, and `run()`. What a run writes and reads back
(adapter files, results, checkpoints, summaries) is in results.py.

    python train.py --method comp --dataset eurosat --shots 4 --root /data

Flags and defaults are those of the official CLIP-LoRA code (MaxZanella/CLIP-LoRA, run_utils.py and lora.py), so
its results are reproduced by default and its users only change the script name.
"""
import argparse
import itertools
import json
import math
import os
import platform
import random
import signal
import sys
import time
import warnings

import torch
import torch.nn.functional as F

import clip_model
import comp_lora
import data
import results
from block_lora import BlockLoRALinear
from clip_model import autocast, resolve_precision
from comp_lora import CompLoRALinear, LoRALinear
from results import UserError

METHODS = {"lora": LoRALinear, "comp": CompLoRALinear, "block": BlockLoRALinear}
LOGIT_SCALE = 100  # CLIP-LoRA's fixed scale on the cosine similarities (main.py), not the learnt one
MAX_SEED = 2 ** 32 - 1  # numpy's limit in CLIP-LoRA's seeding (run_utils.py set_random_seed)
MAX_COUNT = 2 ** 31 - 1  # the bound of every other integer flag: far beyond any run, and a C int


def parse_args(argv=None):
    p = results.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="lora", help="lora, comp or block")
    p.add_argument("--dataset", default="dtd", help=f"one of {', '.join(data.DATASETS)}, or synthetic")
    p.add_argument("--root", "--root_path", dest="root", default="", help="data root (CoOp's layout)")
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--seed", type=int, default=1, help=f"0 to {MAX_SEED} (numpy's limit in CLIP-LoRA's seeding)")
    p.add_argument("--backbone", default="ViT-B/16", help=f"{clip_model.available_models()} or a weights file")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--n_iters", type=int, default=500, help="total iterations = n_iters x shots")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--r", type=int, default=2)
    p.add_argument("--alpha", type=float, default=1, help="scaling s = alpha / sqrt(r); 0 is refused")
    p.add_argument("--dropout_rate", type=float, default=0.25)
    p.add_argument("--encoder", default="both", choices=["text", "vision", "both"])
    p.add_argument("--params", nargs="+", default=["q", "k", "v"], choices=clip_model.PROJECTIONS,
                   help="projections among q k v o")
    p.add_argument("--position", default="all", choices=clip_model.POSITIONS)
    p.add_argument("--blocks", type=int, default=8, help="Block-LoRA: number of input chunks n")
    p.add_argument("--comp_ratio", type=float, default=0.5, help="Comp-LoRA: protected share k / min(d_out, d_in)")
    p.add_argument("--save_path", default="out", help="root of <dataset>/<method>/<shots>shots/seed<seed>/")
    p.add_argument("--overwrite", action="store_true", help="replace a saved run of another configuration")
    p.add_argument("--eval_only", action="store_true", help="evaluate this configuration's saved adapter")
    p.add_argument("--adapter", default="", metavar="FILE", help="evaluate this adapter file, like --eval_only")
    p.add_argument("--filename", default="lora_weights", help="CLIP-LoRA's adapter file name, without .pt")
    p.add_argument("--eval_datasets", default="", type=lambda names: [name for name in names.split(",") if name],
                   help="comma-separated datasets for zero-shot retention")
    p.add_argument("--subsample", default="all", choices=["all", "base"], help="base: base-to-novel protocol")
    p.add_argument("--export_merged", default="", metavar="FILE", help="also write CLIP with the adapters merged")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="auto: fp16 on CUDA")
    p.add_argument("--text_checkpoint", default="auto", choices=["auto", "on", "off"], help="recompute text blocks "
                   "in backward, not storing them; auto: enough to keep 2 GiB of activations (ImageNet: 3 of 12)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader processes")
    p.add_argument("--print_every", type=int, default=50, help="iterations between progress lines")
    p.add_argument("--checkpoint_every", type=int, default=500, help="iterations between checkpoints; 0: none")
    p.add_argument("--resume", action="store_true", help="continue this configuration's run from its checkpoint")
    p.add_argument("--skip_done", action="store_true", help="exit at once if this run is saved already")
    return p.parse_args(argv)


def check_device(name):
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name!r}: expected cpu, cuda, cuda:N or mps")
    count = torch.cuda.device_count()
    if device.type == "cuda" and (device.index or 0) >= count:
        raise UserError(f"--device {name}: " + (f"this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
                                                if count else "no CUDA device is available here; use --device cpu"))
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available here; use --device cpu")
    return device


def check_args(args):
    """Every flag and cheap precondition, before any download, data pass or folder creation; returns the device."""
    if args.method not in METHODS:
        raise UserError(f"--method {args.method!r}: expected one of {', '.join(METHODS)}")
    for flag, name in [("dataset", args.dataset)] + [("eval_datasets", name) for name in args.eval_datasets]:
        if name not in data.DATASETS and name != "synthetic":
            raise UserError(f"--{flag} {name!r}: expected one of {', '.join(data.DATASETS)}, synthetic")
    if data.DATASETS.get(args.dataset) and data.DATASETS[args.dataset].eval_only:
        raise UserError(f"--dataset {args.dataset}: evaluation only (no train split); use it in --eval_datasets")
    counts, shares = ("shots", "n_iters", "batch_size", "r", "blocks", "print_every"), ("dropout_rate", "comp_ratio")
    numbers = [(flag, lambda n: 1 <= n <= MAX_COUNT, f"a positive integer, at most {MAX_COUNT}")
               for flag in counts]
    numbers += [(flag, lambda n: 0 <= n <= MAX_COUNT, f"0 or more, at most {MAX_COUNT}")
                for flag in ("workers", "checkpoint_every")]
    numbers += [("seed", lambda n: 0 <= n <= MAX_SEED, f"an integer from 0 to {MAX_SEED}"), ("lr", lambda lr: lr > 0,
                "a positive number"), ("alpha", lambda a: a != 0, "a finite number other than 0")]
    numbers += [(flag, lambda share: 0 <= share < 1, "a number in [0, 1)") for flag in shares]
    for flag, valid, expected in numbers:  # bounds first: an int of 400 digits has no float
        if not (valid(getattr(args, flag)) and math.isfinite(getattr(args, flag))):
            raise UserError(f"--{flag} {getattr(args, flag)}: expected {expected}")
    if len(set(args.params)) != len(args.params):
        raise UserError(f"--params {' '.join(args.params)}: a projection named twice; expected distinct ones")
    if not args.save_path:
        raise UserError("--save_path '': expected a folder name")
    if args.backbone not in clip_model.available_models() and not os.path.isfile(args.backbone):
        raise UserError(f"--backbone {args.backbone!r}: expected one of {clip_model.available_models()} "
                        "or the path of a weights file")
    run, log = run_dir(args), os.path.join(args.save_path, "results.jsonl")
    # every reader of a run folder first puts back one a killed save set aside (results.recover)
    results.recover(os.path.dirname(os.path.abspath(args.adapter)) if args.adapter else run)
    if args.adapter and not os.path.isfile(args.adapter):
        raise UserError(f"--adapter {args.adapter}: no such file")
    # training replaces the run folder (staged in its parent) and its checkpoint, appends to the log
    writes = {run: "output directory", run + results.CHECKPOINT: "checkpoint", log: "log"}
    for path in {} if args.eval_only or args.adapter else writes:
        results.check_writable(path, writes[path], folder=path == run, create=True)
    if args.export_merged:  # never written over an input of the run or another of its outputs
        results.check_writable(args.export_merged, "--export_merged")
        outputs = [*writes, os.path.join(run, "adapter.pt"), os.path.join(run, "results.json")]
        taken = [("--backbone", args.backbone), ("--adapter", args.adapter), ("--filename", clip_lora_file(args))]
        for flag, path in taken + [("--save_path", path) for path in outputs]:
            if path and os.path.realpath(path) == os.path.realpath(args.export_merged):
                raise UserError(f"--export_merged {args.export_merged}: is {path}, which {flag} names; choose "
                                "another file")
    return check_device(args.device)


# --------------------------------------------------------------------------------- adapters

def adapter_config(args):
    """The fields that define an adapted model, stored with the adapter weights."""
    return {"method": args.method, "r": args.r, "alpha": args.alpha, "scaling_rule": "alpha/sqrt(r)",
            "dropout": args.dropout_rate, "blocks": args.blocks if args.method == "block" else None,
            "comp_ratio": args.comp_ratio if args.method == "comp" else None, "encoder": args.encoder,
            "position": args.position, "params": results.canonical_params(args.params),
            "backbone": clip_model.model_name(args.backbone)}


def add_adapters(model, config):
    """Wrap the configured attention projections with the configured adapter, freeze the rest; returns the layers.
    Flags that do not fit the model's widths (--blocks, --comp_ratio) or depth (--position) are one UserError."""
    method = {"comp": "comp_ratio", "block": "blocks"}.get(config["method"])
    try:
        names = clip_model.adapter_names(model, config["encoder"], config["position"], config["params"])
        comp_lora.add_adapters(model, METHODS[config["method"]], names, r=config["r"], alpha=config["alpha"],
                               dropout=config["dropout"], **({method: config[method]} if method else {}))
    except ValueError as error:
        raise UserError(f"--{method} {config[method]}: {error}" if method else str(error)) from None
    comp_lora.mark_only_lora_as_trainable(model)
    return [model.get_submodule(name) for name in names]


def parameter_line(model):
    """peft's summary line: trainable params: N || all params: M || trainable%: P."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def load_adapters(path, model, config):
    """Load an adapter file (ours or CLIP-LoRA's) into a model adapted with `config`, strictly (results.py)."""
    towers = ("text", "vision") if config["encoder"] == "both" else (config["encoder"],)
    modules = [name.rpartition(".")[0] for tower in towers  # CLIP-LoRA's layer_<i>: text blocks first (apply_lora)
               for name in clip_model.adapter_names(model, tower, config["position"], ["q"])]
    expected = {key: value.shape for key, value in comp_lora.lora_state_dict(model).items()}
    comp_lora.load_lora_state_dict(model, results.read_adapter(path, config, expected, modules))


# ------------------------------------------------------------------------------ evaluation

def class_prompts(classnames, template):
    """CLIP-LoRA's prompts: the template filled with each class name, underscores as spaces (lora.py)."""
    try:
        return clip_model.tokenize([template.format(name.replace("_", " ")) for name in classnames])
    except ValueError as error:  # tokenize refuses a text over the context length rather than cutting it
        raise UserError(f"class prompt {error}; shorten that class name") from None


def text_checkpointing(mode, model, tokens, precision):
    """encode_text's checkpoint: on (every text block), off, or auto (clip_model.text_checkpoint_blocks' budget)."""
    if mode == "auto":
        return clip_model.text_checkpoint_blocks(model, tokens, element_size=4 if precision == "fp32" else 2)
    return mode == "on"


def text_features(model, tokens, device, precision, checkpoint=False):
    """Normalised float32 features of tokenized prompts; checkpoint: recompute the text tower in backward."""
    with autocast(device, precision):
        features = model.encode_text(tokens.to(device), checkpoint=checkpoint)
    return F.normalize(features.float(), dim=-1)


@torch.no_grad()
def image_features(model, loader, device, precision):
    """Normalised image features and labels of a whole loader."""
    features, labels, cuda = [], [], device.type == "cuda"  # the loaders pin memory for CUDA only: copies overlap
    for images, target in loader:
        with autocast(device, precision):
            features.append(F.normalize(model.encode_image(images.to(device, non_blocking=cuda)).float(), dim=-1))
        labels.append(target.to(device, non_blocking=cuda))
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def zero_shot_accuracy(model, dataset, template, preprocess, args, device, cached=None):
    """Test accuracy of `model` on `dataset` with prompts from `template`; `cached` = precomputed image features."""
    model.eval()
    text = text_features(model, class_prompts(dataset.classnames, template), device, args.precision)
    images, labels = cached or image_features(model, test_loader(dataset, preprocess, args), device, args.precision)
    return 100.0 * (images @ text.t()).argmax(dim=-1).eq(labels).float().mean().item()


def test_loader(dataset, preprocess, args):
    return data.make_loader(dataset.test, preprocess, batch_size=256, shuffle=False, workers=args.workers,
                            pin_memory=args.device.startswith("cuda"))


# -------------------------------------------------------------------------------- training

MAX_SKIPPED_STEPS = 100  # fp16: overflowing steps in a row that stop a run (our bound; a transient one is skipped)
NOTHING_KEPT = "nothing of this run was written; earlier results are unchanged"
# while training and saving, Ctrl-C and SIGTERM wait for the step's (save's) end (see stop);
# kept: what of this run is on disk now, said when interrupted
STOP = {"deferred": False, "signal": None, "kept": NOTHING_KEPT}


def checkpoint_kept(iteration, args):
    return (f"the checkpoint at iteration {iteration}/{args.n_iters * args.shots} is kept "
            "(continue with --resume); earlier results are unchanged")


def train(model, dataset, args, device, resolution, identity, resume=None):
    """CLIP-LoRA's loop (lora.py): AdamW, cosine to 1e-6 stepped per iteration, n_iters x shots iterations.
    resume: a checkpoint's state, from which the run continues exactly where it stopped."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, betas=(0.9, 0.999), weight_decay=1e-2)
    total = args.n_iters * args.shots
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total, eta_min=1e-6)
    precision = resolve_precision(args.precision, device)
    # fp16 needs loss scaling against gradient underflow, and skips a step whose gradients overflowed (official
    # lora.py; GradScaler's defaults); bf16 has float32's range and needs none
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    pinned = device.type == "cuda"  # pinned memory (CUDA only) lets the copies to the device overlap
    augment = data.train_transform(resolution, dataset.augment)  # DatasetSpec.augment
    loader = data.make_loader(dataset.train, augment, batch_size=args.batch_size,
                              shuffle=True, workers=args.workers, seed=args.seed, pin_memory=pinned)
    parts, iteration, skipped = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}, 0, 0
    if resume:
        comp_lora.load_lora_state_dict(model, resume["lora"])
        results.restore_checkpoint(resume, parts, device)
        iteration, skipped = resume["iteration"], resume["skipped"]
        # the batches already trained: whole passes, then the first batches of this pass (data.PassSampler)
        loader.sampler.passes, batches = divmod(iteration, len(loader))
        loader.sampler.skip = batches * args.batch_size
    tokens = class_prompts(dataset.classnames, dataset.template[0]).to(device)
    checkpoint = text_checkpointing(args.text_checkpoint, model, tokens, precision)
    if args.encoder == "vision":  # the text tower is frozen: its features never change
        with torch.no_grad():
            fixed_text = text_features(model, tokens, device, precision)

    window = {"loss": 0.0, "correct": 0, "seen": 0, "iterations": 0}
    last_print = time.time()
    start = last_print - (resume["seconds"] if resume else 0)  # eta and train_seconds: the whole run
    model.train()
    STOP.update(deferred=True, signal=None)  # from here a signal waits for the end of the step under way
    try:
        # pass after pass over the data, each shuffled anew (data.PassSampler), up to the last iteration
        for images, target in itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)),
                                               total - iteration):
            images, target = images.to(device, non_blocking=pinned), target.to(device, non_blocking=pinned)
            text = fixed_text if args.encoder == "vision" else text_features(model, tokens, device, precision,
                                                                              checkpoint)
            with autocast(device, precision), torch.set_grad_enabled(args.encoder != "text"):
                image = F.normalize(model.encode_image(images).float(), dim=-1)
            logits = LOGIT_SCALE * image @ text.t()
            loss = F.cross_entropy(logits, target)
            # fp16: a non-finite loss is an overflow the scaler skips (as the official loop); only a run of them,
            # or any non-finite loss without a scaler, means training has diverged
            skipped = skipped + 1 if not torch.isfinite(loss) else 0
            if skipped > (MAX_SKIPPED_STEPS - 1 if scaler.is_enabled() else 0):
                raise UserError(f"loss became {loss.item()} at iteration {iteration + 1}/{total}"
                                f"{f' ({skipped} steps in a row)' if skipped > 1 else ''}; nothing was saved "
                                "(try a lower --lr)")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()  # also after a skipped step, as the official loop (its warning is silenced in main)
            iteration += 1
            if STOP["signal"] or (args.checkpoint_every and iteration % args.checkpoint_every == 0 < total - iteration):
                if args.checkpoint_every:
                    results.write_checkpoint(run_dir(args) + results.CHECKPOINT, dict(identity, seed=args.seed), {
                        "iteration": iteration, "skipped": skipped, "seconds": time.time() - start},
                        comp_lora.lora_state_dict(model), parts, device)
                    STOP["kept"] = checkpoint_kept(iteration, args)
                if STOP["signal"]:
                    raise Stopped(STOP["signal"])
            if not skipped:
                for key, value in (("loss", loss.item() * len(target)), ("seen", len(target)), ("iterations", 1),
                                   ("correct", (logits.argmax(-1) == target).sum().item())):
                    window[key] += value
            if iteration % args.print_every == 0 or iteration == total:
                now, seen = time.time(), max(window["seen"], 1)
                print(f"iter {iteration}/{total}  loss {window['loss'] / seen:.4f}  train acc "
                      f"{100 * window['correct'] / seen:.2f}  lr {scheduler.get_last_lr()[0]:.3g}  "
                      f"{window['iterations'] / max(now - last_print, 1e-9):.2f} it/s  "
                      f"eta {(total - iteration) * (now - start) / iteration:.0f}s", flush=True)
                last_print, window = now, dict.fromkeys(window, 0)
    finally:
        STOP["deferred"] = False
    return time.time() - start


# ------------------------------------------------------------------------------------ runs

def run_dir(args):
    return results.run_dir(args.save_path, args.dataset, args.method, args.shots, args.seed)


def run_config(args, device):
    """Every setting that changes a run's result (results.RUN_FIELDS); the adapter's come from adapter_config."""
    settings = {**vars(args), **adapter_config(args), "precision": resolve_precision(args.precision, device)}
    return {field: settings[field] for field in results.RUN_FIELDS}


def clip_lora_file(args):
    return results.clip_lora_path(args.save_path, clip_model.model_name(args.backbone), args.dataset, args.shots,
                                  args.seed, args.filename)


def run(args):
    """Train (or with --eval_only/--adapter, re-evaluate) one configuration; returns the results dict."""
    STOP.update(deferred=False, signal=None, kept=NOTHING_KEPT)
    device = check_args(args)
    evaluate_only = args.eval_only or bool(args.adapter)
    config, identity, out = adapter_config(args), run_config(args, device), run_dir(args)
    adapter_path = results.adapter_to_read(args.adapter, out, clip_lora_file(args)) if evaluate_only else None
    checkpoint = None
    if not evaluate_only:
        if results.check_run_identity(out, identity, args.overwrite, args.skip_done):
            print(f"done: {out}")
            return None
        checkpoint = results.read_checkpoint(
            out + results.CHECKPOINT, dict(identity, seed=args.seed), device, args.resume, args.overwrite)
    if checkpoint:  # on disk until this run writes its own
        STOP["kept"] = checkpoint_kept(checkpoint["iteration"], args)
    resume = args.resume and checkpoint
    # A seed fixes the few-shot images (CLIP-LoRA's draw item for item, seeded again in build_dataset) and our own
    # training randomness: lora_A and the dropout masks (torch's global stream, seeded here, drawn from by nothing
    # else), shuffles and crops (data.make_loader); not the official code's streams for those (run_utils.py).
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    dataset, novel, others = data.build_datasets(args.dataset, args.eval_datasets, args.root, args.shots, args.seed,
                                                 args.subsample, os.path.join(args.save_path, "synthetic_data"))
    model, preprocess = clip_model.load(args.backbone, device=device)
    layers = add_adapters(model, config)  # lora_B = 0: until trained, the outputs are exactly the plain model's
    print(f"{args.dataset}: {len(dataset.classnames)} classes, {len(dataset.train)} training images "
          f"({args.shots} shots), {len(dataset.test)} test images; device {device}")
    print(parameter_line(model))

    template = dataset.template[0]
    test_cache = image_features(model, test_loader(dataset, preprocess, args), device, args.precision)
    zero_shot = zero_shot_accuracy(model, dataset, template, preprocess, args, device, cached=test_cache)
    print(f"zero-shot accuracy of the plain model: {zero_shot:.2f} (prompt {template!r})")
    plain_others = {name: zero_shot_accuracy(model, ds, ds.zeroshot_template, preprocess, args, device)
                    for name, ds in others.items()}

    if evaluate_only:
        load_adapters(adapter_path, model, config)
        print(f"evaluating {adapter_path}")
    seconds = 0.0 if evaluate_only else train(model, dataset, args, device, model.visual.input_resolution, identity,
                                              resume)
    adapter = results.adapter_file(config, comp_lora.lora_state_dict(model))
    for layer in layers:  # evaluating through merged weights costs no adapter branch (same accuracy, a test shows)
        layer.merge()
    cached = test_cache if args.encoder == "text" else None  # the image tower is unchanged when only text adapts
    final = zero_shot_accuracy(model, dataset, template, preprocess, args, device, cached=cached)
    print(f"test accuracy: {final:.2f} (prompt {template!r})")

    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    record = {"config": identity, "args": vars(args), "template": template, "zero_shot_accuracy": zero_shot,
              "accuracy": final, "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "train_seconds": seconds, "torch": torch.__version__,
              "device": f"{device.type} ({machine}, {torch.get_num_threads()} threads)"}
    for name, ds in others.items():  # the plain and the adapted model with the same prompt: CoOp's for the dataset
        plain = plain_others[name]
        adapted = zero_shot_accuracy(model, ds, ds.zeroshot_template, preprocess, args, device)
        record.setdefault("retention", {})[name] = {"plain": plain, "adapted": adapted, "retention": adapted / plain
                                                    if plain else None, "template": ds.zeroshot_template}
        kept = f"{adapted / plain:.3f}" if plain else "n/a"
        print(f"{name}: zero-shot plain {plain:.2f}  adapted {adapted:.2f}  retention {kept} (prompt "
              f"{ds.zeroshot_template!r}, this dataset's zero-shot prompt)")
    if novel is not None:
        new = zero_shot_accuracy(model, novel, template, preprocess, args, device)
        record.update(base_accuracy=final, new_accuracy=new,
                      harmonic_mean=2 * final * new / (final + new) if final + new else 0.0)
        print(f"base {final:.2f}  new {new:.2f}  harmonic mean {record['harmonic_mean']:.2f} (prompt {template!r})")

    for layer in layers:
        layer.unmerge()
    if not evaluate_only:  # before the export: a failed export never costs the run
        STOP["deferred"] = True  # a first signal waits for the run to be saved
        results.save(out, {"adapter.pt": lambda f: torch.save(adapter, f),
                           "results.json": lambda f: f.write(json.dumps(record, indent=2).encode())},
                     log=(os.path.join(args.save_path, "results.jsonl"), json.dumps(record) + "\n"),
                     before_commit=lambda: results.check_run_identity(out, identity, args.overwrite))
        results.remove(out + results.CHECKPOINT)  # the run is complete: nothing to resume
        STOP.update(deferred=False, kept=f"the run was saved in {out}")
        print(f"saved {os.path.join(out, 'adapter.pt')} and results.json")
        if STOP["signal"]:
            raise Stopped(STOP["signal"])
    if args.export_merged:  # a plain CLIP state dict, OpenAI's layout, on the CPU
        merged = {key: value.cpu()
                  for key, value in comp_lora.merge_and_unload(model).openai_state_dict().items()}
        try:
            results.save(args.export_merged, lambda f: torch.save(merged, f))
        except UserError as error:  # what the run itself left is unchanged
            raise UserError(f"{error} ({STOP['kept']})") from None
    return record


class Stopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM; args: the signal number. What it leaves on disk: STOP["kept"]."""


def stop(number, frame):
    """Signal handler: inside a training step or the run's save, that ends first (a checkpoint holds
    whole steps); else at once, and a second signal never waits."""
    if STOP["deferred"] and not STOP["signal"]:
        STOP["signal"] = number
    else:
        raise Stopped(number)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--summarize" in argv:  # the command of earlier versions: now python results.py DIR [--format] [--plot]
        return results.main([arg for arg in argv if arg != "--summarize"])
    args = parse_args(argv)
    # the official loop steps the cosine schedule after a step the fp16 scaler skipped too; we keep that
    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
    for number in (signal.SIGINT, signal.SIGTERM):  # schedulers (SLURM) stop a job with SIGTERM: as Ctrl-C
        signal.signal(number, stop)
    try:
        run(args)
    except (UserError, clip_model.LoadError, data.DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as interrupt:
        print(f"interrupted: {STOP['kept']}", file=sys.stderr)
        number = interrupt.args[0] if isinstance(interrupt, Stopped) else signal.SIGINT
        sys.exit(128 + number)  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM
    except OSError as error:  # a fault no check foresaw (disk, permissions): still one line, with the path
        print(f"error: {f'{error.filename}: ' if error.filename else ''}{error.strerror or error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
