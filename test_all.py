"""The whole test suite: `python test_all.py` (unittest, no extra package); pytest collects it too.

Everything runs on a tiny random CLIP and small synthetic datasets written in the real on-disk
layouts; no network, no GPU. Ends with a line `N passed, N failed`. A part, through unittest's own
command line:
    python test_all.py TestFormulas                                # one section
    python test_all.py TestFormulas.test_lora_scaling_and_update   # one test
    python test_all.py -k merge      # the tests whose names hold "merge" (-k may be repeated)
    python test_all.py -h            # the other options

The sections, in file order. A new test goes into the section of what it checks:
- TestTokenizer: clip_model.tokenize: golden token ids, a text over the context length.
- TestCLIPModel: the tiny CLIP against RefCLIP (an OpenAI-style reference written here), its
  checkpoint layouts, the truncated text context, the preprocessing.
- TestFullSizeReference: ViT-B/16 at its real size against RefCLIP.
- TestLoadErrors: clip_model.load's refusals, and a corrupt cached download replaced.
- TestAdapters: train.add_adapters on our CLIP: a no-op at initialisation, every projection,
  merge, gradients, save and load, parameter counts, CLIP-LoRA's positions. Its tests of every
  method loop over train.METHODS: a new method added there is tested here, and in TestTrain,
  automatically.
- TestFormulas: each layer's formulas written out, checked to float tolerance; a failure names
  the formula. A new layer class: its update in METHOD_FORMULAS (the forward, dropout and merge
  tests then check it; layer() builds it) and a test of that update of its own.
- TestAdapterFunctions: comp_lora's functions (add_adapters, lora_state_dict, merge_and_unload,
  ...) on models other than ours. TestDropIn: the layer files in a client's code (ClientBlock,
  torch's own attention, copies of a state dict, casts, torch.func). Both loop over LAYERS: a new
  layer class added there is tested in both.
- TestTextEncodingAndPrecision: length groups and text-tower checkpointing, our optimisations (a
  new one is compared with the plain computation and marked @optimisation_test), fp16 on CPU.
- TestData: data.py: the few-shot draw against CLIP-LoRA's protocol restated, each on-disk
  layout, user mistakes, transforms and loaders.
- TestTrain: train.py's runs end to end on the synthetic data: learning, bit-identical seeds and
  workers, resume and signals, exports, retention and base-to-new, paths checked before the work.
- TestCommandLine: user mistakes through the real command line, one process each: a new one is
  an entry in cases() (the arguments, a fragment of the message, the exit code if not 1).
- TestResults: results.py's own functions, without a training run: summaries, their tables and
  plot, saving a whole set or keeping the previous one, adapter files (ours and CLIP-LoRA's).
- TestToyWorld: toy_world.py: drawings and captions, a short pretraining, its datasets through
  data.py, train.py on the toy backbone.
Shared fixtures: tiny() (the tiny random CLIP), adapted() (it with a method's adapters),
write_synthetic() (a small dataset in EuroSAT's and an ImageFolder layout) and WithSyntheticData
(a class's own copy of it, for the tests that train).
"""
import concurrent.futures
import contextlib
import copy
import functools
import hashlib
import inspect
import io
import json
import math
import os
import itertools
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import unittest
import warnings
from collections import OrderedDict
from unittest import mock

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import block_lora
import clip_model
import comp_lora
import data
import results
import toy_world
import train
from block_lora import BlockLoRALinear
from comp_lora import CompLoRALinear, LoRALinear, _complement_bases

HERE = os.path.dirname(os.path.abspath(__file__))
VIT_B_16 = clip_model.VIT_B_16
PROMPTS = ["a photo of a cat.", "a photo of a Annual Crop Land.", "x",
           "a centered satellite photo of a very long and winding river running through "
           "green fields."]


# ------------------------------------------------------------- small datasets in the real layouts
# One colour per class, far apart so that even a tiny, randomly initialised CLIP tells them apart.
PALETTE = [(220, 40, 40), (40, 170, 60), (40, 80, 220), (230, 210, 40), (200, 60, 200),
           (40, 200, 210), (240, 140, 30), (120, 60, 170), (235, 235, 235), (110, 110, 110)]


