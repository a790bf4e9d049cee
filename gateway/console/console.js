// The gateway's admin console (README "Console"): plain JavaScript, no library, no build step.
//
// Rules this file keeps:
// - every value from the API goes into the page as text (textContent, text nodes); never innerHTML;
// - the admin token lives in this tab's sessionStorage only and travels as Authorization; a 401
//   forgets it; signing out forgets it;
// - a secret (token or key) is shown once in a dialog and removed from the page when it closes:
//   never in a URL, the history, storage or the browser console;
// - no inline script or style (the Content-Security-Policy allows neither).

const TOKEN_KEY = "gateway.adminToken";
const PAGE = 50; // rows per "More" on the users list and the audit log
const WHOLE_PAGE = 100; // page size while a list is read whole
const RECENT_SHOWN = 20;
const API = new URL("../", document.baseURI); // /console/ -> the listener's root, where /v1 is

// ---------------------------------------------------------------------------------------------
// The API

class ApiError extends Error {
  constructor(status, body) {
    const detail = body && typeof body.detail === "string" && body.detail ? body.detail : `HTTP ${status}`;
    super(detail);
    this.status = status;
    this.code = (body && body.error) || "";
    this.field = (body && body.field) || null;
  }
}

// Thrown after a 401 has signed the console out: callers stop, the sign-in form says why.
class SignedOut extends Error {}

function storedToken() {
  return sessionStorage.getItem(TOKEN_KEY);
}

async function send(method, path, body, token) {
  const headers = { Authorization: `Bearer ${token}`, Accept: "application/json" };
  const init = { method, headers, cache: "no-store", credentials: "omit", redirect: "error" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(new URL(path, API), init);
  } catch {
    throw new ApiError(0, { detail: "The gateway could not be reached; try again." });
  }
  let data = null;
  if (response.status !== 204 && (response.headers.get("Content-Type") || "").includes("json")) {
    try {
      data = await response.json();
    } catch {
      data = null;
    }
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

// A call with the stored admin token; a 401 forgets the token and shows the sign-in form.
async function api(method, path, body) {
  const token = storedToken();
  if (!token) {
    showSignIn("");
    throw new SignedOut();
  }
  try {
    return await send(method, path, body, token);
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      forgetToken();
      showSignIn(`Signed out: ${error.message}`);
      throw new SignedOut();
    }
    throw error;
  }
}

function query(path, params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") search.set(key, String(value));
  }
  const text = search.toString();
  return text ? `${path}?${text}` : path;
}

// Every item of a paged list, following `next` to the end.
async function listAll(path, params = {}) {
  const items = [];
  let after = null;
  do {
    const page = await api("GET", query(path, { ...params, limit: WHOLE_PAGE, after }));
    items.push(...page.items);
    after = page.next;
  } while (after);
  return items;
}

const userPath = (name) => `v1/service-users/${encodeURIComponent(name)}`;

let rolesCache = null;
async function allRoles() {
  if (rolesCache === null) rolesCache = await listAll("v1/roles");
  return rolesCache;
}

// ---------------------------------------------------------------------------------------------
// Building the page (text only)

function h(tag, props = {}, ...children) {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "on") {
      for (const [event, handler] of Object.entries(value)) element.addEventListener(event, handler);
    } else if (key === "class") {
      element.className = value;
    } else if (key === "value" || key === "checked" || key === "selected" || key === "disabled") {
      element[key] = value;
    } else {
      element.setAttribute(key, value === true ? "" : String(value));
    }
  }
  add(element, children);
  return element;
}

function add(element, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

let uniqueCount = 0;
const unique = (stem) => `${stem}-${++uniqueCount}`;

const when = (text) => (text ? text.replace("T", " ").replace("Z", " UTC") : "never");

function table(caption, columns, rows, empty) {
  if (!rows.length) return h("p", { class: "empty" }, empty);
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      {},
      h("caption", { class: "visually-hidden" }, caption),
      h("thead", {}, h("tr", {}, columns.map((column) => h("th", { scope: "col" }, column)))),
      h(
        "tbody",
        {},
        rows.map((cells) =>
          h(
            "tr",
            {},
            cells.map((cell, index) =>
              index === 0 ? h("th", { scope: "row" }, cell) : h("td", { "data-label": columns[index] }, cell),
            ),
          ),
        ),
      ),
    ),
  );
}

