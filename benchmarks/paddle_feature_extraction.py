"""Runs inside the Paddle reference venv (tests/parity/paddle_env.py) for feature_extraction.py.

python paddle_feature_extraction.py build OUT_DIR IMAGE_LIST
    PaddleClas PP-LCNetV2_base ShiTu + BNNeck (no head), random weights with realistic
    BatchNorm statistics (the parity tests' recipe, measured on the listed images):
    writes OUT_DIR/model.pdparams, the re-parameterised Paddle Inference model
    OUT_DIR/inference.{json,pdiparams} and its paddle2onnx export OUT_DIR/paddle2onnx.onnx.
python paddle_feature_extraction.py run MODEL_DIR IMAGE_LIST BATCH THREADS OUT.npy
    Paddle Inference (oneDNN/MKLDNN on, the fastest CPU path) end-to-end from the JPEG
    files, with PaddleClas's deployment preprocessing done the same way (OpenCV decode,
    cv2 bilinear resize, numpy normalise, serially). Prints one JSON line with timings.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "parity"))
sys.path.insert(0, str(HERE))

try:
    import paddle
except ModuleNotFoundError:  # run from the project's environment by mistake
    sys.exit(
        "paddle_feature_extraction.py runs inside the Paddle reference venv; run "
        "benchmarks/feature_extraction.py, which builds that venv and calls this script"
    )
from deploy_preprocess import SIZE, batch  # noqa: E402
from paddle import inference  # noqa: E402
from paddle_reference import randomise_batchnorm, rec_model  # noqa: E402


class FeaturesOnly(paddle.nn.Layer):
    """The deployed graph: image batch -> embedding (PaddleClas's RecModel returns a dict)."""

    def __init__(self, model: paddle.nn.Layer) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.model(x)["features"]


def build(out_dir: Path, paths: list[str]) -> None:
    paddle.set_device("cpu")
    paddle.seed(2024)
    model = rec_model("PPLCNetV2_base_ShiTu", {"name": "FC", "embedding_size": 512, "class_num": 1})
    model.head = None
    inputs = paddle.to_tensor(batch(paths[:16]))
    randomise_batchnorm(model, inputs, np.random.default_rng(2024))
    model.eval()
    paddle.save(model.state_dict(), str(out_dir / "model.pdparams"))
    for layer in model.sublayers():
        if hasattr(layer, "re_parameterize"):
            layer.re_parameterize()
    spec = [paddle.static.InputSpec([None, 3, SIZE, SIZE], "float32", "x")]
    paddle.jit.save(FeaturesOnly(model), str(out_dir / "inference"), input_spec=spec)
    import paddle2onnx

    model_file = next(out_dir.glob("inference.json"), out_dir / "inference.pdmodel")
    paddle2onnx.export(
        str(model_file),
        str(out_dir / "inference.pdiparams"),
        str(out_dir / "paddle2onnx.onnx"),
        opset_version=17,
        enable_onnx_checker=True,
    )


def run(model_dir: Path, paths: list[str], batch_size: int, threads: int, out: Path) -> None:
    model_file = next(model_dir.glob("inference.json"), model_dir / "inference.pdmodel")
    config = inference.Config(str(model_file), str(model_dir / "inference.pdiparams"))
    config.disable_gpu()
    config.enable_mkldnn()
    config.set_mkldnn_cache_capacity(10)
    config.set_cpu_math_library_num_threads(threads)
    config.switch_ir_optim(True)
    config.disable_glog_info()
    predictor = inference.create_predictor(config)
    feed = predictor.get_input_handle(predictor.get_input_names()[0])
    fetch = predictor.get_output_handle(predictor.get_output_names()[0])

    def infer(chunk: list[str]) -> np.ndarray:
        images = batch(chunk)
        feed.reshape(images.shape)
        feed.copy_from_cpu(images)
        predictor.run()
        return fetch.copy_to_cpu()

    infer(paths[:batch_size])  # warm-up: oneDNN primitive creation for this shape
    start = time.perf_counter()
    features = [infer(paths[i : i + batch_size]) for i in range(0, len(paths), batch_size)]
    seconds = time.perf_counter() - start
    np.save(out, np.concatenate(features))
    print(json.dumps({"images": len(paths), "seconds": seconds, "paddle": paddle.__version__}))


def main() -> None:
    arguments = {"build": 4, "run": 7}  # argv lengths, the script's name included
    if len(sys.argv) < 2 or arguments.get(sys.argv[1]) != len(sys.argv):
        sys.exit(__doc__)  # its usage lines
    command, target = sys.argv[1], Path(sys.argv[2])
    paths = Path(sys.argv[3]).read_text().splitlines()
    if command == "build":
        build(target, paths)
    else:
        run(target, paths, int(sys.argv[4]), int(sys.argv[5]), Path(sys.argv[6]))


if __name__ == "__main__":
    main()
