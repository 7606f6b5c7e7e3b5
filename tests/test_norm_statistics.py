"""BatchNorm's running statistics re-estimated before each evaluation (session/norm_statistics.py)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import jointcompress
from jointcompress import compress
from jointcompress.recipe import parse_recipe, with_added_fields
from jointcompress.session.norm_statistics import RandomStates, recalibrate_norms


class ConvBN(nn.Module):
    def __init__(self, momentum: float | None = 0.1):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8, momentum=momentum)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x))).mean((2, 3))))


def _data(n: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g) * 2 + 1
    return x, (x.mean((1, 2, 3)) > 1).long() + (x[:, 0, 0, 0] > 1).long()


def _bn_input_stats(model: ConvBN, batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain average over the batches of each batch's per-channel mean and unbiased variance of the
    BatchNorm's input, with the model as evaluated."""
    model.eval()
    with torch.no_grad():
        feats = [model.conv(b) for b in batches]
    means = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    variances = torch.stack([f.transpose(0, 1).reshape(8, -1).var(1, unbiased=True) for f in feats]).mean(0)
    return means, variances


def test_recalibration_averages_the_batches_statistics_and_restores_the_rest():
    torch.manual_seed(0)
    model = ConvBN()
    model.train()
    x, _ = _data()
    batches = [x[i:i + 32] for i in range(0, 96, 32)]
    model.bn.num_batches_tracked.fill_(7)
    used = recalibrate_norms(model, iter(batches + [x[:5] * 100]), lambda b: model(b), max_batches=3)
    assert used == 3  # the fourth batch (far off) was not read
    mean, var = _bn_input_stats(model, batches)
    model.train()
    torch.testing.assert_close(model.bn.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn.running_var, var, rtol=1e-5, atol=1e-6)
    assert model.bn.momentum == 0.1 and int(model.bn.num_batches_tracked) == 7
    assert model.training and model.drop.training and model.bn.training  # every layer's mode as it was


def test_no_batchnorm_or_no_batches_changes_nothing():
    plain = nn.Sequential(nn.Linear(4, 4))
    assert recalibrate_norms(plain, iter([torch.randn(2, 4)]), plain, 8) == 0
    model = ConvBN()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert recalibrate_norms(model, iter([]), model, 8) == 0
    assert recalibrate_norms(model, iter([torch.randn(4, 1, 6, 6)]), model, 0) == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_failing_forward_leaves_the_statistics_training_left():
    model = ConvBN()
    model.bn.running_mean.fill_(0.25)

    def forward(batch):
        model(batch)
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        recalibrate_norms(model, iter([torch.randn(4, 1, 6, 6)] * 2), forward, 2)
    assert torch.equal(model.bn.running_mean, torch.full((8,), 0.25)) and model.bn.momentum == 0.1


def test_random_states_are_put_back():
    gen = torch.Generator().manual_seed(3)
    loader = DataLoader(TensorDataset(torch.arange(20.0)), batch_size=4, shuffle=True, generator=gen)
    before = (gen.get_state(), torch.get_rng_state(), np.random.get_state()[1], random.getstate())
    with RandomStates(loader):
        list(loader)
        torch.rand(3), np.random.rand(), random.random()
        assert not torch.equal(before[0], gen.get_state())  # the draws inside moved every state
    assert torch.equal(before[0], gen.get_state()) and torch.equal(before[1], torch.get_rng_state())
    assert (before[2] == np.random.get_state()[1]).all() and before[3] == random.getstate()


def _compress(recalibrate: int, loader, momentum: float | None = 0.1):
    torch.manual_seed(0)
    model = ConvBN(momentum=momentum)
    x, y = _data(64, seed=1)
    recipe = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5}, {"type": "quant_lsq", "bits": 4, "start": 0.3}],
              "training": {"epochs": 2, "batch_size": 16, "keep": "last", "recalibrate_norms": recalibrate}}

    def evaluate(m):
        with torch.no_grad():
            return {"accuracy": (m(x).argmax(1) == y).float().mean().item()}

    result = compress(model, recipe, loader, evaluate)
    return model, result


