"""Few-shot training and evaluation of CLIP with LoRA, Comp-LoRA or Block-LoRA. `run()` tells a
run from beginning to end; the functions below it follow in that order: the flags and their
checks, the model and its adapters, evaluation, the training loop, saving. What a run writes and
reads back (adapter files, results, checkpoints, summaries) is in results.py.

    python train.py --method comp --dataset eurosat --shots 4 --root /data

Flags and defaults are those of the official CLIP-LoRA code (MaxZanella/CLIP-LoRA, run_utils.py
and lora.py), so its results are reproduced by default and its users only change the script name.
"""
import argparse
import contextlib
import functools
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
# CLIP-LoRA's fixed scale on the cosine similarities (main.py), not the learnt one
LOGIT_SCALE = 100
MAX_SEED = 2 ** 32 - 1  # numpy's limit in CLIP-LoRA's seeding (run_utils.py set_random_seed)
MAX_COUNT = 2 ** 31 - 1  # the bound of every other integer flag: far beyond any run, and a C int
# fp16: overflowing steps in a row that stop a run (our bound; a transient one is skipped)
MAX_SKIPPED_STEPS = 100


def run(args, interrupts=None):
    """Train one configuration (or with --eval_only or --adapter, evaluate a saved adapter), then
    save it; returns what results.json holds (None: --skip_done found the run saved)."""
    interrupts = interrupts or Interrupts()
    device = check_args(args)
    identity, out = run_config(args, device), run_dir(args)
    evaluate_only = args.eval_only or bool(args.adapter)
    adapter = results.adapter_to_read(
        args.adapter, out, clip_lora_file(args)) if evaluate_only else None
    if not evaluate_only and results.check_run_identity(out, identity, args.overwrite,
                                                        args.skip_done):
        print(f"done: {out}")
        return None
    resume = None if evaluate_only else checkpoint_to_resume(args, identity, device, interrupts)
    # A seed fixes the few-shot images (CLIP-LoRA's draw item for item, seeded again in
    # data.build_dataset) and our own training randomness: lora_A and the dropout masks (torch's
    # global stream, seeded here and drawn from by nothing else), shuffles and crops
    # (data.make_loader); not the official code's streams for those (run_utils.py).
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    dataset, novel, others = data.build_datasets(
        args.dataset, args.eval_datasets, args.root, args.shots, args.seed, args.subsample,
        os.path.join(args.save_path, "toy_data"))
    model, preprocess = clip_model.load(args.backbone, device=device)
    layers = add_adapters(model, adapter_config(args))  # lora_B = 0: still the plain model
    print(f"{args.dataset}: {len(dataset.classnames)} classes, {len(dataset.train)} training "
          f"images ({args.shots} shots), {len(dataset.test)} test images; device {device}")
    print(comp_lora.parameter_line(model))
    template = dataset.template[0]
    images = test_images(model, preprocess, args, device, dataset)  # unchanged if only text adapts
    plain = evaluate(model, preprocess, args, device, dataset, others, images)
    print(f"zero-shot accuracy of the plain model: {plain['test']:.2f} (prompt {template!r})")
    if evaluate_only:
        load_adapters(adapter, model, adapter_config(args))
        print(f"evaluating {adapter}")
    seconds = 0.0 if evaluate_only else train(model, dataset, args, device, identity, interrupts,
                                              resume)
    with merged(layers):  # no adapter branch to run: the same accuracy, faster (a test shows it)
        kept = images if args.encoder == "text" else None
        adapted = evaluate(model, preprocess, args, device, dataset, others, kept)
        new = novel and accuracy(model, preprocess, args, device, novel, template)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    record = {"config": identity, "args": vars(args),
              **accuracies_record(dataset, others, plain, adapted, new),
              "trainable_params": comp_lora.trainable_count(model),
              "train_seconds": seconds, "torch": torch.__version__,
              "device": f"{device.type} ({name}, {torch.get_num_threads()} threads)"}
    if not evaluate_only:
        save_run(args, record, model, interrupts)
    if args.export_merged:
        export_merged(args, model, interrupts)
    return record


