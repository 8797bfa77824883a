"""End-to-end recognition latency on this CPU: ms per image file (decode, detect, crop,
embed, search, NMS), for a photo of 1 product and one of 4, with and without a detector.

The photos are the demo's generated products; the gallery holds random vectors (search
cost only depends on its size). Without --model, the shipped default model is used if
installed, else the default architecture (PP-LCNetV2 base) is exported with random weights.

    python benchmarks/pipeline_latency.py --threads 1 \
        --picodet ../shared/models/picodet_s_coco/picodet_s_320_coco.onnx
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from arguments import benchmark_parser, count, existing_file
from common import model_dir, random_gallery

from shitu.demo import make_demo_set
from shitu.detection import OnnxDetector
from shitu.index import Gallery
from shitu.inference import FeatureExtractor
from shitu.inference.preprocess import read_rgb
from shitu.pipeline import PlainBackgroundDetector, Recognizer

REPO = Path(__file__).resolve().parent.parent
PICODET = REPO.parent / "shared" / "models" / "picodet_s_coco" / "picodet_s_320_coco.onnx"


def ms_per_image(recognizer: Recognizer, path: Path, repeats: int) -> tuple[float, int]:
    """Mean wall time of recognising one file, and how many crops each run embeds."""
    list(recognizer.recognize_files([path]))  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        list(recognizer.recognize_files([path]))
    elapsed = (time.perf_counter() - start) / repeats * 1000
    return elapsed, len(recognizer.candidate_boxes(read_rgb(path)))


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--model", help="exported model folder")
    parser.add_argument(
        "--picodet",
        type=existing_file,
        help=f"PicoDet ONNX (default: {PICODET}, skipped if absent)",
    )
    parser.add_argument("--gallery-size", type=count, default=10000, help="random gallery vectors")
    parser.add_argument("--repeats", type=count, default=5, help="timed runs per photo")
    parser.add_argument("--threads", type=count, default=1, help="model and detector threads")
    args = parser.parse_args()
    picodet = args.picodet or (PICODET if PICODET.is_file() else None)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        demo = make_demo_set(tmp / "demo")
        photos = {1: tmp / "demo" / "queries" / "lemon_soda.jpg", 4: demo.shelves[0][0]}
        extractor = FeatureExtractor.load(model_dir(args.model, tmp), num_threads=args.threads)
        random_gallery(tmp / "gallery", extractor, args.gallery_size)
        detectors: dict[str, object] = {"none": None, "plain-background": PlainBackgroundDetector()}
        if picodet:
            detectors[picodet.stem] = OnnxDetector(picodet, threads=args.threads)
        rows = []
        for name, detector in detectors.items():
            with Recognizer(
                extractor, Gallery.open(tmp / "gallery"), detector, det_threshold=0.3
            ) as recognizer:
                for objects, path in photos.items():
                    ms, crops = ms_per_image(recognizer, path, args.repeats)
                    rows.append((name, objects, crops, ms))
    print(f"model: {extractor.embedding_size}-d, gallery: {args.gallery_size} vectors (Flat IP), "
          f"threads: {args.threads}, repeats: {args.repeats}\n")  # fmt: skip
    print("| detector | objects in photo | crops embedded | ms / image |")
    print("|---|---|---|---|")
    for name, objects, crops, ms in rows:
        print(f"| {name} | {objects} | {crops} | {ms:.1f} |")


if __name__ == "__main__":
    main()
