"""Config loading, overrides and the errors users see (a line per problem)."""

from __future__ import annotations

import functools
import inspect
import math
import os
import re
import textwrap
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

import pytest
from PIL import Image
from pydantic import BaseModel, ValidationError

from shitu import registry
from shitu.cli.main import main as shitu_main
from shitu.config import (
    apply_overrides,
    load_config,
    parse_override,
    resolve_config_path,
    shipped_configs,
)
from shitu.config.overrides import load_yaml
from shitu.config.schema import ShituConfig
from shitu.data.loader import build_dataset
from shitu.engine.trainer import check_training_sections
from shitu.errors import ConfigError
from shitu.pipeline import load_pipeline_config
from shitu.pipeline.defaults import PIPELINE_CONFIG_DIR
from shitu.registry import format_validation_error

MINIMAL = """
Arch:
  Backbone:
    name: PPLCNetV2_small_ShiTu
  BackboneStopLayer:
    name: flatten
  Neck:
    name: BNNeck
    num_features: 512
  Head:
    name: ArcMargin
    embedding_size: 512
    class_num: 10
Loss:
  Train:
    - CELoss:
        weight: 1.0
        epsilon: 0.1
"""

# A DataLoader split's dataset as an -o flow mapping (no file is read when a config loads).
DATASET = "dataset: {name: ImageNetDataset, image_root: ., cls_label_path: train.txt}"


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "minimal.yaml"
    path.write_text(MINIMAL)
    return path


def test_parse_override_types_values_with_yaml():
    assert parse_override("Global.epochs=10") == (["Global", "epochs"], 10)
    assert parse_override("Global.device=cpu") == (["Global", "device"], "cpu")
    assert parse_override("Global.image_shape=[3, 128, 128]") == (
        ["Global", "image_shape"],
        [3, 128, 128],
    )
    assert parse_override("Global.checkpoints=") == (["Global", "checkpoints"], None)
    assert parse_override("Global.re_ranking=true") == (["Global", "re_ranking"], True)
    assert parse_override("Optimizer.lr.learning_rate=1e-5")[1] == 1e-5
    assert parse_override("Global.seed=1e3")[1] == 1000.0
    assert parse_override("Global.output_dir=run-1e-5")[1] == "run-1e-5"
    # Other text YAML cannot read stays text; quoted, a bracket starts text too.
    assert parse_override("Global.output_dir=a: b: c")[1] == "a: b: c"
    assert parse_override("Global.output_dir='[draft]'")[1] == "[draft]"
    assert parse_override("Loss.Train[0].CELoss.epsilon=0.2")[0] == [
        "Loss",
        "Train",
        0,
        "CELoss",
        "epsilon",
    ]
    assert parse_override("Loss.Train.0.CELoss.epsilon=0.2")[0] == [
        "Loss",
        "Train",
        0,
        "CELoss",
        "epsilon",
    ]


def test_a_path_override_starting_with_a_tilde_is_in_the_home_folder(
    monkeypatch, tmp_path, config_file
):
    """The shell does not expand `~` after `KEY=`: the config does, for path keys only, as
    for `--gallery ~/x`; a delimiter or label `~` is left as written."""
    monkeypatch.setenv("HOME", str(tmp_path))
    dataset = "DataLoader.Train.dataset"
    config = load_config(
        config_file,
        [
            "Global.output_dir=~/runs",
            "Global.pretrained_model=runs~/~1",
            "Global.checkpoints=~",
            f"{dataset}.name=LabelFileDataset",
            f"{dataset}.image_root=~/data",
            f"{dataset}.cls_label_path=~/train.txt",
            f"{dataset}.delimiter='~'",
        ],
    )
    assert config.Global.output_dir == f"{tmp_path}/runs"
    assert config.Global.pretrained_model == "runs~/~1"
    assert config.Global.checkpoints is None  # YAML's null
    params = registry.DATASETS.validate("LabelFileDataset", config.DataLoader.Train.dataset.params)
    assert params["image_root"] == f"{tmp_path}/data"
    assert params["delimiter"] == "~"
    pipeline = load_pipeline_config(None, ["IndexProcess.index_dir=~/lib"])
    assert pipeline.IndexProcess.index_dir == f"{tmp_path}/lib"


def test_no_weight_decay_names_given_as_a_list_are_taken(config_file):
    """`[bn, bias]`, the YAML list a user writes for several names: refused as 'not a valid
    string', where PaddleClas's form is one space-separated string."""
    optimizer = "Optimizer={name: SGD, lr: {name: Cosine, learning_rate: 0.1}}"
    config = load_config(config_file, [optimizer, "Optimizer.no_weight_decay_name=[bn, bias]"])
    assert config.Optimizer.no_weight_decay_name == "bn bias"
    with pytest.raises(ConfigError, match="no_weight_decay_name: Input should be a valid string"):
        load_config(config_file, [optimizer, "Optimizer.no_weight_decay_name=[bn, 3]"])


def test_a_path_in_a_config_file_starting_with_a_tilde_is_in_the_home_folder(monkeypatch, tmp_path):
    """As in an `-o` value: `~/runs` in a YAML file made a folder named `~` in the working
    directory. Only path keys: a bare `~` is YAML's null, and other text is left as written."""
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "tilde.yaml"
    dataset = "{name: GroceryStoreDataset, image_root: ~/data, cls_label_path: [~/a, ~/b]}"
    optimizer = "{name: SGD, lr: {name: Cosine, learning_rate: 0.1}, no_weight_decay_name: ~bn}"
    path.write_text(
        f"{MINIMAL}Global: {{output_dir: ~/runs, pretrained_model: ~/w.pt, checkpoints: ~}}\n"
        f"DataLoader:\n  Train:\n    dataset: {dataset}\nOptimizer: {optimizer}\n"
    )
    config = load_config(path)
    assert config.Global.output_dir == f"{tmp_path}/runs"
    assert config.Global.pretrained_model == f"{tmp_path}/w.pt"
    assert config.Global.checkpoints is None
    assert config.Optimizer.no_weight_decay_name == "~bn"
    dataset_params = config.DataLoader.Train.dataset.params
    params = registry.DATASETS.validate("GroceryStoreDataset", dataset_params)
    assert params["image_root"] == f"{tmp_path}/data"
    assert params["cls_label_path"] == [f"{tmp_path}/a", f"{tmp_path}/b"]
    backbone = registry.BACKBONES.validate("EfficientNetLite0", {"pretrained": "~/b.pt"})
    assert backbone["pretrained"] == f"{tmp_path}/b.pt"
    pipeline_file = tmp_path / "pipeline.yaml"
    pipeline_file.write_text("Global: {rec_inference_model_dir: ~/model}\n")
    pipeline_file.write_text(f"{pipeline_file.read_text()}IndexProcess: {{index_dir: ~/lib}}\n")
    pipeline = load_pipeline_config(pipeline_file)
    assert pipeline.Global.rec_inference_model_dir == f"{tmp_path}/model"
    assert pipeline.IndexProcess.index_dir == f"{tmp_path}/lib"


def test_an_override_into_a_list_by_an_items_name_gives_its_index(config_file):
    """`Loss.Train.CELoss.weight` (the index left out) was refused as 'Loss.Train is not a
    mapping': the override with the index of the item of that name is offered."""
    with pytest.raises(ConfigError) as refused:
        load_config(config_file, ["Loss.Train.CELoss.epsilon=0.2"])
    assert str(refused.value) == (
        f"{config_file}: override 'Loss.Train.CELoss.epsilon=0.2': Loss.Train is a list, whose "
        "CELoss is item 0: -o Loss.Train.0.CELoss.epsilon=0.2"
    )
    items = [{"Op": {"size": 1}}, {"Op": {"size": 2}}]
    with pytest.raises(ConfigError) as refused:
        apply_overrides({"L": items}, ["L.Op.size=[3, 3]"])
    assert str(refused.value) == (
        "override 'L.Op.size=[3, 3]': L is a list: name its item by index (Op is at 0, 1), 0 to 1"
    )
    with pytest.raises(ConfigError) as refused:
        apply_overrides({"L": [{"Op": {}}, {"Other": {}}]}, ["L.Op.size=[3, 3]"])
    assert str(refused.value).endswith(": -o 'L.0.Op.size=[3, 3]'")
    # Another item's name under an item's index: a second loss added to item 0 (refused as
    # an item of two losses), where the one meant is item 1.
    with pytest.raises(ConfigError) as refused:
        load_config(
            config_file,
            [
                "Loss.Train=[{CELoss: {}}, {TripletLossV2: {}}]",
                "Loss.Train.0.TripletLossV2.margin=0.3",
            ],
        )
    assert str(refused.value) == (
        f"{config_file}: override 'Loss.Train.0.TripletLossV2.margin=0.3': Loss.Train[0] is "
        "CELoss, and TripletLossV2 is item 1: -o Loss.Train.1.TripletLossV2.margin=0.3"
    )


