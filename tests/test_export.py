"""`leanvit export`: every fixed-shape method leaves as ONNX (run in ONNX Runtime) and as a torch.export program
with the eager logits; the check refuses a graph that gives other logits and leaves no file; A-ViT is refused in
one line; bad inputs never overwrite anything. And the deployment timings: ONNX Runtime, batch-1 latency, end to
end from JPEG bytes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from experiments import export as ex
from lightning_modules import METHODS

from helpers import FAST, QUICKSTART, build, leanvit

STATIC = [name for name, cls in METHODS.items() if cls.static_shapes]
DIGITS = [QUICKSTART, *FAST]  # the embedded digits: validation images without a download


@pytest.mark.parametrize("method", STATIC)
def test_every_fixed_shape_method_exports_with_the_eager_logits(method: str, tmp_path: Path) -> None:
    """One traced program per method, written both ways: ONNX run in ONNX Runtime, the .pt2 loaded back."""
    module = build(method, "DeiT")
    torch.manual_seed(1)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = module.student(images)
    ex.write_onnx(ex.export_program(module.student, images, fused=False), tmp_path / "m.onnx",
                  {"leanvit.method": method}, ex.ONNX_OPSET)
    ex.write_pt2(ex.export_program(module.student, images), tmp_path / "m.pt2", {"leanvit.method": method})
    for path, fmt in ((tmp_path / "m.onnx", "onnx"), (tmp_path / "m.pt2", "torch-export")):
        torch.testing.assert_close(ex.run_exported(path, fmt, images), expected, rtol=1e-4, atol=1e-4)
        assert ex.read_metadata(path)["leanvit.method"] == method


def test_a_dynamic_batch_runs_at_other_sizes(tmp_path: Path) -> None:
    method = "tome"  # its matching sizes follow the batch
    module = build(method, "DeiT")
    images = torch.randn(4, 3, 32, 32)
    out = tmp_path / "m.onnx"
    ex.export_module(module, method, images, out, "onnx", dynamic_batch=True)
    other = torch.randn(7, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ex.run_exported(out, "onnx", other), module.student(other), rtol=1e-4, atol=1e-4)


def test_the_check_refuses_other_logits_and_keeps_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph whose logits differ (here: the runtime's answer shifted by 1e-3) is not kept."""
    module = build("tome", "DeiT")
    run = ex.run_exported
    monkeypatch.setattr(ex, "run_exported", lambda path, fmt, images: run(path, fmt, images) + 1e-3)
    out = tmp_path / "m.pt2"
    with pytest.raises(ex.ExportRefused, match="other logits"):
        ex.export_module(module, "tome", torch.randn(2, 3, 32, 32), out, "torch-export")
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_metadata_and_the_checked_logits(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    out = in_tmp / "tome.onnx"
    assert leanvit("export", *DIGITS, "method=tome", "model.r=4", "format=onnx", "batch_size=2", f"output={out}") == 0
    meta = ex.read_metadata(out)
    assert meta["leanvit.method"] == "tome" and meta["leanvit.batch_size"] == "2"
    assert meta["leanvit.version"] == ex.leanvit_version() != "unknown"
    settings = json.loads(meta["leanvit.settings"])
    assert settings["r"] == 4 and settings["backbone_kwargs"]["depth"] == 2
    assert json.loads(meta["leanvit.input"])["size"] == [3, 32, 32]
    assert "opset 20, checked in ONNX Runtime" in capsys.readouterr().out
    assert [p.name for p in in_tmp.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_cli_exports_the_weights_of_a_run(in_tmp: Path) -> None:
    """resume=FILE.ckpt: the exported graph carries the checkpoint's weights, not a fresh initialisation."""
    from experiments.build import build_objects, load_checked

    args = [*DIGITS, "method=evit", "model.keep_rate=0.5", "model.reduction_layers=[1]"]
    source, _ = build_objects(load_checked(args[0], args[1:]), resuming=False, command="export")
    with torch.no_grad():
        for p in source.student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = in_tmp / "trained.ckpt"
    torch.save({"pytorch-lightning_version": "2.5.0",
                "state_dict": {f"student.{k}": v for k, v in source.student.state_dict().items()}}, ckpt)
    out = in_tmp / "evit.pt2"
    assert leanvit("export", *args, f"resume={ckpt}", "format=torch-export", "batch_size=2", f"output={out}") == 0
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ex.run_exported(out, "torch-export", images), source.student.eval()(images),
                                   rtol=1e-5, atol=1e-5)


def test_cli_refuses_avit_in_one_line(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    assert leanvit("export", *DIGITS, "method=avit", "output=a.onnx") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data-dependent shapes" in err[0] and "torch.compile" in err[0]
    assert not (in_tmp / "a.onnx").exists()


@pytest.mark.parametrize("args, words", [
    (["format=tflite"], "format: expected one of onnx, torch-export"),
    (["batch_size=0"], "batch_size"),
    (["format=onnx", "output=model.pt2"], "ends in .onnx"),
    (["resume=runs/none"], "resume: no such checkpoint"),
])
def test_cli_bad_inputs(args: list[str], words: str, in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    assert leanvit("export", *DIGITS, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]
    assert not (in_tmp / "exports").exists()


def test_cli_never_overwrites_an_existing_file(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    out = in_tmp / "model.onnx"
    out.write_bytes(b"a user's file")
    assert leanvit("export", *DIGITS, f"output={out}") == 2
    assert "never overwritten" in capsys.readouterr().err
    assert out.read_bytes() == b"a user's file"


def test_cli_refuses_a_run_without_a_checkpoint(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    run = in_tmp / "runs" / "digits" / "dense" / "version_0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("method: dense\n")
    assert leanvit("export", *DIGITS, f"resume={run}") == 2
    assert "no such checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- deployment timing
def test_benchmark_in_onnx_runtime(in_tmp: Path) -> None:
    """`runtime=onnxruntime`: the student and its dense backbone exported and timed side by side; MACs as eager."""
    out = in_tmp / "rows.json"
    assert leanvit("benchmark", *DIGITS, "method=tome", "model.r=4", "runtime=onnxruntime", "batch_sizes=[2]",
                   "warmup=1", "repeats=2", f"output={out}") == 0
    (row,) = json.loads(out.read_text())
    assert row["method"] == "tome" and row["device"].startswith("ONNX Runtime")
    assert row["images_per_sec"] > 0 and row["speedup"] == pytest.approx(
        row["images_per_sec"] / row["dense_images_per_sec"])
    assert row["mac_ratio"] == pytest.approx(row["dense_gmacs"] / row["gmacs"]) and row["mac_ratio"] > 1


def test_benchmark_end_to_end_and_its_bad_combinations(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    out = in_tmp / "rows.json"
    assert leanvit("benchmark", *DIGITS, "method=evit", "model.reduction_layers=[1]", "end_to_end=true",
                   "batch_sizes=[3]", "warmup=1", "repeats=2", f"output={out}") == 0
    (row,) = json.loads(out.read_text())
    assert row["batch_size"] == 3 and row["images_per_sec"] > 0 and 0 <= row["preprocess_share"] < 1
    capsys.readouterr()
    assert leanvit("benchmark", *DIGITS, "runtime=onnxruntime", "compile=true") == 2
    assert "fp32 on the CPU" in capsys.readouterr().err
    assert leanvit("benchmark", *DIGITS, "runtime=tensorrt") == 2
    assert "runtime: expected one of torch, onnxruntime" in capsys.readouterr().err


def test_jpeg_preprocessing_is_the_eval_transform() -> None:
    """The end-to-end pipeline's tensor ops give what the DataModule's PIL eval transform gives (resize the shorter
    side to size / crop_pct, bicubic, centre crop, normalise), up to the two resamplers' rounding."""
    import io

    from PIL import Image
    from timm.data import create_transform

    from experiments.deployment import JpegPreprocess, synthetic_jpegs

    jpegs = synthetic_jpegs(2, width=120, height=90)
    got = JpegPreprocess(64)(jpegs)
    transform = create_transform(64, is_training=False, crop_pct=0.875, interpolation="bicubic")
    want = torch.stack([transform(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs])
    assert got.shape == want.shape == (2, 3, 64, 64)
    assert (got - want).abs().mean() < 1e-3  # 4e-5 measured; bilinear instead of bicubic is 0.03 off


def test_latency_rows_on_every_path() -> None:
    from experiments.deployment import LATENCY_KEYS, latency_rows

    rows = latency_rows(build("tome", "DeiT"), "tome", paths=("eager", "onnxruntime"), warmup=1, repeats=3)
    assert [r["path"] for r in rows] == ["eager", "onnxruntime"]  # (compiling costs 20 s here: the grid runs it)
    for r in rows:
        assert set(r) == set(LATENCY_KEYS) and 0 < r["median_ms"] <= r["p90_ms"]
        assert r["speedup"] == pytest.approx(r["dense_median_ms"] / r["median_ms"])
    (eager,) = latency_rows(build("avit", "DeiT"), "avit", paths=("eager",), warmup=1, repeats=3)
    assert eager["path"] == "eager"
