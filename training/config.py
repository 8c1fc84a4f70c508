"""Run configuration: one YAML file per distillation run, validated before anything runs.

Every section rejects unknown keys, and all problems are reported at once with their field
and fix. Command-line flags override single fields (``--rank 16`` sets ``lora.rank``).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from training import judge
from training.task import describe_errors
from training.teacher_variant import TeacherVariant

SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LogFilter(_Strict):
    """Which request-log exchanges become rows (every given filter must hold)."""

    route: str | None = None
    arm: str | None = None
    adapter: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    min_feedback: dict[str, float] = Field(default_factory=dict)  # metric -> minimum mean value


class DataConfig(_Strict):
    """Where rows come from and how they are split."""

    source: str = "generator"  # "generator" (the task's), a .jsonl / .csv file, a saved HF datasets directory, or request-log:PATH (a SQLite file or a postgresql:// URL)
    log_filter: LogFilter = Field(default_factory=LogFilter)
    output_field: str = "output"  # column holding the teacher's output, when the source has one
    gold_field: str = "label"  # column holding a gold label, when the source has one
    use_gold_as_output: bool = True  # without a teacher, train on gold labels
    train_size: int = Field(1000, ge=1)  # rows the generator makes for training
    test_size: int = Field(200, ge=1)  # held-out rows the generator makes
    test_fraction: float = Field(0.1, gt=0.0, lt=1.0)  # for file sources
    seed: int = 0


class SelfConsistencyConfig(_Strict):
    """Ask the teacher ``samples`` times per training row; keep rows its answers agree on."""

    samples: int = Field(5, ge=2)
    temperature: float = Field(0.7, gt=0.0)  # sampling temperature of the extra answers
    min_agreement: float = Field(0.6, gt=0.0, le=1.0)  # share of samples that must give the majority answer
    relabel: bool = False  # replace an output that disagrees with a confident majority (else drop the row)


class RankingConfig(_Strict):
    """Score training rows (teacher log-probability or a judge endpoint) and keep the best fraction."""

    by: Literal["teacher_logprob", "judge"] = "teacher_logprob"
    keep_fraction: float = Field(0.8, gt=0.0, le=1.0)
    per_token: bool = False  # teacher_logprob / len(teacher_tokens) (LoRAX teachers; OpenAI ones with train.kd_ratio > 0)
    judge: EndpointConfig | None = None  # the judge endpoint, when by is judge
    judge_prompt: str | None = None  # template with {{input}} and {{output}}; the judge answers with a number

    @model_validator(mode="after")
    def _judge_settings(self) -> "RankingConfig":
        problems = []
        if self.by == "judge":
            if self.judge is None:
                problems.append("curation.ranking.judge is required when by is 'judge'; add judge: {url: URL} (the judge endpoint)")
            if self.judge_prompt is None:
                problems.append("curation.ranking.judge_prompt is required when by is 'judge'; add a template with {{input}} and {{output}}")
        if self.judge_prompt is not None:
            problems += [f"curation.ranking.judge_prompt {problem}" for problem in judge.check_prompt(self.judge_prompt)]
        if self.per_token and self.by != "teacher_logprob":
            problems.append("curation.ranking.per_token applies to by: teacher_logprob only; remove it or rank by teacher_logprob")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class CurationConfig(_Strict):
    """Rule filters, near-duplicate removal, teacher self-consistency, ranking and label balancing."""

    min_chars: int = Field(1, ge=0)
    max_chars: int = Field(2000, ge=1)
    input_regex: str | None = None  # rows whose input does not match are dropped
    dedup: bool = True
    dedup_threshold: float = Field(0.8, gt=0.0, le=1.0)  # estimated Jaccard of word 3-gram sets
    dedup_num_perm: int = Field(128, ge=16)
    self_consistency: SelfConsistencyConfig | None = None  # None: off
    ranking: RankingConfig | None = None  # None: off
    balance: bool = True
    max_label_ratio: float = Field(2.0, ge=1.0)  # cap each label at this multiple of the rarest
    max_per_label: int | None = Field(None, ge=1)


class LoraSettings(_Strict):
    """The adapter's shape; checked against the servability profile before training."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    targets: list[str] = Field(default_factory=lambda: list(SEVEN_PROJECTIONS))
    profile: Literal["strict", "lorax", "vllm"] = "strict"


class TrainSettings(_Strict):
    """The optimisation loop."""

    epochs: float = Field(1.0, gt=0.0)
    max_steps: int | None = Field(None, ge=1)  # overrides epochs
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0.0)
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_length: int = Field(256, ge=8)
    packing: bool = False  # pack each micro-batch's rows into sequences of up to max_length tokens
    seed: int = 0
    save_every: int = Field(50, ge=1)
    log_every: int = Field(5, ge=1)
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Logit distillation: loss = (1 - kd_ratio) * CE + kd_ratio * KL(teacher || student) over the
    # teacher's top kd_top_k tokens; 0 trains on the teacher's text alone (sequence-level).
    kd_ratio: float = Field(0.0, ge=0.0, le=1.0)
    kd_top_k: int = Field(5, ge=0, le=20)  # teacher tokens asked for and used per position

    @model_validator(mode="after")
    def _kd(self) -> "TrainSettings":
        if self.kd_ratio > 0 and self.kd_top_k < 1:
            raise ValueError("train.kd_ratio > 0 needs train.kd_top_k >= 1; set kd_top_k (e.g. 5) or kd_ratio: 0")
        return self


class EndpointConfig(_Strict):
    """An inference endpoint speaking the LoRAX or the OpenAI protocol."""

    url: str
    protocol: Literal["lorax", "openai"] = "lorax"
    model: str | None = None  # LoRAX adapter_id / OpenAI model; empty means the base model
    api_key_env: str | None = None  # name of the environment variable holding the API key
    concurrency: int = Field(4, ge=1, le=256)
    retries: int = Field(3, ge=0)
    timeout_s: float = Field(120.0, gt=0.0)


class RunConfig(_Strict):
    """A whole distillation run: task, base, data, curation, adapter, training, teacher."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    task: str = "demo"
    base: str = "tiny"
    runs_dir: str = "runs"
    registry: str | None = None
    teacher: EndpointConfig | None = None
    teacher_variant: TeacherVariant = Field(default_factory=TeacherVariant)  # how the teacher is asked (`stillhouse teacher compare --apply`)
    data: DataConfig = Field(default_factory=DataConfig)
    curation: CurationConfig = Field(default_factory=CurationConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)

    @model_validator(mode="after")
    def _sizes(self) -> "RunConfig":
        if self.curation.min_chars > self.curation.max_chars:
            raise ValueError("curation.min_chars exceeds curation.max_chars; lower min_chars or raise max_chars")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


class ConfigError(ValueError):
    """A run config is invalid; the message lists every problem with its field and fix."""


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The run config in ``path`` (or only defaults), with dotted-key ``overrides`` applied."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"{path}: cannot read the run config ({error})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a run config is a YAML mapping (name, task, base, data, lora, train, ...)")
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}  # absent, or saved as null (e.g. no teacher yet)
            node = node[part]
        node[leaf] = value
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{path or 'run config'}: {describe_errors(error)}") from None
