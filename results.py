"""What a run writes and reads back: adapter files (ours and CLIP-LoRA's), results.json and
results.jsonl, run identity, the all-or-nothing save, and the summaries over seeds
(python results.py DIR, see main).
Needs torch, the standard library and clip_model (a device's random state), not train.py."""
import argparse
import contextlib
import csv
import io
import json
import math
import os
import random
import re
import shutil
import statistics
import sys
import tempfile

try:
    import fcntl  # POSIX: serialises concurrent runs' saves
except ImportError:  # Windows: each save is still all or nothing
    fcntl = None

import torch

import clip_model

# Every setting that changes a run's result (not seed, paths, device, workers, printing): what a
# run folder may only be replaced with (unless --overwrite) and what the summaries group by;
# dataset and shots first.
RUN_FIELDS = ("dataset", "shots", "method", "backbone", "r", "alpha", "dropout_rate", "encoder",
              "params", "position", "blocks", "comp_ratio", "lr", "n_iters", "batch_size",
              "subsample", "precision")
# What defines an adapted model; dropout only matters in training.
ADAPTER_FIELDS = ("method", "r", "alpha", "scaling_rule", "blocks", "comp_ratio", "encoder",
                  "position", "params", "backbone")
MAX_RESULTS_BYTES = 16 << 20  # ours are a few KB: a larger results.json is skipped unread
# a run folder's files, and the log of every run beside the dataset folders
ADAPTER, RESULTS, LOG = "adapter.pt", "results.json", "results.jsonl"
CHECKPOINT = ".checkpoint.pt"  # a run's checkpoint is run_dir(...) + CHECKPOINT, beside its folder
STAGED = re.compile(r"\.(.+)\.(tmp|old)(\d+)")  # what a save leaves beside <name>: .<name>.tmp<pid>
REPLACE = "choose another --save_path, or pass --overwrite to replace it"


class UserError(Exception):
    """A mistake in the command line or the files it names; printed as one line."""


class ArgumentParser(argparse.ArgumentParser):
    # one line, as every other user mistake (argparse prints its usage block first)
    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def is_int(value):
    """An int that is not a bool (JSON and torch.load give both)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
    """A finite int or float that is not a bool."""
    try:
        return (is_int(value) or isinstance(value, float)) and math.isfinite(value)
    except OverflowError:  # an int beyond float range
        return False


def canonical_params(params):
    """Projection letters in q, k, v, o order: --params v q and --params q v make the same model."""
    return sorted(params, key=lambda p: "qkvo".index(p) if p in "qkvo" and len(p) == 1 else 4)


# ----------------------------------------------------------------------------- all or nothing
def save(path, content, log=None, before_commit=None):
    """Write `path` all or nothing: readers find the old set or the new one, never a mix.
    content: write(binary file) for a file, {name: write} for a folder, staged as
    `.<name>.tmp<pid>`. Under the log's lock (log = (path, line)), before_commit() may refuse, a
    folder there is set aside (`.<name>.old<pid>`), the new set moves in, the line is appended.
    Any failure or Ctrl-C puts back what was there (OSError: a one-line UserError); `recover`
    after kills."""
    parent, base = os.path.split(os.path.abspath(path))
    staged, aside = (os.path.join(parent, f".{base}.{kind}{os.getpid()}")
                     for kind in ("tmp", "old"))
    # the parents this save creates, deepest first: removed again on failure
    created, folder = [], parent
    while not os.path.isdir(folder):
        created, folder = created + [folder], os.path.dirname(folder)
    current, swapped = path, False
    try:
        recover(path)
        os.makedirs(parent, exist_ok=True)
        if callable(content):
            write_synced(staged, content)
        else:
            os.mkdir(staged)
            for name, write in content.items():
                current = os.path.join(path, name)
                write_synced(os.path.join(staged, name), write)
            sync_folder(staged)
        current = log[0] if log else path
        # appends the line if the block succeeds
        with locked_append(log) if log else contextlib.nullcontext():
            if before_commit:
                before_commit()
            current = path
            # a user's own files stay: hard links, or copies
            if os.path.isdir(path) and not callable(content):
                shutil.copytree(path, staged, symlinks=True, dirs_exist_ok=True, copy_function=link,
                                ignore=lambda at, entries: set(content) if at == path else set())
                os.replace(path, aside)
            # a file replaces atomically; a folder takes the place of the one set aside
            os.replace(staged, path)
            swapped, current = True, log[0] if log else path
    except BaseException as error:
        if swapped and not callable(content):  # the log refused the line: take the new set back out
            shutil.rmtree(path, ignore_errors=True)
        if os.path.lexists(aside) and not os.path.lexists(path):
            os.replace(aside, path)
        remove(staged)
        for folder in created:
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only if still empty
        if isinstance(error, OSError):
            raise UserError(
                f"{error.filename or current}: cannot write ({error.strerror or error}); "
                "nothing was saved, earlier results are unchanged") from None
        raise
    # committed: a set-aside folder left here is removed by the next recover
    with contextlib.suppress(OSError):
        remove(aside)
    sync_folder(parent)  # make the renames themselves durable


def write_synced(path, write):
    with open(path, "xb") as f:  # leaving the block closes it: an error at close is raised too
        write(f)
        f.flush()
        os.fsync(f.fileno())


def remove(path):
    """Remove what this project wrote: a file (or link), or a folder under a save's own name
    (STAGED); any other folder stays (a user's, in the place of a file)."""
    if os.path.isdir(path) and not os.path.islink(path):
        if STAGED.fullmatch(os.path.basename(path)):
            shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def link(source, target):
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)


