"""What every benchmark script shares: the repository on sys.path, device labels, backend switches, and one
results format (a markdown table file and its JSON twin). torch only: no Ray, no pydantic, no orchestrator."""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gan.precision import PrecisionState, precision_state, restore_precision  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "anime-faces-64"
BATCH = 100  # the papers' batch size; every training benchmark uses it
WIDTHS = {  # generator widths by first width; the paper's three sizes
    "512": (512, 256, 128, 64),
    "1024": (1024, 512, 256, 128),
    "2048": (2048, 1024, 512, 256),
}
BCE_VARIANTS = ("dcgan", "use-gan", "cmhsa-gan", "use-cmhsa-gan")  # the variants a CUDA graph covers


def backend_flags() -> tuple[bool, PrecisionState]:
    """cudnn.benchmark and the TF32 switches, read through gan.precision (the API training uses)."""
    return torch.backends.cudnn.benchmark, precision_state()


def set_backend_flags(benchmark: bool, precision: PrecisionState) -> None:
    torch.backends.cudnn.benchmark = benchmark
    restore_precision(precision)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return f"{platform.processor() or 'CPU'} ({os.cpu_count()} cores)"


def run_metadata(device_label: str, **extra) -> dict:
    """What every results file starts with; the load average shows whether the machine was shared."""
    return {
        "device": device_label,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        **extra,
    }


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value) -> str:
        return "-" if value is None or value == "" else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(out_dir: Path, kind: str, meta: dict, tables: dict[str, tuple[list[dict], list[str]]]) -> None:
    """<out_dir>/<kind>-<device>-<date>.md (metadata + tables) and .json (the same, machine-readable).
    `tables` maps a title to (rows, columns). Every bench script writes through this: one results format."""
    slug = "".join(c if c.isalnum() else "-" for c in meta["device"].lower()).strip("-")[:40]
    stem = out_dir / f"{kind}-{slug}-{meta['date']}"
    out_dir.mkdir(parents=True, exist_ok=True)
    text = f"# bench {kind}\n\n" + "\n".join(f"- {k}: `{v}`" for k, v in meta.items()) + "\n"
    for title, (rows, columns) in tables.items():
        text += f"\n## {title}\n\n{markdown_table(rows, columns)}\n"
    stem.with_suffix(".md").write_text(text)
    payload = {"meta": meta, "tables": {title: rows for title, (rows, _) in tables.items()}}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nwrote {stem}.md and .json")