def test_apply_overrides_nested_paths_and_list_indices():
    raw = {"A": {"b": [{"c": 1}, {"c": 2}]}, "L": [1, 2, 3]}
    apply_overrides(raw, ["A.b[1].c=5", "L.0=9", "A.new.deep=x", "A.n.0=y"])
    assert raw == {
        "A": {"b": [{"c": 1}, {"c": 5}], "new": {"deep": "x"}, "n": {"0": "y"}},
        "L": [9, 2, 3],
    }


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("Global", "not of the form"),
        ("L.7=1", "index 7 out of range for L (length 3)"),
        ("A.b=1", "override 'A.b=1': A is not a mapping"),
        ("L.x=1", "override 'L.x=1': L is a list: name its item by index, 0 to 2"),
        ("A..b=1", "empty key segment"),
        # A list or mapping left open was taken for text, which the key then refused as
        # "not a valid list", showing the very list the user meant.
        (
            "L=[{c: 1}, {c: 2}",
            "override 'L=[{c: 1}, {c: 2}': the value is not valid YAML (expected ',' or ']'",
        ),
        ("A={b: 1", "override 'A={b: 1': the value is not valid YAML (expected ',' or '}'"),
    ],
)
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        apply_overrides({"A": 3, "L": [1, 2, 3]}, [override])


def test_load_applies_overrides_and_keeps_types(config_file):
    config = load_config(
        config_file,
        ["Global.epochs=7", "Arch.Head.margin=0.3", "Loss.Train[0].CELoss.epsilon=0.2"],
    )
    assert config.Global.epochs == 7
    assert config.Arch.Head.params["margin"] == 0.3
    assert config.Loss.Train[0]["CELoss"]["epsilon"] == 0.2
    assert config.Arch.BackboneStopLayer.name == "flatten"


def test_one_string_of_overrides_is_refused_naming_the_list_to_pass(config_file):
    """A string is iterable: read as the list, it gave one override per character
    ("override 'G' is not of the form KEY=VALUE")."""
    expected = "expected a list of 'KEY=VALUE' strings, got the string 'Global.epochs=7'"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(config_file, "Global.epochs=7")
    with pytest.raises(ConfigError, match=re.escape("pass ['Global.threshold=0.3']")):
        load_pipeline_config("inference_general", "Global.threshold=0.3")


def test_a_dict_of_overrides_is_refused_naming_the_list_to_pass(config_file):
    """Read as the list, each key was one override, refused as malformed ("override
    'Global.epochs' is not of the form ..."), which did not say that a dict is no list."""
    expected = "expected a list of 'KEY=VALUE' strings, got a dict; pass ['Global.epochs=7']"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(config_file, {"Global.epochs": 7})
    with pytest.raises(ConfigError, match=re.escape("pass ['Global.threshold=0.3']")):
        load_pipeline_config("inference_general", {"Global.threshold": 0.3})


def test_lr_mult_overrides_with_dotted_module_names():
    """A dotted override path and a flow mapping name the same module."""
    name = "GroceryStore_EfficientNetLite0"
    dotted = load_config(name, ["Optimizer.lr_mult.backbone.blocks=0.1"]).Optimizer.lr_mult
    assert dotted == {"backbone.blocks": 0.1, "backbone.head": 0.25}
    replaced = load_config(name, ["Optimizer.lr_mult={backbone.blocks: 0.1}"]).Optimizer.lr_mult
    assert replaced == {"backbone.blocks": 0.1}
    removed = load_config(name, ["Optimizer.lr_mult.backbone.head=null"]).Optimizer.lr_mult
    assert removed == {"backbone.blocks": 0.25}  # backbone.head back to the full rate
    # A numbered module (a block of a stage) is a key under the mapping, not a list index.
    numbered = load_config(name, ["Optimizer.lr_mult.backbone.blocks.0=0.1"]).Optimizer.lr_mult
    assert numbered["backbone.blocks.0"] == 0.1


def test_amp_off_survives_yaml(config_file):
    # `off` is text (YAML 1.2), and false, as a switch is written, means "off" too.
    assert load_config(config_file, ["Global.amp=off"]).Global.amp == "off"
    assert load_config(config_file, ["Global.amp=false"]).Global.amp == "off"
    assert load_config(config_file, ["Global.amp=bf16"]).Global.amp == "bf16"
    with pytest.raises(ConfigError, match="Global.amp"):
        load_config(config_file, ["Global.amp=true"])


def test_shipped_config_loads():
    assert "GeneralRecognitionV2_PPLCNetV2_base" in shipped_configs()
    config = load_config("GeneralRecognitionV2_PPLCNetV2_base")
    assert config.Arch.Backbone.name == "PPLCNetV2_base_ShiTu"
    assert config.Arch.Neck.params["num_features"] == 512


@pytest.mark.parametrize("name", shipped_configs())
def test_every_shipped_config_builds_its_model_and_losses(name):
    """Each shipped recipe's model runs and its training losses and optimizer construct
    (XBM's memory too; `Optimizer.lr_mult` names modules that exist)."""
    import torch

    from shitu.engine.optim import build_optimizer
    from shitu.losses.combined import CombinedLoss
    from shitu.models import build_model

    config = load_config(name)
    model = build_model(config.Arch).eval()
    with torch.no_grad():
        outputs = model(torch.zeros(1, 3, 64, 64))
    assert outputs["features"].ndim == 2
    loss = CombinedLoss(config.Loss.Train)
    assert loss.names
    optimizer = build_optimizer([model, loss], config.Optimizer, 0.1)
    multipliers = {group["lr_mult"] for group in optimizer.param_groups}
    assert multipliers == {1.0, *config.Optimizer.lr_mult.values()}


def test_metric_descending_takes_yes_and_on_as_true_as_switches_do(config_file):
    """`descending: yes` was refused ("only true ..., got 'yes'"), where a switch such as
    Global.eval_during_train reads yes and on as true; no and off are still refused."""
    assert load_config(config_file, ["Global.eval_during_train=yes"]).Global.eval_during_train
    for word in ("yes", "On"):
        config = load_config(config_file, [f"Metric.Eval=[{{mAP: {{descending: {word}}}}}]"])
        assert config.Metric.Eval == [{"mAP": {"descending": word}}]
    with pytest.raises(ConfigError) as info:
        load_config(config_file, ["Metric.Eval=[{mAP: {descending: off}}]"])
    assert (
        "Metric.Eval[0].mAP.descending: only true (higher similarity ranks first) is "
        "supported, got 'off'"
    ) in str(info.value)