def recover(path):
    """Resolve what killed saves of `path` left: a set-aside folder goes back where `path` is
    missing (then True), the rest goes."""
    parent, base = os.path.split(os.path.abspath(path))
    pattern = re.compile(rf"\.{re.escape(base)}\.(tmp|old)(\d+)")
    names = os.listdir(parent) if os.path.isdir(parent) else []
    # leftovers, except those of a save still running
    found = [m for m in map(pattern.fullmatch, names) if m and not running(int(m.group(2)))]
    restored = False
    for match in sorted(found, key=lambda m: m.group(1) != "old"):  # set-aside sets first
        leftover = os.path.join(parent, match.group(0))
        if match.group(1) == "old" and not os.path.lexists(path):
            os.replace(leftover, path)
            restored = True
            print(f"recovered {path}: a save was interrupted; the previous run is back in place",
                  file=sys.stderr)
        else:
            remove(leftover)
            print(f"recovered {path}: removed {match.group(0)}, left by an interrupted save",
                  file=sys.stderr)
    return restored


def running(pid):
    """Whether a process `pid` runs here; our own saves clean up after themselves, so our pid's
    are stale."""
    # on Windows os.kill would end the process: assume it runs
    if os.name == "nt" or pid == os.getpid():
        return os.name == "nt"
    try:
        os.kill(pid, 0)
    except OSError as error:  # PermissionError: alive, another user's
        return not isinstance(error, ProcessLookupError)
    return True


@contextlib.contextmanager
def locked_append(log):
    """Lock the log (where fcntl exists) for the block; then append the line whole, fsynced, also
    after a torn line."""
    path, line = log
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if fcntl:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
        size = os.fstat(fd).st_size
        remaining = ("\n" * (size > 0 and os.pread(fd, 1, size - 1) != b"\n") + line).encode()
        try:
            while remaining:
                remaining = remaining[os.write(fd, remaining):]
            os.fsync(fd)
        except BaseException:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)  # also releases the lock


