"""Host syncs per training step against depth, for each sampler and mode (issue #17;
``vcas_bench/measure/sync_budget.py``). Writes ``<out>/syncs-<device>.{json,md}``.

    python scripts/sync_check.py                      # 1, 2, 4, 8 layers on the default device
    python scripts/sync_check.py --device cuda        # with torch.cuda.set_sync_debug_mode("warn")
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vcas_bench.measure.sync_budget import SAMPLERS, count_syncs


def markdown(counts: list[dict], layers: list[int]) -> str:
    lines = ["Host syncs per step: backward / whole step (`measure/syncs.py`; on a GPU also the syncs",
             "`torch.cuda.set_sync_debug_mode(\"warn\")` reported in the backward, in brackets).", "",
             "| sampler | " + " | ".join(f"{n} layers" for n in layers) + " |",
             "|" + "---|" * (len(layers) + 1)]
    for sampler in dict.fromkeys(c["sampler"] for c in counts):
        cells = []
        for n in layers:
            c = next(c for c in counts if c["sampler"] == sampler and c["layers"] == n)
            warned = "" if c["cuda_warnings"] is None else f" [{c['cuda_warnings']}]"
            cells.append(f"{c['backward']} / {c['step']}{warned}")
        lines.append(f"| {sampler} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--layers", default="1,2,4,8")
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args(argv)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    layers = [int(n) for n in args.layers.split(",")]
    samplers = args.samplers.split(",")
    counts = [count_syncs(s, n, device, args.hidden).as_dict() for s in samplers for n in layers]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"device": device.type, "counts": counts}
    (out / f"syncs-{device.type}.json").write_text(json.dumps(record, indent=1) + "\n")
    table = markdown(counts, layers)
    (out / f"syncs-{device.type}.md").write_text(table)
    print(table)
    return counts


if __name__ == "__main__":
    main()
