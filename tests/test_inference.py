"""Export (ONNX + torch + preprocessing JSON) and feature extraction from the exported folder."""

from __future__ import annotations

import codecs
import errno
import fcntl
import io
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image

from shitu import __version__, image_files, registry
from shitu.checkpoint import read_weights, save_weights
from shitu.config import load_config
from shitu.data.datasets.base import check_image
from shitu.data.transforms import build_transforms
from shitu.data.transforms.ops import DecodeImage, UnreadableImageError
from shitu.errors import CheckpointError, ConfigError, DataError
from shitu.fileio import staging_folder
from shitu.inference import (
    FeatureExtractor,
    Preprocessing,
    default_model_dir,
    export_model,
    read_manifest,
)
from shitu.inference import default_model as default_model_module
from shitu.inference import export as export_module
from shitu.inference.backends import choose_backend, openvino_available
from shitu.inference.export import fingerprint, load_exported_model
from shitu.inference.preprocess import decode_rgb, read_rgb
from shitu.models import build_model
from shitu.models.backbones.pp_lcnet_v2 import PPLCNetV2
from shitu.registry import Variant
from tests.image_helpers import declared_png

SIZE = 96
TINY_CONFIG = """
Global: {{image_shape: [3, {size}, {size}]}}
Arch:
  name: RecModel
  Backbone: {{name: PPLCNetV2_small_ShiTu}}
  BackboneStopLayer: {{name: flatten}}
  Neck: {{name: BNNeck, num_features: 512}}
  Head: {{name: FC, embedding_size: 512, class_num: 10}}
DataLoader:
  Eval:
    Query:
      dataset:
        name: GroceryStoreDataset
        image_root: {root}
        cls_label_path: {root}/val.txt
        transform_ops:
          - DecodeImage: {{to_rgb: true, channel_first: false}}
          - ResizeImage: {{size: [{size}, {size}], interpolation: bilinear}}
          - NormalizeImage: {{scale: 1.0/255.0, mean: [0.5, 0.4, 0.3], std: [0.2, 0.25, 0.3]}}
"""


def grocery_files(root: Path, count: int) -> list[Path]:
    lines = [line for line in (root / "val.txt").read_text().splitlines() if line.strip()]
    return [root / line.split(",")[0].strip() for line in lines[:: len(lines) // count][:count]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, grocery) -> dict:
    """A tiny PP-LCNetV2 with trained-looking BN statistics, exported from a weight file;
    the config file is deleted afterwards (inference must not need it)."""
    work = tmp_path_factory.mktemp("export")
    config_file = work / "tiny.yaml"
    config_file.write_text(TINY_CONFIG.format(size=SIZE, root=grocery))
    config = load_config(config_file)
    torch.manual_seed(0)
    model = build_model(config.Arch).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.6, 1.4)
    weights = save_weights(model.state_dict(), work / "trained.safetensors")
    files = grocery_files(grocery, 6)
    out = export_model(config, weights, work / "model", calibration_images=files[:4])
    reference = model.eval()
    config_file.unlink()
    return {"dir": out, "files": files, "model": reference, "config": config}


def test_export_folder_holds_everything_inference_needs(exported):
    out = exported["dir"]
    names = {p.name for p in out.iterdir()}
    assert names == {"model.onnx", "model.int8.onnx", "model.safetensors", "shitu_model.json"}
    manifest = json.loads((out / "shitu_model.json").read_text())
    assert manifest["embedding_size"] == 512
    assert manifest["arch_name"] == "PPLCNetV2_small_ShiTu"
    assert manifest["arch"]["Head"] is None
    assert manifest["preprocessing"]["resize"] == [SIZE, SIZE]
    assert manifest["preprocessing"]["mean"] == pytest.approx([0.5, 0.4, 0.3])
    assert manifest["preprocessing"]["channel_order"] == "RGB"
    assert len(manifest["fingerprint"]) == 64
    assert not list(out.parent.glob(".model.*"))  # no staging folders left behind


def test_onnx_and_torch_backends_agree_and_match_the_trained_model(exported):
    files = exported["files"]
    onnx = FeatureExtractor.load(exported["dir"], backend="onnxruntime", num_threads=1)
    torch_backend = FeatureExtractor.load(exported["dir"], backend="torch", num_threads=1)
    a = onnx.extract_files(files, batch_size=4)
    b = torch_backend.extract_files(files, batch_size=4)
    assert a.paths == b.paths == [str(f) for f in files] and not a.failures
    assert a.features.shape == (len(files), 512) and a.features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a.features, axis=1), 1.0, atol=1e-5)
    assert np.abs(a.features - b.features).max() < 1e-4
    assert onnx.fingerprint == torch_backend.fingerprint
    assert onnx.preprocessing == torch_backend.preprocessing
    # The unfolded training model on the training (Pillow) transform: the fast OpenCV path
    # reproduces it closely (measured in benchmarks/extraction_accuracy.py).
    ops = exported["config"].DataLoader.Eval.Query.dataset.params["transform_ops"]
    transform = build_transforms(ops)
    with torch.no_grad():
        batch = torch.stack([transform(f.read_bytes()) for f in files])
        expected = torch.nn.functional.normalize(exported["model"](batch)["features"]).numpy()
    assert np.abs(a.features - expected).max() < 1e-3


def test_export_of_large_raw_features_checks_onnx_against_their_scale(exported, tmp_path):
    """Raw features in the thousands (a ResNet50's are near 200) differ between ONNX and
    torch by float32 rounding of more than 1e-4; a correct export is not refused for it."""
    model = build_model(exported["config"].Arch).eval()
    model.load_state_dict(exported["model"].state_dict())
    with torch.no_grad():
        model.neck.feat_bn.weight.mul_(1e4)
        model.neck.feat_bn.bias.mul_(1e4)
    weights = save_weights(model.state_dict(), tmp_path / "large.safetensors")
    out = export_model(exported["config"], weights, tmp_path / "model")
    onnx = FeatureExtractor.load(out, backend="onnxruntime", num_threads=1)
    torch_backend = FeatureExtractor.load(out, backend="torch", num_threads=1)
    files = exported["files"][:2]
    a, b = onnx.extract_files(files).features, torch_backend.extract_files(files).features
    assert np.abs(a - b).max() < 1e-5


@pytest.mark.parametrize(
    ("value", "compact", "why"),
    [
        (float("nan"), False, r"\(weights of a training run that diverged\?\)"),
        (1e6, True, "once rounded to float16: export it without --compact"),
    ],
)
def test_export_refuses_weights_whose_features_would_be_nan(
    exported, tmp_path, value, compact, why
):
    model = build_model(exported["config"].Arch).eval()
    model.load_state_dict(exported["model"].state_dict())
    with torch.no_grad():
        model.neck.feat_bn.running_var[0] = value
    weights = save_weights(model.state_dict(), tmp_path / "diverged.safetensors")
    with pytest.raises(
        export_module.ExportError,
        match=rf"^{weights}: neck.feat_bn.running_var holds NaN or infinite values {why}$",
    ):
        export_model(exported["config"], weights, tmp_path / "model", compact=compact)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diverged.safetensors"]


@pytest.mark.parametrize("compact", [False, True])
def test_export_refuses_finite_weights_whose_features_are_nan(exported, tmp_path, compact):
    """A batch norm's running_var below 0 is finite, so the weights passed their check, but
    every feature is NaN: the export was written, and its ONNX check (NaN apart by NaN)
    passed too."""
    model = build_model(exported["config"].Arch).eval()
    model.load_state_dict(exported["model"].state_dict())
    with torch.no_grad():
        model.neck.feat_bn.running_var[0] = -5.0
    weights = save_weights(model.state_dict(), tmp_path / "negative.safetensors")
    with pytest.raises(
        export_module.ExportError,
        match=rf"^{weights}: the model's features hold NaN or infinite values, though its "
        r"weights are finite \(a batch norm's running_var below 0\?\)$",
    ):
        export_model(exported["config"], weights, tmp_path / "model", compact=compact)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["negative.safetensors"]


def test_extract_images_equals_extract_files(exported):
    extractor = FeatureExtractor.load(exported["dir"], num_threads=1)
    files = exported["files"][:3]
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    from_arrays = extractor.extract_images(arrays)
    from_files = extractor.extract_files(files).features
    assert np.abs(from_arrays - from_files).max() < 1e-5
    assert extractor.extract_images([]).shape == (0, 512)
    # any iterable of images: a generator of crops, say
    np.testing.assert_array_equal(extractor.extract_images(a for a in arrays), from_arrays)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_a_closed_extractor_releases_its_runtime_and_refuses_calls(exported, backend):
    files = exported["files"][:2]
    with FeatureExtractor.load(exported["dir"], backend, num_threads=1) as extractor:
        assert extractor.extract_files(files).features.shape == (2, 512)
    assert extractor._resource is None and "closed" in repr(extractor)
    image = np.zeros((40, 40, 3), np.uint8)
    for call in (lambda: extractor.extract_files(files), lambda: extractor.extract_images([image])):
        with pytest.raises(
            ValueError, match=r"^the FeatureExtractor is closed \(close\(\) released its runtime\)$"
        ):
            call()
    extractor.close()  # again: nothing left to release


def test_int8_model_is_close_and_has_its_own_fingerprint(exported, tmp_path):
    fp32 = FeatureExtractor.load(exported["dir"], num_threads=1)
    int8 = FeatureExtractor.load(exported["dir"], num_threads=1, precision="int8")
    files = exported["files"]
    a, b = fp32.extract_files(files).features, int8.extract_files(files).features
    assert np.sum(a * b, axis=1).min() > 0.95  # cosine similarity per image
    assert int8.fingerprint != fp32.fingerprint
    # Calibrated on other images: other int8 features, so another fingerprint.
    weights = save_weights(exported["model"].state_dict(), tmp_path / "trained.safetensors")
    recalibrated = export_model(
        exported["config"], weights, tmp_path / "recalibrated", calibration_images=files[4:]
    )
    other = FeatureExtractor.load(recalibrated, num_threads=1, precision="int8")
    assert other.fingerprint != int8.fingerprint
    assert FeatureExtractor.load(recalibrated, num_threads=1).fingerprint == fp32.fingerprint
    with pytest.raises(ConfigError, match="onnxruntime or openvino, not torch"):
        FeatureExtractor.load(exported["dir"], backend="torch", precision="int8")


def test_the_extractor_names_what_it_cannot_take(exported):
    extractor = FeatureExtractor.load(exported["dir"], num_threads=1)
    image = np.zeros((40, 30, 3), np.uint8)
    with pytest.raises(UnreadableImageError, match=r"one image array \(40, 30, 3\): pass"):
        extractor.extract_images(image)
    with pytest.raises(UnreadableImageError, match="got one Image: pass"):
        extractor.extract_images(Image.fromarray(image))
    # Not each row, character or byte taken for an image ("image 0 (from 0) of 40: ...")
    with pytest.raises(UnreadableImageError, match=r"one image array \(40, 30\): pass"):
        extractor.extract_images(image[:, :, 0])
    with pytest.raises(UnreadableImageError, match="got the path 'a.jpg': .*read_rgb"):
        extractor.extract_images("a.jpg")
    with pytest.raises(UnreadableImageError, match="got bytes: .*decode_rgb"):
        extractor.extract_images(cv2.imencode(".png", image)[1].tobytes())
    assert extractor.extract_images(np.stack([image, image])).shape[0] == 2  # a stack is N
    # Pixels of another type: how to convert them, and the conversion is taken.
    wide = image.astype(np.uint16) * 257
    for pixels, problem in (
        (wide, r"got uint16 \(40, 30, 3\) \(16-bit: .* of 0..65535: \(image >> 8\)"),
        (image.astype(np.float32), r"of 0..255: image.round\(\).astype\(np.uint8\)\)$"),
        (image.astype(np.int64), r"\(int64: pixels are uint8 0..255; of 0..255: image.astype"),
    ):
        with pytest.raises(UnreadableImageError, match=problem):
            extractor.extract_images([pixels])
    assert extractor.extract_images([(wide >> 8).astype(np.uint8)]).shape[0] == 1
    for size in (0, -3):
        with pytest.raises(
            ConfigError, match=f"batch_size: expected a whole number >= 1, got {size}"
        ):
            extractor.extract_images([image], batch_size=size)
    with pytest.raises(ConfigError, match="batch_size"):
        extractor.extract_files(exported["files"], batch_size=0)
    with pytest.raises(DataError, match="expected a list of image paths, got the single path"):
        extractor.extract_files(str(exported["files"][0]))
    with pytest.raises(ConfigError, match="workers: expected a whole number >= 1"):
        FeatureExtractor.load(exported["dir"], workers=-1)
    for backend, threads in (("onnxruntime", 2.5), ("openvino", -1), ("torch", 0)):
        with pytest.raises(ConfigError, match="num_threads: expected a whole number >= 1"):
            FeatureExtractor.load(exported["dir"], backend, threads)
    # Refused before any thread starts: 100000 started 15,000 threads, 16 GB, and went on.
    for name, options in (
        ("num_threads", {"num_threads": 100_000}),
        ("workers", {"workers": 1025}),
    ):
        with pytest.raises(ConfigError, match=f"^{name}: .* more than any CPU runs at once"):
            FeatureExtractor.load(exported["dir"], **options)


