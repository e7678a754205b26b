// Direct Distill: a live plot of the sigmas a scheduler or sampler node will run, drawn from
// GET /direct_distill/sigmas (the backend computes every number with the samplers' own functions).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const ROUTE = "/direct_distill/sigmas";
const PROPERTY = "Direct Distill compare"; // node property: the schedules ticked for comparison
const DEFAULT_COMPARE = ["karras"];
const WIDTH = 300, HEIGHT = 150, PAD = { left: 36, right: 8, top: 8, bottom: 20 };
const COLORS = ["#4e9cf5", "#f5a04e", "#7ccf6a", "#d66ad6", "#e0d04e", "#5ed6c9", "#f06d6d", "#a0a0ff", "#c0c0c0"];
const SVG_NS = "http://www.w3.org/2000/svg";

const value = (node, name) => node.widgets?.find((w) => w.name === name)?.value;

// The value of widget `widgetName` on the node feeding input `inputName`, following pass-through nodes
// (e.g. LoRA loaders between a checkpoint loader and a sampler) that have an input of the same name.
function upstream(node, inputName, widgetName) {
  for (let depth = 0; node && depth < 32; depth++) {
    const slot = node.findInputSlot?.(inputName);
    if (slot == null || slot < 0) return undefined;
    node = node.getInputNode(slot);
    const found = node?.widgets?.find((w) => w.name === widgetName);
    if (found) return found.value;
  }
  return undefined;
}

// Per node type: the route query for its schedule, and what else the plot marks.
const SOURCES = {
  DirectDistillExpKarrasScheduler: (n) => ({
    query: { scheduler: "exp_karras", steps: value(n, "steps"), p: value(n, "p"), denoise: value(n, "denoise"),
             model: upstream(n, "model", "ckpt_name") },
    label: `exp_karras p=${value(n, "p")}`,
  }),
  KSampler: (n) => ({
    query: { scheduler: value(n, "scheduler"), steps: value(n, "steps"), denoise: value(n, "denoise"),
             sampler: value(n, "sampler_name"), model: upstream(n, "model", "ckpt_name") },
  }),
  KSamplerAdvanced: (n) => ({
    query: { scheduler: value(n, "scheduler"), steps: value(n, "steps"), sampler: value(n, "sampler_name"),
             model: upstream(n, "model", "ckpt_name") },
    range: [value(n, "start_at_step"), value(n, "end_at_step")],
  }),
  BasicScheduler: (n) => ({
    query: { scheduler: value(n, "scheduler"), steps: value(n, "steps"), denoise: value(n, "denoise"),
             model: upstream(n, "model", "ckpt_name") },
  }),
  DirectDistillShortcutKSampler: (n) => ({
    query: { scheduler: value(n, "scheduler"), steps: value(n, "steps"), denoise: value(n, "denoise"),
             sampler: value(n, "sampler_name"), model: upstream(n, "model", "ckpt_name"),
             shortcut: upstream(n, "shortcut", "shortcut_name") },
    handoff: value(n, "handoff_step"),
  }),
  DirectDistillLoadStudent: (n) => ({
    query: { student: value(n, "student_name"), nfe: value(n, "nfe"), preset: value(n, "preset"),
             model: upstream(n, "model", "ckpt_name") },
    label: `student ${value(n, "student_name")}`,
  }),
};

function queryString(query) {
  const params = new URLSearchParams();
  for (const [key, v] of Object.entries(query)) {
    if (v !== undefined && v !== null && v !== "") params.set(key, String(v));
  }
  return params.toString();
}

async function fetchSigmas(query) {
  const qs = queryString(query);
  const response = await api.fetchApi(`${ROUTE}?${qs}`, { cache: "no-store" });
  if (!response.ok) throw new Error((await response.text()).split("\n")[0] || `HTTP ${response.status}`);
  return { ...(await response.json()), query: qs };
}

function svg(tag, attributes = {}, parent = null) {
  const element = document.createElementNS(SVG_NS, tag);
  for (const [key, v] of Object.entries(attributes)) element.setAttribute(key, String(v));
  parent?.appendChild(element);
  return element;
}