def sync_folder(folder):
    # not every system can fsync a folder; the data itself is synced
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_writable(path, what, folder=False, create=False):
    """Before any work, creating nothing: save() can put a file (folder=True: a folder) at `path`,
    staged in its parent folder, which must exist unless `create` (save makes it: the nearest
    existing parent is tried)."""
    parent = os.path.dirname(os.path.abspath(path))
    while create and not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not folder and (os.path.isdir(path) or not os.path.basename(path)):  # x/ names a folder
        raise UserError(f"{what} {path}: names a folder; expected a file name")
    for place in (parent, path) if folder else (parent,):
        if os.path.lexists(place) and not os.path.isdir(place):
            raise UserError(f"{what} {path}: cannot write ({place} is a file)")
    if not os.path.isdir(parent):
        raise UserError(f"{what} {path}: folder {parent} does not exist")
    if os.path.isfile(path) and not os.access(path, os.W_OK):  # a log is appended to
        raise UserError(f"{what} {path}: cannot write (a read-only file)")
    try:
        tempfile.TemporaryFile(prefix=".write_test", dir=parent).close()
    except OSError as error:
        raise UserError(f"{what} {path}: cannot write in {parent} ({error.strerror})") from None


# ---------------------------------------------------------------------------------- run identity
def run_dir(save_path, dataset, method, shots, seed):
    """Where a run's adapter.pt and results.json live."""
    return os.path.join(save_path, dataset, method, f"{shots}shots", f"seed{seed}")


def difference(saved, config, fields):
    """'<field> <saved value>, this run has <field> <value>' for the first field that differs,
    else None."""
    field = next((field for field in fields if saved.get(field) != config.get(field)), None)
    return field and f"{field} {saved.get(field)!r}, this run has {field} {config.get(field)!r}"


def check_run_identity(folder, config, overwrite, skip_done=False):
    """Refuse to replace a saved run of another configuration (unless --overwrite); True: done
    (same, skip_done)."""
    files = [os.path.join(folder, name) for name in (RESULTS, ADAPTER)]
    if not any(map(os.path.lexists, files)):
        return False
    try:
        with open(files[0], encoding="utf-8") as f:
            differing = difference(dict(json.load(f)["config"]), config, RUN_FIELDS)
    except (OSError, ValueError, KeyError, TypeError):
        if overwrite:
            return False
        raise UserError(
            f"{folder} holds a run whose results.json is missing, unreadable or from an older "
            f"version; {REPLACE}") from None
    if differing and not overwrite:
        raise UserError(f"{folder} holds a run with {differing}; {REPLACE}")
    return skip_done and not differing and os.path.isfile(files[1])


def read_checkpoint(path, config, device, resume, overwrite):
    """The state in the checkpoint at `path` if it is of this exact `config` (with the seed), else
    None. A run replaces or removes that file: another configuration's, or a file that is not a
    checkpoint, is refused unless `overwrite` (as check_run_identity). resume: say if it resumes,
    which needs a device of the kind that wrote it."""
    state = refused = None
    if os.path.lexists(path):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            # an adapter file has neither
            saved, written_on = dict(state["config"]), state["rng"]["device"]
            differing = difference(saved, config, [*config, *saved])  # in RUN_FIELDS' order
            refused = differing and f"a checkpoint with {differing}"
        except Exception:
            refused = "not a checkpoint"
    if refused and not overwrite:
        raise UserError(f"{path}: {refused}; {REPLACE}")
    # the same kind of device: its random stream draws the dropout masks
    if resume and state and not refused and written_on != device.type:
        raise UserError(
            f"{path}: written by a run on {written_on}, this run is on {device.type}; resume "
            f"with --device {written_on}, or run without --resume to start anew")
    if resume:
        print(f"resuming {path} at iteration {state['iteration']}" if state and not refused else
              f"no checkpoint of this configuration at {path}: starting from the beginning")
    return None if refused else state


def write_checkpoint(path, config, progress, lora, parts, device):
    """What continues a run exactly: `config` (with the seed), `progress` ({"iteration": ...}), its
    lora_ tensors, the states of `parts` ({"optimizer": AdamW, ...}) and of every random stream
    training draws from (torch's, Python's, the run device's), as CPU tensors (a file that loads
    anywhere), written all or nothing."""
    state = {"config": config, **progress, "lora": lora,
             **{name: part.state_dict() for name, part in parts.items()},
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                     "device": device.type, "device_state": clip_model.rng_state(device)}}
    # a copy: the optimizer's stay
    state["optimizer"]["state"] = {index: {name: value.cpu() for name, value in moments.items()}
                                   for index, moments in state["optimizer"]["state"].items()}
    save(path, lambda f: torch.save(state, f))


