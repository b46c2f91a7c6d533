"""Speed and memory of each adapter method on a randomly initialised CLIP ViT-B/16 (no download).

    python bench.py                                   # CUDA when available, else CPU with smaller defaults
    python bench.py --methods none lora --json bench.json
    python bench.py --sections imagenet               # the 1,000-class ImageNet scale (CPU here: ~30 min)
    python bench.py --sections comp_setup             # Comp-LoRA's set-up: one float64 SVD per projection
    python bench.py --sections peft                   # ImageNet scale against peft + transformers (~6 min)

Methods: `none` (frozen CLIP, nothing to train) and the `lora`, `comp` and `block` adapters with train.py's
defaults (r=2, alpha=1, dropout 0.25 on q, k, v of every block of both encoders). For each: one training step
(median and range over --steps after --warmup), its peak memory, its FLOP/s as a fraction of a matmul peak
measured in the same run, the trainable parameters, and inference images/s with the adapters unmerged and
merged next to the plain model. Then the no-grad text encoding of 10 CoOp prompts and of 1,000 prompts with
ImageNet's token lengths: length groups (`CLIP.encode_text`), one truncation to the longest prompt, and the
full 77 positions.

--sections imagenet: a training step with ImageNet's 1,000 prompts for each method, the text tower run as one
truncation, as length groups, and as length groups with activation checkpointing: step time, peak memory,
the bytes kept for the backward pass (counted with saved_tensors_hooks), and the GPU memory of CLIP-LoRA's
ImageNet 16-shot setting (batch 32, fp16 autocast) projected from those counts. On CUDA, whose default batch
is that setting's, the step time and torch.cuda.max_memory_allocated are measured next to the projection.
--sections comp_setup: the seconds that wrapping ViT-B/16's 72 q, k, v projections (36 of 768 x 768, 36 of
512 x 512) with Comp-LoRA takes on --device, paid by every run and every --eval_only (comp_lora._complement_bases).
--sections peft: the same step, our lora with the default flags (`--text_checkpoint auto`, the blocks of
`clip_model.text_checkpoint_blocks`), with no and with every text block checkpointed, and peft's LoRA on
transformers' CLIPModel (when both are installed), the four taking turns each round; peak memory of each in a
process of its own.
Prints tables; --json FILE also writes the figures.
"""
import argparse
import copy
import itertools
import json
import math
import multiprocessing
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import clip_model
import comp_lora
import train

VIT_B_16 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
                context_length=77, vocab_size=49408, transformer_width=512, transformer_layers=12)
METHODS = ("none", "lora", "comp", "block")
ADAPTER = dict(r=2, alpha=1, dropout=0.25, blocks=8, comp_ratio=0.5)  # train.py's defaults
# Class names from the CoOp datasets: "a photo of a {name}." is 8 to 15 tokens with these, as is typical.
CLASS_NAMES = ["tench", "great white shark", "German Shepherd Dog", "espresso machine", "Abyssinian", "apple pie",
               "hot and sour soup", "bishop of llandaff", "Annual Crop Land", "honeycombed", "Boeing 737-800",
               "Apply Eye Makeup", "indoor general store", "sea horse", "school bus", "red wine", "dalmatian",
               "Greater Swiss Mountain Dog", "Staffordshire Bull Terrier", "chicken quesadilla", "globe thistle",
               "love in the mist", "Cessna 172", "2012 Tesla Model S Sedan", "1991 Volkswagen Golf Hatchback",
               "striped", "Herbaceous Vegetation Land", "Industrial Buildings", "Playing Cello",
               "outdoor athletic field"]
# Token positions (start and end tokens included) of CLIP-LoRA's 1,000 ImageNet prompts "a photo of a {class}.":
# `imagenet_classes` of MaxZanella/CLIP-LoRA datasets/imagenet.py (commit 358f0d7) through our tokenizer,
# as {positions: prompts}. Only the lengths matter for cost, so the bench rebuilds prompts of these lengths.
IMAGENET_LENGTHS = {8: 246, 9: 508, 10: 155, 11: 49, 12: 24, 13: 9, 14: 7, 15: 1, 18: 1}
TEXT_SECONDS = 20  # time box per prompt set for the grouped and truncated encodings (full 77: one pass)
# How the imagenet section runs the text tower: `encode_text` arguments
TEXT_VARIANTS = {"truncated": dict(group_cost=math.inf, checkpoint=False),  # one group: the code before groups
                 "groups": dict(group_cost=None, checkpoint=False),
                 "groups+ckpt": dict(group_cost=None, checkpoint=True)}