def test_the_loop_recalibrates_before_evaluating_and_trains_the_same_weights():
    x, y = _data(96)
    shuffled = lambda: DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True,  # noqa: E731
                                  generator=torch.Generator().manual_seed(5))
    off, _ = _compress(0, shuffled())
    on, _ = _compress(2, shuffled())
    for name, tensor in off.state_dict().items():
        if "running" not in name:  # the same batches in the same order trained the same weights
            assert torch.equal(tensor, on.state_dict()[name]), name
    assert not torch.allclose(off.bn.running_mean, on.bn.running_mean)


def test_statistics_that_never_moved_are_re_estimated_for_the_kept_model():
    """momentum 0: training leaves the running statistics at their start (mean 0, variance 1), as stale as
    they get; the kept model evaluates with the statistics of the first batches under its final weights."""
    x, y = _data(96)
    ordered = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)
    stale, _ = _compress(0, ordered, momentum=0.0)
    assert torch.equal(stale.bn.running_mean, torch.zeros(8))
    model, result = _compress(2, ordered, momentum=0.0)
    mean, var = _bn_input_stats(model, [x[:32], x[32:64]])
    torch.testing.assert_close(model.bn.running_mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.bn.running_var, var, rtol=1e-4, atol=1e-5)
    assert model.bn.momentum == 0.0
    logits = model(x[:8]).detach()
    result.finalize()
    torch.testing.assert_close(model(x[:8]), logits)  # finalize keeps them


def test_a_callers_loop_recalibrates_through_the_session():
    torch.manual_seed(0)
    model = ConvBN(momentum=0.0)
    x, _ = _data(64)
    session = jointcompress.prepare(model, {"techniques": [{"type": "quant_lsq", "bits": 4}],
                                            "training": {"recalibrate_norms": 3}}, total_steps=4, example_inputs=x[:2])
    batches = [(x[i:i + 16],) for i in range(0, 64, 16)]
    assert session.recalibrate_norms(batches) == 3
    mean, _ = _bn_input_stats(model, [b[0] for b in batches[:3]])
    torch.testing.assert_close(model.bn.running_mean, mean, rtol=1e-4, atol=1e-5)
    assert session.recalibrate_norms(batches, max_batches=0) == 0


def test_a_checkpoint_from_before_the_field_reads_as_trained_without_recalibration():
    """It trained with the running averages; it may resume with another count (test_resume.py: only the
    statistics evaluations read change, recipe.MEMORY_FIELDS)."""
    from jointcompress.recipe import without_memory_fields

    assert with_added_fields({"training": {"epochs": 3}})["training"]["recalibrate_norms"] == 0
    assert without_memory_fields({"training": {"recalibrate_norms": 4, "epochs": 3}}) == {"training": {"epochs": 3}}
    assert parse_recipe({}).training.recalibrate_norms == 16
    with pytest.raises(Exception, match="recalibrate_norms"):
        parse_recipe({"training": {"recalibrate_norms": -1}})


def test_plain_training_keeps_the_running_averages():
    """train_baseline (teachers, uncompressed references) moves no grid or mask: no statistics pass."""
    from jointcompress.api import train_baseline

    torch.manual_seed(0)
    model = ConvBN(momentum=0.0)
    x, y = _data(64)
    train_baseline(model, (x, y), lambda m: {"accuracy": 0.5}, epochs=1, batch_size=16)
    assert torch.equal(model.bn.running_mean, torch.zeros(8))


def test_a_run_stopped_mid_epoch_resumes_to_the_same_statistics(tmp_path):
    """The statistics pass draws its batches from the loader between epochs and puts the RNG back: a run
    stopped mid-epoch and resumed ends with the uninterrupted run's weights and statistics, bit for bit."""
    x, y = _data(96)
    recipe = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5}, {"type": "quant_lsq", "bits": 4, "start": 0.3}],
              "training": {"epochs": 3, "batch_size": 16, "recalibrate_norms": 3}}

    class StopAt:
        def on_step(self, trainer, step, out):
            if step == 9:
                raise KeyboardInterrupt

    def model():
        torch.manual_seed(0)
        return ConvBN()

    whole = compress(model(), recipe, (x, y), lambda m: {"accuracy": 0.5})
    with pytest.raises(KeyboardInterrupt):
        compress(model(), recipe, (x, y), lambda m: {"accuracy": 0.5}, run_dir=tmp_path, checkpoint_every=4,
                 callbacks=[StopAt()])
    resumed = compress(model(), recipe, (x, y), lambda m: {"accuracy": 0.5}, run_dir=tmp_path, resume=True)
    assert any(e["event"] == "resumed" for e in resumed.history.events)
    a, b = resumed.model.state_dict(), whole.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["bn.running_mean"], torch.zeros(8))


