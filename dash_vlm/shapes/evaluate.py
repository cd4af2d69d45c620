"""Accuracy of the bundled dash-shapes checkpoints on the test split, across compression ratios, scopes and methods.

    python -m dash_vlm.shapes.evaluate --output shapes_accuracy.json --plot assets/dash_shapes_accuracy.png
    python -m dash_vlm.shapes.evaluate --compare-methods --output methods.json   # every method, 0.5 / 0.667 / 0.8
    python -m dash_vlm.shapes.evaluate --video --output assets/dash_shapes_video_accuracy.json   # moving shapes

The models are the bundled checkpoints (``MODELS`` whose folder holds one: ``bundled_models``; with ``--video``, those
of a family that takes video), or those ``--models`` names. Every configuration answers every test question through
``DashVLM.generate`` (greedy, batched); an answer is correct when it equals the reference after lower-casing and
stripping. Prints a Markdown table per model.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dash_vlm.models import ModelAdapter, adapter_for
from dash_vlm.press import DeltaPress
from dash_vlm.resources import bundled
from dash_vlm.scorers import SCORERS
from dash_vlm.shapes import video
from dash_vlm.shapes.data import BACKGROUND, KINDS, Sample, read_test_split
from dash_vlm.vlm import DashVLM, GenerationResult

# Every dash-shapes checkpoint by name and folder under assets/models; the evaluation takes those that are there.
MODELS = {"qwen2-vl": "dash-shapes-qwen2-vl", "llava": "dash-shapes-llava", "qwen3-vl": "dash-shapes-qwen3-vl"}
MODELS_FOLDER = bundled("assets") / "models"
RATIOS = (0.0, 0.25, 0.5, 0.667, 0.8, 0.9)
SCOPES = ("vision", "all")
METHODS = ("dash", "random")
VISION_RATIOS = (0.0, 0.3, 0.5)  # halting inside the vision tower, where the family can (scope vision)
VISION_DECODER_RATIOS = (0.0, 0.667)  # the decoder ratios measured with each vision ratio
COMPARISON_RATIOS = (0.5, 0.667, 0.8)  # --compare-methods: every method in SCORERS at these ratios, scope vision
VIDEO_RATIOS = (0.5, 0.667, 0.8)  # --video: the moving-shapes clips, checkpoints of a family that takes video
VIDEO_RESULTS = bundled("assets") / "dash_shapes_video_accuracy.json"
POSITION_AXES = {"above/below": ("above", "below"), "left/right": ("left", "right")}  # position answers by axis


def model_folder(name: str) -> Path:
    """The bundled checkpoint folder of ``name`` (a key of ``MODELS``), whether or not it holds a checkpoint yet."""
    return MODELS_FOLDER / MODELS[name]


def bundled_models() -> list[str]:
    """The names of ``MODELS`` whose folder holds a checkpoint, in ``MODELS`` order."""
    return [name for name in MODELS if (model_folder(name) / "config.json").is_file()]


def model_adapter(name: str) -> ModelAdapter:
    """The family adapter of the bundled checkpoint ``name`` (from its config, without loading weights)."""
    from transformers import AutoConfig

    return adapter_for(AutoConfig.from_pretrained(model_folder(name)))


def is_correct(text: str, answer: str) -> bool:
    return text.strip().lower() == answer.strip().lower()


def generate_all(vlm: DashVLM, samples: list[Sample | video.Clip], batch_size: int) -> list[GenerationResult]:
    """The generation of every sample (image, or clip read from its file), in batches."""
    results = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        visuals = (
            {"video": [str(s.path) if s.path else list(s.frames) for s in chunk]}
            if isinstance(chunk[0], video.Clip)
            else {"image": [s.image for s in chunk]}
        )
        results += vlm.generate(**visuals, prompt=[s.question for s in chunk], max_new_tokens=4)
    return results


def answer_all(vlm: DashVLM, samples: list[Sample | video.Clip], batch_size: int) -> tuple[list[str], float]:
    """The answers to every sample and the mean share of prompt tokens kept."""
    results = generate_all(vlm, samples, batch_size)
    return [result.text for result in results], kept_share(results)


def kept_share(results: list[GenerationResult]) -> float:
    return sum(result.stats.kept / result.stats.tokens for result in results) / len(results)


def halted_by_content(results: list[GenerationResult], clips: list[video.Clip]) -> dict[str, float]:
    """Where the decoder halted in clips: the share of the video tokens showing a shape (in either frame of their
    frame pair) that halted, the same for the background tokens, and the share of frame pairs halted whole."""
    halted = {"shape": [], "background": []}
    whole_pairs = []
    for result, clip in zip(results, clips, strict=True):
        positions = set(result.stats.halted_positions)
        frames = video.frames_array(clip.frames)
        for grid in result.grids:
            rows, cols = grid.positions.shape
            drawn = (frames[2 * grid.item : 2 * grid.item + 2] != BACKGROUND).any(-1).any(0)
            if drawn.shape != grid.pixels.shape[:2] or drawn.shape[0] % rows or drawn.shape[1] % cols:
                raise ValueError(f"clip frames of {drawn.shape} do not tile the model's {rows}x{cols} token grid")
            shape_cells = drawn.reshape(rows, drawn.shape[0] // rows, cols, drawn.shape[1] // cols).any(axis=(1, 3))
            cell_halted = np.isin(grid.positions.numpy(), list(positions))
            halted["shape"] += cell_halted[shape_cells].tolist()
            halted["background"] += cell_halted[~shape_cells].tolist()
            whole_pairs.append(cell_halted.all())
    return {
        "shape_tokens_halted": float(np.mean(halted["shape"])),
        "background_tokens_halted": float(np.mean(halted["background"])),
        "frame_pairs_halted_whole": float(np.mean(whole_pairs)),
    }


def score(texts: list[str], samples: list[Sample | video.Clip]) -> dict:
    """Overall accuracy and accuracy per question kind, position questions also split by axis
    (``POSITION_AXES``)."""
    correct = [is_correct(text, sample.answer) for text, sample in zip(texts, samples, strict=True)]
    groups = {kind: lambda s, kind=kind: s.kind == kind for kind in dict.fromkeys(s.kind for s in samples)}
    groups |= {
        axis: lambda s, answers=answers: s.kind == "position" and s.answer in answers
        for axis, answers in POSITION_AXES.items()
    }
    by_kind = {kind: [c for c, s in zip(correct, samples, strict=True) if member(s)] for kind, member in groups.items()}
    return {
        "accuracy": sum(correct) / len(correct),
        "by_kind": {kind: sum(values) / len(values) for kind, values in by_kind.items() if values},
    }


def configurations(vision_tower_halts: bool) -> list[dict]:
    """The halting parameters of every row of a model: the decoder sweep, then, where the tower can halt, each vision
    ratio alone and with the decoder's."""
    decoder = [dict(compression_ratio=0.0, scope="vision")] + [
        dict(compression_ratio=ratio, scope=scope, method=method)
        for scope in SCOPES
        for method in METHODS
        for ratio in RATIOS
        if ratio > 0
    ]
    vision = [
        dict(compression_ratio=ratio, vision_compression_ratio=vision_ratio, scope="vision", method=method)
        for method in METHODS
        for ratio in VISION_DECODER_RATIOS
        for vision_ratio in VISION_RATIOS
        if vision_ratio > 0
    ]
    per_row = [dict(compression_ratio=ratio, scope="vision", selection="per_row") for ratio in RATIOS if ratio > 0]
    return decoder + per_row + (vision if vision_tower_halts else [])


