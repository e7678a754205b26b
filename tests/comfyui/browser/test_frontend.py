"""The frontend in headless Chromium against a real ComfyUI server: the schedule overlay on every node it serves
(its plotted values are the route's, it follows widget changes and ticked comparisons), and every example
workflow (opens with its nodes in view, loads with known node types and valid widget values, runs to SaveImage)."""

import json
import math
import time
import urllib.parse

import pytest

from .conftest import SHORTCUT_BAND, WORKFLOWS, copy_if_asked, file_widgets, get_json

REPO_ROOT = WORKFLOWS.parent
OVERLAY = {  # node type -> its position in the overlay test graph
    "KSampler": (380, 20), "DirectDistillShortcutKSampler": (720, 20), "DirectDistillExpKarrasScheduler": (1060, 20),
    "KSamplerAdvanced": (380, 620), "BasicScheduler": (720, 620), "DirectDistillLoadStudent": (1060, 620),
}
RUN_S = 600  # a workflow run on the CPU (the first one loads the checkpoint)

BUILD_GRAPH = """(app, spec) => {
  app.graph.clear();
  const add = (type, [x, y]) => { const n = LiteGraph.createNode(type); n.pos = [x, y]; app.graph.add(n); return n; };
  const set = (node, name, value) => { node.widgets.find((w) => w.name === name).value = value; };
  const checkpoint = add("CheckpointLoaderSimple", [20, 20]);
  set(checkpoint, "ckpt_name", spec.checkpoint);
  const shortcut = add("DirectDistillLoadShortcut", [20, 200]);
  set(shortcut, "shortcut_name", spec.shortcut);
  const ids = {};
  for (const [type, pos] of Object.entries(spec.nodes)) {
    const node = add(type, pos);
    if (node.findInputSlot("model") >= 0) checkpoint.connect(0, node, node.findInputSlot("model"));
    if (node.findInputSlot("shortcut") >= 0) shortcut.connect(0, node, node.findInputSlot("shortcut"));
    if (type === "DirectDistillLoadStudent") set(node, "student_name", spec.student);
    ids[type] = node.id;
  }
  app.canvas.ds.scale = 0.62;
  app.canvas.ds.offset = [10, 40];
  app.canvas.setDirty(true, true);
  return ids;
}"""

SERIES = """(app, id) => {
  const plot = document.querySelector(`.dd-schedule-overlay[data-node-id="${id}"] svg[data-dd-plot]`);
  if (!plot) return null;
  const overlay = plot.closest(".dd-schedule-overlay");
  return {
    plot: { ...plot.dataset },
    error: overlay.dataset.error ?? null,
    status: overlay.querySelector(".dd-status").textContent,
    series: [...plot.querySelectorAll("polyline")].map((p) => ({
      scheduler: p.dataset.scheduler, role: p.dataset.role, query: p.dataset.query,
      sigmas: JSON.parse(p.dataset.sigmas), points: p.getAttribute("points") })),
    handoff: plot.querySelector("line[data-handoff]")?.dataset.handoff ?? null,
    band: plot.querySelector("rect[data-band]")?.dataset.band ?? null,
  };
}"""


def route(url: str, query: str) -> list[float]:
    return get_json(f"{url}/api/direct_distill/sigmas?{query}")["sigmas"]


def wait_for(frontend, node_id, condition, timeout=60.0):
    """The node's plotted series once ``condition(state)`` holds."""
    deadline, state = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        state = frontend.js(SERIES, node_id)
        if state and condition(state):
            return state
        time.sleep(0.25)
    pytest.fail(f"overlay of node {node_id} never reached the expected state; last: {state}")


def plotted_log_sigmas(state, series) -> dict[int, float]:
    """{step: log sigma} read back from the polyline's coordinates through the plot's own axes."""
    plot = {k: float(v) for k, v in state["plot"].items() if k != "ddPlot"}
    out = {}
    for point in series["points"].split():
        x, y = map(float, point.split(","))
        step = round((x - plot["plotLeft"]) / plot["plotWidth"] * plot["steps"])
        out[step] = plot["logTop"] - (y - plot["plotTop"]) / plot["plotHeight"] * (plot["logTop"] - plot["logBottom"])
    return out