function field(label, control, hint) {
  const id = unique("field");
  control.id = id;
  const hintId = hint ? `${id}-hint` : null;
  if (hintId) control.setAttribute("aria-describedby", hintId);
  return h(
    "div",
    { class: "field" },
    h("label", { for: id }, label),
    control,
    hint ? h("p", { class: "hint", id: hintId }, hint) : null,
  );
}

function roleSelect(names, chosen = []) {
  return h(
    "select",
    { multiple: true, size: Math.min(Math.max(names.length, 2), 8), name: "roles" },
    names.map((name) => h("option", { value: name, selected: chosen.includes(name) }, name)),
  );
}

const chosenRoles = (select) => Array.from(select.selectedOptions, (option) => option.value);
const originList = (text) => text.split(/[\s,]+/).filter(Boolean);

// Messages: one alert region for failures, one status region for what just happened.
function alertText(text) {
  document.getElementById("alert").textContent = text;
}
function statusText(text) {
  document.getElementById("status").textContent = text;
}

// A form's failure: the API's detail, next to the form, the field it names marked invalid.
function formError(form, error, fields = {}) {
  if (error instanceof SignedOut) return;
  const region = form.querySelector(".form-error");
  region.textContent = error.message;
  for (const control of form.querySelectorAll("[aria-invalid]")) control.removeAttribute("aria-invalid");
  const control = error.field ? fields[error.field] : null;
  if (control) {
    control.setAttribute("aria-invalid", "true");
    control.focus();
  }
}

function failed(error) {
  if (!(error instanceof SignedOut)) alertText(error.message);
}

// ---------------------------------------------------------------------------------------------
// Dialogs: the secret shown once, and confirmations

function showSecret(title, facts, label, secret, returnFocus) {
  const code = h("code", { class: "secret", id: "secret-value", "aria-labelledby": "secret-label" }, secret);
  const copyStatus = h("p", { class: "copy-status", role: "status" });
  const copy = h("button", { type: "button", class: "primary" }, "Copy");
  const close = h("button", { type: "button" }, "Close");
  const dialog = h(
    "dialog",
    { class: "secret-dialog", "aria-labelledby": "secret-title", "aria-describedby": "secret-warning" },
    h("h2", { id: "secret-title" }, title),
    h("p", { id: "secret-warning", class: "warning" }, "Copy it now: it will not be shown again."),
    facts.length ? h("dl", { class: "facts" }, facts.map(([term, value]) => [h("dt", {}, term), h("dd", {}, value)])) : null,
    h("p", { class: "secret-line" }, h("span", { id: "secret-label", class: "label" }, label), code),
    h("div", { class: "actions" }, copy, close),
    copyStatus,
  );
  copy.addEventListener("click", async () => {
    const text = code.textContent;
    if (navigator.clipboard && window.isSecureContext) {
      try {
        await navigator.clipboard.writeText(text);
        copyStatus.textContent = "Copied to the clipboard.";
        return;
      } catch {
        // no permission or no focus: select it instead
      }
    }
    const range = document.createRange();
    range.selectNodeContents(code);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    copyStatus.textContent = "Selected: press Ctrl+C (⌘C on a Mac) to copy it.";
  });
  close.addEventListener("click", () => dialog.close());
  dialog.addEventListener("close", () => {
    window.getSelection().removeAllRanges();
    code.textContent = "";
    dialog.remove();
    if (returnFocus && returnFocus.isConnected) returnFocus.focus();
  });
  document.body.append(dialog);
  dialog.showModal();
  copy.focus();
}