def method_configurations(vision_tower_halts: bool) -> list[dict]:
    """The rows of ``--compare-methods``: ratio 0, then every method at each of ``COMPARISON_RATIOS`` (scope vision)."""
    return [dict(compression_ratio=0.0, scope="vision")] + [
        dict(compression_ratio=ratio, scope="vision", method=method)
        for method in SCORERS
        for ratio in COMPARISON_RATIOS
    ]


def video_configurations(vision_tower_halts: bool) -> list[dict]:
    """The rows of ``--video``: ratio 0, DASH and random at ``VIDEO_RATIOS`` (scope vision: the video's tokens),
    DASH with ``selection`` "per_row" and "per_frame" at the same ratios, and halting inside the vision tower alone
    and with the decoder's."""
    return (
        [dict(compression_ratio=0.0, scope="vision")]
        + [dict(compression_ratio=ratio, scope="vision", method=method) for method in METHODS for ratio in VIDEO_RATIOS]
        + [
            dict(compression_ratio=ratio, scope="vision", selection=selection)
            for selection in ("per_row", "per_frame")
            for ratio in VIDEO_RATIOS
        ]
        + [
            dict(compression_ratio=ratio, scope="vision", vision_compression_ratio=vision_ratio)
            for vision_ratio in VISION_RATIOS
            for ratio in VISION_DECODER_RATIOS
            if vision_ratio > 0 and vision_tower_halts
        ]
    )


