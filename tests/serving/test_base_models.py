"""Base models: the rebuilt Gemma 3 tokenizer, the seeded tiny base, the cache and its errors."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from serving import base_models

BOS = 2
SENTIMENT_TEXT = "Review: Lovely view and kind hosts.\nSentiment: positive"
SENTIMENT_IDS = [30852, 236787, 87287, 1927, 532, 2712, 20472, 236761, 107, 203481, 236787, 4414]
PARIS_TEXT = "The capital of France is Paris."
PARIS_IDS = [818, 5279, 529, 7001, 563, 9079, 236761]


@pytest.fixture(scope="module")
def tokenizer(tiny_base_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_base_dir)


@pytest.fixture
def fresh_home(tmp_path: Path, tiny_base_dir: Path) -> Path:
    """An empty Stillhouse home that already holds the (10 s to build) tokenizer cache."""
    tokenizer_cache = tiny_base_dir.parent / base_models.TOKENIZER_CACHE_NAME
    shutil.copytree(tokenizer_cache, tmp_path / "models" / base_models.TOKENIZER_CACHE_NAME)
    return tmp_path


@pytest.fixture
def tiny_home(fresh_home: Path, tiny_base_dir: Path) -> Path:
    """A Stillhouse home holding a valid copy of the tiny base (copied, not built)."""
    shutil.copytree(tiny_base_dir, fresh_home / "models" / "tiny")
    return fresh_home


def _manifest(path: Path) -> dict:
    return json.loads((path / "stillhouse.json").read_text())


def _cached(home: Path, name: str) -> bool:
    return {status.name: status.cached for status in base_models.list_bases(home)}[name]


# --- the tokenizer ---------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "ids"), [(SENTIMENT_TEXT, SENTIMENT_IDS), (PARIS_TEXT, PARIS_IDS)])
def test_tokenizer_matches_gemma3_regression_vectors(tokenizer, text, ids):
    assert tokenizer(text).input_ids == [BOS, *ids]


@pytest.mark.parametrize(
    "text",
    [
        SENTIMENT_TEXT,
        "a  b   c    d",
        "    indented\n\tline\n\n\nend  ",
        "emoji 🤗🫩 and ümlauts, 日本語のテキスト",
        "<table><tr><td>cell</td></tr></table>",
        "trailing space ",
        "",
    ],
)
def test_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_runs_of_whitespace_are_single_pieces_as_in_sentencepiece(tokenizer):
    # Gemma 3's SentencePiece model holds "▁▁"... and "\n\n"... as atomic user-defined pieces.
    assert tokenizer("a  b").input_ids == [BOS, 236746, 138, 236763]
    assert tokenizer("    return").input_ids[:2] == [BOS, 140]
    assert tokenizer("x\n\ny").input_ids[2] == 108
    assert tokenizer("x\ny").input_ids[2] == 107
    assert tokenizer("\tfoo").input_ids[1] == 255968


def test_unknown_characters_fall_back_to_bytes(tokenizer):
    # U+1FAE9 is not in the vocabulary: its UTF-8 bytes F0 9F AB A9 become <0xF0>... (ids 238 + byte).
    assert tokenizer("🫩", add_special_tokens=False).input_ids == [238 + 0xF0, 238 + 0x9F, 238 + 0xAB, 238 + 0xA9]


def test_special_tokens(tokenizer):
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id) == (2, 1, 0, 3)
    assert len(tokenizer) == 262144
    ids = tokenizer("<start_of_turn>user\nhi<end_of_turn>\n").input_ids
    assert ids == [BOS, 105, 2364, 107, 2202, 106, 107]
    assert tokenizer.convert_ids_to_tokens(106) == "<end_of_turn>"
    assert 106 in tokenizer.all_special_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi\n"


def test_chat_template_is_gemma3s(tokenizer):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"


# --- the tiny base ---------------------------------------------------------------------------


def test_tiny_base_is_a_small_gemma3_with_the_real_vocabulary(tiny_base_dir: Path):
    config = json.loads((tiny_base_dir / "config.json").read_text())
    assert config["model_type"] == "gemma3_text"
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (2, 64, 262144)
    assert GenerationConfig.from_pretrained(tiny_base_dir).eos_token_id == [1, 106]
    identity = base_models.base_identity(tiny_base_dir)
    assert identity.name == "tiny"
    assert str(tiny_base_dir) in identity.aliases
    assert identity.model_type == "gemma3_text"


def test_tiny_base_generates_visible_text(tiny_base_dir: Path, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    special = {token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special}
    outputs = []
    for prompt in ("Hello world", "The capital of France is"):
        inputs = tokenizer(prompt, return_tensors="pt")
        generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs.input_ids.shape[1] :].tolist()
        assert len(generated) == 8
        assert not set(generated) & special
        outputs.append(generated)
    assert outputs[0] != outputs[1]


def test_tiny_base_is_bit_identical_across_builds(fresh_home: Path, tmp_path: Path, tiny_base_dir: Path):
    other_home = tmp_path / "other"
    shutil.copytree(fresh_home / "models" / base_models.TOKENIZER_CACHE_NAME, other_home / "models" / base_models.TOKENIZER_CACHE_NAME)
    first = base_models.provision("tiny", home=fresh_home, progress=False)
    torch.manual_seed(1234)  # the build must not depend on the global RNG
    second = base_models.provision("tiny", home=other_home, progress=False)
    assert first != second
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
    manifests = [_manifest(path) for path in (first, second, tiny_base_dir)]
    assert manifests[0]["files"] == manifests[1]["files"] == manifests[2]["files"]


# --- the cache ---------------------------------------------------------------------------------


def test_provision_reuses_the_cache(tiny_home: Path):
    path = tiny_home / "models" / "tiny"
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert base_models.provision("tiny", home=tiny_home, progress=False) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


def _truncate_weights(path: Path) -> None:
    weights = path / "model.safetensors"
    with weights.open("r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)


def _delete_config(path: Path) -> None:
    (path / "config.json").unlink()


def _stale_recipe(path: Path) -> None:
    manifest = _manifest(path)
    manifest["recipe"] = "an older recipe"
    (path / "stillhouse.json").write_text(json.dumps(manifest))


def _delete_manifest(path: Path) -> None:
    (path / "stillhouse.json").unlink()


@pytest.mark.parametrize("damage", [_truncate_weights, _delete_config, _stale_recipe, _delete_manifest])
def test_a_damaged_cache_is_reported_and_rebuilt(tiny_home: Path, tiny_base_dir: Path, capsys, damage):
    path = tiny_home / "models" / "tiny"
    damage(path)
    assert not _cached(tiny_home, "tiny")

    assert base_models.provision("tiny", home=tiny_home, progress=False) == path
    assert "invalid" in capsys.readouterr().err
    assert _cached(tiny_home, "tiny")
    # The rebuild is the same seeded model, and it loads.
    assert _manifest(path)["files"] == _manifest(tiny_base_dir)["files"]
    assert "model.embed_tokens.weight" in load_file(path / "model.safetensors")


def test_concurrent_provisions_build_once(fresh_home: Path, capsys):
    (fresh_home / "models" / ".build-tiny-killed").mkdir()  # what a killed build leaves behind
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(base_models.provision("tiny", home=fresh_home))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and results[0] == results[1]
    assert capsys.readouterr().err.count("building tiny into") == 1
    assert not list((fresh_home / "models").glob(".build-*"))


def test_list_bases(fresh_home: Path, tiny_home: Path):
    statuses = {status.name: status for status in base_models.list_bases(fresh_home / "empty")}
    assert set(statuses) == set(base_models.KNOWN_BASES) == {"gemma-3-270m", "tiny"}
    assert not statuses["tiny"].cached
    assert statuses["tiny"].path == fresh_home / "empty" / "models" / "tiny"
    statuses = {status.name: status for status in base_models.list_bases(tiny_home)}
    assert statuses["tiny"].cached and not statuses["gemma-3-270m"].cached


def test_stillhouse_home_follows_the_environment(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("STILLHOUSE_HOME", str(tmp_path))
    assert base_models.stillhouse_home() == tmp_path
    monkeypatch.delenv("STILLHOUSE_HOME")
    assert base_models.stillhouse_home() == Path.home() / ".cache" / "stillhouse"


# --- other bases and errors --------------------------------------------------------------------


def test_a_local_model_directory_is_used_as_is(tiny_base_dir: Path, tmp_path: Path):
    assert base_models.provision(str(tiny_base_dir)) == tiny_base_dir.resolve()
    local = tmp_path / "my-model"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert base_models.provision(str(local)) == local.resolve()
    identity = base_models.base_identity(local)
    assert (identity.name, identity.model_type) == ("my-model", "llama")
    assert str(local) in identity.aliases


def test_identity_of_a_directory_that_names_its_hub_model(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "_name_or_path": "Qwen/Qwen2.5-0.5B"}))
    identity = base_models.base_identity(tmp_path)
    assert identity.name == "Qwen/Qwen2.5-0.5B"
    assert str(tmp_path) in identity.aliases


def test_unknown_name_lists_the_known_bases():
    with pytest.raises(ValueError, match="unknown base model 'gemma-9000'") as error:
        base_models.provision("gemma-9000")
    assert "gemma-3-270m" in str(error.value) and "tiny" in str(error.value)
    assert "local" in str(error.value)


def test_missing_directory_is_named(tmp_path: Path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        base_models.provision(str(missing))


def test_directory_without_config_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="config.json"):
        base_models.provision(str(tmp_path))
    with pytest.raises(ValueError, match="config.json"):
        base_models.base_identity(tmp_path)


# --- the real base -----------------------------------------------------------------------------

SHOTS = [
    ("The room was spotless and the staff were lovely.", "positive"),
    ("Cold food, rude waiter, never again.", "negative"),
    ("Great location and a very comfortable bed.", "positive"),
    ("The shower was broken and nobody fixed it.", "negative"),
    ("Friendly hosts and a delicious breakfast.", "positive"),
    ("Noisy, dirty and overpriced.", "negative"),
]


@pytest.mark.slow
def test_gemma_270m_answers_a_six_shot_sentiment_prompt(real_base_dir: Path):
    mtime = (real_base_dir / "model.safetensors").stat().st_mtime_ns
    assert base_models.provision("gemma-3-270m", progress=False) == real_base_dir
    assert base_models.provision("google/gemma-3-270m", progress=False) == real_base_dir
    assert (real_base_dir / "model.safetensors").stat().st_mtime_ns == mtime

    identity = base_models.base_identity(real_base_dir)
    assert identity.name == "gemma-3-270m"
    assert "google/gemma-3-270m" in identity.aliases

    tokenizer = AutoTokenizer.from_pretrained(real_base_dir)
    model = AutoModelForCausalLM.from_pretrained(real_base_dir)
    assert model.config.num_hidden_layers == 18
    prefix = "".join(f"Review: {review}\nSentiment: {label}\n\n" for review, label in SHOTS)
    for review, label in [("Lovely view and kind hosts.", "positive"), ("The worst hotel I have ever stayed in.", "negative")]:
        inputs = tokenizer(f"{prefix}Review: {review}\nSentiment:", return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=1, do_sample=False)
        assert tokenizer.decode(output[0, inputs.input_ids.shape[1] :]) == f" {label}"
