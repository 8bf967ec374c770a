"""The serving package as modules with one job each: imports run one way, no cycle, no module over 350 lines.

The same checks as ``tests/test_trainer_layout.py`` (whose import-graph
helpers this reuses), over ``serving/``. Function-level imports count: a
cycle hidden inside a function is still a cycle. ``serving.client`` is the
client's public face (it re-exports the library and the CLI's ``main``), so
the modules it re-exports must never import it; the client side never
imports the server side, so the library works without the server's modules.
"""

from __future__ import annotations

from test_trainer_layout import MAX_LINES, ROOT, cycles, graph, module_name

# The gRPC client, its CLI and the load test; besides each other they may import only these shared modules.
CLIENT_SIDE = {"serving.client", "serving.client_cli", "serving.client_types", "serving.grpc_client",
               "serving.images", "serving.loadtest"}
SHARED = {"serving", "serving.tensors"}


def test_no_import_cycle():
    assert cycles(graph("serving")) == []


def test_no_module_over_350_lines():
    long = {module_name(p): n for p in (ROOT / "serving").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_no_serving_module_imports_the_client_facade():
    """``serving.client`` is for users; the modules it re-exports (and the load test) import what it re-exports."""
    assert {name for name, targets in graph("serving").items() if "serving.client" in targets} == set()


def test_the_client_side_never_imports_the_server_side():
    edges = graph("serving")
    assert set(edges) >= CLIENT_SIDE
    crossing = {f"{a} imports {b}" for a in CLIENT_SIDE for b in edges[a] if b not in CLIENT_SIDE | SHARED}
    assert crossing == set()
