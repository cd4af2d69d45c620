"""The ``dash-vlm`` command: ``demo``, ``generate``, ``diagnose``, ``bench``, ``check`` and ``tasks``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
import tempfile
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from PIL import Image

from dash_vlm.attention import ATTENTION_CHOICES, load_implementation
from dash_vlm.bench import DEVICE_MAPS, MAX_IMAGE_SIDE, PATHS, check_device, measures
from dash_vlm.bench import preset_config as bench_preset_config
from dash_vlm.bench.kernels import STAGES
from dash_vlm.checks import CHECKS
from dash_vlm.chunking import ALLOCATOR_SETTINGS, EXPANDABLE, prefer_expandable_segments
from dash_vlm.models import MAX_FRAMES_LIMIT, adapter_for, model_types_with
from dash_vlm.models.presets import PRESETS
from dash_vlm.press import DeltaPress, PrefillStats

ALIASES = {"compression_ratio": "--ratio"}  # the short forms of earlier releases
# The halting fields that dash-vlm bench sweeps (--compression-ratios 0,0.5), by the BenchConfig field each sets
SWEPT = {"compression_ratio": "ratios", "vision_compression_ratio": "vision_ratios", "method": "methods"}
# The other flags of dash-vlm bench, by dest (the BenchConfig field or measurement option each sets), and how their
# text reads where it is a list
BENCH_FLAGS = {
    **dict.fromkeys(("preset", "image_sizes", "output", "plot", "batch_size", "new_tokens", "repeats", "warmup")),
    **dict.fromkeys(("attn", "device", "device_map", "stage", "prefill_only", "merge", "decoder_layers")),
    "video_frames": lambda text: frame_counts(text),  # defined below
    **dict.fromkeys(("paths", "settings", "variants"), lambda text: text.split(",")),
}
FLAG_NAMES = {"image_sizes": "--image-size", "settings": "--attention-settings"}  # dests that are not their flag
REQUIRED = {"preset": "--preset", "image_sizes": "--image-size", "output": "--output"}  # by every measurement
DEVICE_MAP_NAMES = ("auto",)  # what --device takes besides cpu, cuda and cuda:N where it is a device map


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line: a message of several lines is joined."""

    def error(self, message: str):
        super().error(" ".join(line.strip() for line in str(message).splitlines() if line.strip()))


class OneSpelling(argparse.Action):
    """Stores a flag's value; the flag under two spellings (``--ratio 0.5 --compression-ratio 0.6``) is a usage
    error: which of the two values should win would be a guess."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        first = vars(namespace).setdefault("_spellings", {}).setdefault(self.dest, option_string)
        if first != option_string:
            parser.error(f"{first} and {option_string} are one flag ({self.dest}): give one of them")
        setattr(namespace, self.dest, values)


def at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: a whole number >= ``minimum`` (and <= ``maximum`` when given; argparse turns anything
    else into a usage error naming the flag)."""

    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            bounds = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise argparse.ArgumentTypeError(f"must be a whole number {bounds}, got {text!r}")
        return value

    return whole_number


@contextmanager
def usage_errors(
    parser: argparse.ArgumentParser,
    flag: str | None = None,
    errors: tuple[type[Exception], ...] = (ValueError,),
    outputs: dict[str, Path | None] | None = None,
) -> Iterator[None]:
    """Turn an exception of ``errors`` (``ValueError``: the checks inside refused the user's input) into a usage
    error, its message after ``flag`` when given; and an ``OSError`` writing one of ``outputs`` (the files the user
    named, by flag) into a usage error naming that flag. Any other error stays as it is: a bug shows its traceback."""
    try:
        yield
    except errors as error:
        parser.error(f"{flag}: {error}" if flag else str(error))
    except OSError as error:
        named = [
            name for name, path in (outputs or {}).items() if path is not None and _same_file(error.filename, path)
        ]
        if not named:
            raise
        parser.error(f"{named[0]} {error.filename}: cannot write it: {error.strerror or error}")


def _same_file(filename: object, path: Path) -> bool:
    """Whether an ``OSError``'s ``filename`` is ``path``."""
    if filename is None:
        return False
    return os.path.abspath(os.fsdecode(filename)) == os.path.abspath(path)


def writable_image_suffixes() -> set[str]:
    """The file suffixes of the image formats PIL can write (".png", ".jpg", ...)."""
    return {suffix for suffix, name in Image.registered_extensions().items() if name in Image.SAVE}


