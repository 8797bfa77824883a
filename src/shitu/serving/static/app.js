// The shitu web page: recognise a photo, browse and edit the gallery. Talks only to the
// server that served it (the page's Content-Security-Policy allows nothing else). Its URLs
// are relative to the page, so it works behind a reverse proxy that serves it under a prefix.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const KEY_STORE = "shitu-api-key";
let labels = [];
let selected = null;
let selection = 0; // counts label choices: an answer for an earlier one is dropped
let photoChoice = 0; // counts photos chosen: an answer for an earlier photo is dropped
let keyChange = 0; // counts API key changes: a read answered for an earlier key is dropped
const thumbUrls = [];

// ---------------------------------------------------------------------------- requests

// A header holds Latin-1 only: fetch refused a key with any other character (a typographic
// quote pasted with it), which the page then reported as the server not answering.
function authHeaders() {
  const key = $("api-key").value.trim();
  const unsendable = [...key].find((char) => char.codePointAt(0) > 0xff);
  if (unsendable) {
    throw new Error(`the API key holds a character no browser can send (${unsendable}): ` +
      "check the API key box at the top of the page");
  }
  return key ? { "X-API-Key": key } : {};
}

// A read (GET) answered after the API key changed is dropped, as an error marked `stale`:
// the change reads the gallery again with the new key, and this answer (the 401 of a key
// being typed, say) arriving after that one's replaced what it showed. An edit's answer is
// kept: it says what was done, whatever the key is now.
async function api(path, options = {}) {
  const sentWith = keyChange;
  try {
    return await request(path, options);
  } finally {
    if (sentWith !== keyChange && (options.method || "GET") === "GET") {
      throw Object.assign(new Error("the API key changed while this was loading"), { stale: true });
    }
  }
}

async function request(path, options) {
  const headers = { ...authHeaders(), ...(options.headers || {}) };
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (error) { // no answer at all: the browser's bare "Failed to fetch" says too little
    throw new Error(`no answer from the server (${error.message}): is it still running, ` +
      "and this computer online?");
  }
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    } catch (ignored) { /* not JSON: keep the status line */ }
    if (response.status === 401) { // the server's advice on headers is for other clients
      detail = `${detail.split(": send ")[0]}: enter it in the API key box at the top of the page`;
    } else if (response.status === 403) {
      detail += " (check the API key at the top of the page)";
    }
    throw Object.assign(new Error(detail), { status: response.status });
  }
  const type = response.headers.get("content-type") || "";
  return type.includes("application/json") ? response.json() : response.blob();
}

function plural(count, noun) {
  return `${count} ${noun}${count === 1 ? "" : "s"}`;
}

// The label goes in the query: a path cannot carry "." or ".." (the browser resolves them
// away, encoded as %2E too), nor "//" (a proxy may merge it).
// `after`: the last image id shown, for the next page (by id, not by count: an image
// removed elsewhere meanwhile would move one out of the next page's reach).
function labelPath(label, after = null) {
  const query = new URLSearchParams({ label });
  if (after !== null) query.set("after", after);
  return `v1/gallery/label?${query}`;
}

// Made here rather than taken from the API's `thumbnail`, which is only right under a proxy
// when the server was told the proxy's prefix (--root-path).
function imagePath(id) {
  return `v1/gallery/images/${id}`;
}

// The message box at the top: for what no form on the page did (loading the gallery).
function show(text, ok = false) {
  const box = $("message");
  box.textContent = text;
  box.className = ok ? "ok" : "";
  box.hidden = !text;
}

// A status line next to a form: progress (said at once: an edit may wait a minute for
// another process's write to the library), the outcome, or ("error") why it failed.
function setStatus(id, text, kind = "") {
  const line = $(id);
  line.textContent = text;
  line.classList.toggle("error", kind === "error");
  line.classList.toggle("ok", kind === "ok");
}

