"""`shitu train`: train a recognition model from a config (single process or torchrun)."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from shitu.cli.common import (
    add_config_arguments,
    add_progress_argument,
    config_from_args,
    count_of,
    owned_folder,
    positive_int,
    positive_minutes,
    print_summary,
)
from shitu.errors import CheckpointError, ConfigError, DataError, ShituError, override_word
from shitu.fileio import only_run_in, refuse_file_in_the_way

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from shitu.config.schema import ShituConfig
    from shitu.engine.distributed import DistContext
    from shitu.engine.state import Progress
    from shitu.engine.trainer import FitResult, Trainer


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a recognition model (resume with -o Global.checkpoints=OUTPUT/latest.pt)",
        description=(
            "Train the model a config describes. Checkpoints go to Global.output_dir: "
            "latest.pt (full state, for -o Global.checkpoints=...), best_model.safetensors "
            "(the best evaluated epoch's weights, for -o Global.pretrained_model=...) and, "
            "once the run finishes, final_model.safetensors (the last epoch's); with an EMA "
            "section both hold the weight average. With a LinearProbe section a probe on "
            "frozen features runs first, into OUTPUT/linear_probe (the step and time limits "
            "count the fine-tuning only; a resumed run skips the probe). Multi-GPU: "
            "torchrun --nproc_per_node=N -m shitu train -c CONFIG."
        ),
    )
    add_config_arguments(parser, head_option=False)
    parser.add_argument(
        "--stop-after-steps",
        type=positive_int,
        metavar="N",
        help=(
            "stop (with a checkpoint) once the run reaches global step N; an epoch ending "
            "there is evaluated first, and N at the run's last step finishes it"
        ),
    )
    parser.add_argument(
        "--time-limit",
        type=positive_minutes,
        metavar="MINUTES",
        help="stop (with a checkpoint) after this many minutes; resume later to go on",
    )
    add_progress_argument(parser)
    parser.set_defaults(func=run)


def _print_summary(trainer: Trainer) -> None:
    from shitu.engine.trainer import training_summary

    if trainer.context.is_main:
        print_summary(training_summary(trainer))


def _refuse_earlier_run(output_dir: Path, resumed: Path | None) -> None:
    """A new run writes its files over those of a run already in its folder: refuse, so
    that no finished run is lost and no folder mixes two runs' files. `resumed`: the
    folder of the checkpoint resumed into `output_dir`, most often the folder an
    `-o Global.output_dir=...` of the first command named, left out of this one."""
    from shitu.engine.state import RUN_FILES

    # An empty file (the log of a run that failed before its first record) holds nothing.
    found = [name for name in RUN_FILES if _has_content(output_dir / name)]
    if not found:
        return
    if resumed is not None:
        go_on = override_word("Global.output_dir", resumed)
        advice = (
            f"Global.checkpoints resumes the run in {resumed}: add -o {go_on} to go on in its "
            "folder, or give a new output_dir"
        )
    elif found[0] == RUN_FILES[0]:
        resume = override_word("Global.checkpoints", output_dir / RUN_FILES[0])
        advice = f"resume it with -o {resume}, or give another output_dir (or remove that one)"
    else:  # a run that failed before its first checkpoint left nothing to resume
        advice = (
            f"it left no {RUN_FILES[0]} to resume; give another output_dir (or remove that one)"
        )
    raise ConfigError(
        f"Global.output_dir {output_dir}: holds an earlier run ({', '.join(found)}); {advice}"
    )


def _refuse_folder_of_another_kind(output_dir: Path) -> None:
    """An export's or a gallery library's folder given as Global.output_dir (an export's
    `--out` taken for it, say) took the run's files among its own: the export could then
    not be written again there (`shitu export` keeps what it did not write)."""
    owner = owned_folder(output_dir)
    if owner is not None:
        name, kind = owner
        raise ConfigError(
            f"Global.output_dir {output_dir}: is {kind}'s folder ({name}), which a "
            "training run's files would be mixed into; give a folder of the run's own"
        )


def _has_content(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0


def _check_fine_tuning(config: ShituConfig, progress: bool) -> DistContext:
    """Build the fine-tuning stage once before the probe, so that its errors (an eval metric
    not computed, an lr_mult matching no layer, eval sets without matches) come before the
    probe's minutes, not after. Built in a scratch folder, without the probe's weights;
    `progress`: the bars of its datasets' start-up checks, which the later builds reuse."""
    from shitu.engine.linear_probe import FINE_TUNING, check_probe_layers, fine_tune_stage
    from shitu.engine.trainer import Trainer

    fine_tuning = fine_tune_stage(config)
    fine_tuning.Global.pretrained_model = None  # the probe makes them
    # Nor the backbone's pretrained weights, which the probe's replace (a run from the
    # shipped model needs none, nor their package): nothing checked depends on weights.
    backbone = fine_tuning.Arch.Backbone
    fine_tuning.Arch.Backbone = type(backbone)(
        name=backbone.name, **{k: v for k, v in backbone.params.items() if k != "pretrained"}
    )
    with tempfile.TemporaryDirectory(prefix="shitu-check-") as scratch:
        fine_tuning.Global.output_dir = scratch
        trainer = Trainer(fine_tuning, progress=progress, stage=FINE_TUNING)
        trainer.log.close()
    check_probe_layers(config, trainer.model)
    return trainer.context


