"""PEFT's public names in minilora, checked against PEFT where PEFT has an answer: the task classes,
the enums, the status functions, the state-dict functions, transformers' adapter methods on a
wrapped model, a mistyped keyword, and the warning for a rank that cannot be reached."""

import warnings

import peft
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import minilora as ml


def gpt2(width=32):
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=width, n_head=2, vocab_size=64, n_positions=16)).eval()


def ids():
    return torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))


def wrapped(library=ml, **kwargs):
    config = library.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return library.get_peft_model(gpt2(), config)


def test_every_peft_name_is_there_and_the_enums_are_peft_s():
    for name in ml.PEFT_NAMES:
        assert hasattr(peft, name) and hasattr(ml, name), name
    assert [t.value for t in ml.TaskType] == [t.value for t in peft.TaskType]
    assert {t.value for t in ml.PeftType} <= {t.value for t in peft.PeftType}
    assert ml.TaskType.CAUSAL_LM == "CAUSAL_LM" and ml.PeftModel is ml.LoraModel
    assert isinstance(ml.LoraConfig(), ml.PeftConfig)
    with pytest.raises(ValueError, match="Invalid task type: 'CAUSAL'"):
        ml.LoraConfig(task_type="CAUSAL")


@pytest.mark.parametrize("task_type, name", [(None, "LoraModel"), ("CAUSAL_LM", "PeftModelForCausalLM"),
                                             ("SEQ_CLS", "PeftModelForSequenceClassification")])
def test_the_wrapped_models_class_is_peft_s_for_its_task(task_type, name, tmp_path):
    ours, theirs = wrapped(task_type=task_type), wrapped(peft, task_type=task_type)
    expected = "PeftModel" if task_type is None else name
    assert type(theirs).__name__ == expected and type(ours).__name__ == name
    ours.save_pretrained(tmp_path)
    assert type(ml.PeftModel.from_pretrained(gpt2(), tmp_path)).__name__ == name
    assert type(ml.PeftModelForCausalLM.from_pretrained(gpt2(), tmp_path)).__name__ == "PeftModelForCausalLM"


def test_a_mistyped_keyword_is_a_type_error_naming_it(tmp_path):
    model = wrapped()
    model.save_pretrained(tmp_path / "a")
    for call in (lambda: model.save_pretrained(tmp_path / "b", safe_serialisation=False),
                 lambda: ml.PeftModel.from_pretrained(gpt2(), tmp_path / "a", is_trainabel=True),
                 lambda: model.load_adapter(tmp_path / "a", "other", is_trainabel=True),
                 lambda: model.add_adapter("other", ml.LoraConfig(target_modules=["c_attn"]), low_cpu_mem=True),
                 lambda: ml.get_peft_model(gpt2(), ml.LoraConfig(target_modules=["c_attn"]), adapter="x")):
        with pytest.raises(TypeError, match="unexpected keyword argument"):
            call()
    assert sorted(model.peft_config) == ["default"]  # nothing was half added
    model.save_pretrained(tmp_path / "c", is_main_process=False)  # PEFT's keyword: the other processes write nothing
    assert not (tmp_path / "c").exists()


def test_a_rank_beyond_a_layers_shape_warns_with_what_it_allocates():
    with pytest.warns(UserWarning, match=r"r=100 exceeds min\(d_in, d_out\) of 2 targeted layer\(s\) \(down to 32\)"
                                         r".*allocates 25,600 adapter parameters where 8,192"):
        ml.get_peft_model(gpt2(), ml.LoraConfig(r=100, target_modules=["c_attn"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ml.get_peft_model(gpt2(), ml.LoraConfig(r=32, target_modules=["c_attn"]))  # r = min(d_in, d_out): quiet


def test_state_dict_functions_round_trip_and_refuse_what_does_not_fit():
    model = wrapped()
    model.add_adapter("other", ml.LoraConfig(r=4, target_modules=["c_attn"]))
    state = ml.get_peft_model_state_dict(model)
    assert all(k.startswith("base_model.model.") and ".default." not in k for k in state)
    result = ml.set_peft_model_state_dict(model, state, adapter_name="other")
    model.set_adapter("other")
    after = model(ids()).logits
    model.set_adapter("default")
    torch.testing.assert_close(after, model(ids()).logits)
    assert result.unexpected_keys == [] and any("lora_A.default" in k for k in result.missing_keys)
    with pytest.raises(ValueError, match="does not fit this model: adapted modules with no tensor"):
        ml.set_peft_model_state_dict(model, dict(list(state.items())[:1]), adapter_name="other")
    with pytest.raises(ValueError, match="no adapter named 'third'"):
        ml.get_peft_model_state_dict(model, adapter_name="third")
    with pytest.raises(TypeError, match="carries no minilora adapter"):
        ml.get_model_status(gpt2())


def test_status_says_irregular_where_layers_differ_as_peft_s_does():
    for library in (peft, ml):
        model = wrapped(library)
        model.base_model.model.transformer.h[0].attn.c_attn.merge() if library is peft else \
            model.model.transformer.h[0].attn.c_attn.merge()
        status = library.get_model_status(model)
        assert status.merged_adapters == "irregular" and status.num_adapter_layers == 2, library.__name__
        assert [s.merged_adapters for s in library.get_layer_status(model)] == [["default"], []]


def test_transformers_adapter_methods_act_on_the_adapters():
    model = wrapped()
    with_adapter = model(ids()).logits
    model.disable_adapters()
    with model.disable_adapter():
        base = model(ids()).logits
    torch.testing.assert_close(model(ids()).logits, base)
    model.enable_adapters()
    torch.testing.assert_close(model(ids()).logits, with_adapter)
    assert model.active_adapters() == ["default"] == model.active_adapters
    assert set(model.get_adapter_state_dict()) == set(ml.get_peft_model_state_dict(model))


def test_auto_classes_read_the_base_the_adapter_names(tmp_path):
    gpt2().save_pretrained(tmp_path / "base")
    model = ml.get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
                              ml.LoraConfig(task_type="CAUSAL_LM", target_modules=["c_attn"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    expected = model.eval()(ids()).logits
    for cls in (ml.AutoPeftModel, ml.AutoPeftModelForCausalLM):
        loaded = cls.from_pretrained(tmp_path / "adapter")
        assert type(loaded).__name__ == "PeftModelForCausalLM"
        torch.testing.assert_close(loaded(ids()).logits, expected)
    with pytest.raises(ValueError, match="holds a CAUSAL_LM adapter; AutoPeftModelForSeq2SeqLM loads SEQ_2_SEQ_LM"):
        ml.AutoPeftModelForSeq2SeqLM.from_pretrained(tmp_path / "adapter")
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no adapter_config.json"):
        ml.AutoPeftModel.from_pretrained(tmp_path / "elsewhere")