def test_an_eval_metric_not_computed_is_refused_for_training_only(config_file):
    """Training picks its best model by Global.eval_metric, and stopped at one Metric.Eval
    does not compute once its model and data were built; `shitu eval` does not use it, and
    was refused all the same (for Metric.Eval's recall@10 alone, say)."""
    data = f"DataLoader={{Train: {{{DATASET}}}, Eval: {{Query: {{{DATASET}}}}}}}"
    optimizer = "Optimizer={name: SGD, lr: {name: Cosine, learning_rate: 0.1}}"
    config = load_config(config_file, ["Global.eval_metric=recall@10", data, optimizer])
    with pytest.raises(ConfigError) as info:
        check_training_sections(config)
    assert str(info.value) == (
        "Global.eval_metric: 'recall@10' is not computed; Metric.Eval gives recall@1, recall@5, mAP"
    )


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["Global.epocs=3"], "Global.epocs: unknown key (did you mean 'epochs'?)"),
        (["Global.epochs=many"], "Global.epochs: Input should be a valid integer"),
        (["Global.device=tpu"], "Global.device: Input should be"),
        (["Global.seed=-1"], "Global.seed: Input should be greater than or equal to 0"),
        (  # height, width, channels: was read as images 3 pixels wide
            ["Global.image_shape=[224, 224, 3]"],
            "Global.image_shape: must be [3, height, width] (channels first) with positive sizes",
        ),
        (["Global.seed=99999999999999999999"], "Global.seed: Input should be less than"),
        (
            ["Arch.Backbone.clas_expand=3"],
            "Arch.Backbone.clas_expand: unknown key (did you mean 'class_expand'?)",
        ),
        (["Arch.Head.class_num=ten"], "Arch.Head.class_num: Input should be a valid integer"),
        (["Arch.Head.class_num=0"], "Arch.Head.class_num: Input should be greater than 0"),
        (["Arch.Neck.num_features=-5"], "Arch.Neck.num_features: Input should be greater than 0"),
        (["Arch.Backbone.class_expand=0"], "Arch.Backbone.class_expand: Input should be greater"),
        (  # from sqrt(2 * 10 / 9) on, some class never scores above another
            ["Arch.Head={name: CosMargin, embedding_size: 512, class_num: 10, margin: 1.5}"],
            "Arch.Head.margin: must be above -2 and below 1.491",
        ),
        (["Arch.Neck.name=BNNek"], "Arch.Neck.name: unknown neck 'BNNek' (did you mean 'BNNeck'?)"),
        (  # names typed without their capitals
            ["Arch.Backbone.name=pplcnetv2_base"],
            "Arch.Backbone.name: unknown backbone 'pplcnetv2_base' (did you mean 'PPLCNetV2_base'?)",
        ),
        (
            ["Loss.Train.0={celoss: {}}"],
            "Loss.Train.0.celoss.name: unknown loss 'celoss' (did you mean 'CELoss'?)",
        ),
        (  # what a preset fixes is named as such, with the presets that have the value
            ["Arch.Backbone={name: EfficientNetLite0, variant: lite2}"],
            'Arch.Backbone.variant: fixed at "lite0" by this preset ("lite2" in '
            "EfficientNetLite2) in backbone 'EfficientNetLite0'",
        ),
        (  # a preset's constructor's rules hold as the config loads, not when it is built
            ["Arch.Backbone={name: EfficientNetLite0, gem_p: 3}"],
            "Arch.Backbone.gem_p: only pool 'gem' has an exponent, pool is 'avg' in backbone "
            "'EfficientNetLite0'",
        ),
        (["Arch.Head.embedding_size=null"], "Arch.Head.embedding_size"),
        (  # pydantic's words named its class ("instance of ComponentConfig")
            ["Arch.Backbone=PPLCNetV2_base"],
            "Arch.Backbone: a component is a mapping, {name: PPLCNetV2_base, ...} (got "
            "'PPLCNetV2_base') in the config",
        ),
        (["Global=3"], "Global: should be a mapping of its keys (got 3) in the config"),
        (
            ["Loss.Train.0.CELoss.epsilom=0.1"],
            "Loss.Train.0.CELoss.epsilom: unknown key (did you mean 'epsilon'?)",
        ),
        (["Loss.Train.0={TripletLossX: {}}"], "Loss.Train.0.TripletLossX.name: unknown loss"),
        (  # a misspelt loss name in a key path adds a second loss: the whole list was shown
            ["Loss.Train.0.CELos.weight=1"],
            "Loss.Train.0: holds 2 losses (CELoss, CELos); each item must be a single "
            "'{LossName: {params}}' mapping in the config (set by -o Loss.Train.0.CELos.weight=1)",
        ),
        (["Loss.Train.0.CELoss.weight=abc"], "Loss.Train.0.CELoss.weight: Input should be"),
        (["Loss.Train.0.CELoss.weight=-1"], "Loss.Train.0.CELoss.weight: Input should be greater"),
        (  # the probe ran on no loss at all ('list at least one loss'), or on weights of 0
            [
                "LinearProbe={epochs: 1, frozen_layers: [backbone]}",
                "Loss.Train=[{CELoss: {weight: 0}}, {FeatureDistillLoss: {}}]",
            ],
            "LinearProbe: the probe leaves out FeatureDistillLoss (nothing to learn while the "
            "backbone is frozen) and no other loss of Loss.Train has a weight, so the probe would "
            "learn nothing; give another loss a weight, or drop LinearProbe",
        ),
        (
            ["Loss.Train.0.CELoss.weight=0"],
            "Loss.Train: every loss has weight 0, so nothing is learnt; give one a weight (set by",
        ),
        (["Loss.Train.0.CELoss.input_key=nope"], "Loss.Train.0.CELoss.input_key: Input should be"),
        (["Optimizer.name=Lion"], "Optimizer"),
        (["Optimizer.momentum=-0.9"], "Optimizer.momentum: Input should be greater than or equal"),
        (["Optimizer.momentum=1"], "Optimizer.momentum: Input should be less than 1"),
        (["Optimizer.beta1=1.5"], "Optimizer.beta1: Input should be less than 1"),
        (["Optimizer.beta2=1"], "Optimizer.beta2: Input should be less than 1"),
        (["Optimizer.weight_decay=-1e-4"], "Optimizer.weight_decay: Input should be greater"),
        (  # weight_decay won without a word (PaddleClas keeps regularizer's, with a warning)
            [
                "Optimizer={name: SGD, lr: {name: Cosine, learning_rate: 0.1}, "
                "regularizer: {coeff: 1.0e-5}, weight_decay: 0.05}"
            ],
            "Optimizer: weight_decay (0.05) and regularizer (coeff 1e-05) both set the weight "
            "decay; keep one (e.g. -o Optimizer.regularizer=null) in the config",
        ),
        (  # refused as the config loads, not once training has built its data and model
            ["Optimizer.regularizer={name: L1, coeff: 1.0e-5}"],
            "Optimizer.regularizer.name: only L2 is supported (L1 is not a weight decay)",
        ),
        (  # a negative rate climbs the loss, without an error
            ["Optimizer={name: SGD, lr: {name: Cosine, learning_rate: 0.1, eta_min: -0.01}}"],
            "Optimizer.lr.eta_min: Input should be greater than or equal to 0",
        ),
        (
            [
                "Optimizer={name: SGD, lr: {name: Piecewise, learning_rate: 0.1, "
                "decay_epochs: [5], values: [0.1, -0.01]}}"
            ],
            "Optimizer.lr.values.1: Input should be greater than or equal to 0",
        ),
        (  # gamma was ignored, without a word
            [
                "Optimizer={name: SGD, lr: {name: Piecewise, learning_rate: 0.1, "
                "decay_epochs: [5], values: [0.1, 0.05], gamma: 0.1}}"
            ],
            "Optimizer.lr: Piecewise takes values or gamma, not both: gamma is unused",
        ),
        (
            ["Metric.Eval=[{Recallk: {topk: [1, abc]}}]"],
            "Metric.Eval[0].Recallk.topk: must be a positive integer or a list of them",
        ),
        (["Metrics.Eval=[]"], "Metrics: unknown key (did you mean 'Metric'?)"),
        (["Global.use_visualdl=true"], "Global.use_visualdl: shitu has no VisualDL logging"),
        (["Global.use_dali=true"], "Global.use_dali: shitu has no NVIDIA DALI loader"),
        (["Global.to_static=true"], "Global.to_static: shitu trains PyTorch's eager model"),
        (
            ["Arch.infer_add_softmax=true"],
            "Arch.infer_add_softmax: a recognition model exports features",
        ),
        (
            ["Arch.Neck.bias_attr={learning_rate: 1.0e-20}"],
            "Arch.Neck.bias_attr: unknown key (PaddleClas's bias settings; shitu's BNNeck "
            "takes bias_frozen, its FC head bias) in neck 'BNNeck'",
        ),
        (  # a PaddleClas AdamW setting, which was taken for a misspelt no_weight_decay_name
            ["Optimizer.one_dim_param_no_weight_decay=true"],
            "Optimizer.one_dim_param_no_weight_decay: unknown key (PaddleClas's switch; shitu "
            "never decays one-dimensional parameters (norms, biases) unless "
            "Optimizer.decay_norm_and_bias is true)",
        ),
        (
            ["Optimizer={name: SGD, lr: {name: Cosine, learning_rate: 0.1, by_epoch: true}}"],
            "Optimizer.lr.by_epoch: unknown key (PaddleClas's per-epoch stepping; shitu's "
            "schedules change the rate every step)",
        ),
        (  # a PaddleClas config's section, uncommented
            ["AMP={scale_loss: 65536, level: O1}"],
            "AMP: unknown key (PaddleClas's mixed precision; shitu's is Global.amp: bf16 or fp16)",
        ),
        (  # the section of PaddleClas's tools/infer.py, in its Products configs
            ["Infer={infer_imgs: demo.jpg, batch_size: 10}"],
            "Infer: unknown key (PaddleClas's tools/infer.py settings; shitu's inference takes "
            "the preprocessing `shitu export` records beside the model (DataLoader.Eval's), so "
            "remove the section)",
        ),
        (  # a PaddleClas Products config's classifier size
            ["Global.class_num=50030"],
            "Global.class_num: unknown key (PaddleClas's classifier size for its classification "
            "configs; shitu's is Arch.Head.class_num)",
        ),
        (["Global.eval_metric=map"], "Global.eval_metric: must be recall@K, "),
        (["Global.eval_metric=recall1"], "Global.eval_metric: must be recall@K, "),
        (["Global.re_ranking={k1: 0}"], "Global.re_ranking.k1: must be a positive integer"),
        (
            ["Global.re_ranking={k_1: 20}"],
            "Global.re_ranking.k_1: unknown parameter (did you mean 'k1'?)",
        ),
        (
            ["LinearProbe={epochs: 0, frozen_layers: [backbone]}"],
            "LinearProbe.epochs: Input should be greater than or equal to 1",
        ),
        (["LinearProbe={epochs: 5}"], "LinearProbe.frozen_layers: required key missing"),
        # The section the override makes, which the file lacks, is the override's.
        (["LinearProbe.epochs=5"], "LinearProbe.frozen_layers: required key missing"),
        (["Optimizer.lr.learning_rate=0.1"], "Optimizer.name: required key missing"),
        (  # refused as the config loads, not once the dataset was read
            [
                f"DataLoader.Train={{{DATASET}, sampler: {{name: PKSampler, batch_size: 8, "
                "sample_per_id: 4, id_list: [0, 9, 10], ratio: [2]}}"
            ],
            "DataLoader.Train.sampler.id_list: holds [first, last] class-id pairs and ratio one "
            "factor per pair (got 3 ids and 1 ratios)",
        ),
        (
            [f"DataLoader.Train={{{DATASET}, sampler: {{name: PKSampler, batch_size: 0}}}}"],
            "DataLoader.Train.sampler.batch_size: Input should be greater than 0",
        ),
        (
            [
                f"DataLoader.Train={{{DATASET}, sampler: {{name: PKSampler, batch_size: 8, "
                "sample_per_id: -4}}"
            ],
            "DataLoader.Train.sampler.sample_per_id: Input should be greater than 0",
        ),
    ],
)
def test_config_errors_name_file_key_and_override(config_file, overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(config_file, overrides)
    message = str(info.value)
    assert message.startswith(f"{config_file}: ")
    assert expected in message
    assert f"(set by -o {overrides[0]})" in message
    assert all(line.startswith("  ") for line in message.splitlines()[1:])  # one per problem


def test_a_preset_takes_what_it_fixes_at_its_own_value(config_file):
    """`variant: lite0` in an EfficientNetLite0 section, or `layers` in a ResNet50's as
    the preset has them, was an unknown key."""
    for backbone in (
        "{name: EfficientNetLite0, variant: lite0}",
        "{name: ResNet50, layers: [3, 4, 6, 3]}",
    ):
        backbone = load_config(config_file, [f"Arch.Backbone={backbone}"]).Arch.Backbone
        assert registry.BACKBONES.validate(backbone.name, backbone.params) == {}


def test_paddleclas_settings_that_ask_for_nothing_load(config_file):
    """PaddleClas's recognition configs carry switches for its tools (VisualDL, DALI,
    dynamic-to-static conversion, an exported softmax) and its vehicle dataset's name:
    turned off, as they ship, they load."""
    config = load_config(
        config_file,
        [
            "Global.use_visualdl=false",
            "Global.use_dali=false",
            "Global.to_static=false",
            "Arch.infer_add_softmax=false",
            "DataLoader.Eval={Query: {dataset: {name: VeriWild, image_root: ., "
            "cls_label_path: query.txt}}, Gallery: {dataset: {name: VeriWild, image_root: ., "
            "cls_label_path: gallery.txt}}}",
        ],
    )
    assert config.Global.use_visualdl is False and config.Arch.infer_add_softmax is False
    assert registry.DATASETS.get("VeriWild") is registry.DATASETS.get("ImageNetDataset")


@pytest.mark.parametrize(
    ("override", "key", "component"),
    [
        ("Global.epochs=true", "Global.epochs", "the config"),
        ("Global.seed=false", "Global.seed", "the config"),
        ("Global.image_shape=[3, true, 224]", "Global.image_shape", "the config"),
        (
            "Optimizer={name: SGD, lr: {name: Cosine, learning_rate: true}}",
            "Optimizer.lr.learning_rate",
            "the config",
        ),
        ("EMA.decay=true", "EMA.decay", "the config"),
        ("Arch.Head.class_num=true", "Arch.Head.class_num", "head 'ArcMargin'"),
        ("Arch.Head.margin=false", "Arch.Head.margin", "head 'ArcMargin'"),
    ],
)
def test_true_or_false_is_not_taken_for_a_number(config_file, override, key, component):
    """Pydantic reads true as 1 and false as 0: `epochs: true` would train one epoch and
    `class_num: true` build a one-class head, silently."""
    with pytest.raises(ConfigError) as info:
        load_config(config_file, [override])
    message = str(info.value)
    assert f"{key}" in message and "Input should be a number, not true/false" in message
    assert component in message and f"(set by -o {override})" in message
    # Where true/false are meant, they still are.
    settings = load_config(config_file, ["Global.re_ranking=true", "Arch.Neck.bias_frozen=true"])
    assert settings.Global.re_ranking is True


@pytest.mark.parametrize(
    "override",
    [
        "Global.max_det_results=true",
        "Global.threshold=false",
        "Global.batch_size=true",
        "IndexProcess.score_thres=true",
    ],
)
def test_true_or_false_is_not_taken_for_a_pipeline_number(override):
    """As in a training config: `max_det_results: true` kept one box and `threshold: false`
    every box, silently."""
    with pytest.raises(ConfigError) as info:
        load_pipeline_config(None, [override])
    message = str(info.value)
    assert override.partition("=")[0] in message
    assert "Input should be a number, not true/false" in message


def test_paths_that_yaml_reads_as_numbers_or_dates_are_text(config_file):
    """A run folder named by its date, or a data folder named by a year, is a path: YAML
    reads `2024-01-01` as a date and `2024` as a number, which a path setting refused."""
    dataset = "dataset: {name: ImageNetDataset, image_root: 2024, cls_label_path: 2024-01-01}"
    config = load_config(
        config_file,
        [
            "Global.output_dir=2024-01-01",
            "Global.pretrained_model=1.5",
            f"DataLoader.Train={{{dataset}}}",
        ],
    )
    assert config.Global.output_dir == "2024-01-01"
    assert config.Global.pretrained_model == "1.5"
    assert load_yaml("output_dir: 2024-01-01") == {"output_dir": "2024-01-01"}
    params = registry.DATASETS.validate("ImageNetDataset", config.DataLoader.Train.dataset.params)
    assert params["image_root"] == "2024" and params["cls_label_path"] == "2024-01-01"


def test_numbers_with_leading_zeros_or_colons_are_text_as_typed(config_file):
    """YAML 1.1 reads `010` as octal 8 and `12:30` as base 60 (750): a run folder given so
    became the folder `8` or `750`. A number key still reads `010` as 10."""
    for typed in ("010", "007", "12:30"):
        assert load_config(config_file, [f"Global.output_dir={typed}"]).Global.output_dir == typed
    assert load_config(config_file, ["Global.epochs=010"]).Global.epochs == 10
    assert load_yaml("[0, -3, 1_000, 0x1F, 1e-5, 2024]") == [0, -3, 1000, 31, 1e-5, 2024]


@pytest.mark.parametrize("word", ["on", "Off", "yes", "NO", "y", "n"])
def test_yes_no_on_off_are_text_where_text_is_meant(config_file, tmp_path, word):
    """YAML 1.1 reads these words as booleans, which a folder or library of that name
    (`-o Global.output_dir=on`, `image_root: no` in a file) became, refused as not text."""
    config = load_config(config_file, [f"Global.output_dir={word}"])
    assert config.Global.output_dir == word
    in_file = tmp_path / "words.yaml"
    dataset = f"{{name: ImageNetDataset, image_root: {word}, cls_label_path: {word}}}"
    in_file.write_text(f"{MINIMAL}DataLoader:\n  Train:\n    dataset: {dataset}\n")
    params = load_config(in_file).DataLoader.Train.dataset.params
    assert registry.DATASETS.validate("ImageNetDataset", params)["image_root"] == word
    pipeline = load_pipeline_config(None, [f"IndexProcess.index_dir={word}"])
    assert pipeline.IndexProcess.index_dir == word


def test_switches_still_take_true_false_and_yes_no(config_file):
    config = load_config(
        config_file,
        [
            "Global.use_tensorboard=yes",
            "Global.channels_last=off",
            "Global.eval_during_train=FALSE",
        ],
    )
    assert config.Global.use_tensorboard is True
    assert config.Global.channels_last is False and config.Global.eval_during_train is False
    assert load_yaml("[true, True, TRUE, false, False, FALSE, tRue]") == [
        True, True, True, False, False, False, "tRue"
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="Global.epochs"):
        load_config(config_file, ["Global.epochs=yes"])
    # A key taking a switch or a path (a backbone's weights): the word is the switch.
    for word, switch in (("no", False), ("On", True)):
        params = registry.BACKBONES.validate("EfficientNetLite0", {"pretrained": word})
        assert params["pretrained"] is switch


def test_switches_read_from_component_sections_take_yes_no(config_file, tmp_path, monkeypatch):
    """Parameters read before their component is built (an export's colour order, an
    evaluation sampler's drop_last) are typed as the component types them: `no` is false."""
    from shitu.engine.data import build_eval_loader
    from shitu.engine.distributed import init_distributed
    from shitu.inference.preprocess import Preprocessing

    (tmp_path / "photos" / "apple").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "apple" / "a.png")
    monkeypatch.chdir(tmp_path)
    ops = "[{DecodeImage: {to_rgb: no}}, {ResizeImage: {size: 8}}]"
    dataset = f"{{name: ImageFolderDataset, root: photos, transform_ops: {ops}}}"
    sampler = "{name: DistributedBatchSampler, batch_size: 8, drop_last: no}"
    split = f"{{dataset: {dataset}, sampler: {sampler}, loader: {{num_workers: 0}}}}"
    config = load_config(config_file, [f"DataLoader.Eval.Query={split}"])
    assert Preprocessing.from_config(config).channel_order == "BGR"
    query = config.DataLoader.Eval.Query
    loader = build_eval_loader(query, init_distributed("cpu"), seed=0, where="Query")
    assert len(loader.dataset) == 1