def _probe(config: ShituConfig, context: DistContext, progress: bool) -> int | None:
    """Run the LinearProbe stage to its end; the signal that stopped it, if one did."""
    from shitu.engine.linear_probe import PROBE, probe_stage
    from shitu.engine.trainer import Trainer

    trainer = Trainer(probe_stage(config), context, progress, stage=PROBE)
    if trainer.context.is_main:
        print(
            f"linear probe: {count_of(config.LinearProbe.epochs, 'epoch')} with "
            f"{', '.join(config.LinearProbe.frozen_layers)} frozen, then the configured run",
            file=sys.stderr,
        )
    _print_summary(trainer)
    result = _fit(trainer)
    # A signal during the probe's final save lets it finish, and still stops the command.
    if trainer.context.is_main and result.stop_signal is not None:
        when = "after" if result.finished else "during"
        print(
            f"stopped {when} the linear probe; run the same command again to start over",
            file=sys.stderr,
        )
    return result.stop_signal


class _RepeatedWarnings(logging.Filter):
    """Passes the first record of each warning text and drops later ones. The first passes
    every handler it is added to (a test's log capture as well as the terminal)."""

    def __init__(self) -> None:
        super().__init__()
        self._first: dict[tuple[str, str], logging.LogRecord] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        return self._first.setdefault((record.name, record.getMessage()), record) is record


@contextmanager
def _each_warning_once() -> Iterator[None]:
    """Within it, a warning logged again with the same text is not shown again. A
    LinearProbe run builds a Trainer three times (check, probe, fine-tuning) over the same
    config and datasets, and each build would repeat the start-up checks' warnings."""
    repeated, handlers = _RepeatedWarnings(), list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(repeated)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(repeated)


@contextmanager
def _warnings_from_the_main_process() -> Iterator[None]:
    """Under torchrun every process builds the same datasets, schedule and model, and
    printed each of their warnings once per process (8 times with 8 GPUs): the others
    show shitu's errors only."""
    from shitu.engine.distributed import launched_rank

    shitu_logger = logging.getLogger("shitu")
    level = shitu_logger.level
    if launched_rank() > 0:
        shitu_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        shitu_logger.setLevel(level)


def run(args: argparse.Namespace) -> int:
    """`_train`, with each dataset's start-up scan done once and each warning shown once
    although a LinearProbe run builds the datasets three times (see `reused_scans`), and
    under torchrun by one process."""
    from shitu.data.datasets.base import reused_scans

    with reused_scans(), _each_warning_once(), _warnings_from_the_main_process():
        return _train(args)


def _warn_of_a_step_limit_passed(stop_after_steps: int | None, trainer: Trainer) -> None:
    """A resumed run already past --stop-after-steps stops before its first step: the
    limit counts the run's steps, not this command's (`--stop-after-steps 100` meant as
    100 more stopped at once, without a word but the usual 'stopped early')."""
    step = trainer.progress.global_step
    if stop_after_steps is not None and stop_after_steps < step and trainer.context.is_main:
        logger.warning(
            "--stop-after-steps %d: the resumed run is at step %d already (the limit counts "
            "the run's steps, not this command's), so it stops at once; for %s, give "
            "--stop-after-steps %d",
            stop_after_steps,
            step,
            count_of(stop_after_steps, "more step"),
            step + stop_after_steps,
        )


def _epochs_done(progress: Progress, steps_per_epoch: int, epochs: int) -> str:
    """How far a stopped run got. A stop (a signal, the time limit) during an epoch's last
    step leaves only that epoch's end to do (its evaluation, its saves), which the resume
    does without training its steps again: "3 of 30 epochs done" alone said they were lost."""
    done = f"{progress.epoch} of {epochs} epochs done"
    if progress.batch_in_epoch < steps_per_epoch:
        return done
    return (
        f"{done}, and all of epoch {progress.epoch + 1}'s steps: resuming only ends that epoch "
        "(evaluation, saves)"
    )


