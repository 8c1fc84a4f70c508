"""The analysis plan of a route, pre-registered in the traffic-split file under ``experiment:``.

```yaml
routes:
  sentiment:
    metrics: {correct: {type: boolean, goal: maximize}}
    checks: {valid_output: {labels: [positive, negative, neutral]}}
    experiment:
      primary: correct                 # a feedback metric or an online output check of the route
      secondary: [valid_output]        # reported with Holm (or BH) corrected p-values
      guardrails:                      # non-inferiority margins against the control arm
        error_rate: {max_absolute: 0.02}
        latency_p95: {max_relative_increase: 0.25}
      alpha: 0.05
      mde: 0.05                        # minimum detectable effect, absolute units of the primary metric
      power: 0.8
      min_samples_per_arm: 100
      correction: holm                 # or bh
      method: sequential               # always-valid mSPRT, safe to peek; or fixed (read once at the planned n)
      ramp: {steps: [1, 5, 25, 50, 100], min_minutes_per_step: 10}
```

Writing the plan down before traffic flows is what makes the verdict honest: the metric, the
margins and the stopping rule cannot be picked after seeing the data.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: guardrail metrics the router measures per arm, and what each is per
GUARDRAILS = {
    "error_rate": "share of requests that ended in an error (upstream_error or client_error)",
    "fallback_rate": "share of requests the fallback arm answered",
    "latency_p95": "95th percentile of the time to the last byte, seconds",
    "ttft_p95": "95th percentile of the time to the first streamed chunk, seconds",
    "prompt_tokens": "prompt tokens per answered request",
    "generated_tokens": "generated tokens per answered request",
}
GuardrailName = Literal["error_rate", "fallback_rate", "latency_p95", "ttft_p95", "prompt_tokens", "generated_tokens"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Guardrail(_Strict):
    """How much worse than the control the candidate may be: exactly one of the two margins."""

    max_relative_increase: float | None = Field(default=None, ge=0)  # 0.25: at most 25% above the control
    max_absolute: float | None = Field(default=None, ge=0)  # at most this much above the control, in the metric's units

    @model_validator(mode="after")
    def _one_margin(self) -> "Guardrail":
        if (self.max_relative_increase is None) == (self.max_absolute is None):
            raise ValueError("set exactly one of max_relative_increase or max_absolute")
        return self

    def limit(self, control: float) -> float:
        """The highest candidate value that still passes, given the control's value."""
        if self.max_absolute is not None:
            return control + self.max_absolute
        return control * (1 + self.max_relative_increase)


class Ramp(_Strict):
    """The candidate's weight (percent of the route's traffic) at each step of a rollout."""

    steps: list[float] = Field(default_factory=lambda: [1, 5, 25, 50, 100], min_length=1)
    min_minutes_per_step: float = Field(default=10, ge=0)

    @model_validator(mode="after")
    def _increasing(self) -> "Ramp":
        if any(not 0 < step <= 100 for step in self.steps):
            raise ValueError(f"ramp.steps {self.steps} must lie in (0, 100] percent")
        if any(b <= a for a, b in zip(self.steps, self.steps[1:])):
            raise ValueError(f"ramp.steps {self.steps} must increase, e.g. [1, 5, 25, 50, 100]")
        return self


class Experiment(_Strict):
    """What the A/B analysis of one route tests, against which margins, and when it may stop."""

    primary: str
    secondary: list[str] = Field(default_factory=list)
    guardrails: dict[GuardrailName, Guardrail] = Field(default_factory=dict)
    alpha: float = Field(default=0.05, gt=0, lt=0.5)
    mde: float = Field(default=0.05, gt=0)
    power: float = Field(default=0.8, gt=0, lt=1)
    min_samples_per_arm: int = Field(default=100, ge=1)
    correction: Literal["holm", "bh"] = "holm"
    method: Literal["sequential", "fixed"] = "sequential"
    ramp: Ramp = Field(default_factory=Ramp)
