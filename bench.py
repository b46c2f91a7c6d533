"""Speed and memory of each adapter method on a randomly initialised CLIP ViT-B/16 (no download).

    python bench.py                                   # CUDA when available, else CPU with smaller defaults
    python bench.py --methods none lora --json bench.json

Methods: `none` (frozen CLIP, nothing to train) and the `lora`, `comp` and `block` adapters with train.py's
defaults (r=2, alpha=1, dropout 0.25 on q, k, v of every block of both encoders). For each: one training step
(median and range over --steps after --warmup), its peak memory, its FLOP/s as a fraction of a matmul peak
measured in the same run, the trainable parameters, and inference images/s with the adapters unmerged and
merged next to the plain model. Then the no-grad text encoding of 10 and 1,000 class prompts with and without
the exact context truncation of `CLIP.encode_text`. Prints tables; --json FILE also writes the figures.
"""
import argparse
import copy
import json
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
TEXT_PROMPTS = (10, 1000)
TEXT_CHUNK = 250  # prompts per encode_text call; each call truncates to its own longest prompt
TEXT_SECONDS = 20  # time box per prompt count: on CPU one pass over 1,000 full-context prompts takes ~40 s
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


def training_step(model, images, tokens, labels, device):
    """One step as train.py: both encoders (text re-encoded), cross-entropy of 100 x cosine, backward, AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=1e-2) if params else None
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")

    def step():
        with train.autocast(device):
            image = F.normalize(model.encode_image(images).float(), dim=-1)
            text = F.normalize(model.encode_text(tokens).float(), dim=-1)
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
        train.merge_all([layer for layer in variants["merged"].modules() if hasattr(layer, "merge")])
    with torch.no_grad(), train.autocast(device):
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
def text_encoding(model, n, device, rounds):
    """Seconds to encode n prompts in chunks, truncated and full context, and their largest difference."""
    tokens = clip_model.tokenize(prompts(n)).to(device)
    chunks = tokens.split(TEXT_CHUNK)
    encoders = {"truncated": model.encode_text, "full": lambda t: encode_text_full(model, t)}
    with train.autocast(device):
        # warm-up on one chunk, whose outputs also check that both ways compute the same features
        difference = (encoders["truncated"](chunks[0]) - encoders["full"](chunks[0])).abs().max().item()
        seconds = timed({name: (lambda e=e: [e(chunk) for chunk in chunks]) for name, e in encoders.items()},
                        device, rounds, warmup=0, max_seconds=TEXT_SECONDS)
    return {"truncated_length": int(tokens.argmax(dim=-1).max()) + 1, "max_abs_difference": difference,
            **{name: summary(s) for name, s in seconds.items()},
            "speedup": statistics.median(seconds["full"]) / statistics.median(seconds["truncated"])}


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
    print("\ntext encoding, no grad (median s of all prompts, in chunks of "
          f"{TEXT_CHUNK}; timed passes in brackets)")
    for n, r in report["text_encoding"].items():
        print(f"{n:>6} prompts: truncated to {r['truncated_length']} tokens {r['truncated']['median']:.3f} s "
              f"[{r['truncated']['n']}], full 77 {r['full']['median']:.3f} s [{r['full']['n']}], "
              f"speedup {r['speedup']:.1f}x (max |difference| {r['max_abs_difference']:.1e})")


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
    p.add_argument("--steps", type=integer_at_least(1), help="timed steps after warm-up (CUDA 10, CPU 5)")
    p.add_argument("--warmup", type=integer_at_least(0), help="untimed steps first (CUDA 3, CPU 1)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    cuda = args.device.type == "cuda"
    # the CPU defaults keep a full run near 3 minutes on 2 cores
    args.batch = args.batch or (32 if cuda else 4)
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
        "methods": {}, "text_encoding": {}}
    print(f"{report['device_name']}, torch {torch.__version__}; CLIP {report['model']}; batch {args.batch}, "
          f"{args.classes} classes, {args.steps} timed steps after {args.warmup} warm-up; "
          f"{peak_label} peak {peak / 1e9:.1f} GFLOP/s", flush=True)

    context = multiprocessing.get_context("spawn")  # a fresh process: no CUDA state or memory carried over
    for method in dict.fromkeys(args.methods):  # in the order given, once each
        start = time.perf_counter()
        with context.Pool(1) as pool:  # one process per method, ended when its figures are back
            r = pool.apply(measure_method, (method, args.device, args.batch, args.classes, args.steps, args.warmup))
        r["flops_per_second"] = r["step_flops"] / r["step_seconds"]["median"]
        r["fraction_of_matmul_peak"] = r["flops_per_second"] / peak
        report["methods"][method] = r
        print(f"  measured {method} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    model = clip_model.build_random(**VIT_B_16).to(args.device)
    for n in TEXT_PROMPTS:
        report["text_encoding"][n] = text_encoding(model, n, args.device, args.steps)
    print_report(report)

    if args.json:  # a temporary file renamed over the target, so a reader never sees half a file
        tmp = f"{args.json}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