# ------------------------------------------------------------------------------------ flags
def parse_args(argv=None):
    """CLIP-LoRA's flags, names and defaults (run_utils.py get_arguments), then ours."""
    p = results.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)

    def flag(name, default, help=None, **options):  # a value of the default's type
        p.add_argument(name, type=type(default), default=default, help=help, **options)

    def switch(name, help):
        p.add_argument(name, action="store_true", help=help)
    flag("--method", "lora", "lora, comp or block")
    flag("--dataset", "dtd", f"one of {', '.join(data.DATASETS)}")
    p.add_argument("--root", "--root_path", dest="root", default="",
                   help="data root (CoOp's layout)")
    flag("--shots", 16)
    flag("--seed", 1, f"0 to {MAX_SEED} (numpy's limit, CLIP-LoRA's seeding)")
    flag("--backbone", "ViT-B/16", f"{clip_model.available_models()} or a weights file")
    flag("--lr", 2e-4)
    flag("--n_iters", 500, "total iterations = n_iters x shots")
    flag("--batch_size", 32)
    flag("--r", 2)
    flag("--alpha", 1.0, "scaling s = alpha / sqrt(r); 0 is refused")
    flag("--dropout_rate", 0.25)
    flag("--encoder", "both", choices=["text", "vision", "both"])
    p.add_argument("--params", nargs="+", default=["q", "k", "v"], choices=clip_model.PROJECTIONS,
                   help="projections among q k v o")
    flag("--position", "all", choices=clip_model.POSITIONS)
    flag("--blocks", 8, "Block-LoRA: number of input chunks n")
    flag("--comp_ratio", 0.5, "Comp-LoRA: protected share k / min(d_out, d_in)")
    flag("--save_path", "out", "root of <dataset>/<method>/<shots>shots/seed<seed>/")
    switch("--overwrite", "replace a saved run of another configuration")
    switch("--eval_only", "evaluate this configuration's saved adapter")
    flag("--adapter", "", "evaluate this adapter file, like --eval_only", metavar="FILE")
    flag("--filename", "lora_weights", "CLIP-LoRA's adapter file name, without .pt")
    p.add_argument("--eval_datasets", default="", type=data.dataset_list,
                   help="comma-separated datasets for zero-shot retention")
    flag("--subsample", "all", "base: base-to-novel protocol", choices=["all", "base"])
    flag("--export_merged", "", "also write CLIP with the adapters merged", metavar="FILE")
    flag("--device", "cuda" if torch.cuda.is_available() else "cpu")
    flag("--precision", "auto", "auto: fp16 on CUDA", choices=["auto", "fp32", "fp16", "bf16"])
    flag("--text_checkpoint", "auto", "recompute text blocks in backward, not storing them; auto: "
         "enough to keep 2 GiB of activations (ImageNet: 7 of 12)", choices=["auto", "on", "off"])
    flag("--workers", min(8, os.cpu_count() or 1), "loader processes")
    flag("--print_every", 50, "iterations between progress lines")
    flag("--checkpoint_every", 500, "iterations between checkpoints; 0: none")
    switch("--resume", "continue this configuration's run from its checkpoint")
    switch("--skip_done", "exit at once if this run is saved already")
    return p.parse_args(argv)


def check_args(args):
    """Every flag and path, before any download, data pass or folder creation;
    returns the device."""
    if args.method not in METHODS:
        raise UserError(f"--method {args.method!r}: expected one of {', '.join(METHODS)}")
    data.check_names(args.dataset, args.eval_datasets)
    check_numbers(args)
    if len(set(args.params)) != len(args.params):
        raise UserError(f"--params {' '.join(args.params)}: a projection named twice; expected "
                        "distinct ones")
    if not args.save_path:
        raise UserError("--save_path '': expected a folder name")
    if args.backbone not in clip_model.available_models() and not os.path.isfile(args.backbone):
        raise UserError(f"--backbone {args.backbone!r}: expected one of "
                        f"{clip_model.available_models()} or the path of a weights file")
    check_paths(args)
    return clip_model.device(args.device)


