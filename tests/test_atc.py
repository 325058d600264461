"""ATC against scikit-learn's agglomerative clustering (the official code's, per image on the CPU) for every
linkage, the official cluster counts by hand, a slow per-image reference of the whole model, the official checkpoint
format. The contract checks are in test_contract.py; the official code itself was run on the same DeiT-T/S weights
in a script (README, ATC section)."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import timm
import torch

from lightning_modules import METHODS
from lightning_modules.atc import agglomerative_labels, cluster_counts, cosine_distance

sklearn_cluster = pytest.importorskip("sklearn.cluster")


def first_seen(labels: list[int]) -> list[int]:
    """Labels renumbered by each cluster's first member: the partition, whatever the numbering."""
    seen: dict[int, int] = {}
    return [seen.setdefault(label, len(seen)) for label in labels]


def sklearn_labels(distance: torch.Tensor, clusters: int, linkage: str) -> list[list[int]]:
    model = sklearn_cluster.AgglomerativeClustering(n_clusters=clusters, metric="precomputed", linkage=linkage)
    return [first_seen(model.fit(d.numpy()).labels_.tolist()) for d in distance]


def test_cluster_counts_by_hand() -> None:
    assert cluster_counts(196, 0.7, 3) == [137, 96, 67]
    assert cluster_counts(196, 0.5, 3) == [98, 49, 24]
    assert cluster_counts(196, 0.9, 3) == [176, 158, 142]
    assert cluster_counts(196, 0.25, 3) == [49, 12, 3]


@pytest.mark.parametrize("linkage", ["complete", "average", "single"])
def test_batched_clustering_equals_scikit_learn(linkage: str) -> None:
    """Every image of a batch at once gives scikit-learn's partition, at several cluster counts, on keys with
    structure (groups of similar tokens, as patches of one object) and without."""
    torch.manual_seed(0)
    centres = torch.randn(6, 16)
    grouped = centres[torch.randint(0, 6, (3, 48))] + 0.3 * torch.randn(3, 48, 16)
    for metric in (grouped, torch.randn(3, 48, 16)):
        distance = cosine_distance(metric)
        for clusters in (40, 17, 5, 1):
            labels = agglomerative_labels(distance, clusters, linkage)
            assert labels.tolist() == sklearn_labels(distance, clusters, linkage)
            assert labels.max().item() == clusters - 1


def test_clustering_refuses_an_unknown_linkage() -> None:
    with pytest.raises(ValueError, match="linkage"):
        agglomerative_labels(torch.zeros(1, 3, 3), 2, "ward")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="model.linkage: expected one of complete, average, single"):
        METHODS["atc"](backbone="vit_micro_patch4_32", num_classes=10, reduction_layers=[1], linkage="ward")


def test_deit_small_token_counts() -> None:
    module = METHODS["atc"](backbone="deit_small_patch16_224", keep_rate=0.7).eval()
    with torch.no_grad():
        _, trace = module.student(torch.randn(1, 3, 224, 224), trace=True)
    assert trace.tokens[0].tolist() == [197] * 4 + [138] * 3 + [97] * 3 + [68] * 3


