"""Servability: which LoRA adapters LoRAX and vLLM serve faithfully, and why an adapter is not.

LoRAX silently drops what it cannot serve and vLLM rejects it at load time, so we check every
adapter before it is trained, registered or loaded, and report every problem at once, each with
its reason and fix. Profiles differ only in data (ranks, targets per architecture, base-name
strictness); every profile runs the same rules:

- files: ``adapter_config.json`` (peft LORA) and ``adapter_model.safetensors`` (never pickle);
- one uniform rank from the profile's set, ``lora_alpha`` positive;
- ``target_modules`` (a list, or a regex resolved against the base's module names) only names
  module types the profile serves on the base's architecture, in every layer of the base;
- no DoRA, ``modules_to_save``, bias, rank/alpha patterns, non-default initialisation that
  rewrites the base (PiSSA, OLoRA, CorDA, LoftQ, EVA, ...), ``fan_in_fan_out``, and none of the
  peft fields that change the layout (replicated layers, trainable tokens, parameter targets,
  variant configs); ``layers_to_transform`` and ``exclude_modules`` count only through coverage;
- every tensor is ``base_model.model.<module>.lora_{A,B}.weight`` of a targeted module of the
  base, with A ``[r, in_features]`` and B ``[out_features, r]`` in a float dtype;
- ``base_model_name_or_path`` names the served base; a different architecture is never served.
"""

from __future__ import annotations

import json
import re
import threading
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType

import torch
import transformers
from safetensors import SafetensorError, safe_open

from serving import base_models
from serving.base_models import base_identity
from serving.errors import ValidationError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"

_SEVEN_PROJECTIONS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
_ATTENTION_PROJECTIONS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})
_LLAMA_LIKE = ("llama", "mistral", "qwen2", "cohere", "granite")
_GEMMA_LIKE = ("gemma", "gemma2", "gemma3", "gemma3_text")


def _per_type(groups: Iterable[tuple[Iterable[str], Iterable[str]]]) -> Mapping[str, frozenset[str]]:
    """Expand (model types, module names) pairs into a read-only model_type -> modules table."""
    table = {model_type: frozenset(modules) for model_types, modules in groups for model_type in model_types}
    return MappingProxyType(table)


@dataclass(frozen=True)
class Profile:
    """What one server (or all of them, ``strict``) serves faithfully, as data."""

    name: str
    summary: str
    ranks: frozenset[int] | None  # None: any r >= 1
    rank_reason: str
    targets: Mapping[str, frozenset[str]]  # model_type -> LoRA-capable module names
    exact_base_name: bool  # null or sibling base names are refused, not just other architectures


