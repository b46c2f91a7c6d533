"""The toy world: scenes drawn at 32 px with their captions, six downstream tasks, and a small
CLIP pretrained on it, so that the adapters show offline, on a laptop, what they are for: learning
a few-shot task under a style shift while keeping zero-shot ability on the others. A
mechanism check on a toy world, not the papers' setting.

    python toy_world.py    # pretrain once (minutes on a CPU, then cached), print zero-shot accuracy
    python toy_world.py --table DIR --plot FILE.png    # a sweep's table and plot (see README.md)

A scene holds 1 to 4 objects of one shape, colour and texture, each in a quadrant of its own; a
single object also has a position. A caption names a random subset of these attributes. Every
image, caption and weight comes from seeded torch.Generator objects (the initial weights from
clip_model.build_random, which leaves torch's global stream as it was): the same settings give the
same files, and the same weights bit for bit on the same CPU type (the pretraining pins its thread
count, PRETRAIN["threads"])."""
import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from PIL import Image

import clip_model
import data
import results

VERSION = 1  # in the cache name: change it when the drawing, the captions or the pretraining change
SIZE = 32  # pixels; each of the four 16 x 16 quadrants holds at most one object
# The attributes, in caption order, and their words. None starts with a vowel: the article is "a".
WORDS = {"count": ("one", "two", "three", "four"), "texture": ("solid", "striped", "checked"),
         "colour": ("red", "green", "blue", "yellow", "purple", "cyan", "pink", "white"),
         "shape": ("circle", "square", "triangle", "diamond", "cross", "ring"),
         "position": ("on the left", "on the right", "at the top", "at the bottom")}
PALETTE = ((220, 40, 40), (40, 180, 60), (50, 90, 230), (230, 220, 40), (150, 60, 210),
           (40, 200, 220), (245, 130, 190), (235, 235, 235))  # RGB of the colour words
ANCHORS = ((9, 16), (23, 16), (16, 9), (16, 23))  # (x, y) of a single object at each position
# task: (the attribute its classes are, drawn as outlines); the other attributes are random. The
# pretraining world is filled shapes on dark ground ("photos"); toy_outline_count's style, coloured
# outlines on grey, is new: the few-shot target. (On dark ground its zero-shot accuracy is 90%.)
TASKS = {"toy_colour": ("colour", False), "toy_count": ("count", False),
         "toy_position": ("position", False), "toy_texture": ("texture", False),
         "toy_shape": ("shape", False), "toy_outline_count": ("count", True)}
PER_CLASS = {"train": 32, "val": 4, "test": 150}  # images per class in each split of a task
# 2 + 2 blocks of width 128, 4 x 4 patches of 8 px, captions of at most 13 tokens: 7.2M parameters,
# 6.3M of them the token embedding of the tokenizer's 49,408 tokens.
MODEL = dict(embed_dim=128, image_resolution=SIZE, vision_layers=2, vision_width=128,
             vision_patch_size=8, context_length=20, vocab_size=49408, transformer_width=128,
             transformer_layers=2)
# AdamW with CLIP's betas and epsilon (arXiv 2103.00020, appendix F, table 18); linear warm-up, then
# cosine decay to 0.
# threads: the pretraining's own thread count, whatever the machine's, because the order of the
# matrix products' sums follows it (1 and 2 threads end 4e-5 apart): the weights are then a function
# of these settings on a given CPU type.
PRETRAIN = dict(seed=0, steps=500, batch=256, lr=1e-3, warmup=50, weight_decay=0.1, threads=2)
# train.py scores few-shot logits with CLIP-LoRA's fixed scale 100 (train.LOGIT_SCALE), the cap of
# CLIP's learnt one (arXiv 2103.00020, sec. 2.5). Our choice, measured at 150 steps of 128: fixed at
# 100 from the start, the loss stalls and every task stays at chance; learnt, the scale stays near
# CLIP's initial 1/0.07, and the model's cosines are too far apart for 100. So the pretraining uses
# 1/0.07 for the first half of the steps, raises it geometrically to 100 by 90% and keeps 100 to the
# end (logit_scale): the same zero-shot accuracy as learnt, and a model made for train.py's scale.
LOGIT_SCALE = 100
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "clip")  # openai/CLIP's and clip_model's


# -------------------------------------------------------------------------------------- scenes
def sample(n, generator, **fixed):
    """Attributes of n random scenes, {attribute: LongTensor (n,) of word indices}, or `fixed`."""
    scene = {name: torch.randint(len(words), (n,), generator=generator)
             for name, words in WORDS.items()}
    return {**scene, **{name: torch.as_tensor(value).expand(n) for name, value in fixed.items()}}