function confirmAction(title, text, action) {
  return new Promise((resolve) => {
    const yes = h("button", { type: "button", class: "danger" }, action);
    const no = h("button", { type: "button" }, "Cancel");
    const dialog = h(
      "dialog",
      { class: "confirm-dialog", "aria-labelledby": "confirm-title", "aria-describedby": "confirm-text" },
      h("h2", { id: "confirm-title" }, title),
      h("p", { id: "confirm-text" }, text),
      h("div", { class: "actions" }, yes, no),
    );
    let answer = false;
    yes.addEventListener("click", () => {
      answer = true;
      dialog.close();
    });
    no.addEventListener("click", () => dialog.close());
    dialog.addEventListener("close", () => {
      dialog.remove();
      resolve(answer);
    });
    document.body.append(dialog);
    dialog.showModal();
    no.focus(); // the safe choice is the default
  });
}

// ---------------------------------------------------------------------------------------------
// Sign-in and sign-out

function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
  rolesCache = null;
}

function showSignIn(message) {
  document.getElementById("bar").hidden = true;
  document.getElementById("view").replaceChildren();
  for (const dialog of document.querySelectorAll("dialog")) dialog.close();
  alertText("");
  statusText("");
  const section = document.getElementById("sign-in");
  section.hidden = false;
  document.getElementById("sign-in-error").textContent = message;
  document.title = "Sign in — Gateway console";
  document.getElementById("admin-token").focus();
}

async function signIn(event) {
  event.preventDefault();
  const input = document.getElementById("admin-token");
  const error = document.getElementById("sign-in-error");
  const token = input.value.trim();
  if (!token) {
    error.textContent = "Paste an admin token.";
    input.focus();
    return;
  }
  error.textContent = "";
  try {
    await send("GET", "v1/roles?limit=1", undefined, token); // 401: not a token; 403: not an admin's
  } catch (failure) {
    error.textContent = failure.message;
    input.select();
    return;
  }
  input.value = "";
  sessionStorage.setItem(TOKEN_KEY, token);
  document.getElementById("sign-in").hidden = true;
  document.getElementById("bar").hidden = false;
  if (!location.hash.startsWith("#/")) history.replaceState(null, "", "#/users");
  route();
}

function signOut() {
  forgetToken();
  history.replaceState(null, "", location.pathname);
  showSignIn("You have signed out.");
}

// ---------------------------------------------------------------------------------------------
// Views

let generation = 0;

function startView(title, section) {
  generation += 1;
  const root = h("div", { class: "view" });
  document.getElementById("view").replaceChildren(root);
  document.title = `${title} — Gateway console`;
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.section === section) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const heading = h("h1", { tabindex: "-1" }, title);
  root.append(heading);
  return { root, heading, current: ((mine) => () => mine === generation)(generation) };
}

// An on-demand form: opening one closes the others of the page, so each label is on the page once.
function formToggle(button, build) {
  let open = null;
  const area = h("div", { class: "form-area" });
  const close = () => {
    if (open) open.remove();
    open = null;
    button.setAttribute("aria-expanded", "false");
  };
  button.setAttribute("aria-expanded", "false");
  button.addEventListener("click", () => {
    if (open) {
      close();
      return;
    }
    for (const other of document.querySelectorAll(".form-area form")) other.dispatchEvent(new Event("closeform"));
    open = build(close);
    open.addEventListener("closeform", close);
    area.append(open);
    button.setAttribute("aria-expanded", "true");
    open.querySelector("input, select, textarea").focus();
  });
  return area;
}

function formActions(submitLabel, close) {
  return [
    h("p", { class: "form-error", role: "alert" }),
    h(
      "div",
      { class: "actions" },
      h("button", { type: "submit", class: "primary" }, submitLabel),
      h("button", { type: "button", on: { click: close } }, "Cancel"),
    ),
  ];
}

// A form's submit: its buttons disabled while `action` runs; a refusal shown next to the
// field (of `fields`, by the API's field name) it names.
function onSubmit(form, fields, action) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const buttons = form.querySelectorAll("button");
    for (const button of buttons) button.disabled = true;
    try {
      await action();
    } catch (error) {
      formError(form, error, fields);
    } finally {
      for (const button of buttons) button.disabled = false;
    }
  });
}

