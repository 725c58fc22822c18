"""The task registry, TaskConfig, augmentations, the SSL network's spec and BYOL's target."""

from __future__ import annotations

import copy

import pytest
import torch

from fedmerge.align.builtin_specs import permutation_spec_for
from fedmerge.align.permute import apply_permutation, random_permutation
from fedmerge.models import build_model, example_input
from fedmerge.tasks import (
    AugmentConfig,
    TaskConfig,
    augment,
    fixed_subset,
    get_task,
    ssl_network,
    task_names,
)
from fedmerge.tasks.byol import PREDICTOR_PREFIX, TARGET_PREFIX
from fedmerge.training import TrainConfig


def test_registry_lists_the_builtin_tasks() -> None:
    assert task_names() == ["byol", "simclr", "supervised"]
    with pytest.raises(ValueError, match="name: got 'mae'; allowed: byol, simclr, supervised"):
        get_task("mae")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "simclr", "temperature": 0.0}, "temperature: got 0.0; allowed: a number > 0"),
        ({"name": "byol", "ema_decay": 1.0}, "ema_decay: got 1.0; allowed: a number in [0, 1)"),
        ({"name": "simclr", "knn_k": 0}, "knn_k: got 0; allowed: an integer >= 1"),
        ({"name": "simclr", "crop_scale": 0.0}, "crop_scale: got 0.0; allowed: (0, 1]"),
        (
            {"name": "byol", "temperature": 0.2},
            "temperature: got 0.2; allowed: only with task 'simclr' (task is 'byol')",
        ),
        (
            {"knn_k": 5},
            "knn_k: got 5; allowed: only with task 'byol' or 'simclr' (task is 'supervised')",
        ),
    ],
)
def test_task_config_errors_name_the_key(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        TaskConfig(**kwargs)
    assert str(err.value) == message


def test_fixed_subset_is_seeded_and_sorted() -> None:
    a, b = fixed_subset(100, 10, 7), fixed_subset(100, 10, 7)
    assert torch.equal(a, b) and len(a) == 10 and len(set(a.tolist())) == 10
    assert torch.equal(a, a.sort().values)
    assert not torch.equal(a, fixed_subset(100, 10, 8))
    assert torch.equal(fixed_subset(5, 0, 1), torch.arange(5))


def test_augment_is_seeded_per_generator_and_keeps_shapes() -> None:
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    cfg = AugmentConfig(blur=0.5)
    a = augment(x, cfg, generator=torch.Generator().manual_seed(1))
    b = augment(x, cfg, generator=torch.Generator().manual_seed(1))
    c = augment(x, cfg, generator=torch.Generator().manual_seed(2))
    assert a.shape == x.shape
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_augment_without_any_distortion_is_the_identity() -> None:
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    cfg = AugmentConfig(crop_scale=1.0, flip=False, brightness=0.0, contrast=0.0, blur=0.0)
    # area 1 still draws an aspect ratio; sx, sy clamp at 1 only on one side
    out = augment(x, cfg, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    cfg = AugmentConfig(crop_scale=1.0, flip=True, brightness=0.0, contrast=0.0)
    g = torch.Generator().manual_seed(5)
    y = augment(torch.ones(8, 1, 6, 6), cfg, generator=g)
    torch.testing.assert_close(y, torch.ones(8, 1, 6, 6))  # a constant image stays constant


def test_augment_brightness_shifts_a_constant_image_within_its_range() -> None:
    cfg = AugmentConfig(crop_scale=1.0, flip=False, brightness=0.3, contrast=0.5)
    y = augment(torch.zeros(64, 1, 8, 8), cfg, generator=torch.Generator().manual_seed(0))
    per_image = y.flatten(1)
    # contrast acts around the image mean (0 here): only the shift is left
    assert torch.allclose(per_image, per_image[:, :1].expand_as(per_image))
    assert float(per_image.abs().max()) <= 0.3 and float(per_image.std()) > 0.05


@pytest.mark.parametrize("model", ["simple-cnn", "mlp"])
def test_the_traced_spec_of_encoder_plus_projector_permutes_without_changing_outputs(
    model: str,
) -> None:
    def net() -> torch.nn.Module:
        m = build_model(model, input_shape=(1, 28, 28), num_classes=10, seed=0)
        return ssl_network(m, hidden=32, out=16, seed=1)

    a = net()
    spec = permutation_spec_for(a, example_input((1, 28, 28), batch=4))
    assert set(spec.axes) == set(a.state_dict())  # the whole network, projector included
    assert any(k.startswith("projector.") for k in spec.axes)
    perm = random_permutation(spec, a.state_dict(), generator=torch.Generator().manual_seed(0))
    b = net()
    b.load_state_dict(apply_permutation(spec, perm, a.state_dict()))
    a.eval(), b.eval()
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(
        a.state_dict()["projector.0.weight"], b.state_dict()["projector.0.weight"]
    )
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)


def test_ssl_network_has_no_classifier() -> None:
    m = build_model("simple-cnn", input_shape=(1, 28, 28), num_classes=10, seed=0)
    net = ssl_network(m, hidden=32, out=16, seed=1)
    assert not any(k.startswith("encoder.fc3") for k in net.state_dict())
    x = torch.randn(3, 1, 28, 28)
    assert net(x).shape == (3, 16) and net.features(x).shape == (3, 84)  # type: ignore[operator]


def test_byol_target_is_the_ema_of_the_online_network_and_stays_out_of_the_network() -> None:
    task = get_task("byol")
    config = TaskConfig(name="byol", ema_decay=0.9, projection_hidden=16, projection_dim=8,
                        predictor_hidden=16)  # fmt: skip
    model = build_model("mlp", input_shape=(1, 8, 8), num_classes=10, seed=0, hidden=(12,))
    net = task.network(model, config, seed=1)
    before = copy.deepcopy(net.state_dict())
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    train = TrainConfig(batch_size=16, lr=0.1)
    out = task.train(net, x, torch.zeros(16, dtype=torch.long), train, config,
                     generator=torch.Generator().manual_seed(4))  # fmt: skip
    assert out.result.num_steps == 1
    kept = out.kept
    assert kept is not None
    # the network (what the client sends) holds only the online encoder and projector
    assert set(net.state_dict()) == set(before)
    assert not any(k.startswith(("target", "predictor")) for k in net.state_dict())
    assert {k.split(".", 1)[0] + "." for k in kept} == {TARGET_PREFIX, PREDICTOR_PREFIX}
    after = net.state_dict()
    # one step from target = online_0: target_1 = 0.9 * online_0 + 0.1 * online_1
    for name, _ in net.named_parameters():
        expected = 0.9 * before[name] + 0.1 * after[name]
        torch.testing.assert_close(kept[f"{TARGET_PREFIX}{name}"], expected)
        assert not torch.equal(after[name], before[name])
    # next round: the target continues from the kept one, not from the new online network
    net2 = task.network(
        build_model("mlp", input_shape=(1, 8, 8), num_classes=10, seed=5, hidden=(12,)),
        config, seed=6,
    )  # fmt: skip
    online_0 = copy.deepcopy(net2.state_dict())
    out2 = task.train(net2, x, torch.zeros(16, dtype=torch.long), train, config,
                      generator=torch.Generator().manual_seed(9), kept=kept)  # fmt: skip
    assert out2.kept is not None
    for name, _ in net2.named_parameters():
        expected = 0.9 * kept[f"{TARGET_PREFIX}{name}"] + 0.1 * net2.state_dict()[name]
        torch.testing.assert_close(out2.kept[f"{TARGET_PREFIX}{name}"], expected)
        assert not torch.allclose(out2.kept[f"{TARGET_PREFIX}{name}"],
                                  0.9 * online_0[name] + 0.1 * net2.state_dict()[name])  # fmt: skip


def test_simclr_training_lowers_its_loss() -> None:
    task = get_task("simclr")
    config = TaskConfig(name="simclr", projection_hidden=32, projection_dim=16)
    net = task.network(build_model("simple-cnn", input_shape=(1, 28, 28), num_classes=10, seed=0),
                       config, seed=1)  # fmt: skip
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    train = TrainConfig(batch_size=32, lr=0.05)
    g = torch.Generator().manual_seed(0)
    first = task.train(net, x, x[:, 0, 0, 0].long(), train, config, generator=g).result.loss
    last = task.train(net, x, x[:, 0, 0, 0].long(), train, config, generator=g, epochs=20)
    assert last.result.loss < first
    assert last.kept is None and last.result.num_steps == 40
