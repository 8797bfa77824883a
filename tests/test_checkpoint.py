"""Weight files: safetensors/torch round trips, .pdparams import rules, and clear errors."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import shutil
import signal
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open

from shitu.checkpoint import (
    average_weights,
    interpolate_toward,
    load_pretrained,
    load_weights,
    model_metadata,
    read_pdparams,
    read_weights,
    save_weights,
)
from shitu.checkpoint.io import fit_hint
from shitu.config import load_config
from shitu.config.schema import ArchConfig
from shitu.detection import build_picodet
from shitu.detection.export import export_onnx
from shitu.detection.weights import paddle_key, save_detector
from shitu.engine.state import Progress, load_training_state, save_training_state
from shitu.errors import CheckpointError
from shitu.models import build_model
from shitu.registry import BACKBONES, populate

from .test_cli import run_shitu
from .test_detection_train import _trainer, _write_coco, _write_images
from .test_models import randomise_batchnorm

populate()

ARCH = {
    "Backbone": {"name": "PPLCNetV2_small_ShiTu", "class_expand": 64},
    "BackboneStopLayer": {"name": "flatten"},
    "Neck": {"name": "BNNeck", "num_features": 64},
    "Head": {"name": "ArcMargin", "embedding_size": 64, "class_num": 7},
}


def make_model(arch=ARCH, seed=0):
    torch.manual_seed(seed)
    model = build_model(ArchConfig.model_validate(arch))
    randomise_batchnorm(model, seed)
    return model.eval()


def to_pdparams(model: torch.nn.Module, path, protocol: int = 4) -> dict:
    """Write `model` the way Paddle would: renamed BN stats and PReLU weights (`_weight`),
    transposed Linear/margin weights, the unused fused conv of unfolded rep blocks and the
    unused activation of the others, and Paddle's structure entry, pickled with `protocol`
    (4 as `paddle.save` writes by default, 2 as Paddle 1.x's `save_dygraph` wrote)."""
    transposed = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    transposed |= {
        f"{n}.weight" for n, m in model.named_modules() if hasattr(m, "paddle_transposed_params")
    }
    prelu = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.PReLU)}
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        array = tensor.numpy()
        if name in transposed:
            array = array.T.copy()
        if name in prelu:
            name = name.removesuffix("weight") + "_weight"
        name = name.replace("running_mean", "_mean").replace("running_var", "_variance")
        state[name] = array
    for name, module in model.named_modules():
        if getattr(module, "use_rep", False):
            c, k = module.in_channels, module.dw_size
            state[f"{name}.dw_conv.weight"] = np.zeros((c, 1, k, k), np.float32)
            state[f"{name}.dw_conv.bias"] = np.zeros((c,), np.float32)
        elif getattr(module, "use_rep", True) is False and prelu:  # built, used by no branch
            state[f"{name}.act._weight"] = np.full((1,), 0.25, np.float32)
    state["StructuredToParameterName@@"] = {"a": "b"}
    with open(path, "wb") as handle:
        pickle.dump(state, handle, protocol=protocol)
    return state


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip(tmp_path, suffix):
    model = make_model()
    path = save_weights(model.state_dict(), tmp_path / f"m{suffix}", model_metadata(model))
    fresh = make_model(seed=1)
    load_weights(fresh, path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x)["features"], fresh(x)["features"])
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_a_weight_file_named_without_its_suffix_is_found(tmp_path):
    """As PaddleClas names them (`-o Global.pretrained_model=output/RecModel/best_model`):
    .pdparams as well as what shitu writes."""
    model = make_model()
    save_weights(model.state_dict(), tmp_path / "best_model.safetensors")
    to_pdparams(model, tmp_path / "paddle_model.pdparams")
    x = torch.randn(2, 3, 64, 64)
    for stem in ("best_model", "paddle_model"):
        fresh = make_model(seed=1)
        load_weights(fresh, tmp_path / stem)
        with torch.no_grad():
            assert torch.equal(model(x)["features"], fresh(x)["features"])
    with pytest.raises(CheckpointError) as info:
        load_weights(make_model(), tmp_path / "other_model")
    tried = "(nor with .safetensors, .pt, .pth, .pdparams)"
    # The folder holds a best_model, as a training run's does: the message names it.
    beside = (
        f"{tmp_path} is a training run's folder: give its weights, "
        f"{tmp_path / 'best_model.safetensors'} (the best evaluated epoch's)"
    )
    assert str(info.value) == f"weight file not found: {tmp_path / 'other_model'} {tried}; {beside}"


def test_folded_checkpoint_folds_the_model_on_load(tmp_path):
    model = make_model().reparameterize()
    path = save_weights(
        model.state_dict(), tmp_path / "folded.safetensors", model_metadata(model, {"a": 1})
    )
    assert read_weights(path)[1]["shitu.reparameterized"] == "true"
    fresh = make_model(seed=3)
    load_weights(fresh, path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x)["features"], fresh(x)["features"])


@pytest.mark.parametrize("protocol", [2, 4])
def test_pdparams_import_maps_names_transposes_and_skips_unused(tmp_path, protocol):
    model = make_model()
    to_pdparams(model, tmp_path / "m.pdparams", protocol)
    fresh = make_model(seed=5)
    report = load_weights(fresh, tmp_path / "m.pdparams")
    assert report.dropped and all(".dw_conv." in name for name in report.dropped)
    assert not report.missing and not report.unexpected
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = model(x), fresh(x)
    assert torch.equal(ours["features"], theirs["features"])
    assert torch.equal(ours["logits"], theirs["logits"])


def _prelu_model() -> tuple[dict, torch.nn.Module]:
    """The test architecture with `act: prelu`, and a model of it whose PReLU weights are
    not their initial value, so that a load that leaves them there shows."""
    arch = {**ARCH, "Backbone": {**ARCH["Backbone"], "act": "prelu"}}
    model = make_model(arch)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.PReLU):
                module.weight.uniform_(0.05, 0.5)
    return arch, model


def test_pdparams_of_a_prelu_model_load_as_paddleclas_names_them(tmp_path):
    """PaddleClas's PP-LCNetV2 with `act: prelu` names each PReLU's weight `_weight` and
    builds one, unused, in every block without rep branches: its .pdparams did not fit
    (27 missing, 32 not in model). They load now, and give the model's features (against
    PaddleClas 2.6 itself: within 4e-6)."""
    arch, model = _prelu_model()
    state = to_pdparams(model, tmp_path / "prelu.pdparams")
    assert "backbone.stem.1.act._weight" in state  # a block without branches
    fresh = make_model(arch, seed=1)
    report = load_weights(fresh, tmp_path / "prelu.pdparams")
    assert "backbone.stem.1.act._weight" in report.dropped
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x)["features"], fresh(x)["features"])


def test_a_whole_models_pdparams_as_the_backbones_pretrained_maps_as_the_whole_models(tmp_path):
    """PP-ShiTuV2's .pdparams given as Arch.Backbone.pretrained: its names were mapped by
    the backbone's own (`stem.0.`, not `backbone.stem.0.`), so the rules keyed by names
    missed: PReLU weights were left at their initial value (logged only), and the unused
    fused convs were reported as tensors the backbone lacks."""
    arch, model = _prelu_model()
    to_pdparams(model, tmp_path / "general_PPLCNetV2_small.pdparams")
    backbone = make_model(arch, seed=1).backbone
    report = load_pretrained(backbone, tmp_path / "general_PPLCNetV2_small.pdparams")
    assert report.complete, report.summary()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.backbone(x), backbone(x))


def test_pdparams_of_bfloat16_weights_load_as_their_values(tmp_path):
    """Paddle saves bfloat16 as uint16 bit patterns, as a bf16 AMP O2 run's weights are:
    they loaded as numbers (weights near 16,000), a model giving nonsense without an error."""
    model = make_model()
    with torch.no_grad():  # the values bfloat16 can hold, so both sides compute alike
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.bfloat16())
    state = to_pdparams(model, tmp_path / "m.pdparams")
    bf16 = {
        name: torch.from_numpy(array).bfloat16().view(torch.int16).numpy().view(np.uint16)
        if isinstance(array, np.ndarray) and array.dtype == np.float32
        else array
        for name, array in state.items()
    }
    with open(tmp_path / "m.pdparams", "wb") as handle:
        pickle.dump(bf16, handle, protocol=4)
    fresh = make_model(seed=5)
    load_weights(fresh, tmp_path / "m.pdparams")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x)["features"], model(x)["features"])


