// The dashboard's only script. No framework, nothing from the network.
//  * An element with data-poll="URL" is refreshed every data-every ms with the HTML fragment at URL;
//    polling stops once the fragment contains an element marked data-final (e.g. a finished run).
//  * A form with data-confirm="question" asks before it submits.
"use strict";

function startPolling(panel) {
  const every = Number(panel.dataset.every || 3000);
  const tick = async () => {
    try {
      const response = await fetch(panel.dataset.poll, { headers: { Accept: "text/html" }, credentials: "same-origin" });
      if (response.status === 401) { window.location.reload(); return; }  // signed out: show the sign-in page
      if (response.ok) panel.innerHTML = await response.text();
    } catch (error) {
      // The server restarting or a network blip: keep the last view and try again.
    }
    if (!panel.querySelector("[data-final]")) window.setTimeout(tick, every);
  };
  if (!panel.querySelector("[data-final]")) window.setTimeout(tick, every);
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-poll]").forEach(startPolling);
  document.addEventListener("submit", (event) => {
    const question = event.target.dataset.confirm;
    if (question && !window.confirm(question)) event.preventDefault();
  });
});

// The embedding map: <canvas data-map="URL"> draws the titles of /admin/map.json, coloured by genre, with
// the highlighted ones (history, recommendations, a title and its neighbours) on top; hover shows a title.
const MAP_COLOURS = ["#2563eb", "#f97316", "#16a34a", "#9333ea", "#dc2626", "#0891b2", "#ca8a04", "#db2777", "#9ca3af"];
const MAP_MARKS = { history: "#111827", recommended: "#dc2626", neighbours: "#f97316", focus: "#111827" };

async function drawMap(canvas) {
  const response = await fetch(canvas.dataset.map, { credentials: "same-origin" });
  if (!response.ok) { canvas.replaceWith(Object.assign(document.createElement("p"), { className: "empty", textContent: "No embedding map for this version." })); return; }
  const data = await response.json();
  const ctx = canvas.getContext("2d");
  const pad = 12;
  const xs = data.points.map((p) => p[0]), ys = data.points.map((p) => p[1]);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const px = (x) => pad + ((x - x0) / ((x1 - x0) || 1)) * (canvas.width - 2 * pad);
  const py = (y) => canvas.height - pad - ((y - y0) / ((y1 - y0) || 1)) * (canvas.height - 2 * pad);
  ctx.globalAlpha = 0.55;
  for (const [x, y, g] of data.points) { ctx.fillStyle = MAP_COLOURS[g % MAP_COLOURS.length]; ctx.fillRect(px(x) - 1.5, py(y) - 1.5, 3, 3); }
  ctx.globalAlpha = 1;
  let marked = 0;
  for (const [name, indices] of Object.entries(data.highlight)) {
    ctx.strokeStyle = ctx.fillStyle = MAP_MARKS[name] || "#111827";
    for (const i of indices) {
      const [x, y] = [px(data.points[i][0]), py(data.points[i][1])];
      ctx.beginPath();
      if (name === "history") ctx.rect(x - 4, y - 4, 8, 8);
      else if (name === "focus") ctx.arc(x, y, 9, 0, 2 * Math.PI);
      else { ctx.moveTo(x, y - 6); ctx.lineTo(x + 6, y); ctx.lineTo(x, y + 6); ctx.lineTo(x - 6, y); ctx.closePath(); }
      ctx.lineWidth = 2; ctx.stroke(); marked += 1;
    }
  }
  const legend = canvas.parentElement.querySelector(".legend");
  if (legend) {
    legend.innerHTML = "";
    data.genres.forEach((g, k) => {
      const item = document.createElement("span");
      const swatch = document.createElement("i");
      swatch.style.background = MAP_COLOURS[k % MAP_COLOURS.length];
      item.append(swatch, document.createTextNode(g));
      legend.append(item);
    });
  }
  const tip = canvas.parentElement.querySelector(".tip");
  canvas.addEventListener("mousemove", (event) => {
    const box = canvas.getBoundingClientRect();
    const mx = (event.clientX - box.left) * (canvas.width / box.width), my = (event.clientY - box.top) * (canvas.height / box.height);
    let best = -1, bestDistance = 64;
    data.points.forEach((p, i) => { const d = (px(p[0]) - mx) ** 2 + (py(p[1]) - my) ** 2; if (d < bestDistance) { bestDistance = d; best = i; } });
    if (!tip) return;
    tip.hidden = best < 0;
    if (best >= 0) { tip.textContent = data.points[best][3]; tip.style.left = `${event.offsetX + 12}px`; tip.style.top = `${event.offsetY + 12}px`; }
  });
  const first = Object.values(data.highlight).flat()[0] ?? 0;  // where a test (or a curious operator) can point
  canvas.dataset.firstX = px(data.points[first][0]).toFixed(1);
  canvas.dataset.firstY = py(data.points[first][1]).toFixed(1);
  canvas.dataset.drawn = String(data.points.length);
  canvas.dataset.marked = String(marked);
}

document.addEventListener("DOMContentLoaded", () => document.querySelectorAll("canvas[data-map]").forEach(drawMap));
