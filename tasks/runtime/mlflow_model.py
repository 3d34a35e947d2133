"""The export as an MLflow model: an `MLmodel` file beside the shards makes the export directory,
and so each registry version, a pyfunc model whose loader is this module.

    mlflow.pyfunc.load_model("models:/self-cognition@champion").predict(
        [{"messages": [{"role": "user", "content": "Who are you?"}]}]
    )
    PATH="$PWD/.venv/bin:$PATH" mlflow models serve -m models:/self-cognition@champion --env-manager local

(mlflow starts `uvicorn` by name, from PATH: docs/using-the-model.md.)

Its input is rows with a column `messages` (a conversation: role and content of each turn),
its output the assistant's next turn per row (greedy, through the model's chat template, as the
evaluate stage answers). `max_new_tokens` is a parameter (default 256). Only the MLmodel file is
written: the weights are the export's own files, which the registry holds by hard links.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MLMODEL = "MLmodel"
DEFAULT_MAX_NEW_TOKENS = 256


def write_mlmodel(model_dir: Path) -> None:
    """Describe `model_dir` as a pyfunc model (no torch here: the export stage calls this)."""
    from mlflow.models import Model, ModelSignature
    from mlflow.pyfunc import add_to_model
    from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

    turn = Object([Property("role", "string"), Property("content", "string")])
    model = Model()
    add_to_model(model, loader_module=__name__, data=".")
    model.signature = ModelSignature(
        inputs=Schema([ColSpec(Array(turn), "messages")]),
        outputs=Schema([ColSpec("string", "answer")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", DEFAULT_MAX_NEW_TOKENS)]),
    )
    model.save(str(Path(model_dir) / MLMODEL))


class ChatModel:
    """What `mlflow.pyfunc.load_model` hands back for a tunefactory export."""

    def __init__(self, model_dir: Path):
        import torch
        from transformers import AutoTokenizer

        from tasks.components.modeling import compute_setup, load_model

        self.setup = compute_setup("auto")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = load_model(model_dir, None, self.setup.device, self.setup.autocast_dtype or torch.float32)
        self.model.eval()

    def get_raw_model(self):
        """The transformers model, for `PyFuncModel.get_raw_model()`."""
        return self.model

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> list[str]:
        from tasks.components.generation import generate_answers

        conversations = [list(_plain(messages)) for messages in _column(model_input)]
        tokens = int((params or {}).get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        return generate_answers(self.model, self.tokenizer, conversations, tokens, 8, self.setup.device)


def _column(model_input: Any) -> list[Any]:
    """The `messages` of each row, from a DataFrame (what pyfunc passes), a list of rows or one row."""
    if hasattr(model_input, "to_dict"):
        model_input = model_input.to_dict(orient="list")
    if isinstance(model_input, dict):  # to_dict's columns; a bare row was made one by pyfunc's schema
        return list(model_input["messages"])
    return [row["messages"] for row in model_input]


def _plain(messages: Any):
    for turn in messages:  # numpy arrays and pandas objects after the schema's conversion
        yield {"role": str(turn["role"]), "content": str(turn["content"])}


def _load_pyfunc(data_path: str) -> ChatModel:
    """MLflow's pyfunc loader hook (`loader_module` in MLmodel)."""
    return ChatModel(Path(data_path))
