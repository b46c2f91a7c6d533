"""Datasets for few-shot CLIP fine-tuning: CoOp folder layouts, CLIP-LoRA's draw, image loaders.

The protocol is CLIP-LoRA's (MaxZanella/CLIP-LoRA `main.py`, `datasets/*.py`), whose dataset code
comes from CoOp (KaiyangZhou/CoOp `datasets/*.py`) and Dassl
(`dassl/data/datasets/base_dataset.py`):

- Seed: CLIP-LoRA `main.py` seeds (`run_utils.py` set_random_seed), then builds the dataset with
  no `random` draw between; `build_dataset` calls `random.seed(seed)` there, then makes the same
  draws.
- Draw (`DatasetBase.generate_fewshot_dataset`, CLIP-LoRA `datasets/utils.py`): items grouped by
  label in order of first appearance (`split_dataset_by_label`), per group
  `random.sample(group, shots)`, or for a smaller group `random.choices(group, k=shots)`
  (Dassl's old default repeat=True, kept by CLIP-LoRA).
- Order: CLIP-LoRA draws val (min(shots, 4) per class) BEFORE train in every dataset but ImageNet
  (e.g. `datasets/eurosat.py`); CoOp draws train first, so other images. We follow CLIP-LoRA.
- ImageNet (CLIP-LoRA `datasets/imagenet.py`): per class of the train folder (ImageFolder's
  order), one `random.sample(items, shots + min(shots, 4))`: the first `shots` train, the rest
  val; test is the official val folder. Names: CoOp's classnames.txt if present, else
  imagenet_classes.txt (CLIP's names, looked up by wnid).
- Prompts: CLIP-LoRA's `template = ['a photo of a {}.']` in every dataset; zero-shot: CoOp
  `trainers/zsclip.py` CUSTOM_TEMPLATES. Both put ' ' for '_' (CLIP-LoRA `utils.py`
  clip_classifier, `lora.py`): `classnames` have it.
  The toy world's datasets (toy_world.py) have one prompt of their own for both.
- Base/new split (CoCoOp; CoOp `datasets/oxford_pets.py` subsample_classes, after the draw):
  sorted labels, m = ceil(n / 2), base = the first m, new = the rest, relabelled 0..; the same in
  train, val and test.
"""
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field

import torch
from PIL import Image

import clip_model
import results

README_HINT = "see README.md, section Datasets"
IMAGENET_CLASSES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_classes.txt")
SUBSAMPLES = ("all", "base", "new")

# CoOp datasets/eurosat.py NEW_CNAMES. CoOp applied it when it wrote split_zhou_EuroSAT.json, so
# the released file already holds the long names; mapping raw folder names too lets a split that
# lists "AnnualCrop" work.
EUROSAT_CLASSNAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake"}