def test_weights_named_without_pdparams_as_paddleclas_configs_name_them(tmp_path):
    """`Global.pretrained_model: output/best_model` reads best_model.pdparams, as in
    PaddleClas; a name that is neither is still not found."""
    model = make_model()
    to_pdparams(model, tmp_path / "best_model.pdparams")
    fresh = make_model(seed=5)
    load_weights(fresh, tmp_path / "best_model")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x)["features"], fresh(x)["features"])
    with pytest.raises(CheckpointError, match=r"^weight file not found: .*/other \(nor with"):
        load_weights(fresh, tmp_path / "other")


def test_pdparams_mismatch_is_a_clear_error(tmp_path):
    to_pdparams(make_model(), tmp_path / "m.pdparams")
    other = {**ARCH, "Head": {"name": "ArcMargin", "embedding_size": 64, "class_num": 9}}
    with pytest.raises(
        CheckpointError,
        match=r"m.pdparams does not fit the model: .*1 shape mismatch \(head.weight \(7, 64\) vs \(9, 64\)\)",
    ):
        load_weights(make_model(other), tmp_path / "m.pdparams")
    no_head = {k: v for k, v in ARCH.items() if k != "Head"}
    with pytest.raises(CheckpointError, match="1 not in model .head.weight"):
        load_weights(make_model(no_head), tmp_path / "m.pdparams")
    report = load_weights(make_model(no_head), tmp_path / "m.pdparams", ignore_prefixes=("head.",))
    assert "head.weight" in report.dropped


def test_a_backbones_weights_given_for_the_whole_model_say_where_they_go(tmp_path):
    """PaddleClas's ImageNet .pdparams (PPLCNetV2_base_pretrained) hold a backbone alone:
    `shitu convert` of one listed every tensor as missing and unexpected and asked whether
    the config matched. It says to give the file as the backbone's starting weights."""
    model = make_model()
    path = tmp_path / "PPLCNetV2_small_pretrained.pdparams"
    to_pdparams(model.backbone, path)
    with pytest.raises(CheckpointError, match=rf"backbone alone.*Arch.Backbone.pretrained={path}"):
        load_weights(make_model(seed=1), path)
    assert load_pretrained(make_model(seed=1).backbone, path).complete  # where it goes
    to_pdparams(BACKBONES.build("ResNet18"), tmp_path / "resnet.pdparams")  # not this one's
    with pytest.raises(CheckpointError, match=r"\(does the config match\?\)$"):
        load_weights(make_model(), tmp_path / "resnet.pdparams")


def test_a_file_whose_head_scores_other_classes_names_its_class_count(tmp_path):
    """A PaddleClas run on its own classes converted with the recipe (192,612 classes) was
    asked whether the config matched: it does, but for the class count, which is said."""
    to_pdparams(make_model(), tmp_path / "m.pdparams")
    other = {**ARCH, "Head": {"name": "ArcMargin", "embedding_size": 64, "class_num": 9}}
    with pytest.raises(CheckpointError) as refused:
        load_weights(make_model(other), tmp_path / "m.pdparams")
    assert str(refused.value).endswith(
        "(only the classifier differs: the file's scores 7 classes; features need none, so "
        "leave the head out with --no-head or -o Arch.Head=null, or build it as the file's, "
        "-o Arch.Head.class_num=7)"
    )
    wider = {**ARCH, "Head": {"name": "ArcMargin", "embedding_size": 32, "class_num": 7}}
    wider["Neck"] = {"name": "FC", "embedding_size": 64, "class_num": 32}
    with pytest.raises(CheckpointError, match=r"\(does the config match\?\)$"):  # not classes
        load_weights(make_model(wider), tmp_path / "m.pdparams")


def test_tensors_that_do_not_fit_are_named_by_weights_before_batch_norm_counters(tmp_path):
    """safetensors files list int64 tensors first: the examples of those not in the model
    were batch norms' num_batches_tracked, which say least about what the file holds."""
    path = save_weights(make_model().state_dict(), tmp_path / "m.safetensors")
    lite = {"name": "EfficientNetLite0", "class_num": 64}
    other = {**ARCH, "Backbone": lite, "BackboneStopLayer": {"name": "fc"}}
    with pytest.raises(CheckpointError) as refused:
        load_weights(make_model(other), path)
    examples = re.search(r"not in model \(([^)]+)\)", str(refused.value)).group(1)
    assert "num_batches_tracked" not in examples, examples


def test_pdparams_reader_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pdparams"
    path.write_bytes(pickle.dumps({"w": Evil()}))
    with pytest.raises(CheckpointError, match="refusing to load posix.system"):
        read_pdparams(path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.pdparams", b"not a pickle", "is not a readable .pdparams file"),
        ("list.pdparams", pickle.dumps([1, 2]), "is not a .pdparams state dict"),
        (  # was torch's TypeError ("can't convert np.ndarray of type numpy.object_")
            "objects.pdparams",
            pickle.dumps({"w": np.array([{"a": 1}], dtype=object)}),
            "entry 'w' is an array of object, not of numbers",
        ),
        # corrupt lengths: a frame past the maximum, bytes past memory (both were tracebacks)
        ("frame.pdparams", b"\x80\x04\x95" + (2**63).to_bytes(8, "little"), "FRAME length"),
        ("huge.pdparams", b"\x80\x04\x8e" + (2**62).to_bytes(8, "little"), "corrupt length"),
        ("bad.safetensors", b"\x00" * 16, "is not a readable safetensors file"),
        ("bad.pt", b"garbage", "is not a readable torch checkpoint"),
        ("weights.bin", b"", "unsupported weight file"),
    ],
)
def test_corrupt_weight_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_weights(make_model(), path)


def test_an_empty_or_foreign_torch_file_is_named_as_what_it_is(tmp_path):
    """torch's unpickler said nothing ("zero.pt is not a readable torch checkpoint: ") of an
    empty file and "101" (a KeyError) of one that is not a torch file."""
    empty, foreign = tmp_path / "zero.pt", tmp_path / "notes.pth"
    empty.write_bytes(b"")
    foreign.write_bytes(b"hello world")
    with pytest.raises(CheckpointError) as refused:
        load_weights(make_model(), empty)
    assert str(refused.value) == (
        f"{empty} is empty (0 bytes), not a torch checkpoint (a save that never finished?)"
    )
    with pytest.raises(CheckpointError) as refused:
        load_weights(make_model(), foreign)
    assert str(refused.value) == (
        f"{foreign} is not a readable torch checkpoint: cut short, or not a torch file "
        "(neither a torch.save zip archive nor a legacy pickle)"
    )


def test_a_pickle_torch_cannot_read_is_named_without_torchs_advice_to_run_it(tmp_path):
    """A .pdparams named .pth, or a state dict pickled by pickle.dump (protocol 4), got
    torch's refusal, which advises re-running torch.load with weights_only=False: loading
    the file as code, which shitu never does. Each says what the file is and what to do."""
    renamed = tmp_path / "PPLCNetV2_small_pretrained.pth"
    to_pdparams(make_model(), renamed)
    with pytest.raises(CheckpointError) as refused:
        load_weights(make_model(), renamed)
    assert str(refused.value) == (
        f"{renamed} is no torch checkpoint but a pickle of numpy arrays, as PaddlePaddle's "
        ".pdparams are: name it PPLCNetV2_small_pretrained.pdparams"
    )
    pickled = tmp_path / "state.pt"
    pickled.write_bytes(pickle.dumps(dict(make_model().state_dict()), protocol=4))
    with pytest.raises(CheckpointError) as refused, warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load_weights(make_model(), pickled)
    assert not seen, seen[0].message  # torch's on the pickle protocol, with its source line
    message = str(refused.value)
    assert message.startswith(f"{pickled} is not a readable torch checkpoint: a pickle")
    assert "weights_only" not in message and "\n" not in message


