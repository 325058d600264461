"""Token maps: which patches a reduced ViT kept, merged, fused, pruned or halted, drawn from the token trace.

One figure per image: the input; the token maps that change (the layers where a reduction happened, at most
four) - pruned or halted patches greyed, patches that share a token tinted with one distinct colour per group
inside white borders; each patch's depth (the blocks its token ran: A-ViT's halting-depth map, drawn only when
patches differ); the token count per block; and a legend. Everything comes from `student(images, trace=True)`:
no method-specific code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pytorch_lightning.callbacks import Callback
from torch import Tensor

from callbacks.throughput import due_after_validation
from lightning_modules import method_name
from lightning_modules.base import ReductionModule
from lightning_modules.trace import TokenTrace

GREY_RGB = (0.55, 0.55, 0.55)  # pruned or halted patches
GREY = np.array(GREY_RGB)
# Group colours: saturated, far from grey and from each other (matplotlib's tab10 without its grey and olive),
# drawn over the image at GROUP_ALPHA so a merged or fused group stands out on grey digits and photos alike.
FIRST_GROUP = (0.12, 0.47, 0.71)  # (the legend's swatch)
GROUP_COLOURS = np.array([FIRST_GROUP, (1.0, 0.50, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16),
                          (0.58, 0.40, 0.74), (0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.09, 0.75, 0.81)])
GROUP_ALPHA = 0.7


def changing_layers(trace: TokenTrace, index: int, most: int = 4) -> list[int]:
    """The token maps worth drawing for image `index`: the layers whose map differs from the one before
    (a reduction happened), at most `most` of them spread evenly, the last change always included."""
    changes = [layer for layer in range(1, trace.depth + 1)
               if not torch.equal(trace.owner[layer][index], trace.owner[layer - 1][index])]
    if len(changes) <= most:
        return changes or [trace.depth]
    picks = np.linspace(0, len(changes) - 1, most).round().astype(int)
    return [changes[i] for i in sorted(set(picks))]


def to_rgb(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised (3, H, W) image -> (H, W, 3) floats in [0, 1]."""
    mean_t = torch.tensor(mean, dtype=image.dtype).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=image.dtype).view(3, 1, 1)
    return (image.detach().cpu() * std_t + mean_t).clamp(0, 1).permute(1, 2, 0).numpy()


