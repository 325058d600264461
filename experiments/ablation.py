"""`make ablation` (`python -m experiments.ablation`): why DynamicViT does not learn on the canvas digits at the
scaled-down recipe, and which recipe change makes its predictors see the digit.

Every variant fine-tunes `canvas/dynamicvit.yaml` from one dense canvas checkpoint (as `make accuracy` does) with
one change, in the order the candidates are tried: the effective batch (gradient accumulation; the official
`main.py` uses the lr it is given at any batch, DeiT's rule scales it linearly - both are measured), the number of
steps, the predictor warm-up (the frozen-backbone epochs), the policy softmax's eps. Each is measured the same way:
val/acc1 at the top-k inference, the share of digit and background patches that keep their own token
(`val/keep_on_foreground` / `val/keep_on_background`) and the first predictor's mean keep probability on digit
and on background patches of the validation images (its gap is what a blind predictor lacks). The table goes into
BENCHMARKS.md between `<!-- dynamicvit ablation -->` markers.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

CONFIG = "canvas/dynamicvit.yaml"
# Every variant starts from the official recipe scaled down: the canvas YAML with the official policy eps (the YAML
# itself uses the ablation's winner, 1e-2); a variant's own overrides come after these.
BASE = ["model.policy_eps=1.0e-6"]
BEGIN, END = "<!-- dynamicvit ablation -->", "<!-- end dynamicvit ablation -->"
# name -> (what changes, overrides); 125 updates per epoch at batch 32 (4,000 training images)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "recipe": ("the official recipe scaled down: batch 32, 5 epochs (625 updates), eps 1e-6", []),
    "batch256": ("effective batch 256 (8 x 32 accumulated), lr as given (official main.py), 5 epochs (78 updates)",
                 ["trainer.accumulate_grad_batches=8"]),
    "batch256_lr8x": ("effective batch 256, lr x8 (DeiT's linear rule), 5 epochs",
                      ["trainer.accumulate_grad_batches=8", "model.lr=8.0e-3"]),
    "batch256_20ep": ("effective batch 256, lr as given, 20 epochs (312 updates, 4x the images)",
                      ["trainer.accumulate_grad_batches=8", "trainer.max_epochs=20", "model.warmup_epochs=4",
                       "model.backbone_freeze_epochs=4"]),
    "steps2x": ("batch 32, 10 epochs (1,250 updates)",
                ["trainer.max_epochs=10", "model.warmup_epochs=2", "model.backbone_freeze_epochs=2"]),
    "predictor_warmup": ("the backbone frozen for all 5 epochs: only the predictors learn",
                         ["model.backbone_freeze_epochs=5"]),
    "eps1e-2": ("policy softmax eps 1e-2 instead of 1e-6", ["model.policy_eps=1.0e-2"]),
}


def rank_auc(score: Tensor, inside: Tensor) -> Tensor:
    """Per image, the share of (inside, outside) patch pairs where the inside patch scores higher (ties count a
    half): 1 = every digit patch ranks above every background patch, 0.5 = blind. score: (B, N) float, inside:
    (B, N) bool -> (B,), NaN for an image without patches on one side."""
    above = (score[:, :, None] > score[:, None, :]).float() + 0.5 * (score[:, :, None] == score[:, None, :]).float()
    pairs = inside[:, :, None] & ~inside[:, None, :]  # (B, N, N): i inside, j outside
    return (above * pairs).sum((1, 2)) / pairs.sum((1, 2))


@torch.no_grad()
def keep_probabilities(run_dir: Path, checkpoint: str = "last.ckpt") -> tuple[float, float, float]:
    """The first predictor's mean keep probability on the validation images' digit patches and background patches
    (every patch scored, as at the first stage of inference), and how well its keep score ranks digit above
    background patches (`rank_auc`, averaged over images: unlike the probabilities it does not saturate), from a
    run's final weights."""
    from experiments.build import build_objects, load_checked
    from lightning_modules.trace import patch_regions
    from lightning_modules.vit import load_weights

    cfg = load_checked(str(run_dir / "config.yaml"), [])
    module, datamodule = build_objects(cfg, resuming=True, command="validate")
    load_weights(module.student, str(run_dir / "checkpoints" / checkpoint))
    student = module.student.eval()
    scores: list[Tensor] = []  # the first predictor's output in the inference forward, where every patch is scored
    hook = student.score_predictor[0].register_forward_hook(lambda mod, args, out: scores.append(out[..., 0]))
    sums, counts = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    aucs = []
    for images, _ in datamodule.val_dataloader():
        student(images)
        log_keep = scores.pop()  # (B, N0) keep log-probabilities
        regions = patch_regions(datamodule.foreground(images), student.vit.patch_embed.grid_size)
        keep, inside = log_keep.exp().double(), regions.double()
        sums += torch.stack([(keep * inside).sum(), (keep * (1 - inside)).sum()])
        counts += torch.stack([inside.sum(), (1 - inside).sum()])
        aucs.append(rank_auc(log_keep, regions))
    hook.remove()
    auc = torch.cat(aucs)
    return float(sums[0] / counts[0]), float(sums[1] / counts[1]), float(auc[~auc.isnan()].mean())