def restore_checkpoint(state, parts, device):
    """Put `parts` and the random streams back as `write_checkpoint` saved them."""
    for name, part in parts.items():
        part.load_state_dict(state[name])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    clip_model.set_rng_state(state["rng"]["device_state"], device)


# ----------------------------------------------------------------------------------- adapter files
def adapter_file(config, tensors):
    """What an adapter file holds: the adapter config, and the lora_ tensors on the CPU
    (comp_lora.lora_state_dict)."""
    return {"config": config, "state_dict": tensors}


# The official code's save_lora / load_lora (MaxZanella/CLIP-LoRA loralib/utils.py, commit
# 358f0d7) write
#   {"weights": {"layer_<i>": {"q_proj" | "k_proj" | "v_proj" | "proj":
#                                  {"w_lora_A": r x d_in, "w_lora_B": d_out x r}}},
#    "metadata": {"r": int, "alpha": int, "encoder": str, "params": [letters as given],
#                 "position": str}}
# where layer_<i> is the i-th attention module apply_lora adapted: text tower blocks first, then
# vision blocks, each in block order. Its LinearLoRA is ours:
# h = W x + b + alpha/sqrt(r) B A dropout(x) (loralib/layers.py).
# theirs: ours
CLIP_LORA_NAMES = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "proj": "out_proj"}
CLIP_LORA_METADATA = ("r", "alpha", "encoder", "params", "position")  # checked in this order


def clip_lora_path(save_path, backbone, dataset, shots, seed, filename="lora_weights"):
    """Where CLIP-LoRA's save_lora writes:
    <save_path>/vitb16/<dataset>/<shots>shots/seed<seed>/<filename>.pt."""
    folder = backbone.replace("/", "").replace("-", "").lower()
    return os.path.join(save_path, folder, dataset, f"{shots}shots", f"seed{seed}",
                        f"{filename}.pt")


def adapter_to_read(given, folder, clip_lora_file):
    """The adapter file to evaluate: `given` (--adapter), else ours in the run folder, else
    CLIP-LoRA's file."""
    ours = os.path.join(folder, ADAPTER)
    found = given or next((path for path in (ours, clip_lora_file) if os.path.isfile(path)), None)
    if not found:
        raise UserError(f"{ours}: no adapter file, nor CLIP-LoRA's {clip_lora_file} "
                        "(train first, or check --save_path)")
    if found == clip_lora_file and not given:
        print(f"no {ours}: evaluating CLIP-LoRA's adapter file {clip_lora_file}")
    return found


def from_clip_lora(saved, modules):
    """A loaded CLIP-LoRA file as (config, tensors, names: our key -> the file's term); layer_<i>
    is modules[i]."""
    meta, weights = saved.get("metadata"), saved.get("weights")
    config = {"method": "lora",
              **{f"metadata[{k!r}]": v
                 for k, v in (meta.items() if isinstance(meta, dict) else ())}}
    names = {f"{module}.{ours}.lora_{part}": f"weights['layer_{i}'][{theirs!r}]['w_lora_{part}']"
             for i, module in enumerate(modules)
             for theirs, ours in CLIP_LORA_NAMES.items()
             for part in "AB"}
    key_of = {term: key for key, term in names.items()}
    tensors = {}
    for layer, entry in (weights.items() if isinstance(weights, dict) else ()):
        for theirs, pair in (entry.items() if isinstance(entry, dict) else [("?", entry)]):
            for part in (("w_lora_A", "w_lora_B") if isinstance(pair, dict) else ("?",)):
                term = f"weights[{layer!r}][{theirs!r}][{part!r}]"
                key = key_of.get(term, term)
                tensors[key] = pair.get(part) if isinstance(pair, dict) else pair
                names[key] = term
    return config, tensors, names


