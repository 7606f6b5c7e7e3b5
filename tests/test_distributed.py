"""Data-parallel joint compression under torchrun (2 processes, gloo on CPU): masks, scores
and step sizes are identical on every rank, only rank 0 writes, and the result is close to a
single-process run with the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    import torch.distributed as dist
    from safetensors.torch import save_file
    from jointcompress import compress
    from jointcompress.data import load_digits, evaluator
    from jointcompress.models import LeNet300

    out = sys.argv[1]
    rank = int(os.environ.get("RANK", "0"))
    who = f"rank{rank}" if "WORLD_SIZE" in os.environ else "single"

    import atexit
    def _thread_names():
        names = []
        for t in os.listdir("/proc/self/task"):
            try:
                names.append(open(f"/proc/self/task/{t}/comm").read().strip())
            except OSError:
                pass
        return names

    def _threads_at_exit():  # registered first, so it runs after jointcompress's hook (LIFO)
        import time
        for _ in range(40):  # gloo's loop thread ends a moment after the group is destroyed: wait up to 2 s
            names = _thread_names()
            if not any("gloo" in n for n in names):
                break
            time.sleep(0.05)
        json.dump({"initialized": dist.is_initialized(), "threads": names}, open(os.path.join(out, who + ".exit"), "w"))
    atexit.register(_threads_at_exit)

    import jointcompress.targets as targets
    from jointcompress.recipe import parse_recipe
    from jointcompress.techniques.size_estimate import measured_bytes
    split = load_digits()
    resolve_target = targets.resolve_target


    def resolve_by_rank(model, asked, example, sensitivity=None):  # each rank would resolve the target its own way (timings differ)
        data = asked.model_dump()
        data["target"] = None
        data["techniques"][0]["sparsity"] = 0.25 if rank == 0 else 0.5
        return parse_recipe(data)


    def run(tag, recipe, own_target=False, nan_on_rank1=False, own_init=False, batch_norm=False):
        torch.manual_seed(1 + (rank if own_init else 0))  # own_init: each rank builds its model from its own seed
        model = LeNet300(64, 10)
        if batch_norm:  # momentum 0: training leaves the running statistics at zero mean, unit variance
            model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8, momentum=0.0),
                                        torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(512, 10))
        torch.manual_seed(1)
        trace, calls = [], []
        targets.resolve_target = resolve_by_rank if own_target else resolve_target
        loss_fn = None
        if nan_on_rank1:  # the task loss is NaN on rank 1 at its third step
            import torch.nn.functional as F

            def loss_fn(out, batch):
                calls.append(1)
                loss = F.cross_entropy(out, batch[1])
                return loss * float("nan") if rank == 1 and len(calls) == 3 else loss

        class Trace:  # each step's model state, summed per tensor (each rank's own Fisher estimate left out)
            def on_step(self, trainer, step, out):
                trace.append({k: float(t.double().sum()) for k, t in model.state_dict().items()
                              if t.is_floating_point() and "fisher" not in k and "width_noise" not in k})

        res = compress(model, recipe, (split.x_train, split.y_train), evaluator(split.x_test, split.y_test),
                       callbacks=[Trace()], checkpoint_every=7, loss_fn=loss_fn,
                       run_dir=os.path.join(out, f"run_{tag}_" + ("dist" if who != "single" else "single")))
        first = res.techniques[0]
        budget = next((t for t in res.techniques if t.kind == "size_budget"), None)
        state = {"mask." + k: v.contiguous() for k, v in first.state_dict().get("masks", {}).items()}
        state.update({"model." + k: v.contiguous() for k, v in model.state_dict().items()})
        save_file(state, os.path.join(out, f"{tag}.{who}.safetensors"))
        info = {"metrics": res.metrics, "world": dist.get_world_size() if dist.is_initialized() else 1,
                "steps": res.history.epochs[-1]["step"], "file_bytes": measured_bytes(model, res.example_inputs)["total"],
                "sparsity": first.achieved_sparsity() if hasattr(first, "achieved_sparsity") else None,
                "budget_events": [e["event"] for e in budget.events] if budget is not None else [], "trace": trace,
                "recipe": res.recipe.model_dump(mode="json"),
                "nonfinite": [e["what"] for e in res.history.events if e.get("event") == "nonfinite"]}
        json.dump(info, open(os.path.join(out, f"{tag}.{who}.json"), "w"))


    for scenario in json.loads(sys.argv[2]):  # one launch for every scenario: torchrun's start is most of a short run
        run(**scenario)
    # no destroy_process_group() here on purpose: jointcompress created the group, so it must
    # also tear it down at exit (gloo otherwise can abort the process after a good run)
    """
)