def check_series(url, state, series):
    """The series holds the route's sigmas for its query, and the polyline draws exactly those."""
    assert series["sigmas"] == route(url, series["query"]), series["query"]
    plotted = plotted_log_sigmas(state, series)
    expected = {i: math.log(s) for i, s in enumerate(series["sigmas"]) if s > 0}
    assert plotted.keys() == expected.keys()
    span = float(state["plot"]["logTop"]) - float(state["plot"]["logBottom"])
    for step, value in expected.items():
        assert plotted[step] == pytest.approx(value, abs=1e-4 * span), step  # coordinates carry 3 decimals


def query_of(series) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(series["query"]))


@pytest.fixture(scope="module")
def overlay_graph(frontend, comfy_server, shortcut_names):
    checkpoint = sorted(p.name for p in (comfy_server["path"] / "models" / "checkpoints").iterdir())[0]
    student = next(name for name, preset in file_widgets()["loras"].items() if preset == "from file")
    frontend.page.reload()
    frontend.page.wait_for_function("window.comfyAPI?.app?.app?.graph?.nodes?.length > 0", timeout=120_000)
    ids = frontend.js(BUILD_GRAPH, {"nodes": OVERLAY, "checkpoint": checkpoint, "shortcut": shortcut_names[0],
                                    "student": student})
    return {"ids": ids, "checkpoint": checkpoint, "student": student, "shortcut": shortcut_names[0]}


def test_the_shortcuts_folder_exists_once_comfyui_has_loaded_the_nodes(comfy_server):
    assert (comfy_server["path"] / "models" / "shortcuts").is_dir()


def test_overlay_plots_the_routes_sigmas_on_every_node_it_serves(frontend, comfy_server, overlay_graph, tmp_path):
    url, ids = comfy_server["url"], overlay_graph["ids"]
    widgets = frontend.js("""(app, ids) => Object.fromEntries(Object.entries(ids).map(([type, id]) =>
        [type, Object.fromEntries(app.graph.getNodeById(id).widgets.filter((w) => w.name !== "dd_schedule")
                                  .map((w) => [w.name, w.value]))]))""", ids)
    for node_type, node_id in ids.items():
        state = wait_for(frontend, node_id, lambda s: {x["role"] for x in s["series"]} == {"selected", "compare"})
        assert state["error"] is None, (node_type, state["error"])
        (selected,) = [s for s in state["series"] if s["role"] == "selected"]
        (karras,) = [s for s in state["series"] if s["role"] == "compare"]  # ticked by default
        for series in (selected, karras):
            check_series(url, state, series)
        query, values = query_of(selected), widgets[node_type]
        if node_type == "DirectDistillLoadStudent":
            assert query == {"student": overlay_graph["student"], "nfe": str(values["nfe"]), "preset": "from file",
                             "model": overlay_graph["checkpoint"]}
            assert len(selected["sigmas"]) == 4 + 1  # the student's default NFE
            assert query_of(karras) == {"scheduler": "karras", "steps": "4", "model": overlay_graph["checkpoint"]}
            continue
        assert int(query["steps"]) == values["steps"] and query["model"] == overlay_graph["checkpoint"]
        assert query.get("scheduler") == values.get("scheduler", "exp_karras")
        assert query_of(karras)["scheduler"] == "karras" and query_of(karras)["steps"] == query["steps"]
        if node_type == "DirectDistillExpKarrasScheduler":
            assert float(query["p"]) == values["p"]
        if node_type == "DirectDistillShortcutKSampler":
            assert query["shortcut"] == overlay_graph["shortcut"]
            assert state["handoff"] == str(values["handoff_step"])
            assert state["band"] == ",".join(f"{v:g}" for v in SHORTCUT_BAND)
            assert f"hand-off {values['handoff_step']} in the shortcut's band" in state["status"]
    # The plot is no widget value: saved workflows and queued prompts hold exactly the node's own inputs.
    saved = frontend.js("""async (app, ids) => {
        const workflow = app.graph.serialize(), prompt = (await app.graphToPrompt()).output;
        return Object.fromEntries(Object.values(ids).map((id) => [id, {
            saved: workflow.nodes.find((n) => n.id === id).widgets_values.length,
            widgets: app.graph.getNodeById(id).widgets.filter((w) => w.name !== "dd_schedule").length,
            queued: Object.keys(prompt[id]?.inputs ?? {}) }]));
    }""", ids)
    for node_id, found in saved.items():
        assert found["saved"] == found["widgets"] and "dd_schedule" not in found["queued"], (node_id, found)
    assert not frontend.our_errors()

    # The README's picture: the Shortcut KSampler with its hand-off, band and the karras comparison, zoomed in.
    box = frontend.js("""(app, id) => {
        const node = app.graph.getNodeById(id), rect = app.canvas.canvas.getBoundingClientRect(), ds = app.canvas.ds;
        const title = LiteGraph.NODE_TITLE_HEIGHT;
        ds.scale = 1.2;
        ds.offset = [20 / ds.scale - node.pos[0], (20 + title * ds.scale) / ds.scale - node.pos[1]];
        app.canvas.setDirty(true, true);
        return { x: rect.left + 14, y: rect.top + 14, width: node.size[0] * ds.scale + 12,
                 height: (node.size[1] + title) * ds.scale + 12 };
    }""", ids["DirectDistillShortcutKSampler"])
    frontend.page.wait_for_timeout(1000)
    picture = tmp_path / "schedule_overlay.png"
    frontend.page.screenshot(path=str(picture), clip=box)
    copy_if_asked(picture, REPO_ROOT / "docs" / "schedule_overlay.png")


