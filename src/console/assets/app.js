// The gateway console: a page of plain ES modules over the management API, nothing else.
//
// Every value from the API is put in the page as text (textContent, or a text node via
// `h`), never as HTML. The gateway key lives in this tab's sessionStorage and goes out only
// as a bearer header; header values typed into a form are sent once and never shown again.

const KEY = "gateway-console-key";
const state = { config: null, admin: false, manages: false, accounts: [] };

// ---------------------------------------------------------------------------------------
// DOM helpers: elements with attributes and text children; no HTML strings anywhere.

function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "value") el.value = v;
    else if (k === "checked") el.checked = !!v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function main() {
  return document.getElementById("main");
}

function put(nodes) {
  main().replaceChildren(...nodes.flat(Infinity).filter((n) => n !== null && n !== undefined && n !== false));
}

/// A new view: its content, and the focus at its start (for keyboard and screen readers).
function show(...nodes) {
  put(nodes);
  main().focus();
}

function banner(kind, ...text) {
  return h("div", { class: `banner ${kind}`, role: kind === "bad" ? "alert" : "status" }, ...text);
}

let uid = 0;
function field(label, input, hint, name) {
  const id = input.id || `f${++uid}`;
  input.id = id;
  if (name) input.setAttribute("data-field", name);
  const error = h("p", { class: "error", id: `${id}-error`, role: "alert", hidden: true });
  const hintEl = hint ? h("p", { class: "hint", id: `${id}-hint` }, hint) : null;
  input.setAttribute("aria-describedby", [hintEl && hintEl.id, error.id].filter(Boolean).join(" "));
  return h("div", { class: "field", "data-for": name || "" }, h("label", { for: id }, label), input, hintEl, error);
}

function copyButton(text, label) {
  const b = h("button", { type: "button" }, label || "Copy");
  b.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(text());
      b.textContent = "Copied";
    } catch {
      b.textContent = "Select and copy by hand";
    }
    setTimeout(() => (b.textContent = label || "Copy"), 2000);
  });
  return b;
}

// ---------------------------------------------------------------------------------------
// The management API.

function key() {
  return sessionStorage.getItem(KEY);
}

async function api(method, path, body, ifMatch, extra) {
  const headers = { Authorization: `Bearer ${key()}`, ...(extra || {}) };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (ifMatch) headers["If-Match"] = ifMatch;
  const res = await fetch(state.config.management + path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
    credentials: "omit",
  });
  let json = null;
  try {
    json = await res.json();
  } catch {
    json = null;
  }
  if (res.status === 401) {
    signOut("Your key was not accepted. Sign in again.");
    throw new Error("signed out");
  }
  return { status: res.status, json, etag: res.headers.get("ETag") };
}

function message(r) {
  return (r.json && r.json.error && r.json.error.message) || `The gateway answered ${r.status}.`;
}

/// "field: text" from a 400, as the API writes it.
function fieldError(r) {
  const m = /^([A-Za-z_][A-Za-z0-9_.\[\]-]*): (.*)$/s.exec(message(r));
  return m ? { field: m[1], text: m[2] } : null;
}

const seg = encodeURIComponent;

/// The rule of account and endpoint names (the API's): checked before a name goes into a URL,
/// where "." or ".." would change the path.
const NAME_RULE = "must be 1 to 128 of A-Z a-z 0-9 - . _ ~, and not \".\" or \"..\"";
function validName(n) {
  return /^[A-Za-z0-9._~-]{1,128}$/.test(n) && n !== "." && n !== "..";
}

// ---------------------------------------------------------------------------------------
// Navigation.

function nav() {
  const here = location.hash || "#/endpoints";
  const link = (href, text) => h("a", { href, "aria-current": here.startsWith(href) ? "page" : null }, text);
  const items = [link("#/endpoints", "Endpoints")];
  if (state.admin || state.manages) items.push(link("#/new", "Add a Custom Endpoint"));
  items.push(link("#/usage", "Usage"));
  if (state.admin) items.push(link("#/keys", "Keys"), link("#/audit", "Audit log"));
  items.push(h("button", { type: "button", onclick: () => signOut() }, "Sign out"));
  document.getElementById("nav").replaceChildren(...items);
}

function signOut(why) {
  sessionStorage.removeItem(KEY);
  state.admin = false;
  document.getElementById("nav").replaceChildren();
  viewSignIn(why);
}

