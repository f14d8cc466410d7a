// The shopper page: search the catalog with a photo, then "more like this" from any result.
(function () {
  "use strict";
  const form = document.getElementById("search-form");
  const input = document.getElementById("photo");
  const dropZone = document.getElementById("drop-zone");
  const preview = document.getElementById("preview");
  const category = document.getElementById("category");
  const statusLine = document.getElementById("status");
  const results = document.getElementById("results");
  const heading = document.getElementById("results-heading");
  const insights = document.getElementById("insights");
  const template = document.getElementById("result-template");
  const csrfToken = form.querySelector("input[name=csrfmiddlewaretoken]").value;
  let photo = null;

  function say(text, isError) {
    statusLine.textContent = text;
    statusLine.classList.toggle("error", Boolean(isError));
  }

  function choose(file) {
    if (!file) return;
    photo = file;
    preview.src = URL.createObjectURL(file);
    preview.hidden = false;
    search({ image: file });
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
    if (photo) search({ image: photo }); else say("Choose a photo first.", true);
  });
  category.addEventListener("change", () => { if (photo) search({ image: photo }); });

  async function search(query) {
    const body = new FormData();
    if (query.image) body.append("image", query.image);
    if (query.product) body.append("product", query.product);
    if (category.value) body.append("category", category.value);
    say("Searching…");
    let response, data;
    try {
      response = await fetch("/api/search/", { method: "POST", body, headers: { "X-CSRFToken": csrfToken } });
      data = await response.json();
    } catch (error) {
      say("The search service could not be reached. Try again in a moment.", true);
      return;
    }
    if (!response.ok) {
      say(data.error || "The search failed.", true);
      return;
    }
    show(data);
  }

  function show(data) {
    results.replaceChildren();
    heading.hidden = false;
    insights.hidden = !(data.predicted_categories.length || data.labels.length);
    document.getElementById("predicted").textContent =
      data.predicted_categories.map((p) => `${p.category.path} (${Math.round(p.score * 100)}%)`).join(", ") || "—";
    document.getElementById("labels").textContent =
      data.labels.slice(0, 3).map((l) => `${l.label} (${Math.round(l.score * 100)}%)`).join(", ") || "—";
    for (const hit of data.results) {
      const card = template.content.firstElementChild.cloneNode(true);
      const product = hit.product;
      card.querySelector(".thumb").src = product.image_url || "";
      card.querySelector(".thumb").alt = product.title;
      card.querySelector(".title").textContent = product.title;
      card.querySelector(".price").textContent = product.price ? `${product.price} ${product.currency}` : "";
      card.querySelector(".category").textContent = product.category ? product.category.path : "";
      card.querySelector(".score").textContent = `similarity ${hit.score.toFixed(2)}`;
      const more = card.querySelector(".more");
      more.setAttribute("aria-label", `More like ${product.title}`);
      more.addEventListener("click", () => {
        photo = null;
        preview.hidden = true;
        search({ product: product.id });
      });
      card.dataset.sku = product.sku;
      results.appendChild(card);
    }
    say(data.results.length
      ? `${data.results.length} similar products (${data.took_ms} ms).`
      : "No similar products found.");
  }
})();
