"""Weights for PicoDet from three sources: our checkpoints, PaddleDetection `.pdparams`,
and the initializers of ONNX exports made by paddle2onnx.

ONNX exports fold every BatchNorm into the preceding convolution (those that keep it as a
BatchNormalization node are folded here) and rename tensors,
so they are matched by position: the graph lists convolutions in the order Paddle ran
them, and our modules run theirs in the same order. Each folded (weight, bias) goes
into our conv with its BatchNorm set to the identity plus that bias; shapes are
checked one by one, so an export of another architecture is refused, not misloaded.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shitu.checkpoint.io import DETECTOR_FORMAT_PREFIX
from shitu.checkpoint.paddle import read_pdparams
from shitu.detection.detector import exported_class_names
from shitu.detection.model import ARCHS, PicoDet, PicoDetArch, build_picodet, resolve_arch
from shitu.engine.state import training_state_kind
from shitu.errors import CheckpointError
from shitu.fileio import torch_save_atomically
from shitu.onnx_input import graph_input_shape, image_input_size

CHECKPOINT_FORMAT = f"{DETECTOR_FORMAT_PREFIX}-1"


def save_detector(model: PicoDet, path: str | Path) -> Path:
    """Our checkpoint: architecture + state dict (loadable with weights_only), written
    atomically: a full disk or a stopped run leaves the earlier file, not a truncated one,
    and a refused write is a CheckpointError naming the file."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "arch": model.arch.to_dict(),
        "state_dict": model.state_dict(),
    }
    return torch_save_atomically(payload, Path(path))


def load_detector_checkpoint(path: str | Path) -> PicoDet:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"detector checkpoint not found: {path}") from None
    except Exception:  # torch's messages here are about unpickling, not about the file
        raise CheckpointError(
            f"{path} is not a readable detector checkpoint (expected a .pt file from `shitu "
            "detect-train`, an .onnx or a .pdparams file)"
        ) from None
    kind = training_state_kind(data)
    if kind == "detector":
        what = f"{path} is a detector training checkpoint (for `shitu detect-train --resume`)"
        if (Path(path).parent / "model.pt").is_file():
            raise CheckpointError(f"{what}; give the model.pt its run wrote beside it instead")
        # A run stopped early has written no model.pt, which the advice above sent users to
        done = int(data["progress"].get("epoch", 0))
        export = (
            f"; to use what it has learnt, resume it with --epochs {done} (the epochs it has "
            "done), which writes them without training on"
            if done
            else ""
        )
        raise CheckpointError(
            f"{what} of a run that has not ended: it writes model.pt and model.onnx beside "
            f"it when it does{export}"
        )
    if kind == "recognition":  # a run's latest.pt of the other trainer, found in output/
        raise CheckpointError(
            f"{path} is a recognition model's training checkpoint (`shitu train`'s), not a "
            "detector; give a detector: the model.pt or model.onnx `shitu detect-train` "
            "writes, a PaddleDetection .pdparams or an ONNX export"
        )
    if isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        # a state dict: `shitu train`'s weights (a .safetensors torch reads too), given as
        # --detector by mistake, or a detector's saved without its architecture
        raise CheckpointError(
            f"{path} holds weights alone (a state dict, as `shitu train`'s .safetensors do), "
            "not a detector checkpoint, which carries its architecture; give the model.pt or "
            "model.onnx `shitu detect-train` writes, a PaddleDetection .pdparams (with "
            "--det-arch) or an ONNX export"
        )
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a shitu PicoDet checkpoint (no '{CHECKPOINT_FORMAT}')"
        )
    model = PicoDet(PicoDetArch.from_dict(data["arch"]))
    _load_state(model, data["state_dict"], path)
    return model.eval()


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise CheckpointError(
                f"{source}: '{name}' has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(own[name].shape)}"
            )
    model.load_state_dict(state)


# --- PaddleDetection .pdparams -------------------------------------------------------------

_ESNET_KEEP = re.compile(r"\d+_\d+|conv[12]|weight|bias|_mean|_variance")


def _esnet_paddle_key(key: str) -> str:
    """backbone.blocks.2_1.conv_dw_1.conv.weight -> backbone.2_1._conv_dw_1._conv.weight."""
    parts = key.split(".")[1:]
    if parts[0] == "blocks":
        parts = parts[1:]
    out = []
    for i, part in enumerate(parts):
        if part == "conv" or part == "bn":
            out.append("_conv" if part == "conv" else "_batch_norm")
        elif _ESNET_KEEP.fullmatch(part) and not (part == "conv1" and i == 0):
            out.append(part)
        else:
            out.append(f"_{part}")
    return ".".join(["backbone", *out])