// The fields a service user is created and edited with (the name aside), and their API body.
function userFields(roleNames, chosen = [], user = null) {
  const description = h("input", { type: "text", autocomplete: "off", value: user?.description || "" });
  const roles = roleSelect(roleNames, chosen);
  const origins = h("textarea", { rows: "2", spellcheck: "false", value: user ? user.allowed_origins.join("\n") : "" });
  const body = () => ({
    description: description.value.trim() || null,
    roles: chosenRoles(roles),
    allowed_origins: originList(origins.value),
  });
  return { description, roles, origins, body, fields: { description, roles, allowed_origins: origins } };
}

// --- Service users ---------------------------------------------------------------------------

async function usersView() {
  const { root, current } = startView("Service users", "users");
  const roles = (await allRoles()).map((role) => role.name);
  if (!current()) return;

  const newButton = h("button", { type: "button", class: "primary" }, "New service user");
  const newArea = formToggle(newButton, (close) => {
    const name = h("input", { type: "text", required: true, autocomplete: "off", spellcheck: "false" });
    const user = userFields(roles);
    const form = h(
      "form",
      { class: "panel", "aria-label": "New service user" },
      h("h2", {}, "New service user"),
      field("Name", name, "Lower-case letters, digits, dot, dash and underscore; 63 at most."),
      field("Description", user.description),
      field("Roles", user.roles, "Ctrl/⌘-click or Shift+arrows to choose several; none is allowed."),
      field("Origins", user.origins, "Browser origins allowed to use its tokens, one a line (https://app.example)."),
      formActions("Create", close),
    );
    onSubmit(form, { name, ...user.fields }, async () => {
      const created = await api("POST", "v1/service-users", { name: name.value.trim(), ...user.body() });
      statusText(`Service user ${created.name} created.`);
      location.hash = `#/users/${encodeURIComponent(created.name)}`;
    });
    return form;
  });

  const prefix = h("input", { type: "search", autocomplete: "off", spellcheck: "false" });
  const role = h("select", {}, h("option", { value: "" }, "Any role"), roles.map((name) => h("option", { value: name }, name)));
  const filter = h(
    "form",
    { class: "filters", role: "search", "aria-label": "Filter service users" },
    field("Prefix", prefix),
    field("Role", role),
    h("button", { type: "submit" }, "Filter"),
  );
  const list = h("div", { class: "list" });
  const more = h("button", { type: "button", hidden: true }, "More");
  const count = h("p", { class: "count", role: "status" });
  root.append(h("div", { class: "toolbar" }, newButton), newArea, filter, count, list, more);

  let rows = [];
  let next = null;
  const show = () => {
    const filtered = prefix.value || role.value;
    list.replaceChildren(
      table(
        "Service users",
        ["Name", "Kind", "Description", "Roles", "Status", "Created"],
        rows.map((user) => [
          h("a", { href: `#/users/${encodeURIComponent(user.name)}` }, user.name),
          user.kind,
          user.description || "",
          user.roles.map((item) => item.name).join(", "),
          user.disabled ? "disabled" : "active",
          when(user.created_at),
        ]),
        filtered
          ? "No service user matches this filter."
          : "No service users yet. Create the first with “New service user”.",
      ),
    );
    count.textContent = rows.length ? `${rows.length} shown${next ? "; more follow" : ""}.` : "";
    more.hidden = !next;
  };
  const load = async (reset) => {
    try {
      const page = await api(
        "GET",
        query("v1/service-users", {
          prefix: prefix.value.trim(),
          role: role.value,
          limit: PAGE,
          after: reset ? null : next,
        }),
      );
      if (!current()) return;
      rows = reset ? page.items : rows.concat(page.items);
      next = page.next;
      show();
    } catch (error) {
      failed(error);
    }
  };
  filter.addEventListener("submit", (event) => {
    event.preventDefault();
    alertText("");
    load(true);
  });
  more.addEventListener("click", async () => {
    more.disabled = true;
    const before = rows.length;
    await load(false);
    more.disabled = false;
    const firstNew = list.querySelectorAll("tbody tr")[before];
    const link = firstNew && firstNew.querySelector("a");
    if (link) link.focus(); // keyboard users continue where the new rows start
  });
  await load(true);
}