def read_adapter(path, config, expected, modules):
    """The lora_ tensors of an adapter file (ours or CLIP-LoRA's) whose settings equal `config`
    and whose tensors are finite and exactly `expected` ({key: shape}); else a UserError naming
    the first difference in its terms."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        message = str(error).strip()
        reason = message.splitlines()[0][:120] if message else type(error).__name__
        raise UserError(f"{path}: cannot be read as an adapter file ({reason})") from None
    # the official code's file
    if isinstance(saved, dict) and ("weights" in saved or "metadata" in saved):
        saved_config, tensors, names = from_clip_lora(saved, modules)
        fields = [("method", "method")] + [(f"metadata[{f!r}]", f) for f in CLIP_LORA_METADATA]
        extra = [key for key in saved if key not in ("weights", "metadata")] + [
            key for key in saved_config if key not in dict(fields)]
        if extra:
            raise UserError(
                f"{path}: CLIP-LoRA adapter file: {extra[0]} is not a field of this format")
    elif isinstance(saved, dict) and all(isinstance(saved.get(key), dict)
                                         for key in ("config", "state_dict")):
        saved_config, tensors, names = saved["config"], saved["state_dict"], {}
        fields = [(f"adapter {field}", field) for field in ADAPTER_FIELDS]
    else:
        raise UserError(
            f"{path}: not an adapter file of train.py or CLIP-LoRA (expected a dict with a "
            "'config' dict and a 'state_dict' dict, or CLIP-LoRA's 'weights' and 'metadata')")
    for term, field in fields:
        value = saved_config.get(term, saved_config.get(field))
        if field == "params" and isinstance(value, list) and all(isinstance(p, str) for p in value):
            value = canonical_params(value)
        if value != config[field] or type(value) is bool:
            raise UserError(
                f"{path}: {term} is {value!r}, but this run has {field} {config[field]!r}")
    for key, value in tensors.items():
        term = names.get(key, repr(key))
        if key not in expected:
            raise UserError(f"{path}: unexpected tensor {term}: "
                            "this configuration has no such adapter tensor")
        is_float = isinstance(value, torch.Tensor) and value.is_floating_point()
        if not is_float or value.shape != expected[key]:
            shape = type(value).__name__ if not isinstance(value, torch.Tensor) else (
                tuple(value.shape) if is_float else f"{tuple(value.shape)} of {value.dtype}")
            raise UserError(f"{path}: tensor {term} has shape {shape}, "
                            f"expected {tuple(expected[key])} of floats")
        if not torch.isfinite(value).all():
            raise UserError(f"{path}: tensor {term} holds NaN or infinite values")
    missing = [key for key in expected if key not in tensors]
    if missing:
        raise UserError(
            f"{path}: adapter tensor {names.get(missing[0], repr(missing[0]))} is missing "
            f"({len(missing)} of {len(expected)})")
    return tensors


# ------------------------------------------------------------------------------- summary
# Named above a lone configuration's table; with several configurations, the settings that differ
# are named.
KEY_SETTINGS = ("backbone", "r", "alpha", "encoder", "params", "position", "blocks", "comp_ratio")
# CLIP-LoRA's datasets, named and ordered as its paper's tables (arXiv 2405.18541), so a summary
# lines up with them; other datasets follow, by name.
PAPER_DATASETS = {"imagenet": "ImageNet", "sun397": "SUN397", "fgvc": "Aircraft",
                  "eurosat": "EuroSAT", "stanford_cars": "Cars", "food101": "Food101",
                  "oxford_pets": "Pets", "oxford_flowers": "Flowers", "caltech101": "Caltech101",
                  "dtd": "DTD", "ucf101": "UCF101"}
FORMATS = ("text", "markdown", "csv")
METRICS = ("accuracy", "retention")  # what a summary shows of each run (metric_value)
MARKDOWN_ESCAPES = str.maketrans({"\\": "\\\\", "|": "\\|", "*": "\\*"})


def metric_value(result, metric):
    """A run's accuracy, or its retention: 100 x the mean over its --eval_datasets of adapted /
    plain zero-shot accuracy, as train.py records them (None where it has none)."""
    if metric == "accuracy":
        return result.get("accuracy")
    with contextlib.suppress(AttributeError, KeyError, TypeError, statistics.StatisticsError):
        return 100 * statistics.mean(entry["retention"] for entry in result["retention"].values())


def read_result(path, metric="accuracy"):
    """(config, seed, accuracy) of one results.json; ValueError(reason) if it cannot be read or
    lacks a field."""
    if not os.path.isfile(path) or os.path.getsize(path) > MAX_RESULTS_BYTES:
        raise ValueError("not a regular file" if not os.path.isfile(path) else
                         f"{os.path.getsize(path):,d} bytes, "
                         f"more than a results file holds ({MAX_RESULTS_BYTES:,d}); not read")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        result = json.loads(text) if text.strip() else None
    except OSError as error:
        raise ValueError(f"cannot read ({error.strerror})") from None
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except (ValueError, RecursionError) as error:
        raise ValueError(f"not valid JSON ({error})") from None
    if not isinstance(result, dict):
        raise ValueError(f"holds a JSON {type(result).__name__}, expected an object"
                         if text.strip() else "empty file")
    config, args, accuracy = result.get("config"), result.get("args"), metric_value(result, metric)
    if not isinstance(config, dict):
        raise ValueError("lacks 'config', the run's settings" if config is None else
                         "'config' is not an object")
    missing = [field for field in RUN_FIELDS if field not in config]
    if missing:
        raise ValueError(f"config lacks {missing[0]!r}")
    name, shots = config["dataset"], config["shots"]
    if not (isinstance(name, str) and name and is_int(shots) and shots > 0):
        raise ValueError(f"config has dataset {name!r} and shots {shots!r}, "
                         "expected a name and a positive integer")
    if not isinstance(args, dict) or not is_int(args.get("seed")):
        raise ValueError("args['seed'] is missing or not an integer")
    if not is_number(accuracy):
        raise ValueError(f"{metric!r} is {accuracy!r}, expected a number")
    return config, args["seed"], float(accuracy)


def read_results(directory, metric="accuracy"):
    """[(path, config, seed, accuracy)] of the results.json under `directory`; unreadable ones and
    repeats: skipped."""
    if not os.path.isdir(directory):
        raise UserError(f"{directory}: not a folder")
    # (configuration, seed): its first record in sorted order, so no mean repeats a run
    found, first = 0, {}
    walk = os.walk(directory, onerror=lambda error: print(
        f"skipped {error.filename}: cannot list ({error.strerror})", file=sys.stderr))
    for folder, subfolders, files in walk:
        # a run folder that a killed save set aside goes back first; hidden ones: a save under way
        subfolders += [m[1] for m in map(STAGED.fullmatch, subfolders)
                       if m and m[2] == "old" and recover(os.path.join(folder, m[1]))]
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        if RESULTS not in files:
            continue
        found += 1
        path = os.path.join(folder, RESULTS)
        try:
            config, seed, accuracy = read_result(path, metric)
            earlier, _, _, earlier_accuracy = first.setdefault(
                (json.dumps(config, sort_keys=True), seed), (path, config, seed, accuracy))
            if earlier != path:
                other = ("" if accuracy == earlier_accuracy else
                         f" (accuracy {accuracy} here, {earlier_accuracy} there)")
                raise ValueError(
                    f"same configuration and seed {seed} as {earlier}{other}; counted once")
        except ValueError as reason:  # named on stderr
            print(f"skipped {path}: {reason}", file=sys.stderr)
    records = list(first.values())
    if not records:
        raise UserError(f"{directory}: no results.json found" if not found else
                        f"{directory}: none of its {found} results.json files could be read "
                        "(each is named above)")
    return records


def setting_text(value, none="none"):
    if value is None:
        return none
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def summary_groups(records):
    """One group per configuration (config without dataset and shots), ordered by the settings
    that differ between groups:
    [{"settings", "label", "fields", "cells": {(dataset, shots): {seed: accuracy}}}]."""
    groups = {}
    for _, config, seed, accuracy in records:
        settings = {k: v for k, v in config.items() if k not in ("dataset", "shots")}
        group = groups.setdefault(json.dumps(settings, sort_keys=True),
                                  {"settings": settings, "cells": {}})
        group["cells"].setdefault((config["dataset"], config["shots"]), {})[seed] = accuracy
    groups = list(groups.values())
    fields = list(RUN_FIELDS[2:]) + sorted({k for g in groups for k in g["settings"]}
                                           - set(RUN_FIELDS))
    differing = [f for f in fields
                 if len({json.dumps(g["settings"].get(f), sort_keys=True) for g in groups}) > 1]
    shown = differing if len(groups) > 1 else [
        f for f in KEY_SETTINGS if groups[0]["settings"].get(f) is not None]
    # sorted by the differing settings: numbers by value (r=4 before r=16), anything else by its
    # JSON text
    groups.sort(key=lambda g: [(0, v, "") if is_number(v) else (1, 0, json.dumps(v, sort_keys=True))
                               for v in map(g["settings"].get, differing)])
    for g in groups:
        g["fields"] = fields
        g["label"] = " ".join([setting_text(g["settings"].get("method"))] + [
            f"{f}={setting_text(g['settings'].get(f))}" for f in shown if f != "method"])
    return groups


def dataset_order(dataset):
    if dataset in PAPER_DATASETS:
        return (0, list(PAPER_DATASETS).index(dataset), "")
    return (1, 0, dataset)


def group_table(group):
    """(shots, [(dataset, {shots: (mean, std, seeds)})] in CLIP-LoRA's order,
    {shots: (mean of means, missing)})."""
    cells = group["cells"]
    shots = sorted({s for _, s in cells})
    rows = [(dataset, {s: cells[dataset, s] for s in shots if (dataset, s) in cells})
            for dataset in sorted({d for d, _ in cells}, key=dataset_order)]
    for _, stats in rows:
        for s, seeds in stats.items():  # {seed: accuracy} -> (mean, std, seeds)
            values = list(seeds.values())
            stats[s] = (statistics.mean(values),
                        statistics.stdev(values) if len(values) > 1 else 0.0,
                        sorted(seeds))
    average = {s: (statistics.mean(stats[s][0] for _, stats in rows if s in stats),
                   [dataset for dataset, stats in rows if s not in stats]) for s in shots}
    return shots, rows, average


def format_summary(groups, fmt):
    """The tables as aligned text, Markdown pipe tables, or CSV (one row per configuration, dataset
    and shots)."""
    if fmt == "csv":  # mean, std, number and list of seeds, then every setting
        fields = groups[0]["fields"]
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["configuration", "dataset", "shots", "mean", "std", "seeds", "seed_list",
                         *fields])
        for number, group in enumerate(groups, 1):
            settings = [setting_text(group["settings"].get(f), none="") for f in fields]
            for dataset, stats in group_table(group)[1]:
                for s, (mean, std, seeds) in stats.items():  # in shot order
                    writer.writerow([number, dataset, s, mean, std, len(seeds),
                                     " ".join(map(str, seeds)), *settings])
        return out.getvalue().rstrip("\n")
    markdown = fmt == "markdown"
    star = "\\*" if markdown else "*"
    blocks = []
    for number, group in enumerate(groups, 1):
        shots, rows, average = group_table(group)
        table = [["dataset"] + [f"{s}-shot" for s in shots]] + [
            [PAPER_DATASETS.get(dataset, dataset)] + [
                f"{stats[s][0]:.2f} ± {stats[s][1]:.2f} ({len(stats[s][2])})" if s in stats else "-"
                for s in shots]
            for dataset, stats in rows]
        table.append(["Average"] + [f"{average[s][0]:.2f}{star if average[s][1] else ''}"
                                    for s in shots])
        notes = [f"{star} {s}-shot: average over {len(rows) - len(average[s][1])} of {len(rows)} "
                 f"datasets, without {', '.join(PAPER_DATASETS.get(d, d) for d in average[s][1])}"
                 for s in shots if average[s][1]]
        heading = f"configuration {number}/{len(groups)}: {group['label']}"
        if markdown:
            lines = [f"**{heading.translate(MARKDOWN_ESCAPES)}**", ""]
            lines += ["| " + " | ".join([row[0].translate(MARKDOWN_ESCAPES)] + row[1:]) + " |"
                      for row in table]
            lines.insert(3, "|:---|" + "---:|" * len(shots))
            lines += [""] + notes if notes else []
        else:
            widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
            lines = [heading] + [
                "  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
                          for i, (c, w) in enumerate(zip(row, widths))).rstrip()
                for row in table] + notes
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def plot_summary(groups, path, metric="accuracy"):
    """The metric against shots as CLIP-LoRA's few_shot.png: a panel per dataset and one for the
    average (hollow points: some dataset missing), a line per configuration; needs matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(
            "--plot needs matplotlib, which is not installed: pip install matplotlib") from None
    tables = [group_table(g) for g in groups]
    datasets = sorted({d for _, rows, _ in tables for d, _ in rows}, key=dataset_order)
    titles = [PAPER_DATASETS.get(d, d) for d in datasets] + ["Average"]
    columns = min(len(titles), 4)
    rows = math.ceil(len(titles) / columns)
    figure = Figure(figsize=(3.2 * columns, 2.6 * rows))
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for index, (group, (shots, cells, average)) in enumerate(zip(groups, tables)):
        style = dict(color=f"C{index % 10}", marker="o", markersize=3)
        for dataset, stats in cells:
            means, stds, _ = zip(*stats.values())
            axes[datasets.index(dataset)].errorbar(list(stats), means, yerr=stds, capsize=2,
                                                   **style)
        ax = axes[len(datasets)]
        ax.plot(shots, [average[s][0] for s in shots], label=group["label"], **style)
        partial = [s for s in shots if average[s][1]]
        ax.plot(partial, [average[s][0] for s in partial], ls="none", markerfacecolor="white",
                **style)
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
    figure.supxlabel("shots")
    figure.supylabel("top-1 accuracy (%)" if metric == "accuracy" else "retention (%)")
    for ax in axes[len(titles):]:
        ax.axis("off")
    axes[len(datasets)].legend(fontsize=7)
    figure.tight_layout()
    save(path, lambda f: figure.savefig(f, format="png", dpi=100))


