"""PEFT's own LoRA test cases, ported: every case runs the same steps on PEFT and on minilora, on
the same tiny models, and asserts the same property with PEFT's tolerances (PEFT is the oracle).

Ported from PEFT's tests (the logic, not the code): test_custom_models.py (its TEST_CASES, the
TestPeftCustomModel methods, TestMultipleActiveAdapters, TestMultiRankAdapter, TestRequiresGrad),
testing_common.py (the PeftCommonTester methods that test_decoder_models.py and
test_encoder_decoder_models.py run), test_initialization.py (TestLoraInitialization, Linear parts)
and test_tuners_utils.py (TestTargetedModuleNames, TestExcludedModuleNames). The models keep the
shapes of PEFT's, so the thresholds mean the same.

Configurations (CUSTOM_CASES, HF_CASES):
- PEFT's TEST_CASES on Linear layers: "Vanilla MLP 1-6 LoRA" (a regex, lists, modules_to_save,
  alpha and dropout) and "Embedding + transformers Conv1D 1 LoRA" (GPT-2's Conv1D);
- PEFT's lora_bias cases ("Vanilla MLP ... with lora_bias", and on GPT-2's Conv1D);
- the same MLP with use_rslora, with rank_pattern + alpha_pattern, with init_lora_weights="gaussian",
  and PEFT's DeepMLP (four blocks deep) with layers_to_transform + layers_pattern;
- PEFT's decoder config (target_modules=None, r=8, alpha=32, dropout 0.05) on tiny GPT-2 and LLaMA,
  "all-linear" on LLaMA, its seq2seq config on T5 and BART, and SEQ_CLS on BERT (built offline);
- PEFT's "LoRA + trainable tokens" (the decoder config with trainable_token_indices=[0, 1, 3]) on
  GPT-2 (a tied head), LLaMA, T5 and BERT.

Every case also compares the LoRA layers' attributes that code written against PEFT reads (r,
lora_alpha, scaling, use_dora, lora_dropout, the flags, base_layer), fresh and merged.

LoRA on nn.Linear, GPT-2's Conv1D and nn.Conv1d / nn.Conv2d (PEFT's "Conv1d LoRA", "Conv2d 1/2
LoRA" on its ModelConv1D / ModelConv2D) is in scope: embeddings, MultiheadAttention, DoRA,
LoftQ/PiSSA/OLoRA inits and target_parameters are not ported here (tests/test_dora.py,
test_embedding_lora.py, test_init.py and test_moe.py hold them against PEFT), nor PEFT's other merge methods (ties, dare, magnitude_prune). Where minilora has no
switch for a PEFT option (autocast_adapter_dtype=False, low_cpu_mem_usage, per-layer
enable_adapters, push_to_hub) the case is not ported; see docs/peft-users.md.
"""

import copy
import dataclasses
import json
import math
import pickle
import re
import warnings
from operator import attrgetter

import peft
import pytest
import torch
import torch.nn as nn
import yaml
from conftest import batch, make
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D

import minilora
from minilora.families import DEFAULT_TARGETS

LIBRARIES = ("peft", "minilora")


# ---------------------------------------------------------------- PEFT's custom models, same shapes
class MLP(nn.Module):
    """lin0 (10 -> 20), ReLU, dropout 0.5, lin1 (20 -> 2), log-softmax; inputs cast to `self.dtype`."""

    def __init__(self, bias=True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(X.to(self.dtype))))))


class Block(nn.Module):
    """Two (size x size) Linear layers with ReLU and dropout between them."""

    def __init__(self, size=10):
        super().__init__()
        self.lin0 = nn.Linear(size, size)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(size, size)

    def forward(self, X):
        return self.lin1(self.drop(self.relu(self.lin0(X))))


class DeepMLP(nn.Module):
    """Twelve Blocks in `layers`, then out (10 -> 2) and log-softmax; inputs cast to `self.dtype`."""

    def __init__(self, size=10, num_hidden_layers=12):
        super().__init__()
        self.layers = nn.ModuleList([Block(size) for _ in range(num_hidden_layers)])
        self.out = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = X.to(self.dtype)
        for layer in self.layers:
            X = layer(X)
        return self.sm(self.out(X))