def paddle_key(key: str, arch: PicoDetArch) -> str:
    """Name of our state-dict entry `key` in a PaddleDetection PicoDet `.pdparams`."""
    key = key.replace("running_mean", "_mean").replace("running_var", "_variance")
    if key.startswith("backbone.") and arch.backbone == "ESNet":
        return _esnet_paddle_key(key)
    match = re.fullmatch(r"head\.conv_feat\.levels\.(\d+)\.(\d+)\.(conv|bn)\.(.+)", key)
    if match:
        level, index, layer, leaf = match.groups()
        kind = "dw" if int(index) % 2 == 0 else "pw"
        return (
            f"head.conv_feat.cls_conv_{kind}{level}.{int(index) // 2}."
            f"{'conv' if layer == 'conv' else 'norm'}.{leaf}"
        )
    return re.sub(r"^head\.head_cls\.(\d+)\.", r"head.head_cls\1.", key)


def load_pdparams(path: str | Path, arch: str | PicoDetArch | dict) -> PicoDet:
    """A PicoDet with the weights of a PaddleDetection (legacy PicoHead) `.pdparams`, with
    as many classes as its head scores (`_head_classes`)."""
    named = resolve_arch(arch)  # an unknown name said first, before the file is read
    paddle_state = read_pdparams(path)
    model = build_picodet(_head_classes(named, paddle_state))
    state = {}
    for key in model.state_dict():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros((), dtype=torch.long)
            continue
        name = paddle_key(key, model.arch)
        if name not in paddle_state:
            raise CheckpointError(f"{path}: no '{name}' (for {key}); is the architecture right?")
        state[key] = torch.from_numpy(np.ascontiguousarray(paddle_state[name]))
    _load_state(model, state, path)
    return model.eval()


def _head_classes(arch: PicoDetArch, paddle_state: dict[str, np.ndarray]) -> PicoDetArch:
    """`arch` with the class count of the file's head: PaddleDetection users fine-tune the
    named architectures on their own classes, and a VOC-trained PicoDet-S (20 classes) was
    refused for the shape of its head. The class names go with another count."""
    head = paddle_state.get(paddle_key("head.head_cls.0.weight", arch))
    if head is None:  # named as missing when the weights are read
        return arch
    return _with_class_count(arch, head.shape[0] - 4 * (arch.reg_max + 1))


def _with_class_count(arch: PicoDetArch, num_classes: int) -> PicoDetArch:
    """`arch` scoring `num_classes` classes, its class names dropped when the count differs
    (they name other classes); unchanged for a count of 0 or less, a head that fits no
    count, which the shape check refuses."""
    if num_classes <= 0 or num_classes == arch.num_classes:
        return arch
    return replace(arch, num_classes=num_classes, class_names=())


# --- ONNX exports (paddle2onnx) --------------------------------------------------------------


def _onnx_model(path: str | Path) -> Any:
    import onnx

    try:
        return onnx.load(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"ONNX model not found: {path}") from None
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable ONNX model: {exc}") from None


def _onnx_convs(path: str | Path, graph: Any) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(weight, bias) of every Conv node, in graph order, with constants resolved."""
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:  # in graph order: an Identity's input comes before it
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in values:
            # torch's exporter stores equal tensors once (a fresh model's zero biases, say)
            # and hands each further user an Identity of it
            values[node.output[0]] = values[node.input[0]]
    convs: list[tuple[np.ndarray, np.ndarray | None]] = []
    made_by: dict[str, int] = {}  # a conv's output -> its place in `convs`
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            # Kept unfolded (an export without constant folding): its statistics were
            # otherwise dropped, the conv's output taken as final.
            index = _conv_of(path, node, made_by)
            convs[index] = _fold_batch_norm(path, node, convs[index], values)
        if node.op_type != "Conv":
            continue
        weight = values.get(node.input[1])
        if weight is None:
            raise CheckpointError(f"{path}: conv '{node.name}' has a computed weight")
        bias = None  # none in the graph (no input, or an empty name: the optional one left out)
        if len(node.input) > 2 and node.input[2]:
            bias = values.get(node.input[2])
            if bias is None:  # else taken for none: the model loaded with wrong weights
                raise CheckpointError(f"{path}: conv '{node.name}' has a computed bias")
        made_by[node.output[0]] = len(convs)
        convs.append((weight, bias))
    return convs


def _conv_of(path: str | Path, node: Any, made_by: dict[str, int]) -> int:
    """The place in the conv list of the conv whose output BatchNormalization `node` takes;
    a CheckpointError where none does (a PicoDet normalises only conv outputs)."""
    if node.input[0] not in made_by:
        raise CheckpointError(
            f"{path}: BatchNormalization '{node.name}' does not follow a convolution; it is "
            "not a PicoDet export"
        )
    return made_by[node.input[0]]


def _fold_batch_norm(
    path: str | Path,
    node: Any,
    conv: tuple[np.ndarray, np.ndarray | None],
    values: dict[str, np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """`conv`'s (weight, bias) with BatchNormalization `node` (inference mode) folded in."""
    try:
        scale, shift, mean, variance = (values[name] for name in node.input[1:5])
    except KeyError:
        raise CheckpointError(
            f"{path}: BatchNormalization '{node.name}' has computed inputs"
        ) from None
    epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
    weight, bias = conv
    factor = scale / np.sqrt(variance + np.float32(epsilon))
    folded_bias = ((0.0 if bias is None else bias) - mean) * factor + shift
    return weight * factor[:, None, None, None], folded_bias.astype(weight.dtype)


