"""PEFT users' own code, run twice: as written (`from peft import ...`) and with that import line
changed to `from minilora import ...`, nothing else. The snippets follow PEFT's README and guides
(quick start, save and load, several adapters, the low-level functions, QLoRA through transformers'
BitsAndBytesConfig, transformers' Trainer, TRL's SFT and DPO; test_trl.py holds TRL's other trainers).
Each pair must print the same lines, give the same logits (1e-5) and write the same files. The TRL
snippets train in fp32 (`bf16=False`): under bf16 autocast the two libraries round differently
(minilora adds the low-rank product to the base output in one fused GEMM), by about 4e-5 in the loss.

A snippet sees a few names prepared for it: `base_dir` (a tiny GPT-2 saved as a model directory),
`llama_dir` (a tiny LLaMA), `adapter_dir` and `other_adapter_dir` (LoRA adapters PEFT saved for
base_dir, B not zero; `llama_adapter_dir` for llama_dir), `inputs` (token ids), `tokenizer` (a word
tokenizer over the tiny vocabulary) and `out_dir` (an empty directory of its own). For TRL the
trainer's import line changes too: `from minilora.integrations.trl import SFTTrainer`.
"""

import contextlib
import io
import json
import re
import textwrap
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 128

QUICK_START = """
import torch
from transformers import AutoModelForCausalLM
from peft import LoraConfig, TaskType, get_peft_model

model = AutoModelForCausalLM.from_pretrained(base_dir)
peft_config = LoraConfig(task_type=TaskType.CAUSAL_LM, inference_mode=False, r=8, lora_alpha=32, lora_dropout=0.1)
model = get_peft_model(model, peft_config)
model.print_trainable_parameters()
print(type(model).__name__, model.active_adapters, model.peft_config["default"].task_type)
model.eval()
logits = model(**inputs).logits
generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
"""

SAVE_AND_LOAD = """
from transformers import AutoModelForCausalLM
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel

config = PeftConfig.from_pretrained(adapter_dir)
print(config.r, config.lora_alpha, sorted(config.target_modules), config.task_type)
base = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path)
model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
model.print_trainable_parameters()
print(type(model).__name__)
model.eval()
logits = model(**inputs).logits
auto = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
auto.print_trainable_parameters()
auto_logits = auto(**inputs).logits
model.save_pretrained(out_dir)
"""

MANY_ADAPTERS = """
from transformers import AutoModelForCausalLM
from peft import PeftModel, get_layer_status, get_model_status

base = AutoModelForCausalLM.from_pretrained(base_dir)
model = PeftModel.from_pretrained(base, adapter_dir, adapter_name="first")
result = model.load_adapter(other_adapter_dir, adapter_name="second")
print(result.missing_keys, result.unexpected_keys)
model.eval()
logits = {}
for name in ("first", "second"):
    model.set_adapter(name)
    logits[name] = model(**inputs).logits
for kind in ("linear", "cat", "svd"):
    model.add_weighted_adapter(["first", "second"], [0.7, 0.3], f"mix_{kind}", combination_type=kind)
    model.set_adapter(f"mix_{kind}")
    logits[kind] = model(**inputs).logits
with model.disable_adapter():
    logits["base"] = model(**inputs).logits
status = get_model_status(model)
print(status.base_model_type, status.active_adapters, status.available_adapters, status.num_adapter_layers)
print(status.trainable_params, status.total_params, status.enabled, status.merged_adapters, status.requires_grad)
for layer in get_layer_status(model):
    print(layer.name, layer.module_type, layer.active_adapters, layer.available_adapters)
model.delete_adapter("mix_cat")
print(sorted(model.peft_config))
"""

