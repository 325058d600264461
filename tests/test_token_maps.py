"""Token maps from the trace (one renderer for every method), the callback in W&B and the run directory,
`leanvit visualize` and `leanvit report`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from callbacks.token_maps import (
    GREY,
    GROUP_ALPHA,
    GROUP_COLOURS,
    changing_layers,
    save_figures,
    token_map,
    token_map_figure,
)
from datamodules import export_image_folder
from lightning_modules import METHODS

from helpers import FAST, QUICKSTART, leanvit


def test_token_map_pixels_by_hand() -> None:
    rgb = np.full((8, 8, 3), 0.2)
    rgb[:4, 4:] = 0.8  # patch 1 (top right) is bright
    owner = np.array([1, 2, 2, -1])  # 2x2 grid of 4 px patches: patch 0 alone, 1 and 2 merged, 3 pruned
    out = token_map(rgb, owner, (2, 2))
    np.testing.assert_allclose(out[1, 1], rgb[1, 1])  # a patch with its own token shows the image
    np.testing.assert_allclose(out[6, 6], 0.35 * 0.2 + 0.65 * GREY)  # pruned: greyed
    colour = GROUP_COLOURS[2]  # the group of token 2, tinted over each member's own pixels
    np.testing.assert_allclose(out[2, 6], (1 - GROUP_ALPHA) * 0.8 + GROUP_ALPHA * colour)
    np.testing.assert_allclose(out[6, 2], (1 - GROUP_ALPHA) * 0.2 + GROUP_ALPHA * colour)
    assert (out[:, 4] == 1.0).any() or (out[4, :] == 1.0).any()  # a white border around the group


def test_only_the_maps_that_change_are_drawn() -> None:
    from lightning_modules.trace import TokenTrace

    ident = torch.arange(1, 5).view(1, 4)
    fused = torch.tensor([[1, 2, 2, 2]])
    owner = [ident, ident, fused, fused, fused]  # a reduction inside block 1 only (4 blocks)
    trace = TokenTrace(owner=owner, tokens=torch.tensor([[5, 5, 3, 3, 3]]), mlp_tokens=torch.tensor([[5, 3, 3, 3]]),
                       num_prefix_tokens=1, grid_size=(2, 2))
    assert changing_layers(trace, 0) == [2]
    steps = [torch.tensor([[1, 2, 3, 4 - k]]) for k in range(9)]  # changes at every layer of 8
    many = TokenTrace(owner=steps, tokens=torch.full((1, 9), 5), mlp_tokens=torch.full((1, 8), 5),
                      num_prefix_tokens=1, grid_size=(2, 2))
    assert changing_layers(many, 0) == [1, 3, 6, 8]  # four, spread, the last included


@pytest.mark.parametrize("method", list(METHODS))
def test_figure_for_each_method(method: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = METHODS[method](backbone="vit_micro_patch4_32", num_classes=10, **METHODS[method].demo_settings).eval()
    images = torch.randn(2, 3, 32, 32)  # the trace comes from these; the map is drawn over a white image
    with torch.no_grad():
        _, trace = module.student(images, trace=True)
    layers = [2, 6]
    fig = token_map_figure(np.ones((32, 32, 3)), trace, 0, layers, dpi=50)
    path = tmp_path / "fig.png"
    fig.savefig(path)
    png = np.asarray(Image.open(path).convert("RGB")).astype(float) / 255
    # the depth panel only where patches ran different numbers of blocks: halted (A-ViT) or dropped (DynamicViT)
    per_patch_depth = any(bool((owner < 0).any()) for owner in trace.owner)
    titles = [ax.get_title() for ax in fig.axes]
    assert ("blocks run per patch" in titles) == per_patch_depth
    panels = 1 + len(layers) + int(per_patch_depth) + 1
    assert png.shape[:2] == (int(3.9 * 50), int(3.2 * panels * 50))
    assert [t.get_text() for t in fig.legends[0].get_texts()][0].startswith("kept")
    owner = trace.owner[2][0].numpy()
    ax = fig.axes[1]  # the map entering block 2

    def pixel(patch: int) -> np.ndarray:
        row, col = divmod(patch, 8)
        x, y = ax.transData.transform(((col + 0.5) * 4 - 0.5, (row + 0.5) * 4 - 0.5))
        return png[png.shape[0] - int(round(y)), int(round(x))]

    pruned = [i for i in range(64) if owner[i] < 0]
    alone = [i for i in range(64) if owner[i] >= 0 and (owner == owner[i]).sum() == 1]
    if method in ("dynamicvit", "avit"):
        assert pruned and alone
        assert np.abs(pixel(pruned[0]) - pixel(alone[0])).max() > 0.2  # greyed vs white
    if method == "dense":
        assert not pruned and len(alone) == 64
    paths = save_figures(module.student, images, tmp_path / "maps", ["a", "b"], (0.5,) * 3, (0.5,) * 3, dpi=40)
    assert [p.name for p in paths] == ["a.png", "b.png"] and all(p.stat().st_size > 1000 for p in paths)


def test_callback_writes_pngs_and_wandb_images(in_tmp: Path) -> None:
    assert leanvit("fit", QUICKSTART, *FAST, "method=tome", "model.r=4", "trainer.max_epochs=2",
                   "trainer.limit_train_batches=2", "logger.wandb.enabled=true",
                   "callbacks.token_maps={num_images: 2, every_n_epochs: 1, dpi: 40}") == 0
    run = in_tmp / "runs" / "digits" / "dense" / "version_0"
    pngs = sorted(p.name for p in (run / "token_maps").glob("*.png"))
    assert pngs == ["epoch000_image0.png", "epoch000_image1.png", "epoch001_image0.png", "epoch001_image1.png"]
    logged = list(run.glob("wandb/offline-run-*/files/media/images/**/*.png"))
    assert len(logged) == 4


def test_visualize_any_images(in_tmp: Path) -> None:
    tree = export_image_folder(in_tmp / "digits")
    assert leanvit("visualize", QUICKSTART, *FAST, "method=evit", "model.reduction_layers=[0]",
                   f"images={tree}/val/3/*.png", "out=maps", "layers=[1,2]") == 0
    written = list((in_tmp / "maps").glob("*.png"))
    assert len(written) == len(list((tree / "val" / "3").glob("*.png"))) > 10
    for folder in ("a", "b"):  # one file name in two folders: two figures, not one written twice
        (in_tmp / "same" / folder).mkdir(parents=True)
        (in_tmp / "same" / folder / "x.png").write_bytes(next((tree / "val" / "3").glob("*.png")).read_bytes())
    assert leanvit("visualize", QUICKSTART, *FAST, f"images={in_tmp}/same/*/x.png", "out=same_maps") == 0
    assert sorted(p.name for p in (in_tmp / "same_maps").glob("*.png")) == ["a_x.png", "b_x.png"]
    assert leanvit("visualize", QUICKSTART, "images=nothing/*.png") == 2


def test_report_on_two_runs(in_tmp: Path) -> None:
    throughput = "callbacks.throughput={batch_size: 8, warmup: 1, repeats: 2}"
    for method, extra in (("dense", []), ("evit", ["model.reduction_layers=[0]"])):
        assert leanvit("fit", QUICKSTART, *FAST, f"method={method}", *extra, "trainer.max_epochs=1",
                       "trainer.limit_train_batches=4", throughput, f"experiment=report_{method}",
                       "data.dataset=digits_canvas", "data.scale=[1.0,1.0]") == 0  # a data set that knows its foreground
    runs = [str(in_tmp / "runs" / f"report_{m}" / "version_0") for m in ("dense", "evit")]
    assert leanvit("report", *runs, "out=summary") == 0
    out = in_tmp / "summary"
    for name in ("accuracy_vs_throughput.png", "accuracy_vs_gmacs.png"):
        assert Image.open(out / name).size[0] > 300
    table = (out / "report.md").read_text()
    assert all(run in table for run in runs) and "**dense**" in table and "keep_rate=0.7" in table
    assert "vit_micro_patch4_32 depth=2" in table  # the backbone with its overrides: a 2-block micro ViT
    dense_row = next(line for line in table.splitlines() if "report_dense" in line)
    assert dense_row.split("|")[7].strip() == "-"  # the dense row is the baseline, not a speed-up
    evit_row = next(line for line in table.splitlines() if "report_evit" in line)
    assert "| x" in evit_row  # a speed-up measured beside the dense model
    assert "kept on foreground | kept on background" in table
    assert [float(dense_row.split("|")[i]) for i in (9, 10)] == [1.0, 1.0]  # dense keeps every patch
    assert all(0.0 <= float(evit_row.split("|")[i]) < 1.0 for i in (9, 10))  # EViT fused some at block 0
    assert leanvit("report", str(in_tmp)) == 2  # not a run directory


def test_report_labels_shorten_per_block_lists() -> None:
    """DiffRate's 12 counts per list would squeeze the plot: a label keeps each list's ends."""
    from experiments.report import RunSummary

    def label(setting: str) -> str:
        return RunSummary("run", "m", "b", setting, None, None, None, None).label

    assert label("prune_kept_num=[65, 65, 57, 49, 41, 33] merge_kept_num=[57, 49, 17]") == \
        "m prune_kept_num=[65..33] merge_kept_num=[57..17]"
    assert label("r=8") == "m r=8" and label("reduction_layers=[3, 6]") == "m reduction_layers=[3, 6]"
