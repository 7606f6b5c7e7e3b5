"""report: a self-contained HTML page whose plots all render in headless Chromium, no console errors."""
import json
import re
import os
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from jointcompress.cli import app

PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || e.type)), true);
const _err = console.error; console.error = (...a) => { window.__errors.push(a.join(' ')); _err(...a); };
window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => ({ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth}));
  const pre = document.createElement('pre'); pre.id = 'probe';
  pre.textContent = JSON.stringify({imgs, errors: window.__errors, external: [...document.querySelectorAll('[src]')]
      .map(e => e.getAttribute('src')).filter(s => !s.startsWith('data:'))});
  document.body.appendChild(pre);
});
</script>"""


@pytest.fixture(scope="session")
def chromium():
    """The Debian chromium binary; installed with apt-get when missing, skipped only if that fails."""
    exe = shutil.which("chromium")
    if exe is None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:  # a fresh machine has no package lists yet: update first
            subprocess.run(["apt-get", "update"], check=True, capture_output=True, timeout=600, env=env)
            subprocess.run(["apt-get", "install", "-y", "chromium"], check=True, capture_output=True, timeout=900, env=env)
        except (OSError, subprocess.SubprocessError) as err:
            pytest.skip(f"chromium is not installed and `apt-get update && apt-get install -y chromium` failed ({err})")
        exe = shutil.which("chromium")
        if exe is None:
            pytest.skip("`apt-get install -y chromium` ran but no chromium binary is on PATH")
    return exe


def _render(chromium, html_path, tmp_path):
    """Load a copy of the page with a probe script and return what the probe saw, plus stderr."""
    page = tmp_path / "probe.html"
    page.write_text(html_path.read_text().replace("<head>", "<head>" + PROBE, 1))
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=3000", "--dump-dom", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"the page did not finish loading in chromium:\n{proc.stderr[-2000:]}"
    import html

    return json.loads(html.unescape(m.group(1))), proc.stderr


def _console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line and ("ERROR" in line or "Uncaught" in line)]


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "run"
    recipe = out.parent / "r.yaml"
    recipe.write_text(
        "model: lenet300\ndata: digits\ntechniques:\n"
        "  - {type: prune_unstructured, sparsity: 0.9, end: 0.6, regularization: 1.0}\n"
        "  - {type: quant_lsq, bits: 4, start: 0.3}\n"
        "training: {epochs: 1, batch_size: 128}\ncoordination: {every: 2, log_every: 2}\n")
    res = CliRunner().invoke(app, ["compare", str(recipe), "--ratios", "15,30", "--seeds", "1", "--teacher-epochs", "1",
                                   "--variants", "joint-scale,sequential", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def compress_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmpr") / "run"
    res = CliRunner().invoke(app, ["compress", _demo_recipe(out.parent), "--teacher-epochs", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def _demo_recipe(where):
    p = where / "demo.yaml"
    p.write_text("model: lenet300\ndata: digits\ntechniques:\n"
                 "  - {type: prune_unstructured, sparsity: 0.8, end: 0.6, regularization: 1.0}\n"
                 "  - {type: quant_lsq, bits: 4, start: 0.3}\n"
                 "training: {epochs: 1, batch_size: 128}\ncoordination: {strategy: pcgrad, every: 2, log_every: 2}\n")
    return str(p)


@pytest.mark.parametrize("which", ["compare_dir", "compress_dir"])
def test_report_renders_in_chromium(which, request, chromium, tmp_path):
    run_dir = request.getfixturevalue(which)
    res = CliRunner().invoke(app, ["report", str(run_dir)])
    assert res.exit_code == 0, res.output
    html_path = run_dir / "report.html"
    layers = json.loads((run_dir / "layers.json").read_text())["layers"]
    assert {row["layer"] for row in layers} == {"fc1", "fc2", "fc3"}
    assert (run_dir / "layers.csv").read_text().startswith("run,layer,")
    seen, stderr = _render(chromium, html_path, tmp_path)
    assert len(seen["imgs"]) == 4 and all(i["ok"] for i in seen["imgs"]), seen
    assert seen["external"] == []  # self-contained: nothing but data: URIs
    assert seen["errors"] == [] and _console_errors(stderr) == [], (seen["errors"], _console_errors(stderr))


def test_report_rejects_a_non_run_dir(tmp_path):
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code != 0
    assert "compare.json" in str(res.exception) or "compare.json" in res.output


def test_report_on_an_unfinished_run_says_to_resume_it(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "ckpt-000000010.pt").write_bytes(b"")
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code != 0 and "unfinished run" in str(res.exception) + res.output
    assert "--resume" in str(res.exception) + res.output
    # stopped after the artifact, before history.json and summary.json: a report with an empty table, exit 0
    (tmp_path / "artifact").mkdir()
    (tmp_path / "artifact" / "manifest.json").write_text("{}")
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    said = str(res.exception) + res.output
    assert res.exit_code != 0 and "has an artifact but no summary.json yet" in said and "--resume" in said


@pytest.mark.parametrize("content, words", [
    ("[]", "a JSON list, not an object"),
    ('{"runs": 5}', '"runs" is not a list'),
    ('{"runs": [{"variant": "sequential", "ratio_target": 10, "seed": 0}]}', 'runs[0]["accuracy"]'),
    ('{"runs": [], "uncompressed": [{"seed": 0}]}', "uncompressed[0]"),
])
def test_a_malformed_compare_json_is_one_error_naming_the_file(tmp_path, content, words):
    from jointcompress.errors import JointCompressError

    (tmp_path / "compare.json").write_text(content)
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code != 0 and isinstance(res.exception, JointCompressError), res.exception
    assert str(tmp_path / "compare.json") in str(res.exception) and words in str(res.exception)


def _saved_artifact(where):
    from artifact_helpers import SmallCNN, example_input, fake_finalize
    from jointcompress.artifact import save

    model, spec = fake_finalize(SmallCNN(), example_input())
    manifest = save(model, spec, where, example_inputs=example_input())
    return model, manifest


def test_layer_bytes_and_dense_fp32_bytes_count_the_same_tensors(tmp_path):
    from jointcompress.report import layer_rows, read_run_dir

    model, manifest = _saved_artifact(tmp_path / "run" / "artifact")
    rows = {r["layer"]: r for r in layer_rows(read_run_dir(tmp_path / "run"))}
    modules = dict(model.named_modules())
    assert set(rows) == set(manifest["layers"])
    for name, row in rows.items():
        m = modules[name]
        assert "bias" in manifest["layers"][name]["parts"] and m.bias is not None
        assert row["dense_fp32_bytes"] == 4 * (m.weight.numel() + m.bias.numel())  # the bias `bytes` includes, too


def test_compress_report_gives_both_models_the_weights_files_size_on_disk(tmp_path):
    from jointcompress.report import read_run_dir

    (tmp_path / "summary.json").write_text(json.dumps({
        "sequential": {"accuracy": 0.85, "bytes": 1544, "file_bytes": 1567},
        "uncompressed": {"accuracy": 0.88, "bytes": 39544}}))
    points = {p["name"]: p["bytes"] for p in read_run_dir(tmp_path).points}
    assert points == {"sequential": 1567, "uncompressed": 39544}  # the container counts, as in the fp32 file


def test_report_on_an_artifact_folder_suggests_its_run_folder(tmp_path):
    """The run folder where the parent is one; an artifact saved from a loop of your own has none, and reporting its
    parent was a second error: bench it instead."""
    _saved_artifact(tmp_path / "run" / "artifact")
    res = CliRunner().invoke(app, ["report", str(tmp_path / "run" / "artifact")])
    assert res.exit_code != 0
    assert "no run folder holds it" in str(res.exception) and "jointcompress bench" in str(res.exception)
    assert f"jointcompress report {(tmp_path / 'run').resolve()}" not in str(res.exception)
    (tmp_path / "run" / "summary.json").write_text("{}")
    res = CliRunner().invoke(app, ["report", str(tmp_path / "run" / "artifact")])
    assert f"jointcompress report {(tmp_path / 'run').resolve()}" in str(res.exception)


def test_a_comparison_that_began_at_another_seed_still_gets_its_per_run_plots(compare_dir, tmp_path):
    """compare --first-seed 1: the plots looked for seed 0 only, and said no manifest or history was found."""
    import shutil

    from jointcompress.report import _chosen_runs, read_run_dir

    moved = tmp_path / "run"
    shutil.copytree(compare_dir, moved)
    data = json.loads((moved / "compare.json").read_text())
    for row in data["runs"]:
        row["seed"] += 1
    (moved / "compare.json").write_text(json.dumps(data))
    chosen = _chosen_runs(read_run_dir(moved))
    assert chosen and all(run.manifest and run.name.endswith("-r30-s0") for run in chosen)


def test_a_compare_run_whose_folder_is_gone_is_said(compare_dir, tmp_path):
    """Its per-layer rows were left out of layers.csv without a word."""
    import shutil

    from jointcompress.report import read_run_dir

    moved = tmp_path / "cmp"
    shutil.copytree(compare_dir, moved)
    gone = json.loads((moved / "compare.json").read_text())["runs"][0]["dir"]
    shutil.rmtree(moved / gone)
    with pytest.warns(UserWarning, match=rf"1 of the compare's runs have no folder in .*\({gone}\): their per-layer"):
        read_run_dir(moved)


def test_a_compare_record_without_its_runs_is_one_error_naming_it(compare_dir, tmp_path):
    """Valid JSON without "runs" ended report in a KeyError traceback from the plot."""
    import shutil

    from jointcompress.errors import JointCompressError

    moved = tmp_path / "cmp"
    shutil.copytree(compare_dir, moved)
    (moved / "compare.json").write_text('{"kind": "compare"}')
    res = CliRunner().invoke(app, ["report", str(moved), "--out", str(tmp_path / "rep")])
    assert isinstance(res.exception, JointCompressError) and 'no "runs" list' in str(res.exception), res.exception


@pytest.mark.parametrize("damage, words", [
    (lambda d: (d / "summary.json").write_text("[1, 2, 3]"), "summary.json: holds a JSON list"),
    (lambda d: (d / "history.json").write_text('{"steps": 5}'), 'history.json: "steps" is not a list'),
    (lambda d: _drop_a_layer_shape(d / "artifact" / "manifest.json"), "shape is missing"),
    (lambda d: _cut(d / "artifact" / "weights.jcw"), "the manifest says"),
    (lambda d: _flip(d / "artifact" / "weights.jcw"), "sha256 does not match the manifest"),
    (lambda d: _record_other_bytes(d / "summary.json"), "it is not the artifact this run saved"),
])
def test_a_damaged_run_file_is_one_error_naming_it(compress_dir, tmp_path, damage, words):
    """Valid JSON of the wrong shape ended in an AttributeError, a TypeError or a KeyError; a truncated or flipped
    weights file, or another model's artifact in the run's folder, was reported at its manifest's word."""
    import shutil

    from jointcompress.errors import JointCompressError

    run = tmp_path / "run"
    shutil.copytree(compress_dir, run)
    damage(run)
    res = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "rep")])
    assert res.exit_code != 0 and isinstance(res.exception, JointCompressError), res.exception
    assert words in str(res.exception)