// --- One service user ------------------------------------------------------------------------

async function userView(name) {
  const { root, heading, current } = startView(name, "users");
  let user;
  try {
    user = await api("GET", userPath(name));
  } catch (error) {
    if (error instanceof SignedOut || !current()) return;
    root.append(h("p", { class: "empty" }, error.message), h("p", {}, h("a", { href: "#/users" }, "Back to service users")));
    return;
  }
  if (!current()) return;
  const roleNames = user.roles.map((role) => role.name);
  const allRoleNames = (await allRoles()).map((role) => role.name);
  if (!current()) return;

  // Facts and user-level actions
  const toggle = h("button", { type: "button" }, user.disabled ? "Enable" : "Disable");
  toggle.addEventListener("click", async () => {
    try {
      await api("PATCH", userPath(name), { disabled: !user.disabled });
      await userView(name);
      statusText(`Service user ${name} ${user.disabled ? "enabled" : "disabled"}.`);
    } catch (error) {
      failed(error);
    }
  });
  const remove = h("button", { type: "button", class: "danger" }, "Delete");
  remove.addEventListener("click", async () => {
    const sure = await confirmAction(
      `Delete service user ${name}?`,
      "Its tokens and API keys are deleted with it and stop working at once. This cannot be undone.",
      "Delete",
    );
    if (!sure) {
      remove.focus();
      return;
    }
    try {
      await api("DELETE", userPath(name));
      location.hash = "#/users";
      statusText(`Service user ${name} deleted.`);
    } catch (error) {
      failed(error);
    }
  });
  const edit = h("button", { type: "button" }, "Edit");
  const editArea = formToggle(edit, (close) => {
    const edited = userFields(allRoleNames, roleNames, user);
    const form = h(
      "form",
      { class: "panel", "aria-label": `Edit ${name}` },
      h("h2", {}, `Edit ${name}`),
      field("Description", edited.description),
      field("Roles", edited.roles, "Tokens with a fixed role list lose a role removed here."),
      field("Origins", edited.origins, "One a line."),
      formActions("Save", close),
    );
    onSubmit(form, edited.fields, async () => {
      await api("PATCH", userPath(name), edited.body());
      await userView(name);
      statusText(`Service user ${name} saved.`);
    });
    return form;
  });
  heading.after(
    h("p", { class: "lead" }, user.description || "No description."),
    h(
      "dl",
      { class: "facts" },
      h("dt", {}, "Kind"),
      h("dd", {}, user.kind),
      h("dt", {}, "Status"),
      h("dd", {}, user.disabled ? "disabled: its tokens are refused" : "active"),
      h("dt", {}, "Created"),
      h("dd", {}, `${when(user.created_at)} by ${user.created_by}`),
      h("dt", {}, "Rate limit"),
      h("dd", {}, user.rate_limit ? `${user.rate_limit.rate} per ${user.rate_limit.per} (burst ${user.rate_limit.burst})` : "the default per-user limit"),
    ),
    h("div", { class: "toolbar" }, edit, toggle, remove),
    editArea,
  );

  // Roles and origins
  root.append(
    h("h2", {}, "Roles"),
    table(
      "Roles",
      ["Role", "Assigned by", "Assigned at"],
      user.roles.map((role) => [role.name, role.assigned_by, when(role.assigned_at)]),
      "No roles: its tokens pass only public rules.",
    ),
    h("h2", {}, "Allowed origins"),
    user.allowed_origins.length
      ? h("ul", { class: "origins" }, user.allowed_origins.map((origin) => h("li", {}, h("code", {}, origin))))
      : h("p", { class: "empty" }, "No origins: browsers cannot call the gateway with its tokens."),
  );

  // Tokens
  const tokensHeading = h("h2", { tabindex: "-1" }, "Tokens");
  const newToken = h("button", { type: "button", class: "primary" }, "New token");
  const tokenList = h("div", { class: "list" });
  const credentialFields = (close, title, withName) => {
    const tokenName = withName ? h("input", { type: "text", required: true, autocomplete: "off", spellcheck: "false" }) : null;
    const description = h("input", { type: "text", autocomplete: "off" });
    const expires = h("input", { type: "text", autocomplete: "off", spellcheck: "false", placeholder: "2030-01-01" });
    const select = roleSelect(roleNames);
    const form = h(
      "form",
      { class: "panel", "aria-label": title },
      h("h2", {}, title),
      withName ? field("Name", tokenName, "Unique for this user, same grammar as user names.") : null,
      field("Description", description),
      field("Expires at", expires, "ISO 8601 date or UTC time (2030-01-01, 2030-01-01T12:00:00Z); empty: never."),
      field("Roles", select, "None chosen: it always carries the user's current roles."),
      formActions("Create", close),
    );
    const body = () => {
      const chosen = chosenRoles(select);
      return {
        ...(withName ? { name: tokenName.value.trim() } : {}),
        description: description.value.trim() || null,
        expires_at: expires.value.trim() || null,
        roles: chosen.length ? chosen : null,
      };
    };
    return { form, body, fields: { name: tokenName, description, expires_at: expires, roles: select } };
  };
  // The form behind "New token" / "New key": create, reload the table, show the secret once.
  const credentialArea = (button, title, withName, path, reload, announce) =>
    formToggle(button, (close) => {
      const { form, body, fields } = credentialFields(close, title, withName);
      onSubmit(form, fields, async () => {
        const created = await api("POST", path, body());
        close();
        await reload();
        announce(created);
      });
      return form;
    });
  // The columns tokens and keys share, between the first and "Actions".
  const credentialCells = (item) => [
    item.description || "",
    item.roles === null ? "the user's roles" : item.roles.join(", ") || "none",
    item.expired ? `expired (${when(item.expires_at)})` : when(item.expires_at),
    item.last_used_at ? when(item.last_used_at) : "not yet",
    `${when(item.created_at)} by ${item.created_by}`,
  ];
  const tokenArea = credentialArea(newToken, "New token", true, `${userPath(name)}/tokens`, loadTokens, (created) => {
    statusText(`Token ${created.name} created.`);
    showSecret(
      `Token ${created.name} created`,
      [["User", name], ["Expires at", when(created.expires_at)]],
      "Token",
      created.token,
      newToken,
    );
  });
  const tokenAction = (token, label, run) =>
    h("button", {
      type: "button",
      disabled: label === "Expire now" && token.expired,
      on: {
        click: async () => {
          alertText("");
          try {
            await run();
          } catch (error) {
            failed(error);
          }
        },
      },
    }, label);
  const tokenPath = (token) => `${userPath(name)}/tokens/${encodeURIComponent(token.name)}`;
  async function loadTokens() {
    const tokens = await listAll(`${userPath(name)}/tokens`);
    if (!current()) return;
    tokenList.replaceChildren(
      table(
        "Tokens",
        ["Name", "Description", "Roles", "Expires at", "Last used", "Created", "Actions"],
        tokens.map((token) => [
          token.name,
          ...credentialCells(token),
          h(
            "div",
            { class: "row-actions" },
            tokenAction(token, "Reset", async () => {
              const sure = await confirmAction(
                `Reset token ${token.name}?`,
                "It gets a new secret; the current one stops working at once.",
                "Reset",
              );
              if (!sure) return;
              const reset = await api("POST", `${tokenPath(token)}/reset`);
              await loadTokens();
              statusText(`Token ${token.name} has a new secret; the old one no longer works.`);
              showSecret(`New secret for token ${token.name}`, [["User", name]], "Token", reset.token, tokensHeading);
            }),
            tokenAction(token, "Expire now", async () => {
              await api("POST", `${tokenPath(token)}/expire`);
              await loadTokens();
              statusText(`Token ${token.name} expired.`);
              tokensHeading.focus();
            }),
            tokenAction(token, "Delete", async () => {
              const sure = await confirmAction(
                `Delete token ${token.name}?`,
                "It stops working at once. This cannot be undone.",
                "Delete",
              );
              if (!sure) return;
              await api("DELETE", tokenPath(token));
              await loadTokens();
              statusText(`Token ${token.name} deleted.`);
              tokensHeading.focus();
            }),
          ),
        ]),
        "No tokens yet. Create one with “New token”.",
      ),
    );
    loadActivity().catch(failed);
  }

  // API keys
  const keysHeading = h("h2", { tabindex: "-1" }, "API keys");
  const newKey = h("button", { type: "button", class: "primary" }, "New key");
  const keyList = h("div", { class: "list" });
  const keyArea = credentialArea(newKey, "New key", false, `${userPath(name)}/keys`, loadKeys, (created) => {
    statusText(`API key ${created.id} created.`);
    showSecret(
      "API key created",
      [["Key ID (client_id)", created.id], ["User", name], ["Expires at", when(created.expires_at)]],
      "Key secret",
      created.secret,
      newKey,
    );
  });
  const keyPath = (key) => `${userPath(name)}/keys/${encodeURIComponent(key.id)}`;
  async function loadKeys() {
    const keys = await listAll(`${userPath(name)}/keys`);
    if (!current()) return;
    keyList.replaceChildren(
      table(
        "API keys",
        ["Key ID", "Description", "Roles", "Expires at", "Last used", "Created", "Actions"],
        keys.map((key) => [
          h("code", {}, key.id),
          ...credentialCells(key),
          h(
            "div",
            { class: "row-actions" },
            tokenAction(key, "Expire now", async () => {
              await api("POST", `${keyPath(key)}/expire`);
              await loadKeys();
              statusText(`API key ${key.id} expired; tokens minted from it stop working.`);
              keysHeading.focus();
            }),
            tokenAction(key, "Delete", async () => {
              const sure = await confirmAction(
                `Delete API key ${key.id}?`,
                "It can no longer be exchanged, and the tokens minted from it stop working at once. This cannot be undone.",
                "Delete",
              );
              if (!sure) return;
              await api("DELETE", keyPath(key));
              await loadKeys();
              statusText(`API key ${key.id} deleted.`);
              keysHeading.focus();
            }),
          ),
        ]),
        "No API keys yet. Create one with “New key”.",
      ),
    );
    loadActivity().catch(failed);
  }

  // Recent activity: this user's events among the newest ones
  const activity = h("div", { class: "list" });
  async function loadActivity() {
    const page = await api("GET", query("v1/audit-events", { user: name, limit: RECENT_SHOWN }));
    if (!current()) return;
    const events = page.items;
    activity.replaceChildren(auditTable(events, "No recent events for this user."));
  }

  root.append(
    tokensHeading,
    h("div", { class: "toolbar" }, newToken),
    tokenArea,
    tokenList,
    keysHeading,
    h("div", { class: "toolbar" }, newKey),
    keyArea,
    keyList,
    h("h2", {}, "Recent activity"),
    h("p", { class: "hint" }, `Its latest ${RECENT_SHOWN} events (the user, its tokens and keys).`),
    activity,
  );
  try {
    await Promise.all([loadTokens(), loadKeys()]);
  } catch (error) {
    failed(error);
  }
}