def synthetic_image(label, size, generator):
    """A solid class colour with class-specific stripes (period and direction) and a little
    noise."""
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    along = (rows, cols, rows + cols)[label % 3]
    stripes = ((along // (2 + label % 4)) % 2).float()
    colour = torch.tensor(PALETTE[label], dtype=torch.float32)
    noise = 6 * torch.randn(size, size, 3, generator=generator)
    pixels = colour * (0.7 + 0.3 * stripes)[..., None] + noise
    values = pixels.round().clamp(0, 255).to(torch.uint8).flatten().tolist()  # row by row, RGB
    return Image.frombytes("RGB", (size, size), bytes(values))


def write_synthetic(root, n_classes=4, n_train_per_class=8, n_test_per_class=8, size=32, seed=0):
    """A tiny, easy dataset in the new folder `root` (data.write_demo), returned: eurosat/
    (EuroSAT's first `n_classes` folders and its split file, 4 val images per class) and
    imagefolder/{train,test}/<class>/*.png."""
    folders = list(data.EUROSAT_CLASSNAMES)[:n_classes]
    params = dict(n_classes=n_classes, n_train_per_class=n_train_per_class,
                  n_test_per_class=n_test_per_class, size=size, seed=seed)

    def write(folder):
        generator = torch.Generator().manual_seed(seed)
        counts = {"train": n_train_per_class, "val": 4, "test": n_test_per_class}
        split = {part: [] for part in counts}
        # a class's EuroSAT images
        parts = [part for part, count in counts.items() for _ in range(count)]
        eurosat, imagefolder = [], []  # (label, path): the generator draws EuroSAT's images first
        for label, name in enumerate(folders):
            for index, part in enumerate(parts, 1):  # EuroSAT numbers its files from 1
                split[part].append([f"{name}/{name}_{index}.jpg", label, name])
                eurosat.append((label, os.path.join(folder, "eurosat", "2750", name,
                                                    f"{name}_{index}.jpg")))
            cname = data.EUROSAT_CLASSNAMES[name].lower().replace(" ", "_")
            imagefolder += [(label, os.path.join(folder, "imagefolder", part, cname,
                                                 f"{cname}_{index}.png"))
                            for part in ("train", "test") for index in range(counts[part])]
        for label, path in eurosat + imagefolder:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            # JPEG quality; PNG ignores it
            synthetic_image(label, size, generator).save(path, quality=95)
        with open(os.path.join(folder, "eurosat", "split_zhou_EuroSAT.json"), "w") as f:
            json.dump(split, f, indent=1)
    return data.write_demo(root, params, write)


def max_rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def tiny(seed=0):
    return clip_model.build_random(seed=seed, **clip_model.TINY_CONFIG)


OPTIMISATION = ("this test checks our implementation's optimisation (the same numbers computed "
                "faster or in less memory), not the formula; TestFormulas checks the formulas")


def optimisation_test(test):
    """Marks a test of our own speed or memory optimisation (truncated text, length groups,
    checkpointing): its failure message says so, so that no one reads it as a wrong formula."""
    @functools.wraps(test)
    def marked(self):
        try:
            test(self)
        except AssertionError as failure:
            raise AssertionError(f"{failure}\n{OPTIMISATION}") from failure
    return marked


# ------------------------------------------------------ an independent OpenAI-style reference CLIP
# Written from the architecture of openai/CLIP model.py: sequence-first tensors,
# nn.MultiheadAttention with its fused in_proj, an additive -inf causal mask over the full 77-token
# context. It loads the OpenAI key layout with strict=True, so it also checks our key names.

class RefQuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class RefBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=RefQuickGELU(),
                                             c_proj=nn.Linear(4 * width, width)))

    def forward(self, x, mask):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class RefTower(nn.Module):
    def __init__(self, width, layers):
        super().__init__()
        self.resblocks = nn.ModuleList(RefBlock(width, width // 64) for _ in range(layers))

    def forward(self, x, mask=None):
        for block in self.resblocks:
            x = block(x, mask)
        return x


class RefVisual(nn.Module):
    def __init__(self, c):
        super().__init__()
        w, p = c["vision_width"], c["vision_patch_size"]
        self.conv1 = nn.Conv2d(3, w, p, p, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(w))
        positions = (c["image_resolution"] // p) ** 2 + 1  # the patches and the class token
        self.positional_embedding = nn.Parameter(torch.empty(positions, w))
        self.ln_pre, self.ln_post = nn.LayerNorm(w), nn.LayerNorm(w)
        self.transformer = RefTower(w, c["vision_layers"])
        self.proj = nn.Parameter(torch.empty(w, c["embed_dim"]))


class RefCLIP(nn.Module):
    def __init__(self, c):
        super().__init__()
        w = c["transformer_width"]
        self.visual = RefVisual(c)
        self.transformer = RefTower(w, c["transformer_layers"])
        self.token_embedding = nn.Embedding(c["vocab_size"], w)
        self.positional_embedding = nn.Parameter(torch.empty(c["context_length"], w))
        self.ln_final = nn.LayerNorm(w)
        self.text_projection = nn.Parameter(torch.empty(w, c["embed_dim"]))
        self.logit_scale = nn.Parameter(torch.empty([]))

    def encode_image(self, x):
        v = self.visual
        x = v.conv1(x).reshape(x.shape[0], v.conv1.out_channels, -1).permute(0, 2, 1)
        x = torch.cat([v.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
        x = v.ln_pre(x + v.positional_embedding).permute(1, 0, 2)
        x = v.transformer(x).permute(1, 0, 2)
        return v.ln_post(x[:, 0, :]) @ v.proj

    def encode_text(self, tokens):
        x = (self.token_embedding(tokens) + self.positional_embedding).permute(1, 0, 2)
        n = x.shape[0]
        # additive causal mask over the full context
        mask = torch.full((n, n), float("-inf")).triu(1)
        x = self.ln_final(self.transformer(x, mask).permute(1, 0, 2))
        return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ self.text_projection


def reference_of(model, config):
    ref = RefCLIP(config)
    ref.load_state_dict(model.openai_state_dict(), strict=True)
    return ref.eval()


# ------------------------------------------------------------------------------------- clip_model

class TestTokenizer(unittest.TestCase):
    def test_golden_ids(self):
        golden = {"a photo of a cat.": [49406, 320, 1125, 539, 320, 2368, 269, 49407],
                  "a photo of a Annual Crop Land.": [49406, 320, 1125, 539, 320, 2906, 9955, 973,
                                                     269, 49407],
                  "Café Ärger – naïve!": [49406, 15304, 10896, 81, 1502, 1224, 1097, 35689, 563,
                                          256, 49407]}
        for text, ids in golden.items():
            tokens = clip_model.tokenize(text)
            self.assertEqual(tokens.shape, (1, 77))
            self.assertEqual(tokens[0, :len(ids)].tolist(), ids)
            self.assertTrue((tokens[0, len(ids):] == 0).all())

    def test_too_long_text(self):
        text = "cat " * 100
        with self.assertRaisesRegex(ValueError, "more than the context length 77"):
            clip_model.tokenize(text)
        tokens = clip_model.tokenize(text, truncate=True)[0]
        self.assertEqual(tokens[-1].item(), 49407)
        self.assertEqual(tokens[0].item(), 49406)


class TestCLIPModel(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.model = tiny()
        self.images = torch.randn(3, 3, 32, 32)
        self.tokens = clip_model.tokenize(PROMPTS)

    def outputs(self, model):
        with torch.no_grad():
            return model.encode_image(self.images), model.encode_text(self.tokens)

    def test_openai_layout_checkpoint_loads_to_same_outputs(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "openai.pt")
            sd = self.model.openai_state_dict()
            self.assertIn("visual.transformer.resblocks.0.attn.in_proj_weight", sd)
            torch.save(sd, path)
            loaded, preprocess = clip_model.load(path)
        for a, b in zip(self.outputs(loaded), self.outputs(self.model)):
            self.assertTrue(torch.equal(a, b))

    def test_torchscript_archive_and_state_dict_load_the_same(self):
        ref = reference_of(self.model, clip_model.TINY_CONFIG)
        # OpenAI archives carry these three ints
        ref.register_buffer("input_resolution", torch.tensor(32))
        ref.register_buffer("context_length", torch.tensor(77))
        ref.register_buffer("vocab_size", torch.tensor(49408))
        with tempfile.TemporaryDirectory() as tmp:
            archive, plain = os.path.join(tmp, "archive.pt"), os.path.join(tmp, "plain.pt")
            # tracing nn.MultiheadAttention warns; the archive only carries weights
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.jit.save(torch.jit.trace_module(ref, {"encode_image": self.images}), archive)
            torch.save(self.model.state_dict(), plain)
            from_archive, _ = clip_model.load(archive)
            from_plain, _ = clip_model.load(plain)
        for a, b, c in zip(self.outputs(from_archive), self.outputs(from_plain),
                           self.outputs(self.model)):
            self.assertTrue(torch.equal(a, c))
            self.assertTrue(torch.equal(b, c))

    @optimisation_test
    def test_truncated_text_equals_full_context(self):
        model = self.model
        with torch.no_grad():
            x = model.token_embedding(self.tokens) + model.positional_embedding  # all 77 positions
            x = model.ln_final(model.transformer(x))
            full = x[torch.arange(len(self.tokens)), self.tokens.argmax(-1)] @ model.text_projection
            truncated = model.encode_text(self.tokens)
        self.assertLessEqual(max_rel_err(truncated, full), 1e-6)

    def test_matches_openai_reference_tiny(self):
        ref = reference_of(self.model, clip_model.TINY_CONFIG)
        for ours, theirs in zip(self.outputs(self.model), self.outputs(ref)):
            self.assertLessEqual(max_rel_err(ours, theirs), 1e-5)

    def test_preprocess(self):
        """openai/CLIP's test transform on non-square noise, against PIL and arithmetic done here:
        shorter side to 32 (bicubic), the longer int(32 * long / short), centre crop at
        round((size - 32) / 2), / 255, CLIP's mean and std."""
        _, preprocess = clip_model.load("tiny")
        noise = torch.Generator().manual_seed(0)
        for width, height, resized in ((50, 37, (43, 32)), (37, 50, (32, 43))):
            drawn = torch.randint(0, 256, (width * height * 3,), generator=noise, dtype=torch.uint8)
            pixels = bytes(drawn.tolist())
            image = Image.frombytes("RGB", (width, height), pixels)
            small = image.resize(resized, Image.BICUBIC)
            left, top = round((resized[0] - 32) / 2), round((resized[1] - 32) / 2)
            crop = small.crop((left, top, left + 32, top + 32))
            rgb = torch.tensor(list(crop.tobytes()), dtype=torch.float32).view(32, 32, 3)
            x = rgb.permute(2, 0, 1) / 255  # (3, 32, 32)
            mean = torch.tensor(clip_model.MEAN)[:, None, None]
            std = torch.tensor(clip_model.STD)[:, None, None]
            expected = (x - mean) / std
            got = preprocess(image)
            self.assertEqual(tuple(got.shape), (3, 32, 32))
            self.assertLessEqual((got - expected).abs().max().item(), 1e-5)
        grey = preprocess(Image.new("L", (40, 50), color=128))  # grey images become RGB
        normalized = (128 / 255 - torch.tensor(clip_model.MEAN)) / torch.tensor(clip_model.STD)
        self.assertTrue(torch.allclose(grey[:, 0, 0], normalized, atol=1e-5))


class TestFullSizeReference(unittest.TestCase):
    """ViT-B/16 at its real size against the OpenAI-style reference, float32, 1e-5 relative."""

    def test_vit_b_16_matches_reference(self):
        model = clip_model.build_random(seed=1, **VIT_B_16)
        ref = reference_of(model, VIT_B_16)
        torch.manual_seed(0)
        images, tokens = torch.randn(2, 3, 224, 224), clip_model.tokenize(PROMPTS)
        with torch.no_grad():
            image_error = max_rel_err(model.encode_image(images), ref.encode_image(images))
            self.assertLessEqual(image_error, 1e-5)
            text_error = max_rel_err(model.encode_text(tokens), ref.encode_text(tokens))
            self.assertLessEqual(text_error, 1e-5)
        self.assertEqual(model.visual.input_resolution, 224)


class TestLoadErrors(unittest.TestCase):
    def test_unknown_name_lists_models(self):
        with self.assertRaisesRegex(clip_model.LoadError, r"unknown model 'ViT-X'.*ViT-B/16"):
            clip_model.load("ViT-X")

    def test_file_that_is_no_checkpoint(self):
        with tempfile.NamedTemporaryFile(suffix=".pt") as f:
            f.write(b"not a checkpoint")
            f.flush()
            with self.assertRaisesRegex(clip_model.LoadError, f"{f.name}: neither a TorchScript"):
                clip_model.load(f.name)

    def test_state_dict_with_missing_keys(self):
        sd = tiny().state_dict()
        del sd["ln_final.weight"], sd["visual.ln_post.bias"]
        with tempfile.NamedTemporaryFile(suffix=".pt") as f:
            torch.save(sd, f.name)
            with self.assertRaises(clip_model.LoadError) as caught:
                clip_model.load(f.name)
        self.assertIn(f.name, str(caught.exception))
        self.assertNotIn("\n", str(caught.exception))

    def test_corrupt_cached_file_is_detected_and_replaced(self):
        with tempfile.TemporaryDirectory() as tmp:
            good = os.path.join(tmp, "good.pt")
            torch.save(tiny().state_dict(), good)
            sha = clip_model._sha256(good)
            cached = os.path.join(tmp, "cache", "Fake.pt")
            os.makedirs(os.path.dirname(cached))
            with open(cached, "wb") as f:
                f.write(b"truncated download")
            models = {"Fake": (sha, "Fake.pt")}

            offline = mock.Mock(side_effect=OSError("network unreachable"))
            with mock.patch.dict(clip_model._MODELS, models), \
                    mock.patch("torch.hub.download_url_to_file", offline):
                with self.assertRaisesRegex(clip_model.LoadError, f"{cached} is corrupt .*sha256"):
                    clip_model.load("Fake", download_root=os.path.dirname(cached))
            self.assertIn(sha, offline.call_args.args[0])  # the URL carries the hash

            def download(url, dst, hash_prefix):
                self.assertEqual(hash_prefix, sha)
                with open(good, "rb") as src, open(dst, "wb") as out:
                    out.write(src.read())
            with mock.patch.dict(clip_model._MODELS, models), \
                    mock.patch("torch.hub.download_url_to_file", download):
                model, _ = clip_model.load("Fake", download_root=os.path.dirname(cached))
            self.assertEqual(clip_model._sha256(cached), sha)
            self.assertTrue(torch.equal(model.ln_final.weight, tiny().ln_final.weight))


# ------------------------------------------------------------------------------------ adapters

def adapted(method, projections=("q", "k", "v"), encoder="both", position="all", seed=0, model=None,
            **extra):
    """The tiny CLIP (or `model`) with adapters of `method`, lora_A drawn with `seed`; returns
    (model, layers)."""
    model = model or tiny()
    config = {"method": method, "r": 2, "alpha": 1, "dropout": 0.25,
              "blocks": extra.get("blocks", 8), "comp_ratio": extra.get("comp_ratio", 0.5),
              "encoder": encoder, "position": position, "params": list(projections),
              "backbone": "tiny"}
    torch.manual_seed(seed)
    return model, train.add_adapters(model, config)


def randomize_b(layers, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


def features(model, images, tokens):
    with torch.no_grad():
        return torch.cat([F.normalize(model.encode_image(images), dim=-1),
                          F.normalize(model.encode_text(tokens), dim=-1)])


class TestAdapters(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.images = torch.randn(2, 3, 32, 32)
        self.tokens = clip_model.tokenize(PROMPTS)
        self.plain = features(tiny(), self.images, self.tokens)

    def test_no_op_at_initialisation(self):
        for method in train.METHODS:
            model, _ = adapted(method, ("q", "k", "v", "o"))
            out = features(model.eval(), self.images, self.tokens)
            self.assertTrue(torch.equal(out, self.plain), method)

    def test_every_projection_changes_the_output(self):
        for method in train.METHODS:
            for p in ("q", "k", "v", "o"):
                for encoder, rows in (("vision", slice(0, 2)), ("text", slice(2, None))):
                    model, layers = adapted(method, (p,), encoder=encoder)
                    self.assertEqual(len(layers), 3)
                    randomize_b(layers)
                    out = features(model.eval(), self.images, self.tokens)
                    change = (out[rows] - self.plain[rows]).abs().max().item()
                    self.assertGreater(change, 1e-4, (method, p, encoder))
                    other = slice(2, None) if encoder == "vision" else slice(0, 2)
                    self.assertTrue(torch.equal(out[other], self.plain[other]))

    def test_merged_equals_unmerged(self):
        for method in train.METHODS:
            model, layers = adapted(method, ("q", "k", "v", "o"))
            randomize_b(layers)
            unmerged = features(model.eval(), self.images, self.tokens)
            for layer in layers:
                layer.merge()
            merged = features(model, self.images, self.tokens)
            self.assertLessEqual(max_rel_err(merged, unmerged), 1e-5, method)
            for layer in layers:
                layer.unmerge()
            unmerged_again = features(model, self.images, self.tokens)
            self.assertLessEqual(max_rel_err(unmerged_again, unmerged), 1e-5)
            with self.assertRaises(RuntimeError):
                layers[0].unmerge()

    def test_eval_does_not_merge(self):
        model, layers = adapted("lora")
        model.eval()
        model.train()
        self.assertFalse(any(layer.merged for layer in layers))

    def test_only_lora_parameters_get_gradients(self):
        for method in train.METHODS:
            model, layers = adapted(method, ("q", "k", "v", "o"))
            randomize_b(layers)
            model.train()
            loss = (model.encode_image(self.images).sum() + model.encode_text(self.tokens).sum())
            loss.backward()
            for name, param in model.named_parameters():
                is_lora = name.rsplit(".", 1)[-1] in ("lora_A", "lora_B")
                self.assertEqual(param.requires_grad, is_lora, name)
                if is_lora:
                    self.assertGreater(param.grad.abs().sum().item(), 0, name)
                else:
                    self.assertIsNone(param.grad, name)

    def test_save_then_load_reproduces_outputs(self):
        for method in train.METHODS:
            model, layers = adapted(method)
            randomize_b(layers)
            expected = features(model.eval(), self.images, self.tokens)
            args = train.parse_args(["--method", method, "--backbone", "tiny"])
            config = train.adapter_config(args)
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "adapter.pt")
                torch.save(results.adapter_file(config, comp_lora.lora_state_dict(model)), path)
                # other lora_A values and zero lora_B, to be overwritten
                fresh, _ = adapted(method, seed=5)
                before = features(fresh.eval(), self.images, self.tokens)
                self.assertFalse(torch.equal(before, expected))
                train.load_adapters(path, fresh, config)
                loaded = features(fresh.eval(), self.images, self.tokens)
                self.assertTrue(torch.equal(loaded, expected), method)
                other = dict(config, r=4)
                mismatch = r"adapter r is 2, but this run has r 4"
                with self.assertRaisesRegex(train.UserError, mismatch):
                    train.load_adapters(path, fresh, other)
                other = dict(config, backbone="ViT-B/16")
                with self.assertRaisesRegex(train.UserError, r"adapter backbone is 'tiny'"):
                    train.load_adapters(path, fresh, other)

    def test_adapter_dropout_has_nn_dropout_law(self):
        torch.manual_seed(0)
        x = torch.ones(400_000)
        for dropout in (comp_lora.adapter_dropout, block_lora.adapter_dropout):
            y = dropout(x, 0.25, True)
            self.assertAlmostEqual((y == 0).float().mean().item(), 0.25, delta=0.005)
            self.assertTrue(torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.75)))
            self.assertIs(dropout(x, 0.25, False), x)
        layer = LoRALinear(nn.Linear(8, 8), dropout=0.5).train()
        with torch.no_grad():
            layer.lora_B.normal_()
        x = torch.randn(64, 8)
        # a fresh mask each call, in training only
        self.assertFalse(torch.equal(layer(x), layer(x)))
        layer.eval()
        self.assertTrue(torch.equal(layer(x), layer(x)))

    def test_lora_model_matches_reference_with_merged_fused_weights(self):
        # The official code merges B A into its q/k/v weights in eval mode; the reference CLIP with
        # the same fused update must give the same logits as our unmerged adapters.
        model, layers = adapted("lora", ("q", "k", "v", "o"))
        randomize_b(layers)
        merged = comp_lora.merge_and_unload(copy.deepcopy(model))  # W + s B A in plain nn.Linear
        ref = RefCLIP(clip_model.TINY_CONFIG)
        ref.load_state_dict(clip_model.fuse_attention(merged.state_dict()), strict=True)
        ours = features(model.eval(), self.images, self.tokens)
        theirs = torch.cat([F.normalize(ref.encode_image(self.images), dim=-1),
                            F.normalize(ref.encode_text(self.tokens), dim=-1)]).detach()
        # logits at scale 100: the 2 images (the first rows) against the prompts
        our_logits = 100 * ours[:2] @ ours[2:].t()
        their_logits = 100 * theirs[:2] @ theirs[2:].t()
        self.assertLessEqual(max_rel_err(our_logits, their_logits), 1e-5)

    def test_block_lora_equals_dense_block_matrix(self):
        base = nn.Linear(24, 10)
        layer = BlockLoRALinear(copy.deepcopy(base), r=3, alpha=2, dropout=0.0, blocks=4)
        with torch.no_grad():
            layer.lora_B.normal_()
        # s B [A_s ... A_s]
        dense = (2 / math.sqrt(3)) * layer.lora_B @ torch.cat([layer.lora_A] * 4, dim=1)
        x = torch.randn(7, 24)
        got = layer(x)
        self.assertLessEqual(max_rel_err(got, F.linear(x, base.weight + dense, base.bias)), 1e-6)
        self.assertLessEqual(max_rel_err(layer.delta_weight(), dense), 1e-6)
        refused = r"blk\.q_proj: input size 24 is not divisible by blocks=5"
        with self.assertRaisesRegex(ValueError, refused):
            BlockLoRALinear(nn.Linear(24, 10), blocks=5, name="blk.q_proj")

    def test_comp_lora_stays_in_the_complement_after_training(self):
        model, layers = adapted("comp", ("q", "k", "v", "o"))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        for _ in range(3):
            loss = (model.encode_image(self.images).pow(2).sum()
                    + model.encode_text(self.tokens).pow(2).sum())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        for layer in layers:
            delta = layer.delta_weight().detach().double()
            self.assertGreater(delta.abs().max().item(), 0)
            u, _, vh = torch.linalg.svd(layer.base.weight.double())
            k = layer.k
            self.assertEqual(k, round(0.5 * 128))
            scale = delta.abs().max()
            self.assertLessEqual(((delta @ vh[:k].t()).abs().max() / scale).item(), 1e-5)
            self.assertLessEqual(((u[:, :k].t() @ delta).abs().max() / scale).item(), 1e-5)

    def test_comp_bases_are_deterministic_under_sign_flips(self):
        w = torch.randn(12, 12)
        u1, v1 = _complement_bases(w, 4)
        u2, v2 = _complement_bases(-w, 4)  # -W = (-U) S V^T: same subspaces, canonical signs
        self.assertTrue(torch.allclose(v1, v2, atol=1e-10) and torch.allclose(u1, -u2, atol=1e-10))

    def test_parameter_counts_at_vit_b_16_size(self):
        expected = {"lora": 184_320, "block": 103_680, "comp": 92_160}
        with torch.device("meta"):  # shapes without values: Comp-LoRA's 72 SVDs cost nothing
            base = clip_model.CLIP(**VIT_B_16)
        total = sum(p.numel() for p in base.parameters())
        for method, count in expected.items():
            model, layers = adapted(method, model=copy.deepcopy(base))
            self.assertEqual(len(layers), 72)
            line = comp_lora.parameter_line(model)
            # Comp-LoRA's projection bases are buffers: the adapters add exactly their trainable
            # parameters
            self.assertEqual(line, f"trainable params: {count:,d} || "
                                   f"all params: {total + count:,d} || "
                                   f"trainable%: {100 * count / (total + count):.4f}")

    def test_positions_follow_clip_lora_tables_at_depth_12(self):
        tables = {"all": range(12), "bottom": [0, 1, 2, 3], "mid": [4, 5, 6, 7],
                  "up": [8, 9, 10, 11], "half-up": [6, 7, 8, 9, 10, 11],
                  "half-bottom": [0, 1, 2, 3, 4, 5], "top3": [9, 10, 11]}
        for position, blocks in tables.items():
            self.assertEqual(list(clip_model._position_blocks(position, 12)), list(blocks))
        model, layers = adapted("lora", ("o",), encoder="vision", position="up")
        self.assertEqual([n for n, m in model.named_modules() if isinstance(m, LoRALinear)],
                         ["visual.transformer.resblocks.2.attn.out_proj"])

    def test_positions_follow_the_official_vit_l_14_table(self):
        # MaxZanella/CLIP-LoRA loralib/utils.py since e6bf706: ViT-L/14 vision defines only these
        # three
        official = {"half-bottom": range(0, 12), "half-up": range(12, 24), "all": range(0, 24)}
        for position, blocks in official.items():
            got = list(clip_model._position_blocks(position, 24))
            self.assertEqual(got, list(blocks), position)


# ------------------------------------------------------------------------------ the formulas
METHOD_FORMULAS = {  # how each layer's update is written in the messages below
    LoRALinear: "s B A, s = alpha / sqrt(r) (CLIP-LoRA's LinearLoRA)",
    CompLoRALinear: "s P_out B A P_in^T, P_in = V[:, k:], P_out = U[:, k:] of W = U S V^T "
                    "(Comp-LoRA, our reconstruction)",
    BlockLoRALinear: "s B [A_s ... A_s], A_s repeated over the n input chunks "
                     "(Block-LoRA, our reconstruction)"}


class TestFormulas(unittest.TestCase):
    """Each method's formulas, written out here and checked to float tolerance: what any correct
    LoRALinear, CompLoRALinear or BlockLoRALinear gives (forward, delta_weight, merge), whatever its
    speed or memory tricks; a failure names the formula. `python test_all.py TestFormulas`."""

    longMessage = False  # the message names the formula; no "x not less than y" before it

    def close(self, got, expected, what, formula, tolerance=1e-6):
        difference = max_rel_err(got.detach().double(), expected.detach().double())
        message = (f"{what} should be {formula}; it differs by {difference:.3g} "
                   "(largest difference relative to the largest entry)")
        self.assertLessEqual(difference, tolerance, message)

    def layer(self, layer_class, dropout=0.0, d_in=24):
        """(the frozen nn.Linear d_in -> 16, a copy wrapped as layer_class with r 4, alpha 3 and a
        random B)."""
        torch.manual_seed(0)
        base = nn.Linear(d_in, 16)
        extra = {"comp_ratio": 0.25} if layer_class is CompLoRALinear else {}
        extra = {"blocks": 4} if layer_class is BlockLoRALinear else extra
        layer = layer_class(copy.deepcopy(base), r=4, alpha=3.0, dropout=dropout, **extra)
        with torch.no_grad():
            layer.lora_B.normal_()
        return base, layer

    def test_lora_scaling_and_update(self):
        base, layer = self.layer(LoRALinear)
        s = 3.0 / math.sqrt(4)
        message = (f"LoRALinear: scaling should be alpha / sqrt(r) = {s:.3f} (CLIP-LoRA), "
                   f"got {layer.scaling:.3f}")
        self.assertAlmostEqual(layer.scaling, s, places=6, msg=message)
        self.assertEqual((tuple(layer.lora_A.shape), tuple(layer.lora_B.shape)), ((4, 24), (16, 4)),
                         "LoRALinear: lora_A should be r x d_in and lora_B d_out x r")
        self.close(layer.delta_weight(), s * layer.lora_B @ layer.lora_A,
                   "LoRALinear.delta_weight()", METHOD_FORMULAS[LoRALinear])

    def test_block_lora_update_repeats_the_shared_block(self):
        base, layer = self.layer(BlockLoRALinear)
        self.assertEqual(tuple(layer.lora_A.shape), (4, 24 // 4),
                         "BlockLoRALinear: lora_A should be the shared block A_s, r x (d_in / n)")
        repeated = torch.cat([layer.lora_A] * 4, dim=1)  # [A_s A_s A_s A_s]: r x d_in
        self.close(layer.delta_weight(), 3.0 / math.sqrt(4) * layer.lora_B @ repeated,
                   "BlockLoRALinear.delta_weight()", METHOD_FORMULAS[BlockLoRALinear])

    def test_comp_lora_update_lives_in_the_complement(self):
        for d_in in (16, 24):  # square first: there U and V swapped fit in shape, and must fail
            base, layer = self.layer(CompLoRALinear, d_in=d_in)
            k = round(0.25 * 16)  # comp_ratio times min(d_out, d_in)
            self.assertEqual((layer.k, tuple(layer.lora_A.shape), tuple(layer.lora_B.shape)),
                             (k, (4, d_in - k), (16 - k, 4)),
                             "CompLoRALinear: k should be round(comp_ratio * min(d_out, d_in)), "
                             "lora_A r x (d_in - k) and lora_B (d_out - k) x r")
            u, _, vh = torch.linalg.svd(base.weight.detach().double())
            delta = layer.delta_weight().detach().double()
            leaks = (("Delta W V_k = 0, W's top-k right singular vectors untouched",
                      delta @ vh[:k].t()),
                     ("U_k^T Delta W = 0, W's top-k left singular vectors untouched",
                      u[:, :k].t() @ delta))
            for name, leak in leaks:
                share = (leak.norm() / delta.norm()).item()
                message = (f"CompLoRALinear.delta_weight() should satisfy {name} "
                           f"(arXiv 2501.15040: the complement); |leak| / |Delta W| = {share:.3g}")
                self.assertLess(share, 1e-6, message)
            # P_out and P_in have orthonormal columns: they keep the Frobenius norm of s B A
            norm = 3.0 / math.sqrt(4) * (layer.lora_B @ layer.lora_A).norm()
            self.close(delta.norm(), norm.double(), "|CompLoRALinear.delta_weight()|",
                       "|s B A| (P_out and P_in with orthonormal columns)")

    def test_forward_in_eval_is_w_x_plus_b_plus_the_update(self):
        x = torch.randn(7, 24)
        for layer_class, formula in METHOD_FORMULAS.items():
            base, layer = self.layer(layer_class, dropout=0.25)
            layer.eval()  # no dropout in eval
            expected = F.linear(x, base.weight + layer.delta_weight(), base.bias)
            self.close(layer(x), expected, f"{layer_class.__name__}.forward(x) in eval",
                       f"W x + b + Delta W x with Delta W = {formula}")

    def test_forward_in_training_drops_the_adapter_input(self):
        # one-hot inputs e_j: the adapter branch is Delta W e_j / (1 - p) where e_j is kept, 0 where
        # dropped
        p, rows = 0.25, 4000
        picks = torch.randint(24, (rows,), generator=torch.Generator().manual_seed(1))
        x = F.one_hot(picks, 24).float()
        for layer_class in METHOD_FORMULAS:
            base, layer = self.layer(layer_class, dropout=p)
            layer.train()
            with torch.no_grad():
                branch = layer(x) - base(x)
                kept_branch = layer.delta_weight()[:, picks].t() / (1 - p)
            dropped = branch.abs().amax(dim=1) < 1e-6
            formula = ("s B A dropout(x): the adapter's input dropped with probability p and "
                       "scaled by 1 / (1 - p) in training, W x + b never dropped")
            share = dropped.float().mean().item()
            message = (f"{layer_class.__name__} in training: the branch should be {formula}; "
                       f"share of dropped inputs {share:.3f}, p = {p}")
            self.assertAlmostEqual(share, p, delta=0.03, msg=message)
            self.close(branch[~dropped], kept_branch[~dropped],
                       f"{layer_class.__name__}'s kept branch in training", formula)

    def test_merge_adds_the_update_to_w_and_unmerge_removes_it(self):
        x = torch.randn(7, 24)
        for layer_class, formula in METHOD_FORMULAS.items():
            base, layer = self.layer(layer_class)
            layer.eval()
            expected = layer(x)
            delta = layer.delta_weight().detach().clone()
            layer.merge()
            name = layer_class.__name__
            self.close(layer.base.weight, base.weight + delta, f"{name}'s W after merge()",
                       f"W + {formula}")
            self.close(layer(x), expected, f"{name}.forward after merge()", "the unmerged forward")
            layer.unmerge()
            self.close(layer.base.weight, base.weight, f"{name}'s W after unmerge()",
                       "the W before merge()")


def openai_style(seed=0):
    """The reference CLIP (nn.MultiheadAttention, sequence first) with the tiny model's weights, in
    eval mode."""
    return reference_of(tiny(seed), clip_model.TINY_CONFIG)


def ref_features(model, images, tokens):
    with torch.no_grad():
        return torch.cat([F.normalize(model.encode_image(images), dim=-1),
                          F.normalize(model.encode_text(tokens), dim=-1)])


def fill_b(model, seed=0):
    """Random lora_B (scale 0.1) in every adapter of `model`, so each adapter changes its
    outputs."""
    randomize_b([m for m in model.modules() if isinstance(m, LoRALinear)], seed)
    return model


LAYERS = {"lora": (LoRALinear, {}), "comp": (CompLoRALinear, dict(comp_ratio=0.5)),
          "block": (BlockLoRALinear, dict(blocks=8))}


class TestAdapterFunctions(unittest.TestCase):
    """comp_lora's add_adapters, mark_only_lora_as_trainable, lora_state_dict, load_lora_state_dict
    and merge_and_unload on models other than ours: the OpenAI-style reference CLIP and bare nn
    modules."""

    def setUp(self):
        torch.manual_seed(0)
        self.images = torch.randn(2, 3, 32, 32)
        self.tokens = clip_model.tokenize(PROMPTS)

    def test_split_attention_equals_multihead_attention_both_ways(self):
        length, n, width = 7, 3, 32
        causal = torch.full((length, length), float("-inf")).triu(1)
        padding = torch.zeros(n, length, dtype=torch.bool)
        padding[:, -2:] = True
        masks = [{}, dict(attn_mask=causal), dict(attn_mask=causal.isinf()),
                 dict(key_padding_mask=padding),
                 dict(attn_mask=torch.randn(n * 4, length, length),
                      key_padding_mask=padding.float() * -1e9)]
        for batch_first in (False, True):
            mha = nn.MultiheadAttention(width, 4, batch_first=batch_first).eval()
            split = comp_lora.SplitAttention(mha)
            x = torch.randn((n, length, width) if batch_first else (length, n, width))
            for mask, need_weights in itertools.product(masks, (False, True)):
                with torch.no_grad():
                    expected, expected_weights = mha(x, x, x, need_weights=need_weights, **mask)
                    y, weights = split(x, x, x, need_weights=need_weights, **mask)
                case = (batch_first, list(mask), need_weights)
                self.assertLessEqual(max_rel_err(y, expected), 1e-5, case)
                if need_weights:
                    self.assertLessEqual(max_rel_err(weights, expected_weights), 1e-5)
                else:
                    self.assertIsNone(weights)
            fused = split.fused()
            self.assertIsInstance(fused, nn.MultiheadAttention)
            self.assertEqual(list(fused.state_dict()), list(mha.state_dict()))
            self.assertTrue(all(torch.equal(a, b) for a, b in zip(fused.state_dict().values(),
                                                                   mha.state_dict().values())))
            self.assertEqual((fused.batch_first, fused.training), (batch_first, False))

    def test_openai_style_model_adapts_and_exports_to_its_original_keys(self):
        plain = openai_style()
        keys = list(plain.state_dict())
        expected = ref_features(plain, self.images, self.tokens)
        for method, (layer_class, extra) in LAYERS.items():
            model = copy.deepcopy(plain)
            names = comp_lora.add_adapters(model, layer_class, r=2, alpha=1, dropout=0.25, **extra)
            self.assertEqual(len(names), 2 * 3 * 3)  # two towers of 3 blocks, q, k and v in each
            self.assertEqual(names[0], "visual.transformer.resblocks.0.attn.q_proj")
            unchanged = ref_features(model, self.images, self.tokens)  # lora_B is 0: no change yet
            self.assertLessEqual(max_rel_err(unchanged, expected), 1e-5)
            adapted = ref_features(fill_b(model), self.images, self.tokens)
            self.assertGreater((adapted - expected).abs().max().item(), 1e-4, method)
            comp_lora.merge_and_unload(model)
            self.assertEqual(list(model.state_dict()), keys)
            wrappers = (LoRALinear, comp_lora.SplitAttention)
            self.assertFalse(any(isinstance(m, wrappers) for m in model.modules()))
            fresh = RefCLIP(clip_model.TINY_CONFIG).eval()
            fresh.load_state_dict(model.state_dict(), strict=True)
            exported = ref_features(fresh, self.images, self.tokens)
            self.assertLessEqual(max_rel_err(exported, adapted), 1e-5, method)

    def test_adapters_take_the_training_mode_of_the_layer_they_wrap(self):
        for method, (layer_class, extra) in LAYERS.items():
            # eval mode, as openai/CLIP's clip.load and from_pretrained return models
            model = openai_style()
            comp_lora.add_adapters(model, layer_class, dropout=0.5, **extra)
            fill_b(model)
            adapters = [m for m in model.modules() if isinstance(m, LoRALinear)]
            self.assertFalse(any(m.training for m in model.modules()), method)
            first = ref_features(model, self.images, self.tokens)
            again = ref_features(model, self.images, self.tokens)
            self.assertTrue(torch.equal(again, first), method)
            model.train()
            in_training = ref_features(model, self.images, self.tokens)
            self.assertFalse(torch.equal(in_training, first), method)
            trained = nn.Sequential(OrderedDict(q_proj=nn.Linear(8, 8))).train()
            comp_lora.add_adapters(trained, layer_class, names=["q_proj"], **extra)
            self.assertTrue(trained.q_proj.training and adapters[0].dropout == 0.5)

    def test_lora_state_dict_round_trip_and_trainable_parameters(self):
        model = fill_b(openai_style())  # no adapters yet: fill_b finds none
        names = ("q_proj", "visual.transformer.resblocks.1.attn.out_proj")
        comp_lora.add_adapters(model, BlockLoRALinear, names=names)
        comp_lora.mark_only_lora_as_trainable(model)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        # q_proj of 6 blocks and one out_proj, lora_A and lora_B each
        self.assertEqual(len(trainable), 2 * 7)
        self.assertTrue(all(n.rpartition(".")[2] in ("lora_A", "lora_B") for n in trainable))
        state = comp_lora.lora_state_dict(fill_b(model))
        self.assertEqual(sorted(state), sorted(trainable))
        self.assertTrue(all(t.device.type == "cpu" and t.dtype == torch.float32
                            for t in state.values()))
        fresh = openai_style()
        comp_lora.add_adapters(fresh, BlockLoRALinear, names=names)
        comp_lora.load_lora_state_dict(fresh, state)
        self.assertTrue(torch.equal(ref_features(fresh, self.images, self.tokens),
                                    ref_features(model, self.images, self.tokens)))

    def test_each_refusal_is_one_line_and_changes_nothing(self):
        model = openai_style()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        attention = model.visual.transformer.resblocks[0].attn
        cases = [((LoRALinear,), dict(names=["query"]),
                  r"^no nn\.Linear of RefCLIP is named \['query'\]; their names: "
                  r"\['c_fc', 'c_proj', 'k_proj', 'out_proj', 'q_proj', 'v_proj'\]$"),
                 ((BlockLoRALinear,), dict(blocks=5),
                  r"^visual\.transformer\.resblocks\.0\.attn\.q_proj: input size "
                  r"128 is not divisible by blocks=5$"),
                 ((LoRALinear,), dict(r=0),
                  r"^visual\.transformer\.resblocks\.0\.attn\.q_proj: r=0: "
                  r"expected a positive integer$")]
        for args, kwargs, message in cases:
            with self.assertRaisesRegex(ValueError, message):
                comp_lora.add_adapters(model, *args, **kwargs)
            # the same module, not a copy
            self.assertIs(model.visual.transformer.resblocks[0].attn, attention)
            self.assertEqual(list(model.state_dict()), list(before))
            self.assertTrue(all(p.requires_grad for p in model.parameters()))
        comp_lora.add_adapters(model, LoRALinear)
        twice = (r"^the model already holds 18 adapters \(first visual\.transformer"
                 r"\.resblocks\.0\.attn\.q_proj\); merge_and_unload it first$")
        with self.assertRaisesRegex(ValueError, twice):
            comp_lora.add_adapters(model, LoRALinear)
        state = comp_lora.lora_state_dict(model)
        key = "transformer.resblocks.2.attn.v_proj.lora_A"
        wrong = [({k: v for k, v in state.items() if k != key},
                  r"the state has no such tensor, the model \(2, 128\)"),
                 ({**state, "x.lora_A": torch.zeros(2, 3)},
                  r"'x\.lora_A': the state has \(2, 3\), the model no such"),
                 ({**state, key: torch.zeros(2, 64)},
                  r"the state has \(2, 64\), the model \(2, 128\)")]
        for bad, message in wrong:
            with self.assertRaisesRegex(ValueError, message):
                comp_lora.load_lora_state_dict(model, bad)
        after = comp_lora.lora_state_dict(model)
        self.assertTrue(all(torch.equal(state[k], v) for k, v in after.items()))

    def test_fp16_base_trains_float32_adapters_with_a_grad_scaler(self):
        for method, (layer_class, extra) in LAYERS.items():
            model = tiny().half()
            comp_lora.add_adapters(model, layer_class, **extra)
            comp_lora.mark_only_lora_as_trainable(model)
            fill_b(model)
            lora = [p for p in model.parameters() if p.requires_grad]
            self.assertTrue(lora and all(p.dtype == torch.float32 for p in lora), method)
            before = [p.detach().clone() for p in lora]
            optimizer = torch.optim.AdamW(lora, lr=1e-3)
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
            model.train()
            for _ in range(3):
                with torch.autocast("cpu", torch.float16):
                    loss = model.encode_image(self.images).float().pow(2).mean()
                optimizer.zero_grad()
                scaler.scale(loss).backward()
                # today's fp16 adapters: "Attempting to unscale FP16 gradients"
                scaler.step(optimizer)
                scaler.update()
            self.assertTrue(all(torch.isfinite(p).all() for p in lora), method)
            self.assertTrue(any(not torch.equal(a, b) for a, b in zip(before, lora)), method)
            # and without autocast, the adapter casts itself to the fp16 activations
            with torch.no_grad():
                self.assertEqual(model.eval().encode_image(self.images.half()).dtype, torch.float16)

    def test_comp_lora_fp16_autocast_update_stays_out_of_protected_directions(self):
        base = nn.Linear(64, 48)
        layer = CompLoRALinear(copy.deepcopy(base), r=4, dropout=0.0)
        self.assertEqual((layer.P_in.dtype, layer.P_out.dtype), (torch.float32, torch.float32))
        optimizer = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.1)
        scaler = torch.amp.GradScaler("cpu")
        x = torch.randn(32, 64)
        for _ in range(5):
            with torch.autocast("cpu", torch.float16):
                loss = (layer(x).float() - 1).pow(2).mean()
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        with torch.autocast("cpu", torch.float16):
            self.assertEqual([f.dtype for f in layer.factors()], [torch.float32, torch.float32])
            delta = layer.delta_weight()
        self.assertEqual(delta.dtype, torch.float32)
        u, _, vh = torch.linalg.svd(base.weight.double())
        delta = delta.double()
        self.assertGreater(delta.norm().item(), 0)
        self.assertLess((u[:, :layer.k].t() @ delta).norm().item() / delta.norm().item(), 1e-6)
        self.assertLess((delta @ vh[:layer.k].t()).norm().item() / delta.norm().item(), 1e-6)

    def test_block_lora_is_lora_with_its_own_factors_and_forward(self):
        self.assertTrue(issubclass(BlockLoRALinear, LoRALinear)
                        and issubclass(CompLoRALinear, LoRALinear))
        for method in ("merge", "unmerge", "delta_weight"):
            self.assertIs(getattr(BlockLoRALinear, method), getattr(LoRALinear, method))
        self.assertIs(block_lora.adapter_dropout, comp_lora.adapter_dropout)
        base = nn.Linear(24, 10)
        block = BlockLoRALinear(copy.deepcopy(base), r=3, dropout=0.0, blocks=4)
        layer = fill_b(nn.Sequential(block))[0]
        x = torch.randn(7, 24)
        down, up = layer.factors()
        self.assertTrue(torch.equal(down, torch.cat([layer.lora_A] * 4, dim=1)))
        expected = F.linear(x, base.weight + layer.delta_weight(), base.bias)
        self.assertLessEqual(max_rel_err(layer(x), expected), 1e-6)
        common = ("base", "r", "alpha", "dropout", "name")
        for layer_class in (LoRALinear, CompLoRALinear, BlockLoRALinear):
            parameters = inspect.signature(layer_class).parameters
            self.assertEqual([p for p in parameters if p in common], list(common), layer_class)


# --------------------------------------------------------- the layer files in a client's code

class ClientBlock(nn.Module):
    """A Hugging Face-style attention block with q_proj, k_proj, v_proj, out_proj as nn.Linear, as a
    client's model has them: what the copied layer files meet outside this project."""

    def __init__(self, width=32, heads=4):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj, self.fc = (nn.Linear(width, width)
                                                                          for _ in range(5))

    def forward(self, x):  # (n, length, width)
        q, k, v = (p(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return x + self.fc(torch.relu(self.out_proj(y)))


def client_model(seed, method="comp", adapt=True):
    """Two ClientBlocks (weights drawn from `seed`) with `method`'s adapters on all four
    projections."""
    torch.manual_seed(seed)
    model = nn.Sequential(ClientBlock(), ClientBlock()).eval()
    if adapt:
        layer_class, extra = LAYERS[method]
        comp_lora.add_adapters(model, layer_class, names=("q_proj", "k_proj", "v_proj", "out_proj"),
                               **extra)
    return model


def adapters_of(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def round_trip(state):
    """torch.save then torch.load, as a checkpoint on disk."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# the ways client code copies a state dict on its way to load_state_dict
STATE_COPIES = {"torch.save": round_trip, "dict": dict, ".copy()": lambda sd: sd.copy(),
                "OrderedDict": OrderedDict,
                "to cpu": lambda sd: {k: v.cpu() for k, v in sd.items()},
                "prefix": lambda sd: {k.removeprefix("_orig_mod."): v for k, v in
                                      {"_orig_mod." + k: v for k, v in sd.items()}.items()}}


class TestDropIn(unittest.TestCase):
    """comp_lora.py and block_lora.py as a client uses them: full-state loads and their copies,
    casts after adapting, torch's own attention modules, torch.func. Right numbers or an
    exception."""

    def setUp(self):
        self.x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0))

    def test_a_full_state_load_gives_comp_lora_the_bases_of_the_loaded_weights(self):
        for merged in (False, True):
            trained = fill_b(client_model(0))
            expected = trained(self.x)
            weights = [layer.base.weight.detach().clone() for layer in adapters_of(trained)]
            if merged:
                for layer in adapters_of(trained):
                    layer.merge()
            fresh = client_model(1)  # built from other weights, then the full state is loaded
            fresh.load_state_dict(round_trip(trained.state_dict()), strict=True)
            self.assertLessEqual(max_rel_err(fresh(self.x), expected), 1e-5, merged)
            for layer, weight in zip(adapters_of(fresh), weights):
                self.assertLessEqual(max_rel_err(layer.base.weight, weight), 1e-6)
                u, _, vh = torch.linalg.svd(weight.double())  # the loaded W's top-k directions
                delta = layer.delta_weight().double()
                self.assertLess((u[:, :layer.k].t() @ delta).norm() / delta.norm(), 1e-6)
                self.assertLess((delta @ vh[:layer.k].t()).norm() / delta.norm(), 1e-6)
                layer.merge()
                layer.unmerge()
                self.assertLessEqual(max_rel_err(layer.base.weight, weight), 1e-6)

    def test_every_copy_of_a_merged_state_loads_its_update_once(self):
        for method in LAYERS:
            model = fill_b(client_model(0, method))
            expected = model(self.x)
            for layer in adapters_of(model):
                layer.merge()
            state = model.state_dict()
            for name, copy_state in STATE_COPIES.items():
                fresh = client_model(1, method)
                fresh.load_state_dict(copy_state(state), strict=True)
                self.assertLessEqual(max_rel_err(fresh(self.x), expected), 1e-5, (method, name))
                into_merged = client_model(1, method)  # a merged layer loads as well
                for layer in adapters_of(into_merged):
                    layer.merge()
                into_merged.load_state_dict(copy_state(state), strict=True)
                self.assertLessEqual(max_rel_err(into_merged(self.x), expected), 1e-5,
                                     (method, name))
            # other factors, merged: then loaded
            lora_only = fill_b(client_model(0, method), seed=4)
            for layer in adapters_of(lora_only):
                layer.merge()
            comp_lora.load_lora_state_dict(lora_only, comp_lora.lora_state_dict(model))
            self.assertLessEqual(max_rel_err(lora_only(self.x), expected), 1e-5, method)

    def test_adapters_stay_float32_through_casts_after_adapting(self):
        casts = {"half": lambda m: m.half(), "to(bfloat16)": lambda m: m.to(torch.bfloat16),
                 "to(cpu, float16)": lambda m: m.to("cpu", torch.float16)}
        for name, cast in casts.items():
            model = fill_b(client_model(0, "comp"))
            weight = adapters_of(model)[0].base.weight.detach().clone()  # its bases' W, float32
            model = cast(model)
            for layer in adapters_of(model):
                kept = [layer.lora_A, layer.lora_B, layer.P_in, layer.P_out]
                self.assertEqual({t.dtype for t in kept}, {torch.float32}, name)
                self.assertNotEqual(layer.base.weight.dtype, torch.float32, name)
            comp_lora.mark_only_lora_as_trainable(model)
            lora = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.SGD(lora, lr=0.1)
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
            model.train()
            x = self.x.to(model[0].fc.weight.dtype)
            for _ in range(3):  # float32 gradients: the scaler can unscale them
                loss = model(x).float().pow(2).mean()
                optimizer.zero_grad()
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            layer = adapters_of(model)[0]
            u, _, vh = torch.linalg.svd(weight.double())
            delta = layer.delta_weight().double()
            self.assertLess((u[:, :layer.k].t() @ delta).norm() / delta.norm(), 1e-6, name)
            self.assertLess((delta @ vh[:layer.k].t()).norm() / delta.norm(), 1e-6, name)

    def test_split_attention_is_exact_for_what_it_accepts_and_refuses_the_rest(self):
        for heads in (4, 1):
            mha = nn.MultiheadAttention(16, heads, dropout=0.5)
            split = comp_lora.SplitAttention(mha)
            x = torch.randn(5, 16)  # unbatched: (length, width)
            causal = torch.full((5, 5), float("-inf")).triu(1)
            cases = [{}, dict(key_padding_mask=torch.tensor([0, 0, 0, 1, 1]).bool()),
                     dict(attn_mask=torch.randn(heads, 5, 5)),
                     dict(attn_mask=causal, is_causal=True)]
            for mode, kwargs, need_weights, average in itertools.product(
                    ("eval", "train"), cases, (True, False), (True, False)):
                getattr(mha, mode)()
                split.train(mode == "train")
                torch.manual_seed(1)  # training: the same dropout draws
                expected = mha(x, x, x, need_weights=need_weights, average_attn_weights=average,
                               **kwargs)
                torch.manual_seed(1)
                y, weights = split(x, x, x, need_weights=need_weights, average_attn_weights=average,
                                   **kwargs)
                case = (heads, mode, list(kwargs), need_weights, average)
                self.assertEqual(y.shape, expected[0].shape, case)
                self.assertLessEqual(max_rel_err(y, expected[0]), 1e-5, case)
                if need_weights:  # in training the weights after dropout, as torch returns them
                    self.assertLessEqual(max_rel_err(weights, expected[1]), 1e-5, case)
        with self.assertRaisesRegex(ValueError, r"is_causal=True needs attn_mask"):
            split(x, x, x, is_causal=True)
        refused = {"add_bias_kv=True": dict(add_bias_kv=True),
                   "add_zero_attn=True": dict(add_zero_attn=True),
                   "kdim or vdim other than embed_dim": dict(kdim=8, vdim=8)}
        for argument, kwargs in refused.items():
            with self.assertRaisesRegex(ValueError, rf"^nn\.MultiheadAttention with {argument}"):
                comp_lora.SplitAttention(nn.MultiheadAttention(16, 4, **kwargs))
            model = nn.Sequential(OrderedDict(attn=nn.MultiheadAttention(16, 4, **kwargs)))
            before = list(model.state_dict())
            message = rf"^attn: nn\.MultiheadAttention with {argument}"
            with self.assertRaisesRegex(ValueError, message):
                comp_lora.add_adapters(model, LoRALinear, names=("out_proj",))
            self.assertIsInstance(model.attn, nn.MultiheadAttention)
            self.assertEqual(list(model.state_dict()), before)

    def test_torch_transformer_encoder_and_an_adapted_out_proj_run_the_adapters(self):
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
        torch.manual_seed(0)
        encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
        padding = torch.zeros(3, 5, dtype=torch.bool)
        padding[:, -2:] = True
        for names in (("q_proj", "v_proj"), ("out_proj",)):  # out_proj alone: still split
            model = copy.deepcopy(encoder)
            comp_lora.add_adapters(model, LoRALinear, names=names)
            fill_b(model)
            merged = comp_lora.merge_and_unload(copy.deepcopy(model))
            for kwargs in ({}, dict(src_key_padding_mask=padding)):
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch's nested tensors are a prototype
                    ours = model(self.x, **kwargs)[:, :3]  # the positions that are not padding
                    reference = merged(self.x, **kwargs)[:, :3]
                    plain = encoder(self.x, **kwargs)[:, :3]
                self.assertLessEqual(max_rel_err(ours, reference), 1e-5, (names, list(kwargs)))
                self.assertGreater((ours - plain).abs().max().item(), 1e-4, (names, list(kwargs)))

    def test_torch_func_transforms_and_one_dimensional_input(self):
        layer = fill_b(nn.Sequential(LoRALinear(nn.Linear(8, 6), dropout=0.5)))[0].train()
        x = torch.randn(8)  # 1-D: one token
        torch.manual_seed(2)
        keep = torch.rand(8) >= 0.5  # the mask the layer draws next with the same seed
        # Jacobian of h = W x + b + s B A (x * keep / (1 - p)), the formula written out
        expected = layer.base.weight + layer.scaling * layer.lora_B @ layer.lora_A * (keep / 0.5)
        torch.manual_seed(2)
        jacobian = torch.func.jacrev(layer)(x)
        self.assertLessEqual(max_rel_err(jacobian, expected), 1e-6)
        torch.manual_seed(2)
        params = dict(layer.named_parameters())
        grads = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x,)).sum())(params)
        torch.manual_seed(2)
        layer(x).sum().backward()  # 1-D input through autograd, as in training
        self.assertTrue(torch.equal(grads["lora_A"], layer.lora_A.grad))
        self.assertTrue(torch.equal(grads["lora_B"], layer.lora_B.grad))
        per_sample = torch.func.vmap(layer, randomness="different")(torch.randn(4, 8))
        self.assertEqual(per_sample.shape, (4, 6))
        gelu = clip_model.QuickGELU()
        s = torch.sigmoid(1.702 * x)
        derivative = torch.func.grad(lambda t: gelu(t).sum())(x)  # d/dx x s(1.702 x)
        self.assertLessEqual(max_rel_err(derivative, s + 1.702 * x * s * (1 - s)), 1e-6)

    def test_the_layers_refuse_what_the_command_line_refuses(self):
        model = client_model(0, adapt=False)
        with self.assertRaisesRegex(TypeError, r"layer_class .*Identity.*: expected LoRALinear"):
            comp_lora.add_adapters(model, nn.Identity)
        self.assertIsInstance(model[0].q_proj, nn.Linear)
        refusals = ((dict(alpha=0), r"alpha=0: expected a finite number other than 0"),
                    (dict(r=0), r"r=0: expected a positive integer"),
                    (dict(dropout=1.0), r"dropout=1\.0: expected a number in \[0, 1\)"))
        for kwargs, message in refusals:
            with self.assertRaisesRegex(ValueError, rf"^0\.q_proj: {message}$"):
                comp_lora.add_adapters(model, LoRALinear, **kwargs)
        adapted = fill_b(client_model(0, "lora"))
        state = comp_lora.lora_state_dict(adapted)
        key = "1.v_proj.lora_A"
        before = {k: v.clone() for k, v in adapted.state_dict().items()}
        with_nan = {**state, key: torch.full_like(state[key], math.nan)}
        with self.assertRaisesRegex(ValueError, rf"^adapter tensor '{re.escape(key)}': holds NaN"):
            comp_lora.load_lora_state_dict(adapted, with_nan)
        self.assertTrue(all(torch.equal(before[k], v) for k, v in adapted.state_dict().items()))


# ------------------------------------------------------------------- text encoding and precision

class WithSyntheticData(unittest.TestCase):
    """Base of the tests that train: the synthetic dataset, written once per class into a temporary
    folder."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.root = write_synthetic(os.path.join(cls.tmp.name, "data"))

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()


class TestTextEncodingAndPrecision(WithSyntheticData):
    """Length-grouped text encoding, text-tower checkpointing, and the fp16 path (autocast +
    GradScaler) on CPU. The first two are our optimisations, each checked against the plain
    computation (@optimisation_test: a failure says it is not the formula's)."""

    PROMPTS = PROMPTS + ["a photo of a dog.", "a photo of a big red fire truck.",
                         "a photo of a cat.", "ok"]

    def full_context(self, model, tokens):
        """Text features over all 77 positions, as openai/CLIP computes them (no truncation, no
        groups)."""
        x = model.token_embedding(tokens) + model.positional_embedding
        x = model.ln_final(model.transformer(x))
        return x[torch.arange(len(tokens)), tokens.argmax(-1)] @ model.text_projection

    def output_weights(self, n):
        """Fixed random weights for a scalar loss of n text features."""
        generator = torch.Generator().manual_seed(0)
        return torch.randn(n, clip_model.TINY_CONFIG["embed_dim"], generator=generator)

    def text_gradients(self, model, encode, tokens, weights):
        model.zero_grad(set_to_none=True)
        out = encode(tokens)
        (out * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.detach(), grads

    @optimisation_test
    def test_length_groups_equal_full_context_outputs_and_gradients(self):
        tokens = clip_model.tokenize(self.PROMPTS)
        ends = tokens.argmax(-1)
        # one per length
        self.assertEqual(len(clip_model.length_groups(ends, 0)), len(set(ends.tolist())))
        self.assertEqual(len(clip_model.length_groups(ends, math.inf)), 1)  # one truncation
        model, layers = adapted("lora", ("q", "k", "v", "o"), encoder="text")
        randomize_b(layers)
        model.eval()  # no adapter dropout: masks of other shapes would draw other values
        weights = self.output_weights(len(tokens))
        full, full_grads = self.text_gradients(model, lambda t: self.full_context(model, t), tokens,
                                               weights)
        # lora_A and lora_B of q, k, v, o in 3 text blocks
        self.assertEqual(len(full_grads), 2 * 4 * 3)
        for cost in (0, None, math.inf):
            out, grads = self.text_gradients(
                model, lambda t: model.encode_text(t, group_cost=cost), tokens, weights)
            self.assertLessEqual(max_rel_err(out, full), 1e-6, cost)
            for name, grad in full_grads.items():
                self.assertLessEqual(max_rel_err(grads[name], grad), 1e-5, (cost, name))

    @optimisation_test
    def test_checkpointed_text_tower_gives_the_same_adapter_gradients(self):
        tokens = clip_model.tokenize(self.PROMPTS)
        model, layers = adapted("block", encoder="text")
        randomize_b(layers)
        model.train()  # adapter dropout active: the recomputation must draw the same masks
        weights = self.output_weights(len(tokens))

        def gradients(seed, checkpoint):
            """(adapter gradients, number of tensors saved for backward) of one seeded forward and
            backward."""
            saved = []

            def keep(tensor):
                saved.append(tensor.shape)
                return tensor
            torch.manual_seed(seed)
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
                _, grads = self.text_gradients(
                    model, lambda t: model.encode_text(t, checkpoint=checkpoint), tokens, weights)
            return grads, len(saved)

        plain, saved_plain = gradients(1, checkpoint=False)
        recomputed, saved_recomputed = gradients(1, checkpoint=True)
        self.assertLess(saved_recomputed, saved_plain / 4)  # the checkpoint is in effect
        self.assertEqual(plain.keys(), recomputed.keys())
        for name, grad in plain.items():
            self.assertLessEqual(max_rel_err(recomputed[name], grad), 1e-6, name)
        # another seed, other masks: the comparison above can fail
        other, _ = gradients(2, checkpoint=False)
        self.assertGreater(max(max_rel_err(other[n], g) for n, g in plain.items()), 1e-3)

    @optimisation_test
    def test_checkpointing_some_blocks_and_the_rule_for_how_many(self):
        tokens = clip_model.tokenize(self.PROMPTS)
        model, layers = adapted("lora", encoder="text")
        randomize_b(layers)
        model.train()
        weights = self.output_weights(len(tokens))
        # (gradients, tensors kept for backward) with 0, 1, 2 and all blocks checkpointed
        results = []
        for k in (0, 1, 2, True):
            kept = []

            def keep(tensor):  # what autograd saves for backward, counted
                kept.append(tensor)
                return tensor
            torch.manual_seed(1)
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
                _, grads = self.text_gradients(
                    model, lambda t: model.encode_text(t, checkpoint=k), tokens, weights)
            results.append((grads, len(kept)))
        counts = [kept for _, kept in results]
        self.assertEqual(counts, sorted(counts, reverse=True))
        self.assertEqual(len(set(counts)), 4)
        for k, (grads, _) in enumerate(results[1:], 1):
            for name, grad in results[0][0].items():
                self.assertLessEqual(max_rel_err(grads[name], grad), 1e-6, (k, name))
        # the rule: none while the estimate fits the budget, then more with more positions, at most
        # all
        layer_bytes = clip_model.TINY_CONFIG["transformer_width"] * 4
        values = clip_model.BLOCK_VALUES
        ends = torch.zeros(1000, 77, dtype=torch.long)
        ends[:, 9] = 49407  # 1,000 prompts of 10 positions
        # the budget: 500 prompts, BLOCK_VALUES x 3 blocks x 10 positions each
        budget = values * 3 * 10 * 500 * layer_bytes
        blocks = [clip_model.text_checkpoint_blocks(model, ends[:n], budget=budget)
                  for n in (500, 520, 1000)]
        self.assertEqual(blocks, [0, 1, 2])
        self.assertEqual(clip_model.text_checkpoint_blocks(model, ends, budget=0), 3)
        in_fp16 = clip_model.text_checkpoint_blocks(model, ends[:520], element_size=2,
                                                    budget=budget)
        self.assertEqual(in_fp16, 0)

    def test_precision_and_checkpoint_flags(self):
        cpu, cuda = torch.device("cpu"), torch.device("cuda")
        self.assertEqual(train.resolve_precision("auto", cpu), "fp32")
        self.assertEqual(train.resolve_precision("auto", cuda), "fp16")
        self.assertEqual(train.resolve_precision("bf16", cpu), "bf16")
        self.assertEqual(train.parse_args([]).precision, "auto")
        model, tokens = tiny(), torch.zeros(4, 77, dtype=torch.long)
        tokens[:, 8] = 49407
        with mock.patch.object(clip_model, "text_checkpoint_blocks", return_value=2) as rule:
            self.assertEqual(clip_model.text_checkpoint("auto", model, tokens, "fp16"), 2)
        rule.assert_called_once_with(model, tokens, element_size=2)
        self.assertIs(clip_model.text_checkpoint("on", model, tokens, "fp32"), True)
        self.assertIs(clip_model.text_checkpoint("off", model, tokens, "fp32"), False)

    def fp16_training(self, **scaler_options):
        """Train the tiny model for 4 iterations with --precision fp16 on CPU through train.train.
        Returns (losses printed, the GradScaler train.train made, adapters before, adapters
        after)."""
        dataset = data.build_dataset("eurosat", self.root, 4, 1)
        args = train.parse_args(["--backbone", "tiny", "--shots", "4", "--n_iters", "1",
                                 "--batch_size", "4", "--lr", "5e-3", "--workers", "0",
                                 "--print_every", "1", "--precision", "fp16"])
        torch.manual_seed(0)
        model, _ = clip_model.load("tiny")
        train.add_adapters(model, train.adapter_config(args))
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        scalers, real = [], torch.amp.GradScaler

        # the real GradScaler with the test's options, kept for inspection
        def make_scaler(*args, **kwargs):
            scalers.append(real(*args, **kwargs, **scaler_options))
            return scalers[-1]
        dtypes = []  # of the first q projection's output, to see that autocast is on
        model.visual.transformer.resblocks[0].attn.q_proj.base.register_forward_hook(
            lambda module, inputs, output: dtypes.append(output.dtype))
        with mock.patch.object(torch.amp, "GradScaler", make_scaler):
            _, printed = quiet(train.train, model, dataset, args, torch.device("cpu"),
                               train.run_config(args, torch.device("cpu")), train.Interrupts())
        self.assertEqual(set(dtypes), {torch.float16})
        progress = [line for line in printed.splitlines() if line.startswith("iter ")]
        losses = [float(line.split("  loss ")[1].split()[0]) for line in progress]
        after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.assertEqual(len(scalers), 1)
        return losses, scalers[0], before, after

    def test_fp16_training_on_cpu_updates_scaler_and_adapters(self):
        # The random tiny model's first gradients overflow fp16 at GradScaler's default scale 2^16
        # (each step is then skipped and the scale halved, as designed); from 2^8 every step fits
        # and is applied.
        losses, scaler, before, after = self.fp16_training(init_scale=2.0 ** 8)
        self.assertEqual(len(losses), 4)
        self.assertTrue(all(math.isfinite(loss) for loss in losses), losses)
        self.assertTrue(scaler.is_enabled())
        # each applied step counts; an overflow halves the scale and resets the count
        state = scaler.state_dict()
        self.assertEqual((state["scale"], state["_growth_tracker"]), (2.0 ** 8, 4))
        self.assertTrue(all(torch.isfinite(t).all() for t in after.values()))
        self.assertTrue(any(not torch.equal(before[n], after[n]) for n in before))

    def test_fp16_gradient_overflow_skips_the_step(self):
        # scaled gradients overflow fp16
        losses, scaler, before, after = self.fp16_training(init_scale=2.0 ** 100)
        self.assertTrue(all(math.isfinite(loss) for loss in losses), losses)
        self.assertEqual(scaler.get_scale(), 2.0 ** 96)  # halved at each of the 4 skipped steps
        self.assertTrue(all(torch.equal(before[n], after[n]) for n in before))


# ------------------------------------------------------------------------------------------ data.py

def reference_draw(split, shots, seed):
    """The CLIP-LoRA few-shot protocol restated: seed, then for val (min(shots, 4)) and then train,
    group by label in order of first appearance and random.sample per group (random.choices when
    the group is too small)."""
    random.seed(seed)

    def draw(entries, k):
        groups = {}
        for relative, label, _ in entries:
            groups.setdefault(label, []).append(relative)
        drawn = []
        for label, paths in groups.items():
            picked = random.sample(paths, k) if len(paths) >= k else random.choices(paths, k=k)
            drawn += [(path, label) for path in picked]
        return drawn

    val = draw(split["val"], min(shots, 4))
    return draw(split["train"], shots), val


def relative(items, image_dir):
    return [(os.path.relpath(path, image_dir), label) for path, label in items]


def touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").close()


def truncated_jpeg(path):
    """A JPEG cut in half, as an interrupted copy leaves it."""
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, "JPEG")
    with open(path, "wb") as f:
        f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])


def corrupted_png(path):
    """A PNG whose second IDAT chunk has a damaged type: PIL raises SyntaxError, not OSError, at
    decoding."""
    noise = torch.Generator().manual_seed(0)
    drawn = torch.randint(0, 256, (160 * 160 * 3,), generator=noise, dtype=torch.uint8)
    pixels = bytes(drawn.tolist())
    buffer = io.BytesIO()
    # noise: over 64 KiB, so several IDAT chunks
    Image.frombytes("RGB", (160, 160), pixels).save(buffer, "PNG")
    png = bytearray(buffer.getvalue())
    second = png.index(b"IDAT", png.index(b"IDAT") + 4)
    png[second + 1] ^= 0xFF
    with open(path, "wb") as f:
        f.write(png)


def tree_state(folder):
    """Every folder and file under `folder` with the file's bytes: equal states mean nothing was
    touched."""
    state = {}
    for directory, _, files in os.walk(folder):
        state[os.path.relpath(directory, folder)] = None
        for name in files:
            with open(os.path.join(directory, name), "rb") as f:
                state[os.path.relpath(os.path.join(directory, name), folder)] = f.read()
    return state


class TestData(unittest.TestCase):
    def test_the_readme_datasets_table_is_dataset_help(self):
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
            lines = f.read().splitlines()
        for name, layout in data.DATASET_HELP.items():
            self.assertIn(f"| `{name}` | {layout} |", lines,
                          f"README.md's Datasets table: the row of {name} differs from "
                          "data.DATASET_HELP, the text of its errors")

    def test_a_demo_folder_is_synced_before_it_takes_its_name(self):
        def write(folder):
            os.mkdir(os.path.join(folder, "images"))
            for name in ("a.png", "b.png"):
                with open(os.path.join(folder, "images", name), "wb") as f:
                    f.write(b"image")

        if not os.path.isdir("/proc/self/fd"):
            self.skipTest("needs /proc/self/fd to name a synced file")
        root = os.path.join(self.tmp, "synced")
        synced, real_fsync = [], os.fsync

        def fsync(fd):  # records the path synced
            synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
            real_fsync(fd)
        with mock.patch.object(os, "fsync", fsync):
            data.write_demo(root, {"test": 1}, write)
        # each under its temporary folder, before the rename gives it its name
        self.assertFalse([path for path in synced if path.startswith(root + os.sep)])
        staged = {os.path.relpath(path, self.tmp).partition(os.sep)[2] for path in synced}
        self.assertLessEqual({"images/a.png", "images/b.png", data._DEMO_MARK, "images"}, staged)
        self.assertTrue(os.path.isfile(os.path.join(root, "images", "a.png")))

    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        cls.tmp = cls._tmp.name
        cls.synthetic = write_synthetic(os.path.join(cls.tmp, "synthetic"), n_classes=5)
        # A split whose labels first appear out of order (2, 0, 1) and whose classes differ in size;
        # the draw reads no image, so the listed files are empty.
        cls.split_root = os.path.join(cls.tmp, "splitroot")
        sizes = {2: 9, 0: 12, 1: 7}
        classnames = ["AnnualCrop", "Forest", "SeaLake"]
        cls.split = {part: [[f"{label}/{part}_{i}.jpg", label, classnames[label]]
                            for label, n in sizes.items() for i in range(n)]
                     for part in ("train", "val", "test")}
        # interleaved: class 0 again at the end
        cls.split["train"].append(["0/late.jpg", 0, "AnnualCrop"])
        os.makedirs(os.path.join(cls.split_root, "eurosat", "2750"))
        with open(os.path.join(cls.split_root, "eurosat", "split_zhou_EuroSAT.json"), "w") as f:
            json.dump(cls.split, f)
        cls.image_dir = os.path.join(cls.split_root, "eurosat", "2750")
        for relative, _, _ in (item for part in cls.split.values() for item in part):
            touch(os.path.join(cls.image_dir, relative))

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    # ------------------------------------------------------------------ the few-shot draw

    def test_draw_equals_restated_clip_lora_protocol(self):
        for shots, seed in ((3, 0), (8, 1), (1, 5)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # shots=8: Forest has 7 train images (tested below)
                built = data.build_dataset("eurosat", self.split_root, shots, seed)
            train, val = reference_draw(self.split, shots, seed)
            self.assertEqual(relative(built.train, self.image_dir), train)
            self.assertEqual(relative(built.val, self.image_dir), val)
            self.assertEqual(len(built.test), len(self.split["test"]))

    def test_seed_changes_the_draw_and_repeats(self):
        first = data.build_dataset("eurosat", self.split_root, 4, 0)
        again = data.build_dataset("eurosat", self.split_root, 4, 0)
        other = data.build_dataset("eurosat", self.split_root, 4, 1)
        self.assertEqual(first.train, again.train)
        self.assertEqual(first.val, again.val)
        self.assertNotEqual(first.train, other.train)

    def test_fewer_images_than_shots_repeats_with_a_warning(self):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            built = data.build_dataset("eurosat", self.split_root, 10, 3)
        messages = [str(w.message) for w in caught]
        self.assertIn("class 'Forest' has 7 train images, fewer than 10: "
                      "drawing 10 with repetition (as CLIP-LoRA)", messages)
        self.assertTrue(any("'Sea or Lake' has 9 train images" in m for m in messages), messages)
        self.assertFalse(any("Annual Crop Land" in m for m in messages))  # 13 images: enough
        # val needs only min(10, 4) per class
        self.assertFalse(any(" val images" in m for m in messages))
        forest = [path for path, label in built.train if label == 1]
        # CLIP-LoRA's repeat=True: 10 draws with replacement from 7 images
        self.assertEqual(len(forest), 10)
        self.assertLess(len(set(forest)), 10)
        self.assertTrue(all(os.path.basename(os.path.dirname(path)) == "1" and "/train_" in path
                            for path in forest))
        expected, _ = reference_draw(self.split, 10, 3)
        self.assertEqual(relative(built.train, self.image_dir), expected)

    # ------------------------------------------------------------------ names, prompts, subsets

    def test_eurosat_classnames_and_prompts(self):
        built = data.build_dataset("eurosat", self.synthetic, 2, 0)
        self.assertEqual(built.classnames, ["Annual Crop Land", "Forest",
                                            "Herbaceous Vegetation Land", "Highway or Road",
                                            "Industrial Buildings"])
        self.assertEqual(built.template, ["a photo of a {}."])
        first_prompt = built.template[0].format(built.classnames[0])
        self.assertEqual(first_prompt, "a photo of a Annual Crop Land.")
        self.assertEqual(built.zeroshot_template, "a centered satellite photo of {}.")
        self.assertEqual(data.DATASETS["dtd"].zeroshot_template, "{} texture.")

    def test_base_new_subsample(self):
        everything = data.build_dataset("eurosat", self.synthetic, 2, 0)
        base = data.build_dataset("eurosat", self.synthetic, 2, 0, subsample="base")
        new = data.build_dataset("eurosat", self.synthetic, 2, 0, subsample="new")
        self.assertEqual(base.classnames, everything.classnames[:3])  # ceil(5 / 2) = 3 base classes
        self.assertEqual(new.classnames, everything.classnames[3:])
        self.assertEqual(sorted({label for _, label in base.test}), [0, 1, 2])
        self.assertEqual(sorted({label for _, label in new.test}), [0, 1])
        self.assertEqual((len(base.train), len(base.val), len(base.test)), (6, 6, 24))
        self.assertEqual((len(new.train), len(new.val), len(new.test)), (4, 4, 16))
        # subsampling comes after the draw: the kept items are the full draw's, relabelled
        self.assertEqual(new.train, [(p, label - 3) for p, label in everything.train if label >= 3])
        self.assertEqual(base.train, [(p, label) for p, label in everything.train if label < 3])

    # ------------------------------------------------------------------ other layouts

    def test_imagefolder_layout(self):
        # <root>/imagefolder, as every dataset
        built = data.build_dataset("imagefolder", self.synthetic, 3, 0)
        self.assertEqual(built.classnames[:2], ["annual crop land", "forest"])
        self.assertEqual(len(built.classnames), 5)
        self.assertEqual((len(built.train), built.val, len(built.test)), (15, [], 40))
        self.assertTrue(all(os.path.isabs(path) and os.path.exists(path) for path, _ in built.test))
        test_dir = os.path.join(self.synthetic, "imagefolder", "test", "")
        self.assertTrue(all(path.startswith(test_dir) for path, _ in built.test))
        evaluated = data.build_dataset("imagefolder", self.synthetic, 3, 0, flag="--eval_datasets",
                                       test_only=True)
        self.assertEqual((evaluated.classnames, evaluated.train, evaluated.val, evaluated.test),
                         (built.classnames, [], [], built.test))
        # the error names the flag that named the dataset, and the folder under the data root
        missing = f"--eval_datasets imagefolder: dataset folder {self.tmp}/imagefolder not found"
        self.assertDataError(missing, data.build_dataset, "imagefolder", self.tmp, 3, 0,
                             flag="--eval_datasets", test_only=True)

    def test_imagenet_r_uses_the_folders_present(self):
        root = os.path.join(self.tmp, "variants")
        base = os.path.join(root, "imagenet-rendition")
        names = {"n01": "goldfish", "n02": "great_white shark", "n03": "tench", "n04": "hen",
                 "n05": "ostrich"}
        for wnid in ("n04", "n02", "n05"):
            touch(os.path.join(base, "imagenet-r", wnid, "art_0.jpg"))
            touch(os.path.join(base, "imagenet-r", wnid, "art_1.png"))
        touch(os.path.join(base, "imagenet-r", "README.txt"))
        with open(os.path.join(base, "classnames.txt"), "w") as f:
            f.writelines(f"{wnid} {name}\n" for wnid, name in names.items())
        built = data.build_dataset("imagenet_r", root, 16, 0)
        self.assertEqual(built.classnames, ["great white shark", "hen", "ostrich"])
        self.assertEqual((built.train, built.val, len(built.test)), ([], [], 6))
        self.assertEqual(sorted({label for _, label in built.test}), [0, 1, 2])
        self.assertEqual([label for path, label in built.test if "/n05/" in path], [2, 2])

    def test_fgvc_and_imagenetv2_layouts(self):
        root = os.path.join(self.tmp, "more")
        fgvc = os.path.join(root, "fgvc_aircraft")
        os.makedirs(os.path.join(fgvc, "images"))
        variants = ["707-320", "A300B4", "Cessna 172"]  # variants.txt order gives the labels
        with open(os.path.join(fgvc, "variants.txt"), "w") as f:
            f.write("\n".join(variants) + "\n")
        split = {}
        for part, count in (("train", 6), ("val", 5), ("test", 2)):
            lines = [(f"{part}{k}{i}", name)
                     for k, name in enumerate(["Cessna 172", "707-320", "A300B4"])
                     for i in range(count)]
            with open(os.path.join(fgvc, f"images_variant_{part}.txt"), "w") as f:
                f.writelines(f"{image_id} {name}\n" for image_id, name in lines)
            split[part] = [[image_id + ".jpg", variants.index(name), name]
                           for image_id, name in lines]
            for image_id, _ in lines:
                touch(os.path.join(fgvc, "images", image_id + ".jpg"))
        built = data.build_dataset("fgvc", root, 3, 2)
        self.assertEqual(built.classnames, variants)
        self.assertEqual(built.zeroshot_template, "a photo of a {}, a type of aircraft.")
        self.assertEqual(built.test[0], (os.path.join(fgvc, "images", "test00.jpg"), 2))
        train, val = reference_draw(split, 3, 2)
        self.assertEqual(relative(built.train, os.path.join(fgvc, "images")), train)
        self.assertEqual(relative(built.val, os.path.join(fgvc, "images")), val)

        v2 = os.path.join(root, "imagenetv2")
        for label in range(3):
            touch(os.path.join(v2, "imagenetv2-matched-frequency-format-val", str(label), "a.jpeg"))
        with open(os.path.join(v2, "classnames.txt"), "w") as f:
            f.write("n09 tench\nn01 goldfish\nn05 great_white shark\n")
        built = data.build_dataset("imagenetv2", root, 1, 0)
        self.assertEqual(built.classnames, ["tench", "goldfish", "great white shark"])
        self.assertEqual(sorted(label for _, label in built.test), [0, 1, 2])
        self.assertTrue(all(path.endswith(f"/{label}/a.jpeg") for path, label in built.test))

    def test_imagenet_draw_equals_clip_lora(self):
        root = os.path.join(self.tmp, "inet")
        wnids = ["n0b", "n0a", "n0c"]
        for k, wnid in enumerate(wnids):
            for i in range(10 + k):
                touch(os.path.join(root, "imagenet", "images", "train", wnid, f"{wnid}_{i}.JPEG"))
            touch(os.path.join(root, "imagenet", "images", "val", wnid, f"val_{k}.JPEG"))
        with open(os.path.join(root, "imagenet", "classnames.txt"), "w") as f:
            f.write("n0a tench\nn0b goldfish\nn0c hen\n")
        built = data.build_dataset("imagenet", root, 2, 7)
        # restated: ImageFolder order (sorted wnids, sorted files), one sample per class
        random.seed(7)
        train, val = [], []
        for label, wnid in enumerate(sorted(wnids)):
            folder = os.path.join(root, "imagenet", "images", "train", wnid)
            files = sorted(os.path.join(folder, name) for name in os.listdir(folder))
            picked = random.sample(files, 2 + 2)
            train += [(path, label) for path in picked[:2]]
            val += [(path, label) for path in picked[2:]]
        self.assertEqual(built.classnames, ["tench", "goldfish", "hen"])
        self.assertEqual((built.train, built.val), (train, val))
        self.assertEqual(len(built.test), 3)

    # ------------------------------------------------------------------ user mistakes

    def test_a_folder_without_class_folders_is_one_line(self):
        root = os.path.join(self.tmp, "noclasses")
        for part in ("train", "val"):
            os.makedirs(os.path.join(root, "imagenet", part))
        no_classes = f"--dataset imagenet: folder {root}/imagenet/train holds no class folders"
        self.assertDataError(no_classes, data.build_dataset, "imagenet", root, 1, 1)

    def assertDataError(self, substring, call, *args, **kwargs):
        with self.assertRaises(data.DataError) as raised:
            call(*args, **kwargs)
        message = str(raised.exception)
        self.assertIn(substring, message)
        self.assertNotIn("\n", message)
        return message

    def test_bad_inputs_raise_one_line_data_errors(self):
        missing = os.path.join(self.tmp, "nowhere")
        self.assertDataError(f"data root {missing} does not exist",
                             data.build_dataset, "eurosat", missing, 4, 0)
        message = self.assertDataError("unknown dataset 'cifar'",
                                       data.build_dataset, "cifar", self.tmp, 4, 0)
        self.assertIn("eurosat, dtd, oxford_pets", message)
        self.assertIn("imagefolder", message)
        self.assertDataError(os.path.join(self.tmp, "dtd"),
                             data.build_dataset, "dtd", self.tmp, 4, 0)
        for bad in (0, -1, 2.5, "4", True):
            self.assertDataError("--shots", data.build_dataset, "eurosat", self.synthetic, bad, 0)
        self.assertDataError("subsample 'half'",
                             data.build_dataset, "eurosat", self.synthetic, 4, 0, "half")

    def test_missing_split_file_names_the_path(self):
        root = os.path.join(self.tmp, "nosplit")
        os.makedirs(os.path.join(root, "eurosat", "2750"))
        split = os.path.join(root, "eurosat", "split_zhou_EuroSAT.json")
        message = self.assertDataError(split, data.build_dataset, "eurosat", root, 4, 0)
        self.assertIn("see README.md, section Datasets", message)

    def test_class_without_images_is_named(self):
        root = os.path.join(self.tmp, "emptyclass")
        touch(os.path.join(root, "imagefolder", "train", "cat", "a.png"))
        dog = os.path.join(root, "imagefolder", "train", "dog")
        os.makedirs(dog)
        touch(os.path.join(root, "imagefolder", "test", "cat", "b.png"))
        self.assertDataError(f"--dataset imagefolder: class folder {dog}",
                             data.build_dataset, "imagefolder", root, 1, 0)
        split_root = os.path.join(self.tmp, "gap")
        os.makedirs(os.path.join(split_root, "eurosat", "2750"))
        with open(os.path.join(split_root, "eurosat", "split_zhou_EuroSAT.json"), "w") as f:
            json.dump({"train": [["a.jpg", 0, "Forest"]], "val": [],
                       "test": [["b.jpg", 0, "Forest"], ["c.jpg", 1, "River"]]}, f)
        self.assertDataError("class 'River' (label 1) has no images",
                             data.build_dataset, "eurosat", split_root, 1, 0)

    def test_undecodable_images_are_named(self):
        """Text posing as JPEG, a truncated JPEG and a PNG with a corrupted chunk (PIL:
        SyntaxError)."""
        broken = os.path.join(self.tmp, "broken.jpg")
        with open(broken, "w") as f:
            f.write("not an image")
        truncated = os.path.join(self.tmp, "truncated.jpg")
        corrupted = os.path.join(self.tmp, "corrupted.png")
        truncated_jpeg(truncated)
        corrupted_png(corrupted)
        for bad in (broken, truncated, corrupted):
            items = [(bad, 0)]
            images = data.ImageList(items, data.train_transform(32))
            self.assertDataError(f"cannot read image {bad}", images.__getitem__, 0)
            loader = data.make_loader(items, data.train_transform(32), batch_size=1, shuffle=False,
                                      workers=1)
            # re-raised from a worker, still one line
            self.assertDataError(f"cannot read image {bad}", list, loader)

    def test_listed_images_must_exist(self):
        root = os.path.join(self.tmp, "gone")
        shutil.copytree(os.path.join(self.synthetic, "eurosat"), os.path.join(root, "eurosat"))
        # Forest's last test image
        victim = os.path.join(root, "eurosat", "2750", "Forest", "Forest_20.jpg")
        os.remove(victim)
        self.assertDataError(f"--dataset eurosat: image {victim} is listed but does not exist",
                             data.build_dataset, "eurosat", root, 2, 0)

    def test_split_labels_must_be_non_negative_integers(self):
        root = os.path.join(self.tmp, "badlabels")
        os.makedirs(os.path.join(root, "eurosat", "2750"))
        for bad in (-1, 1.5, "0", True):
            with open(os.path.join(root, "eurosat", "split_zhou_EuroSAT.json"), "w") as f:
                json.dump({"train": [["a.jpg", 0, "Forest"], ["b.jpg", bad, "River"]], "val": [],
                           "test": [["c.jpg", 0, "Forest"]]}, f)
            self.assertDataError(f"train item 'b.jpg' has label {bad!r}",
                                 data.build_dataset, "eurosat", root, 1, 0)

    def test_synthetic_data_never_writes_into_an_existing_folder(self):
        mine = os.path.join(self.tmp, "mine")
        os.makedirs(os.path.join(mine, "eurosat"))
        with open(os.path.join(mine, "eurosat", "split_zhou_EuroSAT.json"), "w") as f:
            f.write("the user's real split")
        before = tree_state(mine)
        self.assertDataError(f"{mine} exists and is not a demo folder", write_synthetic, mine)
        self.assertEqual(tree_state(mine), before)
        # no temporary folder left
        self.assertFalse([name for name in os.listdir(self.tmp) if ".tmp" in name])
        # a complete demo folder of the same parameters is reused as it is; other parameters are
        # refused
        state = tree_state(self.synthetic)
        self.assertEqual(write_synthetic(self.synthetic, n_classes=5), self.synthetic)
        self.assertEqual(tree_state(self.synthetic), state)
        self.assertDataError("is not a demo folder", write_synthetic, self.synthetic, n_classes=3)

    # ------------------------------------------------------------------ transforms and loaders

    def test_train_transform_and_loader(self):
        image = Image.new("RGB", (50, 40), (200, 10, 10))
        self.assertEqual(tuple(data.train_transform(32)(image).shape), (3, 32, 32))
        built = data.build_dataset("eurosat", self.synthetic, 3, 0)

        def batches(seed):
            loader = data.make_loader(built.train, data.train_transform(24), batch_size=4,
                                      shuffle=True, workers=0, seed=seed)
            return list(loader)

        first = batches(0)
        self.assertEqual([len(labels) for _, labels in first], [4, 4, 4, 3])  # drop_last=False
        self.assertEqual(tuple(first[0][0].shape), (4, 3, 24, 24))
        drawn = torch.cat([labels for _, labels in first]).tolist()
        self.assertEqual(sorted(drawn), sorted(l for _, l in built.train))
        first_labels = [labels.tolist() for _, labels in first]
        self.assertEqual([labels.tolist() for _, labels in batches(0)], first_labels)
        self.assertNotEqual([labels.tolist() for _, labels in batches(1)], first_labels)

    def test_loaders_pickle_and_run_under_spawn(self):
        """Workers started by spawn (macOS, Windows) or forkserver (Linux from Python 3.14) unpickle
        what the demo's loaders hold (dataset, transform); what they load equals what workers=0
        loads. One worker over both datasets: a spawned worker imports torch afresh (seconds);
        --workers independence: TestTrain."""
        items = data.build_dataset("eurosat", self.synthetic, 2, 0).train
        loaders = [data.make_loader(items, transform, batch_size=4, shuffle=False, workers=0,
                                    seed=3)
                   for transform in (clip_model.preprocess(24), data.train_transform(24))]
        # index i: pass 0, image i
        both = torch.utils.data.ConcatDataset([loader.dataset for loader in loaders])
        spawned = torch.utils.data.DataLoader(both, batch_size=4, num_workers=1,
                                              multiprocessing_context="spawn", collate_fn=list)
        got = [sample for batch in spawned for sample in batch]
        expected = [sample for loader in loaders for images, labels in loader
                    for sample in zip(images, labels)]
        self.assertEqual(len(got), 2 * len(items))
        for (image, label), (want_image, want_label) in zip(got, expected):
            self.assertTrue(torch.equal(image, want_image) and label == want_label.item())

    def test_no_cuda_or_mps_reseeding_and_augmentations_unchanged(self):
        """torch.manual_seed reseeds CUDA and MPS too (fork_rng(devices=[]) restores neither):
        neither model building nor data loading may call it. The CPU streams stay those of
        torch.manual_seed, restated here."""
        items = data.build_dataset("eurosat", self.synthetic, 2, 0).train
        transform = data.train_transform(24)
        with mock.patch.object(torch.cuda, "manual_seed_all",
                               wraps=torch.cuda.manual_seed_all) as cuda, \
                mock.patch.object(torch.mps, "manual_seed", wraps=torch.mps.manual_seed) as mps:
            model = clip_model.build_random(3, **clip_model.TINY_CONFIG)
            loader = data.make_loader(items, transform, batch_size=4, shuffle=True, workers=0,
                                      seed=5)
            got = [list(loader) for _ in range(2)]
        self.assertEqual((cuda.call_count, mps.call_count), (0, 0))

        # data.py's documented rule: blake2b-64 of repr(numbers), halved to 63 bits
        def seed_of(*numbers):
            digest = hashlib.blake2b(repr(numbers).encode(), digest_size=8).digest()
            return int.from_bytes(digest, "little") >> 1

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            reference = clip_model.CLIP(**clip_model.TINY_CONFIG)
            for p, batches in enumerate(got):
                generator = torch.Generator().manual_seed(seed_of(5, p))
                order = torch.randperm(len(items), generator=generator).tolist()
                for b, (images, labels) in enumerate(batches):
                    batch = order[4 * b:4 * b + 4]  # the indices of batch b
                    expected = []
                    for index in batch:
                        torch.manual_seed(seed_of(5, p, index))
                        expected.append(transform(Image.open(items[index][0]).convert("RGB")))
                    self.assertTrue(torch.equal(images, torch.stack(expected)), (p, b))
                    self.assertEqual(labels.tolist(), [items[index][1] for index in batch])
        self.assertEqual(sum(len(batches) for batches in got), 2 * math.ceil(len(items) / 4))
        for name, tensor in reference.state_dict().items():
            self.assertTrue(torch.equal(model.state_dict()[name], tensor), name)

    def test_pin_memory_only_when_asked(self):
        items = data.build_dataset("eurosat", self.synthetic, 2, 0).train
        transform = data.train_transform(24)
        # a GPU machine, --device cpu
        with mock.patch.object(torch.cuda, "is_available", return_value=True):
            self.assertFalse(data.make_loader(items, transform, 4, True, 0).pin_memory)
        asked = data.make_loader(items, transform, 4, True, 0, pin_memory=True)
        self.assertTrue(asked.pin_memory)

    # --------------------------------------------------- ImageNet without classnames.txt, listings

    def test_vendored_imagenet_class_names(self):
        """imagenet_classes.txt: the 1,000 sorted ImageNet wnids, each with CLIP's name (openai/CLIP
        notebooks/Prompt_Engineering_for_ImageNet.ipynb, = CLIP-LoRA's imagenet_classes), unchanged
        since README's sha256."""
        with open(data.IMAGENET_CLASSES, "rb") as f:
            content = f.read()
        with open(os.path.join(HERE, "README.md")) as f:
            pattern = r"`imagenet_classes\.txt` holds[\s\S]*?sha256\s+`([0-9a-f]{64})`"
            recorded = re.search(pattern, f.read()).group(1)
        self.assertEqual(hashlib.sha256(content).hexdigest(), recorded)
        lines = [line.split(" ", 1) for line in content.decode().splitlines()]
        wnids, names = [wnid for wnid, _ in lines], [name for _, name in lines]
        self.assertEqual(len(lines), 1000)
        self.assertEqual(wnids, sorted(set(wnids)))
        # CLIP's list names two classes each "missile", "sunglasses"
        self.assertEqual([names[i] for i in (0, 1, 2, 407, 657, 744, 836, 837, 999)],
                         ["tench", "goldfish", "great white shark", "ambulance", "missile",
                          "missile", "sunglasses", "sunglasses", "toilet paper"])
        self.assertEqual((wnids[0], wnids[999]), ("n01440764", "n15075141"))
        self.assertFalse([name for name in names if "_" in name or name != name.strip()])

    def test_imagenet_in_clip_lora_layout(self):
        """imagenet/{train,val}/<wnid>/ without classnames.txt: CLIP-LoRA's class names
        (imagenet_classes[label], label = the sorted folder's index) and its draw
        (datasets/imagenet.py), restated here, on the 1,000 folders; then a few classes (named by
        wnid), a classnames.txt that wins, and folders no list names."""
        with open(data.IMAGENET_CLASSES) as f:
            wnids, clip_names = zip(*(line.split(" ", 1) for line in f.read().splitlines()))
        root = os.path.join(self.tmp, "clip_lora_imagenet")
        # 2 images per class: shots 1 + val 1 (a sample of 2 from 2 still draws an order)
        for wnid in wnids:
            os.makedirs(os.path.join(root, "imagenet", "train", wnid))
            for i in range(2):
                open(os.path.join(root, "imagenet", "train", wnid, f"{wnid}_{i}.JPEG"), "w").close()
        # test: any class will do
        touch(os.path.join(root, "imagenet", "val", wnids[0], "ILSVRC2012_val.JPEG"))
        built = data.build_dataset("imagenet", root, 1, 2)
        # CLIP-LoRA: ImageFolder (sorted folders, sorted files), per label random.sample(shots + 1)
        random.seed(2)
        train, val = [], []
        for label, wnid in enumerate(sorted(os.listdir(os.path.join(root, "imagenet", "train")))):
            folder = os.path.join(root, "imagenet", "train", wnid)
            files = sorted(os.path.join(folder, name) for name in os.listdir(folder))
            picked = random.sample(files, 1 + 1)
            train.append((picked[0], label))
            val.append((picked[1], label))
        self.assertEqual(built.classnames, list(clip_names))
        self.assertEqual((built.train, built.val, len(built.test)), (train, val, 1))
        # a draw, not the first files
        self.assertTrue(any(path.endswith("_1.JPEG") for path, _ in built.train))

        few = os.path.join(self.tmp, "few_imagenet")
        for wnid in ("n01443537", "n15075141", "n01440764"):
            touch(os.path.join(few, "imagenet", "train", wnid, "a.JPEG"))
            touch(os.path.join(few, "imagenet", "val", wnid, "b.JPEG"))
        self.assertEqual(data.build_dataset("imagenet", few, 1, 0, test_only=True).classnames,
                         ["tench", "goldfish", "toilet paper"])
        data.LISTINGS.clear()  # the files change below
        with open(os.path.join(few, "imagenet", "classnames.txt"), "w") as f:
            f.write("n01440764 tinca\nn01443537 carassius\nn15075141 paper\n")
        self.assertEqual(data.build_dataset("imagenet", few, 1, 0, test_only=True).classnames,
                         ["tinca", "carassius", "paper"])
        with open(os.path.join(few, "imagenet", "classnames.txt"), "w") as f:
            f.write("n01440764 tinca\nn01443537 carassius\n")
        data.LISTINGS.clear()
        self.assertDataError(f"--dataset imagenet: class folder n15075141 is not listed in "
                             f"{few}/imagenet/classnames.txt",
                             data.build_dataset, "imagenet", few, 1, 0)
        os.remove(os.path.join(few, "imagenet", "classnames.txt"))
        touch(os.path.join(few, "imagenet", "train", "n99999999", "a.JPEG"))
        self.assertDataError(f"class folder n99999999 is not listed in {data.IMAGENET_CLASSES}",
                             data.build_dataset, "imagenet", few, 1, 0,
                             flag="--eval_datasets", test_only=True)

    def test_files_are_listed_once_per_process(self):
        """The base and the new half of a base-to-new run and an evaluation-only use list the
        folders once; an evaluation-only use of ImageNet lists no train image."""
        data.LISTINGS.clear()
        with mock.patch("os.scandir", wraps=os.scandir) as scandir:
            base = data.build_dataset("imagefolder", self.synthetic, 2, 0, subsample="base")
            listed = scandir.call_count
            new = data.build_dataset("imagefolder", self.synthetic, 2, 0, subsample="new")
            data.build_dataset("imagefolder", self.synthetic, 2, 0, flag="--eval_datasets",
                               test_only=True)
            self.assertGreater(listed, 10)  # the folders of train and test, and their class folders
            self.assertEqual(scandir.call_count, listed)
        self.assertEqual((len(base.classnames), len(new.classnames)), (3, 2))
        root = os.path.join(self.tmp, "eval_imagenet")
        for wnid in ("n01440764", "n01443537"):
            for i in range(6):
                touch(os.path.join(root, "imagenet", "images", "train", wnid, f"{i}.JPEG"))
            touch(os.path.join(root, "imagenet", "images", "val", wnid, "v.JPEG"))

        def listed_in(part):  # the os.scandir calls so far inside `part`'s class folders
            return [call for call in scandir.call_args_list if f"{part}{os.sep}n0" in str(call)]
        with mock.patch("os.scandir", wraps=os.scandir) as scandir:
            evaluated = data.build_dataset("imagenet", root, 1, 0, flag="--eval_datasets",
                                           test_only=True)
            self.assertEqual(listed_in("train"), [])
            self.assertEqual(len(listed_in("val")), 2)
            # a full use after an evaluation-only one
            trained = data.build_dataset("imagenet", root, 2, 0)
            self.assertEqual(len(listed_in("train")), 2)
            listed = scandir.call_count
            again = data.build_dataset("imagenet", root, 2, 0, subsample="base")
            data.build_dataset("imagenet", root, 1, 0, flag="--eval_datasets", test_only=True)
            self.assertEqual(scandir.call_count, listed)
        self.assertEqual((evaluated.train, evaluated.test, len(trained.train)),
                         ([], trained.test, 4))
        self.assertEqual(again.train,
                         [(path, label) for path, label in trained.train if label == 0])


# --------------------------------------------------------------------------------------- train.py

def quiet(function, *args):
    """Run function(*args) with its printing captured; returns (result, printed text)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args), buffer.getvalue()


class TestTrain(WithSyntheticData):
    """train.py's runs end to end on the synthetic data, each into a folder of its own under the
    class's temporary folder (args(out=...)); what results.py does alone is TestResults'."""

    def args(self, *extra, out="out"):
        return train.parse_args(["--dataset", "eurosat", "--root", self.root, "--backbone", "tiny",
                                 "--shots", "4", "--n_iters", "8", "--lr", "5e-3", "--workers", "0",
                                 "--print_every", "8", "--device", "cpu",
                                 "--save_path", os.path.join(self.tmp.name, out), *extra])

    def test_each_method_learns_saves_and_reevaluates(self):
        for method in train.METHODS:
            args = self.args("--method", method, out=f"out_{method}")
            results, printed = quiet(train.run, args)
            self.assertIn("trainable params:", printed)
            progress = r"iter 32/32  loss \d+\.\d+  train acc \d+\.\d+  lr .* it/s  eta \d+s"
            self.assertRegex(printed, progress)
            self.assertGreater(results["accuracy"], 50.0, method)  # 4 classes: chance is 25%
            folder = train.run_dir(args)
            with open(os.path.join(folder, "results.json")) as f:
                saved = json.load(f)
            self.assertEqual(saved["accuracy"], results["accuracy"])
            self.assertEqual(saved["args"]["method"], method)
            for key in ("zero_shot_accuracy", "trainable_params", "train_seconds", "torch",
                        "device"):
                self.assertIn(key, saved)
            self.assertEqual(sorted(os.listdir(folder)), ["adapter.pt", "results.json"])
            evaluate = self.args("--method", method, "--eval_only", out=f"out_{method}")
            again, _ = quiet(train.run, evaluate)
            self.assertEqual(again["accuracy"], results["accuracy"], method)

    def test_same_seed_gives_bit_identical_adapters_and_summary_over_seeds(self):
        tensors = []
        for seed, out in (("1", "a"), ("1", "b"), ("2", "b")):
            args = self.args("--seed", seed, "--n_iters", "2", out=out)
            quiet(train.run, args)
            adapter = os.path.join(train.run_dir(args), "adapter.pt")
            tensors.append(torch.load(adapter, weights_only=True))
        first, second, other = (t["state_dict"] for t in tensors)
        self.assertTrue(all(torch.equal(first[k], second[k]) for k in first))
        self.assertFalse(all(torch.equal(first[k], other[k]) for k in first))
        with open(os.path.join(self.tmp.name, "b", "results.jsonl")) as f:
            mean, std = mean_std([json.loads(line)["accuracy"] for line in f])
        table, err = summarized(os.path.join(self.tmp.name, "b"))
        self.assertEqual(err, [])
        self.assertRegex(table, rf"\nEuroSAT +{mean:.2f} ± {std:.2f} \(2\)\n")

    def test_clip_lora_files_evaluate_like_ours(self):
        args = self.args("--n_iters", "1", out="ours")
        record, _ = quiet(train.run, args)
        metadata = {"r": 2, "alpha": 1, "encoder": "both", "params": ["q", "k", "v"],
                    "position": "all"}
        theirs = os.path.join(self.tmp.name, "theirs")
        path = results.clip_lora_path(theirs, "tiny", "eurosat", 4, 1)
        self.assertEqual(path, os.path.join(theirs, "tiny", "eurosat", "4shots", "seed1",
                                            "lora_weights.pt"))
        self.assertEqual(results.clip_lora_path("s", "ViT-B/16", "dtd", 16, 2, "f"),
                         "s/vitb16/dtd/16shots/seed2/f.pt")
        os.makedirs(os.path.dirname(path))
        torch.save(clip_lora_layout(self.saved_model(args), metadata), path)
        again, printed = quiet(train.run, self.args("--n_iters", "1", "--eval_only", out="theirs"))
        self.assertIn(f"evaluating CLIP-LoRA's adapter file {path}", printed)
        self.assertEqual(again["accuracy"], record["accuracy"])
        direct, _ = quiet(train.run, self.args("--n_iters", "1", "--adapter", path, out="nowhere"))
        self.assertEqual(direct["accuracy"], record["accuracy"])
        self.assertFalse(os.path.exists(os.path.join(self.tmp.name, "nowhere")))
        mismatches = ((["--r", "4"], r"metadata\['r'\] is 2"),
                      (["--alpha", "2"], r"metadata\['alpha'\] is 1"),
                      (["--encoder", "text"], r"metadata\['encoder'\]"),
                      (["--method", "comp"], "method is 'lora'"),
                      (["--position", "top3"], "metadata"),
                      (["--params", "q", "v"], r"metadata\['params'\]"))
        for flags, field in mismatches:
            refused = rf"^{re.escape(path)}: {field}.*, but this run has"
            with self.assertRaisesRegex(train.UserError, refused):
                other = self.args("--n_iters", "1", "--adapter", path, *flags, out="nowhere")
                quiet(train.run, other)
        self.assertFalse(os.path.exists(os.path.join(self.tmp.name, "nowhere")))

    def test_merged_export_loads_as_plain_clip(self):
        export = os.path.join(self.tmp.name, "merged.pt")
        args = self.args("--method", "comp", "--n_iters", "2", "--export_merged", export,
                         out="export")
        results, _ = quiet(train.run, args)
        model, preprocess = clip_model.load(export)
        exported = torch.load(export, weights_only=True)
        self.assertTrue(all(value.device.type == "cpu" for value in exported.values()))
        dataset = data.build_dataset("eurosat", self.root, 4, 1)
        cpu = torch.device("cpu")
        accuracy = train.accuracy(model, preprocess, args, cpu, dataset, dataset.template[0])
        self.assertAlmostEqual(accuracy, results["accuracy"], places=4)
        # the run evaluated through merged weights; the unmerged adapters give the same accuracy
        unmerged = train.accuracy(self.saved_model(args), preprocess, args, cpu, dataset,
                                  dataset.template[0])
        self.assertEqual(unmerged, results["accuracy"])

    def test_random_streams_belong_to_the_seed_alone(self):
        """The only reseeding of CUDA's and MPS's generators is the seed's own (data loading and
        model building touch none), and the initial adapters depend on the seed, never on
        --workers."""
        initial = {}
        for seed, workers in (("1", "0"), ("1", "2"), ("2", "0"), ("2", "2")):
            def record(model, *rest):  # train.train's stand-in: keeps the initial adapters
                initial.setdefault((seed, workers), comp_lora.lora_state_dict(model))
                return 0.0
            with mock.patch("torch.cuda.manual_seed_all") as cuda, \
                    mock.patch("torch.mps.manual_seed") as mps, \
                    mock.patch.object(train, "train", side_effect=record):
                quiet(train.run, self.args("--seed", seed, "--workers", workers,
                                           out=f"streams{seed}{workers}"))
            self.assertEqual([call.args for call in cuda.call_args_list], [(int(seed),)])
            self.assertEqual([call.args for call in mps.call_args_list], [(int(seed),)])
        for key in initial[("1", "0")]:
            self.assertTrue(torch.equal(initial[("1", "0")][key], initial[("1", "2")][key]), key)
            self.assertTrue(torch.equal(initial[("2", "0")][key], initial[("2", "2")][key]), key)
        seed_1, seed_2 = initial[("1", "0")], initial[("2", "0")]
        self.assertFalse(all(torch.equal(seed_1[k], seed_2[k]) for k in seed_1))

    def test_retention_and_base_to_new_against_independent_accuracies(self):
        args = self.args("--n_iters", "2", "--eval_datasets", "imagefolder", out="ret")
        # the real loading code: imagefolder under --root, as eurosat
        results, printed = quiet(train.run, args)
        self.assertIn("imagefolder: zero-shot plain", printed)
        self.assertIn("test accuracy: ", printed)
        self.assertIn(" (prompt 'a photo of a {}.')\n", printed)
        self.assertEqual(results["template"], "a photo of a {}.")
        plain, _ = clip_model.load("tiny")
        adapted_model = self.saved_model(args)
        folder = data.build_dataset("imagefolder", self.root, 4, 1)
        items, classnames, prompt = folder.test, folder.classnames, folder.zeroshot_template
        expected_plain = independent_accuracy(plain, items, classnames, prompt)
        expected_adapted = independent_accuracy(adapted_model, items, classnames, prompt)
        row = results["retention"]["imagefolder"]
        self.assertAlmostEqual(row["plain"], expected_plain, places=4)
        self.assertAlmostEqual(row["adapted"], expected_adapted, places=4)
        if expected_plain:
            self.assertAlmostEqual(row["retention"], expected_adapted / expected_plain, places=4)
        else:
            self.assertIsNone(row["retention"])

        args = self.args("--n_iters", "2", "--subsample", "base", out="b2n")
        results, printed = quiet(train.run, args)
        self.assertIn("2 classes", printed)
        adapted_model = self.saved_model(args)
        everything = data.build_dataset("eurosat", self.root, 4, 1)
        # CoCoOp: base = first half
        names, m = everything.classnames, math.ceil(len(everything.classnames) / 2)
        base = [(path, label) for path, label in everything.test if label < m]
        new = [(path, label - m) for path, label in everything.test if label >= m]
        expected_base = independent_accuracy(adapted_model, base, names[:m], "a photo of a {}.")
        expected_new = independent_accuracy(adapted_model, new, names[m:], "a photo of a {}.")
        self.assertAlmostEqual(results["base_accuracy"], expected_base, places=4)
        self.assertAlmostEqual(results["new_accuracy"], expected_new, places=4)
        both = expected_base + expected_new
        harmonic = 2 * expected_base * expected_new / both if both else 0.0
        self.assertAlmostEqual(results["harmonic_mean"], harmonic, places=4)

    def test_demo_reads_every_dataset_under_one_root_and_names_each_prompt(self):
        """--dataset toy_outline_count --eval_datasets toy_colour,toy_count without --root: all read
        from the toy world's folder, written on first use; each score names its prompt."""
        save_path = os.path.join(self.tmp.name, "demo_root")
        with mock.patch.dict(toy_world.PER_CLASS, {"train": 4, "val": 2, "test": 10}):
            record, printed = quiet(train.run, train.parse_args([
                "--dataset", "toy_outline_count", "--eval_datasets", "toy_colour,toy_count",
                "--backbone", "tiny", "--shots", "2", "--n_iters", "1", "--workers", "0",
                "--device", "cpu", "--save_path", save_path]))
        self.assertEqual(sorted(record["retention"]), ["toy_colour", "toy_count"])
        self.assertEqual(record["retention"]["toy_colour"]["template"], "a photo of a {} shape.")
        split = os.path.join(save_path, "toy_data", "toy_colour", "split.json")
        self.assertTrue(os.path.isfile(split))
        self.assertRegex(printed, r"test accuracy: [\d.]+ \(prompt 'a photo of \{\}\.'\)")
        self.assertRegex(printed, r"toy_colour: zero-shot plain [\d.]+  adapted [\d.]+  "
                                  r"retention \S+ \(prompt 'a photo of a \{\} shape\.', "
                                  r"this dataset's zero-shot prompt\)")

    def saved_model(self, args):
        """A fresh tiny CLIP with the adapter that `args`' run saved, in eval mode."""
        model, _ = clip_model.load("tiny")
        config = train.adapter_config(args)
        train.add_adapters(model, config)
        train.load_adapters(os.path.join(train.run_dir(args), "adapter.pt"), model, config)
        return model.eval()

    def test_nan_loss_stops_and_writes_nothing(self):
        args = self.args("--lr", "1e30", "--n_iters", "4", out="nan")
        with self.assertRaisesRegex(train.UserError, r"loss became nan at iteration \d+/16"):
            quiet(train.run, args)
        self.assertFalse(os.path.exists(train.run_dir(args)))

    def test_ctrl_c_and_sigterm_stop_with_the_shell_codes_and_resume_gives_the_same_bytes(self):
        save_path = os.path.join(self.tmp.name, "signals")
        # base[:-2] below leaves out --print_every 1
        base = ["--dataset", "eurosat", "--root", self.root, "--backbone", "tiny", "--shots", "4",
                "--workers", "0", "--lr", "5e-3", "--save_path", save_path, "--device", "cpu",
                "--batch_size", "4", "--print_every", "1"]
        earlier = self.args("--n_iters", "1", out="signals")
        quiet(train.run, earlier)
        before = tree_state(save_path)
        stops = ((signal.SIGINT, 130, ["--checkpoint_every", "0", "--overwrite"]),
                 (signal.SIGTERM, 143, ["--n_iters", "10", "--overwrite"]))
        for number, code, flags in stops:
            command = [sys.executable, os.path.join(HERE, "train.py"), *base, "--n_iters", "100000",
                       *flags]
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
            for line in process.stdout:  # wait until training runs
                if line.startswith("iter 3/"):
                    break
            process.send_signal(number)
            _, err = process.communicate(timeout=120)
            self.assertEqual(process.returncode, code, err)
            self.assertEqual(len(err.strip().splitlines()), 1, err)
            self.assertTrue(err.startswith("interrupted"), err)
            after = {k: v for k, v in tree_state(save_path).items()
                     if not k.endswith(results.CHECKPOINT)}
            self.assertEqual(after, before)  # earlier results unchanged
        # the SIGTERM run (another configuration: n_iters 10) left its checkpoint; --resume finishes
        # it
        self.assertRegex(err, r"^interrupted: the checkpoint at iteration \d+/40 is kept "
                              r"\(continue with --resume\)")
        checkpoint = train.run_dir(earlier) + results.CHECKPOINT
        self.assertTrue(os.path.isfile(checkpoint))
        resume = train.parse_args(base[:-2] + ["--n_iters", "10", "--resume", "--overwrite",
                                               "--workers", "2"])
        resumed, printed = quiet(train.run, resume)
        self.assertIn(f"resuming {checkpoint} at iteration", printed)
        self.assertFalse(os.path.exists(checkpoint))  # removed once the run is saved
        with open(os.path.join(train.run_dir(earlier), "adapter.pt"), "rb") as f:
            resumed_bytes = f.read()
        uninterrupted = os.path.join(self.tmp.name, "uninterrupted")
        whole = train.parse_args(base[:-2] + ["--n_iters", "10", "--save_path", uninterrupted])
        quiet(train.run, whole)
        with open(os.path.join(train.run_dir(whole), "adapter.pt"), "rb") as f:
            self.assertEqual(f.read(), resumed_bytes)

    def test_resume_at_any_iteration_is_bit_identical(self):
        """Stopped inside the first pass, exactly at a pass boundary and later (4 batches a pass),
        resumed with other --workers: the same adapter.pt bytes as the uninterrupted run."""
        flags = ["--n_iters", "3", "--batch_size", "4", "--dropout_rate", "0.5"]
        whole = self.args(*flags, out="whole")
        quiet(train.run, whole)
        with open(os.path.join(train.run_dir(whole), "adapter.pt"), "rb") as f:
            expected = f.read()
        real_step = torch.optim.lr_scheduler.CosineAnnealingLR.step
        for stop_at in (2, 4, 7):
            calls, interrupts = itertools.count(1), train.Interrupts()

            # a signal during iteration `stop_at` (the first call is the constructor's)
            def step(scheduler):
                if next(calls) == stop_at + 1:
                    interrupts.handle(signal.SIGTERM, None)
                return real_step(scheduler)
            args = self.args(*flags, out=f"stop{stop_at}")
            with mock.patch.object(torch.optim.lr_scheduler.CosineAnnealingLR, "step", step):
                with self.assertRaises(KeyboardInterrupt) as stopped:
                    quiet(train.run, args, interrupts)
            self.assertEqual(stopped.exception.args, (signal.SIGTERM,))
            self.assertIn(f"the checkpoint at iteration {stop_at}/12 is kept", interrupts.kept)
            self.assertFalse(os.path.exists(train.run_dir(args)))
            workers = "2" if stop_at % 2 else "0"
            resume = self.args(*flags, "--resume", "--workers", workers, out=f"stop{stop_at}")
            quiet(train.run, resume)
            with open(os.path.join(train.run_dir(args), "adapter.pt"), "rb") as f:
                self.assertEqual(f.read(), expected, stop_at)
        _, printed = quiet(train.run, self.args(*flags, "--resume", out="fresh"))
        self.assertIn("no checkpoint", printed)
        calls, interrupts = itertools.count(1), train.Interrupts()
        with mock.patch.object(torch.optim.lr_scheduler.CosineAnnealingLR, "step", step):
            with self.assertRaises(KeyboardInterrupt):
                quiet(train.run, self.args(*flags, out="other"), interrupts)
        # another configuration's checkpoint is refused, with --resume or without, until --overwrite
        # replaces it
        folder = train.run_dir(self.args(out="other"))
        before = tree_state(os.path.join(self.tmp.name, "other"))
        refused = (r"seed1.checkpoint.pt: a checkpoint with lr 0.005, this run has lr 0.001; "
                   r"choose another --save_path, or pass --overwrite")
        for resume in (["--resume"], []):
            with self.assertRaisesRegex(train.UserError, refused):
                quiet(train.run, self.args(*flags, "--lr", "1e-3", *resume, out="other"))
            self.assertEqual(tree_state(os.path.join(self.tmp.name, "other")), before)
        quiet(train.run, self.args(*flags, "--lr", "1e-3", "--overwrite", out="other"))
        self.assertFalse(os.path.exists(folder + results.CHECKPOINT))
        self.assertTrue(os.path.isfile(os.path.join(folder, "adapter.pt")))

    def test_every_path_is_checked_before_the_work_and_the_run_is_saved_before_the_export(self):
        """A read-only parent of an existing run folder (where the save stages) and a read-only log
        are found before any work; a failed export after training leaves the run saved; remove()
        never deletes a folder a user put in the place of a file."""
        args = self.args("--n_iters", "1", out="paths")
        folder = train.run_dir(args)
        os.makedirs(folder)
        parent, real = os.path.dirname(folder), tempfile.TemporaryFile

        def temporary_file(*a, **kw):  # root too: a refusal stands for a read-only folder
            if kw.get("dir") == parent:
                raise PermissionError(13, "Permission denied")
            return real(*a, **kw)
        work = mock.patch.object(data, "build_datasets", side_effect=AssertionError("work began"))
        with mock.patch("tempfile.TemporaryFile", temporary_file), work:
            denied = (rf"^output directory {re.escape(folder)}: cannot write in "
                      rf"{re.escape(parent)} \(Permission denied\)$")
            with self.assertRaisesRegex(train.UserError, denied):
                quiet(train.run, args)
        export = os.path.join(self.tmp.name, "paths", "merged.pt")
        real_save = results.save

        def save(path, *rest, **kw):
            if path == export:
                raise results.UserError(f"{export}: cannot write (No space left on device)")
            return real_save(path, *rest, **kw)
        with mock.patch.object(results, "save", save):
            saved = rf"No space left on device\) \(the run was saved in {re.escape(folder)}\)$"
            with self.assertRaisesRegex(train.UserError, saved):
                quiet(train.run, self.args("--n_iters", "1", "--export_merged", export,
                                           out="paths"))
        self.assertEqual(sorted(os.listdir(folder)), ["adapter.pt", "results.json"])
        log, real_access = os.path.join(args.save_path, "results.jsonl"), os.access  # appended to
        read_only = rf"^log {re.escape(log)}: cannot write \(a read-only file\)$"
        access = mock.patch("os.access", lambda path, mode: path != log and real_access(path, mode))
        with access, work:
            with self.assertRaisesRegex(train.UserError, read_only):
                quiet(train.run, args)
        mine = os.path.join(self.tmp.name, "paths", "mine.checkpoint.pt")
        os.makedirs(mine)
        open(os.path.join(mine, "notes.txt"), "w").close()
        results.remove(mine)
        self.assertTrue(os.path.isfile(os.path.join(mine, "notes.txt")))
        staged = os.path.join(self.tmp.name, "paths", ".run.tmp123")
        os.makedirs(os.path.join(staged, "inner"))
        results.remove(staged)
        self.assertFalse(os.path.exists(staged))

    def test_interrupted_says_what_is_on_disk(self):
        """A second SIGTERM inside a step names the checkpoint of an earlier step; a SIGTERM
        during the final save waits for it to end, and says the run was saved."""
        flags = ["--n_iters", "2", "--batch_size", "4", "--checkpoint_every", "2"]
        real_step = torch.optim.lr_scheduler.CosineAnnealingLR.step
        calls = itertools.count(1)

        handlers = []  # what train.main installs for SIGINT and SIGTERM

        def step(scheduler):  # two signals during iteration 3, after the checkpoint of iteration 2
            if next(calls) == 4:
                handlers[-1](signal.SIGTERM, None)
                handlers[-1](signal.SIGTERM, None)
            return real_step(scheduler)

        def main(argv):  # (exit code, stderr) of train.main, its handlers kept, not installed
            err = io.StringIO()
            with mock.patch("signal.signal", lambda number, handler: handlers.append(handler)), \
                    contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as code:
                quiet(train.main, argv)
            return code.exception.code, err.getvalue()
        save_path = os.path.join(self.tmp.name, "second_signal")
        argv = ["--dataset", "eurosat", "--root", self.root, "--backbone", "tiny", "--shots", "4",
                "--workers", "0", "--device", "cpu", "--save_path", save_path, *flags]
        with mock.patch.object(torch.optim.lr_scheduler.CosineAnnealingLR, "step", step):
            kept = ("interrupted: the checkpoint at iteration 2/8 is kept (continue with "
                    "--resume); earlier results are unchanged\n")
            self.assertEqual(main(argv), (143, kept))
        checkpoint = train.run_dir(train.parse_args(argv)) + results.CHECKPOINT
        self.assertEqual(torch.load(checkpoint, weights_only=True)["iteration"], 2)
        folder, real_replace = train.run_dir(train.parse_args(argv)), os.replace

        def replace(source, target):  # a SIGTERM just after the final save's rename
            real_replace(source, target)
            if target == folder:
                handlers[-1](signal.SIGTERM, None)
        with mock.patch("os.replace", replace):
            self.assertEqual(main([*argv, "--resume"]),
                             (143, f"interrupted: the run was saved in {folder}\n"))
        self.assertEqual(sorted(os.listdir(folder)), ["adapter.pt", "results.json"])
        self.assertFalse(os.path.exists(checkpoint))

    def test_every_reader_puts_back_a_run_folder_a_killed_save_set_aside(self):
        """A kill between the save's two renames leaves the run folder aside: --eval_only,
        --adapter, --skip_done and the summary each put it back first."""
        args = self.args("--n_iters", "1", out="aside")
        record, _ = quiet(train.run, args)
        folder = train.run_dir(args)
        dead = 2 ** 22 + 1  # above any system's largest pid: the save that set it aside is gone
        cell = f"{record['accuracy']:.2f} ± 0.00 (1)"  # the run in a summary table

        def run(*flags, out="aside"):  # (record, printed)
            return quiet(train.run, self.args("--n_iters", "1", *flags, out=out))
        readers = [(lambda: run("--eval_only")[0]["accuracy"], record["accuracy"]),
                   (lambda: run("--adapter", os.path.join(folder, "adapter.pt"),
                                out="none")[0]["accuracy"], record["accuracy"]),
                   (lambda: run("--skip_done")[1], f"done: {folder}\n"),
                   (lambda: cell in results.summarize(args.save_path), True)]
        for reader, expected in readers:
            os.rename(folder, os.path.join(os.path.dirname(folder), f".seed1.old{dead}"))
            with contextlib.redirect_stderr(io.StringIO()) as err:
                self.assertEqual(reader(), expected)
            self.assertEqual(err.getvalue(), f"recovered {folder}: a save was interrupted; the "
                                             "previous run is back in place\n")
            self.assertEqual(sorted(os.listdir(folder)), ["adapter.pt", "results.json"])

    def test_a_checkpoint_holds_its_device_stream_and_the_time_so_far(self):
        flags = ["--n_iters", "3", "--batch_size", "4", "--print_every", "1"]
        args = self.args(*flags, out="device")
        real_step = torch.optim.lr_scheduler.CosineAnnealingLR.step
        calls, interrupts = itertools.count(1), train.Interrupts()

        def step(scheduler):  # a signal during iteration 2 (the first call is the constructor's)
            if next(calls) == 3:
                interrupts.handle(signal.SIGTERM, None)
            return real_step(scheduler)
        with mock.patch.object(torch.optim.lr_scheduler.CosineAnnealingLR, "step", step):
            with self.assertRaises(KeyboardInterrupt):
                quiet(train.run, args, interrupts)
        path = train.run_dir(args) + results.CHECKPOINT
        state = torch.load(path, weights_only=True)
        # the run device's stream only (none of its own on the CPU): any machine can resume it
        self.assertEqual(sorted(state["rng"]), ["device", "device_state", "python", "torch"])
        self.assertEqual((state["rng"]["device"], state["rng"]["device_state"]), ("cpu", None))
        torch.save(dict(state, rng=dict(state["rng"], device="cuda")), path)
        other_device = (r"written by a run on cuda, this run is on cpu; resume with "
                        r"--device cuda, or run without --resume")
        with self.assertRaisesRegex(train.UserError, other_device):
            quiet(train.run, self.args(*flags, "--resume", out="device"))
        torch.save(dict(state, seconds=1000.0), path)  # as if the first part had taken 1000 s
        record, printed = quiet(train.run, self.args(*flags, "--resume", out="device"))
        self.assertGreaterEqual(record["train_seconds"], 1000)
        first = next(line for line in printed.splitlines() if line.startswith("iter 3/12"))
        self.assertGreaterEqual(int(first.rpartition("eta ")[2][:-1]), 9 * 1000 / 3)

    @unittest.skipUnless(torch.cuda.is_available(), "needs a CUDA device")
    def test_cuda_run_saves_cpu_tensors_and_a_seed_fixes_the_initial_adapters(self):
        initial = []
        with mock.patch.object(train, "train", side_effect=lambda model, *rest: initial.append(
                comp_lora.lora_state_dict(model)) or 0.0):
            for out in ("cuda_a", "cuda_b"):
                quiet(train.run, self.args("--device", "cuda", "--workers", "2", out=out))
        self.assertTrue(all(torch.equal(initial[0][k], initial[1][k]) for k in initial[0]))
        args = self.args("--device", "cuda", "--n_iters", "2",
                         "--export_merged", os.path.join(self.tmp.name, "m.pt"), out="cuda_run")
        record, _ = quiet(train.run, args)
        self.assertEqual(record["config"]["precision"], "fp16")
        # where they were saved
        saved = torch.load(os.path.join(train.run_dir(args), "adapter.pt"), weights_only=True)
        merged = torch.load(os.path.join(self.tmp.name, "m.pt"), weights_only=True)
        self.assertEqual({v.device.type for v in [*saved["state_dict"].values(), *merged.values()]},
                         {"cpu"})

    def test_skip_done_exits_before_loading_anything(self):
        args = self.args("--n_iters", "1", out="done")
        quiet(train.run, args)
        with mock.patch.object(clip_model, "load", side_effect=AssertionError("loaded")), \
                mock.patch.object(data, "build_dataset", side_effect=AssertionError("read data")):
            skip = self.args("--n_iters", "1", "--skip_done", out="done")
            result, printed = quiet(train.run, skip)
            self.assertIsNone(result)
            self.assertEqual(printed, f"done: {train.run_dir(args)}\n")
            # another configuration is not done
            other = self.args("--n_iters", "2", "--skip_done", "--overwrite", out="done")
            with self.assertRaisesRegex(AssertionError, "read data"):
                quiet(train.run, other)

    def test_torn_log_line_and_huge_results_file(self):
        args = self.args("--n_iters", "1", out="torn")
        os.makedirs(args.save_path)
        with open(os.path.join(args.save_path, "results.jsonl"), "w") as f:
            f.write('{"accuracy": 1')  # a crash of an older version, a full disk, a hand edit
        quiet(train.run, args)
        with open(os.path.join(args.save_path, "results.jsonl")) as f:
            lines = f.read().splitlines()
        self.assertEqual(lines[0], '{"accuracy": 1')
        self.assertEqual(json.loads(lines[1])["config"]["dataset"], "eurosat")
        huge = os.path.join(args.save_path, "copy", "results.json")
        os.makedirs(os.path.dirname(huge))
        with open(huge, "wb") as f:
            f.truncate(results.MAX_RESULTS_BYTES + 1)  # sparse: a large file without the disk space
        with mock.patch("json.loads", wraps=json.loads) as loads:
            table, err = summarized(args.save_path)
        self.assertEqual(loads.call_count, 1)  # the good file only
        self.assertEqual(err, [f"skipped {huge}: {results.MAX_RESULTS_BYTES + 1:,d} bytes, "
                               f"more than a results file holds ({results.MAX_RESULTS_BYTES:,d}); "
                               "not read"])

    def test_fp16_skips_a_non_finite_loss_and_stops_after_a_run_of_them(self):
        real = F.cross_entropy
        cases = (("fp16", {2}, None),
                 ("fp32", {2}, "loss became nan at iteration 2/8"),
                 ("fp16", {2, 3, 4}, r"loss became nan at iteration 4/8 \(3 steps in a row\)"))
        for precision, nan_at, outcome in cases:
            calls = itertools.count(1)

            def loss(*args, **kwargs):
                value = real(*args, **kwargs)
                return value * math.nan if next(calls) in nan_at else value
            args = self.args("--n_iters", "2", "--precision", precision,
                             out=f"nan{precision}{len(nan_at)}")
            with mock.patch.object(train.F, "cross_entropy", loss), \
                    mock.patch.object(train, "MAX_SKIPPED_STEPS", 3):
                if outcome:
                    with self.assertRaisesRegex(train.UserError, outcome):
                        quiet(train.run, args)
                else:
                    results_, printed = quiet(train.run, args)
                    self.assertIn("iter 8/8", printed)

    def test_other_configuration_is_refused_and_overwrite_replaces(self):
        first = self.args("--n_iters", "1", out="identity")
        quiet(train.run, first)
        folder = train.run_dir(first)
        before = tree_state(os.path.dirname(folder))
        changes = (("--r", "4", "r 2"), ("--lr", "1e-3", "lr 0.005"),
                   ("--encoder", "text", "encoder"), ("--position", "top3", "position"),
                   ("--params", "q", "params"))
        for flag, value, field in changes:
            with self.assertRaisesRegex(train.UserError, rf"holds a run with {field}.*--overwrite"):
                quiet(train.run, self.args("--n_iters", "1", flag, value, out="identity"))
            self.assertEqual(tree_state(os.path.dirname(folder)), before)
        # the same configuration replaces
        quiet(train.run, self.args("--n_iters", "1", out="identity"))
        overwrite = self.args("--n_iters", "1", "--r", "4", "--overwrite", out="identity")
        results, _ = quiet(train.run, overwrite)
        with open(os.path.join(folder, "results.json")) as f:
            self.assertEqual(json.load(f)["config"]["r"], 4)
        self.assertEqual(results["config"]["r"], 4)
        with open(os.path.join(self.tmp.name, "identity", "results.jsonl")) as f:
            self.assertEqual([json.loads(line)["config"]["r"] for line in f], [2, 2, 4])

    def test_disk_full_during_a_run_is_one_line_and_keeps_earlier_results(self):
        first = self.args("--n_iters", "1", out="diskfull")
        quiet(train.run, first)
        before = tree_state(first.save_path)
        with mock.patch("os.fsync", side_effect=OSError(28, "No space left on device")):
            full = r"seed1/adapter\.pt: cannot write \(No space left on device\)"
            with self.assertRaisesRegex(train.UserError, full):
                quiet(train.run, self.args("--n_iters", "1", out="diskfull"))
        self.assertEqual(tree_state(first.save_path), before)

    def test_worker_count_does_not_change_the_adapter(self):
        tensors = []
        for workers in ("0", "2"):
            args = self.args("--n_iters", "2", "--workers", workers, out=f"workers{workers}")
            quiet(train.run, args)
            saved = torch.load(os.path.join(train.run_dir(args), "adapter.pt"), weights_only=True)
            tensors.append(saved["state_dict"])
        self.assertEqual(list(tensors[0]), list(tensors[1]))
        self.assertTrue(all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0]))
        self.assertTrue(any(tensors[0][k].abs().sum() > 0 for k in tensors[0]
                            if k.endswith("lora_B")))

    def test_eval_only_exports_the_merged_model(self):
        args = self.args("--n_iters", "1", out="evalexport")
        trained, _ = quiet(train.run, args)
        export = os.path.join(self.tmp.name, "evalexport", "merged.pt")
        before = tree_state(args.save_path)
        evaluate = self.args("--n_iters", "1", "--eval_only", "--export_merged", export,
                             out="evalexport")
        again, _ = quiet(train.run, evaluate)
        self.assertEqual(again["accuracy"], trained["accuracy"])
        after = tree_state(args.save_path)
        self.assertEqual(set(after) - set(before), {"merged.pt"})
        self.assertEqual({k: v for k, v in after.items() if k != "merged.pt"}, before)
        model, preprocess = clip_model.load(export)
        dataset = data.build_dataset("eurosat", self.root, 4, 1)
        exported = independent_accuracy(model, dataset.test, dataset.classnames, "a photo of a {}.")
        self.assertAlmostEqual(exported, trained["accuracy"], places=4)

    def test_two_runs_and_two_toy_worlds_at_once_all_succeed(self):
        save_path = os.path.join(self.tmp.name, "twice")
        command = [sys.executable, os.path.join(HERE, "train.py"), "--device", "cpu",
                   "--dataset", "eurosat", "--root", self.root, "--backbone", "tiny",
                   "--shots", "2", "--n_iters", "1", "--workers", "0", "--save_path", save_path]
        toy = os.path.join(self.tmp.name, "toy")  # the demo's data folder, made by both at once
        writer = ("import sys, toy_world; print(toy_world.write_datasets(sys.argv[1], "
                  "{'train': 2, 'val': 1, 'test': 2}))")
        processes = [subprocess.Popen(command + ["--seed", seed], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for seed in ("1", "2")]
        processes += [subprocess.Popen([sys.executable, "-c", writer, toy], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True, cwd=HERE)
                      for _ in range(2)]
        errors = []
        for process in processes:
            out, err = process.communicate(timeout=120)
            self.assertEqual(process.returncode, 0, err)
            errors.append(err)
        self.assertEqual(out.strip(), toy)
        with open(os.path.join(save_path, "results.jsonl")) as f:
            lines = f.readlines()
        seeds = sorted(json.loads(line)["args"]["seed"] for line in lines)
        self.assertEqual(seeds, [1, 2], "".join(lines) + "".join(errors))
        self.assertEqual(sorted(os.listdir(save_path)), ["eurosat", "results.jsonl"])
        # no leftover
        self.assertFalse([name for name in os.listdir(self.tmp.name) if name.startswith(".toy")])
        self.assertEqual(len(data.build_dataset("toy_colour", toy, 1, 0).test), 2 * 8)


def independent_accuracy(model, items, classnames, template):
    """Top-1 accuracy (%) computed here from the images, without train.py's evaluation code."""
    _, preprocess = clip_model.load("tiny")
    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(path)) for path, _ in items])
        image = F.normalize(model.encode_image(images), dim=-1)
        tokens = clip_model.tokenize([template.format(c) for c in classnames])
        text = F.normalize(model.encode_text(tokens), dim=-1)
    predicted = (image @ text.t()).argmax(dim=-1)
    return 100.0 * sum(int(p) == label for p, (_, label) in zip(predicted, items)) / len(items)


class TestCommandLine(unittest.TestCase):
    """User mistakes through the real command line, each in its own process: the exit code, one
    stderr line holding the expected fragment, no traceback, and nothing created, changed or
    removed under the test folder."""

    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        cls.tmp = tmp = cls._tmp.name
        cls.root = write_synthetic(os.path.join(tmp, "data"))
        cls.cwd = os.path.join(tmp, "cwd")  # the default --save_path "out" lands in here
        os.makedirs(cls.cwd)
        with open(os.path.join(tmp, "notweights.pt"), "w") as f:
            f.write("not weights")
        state = tiny().state_dict()
        state["visual.ln_post.weight"] = torch.ones(5)
        torch.save(state, os.path.join(tmp, "badshape.pt"))
        open(os.path.join(tmp, "afile"), "w").close()
        os.symlink(os.path.join(tmp, "adapter_r4.pt"), os.path.join(tmp, "link.pt"))
        os.makedirs(os.path.join(tmp, "badcheckpoint", "eurosat", "lora", "4shots"))
        torn = os.path.join(tmp, "badcheckpoint", "eurosat", "lora", "4shots",
                            "seed1.checkpoint.pt")
        with open(torn, "w") as f:
            f.write("torn")
        os.makedirs(os.path.join(tmp, "saved"))
        open(os.path.join(tmp, "saved", "results.jsonl"), "w").close()
        os.makedirs(os.path.join(tmp, "empty"))
        os.makedirs(os.path.join(tmp, "nosplit", "eurosat", "2750"))
        os.makedirs(os.path.join(tmp, "mine"))
        with open(os.path.join(tmp, "mine", "notes.txt"), "w") as f:
            f.write("the user's own file")
        cls.bad_data("badlabel", lambda split, image_dir: split["train"][0].__setitem__(1, -1))
        for split_name in ("train", "test"):
            for kind, write in (("truncated", truncated_jpeg), ("corrupted", corrupted_png)):
                cls.bad_data(f"{kind}_{split_name}", cls.bad_image(split_name, kind, write))
        # a saved run with r 2, and adapter files for a default-flag tiny run
        args = train.parse_args(["--backbone", "tiny", "--dataset", "eurosat", "--shots", "4",
                                 "--n_iters", "1", "--save_path", os.path.join(tmp, "saved")])
        folder = train.run_dir(args)
        os.makedirs(folder)
        with open(os.path.join(folder, "results.json"), "w") as f:
            json.dump({"config": train.run_config(args, torch.device("cpu")), "accuracy": 50.0}, f)
        torch.save({}, os.path.join(folder, "adapter.pt"))
        config = train.adapter_config(args)
        model, _ = adapted("lora")
        tensors = comp_lora.lora_state_dict(model)
        first = next(iter(tensors))
        comp = train.parse_args(["--backbone", "tiny", "--dataset", "eurosat", "--shots", "4",
                                 "--n_iters", "1", "--method", "comp"])
        other = dict(train.run_config(comp, torch.device("cpu")), seed=1)
        checkpoints = {"othercheckpoint": {"config": other, "iteration": 2,
                                           "rng": {"device": "cpu"}},
                       "adaptercheckpoint": {"config": config, "state_dict": tensors},
                       "foldercheckpoint": None}
        for name, content in checkpoints.items():  # where a run keeps its checkpoint
            path = os.path.join(tmp, name, "eurosat", "lora", "4shots", "seed1.checkpoint.pt")
            os.makedirs(path if content is None else os.path.dirname(path))
            if content is None:  # a user's folder, with a file of theirs in it
                open(os.path.join(path, "notes.txt"), "w").close()
            else:
                torch.save(content, path)
        os.makedirs(os.path.join(tmp, "folderlog", "results.jsonl"))
        adapter_files = {
            "extra": {"config": config,
                      "state_dict": {**tensors, "visual.ln_post.weight": torch.ones(128)}},
            "shape": {"config": config, "state_dict": {**tensors, first: torch.zeros(3, 3)}},
            "notdict": {"config": "lora", "state_dict": tensors},
            "r4": {"config": dict(config, r=4), "state_dict": tensors}}
        for name, content in adapter_files.items():
            torch.save(content, os.path.join(tmp, f"adapter_{name}.pt"))

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    @classmethod
    def bad_data(cls, name, change):
        """A copy of the synthetic EuroSAT whose split (and images) `change(split, image_dir)`
        spoils."""
        root = os.path.join(cls.tmp, name)
        shutil.copytree(os.path.join(cls.root, "eurosat"), os.path.join(root, "eurosat"))
        path = os.path.join(root, "eurosat", "split_zhou_EuroSAT.json")
        with open(path) as f:
            split = json.load(f)
        change(split, os.path.join(root, "eurosat", "2750"))
        with open(path, "w") as f:
            json.dump(split, f)

    @staticmethod
    def bad_image(split_name, kind, write):
        def file_number(item):  # ["Forest/Forest_13.jpg", label, name] -> 13
            return int(item[0].rsplit("_", 1)[1][:-4])

        def change(split, image_dir):
            if split_name == "train":  # keep 4 per class, so that --shots 4 draws the bad one
                split["train"] = [item for item in split["train"]
                                  if file_number(item) % 8 in (1, 2, 3, 4)]
            item = split[split_name][1]
            item[0] = item[0][:-4] + (".png" if kind == "corrupted" else ".jpg")
            write(os.path.join(image_dir, item[0]))
        return change

    def cases(self):
        t = self.tmp
        dataset = lambda name: ["--root", os.path.join(t, name)]
        adapter = lambda name: ["--adapter", os.path.join(t, f"adapter_{name}.pt")]
        return [  # (extra arguments, expected fragment of the message[, exit code])
            (["--method", "dora"], "--method 'dora': expected one of lora, comp, block"),
            (["--dataset", "mnist"], "--dataset 'mnist': expected one of eurosat, dtd"),
            (["--eval_datasets", "dtd,mnist"], "--eval_datasets 'mnist': expected one of"),
            (["--dataset", "imagenet_a"], "--dataset imagenet_a: evaluation only (no train split)"),
            (["--shots", "0"], "--shots 0: expected a positive integer"),
            (["--shots", "four"], "argument --shots: invalid int value: 'four'", 2),
            (["--n_iters", "-3"], "--n_iters -3: expected a positive integer"),
            (["--batch_size", "0"], "--batch_size 0: expected a positive integer"),
            (["--r", "0"], "--r 0: expected a positive integer"),
            (["--blocks", "0"], "--blocks 0: expected a positive integer"),
            (["--seed", "-1"], "--seed -1: expected an integer from 0 to 4294967295"),
            (["--seed", "99999999999999999999999"],
             "--seed 99999999999999999999999: expected an integer from 0"),
            (["--lr", "nan"], "--lr nan: expected a positive number"),
            (["--lr", "-1"], "--lr -1.0: expected a positive number"),
            (["--lr", "inf"], "--lr inf: expected a positive number"),
            (["--alpha", "0"], "--alpha 0.0: expected a finite number other than 0"),
            (["--dropout_rate", "1"], "--dropout_rate 1.0: expected a number in [0, 1)"),
            (["--comp_ratio", "1.5"], "--comp_ratio 1.5: expected a number in [0, 1)"),
            (["--comp_ratio", "nan"], "--comp_ratio nan: expected a number in [0, 1)"),
            (["--params", "q", "q"], "--params q q: a projection named twice"),
            (["--params", "q", "x"], "argument --params: invalid choice: 'x'", 2),
            (["--position", "middle"], "argument --position: invalid choice: 'middle'", 2),
            (["--workers", "-1"], "--workers -1: expected 0 or more"),
            (["--device", "cuda"], "--device cuda: no CUDA device is available here"),
            (["--device", "cuda:3"], "--device cuda:3: no CUDA device is available here"),
            (["--device", "tpu"], "--device 'tpu': expected cpu, cuda, cuda:N or mps"),
            (["--backbone", os.path.join(t, "missing.pt")],
             f"--backbone '{t}/missing.pt': expected one of ['ViT-B/32'"),
            (["--backbone", os.path.join(t, "notweights.pt")],
             f"{t}/notweights.pt: neither a TorchScript archive"),
            (["--backbone", os.path.join(t, "badshape.pt")],
             f"{t}/badshape.pt: tensor shapes do not fit one CLIP"),
            (dataset("nowhere"), f"data root {t}/nowhere does not exist"),
            (dataset("nosplit"), f"file {t}/nosplit/eurosat/split_zhou_EuroSAT.json not found"),
            (dataset("badlabel"), "has label -1; expected an integer >= 0"),
            (dataset("truncated_test"), f"cannot read image {t}/truncated_test/eurosat/2750/"),
            (dataset("corrupted_test"), "(SyntaxError: broken PNG file"),
            (dataset("truncated_train"), f"cannot read image {t}/truncated_train/eurosat/2750/"),
            (dataset("corrupted_train") + ["--workers", "1"], "(SyntaxError: broken PNG file"),
            (["--method", "block", "--blocks", "7"],
             "--blocks 7: visual.transformer.resblocks.0.attn.q_proj: input size "
             "128 is not divisible by blocks=7"),
            (["--save_path", os.path.join(t, "afile", "out")],
             f"output directory {t}/afile/out/eurosat/lora/4shots/seed1: "
             f"cannot write ({t}/afile is a file)"),
            (["--save_path", os.path.join(t, "saved"), "--r", "4"],
             "seed1 holds a run with r 2, this run has r 4; "
             "choose another --save_path, or pass --overwrite"),
            (["--save_path", os.path.join(t, "saved"), "--eval_only"],
             f"{t}/saved/eurosat/lora/4shots/seed1/adapter.pt: "
             "not an adapter file of train.py or CLIP-LoRA"),
            (["--eval_only"], "out/eurosat/lora/4shots/seed1/adapter.pt: no adapter file"),
            (adapter("missing"), f"--adapter {t}/adapter_missing.pt: no such file"),
            (adapter("extra"), "unexpected tensor 'visual.ln_post.weight'"),
            (adapter("shape"), "has shape (3, 3), expected (2, 128)"),
            (adapter("notdict"), "not an adapter file of train.py or CLIP-LoRA"),
            (adapter("r4"), "adapter r is 4, but this run has r 2"),
            (["--export_merged", os.path.join(t, "nofolder", "m.pt")],
             f"--export_merged {t}/nofolder/m.pt: folder"),
            (["--export_merged", os.path.join(t, "empty")], f"--export_merged {t}/empty: names a"),
            (["--dataset", "toy_colour", "--root", os.path.join(t, "mine")],
             f"{t}/mine exists and is not a demo folder"),
            (["--eval_datasets", "toy_colour", "--root", os.path.join(t, "mine")],
             f"{t}/mine exists and is not a demo folder"),
            (["--method", "comp", "--comp_ratio", "0.999"],
             "--comp_ratio 0.999: visual.transformer.resblocks.0.attn.q_proj: comp_ratio=0.999: "
             "expected a number in [0, 1) that leaves a direction to train, "
             "at most 0.9921875 for width 128"),
            (["--save_path", os.path.join(t, "saved"), "--eval_only", "--export_merged",
              os.path.join(t, "saved", "eurosat", "lora", "4shots", "seed1", "adapter.pt")],
             "/seed1/adapter.pt, which --save_path names; choose another file"),
            (["--save_path", os.path.join(t, "saved"),
              "--export_merged", os.path.join(t, "saved", "results.jsonl")],
             "results.jsonl, which --save_path names"),
            (adapter("r4") + ["--export_merged", os.path.join(t, "link.pt")],
             f"which --adapter names"),
            (["--backbone", os.path.join(t, "badshape.pt"),
              "--export_merged", os.path.join(t, "badshape.pt")],
             "which --backbone names"),
            (["--checkpoint_every", "-1"], "--checkpoint_every -1: expected 0 or more"),
            (["--save_path", os.path.join(t, "badcheckpoint"), "--resume"],
             "seed1.checkpoint.pt: not a checkpoint; choose another --save_path"),
            # every path a run writes is checked for what will be done to it, before any work (#28)
            (["--export_merged", os.path.join(t, "nofolder", "merged") + os.sep],
             f"--export_merged {t}/nofolder/merged/: names a folder; expected a file name"),
            (["--save_path", os.path.join(t, "foldercheckpoint"), "--resume"],
             f"checkpoint {t}/foldercheckpoint/eurosat/lora/4shots/seed1.checkpoint.pt: names a"),
            (["--save_path", os.path.join(t, "folderlog")],
             f"log {t}/folderlog/results.jsonl: names a folder"),
            (["--save_path", os.path.join(t, "othercheckpoint")],
             "seed1.checkpoint.pt: a checkpoint with method 'comp', this run has method 'lora'; "
             "choose another --save_path, or pass --overwrite to replace it"),
            (["--save_path", os.path.join(t, "adaptercheckpoint"), "--resume"],
             "seed1.checkpoint.pt: not a checkpoint; choose another --save_path"),
            (["--checkpoint_every", "1" + "0" * 400],
             f"--checkpoint_every 1{'0' * 400}: expected 0 or more, at most 2147483647"),
            (["--shots", "9" * 401],
             f"--shots {'9' * 401}: expected a positive integer, at most 2147483647"),
        ]

    def test_each_mistake_is_one_line_and_writes_nothing(self):
        base = ["--backbone", "tiny", "--dataset", "eurosat", "--root", self.root, "--shots", "4",
                "--n_iters", "1", "--workers", "0", "--device", "cpu"]
        before = tree_state(self.tmp)

        def run(case):
            extra, fragment, code = (*case, 1)[:3]
            result = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *base, *extra],
                                    capture_output=True, text=True, cwd=self.cwd, timeout=300)
            return extra, fragment, code, result

        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            for extra, fragment, code, result in pool.map(run, self.cases()):
                with self.subTest(" ".join(extra)):
                    err = result.stderr.strip()
                    self.assertEqual(result.returncode, code, err)
                    self.assertEqual(len(err.splitlines()), 1, err)
                    self.assertTrue(err.startswith("error: "), err)
                    self.assertIn(fragment, err)
        self.assertEqual(tree_state(self.tmp), before)


