/**
 * moodstream's page: upload a track or pick one from the catalog, and see its moods.
 *
 * It talks to the service's JSON API only (pipeline/service/routes.py):
 *   POST /v1/analyses                      multipart field `file` → a tracks.moods v3 record
 *   GET  /v1/moods                         the mood families
 *   GET  /v1/tracks?mood=m&limit=50        track summaries ranked by that mood's score (newest first without)
 *   GET  /v1/tracks/{id}                   a stored record
 *   GET  /v1/tracks/{id}/audio             its audio, for the player
 *   GET  /v1/tracks/{id}/similar?limit=10  its nearest neighbours by embedding
 * Errors arrive as application/problem+json {type, title, status, detail, reason}.
 *
 * Everything taken from a record goes onto the page as text (textContent, attributes), never
 * as HTML: track ids and tags come from uploads and catalogs we do not control. The service's
 * Content-Security-Policy forbids inline script, so this file holds every handler.
 * A stored track's view has an address (#track=<id>), so it can be linked and reloaded.
 *
 * Credentials (where the service requires them, docs/http-api.md): a gateway in front may add
 * the Authorization header itself, and the page then does nothing. Otherwise the page sends the
 * bearer token it is given: in its address as #access_token=<token> (moved at once into this
 * tab's sessionStorage and out of the address and history) or already in sessionStorage under
 * "moodstream.token".
 */
import uPlot from "/static/vendor/uplot/uPlot.esm.js";

const CATALOG_LIMIT = 50;
const SIMILAR_LIMIT = 10;
const CHART_HEIGHT = 260;
// The mood plane's SVG is 200 units square: the origin in the middle, ±1 at 90 units from it.
const PLANE_CENTRE = 100;
const PLANE_RADIUS = 90;
// One line colour per family of pipeline/stages/moods.toml, spares for families added later: hues
// after Okabe–Ito (told apart with the common colour-vision deficiencies), darkened where needed
// so that every line keeps 3:1 contrast against the white plot (WCAG 1.4.11).
const MOOD_COLOURS = {
  happy: "#8A6D00", sad: "#0072B2", relaxed: "#009E73", energetic: "#AA3377",
  aggressive: "#D55E00", tender: "#6A51A3", dark: "#000000",
};
const SPARE_COLOURS = ["#7F7F7F", "#8C564B"];
const QUADRANT_NAMES = ["happy", "angry", "sad", "relaxed"];
const KEY_NAMES = ["C", "C♯", "D", "E♭", "E", "F", "F♯", "G", "A♭", "A", "B♭", "B"];
// The 0–1 audio features drawn as bars, in Spotify's meanings (docs/audio-features.md).
const FEATURE_BARS = ["energy", "danceability", "valence", "acousticness", "instrumentalness", "speechiness", "liveness"];

const TOKEN_KEY = "moodstream.token";

const $ = (id) => document.getElementById(id);

/** Move a token handed over in the address (#access_token=…) into this tab's storage. */
function takeTokenFromAddress() {
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get("access_token");
  if (token === null) return;
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  for (const name of ["access_token", "token_type", "expires_in", "scope"]) params.delete(name);
  const rest = params.toString();
  history.replaceState(null, "", location.pathname + location.search + (rest ? `#${rest}` : ""));
}

/** The Authorization header for the token this page was given, if any. */
function credentials() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

/** What went wrong with a request, as the API's problem document describes it. */
class Problem extends Error {
  constructor({ status, title, detail = "", reason = "", retryAfter = null }) {
    super(title);
    Object.assign(this, { status, title, detail, reason, retryAfter });
  }
}

/** The JSON body of a successful answer; a Problem for anything else. */
async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, {
      ...options,
      headers: { Accept: "application/json, application/problem+json", ...credentials() },
    });
  } catch (err) {
    throw new Problem({ status: 0, title: "The service does not answer", detail: err.message, reason: "unreachable" });
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    throw new Problem({
      status: response.status,
      title: body?.title ?? (response.statusText || `HTTP ${response.status}`),
      detail: body?.detail ?? "",
      reason: body?.reason ?? "",
      retryAfter: response.headers.get("Retry-After"),
    });
  }
  if (body === null) {
    throw new Problem({ status: response.status, title: "Unexpected answer", detail: `${path} did not answer JSON`, reason: "bad_response" });
  }
  return body;
}

