"""Does a class-agnostic detector find the product in Grocery Store val photos, and does
recognising its top box beat recognising the whole photo?

For each val photo: the detector's best box (score >= threshold, any class), its area over
the image area, and the top-1 label of (a) the whole photo and (b) the top box's crop,
searched against the train photos as gallery with the shipped (or given) recogniser.
Prints: photos with no box; photos whose top box covers >= 30% of the image; of those,
the crop recognised correctly; and recall@1 of whole-photo vs top-box recognition (the
whole photo standing in where no box passes). Without box annotations this is the
measurable stand-in for "IoU >= 0.5 with the product".

    python benchmarks/detector_coverage.py \
        --model ../shared/models/picodet_s_coco/picodet_s_416_coco.onnx
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from arguments import benchmark_parser, fraction
from common import every_feature, grocery_root
from tqdm import tqdm

from shitu.detection import load_detector
from shitu.inference import FeatureExtractor, default_model_dir
from shitu.inference.preprocess import read_rgb


def split(root: Path, name: str) -> tuple[list[Path], np.ndarray]:
    rows = [line.split(",") for line in (root / name).read_text().splitlines() if line.strip()]
    return [root / row[0].strip() for row in rows], np.array([int(row[1]) for row in rows])


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--model", required=True, help="detector (ONNX / checkpoint)")
    parser.add_argument("--rec-model", help="exported recogniser (default: the shipped one)")
    parser.add_argument(
        "--data",
        default=grocery_root(),
        help="Grocery Store folder",
    )
    parser.add_argument("--threshold", type=fraction, default=0.3, help="lowest box score")
    parser.add_argument(
        "--min-coverage",
        type=fraction,
        default=0.3,
        help="box area over image area for a photo to count as covered",
    )
    args = parser.parse_args()

    root = Path(args.data)
    detector = load_detector(args.model)
    extractor = FeatureExtractor.load(args.rec_model or default_model_dir())
    gallery_paths, gallery_labels = split(root, "train.txt")
    gallery = every_feature(extractor, gallery_paths, progress=sys.stderr.isatty())
    query_paths, query_labels = split(root, "val.txt")

    coverage = np.zeros(len(query_paths))
    whole_images, crops = [], []
    bar = tqdm(query_paths, desc="detect", unit="img", disable=not sys.stderr.isatty())
    for i, path in enumerate(bar):  # no bar where stderr is a log: it would fill with redraws
        image = read_rgb(path)
        whole_images.append(image)
        boxes = detector.detect(image, args.threshold, max_boxes=1, class_agnostic=True)
        if len(boxes) == 0:
            crops.append(image)
            continue
        x1, y1, x2, y2 = (round(float(v)) for v in boxes[0, 2:])
        coverage[i] = (x2 - x1) * (y2 - y1) / (image.shape[0] * image.shape[1])
        crops.append(image[max(0, y1) : max(y1 + 1, y2), max(0, x1) : max(x1 + 1, x2)])

    def top1(images: list[np.ndarray]) -> np.ndarray:
        features = extractor.extract_images(images)
        return gallery_labels[np.argmax(features @ gallery.T, axis=1)]

    whole_right = top1(whole_images) == query_labels
    crop_right = top1(crops) == query_labels
    covered = coverage >= args.min_coverage
    print(
        f"detector {Path(args.model).name}, score >= {args.threshold}; recogniser "
        f"{args.rec_model or 'shipped default'}; {len(query_paths)} val photos, train gallery"
    )
    print(
        f"| no box | top box >= {args.min_coverage:.0%} of image | ... and its crop recognised "
        "| recall@1 whole photo | recall@1 top box (whole photo if none) |"
    )
    print("|---:|---:|---:|---:|---:|")
    print(
        f"| {np.mean(coverage == 0):.1%} | {np.mean(covered):.1%} | "
        f"{np.mean(covered & crop_right):.1%} | {np.mean(whole_right):.4f} | "
        f"{np.mean(crop_right):.4f} |"
    )


if __name__ == "__main__":
    main()
