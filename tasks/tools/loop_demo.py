"""One turn of the feedback loop on SmolLM2, scripted: `make loop-demo`.

    python -m tasks.tools.loop_demo [--workspace workspace] [--samples 3]

1. The champion: `self-cognition@champion` of the workspace; where there is none, the demo
   (deployments/self_cognition.yaml) is run and its version promoted.
2. Its users: `tunefactory api self-cognition@champion --record` on loopback. Each prompt of
   data/loop_demo/users.json but the held-out ones (every fourth) is asked --samples times at
   temperature 0.8, and each answer rated by the prompt's rule: up when it is right and in the form
   asked for (the number alone, one word, the assistant's own name), else down with the right
   answer as the correction.
3. `tunefactory feedback export self-cognition`: KTO rows to train on, preference pairs held out.
4. `tunefactory run deployments/feedback_loop.yaml`: KTO from the champion, evaluated on the held-out
   pairs beside the demo's sets, made champion only through the gate.
5. Before and after on the held-out prompts: the champion and the retrained version each answer
   them --samples times; the share rated up by the same rules, with 95% intervals; the verdict.

The server does not swap to a new champion by itself yet: restart `tunefactory api` to serve it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import httpx
import yaml

from tasks.runtime.intervals import wilson
from tasks.tools.api_process import RUN_CLI, free_port, start, stop, wait_healthy

ROOT = Path(__file__).resolve().parents[2]
USERS = ROOT / "data" / "loop_demo" / "users.json"
DEMO_SPEC, LOOP_SPEC = ROOT / "deployments" / "self_cognition.yaml", ROOT / "deployments" / "feedback_loop.yaml"
MODEL = "self-cognition"
KEY = "loop-demo"
# names an answer to "who are you?" must not claim, besides its own
OTHER_IDENTITIES = ("chatgpt", "gpt", "openai", "smollm", "hugging face", "huggingface", "claude", "anthropic")


def rating(user: dict, answer: str, name: str, author: str) -> tuple[str, str | None]:
    """The prompt's rule: ("up", None) for a right answer in the asked form, else ("down", the correction)."""
    text = answer.strip()
    if user["rule"] == "identity":
        lowered = text.lower()
        right = name.lower() in lowered and not any(other in lowered for other in OTHER_IDENTITIES)
        return ("up", None) if right else ("down", f"I'm {name}, an AI assistant developed by {author}.")
    bare = text.rstrip(".!").strip()
    expected = user["expected"]
    if bare.lower() == expected.lower():
        return "up", None
    return "down", expected if user["rule"] == "number" else f"{expected}."


def cli(*args: str) -> None:
    """`tunefactory ARGS` in a child process, its output on this terminal; exits on failure."""
    returncode = subprocess.run([sys.executable, "-c", RUN_CLI, *args], cwd=ROOT).returncode
    if returncode != 0:
        raise SystemExit(f"loop-demo: `tunefactory {' '.join(args)}` failed (exit {returncode})")


def ensure_champion(workspace: Path) -> str:
    """The champion's version: the demo's model, trained and promoted first where the workspace has none."""
    from tasks.runtime.model_registry import RegistryError, version_directory

    try:
        return version_directory(f"{MODEL}@champion", workspace)[1].version
    except RegistryError:
        print(f"loop-demo: {workspace} has no {MODEL}@champion; running the demo to make one", flush=True)
    cli("run", str(DEMO_SPEC), "--set", f"workspace={workspace}")
    cli("promote", f"{MODEL}@candidate", "--workspace", str(workspace))
    return version_directory(f"{MODEL}@champion", workspace)[1].version


class Server:
    """`tunefactory api MODEL` on a free loopback port, with the demo's key."""

    def __init__(self, model: str, workspace: Path, *options: str) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = workspace / "loop-demo" / f"api-{model.replace('/', '-').replace('@', '-')}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        port = int(self.url.rsplit(":", 1)[1])
        self.process = start(model, port, self.log, "--workspace", str(workspace), "--api-key", KEY, *options)
        wait_healthy(self.url, self.process, self.log)

    def ask(self, prompt: str) -> dict:
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 40, "temperature": 0.8}
        response = httpx.post(f"{self.url}/v1/chat/completions", json=body, headers=self.headers(), timeout=300)
        response.raise_for_status()
        return response.json()

    def rate(self, completion_id: str, up_or_down: str, correction: str | None) -> None:
        body = {"id": completion_id, "rating": up_or_down, "user": "loop-demo"}
        if correction:
            body["correction"] = correction
        httpx.post(f"{self.url}/v1/ratings", json=body, headers=self.headers(), timeout=120).raise_for_status()

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEY}"}


