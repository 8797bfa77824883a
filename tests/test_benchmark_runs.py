"""Benchmark scripts run end to end on a small export of a size other than 224."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shitu.config import load_config, resolve_config_path
from shitu.inference import default_model_dir, export_model

from .test_inference import TINY_CONFIG

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SIZE = 64


@pytest.fixture(scope="module")
def small_export(tmp_path_factory, grocery) -> Path:
    work = tmp_path_factory.mktemp("benchmark")
    config_file = work / "tiny.yaml"
    config_file.write_text(TINY_CONFIG.format(size=SIZE, root=grocery))
    return export_model(load_config(config_file, ["Arch.Head=null"]), None, work / "model")


def run_script(script: str, *args: str, **variables: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(BENCHMARKS.parent / "src"), **variables}
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        env=environment,
        check=False,
    )


def run_benchmark(script: str, *args: str, **variables: str) -> str:
    result = run_script(script, *args, **variables)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_cpu_runtimes_times_a_model_at_its_own_input_size(small_export: Path) -> None:
    """Its batches were 224x224 whatever the model, which an export of another size (its
    ONNX graph's input is fixed) refused with an onnxruntime traceback."""
    table = run_benchmark(
        "cpu_runtimes.py",
        *("--model", str(small_export), "--batches", "1", "--rounds", "1", "--seconds", "0"),
    )
    assert f"{SIZE}x{SIZE}, " in table
    assert "| onnxruntime | 1 |" in table


def test_cpu_runtimes_on_the_shipped_model_says_nothing_of_its_trace() -> None:
    """The TorchScript row traced the shipped EfficientNet-Lite0 with two TracerWarnings
    about its padding arithmetic on stderr, which do not apply to a trace of one size."""
    result = run_script(
        "cpu_runtimes.py",
        *("--batches", "1", "--rounds", "1", "--seconds", "0", "--threads", "1"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| torch TorchScript | 1 |" in result.stdout
    assert "Warning" not in result.stderr


def test_default_model_speed_times_a_full_export_where_it_is(small_export, tmp_path) -> None:
    """Only a compact export's ONNX model is rebuilt into the user cache: a full export's
    was copied there too, a cache entry as large as the model that nothing else reads."""
    cache = tmp_path / "cache"
    table = run_benchmark(
        "default_model_speed.py",
        *("--model", str(small_export), "--batches", "2", "--images", "4", "--rounds", "1"),
        *("--int8-calibration", "2"),
        SHITU_CACHE_DIR=str(cache),
    )
    assert f"input [{SIZE}, {SIZE}], 4 JPEGs (int8 calibrated on 2 of them)" in table
    assert "| onnxruntime int8 | 2 |" in table
    assert not cache.exists()


def test_default_model_speed_refuses_more_calibration_photos_than_it_times(small_export) -> None:
    """int8 calibration takes every other timed photo: more than --images gives were taken
    silently as fewer, under a table that did not say how many."""
    result = run_script(
        "default_model_speed.py",
        *("--model", str(small_export), "--batches", "2", "--images", "4", "--rounds", "1"),
        *("--int8-calibration", "3"),
    )
    assert result.returncode == 2
    assert "--int8-calibration 3: at most 2, every other one of the 4 timed photos" in result.stderr


def test_train_throughput_reads_no_imagenet_weights(tmp_path) -> None:
    """Speed does not depend on the weights: the recipe's backbone `pretrained` file was
    read all the same (the [pretrained] extra needed, or an absent file's traceback)."""
    shipped = resolve_config_path("GroceryStore_EfficientNetLite0").read_text()
    config = tmp_path / "lite0.yaml"
    config.write_text(shipped.replace("pretrained: true", f"pretrained: {tmp_path / 'no.pth'}"))
    table = run_benchmark(
        "train_throughput.py",
        *("-c", str(config), "--batch", "8", "--steps", "1", "--size", "32", "--threads", "1"),
    )
    assert f"| {config} | 8 | off | nhwc | keep |" in table


def test_a_mistake_is_one_line_not_a_traceback(tmp_path) -> None:
    """A model folder that is not there, as every `shitu` command names it: the scripts
    printed a traceback whose last line said it."""
    result = run_script("cpu_runtimes.py", "--model", str(tmp_path / "none"))
    assert result.returncode == 1
    assert result.stderr == f"error: model {tmp_path / 'none'}: no such folder\n"


@pytest.mark.parametrize(
    ("script", "words", "said"),
    [
        ("index_search.py", ["--types", "HSNW32"], "argument --types: invalid choice: 'HSNW32'"),
        (  # recall@200 of a 100-vector gallery was 0.5 on an exact index
            "index_search.py",
            ["--sizes", "100", "1000", "--k", "200", "--types", "Flat", "--queries", "1"],
            "--k 200: more than the smallest of --sizes, 100",
        ),
        ("reparameterize.py", ["--scales", "huge"], "argument --scales: invalid choice: 'huge'"),
        (  # was "error: ...: File exists", of the folder, once the table's header was out
            "index_search.py",
            ["--workdir", __file__],
            f"argument --workdir: {__file__}: a file, not a folder",
        ),
        ("open_set.py", ["--work", __file__], f"argument --work: {__file__}: a file, not a"),
        (  # was batch norm's ValueError traceback, from the worker process
            "train_throughput.py",
            ["--batch", "1"],
            "--batch 1: batch norm trains on 2 or more images a step",
        ),
        ("open_set.py", ["--step", "0"], "argument --step: expected a step from 0.001 to 1"),
        ("decode_memory.py", ["--megapixels", "0"], "expected a number above 0, got '0'"),
        (
            "synthetic_signs.py",
            ["--per-class", "5", "--gallery-per-class", "5"],
            "--gallery-per-class must be below --per-class",
        ),
    ],
)
def test_an_option_value_that_cannot_work_is_a_usage_error(script, words, said) -> None:
    """Refused as argparse refuses a value, before any work (a table's header, a library
    built): not a traceback after it, nor a bare exit status 1."""
    result = run_script(script, *words)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: ") and said in result.stderr
    assert result.stdout == ""


@pytest.fixture
def one_photo_grocery(tmp_path, grocery) -> dict[str, str]:
    """SHITU_GROCERY_ROOT for extraction_accuracy.py: one photo each of train and val, so
    that a run ends in seconds."""
    for split in ("train", "val"):
        first = (grocery / f"{split}.txt").read_text().splitlines()[0]
        (tmp_path / f"{split}.txt").write_text(f"{grocery / first}\n")
    return {"SHITU_GROCERY_ROOT": str(tmp_path)}


def test_extraction_accuracy_names_the_model_it_measured(one_photo_grocery) -> None:
    """Without --weights it read "model: GroceryStore_EfficientNetLite0 , weights: None" of
    a model with ImageNet weights and its neck left out."""
    table = run_benchmark(
        "extraction_accuracy.py",
        *("--threads", "1", "--fidelity-images", "1", "--calibration-images", "1"),
        **one_photo_grocery,
    )
    assert (
        "model: GroceryStore_EfficientNetLite0; weights: ImageNet's, "
        "Arch.BackboneStopLayer.name=flatten Arch.Neck=null\n"
    ) in table


def test_extraction_accuracy_takes_every_override(one_photo_grocery) -> None:
    """`-o A=1 -o B=2`, as shitu's -o is given: the second -o replaced the first, so the
    benchmark measured a model other than the one asked for, without a word."""
    result = run_script(
        "extraction_accuracy.py",
        *("-o", "Global.no_such_key=1", "-o", "Global.seed=0", "--threads", "1"),
        *("--fidelity-images", "1", "--calibration-images", "1"),
        **one_photo_grocery,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "no_such_key" in result.stderr


@pytest.mark.parametrize(
    ("script", "option"), [("pipeline_latency.py", "--picodet"), ("detector.py", "--onnx")]
)
def test_a_detector_file_that_is_not_there_is_refused_before_any_work(script, option) -> None:
    """pipeline_latency printed its table without the PicoDet rows, as if the mistyped file
    had been timed; detector.py timed its own detectors before it found the file missing."""
    missing = "absent/picodet_s_320_coco.onnx"
    result = run_script(script, option, missing)
    assert result.returncode == 2
    assert f"error: argument {option}: {missing}: no such file" in result.stderr
    assert result.stdout == ""


def test_synthetic_signs_names_only_a_folder_it_keeps(tmp_path) -> None:
    """Its scratch folder, removed as it ends, was named beside the counts as if the drawn
    photos could be looked at there; a --work folder is named."""
    small = ("--per-class", "2", "--gallery-per-class", "1")
    assert "shitu-signs-" not in run_benchmark("synthetic_signs.py", *small).splitlines()[0]
    work = tmp_path / "signs"
    first = run_benchmark("synthetic_signs.py", *small, "--work", str(work)).splitlines()[0]
    assert first.endswith(f"queries ({work})") and any(work.iterdir())


@pytest.mark.parametrize("script", ["synthetic_signs.py", "open_set.py"])
def test_a_model_that_is_no_export_is_refused_before_any_work(tmp_path, script) -> None:
    """A mistyped second --model was found only after the first model's run (open_set: a
    minute a model) or the photos were drawn, below a table's header."""
    missing = tmp_path / "none"
    result = run_script(script, "--model", str(default_model_dir()), "--model", str(missing))
    assert result.returncode == 1
    assert result.stderr == f"error: model {missing}: no such folder\n"
    assert result.stdout == ""


def test_a_reader_that_stops_early_ends_a_benchmark_quietly() -> None:
    """`python benchmarks/X.py | head -3`: a BrokenPipeError traceback followed the lines
    the reader took."""
    script = str(BENCHMARKS / "decode_memory.py")
    environment = {**os.environ, "PYTHONPATH": str(BENCHMARKS.parent / "src")}
    with subprocess.Popen(
        [sys.executable, script, "--megapixels", "0.05"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment,
    ) as process:
        process.stdout.close()  # gone before the table is printed
        assert process.stderr.read() == b""
    assert process.returncode == 1


def test_serve_latency_names_what_it_timed(small_export) -> None:
    """Its table alone named neither the model, the gallery nor the threads, as every other
    benchmark's first line does."""
    table = run_benchmark(
        "serve_latency.py",
        *("--model", str(small_export), "--gallery-size", "10", "--clients", "1"),
        *("--max-batch", "1", "--requests", "1", "--seconds", "30", "--threads", "1"),
    )
    first = table.splitlines()[0]
    assert first.startswith(f"model {small_export}, plain-background detector, gallery 10 ")
    assert "threads 1, " in first
    assert "| 1 | 1 | 1 | " in table


def test_open_set_reads_the_grocery_dataset_the_other_benchmarks_read(tmp_path) -> None:
    """$SHITU_GROCERY_ROOT, as the tests and the other Grocery benchmarks take it: open_set
    read ../shared/datasets alone, another dataset than theirs where both exist."""
    result = run_script(
        "open_set.py", "--model", str(tmp_path / "none"), SHITU_GROCERY_ROOT=str(tmp_path)
    )
    assert result.returncode == 1
    assert result.stderr == f"{tmp_path}: no Grocery Store dataset (train.txt) there\n"


def test_index_search_names_the_unit_its_sizes_are_in() -> None:
    """Its sizes are bytes / 2**20, which its table and docs/benchmarks.md called MB: a 20 MiB
    index (2,560 vectors of 2,048 float32s) is 21 MB."""
    table = run_benchmark(
        "index_search.py",
        *("--sizes", "2560", "--dim", "2048", "--types", "Flat", "--queries", "1"),
        *("--k", "1", "--repeats", "1", "--writes", "2", "--threads", "1"),
    )
    header, _, row = (line.split(" | ") for line in table.splitlines()[-3:])
    assert header[3:5] == ["index MiB", "disk MiB"]
    assert row[3] == "20"
