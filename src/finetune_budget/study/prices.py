"""What labels and training cost, and what the person needs: the prices a plan is made in.

    python evaluate.py mode=advise tracking.experiment=<name> \
        advise.label_cost=0.40 advise.compute_cost_per_hour=2.5 advise.target_gain=0.05 \
        advise.miss_penalty=5000

`label_cost` is the price of one labelled item, `compute_cost_per_hour` the price of an hour of
the device the runs were measured on (the runs' own throughput converts seconds to hours). A
target (`target_gain`, a relative gain over the pretrained model, or `target_value`, a value of
the metric) comes with `miss_penalty`, what falling short of it costs; without a target,
`value_per_gain` prices one unit of relative gain (1.0 = +100%). All in one currency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from finetune_budget.errors import ConfigError


@dataclass(frozen=True)
class Prices:
    """The prices of conf/advise/default.yaml (null: not priced)."""

    label_cost: float | None = None
    compute_cost_per_hour: float | None = None
    miss_penalty: float | None = None
    value_per_gain: float | None = None
    currency: str = "$"

    @property
    def priced(self) -> bool:
        """Whether a plan in money can be made (labels have a price)."""
        return self.label_cost is not None

    def check(self, has_target: bool, throughput: float | None = None) -> Prices:
        """Raise a one-line ConfigError for prices a plan cannot use; return self."""
        for name in ("label_cost", "compute_cost_per_hour", "miss_penalty", "value_per_gain"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(
                    f"advise.{name}={value!r} is not a price: give a number >= 0 "
                    f"(or null to leave it out)"
                )
        if has_target and self.label_cost == 0 and not self.compute_cost_per_hour:
            raise ConfigError(
                "advise.label_cost=0 with a target and no compute price makes every plan free: "
                "give advise.label_cost (the price of one label) or advise.compute_cost_per_hour"
            )
        if self.miss_penalty is not None and not has_target:
            raise ConfigError(
                f"advise.miss_penalty={self.miss_penalty} needs a target to miss: set "
                "advise.target_gain (e.g. 0.05) or advise.target_value"
            )
        if has_target and self.value_per_gain is not None:
            raise ConfigError(
                "advise.value_per_gain and a target are two ways to value the gain: "
                "give one (value_per_gain=null, or target_gain=null target_value=null)"
            )
        if self.compute_cost_per_hour and throughput is not None and not throughput > 0:
            raise ConfigError(
                "advise.compute_cost_per_hour needs the runs' measured throughput and these runs "
                "recorded none (train/seconds, data/samples_seen): rerun them with this version, "
                "or set advise.compute_cost_per_hour=null"
            )
        return self

    def compute_cost(self, seconds: float) -> float:
        """The price of `seconds` of training on the measured device (0 when not priced)."""
        return (self.compute_cost_per_hour or 0.0) * seconds / 3600.0

    def money(self, amount: float) -> str:
        """An amount as a person reads it: $1,234 or $0.42."""
        if not math.isfinite(amount):
            return "n/a"
        return (
            f"{self.currency}{amount:,.0f}"
            if abs(amount) >= 100
            else f"{self.currency}{amount:,.2f}"
        )
