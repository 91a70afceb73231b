"""Copies, resume states, the events cap, complex losses and the fallback warning (issue 12.11)."""

from __future__ import annotations

import copy
import logging
import pickle

import pytest
import torch
from monitor_utils import small_cnn, train

from gradwatch import GradWatch, _ops


def _watch(**kw):
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return model, opt, GradWatch(model, opt, **kw)


@pytest.mark.parametrize("how", [copy.copy, copy.deepcopy, pickle.dumps], ids=["copy", "deepcopy", "pickle"])
@pytest.mark.parametrize("history", [False, True])
def test_copies_are_refused_clearly(how, history, tmp_path):
    _, _, watch = _watch(history=tmp_path / "h.jsonl" if history else None)
    with pytest.raises(TypeError, match=r"cannot be copied or pickled.*state_dict\(\)"):
        how(watch)
    watch.remove()


def test_load_state_dict_refuses_other_detector_settings():
    model, opt, watch = _watch(sigma=6.0, warmup=5)
    train(model, opt, 6, watch=watch)
    state = watch.state_dict()
    other = GradWatch(small_cnn(), None, sigma=4.0, warmup=5)
    with pytest.raises(ValueError, match=r"other detector settings \(sigma: saved 6.0, here 4.0\)"):
        other.load_state_dict(state)
    same = GradWatch(small_cnn(), None, sigma=6.0, warmup=5)
    same.load_state_dict(state)
    assert same.step == 6


@pytest.mark.parametrize(
    "state, error, match",
    [
        ({"version": 1}, ValueError, r"state lacks \['step', 'param_names', 'detector', 'policy'\]"),
        (None, TypeError, "state must be the dict GradWatch.state_dict"),
        ([("version", 1)], TypeError, "got list"),
        ({"version": 7}, ValueError, "version 7"),
    ],
)
def test_load_state_dict_bad_states_give_clear_errors(state, error, match):
    with pytest.raises(error, match=match):
        GradWatch(small_cnn(), None).load_state_dict(state)


def test_events_are_capped_newest_kept(caplog):
    model, opt, watch = _watch(max_events=5, warmup=1)
    sink = []
    watch.add_sink(lambda r: sink.extend(r.events))

    def poison(step):
        for p in model.parameters():
            p.grad.fill_(float("nan"))

    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        train(model, opt, 3, watch=watch, before_step=poison)
        watch.flush()
    n = len(list(model.parameters()))
    assert len(sink) >= 3 * n  # the sinks get every event (NaN in every gradient, then NaN losses)
    assert watch.events == sink[-5:]
    assert watch.events_dropped == len(sink) - 5
    assert sum("max_events=5" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(ValueError, match="max_events"):
        GradWatch(small_cnn(), None, max_events=0)


def test_complex_loss_is_refused():
    _, _, watch = _watch()
    with pytest.raises(TypeError, match=r"loss is complex \(torch.complex64\).*loss.real"):
        watch.observe_loss(torch.tensor(1.0 + 2.0j))


def test_fallback_warning_names_the_real_reason(monkeypatch):
    monkeypatch.setattr(_ops, "_warned_fallback", set())
    with pytest.warns(RuntimeWarning) as caught:
        assert _ops._use_native(torch.device("meta")) is False
    message = str(caught[0].message)
    if _ops._C is not None:
        assert "built without meta kernels" in message and "failed to load" not in message
    else:
        assert "failed to load" in message and "(None)" not in message