def test_a_paddle_inference_models_file_given_as_weights_says_what_to_give(tmp_path):
    """PP-ShiTuV2 is downloaded as an inference model: `shitu convert inference.pdiparams`
    said only that the suffix is none of the supported ones (its folder was named as a
    Paddle inference model already)."""
    folder = tmp_path / "general_PPLCNetV2_base_pretrained_v1.0_infer"
    folder.mkdir()
    for name in ("inference.pdmodel", "inference.pdiparams"):
        (folder / name).write_bytes(b"\0")
        with pytest.raises(CheckpointError) as refused:
            load_weights(make_model(), folder / name)
        assert str(refused.value).endswith(
            "(a file of a Paddle inference model, whose weights shitu does not read: give the "
            "PaddleClas weights (.pdparams) it was exported from)"
        )


def test_a_url_given_for_weights_is_named_as_one():
    """PaddleClas downloads a URL given as Global.pretrained_model; shitu looked for it as
    a local file: "weight file not found: https:/host/..." (one slash lost), relative to the
    working directory."""
    url = "https://paddle-imagenet-models-name.bj.bcebos.com/v1/PPLCNetV2_base.pdparams"
    refusal = (
        f"{url} is a URL, and shitu downloads no weights: download the file (e.g. `curl -LO "
        f"{url}`) and give its path"
    )
    with pytest.raises(CheckpointError) as refused:
        load_weights(make_model(), url)
    assert str(refused.value) == refusal
    result = run_shitu("info", "-c", "GroceryStore_EfficientNetLite0", "-o",
                       f"Arch.Backbone.pretrained={url}")  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == f"error: Arch.Backbone.pretrained: {refusal}\n"


def test_a_backbone_pretrained_true_is_refused_naming_the_setting_once():
    """It said "Arch.Backbone.pretrained: pretrained: True would download ..."."""
    arch = dict(ARCH, Backbone=dict(ARCH["Backbone"], pretrained=True))
    with pytest.raises(CheckpointError) as refused:
        build_model(ArchConfig.model_validate(arch))
    assert str(refused.value) == (
        "Arch.Backbone.pretrained: True would download weights, which shitu never does; give "
        "the path of a .safetensors, .pt/.pth or .pdparams file"
    )


def test_weights_saved_from_a_ddp_wrapped_model_load(tmp_path):
    """Another trainer's `torch.save(ddp_model.state_dict())` prefixes every name with the
    wrapper's `module.`: those load as the model's own names."""
    model = make_model(seed=1)
    path = tmp_path / "ddp.pth"
    torch.save({f"module.{name}": tensor for name, tensor in model.state_dict().items()}, path)
    report = load_weights(make_model(seed=2), path)
    assert report.complete
    state = read_weights(path)[0]
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())


def test_a_pickled_whole_model_is_refused_in_one_line_saying_what_to_save(tmp_path):
    """`torch.save(model, ...)` pickles the model's classes: torch's refusal runs to pages
    (with terminal colours) and advises loading the file as code."""
    path = tmp_path / "whole.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(CheckpointError) as caught:
        read_weights(path)
    assert str(caught.value) == (
        f"{path} holds pickled Python objects (torch.nn.modules.linear.Linear), not only "
        "tensors, and shitu never runs a file's code to read it; save the weights alone: "
        "torch.save(model.state_dict(), PATH)"
    )


def test_missing_weight_file(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="weight file not found"):
        load_weights(make_model(), tmp_path / "none.safetensors")
    # A relative name (`-o Global.pretrained_model=output/run/best_model` run from another
    # folder) says where it was looked for, .pdparams as the others.
    monkeypatch.chdir(tmp_path)
    where = f"(relative paths are taken from the working directory, {tmp_path})"
    for name, tried in (
        ("output/best_model", " (nor with .safetensors, .pt, .pth, .pdparams)"),
        ("output/best_model.pdparams", ""),
    ):
        with pytest.raises(CheckpointError) as info:
            load_weights(make_model(), name)
        assert str(info.value) == f"weight file not found: {name}{tried} {where}"


def test_detector_training_checkpoint_is_not_recognition_weights(tmp_path):
    """A detect-train latest.pt is named as such, not averaged into a soup nothing loads."""
    _write_coco(tmp_path, _write_images(tmp_path, 2, size=64))
    latest = _trainer(tmp_path, epochs=1, learning_rate=0.01).save()
    out = tmp_path / "soup.pt"
    result = run_shitu("average", str(latest), str(latest), "--out", str(out))
    assert result.returncode == 2, result.stdout
    assert "is a detector training checkpoint (for `shitu detect-train --resume`)" in result.stderr
    assert not out.exists()


def test_a_paddledetection_picodet_pdparams_is_not_recognition_weights(tmp_path):
    """PaddleDetection's PicoDet .pdparams given as a recogniser's weights (`shitu convert`,
    --weights, pretrained) was listed tensor by tensor, asking whether the config matched."""
    detector = build_picodet("picodet_s_esnet", num_classes=3, input_size=64)
    path = tmp_path / "picodet_s_416_coco.pdparams"
    with path.open("wb") as handle:
        pickle.dump(
            {
                paddle_key(key, detector.arch): value.numpy()
                for key, value in detector.state_dict().items()
                if not key.endswith("num_batches_tracked")
            },
            handle,
        )
    refused = r"holds a PaddleDetection PicoDet detector, not the weights of a recognition model"
    with pytest.raises(CheckpointError, match=refused):
        load_weights(make_model(), path)
    with pytest.raises(CheckpointError, match=refused):
        load_pretrained(make_model().backbone, path)