/** A Problem for whatever a handler caught: bugs of the page get shown rather than lost. */
function asProblem(err) {
  if (err instanceof Problem) return err;
  console.error(err);
  return new Problem({ status: 0, title: "The page could not show the answer", detail: String(err), reason: "page_error" });
}

/** A new element; string children become text nodes. */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

const clamp = (x, lo, hi) => Math.min(hi, Math.max(lo, x));
const fmtScore = (x) => (x == null ? "–" : x.toFixed(2));
const fmtPercent = (x) => `${Math.round(x * 100)} %`;
const fmtSeconds = (x) => `${x.toFixed(1)} s`;

// --- status and problems ------------------------------------------------------------------

function showStatus(text) {
  $("status").textContent = text;
}

function showProblem(problem) {
  $("problem-title").textContent = problem.title;
  $("problem-status").textContent = problem.status ? `(HTTP ${problem.status})` : "";
  $("problem-detail").textContent = problem.detail;
  const retry = $("problem-retry");
  // 503 is "busy" (too many analyses in flight) or "unavailable" (a store it needs is down);
  // 429 is this client over its own rate.
  retry.hidden = problem.status !== 503 && problem.status !== 429;
  if (!retry.hidden) {
    // Retry-After may also be an HTTP date; only a number of seconds is worth reading out.
    const seconds = /^\d+$/.test(problem.retryAfter ?? "") ? Number(problem.retryAfter) : null;
    const when = seconds === null ? "later" : `in ${seconds} s`;
    const state = problem.reason === "unavailable" ? "unavailable" : "busy";
    retry.textContent = problem.status === 429
      ? `You have sent many requests in a short time; try again ${when}.`
      : `The service is ${state}, try again ${when}.`;
  }
  $("problem-reason").textContent = problem.reason || "not given";
  $("problem").hidden = false;
}

function clearProblem() {
  $("problem").hidden = true;
}

// --- the result view ----------------------------------------------------------------------

let chart = null;
// Each request that ends in the result view takes a number; only the latest may draw, so a
// slow answer cannot replace the track the user asked for after it.
let viewRequest = 0;
let similarRequest = 0;

function hideResult() {
  chart?.destroy();
  chart = null;
  resetPlayer();
  const result = $("result");
  result.hidden = true;
  delete result.dataset.trackId;
  markCurrent();
}

function showRecord(record, localAudio = null) {
  const result = $("result");
  result.dataset.trackId = record.track_id;
  $("result-title").textContent = record.title || record.track_id;
  $("result-artist").textContent = record.artist ?? "";
  $("result-track").textContent = record.title ? `(${record.track_id})` : "";
  $("result-meta").textContent = describeRecord(record);
  showLeading(record.leading_mood);
  showMoodBars(record.moods ?? {});
  showQuadrants(record);
  showFeatures(record.audio_features);
  showPlane(record);
  showTags(record.top_tags ?? {});
  showTimelineTable(record.timeline ?? [], record.audio_features?.sections ?? []);
  $("record-json").textContent = JSON.stringify(record, null, 2);
  result.hidden = false;  // before the chart: uPlot sizes itself to the visible container
  showTimeline(record);
  preparePlayer(record, localAudio);
  showSimilar(record.track_id);
  markCurrent();
  $("result-heading").focus();
}

function describeRecord(record) {
  const parts = [];
  if (record.model) parts.push(`model ${record.model.name} ${record.model.version}`);
  if (record.duration_s != null) {
    const analysed = record.analysed_s != null && record.analysed_s < record.duration_s ? ` (${fmtSeconds(record.analysed_s)} analysed)` : "";
    parts.push(`${fmtSeconds(record.duration_s)}${analysed}`);
  }
  if (record.processed_at) parts.push(`processed ${record.processed_at}`);
  return parts.join(" · ");
}

function showLeading(leading) {
  $("leading-mood").textContent = leading?.mood ?? "none";
  $("leading-confidence").textContent = leading ? `(${fmtPercent(leading.confidence)})` : "";
  $("leading-unclear").hidden = !leading || leading.clear;
}

