"""The conversion plan as plain data: what happens to each pointwise conv, and the totals.

A plan is what `convert(..., dry_run=True)` returns, what the CLI prints and what `report.json`
embeds; `to_dict`/`from_dict` make it JSON.
"""

from dataclasses import asdict, dataclass, field, fields


@dataclass
class LayerPlan:
    """One Conv2D: converted (with its groups and added layers) or skipped (with the reason)."""

    name: str
    in_channels: int | None
    filters: int
    converted: bool = False
    reason: str = ""
    groups: int | None = None
    interleave_step: int | None = None
    second_conv: bool = False
    batch_norm: str | None = None
    activation_layer: str | None = None
    activation: str | None = None
    trainable_before: int = 0
    trainable_after: int = 0
    total_before: int = 0
    total_after: int = 0
    macs_before: int | None = None
    macs_after: int | None = None
    dropped_settings: list = field(default_factory=list)  # settings of M no new layer carries
    reconstruction_error: float | None = None  # data-aware fit: relative error of the fitted replacement
    slices_error: float | None = None  # the same for the plain block-diagonal slices
    detail: str = ""  # the 2022 variant: padding, one-filter groups, L's groups
    channels_per_group: int | None = None  # the cpg this conv was planned with (per layer with per_layer)
    options: list | None = None  # target budget: [{cpg, groups, trainable_delta, error}] it chose from
    choice: str = ""  # target budget: why this option (its sensitivity and what it saves)


@dataclass
class Plan:
    """Every Conv2D's fate plus model totals (trainable parameters, all parameters, MACs)."""

    model_name: str
    channels_per_group: int
    input_shape: list | None = None
    layers: list = field(default_factory=list)
    trainable_params_before: int = 0
    trainable_params_after: int = 0
    total_params_before: int = 0
    total_params_after: int = 0
    macs_before: int | None = None
    macs_after: int | None = None
    fidelity: dict | None = None
    kept_models: list = field(default_factory=list)  # nested models left as they are, with the reason
    calibration: dict | None = None  # data-aware fit: samples, time
    variant: str = "2021"  # "2021": METHOD.md's rules; "2022": keffconvert/variant2022.py's
    per_layer: dict | None = None  # {layer or pattern: cpg or None} given to convert
    target: dict | None = None  # target budget: the budget, method, sensitivity and comparisons

    @property
    def converted(self):
        return [entry for entry in self.layers if entry.converted]

    @property
    def skipped(self):
        return [entry for entry in self.layers if not entry.converted]

    @property
    def reduction_pct(self):
        """Trainable-parameter reduction, in percent of the original."""
        if not self.trainable_params_before:
            return 0.0
        return 100.0 * (1 - self.trainable_params_after / self.trainable_params_before)

    @property
    def macs_reduction_pct(self):
        if not self.macs_before:
            return None
        return 100.0 * (1 - self.macs_after / self.macs_before)

    def to_dict(self):
        data = asdict(self)
        data["reduction_pct"] = round(self.reduction_pct, 4)
        macs = self.macs_reduction_pct
        data["macs_reduction_pct"] = None if macs is None else round(macs, 4)
        data["converted_layers"] = len(self.converted)
        data["skipped_layers"] = len(self.skipped)
        return data

    @classmethod
    def from_dict(cls, data):
        known = {f.name for f in fields(cls)}
        plan = cls(**{k: v for k, v in data.items() if k in known and k != "layers"})
        plan.layers = [LayerPlan(**entry) for entry in data.get("layers", [])]
        return plan