# ------------------------------------------------------------------------------------- results.py

SUMMARY_CONFIG = {"method": "lora", "backbone": "ViT-B/16", "r": 2, "alpha": 1.0,
                  "dropout_rate": 0.25, "encoder": "both", "params": ["q", "k", "v"],
                  "position": "all", "blocks": None, "comp_ratio": None, "lr": 2e-4,
                  "n_iters": 500, "batch_size": 32, "subsample": "all", "precision": "fp16"}
PAPER_NAMES = {"eurosat": "EuroSAT", "dtd": "DTD"}  # the names in CLIP-LoRA's tables


def write_result(root, folder, seed, accuracy, **settings):
    """A results.json of the schema train.run writes (what --summarize reads of it), in
    root/folder."""
    path = os.path.join(root, folder, "results.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"args": {"seed": seed}, "accuracy": accuracy, "zero_shot_accuracy": 40.0,
                   "config": dict(SUMMARY_CONFIG, **settings)}, f)
    return path


def mean_std(values):
    mean = sum(values) / len(values)
    squares = sum((v - mean) ** 2 for v in values)
    std = math.sqrt(squares / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def summarized(*args, **kwargs):
    """(table, stderr lines) of results.summarize."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        table = results.summarize(*args, **kwargs)
    return table, err.getvalue().splitlines()


def has_matplotlib():
    import importlib.util
    return importlib.util.find_spec("matplotlib") is not None


def clip_lora_layout(model, metadata):
    """CLIP-LoRA's save_lora layout rebuilt from a model's lora_ tensors, independently of train.py:
    one layer_<i> per adapted attention, text tower before vision tower, blocks in order; out_proj
    is "proj"."""
    layers = {}
    for key, tensor in model.state_dict().items():
        # [visual.]transformer.resblocks.<block>.attn.<projection>.lora_A or lora_B
        if ".lora_" in key:
            *tower, _, block, _, projection, kind = key.split(".")
            name = "proj" if projection == "out_proj" else projection
            place = (tower != ["transformer"], int(block))  # text (False) sorts first
            layers.setdefault(place, {}).setdefault(name, {})["w_" + kind] = tensor.clone()
    weights = {f"layer_{i}": layers[place] for i, place in enumerate(sorted(layers))}
    return {"weights": weights, "metadata": dict(metadata)}


class TestResults(unittest.TestCase):
    """results.py's own functions, without a training run: the summary of a folder of runs (its
    tables, the results.py command line, the plot), saving a whole set of files or keeping the
    previous one, and reading adapter files, ours and CLIP-LoRA's. setUp writes a folder of
    results.json files: two configurations (r 2 and r 4), two datasets, two shot counts."""

    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.tmp = self._tmp.name
        self.addCleanup(self._tmp.cleanup)
        rng = random.Random(13)
        self.accuracy = {}  # (r, dataset, shots) -> [accuracy per seed]
        for r, seeds in ((4, (1, 2)), (2, (1, 2, 3))):
            for dataset in ("dtd", "eurosat"):
                for shots in (4, 1):
                    for seed in seeds:
                        accuracy = rng.uniform(40, 90)
                        self.accuracy.setdefault((r, dataset, shots), []).append(accuracy)
                        folder = f"r{r}/{dataset}/{shots}shots/seed{seed}"
                        write_result(self.tmp, folder, seed, accuracy, r=r, dataset=dataset,
                                     shots=shots)

    def text_tables(self, table):
        """{heading: {row name: [cells]}} of the text output (columns are two or more spaces
        apart)."""
        import re
        tables = {}
        for block in table.split("\n\n"):
            heading, header, *rows = block.splitlines()
            self.assertEqual(re.split(r"\s{2,}", header.strip()), ["dataset", "1-shot", "4-shot"])
            # a line that starts with * is a footnote
            cell_rows = (re.split(r"\s{2,}", row.strip())
                         for row in rows if not row.startswith("*"))
            tables[heading] = {cells[0]: cells[1:] for cells in cell_rows}
        return tables

    def expected_cell(self, r, dataset, shots):
        values = self.accuracy[r, dataset, shots]
        mean, std = mean_std(values)
        return f"{mean:.2f} ± {std:.2f} ({len(values)})"

    def expected_average(self, r, shots, datasets=("eurosat", "dtd")):
        return sum(mean_std(self.accuracy[r, d, shots])[0] for d in datasets) / len(datasets)

    # --------------------------------------------------------- summaries, their tables, the plot

    def test_summary_groups_configurations_with_independent_statistics(self):
        table, err = summarized(self.tmp)
        self.assertEqual(err, [])
        tables = self.text_tables(table)
        self.assertEqual(list(tables), ["configuration 1/2: lora r=2",
                                        "configuration 2/2: lora r=4"])
        for r, heading in ((2, "configuration 1/2: lora r=2"), (4, "configuration 2/2: lora r=4")):
            rows = tables[heading]
            self.assertEqual(list(rows), ["EuroSAT", "DTD", "Average"])  # CLIP-LoRA's order
            for dataset in ("eurosat", "dtd"):
                expected = [self.expected_cell(r, dataset, s) for s in (1, 4)]
                self.assertEqual(rows[PAPER_NAMES[dataset]], expected)
            averages = [f"{self.expected_average(r, s):.2f}" for s in (1, 4)]
            self.assertEqual(rows["Average"], averages)
        # a lone configuration names its key settings
        one, _ = summarized(os.path.join(self.tmp, "r4"))
        self.assertTrue(one.startswith("configuration 1/1: lora backbone=ViT-B/16 r=4 alpha=1.0 "
                                       "encoder=both params=q,k,v position=all\n"), one)

    def test_unreadable_results_are_named_and_skipped(self):
        good = os.path.join(self.tmp, "r2", "dtd", "1shots", "seed1", "results.json")
        with open(good) as f:
            text = f.read()
        bad = {"corrupt": ("{not json", "not valid JSON"),
               "truncated": (text[:len(text) // 2], "not valid JSON"),
               "empty": ("", "empty file"), "list": ("[1, 2]", "holds a JSON list"),
               "noconfig": (json.dumps({"args": {"seed": 1}, "accuracy": 50.0}), "lacks 'config'"),
               "noseed": (text.replace('"seed": 1', '"other": 1'), "args['seed'] is missing"),
               "nofield": (text.replace('"precision"', '"other"'), "config lacks 'precision'"),
               "nan": (text.replace('"accuracy": ', '"accuracy": NaN, "x": '), "'accuracy' is nan")}
        paths = {}
        for name, (content, _) in bad.items():
            paths[name] = os.path.join(self.tmp, "bad", name, "results.json")
            os.makedirs(os.path.dirname(paths[name]))
            with open(paths[name], "w") as f:
                f.write(content)
        table, err = summarized(self.tmp)
        self.assertEqual(len(err), len(bad), err)
        for name, (_, reason) in bad.items():
            named = [line.startswith(f"skipped {paths[name]}: ") and reason in line for line in err]
            self.assertIn(1, named, name)
        self.assertEqual(self.text_tables(table)["configuration 1/2: lora r=2"]["DTD"],
                         [self.expected_cell(2, "dtd", s) for s in (1, 4)])

    def test_nothing_readable_is_one_line_error(self):
        empty = os.path.join(self.tmp, "empty")
        os.makedirs(empty)
        with self.assertRaisesRegex(train.UserError, rf"^{empty}: no results.json found$"):
            results.summarize(empty)
        broken = os.path.join(self.tmp, "broken")
        write_result(broken, "a", 1, 50.0)
        with open(os.path.join(broken, "a", "results.json"), "w") as f:
            f.write('{"args": {"se')
        result = subprocess.run([sys.executable, os.path.join(HERE, "results.py"), broken],
                                capture_output=True, text=True)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stdout, "")
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), 2, result.stderr)
        skipped = os.path.join(broken, "a", "results.json")
        self.assertTrue(lines[0].startswith(f"skipped {skipped}: not valid JSON"))
        self.assertEqual(lines[1], f"error: {broken}: none of its 1 results.json files could be "
                                   "read (each is named above)")
        missing = os.path.join(self.tmp, "missing")
        with contextlib.redirect_stderr(io.StringIO()) as err, \
                self.assertRaises(SystemExit) as exit_code:
            results.main([missing])  # results.py DIR has no --summarize flag to name
        self.assertEqual((exit_code.exception.code, err.getvalue()),
                         (1, f"error: {missing}: not a folder\n"))
        # summary flags belong to results.py
        for argv in (["--format", "csv"], ["--plot", "x.png"]):
            with contextlib.redirect_stderr(io.StringIO()) as err, \
                    self.assertRaises(SystemExit) as exit_code:
                train.main(argv)
            self.assertEqual((exit_code.exception.code, err.getvalue()),
                             (2, f"error: unrecognized arguments: {' '.join(argv)} (see --help)\n"))
        with contextlib.redirect_stdout(io.StringIO()) as out, \
                contextlib.redirect_stderr(io.StringIO()):
            results.main([self.tmp, "--format", "csv"])
            self.assertEqual(out.getvalue(), results.summarize(self.tmp, "csv") + "\n")

    def test_summarize_names_a_bad_results_file_and_goes_on(self):
        folder = os.path.join(self.tmp, "summary_cli")
        good = write_result(folder, "good", 1, 61.5, dataset="eurosat", shots=4)
        bad = os.path.join(folder, "bad", "results.json")
        os.makedirs(os.path.dirname(bad))
        with open(good) as f, open(bad, "w") as out:
            out.write(f.read()[:40])  # truncated
        result = subprocess.run([sys.executable, os.path.join(HERE, "results.py"), folder],
                                capture_output=True, text=True, cwd=self.tmp, timeout=300)
        shutil.rmtree(folder)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertTrue(result.stderr.startswith(f"skipped {bad}: not valid JSON ("), result.stderr)
        self.assertIn("61.50 ± 0.00 (1)", result.stdout)

    def test_markdown_and_csv_parse_back(self):
        import csv
        markdown, _ = summarized(self.tmp, "markdown")
        tables = {}
        for line in markdown.splitlines():
            if line.startswith("**"):
                rows = tables.setdefault(line, [])
            elif line.startswith("|"):
                rows.append([cell.strip() for cell in line.strip("|").split("|")])
        self.assertEqual(list(tables), ["**configuration 1/2: lora r=2**",
                                        "**configuration 2/2: lora r=4**"])
        for r, rows in zip((2, 4), tables.values()):
            self.assertEqual(rows[:2], [["dataset", "1-shot", "4-shot"], [":---", "---:", "---:"]])
            eurosat = [self.expected_cell(r, "eurosat", s) for s in (1, 4)]
            dtd = [self.expected_cell(r, "dtd", s) for s in (1, 4)]
            average = [f"{self.expected_average(r, s):.2f}" for s in (1, 4)]
            self.assertEqual(rows[2:], [["EuroSAT"] + eurosat, ["DTD"] + dtd,
                                        ["Average"] + average])
        text, _ = summarized(self.tmp, "csv")
        rows = list(csv.DictReader(io.StringIO(text)))
        self.assertEqual(len(rows), 8)
        for row in rows:
            r, dataset, shots = int(row["r"]), row["dataset"], int(row["shots"])
            mean, std = mean_std(self.accuracy[r, dataset, shots])
            self.assertAlmostEqual(float(row["mean"]), mean, places=9)
            self.assertAlmostEqual(float(row["std"]), std, places=9)
            self.assertEqual(int(row["seeds"]), len(self.accuracy[r, dataset, shots]))
            self.assertEqual(row["seed_list"], "1 2 3" if r == 2 else "1 2")
            self.assertEqual(row["configuration"], "1" if r == 2 else "2")
            self.assertEqual((row["params"], row["blocks"], row["lr"]), ("q,k,v", "", "0.0002"))

    def test_average_marked_when_a_dataset_lacks_a_shot_count(self):
        import shutil
        shutil.rmtree(os.path.join(self.tmp, "r4", "dtd", "4shots"))
        table, _ = summarized(self.tmp)
        block = table.split("\n\n")[1]
        rows = self.text_tables(table)["configuration 2/2: lora r=4"]
        self.assertEqual(rows["DTD"], [self.expected_cell(4, "dtd", 1), "-"])
        self.assertEqual(rows["Average"], [f"{self.expected_average(4, 1):.2f}",
                                           f"{self.expected_average(4, 4, ('eurosat',)):.2f}*"])
        self.assertIn("\n* 4-shot: average over 1 of 2 datasets, without DTD", block)
        self.assertNotIn("*", table.split("\n\n")[0])  # the complete configuration is not marked
        markdown, _ = summarized(self.tmp, "markdown")
        self.assertIn(f"| Average | {self.expected_average(4, 1):.2f} | "
                      f"{self.expected_average(4, 4, ('eurosat',)):.2f}\\* |", markdown)

    def test_retention_metric_is_the_mean_over_the_eval_datasets(self):
        folder = os.path.join(self.tmp, "retention")
        for seed, ratios in ((1, (0.9, 1.0)), (2, (0.8, 0.9))):
            path = write_result(folder, f"seed{seed}", seed, 50.0, dataset="dtd", shots=4)
            with open(path) as f:
                record = json.load(f)
            record["retention"] = {f"set{i}": {"retention": ratio}
                                   for i, ratio in enumerate(ratios)}
            with open(path, "w") as f:
                json.dump(record, f)
        # a run without --eval_datasets
        without = write_result(folder, "seed3", 3, 50.0, dataset="dtd", shots=4)
        table, err = summarized(folder, metric="retention")
        mean, std = mean_std([95.0, 85.0])
        self.assertIn(f"{mean:.2f} ± {std:.2f} (2)", table)
        self.assertEqual(err, [f"skipped {without}: 'retention' is None, expected a number"])
        self.assertIn("50.00 ± 0.00 (3)", summarized(folder)[0])  # the accuracy of all three

    def test_duplicate_run_counted_once(self):
        import shutil
        original = os.path.join(self.tmp, "r2", "dtd", "1shots", "seed1")
        copy_ = os.path.join(self.tmp, "s_copy", "seed1")
        shutil.copytree(original, copy_)
        table, err = summarized(self.tmp)
        copied, kept = os.path.join(copy_, "results.json"), os.path.join(original, "results.json")
        self.assertEqual(err, [f"skipped {copied}: same configuration and seed 1 as {kept}; "
                               "counted once"])
        self.assertEqual(self.text_tables(table)["configuration 1/2: lora r=2"]["DTD"][0],
                         self.expected_cell(2, "dtd", 1))

    @unittest.skipUnless(has_matplotlib(), "matplotlib is not installed (an optional extra)")
    def test_plot_is_written_whole(self):
        folder = os.path.join(self.tmp, "plots")
        os.makedirs(folder)
        path = os.path.join(folder, "few_shot.png")
        table, _ = summarized(self.tmp, plot=path)
        self.assertIn("configuration 2/2", table)
        with open(path, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        self.assertEqual(os.listdir(folder), ["few_shot.png"])  # no temporary file left
        targets = ((os.path.join(self.tmp, "missing", "a.png"), "folder .* does not exist"),
                   (folder + ".png", None), (os.path.join(folder, "a.pdf"), "ending in .png"))
        for target, reason in targets:
            if reason is None:  # a folder named like a PNG
                os.makedirs(target)
                reason = "names a folder"
            refused = rf"^--plot {target}: .*{reason}"
            with self.assertRaisesRegex(train.UserError, refused) as raised:
                summarized(self.tmp, plot=target)
            self.assertNotIn("\n", str(raised.exception))
        self.assertEqual(os.listdir(folder), ["few_shot.png"])

    def test_plot_without_matplotlib_is_one_line_pip_error(self):
        blocked = {name: None for name in list(sys.modules) if name.split(".")[0] == "matplotlib"}
        path = os.path.join(self.tmp, "plot.png")
        with mock.patch.dict(sys.modules, dict(blocked, matplotlib=None)):
            with self.assertRaises(train.UserError) as raised:
                summarized(self.tmp, plot=path)
        self.assertIn("pip install matplotlib", str(raised.exception))
        self.assertNotIn("\n", str(raised.exception))
        self.assertFalse(os.path.exists(path))

    def test_no_module_imports_matplotlib(self):
        code = ("import sys, clip_model, data, train, toy_world\n"
                "print([name for name in sys.modules if name.split('.')[0] == 'matplotlib'])")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                cwd=HERE)
        self.assertEqual((result.returncode, result.stdout.strip()), (0, "[]"), result.stderr)


    # ---------------------------------------------------- saving: a whole set or the previous one

    def test_a_fault_at_any_save_step_keeps_the_previous_set(self):
        """Disk full or Ctrl-C at each system call of a save: the earlier set stays whole (or, once
        the new set is committed, the new one is whole), and what a fault leaves behind is cleaned
        by the next save's recovery."""
        faults = os.path.join(self.tmp, "faults")
        folder, log = os.path.join(faults, "run"), os.path.join(faults, "results.jsonl")

        def save(tag):
            files = {"adapter.pt": lambda f: f.write(b"adapter " + tag),
                     "results.json": lambda f: f.write(b"results " + tag)}
            results.save(folder, files, log=(log, tag.decode() + "\n"))

        save(b"old")
        # a user's own file in the run folder stays
        with open(os.path.join(folder, "notes.txt"), "w") as f:
            f.write("mine")
        before = tree_state(faults)
        after = {**before, "run/adapter.pt": b"adapter new", "run/results.json": b"results new",
                 "results.jsonl": b"old\nnew\n"}
        # the os functions a save calls, each made to fail at the fault-th call
        system_calls = ("fsync", "replace", "write", "open", "mkdir", "ftruncate", "link", "rmdir",
                        "unlink")
        for error in (OSError(28, "No space left on device"), KeyboardInterrupt()):
            outcomes = []
            for fault in itertools.count():
                calls = itertools.count()

                def failing(real):
                    def call(*args, **kwargs):
                        if next(calls) == fault:
                            raise error
                        return real(*args, **kwargs)
                    return call
                with contextlib.ExitStack() as stack:
                    for name in system_calls:
                        stack.enter_context(mock.patch(f"os.{name}", failing(getattr(os, name))))
                    try:
                        save(b"new")
                    except (results.UserError, KeyboardInterrupt) as raised:
                        if isinstance(error, OSError):
                            self.assertIsInstance(raised, results.UserError)
                            full = r"cannot write \(No space left on device\); nothing was saved"
                            self.assertRegex(str(raised), full)
                with contextlib.redirect_stderr(io.StringIO()):
                    results.recover(folder)  # what the next run does first
                state = tree_state(faults)
                self.assertIn(state, (before, after), (error, fault))
                outcomes.append(state == before)
                if state == after:  # put the old set back for the next fault
                    shutil.rmtree(folder)
                    os.remove(log)
                    save(b"old")
                    with open(os.path.join(folder, "notes.txt"), "w") as f:
                        f.write("mine")
                    self.assertEqual(tree_state(faults), before)
                # the save made fewer calls: every one of them has failed once
                if next(calls) <= fault:
                    break
            # faults before the commit keep the old set
            self.assertGreater(outcomes.count(True), 5, error)
            self.assertFalse(outcomes[-1], error)
        # a first save whose log line fails leaves no folder behind
        first = os.path.join(faults, "first")
        with mock.patch("os.write", side_effect=OSError(28, "No space left on device")):
            with self.assertRaisesRegex(results.UserError, "results.jsonl: cannot write"):
                results.save(first, {"adapter.pt": lambda f: f.write(b"a")}, log=(log, "line\n"))
        self.assertFalse(os.path.lexists(first))

    def test_a_kill_at_any_rename_leaves_a_whole_set(self):
        """SIGKILL at the k-th rename of a save: the folder holds the old or the new set, and the
        next run's recovery puts the old one back where none is, and removes the leftovers."""
        kills = os.path.join(self.tmp, "kills")
        folder = os.path.join(kills, "run")
        script = ("import os, signal, sys, results\n"
                  "calls = [0]\n"
                  "def killing(real):\n"
                  "    def call(*args):\n"
                  "        calls[0] += 1\n"
                  "        if calls[0] == int(sys.argv[2]): os.kill(os.getpid(), signal.SIGKILL)\n"
                  "        return real(*args)\n"
                  "    return call\n"
                  "os.replace, os.fsync = killing(os.replace), killing(os.fsync)\n"
                  "tag = sys.argv[3].encode()\n"
                  "results.save(sys.argv[1], {'adapter.pt': lambda f: f.write(b'a' + tag), "
                  "'results.json': lambda f: f.write(b'r' + tag)}, "
                  "log=(sys.argv[1] + '.jsonl', sys.argv[3] + '\\n'))\n")
        # calls of the second save: 1-2 fsync the files, 3 the staged folder, 4 set the old folder
        # aside, 5 rename the new one into place, 6 fsync the log line, 7 the parent folder; 8 never
        # comes
        for kill_at in range(3, 9):
            shutil.rmtree(kills, ignore_errors=True)
            subprocess.run([sys.executable, "-c", script, folder, "0", "old"], check=True, cwd=HERE)
            process = subprocess.run([sys.executable, "-c", script, folder, str(kill_at), "new"],
                                     cwd=HERE)
            self.assertEqual(process.returncode, 0 if kill_at == 8 else -signal.SIGKILL)
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                results.recover(folder)
            self.assertEqual(sorted(os.listdir(kills)), ["run", "run.jsonl"], kill_at)
            tag = b"old" if kill_at <= 5 else b"new"
            whole_set = {".": None, "adapter.pt": b"a" + tag, "results.json": b"r" + tag}
            self.assertEqual(tree_state(folder), whole_set, kill_at)
            self.assertEqual(bool(err.getvalue()), kill_at in (3, 4, 5, 6), kill_at)

    # -------------------------------------------------------- adapter files: ours and CLIP-LoRA's

    def test_adapter_files_are_loaded_strictly(self):
        model, layers = adapted("lora")
        config = train.adapter_config(train.parse_args(["--backbone", "tiny"]))
        tensors = comp_lora.lora_state_dict(model)
        first = next(iter(tensors))
        variants = {
            "extra": ({"config": config,
                       "state_dict": {**tensors, "visual.ln_post.weight": torch.ones(128)}},
                      r"unexpected tensor 'visual\.ln_post\.weight'"),
            "shape": ({"config": config, "state_dict": {**tensors, first: torch.zeros(3, 3)}},
                      rf"tensor '{re.escape(first)}' has shape \(3, 3\), expected \(2, 128\)"),
            "missing": ({"config": config,
                         "state_dict": {k: v for k, v in tensors.items() if k != first}},
                        rf"adapter tensor '{re.escape(first)}' is missing"),
            "nan": ({"config": config,
                     "state_dict": {**tensors, first: torch.full((2, 128), math.nan)}},
                    rf"tensor '{re.escape(first)}' holds NaN"),
            "config": ({"config": ["lora"], "state_dict": tensors},
                       r"not an adapter file of train\.py or CLIP-LoRA"),
            "plain": (tensors, r"not an adapter file of train\.py or CLIP-LoRA"),
        }
        with tempfile.TemporaryDirectory() as tmp:
            for name, (content, pattern) in variants.items():
                path = os.path.join(tmp, f"{name}.pt")
                torch.save(content, path)
                fresh, _ = adapted("lora", seed=3)
                state = copy.deepcopy(fresh.state_dict())
                with self.assertRaisesRegex(train.UserError, rf"^{re.escape(path)}: {pattern}"):
                    train.load_adapters(path, fresh, config)
                after = fresh.state_dict()
                self.assertTrue(all(torch.equal(state[k], v) for k, v in after.items()), name)
            garbage = os.path.join(tmp, "garbage.pt")
            with open(garbage, "wb") as f:
                f.write(b"\x80\x02not a zip")
            unreadable = rf"{re.escape(garbage)}: cannot be read as an adapter file"
            with self.assertRaisesRegex(train.UserError, unreadable):
                train.load_adapters(garbage, adapted("lora")[0], config)

    def test_clip_lora_path(self):
        expected = os.path.join("runs", "vitb16", "dtd", "16shots", "seed1", "lora_weights.pt")
        self.assertEqual(results.clip_lora_path("runs", "ViT-B/16", "dtd", 16, 1), expected)
        self.assertEqual(results.clip_lora_path("/s", "ViT-L/14@336px", "fgvc", 4, 3, filename="w"),
                         "/s/vitl14@336px/fgvc/4shots/seed3/w.pt")

    def test_clip_lora_file_maps_back_to_our_tensors(self):
        layouts = (("both", "all", ("q", "k", "v", "o")), ("both", "up", ("v", "q")),
                   ("vision", "half-bottom", ("o",)), ("text", "all", ("k",)))
        for encoder, position, projections in layouts:
            model, layers = adapted("lora", projections, encoder=encoder, position=position)
            randomize_b(layers)
            metadata = {"r": 2, "alpha": 1, "encoder": encoder, "params": list(projections),
                        "position": position}
            flags = ["--backbone", "tiny", "--encoder", encoder, "--position", position,
                     "--params", *projections]
            config = train.adapter_config(train.parse_args(flags))
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "lora_weights.pt")
                torch.save(clip_lora_layout(model, metadata), path)
                fresh, _ = adapted("lora", projections, encoder=encoder, position=position, seed=5)
                train.load_adapters(path, fresh, config)
            ours = comp_lora.lora_state_dict(model)
            self.assertEqual(sorted(comp_lora.lora_state_dict(fresh)), sorted(ours))
            for key, tensor in comp_lora.lora_state_dict(fresh).items():
                self.assertTrue(torch.equal(ours[key], tensor), key)
            image, token = torch.ones(1, 3, 32, 32), clip_model.tokenize("x")
            self.assertTrue(torch.equal(features(fresh.eval(), image, token),
                                        features(model.eval(), image, token)))

    def test_malformed_clip_lora_files_are_refused_naming_the_key(self):
        model, layers = adapted("lora", ("q", "v"))
        good = clip_lora_layout(model, {"r": 2, "alpha": 1, "encoder": "both", "params": ["q", "v"],
                                        "position": "all"})
        args = train.parse_args(["--backbone", "tiny", "--params", "q", "v"])
        config = train.adapter_config(args)

        def variant(change):
            saved = copy.deepcopy(good)
            change(saved)
            return saved

        integer_b = torch.zeros(128, 2, dtype=torch.long)  # lora_B's shape, not floats
        cases = [
            (lambda s: s["metadata"].pop("alpha"),
             r"metadata\['alpha'\] is None, but this run has alpha 1.0$"),
            (lambda s: s["metadata"].update(params=["q", "x"]),
             r"metadata\['params'\] is \['q', 'x'\]"),
            (lambda s: s["metadata"].update(position="top"), r"metadata\['position'\] is 'top'"),
            (lambda s: s["metadata"].update(rank=2),
             r"CLIP-LoRA adapter file: metadata\['rank'\] is not a field"),
            (lambda s: s["weights"]["layer_2"].update(o_proj=s["weights"]["layer_2"]["q_proj"]),
             r"unexpected tensor weights\['layer_2'\]\['o_proj'\]\['w_lora_A'\]"),
            (lambda s: s["weights"]["layer_4"].pop("v_proj"),
             r"adapter tensor weights\['layer_4'\]\['v_proj'\]\['w_lora_A'\] is missing"),
            (lambda s: s["weights"].pop("layer_5"),
             r"weights\['layer_5'\]\['q_proj'\]\['w_lora_A'\] is missing"),
            (lambda s: s["weights"].update(layer_6=s["weights"]["layer_0"]),
             r"unexpected tensor weights\['layer_6'\]\['q_proj'\]\['w_lora_A'\]"),
            (lambda s: s["weights"]["layer_1"]["q_proj"].update(w_lora_A=torch.zeros(3, 128)),
             r"tensor weights\['layer_1'\]\['q_proj'\]\['w_lora_A'\] has shape \(3, 128\), "
             r"expected \(2, 128\)"),
            (lambda s: s["weights"]["layer_1"]["q_proj"].update(w_lora_B=integer_b),
             r"tensor weights\['layer_1'\]\['q_proj'\]\['w_lora_B'\] has shape \(128, 2\) "
             r"of torch.int64"),
            (lambda s: s["weights"]["layer_1"].update(q_proj=[1]),
             r"unexpected tensor weights\['layer_1'\]\['q_proj'\]\['\?'\]"),
            (lambda s: s.pop("metadata"), r"metadata\['r'\] is None"),
        ]
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "their.pt")
            for change, pattern in cases:
                torch.save(variant(change), path)
                fresh, _ = adapted("lora", ("q", "v"), seed=3)
                state = copy.deepcopy(fresh.state_dict())
                with self.assertRaises(train.UserError) as raised:
                    train.load_adapters(path, fresh, config)
                message = str(raised.exception)
                self.assertRegex(message, f"^{re.escape(path)}: .*{pattern}")
                self.assertNotIn("\n", message)
                after = fresh.state_dict()
                self.assertTrue(all(torch.equal(state[k], v) for k, v in after.items()), pattern)
            torch.save(good, path)
            # another model: fewer adapted modules
            other, _ = adapted("lora", ("q", "v"), position="half-up")
            mismatch = r"metadata\['position'\] is 'all', but this run has position"
            with self.assertRaisesRegex(train.UserError, mismatch):
                train.load_adapters(path, other, dict(config, position="half-up"))
            torch.save(variant(lambda s: s["metadata"].update(position="half-up")), path)
            with self.assertRaisesRegex(train.UserError, r"unexpected tensor weights\['layer_4'\]"):
                train.load_adapters(path, other, dict(config, position="half-up"))