// Runs an action; its error goes to the status line `where` (next to the form that failed,
// scrolled into view), or without one to the message box at the top. A 404 means the
// gallery changed elsewhere (a label or image removed or renamed since the page drew it):
// the gallery is drawn anew, so the page no longer offers what is gone.
async function attempt(action, where = null) {
  try {
    show("");
    if (where) setStatus(where, "");
    await action();
  } catch (error) {
    if (error.stale) return; // the key's change reads again and says how that went
    const box = where ? $(where) : $("message");
    if (where) setStatus(where, error.message, "error");
    else show(error.message);
    box.scrollIntoView({ block: "nearest" });
    if (error.status === 404) await refresh(selected).catch(() => {}); // the error stays
  }
}

// Runs `action` with `buttons` disabled: an edit may wait a minute for another process's
// write, and a second click meanwhile sent it again, which then failed (404) on what the
// first had already changed, or sent the same images twice.
async function withDisabled(buttons, action) {
  for (const button of buttons) button.disabled = true;
  try {
    return await action();
  } finally {
    for (const button of buttons) button.disabled = false;
  }
}

// ---------------------------------------------------------------------------- drawing

function labelColour(label) {
  let hash = 0;
  for (const char of label) hash = (hash * 31 + char.codePointAt(0)) >>> 0;
  return `hsl(${hash % 360}, 75%, 45%)`;
}

function svg(name, attributes, text) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

let drawn = []; // the results over the photo, drawn again when the photo's size changes

function drawResults(results, shown) {
  drawn = shown ? results : [];
  const image = $("photo-view");
  const overlay = $("overlay");
  image.hidden = !shown;
  overlay.replaceChildren();
  if (shown) drawBoxes(results, image.naturalWidth, image.naturalHeight);
  const list = $("results");
  list.replaceChildren();
  for (const result of results) {
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = labelColour(result.label);
    // The label's gallery images, to see what the photo was matched with.
    const name = Object.assign(document.createElement("button"), {
      type: "button", className: "link", textContent: result.label,
      title: "show this label's images in the gallery",
    });
    name.addEventListener("click", () => attempt(async () => {
      await selectLabel(result.label);
      $("label-title").focus(); // scrolled into view
    }, "label-status"));
    item.append(swatch, name, ` ${result.score.toFixed(3)} (gallery image #${result.image_id})`);
    list.append(item);
  }
}

// Sizes on screen, in CSS pixels, whatever the photo's size and how much it is scaled down.
const MIN_CAPTION_PX = 13;
const MIN_STROKE_PX = 2;

function drawBoxes(results, width, height) {
  const overlay = $("overlay");
  overlay.replaceChildren();
  overlay.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const scale = $("photo-view").clientWidth / width || 1; // screen pixels per photo pixel
  const stroke = Math.max(MIN_STROKE_PX / scale, Math.min(width, height) / 150);
  const fontSize = Math.max(MIN_CAPTION_PX / scale, Math.min(width, height) / 28);
  const captions = [];
  for (const result of results) {
    const [x1, y1, x2, y2] = result.bbox;
    const colour = labelColour(result.label);
    const caption = svg("text", {
      fill: colour, "font-size": fontSize, "stroke-width": Math.max(1 / scale, stroke / 2),
    }, `${result.label} ${result.score.toFixed(2)}`);
    overlay.append(svg("rect", {
      x: x1, y: y1, width: x2 - x1, height: y2 - y1,
      fill: "none", stroke: colour, "stroke-width": stroke, class: "box",
    }), caption);
    const above = y1 - stroke; // inside the box when there is no room above it
    const y = Math.min(height - fontSize * 0.25, above >= fontSize ? above : y1 + stroke + fontSize);
    caption.setAttribute("y", y);
    captions.push({ caption, start: x1 + stroke, y });
  }
  placeCaptions(captions, width, fontSize, stroke);
}

