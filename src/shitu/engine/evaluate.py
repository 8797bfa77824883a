"""Retrieval evaluation of a model: embed query and gallery sets, then score the ranking."""

from __future__ import annotations

import logging
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from shitu.config.schema import ShituConfig
from shitu.data.datasets.label_file import is_class_id
from shitu.engine.data import (
    build_eval_loader,
    check_unreadable_elsewhere,
    dataset_of,
    end_quietly_on_sigterm,
)
from shitu.engine.distributed import DistContext, all_gather_concat
from shitu.engine.precision import autocast_for, effective_amp
from shitu.errors import ConfigError
from shitu.evaluation import RetrievalEvaluator, RetrievalResult
from shitu.evaluation.reranking import check_rerank_size
from shitu.evaluation.retrieval import EvaluationInputError
from shitu.fileio import file_sha256
from shitu.index.labels import normal_form

logger = logging.getLogger(__name__)


class SameFiles:
    """The gallery entries of a file, by its path or its content: a copy under another name
    finds itself as surely as the file does. Only files of a gallery file's size and label
    are read for their hashes (the rest cost a stat each), so copies are looked for at no
    noticeable cost: photos of one size to the byte and one label are few."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], ids: Sequence[int]) -> None:
        self._ids_of: dict[tuple[str, int], set[int]] = defaultdict(set)
        self._labels_of: dict[str, set[int]] = defaultdict(set)
        self._by_size: dict[tuple[int, int], list[str]] = defaultdict(list)
        self._hashes: dict[str, str | None] = {}
        for path, label, unique_id in zip(paths, labels, ids, strict=True):
            real = os.path.realpath(path)
            self._labels_of[real].add(label)
            if (real, label) not in self._ids_of:
                size = _file_size(real)
                if size is not None:
                    self._by_size[(size, label)].append(real)
            self._ids_of[(real, label)].add(unique_id)

    def ids(self, real: str, label: int) -> set[int]:
        """The unique ids of the gallery entries with this label of the file at `real` (a
        `realpath`, which the caller computes once for this and `other_labels`) or a copy."""
        ids = set(self._ids_of.get((real, label), ()))
        size = _file_size(real)
        if size is None:
            return ids
        copies = [other for other in self._by_size.get((size, label), ()) if other != real]
        if copies and (digest := self._hash(real)) is not None:
            for other in copies:
                if self._hash(other) == digest:
                    ids |= self._ids_of[(other, label)]
        return ids

    def other_labels(self, real: str, label: int) -> set[int]:
        """The labels other than `label` that gallery entries of the file at `real` have."""
        return self._labels_of.get(real, set()) - {label}

    def _hash(self, path: str) -> str | None:
        if path not in self._hashes:
            try:
                self._hashes[path] = file_sha256(Path(path))
            except OSError:  # reported where the image is read
                self._hashes[path] = None
        return self._hashes[path]


def _file_size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:  # reported where the image is read
        return None


@dataclass
class EmbeddedSet:
    """Features of a whole dataset in dataset order, with labels and unique ids."""

    features: torch.Tensor
    labels: torch.Tensor
    unique_ids: torch.Tensor


@torch.no_grad()
def embed_dataset(
    model: nn.Module,
    loader: DataLoader,
    context: DistContext,
    feature_key: str = "features",
    amp: str = "off",
    channels_last: bool = False,
    description: str = "embed",
    progress: bool = True,
) -> EmbeddedSet:
    """Embed every item once; under DDP each rank embeds a shard and all ranks get all.

    Items come back in dataset order with the sampler's padding duplicates dropped.
    `progress`: a bar on stderr where it is a terminal, else one line saying what is
    embedded (a file or a pipe: a log would fill with a bar's redraws, yet should not go
    quiet for the minutes a large set takes).
    """
    was_training = model.training
    model.eval()
    features, labels, ids, indices = [], [], [], []
    shown = progress and context.is_main
    if shown and not sys.stderr.isatty():
        count = len(dataset_of(loader))
        print(f"embedding {count} {description} images...", file=sys.stderr, flush=True)
    for images, batch_labels, batch_ids, batch_indices in tqdm(
        loader,
        desc=description,
        disable=not (shown and sys.stderr.isatty()),
        leave=False,
        unit="batch",
    ):
        images = images.to(context.device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_for(context.device, amp):
            output = model(images)[feature_key]
        features.append(output.float())
        labels.append(torch.as_tensor(batch_labels).reshape(-1).to(context.device))
        ids.append(torch.as_tensor(batch_ids).reshape(-1).to(context.device))
        indices.append(torch.as_tensor(batch_indices).reshape(-1).to(context.device))
    model.train(was_training)
    if not features:
        raise ConfigError(f"{description}: the dataset is empty")
    gathered = [
        all_gather_concat(torch.cat(parts), context) for parts in (features, labels, ids, indices)
    ]
    all_features, all_labels, all_ids, all_indices = gathered
    order = torch.argsort(all_indices, stable=True)
    sorted_indices = all_indices[order]
    keep = torch.ones_like(sorted_indices, dtype=torch.bool)
    keep[1:] = sorted_indices[1:] != sorted_indices[:-1]
    order = order[keep]
    return EmbeddedSet(
        all_features[order].cpu(), all_labels[order].cpu().long(), all_ids[order].cpu().long()
    )


def check_evaluation_data(config: ShituConfig) -> None:
    """A ConfigError unless `config` has the query dataset evaluation needs."""
    eval_data = config.DataLoader.Eval if config.DataLoader else None
    if eval_data is None or eval_data.Query is None:
        raise ConfigError("DataLoader.Eval.Query: evaluation needs a query dataset")


class RetrievalEvaluation:
    """Builds the eval loaders once and scores a model against them on demand."""

    def __init__(
        self,
        config: ShituConfig,
        context: DistContext,
        seed: int,
        worker_init: Callable[[int], None] = end_quietly_on_sigterm,
        progress: bool = True,
    ) -> None:
        """`worker_init` sets up the loaders' worker processes (see `build_loader`);
        `progress`: bars while embedding (see `embed_dataset`), and while a skip_corrupt
        dataset checks its images."""
        check_evaluation_data(config)
        eval_data = config.DataLoader.Eval
        self.config = config
        self.context = context
        self.progress = progress
        self.amp = effective_amp(config.Global.amp, context.device)
        self.query_loader = build_eval_loader(
            eval_data.Query, context, seed, "DataLoader.Eval.Query", worker_init, progress
        )
        self.gallery_loader = (
            build_eval_loader(
                eval_data.Gallery, context, seed, "DataLoader.Eval.Gallery", worker_init, progress
            )
            if eval_data.Gallery
            else None
        )
        self._gallery_labels = (
            gallery_numbering(dataset_of(self.query_loader), dataset_of(self.gallery_loader))
            if self.gallery_loader
            else None
        )
        metric_items = (config.Metric.Eval if config.Metric else None) or [
            {"Recallk": {"topk": [1, 5]}},
            {"mAP": {}},
        ]
        self.evaluator = RetrievalEvaluator.from_metric_config(
            metric_items, re_ranking=config.Global.re_ranking
        )
        check_unreadable_elsewhere(self.datasets())
        self._warn_of_ids_in_one_file()
        self._warn_of_shared_images()
        self._check_positives()
        if self.evaluator.re_ranking is not None:
            queries = len(dataset_of(self.query_loader))
            gallery = dataset_of(self.gallery_loader) if self.gallery_loader else None
            check_rerank_size(
                queries,
                queries if gallery is None else len(gallery),
                self.evaluator.re_ranking.max_samples,
            )

    def datasets(self) -> dict[str, Any]:
        """The query and gallery datasets by config section."""
        datasets = {"DataLoader.Eval.Query": dataset_of(self.query_loader)}
        if self.gallery_loader is not None:
            datasets["DataLoader.Eval.Gallery"] = dataset_of(self.gallery_loader)
        return datasets

    def _warn_of_ids_in_one_file(self) -> None:
        """Warn where only one of the query and gallery label files lists unique ids: ids
        leave a query's own gallery entries out only when both list them (PaddleClas needs
        both), so the ids given are unused and every such entry stays in the ranking."""
        if not self.context.is_main or self.gallery_loader is None:
            return
        query_ids = has_unique_ids(self.query_loader)
        if query_ids == has_unique_ids(self.gallery_loader):
            return
        listed, unlisted = ("Query", "Gallery") if query_ids else ("Gallery", "Query")
        logger.warning(
            "DataLoader.Eval.%s lists unique ids (a third column) but DataLoader.Eval.%s does "
            "not: ids leave a query's own gallery entries out only when both sets list them, "
            "so none is left out",
            listed,
            unlisted,
        )

    def _warn_of_shared_images(self) -> None:
        """Warn of query photos that find a gallery entry of their own file (or a copy of it:
        the same content under another name) and label, one the same-id rule does not leave
        out: each ranks it first and counts a hit (PaddleClas counts them all the same).
        Without unique ids on both sides that is every query listed in the gallery too;
        with them, one whose gallery entry has another id; with no gallery, a query listed
        twice (its other line is not its own). Under torchrun only the main process warns,
        as it alone reports the metrics."""
        if not self.context.is_main:
            return
        queries = dataset_of(self.query_loader)
        gallery = dataset_of(self.gallery_loader) if self.gallery_loader else queries
        excluded = self._excludes_own_entries()
        same_files = SameFiles(gallery.paths, gallery.labels, gallery.unique_ids)
        labels = self._in_gallery_numbering(torch.tensor(queries.labels)).tolist()
        shared = 0
        relabelled = []  # (query index, the file's other gallery labels)
        rows = zip(queries.paths, labels, queries.unique_ids, strict=True)
        for index, (path, label, unique_id) in enumerate(rows):
            real = os.path.realpath(path)
            ids = same_files.ids(real, label)
            shared += bool(ids - {unique_id} if excluded else ids)
            if self.gallery_loader is not None and (others := same_files.other_labels(real, label)):
                relabelled.append((index, others))
        if relabelled:
            self._warn_of_relabelled_queries(queries, gallery, relabelled)
        if not shared:
            return
        if self.gallery_loader is None:
            what = "listed more than once (the same file or a copy): each finds its other listing"
            advice = "List each image once"
        elif excluded:
            what = (
                "gallery images too under another unique id (the same file or a copy): each "
                "finds itself"
            )
            advice = "Give a query the unique id of its gallery entry to leave that entry out"
        else:
            what = "gallery images too (the same file or a copy): each finds itself"
            advice = (
                "Leave out DataLoader.Eval.Gallery to search the query set against itself "
                "without its own entries, or list unique ids (a third column) in both label "
                "files"
            )
        logger.warning(
            "%d of %d query images are %s first and counts as a hit. %s",
            shared,
            len(queries),
            what,
            advice,
        )

    def _warn_of_relabelled_queries(
        self, queries: Any, gallery: Any, relabelled: list[tuple[int, set[int]]]
    ) -> None:
        """Query photos listed in the gallery under another class (one of the two lists
        put right, the other not): each finds itself first as a non-match, a miss that
        the metrics counted without a word."""
        index, others = relabelled[0]
        logger.warning(
            "%d of %d query images are gallery images too under another label (the first: %s, "
            "%s in the query set, %s in the gallery): each finds itself as a non-match, most "
            "likely first; put the labels right in one of the lists",
            len(relabelled),
            len(queries),
            queries.paths[index],
            _class_list(queries, [queries.labels[index]]),
            _class_list(gallery, sorted(others)),
        )

    def _excludes_own_entries(self) -> bool:
        """Whether gallery items with a query's unique id and label are left out of its
        ranking: always when the query set is its own gallery (each image's own entry),
        else where both label files list unique ids."""
        return self.gallery_loader is None or (
            has_unique_ids(self.query_loader) and has_unique_ids(self.gallery_loader)
        )

    def _check_positives(self) -> None:
        """Refuse query and gallery sets that share no label now, before any embedding (or a
        training run's epochs): no query would have a match, so no metric is defined. Else
        warn of the queries without a match, which every metric leaves out, naming their
        classes (a class folder named another way in the gallery, say): the metrics count
        them, but which they are only a look at both sets would otherwise show."""
        queries = dataset_of(self.query_loader)
        gallery = dataset_of(self.gallery_loader) if self.gallery_loader else queries
        excluded = self._excludes_own_entries()
        per_label = Counter(gallery.labels)
        pairs = zip(gallery.labels, gallery.unique_ids, strict=True)
        own = Counter(pairs) if excluded else Counter()
        labels = self._in_gallery_numbering(torch.tensor(queries.labels)).tolist()
        unmatched = [
            query
            for query, (label, unique_id) in enumerate(zip(labels, queries.unique_ids, strict=True))
            if per_label[label] <= own[(label, unique_id)]
        ]
        if len(unmatched) < len(labels):
            if unmatched and self.context.is_main:
                logger.warning(
                    "DataLoader.Eval: %d of %d queries have no match in the gallery (classes "
                    "%s): each evaluation leaves them out of its metrics",
                    len(unmatched),
                    len(labels),
                    _class_list(queries, [queries.labels[q] for q in unmatched]),
                )
            return
        if per_label.keys().isdisjoint(labels):
            reason = (
                f"no query class ({_class_list(queries)}) is a gallery class "
                f"({_class_list(gallery)})"
            )
        else:
            reason = (
                "every gallery image of a query's class is that query's own entry (same "
                "label and unique id), which is left out"
            )
        raise EvaluationInputError(
            f"DataLoader.Eval: none of the {len(queries)} queries has a positive in the "
            f"gallery: {reason}, so no retrieval metric is defined"
        )

    def run(self, model: nn.Module) -> RetrievalResult:
        options = {
            "context": self.context,
            "feature_key": self.config.Global.retrieval_feature_from,
            "amp": self.amp,
            "channels_last": self.config.Global.channels_last,
            "progress": self.progress,
        }
        query = embed_dataset(model, self.query_loader, description="query", **options)
        check_finite(query, self.query_loader, "query", self.amp)
        gallery = query  # the query set doubles as gallery, each image's own entry left out
        if self.gallery_loader is not None:
            gallery = embed_dataset(model, self.gallery_loader, description="gallery", **options)
            check_finite(gallery, self.gallery_loader, "gallery", self.amp)
        exclude_ids = self._excludes_own_entries()
        return self.evaluator.evaluate(
            query.features,
            self._in_gallery_numbering(query.labels),
            gallery.features,
            gallery.labels,
            query_ids=query.unique_ids if exclude_ids else None,
            gallery_ids=gallery.unique_ids if exclude_ids else None,
        )

    def _in_gallery_numbering(self, labels: torch.Tensor) -> torch.Tensor:
        """Query labels as the gallery numbers their classes (see `gallery_numbering`)."""
        table = self._gallery_labels
        if table is None:
            return labels
        return torch.tensor([table[label] for label in labels.tolist()], dtype=torch.long)


class NonFiniteFeatures(EvaluationInputError):
    """The model gave NaN or infinite features: its weights, not the images, are at fault."""


def check_finite(embedded: EmbeddedSet, loader: DataLoader, description: str, amp: str) -> None:
    """A NonFiniteFeatures naming the images whose features are NaN or infinite: no
    ranking can be scored from them, and the cause is the model (NaN weights, or float16
    overflow under Global.amp), not the metric."""
    bad = (~torch.isfinite(embedded.features).all(dim=1)).nonzero().squeeze(1).tolist()
    if not bad:
        return
    weights = "the model's weights hold NaN or infinite values (a diverged run)"
    cause = (
        f"float16 overflowed under Global.amp=fp16 (try bf16 or off), or {weights}"
        if amp == "fp16"
        else f"most likely {weights}"
    )
    first = dataset_of(loader).paths[bad[0]]
    raise NonFiniteFeatures(
        f"the model gave NaN or infinite features for {len(bad)} of {len(embedded.features)} "
        f"{description} images (the first: {first}), so no retrieval metric is defined: "
        f"{cause}"
    )


def gallery_numbering(queries: Any, gallery: Any) -> dict[int, int] | None:
    """By query label, the gallery's label of the same class; None when neither dataset
    numbers its labels itself (both hold the listed ids).

    A label file of class names (or of relabelled ids) or an image folder numbers only the
    classes it lists, so one number can stand for two classes in the two sets: they are
    matched through `label_keys` instead, a dataset without them standing for the ids it
    lists (only those: ids such as 13-digit barcodes are no table's size). A query class
    the gallery lacks gets a label no gallery item has, so its queries have no positive,
    as with listed ids. Listed ids that the two sets name differently (Grocery listings
    read at another `label_level`: 0 is Apple in one, Golden-Delicious in the other) are
    matched by those names (`class_names`), not by number; so are listed ids that a class
    table names against a set of class names (a Grocery listing against folders named as
    its classes.csv names them; a folder named by a class id is still that class).
    """
    datasets = (queries, gallery)
    numbered = [getattr(dataset, "label_keys", None) for dataset in datasets]
    if all(keys is None for keys in numbered):
        names = [getattr(dataset, "class_names", None) for dataset in datasets]
        if None in names or names[0] == names[1]:
            return None
        numbered = names
    query_keys, gallery_keys = (
        _class_keys(dataset, keys, other)
        for dataset, keys, other in zip(datasets, numbered, numbered[::-1], strict=True)
    )
    # A set's keys are names (str) or ids (int); where either set has ids, a name that is
    # an integer is that id.
    by_id = any(
        isinstance(key, int)
        for keys in (query_keys, gallery_keys)
        for key in keys[next(iter(keys))]
    )
    ids: dict[str | int, int] = {}
    for label, keys in gallery_keys.items():
        for key in keys:
            ids.setdefault(_comparable(key, by_id), label)
    absent = max(gallery.labels) + 1
    return {
        label: next(
            (ids[found] for key in keys if (found := _comparable(key, by_id)) in ids), absent
        )
        for label, keys in query_keys.items()
    }


def _class_keys(
    dataset: Any, keys: list[str] | list[int] | None, other: list[str] | list[int] | None
) -> dict[int, tuple[str | int, ...]]:
    """By label, the keys a class of `dataset` is matched by, in order: its key in `keys`
    (the names or ids it numbers its classes by), or, where None, its listed id, preceded
    by its `class_names` entry where `other` (the other set's keys) are names."""
    if keys is not None:
        return {label: (key,) for label, key in enumerate(keys)}
    names = getattr(dataset, "class_names", None)
    if names is not None and other is not None and all(isinstance(key, str) for key in other):
        return {label: (name, label) for label, name in enumerate(names)}
    return {label: (label,) for label in set(dataset.labels)}


def _comparable(key: str | int, by_id: bool) -> str | int:
    """A class name as gallery libraries compare labels (NFC): a name typed into a label
    file and the same name as a folder from a file system that decomposes accents (macOS)
    are one class. `by_id` (the other set numbers its classes): a name that is an integer,
    as a label file reads one (a folder `12`), is that class id."""
    if not isinstance(key, str):
        return key
    key = normal_form(key)
    return int(key) if by_id and is_class_id(key) else key


def _class_list(dataset: Any, labels: list[int] | None = None) -> str:
    """The first five of a dataset's classes (of those of `labels`, if given) as it lists
    them: names quoted, ids bare, and ids that its class table names (Grocery's
    classes.csv, by whose names two listings may be matched) with their names."""
    shown = 5
    keys = getattr(dataset, "label_keys", None)
    names = getattr(dataset, "class_names", None) if keys is None else None
    labels = dataset.labels if labels is None else labels
    classes = sorted({label if keys is None else keys[label] for label in labels})
    more = ", ..." if len(classes) > shown else ""
    listed = [repr(key) if names is None else f"{names[key]!r} ({key})" for key in classes[:shown]]
    return ", ".join(listed) + more


def has_unique_ids(loader: DataLoader) -> bool:
    """Whether the label file gave real unique ids (its third column), not line numbers."""
    return bool(getattr(dataset_of(loader), "has_unique_ids", False))
