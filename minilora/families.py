"""The role tables: which module is q, k, v, o, up, down or gate in each model family.

One table per family: (regex searched at the end of the module path, role, fused layout). A fused
role names its parts with "_" ("q_k_v", "gate_up"); its layout says where each part's rows sit in
the fused output, in the model's own attention code, and `roles.py` reads the sizes from the
model's config. The layouts (d = heads · head_dim, g = kv heads, dh = head_dim):

    contiguous   [ q (heads·dh) | k (g·dh) | v (g·dh) ]            Phi-3 qkv_proj, MPT / ModernBERT Wqkv
    per_head     [ q_0 k_0 v_0 | q_1 k_1 v_1 | ... ]  one block per head     GPT-NeoX, Bloom
    kv_group     [ q×(heads/g) k v | q×(heads/g) k v | ... ] one block per kv head   Falcon (new arch.)
    falcon       kv_group, multi_query (contiguous, g = 1) or per_head, by the config's flags
    bigcode      contiguous with g = 1 (multi_query) or per_head
    linear_qkv   contiguous [ q (kh·kd) | k (kh·kd) | v (vh·vd) ]       Qwen3.5 in_proj_qkv (linear attention)
    halves       [ gate | up ], equal halves                               gate_up_proj (Phi-3, MoE experts)
    interleaved  [ gate_0 up_0 gate_1 up_1 ... ], one row each             GPT-OSS experts' gate_up_proj

Parameters (not modules) are listed too: a 3-D mixture-of-experts weight (E, out, in) is a target
whose rows are per expert (see experts.py); its pattern names the parameter, e.g. `experts\\.down_proj`.
"""

from __future__ import annotations

# (regex at the end of the module path, role, fused layout or None)
GPT2 = [
    (r"attn\.c_attn", "q_k_v", "contiguous"),
    (r"attn\.c_proj", "o", None),
    (r"mlp\.c_fc", "up", None),
    (r"mlp\.c_proj", "down", None),
]
LLAMA = [
    (r"self_attn\.q_proj", "q", None),
    (r"self_attn\.k_proj", "k", None),
    (r"self_attn\.v_proj", "v", None),
    (r"self_attn\.o_proj", "o", None),
    (r"self_attn\.qkv_proj", "q_k_v", "contiguous"),
    (r"mlp\.gate_proj", "gate", None),
    (r"mlp\.up_proj", "up", None),
    (r"mlp\.down_proj", "down", None),
    (r"mlp\.gate_up_proj", "gate_up", "halves"),
]
BERT = [
    (r"attention\.self\.query", "q", None),
    (r"attention\.self\.key", "k", None),
    (r"attention\.self\.value", "v", None),
    (r"attention\.output\.dense", "o", None),
    (r"intermediate\.dense", "up", None),
    (r"\d+\.output\.dense", "down", None),
]
T5 = [
    (r"(?:Self|EncDec)Attention\.q", "q", None),
    (r"(?:Self|EncDec)Attention\.k", "k", None),
    (r"(?:Self|EncDec)Attention\.v", "v", None),
    (r"(?:Self|EncDec)Attention\.o", "o", None),
    (r"DenseReluDense\.wi", "up", None),
    (r"DenseReluDense\.wi_0", "gate", None),
    (r"DenseReluDense\.wi_1", "up", None),
    (r"DenseReluDense\.wo", "down", None),
]
BART = [  # also Whisper, OPT: self_attn / encoder_attn, fc1 / fc2
    (r"(?:self|encoder)_attn\.q_proj", "q", None),
    (r"(?:self|encoder)_attn\.k_proj", "k", None),
    (r"(?:self|encoder)_attn\.v_proj", "v", None),
    (r"(?:self|encoder)_attn\.out_proj", "o", None),
    (r"fc1", "up", None),
    (r"fc2", "down", None),
]
GPT_NEOX = [
    (r"attention\.query_key_value", "q_k_v", "per_head"),
    (r"attention\.dense", "o", None),
    (r"mlp\.dense_h_to_4h", "up", None),
    (r"mlp\.dense_4h_to_h", "down", None),
]
BLOOM = [
    (r"self_attention\.query_key_value", "q_k_v", "per_head"),
    (r"self_attention\.dense", "o", None),
    (r"mlp\.dense_h_to_4h", "up", None),
    (r"mlp\.dense_4h_to_h", "down", None),
]
FALCON = [
    (r"self_attention\.query_key_value", "q_k_v", "falcon"),
    (r"self_attention\.dense", "o", None),
    (r"mlp\.dense_h_to_4h", "up", None),
    (r"mlp\.dense_4h_to_h", "down", None),
]
GPT_BIGCODE = [
    (r"attn\.c_attn", "q_k_v", "bigcode"),
    (r"attn\.c_proj", "o", None),
    (r"mlp\.c_fc", "up", None),
    (r"mlp\.c_proj", "down", None),
]
MPT = [
    (r"attn\.Wqkv", "q_k_v", "contiguous"),
    (r"attn\.out_proj", "o", None),
    (r"ffn\.up_proj", "up", None),
    (r"ffn\.down_proj", "down", None),
]
MODERNBERT = [
    (r"attn\.Wqkv", "q_k_v", "contiguous"),
    (r"attn\.Wo", "o", None),
    (r"mlp\.Wi", "gate_up", "halves"),  # input, gate = Wi(x).chunk(2); act(input) * gate: the first half is activated
    (r"mlp\.Wo", "down", None),
]
PHI = [
    (r"self_attn\.q_proj", "q", None),
    (r"self_attn\.k_proj", "k", None),
    (r"self_attn\.v_proj", "v", None),
    (r"self_attn\.dense", "o", None),
    (r"mlp\.fc1", "up", None),
    (r"mlp\.fc2", "down", None),
]
GPTJ = [
    (r"attn\.q_proj", "q", None),
    (r"attn\.k_proj", "k", None),
    (r"attn\.v_proj", "v", None),
    (r"attn\.out_proj", "o", None),
    (r"mlp\.fc_in", "up", None),
    (r"mlp\.fc_out", "down", None),
]
STARCODER2 = [
    *LLAMA[:4],
    (r"mlp\.c_fc", "up", None),
    (r"mlp\.c_proj", "down", None),
]
QWEN3_5 = [
    *LLAMA,
    (r"linear_attn\.in_proj_qkv", "q_k_v", "linear_qkv"),
    (r"linear_attn\.out_proj", "o", None),
]
MOE = [  # LLaMA-style attention, experts as 3-D parameters (Mixtral, Qwen3-MoE)
    *LLAMA,
    (r"experts\.gate_up_proj", "gate_up", "halves"),
    (r"experts\.down_proj", "down", None),
]
GPT_OSS = [
    *LLAMA[:4],
    (r"experts\.gate_up_proj", "gate_up", "interleaved"),
    (r"experts\.down_proj", "down", None),
]
DEBERTA_V2 = [
    (r"attention\.self\.query_proj", "q", None),
    (r"attention\.self\.key_proj", "k", None),
    (r"attention\.self\.value_proj", "v", None),
    (r"attention\.output\.dense", "o", None),
    (r"intermediate\.dense", "up", None),
    (r"\d+\.output\.dense", "down", None),
]
DISTILBERT = [
    (r"attention\.q_lin", "q", None),
    (r"attention\.k_lin", "k", None),
    (r"attention\.v_lin", "v", None),
    (r"attention\.out_lin", "o", None),
    (r"ffn\.lin1", "up", None),
    (r"ffn\.lin2", "down", None),
]