// Each caption starts at its box, within the photo and before the next caption to its right
// on its line (products side by side on a shelf: a caption ran over the next one, both
// unreadable), shortened with an ellipsis where it is longer; the results list below names
// each in full. One with less room than twice its font size (at the photo's right edge)
// moves left, short of the caption before it.
function placeCaptions(captions, width, fontSize, stroke) {
  const minRoom = 2 * fontSize;
  const sameLine = (one, other) => one !== other && Math.abs(one.y - other.y) < fontSize;
  for (const entry of [...captions].sort((a, b) => b.start - a.start)) { // right to left
    const line = captions.filter((other) => sameLine(entry, other));
    const next = line.filter((other) => other.start > entry.start); // placed already
    const before = line.filter((other) => other.start < entry.start);
    const right = Math.min(width, ...next.map((other) => other.x - stroke));
    const floor = before.length ? Math.max(...before.map((other) => other.start)) + minRoom : 0;
    const left = Math.min(entry.start, Math.max(right - minRoom, floor));
    shortenCaption(entry.caption, right - left);
    entry.x = Math.max(0, Math.min(entry.start, right - entry.caption.getComputedTextLength()));
    entry.caption.setAttribute("x", entry.x);
  }
}

// Shortens `caption` with an ellipsis (to one character at least) while it is longer than
// `room`, in photo pixels.
function shortenCaption(caption, room) {
  let text = caption.textContent;
  while (caption.getComputedTextLength() > room && text.length > 1) {
    text = text.slice(0, -1);
    caption.textContent = `${text}…`;
  }
}

// EXIF orientation (1-8) -> the canvas transform that turns a w x h photo upright.
const UPRIGHT = {
  2: (w, h) => [-1, 0, 0, 1, w, 0], 3: (w, h) => [-1, 0, 0, -1, w, h],
  4: (w, h) => [1, 0, 0, -1, 0, h], 5: (w, h) => [0, 1, 1, 0, 0, 0],
  6: (w, h) => [0, 1, -1, 0, h, 0], 7: (w, h) => [0, -1, -1, 0, h, w],
  8: (w, h) => [0, -1, 1, 0, 0, w],
};

// The EXIF orientation of a WebP file (its RIFF chunk "EXIF": TIFF data, after "Exif\0\0"
// in some writers' files); 1 for other files and where there is none or it cannot be read.
async function webpOrientation(file) {
  const head = new Uint8Array(await file.slice(0, 12).arrayBuffer());
  const text = (bytes, at, length) => String.fromCharCode(...bytes.subarray(at, at + length));
  if (text(head, 0, 4) !== "RIFF" || text(head, 8, 4) !== "WEBP") return 1;
  const bytes = new Uint8Array(await file.arrayBuffer());
  const view = new DataView(bytes.buffer);
  try {
    for (let at = 12, size = 0; at + 8 <= bytes.length; at += 8 + size + (size & 1)) {
      size = view.getUint32(at + 4, true);
      if (text(bytes, at, 4) !== "EXIF") continue;
      const tiff = at + 8 + (text(bytes, at + 8, 6) === "Exif\0\0" ? 6 : 0);
      const little = text(bytes, tiff, 2) === "II";
      const ifd = tiff + view.getUint32(tiff + 4, little);
      for (let entry = ifd + 2; entry < ifd + 2 + 12 * view.getUint16(ifd, little); entry += 12) {
        if (view.getUint16(entry, little) === 0x0112) return view.getUint16(entry + 8, little);
      }
      return 1;
    }
  } catch (ignored) { /* cut short: a RangeError */ }
  return 1;
}

// The photo as the server reads it, which turns photos upright by their EXIF orientation
// and gives boxes in upright pixels. Browsers do the same for JPEG and PNG, but Chromium
// shows a WebP as stored: such a photo is drawn upright here (the file sent is unchanged).
async function uprightPhoto(file) {
  const orientation = await webpOrientation(file);
  if (!UPRIGHT[orientation]) return file;
  try { // the stored pixels, whether or not this browser turns WebP itself
    const bitmap = await createImageBitmap(file, { imageOrientation: "none" });
    const [width, height] = [bitmap.width, bitmap.height];
    const canvas = document.createElement("canvas");
    const quarterTurn = orientation >= 5; // width and height swap
    [canvas.width, canvas.height] = quarterTurn ? [height, width] : [width, height];
    const context = canvas.getContext("2d");
    context.setTransform(...UPRIGHT[orientation](width, height));
    context.drawImage(bitmap, 0, 0);
    bitmap.close();
    return await new Promise((resolve) => canvas.toBlob((blob) => resolve(blob || file)));
  } catch (ignored) { // not decodable here: shown as it is, or reported as not shown
    return file;
  }
}

