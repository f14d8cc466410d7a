// The shopper page: search the catalog with a photo (or a region of it), then "more like this" from any result.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const form = $("search-form");
  const main = document.querySelector("main");
  const input = $("photo");
  const dropZone = $("drop-zone");
  const photoArea = $("photo-area");
  const frame = $("photo-frame");
  const preview = $("preview");
  const boxes = $("boxes");
  const drawn = $("drawn");
  const wholePhoto = $("whole-photo");
  const context = $("context");
  const category = $("category");
  const minPrice = $("min-price");
  const maxPrice = $("max-price");
  const button = $("search-button");
  const statusLine = $("status");
  const results = $("results");
  const heading = $("results-heading");
  const weakResults = $("weak-results");
  const weakHeading = $("weak-heading");
  const insights = $("insights");
  const empty = $("empty");
  const showMore = $("show-more");
  const template = $("result-template");
  const csrfToken = form.querySelector("input[name=csrfmiddlewaretoken]").value;
  const PAGE = 10;
  const MOST = 100;

  // The last query: {image, box} for a photo, {product, title} for "more like this". Filters re-run it.
  let query = null;
  let photo = null;
  let k = PAGE;
  let busy = false;

  function say(text, isError) {
    statusLine.textContent = text;
    statusLine.classList.toggle("error", Boolean(isError));
  }

  function clearResults() {
    results.replaceChildren();
    weakResults.replaceChildren();
    heading.hidden = weakHeading.hidden = insights.hidden = empty.hidden = showMore.hidden = true;
  }

  function choose(file) {
    if (!file) return;
    photo = file;
    preview.src = URL.createObjectURL(file);
    photoArea.hidden = false;
    context.hidden = true;
    boxes.replaceChildren();
    drawn.hidden = true;
    wholePhoto.hidden = true;
    k = PAGE;
    search({ image: file, box: null });
  }

  input.addEventListener("change", () => choose(input.files[0]));
  ["dragenter", "dragover"].forEach((name) => dropZone.addEventListener(name, (event) => {
    event.preventDefault();
    dropZone.classList.add("dragover");
  }));
  ["dragleave", "drop"].forEach((name) => dropZone.addEventListener(name, (event) => {
    event.preventDefault();
    dropZone.classList.remove("dragover");
  }));
  dropZone.addEventListener("drop", (event) => choose(event.dataTransfer.files[0]));
  dropZone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); input.click(); }
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (query) { k = PAGE; search(query); } else say("Choose a photo first.", true);
  });
  // A filter changed: the same query again, photo or "more like this".
  [category, minPrice, maxPrice].forEach((field) => field.addEventListener("change", () => {
    if (query) { k = PAGE; search(query); }
  }));
  showMore.addEventListener("click", () => { k = Math.min(MOST, k + PAGE); search(query); });
  $("widen").addEventListener("click", () => { category.value = ""; k = PAGE; search(query); });
  $("back").addEventListener("click", () => {
    context.hidden = true;
    if (photo) { photoArea.hidden = false; k = PAGE; search({ image: photo, box: null }); } else { query = null; clearResults(); say(""); }
  });
  wholePhoto.addEventListener("click", () => { drawn.hidden = true; k = PAGE; search({ image: photo, box: null }); });

  // ----- a region of the photo: one of the objects found, or a box drawn by hand (mouse or touch) -----
  function pick(box) {
    for (const other of boxes.children) other.classList.toggle("chosen", other.dataset.box === box.join(","));
    wholePhoto.hidden = false;
    k = PAGE;
    search({ image: photo, box });
  }

  function showObjects(objects) {
    boxes.replaceChildren();
    objects.forEach((found, number) => {
      const [x0, y0, x1, y1] = found.box;
      const choice = document.createElement("button");
      choice.type = "button";
      choice.textContent = `Object ${number + 1}`;
      choice.setAttribute("aria-label", `Search object ${number + 1} only`);
      choice.dataset.box = found.box.join(",");
      Object.assign(choice.style, { left: `${x0 * 100}%`, top: `${y0 * 100}%`, width: `${(x1 - x0) * 100}%`, height: `${(y1 - y0) * 100}%` });
      choice.addEventListener("click", () => { if (!dragEnded) { drawn.hidden = true; pick(found.box); } });
      boxes.appendChild(choice);
    });
  }

  // A drag anywhere on the photo draws a box, even one that starts on an object; a tap on an object picks it.
  let start = null;
  let dragging = false;
  let dragEnded = false;  // the click that ends a drag on an object's button is not a pick of that object
  function fraction(event) {
    const rect = preview.getBoundingClientRect();
    return [Math.min(1, Math.max(0, (event.clientX - rect.left) / rect.width)),
            Math.min(1, Math.max(0, (event.clientY - rect.top) / rect.height))];
  }
  function drawTo(point) {
    const [x0, x1] = [Math.min(start[0], point[0]), Math.max(start[0], point[0])];
    const [y0, y1] = [Math.min(start[1], point[1]), Math.max(start[1], point[1])];
    Object.assign(drawn.style, { left: `${x0 * 100}%`, top: `${y0 * 100}%`, width: `${(x1 - x0) * 100}%`, height: `${(y1 - y0) * 100}%` });
    drawn.hidden = false;
    return [x0, y0, x1, y1];
  }
  frame.addEventListener("pointerdown", (event) => {
    if (!photo) return;
    start = fraction(event);
    dragging = false;
    if (!event.target.closest(".boxes button")) event.preventDefault();  // no image drag, no text selection
  });
  frame.addEventListener("pointermove", (event) => {
    if (!start) return;
    const point = fraction(event);
    if (!dragging && Math.abs(point[0] - start[0]) < 0.03 && Math.abs(point[1] - start[1]) < 0.03) return;
    if (!dragging) { dragging = true; frame.setPointerCapture(event.pointerId); }
    drawTo(point);
  });
  frame.addEventListener("pointercancel", () => { start = null; dragging = false; drawn.hidden = true; });
  frame.addEventListener("pointerup", (event) => {
    if (!start) return;
    const drew = dragging;
    const box = drew ? drawTo(fraction(event)).map((v) => Math.round(v * 10000) / 10000) : null;
    start = null;
    dragging = false;
    if (!drew) return;  // a tap: an object's button takes it as its click
    dragEnded = true;
    setTimeout(() => { dragEnded = false; }, 0);
    if (box[2] - box[0] < 0.03 || box[3] - box[1] < 0.03) { drawn.hidden = true; return; }
    pick(box);
  });

  // ----- searching -----------------------------------------------------------------------------
  async function post(url, body) {
    const response = await fetch(url, { method: "POST", body, headers: { "X-CSRFToken": csrfToken } });
    return { response, data: await response.json() };
  }

  async function search(next) {
    if (busy) return;
    query = next;
    const body = new FormData();
    if (next.image) body.append("image", next.image);
    if (next.box) body.append("box", next.box.join(","));
    if (next.product) body.append("product", next.product);
    if (category.value) body.append("category", category.value);
    if (minPrice.value) body.append("min_price", minPrice.value);
    if (maxPrice.value) body.append("max_price", maxPrice.value);
    body.append("k", String(k));
    busy = true;
    button.disabled = true;
    main.classList.add("busy");
    main.setAttribute("aria-busy", "true");
    say("Searching…");
    try {
      const { response, data } = await post("/api/search/", body);
      if (!response.ok) {
        clearResults();
        say(data.error || "The search failed.", true);
        return;
      }
      show(data, next);
    } catch (error) {
      clearResults();
      say("The search service could not be reached. Try again in a moment.", true);
    } finally {
      busy = false;
      button.disabled = false;
      main.classList.remove("busy");
      main.removeAttribute("aria-busy");
    }
  }

  function card(hit) {
    const item = template.content.firstElementChild.cloneNode(true);
    const product = hit.product;
    item.querySelector(".thumb").src = product.image_url || "";
    item.querySelector(".thumb").alt = product.title;
    item.querySelector(".title").textContent = product.title;
    item.querySelector(".price").textContent = product.price ? `${product.price} ${product.currency}` : "";
    item.querySelector(".category").textContent = product.category ? product.category.path : "";
    if (hit.match === "same_product") {
      item.classList.add("same");
      item.querySelector(".badge").hidden = false;
    }
    item.dataset.sku = product.sku;
    item.dataset.match = hit.match;
    const more = item.querySelector(".more");
    more.setAttribute("aria-label", `More like ${product.title}`);
    more.addEventListener("click", () => {
      photoArea.hidden = true;  // the photo is not what this search is about
      context.hidden = false;
      $("context-text").textContent = `More like “${product.title}”.`;
      $("back").textContent = photo ? "Back to your photo" : "New search";
      k = PAGE;
      search({ product: product.id, title: product.title });
    });
    const why = item.querySelector(".why");
    why.setAttribute("aria-label", `Why ${product.title} matched`);
    why.addEventListener("click", () => explain(item, hit, why));
    return item;
  }

  async function explain(item, hit, why) {
    const panel = item.querySelector(".explanation");
    if (!panel.hidden) { panel.hidden = true; return; }
    const body = new FormData();
    if (query.image) body.append("image", query.image);
    if (query.box) body.append("box", query.box.join(","));
    if (query.product) body.append("product", query.product);
    body.append("image_id", String(hit.image));
    why.disabled = true;
    try {
      const { response, data } = await post("/api/search/explain/", body);
      if (!response.ok) { say(data.error || "Could not explain this match.", true); return; }
      item.querySelector(".query-heat").src = data.query_heatmap;
      item.querySelector(".match-heat").src = data.match_heatmap;
      panel.hidden = false;
    } catch (error) {
      say("The search service could not be reached. Try again in a moment.", true);
    } finally {
      why.disabled = false;
    }
  }

  function show(data, searched) {
    clearResults();
    if (searched.image && !searched.box) showObjects(data.objects || []);
    const predicted = data.predicted_categories.filter((p) => Math.round(p.score * 100) >= 1);
    insights.hidden = !(predicted.length || data.labels.length);
    $("predicted").textContent = predicted.map((p) => `${p.category.path} (${Math.round(p.score * 100)}%)`).join(", ") || "—";
    $("labels").textContent = data.labels.slice(0, 3).map((l) => `${l.label} (${Math.round(l.score * 100)}%)`).join(", ") || "—";
    const strong = data.results.filter((hit) => hit.match !== "weak");
    const weak = data.results.filter((hit) => hit.match === "weak");
    strong.forEach((hit) => results.appendChild(card(hit)));
    weak.forEach((hit) => weakResults.appendChild(card(hit)));
    heading.hidden = !strong.length;
    weakHeading.hidden = !weak.length;
    showMore.hidden = data.results.length < k || k >= MOST;
    if (!data.results.length) {
      empty.hidden = !category.value;
      say(category.value ? "No similar products in this category." : "No similar products found.");
      return;
    }
    const same = strong.filter((hit) => hit.match === "same_product").length;
    say(`${data.results.length} similar products${same ? ", this product among them" : ""} (${data.took_ms} ms).`);
  }
})();