def test_an_export_of_a_user_registered_backbone_loads_only_once_it_is_registered_again(
    tmp_path, monkeypatch
):
    # A backbone the user registers exists only in the processes that import the module
    # registering it: the export holds its weights, not its code. Loading elsewhere (here:
    # once unregistered) must say so, not blame a manifest edited by hand.
    registry.populate()
    user_net = Variant(PPLCNetV2, defaults={"scale": 0.25, "depths": (1, 1, 1, 1)})
    monkeypatch.setitem(registry.BACKBONES._entries, "TinyUserNet", user_net)
    config_file = tmp_path / "user.yaml"
    config_file.write_text(
        "Arch: {name: RecModel, Backbone: {name: TinyUserNet, class_expand: 32},"
        " BackboneStopLayer: {name: flatten}}\n"
    )
    out = export_model(load_config(config_file), None, tmp_path / "model")
    monkeypatch.delitem(registry.BACKBONES._entries, "TinyUserNet")
    with pytest.raises(CheckpointError) as refused:
        FeatureExtractor.load(out, backend="torch")
    message = str(refused.value)
    assert (
        "backbone 'TinyUserNet' is not registered in this process: if it is your own, import"
        in message
    )
    assert "edited by hand" not in message
    monkeypatch.setitem(registry.BACKBONES._entries, "TinyUserNet", user_net)
    assert FeatureExtractor.load(out, backend="torch").backend.name == "torch"


def test_a_device_that_cannot_run_the_model_is_refused_when_loading(exported):
    with pytest.raises(ConfigError, match="device: unknown 'cuda:0'; use one of auto, cpu, gpu,"):
        FeatureExtractor.load(exported["dir"], device="cuda:0")
    # auto, as Global.device takes it: a GPU where torch sees one (it was refused as unknown)
    with FeatureExtractor.load(exported["dir"], backend="torch", device="auto") as chosen:
        assert chosen.backend.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    for device in ("cuda", "gpu"):  # gpu: PaddleClas's name, which Global.device takes
        if not torch.cuda.is_available():
            with pytest.raises(ConfigError, match="device cuda: torch here sees no CUDA GPU"):
                FeatureExtractor.load(exported["dir"], backend="torch", device=device)
        else:
            with FeatureExtractor.load(exported["dir"], backend="torch", device=device) as gpu:
                assert gpu.backend.device.type == "cuda"
    # auto on a GPU: onnxruntime where its package has CUDA, else torch (the default
    # onnxruntime package has none, and would refuse the device)
    onnx_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    expected = "onnxruntime" if onnx_cuda else "torch"
    assert choose_backend(exported["dir"], "auto", "fp32", "cuda") == expected
    assert choose_backend(exported["dir"], "auto", "fp32", "cpu") == "onnxruntime"


def test_int8_calibration_refuses_an_item_that_is_no_path_naming_it(exported, tmp_path):
    """Given through the API, None or a decoded image among the calibration images raised
    os's TypeError ('expected str, bytes or os.PathLike object, not NoneType')."""
    from shitu.inference.quantize import calibration_batches

    manifest = json.loads((exported["dir"] / "shitu_model.json").read_text())
    preprocessing = Preprocessing.from_dict(manifest["preprocessing"])
    with pytest.raises(DataError, match=r"item 1 \(from 0\) is not one: None \(NoneType\)$"):
        calibration_batches(preprocessing, [exported["files"][0], None])
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(DataError, match=r"item 0 \(from 0\) is not one: array\(.* \(ndarray\)$"):
        export_model(exported["config"], None, tmp_path / "model", calibration_images=[image])
    assert not (tmp_path / "model").exists()


def test_int8_calibration_logs_what_it_skips_but_not_expected_fallback_notices(
    exported, tmp_path, caplog
):
    from shitu.inference.quantize import quantize_static_onnx

    manifest = json.loads((exported["dir"] / "shitu_model.json").read_text())
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING):
        quantize_static_onnx(
            exported["dir"] / "model.onnx",
            tmp_path / "again.int8.onnx",
            Preprocessing.from_dict(manifest["preprocessing"]),
            [*exported["files"][:2], broken],
        )
    assert (tmp_path / "again.int8.onnx").is_file()
    assert "out-of-range for weight" not in caplog.text  # the BNNeck's rank-1 batch norm
    # An unreadable image is said, with how many were used.
    assert f"1 of 3 images left out: 1 could not be read (first: {broken}:" in caplog.text
    assert "calibrated on the other 2" in caplog.text
    logging.getLogger().warning("still heard")  # the filter went with the call
    assert "still heard" in caplog.text
    # None readable: the error says why, as the warning does.
    missing = tmp_path / "missing.jpg"
    read = rf"used \(2 given\): 2 could not be read \(first: {broken}: cannot decode image"
    with pytest.raises(DataError, match=read):
        quantize_static_onnx(
            exported["dir"] / "model.onnx",
            tmp_path / "none.int8.onnx",
            Preprocessing.from_dict(manifest["preprocessing"]),
            [broken, missing],
        )


def test_int8_calibration_replaces_unreadable_picks_keeping_the_spread(tmp_path, caplog):
    """--int8-images 3 of 7 images picks 0, 2, 4 (evenly spaced: a folder is sorted by
    class). Unreadable picks were dropped, not replaced: it calibrated on fewer images than
    asked while others were readable. Now the next readable image of a pick's share stands
    in for it, else any other, and fewer than asked is said."""
    from shitu.inference.quantize import calibration_batches

    preprocessing = Preprocessing(resize=(8, 8), resize_short=None, crop=None)
    files = [tmp_path / f"{index}.png" for index in range(7)]
    for index, path in enumerate(files):
        Image.fromarray(np.full((8, 8, 3), 30 * index, np.uint8)).save(path)
    (batch,) = calibration_batches(preprocessing, files, 3)
    np.testing.assert_array_equal(batch, calibration_batches(preprocessing, files[0:5:2])[0])
    for index in (2, 4, 5):  # share 1 (2, 3) keeps 3; share 2 (4, 5, 6) has 6
        files[index].write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING):
        (batch,) = calibration_batches(preprocessing, files, 3)
    np.testing.assert_array_equal(batch, calibration_batches(preprocessing, files[0:7:3])[0])
    assert "3 of 7 images left out" in caplog.text
    assert "replaced by others: calibrated on 3" in caplog.text
    files[3].write_bytes(b"not an image")  # share 1 has none left: another stands in
    (batch,) = calibration_batches(preprocessing, files, 3)
    np.testing.assert_array_equal(
        batch, calibration_batches(preprocessing, [files[0], files[6], files[1]])[0]
    )
    caplog.clear()
    for index in (0, 1):  # fewer readable than asked for: said
        files[index].write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING):
        (batch,) = calibration_batches(preprocessing, files, 3)
    assert len(batch) == 1
    assert "calibrated on 1, fewer than the 3 asked for" in caplog.text


def test_int8_calibration_says_which_images_were_read_but_of_a_size_it_cannot_take(
    exported, tmp_path, caplog
):
    """An image smaller than the crop was read whole, but said to be unreadable."""
    from shitu.inference.quantize import calibration_batches

    preprocessing = Preprocessing(resize=None, resize_short=16, crop=(32, 16))
    Image.new("RGB", (20, 200)).save(tall := tmp_path / "tall.png")  # 16x160: narrower
    Image.new("RGB", (200, 20)).save(wide := tmp_path / "wide.png")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    unfit = f"of a size the export's preprocessing cannot take (first: {tall}: crop 32x16 is"
    with pytest.raises(DataError) as refused:
        calibration_batches(preprocessing, [tall, broken])
    assert str(refused.value).startswith(
        f"int8 calibration: no calibration image could be used (2 given): 1 could not be "
        f"read (first: {broken}: cannot decode image"
    )
    assert f"; 1 is {unfit} larger than the image (20x200, resized to 16x160))" in str(
        refused.value
    )
    with caplog.at_level(logging.WARNING):
        assert len(calibration_batches(preprocessing, [tall, wide, tall])) == 1
    assert f"2 of 3 images left out: 2 are {unfit}" in caplog.text
    assert "calibrated on the other 1" in caplog.text


def test_openvino_backend_matches_onnxruntime_and_runs_int8(exported):
    """OpenVINO fp32 is float32 arithmetic (same features and fingerprint as onnxruntime)
    and runs the same int8 model; one infer request shared by threads gives each caller its
    own batch's features."""
    files = exported["files"]
    onnx = FeatureExtractor.load(exported["dir"], "onnxruntime", 1)
    vino = FeatureExtractor.load(exported["dir"], "openvino", 1)
    assert vino.backend.name == "openvino" and vino.fingerprint == onnx.fingerprint
    reference = onnx.extract_files(files, batch_size=4).features
    assert np.abs(vino.extract_files(files, batch_size=4).features - reference).max() < 1e-4

    onnx_int8 = FeatureExtractor.load(exported["dir"], "onnxruntime", 1, precision="int8")
    vino_int8 = FeatureExtractor.load(exported["dir"], "openvino", 1, precision="int8")
    assert vino_int8.fingerprint == onnx_int8.fingerprint != onnx.fingerprint
    a, b = onnx_int8.extract_files(files).features, vino_int8.extract_files(files).features
    assert np.sum(a * b, axis=1).min() > 0.99

    images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda i: vino.extract_images(images[i : i + 2]), (0, 2, 4)))
    assert np.abs(np.concatenate(together) - reference).max() < 1e-4

    for backend, precision, device, message in (
        ("openvino", "bf16", "cpu", "bf16 runs on the torch backend"),
        ("openvino", "fp32", "cuda", "CPU only"),
    ):
        with pytest.raises(ConfigError, match=message):
            FeatureExtractor.load(exported["dir"], backend, precision=precision, device=device)


def test_int8_library_is_built_and_searched_in_int8_from_the_cli(exported, tmp_path):
    """--precision int8 reaches index build and recognize; the library then refuses fp32
    features, and int8 asked of an export without model.int8.onnx names what is missing."""

    def shitu(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "shitu.cli.main", *args, "--threads", "1"]
        return subprocess.run(command, capture_output=True, text=True)

    gallery = tmp_path / "gallery"
    for index, path in enumerate(exported["files"][:4]):
        (gallery / f"product {index}").mkdir(parents=True)
        shutil.copy(path, gallery / f"product {index}" / path.name)
    model, library = str(exported["dir"]), str(tmp_path / "library")
    built = shitu("index", "build", "--gallery", str(gallery), "--out", library, "--model", model,
                  "--precision", "int8")  # fmt: skip
    assert built.returncode == 0, built.stderr
    query = str(exported["files"][2])  # a gallery photo: its own int8 features come back
    found = shitu("recognize", query, "--gallery", library, "--model", model, "--precision",
                  "int8", "--score-thres", "0.99")  # fmt: skip
    assert found.returncode == 0, found.stderr
    (result,) = json.loads(found.stdout.splitlines()[0])["results"]
    assert result["label"] == "product 2" and result["score"] > 0.99
    # Built on onnxruntime, searched on OpenVINO: the same int8 model, the same library.
    found = shitu("recognize", query, "--gallery", library, "--model", model, "--precision",
                  "int8", "--runtime", "openvino", "--score-thres", "0.98")  # fmt: skip
    assert found.returncode == 0, found.stderr
    (result,) = json.loads(found.stdout.splitlines()[0])["results"]
    assert result["label"] == "product 2"

    refused = shitu("recognize", query, "--gallery", library, "--model", model)
    assert refused.returncode != 0 and "another --precision" in refused.stderr
    # the precision that built it, of the model given, is named
    assert refused.stderr.endswith(
        "(it holds this model's int8 features: give --precision int8 (precision= in Python))\n"
    )
    # Re-embedded in fp32 and back in int8: the note of the new features names the precision
    # to search with, which the model alone would be refused for, as above
    assert shitu("index", "reembed", library, "--model", model).returncode == 0
    back = shitu("index", "reembed", library, "--model", model, "--precision", "int8")
    assert back.returncode == 0, back.stderr
    assert f"search it with --model {model} --precision int8 from now on" in back.stderr

    plain = export_model(exported["config"], None, tmp_path / "plain")
    missing = shitu("extract", query, "--model", str(plain), "--out", str(tmp_path / "f"),
                    "--precision", "int8")  # fmt: skip
    assert missing.returncode != 0
    assert f"{plain} has no model.int8.onnx" in missing.stderr and "--int8-calibration" in (
        missing.stderr
    )
    shutil.copy(exported["dir"] / "model.int8.onnx", plain)  # another export's, by hand
    foreign = shitu("extract", query, "--model", str(plain), "--out", str(tmp_path / "f"),
                    "--precision", "int8")  # fmt: skip
    assert f"{plain / 'model.int8.onnx'}: not one the export recorded" in foreign.stderr


