"""The experiment runner: an experiment file -> ordered, resumable stages in one experiment directory -> report.

Each stage runs in its own sub-folder. Training, selection and evaluation stages run the fairseq2 recipes of this
package as subprocesses (``python -m fairseq2_kslottery.recipes.<name> STAGE_DIR --config-file STAGE_DIR/recipe.yaml``,
or under ``launcher`` such as torchrun); small stages (partial transfer, patches) run in-process. A stage is done when
its ``stage.json`` exists: re-running skips it. An interrupted training stage resumes from its last checkpoint
(fairseq2 resumes a run whose output directory holds one). A failing stage stops the run, names itself and its log,
and leaves every finished stage in place.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from fairseq2_kslottery.errors import KSLotteryError
from fairseq2_kslottery.io import atomic_write_text
from fairseq2_kslottery.pipeline.config import DirectionConfig, ExperimentConfig, RuleConfig, TrainingConfig

__all__ = ["StageFailedError", "Stage", "ExperimentRunner", "run_experiment"]

STAGE_FILE = "stage.json"
_TRAIN_STEP = re.compile(r"Train Metrics \(step (\d+)\)")
_GENERATED = re.compile(r"Generated (\d+)/(\d+) translations")


class StageFailedError(KSLotteryError):
    def __init__(self, stage: str, reason: str, log: Path | None) -> None:
        where = f" (log: {log})" if log is not None else ""
        super().__init__(f"Stage `{stage}` failed: {reason}{where}. Finished stages are kept; re-run to continue.")
        self.stage = stage
        self.reason = reason
        self.log = log


@dataclass
class Stage:
    name: str
    """Stage id, also its folder relative to the experiment directory (e.g. ``en-de/reference``)."""

    kind: str
    """``tune``, ``select``, ``transfer``, ``evaluate``, ``union``."""

    action: Callable[[Stage], None]
    size: Callable[[], int | None] = lambda: None
    """Steps (training) or examples (evaluation), for the progress bar; computed when the stage starts."""

    total: int | None = None

    skip_reason: Callable[[], str | None] = lambda: None
    """Evaluated just before the stage runs: a reason to skip it (e.g. a rule selected no ticket), or None."""

    directory: Path = Path()


class _Progress:
    """One line per stage, with a bar for steps or translations (redrawn on a terminal, milestones otherwise)."""

    def __init__(self, stream: TextIO, log: TextIO) -> None:
        self._stream = stream
        self._log = log
        self._tty = stream.isatty()
        self._last_pct = -1

    def start(self, index: int, count: int, stage: Stage) -> None:
        self._prefix = f"[{index}/{count}] {stage.name}"
        self._last_pct = -1
        self._write(f"{self._prefix} ...", final=not self._tty)

    def update(self, done: int, total: int | None, unit: str) -> None:
        if not total:
            return
        pct = min(100, int(100 * done / total))
        if self._tty:
            bar = "#" * (pct // 5) + "." * (20 - pct // 5)
            self._write(f"{self._prefix} [{bar}] {done}/{total} {unit}", final=False)
        elif pct >= self._last_pct + 25:
            self._write(f"{self._prefix} {done}/{total} {unit}", final=True)
        self._last_pct = pct if not self._tty else self._last_pct

    def finish(self, text: str) -> None:
        self._write(f"{self._prefix} {text}", final=True)

    def note(self, text: str) -> None:
        self._write(text, final=True)

    def _write(self, text: str, *, final: bool) -> None:
        if self._tty:
            self._stream.write("\r\x1b[2K" + text + ("\n" if final else ""))
        else:
            self._stream.write(text + "\n")
        self._stream.flush()
        if final:
            self._log.write(time.strftime("%Y-%m-%d %H:%M:%S ") + text + "\n")
            self._log.flush()


class ExperimentRunner:
    """Plans and runs the stages of one experiment (see the module docstring)."""

    def __init__(self, config: ExperimentConfig, *, stream: TextIO | None = None) -> None:
        self.config = config
        self.root = config.resolved_output_dir().resolve()
        self.stream = stream if stream is not None else sys.stderr
        self.stages: list[Stage] = []
        self._plan()

    # --- planning -------------------------------------------------------------------------------------------

    def _add(self, stage: Stage) -> Stage:
        stage.directory = self.root / stage.name
        self.stages.append(stage)
        return stage

    def _plan(self) -> None:
        cfg = self.config
        for direction in cfg.directions:
            self._plan_direction(direction)
        if cfg.union and len(cfg.directions) > 1:
            self._plan_union()

    def _plan_direction(self, direction: DirectionConfig) -> None:
        cfg = self.config
        d = direction.name
        sources = [direction]
        if cfg.evaluate_base:
            self._add(
                Stage(
                    f"{d}/eval_base",
                    "evaluate",
                    lambda s, sources=sources: self._evaluate(s, sources, None),
                    size=lambda: self._eval_total(sources),
                )
            )
        reference = self._add(
            Stage(
                f"{d}/reference",
                "tune",
                lambda s, sources=sources: self._tune_reference(s, sources),
                size=lambda: self._steps(cfg.reference, sources),
            )
        )
        self._add(
            Stage(
                f"{d}/eval_reference",
                "evaluate",
                lambda s, sources=sources, ref=reference: self._evaluate_reference(s, sources, ref),
                size=lambda: self._eval_total(sources),
            )
        )
        for rule in cfg.selection.rules:
            label = rule.label()
            select = self._add(
                Stage(f"{d}/select_{label}", "select", lambda s, ref=reference, rule=rule: self._select(s, ref, rule))
            )
            tickets_file = select.directory / "tickets.json"
            no_ticket = self._no_ticket_check(tickets_file)
            tickets = self._add(
                Stage(
                    f"{d}/tickets_{label}",
                    "tune",
                    lambda s, sources=sources, f=tickets_file: self._tune_tickets(s, sources, {"tickets": str(f)}),
                    size=lambda: self._steps(cfg.tickets, sources),
                    skip_reason=no_ticket,
                )
            )
            self._add(
                Stage(
                    f"{d}/eval_tickets_{label}",
                    "evaluate",
                    lambda s, sources=sources, run=tickets: self._evaluate_run(s, sources, run),
                    size=lambda: self._eval_total(sources),
                    skip_reason=no_ticket,
                )
            )
            for baseline in cfg.baselines:
                run = self._add(
                    Stage(
                        f"{d}/baseline_{baseline}_{label}",
                        "tune",
                        lambda s, sources=sources, f=tickets_file, b=baseline: self._tune_tickets(
                            s, sources, {"tickets": str(f), "baseline": b}
                        ),
                        size=lambda: self._steps(cfg.tickets, sources),
                        skip_reason=no_ticket if baseline != "newline" else (lambda: None),
                    )
                )
                self._add(
                    Stage(
                        f"{d}/eval_baseline_{baseline}_{label}",
                        "evaluate",
                        lambda s, sources=sources, run=run: self._evaluate_run(s, sources, run),
                        size=lambda: self._eval_total(sources),
                        skip_reason=run.skip_reason,
                    )
                )
            if cfg.transfer:
                self._add(
                    Stage(
                        f"{d}/eval_transfer_{label}",
                        "evaluate",
                        lambda s, sources=sources, ref=reference, f=tickets_file: self._evaluate_transfer(
                            s, sources, ref, f
                        ),
                        size=lambda: self._eval_total(sources),
                        skip_reason=no_ticket,
                    )
                )

    def _plan_union(self) -> None:
        cfg = self.config
        label = cfg.selection.rules[0].label()
        files = [self.root / d.name / f"select_{label}" / "tickets.json" for d in cfg.directions]
        union_file = self.root / "union" / f"tickets_{label}.json"
        self._add(Stage(f"union/merge_{label}", "union", lambda s: self._merge_union(s, files, union_file)))
        no_ticket = self._no_ticket_check(union_file)
        run = self._add(
            Stage(
                f"union/tickets_{label}",
                "tune",
                lambda s: self._tune_tickets(s, list(cfg.directions), {"tickets": str(union_file)}),
                size=lambda: self._steps(cfg.tickets, list(cfg.directions)),
                skip_reason=no_ticket,
            )
        )
        for direction in cfg.directions:
            self._add(
                Stage(
                    f"union/eval_{direction.name}",
                    "evaluate",
                    lambda s, d=direction: self._evaluate_run(s, [d], run),
                    size=lambda d=direction: self._eval_total([d]),
                    skip_reason=no_ticket,
                )
            )

    @staticmethod
    def _no_ticket_check(tickets_file: Path) -> Callable[[], str | None]:
        def check() -> str | None:
            from fairseq2_kslottery.tickets import TicketSet

            if tickets_file.is_file() and TicketSet.load(tickets_file).k == 0:
                return "the rule selected no ticket row"
            return None

        return check

    # --- sizes ----------------------------------------------------------------------------------------------

    def _train_examples(self, sources: list[DirectionConfig]) -> int:
        from fairseq2_kslottery.data.parallel import read_split

        cap = self.config.data.max_examples.get("train")
        total = 0
        for d in sources:
            n = len(read_split(d.source, "train", d.src_lang, d.tgt_lang))
            total += min(n, cap) if cap is not None else n
        return total

    def _steps(self, training: TrainingConfig, sources: list[DirectionConfig]) -> int:
        if training.steps is not None:
            return int(training.steps)
        assert training.epochs is not None
        per_step = training.batch_size * training.num_accumulate * max(1, self._world_size())
        return max(1, math.ceil(self._train_examples(sources) * training.epochs / per_step))

    def _world_size(self) -> int:
        launcher = self.config.launcher
        for i, arg in enumerate(launcher):
            if arg.startswith("--nproc-per-node"):
                value = arg.split("=", 1)[1] if "=" in arg else (launcher[i + 1] if i + 1 < len(launcher) else "1")
                return int(value) if value.isdigit() else 1
        return 1

    def _eval_total(self, sources: list[DirectionConfig]) -> int | None:
        # The evaluate recipe logs its own total; this only seeds the bar when a cap is known.
        cap = self.config.data.max_examples.get(self.config.evaluation.split)
        return None if cap is None else cap * len(sources)

    # --- fairseq2 recipe configs ----------------------------------------------------------------------------

    def _model_section(self) -> dict[str, Any]:
        m = self.config.model
        if m.path is not None:
            section: dict[str, Any] = {"path": m.path, "family": m.family, "arch": m.arch}
            if m.config_overrides:
                section["config_overrides"] = dict(m.config_overrides)
        else:
            section = {"name": m.name}
        section["dtype"] = m.dtype
        return section

    def _tokenizer_section(self) -> dict[str, Any]:
        m = self.config.model
        if m.tokenizer_family is not None or "/" in m.tokenizer:
            return {"path": m.tokenizer, "family": m.tokenizer_family or m.family or "llama"}
        return {"name": m.tokenizer}

    def _dataset_section(self, sources: list[DirectionConfig]) -> dict[str, Any]:
        data = self.config.data
        return {
            "family": "kslottery_parallel",
            "config_overrides": {
                "sources": [
                    {"path": d.source, "src_lang": d.src_lang, "tgt_lang": d.tgt_lang, "weight": d.weight}
                    for d in sources
                ],
                "template": data.template,
                "max_seq_len": data.max_seq_len,
                "max_examples": dict(data.max_examples),
            },
        }

    def _common(self) -> dict[str, Any]:
        return {
            "no_sweep_dir": True,
            "seed": self.config.seed,
            "metric_recorders": {"tensorboard": {"enabled": False}},
        }

    def _tune_config(
        self, sources: list[DirectionConfig], training: TrainingConfig, tuning: dict[str, Any]
    ) -> dict[str, Any]:
        steps = self._steps(training, sources)
        every = training.checkpoint_every_n_steps or max(1, steps // 4)
        config = {
            "model": self._model_section(),
            "tokenizer": self._tokenizer_section(),
            "dataset": self._dataset_section(sources),
            "tuning": {"tied": self.config.tied, **tuning},
            "batching": {"batch_size": training.batch_size, "num_accumulate": training.num_accumulate},
            "validation": {"generate": False, "nll": False},
            "trainer": {"mixed_precision": {"mode": "off"}, "data_parallelism": training.data_parallelism},
            "regime": {
                "num_steps": steps,
                "checkpoint_every_n_steps": every,
                "validate_every_n_steps": None,
                "publish_metrics_every_n_steps": 1,
                "keep_last_n_checkpoints": 1,
            },
            "optimizer": {
                "name": "adamw_trainable",
                "config": {"lr": training.lr, "weight_decay": training.weight_decay},
            },
            "lr_scheduler": {
                "name": "cosine_annealing",
                "config": {
                    "cycle_len": max(1, steps - training.warmup_steps),
                    "num_warmup_steps": training.warmup_steps,
                    "final_lr_scale": 0.1,
                },
            },
            "common": self._common(),
        }
        return _deep_merge(config, copy.deepcopy(self.config.extra))

    def _eval_config(self, sources: list[DirectionConfig], model: dict[str, Any], patch: Path | None) -> dict[str, Any]:
        ev = self.config.evaluation
        config: dict[str, Any] = {
            "model": model,
            "tokenizer": self._tokenizer_section(),
            "dataset": self._dataset_section(sources),
            "evaluation": {"split": ev.split, "batch_size": ev.batch_size, "cut_at_newline": ev.cut_at_newline},
            "seq_generator": {
                "name": "beam_search",
                "config": {"beam_size": ev.beam_size, "max_gen_len": ev.max_gen_len},
            },
            "common": self._common(),
        }
        if patch is not None:
            config["patch"] = str(patch)
        return config

    # --- stage actions --------------------------------------------------------------------------------------

    def _tune_reference(self, stage: Stage, sources: list[DirectionConfig]) -> None:
        cfg = self._tune_config(sources, self.config.reference, {"mode": self.config.reference_mode})
        self._run_recipe(stage, "tune", cfg, launcher=True)

    def _tune_tickets(self, stage: Stage, sources: list[DirectionConfig], tuning: dict[str, Any]) -> None:
        cfg = self._tune_config(sources, self.config.tickets, {"mode": "tickets", **tuning})
        self._run_recipe(stage, "tune", cfg, launcher=True)

    def _select(self, stage: Stage, reference: Stage, rule: RuleConfig) -> None:
        m = self.config.model
        cfg = {
            "base": m.path if m.path is not None else m.name,
            "tuned": str(reference.directory / "checkpoints"),
            "rule": {
                "top_k": rule.top_k,
                "alpha": rule.alpha,
                "max_k": rule.max_k,
                "cert_alpha": self.config.selection.cert_alpha,
                "correction": rule.correction if rule.alpha is not None else self.config.selection.correction,
            },
            "method": self.config.selection.method,
            "tokenizer": m.tokenizer,
            "common": self._common(),
        }
        self._run_recipe(stage, "select", cfg, launcher=False)

    def _evaluate(self, stage: Stage, sources: list[DirectionConfig], patch: Path | None) -> None:
        self._run_recipe(stage, "evaluate", self._eval_config(sources, self._model_section(), patch), launcher=False)

    def _evaluate_reference(self, stage: Stage, sources: list[DirectionConfig], reference: Stage) -> None:
        checkpoints = reference.directory / "checkpoints"
        if self.config.reference_mode == "full":
            cfg = self._eval_config(sources, {"name": "last_checkpoint", "dtype": self.config.model.dtype}, None)
            cfg["common"]["assets"] = {"prev_checkpoint_dir": str(checkpoints)}
            self._run_recipe(stage, "evaluate", cfg, launcher=False)
            return
        # Embedding-only: the changed rows as a patch on the base model (this also keeps a tied model's output side
        # at the base matrix, exactly as it was during training).
        patch = stage.directory / "reference_patch.safetensors"
        if not patch.is_file():
            from fairseq2_kslottery.patches import changed_rows_patch
            from fairseq2_kslottery.sources import load_input_embedding

            base = load_input_embedding(self._base_source())
            tuned = load_input_embedding(str(checkpoints))
            changed_rows_patch(base.weight, tuned.weight, output_side=self.config.tied, source=str(checkpoints)).save(
                patch
            )
        self._evaluate(stage, sources, patch)

    def _evaluate_run(self, stage: Stage, sources: list[DirectionConfig], run: Stage) -> None:
        patch = stage.directory / "ticket_patch.safetensors"
        if not patch.is_file():
            from fairseq2_kslottery.export import ticket_run_patch

            ticket_run_patch(run.directory, self._base_source()).save(patch)
        self._evaluate(stage, sources, patch)

    def _evaluate_transfer(
        self, stage: Stage, sources: list[DirectionConfig], reference: Stage, tickets_file: Path
    ) -> None:
        patch = stage.directory / "transfer_patch.safetensors"
        if not patch.is_file():
            from fairseq2_kslottery.export import transfer_patch

            tuned = str(reference.directory / "checkpoints")
            transfer_patch(self._base_source(), tuned, tickets_file, output_side=self.config.tied).save(patch)
        self._evaluate(stage, sources, patch)

    def _merge_union(self, stage: Stage, files: list[Path], out: Path) -> None:
        from fairseq2_kslottery.tickets import TicketSet

        sets = [TicketSet.load(f) for f in files]
        ids: list[int] = []
        for s in sets:
            ids.extend(t for t in s.token_ids if t not in ids)
        first = sets[0]
        union = TicketSet(
            token_ids=ids,
            rule={"kind": "union", "of": [str(f) for f in files]},
            vocab_size=first.vocab_size,
            embed_dim=first.embed_dim,
            base_fingerprint=first.base_fingerprint,
            tokenizer_fingerprint=first.tokenizer_fingerprint,
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        union.save(out)

    def _base_source(self) -> str:
        m = self.config.model
        return m.path if m.path is not None else m.name

    # --- running --------------------------------------------------------------------------------------------

    def _run_recipe(self, stage: Stage, recipe: str, config: dict[str, Any], *, launcher: bool) -> None:
        stage.directory.mkdir(parents=True, exist_ok=True)
        recipe_file = stage.directory / "recipe.yaml"
        atomic_write_text(recipe_file, yaml.safe_dump(config, sort_keys=False))
        prefix = list(self.config.launcher) if launcher and self.config.launcher else [sys.executable]
        cmd = [
            *prefix,
            "-m",
            f"fairseq2_kslottery.recipes.{recipe}",
            str(stage.directory),
            "--no-rich",
            "--config-file",
            str(recipe_file),
        ]
        log_path = stage.directory / "stage.log"
        unit = "steps" if recipe == "tune" else "translations"
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            assert proc.stdout is not None
            last_error = ""
            for line in proc.stdout:
                log.write(line)
                if "ERROR" in line:
                    last_error = line.split(" - ", 1)[-1].strip()
                match = _TRAIN_STEP.search(line)
                if match:
                    self._progress.update(int(match.group(1)), stage.total, unit)
                match = _GENERATED.search(line)
                if match:
                    self._progress.update(int(match.group(1)), int(match.group(2)), unit)
            code = proc.wait()
        if code != 0:
            raise StageFailedError(stage.name, last_error or f"exit code {code}", log_path)

    def run(self) -> Path:
        """Run every stage that is not done yet, then write the report; returns the report path."""
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.root / "experiment.yaml", yaml.safe_dump(asdict(self.config), sort_keys=False))
        with open(self.root / "run.log", "a", encoding="utf-8") as log:
            self._progress = _Progress(self.stream, log)
            self._prepare_assets()
            count = len(self.stages)
            for index, stage in enumerate(self.stages, start=1):
                marker = stage.directory / STAGE_FILE
                self._progress.start(index, count, stage)
                if marker.is_file():
                    self._progress.finish("done earlier, skipped")
                    continue
                reason = stage.skip_reason()
                if reason is not None:
                    stage.directory.mkdir(parents=True, exist_ok=True)
                    self._write_marker(stage, "skipped", 0.0, reason)
                    self._progress.finish(f"skipped: {reason}")
                    continue
                start = time.perf_counter()
                stage.directory.mkdir(parents=True, exist_ok=True)
                stage.total = stage.size()
                try:
                    stage.action(stage)
                except StageFailedError:
                    self._progress.finish("FAILED")
                    raise
                except (KSLotteryError, OSError) as exc:
                    self._progress.finish("FAILED")
                    raise StageFailedError(stage.name, str(exc), None) from exc
                elapsed = time.perf_counter() - start
                self._write_marker(stage, "done", elapsed, None)
                self._progress.finish(f"done in {elapsed:.0f} s")
            from fairseq2_kslottery.report import build_report

            report = build_report(self.root)
            self._progress.note(f"report: {report}")
        return report

    def _write_marker(self, stage: Stage, status: str, seconds: float, reason: str | None) -> None:
        # wall_seconds is the attempt that finished the stage (an interrupted attempt's time is not counted).
        data = {
            "name": stage.name,
            "kind": stage.kind,
            "status": status,
            "reason": reason,
            "wall_seconds": seconds,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        atomic_write_text(stage.directory / STAGE_FILE, json.dumps(data, indent=2) + "\n")

    def _prepare_assets(self) -> None:
        if self.config.model.prepare == "smollm2":
            from fairseq2_kslottery.smollm2 import ensure_smollm2

            ensure_smollm2(log=self._progress.note)
        elif self.config.model.prepare is not None:
            raise KSLotteryError(f"Unknown `model.prepare` value {self.config.model.prepare!r} (known: smollm2).")


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def run_experiment(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, stream: TextIO | None = None
) -> Path:
    """Load the experiment file and run it; returns the report path."""
    from fairseq2_kslottery.pipeline.config import load_experiment

    return ExperimentRunner(load_experiment(path, overrides), stream=stream).run()