def answers_rated(server: Server, users: list[dict], samples: int, values: dict, rate: bool) -> list[dict]:
    """Each user's prompt asked `samples` times; each answer with its rule's rating (sent to the server when `rate`)."""
    rows = []
    for user in users:
        for _ in range(samples):
            response = server.ask(user["prompt"])
            answer = response["choices"][0]["message"]["content"]
            verdict, correction = rating(user, answer, values["name"], values["author"])
            if rate:
                server.rate(response["id"], verdict, correction)
            rows.append({"prompt": user["prompt"], "rule": user["rule"], "answer": answer, "rating": verdict})
    return rows


def up_share(rows: list[dict]) -> dict[str, float]:
    ups, n = sum(row["rating"] == "up" for row in rows), max(len(rows), 1)
    low, high = wilson(ups / n, n)
    return {"up": ups, "n": len(rows), "share": ups / n, "low": low, "high": high}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workspace", type=Path, default=Path("workspace"))
    parser.add_argument("--samples", type=int, default=3, help="answers asked per prompt (3)")
    args = parser.parse_args()
    workspace = args.workspace.resolve()
    values = yaml.safe_load(DEMO_SPEC.read_text())["dataset"]["template_vars"]
    users = json.loads(USERS.read_text())
    held_out = users[3::4]
    rating_users = [user for index, user in enumerate(users) if index % 4 != 3]

    champion = ensure_champion(workspace)
    print(f"\nloop-demo: users of {MODEL} version {champion} (@champion) ask and rate", flush=True)
    server = Server(f"{MODEL}@champion", workspace, "--record")
    try:
        rated = answers_rated(server, rating_users, args.samples, values, rate=True)
        before = answers_rated(server, held_out, args.samples, values, rate=False)
    finally:
        stop(server.process)  # what is still queued is written before it exits
    print(f"loop-demo: {len(rated)} answers rated, {sum(r['rating'] == 'up' for r in rated)} up", flush=True)

    cli("feedback", "export", MODEL, "--workspace", str(workspace), "--holdout", "0.25")
    registry = workspace / "feedback" / MODEL / "dataset_info.json"
    cli("run", str(LOOP_SPEC), "--set", f"workspace={workspace}", "--set", f"dataset.registry={registry}")

    from tasks.runtime.model_registry import current_champion, registry_client

    client = registry_client(workspace)
    newest = max(client.search_model_versions(f"name = '{MODEL}'"), key=lambda v: int(v.version))
    server = Server(f"{MODEL}/{newest.version}", workspace)
    try:
        after = answers_rated(server, held_out, args.samples, values, rate=False)
    finally:
        stop(server.process)
    now = current_champion(client, MODEL)
    results = {
        "champion_before": champion,
        "retrained": newest.version,
        "champion_after": now.version if now else None,
        "verdict": newest.tags.get("promoted_verdict") or newest.tags.get("promotion_refused", ""),
        "rated": up_share(rated),
        "held_out_before": up_share(before),
        "held_out_after": up_share(after),
    }
    (workspace / "loop-demo" / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nHeld-out prompts ({len(held_out)}, {args.samples} answers each), share rated up by the users' rules:")
    for label, key in (("champion (before)", "held_out_before"), ("retrained (after)", "held_out_after")):
        found = results[key]
        print(f"  {label:<18} {found['share']:.3f} [{found['low']:.3f}, {found['high']:.3f}] n={found['n']}")
    promoted = results["champion_after"] == newest.version
    print(f"Version {newest.version} {'is now @champion' if promoted else 'was not promoted'}: {results['verdict']}")
    print(f"(results: {workspace / 'loop-demo' / 'results.json'})")


if __name__ == "__main__":
    main()