def test_extract_cli_skips_corrupt_files_and_reads_only_a_folders_images(exported, tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    good = exported["files"][:2]
    shutil.copy(good[0], folder / "a.jpg")
    shutil.copy(good[1], folder / "sub" / "b.jpg")
    (folder / "c_truncated.jpg").write_bytes(good[0].read_bytes()[:300])
    (folder / "notes.txt").write_text("not an image\n")
    (folder / ".hidden.jpg").write_bytes(b"ignored")
    Image.open(good[0]).save(folder / "sub" / "anim.gif")  # a real GIF: not read, but said
    prefix = tmp_path / "out" / "feats"  # given as feats.npy: the same prefix
    args = ["extract", str(folder), "--model", str(exported["dir"]), "--out", f"{prefix}.npy"]
    result = subprocess.run(
        [sys.executable, "-m", "shitu.cli.main", *args, "--threads", "1"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    features = np.load(prefix.with_suffix(".npy"))
    paths = prefix.with_suffix(".txt").read_text().splitlines()
    assert paths == [str(folder / "a.jpg"), str(folder / "sub" / "b.jpg")]
    assert features.shape == (2, 512)
    assert "c_truncated.jpg" in result.stderr  # a folder's non-image and hidden files
    assert "notes.txt" not in result.stderr and ".hidden" not in result.stderr  # are not read
    assert f"warning: skipped 1 file in {folder} (.gif x1; e.g. {folder / 'sub' / 'anim.gif'})" in (
        result.stderr
    )
    assert "embedded 2 images" in result.stdout and "skipped 1" in result.stdout
    reference = FeatureExtractor.load(exported["dir"], num_threads=1).extract_files(good)
    assert np.abs(features - reference.features).max() < 1e-6

    unreadable = ["extract", str(folder / "c_truncated.jpg"), "--model", str(exported["dir"])]
    result = subprocess.run(
        [sys.executable, "-m", "shitu.cli.main", *unreadable, "--out", str(tmp_path / "none")],
        capture_output=True,
        text=True,
    )
    assert (
        result.returncode == 1
        and "the only file could not be read, nothing written" in result.stderr
    )
    assert not list(tmp_path.glob("none*"))

    args += ["--runtime", "openvino", "--threads", "1"]
    result = subprocess.run(
        [sys.executable, "-m", "shitu.cli.main", *args], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "openvino fp32" in result.stdout
    assert np.abs(np.load(prefix.with_suffix(".npy")) - reference.features).max() < 1e-4


def test_cli_warnings_logged_and_printed_look_the_same(exported, tmp_path):
    """The folder scan (library code) logs its warning, `shitu extract` prints its own:
    a user sees both as `warning: ...` on stderr."""
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(exported["files"][0], folder / "a.jpg")
    (folder / "b.jpg").write_bytes(b"not a jpeg")
    (folder / "c.gif").write_bytes(b"GIF89a")
    args = ["extract", str(folder), "--model", str(exported["dir"]), "--out", str(tmp_path / "f")]
    result = subprocess.run(
        [sys.executable, "-m", "shitu", *args, "--threads", "1"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    logged, printed = result.stderr.splitlines()
    assert logged.startswith(f"warning: skipped 1 file in {folder} (.gif x1; ")
    assert printed.startswith(f"warning: skipped {folder / 'b.jpg'}: ")


def test_killed_export_leaves_nothing_and_reexport_replaces(exported, tmp_path, monkeypatch):
    config = exported["config"]
    target = tmp_path / "export"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as if killed while writing the ONNX file

    monkeypatch.setattr(export_module, "_export_onnx", crash)
    with pytest.raises(KeyboardInterrupt):
        export_model(config, None, target)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    export_model(config, None, target)
    first = read_manifest(target)["fingerprint"]
    export_model(config, exported["dir"] / "model.safetensors", target)
    assert read_manifest(target)["fingerprint"] == read_manifest(exported["dir"])["fingerprint"]
    assert read_manifest(target)["fingerprint"] != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_an_onnx_model_that_differs_from_torch_is_refused_naming_the_export(
    exported, tmp_path, monkeypatch
):
    """The error named the model.onnx of the staging folder, gone once the export failed."""
    monkeypatch.setattr(export_module, "EXPORT_TOLERANCE", -1.0)  # any difference is too large
    out = tmp_path / "model"
    with pytest.raises(export_module.ExportError) as refused:
        export_model(exported["config"], None, out)
    assert str(refused.value).startswith(
        f"{out}: not written, the ONNX model's output differs from torch's by "
    )
    assert str(refused.value).endswith(" of the largest feature (at most -1 expected)")
    assert list(tmp_path.iterdir()) == []


def test_int8_calibration_images_none_can_read_are_refused_before_the_onnx_export(
    exported, tmp_path, monkeypatch
):
    """A calibration folder of no images (the wrong one given) is refused at once, not
    after the ONNX export and its check, which take a large model a long time."""

    def onnx_export(*args, **kwargs):
        raise AssertionError("the ONNX model was exported before the images were read")

    monkeypatch.setattr(export_module, "_export_onnx", onnx_export)
    text = tmp_path / "photos.txt"
    text.write_text("photo.jpg\n")
    with pytest.raises(DataError, match="no calibration image could be used"):
        export_model(exported["config"], None, tmp_path / "int8", calibration_images=[text])
    assert sorted(tmp_path.iterdir()) == [text]


@pytest.mark.parametrize("value", [True, "0.5", 1.5, float("nan")])
def test_export_refuses_a_score_thres_that_is_no_cosine_similarity(exported, tmp_path, value):
    """true was taken as 1 and written into a manifest that loading refuses; text failed
    with a TypeError."""
    with pytest.raises(
        export_module.ExportError,
        match=re.escape(f"score_thres {value!r}: a cosine similarity, a number in [-1, 1]"),
    ):
        export_model(exported["config"], None, tmp_path / "model", score_thres=value)
    assert list(tmp_path.iterdir()) == []


def test_export_takes_a_numpy_score_thres(exported, tmp_path):
    """A threshold computed from numpy scores (np.float32) was refused as no number."""
    target = export_model(exported["config"], None, tmp_path / "model", score_thres=np.float32(0.5))
    assert read_manifest(target)["score_thres"] == 0.5


def test_int8_calibration_images_given_as_one_path_are_refused_naming_it(exported, tmp_path):
    """A folder's path as a str was read as the images '/', 't', 'm', ... ("no calibration
    image could be read (12 given; first: /: Is a directory)"); as a Path, a TypeError."""
    folder = exported["files"][0].parent
    for given in (str(folder), folder):
        with pytest.raises(export_module.ExportError) as refused:
            export_model(exported["config"], None, tmp_path / "int8", calibration_images=given)
        assert str(refused.value) == (
            f"calibration_images {str(folder)!r}: a list of image files, not one path (a "
            "folder's images: shitu.image_files.scan_images(Path(folder)))"
        )
    assert list(tmp_path.iterdir()) == []


def test_a_folder_given_to_extract_files_is_named_as_one_with_how_to_list_its_images(
    exported, tmp_path
):
    """A folder among extract_files' paths was reported with the OS's bare "Is a
    directory"; read_rgb, which every API reading image files goes through, says it."""
    folder = tmp_path / "photos"
    folder.mkdir()
    said = (
        "a folder, not an image file: pass the images in it "
        "(shitu.image_files.scan_images(Path(folder)) lists them)"
    )
    with pytest.raises(UnreadableImageError) as caught:
        read_rgb(folder)
    assert str(caught.value) == said
    photo = exported["files"][0]
    with FeatureExtractor.load(exported["dir"], num_threads=1) as extractor:
        result = extractor.extract_files([folder, photo])
    assert result.failures == [(str(folder), said)] and result.paths == [str(photo)]


def test_image_readers_refuse_devices_fifos_and_huge_files_before_reading_them(
    tmp_path, monkeypatch
):
    """`shitu detect /dev/zero` read the device until memory ran out, a FIFO waited for a
    writer without end, and a file of any size was read whole: read_rgb and the dataset
    check refuse them from the file's kind and size, before reading it."""
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), "red").save(photo)
    monkeypatch.setattr(image_files, "MAX_IMAGE_FILE_BYTES", photo.stat().st_size - 1)
    refused = {
        "/dev/null": "a character device, not an image file",
        str(fifo): "a FIFO (named pipe), not an image file",
        str(photo): f"0.0 GiB, over the {(photo.stat().st_size - 1) / 2**30:g} GiB an image "
        "file may hold (SHITU_MAX_MEGAPIXELS raises it, with the pixel limit); not read",
    }
    for path, said in refused.items():
        with pytest.raises(UnreadableImageError) as caught:
            read_rgb(path)
        assert str(caught.value) == said, path
        assert check_image(path) == said, path
    monkeypatch.setattr(image_files, "MAX_IMAGE_FILE_BYTES", photo.stat().st_size)
    assert read_rgb(photo).shape == (48, 64, 3) and check_image(str(photo)) == (64, 48)


def test_export_removes_the_staging_folders_of_killed_exports(exported, tmp_path):
    """An export killed outright (SIGKILL, power loss) leaves its staging folder, a model's
    worth of files: the next export to that name removes it, and leaves a running one's."""
    target = tmp_path / "export"
    staging = {}
    for name in ("dead", "live"):
        staging[name] = tmp_path / f".export.exporting-{name}"
        staging[name].mkdir()
        (staging[name] / "model.onnx").write_bytes(b"half a model")
        Path(f"{staging[name]}.lock").touch()
    with open(f"{staging['live']}.lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as the running export holds it
        export_model(exported["config"], exported["dir"] / "model.safetensors", target)
    assert read_manifest(target)["fingerprint"] == read_manifest(exported["dir"])["fingerprint"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".export.exporting-live",
        ".export.exporting-live.lock",
        "export",
    ]


def test_fingerprint_covers_weightless_arch_settings_but_not_training_ones(exported, tmp_path):
    """The same weights with the last activation (the ShiTu preset leaves it out) give
    other features, so another fingerprint (a gallery must refuse them); frozen layers only
    matter to training."""
    config, weights = exported["config"], exported["dir"] / "model.safetensors"

    def fingerprint_of(name: str, **arch) -> str:
        changed = config.model_copy(update={"Arch": config.Arch.model_copy(update=arch)})
        return read_manifest(export_model(changed, weights, tmp_path / name, compact=True))[
            "fingerprint"
        ]

    backbone = config.Arch.Backbone.model_copy(update={"last_act": True})
    plain = fingerprint_of("plain")
    assert fingerprint_of("frozen", frozen_layers=["backbone.stem"]) == plain
    assert fingerprint_of("last_act", Backbone=backbone) != plain


def test_settings_written_out_at_their_defaults_keep_the_fingerprint(exported, grocery, tmp_path):
    """`shitu export -o Arch.Backbone.last_stride=1` (the ShiTu preset's own) builds the
    model that leaving it out does: its fingerprint differed, so a library built with one
    export refused the other. A setting at another value still changes it."""
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(TINY_CONFIG.format(size=SIZE, root=grocery))
    weights = f"Global.pretrained_model={exported['dir'] / 'model.safetensors'}"

    def fingerprint_of(name: str, *overrides: str) -> str:
        command = [sys.executable, "-m", "shitu", "export", "-c", str(config_file), "--compact"]
        for override in (weights, *overrides):
            command += ["-o", override]
        made = subprocess.run([*command, "--out", str(tmp_path / name)], capture_output=True,
                              text=True)  # fmt: skip
        assert made.returncode == 0, made.stderr
        return read_manifest(tmp_path / name)["fingerprint"]

    implicit = fingerprint_of("implicit")
    defaults = (
        "Arch.Backbone.last_stride=1",
        "Arch.Backbone.act=relu",
        "Arch.Neck.bias_frozen=true",
    )
    # null takes the default; a preset's fixed value may be given at that value
    as_left_out = ("Arch.Backbone.dropout_prob=null", "Arch.Backbone.depths=[2, 2, 4, 2]")
    assert fingerprint_of("explicit", *defaults) == implicit
    assert FeatureExtractor.load(tmp_path / "explicit", backend="torch").fingerprint == implicit
    assert fingerprint_of("as_left_out", *as_left_out) == implicit
    other = fingerprint_of("other", "Arch.Backbone.last_act=true")
    assert other != implicit
    # `yes` is text in YAML 1.2, which the switch reads as true: the same model
    assert fingerprint_of("yes", "Arch.Backbone.last_act=yes") == other


def test_a_version_1_export_loads_under_its_own_fingerprint(exported, tmp_path, monkeypatch):
    """Exports written before the fingerprint covered the arch keep theirs, so the
    libraries built with them stay valid; the cached ONNX rebuild is made once."""
    monkeypatch.setenv("SHITU_CACHE_DIR", str(tmp_path / "cache"))
    weights = exported["dir"] / "model.safetensors"
    compact = export_model(exported["config"], weights, tmp_path / "v1", compact=True)
    record = read_manifest(compact)
    model = load_exported_model(compact, record)
    prep = Preprocessing.from_dict(record["preprocessing"])
    legacy = fingerprint(model.state_dict(), prep, record["output_key"], None)
    assert legacy != record["fingerprint"]
    record.update(format_version=1, fingerprint=legacy)
    (compact / "shitu_model.json").write_text(json.dumps(record))
    for backend in ("auto", "torch", "auto"):
        assert FeatureExtractor.load(compact, backend=backend).fingerprint == legacy
    assert len(list((tmp_path / "cache" / "exports").iterdir())) == 1


def test_a_hand_edited_input_size_is_refused_on_every_runtime(exported, tmp_path):
    edited = shutil.copytree(exported["dir"], tmp_path / "edited")
    record = json.loads((edited / "shitu_model.json").read_text())
    record["preprocessing"]["resize"] = [SIZE + 32, SIZE + 32]
    (edited / "shitu_model.json").write_text(json.dumps(record))
    for backend in ("onnxruntime", "openvino"):
        with pytest.raises(CheckpointError, match=f"takes {SIZE}x{SIZE} images, but"):
            FeatureExtractor.load(edited, backend=backend)
    with pytest.raises(CheckpointError, match="do not give the fingerprint"):
        FeatureExtractor.load(edited, backend="torch")


def test_hand_edited_preprocessing_is_refused_by_its_fingerprint_on_every_runtime(
    exported, tmp_path
):
    """The ONNX graph leaves preprocessing out, so only the fingerprint shows such an edit;
    served, it would give other features under the fingerprint of the unedited model."""
    edited = shutil.copytree(exported["dir"], tmp_path / "edited")
    record = json.loads((edited / "shitu_model.json").read_text())
    record["preprocessing"]["channel_order"] = "BGR"
    (edited / "shitu_model.json").write_text(json.dumps(record))
    for backend in ("onnxruntime", "openvino", "torch"):
        with pytest.raises(CheckpointError, match="do not give the fingerprint"):
            FeatureExtractor.load(edited, backend=backend)
    for precision in ("fp32", "int8"):  # the unedited export loads on each
        FeatureExtractor.load(exported["dir"], backend="onnxruntime", precision=precision)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("fingerprint"), "fingerprint must be a string, is missing"),
        (
            lambda m: m.update(format_version=3),
            r"format version 3, written by a newer shitu than this one \(.*, which reads "
            r"versions 1 to 2\): upgrade shitu",
        ),
        (
            lambda m: m.update(format_version="2"),
            'format_version must be a whole number from 1 to 2, is "2" .edited by hand',
        ),
        (lambda m: m.pop("format"), r"not a shitu-feature-extractor manifest \(edited by hand"),
        (
            lambda m: m.update(embedding_size="512"),
            'embedding_size must be a whole number >= 1, is "512"',
        ),
        (lambda m: m.update(preprocessing=[224]), r"preprocessing must be an object, is \[224\]"),
        (
            lambda m: m["preprocessing"].update(mean=[0.5]),
            r"preprocessing: mean: expected a list of 3 numbers, got \[0.5\]",
        ),
        (
            lambda m: m["preprocessing"].update(mean="abc"),
            'preprocessing: mean: expected a list of 3 numbers, got "abc"',
        ),
        (
            lambda m: m["preprocessing"].update(std=None),
            "preprocessing: std: expected a list of 3 numbers, got null",
        ),
        (
            lambda m: m["preprocessing"].update(scale="1/255"),
            'preprocessing: scale: expected a number, got "1/255"',
        ),
        (
            lambda m: m["preprocessing"].update(resize="big"),
            'preprocessing: resize: expected a list of 2 whole numbers, got "big"',
        ),
        (  # a fraction was rounded down: the fingerprint matched, the edit went unsaid
            lambda m: m["preprocessing"].update(resize=[96.5, 96]),
            r"preprocessing: resize: expected a list of 2 whole numbers, got \[96.5, 96\]",
        ),
        (
            lambda m: m["preprocessing"].update(crop=[80, 80.9]),
            r"preprocessing: crop: expected a list of 2 whole numbers, got \[80, 80.9\]",
        ),
        (
            lambda m: m["preprocessing"].update(interpolation="foo"),
            "preprocessing: interpolation: unknown",
        ),
        (
            lambda m: m["preprocessing"].update(channel_order="BRG"),
            "preprocessing: channel_order: unknown",
        ),
        (
            lambda m: m["preprocessing"].update(std=[0, 1, 1]),
            r"preprocessing: std: must be positive, got \[0, 1, 1\]",
        ),
        (  # 0 in float32: every pixel of the channel was inf
            lambda m: m["preprocessing"].update(std=[1e-50, 1, 1]),
            r"preprocessing: std: \[1e-50, 1, 1\] is too small: a pixel normalised by it, "
            r"\(pixel \* scale - mean\) / std, is inf in float32",
        ),
        (  # every image one constant
            lambda m: m["preprocessing"].update(scale=0),
            "preprocessing: scale: must be positive",
        ),
        (  # a mean of 0-255 pixels beside scale 1/255: every image about one value
            lambda m: m["preprocessing"].update(mean=[123.675, 116.28, 103.53]),
            r"preprocessing: mean: \[123.675, 116.28, 103.53\] lies outside the scaled "
            r"pixels' range \[0, 1\]",
        ),
        (
            lambda m: m["preprocessing"].update(mean=[float("nan"), 0.4, 0.4]),
            r"preprocessing: mean: expected a list of 3 numbers, got \[NaN, 0.4, 0.4\]",
        ),
        (  # was compared with the crop: Python's words on an int and a str
            lambda m: m["preprocessing"].update(resize=None, resize_short="big", crop=[96, 96]),
            "preprocessing: resize_short: expected a whole number >= 1, got 'big'",
        ),
        (  # was "crop [96, 96] is larger than the resize_short -1 on both sides"
            lambda m: m["preprocessing"].update(resize=None, resize_short=-1, crop=[96, 96]),
            "preprocessing: resize_short: expected a whole number >= 1, got -1",
        ),
    ],
)
def test_a_missing_or_malformed_manifest_entry_is_named_on_every_runtime(
    exported, tmp_path, edit, message
):
    """Not a KeyError or ValueError from inside loading, and not, for settings that only
    preprocessing reads (a channel order), served by the ONNX runtimes as they are."""
    edited = shutil.copytree(exported["dir"], tmp_path / "edited")
    record = json.loads((edited / "shitu_model.json").read_text())
    edit(record)
    (edited / "shitu_model.json").write_text(json.dumps(record))
    for backend in ("onnxruntime", "torch"):
        with pytest.raises(CheckpointError, match=f"shitu_model.json: {message}"):
            FeatureExtractor.load(edited, backend=backend)


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # a write cut short
        lambda data: data.replace(b'"shitu-feature-extractor"', b'"\xff\xfe"'),  # not UTF-8
    ],
)
def test_an_unreadable_manifest_is_named(exported, tmp_path, damage):
    """Bytes that are not UTF-8 gave a UnicodeDecodeError traceback naming no file."""
    edited = shutil.copytree(exported["dir"], tmp_path / "edited")
    manifest = edited / "shitu_model.json"
    manifest.write_bytes(damage(manifest.read_bytes()))
    with pytest.raises(CheckpointError, match=f"^{manifest}: unreadable manifest"):
        FeatureExtractor.load(edited)


