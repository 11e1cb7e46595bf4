/*
 * avatalk embed: a talking avatar on any page (a virtual tutor, a help desk).
 *
 *   <script src="https://HOST/embed.js" data-avatar="tutor" data-position="bottom-right"
 *           data-size="320" data-greeting="true" async></script>
 *
 * Adds a floating launcher button; a click opens the call page of HOST in an iframe
 * (HOST/?embed=1&autostart=1&avatar=...). JS API: window.Avatalk.open() / .close() /
 * .toggle() / .isOpen(). All options: docs/web-client.md.
 */
(function () {
  "use strict";
  if (window.Avatalk && window.Avatalk.version) return; // loaded twice: keep the first

  var script =
    document.currentScript ||
    (function () {
      var all = document.querySelectorAll("script[src]");
      for (var i = all.length - 1; i >= 0; i--) if (/\/embed\.js(\?|#|$)/.test(all[i].src)) return all[i];
      return null;
    })();
  var data = (script && script.dataset) || {};

  function bool(value, fallback) {
    if (value === undefined || value === null || value === "") return fallback;
    return !/^(0|false|no|off)$/i.test(String(value));
  }

  var base = data.host
    ? new URL(data.host.replace(/\/*$/, "/"), location.href)
    : new URL("./", script ? script.src : location.href);
  var positions = ["bottom-right", "bottom-left", "top-right", "top-left"];
  var defaults = {
    avatar: data.avatar || "",
    position: positions.indexOf(data.position) >= 0 ? data.position : "bottom-right",
    size: Math.max(240, Math.min(720, parseInt(data.size, 10) || 320)),
    greeting: bool(data.greeting, true),
    label: data.label || "",
    color: data.color || "#6d7cff",
    persona: data.persona || "",
    aec: bool(data.aec, true),
    open: bool(data.open, false),
    // A session token for servers with API keys: data-token, or ?token= on the script's
    // URL; or data-token-url, the site's own endpoint answering {"token": "..."}, asked
    // for a fresh token each time the call opens (tokens live a few minutes).
    token: data.token || (script && script.src ? new URL(script.src).searchParams.get("token") : "") || "",
    tokenUrl: data.tokenUrl || "",
  };

  var CSS =
    ":host{all:initial}" +
    "*{box-sizing:border-box}" +
    ".avatalk-launcher{position:fixed;z-index:2147483000;width:60px;height:60px;border-radius:50%;border:0;cursor:pointer;" +
    "background:var(--avatalk-color);color:#fff;display:grid;place-items:center;padding:0;" +
    "box-shadow:0 10px 30px rgba(15,20,40,.35),0 2px 6px rgba(15,20,40,.25);transition:transform .15s ease,box-shadow .2s ease}" +
    ".avatalk-launcher:hover{transform:scale(1.06);box-shadow:0 14px 36px rgba(15,20,40,.4),0 2px 6px rgba(15,20,40,.25)}" +
    ".avatalk-launcher:focus-visible{outline:3px solid #fff;outline-offset:3px}" +
    ".avatalk-launcher svg{width:30px;height:30px;fill:currentColor;transition:transform .2s ease,opacity .2s ease}" +
    ".avatalk-launcher .x{position:absolute;opacity:0;transform:rotate(-90deg)}" +
    ".avatalk-launcher[aria-expanded=true] .face{opacity:0;transform:rotate(90deg)}" +
    ".avatalk-launcher[aria-expanded=true] .x{opacity:1;transform:none}" +
    ".avatalk-launcher::after{content:'';position:absolute;inset:0;border-radius:50%;box-shadow:0 0 0 0 var(--avatalk-color);" +
    "animation:avatalk-ping 2.6s ease-out 3}" +
    "@keyframes avatalk-ping{0%{box-shadow:0 0 0 0 var(--avatalk-color);opacity:.55}80%,100%{box-shadow:0 0 0 16px var(--avatalk-color);opacity:0}}" +
    ".avatalk-panel{position:fixed;z-index:2147483001;width:var(--avatalk-w);height:var(--avatalk-h);" +
    "max-width:calc(100vw - 32px);max-height:calc(100vh - 120px);border-radius:20px;overflow:hidden;background:#0c0e13;" +
    "box-shadow:0 24px 70px rgba(10,12,24,.45),0 4px 14px rgba(10,12,24,.3);opacity:0;transform:translateY(12px) scale(.98);" +
    "transition:opacity .2s ease,transform .2s ease;pointer-events:none}" +
    ".avatalk-panel.open{opacity:1;transform:none;pointer-events:auto}" +
    ".avatalk-frame{display:block;width:100%;height:100%;border:0;background:#0c0e13}" +
    ".avatalk-close{position:absolute;top:8px;right:8px;width:30px;height:30px;border-radius:50%;border:0;cursor:pointer;" +
    "background:rgba(12,14,19,.6);color:#fff;display:grid;place-items:center;padding:0;backdrop-filter:blur(8px);-webkit-backdrop-filter:blur(8px)}" +
    ".avatalk-close:hover{background:rgba(12,14,19,.85)}" +
    ".avatalk-close:focus-visible{outline:2px solid #fff;outline-offset:2px}" +
    ".avatalk-close svg{width:18px;height:18px;fill:currentColor}" +
    ".bottom-right .avatalk-launcher{right:20px;bottom:20px}.bottom-right .avatalk-panel{right:20px;bottom:92px;transform-origin:bottom right}" +
    ".bottom-left .avatalk-launcher{left:20px;bottom:20px}.bottom-left .avatalk-panel{left:20px;bottom:92px;transform-origin:bottom left}" +
    ".top-right .avatalk-launcher{right:20px;top:20px}.top-right .avatalk-panel{right:20px;top:92px;transform-origin:top right}" +
    ".top-left .avatalk-launcher{left:20px;top:20px}.top-left .avatalk-panel{left:20px;top:92px;transform-origin:top left}" +
    "@media (max-width:520px){.avatalk-panel{left:12px!important;right:12px!important;width:auto;max-width:none}}" +
    "@media (prefers-reduced-motion:reduce){.avatalk-launcher,.avatalk-panel,.avatalk-launcher svg{transition:none}.avatalk-launcher::after{animation:none}}";

  var FACE =
    '<svg class="face" viewBox="0 0 24 24" aria-hidden="true"><path d="M12 2.5c-5.5 0-10 3.9-10 8.7 0 2.6 1.3 4.9 3.4 6.5l-.9 3.8 4.3-2.2c1 .3 2.1.4 3.2.4 5.5 0 10-3.9 10-8.7S17.5 2.5 12 2.5zm-3.6 6.7a1.4 1.4 0 110 2.8 1.4 1.4 0 010-2.8zm7.2 0a1.4 1.4 0 110 2.8 1.4 1.4 0 010-2.8zM12 16.6c-1.9 0-3.5-1-4.3-2.5l1.3-.7c.6 1 1.7 1.7 3 1.7s2.4-.7 3-1.7l1.3.7c-.8 1.5-2.4 2.5-4.3 2.5z"/></svg>';
  var CLOSE =
    '<svg class="x" viewBox="0 0 24 24" aria-hidden="true"><path d="M19 6.41 17.59 5 12 10.59 6.41 5 5 6.41 10.59 12 5 17.59 6.41 19 12 13.41 17.59 19 19 17.59 13.41 12z"/></svg>';

  var host, root, launcher, panel, frame, current, opening = null, listeners = {};

  function emit(type, detail) {
    (listeners[type] || []).slice().forEach(function (fn) {
      try { fn(detail); } catch (e) { console.error(e); }
    });
  }

  function build() {
    if (host) return;
    host = document.createElement("div");
    host.setAttribute("data-avatalk", "");
    root = host.attachShadow ? host.attachShadow({ mode: "open" }) : host;
    var style = document.createElement("style");
    style.textContent = CSS;
    var wrap = document.createElement("div");
    wrap.className = defaults.position;
    wrap.style.setProperty("--avatalk-color", defaults.color);
    launcher = document.createElement("button");
    launcher.type = "button";
    launcher.className = "avatalk-launcher";
    launcher.setAttribute("aria-expanded", "false");
    launcher.setAttribute("aria-haspopup", "dialog");
    var label = defaults.label || "Talk to the assistant";
    launcher.setAttribute("aria-label", label);
    launcher.title = label;
    launcher.innerHTML = FACE + CLOSE;
    launcher.addEventListener("click", function () { api.toggle(); });
    panel = document.createElement("div");
    panel.className = "avatalk-panel";
    panel.setAttribute("role", "dialog");
    panel.setAttribute("aria-label", label);
    panel.id = "avatalk-panel";
    launcher.setAttribute("aria-controls", panel.id);
    wrap.appendChild(launcher);
    wrap.appendChild(panel);
    root.appendChild(style);
    root.appendChild(wrap);
    (document.body || document.documentElement).appendChild(host);
  }

  function pageUrl(opts) {
    var url = new URL(base.href);
    url.searchParams.set("embed", "1");
    url.searchParams.set("autostart", "1");
    if (opts.avatar) url.searchParams.set("avatar", opts.avatar);
    if (!opts.greeting) url.searchParams.set("greeting", "0");
    if (!opts.aec) url.searchParams.set("aec", "0");
    if (opts.persona) url.searchParams.set("persona", typeof opts.persona === "string" ? opts.persona : JSON.stringify(opts.persona));
    if (opts.token) url.searchParams.set("token", opts.token);
    return url.href;
  }

  function onMessage(event) {
    if (!frame || event.source !== frame.contentWindow || event.origin !== base.origin) return;
    var msg = event.data || {};
    if (msg.source !== "avatalk") return;
    emit(msg.type, msg);
    if (msg.type === "hangup") api.close();
  }

  function onKey(event) {
    if (event.key === "Escape" && api.isOpen()) api.close();
  }

  var api = {
    version: "1",
    /** Open the call; ``options`` override the script's data-* (avatar, greeting, persona, size). */
    open: function (options) {
      build();
      var opts = Object.assign({}, defaults, options || {});
      if (opts.tokenUrl && !(options && options.token)) {
        var pending = (opening = {});
        return fetch(opts.tokenUrl, { credentials: "include", headers: { Accept: "application/json" } })
          .then(function (response) {
            return response.ok ? response.json() : Promise.reject(new Error("HTTP " + response.status));
          })
          .then(function (body) { return body && body.token; })
          .catch(function (error) {
            console.error("avatalk: could not get a session token from " + opts.tokenUrl, error);
            return opts.token;
          })
          .then(function (token) {
            if (opening !== pending) return; // closed or reopened meanwhile
            opening = null;
            api.open(Object.assign({}, options || {}, { token: token || "", tokenUrl: "" }));
          });
      }
      opening = null;
      if (frame && current === pageUrl(opts)) return;
      if (frame) api.close();
      current = pageUrl(opts);
      var size = Math.max(240, Math.min(720, parseInt(opts.size, 10) || 320));
      panel.style.setProperty("--avatalk-w", size + "px");
      panel.style.setProperty("--avatalk-h", Math.round(size * 1.4) + "px");
      frame = document.createElement("iframe");
      frame.className = "avatalk-frame";
      frame.title = opts.label || defaults.label || "Video call with the assistant";
      frame.allow = "microphone; autoplay";
      frame.src = current;
      var close = document.createElement("button");
      close.type = "button";
      close.className = "avatalk-close";
      close.setAttribute("aria-label", "Close the call");
      close.innerHTML = CLOSE.replace('class="x" ', "");
      close.addEventListener("click", function () { api.close(); });
      panel.replaceChildren ? panel.replaceChildren(frame, close) : (panel.innerHTML = "", panel.appendChild(frame), panel.appendChild(close));
      // next frame: let the transition run
      requestAnimationFrame(function () { panel.classList.add("open"); });
      launcher.setAttribute("aria-expanded", "true");
      launcher.setAttribute("aria-label", "Close the call");
      window.addEventListener("message", onMessage);
      document.addEventListener("keydown", onKey);
      emit("open", { url: current });
    },
    /** Hang up and remove the call. */
    close: function () {
      opening = null;
      if (!frame) return;
      var old = frame;
      frame = null;
      current = null;
      try {
        old.contentWindow.postMessage({ source: "avatalk-embed", type: "hangup" }, base.origin);
      } catch (e) { /* already gone */ }
      panel.classList.remove("open");
      launcher.setAttribute("aria-expanded", "false");
      launcher.setAttribute("aria-label", defaults.label || "Talk to the assistant");
      window.removeEventListener("message", onMessage);
      document.removeEventListener("keydown", onKey);
      // The page hangs up on the message (and on unload); remove it once that went out.
      var closeButton = old.nextSibling;
      setTimeout(function () {
        if (old.parentNode) old.parentNode.removeChild(old);
        if (closeButton && closeButton.parentNode && !frame) closeButton.parentNode.removeChild(closeButton);
      }, 200);
      launcher.focus();
      emit("close", {});
    },
    toggle: function (options) {
      api.isOpen() ? api.close() : api.open(options);
    },
    isOpen: function () {
      return !!frame || !!opening;
    },
    /** Events: "open", "close", "state" ({state}), "connected", "error" ({message}), "hangup". */
    on: function (type, fn) {
      (listeners[type] = listeners[type] || []).push(fn);
      return function () {
        listeners[type] = (listeners[type] || []).filter(function (f) { return f !== fn; });
      };
    },
  };
  window.Avatalk = api;

  function ready() {
    build();
    if (defaults.open) api.open();
  }
  if (document.body) ready();
  else document.addEventListener("DOMContentLoaded", ready);
})();
