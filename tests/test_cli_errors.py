"""Command-line mistakes end in a usage error before any model loads (issue 30, items 2 and 12-14): exit status 2, one
line on stderr naming the flag, no traceback; the library entry points behind them raise ``ValueError`` naming the
argument; and what the commands accept, they do right (the demo's private halting map, diagnose's images)."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dash_vlm import diagnose
from dash_vlm.bench import BenchConfig
from dash_vlm.cli import main as cli_main
from dash_vlm.models import MAX_FRAMES_LIMIT, model_types_with
from dash_vlm.models.presets import PRESETS
from dash_vlm.shapes.evaluate import model_folder
from dash_vlm.vlm import DashVLM

QWEN, LLAVA = str(model_folder("qwen2-vl")), str(model_folder("llava"))


class Reached(Exception):
    """Raised by a stub where the command would start its work: every check before it passed."""


@pytest.fixture
def no_model(monkeypatch):
    """Loading a checkpoint or building the bench's model fails the test: a usage error must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(DashVLM, "from_pretrained", refuse)
    monkeypatch.setattr("dash_vlm.bench.run_bench", refuse)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def usage_error(argv: list[str], capsys) -> str:
    """The error line of a command that must end in a usage error (exit status 2, no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("usage: ")
    line = err.strip().splitlines()[-1]
    assert re.match(r"dash-vlm( \w+)?: error: ", line)
    return line


@pytest.fixture
def image_file(tmp_path) -> Path:
    path = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


# Item 2: the demo's halting map.


def test_demo_writes_its_map_in_a_fresh_private_folder_and_follows_no_planted_link(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the shared temporary folder, for this test
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    planted = tmp_path / "dash-vlm-halting-map.png"  # the fixed name of earlier releases
    planted.symlink_to(victim)
    cli_main(["demo", "--ratio", "0.5"])
    written = Path(
        capsys.readouterr().out.split("halting map of the first question (halted tokens shaded): ")[1].strip()
    )
    assert victim.read_text() == "keep me" and planted.is_symlink() and planted.resolve() == victim
    folder = written.parent
    assert folder.parent == tmp_path and folder.name.startswith("dash-vlm-") and folder.stat().st_mode & 0o777 == 0o700
    with Image.open(written) as picture:
        assert picture.size == (256, 256)


def test_demo_checks_a_given_halting_map_before_loading(tmp_path, no_model, capsys):
    assert "--halting-map" in usage_error(["demo", "--halting-map", str(tmp_path / "missing" / "map.png")], capsys)
    assert "--halting-map" in usage_error(["demo", "--halting-map", str(tmp_path / "map")], capsys)


# Item 12: dash-vlm diagnose.


def diagnose_argv(tmp_path: Path, *flags: str) -> list[str]:
    return ["diagnose", "--model", QWEN, *flags, "--output", str(tmp_path / "out.json")]


@pytest.fixture
def folder(tmp_path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)).save(images / f"{i}.png")
    return images


@pytest.mark.parametrize(
    "flags, flag",
    [
        (["--limit", "-1"], "--limit"),
        (["--limit", "0"], "--limit"),
        (["--batch-size", "0"], "--batch-size"),
        (["--batch-size", "-1"], "--batch-size"),
        (["--device", "meta"], "--device"),
    ],
)
def test_diagnose_numbers_and_device_are_usage_errors(tmp_path, folder, no_model, capsys, flags, flag):
    line = usage_error(diagnose_argv(tmp_path, "--images", str(folder), *flags), capsys)
    assert flag in line and ("whole number >= 1" in line or "cpu, cuda, cuda:N, auto" in line)


def test_diagnose_paths_are_checked_before_loading(tmp_path, folder, no_model, capsys):
    argv = ["diagnose", "--model", QWEN, "--images", str(folder), "--output"]
    assert "--output" in usage_error([*argv, str(tmp_path / "missing" / "out.json")], capsys)
    assert "--output" in usage_error([*argv, str(tmp_path)], capsys)  # a folder
    plot = ["--plot", str(tmp_path / "missing" / "plot.png")]
    assert "--plot" in usage_error([*argv, str(tmp_path / "out.json"), *plot], capsys)
    assert "--images" in usage_error(diagnose_argv(tmp_path, "--images", str(tmp_path / "missing")), capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no image files" in usage_error(diagnose_argv(tmp_path, "--images", str(empty)), capsys)


def test_diagnose_reads_images_as_generate_does(tmp_path):
    """16-bit pixels are scaled (not clipped to white) and EXIF orientation is applied."""
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((4, 6), 32768, dtype=np.uint16)).save(images / "a-grey16.png")
    pixels = np.zeros((4, 8, 3), dtype=np.uint8)
    pixels[:, :4], pixels[:, 4:] = (255, 0, 0), (0, 0, 255)  # red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: shown turned 90 degrees clockwise
    Image.fromarray(pixels).save(images / "b-turned.png", exif=exif)
    grey, turned = diagnose.load_images(images)
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (127, 127, 127)  # 32768 / 257
    assert turned.size == (4, 8)  # width 4, height 8: turned
    assert turned.getpixel((0, 0)) == (255, 0, 0) and turned.getpixel((0, 7)) == (0, 0, 255)  # red on top


def test_diagnose_limit_takes_the_first_images(tmp_path, folder, monkeypatch):
    assert [image.getpixel((0, 0))[0] for image in diagnose.load_images(folder, 2)] == [0, 40]
    assert len(diagnose.load_images(folder, 10)) == 3
    seen = {}

    def measure(vlm, images, prompts, batch_size, samples):
        seen.update(images=images, prompts=prompts, batch_size=batch_size)
        raise Reached

    monkeypatch.setattr(DashVLM, "from_pretrained", lambda *args, **kwargs: None)
    monkeypatch.setattr(diagnose, "diagnose", measure)
    with pytest.raises(Reached):
        cli_main(diagnose_argv(tmp_path, "--images", str(folder), "--limit", "2", "--batch-size", "1"))
    assert [image.getpixel((0, 0))[0] for image in seen["images"]] == [0, 40]
    assert seen["prompts"] == [diagnose.DEFAULT_PROMPT] * 2 and seen["batch_size"] == 1


def test_diagnose_library_names_bad_arguments(folder):
    for limit in (0, -1, 1.5):
        with pytest.raises(ValueError, match="limit must be an int >= 1"):
            diagnose.load_images(folder, limit)
    with pytest.raises(ValueError, match="folder .* does not exist or is not a folder"):
        diagnose.load_images(folder / "missing")
    image = Image.new("RGB", (16, 16))
    for batch_size in (0, -1):  # before the model is touched: no model is given
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            diagnose.diagnose(None, [image], ["what"], batch_size)
    with pytest.raises(ValueError, match="images must hold one image or more"):
        diagnose.diagnose(None, [], [], 1)


# Item 13: dash-vlm generate.


def generate_argv(*flags: str, model: str = QWEN) -> list[str]:
    return ["generate", "--model", model, "--prompt", "what colour", *flags]


def test_generate_halting_map_is_checked_before_loading(tmp_path, image_file, no_model, capsys):
    image = ["--image", str(image_file)]
    for target, message in (
        (tmp_path / "missing" / "map.png", "does not exist"),
        (tmp_path / "map", "needs the suffix of an image format"),
        (tmp_path, "is a folder"),
    ):
        line = usage_error(generate_argv(*image, "--halting-map", str(target)), capsys)
        assert "--halting-map" in line and message in line


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--image", "missing.png"], "--image missing.png: no such file"),
        (["--image", "https://example.com/cat.png"], "add --allow-urls"),
        (["--video", "missing.mp4"], "--video missing.mp4: no such file"),
        (["--max-new-tokens", "0"], "argument --max-new-tokens: must be a whole number >= 1"),
        (["--ratio", "0.5", "--compression-ratio", "0.6"], "--ratio and --compression-ratio are one flag"),
        (["--compression-ratio", "0.6", "--ratio", "0.5"], "--compression-ratio and --ratio are one flag"),
        (["--device", "meta"], "--device must be one of cpu, cuda, cuda:N, auto; got 'meta'"),
        (["--device", "gpu"], "--device must be one of"),
    ],
)
def test_generate_flags_are_checked_before_loading(no_model, capsys, flags, message):
    assert message in usage_error(generate_argv(*flags), capsys)


def test_generate_video_needs_a_video_model_before_loading(tmp_path, monkeypatch, no_model, capsys):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"only its existence is checked before loading")
    line = usage_error(generate_argv("--video", str(clip), model=LLAVA), capsys)
    assert (
        f"--video needs a model that takes video ({', '.join(model_types_with('video'))})" in line and "'llava'" in line
    )

    def loaded(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(DashVLM, "from_pretrained", loaded)
    with pytest.raises(Reached):  # a Qwen2-VL checkpoint takes it
        cli_main(generate_argv("--video", str(clip)))


def test_halting_flags_that_cannot_apply_to_the_model_are_usage_errors(tmp_path, image_file, no_model, capsys):
    image = ["--image", str(image_file)]
    line = usage_error(generate_argv(*image, "--vision-compression-ratio", "0.5", model=LLAVA), capsys)
    assert "vision_compression_ratio > 0 needs a model whose vision tower can halt" in line and "'llava'" in line
    line = usage_error(generate_argv(*image, "--start-ratio", "0.95"), capsys)
    assert "start_ratio=0.95 puts the decision layer at the last of 8 decoder layers" in line
    assert "below 0.875" in usage_error(["demo", "--start-ratio", "0.95"], capsys)
    line = usage_error(diagnose_argv(tmp_path, "--images", str(tmp_path), "--start-ratio", "0.9"), capsys)
    assert "start_ratio=0.9 puts the decision layer" in line
    line = usage_error(generate_argv(*image, model=str(tmp_path / "nothing")), capsys)
    assert "--model: cannot read the config of" in line


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_a_gpu_device_without_a_gpu_is_a_usage_error(no_model, no_gpu, capsys, device):
    line = usage_error(generate_argv("--device", device), capsys)
    assert f"--device {device!r} asks for GPU" in line and "torch sees 0 GPU(s); use cpu" in line


@pytest.mark.parametrize("device", ["cpu", "auto", "cuda", "cuda:0"])
def test_accepted_devices_reach_the_loader(monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    seen = {}

    def loaded(*args, **kwargs):
        seen.update(kwargs)
        raise Reached

    monkeypatch.setattr(DashVLM, "from_pretrained", loaded)
    with pytest.raises(Reached):
        cli_main(generate_argv("--device", device))
    assert seen["device_map"] == device


def test_a_missing_gpu_index_is_a_usage_error(monkeypatch, no_model, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "--device 'cuda:1' asks for GPU 1, but torch sees 1 GPU(s)" in usage_error(
        generate_argv("--device", "cuda:1"), capsys
    )


# Item 14: dash-vlm bench.


def bench_argv(*flags: str, output: str = "unused.json") -> list[str]:
    return ["bench", "--preset", "tiny", "--image-size", "32", *flags, "--output", output]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--paths", "static"], "'static' measures vanilla only; add 'eager' or 'graphs'"),
        (["--warmup", "-3"], "argument --warmup: must be a whole number >= 0, got '-3'"),
        (["--repeats", "0"], "argument --repeats: must be a whole number >= 1"),
        (["--batch-size", "0"], "argument --batch-size: must be a whole number >= 1"),
        (["--new-tokens", "1"], "argument --new-tokens: must be a whole number >= 2"),
        (["--methods", "fastv", "--vision-compression-ratios", "0.5"], "methods: 'fastv' cannot halt in the vision"),
        (["--methods", "fastv", "--fastv-layer", "50"], "fastv_layer must be in 1..4 for a 5-layer decoder, got 50"),
        (["--ratios", "0.5", "--compression-ratios", "0.6"], "--ratios and --compression-ratios are one flag"),
        (["--device", "meta"], "--device must be one of cpu, cuda, cuda:N; got 'meta'"),
        (["--device", "auto"], "--device must be one of cpu, cuda, cuda:N; got 'auto'"),  # --device-map auto splits
    ],
)
def test_bench_flags_are_checked_before_the_model_is_built(no_model, capsys, flags, message):
    assert message in usage_error(bench_argv(*flags), capsys)


def test_bench_cuda_without_a_gpu_is_a_usage_error(no_model, no_gpu, capsys):
    assert "--device 'cuda' asks for GPU 0, but torch sees 0 GPU(s)" in usage_error(
        bench_argv("--device", "cuda"), capsys
    )


def test_bench_accepts_what_it_can_measure(monkeypatch):
    seen = []
    monkeypatch.setattr("dash_vlm.bench.main", lambda config, output, plot: seen.append(config))
    cli_main(bench_argv("--paths", "eager,static", "--ratios", "0.5", "--warmup", "0"))
    cli_main(bench_argv("--methods", "fastv", "--fastv-layer", "4", "--ratios", "0.5"))
    cli_main(bench_argv("--methods", "dash,fastv", "--ratios", "0.5", "--vision-compression-ratios", "0,0.5"))
    assert seen[0].runs() == [("eager", None), ("eager", (0.5, 0.0, "dash")), ("static", None)]
    assert seen[1].variants() == [(0.5, 0.0, "fastv")]
    assert seen[2].variants() == [(0.5, 0.0, "dash"), (0.5, 0.5, "dash"), (0.5, 0.0, "fastv")]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(paths=["static"]), "'static' measures vanilla only"),
        (dict(warmup=-3), "warmup must be an int >= 0, got -3"),
        (dict(repeats=0), "repeats must be an int >= 1"),
        (dict(batch_size=0), "batch_size must be an int >= 1"),
        (dict(new_tokens=1), "new_tokens must be an int >= 2"),
        (dict(methods=["fastv"], vision_ratios=[0.5]), "methods: 'fastv' cannot halt in the vision tower"),
        (dict(methods=["dash", "fastv"], vision_ratios=[0.3, 0.5]), "methods: 'fastv' cannot halt"),
        (dict(methods=["dash", "random"], ratios=[0.0]), "methods: 'random' has nothing to measure"),
        (dict(methods=["dash", "norm"], ratios=[0.0]), "method must be one of"),
        (dict(methods=["fastv"], halting={"fastv_layer": 5}), "fastv_layer must be in 1..4 for a 5-layer decoder"),
        (dict(preset="qwen2-vl-7b", methods=["fastv"], halting={"fastv_layer": 28}), "1..27 for a 28-layer"),
        (dict(device="meta"), "device must be one of cpu, cuda, cuda:N; got 'meta'"),
        (dict(device="cuda:x"), "device must be one of"),
    ],
)
def test_bad_bench_config_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match) if "(" in match else match):
        BenchConfig(**(dict(preset="tiny", image_sizes=[32], ratios=[0.5]) | kwargs))


def test_bench_config_refuses_a_gpu_that_is_not_there(no_gpu):
    with pytest.raises(ValueError, match=re.escape("device 'cuda' asks for GPU 0, but torch sees 0 GPU(s)")):
        BenchConfig(preset="tiny", image_sizes=[32], ratios=[0.5], device="cuda")


# Every command-line mistake is a usage error: the checks before loading.


@pytest.fixture
def text_only(tmp_path) -> str:
    """A checkpoint folder of a supported text-only model (only its config: what the checks read)."""
    from transformers import LlamaConfig

    LlamaConfig(num_hidden_layers=4).save_pretrained(tmp_path / "llama")
    return str(tmp_path / "llama")


def missing_kernels(attn: str) -> None:
    """Skip the test where the kernels of ``attn`` are installed: the check has nothing to refuse."""
    from dash_vlm.attention import load_implementation

    try:
        load_implementation(attn)
    except ImportError:
        return
    pytest.skip(f"{attn} kernels are installed here")


@pytest.mark.parametrize("prompt", ["", "   ", "\n"])
def test_an_empty_prompt_is_a_usage_error(tmp_path, folder, no_model, capsys, prompt):
    assert "--prompt is empty" in usage_error(["generate", "--model", QWEN, "--prompt", prompt], capsys)
    assert "--prompt is empty" in usage_error(
        diagnose_argv(tmp_path, "--images", str(folder), "--prompt", prompt), capsys
    )


def test_a_text_only_model_or_a_file_is_refused_before_loading(tmp_path, folder, text_only, no_model, capsys):
    diagnose_text_only = ["diagnose", "--model", text_only, "--images", str(folder), "--output", str(tmp_path / "o")]
    for argv in (generate_argv(model=text_only), diagnose_text_only):
        line = usage_error(argv, capsys)
        assert f"--model {text_only} is 'llama', a text-only model" in line and "qwen2_vl" in line
    config = str(Path(QWEN) / "config.json")
    assert f"--model {config} is a file; give the checkpoint folder" in usage_error(generate_argv(model=config), capsys)
    argv = ["diagnose", "--model", config, "--images", str(folder), "--output", str(tmp_path / "out.json")]
    line = usage_error(argv, capsys)
    assert "is a file; give the checkpoint folder" in line


@pytest.mark.parametrize("attn", ["flash_attention_2", "flash_attention_4"])
def test_attention_kernels_that_are_not_installed_are_usage_errors(no_model, capsys, attn):
    missing_kernels(attn)
    line = usage_error(generate_argv("--attn", attn), capsys)
    assert line.split(": error: ")[1].startswith(f"--attn: attn_implementation={attn!r} needs")
    assert f"--attn: attn_implementation={attn!r} needs" in usage_error(bench_argv("--attn", attn), capsys)


def test_cuda_graphs_without_a_gpu_is_a_usage_error(no_model, no_gpu, capsys):
    line = usage_error(generate_argv("--cuda-graphs"), capsys)
    assert "--cuda-graphs: cuda_graphs=True needs a CUDA GPU; this machine has none" in line


def test_cuda_graphs_on_the_cpu_is_a_usage_error(monkeypatch, no_model, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "--cuda-graphs needs the model on one GPU" in usage_error(
        generate_argv("--cuda-graphs", "--device", "cpu"), capsys
    )


# Every command-line mistake is a usage error: what shows only while the command runs.


@pytest.fixture
def bad_inputs(tmp_path, image_file, monkeypatch) -> dict[str, list[str]]:
    """The flags of inputs that only the model's processing can refuse, by what is wrong with them."""
    unreadable = tmp_path / "unreadable.png"
    unreadable.write_bytes(b"not an image")
    clip = tmp_path / "corrupt.mp4"
    clip.write_bytes(b"not a video" * 100)
    wide = tmp_path / "wide.png"
    Image.new("RGB", (500, 2)).save(wide)
    bomb = tmp_path / "bomb.png"
    Image.new("RGB", (64, 64)).save(bomb)
    monkeypatch.setattr(
        Image, "MAX_IMAGE_PIXELS", 1500
    )  # 64 x 64: more than twice the limit, a bomb; 32 x 32 within it
    return {
        "is not an image file PIL can read": ["--image", str(unreadable)],
        "holds the vision placeholder '<|image_pad|>'": ["--image", str(image_file), "--prompt", "<|image_pad|> what"],
        "is not a video file PyAV can decode": ["--video", str(clip)],
        "aspect ratio must be smaller than 200": ["--image", str(wide)],
        "is larger than PIL allows": ["--image", str(bomb)],
    }


