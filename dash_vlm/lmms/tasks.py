"""lmms-eval task classes behind the ``dash_*`` YAML files of the repository's ``tasks/`` folder.

``DashTask`` takes one of lmms-eval's own task definitions by reference (its YAML file inside the installed
``lmms_eval.tasks`` package: dataset, prompt, generation settings and scoring unchanged) and adds the speed figures
the ``dash_*`` models record (``dash_vlm.lmms.figures``) to every document's scores, averaged per task.
"""

from __future__ import annotations

import io
from importlib import resources
from pathlib import Path

from lmms_eval.api.metrics import mean
from lmms_eval.api.task import ConfigurableTask
from lmms_eval.utils import load_yaml_config
from PIL import Image

from dash_vlm.lmms.figures import SPEED_METRICS, lookup

LMMS_TASKS = Path(str(resources.files("lmms_eval") / "tasks"))

# MVBench's 20 subtasks, in the order of lmms-eval's ``mvbench`` group (the ``dash_mvbench`` group lists them all).
MVBENCH_SUBTASKS = (
    "action_sequence",
    "moving_count",
    "action_prediction",
    "episodic_reasoning",
    "action_antonym",
    "action_count",
    "scene_transition",
    "object_shuffle",
    "object_existence",
    "fine_grained_pose",
    "unexpected_action",
    "moving_direction",
    "state_change",
    "object_interaction",
    "character_order",
    "action_localization",
    "counterfactual_inference",
    "fine_grained_action",
    "moving_attribute",
    "egocentric_navigation",
)
# lmms-eval task -> its YAML file inside lmms_eval/tasks, for the adapters of the tasks pruning papers report.
REFERENCES = {
    "textvqa_val": "textvqa/textvqa_val.yaml",
    "gqa": "gqa/gqa.yaml",
    "pope": "pope/pope.yaml",
    "mme": "mme/mme.yaml",
    "chartqa": "chartqa/chartqa.yaml",
    "docvqa_val": "docvqa/docvqa_val.yaml",
    "mmbench_en_dev": "mmbench/mmbench_en_dev.yaml",
    "scienceqa_img": "scienceqa/scienceqa_img.yaml",
    "vqav2_val_lite": "vqav2/vqav2_val_lite.yaml",
    "videomme": "videomme/videomme.yaml",
    "longvideobench_val_v": "longvideobench/longvideobench_val_v.yaml",
    **{f"mvbench_{name}": f"mvbench/mvbench_{name}.yaml" for name in MVBENCH_SUBTASKS},
}


class NumberedDoc(dict):
    """A document that knows its id, so that ``process_results`` can find the figures recorded for it."""

    doc_id: int


class NumberedDocs:
    """A view of a task's documents whose items are ``NumberedDoc``; anything else goes to the wrapped dataset."""

    def __init__(self, docs):
        self.docs = docs

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, index: int) -> NumberedDoc:
        doc = NumberedDoc(self.docs[index])
        doc.doc_id = index
        return doc

    def __iter__(self):
        return (self[index] for index in range(len(self)))

    def __getattr__(self, name: str):
        return getattr(self.docs, name)


class DashTask(ConfigurableTask):
    """An lmms-eval task plus the per-request speed figures of the ``dash_*`` models.

    The YAML names the task (``task: dash_pope``) and the lmms-eval task it adapts (``dash_reference: pope``);
    everything else comes from lmms-eval's own definition.
    """

    def __init__(self, config: dict) -> None:
        reference = config.get("dash_reference")
        if reference not in REFERENCES:
            raise ValueError(f"dash_reference must be one of {sorted(REFERENCES)}, got {reference!r}")
        super().__init__(config=self.reference_config(reference) | {"task": config["task"]})
        self.add_speed_metrics()

    @staticmethod
    def reference_config(reference: str) -> dict:
        return load_yaml_config(str(LMMS_TASKS / REFERENCES[reference]), mode="full")

    def add_speed_metrics(self) -> None:
        for name in SPEED_METRICS:
            self._aggregation_list[name] = mean
            self._higher_is_better[name] = False

    @property
    def eval_docs(self):
        return NumberedDocs(super().eval_docs)

    @property
    def eval_docs_no_media(self):
        return NumberedDocs(super().eval_docs_no_media)

    def process_results(self, doc, results, full_docs=None):
        scores = super().process_results(doc, results, full_docs=full_docs)
        return {**scores, **lookup(self.config.task, getattr(doc, "doc_id", None))}


def shapes_doc_to_visual(doc: dict) -> list[Image.Image]:
    return [Image.open(io.BytesIO(doc["image"])).convert("RGB")]


def shapes_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def shapes_process_results(doc: dict, results: list[str]) -> dict:
    correct = float(results[0].strip().lower() == doc["answer"].strip().lower())
    return {"exact_match": correct, f"{doc['kind']}_accuracy": correct}


def shapes_video_doc_to_visual(doc: dict) -> list[str]:
    from dash_vlm.shapes.video import TASK_FOLDER

    return [str(TASK_FOLDER / doc["video"])]


class DashShapesTask(DashTask):
    """dash-shapes: the bundled test split (``tasks/dash_shapes/test.parquet``), fully offline, exact match overall
    and per question kind, plus the speed figures."""

    def __init__(self, config: dict) -> None:
        ConfigurableTask.__init__(self, config=self.shapes_config() | {"task": config["task"]})
        self.add_speed_metrics()

    @staticmethod
    def shapes_config() -> dict:
        from dash_vlm.shapes.data import KINDS, TEST_FILE

        return shapes_task_config(KINDS, TEST_FILE, shapes_doc_to_visual)


class DashShapesVideoTask(DashShapesTask):
    """Moving dash-shapes: the bundled test clips (``tasks/dash_shapes_video``, MP4 files read as video), fully
    offline, exact match overall and per question kind, plus the speed figures."""

    @staticmethod
    def shapes_config() -> dict:
        from dash_vlm.shapes.video import KINDS, TEST_FILE

        return shapes_task_config(KINDS, TEST_FILE, shapes_video_doc_to_visual)


def shapes_task_config(kinds: tuple[str, ...], test_file: Path, doc_to_visual) -> dict:
    """An offline one-word-answer task over a bundled parquet test split."""
    metrics = ["exact_match", *(f"{kind}_accuracy" for kind in kinds)]
    return {
        "dataset_path": "parquet",
        "dataset_kwargs": {"data_files": {"test": str(test_file)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_visual": doc_to_visual,
        "doc_to_text": shapes_doc_to_text,
        "doc_to_target": "answer",
        "generation_kwargs": {"max_new_tokens": 4, "temperature": 0, "do_sample": False},
        "process_results": shapes_process_results,
        "metric_list": [{"metric": name, "aggregation": "mean", "higher_is_better": True} for name in metrics],
        "metadata": {"version": 1.0},
    }