// One view at a time: a route that starts while another renders waits for it, so the last
// navigation is the one on screen.
let routing = Promise.resolve();
function route() {
  routing = routing.then(render, render);
  return routing;
}

async function render() {
  if (!key()) return viewSignIn();
  nav();
  try {
    const parts = (location.hash || "#/endpoints").slice(2).split("/").map(decodeURIComponent);
    switch (parts[0]) {
      case "new":
        return await viewWizard(null);
      case "edit":
        return await viewWizard({ account: parts[1], endpoint: parts[2] });
      case "snippet":
        return await viewSnippet(parts[1], parts[2], false);
      case "keys":
        return await viewKeys();
      case "audit":
        return await viewAudit(null);
      case "usage":
        return await viewUsage();
      default:
        return await viewEndpoints();
    }
  } catch (e) {
    if (e.message !== "signed out") show(banner("bad", `Something failed: ${e.message}`));
  }
}

// ---------------------------------------------------------------------------------------
// Sign in.

function viewSignIn(why) {
  // Masked text, not a password field: no browser offers to save a gateway key.
  const input = h("input", { type: "text", class: "secret", autocomplete: "off", spellcheck: "false", required: true });
  const form = h(
    "form",
    {
      onsubmit: async (ev) => {
        ev.preventDefault();
        sessionStorage.setItem(KEY, input.value.trim());
        input.value = "";
        try {
          const r = await api("GET", "/accounts");
          if (r.status !== 200) return signOut(message(r));
          await learnRoles(r.json.accounts);
          if (!location.hash.startsWith("#/")) history.replaceState(null, "", "#/endpoints");
          await render();
        } catch (e) {
          if (e.message !== "signed out") signOut(`The gateway could not be reached: ${e.message}`);
        }
      },
    },
    field("Gateway key", input, "Kept in this browser tab only, and sent to the management API as a bearer token."),
    h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Sign in")),
  );
  show(h("h1", {}, "Sign in"), why ? banner("bad", why) : null, form);
}

// ---------------------------------------------------------------------------------------
// Accounts and endpoints.

function subjects(list) {
  return list && list.length ? list.join(", ") : "nobody";
}

function upstream(ep) {
  if (!ep.targets || ep.targets.length <= 1) return h("code", {}, ep.base_url);
  return h(
    "ul",
    {},
    ep.targets.map((t) =>
      h(
        "li",
        {},
        h("code", {}, t.base_url),
        " ",
        h("span", { class: `badge ${t.state}` }, t.state),
        h("span", { class: "muted" }, ` weight ${t.weight}, priority ${t.priority}`),
      ),
    ),
  );
}

/// What the key may do: admin (keys, new accounts), manager of some account (new endpoints).
async function learnRoles(accounts) {
  state.accounts = accounts;
  state.manages = accounts.some((a) => a.your_role === "manager");
  state.admin = (await api("GET", "/keys")).status === 200;
}

async function viewEndpoints(notice) {
  const r = await api("GET", "/accounts");
  if (r.status !== 200) return show(banner("bad", message(r)));
  state.accounts = r.json.accounts;
  state.manages = state.accounts.some((a) => a.your_role === "manager");
  nav();
  const rows = [];
  for (const a of state.accounts) {
    for (const ep of a.endpoints) {
      const manage = ep.your_role === "manager";
      const actions = [h("a", { href: `#/snippet/${seg(a.name)}/${seg(ep.name)}`, class: "button" }, "Usage snippet")];
      if (manage && ep.uses_targets) {
        actions.push(h("span", { class: "muted" }, "A pool: edit it with the management API or the configuration file."));
      } else if (manage) {
        actions.push(h("a", { href: `#/edit/${seg(a.name)}/${seg(ep.name)}`, class: "button" }, "Edit"));
        actions.push(h("button", { type: "button", class: "danger", onclick: () => confirmDelete(a.name, ep.name) }, "Delete"));
      }
      rows.push(
        h(
          "tr",
          { "data-endpoint": `${a.name}/${ep.name}` },
          h("td", { "data-label": "Endpoint" }, h("strong", {}, a.name), " / ", ep.name),
          h("td", { "data-label": "Upstream" }, upstream(ep)),
          h("td", { "data-label": "Managed by" }, subjects(ep.effective_access.managers)),
          h("td", { "data-label": "Used by" }, subjects(ep.effective_access.users)),
          h("td", { "data-label": "Your role" }, ep.your_role || "none"),
          h("td", { "data-label": "Actions" }, h("div", { class: "row-actions" }, actions)),
        ),
      );
    }
  }
  const table = rows.length
    ? h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          { class: "cards" },
          h("thead", {}, h("tr", {}, h("th", {}, "Account / endpoint"), h("th", {}, "Upstream"), h("th", {}, "Managed by"), h("th", {}, "Used by"), h("th", {}, "Your role"), h("th", {}, "Actions"))),
          h("tbody", {}, rows),
        ),
      )
    : h("p", {}, "No endpoint you may view yet.");
  show(h("h1", {}, "Endpoints"), notice || null, h("div", { id: "confirm" }), table);
}