@pytest.mark.parametrize(
    "problem",
    [
        "is not an image file PIL can read",
        "holds the vision placeholder '<|image_pad|>'",
        "is not a video file PyAV can decode",
        "aspect ratio must be smaller than 200",
        "is larger than PIL allows",
    ],
)
def test_bad_inputs_found_while_generating_are_usage_errors(bad_inputs, capsys, problem):
    argv = ["generate", "--model", QWEN, "--prompt", "what", "--device", "cpu", "--max-new-tokens", "1"]
    assert problem in usage_error([*argv, *bad_inputs[problem]], capsys)


def test_an_output_that_cannot_be_written_is_a_usage_error(image_file, capsys):
    """/proc takes no new files; as root, ``os.access`` does not see it, so the write itself fails."""
    argv = generate_argv("--image", str(image_file), "--device", "cpu", "--max-new-tokens", "1")
    line = usage_error([*argv, "--halting-map", "/proc/dash-vlm-map.png"], capsys)
    assert "/proc/dash-vlm-map.png" in line and ("cannot write it" in line or "cannot be written" in line)
    run = ["--ratios", "0.5", "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--output", "/proc/x.json"]
    with pytest.raises(SystemExit) as exit_info:  # the bench's progress bar comes first on stderr
        cli_main(["bench", "--preset", "tiny", "--image-size", "32", *run])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and line.startswith("dash-vlm: error: ")
    assert "--output /proc/x.json" in line