def test_every_problem_is_listed_on_its_own_line_naming_its_override(config_file, capsys):
    """Fixing the one problem shown must not merely uncover the next."""
    config_file.write_text(MINIMAL + "Global:\n  epocs: 3\n  sed: 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(config_file)
    assert str(info.value).splitlines() == [
        f"{config_file}: 2 problems in the config:",
        "  Global.epocs: unknown key (did you mean 'epochs'?)",
        "  Global.sed: unknown key (did you mean 'seed'?)",
    ]
    config_file.write_text(MINIMAL)
    assert shitu_main(["info", "-c", str(config_file), "-o", "Arch.Head.clas_num=3",
                       "Arch.Head.embedding_size=big"]) == 2  # fmt: skip
    assert capsys.readouterr().err.splitlines() == [
        f"error: {config_file}: 2 problems in head 'ArcMargin':",
        "  Arch.Head.clas_num: unknown key (did you mean 'class_num'?) (set by -o "
        "Arch.Head.clas_num=3)",
        "  Arch.Head.embedding_size: Input should be a valid integer, unable to parse string "
        "as an integer (got 'big') (set by -o Arch.Head.embedding_size=big)",
    ]
    many = [f"Global.typo{number}=1" for number in range(12)]
    with pytest.raises(ConfigError) as info:
        load_config(config_file, many)
    lines = str(info.value).splitlines()
    assert lines[0] == f"{config_file}: 12 problems in the config (the first 10):"
    assert lines[1:] == [
        f"  Global.typo{n}: unknown key (set by -o Global.typo{n}=1)" for n in range(10)
    ]


def test_problems_in_several_components_are_listed_together(config_file):
    """Each component is checked against its own constructor: a typo in the neck and one in
    the head are both named at once, each with its component."""
    config_file.write_text(MINIMAL)
    overrides = ["Arch.Neck.num_feature=512", "Arch.Head.clas_num=3", "Arch.Head.margin=big"]
    with pytest.raises(ConfigError) as info:
        load_config(config_file, overrides)
    assert str(info.value).splitlines() == [
        f"{config_file}: 3 problems in the config:",
        "  Arch.Neck.num_feature: unknown key (did you mean 'num_features'?) in neck 'BNNeck' "
        "(set by -o Arch.Neck.num_feature=512)",
        "  Arch.Head.clas_num: unknown key (did you mean 'class_num'?) in head 'ArcMargin' "
        "(set by -o Arch.Head.clas_num=3)",
        "  Arch.Head.margin: Input should be a valid number, unable to parse string as a "
        "number (got 'big') in head 'ArcMargin' (set by -o Arch.Head.margin=big)",
    ]


def test_a_key_of_another_component_of_its_kind_is_said_to_be_one(config_file):
    """A head renamed with -o (FC to ArcMargin) keeps FC's settings, each said to be an
    'unknown key' as a typo is: named as another head's, with how to drop it."""
    head = "    name: ArcMargin\n"
    config_file.write_text(MINIMAL.replace(head, "    name: FC\n    bias: false\n"))
    with pytest.raises(ConfigError) as info:
        load_config(config_file, ["Arch.Head.name=ArcMargin"])
    assert str(info.value) == (
        f"{config_file}: Arch.Head.bias: a setting of FC, not of head ArcMargin: remove it, or "
        "set it null where -o changed the name in head 'ArcMargin'"
    )
    # set null, it is gone; a typo is still one
    config = load_config(config_file, ["Arch.Head.name=ArcMargin", "Arch.Head.bias=null"])
    assert config.Arch.Head.name == "ArcMargin"
    with pytest.raises(ConfigError, match=r"Arch\.Head\.clas_num: unknown key \(did you mean"):
        load_config(config_file, ["Arch.Head.clas_num=3"])


def test_a_malformed_transform_op_is_listed_with_the_other_problems(config_file):
    """An item of transform_ops holding two ops (an -o into the wrong index adds a second)
    is one problem among the others, each named once, not the only one shown."""
    ops = "[{DecodeImage: {}}, {RandFlipImage: {}, ResizeImage: {size: 8}}, ResizeImage, {Pad: 3}]"
    dataset = f"dataset: {{name: ImageNetDataset, image_root: ., cls_label_path: t.txt, transform_ops: {ops}}}"
    overrides = [f"DataLoader.Train={{{dataset}}}", "Arch.Head.class_num=0"]
    with pytest.raises(ConfigError) as info:
        load_config(config_file, overrides)
    set_by = f" (set by -o {overrides[0]})"
    assert str(info.value).splitlines() == [
        f"{config_file}: 4 problems in the config:",
        "  Arch.Head.class_num: Input should be greater than 0 (got 0) in head 'ArcMargin' "
        f"(set by -o {overrides[1]})",
        "  DataLoader.Train.dataset.transform_ops.2: Input should be a valid dictionary (got "
        f"'ResizeImage') in dataset 'ImageNetDataset'{set_by}",
        "  DataLoader.Train.dataset.transform_ops.3.Pad: Input should be a valid dictionary (got "
        f"3) in dataset 'ImageNetDataset'{set_by}",
        "  DataLoader.Train.dataset.transform_ops.1: each op must be one '{OpName: {params}}' "
        f"mapping, got 2: RandFlipImage, ResizeImage{set_by}",
    ]


# Each transform with the parameters it needs, for a test to set one of them wrong.
TRANSFORM_BASES = {
    "ResizeImage": "{size: 8}",
    "CropImage": "{size: 8}",
    "RandCropImage": "{size: 8}",
    "Pad": "{padding: 1}",
    "RandomRotation": "{degrees: 10}",
    "ColorJitter": "{}",
    "NormalizeImage": "{}",
    "RandomErasing": "{}",
}


@pytest.mark.parametrize(
    ("op", "key", "value"),
    [
        ("ResizeImage", "size", "null"),
        ("ResizeImage", "resize_short", "16"),  # with size: which one resizes?
        ("CropImage", "size", "[8, 8, 8]"),
        ("RandCropImage", "ratio", "[2, 1]"),
        ("Pad", "padding", "-1"),
        ("Pad", "fill", "300"),
        ("RandomRotation", "degrees", "[30, 10]"),
        ("ColorJitter", "hue", "0.7"),
        ("NormalizeImage", "std", "[0.2, 0, 0.2]"),
        ("NormalizeImage", "std", "[1.0e-50, 0.2, 0.2]"),  # 0 in float32
        ("NormalizeImage", "std", "[-0.2, 0.2, 0.2]"),
        ("NormalizeImage", "scale", "0"),
        ("NormalizeImage", "scale", "0/255"),
        # 0-255 units with the default scale 1/255: every image about one value
        ("NormalizeImage", "mean", "[123.675, 116.28, 103.53]"),
        ("NormalizeImage", "std", "[0.2, 0.2]"),
        ("NormalizeImage", "mean", "[0.5]"),
        ("RandomErasing", "EPSILON", "5"),
        ("RandomErasing", "sl", "0"),
        ("RandomErasing", "sh", "0.01"),
        ("RandomErasing", "r1", "2"),
        ("RandomErasing", "attempt", "0"),
        ("RandomErasing", "mean", "[0.5, 0.5]"),
    ],
)
def test_a_transform_value_out_of_range_is_refused_as_the_config_loads(config_file, op, key, value):
    """Not first when the dataset is built, after the model (`shitu info`, a run's start)."""
    ops = f"[{{DecodeImage: {{}}}}, {{{op}: {TRANSFORM_BASES[op]}}}]"
    split = f"DataLoader.Train={{dataset: {{name: ImageNetDataset, image_root: ., cls_label_path: t.txt, transform_ops: {ops}}}}}"
    wrong = f"DataLoader.Train.dataset.transform_ops[1].{op}.{key}={value}"
    with pytest.raises(ConfigError) as info:
        load_config(config_file, [split, wrong])
    message = str(info.value)
    assert message.startswith(
        f"{config_file}: DataLoader.Train.dataset.transform_ops.1.{op}.{key}: "
    )
    assert message.endswith(f" in transform '{op}' (set by -o {wrong})")


def test_transform_ops_in_an_order_that_cannot_work_are_refused_as_the_config_loads(config_file):
    """A resize after NormalizeImage is named before the model is built, not by the dataset."""
    ops = "[{NormalizeImage: {}}, {ResizeImage: {size: 8}}]"
    split = f"DataLoader.Train={{dataset: {{name: ImageNetDataset, image_root: ., cls_label_path: t.txt, transform_ops: {ops}}}}}"
    with pytest.raises(ConfigError) as info:
        load_config(config_file, [split])
    assert str(info.value) == (
        f"{config_file}: DataLoader.Train.dataset.transform_ops[1] ResizeImage: works on uint8 "
        f"pixels; move it before NormalizeImage (set by -o {split})"
    )


def test_transform_ops_no_image_can_go_through_are_refused_as_the_config_loads(config_file):
    """A crop larger than the fixed size a ResizeImage (and a Pad) before it gives: each image
    failed at the first step, said to be the image's fault ("set skip_corrupt: true")."""
    ops = "[{ResizeImage: {size: 64}}, {Pad: {padding: 4}}, {RandCropImageV2: {size: 128}}]"
    split = f"DataLoader.Train={{dataset: {{name: ImageNetDataset, image_root: ., cls_label_path: t.txt, transform_ops: {ops}}}}}"
    with pytest.raises(ConfigError) as info:
        load_config(config_file, [split])
    assert str(info.value) == (
        f"{config_file}: DataLoader.Train.dataset.transform_ops: no image can go through these "
        "ops, whatever its size (RandCropImageV2: image 72x72 is smaller than the crop "
        "128x128, as the ops before it make every image); make the later op fit what they "
        f"give (set by -o {split})"
    )
    fits = split.replace("size: 128", "size: 72")
    assert load_config(config_file, [fits]).DataLoader.Train is not None
    # A crop of images left at their size: some may be large enough.
    load_config(config_file, [split.replace("{ResizeImage: {size: 64}}, ", "")])


def test_a_schedule_driven_by_evaluations_is_refused_in_a_run_without_them(config_file):
    """ReduceOnPlateau lowers the rate on evaluations: without any it would never lower it."""
    plateau = "Optimizer={name: Momentum, lr: {name: ReduceOnPlateau, learning_rate: 0.1}}"
    train = f"DataLoader.Train={{{DATASET}}}"
    evaluation = f"DataLoader.Eval={{Query: {{{DATASET}}}}}"
    for overrides, reason in [
        ([], "it has no DataLoader.Eval"),
        ([evaluation, "Global.eval_during_train=false"], "Global.eval_during_train is false"),
        (
            [evaluation, "Global.epochs=3", "Global.eval_interval=4"],
            "Global.eval_interval 4 is more than Global.epochs 3",
        ),
    ]:
        with pytest.raises(ConfigError) as info:
            load_config(config_file, [plateau, train, *overrides])
        assert str(info.value) == (
            f"{config_file}: Optimizer.lr.name: ReduceOnPlateau lowers the rate when "
            f"Global.eval_metric stops improving, but the run never evaluates ({reason}); "
            f"evaluate during training or choose another schedule (set by -o {plateau})"
        )
    load_config(config_file, [plateau, train, evaluation])
    load_config(config_file, [plateau])  # no training data: not a training config
    load_config(config_file, [plateau.replace("ReduceOnPlateau", "Cosine"), train])


def test_evaluation_and_export_must_use_the_same_features(config_file):
    """`shitu eval` (and the best_model training keeps) scores Global.retrieval_feature_from,
    `shitu export` ships Arch.infer_output_key: with a neck the two are different vectors, so
    a config that names two would deploy an embedding nobody evaluated."""
    evaluation = f"DataLoader.Eval={{Query: {{{DATASET}}}}}"
    backbone = "Global.retrieval_feature_from=backbone"
    with pytest.raises(ConfigError) as info:
        load_config(config_file, [backbone, evaluation])
    message = str(info.value)
    assert message.startswith(f"{config_file}: Global.retrieval_feature_from: ")
    assert "'backbone'" in message and "Arch.infer_output_key 'features'" in message
    assert f"(set by -o {backbone})" in message
    load_config(config_file, [backbone, "Arch.infer_output_key=backbone", evaluation])
    load_config(config_file, [backbone, "Arch.Neck=null", evaluation])  # one and the same vector
    load_config(config_file, [backbone])  # nothing is evaluated


def test_malformed_override_names_the_config_file(config_file):
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(str(config_file))}: override 'Global.epochs' is not"
    ):
        load_config(config_file, ["Global.epochs"])