def widget_position(frontend, node_id, name, where):
    """Page coordinates of a point on a node's widget: "right" (its increment arrow) or "middle"."""
    return frontend.js("""(app, [id, name, where]) => {
        const node = app.graph.getNodeById(id), widget = node.widgets.find((w) => w.name === name);
        const rect = app.canvas.canvas.getBoundingClientRect();
        const local = where === "right" ? node.size[0] - 22 : node.size[0] / 2;
        const [x, y] = app.canvas.ds.convertOffsetToCanvas(
            [node.pos[0] + local, node.pos[1] + widget.y + LiteGraph.NODE_WIDGET_HEIGHT / 2]);
        return [rect.left + x, rect.top + y];
    }""", [node_id, name, where])


def test_overlay_follows_widget_changes_and_ticked_schedules(frontend, comfy_server, overlay_graph):
    url, node_id = comfy_server["url"], overlay_graph["ids"]["KSampler"]
    selected = lambda s: next(x for x in s["series"] if x["role"] == "selected")  # noqa: E731
    view_node(frontend, node_id)
    before = int(query_of(selected(wait_for(frontend, node_id, lambda s: s["series"])))["steps"])

    frontend.page.mouse.click(*widget_position(frontend, node_id, "steps", "right"))  # the user clicks "+"
    state = wait_for(frontend, node_id, lambda s: query_of(selected(s))["steps"] == str(before + 1))
    assert len(selected(state)["sigmas"]) == before + 2
    check_series(url, state, selected(state))

    frontend.page.mouse.click(*widget_position(frontend, node_id, "scheduler", "middle"))  # opens the list
    frontend.page.locator(".litecontextmenu .litemenu-entry", has_text="exp_karras").first.click()
    state = wait_for(frontend, node_id, lambda s: selected(s)["scheduler"] == "exp_karras")
    check_series(url, state, selected(state))

    overlay = frontend.page.locator(f'.dd-schedule-overlay[data-node-id="{node_id}"]')
    overlay.locator('input[value="exponential"]').click()
    state = wait_for(frontend, node_id, lambda s: any(x["scheduler"] == "exponential" for x in s["series"]))
    for series in state["series"]:
        check_series(url, state, series)
    assert {x["scheduler"] for x in state["series"]} == {"exp_karras", "karras", "exponential"}
    assert frontend.js("(app, id) => app.graph.getNodeById(id).properties['Direct Distill compare']",
                       node_id) == ["karras", "exponential"]
    assert not frontend.our_errors()


def view_node(frontend, node_id):
    frontend.js("""(app, id) => {
        const node = app.graph.getNodeById(id);
        app.canvas.ds.scale = 1;
        app.canvas.ds.offset = [40 - node.pos[0], 60 - node.pos[1]];
        app.canvas.setDirty(true, true);
    }""", node_id)
    frontend.page.wait_for_timeout(300)