def test_a_manifest_entry_shitu_does_not_read_is_named_once_with_the_one_meant(
    exported, tmp_path, caplog
):
    """A misspelt `score_threshold` was ignored without a word: recognition used the
    default threshold, not the one the user wrote. Unknown entries still load (a newer
    shitu's), and the exports shitu writes, the shipped model's among them, have none."""
    edited = shutil.copytree(exported["dir"], tmp_path / "edited")
    manifest = edited / "shitu_model.json"
    record = json.loads(manifest.read_text())
    record["score_threshold"] = 0.7
    record["made_for"] = "the kiosk"
    manifest.write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="shitu.inference"):
        for model_dir in (exported["dir"], default_model_dir()):
            FeatureExtractor.load(model_dir).close()
        assert caplog.text == ""
        loaded = FeatureExtractor.load(edited, backend="onnxruntime")
    assert loaded.score_thres is None  # still ignored, as before
    loaded.close()
    warnings = [record.getMessage() for record in caplog.records]
    assert warnings == [
        f"{manifest}: 'score_threshold' is not an entry shitu {__version__} reads, so it is "
        "ignored (did you mean 'score_thres'?)",
        f"{manifest}: 'made_for' is not an entry shitu {__version__} reads, so it is ignored",
    ]


def test_a_manifest_saved_by_an_editor_with_a_byte_order_mark_loads(exported, tmp_path):
    """Notepad saves UTF-8 with a BOM, which json.loads refused ("Unexpected UTF-8 BOM")."""
    edited = shutil.copytree(exported["dir"], tmp_path / "edited")
    manifest = edited / "shitu_model.json"
    manifest.write_bytes(codecs.BOM_UTF8 + manifest.read_bytes())
    loaded = FeatureExtractor.load(edited)
    assert loaded.fingerprint == read_manifest(exported["dir"])["fingerprint"]


def test_an_arch_edited_into_one_that_cannot_be_built_is_named_with_its_manifest(
    exported, tmp_path, monkeypatch
):
    """The torch backend, and the cache's rebuild of a compact export (the default path for
    the shipped model), build the model from the recorded arch: not a pydantic traceback."""
    monkeypatch.setenv("SHITU_CACHE_DIR", str(tmp_path / "cache"))
    weights = save_weights(exported["model"].state_dict(), tmp_path / "trained.safetensors")
    compact = export_model(exported["config"], weights, tmp_path / "compact", compact=True)
    edits = {
        "Backbone: required key missing in arch": lambda arch: arch.pop("Backbone"),
        "the model's backbone 'Nope' is not registered in this process": lambda arch: arch[
            "Backbone"
        ].update(name="Nope"),
    }
    for source, backend in ((exported["dir"], "torch"), (compact, "auto")):
        for message, edit in edits.items():
            edited = tmp_path / "edited"
            shutil.rmtree(edited, ignore_errors=True)
            shutil.copytree(source, edited)
            record = json.loads((edited / "shitu_model.json").read_text())
            edit(record["arch"])
            (edited / "shitu_model.json").write_text(json.dumps(record))
            with pytest.raises(CheckpointError, match=f"^{edited}/shitu_model.json: {message}"):
                FeatureExtractor.load(edited, backend=backend)


