"""LoraConfig: PEFT's field names and defaults, plus minilora's layer bands.

A config says *where* adapters go and *how big* they are; it never touches a model. Resolution
against a concrete model (which modules, which layers, which rank) happens in `surgery.py`.

Rank and alpha of one adapted module are decided in this order, first match wins:

    rank_pattern / alpha_pattern  (PEFT: module-name suffix or regex)
    component_ranks               (encoder-decoder: "encoder_self", "decoder_self", "cross")
    layer_bands                   (the band whose depth range holds the module's layer)
    r / lora_alpha                (the default)

Layer bands are fractions of depth, so one line scales to any model:

    layers  0 ........ L/2 ........ 3L/4 ........ L
            no LoRA     | r=8, α=16  | r=16, α=32 |   + LM head trainable, embeddings frozen
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Union

from . import named_init


@dataclass(frozen=True)
class Band:
    """A slice of the model's depth that gets LoRA of one rank."""

    start: float  # first layer of the band, as a fraction of depth (0.0 = layer 0), inclusive
    end: float  # end of the band, as a fraction of depth (1.0 = past the last layer), exclusive
    r: int  # rank inside the band
    lora_alpha: float  # alpha inside the band; scaling is lora_alpha / r

    def __post_init__(self):
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(
                f"Band(start={self.start}, end={self.end}) is not a depth range: "
                "expected 0.0 <= start < end <= 1.0, as fractions of the model's depth"
            )

    def layers(self, depth: int) -> range:
        """The layer indices of this band in a model with `depth` layers."""
        return range(round(self.start * depth), round(self.end * depth))


TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")  # PEFT's


