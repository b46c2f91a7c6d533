"""Speed and memory of a training step of each method, side by side with peft's LoRA, on a
randomly initialised CLIP ViT-B/16 (no download).

    python bench.py                        # the steps section at 10, 100 and 1,000 classes
    python bench.py --classes 100 --methods lora peft --rounds 5
    python bench.py --sections text imagenet comp_setup --json bench.json

--sections (default: steps)

steps: a training step of each configuration (--classes x --methods). Methods: `none`, the
frozen model (the loss back-propagated to the outputs of the patch and token embeddings, nothing
updated); `lora`, `comp` and `block`, ours exactly as train.py trains by default (r 2, alpha 1,
dropout 0.25 on q, k, v of both towers, AdamW, fp16 autocast on CUDA, --text_checkpoint auto);
`peft`, peft's LoRA with the same r, alpha, dropout and projections on transformers' CLIPModel
with ViT-B/16's sizes (without peft and transformers installed, a hint replaces its rows).
Prompts: at 1,000 classes with the token lengths of ImageNet's, else CoOp-style class names.
Each measurement is a fresh process (spawn) that builds its model, runs --warmup untimed and
--steps timed steps; the configurations take turns for --rounds rounds, so that the machine's
drift touches them alike. Per configuration: the median and min-max of all its timed steps;
time vs peft, the median and range of the rounds' ratios of medians; the largest peak memory of
its processes (CPU: ru_maxrss; CUDA: max_memory_allocated) and its ratio to peft's; the step's
FLOPs (FlopCounterMode, on the first warm-up step of round 1); "of peak": each round's FLOP/s
of the median step over a matmul's FLOP/s measured in the same process just after its steps
(matmul_peak: CPU float32, CUDA fp16, the step's), so that the machine's drift touches both
alike. The FLOPs are each step's own: peft's text tower also computes the padding up to the
longest prompt, ours runs length groups.
Then where the time goes: in round 1, one more step under torch.profiler, its operators' self
time summed by kind (operator_kind: matmuls, attention, the dropout masks' random draws, the
rest), and the matmuls' own FLOP/s over the process's matmul peak.

text: no-grad encoding of 10 CoOp prompts and of 1,000 with ImageNet's lengths, in one call: as
length groups (CLIP.encode_text), as one truncation to the longest prompt, and at the full 77
positions (openai/CLIP's computation).

imagenet: CLIP-LoRA's ImageNet 16-shot setting (batch 32, 1,000 prompts, fp16 autocast) for our
methods. CUDA: step time and max_memory_allocated, measured. CPU: the bytes kept for the
backward pass (counted with saved_tensors_hooks) and the GPU peak projected from them.

comp_setup: seconds to wrap ViT-B/16's 72 q, k, v projections with Comp-LoRA (an SVD each).

Defaults. CPU: batch 8, and 4 from 1,000 classes on (a step there takes ~12 s on 2 cores);
3 rounds of 2 warm-up and 2 timed steps (peft's second step is still some 5-10% slower than
its later ones, ours not): 15 processes a round, 11-13 minutes a round on 2 idle cores (peft's
1,000-class process, ~45 s a step, takes 3 of them), the steps section 35 minutes. CUDA: batch
32, 3 rounds of 3 warm-up and 10 timed steps. --batch sets one batch for every class count.
--json FILE also writes every figure.
"""
import argparse
import contextlib
import functools
import importlib.util
import itertools
import json
import math
import multiprocessing
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import clip_model
import comp_lora
import results
import train
from results import UserError

DEFAULTS = train.parse_args([])  # our rows run train.py's defaults
METHODS = ("none", "lora", "comp", "block", "peft")
SECTIONS = ("steps", "text", "imagenet", "comp_setup")
OPERATOR_KINDS = ("matmul", "attention", "masks", "other")  # bench.operator_kind's
PEFT_HINT = "peft rows left out: pip install peft transformers (for bench.py only)"
GIB = 2 ** 30
# Class names from the CoOp datasets: "a photo of a {name}." is 8 to 15 tokens with
# these, as is typical.
CLASS_NAMES = [
    "tench", "great white shark", "German Shepherd Dog", "espresso machine", "Abyssinian",
    "apple pie", "hot and sour soup", "bishop of llandaff", "Annual Crop Land", "honeycombed",
    "Boeing 737-800", "Apply Eye Makeup", "indoor general store", "sea horse", "school bus",
    "red wine", "dalmatian", "Greater Swiss Mountain Dog", "Staffordshire Bull Terrier",
    "chicken quesadilla", "globe thistle", "love in the mist", "Cessna 172",
    "2012 Tesla Model S Sedan", "1991 Volkswagen Golf Hatchback", "striped",
    "Herbaceous Vegetation Land", "Industrial Buildings", "Playing Cello",
    "outdoor athletic field"]