def test_export_refuses_a_folder_that_is_not_an_export(exported, tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(export_module.ExportError, match="not a shitu export"):
        export_model(exported["config"], None, tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "user data"
    with pytest.raises(export_module.ExportError, match="keep.txt is a file, not a folder"):
        export_model(exported["config"], None, tmp_path / "keep.txt" / "model")


def test_export_model_takes_a_config_files_path_and_refuses_what_is_no_config(
    exported, grocery, tmp_path
):
    """A config's path or name failed on "'str' object has no attribute 'Arch'", though
    Recognizer.from_config takes one for its config."""
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(TINY_CONFIG.format(size=SIZE, root=grocery))
    weights = exported["dir"] / "model.safetensors"
    for given in (config_file, str(config_file)):
        out = export_model(given, weights, tmp_path / "model")
        assert read_manifest(out)["fingerprint"] == read_manifest(exported["dir"])["fingerprint"]
    with pytest.raises(ConfigError, match=r"^config: expected a ShituConfig .* got dict$"):
        export_model({"Arch": {}}, weights, tmp_path / "model")


def test_paths_from_python_that_start_with_a_tilde_are_in_the_home_folder(
    exported, tmp_path, monkeypatch
):
    """Gallery.build("~/lib") or export_model(..., "~/model") made a folder named `~` in the
    working directory (one `rm -r ~` from disaster), and FeatureExtractor.load("~/model")
    and Gallery.open("~/lib") looked there, where Recognizer.open("~/lib") looked home."""
    from shitu.index import Gallery, GalleryItem

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert export_model(exported["config"], None, "~/model") == home / "model"
    with FeatureExtractor.load("~/model") as extractor:
        items = [GalleryItem(path, "a") for path in exported["files"][:2]]
        Gallery.build("~/lib", extractor, items)
        with Gallery.open("~/lib", embedder=extractor) as gallery:
            assert gallery.root == home / "lib" and len(gallery) == 2
    assert sorted(p.name for p in home.iterdir()) == ["lib", "model"]
    assert list(work.iterdir()) == []


def test_export_refusals_from_python_name_out_dir_not_the_flag(exported, tmp_path, monkeypatch):
    """Called from Python they said "choose a new folder for --out", a flag the caller
    never gave; `shitu export` still names --out (test_cli)."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("user data")
    shutil.copytree(exported["dir"], tmp_path / "old")
    (tmp_path / "old" / "notes.txt").write_text("user data")
    monkeypatch.chdir(tmp_path)
    for out_dir, ending in (
        (tmp_path / "mine", "choose a new folder for out_dir"),
        (tmp_path / "mine" / "keep.txt" / "model", "choose another folder for out_dir"),
        (tmp_path / "old", "move them out of it or choose a new folder for out_dir"),
        (tmp_path / "model.onnx", f"give a folder for out_dir, e.g. {tmp_path / 'model'}"),
        (".", "give it a folder of its own for out_dir (e.g. my_model)"),
    ):
        with pytest.raises(export_module.ExportError) as refused:
            export_model(exported["config"], None, out_dir)
        assert str(refused.value).endswith(ending) and "--out" not in str(refused.value)


@pytest.mark.parametrize("name", [".", "../work"])
def test_export_refuses_the_current_folder(exported, tmp_path, monkeypatch, name):
    """Even an empty one: the export would take its place, and the command's own shell
    would be left in a deleted folder (`.` itself cannot be replaced at all)."""
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(export_module.ExportError, match=rf"^{name} is the current folder"):
        export_model(exported["config"], None, name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert not any((tmp_path / "work").iterdir())


def test_export_out_a_link_writes_the_export_where_it_points(exported, tmp_path):
    """`--out current` where current links to an export (or a folder not made yet): the
    export went in the link's place, leaving the export the link pointed to stale."""
    first = export_model(exported["config"], None, tmp_path / "v1")
    (tmp_path / "current").symlink_to(first)
    (tmp_path / "dangling").symlink_to(tmp_path / "disk" / "new")
    weights = exported["dir"] / "model.safetensors"
    trained = read_manifest(exported["dir"])["fingerprint"]
    assert read_manifest(first)["fingerprint"] != trained
    for link in (tmp_path / "current", tmp_path / "dangling"):
        assert export_model(exported["config"], weights, link) == link
        assert link.is_symlink() and read_manifest(link.resolve())["fingerprint"] == trained
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "dangling", "disk", "v1"]
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["new"]


def test_export_out_a_link_in_a_loop_is_refused_naming_it(exported, tmp_path):
    """Followed, a link to itself raised a traceback (RuntimeError: Symlink loop)."""
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(OSError) as refused:
        export_model(exported["config"], None, tmp_path / "loop")
    assert refused.value.errno == errno.ELOOP and refused.value.filename == str(tmp_path / "loop")
    assert [p.name for p in tmp_path.iterdir()] == ["loop"]


def test_export_refuses_a_link_to_the_current_folder(exported, tmp_path, monkeypatch):
    """Followed, the link's export would replace the folder the command runs in."""
    (tmp_path / "work").mkdir()
    (tmp_path / "here").symlink_to(tmp_path / "work")
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(export_module.ExportError, match="is the current folder"):
        export_model(exported["config"], None, tmp_path / "here")
    assert not any((tmp_path / "work").iterdir())


def test_reexport_refuses_an_export_folder_that_holds_other_files(exported, tmp_path):
    """Re-exporting replaces the whole folder, so files the user added to it would go too."""
    target = export_model(exported["config"], None, tmp_path / "model")
    first = read_manifest(target)["fingerprint"]
    (target / "gallery").mkdir()
    (target / "gallery" / "index.faiss").write_text("user data")
    (target / "notes.txt").write_text("user data")
    with pytest.raises(export_module.ExportError, match=r"also holds gallery, notes.txt, which"):
        export_model(exported["config"], exported["dir"] / "model.safetensors", target)
    assert (target / "gallery" / "index.faiss").read_text() == "user data"
    assert (target / "notes.txt").read_text() == "user data"
    assert read_manifest(target)["fingerprint"] == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging folder left


def test_changed_model_file_is_detected(exported, tmp_path):
    copy = shutil.copytree(exported["dir"], tmp_path / "copy")
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-10] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match"):
        FeatureExtractor.load(copy, backend="onnxruntime")
    with pytest.raises(CheckpointError, match="not an exported model"):
        FeatureExtractor.load(tmp_path)
    with pytest.raises(CheckpointError, match=f"^model {tmp_path / 'gone'}: no such folder$"):
        FeatureExtractor.load(tmp_path / "gone")
    with pytest.raises(CheckpointError, match=f"is a file; give the folder of an export: {copy}$"):
        FeatureExtractor.load(copy / "model.onnx")
    # a training run's weights, the usual file given: the way to an export from them
    weights = shutil.copy(copy / "model.safetensors", tmp_path / "best_model.safetensors")
    with pytest.raises(
        CheckpointError,
        match=rf"^model {weights} is a file; give the folder of an export \(for a weight file, "
        rf"`shitu export -c CONFIG -o Global.pretrained_model={weights} --out DIR` makes one\)$",
    ):
        FeatureExtractor.load(weights)
    # an ONNX file on its own (a detector given as the model): not told to export it
    onnx = shutil.copy(copy / "model.onnx", tmp_path / "picodet_s_416_coco.onnx")
    with pytest.raises(CheckpointError, match=r"export \(an ONNX file alone records no pre"):
        FeatureExtractor.load(onnx)


def test_a_deleted_onnx_model_is_warned_of_where_auto_runs_torch_instead(
    exported, tmp_path, caplog
):
    """A full export's model.onnx deleted: 'auto' ran the torch backend, slower, saying so
    only in its name; an ONNX runtime asked for by name refuses the folder, as before."""
    copy = shutil.copytree(exported["dir"], tmp_path / "copy")
    (copy / "model.onnx").unlink()
    with caplog.at_level(logging.WARNING, logger="shitu.inference.extractor"):
        assert FeatureExtractor.load(copy, backend="torch").backend.name == "torch"
        assert caplog.text == ""  # asked for: nothing lost
        assert FeatureExtractor.load(copy).backend.name == "torch"
    assert (
        f"{copy / 'model.onnx'}: missing from the export (its shitu_model.json lists it), so "
        "the slower torch backend runs the model: re-run `shitu export` to restore it"
    ) in caplog.text
    with pytest.raises(CheckpointError, match=r"model.onnx: missing from the export \(re-run"):
        FeatureExtractor.load(copy, backend="onnxruntime")


def test_a_paddle_inference_model_is_named_as_one(tmp_path):
    """PP-ShiTu's pipeline config names a Paddle inference folder as the model: say so,
    and what to give shitu instead, not only that shitu_model.json is missing."""
    paddle = tmp_path / "general_PPLCNetV2_base_pretrained_v1.0_infer"
    paddle.mkdir()
    for name in ("inference.pdmodel", "inference.pdiparams", "inference.pdiparams.info"):
        (paddle / name).write_bytes(b"\0")
    with pytest.raises(
        CheckpointError,
        match=rf"^{paddle} is a Paddle inference model, which shitu does not run: export the "
        r"PaddleClas weights \(\.pdparams\) it was made from with `shitu export",
    ):
        FeatureExtractor.load(paddle)


def test_a_training_runs_folder_or_a_library_given_as_the_model_is_named_as_one(tmp_path):
    """`--model output/my_products`, the export step skipped: the command that makes one;
    `--model my_gallery`: where a library goes."""
    run = tmp_path / "output" / "my_products"
    run.mkdir(parents=True)
    for name in ("latest.pt", "final_model.safetensors", "best_model.safetensors"):
        (run / name).write_bytes(b"\0")
    with pytest.raises(
        CheckpointError,
        match=rf"^{run} is a training run's folder, not an exported model: export its weights "
        rf"first, `shitu export -c CONFIG -o Global.pretrained_model={run}/best_model\.safetensors",
    ):
        FeatureExtractor.load(run)
    library = tmp_path / "my_gallery"  # and a library, given as the model
    library.mkdir()
    (library / "gallery.sqlite").write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"^{library} is a gallery library, not an exported"):
        FeatureExtractor.load(library)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "torch"])
def test_manifest_embedding_size_that_the_model_does_not_give_is_refused(
    exported, tmp_path, backend
):
    """The size is not in the fingerprint: edited, it loaded, the extractor reported it, and
    only the first image was refused, naming no folder."""
    if backend == "openvino" and not openvino_available():
        pytest.skip("OpenVINO not installed")
    copy = shutil.copytree(exported["dir"], tmp_path / "copy")
    manifest = json.loads((copy / "shitu_model.json").read_text())
    size = manifest["embedding_size"]
    manifest["embedding_size"] += 1
    (copy / "shitu_model.json").write_text(json.dumps(manifest))
    with pytest.raises(
        CheckpointError,
        match=rf"^{copy}: the model gives features of shape \[1, {size}\], but its "
        rf"shitu_model.json says embedding_size {size + 1} \(edited by hand",
    ):
        FeatureExtractor.load(copy, backend=backend)


def test_preprocessing_from_eval_transforms(exported):
    config = exported["config"].model_copy(deep=True)
    ops = [
        {"DecodeImage": {"to_rgb": False}},
        {"ResizeImage": {"resize_short": 256, "interpolation": "bicubic"}},
        {"CropImage": {"size": 224}},
        {"NormalizeImage": {"scale": "1.0/255.0"}},
        {"ToCHWImage": None},
    ]
    config.DataLoader.Eval.Query.dataset.transform_ops = ops
    prep = Preprocessing.from_config(config)
    assert (prep.resize_short, prep.crop, prep.size) == (256, (224, 224), (224, 224))
    assert (prep.interpolation, prep.channel_order) == ("bicubic", "BGR")
    assert Preprocessing.from_dict(prep.to_dict()) == prep
    image = np.zeros((300, 400, 3), np.uint8)
    image[..., 0] = 255  # red in RGB: the BGR model input has it in channel 2
    prepared = prep.prepare(image)
    assert prepared.shape == (224, 224, 3) and prepared[0, 0, 2] == 255
    config.DataLoader.Eval.Query.dataset.transform_ops = [{"RandFlipImage": {}}, *ops[1:]]
    with pytest.raises(ConfigError, match="RandFlipImage: cannot be exported"):
        Preprocessing.from_config(config)