async function recognise(file) {
  const choice = ++photoChoice;
  const shownFile = await uprightPhoto(file);
  if (choice !== photoChoice) return; // another photo was chosen meanwhile
  const image = $("photo-view");
  if (image.onerror) image.onerror(); // the previous photo's wait ends: its answer is dropped
  const loaded = new Promise((resolve) => {
    image.onload = () => resolve(true);
    image.onerror = () => { // a format this browser cannot show (TIFF), or no image at all
      image.hidden = true; // no broken-image icon
      resolve(false);
    };
  });
  image.hidden = false;
  if (image.src) URL.revokeObjectURL(image.src);
  image.src = URL.createObjectURL(shownFile);
  $("stage").hidden = false;
  $("overlay").replaceChildren();
  drawn = [];
  $("results").replaceChildren();
  $("recognise-status").textContent = "recognising…";
  const form = new FormData();
  form.append("image", file);
  try {
    const [body, shown] = await Promise.all([
      api("v1/recognize", { method: "POST", body: form }), loaded,
    ]);
    if (choice !== photoChoice) return; // another photo was chosen meanwhile: it stands
    drawResults(body.results, shown);
    $("recognise-status").textContent = (body.results.length
      ? `${body.results.length} recognised`
      : "nothing recognised") + (shown ? "" : " (this browser cannot display the photo)");
  } catch (error) {
    if (choice !== photoChoice) return; // about a photo no longer shown
    $("stage").hidden = true; // no photo is shown as if it had been recognised
    URL.revokeObjectURL(image.src);
    image.removeAttribute("src");
    throw error;
  }
}

// ---------------------------------------------------------------------------- gallery

// Labels in the order of the reader's language, not the server's (code points: "Zucchini"
// before "apple" and "Äpfel", "Item 10" before "Item 2").
const LABEL_ORDER = new Intl.Collator(undefined, { numeric: true });

async function loadLabels() {
  let body, info;
  try {
    [body, info] = await Promise.all([api("v1/gallery/labels"), api("v1/gallery")]);
  } catch (error) {
    if (error.stale) throw error; // the summary is the newer key's to write
    $("gallery-summary").textContent = {
      401: "API key needed", 403: "wrong API key",
    }[error.status] || "gallery not loaded";
    throw error;
  }
  labels = body.labels.sort((a, b) => LABEL_ORDER.compare(a.label, b.label));
  $("gallery-summary").textContent =
    `${plural(info.images, "image")}, ${plural(info.labels, "label")} · ${info.index_type} index`;
  const options = $("label-options");
  options.replaceChildren(...labels.map(({ label }) => Object.assign(document.createElement("option"), { value: label })));
  renderLabels();
}

// Text as a filter compares it: case and accents aside ("creme" finds "Crème").
const folded = (text) => text.normalize("NFD").replace(/\p{M}/gu, "").toLowerCase();

function renderLabels() {
  const filter = folded($("label-filter").value.trim());
  const list = $("labels");
  // The list is drawn anew: focus on one of its buttons moves to the same label's new one.
  const focused = list.contains(document.activeElement) ? document.activeElement.dataset.label : null;
  list.replaceChildren();
  for (const { label, count } of labels) {
    if (filter && !folded(label).includes(filter)) continue;
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.label = label;
    button.className = label === selected ? "selected" : "";
    if (label === selected) button.setAttribute("aria-current", "true");
    const name = document.createElement("span");
    name.textContent = label;
    const number = Object.assign(document.createElement("span"), { className: "count", textContent: count });
    button.append(name, number);
    // The whole name on hover where the list cuts it short; read out as "name, 4 images",
    // not the text run together ("name4").
    button.title = label;
    button.setAttribute("aria-label", `${label}, ${plural(count, "image")}`);
    button.addEventListener("click", () => attempt(() => selectLabel(label), "label-status"));
    const item = document.createElement("li");
    item.append(button);
    list.append(item);
    if (label === focused) button.focus();
  }
  if (filter && !list.children.length) { // not an empty list, as if the gallery were empty
    const none = Object.assign(document.createElement("li"), { className: "muted" });
    none.textContent = `no label contains "${$("label-filter").value.trim()}"`;
    list.append(none);
  }
}