def check_numbers(args):
    """Each numeric flag against what it accepts; integers bounded first (400 digits: no float)."""
    rules = {"seed": (f"an integer from 0 to {MAX_SEED}", lambda n: 0 <= n <= MAX_SEED),
             "lr": ("a positive number", lambda lr: 0 < lr < math.inf)}
    for flag in ("shots", "n_iters", "batch_size", "r", "blocks", "print_every"):
        rules[flag] = (f"a positive integer, at most {MAX_COUNT}", lambda n: 1 <= n <= MAX_COUNT)
    for flag in ("workers", "checkpoint_every"):
        rules[flag] = (f"0 or more, at most {MAX_COUNT}", lambda n: 0 <= n <= MAX_COUNT)
    for flag, setting in (("alpha", "alpha"), ("dropout_rate", "dropout"),
                          ("comp_ratio", "comp_ratio")):
        rules[flag] = comp_lora.SETTINGS[setting]  # what the layers accept
    for flag, (expected, valid) in rules.items():
        if not valid(getattr(args, flag)):
            raise UserError(f"--{flag} {getattr(args, flag)}: expected {expected}")


def check_paths(args):
    """Every path the run reads or writes: what it reads is there, what it writes can be written
    (results.check_writable), and --export_merged names none of the others."""
    run, log = run_dir(args), os.path.join(args.save_path, results.LOG)
    # every reader of a run folder first puts back one a killed save set aside (results.recover)
    results.recover(os.path.dirname(os.path.abspath(args.adapter)) if args.adapter else run)
    if args.adapter and not os.path.isfile(args.adapter):
        raise UserError(f"--adapter {args.adapter}: no such file")
    # training replaces the run folder (staged in its parent) and its checkpoint, appends to the log
    writes = {run: "output directory", run + results.CHECKPOINT: "checkpoint", log: "log"}
    for path in {} if args.eval_only or args.adapter else writes:
        results.check_writable(path, writes[path], folder=path == run, create=True)
    if not args.export_merged:
        return
    results.check_writable(args.export_merged, "--export_merged")
    outputs = [*writes, os.path.join(run, results.ADAPTER), os.path.join(run, results.RESULTS)]
    taken = [("--backbone", args.backbone), ("--adapter", args.adapter),
             ("--filename", clip_lora_file(args)), *(("--save_path", path) for path in outputs)]
    for flag, path in taken:
        if path and os.path.realpath(path) == os.path.realpath(args.export_merged):
            raise UserError(f"--export_merged {args.export_merged}: is {path}, which {flag} names; "
                            "choose another file")


# ------------------------------------------------------------------------- what a run is
def run_dir(args):
    return results.run_dir(args.save_path, args.dataset, args.method, args.shots, args.seed)


def clip_lora_file(args):
    return results.clip_lora_path(args.save_path, clip_model.model_name(args.backbone),
                                  args.dataset, args.shots, args.seed, args.filename)


def adapter_config(args):
    """The fields that define an adapted model, stored with the adapter weights."""
    return {"method": args.method, "r": args.r, "alpha": args.alpha,
            "scaling_rule": "alpha/sqrt(r)", "dropout": args.dropout_rate,
            "blocks": args.blocks if args.method == "block" else None,
            "comp_ratio": args.comp_ratio if args.method == "comp" else None,
            "encoder": args.encoder, "position": args.position,
            "params": results.canonical_params(args.params),
            "backbone": clip_model.model_name(args.backbone)}


def run_config(args, device):
    """Every setting that changes a run's result (results.RUN_FIELDS)."""
    precision = resolve_precision(args.precision, device)
    settings = {**vars(args), **adapter_config(args), "precision": precision}
    return {field: settings[field] for field in results.RUN_FIELDS}


def checkpoint_to_resume(args, identity, device, interrupts):
    """The state of this configuration's checkpoint with --resume, else None
    (results.read_checkpoint refuses another configuration's, which this run would replace)."""
    path = run_dir(args) + results.CHECKPOINT
    state = results.read_checkpoint(path, dict(identity, seed=args.seed), device, args.resume,
                                    args.overwrite)
    if state:  # on disk until this run writes its own
        interrupts.kept = checkpoint_kept(state["iteration"], args)
    return state if args.resume else None


# ------------------------------------------------------------------- the model and adapters
def add_adapters(model, config):
    """Wrap the configured attention projections with the configured adapter, freeze the rest;
    returns the layers. Flags that do not fit the model (--blocks, --comp_ratio, --position) are a
    UserError."""
    method = {"comp": "comp_ratio", "block": "blocks"}.get(config["method"])
    own = {method: config[method]} if method else {}
    try:
        names = clip_model.adapter_names(model, config["encoder"], config["position"],
                                         config["params"])
        comp_lora.add_adapters(model, METHODS[config["method"]], names, r=config["r"],
                               alpha=config["alpha"], dropout=config["dropout"], **own)
    except ValueError as error:
        raise UserError(f"--{method} {config[method]}: {error}" if method else str(error)) from None
    comp_lora.mark_only_lora_as_trainable(model)
    return [model.get_submodule(name) for name in names]


