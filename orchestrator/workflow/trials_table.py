"""What `--dry-run` prints: the scheduler in one line and every trial a sweep expands into."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table


def print_trials(spec, console: Console) -> None:
    console.print(scheduler_line(spec))
    if spec.method == "optuna":
        seeds = spec.seed_values()
        each = f" configurations, each on seeds {seeds} ({spec.trial_count()} trials)," if seeds else " trials"
        console.print(f"{spec.name}: method optuna proposes {spec.num_samples}{each} at run time from:")
        for name, param in spec.parameters.items():
            console.print(f"  {name}: {param.model_dump(exclude_none=True)}")
    else:
        print_table(spec, console)
    if (line := confirm_line(spec)) is not None:
        console.print(line, highlight=False)


def print_table(spec, console: Console) -> None:
    trials = spec.trials()
    names = [n for n in sorted({k for t in trials for k in t}) if n != "seed"]
    table = Table(title=f"{spec.name}: {len(trials)} trials ({spec.method})", title_justify="left")
    table.add_column("#", justify="right")
    for name in names:
        table.add_column(name)
    table.add_column("seed (effective)")
    for i, t in enumerate(trials):
        seed = spec.trial_config(t).train.seed
        table.add_row(str(i), *[("-" if name not in t else str(t[name])) for name in names], str(seed))
    console.print(table)


def scheduler_line(spec) -> str:
    s = spec.scheduler
    if s.type == "fifo":
        return "scheduler: fifo (every trial runs its whole budget)"
    what = (
        "configurations, judged on the mean over their seeds (seeds stop together)"
        if s.unit == "config"
        else "single trials"
    )
    return (
        f"scheduler: asha, unit {s.unit}: culls {what}; rungs from {s.grace_period:g} kimg, "
        f"keep 1/{s.reduction_factor:g}, max_t {s.max_t:g}"
    )


def confirm_line(spec) -> str | None:
    """What the sweep's `confirm:` section will run after it (None without one)."""
    c = spec.confirm
    if c is None:
        return None
    include = "".join(" + every configuration matching " + ",".join(f"{k}={v}" for k, v in e.items())
                      for e in c.include)
    seeds = f"{c.seeds} fresh seeds" if isinstance(c.seeds, int) else "seeds " + ", ".join(map(str, c.seeds))
    kimg = c.kimg if c.kimg is not None else spec.train.kimg
    return (f"then confirm stage {spec.name}-confirm: the top {c.top} configuration(s) on {spec.metric.name}{include}, "
            f"{seeds} each, FIFO, {kimg:g} kimg, {spec.eval.final_fid_samples} images per final FID")