def _cut(path):
    path.write_bytes(path.read_bytes()[:100])


def _flip(path):
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 1
    path.write_bytes(bytes(blob))


def _record_other_bytes(path):
    summary = json.loads(path.read_text())
    row = next(r for r in summary.values() if isinstance(r, dict) and "file_bytes" in r)
    row["file_bytes"] += 1
    path.write_text(json.dumps(summary))


def _drop_a_layer_shape(path):
    manifest = json.loads(path.read_text())
    next(iter(manifest["layers"].values())).pop("shape")
    path.write_text(json.dumps(manifest))


def test_report_out_that_is_a_file_is_named(compress_dir, tmp_path):
    (tmp_path / "f.txt").write_text("")
    res = CliRunner().invoke(app, ["report", str(compress_dir), "--out", str(tmp_path / "f.txt")])
    assert res.exit_code != 0 and "is a file; give a folder" in str(res.exception)


@pytest.mark.parametrize("name", ["report.html", "layers.csv", "layers.json"])
def test_a_users_file_where_the_report_goes_is_kept(compress_dir, tmp_path, name):
    """--out a folder holding the user's own report.html (or layers.csv / .json) replaced it without a word;
    the report's own files from an earlier run are replaced, as a re-run should."""
    out = tmp_path / "docs"
    out.mkdir()
    mine = out / name
    mine.write_text("my notes\n")
    res = CliRunner().invoke(app, ["report", str(compress_dir), "--out", str(out)])
    assert res.exit_code != 0 and "is not a file `jointcompress report` wrote" in str(res.exception)
    assert mine.read_text() == "my notes\n" and sorted(p.name for p in out.iterdir()) == [name]
    mine.unlink()
    for _ in range(2):  # written, then written again over its own files
        res = CliRunner().invoke(app, ["report", str(compress_dir), "--out", str(out)])
        assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["layers.csv", "layers.json", "report.html"]