/** One labelled horizontal bar: a meter for assistive technology, a filled track to the eye. */
function bar(kind, label, score, data) {
  const fill = el("div", { class: "bar-fill" });
  fill.style.width = `${clamp(score, 0, 1) * 100}%`;
  const meter = el("div", {
    class: kind, role: "meter", "aria-label": label, "aria-valuemin": "0", "aria-valuemax": "1",
    "aria-valuenow": String(score), "aria-valuetext": fmtScore(score), dataset: data,
  }, fill);
  // The meter carries label and value for screen readers; the visible copies would repeat them.
  return el("li", {},
    el("span", { class: "bar-label", "aria-hidden": "true" }, label),
    meter,
    el("span", { class: "bar-value", "aria-hidden": "true" }, fmtScore(score)));
}

/** Families by score, highest first (the order of the bars and of the chart's legend). */
const rankedFamilies = (moods) => Object.keys(moods).sort((a, b) => moods[b] - moods[a]);

function showMoodBars(moods) {
  $("mood-bars").replaceChildren(...rankedFamilies(moods).map((m) => bar("mood-bar", m, moods[m], { mood: m })));
}

function showQuadrants(record) {
  const probabilities = record.quadrant_probabilities;
  $("quadrant-bars").replaceChildren(...(probabilities
    ? QUADRANT_NAMES.map((q) => bar("quadrant-bar", q, probabilities[q], { quadrant: q }))
    : []));
  $("quadrant-note").textContent = probabilities
    ? "How likely a listener would place the music in each quadrant of the mood plane."
    : "This record has no quadrant probabilities.";
}

const keyName = (key, mode) => (key >= 0 ? `${KEY_NAMES[key]} ${mode === 1 ? "major" : "minor"}` : "no key");

function showFeatures(features) {
  const list = $("features-list");
  if (!features) {
    list.replaceChildren(el("dt", {}, "Audio features"), el("dd", {}, "not in this record"));
    $("feature-bars").replaceChildren();
    return;
  }
  const facts = [
    ["Tempo", features.tempo ? `${features.tempo.toFixed(1)} BPM (confidence ${fmtScore(features.tempo_confidence)})` : "no pulse"],
    ["Meter", features.time_signature > 0 ? `${features.time_signature}/4` : "–"],
    ["Key", `${keyName(features.key, features.mode)}${features.key >= 0 ? ` (confidence ${fmtScore(features.key_confidence)})` : ""}`],
    ["Loudness", features.loudness == null ? "silent" : `${features.loudness.toFixed(1)} LUFS`],
    ["Loudness range", features.loudness_range == null ? "–" : `${features.loudness_range.toFixed(1)} LU`],
    ["True peak", features.true_peak == null ? "–" : `${features.true_peak.toFixed(1)} dBTP`],
    ["Beats", `${features.beats.length} (${features.downbeats.length} bars)`],
  ];
  if (features.analysed === "excerpts") facts.push(["Analysed", "excerpts only"]);
  list.replaceChildren(...facts.flatMap(([name, value]) => [el("dt", {}, name), el("dd", {}, value)]));
  $("feature-bars").replaceChildren(...FEATURE_BARS
    .filter((name) => features[name] != null)
    .map((name) => bar("feature-bar", name, features[name], { feature: name })));
}

function showTags(topTags) {
  $("tag-networks").replaceChildren(...Object.entries(topTags).map(([network, ranked]) =>
    el("section", {},
      el("h4", {}, network),
      el("ul", { class: "bars" }, ...ranked.map((t) => bar("tag-bar", t.tag, t.score, { network, tag: t.tag }))))));
}

function showPlane(record) {
  const { valence, arousal, quadrant } = record;
  const point = $("va-point");
  const known = valence != null && arousal != null;
  point.style.display = known ? "" : "none";
  if (known) {
    point.setAttribute("cx", String(PLANE_CENTRE + PLANE_RADIUS * clamp(valence, -1, 1)));
    point.setAttribute("cy", String(PLANE_CENTRE - PLANE_RADIUS * clamp(arousal, -1, 1)));
  }
  const text = known ? `valence ${fmtScore(valence)} · arousal ${fmtScore(arousal)} · quadrant ${quadrant}` : "no valence or arousal in this record";
  $("va-title").textContent = `Mood plane: ${text}`;
  $("va-text").textContent = text;
}

/** A segment's score for one family; records before schema 2.1 only carry their top moods'. */
function segmentScore(segment, mood) {
  if (segment.moods) return segment.moods[mood] ?? null;
  return segment.top_moods.find((m) => m.mood === mood)?.score ?? null;
}