LOW_LEVEL = """
from transformers import AutoModelForCausalLM
from peft import (LoraConfig, PeftType, get_peft_model_state_dict, inject_adapter_in_model, load_peft_weights,
                  set_peft_model_state_dict)

weights = load_peft_weights(adapter_dir)
print(sorted(weights)[:2], len(weights))
model = AutoModelForCausalLM.from_pretrained(base_dir)
config = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"])
model = inject_adapter_in_model(config, model)
print(type(model).__name__, config.peft_type == PeftType.LORA, PeftType.LORA == "LORA")
state = {key.removeprefix("base_model.model."): value for key, value in weights.items()}
result = set_peft_model_state_dict(model, state)
print(result.unexpected_keys)
model.eval()
logits = model(**inputs).logits
saved = get_peft_model_state_dict(model)
print(sorted(saved) == sorted(state), all(saved[k].equal(state[k]) for k in state))
"""

QLORA_BNB = """
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from peft import LoraConfig, PeftModel, prepare_model_for_kbit_training

bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=bnb_config, device_map="cpu")
model = prepare_model_for_kbit_training(model)
model = PeftModel.from_pretrained(model, llama_adapter_dir, is_trainable=True)
model.print_trainable_parameters()
model.eval()
logits = model(**inputs).logits
merged = model.merge_and_unload()
merged_logits = merged(**inputs).logits
"""

TRAINER = """
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from peft import PeftModel

model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), llama_adapter_dir, is_trainable=True)
rows = torch.randint(3, 128, (8, 12), generator=torch.Generator().manual_seed(3))
train = Dataset.from_dict({"input_ids": rows.tolist(), "labels": rows.tolist()})
args = TrainingArguments(output_dir=str(out_dir / "run"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                         report_to="none", save_strategy="no", logging_steps=1, use_cpu=True, seed=0,
                         dataloader_drop_last=True)
trainer = Trainer(model=model, args=args, train_dataset=train)
trainer.train()
losses = torch.tensor([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
model.eval()
logits = model(**inputs).logits
model.save_pretrained(out_dir / "adapter")
"""

TRL_SFT = """
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer
from peft import PeftModel

model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), llama_adapter_dir, is_trainable=True)
texts = [" ".join(f"w{i * 7 % 100 + j}" for j in range(10)) for i in range(8)]
args = SFTConfig(output_dir=str(out_dir / "run"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                 report_to="none", save_strategy="no", logging_steps=1, use_cpu=True, seed=0, disable_tqdm=True,
                 bf16=False)
trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                     processing_class=tokenizer)
trainer.train()
losses = torch.tensor([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
trainer.save_model(str(out_dir / "adapter"))
"""

TRL_DPO = """
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer
from peft import PeftModel

model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), llama_adapter_dir, is_trainable=True)
pairs = Dataset.from_dict({"prompt": [f"w{i} w{i + 1}" for i in range(8)], "chosen": [f"w{i + 2} w5" for i in range(8)],
                           "rejected": [f"w{i + 40} w9 w{i}" for i in range(8)]})
args = DPOConfig(output_dir=str(out_dir / "run"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                 beta=0.1, report_to="none", save_strategy="no", logging_steps=1, use_cpu=True, seed=0,
                 disable_tqdm=True, bf16=False)
trainer = DPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
print(trainer.ref_model)
trainer.train()
losses = torch.tensor([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
"""

SNIPPETS = {"quick start": QUICK_START, "save and load": SAVE_AND_LOAD, "several adapters": MANY_ADAPTERS,
            "low level": LOW_LEVEL, "QLoRA through BitsAndBytesConfig": QLORA_BNB, "transformers Trainer": TRAINER,
            "TRL SFT": TRL_SFT, "TRL DPO": TRL_DPO}


