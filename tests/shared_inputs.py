"""What the tests read from `../shared` beside the repository: LLaMA-Factory's registry and data
files, and llama.cpp's Python binding (`make install` installs it from ../shared/wheels/).

CI has both, so a test that needs one fails there without it (CI=true), and is skipped elsewhere,
saying why and where it looked: a clone without `../shared` still runs everything else.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest

# LLaMA-Factory's own registry and data files, unchanged: `shared/llamafactory-data` beside the
# repository, or where TUNEFACTORY_LLAMAFACTORY_DATA points.
LLAMAFACTORY_DATA = Path(
    os.environ.get("TUNEFACTORY_LLAMAFACTORY_DATA")
    or Path(__file__).resolve().parents[2] / "shared" / "llamafactory-data"
)
LLAMAFACTORY_REGISTRY = LLAMAFACTORY_DATA / "dataset_info.json"

# A test, or a whole module (`pytestmark = needs_llamafactory_data`), that reads LLaMA-Factory's
# data; the session fixture `llamafactory_data` in conftest.py fails or skips it first.
needs_llamafactory_data = pytest.mark.usefixtures("llamafactory_data")


def skip_or_fail_in_ci(why: str) -> NoReturn:
    """Fail the test in CI (CI=true), where what it needs is installed; skip it elsewhere, saying why."""
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


def llamafactory_data_or_fail_in_ci(folder: Path = LLAMAFACTORY_DATA) -> Path:
    """`folder` if it holds LLaMA-Factory's registry; otherwise fail in CI, skip elsewhere."""
    if not (folder / "dataset_info.json").is_file():
        skip_or_fail_in_ci(
            f"LLaMA-Factory's data is not at {folder} (../shared/llamafactory-data beside the repository, "
            "or set TUNEFACTORY_LLAMAFACTORY_DATA)"
        )
    return folder


def llama_cpp_or_fail_in_ci():
    """llama-cpp-python, which `make install` installs from ../shared/wheels/: a test that needs it
    fails in CI (CI=true) without it, and is skipped elsewhere, saying why."""
    try:
        import llama_cpp
    except ImportError:
        skip_or_fail_in_ci("llama-cpp-python is not installed (make install installs it from ../shared/wheels/)")
    return llama_cpp


def llama_cpp_greedy(llm, prompt: list[int], count: int) -> list[int]:
    """llama.cpp's greedy continuation of `prompt`: `count` tokens, or up to its end-of-text token."""
    answer = []
    for token in llm.generate(prompt, temp=0.0):
        answer.append(token)
        if token == llm.token_eos() or len(answer) == count:
            return answer