// Thumbnails are fetched (by the page, which sends the API key) as they near the screen:
// fetched all at once, a page of 200 would hold every later request up behind them.
const pendingThumbs = new WeakMap(); // figure -> what fetches its thumbnail
const thumbsInView = new IntersectionObserver((entries) => {
  for (const { target, isIntersecting } of entries) {
    if (!isIntersecting) continue;
    thumbsInView.unobserve(target);
    pendingThumbs.get(target)();
  }
}, { rootMargin: "300px" });

function clearThumbs() {
  thumbsInView.disconnect();
  thumbUrls.splice(0).forEach((url) => URL.revokeObjectURL(url));
  $("thumbs").replaceChildren();
}

async function thumbnail(image) {
  const blob = await api(`${imagePath(image.id)}/thumbnail?size=240`);
  const url = URL.createObjectURL(blob);
  thumbUrls.push(url);
  return url;
}

async function selectLabel(label) {
  selected = label;
  const choice = ++selection;
  renderLabels();
  const body = await api(labelPath(label));
  // A label the list lacks (a recognised photo's, given images elsewhere since the list was
  // drawn) is listed: shown selected there, and known to "Delete label", which asks how many
  // images go (it failed with a TypeError).
  if (!labels.some((entry) => entry.label === label)) await loadLabels();
  if (choice !== selection) return; // another choice came while this one loaded
  $("label-title").textContent = `${label} (${plural(body.count, "image")})`;
  $("rename-form").hidden = false;
  $("rename-input").value = label;
  $("add-label").value = label;
  clearThumbs();
  appendThumbs(label, body.images);
  offerMore(label, choice, body);
}

// A label's images come a page at a time: a button fetches the next page. `page`: the
// answer that brought the last one.
function offerMore(label, choice, page) {
  if (!page.remaining) return;
  const shown = $("thumbs").querySelectorAll("figure").length, count = page.count;
  const more = Object.assign(document.createElement("button"), {
    type: "button", className: "more", textContent: `show more (${shown} of ${count} shown)`,
  });
  more.addEventListener("click", () => attempt(async () => {
    more.disabled = true; // one page per click
    try {
      const next = await api(labelPath(label, page.images[page.images.length - 1].id));
      if (choice !== selection) return; // the grid shows another choice now
      more.remove();
      appendThumbs(label, next.images);
      offerMore(label, choice, next);
      // Focus, lost with the button, goes to the first image that came (not the page's top).
      const first = $("thumbs").querySelectorAll("figure")[shown];
      if (first) { // none where the label lost images meanwhile
        first.tabIndex = -1;
        first.focus();
      }
    } finally {
      more.disabled = false;
    }
  }, "label-status"));
  $("thumbs").append(more);
}

function appendThumbs(label, images) {
  const grid = $("thumbs");
  for (const image of images) {
    const figure = document.createElement("figure");
    figure.className = "thumb";
    figure.dataset.id = image.id;
    const img = document.createElement("img");
    img.alt = image.name;
    const caption = document.createElement("figcaption");
    caption.textContent = caption.title = `#${image.id} ${image.name}`; // title: the whole name
    const remove = Object.assign(document.createElement("button"), {
      type: "button", className: "danger", textContent: "×", title: "delete this image",
    });
    remove.setAttribute("aria-label", `delete image #${image.id}`);
    remove.addEventListener("click", () => attempt(() => withDisabled([remove], async () => {
      if (!confirm(`Delete image #${image.id} from "${label}"?`)) return;
      setStatus("label-status", `deleting image #${image.id}…`);
      const place = [...$("thumbs").querySelectorAll("figure")].indexOf(figure);
      await api(imagePath(image.id), { method: "DELETE" });
      setStatus("label-status", `deleted image #${image.id}`, "ok"); // not "deleting" for good
      await refresh(label);
      // Focus goes to the image now in its place (or the last one), not back to the page's top.
      const buttons = $("thumbs").querySelectorAll("figure button");
      (buttons[Math.min(place, buttons.length - 1)] || $("label-title")).focus();
    }), "label-status"));
    figure.append(img, caption, remove);
    grid.append(figure);
    if (image.thumbnail === null) { // the server has no file of it: nothing to fetch
      img.alt = img.title = "(no preview: the server has no file of this image)";
      continue;
    }
    pendingThumbs.set(figure, () => thumbnail(image).then(
      (url) => { img.src = url; }, (error) => {
        img.alt = "(no preview)";
        img.title = error.message; // why, on hovering
      }));
    thumbsInView.observe(figure);
  }
}