def test_a_folder_or_a_link_where_the_report_goes_and_an_out_under_a_file_are_named(compress_dir, tmp_path):
    out = tmp_path / "docs"
    (out / "report.html").mkdir(parents=True)
    res = CliRunner().invoke(app, ["report", str(compress_dir), "--out", str(out)])
    assert res.exit_code != 0 and "report.html: is a folder, where the report writes a file" in str(res.exception)
    (out / "report.html").rmdir()
    (out / "layers.json").symlink_to(tmp_path / "gone.json")  # a dangling link was replaced by a file
    res = CliRunner().invoke(app, ["report", str(compress_dir), "--out", str(out)])
    assert res.exit_code != 0 and "layers.json: exists and is not a file" in str(res.exception)
    assert (out / "layers.json").is_symlink() and not (out / "report.html").exists()
    (tmp_path / "f.txt").write_text("")
    res = CliRunner().invoke(app, ["report", str(compress_dir), "--out", str(tmp_path / "f.txt" / "sub")])
    assert res.exit_code != 0 and "lies under" in str(res.exception) and "which is a file" in str(res.exception)


def test_the_report_says_when_the_kept_epoch_was_chosen_on_the_accuracy_it_shows(compress_dir):
    """It said 'accuracy is on held-out data' for a run whose kept epoch was chosen on that same test split."""
    from jointcompress.report import read_run_dir, render_html

    rd = read_run_dir(compress_dir)
    assert any(p.get("selected_on") == "test" for p in rd.points)
    page = render_html(rd, {}, [])
    assert "on the test split, which also chose each run's kept epoch" in page and "on held-out data" not in page
    for p in rd.points:
        p["selected_on"] = "validation"
    assert "accuracy is on held-out data" in render_html(rd, {}, [])