def test_errors_in_the_file_itself(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(MINIMAL.replace("num_features: 512", "num_featurs: 512"))
    with pytest.raises(
        ConfigError,
        match=r"bad.yaml: Arch.Neck.num_featurs: unknown key \(did you mean 'num_features'\?\)",
    ):
        load_config(path)
    path.write_text(MINIMAL.replace("  Backbone:\n    name: PPLCNetV2_small_ShiTu\n", ""))
    with pytest.raises(ConfigError, match="bad.yaml: Arch.Backbone: required key missing"):
        load_config(path)


def test_a_pipeline_config_given_to_a_training_command_is_named_as_one(tmp_path):
    """PaddleClas's inference_general.yaml (or the shipped one's name) to `train`/`export`:
    said to be a pipeline config, not listed as a dozen unknown keys (nor as not found)."""
    paddle = tmp_path / "inference_general.yaml"
    paddle.write_text("Global:\n  rec_inference_model_dir: x\nIndexProcess:\n  index_dir: lib\n")
    for name in (paddle, "inference_general"):
        with pytest.raises(
            ConfigError,
            match=f"^{name}: a recognition pipeline config .* `shitu recognize -c` reads",
        ):
            load_config(name)


def test_missing_and_malformed_files(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="config file not found: .*nowhere.yaml"):
        load_config(tmp_path / "nowhere.yaml")
    # A relative path is relative to the folder the command runs in: the error says which.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config("GroceryStore_Lite0.yaml")
    assert str(info.value).startswith(
        "config file not found: GroceryStore_Lite0.yaml (did you mean "
        f"'GroceryStore_EfficientNetLite0'?) (no such file: {tmp_path / 'GroceryStore_Lite0.yaml'}"
        ", nor a shipped name: "
    )
    with pytest.raises(ConfigError, match=f"^config file {re.escape(str(tmp_path))}: a folder"):
        load_config(tmp_path)
    fifo = tmp_path / "fifo.yaml"  # there, so not "not found"; never opened (no writer)
    os.mkfifo(fifo)
    with pytest.raises(
        ConfigError,
        match=rf"^config file {re.escape(str(fifo))}: a FIFO \(named pipe\), not a YAML file$",
    ):
        load_config(fifo)
    bad = tmp_path / "broken.yaml"
    bad.write_text("Arch:\n  Backbone: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: invalid YAML at line \d+"):
        load_config(bad)
    binary = tmp_path / "photo.yaml"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match="photo.yaml: not a YAML config"):
        load_config(binary)
    repeated = tmp_path / "repeated.yaml"  # the second Loss would silently replace the first
    repeated.write_text(MINIMAL + "Loss:\n  Train: []\n")
    with pytest.raises(ConfigError, match=r"repeated.yaml: invalid YAML .*duplicate key 'Loss'"):
        load_config(repeated)
    # A key after a merge (<<) overrides the merged one, as YAML means: not a repeat.
    assert load_yaml("base: &b {a: 1, c: 3}\nmine:\n  <<: *b\n  a: 2\n")["mine"] == {"a": 2, "c": 3}
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(scalar)
    empty = tmp_path / "empty.yaml"  # not said to be of the wrong shape: of none
    empty.write_text("# to fill in\n")
    with pytest.raises(ConfigError) as refused:
        load_config(empty)
    assert str(refused.value) == f"{empty}: the file is empty (a config is a mapping of sections)"