// --- Audit log -------------------------------------------------------------------------------

function auditTable(events, empty) {
  return table(
    "Audit events",
    ["When", "Actor", "Action", "Target", "Detail"],
    events.map((event) => {
      const match = /^(?:user|token|key)\/([a-z0-9][a-z0-9._-]*)/.exec(event.target);
      return [
        when(event.at),
        event.actor,
        event.action,
        match ? h("a", { href: `#/users/${encodeURIComponent(match[1])}` }, event.target) : event.target,
        h("code", { class: "detail" }, JSON.stringify(event.detail)),
      ];
    }),
    empty,
  );
}

async function auditView() {
  const { root, current } = startView("Audit log", "audit");
  const actor = h("input", { type: "search", autocomplete: "off", spellcheck: "false" });
  const since = h("input", { type: "text", autocomplete: "off", spellcheck: "false", placeholder: "2026-01-01" });
  const filter = h(
    "form",
    { class: "filters", role: "search", "aria-label": "Filter audit events" },
    field("Actor", actor),
    field("Since", since),
    h("button", { type: "submit" }, "Filter"),
  );
  const list = h("div", { class: "list" });
  const more = h("button", { type: "button", hidden: true }, "More");
  root.append(filter, list, more);
  let events = [];
  let next = null;
  const load = async (reset) => {
    try {
      const page = await api(
        "GET",
        query("v1/audit-events", { actor: actor.value.trim(), since: since.value.trim(), limit: PAGE, after: reset ? null : next }),
      );
      if (!current()) return;
      events = reset ? page.items : events.concat(page.items);
      next = page.next;
      list.replaceChildren(auditTable(events, "No events match."));
      more.hidden = !next;
    } catch (error) {
      failed(error);
    }
  };
  filter.addEventListener("submit", (event) => {
    event.preventDefault();
    alertText("");
    load(true);
  });
  more.addEventListener("click", () => load(false));
  await load(true);
}