function colourOf(mood, index) {
  return MOOD_COLOURS[mood] ?? SPARE_COLOURS[index % SPARE_COLOURS.length];
}

function showTimeline(record) {
  chart?.destroy();
  chart = null;
  const container = $("timeline-chart");
  container.replaceChildren();
  const segments = record.timeline ?? [];
  if (!segments.length) {
    container.append(el("p", { class: "muted" }, "This record has no timeline."));
    return;
  }
  // Steps: each segment's score holds from its start to the next segment's start (segments
  // overlap by a patch), the last one until its end, so even a single segment draws a line.
  const xs = [...segments.map((s) => s.start_s), segments.at(-1).end_s];
  const families = rankedFamilies(record.moods ?? {});
  const ys = families.map((m) => {
    const values = segments.map((s) => segmentScore(s, m));
    return [...values, values.at(-1)];
  });
  const duration = Math.max(record.duration_s ?? 0, xs.at(-1));
  const stepped = uPlot.paths.stepped({ align: 1 });
  const downbeats = record.audio_features?.downbeats ?? [];
  chart = new uPlot({
    width: container.clientWidth,
    height: CHART_HEIGHT,
    hooks: { draw: [(u) => drawDownbeats(u, downbeats)] },
    scales: { x: { time: false, range: [0, duration] }, y: { range: [0, 1] } },
    axes: [{ label: "seconds" }, { label: "score" }],
    series: [
      { label: "time", value: (u, v) => (v == null ? "–" : fmtSeconds(v)) },
      ...families.map((m, i) => ({
        label: m, stroke: colourOf(m, i), width: 2, paths: stepped, points: { show: false },
        value: (u, v) => fmtScore(v),
      })),
    ],
  }, [xs, ...ys], container);
  const playhead = el("div", { class: "playhead", "aria-hidden": "true" });
  playhead.hidden = true;
  chart.over.append(playhead);
}

/** Thin vertical lines at the bars' first beats, under the mood lines. */
function drawDownbeats(u, downbeats) {
  if (!downbeats.length) return;
  const { ctx } = u;
  const { top, height } = u.bbox;
  ctx.save();
  ctx.strokeStyle = "rgba(0, 0, 0, 0.12)";
  ctx.lineWidth = 1;
  ctx.beginPath();
  for (const t of downbeats) {
    const x = Math.round(u.valToPos(t, "x", true)) + 0.5;
    ctx.moveTo(x, top);
    ctx.lineTo(x, top + height);
  }
  ctx.stroke();
  ctx.restore();
}

/** Put the chart's playhead at ``seconds`` of the track (hidden before the first play). */
function movePlayhead(seconds) {
  const playhead = chart?.over.querySelector(".playhead");
  if (!playhead) return;
  playhead.hidden = false;
  playhead.style.left = `${chart.valToPos(seconds, "x")}px`;
}

function showTimelineTable(segments, sections = []) {
  // A section per timeline segment, at the same start (docs/audio-features.md).
  const sectionAt = (start) => sections.find((x) => Math.abs(x.start - start) < 0.5);
  $("timeline-table").tBodies[0].replaceChildren(...segments.map((s) => {
    const section = sectionAt(s.start_s);
    return el("tr", {},
      el("td", {}, s.start_s.toFixed(1)),
      el("td", {}, s.end_s.toFixed(1)),
      el("td", {}, `${s.leading_mood.mood} ${fmtPercent(s.leading_mood.confidence)}${s.leading_mood.clear ? "" : " (unclear)"}`),
      el("td", {}, s.quadrant),
      el("td", {}, section?.tempo ? `${section.tempo.toFixed(0)} BPM` : "–"),
      el("td", {}, section ? keyName(section.key, section.mode) : "–"),
      el("td", {}, section?.loudness != null ? `${section.loudness.toFixed(1)} LUFS` : "–"));
  }));
}

// --- the player -----------------------------------------------------------------------------

// The object URL the player plays (an upload's own file, or a catalog track's fetched audio).
let playerUrl = null;
let playerFrame = null;

function resetPlayer() {
  const player = $("player");
  player.pause();
  player.removeAttribute("src");
  player.hidden = true;
  if (playerUrl) URL.revokeObjectURL(playerUrl);
  playerUrl = null;
  $("player-load").hidden = true;
  $("player-status").textContent = "";
}