class EmbConv1D(nn.Module):
    """Embedding(100, 5), transformers' Conv1D (5 -> 1), flatten, lin0 (10 -> 2), log-softmax."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        return self.sm(self.lin0(self.flat(self.relu(self.conv1d(self.emb(X))))))


class ModelConv1D(nn.Module):
    """PEFT's: Conv1d (1 -> 1, kernel 2) over the 10 features, ReLU, flatten, lin0 (9 -> 2), log-softmax."""

    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(1, 1, 2)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(9, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = X.to(self.dtype).reshape(-1, 1, 10)
        return self.sm(self.lin0(self.flat(self.relu(self.conv1d(X)))))


class ModelConv2D(nn.Module):
    """PEFT's: Conv2d (5 -> 10, kernel 3) over 5 x 3 x 3 inputs, ReLU, flatten, lin0 (10 -> 2), log-softmax."""

    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(5, 10, 3)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = X.to(self.dtype).reshape(-1, 5, 3, 3)
        return self.sm(self.lin0(self.flat(self.relu(self.conv2d(X)))))


class ToyMoE(nn.Module):
    """model.layers.<i> with self_attn.q_proj and two experts' up_proj: a layer index and an expert index."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList()
        for _ in range(4):
            block = nn.Module()
            block.self_attn = nn.Module()
            block.self_attn.q_proj = nn.Linear(4, 4, bias=False)
            block.mlp = nn.Module()
            block.mlp.experts = nn.ModuleList([nn.Module() for _ in range(2)])
            for expert in block.mlp.experts:
                expert.up_proj = nn.Linear(4, 4, bias=False)
            self.model.layers.append(block)


# Forward passes run through four Blocks: through twelve, ReLUs silence the input and every row comes out alike.
CUSTOM = {"MLP": MLP, "EmbConv1D": EmbConv1D, "DeepMLP": lambda: DeepMLP(num_hidden_layers=4),
          "Conv1d": ModelConv1D, "Conv2d": ModelConv2D}
GENERATIVE = ("gpt2", "llama", "t5", "bart")


def build(model_id, dtype=torch.float32):
    """A fresh base model, the same on every call (PEFT's tests load theirs by name; so does this,
    as far as `config._name_or_path` tells). Custom models come in training mode, as in PEFT."""
    if model_id in CUSTOM:
        torch.manual_seed(0)
        return CUSTOM[model_id]().to(dtype)
    model = make(model_id).to(dtype)
    model.config._name_or_path = model.name_or_path = model_id
    return model


def inputs_for(model_id):
    if model_id in CUSTOM:
        return {"X": torch.arange(90).view(9, 10)}
    if model_id in ("gpt2", "llama"):
        return {"input_ids": torch.tensor([[1, 1, 1], [1, 2, 1]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 1]])}
    return batch(model_id)


def output(model, inputs):
    """The model's output tensor: a custom model's output, or a HF model's logits."""
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


# ---------------------------------------------------------------- the two libraries, side by side
def lib(library):
    return peft if library == "peft" else minilora


def config(library, **kwargs):
    return lib(library).LoraConfig(**kwargs)


def wrap(library, base, adapter_name="default", **kwargs):
    return lib(library).get_peft_model(base, config(library, **kwargs), adapter_name=adapter_name)


def load(library, base, path, **kwargs):
    return lib(library).PeftModel.from_pretrained(base, path, **kwargs)


def is_adapter_layer(module):
    """An adapter layer of either library, by PEFT's attributes: a base layer and merged adapters."""
    return hasattr(module, "base_layer") and hasattr(module, "merged_adapters")


def adapter_layers(model):
    """The LoRA layers (and trainable-token layers): PEFT's tuner layers, or minilora's adapter layers."""
    return [m for m in model.modules() if is_adapter_layer(m)]


def trained_copies(model):
    """The modules_to_save wrappers of either library (PEFT's attributes: the original and its copies)."""
    return [m for m in model.modules() if hasattr(m, "original_module") and hasattr(m, "modules_to_save")]


def named_layers(model):
    """LoRA layers by their path in the base model."""
    base = model.get_base_model()
    return {n: m for n, m in base.named_modules() if is_adapter_layer(m)}


def is_adapter_parameter(name):
    return "lora_" in name or ".modules_to_save." in name or ".trainable_tokens_delta." in name


def rank(layer, adapter):
    return layer.r[adapter]


def scaling(layer, adapter):
    return layer.scaling[adapter]


def delta_weight(layer, adapter):
    """(alpha/r)·B·A as PEFT's get_delta_weight gives it (Conv1D: transposed) -> (out, in)."""
    delta = layer.get_delta_weight(adapter)
    return delta.T if layer.fan_in_fan_out else delta


def factors(layer, adapter):
    """(A, B) weights of one adapter on one layer."""
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight


def per_adapter_tables(layer):
    """The per-adapter containers of a LoRA layer (PEFT's adapter_layer_names and other_param_names)."""
    return [attrgetter(a)(layer) for a in (*layer.adapter_layer_names, *layer.other_param_names)]


def requiring_grad(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def init_false(kwargs):
    """The config with adapters that change the output from the start (B not zero)."""
    return {**kwargs, "init_lora_weights": False}


def step(model, inputs, optimizer, loss_fn=lambda out: out.sum(), steps=3):
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(output(model, inputs)).backward()
        optimizer.step()


def nll(out):
    return nn.functional.nll_loss(out, torch.arange(len(out)) % 2)


# ---------------------------------------------------------------- the cases
# (name, model, LoraConfig kwargs)
CUSTOM_CASES = [
    ("Vanilla MLP 1 LoRA", "MLP", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 LoRA", "MLP", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 LoRA", "MLP", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 LoRA", "MLP", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 LoRA", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 LoRA", "MLP", {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}),
    ("Embedding + transformers Conv1D 1 LoRA", "EmbConv1D", {"target_modules": ["conv1d"]}),
    ("MLP rsLoRA", "MLP", {"target_modules": ["lin0", "lin1"], "r": 4, "lora_alpha": 8, "use_rslora": True}),
    ("MLP rank and alpha patterns", "MLP",
     {"target_modules": ["lin0", "lin1"], "rank_pattern": {"lin0": 2}, "alpha_pattern": {"lin1": 16}}),
    ("MLP gaussian init", "MLP", {"target_modules": ["lin0", "lin1"], "init_lora_weights": "gaussian"}),
    ("DeepMLP layers_to_transform", "DeepMLP",
     {"target_modules": ["lin0"], "layers_to_transform": [0, 2], "layers_pattern": "layers"}),
    ("Conv1d LoRA", "Conv1d", {"target_modules": ["conv1d"]}),
    ("Conv2d 1 LoRA", "Conv2d", {"target_modules": ["conv2d"]}),
    ("Conv2d 2 LoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"]}),
    ("Vanilla MLP LoRA with lora_bias", "MLP", {"target_modules": ["lin0", "lin1"], "lora_bias": True}),
    ("Embedding + transformers Conv1D LoRA with lora_bias", "EmbConv1D", {"target_modules": ["conv1d"], "lora_bias": True}),
]
DECODER = {"task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 32, "target_modules": None, "lora_dropout": 0.05, "bias": "none"}
HF_CASES = [
    ("GPT-2 decoder LoRA", "gpt2", DECODER),
    ("LLaMA decoder LoRA", "llama", DECODER),
    ("LLaMA all-linear", "llama", {"task_type": "CAUSAL_LM", "target_modules": "all-linear"}),
    ("T5 seq2seq LoRA", "t5", {**DECODER, "task_type": "SEQ_2_SEQ_LM"}),
    ("BART seq2seq LoRA", "bart", {**DECODER, "task_type": "SEQ_2_SEQ_LM"}),
    ("BERT sequence classification LoRA", "bert", {"task_type": "SEQ_CLS", "r": 8, "lora_alpha": 32}),
    # PEFT's "LoRA + trainable tokens" of its decoder, seq2seq and sequence-classification suites
    ("GPT-2 decoder LoRA + trainable tokens", "gpt2", {**DECODER, "trainable_token_indices": [0, 1, 3]}),
    ("LLaMA decoder LoRA + trainable tokens", "llama", {**DECODER, "trainable_token_indices": [0, 1, 3]}),
    ("T5 seq2seq LoRA + trainable tokens", "t5",
     {**DECODER, "task_type": "SEQ_2_SEQ_LM", "trainable_token_indices": [0, 1, 3]}),
    ("BERT sequence classification LoRA + trainable tokens", "bert",
     {**DECODER, "task_type": "SEQ_CLS", "trainable_token_indices": [0, 1, 3]}),
]
ALL_CASES = CUSTOM_CASES + HF_CASES
TOKEN_CASES = {c[0] for c in HF_CASES if "trainable_token_indices" in c[2]}
WITH_HEADS = {"Vanilla MLP 5 LoRA", "BERT sequence classification LoRA",  # trained copies (modules_to_save)
              "BERT sequence classification LoRA + trainable tokens"}


def cases(table, without=()):
    return pytest.mark.parametrize("name, model_id, kwargs", [c for c in table if c[0] not in without],
                                   ids=[c[0] for c in table if c[0] not in without])


each_library = pytest.mark.parametrize("library", LIBRARIES)


# ---------------------------------------------------------------- wrapping and attributes
@each_library
@cases(ALL_CASES)
def test_attributes(library, name, model_id, kwargs):
    model = wrap(library, build(model_id), base_model_name_or_path=model_id, **kwargs)
    assert hasattr(model, "save_pretrained") and hasattr(model, "from_pretrained")


LAYER_ATTRIBUTES = ("r", "lora_alpha", "scaling", "use_dora")  # PEFT's per-adapter tables of a LoRA layer
LAYER_FLAGS = ("merged_adapters", "active_adapters", "disable_adapters", "merged")


def layer_attributes(layer, adapter):
    """What code written against PEFT reads on a LoRA layer: its per-adapter tables, its dropout,
    its flags, its base layer and the keys of its factor tables."""
    dropout = layer.lora_dropout[adapter]
    return {**{a: getattr(layer, a)[adapter] for a in LAYER_ATTRIBUTES}, **{f: getattr(layer, f) for f in LAYER_FLAGS},
            "lora_dropout": (type(dropout).__name__, getattr(dropout, "p", None)),
            "base_layer": type(layer.base_layer).__name__, "in/out": (layer.in_features, layer.out_features),
            "tables": (list(layer.lora_A), list(layer.lora_B), list(layer.lora_magnitude_vector))}


@cases(ALL_CASES)
def test_layer_attributes_equal_peft(name, model_id, kwargs):
    """PEFT's layer attributes, read the same way on both libraries, before and after a merge."""
    models = {library: wrap(library, build(model_id), **kwargs) for library in LIBRARIES}
    for stage in ("fresh", "merged"):
        seen = {library: {path: layer_attributes(layer, "default") for path, layer in named_layers(m).items()
                          if hasattr(layer, "lora_A")} for library, m in models.items()}
        assert seen["peft"] and seen["minilora"] == seen["peft"], stage
        for m in models.values():
            m.merge_adapter()


@each_library
@cases(ALL_CASES)
def test_adapter_name(library, name, model_id, kwargs):
    model = wrap(library, build(model_id), adapter_name="test-adapter", **kwargs)
    assert any("test-adapter" in n for n, _ in model.named_parameters())


@each_library
@cases(ALL_CASES)
def test_in_features_out_features_exposed(library, name, model_id, kwargs):
    layers = adapter_layers(wrap(library, build(model_id), **kwargs))
    assert layers and all(hasattr(m, "in_features") and hasattr(m, "out_features") for m in layers)


@each_library
@cases(CUSTOM_CASES)
def test_forward_output_finite(library, name, model_id, kwargs):
    model = wrap(library, build(model_id), **kwargs).eval()
    with torch.no_grad():
        assert torch.isfinite(output(model, inputs_for(model_id))).all()


@each_library
@cases(ALL_CASES)
def test_training(library, name, model_id, kwargs):
    model = wrap(library, build(model_id), **kwargs)
    output(model, inputs_for(model_id)).sum().backward()
    for n, p in model.named_parameters():
        if is_adapter_parameter(n) and p.requires_grad:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n


# ---------------------------------------------------------------- files
def check_model_card(directory, model_id):
    card = (directory / "README.md").read_text()
    meta = yaml.safe_load(re.search(r"---\n(.*?)\n---", card, re.DOTALL).group(1))
    assert meta["library_name"] == "peft" and "lora" in meta["tags"]
    if model_id in CUSTOM:
        assert "base_model" not in meta
    else:
        assert meta["base_model"] == model_id


@each_library
@pytest.mark.parametrize("safe_serialization", [True, False])
@cases(ALL_CASES)
def test_save_pretrained(tmp_path, library, safe_serialization, name, model_id, kwargs):
    model = wrap(library, build(model_id), base_model_name_or_path=model_id, **init_false(kwargs))
    model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load(library, build(model_id), tmp_path)
    assert not [w for w in caught if "missing" in str(w.message).lower()]
    reloaded = loaded.state_dict()
    for key, value in model.state_dict().items():
        assert torch.allclose(value, reloaded[key]), key
    weights = "adapter_model.safetensors" if safe_serialization else "adapter_model.bin"
    assert (tmp_path / weights).is_file() and (tmp_path / "adapter_config.json").is_file()
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "config.json").exists()
    check_model_card(tmp_path, model_id)
    if model_id not in CUSTOM:
        written = json.loads((tmp_path / "adapter_config.json").read_text())
        assert written["base_model_name_or_path"] == model_id


@each_library
@pytest.mark.parametrize("safe_serialization", [True, False])
@cases(ALL_CASES)
def test_save_pretrained_selected_adapters(tmp_path, library, safe_serialization, name, model_id, kwargs):
    model = wrap(library, build(model_id), base_model_name_or_path=model_id, **kwargs)
    model.add_adapter("new_adapter", config(library, base_model_name_or_path=model_id, **kwargs))
    model.save_pretrained(tmp_path / "all", safe_serialization=safe_serialization)
    loaded = load(library, build(model_id), tmp_path / "all")
    loaded.load_adapter(tmp_path / "all" / "new_adapter", "new_adapter")
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    assert all(torch.allclose(original[k], reloaded[k]) for k in original)
    weights = "adapter_model.safetensors" if safe_serialization else "adapter_model.bin"
    for directory in (tmp_path / "all", tmp_path / "all" / "new_adapter"):
        assert (directory / weights).is_file() and (directory / "adapter_config.json").is_file()
        assert not (directory / "model.safetensors").exists() and not (directory / "config.json").exists()
    check_model_card(tmp_path / "all", model_id)
    model.save_pretrained(tmp_path / "one", selected_adapters=["default"])
    only = load(library, build(model_id), tmp_path / "one")
    assert "default" in only.peft_config and "new_adapter" not in only.peft_config


@each_library
@cases(ALL_CASES)
def test_save_pretrained_adapter_name_substring(tmp_path, library, name, model_id, kwargs):
    model = wrap(library, build(model_id), **init_false(kwargs))
    model.save_pretrained(tmp_path / "alone")
    expected = len(load_file(tmp_path / "alone" / "adapter_model.safetensors"))
    for other in ("default2", "other_default", "foodefault_bar", "efaul"):  # prefix, suffix, infix, substring
        model.add_adapter(other, config(library, **init_false(kwargs)))
    model.save_pretrained(tmp_path / "among", selected_adapters=["default"])
    assert len(load_file(tmp_path / "among" / "adapter_model.safetensors")) == expected


@each_library
@cases(ALL_CASES)
def test_from_pretrained_config_construction(tmp_path, library, name, model_id, kwargs):
    cfg = config(library, base_model_name_or_path=model_id, **kwargs)
    lib(library).get_peft_model(build(model_id), cfg).save_pretrained(tmp_path)
    given = config(library, base_model_name_or_path=model_id, **kwargs)
    loaded = load(library, build(model_id), tmp_path, is_trainable=False, config=given)
    used = loaded.peft_config["default"]  # PEFT keeps `given` itself; minilora a copy the model owns
    assert used.inference_mode
    assert (used.r, used.lora_alpha) == (given.r, given.lora_alpha)
    # targets left to the defaults are filled in (PEFT fills in `given` itself, minilora its copy)
    if given.target_modules is None:
        assert used.target_modules == set(DEFAULT_TARGETS[build(model_id).config.model_type])
    else:
        assert used.target_modules == given.target_modules


@each_library
@cases(ALL_CASES)
def test_load_multiple_adapters(tmp_path, library, name, model_id, kwargs):
    wrap(library, build(model_id), **kwargs).save_pretrained(tmp_path)
    model = load(library, build(model_id), tmp_path)
    assert model.load_adapter(tmp_path, adapter_name="other").missing_keys == []
    assert model.load_adapter(tmp_path, adapter_name="yet-another").missing_keys == []


@each_library
@cases(ALL_CASES)
def test_inference_safetensors(tmp_path, library, name, model_id, kwargs):
    inputs = inputs_for(model_id)
    model = wrap(library, build(model_id), **kwargs)
    output(model, inputs).sum().backward()
    model.eval()
    with torch.no_grad():
        expected = output(model, inputs)
    model.save_pretrained(tmp_path, safe_serialization=True)
    files = {p.name for p in tmp_path.iterdir()}
    assert "adapter_model.safetensors" in files and "adapter_model.bin" not in files
    with torch.no_grad():
        got = output(load(library, build(model_id), tmp_path), inputs)
    assert torch.allclose(expected, got, atol=1e-4, rtol=1e-4)


@each_library
@cases(CUSTOM_CASES)
def test_save_load_roundtrip(tmp_path, library, name, model_id, kwargs):
    inputs = inputs_for(model_id)
    base = build(model_id).eval()
    with torch.inference_mode():
        base_output = output(base, inputs)
    torch.manual_seed(0)
    model = wrap(library, base, **init_false(kwargs)).eval()
    with torch.inference_mode():
        before = output(model, inputs)
    assert not torch.allclose(base_output, before, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    torch.manual_seed(54321)  # not the seed the adapter was made with
    loaded = load(library, build(model_id), tmp_path)
    with torch.inference_mode():
        assert torch.allclose(before, output(loaded, inputs), atol=1e-5, rtol=1e-5)


@each_library
@cases(CUSTOM_CASES)
def test_parameters_after_loading_model(tmp_path, library, name, model_id, kwargs):
    model = wrap(library, build(model_id), **kwargs)
    step(model, inputs_for(model_id), torch.optim.SGD(model.parameters(), lr=0.5))
    before = model.state_dict()
    model.save_pretrained(tmp_path)
    after = load(library, build(model_id), tmp_path).state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.allclose(value, after[key], atol=1e-4, rtol=1e-4), key


# ---------------------------------------------------------------- merging
def merged_reloaded(model_id, merged, tmp_path):
    """The merged model after a round trip: pickled (custom models) or saved and loaded by transformers."""
    if model_id in CUSTOM:
        return pickle.loads(pickle.dumps(merged))
    merged.save_pretrained(tmp_path)
    return type(merged).from_pretrained(tmp_path).eval()


@each_library
@cases(ALL_CASES)
def test_merge_layers(tmp_path, library, name, model_id, kwargs):
    inputs = inputs_for(model_id)
    model = wrap(library, build(model_id), base_model_name_or_path=model_id, **init_false(kwargs)).eval()
    with torch.no_grad():
        adapted = output(model, inputs)
        model.merge_adapter()
        merged = output(model, inputs)
        model.unmerge_adapter()
        unmerged = output(model, inputs)
        plain = model.merge_and_unload()
        assert not adapter_layers(plain) and not hasattr(plain, "peft_config")
        unloaded = output(plain, inputs)
        for got in (merged, unmerged, unloaded):
            assert torch.allclose(adapted, got, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(merged, output(build(model_id).eval(), inputs), atol=1e-10, rtol=1e-10)
        again = output(merged_reloaded(model_id, plain, tmp_path), inputs)
    assert torch.allclose(merged, again, atol=1e-4, rtol=1e-4)


@each_library
@cases(ALL_CASES)
def test_merge_layers_fp16(library, name, model_id, kwargs):
    model = wrap(library, build(model_id, torch.float16), base_model_name_or_path=model_id, **init_false(kwargs))
    plain = model.to(dtype=torch.float16).eval().merge_and_unload()
    assert not adapter_layers(plain)


@each_library
@cases(ALL_CASES)
def test_merge_layers_nan(library, name, model_id, kwargs):
    inputs = inputs_for(model_id)
    model = wrap(library, build(model_id), **kwargs).eval()
    with torch.no_grad():
        unmerged = output(model, inputs)
        assert torch.allclose(unmerged, output(model.merge_and_unload(), inputs), atol=1e-3, rtol=1e-3)
    model = wrap(library, build(model_id), **kwargs)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data[0] = torch.nan
    with pytest.raises(ValueError, match="NaN"):
        model.merge_and_unload(safe_merge=True)
    for n, p in model.named_parameters():
        if "lora_A" in n or "lora_B" in n:
            p.data[0] = torch.inf
    with pytest.raises(ValueError, match="NaN"):
        model.merge_and_unload(safe_merge=True)


@each_library
@cases(ALL_CASES)
def test_merge_layers_is_idempotent(library, name, model_id, kwargs):
    inputs = inputs_for(model_id)
    model = wrap(library, build(model_id), **init_false(kwargs)).eval()
    model.merge_adapter()
    with torch.no_grad():
        first = output(model, inputs)
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    with torch.no_grad():
        assert torch.allclose(first, output(model, inputs), atol=1e-6, rtol=1e-6)


@each_library
@cases(CUSTOM_CASES)
def test_safe_merge(tmp_path, library, name, model_id, kwargs):
    torch.manual_seed(0)
    inputs = inputs_for(model_id)
    base = build(model_id).eval()
    with torch.no_grad():
        base_output = output(base, inputs)
        model = wrap(library, base, **init_false(kwargs)).eval()
        adapted = output(model, inputs)
        assert not torch.allclose(base_output, adapted, atol=1e-6, rtol=1e-6)
        plain = model.merge_and_unload(safe_merge=True)
        assert torch.allclose(adapted, output(plain, inputs), atol=1e-6, rtol=1e-6)
    torch.save(plain.state_dict(), tmp_path / "model.bin")
    save_file(plain.state_dict(), tmp_path / "model.safetensors")  # contiguous tensors, no shared storage


@each_library
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@cases(CUSTOM_CASES)
def test_forward_half_precision(library, dtype, name, model_id, kwargs):
    inputs = inputs_for(model_id)
    base = build(model_id, dtype)
    base.dtype = dtype
    model = wrap(library, base, **kwargs).eval()
    with torch.no_grad():
        output(model, inputs)
        for safe in (False, True):
            model.merge_adapter(safe_merge=safe)
            output(model, inputs)
            model.unmerge_adapter()
            output(model, inputs)
        output(model.merge_and_unload(), inputs)


@each_library
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@cases(CUSTOM_CASES)
def test_adapter_dtype_autocast(tmp_path, library, dtype, name, model_id, kwargs):
    def adapter_dtypes(model):
        return {p.dtype for n, p in model.named_parameters() if "lora_" in n}

    model = wrap(library, build(model_id, dtype), **kwargs)
    model.add_adapter("other", config(library, **kwargs))
    assert adapter_dtypes(model) == {torch.float32}
    model.save_pretrained(tmp_path)
    loaded = load(library, build(model_id, dtype), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    assert adapter_dtypes(loaded) == {torch.float32}


# ---------------------------------------------------------------- training and disabling (custom models)
@each_library
@cases(CUSTOM_CASES)
def test_only_params_are_updated(library, name, model_id, kwargs):
    model = wrap(library, build(model_id), **kwargs)
    before = copy.deepcopy(model)
    step(model, inputs_for(model_id), torch.optim.SGD(model.parameters(), lr=0.5))
    params_before, params_after = dict(before.named_parameters()), dict(model.named_parameters())
    assert params_before.keys() == params_after.keys()
    for n, old in params_before.items():
        new = params_after[n]
        if is_adapter_parameter(n) and new.requires_grad:
            assert not torch.allclose(old, new, atol=1e-4, rtol=1e-4), n
        elif is_adapter_parameter(n):
            assert torch.equal(old, new), n
        else:
            assert torch.allclose(old, new, atol=1e-4, rtol=1e-4), n


@each_library
@cases(CUSTOM_CASES)
def test_disable_adapters(library, name, model_id, kwargs):
    inputs = inputs_for(model_id)
    base = build(model_id).eval()
    base_output = output(base, inputs)
    model = wrap(library, base, **kwargs).eval()
    before = output(model, inputs)
    assert torch.allclose(base_output, before)
    lr = 1.0 if model_id == "EmbConv1D" else 0.01
    step(model, inputs, torch.optim.SGD(model.parameters(), lr=lr), loss_fn=nll)
    model.eval()
    after = output(model, inputs)
    with model.disable_adapter():
        disabled = output(model, inputs)
    enabled_again = output(model, inputs)
    assert not torch.allclose(before, after, atol=1e-8, rtol=1e-8)
    assert torch.allclose(before, disabled)
    assert torch.allclose(after, enabled_again)


@each_library
@cases(CUSTOM_CASES)
def test_disable_adapters_with_merging(library, name, model_id, kwargs):
    inputs = inputs_for(model_id)
    model = wrap(library, build(model_id), **kwargs).eval()
    before = output(model, inputs)
    step(model, inputs, torch.optim.Adam(model.parameters(), lr=0.01), loss_fn=nll)
    model.eval()
    unmerged = output(model, inputs)
    model.merge_adapter()
    after = output(model, inputs)
    with model.disable_adapter():
        disabled = output(model, inputs)
    enabled_again = output(model, inputs)
    tolerance = {"atol": 1e-5, "rtol": 1e-5}
    assert not torch.allclose(before, after, **tolerance)
    assert torch.allclose(after, unmerged, **tolerance)
    assert torch.allclose(before, disabled, **tolerance)
    assert torch.allclose(after, enabled_again, **tolerance)


@each_library
@cases(CUSTOM_CASES)
def test_disable_adapter_with_bias_warns(library, name, model_id, kwargs):
    def disable(bias):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with wrap(library, build(model_id), **{**kwargs, "bias": bias}).disable_adapter():
                pass
        return [str(w.message) for w in caught if "bias" in str(w.message)]

    assert disable("lora_only") and disable("all")
    assert not disable("none")


@each_library
@cases(ALL_CASES)
def test_disable_adapter(library, name, model_id, kwargs):
    inputs = inputs_for(model_id)

    def result(model):
        torch.manual_seed(0)
        with torch.no_grad():
            if model_id not in GENERATIVE:
                return output(model, inputs)
            prompt = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
            return model.generate(**prompt, max_new_tokens=2, return_dict_in_generate=True, output_scores=True).scores[0]

    base = build(model_id).eval()
    base_result = result(base)
    model = wrap(library, base, **init_false(kwargs)).eval()
    adapted = result(model)
    assert not torch.allclose(base_result, adapted)
    with model.disable_adapter():
        assert torch.allclose(base_result, result(model), atol=1e-6, rtol=1e-6)
    assert torch.allclose(adapted, result(model), atol=1e-6, rtol=1e-6)


@each_library
@cases(ALL_CASES)
def test_disable_adapters_exiting_context_restores_previous_state(library, name, model_id, kwargs):
    model = wrap(library, build(model_id), **kwargs)
    layers = adapter_layers(model)
    assert not any(m.disable_adapters for m in layers)
    with model.disable_adapter():
        pass
    assert not any(m.disable_adapters for m in layers)
    model.disable_adapter_layers()
    assert all(m.disable_adapters for m in layers)
    with model.disable_adapter():
        pass
    assert all(m.disable_adapters for m in layers)


@each_library
@cases(ALL_CASES)
def test_unload_adapter(library, name, model_id, kwargs):
    inputs = inputs_for(model_id)
    base = build(model_id).eval()
    entries = len(base.state_dict())
    with torch.inference_mode():
        base_output = output(base, inputs)
    model = wrap(library, base, **init_false(kwargs))
    with torch.inference_mode():
        adapted = output(model, inputs)
    plain = model.eval().unload()
    with torch.inference_mode():
        unloaded = output(plain, inputs)
    assert not adapter_layers(plain) and not hasattr(plain, "peft_config")
    assert not torch.allclose(adapted, unloaded, atol=1e-10, rtol=1e-10)
    assert torch.allclose(base_output, unloaded, atol=1e-4, rtol=1e-4)
    assert len(plain.state_dict()) == entries


# ---------------------------------------------------------------- several adapters
@each_library
# Several active adapters with trained copies: not additive, refused. With trainable tokens PEFT refuses
# them too ("Only one adapter can be set at a time"); minilora applies the last one's rows (below).
@cases(ALL_CASES, without=WITH_HEADS | TOKEN_CASES)
def test_active_adapter(library, name, model_id, kwargs):
    model = wrap(library, build(model_id), **kwargs)
    assert model.active_adapters == ["default"] and model.active_adapter == "default"
    model.add_adapter("other", config(library, **kwargs))
    assert model.active_adapters == ["default"] and model.active_adapter == "default"
    model.set_adapter("other")
    assert model.active_adapters == ["other"] and model.active_adapter == "other"
    model.base_model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default", "other"]
    assert model.base_model.active_adapter == ["default", "other"]


def check_forgotten(model, adapter, active):
    """No layer or trained copy still holds `adapter`; the copies' active adapters are `active`."""
    for layer in adapter_layers(model):
        assert all(adapter not in table for table in per_adapter_tables(layer))
    for wrapper in trained_copies(model):
        assert adapter not in wrapper.modules_to_save
        assert wrapper.active_adapters == [a for a in active if a in wrapper.modules_to_save]


@each_library
@pytest.mark.parametrize("activate", [True, False], ids=["active", "inactive"])
@cases(ALL_CASES)
def test_delete_adapter(library, activate, name, model_id, kwargs):
    model = wrap(library, build(model_id), **kwargs)
    model.add_adapter("delete_me", config(library, **kwargs))
    if activate:
        model.set_adapter("delete_me")
    model.delete_adapter("delete_me")
    assert "delete_me" not in model.peft_config and model.active_adapters == ["default"]
    check_forgotten(model, "delete_me", ["default"])
    model.delete_adapter("default")  # the last one too
    assert "default" not in model.peft_config and model.active_adapters == []
    check_forgotten(model, "default", [])
    model.base_model(**inputs_for(model_id))  # still runs, as the base model


@each_library
@cases(ALL_CASES)
def test_delete_adapter_properly_cleans_up_after_itself(library, name, model_id, kwargs):
    model = wrap(library, build(model_id), adapter_name="foobar", **kwargs)

    def holding(obj):
        for attr in dir(obj):
            if attr.startswith("_"):
                continue
            try:
                value = getattr(obj, attr)
            except AttributeError:
                continue
            if callable(getattr(value, "keys", None)) and hasattr(value, "__contains__") and "foobar" in value:
                yield attr, value

    owners = [model, *adapter_layers(model)]
    tables = [(obj, attr) for obj in owners for attr, _ in holding(obj)]  # read again after: some are views
    assert tables
    model.delete_adapter(adapter_name="foobar")
    assert not [attr for obj, attr in tables if "foobar" in getattr(obj, attr)]


@each_library
@cases(ALL_CASES)
def test_delete_unknown_adapter_raises(library, name, model_id, kwargs):
    model = wrap(library, build(model_id), **kwargs)
    with pytest.raises(ValueError, match="unknown-adapter"):
        model.delete_adapter("unknown-adapter")


@each_library
@cases(ALL_CASES)
def test_adding_multiple_adapters_with_bias_raises(library, name, model_id, kwargs):
    cfg = config(library, **{**kwargs, "bias": "all"})
    model = lib(library).get_peft_model(build(model_id), cfg, adapter_name="adapter0")
    with pytest.raises(ValueError):
        model.add_adapter("adapter1", dataclasses.replace(cfg, r=20))
    assert "adapter1" not in model.peft_config and "adapter1" not in model.base_model.peft_config


@each_library
@cases(HF_CASES)
def test_passing_input_embeds_works(library, name, model_id, kwargs):
    model = wrap(library, build(model_id), adapter_name="test-adapter", **kwargs)
    inputs = inputs_for(model_id)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    model.forward(inputs_embeds=embeds, **{k: v for k, v in inputs.items() if k.startswith("decoder_")})


@each_library
@cases([c for c in HF_CASES if c[1] in GENERATIVE])
def test_mixed_adapter_batches(library, name, model_id, kwargs):
    torch.manual_seed(0)
    model = wrap(library, build(model_id), adapter_name="adapter0", **init_false(kwargs)).eval()
    model.add_adapter("adapter1", config(library, **init_false(kwargs)))
    model.eval()
    inputs = {k: torch.cat([v] * 3) for k, v in inputs_for(model_id).items()}
    prompt = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}

    def run(**routing):
        with torch.inference_mode():
            scores = model.generate(**prompt, **routing, max_new_tokens=2, return_dict_in_generate=True,
                                    output_scores=True).scores[0]
            return output(model, {**inputs, **routing}), scores

    with model.disable_adapter():
        base = run()
    model.set_adapter("adapter0")
    first = run()
    model.set_adapter("adapter1")
    second = run()
    tolerance = {"atol": 1e-4, "rtol": 1e-4}
    for i in range(2):
        assert len(base[i]) == len(first[i]) == len(second[i]) >= 3
        assert not torch.allclose(base[i], first[i], **tolerance)
        assert not torch.allclose(base[i], second[i], **tolerance)
        assert not torch.allclose(first[i], second[i], **tolerance)
    mixed = run(adapter_names=[("__base__", "adapter0", "adapter1")[i % 3] for i in range(len(prompt["input_ids"]))])
    for i in range(2):
        assert torch.allclose(base[i][::3], mixed[i][::3], **tolerance)
        assert torch.allclose(first[i][1::3], mixed[i][1::3], **tolerance)
        assert torch.allclose(second[i][2::3], mixed[i][2::3], **tolerance)


@each_library
@cases([c for c in HF_CASES if c[1] in GENERATIVE])
def test_generate(library, name, model_id, kwargs):
    model = wrap(library, build(model_id), **kwargs)
    prompt = {k: v for k, v in inputs_for(model_id).items() if k in ("input_ids", "attention_mask")}
    model.generate(**prompt, max_new_tokens=2)
    if model_id in ("gpt2", "llama"):  # PEFT's seq2seq models refuse positional input ids; decoders take them
        model.generate(prompt["input_ids"], max_new_tokens=2)


# A rank-20 adapter needs layers wider than 20 for PEFT's svd: not the MLPs, nor LLaMA's v_proj (16 outputs).
# BERT's adapters share a trained copy of the classifier, which cannot be combined; trainable tokens
# have no weighted form either (test_weighted_combination_with_trainable_tokens_is_refused).
WEIGHTED_CASES = [c for c in HF_CASES if c[1] in ("gpt2", "t5", "bart") and c[0] not in TOKEN_CASES]


@each_library
@cases([c for c in HF_CASES if c[0] in TOKEN_CASES and c[1] != "bert"])
def test_weighted_combination_with_trainable_tokens_is_refused(library, name, model_id, kwargs):
    """Rows trained in full replace the table's; they have no weighted sum. PEFT gives the combined
    adapter fresh rows (the table's own), dropping what both adapters trained; minilora refuses."""
    cfg = config(library, **init_false(kwargs))
    model = lib(library).get_peft_model(build(model_id), copy.deepcopy(cfg), adapter_name="adapter1")
    model.add_adapter("adapter_2", cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".trainable_tokens_delta." in n:
                p.add_(1.0)  # both adapters trained their rows
    if library == "minilora":
        with pytest.raises(ValueError, match="cannot combine"):
            model.add_weighted_adapter(["adapter1", "adapter_2"], [0.5, 0.5], "mix", combination_type="cat")
        return
    model.add_weighted_adapter(["adapter1", "adapter_2"], [0.5, 0.5], "mix", combination_type="cat")
    table = model.get_input_embeddings().token_adapter.base_layer.weight
    mixed = dict(model.named_parameters())[next(n for n, _ in model.named_parameters() if n.endswith("delta.mix"))]
    assert torch.equal(mixed, table[[0, 1, 3]])


@pytest.mark.parametrize("model_id", ["gpt2", "llama"])
def test_several_active_adapters_with_trainable_tokens(model_id):
    """PEFT refuses a second active adapter on a token wrapper; minilora applies the last active
    adapter's rows, as a single active adapter would (its LoRA layers add both)."""
    kwargs = {**DECODER, "trainable_token_indices": [0, 1, 3], "init_lora_weights": False}
    models = {library: wrap(library, build(model_id), **kwargs) for library in LIBRARIES}
    for library, model in models.items():
        model.add_adapter("other", config(library, **kwargs))
    with pytest.raises(ValueError, match="Only one adapter can be set at a time"):
        models["peft"].base_model.set_adapter(["default", "other"])
    model = models["minilora"].eval()
    model.base_model.set_adapter(["default", "other"])
    inputs = inputs_for(model_id)
    ids = inputs["input_ids"]
    with torch.no_grad():
        embedded = model.get_input_embeddings()(ids)
        model.set_adapter("other")
        alone = model.get_input_embeddings()(ids)
    assert torch.equal(embedded, alone)


@each_library
@pytest.mark.parametrize("weights", [[0.5, 1.5, 1.5], [-0.5, -0.8, -1.2]], ids=["positive", "negative"])
@cases(WEIGHTED_CASES)
def test_weighted_combination_of_adapters(library, weights, name, model_id, kwargs):
    kwargs = init_false(kwargs)
    cfg = config(library, **kwargs)
    model = lib(library).get_peft_model(build(model_id), copy.deepcopy(cfg), adapter_name="adapter1")
    model.add_adapter("adapter_2", cfg)
    model.add_adapter("adapter_3", dataclasses.replace(cfg, r=20))
    names = ["adapter1", "adapter_2", "adapter_3"]
    model.add_weighted_adapter(names[:1], weights[:1], "single_adapter_reweighting")
    model.add_weighted_adapter(names[1:], weights[1:], "multi_adapter_svd_reweighting")
    model.add_weighted_adapter(names[1:], weights[1:], "multi_adapter_cat_reweighting", combination_type="cat")
    model.add_weighted_adapter(names[:2], weights[:2], "multi_adapter_linear_reweighting", combination_type="linear")
    model.add_weighted_adapter(names[:2], [weights[0], 0], "multi_adapter_linear_reweighting_single_enabled",
                               combination_type="linear")
    with pytest.raises(ValueError):
        model.add_weighted_adapter(names[1:], weights[1:], "uneven_r", combination_type="linear")
    new = ["single_adapter_reweighting", "multi_adapter_svd_reweighting", "multi_adapter_cat_reweighting",
           "multi_adapter_linear_reweighting", "multi_adapter_linear_reweighting_single_enabled"]
    assert all(n in model.peft_config for n in new)
    expected_rank = {"svd": 20, "cat": 28, "linear": 8}
    for layer in adapter_layers(model):
        single = delta_weight(layer, "single_adapter_reweighting")
        assert torch.allclose(single, delta_weight(layer, "adapter1") * weights[0], atol=1e-4, rtol=1e-4)
        for adapter in new[1:]:
            kind = next(k for k in expected_rank if k in adapter)
            assert rank(layer, adapter) == expected_rank[kind], (adapter, rank(layer, adapter))
    model.eval()
    for adapter in new:
        model.set_adapter(adapter)
        assert model.active_adapter == adapter and model.active_adapters == [adapter]
        output(model, inputs_for(model_id))


# ---------------------------------------------------------------- the base model's weights
BASE_STATE = {library: (lib(library).get_base_model_state_dict, lib(library).set_base_model_state_dict)
              for library in LIBRARIES}


@each_library
@cases(ALL_CASES)
def test_get_base_model_state_dict(library, name, model_id, kwargs):
    get_state, set_state = BASE_STATE[library]
    base = build(model_id)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = wrap(library, base, **kwargs)
    extracted = get_state(model)
    assert set(extracted) == set(original)
    assert all(torch.allclose(original[k], extracted[k]) for k in original)
    with torch.no_grad():
        for p in model.get_base_model().parameters():
            p.add_(torch.randn_like(p) * 0.1)
    result = set_state(model, original, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    restored = get_state(model)
    assert all(torch.allclose(original[k], restored[k]) for k in original)


# ---------------------------------------------------------------- several adapters on PEFT's MLPs
@each_library
def test_set_adapter_non_overlapping_modules(library):
    model = wrap(library, DeepMLP(size=256), target_modules=["layers.0.lin0", "layers.1.lin0"])
    model.add_adapter("other", config(library, target_modules=["layers.1.lin0", "layers.2.lin0"]))
    tuner = model.base_model
    for switch, name in [(model.set_adapter, "default"), (model.set_adapter, "other"), (model.set_adapter, "default"),
                         (tuner.set_adapter, ["other"]), (tuner.set_adapter, ["default"])]:
        switch(name)
        active = [name] if isinstance(name, str) else name
        assert tuner.active_adapters == active
        assert all(tuner.layers[i].lin0.active_adapters == active for i in range(3))


@each_library
def test_set_adapter_non_overlapping_modules_to_save(library):
    model = wrap(library, DeepMLP(size=256), target_modules=["layers.0.lin0"])
    model.add_adapter("other", config(library, target_modules=["layers.0.lin0"], modules_to_save=["layers.0.lin1"]))
    tuner = model.base_model
    copy_of_other = tuner.layers[0].lin1.modules_to_save["other"].weight
    assert tuner.layers[0].lin1.active_adapters == [] and copy_of_other.requires_grad is False
    for switch, name in [(model.set_adapter, "other"), (model.set_adapter, "default"),
                         (tuner.set_adapter, ["other"]), (tuner.set_adapter, ["default"])]:
        switch(name)
        other = name in ("other", ["other"])
        assert tuner.layers[0].lin0.active_adapters == ([name] if isinstance(name, str) else name)
        assert tuner.layers[0].lin1.active_adapters == (["other"] if other else [])
        assert copy_of_other.requires_grad is other


@each_library
@pytest.mark.parametrize("saved", [(["layers.0.lin1"], ["layers.0.lin1"]),
                                   (["layers.0.lin1", "layers.1.lin1"], ["layers.2.lin1", "layers.1.lin1"])],
                         ids=["same", "overlapping"])
def test_multiple_active_adapters_with_shared_modules_to_save_raises(library, saved):
    model = wrap(library, DeepMLP(size=256), target_modules=["layers.0.lin0"], modules_to_save=saved[0])
    model.add_adapter("other", config(library, target_modules=["layers.0.lin0"], modules_to_save=saved[1]))
    with pytest.raises(ValueError, match="(?i)only one adapter"):
        model.base_model.set_adapter(["default", "other"])


@each_library
def test_multiple_active_adapters_with_different_modules_to_save_works(library):
    model = wrap(library, DeepMLP(size=256), target_modules=["layers.0.lin0"], modules_to_save=["layers.0.lin1"])
    model.add_adapter("other", config(library, target_modules=["layers.0.lin0"], modules_to_save=["layers.1.lin1"]))
    model.base_model.set_adapter(["default", "other"])
    assert model.base_model.model.layers[0].lin1.active_adapters == ["default"]
    assert model.base_model.model.layers[1].lin1.active_adapters == ["other"]


@each_library
def test_add_adapter_rejects_duplicate_name_without_mutation(library):
    model = wrap(library, MLP(), adapter_name="existing", target_modules=["lin0"], r=2, init_lora_weights=False)
    config_before = model.peft_config["existing"]
    state_before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="existing"):
        model.add_adapter("existing", config(library, target_modules=["lin0"], r=4, init_lora_weights=False))
    assert model.peft_config["existing"] is config_before
    state_after = model.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[k], v) for k, v in state_before.items())


@each_library
def test_delete_adapter_with_multiple_adapters_works(library):
    model = wrap(library, MLP(), adapter_name="adapter0", target_modules=["lin0"])
    model.add_adapter("adapter1", config(library, target_modules=["lin0"]))
    model.add_adapter("adapter2", config(library, target_modules=["lin0"]))
    inputs = inputs_for("MLP")
    for deleted, active in [(None, ["adapter0"]), ("adapter0", ["adapter1"]), ("adapter2", ["adapter1"])]:
        if deleted:
            model.delete_adapter(deleted)
        assert model.active_adapters == active
        model(**inputs)


@each_library
def test_delete_adapter_multiple_adapters_with_modules_to_save(library):
    model = wrap(library, MLP(), adapter_name="adapter0", target_modules=["lin0"], modules_to_save=["lin1"])
    model.add_adapter("adapter1", config(library, target_modules=["lin0"]))
    model.add_adapter("adapter2", config(library, target_modules=["lin0"], modules_to_save=["lin1"]))
    copies = model.base_model.model.lin1.modules_to_save
    inputs = inputs_for("MLP")
    assert model.active_adapters == ["adapter0"] and model.modules_to_save == {"lin1"}
    assert set(copies) == {"adapter0", "adapter2"}
    model(**inputs)
    for deleted, active in [("adapter0", ["adapter1"]), ("adapter1", ["adapter2"])]:
        model.delete_adapter(deleted)
        assert model.active_adapters == active and model.modules_to_save == {"lin1"}
        assert set(copies) == {"adapter2"}
        model(**inputs)
    model.delete_adapter("adapter2")
    assert model.active_adapters == [] and model.modules_to_save is None and set(copies) == set()


@each_library
def test_set_requires_grad(library):
    model = wrap(library, DeepMLP(size=256), adapter_name="adapter0", target_modules=["layers.0.lin0"]).eval()
    model.add_adapter("adapter1", config(library, target_modules=["layers.0.lin0", "layers.1.lin0"],
                                         modules_to_save=["layers.2.lin0"]))

    def grads(adapter):
        return {p.requires_grad for n, p in model.named_parameters() if f".{adapter}." in n}

    assert grads("adapter0") == {True} and grads("adapter1") == {False}
    model.set_requires_grad(adapter_names="adapter1")
    assert grads("adapter0") == {True} and grads("adapter1") == {True}
    model.set_requires_grad(adapter_names=["adapter0", "adapter1"], requires_grad=False)
    assert grads("adapter0") == {False} and grads("adapter1") == {False}


@each_library
def test_weight_bias_attributes(library):
    layer = wrap(library, MLP(), target_modules=["lin0"]).base_model.model.lin0
    assert hasattr(layer, "weight") and hasattr(layer, "bias")


@each_library
@pytest.mark.parametrize("first_has_copy", [True, False], ids=["first", "second"])
def test_multiple_adapters_mixed_modules_to_save(library, first_has_copy):
    with_copy = {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}
    without = {"target_modules": ["lin0"]}
    model = wrap(library, MLP(), **(with_copy if first_has_copy else without))
    model.add_adapter("other", config(library, **(without if first_has_copy else with_copy)))
    copies = model.base_model.lin1.modules_to_save
    assert ("default" in copies) is first_has_copy and ("other" in copies) is not first_has_copy
    model(**inputs_for("MLP"))
    model.set_adapter("other")
    model(**inputs_for("MLP"))


@each_library
def test_multiple_adapters_mixed_modules_to_save_merging_adapters(library):
    model = wrap(library, MLP(), target_modules=["lin0"], modules_to_save=["lin1"])
    model.add_adapter("other", config(library, target_modules=["lin0"]))
    model.add_weighted_adapter(["default", "other"], weights=[1.0, 1.0], adapter_name="merged")
    copies = model.base_model.model.lin1.modules_to_save
    assert "default" in copies and "other" not in copies and "merged" in copies
    model.set_adapter("merged")
    model(**inputs_for("MLP"))


@each_library
def test_multiple_adapters_same_modules_to_save_merging_adapters_raises(library):
    model = wrap(library, MLP(), target_modules=["lin0"], modules_to_save=["lin1"])
    model.add_adapter("other", config(library, target_modules=["lin0"], modules_to_save=["lin1"]))
    with pytest.raises(ValueError, match="modules_to_save"):
        model.add_weighted_adapter(["default", "other"], weights=[1.0, 1.0], adapter_name="merged")


@each_library
def test_multiple_adapters_seq_cls_same_heads_merging_adapters_raises(library):
    model = wrap(library, build("bert"), task_type="SEQ_CLS")
    model.add_adapter("other", config(library, task_type="SEQ_CLS"))
    assert "default" in model.base_model.classifier.modules_to_save
    assert "other" in model.base_model.classifier.modules_to_save
    with pytest.raises(ValueError, match="modules_to_save"):
        model.add_weighted_adapter(["default", "other"], weights=[1.0, 1.0], adapter_name="merged")


@each_library
def test_add_weighted_adapter_cat_with_rank_pattern(library):
    model = wrap(library, MLP(), target_modules=["lin0", "lin1"], r=8, rank_pattern={"lin0": 2}, init_lora_weights=False)
    model.add_adapter("other", config(library, target_modules=["lin0", "lin1"], r=8, rank_pattern={"lin0": 16},
                                      init_lora_weights=False))
    model.add_weighted_adapter(["default", "other"], weights=[1.0, 1.0], adapter_name="merged", combination_type="cat")
    for layer in adapter_layers(model):  # "cat" is exact
        expected = delta_weight(layer, "default") + delta_weight(layer, "other")
        assert torch.allclose(delta_weight(layer, "merged"), expected, atol=1e-6)


@each_library
def test_add_weighted_adapter_negative_weight_negates_adapter(library):
    torch.manual_seed(42)
    model = wrap(library, MLP(), adapter_name="adapter1", target_modules=["lin0"], init_lora_weights=False)
    model.add_weighted_adapter(["adapter1"], [-1.0], "merged_negative", combination_type="linear")
    for layer in adapter_layers(model):
        assert torch.allclose(delta_weight(layer, "adapter1"), -delta_weight(layer, "merged_negative"), atol=1e-6)


@each_library
def test_add_weighted_adapter_negative_weight_with_different_scaling(library):
    torch.manual_seed(42)
    model = wrap(library, MLP(), adapter_name="adapter1", r=8, lora_alpha=16, target_modules=["lin0"],
                 init_lora_weights=False)
    model.add_adapter("adapter2", config(library, r=8, lora_alpha=32, target_modules=["lin0"], init_lora_weights=False))
    model.add_weighted_adapter(["adapter1", "adapter2"], [0.5, -0.3], "merged_diff_scaling", combination_type="linear")
    model.set_adapter("merged_diff_scaling")
    assert torch.isfinite(model(torch.randn(2, 10))).all()


@each_library
def test_existing_model_card_is_kept(tmp_path, library):
    (tmp_path / "README.md").write_text("---\nmeta: hello\n---\nThis is a model card\n")
    wrap(library, MLP(), target_modules=["lin0"]).save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "library_name: peft" in card and "meta: hello" in card and "This is a model card" in card


@each_library
def test_non_existing_model_card_is_written(tmp_path, library):
    wrap(library, MLP(), target_modules=["lin0"]).save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "library_name: peft" in card and len(card) > 1000  # pre-filled, not a stub


@each_library
def test_adapter_name_makes_no_difference(library):
    inputs = torch.arange(90).reshape(9, 10)
    torch.manual_seed(0)
    base_output = MLP().eval()(inputs)
    results = {}
    for adapter in ("default", "adapter", "other-name"):
        torch.manual_seed(0)
        base = MLP().eval()
        torch.manual_seed(0)
        model = wrap(library, base, adapter_name=adapter, target_modules=["lin0"], init_lora_weights=False).eval()
        results[adapter] = (model(inputs), model.state_dict())
    reference, state = results["default"]
    for adapter, (out, other_state) in results.items():
        assert len(other_state) == len(state)
        for key, value in state.items():
            assert torch.allclose(value, other_state[key.replace("default", adapter)])
        assert not torch.allclose(base_output, out)
        assert torch.allclose(reference, out)


# ---------------------------------------------------------------- ranks per module (TestMultiRankAdapter)
@each_library
def test_multirank(library):
    model = wrap(library, MLP(), adapter_name="first", r=8, lora_alpha=8, init_lora_weights=False,
                 target_modules=["lin0", "lin1"])
    model.add_adapter("second", config(library, r=8, lora_alpha=8, init_lora_weights=False,
                                       target_modules=["lin0", "lin1"], rank_pattern={"lin0": 4},
                                       alpha_pattern={"lin0": 4}))
    assert factors(model.base_model.model.lin0, "second")[0].shape[0] == 4


@each_library
def test_multirank_2(library):
    rank_pattern = {f"layers.{i}.lin{j}": 64 // (i + 1) for i in range(10) for j in range(2)}
    alpha_pattern = {key: 2 * r for key, r in rank_pattern.items()}
    kwargs = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": ["lin0", "lin1"],
              "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    model = wrap(library, DeepMLP(), adapter_name="first", **kwargs)
    model.add_adapter("second", config(library, **kwargs))
    layers = named_layers(model)
    assert len(layers) == 24
    for adapter in ("first", "second"):
        for path, layer in layers.items():
            assert factors(layer, adapter)[0].shape[0] == rank_pattern.get(path, 4), (adapter, path)


# ---------------------------------------------------------------- several active adapters (TestMultipleActiveAdapters)
MULTIPLE_ACTIVE = [("LoRA Same", ["lin0"], ["lin0"]), ("LoRA Different", ["lin0"], ["lin1"])]
multiple_active = pytest.mark.parametrize("first, second", [c[1:] for c in MULTIPLE_ACTIVE],
                                          ids=[c[0] for c in MULTIPLE_ACTIVE])


def base_mlp_output():
    """What the MLP that `two_adapters` wraps computes on its own."""
    torch.manual_seed(0)
    return MLP().eval()(**inputs_for("MLP"))


def two_adapters(library, first, second, names=("adapter_1", "adapter_2")):
    torch.manual_seed(0)
    model = wrap(library, MLP().eval(), adapter_name=names[0], target_modules=first, init_lora_weights=False)
    model.add_adapter(names[1], config(library, target_modules=second, init_lora_weights=False))
    return model.eval()


@each_library
@multiple_active
def test_multiple_active_adapters_forward(library, first, second):
    model = two_adapters(library, first, second)
    inputs = inputs_for("MLP")
    model.set_adapter("adapter_1")
    one = model(**inputs)
    model.set_adapter("adapter_2")
    two = model(**inputs)
    model.base_model.set_adapter(["adapter_1", "adapter_2"])
    both = model(**inputs)
    assert not torch.allclose(one, two, atol=1e-5)
    assert not torch.allclose(one, both, atol=1e-5)
    assert not torch.allclose(two, both, atol=1e-5)
    model.add_weighted_adapter(["adapter_1", "adapter_2"], [1.0, 1.0], "new_combined_adapter", combination_type="cat")
    model.set_adapter("new_combined_adapter")
    assert torch.allclose(model(**inputs), both, atol=1e-5)


@each_library
@multiple_active
def test_multiple_active_adapters_merge_and_unmerge(library, first, second):
    inputs, base_output = inputs_for("MLP"), base_mlp_output()
    model = two_adapters(library, first, second)
    model.base_model.set_adapter(["adapter_1", "adapter_2"])
    both = model(**inputs)
    model.merge_adapter()
    assert torch.allclose(model(**inputs), both, atol=1e-4)
    model.unmerge_adapter()
    with model.disable_adapter():
        assert torch.allclose(model(**inputs), base_output, atol=1e-4)


@each_library
@multiple_active
def test_merge_layers_multi(library, first, second):
    inputs = inputs_for("MLP")
    model = two_adapters(library, first, second, names=("default", "adapter-2"))
    tolerance = {"atol": 1e-3, "rtol": 1e-3}
    with torch.inference_mode():
        one = model(**inputs)
        model.set_adapter("adapter-2")
        two = model(**inputs)
        model.set_adapter("default")
        assert not torch.allclose(one, two, **tolerance)
        assert torch.allclose(model(**inputs), one, **tolerance)
    copies = [copy.deepcopy(model), copy.deepcopy(model)]
    with torch.inference_mode():
        merged_all = model.merge_and_unload(adapter_names=["adapter-2", "default"])(**inputs)
        assert not torch.allclose(merged_all, one, **tolerance) and not torch.allclose(merged_all, two, **tolerance)
        assert torch.allclose(copies[0].merge_and_unload(adapter_names=["adapter-2"])(**inputs), two, **tolerance)
        assert torch.allclose(copies[1].merge_and_unload(adapter_names=["default"])(**inputs), one, **tolerance)


@each_library
@multiple_active
def test_sequential_merge_matches_batch_merge(library, first, second):
    inputs = inputs_for("MLP")
    model = two_adapters(library, first, second)
    sequential = copy.deepcopy(model)
    model.merge_adapter(["adapter_1", "adapter_2"])
    sequential.merge_adapter(["adapter_1"])
    sequential.merge_adapter(["adapter_2"])
    assert torch.allclose(sequential(**inputs), model(**inputs), atol=1e-3, rtol=1e-3)


@each_library
@multiple_active
def test_unmerge_after_sequential_merge_restores_base(library, first, second):
    inputs, base_output = inputs_for("MLP"), base_mlp_output()
    model = two_adapters(library, first, second)
    model.merge_adapter(["adapter_1"])
    model.merge_adapter(["adapter_2"])
    model.unmerge_adapter()
    with model.disable_adapter():
        assert torch.allclose(model(**inputs), base_output, atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------- which parameters train (TestRequiresGrad)
LORA_0 = {"base_model.model.lin0.lora_A.{}.weight", "base_model.model.lin0.lora_B.{}.weight"}
COPY_1 = {"base_model.model.lin1.modules_to_save.{}.weight", "base_model.model.lin1.modules_to_save.{}.bias"}


def named(templates, adapter):
    return {t.format(adapter) for t in templates}


@each_library
def test_requires_grad_modules_to_save_disabling(library):
    model = wrap(library, MLP(), target_modules=["lin0"], modules_to_save=["lin1"])
    expected = named(LORA_0 | COPY_1, "default")
    assert requiring_grad(model) == expected
    model.disable_adapter_layers()
    assert requiring_grad(model) == set()
    model.enable_adapter_layers()
    assert requiring_grad(model) == expected
    with model.disable_adapter():
        assert requiring_grad(model) == set()
    assert requiring_grad(model) == expected


@each_library
def test_requires_grad_follows_inference_mode_modules_to_save(library):
    model = wrap(library, MLP(), target_modules=["lin0"], modules_to_save=["lin1"])
    model.add_adapter("adapter1", config(library, target_modules=["lin0"], modules_to_save=["lin1"]))
    assert requiring_grad(model) == named(LORA_0 | COPY_1, "default")
    for adapter in ("default", "adapter1"):
        model.set_adapter(adapter)
        assert requiring_grad(model) == named(LORA_0 | COPY_1, adapter)
    for adapter in ("default", "adapter1"):
        model.set_adapter(adapter, inference_mode=False)
        assert requiring_grad(model) == named(LORA_0 | COPY_1, adapter)
    for adapter in ("default", "adapter1"):
        model.set_adapter(adapter, inference_mode=True)
        assert requiring_grad(model) == set()


@each_library
@pytest.mark.parametrize("second", ["lin1", "lin0"], ids=["different targets", "same targets"])
def test_requires_grad_lora(library, second):
    model = wrap(library, MLP(), target_modules=["lin0"])
    model.add_adapter("adapter1", config(library, target_modules=[second]))
    expected = named(LORA_0, "default")
    assert requiring_grad(model) == expected
    model.set_adapter("default")
    assert requiring_grad(model) == expected
    model.set_adapter("adapter1")
    expected = {f"base_model.model.{second}.lora_A.adapter1.weight", f"base_model.model.{second}.lora_B.adapter1.weight"}
    assert requiring_grad(model) == expected
    with model.disable_adapter():
        assert requiring_grad(model) == set()
    assert requiring_grad(model) == expected


# ---------------------------------------------------------------- initialisation (TestLoraInitialization)
class Wide(nn.Module):
    """A 1000 x 1000 Linear: enough weights for the statistics to settle."""

    def __init__(self, bias=True):
        super().__init__()
        self.linear = nn.Linear(1000, 1000, bias=bias)
        self.other = nn.Linear(1000, 10, bias=bias)

    def forward(self, x):
        return self.other(self.linear(x))


def ks_distance(samples, cdf):
    """Kolmogorov-Smirnov statistic of `samples` against a distribution's CDF."""
    x, _ = samples.flatten().double().sort()
    n = len(x)
    f = cdf(x)
    upper = torch.arange(1, n + 1, dtype=torch.double) / n - f
    lower = f - torch.arange(0, n, dtype=torch.double) / n
    return max(upper.max().item(), lower.max().item())


def uniform_cdf(low, high):
    return lambda x: ((x - low) / (high - low)).clamp(0, 1)


def normal_cdf(mean, std):
    return lambda x: 0.5 * (1 + torch.erf((x - mean) / (std * math.sqrt(2))))


KS_CRITICAL = 1.63 / math.sqrt(8000)  # 1% level for 8 000 samples (r = 8 rows of 1 000)


@each_library
def test_lora_linear_init_default(library):
    torch.manual_seed(0)
    A, B = factors(wrap(library, Wide(), target_modules=["linear"]).base_model.model.linear, "default")
    A = A.detach()
    assert ks_distance(A, uniform_cdf(A.min().item(), A.max().item())) < KS_CRITICAL
    assert ks_distance(A, normal_cdf(A.mean().item(), A.std().item())) > KS_CRITICAL
    assert (B == 0).all()


@each_library
def test_lora_linear_init_gaussian(library):
    torch.manual_seed(0)
    layer = wrap(library, Wide(), target_modules=["linear"], init_lora_weights="gaussian").base_model.model.linear
    A, B = factors(layer, "default")
    A = A.detach()
    assert ks_distance(A, normal_cdf(0.0, 1 / 8)) < KS_CRITICAL  # std 1/r
    assert ks_distance(A, uniform_cdf(A.min().item(), A.max().item())) > KS_CRITICAL
    assert (B == 0).all()


@each_library
def test_lora_linear_false(library):
    torch.manual_seed(0)
    _, B = factors(wrap(library, Wide(), target_modules=["linear"], init_lora_weights=False).base_model.model.linear,
                   "default")
    assert not torch.allclose(B, torch.zeros_like(B))


@each_library
@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha/r", "alpha/sqrt(r)"])
def test_lora_scaling(library, use_rslora):
    model = wrap(library, Wide(), target_modules=["linear"], lora_alpha=3, r=16, use_rslora=use_rslora)
    expected = 3 / (16 ** 0.5) if use_rslora else 3 / 16
    assert scaling(model.base_model.model.linear, "default") == expected


@each_library
@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha/r", "alpha/sqrt(r)"])
def test_lora_scaling_pattern(library, use_rslora):
    model = wrap(library, Wide(), target_modules=["linear", "other"], rank_pattern={"other": 9},
                 alpha_pattern={"linear": 11}, lora_alpha=17, r=25, use_rslora=use_rslora)
    root = (lambda r: r ** 0.5) if use_rslora else (lambda r: r)
    assert scaling(model.base_model.model.linear, "default") == 11 / root(25)
    assert scaling(model.base_model.model.other, "default") == 17 / root(9)


@each_library
def test_rank_alpha_pattern_override(library):
    def first_scaling(**patterns):
        layer = Wide()
        model = wrap(library, nn.Sequential(layer, layer), target_modules=["linear"], lora_alpha=1, r=8, **patterns)
        return scaling(model.base_model.model[0].linear, "default")

    assert first_scaling(alpha_pattern={"0.linear": 2}) == 2 / 8
    assert first_scaling(rank_pattern={"linear": 8}, alpha_pattern={"0.linear": 2}) == 2 / 8


@each_library
@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_lora_with_bias_argument(library, bias):
    model = wrap(library, Wide(), target_modules=["linear"], bias=bias)
    trained = {n for n, p in model.named_parameters() if n.endswith("bias") and p.requires_grad}
    expected = {"none": set(), "all": {"base_model.model.linear.base_layer.bias", "base_model.model.other.bias"},
                "lora_only": {"base_model.model.linear.base_layer.bias"}}
    assert trained == expected[bias]


@each_library
def test_lora_with_invalid_bias_is_refused(library):
    with pytest.raises((NotImplementedError, ValueError)):  # PEFT: when wrapping; minilora: in LoraConfig already
        wrap(library, Wide(), target_modules=["linear"], bias="invalid")


@each_library
def test_multiple_configs_with_bias_raises(library):
    model = wrap(library, Wide(), target_modules=["linear"], bias="all")
    with pytest.raises(ValueError, match="only 1 adapter with bias"):
        model.add_adapter("other", config(library, target_modules=["linear"], bias="lora_only"))
    assert len(model.peft_config) == 1
    model.add_adapter("other", config(library, target_modules=["linear"], bias="none"))


@each_library
def test_modules_to_save_targets_lora_layer_raises(library):
    with pytest.raises(ValueError):
        wrap(library, Wide(), adapter_name="foobar", target_modules=["linear"], modules_to_save=["foobar"])


# ---------------------------------------------------------------- which modules are targeted (test_tuners_utils)
TARGETED = [
    ({"target_modules": "lin0"}, ["lin0"]),
    ({"target_modules": "lin.*"}, ["lin0", "lin1"]),
    ({"target_modules": ["lin0"]}, ["lin0"]),
    ({"target_modules": ["lin0", "lin1"]}, ["lin0", "lin1"]),
    ({"target_modules": "lin.*", "exclude_modules": "lin0"}, ["lin1"]),
    ({"target_modules": ["lin0", "lin1"], "exclude_modules": "lin0"}, ["lin1"]),
    ({"target_modules": ["lin0", "lin1"], "exclude_modules": ["lin0"]}, ["lin1"]),
]


@each_library
@pytest.mark.parametrize("kwargs, expected", TARGETED, ids=[str(k) for k, _ in TARGETED])
def test_targeted_module_names(library, kwargs, expected):
    assert wrap(library, MLP(), **kwargs).targeted_module_names == expected


@each_library
@pytest.mark.parametrize("layers_pattern", [None, "layers", ["h", "layers"]])
def test_layers_to_transform_filters_by_layer_not_expert_index(library, layers_pattern):
    model = wrap(library, ToyMoE(), target_modules=["q_proj", "up_proj"], layers_pattern=layers_pattern,
                 layers_to_transform=[1], r=2, lora_alpha=4)
    assert set(model.targeted_module_names) == {"model.layers.1.self_attn.q_proj",
                                                "model.layers.1.mlp.experts.0.up_proj",
                                                "model.layers.1.mlp.experts.1.up_proj"}


@each_library
def test_targeted_module_names_unique_across_adapters(library):
    model = wrap(library, MLP(), target_modules=["lin1"])
    model.add_adapter("other", config(library, target_modules=["lin0", "lin1"]))
    assert model.base_model.targeted_module_names == ["lin1", "lin0"]


NOT_TARGETED = [
    {"target_modules": ["lin0", "lin1", "relu", "drop", "sm"], "exclude_modules": ["lin0", "lin1", "relu", "drop", "sm"]},
    {"target_modules": ["non_existent_module"]},
    {"target_modules": ["lin0", "non_existent_module"], "exclude_modules": ["lin0"]},
]


@each_library
@pytest.mark.parametrize("kwargs", NOT_TARGETED, ids=["all excluded", "no match", "excluded and unmatched"])
def test_nothing_targeted_raises(library, kwargs):
    with pytest.raises(ValueError):
        wrap(library, MLP(), **kwargs)


@each_library
@pytest.mark.parametrize("extra", [{}, {"modules_to_save": ["lin1"]}], ids=["alone", "with modules_to_save"])
def test_nothing_targeted_by_second_adapter_raises(library, extra):
    model = wrap(library, MLP(), target_modules=["lin0"])
    with pytest.raises(ValueError):
        model.add_adapter("other", config(library, target_modules=["non_existent_module"], **extra))
    assert "other" not in model.peft_config


@each_library
def test_exclude_modules_not_used_warns(library):
    with pytest.warns(UserWarning, match="exclude_modules"):
        wrap(library, MLP(), target_modules=["lin1"], exclude_modules=["non_existent_module"])


# ---------------------------------------------------------------- counting (PeftModel's summary)
@each_library
@cases(ALL_CASES)
def test_get_nb_trainable_parameters(capsys, library, name, model_id, kwargs):
    model = wrap(library, build(model_id), **kwargs)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    assert total == sum(p.numel() for p in model.parameters())
    model.print_trainable_parameters()
    line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    assert capsys.readouterr().out.strip() == line