def test_a_compare_report_shows_the_paired_verdict_and_the_points_not_run(compare_dir):
    """The report showed only the runs that ran: not compare's paired differences, its headline, nor a target it
    recorded as out of reach with the reason."""
    from jointcompress.report import read_run_dir, render_html

    rd = read_run_dir(compare_dir)
    assert rd.compare.get("paired")
    page = render_html(rd, {}, [])
    assert "Paired differences" in page and "error_diff_mean" in page and "Not run" not in page
    rd.compare["unreachable"] = [{"variant": "sequential", "ratio_target": 500.0, "seed": 0, "target_bytes": 360,
                                  "reason": "the smallest artifact the recipe allows is 2.1 KiB"}]
    page = render_html(rd, {}, [])
    assert "Not run (target out of reach)" in page and "the smallest artifact the recipe allows is 2.1 KiB" in page
    # the table's words of files of other sizes, and a strategy that changed nothing (compare.json alone held it)
    rd.compare["paired"][0]["file_bytes_ratio"] = 0.72
    rd.compare["paired"][0]["file_bytes_ratio_range"] = [0.72, 0.72]
    rd.compare["summary"] = [{"variant": "joint-paced-obdland-scale", "ratio_target": 8.0, "n": 3, "changed_share_mean": 0.0,
                              "changed_mean": 0.0, "changed_nothing": True}]
    page = render_html(rd, {}, [])
    assert "its files 0.72x sequential&#x27;s (by seed): not the same size" in page
    assert "changed no update: trained as strategy none" in page


def test_a_compare_report_says_which_images_chose_the_kept_epochs(compare_dir, tmp_path):
    """compare.json records selected_on once, for the whole comparison; the report read it from the points, where
    it was not, and said "on held-out data" of runs whose epochs the test split chose."""
    from jointcompress.report import read_run_dir, render_html

    assert json.loads((compare_dir / "compare.json").read_text())["selected_on"] == "test"
    page = render_html(read_run_dir(compare_dir), {}, [])
    assert "which also chose each run's kept epoch" in page and "on held-out data" not in page


def test_a_summary_without_its_newer_fields_is_reported_as_what_it_records(compress_dir, tmp_path):
    """A summary without file_bytes showed the stored parts without their container as the file's size; one
    without selected_on said "held-out data" where the test split chose the epoch; a row without accuracy went
    missing from the table without a word; a short run's loss plot (one logged step) drew nothing."""
    import shutil

    from jointcompress.report import _series, read_run_dir, render_html

    run = tmp_path / "old"
    shutil.copytree(compress_dir, run)
    summary = json.loads((run / "summary.json").read_text())
    compressed = next(k for k in summary if k != "uncompressed" and isinstance(summary[k], dict))
    manifest = json.loads((run / "artifact" / "manifest.json").read_text())
    for row in summary.values():
        if isinstance(row, dict):
            row.pop("selected_on", None)
    del summary[compressed]["file_bytes"]
    (run / "summary.json").write_text(json.dumps(summary))
    rd = read_run_dir(run)
    assert {p["name"]: p["bytes"] for p in rd.points}[compressed] == manifest["weights_file_bytes"]
    page = render_html(rd, {}, [])
    assert "does not record which data chose the kept epoch" in page and "on held-out data" not in page
    del summary["uncompressed"]["accuracy"]
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.warns(UserWarning, match=r"the 'uncompressed' row of summary.json records no accuracy"):
        assert "uncompressed" not in {p["name"] for p in read_run_dir(run).points}
    history = json.loads((run / "history.json").read_text())
    history["steps"] = history["steps"][:1]  # a short run logs one step: its epochs' means are drawn
    terms, _, _ = _series(history)
    assert terms and all(len(points) == len(history["epochs"]) for points in terms.values())