/** Ready the player for ``record``: an upload plays its own file; a catalog track's audio is
 * fetched (with the page's credentials) when the user asks for it. */
function preparePlayer(record, localAudio) {
  resetPlayer();
  if (localAudio) {
    playerUrl = URL.createObjectURL(localAudio);
    $("player").src = playerUrl;
    $("player").hidden = false;
  } else if (record.audio_uri) {
    $("player-load").hidden = false;
    $("player-load").dataset.trackId = record.track_id;
  } else {
    $("player-status").textContent = "No audio to play for this record.";
  }
}

async function loadAudio() {
  const button = $("player-load");
  const trackId = button.dataset.trackId;
  button.disabled = true;
  $("player-status").textContent = "Fetching the audio…";
  try {
    const response = await fetch(`/v1/tracks/${encodeURIComponent(trackId)}/audio`, { headers: credentials() });
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      throw new Problem({ status: response.status, title: body?.title ?? `HTTP ${response.status}`, detail: body?.detail ?? "", reason: body?.reason ?? "" });
    }
    const blob = await response.blob();
    if ($("result").dataset.trackId !== trackId) return;  // the user moved on meanwhile
    playerUrl = URL.createObjectURL(blob);
    const player = $("player");
    player.src = playerUrl;
    player.hidden = false;
    button.hidden = true;
    $("player-status").textContent = "";
    await player.play().catch(() => {});  // a browser may refuse to autoplay: the controls remain
  } catch (err) {
    const problem = asProblem(err);
    $("player-status").textContent = `The audio cannot be played: ${problem.detail || problem.title}`;
  } finally {
    button.disabled = false;
  }
}

function followPlayer() {
  movePlayhead($("player").currentTime);
  playerFrame = $("player").paused ? null : requestAnimationFrame(followPlayer);
}

$("player-load").addEventListener("click", loadAudio);
$("player").addEventListener("play", () => { if (playerFrame === null) followPlayer(); });
$("player").addEventListener("seeked", () => movePlayhead($("player").currentTime));
$("player").addEventListener("timeupdate", () => movePlayhead($("player").currentTime));

// The chart follows its container's width (phone rotation, window resizes).
new ResizeObserver(() => {
  chart?.setSize({ width: $("timeline-chart").clientWidth, height: CHART_HEIGHT });
}).observe($("timeline-chart"));

// --- track lists (catalog, similar tracks) ------------------------------------------------

function trackRow(summary, fact) {
  const facts = [fact];
  if (summary.leading_mood) facts.push(`leading ${summary.leading_mood.mood} ${fmtPercent(summary.leading_mood.confidence)}`);
  if (summary.quadrant) facts.push(summary.quadrant);
  const features = summary.audio_features;
  if (features?.tempo) facts.push(`${features.tempo.toFixed(0)} BPM`);
  if (features && features.key >= 0) facts.push(keyName(features.key, features.mode));
  const name = summary.title ? `${summary.title}${summary.artist ? ` — ${summary.artist}` : ""}` : summary.track_id;
  const button = el("button", { type: "button", class: "track-row", dataset: { trackId: summary.track_id } },
    el("span", { class: "track-id" }, name),
    el("span", { class: "track-facts" }, facts.join(" · ")));
  button.addEventListener("click", () => openTrack(summary.track_id));
  return el("li", {}, button);
}

/** Flag the rows of the track on show, so lists say where the user is. */
function markCurrent() {
  const shown = $("result").dataset.trackId;
  for (const row of document.querySelectorAll(".track-row")) {
    if (row.dataset.trackId === shown) row.setAttribute("aria-current", "true");
    else row.removeAttribute("aria-current");
  }
}

async function showSimilar(trackId) {
  const request = ++similarRequest;
  const status = $("similar-status");
  const list = $("similar-list");
  list.replaceChildren();
  status.textContent = "Looking for similar tracks…";
  try {
    const answer = await api(`/v1/tracks/${encodeURIComponent(trackId)}/similar?limit=${SIMILAR_LIMIT}`);
    if (request !== similarRequest) return;
    list.replaceChildren(...answer.similar.map((s) => trackRow(s, `distance ${s.distance.toFixed(3)}`)));
    status.textContent = answer.similar.length
      ? `Nearest first, by cosine distance between ${answer.network} embeddings.`
      : "No other tracks in the catalog yet.";
    markCurrent();
  } catch (err) {
    if (request !== similarRequest) return;
    const problem = asProblem(err);
    status.textContent = `No similar tracks: ${problem.detail || problem.title}`;
  }
}