MASKS_AND_LSQ = {"techniques": [
    {"type": "prune_unstructured", "sparsity": 0.7, "criterion": "learned", "scope": "global", "end": 0.5},
    {"type": "quant_lsq", "bits": 4, "start": 0.3}],
    "training": {"epochs": 3, "batch_size": 64, "lr": 3e-3}}
JOINT_FORM = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.7}, {"type": "quant_lsq", "bits": 4}],
              "training": {"epochs": 2, "batch_size": 64, "lr": 3e-3}}
# learned widths and the Fisher price on the dead zones: gradients each rank adds from its own estimate
LEARNED_WIDTHS = {"techniques": [{"type": "quant_lsq", "bits": 4, "zero_level": True, "learn_bits": True},
                                 {"type": "size_budget", "saliency": 30.0}],
                  "training": {"epochs": 3, "batch_size": 64, "lr": 3e-3}}
LATENCY_TARGET = {"techniques": [{"type": "prune_structured", "sparsity": 0.5, "end": 0.5}],
                  "target": {"latency_ms": 1.0, "batch": 1}, "training": {"epochs": 1, "batch_size": 64, "lr": 3e-3}}
SCENARIOS = [  # the first runs in one process too, as the reference
    {"tag": "masks", "recipe": MASKS_AND_LSQ},
    {"tag": "joint_form", "recipe": {"mode": "joint", "target": {"ratio": 60}, **JOINT_FORM}},
    {"tag": "learned_widths", "recipe": {"mode": "joint", "target": {"ratio": 30}, **LEARNED_WIDTHS}},
    {"tag": "own_target", "recipe": LATENCY_TARGET, "own_target": True},
    {"tag": "nan", "recipe": MASKS_AND_LSQ, "nan_on_rank1": True},
    {"tag": "joint_form_own_init", "recipe": {"mode": "joint", "target": {"ratio": 60}, **JOINT_FORM}, "own_init": True},
    {"tag": "batch_norm", "recipe": {**JOINT_FORM, "training": {**JOINT_FORM["training"], "epochs": 1}}, "batch_norm": True},
]


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """SCRIPT's scenarios under torchrun on 2 processes, in one launch, and the first in one process."""
    out = tmp_path_factory.mktemp("torchrun")
    script = out / "train.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                        str(out), json.dumps(SCENARIOS)], env=_clean_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = subprocess.run([sys.executable, str(script), str(out), json.dumps(SCENARIOS[:1])], env=_clean_env(),
                       capture_output=True, text=True, timeout=400)
    assert s.returncode == 0, s.stderr[-3000:]
    return out


def _read(out, tag: str, who: str):
    return json.loads((out / f"{tag}.{who}.json").read_text())


def _states(out, tag: str):
    from safetensors.torch import load_file

    return (load_file(str(out / f"{tag}.rank{r}.safetensors")) for r in (0, 1))


@pytest.mark.slow
def test_torchrun_two_processes_identical_masks_and_close_to_single_process(runs):
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("reads the threads left at exit from /proc (Linux)")
    r0, r1 = _states(runs, "masks")
    assert any(k.endswith(".hard") for k in r0) and any(k.endswith("log_step") for k in r0)
    for k in r0:  # masks, scores, thresholds, LSQ step sizes, weights: bit-identical on both ranks
        assert torch.equal(r0[k], r1[k]), k
    j0, j1, js = (_read(runs, "masks", who) for who in ("rank0", "rank1", "single"))
    assert j0["world"] == 2 and js["world"] == 1
    assert j0["metrics"] == j1["metrics"]  # evaluation reduced over the ranks
    assert j0["steps"] == js["steps"]  # training.batch_size is the global batch: same number of steps
    assert abs(j0["sparsity"] - js["sparsity"]) < 1e-3
    assert abs(j0["metrics"]["accuracy"] - js["metrics"]["accuracy"]) < 0.08, (j0, js)
    # the group compress created was torn down before interpreter finalization on both ranks,
    # and really freed: no gloo thread is left to race the interpreter's shutdown (SIGABRT)
    for r in (0, 1):
        at_exit = json.loads((runs / f"rank{r}.exit").read_text())
        assert at_exit["initialized"] is False
        assert not [n for n in at_exit["threads"] if "gloo" in n], at_exit
    # only rank 0 wrote checkpoints (one directory, complete files)
    assert sorted(p.name for p in (runs / "run_masks_dist" / "checkpoints").glob("ckpt-*.pt"))[-1] == "ckpt-000000066.pt"