PROFILES: dict[str, Profile] = {
    "strict": Profile(
        name="strict",
        summary="what both LoRAX and vLLM serve faithfully (the default)",
        ranks=frozenset({8, 16, 32, 64}),
        rank_reason=(
            "LoRAX's CUDA-graph path needs one rank from {8, 16, 32, 64}, and vLLM then needs only max_lora_rank=64"
        ),
        targets=_per_type(
            [(_LLAMA_LIKE + _GEMMA_LIKE, _SEVEN_PROJECTIONS), (("mixtral",), _ATTENTION_PROJECTIONS)]
        ),
        exact_base_name=True,
    ),
    "lorax": Profile(
        name="lorax",
        summary="what LoRAX serves: any rank, lm_head on Llama-like bases",
        ranks=None,
        rank_reason="LoRAX pads any positive rank",
        # LoRAX's ADAPTER_LAYERS; GPT-2 is left out because its Conv1D layers need fan_in_fan_out=true.
        targets=_per_type(
            [
                (_LLAMA_LIKE, _SEVEN_PROJECTIONS | {"lm_head"}),
                (_GEMMA_LIKE, _SEVEN_PROJECTIONS),
                (("mixtral",), _ATTENTION_PROJECTIONS),
                (("phi3",), {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
                (("phi",), {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2", "lm_head"}),
                (("qwen",), {"c_attn", "c_proj", "w1", "w2", "lm_head"}),
                (("dbrx",), {"Wqkv", "out_proj", "lm_head"}),
                (("bloom",), {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
            ]
        ),
        exact_base_name=False,
    ),
    "vllm": Profile(
        name="vllm",
        summary="what vLLM serves: ranks that are --max-lora-rank values, lm_head on Llama-like bases",
        # Each allowed rank is itself a --max-lora-rank value, so no adapter is padded up to the next one.
        ranks=frozenset({1, 8, 16, 32, 64, 128, 256, 320, 512}),
        rank_reason="vLLM's --max-lora-rank takes only {1, 8, 16, 32, 64, 128, 256, 320, 512}",
        targets=_per_type(
            [
                (_LLAMA_LIKE, _SEVEN_PROJECTIONS | {"lm_head"}),
                (_GEMMA_LIKE, _SEVEN_PROJECTIONS),
                (("mixtral",), _ATTENTION_PROJECTIONS),
                (("phi3",), {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
            ]
        ),
        exact_base_name=False,
    ),
}

# Config fields that must be unset (null, false or empty): each changes what the weights mean.
_UNSET_FIELDS: dict[str, tuple[str, str]] = {
    "use_dora": ("DoRA adds magnitude vectors: vLLM rejects it and LoRAX drops them", "train with use_dora=false"),
    "modules_to_save": (
        "full copies of base modules are not LoRA weights: vLLM rejects them and LoRAX drops them",
        "train with modules_to_save=null",
    ),
    "lora_bias": ("LoRA bias vectors are not served", "train with lora_bias=false"),
    "rank_pattern": (
        "per-module ranks: LoRAX scales with the global r and mis-serves them",
        "train with one rank (rank_pattern={})",
    ),
    "alpha_pattern": (
        "per-module alphas: LoRAX scales with the global alpha and mis-serves them",
        "train with one alpha (alpha_pattern={})",
    ),
    "layer_replication": ("replicated layers change the base's structure: vLLM rejects it", "remove layer_replication"),
    "target_parameters": ("LoRA on raw parameters (e.g. MoE experts) is not served", "remove target_parameters"),
    "trainable_token_indices": (
        "trainable token embeddings are saved as embedding rows, not LoRA weights",
        "remove trainable_token_indices",
    ),
    "use_qalora": ("QA-LoRA is rejected by vLLM and unknown to LoRAX", "train with use_qalora=false"),
    "alora_invocation_tokens": (
        "activated LoRA (aLoRA) is rejected by vLLM and unknown to LoRAX",
        "remove alora_invocation_tokens",
    ),
    "use_bdlora": ("BD-LoRA is rejected by vLLM and unknown to LoRAX", "remove use_bdlora"),
    "megatron_config": ("Megatron-parallel LoRA layers have a different layout", "train without megatron_config"),
    "loftq_config": ("LoftQ adapters only fit the quantised base they were trained on", "train without loftq_config"),
    "eva_config": ("EVA initialisation is not a plain LoRA", "remove eva_config"),
    "corda_config": ("CorDA rewrites the base weights the adapter was fitted to", "remove corda_config"),
    "lora_ga_config": ("LoRA-GA initialisation rewrites the base weights", "remove lora_ga_config"),
    "velora_config": ("VeLoRA is not a plain LoRA", "remove velora_config"),
    "monteclora_config": ("MonteCLoRA is not a plain LoRA", "remove monteclora_config"),
    "arrow_config": ("Arrow routing mixes adapters at inference, which servers do not do", "remove arrow_config"),
    "kasa_config": ("KaSA is not a plain LoRA", "remove kasa_config"),
}

_FLOAT_DTYPES = frozenset({"F16", "BF16", "F32"})
_RESAVE = "save the adapter with peft's save_pretrained"
_NOT_LORA = (
    "is not a LoRA A/B weight: LoRAX drops it and vLLM rejects it",
    "save only lora_A/lora_B weights: no DoRA, modules_to_save or bias, "
    "and save_pretrained(..., save_embedding_layers=False)",
)
_OTHER_BASE_FIX = "train the adapter on the served base"
_MISSING_FIX = "save the complete adapter"
_BASE_NAME = "base_model_name_or_path"
_LORA_TENSOR = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<side>[AB])\.weight")


@dataclass(frozen=True)
class Violation:
    """One reason an adapter is not servable: the field (or tensor) at fault, why, and the fix."""

    field: str
    reason: str
    fix: str
    folded: bool = False  # a consequence of the root cause listed before it, shown under it

    def __str__(self) -> str:
        return f"{self.field}: {self.reason} — fix: {self.fix}"


def report_lines(violations: Sequence[Violation]) -> list[str]:
    """The violations as indented lines: each root cause, then the per-tensor lines folded under it."""
    return [f"    - {v}" if v.folded else f"  - {v}" for v in violations]


def summary(violations: Sequence[Violation]) -> str:
    """The root causes in one line (folded per-tensor lines are counted in their cause)."""
    return "; ".join(str(v) for v in violations if not v.folded)


@dataclass(frozen=True)
class AdapterSummary:
    """The serving-relevant facts of an adapter's config."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model_name_or_path: str | None
    use_rslora: bool


def get_profile(name: str) -> Profile:
    """The profile called ``name``; ValidationError naming the choices otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        choices = "; ".join(f"{profile.name}: {profile.summary}" for profile in PROFILES.values())
        raise ValidationError(f"unknown servability profile {name!r}; use one of {choices}") from None


def base_names(base_dir: Path, base_name: str | None = None) -> tuple[str, ...]:
    """Every name the base in ``base_dir`` answers to: its canonical name first, then its aliases and paths.

    ``base_name`` (the name it is served under, if the caller knows one) is added.
    """
    identity = base_identity(base_dir)
    names = [identity.name, *identity.aliases, str(identity.path)]
    if base_name:
        names.append(base_name)
    return tuple(dict.fromkeys(name for name in names if name))


def check_lora_config(
    config: dict,
    base_config: transformers.PretrainedConfig,
    profile: str = "strict",
    *,
    base_names: Sequence[str] | None = None,
) -> list[Violation]:
    """Every reason the LoRA config ``config`` (adapter_config.json contents) is not servable on the base.

    Usable before training. ``base_names`` are the names of the served base (see
    :func:`base_names`); when omitted, ``base_model_name_or_path`` is not checked, since peft
    fills it in only when the adapter is created.
    """
    rules = get_profile(profile)
    violations: list[Violation] = []
    if config.get("peft_type") != "LORA":
        reason = f"{config.get('peft_type')!r} is not a LoRA adapter"
        violations.append(Violation("peft_type", reason, "train a peft LoRA (peft_type LORA)"))
    violations += _check_rank(config, rules)
    violations += _check_fields(config)
    violations += _check_targets(config, base_config, rules)
    if base_names is not None:
        violations += _check_base_name(config.get("base_model_name_or_path"), base_names, base_config, rules)
    return violations


def check_adapter(
    adapter_dir: Path, base_dir: Path, profile: str = "strict", base_name: str | None = None
) -> list[Violation]:
    """Every reason the adapter in ``adapter_dir`` is not servable on the base in ``base_dir``.

    Checks the config, the files, and each tensor's name and shape against the base; reads only
    the safetensors header. ``base_name`` is the name the base is served under, if not its own.
    """
    get_profile(profile)
    adapter_dir, base_dir = Path(adapter_dir), Path(base_dir)
    base_config = transformers.AutoConfig.from_pretrained(base_dir)
    violations: list[Violation] = []
    config = _read_config(adapter_dir, violations)
    served = base_names(base_dir, base_name)
    if config is not None:
        violations += check_lora_config(config, base_config, profile, base_names=served)
    weights = adapter_dir / WEIGHTS_FILE
    if weights.is_file():
        violations = _fold_other_base(violations, _check_tensors(weights, config or {}, base_config), config or {}, served)
    elif (adapter_dir / PICKLE_WEIGHTS_FILE).is_file():
        reason = f"weights are a pickle ({PICKLE_WEIGHTS_FILE}), which servers refuse to unpickle"
        violations.append(Violation(WEIGHTS_FILE, reason, "save with safe_serialization=True"))
    else:
        violations.append(Violation(WEIGHTS_FILE, f"missing from {adapter_dir}", _RESAVE))
    return violations


def summarize_adapter(adapter_dir: Path) -> AdapterSummary:
    """Rank, alpha, targets, base name and rsLoRA flag from ``adapter_dir``'s config."""
    config = json.loads((Path(adapter_dir) / CONFIG_FILE).read_text())
    targets = config.get("target_modules") or ()
    return AdapterSummary(
        rank=int(config["r"]),
        alpha=float(config.get("lora_alpha", 8)),  # peft's default lora_alpha
        target_modules=(targets,) if isinstance(targets, str) else tuple(sorted(targets)),
        base_model_name_or_path=config.get("base_model_name_or_path"),
        use_rslora=bool(config.get("use_rslora", False)),
    )


# --- config rules -------------------------------------------------------------------------


def _read_config(adapter_dir: Path, violations: list[Violation]) -> dict | None:
    path = adapter_dir / CONFIG_FILE
    if not path.is_file():
        violations.append(Violation(CONFIG_FILE, f"missing from {adapter_dir}", _RESAVE))
        return None
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        violations.append(Violation(CONFIG_FILE, f"is not valid JSON ({error})", _RESAVE))
        return None
    if not isinstance(config, dict):
        violations.append(Violation(CONFIG_FILE, "is not a JSON object", _RESAVE))
        return None
    return config


def _check_rank(config: dict, rules: Profile) -> list[Violation]:
    violations = []
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        violations.append(Violation("r", f"{r!r} is not a positive integer rank", "set r to a positive integer"))
    elif rules.ranks is not None and r not in rules.ranks:
        allowed = ", ".join(map(str, sorted(rules.ranks)))
        reason = f"rank {r} is not in the {rules.name} profile's ranks: {rules.rank_reason}"
        violations.append(Violation("r", reason, f"train with r in {{{allowed}}}"))
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        violations.append(Violation("lora_alpha", f"{alpha!r} is not a positive number", "set lora_alpha, e.g. 2 * r"))
    return violations


def _check_fields(config: dict) -> list[Violation]:
    violations = [Violation(field, reason, fix) for field, (reason, fix) in _UNSET_FIELDS.items() if config.get(field)]
    if config.get("bias", "none") != "none":
        reason = f"bias={config['bias']!r} trains base bias vectors, which servers drop"
        violations.append(Violation("bias", reason, 'train with bias="none"'))
    init = config.get("init_lora_weights", True)
    # True and "gaussian" only initialise A (False leaves it zero); the rest are LoRA variants.
    if not (init is True or init is False or init == "gaussian"):
        violations.append(
            Violation(
                "init_lora_weights",
                f"{init!r} is not plain LoRA initialisation: PiSSA, OLoRA, CorDA and LoftQ rewrite the base "
                "weights, and vLLM refuses them",
                'train with init_lora_weights=true or "gaussian" (or convert the adapter to plain LoRA when saving)',
            )
        )
    if config.get("fan_in_fan_out"):
        reason = "transposed (Conv1D-style) weights are mis-read by vLLM"
        violations.append(Violation("fan_in_fan_out", reason, "train with fan_in_fan_out=false"))
    return violations


def _check_targets(config: dict, base_config: transformers.PretrainedConfig, rules: Profile) -> list[Violation]:
    model_type = base_config.model_type
    allowed = rules.targets.get(model_type)
    if allowed is None:
        known = ", ".join(sorted(rules.targets))
        reason = f"architecture {model_type!r} has no LoRA target table in the {rules.name} profile"
        return [Violation("base model", reason, f"serve on one of: {known}")]
    malformed = _malformed_targets(config)
    if malformed:
        return [Violation(malformed[0], malformed[1], f"list module names to target, some of {_listing(allowed)}")]
    modules = _base_modules(base_config)
    targeted, unmatched = _resolve_targets(config, modules)
    fix = f"target some of {_listing(allowed)}"
    violations = [
        Violation("target_modules", f"{entry!r} matches no module of the {model_type} base", fix) for entry in unmatched
    ]
    partial = []
    for leaf in sorted({name.rsplit(".", 1)[-1] for name in targeted}):
        if leaf not in allowed:
            reason = f"{leaf} is not a LoRA target the {rules.name} profile serves on {model_type}"
            violations.append(Violation("target_modules", reason, f"target only {_listing(allowed)}"))
            continue
        every_layer = {name for name in modules if name.rsplit(".", 1)[-1] == leaf}
        if not every_layer <= targeted:
            partial.append(f"{leaf} in {len(every_layer & targeted)} of {len(every_layer)}")
    if partial:
        violations.append(
            Violation(
                "target_modules",
                f"only some layers carry the adapter ({', '.join(partial)}); "
                "LoRAX loads a module type in all layers or none",
                "target module types by name, without layers_to_transform or exclude_modules",
            )
        )
    return violations


def _malformed_targets(config: dict) -> tuple[str, str] | None:
    """(field, reason) when target_modules or exclude_modules cannot be matched at all."""
    for field in ("target_modules", "exclude_modules"):
        value = config.get(field)
        if value is None and field == "exclude_modules":
            continue
        if not value:
            return field, "is empty"
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as error:
                return field, f"{value!r} is not a valid regular expression ({error})"
        elif not (isinstance(value, (list, tuple, set)) and all(isinstance(entry, str) for entry in value)):
            return field, f"{value!r} is neither a regular expression nor a list of module names"
    return None


def _resolve_targets(config: dict, modules: Mapping[str, object]) -> tuple[set[str], list[str]]:
    """The base modules peft wraps for ``config``, and the target entries that match nothing.

    peft's matching: a string is a regex over full module names ("all-linear" is every linear
    layer but the head); a list matches names or name suffixes, limited by layers_to_transform;
    exclude_modules then removes names (regex or list, matched the same way).
    """
    target_modules = config["target_modules"]
    if target_modules == "all-linear":
        targeted = {name for name, shape in modules.items() if shape is not None and not name.endswith("lm_head")}
        unmatched = []
    elif isinstance(target_modules, str):
        targeted = {name for name in modules if re.fullmatch(target_modules, name)}
        unmatched = [] if targeted else [target_modules]
    else:
        targeted, unmatched = set(), []
        for entry in target_modules:
            matched = {name for name in modules if _matches(name, entry)}
            targeted |= matched
            if not matched:
                unmatched.append(entry)
        layers = config.get("layers_to_transform")
        if layers is not None:
            layers = {layers} if isinstance(layers, int) else set(layers)
            targeted = {name for name in targeted if _layer_index(name) in layers}
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            targeted = {name for name in targeted if not re.fullmatch(exclude, name)}
        else:
            targeted = {name for name in targeted if not any(_matches(name, entry) for entry in exclude)}
    return targeted, unmatched


def _matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith(f".{entry}")


def _layer_index(name: str) -> int | None:
    match = re.search(r"\.(\d+)\.", f".{name}.")
    return int(match[1]) if match else None


def _check_base_name(
    value, names: Sequence[str], base_config: transformers.PretrainedConfig, rules: Profile
) -> list[Violation]:
    field = _BASE_NAME
    if not value:
        if not rules.exact_base_name:
            return []
        fix = f"set base_model_name_or_path to {names[0]!r} if it was trained on that base"
        return [Violation(field, "is null, so LoRAX cannot check the base and pays ~10 s per load (lorax#430)", fix)]
    if value in names or any(_same_path(value, name) for name in names):
        return []
    # Renaming the recorded base would let an adapter of another base pass: point at its own base instead.
    known = base_models.known_base_name(value)
    fix = f"serve it on the base it was trained on (--base {known})" if known else f"train the adapter on the served base ({names[0]!r})"
    architecture = _architecture_of(value)
    if architecture is None:
        reason = f"{value!r} is not the served base and its architecture cannot be looked up offline"
        return [Violation(field, reason, fix)]
    if architecture != base_config.model_type:
        served = base_config.model_type
        reason = f"{value!r} is a {architecture} model, a different architecture from the served {served} base"
        return [Violation(field, reason, f"train on the served base ({names[0]!r})")]
    if rules.exact_base_name:
        return [Violation(field, f"{value!r} is a different {architecture} base from the served one", fix)]
    return []


def _fold_other_base(
    violations: list[Violation], tensor_violations: list[Violation], config: dict, served: Sequence[str]
) -> list[Violation]:
    """``violations`` plus the tensors'; when tensor shapes do not fit the served base, the adapter was trained on
    another one: that root cause comes first, once, and the per-tensor lines it explains are folded under it."""
    misfits = [v for v in tensor_violations if v.fix in (_OTHER_BASE_FIX, _MISSING_FIX)]
    shapes = [v for v in misfits if v.fix == _OTHER_BASE_FIX and " but the base needs " in v.reason]
    if not shapes:
        return violations + tensor_violations
    recorded = config.get("base_model_name_or_path")
    trained_on = f"{recorded!r}" if recorded else "another base (its adapter_config.json names none)"
    example = next((v for v in shapes if "q_proj.lora_A" in v.field), shapes[0])
    shape, needed = example.reason.split(" (")[0].removeprefix("has shape ").split(" but the base needs ")
    reason = (
        f"the adapter was trained on {trained_on}, not on the served base {served[0]!r}: its {example.field} is {shape} "
        f"where the served base needs {needed}; {len(misfits)} tensor lines in all do not fit (below)"
    )
    known = base_models.known_base_name(recorded) if isinstance(recorded, str) else None
    if known and known != served[0]:
        fix = f"serve it on the base it was trained on: --base {known}"
    else:
        fix = f"train the adapter on the served base ({served[0]!r})"
    root = Violation(_BASE_NAME, reason, fix)
    rest = [v for v in violations if v.field != _BASE_NAME]  # the name check says the same, less precisely
    return [root, *rest, *(replace(v, folded=True) for v in misfits), *(v for v in tensor_violations if v not in misfits)]


def _same_path(value: str, name: str) -> bool:
    return Path(value).expanduser().resolve() == Path(name).expanduser().resolve()


def _architecture_of(name_or_path: str) -> str | None:
    """The model_type of a local directory or an HF-cached model, without touching the network."""
    try:
        return transformers.AutoConfig.from_pretrained(name_or_path, local_files_only=True).model_type
    except (OSError, ValueError):
        return None


# --- tensor rules -------------------------------------------------------------------------


def _check_tensors(weights: Path, config: dict, base_config: transformers.PretrainedConfig) -> list[Violation]:
    """Name, shape, rank and dtype of every tensor in the safetensors header, grouped across layers."""
    try:
        with safe_open(weights, framework="pt") as handle:
            slices = {key: handle.get_slice(key) for key in handle.keys()}
            header = {key: (tuple(piece.get_shape()), piece.get_dtype()) for key, piece in slices.items()}
    except (SafetensorError, OSError) as error:
        return [Violation(WEIGHTS_FILE, f"cannot be read as safetensors ({error})", _RESAVE)]
    modules = _base_modules(base_config)
    r = config.get("r") if isinstance(config.get("r"), int) else None
    # Without a usable config there is no target list to hold the tensors to.
    targeted = None if _malformed_targets(config) else _resolve_targets(config, modules)[0]
    problems: dict[tuple[str, str], list[str]] = defaultdict(list)  # (reason, fix) -> tensor names
    sides: dict[str, set[str]] = defaultdict(set)
    for key, (shape, dtype) in sorted(header.items()):
        match = _LORA_TENSOR.fullmatch(key)
        if match is None:
            problems[_NOT_LORA].append(key)
            continue
        module, side = match["module"], match["side"]
        if module not in modules:
            problems["belongs to a module the base does not have", _OTHER_BASE_FIX].append(key)
            continue
        if targeted is not None and module not in targeted:
            fix = "add the module type to target_modules or drop the tensor"
            problems["belongs to a module not in target_modules", fix].append(key)
        if modules[module] is None:
            problems["belongs to a module that is not a linear layer", "target linear projections only"].append(key)
            continue
        sides[module].add(side)
        problems_of_shape = _shape_problem(side, shape, modules[module], r)
        if problems_of_shape:
            problems[problems_of_shape].append(key)
        if dtype not in _FLOAT_DTYPES:
            problems[f"has dtype {dtype}, not float16/bfloat16/float32", "save unquantised LoRA weights"].append(key)
    for module in sorted((targeted or set()) | set(sides)):
        if modules.get(module) is None:
            continue
        for side in sorted({"A", "B"} - sides[module]):
            name = f"base_model.model.{module}.lora_{side}.weight"
            problems["is missing although its module is targeted", _MISSING_FIX].append(name)
    return [violation for (reason, fix), names in problems.items() for violation in _grouped(names, reason, fix)]


def _shape_problem(
    side: str, shape: tuple[int, ...], in_out: tuple[int, int], r: int | None
) -> tuple[str, str] | None:
    in_features, out_features = in_out
    if len(shape) != 2:
        return f"has shape {list(shape)}, not a matrix", "save plain LoRA weights"
    rank, other = (shape[0], shape[1]) if side == "A" else (shape[1], shape[0])
    expected_other = in_features if side == "A" else out_features
    if other != expected_other:
        expected = [r or rank, in_features] if side == "A" else [out_features, r or rank]
        return f"has shape {list(shape)} but the base needs {expected}", _OTHER_BASE_FIX
    if r is not None and rank != r:
        return f"has rank {rank} but the config says r={r}; ranks must be uniform", "train with one rank, saved in r"
    return None


def _grouped(names: list[str], reason: str, fix: str) -> list[Violation]:
    """One violation per tensor across layers: indices collapse to '*' so 18 layers read as one line."""
    by_pattern: dict[str, int] = defaultdict(int)
    for name in names:
        by_pattern[re.sub(r"\.\d+\.", ".*.", name)] += 1
    return [
        Violation(pattern, f"{reason} ({count} tensors)" if count > 1 else reason, fix)
        for pattern, count in sorted(by_pattern.items())
    ]


# --- the base's modules -------------------------------------------------------------------

_build_lock = threading.Lock()
_modules_by_config: dict[str, Mapping[str, tuple[int, int] | None]] = {}


def _base_modules(base_config: transformers.PretrainedConfig) -> Mapping[str, tuple[int, int] | None]:
    """Module name -> (in_features, out_features) for linear layers, None for other modules."""
    key = base_config.to_json_string(use_diff=False)
    with _build_lock:  # one build per base even when many checks start at once
        if key not in _modules_by_config:
            with torch.device("meta"):  # shapes only: no memory, no weights read
                model = transformers.AutoModelForCausalLM.from_config(base_config)
            _modules_by_config[key] = MappingProxyType(
                {
                    name: (module.in_features, module.out_features) if isinstance(module, torch.nn.Linear) else None
                    for name, module in model.named_modules()
                    if name
                }
            )
        return _modules_by_config[key]


def _listing(names: Iterable[str]) -> str:
    return ", ".join(sorted(names))
