"""The role tables of every family: the roles each model has, proven on the model's own attention
code, and PEFT's default targets when target_modules is None."""

import importlib
import sys
from pathlib import Path

import peft
import pytest
import torch
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS
from zoo import FAMILY_CONFIGS, build_family, family_inputs, probe_family

from minilora import LoraConfig, get_peft_model
from minilora.families import DEFAULT_TARGETS, FAMILIES
from minilora.roles import classify, family_of, supported_roles

DOCS = Path(__file__).resolve().parents[1] / "docs"
LLAMA_ROLES = ["q", "k", "v", "o", "up", "down", "gate"]
BERT_ROLES = ["q", "k", "v", "o", "up", "down"]
ROLES = {  # model_type -> the roles its tiny model has (experts' gate/up/down are 3-D parameters)
    **{t: LLAMA_ROLES for t in ("llama", "phi3", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3", "qwen3_5_text",
                                "mistral", "olmo2", "modernbert", "qwen3_moe", "mixtral", "gpt_oss")},
    **{t: BERT_ROLES for t in ("gpt2", "bert", "t5", "bart", "gpt_neox", "bloom", "falcon", "gpt_bigcode", "mpt", "phi",
                               "gptj", "opt", "starcoder2", "deberta-v2", "distilbert", "whisper")},
}
SEPARATE_QKV = sorted(t for t in FAMILY_CONFIGS  # q, k, v in modules of their own, attention through eager_attention_forward
                      if t not in ("gpt2", "gpt_neox", "bloom", "falcon", "gpt_bigcode", "mpt", "phi3", "modernbert",
                                   "deberta-v2"))


def test_every_family_tested_has_a_role_table_and_the_other_way_round():
    assert sorted(ROLES) == sorted(FAMILY_CONFIGS)


@pytest.mark.parametrize("model_type", sorted(FAMILY_CONFIGS))
def test_the_roles_each_family_has(model_type):
    model = build_family(model_type)
    assert family_of(model) is not None
    assert supported_roles(model) == [r for r in LLAMA_ROLES if r in ROLES[model_type]]
    sites = classify(model)
    fused = [s for s in sites.values() if s.role and "_" in s.role]
    assert all(s.parts and s.layout_problem is None for s in fused)  # every fused layer's layout is known


@pytest.mark.parametrize("model_type", SEPARATE_QKV)
def test_q_k_v_are_what_the_attention_code_reads(model_type):
    assert hasattr(importlib.import_module(type(build_family(model_type)).__module__), "eager_attention_forward")
    torch.manual_seed(0)
    pm = get_peft_model(build_family(model_type), LoraConfig(r=2, lora_alpha=4, target_modules=["q"],
                                                             init_lora_weights=False), adapter_name="q")
    for role in ("k", "v"):  # one adapter per role, each on that role alone
        pm.add_adapter(role, LoraConfig(r=2, lora_alpha=4, target_modules=[role], init_lora_weights=False))
    inputs = family_inputs(pm.get_base_model())
    with pm.disable_adapter():
        base = probe_family(pm, inputs)
    for role in ("q", "k", "v"):
        pm.set_adapter(role)
        after = probe_family(pm, inputs)
        assert {key for key in base if not torch.equal(base[key], after[key])} == {role}, role


def test_default_targets_are_peft_s():
    assert DEFAULT_TARGETS == {key: PEFT_DEFAULTS[key] for key in DEFAULT_TARGETS}
    assert {t for t in FAMILY_CONFIGS if t in PEFT_DEFAULTS} <= set(DEFAULT_TARGETS)


# PEFT's own table has defaults for these, but the installed PEFT rewrites the config of models with
# 3-D experts (its transformers v4 -> v5 conversion) and turns target_modules=None into an empty set
# before its table is read; so PEFT is given its table's entry explicitly here.
PEFT_DROPS_ITS_DEFAULT = {"mixtral"}


@pytest.mark.parametrize("model_type", sorted(FAMILY_CONFIGS))
def test_no_target_modules_picks_peft_s_default_or_refuses_as_peft_does(model_type):
    if model_type not in PEFT_DEFAULTS:
        with pytest.raises(ValueError, match="Please specify `target_modules`|No `target_modules` passed"):
            peft.get_peft_model(build_family(model_type), peft.LoraConfig(r=2))
        with pytest.raises(ValueError, match=f"target_modules is required.*model_type '{model_type}' has no default"):
            get_peft_model(build_family(model_type), LoraConfig(r=2))
        return
    targets = PEFT_DEFAULTS[model_type] if model_type in PEFT_DROPS_ITS_DEFAULT else None
    theirs = peft.get_peft_model(build_family(model_type), peft.LoraConfig(r=2, target_modules=targets))
    mine = get_peft_model(build_family(model_type), LoraConfig(r=2))
    assert sorted(mine.targeted_module_names) == sorted(theirs.targeted_module_names)
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


# ---------------------------------------------------------------------------- the families table of the docs
def test_the_docs_table_is_generated_from_the_role_tables(tmp_path):
    sys.path.insert(0, str(DOCS))
    try:
        import roles_table
    finally:
        sys.path.remove(str(DOCS))
    table = roles_table.markdown()
    rows = table.splitlines()[2:]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == list(FAMILIES)
    for layout, words in roles_table.LAYOUT_WORDS.items():
        assert words in table, layout
    page = tmp_path / "page.md"
    page.write_text(f"# x\n{roles_table.BEGIN}\nold\n{roles_table.END}\nafter\n")
    assert roles_table.main(["--check", str(page)]) == 1
    assert roles_table.main(["--update", str(page)]) == 0
    assert page.read_text() == f"# x\n{roles_table.BEGIN}\n{table}{roles_table.END}\nafter\n"
    assert roles_table.main(["--check", str(page)]) == 0
    assert roles_table.PAGE == DOCS / "fused-layers.md"
    assert roles_table.main(["--check"]) == 0  # the real page is current