def evaluate(
    models: list[str],
    samples: list[Sample | video.Clip],
    batch_size: int,
    device: str | None,
    plan: Callable[[bool], list[dict]] = configurations,
) -> list[dict]:
    """Every configuration ``plan`` gives a model (from whether its vision tower halts), scored on ``samples``."""
    vlms = {name: DashVLM.from_pretrained(model_folder(name), device_map=device) for name in models}
    plans = {name: plan(adapter_for(vlm.model).halts_in_vision_tower) for name, vlm in vlms.items()}
    rows = []
    with tqdm(total=sum(map(len, plans.values())), desc="dash-shapes accuracy") as progress:
        for name, vlm in vlms.items():
            for parameters in plans[name]:
                vlm.press = press = DeltaPress(**parameters)
                results = generate_all(vlm, samples, batch_size)
                texts = [result.text for result in results]
                row = {"model": name, "ratio": press.compression_ratio, "scope": press.scope, "method": press.method}
                row |= {"selection": press.selection}
                row |= {"vision_ratio": press.vision_compression_ratio, "kept_fraction": kept_share(results)}
                if isinstance(samples[0], video.Clip):  # main() refuses an empty split
                    row |= halted_by_content(results, samples)
                rows.append(row | score(texts, samples))
                progress.update()
    return rows


def video_table(rows: list[dict]) -> str:
    """The moving-shapes accuracy per configuration (Markdown): overall and per question kind."""
    lines = [
        f"| method | decoder ratio | vision ratio | kept | accuracy | {' | '.join(video.KINDS)} | shape tokens halted"
        " | background halted | frame pairs halted whole |",
        "|---|---:|---:|---:|---:|" + "---:|" * (len(video.KINDS) + 3),
    ]
    for row in rows:
        kinds = " | ".join(f"{row['by_kind'][kind]:.1%}" if kind in row["by_kind"] else "-" for kind in video.KINDS)
        where = " | ".join(
            f"{row[key]:.0%}" for key in ("shape_tokens_halted", "background_tokens_halted", "frame_pairs_halted_whole")
        )
        method = row["method"] if is_global(row) else f"{row['method']} {row['selection']}"
        lines.append(
            f"| {method} | {row['ratio']:g} | {row['vision_ratio']:g} | {row['kept_fraction']:.2f} |"
            f" {row['accuracy']:.1%} | {kinds} | {where} |"
        )
    return "\n".join(lines)


def is_global(row: dict) -> bool:
    """Whether a result row used the global selection (rows written before ``selection`` existed did)."""
    return row.get("selection", "global") == "global"


def by_ratio(rows: list[dict], model: str, scope: str, method: str, baseline: dict) -> dict[float, dict]:
    """The rows of one model, scope and method by compression ratio, ``baseline`` at ratio 0."""
    return {0.0: baseline} | {
        r["ratio"]: r
        for r in rows
        if r["model"] == model and r["scope"] == scope and r["method"] == method and r["ratio"] > 0
    }


def accuracy_line(labels: tuple, kind: str, by_column: dict, columns: tuple) -> str:
    """A table line: the labels, then the accuracy of question ``kind`` ("all": overall) in each column."""
    values = [by_column[c]["accuracy"] if kind == "all" else by_column[c]["by_kind"][kind] for c in columns]
    label = "**all**" if kind == "all" else kind
    return "| " + " | ".join(map(str, (*labels, label))) + " | " + " | ".join(f"{v:.1%}" for v in values) + " |"