def _ties_of_the_best(output_dir: Path, metric: str, progress: Progress) -> str:
    """A note naming the later evaluated epochs that scored the best value again, which
    best_model.safetensors is not: it keeps the first. On a small evaluation set recall@1
    reaches 1.0 early, and the best model was then the first evaluation's, of a few
    epochs' training, without a word. Nothing where the log cannot be read (removed, or
    edited by hand): the run it closes is done all the same."""
    from shitu.engine.metrics_log import LOG_NAME, read_log

    try:
        records = read_log(output_dir / LOG_NAME, "eval")
    except (OSError, DataError):
        return ""
    tied = [
        record["epoch"]
        for record in records
        if record.get("epoch", 0) > progress.best_epoch
        and record.get(metric) == progress.best_metric
    ]
    if not tied:
        return ""
    epochs = f"epoch {tied[0]}" if len(tied) == 1 else f"epochs {', '.join(map(str, tied))}"
    return (
        f" (tied by {epochs}; the file holds the first: Global.eval_metric=mAP, say, may tell "
        "them apart)"
    )


def _stopped_during_probe(config: ShituConfig, checkpoints: Path) -> bool:
    """Whether `checkpoints`, which holds no checkpoint, names the output folder (or its
    latest.pt) of a run stopped during its LinearProbe stage, before it had one."""
    from shitu.engine.linear_probe import probe_weights_path
    from shitu.engine.state import LATEST, SUFFIX

    if config.LinearProbe is None:
        return False
    output_dir = Path(config.Global.output_dir).resolve()
    named = checkpoints.resolve()
    probe_dir = probe_weights_path(config).parent
    return (
        named in (output_dir, output_dir / f"{LATEST}{SUFFIX}", output_dir / LATEST)
        and (probe_dir / f"{LATEST}{SUFFIX}").is_file()
    )


def _fit(
    trainer: Trainer, stop_after_steps: int | None = None, time_limit_s: float | None = None
) -> FitResult:
    """`trainer.fit`, saying after a second Ctrl-C (or SIGTERM: a service manager's stop,
    then its kill), or a crash, what goes on from there."""
    from shitu.cli.main import Terminated  # here: that module imports this one

    try:
        return trainer.fit(stop_after_steps, time_limit_s)
    except (KeyboardInterrupt, Terminated):
        said = _what_resumes(trainer, "stopped at once")
        if said:
            print(said, file=sys.stderr)
        raise
    except CheckpointError as exc:  # a save refused (a full disk): its last whole one stays
        said = _what_resumes(trainer, "failed")
        if said is None:
            raise
        raise CheckpointError(f"{exc}; {said}") from exc
    except ShituError:
        raise  # its message says what to do
    except OSError:  # a write refused (a full disk): the command prints its message alone
        said = _what_resumes(trainer, "failed")
        if said:
            print(said, file=sys.stderr)
        raise
    except Exception as exc:  # out of GPU memory, say: a traceback naming no checkpoint
        said = _what_resumes(trainer, "failed")
        if said:
            exc.add_note(said)  # shown below the traceback's last line
        raise


def _what_resumes(trainer: Trainer, ended: str) -> str | None:
    """What to say after a run `ended` ("stopped at once", "failed") without a checkpoint
    of its last steps (a second Ctrl-C or SIGTERM, a crash): where its last checkpoint left
    it, and how to resume from it ("interrupted" alone said neither, though a checkpoint of
    an earlier epoch was there), or that there is none to; that a probe starts over. None
    where there is nothing to say (a process other than the main one)."""
    saved = trainer.checkpointed
    if not trainer.context.is_main:
        return None
    if not trainer.stage.resumable:
        return f"{ended} during {trainer.stage.name}; run the same command again to start over"
    step = trainer.progress.global_step
    if saved is None:
        if trainer.config.Global.checkpoints is not None:
            return None
        if step == 0:  # nothing logged yet either: the folder is no earlier run's
            return f"{ended} before the run's first step: run the same command again"
        # Its folder's log alone then refused the same command again (an earlier run).
        return (
            f"{ended} at step {step}, before the run's first checkpoint: nothing to resume; "
            f"remove {trainer.output_dir} (or give another Global.output_dir) to start over"
        )
    since = (
        f", without a checkpoint since step {saved.global_step}" if step > saved.global_step else ""
    )
    return (
        f"{ended} at step {step}{since}: resume from the run's last checkpoint with "
        f"-o {override_word('Global.checkpoints', trainer.latest_path)}"
    )


