"""`leanvit export CONFIG [overrides] format=onnx|torch-export|hf batch_size=N output=PATH [dynamic_batch=true]`:
a method's student as an ONNX model or a `torch.export` program (`.pt2`, for AOTInductor and ExecuTorch),
checked before it is kept; or (`format=hf`) a dense ViT / DeiT as a `transformers` checkpoint folder
(`config.json`, `model.safetensors`), checked by loading it with `transformers`.

Flow: config -> the module with its weights (`model.weights=FILE`, or `resume=RUN_DIR|last|FILE.ckpt`: the run's
checkpoint) -> `torch.export` of `images -> logits` at `batch_size` (the batch dimension symbolic with
`dynamic_batch=true`) -> written beside OUTPUT under a temporary name -> run once on the first validation images
-> kept (renamed to OUTPUT) only when its logits equal the eager student's within `atol` + `rtol` x |logits|;
otherwise removed, exit 2. Nothing existing is overwritten. The file records the method, its settings, the input
size and normalisation, and the leanvit version (ONNX: metadata_props `leanvit.*`; .pt2: `extra/leanvit.json`).

A method whose token counts depend on the image (`static_shapes = False`: A-ViT) is refused in one line: ONNX and
torch.export graphs need shapes that its settings fix.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn

from experiments.config import ConfigError

FORMATS = {"onnx": ".onnx", "torch-export": ".pt2", "hf": ""}  # hf: a folder
ONNX_OPSET = 20  # the opset torch's exporter (dynamo=True) writes by default in the tested torch; opset=N changes it
METADATA_FILE = "leanvit.json"  # a .pt2's extra file holding the metadata

# Top-level keys `leanvit export` accepts besides an experiment's own.
EXPORT_KEYS: dict[str, Any] = {
    "format": str,
    "batch_size": int,
    "output": Optional[str],
    "dynamic_batch": bool,
    "opset": Optional[int],
    "atol": float,
    "rtol": float,
}
DEFAULT_ATOL = 1e-4  # fp32 logits: kernels of another runtime reorder sums (~1e-6 relative)
DEFAULT_RTOL = 1e-4


class ExportRefused(ConfigError):
    """An export that did not give the eager logits (exit 2, one line, no file left)."""


class LogitsOnly(nn.Module):
    """`images -> logits` of a student in eval mode: the one signature an exported graph has."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self, images: Tensor) -> Tensor:
        return self.student(images)


def refuse_adaptive(method_class: type, method: str) -> None:
    """One line for a method whose shapes are not fixed by its settings."""
    if not getattr(method_class, "static_shapes", True):
        raise ConfigError(f"method: {method} runs each image with its own token counts (data-dependent shapes), which "
                          f"an ONNX or torch.export graph cannot hold; deploy it eager or with torch.compile "
                          f"(`leanvit benchmark ... compile=true`), or export a fixed-shape method")


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextlib.contextmanager
def explicit_attention(model: nn.Module) -> Iterator[None]:
    """timm's attention switch off (softmax(q k^T) v written out) for the duration, restored after."""
    saved = {m: m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")}
    try:
        for m in saved:
            m.fused_attn = False
        yield
    finally:
        for m, fused in saved.items():
            m.fused_attn = fused


def export_program(student: nn.Module, images: Tensor, dynamic_batch: bool = False,
                   fused: bool = True) -> torch.export.ExportedProgram:
    """`torch.export` of the student's inference pass (eval mode) at the batch of `images`; with `dynamic_batch`
    the batch dimension is symbolic (any size >= 1). `fused=False` traces the explicit attention: ONNX has no fused
    attention below opset 23 (the exporter writes SDPA out as the same MatMul/Softmax), and its decomposition of SDPA
    with a mask (proportional attention) gives an output layout the traced reshape cannot view."""
    model = LogitsOnly(student).eval()
    dynamic = {"images": {0: torch.export.Dim("batch", min=1, max=65536)}} if dynamic_batch else None
    with torch.no_grad(), contextlib.ExitStack() as stack:
        if not fused:
            stack.enter_context(explicit_attention(model))
        return torch.export.export(model, (images,), dynamic_shapes=dynamic, strict=False)


def write_onnx(program: torch.export.ExportedProgram, path: Path, metadata: dict[str, str], opset: int) -> None:
    """The program as one ONNX file (weights inside it), with `metadata` as its metadata_props."""
    import onnx

    onnx_program = torch.onnx.export(program, f=None, dynamo=True, opset_version=opset, input_names=["images"],
                                     output_names=["logits"], verbose=False)
    onnx_program.save(str(path), external_data=False)
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, metadata)
    onnx.save(model, str(path))