// Draws the labels and `label`'s images anew. Answers for an earlier API key leave it
// quietly: the key's change draws them again, and an edit's outcome is still reported.
async function refresh(label) {
  try {
    await redraw(label);
  } catch (error) {
    if (!error.stale) throw error;
  }
}

async function redraw(label) {
  const choice = selection;
  await loadLabels();
  if (choice !== selection) return; // a label was chosen meanwhile: that choice stands
  if (label && labels.some((entry) => entry.label === label)) {
    await selectLabel(label);
  } else {
    selected = null;
    selection++; // answers still on their way are for a label no longer shown
    $("label-title").textContent = labels.length
      ? "Choose a label"
      : "The gallery is empty: add images below";
    $("rename-form").hidden = true;
    clearThumbs();
    renderLabels();
  }
}

// ---------------------------------------------------------------------------- adding images

// What one request may hold, from the server's /healthz. It needs no API key, so its answer
// holds whatever the key is now: not dropped as stale, which left an add the key changed
// during undone, without a word.
let limits = null;
async function serverLimits() {
  if (!limits) limits = (await request("healthz", {})).limits;
  return limits;
}

// A file's share of a multipart body: its bytes, and its part's headers with the file name
// (escaped, at most 3 bytes a character) around them.
const PART_HEADERS = 256;
const partSize = (file) => file.size + PART_HEADERS + 3 * file.name.length;

// Groups of files that each fit one request (count and body size); files too large to be
// sent at all are reported at once.
function splitUpload(files, label, { max_upload_bytes: maxBytes, max_images_per_request: maxCount }) {
  const budget = maxBytes - PART_HEADERS - 3 * label.length - 1024;
  const groups = [], tooLarge = [];
  let group = [], bytes = 0;
  for (const file of files) {
    const size = partSize(file);
    if (size > budget) {
      tooLarge.push(file);
      continue;
    }
    if (group.length >= maxCount || bytes + size > budget) {
      groups.push(group);
      group = [];
      bytes = 0;
    }
    group.push(file);
    bytes += size;
  }
  if (group.length) groups.push(group);
  return { groups, tooLarge };
}

const megabytes = (bytes) => `${(bytes / 1048576).toFixed(1)} MB`;
const named = (file, message) => (message.startsWith(`${file.name}:`) ? message : `${file.name}: ${message}`);

