"""Tiny models of the families with fused or expert layers, from transformers' configs (no
downloads), and probes that read q, k, v (or gate, up) where the model's own code computes them.

A probe records what the first attention (or MLP) layer of a model hands on: the query, key and
value states as its attention code splits them from the fused output, before any head mixing.
Comparing two runs of a probe shows which of those states an adapter changed.
"""

from __future__ import annotations

import contextlib
import importlib

import torch
import transformers as tf
from torch.overrides import TorchFunctionMode

VOCAB = 128
ATTENTION = dict(attn_implementation="eager")


def _small(**kw):
    return dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0, **ATTENTION, **kw)


# name -> (model class, config class, config kwargs)
MODELS = {
    "gpt_neox": (tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig,
                 _small(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64)),
    "bloom": (tf.BloomForCausalLM, tf.BloomConfig, _small(hidden_size=32, n_head=4, n_layer=2)),
    "falcon_new": (tf.FalconForCausalLM, tf.FalconConfig,
                   _small(hidden_size=32, num_attention_heads=4, num_kv_heads=2, num_hidden_layers=2,
                          new_decoder_architecture=True, multi_query=False)),
    "falcon_mqa": (tf.FalconForCausalLM, tf.FalconConfig,
                   _small(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, multi_query=True)),
    "falcon_mha": (tf.FalconForCausalLM, tf.FalconConfig,
                   _small(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, multi_query=False)),
    "bigcode_mqa": (tf.GPTBigCodeForCausalLM, tf.GPTBigCodeConfig,
                    _small(n_embd=32, n_head=4, n_layer=2, multi_query=True)),
    "bigcode_mha": (tf.GPTBigCodeForCausalLM, tf.GPTBigCodeConfig,
                    _small(n_embd=32, n_head=4, n_layer=2, multi_query=False)),
    "phi3": (tf.Phi3ForCausalLM, tf.Phi3Config,
             _small(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                    intermediate_size=64)),
    "mpt": (tf.MptForCausalLM, tf.MptConfig, _small(d_model=32, n_heads=4, n_layers=2)),
    "modernbert": (tf.ModernBertModel, tf.ModernBertConfig,
                   _small(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64,
                          cls_token_id=0, sep_token_id=0)),
    "qwen3_5": (tf.Qwen3_5ForCausalLM, tf.Qwen3_5TextConfig,
                _small(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_hidden_layers=2,
                       intermediate_size=64, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                       linear_value_head_dim=8, layer_types=["linear_attention", "full_attention"])),
    "mixtral": (tf.MixtralForCausalLM, tf.MixtralConfig,
                _small(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                       intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": (tf.Qwen3MoeForCausalLM, tf.Qwen3MoeConfig,
                  _small(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_hidden_layers=2,
                         intermediate_size=64, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                         decoder_sparse_step=1, mlp_only_layers=[])),
    "gpt_oss": (tf.GptOssForCausalLM, tf.GptOssConfig,
                _small(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_hidden_layers=2,
                       intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                       layer_types=["full_attention", "full_attention"])),
}


MOE = ("mixtral", "qwen3_moe", "gpt_oss")


def build(name: str, seed: int = 0, dtype=None, **overrides) -> torch.nn.Module:
    """A tiny model of kind `name`, in float64 so that probes compare exactly (float32 for
    mixture-of-experts models: transformers' grouped expert matmul takes no float64); eval mode."""
    model_class, config_class, kwargs = MODELS[name]
    torch.manual_seed(seed)
    model = model_class(config_class(**{**kwargs, **overrides}))
    return model.to(dtype or (torch.float32 if name in MOE else torch.float64)).eval()


def ids(seed: int = 1, batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def output(model, input_ids) -> torch.Tensor:
    out = model(input_ids=input_ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# ---------------------------------------------------------------------------- probes
def _first_call(record: dict, **states) -> None:
    """Keep the states of the first call only: the first layer's."""
    for key, value in states.items():
        record.setdefault(key, value.detach().clone())


@contextlib.contextmanager
def _patched(owner, attribute: str, wrap):
    """Wrap `owner.attribute` (a function of the model's module, such as eager_attention_forward) for
    the duration. If this transformers release has no such name, say so, naming the release."""
    if not hasattr(owner, attribute):
        raise AssertionError(f"transformers {tf.__version__}: {getattr(owner, '__name__', owner)} has no "
                             f"{attribute!r}, which this probe reads q, k, v from; find where this release "
                             "splits the fused projection and probe that instead")
    original = getattr(owner, attribute)
    setattr(owner, attribute, wrap(original))
    try:
        yield
    finally:
        setattr(owner, attribute, original)


def _eager_attention(model, record):
    """transformers' eager_attention_forward(module, query, key, value, ...) of the model's module."""
    module = importlib.import_module(type(model).__module__)

    def wrap(original):
        def eager(attention, query, key, value, *args, **kwargs):
            _first_call(record, q=query, k=key, v=value)
            return original(attention, query, key, value, *args, **kwargs)
        return eager
    return _patched(module, "eager_attention_forward", wrap)


class _ProductsProbe(TorchFunctionMode):
    """Attention computed by hand, as two products: scores = q·kᵀ, then context = weights·v. MPT
    calls torch.matmul twice; BLOOM calls alibi.baddbmm(batch1=q, batch2=kᵀ), then torch.bmm(weights, v).
    Only public torch functions are watched, so a refactor of the model's private helpers changes nothing."""

    PRODUCTS = (torch.matmul, torch.bmm, torch.Tensor.baddbmm)

    def __init__(self, record):
        super().__init__()
        self.record, self.calls = record, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.PRODUCTS and self.calls < 2:
            if func is torch.Tensor.baddbmm:  # input.baddbmm(batch1, batch2): positional or keywords
                left = kwargs.get("batch1", args[1] if len(args) > 1 else None)
                right = kwargs.get("batch2", args[2] if len(args) > 2 else None)
            else:
                left, right = args[0], args[1]
            if self.calls == 0:
                _first_call(self.record, q=left, k=right.transpose(-1, -2))
            else:
                _first_call(self.record, v=right)
            self.calls += 1
        return func(*args, **kwargs)


def _by_products(first_attention):
    """Probe the attention module that `first_attention(model)` returns with _ProductsProbe."""
    @contextlib.contextmanager
    def probe(model, record):
        attention = first_attention(model)
        mode = _ProductsProbe(record)

        def enter(*_):
            mode.__enter__()

        def leave(*_):
            mode.__exit__(None, None, None)

        enter, leave = attention.register_forward_pre_hook(enter), attention.register_forward_hook(leave)
        try:
            yield
        finally:
            enter.remove(), leave.remove()
    return probe


def _linear_attention(model, record):
    """Qwen3.5's linear attention hands query, key, value to its gated delta rule."""
    module = importlib.import_module(type(model).__module__)

    def wrap(original):
        def rule(query, key, value, *args, **kwargs):
            _first_call(record, q=query, k=key, v=value)
            return original(query, key, value, *args, **kwargs)
        return rule
    return _patched(module, "torch_chunk_gated_delta_rule", wrap)


@contextlib.contextmanager
def _glu(activation, down, record):
    """A gated MLP: down(act(gate) ⊙ up). gate is the activation's input; up = down's input / act(gate)."""
    seen = {}

    def on_activation(module, inputs, out):
        seen.setdefault("gate", inputs[0].detach().clone())
        seen.setdefault("act", out.detach().clone())

    def on_down(module, inputs):
        if "up" not in record:
            _first_call(record, gate=seen["gate"], up=inputs[0].detach() / seen["act"])

    hooks = [activation.register_forward_hook(on_activation), down.register_forward_pre_hook(on_down)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


PROBES = {
    "gpt_neox": _eager_attention, "bigcode_mqa": _eager_attention, "bigcode_mha": _eager_attention,
    "phi3": _eager_attention, "modernbert": _eager_attention,
    "falcon_new": _eager_attention, "falcon_mqa": _eager_attention, "falcon_mha": _eager_attention,
    "bloom": _by_products(lambda model: model.transformer.h[0].self_attention),
    "mpt": _by_products(lambda model: model.transformer.blocks[0].attn), "qwen3_5": _linear_attention,
}


def probe_attention(name: str, model, input_ids) -> dict[str, torch.Tensor]:
    """q, k, v of the first attention layer of `model` (a tiny `name` model, maybe wrapped), as its code splits them."""
    record: dict[str, torch.Tensor] = {}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.no_grad(), PROBES[name](base, record):
        output(model, input_ids)
    return record


def probe_mlp(model, input_ids, activation, down) -> dict[str, torch.Tensor]:
    """gate and up of a gated MLP whose activation module and down projection are given."""
    record: dict[str, torch.Tensor] = {}
    with torch.no_grad(), _glu(activation, down, record):
        output(model, input_ids)
    return record


# ---------------------------------------------------------------------------- every family in the role tables
_DECODER = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                intermediate_size=64)
# transformers model_type -> config kwargs of a tiny model (AutoConfig.for_model; AutoModel, no head)
FAMILY_CONFIGS = {
    "gpt2": dict(n_embd=32, n_head=4, n_layer=2),
    "llama": _DECODER,
    "bert": dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64),
    "t5": dict(d_model=32, d_ff=64, num_heads=4, d_kv=8, num_layers=2, decoder_start_token_id=0),
    "bart": dict(d_model=32, encoder_attention_heads=4, decoder_attention_heads=4, encoder_layers=2, decoder_layers=2,
                 encoder_ffn_dim=64, decoder_ffn_dim=64, decoder_start_token_id=0),
    "gpt_neox": dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64),
    "bloom": dict(hidden_size=32, n_head=4, n_layer=2),
    "falcon": dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2),
    "gpt_bigcode": dict(n_embd=32, n_head=4, n_layer=2),
    "mpt": dict(d_model=32, n_heads=4, n_layers=2),
    "phi": dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64),
    "phi3": _DECODER,
    "gptj": dict(n_embd=32, n_head=4, n_layer=2, rotary_dim=4),
    "opt": dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, ffn_dim=64, word_embed_proj_dim=32),
    "gemma": dict(_DECODER, head_dim=8),
    "gemma2": dict(_DECODER, head_dim=8),
    "gemma3_text": dict(_DECODER, head_dim=8),
    "qwen2": _DECODER,
    "qwen3": dict(_DECODER, head_dim=8),
    "qwen3_moe": dict(_DECODER, head_dim=8, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2),
    "qwen3_5_text": dict(_DECODER, head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                         linear_value_head_dim=8, layer_types=["full_attention", "linear_attention"]),
    "mistral": _DECODER,
    "mixtral": dict(_DECODER, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2),
    "starcoder2": _DECODER,
    "olmo2": _DECODER,
    "gpt_oss": dict(_DECODER, head_dim=8, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                    layer_types=["full_attention", "full_attention"]),
    "deberta-v2": dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64),
    "distilbert": dict(dim=32, n_heads=4, n_layers=2, hidden_dim=64),
    "modernbert": dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64,
                       cls_token_id=0, sep_token_id=0),
    "whisper": dict(d_model=32, encoder_attention_heads=4, decoder_attention_heads=4, encoder_layers=2,
                    decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
                    max_source_positions=8, max_target_positions=16, decoder_start_token_id=0),
}
_SPECIAL_IDS = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)


