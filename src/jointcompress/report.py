"""`jointcompress report RUN_DIR`: one self-contained HTML page (plots embedded as base64 PNG)
plus a per-layer CSV and JSON, from whatever the run directory holds.

Why self-contained: a report is mailed, attached to a PR or opened from CI artifacts; it
must not depend on files next to it, a web server or JavaScript. Two layouts are read:

- a `jointcompress compress` run: artifact/manifest.json, history.json, summary.json, recipe.yaml
  (and the demo's results.json with its sequential/joint rows);
- a `jointcompress compare` run: compare.json and runs/<name>/{artifact/, history.json}.

Plots: accuracy vs bytes (joint vs sequential vs uncompressed), per-layer sparsity and
bits (from the artifact manifests), each loss term over time and the gradient-conflict
rate over time.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ArtifactError, JointCompressError

LAYER_FIELDS = ["run", "layer", "shape", "numel", "nonzero", "sparsity", "bits", "encoding", "bytes", "dense_fp32_bytes"]
# layers.csv / layers.json, per layer of an artifact: `bytes` is what the weights file stores for the layer (its
# weight's values and indices, its scales and its bias), `dense_fp32_bytes` the same tensors (weight and bias) in
# fp32: 4 x (numel + the bias's shape[0] where the layer has a bias); neither counts the container or other tensors


@dataclass
class Run:
    """One compressed model: its name, manifest and training history (either may be missing)."""

    name: str
    manifest: dict | None = None
    history: dict | None = None


@dataclass
class RunDir:
    kind: str  # "compress" or "compare"
    points: list[dict] = field(default_factory=list)  # {"name", "accuracy", "bytes", "group"}
    runs: list[Run] = field(default_factory=list)
    compare: dict | None = None
    title: str = ""


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as err:
        raise JointCompressError(f"{path}: not valid JSON ({err}); re-run the command that wrote it") from None


def _object(path: Path) -> dict | None:
    """A JSON file of a run that must hold an object (summary.json, results.json): None when absent."""
    data = _json(path)
    if data is not None and not isinstance(data, dict):
        raise JointCompressError(f"{path}: holds a JSON {type(data).__name__}, not the object the run wrote; it was "
                                 "edited or damaged: re-run the command that wrote it")
    return data


def _history(path: Path) -> dict | None:
    """A run's history.json with the shape the plots read: `steps` and `epochs` lists of objects, each
    with a numeric `step`; None when absent."""
    history = _object(path)
    for key in ("steps", "epochs"):
        rows = (history or {}).get(key, [])
        if not isinstance(rows, list) or not all(
                isinstance(r, dict) and isinstance(r.get("step"), (int, float)) for r in rows):
            raise JointCompressError(f"{path}: \"{key}\" is not a list of logged steps; the file was edited or "
                                     "damaged: re-run the command that wrote it")
    return history


def _manifest(path: Path) -> dict | None:
    """The artifact manifest in folder `path`, structure-checked as loading the artifact checks it; None when absent."""
    if not (path / "manifest.json").is_file():
        return None
    from .artifact.store import check_weights_file, read_manifest

    manifest = read_manifest(path)
    check_weights_file(path, manifest)  # a truncated or flipped file was reported at the manifest's bytes
    return manifest


def read_run_dir(path: Path) -> RunDir:
    """Detect the layout and load it; errors say what a run directory must contain."""
    path = Path(path)
    if not path.is_dir():
        raise JointCompressError(f"report: {path} is not a directory; pass the --out of `compress` or `compare`")
    if (path / "compare.json").is_file():
        return _read_compare(path)
    from .checkpoint import CheckpointStore

    resume = (f"it holds checkpoints of an unfinished run: finish it with `jointcompress compress RECIPE --out {path} "
              "--resume`, then report")
    summarized = _summarized(path)
    if (path / "artifact" / "manifest.json").is_file() and not summarized and CheckpointStore(path).paths():
        # stopped after its artifact, before its history and summary: reported as a finished run with no rows
        raise JointCompressError(f"report: {path} has an artifact but no summary.json yet: {resume}")
    if (path / "artifact" / "manifest.json").is_file() or summarized:
        return _read_compress(path)
    if (path / "manifest.json").is_file():  # an artifact folder itself: its run folder holds the history and summary
        raise JointCompressError(f"report: {path} is an artifact folder (manifest.json), not a run folder; "
                                 + _artifact_folder_advice(path))
    unfinished = f"; {resume}" if CheckpointStore(path).paths() else ""
    raise JointCompressError(
        f"report: {path} has neither compare.json (from `jointcompress compare`) nor artifact/manifest.json or "
        f"summary.json (from `jointcompress compress`); pass one of those output directories{unfinished}"
    )


def _summarized(folder: Path) -> bool:
    """A compress run folder's summary is there (summary.json, or an hf: run's results.json)."""
    return (folder / "summary.json").is_file() or (folder / "results.json").is_file()


def _artifact_folder_advice(path: Path) -> str:
    """What to run on an artifact folder: report its run folder where the parent is one (compress's --out); else
    (saved from a loop of your own) bench it, with --model where its manifest names no model to rebuild."""
    parent = path.resolve().parent
    if _summarized(parent):
        return f"report the run that wrote it: `jointcompress report {parent}` (or `jointcompress bench {path}`)"
    try:
        model = ((json.loads((path / "manifest.json").read_text()).get("recipe") or {}).get("model"))
    except (OSError, ValueError, AttributeError):
        model = None
    bench = f"`jointcompress bench {path}`" if model else f"`jointcompress bench {path} --model your_file.py:build`"
    return (f"no run folder holds it ({parent} has no summary.json: it was saved outside `jointcompress compress`, "
            f"e.g. by artifact.save from a loop of your own); measure it with {bench}")


def _is_hf_summary(summary: dict) -> bool:
    """An hf: run's summary (teacher, student, artifact and int8 sections, hf/pipeline.py), not an image run's rows."""
    return isinstance(summary.get("teacher"), dict) and isinstance(summary.get("artifact"), dict)


def _summary_rows(summary: dict) -> dict:
    """name -> {accuracy, bytes}: an image run's summary rows as they are; an hf: run's summary (teacher,
    student, artifact and int8 sections, hf/pipeline.py) as its teacher's weights, the packed artifact
    and the int8 ONNX model."""
    if _is_hf_summary(summary):
        teacher, art, int8 = summary["teacher"], summary["artifact"], summary.get("int8") or {}
        rows = {"teacher": {"accuracy": teacher.get("dev_accuracy"), "bytes": teacher.get("folder_bytes")},
                "artifact": {"accuracy": art.get("dev_accuracy"), "bytes": (art.get("bytes") or {}).get("model")}}
        if int8:
            rows["int8 ONNX"] = {"accuracy": int8.get("dev_accuracy"), "bytes": int8.get("int8_onnx_bytes")}
        return rows
    return {k: v for k, v in summary.items() if isinstance(v, dict)}


def _read_compress(path: Path) -> RunDir:
    rd = RunDir(kind="compress", title=f"compress run {path.name}")
    summary = _object(path / "summary.json")
    rows = _summary_rows(summary) if summary else (_object(path / "results.json") or {}).get("rows") or {}
    if not rows:  # an artifact without its run's summary: the layers alone, said (the models table came out empty)
        warnings.warn(f"report: {path} has no summary.json rows, so the models table and the accuracy plot are empty; "
                      "the per-layer tables come from the artifact", stacklevel=3)
    manifests = {p.parent.name: p for p in sorted(path.glob("*/manifest.json"))}
    history = _history(path / "history.json")
    for name, mpath in manifests.items():
        shown = name if name != "artifact" or name in rows else next((k for k in rows if k != "uncompressed"), name)
        manifest = _manifest(mpath.parent)
        _same_artifact(mpath.parent, manifest, (rows.get(shown) or {}).get("file_bytes"))
        rd.runs.append(Run(shown, manifest, history if name == "artifact" else None))
    # an image run's rows (an hf: run's summary states its own bytes: the weights file and its manifest)
    image_rows = bool(summary) and not _is_hf_summary(summary)
    on_disk = {run.name: (run.manifest or {}).get("weights_file_bytes") for run in rd.runs} if image_rows else {}
    for name, r in rows.items():
        # the weights file's size on disk (container included), as the uncompressed row's fp32 safetensors file; an
        # older summary without file_bytes: the artifact's own record of it, not the parts without their container
        size = r.get("file_bytes") or on_disk.get(name) or r.get("bytes")
        if r.get("accuracy") is None:
            warnings.warn(f"report: the {name!r} row of summary.json records no accuracy; it is left out of the models "
                          "table and the accuracy plot", stacklevel=3)
        elif size:
            rd.points.append({"name": name, "accuracy": r["accuracy"], "bytes": size, "group": name,
                              **({"selected_on": r["selected_on"]} if r.get("selected_on") else {})})
    if not rd.runs and history:
        rd.runs.append(Run("run", None, history))
    return rd


def _same_artifact(folder: Path, manifest: dict, recorded_bytes) -> None:
    """The artifact is the one the run's summary records (its weights file's bytes): another model's artifact
    copied into the folder was reported beside the run's accuracy, its layers as the run's."""
    if isinstance(recorded_bytes, int) and manifest.get("weights_file_bytes") != recorded_bytes:
        raise ArtifactError(f"report: {folder} holds a weights file of {manifest.get('weights_file_bytes'):,} B, and the "
                            f"run's summary.json records {recorded_bytes:,} B: it is not the artifact this run saved. "
                            "Put the run's own artifact back, or report the run that saved this one")


RUN_KEYS = {"variant": str, "ratio_target": (int, float), "seed": int, "accuracy": (int, float), "error": (int, float),
            "ratio": (int, float), "file_bytes": (int, float), "dir": str}  # what the report reads of a compare run


def _check_compare(cmp, file: Path) -> None:
    """A compare.json the report can read: an object whose runs and uncompressed rows have their fields."""
    def bad(what: str):
        return JointCompressError(f"{file}: not a compare result ({what}); re-run `jointcompress compare` into a new "
                                  "--out, or pass the --out of `compress` / `compare`")

    if not isinstance(cmp, dict):
        raise bad(f"a JSON {type(cmp).__name__}, not an object")
    if "runs" not in cmp:  # every compare writes it (empty before its first point): the plot's KeyError
        raise bad('no "runs" list')
    for key in ("runs", "uncompressed", "summary", "variants"):
        if key in cmp and not isinstance(cmp[key], list):
            raise bad(f'"{key}" is not a list (JSON {type(cmp[key]).__name__})')
    for i, r in enumerate(cmp.get("runs", [])):
        if not isinstance(r, dict):
            raise bad(f"runs[{i}] is not an object")
        for key, kind in RUN_KEYS.items():
            if not isinstance(r.get(key), kind) or isinstance(r.get(key), bool):
                raise bad(f'runs[{i}]["{key}"] is missing or not a {getattr(kind, "__name__", "number")}')
    for i, u in enumerate(cmp.get("uncompressed", [])):
        if not (isinstance(u, dict) and all(isinstance(u.get(k), (int, float)) for k in ("seed", "accuracy", "bytes"))):
            raise bad(f"uncompressed[{i}] needs numeric seed, accuracy and bytes")
    for i, s in enumerate(cmp.get("summary", [])):
        if not (isinstance(s, dict) and isinstance(s.get("variant"), str)
                and all(isinstance(s.get(k), (int, float)) for k in ("ratio_mean", "error_mean", "accuracy_min", "accuracy_max"))):
            raise bad(f"summary[{i}] is not a per-point summary")


def _read_compare(path: Path) -> RunDir:
    cmp = _json(path / "compare.json")
    _check_compare(cmp, path / "compare.json")
    cmp.setdefault("variants", sorted({r["variant"] for r in cmp.get("runs", [])}))
    rd = RunDir(kind="compare", compare=cmp, title=f"compare: {cmp.get('model')} on {cmp.get('data')}")
    chosen = {"selected_on": cmp["selected_on"]} if cmp.get("selected_on") else {}  # the words under the table read it
    for u in cmp.get("uncompressed", []):
        rd.points.append({"name": f"uncompressed s{u['seed']}", "accuracy": u["accuracy"], "bytes": u["bytes"],
                          "group": "uncompressed", **chosen})
    missing = []
    for r in cmp.get("runs", []):
        rd.points.append({"name": Path(r["dir"]).name, "accuracy": r["accuracy"], "bytes": r["file_bytes"],
                          "group": r["variant"], **({"selected_on": r["selected_on"]} if r.get("selected_on") else chosen)})
        run_dir = path / r["dir"]
        if not run_dir.is_dir():
            missing.append(r["dir"])
        rd.runs.append(Run(Path(r["dir"]).name, _manifest(run_dir / "artifact"), _history(run_dir / "history.json")))
    if missing:  # its per-layer rows and curves were left out without a word
        import warnings

        warnings.warn(f"report: {len(missing)} of the compare's runs have no folder in {path} ({', '.join(missing[:3])}"
                      f"{' ...' if len(missing) > 3 else ''}): their per-layer rows and training curves are left out; "
                      "their accuracy and bytes are compare.json's", stacklevel=2)
    return rd


# -- tables ---------------------------------------------------------------------------------

def layer_rows(rd: RunDir) -> list[dict]:
    rows = []
    for run in rd.runs:
        for name, rec in ((run.manifest or {}).get("layers") or {}).items():
            parts = rec.get("parts", {})
            rows.append({"run": run.name, "layer": name, "shape": "x".join(map(str, rec["shape"])), "numel": rec["numel"],
                         "nonzero": rec.get("nonzero"), "sparsity": rec.get("sparsity"), "bits": rec.get("bits"),
                         "encoding": rec.get("encoding"), "bytes": sum(p.get("bytes", 0) for p in parts.values()),
                         # the same tensors as `bytes`: the weight, and the bias where the layer stores one
                         "dense_fp32_bytes": 4 * (rec["numel"] + (rec["shape"][0] if "bias" in parts else 0))})
    return rows


# -- plots ----------------------------------------------------------------------------------

def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_bytes(rd: RunDir) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if rd.kind == "compare":
        from .compare import plot_pareto

        plot_pareto(rd.compare, None, ax=ax)
        return _png(fig)
    groups: dict[str, list[dict]] = {}
    for p in rd.points:
        groups.setdefault(p["group"], []).append(p)
    for g, pts in groups.items():
        ax.scatter([p["bytes"] / 1024 for p in pts], [100 * p["accuracy"] for p in pts], s=60, label=g,
                   marker="*" if g == "uncompressed" else "o")
    ax.set_xscale("log")
    ax.set_xlabel("stored bytes (KiB, log)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy vs size")
    ax.grid(True, which="both", alpha=0.3)
    if groups:
        ax.legend(fontsize=8)
    return _png(fig)


def _chosen_runs(rd: RunDir, limit: int = 4) -> list[Run]:
    """Which runs get per-run plots: all of a compress dir; for compare, the first seed at the largest ratio
    (seed 0 unless the comparison began at another: --first-seed)."""
    if rd.kind != "compare" or not rd.compare.get("runs"):
        return rd.runs[:limit]
    top = max(r["ratio_target"] for r in rd.compare["runs"])
    first = min(r["seed"] for r in rd.compare["runs"] if r["ratio_target"] == top)
    names = {Path(r["dir"]).name for r in rd.compare["runs"] if r["ratio_target"] == top and r["seed"] == first}
    return [r for r in rd.runs if r.name in names][:limit]


def plot_layers(rd: RunDir) -> str:
    plt = _plt()
    runs = [r for r in _chosen_runs(rd) if r.manifest]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / max(1, len(runs))
    for i, run in enumerate(runs):
        layers = list(run.manifest["layers"])
        xs = [j + i * width for j in range(len(layers))]
        ax1.bar(xs, [100 * run.manifest["layers"][n]["sparsity"] for n in layers], width, label=run.name)
        ax2.bar(xs, [run.manifest["layers"][n]["bits"] for n in layers], width, label=run.name)
        for ax in (ax1, ax2):
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))], layers, rotation=30, ha="right")
    ax1.set_ylabel("sparsity (%)")
    ax1.set_title("per-layer sparsity (artifact)")
    ax2.set_ylabel("bits")
    ax2.set_title("per-layer bit-width (artifact)")
    if runs:
        ax1.legend(fontsize=7)
    else:
        ax1.text(0.5, 0.5, "no artifact manifest found", ha="center", transform=ax1.transAxes)
    return _png(fig)


def _series(history: dict) -> tuple[dict[str, list], list, list]:
    """term -> [(step, value)] from per-step logs (or per-epoch means), and conflict points."""
    terms: dict[str, list] = {}
    conflict_steps, conflict_epochs = [], []
    stepwise = len(history.get("steps", [])) > 1  # one logged step draws no line: the epochs' means instead
    for s in history.get("steps", []):
        for k, v in (s.get("terms", {}) if stepwise else {}).items():
            terms.setdefault(k, []).append((s["step"], v))
        if s.get("conflict_rate") is not None:
            conflict_steps.append((s["step"], s["conflict_rate"]))
    for e in history.get("epochs", []):
        if not stepwise:
            for k, v in e.get("losses", {}).items():
                terms.setdefault(k, []).append((e["step"], v))
        if e.get("conflict_rate") is not None:
            conflict_epochs.append((e["step"], e["conflict_rate"]))
    return terms, conflict_steps, conflict_epochs


def plot_losses(rd: RunDir) -> str:
    plt = _plt()
    runs = [r for r in _chosen_runs(rd) if r.history]
    n = max(1, len(runs))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.5), squeeze=False)
    for ax, run in zip(axes[0], runs):
        terms, _, _ = _series(run.history)
        for k, pts in sorted(terms.items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, marker="o", markersize=2.5)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_xlabel("step")
        ax.set_ylabel("loss term (symmetric log scale)")
        ax.set_title(f"loss terms: {run.name}", fontsize=9)
        ax.legend(fontsize=7)
    if not runs:
        axes[0][0].text(0.5, 0.5, "no history.json found", ha="center", transform=axes[0][0].transAxes)
    return _png(fig)


def plot_conflicts(rd: RunDir) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    drawn = 0
    for run in _chosen_runs(rd):
        if not run.history:
            continue
        _, steps, epochs = _series(run.history)
        if steps:
            line, = ax.plot([p[0] for p in steps], [p[1] for p in steps], alpha=0.35, lw=0.8)
            drawn += 1
        if epochs:
            ax.plot([p[0] for p in epochs], [p[1] for p in epochs], marker="o", label=f"{run.name} (epoch mean)",
                    color=line.get_color() if steps else None)
            drawn += 1
    ax.set_xlabel("step")
    ax.set_ylabel("share of conflicting gradient pairs")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("gradient-conflict rate over time")
    if drawn:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no conflicts measured (single loss term or no history)", ha="center", transform=ax.transAxes)
    return _png(fig)


# -- the page -------------------------------------------------------------------------------

CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:2em}img{max-width:100%;border:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#f3f3f3}td:first-child,td:nth-child(2){text-align:left}"""