class FrozenNormCNN(ConvBN):
    """Pretrained statistics the model keeps: its train() leaves the BatchNorm in evaluation mode."""

    def __init__(self):
        super().__init__()
        with torch.no_grad():
            self.bn.running_mean.fill_(0.5)
            self.bn.running_var.fill_(2.0)

    def train(self, mode: bool = True):
        super().train(mode)
        self.bn.eval()
        return self


def test_a_batchnorm_the_model_keeps_frozen_keeps_its_statistics():
    """Re-estimated, they changed every later training step too (training normalizes by them)."""
    model = FrozenNormCNN()
    model.train()
    x, _ = _data(32)
    assert recalibrate_norms(model, iter([x[:16], x[16:]]), model, 2) == 0
    assert torch.equal(model.bn.running_mean, torch.full((8,), 0.5)) and not model.bn.training and model.conv.training


def test_a_sampler_with_its_own_generator_trains_the_same_order():
    """RandomStates put back the loader's generator only: a sampler's own shuffle moved with the pass, and every
    later epoch trained on other batches than the same run without it."""
    from torch.utils.data import RandomSampler

    x, y = _data(96)
    ds = TensorDataset(x, y)
    loader = lambda: DataLoader(ds, batch_size=32, sampler=RandomSampler(ds, generator=torch.Generator().manual_seed(5)))  # noqa: E731
    off, _ = _compress(0, loader())
    on, _ = _compress(2, loader())
    for name, tensor in off.state_dict().items():
        if "running" not in name:
            assert torch.equal(tensor, on.state_dict()[name]), name


def test_persistent_workers_are_not_used_for_the_pass():
    """Their own random states (a dataset's augmentation) would move with the extra batches: the pass reads the
    same batches in this process."""
    from jointcompress.session.norm_statistics import batches_for_the_pass

    x, y = _data(32)
    ds = TensorDataset(x, y)
    plain = DataLoader(ds, batch_size=8)
    assert batches_for_the_pass(plain) is plain
    persistent = DataLoader(ds, batch_size=8, num_workers=1, persistent_workers=True)
    view = batches_for_the_pass(persistent)
    assert view.num_workers == 0 and view.batch_sampler is persistent.batch_sampler
    assert all(torch.equal(a[0], b[0]) for a, b in zip(view, plain))


def test_a_batch_with_nan_leaves_the_running_averages_and_says_so():
    """One corrupt sample (its training step skipped) stayed in the re-estimated averages for good, and the
    model evaluated and stored NaN logits."""
    model = ConvBN()
    model.bn.running_mean.fill_(0.25)
    x, _ = _data(32)
    bad = x[16:].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="layer 'bn' non-finite statistics"):
        assert recalibrate_norms(model, iter([x[:16], bad]), model, 2) == 0
    assert torch.equal(model.bn.running_mean, torch.full((8,), 0.25))


class _EpochSeededSampler(torch.utils.data.Sampler):
    """A sampler whose order is seeded by an epoch counter it moves on when read to its end (accelerate's)."""

    def __init__(self, n: int):
        self.n, self.epoch = n, 0

    def __len__(self):
        return self.n

    def __iter__(self):
        yield from torch.randperm(self.n, generator=torch.Generator().manual_seed(self.epoch)).tolist()
        self.epoch += 1


def test_a_pass_that_reads_the_loader_to_its_end_leaves_its_epoch_counter():
    """CompressionTrainer re-estimates on one cached loader; where an epoch held no more batches than the pass
    reads, each pass moved the sampler's epoch on, and a resumed run (its loader at 0) read other batches."""
    from torch.utils.data import DataLoader, TensorDataset

    x, _ = _data(32)
    loader = DataLoader(TensorDataset(x), batch_size=16, sampler=_EpochSeededSampler(32))
    with RandomStates(loader):
        assert len(list(loader)) == 2 and loader.sampler.epoch == 1  # read to its end: moved on
    assert loader.sampler.epoch == 0