class DataError(ValueError):
    """A user mistake about data (path, flag, file): a one-line message naming what is wrong."""

    def __str__(self):
        # a worker's error comes back as "Caught DataError in DataLoader worker ...\n<traceback>":
        # keep its last line
        text = super().__str__().strip()
        return text.splitlines()[-1].split("DataError: ", 1)[-1] if "\n" in text else text


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives under --root (CoOp's DATASETS.md layout) and how to read it."""
    # accepted folder names: CoOp's first, then CLIP-LoRA's code name (e.g. "dtd", "DTD")
    folders: tuple
    images: tuple  # image folder(s) inside it, first that exists ("" is the dataset folder itself)
    reader: str  # split_json | fgvc | imagenet | imagenetv2 | wnid_folders | imagefolder
    split: str = "classnames.txt"  # the split file (split_json) or class-name file
    zeroshot_template: str = "a photo of a {}."  # CoOp trainers/zsclip.py CUSTOM_TEMPLATES
    renames: dict = field(default_factory=dict)
    template: str = "a photo of a {}."  # the training prompt: CLIP-LoRA's (datasets/*.py)
    augment: str = "crop"  # train_transform's: CLIP-LoRA's crop, or flip or none (no crop)

    @property
    def eval_only(self):
        return self.reader in ("imagenetv2", "wnid_folders")


def _coop(folders, images, split, template="a photo of a {}.", renames=None):
    """A dataset read from CoOp's split file."""
    return DatasetSpec(folders, (images,), "split_json", f"split_zhou_{split}.json", template,
                       renames or {})


def _toy(name, prompt, augment="flip"):  # one prompt for training and zero-shot alike
    return DatasetSpec((name,), ("images",), "split_json", "split.json", prompt, template=prompt,
                       augment=augment)


DATASETS = {
    "eurosat": _coop(("eurosat",), "2750", "EuroSAT", "a centered satellite photo of {}.",
                     EUROSAT_CLASSNAMES),
    "dtd": _coop(("dtd", "DTD"), "images", "DescribableTextures", "{} texture."),
    "oxford_pets": _coop(("oxford_pets", "OxfordPets"), "images", "OxfordPets",
                         "a photo of a {}, a type of pet."),
    # cat_to_name.json only served CoOp to write the split; the names are in the split file.
    "oxford_flowers": _coop(("oxford_flowers", "Flower102"), "jpg", "OxfordFlowers",
                            "a photo of a {}, a type of flower."),
    "fgvc": DatasetSpec(("fgvc_aircraft",), ("images",), "fgvc", "variants.txt",
                        "a photo of a {}, a type of aircraft."),
    "food101": _coop(("food-101", "Food101"), "images", "Food101",
                     "a photo of {}, a type of food."),
    "caltech101": _coop(("caltech-101", "Caltech101"), "101_ObjectCategories", "Caltech101"),
    "stanford_cars": _coop(("stanford_cars", "StanfordCars"), "", "StanfordCars"),
    "sun397": _coop(("sun397", "SUN397"), "SUN397", "SUN397"),
    "ucf101": _coop(("ucf101", "UCF101"), "UCF-101-midframes", "UCF101",
                    "a photo of a person doing {}."),
    # CoOp: imagenet/images/{train,val}; CLIP-LoRA's code: imagenet/{train,val}.
    "imagenet": DatasetSpec(("imagenet",), ("images", ""), "imagenet"),
    "imagenetv2": DatasetSpec(("imagenetv2",), ("imagenetv2-matched-frequency-format-val",),
                              "imagenetv2"),
    "imagenet_sketch": DatasetSpec(("imagenet-sketch",), ("images",), "wnid_folders"),
    "imagenet_a": DatasetSpec(("imagenet-adversarial",), ("imagenet-a",), "wnid_folders"),
    "imagenet_r": DatasetSpec(("imagenet-rendition",), ("imagenet-r",), "wnid_folders"),
    "imagefolder": DatasetSpec(("imagefolder",), ("",), "imagefolder", ""),
    # The toy world's tasks (toy_world.py writes them on first use). Their objects are a few pixels
    # wide: no crop; no flip either where it would swap left and right.
    "toy_colour": _toy("toy_colour", "a photo of a {} shape."),
    "toy_count": _toy("toy_count", "a photo of {}."),
    "toy_position": _toy("toy_position", "a photo of a shape {}.", augment="none"),
    "toy_texture": _toy("toy_texture", "a photo of a {} shape."),
    "toy_shape": _toy("toy_shape", "a photo of a {}."),
    "toy_outline_count": _toy("toy_outline_count", "a photo of {}."),
}


def _layout(spec):
    folder = spec.folders[0]
    images = os.path.join(folder, spec.images[0], "")
    also = f" (the folder may also be named {spec.folders[1]}/)" if len(spec.folders) > 1 else ""
    return {
        "split_json": f"{images}... and {folder}/{spec.split}{also}",
        "fgvc": f"{folder}/images/, {folder}/variants.txt and "
                f"{folder}/images_variant_{{train,val,test}}.txt",
        "imagenet": f"{folder}/images/train/<wnid>/, {folder}/images/val/<wnid>/ "
                    f"(or {folder}/train/, {folder}/val/ as in CLIP-LoRA's code), "
                    f"optional {folder}/{spec.split} (else CLIP's 1,000 class names)",
        "imagenetv2": f"{images}<0..999>/ and {folder}/{spec.split}",
        "wnid_folders": f"{images}<wnid>/ and {folder}/{spec.split}",
        "imagefolder": f"{folder}/train/<class>/*, {folder}/test/<class>/*, "
                       f"optional {folder}/val/<class>/*",
    }[spec.reader]


# What each key expects under --root (CoOp DATASETS.md); the README's Datasets section reuses it.
DATASET_HELP = {name: _layout(spec) for name, spec in DATASETS.items()}


@dataclass
class FewShotData:
    """A built dataset. `train`/`val`/`test` are lists of (absolute image path, label)."""
    name: str
    classnames: list  # label -> prompt-ready name ('_' already replaced by ' ')
    template: list  # CLIP-LoRA's prompts for training and evaluation
    zeroshot_template: str  # CoOp's per-dataset zero-shot prompt
    train: list
    val: list
    test: list
    augment: str = "crop"  # DatasetSpec.augment


# ------------------------------------------------------------------------------------------ reading
# A reader (dataset folder, image folder, name, spec, test_only) -> (classnames, train, val, test);
# train may be None with test_only (evaluating on ImageNet need not list 1.28M files). Messages
# leave the flag out.


def dataset_list(names):
    """--eval_datasets a,b: the comma-separated names, as a list."""
    return [name for name in names.split(",") if name]


def check_names(dataset, eval_datasets):
    """--dataset and --eval_datasets name datasets of DATASETS; --dataset one with a train split."""
    for flag, name in [("dataset", dataset), *(("eval_datasets", n) for n in eval_datasets)]:
        if name not in DATASETS:
            raise DataError(f"--{flag} {name!r}: expected one of {', '.join(DATASETS)}")
    if DATASETS[dataset].eval_only:
        raise DataError(f"--dataset {dataset}: evaluation only (no train split); use it in "
                        "--eval_datasets")


def class_prompts(dataset, template):
    """CLIP-LoRA's prompts, tokenized: the template filled with each class name (lora.py)."""
    try:
        return clip_model.tokenize([template.format(c.replace("_", " "))
                                    for c in dataset.classnames])
    except ValueError as error:  # tokenize refuses a text over the context length
        raise DataError(f"class prompt {error}; shorten that class name") from None


def _existing(base, candidates, name, what="folder"):
    """base/<first existing candidate> (a folder; a file if `what` is "file"), else a DataError
    naming the first."""
    exists = os.path.isfile if what == "file" else os.path.isdir
    for candidate in candidates:
        if exists(os.path.join(base, candidate)):
            return os.path.join(base, candidate)
    raise DataError(f"{what} {os.path.join(base, candidates[0])} not found "
                    f"(expected {DATASET_HELP[name]}; {README_HINT})")


def _text_lines(path):
    """(number, stripped line) for each non-blank line of a UTF-8 text file; unreadable, it is a
    DataError."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {path} as UTF-8 text "
                        f"({type(error).__name__}: {error})") from None
    return [(number, line.strip()) for number, line in enumerate(lines, 1) if line.strip()]


def _read_split_json(directory, images, name, spec, test_only):
    """CoOp's split_zhou_*.json: {"train"|"val"|"test": [[path relative to the image folder, label,
    name]]}."""
    path = _existing(directory, (spec.split,), name, "file")
    try:
        with open(path) as f:
            split = json.load(f)
        parts = [[(os.path.join(images, rel), label, cname) for rel, label, cname in split[part]]
                 for part in ("train", "val", "test")]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"split file {path} is not a CoOp split "
                        f"({type(error).__name__}: {error}); expected "
                        '{"train": [[path, label, classname], ...], '
                        '"val": [...], "test": [...]}') from None
    for part, items in zip(("train", "val", "test"), parts):
        for image, label, _ in items:
            if isinstance(label, bool) or not isinstance(label, int) or label < 0:
                raise DataError(f"split file {path}: {part} item "
                                f"{os.path.relpath(image, images)!r} has label {label!r}; "
                                "expected an integer >= 0")
    names = {}
    for _, label, cname in (item for part in parts for item in part):
        names.setdefault(label, spec.renames.get(cname, cname).replace("_", " "))
    labels = range(max(names) + 1) if names else []
    classnames = [names.get(label, f"label {label}") for label in labels]
    train, val, test = ([(p, label) for p, label, _ in part] for part in parts)
    _check_every_class_has_images(train, classnames, f"the train split of {path}")
    return classnames, train, val, test


def _read_fgvc(directory, images, name, spec, test_only):
    """FGVC-Aircraft (CoOp datasets/fgvc_aircraft.py): labels in variants.txt's order; lines
    "<image id> <variant>"."""
    variants = _existing(directory, (spec.split,), name, "file")
    classnames = [line for _, line in _text_lines(variants)]
    label_of = {cname: label for label, cname in enumerate(classnames)}
    parts = []
    for part in ("train", "val", "test"):
        path = _existing(directory, (f"images_variant_{part}.txt",), name, "file")
        parts.append([])
        for number, line in _text_lines(path):
            image_id, _, variant = line.partition(" ")
            if variant not in label_of:
                raise DataError(f"{path} line {number}: variant {variant!r} is not in {spec.split}")
            parts[-1].append((os.path.join(images, image_id + ".jpg"), label_of[variant]))
    _check_every_class_has_images(parts[0], classnames, f"{directory}/images_variant_train.txt")
    return (classnames, *parts)


def _class_folders(directory):
    """Sorted non-hidden sub-folders: torchvision ImageFolder's class order (on a tree without
    hidden folders)."""
    return sorted(entry.name for entry in os.scandir(directory)
                  if entry.is_dir() and not entry.name.startswith("."))


def _list_images(directory, folders, train_dir=None):
    """(path, label) for the images in directory/<folders[label]>/ in torchvision ImageFolder's
    order and extensions; a class folder that exists must hold images. With `train_dir`, a class
    folder that train lacks is a mistake."""
    # here: importing torchvision takes 1.5 s
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
    label_of = {folder: label for label, folder in enumerate(folders)}
    if not label_of:  # torchvision would raise its own ValueError
        raise DataError(f"folder {directory} holds no class folders")
    unknown = ([folder for folder in _class_folders(directory) if folder not in label_of]
               if train_dir else [])
    if unknown:
        raise DataError(f"class folder {os.path.join(directory, unknown[0])} "
                        f"has no counterpart in {train_dir}")
    items = make_dataset(directory, label_of, extensions=IMG_EXTENSIONS, allow_empty=True)
    found = {label for _, label in items}
    for folder, label in label_of.items():
        if label not in found and os.path.isdir(os.path.join(directory, folder)):
            raise DataError(f"class folder {os.path.join(directory, folder)} holds no images "
                            f"({', '.join(IMG_EXTENSIONS)})")
    return items


def _wnid_names(path, wnids=None):
    """Names of `wnids` (else all, in order) from lines "<wnid> <name>" (CoOp classnames.txt,
    datasets/imagenet.py)."""
    pairs = (line.partition(" ") for _, line in _text_lines(path))
    names = {wnid: cname.replace("_", " ") for wnid, _, cname in pairs}
    missing = [wnid for wnid in wnids or () if wnid not in names]
    if missing:
        raise DataError(f"class folder {missing[0]} is not listed in {path}")
    return list(names.values()) if wnids is None else [names[wnid] for wnid in wnids]


def _read_train_test(directory, images, name, spec, test_only):
    """ImageNet: images/{train,val}/<wnid>/ named by wnid (val is the test split: CLIP-LoRA draws
    val from train). imagefolder, the user's data: {train,test}/<class>/ and optional val/<class>/
    (else val = []), named by folder."""
    imagenet = spec.reader == "imagenet"
    train_dir, test_dir = (_existing(images, (part,), name)
                           for part in ("train", "val" if imagenet else "test"))
    folders = _class_folders(train_dir)
    if not folders and not imagenet:
        raise DataError(f"folder {train_dir} has no class sub-folders "
                        f"(expected {DATASET_HELP[name]})")
    names = os.path.join(directory, spec.split)
    classnames = (_wnid_names(names if os.path.isfile(names) else IMAGENET_CLASSES, folders)
                  if imagenet else [folder.replace("_", " ") for folder in folders])
    val_dir = os.path.join(directory, "val")
    train = None if test_only else _list_images(train_dir, folders)
    no_val = imagenet or test_only or not os.path.isdir(val_dir)
    val = [] if no_val else _list_images(val_dir, folders, train_dir)
    return classnames, train, val, _list_images(test_dir, folders, train_dir)


def _read_eval_folders(directory, images, name, spec, test_only):
    """ImageNetV2 (CoOp datasets/imagenetv2.py): folder <i> holds class i, named by line i of
    classnames.txt; ImageNet-Sketch/-A/-R (CoOp datasets/imagenet_sketch.py, imagenet_a.py,
    imagenet_r.py): the <wnid> folders present (200 for A and R), labelled in sorted order, named
    by classnames.txt."""
    path = _existing(directory, (spec.split,), name, "file")
    # ImageNetV2: every line, in order
    wnids = None if spec.reader == "imagenetv2" else _class_folders(images)
    classnames = _wnid_names(path, wnids)
    folders = [str(label) for label in range(len(classnames))] if wnids is None else wnids
    return classnames, [], [], _list_images(images, folders)


def _check_every_class_has_images(items, classnames, where):
    empty = sorted(set(range(len(classnames))) - {label for _, label in items})
    if empty:
        raise DataError(f"class {classnames[empty[0]]!r} (label {empty[0]}) "
                        f"has no images in {where}")


_READERS = {"split_json": _read_split_json,
            "fgvc": _read_fgvc,
            "imagenet": _read_train_test,
            "imagenetv2": _read_eval_folders,
            "wnid_folders": _read_eval_folders,
            "imagefolder": _read_train_test}

# (name, absolute root) -> its reader's output. A run asks for a dataset more than once
# (--subsample base builds "base" and "new"; --eval_datasets): its files are read once per
# process. After changing them: LISTINGS.clear().
LISTINGS = {}


# ----------------------------------------------------------------------------------------- protocol

def _group_by_label(items):
    # dict keeps first-appearance order, as Dassl's defaultdict in split_dataset_by_label
    groups = {}
    for item in items:
        groups.setdefault(item[1], []).append(item)
    return groups


def draw_fewshot(items, shots, classnames, split_name):
    """`shots` items per class, as CLIP-LoRA's generate_fewshot_dataset (repeat=True, see the top);
    warns on repeats."""
    drawn = []
    for label, group in _group_by_label(items).items():
        if len(group) >= shots:
            drawn += random.sample(group, shots)
        else:
            warnings.warn(f"class {classnames[label]!r} has {len(group)} {split_name} images, "
                          f"fewer than {shots}: drawing {shots} with repetition (as CLIP-LoRA)",
                          stacklevel=3)
            drawn += random.choices(group, k=shots)
    return drawn


def _draw_imagenet(train, shots, classnames):
    """CLIP-LoRA datasets/imagenet.py: one random.sample of shots + min(shots, 4) per class; train,
    then val."""
    k = shots + min(shots, 4)
    samples = []
    for label, group in _group_by_label(train).items():
        if len(group) < k:
            raise DataError(f"ImageNet class {classnames[label]!r} has {len(group)} train images; "
                            f"--shots {shots} needs {k} (shots + min(shots, 4) for val)")
        samples.append(random.sample(group, k))
    return ([item for sample in samples for item in sample[:shots]],
            [item for sample in samples for item in sample[shots:]])


def subsample_classes(classnames, splits, subsample):
    """CoCoOp's base/new rule (CoOp datasets/oxford_pets.py subsample_classes, see the top) ->
    (classnames, splits)."""
    m = math.ceil(len(classnames) / 2)
    kept = {"all": range(len(classnames)),
            "base": range(m),
            "new": range(m, len(classnames))}[subsample]
    new_label = {label: index for index, label in enumerate(kept)}
    return ([classnames[label] for label in kept],
            [[(path, new_label[label]) for path, label in split if label in new_label]
             for split in splits])


def build_dataset(name, root, shots, seed, subsample="all", flag="--dataset", test_only=False):
    """Read dataset `name` under the data root `root`, seed Python's `random` with `seed`, draw
    CLIP-LoRA's few-shot train/val, keep CoCoOp's base or new half if asked. `flag` named the
    dataset (for messages). With `test_only`, or for the eval-only datasets (imagenetv2,
    imagenet_sketch, imagenet_a, imagenet_r), train = val = [], no shots."""
    if name not in DATASETS:
        raise DataError(f"{flag}: unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    spec = DATASETS[name]
    test_only = test_only or spec.eval_only
    if not test_only and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 1):
        raise DataError(f"--shots {shots!r}: expected a positive integer")
    allowed = ("all",) if spec.eval_only else SUBSAMPLES
    if subsample not in allowed:
        raise DataError(f"subsample {subsample!r} for {flag} {name}: expected {', '.join(allowed)}")
    root = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(root):
        state = "is not a folder" if os.path.exists(root) else "does not exist"
        raise DataError(f"data root {root} {state} (--root; {README_HINT})")
    try:
        listing = LISTINGS.get((name, root))
        # not read yet, or without train
        if listing is None or (listing[1] is None and not test_only):
            directory = _existing(root, spec.folders, name, "dataset folder")
            images = _existing(directory, spec.images, name, "image folder")
            reader = _READERS[spec.reader]
            listing = LISTINGS[name, root] = reader(directory, images, name, spec, test_only)
        classnames, train, val, test = listing
        # as CLIP-LoRA's main.py, before the draw (reading the files draws nothing)
        random.seed(seed)
        if test_only:
            train, val = [], []
        elif spec.reader == "imagenet":
            train, val = _draw_imagenet(train, shots, classnames)
        else:  # CLIP-LoRA datasets/<name>.py: val first, then train (CoOp draws train first)
            val = draw_fewshot(val, min(shots, 4), classnames, "val")
            train = draw_fewshot(train, shots, classnames, "train")
        if not test:
            raise DataError(f"the test split under {root} holds no images")
        # a split file may list images that are not there: say so now, not after minutes of
        # encoding (the other readers' images were just listed)
        listed = (*train, *val, *test) if spec.reader in ("split_json", "fgvc") else ()
        missing = next((path for path, _ in listed if not os.path.isfile(path)), None)
        if missing:
            raise DataError(f"image {missing} is listed but does not exist ({README_HINT})")
    except DataError as error:
        raise DataError(f"{flag} {name}: {error}") from None
    # after the draw, as CoCoOp (CoOp datasets/*.py): the draw does not depend on it. Copies keep
    # LISTINGS as read.
    classnames, splits = subsample_classes(classnames, (train, val, test), subsample)
    return FewShotData(name, list(classnames), [spec.template], spec.zeroshot_template,
                       *map(list, splits), spec.augment)


def build_datasets(name, test_names, root, shots, seed, subsample="all", toy_root="toy_data"):
    """A run's datasets, all under one data root: (dataset, its new classes or None, {name:
    test-only dataset}). The toy world's (toy_*) are written on first use
    (toy_world.write_datasets) into `root` if it is a new folder, else into `toy_root`."""
    if any(n.startswith("toy_") for n in (name, *test_names)):
        import toy_world  # here: toy_world imports this module
        root = toy_world.write_datasets(root or toy_root)
    dataset = build_dataset(name, root, shots, seed, subsample)
    novel = build_dataset(name, root, shots, seed, "new") if subsample == "base" else None
    others = {test: build_dataset(test, root, shots, seed, flag="--eval_datasets", test_only=True)
              for test in test_names}
    return dataset, novel, others


# ------------------------------------------------------------------------------- images and loaders

def train_transform(size, augment="crop"):
    """The training augmentation (DatasetSpec.augment) for images of `size` pixels. crop: CLIP-LoRA
    main.py's (a random resized crop, a flip); flip: the test-time resize and center crop, a flip;
    none: that resize and crop alone."""
    # here, so that flag errors need not wait for torchvision to import
    from torchvision import transforms as T
    bicubic = T.InterpolationMode.BICUBIC
    crop = ([T.RandomResizedCrop(size, scale=(0.08, 1), interpolation=bicubic)] if augment == "crop"
            else [T.Resize(size, interpolation=bicubic), T.CenterCrop(size)])
    flip = [T.RandomHorizontalFlip(p=0.5)] if augment != "none" else []
    # clip_model's normalisation, which CLIP-LoRA main.py also uses
    return T.Compose(crop + flip + [T.ToTensor(),
                                    T.Normalize(mean=clip_model.MEAN, std=clip_model.STD)])


def _sample_seed(*numbers):
    """A 63-bit seed from a tuple of integers (stable across machines and Python versions)."""
    digest = hashlib.blake2b(repr(numbers).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class PassSampler(torch.utils.data.Sampler):
    """Yields (pass, index) keys, pass p shuffled by a generator seeded with (seed, p): ImageList
    draws each augmentation from (seed, pass, index) alone, so that any --workers gives the same
    batches."""

    def __init__(self, size, shuffle, seed):
        self.size, self.shuffle, self.seed, self.passes, self.skip = size, shuffle, seed, 0, 0

    def __len__(self):
        return self.size

    def __iter__(self):
        """The next pass's keys; its first `skip` keys are left out once (the batches a resumed run
        has trained)."""
        p, self.passes = self.passes, self.passes + 1
        generator = torch.Generator().manual_seed(_sample_seed(self.seed, p))
        order = (torch.randperm(self.size, generator=generator) if self.shuffle
                 else torch.arange(self.size))
        skip, self.skip = self.skip, 0
        return ((p, index) for index in order.tolist()[skip:])


class ImageList(torch.utils.data.Dataset):
    """(image tensor, label) for a key (index, or PassSampler's (pass, index)) over a list of
    (path, label); the transform draws from (seed, pass, index) alone. An unreadable image raises
    DataError naming it."""

    def __init__(self, items, transform, seed=0):
        self.items, self.transform, self.seed = list(items), transform, seed

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        p, index = key if isinstance(key, tuple) else (0, key)
        path, label = self.items[index]
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except Exception as error:
            # PIL raises OSError, ValueError, SyntaxError, zlib.error... on bad files
            raise DataError(f"cannot read image {path} ({type(error).__name__}: {error})") from None
        # torchvision's random transforms draw from torch's global RNG
        with torch.random.fork_rng(devices=[]):
            # CPU only, not CUDA/MPS
            torch.default_generator.manual_seed(_sample_seed(self.seed, p, index))
            return self.transform(rgb), label


def make_loader(items, transform, batch_size, shuffle, workers, seed=0, pin_memory=False):
    """A DataLoader over `items` whose order and augmentations depend on `seed` alone, not on
    `workers`; it never draws from torch's global random stream. pin_memory: only when the batches
    go to a CUDA device."""
    if shuffle and not items:
        raise DataError("no images to train on: the training split is empty")
    # worker seeds come from `generator`; few-shot epochs are a batch or two: persistent workers
    # live across them
    return torch.utils.data.DataLoader(ImageList(items, transform, seed),
                                       batch_size=batch_size,
                                       num_workers=workers,
                                       sampler=PassSampler(len(items), shuffle, seed),
                                       drop_last=False,
                                       pin_memory=pin_memory,
                                       generator=torch.Generator().manual_seed(seed),
                                       persistent_workers=workers > 0)


# ----------------------------------------------------------------------------- demo datasets
_DEMO_MARK = "demo.json"  # written last: its presence means the folder is complete


def write_demo(root, params, write):
    """Make the new folder `root` with write(folder), renamed into place when complete, with a mark
    holding `params`; return it. A complete demo folder of the same `params` is reused (also a
    concurrent call's); any other non-empty one is a DataError."""
    root = os.path.abspath(root)
    if _is_demo(root, params):
        return root
    if os.path.exists(root) and not (os.path.isdir(root) and not os.listdir(root)):
        raise DataError(f"{root} exists and is not a demo folder written by this program; "
                        "the demo writes its data only into a new folder "
                        "(pass another --root, or none)")
    parent = os.path.dirname(root)
    try:
        os.makedirs(parent, exist_ok=True)
        building = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.tmp", dir=parent)
    except OSError as error:
        raise DataError(f"cannot create the demo data folder in {parent} "
                        f"({error.strerror})") from None
    try:
        os.chmod(building, 0o755)  # mkdtemp makes it private
        write(building)
        with open(os.path.join(building, _DEMO_MARK), "w") as f:
            json.dump(params, f)
        _sync_tree(building)  # durable before the rename makes it the complete folder
        try:
            os.rename(building, root)  # atomic; replaces `root` only if it is an empty folder
        except OSError:
            if not _is_demo(root, params):  # a concurrent demo may have made the same folder first
                raise
    except OSError as error:
        raise DataError(f"cannot write the demo data folder {root} "
                        f"({error.strerror or error})") from None
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return root


def _sync_tree(folder):
    """fsync every file and folder under `folder`, as results.save does its files."""
    for here, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(here, name), "r+b") as f:  # writable: Windows syncs only those
                os.fsync(f.fileno())
        results.sync_folder(here)


def _is_demo(root, params):
    try:
        with open(os.path.join(root, _DEMO_MARK)) as f:
            return json.load(f) == params
    except (OSError, ValueError):
        return False