def markdown_tables(rows: list[dict]) -> str:
    """One table per model: rows are scope / method / question kind, columns are compression ratios; then, for a model
    whose vision tower halts, one table of the vision ratios."""
    vision_rows = [row for row in rows if row["vision_ratio"] > 0]
    per_row_rows = [row for row in rows if not is_global(row)]
    rows = [row for row in rows if row["vision_ratio"] == 0 and is_global(row)]
    lines = []
    for model in dict.fromkeys(row["model"] for row in rows):
        baseline = next(r for r in rows if r["model"] == model and r["ratio"] == 0)
        lines += [f"**{model}** (ratio 0: {baseline['accuracy']:.1%})", ""]
        lines.append("| scope | method | kind | " + " | ".join(f"{r:g}" for r in RATIOS) + " |")
        lines.append("|---|---|---|" + "---|" * len(RATIOS))
        for scope in SCOPES:
            for method in METHODS:
                columns = by_ratio(rows, model, scope, method, baseline)
                lines += [accuracy_line((scope, method), kind, columns, RATIOS) for kind in ("all", *KINDS)]
        kept = {
            r["ratio"]: r["kept_fraction"]
            for r in rows
            if r["model"] == model and r["scope"] == "vision" and r["method"] == "dash"
        }
        lines += ["", "Prompt tokens kept (scope vision): " + ", ".join(f"{r:g}: {k:.0%}" for r, k in kept.items()), ""]
        mine = [row for row in vision_rows if row["model"] == model]
        if mine:
            lines += vision_table(model, rows, mine)
        mine = [row for row in per_row_rows if row["model"] == model]
        if mine:
            lines += per_row_table(model, rows, mine)
    return "\n".join(lines)


def per_row_table(model: str, global_rows: list[dict], per_row_rows: list[dict]) -> list[str]:
    """Rows: selection (DASH global and per row, random) / question kind, position questions split by axis;
    columns: compression ratios (scope vision)."""
    lines = [f'**{model}, `selection="per_row"`** (scope vision; position questions split by axis)', ""]
    lines.append("| selection | method | kind | " + " | ".join(f"{r:g}" for r in RATIOS) + " |")
    lines.append("|---|---|---|" + "---|" * len(RATIOS))
    baseline = next(r for r in global_rows if r["model"] == model and r["ratio"] == 0)
    candidates = [("global", "dash", global_rows), ("per_row", "dash", per_row_rows), ("global", "random", global_rows)]
    for selection, method, rows in candidates:
        columns = by_ratio(rows, model, "vision", method, baseline)
        lines += [
            accuracy_line((selection, method), kind, columns, RATIOS) for kind in ("all", "position", *POSITION_AXES)
        ]
    return [*lines, ""]