# ------------------------------------------------------------------------------------ the toy world

def components(mask):
    """The number of 8-connected groups of True pixels in a 2-D bool tensor (a flood fill)."""
    left, count = {tuple(p) for p in mask.nonzero().tolist()}, 0
    while left:
        count += 1
        todo = [left.pop()]
        while todo:
            y, x = todo.pop()
            for near in ((y + dy, x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)):
                if near in left:
                    left.remove(near)
                    todo.append(near)
    return count


class TestToyWorld(unittest.TestCase):
    """toy_world.py: its drawings and captions, a short pretraining, its datasets read by data.py,
    and train.py on its backbone. Every file goes to a temporary folder, the pretrained model too
    (never the user's cache)."""
    # A pretraining of seconds. Small batches leave the first plateau (every feature alike) late,
    # at a step that depends on the seed; with seed 0 this one leaves it early (colour: 77%).
    QUICK = dict(toy_world.PRETRAIN, steps=200, batch=16, warmup=10)
    PER_CLASS = {"train": 4, "val": 2, "test": 20}

    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        cls.tmp = cls._tmp.name
        cls.cache = os.path.join(cls.tmp, "cache")
        global_stream = torch.get_rng_state()
        cls.printed = io.StringIO()
        with contextlib.redirect_stdout(cls.printed):
            cls.model = toy_world.load_pretrained(cls.cache, cls.QUICK)
        cls.global_stream_kept = torch.equal(global_stream, torch.get_rng_state())
        cls.root = toy_world.write_datasets(os.path.join(cls.tmp, "data"), cls.PER_CLASS)

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def test_drawings_are_functions_of_the_seed_and_match_their_captions(self):
        """Count words against the groups of bright pixels, colour words against the lit pixels."""
        first, again, other = (toy_world.captioned(48, torch.Generator().manual_seed(seed),
                                                   p_mention=1) for seed in (5, 5, 6))
        self.assertTrue(torch.equal(first[1], again[1]))
        self.assertEqual(first[2], again[2])
        self.assertFalse(torch.equal(first[1], other[1]))
        palette = dict(zip(toy_world.WORDS["colour"], torch.tensor(toy_world.PALETTE).float()))
        counts = {"one": 1, "two": 2, "three": 3, "four": 4}
        seen = set()
        for image, text in zip(first[1], first[2]):
            words = text.rstrip(".").split()  # "a photo of two striped red circles"
            bright = image.max(dim=0).values > 80  # the background is at most 40 plus noise
            self.assertEqual(components(bright), counts[words[3]], text)
            pixels = image[:, bright].float()  # (3, pixels of the objects)
            brightness = pixels.sum(dim=0)
            lit = pixels[:, brightness >= brightness.median()].mean(dim=1)  # not the dark stripes
            nearest = min(palette, key=lambda name: (palette[name] - lit).norm())
            self.assertEqual(nearest, words[5], text)
            seen.add((words[3], words[5]))
        self.assertGreater(len(seen), 12)  # many counts and colours were checked

    def test_captions_fit_exactly_the_images_they_describe(self):
        scene, _, texts, mention = toy_world.captioned(64, torch.Generator().manual_seed(1))
        fit = toy_world.fits(scene, mention)
        self.assertTrue(fit.diagonal().all())
        scene = {name: values.tolist() for name, values in scene.items()}
        mention, fit = mention.tolist(), fit.tolist()
        for i, j in itertools.product(range(64), repeat=2):
            named = [name for k, name in enumerate(toy_world.WORDS) if mention[j][k]]
            same = all(scene[name][i] == scene[name][j] for name in named)
            plural = (scene["count"][i] > 0) == (scene["count"][j] > 0)
            self.assertEqual(fit[i][j], same and plural, (texts[i], texts[j]))
        tokens = clip_model.tokenize(texts)
        self.assertLessEqual(int(tokens.argmax(-1).max()) + 1, toy_world.MODEL["context_length"])

    def test_a_short_pretraining_lowers_the_loss_and_learns_colour(self):
        self.assertRegex(self.printed.getvalue(),
                         r"step 25/200  loss \d+\.\d+  elapsed \d+s  eta \d+s")
        batch = toy_world.captioned(128, torch.Generator().manual_seed(9))  # not a training batch
        with torch.no_grad():
            untrained = clip_model.build_random(seed=0, **toy_world.MODEL)
            before, after = (toy_world.batch_loss(model, batch, train.LOGIT_SCALE).item()
                             for model in (untrained, self.model))
        self.assertLess(after, before - 0.3)
        chance = 100 / len(toy_world.WORDS["colour"])
        self.assertGreater(toy_world.zero_shot(self.model, "toy_colour", per_class=20), 3 * chance)
        self.assertTrue(self.global_stream_kept)
        # cached under a name of its settings, reloaded without pretraining again; the same weights
        path = toy_world.cache_path(self.cache, self.QUICK)
        self.assertEqual(os.listdir(self.cache), [os.path.basename(path)])
        self.assertNotEqual(path, toy_world.cache_path(self.cache, dict(self.QUICK, steps=41)))
        reloaded, printed = quiet(toy_world.load_pretrained, self.cache, self.QUICK)
        self.assertEqual(printed, "")
        self.assertTrue(all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(),
                                                               self.model.state_dict().values())))
        self.assertAlmostEqual(reloaded.logit_scale.exp().item(), train.LOGIT_SCALE, places=4)
        tiny = dict(self.QUICK, steps=2, batch=8)
        (one, _), (two, _) = (toy_world.pretrain(tiny, log=lambda line: None) for _ in range(2))
        self.assertTrue(all(torch.equal(a, b) for a, b in zip(one.state_dict().values(),
                                                               two.state_dict().values())))
        # the pretraining runs on its own thread count (the order of the sums follows it), then
        # gives the caller's back
        threads, seen = torch.get_num_threads(), []
        torch.set_num_threads(1)
        try:
            toy_world.pretrain(tiny, log=lambda line: seen.append(torch.get_num_threads()))
            self.assertEqual(seen, [tiny["threads"]])
            self.assertEqual(torch.get_num_threads(), 1)
        finally:
            torch.set_num_threads(threads)

    def test_toy_datasets_load_through_data_py_with_their_prompts(self):
        prompts = {"toy_colour": "a photo of a red shape.", "toy_count": "a photo of one shape.",
                   "toy_position": "a photo of a shape on the left.",
                   "toy_shape": "a photo of a circle.", "toy_texture": "a photo of a solid shape.",
                   "toy_outline_count": "a photo of one shape."}
        for task, prompt in prompts.items():
            dataset = data.build_dataset(task, self.root, shots=2, seed=1)
            self.assertEqual(dataset.classnames, toy_world.class_names(task))
            self.assertEqual(dataset.template, [dataset.zeroshot_template])
            self.assertEqual(dataset.template[0].format(dataset.classnames[0]), prompt)
            self.assertEqual(dataset.augment, "none" if task == "toy_position" else "flip")
            classes = len(dataset.classnames)
            self.assertEqual((len(dataset.train), len(dataset.test)), (2 * classes, 20 * classes))
        real = {spec.augment for name, spec in data.DATASETS.items() if not name.startswith("toy_")}
        self.assertEqual(real, {"crop"})  # CLIP-LoRA's crop stays for every real dataset
        # the files are a function of the seed; a folder of the user's is never written into
        state = tree_state(self.root)
        again = toy_world.write_datasets(os.path.join(self.tmp, "again"), self.PER_CLASS)
        self.assertEqual(tree_state(again), state)
        mine = os.path.join(self.tmp, "mine")
        os.makedirs(mine)
        touch(os.path.join(mine, "notes.txt"))
        refusal = f"^{re.escape(mine)} exists and is not a demo folder"
        with self.assertRaisesRegex(data.DataError, refusal):
            data.build_datasets("dtd", ["toy_colour"], mine, 1, 1)
        self.assertEqual(os.listdir(mine), ["notes.txt"])
        # flip keeps every object: the image or its mirror, never a crop
        path, _ = data.build_dataset("toy_count", self.root, shots=1, seed=1).test[0]
        plain = clip_model.preprocess(32)(Image.open(path))
        for seed in range(4):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                flipped = data.train_transform(32, "flip")(Image.open(path))
            self.assertTrue(torch.equal(flipped, plain) or torch.equal(flipped, plain.flip(-1)))

    def test_train_py_on_the_toy_backbone_with_retention(self):
        """--backbone toy loads the cached model (the temporary cache: no second pretraining); the
        plain model's accuracy on the written files is toy_world's on the drawn images."""
        with mock.patch.object(toy_world, "CACHE", self.cache), \
                mock.patch.object(toy_world, "PRETRAIN", self.QUICK), \
                mock.patch.object(toy_world, "PER_CLASS", self.PER_CLASS):
            record, printed = quiet(train.run, train.parse_args([
                "--backbone", "toy", "--dataset", "toy_outline_count", "--root", self.root,
                "--eval_datasets", "toy_colour,toy_position", "--shots", "2", "--n_iters", "4",
                "--lr", "2e-3", "--workers", "0", "--device", "cpu",
                "--save_path", os.path.join(self.tmp, "out")]))
        self.assertNotIn("pretraining", printed)
        for task in ("toy_colour", "toy_position"):
            self.assertAlmostEqual(record["retention"][task]["plain"],
                                   toy_world.zero_shot(self.model, task, per_class=20), places=4)
        target = toy_world.zero_shot(self.model, "toy_outline_count", per_class=20)
        self.assertAlmostEqual(record["zero_shot_accuracy"], target, places=4)
        self.assertRegex(printed, r"toy_colour: zero-shot plain [\d.]+  adapted [\d.]+  retention")
        summary = results.summarize(os.path.join(self.tmp, "out"), metric="retention")
        retention = statistics.mean(entry["retention"] for entry in record["retention"].values())
        self.assertIn(f"{100 * retention:.2f} ± 0.00 (1)", summary)


# unittest's own command line: test names, -k PATTERN, -h; then one summary line
if __name__ == "__main__":
    result = unittest.main(verbosity=2, exit=False).result
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    print(f"{result.testsRun - failed - len(result.skipped)} passed, {failed} failed")
    sys.exit(1 if failed else 0)