def summarize(directory, fmt="text", plot=None, metric="accuracy"):
    """Per configuration, the papers' table (a row per dataset, a column per shot count, mean ± std
    (seeds) over seeds, an Average row) from the results.json files under `directory` (never from
    logs); `plot`: a PNG too. metric: one of METRICS."""
    if plot is not None:
        if not plot.lower().endswith(".png"):
            raise UserError(f"--plot {plot}: expected a file name ending in .png")
        check_writable(plot, "--plot")
    groups = summary_groups(read_results(directory, metric))
    if plot is not None:
        plot_summary(groups, plot, metric)
    return format_summary(groups, fmt)


def main(argv=None):
    """python results.py DIR [--format text|markdown|csv] [--plot FILE.png]: the summary tables of
    DIR's runs."""
    p = ArgumentParser(description=summarize.__doc__)
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--format", default="text", choices=FORMATS,
                   help="text (default), markdown or csv")
    p.add_argument("--plot", metavar="FILE.png",
                   help="also draw accuracy against shots (needs matplotlib)")
    p.add_argument("--metric", default="accuracy", choices=METRICS,
                   help="accuracy, or retention: adapted / plain zero-shot over --eval_datasets")
    args = p.parse_args(argv)
    try:
        print(summarize(args.directory, args.format, args.plot, args.metric))
    except UserError as error:
        p.exit(1, f"error: {error}\n")


if __name__ == "__main__":
    main()