def vision_table(model: str, decoder_rows: list[dict], vision_rows: list[dict]) -> list[str]:
    """Rows: method / decoder ratio / question kind; columns: vision ratios (0: the decoder-only rows)."""
    lines = [f"**{model}, halting inside the vision tower** (`vision_start_ratio=0.3`, scope vision)", ""]
    lines.append("| method | decoder ratio | kind | " + " | ".join(f"vision {r:g}" for r in VISION_RATIOS) + " |")
    lines.append("|---|---|---|" + "---|" * len(VISION_RATIOS))
    for method in METHODS:
        for ratio in VISION_DECODER_RATIOS:
            by_vision = {
                row["vision_ratio"]: row
                for row in decoder_rows + vision_rows
                if row["model"] == model
                and row["ratio"] == ratio
                and row["scope"] == "vision"
                and (row["method"] == method or row["ratio"] == row["vision_ratio"] == 0)
            }
            lines += [accuracy_line((method, f"{ratio:g}"), kind, by_vision, VISION_RATIOS) for kind in ("all", *KINDS)]
    return [*lines, ""]


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy against compression ratio: a panel per model and scope; DASH solid, random dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in rows if row["vision_ratio"] == 0 and is_global(row)]
    models = list(dict.fromkeys(row["model"] for row in rows))
    figure, axes = plt.subplots(len(models), len(SCOPES), figsize=(11, 4 * len(models)), squeeze=False)
    colours = dict(zip(("all", *KINDS), ("black", "tab:red", "tab:blue", "tab:green", "tab:purple"), strict=True))
    for i, model in enumerate(models):
        baseline = next(r for r in rows if r["model"] == model and r["ratio"] == 0)
        for j, scope in enumerate(SCOPES):
            axis = axes[i][j]
            for method, style in (("dash", "-"), ("random", "--")):
                selected = [baseline] + [
                    r for r in rows if r["model"] == model and r["scope"] == scope and r["method"] == method
                ]
                selected = [r for r in selected if r["ratio"] == 0 or r["scope"] == scope]
                ratios = [r["ratio"] for r in selected]
                for kind, colour in colours.items():
                    values = [r["accuracy"] if kind == "all" else r["by_kind"][kind] for r in selected]
                    axis.plot(
                        ratios,
                        values,
                        style,
                        color=colour,
                        linewidth=2.5 if kind == "all" else 1,
                        marker="o" if kind == "all" else None,
                        label=f"{method} {kind}",
                    )
            axis.set_title(f"{model}, scope {scope}")
            axis.set_xlabel("compression ratio")
            axis.set_ylabel("test accuracy")
            axis.set_ylim(0, 1.02)
            axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2, loc="lower left")
    figure.suptitle("dash-shapes: DASH (solid) vs random halting (dashed), overall (thick) and per question kind")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def methods_table(rows: list[dict]) -> str:
    """``--compare-methods``: per model, one row per method, one column per ratio (overall accuracy)."""
    lines = []
    for model in dict.fromkeys(row["model"] for row in rows):
        baseline = next(r for r in rows if r["model"] == model and r["ratio"] == 0)
        lines += [f"**{model}** (ratio 0: {baseline['accuracy']:.1%})", ""]
        lines += ["| method | " + " | ".join(f"{r:g}" for r in COMPARISON_RATIOS) + " |"]
        lines += ["|---|" + "---|" * len(COMPARISON_RATIOS)]
        for method in SCORERS:
            by_ratio = {r["ratio"]: r["accuracy"] for r in rows if r["model"] == model and r["method"] == method}
            lines.append(f"| {method} | " + " | ".join(f"{by_ratio[r]:.1%}" for r in COMPARISON_RATIOS) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_methods(rows: list[dict], path: Path, bench: dict | None = None) -> None:
    """``--compare-methods``: accuracy against ratio per method, a panel per bundled model, and, given a bench
    document of the same methods and ratios, the prefill time it measured in a last panel."""
    import matplotlib
    from transformers import AutoConfig

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(row["model"] for row in rows))
    figure, axes = plt.subplots(1, len(models) + (bench is not None), figsize=(5 * (len(models) + 1), 4.2))
    for axis, model in zip(axes, models, strict=False):
        baseline = next(r["accuracy"] for r in rows if r["model"] == model and r["ratio"] == 0)
        for method in SCORERS:
            points = sorted((r["ratio"], r["accuracy"]) for r in rows if r["model"] == model and r["method"] == method)
            axis.plot([0] + [p[0] for p in points], [baseline] + [p[1] for p in points], "-o", label=method)
        layers = AutoConfig.from_pretrained(model_folder(model)).text_config.num_hidden_layers
        axis.set_title(
            f"tiny {layers}-layer {model} (dash-shapes, trained here):\nnot a 7B model's accuracy", fontsize=9
        )
        axis.set_xlabel(f"compression ratio (fastv_layer=2: a quarter of the {layers} layers)", fontsize=8)
        axis.set_ylabel("test accuracy (999 questions)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    if bench is not None:
        axis = axes[-1]
        vanilla = statistics.median(row["vanilla"]["prefill_ms"] for row in bench["rows"])
        for method in SCORERS:
            points = sorted(
                (row["ratio"], row["dash"]["prefill_ms"])
                for row in bench["rows"]
                if row["method"] == method and row["ratio"] > 0
            )
            axis.plot([0] + [p[0] for p in points], [vanilla] + [p[1] for p in points], "-o", label=method)
        size = bench["rows"][0]["image_size"]
        axis.set_title(
            f"{bench['preset']} shapes (random weights), {size} px, batch 1:\nprefill on {bench['device']}", fontsize=9
        )
        axis.set_xlabel("compression ratio")
        axis.set_ylabel("prefill time (ms, median; vision tower included)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models",
        nargs="+",
        choices=list(MODELS),
        default=None,
        help="default: every bundled checkpoint (with --video: of a family that takes video)",
    )
    parser.add_argument("--limit", type=int, default=None, help="first N test samples only")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--device", default=None)
    parser.add_argument("--output", type=Path, required=True, help="results JSON")
    parser.add_argument("--plot", type=Path, default=None, help="accuracy plot (PNG)")
    parser.add_argument(
        "--model-cards", action="store_true", help="rewrite the checkpoints' README.md with these results"
    )
    parser.add_argument(
        "--compare-methods", action="store_true", help=f"every method at ratios {COMPARISON_RATIOS} only"
    )
    parser.add_argument(
        "--bench", type=Path, default=None, help="with --compare-methods --plot: a bench JSON of the same methods"
    )
    parser.add_argument(
        "--rows", type=Path, default=None, help="with --compare-methods: tabulate and plot these results, not new runs"
    )
    parser.add_argument(
        "--video", action="store_true", help="the moving-shapes clips (checkpoints that take video), not the images"
    )
    args = parser.parse_args(argv)
    if args.video and (args.plot or args.model_cards or args.compare_methods):
        parser.error(
            "--video measures the video tables only: no --plot, --model-cards or --compare-methods (the model cards "
            "read its results file)"
        )
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be a positive number of samples, got {args.limit}")
    missing = [name for name in args.models or () if name not in bundled_models()]
    if missing:
        parser.error(
            f"--models {' '.join(missing)}: no checkpoint in {', '.join(str(model_folder(name)) for name in missing)} "
            "(train it with python -m dash_vlm.shapes.train)"
        )
    models = args.models or bundled_models()
    if args.video:
        without = [name for name in models if not model_adapter(name).video]
        if args.models and without:
            parser.error(f"--video: {', '.join(without)} takes no video")
        models = [name for name in models if name not in without]
    if not models:
        parser.error(f"no bundled checkpoint{' takes video' if args.video else ''} in {MODELS_FOLDER}")
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    if args.video:
        clips = video.read_test_split()[: args.limit]
        rows = evaluate(models, clips, args.batch_size, args.device, video_configurations)
        args.output.write_text(json.dumps(rows, indent=1))
        for model in models:
            print(f"**{model}**\n\n{video_table([row for row in rows if row['model'] == model])}\n")
        return
    samples = read_test_split()[: args.limit]
    if args.compare_methods:
        if args.rows is not None:
            rows = json.loads(args.rows.read_text())
        else:
            rows = evaluate(models, samples, args.batch_size, args.device, method_configurations)
        args.output.write_text(json.dumps(rows, indent=1))
        if args.plot:
            bench = json.loads(args.bench.read_text()) if args.bench else None
            plot_methods(rows, args.plot, bench)
        print(methods_table(rows))
        return
    rows = evaluate(models, samples, args.batch_size, args.device)
    args.output.write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, args.plot)
    if args.model_cards:
        for name in models:
            write_model_card(name, rows)
    print(markdown_tables(rows))


