"""Train a tiny VLM on dash-shapes from scratch and save it as an ordinary HF folder with a model card.

    python -m dash_vlm.shapes.train --family qwen2_vl --output assets/models/dash-shapes-qwen2-vl
    python -m dash_vlm.shapes.train --family llava --output assets/models/dash-shapes-llava
    python -m dash_vlm.shapes.train --family qwen2_vl --resume assets/models/dash-shapes-qwen2-vl --video-share 0.5 \
        --output OUT   # moving dash-shapes clips too (``dash_vlm.shapes.video``): half the batches are clips
    python -m dash_vlm.shapes.train --family qwen3_vl --output assets/models/dash-shapes-qwen3-vl

Any vision-language family of the registry trains (``--family``); ``--video-share`` needs one that takes video.
Seeded and deterministic in its data (sample ``i`` of the stream is a pure function of ``i``); runs on a GPU or the
CPU (``--device``). Each training sequence is one scene (or clip) and a question of every kind, as a multi-turn chat;
the loss is on the answer words and their end-of-turn tokens only. With clips the vocabulary gains the video
questions' words (``video.WORDS``); a resumed checkpoint's tokens keep their trained embeddings (``carry_embeddings``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import AutoTokenizer

from dash_vlm.attention import use_attention
from dash_vlm.models import ModelAdapter, adapter_for, chat_prompts, model_types_with
from dash_vlm.models.tiny import tiny_checkpoint
from dash_vlm.shapes import video
from dash_vlm.shapes.data import ANSWERS, WORDS, held_out_keys, split_samples, training_scene

logger = logging.getLogger(__name__)

# The same in every family; Qwen3-VL's tower gets one DeepStack tap (block 2 of 4, ``qwen3_vl.tiny_deepstack``), added
# after decoder layer 0: below every method's decision layer (DASH's 3 of 8 at start_ratio 0.4, FastV's 1).
ARCHITECTURE = dict(
    num_hidden_layers=8,
    hidden_size=128,
    intermediate_size=384,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vision_layers=4,
    vision_width=64,
    image_side=64,
)


Visual = Image.Image | tuple[Image.Image, ...]  # an image, or a clip's frames


def conversation(visual: Visual, question: str) -> list[dict]:
    entry = (
        {"type": "image", "image": visual} if isinstance(visual, Image.Image) else {"type": "video", "video": visual}
    )
    return [{"role": "user", "content": [entry, {"type": "text", "text": question}]}]


def visual_inputs(adapter: ModelAdapter, processor, visuals: list[Visual]) -> dict:
    """The processor's keywords for a batch of images or of clips (frame lists), built as ``DashVLM.generate`` builds
    them (``adapter.vision_inputs``), so that training sees what a test question shows: a clip's frame rate, hence
    Qwen3-VL's timestamp texts, and its frames at the size generation gives them."""
    items = [
        {"type": "image", "image": visual}
        if isinstance(visual, Image.Image)
        else {"type": "video", "video": list(visual)}
        for visual in visuals
    ]
    return adapter.vision_inputs(processor, items, None, None)