class ScheduleOverlay {
  constructor(node, source) {
    this.node = node;
    this.source = source;
    this.key = null;
    this.request = 0;
    this.element = document.createElement("div");
    this.element.className = "dd-schedule-overlay";
    this.element.style.cssText = "display:flex;flex-direction:column;gap:2px;font:10px sans-serif;" +
      "color:var(--descrip-text,#aaa);overflow:hidden;";
    this.plot = svg("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, preserveAspectRatio: "none",
                             "data-dd-plot": "", style: "width:100%;height:140px;display:block" });
    this.status = document.createElement("div");
    this.status.className = "dd-status";
    this.status.style.cssText = "line-height:12px;max-height:24px;overflow:hidden;overflow-wrap:anywhere;";
    this.ticks = document.createElement("div");
    this.ticks.className = "dd-compare";
    this.ticks.style.cssText = "display:flex;flex-wrap:wrap;gap:0 6px;";
    this.element.append(this.plot, this.status, this.ticks);
    node.properties ??= {};
    node.properties[PROPERTY] ??= [...DEFAULT_COMPARE];
    this.widget = node.addDOMWidget("dd_schedule", "dd_schedule_plot", this.element, {
      serialize: false, hideOnZoom: false, getMinHeight: () => 215, getMaxHeight: () => 215,
    });
    this.widget.serialize = false; // neither in the workflow's widgets_values nor in the prompt
  }

  compared() {
    return this.node.properties[PROPERTY] ?? [];
  }

  // Called on every redraw of the node and after any widget change: refetches when the query changed.
  refresh() {
    const spec = this.source(this.node);
    const key = JSON.stringify([spec, this.compared()]);
    if (key === this.key) return;
    this.key = key;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.load(spec), 120);
  }

  async load(spec) {
    const request = ++this.request;
    this.element.dataset.nodeId = this.node.id;
    let main, others, problem = null;
    try {
      try {
        main = await fetchSigmas(spec.query);
      } catch (err) {
        // A checkpoint that cannot be read still leaves a schedule to show, on SD's noise table, with the
        // shortcut's band; a missing shortcut file leaves the schedule alone.
        if (spec.query.model === undefined && spec.query.shortcut === undefined) throw err;
        problem = err.message;
        const fallbacks = [];
        if (spec.query.model !== undefined) fallbacks.push({ model: undefined });
        if (spec.query.shortcut !== undefined) fallbacks.push({ model: undefined, shortcut: undefined });
        for (const [i, drop] of fallbacks.entries()) {
          try {
            main = await fetchSigmas({ ...spec.query, ...drop });
            spec = { ...spec, query: { ...spec.query, ...drop } };
            break;
          } catch (again) {
            if (i === fallbacks.length - 1) throw again;
            if (again.message !== problem) problem = `${problem} · ${again.message}`;
          }
        }
      }
      const base = spec.query.student !== undefined
        ? { steps: main.nfe, model: spec.query.model }
        : { steps: spec.query.steps, denoise: spec.query.denoise, sampler: spec.query.sampler,
            model: spec.query.model };
      // the ExpKarras Scheduler node's own curve is p's: the dropdown's exp_karras (p = 1) may be compared with it
      const selected = spec.query.student !== undefined || spec.query.p !== undefined ? null : spec.query.scheduler;
      const names = this.compared().filter((name) => name !== selected && main.schedulers.includes(name));
      others = await Promise.all(names.map((name) =>
        fetchSigmas({ ...base, scheduler: name })
          .then((r) => ({ ...r, name }), (err) => ({ name, error: err.message }))));
      if (request !== this.request) return;
    } catch (err) {
      if (request !== this.request) return;
      this.element.dataset.error = err.message;
      this.status.textContent = err.message;
      this.status.style.color = "#f06d6d";
      this.plot.replaceChildren();
      return;
    }
    this.draw(spec, main, others);
    this.drawTicks(main.schedulers);
    if (problem) {
      this.element.dataset.error = problem;
      this.status.textContent = problem;
      this.status.style.color = "#f06d6d";
    } else {
      delete this.element.dataset.error;
      this.status.style.color = "";
    }
  }

  draw(spec, main, others) {
    const series = [{ name: spec.label ?? spec.query.scheduler, role: "selected", result: main },
                    ...others.filter((o) => !o.error).map((o) => ({ name: o.name, role: "compare", result: o }))];
    const positive = series.flatMap((s) => s.result.sigmas.filter((v) => v > 0));
    const steps = Math.max(1, ...series.map((s) => s.result.sigmas.length - 1));
    this.plot.replaceChildren();
    if (!positive.length) {
      this.status.textContent = "no steps run (denoise 0)";
      return;
    }
    let top = Math.log(Math.max(...positive)), bottom = Math.log(Math.min(...positive));
    if (top - bottom < 1e-6) { top += 0.5; bottom -= 0.5; }
    const plotW = WIDTH - PAD.left - PAD.right, plotH = HEIGHT - PAD.top - PAD.bottom;
    const x = (i) => PAD.left + (i / steps) * plotW;
    const y = (logSigma) => PAD.top + ((top - logSigma) / (top - bottom)) * plotH;
    Object.assign(this.plot.dataset, { logTop: top, logBottom: bottom, steps, plotTop: PAD.top, plotHeight: plotH,
                                       plotLeft: PAD.left, plotWidth: plotW });

    svg("rect", { x: PAD.left, y: PAD.top, width: plotW, height: plotH, fill: "none", stroke: "#555" }, this.plot);
    for (const [v, anchor] of [[top, PAD.top + 8], [bottom, PAD.top + plotH]]) {
      svg("text", { x: PAD.left - 3, y: anchor, "text-anchor": "end", fill: "currentColor", "font-size": 9 }, this.plot)
        .textContent = Math.exp(v).toPrecision(3);
    }
    svg("text", { x: PAD.left + plotW / 2, y: HEIGHT - 4, "text-anchor": "middle", fill: "currentColor",
                  "font-size": 9 }, this.plot).textContent = `step (0..${steps}); σ on a log scale`;
    if (spec.range) {
      const [start, end] = spec.range.map((v) => Math.max(0, Math.min(steps, v)));
      for (const [a, b] of [[0, start], [end, steps]]) {
        if (b > a) svg("rect", { x: x(a), y: PAD.top, width: x(b) - x(a), height: plotH, fill: "#000", opacity: 0.35,
                                 "data-skipped": `${a},${b}` }, this.plot);
      }
    }
    const band = main.shortcut?.sigma_band;
    if (band) {
      const [high, low] = band.map(Math.log);
      svg("rect", { x: PAD.left, y: y(Math.min(high, top)), width: plotW,
                    height: Math.max(0, y(Math.max(low, bottom)) - y(Math.min(high, top))), fill: "#7ccf6a",
                    opacity: 0.18, "data-band": main.shortcut.t_band.join(",") }, this.plot);
    }
    series.forEach((s, index) => {
      const color = COLORS[index % COLORS.length];
      const points = s.result.sigmas.map((v, i) => [i, v]).filter(([, v]) => v > 0)
        .map(([i, v]) => `${x(i).toFixed(3)},${y(Math.log(v)).toFixed(3)}`);
      svg("polyline", { points: points.join(" "), fill: "none", stroke: color,
                        "stroke-width": s.role === "selected" ? 2.2 : 1.2, "data-scheduler": s.name,
                        "data-role": s.role, "data-query": s.result.query,
                        "data-sigmas": JSON.stringify(s.result.sigmas) }, this.plot);
      const label = svg("text", { x: PAD.left + plotW - 2, y: PAD.top + 10 + 10 * index, "text-anchor": "end",
                                  fill: color, "font-size": 9 }, this.plot);
      label.textContent = s.name;
    });
    if (spec.handoff !== undefined && spec.handoff < main.sigmas.length - 1) {
      svg("line", { x1: x(spec.handoff), x2: x(spec.handoff), y1: PAD.top, y2: PAD.top + plotH, stroke: "#f06d6d",
                    "stroke-dasharray": "3,2", "data-handoff": spec.handoff }, this.plot);
    }
    const failed = others.filter((o) => o.error).map((o) => `${o.name}: ${o.error}`);
    const first = main.sigmas[0], last = main.sigmas[main.sigmas.length - 1];
    const handoff = main.shortcut
      ? ` · hand-off ${spec.handoff} ${main.shortcut.handoff_steps.includes(spec.handoff) ? "in" : "OUTSIDE"} the ` +
        `shortcut's band t ${main.shortcut.t_band.join("–")} ` +
        `(fits: ${main.shortcut.handoff_steps.join(", ") || "none"})`
      : "";
    this.status.textContent = `${main.sigmas.length - 1} steps, σ ${first.toPrecision(4)} → ${last.toPrecision(3)}` +
      `${handoff}${failed.length ? " · " + failed.join("; ") : ""}`;
    this.element.title = `noise table: ${main.model ?? "SD1.5's (no checkpoint upstream)"}`;
  }

  drawTicks(schedulers) {
    const selected = this.node.comfyClass === "DirectDistillExpKarrasScheduler" ? null : value(this.node, "scheduler");
    const wanted = schedulers.filter((name) => name !== selected);
    if (this.ticks.dataset.names === wanted.join(",")) {
      for (const box of this.ticks.querySelectorAll("input")) box.checked = this.compared().includes(box.value);
      return;
    }
    this.ticks.dataset.names = wanted.join(",");
    this.ticks.replaceChildren(...wanted.map((name) => {
      const label = document.createElement("label");
      label.style.cssText = "display:inline-flex;align-items:center;gap:2px;cursor:pointer;";
      const box = document.createElement("input");
      Object.assign(box, { type: "checkbox", value: name, checked: this.compared().includes(name) });
      box.style.margin = "0";
      box.addEventListener("change", () => {
        const ticked = new Set(this.compared());
        box.checked ? ticked.add(name) : ticked.delete(name);
        this.node.properties[PROPERTY] = [...ticked];
        this.refresh();
      });
      label.append(box, name);
      return label;
    }));
  }
}

app.registerExtension({
  name: "DirectDistill.ScheduleOverlay",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const source = SOURCES[nodeData.name];
    if (!source) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = created?.apply(this, arguments);
      this.ddScheduleOverlay = new ScheduleOverlay(this, source);
      setTimeout(() => this.ddScheduleOverlay.refresh()); // after a loaded workflow has set the widgets
      return result;
    };
    const changed = nodeType.prototype.onWidgetChanged;
    nodeType.prototype.onWidgetChanged = function () {
      const result = changed?.apply(this, arguments);
      this.ddScheduleOverlay?.refresh();
      return result;
    };
    // Redraws also catch what no widget of this node reports: a changed upstream loader or link.
    const draw = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function () {
      const result = draw?.apply(this, arguments);
      this.ddScheduleOverlay?.refresh();
      return result;
    };
  },
});