def test_cli_prints_one_line_error_not_a_traceback(config_file, capsys):
    code = shitu_main(["info", "-c", str(config_file), "-o", "Global.epocs=3"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith("error: ") and "Global.epocs" in err and str(config_file) in err
    assert "Traceback" not in err


def test_train_refuses_a_pk_batch_of_partial_groups_as_the_config_loads(config_file, capsys):
    """A PKSampler batch_size that is no multiple of sample_per_id is a config error: `shitu
    train` names it at once, not after building the model and reading the data (here it
    would first have found the Optimizer section missing)."""
    sampler = "{name: PKSampler, batch_size: 10, sample_per_id: 4}"
    override = f"DataLoader.Train={{{DATASET}, sampler: {sampler}}}"
    assert shitu_main(["train", "-c", str(config_file), "-o", override]) == 2
    assert capsys.readouterr().err == (
        f"error: {config_file}: DataLoader.Train.sampler.batch_size: 10 is not a multiple of "
        f"sample_per_id (4) in sampler 'PKSampler' (set by -o {override})\n"
    )


def test_train_and_eval_name_the_file_and_each_section_they_need(config_file, capsys):
    """A config for `shitu info` or `export` (a model alone) given to `train` or `eval` is
    refused before any model is built, with the file and every missing section at once."""
    assert shitu_main(["train", "-c", str(config_file), "-o", "Loss=null"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {config_file}: 3 problems in the config for training:",
        "  Loss: training needs this section (set by -o Loss=null)",
        "  Optimizer: training needs this section",
        "  DataLoader.Train: training needs a training dataset",
    ]
    assert shitu_main(["eval", "-c", str(config_file)]) == 2
    assert capsys.readouterr().err == (
        f"error: {config_file}: DataLoader.Eval.Query: evaluation needs a query dataset\n"
    )


def test_cli_reports_bad_stop_layer_with_file(config_file, capsys):
    code = shitu_main(["info", "-c", str(config_file), "-o", "Arch.BackboneStopLayer.name=flaten"])
    err = capsys.readouterr().err
    assert code == 2
    assert str(config_file) in err and "'flaten' is not a layer" in err and "flatten" in err


def test_yaml_anchors_are_supported(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text(
        textwrap.dedent(
            """
            Arch:
              Backbone: {name: PPLCNetV2_small_ShiTu, class_expand: &dim 256}
              Neck: {name: BNNeck, num_features: *dim}
            """
        )
    )
    assert load_config(path).Arch.Neck.params["num_features"] == 256


def test_override_of_an_aliased_value_changes_that_place_only(tmp_path):
    """An anchor's aliases are separate values: `-o` on one leaves the others as written."""
    path = tmp_path / "aliases.yaml"
    path.write_text(
        textwrap.dedent(
            """
            Arch:
              Backbone: {name: PPLCNetV2_small_ShiTu, class_expand: 256}
              frozen_layers: &frozen [backbone.stem]
            LinearProbe: {epochs: 1, frozen_layers: *frozen}
            Optimizer:
              name: Momentum
              lr: &lr {name: Cosine, learning_rate: 0.1}
            DataLoader:
              Train:
                dataset: &data {name: ImageFolderDataset, root: ./images}
              Eval:
                Query: {dataset: *data}
            """
        )
    )
    config = load_config(
        path,
        [
            "Arch.frozen_layers[0]=backbone.blocks",
            "DataLoader.Eval.Query.dataset.root=./queries",
        ],
    )
    assert config.Arch.frozen_layers == ["backbone.blocks"]
    assert config.LinearProbe.frozen_layers == ["backbone.stem"]
    assert config.DataLoader.Train.dataset.params["root"] == "./images"
    assert config.DataLoader.Eval.Query.dataset.params["root"] == "./queries"


def test_piecewise_without_learning_rate_starts_at_its_first_value(config_file):
    """As PaddleClas's Piecewise, which takes no learning_rate (PaddleOCR's configs leave it
    out): it was refused as a required key missing."""
    lr = "{name: Piecewise, values: [0.01, 0.001], decay_epochs: [5], warmup_epoch: 1}"
    text = config_file.read_text() + f"Optimizer: {{name: Momentum, lr: {lr}}}\n"
    config_file.write_text(text)
    assert load_config(config_file).Optimizer.lr.learning_rate == 0.01
    # Other schedules still need it.
    with pytest.raises(ConfigError, match="Optimizer.lr.learning_rate: required key missing"):
        load_config(config_file, ["Optimizer.lr={name: Cosine}"])


def test_exponent_numbers_without_a_dot_are_numbers(config_file):
    """`1e-2` in a file or an override is a float (YAML 1.1 reads it as a string): Piecewise
    values compare with learning_rate, untyped settings are numbers."""
    lr = "{name: Piecewise, learning_rate: 1e-2, values: [1e-2, 1e-3], decay_epochs: [5]}"
    text = config_file.read_text() + f"Optimizer: {{name: Momentum, lr: {lr}}}\n"
    config_file.write_text(text)
    config = load_config(config_file, ["Global.re_ranking={lambda_value: 2e-1}"])
    assert config.Optimizer.lr.params["values"] == [0.01, 0.001]
    assert config.Global.re_ranking == {"lambda_value": 0.2}


def test_null_gives_an_optional_key_its_default(config_file, tmp_path):
    """`-o KEY=null` undoes a key the file sets, in a dataset section as anywhere: the
    dataset is built as if the key were left out (here: ids kept, not renumbered)."""
    (tmp_path / "train.txt").write_text("a.jpg 5\nb.jpg 9\n")
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    dataset = f"{{name: ImageNetDataset, image_root: {tmp_path}, cls_label_path: train.txt}}"
    relabelled = f"DataLoader.Train.dataset={dataset[:-1]}, relabel: true}}"
    config = load_config(
        config_file,
        [
            relabelled,
            "Global.epochs=7",
            f"DataLoader.Train.dataset.cls_label_path={tmp_path / 'train.txt'}",
            "DataLoader.Train.dataset.relabel=null",
            "Global.epochs=null",
            "DataLoader.Train.loader=",
            "Global.re_ranking={k1: 10}",
            "Global.re_ranking=null",  # a bool or a mapping: not null, so its default
        ],
    )
    assert config.Global.epochs == 100 and config.Global.re_ranking is False
    assert config.DataLoader.Train.loader.num_workers == 4
    built = build_dataset(config.DataLoader.Train, "DataLoader.Train")
    assert sorted(set(built.labels)) == [5, 9]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "DataLoader.Train.dataset.image_root=null",
            "DataLoader.Train.dataset.image_root: required key missing in dataset "
            "'ImageNetDataset'",
        ),
        ("Arch.Head.name=null", "Arch.Head.name: required key missing in the config"),
        ("Global.epocs=null", "Global.epocs: unknown key (did you mean 'epochs'?) in the config"),
    ],
)
def test_null_for_a_required_or_unknown_key_is_refused(config_file, override, expected):
    """Each error names the override that set its key last (not the section's before it)."""
    with pytest.raises(ConfigError) as info:
        load_config(config_file, [f"DataLoader.Train={{{DATASET}}}", override])
    assert str(info.value).endswith(f"{expected} (set by -o {override})")


def test_null_in_the_file_for_a_required_key_says_it_is_required(config_file):
    """`image_root:` left empty in a file: null is no value for a key without a default."""
    dataset = "{name: ImageNetDataset, image_root: null, cls_label_path: train.txt}"
    config_file.write_text(
        config_file.read_text() + f"DataLoader:\n  Train:\n    dataset: {dataset}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(config_file)
    assert str(info.value) == (
        f"{config_file}: DataLoader.Train.dataset.image_root: required: it has no default for "
        "null to restore in dataset 'ImageNetDataset'"
    )


def test_null_removes_the_key_from_what_the_config_records(config_file):
    """`-o KEY=null` leaves the config as if the file had no KEY: a component's settings,
    which checkpoints and exports record (and a model's fingerprint covers), hold no null."""
    config = load_config(config_file, ["Arch.Head.margin=0.3", "Arch.Head.margin=null"])
    assert "margin" not in config.Arch.Head.model_dump()


def test_null_for_a_list_item_says_how_to_remove_it(config_file):
    with pytest.raises(ConfigError) as info:
        load_config(config_file, ["Loss.Train.0=null"])
    assert str(info.value) == (
        f"{config_file}: override 'Loss.Train.0=null': a list item cannot be null; to remove "
        "it, give the whole list without it (-o Loss.Train=[...])"
    )


def test_null_gives_a_pipeline_key_its_default(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text("Global: {threshold: 0.5, rec_backend: torch}\n")
    config = load_pipeline_config(path, ["Global.threshold=null", "Global.rec_backend="])
    assert (config.Global.threshold, config.Global.rec_backend) == (0.2, "auto")


def test_a_config_of_the_other_kind_is_named_as_such():
    """`-c` is a training config for train/eval and a pipeline config for recognize: given
    the other kind, one line says so (it was a list of each of its keys, unknown)."""
    pipeline = PIPELINE_CONFIG_DIR / "inference_general.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(pipeline)
    assert str(info.value).startswith(
        f"{pipeline}: a recognition pipeline config (its IndexProcess section), which "
        "`shitu recognize -c` reads (and serve, eval-pipeline and demo); this command takes "
        "a training config"
    )
    training = resolve_config_path("GroceryStore_EfficientNetLite0")
    with pytest.raises(ConfigError) as info:
        load_pipeline_config(training)
    assert str(info.value).startswith(f"{training}: a training config (its Arch section); ")
    assert "give the model that `shitu export -c CONFIG --out DIR` makes as --model DIR" in (
        str(info.value)
    )
    # From Python (Recognizer.open(config=...)), named as its arguments too, not only flags
    assert "-c here (config= in Python) takes" in str(info.value)
    assert str(info.value).endswith("as --model DIR (model=DIR in Python)")


def test_a_config_saved_as_utf16_loads(config_file, tmp_path):
    """PowerShell 5's `>` (and Notepad's "Unicode") write UTF-16 with a BOM, which label
    files are read in already; a config was refused as not UTF-8."""
    utf16 = tmp_path / "powershell.yaml"
    utf16.write_text(config_file.read_text(), encoding="utf-16")
    assert load_config(utf16).Arch.Head.params["class_num"] == 10
    legacy = tmp_path / "cp1252.yaml"
    legacy.write_bytes(
        config_file.read_text().replace("Arch:", "# Caf\xe9\nArch:").encode("cp1252")
    )
    with pytest.raises(ConfigError) as info:
        load_config(legacy)
    assert str(info.value) == (
        f"{legacy}: not a YAML config (not UTF-8 text, nor UTF-16 with its BOM); save it as UTF-8"
    )
    # an image given as -c: no re-saving as UTF-8 makes it a config
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"\xff\xd8\xff\xe0" + bytes(32))
    with pytest.raises(ConfigError) as info:
        load_config(photo)
    assert str(info.value) == f"{photo}: an image, not a YAML config"


COMPONENT_REGISTRIES = (
    registry.BACKBONES,
    registry.NECKS,
    registry.HEADS,
    registry.LOSSES,
    registry.DATASETS,
    registry.TRANSFORMS,
    registry.SAMPLERS,
    registry.LR_SCHEDULES,
)


def _holding(annotation: Any, value: float) -> Any:
    """`value` in the form a setting of type `annotation` takes a number: itself, a list's
    item or a mapping's (`Optimizer.lr_mult`)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _holding(get_args(annotation)[0], value)
    if origin is Union or origin is UnionType:
        numeric = [m for m in get_args(annotation) if float in registry._types_in(m)]
        return _holding(numeric[0], value)
    if origin is list:
        return [value]
    if origin is dict:
        return {"backbone": value}
    return value


def _numeric_settings() -> list[Any]:
    """Every setting that takes a real number: each registered component's parameters and
    the config sections' keys (Optimizer, its lr and regularizer, EMA, ...)."""
    registry.populate()
    found = []
    for reg in COMPONENT_REGISTRIES:
        for name in reg.names():
            for key, field in reg.params_model(name).model_fields.items():
                if float in registry._types_in(field.annotation):
                    check = functools.partial(reg.validate, name)
                    found.append(
                        pytest.param(check, key, field.annotation, id=f"{reg.kind}:{name}.{key}")
                    )
    sections, seen = [ShituConfig], set()
    while sections:
        section = sections.pop()
        seen.add(section)
        for key, field in section.model_fields.items():
            inner = registry._model_in(field.annotation)
            if inspect.isclass(inner) and issubclass(inner, BaseModel) and inner not in seen:
                sections.append(inner)
            elif float in registry._types_in(field.annotation):
                check = functools.partial(_validate_section, section)
                found.append(
                    pytest.param(check, key, field.annotation, id=f"{section.__name__}.{key}")
                )
    return found


def _validate_section(section: type[BaseModel], params: dict[str, Any]) -> None:
    """Validate `params` as `section`, its problems worded as a config's are."""
    try:
        section.model_validate(params)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, section, section.__name__)) from None