// Sends the files in as many requests as the server's limits need. A request the server
// refuses for what it holds (a 400 naming a file, 413, 415) is split in two and each half
// sent again, down to single files: one bad file costs only itself. Missing or wrong keys, and a busy server
// or library (503: the server may have waited a minute for another process's write), stop
// everything: every later request would get the same answer, each after the same wait.
async function addImages(label, files) {
  const { groups, tooLarge } = splitUpload(files, label, await serverLimits());
  const outcome = { label, added: 0, duplicates: [], failed: [], settled: tooLarge.length };
  for (const file of tooLarge) {
    outcome.failed.push(`${file.name}: ${megabytes(file.size)}, over the server's ` +
      `${limits.max_upload_mb} MB limit on a request`);
  }
  const progress = () => setStatus("add-status",
    `adding… ${outcome.settled} of ${files.length} files done, ${outcome.added} added`);
  async function send(group) {
    const form = new FormData();
    form.append("label", label);
    for (const file of group) form.append("image", file);
    try {
      const body = await api("v1/gallery/images", { method: "POST", body: form });
      outcome.label = body.label;
      outcome.added += body.added.length;
      // Those the gallery has under another label are named with it: a mistake, or meant to
      // move them, and not added either way.
      const skipped = [...body.duplicates];
      for (const other of body.elsewhere) {
        const at = skipped.indexOf(other.name); // listed in duplicates too
        if (at >= 0) skipped.splice(at, 1);
        outcome.failed.push(`${other.name}: already in the gallery as "${other.label}" ` +
          `(image ${other.image_id}); to label it "${body.label}", delete it from ` +
          `"${other.label}", then add it again`);
      }
      outcome.duplicates.push(...skipped);
    } catch (error) {
      // The server names the file a 400 is about; one that names none is about the request
      // (the label: empty, too long), which every other request would repeat.
      const aboutAFile = group.some((file) => error.message.startsWith(`${file.name}:`));
      if (error.status === 400 && !aboutAFile) throw error;
      if (group.length > 1 && [400, 413, 415].includes(error.status)) {
        const half = Math.ceil(group.length / 2);
        await send(group.slice(0, half));
        await send(group.slice(half));
        return;
      }
      if (!error.status || [401, 403, 503].includes(error.status)) throw error;
      for (const file of group) outcome.failed.push(named(file, error.message));
    }
    outcome.settled += group.length;
    progress();
  }
  progress();
  try {
    for (const group of groups) await send(group);
  } catch (error) {
    if (outcome.added) {
      error.message += ` (${plural(outcome.added, "image")} added before that: adding the ` +
        "same files again skips them)";
    }
    throw error;
  } finally {
    if (outcome.added) await refresh(outcome.label);
  }
  return outcome;
}

// A new label written as a listed one is, case and accents aside ("banana" beside "Banana"),
// most likely a slip: its images would make a second label of the same product, silently
// (`shitu index add` warns of it). Asked first, `action` saying what would be done ("add the
// images to a new label"); true to go on. `renamed`: the label being renamed, no look-alike
// of its own new name ("banana" to "Banana" only changes its case).
function newLabelConfirmed(typed, action, renamed = null) {
  const wanted = typed.trim().normalize("NFC"); // as the server keeps labels
  if (labels.some((entry) => entry.label === wanted)) return true;
  const like = labels.find((entry) => entry.label !== renamed && folded(entry.label) === folded(wanted));
  return !like || confirm(`The gallery has "${like.label}" (${plural(like.count, "image")}), ` +
    `not "${wanted}": ${action} "${wanted}"?`);
}

function reportAdded({ label, added, duplicates, failed }) {
  let text = `added ${added} to "${label}"`;
  if (duplicates.length) text += `, skipped ${duplicates.length} already in the gallery`;
  if (failed.length) text += `; ${failed.length} could not be added:`;
  setStatus("add-status", text, failed.length ? "error" : "ok");
  const list = $("add-failures");
  list.replaceChildren(...failed.map((reason) => Object.assign(document.createElement("li"), { textContent: reason })));
  if (failed.length) list.scrollIntoView({ block: "nearest" });
}

// ---------------------------------------------------------------------------- dropped files

const carriesFiles = (event) => event.dataTransfer.types.includes("Files");

// Files dragged onto `zone` are handed to `take`; `zone` is outlined while they are over it.
function acceptDrops(zone, take) {
  zone.addEventListener("dragover", (event) => {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
    zone.classList.add("dropping");
  });
  zone.addEventListener("dragleave", (event) => {
    if (!zone.contains(event.relatedTarget)) zone.classList.remove("dropping");
  });
  zone.addEventListener("drop", (event) => {
    if (!carriesFiles(event)) return; // text into a text field
    event.preventDefault();
    zone.classList.remove("dropping");
    if (event.dataTransfer.files.length) take(event.dataTransfer.files);
  });
}

// Files dropped outside the drop zones are refused: the browser would leave the page (and
// what it shows) to open the file. Dragged text still drops into text fields.
function refuseStrayDrops() {
  window.addEventListener("dragover", (event) => {
    if (event.defaultPrevented || !carriesFiles(event)) return; // over a drop zone, or text
    event.preventDefault();
    event.dataTransfer.dropEffect = "none";
  });
  window.addEventListener("drop", (event) => {
    if (carriesFiles(event)) event.preventDefault();
  });
}