def _table(rows: list[dict], fields: list[str]) -> str:
    head = "".join(f"<th>{html.escape(f)}</th>" for f in fields)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(f)))}</td>" for f in fields) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def breakdown_html(rd: RunDir) -> str:
    """Per run: where the weights file's bytes go (rows: layers, other tensors, container)."""
    from .artifact.size import byte_breakdown, format_breakdown

    out = []
    for run in rd.runs:
        m = run.manifest or {}
        if not {"layers", "other_tensors", "weights_file_bytes"} <= set(m):
            continue
        table = format_breakdown(byte_breakdown(m))
        out.append(f"<h3>{html.escape(run.name)}</h3>" + _table([dict(zip(table[0], r)) for r in table[1:]], table[0]))
    return "".join(out) or "<p>no artifact manifest found</p>"


PAIRED_FIELDS = ["variant", "baseline", "ratio_target", "n", "error_diff_mean", "error_diff_se", "verdict", "files",
                 "collapsed"]
CHANGED_FIELDS = ["variant", "ratio_target", "n", "changed_share_mean", "changed_mean", "note"]
UNREACHABLE_FIELDS = ["variant", "ratio_target", "seed", "target_bytes", "reason"]


def _compare_html(cmp: dict | None) -> str:
    """A compare run's verdict (the paired differences, its headline) and the points it could not run, with
    the reason: the report showed neither (only the runs that ran)."""
    if not cmp:
        return ""
    out = ""
    from .compare import VARIANTS, changed_nothing_note, collapsed_note, unequal_files_note

    if cmp.get("paired"):  # the table's words of files of other sizes, too
        out += ("<h2>Paired differences (error, points; by seed, ± one standard error)</h2>"
                + _table([{**p, "files": unequal_files_note(p), "collapsed": collapsed_note(p)} for p in cmp["paired"]
                          if isinstance(p, dict)],
                         PAIRED_FIELDS))
    coordinated = [{**s, "note": changed_nothing_note(s)} for s in cmp.get("summary") or []
                   if isinstance(s, dict) and VARIANTS.get(s.get("variant"), ("", "none"))[1] != "none"]
    if coordinated:  # how often each coordination strategy changed the update, and one that never did
        out += "<h2>Coordination: share of measured steps whose update it changed</h2>" + _table(coordinated, CHANGED_FIELDS)
    if cmp.get("unreachable"):
        out += ("<h2>Not run (target out of reach)</h2>"
                + _table([u for u in cmp["unreachable"] if isinstance(u, dict)], UNREACHABLE_FIELDS))
    return out