@pytest.mark.slow
@pytest.mark.parametrize("tag, ratio", [("joint_form", 60), ("learned_widths", 30)])
def test_torchrun_trains_the_size_budget_identically_on_both_ranks_and_lands_on_the_target(runs, tag, ratio):
    """mode: joint under a size target under torchrun: the ranks hold the same model at every step, though
    each rank's Fisher estimate (from its own gradients) orders the landing's catch-up cuts, prices the
    learned widths and the dead zones, and re-fits a width's step (rank 0's cuts, gradients and re-fits go
    to every rank); and the file is on the target. The joint form's run is short for its target, so the
    catch-up has to cut."""
    from jointcompress.artifact.size import dense_fp32_bytes
    from jointcompress.models import LeNet300

    r0, r1 = _states(runs, tag)
    assert any(k.endswith("dead_zone_raw") for k in r0)
    for k in r0:  # weights, step sizes, dead zones, the fixed pattern: bit-identical on both ranks
        assert torch.equal(r0[k], r1[k]), k
    j0, j1 = (_read(runs, tag, f"rank{r}") for r in (0, 1))
    assert j0["world"] == 2 and j0["metrics"] == j1["metrics"] and j0["file_bytes"] == j1["file_bytes"]
    assert tag != "joint_form" or j0["budget_events"].count("size_catch_up") >= 2, j0["budget_events"]
    assert len(j0["trace"]) == j0["steps"] and j0["trace"] == j1["trace"]  # the same model at every step
    target = dense_fp32_bytes(LeNet300(64, 10)) / ratio
    assert 0.9 * target <= j0["file_bytes"] <= 1.02 * target, (j0["file_bytes"], target)


@pytest.mark.slow
def test_batchnorm_statistics_re_estimated_on_each_rank_end_as_rank_0s(runs):
    """Each rank re-estimates BatchNorm's statistics on its own shard before evaluating; every rank then
    evaluates, keeps and saves rank 0's (momentum 0: without the pass they would still be zero)."""
    r0, r1 = _states(runs, "batch_norm")
    assert r0["model.1.running_mean"].abs().sum() > 0
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    j0, j1 = (_read(runs, "batch_norm", who) for who in ("rank0", "rank1"))
    assert j0["metrics"] == j1["metrics"]


@pytest.mark.slow
def test_a_rank_that_builds_other_weights_trains_rank_0s_model(runs):
    """prepare() puts rank 0's model on every rank, but after the techniques' setup had read each rank's own
    weights: the size budget's starting bytes and multiplier differed on rank 1, and its averaged gradients
    moved rank 0's model (logits 0.35 away from the run whose ranks began alike)."""
    (alike, _), (own, own_rank1) = _states(runs, "joint_form"), _states(runs, "joint_form_own_init")
    for k in alike:
        assert torch.equal(alike[k], own[k]) and torch.equal(own[k], own_rank1[k]), k


@pytest.mark.slow
def test_torchrun_resolves_a_target_once_on_rank_0_for_every_rank(runs):
    """A latency target is allocated from timings, which differ from rank to rank: each rank resolved
    its own (here, by construction, other sparsities), and trained other widths than rank 0's."""
    j0, j1 = (_read(runs, "own_target", f"rank{r}") for r in (0, 1))
    assert j0["recipe"] == j1["recipe"] and j1["recipe"]["techniques"][0]["sparsity"] == 0.25


