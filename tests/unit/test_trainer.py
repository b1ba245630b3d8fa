"""The one Trainer on a small mapper distillation: it learns, a resumed run equals an uninterrupted one, example by
example accumulation equals the batch gradient, and the caller's RNG is left alone."""
import io

import pytest
import torch


@pytest.fixture(scope="module")
def t(bridges):
    class Namespace:
        data = bridges("training.data")
        tasks = bridges("training.tasks")
        trainer = bridges("training.trainer")
        mapper = bridges("mapper")
    return Namespace


def toy_data(t, n=40, seed=0):
    """Targets a fixed linear map of the inputs: learnable, so the held-out loss must fall."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 77, 16, generator=g)
    truth = torch.randn(16, 768, generator=g) * 0.1
    return t.data.DistillData(inputs=inputs, last_token=torch.randint(1, 77, (n,), generator=g), targets=inputs @ truth)


def make_trainer(t, data, steps, per_example=False, seed=0):
    config = t.data.TrainConfig(steps=steps, batch_size=8, lr=3e-3, seed=seed, val_fraction=0.2, eval_every=5)
    mapper = t.data.seeded_init(seed,
                                lambda: t.mapper.BeyondCLIPMapper(t.mapper.MapperConfig(in_dim=16, hidden_dim=32)))
    task = t.tasks.DistillTask(t.tasks.MapperStudent(mapper), data, config)
    task.per_example = per_example
    return t.trainer.Trainer(task, config)


def weights(trainer):
    return {k: v.clone() for k, v in trainer.student.state_dict().items()}


def test_the_held_out_loss_falls(t):
    trainer = make_trainer(t, toy_data(t), steps=40)
    trainer.run()
    assert trainer.last_val_loss() < trainer.initial_val_loss / 2  # 2.5x when written
    assert [h["step"] for h in trainer.history if "val_loss" in h] == [0, 5, 10, 15, 20, 25, 30, 35, 40]


def test_a_resumed_run_equals_an_uninterrupted_one(t):
    data = toy_data(t)
    straight = make_trainer(t, data, steps=20)
    straight.run()
    first = make_trainer(t, data, steps=10)
    first.run()
    saved = io.BytesIO()
    torch.save(first.state_dict(), saved)  # what a checkpoint holds, read back as the run folder reads it
    second = make_trainer(t, data, steps=20)
    second.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
    second.run()
    assert second.history == straight.history
    assert all(torch.equal(a, b) for a, b in zip(weights(second).values(), weights(straight).values()))


def test_example_by_example_accumulation_equals_the_batch_gradient(t):
    data = toy_data(t)
    batch, per_example = make_trainer(t, data, steps=1), make_trainer(t, data, steps=1, per_example=True)
    loss_batch, loss_each = batch.train_step(), per_example.train_step()
    assert abs(loss_batch - loss_each) < 1e-5  # the mean of per-example means of equal-size examples
    for a, b in zip(weights(batch).values(), weights(per_example).values()):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.equal(weights(batch)["mapper.tokens.0.weight"], make_trainer(t, data, 1).student.state_dict()
                           ["mapper.tokens.0.weight"]), "a step changes the weights"


def test_the_callers_random_state_is_left_alone(t):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    trainer = make_trainer(t, toy_data(t), steps=3)
    trainer.run()
    assert torch.equal(torch.random.get_rng_state(), before)


def test_token_ids_stay_integers(t):
    data = t.data.TokenData(ids=torch.arange(12).reshape(3, 4), last_token=torch.tensor([3, 2, 1]),
                            targets=torch.zeros(3, 77, 768))
    ids, last, targets, pooled = data.batch(torch.tensor([2, 0]))
    assert ids.dtype == torch.long and ids.tolist() == [[8, 9, 10, 11], [0, 1, 2, 3]] and pooled is None
    assert targets.dtype == torch.float32 and len(data.without_pooled()) == 3


def test_settings_are_checked(t):
    with pytest.raises(ValueError, match="unknown loss"):
        t.data.TrainConfig(loss="l1")
    with pytest.raises(ValueError, match="unknown training settings"):
        t.data.TrainConfig.from_dict({"steps": 3, "learning_rate": 1})
    with pytest.raises(ValueError, match="divisible"):
        t.data.batch_for_step(torch.arange(10), 0, batch_size=3, seed=0, world=2)
