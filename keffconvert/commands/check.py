"""`keffconvert check MODEL`: fail (exit 1, and only then) when a model is over its parameter budget."""

import json

import click

from keffconvert.errors import INPUT, INTERNAL_ERROR, OVER_BUDGET, SUCCESS, UNSUPPORTED_MODEL, USAGE

BUDGET_HELP = f"""\b
Limits come from the options, from --budget FILE, or (with neither) from the
[tool.keffconvert.budget] table of ./pyproject.toml; options override file values:

\b
  [tool.keffconvert.budget]
  max-params = 700_000          # trainable parameters
  max-total-params = 750_000    # all parameters
  max-macs = "50M"              # multiply-accumulates per image
  min-reduction = 80            # percent fewer trainable parameters than baseline
  baseline = "efficientnetb0"   # file or built-in name
  as-converted = true           # measure MODEL as keffconvert would convert it
  channels-per-group = 16

\b
Exit codes: {SUCCESS} within budget, {OVER_BUDGET} over budget (and nothing else), {USAGE} usage
error (no limits, bad budget file), {INPUT} model or baseline unreadable, {UNSUPPORTED_MODEL} model
cannot be measured, {INTERNAL_ERROR} internal error (a bug; see keffconvert --help)."""


class CountType(click.ParamType):
    """A count such as 700000, 700_000, 700k or 4.5M."""

    name = "N"

    def convert(self, value, param, ctx):
        from keffconvert.check.budget import parse_count
        from keffconvert.errors import BudgetConfigError

        if isinstance(value, int):
            return value
        try:
            return parse_count(value, f"--{param.name.replace('_', '-')}" if param else "value")
        except BudgetConfigError as error:
            self.fail(str(error), param, ctx)


COUNT = CountType()


@click.command("check", epilog=BUDGET_HELP)
@click.argument("model")
@click.option("--max-params", type=COUNT, default=None, help="Most trainable parameters allowed (700000, 700k, 0.7M).")
@click.option("--max-total-params", type=COUNT, default=None, help="Most parameters allowed, non-trainable included.")
@click.option("--max-macs", type=COUNT, default=None, help="Most multiply-accumulates per image (needs a fixed input size).")
@click.option("--min-reduction", type=click.FloatRange(0, 100), default=None, metavar="PCT",
              help="Least trainable-parameter reduction vs --baseline, in percent.")
@click.option("--baseline", default=None, metavar="MODEL", help="Model that --min-reduction compares with (file or built-in name).")
@click.option("--budget", "budget_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Read limits from FILE: a pyproject.toml ([tool.keffconvert.budget]) or a small TOML/JSON file.")
@click.option("--as-converted/--as-is", "as_converted", default=None,
              help="Measure MODEL as keffconvert would convert it (a dry run; nothing is built or trained). Default: as is.")
@click.option("-c", "--channels-per-group", type=click.IntRange(min=1), default=None, metavar="CPG",
              help="Channels per group for --as-converted (default 16).")
@click.option("--classes", type=click.IntRange(min=1), default=None, help="Classes, for built-in model names.")
@click.option("--input-size", type=click.IntRange(min=8), default=None, help="Square input side, for built-in model names.")
@click.option("--unsafe", is_flag=True, help="Allow Lambda layers (runs code stored in the file: only for files you trust).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="json: one JSON object on stdout (limits, actual values, pass/fail, overall).")
@click.pass_context
def check_command(ctx, model, max_params, max_total_params, max_macs, min_reduction, baseline, budget_file,
                  as_converted, channels_per_group, classes, input_size, unsafe, fmt):
    """Check MODEL against a parameter budget; exit 1 when any limit is exceeded."""
    from keffconvert.check.budget import Budget, check_model, read_budget_file, report_dict, require_limits, summary_line
    from keffconvert.loading import load_model

    flags = {"max-params": max_params, "max-total-params": max_total_params, "max-macs": max_macs,
             "min-reduction": min_reduction, "baseline": baseline, "as-converted": as_converted,
             "channels-per-group": channels_per_group}
    if budget_file:
        budget = read_budget_file(budget_file)
    elif all(flags[key] is None for key in ("max-params", "max-total-params", "max-macs", "min-reduction")):
        budget = read_budget_file("pyproject.toml", required=False) or Budget()
    else:
        budget = Budget()
    from_file = budget.source
    budget = budget.merged(flags)
    budget.source = from_file or "command line"
    require_limits(budget)  # before the slow part: no limits is a usage error, never a pass

    loaded = load_model(model, unsafe=unsafe, classes=classes, input_size=input_size)
    base_model = None
    if budget.min_reduction is not None and budget.baseline is not None:
        base_model = load_model(budget.baseline, unsafe=unsafe, classes=classes, input_size=input_size)
    measurement, base, verdicts = check_model(loaded, budget, base_model)

    if fmt == "json":
        click.echo(json.dumps(report_dict(model, measurement, budget, verdicts, base), indent=2))
    else:
        m = measurement
        how = f" as converted (channels per group {m.channels_per_group})" if m.as_converted else ""
        macs = f", {m.macs:,} MACs per image at input {m.input_shape}" if m.macs is not None else ""
        click.echo(f"{model}{how}: {m.trainable_params:,} trainable parameters, {m.total_params:,} in all{macs}")
        click.echo(f"budget from {budget.source}")
        for verdict in verdicts:
            click.echo(verdict.message())
        click.echo(summary_line(verdicts))
    if not all(v.passed for v in verdicts):
        ctx.exit(OVER_BUDGET)  # the only way `check` exits 1: errors have their own codes