def render_html(rd: RunDir, plots: dict[str, str], layers: list[dict]) -> str:
    imgs = "".join(f'<h2>{html.escape(title)}</h2><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
                   for title, data in plots.items())
    points = _table(sorted(rd.points, key=lambda p: p["bytes"]), ["name", "group", "accuracy", "bytes"])
    on_test = any(p.get("selected_on") == "test" for p in rd.points)  # the kept epoch chosen on the data reported
    recorded = any(p.get("selected_on") for p in rd.points)
    held_out = ("on the test split, which also chose each run's kept epoch (training.validation_images holds "
                "training images out to choose on instead)" if on_test else "on held-out data" if recorded else
                "on the data the run evaluated (its summary does not record which data chose the kept epoch: it may "
                "be the same)")
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(rd.title)}</title>"
            f"<style>{CSS}</style></head><body><h1>jointcompress report: {html.escape(rd.title)}</h1>"
            f"<p>Models: bytes are each weights file's size on disk (the artifact's, container included; the uncompressed "
            f"model's fp32 safetensors file); accuracy is {held_out}. Per layer: <code>bytes</code> is what the weights "
            f"file stores for the layer (values, indices, scales, bias), <code>dense_fp32_bytes</code> the same weight and bias "
            f"in fp32.</p>{imgs}<h2>Models</h2>{points}"
            f"{_compare_html(rd.compare)}"
            f"<h2>Per-layer (from the artifact manifests)</h2>{_table(layers, LAYER_FIELDS)}"
            f"<h2>Where the bytes go (weights file, by layer and part)</h2>{breakdown_html(rd)}</body></html>\n")