class ChatFormat:
    """Multi-turn training text in the checkpoint's own chat template: the first turn is exactly the single-question
    prompt used at test time; every answer is one word followed by the end-of-turn (EOS) token. ``model_type`` names
    the family, whose adapter builds the vision inputs (``visual_inputs``)."""

    SENTINEL = "sentinel"

    def __init__(self, processor, model_type: str, answers: tuple[str, ...] = ANSWERS):
        self.processor, self.eos = processor, processor.tokenizer.eos_token
        self.adapter = adapter_for(model_type)
        user = conversation(Image.new("RGB", (8, 8)), "first")
        follow_up = {"role": "user", "content": [{"type": "text", "text": "{question}"}]}
        answer = {"role": "assistant", "content": [{"type": "text", "text": self.SENTINEL}]}
        rendered = chat_prompts(processor, [[*user, answer, follow_up]])[0]
        # What the template puts between an answer and the next question's answer slot, minus its own end of turn.
        self.next_turn = rendered.split(self.SENTINEL, 1)[1].removeprefix(self.eos)
        tokenizer = processor.tokenizer
        self.eos_id = tokenizer.convert_tokens_to_ids(self.eos)
        self.answer_marker_id = tokenizer(chat_prompts(processor, [user])[0])["input_ids"][-1]
        self.answer_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(answers)))

    def text(self, visual: Visual, turns: list[tuple[str, str]]) -> str:
        first_question, first_answer = turns[0]
        text = chat_prompts(self.processor, [conversation(visual, first_question)])[0]
        text += f" {first_answer}{self.eos}"
        for question, answer in turns[1:]:
            text += self.next_turn.format(question=question) + f" {answer}{self.eos}"
        return text

    def labels(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Loss only on each answer word (right after the answer marker, right before EOS) and on that EOS."""
        answer = torch.zeros_like(input_ids, dtype=torch.bool)
        answer[:, 1:-1] = (input_ids[:, :-2] == self.answer_marker_id) & (input_ids[:, 2:] == self.eos_id)
        answer &= torch.isin(input_ids, self.answer_ids)
        target = answer.clone()
        target[:, 1:] |= answer[:, :-1]
        return torch.where(target, input_ids, -100)


def training_batch(chat: ChatFormat, indices: range, exclude: set[str], clips: bool = False) -> dict:
    """Scenes (``clips``: moving-shapes clips) ``indices`` with a question of every kind each, left-padded, minus
    held-out (visual, question) pairs; the processor's outputs and the labels, on the host."""
    visuals, texts = [], []
    for index in indices:
        visual, turns = (video.training_clip if clips else training_scene)(index, exclude)
        if turns:
            visuals.append(visual)
            texts.append(chat.text(visual, turns))
    inputs = visual_inputs(chat.adapter, chat.processor, visuals)
    batch = dict(chat.processor(text=texts, **inputs, padding=True, return_tensors="pt"))
    batch["labels"] = chat.labels(batch["input_ids"])
    return batch


def is_clip_batch(batch_index: int, video_share: float) -> bool:
    """Whether batch ``batch_index`` holds clips: a ``video_share`` of the batches, evenly spread."""
    return math.floor((batch_index + 1) * video_share) > math.floor(batch_index * video_share)


class ShapesStream(IterableDataset):
    """Batch ``b`` holds training scenes (or clips, ``is_clip_batch``) ``b * size ...``; workers interleave batches.
    Each batch comes with the names of its entries that stay on the host (``ModelAdapter.host_training_inputs``)."""

    def __init__(
        self, processor, config, batch_size: int, exclude: set[str], first_scene: int = 0, video_share: float = 0.0
    ):
        self.processor, self.config, self.batch_size = processor, config, batch_size
        self.exclude, self.first_scene, self.video_share = exclude, first_scene, video_share

    def __iter__(self):
        worker = get_worker_info()
        workers, rank = (1, 0) if worker is None else (worker.num_workers, worker.id)
        chat = ChatFormat(self.processor, self.config.model_type, answer_words(self.video_share))
        batch_index = rank
        while True:
            start = self.first_scene + batch_index * self.batch_size
            clips = is_clip_batch(batch_index, self.video_share)
            batch = training_batch(chat, range(start, start + self.batch_size), self.exclude, clips)
            yield adapter_for(self.config.model_type).host_training_inputs(self.config, batch)
            batch_index += workers


def answer_words(video_share: float) -> tuple[str, ...]:
    """The words the loss falls on: the image task's answers, and the clips' when clips are trained."""
    return tuple(dict.fromkeys([*ANSWERS, *(video.ANSWERS if video_share else ())]))


@torch.inference_mode()
def first_token_accuracy(model, processor, samples: list, batch_size: int = 250) -> float:
    """Share of samples (``data.Sample`` or ``video.Clip``) whose greedy first answer token is the answer word (a
    quick validation metric)."""
    tokenizer, adapter = processor.tokenizer, adapter_for(model)
    correct = 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        visuals = [sample.frames if isinstance(sample, video.Clip) else sample.image for sample in chunk]
        prompts = chat_prompts(processor, [conversation(v, s.question) for v, s in zip(visuals, chunk, strict=True)])
        inputs = processor(
            text=prompts, **visual_inputs(adapter, processor, visuals), padding=True, return_tensors="pt"
        )
        logits = model(**inputs.to(model.device)).logits[:, -1]
        answers = torch.tensor([tokenizer.convert_tokens_to_ids(s.answer) for s in chunk], device=logits.device)
        correct += (logits.argmax(-1) == answers).sum().item()
    return correct / len(samples)


def carry_embeddings(model, saved_vocab: dict[str, int], vocab: dict[str, int]) -> None:
    """Resize a resumed model's token embeddings (and its output layer) from the vocabulary it was saved with,
    ``saved_vocab``, to ``vocab``: every saved token keeps its trained rows whatever its new id (Qwen3-VL's timestamp
    words follow the video words), new tokens take the rows ``resize_token_embeddings`` initialises (near the mean).
    ``ValueError`` when ``vocab`` lacks a saved token."""
    lost = sorted(set(saved_vocab) - set(vocab))
    if lost:
        raise ValueError(f"the vocabulary lacks tokens of the resumed checkpoint: {lost}")
    model.resize_token_embeddings(len(vocab))  # rows 0 .. len(saved_vocab) - 1 are the saved ones, by their old ids
    fresh = iter(range(len(saved_vocab), len(vocab)))
    source = [saved_vocab[token] if token in saved_vocab else next(fresh) for token in sorted(vocab, key=vocab.get)]
    if source != list(range(len(vocab))):
        layers = {model.get_input_embeddings(), model.get_output_embeddings()}  # one layer when tied
        with torch.no_grad():
            for layer in layers:
                layer.weight.copy_(layer.weight[torch.tensor(source)])


def train(
    family: str,
    output: Path,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    device: str,
    workers: int,
    validate_every: int,
    max_minutes: float,
    resume: Path | None = None,
    first_scene: int = 0,
    video_share: float = 0.0,
) -> dict:
    started = time.perf_counter()
    words = [*WORDS, *video.WORDS] if video_share else WORDS
    model, processor = tiny_checkpoint(family, words, seed=seed, **ARCHITECTURE)
    if resume is not None:  # continue from a saved checkpoint (weights only; a fresh optimizer and schedule)
        model = type(model).from_pretrained(resume, dtype=torch.float32)
        saved_vocab = AutoTokenizer.from_pretrained(resume).get_vocab()
        if not video_share and set(video.WORDS) & set(saved_vocab):
            raise ValueError(
                f"video_share must be > 0 to resume {resume}: it knows the video words ({len(saved_vocab)} tokens, "
                f"{len(processor.tokenizer)} without them)"
            )
        carry_embeddings(model, saved_vocab, processor.tokenizer.get_vocab())
    processor.tokenizer.padding_side = "left"
    use_attention(model, "sdpa")  # a Qwen tower runs its equal-sized images in one attention call per block
    model.to(device).train()
    validations = {"validation_first_token": split_samples("validation", 1000)}
    if video_share:
        validations["validation_video_first_token"] = video.split_clips("validation")
    exclude = held_out_keys() | (video.held_out_keys() if video_share else set())
    loader = DataLoader(
        ShapesStream(processor, model.config, batch_size, exclude, first_scene, video_share),
        batch_size=None,
        num_workers=workers,
        pin_memory=device != "cpu",
        persistent_workers=workers > 0,
        prefetch_factor=8 if workers else None,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, min(200, steps // 10))

    def schedule(step: int) -> float:
        # With a time budget the cosine follows whichever runs out first, steps or minutes.
        progress = max(step / steps, (time.perf_counter() - started) / (60 * max_minutes))
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    history, done = [], 0
    for step, (batch, host_keys) in enumerate(loader):
        if step == steps or time.perf_counter() - started > 60 * max_minutes:
            break
        done = step + 1
        batch = {
            key: value if key in host_keys else value.to(device, non_blocking=True) for key, value in batch.items()
        }
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=device != "cpu"):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % validate_every == 0 or step + 1 == steps:
            model.eval()
            accuracies = {
                name: first_token_accuracy(model, processor, samples) for name, samples in validations.items()
            }
            model.train()
            history.append({"step": step + 1, "loss": round(loss.item(), 4), **accuracies})
            logger.info(
                "step %d loss %.4f %s (%.0f s)", step + 1, loss.item(), accuracies, time.perf_counter() - started
            )
    model.eval().to("cpu")
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    logger.info("stopping after %d steps", done)
    return {"seconds": round(time.perf_counter() - started), "steps": done, "history": history}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=model_types_with("is_vision_language"), required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=64, help="scenes per step (each with up to 4 questions)")
    parser.add_argument("--learning-rate", type=float, default=1.5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--validate-every", type=int, default=500)
    parser.add_argument("--resume", type=Path, default=None, help="continue training this saved checkpoint")
    parser.add_argument("--first-scene", type=int, default=0, help="index of the first training scene to use")
    parser.add_argument("--max-minutes", type=float, default=float("inf"), help="stop early (and save) after this")
    parser.add_argument(
        "--video-share",
        type=float,
        default=0.0,
        help=f"share of the batches that are moving-shapes clips ({', '.join(model_types_with('video'))})",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.video_share <= 1:
        parser.error(f"--video-share must be in [0, 1], got {args.video_share}")
    if args.video_share and args.family not in model_types_with("video"):
        parser.error(
            f"--video-share needs a family that takes video ({', '.join(model_types_with('video'))}), got {args.family}"
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # every batch has the same image shapes: pick the fastest convolution once
    result = train(
        args.family,
        args.output,
        args.steps,
        args.batch_size,
        args.learning_rate,
        args.seed,
        args.device,
        args.workers,
        args.validate_every,
        args.max_minutes,
        args.resume,
        args.first_scene,
        args.video_share,
    )
    arguments = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    stages = []  # a resumed run keeps the record of the runs before it
    if args.resume is not None and (args.resume / "training.json").is_file():
        stages = json.loads((args.resume / "training.json").read_text())["stages"]
    stage = {
        "arguments": arguments,
        "device": torch.cuda.get_device_name() if "cuda" in args.device else "cpu",
        **result,
    }
    (args.output / "training.json").write_text(json.dumps({"stages": [*stages, stage]}, indent=1))


if __name__ == "__main__":
    main()
