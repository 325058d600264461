"""The dense baseline: a plain timm ViT (DeiT), optionally distilled from a teacher (DeiT recipe)."""
from __future__ import annotations

from typing import Any

from lightning_modules.base import ReductionModule
from lightning_modules.vit import ViTStudent


class DenseModule(ReductionModule):
    """`METHODS["dense"]`: every token through every block; the student gives timm's logits exactly."""

    def __init__(self, **shared: Any) -> None:
        super().__init__(**shared)
        self.build_student(ViTStudent)