def measure(run_dir: Path) -> dict[str, Any]:
    results = json.loads((run_dir / "results_fit.json").read_text())
    fg_prob, bg_prob, auc = keep_probabilities(run_dir)
    return {"acc1": results["val/acc1"], "keep_fg": results["val/keep_on_foreground"],
            "keep_bg": results["val/keep_on_background"], "prob_fg": fg_prob, "prob_bg": bg_prob, "auc": auc,
            "seconds": results.get("wall_seconds")}


def markdown(rows: dict[str, dict[str, Any]], weights: str, command: str) -> str:
    lines = [BEGIN, "### DynamicViT on the canvas digits: what makes its predictors see the digit", "",
             f"Regenerate: `{command}` (each variant fine-tunes `{CONFIG}` from the same dense canvas checkpoint, "
             f"{weights}).",
             "keep prob.: the first predictor's mean keep probability on digit / background patches of the 1,000",
             "validation images; rank AUC: the share of (digit, background) patch pairs of an image whose digit patch",
             "the predictor ranks higher (0.5: blind, 1: every digit patch first); kept: the share of (patch, block)",
             "pairs where a digit / background patch keeps its own token at the top-k inference",
             "(`val/keep_on_foreground` / `val/keep_on_background`).", "",
             "| variant | change | val/acc1 (%) | keep prob. digit | keep prob. background | gap | rank AUC | kept digit | "
             "kept background | fit (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {VARIANTS[name][0]} | {r['acc1']:.2f} | {r['prob_fg']:.3f} | {r['prob_bg']:.3f} | "
                     f"{r['prob_fg'] - r['prob_bg']:+.3f} | {r['auc']:.3f} | {r['keep_fg']:.3f} | {r['keep_bg']:.3f} | "
                     f"{'-' if r['seconds'] is None else format(r['seconds'], '.0f')} |")
    return "\n".join(lines + [END])


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.ablation", description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="the dense canvas checkpoint every variant starts from (default: train it "
                        "first, as make accuracy does)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--runs-dir", default="runs", type=Path)
    parser.add_argument("--version", default=time.strftime("ablation_%Y%m%d_%H%M%S"))
    parser.add_argument("--output", default="BENCHMARKS.md", type=Path, help="'-' to print the table only")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every variant (e.g. trainer.max_epochs=1 for a smoke run)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}")

    from experiments.accuracy import QUIET, SCRATCH, fit, write_section

    if args.weights is None:
        print(f"make ablation: {SCRATCH} (the dense start)", flush=True)
        args.weights = str(fit(SCRATCH, args.runs_dir, args.version, [*QUIET, *args.set]) / "checkpoints" / "best.ckpt")
    rows = {}
    for i, name in enumerate(names, 1):
        print(f"make ablation: [{i}/{len(names)}] {name}: {VARIANTS[name][0]}", flush=True)
        run = fit(CONFIG, args.runs_dir, f"{args.version}_{name}",
                  [*QUIET, f"model.weights={args.weights}", *BASE, *VARIANTS[name][1], *args.set])
        rows[name] = measure(run)
        print(f"make ablation: {name}: {json.dumps(rows[name])}", flush=True)
    command = "make ablation" + "".join(f" --set {o}" for o in args.set)
    section = markdown(rows, args.weights, command)
    if str(args.output) == "-":
        print(section)
    else:
        write_section(args.output, section, BEGIN, END, heading="## DynamicViT ablation")
        print(f"make ablation: wrote the table to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