function confirmDelete(account, endpoint) {
  const box = document.getElementById("confirm");
  box.replaceChildren(
    banner(
      "warn",
      `Delete ${account}/${endpoint}? Callers of it get 404 from now on.`,
      h(
        "div",
        { class: "actions" },
        h("button", { type: "button", class: "danger", onclick: () => doDelete(account, endpoint) }, "Delete it"),
        h("button", { type: "button", onclick: () => box.replaceChildren() }, "Cancel"),
      ),
    ),
  );
  box.querySelectorAll("button")[1].focus();
}

async function doDelete(account, endpoint) {
  const path = `/accounts/${seg(account)}/endpoints/${seg(endpoint)}`;
  const current = await api("GET", path);
  if (current.status !== 200) return viewEndpoints(banner("bad", message(current)));
  const r = await api("DELETE", path, undefined, current.etag);
  if (r.status === 200) return viewEndpoints(banner("ok", `Deleted ${account}/${endpoint}.`));
  if (r.status === 409) return viewEndpoints(banner("bad", "Someone else changed this endpoint meanwhile; look at it again before deleting it."));
  return viewEndpoints(banner("bad", message(r)));
}

// ---------------------------------------------------------------------------------------
// The Custom Endpoint wizard: account, endpoint, access control; saved only at the end.

function pairRows(container, rows, prefix, existing) {
  container.replaceChildren();
  rows.forEach((row, i) => {
    const name = h("input", { type: "text", value: row.name, autocomplete: "off", "aria-label": `Header ${i + 1} name` });
    const value = h("input", {
      type: "text",
      class: "secret",
      value: row.value || "",
      autocomplete: "off",
      spellcheck: "false",
      placeholder: existing && row.existing ? "(unchanged: type to replace)" : "",
      "aria-label": `Header ${i + 1} value`,
    });
    name.addEventListener("input", () => (row.name = name.value));
    value.addEventListener("input", () => (row.value = value.value));
    const remove = h("button", { type: "button", onclick: () => { rows.splice(i, 1); row.removed = true; pairRows(container, rows, prefix, existing); } }, "Remove");
    container.append(
      h(
        "div",
        { class: "pair" },
        field("Header name", name, null, `${prefix}.${(row.name || "").toLowerCase()}`),
        field("Value (write-only)", value),
        remove,
      ),
    );
  });
}

function grantsEditor(role, grants) {
  const list = grants || [];
  const everyone = h("input", { type: "checkbox", checked: list.includes("everyone") });
  const teams = h("input", { type: "text", value: list.filter((s) => s.startsWith("team:")).map((s) => s.slice(5)).join(", ") });
  const users = h("input", { type: "text", value: list.filter((s) => s.startsWith("user:")).map((s) => s.slice(5)).join(", ") });
  const get = () => {
    const out = everyone.checked ? ["everyone"] : [];
    for (const t of teams.value.split(",").map((s) => s.trim()).filter(Boolean)) out.push(`team:${t}`);
    for (const u of users.value.split(",").map((s) => s.trim()).filter(Boolean)) out.push(`user:${u}`);
    return out;
  };
  const labels = { managers: "Managers (edit, update, delete; also use)", users: "Users (call and view)", viewers: "Viewers (view only)" };
  const set = h(
    "fieldset",
    { "data-field": `access.${role}` },
    h("legend", {}, labels[role]),
    h("label", { class: "checkbox" }, everyone, "Everyone"),
    field("Teams (comma-separated)", teams, null, `access.${role}.teams`),
    field("Users (comma-separated subjects)", users, null, `access.${role}.users`),
    h("p", { class: "error", hidden: true }),
  );
  return { el: set, get };
}