@pytest.mark.parametrize(("validate", "key", "annotation"), _numeric_settings())
def test_no_numeric_setting_takes_nan_or_inf(validate, key, annotation):
    """A NaN margin or scale (CosMargin, CircleMargin) or an inf learning rate loaded and
    trained to NaN losses; every such setting is refused as the config loads, naming it."""
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(ConfigError) as info:
            validate({key: _holding(annotation, value)})
        lines = [line.strip() for line in str(info.value).splitlines()]
        assert any(line.startswith(key) and "finite number" in line for line in lines), lines


def test_a_loss_with_nothing_under_it_takes_its_defaults(config_file):
    """`- CELoss:` in YAML (or `{CELoss: }` in an override) gives the loss null: refused as
    'Input should be a valid dictionary (got None)', where a null setting is its default."""
    from shitu.losses.combined import CombinedLoss

    config = load_config(config_file, ["Loss.Train=[{CELoss: }, {TripletLossV2: {}}]"])
    assert config.Loss.Train == [{"CELoss": {}}, {"TripletLossV2": {}}]
    assert CombinedLoss(config.Loss.Train).names == ["CELoss", "TripletLossV2"]


def test_a_loss_item_gives_its_model_output_under_one_name(config_file):
    """`feature_from` (PaddleClas's name) and `input_key` are one setting: given both with
    different outputs, input_key was read and feature_from silently dropped."""
    both = "Loss.Train=[{CELoss: {feature_from: features, input_key: logits}}]"
    with pytest.raises(ConfigError) as info:
        load_config(config_file, [both])
    message = str(info.value)
    assert message.startswith(
        f"{config_file}: Loss.Train.0.CELoss.feature_from: 'features' and input_key 'logits' "
        "are one setting"
    )
    assert f"(set by -o {both})" in message
    load_config(config_file, ["Loss.Train=[{CELoss: {feature_from: logits, input_key: logits}}]"])


def test_a_shipped_name_with_a_copy_of_that_name_here_is_refused(tmp_path, monkeypatch):
    """`cp .../GroceryStore_EfficientNetLite0.yaml .`, edited, then `-c
    GroceryStore_EfficientNetLite0`: the shipped config was read and the edits silently
    not. Refused naming both; the copy by its path, the shipped one by its own."""
    shipped = resolve_config_path("GroceryStore_EfficientNetLite0")
    monkeypatch.chdir(tmp_path)
    copy = tmp_path / shipped.name
    copy.write_text(shipped.read_text().replace("epochs: 40", "epochs: 3"))
    with pytest.raises(ConfigError, match=r"and GroceryStore_EfficientNetLite0\.yaml in"):
        load_config("GroceryStore_EfficientNetLite0")
    assert load_config(copy.name).Global.epochs == 3  # the file named: no doubt
    assert load_config(f"./{copy.name}").Global.epochs == 3
    assert load_config(str(shipped)).Global.epochs == 40
