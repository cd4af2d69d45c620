"""Train a tiny VLM on dash-shapes from scratch and save it as an ordinary HF folder with a model card.

    python -m dash_vlm.shapes.train --family qwen2_vl --output assets/models/dash-shapes-qwen2-vl
    python -m dash_vlm.shapes.train --family llava --output assets/models/dash-shapes-llava

Seeded and deterministic in its data (sample ``i`` of the stream is a pure function of ``i``); runs on a GPU or the
CPU (``--device``). Each training sequence is one scene and a question of every kind, as a multi-turn chat; the
loss is on the answer words and their end-of-turn tokens only.
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

from dash_vlm.attention import use_attention
from dash_vlm.models import adapter_for, chat_prompts
from dash_vlm.models.tiny import tiny_checkpoint
from dash_vlm.shapes.data import ANSWERS, WORDS, Sample, held_out_keys, split_samples, training_scene

logger = logging.getLogger(__name__)

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


def conversation(sample: Sample) -> list[dict]:
    content = [{"type": "image", "image": sample.image}, {"type": "text", "text": sample.question}]
    return [{"role": "user", "content": content}]


class ChatFormat:
    """Multi-turn training text in the checkpoint's own chat template: the first turn is exactly the single-question
    prompt used at test time; every answer is one word followed by the end-of-turn (EOS) token."""

    SENTINEL = "sentinel"

    def __init__(self, processor):
        self.processor, self.eos = processor, processor.tokenizer.eos_token
        image = Image.new("RGB", (8, 8))
        user = conversation(Sample(image, "first", "", ""))
        follow_up = {"role": "user", "content": [{"type": "text", "text": "{question}"}]}
        answer = {"role": "assistant", "content": [{"type": "text", "text": self.SENTINEL}]}
        rendered = chat_prompts(processor, [[*user, answer, follow_up]])[0]
        # What the template puts between an answer and the next question's answer slot, minus its own end of turn.
        self.next_turn = rendered.split(self.SENTINEL, 1)[1].removeprefix(self.eos)
        tokenizer = processor.tokenizer
        self.eos_id = tokenizer.convert_tokens_to_ids(self.eos)
        self.answer_marker_id = tokenizer(chat_prompts(processor, [user])[0])["input_ids"][-1]
        self.answer_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(ANSWERS)))

    def text(self, image: Image.Image, turns: list[tuple[str, str]]) -> str:
        first_question, first_answer = turns[0]
        text = chat_prompts(self.processor, [conversation(Sample(image, first_question, "", ""))])[0]
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


def training_batch(chat: ChatFormat, indices: range, exclude: set[str]) -> dict:
    """Scenes ``indices`` with a question of every kind each, left-padded, minus held-out (image, question) pairs; the
    processor's outputs and the labels, on the host."""
    images, texts = [], []
    for index in indices:
        image, turns = training_scene(index, exclude)
        if turns:
            images.append(image)
            texts.append(chat.text(image, turns))
    batch = dict(chat.processor(text=texts, images=images, padding=True, return_tensors="pt"))
    batch["labels"] = chat.labels(batch["input_ids"])
    return batch


class ShapesStream(IterableDataset):
    """Batch ``b`` holds training scenes ``b * size ...``; workers interleave batches. Each batch comes with the names
    of its entries that stay on the host (``ModelAdapter.host_training_inputs``)."""

    def __init__(self, processor, config, batch_size: int, exclude: set[str], first_scene: int = 0):
        self.processor, self.config, self.batch_size = processor, config, batch_size
        self.exclude, self.first_scene = exclude, first_scene

    def __iter__(self):
        worker = get_worker_info()
        workers, rank = (1, 0) if worker is None else (worker.num_workers, worker.id)
        chat = ChatFormat(self.processor)
        batch_index = rank
        while True:
            start = self.first_scene + batch_index * self.batch_size
            batch = training_batch(chat, range(start, start + self.batch_size), self.exclude)
            yield adapter_for(self.config.model_type).host_training_inputs(self.config, batch)
            batch_index += workers


@torch.inference_mode()
def first_token_accuracy(model, processor, samples: list[Sample], batch_size: int = 250) -> float:
    """Share of samples whose greedy first answer token is the answer word (a quick validation metric)."""
    tokenizer = processor.tokenizer
    correct = 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        prompts = chat_prompts(processor, [conversation(sample) for sample in chunk])
        inputs = processor(text=prompts, images=[s.image for s in chunk], padding=True, return_tensors="pt")
        logits = model(**inputs.to(model.device)).logits[:, -1]
        answers = torch.tensor([tokenizer.convert_tokens_to_ids(s.answer) for s in chunk], device=logits.device)
        correct += (logits.argmax(-1) == answers).sum().item()
    return correct / len(samples)


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
) -> dict:
    started = time.perf_counter()
    model, processor = tiny_checkpoint(family, WORDS, seed=seed, **ARCHITECTURE)
    if resume is not None:  # continue from a saved checkpoint (weights only; a fresh optimizer and schedule)
        model = type(model).from_pretrained(resume, dtype=torch.float32)
    processor.tokenizer.padding_side = "left"
    use_attention(model, "sdpa")  # a Qwen tower runs its equal-sized images in one attention call per block
    model.to(device).train()
    validation = split_samples("validation", 1000)
    loader = DataLoader(
        ShapesStream(processor, model.config, batch_size, held_out_keys(), first_scene),
        batch_size=None,
        num_workers=workers,
        pin_memory=device != "cpu",
        persistent_workers=workers > 0,
        prefetch_factor=8 if workers else None,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = min(200, steps // 10)

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
            accuracy = first_token_accuracy(model, processor, validation)
            model.train()
            history.append({"step": step + 1, "loss": round(loss.item(), 4), "validation_first_token": accuracy})
            logger.info(
                "step %d loss %.4f validation first-token accuracy %.3f (%.0f s)",
                step + 1,
                loss.item(),
                accuracy,
                time.perf_counter() - started,
            )
    model.eval().to("cpu")
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    logger.info("stopping after %d steps", done)
    return {"seconds": round(time.perf_counter() - started), "steps": done, "history": history}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("qwen2_vl", "llava"), required=True)
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
    args = parser.parse_args(argv)
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