def build_family(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A tiny base model (no head) of `model_type`, fp32, eager attention, eval mode."""
    torch.manual_seed(seed)
    config = tf.AutoConfig.for_model(model_type, vocab_size=VOCAB, **_SPECIAL_IDS, **ATTENTION,
                                     **FAMILY_CONFIGS[model_type])
    if model_type == "whisper":
        config.update(dict(decoder_start_token_id=0, suppress_tokens=None, begin_suppress_tokens=None))
    return tf.AutoModel.from_config(config).eval()


def family_inputs(model, seed: int = 1) -> dict:
    """Inputs for one forward pass of a tiny base model from `build_family`."""
    x = ids(seed)
    config = model.config
    if config.model_type == "whisper":
        frames = torch.randn(2, config.num_mel_bins, 2 * config.max_source_positions,
                             generator=torch.Generator().manual_seed(seed))
        return dict(input_features=frames, decoder_input_ids=x)
    if config.is_encoder_decoder:
        return dict(input_ids=x, decoder_input_ids=x)
    return dict(input_ids=x)


def probe_family(model, inputs: dict) -> dict[str, torch.Tensor]:
    """q, k, v of the first call to the model's eager_attention_forward (families that have one)."""
    record: dict[str, torch.Tensor] = {}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.no_grad(), _eager_attention(base, record):
        model(**inputs)
    return record