def test_the_expkarras_node_compares_its_p_with_the_dropdowns_exp_karras(frontend, comfy_server, overlay_graph):
    """Its tick box for exp_karras (the dropdown's, p = 1) plotted nothing: it was taken for the node's own curve."""
    url, node_id = comfy_server["url"], overlay_graph["ids"]["DirectDistillExpKarrasScheduler"]
    view_node(frontend, node_id)
    frontend.js("(app, id) => { app.graph.getNodeById(id).widgets.find((w) => w.name === 'p').value = 2.5; }",
                node_id)
    box = frontend.page.locator(f'.dd-schedule-overlay[data-node-id="{node_id}"] input[value="exp_karras"]')
    box.click()
    try:
        state = wait_for(frontend, node_id, lambda s: any(x["role"] == "compare" and x["scheduler"] == "exp_karras"
                                                          for x in s["series"]))
        for series in state["series"]:
            check_series(url, state, series)
        (own,) = [x for x in state["series"] if x["role"] == "selected"]
        (dropdown,) = [x for x in state["series"] if x["role"] == "compare" and x["scheduler"] == "exp_karras"]
        assert query_of(own)["p"] == "2.5" and "p" not in query_of(dropdown) and own["sigmas"] != dropdown["sigmas"]
    finally:
        box.click()
    assert not frontend.our_errors()


def test_a_checkpoint_the_route_cannot_read_keeps_the_shortcuts_band(frontend, comfy_server, overlay_graph):
    """A .ckpt upstream: the plot falls back to SD's table and still shows the shortcut's band and verdict (both
    were dropped with the checkpoint)."""
    url, node_id = comfy_server["url"], overlay_graph["ids"]["DirectDistillShortcutKSampler"]
    (comfy_server["path"] / "models" / "checkpoints" / "old.ckpt").write_bytes(b"PK\x03\x04 a pickle, never opened")
    set_checkpoint = """(app, name) => {
        const node = app.graph.nodes.find((n) => n.type === "CheckpointLoaderSimple");
        node.widgets.find((w) => w.name === "ckpt_name").value = name;
        app.canvas.setDirty(true, true);
    }"""
    view_node(frontend, node_id)
    frontend.js(set_checkpoint, "old.ckpt")
    try:
        state = wait_for(frontend, node_id, lambda s: (s["error"] or "").startswith("model 'old.ckpt'"))
        assert state["error"] == "model 'old.ckpt': not a .safetensors file, the only kind this route reads"
        assert state["band"] == ",".join(f"{v:g}" for v in SHORTCUT_BAND)
        (selected,) = [s for s in state["series"] if s["role"] == "selected"]
        assert "model" not in query_of(selected) and query_of(selected)["shortcut"] == overlay_graph["shortcut"]
        check_series(url, state, selected)
    finally:
        frontend.js(set_checkpoint, overlay_graph["checkpoint"])
    wait_for(frontend, node_id, lambda s: s["error"] is None)


WORKFLOW_FILES = sorted(p.name for p in WORKFLOWS.glob("*.json"))

IN_VIEW = """(app) => {
  const canvas = app.canvas.canvas, rect = canvas.getBoundingClientRect(), ds = app.canvas.ds;
  const boxes = [...app.graph.nodes.map((n) => [`${n.type} #${n.id}`, n.boundingRect]),
                 ...app.graph.groups.map((g) => [`group ${g.title}`, g._bounding ?? g.boundingRect])];
  const hidden = [];
  for (const [name, [x, y, w, h]] of boxes) {
    for (const [px, py] of [[x, y], [x + w, y], [x, y + h], [x + w, y + h], [x + w / 2, y + h / 2]]) {
      const [cx, cy] = ds.convertOffsetToCanvas([px, py]);
      const inset = [cx + (px === x ? 3 : -3), cy + (py === y ? 3 : -3)];
      const [qx, qy] = [rect.left + inset[0], rect.top + inset[1]];
      const seen = document.elementFromPoint(qx, qy);
      const onCanvas = seen === canvas || !!seen?.closest?.(".dom-widget");
      const where = `${name} at (${qx.toFixed(0)}, ${qy.toFixed(0)})`;
      if (!onCanvas) hidden.push(`${where}: under ${seen?.tagName}.${seen?.className}`);
    }
  }
  return hidden;
}"""