@dataclass
class LoraConfig:
    """Where LoRA goes and how big it is. Field names and defaults are PEFT's."""

    # --- PEFT's fields, with PEFT's meaning ---
    r: int = 8  # rank of B·A
    lora_alpha: float = 8  # scaling = lora_alpha / r (or / sqrt(r) with use_rslora)
    target_modules: Union[list[str], set[str], str, None] = None  # names, suffixes, a regex, "all-linear" or
    # roles; None: the family's defaults (PEFT's table), which add_adapter fills in as a set, as PEFT does
    exclude_modules: Union[list[str], str, None] = None  # same matching rules; wins over targets
    target_parameters: Union[list[str], None] = None  # 3-D expert weights by name ("experts.down_proj"): LoRA per expert
    lora_dropout: float = 0.0  # dropout on the LoRA path's input only
    fan_in_fan_out: bool = False  # True for GPT-2's Conv1D (weight stored (in, out)); set automatically
    bias: Literal["none", "all", "lora_only"] = "none"  # which biases train
    use_rslora: bool = False  # rank-stabilized scaling lora_alpha / sqrt(r)
    use_dora: bool = False  # DoRA: a trained magnitude per output row (see dora.py)
    lora_bias: bool = False  # a trained bias on the LoRA path, lora_B's (see lora_bias.py)
    trainable_token_indices: Union[list[int], dict[str, list[int]], None] = None  # embedding rows trained in
    # full: token ids of the input embeddings, or {embedding module name: token ids} (see trainable_tokens.py)
    modules_to_save: Union[list[str], None] = None  # modules trained in full, one copy per adapter
    init_lora_weights: Union[bool, str] = True  # True: kaiming-uniform A; "gaussian": N(0, 1/r); False: B random too;
    # "pissa", "pissa_niter_K", "olora", "loftq" (these rewrite the base weight), "orthogonal": see named_init.py
    loftq_config: dict = field(default_factory=dict)  # with "loftq": {"loftq_bits": 4, "loftq_iter": T}
    layers_to_transform: Union[list[int], int, None] = None  # only these layer indices
    layers_pattern: Union[list[str], str, None] = None  # name of the layer list ("h", "layers", "block")
    rank_pattern: dict[str, int] = field(default_factory=dict)  # module suffix/regex -> rank
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # module suffix/regex -> alpha
    task_type: Union[str, None] = None  # "CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", ...
    base_model_name_or_path: Union[str, None] = None  # recorded in saved adapters
    inference_mode: bool = False  # adapters loaded frozen
    peft_type: str = "LORA"  # always LORA; kept so saved configs load in PEFT

    # --- minilora's extensions (PEFT ignores unknown keys) ---
    layer_bands: Union[tuple[Band, ...], None] = None  # per-depth rank plan; implies which layers
    component_ranks: dict[str, tuple[int, float]] = field(default_factory=dict)
    # ^ encoder-decoder: {"encoder_self": (r, alpha), "decoder_self": (r, alpha), "cross": (r, alpha)}

    def __post_init__(self):
        self._check()

    def _check(self) -> None:
        self._check_types()
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"Invalid task type: {self.task_type!r}. Must be one of: {', '.join(TASK_TYPES)} "
                             "(minilora.TaskType), or None")
        if self.r <= 0:
            raise ValueError(f"r must be a positive integer, got r={self.r!r}; typical values are 4, 8, 16")
        if not 0 < self.lora_alpha < math.inf:
            raise ValueError(f"lora_alpha must be a finite number > 0, got {self.lora_alpha!r}; a common choice is 2 * r")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian") and not named_init.is_named(self.init_lora_weights):
            raise ValueError(
                f"init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_K' (K an integer), "
                f"'olora', 'orthogonal' or 'loftq', got {self.init_lora_weights!r}"
            )
        if self.loftq_config and self.init_lora_weights != "loftq":
            raise ValueError("loftq_config is set but init_lora_weights is not 'loftq': set both, or neither")
        if self.init_lora_weights == "loftq":
            bits, iters = self.loftq_config.get("loftq_bits", 4), self.loftq_config.get("loftq_iter", 1)
            if bits != 4 or not isinstance(iters, int) or iters < 1:
                raise ValueError(f"loftq_config={self.loftq_config!r}: minilora's LoftQ quantizes to 4-bit NF4 "
                                 "(loftq_bits=4) with loftq_iter ≥ 1 iterations")
        for key, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"rank_pattern[{key!r}] must be a positive integer, got {rank!r}")
        for key, alpha in self.alpha_pattern.items():
            if not _is_number(alpha) or not 0 < alpha < math.inf:
                raise ValueError(f"alpha_pattern[{key!r}] must be a finite number > 0, got {alpha!r}")
        for key, (rank, alpha) in self.component_ranks.items():
            if key not in COMPONENTS:
                raise ValueError(f"component_ranks key {key!r} is unknown; use one of {sorted(COMPONENTS)}")
            if not isinstance(rank, int) or rank <= 0 or not _is_number(alpha) or not 0 < alpha < math.inf:
                raise ValueError(f"component_ranks[{key!r}] = ({rank}, {alpha}): rank and alpha must be > 0")
        if self.layer_bands is not None:
            self.layer_bands = tuple(
                b if isinstance(b, Band) else Band(**b) if isinstance(b, dict) else Band(*b)
                for b in self.layer_bands
            )
            if self.layers_to_transform is not None:
                raise ValueError(
                    "layer_bands already decides which layers get LoRA; drop layers_to_transform "
                    "or drop layer_bands"
                )
            for b in self.layer_bands:
                if not isinstance(b.r, int) or b.r <= 0 or not _is_number(b.lora_alpha) or not 0 < b.lora_alpha < math.inf:
                    raise ValueError(f"{b}: rank and alpha must be > 0")
        if self.target_parameters is not None:
            if isinstance(self.target_parameters, str) or not all(isinstance(t, str) for t in self.target_parameters):
                raise ValueError(f"target_parameters must be a list of parameter names (e.g. ['experts.gate_up_proj']), "
                                 f"got {self.target_parameters!r}")
            self.target_parameters = list(self.target_parameters)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]

    def _check_types(self) -> None:
        """Each field of the kind its comment says (a config read from JSON can hold anything):
        a TypeError naming the field, the value and the kind expected."""
        def wrong(name, expected):
            raise TypeError(f"{name} must be {expected}, got {getattr(self, name)!r} ({type(getattr(self, name)).__name__})")

        if not isinstance(self.r, int) or isinstance(self.r, bool):
            wrong("r", "an integer")
        for name in ("lora_alpha", "lora_dropout"):
            if not _is_number(getattr(self, name)):
                wrong(name, "a number")
        for name in (f.name for f in fields(self) if f.type == "bool"):  # every switch, variants' included
            if not isinstance(getattr(self, name), bool):
                wrong(name, "true or false")
        for name in ("target_modules", "exclude_modules", "layers_pattern"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str) and not _strings(value):
                wrong(name, "a name, a regex, or a list of names")
        if self.modules_to_save is not None and not _strings(self.modules_to_save):
            wrong("modules_to_save", "a list of module names")
        for name in ("rank_pattern", "alpha_pattern", "component_ranks", "loftq_config"):
            if not isinstance(getattr(self, name), dict):
                wrong(name, "a mapping (a JSON object)")
        value = self.layers_to_transform
        if value is not None and not isinstance(value, int) and not (
                isinstance(value, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)):
            wrong("layers_to_transform", "a layer index or a list of them")
        ids = lambda v: isinstance(v, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)  # noqa: E731
        value = self.trainable_token_indices
        if value is not None and not ids(value) and not (
                isinstance(value, dict) and all(isinstance(k, str) and ids(v) for k, v in value.items())):
            wrong("trainable_token_indices", "a list of token ids, or a mapping {embedding module name: token ids}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with PEFT's keys (bands as lists)."""
        out = asdict(self)
        for key in ("target_modules", "exclude_modules", "modules_to_save"):  # a set (as PEFT fills in) -> a list
            if isinstance(out[key], set):
                out[key] = sorted(out[key])
        if self.layer_bands is not None:
            out["layer_bands"] = [asdict(b) for b in self.layer_bands]
        out["component_ranks"] = {k: list(v) for k, v in self.component_ranks.items()}
        return out

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _strings(value) -> bool:
    return isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value)


# Components of an encoder-decoder model that `component_ranks` can size separately.
COMPONENTS = {"encoder_self", "decoder_self", "cross"}