def plot_suffixes(parser: argparse.ArgumentParser) -> set[str]:
    """The suffixes a ``--plot`` may have: image formats that both PIL and matplotlib write; usage error when
    matplotlib, which draws the plots, is not installed."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        parser.error("--plot needs matplotlib: pip install 'dash-vlm[plot]'")
    return {f".{suffix}" for suffix in FigureCanvasBase.get_supported_filetypes()} & writable_image_suffixes()


def check_output(parser: argparse.ArgumentParser, flag: str, path: Path, suffixes: Collection[str] = ()) -> None:
    """Usage error naming ``flag`` unless ``path`` can be written once the work is done: a file name, not a folder,
    in a folder that exists and can be written, with one of ``suffixes`` (they name the file's format) when given."""
    if path.is_dir():
        parser.error(f"{flag} {path} is a folder; give a file name in it")
    if not path.parent.is_dir():
        parser.error(f"{flag} {path}: the folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        parser.error(
            f"{flag} {path}: {'the file' if path.exists() else 'the folder ' + str(path.parent)} cannot be written"
        )
    if suffixes and path.suffix.lower() not in suffixes:
        examples = [suffix for suffix in (".png", ".jpg", ".pdf") if suffix in suffixes]
        parser.error(
            f"{flag} {path} needs the suffix of an image format it can write, such as {' or '.join(examples[:2])}"
        )


def check_prompt(parser: argparse.ArgumentParser, prompt: str) -> None:
    """Usage error for an empty or blank ``--prompt``."""
    if not prompt.strip():
        parser.error(f"--prompt is empty ({prompt!r}); give the text to ask about the image")


def check_attention(parser: argparse.ArgumentParser, attn: str | None) -> None:
    """Usage error naming ``--attn`` when its kernels are not installed here (``load_implementation`` says which)."""
    with usage_errors(parser, "--attn", errors=(ValueError, ImportError)):
        load_implementation(attn)


def check_input_files(parser: argparse.ArgumentParser, flag: str, sources: list[str], allow_urls: bool) -> None:
    """Usage error naming ``flag`` for a source that ``DashVLM.generate`` would refuse after the weights load: a
    missing file, or a URL without ``--allow-urls``."""
    from dash_vlm.vlm import is_url, local_path

    for source in sources:
        if is_url(source):
            if not allow_urls:
                parser.error(f"{flag} {source} is a URL; add --allow-urls to fetch it")
        elif not local_path(source).is_file():
            parser.error(f"{flag} {source}: no such file")


def check_device_flag(parser: argparse.ArgumentParser, device: str | None, maps: Collection[str]) -> None:
    """Usage error unless ``--device`` is unset, cpu, cuda or cuda:N of a GPU torch sees, or one of ``maps``."""
    if device is not None:
        with usage_errors(parser):
            check_device(device, "--device", maps)


def check_model(
    parser: argparse.ArgumentParser, model: str | Path, dash: DeltaPress, video: bool = False
) -> transformers.PretrainedConfig:
    """Usage error naming ``--model`` unless it is a checkpoint folder (or hub id) whose config reads, of a
    vision-language model, the halting flags apply to it and, with ``video``, it takes video; only the config is read,
    no weights, and returned."""
    if Path(model).expanduser().is_file():
        parser.error(f"--model {model} is a file; give the checkpoint folder")
    with usage_errors(parser, "--model"):
        try:
            config = transformers.AutoConfig.from_pretrained(model)
        except OSError as error:
            raise ValueError(f"cannot read the config of {model}: {str(error).splitlines()[0]}") from error
        adapter = adapter_for(config)
    if not adapter.is_vision_language:
        parser.error(
            f"--model {model} is {config.model_type!r}, a text-only model; this command needs a vision-language model "
            f"({', '.join(model_types_with('is_vision_language'))})"
        )
    with usage_errors(parser):
        dash.check_model(config)
    if video and not adapter.video:
        parser.error(
            f"--video needs a model that takes video ({', '.join(model_types_with('video'))}); "
            f"--model {model} is {config.model_type!r}"
        )
    return config


def add_halting_arguments(parser: argparse.ArgumentParser, swept: Collection[str] = ()) -> None:
    """One flag per ``DeltaPress`` field, named after it (``--compression-ratio``, ``--start-ratio``, ``--method``,
    ...); a flag left out keeps the field's default. ``swept`` names fields given as comma-separated lists of values
    (``--compression-ratios``, ``--vision-compression-ratios``), each measured in turn."""
    for parameter in dataclasses.fields(DeltaPress):
        if not parameter.init:
            continue
        flag, alias = "--" + parameter.name.replace("_", "-"), ALIASES.get(parameter.name)
        if parameter.name in swept:
            flag, alias = flag + "s", alias and alias + "s"
            help_text = f"comma-separated values of DeltaPress.{parameter.name}, each measured"
        else:
            help_text = f"DeltaPress.{parameter.name} (default {parameter.default!r})"
        parser.add_argument(
            flag, *filter(None, [alias]), dest=parameter.name, default=None, action=OneSpelling, help=help_text
        )


def halting_options(args: argparse.Namespace) -> dict[str, str]:
    """The halting flags given on the command line, as text, by field name."""
    return {name: getattr(args, name) for name in DeltaPress.parameter_names() if getattr(args, name) is not None}


STATS_HEADER = (
    f"{'run':<14}{'tokens':>8}{'eligible':>10}{'kept':>8}{'layer':>7}{'patches':>9}{'kept':>7}{'prefill ms':>12}"
    f"{'KV MB':>10}"
)


def stats_row(name: str, stats: PrefillStats) -> str:
    """One line of the statistics table under ``STATS_HEADER``; vision patches are "-" where not counted."""
    patches, patches_kept = ("-" if value is None else value for value in (stats.vision_patches, stats.vision_kept))
    return (
        f"{name:<14}{stats.tokens:>8}{stats.eligible:>10}{stats.kept:>8}{stats.decision_layer:>7}{patches:>9}"
        f"{patches_kept:>7}{stats.prefill_ms:>12.1f}{stats.kv_cache_bytes / 2**20:>10.3f}"
    )


def vanilla_of(press: DeltaPress) -> DeltaPress:
    """The same press halting nothing, in the decoder or in the vision tower."""
    return dataclasses.replace(press, compression_ratio=0.0, vision_compression_ratio=0.0)


def run_name(press: DeltaPress) -> str:
    vision = f", vision {press.vision_compression_ratio:g}" if press.vision_compression_ratio else ""
    return f"DASH {press.compression_ratio:g}{vision}"


def save_halting_maps(result, path: Path) -> list[Path]:
    """Write a result's halting maps (``GenerationResult.halting_map``, at least 256 px tall): ``path`` for one image,
    ``<stem>-1<suffix>``, ``<stem>-2<suffix>``, ... for several."""
    pictures = result.halting_map(min_height=256)
    paths = (
        [path]
        if len(pictures) == 1
        else [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(1, 1 + len(pictures))]
    )
    for picture, target in zip(pictures, paths, strict=True):
        try:
            picture.save(target)
        except OSError as error:  # the user named the file: a usage error, not a bug
            raise ValueError(f"halting map {target}: cannot write it: {error.strerror or error}") from error
    return paths


def run_demo(dash: DeltaPress, halting_map: Path | None = None) -> None:
    """Ask the bundled dash-shapes Qwen2-VL checkpoint about the bundled scene, with and without DASH; write the
    halting map of the first question to ``halting_map`` (default: a fresh private folder in the temporary folder)."""
    from dash_vlm.resources import bundled
    from dash_vlm.shapes.evaluate import model_folder
    from dash_vlm.vlm import DashVLM

    demo = json.loads((bundled("assets") / "demo" / "shapes.json").read_text())
    image = bundled("assets") / "demo" / "shapes.png"
    questions = [item["question"] for item in demo["questions"]]
    vlm = DashVLM.from_pretrained(model_folder("qwen2-vl"), device_map="cpu")
    print(f"dash-shapes Qwen2-VL ({vlm.model.config.text_config.num_hidden_layers} decoder layers) on {image.name}")
    vlm.generate(image=image, prompt=questions[0], max_new_tokens=1)  # warm-up, so that both timings are steady
    answers, rows = {}, []
    runs = {"vanilla": vanilla_of(dash), run_name(dash): dash}
    for name, press in runs.items():
        vlm.press = press
        results = vlm.generate(image=[image] * len(questions), prompt=questions, max_new_tokens=4)
        answers[name] = [result.text for result in results]
        rows.append(stats_row(name, results[0].stats))
    width = max(map(len, questions))
    print(f"\n{'question':<{width}}  {'truth':<7}" + "".join(f"{name:<12}" for name in answers))
    for i, item in enumerate(demo["questions"]):
        print(f"{item['question']:<{width}}  {item['answer']:<7}" + "".join(f"{a[i]:<12}" for a in answers.values()))
    print("\n".join(["", "halting statistics of the first question:", STATS_HEADER, *rows]))
    if halting_map is None:  # not a fixed name in the shared temporary folder: another user could plant a link there
        halting_map = Path(tempfile.mkdtemp(prefix="dash-vlm-")) / "halting-map.png"
    print(
        f"\nhalting map of the first question (halted tokens shaded): {save_halting_maps(results[0], halting_map)[0]}"
    )


def run_generate(args: argparse.Namespace, dash: DeltaPress) -> None:
    """Load a checkpoint with ``DashVLM`` and answer one prompt, with and without halting under ``--compare``."""
    from dash_vlm.vlm import DashVLM

    vlm = DashVLM.from_pretrained(
        args.model,
        press=dash,
        dtype=args.dtype,
        device_map=args.device,
        attn_implementation=args.attn,
        allow_urls=args.allow_urls,
        cuda_graphs=args.cuda_graphs,
    )
    runs = {"vanilla": vanilla_of(dash)} if args.compare else {}
    runs[run_name(dash)] = dash
    rows = []
    for name, press in runs.items():
        vlm.press = press
        result = vlm.generate(
            image=args.image or None, video=args.video, prompt=args.prompt, max_new_tokens=args.max_new_tokens
        )
        print(f"{name}: {result.text}")
        rows.append(stats_row(name, result.stats))
    print("\n".join(["", STATS_HEADER, *rows]))
    if args.halting_map is not None:
        print("halting map:", ", ".join(map(str, save_halting_maps(result, args.halting_map))))


def diagnose_inputs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list, list[str], list | None]:
    """The images, prompts and (``--dash-shapes``) samples that ``dash-vlm diagnose`` measures, read before the
    model loads: a folder without images is a usage error."""
    if args.dash_shapes:
        from dash_vlm.shapes.data import split_samples

        samples = split_samples("test")[: args.limit]
        return [s.image for s in samples], [s.question for s in samples], samples
    from dash_vlm import diagnose

    with usage_errors(parser, "--images"):
        images = diagnose.load_images(args.images, args.limit)
    return images, [args.prompt] * len(images), None