GRAPH_BOX = """(app) => {
  const rect = app.canvas.canvas.getBoundingClientRect(), ds = app.canvas.ds;
  const corners = app.graph.nodes.flatMap(({ boundingRect: [x, y, w, h] }) => [[x, y], [x + w, y + h]])
    .map((p) => ds.convertOffsetToCanvas(p));
  const left = Math.max(0, Math.min(...corners.map((c) => c[0])) - 12);
  const top = Math.max(0, Math.min(...corners.map((c) => c[1])) - 12);
  const right = Math.min(rect.width, Math.max(...corners.map((c) => c[0])) + 12);
  const bottom = Math.min(rect.height, Math.max(...corners.map((c) => c[1])) + 12);
  return { x: rect.left + left, y: rect.top + top, width: right - left, height: bottom - top };
}"""


@pytest.mark.parametrize("name", WORKFLOW_FILES)
def test_workflow_opens_with_every_node_in_view(frontend, name, tmp_path):
    workflow = json.loads((WORKFLOWS / name).read_text())
    frontend.load(workflow)
    assert frontend.js(IN_VIEW) == []
    thumbnail = tmp_path / "thumbnail.jpg"
    frontend.page.screenshot(path=str(thumbnail), type="jpeg", quality=90, clip=frontend.js(GRAPH_BOX))
    from PIL import Image

    with Image.open(thumbnail) as image:  # the template browser shows thumbnails about 300 px wide
        image.thumbnail((640, 640), Image.LANCZOS)
        image.convert("RGB").save(thumbnail, quality=80)
    copy_if_asked(thumbnail, WORKFLOWS / name.replace(".json", ".jpg"))


CHECK_NODES = """(app) => app.graph.nodes.map((n) => ({
  name: `${n.type} #${n.id}`, known: !n.has_errors && (!!n.constructor.nodeData || !!n.isVirtualNode),
  invalid: (n.widgets ?? []).filter((w) => w.name !== "dd_schedule").flatMap((w) => {
    const o = w.options ?? {};
    if (w.type === "combo" && Array.isArray(o.values) && !o.values.includes(w.value)) return [`${w.name}=${w.value}`];
    if (w.type === "number" && (w.value < o.min || w.value > o.max)) return [`${w.name}=${w.value}`];
    return [];
  }),
}))"""

QUEUE = """async (app) => {
  for (const node of app.graph.nodes.filter((n) => n.type === "EmptyLatentImage")) {
    for (const name of ["width", "height"]) node.widgets.find((w) => w.name === name).value = 64;  // 8x8 latents
  }
  const prompt = await app.graphToPrompt();
  const api = window.comfyAPI.api.api;
  try {
    return await api.queuePrompt(0, prompt);
  } catch (err) {
    return { error: JSON.stringify(err.response ?? String(err)) };
  }
}"""


@pytest.mark.parametrize("name", WORKFLOW_FILES)
def test_workflow_loads_with_known_nodes_and_valid_widgets_and_runs_to_save_image(frontend, comfy_server, name):
    workflow = json.loads((WORKFLOWS / name).read_text())
    frontend.load(workflow)
    nodes = frontend.js(CHECK_NODES)
    assert [n["name"] for n in nodes if not n["known"]] == []
    assert {n["name"]: n["invalid"] for n in nodes if n["invalid"]} == {}

    queued = frontend.js(QUEUE)
    assert "error" not in queued and queued["node_errors"] == {}, queued
    deadline, entry = time.monotonic() + RUN_S, None
    while time.monotonic() < deadline:
        entry = get_json(f"{comfy_server['url']}/history/{queued['prompt_id']}").get(queued["prompt_id"])
        if entry and entry["status"]["completed"] or entry and entry["status"]["status_str"] == "error":
            break
        time.sleep(1)
    assert entry and entry["status"]["status_str"] == "success", (
        entry["status"] if entry else f"not finished in {RUN_S} s", comfy_server["log"].read_text()[-3000:])
    savers = {str(n["id"]) for n in workflow["nodes"] if n["type"] == "SaveImage"}
    assert savers and savers <= entry["outputs"].keys()
    for node_id in savers:
        for image in entry["outputs"][node_id]["images"]:
            assert (comfy_server["path"] / "output" / image["subfolder"] / image["filename"]).is_file()
    assert not frontend.our_errors()