# ------------------------------------------------------------------------------------------------ slow reference
def slow_atc(vit: torch.nn.Module, image: torch.Tensor, keep_rate: float, layers: list[int], linkage: str,
             prop_attn: bool, prefix: int) -> tuple[torch.Tensor, list[list[int]]]:
    """ATC on one image as the official model computes it (scikit-learn on the CPU, explicit attention and merge
    loops, sizes dropped after every block without `prop_attn`): logits and the patches of every final token."""
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(image[None])))[0]  # (T, C)
    carried = [[] for _ in range(prefix)] + [[i] for i in range(x.shape[0] - prefix)]
    counts = cluster_counts(vit.patch_embed.num_patches, keep_rate, len(layers))
    size = None
    for layer, block in enumerate(vit.blocks):
        attn = block.attn
        heads, hd = attn.num_heads, attn.head_dim
        t = x.shape[0]
        q, k, v = (block.norm1(x) @ attn.qkv.weight.T + attn.qkv.bias).reshape(t, 3, heads, hd).permute(1, 2, 0, 3)
        logits = (q @ k.transpose(-1, -2)) * attn.scale
        if size is not None:
            logits = logits + size.log()[None, None, :]
        out = (logits.softmax(-1) @ v).transpose(0, 1).reshape(t, heads * hd)
        x = x + attn.proj(out)
        if layer in layers and counts[layers.index(layer)]:
            clusters = min(counts[layers.index(layer)], t - prefix)
            distance = cosine_distance(k.mean(0)[None, prefix:])[0]
            labels = sklearn_cluster.AgglomerativeClustering(n_clusters=clusters, metric="precomputed",
                                                             linkage=linkage).fit(distance.numpy()).labels_
            groups = [[p] for p in range(prefix)] + [[prefix + j for j in range(t - prefix) if labels[j] == c]
                                                      for c in range(clusters)]
            sizes = size if size is not None else torch.ones(t, dtype=x.dtype)
            x = torch.stack([sum(sizes[j] * x[j] for j in g) / sum(sizes[j] for j in g) for g in groups])
            size = torch.stack([sizes[g].sum() for g in groups])
            carried = [sum((carried[j] for j in g), []) for g in groups]
        x = x + block.mlp(block.norm2(x))
        if not prop_attn:
            size = None
    return vit.forward_head(vit.norm(x)[None])[0], carried


@pytest.mark.parametrize(("backbone", "linkage", "prop_attn"), [
    ("vit_micro_patch4_32", "complete", True), ("vit_micro_patch4_32", "average", False),
    ("deit_micro_distilled_patch4_32", "single", True),
])
def test_student_matches_the_slow_reference(backbone: str, linkage: str, prop_attn: bool) -> None:
    """Logits and the partition into tokens of every patch equal the per-image scikit-learn reference (float64)."""
    torch.manual_seed(2)
    module = METHODS["atc"](backbone=backbone, num_classes=10, backbone_kwargs={"depth": 4}, keep_rate=0.6,
                            reduction_layers=[1, 2, 3], linkage=linkage, prop_attn=prop_attn).double().eval()
    prefix = module.student.num_prefix_tokens
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        logits, trace = module.student(images, trace=True)
        for b in range(2):
            expected, carried = slow_atc(module.student.vit, images[b], 0.6, [1, 2, 3], linkage, prop_attn, prefix)
            torch.testing.assert_close(logits[b], expected, rtol=0, atol=1e-10)
            owner = trace.owner[-1][b]
            ours = sorted(sorted(torch.nonzero(owner == position)[:, 0].tolist())
                          for position in range(prefix, int(trace.tokens[b, -1])))
            assert ours == sorted(sorted(c) for c in carried[prefix:])
    assert trace.tokens[0].tolist() == [64 + prefix] * 2 + [38 + prefix, 23 + prefix, 13 + prefix]


# ------------------------------------------------------------------------------------------------ checkpoints
def test_official_checkpoint_loads_its_ema_and_checks_its_settings(tmp_path: Path) -> None:
    """train_deit.py's checkpoint: 'model', 'model_ema' (evaluated when 'ema_best'), 'args' with the settings it was
    trained with; a setting that differs from them is refused, naming it."""
    torch.manual_seed(0)
    raw, ema = (timm.create_model("vit_micro_patch4_32", num_classes=10).state_dict() for _ in range(2))
    args = argparse.Namespace(reduction_ratio=[0.6], reduction_loc=[1, 2, 3], linkage="average", proportional_attn=True)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": raw, "model_ema": ema, "ema_best": True, "args": args, "epoch": 29}, path)
    settings = dict(backbone="vit_micro_patch4_32", num_classes=10, reduction_layers=[1, 2, 3], linkage="average")
    module = METHODS["atc"](weights=str(path), keep_rate=0.6, **settings)
    assert all(torch.equal(module.student.vit.state_dict()[k], v) for k, v in ema.items())
    torch.save({"model": raw, "model_ema": ema, "ema_best": False, "args": args}, path)
    module = METHODS["atc"](weights=str(path), keep_rate=0.6, **settings)
    assert all(torch.equal(module.student.vit.state_dict()[k], v) for k, v in raw.items())
    with pytest.raises(ValueError, match=r"model.keep_rate: .* was trained with keep_rate 0.6 \(its args\), not 0.7"):
        METHODS["atc"](weights=str(path), keep_rate=0.7, **settings)