FAMILIES = {
    "gpt2": GPT2, "llama": LLAMA, "bert": BERT, "t5": T5, "bart": BART, "gpt_neox": GPT_NEOX, "bloom": BLOOM,
    "falcon": FALCON, "gpt_bigcode": GPT_BIGCODE, "mpt": MPT, "modernbert": MODERNBERT, "phi": PHI, "gptj": GPTJ,
    "starcoder2": STARCODER2, "qwen3_5": QWEN3_5, "moe": MOE, "gpt_oss": GPT_OSS, "deberta_v2": DEBERTA_V2,
    "distilbert": DISTILBERT,
}

# transformers' model_type -> family
MODEL_TYPES = {
    "gpt2": "gpt2",
    **{t: "llama" for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text",
                            "phi3", "olmo", "olmo2", "granite")},
    **{t: "moe" for t in ("mixtral", "qwen3_moe", "qwen2_moe")},
    **{t: "qwen3_5" for t in ("qwen3_5", "qwen3_5_text", "qwen3_next")},
    **{t: "bert" for t in ("bert", "roberta", "xlm-roberta", "electra", "camembert")},
    **{t: "t5" for t in ("t5", "mt5", "umt5")},
    **{t: "bart" for t in ("bart", "mbart", "marian", "pegasus", "blenderbot", "whisper", "opt")},
    "gpt_neox": "gpt_neox", "bloom": "bloom", "falcon": "falcon", "gpt_bigcode": "gpt_bigcode", "mpt": "mpt",
    "modernbert": "modernbert", "phi": "phi", "gptj": "gptj", "starcoder2": "starcoder2", "gpt_oss": "gpt_oss",
    "deberta-v2": "deberta_v2", "distilbert": "distilbert",
}

# PEFT's targets when target_modules is None, by model_type (PEFT's own table, for the families
# minilora knows); a model_type missing here has no default in PEFT either.
DEFAULT_TARGETS = {
    "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"], "gptj": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"],
    "bloom": ["query_key_value"], "falcon": ["query_key_value"], "gpt_bigcode": ["c_attn"], "mpt": ["Wqkv"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"], "deberta-v2": ["query_proj", "value_proj"],
}
