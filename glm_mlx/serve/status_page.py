"""`GET /`: a small status page for a person (the model, memory, running and queued requests, the prefix
cache), refreshed live from `GET /status`. Aggregate numbers only: no prompt text is ever shown."""

from __future__ import annotations

import time


def snapshot(front) -> dict:
    worker, cfg = front.worker, front.cfg
    pub = dict(getattr(worker, "published", None) or {})
    prefix = getattr(worker, "prefix", None)
    st = prefix.stats() if prefix is not None else None
    cache = None
    if st is not None:
        lookups = st.get("lookups", 0)
        cache = {"hit_rate": round(st.get("hits", 0) / lookups, 3) if lookups else None, "lookups": lookups,
                 "hit_tokens": st.get("hit_tokens", 0), "ram_bytes": st.get("ram_bytes", 0),
                 "ram_limit": st.get("memory_bytes", 0), "disk_bytes": st.get("disk_bytes", 0),
                 "disk_limit": st.get("disk_limit", 0), "ram_blocks_read": st.get("ram_blocks_read", 0),
                 "disk_blocks_read": st.get("disk_blocks_read", 0)}
    return {"model": cfg.model_id, "context": cfg.context, "status": "draining" if front.draining else "ok",
            "memory": {"active": pub.get("active_memory"), "peak": pub.get("peak_memory"),
                       "planned": getattr(front, "planned_bytes", None)},
            "running": pub.get("running", []), "waiting": worker.waiting,
            "max_batch": getattr(getattr(worker, "batch", None), "max_batch", None), "prefix_cache": cache,
            "time": time.time()}


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>glm-mlx serve</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font: 15px/1.4 -apple-system, system-ui, sans-serif; margin: 2rem; color: #1d1d1f; background: #fafafa; }
 h1 { font-size: 1.4rem; margin: 0 0 .2rem; } .sub { color: #666; margin-bottom: 1.5rem; }
 .cards { display: flex; gap: 1rem; flex-wrap: wrap; margin-bottom: 1.5rem; }
 .card { background: #fff; border: 1px solid #ddd; border-radius: 10px; padding: .8rem 1.1rem; min-width: 11rem; }
 .card b { display: block; font-size: 1.5rem; } .card span { color: #666; font-size: .85rem; }
 table { border-collapse: collapse; background: #fff; min-width: 40rem; }
 th, td { border-bottom: 1px solid #eee; padding: .35rem .8rem; text-align: right; } th { color: #666; }
 .bar { height: 8px; background: #eee; border-radius: 4px; overflow: hidden; margin-top: .4rem; }
 .bar i { display: block; height: 100%; background: #0a7cff; }
 #state.ok { color: #1a7f37; } #state.draining, #state.down { color: #c62828; }
</style></head>
<body>
<h1>glm-mlx serve: <span id="model">...</span></h1>
<div class="sub">status <b id="state">...</b> &middot; context <span id="context"></span> tokens &middot;
 updated <span id="updated">never</span></div>
<div class="cards">
 <div class="card"><span>running</span><b id="running">0</b><span id="batch"></span></div>
 <div class="card"><span>waiting</span><b id="waiting">0</b></div>
 <div class="card"><span>memory in use</span><b id="mem">-</b><span id="peak"></span>
  <div class="bar"><i id="membar" style="width:0%"></i></div></div>
 <div class="card"><span>prefix cache hit rate</span><b id="hits">-</b><span id="tiers"></span></div>
</div>
<table><thead><tr><th>#</th><th>prompt tokens</th><th>generated</th><th>tok/s</th><th>time to first token</th>
<th>age</th></tr></thead><tbody id="rows"><tr><td colspan="6">no requests running</td></tr></tbody></table>
<script>
const gb = b => b == null ? "-" : (b / 1e9).toFixed(2) + " GB";
async function refresh() {
  try {
    const s = await (await fetch("/status", {cache: "no-store"})).json();
    document.getElementById("model").textContent = s.model;
    const st = document.getElementById("state"); st.textContent = s.status; st.className = s.status;
    document.getElementById("context").textContent = s.context.toLocaleString();
    document.getElementById("running").textContent = s.running.length;
    document.getElementById("batch").textContent = s.max_batch ? "of " + s.max_batch + " together" : "";
    document.getElementById("waiting").textContent = s.waiting;
    document.getElementById("mem").textContent = gb(s.memory.active);
    const plan = s.memory.planned;
    document.getElementById("peak").textContent = "peak " + gb(s.memory.peak) + (plan ? " of " + gb(plan) + " planned" : "");
    document.getElementById("membar").style.width = plan && s.memory.active ? Math.min(100, 100 * s.memory.active / plan) + "%" : "0%";
    const c = s.prefix_cache;
    document.getElementById("hits").textContent = c && c.hit_rate != null ? (100 * c.hit_rate).toFixed(0) + "%" : "-";
    document.getElementById("tiers").textContent = c ? "RAM " + gb(c.ram_bytes) + " / disk " + gb(c.disk_bytes) : "off";
    const rows = s.running.map((r, i) => `<tr><td>${i + 1}</td><td>${r.prompt_tokens}</td><td>${r.generated}</td>` +
      `<td>${r.tok_s ?? (r.prefilling ? "prefilling" : "-")}</td><td>${r.ttft == null ? "-" : r.ttft.toFixed(2) + " s"}</td>` +
      `<td>${r.age_s} s</td></tr>`);
    document.getElementById("rows").innerHTML = rows.join("") || '<tr><td colspan="6">no requests running</td></tr>';
    document.getElementById("updated").textContent = new Date().toLocaleTimeString();
  } catch (e) {
    const st = document.getElementById("state"); st.textContent = "unreachable"; st.className = "down";
  }
}
refresh(); setInterval(refresh, 1000);
</script></body></html>
"""
