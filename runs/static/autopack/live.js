// The dashboard's one tick (templates/dashboard/_live.html) swaps every panel in place. Two
// things a person is doing must survive a swap: a <details> they opened stays open, and a
// panel holding the control they are using (a focused select or field) waits for the next
// tick instead of being replaced under their finger.
(function () {
  "use strict";
  var opened = new WeakMap();
  function usingControlIn(panel) {
    var el = document.activeElement;
    return el && el !== document.body && panel.contains(el) &&
      /^(SELECT|INPUT|TEXTAREA)$/.test(el.tagName);
  }
  document.addEventListener("htmx:oobBeforeSwap", function (evt) {
    var panel = evt.detail.target;
    if (!panel) return;
    if (usingControlIn(panel)) { evt.preventDefault(); return; }
    var ids = [];
    panel.querySelectorAll("details[open][id]").forEach(function (d) { ids.push(d.id); });
    if (panel.matches("details[open][id]")) ids.push(panel.id);
    opened.set(evt.detail, ids);
  });
  document.addEventListener("htmx:oobAfterSwap", function (evt) {
    (opened.get(evt.detail) || []).forEach(function (id) {
      var d = document.getElementById(id);
      if (d) d.open = true;
    });
  });
})();