def run_diagnose(
    args: argparse.Namespace, dash: DeltaPress, images: list, prompts: list[str], samples: list | None
) -> None:
    """Score against place, the flip test and halted shares per row band (``dash_vlm.diagnose``) on the images and
    prompts of :func:`diagnose_inputs`."""
    from dash_vlm import diagnose
    from dash_vlm.vlm import DashVLM

    vlm = DashVLM.from_pretrained(args.model, press=dash, device_map=args.device)
    document = diagnose.diagnose(vlm, images, prompts, args.batch_size, samples)
    args.output.write_text(json.dumps(document, indent=1))
    print(diagnose.summary(document))
    if args.plot is not None:
        diagnose.plot(document, args.plot)
        print(f"plot: {args.plot}")


def main(argv: list[str] | None = None) -> None:
    parser = Parser(prog="dash-vlm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="the bundled dash-shapes checkpoint answers with and without DASH")
    add_halting_arguments(demo)
    demo.add_argument(
        "--halting-map",
        type=Path,
        default=None,
        help="where to write the halting map (default: a fresh private folder in the temporary folder)",
    )

    generate = commands.add_parser("generate", help="answer a prompt about images with a checkpoint under DASH")
    generate.add_argument("--model", required=True, help="hub id or local folder of a supported VLM")
    generate.add_argument("--image", nargs="+", default=[], help="image files (several: one prompt about all)")
    generate.add_argument("--video", default=None, help="a video file (Qwen2-VL family)")
    generate.add_argument("--prompt", required=True)
    add_halting_arguments(generate)
    generate.add_argument("--max-new-tokens", type=at_least(1), default=64)
    generate.add_argument(
        "--device", default=None, help="device or device map: cpu, cuda, cuda:N, auto (default: GPU if any)"
    )
    generate.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto")
    generate.add_argument("--attn", choices=ATTENTION_CHOICES, default=None)
    generate.add_argument("--allow-urls", action="store_true", help="fetch http(s) images")
    generate.add_argument("--compare", action="store_true", help="also generate without halting and compare")
    generate.add_argument("--halting-map", type=Path, default=None, help="write the halting map here (PNG)")
    generate.add_argument(
        "--cuda-graphs", action="store_true", help="the fast path: decode steps replayed as CUDA graphs (one GPU)"
    )

    diagnose = commands.add_parser(
        "diagnose", help="does the halting score follow content or place? score by row, flip test, halted shares"
    )
    diagnose.add_argument("--model", required=True, help="hub id or local folder of a supported VLM")
    diagnose.add_argument("--images", type=Path, default=None, help="a folder of images")
    diagnose.add_argument("--dash-shapes", action="store_true", help="the dash-shapes test split (shape masks known)")
    diagnose.add_argument("--prompt", default="Describe the image.", help="the prompt with each image (--images)")
    diagnose.add_argument("--limit", type=at_least(1), default=None, help="the first N images only")
    diagnose.add_argument("--batch-size", type=at_least(1), default=50)
    diagnose.add_argument(
        "--device", default=None, help="device or device map: cpu, cuda, cuda:N, auto (default: GPU if any)"
    )
    add_halting_arguments(diagnose)
    diagnose.add_argument("--output", type=Path, required=True, help="results JSON")
    diagnose.add_argument("--plot", type=Path, default=None, help="score and halted share by row band (PNG)")

    bench = commands.add_parser(
        "bench", help="measure vanilla against DASH on real model shapes, random weights (--measure: what)"
    )
    bench.add_argument(
        "--measure",
        choices=measures.MEASURES,
        default="speed",
        help="speed: stage times, TTFT, decode and gains (default); attention: the attention settings timed; "
        "attention-check: the settings against SDPA; kernels: the fast path's GPU kernels; syncs: host "
        "synchronisations; tower-blocks: each vision block's time; video-memory: peak memory against video frames",
    )
    bench.add_argument("--preset", choices=sorted(PRESETS), help="real model shapes, random weights (required)")
    bench.add_argument(
        "--image-size",
        dest="image_sizes",
        metavar="PX",
        type=at_least(28, MAX_IMAGE_SIDE),
        action="append",
        help=f"image side in px, 28 to {MAX_IMAGE_SIDE} (required, repeatable); with --video-frames, the one frame "
        "side",
    )
    bench.add_argument(
        "--video-frames",
        help="comma-separated even frame counts (e.g. 8,16,32): one random video of each, its frames of the single "
        "--image-size side, instead of an image (Qwen presets)",
    )
    add_halting_arguments(bench, swept=SWEPT)
    bench.add_argument("--attn", choices=ATTENTION_CHOICES, help="(default sdpa)")
    bench.add_argument("--batch-size", type=at_least(1), help="(default 1)")
    bench.add_argument(
        "--new-tokens", type=at_least(2), help="(default 32; attention-check, video-memory 8; kernels 16)"
    )
    bench.add_argument("--repeats", type=at_least(1), help="(default 10; kernels: 5 prefills profiled)")
    bench.add_argument("--warmup", type=at_least(0), help="(default 2)")
    bench.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    bench.add_argument(
        "--device-map", choices=[m for m in DEVICE_MAPS if m], help="auto: build on GPU 0, then split over every GPU"
    )
    bench.add_argument(
        "--paths",
        help=f"comma-separated decode paths, each measured: {', '.join(PATHS)} (HF generate; HF generate over its "
        "static cache, vanilla only, so with eager or graphs; DashVLM's CUDA-graph fast path; default eager)",
    )
    bench.add_argument("--output", type=Path, help="results JSON (required)")
    bench.add_argument(
        "--plot", type=Path, help="speed: prefill time against image size or video frames; video-memory: memory (PNG)"
    )
    own = bench.add_argument_group("the options of one measurement")
    own.add_argument("--stage", choices=STAGES, help="kernels: the prefill or one decode step (default prefill)")
    own.add_argument(
        "--attention-settings",
        dest="settings",
        metavar="NAMES",
        help="attention, attention-check: comma-separated settings among sdpa, varlen_sdpa, fa4, fa4_vision "
        "(default all)",
    )
    own.add_argument(
        "--prefill-only", action="store_const", const=True, help="video-memory: one prefill per run, no decoding"
    )
    own.add_argument(
        "--variants",
        help="video-memory: comma-separated among vanilla, control (ratio 0: --prefill-chunk alone), dash, dash+vision "
        "(default vanilla,dash,dash+vision)",
    )
    own.add_argument(
        "--decoder-layers",
        type=at_least(1),
        help="video-memory: a decoder of this many layers (the preset's widths), for a prefill too long to run whole",
    )
    own.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        metavar="FILE",
        help="video-memory: one --plot of these result files; measures nothing",
    )
    check = commands.add_parser(
        "check", help="before trusting it on your model and GPU: a check's verdict table and JSON (exit 1 on FAIL)"
    )
    check.add_argument(
        "name",
        choices=CHECKS,
        help="graphs: the fast path (cuda_graphs=True) against eager generate; bf16: the press against the masked "
        "reference in the model's dtype; split: device_map=auto over every GPU against one GPU; leaks: repeated "
        "generate calls leave nothing behind",
    )
    source = check.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=sorted(PRESETS), help="real model shapes, random weights")
    source.add_argument("--model", help="hub id or local folder of a supported VLM, asked --prompt about --image")
    check.add_argument(
        "--image-size", type=at_least(28, MAX_IMAGE_SIDE), default=None, help="with --preset: image side (default 896)"
    )
    check.add_argument("--layers", type=at_least(1), default=None, help="with --preset: decoder layers (graphs, bf16)")
    check.add_argument(
        "--vision-layers", type=at_least(1), default=None, help="with --preset: vision tower blocks (graphs, bf16)"
    )
    check.add_argument("--image", default=None, help="with --model: an image file")
    check.add_argument("--video", default=None, help="with --model: a video file, instead of --image")
    check.add_argument("--prompt", default="Describe the image.", help="with --model: the question about the file")
    check.add_argument(
        "--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto", help="with --model"
    )
    check.add_argument("--batch-sizes", default=None, help="comma-separated batch sizes, each checked (graphs, bf16)")
    check.add_argument("--steps", type=at_least(2), default=None, help="new tokens per generation (default 16)")
    check.add_argument(
        "--repeats", type=at_least(1), default=None, help="graphs: timed runs per case, after 2 warm-up runs"
    )
    check.add_argument("--calls", type=at_least(1), default=None, help="leaks: generate calls measured (default 200)")
    check.add_argument(
        "--cuda-graphs", action="store_const", const=True, default=None, help="leaks: the fast path's (a GPU)"
    )
    check.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    add_halting_arguments(check)
    check.add_argument("--output", type=Path, required=True, help="results JSON")
    commands.add_parser("tasks", help="print the folder of the dash_* lmms-eval tasks, for --include_path")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
    if prefer_expandable_segments():  # before any command touches CUDA; said here, the log shows warnings only
        print(f"{ALLOCATOR_SETTINGS[0]}={EXPANDABLE} (set by dash-vlm: no allocator setting was given)")
    if args.command == "tasks":
        from dash_vlm.resources import tasks_folder

        print(tasks_folder())
        return
    options = halting_options(args)
    if args.command == "bench":  # the swept flags are lists of values, read by run_bench_command
        options = {name: value for name, value in options.items() if name not in SWEPT}
    with usage_errors(parser):
        dash = DeltaPress.from_options(**options)
    # Every command-line mistake below is a usage error raised before any model loads; what can only show while the
    # command runs (an unreadable image, a placeholder typed in the prompt, an output that cannot be written) ends as
    # a usage error too, without a traceback.
    if args.command == "demo":
        if args.halting_map is not None:
            check_output(parser, "--halting-map", args.halting_map, writable_image_suffixes())
        from dash_vlm.shapes.evaluate import model_folder

        check_model(parser, model_folder("qwen2-vl"), dash)
        with usage_errors(parser, outputs={"--halting-map": args.halting_map}):
            run_demo(dash, args.halting_map)
    elif args.command == "generate":
        check_prompt(parser, args.prompt)
        if args.halting_map is not None:
            if not (args.image or args.video):
                parser.error("--halting-map needs an image (--image) or a video (--video)")
            check_output(parser, "--halting-map", args.halting_map, writable_image_suffixes())
        check_input_files(parser, "--image", args.image, args.allow_urls)
        check_input_files(parser, "--video", [args.video] if args.video else [], args.allow_urls)
        check_device_flag(parser, args.device, DEVICE_MAP_NAMES)
        if args.cuda_graphs:
            if not torch.cuda.is_available():
                parser.error("--cuda-graphs: cuda_graphs=True needs a CUDA GPU; this machine has none")
            if args.device == "cpu":
                parser.error("--cuda-graphs needs the model on one GPU (--device cuda or cuda:N); got --device cpu")
        check_attention(parser, args.attn)
        check_model(parser, args.model, dash, video=args.video is not None)
        with usage_errors(parser, outputs={"--halting-map": args.halting_map}):
            run_generate(args, dash)
    elif args.command == "diagnose":
        if (args.images is None) == (not args.dash_shapes):
            parser.error("diagnose needs exactly one of --images FOLDER and --dash-shapes")
        check_prompt(parser, args.prompt)
        check_output(parser, "--output", args.output)
        if args.plot is not None:
            check_output(parser, "--plot", args.plot, plot_suffixes(parser))
        check_device_flag(parser, args.device, DEVICE_MAP_NAMES)
        check_model(parser, args.model, dash)
        inputs = diagnose_inputs(parser, args)
        with usage_errors(parser, outputs={"--output": args.output, "--plot": args.plot}):
            run_diagnose(args, dash, *inputs)
    elif args.command == "check":
        from dash_vlm import checks

        with usage_errors(parser):
            check_config = checks.CheckConfig(
                check=args.name,
                preset=args.preset,
                model=args.model,
                image_size=args.image_size,
                image=None if args.image is None else Path(args.image),
                video=None if args.video is None else Path(args.video),
                prompt=args.prompt,
                dtype=args.dtype,
                device=args.device,
                batch_sizes=None if args.batch_sizes is None else batch_sizes(args.batch_sizes),
                steps=args.steps,
                repeats=args.repeats,
                layers=args.layers,
                vision_layers=args.vision_layers,
                calls=args.calls,
                cuda_graphs=args.cuda_graphs,
            )
        if args.model is not None:
            check_prompt(parser, args.prompt)
            check_input_files(parser, "--image", [args.image] if args.image else [], allow_urls=False)
            check_input_files(parser, "--video", [args.video] if args.video else [], allow_urls=False)
            config = check_model(parser, args.model, dash, video=args.video is not None)
        else:
            config = bench_preset_config(args.preset)
            if args.layers or args.vision_layers:  # the press is checked against the shortened model it will run on
                with torch.random.fork_rng(devices=[]):
                    shortened = dict(layers=args.layers, vision_layers=args.vision_layers)
                    config = PRESETS[args.preset].build("meta", torch.float32, **shortened).config
            with usage_errors(parser):
                dash.check_model(config)
        check_output(parser, "--output", args.output)
        check_device_flag(parser, args.device, ())
        with usage_errors(parser):
            checks.validate(check_config, dash, config)
        with usage_errors(parser, outputs={"--output": args.output}):
            document = checks.run(check_config, dash)
        args.output.write_text(json.dumps(document, indent=1))
        print(checks.verdict_table(document, checks.columns(args.name)))
        if not document["passed"]:
            raise SystemExit(1)
    elif args.command == "bench":
        command = shlex.join(["dash-vlm", *(sys.argv[1:] if argv is None else argv)])
        run_bench_command(parser, args, {name: getattr(dash, name) for name in options}, command)