LOOP = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import torch
    torch.set_num_threads(1)
    import torch.distributed as dist
    import torch._dynamo  # before the group (docs/reliability.md, "Exit")
    import jointcompress

    dist.init_process_group("gloo")  # the user's own group, which the sampler needs
    torch.manual_seed(0)
    x = torch.randn(512, 20)
    y = (x[:, :5].sum(1) > 0).long()
    ds = torch.utils.data.TensorDataset(x, y)
    sampler = torch.utils.data.distributed.DistributedSampler(ds, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=32, sampler=sampler)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 2))
    # the joint form: accuracy against the size term, which PCGrad projects
    recipe = {"mode": "joint", "target": {"ratio": 6}, "techniques": [{"type": "quant_lsq", "bits": 4}],
              "coordination": {"strategy": "pcgrad"}}
    session = jointcompress.prepare(model, recipe, total_steps=2 * len(loader))  # distributed="auto" by default
    optimizer = torch.optim.Adam(session.param_groups(lr=3e-3))
    session.bind(optimizer)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for xb, yb in loader:
            optimizer.zero_grad()
            for xm, ym in zip(xb.chunk(2), yb.chunk(2)):  # two micro-batches a step (gradient accumulation)
                terms = session.loss(model(xm), (xm, ym))
                session.backward({name: t / 2 for name, t in terms.items()})
            session.before_step()
            optimizer.step()
            session.after_step()
    session.recalibrate_norms(loader)  # each rank on its own shard; rank 0's statistics are then every rank's
    digest = hashlib.sha256(b"".join(v.contiguous().numpy().tobytes() for _, v in sorted(model.state_dict().items())))
    rank = dist.get_rank()
    json.dump({"world": dist.get_world_size(), "state": digest.hexdigest()}, open(os.path.join(sys.argv[1], f"loop{rank}.json"), "w"))
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_the_session_in_a_users_loop_joins_torchrun_by_default(tmp_path):
    """prepare() defaulted to one process: under torchrun each rank trained its own model (the docs then
    said to wrap it in DistributedDataParallel, whose reducer the per-term backward breaks). Two micro-batches
    a step: PCGrad resolves them together on each rank, and the ranks still agree, BatchNorm's statistics too once
    recalibrate_norms re-estimated them (each rank on its own shard: they differed by 0.07)."""
    script = tmp_path / "loop.py"
    script.write_text(LOOP)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                        str(tmp_path)], env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    j0, j1 = (json.loads((tmp_path / f"loop{r}.json").read_text()) for r in (0, 1))
    assert j0["world"] == 2 and j0["state"] == j1["state"]


