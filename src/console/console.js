// The console's one script: live regions over server-sent events, the
// actions (same-origin fetch POSTs; the session cookie goes along), and the
// manifest drop. Hand-written, no dependencies, no build step.
"use strict";

(function () {
  const $ = (sel, root) => (root || document).querySelector(sel);
  const $$ = (sel, root) => Array.from((root || document).querySelectorAll(sel));

  function toast(text, bad) {
    const t = $("#toast");
    if (!t) return;
    t.textContent = text;
    t.className = bad ? "show bad" : "show";
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => { t.className = ""; }, 6000);
  }

  // ---- live regions ----
  const shown = new Map();
  function live() {
    const mark = $("#live");
    const say = (state, text) => { if (mark) { mark.dataset.state = state; mark.textContent = text; } };
    let source = null;
    // A page left (or kept in the back-forward cache), or a tab out of
    // sight, gives its stream up: a browser holds about six connections to
    // one host, and streams nobody looks at would leave none for the pages
    // in view. Back in view, the first event brings every region up to date.
    const close = () => { if (source) { source.close(); source = null; } };
    window.addEventListener("pagehide", close);
    window.addEventListener("pageshow", (ev) => { if (ev.persisted && !source && !document.hidden) open(); });
    document.addEventListener("visibilitychange", () => { if (document.hidden) close(); else if (!source) open(); });
    if (!document.hidden) open();

    function open() {
      source = new EventSource("/console/live");
      source.onopen = () => say("live", "live");
      source.onerror = () => say("down", "reconnecting…");
      source.onmessage = (ev) => {
        let msg;
        try { msg = JSON.parse(ev.data); } catch (_) { return; }
        const regions = msg.regions || {};
        $$("[data-region]").forEach((el) => {
          const html = regions[el.dataset.region];
          if (html === undefined || shown.get(el.dataset.region) === html) return;
          shown.set(el.dataset.region, html);
          el.innerHTML = html;
        });
        say("live", "live");
      };
    }
  }

  // ---- actions ----
  async function post(url, body) {
    const init = { method: "POST", credentials: "same-origin", headers: {} };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let resp;
    try { resp = await fetch(url, init); } catch (e) { return { ok: false, text: "the daemon did not answer: " + e }; }
    const text = await resp.text();
    if (resp.status === 401) return { ok: false, text: "not allowed: this browser has no console session (run `infinitetalk-batch console` and open the link it prints)" };
    if (resp.status === 403) return { ok: false, text: "refused: " + text };
    if (!resp.ok) return { ok: false, text: "failed (" + resp.status + "): " + text };
    let json = null;
    try { json = JSON.parse(text); } catch (_) { /* not JSON */ }
    return { ok: true, json: json, text: text };
  }

  function retryCost(panel) {
    const perRow = parseFloat(panel.dataset.perRow || "0");
    const boxes = $$("input[name=code]", panel).filter((b) => b.checked);
    const rows = boxes.reduce((n, b) => n + parseInt(b.dataset.rows || "0", 10), 0);
    const out = $("#retry-cost", panel);
    if (out) out.textContent = rows + " row(s), at least $" + (rows * perRow).toFixed(2) + " (each a new task)";
    return { rows: rows, codes: boxes.map((b) => b.value) };
  }

  // Closes the cancel confirmation without cancelling; the focus goes back
  // to the button that opened it.
  function keep(confirmBox) {
    confirmBox.hidden = true;
    const ask = $("button[data-action=cancel-ask]");
    if (ask) ask.focus();
  }

  function actions() {
    const panel = $("section.actions");
    if (!panel) return;
    const batch = encodeURIComponent(panel.dataset.batch);
    const base = "/batches/" + batch;
    retryCost(panel);
    panel.addEventListener("change", () => retryCost(panel));
    // Escape answers "No", as in a dialog; the focus goes back where it was.
    panel.addEventListener("keydown", (ev) => {
      const confirmBox = $("#cancel-confirm");
      if (ev.key === "Escape" && confirmBox && !confirmBox.hidden) keep(confirmBox);
    });
    panel.addEventListener("click", async (ev) => {
      const btn = ev.target.closest("button[data-action]");
      if (!btn) return;
      const action = btn.dataset.action;
      const confirmBox = $("#cancel-confirm");
      if (action === "cancel-ask") { confirmBox.hidden = false; $("button[data-action=cancel-no]", confirmBox).focus(); return; }
      if (action === "cancel-no") { keep(confirmBox); return; }
      let result;
      btn.disabled = true;
      try {
        if (action === "pause" || action === "resume") result = await post(base + "/" + action);
        else if (action === "priority") result = await post(base + "/priority", { priority: $("#priority").value });
        else if (action === "retry") {
          const pick = retryCost(panel);
          if (pick.rows === 0) { toast("choose at least one fail code", true); return; }
          result = await post(base + "/retry", { codes: pick.codes });
        } else if (action === "cancel") result = await post(base + "/cancel");
        else return;
      } finally { btn.disabled = false; }
      if (!result.ok) { toast(result.text, true); return; }
      const j = result.json || {};
      if (action === "retry") { toast("queued again: " + j.requeued + " row(s)"); setTimeout(() => location.reload(), 800); }
      else if (action === "cancel") { toast("cancelled: " + j.cancelled + " row(s); " + j.still_running + " still running"); setTimeout(() => location.reload(), 800); }
      else toast(action + ": done");
    });
  }

  // ---- manifest drop ----
  function el(tag, text, cls) { const e = document.createElement(tag); if (text) e.textContent = text; if (cls) e.className = cls; return e; }

  async function dropFile(file) {
    const out = $("#drop-result");
    out.replaceChildren(el("p", "checking " + file.name + "…"));
    let resp;
    try {
      resp = await fetch("/console/drop?name=" + encodeURIComponent(file.name), { method: "POST", credentials: "same-origin", headers: { "Content-Type": "text/csv" }, body: file });
    } catch (e) { out.replaceChildren(el("p", "the daemon did not answer: " + e, "bad")); return; }
    const text = await resp.text();
    if (!resp.ok) {
      const msg = resp.status === 401 ? "not allowed: this browser has no console session (open the link `infinitetalk-batch console` prints)" : "refused (" + resp.status + "): " + text;
      out.replaceChildren(el("p", msg, "bad"));
      return;
    }
    const r = JSON.parse(text);
    if (r.problems.length) {
      const list = el("ol", null, "errors");
      r.problems.forEach((p) => { const li = el("li"); li.appendChild(el("code", p)); list.appendChild(li); });
      out.replaceChildren(el("p", r.file + ": " + r.problems.length + " problem(s); nothing would be submitted.", "bad"), list);
      return;
    }
    const parts = [el("p", r.file + ": valid, " + r.rows + " row(s), estimated cost $" + r.cost_usd.toFixed(2) + (r.probed ? " (audio lengths probed)" : " (at least: 5 billed seconds a row)"), "ok")];
    if (r.duplicate_of) parts.push(el("p", "These exact bytes were accepted before as batch " + r.duplicate_of + ": accepting would be refused as a duplicate.", "bad"));
    const btn = el("button", "Accept and queue " + r.rows + " row(s)");
    btn.type = "button";
    btn.id = "drop-accept";
    btn.addEventListener("click", async () => {
      btn.disabled = true;
      const res = await post("/console/drop/" + encodeURIComponent(r.token) + "/accept");
      if (!res.ok) { out.appendChild(el("p", res.text, "bad")); return; }
      const a = res.json;
      if (a.batch) {
        const p = el("p", "Accepted as batch ", "ok");
        const link = el("a", a.batch);
        link.href = "/batches/" + encodeURIComponent(a.batch);
        p.appendChild(link);
        out.replaceChildren(p);
      } else {
        const list = el("ol", null, "errors");
        a.problems.forEach((p) => { const li = el("li"); li.appendChild(el("code", p)); list.appendChild(li); });
        out.replaceChildren(el("p", "Rejected:", "bad"), list);
      }
    });
    parts.push(btn);
    out.replaceChildren(...parts);
    btn.focus();
  }

  function drop() {
    const zone = $("#dropzone");
    const input = $("#manifest-file");
    if (!zone || !input) return;
    input.addEventListener("change", () => { if (input.files.length) dropFile(input.files[0]); input.value = ""; });
    zone.addEventListener("dragover", (ev) => { ev.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (ev) => {
      ev.preventDefault();
      zone.classList.remove("over");
      if (ev.dataTransfer.files.length) dropFile(ev.dataTransfer.files[0]);
    });
  }

  document.addEventListener("DOMContentLoaded", () => { live(); actions(); drop(); });
})();