def load_adapters(path, model, config):
    """Load an adapter file (ours or CLIP-LoRA's) into a model adapted with `config`, strictly."""
    towers = ("text", "vision") if config["encoder"] == "both" else (config["encoder"],)
    # CLIP-LoRA's layer_<i>: the adapted attentions, text blocks first (apply_lora)
    modules = [name.rpartition(".")[0] for tower in towers
               for name in clip_model.adapter_names(model, tower, config["position"], ["q"])]
    expected = {key: value.shape for key, value in comp_lora.lora_state_dict(model).items()}
    comp_lora.load_lora_state_dict(model, results.read_adapter(path, config, expected, modules))


@contextlib.contextmanager
def merged(layers):
    """`with merged(layers):` the adapters merged into W, unmerged again at the end."""
    for layer in layers:
        layer.merge()
    try:
        yield
    finally:
        for layer in layers:
            layer.unmerge()


# ------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def accuracy(model, preprocess, args, device, dataset, template, images=None):
    """Top-1 test accuracy (%) with prompts from `template`; images: test_images' if known."""
    model.eval()
    prompts = data.class_prompts(dataset, template)
    text = clip_model.text_features(model, prompts, device, args.precision)
    features, labels = images or test_images(model, preprocess, args, device, dataset)
    return 100.0 * (features @ text.t()).argmax(dim=-1).eq(labels).float().mean().item()


def test_images(model, preprocess, args, device, dataset):
    """The normalised features and labels of a dataset's test images."""
    loader = data.make_loader(dataset.test, preprocess, batch_size=256, shuffle=False,
                              workers=args.workers, pin_memory=device.type == "cuda")
    return clip_model.image_features(model, loader, device, args.precision)


def evaluate(model, preprocess, args, device, dataset, others, images=None):
    """{"test": the target's accuracy with CLIP-LoRA's prompt, name: each of --eval_datasets' with
    its zero-shot prompt}; images: the target's test_images, if known."""
    score = functools.partial(accuracy, model, preprocess, args, device)
    scores = {name: score(ds, ds.zeroshot_template) for name, ds in others.items()}
    return {"test": score(dataset, dataset.template[0], images), **scores}


def accuracies_record(dataset, others, plain, adapted, new=None):
    """What results.json holds of the accuracies, each printed: the target's, the retention on each
    of --eval_datasets (adapted / plain, both with its zero-shot prompt), base and new."""
    template, final = dataset.template[0], adapted["test"]
    print(f"test accuracy: {final:.2f} (prompt {template!r})")
    record = {"template": template, "zero_shot_accuracy": plain["test"], "accuracy": final}
    for name, ds in others.items():
        kept = adapted[name] / plain[name] if plain[name] else None
        print(f"{name}: zero-shot plain {plain[name]:.2f}  adapted {adapted[name]:.2f}  retention "
              f"{'n/a' if kept is None else f'{kept:.3f}'} (prompt {ds.zeroshot_template!r}, this "
              "dataset's zero-shot prompt)")
        record.setdefault("retention", {})[name] = {"plain": plain[name],
                                                    "adapted": adapted[name],
                                                    "retention": kept,
                                                    "template": ds.zeroshot_template}
    if new is not None:
        mean = 2 * final * new / (final + new) if final + new else 0.0
        record.update(base_accuracy=final, new_accuracy=new, harmonic_mean=mean)
        print(f"base {final:.2f}  new {new:.2f}  harmonic mean {mean:.2f} (prompt {template!r})")
    return record


