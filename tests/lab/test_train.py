"""The training loop: learning, determinism, early stopping, probes, divergence, config."""

import pytest
import torch

from bnlab.lab.data import load_dataset
from bnlab.lab.models import mlp
from bnlab.lab.train import TrainConfig, evaluate, train


def _fit(seed=0, **kwargs):
    data = load_dataset("spirals")
    torch.manual_seed(seed)
    model = mlp(2, (32, 32), 3, norm="bn")
    config = TrainConfig(
        **{"steps": 150, "eval_every": 50, "seed": seed, "progress": False, **kwargs}
    )
    return model, data, train(model, data, config)


def test_training_learns_and_records_metrics():
    model, data, history = _fit()
    assert history.eval_steps == [50, 100, 150]
    assert len(history.step_loss) == 150
    assert history.val_acc[-1] > 0.6 and history.val_loss[-1] < history.val_loss[0]
    assert model.training, "evaluation restores the training mode"
    _, acc = evaluate(model, torch.from_numpy(data.x_val), torch.from_numpy(data.y_val))
    assert acc == pytest.approx(history.val_acc[-1])


def test_same_seed_same_numbers_and_adam():
    a, b = _fit(seed=3, optimizer="adam", lr=0.01)[2], _fit(seed=3, optimizer="adam", lr=0.01)[2]
    assert a.step_loss == b.step_loss
    assert _fit(seed=4)[2].step_loss != _fit(seed=3)[2].step_loss


def test_early_stopping_restores_best_weights():
    data = load_dataset("spirals", max_train=40)
    torch.manual_seed(0)
    model = mlp(2, (64, 64), 3)
    config = TrainConfig(
        steps=3000, eval_every=10, patience=3, lr=0.5, seed=0, progress=False, batch_size=40
    )
    history = train(model, data, config)
    assert history.stopped_early and len(history.eval_steps) < 300
    best = min(history.val_loss)
    loss, _ = evaluate(model, torch.from_numpy(data.x_val), torch.from_numpy(data.y_val))
    assert loss == pytest.approx(best, rel=1e-5)
    assert history.eval_steps[history.val_loss.index(best)] == history.best_step


def test_probes_and_gradient_norms():
    data = load_dataset("spirals")
    model = mlp(2, (8,), 3, norm="bn")
    calls = []
    config = TrainConfig(steps=20, eval_every=10, record_grad_norms=True, progress=False)
    history = train(model, data, config, {"count": lambda m, step: calls.append(step) or step})
    assert calls == [10, 20] and history.probes["count"] == [10, 20]
    norms = history.probes["grad_norm"]
    assert len(norms) == 2 and set(norms[0]) == {n for n, _ in model.named_parameters()}
    last = {n: p.grad.norm().item() for n, p in model.named_parameters()}  # step 20's gradients
    assert norms[1] == pytest.approx(last, rel=1e-6) and norms[0] != pytest.approx(last)


def test_divergence_stops_training():
    data = load_dataset("spirals")
    model = mlp(2, (8,), 3, init="normal", init_scale=1e3)
    config = TrainConfig(steps=200, eval_every=50, lr=1e6, momentum=0.0, progress=False)
    history = train(model, data, config)
    assert history.diverged and len(history.step_loss) < 200


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer": "rmsprop", "steps": 1}, "optimizer: expected 'sgd' or 'adam'"),
        ({"steps": 10, "epochs": 2}, "steps, epochs: give exactly one"),
        ({}, "steps, epochs: give exactly one"),
        ({"steps": 10, "lr": 0}, "lr: expected a positive number"),
        ({"steps": 10, "patience": 0}, "patience: expected None or >= 1"),
    ],
)
def test_bad_config_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)
