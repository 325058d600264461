"""`make quickstart` (`python -m experiments.run_quickstart`): the trade-off token reduction buys, in a few
minutes on a CPU.

1. `quickstart/dense.yaml`: a dense micro ViT trained from scratch on digits at random positions on a mostly
   black canvas, its speed measured at the end.
2. `quickstart/evit.yaml`: EViT fine-tuned from that model's best checkpoint, keeping the tokens the class token
   attends to; token maps of 4 validation digits, its speed beside the dense model.
3. `leanvit report` over both runs: accuracy vs throughput and vs GMACs, the dense model as a black star.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.run_quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", default="runs", type=Path)
    parser.add_argument("--version", default=time.strftime("%Y-%m-%d_%H%M%S"), help="the runs' version name")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for both fits (e.g. trainer.max_epochs=1 for a smoke run)")
    args = parser.parse_args(argv)

    from experiments.accuracy import fit
    from experiments.report import write_report

    started = time.time()
    print("quickstart 1/3: the dense model, from scratch", flush=True)
    quiet = ["trainer.enable_model_summary=false", *args.set]
    dense = fit("quickstart/dense.yaml", args.runs_dir, args.version, quiet)
    print("quickstart 2/3: EViT, fine-tuned from it", flush=True)
    evit = fit("quickstart/evit.yaml", args.runs_dir, args.version,
               [f"model.weights={dense / 'checkpoints' / 'best.ckpt'}", *quiet])
    print("quickstart 3/3: the report", flush=True)
    report = args.runs_dir / "quickstart" / f"report_{args.version}"
    write_report([dense, evit], report)
    a, b = (json.loads((run / "results_fit.json").read_text()) for run in (dense, evit))
    speed = b.get("throughput/speedup")
    print(f"quickstart: dense {a['val/acc1']:.1f} % at {a['flops/gmacs'] * 1000:.1f} MMACs; EViT {b['val/acc1']:.1f} % "
          f"at {b['flops/gmacs'] * 1000:.1f} MMACs" + (f", x{speed:.2f} the dense model's speed" if speed else "")
          + f" ({time.time() - started:.0f} s)\n  token maps: {evit / 'token_maps'}/\n  report:     {report}/report.md"
          f"\n  runs:       {dense}, {evit}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