def bench_flags(args: argparse.Namespace, halting: Collection[str]) -> dict[str, str]:
    """The flags given to ``dash-vlm bench`` (``--measure`` aside), as spelled, by the field or option each sets;
    ``halting``: the given halting fields that are not swept, together under "halting"."""
    spellings = vars(args).get("_spellings", {})
    given = {
        dest: FLAG_NAMES.get(dest, "--" + dest.replace("_", "-"))
        for dest in BENCH_FLAGS
        if getattr(args, dest) is not None
    }
    given |= {field: spellings[name] for name, field in SWEPT.items() if getattr(args, name) is not None}
    return given | ({"halting": spellings[next(iter(halting))]} if halting else {})


def bench_values(args: argparse.Namespace) -> dict:
    """The given flags of ``dash-vlm bench`` as the values of the fields and options they set; ``ValueError`` naming
    a flag whose text does not read."""
    values = {
        field: swept_values(args, name, getattr(args, name))
        for name, field in SWEPT.items()
        if getattr(args, name) is not None
    }
    for dest, read in BENCH_FLAGS.items():
        if getattr(args, dest) is not None:
            values[dest] = getattr(args, dest) if read is None else read(getattr(args, dest))
    return values


def run_bench_command(parser: argparse.ArgumentParser, args: argparse.Namespace, halting: dict, command: str) -> None:
    """``dash-vlm bench --measure NAME``: the measurement with the flags it reads and the defaults of the rest (a flag
    it does not read is a usage error); every mistake a usage error before any model is built."""
    flags = bench_flags(args, halting)
    if args.merge is not None:
        merge_video_memory(parser, args, flags)
        return
    for field, flag in flags.items():
        if field not in REQUIRED and args.measure not in measures.readers(field):
            others = " or ".join(measures.readers(field))
            parser.error(f"{flag} does not apply to --measure {args.measure}; it goes with --measure {others}")
    missing = [flag for field, flag in REQUIRED.items() if field not in flags]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    check_output(parser, "--output", args.output)
    if args.plot is not None:
        check_output(parser, "--plot", args.plot, plot_suffixes(parser))
    check_device_flag(parser, args.device, ())
    check_attention(parser, args.attn)
    with usage_errors(parser):
        config, options = measures.configure(args.measure, args.preset, args.image_sizes, bench_values(args), halting)
        measures.validate(args.measure, config, options)
    if "graphs" in config.paths and not config.device.startswith("cuda"):
        logging.getLogger(__name__).warning(
            "--paths graphs on %s: its decode steps run uncaptured, so the graphs rows measure no CUDA graph",
            config.device,
        )
    with usage_errors(parser, outputs={"--output": args.output, "--plot": args.plot}):
        measures.main(args.measure, config, options, args.output, args.plot, command)


