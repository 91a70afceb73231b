"""The Hugging Face Trainer callback, on a random tiny GPT-2 (offline: nothing is downloaded).

The oracle for the gradients is the Trainer itself: the ``grad_norm`` it logs is the total norm
``clip_grad_norm_`` returns, i.e. before clipping.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from gradwatch import AnomalyKind, StepRecord, read_history  # noqa: E402
from gradwatch.integrations.transformers import STATE_FILE, GradWatchCallback  # noqa: E402
from gradwatch.report import LayerNorms  # noqa: E402

NAN_PARAM = "transformer.h.1.mlp.c_fc.weight"


def _model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=2))


def _data(n: int = 96) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": x, "labels": x} for x in torch.randint(0, 128, (n, 16), generator=g)]


def _trainer(tmp_path, callbacks, model=None, **overrides) -> Trainer:
    options = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=6,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        dataloader_num_workers=0,
    )
    options.update(overrides)
    return Trainer(
        model=model if model is not None else _model(),
        args=TrainingArguments(**options),
        train_dataset=_data(),
        callbacks=callbacks,
    )


class _StepClock(TrainerCallback):
    """Holds the Trainer's global_step of the step running now (for fault injection)."""

    step = -1

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step


def _logged(trainer: Trainer, key: str) -> dict[int, dict]:
    return {entry["step"]: entry for entry in trainer.state.log_history if key in entry}


@pytest.mark.parametrize(
    ("optim", "accumulation", "bf16"),
    [("adamw_torch_fused", 1, False), ("adamw_torch", 2, False), ("adamw_torch_fused", 2, True)],
)
def test_total_norm_is_the_trainers_pre_clip_grad_norm(tmp_path, optim, accumulation, bf16):
    history = tmp_path / "history.jsonl"
    callback = GradWatchCallback(policy="skip", history=history)
    max_grad_norm = 1e-3  # every step is clipped: a monitor at the optimizer step would read 1e-3
    trainer = _trainer(
        tmp_path,
        [callback],
        optim=optim,
        gradient_accumulation_steps=accumulation,
        bf16=bf16,
        max_grad_norm=max_grad_norm,
    )
    trainer.train()

    logged = _logged(trainer, "grad_norm")
    steps = read_history(history).steps
    assert [r.step for r in steps] == list(range(6))  # one check per optimizer step, accumulation or not
    assert callback.watch is not None and callback.watch.step == 6 and callback.events == []
    for record in steps:
        grad_norm = logged[record.step + 1]["grad_norm"]  # the Trainer logs step k as global_step k + 1
        assert grad_norm > 100 * max_grad_norm
        assert record.total_norm == pytest.approx(grad_norm, rel=1e-4)
        # the step's loss as the Trainer computes it: no half loss under accumulation
        assert record.loss == pytest.approx(logged[record.step + 1]["loss"], rel=1e-5)
    assert trainer.lr_scheduler.last_epoch == 6