# -------------------------------------------------------------------------------- training
def train(model, dataset, args, device, identity, interrupts, resume=None):
    """CLIP-LoRA's loop (lora.py): AdamW, cosine to 1e-6 stepped per iteration, n_iters x shots
    iterations of cross-entropy on 100 x cos(image, class prompt). resume: a checkpoint's state,
    from which the run continues exactly where it stopped. Returns the run's training seconds."""
    total = args.n_iters * args.shots
    precision = resolve_precision(args.precision, device)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, betas=(0.9, 0.999), weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total, eta_min=1e-6)
    # fp16 needs loss scaling against gradient underflow, and skips a step whose gradients
    # overflowed (official lora.py; GradScaler's defaults); bf16 has float32's range, needs none
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    parts = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    augment = data.train_transform(model.visual.input_resolution, dataset.augment)
    loader = data.make_loader(dataset.train, augment, batch_size=args.batch_size, shuffle=True,
                              workers=args.workers, seed=args.seed,
                              pin_memory=device.type == "cuda")
    if resume:
        restore(resume, model, parts, loader, args, device)
    tokens = data.class_prompts(dataset, dataset.template[0]).to(device)
    checkpoint = clip_model.text_checkpoint(args.text_checkpoint, model, tokens, precision)
    if args.encoder == "vision":  # the text tower is frozen: its features never change
        with torch.no_grad():
            fixed = clip_model.text_features(model, tokens, device, precision)
    progress = Progress(total, args.print_every, resume)
    model.train()
    interrupts.waiting = True  # from here a signal waits for the end of the step under way
    try:
        for images, target in batches(loader, total - progress.iteration, device):
            text = fixed if args.encoder == "vision" else clip_model.text_features(
                model, tokens, device, precision, checkpoint)
            with autocast(device, precision), torch.set_grad_enabled(args.encoder != "text"):
                image = F.normalize(model.encode_image(images).float(), dim=-1)
            logits = LOGIT_SCALE * image @ text.t()
            loss = F.cross_entropy(logits, target)
            progress.check_finite(loss, scaler.is_enabled())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()  # also after a skipped step, as the official loop
            progress.update(loss, logits, target, scheduler.get_last_lr()[0])
            checkpoint_if_due(progress, args, identity, model, parts, device, interrupts)
    finally:
        interrupts.waiting = False
    return progress.seconds()


def batches(loader, count, device):
    """The next `count` batches, on the device: pass after pass over the data, each shuffled anew
    (data.PassSampler). Pinned memory (CUDA only) lets the copies overlap."""
    passes = itertools.chain.from_iterable(itertools.repeat(loader))
    for images, target in itertools.islice(passes, count):
        yield images.to(device, non_blocking=True), target.to(device, non_blocking=True)


def restore(state, model, parts, loader, args, device):
    """Put a checkpoint's adapters, optimizer, schedule, scaler and random streams back, and skip
    the batches already trained: whole passes, then the first batches of this pass."""
    comp_lora.load_lora_state_dict(model, state["lora"])
    results.restore_checkpoint(state, parts, device)
    loader.sampler.passes, done = divmod(state["iteration"], len(loader))  # data.PassSampler
    loader.sampler.skip = done * args.batch_size


class Progress:
    """The iteration, the non-finite losses in a row, and every print_every iterations a line: the
    mean loss and train accuracy since the last line, lr, speed, eta (the whole run's time)."""

    def __init__(self, total, print_every, resume=None):
        state = resume or {"iteration": 0, "skipped": 0, "seconds": 0}
        self.total, self.print_every = total, print_every
        self.iteration, self.skipped = state["iteration"], state["skipped"]
        self.last = time.time()
        self.start = self.last - state["seconds"]
        self.loss = self.correct = self.seen = self.steps = 0

    def check_finite(self, loss, scaled):
        """fp16: a non-finite loss is an overflow the scaler skips (as the official loop); only a
        run of them, or any non-finite loss without a scaler, means training has diverged."""
        self.skipped = 0 if torch.isfinite(loss) else self.skipped + 1
        if self.skipped > (MAX_SKIPPED_STEPS - 1 if scaled else 0):
            in_a_row = f" ({self.skipped} steps in a row)" if self.skipped > 1 else ""
            raise UserError(f"loss became {loss.item()} at iteration {self.iteration + 1}/"
                            f"{self.total}{in_a_row}; nothing was saved (try a lower --lr)")

    def update(self, loss, logits, target, lr):
        self.iteration += 1
        if not self.skipped:
            self.loss += loss.item() * len(target)
            self.correct += (logits.argmax(-1) == target).sum().item()
            self.seen, self.steps = self.seen + len(target), self.steps + 1
        if self.iteration % self.print_every and self.iteration < self.total:
            return
        now, seen = time.time(), max(self.seen, 1)
        eta = (self.total - self.iteration) * (now - self.start) / self.iteration
        print(f"iter {self.iteration}/{self.total}  loss {self.loss / seen:.4f}  train acc "
              f"{100 * self.correct / seen:.2f}  lr {lr:.3g}  "
              f"{self.steps / max(now - self.last, 1e-9):.2f} it/s  eta {eta:.0f}s", flush=True)
        self.last, self.loss, self.correct, self.seen, self.steps = now, 0, 0, 0, 0

    def seconds(self):
        return time.time() - self.start


