"""Web pages of other origins cannot drive the local servers; the UIs and Python clients still can.

The servers are `make ui`'s (started by `tunefactory ui start` on free loopback ports) and a
command's temporary Prefect server. The hostile page is served from a third loopback port, the
worst case: MLflow's own defaults trust every localhost origin, and Prefect's trust every origin.
"""

from __future__ import annotations

import http.server
import json
import threading
import uuid
from pathlib import Path

import httpx
import pytest
from headless_chromium import Browser
from loopback import free_port, prefect_csrf_headers
from mlflow.tracking import MlflowClient

from tasks.runtime import local_servers

# What the hostile page tries, each a request a page may send: JSON writes (which need the server
# to allow the page's origin in a preflight) and "simple" writes (no preflight; the page cannot
# read the answer, but the server acts on it unless it refuses the origin), and reading a CSRF token.
ATTACKS = """
const prefect = PREFECT, mlflow = MLFLOW, results = {};
async function attempt(name, request) {
  try { const r = await request(); results[name] = r.type === 'opaque' ? 'sent' : 'answered ' + r.status; }
  catch (e) { results[name] = 'refused'; }
}
(async () => {
  const json = body => ({method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body)});
  const simple = body => ({method: 'POST', mode: 'no-cors', headers: {'Content-Type': 'text/plain'},
                           body: JSON.stringify(body)});
  await attempt('prefect json write', () => fetch(prefect + '/api/flows/', json({name: 'hostile-json'})));
  await attempt('prefect simple write', () => fetch(prefect + '/api/flows/', simple({name: 'hostile-simple'})));
  await attempt('prefect csrf token', () => fetch(prefect + '/api/csrf-token?client=hostile'));
  await attempt('mlflow json write', () => fetch(mlflow + '/api/2.0/mlflow/experiments/create',
                                              json({name: 'hostile-json'})));
  await attempt('mlflow simple write', () => fetch(mlflow + '/api/2.0/mlflow/experiments/create',
                                                simple({name: 'hostile-simple'})));
  await attempt('mlflow read', () => fetch(mlflow + '/api/2.0/mlflow/experiments/search?max_results=10'));
  window.results = results;
})();
"""


@pytest.fixture
def servers(ui_servers):
    """`make ui`'s servers (conftest.py: shared with test_schedule.py, which stops them last)."""
    return ui_servers[1]


@pytest.fixture
def hostile_site(tmp_path: Path, servers):
    """A web page on another loopback port that tries to drive both servers."""
    script = ATTACKS.replace("PREFECT", json.dumps(servers.prefect_url)).replace(
        "MLFLOW", json.dumps(servers.mlflow_url)
    )
    (tmp_path / "index.html").write_text(f"<html><body>hello<script>{script}</script></body></html>")
    handler = lambda *args: http.server.SimpleHTTPRequestHandler(*args, directory=str(tmp_path))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/index.html"
    server.shutdown()


def prefect_flow_names(api_url: str) -> set[str]:
    response = httpx.post(f"{api_url}/flows/filter", json={}, headers=prefect_csrf_headers(api_url))
    response.raise_for_status()
    return {flow["name"] for flow in response.json()}


def test_a_page_of_another_origin_can_neither_write_to_nor_read_either_server(servers, hostile_site):
    browser = Browser()
    try:
        browser.open(hostile_site)
        results = browser.wait_for_script("window.results", "the hostile page's attempts", timeout=60)
    finally:
        browser.close()
    # the browser either refuses (a preflight or answer it may not use) or sends blind: every
    # blind write must then be refused by the server, which the state checks below show
    assert results == {
        "prefect json write": "refused",
        "prefect simple write": "sent",
        "prefect csrf token": "refused",
        "mlflow json write": "refused",
        "mlflow simple write": "sent",
        "mlflow read": "refused",
    }
    assert not {"hostile-json", "hostile-simple"} & prefect_flow_names(servers.prefect_api_url)
    experiments = {e.name for e in MlflowClient(servers.mlflow_url).search_experiments()}
    assert not {"hostile-json", "hostile-simple"} & experiments


@pytest.mark.parametrize("server", ["prefect", "mlflow"])
def test_a_rebound_domain_or_foreign_origin_is_refused_and_python_clients_are_not(servers, server):
    """DNS rebinding makes a hostile domain same-origin to the browser: only its Host header tells."""
    url = f"{servers.prefect_api_url}/health" if server == "prefect" else f"{servers.mlflow_url}/version"
    port = url.split(":")[2].split("/")[0]
    assert httpx.get(url, headers={"Host": f"hostile.example:{port}"}).status_code == 403
    assert httpx.get(url, headers={"Origin": f"http://localhost:{free_port()}"}).status_code == 403
    assert httpx.get(url, headers={"Origin": f"http://localhost:{port}"}).status_code == 200
    assert httpx.get(url).status_code == 200


def test_prefect_refuses_a_write_without_its_csrf_token(servers):
    api = servers.prefect_api_url
    refused = httpx.post(f"{api}/flows/", json={"name": "no-token"})
    assert refused.status_code == 403 and "CSRF" in refused.text
    written = httpx.post(f"{api}/flows/", json={"name": "with-token"}, headers=prefect_csrf_headers(api))
    assert written.status_code in (200, 201), written.text
    assert "no-token" not in prefect_flow_names(api)


def test_both_uis_still_work_and_show_what_python_clients_wrote(servers):
    """Prefect's UI lists runs with POSTs (`/flow_runs/filter`), so it must fetch and send its CSRF token."""
    from prefect.client.orchestration import SyncPrefectClient

    name = f"guarded-{uuid.uuid4().hex[:6]}"
    with SyncPrefectClient(servers.prefect_api_url) as client:  # CSRF support is its default
        client.create_flow_from_name(name)
    experiment = MlflowClient(servers.mlflow_url).create_experiment(name)
    browser = Browser()
    try:
        browser.open(f"{servers.prefect_url}/flows")
        browser.wait_for_text(name)
        browser.open(f"{servers.mlflow_url}/#/experiments/{experiment}/runs")
        browser.wait_for_text(name)
    finally:
        browser.close()


def test_a_commands_temporary_prefect_server_is_guarded_too():
    server = local_servers.TemporaryPrefectServer()
    try:
        server.wait_until_up()
        port = server.api_url.split(":")[2].split("/")[0]
        hostile = {"Origin": f"http://127.0.0.1:{free_port()}"}
        assert httpx.post(f"{server.api_url}/flows/", json={"name": "x"}, headers=hostile).status_code == 403
        assert httpx.get(f"{server.api_url}/health", headers={"Host": f"hostile.example:{port}"}).status_code == 403
        assert httpx.post(f"{server.api_url}/flows/", json={"name": "x"}).status_code == 403  # no CSRF token
        assert httpx.get(f"{server.api_url}/health").status_code == 200
    finally:
        server.stop()