def write_model_card(name: str, rows: list[dict]) -> Path:
    """``README.md`` of a bundled checkpoint: architecture, data, training record and measured test accuracy."""
    from transformers import AutoConfig

    folder = model_folder(name)
    config = AutoConfig.from_pretrained(folder)
    text = config.text_config
    vision = config.vision_config
    stages = json.loads((folder / "training.json").read_text())["stages"]
    mine = [r for r in rows if r["model"] == name and r["vision_ratio"] == 0 and is_global(r)]
    baseline = next(r for r in mine if r["ratio"] == 0)
    dash = {r["ratio"]: r["accuracy"] for r in mine if r["scope"] == "vision" and r["method"] == "dash"}
    lines = [
        f"# {MODELS[name]}",
        "",
        f"A tiny `{config.architectures[0]}` trained from scratch on dash-shapes (`dash_vlm/shapes/`), so that DASH's",
        "accuracy can be measured offline. Random initialisation, an offline word-level tokenizer, the real processor",
        "class and the original checkpoint family's chat template; `DashVLM.from_pretrained(folder)` loads it.",
        "",
        "## Architecture",
        "",
        f"- decoder: {text.num_hidden_layers} layers, hidden {text.hidden_size}, {text.num_attention_heads} heads / "
        f"{text.num_key_value_heads} KV heads, head dim {text.head_dim}, FFN {text.intermediate_size}, "
        f"vocabulary {text.vocab_size}",
        f"- vision tower: {json.dumps({k: v for k, v in vision.to_dict().items() if k in VISION_FIELDS})}",
        "- 64x64 images, 64 image tokens per image",
        "",
        "## Data",
        "",
        "Procedurally generated scenes (1 to 3 coloured shapes on a 3x3 grid) and one-word questions of four kinds:",
        "colour, count, exist, position (`dash_vlm/shapes/data.py`). Training draws scenes from its own seed range",
        "and drops every (image, question) pair of the validation and test splits.",
        *(
            [
                "Stages with `--video-share` also train on moving-shapes clips (8 frames, 256 video tokens;",
                "direction, order of appearance, count across frames: `dash_vlm/shapes/video.py`), whose question",
                "words extend the vocabulary after the image task's words.",
            ]
            if any(stage["arguments"].get("video_share") for stage in stages)
            else []
        ),
        "",
        "## Training",
        "",
        "Each stage continues the previous one (`--resume`); the cosine schedule is bounded by steps or minutes:",
        "",
    ]
    for stage in stages:
        arguments = stage["arguments"]
        options = " ".join(
            f"--{key.replace('_', '-')} {value}"
            for key, value in arguments.items()
            if key not in ("family", "output") and value is not None
        )
        last = stage["history"][-1] if stage["history"] else {}
        lines.append(
            f"- `python -m dash_vlm.shapes.train --family {arguments['family']} --output OUT {options}` on "
            f"{stage['device']}: {stage['steps']} steps in {stage['seconds']} s; last validation first-token "
            f"accuracy {last.get('validation_first_token', float('nan')):.3f}"
            + (f", video {last['validation_video_first_token']:.3f}" if "validation_video_first_token" in last else "")
            + f" (step {last.get('step', '-')})"
            + (f" ({stage['note']})" if stage.get("note") else "")
        )
    lines += [
        "",
        f"## Test accuracy ({len(read_test_split())} questions, exact match, greedy)",
        "",
        f"- without halting: **{baseline['accuracy']:.1%}** ("
        + ", ".join(f"{kind} {value:.1%}" for kind, value in baseline["by_kind"].items())
        + ")",
        "- with DASH on image tokens: " + ", ".join(f"ratio {r:g}: {a:.1%}" for r, a in sorted(dash.items())),
        "",
        "Measured by `python -m dash_vlm.shapes.evaluate`; the full table is in the repository's BENCHMARKS.md.",
        "",
        *video_card_lines(name),
    ]
    path = folder / "README.md"
    path.write_text("\n".join(lines))
    return path


