"""HiddenTransferConfig: what a Hidden Transfer checkpoint is, validated on construction.

Glossary (used across the package):
- transfer layer l: the pseudo state for a step is formed from h^l, the residual stream after
  the first l decoder layers (1 <= l <= L-1); layers l+1..L (0-based modules l..L-1) then refine it.
- pseudo step s (1..k, k = `num_steps`): how far ahead a pseudo row drafts: the pseudo row (i, s)
  sits at position i + s and drafts the token at i + s + 1.
- step, unqualified: one forward pass of the model (vLLM's engine step; `vllm_ht.vllm.step.HTStep`,
  the benchmarks' "HT step"). One forward pass computes all k pseudo steps of every anchor at once.
  `num_steps` counts pseudo steps; it keeps that name because shipped config.json files use it.
- tree template: the (depth, rank) paths of a draft tree for a node budget; see `tree.py`.

A checkpoint is a folder: `config.json` (this dataclass) + `projections.safetensors`
(see `checkpoint.py`). Errors raised here name the field and the fix.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Decoder layers of these HF classes share the Llama shape (pre-norm, q/k/v/o projections, RoPE,
# gated MLP), which is what the reference engine and the vLLM model class rely on.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
PROJECTION_DTYPES = ("float32", "float16", "bfloat16")
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


FUSED_NOT_SERVED = ("this checkpoint fuses the states of layers {layers} into its projections (trained with "
                    "--fuse-layers), which vLLM serving and the reference engine do not run yet; serve a "
                    "checkpoint trained without --fuse-layers (e.g. the shipped one).")


class ConfigError(ValueError):
    """A Hidden Transfer config or checkpoint that cannot be used, with the fix in the message."""


@dataclass
class HiddenTransferConfig:
    # Identity of the base model the projections were trained on (name or path; informative).
    base_model: str
    architecture: str
    num_hidden_layers: int
    hidden_size: int
    vocab_size: int
    # k: pseudo steps (not forward passes) = the deepest tree a forward pass can draft. 3 matches
    # the paper's setting and our CPU cost curve.
    num_steps: int = 3
    # One transfer layer per step; None -> the middle layer for every step (a safe default
    # before a layer sweep; the paper found mid-depth layers best).
    transfer_layers: list[int] | None = None
    # An optional bias per projection (the paper's map is plain linear).
    bias: bool = False
    # Fused input (EAGLE-3 / DFlash-style multi-layer features, still linear): extra layers whose
    # states at the anchor are mapped and added, e_{i,s} = W_s h^{l_s}_i + sum_f U_{s,f} h^f_i.
    # Each must lie below every transfer layer. Training and offline evaluation only for now:
    # serving refuses such a checkpoint (FUSED_NOT_SERVED).
    fuse_layers: list[int] = field(default_factory=list)
    # node budget -> list of rank paths, e.g. {4: [[0], [1], [0, 0], [0, 0, 0]]}. Empty -> the
    # engine builds templates from `topr_accuracy` (or a generic prior) on demand.
    tree_templates: dict[int, list[list[int]]] = field(default_factory=dict)
    # Measured per-depth top-r accuracy: topr_accuracy[d-1][r] = P(rank-r draft at depth d is
    # right). Drives template choice; None -> a generic prior (see tree.DEFAULT_ACCURACY).
    topr_accuracy: list[list[float]] | None = None
    # Storage dtype of the projection weights in the checkpoint (computation follows the model).
    dtype: str = "float32"
    # Free-form record of how the checkpoint was made (data, steps, time, metrics).
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"architecture={self.architecture!r} is not supported; Hidden Transfer supports "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}. Use a model of the Llama family.")
        for name in ("num_hidden_layers", "hidden_size", "vocab_size", "num_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer.")
        if self.num_hidden_layers < 2:
            raise ConfigError("num_hidden_layers must be >= 2: a transfer layer needs layers above it.")
        if self.transfer_layers is None:
            self.transfer_layers = [self.num_hidden_layers // 2] * self.num_steps
        self.transfer_layers = [int(x) for x in self.transfer_layers]
        if len(self.transfer_layers) != self.num_steps:
            raise ConfigError(
                f"transfer_layers has {len(self.transfer_layers)} entries but num_steps={self.num_steps}; "
                f"give one transfer layer per step (e.g. {[self.transfer_layers[0]] * self.num_steps}).")
        last = self.num_hidden_layers - 1
        for s, layer in enumerate(self.transfer_layers):
            if not 1 <= layer <= last:
                raise ConfigError(
                    f"transfer_layers[{s}]={layer} is out of range for a model with "
                    f"{self.num_hidden_layers} layers: choose a layer in 1..{last} "
                    f"(the pseudo state needs at least one layer above it).")
        self.fuse_layers = [int(x) for x in self.fuse_layers]
        for f in self.fuse_layers:
            if not 0 <= f < self.min_transfer_layer or self.fuse_layers.count(f) > 1:
                raise ConfigError(
                    f"fuse_layers={self.fuse_layers}: each fused layer must be distinct and in "
                    f"0..{self.min_transfer_layer - 1}, below every transfer layer (its state must exist "
                    f"when the pseudo rows join).")
        if self.dtype not in PROJECTION_DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} must be one of {PROJECTION_DTYPES}.")
        self.tree_templates = {int(n): [list(map(int, p)) for p in paths]
                               for n, paths in self.tree_templates.items()}
        for budget, paths in self.tree_templates.items():
            if len(paths) != budget:
                raise ConfigError(f"tree_templates[{budget}] has {len(paths)} paths; a template for "
                                  f"node budget N holds exactly N paths. Recalibrate the checkpoint.")
            if any(len(p) > self.num_steps or len(p) == 0 for p in paths):
                raise ConfigError(f"tree_templates[{budget}] has a path deeper than num_steps="
                                  f"{self.num_steps} (or empty). Recalibrate the checkpoint.")
        if self.topr_accuracy is not None and len(self.topr_accuracy) != self.num_steps:
            raise ConfigError(f"topr_accuracy has {len(self.topr_accuracy)} rows; expected one per "
                              f"step (num_steps={self.num_steps}).")
        if self.format_version != FORMAT_VERSION:
            raise ConfigError(f"format_version={self.format_version} is not supported by this vllm-ht "
                              f"(expects {FORMAT_VERSION}); upgrade vllm-ht or re-export the checkpoint.")

    def check_servable(self) -> None:
        """Raise ConfigError for what only training and offline evaluation run (fused inputs)."""
        if self.fuse_layers:
            raise ConfigError(FUSED_NOT_SERVED.format(layers=self.fuse_layers))

    @property
    def input_layers(self) -> list[int]:
        """The layers whose states the projections read: each distinct transfer layer and fused layer."""
        return sorted(set(self.transfer_layers) | set(self.fuse_layers))

    @property
    def min_transfer_layer(self) -> int:
        return min(self.transfer_layers)

    @property
    def joins(self) -> dict[int, list[int]]:
        """Module index -> the steps whose pseudo rows join there (transfer layer l: h^l is the
        output of the first l layers, i.e. the input of module l). [15, 15, 20] -> {15: [0, 1], 20: [2]}"""
        out: dict[int, list[int]] = {}
        for s, layer in enumerate(self.transfer_layers):
            out.setdefault(layer, []).append(s)
        return out

    @classmethod
    def for_model(cls, model_config: Any, base_model: str = "", **kwargs: Any) -> "HiddenTransferConfig":
        """A config matching a HF `PretrainedConfig` (identity projections are built from it)."""
        archs = getattr(model_config, "architectures", None) or ["?"]
        return cls(base_model=base_model or getattr(model_config, "_name_or_path", ""),
                   architecture=archs[0], num_hidden_layers=model_config.num_hidden_layers,
                   hidden_size=model_config.hidden_size, vocab_size=model_config.vocab_size, **kwargs)

    def check_model(self, model_config: Any) -> None:
        """Raise ConfigError if this checkpoint does not fit the model described by a HF config."""
        archs = getattr(model_config, "architectures", None) or []
        if archs and archs[0] not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"the model's architecture {archs[0]} is not supported by Hidden Transfer "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)}).")
        fix = f"this checkpoint was trained for {self.base_model or 'another model'}; train one for this model with `vllm-ht train`."
        for name in ("hidden_size", "vocab_size", "num_hidden_layers"):
            mine, theirs = getattr(self, name), getattr(model_config, name)
            if mine != theirs:
                raise ConfigError(f"checkpoint {name}={mine} but the model has {name}={theirs}: {fix}")
        if archs and archs[0] != self.architecture:
            raise ConfigError(f"checkpoint architecture={self.architecture} but the model is {archs[0]}: {fix}")

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tree_templates"] = {str(n): p for n, p in sorted(self.tree_templates.items())}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HiddenTransferConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config fields {unknown}; is this a vllm-ht checkpoint? "
                              f"Known fields: {sorted(known)}.")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in d]
        if missing:
            raise ConfigError(f"config is missing required fields {missing}.")
        return cls(**d)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CONFIG_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "HiddenTransferConfig":
        path = Path(folder) / CONFIG_FILE
        if not Path(folder).is_dir():
            raise ConfigError(f"checkpoint folder {folder} does not exist; pass --ht-checkpoint DIR "
                              f"pointing to a folder made by `vllm-ht train`.")
        if not path.is_file():
            raise ConfigError(f"{path} is missing: a checkpoint folder holds config.json and "
                              f"projections.safetensors (made by `vllm-ht train`).")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is corrupt ({e}); re-copy or re-train the checkpoint.") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object; re-copy or re-train the checkpoint.")
        return cls.from_dict(data)
