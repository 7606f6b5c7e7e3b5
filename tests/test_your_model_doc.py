"""The plain-PyTorch loop of docs/your-model.md runs as written, and what it leaves behind is
real: the target sparsity, 4-bit weights, and a checkpoint that resumes into a masked model
giving the finalized model's logits."""
from __future__ import annotations

import re
from pathlib import Path

import torch

import jointcompress

DOC = Path(__file__).resolve().parents[1] / "docs" / "your-model.md"


def _example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    return next(b for b in blocks if "jointcompress.prepare" in b and "optimizer.step()" in b)


def test_the_documented_loop_runs_and_its_checkpoint_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(_example(), str(DOC), "exec"), ns)  # noqa: S102 - our own documentation
    model, x = ns["model"], ns["x"]
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((m.weight == 0).sum()) for m in linears) / sum(m.weight.numel() for m in linears)
    assert abs(zeros - 0.7) < 0.01, zeros
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    for m in linears:
        assert max(len(row.unique()) for row in m.weight) <= 16  # 4-bit grid (zeros included)
    assert ns["session"].step == ns["epochs"] * len(ns["loader"])

    # resume: fresh model + fresh session, the session's state first, then the model's
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    torch.manual_seed(123)
    fresh = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    again = jointcompress.prepare(fresh, ns["recipe"], total_steps=ns["epochs"] * len(ns["loader"]), teacher=ns["teacher"])
    again.load_state_dict(ck["session"])
    fresh.load_state_dict(ck["model"])
    assert again.step == ns["session"].step
    with torch.no_grad():
        masked, final = fresh.eval()(x), model.eval()(x)
    assert torch.allclose(masked, final, atol=1e-5), (masked - final).abs().max()