def test_diagnose_refuses_a_typed_placeholder(tmp_path, folder, monkeypatch, capsys):
    """``diagnose.decision_scores`` builds the processor inputs itself: the placeholder is refused before it."""

    def measure(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(diagnose, "decision_scores", measure)
    line = usage_error(diagnose_argv(tmp_path, "--images", str(folder), "--prompt", "<|image_pad|>"), capsys)
    assert "holds the vision placeholder '<|image_pad|>'" in line
    vlm = DashVLM.from_pretrained(QWEN, device_map="cpu")
    with pytest.raises(ValueError, match="holds the vision placeholder"):
        diagnose.diagnose(vlm, [Image.new("RGB", (16, 16))], ["what is <|image_pad|>"], 1)


def test_genuine_errors_keep_their_traceback(image_file, monkeypatch):
    """Only the user's input becomes a usage error: another error, or an OSError of a file the user did not name as
    an output, stays as it is."""
    argv = generate_argv("--image", str(image_file), "--halting-map", str(image_file.with_name("map.png")))
    for error in (RuntimeError("a bug"), FileNotFoundError(2, "No such file or directory", "/elsewhere/model.bin")):

        def fail(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr("dash_vlm.cli.run_generate", fail)
        with pytest.raises(type(error)):
            cli_main(argv)


# Outputs: checked before the work, the same rule for every subcommand.


@pytest.mark.parametrize("plot", ["plot.txt", "plot"])
def test_plots_need_an_image_suffix(tmp_path, folder, no_model, capsys, plot):
    target = str(tmp_path / plot)
    line = usage_error(diagnose_argv(tmp_path, "--images", str(folder), "--plot", target), capsys)
    assert f"--plot {target} needs the suffix of an image format" in line
    line = usage_error(bench_argv("--plot", target, output=str(tmp_path / "out.json")), capsys)
    assert f"--plot {target} needs the suffix of an image format" in line


def test_bench_outputs_are_checked_before_the_run(tmp_path, no_model, capsys):
    missing = tmp_path / "missing" / "out.json"
    assert f"the folder {missing.parent} does not exist" in usage_error(bench_argv(output=str(missing)), capsys)
    assert not missing.parent.exists()  # not created
    assert f"--output {tmp_path} is a folder" in usage_error(bench_argv(output=str(tmp_path)), capsys)
    plot = tmp_path / "missing" / "plot.png"
    line = usage_error(bench_argv("--plot", str(plot), output=str(tmp_path / "out.json")), capsys)
    assert f"--plot {plot}: the folder {plot.parent} does not exist" in line


def test_an_output_folder_that_cannot_be_written_is_refused_before_loading(
    tmp_path, folder, image_file, no_model, monkeypatch, capsys
):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != locked and real_access(path, mode, **kw))
    message = f"the folder {locked} cannot be written"
    assert message in usage_error(bench_argv(output=str(locked / "out.json")), capsys)
    argv = ["diagnose", "--model", QWEN, "--images", str(folder), "--output", str(locked / "out.json")]
    assert message in usage_error(argv, capsys)
    assert message in usage_error(
        generate_argv("--image", str(image_file), "--halting-map", str(locked / "m.png")), capsys
    )
    assert message in usage_error(["demo", "--halting-map", str(locked / "map.png")], capsys)


# dash-vlm bench: what the run would refuse, refused before it.


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--start-ratio", "0.95", "--ratios", "0.5"], "start_ratio=0.95 puts the decision layer at the last of 5"),
        (["--start-ratio", "0.8", "--ratios", "0,0.5", "--methods", "random"], "start_ratio=0.8 puts the decision"),
        (["--image-size", "8193"], "argument --image-size: must be a whole number from 28 to 8192, got '8193'"),
        (["--image-size", "27"], "argument --image-size: must be a whole number from 28 to 8192"),
        (["--video-frames", "65538"], "--video-frames must be counts of at most 65536 frames, got '65538'"),
        (["--compression-ratios", "abc"], "--compression-ratios must be comma-separated float values, got 'abc'"),
        (["--ratios", "0.5,x"], "--ratios must be comma-separated float values, got '0.5,x'"),
        (["--vision-compression-ratios", "half"], "--vision-compression-ratios must be comma-separated float values"),
    ],
)
def test_bench_refuses_before_the_model_is_built(no_model, capsys, flags, message):
    assert message in usage_error(bench_argv(*flags), capsys)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(halting={"start_ratio": 0.95}), "start_ratio=0.95 puts the decision layer at the last of 5 decoder"),
        (dict(preset="qwen2-vl-7b", halting={"start_ratio": 0.97}), "at the last of 28 decoder layers"),
        (dict(image_sizes=[8193]), "image_sizes must be whole pixel sides from 28 to 8192"),
        (dict(image_sizes=[32.5]), "image_sizes must be whole pixel sides"),
        (dict(video_frames=[MAX_FRAMES_LIMIT + 2]), f"video_frames must be at most {MAX_FRAMES_LIMIT}"),
    ],
)
def test_bench_config_refuses_what_the_run_would(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BenchConfig(**(dict(preset="tiny", image_sizes=[32], ratios=[0.5]) | kwargs))
    # a decoder ratio of 0 reads no decision layer: a vision-only sweep takes the same start ratio
    BenchConfig(preset="tiny", image_sizes=[32], ratios=[0.0], vision_ratios=[0.4], halting={"start_ratio": 0.95})


def test_bench_graphs_on_a_cpu_is_flagged(monkeypatch, caplog):
    monkeypatch.setattr("dash_vlm.bench.main", lambda config, output, plot: None)
    cli_main(bench_argv("--paths", "eager,graphs", "--device", "cpu"))
    assert "measure no CUDA graph" in caplog.text


# dash-vlm bench --measure: each measurement reads its own flags and refuses before its model is built.


@pytest.fixture
def no_build(monkeypatch):
    """Building the tiny preset's model fails the test (on the meta device, where only its config is read, it
    builds)."""
    tiny = type(PRESETS["tiny"])
    build = tiny.build

    def refuse(self, device, *args, **kwargs):
        if str(device) != "meta":
            raise AssertionError("a model was built")
        return build(self, device, *args, **kwargs)

    monkeypatch.setattr(tiny, "build", refuse)


def measure_argv(measure: str, *flags: str) -> list[str]:
    return ["bench", "--measure", measure, "--preset", "tiny", "--image-size", "32", *flags, "--output", "unused.json"]


@pytest.mark.parametrize(
    "measure, flags, message",
    [
        ("speed", ["--stage", "decode"], "--stage does not apply to --measure speed; it goes with --measure kernels"),
        ("speed", ["--attention-settings", "sdpa"], "it goes with --measure attention or attention-check"),
        (
            "kernels",
            ["--prefill-only"],
            "--prefill-only does not apply to --measure kernels; it goes with --measure vi",
        ),
        ("attention", ["--variants", "dash"], "--variants does not apply to --measure attention"),
        ("attention-check", ["--stage", "prefill"], "--stage does not apply to --measure attention-check"),
        ("syncs", ["--paths", "eager"], "--paths does not apply to --measure syncs; it goes with --measure speed"),
        ("syncs", ["--plot", "p.png"], "--plot does not apply to --measure syncs; it goes with --measure speed or vi"),
        ("syncs", ["--repeats", "3"], "--repeats does not apply to --measure syncs"),
        ("attention", ["--start-ratio", "0.3"], "--start-ratio does not apply to --measure attention; it goes with"),
        ("attention", ["--methods", "fastv"], "--methods does not apply to --measure attention"),
        ("attention", ["--attn", "eager"], "--attn does not apply to --measure attention"),
        ("tower-blocks", ["--ratios", "0.5"], "--ratios does not apply to --measure tower-blocks"),
        ("video-memory", ["--batch-size", "2"], "--batch-size does not apply to --measure video-memory"),
        ("speed", ["--merge", "a.json", "--plot", "p.png"], "--merge goes with --measure video-memory, not --measure"),
    ],
)
def test_a_flag_the_measurement_does_not_read_is_a_usage_error(no_model, no_build, capsys, measure, flags, message):
    assert message in usage_error(measure_argv(measure, *flags), capsys)


@pytest.mark.parametrize(
    "measure, flags, message",
    [
        ("kernels", [], "--measure kernels profiles CUDA kernels: it needs a CUDA GPU (device cuda or cuda:N); this"),
        ("kernels", ["--stage", "decode"], "--measure kernels profiles CUDA kernels: it needs a CUDA GPU"),
        ("tower-blocks", [], "--measure tower-blocks times blocks with CUDA events: it needs a CUDA GPU"),
        ("attention", [], "--measure attention with settings fa4, fa4_vision runs FlashAttention 4: it needs a CUDA"),
        ("attention-check", ["--attention-settings", "sdpa,fa4"], "with settings fa4 runs FlashAttention 4: it needs"),
    ],
)
def test_a_gpu_measurement_without_a_gpu_is_a_usage_error(no_model, no_build, no_gpu, capsys, measure, flags, message):
    line = usage_error(measure_argv(measure, *flags), capsys)
    assert message in line and line.endswith("this machine has none")


def test_a_gpu_measurement_on_the_cpu_of_a_gpu_machine_is_a_usage_error(no_model, no_build, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "")  # the allocator is the user's: nothing sets it for later tests
    line = usage_error(measure_argv("kernels", "--device", "cpu"), capsys)
    assert line.endswith("it needs a CUDA GPU (device cuda or cuda:N); device is 'cpu'")


@pytest.mark.parametrize(
    "measure, flags, message",
    [
        ("syncs", ["--image-size", "48"], "image_sizes (--image-size): --measure syncs measures one image side, got"),
        ("syncs", ["--ratios", "0.5,0.6"], "ratios (--compression-ratios): --measure syncs measures one nonzero value"),
        ("attention", ["--vision-compression-ratios", "0"], "vision_ratios (--vision-compression-ratios): --measure"),
        ("attention", ["--attention-settings", "sdpa,flash"], "must be distinct names among sdpa, varlen_sdpa, fa4,"),
        ("attention", ["--attention-settings", "varlen_sdpa"], "the gains are against sdpa, which ['varlen_sdpa'] la"),
        ("attention-check", ["--attention-settings", "sdpa"], "SDPA is the reference; ['sdpa'] has nothing to check"),
        ("video-memory", [], "video_frames (--video-frames): --measure video-memory needs the frame counts"),
        ("video-memory", ["--video-frames", "4", "--variants", "dash,fastv"], "variants (--variants) must be distin"),
        ("video-memory", ["--video-frames", "4", "--image-size", "48"], "video_frames takes one frame side"),
        ("kernels", ["--stage", "fill"], "argument --stage: invalid choice: 'fill'"),
    ],
)
def test_a_measurement_refuses_what_it_cannot_measure_before_the_model(
    no_model, no_build, capsys, measure, flags, message
):
    assert message in usage_error(measure_argv(measure, *flags), capsys)


def test_a_measurement_refuses_a_preset_it_cannot_run(no_model, capsys):
    argv = ["bench", "--measure", "syncs", "--preset", "llava-1.5-7b", "--image-size", "336", "--output", "unused.json"]
    assert "vision_ratios > 0 need a model whose vision tower can halt" in usage_error(argv, capsys)


def test_measuring_needs_a_preset_an_image_size_and_an_output(no_model, no_build, capsys):
    line = usage_error(["bench", "--measure", "syncs"], capsys)
    assert line.endswith("the following arguments are required: --preset, --image-size, --output")
    assert usage_error(["bench", "--preset", "tiny", "--image-size", "32"], capsys).endswith("required: --output")


def test_each_measurement_takes_its_own_defaults_and_the_flags_it_reads(monkeypatch):
    """A flag left out takes the default of the script the measurement replaced, so that published commands
    reproduce."""
    seen = {}
    monkeypatch.setattr(
        "dash_vlm.bench.measures.main",
        lambda name, config, options, output, plot, command: seen.update({name: (config, options)}),
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # kernels and tower-blocks get past their check
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "")  # the allocator is the user's: nothing sets it for later tests
    cli_main(measure_argv("kernels", "--device", "cuda"))
    cli_main(measure_argv("tower-blocks", "--device", "cuda", "--vision-compression-ratios", "0.3,0.5"))
    cli_main(measure_argv("syncs", "--device", "cpu"))
    settings = ("--attention-settings", "sdpa,varlen_sdpa")
    cli_main(measure_argv("attention", "--device", "cpu", *settings, "--ratios", "0,0.5", "--batch-size", "8"))
    cli_main(measure_argv("attention-check", "--device", "cpu", *settings))
    cli_main(measure_argv("video-memory", "--device", "cpu", "--video-frames", "8,4", "--prefill-only"))
    kernels, options = seen["kernels"]
    assert (kernels.ratios, kernels.repeats, kernels.new_tokens, kernels.batch_size) == ([0.667], 5, 16, 1)
    assert options == {"stage": "prefill"}
    blocks, options = seen["tower-blocks"]
    assert (blocks.vision_ratios, blocks.repeats, options) == ([0.3, 0.5], 10, {})
    syncs, _ = seen["syncs"]
    assert (syncs.ratios, syncs.vision_ratios, syncs.device) == ([0.667], [0.5], "cpu")
    attention, options = seen["attention"]
    assert (attention.ratios, attention.vision_ratios, attention.batch_size) == ([0.0, 0.5], [0.5], 8)
    assert (attention.repeats, attention.warmup, options) == (10, 2, {"settings": ["sdpa", "varlen_sdpa"]})
    assert seen["attention-check"][0].new_tokens == 8
    memory, options = seen["video-memory"]
    assert (memory.video_frames, memory.new_tokens) == ([8, 4], 8)
    assert options == {"prefill_only": True, "variants": ["vanilla", "dash", "dash+vision"], "decoder_layers": None}
