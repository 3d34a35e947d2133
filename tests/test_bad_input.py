"""Bad input is refused in one message or kept as written: a property-based suite (hypothesis).

Hypothesis mutates the demo spec (wrong types, missing and unknown keys, empty, huge and odd
Unicode values), whole spec files (truncated, other encodings), `--set` strings, a dataset
registry and its data files, and runs `tunefactory validate` or `tunefactory preview` on each,
in this process (`flows.cli.main`). Every input must end one of two ways:

- refused: exit code 2, nothing on stdout, and one message on stderr that starts with
  `tunefactory: ` and names the file, key or row (a spec's validation errors are that message's
  indented lines, one per key); an exception that escapes `main` is a traceback, and a failure;
- accepted, meaning what it says: the value `validate` prints back is the value written (a
  lossless conversion such as "1e-3" to 0.001 counts), and a `--set` value of a text key is
  the text after `=`, character for character (or, quoted whole, what YAML's quotes hold).

The examples are derandomized (the same inputs on every run, so CI cannot flake) and bounded:
no training, under a minute. `HYPOTHESIS_PROFILE=explore pytest tests/test_bad_input.py` tries
new random inputs, ten times as many; `--hypothesis-show-statistics` prints how many were tried.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from flows.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((ROOT / "deployments" / "self_cognition.yaml").read_text())

settings.register_profile(
    "ci", max_examples=120, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)  # fmt: skip
settings.register_profile("explore", parent=settings.get_profile("ci"), max_examples=1200, derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Values of every shape a hand-written spec or a shell line can hold.
ODD_TEXT = st.sampled_from(
    ["", " ", "yes", "no", "null", "~", "1e-3", "0x10", "[a, b]", "{a: 1}", "a: b", "- x", "Bot #7", "#", "'q'",
     '"q"', "%x", "@x", "`x", "*x", "&x", "!x", "\u2028", "\x85", "\ufeffBOM", "é", "名字", "a\nb", "\t", "\x00"]
)  # fmt: skip
TEXT = st.one_of(ODD_TEXT, st.text(max_size=30), st.text(min_size=2000, max_size=3000, alphabet="ab"))
SCALAR = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True), TEXT
)
VALUE = st.recursive(
    SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)), max_leaves=6
)


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse's own refusals
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def assert_refused_in_one_message(code: int, out: str, err: str, *names: str) -> None:
    assert code == 2, f"exit {code}, stderr: {err!r}"
    assert out == "", f"a refusal printed to stdout: {out!r}"
    first, *rest = err.rstrip("\n").split("\n")
    assert first.startswith("tunefactory: "), err
    # the indented lines of a spec's validation errors, each naming a key, and nothing else
    assert all(line.startswith("  ") for line in rest), err
    assert any(name in err or repr(name) in err for name in names), f"the message names none of {names}: {err!r}"


def key_paths(data: Any, prefix: str = "") -> list[str]:
    paths = []
    if isinstance(data, dict):
        for key, value in data.items():
            path = f"{prefix}{key}"
            paths.append(path)
            paths += key_paths(value, path + ".")
    return paths


def at(data: dict, path: str) -> Any:
    for key in path.split("."):
        data = data[key]
    return data


def same_meaning(written: Any, echoed: Any) -> bool:
    """Whether a value printed back by `validate` is the written one, or a lossless conversion of it."""
    if written == echoed and type(written) is type(echoed):
        return True
    if isinstance(echoed, bool):  # a yes/no key: pydantic's spellings of yes and no
        return str(written).strip().lower() in (YES if echoed else NO)
    if isinstance(written, bool):
        return False  # true taken as the number 1 (or any other non-yes/no) is not what was written
    if isinstance(echoed, int | float) and isinstance(written, int | float | str):
        try:
            return math.isclose(float(written), float(echoed), rel_tol=0, abs_tol=0)
        except ValueError:
            return False
    if isinstance(written, list) and isinstance(echoed, list):
        return len(written) == len(echoed) and all(map(same_meaning, written, echoed))
    if isinstance(written, dict) and isinstance(echoed, dict):  # a section: what it leaves out is the default
        return all(key in echoed and same_meaning(value, echoed[key]) for key, value in written.items())
    return False


YES, NO = {"1", "true", "yes", "on", "t", "y"}, {"0", "false", "no", "off", "f", "n"}


def write_spec(directory: Path, data: Any) -> Path:
    path = directory / "spec.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def mutate(path: str, how: str, value: Any, new_key: str = "") -> tuple[dict, str, str, Any]:
    """The demo spec with the key at `path` removed, replaced by `value`, or `new_key` added beside it."""
    data = copy.deepcopy(DEMO)
    parent_path, _, key = path.rpartition(".")
    parent = at(data, parent_path) if parent_path else data
    if how == "remove":
        del parent[key]
    elif how == "replace":
        parent[key] = value
    else:
        parent[new_key] = value
        path = f"{parent_path}.{new_key}" if parent_path else new_key
    return data, path, how, value


@st.composite
def mutated_specs(draw) -> tuple[dict, str, str, Any]:
    """The demo spec with one key removed, replaced by a value of any shape, or added beside it."""
    path = draw(st.sampled_from(key_paths(DEMO)))
    parent_path = path.rpartition(".")[0]
    siblings = at(DEMO, parent_path) if parent_path else DEMO
    how, value = draw(st.sampled_from(["remove", "replace", "add"])), draw(VALUE)
    new_key = draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in siblings)) if how == "add" else ""
    return mutate(path, how, value, new_key)


@given(mutation=mutated_specs())
@example(mutation=mutate("train.lora.rank", "replace", True))  # found: trained rank 1
@example(mutation=mutate("train.learning_rate", "replace", math.inf))  # found: accepted
@example(mutation=mutate("dataset.template_vars.name", "add", "Other", new_key="Name"))  # one hid the other
@example(mutation=mutate("train.lora", "add", 1, new_key="\n"))  # found: a message over two lines
@example(mutation=mutate("model", "replace", {}))
def test_a_mutated_spec_is_refused_naming_the_key_or_kept_as_written(mutation, tmp_path_factory):
    data, path, how, value = mutation
    spec = write_spec(tmp_path_factory.mktemp("spec"), data)
    code, out, err = run_cli("validate", str(spec))
    if code != 0:
        # the key itself, or for a cross-field check the section it is in
        assert_refused_in_one_message(code, out, err, path, path.split(".")[0], str(spec))
        return
    free_form = path.startswith("dataset.template_vars.")  # the template's own names: any key
    assert how != "add" or free_form, f"an unknown key {path!r} was accepted: {out}"
    echoed = yaml.safe_load(out)
    if free_form:  # its keys are case-insensitive
        path = path.lower()
    if how == "replace" or (how == "add" and free_form):
        assert same_meaning(value, at(echoed, path)), f"{path}: wrote {value!r}, validate kept {at(echoed, path)!r}"


@given(
    cut=st.integers(0, 2000),
    encoding=st.sampled_from(["utf-8", "utf-16", "latin-1", "cp1252", "utf-8-sig"]),
    junk=st.binary(max_size=8),
)
@example(cut=459, encoding="utf-8", junk=b"!")  # found: PyYAML's message over several lines
@example(cut=2000, encoding="utf-16", junk=b"")
def test_a_truncated_or_re_encoded_spec_file_is_refused_naming_the_file_or_read_as_written(
    cut, encoding, junk, tmp_path_factory
):
    text = (ROOT / "deployments" / "self_cognition.yaml").read_text().replace("Nova", "Novä")
    raw = text.encode(encoding, errors="replace")[:cut] + junk
    spec = tmp_path_factory.mktemp("spec") / "spec.yaml"
    spec.write_bytes(raw)
    code, out, err = run_cli("validate", str(spec))
    if code != 0:
        assert_refused_in_one_message(code, out, err, str(spec))
        return
    echoed = yaml.safe_load(out)
    try:
        written = yaml.safe_load(raw.decode("utf-8")) or {}
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise AssertionError(f"a spec that is not UTF-8 YAML was accepted ({exc})") from None
    for key_path in key_paths(written):
        if not isinstance(at(written, key_path), dict):
            assert same_meaning(at(written, key_path), at(echoed, key_path)), key_path


# keys whose value is text: what follows `=` must arrive as written, or be refused naming the key
TEXT_KEYS = ["dataset.template_vars.name", "dataset.template_vars.author", "export.alias", "name", "train.lr_scheduler"]


@given(key=st.sampled_from(TEXT_KEYS), text=TEXT)
@example(key="dataset.template_vars.name", text="yes")  # found: became true, then refused
@example(key="dataset.template_vars.name", text=" ")  # found: became ""
@example(key="dataset.template_vars.name", text="\x85")  # found: validate printed a spec that read back " "
@example(key="dataset.template_vars.author", text='"Acme #1"')
def test_a_set_value_of_a_text_key_is_kept_character_for_character_or_refused(key, text):
    code, out, err = run_cli("validate", str(ROOT / "deployments" / "self_cognition.yaml"), f"--set={key}={text}")
    if code != 0:
        assert_refused_in_one_message(code, out, err, key)
        return
    quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""  # YAML's quotes are taken off
    wanted = yaml.safe_load(text) if quoted else text
    assert at(yaml.safe_load(out), key) == wanted, f"--set {key}={text!r} became {at(yaml.safe_load(out), key)!r}"


@given(assignment=st.one_of(st.text(max_size=40), st.builds(lambda k, v: f"{k}={v}", st.text(max_size=20), TEXT)))
@example(assignment="\x1b=")  # found: the key printed as it was, a control character in the message
@example(assignment="0.0=")
def test_any_set_string_is_refused_naming_it_or_accepted(assignment):
    code, out, err = run_cli("validate", str(ROOT / "deployments" / "self_cognition.yaml"), f"--set={assignment}")
    if code != 0:
        key = assignment.split("=")[0].strip()
        assert_refused_in_one_message(code, out, err, key or "--set", key.split(".")[0] or "--set", "--set")


# A registry of one alpaca set and one sharegpt set, as LLaMA-Factory writes them.
REGISTRY = {
    "plain": {"file_name": "plain.json", "columns": {"prompt": "instruction", "query": "input", "response": "output"}},
    "chat": {
        "file_name": "chat.json",
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "system": "system"},
        "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"},
    },
}
ROWS = {
    "plain": [{"instruction": "Who are you?", "input": "", "output": "I am <NAME>."}] * 3,
    "chat": [
        {
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello, I am {{name}}."}],
            "system": "Be kind.",
        }
    ]
    * 3,
}


@st.composite
def mutated_data(draw) -> tuple[Any, dict[str, bytes], str]:
    """The registry and its files with one thing changed: a registry key or value, a row's field,
    a file truncated, re-encoded, emptied or written as JSON Lines with odd separators."""
    registry, rows = copy.deepcopy(REGISTRY), copy.deepcopy(ROWS)
    name = draw(st.sampled_from(sorted(REGISTRY)))
    files = {entry["file_name"]: json.dumps(rows[n], ensure_ascii=False).encode() for n, entry in registry.items()}
    what = draw(st.sampled_from(["registry value", "registry key", "registry shape", "row", "file bytes", "jsonl"]))
    if what == "registry value":
        path = draw(st.sampled_from(key_paths(registry[name])))
        parent_path, _, key = path.rpartition(".")
        (at(registry[name], parent_path) if parent_path else registry[name])[key] = draw(VALUE)
    elif what == "registry key":
        registry[name][draw(st.text(min_size=1, max_size=10))] = draw(VALUE)
    elif what == "registry shape":
        registry = draw(st.one_of(VALUE, st.just([registry]), st.just({name: draw(VALUE)})))
    elif what == "row":
        row = rows[name][draw(st.integers(0, 2))] = copy.deepcopy(rows[name][0])
        path = draw(st.sampled_from(key_paths(row)))
        row[path.split(".")[0]] = draw(VALUE)
        files[REGISTRY[name]["file_name"]] = json.dumps(rows[name], ensure_ascii=False, default=str).encode()
    elif what == "file bytes":
        original = files[REGISTRY[name]["file_name"]].decode()
        encoding = draw(st.sampled_from(["utf-8", "utf-16", "latin-1", "utf-8-sig"]))
        cut = draw(st.integers(0, len(original) + 10))
        files[REGISTRY[name]["file_name"]] = original.replace("Hello", "Hellö").encode(encoding)[:cut]
    else:
        separator = draw(st.sampled_from(["\n", "\r\n", "\n\n"]))
        odd = draw(st.sampled_from(["\u2028", "\u2029", "\x85", "\x0c", ""]))
        lines = [json.dumps({**row, "output": f"a{odd}b"} if name == "plain" else row, ensure_ascii=False)
                 for row in rows[name]]  # fmt: skip
        registry[name]["file_name"] = REGISTRY[name]["file_name"].replace(".json", ".jsonl")
        files[registry[name]["file_name"]] = separator.join(lines).encode()
    return registry, files, name


@settings(max_examples=60)
@given(data=mutated_data())
def test_preview_of_a_mutated_registry_or_dataset_is_refused_naming_the_file_or_row_or_shown(data, tmp_path_factory):
    registry, files, name = data
    directory = tmp_path_factory.mktemp("data")
    (directory / "dataset_info.json").write_text(json.dumps(registry, ensure_ascii=False, default=str))
    for file_name, content in files.items():
        (directory / file_name).write_bytes(content)
    spec_data = copy.deepcopy(DEMO)
    spec_data["dataset"].update(names=[name], registry=str(directory / "dataset_info.json"))
    spec = write_spec(directory, spec_data)
    code, out, err = run_cli("preview", str(spec))
    if code != 0:
        assert_refused_in_one_message(code, out, err, "dataset_info.json", name, "row")
        return
    assert f"{name}:" in out


def test_same_meaning_tells_a_conversion_from_a_change():
    assert same_meaning("1e-3", 0.001) and same_meaning(8, 8.0) and same_meaning(["a"], ["a"])
    assert same_meaning("yes", True) and same_meaning(0, False)
    assert not same_meaning(True, 1) and not same_meaning("Bot #7", "Bot") and not same_meaning(2, True)
