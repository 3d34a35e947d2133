"""`tunefactory chat PATH`: talk to an exported model or an adapter checkpoint in the terminal.

PATH is a model directory (an export) or a directory with `adapter_config.json` (a LoRA
adapter: the base model named in it is loaded underneath). Tokens stream as they are
generated; the conversation keeps its history; `/reset` clears it, `/exit` or Ctrl-D ends.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from tasks.dataset.registry import DataError


def resolve_chat_model(path: str | Path) -> tuple[Path, Path | None]:
    """(model directory, adapter directory or None) for a path given on the command line."""
    path = Path(path).expanduser()
    if (path / "adapter" / "adapter_config.json").is_file():  # a training stage output
        path = path / "adapter"
    if (path / "adapter_config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base or not Path(base).is_dir():
            raise DataError(f"{path}: the adapter's base model {base!r} is not a local directory")
        return Path(base), path
    if (path / "model" / "config.json").is_file():  # an export stage output
        path = path / "model"
    if not (path / "config.json").is_file():
        raise DataError(f"{path}: not a model directory (no config.json) nor an adapter (no adapter_config.json)")
    return path, None


def chat_loop(path: str | Path, max_new_tokens: int = 256, system: str | None = None) -> None:
    import torch
    from transformers import AutoTokenizer, TextIteratorStreamer

    from tasks.components.modeling import compute_setup, load_model

    model_dir, adapter = resolve_chat_model(path)
    setup = compute_setup("auto")
    tokenizer = AutoTokenizer.from_pretrained(
        adapter if adapter and (adapter / "tokenizer.json").exists() else model_dir
    )
    model = load_model(model_dir, adapter, setup.device, setup.autocast_dtype or torch.float32).eval()
    print(f"chatting with {adapter or model_dir} on {setup.device} ({setup.name}); /reset clears, /exit ends")
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            prompt = input("\nyou> ").strip()
        except EOFError:
            print()
            return
        if prompt in ("/exit", "/quit"):
            return
        if prompt == "/reset":
            history = history[:1] if system else []
            continue
        if not prompt:
            continue
        history.append({"role": "user", "content": prompt})
        text = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(setup.device)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(
            **inputs,
            streamer=streamer,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        thread = threading.Thread(target=model.generate, kwargs=kwargs)
        thread.start()
        print("assistant> ", end="", flush=True)
        reply = ""
        for piece in streamer:
            reply += piece
            print(piece, end="", flush=True)
        thread.join()
        print()
        history.append({"role": "assistant", "content": reply.strip()})
