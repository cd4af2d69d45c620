"""The bench's results for people: a text table and a plot of prefill time against image size (or frames)."""

from __future__ import annotations

import statistics
from pathlib import Path


def shape_label(row: dict) -> str:
    """The prompt a row measured: its image side, or its video's frame count."""
    return f"{row['video_frames']:>4}f" if "video_frames" in row else f"{row['image_size']:>5}"


def table(document: dict) -> str:
    """The results as text: per row the image side (px) or the video's frames (``32f``), the path, the ratios,
    T -> K, stage times vanilla / DASH (ms) and gains; then what users wait for per path and variant. A row marked
    ``*`` is noisy (its ratio-0 control is off by more than 3%)."""
    lines = [f"{document['preset']} on {document['device']} ({document['dtype']}); times in ms, vanilla / DASH"]
    lines.append(
        "shape path      method       ratio vision      T      K       vision x ideal       decoder x ideal"
        "       prefill x          ttft x        answer x"
    )
    for row in document["rows"]:
        v, d = row["vanilla"], row["dash"]

        def pair(key: str, v: dict = v, d: dict = d) -> str:
            return f"{v[key]:>6.1f}/{d[key]:<6.1f}"

        lines.append(
            f"{shape_label(row)} {row['path']:<8}{'*' if row['noisy'] else ' '} {row['method']:<11}"
            f" {row['ratio']:>5g}"
            f" {row['vision_ratio']:>6g} {row['tokens']:>6} {row['kept']:>6}"
            f" {pair('vision_ms')} {row['vision_speedup']:>4.2f} {row['ideal_vision_speedup']:>5.2f}"
            f" {pair('decoder_ms')} {row['decoder_speedup']:>4.2f} {row['ideal_decoder_speedup']:>5.2f}"
            f" {pair('prefill_ms')} {row['prefill_speedup']:>4.2f} {pair('ttft_ms')} {row['ttft_speedup']:>4.2f}"
            f" {pair('answer_ms')} {row['answer_speedup']:>4.2f}"
            + (
                " | vs unpadded: decoder {decoder_ms:.2f}, ttft {ttft_ms:.2f}".format(**row["vs_unpadded"])
                if "vs_unpadded" in row
                else ""
            )
        )
    header = (
        f"{'shape':>5} path      variant                      ttft  decode   answer  ttft x answer x"
        "   floor: ttft  decode  answer  reached: ttft decode answer"
    )
    lines += [
        "",
        "what users wait for (ms); gains against eager vanilla; the floor and the fraction of it reached",
        header,
    ]
    for entry in document["latency"]:
        variant = "vanilla" if entry["variant"] is None else "{2} {0:g}, vision {1:g}".format(*entry["variant"])
        gains = "".join(
            f" {entry[key]:>7.2f}" for key in ("ttft_speedup_vs_eager", "answer_speedup_vs_eager") if key in entry
        )
        floor, reached = entry["floor"]["floor_ms"], entry["floor"]["fraction"]
        lines.append(
            f"{shape_label(entry)} {entry['path']:<8}{'*' if entry['noisy'] else ' '} {variant:<24}"
            f" {entry['ttft_ms']:>6.1f} {entry['decode_step_ms']:>7.2f} {entry['answer_ms']:>8.1f}{gains}"
            f"   {floor['ttft_ms']:>11.1f} {floor['decode_step_ms']:>7.2f} {floor['answer_ms']:>7.1f}"
            f"  {reached['ttft_ms']:>13.0%} {reached['decode_step_ms']:>6.0%} {reached['answer_ms']:>6.0%}"
        )
    return "\n".join(lines)


def plot(document: dict, path: Path) -> None:
    """Prefill time against image size (or video frames): vanilla, one line per ratio, and the vision tower's
    share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    first_path = document["rows"][0].get("path", "eager")  # prefill times do not depend on the decode path
    rows = [row for row in document["rows"] if row.get("path", "eager") == first_path]
    axis_key = "video_frames" if "video_frames" in rows[0] else "image_size"
    sizes = sorted({row[axis_key] for row in rows})
    vanilla = [statistics.median(r["vanilla"]["prefill_ms"] for r in rows if r[axis_key] == s) for s in sizes]
    vision = [statistics.median(r["vanilla"]["vision_ms"] for r in rows if r[axis_key] == s) for s in sizes]
    axis.plot(sizes, vanilla, "k-o", label="vanilla")
    axis.plot(sizes, vision, "k:", label="vision tower, vanilla")

    def variant_of(row: dict) -> tuple:
        return row["ratio"], row["vision_ratio"], row.get("method", "dash")

    for variant in sorted({variant_of(row) for row in rows}):
        points = sorted((r[axis_key], r["dash"]["prefill_ms"]) for r in rows if variant_of(r) == variant)
        label = f"{variant[2]} {variant[0]:g}" + (f", vision {variant[1]:g}" if variant[1] else "")
        axis.plot([p[0] for p in points], [p[1] for p in points], "--o", label=label)
    axis.set_xlabel(f"video frames ({rows[0]['image_size']} px)" if axis_key == "video_frames" else "image side (px)")
    axis.set_ylabel("prefill time (ms, median)")
    axis.set_title(f"{document['preset']}, {document['device']}, batch {rows[0]['batch_size']}")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