GLOBAL_BATCH = textwrap.dedent(
    """
    import os, sys
    import torch
    torch.set_num_threads(1)
    import torch.distributed as dist
    import torch._dynamo  # before the group (docs/reliability.md, "Exit")
    import jointcompress

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    x = torch.randn(48, 20)
    y = (x[:, :5].sum(1) > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    recipe = {"mode": "joint", "target": {"ratio": 12}, "techniques": [{"type": "quant_lsq", "bits": 4}],
              "coordination": {"strategy": "pcgrad"}}
    session = jointcompress.prepare(model, recipe, total_steps=10, example_inputs=x[:2])
    optimizer = torch.optim.SGD(session.param_groups(lr=0.05), lr=0.05)
    session.bind(optimizer)
    seen = {}
    for step in range(3):  # a global batch of 16; each rank its share
        xb, yb = x[16 * step: 16 * step + 16].chunk(world)[rank], y[16 * step: 16 * step + 16].chunk(world)[rank]
        optimizer.zero_grad()
        stats = session.backward(session.loss(model(xb), (xb, yb)))
        session.before_step()
        seen[f"changed{step}"] = torch.tensor(stats.changed)
        seen.update({f"{step}:{n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        optimizer.step()
        session.after_step()
    if rank == 0:
        torch.save(seen, os.path.join(sys.argv[1], f"grads{world}.pt"))
    if world > 1:
        dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_pcgrad_under_torchrun_takes_the_global_batchs_update(tmp_path):
    """Each rank projected its own batch's gradients and the ranks averaged the projections: PCGrad is not
    linear, so two ranks of 8 samples took another update than one process with the 16. The ranks' per-term
    gradients are now averaged first and projected once, on every rank alike."""
    script = tmp_path / "global_batch.py"
    script.write_text(GLOBAL_BATCH)
    for launch in ([sys.executable], [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]):
        r = subprocess.run([*launch, str(script), str(tmp_path)], env=_clean_env(), capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    one, two = (torch.load(tmp_path / f"grads{w}.pt", weights_only=True) for w in (1, 2))
    assert float(one["changed0"]) > 1e-3  # PCGrad changes these updates: the terms conflict
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-7, msg=key)


@pytest.mark.slow
def test_a_non_finite_step_on_one_rank_is_named_with_its_rank_and_term_on_every_rank(runs):
    """Rank 0, whose history is written, recorded only "a loss term is non-finite on another rank"."""
    j0, j1 = (_read(runs, "nan", f"rank{r}") for r in (0, 1))
    assert j0["nonfinite"] == ["loss term 'task' is nan on rank 1"] and j1["nonfinite"] == ["loss term 'task' is nan"]


@pytest.mark.parametrize("rank, says", [(0, 1), (1, 0)])
def test_the_command_line_warns_from_rank_0_only(rank, says):
    """Every rank runs the same recipe, so each printed each warning once more under torchrun."""
    import warnings

    from jointcompress.distributed import DistContext, quiet_other_ranks

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_other_ranks(DistContext(rank=rank, world_size=2, backend="gloo"))
        warnings.warn("size_budget: something to say once")
    assert len(caught) == says


def _mean_metrics_worker(rank: int, store: str, said) -> None:
    import torch.distributed as tdist

    from jointcompress.distributed import DistContext
    from jointcompress.errors import TrainingError

    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        DistContext(rank=rank, world_size=2, backend="gloo").mean_metrics({"accuracy": 0.5, **({"f1": 0.4} if rank else {})})
        said.put((rank, "averaged"))
    except TrainingError as err:
        said.put((rank, str(err)))
    finally:
        tdist.destroy_process_group()


def _two_ranks_say(worker, store: str, *args, timeout: float = 60) -> dict[int, str]:
    """Run `worker(rank, store, *args, said)` in two spawned processes (a gloo group through `store`); what each
    rank put in `said`, by rank. A rank still running after `timeout` fails the test: it hung."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    said = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, store, *args, said)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung"
    return dict(said.get(timeout=5) for _ in procs)


def test_ranks_whose_evaluate_returns_other_metric_names_all_stop_with_the_names(tmp_path):
    """Each rank all-reduced a vector of its own length: every rank blocked without a word (gloo: 30 minutes)."""
    messages = _two_ranks_say(_mean_metrics_worker, str(tmp_path / "store"))
    assert "rank 0: ['accuracy']; another rank returned others" in messages[0]
    assert "rank 1: ['accuracy', 'f1']" in messages[1]


def test_a_batch_the_ranks_cannot_share_evenly_is_said_and_a_ranks_lone_last_batch_dropped():
    """64 over 3 ranks trained at a global 63 without a word; a rank whose last batch held one sample crashed a
    BatchNorm model under torchrun only (the lone-batch rule was off whenever the run was distributed)."""
    from jointcompress.api import as_loader
    from jointcompress.distributed import DistContext

    x, y = torch.randn(1346, 4), torch.randint(0, 2, (1346,))
    with pytest.warns(UserWarning, match=r"training.batch_size 64 is not a multiple of the 3 processes: each takes 21"):
        as_loader((x, y), 64, seed=0, dist=DistContext(rank=0, world_size=3, backend="gloo"))
    loader = as_loader((x, y), 64, seed=0, dist=DistContext(rank=1, world_size=2, backend="gloo"), batch_norm=True)
    assert min(len(b[0]) for b in loader) > 1  # 673 rows a rank in batches of 32: the last one of 1 dropped


def _other_data_worker(rank: int, store: str, rows: int, said) -> None:
    import torch.distributed as tdist

    from jointcompress import DataError, compress

    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        g = torch.Generator().manual_seed(rank if rows == 64 else 0)  # other contents, or (rank 1) other length
        x = torch.randn(rows if rank else 64, 8, generator=g)
        compress(torch.nn.Sequential(torch.nn.Linear(8, 2)), {"training": {"epochs": 1, "batch_size": 16}},
                 (x, torch.randint(0, 2, (len(x),), generator=g)), lambda m: 0.5)
        said.put((rank, "trained"))
    except DataError as err:
        said.put((rank, str(err)))
    finally:
        tdist.destroy_process_group()


@pytest.mark.parametrize("rows", [64, 48], ids=["other_contents", "other_length"])
def test_ranks_given_different_data_all_stop_and_say_so(tmp_path, rows):
    """The run shards one data set over the ranks: with other contents each rank trained silently on its own
    (and the run could never be resumed); with another length the ranks blocked without a word."""
    messages = _two_ranks_say(_other_data_worker, str(tmp_path / "store"), rows, timeout=90)
    assert all("train_data: the ranks hold different data" in m for m in messages.values()), messages
    assert ("the same shapes with other values" in messages[1]) == (rows == 64), messages  # shapes alike, said how


def _mismatch_worker(rank: int, store: str, own_loop: bool, differs: str, said) -> None:
    """A run whose ranks differ in `differs`: "recipe" (rank 1's sparsity and epochs) or "teacher" (one made on each
    rank without a fixed seed)."""
    import torch.distributed as tdist

    import jointcompress
    from jointcompress import RecipeError, compress

    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        other = rank if differs == "recipe" else 0
        recipe = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5 + 0.2 * other},
                                 *([{"type": "distill_kd", "temperature": 2.0, "alpha": 0.5}] if differs == "teacher" else [])],
                  "training": {"epochs": 1 + other, "batch_size": 16}}
        torch.manual_seed(0)
        model, x = torch.nn.Sequential(torch.nn.Linear(8, 2)), torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(rank)
        teacher = torch.nn.Sequential(torch.nn.Linear(8, 2)) if differs == "teacher" else None
        if own_loop:
            jointcompress.prepare(model, recipe, total_steps=4, teacher=teacher)
        else:
            compress(model, recipe, (x, (x[:, 0] > 0).long()), lambda m: 0.5, teacher=teacher)
        said.put((rank, "trained"))
    except RecipeError as err:
        said.put((rank, str(err)))
    finally:
        tdist.destroy_process_group()