def _train(args: argparse.Namespace) -> int:
    from shitu.engine.distributed import launched_rank, shutdown_distributed
    from shitu.engine.linear_probe import FINE_TUNING, fine_tune_stage, probe_weights_path
    from shitu.engine.lr import RUN
    from shitu.engine.state import resolve_checkpoint
    from shitu.engine.trainer import Trainer, check_training_sections

    config = config_from_args(args, needs=check_training_sections)
    context = None
    try:
        output_dir = Path(config.Global.output_dir)
        checkpoints = config.Global.checkpoints
        try:
            resumed = (
                None if checkpoints is None else resolve_checkpoint(checkpoints).parent.resolve()
            )
        except CheckpointError:
            if not _stopped_during_probe(config, Path(checkpoints)):
                raise
            raise ConfigError(
                f"Global.checkpoints {checkpoints}: no checkpoint yet; the run was stopped "
                "during its LinearProbe stage, which is not resumed (it takes minutes): run the "
                "same command without Global.checkpoints to start it over"
            ) from None
        if (
            config.LinearProbe is not None
            and resumed == probe_weights_path(config).parent.resolve()
        ):
            raise ConfigError(
                f"Global.checkpoints {checkpoints}: the LinearProbe stage's own checkpoint, "
                "which is not resumed (the probe takes minutes); run the same command without "
                "Global.checkpoints to start it over"
            )
        # A run resumed into another folder starts a new run there, as far as it is concerned.
        new_run = resumed != output_dir.resolve()
        if new_run:
            _refuse_folder_of_another_kind(output_dir)  # before a lock is left in it
        # Before the datasets, the model and a LinearProbe's check are built: a file in the
        # way was an OSError of its own ('afile/linear_probe: Not a directory') after them.
        # A run that fails to start leaves no folder (see `only_run_in`).
        refuse_file_in_the_way(output_dir, f"Global.output_dir {output_dir}")
        # Under torchrun the main process holds the lock for the run.
        with (
            only_run_in(output_dir, "Global.output_dir", "shitu train")
            if launched_rank() == 0
            else nullcontext()
        ):
            # Within the lock: the files of a run still training there are no earlier run's,
            # to be resumed (the advice a second start into the folder was given).
            if new_run:
                _refuse_earlier_run(output_dir, resumed)
            stage = RUN if config.LinearProbe is None else FINE_TUNING
            if config.LinearProbe is not None:
                # A resumed run's checkpoint already holds weights that went through the probe.
                if config.Global.checkpoints is None:
                    context = _check_fine_tuning(config, not args.no_progress)
                    stop_signal = _probe(config, context, not args.no_progress)
                    if stop_signal is not None:
                        return 128 + stop_signal
                config = fine_tune_stage(config)
            trainer = Trainer(config, context, progress=not args.no_progress, stage=stage)
            _print_summary(trainer)
            _warn_of_a_step_limit_passed(args.stop_after_steps, trainer)
            time_limit = args.time_limit * 60 if args.time_limit is not None else None
            result = _fit(trainer, stop_after_steps=args.stop_after_steps, time_limit_s=time_limit)
    finally:
        shutdown_distributed()
    if trainer.context.is_main:
        progress = result.progress
        if result.finished:
            print(
                f"finished at epoch {progress.epoch}, step {progress.global_step}: "
                f"{result.output_dir}/final_model.safetensors"
            )
        else:
            print(
                f"stopped early after step {progress.global_step} "
                f"({_epochs_done(progress, trainer.steps_per_epoch, config.Global.epochs)}); "
                "resume with "
                f"-o {override_word('Global.checkpoints', trainer.latest_path)}",
                file=sys.stderr,
            )
        if progress.best_metric is not None:
            print(
                f"best {config.Global.eval_metric} {progress.best_metric:.4f} at epoch "
                f"{progress.best_epoch}: {result.output_dir}/best_model.safetensors"
                f"{_ties_of_the_best(result.output_dir, config.Global.eval_metric, progress)}"
            )
    # Stopped by Ctrl-C or SIGTERM: not done, as a caller (`train && export`) must see; a
    # step or time limit asked for is a normal end, and so is a signal that came too late
    # to stop the run (during its last evaluation).
    return 0 if result.finished or result.stop_signal is None else 128 + result.stop_signal
