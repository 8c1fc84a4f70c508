"""The servability validator against real peft adapters of a tiny Gemma 3 base (and a tiny Llama)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

import stillhouse
from serving import servability
from serving.errors import ValidationError
from serving.servability import Violation
from tests.lora_factory import ALL_PROJECTIONS, make_lora_adapter

# peft's notes on the tied-head and embedding adapters these tests build on purpose.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*ensure_weight_tying:UserWarning", "ignore:Setting `save_embedding_layers`:UserWarning"
)


def _tiny_gemma(path: Path, hidden: int = 64) -> Path:
    config = Gemma3TextConfig(
        num_hidden_layers=2, hidden_size=hidden, num_attention_heads=4, num_key_value_heads=1,
        head_dim=16, intermediate_size=128, vocab_size=1000,
    )  # fmt: skip
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """The served tiny Gemma 3 base, a wider sibling, and an untied tiny Llama."""
    root = tmp_path_factory.mktemp("bases")
    llama = LlamaConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
        intermediate_size=128, vocab_size=1000, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(llama).save_pretrained(root / "llama")
    return {"gemma": _tiny_gemma(root / "gemma"), "wide": _tiny_gemma(root / "wide", hidden=96), "llama": root / "llama"}


@pytest.fixture(scope="module")
def good(bases, tmp_path_factory) -> Path:
    """An r=8 adapter on all seven projections of the served base."""
    return make_lora_adapter(bases["gemma"], tmp_path_factory.mktemp("good") / "adapter")


def _copy(src: Path, dst: Path, **config_edits) -> Path:
    shutil.copytree(src, dst)
    config_path = dst / servability.CONFIG_FILE
    config = json.loads(config_path.read_text())
    config.update(config_edits)
    config_path.write_text(json.dumps(config))
    return dst


def _edit_tensors(adapter: Path, edit) -> Path:
    path = adapter / servability.WEIGHTS_FILE
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return adapter


def _without(adapter: Path, file_name: str) -> Path:
    (adapter / file_name).unlink()
    return adapter


def _broken_config(adapter: Path) -> Path:
    (adapter / servability.CONFIG_FILE).write_text("{")
    return adapter


def _to_pickle(adapter: Path) -> Path:
    weights = adapter / servability.WEIGHTS_FILE
    torch.save(load_file(weights), adapter / servability.PICKLE_WEIGHTS_FILE)
    weights.unlink()
    return adapter


def _fields(violations: list[Violation]) -> list[str]:
    return [violation.field for violation in violations]


# id, build(bases, good, out) -> adapter dir, the field at fault (substring), a keyword of its reason
BAD_ADAPTERS = [
    ("dora", lambda b, g, o: make_lora_adapter(b["gemma"], o, use_dora=True), "use_dora", "DoRA"),
    ("dora tensors", lambda b, g, o: make_lora_adapter(b["gemma"], o, use_dora=True), "lora_magnitude_vector", "not a LoRA A/B weight"),
    ("modules_to_save", lambda b, g, o: make_lora_adapter(b["gemma"], o, modules_to_save=["lm_head"]), "modules_to_save", "full copies"),
    ("modules_to_save tensor", lambda b, g, o: make_lora_adapter(b["gemma"], o, modules_to_save=["lm_head"]), "lm_head", "not a LoRA A/B weight"),
    ("bias all", lambda b, g, o: make_lora_adapter(b["gemma"], o, bias="all"), "bias", "bias vectors"),
    ("bias lora_only", lambda b, g, o: make_lora_adapter(b["gemma"], o, bias="lora_only"), "bias", "lora_only"),
    ("rank 12", lambda b, g, o: make_lora_adapter(b["gemma"], o, r=12), "r", "rank 12"),
    ("lm_head target", lambda b, g, o: make_lora_adapter(b["gemma"], o, targets=(*ALL_PROJECTIONS, "lm_head")), "target_modules", "lm_head"),
    ("embed_tokens target", lambda b, g, o: make_lora_adapter(b["gemma"], o, targets=("q_proj", "embed_tokens")), "target_modules", "embed_tokens"),
    ("embedding tensors", lambda b, g, o: make_lora_adapter(b["gemma"], o, targets=("q_proj", "embed_tokens")), "lora_embedding_A", "not a LoRA A/B weight"),
    ("other base's shapes", lambda b, g, o: make_lora_adapter(b["wide"], o), "self_attn.q_proj.lora_A.weight", "the base needs [8, 64]"),
    ("rank_pattern", lambda b, g, o: make_lora_adapter(b["gemma"], o, rank_pattern={"q_proj": 16}), "rank_pattern", "per-module ranks"),
    ("rank_pattern tensors", lambda b, g, o: make_lora_adapter(b["gemma"], o, rank_pattern={"q_proj": 16}), "q_proj.lora_B.weight", "rank 16 but the config says r=8"),
    ("alpha_pattern", lambda b, g, o: make_lora_adapter(b["gemma"], o, alpha_pattern={"q_proj": 64}), "alpha_pattern", "per-module alphas"),
    ("some layers", lambda b, g, o: make_lora_adapter(b["gemma"], o, layers_to_transform=[0]), "target_modules", "q_proj in 1 of 2"),
    ("some modules excluded", lambda b, g, o: make_lora_adapter(b["gemma"], o, exclude_modules=["model.layers.1.mlp.up_proj"]), "target_modules", "up_proj in 1 of 2"),
    ("regex reaching lm_head", lambda b, g, o: _copy(g, o, target_modules=r".*(_proj|lm_head)"), "target_modules", "lm_head is not a LoRA target"),
    ("invalid regex", lambda b, g, o: _copy(g, o, target_modules="(q_proj"), "target_modules", "not a valid regular expression"),
    ("targets neither regex nor list", lambda b, g, o: _copy(g, o, target_modules=7), "target_modules", "neither"),
    ("regex matching nothing", lambda b, g, o: _copy(g, o, target_modules=r".*\.qkv"), "target_modules", "matches no module"),
    ("tensors of untargeted modules", lambda b, g, o: _copy(g, o, target_modules=["q_proj"]), "k_proj.lora_A.weight", "not in target_modules"),
    ("config rank differs from tensors", lambda b, g, o: _copy(g, o, r=16), "lora_A.weight", "rank 8 but the config says r=16"),
    ("pissa", lambda b, g, o: _copy(g, o, init_lora_weights="pissa"), "init_lora_weights", "PiSSA"),
    ("olora", lambda b, g, o: _copy(g, o, init_lora_weights="olora"), "init_lora_weights", "rewrite the base"),
    ("fan_in_fan_out", lambda b, g, o: _copy(g, o, fan_in_fan_out=True), "fan_in_fan_out", "transposed"),
    ("layer_replication", lambda b, g, o: _copy(g, o, layer_replication=[[0, 2], [1, 2]]), "layer_replication", "replicated layers"),
    ("not LoRA", lambda b, g, o: _copy(g, o, peft_type="LOHA"), "peft_type", "not a LoRA adapter"),
    ("missing safetensors", lambda b, g, o: _without(_copy(g, o), servability.WEIGHTS_FILE), "adapter_model.safetensors", "missing"),
    ("pickle weights", lambda b, g, o: _to_pickle(_copy(g, o)), "adapter_model.safetensors", "pickle"),
    ("missing config", lambda b, g, o: _without(_copy(g, o), servability.CONFIG_FILE), "adapter_config.json", "missing"),
    ("broken config", lambda b, g, o: _broken_config(_copy(g, o)), "adapter_config.json", "not valid JSON"),
    ("other architecture", lambda b, g, o: _copy(g, o, base_model_name_or_path=str(b["llama"])), "base_model_name_or_path", "different architecture"),
    ("other base, same architecture", lambda b, g, o: _copy(g, o, base_model_name_or_path=str(b["wide"])), "base_model_name_or_path", "different gemma3_text base"),
    ("unknown base name", lambda b, g, o: _copy(g, o, base_model_name_or_path="acme/unknown-7b"), "base_model_name_or_path", "cannot be looked up"),
    ("null base name", lambda b, g, o: _copy(g, o, base_model_name_or_path=None), "base_model_name_or_path", "is null"),
    (
        "extra tensor",
        lambda b, g, o: _edit_tensors(_copy(g, o), lambda t: t.update({"base_model.model.model.norm.weight": torch.ones(64)})),
        "base_model.model.model.norm.weight",
        "not a LoRA A/B weight",
    ),
    (
        "missing lora_B",
        lambda b, g, o: _edit_tensors(_copy(g, o), lambda t: t.pop("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight")),
        "base_model.model.model.layers.*.mlp.up_proj.lora_B.weight",
        "missing",
    ),
    (
        "quantised tensor",
        lambda b, g, o: _edit_tensors(
            _copy(g, o),
            lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 64, dtype=torch.int8)}),
        ),
        "q_proj.lora_A.weight",
        "dtype I8",
    ),
]


@pytest.mark.parametrize(("build", "field", "keyword"), [case[1:] for case in BAD_ADAPTERS], ids=[case[0] for case in BAD_ADAPTERS])
def test_refuses_unservable_adapter_with_reason(bases, good, tmp_path, build, field, keyword):
    violations = servability.check_adapter(build(bases, good, tmp_path / "adapter"), bases["gemma"])
    assert any(field in v.field and keyword in v.reason and v.fix for v in violations), "\n".join(map(str, violations))


@pytest.mark.parametrize("r", [8, 16])
def test_accepts_plain_lora_on_all_projections(bases, tmp_path, r):
    adapter = make_lora_adapter(bases["gemma"], tmp_path / "adapter", r=r, alpha=2 * r)
    assert servability.check_adapter(adapter, bases["gemma"]) == []


def test_accepts_regex_targets_rslora_and_gaussian_init(bases, good, tmp_path):
    adapter = _copy(
        good, tmp_path / "adapter",
        target_modules=r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)",
        use_rslora=True, init_lora_weights="gaussian",
    )  # fmt: skip
    assert servability.check_adapter(adapter, bases["gemma"]) == []


def test_accepts_all_linear_shorthand(bases, good, tmp_path):
    adapter = _copy(good, tmp_path / "adapter", target_modules="all-linear")
    assert servability.check_adapter(adapter, bases["gemma"]) == []


def test_accepts_base_name_given_by_the_server(bases, good, tmp_path):
    adapter = _copy(good, tmp_path / "adapter", base_model_name_or_path="my-gemma")
    assert _fields(servability.check_adapter(adapter, bases["gemma"])) == ["base_model_name_or_path"]
    assert servability.check_adapter(adapter, bases["gemma"], base_name="my-gemma") == []


def test_reports_every_violation_at_once(bases, tmp_path):
    adapter = make_lora_adapter(bases["gemma"], tmp_path / "adapter", r=12, bias="all")
    _copy(adapter, tmp_path / "three", fan_in_fan_out=True)
    violations = servability.check_adapter(tmp_path / "three", bases["gemma"])
    assert sorted(_fields(violations)) == ["bias", "fan_in_fan_out", "r"]


def test_grouped_violations_name_tensor_across_layers(bases, tmp_path):
    violations = servability.check_adapter(make_lora_adapter(bases["gemma"], tmp_path / "a", use_dora=True), bases["gemma"])
    magnitude = [v for v in violations if v.field.endswith("q_proj.lora_magnitude_vector")]
    assert [v.field for v in magnitude] == ["base_model.model.model.layers.*.self_attn.q_proj.lora_magnitude_vector"]
    assert "(2 tensors)" in magnitude[0].reason


@pytest.mark.parametrize(
    ("r", "accepted_by"),
    [(12, {"lorax"}), (128, {"lorax", "vllm"}), (1, {"lorax", "vllm"}), (64, {"strict", "lorax", "vllm"})],
)
def test_profiles_differ_in_ranks(bases, tmp_path, r, accepted_by):
    adapter = make_lora_adapter(bases["gemma"], tmp_path / "adapter", r=r, alpha=2 * r, targets=("q_proj", "v_proj"))
    for profile in servability.PROFILES:
        violations = servability.check_adapter(adapter, bases["gemma"], profile=profile)
        assert (violations == []) == (profile in accepted_by), (profile, [str(v) for v in violations])
        assert all(v.field == "r" for v in violations)


def test_null_base_name_refused_only_by_strict(bases, good, tmp_path):
    adapter = _copy(good, tmp_path / "adapter", base_model_name_or_path=None)
    assert _fields(servability.check_adapter(adapter, bases["gemma"], "strict")) == ["base_model_name_or_path"]
    assert servability.check_adapter(adapter, bases["gemma"], "lorax") == []
    assert servability.check_adapter(adapter, bases["gemma"], "vllm") == []


def test_different_architecture_refused_by_every_profile(bases, good, tmp_path):
    adapter = _copy(good, tmp_path / "adapter", base_model_name_or_path=str(bases["llama"]))
    for profile in servability.PROFILES:
        assert _fields(servability.check_adapter(adapter, bases["gemma"], profile)) == ["base_model_name_or_path"]


def test_lm_head_served_on_llama_by_lorax_and_vllm_but_not_strict(bases, tmp_path):
    adapter = make_lora_adapter(bases["llama"], tmp_path / "adapter", targets=(*ALL_PROJECTIONS, "lm_head"))
    # peft saves the full head next to its LoRA; save_embedding_layers=False would leave it out.
    _edit_tensors(adapter, lambda t: t.pop("base_model.model.lm_head.base_layer.weight"))
    strict = servability.check_adapter(adapter, bases["llama"], "strict")
    assert [(v.field, "lm_head" in v.reason) for v in strict] == [("target_modules", True)]
    assert servability.check_adapter(adapter, bases["llama"], "lorax") == []
    assert servability.check_adapter(adapter, bases["llama"], "vllm") == []


def test_unknown_architecture_refused():
    config = AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=100)
    lora = LoraConfig(r=8, target_modules=["c_attn"]).to_dict()
    violations = servability.check_lora_config(lora, config, "strict")
    assert _fields(violations) == ["base model"] and "'gpt2'" in violations[0].reason


def test_check_lora_config_before_training(bases):
    base_config = AutoConfig.from_pretrained(bases["gemma"])
    plain = LoraConfig(r=16, lora_alpha=32, target_modules=list(ALL_PROJECTIONS), task_type="CAUSAL_LM").to_dict()
    assert servability.check_lora_config(plain, base_config) == []
    exotic = LoraConfig(r=12, target_modules=["q_proj"], use_dora=True, init_lora_weights="pissa").to_dict()
    assert sorted(_fields(servability.check_lora_config(exotic, base_config))) == ["init_lora_weights", "r", "use_dora"]


def test_unknown_profile_is_a_validation_error(bases, good):
    with pytest.raises(ValidationError, match="'tgi'; use one of strict: .*; lorax: .*; vllm: "):
        servability.check_adapter(good, bases["gemma"], profile="tgi")


def test_violation_reads_as_field_reason_fix():
    assert str(Violation("r", "rank 12 is not allowed", "train with r=16")) == "r: rank 12 is not allowed — fix: train with r=16"


def test_summarize_adapter(good, bases):
    summary = servability.summarize_adapter(good)
    assert (summary.rank, summary.alpha, summary.use_rslora) == (8, 16.0, False)
    assert summary.target_modules == tuple(sorted(ALL_PROJECTIONS))
    assert summary.base_model_name_or_path == str(bases["gemma"])


def test_cli_check_exit_codes_and_reasons(bases, good, tmp_path, capsys):
    assert stillhouse.main(["adapters", "check", str(good), "--base", str(bases["gemma"])]) == 0
    assert "servable (strict profile" in capsys.readouterr().out

    bad = make_lora_adapter(bases["gemma"], tmp_path / "bad", r=12, use_dora=True)
    assert stillhouse.main(["adapters", "check", str(bad), "--base", str(bases["gemma"])]) == 1
    err = capsys.readouterr().err
    assert "not servable (strict profile" in err
    assert "  - use_dora: DoRA" in err and "  - r: rank 12" in err and "— fix:" in err

    assert stillhouse.main(["adapters", "check", str(bad), "--base", str(bases["gemma"]), "--profile", "lorax"]) == 1
    assert "  - r:" not in capsys.readouterr().err


def test_an_adapter_of_another_base_is_refused_once_for_the_root_cause(bases, tmp_path):
    other = make_lora_adapter(bases["wide"], tmp_path / "wide-adapter")
    violations = servability.check_adapter(other, bases["gemma"])
    root, *rest = violations
    assert root.field == "base_model_name_or_path" and not root.folded
    assert str(bases["wide"]) in root.reason and "[8, 96]" in root.reason and "needs [8, 64]" in root.reason
    assert "set base_model_name_or_path" not in " ".join(v.fix for v in violations)
    assert rest and all(v.folded for v in rest) and all(v.field != "base_model_name_or_path" for v in rest)
    assert servability.summary(violations) == str(root)
    lines = servability.report_lines(violations)
    assert lines[0].startswith("  - base_model_name_or_path") and all(line.startswith("    - ") for line in lines[1:])


def test_an_adapter_of_a_known_base_suggests_serving_it_on_that_base(tiny_base_dir, bases, tmp_path):
    other = make_lora_adapter(tiny_base_dir, tmp_path / "tiny-adapter")
    root = servability.check_adapter(other, bases["wide"])[0]
    assert root.fix == "serve it on the base it was trained on: --base tiny"