// --- Roles and routes ------------------------------------------------------------------------

async function rolesView() {
  const { root, current } = startView("Roles", "roles");
  rolesCache = null; // policies/ may have been reloaded
  const roles = await allRoles();
  if (!current()) return;
  root.append(
    h("p", { class: "hint" }, "Defined in policies/*.yaml; a reload of the configuration changes them."),
    table(
      "Roles",
      ["Name", "Description", "Permissions", "Includes"],
      roles.map((role) => [role.name, role.description || "", role.permissions.join(", "), role.includes.join(", ")]),
      "No roles are defined.",
    ),
  );
}

async function routesView() {
  const { root, current } = startView("Routes", "routes");
  const routes = await listAll("v1/routes");
  if (!current()) return;
  const cors = (value) =>
    value
      ? `${value.origins.store ? "users' origins" : "no user origins"}${value.origins.extra.length ? ` + ${value.origins.extra.join(", ")}` : ""}`
      : "off";
  root.append(
    h("p", { class: "hint" }, "From gateway.yaml, in the order they are matched (longest prefix first)."),
    table(
      "Routes",
      ["Name", "Prefix", "Upstream", "Timeout", "Strip prefix", "Preserve host", "CORS"],
      routes.map((item) => [
        item.name,
        h("code", {}, item.prefix),
        h("code", {}, item.upstream),
        `${item.timeout} s`,
        item.strip_prefix ? "yes" : "no",
        item.preserve_host ? "yes" : "no",
        cors(item.cors),
      ]),
      "No routes are configured.",
    ),
  );
}

// ---------------------------------------------------------------------------------------------
// Routing (#/users, #/users/NAME, #/audit, #/roles, #/routes): names only, never a secret

async function route() {
  if (!storedToken()) {
    showSignIn("");
    return;
  }
  const hash = location.hash;
  if (hash && !hash.startsWith("#/")) return; // an in-page anchor
  document.getElementById("sign-in").hidden = true;
  document.getElementById("bar").hidden = false;
  alertText("");
  const parts = hash.slice(2).split("/").filter(Boolean).map(decodeURIComponent);
  try {
    if (parts[0] === "users" && parts.length === 2) await userView(parts[1]);
    else if (parts[0] === "audit") await auditView();
    else if (parts[0] === "roles") await rolesView();
    else if (parts[0] === "routes") await routesView();
    else await usersView();
  } catch (error) {
    failed(error);
  }
  const heading = document.querySelector("#view h1");
  if (heading && !document.querySelector("dialog[open]") && !document.activeElement.closest(".view")) heading.focus();
}

document.getElementById("sign-in-form").addEventListener("submit", signIn);
document.getElementById("sign-out").addEventListener("click", signOut);
window.addEventListener("hashchange", route);
route();