// Puts `files` into a file input, as if chosen in its dialog, and tells its listeners.
function choose(input, files) {
  const chosen = new DataTransfer();
  for (const file of input.multiple ? files : [files[0]]) chosen.items.add(file);
  input.files = chosen.files;
  input.dispatchEvent(new Event("change"));
}

// ---------------------------------------------------------------------------- wiring

// The selected label's Rename and Delete label: one edit of the label at a time.
const labelButtons = () => $("rename-form").querySelectorAll("button");

window.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
  $("api-key").addEventListener("change", () => {
    keyChange++;
    sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
    attempt(() => refresh(selected));
  });
  // Opening the file dialog forgets the photo chosen before: the same photo chosen again (once
  // the API key is right, or the gallery has its label) is a change, and is recognised again.
  $("photo").addEventListener("click", () => { $("photo").value = ""; });
  $("photo").addEventListener("change", () => {
    const file = $("photo").files[0];
    if (file) attempt(() => recognise(file), "recognise-status");
  });
  refuseStrayDrops();
  acceptDrops($("recognise"), (files) => choose($("photo"), files));
  acceptDrops($("add-form"), (files) => choose($("add-files"), files));
  $("label-filter").addEventListener("input", renderLabels);
  window.addEventListener("resize", () => { // a caption's size on screen follows the photo's
    const image = $("photo-view");
    if (drawn.length && !image.hidden) drawBoxes(drawn, image.naturalWidth, image.naturalHeight);
  });
  $("rename-form").addEventListener("submit", (event) => {
    event.preventDefault();
    attempt(() => withDisabled(labelButtons(), async () => {
      const old = selected;
      const wanted = $("rename-input").value.trim().normalize("NFC"); // as the server keeps labels
      const existing = labels.find((entry) => entry.label === wanted && entry.label !== old);
      if (existing && !confirm(`"${wanted}" already has ${plural(existing.count, "image")}: ` +
        `merge the images of "${old}" into it?`)) return;
      if (!newLabelConfirmed(wanted, `rename "${old}" to a new label`, old)) return;
      setStatus("label-status", `${existing ? "merging" : "renaming"} "${old}"…`);
      let body;
      try {
        body = await api(labelPath(old), {
          method: "PATCH",
          headers: { "Content-Type": "application/json" },
          // Merges only where asked: a label another client gave images since the list was
          // drawn is refused (409), not merged into unasked.
          body: JSON.stringify({ label: $("rename-input").value, merge: Boolean(existing) }),
        });
      } catch (error) {
        if (error.status !== 409) throw error;
        const typed = $("rename-input").value;
        await refresh(old); // lists the label that came, so that renaming again asks
        $("rename-input").value = typed;
        throw new Error(`"${wanted}" has images now, added elsewhere: rename again to merge`);
      }
      setStatus("label-status", existing
        ? `merged "${body.old}" into "${body.new}": ${plural(body.count, "image")} moved, ` +
          `${plural(existing.count + body.count, "image")} now`
        : `renamed "${body.old}" to "${body.new}" (${plural(body.count, "image")})`, "ok");
      await refresh(body.new);
    }), "label-status");
  });
  $("delete-label").addEventListener("click", () => attempt(() => withDisabled(labelButtons(), async () => {
    const { count } = labels.find((entry) => entry.label === selected); // how much goes
    if (!confirm(`Delete "${selected}" and its ${plural(count, "image")}?`)) return;
    setStatus("label-status", `deleting "${selected}"…`);
    const body = await api(labelPath(selected), { method: "DELETE" });
    setStatus("label-status", `deleted ${plural(body.removed.length, "image")}`, "ok");
    await refresh(null);
    $("label-title").focus(); // the button that had it is hidden
  }), "label-status"));
  $("add-form").addEventListener("submit", (event) => {
    event.preventDefault();
    attempt(() => withDisabled($("add-form").querySelectorAll("button"), async () => {
      $("add-failures").replaceChildren();
      if (!newLabelConfirmed($("add-label").value, "add the images to a new label")) return;
      const outcome = await addImages($("add-label").value, [...$("add-files").files]);
      reportAdded(outcome);
      if (!outcome.failed.length) $("add-files").value = "";
    }), "add-status");
  });
  attempt(() => refresh(null));
});