async function viewWizard(editing) {
  const accounts = await api("GET", "/accounts");
  if (accounts.status !== 200) return show(banner("bad", message(accounts)));
  const managed = accounts.json.accounts.filter((a) => a.your_role === "manager").map((a) => a.name);
  const w = {
    step: 1,
    accountMode: managed.length ? "existing" : "new",
    account: managed[0] || "",
    newAccount: "",
    accountHeaders: [],
    name: "",
    base_url: "",
    headers: [],
    timeouts: { connect_ms: "", first_byte_ms: "", idle_ms: "" },
    inherit: true,
    access: { managers: [], users: [], viewers: [] },
    etag: null,
  };
  let notice = null;
  const load = async () => {
    const r = await api("GET", `/accounts/${seg(editing.account)}/endpoints/${seg(editing.endpoint)}`);
    if (r.status !== 200) return false;
    const ep = r.json;
    Object.assign(w, {
      accountMode: "existing",
      account: ep.account,
      name: ep.name,
      base_url: ep.base_url,
      headers: ep.header_names.map((n) => ({ name: n, value: "", existing: true })),
      timeouts: { connect_ms: ep.timeouts.connect_ms ?? "", first_byte_ms: ep.timeouts.first_byte_ms ?? "", idle_ms: ep.timeouts.idle_ms ?? "" },
      inherit: !ep.access,
      access: ep.access || { managers: [], users: [], viewers: [] },
      etag: r.etag,
      pool: ep.uses_targets,
      // Sent back as they are: the console does not edit them, and a PUT replaces.
      keep: { retry: ep.retry, eject: ep.eject, health: ep.health || undefined },
    });
    w.headersOriginal = ep.header_names.join(",");
    return true;
  };
  if (editing && !(await load())) return show(banner("bad", "No such endpoint, or you may not view it."));
  if (editing && w.pool) {
    return show(h("h1", {}, `Edit ${editing.account}/${editing.endpoint}`), banner("warn", "This endpoint is a pool of targets. The console does not edit pools yet: use the management API (PUT …/endpoints/{name} with targets) or the configuration file."));
  }

  const steps = ["Configure account", "Endpoint", "Access control"];
  const render = (errors) => {
    const list = h("ol", { class: "steps" }, steps.map((s, i) => h("li", { "aria-current": w.step === i + 1 ? "step" : null }, `${i + 1}. ${s}`)));
    const body = [];
    if (w.step === 1) {
      if (editing) {
        body.push(h("p", {}, "Account: ", h("strong", {}, w.account)));
      } else {
        const existing = h("input", { type: "radio", name: "mode", value: "existing", checked: w.accountMode === "existing", disabled: !managed.length });
        const fresh = h("input", { type: "radio", name: "mode", value: "new", checked: w.accountMode === "new", disabled: !state.admin });
        existing.addEventListener("change", () => { w.accountMode = "existing"; render(); });
        fresh.addEventListener("change", () => { w.accountMode = "new"; render(); });
        body.push(h("fieldset", {}, h("legend", {}, "Provider account"), h("label", { class: "checkbox" }, existing, "An account I manage"), h("label", { class: "checkbox" }, fresh, "A new account (gateway admins)")));
        if (w.accountMode === "existing") {
          const sel = h("select", {}, managed.map((n) => h("option", { value: n, selected: n === w.account }, n)));
          w.account = sel.value;
          sel.addEventListener("change", () => (w.account = sel.value));
          body.push(field("Account", sel, null, "account"));
        } else {
          const name = h("input", { type: "text", value: w.newAccount, autocomplete: "off" });
          name.addEventListener("input", () => (w.newAccount = name.value));
          body.push(field("Account name", name, "The first path segment after /proxy-api: 1 to 128 of A-Z a-z 0-9 - . _ ~", "account.name"));
          const rows = h("div", { class: "pairs" });
          pairRows(rows, w.accountHeaders, "account.header_auth", false);
          body.push(
            h("fieldset", { "data-field": "account.header_auth" }, h("legend", {}, "Header auth (sent to every endpoint of the account)"), rows,
              h("button", { type: "button", onclick: () => { w.accountHeaders.push({ name: "", value: "" }); render(); } }, "Add a header"),
              h("p", { class: "error", role: "alert", hidden: true })),
          );
        }
      }
    } else if (w.step === 2) {
      const name = h("input", { type: "text", value: w.name, autocomplete: "off", readonly: !!editing });
      name.addEventListener("input", () => (w.name = name.value));
      body.push(field("Endpoint name", name, "The path segment after the account: …/proxy-api/ACCOUNT/NAME/chat/completions", "name"));
      const base = h("input", { type: "url", value: w.base_url, autocomplete: "off", placeholder: "https://api.inference.wandb.ai/v1" });
      base.addEventListener("input", () => (w.base_url = base.value));
      body.push(field("Base URL", base, "Up to the API version and no further, without a trailing slash: https://api.inference.wandb.ai/v1, not …/v1/. The caller's path (/chat/completions) is appended to it.", "base_url"));
      const rows = h("div", { class: "pairs" });
      pairRows(rows, w.headers, "headers", !!editing);
      body.push(
        h("fieldset", { "data-field": "headers" }, h("legend", {}, "Custom headers (for example Authorization: Bearer <provider key>)"),
          editing ? h("p", { class: "hint" }, "Values are never shown again. Leave them all unchanged to keep the current headers; to change any, type every value again.") : null,
          rows,
          h("button", { type: "button", onclick: () => { w.headers.push({ name: "", value: "" }); render(); } }, "Add a header"),
          h("p", { class: "error", role: "alert", hidden: true })),
      );
      const t = (k, label) => {
        const input = h("input", { type: "number", min: "1", value: w.timeouts[k] });
        input.addEventListener("input", () => (w.timeouts[k] = input.value));
        return field(label, input, null, `timeouts.${k}`);
      };
      body.push(h("fieldset", {}, h("legend", {}, "Timeouts in milliseconds (empty: the gateway's default)"), t("connect_ms", "Connect"), t("first_byte_ms", "First byte"), t("idle_ms", "Idle between frames")));
      body.push(h("p", { class: "hint" }, "TLS settings (extra CAs, a client certificate) are files on the gateway's machine: set them in its configuration file."));
    } else {
      const inherit = h("input", { type: "checkbox", checked: w.inherit });
      inherit.addEventListener("change", () => { collect(); w.inherit = inherit.checked; render(); });
      body.push(h("label", { class: "checkbox" }, inherit, "Use the account's grants"));
      if (!w.inherit) {
        w.editors = ["managers", "users", "viewers"].map((r) => [r, grantsEditor(r, w.access[r])]);
        body.push(w.editors.map(([, e]) => e.el));
      }
    }
    const back = w.step > 1 ? h("button", { type: "button", onclick: () => { collect(); w.step--; render(); } }, "Back") : null;
    const next = w.step < 3
      ? h("button", { type: "button", class: "primary", onclick: () => { collect(); w.step++; render(); } }, "Next")
      : h("button", { type: "button", class: "primary", onclick: save }, editing ? "Save changes" : "Create endpoint");
    // A re-render of the same view keeps the focus where the user is (a new step moves it
    // to the step's first field).
    const active = document.activeElement && document.activeElement.closest("main") ? document.activeElement.getAttribute("data-field") || document.activeElement.textContent : null;
    put([
      h("h1", {}, editing ? `Edit ${editing.account}/${editing.endpoint}` : "Add a Custom Endpoint"),
      list,
      notice,
      errors && errors.general ? banner("bad", errors.general) : null,
      h("form", { onsubmit: (e) => e.preventDefault() }, body, h("div", { class: "actions" }, back, next)),
    ]);
    if (errors && errors.field) return markError(errors.field, errors.text);
    const again = active && [...main().querySelectorAll("[data-field], button")].find((el) => el.getAttribute("data-field") === active || el.textContent === active);
    (again || main().querySelector("input, select") || main()).focus();
  };

  const collect = () => {
    if (w.step === 3 && !w.inherit && w.editors) {
      for (const [r, e] of w.editors) w.access[r] = e.get();
    }
  };

  const stepOf = (f) => (f.startsWith("account") || f.startsWith("header_auth") ? 1 : f.startsWith("access") || f.startsWith("endpoint.access") ? 3 : 2);

  const fail = (r, accountWrite) => {
    const fe = r.status === 400 || r.status === 412 ? fieldError(r) : null;
    if (!fe) return render({ general: message(r) });
    let f = fe.field;
    if (accountWrite) {
      if (f === "name") f = "account.name";
      else if (f.startsWith("header_auth")) f = `account.${f}`;
      else if (f.startsWith("endpoint.")) f = f.slice("endpoint.".length);
    }
    w.step = stepOf(f);
    render({ field: f, text: fe.text });
  };

  const save = async () => {
    collect();
    notice = null;
    const newAccount = !editing && w.accountMode === "new";
    if (newAccount && !validName(w.newAccount.trim())) {
      w.step = 1;
      return render({ field: "account.name", text: NAME_RULE });
    }
    if (!validName(w.name.trim())) {
      w.step = 2;
      return render({ field: "name", text: NAME_RULE });
    }
    const headersChanged = !editing || w.headers.some((x) => x.value !== "" || !x.existing) || w.headers.map((x) => x.name).join(",") !== w.headersOriginal;
    if (editing && headersChanged && w.headers.some((x) => x.existing && x.value === "")) {
      w.step = 2;
      return render({ field: "headers", text: "To change the headers, type every value again (they are never shown)." });
    }
    const headers = {};
    for (const x of w.headers) if (x.name) headers[x.name] = x.value;
    const timeouts = {};
    for (const [k, v] of Object.entries(w.timeouts)) if (v !== "" && v !== null) timeouts[k] = Number(v);
    const endpoint = { base_url: w.base_url.trim(), timeouts };
    if (headersChanged) endpoint.headers = headers;
    if (!w.inherit) endpoint.access = w.access;
    if (editing) Object.assign(endpoint, w.keep);
    // Creating never replaces what someone else made meanwhile (If-None-Match: *).
    const createOnly = editing ? undefined : { "If-None-Match": "*" };
    if (newAccount) {
      w.account = w.newAccount.trim();
      const header_auth = {};
      for (const x of w.accountHeaders) if (x.name) header_auth[x.name] = x.value;
      const r = await api("PUT", `/accounts/${seg(w.account)}`, { header_auth, endpoint: { name: w.name.trim(), ...endpoint } }, null, createOnly);
      if (r.status !== 201 && r.status !== 200) return fail(r, true);
    } else {
      const r = await api("PUT", `/accounts/${seg(w.account)}/endpoints/${seg(w.name.trim())}`, endpoint, editing ? w.etag : null, createOnly);
      if (r.status === 409 && editing) {
        await load();
        w.step = 2;
        notice = banner("bad", "Someone else changed this endpoint since you opened it. The form now shows the current version; make your change again.");
        return render();
      }
      if (r.status !== 200 && r.status !== 201) return fail(r, false);
    }
    location.hash = `#/snippet/${seg(w.account.trim())}/${seg(w.name.trim())}`;
  };

  render();
}