IMAGENET_BATCH = 32  # CLIP-LoRA's batch size, the GPU setting the projection is for
# FlopCounterMode has formulas for the CUDA attention kernels but not for the CPU one that
# scaled_dot_product_attention runs here; give it the same dense formulas (an upper bound for the causal
# text attention, a small share of the step).
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(functions, device, rounds, warmup, max_seconds=float("inf")):
    """{name: seconds of each call}; the functions take turns each round, so drift affects them alike."""
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


def summary(seconds):
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds), "n": len(seconds)}


def prompts(n):
    return [f"a photo of a {CLASS_NAMES[i % len(CLASS_NAMES)]}." for i in range(n)]


def imagenet_prompts():
    """1,000 prompts with the token lengths of ImageNet's (IMAGENET_LENGTHS), in a fixed random order."""
    lengths = [length for length, count in IMAGENET_LENGTHS.items() for _ in range(count)]
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    # "a photo of a x." takes 8 positions with the start and end tokens; each further " x" one more
    return ["a photo of a" + " x" * (lengths[i] - 7) + "." for i in order]


def matmul_peak(device):
    """(FLOP/s, label) of a square matmul in the step's matmul dtype: fp16 on CUDA (autocast), fp32 on CPU."""
    n, dtype = (8192, torch.float16) if device.type == "cuda" else (2048, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    seconds = statistics.median(timed({"mm": lambda: a @ b}, device, rounds=10, warmup=2)["mm"])
    return 2 * n ** 3 / seconds, f"{n}x{n} {str(dtype).removeprefix('torch.')} matmul"


def build(method, device):
    """The ViT-B/16 of `method` in training mode, every parameter frozen but the adapters' lora_ tensors."""
    model = clip_model.build_random(**VIT_B_16)
    if method != "none":
        train.add_adapters(model, dict(ADAPTER, method=method, encoder="both", position="all", params=["q", "k", "v"]))
    else:
        model.requires_grad_(False)
        # Nothing trains, so the step back-propagates the same loss to the outputs of the patch and token
        # embeddings: the activation gradients through every block of both encoders that an adapter step
        # also computes, without the adapters. Cheaper than gradients for the images (a conv backward) or the
        # token-embedding weight (a dense 49,408 x 512 gradient). It does a little more than an adapter step:
        # the input gradients of block 0's q/k/v and of ln_pre, about 1% of the step.
        for module in (model.visual.conv1, model.token_embedding):
            module.register_forward_hook(lambda _module, _inputs, output: output.requires_grad_())
    return model.to(device).train()


def training_step(model, images, tokens, labels, device, group_cost=None, checkpoint=False):
    """One step as train.py: both encoders (text re-encoded), cross-entropy of 100 x cosine, backward, AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=1e-2) if params else None
    precision = train.resolve_precision("auto", device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step():
        with train.autocast(device, precision):
            image = F.normalize(model.encode_image(images).float(), dim=-1)
            text = F.normalize(model.encode_text(tokens, checkpoint, group_cost).float(), dim=-1)
        scaler.scale(F.cross_entropy(train.LOGIT_SCALE * image @ text.t(), labels)).backward()
        if optimizer:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
    return step


def memory_mark(device):
    """Bytes toward the peak: CUDA's peak allocated tensors, or the CPU process's resident high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def measure_method(method, device, batch, classes, steps, warmup):
    """All figures of one method. Runs in a process of its own, so the CPU high-water mark is its alone."""
    torch.manual_seed(0)
    images = torch.randn(batch, 3, 224, 224, device=device)
    labels = torch.randint(classes, (batch,), device=device)
    tokens = clip_model.tokenize(prompts(classes)).to(device)
    model = build(method, device)
    step = training_step(model, images, tokens, labels, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = memory_mark(device)  # the model and inputs (CPU: the setup's high-water mark, about the same)
    seconds = timed({"step": step}, device, steps, warmup)["step"]
    peak = memory_mark(device)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        step()
    result = {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "step_seconds": summary(seconds), "peak_memory_bytes": peak, "step_memory_bytes": peak - before,
              "step_flops": counter.get_total_flops()}

    # Inference: the plain model against the adapted one unmerged and merged (a merged copy, so the three
    # take turns in each round and share the machine's drift).
    variants = {"plain": clip_model.build_random(**VIT_B_16).to(device).eval()}
    if method != "none":
        variants["unmerged"] = model.eval()
        variants["merged"] = copy.deepcopy(model)
        for layer in [layer for layer in variants["merged"].modules() if hasattr(layer, "merge")]:
            layer.merge()
    with torch.no_grad(), train.autocast(device, "auto"):
        seconds = timed({name: (lambda m=m: m.encode_image(images)) for name, m in variants.items()},
                        device, steps, warmup)
    result["inference_images_per_second"] = {name: batch / statistics.median(s) for name, s in seconds.items()}
    result["inference_seconds"] = {name: summary(s) for name, s in seconds.items()}
    # speed relative to the plain model, paired by round so that drift between rounds cancels
    result["inference_speed_vs_plain"] = {name: summary([p / t for p, t in zip(seconds["plain"], s)])
                                          for name, s in seconds.items() if name != "plain"}
    return result


def encode_text_full(model, tokens):
    """encode_text without the truncation: all 77 context positions computed, as openai/CLIP does."""
    x = model.token_embedding(tokens) + model.positional_embedding  # (n, 77, width)
    x = model.ln_final(model.transformer(x))
    return x[torch.arange(len(tokens), device=tokens.device), tokens.argmax(dim=-1)] @ model.text_projection


@torch.no_grad()
def text_encoding(model, texts, device, rounds):
    """Seconds to encode `texts` in one call (as train.py does) three ways, and their largest differences
    relative to the full 77 positions."""
    tokens = clip_model.tokenize(texts).to(device)
    encoders = {"groups": model.encode_text, "truncated": lambda t: model.encode_text(t, group_cost=math.inf),
                "full": lambda t: encode_text_full(model, t)}
    with train.autocast(device, "auto"):
        features = {name: encode(tokens).float() for name, encode in encoders.items()}  # also the warm-up
        seconds = timed({name: (lambda e=encoders[name]: e(tokens)) for name in ("groups", "truncated")},
                        device, max(rounds, 5), warmup=0, max_seconds=TEXT_SECONDS)
        seconds.update(timed({"full": lambda: encoders["full"](tokens)}, device, rounds=1, warmup=0))
    ends = tokens.argmax(dim=-1)
    groups = clip_model.length_groups(ends, clip_model.GROUP_COST[device.type])
    return {"prompts": len(texts), "group_count": len(groups), "truncated_length": int(ends.max()) + 1,
            "positions": {"groups": sum(len(rows) * (int(ends[rows].max()) + 1) for rows in groups),
                          "truncated": len(texts) * (int(ends.max()) + 1), "full": len(texts) * tokens.shape[1]},
            "relative_difference": {name: ((features[name] - features["full"]).abs().max()
                                           / features["full"].abs().max()).item() for name in ("groups", "truncated")},
            **{name: summary(s) for name, s in seconds.items()},
            # paired by round, so that drift between rounds cancels
            "groups_speedup_vs_truncated": summary([t / g for g, t in zip(seconds["groups"], seconds["truncated"])]),
            "truncated_speedup_vs_full": statistics.median(seconds["full"]) / statistics.median(seconds["truncated"])}


# ------------------------------------------------------------------------------------------ ImageNet scale

def saved_bytes(model, images, tokens, precision, group_cost=None, checkpoint=False, parts=("image", "text")):
    """{part: bytes} that a training forward of the image and of the text tower keeps for the backward pass.

    Counted with saved_tensors_hooks: each distinct storage once, the model's own parameters and buffers
    excluded (they are resident anyway), plus each text block's input (all a checkpointed block keeps).
    Forward only: nothing is back-propagated.
    """
    device = images.device
    resident = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    counted = {}

    def count(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in resident:
            counted[storage.data_ptr()] = storage.nbytes()
        return tensor

    def count_input(module, inputs):
        count(inputs[0])
    hooks = [block.register_forward_pre_hook(count_input) for block in model.transformer.resblocks]
    forwards = {"image": lambda: model.encode_image(images),
                "text": lambda: model.encode_text(tokens, checkpoint, group_cost)}
    result = {}
    with torch.enable_grad(), train.autocast(device, precision):
        for part in parts:
            counted.clear()
            with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
                output = forwards[part]()
            result[part] = sum(counted.values())
            del output  # frees its graph and the saved tensors before the next part
    for hook in hooks:
        hook.remove()
    return result


def gpu_setting_saved_bytes(model, tokens, device, variant, parts):
    """saved_bytes of the GPU setting (IMAGENET_BATCH images, fp16 autocast as CUDA runs it).

    On CPU, autocast to bf16 stands in for fp16: CPU autocast casts the same operations to either (same 2
    bytes), and CPU fp16 matmuls are ~100x slower here. One difference is emulated: CUDA autocast runs
    layer_norm in float32, CPU in its input's dtype; only ln_pre gets an fp16 input (the patch embedding).
    """
    images = torch.randn(IMAGENET_BATCH, 3, 224, 224, device=device)
    if device.type == "cuda":
        return saved_bytes(model, images, tokens, "fp16", parts=parts, **TEXT_VARIANTS[variant])
    hook = model.visual.ln_pre.register_forward_pre_hook(lambda module, inputs: (inputs[0].float(),))
    try:
        return saved_bytes(model, images, tokens, "bf16", parts=parts, **TEXT_VARIANTS[variant])
    finally:
        hook.remove()


def imagenet_inputs(batch, device):
    """(images, tokens of ImageNet's 1,000 prompts, labels) of one training step."""
    torch.manual_seed(0)
    tokens = clip_model.tokenize(imagenet_prompts()).to(device)
    images = torch.randn(batch, 3, 224, 224, device=device)
    return images, tokens, torch.randint(len(tokens), (batch,), device=device)


def time_imagenet(method, device, batch, steps, warmup):
    """{variant: step seconds} for each way of running the text tower (TEXT_VARIANTS) with ImageNet's prompts.
    One model, the variants taking turns each round so that the machine's drift affects them alike."""
    images, tokens, labels = imagenet_inputs(batch, device)
    model = build(method, device)
    seconds = timed({variant: training_step(model, images, tokens, labels, device, **options)
                     for variant, options in TEXT_VARIANTS.items()}, device, steps, warmup)
    # speed relative to one truncation, paired by round
    return {variant: {"step_seconds": summary(s), "vs_truncated": summary([a / b for a, b in
                                                                           zip(s, seconds["truncated"])])}
            for variant, s in seconds.items()}


def measure_imagenet(method, variant, device, batch, warmup, image_part):
    """Memory of one method and text variant with ImageNet's prompts, in a process of its own (see
    measure_method): the peak over max(warmup, 1) steps, and the bytes saved for backward in this run and in
    the GPU setting (its image part only if image_part: it does not depend on the variant)."""
    images, tokens, labels = imagenet_inputs(batch, device)
    model = build(method, device)
    step = training_step(model, images, tokens, labels, device, **TEXT_VARIANTS[variant])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = memory_mark(device)
    for _ in range(max(warmup, 1)):
        step()
    sync(device)
    peak = memory_mark(device)
    saved = saved_bytes(model, images, tokens, train.resolve_precision("auto", device), **TEXT_VARIANTS[variant])
    parts = ("image", "text") if image_part else ("text",)
    gpu = saved if device.type == "cuda" and batch == IMAGENET_BATCH else \
        gpu_setting_saved_bytes(model, tokens, device, variant, parts)
    return {"peak_memory_bytes": peak, "step_memory_bytes": peak - before,
            "saved_bytes": saved, "gpu_setting_saved_bytes": {part: gpu[part] for part in parts},
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "resident_bytes": sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(),
                                                                                        model.buffers()))}


# --sections peft: our training step with the default flags (`--text_checkpoint auto`: the blocks of
# clip_model.text_checkpoint_blocks), with no and with every text block checkpointed, against peft on Hugging
# Face's CLIPModel. peft and transformers are optional, for this section only.
PEFT_HINT = "peft rows skipped: pip install peft transformers (for bench.py only)"


def peft_model(device):
    """transformers' CLIPModel with VIT_B_16's sizes (random weights, QuickGELU as CLIP), LoRA by peft on q, k
    and v of both towers with our r, alpha and dropout (peft scales by alpha / r: no effect on cost), in
    training mode; None when peft or transformers is not installed."""
    try:
        from peft import LoraConfig, get_peft_model
        from transformers import CLIPConfig, CLIPModel
    except ImportError:
        return None
    c = VIT_B_16
    config = CLIPConfig(projection_dim=c["embed_dim"], text_config=dict(
        hidden_size=c["transformer_width"], intermediate_size=4 * c["transformer_width"], hidden_act="quick_gelu",
        num_attention_heads=c["transformer_width"] // 64, num_hidden_layers=c["transformer_layers"],
        max_position_embeddings=c["context_length"], vocab_size=c["vocab_size"]), vision_config=dict(
        hidden_size=c["vision_width"], intermediate_size=4 * c["vision_width"], hidden_act="quick_gelu",
        num_attention_heads=c["vision_width"] // 64, num_hidden_layers=c["vision_layers"],
        image_size=c["image_resolution"], patch_size=c["vision_patch_size"]))
    lora = LoraConfig(r=ADAPTER["r"], lora_alpha=ADAPTER["alpha"], lora_dropout=ADAPTER["dropout"],
                      target_modules=["q_proj", "k_proj", "v_proj"])
    return get_peft_model(CLIPModel(config), lora).to(device).train()


def peft_training_step(model, images, tokens, labels, device):
    """training_step for the peft model: the prompts cut to the longest one with its attention mask, as
    CLIPProcessor(padding=True) gives them; the same loss, AdamW and precision."""
    length = int(tokens.argmax(dim=-1).max()) + 1
    ids = tokens[:, :length]
    mask = (torch.arange(length, device=device) <= tokens.argmax(dim=-1, keepdim=True)).long()  # (n, length)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=1e-2)
    precision = train.resolve_precision("auto", device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step():
        with train.autocast(device, precision):
            out = model(input_ids=ids, attention_mask=mask, pixel_values=images)
            image, text = (F.normalize(f.float(), dim=-1) for f in (out.image_embeds, out.text_embeds))
        scaler.scale(F.cross_entropy(train.LOGIT_SCALE * image @ text.t(), labels)).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return step


def peft_variants(model, tokens, device):
    """{name: checkpoint argument of encode_text}: the default (train.py's --text_checkpoint auto), none, all."""
    element_size = 4 if train.resolve_precision("auto", device) == "fp32" else 2
    return {"default": clip_model.text_checkpoint_blocks(model, tokens, element_size), "no ckpt": 0,
            "all ckpt": True}


def time_vs_peft(device, batch, steps, warmup):
    """Step seconds of our lora variants and of peft, taking turns each round (so that the machine's load
    affects them alike), and each one's time relative to peft's in the same round."""
    images, tokens, labels = imagenet_inputs(batch, device)
    model = build("lora", device)
    variants = peft_variants(model, tokens, device)
    functions = {name: training_step(model, images, tokens, labels, device, checkpoint=k)
                 for name, k in variants.items()}
    other = peft_model(device)
    if other is not None:
        functions["peft"] = peft_training_step(other, images, tokens, labels, device)
    seconds = timed(functions, device, steps, warmup)
    result = {name: {"step_seconds": summary(s), "checkpointed_blocks": variants.get(name)}
              for name, s in seconds.items()}
    if other is not None:
        for name, s in seconds.items():
            result[name]["time_vs_peft"] = summary([a / b for a, b in zip(s, seconds["peft"])])
    return result


def measure_vs_peft(name, device, batch, warmup):
    """Peak memory of one time_vs_peft variant over max(warmup, 1) steps, in a process of its own."""
    images, tokens, labels = imagenet_inputs(batch, device)
    if name == "peft":
        step = peft_training_step(peft_model(device), images, tokens, labels, device)
    else:
        model = build("lora", device)
        step = training_step(model, images, tokens, labels, device, checkpoint=peft_variants(model, tokens, device)[name])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(max(warmup, 1)):
        step()
    sync(device)
    return memory_mark(device)


def print_vs_peft(report):
    r, gb = report["peft"], 2 ** 30
    print(f"\nImageNet scale against peft: {sum(IMAGENET_LENGTHS.values()):,} prompts, batch {report['batch']}, "
          f"{report['device_name']}; step: median (min-max) of rounds taking turns, vs peft: median of the "
          f"rounds' ratios; peak: {report['memory']}")
    print(f"{'step':<44}{'median s':>9}{'min-max s':>14}{'vs peft':>8}{'peak GiB':>9}{'vs peft':>8}")
    for name, v in r.items():
        s = v["step_seconds"]
        label = ("peft + transformers CLIPModel" if name == "peft" else
                 f"ours lora, {name} ({v['checkpointed_blocks']} text blocks ckpt)".replace("True", "all"))
        ratio = f"{v['time_vs_peft']['median']:>8.3f}" if "time_vs_peft" in v else f"{'-':>8}"
        memory = f"{v['peak_memory_bytes'] / r['peft']['peak_memory_bytes']:>8.3f}" if "peft" in r else f"{'-':>8}"
        print(f"{label:<44}{s['median']:>9.2f}{s['min']:>8.2f}-{s['max']:<5.2f}{ratio}"
              f"{v['peak_memory_bytes'] / gb:>9.2f}{memory}")
    if "peft" not in r:
        print(PEFT_HINT)


def projected_peak(result, saved, recompute):
    """Projected peak memory of a training step from counted bytes.

    peak = resident + saved + recompute, where
      resident  = every parameter and buffer in float32 (autocast keeps float32 weights)
                  + 3 x 4 bytes per trainable parameter (its gradient and AdamW's two moments);
      saved     = the bytes kept for the backward pass (saved_bytes, image + text);
      recompute = with checkpointing, the text blocks' activations rebuilt during the backward pass: at most
                  one block's worth for all prompts, the text saved without checkpointing / layers.
    Not modelled: the backward pass's gradient buffers (a few activations' size) and allocator slack.
    """
    return result["resident_bytes"] + 12 * result["trainable_params"] + saved["image"] + saved["text"] + recompute


def add_projections(results, layers):
    """Adds projected peaks to `results` ({method: {variant: figures}}), for this run and the GPU setting."""
    for variants in results.values():
        image_gpu = next(r["gpu_setting_saved_bytes"]["image"] for r in variants.values()
                         if "image" in r["gpu_setting_saved_bytes"])
        for variant, r in variants.items():
            plain = variants.get("groups", r)  # the same grouping without checkpointing
            checkpointed = TEXT_VARIANTS[variant]["checkpoint"]
            r["projected_peak_bytes"] = projected_peak(
                r, r["saved_bytes"], plain["saved_bytes"]["text"] / layers if checkpointed else 0)
            gpu = {"image": image_gpu, "text": r["gpu_setting_saved_bytes"]["text"]}
            r["gpu_setting_projected_peak_bytes"] = projected_peak(
                r, gpu, plain["gpu_setting_saved_bytes"]["text"] / layers if checkpointed else 0)


def comp_setup(device):
    """Seconds to add train.py's default Comp-LoRA adapters to a ViT-B/16 already on `device`."""
    model = clip_model.build_random(**VIT_B_16).to(device)
    names = clip_model.adapter_names(model)
    torch.linalg.svd(torch.eye(8, dtype=torch.float64, device=device))  # solver start-up (cuSOLVER) not counted
    sync(device)
    start = time.perf_counter()
    comp_lora.add_adapters(model, comp_lora.CompLoRALinear, names=names, r=ADAPTER["r"], alpha=ADAPTER["alpha"],
                           dropout=ADAPTER["dropout"], comp_ratio=ADAPTER["comp_ratio"])
    sync(device)
    return {"projections": len(names), "seconds": time.perf_counter() - start}


def print_imagenet(report):
    mb, gb = 2 ** 20, 2 ** 30
    r0 = report["imagenet"]
    print(f"\nImageNet scale: {sum(IMAGENET_LENGTHS.values()):,} prompts with the token lengths of ImageNet's, "
          f"batch {report['batch']}, {report['device_name']}; vs trunc.: median of paired rounds; peak: "
          f"{report['memory']}")
    print(f"{'method':<7}{'text':<13}{'median s':>9}{'min-max s':>14}{'vs trunc.':>10}{'peak MiB':>9}"
          f"{'saved MiB img+text':>19}{'projected MiB':>14}")
    for method, variants in r0.items():
        for variant, r in variants.items():
            s = r["step_seconds"]
            print(f"{method:<7}{variant:<13}{s['median']:>9.2f}{s['min']:>8.2f}-{s['max']:<5.2f}"
                  f"{r['vs_truncated']['median']:>10.3f}{r['peak_memory_bytes'] / mb:>9.0f}"
                  f"{r['saved_bytes']['image'] / mb:>10.0f}+{r['saved_bytes']['text'] / mb:<8.0f}"
                  f"{r['projected_peak_bytes'] / mb:>14.0f}")
    print(f"\nprojected GPU memory, ImageNet 16-shot setting (batch {IMAGENET_BATCH}, 1,000 classes, fp16 "
          "autocast): resident + saved + recompute (bench.projected_peak)")
    print(f"{'method':<7}{'text':<13}{'saved GiB image':>17}{'saved GiB text':>15}{'projected GiB':>14}")
    for method, variants in r0.items():
        image = next(r["gpu_setting_saved_bytes"]["image"] for r in variants.values()
                     if "image" in r["gpu_setting_saved_bytes"])
        for variant, r in variants.items():
            print(f"{method:<7}{variant:<13}{image / gb:>17.2f}{r['gpu_setting_saved_bytes']['text'] / gb:>15.2f}"
                  f"{r['gpu_setting_projected_peak_bytes'] / gb:>14.2f}")


def print_report(report):
    methods, mb = report["methods"], 2 ** 20
    none = methods.get("none", {}).get("step_seconds", {}).get("median")
    print(f"\ntraining step (FLOPs: FlopCounterMode on one step; peak: {report['memory']})")
    print(f"{'method':<7}{'trainable':>10}{'median s':>10}{'min-max s':>14}{'vs none':>9}{'peak MB':>9}"
          f"{'+step MB':>10}{'GFLOP':>8}{'GFLOP/s':>9}{'of peak':>9}")
    for name, r in methods.items():
        s = r["step_seconds"]
        print(f"{name:<7}{r['trainable_params']:>10,}{s['median']:>10.3f}{s['min']:>8.3f}-{s['max']:<5.3f}"
              f"{s['median'] / none if none else float('nan'):>9.3f}{r['peak_memory_bytes'] / mb:>9.0f}"
              f"{r['step_memory_bytes'] / mb:>10.0f}{r['step_flops'] / 1e9:>8.1f}{r['flops_per_second'] / 1e9:>9.1f}"
              f"{r['fraction_of_matmul_peak']:>9.0%}")
    print(f"\ninference, images/s (batch {report['batch']}, no grad); speed vs plain: median (min-max) of rounds")
    print(f"{'method':<7}{'plain':>8}{'unmerged':>10}{'merged':>8}{'unmerged/plain':>22}{'merged/plain':>22}")
    for name, r in methods.items():
        ips, vs = r["inference_images_per_second"], r["inference_speed_vs_plain"]
        line = f"{name:<7}{ips['plain']:>8.2f}"
        if vs:
            line += f"{ips['unmerged']:>10.2f}{ips['merged']:>8.2f}" + "".join(
                f"{vs[v]['median']:>9.3f} ({vs[v]['min']:.3f}-{vs[v]['max']:.3f})" for v in ("unmerged", "merged"))
        print(line)


def print_text_encoding(report):
    print("\ntext encoding, no grad, all prompts in one call: median s [timed passes]; groups vs truncated: "
          "median (min-max) of paired passes; difference: largest, relative to the full 77 positions")
    for name, r in report["text_encoding"].items():
        g, t, f, vs = r["groups"], r["truncated"], r["full"], r["groups_speedup_vs_truncated"]
        positions = ", ".join(f"{k} {v:,}" for k, v in r["positions"].items())
        print(f"{name} (positions computed: {positions}):")
        print(f"  {r['group_count']} length group(s) {g['median']:.3f} s [{g['n']}], one truncation to "
              f"{r['truncated_length']} {t['median']:.3f} s [{t['n']}], full 77 {f['median']:.3f} s "
              f"[{f['n']}]; groups {vs['median']:.2f}x ({vs['min']:.2f}-{vs['max']:.2f}) faster than truncation, "
              f"truncation {r['truncated_speedup_vs_full']:.1f}x faster than full; difference groups "
              f"{r['relative_difference']['groups']:.1e}, truncated {r['relative_difference']['truncated']:.1e}")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        sys.exit(f"{self.prog}: error: {message}")


def integer_at_least(minimum):
    def parse(text):
        if not text.strip().lstrip("-").isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return int(text)
    return parse


def parse_device(text):
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    count = torch.cuda.device_count()
    if device.type == "cuda" and (device.index or 0) >= count:
        raise argparse.ArgumentTypeError(f"{text}: no such device ({count} CUDA devices)" if count else
                                         f"{text}: CUDA is not available")
    return device


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", type=parse_device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=integer_at_least(1), help="images per training step (CUDA 32, CPU 4)")
    p.add_argument("--classes", type=integer_at_least(1), default=10, help="class prompts per training step")
    p.add_argument("--steps", type=integer_at_least(1),
                   help="timed steps after warm-up (CUDA 10, CPU 5; imagenet section on CPU 2)")
    p.add_argument("--warmup", type=integer_at_least(0), help="untimed steps first (CUDA 3, CPU 1)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--sections", nargs="+", choices=["steps", "text", "imagenet", "peft", "comp_setup"],
                   default=["steps", "text"], help="steps: the training step table at --classes; text: text "
                   "encoding; imagenet, peft, comp_setup: see above")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    cuda = args.device.type == "cuda"
    sections = set(args.sections)
    # the CPU defaults keep the steps and text sections near 5 minutes on 2 cores
    args.batch = args.batch or (32 if cuda else 4)
    imagenet_steps = args.steps or (10 if cuda else 2)  # a CPU step at 1,000 classes takes 10-20 s
    args.steps = args.steps or (10 if cuda else 5)
    args.warmup = (3 if cuda else 1) if args.warmup is None else args.warmup
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        p.error(f"--json {args.json}: its directory does not exist")

    peak, peak_label = matmul_peak(args.device)
    report = {
        "device": str(args.device), "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(args.device) if cuda else f"CPU, {torch.get_num_threads()} threads",
        "model": "ViT-B/16, random weights",
        "adapter": {**ADAPTER, "encoder": "both", "position": "all", "projections": "q,k,v"},
        "batch": args.batch, "classes": args.classes, "steps": args.steps, "warmup": args.warmup,
        "matmul_peak": {"flops_per_second": peak, "of": peak_label},
        "flops_counted_by": "torch.utils.flop_counter.FlopCounterMode on one step (forward + backward)",
        "memory": "torch.cuda.max_memory_allocated; +step above the model and inputs" if cuda else
                  "each method's own process, peak resident set (ru_maxrss); +step above its pre-step high-water mark",
        "methods": {}, "text_encoding": {}, "imagenet": {}, "peft": {}, "comp_setup": {}}
    print(f"{report['device_name']}, torch {torch.__version__}; CLIP {report['model']}; batch {args.batch}, "
          f"{args.classes} classes, {args.steps} timed steps after {args.warmup} warm-up; "
          f"{peak_label} peak {peak / 1e9:.1f} GFLOP/s", flush=True)

    context = multiprocessing.get_context("spawn")  # a fresh process: no CUDA state or memory carried over
    methods = list(dict.fromkeys(args.methods))  # in the order given, once each
    for method in methods if "steps" in sections else []:
        start = time.perf_counter()
        with context.Pool(1) as pool:  # one process per method, ended when its figures are back
            r = pool.apply(measure_method, (method, args.device, args.batch, args.classes, args.steps, args.warmup))
        r["flops_per_second"] = r["step_flops"] / r["step_seconds"]["median"]
        r["fraction_of_matmul_peak"] = r["flops_per_second"] / peak
        report["methods"][method] = r
        print(f"  measured {method} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    if report["methods"]:
        print_report(report)

    if "text" in sections:
        model = clip_model.build_random(**VIT_B_16).to(args.device)
        prompt_sets = {"10 CoOp prompts": prompts(10), "1,000 prompts, ImageNet's lengths": imagenet_prompts()}
        for name, texts in prompt_sets.items():
            report["text_encoding"][name] = text_encoding(model, texts, args.device, args.steps)
        del model
        print_text_encoding(report)

    for method in methods if "imagenet" in sections else []:  # one heavy process at a time
        start = time.perf_counter()
        with context.Pool(1) as pool:
            report["imagenet"][method] = pool.apply(time_imagenet, (
                method, args.device, args.batch, imagenet_steps, args.warmup))
        for i, variant in enumerate(TEXT_VARIANTS):
            with context.Pool(1) as pool:
                report["imagenet"][method][variant].update(pool.apply(measure_imagenet, (
                    method, variant, args.device, args.batch, args.warmup, i == 0)))
        print(f"  measured {method} at ImageNet scale in {time.perf_counter() - start:.0f} s",
              file=sys.stderr, flush=True)
    if report["imagenet"]:
        add_projections(report["imagenet"], VIT_B_16["transformer_layers"])
        print_imagenet(report)

    if "peft" in sections:
        start = time.perf_counter()
        with context.Pool(1) as pool:
            report["peft"] = pool.apply(time_vs_peft, (args.device, args.batch, imagenet_steps, args.warmup))
        for name in report["peft"]:  # one process each, one at a time
            with context.Pool(1) as pool:
                report["peft"][name]["peak_memory_bytes"] = pool.apply(measure_vs_peft, (
                    name, args.device, args.batch, args.warmup))
        print(f"  measured the peft comparison in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        print_vs_peft(report)

    if "comp_setup" in sections:
        report["comp_setup"] = r = comp_setup(args.device)
        print(f"Comp-LoRA set-up, ViT-B/16's {r['projections']} q, k, v projections: {r['seconds']:.1f} s "
              f"on {report['device_name']}")

    if args.json:  # a temporary file renamed over the target, so a reader never sees half a file
        tmp = f"{args.json}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