def test_a_config_without_eval_transforms_exports_the_normalisation_it_trained_with():
    """The shipped config trains with mean 0.498 and std 0.502: without its DataLoader.Eval
    (a training-only copy) the export took ImageNet's statistics, and every feature of the
    exported model was wrong."""
    config = load_config("GroceryStore_EfficientNetLite0", ["DataLoader.Eval=null"])
    prep = Preprocessing.from_config(config)
    assert prep.size == (224, 224) and prep.channel_order == "RGB"
    np.testing.assert_allclose((prep.mean, prep.std), ([0.498] * 3, [0.502] * 3), rtol=1e-6)
    train = config.DataLoader.Train.dataset
    train.transform_ops = [{"DecodeImage": {"to_rgb": False}}, {"RandFlipImage": {}}]
    prep = Preprocessing.from_config(config)  # trained on raw 0..255 BGR pixels
    assert (prep.scale, prep.mean, prep.std, prep.channel_order) == (1, (0, 0, 0), (1, 1, 1), "BGR")
    bare = load_config("GroceryStore_EfficientNetLite0", ["DataLoader=null"])
    assert Preprocessing.from_config(bare).mean == (0.485, 0.456, 0.406)  # ImageNet's


def test_an_export_without_eval_transforms_warns_of_a_training_size_it_does_not_use(caplog):
    """Without eval transforms the export resizes to Global.image_shape, which nothing
    else ties to the train transforms' crop: a model trained on 256 px crops said nothing
    when exported at the default 224."""
    config = load_config(
        "GroceryStore_EfficientNetLite0",
        [
            "DataLoader.Eval=null",
            "DataLoader.Train.dataset.transform_ops[1].RandCropImage.size=256",
        ],
    )
    with caplog.at_level(logging.WARNING, logger="shitu.inference.preprocess"):
        assert Preprocessing.from_config(config).size == (224, 224)
    assert "resizes to Global.image_shape's 224 x 224, but the model trained on 256 x 256" in (
        caplog.text
    )
    caplog.clear()
    config = load_config(
        "GroceryStore_EfficientNetLite0",
        [
            "DataLoader.Eval=null",
            "DataLoader.Train.dataset.transform_ops[1].RandCropImage.size=256",
            "Global.image_shape=[3, 256, 256]",
        ],
    )
    assert Preprocessing.from_config(config).size == (256, 256) and caplog.text == ""


def test_an_image_shape_the_eval_transforms_override_is_said_to_be_unused(caplog):
    """The input size comes from the eval transforms: `-o Global.image_shape=[3,256,256]`
    would otherwise be taken by the user for the exported model's, silently."""
    shipped = "GroceryStore_EfficientNetLite0"
    with caplog.at_level(logging.WARNING, logger="shitu.inference.preprocess"):
        assert Preprocessing.from_config(load_config(shipped)).size == (224, 224)
        assert not caplog.records  # the shipped config's image_shape agrees
        bigger = load_config(shipped, ["Global.image_shape=[3, 256, 256]"])
        assert Preprocessing.from_config(bigger).size == (224, 224)
    (record,) = caplog.records
    assert record.getMessage() == (
        "Global.image_shape [3, 256, 256] is not the model's input: that is the eval "
        "transforms' 224 x 224 (DataLoader.Eval transform_ops sets it)"
    )


def test_preprocessing_refuses_query_and_gallery_sets_preprocessed_differently(exported):
    """`shitu eval` embeds the Query set with its transforms and the Gallery set with its
    own; an export has one preprocessing for both, so taking either side's would deploy a
    pairing that was never evaluated (it silently took the Query's)."""
    config = exported["config"].model_copy(deep=True)
    evaluation = config.DataLoader.Eval
    query_ops = evaluation.Query.dataset.params["transform_ops"]
    evaluation.Gallery = evaluation.Query.model_copy(deep=True)
    gallery_ops = [{**op} for op in query_ops]
    gallery_ops[1] = {"ResizeImage": {"size": [2 * SIZE, 2 * SIZE], "interpolation": "bilinear"}}
    evaluation.Gallery.dataset.transform_ops = gallery_ops
    with pytest.raises(ConfigError, match="Query and Gallery transform_ops differ"):
        Preprocessing.from_config(config)
    evaluation.Gallery.dataset.transform_ops = None  # decoded only, not resized nor normalised
    with pytest.raises(ConfigError, match="Query and Gallery transform_ops differ"):
        Preprocessing.from_config(config)
    # the same ops, one spelling `ToCHWImage:` with no parameters and one with {}
    evaluation.Query.dataset.transform_ops = [*query_ops, {"ToCHWImage": None}]
    evaluation.Gallery.dataset.transform_ops = [*query_ops, {"ToCHWImage": {}}]
    assert Preprocessing.from_config(config).resize == (SIZE, SIZE)


def test_preprocessing_takes_a_resize_short_of_zero_or_less_as_unset(exported):
    """ResizeImage resizes to `size` unless resize_short > 0 (as PaddleClas, whose configs
    write -1 for none): the export must read the op as evaluation runs it, not as a
    resize_short of -1 that it then refuses."""
    config = exported["config"].model_copy(deep=True)
    for unset in (-1, 0):
        ops = [
            {"DecodeImage": {"to_rgb": True}},
            {"ResizeImage": {"size": 64, "resize_short": unset, "interpolation": "bilinear"}},
            {"CropImage": {"size": 48}},
        ]
        config.DataLoader.Eval.Query.dataset.transform_ops = ops
        prep = Preprocessing.from_config(config)
        assert (prep.resize, prep.resize_short, prep.crop) == ((64, 64), None, (48, 48))
        image = exported["files"][0]
        expected = build_transforms(ops)(image.read_bytes()).numpy()
        assert np.abs(prep.load(image) - expected).max() <= 1.0  # one grey level


def test_every_decoder_refuses_an_image_over_the_pixel_limit_from_its_header(
    exported, tmp_path, monkeypatch
):
    """A PNG declaring 20000x20000 (400 megapixels: under OpenCV's own limit, 3 GB decoded
    by it) but holding one row is refused from its header by the inference decoder, the
    training one and the dataset check alike, with its size and the limit; the size can
    only come from the header, so nothing was decoded. SHITU_MAX_MEGAPIXELS moves the limit."""
    huge = tmp_path / "huge.png"
    huge.write_bytes(declared_png(20_000, 20_000))
    refused = (
        "image 20000x20000 is 400 megapixels, over the limit of 250 megapixels "
        "(SHITU_MAX_MEGAPIXELS raises it); not decoded"
    )
    readers = {
        "read_rgb": lambda path: read_rgb(path),
        "decode_rgb": lambda path: decode_rgb(path.read_bytes()),
        "DecodeImage": lambda path: DecodeImage()(path.read_bytes()),
    }
    for name, read in readers.items():
        with pytest.raises(UnreadableImageError) as caught:
            read(huge)
        assert str(caught.value) == refused, name
    assert check_image(str(huge)) == refused
    photo = exported["files"][0]
    with FeatureExtractor.load(exported["dir"], num_threads=1) as extractor:
        result = extractor.extract_files([huge, photo])
    assert result.failures == [(str(huge), refused)] and len(result.features) == 1

    width, height = Image.open(photo).size
    monkeypatch.setenv("SHITU_MAX_MEGAPIXELS", f"{width * height / 2e6}")
    for read in readers.values():
        with pytest.raises(UnreadableImageError, match="megapixels, over the limit of"):
            read(photo)
    monkeypatch.setenv("SHITU_MAX_MEGAPIXELS", f"{width * height / 1e6}")
    assert all(read(photo).shape == (height, width, 3) for read in readers.values())
    monkeypatch.setenv("SHITU_MAX_MEGAPIXELS", "lots")
    with pytest.raises(ConfigError, match="SHITU_MAX_MEGAPIXELS='lots': expected the pixel"):
        read_rgb(photo)


def test_preprocessing_refuses_an_image_resize_short_would_blow_up(monkeypatch):
    """Inference resizes as training does: a thin image is unreadable, not gigabytes."""
    monkeypatch.setenv("SHITU_MAX_MEGAPIXELS", "0.01")
    prep = Preprocessing(resize=None, resize_short=20, crop=(16, 16))
    assert prep.prepare(np.zeros((40, 30, 3), np.uint8)).shape == (16, 16, 3)
    with pytest.raises(UnreadableImageError, match=r"image 400x2 .* makes 4000x20 pixels"):
        prep.prepare(np.zeros((2, 400, 3), np.uint8))
    # The same checks from the size alone, for callers that refuse such an image up front.
    assert prep.check_size(30, 40) == (20, 27)
    with pytest.raises(UnreadableImageError, match=r"image 400x2 .* makes 4000x20 pixels"):
        prep.check_size(400, 2)
    portrait_crop = Preprocessing(resize=None, resize_short=20, crop=(16, 24))
    with pytest.raises(UnreadableImageError, match=r"crop 16x24 is larger than the image "):
        portrait_crop.check_size(40, 30)  # resized to 27x20
    # an empty detector box: was a ZeroDivisionError, or taken as fine by a fixed resize
    for preprocessing in (prep, Preprocessing(resize=(16, 16))):
        with pytest.raises(UnreadableImageError, match=r"the image is empty \(0x30 pixels\)"):
            preprocessing.check_size(0, 30)


def test_preprocessing_replays_only_what_inference_can_and_nothing_it_was_not_given(exported):
    """Inference runs decode, resize, crop, normalise once each in that order: other orders
    are refused, and eval transforms without NormalizeImage give raw pixels there too."""
    config = exported["config"].model_copy(deep=True)
    resize = {"ResizeImage": {"size": 64, "interpolation": "bilinear"}}
    for ops in (
        [{"CropImage": {"size": 48}}, resize],  # a crop before the resize
        [resize, {"ResizeImage": {"size": 32}}],  # a second resize
    ):
        config.DataLoader.Eval.Query.dataset.transform_ops = ops
        with pytest.raises(ConfigError, match=r"transform_ops\[1\].*at most once, in that order"):
            Preprocessing.from_config(config)
    # A crop no resized image can hold would skip every image as unreadable.
    for ops, message in (
        ([resize, {"CropImage": {"size": [48, 96]}}], r"crop \[48, 96\] is larger than the resize"),
        (
            [{"ResizeImage": {"resize_short": 64}}, {"CropImage": {"size": 72}}],
            "larger than the resize_short 64 on both sides",
        ),
    ):
        config.DataLoader.Eval.Query.dataset.transform_ops = ops
        with pytest.raises(ConfigError, match=message):
            Preprocessing.from_config(config)
    short = [{"ResizeImage": {"resize_short": 64}}, {"CropImage": {"size": [72, 64]}}]
    config.DataLoader.Eval.Query.dataset.transform_ops = short  # landscape images fit
    assert Preprocessing.from_config(config).size == (72, 64)
    raw = [{"DecodeImage": {"to_rgb": True}}, resize]
    config.DataLoader.Eval.Query.dataset.transform_ops = raw
    image = exported["files"][0]
    expected = build_transforms(raw)(image.read_bytes()).numpy()
    actual = Preprocessing.from_config(config).load(image)
    assert expected.max() > 100 and np.abs(actual - expected).max() <= 1.0  # one grey level


def test_threads_loading_a_compact_export_at_once_each_get_the_onnx_model(
    exported, tmp_path, monkeypatch
):
    """torch's ONNX exporter keeps its state in globals: two first loads at once (a server's
    threads, say) failed with "AssertionError: GLOBALS.in_onnx_export must be True"."""
    monkeypatch.setenv("SHITU_CACHE_DIR", str(tmp_path / "cache"))
    weights = save_weights(exported["model"].state_dict(), tmp_path / "trained.safetensors")
    compact = export_model(exported["config"], weights, tmp_path / "compact", compact=True)
    with ThreadPoolExecutor(4) as pool:
        loaded = list(pool.map(lambda _: FeatureExtractor.load(compact), range(4)))
    assert [extractor.backend.name for extractor in loaded] == ["onnxruntime"] * 4