function markError(fieldName, text) {
  const m = main();
  // Header names are case-insensitive: the form keeps them lower-cased.
  const plain = fieldName.replace(/\[\d+\]/g, "").toLowerCase();
  let target = null;
  for (const el of m.querySelectorAll("[data-field]")) {
    const f = el.getAttribute("data-field").toLowerCase();
    if ((plain === f || plain.startsWith(`${f}.`)) && (!target || f.length > target.getAttribute("data-field").length)) target = el;
  }
  const box = target ? (target.matches("fieldset") ? target : target.closest(".field, fieldset")) : null;
  const err = box ? box.querySelector(":scope > .error") : null;
  if (err) {
    err.textContent = `${fieldName}: ${text}`;
    err.hidden = false;
    if (target.matches("input, select")) {
      target.setAttribute("aria-invalid", "true");
      target.focus();
    } else {
      (box.querySelector("input, select, button") || m).focus();
    }
  } else {
    m.prepend(banner("bad", `${fieldName}: ${text}`));
  }
}

// ---------------------------------------------------------------------------------------
// The usage snippet.

async function viewSnippet(account, endpoint) {
  const r = await api("GET", `/accounts/${seg(account)}/endpoints/${seg(endpoint)}/snippet`);
  if (r.status !== 200) return show(banner("bad", message(r)));
  const s = r.json;
  const block = (title, text, id) =>
    h("section", {}, h("h2", {}, title), h("pre", { id }, h("code", {}, text)), copyButton(() => text, `Copy ${title}`));
  show(
    h("h1", {}, `Use ${account}/${endpoint}`),
    h("p", {}, "Callers use their own gateway key in place of ", h("code", {}, "$GATEWAY_KEY"), ": it is never filled in here."),
    h("div", { class: "field" }, h("label", {}, "Base URL"), h("pre", { id: "snippet-base-url" }, h("code", {}, s.base_url)), copyButton(() => s.base_url, "Copy base URL")),
    block("curl", s.curl, "snippet-curl"),
    block("Python (openai)", s.python, "snippet-python"),
    block("Rust (async-openai)", s.rust, "snippet-rust"),
    h("div", { class: "actions" }, h("a", { href: "#/endpoints", class: "button" }, "Back to the endpoints")),
  );
}

