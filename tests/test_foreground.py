"""Foreground diagnostics: how often the kept tokens fall on the digit, from the token trace and the canvas data
set's knowledge of its foreground (`val/keep_on_foreground`, `val/keep_on_background`)."""
from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch

from datamodules import EmbeddedDataModule
from datamodules.embedded import load_embedded, split_indices
from lightning_modules import METHODS
from lightning_modules.trace import TokenTrace, kept_alone, patch_regions, region_keep_counts


def test_kept_alone_is_false_for_left_merged_and_fused_patches() -> None:
    # 1 prefix token; patches 0 and 1 share token 1 (merged), patch 2 alone at 2, patch 3 left, patch 4 alone at 3
    owner = torch.tensor([[1, 1, 2, -1, 3], [1, 2, 3, 4, 5]])
    assert kept_alone(owner, num_prefix=1).tolist() == [[False, False, True, False, True], [True] * 5]


def test_patch_regions_marks_a_patch_with_any_pixel_of_the_region() -> None:
    mask = torch.zeros(1, 4, 6, dtype=torch.bool)  # a 2 x 3 grid of 2 x 2 patches
    mask[0, 3, 2] = True  # row 1 (pixels 2-3), col 1 (pixels 2-3)
    mask[0, 0, 5] = True  # row 0, col 2
    assert patch_regions(mask, (2, 3)).tolist() == [[False, False, True, False, True, False]]


def test_region_counts_by_hand() -> None:
    # 2 blocks, 4 patches, 1 prefix; foreground = patches 0 and 1
    owner = [torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 2, 3, -1]]), torch.tensor([[1, 2, 2, -1]])]
    trace = TokenTrace(owner=owner, tokens=torch.tensor([[5, 4, 3]]), mlp_tokens=torch.tensor([[4, 3]]),
                       num_prefix_tokens=1, grid_size=(2, 2))
    kept, total = region_keep_counts(trace, torch.tensor([[True, True, False, False]]))
    # after block 0: patches 0, 1, 2 alone, 3 gone; after block 1: patch 0 alone, 1 and 2 merged, 3 gone
    # -> foreground 2 + 1 of 4, background 1 + 0 of 4
    assert kept.tolist() == [3.0, 1.0] and total.tolist() == [4.0, 4.0]


def test_canvas_foreground_is_the_digit_ink_of_the_stored_images() -> None:
    dm = EmbeddedDataModule(dataset="mnist_canvas", batch_size=64, scale=(1.0, 1.0))
    images, _ = next(iter(dm.val_dataloader()))
    stored, labels = load_embedded("mnist_canvas")
    raw = stored[split_indices(labels, dm.val_fraction, dm.split_seed)["val"][:64]]  # (64, 32, 32) uint8
    assert torch.equal(dm.foreground(images), torch.from_numpy(raw > 0))
    assert EmbeddedDataModule(dataset="digits").foreground(images) is None
    ink = patch_regions(dm.foreground(images), (8, 8)).float().mean()
    assert 0.1 < float(ink) < 0.3  # the digit's ink touches a few of the 16 patches under its 16 px box


def test_validation_logs_the_foreground_keep_from_the_trace() -> None:
    """EViT's attention-based keep on the canvas: the logged shares equal the ones recomputed from the trace of
    the same images, and the dense model keeps every patch (1.0 on both)."""
    dm = EmbeddedDataModule(dataset="mnist_canvas", batch_size=50, scale=(1.0, 1.0))
    images, _ = next(iter(dm.val_dataloader()))
    logged = {}
    for method in ("dense", "evit"):
        torch.manual_seed(0)
        settings = METHODS[method].demo_settings
        module = METHODS[method](backbone="vit_micro_patch4_32", num_classes=10, **settings)
        trainer = pl.Trainer(limit_val_batches=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False)
        logged[method] = trainer.validate(module, datamodule=dm, verbose=False)[0]
        if method == "evit":
            with torch.no_grad():  # Lightning gives the module back in the mode it was built in (train)
                _, trace = module.student.eval()(images, trace=True)
            kept, total = region_keep_counts(trace, patch_regions(dm.foreground(images), trace.grid_size))
            expected = (kept / total).tolist()
    assert logged["dense"]["val/keep_on_foreground"] == 1.0 and logged["dense"]["val/keep_on_background"] == 1.0
    assert np.allclose([logged["evit"]["val/keep_on_foreground"], logged["evit"]["val/keep_on_background"]],
                       expected, atol=1e-6)
    assert logged["evit"]["val/keep_on_background"] < 1.0


def test_rank_auc_by_hand() -> None:
    from experiments.ablation import rank_auc

    inside = torch.tensor([[True, True, False, False]] * 3)
    score = torch.tensor([[3.0, 2.0, 1.0, 0.0],   # every digit patch above every background one
                          [0.0, 1.0, 2.0, 3.0],   # every one below
                          [1.0, 1.0, 1.0, 1.0]])  # ties: blind
    assert rank_auc(score, inside).tolist() == [1.0, 0.0, 0.5]
    # digit patches 3.0 and 1.0 against background 2.0 and 0.0: 3 of the 4 pairs rank the digit patch first
    assert rank_auc(torch.tensor([[3.0, 1.0, 2.0, 0.0]]), inside[:1]).tolist() == [0.75]
    assert rank_auc(torch.zeros(1, 4), torch.zeros(1, 4, dtype=torch.bool)).isnan().all()