def build_report(run_dir: str | Path, out: str | Path | None = None) -> dict[str, Path]:
    """Write report.html, layers.csv and layers.json into `out` (default: the run dir)."""
    from .io import atomic_write_json, atomic_write_text

    rd = read_run_dir(Path(run_dir))
    out = Path(out or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = layer_rows(rd)
    plots = {"accuracy vs bytes": plot_accuracy_bytes(rd), "per-layer sparsity and bits": plot_layers(rd),
             "loss terms over time": plot_losses(rd), "gradient-conflict rate over time": plot_conflicts(rd)}
    paths = {"html": out / "report.html", "csv": out / "layers.csv", "json": out / "layers.json"}
    refuse_foreign_files(paths)
    atomic_write_text(paths["html"], render_html(rd, plots, layers))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LAYER_FIELDS)
    w.writeheader()
    w.writerows(layers)
    atomic_write_text(paths["csv"], buf.getvalue())
    atomic_write_json(paths["json"], {"kind": rd.kind, "title": rd.title, "points": rd.points, "layers": layers})
    return paths


def refuse_foreign_files(paths: dict[str, Path]) -> None:
    """Before anything is written: a report.html, layers.csv or layers.json in the folder that this command did
    not write (the user's own, in a folder given to --out) would be replaced without a word. An earlier report's
    files are replaced, as a re-run should."""
    for kind, path in paths.items():
        if path.is_dir() and not path.is_symlink():
            raise JointCompressError(f"{path}: is a folder, where the report writes a file; give --out another folder "
                                     "(or move it)")
        if (path.exists() or path.is_symlink()) and not _report_wrote(path, kind):  # a dangling link was replaced too
            raise JointCompressError(f"{path}: exists and is not a file `jointcompress report` wrote; the report would "
                                     "replace it. Give --out a folder without it (or move the file)")


def _report_wrote(path: Path, kind: str) -> bool:
    """Whether `path` holds what build_report writes for `kind`: its page's heading, its CSV header, or a JSON
    object with its keys."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):  # a folder, unreadable, not text: not ours
        return False
    if kind == "html":
        return "<h1>jointcompress report:" in text.partition("<body>")[2][:200]  # the body's first words
    if kind == "csv":
        return text.startswith(",".join(LAYER_FIELDS[:2]) + ",")
    try:
        held = json.loads(text)
    except ValueError:
        return False
    return isinstance(held, dict) and {"kind", "title", "points", "layers"} <= held.keys()