def _execution_order(model: PicoDet) -> list[tuple[nn.Conv2d, nn.BatchNorm2d | None]]:
    """Our convs in the order they run, each with the BatchNorm that directly follows it."""
    order: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda mod, _i, _o: order.append(mod))
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.BatchNorm2d)
    ]
    size = model.arch.input_size
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    pairs = []
    for i, module in enumerate(order):
        if isinstance(module, nn.Conv2d):
            nxt = order[i + 1] if i + 1 < len(order) else None
            pairs.append((module, nxt if isinstance(nxt, nn.BatchNorm2d) else None))
    return pairs


def _fits(model: PicoDet, convs: list[tuple[np.ndarray, np.ndarray | None]]) -> bool:
    pairs = _execution_order(model)
    return len(pairs) == len(convs) and all(
        tuple(conv.weight.shape) == w.shape for (conv, _), (w, _b) in zip(pairs, convs, strict=True)
    )


def load_onnx_weights(path: str | Path, arch: str | PicoDetArch | dict | None = None) -> PicoDet:
    """A PicoDet carrying the weights of a paddle2onnx export of PicoDet.

    `arch`, or without it each known architecture, is tried at the export's class count,
    and the one whose every conv shape matches is used. The model runs at the input size
    the export was made for, as onnxruntime would run the file.
    """
    exported = _onnx_model(path)
    graph = exported.graph
    convs = _onnx_convs(path, graph)
    if not convs:
        raise CheckpointError(f"{path}: has no convolutions; it is not a PicoDet export")
    num_classes = convs[-1][0].shape[0] - 4 * 8  # the head's last conv: classes + 4 x 8 bins
    size = image_input_size(graph_input_shape(graph), path)
    # PicoDet sizes are square: a non-square or dynamic export runs at the arch's default
    fixed = {"input_size": size[0]} if size and size[0] == size[1] else {}
    # The export's own class count, also for a named architecture: PaddleDetection users
    # fine-tune the named ones on their own classes, as detect-train trains them.
    candidates = [
        _with_class_count(resolve_arch(name, **fixed), num_classes)
        for name in ([arch] if arch is not None else ARCHS)
    ]
    model = next((m for m in map(build_picodet, candidates) if _fits(m, convs)), None)
    if model is None and arch is not None:  # the name given (--arch, --det-arch) said
        given = arch if isinstance(arch, str) else "the one given"
        raise CheckpointError(
            f"{path}: its convolutions do not match the PicoDet architecture {given}; without "
            f"an architecture named, each known one is tried ({', '.join(ARCHS)})"
        )
    if model is None:
        raise CheckpointError(
            f"{path}: its convolutions match no PicoDet architecture ({', '.join(ARCHS)})"
        )
    with torch.no_grad():
        for (conv, bn), (weight, bias) in zip(_execution_order(model), convs, strict=True):
            conv.weight.copy_(torch.from_numpy(weight.copy()))
            if conv.bias is not None:
                if bias is None:  # none in the graph: its conv's output goes on as it is
                    conv.bias.zero_()
                else:
                    conv.bias.copy_(torch.from_numpy(bias.copy()))
            elif bn is not None:
                bn.weight.fill_(1.0)
                if bias is not None:  # none in the graph: its conv's output goes on as it is
                    bn.bias.copy_(torch.from_numpy(bias.copy()))
                else:
                    bn.bias.zero_()
                # torch types them optional (no statistics kept): a PicoDet's BatchNorms keep them
                assert bn.running_mean is not None and bn.running_var is not None
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0 - bn.eps)
            elif bias is not None and np.any(bias != 0):
                raise CheckpointError(f"{path}: a conv without BatchNorm carries a bias")
    names = exported_class_names({entry.key: entry.value for entry in exported.metadata_props})
    if len(names) == model.arch.num_classes:  # our export's, as onnxruntime reads them
        model.arch = replace(model.arch, class_names=names)
    return model.eval()
