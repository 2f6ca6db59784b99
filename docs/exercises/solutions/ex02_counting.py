r"""# Exercise 2: counting parameters

*Chapter 2 of the tutorial (`docs/tutorial.md`, "Where GPT-2's parameters are").*

A LoRA pair on a layer with $d_{in}$ inputs and $d_{out}$ outputs holds
$A \in \mathbb{R}^{r \times d_{in}}$ and $B \in \mathbb{R}^{d_{out} \times r}$: $r\,(d_{in} + d_{out})$
numbers, against $d_{in} d_{out}$ for the full $\Delta W$.

GPT-2 with width $d$, $L$ layers, vocabulary $V$ and $P$ positions (`config.n_embd`, `n_layer`,
`vocab_size`, `n_positions`; the FFN is $4d$ wide unless `config.n_inner` says otherwise):

| component  | what                                                        | count |
|------------|-------------------------------------------------------------|-------|
| embeddings | token `wte` ($V \times d$), position `wpe` ($P \times d$)   | $Vd + Pd$ |
| attention  | per layer: `c_attn` $d \to 3d$ with bias, `c_proj` $d \to d$ with bias | $L\,(3d^2 + 3d + d^2 + d)$ |
| ffn        | per layer: `c_fc` $d \to 4d$, `c_proj` $4d \to d$, with biases | $L\,(4d^2 + 4d + 4d^2 + d)$ |
| norm       | two LayerNorms per layer and a final one, weight and bias  | $(2L + 1) \cdot 2d$ |

The head `lm_head` shares `wte`'s weight (tied), so it adds nothing.

GPT-2's `c_attn` computes $[q\,|\,k\,|\,v]$ with one matrix. minilora's `target_modules=["q", "v"]`
puts one pair on the $d$ columns of Q and one on those of V: each is a LoRA with $d_{in} = d$,
$d_{out} = d$. `"c_fc"` puts one pair on the whole of `c_fc` ($d \to 4d$).

## Your task

1. `lora_parameters(d_in, d_out, r)`: the numbers in one pair.
2. `plan_parameters(config, r, targets, layers=None)`: the trainable parameters of
   `LoraConfig(r=r, target_modules=targets, layers_to_transform=layers)` on a `GPT2LMHeadModel(config)`,
   for targets among `"q"`, `"k"`, `"v"`, `"c_fc"`; `layers=None` means every layer.
3. `gpt2_base_parameters(config)`: a dict with the four rows of the table above.

The tests compare with `get_nb_trainable_parameters()` and `parameter_breakdown()`.

Run: `pytest docs/exercises/test_ex02_counting.py`
"""

from transformers import GPT2Config


def lora_parameters(d_in: int, d_out: int, r: int) -> int:
    """A (r, d_in) and B (d_out, r)."""
    return r * (d_in + d_out)


def plan_parameters(config: GPT2Config, r: int, targets: list[str], layers=None) -> int:
    """Trainable LoRA parameters of a plan on GPT-2: q/k/v slices of c_attn, and c_fc."""
    d = config.n_embd
    ffn = config.n_inner or 4 * d
    shapes = {"q": (d, d), "k": (d, d), "v": (d, d), "c_fc": (d, ffn)}  # (d_in, d_out) of each target
    per_layer = sum(lora_parameters(*shapes[t], r) for t in targets)
    n_layers = config.n_layer if layers is None else len(layers)
    return n_layers * per_layer


def gpt2_base_parameters(config: GPT2Config) -> dict[str, int]:
    """{"embeddings", "attention", "ffn", "norm"} of GPT2LMHeadModel(config)."""
    d, L, V, P = config.n_embd, config.n_layer, config.vocab_size, config.n_positions
    ffn = config.n_inner or 4 * d
    return {
        "embeddings": V * d + P * d,
        "attention": L * (d * 3 * d + 3 * d + d * d + d),  # c_attn and attn.c_proj
        "ffn": L * (d * ffn + ffn + ffn * d + d),  # c_fc and mlp.c_proj
        "norm": (2 * L + 1) * 2 * d,  # ln_1, ln_2 per layer, ln_f
    }
