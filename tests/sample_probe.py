"""`python tests/sample_probe.py fit CONFIG ...`: the leanvit CLI, recording every training sample it loads.

Each loaded `(epoch, index, copy)` key is appended, with the DDP rank that loaded it, to a file in
`$LEANVIT_SAMPLE_LOG` (one file per process: loader workers included). Lightning's DDP launcher re-runs this
same command line for the other ranks, so they record too. Tests read the files to prove that ranks saw
disjoint samples.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.sampling import SeededSamples  # noqa: E402

_original = SeededSamples.__getitem__


def _recording_getitem(self: SeededSamples, key: Any) -> Any:
    if isinstance(key, tuple):
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        with open(Path(os.environ["LEANVIT_SAMPLE_LOG"]) / f"pid{os.getpid()}.txt", "a") as f:
            f.write(f"{rank} {' '.join(map(str, key))}\n")
    return _original(self, key)


SeededSamples.__getitem__ = _recording_getitem  # type: ignore[method-assign]

if __name__ == "__main__":
    from experiments.cli import main

    sys.exit(main())