# Token positions (start and end tokens included) of CLIP-LoRA's 1,000 ImageNet prompts
# "a photo of a {class}.": `imagenet_classes` of MaxZanella/CLIP-LoRA datasets/imagenet.py
# (commit 358f0d7) through our tokenizer, as {positions: prompts}. Only the lengths matter
# for cost, so the bench builds prompts of these lengths.
IMAGENET_LENGTHS = {8: 246, 9: 508, 10: 155, 11: 49, 12: 24, 13: 9, 14: 7, 15: 1, 18: 1}
IMAGENET_BATCH = 32  # CLIP-LoRA's batch size
TEXT_PASSES, TEXT_SECONDS = 5, 20  # text section: timed passes per encoding, cut after 20 s
# FlopCounterMode has formulas for the CUDA attention kernels but not for the CPU one that
# scaled_dot_product_attention runs; give it the same dense formulas (an upper bound for the
# causal text attention, a small share of the step).
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, out_shape=None, **kwargs:
            sdpa_backward_flop_count(grad, q, k, v)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(functions, device, rounds, warmup=0, max_seconds=math.inf):
    """{name: seconds of each call}; the functions take turns each round, so that drift
    touches them alike."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    times, start = {name: [] for name in functions}, time.perf_counter()
    for _ in range(rounds):
        for name, function in functions.items():
            sync(device)
            begin = time.perf_counter()
            function()
            sync(device)
            times[name].append(time.perf_counter() - begin)
        if time.perf_counter() - start > max_seconds:
            break
    return times


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def memory_mark(device):
    """Peak bytes: CUDA's allocated tensors, or this process's resident high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss counts bytes on macOS, else KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit


def matmul_peak(device):
    """FLOP/s of a square matmul in the step's matmul dtype: 8192 x 8192 fp16 on CUDA, 2048 x
    2048 float32 on CPU."""
    n, dtype = (8192, torch.float16) if device.type == "cuda" else (2048, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    seconds = timed({"mm": lambda: a @ b}, device, rounds=10, warmup=2)["mm"]
    return 2 * n ** 3 / statistics.median(seconds)


# ----------------------------------------------------------------------------- the step

def class_prompts(classes):
    """A step's prompts: at 1,000 classes of ImageNet's token lengths, else CoOp's names."""
    if classes == 1000:
        return imagenet_prompts()
    return [f"a photo of a {CLASS_NAMES[i % len(CLASS_NAMES)]}." for i in range(classes)]


def imagenet_prompts():
    """1,000 prompts with ImageNet's token lengths (IMAGENET_LENGTHS) in a fixed random order."""
    lengths = [length for length, count in IMAGENET_LENGTHS.items() for _ in range(count)]
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    # "a photo of a x." takes 8 positions with the start and end tokens; each further " x" one
    return ["a photo of a" + " x" * (lengths[i] - 7) + "." for i in order]


def step_inputs(classes, batch, device):
    """(tokens, images, labels) of a step, the same in every process."""
    generator = torch.Generator().manual_seed(0)
    resolution = clip_model.VIT_B_16["image_resolution"]
    images = torch.randn(batch, 3, resolution, resolution, generator=generator)
    labels = torch.randint(classes, (batch,), generator=generator)
    tokens = clip_model.tokenize(class_prompts(classes))
    return tokens.to(device), images.to(device), labels.to(device)


def our_model(method, device):
    """ViT-B/16 in training mode with train.py's default adapters of `method`; none: frozen."""
    model = clip_model.build_random(**clip_model.VIT_B_16).to(device)
    if method != "none":
        config = train.adapter_config(train.parse_args(["--method", method]))
        train.add_adapters(model, config)
        return model.train()
    model.requires_grad_(False)
    # Nothing trains, so the step back-propagates the loss to the outputs of the patch and
    # token embeddings: the activation gradients through every block of both towers that an
    # adapter step also computes, without the adapters (and without a conv backward or a
    # dense 49,408 x 512 gradient). A little more than an adapter step's, about 1%: the input
    # gradients of ln_pre and of block 0's q, k, v.
    for module in (model.visual.conv1, model.token_embedding):
        module.register_forward_hook(lambda _module, _inputs, output: output.requires_grad_())
    return model.train()


def peft_model(device):
    """transformers' CLIPModel with ViT-B/16's sizes (random weights, QuickGELU as CLIP) and
    peft's LoRA on q, k and v of both towers with our r, alpha and dropout (peft scales by
    alpha / r, we by alpha / sqrt(r): no effect on cost)."""
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPConfig, CLIPModel
    c = clip_model.VIT_B_16

    def tower(width, layers, **sizes):  # a tower's config: heads of 64, an MLP 4x wide
        return dict(hidden_size=width, intermediate_size=4 * width, hidden_act="quick_gelu",
                    num_attention_heads=width // 64, num_hidden_layers=layers, **sizes)
    text = tower(c["transformer_width"], c["transformer_layers"],
                 max_position_embeddings=c["context_length"], vocab_size=c["vocab_size"])
    vision = tower(c["vision_width"], c["vision_layers"], image_size=c["image_resolution"],
                   patch_size=c["vision_patch_size"])
    config = CLIPConfig(projection_dim=c["embed_dim"], text_config=text, vision_config=vision)
    lora = LoraConfig(r=DEFAULTS.r, lora_alpha=DEFAULTS.alpha, lora_dropout=DEFAULTS.dropout_rate,
                      target_modules=["q_proj", "k_proj", "v_proj"])
    return get_peft_model(CLIPModel(config), lora).to(device).train()


def our_features(model, tokens, device, precision):
    """features(images): normalised float32 (image, text) features as train.py's loop computes
    them, the text encoded anew each step with --text_checkpoint's blocks checkpointed."""
    checkpoint = clip_model.text_checkpoint(DEFAULTS.text_checkpoint, model, tokens, precision)

    def features(images):
        text = clip_model.text_features(model, tokens, device, precision, checkpoint)
        with clip_model.autocast(device, precision):
            image = model.encode_image(images)
        return F.normalize(image.float(), dim=-1), text
    return features


def peft_features(model, tokens, device, precision):
    """our_features for peft's model: the prompts cut to the longest one, with their attention
    mask, as CLIPProcessor(padding=True) gives them."""
    ends = tokens.argmax(dim=-1, keepdim=True)  # (n, 1): the end token has the highest id
    ids = tokens[:, :int(ends.max()) + 1]
    mask = (torch.arange(ids.shape[1], device=device) <= ends).long()  # (n, length)

    def features(images):
        with clip_model.autocast(device, precision):
            out = model(input_ids=ids, attention_mask=mask, pixel_values=images)
        image, text = out.image_embeds.float(), out.text_embeds.float()
        return F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    return features


def training_step(method, tokens, device):
    """step(images, labels) of `method` as train.py's loop runs it: the features, CLIP-LoRA's
    loss (cross-entropy of 100 x cosine), AdamW, the fp16 loss scaler. Left out: the cosine
    schedule's step (a few scalar operations)."""
    precision = clip_model.resolve_precision(DEFAULTS.precision, device)
    if method == "peft":
        model = peft_model(device)
        features = peft_features(model, tokens, device, precision)
    else:
        model = our_model(method, device)
        features = our_features(model, tokens, device, precision)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=DEFAULTS.lr, weight_decay=1e-2) if params else None
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step(images, labels):
        image, text = features(images)
        loss = F.cross_entropy(train.LOGIT_SCALE * image @ text.t(), labels)
        if optimizer:
            optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if optimizer:  # none: nothing to update
            scaler.step(optimizer)
            scaler.update()
    return step


def measure(method, classes, batch, device, warmup, steps, first_round):
    """One configuration, in a fresh process so that the peak is its own: the seconds of each
    timed step, the peak bytes, the matmul peak of this process just after its steps (the
    machine's drift moves both alike); in the first round also the FLOPs of the first warm-up
    step and, after the timed steps, the profile of one more."""
    tokens, images, labels = step_inputs(classes, batch, device)
    step = functools.partial(training_step(method, tokens, device), images, labels)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the steps' peak, not the set-up's
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    with counter if first_round else contextlib.nullcontext():
        step()
    seconds = timed({"step": step}, device, steps, warmup - 1)["step"]
    peak_bytes = memory_mark(device)  # before the matmul below, which is no part of a step
    peak = matmul_peak(device)
    run = {"seconds": seconds, "peak_bytes": peak_bytes, "matmul_peak": peak}
    if first_round:
        run["flops"] = counter.get_total_flops()
        run["profile"] = profile = profiled(step, device)
        op_flops = counter.get_flop_counts()["Global"].items()
        matmuls = sum(count for op, count in op_flops if operator_kind(str(op)) == "matmul")
        profile["matmul_of_peak"] = matmuls / profile["matmul"] / peak
    return run


def operator_kind(name):
    """An operator by what it does, from its name (aten::mm, aten.mm -> matmul)."""
    name = name.removeprefix("aten::").removeprefix("aten.")
    if name in ("mm", "addmm", "bmm", "baddbmm"):
        return "matmul"
    if "scaled_dot_product" in name:
        return "attention"
    if name in ("uniform_", "bernoulli_"):  # drawing the dropout masks
        return "masks"
    return "other"


def profiled(function, device):
    """{operator_kind: seconds} of function() under torch.profiler (its default activities:
    the CPU's, and CUDA's where there is one): its operators' self time, CUDA's on the
    device."""
    with torch.profiler.profile() as profile:
        function()
        sync(device)
    seconds = dict.fromkeys(OPERATOR_KINDS, 0.0)
    cuda = device.type == "cuda"
    for event in profile.key_averages():
        own = event.self_device_time_total if cuda else event.self_cpu_time_total
        seconds[operator_kind(event.key)] += own / 1e6
    return seconds


def in_process(function, *args):
    """function(*args) in a fresh process (spawn: no CUDA state or memory carried over)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


# ------------------------------------------------------------------------- the sections

def steps_section(args, device, batches):
    """({classes: {method: figures}}, the processes' matmul peaks), every configuration in its
    own processes, taking turns."""
    configurations = list(itertools.product(args.classes, args.methods))
    runs = {configuration: [] for configuration in configurations}
    for turn in range(args.rounds):
        for classes, method in configurations:
            start = time.perf_counter()
            run = in_process(measure, method, classes, batches[classes], device, args.warmup,
                             args.steps, turn == 0)
            runs[classes, method].append(run)
            step = statistics.median(run["seconds"])
            print(f"  round {turn + 1}/{args.rounds}, {classes} classes, {method}: step "
                  f"{step:.2f} s, process {time.perf_counter() - start:.0f} s",
                  file=sys.stderr, flush=True)
    report = {}
    for (classes, method), method_runs in runs.items():
        figures = step_figures(method_runs, runs.get((classes, "peft")))
        report.setdefault(str(classes), {})[method] = dict(figures, batch=batches[classes])
    peaks = [run["matmul_peak"] for method_runs in runs.values() for run in method_runs]
    return report, summary(peaks)


def step_figures(runs, peft_runs):
    """The figures of one configuration from its runs (and peft's, or None), one a round."""
    seconds = summary([s for run in runs for s in run["seconds"]])
    flops, peak = runs[0]["flops"], max(run["peak_bytes"] for run in runs)
    # each round's FLOP/s over the matmul peak of its own process
    of_peak = [flops / statistics.median(run["seconds"]) / run["matmul_peak"] for run in runs]
    figures = {"seconds": seconds, "peak_bytes": peak, "flops": flops,
               "profile": runs[0]["profile"],
               "of_matmul_peak": summary(of_peak)}
    if peft_runs:
        # paired by round, so that the drift between rounds cancels
        ratios = [statistics.median(ours["seconds"]) / statistics.median(theirs["seconds"])
                  for ours, theirs in zip(runs, peft_runs)]
        figures["time_vs_peft"] = summary(ratios)
        figures["memory_vs_peft"] = peak / max(run["peak_bytes"] for run in peft_runs)
    return figures


def encode_text_full(model, tokens):
    """encode_text without truncation: all 77 context positions, as openai/CLIP computes."""
    x = model.token_embedding(tokens) + model.positional_embedding  # (n, 77, width)
    x = model.ln_final(model.transformer(x))
    ends = x[torch.arange(len(tokens), device=tokens.device), tokens.argmax(dim=-1)]  # (n, width)
    return ends @ model.text_projection


@torch.no_grad()
def text_encoding(model, texts, device):
    """{way: figures} of encoding `texts` in one call as length groups, as one truncation and
    at the full 77 positions; difference: the largest, relative to the full 77's features."""
    tokens = clip_model.tokenize(texts).to(device)
    ends = tokens.argmax(dim=-1)
    calls = {"length groups": functools.partial(model.encode_text, tokens),
             "one truncation": functools.partial(model.encode_text, tokens, group_cost=math.inf),
             "full 77": functools.partial(encode_text_full, model, tokens)}
    groups = clip_model.length_groups(ends, clip_model.GROUP_COST[device.type])
    positions = {"length groups": sum(len(rows) * (int(ends[rows].max()) + 1) for rows in groups),
                 "one truncation": len(texts) * (int(ends.max()) + 1), "full 77": tokens.numel()}
    with clip_model.autocast(device, "auto"):
        features = {way: call().float() for way, call in calls.items()}  # a warm-up
        slow = {"full 77": calls.pop("full 77")}  # timed once: minutes at 1,000 prompts
        seconds = timed(calls, device, TEXT_PASSES, max_seconds=TEXT_SECONDS)
        seconds.update(timed(slow, device, 1))
    full = features["full 77"]
    return {way: {"positions": positions[way], "seconds": summary(seconds[way]),
                  "difference": ((features[way] - full).abs().max() / full.abs().max()).item()}
            for way in features}


def saved_bytes(model, images, tokens, checkpoint, parts=("image", "text")):
    """{part: bytes} that a training forward of the image and of the text tower keeps for the
    backward pass, under bf16 autocast. Counted with saved_tensors_hooks: each storage once,
    the model's parameters and buffers left out (resident anyway), plus each text block's
    input (all that a checkpointed block keeps)."""
    weights = itertools.chain(model.parameters(), model.buffers())
    resident = {t.untyped_storage().data_ptr() for t in weights}
    counted = {}

    def count(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in resident:
            counted[storage.data_ptr()] = storage.nbytes()
        return tensor

    def count_input(_module, inputs):
        count(inputs[0])
    hooks = [block.register_forward_pre_hook(count_input) for block in model.transformer.resblocks]
    forwards = {"image": lambda: model.encode_image(images),
                "text": lambda: model.encode_text(tokens, checkpoint)}
    result = {}
    with torch.enable_grad(), clip_model.autocast(images.device, "bf16"):
        for part in parts:
            counted.clear()
            with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
                forwards[part]()  # its graph and saved tensors are freed as it returns
            result[part] = sum(counted.values())
    for hook in hooks:
        hook.remove()
    return result


def projected_peak(method):
    """CPU: the GPU peak of the ImageNet setting for `method`, from counted bytes:
      resident   float32 weights and buffers, and 3 x 4 bytes per trainable parameter (its
                 gradient and AdamW's two moments);
      saved      the bytes kept for backward at batch 32, image + text (saved_bytes), with
                 the text blocks that --text_checkpoint auto checkpoints in fp16;
      recompute  with checkpointed blocks, one text block's activations rebuilt in backward.
    bf16 autocast stands in for fp16 (the same operations cast, to the same 2 bytes; fp16
    matmuls are ~100x slower on CPU). CUDA autocast runs layer_norm in float32, CPU in its
    input's dtype: only ln_pre gets a half input, made float32 here. Not modelled: the
    backward pass's gradient buffers and the allocator's slack."""
    device = torch.device("cpu")
    tokens, images, _ = step_inputs(1000, IMAGENET_BATCH, device)
    model = our_model(method, device)
    model.visual.ln_pre.register_forward_pre_hook(lambda _module, inputs: (inputs[0].float(),))
    checkpoint = clip_model.text_checkpoint(DEFAULTS.text_checkpoint, model, tokens, "fp16")
    saved = saved_bytes(model, images, tokens, checkpoint)
    recompute = 0
    if checkpoint:
        unchecked = saved_bytes(model, images, tokens, 0, parts=("text",))["text"]
        recompute = unchecked / model.transformer.layers
    weights = itertools.chain(model.parameters(), model.buffers())
    resident = sum(t.numel() * t.element_size() for t in weights)
    trainable = comp_lora.trainable_count(model)
    projected = resident + 12 * trainable + saved["image"] + saved["text"] + recompute
    return {"checkpointed_blocks": checkpoint, "saved_bytes": saved,
            "projected_bytes": projected}


def comp_setup(device):
    """Seconds to add train.py's default Comp-LoRA adapters to a ViT-B/16 on `device`."""
    model = clip_model.build_random(**clip_model.VIT_B_16).to(device)
    names = clip_model.adapter_names(model)
    torch.linalg.svd(torch.eye(8, dtype=torch.float64, device=device))  # solver start-up
    sync(device)
    start = time.perf_counter()
    comp_lora.add_adapters(model, comp_lora.CompLoRALinear, names=names, r=DEFAULTS.r,
                           alpha=DEFAULTS.alpha, dropout=DEFAULTS.dropout_rate,
                           comp_ratio=DEFAULTS.comp_ratio)
    sync(device)
    return {"projections": len(names), "seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------- the tables

def table(title, header, rows):
    """Prints a title line, then the rows under the header, the first column left-aligned."""
    rows = [header] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print(f"\n{title}")
    for row in rows:
        cells = [cell.rjust(width) for cell, width in zip(row, widths)]
        cells[0] = row[0].ljust(widths[0])
        print("  ".join(cells))


def seconds_text(s):
    return f"{s['median']:.2f}", f"{s['min']:.2f}-{s['max']:.2f}"


def ratio_text(figures):
    if figures is None:
        return "-"
    return f"{figures['median']:.2f} ({figures['min']:.2f}-{figures['max']:.2f})"


def print_steps(report):
    rows = []
    for classes, methods in report["steps"].items():
        for method, f in methods.items():
            memory_ratio = f"{f['memory_vs_peft']:.2f}" if "memory_vs_peft" in f else "-"
            rows.append([method, classes, f["batch"], *seconds_text(f["seconds"]),
                         ratio_text(f.get("time_vs_peft")), f"{f['peak_bytes'] / GIB:.2f}",
                         memory_ratio, f"{f['flops'] / 1e9:.0f}", ratio_text(f["of_matmul_peak"])])
    header = ["method", "classes", "batch", "median s", "min-max s", "vs peft", "peak GiB",
              "vs peft", "GFLOP", "of peak"]
    low, high = (report["matmul_peak"][key] / 1e9 for key in ("min", "max"))
    table(f"training step; vs peft: median (min-max) of the rounds' ratios; peak: "
          f"{report['memory']}; of peak: of the matmul peak (bench.matmul_peak) in the same "
          f"process, {low:.0f}-{high:.0f} GFLOP/s, median (min-max) of the rounds", header, rows)


def print_profile(report):
    rows = []
    for classes, methods in report["steps"].items():
        for method, f in methods.items():
            profile = f["profile"]
            total = sum(profile[kind] for kind in OPERATOR_KINDS)
            shares = [f"{profile[kind] / total:.1%}" for kind in OPERATOR_KINDS]
            rows.append([method, classes, shares[0], f"{profile['matmul_of_peak']:.2f}",
                         *shares[1:]])
    header = ["method", "classes", "matmul", "of peak", "attention", "masks", "other"]
    table("where a step's time goes: its operators' self time in one more step of round 1 "
          "(torch.profiler), by bench.operator_kind; of peak: the matmuls' FLOP/s, of that "
          "process's matmul peak", header, rows)


def print_text(report):
    rows = []
    for prompts, ways in report["text"].items():
        for way, f in ways.items():
            rows.append([prompts, way, f"{f['positions']:,}", *seconds_text(f["seconds"]),
                         f["seconds"]["n"], f"{f['difference']:.1e}"])
    header = ["prompts", "computed as", "positions", "median s", "min-max s", "passes",
              "difference"]
    table("text encoding, no grad, one call; difference: the largest, relative to the full "
          "77's", header, rows)


def print_imagenet(report, cuda):
    rows = []
    for method, f in report["imagenet"].items():
        if cuda:
            rows.append([method, *seconds_text(f["seconds"]), f"{f['peak_bytes'] / GIB:.2f}"])
        else:
            saved = f["saved_bytes"]
            rows.append([method, f["checkpointed_blocks"], f"{saved['image'] / GIB:.2f}",
                         f"{saved['text'] / GIB:.2f}", f"{f['projected_bytes'] / GIB:.2f}"])
    header = ["method", "median s", "min-max s", "peak GiB"]
    title = f"ImageNet 16-shot setting: batch {IMAGENET_BATCH}, 1,000 prompts, fp16 autocast"
    if not cuda:
        header = ["method", "text blocks ckpt", "saved GiB image", "saved GiB text",
                  "projected GiB"]
        title += "; the GPU's peak projected (bench.projected_peak)"
    table(title, header, rows)


# ---------------------------------------------------------------------------------- run

def parse_args(argv=None):
    p = results.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=["steps"])
    p.add_argument("--classes", nargs="+", type=int, default=[10, 100, 1000],
                   help="prompts per step (default 10 100 1000)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--batch", type=int, help="images per step (CUDA 32; CPU 8, 4 at 1,000+)")
    p.add_argument("--rounds", type=int, default=3, help="turns of every configuration")
    p.add_argument("--steps", type=int, help="timed steps per process (CUDA 10, CPU 2)")
    p.add_argument("--warmup", type=int, help="untimed steps per process first (CUDA 3, CPU 2)")
    p.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    return p.parse_args(argv)


def check_args(args):
    """Every flag, before any work; fills in the device's defaults, returns the device."""
    device = clip_model.device(args.device)
    if device.type == "mps":  # its timing and memory would need calls of their own
        raise UserError(f"--device {args.device}: bench.py measures cpu or cuda")
    counts = [("batch", args.batch), ("rounds", args.rounds), ("steps", args.steps),
              ("warmup", args.warmup)] + [("classes", n) for n in args.classes]
    for flag, value in counts:
        if value is not None and value < 1:
            raise UserError(f"--{flag} {value}: expected an integer >= 1")
    if args.json:
        results.check_writable(args.json, "--json")
    cuda = device.type == "cuda"
    args.steps = args.steps or (10 if cuda else 2)
    args.warmup = args.warmup or (3 if cuda else 2)
    args.classes = list(dict.fromkeys(args.classes))  # in the order given, once each
    args.methods = list(dict.fromkeys(args.methods))
    return device


def default_batch(classes, device):
    if device.type == "cuda":
        return IMAGENET_BATCH
    return 4 if classes >= 1000 else 8  # CPU, 2 cores: ~15 s a step at 1,000 classes, batch 4


def run(args):
    device = check_args(args)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    report = {"device": str(device), "device_name": name, "torch": torch.__version__,
              "model": "ViT-B/16, random weights", "rounds": args.rounds,
              "timed_steps": args.steps, "warmup_steps": args.warmup,
              "memory": "max_memory_allocated" if cuda else "ru_maxrss of its process"}
    print(f"{name}, torch {torch.__version__}; {report['model']}", flush=True)
    installed = all(importlib.util.find_spec(package) for package in ("peft", "transformers"))
    if "peft" in args.methods and not installed:
        args.methods.remove("peft")
        print(PEFT_HINT)

    if "steps" in args.sections:
        batches = {n: args.batch or default_batch(n, device) for n in args.classes}
        report["steps"], report["matmul_peak"] = steps_section(args, device, batches)
        print_steps(report)
        print_profile(report)
    if "text" in args.sections:
        model = clip_model.build_random(**clip_model.VIT_B_16).to(device)
        report["text"] = {f"{n:,}": text_encoding(model, class_prompts(n), device)
                          for n in (10, 1000)}
        del model
        print_text(report)
    if "imagenet" in args.sections:
        report["imagenet"] = {}
        for method in [method for method in args.methods if method != "peft"]:
            if cuda:  # a process each, one at a time
                figures = in_process(measure, method, 1000, IMAGENET_BATCH, device, args.warmup,
                                     args.steps, False)
                figures["seconds"] = summary(figures["seconds"])
            else:
                figures = in_process(projected_peak, method)
            report["imagenet"][method] = figures
        print_imagenet(report, cuda)
    if "comp_setup" in args.sections:
        report["comp_setup"] = setup = comp_setup(device)
        table(f"Comp-LoRA set-up on {name}", ["projections", "seconds"],
              [[setup["projections"], f"{setup['seconds']:.1f}"]])
    if args.json:
        results.save(args.json, lambda f: f.write(json.dumps(report, indent=2).encode()))
        print(f"wrote {args.json}")


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (UserError, clip_model.LoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # --json is written at the end only: nothing half-written
        print("interrupted; nothing written", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