@pytest.mark.parametrize("own_loop", [False, True], ids=["compress", "prepare"])
def test_ranks_given_different_recipes_all_stop_and_name_the_fields(tmp_path, own_loop):
    """A rank given other epochs took other steps and every rank blocked without a word; one given another
    sparsity trained on, rank 0 saved its artifact and the other died in gloo's "Connection closed by peer"."""
    messages = _two_ranks_say(_mismatch_worker, str(tmp_path / "store"), own_loop, "recipe", timeout=90)
    for m in messages.values():
        assert "the ranks run different recipes: rank 1 differs from rank 0 in" in m, messages
        assert "recipe.techniques[0].sparsity: 0.5 on rank 0, 0.7 now" in m and "recipe.training.epochs" in m, messages


@pytest.mark.parametrize("own_loop", [False, True], ids=["compress", "prepare"])
def test_ranks_given_different_teachers_all_stop_and_say_so(tmp_path, own_loop):
    """A teacher made on each rank without a fixed seed differed, and the averaged gradient pulled the student toward
    a mix of them, without a word: the data and the recipe were checked, the teacher not."""
    messages = _two_ranks_say(_mismatch_worker, str(tmp_path / "store"), own_loop, "teacher", timeout=90)
    for m in messages.values():
        assert "teacher: the ranks hold different teachers (rank 1's weights differ from rank 0's)" in m, messages


def _other_loader_worker(rank: int, store: str, said) -> None:
    import torch.distributed as tdist
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    from jointcompress import DataError, compress

    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        rows = 64 if rank == 0 else 32  # each rank's own DistributedSampler over a data set of another length
        data = TensorDataset(torch.randn(rows, 8), torch.randint(0, 2, (rows,)))
        loader = DataLoader(data, batch_size=8, sampler=DistributedSampler(data, num_replicas=2, rank=rank))
        compress(torch.nn.Sequential(torch.nn.Linear(8, 2)), {"training": {"epochs": 1}}, loader, lambda m: 0.5)
        said.put((rank, "trained"))
    except DataError as err:
        said.put((rank, str(err)))
    finally:
        tdist.destroy_process_group()


def test_ranks_whose_loaders_give_other_batch_counts_all_stop_and_say_so(tmp_path):
    """A DataLoader is not fingerprinted as an (x, y) pair is: ranks with 4 and 2 batches an epoch ended in gloo's
    abort ("Received data size doesn't match expected size") once one rank stopped calling the collectives."""
    messages = _two_ranks_say(_other_loader_worker, str(tmp_path / "store"), timeout=90)
    assert "different numbers of batches an epoch (rank 0: 4)" in messages[0], messages
    assert "(rank 0: 4; rank 1: 2)" in messages[1], messages