def test_info_no_head_loads_a_checkpoint_with_a_head(tmp_path):
    """`shitu info --no-head --weights best_model.safetensors` leaves the head's tensors out,
    as `shitu convert --no-head` does, instead of refusing them as not in the model."""
    model = make_model()
    weights = save_weights(model.state_dict(), tmp_path / "best_model.safetensors")
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps({"Arch": ARCH, "Global": {"image_shape": [3, 64, 64]}}))
    result = run_shitu("info", "-c", str(config), "--no-head", "--weights", str(weights),
                       "--batch-size", "1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "out features 1 x 64" in result.stdout


def test_average_names_what_it_cannot_read(tmp_path):
    """`shitu average` of a .pdparams or an export folder says what to give instead (it
    used to call an existing folder "not found" and list .pdparams as expected)."""
    model = make_model()
    run = save_weights(model.state_dict(), tmp_path / "run.safetensors")
    to_pdparams(model, tmp_path / "paddle.pdparams")
    (tmp_path / "export").mkdir()
    for other, message in [
        ("paddle.pdparams", "paddle.pdparams: .pdparams need a model to be read; `shitu convert`"),
        ("export", "export is a folder, not a weight file: give one"),
    ]:
        result = run_shitu("average", str(run), str(tmp_path / other),
                           "--out", str(tmp_path / "soup.safetensors"))  # fmt: skip
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_a_paddleclas_output_folder_or_optimizer_file_names_its_pdparams(tmp_path):
    """What PaddleClas's training writes (output/RecModel/best_model.pdparams, .pdopt and
    .pdstates beside it), given as the folder or the wrong file of the three: the message
    named only shitu's own files."""
    run = tmp_path / "RecModel"
    run.mkdir()
    to_pdparams(make_model(), run / "best_model.pdparams")
    (run / "best_model.pdopt").write_bytes(b"")
    for given, message in [
        (run, f"{run} is a PaddleClas training run's folder: give its weights, "),
        (run / "best_model.pdopt", f"({run / 'best_model.pdparams'} holds the weights)"),
        (run / "best.pdparams", f"; {run} is a PaddleClas training run's folder: give its"),
    ]:
        with pytest.raises(CheckpointError) as info:
            load_weights(make_model(), given)
        assert message in str(info.value)
    load_weights(make_model(), run / "best_model")  # as PaddleClas configs name it


def test_average_of_torch_files_with_another_tools_metadata_keeps_its_text(tmp_path):
    """A torch file's `metadata` from another tool may hold numbers (or be no dict): a
    .safetensors soup of it keeps the text entries, which are all that format holds (it was
    a TypeError traceback, or a ValueError for metadata that is text)."""
    state = make_model().state_dict()
    runs = []
    for index, metadata in enumerate([{"epoch": 3, "note": "run a", 7: "seven"}, "run b"]):
        runs.append(tmp_path / f"run{index}.pt")
        torch.save({"state_dict": state, "metadata": metadata}, runs[-1])
    out = tmp_path / "soup.safetensors"
    result = run_shitu("average", *map(str, runs), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert read_weights(out)[1] == {"note": "run a"}
    assert read_weights(runs[1])[1] == {}


def test_average_writes_to_a_name_as_long_as_the_file_system_takes(tmp_path):
    """The check that --out can be written, before the files are read, made a temporary
    file of its name plus 10 bytes: a 246 to 255-byte name, which the file system takes,
    was refused as "File name too long"."""
    runs = [save_weights(make_model(seed=s).state_dict(), tmp_path / f"r{s}.pt") for s in (0, 1)]
    out = tmp_path / ("s" * 243 + ".safetensors")  # 255 bytes
    result = run_shitu("average", *map(str, runs), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert read_weights(out)[0].keys() == read_weights(runs[0])[0].keys()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["r0.pt", "r1.pt", out.name]


def test_save_refuses_unknown_suffix(tmp_path):
    with pytest.raises(CheckpointError, match="use a .safetensors, .pt or .pth"):
        save_weights({}, tmp_path / "x.bin")


def test_unwritable_output_is_a_clear_error(tmp_path):
    """An --out that names a folder, or lies under a file, is a one-line error (it was an
    IsADirectoryError traceback after the work was done)."""
    model = make_model()
    runs = [save_weights(make_model(seed=s).state_dict(), tmp_path / f"r{s}.pt") for s in (0, 1)]
    (tmp_path / "soup.safetensors").mkdir()
    result = run_shitu("average", *map(str, runs), "--out", str(tmp_path / "soup.safetensors"))
    assert result.returncode == 2, result.stderr
    assert f"cannot write {tmp_path / 'soup.safetensors'}: Is a directory" in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(CheckpointError, match="cannot write .*r0.pt/m.safetensors"):
        save_weights(model.state_dict(), runs[0] / "m.safetensors")
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


@pytest.fixture
def full_disk():
    """Files stop growing at 64 KiB, as on a full disk (the system says "File too large"
    rather than "No space left on device")."""
    resource = pytest.importorskip("resource")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a refused write, not death
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, limit[1]))
    yield os.strerror(errno.EFBIG)
    resource.setrlimit(resource.RLIMIT_FSIZE, limit)
    signal.signal(signal.SIGXFSZ, handler)


def test_a_checkpoint_the_disk_has_no_room_for_is_a_clear_error(tmp_path, full_disk):
    """Training's latest.pt and the weight files: an error naming the file and the system's
    reason (torch and safetensors said "unexpected pos 704 vs 598" and "Error while
    serializing", naming neither), and the file as it was before."""
    small, large = {"weight": torch.zeros(4)}, {"weight": torch.zeros(1 << 16)}
    saves = {
        "latest.pt": lambda state, path: save_training_state(path, {"model": state}, Progress()),
        "best_model.safetensors": save_weights,
        "final_model.pt": save_weights,
    }
    for name, save in saves.items():
        path = tmp_path / name
        save(small, path)
        before = path.read_bytes()
        with pytest.raises(CheckpointError, match=f"cannot write {path}: .*{full_disk}"):
            save(large, path)
        assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(saves)  # no temporary files


def test_a_detector_checkpoint_the_disk_has_no_room_for_is_a_clear_error(tmp_path, full_disk):
    path = tmp_path / "detector.pt"  # megabytes: over the 64 KiB the disk takes
    with pytest.raises(CheckpointError, match=f"cannot write {path}: {full_disk}"):
        save_detector(build_picodet("picodet_s_esnet", num_classes=1), path)
    assert list(tmp_path.iterdir()) == []  # nor a temporary file


def test_a_detector_onnx_export_the_disk_has_no_room_for_keeps_the_earlier_file(
    tmp_path, full_disk
):
    """detect-train's model.onnx, written again by a resumed run: a refused write is an error
    naming the file, and the export there before stays whole (it was cut at 64 KiB)."""
    path = tmp_path / "model.onnx"
    path.write_bytes(b"an earlier export")
    with pytest.raises(CheckpointError, match=f"cannot write {path}: {full_disk}"):
        export_onnx(build_picodet("picodet_s_esnet", num_classes=1, input_size=64), path)
    assert path.read_bytes() == b"an earlier export"
    assert list(tmp_path.iterdir()) == [path]  # nor a temporary file


def test_load_pretrained_backbone_skips_what_does_not_fit(tmp_path):
    classifier = BACKBONES.build("PPLCNetV2_small", class_num=10)
    to_pdparams(classifier, tmp_path / "imagenet.pdparams")
    shitu = BACKBONES.build("PPLCNetV2_small_ShiTu", pretrained=str(tmp_path / "imagenet.pdparams"))
    # Stages load; last_conv (1280 vs 512 outputs) and fc do not fit and are skipped.
    assert torch.equal(shitu.stem[0].conv.weight, classifier.stem[0].conv.weight)
    assert torch.equal(
        shitu.stages[3][1].pw_conv.conv.weight, classifier.stages[3][1].pw_conv.conv.weight
    )  # the last stage too, though it runs at stride 1 here
    report = load_pretrained(shitu, tmp_path / "imagenet.pdparams")
    assert any(name.startswith("last_conv.weight") for name in report.shape_mismatch)


def test_load_pretrained_from_a_rec_model_checkpoint(tmp_path):
    model = make_model()
    path = save_weights(model.state_dict(), tmp_path / "rec.safetensors")
    backbone = BACKBONES.build("PPLCNetV2_small_ShiTu", class_expand=64)
    report = load_pretrained(backbone, path)
    assert torch.equal(backbone.last_conv.weight, model.backbone.last_conv.weight)
    assert report.loaded


def test_pretrained_file_of_another_architecture_is_refused_or_flagged(tmp_path, caplog):
    """BatchNorm counters the file lacks are filled in, but they are not weights: a file
    with nothing that fits is refused, one where most does not fit is warned about."""
    resnet = BACKBONES.build("ResNet18")
    path = save_weights(
        {k: v for k, v in resnet.state_dict().items() if "num_batches" not in k and "fc" not in k},
        tmp_path / "resnet.safetensors",
    )
    with pytest.raises(CheckpointError, match="no tensor fits"):
        BACKBONES.build("PPLCNetV2_small", pretrained=str(path))
    lcnet = BACKBONES.build("PPLCNetV2_small")
    state = lcnet.state_dict()
    few = dict(list(state.items())[:10])  # a tenth of the backbone
    partial = save_weights(few, tmp_path / "partial.safetensors")
    with caplog.at_level(logging.WARNING):
        BACKBONES.build("PPLCNetV2_small", pretrained=str(partial))
    assert "tensors fit (a file of another architecture" in caplog.text


def test_pretrained_true_is_refused():
    with pytest.raises(CheckpointError, match="never does"):
        BACKBONES.build("PPLCNetV2_small", pretrained=True)


def test_average_weights_is_the_mean_of_same_model_runs(tmp_path):
    """`shitu average`: floats are the element-wise mean (in the widest dtype of the files,
    whatever their order), integer counters come from the first file, and the result loads
    into the same model."""
    models = [make_model(seed=seed) for seed in range(3)]
    paths = []
    for index, model in enumerate(models):
        state = model.state_dict()
        if index == 0:  # one file in float16, as `shitu export --compact` writes
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        metadata = model_metadata(model, ARCH)
        paths.append(save_weights(state, tmp_path / f"run{index}.safetensors", metadata))
    result = run_shitu("average", *map(str, paths), "--out", str(tmp_path / "soup.safetensors"))
    assert result.returncode == 0, result.stderr
    assert "the mean of 3 checkpoints" in result.stdout
    soup, metadata = read_weights(tmp_path / "soup.safetensors")
    assert metadata == read_weights(paths[0])[1]
    states = [read_weights(path)[0] for path in paths]
    reordered = average_weights([paths[1], paths[0], paths[2]])[0]
    for name, tensor in soup.items():
        assert tensor.dtype == states[1][name].dtype  # float32 where the first is float16
        if tensor.is_floating_point():
            mean = sum(state[name].double() for state in states) / 3
            torch.testing.assert_close(tensor.double(), mean, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(reordered[name], tensor, atol=1e-6, rtol=1e-6)
        else:
            assert torch.equal(tensor, states[0][name])
    report = load_weights(make_model(seed=5), tmp_path / "soup.safetensors")
    assert not report.missing and not report.unexpected and not report.shape_mismatch


def test_average_warns_of_a_file_given_twice(tmp_path):
    """A path pasted twice (here once through a symlink) doubled that run's share, unsaid."""
    paths = [
        save_weights(make_model(seed=seed).state_dict(), tmp_path / f"run{seed}.safetensors")
        for seed in range(2)
    ]
    (tmp_path / "latest.safetensors").symlink_to(paths[1])
    soup = str(tmp_path / "soup.safetensors")
    result = run_shitu(
        "average", *map(str, paths), str(tmp_path / "latest.safetensors"), "--out", soup
    )
    assert result.returncode == 0, result.stderr
    assert (
        f"warning: {tmp_path / 'latest.safetensors'} is given more than once (as {paths[1]} too)"
        in result.stderr
    )
    result = run_shitu("average", *map(str, paths), "--out", soup)
    assert result.returncode == 0 and "warning" not in result.stderr


def test_weighted_average_adds_a_run_to_an_existing_soup(tmp_path):
    """`--weighting 3 1`: a three-run soup weighted 3 and a fourth run weighted 1 give the
    four-run soup, so a soup can grow without keeping its runs' files."""
    models = [make_model(seed=seed) for seed in range(4)]
    paths = [
        save_weights(
            model.state_dict(), tmp_path / f"run{i}.safetensors", model_metadata(model, ARCH)
        )
        for i, model in enumerate(models)
    ]
    three, four, grown = (tmp_path / f"{name}.safetensors" for name in ("three", "four", "grown"))
    for files, out, options in [
        (paths[:3], three, []),
        (paths, four, []),
        ([three, paths[3]], grown, ["--weighting", "3", "1"]),
    ]:
        result = run_shitu("average", *map(str, files), *options, "--out", str(out))
        assert result.returncode == 0, result.stderr
    assert "the mean of 2 checkpoints weighted 3 : 1" in result.stdout
    expected, got = read_weights(four)[0], read_weights(grown)[0]
    moved = 0
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-6, rtol=1e-5)
        if tensor.is_floating_point():  # and not the unweighted mean of the two files
            plain = (read_weights(three)[0][name] + read_weights(paths[3])[0][name]) / 2
            moved += not torch.allclose(plain, tensor, atol=1e-6, rtol=1e-5)
    assert moved > 0
    # only the ratio counts: weights whose sum overflows (or underflows) give the same soup
    for weighting in (["3e307", "1e307"], ["3e-320", "1e-320"]):
        result = run_shitu("average", str(three), str(paths[3]), "--weighting", *weighting,
                           "--out", str(grown))  # fmt: skip
        assert result.returncode == 0, result.stderr
        for name, tensor in read_weights(grown)[0].items():
            torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=1e-5)
    for options, message in [
        (["--weighting", "3"], "weighting [3.0]: 1 value for 2 weight files; give one per file"),
        (["--weighting", "1", "0"], "weighting [1.0, 0.0]: each value must be positive and "
         "finite"),
        (["--weighting", "inf", "1"], "weighting [inf, 1.0]: each value must be positive and "
         "finite"),
    ]:  # fmt: skip
        result = run_shitu("average", str(three), str(paths[3]), *options,
                           "--out", str(tmp_path / "refused.safetensors"))  # fmt: skip
        assert result.returncode == 2 and result.stderr == f"error: {message}\n", result.stderr
    result = run_shitu("average", str(three), "--weighting", "1", "--pretrained-share", "0.1",
                       "--layers", "head", "--out", str(tmp_path / "refused.safetensors"))  # fmt: skip
    assert result.returncode == 2 and "two or more weight files" in result.stderr
    assert not (tmp_path / "refused.safetensors").exists()