// ---------------------------------------------------------------------------------------
// Usage at a glance: requests and tokens per endpoint, as this gateway counted them.

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

/// A bar chart of `values` (oldest first), with its title as the accessible name.
function bars(values, title, unit) {
  const w = 360, hgt = 80, max = Math.max(1, ...values), step = w / values.length;
  const chart = svg("svg", { viewBox: `0 0 ${w} ${hgt + 14}`, class: "chart", role: "img", "aria-label": `${title}: ${values.reduce((a, b) => a + b, 0)} ${unit} in all, at most ${max} in one` },
    svg("title", {}, title));
  values.forEach((v, i) => {
    const barH = Math.round((v / max) * hgt);
    chart.append(svg("rect", { x: (i * step + 0.5).toFixed(1), y: hgt - barH, width: Math.max(1, step - 1).toFixed(1), height: barH, class: "bar" },
      svg("title", {}, `${v} ${unit}`)));
  });
  chart.append(svg("line", { x1: 0, y1: hgt + 0.5, x2: w, y2: hgt + 0.5, class: "axis" }));
  chart.append(svg("text", { x: 0, y: hgt + 12, class: "tick" }, values.length === 60 ? "60 min ago" : "24 h ago"));
  chart.append(svg("text", { x: w, y: hgt + 12, class: "tick", "text-anchor": "end" }, "now"));
  return h("figure", {}, chart, h("figcaption", {}, title));
}

