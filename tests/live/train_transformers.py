"""A real ``transformers.Trainer`` fit under ``LRPilotCallback``, for
tests/test_transformers.py: run as ``python train_transformers.py CONFIG.json``.

A tiny BERT for sequence classification, built from a config with random
weights (nothing from the Hub), on token sequences made in memory; AdamW as
the Trainer builds it, its scheduler with a warmup (which lrpilot takes
over), gradient accumulation, an evaluation every few steps and checkpoints.
The trainings of one config run one after the other in this process (one
import of torch and transformers for several).

Per training, one JSON line per real optimizer step goes to its ``out`` file:
``{"step", "lrs"}``, the LRs the optimizer used, read by an optimizer step
pre-hook registered after the pilot's (it sees what the step reads). At the
end its ``summary`` gets the pilot's stats and step count, the Trainer's
global step and ``log_history``, whether the Trainer replaced the callback
(``restore_callback_states_from_checkpoint``), and the lrpilot warnings seen.

Config (JSON): ``address``, ``run``, ``policy``, ``sync``, ``steps``,
``eval_steps``, ``save_steps``, ``accumulation``, ``warmup_steps``, ``lr``,
``deadline_s``, ``lr_scheduler_type`` (default ``linear``); ``gate_dir``
with ``gates`` (after those steps write ``at-K`` and wait for ``go-K``: the
test steers the run meanwhile);
``trainings``: a list of ``{"output_dir", "out", "summary",
"resume_from"?, "restore_callback_states"?, "gated"?}`` (and any key of the
config, for that training alone: its own ``run`` or ``policy``).
"""

from __future__ import annotations

import os

# Never the network: the model is built from a config, the data in memory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from lrpilot.hook import innermost
from lrpilot.integrations.transformers import LRPilotCallback

VOCAB, LENGTH = 64, 12


class Sequences(torch.utils.data.Dataset):
    """Random token sequences with random labels: the evaluation loss stops
    improving within a few evaluations, so a plateau cuts during the fit."""

    def __init__(self, n: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, LENGTH), generator=generator)
        self.labels = torch.randint(0, 2, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(LENGTH, dtype=torch.long),
            "labels": self.labels[i],
        }


def tiny_bert() -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=LENGTH,
        num_labels=2,
        # No dropout: a resumed fit computes exactly what the first one did.
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return BertForSequenceClassification(config)


class Recorder(TrainerCallback):
    """The LRs of every real optimizer step, from a step pre-hook added at
    the first step (after every callback's on_train_begin, so after the
    pilot's own pre-hook, whatever order the callbacks are in)."""

    def __init__(self, out: Path) -> None:
        self.out = open(out, "w", buffering=1)  # noqa: SIM115 - closed at train end
        self.step = 0
        self.optimizer = None
        self.handle = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.step, self.optimizer = state.global_step, innermost(optimizer)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.handle is None:
            self.handle = self.optimizer.register_step_pre_hook(self.used)

    def used(self, optimizer, *_):
        self.step += 1
        lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.out.write(json.dumps({"step": self.step, "lrs": lrs}) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        if self.handle is not None:
            self.handle.remove()
        self.out.close()


class Gates(TrainerCallback):
    """After step K in ``gates``: write at-K (the pilot's stats) and wait
    until the test writes go-K."""

    def __init__(self, gate_dir: Path, gates: list[int], deadline: float) -> None:
        self.gate_dir, self.gates, self.deadline = gate_dir, set(gates), deadline

    def on_step_end(self, args, state, control, **kwargs):
        k = state.global_step
        if k not in self.gates:
            return
        partial = self.gate_dir / f"at-{k}.partial"
        partial.write_text(json.dumps({"step": k}))
        partial.replace(self.gate_dir / f"at-{k}")
        go = self.gate_dir / f"go-{k}"
        while not go.exists():
            if time.monotonic() > self.deadline:
                sys.exit(f"train_transformers: no go for gate {k} before the deadline")
            time.sleep(0.01)


def train(config: dict, spec: dict, deadline: float) -> dict:
    config = {**config, **spec}  # a training may have its own run, policy, ...
    args = TrainingArguments(
        output_dir=spec["output_dir"],
        max_steps=config["steps"],
        per_device_train_batch_size=4,
        per_device_eval_batch_size=16,
        gradient_accumulation_steps=config["accumulation"],
        learning_rate=config["lr"],
        # The Trainer's warmup would start at LR 0: lrpilot takes it over.
        warmup_steps=config["warmup_steps"],
        lr_scheduler_type=config.get("lr_scheduler_type", "linear"),
        eval_strategy="steps",
        eval_steps=config["eval_steps"],
        save_strategy="steps",
        save_steps=config["save_steps"],
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        restore_callback_states_from_checkpoint=spec.get("restore_callback_states", False),
    )
    pilot_callback = LRPilotCallback(
        policy=config["policy"],
        metric="eval_loss",
        run=config["run"],
        daemon=config["address"],
        sync=config["sync"],
        sync_timeout=10.0,
    )
    callbacks = [pilot_callback, Recorder(Path(spec["out"]))]
    if spec.get("gated"):
        callbacks.append(Gates(Path(config["gate_dir"]), config["gates"], deadline))
    trainer = Trainer(
        model=tiny_bert(),
        args=args,
        train_dataset=Sequences(64, seed=1),
        eval_dataset=Sequences(32, seed=2),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=spec.get("resume_from"))
    # With restore_callback_states_from_checkpoint the Trainer builds a new
    # callback from the checkpoint's arguments in place of ours.
    used = next(c for c in trainer.callback_handler.callbacks if isinstance(c, LRPilotCallback))
    pilot = used.pilot
    return {
        "stats": asdict(pilot.stats),
        "pilot_steps": pilot.step_count,
        "global_step": trainer.state.global_step,
        "log_history": trainer.state.log_history,
        "replaced": used is not pilot_callback,
        # The Trainer's scheduler never stepped (its last_epoch is the 0 of
        # its construction, as saved in the checkpoint), and has its own
        # class back.
        "scheduler_last_epoch": trainer.lr_scheduler.last_epoch,
        "scheduler_class": type(trainer.lr_scheduler).__module__,
    }


def main(config_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    torch.set_num_threads(1)
    deadline = time.monotonic() + config.get("deadline_s", 80)
    for spec in config["trainings"]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = train(config, spec, deadline)
        summary["warnings"] = [
            str(w.message) for w in caught if str(w.message).startswith("lrpilot")
        ]
        Path(spec["summary"]).write_text(json.dumps(summary))
        if time.monotonic() > deadline:
            sys.exit("train_transformers: deadline passed")


if __name__ == "__main__":
    main(sys.argv[1])
