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
