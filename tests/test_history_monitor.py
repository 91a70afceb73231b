"""The monitor drives the history writer: nothing lost on remove/exit/crash, resume, re-register, a failing disk."""

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from monitor_utils import small_cnn, train

from gradwatch import AnomalyKind, GradWatch
from gradwatch.history import read_history

ROOT = Path(__file__).resolve().parents[1]


def steps_in(path) -> list[int]:
    return [r.step for r in read_history(path)]


def test_remove_drains_the_last_step(tmp_path):
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watch = GradWatch(model, opt, history=tmp_path / "run.jsonl")
    train(model, opt, 20, watch=watch)
    watch.remove()
    assert steps_in(tmp_path / "run.jsonl") == list(range(20))


def test_an_exception_inside_with_keeps_the_step_that_explains_it(tmp_path):
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def give_up(step):
        if step == 5:
            raise RuntimeError("user gives up")

    with pytest.raises(RuntimeError, match="user gives up"), GradWatch(model, opt, history=tmp_path / "r.jsonl") as w:
        train(model, opt, 10, watch=w, fault_step=5, on_step=give_up)
    history = read_history(tmp_path / "r.jsonl")
    assert [r.step for r in history] == list(range(6))
    assert [(e.step, e.kind) for e in history.events] == [(5, AnomalyKind.NONFINITE)]
    assert [(e.step, e.kind) for e in w.events] == [(5, AnomalyKind.NONFINITE)]


@pytest.mark.parametrize("ending", ["return", "crash"])
def test_interpreter_exit_drains_pending_records(tmp_path, ending):
    path = tmp_path / "run.jsonl"
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, "tests")
        from monitor_utils import small_cnn, train
        from gradwatch import GradWatch
        model = small_cnn()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        watch = GradWatch(model, opt, history={str(path)!r})
        train(model, opt, 7, watch=watch, fault_step=6)
        if {ending!r} == "crash":
            raise SystemExit("training crashed")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == (0 if ending == "return" else 1), proc.stderr
    history = read_history(path)
    assert [r.step for r in history] == list(range(7))
    assert [e.step for e in history.events] == [6]


def test_resume_continues_the_same_file(tmp_path):
    path = tmp_path / "run.jsonl"
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    saved = {}
    watch = GradWatch(model, opt, history=path)

    def checkpoint(step):
        if step == 5:  # after step 5: the resumed run's next step is 6
            saved["watch"] = watch.state_dict()
            saved["model"] = {k: v.clone() for k, v in model.state_dict().items()}

    train(model, opt, 9, watch=watch, on_step=checkpoint)
    watch.remove()  # steps 0..8 on file; the job ends (or dies) after step 8
    assert steps_in(path) == list(range(9))

    model2 = small_cnn()
    model2.load_state_dict(saved["model"])
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05)
    with GradWatch(model2, opt2, history=path) as watch2:
        watch2.load_state_dict(saved["watch"])
        train(model2, opt2, 6, watch=watch2)  # steps 6..11
    history = read_history(path)
    assert [r.step for r in history] == list(range(12))
    assert history.restart_count == 0 and history.skipped_lines == 0
    headers = [o for o in map(json.loads, path.read_text().splitlines()) if o["type"] == "header"]
    assert len(headers) == 1


def test_remove_then_register_hooks_keeps_writing(tmp_path):
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watch = GradWatch(model, opt, history=tmp_path / "run.jsonl")
    train(model, opt, 3, watch=watch)
    watch.remove()
    watch.register_hooks()
    train(model, opt, 3, watch=watch)
    watch.remove()
    assert steps_in(tmp_path / "run.jsonl") == list(range(6))


def test_one_header_lists_every_watched_parameter(tmp_path):
    """A head used every other step: one header, null on the steps without its gradient."""
    torch.manual_seed(0)
    body, head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
    model = torch.nn.ModuleDict({"body": body, "head": head})
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    path = tmp_path / "run.jsonl"
    with GradWatch(model, opt, history=path):
        for step in range(6):
            out = body(torch.randn(3, 4))
            (head(out).sum() if step % 2 else out.sum()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [o["type"] for o in lines].count("header") == 1
    assert lines[0]["names"] == ["body.weight", "body.bias", "head.weight", "head.bias"]
    history = read_history(path)
    assert [r.norms[2] is None for r in history] == [True, False] * 3
    assert all(r.norms[0] is not None for r in history)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_never_stops_training(caplog):
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    seen = []
    with caplog.at_level(logging.ERROR, logger="gradwatch"):
        with GradWatch(model, opt, policy="skip", history="/dev/full", sinks=[lambda r: seen.append(r.step)]) as watch:
            train(model, opt, 12, watch=watch, fault_step=4)
    assert seen == list(range(12))
    assert [e.step for e in watch.events] == [4]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "/dev/full" in errors[0] and "No space left" in errors[0]


def test_lightning_fit_from_a_checkpoint_continues_the_history(tmp_path):
    lightning = pytest.importorskip("lightning")
    from torch import nn

    from gradwatch.integrations.lightning import GradWatchCallback

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=8)  # 8 steps per epoch
    path = tmp_path / "run.jsonl"

    def trainer(**kw):
        checkpoints = lightning.pytorch.callbacks.ModelCheckpoint(
            dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}"
        )
        callback = GradWatchCallback(history=path)
        options = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
        return lightning.Trainer(max_epochs=2, callbacks=[callback, checkpoints], **options, **kw)

    trainer().fit(Module(), loader)  # steps 0..15; checkpoints after steps 7 and 15
    assert steps_in(path) == list(range(16))
    trainer().fit(Module(), loader, ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt")  # steps 8..15 again
    history = read_history(path)
    assert [r.step for r in history] == list(range(16)) and history.restart_count == 0


def _history_per_rank(rank: int, world: int, folder: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = GradWatch(model, opt, history=f"{folder}/run.jsonl", log_rank=None)
    for _ in range(3):  # the same on every rank: each check agrees its decision with a collective
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    watch.remove()


def test_every_rank_writes_its_own_file_with_log_rank_none(tmp_path):
    from tests.dist_utils import run_ranks

    run_ranks(_history_per_rank, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.rank0.jsonl", "run.rank1.jsonl"]
    assert steps_in(tmp_path / "run.rank0.jsonl") == [0, 1, 2]
    assert steps_in(tmp_path / "run.rank1.jsonl") == [0, 1, 2]
