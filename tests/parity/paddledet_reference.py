"""Runs inside the paddledet venv: builds PaddleDetection PicoDets with random weights and
saves, per architecture, the .pdparams, the raw head outputs and the NMS result.

usage: paddledet_reference.py OUT_DIR   (reads OUT_DIR/inputs_<arch>.npy)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import paddle
from ppdet.modeling.assigners.simota_assigner import SimOTAAssigner
from ppdet.modeling.backbones.esnet import ESNet
from ppdet.modeling.backbones.lcnet import LCNet
from ppdet.modeling.heads.pico_head import PicoFeat, PicoHead
from ppdet.modeling.layers import MultiClassNMS
from ppdet.modeling.losses.gfocal_loss import DistributionFocalLoss
from ppdet.modeling.losses.iou_loss import GIoULoss
from ppdet.modeling.losses.varifocal_loss import VarifocalLoss
from ppdet.modeling.necks.csp_pan import CSPPAN

ARCHS = {
    "picodet_s_esnet": {
        "backbone": lambda: ESNet(
            scale=0.75,
            feature_maps=[4, 11, 14],
            act="hard_swish",
            channel_ratio=[0.875, 0.5, 0.5, 0.5, 0.625, 0.5, 0.625, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
        ),
        "in_channels": [96, 192, 384],
        "channels": 96,
        "num_convs": 2,
        "num_classes": 80,
    },
    "picodet_m_esnet": {
        "backbone": lambda: ESNet(
            scale=1.0,
            feature_maps=[4, 11, 14],
            act="hard_swish",
            channel_ratio=[
                0.875,
                0.5,
                1.0,
                0.625,
                0.5,
                0.75,
                0.625,
                0.625,
                0.5,
                0.625,
                1.0,
                0.625,
                0.75,
            ],
        ),
        "in_channels": [128, 256, 512],
        "channels": 128,
        "num_convs": 4,
        "num_classes": 80,
    },
    "picodet_lcnet_x2_5_mainbody": {
        "backbone": lambda: LCNet(scale=2.5, feature_maps=[3, 4, 5]),
        "in_channels": [320, 640, 1280],
        "channels": 128,
        "num_convs": 4,
        "num_classes": 1,
    },
}


class PicoDet(paddle.nn.Layer):
    def __init__(self, spec: dict) -> None:
        super().__init__()
        self.backbone = spec["backbone"]()
        self.neck = CSPPAN(
            in_channels=spec["in_channels"],
            out_channels=spec["channels"],
            num_features=4,
            spatial_scales=[0.125, 0.0625, 0.03125],  # fresh list: Paddle appends to it
        )
        feat = PicoFeat(
            feat_in=spec["channels"],
            feat_out=spec["channels"],
            num_fpn_stride=4,
            num_convs=spec["num_convs"],
            norm_type="bn",
            share_cls_reg=True,
        )
        self.head = PicoHead(
            conv_feat=feat,
            num_classes=spec["num_classes"],
            fpn_stride=[8, 16, 32, 64],
            reg_max=7,
            feat_in_chan=spec["channels"],
            cell_offset=0.5,
            nms=MultiClassNMS(
                nms_top_k=1000, keep_top_k=1000, score_threshold=0.3, nms_threshold=0.6
            ),
            loss_class=VarifocalLoss(use_sigmoid=True, iou_weighted=True),
            loss_dfl=DistributionFocalLoss(loss_weight=0.25),
            loss_bbox=GIoULoss(loss_weight=2.0),
            assigner=SimOTAAssigner(candidate_topk=10, iou_weight=6, num_classes=80),
        )


def randomise(model: paddle.nn.Layer, rng: np.random.Generator) -> None:
    """Non-trivial BatchNorm statistics; fan-in-scaled head tower convs (PaddleDetection starts
    them at std 0.01, which makes every cell score alike and NMS order a matter of ties)."""
    for name, param in model.state_dict().items():
        shape = param.shape
        if name.endswith("._mean"):
            value = rng.normal(0.0, 0.1, shape)
        elif name.endswith("._variance"):
            value = rng.uniform(0.5, 1.5, shape)
        elif ".bn" in name or ".norm." in name or "_batch_norm" in name:
            value = (
                rng.uniform(0.5, 1.5, shape)
                if name.endswith("weight")
                else rng.normal(0, 0.1, shape)
            )
        elif name.startswith("head.conv_feat") and name.endswith("conv.weight"):
            value = rng.normal(0.0, np.sqrt(1.0 / np.prod(shape[1:])), shape)
        elif name.startswith("head.head_cls") and name.endswith("bias"):
            value = rng.normal(-2.0, 0.5, shape)
        elif name.startswith("head.head_cls") and name.endswith("weight"):
            value = rng.normal(0.0, 0.05, shape)
        else:
            continue
        param.set_value(value.astype(np.float32))


def main() -> None:
    out = Path(sys.argv[1])
    paddle.set_device("cpu")
    rng = np.random.default_rng(0)
    for name, spec in ARCHS.items():
        paddle.seed(0)
        model = PicoDet(spec)
        randomise(model, rng)
        model.eval()
        paddle.save(model.state_dict(), str(out / f"{name}.pdparams"))
        inputs = np.load(out / f"inputs_{name}.npy")
        scores, regs, dets = [], [], []
        for image in inputs:
            x = paddle.to_tensor(image[None])
            feats = model.neck(model.backbone({"image": x}))
            cls_list, reg_list = model.head(feats, export_post_process=False)
            scores.append(np.concatenate([c.numpy() for c in cls_list], axis=1)[0])
            regs.append(np.concatenate([r.numpy() for r in reg_list], axis=1)[0])
            head_outs = model.head(feats, export_post_process=True)
            boxes, _num = model.head.post_process(head_outs, paddle.ones([1, 2], dtype="float32"))
            dets.append(boxes.numpy())
        np.save(out / f"scores_{name}.npy", np.stack(scores))
        np.save(out / f"reg_{name}.npy", np.stack(regs))
        np.savez(out / f"dets_{name}.npz", *dets)


if __name__ == "__main__":
    main()