def test_average_weights_refuses_files_of_different_models(tmp_path):
    model = make_model()
    state, metadata = model.state_dict(), model_metadata(model, ARCH)
    base = save_weights(state, tmp_path / "a.safetensors", metadata)
    with pytest.raises(CheckpointError, match="at least two weight files, got 1"):
        average_weights([base])
    other_arch = save_weights(state, tmp_path / "b.safetensors", model_metadata(model, {"x": 1}))
    with pytest.raises(CheckpointError, match=r"b\.safetensors: its shitu\.arch differs"):
        average_weights([base, other_arch])
    plain = tmp_path / "plain.pt"  # weights alone, as torch.save(model.state_dict()) writes
    torch.save(state, plain)
    for pair in ([base, plain], [plain, base]):
        with pytest.raises(CheckpointError, match=r"plain\.pt has no shitu\.arch metadata, "):
            average_weights(pair)
    # what only steers training may differ between the runs of a soup
    trained = dict(ARCH, frozen_layers=["backbone.stem"])
    trained["Backbone"] = dict(ARCH["Backbone"], pretrained="imagenet.safetensors")
    # a margin sweep: the margin and scale shape only the training logits
    trained["Head"] = dict(ARCH["Head"], margin=0.3, scale=30.0, easy_margin=True)
    frozen = save_weights(state, tmp_path / "e.safetensors", model_metadata(model, trained))
    assert average_weights([base, frozen])[1] == metadata
    # a setting written out at its default builds the model that leaving it out builds
    written_out = dict(trained, Neck={"name": "BNNeck", "num_features": 64, "bias_frozen": True})
    written_out["Backbone"] = dict(trained["Backbone"], last_stride=1, act="relu")
    written_out = save_weights(
        state, tmp_path / "g.safetensors", model_metadata(model, written_out)
    )
    assert average_weights([base, written_out])[1] == metadata
    other_neck = dict(trained, Neck={"name": "BNNeck", "num_features": 64, "bias_frozen": False})
    other_neck = save_weights(state, tmp_path / "f.safetensors", model_metadata(model, other_neck))
    with pytest.raises(
        CheckpointError,
        match=r"f\.safetensors: its shitu\.arch differs from .*a\.safetensors's: "
        r"shitu\.arch Neck\.bias_frozen False \(a\.safetensors's at its default\); only weights "
        r"of "
        r"the same",
    ):
        average_weights([base, other_neck])
    fewer = {k: v for k, v in state.items() if not k.startswith("head.")}
    fewer_path = save_weights(fewer, tmp_path / "c.safetensors", metadata)
    with pytest.raises(CheckpointError, match=r"only there: \['head\."):
        average_weights([base, fewer_path])
    name = next(k for k, v in state.items() if v.ndim == 4)
    reshaped = dict(state, **{name: state[name][:1]})
    reshaped_path = save_weights(reshaped, tmp_path / "d.safetensors", metadata)
    with pytest.raises(CheckpointError, match=f"d\\.safetensors: {name} has shape"):
        average_weights([base, reshaped_path])
    result = run_shitu("average", str(base), "--out", str(tmp_path / "o.safetensors"))
    assert result.returncode == 2, result.stderr
    # One file is mixed with the pretrained weights, which the message says how to ask for.
    assert "at least two weight files, got 1 (one file is mixed with" in result.stderr
    assert "with --pretrained-share S --layers PREFIX -c CONFIG)" in result.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_average_takes_runs_whose_arch_writes_a_default_as_null_or_a_presets_value(tmp_path):
    """`dropout_prob: null` takes the default and `depths: [2, 2, 4, 2]` is the value that
    PPLCNetV2_small_ShiTu fixes: both build the model leaving them out builds, but were
    compared as written, so `shitu average` refused the soup as of two models."""
    model = make_model()
    state = model.state_dict()
    base = save_weights(state, tmp_path / "a.safetensors", model_metadata(model, ARCH))
    spelt = dict(ARCH, Backbone=dict(ARCH["Backbone"], dropout_prob=None, depths=[2, 2, 4, 2]))
    other = save_weights(state, tmp_path / "b.safetensors", model_metadata(model, spelt))
    soup = tmp_path / "soup.safetensors"
    result = run_shitu("average", str(base), str(other), "--out", str(soup))
    assert result.returncode == 0, result.stderr
    assert read_weights(soup)[1] == read_weights(base)[1]
    stride = dict(spelt, Backbone=dict(spelt["Backbone"], last_stride=2))  # not its default
    stride = save_weights(state, tmp_path / "c.safetensors", model_metadata(model, stride))
    result = run_shitu("average", str(base), str(stride), "--out", str(soup))
    assert result.returncode != 0
    assert "Backbone.last_stride 2 (a.safetensors's at its default)" in result.stderr