def test_compact_export_is_half_the_size_and_rebuilds_its_onnx_model_once(
    exported, tmp_path, monkeypatch
):
    monkeypatch.setenv("SHITU_CACHE_DIR", str(tmp_path / "cache"))
    full = exported["dir"]
    weights = save_weights(exported["model"].state_dict(), tmp_path / "trained.safetensors")
    compact = export_model(exported["config"], weights, tmp_path / "compact", compact=True)
    manifest = read_manifest(compact)
    assert sorted(p.name for p in compact.iterdir()) == ["model.safetensors", "shitu_model.json"]
    assert manifest["weights_dtype"] == "float16"
    size = (compact / "model.safetensors").stat().st_size
    assert size < 0.55 * (full / "model.safetensors").stat().st_size

    with pytest.raises(ConfigError, match="backend: unknown 'bogus'"):  # before any work
        FeatureExtractor.load(compact, backend="bogus")
    assert not (tmp_path / "cache").exists()
    fast = FeatureExtractor.load(compact)  # builds the ONNX model into the cache
    assert fast.backend.name == "onnxruntime"
    assert fast.fingerprint == manifest["fingerprint"]
    cached = list((tmp_path / "cache" / "exports").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.onnx").is_file()
    stamp = (cached[0] / "model.onnx").stat().st_mtime_ns
    torch_path = FeatureExtractor.load(compact, backend="torch")
    assert torch_path.fingerprint == manifest["fingerprint"]

    files = exported["files"]
    reference = FeatureExtractor.load(full).extract_files(files).features
    fp16 = fast.extract_files(files).features
    assert np.abs(fp16 - torch_path.extract_files(files).features).max() < 1e-4
    assert (fp16 * reference).sum(1).min() > 0.999  # float16 weights: tiny rounding only

    FeatureExtractor.load(compact)  # the second load reuses the cache
    assert (cached[0] / "model.onnx").stat().st_mtime_ns == stamp
    (cached[0] / "model.onnx").write_bytes(b"cut short")  # a damaged entry is built again
    again = FeatureExtractor.load(compact).extract_files(files).features
    assert np.abs(again - fp16).max() < 1e-6

    # A manifest edited by hand no longer matches what its weights and arch give: an
    # activation changed (other features), or the fingerprint itself.
    for name, edit in (("hardswish", ("arch", "hardswish")), ("edited", ("fingerprint", "f" * 64))):
        edited = shutil.copytree(compact, tmp_path / name)
        record = json.loads((edited / "shitu_model.json").read_text())
        if edit[0] == "arch":
            record["arch"]["Backbone"]["act"] = edit[1]
        else:
            record["fingerprint"] = edit[1]
        (edited / "shitu_model.json").write_text(json.dumps(record))
        for backend in ("auto", "torch"):
            with pytest.raises(CheckpointError, match="do not give the fingerprint"):
                FeatureExtractor.load(edited, backend=backend)
    assert len(list((tmp_path / "cache" / "exports").iterdir())) == 1  # nothing left behind

    # A cache that cannot be written (here a file in its place): the torch backend serves.
    (tmp_path / "not_a_folder").write_text("")
    monkeypatch.setenv("SHITU_CACHE_DIR", str(tmp_path / "not_a_folder" / "cache"))
    fallback = FeatureExtractor.load(compact)
    assert fallback.backend.name == "torch"
    assert fallback.fingerprint == manifest["fingerprint"]


def test_a_cache_entry_that_lost_its_manifest_or_is_a_file_is_built_again(
    exported, tmp_path, monkeypatch
):
    monkeypatch.setenv("SHITU_CACHE_DIR", str(tmp_path / "cache"))
    weights = save_weights(exported["model"].state_dict(), tmp_path / "trained.safetensors")
    compact = export_model(exported["config"], weights, tmp_path / "compact", compact=True)
    files = exported["files"][:2]
    expected = FeatureExtractor.load(compact, num_threads=1).extract_files(files).features
    (entry,) = (tmp_path / "cache" / "exports").iterdir()
    (entry / "shitu_model.json").unlink()  # e.g. a cache cleaner that removes by age
    rebuilt = FeatureExtractor.load(compact, num_threads=1)
    assert rebuilt.backend.name == "onnxruntime"
    assert np.abs(rebuilt.extract_files(files).features - expected).max() < 1e-6
    assert (entry / "shitu_model.json").is_file()
    shutil.rmtree(entry)
    entry.write_text("")  # a file in its place
    assert FeatureExtractor.load(compact, num_threads=1).backend.name == "onnxruntime"
    assert (entry / "model.onnx").is_file()


def test_loading_from_the_cache_removes_killed_builds_of_other_entries(
    exported, tmp_path, monkeypatch
):
    """A cache build killed outright leaves a model's worth of files, which only a later
    build of that same entry removed: loading any entry removes it, not a running build's."""
    monkeypatch.setenv("SHITU_CACHE_DIR", str(tmp_path / "cache"))
    compact = export_model(exported["config"], None, tmp_path / "compact", compact=True)
    FeatureExtractor.load(compact, num_threads=1)  # builds its entry
    exports = tmp_path / "cache" / "exports"
    (entry,) = exports.iterdir()
    killed = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from shitu.fileio import staging_folder\n"
        "with staging_folder(Path(sys.argv[1]), 'exporting') as staging:\n"
        "    staging.mkdir()\n"
        "    (staging / 'model.onnx').write_bytes(b'half a model')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    run = subprocess.run([sys.executable, "-c", killed, str(exports / "another")], check=False)
    assert run.returncode == -9
    assert len(list(exports.glob(".another.exporting-*"))) == 2  # its folder and lock
    with staging_folder(exports / "building", "exporting") as live:
        live.mkdir()
        assert FeatureExtractor.load(compact, num_threads=1).backend.name == "onnxruntime"
        left = sorted(path.name for path in exports.iterdir())
        assert left == sorted([entry.name, live.name, f"{live.name}.lock"])


def test_extract_cli_lists_a_file_name_that_is_not_utf8_as_the_file_system_has_it(
    exported, tmp_path
):
    from shitu.cli.main import main as shitu_main

    folder = tmp_path / "images"
    folder.mkdir()
    latin1 = folder / os.fsdecode(b"caf\xe9.jpg")  # a Latin-1 name, as old archives hold
    shutil.copy(exported["files"][0], latin1)
    shutil.copy(exported["files"][1], folder / "ok.jpg")
    prefix = tmp_path / "feats"
    args = ["extract", str(folder), "--model", str(exported["dir"]), "--out", str(prefix)]
    assert shitu_main([*args, "--threads", "1", "--no-progress"]) == 0
    listed = prefix.with_suffix(".txt").read_bytes().splitlines()
    assert listed == [os.fsencode(latin1), os.fsencode(folder / "ok.jpg")]
    assert Path(os.fsdecode(listed[0])).is_file()
    assert np.load(prefix.with_suffix(".npy")).shape == (2, 512)


def test_an_export_whose_path_is_not_utf8_is_refused_by_extract_naming_it(
    exported, latin1_folder, tmp_path
):
    """onnxruntime takes file paths only as UTF-8: an export in a folder named in Latin-1
    stopped `shitu extract --model` with a TypeError's traceback (exit 1)."""
    moved = shutil.copytree(exported["dir"], latin1_folder / "model")
    photo, out = str(exported["files"][0]), str(tmp_path / "feats")
    command = [sys.executable, "-m", "shitu", "extract", photo, "--model", str(moved)]
    result = subprocess.run([*command, "--out", out], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
    assert "model.onnx: the model file's path is not UTF-8 text" in result.stderr
    assert "rename the folder or file named in another encoding" in result.stderr


def test_weights_whose_path_is_not_utf8_are_refused_naming_the_path(
    exported, latin1_folder, tmp_path
):
    """safetensors takes file paths only as UTF-8: it said the file was not a readable
    safetensors file, of one that is fine, for an export's weights (torch runtime) and for
    Global.pretrained_model alike."""
    moved = shutil.copytree(exported["dir"], latin1_folder / "model")
    photo, out = str(exported["files"][0]), str(tmp_path / "feats")
    command = [sys.executable, "-m", "shitu", "extract", photo, "--model", str(moved),
               "--runtime", "torch", "--out", out]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
    assert "model.safetensors: the weight file's path is not UTF-8 text" in result.stderr
    assert "not a readable safetensors file" not in result.stderr
    with pytest.raises(CheckpointError, match="the weight file's path is not UTF-8 text"):
        read_weights(moved / "model.safetensors")


def test_export_to_a_path_that_is_not_utf8_is_refused_naming_it(
    exported, latin1_folder, grocery, tmp_path
):
    """torch's ONNX exporter takes file paths only as UTF-8: `shitu export --out` into a
    folder named in Latin-1 stopped with its traceback (exit 1)."""
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(TINY_CONFIG.format(size=SIZE, root=grocery))
    weights = f"Global.pretrained_model={exported['dir'] / 'model.safetensors'}"
    command = [sys.executable, "-m", "shitu", "export", "-c", str(config_file), "-o", weights]
    result = subprocess.run(
        [*command, "--out", str(latin1_folder / "model")], capture_output=True, text=True
    )
    assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
    assert "model: the export folder's path is not UTF-8 text" in result.stderr
    assert not any(latin1_folder.iterdir())  # nor a staging folder


def test_export_to_a_link_to_a_path_that_is_not_utf8_is_refused_naming_it(
    exported, latin1_folder, tmp_path
):
    """The link is followed, so the folder it points to is checked, not the link's name."""
    (tmp_path / "link").symlink_to(latin1_folder / "model")
    with pytest.raises(
        export_module.ExportError, match="model: the export folder's path is not UTF-8 text"
    ):
        export_model(exported["config"], None, tmp_path / "link")
    assert not any(latin1_folder.iterdir())  # nor a staging folder


def test_a_compact_export_on_an_onnx_runtime_asked_for_names_the_cache_it_cannot_write(
    exported, tmp_path, monkeypatch
):
    """Not a warning that the torch backend serves followed by 'model.onnx: missing from
    the export (re-run `shitu export`)', which the shipped model gave."""
    (tmp_path / "not_a_folder").write_text("")
    monkeypatch.setenv("SHITU_CACHE_DIR", str(tmp_path / "not_a_folder" / "cache"))
    weights = save_weights(exported["model"].state_dict(), tmp_path / "trained.safetensors")
    compact = export_model(exported["config"], weights, tmp_path / "compact", compact=True)
    for backend in ("onnxruntime", "openvino"):
        with pytest.raises(
            ConfigError,
            match=rf"^backend {backend}: cannot build the ONNX model of {compact} into the "
            r"cache \(.*SHITU_CACHE_DIR names another cache folder\), or use the torch",
        ):
            FeatureExtractor.load(compact, backend=backend)
    assert FeatureExtractor.load(compact).backend.name == "torch"  # auto: torch serves


def test_files_decode_to_the_pixels_of_opencvs_bgr_decoding_reversed(grocery):
    """`read_rgb` has OpenCV decode straight to RGB (no second pass over the photo): the
    pixels must be those of its BGR decoding with the channels swapped, for every kind of
    file a photo library holds that OpenCV decodes (grey, palette, 16-bit, EXIF-rotated
    included; CMYK JPEGs go to Pillow, as training reads them)."""
    photo = np.asarray(Image.open(grocery_files(grocery, 1)[0]).convert("RGB"))
    encoded = {path.name: path.read_bytes() for path in grocery_files(grocery, 4)}

    def saved(image: Image.Image, file_format: str, **options: object) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=file_format, **options)
        return buffer.getvalue()

    rgb = Image.fromarray(photo)
    encoded |= {
        f"{file_format} {mode}": saved(rgb.convert(mode), file_format)
        for file_format, modes in (
            ("JPEG", ("RGB", "L")),
            ("PNG", ("RGB", "L", "P", "I;16")),
            ("BMP", ("RGB",)),
            ("TIFF", ("RGB",)),
            ("WEBP", ("RGB",)),
        )
        for mode in modes
    }
    encoded["progressive JPEG"] = saved(rgb, "JPEG", progressive=True)
    for orientation in range(2, 9):
        exif = rgb.getexif()
        exif[0x0112] = orientation
        encoded[f"JPEG orientation {orientation}"] = saved(rgb, "JPEG", exif=exif.tobytes())
    for name, data in encoded.items():
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert np.array_equal(decode_rgb(data), bgr[:, :, ::-1]), name


def test_the_shipped_model_exported_again_keeps_its_fingerprint(tmp_path):
    """The int8 recipe of docs/commands.md exports the shipped weights again: their float32 features
    are the shipped model's, so a library built with it must stay valid for the new export
    (a config key read since, at its default, must not change the recorded arch)."""
    shipped = default_model_dir()
    config = load_config("GroceryStore_EfficientNetLite0")
    out = export_model(config, shipped / "model.safetensors", tmp_path / "again", compact=True)
    assert read_manifest(out)["fingerprint"] == read_manifest(shipped)["fingerprint"]


def test_a_damaged_shipped_model_says_to_reinstall_shitu(tmp_path, monkeypatch):
    """The shipped model's weights cut short or deleted (a broken install) said "re-run
    `shitu export`", which never made that folder: reinstalling shitu restores it."""
    shipped = shutil.copytree(default_model_dir(), tmp_path / "default_model")
    monkeypatch.setattr(default_model_module, "DEFAULT_MODEL_DIR", shipped)
    weights = shipped / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"does not match .*reinstall shitu\)$"):
        FeatureExtractor.load(default_model_dir())
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"missing from the export \(.*reinstall shitu\)$"):
        FeatureExtractor.load(default_model_dir())