async function viewUsage() {
  const r = await api("GET", "/usage");
  if (r.status !== 200) return show(banner("bad", message(r)));
  const cards = r.json.endpoints.map((e) =>
    h(
      "section",
      { class: "usage", "data-endpoint": `${e.account}/${e.endpoint}` },
      h("h2", {}, `${e.account} / ${e.endpoint}`),
      h(
        "dl",
        { class: "totals" },
        h("dt", {}, "Last hour"),
        h("dd", { class: "hour" }, `requests ${e.hour.requests} · tokens ${e.hour.input_tokens + e.hour.output_tokens} (in ${e.hour.input_tokens}, out ${e.hour.output_tokens})`),
        h("dt", {}, "Last day"),
        h("dd", { class: "day" }, `requests ${e.day.requests} · tokens ${e.day.input_tokens + e.day.output_tokens} (in ${e.day.input_tokens}, out ${e.day.output_tokens})`),
      ),
      h("div", { class: "charts" }, bars(e.requests_per_minute, "Requests a minute, last hour", "requests"), bars(e.tokens_per_hour, "Tokens an hour, last day", "tokens")),
    ),
  );
  show(
    h("h1", {}, "Usage"),
    h("p", { class: "hint" }, "Calls whose response ended, as this gateway process counted them since it started (each replica counts its own)."),
    cards.length ? cards : h("p", {}, "No calls in the last day to an endpoint you may view."),
  );
}

// ---------------------------------------------------------------------------------------
// Keys and the audit log (admins).