def test_averaging_an_export_with_a_training_run_says_to_leave_the_head_out(tmp_path):
    """An export's weights have no head, a training run's have one: the error said the
    Head differs, not that `shitu convert --no-head` makes the two averageable."""
    trained = make_model()
    run = save_weights(
        trained.state_dict(), tmp_path / "run.safetensors", model_metadata(trained, ARCH)
    )
    headless_arch = dict(ARCH, Head=None)
    headless = make_model(headless_arch, seed=1)
    export = save_weights(
        headless.state_dict(),
        tmp_path / "model.safetensors",
        model_metadata(headless, headless_arch),
    )
    hint = (
        f"(the same model, but {run} has a classification head and the other none: "
        f"`shitu convert {run} -c CONFIG --no-head --out FILE` leaves it out)"
    )
    for pair in ([export, run], [run, export]):
        with pytest.raises(CheckpointError) as refused:
            average_weights(pair)
        assert str(refused.value).endswith(hint)
    other = dict(ARCH, Neck={"name": "BNNeck", "num_features": 64, "bias_frozen": False})
    unlike = save_weights(
        headless.state_dict(), tmp_path / "unlike.safetensors", model_metadata(headless, other)
    )
    with pytest.raises(CheckpointError) as refused:  # more than the head differs: no hint
        average_weights([export, unlike])
    assert "--no-head" not in str(refused.value)
    fewer_classes = dict(ARCH, Head=dict(ARCH["Head"], class_num=5))
    other_run = save_weights(
        make_model(fewer_classes).state_dict(),
        tmp_path / "other_run.safetensors",
        model_metadata(make_model(fewer_classes), fewer_classes),
    )
    with pytest.raises(CheckpointError) as refused:  # runs on other classes: the same hint
        average_weights([run, other_run])
    assert str(refused.value).endswith(
        f"(the same model but for the classification head: `shitu convert {run} -c CONFIG "
        f"--no-head --out FILE`, and the same for {other_run}, leave it out)"
    )


def test_pretrained_share_moves_only_the_named_layers_back_to_the_initialisation(tmp_path):
    """`shitu average --pretrained-share` (WiSE-FT): the named ImageNet layers of a
    "fine-tuned" EfficientNet-Lite0 move a quarter of the way back to the ImageNet weights
    the config loads; its new layers (fc, BNNeck, head) and counters stay as they were."""
    config = load_config("GroceryStore_EfficientNetLite0")
    model = build_model(config.Arch)
    imagenet = model.state_dict()
    tuned = {k: v + 0.5 if v.is_floating_point() else v for k, v in imagenet.items()}
    metadata = model_metadata(model, config.Arch.model_dump())
    path = save_weights(tuned, tmp_path / "tuned.safetensors", metadata)
    out = tmp_path / "mixed.safetensors"
    layers = ["backbone.blocks", "backbone.head"]
    result = run_shitu(
        "average", str(path), "--pretrained-share", "0.25", "--layers", *layers,
        "-c", "GroceryStore_EfficientNetLite0", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    mixed, mixed_metadata = read_weights(out)
    assert mixed_metadata == metadata and mixed.keys() == tuned.keys()
    moved = [k for k in mixed if k.startswith(("backbone.blocks.", "backbone.head."))]
    for name, tensor in mixed.items():
        if name in moved and tensor.is_floating_point():  # 0.75 (w + 0.5) + 0.25 w
            torch.testing.assert_close(tensor, imagenet[name] + 0.375)
        else:
            assert torch.equal(tensor, tuned[name]), name
    assert any(k.startswith("backbone.fc.") for k in mixed) and any(
        k.startswith("neck.") for k in mixed
    )
    for options, message in [
        (["--pretrained-share", "0.25"], "--pretrained-share and --layers go together"),
        ([str(path)], "-c and -o are read only with --pretrained-share"),  # else ignored
        (["--pretrained-share", "1.5", "--layers", "backbone.head"],
         "--pretrained-share 1.5: must be between 0 and 1"),
        (
            ["--pretrained-share", "0.2", "--layers", "backbone.stem", "backbone.heads"],
            "--layers backbone.heads: no tensor of the weights is under it (did you mean "
            "'backbone.head'?)",
        ),
        (
            ["--pretrained-share", "0.2", "--layers", "backbone.head",
             "-o", "Arch.Backbone.pretrained=false"],
            "sets no Arch.Backbone.pretrained (it would mix in a random initialisation)",
        ),
        (
            ["--pretrained-share", "0.2", "--layers", "backbone.head",
             "-o", "Arch.Backbone.pretrained=no"],
            "sets no Arch.Backbone.pretrained (it would mix in a random initialisation)",
        ),
        (  # the new embedding layer starts at random, another way each run: no way back
            ["--pretrained-share", "0.2", "--layers", "backbone"],
            "--layers backbone: backbone.fc.bias, backbone.fc.weight did not come from the "
            "config's pretrained weights (the model initialises them afresh, weights at "
            "random), so there is no pretrained value to move them back to; give --layers "
            "backbone.stem backbone.blocks backbone.head",
        ),
        (
            ["--pretrained-share", "0.2", "--layers", "head"],
            "--layers head: head.fc.weight did not come from the config's pretrained weights",
        ),
        (  # the settings the run was trained with, left out: named, from the weights' record
            ["--pretrained-share", "0.2", "--layers", "backbone", "-o",
             "Arch.Backbone.class_num=256", "Arch.Neck.num_features=256",
             "Arch.Head.embedding_size=256"],
            "(the config's Arch settings differ from the file's: Arch.Backbone.class_num 256 "
            "(the file's 512); Arch.Head.embedding_size 256 (the file's 512); "
            "Arch.Neck.num_features 256 (the file's 512))",
        ),
        (  # without the head, which the file has: not a difference of the model mixed
            ["--pretrained-share", "0.2", "--layers", "backbone", "-o",
             "Arch.Backbone.class_num=256", "Arch.Neck.num_features=256", "Arch.Head=null"],
            # the model -c builds said in the user's terms: "the reference" is the API's name
            "error: backbone.fc.bias: (512,) in the weights, shape (256,) in the model the "
            "config builds (the config's Arch settings differ from the file's: "
            "Arch.Backbone.class_num 256 (the file's 512); Arch.Neck.num_features 256 (the "
            "file's 512))",
        ),
    ]:  # fmt: skip
        result = run_shitu("average", str(path), *options, "-c", "GroceryStore_EfficientNetLite0",
                           "--out", str(tmp_path / "refused.safetensors"))  # fmt: skip
        assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "refused.safetensors").exists()
    unnamed = run_shitu("average", str(path), "--pretrained-share", "0.2", "--layers",
                        "backbone.head", "--out", str(tmp_path / "refused.safetensors"))  # fmt: skip
    assert unnamed.returncode == 2
    assert "--pretrained-share needs -c CONFIG" in unnamed.stderr  # no default to fall back on
    other = {"backbone.head.conv.weight": torch.zeros(3, 3)}  # a config of another model
    with pytest.raises(CheckpointError, match="does the config build the same model"):
        interpolate_toward(tuned, other, 0.2, ["backbone.head"])


def test_average_api_refuses_values_that_are_no_numbers(tmp_path):
    """float() took true and "2" as numbers, and failed on "x" in Python's words; comparing
    a share given as text raised a TypeError."""
    paths = [save_weights(make_model(seed=s).state_dict(), tmp_path / f"{s}.pt") for s in (1, 2)]
    for weighting in (["x", 1], [True, 1], ["2", 1]):
        with pytest.raises(CheckpointError, match=r"\]: each value must be a number$"):
            average_weights(paths, weighting)
    assert average_weights(paths, np.array([1, 2], np.float32))[0].keys()  # numpy's numbers
    tuned = make_model().state_dict()
    with pytest.raises(CheckpointError, match=r"^--pretrained-share '0.5': must be between 0"):
        interpolate_toward(tuned, tuned, "0.5", ["backbone"])