def test_logs_carry_per_layer_statistics_from_drained_records(tmp_path):
    records: list[StepRecord] = []
    callback = GradWatchCallback(sinks=[records.append])
    trainer = _trainer(tmp_path, [callback], max_steps=4)
    trainer.train()
    by_step = {r.step: r for r in records}
    logs = _logged(trainer, "gradwatch/total_norm")
    assert {2, 3, 4} <= set(logs)  # step 1's log comes before any record has landed on the host
    for entry in logs.values():
        record = by_step[int(entry["gradwatch/step"])]
        assert record.step <= entry["step"] - 1  # drained asynchronously: this step or an earlier one
        assert entry["gradwatch/total_norm"] == record.total_norm
        layers = LayerNorms()(record.names, record.norms)
        c_fc = [n for w, n in zip(record.names, record.norms, strict=True) if w.startswith("transformer.h.0.mlp.c_fc.")]
        assert entry["gradwatch/norm/transformer.h.0.mlp.c_fc"] == pytest.approx(math.sqrt(sum(n * n for n in c_fc)))
        assert {k for k in entry if k.startswith("gradwatch/norm/")} == {f"gradwatch/norm/{k}" for k in layers}


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch"])
def test_nan_gradient_in_one_parameter_skips_that_step(tmp_path, optim):
    clock = _StepClock()
    bad_step = 3
    model = _model()
    param = dict(model.named_parameters())[NAN_PARAM]
    param.register_hook(lambda g: g * math.nan if clock.step == bad_step else g)
    snapshots: dict[str, dict[str, torch.Tensor]] = {}

    class Snapshot(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == bad_step:
                snapshots["before"] = {k: v.detach().clone() for k, v in model.state_dict().items()}

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == bad_step + 1:
                snapshots["after"] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    callback = GradWatchCallback(policy="skip", warmup=100)
    trainer = _trainer(tmp_path, [clock, callback, Snapshot()], model=model, optim=optim, max_grad_norm=1.0)
    trainer.train()

    assert all(torch.isfinite(p).all() for p in model.parameters())
    for key, before in snapshots["before"].items():  # the step did not happen at all
        assert torch.equal(before, snapshots["after"][key]), key
    nonfinite = [e for e in callback.events if e.kind is AnomalyKind.NONFINITE]
    assert [(e.step, e.param) for e in nonfinite] == [(bad_step, NAN_PARAM)]
    assert nonfinite[0].value == param.numel() and "skip" in nonfinite[0].action
    assert {e.step for e in callback.events} == {bad_step}
    # the Trainer's own log shows the fault too: its clip_grad_norm_ saw the NaN gradient (not hidden from it)
    assert math.isnan(_logged(trainer, "grad_norm")[bad_step + 1]["grad_norm"])
    # the Trainer saw a skipped step: its LR scheduler advanced 5 times in 6 steps, AdamW counted 5 updates
    assert trainer.state.global_step == 6
    assert trainer.lr_scheduler.last_epoch == 5
    assert all(int(s["step"]) == 5 for s in trainer.optimizer.optimizer.state.values())


def test_nan_loss_hidden_by_the_trainer_is_in_gradwatchs_records(tmp_path):
    clock = _StepClock()
    bad_step = 2
    model = _model()
    model.lm_head.register_forward_hook(lambda m, i, out: out * math.nan if clock.step == bad_step else out)
    records: list[StepRecord] = []
    callback = GradWatchCallback(policy="skip", sinks=[records.append])
    trainer = _trainer(tmp_path, [clock, callback], model=model, logging_nan_inf_filter=True)
    trainer.train()

    logged = _logged(trainer, "loss")
    assert math.isfinite(logged[bad_step + 1]["loss"])  # the Trainer's filter hid it
    record = next(r for r in records if r.step == bad_step)
    assert math.isnan(record.loss) and record.skipped
    assert any(e.kind is AnomalyKind.LOSS_NONFINITE and e.step == bad_step for e in callback.events)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resume_from_checkpoint_restores_the_monitor(tmp_path):
    straight = GradWatchCallback(warmup=2, history=tmp_path / "straight.jsonl")
    _trainer(tmp_path / "a", [straight], save_strategy="steps", save_steps=3).train()
    saved = tmp_path / "a" / "out" / "checkpoint-3" / STATE_FILE
    assert saved.is_file() and torch.load(saved, weights_only=False)["step"] == 3

    # One history through the restart: the interrupted run's steps 0-2 kept, 3-5 rewritten by the resumed run.
    resumed = GradWatchCallback(warmup=2, history=tmp_path / "straight.jsonl")
    trainer = _trainer(tmp_path / "a", [resumed], save_strategy="steps", save_steps=3)
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-3"))
    assert resumed.watch.step == straight.watch.step == 6
    steps = [r.step for r in read_history(tmp_path / "straight.jsonl").steps]
    assert steps == list(range(6))
    # the resumed run's detector saw 3 restored + 3 new steps: the same statistics as 6 straight ones
    a, b = _running_stats(straight), _running_stats(resumed)
    assert torch.equal(b["total"]["count"], a["total"]["count"]) and int(a["total"]["count"].max()) == 6
    torch.testing.assert_close(b, a, rtol=1e-6, atol=0)
    fresh = GradWatchCallback(warmup=2)
    _trainer(tmp_path / "b", [fresh], max_steps=3).train()  # what a monitor without the restore would hold
    assert int(_running_stats(fresh)["total"]["count"].max()) == 3


def _running_stats(callback: GradWatchCallback) -> dict:
    state = callback.watch.detector.state_dict()
    return {k: state[k] for k in ("params", "total", "loss")}


def test_resume_without_saved_state_warns_and_keeps_trainer_step_numbers(tmp_path, caplog):
    _trainer(tmp_path, [], save_strategy="steps", save_steps=3, max_steps=3).train()  # no callback: no state
    callback = GradWatchCallback()
    trainer = _trainer(tmp_path, [callback])
    with caplog.at_level("WARNING", logger="gradwatch"):
        trainer.train(resume_from_checkpoint=True)
    assert "training resumes at step 3 but no gradwatch_state.pt" in caplog.text
    assert callback.watch.step == 6 and callback.records == 3


def test_fp16_is_refused_with_a_clear_error():
    callback = GradWatchCallback()
    args = type("Args", (), {"fp16": True})()
    with pytest.raises(ValueError, match="fp16"):
        callback.on_train_begin(args, None, None, model=_model(), optimizer=None)


def test_measure_in_backward_is_refused():
    with pytest.raises(ValueError, match="measure_in_backward"):
        GradWatchCallback(measure_in_backward=True)


def _ddp_trainer_run(rank: int, world: int, out: str, port: int) -> None:
    import os

    # accelerate finds the process group run_ranks made; these tell it that this is a 2-rank run.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from pathlib import Path

    records: list[StepRecord] = []
    callback = GradWatchCallback(sinks=[records.append], log_rank=None)
    trainer = _trainer(Path(out), [callback], ddp_backend="gloo", max_steps=3, max_grad_norm=1e-3)
    assert trainer.args.world_size == world
    trainer.train()
    logged = _logged(trainer, "grad_norm")
    # The Trainer's grad_norm is that of the all-reduced gradients: gradwatch measured after DDP's reduction
    # (rank-local gradients differ: each rank has its own batches).
    assert [r.step for r in records] == [0, 1, 2]
    for record in records:
        assert record.total_norm == pytest.approx(logged[record.step + 1]["grad_norm"], rel=1e-4)


def test_ddp_trainer_measures_the_synchronized_gradients(tmp_path):
    from tests.dist_utils import _free_port, run_ranks

    run_ranks(_ddp_trainer_run, str(tmp_path), _free_port(), timeout=240.0)