def tokenizer():
    """A word-level tokenizer over the tiny vocabulary: "<pad>", "<eos>", "<unk>", w0 … w124."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocabulary = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 3)]
    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def with_minilora(source: str) -> str:
    """The snippet with `from peft import` changed to `from minilora import` (and TRL's trainers taken
    from `minilora.integrations.trl`), and nothing else."""
    changed, count = re.subn(r"^from peft import", "from minilora import", source, flags=re.M)
    changed = re.sub(r"^from trl import (\w+Config), (\w+Trainer)$",
                     r"from trl import \1\nfrom minilora.integrations.trl import \2", changed, flags=re.M)
    assert count == 1 and "peft." not in changed
    return changed


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The directories every snippet may use, made once (the adapters by PEFT)."""
    root = tmp_path_factory.mktemp("snippets")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(root / "gpt2")
    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(root / "llama")
    for name, seed in (("adapter", 1), ("other_adapter", 2)):
        torch.manual_seed(seed)
        base = GPT2LMHeadModel.from_pretrained(root / "gpt2")
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], init_lora_weights=False,
                                 task_type="CAUSAL_LM")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out note for GPT-2's Conv1D
            peft.get_peft_model(base, config).save_pretrained(root / name)
    torch.manual_seed(3)
    llama = peft.get_peft_model(LlamaForCausalLM.from_pretrained(root / "llama"),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False, task_type="CAUSAL_LM"))
    llama.save_pretrained(root / "llama_adapter")
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    return {"base_dir": str(root / "gpt2"), "llama_dir": str(root / "llama"), "adapter_dir": str(root / "adapter"),
            "other_adapter_dir": str(root / "other_adapter"), "llama_adapter_dir": str(root / "llama_adapter"),
            "inputs": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "tokenizer": tokenizer()}


def run(source: str, prepared: dict, out_dir) -> tuple[list[str], dict]:
    """(the printed lines, the snippet's variables) of one run; the same seed before each."""
    out_dir.mkdir()
    namespace = {**prepared, "out_dir": out_dir}
    printed = io.StringIO()
    torch.manual_seed(0)
    with contextlib.redirect_stdout(printed), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(textwrap.dedent(source), "<snippet>", "exec"), namespace)
    timings = r"'train_(runtime|samples_per_second|steps_per_second)': '[^']*'"  # the clock's, not the library's
    return [re.sub(timings, "", line) for line in printed.getvalue().splitlines()], namespace


def tensors_in(namespace: dict) -> dict:
    """The snippet's results to compare: its tensors and dicts of tensors, by name."""
    found = {}
    for name, value in namespace.items():
        if isinstance(value, torch.Tensor) and name not in ("rows",):
            found[name] = value
        elif isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()) \
                and name not in ("inputs", "weights", "state", "saved"):
            found.update({f"{name}[{k}]": v for k, v in value.items()})
    return found


def written(folder) -> dict:
    """The files a snippet wrote: each adapter's tensors, its config's LoRA fields, the other file names."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and "run" not in p.relative_to(folder).parts
                       and p.name != "minilora_config.json"):  # minilora's one file more (docs/peft-users.md)
        key = str(path.relative_to(folder))
        if path.suffix == ".safetensors":
            files[key] = load_file(path)
        elif path.name == "adapter_config.json":
            config = json.loads(path.read_text())
            files[key] = {k: config.get(k) for k in ("r", "lora_alpha", "peft_type", "task_type", "bias",
                                                     "fan_in_fan_out", "target_modules", "base_model_name_or_path")}
            files[key]["target_modules"] = sorted(files[key]["target_modules"])
        else:
            files[key] = None  # README.md: its presence
    return files


@pytest.mark.parametrize("name", SNIPPETS)
def test_a_peft_snippet_runs_the_same_with_only_the_import_changed(name, prepared, tmp_path):
    source = SNIPPETS[name]
    printed_peft, theirs = run(source, prepared, tmp_path / "peft")
    printed_ours, ours = run(with_minilora(source), prepared, tmp_path / "minilora")
    assert printed_ours == printed_peft
    expected, got = tensors_in(theirs), tensors_in(ours)
    assert expected.keys() == got.keys() and expected
    for key in expected:
        if expected[key].is_floating_point():
            torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-5, msg=key)
        else:
            assert torch.equal(got[key], expected[key]), key
    files_peft, files_ours = written(tmp_path / "peft"), written(tmp_path / "minilora")
    assert files_ours.keys() == files_peft.keys()
    for key, value in files_peft.items():
        if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
            assert files_ours[key].keys() == value.keys(), key
            for tensor in value:
                torch.testing.assert_close(files_ours[key][tensor], value[tensor], atol=1e-5, rtol=1e-5)
        else:
            assert files_ours[key] == value, key