def _layout(scene, generator):
    """Object centres (n, 4, 2) as (x, y) and radii (n, 4): object k in quadrant order[k], 1.5 px
    inside it (objects never touch); a single object (count index 0) larger, at its position."""
    n = len(scene["count"])
    order = torch.rand(n, 4, generator=generator).argsort(dim=1)  # (n, 4) a random quadrant order
    radius = 3 + 2 * torch.rand(n, 4, generator=generator)
    corner = 16 * torch.stack([order % 2, order // 2], dim=-1)  # (n, 4, 2)
    room = 13 - 2 * radius[..., None]  # where the centre may go in the quadrant, (n, 4, 1)
    centre = corner + 1.5 + radius[..., None] + room * torch.rand(n, 4, 2, generator=generator)
    anchor = torch.tensor(ANCHORS, dtype=torch.float)[scene["position"]]  # (n, 2)
    anchor += 3 * torch.rand(n, 2, generator=generator) - 1.5
    single = scene["count"] == 0
    centre[single, 0] = anchor[single]
    radius[single, 0] += 1.5
    return centre, radius


def _shape_masks(u, v):
    """(6, ...) bool: the shapes in WORDS' order; coordinates divided by the radius, v downwards."""
    au, av, r2 = u.abs(), v.abs(), u * u + v * v
    box = torch.maximum(au, av)
    return torch.stack([r2 <= 1, box <= 0.8, (v <= 0.7) & (1.7 * au <= v + 1), au + av <= 1,
                        (torch.minimum(au, av) <= 0.3) & (box <= 1), (r2 <= 1) & (r2 >= 0.35)])


def draw(scene, generator, outline=False):
    """uint8 images (n, 3, SIZE, SIZE) of scenes, with pixel noise: filled objects in their texture
    on dark ground (0 to 40), or with `outline` their 1-px coloured outlines on grey (60 to 100)."""
    n = len(scene["count"])
    centre, radius = _layout(scene, generator)
    grid = torch.arange(SIZE) + 0.5  # pixel centres
    u = (grid - centre[..., 0, None, None]) / radius[..., None, None]  # (n, 4, 1, SIZE)
    v = (grid[:, None] - centre[..., 1, None, None]) / radius[..., None, None]  # (n, 4, SIZE, 1)
    shapes = _shape_masks(*torch.broadcast_tensors(u, v))  # (6, n, 4, SIZE, SIZE)
    shapes = shapes[scene["shape"], torch.arange(n)]  # (n, 4, SIZE, SIZE)
    present = torch.arange(4) <= scene["count"][:, None]  # (n, 4)
    mask = (shapes & present[..., None, None]).any(dim=1, keepdim=True)  # (n, 1, SIZE, SIZE)
    if outline:  # the mask less its erosion by a 3 x 3 square
        mask &= F.max_pool2d(-mask.float(), 3, stride=1, padding=1) == 0
    rows, cols = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    stripes, checks = rows // 2 % 2, (rows // 2 + cols // 2) % 2
    textures = torch.stack([torch.ones(SIZE, SIZE), 1 - 0.45 * stripes, 1 - 0.45 * checks])
    shade = torch.ones(n, 1, 1) if outline else textures[scene["texture"]]  # (n, SIZE, SIZE)
    colour = torch.tensor(PALETTE, dtype=torch.float)[scene["colour"]]  # (n, 3)
    background = 60 * outline + 40 * torch.rand(n, 1, 1, 1, generator=generator)
    image = torch.where(mask, colour[..., None, None] * shade[:, None], background)
    image += 4 * torch.randn(n, 3, SIZE, SIZE, generator=generator)
    return image.round().clamp(0, 255).to(torch.uint8)


def caption(scene, mention):
    """The caption of one scene ({attribute: word index}) naming the attributes `mention` picks
    ({attribute: bool}); singular or plural always tells whether there is one object."""
    word = {name: WORDS[name][scene[name]] for name in WORDS if mention[name]}
    plural = scene["count"] > 0
    noun = word.get("shape", "shape")
    noun += ("es" if noun.endswith("s") else "s") * plural
    words = [word.get("count", "" if plural else "a"), word.get("texture"), word.get("colour"),
             noun, word.get("position")]
    return "a photo of " + " ".join(w for w in words if w) + "."


def fits(scene, mention):
    """(n, n) bool: the caption of scene j (naming mention[j], (n, 5) bool) fits image i: it names
    only attributes of scene i, and both are plural or both singular."""
    plural = scene["count"] > 0
    fit = plural[:, None] == plural[None, :]
    for k, name in enumerate(WORDS):
        fit &= (scene[name][:, None] == scene[name][None, :]) | ~mention[None, :, k]
    return fit


def captioned(n, generator, p_mention=0.5):
    """(scenes, images, captions, mention (n, 5) bool) of n random scenes: each attribute is named
    with probability `p_mention`, a position only for a single object."""
    scene = sample(n, generator)
    images = draw(scene, generator)
    mention = torch.rand(n, len(WORDS), generator=generator) < p_mention
    mention[:, list(WORDS).index("position")] &= scene["count"] == 0
    texts = [caption({name: int(value[i]) for name, value in scene.items()},
                     dict(zip(WORDS, mention[i].tolist()))) for i in range(n)]
    return scene, images, texts, mention


# --------------------------------------------------------------------------------------- tasks
def class_names(task):
    attribute = TASKS[task][0]
    if attribute == "count":
        return [f"{word} shape{'s' * (index > 0)}" for index, word in enumerate(WORDS["count"])]
    return list(WORDS[attribute])


def task_images(task, part, per_class, seed=0):
    """(uint8 images (n, 3, SIZE, SIZE), labels (n,)) of a task's split ("train", "val", "test"):
    `per_class` images per class, in class order, from a generator of its own. One object per image
    but in the count tasks."""
    index = list(TASKS).index(task) * 3 + ("train", "val", "test").index(part)
    generator = torch.Generator().manual_seed(1000 * seed + index)
    attribute, outline = TASKS[task]
    labels = torch.arange(len(WORDS[attribute])).repeat_interleave(per_class)
    scene = sample(len(labels), generator, **({} if attribute == "count" else {"count": 0}))
    scene[attribute] = labels
    return draw(scene, generator, outline), labels


def write_datasets(root, per_class=None, seed=0):
    """Write the six tasks (`per_class` images per class and split, PER_CLASS by default) into the
    new folder `root`, in CoOp's split_json layout as data.DATASETS' toy_* entries describe it,
    renamed into place when complete (data.write_demo); return it. A folder of the same settings is
    reused."""
    per_class = per_class or PER_CLASS
    params = {"world": "toy", "version": VERSION, "per_class": per_class, "seed": seed}
    return data.write_demo(root, params, functools.partial(_write_tasks, per_class=per_class,
                                                           seed=seed))


def _write_tasks(folder, per_class, seed):
    for task in TASKS:
        spec, names = data.DATASETS[task], class_names(task)
        images_folder = os.path.join(folder, spec.folders[0], spec.images[0])
        split = {}
        for part in ("train", "val", "test"):
            images, labels = task_images(task, part, per_class[part], seed)
            split[part] = [[f"{names[label].replace(' ', '_')}/{part}_{i}.png", label, names[label]]
                           for i, label in enumerate(labels.tolist())]
            for image, (relative, _, _) in zip(images, split[part]):
                pixels = bytes(image.permute(1, 2, 0).flatten().tolist())  # rows of RGB triples
                path = os.path.join(images_folder, relative)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                Image.frombytes("RGB", (SIZE, SIZE), pixels).save(path)
        with open(os.path.join(folder, spec.folders[0], spec.split), "w") as f:
            json.dump(split, f, indent=1)


# --------------------------------------------------------------------------------- pretraining
def normalise(images):
    """uint8 images -> the model's input: what clip_model.preprocess makes of a SIZE-px image."""
    mean, std = (torch.tensor(values).view(3, 1, 1) for values in (clip_model.MEAN, clip_model.STD))
    return (images / 255 - mean) / std


@functools.lru_cache(maxsize=None)
def _tokens(text):
    return clip_model.tokenize(text, MODEL["context_length"])[0]


def contrastive_loss(logits, fit):
    """Multi-positive InfoNCE, both ways: each image's target spreads evenly over the captions that
    fit it, each caption's over the images it fits (UniCL's L_i2t and L_t2i, arXiv 2204.03610, sec.
    3); with one positive per row, CLIP's symmetric cross-entropy (arXiv 2103.00020, sec. 2.3,
    figure 3). logits: images x captions."""
    fit = fit.float()
    image_to_text = F.cross_entropy(logits, fit / fit.sum(dim=1, keepdim=True))
    text_to_image = F.cross_entropy(logits.t(), fit.t() / fit.sum(dim=0)[:, None])
    return (image_to_text + text_to_image) / 2


def logit_scale(step, steps):
    """The temperature's inverse at `step` of `steps` (see LOGIT_SCALE): 1/0.07, then up to 100."""
    progress = min(1, max(0, (step / steps - 0.5) / 0.4))
    return LOGIT_SCALE ** progress * (1 / 0.07) ** (1 - progress)


def batch_loss(model, batch, scale):
    """`model`'s contrastive loss on a batch of `captioned` at the logit scale `scale`."""
    scene, images, texts, mention = batch
    image = F.normalize(model.encode_image(normalise(images)), dim=-1)
    text = F.normalize(model.encode_text(torch.stack([_tokens(t) for t in texts])), dim=-1)
    return contrastive_loss(scale * image @ text.t(), fits(scene, mention))  # (images, captions)


def _adamw(parameters, s):
    """AdamW, fused into one kernel where torch has it on CPUs (2.4 on): here 10x faster than a loop
    over the tensors, whose time the token embedding's 6.3M values dominate."""
    options = dict(lr=s["lr"], betas=(0.9, 0.98), eps=1e-6, weight_decay=s["weight_decay"])
    try:
        return torch.optim.AdamW(parameters, fused=True, **options)
    except RuntimeError:  # torch 2.3: fused on GPUs only
        return torch.optim.AdamW(parameters, foreach=True, **options)


@contextlib.contextmanager
def _threads(count):
    """torch's thread count is `count` in the block, then the caller's again."""
    caller = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(caller)


def pretrain(settings=None, log=print):
    """A CLIP of MODEL's sizes trained contrastively on captioned scenes with `settings` (PRETRAIN's
    by default); returns (the model in eval mode, the losses). `log` gets the progress lines."""
    s = settings or PRETRAIN
    generator = torch.Generator().manual_seed(s["seed"])
    model = clip_model.build_random(seed=s["seed"], **MODEL)
    model.logit_scale.requires_grad_(False).fill_(math.log(LOGIT_SCALE))  # the scale it ends with
    optimizer = _adamw([p for p in model.parameters() if p.requires_grad], s)
    losses, start = [], time.time()
    model.train()
    with _threads(s["threads"]):
        for step in range(s["steps"]):
            for group in optimizer.param_groups:
                warm_up = min(1, (step + 1) / s["warmup"])
                group["lr"] = s["lr"] * warm_up * (1 + math.cos(math.pi * step / s["steps"])) / 2
            batch = captioned(s["batch"], generator)
            loss = batch_loss(model, batch, logit_scale(step, s["steps"]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            done, elapsed = step + 1, time.time() - start
            if done % 25 == 0 or done == s["steps"]:
                log(f"pretraining the toy CLIP: step {done}/{s['steps']}  loss "
                    f"{sum(losses[-25:]) / len(losses[-25:]):.3f}  elapsed {elapsed:.0f}s  "
                    f"eta {elapsed * (s['steps'] - done) / done:.0f}s")
    return model.eval(), losses


def cache_path(cache=None, settings=None):
    """The weights' file in `cache` (CACHE by default), named by a hash of the world's, the model's
    and the pretraining's settings."""
    key = json.dumps([VERSION, WORDS, PALETTE, MODEL, settings or PRETRAIN, LOGIT_SCALE],
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.path.join(cache or CACHE, f"toy-clip-{digest}.pt")


def load_pretrained(cache=None, settings=None):
    """The pretrained toy CLIP from `cache` (CACHE by default); pretrained first if absent, and
    saved there all or nothing (results.save: a temporary file, fsynced, renamed into place)."""
    path = cache_path(cache, settings)
    if not os.path.isfile(path):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        except OSError as error:
            raise clip_model.LoadError(f"cannot create the cache folder {os.path.dirname(path)} "
                                       f"({error.strerror})") from None
        results.check_writable(path, "the toy CLIP's cache file")  # before minutes of work
        print(f"pretraining the toy CLIP once; it is then cached as {path}", flush=True)
        model, _ = pretrain(settings, log=functools.partial(print, flush=True))
        state = model.state_dict()
        results.save(path, lambda f: torch.save(state, f))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise clip_model.LoadError(f"{path}: not a readable weights file ({type(error).__name__}); "
                                   "delete it to pretrain again") from None
    return clip_model.build_model(state, source=path)


@torch.no_grad()
def zero_shot(model, task, per_class=PER_CLASS["test"], seed=0):
    """Top-1 accuracy (%) on a task's test split with the task's prompt (data.DATASETS): what
    train.py measures on the written files, computed from the drawn images."""
    images, labels = task_images(task, "test", per_class, seed)
    template = data.DATASETS[task].zeroshot_template
    tokens = clip_model.tokenize([template.format(name) for name in class_names(task)])
    image = F.normalize(model.encode_image(normalise(images)), dim=-1)
    text = F.normalize(model.encode_text(tokens), dim=-1)
    return 100 * (image @ text.t()).argmax(dim=-1).eq(labels).float().mean().item()


# ------------------------------------------------------------------------------- a sweep's results
def sweep_cells(directory):
    """{(configuration label, dataset, shots): {metric: (mean, std, seeds)}} over the runs under
    `directory`, for each of results.METRICS (accuracy, retention), as results.py groups them."""
    cells = {}
    for metric in results.METRICS:
        for group in results.summary_groups(results.read_results(directory, metric)):
            for dataset, stats in results.group_table(group)[1]:
                for shots, (mean, std, seeds) in stats.items():
                    key = (_short(group["label"]), dataset, shots)
                    cells.setdefault(key, {})[metric] = (mean, std, len(seeds))
    return cells


def _short(label):
    """A configuration's label without the settings its method has not: "lora lr=0.002"."""
    return " ".join(part for part in label.split() if not part.endswith("=none"))


def sweep_table(cells):
    """A Markdown table: a row per configuration and dataset, accuracy and retention per shots."""
    shots = sorted({key[2] for key in cells})
    columns = [(s, metric) for s in shots for metric in results.METRICS]
    header = " | ".join(f"{s}-shot {metric}" for s, metric in columns)
    lines = [f"| configuration | dataset | {header} |", "|:---|:---|" + "---:|" * len(columns)]
    for label, dataset in sorted({key[:2] for key in cells}):
        row = [cells.get((label, dataset, s), {}).get(metric) for s, metric in columns]
        lines.append(f"| {label} | {dataset} | " + " | ".join(map(_mean_std, row)) + " |")
    return "\n".join(lines)


def _mean_std(cell):
    return f"{cell[0]:.1f} ± {cell[1]:.1f} ({cell[2]})" if cell else "-"


def plot_tradeoff(cells, path):
    """Accuracy against retention: a line per configuration and dataset through its shot counts
    (mean and std over seeds, each point labelled with its shots); needs matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise results.UserError("--plot needs matplotlib, which is not installed: "
                                "pip install matplotlib") from None
    figure = Figure(figsize=(6.4, 4.4))
    ax = figure.subplots()
    colours, lines = {}, {}  # a colour per method, a line style per configuration of a method
    for label, dataset in sorted({key[:2] for key in cells}):
        method = label.split()[0]
        colour = colours.setdefault(method, f"C{len(colours) % 10}")
        lines[method] = lines.get(method, -1) + 1
        points = sorted((s, cell) for (l, d, s), cell in cells.items()
                        if (l, d) == (label, dataset) and len(cell) == len(results.METRICS))
        x, dx, y, dy = ([cell[metric][k] for _, cell in points]
                        for metric in ("retention", "accuracy") for k in (0, 1))
        ax.errorbar(x, y, xerr=dx, yerr=dy, marker="o", capsize=2, label=f"{label} ({dataset})",
                    color=colour, linestyle=("-", "--", ":", "-.")[lines[method] % 4])
        for s, cell in points:
            ax.annotate(str(s), (cell["retention"][0], cell["accuracy"][0]), fontsize=7)
    ax.set_xlabel("retention (%): adapted / plain zero-shot, mean over --eval_datasets")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.legend(fontsize=7)
    figure.tight_layout()
    results.save(path, lambda f: figure.savefig(f, format="png", dpi=100))


def main(argv=None):
    p = results.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=CACHE, help="folder of the pretrained weights")
    p.add_argument("--table", metavar="DIR", help="instead, the table of a sweep's runs under DIR")
    p.add_argument("--plot", metavar="FILE.png", help="with --table: accuracy against retention")
    args = p.parse_args(argv)
    if args.plot and not args.table:
        p.exit(2, "error: --plot FILE.png: only with --table DIR\n")
    try:
        if args.table:
            if not os.path.isdir(args.table):
                raise results.UserError(f"--table {args.table}: not a folder")
            if args.plot:
                results.check_writable(args.plot, "--plot")
            cells = sweep_cells(args.table)
            print(sweep_table(cells))
            if args.plot:
                plot_tradeoff(cells, args.plot)
            return
        model = load_pretrained(args.cache)
    except (results.UserError, clip_model.LoadError) as error:
        p.exit(1, f"error: {error}\n")
    print(f"{'task':<18} {'classes':>7} {'chance':>7} {'zero-shot':>9}")
    for task in TASKS:
        n = len(class_names(task))
        print(f"{task:<18} {n:>7} {100 / n:>7.1f} {zero_shot(model, task):>9.1f}")


if __name__ == "__main__":
    main()