@pytest.mark.slow
def test_a_folder_another_run_holds_is_refused_once_on_every_rank_under_torchrun(tmp_path):
    """Rank 0 refused the locked folder and the other rank, waiting for it at a barrier, ended in the process
    group's traceback; the refusal is now every rank's, printed by rank 0 alone (and the data's warnings too)."""
    from jointcompress.io import hold_run_lock, release_run_lock

    import numpy as np

    from jointcompress.data import _digits_arrays

    out = tmp_path / "o"
    out.mkdir()
    x, y = _digits_arrays()
    y_test = y[1000:].copy()
    y_test[0] = 11  # a label no training image has: a warning the data's loading says (once, not once a rank)
    np.savez(tmp_path / "d.npz", x_train=x[:1000], y_train=y[:1000], x_test=x[1000:], y_test=y_test)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: lenet300\ndata: {tmp_path / 'd.npz'}\ntechniques: [{{type: quant_lsq, bits: 8}}]\n"
                      "training: {epochs: 1}\n")
    hold_run_lock(out)  # another run's
    try:
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                            "jointcompress.cli", "compress", str(recipe), "--out", str(out), "--resume"],
                           env={**_clean_env(), "COLUMNS": "300"}, capture_output=True, text=True, timeout=300)
    finally:
        release_run_lock(out)
    said = r.stdout + r.stderr
    assert r.returncode != 0 and said.count("is in use by another jointcompress run") == 1, said[-3000:]
    assert said.count("holds labels no training image has") == 1, said[-3000:]
    workers = said.split("failed (exitcode")[0]  # then torchrun's launcher prints its own traceback of the children
    assert "Traceback" not in workers and "barrier" not in workers, said[-3000:]


def test_the_teacher_the_command_trains_takes_a_batch_the_processes_share(monkeypatch):
    """Under torchrun with 3 processes the teacher's batch of 64 (the command's own) warned the user to change a
    training.batch_size the recipe did not set (as_loader warns for a batch that is not a multiple)."""
    import jointcompress.pipeline as pipeline
    from jointcompress.data import load_digits

    import jointcompress.distributed as dist
    from jointcompress.distributed import DistContext

    seen = {}
    monkeypatch.setattr(dist, "current", lambda: DistContext(rank=0, world_size=3, backend="gloo"))
    monkeypatch.setattr(pipeline, "train_baseline", lambda model, data, evaluate, **kw: seen.update(kw))
    pipeline.train_teacher("lenet300", load_digits(), epochs=1)
    assert seen["batch_size"] == 63


def test_a_second_ctrl_c_during_the_groups_teardown_at_exit_ends_it_quietly(monkeypatch):
    """The exit hook tears the group down; a Ctrl-C pressed again while it ran printed the interrupt's traceback
    from the atexit hook, after the run's own message."""
    import torch.distributed as tdist

    from jointcompress import distributed

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(tdist, "is_initialized", lambda: True)
    monkeypatch.setattr(tdist, "destroy_process_group", interrupted)
    distributed._destroy_if_initialized()  # no KeyboardInterrupt out of the hook


def test_an_error_every_rank_raises_is_printed_by_rank_0_alone(tmp_path, monkeypatch):
    """Under torchrun every rank refused the same recipe, --out or interrupt and printed it, one copy per process:
    another rank stays quiet where rank 0 holds the same words, prints its own otherwise, and outside torchrun
    (or on rank 0) every message prints."""
    import tempfile

    from jointcompress import distributed

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(distributed, "ERROR_WAIT_SECONDS", 0.2)
    assert not distributed.said_by_rank_0("sparsity: 1.7")  # no torchrun
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-a")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert not distributed.said_by_rank_0("sparsity: 1.7")  # rank 0 has said nothing (yet): printed
    monkeypatch.setenv("RANK", "0")
    assert not distributed.said_by_rank_0("sparsity: 1.7")  # rank 0 prints, and leaves its words
    monkeypatch.setenv("RANK", "1")
    assert distributed.said_by_rank_0("sparsity: 1.7")
    assert not distributed.said_by_rank_0("train_data: rank 1 holds other data")  # this rank's own: printed
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-b")  # another launch does not read run-a's words
    assert not distributed.said_by_rank_0("sparsity: 1.7")
    # each launch left its file in the temporary folder for good: rank 0 removes those over an hour old
    (earlier,) = tmp_path.glob("jointcompress-error-*.txt")
    os.utime(earlier, (0, 0))
    monkeypatch.setenv("RANK", "0")
    distributed.said_by_rank_0("sparsity: 1.7")
    assert not earlier.exists() and len(list(tmp_path.glob("jointcompress-error-*.txt"))) == 1