def test_int8_asked_of_the_shipped_model_gives_the_command_that_makes_it(tmp_path):
    """The shipped model ships without an int8 file; `--precision int8` said only `shitu
    export ... --int8-calibration IMAGES`, and the user has neither the config nor the
    weights' path that export needs. The command it gives now works as it stands."""
    with pytest.raises(ConfigError) as refused:
        FeatureExtractor.load(default_model_dir(), precision="int8")
    command = re.search(r"`(shitu export [^`]+)`", str(refused.value)).group(1)
    photos = tmp_path / "YOUR_PHOTOS"
    photos.mkdir()
    for shade in range(4):
        Image.new("RGB", (64, 48), (60 * shade, 100, 200 - 40 * shade)).save(
            photos / f"{shade}.png"
        )
    words = shlex.split(command)
    assert words[:2] == ["shitu", "export"]
    made = subprocess.run([sys.executable, "-m", "shitu", *words[1:]], cwd=tmp_path,
                          capture_output=True, text=True)  # fmt: skip
    assert made.returncode == 0, made.stderr
    exported = FeatureExtractor.load(tmp_path / "default_int8", precision="int8", num_threads=1)
    shipped = read_manifest(default_model_dir())
    assert exported.score_thres == shipped["score_thres"]
    assert read_manifest(tmp_path / "default_int8")["fingerprint"] == shipped["fingerprint"]


def test_int8_asked_of_the_torch_runtime_is_refused_as_such_before_the_int8_file():
    """`--runtime torch --precision int8` on an export without an int8 file said to make
    one; made, the next run refused torch for int8 anyway. It says that now."""
    for runtime in ("torch", "auto"):  # auto still asks for the missing file
        expected = "onnxruntime or openvino, not torch" if runtime == "torch" else "has no model"
        with pytest.raises(ConfigError, match=expected):
            FeatureExtractor.load(default_model_dir(), runtime, precision="int8")


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="counts the cores it may use")
def test_more_inference_threads_than_cores_are_warned_of(caplog):
    """PaddleClas's inference_general.yaml sets cpu_num_threads: 10; on fewer cores the
    extra threads slowed recognition down (2.4x at 8 threads on 2 cores) without a word."""
    cores = len(os.sched_getaffinity(0))
    with caplog.at_level(logging.WARNING, logger="shitu.inference.extractor"):
        FeatureExtractor.load(default_model_dir(), num_threads=cores).close()
        assert caplog.records == []
        FeatureExtractor.load(default_model_dir(), num_threads=cores + 1).close()
    assert [record.getMessage() for record in caplog.records] == [
        f"{cores + 1} inference threads asked for, on {cores} CPU cores: the extra threads "
        f"wait for a core, which slows inference; give at most {cores} with --threads (a "
        "pipeline config's Global.cpu_num_threads), or none for the runtime's default"
    ]


def test_a_disk_full_as_the_onnx_model_is_written_names_the_export(exported, tmp_path, monkeypatch):
    """torch's ONNX writer names no file: `shitu export` (and the cache's rebuild of a
    compact export) said only "[Errno 28] No space left on device"."""

    def disk_fills(model, inputs, path, **options):  # as a full disk refuses the write
        Path(path).write_bytes(b"\x08")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(export_module, "trace_to_onnx", disk_fills)
    out = tmp_path / "model"
    with pytest.raises(
        export_module.ExportError,
        match=rf"^cannot write the export to {out}: No space left on device$",
    ):
        export_model(exported["config"], None, out)
    assert list(tmp_path.iterdir()) == []  # nor a temporary folder


def test_a_cache_folder_given_with_a_leading_tilde_is_in_the_home_folder(
    exported, tmp_path, monkeypatch
):
    """As a Dockerfile's ENV or a systemd unit leaves it: not a folder named ~ made in the
    current one."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    weights = exported["dir"] / "model.safetensors"
    compact = export_model(exported["config"], weights, tmp_path / "compact", compact=True)
    for variable, value in (("SHITU_CACHE_DIR", "~/shitu"), ("XDG_CACHE_HOME", "~/.xdg")):
        monkeypatch.delenv("SHITU_CACHE_DIR", raising=False)
        monkeypatch.setenv(variable, value)
        assert FeatureExtractor.load(compact).backend.name == "onnxruntime"
    home = tmp_path / "home"
    assert len(list((home / "shitu" / "exports").iterdir())) == 1
    assert len(list((home / ".xdg" / "shitu" / "exports").iterdir())) == 1
    assert not (tmp_path / "~").exists()


def test_int8_asked_of_a_compact_export_says_to_export_it_without_compact(exported, tmp_path):
    """Following the advice as given, the same export command with --int8-calibration
    added, was refused in turn: --compact and the calibration go not together."""
    compact = export_model(exported["config"], None, tmp_path / "compact", compact=True)
    with pytest.raises(ConfigError, match=r"--int8-calibration IMAGES` without --compact"):
        FeatureExtractor.load(compact, precision="int8")
    plain = export_model(exported["config"], None, tmp_path / "plain")
    with pytest.raises(ConfigError, match=r"--int8-calibration IMAGES` \(docs/commands.md: int8\)"):
        FeatureExtractor.load(plain, precision="int8")


def test_file_names_inference_looks_for_are_those_their_writers_use() -> None:
    """shitu.inference names a training run's weights and a library's database without
    importing the engine or the index, so it keeps its own copies of their file names: a
    rename on one side would silently stop `--model RUN_DIR` or `--model LIBRARY`."""
    from shitu.engine.state import BEST, FINAL
    from shitu.index.metadata import LIBRARY_FILE
    from shitu.inference.manifest import LIBRARY_DATABASE, TRAINING_RUN_WEIGHTS

    assert (f"{BEST}.safetensors", f"{FINAL}.safetensors") == TRAINING_RUN_WEIGHTS
    assert LIBRARY_DATABASE == LIBRARY_FILE


def test_reading_and_decoding_name_what_to_pass_for_the_other_kind_of_input(tmp_path):
    """`decode_rgb` takes bytes and `read_rgb` a path: each given the other's input (or an
    open file, or a number, which bytes() took as a count of zero bytes) says what to pass,
    not a TypeError about encodings or integers."""
    photo = tmp_path / "photo.png"
    Image.new("RGB", (8, 8), "red").save(photo)
    data = photo.read_bytes()
    assert decode_rgb(bytearray(data)).shape == decode_rgb(memoryview(data)).shape == (8, 8, 3)
    with photo.open("rb") as handle:
        for given, hint in (
            (str(photo), r"got str \(a path: shitu.inference.read_rgb\(path\)"),
            (photo, r"got PosixPath \(a path: shitu.inference.read_rgb\(path\)"),
            (handle, r"got BufferedReader \(an open file: decode_rgb\(file.read\(\)\)\)"),
            (8, r"got int$"),
        ):
            with pytest.raises(
                UnreadableImageError, match=rf"^expected an encoded image's .*{hint}"
            ):
                decode_rgb(given)
    with pytest.raises(UnreadableImageError, match=r"got bytes \(an encoded image: .*decode_rgb"):
        read_rgb(data)


def test_read_rgb_names_what_it_was_given_instead_of_a_path(tmp_path):
    """Anything but a path failed inside pathlib ('expected str, bytes or os.PathLike
    object, not JpegImageFile'), and '' read the current folder ('Is a directory')."""
    photo = tmp_path / "photo.png"
    Image.new("RGB", (8, 8), "red").save(photo)
    with photo.open("rb") as handle, Image.open(photo) as image:
        for given, got in (
            (handle, "BufferedReader (an open file: shitu.inference.decode_rgb(file.read())"),
            (image, "PngImageFile (a Pillow image: np.asarray(image.convert('RGB'))"),
            (np.zeros((8, 8, 3), np.uint8), "ndarray (an array is an image already read)"),
            (None, "NoneType"),
            ("", "an empty path"),
        ):
            with pytest.raises(UnreadableImageError) as caught:
                read_rgb(given)
            assert str(caught.value).startswith(f"expected an image file's path, got {got}")
    assert read_rgb(str(photo)).shape == (8, 8, 3)


def test_a_file_read_rgb_refuses_is_named_in_a_note_not_in_the_reason(tmp_path):
    """From Python, "UnreadableImageError: No such file or directory" named no file; the
    message stays the reason, which the commands and `failures` give beside the path."""
    missing, text = tmp_path / "missing.jpg", tmp_path / "notes.jpg"
    text.write_text("not an image")
    for path, reason in ((missing, "No such file or directory"), (text, "cannot decode image")):
        with pytest.raises(UnreadableImageError) as caught:
            read_rgb(path)
        assert str(caught.value).startswith(reason) and str(path) not in str(caught.value)
        assert caught.value.__notes__ == [f"read_rgb({str(path)!r})"]


def test_loading_a_model_from_no_path_names_the_argument():
    """None (an unset setting) failed inside pathlib, and '' looked in the current folder."""
    for given in (None, "", 3):
        with pytest.raises(CheckpointError) as caught:
            FeatureExtractor.load(given)
        assert str(caught.value) == (
            "model_dir: expected an exported model's folder "
            f"(shitu.inference.default_model_dir() is the shipped one), got {given!r}"
        )


def test_building_a_cache_entry_removes_those_unused_for_30_days(exported, tmp_path, monkeypatch):
    """Each compact model loaded keeps a model's worth of files in the cache (the shipped
    model of each release among them), which nothing removed: a build removes the entries
    no load has used for UNUSED_DAYS; a load marks its entry used."""
    monkeypatch.setenv("SHITU_CACHE_DIR", str(tmp_path / "cache"))
    weights = save_weights(exported["model"].state_dict(), tmp_path / "trained.safetensors")
    compacts = [
        export_model(exported["config"], given, tmp_path / name, compact=True)
        for name, given in (("old", None), ("recent", weights))
    ]
    exports = tmp_path / "cache" / "exports"
    entries = []
    for compact in compacts:
        FeatureExtractor.load(compact, num_threads=1)
        entries.append(next(e for e in exports.iterdir() if e not in entries))
    entries.append(shutil.copytree(entries[0], exports / "used_29_days_ago"))

    def last_used(entry: Path, days: int) -> None:
        stamp = time.time() - days * 86_400
        os.utime(entry / "shitu_model.json", (stamp, stamp))

    last_used(entries[0], 31)
    last_used(entries[2], 29)
    FeatureExtractor.load(compacts[0], num_threads=1)  # a use: it is not unused any more
    assert time.time() - (entries[0] / "shitu_model.json").stat().st_mtime < 3600
    last_used(entries[0], 31)
    (entries[1] / "model.onnx").write_bytes(b"cut short")  # built again: removes the unused
    assert FeatureExtractor.load(compacts[1], num_threads=1).backend.name == "onnxruntime"
    assert sorted(exports.iterdir()) == sorted(entries[1:])