def merge_video_memory(parser: argparse.ArgumentParser, args: argparse.Namespace, flags: dict[str, str]) -> None:
    """``dash-vlm bench --measure video-memory --merge FILES --plot PLOT``: one plot of the rows of earlier runs (and
    with ``--output``, their merged document); measures nothing, so no other flag applies."""
    from dash_vlm.bench import video_memory

    if args.measure != "video-memory":
        parser.error(f"--merge goes with --measure video-memory, not --measure {args.measure}")
    extra = [flag for field, flag in flags.items() if field not in ("merge", "plot", "output")]
    if extra:
        parser.error(f"--merge measures nothing: {extra[0]} does not apply with it")
    if args.plot is None:
        parser.error("--merge needs --plot, the file to draw the merged runs in")
    check_output(parser, "--plot", args.plot, plot_suffixes(parser))
    if args.output is not None:
        check_output(parser, "--output", args.output)
    documents = []
    for path in args.merge:
        try:
            documents.append(json.loads(path.read_text()))
        except (OSError, ValueError) as error:
            parser.error(f"--merge {path}: cannot read it as JSON: {error}")
    with usage_errors(parser, "--merge"):
        merged = video_memory.merge(documents)
    with usage_errors(parser, outputs={"--output": args.output, "--plot": args.plot}):
        video_memory.plot(merged, args.plot)
        if args.output is not None:
            args.output.write_text(json.dumps(merged, indent=1))