def checkpoint_if_due(progress, args, identity, model, parts, device, interrupts):
    """A checkpoint every --checkpoint_every iterations (but at the last) and where a signal stops
    the run: whole steps, all or nothing (results.write_checkpoint)."""
    every, iteration = args.checkpoint_every, progress.iteration
    if every and (iteration % every == 0 and iteration < progress.total or interrupts.signal):
        state = {"iteration": iteration, "skipped": progress.skipped, "seconds": progress.seconds()}
        results.write_checkpoint(run_dir(args) + results.CHECKPOINT, dict(identity, seed=args.seed),
                                 state, comp_lora.lora_state_dict(model), parts, device)
        interrupts.kept = checkpoint_kept(iteration, args)
    interrupts.stop_if_signalled()


def checkpoint_kept(iteration, args):
    return (f"the checkpoint at iteration {iteration}/{args.n_iters * args.shots} is kept "
            "(continue with --resume); earlier results are unchanged")


# ---------------------------------------------------------------------------------- saving
def save_run(args, record, model, interrupts):
    """adapter.pt and results.json in the run folder, a line in results.jsonl, all or nothing
    (results.save); then the checkpoint goes. A first signal waits for the save to end."""
    out = run_dir(args)
    adapter = results.adapter_file(adapter_config(args), comp_lora.lora_state_dict(model))
    files = {results.ADAPTER: lambda f: torch.save(adapter, f),
             results.RESULTS: lambda f: f.write(json.dumps(record, indent=2).encode())}
    log = (os.path.join(args.save_path, results.LOG), json.dumps(record) + "\n")
    interrupts.waiting = True
    results.save(out, files, log=log, before_commit=lambda: results.check_run_identity(
        out, record["config"], args.overwrite))
    results.remove(out + results.CHECKPOINT)  # the run is complete: nothing to resume
    interrupts.waiting, interrupts.kept = False, f"the run was saved in {out}"
    print(f"saved {os.path.join(out, results.ADAPTER)} and {results.RESULTS}")
    interrupts.stop_if_signalled()


def export_merged(args, model, interrupts):
    """--export_merged: a plain CLIP state dict with the adapters merged, OpenAI's layout, on the
    CPU; after the run's own files, so that a failed export never costs the run."""
    state = comp_lora.merge_and_unload(model).openai_state_dict()
    merged_state = {key: value.cpu() for key, value in state.items()}
    try:
        results.save(args.export_merged, lambda f: torch.save(merged_state, f))
    except UserError as error:  # what the run itself left is unchanged
        raise UserError(f"{error} ({interrupts.kept})") from None


# ---------------------------------------------------------------------------- the command
class Interrupts:
    """Ctrl-C and SIGTERM (how schedulers such as SLURM stop a job): while `waiting`, inside a
    training step or the run's save, the first one waits for its end (a checkpoint holds whole
    steps); otherwise, or a second one, stops the run at once. `kept`: what of this run is on
    disk now, said when it stops."""

    def __init__(self):
        self.waiting, self.signal = False, None
        self.kept = "nothing of this run was written; earlier results are unchanged"

    def handle(self, number, frame):  # the signal handler
        if self.waiting and not self.signal:
            self.signal = number
        else:
            raise KeyboardInterrupt(number)

    def stop_if_signalled(self):
        if self.signal:
            raise KeyboardInterrupt(self.signal)


def main(argv=None):
    args = parse_args(argv)
    # the official loop steps the cosine schedule after a step the fp16 scaler skipped too
    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
    interrupts = Interrupts()
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, interrupts.handle)
    try:
        run(args, interrupts)
    except (UserError, clip_model.LoadError, data.DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as interrupt:
        print(f"interrupted: {interrupts.kept}", file=sys.stderr)
        number = interrupt.args[0] if interrupt.args else signal.SIGINT  # the signal handled
        sys.exit(128 + number)  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM
    except OSError as error:  # a fault no check foresaw (disk, permissions): one line, the path
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{error.strerror or error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