def test_pretrained_share_refuses_folded_weights(tmp_path):
    """Folded weights have none of the config's rep-branch tensors: the error says so, not
    that the config builds another model."""
    start = save_weights(make_model(seed=1).state_dict(), tmp_path / "start.safetensors")
    folded = make_model().reparameterize()
    path = save_weights(
        folded.state_dict(), tmp_path / "folded.safetensors", model_metadata(folded, ARCH)
    )
    arch = dict(ARCH, Backbone=dict(ARCH["Backbone"], pretrained=str(start)))
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps({"Arch": arch, "Global": {"image_shape": [3, 64, 64]}}))
    result = run_shitu("average", str(path), "--pretrained-share", "0.2", "--layers", "backbone",
                       "-c", str(config), "--out", str(tmp_path / "mixed.safetensors"))  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "folded.safetensors holds folded (re-parameterised) weights" in result.stderr
    assert not (tmp_path / "mixed.safetensors").exists()
    # The other way round: a config whose pretrained file is folded (an export's weights).
    # Loading it folds the backbone mixed in, which then lacks the weights' rep branches.
    unfolded = make_model(seed=2)
    tuned = save_weights(
        unfolded.state_dict(), tmp_path / "tuned.safetensors", model_metadata(unfolded, ARCH)
    )
    arch["Backbone"]["pretrained"] = str(path)
    config.write_text(json.dumps({"Arch": arch, "Global": {"image_shape": [3, 64, 64]}}))
    result = run_shitu("average", str(tuned), "--pretrained-share", "0.2", "--layers", "backbone",
                       "-c", str(config), "--out", str(tmp_path / "mixed.safetensors"))  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"error: {config}: Arch.Backbone.pretrained holds folded (re-parameterised) weights, "
        "an export's, which unfolded weights cannot be mixed with: give the weights they were "
        "folded from\n"
    )
    assert not (tmp_path / "mixed.safetensors").exists()


def test_convert_counts_the_file_tensors_it_leaves_out(tmp_path):
    """`--no-head` leaves out the file's head: its summary counts them ('1 file tensor')."""
    weights = save_weights(make_model().state_dict(), tmp_path / "trained.safetensors")
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps({"Arch": ARCH, "Global": {"image_shape": [3, 64, 64]}}))
    out = tmp_path / "features.safetensors"
    result = run_shitu("convert", str(weights), "--no-head", "-c", str(config), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("PPLCNetV2_small_ShiTu, 1 file tensor left out\n")
    # Folded, it writes fewer tensors than it loads: the count is the file's.
    result = run_shitu("convert", str(weights), "--reparameterize", "-c", str(config), "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    written, loaded = len(read_weights(out)[0]), len(make_model().state_dict())
    assert written < loaded
    assert result.stdout.startswith(f"wrote {out}: {written} tensors (folded from {loaded}), ")


def test_convert_and_average_refuse_nan_weights_naming_the_tensors(tmp_path):
    """A diverged run's NaN weights were converted and averaged without a word; only
    `shitu export` refused them, later. Now the first few tensors are named, nothing
    written."""
    state = make_model().state_dict()
    fine = save_weights(state, tmp_path / "fine.safetensors")
    names = [name for name, tensor in state.items() if tensor.is_floating_point()][:4]
    for name in names:
        state[name] = torch.full_like(state[name], float("nan"))
    state[names[0]][0] = float("inf")
    diverged = save_weights(state, tmp_path / "diverged.safetensors")
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps({"Arch": ARCH, "Global": {"image_shape": [3, 64, 64]}}))
    out = tmp_path / "out" / "weights.safetensors"
    for command, what, order in [  # the model's order; a .safetensors file's is sorted
        (("convert", str(diverged), "-c", str(config)), str(diverged), names),
        (("average", str(fine), str(diverged)), "the mean of 2 checkpoints", sorted(names)),
    ]:
        result = run_shitu(*command, "--out", str(out))
        assert result.returncode == 2, result.stderr
        few = f"{order[0]}, {order[1]}, {order[2]} and 1 more hold NaN or infinite values"
        assert f"{what}: {few} (weights of a training run that diverged?)" in result.stderr
        assert not out.parent.exists()


def test_weight_file_suffixes_are_taken_in_any_case(tmp_path):
    """SOUP.SAFETENSORS, a Windows tool's MODEL.PTH: refused as no weight file's suffix,
    though image suffixes are compared lower-case."""
    state = make_model().state_dict()
    for name in ("SOUP.SAFETENSORS", "MODEL.PTH", "run.Pt"):
        read, _ = read_weights(save_weights(state, tmp_path / name))  # written, read as such
        assert read.keys() == state.keys()
    with safe_open(str(tmp_path / "SOUP.SAFETENSORS"), framework="pt") as handle:
        assert set(handle.keys()) == set(state)
    (tmp_path / "PADDLE.PDPARAMS").write_bytes(b"")
    with pytest.raises(CheckpointError, match="need a model to be read; `shitu convert` it"):
        read_weights(tmp_path / "PADDLE.PDPARAMS")
    with pytest.raises(CheckpointError, match="a weights file, not a training checkpoint"):
        load_training_state(tmp_path / "SOUP.SAFETENSORS")
    out = tmp_path / "AVERAGED.SAFETENSORS"
    result = run_shitu(
        "average", *(str(tmp_path / n) for n in ("MODEL.PTH", "run.Pt")), "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert read_weights(out)[0].keys() == state.keys()


@pytest.mark.parametrize("command", ["average", "convert"])
def test_an_output_name_no_weight_file_can_have_is_refused_before_any_work(command, tmp_path):
    """Before reading (and averaging or converting) every input, not after."""
    missing = str(tmp_path / "not-read.safetensors")  # reading it first would fail otherwise
    inputs = [missing, missing] if command == "average" else [missing]
    result = run_shitu(command, *inputs, "--out", str(tmp_path / "soup.bin"))
    assert result.returncode == 2
    assert f"cannot write {tmp_path / 'soup.bin'}: use a .safetensors" in result.stderr


@pytest.mark.parametrize("command", ["average", "convert"])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(command, tmp_path):
    """A folder of the output's name, or a file in the way of its folder, was refused only
    when the result was saved, after every input had been read and averaged or converted.
    A folder made for the output is removed when the command fails."""
    missing = str(tmp_path / "not-read.safetensors")  # reading it first would fail otherwise
    inputs = [missing, missing] if command == "average" else [missing]
    (tmp_path / "soup.safetensors").mkdir()
    (tmp_path / "file").write_text("")
    for out, reason in (
        ("soup.safetensors", f"cannot write {tmp_path / 'soup.safetensors'}: Is a directory"),
        (
            "file/m.pt",
            f"--out {tmp_path / 'file/m.pt'}: {tmp_path / 'file'} is a file, not a folder",
        ),
    ):
        result = run_shitu(command, *inputs, "--out", str(tmp_path / out))
        assert result.returncode == 2
        assert result.stderr == f"error: {reason}\n"
    result = run_shitu(command, *inputs, "--out", str(tmp_path / "new" / "soup.safetensors"))
    assert result.returncode == 2 and "not-read.safetensors" in result.stderr
    assert not (tmp_path / "new").exists()
    # Where a link points: the folder made there (the output's, as it is written there)
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "disk" / "soup.safetensors")
    result = run_shitu(command, *inputs, "--out", str(tmp_path / "link.safetensors"))
    assert result.returncode == 2 and "not-read.safetensors" in result.stderr
    assert not (tmp_path / "disk").exists()
    (tmp_path / "link.safetensors").unlink()
    assert not list(tmp_path.glob(".*"))  # no trial file left behind


def test_average_out_a_link_writes_the_file_it_points_to(tmp_path):
    """`--out best.safetensors` where that links to the weights kept elsewhere: the link
    was replaced by a new file, and the file it pointed to stayed stale. Checked before
    the work where it points: a link into an export's folder, or in a loop, is refused."""
    from shitu.inference import default_model_dir

    paths = [
        save_weights(make_model(seed=seed).state_dict(), tmp_path / f"run{seed}.safetensors")
        for seed in range(2)
    ]
    (tmp_path / "kept").mkdir()
    kept = save_weights(make_model(seed=5).state_dict(), tmp_path / "kept" / "soup.safetensors")
    link = tmp_path / "best.safetensors"
    link.symlink_to(kept)
    result = run_shitu("average", *map(str, paths), "--out", str(link))
    assert result.returncode == 0, result.stderr
    assert link.is_symlink() and os.listdir(tmp_path / "kept") == ["soup.safetensors"]
    for name, tensor in average_weights(paths)[0].items():
        assert torch.equal(read_weights(kept)[0][name], tensor)
    export = tmp_path / "export"
    shutil.copytree(default_model_dir(), export)
    (tmp_path / "into-export.safetensors").symlink_to(export / "model.safetensors")
    (tmp_path / "loop.safetensors").symlink_to(tmp_path / "loop.safetensors")
    for out, reason in (
        ("into-export.safetensors", f"{export} is an exported model's folder"),
        ("loop.safetensors", "Too many levels of symbolic links"),
    ):
        result = run_shitu("average", *map(str, paths), "--out", str(tmp_path / out))
        assert result.returncode == 2 and reason in result.stderr, result.stderr
        assert (tmp_path / out).is_symlink()


@pytest.mark.parametrize("command", ["average", "convert"])
def test_an_output_in_an_export_or_library_folder_is_refused(command, tmp_path):
    """Written over an export's own model.safetensors, the export no longer loaded (its
    recorded hash no longer matched); a library's folder is no place for weights either."""
    from shitu.index.metadata import LIBRARY_FILE
    from shitu.inference import FeatureExtractor, default_model_dir

    export = tmp_path / "export"
    shutil.copytree(default_model_dir(), export)
    library = tmp_path / "library"
    library.mkdir()
    (library / LIBRARY_FILE).write_bytes(b"")  # what makes a folder a library's
    weights = str(export / "model.safetensors")
    inputs = [weights, weights] if command == "average" else [weights, "--no-head"]
    for folder, kind, marker in ((export, "an exported model", "shitu_model.json"),
                                 (library, "a gallery library", LIBRARY_FILE)):  # fmt: skip
        out = folder / "model.safetensors"
        result = run_shitu(command, *inputs, "--out", str(out))
        assert result.returncode == 2, result.stderr
        assert result.stderr.endswith(
            f"error: --out {out}: {folder} is {kind}'s folder ({marker}), whose files are its "
            "own: write the weights to another folder\n"
        )
    assert sorted(path.name for path in library.iterdir()) == [LIBRARY_FILE]
    FeatureExtractor.load(export, backend="torch").close()  # unchanged: it still loads


def test_weights_that_do_not_fit_name_the_arch_settings_they_were_built_with(tmp_path):
    """`shitu eval -o Global.pretrained_model=RUN` without the run's `-o Arch...`: the
    error names the settings that differ, from the Arch the file records (the head, left
    out of the comparison, is not loaded either)."""
    model = make_model()
    path = save_weights(
        model.state_dict(), tmp_path / "run.safetensors", model_metadata(model, ARCH)
    )
    wider = dict(ARCH, Neck=dict(ARCH["Neck"], num_features=32), Head=None)
    wider["Backbone"] = dict(ARCH["Backbone"], class_expand=32)
    features = {key: value for key, value in wider.items() if key != "Head"}
    with pytest.raises(CheckpointError) as info:
        load_weights(make_model(wider), path, ignore_prefixes=("head.",), arch=features)
    assert str(info.value).endswith(
        "(the config's Arch settings differ from the file's: Arch.Backbone.class_expand 32 "
        "(the file's 64); Arch.Neck.num_features 32 (the file's 64))"
    )
    # A setting the config leaves out is at its constructor's default, not unset.
    default_width = dict(
        features,
        Backbone={"name": "PPLCNetV2_small_ShiTu"},
        Neck=dict(ARCH["Neck"], num_features=512),
    )
    with pytest.raises(CheckpointError) as info:
        load_weights(
            make_model(default_width), path, ignore_prefixes=("head.",), arch=default_width
        )
    assert "Arch.Backbone.class_expand at its default (the file's 64)" in str(info.value)
    plain = save_weights(model.state_dict(), tmp_path / "plain.safetensors")  # records none
    with pytest.raises(CheckpointError, match=r"\(does the config match\?\)$"):
        load_weights(make_model(wider), plain, ignore_prefixes=("head.",), arch=features)


def test_a_folder_given_as_weights_is_named_for_what_it_is(tmp_path, capsys, resize_short_library):
    """`-o Global.pretrained_model=output` (the folder `shitu train` wrote) was told to give
    an export's model.safetensors, which a run has none of: the error names the weight file
    in the folder, or says the folder holds none."""
    from shitu.cli.main import main as shitu_main

    model = make_model()
    run = tmp_path / "run"
    run.mkdir()
    final = save_weights(model.state_dict(), run / "final_model.safetensors")
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps({"Arch": ARCH, "Global": {"image_shape": [3, 64, 64]}}))
    export = ["export", "-c", str(config), "--out", str(tmp_path / "export")]
    code = shitu_main([*export, "-o", f"Global.pretrained_model={run}"])
    err = capsys.readouterr().err
    assert code == 2
    assert (
        f"Global.pretrained_model: {run} is a training run's folder: give its weights, {final}"
        in err
    )
    # A run that never evaluated writes no best_model, the file commands are often given.
    absent = run / "best_model.safetensors"
    with pytest.raises(CheckpointError) as info:
        load_weights(model, absent)
    assert str(info.value) == (
        f"weight file not found: {absent}; {run} is a training run's folder: give its "
        f"weights, {final}"
    )
    best = save_weights(model.state_dict(), run / "best_model.safetensors")
    with pytest.raises(CheckpointError, match=f"give its weights, {best} \\(the best evaluated"):
        load_weights(model, run)
    library, exported = resize_short_library["gallery"], resize_short_library["model"]
    for folder, expected in [
        (
            exported,
            f"an exported model's folder: give its weights, {exported / 'model.safetensors'}",
        ),
        (library, "a gallery library, which holds features, not weights: give the weight file"),
    ]:
        with pytest.raises(CheckpointError, match=re.escape(f"{folder} is {expected}")):
            load_weights(model, folder)
    # The export's ONNX model, given for its weights: it said only which suffixes load.
    with pytest.raises(CheckpointError) as info:
        load_weights(model, exported / "model.onnx")
    assert str(info.value) == (
        f"unsupported weight file {exported / 'model.onnx'}: expected one of .safetensors, "
        f".pt, .pth, .pdparams ({exported} is an exported model's folder: give its weights, "
        f"{exported / 'model.safetensors'})"
    )