def video_card_lines(name: str) -> list[str]:
    """The model card's video section, from the published ``--video`` results, when the model has them."""
    rows = [r for r in json.loads(VIDEO_RESULTS.read_text()) if r["model"] == name] if VIDEO_RESULTS.is_file() else []
    if not rows:
        return []
    baseline = next((r for r in rows if r["ratio"] == 0 and r["vision_ratio"] == 0), None)
    if baseline is None:
        raise ValueError(f"{VIDEO_RESULTS} has no ratio-0 row for {name}: re-run `evaluate --video`")
    dash = {r["ratio"]: r["accuracy"] for r in rows if r["method"] == "dash" and r["vision_ratio"] == 0}
    vision = {(r["ratio"], r["vision_ratio"]): r["accuracy"] for r in rows if r["vision_ratio"] > 0}
    return [
        f"## Video test accuracy ({len(video.test_questions())} moving-shapes questions, exact match, greedy)",
        "",
        f"- without halting: **{baseline['accuracy']:.1%}** ("
        + ", ".join(f"{kind} {value:.1%}" for kind, value in baseline["by_kind"].items())
        + ")",
        "- with DASH on the video's tokens: "
        + ", ".join(f"ratio {r:g}: {a:.1%}" for r, a in sorted(dash.items()) if r),
        "- halting inside the vision tower: "
        + ", ".join(f"vision {v:g} (decoder {r:g}): {a:.1%}" for (r, v), a in sorted(vision.items())),
        "",
        "Measured by `python -m dash_vlm.shapes.evaluate --video`; the clips are `tasks/dash_shapes_video`.",
        "",
    ]


VISION_FIELDS = (
    "depth",
    "embed_dim",
    "num_hidden_layers",
    "hidden_size",
    "patch_size",
    "image_size",
    "num_heads",
    "deepstack_visual_indexes",
)


if __name__ == "__main__":
    main()