def batch_sizes(text: str) -> list[int]:
    """``--batch-sizes``: comma-separated whole numbers >= 1."""
    try:
        sizes = [int(size) for size in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--batch-sizes must be comma-separated whole numbers >= 1, got {text!r}")
    return sizes


def swept_values(args: argparse.Namespace, name: str, text: str) -> list:
    """A swept flag's comma-separated values (``--compression-ratios 0,0.5``) as the type of the ``DeltaPress`` field;
    ``ValueError`` naming the flag as it was spelled."""
    kind = type(next(parameter.default for parameter in dataclasses.fields(DeltaPress) if parameter.name == name))
    flag = vars(args).get("_spellings", {}).get(name, "--" + name.replace("_", "-") + "s")
    try:
        return [kind(value) for value in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated {kind.__name__} values, got {text!r}") from None


def frame_counts(text: str) -> list[int]:
    """``--video-frames``: comma-separated whole numbers, each at most ``MAX_FRAMES_LIMIT``."""
    try:
        counts = [int(frames) for frames in text.split(",") if frames]
    except ValueError:
        raise ValueError(f"--video-frames must be comma-separated whole numbers, got {text!r}") from None
    if any(frames > MAX_FRAMES_LIMIT for frames in counts):
        raise ValueError(f"--video-frames must be counts of at most {MAX_FRAMES_LIMIT} frames, got {text!r}")
    return counts


if __name__ == "__main__":
    main()