@pytest.mark.parametrize("command", ["info", "convert"])
def test_weights_that_do_not_fit_name_the_arch_settings_that_differ(tmp_path, capsys, command):
    """`shitu info --weights` and `shitu convert` said only "does the config match?" of a
    file that records the Arch settings it was built with, as eval and export name them."""
    from shitu.cli.main import main as shitu_main

    model = make_model()
    recorded = ArchConfig.model_validate(ARCH).model_dump(mode="json")  # as training records it
    weights = save_weights(
        model.state_dict(), tmp_path / "run.safetensors", model_metadata(model, recorded)
    )
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps({"Arch": ARCH, "Global": {"image_shape": [3, 64, 64]}}))
    words = {
        "info": ["info", "--weights", str(weights), "--batch-size", "1"],
        "convert": ["convert", str(weights), "--out", str(tmp_path / "out.safetensors")],
    }[command]
    assert shitu_main([*words, "-c", str(config), "-o", "Arch.Head.class_num=9"]) == 2
    err = capsys.readouterr().err
    assert "(the config's Arch settings differ from the file's: " in err
    assert "Arch.Head.class_num 9 (the file's 7))" in err


def test_weights_of_another_backbone_name_it_among_the_settings_that_differ():
    """Of the settings that differ, the first three are named, in key order: those of the
    backbone beside its name (class_expand, class_num, dropout_prob) left the name out."""
    model = make_model()
    recorded = ArchConfig.model_validate(ARCH).model_dump(mode="json")
    lite = {"name": "EfficientNetLite0", "class_num": 64, "dropout_prob": 0.1}
    arch = {**ARCH, "Backbone": lite, "BackboneStopLayer": {"name": "fc"}}
    hint = fit_hint(model_metadata(model, recorded), arch)
    assert "Arch.Backbone.name 'EfficientNetLite0' (the file's 'PPLCNetV2_small_ShiTu')" in hint


def test_resuming_a_run_folder_without_its_checkpoint_names_the_weights_to_start_from(tmp_path):
    """A finished run's folder whose latest.pt is gone was only "no training checkpoint":
    its weights, which a new run can start from, are named with the setting that takes them."""
    final = save_weights(make_model().state_dict(), tmp_path / "final_model.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_training_state(tmp_path)
    assert str(info.value) == (
        f"Global.checkpoints: no training checkpoint at {tmp_path} (give a latest.pt file or "
        "the output directory holding one); to start a new run from its weights, "
        f"-o Global.pretrained_model={final}"
    )