async function viewKeys(notice) {
  const r = await api("GET", "/keys");
  if (r.status !== 200) return show(banner("bad", message(r)));
  const subject = h("input", { type: "text", autocomplete: "off" });
  const teams = h("input", { type: "text", autocomplete: "off" });
  const expires = h("input", { type: "text", placeholder: "2027-01-01T00:00:00Z", autocomplete: "off" });
  const create = h(
    "form",
    {
      onsubmit: async (ev) => {
        ev.preventDefault();
        const body = { subject: subject.value.trim(), teams: teams.value.split(",").map((t) => t.trim()).filter(Boolean) };
        if (expires.value.trim()) body.expires_at = expires.value.trim();
        const c = await api("POST", "/keys", body);
        if (c.status !== 201) return viewKeys(banner("bad", message(c)));
        issued(c.json, "Key created");
      },
    },
    h("h2", {}, "Create a key"),
    field("Subject (who holds it, e.g. an email)", subject, null, "subject"),
    field("Teams (comma-separated)", teams, null, "teams"),
    field("Expires at (RFC 3339, optional)", expires, null, "expires_at"),
    h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Create key")),
  );
  const rows = r.json.keys.map((k) =>
    h(
      "tr",
      {},
      h("td", {}, h("code", {}, k.id)),
      h("td", {}, k.subject),
      h("td", { class: "optional" }, k.teams.join(", ")),
      h("td", { class: "optional" }, k.created_at || ""),
      h("td", {}, k.revoked_at ? `revoked ${k.revoked_at}` : k.expires_at ? `expires ${k.expires_at}` : "active"),
      h(
        "td",
        {},
        k.source === "store" && !k.revoked_at
          ? h("div", { class: "row-actions" },
              h("button", { type: "button", onclick: () => askRotate(k.id) }, "Rotate"),
              h("button", { type: "button", class: "danger", onclick: () => revoke(k.id) }, "Revoke"))
          : h("span", { class: "muted" }, k.source === "file" ? "from the file" : ""),
      ),
    ),
  );
  show(
    h("h1", {}, "Keys"),
    notice || null,
    h("div", { id: "rotate" }),
    h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Id"), h("th", {}, "Subject"), h("th", { class: "optional" }, "Teams"), h("th", { class: "optional" }, "Created"), h("th", {}, "State"), h("th", {}, "Actions"))), h("tbody", {}, rows))),
    create,
  );
}

function issued(k, title) {
  show(
    h("h1", {}, title),
    banner("warn", "This is the only time the key is shown. Copy it now and hand it to its holder; the gateway keeps only its digest."),
    h("p", {}, "Key ", h("code", {}, k.id), " for ", k.subject),
    h("p", { class: "secret-once", id: "issued-key" }, k.key),
    h("div", { class: "actions" }, copyButton(() => k.key, "Copy key"), h("button", { type: "button", onclick: () => viewKeys() }, "Done")),
  );
}

async function revoke(id) {
  const r = await api("DELETE", `/keys/${seg(id)}`);
  const ok = r.status === 200 || r.status === 204;
  return viewKeys(ok ? banner("ok", `Revoked ${id}.`) : banner("bad", message(r)));
}

function askRotate(id) {
  const grace = h("input", { type: "number", min: "0", value: "3600" });
  const box = document.getElementById("rotate");
  box.replaceChildren(
    h(
      "form",
      { class: "banner warn", onsubmit: (ev) => { ev.preventDefault(); rotate(id, Number(grace.value || "0")); } },
      h("p", {}, "Rotate ", h("code", {}, id), ": a new key is issued, and the old one keeps working for a grace period."),
      field("Grace period in seconds (0: the old key stops now)", grace, null, "grace_seconds"),
      h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Rotate it"), h("button", { type: "button", onclick: () => box.replaceChildren() }, "Cancel")),
    ),
  );
  grace.focus();
}

async function rotate(id, grace) {
  const r = await api("POST", `/keys/${seg(id)}/rotate`, { grace_seconds: Number.isFinite(grace) && grace >= 0 ? grace : 0 });
  if (r.status !== 201 && r.status !== 200) return viewKeys(banner("bad", message(r)));
  issued(r.json, "Key rotated");
}

async function viewAudit(before) {
  const r = await api("GET", `/audit?limit=25${before ? `&before=${seg(before)}` : ""}`);
  if (r.status !== 200) return show(banner("bad", message(r)));
  const rows = r.json.entries.map((e) =>
    h("tr", {}, h("td", {}, e.at), h("td", {}, e.actor), h("td", {}, e.action), h("td", {}, e.target), h("td", { class: "optional" }, h("code", {}, JSON.stringify(e.changes)))),
  );
  show(
    h("h1", {}, "Audit log"),
    h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "When"), h("th", {}, "Who"), h("th", {}, "Action"), h("th", {}, "Target"), h("th", { class: "optional" }, "Changes"))), h("tbody", {}, rows))),
    h("div", { class: "actions" }, before ? h("button", { type: "button", onclick: () => viewAudit(null) }, "Newest") : null, r.json.next ? h("button", { type: "button", onclick: () => viewAudit(r.json.next) }, "Older") : null),
  );
}

// ---------------------------------------------------------------------------------------

async function start() {
  const r = await fetch("config.json", { cache: "no-store" });
  state.config = await r.json();
  window.addEventListener("hashchange", route);
  if (key()) {
    try {
      const accounts = await api("GET", "/accounts");
      if (accounts.status === 200) await learnRoles(accounts.json.accounts);
    } catch {
      return;
    }
  }
  await route();
}

start();