def token_map(rgb: np.ndarray, owner: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Draw one layer's token map. rgb: (H, W, 3); owner: (N0,) token of each patch or -1 -> (H, W, 3).

    Patches no longer taking part are greyed; patches sharing a token are tinted with their group's colour
    (`GROUP_COLOURS`, by the group's token position) and outlined in white; patches with a token of their own
    show the image.
    """
    gh, gw = grid
    H, W = rgb.shape[:2]
    ph, pw = H // gh, W // gw
    patches = rgb[:gh * ph, :gw * pw].reshape(gh, ph, gw, pw, 3).transpose(0, 2, 1, 3, 4)  # (gh, gw, ph, pw, 3)
    labels = owner.reshape(gh, gw)
    out = patches.copy()
    gone = labels < 0
    out[gone] = 0.35 * out[gone] + 0.65 * GREY
    values, counts = np.unique(labels[~gone], return_counts=True)
    grouped = np.zeros_like(gone)
    for value in values[counts > 1]:
        members = labels == value
        colour = GROUP_COLOURS[int(value) % len(GROUP_COLOURS)]
        out[members] = (1 - GROUP_ALPHA) * patches[members] + GROUP_ALPHA * colour
        grouped |= members
    image = out.transpose(0, 2, 1, 3, 4).reshape(gh * ph, gw * pw, 3)
    # white borders wherever a grouped patch meets a patch of another token
    edge = np.zeros((gh * ph, gw * pw), dtype=bool)
    full = np.kron(labels, np.ones((ph, pw), dtype=labels.dtype))
    in_group = np.kron(grouped, np.ones((ph, pw), dtype=bool))
    diff_x = (full[:, 1:] != full[:, :-1]) & (in_group[:, 1:] | in_group[:, :-1])
    diff_y = (full[1:, :] != full[:-1, :]) & (in_group[1:, :] | in_group[:-1, :])
    edge[:, 1:] |= diff_x
    edge[1:, :] |= diff_y
    image[edge] = 1.0
    return image


def patch_depth(trace: TokenTrace, index: int) -> np.ndarray:
    """(N0,) blocks each patch's token ran in (its halting depth for A-ViT)."""
    return np.stack([(owner[index] >= 0).cpu().numpy() for owner in trace.owner[:-1]]).sum(0)


def class_colours(num_classes: int) -> np.ndarray:
    """(K, 3) a fixed colour per class for predicted masks: class 0 black (the canvas digits' background), the
    others from a seeded palette."""
    colours = np.random.default_rng(0).uniform(0.15, 1.0, size=(max(num_classes, 1), 3))
    colours[0] = 0.0
    return colours


def mask_overlay(rgb: np.ndarray, mask: np.ndarray, num_classes: int) -> np.ndarray:
    """A predicted label map `(H, W)` drawn in its class colours over the image, 60 / 40."""
    return 0.4 * rgb + 0.6 * class_colours(num_classes)[mask.clip(0, num_classes - 1)]


def token_map_figure(rgb: np.ndarray, trace: TokenTrace, index: int, layers: Optional[Sequence[int]] = None,
                     title: str = "", dpi: int = 100, mask: Optional[np.ndarray] = None,
                     num_classes: int = 0) -> Figure:
    """The figure for image `index` of a trace: input | the predicted mask (a segmentation model: `mask (H, W)`)
    | the token maps that change | the blocks each patch ran (only when patches differ, as A-ViT's do) | token
    counts, with a legend."""
    from matplotlib.patches import Patch

    depth = trace.depth
    layers = list(layers) if layers is not None else changing_layers(trace, index)
    depths = patch_depth(trace, index)
    show_depth = bool(depths.min() != depths.max())
    first = 2 if mask is not None else 1  # the panels before the token maps
    panels = first + len(layers) + int(show_depth) + 1
    fig = Figure(figsize=(3.2 * panels, 3.9), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels)
    axes[0].imshow(rgb, interpolation="nearest")
    axes[0].set_title("input", fontsize=10)
    if mask is not None:
        axes[1].imshow(mask_overlay(rgb, mask, num_classes), interpolation="nearest")
        axes[1].set_title("predicted mask", fontsize=10)
    for ax, layer in zip(axes[first:], layers):
        ax.imshow(token_map(rgb, trace.owner[layer][index].cpu().numpy(), trace.grid_size), interpolation="nearest")
        where = f"after block {layer - 1}" if layer == depth else f"entering block {layer}"
        ax.set_title(f"{where}: {int(trace.tokens[index, layer])} tokens", fontsize=10)
    if show_depth:
        depth_ax = axes[first + len(layers)]
        shown = depth_ax.imshow(depths.reshape(trace.grid_size), cmap="magma", vmin=0, vmax=depth)
        depth_ax.set_title("blocks run per patch", fontsize=10)
        fig.colorbar(shown, ax=depth_ax, fraction=0.046, pad=0.04)
    for ax in axes[:-1]:
        ax.set_xticks([])
        ax.set_yticks([])
    curve = axes[-1]
    curve.plot(range(depth + 1), trace.tokens[index].cpu().numpy(), marker="o", markersize=4)
    curve.set_xlabel("block", fontsize=9)
    curve.set_ylabel("tokens", fontsize=9)
    curve.set_ylim(bottom=0)
    curve.tick_params(labelsize=8)
    curve.set_title("tokens per block", fontsize=10)
    legend = [Patch(facecolor="white", edgecolor="black", label="kept: a token of its own (the image)"),
              Patch(facecolor=FIRST_GROUP, edgecolor="white", label="merged / fused: one colour per shared token"),
              Patch(facecolor=GREY_RGB, edgecolor="black", label="pruned / halted: no longer takes part")]
    fig.legend(handles=legend, loc="lower center", ncol=3, fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def save_figures(student: torch.nn.Module, images: Tensor, out_dir: Path, names: Sequence[str],
                 mean: Sequence[float], std: Sequence[float], layers: Optional[Sequence[int]] = None,
                 title: str = "", dpi: int = 100, module: Optional[ReductionModule] = None) -> list[Path]:
    """Run the student on `images` with the trace on and write one PNG per image; with a segmentation `module`
    (one with `predict_masks`), its predicted masks beside the token maps."""
    was_training = student.training
    with torch.no_grad():
        _, trace = student.eval()(images, trace=True)
        predict = getattr(module, "predict_masks", None)
        masks = predict(images).cpu().numpy() if predict is not None else None
    student.train(was_training)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    num_classes = module.num_classes if module is not None else 0
    for index, name in enumerate(names):
        fig = token_map_figure(to_rgb(images[index], mean, std), trace, index, layers, title, dpi,
                               None if masks is None else masks[index], num_classes)
        path = out_dir / f"{name}.png"
        fig.savefig(path)
        paths.append(path)
    return paths


class TokenMapCallback(Callback):
    """Token maps of fixed validation images after validation: PNGs in `<run>/token_maps/`, and W&B images
    keyed `token_maps/image_<i>` at the global step (so the dashboard slider shows them evolve).

    num_images: how many images, chosen by `seed` among the first validation batch (the same every time).
    layers: blocks to draw (default: the token maps that change, at most four).
    every_n_epochs: during fit (0: only at the last epoch); validate runs always draw.
    """

    def __init__(self, num_images: int = 4, layers: Optional[list[int]] = None, every_n_epochs: int = 1,
                 seed: int = 0, dpi: int = 100) -> None:
        self.num_images = num_images
        self.layers = layers
        self.every_n_epochs = every_n_epochs
        self.seed = seed
        self.dpi = dpi
        self.images: Optional[Tensor] = None
        self.paths: list[Path] = []

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.images is None and batch_idx == 0 and dataloader_idx == 0:
            images = batch[0]
            generator = torch.Generator().manual_seed(self.seed)
            pick = torch.randperm(images.shape[0], generator=generator)[: self.num_images]
            self.images = images[pick.to(images.device)].detach().clone()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.images is None or not trainer.is_global_zero:
            return
        if trainer.state.fn == "fit" and not due_after_validation(trainer, self.every_n_epochs):
            return
        assert isinstance(pl_module, ReductionModule), "token maps draw leanvit's method modules"
        datamodule = getattr(trainer, "datamodule", None)
        mean = getattr(datamodule, "mean", (0.5, 0.5, 0.5))
        std = getattr(datamodule, "std", (0.5, 0.5, 0.5))
        out_dir = Path(trainer.default_root_dir) / "token_maps"
        names = [f"epoch{trainer.current_epoch:03d}_image{i}" for i in range(self.images.shape[0])]
        title = f"{method_name(pl_module)} - epoch {trainer.current_epoch}"
        self.paths = save_figures(pl_module.student, self.images, out_dir, names, mean, std, self.layers, title,
                                  self.dpi, module=pl_module)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # W&B
                for i, path in enumerate(self.paths):
                    logger.log_image(key=f"token_maps/image_{i}", images=[str(path)], step=trainer.global_step)