def write_pt2(program: torch.export.ExportedProgram, path: Path, metadata: dict[str, str]) -> None:
    torch.export.save(program, str(path), extra_files={METADATA_FILE: json.dumps(metadata)})


def onnx_session(path: Path, threads: Optional[int] = None) -> Any:
    """An ONNX Runtime CPU session with `threads` intra-op threads (default: torch's)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_exported(path: Path, format: str, images: Tensor) -> Tensor:
    """The logits the exported file gives for `images` (ONNX Runtime on the CPU, or the loaded ExportedProgram)."""
    if format == "onnx":
        (logits,) = onnx_session(path).run(["logits"], {"images": images.cpu().numpy()})
        return torch.from_numpy(logits)
    with torch.no_grad():
        return torch.export.load(str(path)).module()(images)


def read_metadata(path: Path) -> dict[str, str]:
    """What `leanvit export` recorded in a file it wrote."""
    if path.suffix == ".onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        return {p.key: p.value for p in model.metadata_props}
    extra = {METADATA_FILE: ""}
    torch.export.load(str(path), extra_files=extra)
    return json.loads(extra[METADATA_FILE])


def leanvit_version() -> str:
    try:
        return importlib.metadata.version("leanvit")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def check_export_options(cfg: dict[str, Any]) -> tuple[str, int, Path]:
    """format, batch size and output path -> one line naming a bad one."""
    from experiments.rundirs import experiment_name

    format = str(cfg.get("format") or "onnx")
    if format not in FORMATS:
        raise ConfigError(f"format: expected one of {', '.join(FORMATS)}, got {format!r}")
    batch_size = cfg.get("batch_size", 1)
    if batch_size is None or batch_size < 1:
        raise ConfigError(f"batch_size: expected a size >= 1, got {batch_size!r}")
    for key in ("atol", "rtol"):
        if cfg.get(key) is not None and not cfg[key] >= 0:
            raise ConfigError(f"{key}: expected a tolerance >= 0, got {cfg[key]!r}")
    name = experiment_name(cfg).replace("/", "_")
    default = f"{name}_hf" if format == "hf" else f"{name}_b{batch_size}{FORMATS[format]}"
    output = Path(cfg.get("output") or Path("exports") / default)
    if output.exists():
        raise ConfigError(f"output: {output} exists and is never overwritten; remove it or pass output=OTHER_PATH")
    if format == "hf":
        if cfg.get("method") != "dense":
            raise ConfigError(f"format: hf writes a dense transformers model, and transformers has no "
                              f"{cfg.get('method')}: export with method=dense (a checkpoint of a method that adds no "
                              f"parameters - tome, evit, pitome, mctf, atc - loads into it)")
        try:
            import transformers  # noqa: F401
        except ImportError as err:
            raise ConfigError(f"format: hf needs the hub extra ({first_line(err)}): pip install -e '.[hub]'") from err
    elif output.suffix != FORMATS[format]:
        raise ConfigError(f"output: a {format} file ends in {FORMATS[format]}, got {str(output)!r}")
    if format == "onnx":
        require_onnx("format: onnx")
    return format, int(batch_size), output


def require_onnx(what: str) -> None:
    """onnx, onnxscript (torch's exporter) and onnxruntime are the optional `deploy` extra: one line without them."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"{what} needs the deploy extra ({first_line(err)}): pip install -e '.[deploy]'") from err


def weights_from_run(cfg: dict[str, Any]) -> None:
    """`resume=RUN_DIR|last|FILE.ckpt` -> `model.weights` = that checkpoint (its architecture checked against the
    config, as `validate` does)."""
    import yaml

    from experiments.rundirs import check_same_model, experiment_name, find_resume

    if not cfg.get("resume"):
        return
    if str(cfg["resume"]) == "auto":
        raise ConfigError("resume=auto: only for fit; export reads resume=RUN_DIR|last|FILE.ckpt")
    ckpt = find_resume(str(cfg["resume"]), Path(cfg.get("runs_dir") or "runs") / experiment_name(cfg))
    saved = ckpt.parent.parent / "config.yaml"
    if saved.is_file():
        check_same_model(yaml.safe_load(saved.read_text()) or {}, cfg, ckpt.parent.parent)
    cfg["model"] = dict(cfg.get("model") or {}, weights=str(ckpt), pretrained=False)
    print(f"leanvit export: weights of {ckpt}", file=sys.stderr, flush=True)


def validation_images(datamodule: Any, count: int) -> Tensor:
    """The first `count` images of the validation split (repeated when it has fewer)."""
    batches, total = [], 0
    for batch in datamodule.val_dataloader():
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        batches.append(images)
        total += images.shape[0]
        if total >= count:
            break
    if not batches:
        raise ConfigError("data: the validation split is empty; the export is checked on validation images")
    images = torch.cat(batches)
    return images.repeat((count + images.shape[0] - 1) // images.shape[0], 1, 1, 1)[:count]


@contextlib.contextmanager
def staged(output: Path) -> Iterator[Path]:
    """A temporary path (a file, or a folder the block makes) beside `output`, renamed to it when the block succeeds,
    removed when it fails."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if output.exists():
            raise ConfigError(f"output: {output} appeared while exporting; it is kept and this export dropped")
        os.replace(tmp, output)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        tmp.unlink(missing_ok=True)


def export_module(module: Any, method: str, images: Tensor, output: Path, format: str, *,
                  dynamic_batch: bool = False, opset: int = ONNX_OPSET, atol: float = DEFAULT_ATOL,
                  rtol: float = DEFAULT_RTOL, metadata: Optional[dict[str, Any]] = None) -> float:
    """Export a module's student at the batch of `images`, check it on them (and on one image with a dynamic
    batch), keep it at `output`; return the largest logit difference. Refuses (ExportRefused) when the logits
    differ by more than atol + rtol * |eager logits|."""
    refuse_adaptive(type(module), method)
    # what inference runs: the student (logits), or with a segmentation module's decode head (per-pixel scores)
    student = module.inference_model(module.student).eval()
    with torch.no_grad():
        expected = student(images)
    try:
        program = export_program(student, images, dynamic_batch, fused=format != "onnx")
    except Exception as err:  # a trace failure (an op torch.export cannot hold) -> one line, never a graph
        if os.environ.get("LEANVIT_TRACEBACK"):
            raise
        raise ExportRefused(f"export: torch.export cannot trace {method}: {first_line(err)}") from err
    info = {"leanvit.method": method, "leanvit.version": leanvit_version(), "leanvit.batch_size":
            "dynamic" if dynamic_batch else str(images.shape[0]), **{f"leanvit.{k}": json.dumps(v) if not
                                                                      isinstance(v, str) else v
                                                                      for k, v in (metadata or {}).items()}}
    checks = [images] + ([images[:1]] if dynamic_batch and images.shape[0] > 1 else [])
    with staged(output) as tmp:
        try:
            write_onnx(program, tmp, info, opset) if format == "onnx" else write_pt2(program, tmp, info)
        except Exception as err:
            if os.environ.get("LEANVIT_TRACEBACK"):
                raise
            raise ExportRefused(f"export: {format} cannot hold {method}'s graph: {first_line(err)}") from err
        worst = 0.0
        for batch in checks:
            with torch.no_grad():
                want = expected[: batch.shape[0]]
                got = run_exported(tmp, format, batch)
            diff = float((got - want).abs().max())
            worst = max(worst, diff)
            if got.shape != want.shape or not torch.allclose(got, want, atol=atol, rtol=rtol):
                raise ExportRefused(f"export: the exported {method} gives other logits than the eager student on "
                                    f"{batch.shape[0]} validation images (max |difference| {diff:.3g} > atol {atol:g} + "
                                    f"rtol {rtol:g} x |logits|); nothing written")
    return worst


def export_hf(module: Any, images: Tensor, output: Path, *, atol: float = DEFAULT_ATOL,
              rtol: float = DEFAULT_RTOL) -> float:
    """A dense ViT / DeiT student -> a `transformers` checkpoint folder at `output` (config.json and
    model.safetensors in transformers' saved layout), kept only when `transformers` loads it and gives the student's
    logits on `images`; return the largest difference."""
    import transformers
    from safetensors.torch import save_file

    from lightning_modules.hub import hub_vit_layout

    try:
        entries, state = hub_vit_layout(module.student.vit)
    except ValueError as err:
        raise ExportRefused(str(err)) from err
    student = module.student.eval()
    with torch.no_grad():
        expected = student(images)
    config_class = transformers.DeiTConfig if entries["model_type"] == "deit" else transformers.ViTConfig
    with staged(output) as tmp:
        tmp.mkdir()
        fields = {k: v for k, v in entries.items() if k != "model_type"}
        config_class(**fields).save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model_class = getattr(transformers, entries["architectures"][0])
        model = model_class.from_pretrained(tmp).eval()
        with torch.no_grad():
            out = model(pixel_values=images)
        got = out.logits if hasattr(out, "logits") else out.pooler_output
        diff = float((got - expected).abs().max())
        if got.shape != expected.shape or not torch.allclose(got, expected, atol=atol, rtol=rtol):
            raise ExportRefused(f"export: transformers' {entries['architectures'][0]} gives other logits than the "
                                f"eager student (max |difference| {diff:.3g}); nothing written")
    return diff


def export_command(config: str, overrides: list[str]) -> int:
    """The `leanvit export` command."""
    from experiments.build import build_objects, load_checked
    from experiments.commands import warn_if_untrained
    from experiments.recipes import effective
    from lightning_modules import METHODS

    cfg = load_checked(config, overrides, EXPORT_KEYS)
    refuse_adaptive(METHODS[cfg["method"]], cfg["method"])
    format, batch_size, output = check_export_options(cfg)
    weights_from_run(cfg)
    warn_if_untrained(cfg, "export")
    torch.manual_seed(cfg.get("seed", 0))
    module, datamodule = build_objects(cfg, resuming=False, command="validate")
    images = validation_images(datamodule, batch_size)
    size = module.student.vit.patch_embed.img_size
    if size is not None and tuple(images.shape[-2:]) != tuple(size):  # segmentation's resized images: the model's
        from torchvision.transforms.v2.functional import center_crop  # window, from their centres

        images = center_crop(images, list(size))
    settings = {k: v for k, v in (effective(cfg).get("model") or {}).items()
                if k in ("backbone", "backbone_kwargs", "img_size", "num_classes", *type(module).setting_keys,
                         "reduction_layers")}
    metadata = {"settings": settings, "input": {"size": list(images.shape[1:]), "mean": list(datamodule.mean),
                                                "std": list(datamodule.std)}}
    opset = int(cfg.get("opset") or ONNX_OPSET)
    atol = DEFAULT_ATOL if cfg.get("atol") is None else float(cfg["atol"])
    rtol = DEFAULT_RTOL if cfg.get("rtol") is None else float(cfg["rtol"])
    if format == "hf":
        diff = export_hf(module, images, output, atol=atol, rtol=rtol)
        print(f"leanvit export: wrote {output} (a transformers checkpoint; loaded with transformers, its logits "
              f"within {diff:.2g} of the eager student on {batch_size} validation images)")
        return 0
    print(f"leanvit export: {cfg['method']} -> {format} at batch {'N' if cfg.get('dynamic_batch') else batch_size} "
          f"...", file=sys.stderr, flush=True)
    diff = export_module(module, cfg["method"], images, output, format, dynamic_batch=bool(cfg.get("dynamic_batch")),
                         opset=opset, atol=atol, rtol=rtol, metadata=metadata)
    where = f"opset {opset}, checked in ONNX Runtime" if format == "onnx" else "checked as the loaded ExportedProgram"
    print(f"leanvit export: wrote {output} ({where}: logits within {diff:.2g} of the eager student on "
          f"{batch_size} validation images)")
    return 0