async function loadMoods() {
  const select = $("mood-select");
  try {
    const { moods } = await api("/v1/moods");
    select.replaceChildren(el("option", { value: "" }, "Newest first"), ...moods.map((m) => el("option", { value: m }, m)));
    select.disabled = false;
  } catch (err) {
    const problem = asProblem(err);
    select.replaceChildren(el("option", { value: "" }, "Moods unavailable"));
    $("catalog-status").textContent = `The catalog is unavailable: ${problem.title}. ${problem.detail}`;
  }
}

let catalogRequest = 0;

async function loadCatalog() {
  const request = ++catalogRequest;
  const mood = $("mood-select").value;
  const status = $("catalog-status");
  const list = $("catalog-list");
  list.replaceChildren();
  status.textContent = mood ? `Loading the tracks with the highest ${mood} score…` : "Loading the newest tracks…";
  const query = mood ? { mood, limit: CATALOG_LIMIT } : { limit: CATALOG_LIMIT };
  try {
    const { tracks } = await api(`/v1/tracks?${new URLSearchParams(query)}`);
    if (request !== catalogRequest) return;
    list.replaceChildren(...tracks.map((t) => trackRow(t, mood ? `${mood} ${fmtScore(t.score)}` : `processed ${t.processed_at}`)));
    const order = mood ? `highest ${mood} score first` : "newest first";
    status.textContent = tracks.length ? `${tracks.length} tracks, ${order}.` : "No tracks in the catalog yet.";
    markCurrent();
  } catch (err) {
    if (request !== catalogRequest) return;
    const problem = asProblem(err);
    status.textContent = `The catalog is unavailable: ${problem.title}. ${problem.detail}`;
  }
}

// --- actions ------------------------------------------------------------------------------

async function upload(event) {
  event.preventDefault();
  const file = $("upload-file").files[0];
  if (!file) return;  // `required` already stops the submit in browsers that honour it
  const request = ++viewRequest;
  const body = new FormData();
  body.append("file", file, file.name);
  const button = $("upload-submit");
  button.disabled = true;
  clearProblem();
  showStatus(`Analysing ${file.name}…`);
  const started = performance.now();
  try {
    const record = await api("/v1/analyses", { method: "POST", body });
    if (request !== viewRequest) return;
    // An uploaded track is not in the catalog: its view has no address to keep.
    history.replaceState(null, "", location.pathname + location.search);
    showRecord(record, file);
    showStatus(`Analysed ${file.name} in ${fmtSeconds((performance.now() - started) / 1000)}.`);
  } catch (err) {
    if (request !== viewRequest) return;
    hideResult();
    showStatus(`${file.name} could not be analysed.`);
    showProblem(asProblem(err));
  } finally {
    button.disabled = false;
  }
}

async function loadTrack(trackId) {
  const request = ++viewRequest;
  clearProblem();
  showStatus(`Loading ${trackId}…`);
  try {
    const record = await api(`/v1/tracks/${encodeURIComponent(trackId)}`);
    if (request !== viewRequest) return;
    showRecord(record);
    showStatus(`Showing ${trackId} from the catalog.`);
  } catch (err) {
    if (request !== viewRequest) return;
    hideResult();
    showStatus(`${trackId} could not be loaded.`);
    showProblem(asProblem(err));
  }
}

const trackInAddress = () => new URLSearchParams(location.hash.slice(1)).get("track");

function openTrack(trackId) {
  // Setting the same hash again fires no hashchange: load directly then.
  if (trackInAddress() === trackId) loadTrack(trackId);
  else location.hash = new URLSearchParams({ track: trackId }).toString();
}

function route() {
  takeTokenFromAddress();
  const trackId = trackInAddress();
  if (trackId) loadTrack(trackId);
}

$("upload-form").addEventListener("submit", upload);
$("mood-select").addEventListener("change", loadCatalog);
$("catalog-form").addEventListener("submit", (event) => {
  event.preventDefault();  // Enter in the select: the list follows the choice already
  loadCatalog();
});
window.addEventListener("hashchange", route);
takeTokenFromAddress();
loadMoods();
loadCatalog();
route();
