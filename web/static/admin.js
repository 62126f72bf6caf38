/* blendgate admin: a single page over /admin/api (docs/admin-api.md). Vanilla JS, no build step.
 *
 * The admin key lives in sessionStorage and goes out as `Authorization: Bearer KEY` on every request. Nothing
 * but the sign-in form is shown until GET /admin/api/stats accepts the key; any 401 signs out again.
 * Every text that comes from the gateway is set with textContent (entries hold users' questions).
 */
(function () {
  'use strict';

  const API = '/admin/api';
  const KEY_STORAGE = 'blendgate.adminKey';
  const STATS_INTERVAL_MS = 2000;
  const DETAIL_INTERVAL_MS = 5000;
  const UNAVAILABLE_INTERVAL_MS = 30000;
  const HISTORY_POINTS = 300;        // 10 minutes of 2 s snapshots
  const HIT_RATE_WINDOW_S = 30;
  const VIEWS = {
    'overview': 'Overview',
    'semantic-cache': 'Semantic cache',
    'chunk-cache': 'Chunk-cache',
    'entries': 'Entries',
    'configuration': 'Configuration',
  };
  const NOT_ACCEPTED = 'That admin key was not accepted.';
  const COLORS = { requests: '#2f5bd3', semantic: '#2f5bd3', chunk: '#1f9d8a' };

  // ------------------------------------------------------------------------------------------------------
  // Formatting
  const intFormat = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
  const oneDecimal = new Intl.NumberFormat(undefined, { minimumFractionDigits: 1, maximumFractionDigits: 1 });
  const twoDecimals = new Intl.NumberFormat(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 2 });
  const threshold = new Intl.NumberFormat(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 3 });
  const percent = new Intl.NumberFormat(undefined, { style: 'percent', minimumFractionDigits: 1, maximumFractionDigits: 1 });
  const dateTime = new Intl.DateTimeFormat(undefined, {
    year: 'numeric', month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit', second: '2-digit' });
  const shortDate = new Intl.DateTimeFormat(undefined, { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' });
  const clock = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit', second: '2-digit' });
  const axisClock = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit', second: '2-digit', hourCycle: 'h23' });
  const compact = new Intl.NumberFormat(undefined, { notation: 'compact', maximumSignificantDigits: 3 });
  const tick = new Intl.NumberFormat(undefined, { maximumFractionDigits: 2 });
  const DASH = '—';

  const isNum = (v) => typeof v === 'number' && Number.isFinite(v);
  const fmt = {
    int: (v) => (isNum(v) ? intFormat.format(Math.round(v)) : DASH),
    // Tiles: exact up to 99,999, then 1.24M (the exact figure goes in the tile's title).
    big: (v) => (isNum(v) ? (Math.abs(v) < 100000 ? intFormat.format(Math.round(v)) : compact.format(v)) : DASH),
    pct: (v) => (isNum(v) ? percent.format(v) : DASH),
    rate: (v) => (isNum(v) ? (Math.abs(v) < 10 ? twoDecimals.format(v) : oneDecimal.format(v)) : DASH),
    threshold: (v) => (isNum(v) ? threshold.format(v) : DASH),
    ms(v) {
      if (!isNum(v)) return DASH;
      if (v >= 10000) return `${oneDecimal.format(v / 1000)} s`;
      if (v >= 100) return `${intFormat.format(Math.round(v))} ms`;
      return `${oneDecimal.format(v)} ms`;
    },
    duration(s) {
      if (!isNum(s)) return DASH;
      if (s < 60) return `${s < 10 ? oneDecimal.format(s) : intFormat.format(Math.round(s))} s`;
      const parts = [];
      const units = [['d', 86400], ['h', 3600], ['min', 60], ['s', 1]];
      let rest = Math.round(s);
      for (const [name, size] of units) {
        if (rest >= size) {
          parts.push(`${intFormat.format(Math.floor(rest / size))} ${name}`);
          rest %= size;
        }
        if (parts.length === 2) break;
      }
      return parts.join(' ');
    },
    bytes(v) {
      if (!isNum(v)) return DASH;
      const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
      let i = 0;
      while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
      return i === 0 ? `${intFormat.format(v)} B` : `${v < 10 ? oneDecimal.format(v) : intFormat.format(Math.round(v))} ${units[i]}`;
    },
    date: (unix) => (isNum(unix) ? dateTime.format(new Date(unix * 1000)) : DASH),
    shortDate: (unix) => (isNum(unix) ? shortDate.format(new Date(unix * 1000)) : DASH),
    /** One unit, rounded: "36 min ago", "in 23 h". */
    relative(unix) {
      if (!isNum(unix)) return '';
      const delta = unix - Date.now() / 1000;
      const size = Math.abs(delta);
      if (size < 5) return 'just now';
      // Each unit from where it rounds to 1 of itself: 59.6 min reads "1 h", not "60 min".
      const [unit, seconds] = size >= 84600 ? ['d', 86400] : size >= 3570 ? ['h', 3600] : size >= 59.5 ? ['min', 60] : ['s', 1];
      const text = `${intFormat.format(Math.round(size / seconds))} ${unit}`;
      return delta > 0 ? `in ${text}` : `${text} ago`;
    },
  };

  // ------------------------------------------------------------------------------------------------------
  // DOM helpers
  const byId = (id) => document.getElementById(id);
  const tid = (id, root) => (root || document).querySelector(`[data-testid="${id}"]`);

  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === 'class') node.className = value;
      else if (name === 'text') node.textContent = value;
      else if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
      else if (name === 'style') node.setAttribute('style', value);
      else node.setAttribute(name, value === true ? '' : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function setText(testid, value, title) {
    const node = tid(testid);
    if (!node) return;
    node.textContent = value;
    if (title) node.title = title;
    else node.removeAttribute('title');
  }

  /** A count, and the noun after it in the singular or plural (`<span data-word="hit">`). */
  function setCount(testid, value) {
    setText(testid, fmt.int(value));
    const word = tid(testid).nextElementSibling;
    if (word && word.dataset.word) word.textContent = value === 1 ? word.dataset.word : `${word.dataset.word}s`;
  }

  function badge(text, kind, dot) {
    return h('span', { class: `badge${kind ? ` badge-${kind}` : ''}${dot ? ' badge-dot' : ''}`, text });
  }

  function fillBody(table, rows, emptyText, columns) {
    const body = table.tBodies[0];
    body.replaceChildren(...(rows.length ? rows
      : [h('tr', { class: 'empty' }, h('td', { colspan: columns || 1, text: emptyText }))]));
  }

  function notice(testid, title, detail) {
    const node = tid(testid);
    node.replaceChildren(h('strong', { text: title }), detail ? h('span', { text: detail }) : null);
    node.hidden = false;
  }

  let toastTimer = null;
  function toast(message, bad) {
    const node = byId('toast');
    node.textContent = message;
    node.classList.toggle('bad', !!bad);
    node.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { node.hidden = true; }, 3500);
  }

  // ------------------------------------------------------------------------------------------------------
  // State and the API client
  const state = {
    key: null,
    authed: false,
    generation: 0,          // bumped on sign-out: answers to older requests are dropped
    view: null,
    statsTimer: null,
    detailTimer: null,
    history: [],            // {t, total, semLookups, semHits, chunkLookups, chunkHits}
    charts: { requests: null, hitRates: null },
    lastStats: null,
    semantic: null,
    config: null,           // a promise of GET /admin/api/config, asked once per sign-in
    policyModel: null,
    entries: { offset: 0, limit: 25, search: '', category: '', tenant: '', total: 0, seq: 0 },
  };

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  const storage = {
    get() { try { return window.sessionStorage.getItem(KEY_STORAGE); } catch (e) { return null; } },
    set(key) { try { window.sessionStorage.setItem(KEY_STORAGE, key); } catch (e) { /* storage off: this page only */ } },
    clear() { try { window.sessionStorage.removeItem(KEY_STORAGE); } catch (e) { /* nothing stored */ } },
  };

  async function request(path, key, options) {
    const opts = options || {};
    const headers = { Authorization: `Bearer ${key}`, Accept: 'application/json' };
    if (opts.body !== undefined) headers['Content-Type'] = 'application/json';
    let response;
    try {
      response = await fetch(API + path, {
        method: opts.method || 'GET', headers, cache: 'no-store',
        body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
      });
    } catch (err) {
      throw new ApiError(0, 'network', 'The gateway cannot be reached.');
    }
    let payload = null;
    try {
      const text = await response.text();
      payload = text ? JSON.parse(text) : null;
    } catch (err) {
      payload = null;
    }
    if (!response.ok) {
      const error = payload && payload.error;
      throw new ApiError(response.status, error && error.code,
        (error && error.message) || `The gateway answered ${response.status} ${response.statusText}`.trim());
    }
    return payload;
  }

  /** A call of the signed-in page: a 401 signs out; answers arriving after a sign-out are dropped. */
  async function api(path, options) {
    const generation = state.generation;
    const stale = () => new ApiError(-1, 'stale', 'signed out');
    if (!state.authed) throw stale();
    try {
      const payload = await request(path, state.key, options);
      if (generation !== state.generation) throw stale();
      return payload;
    } catch (err) {
      if (generation !== state.generation) throw stale();
      if (err.status === 401) {
        signOut(`${NOT_ACCEPTED} Sign in again.`);
        throw stale();
      }
      throw err;
    }
  }

  const quiet = (err) => err instanceof ApiError && err.status === -1;

  // ------------------------------------------------------------------------------------------------------
  // Sign-in and sign-out
  function showLogin(message, kind) {
    byId('app').hidden = true;
    byId('login').hidden = false;
    const box = byId('login-message');
    box.textContent = message || '';
    box.classList.toggle('info', kind === 'info');
    box.hidden = !message;
    setLoginBusy(false);
    document.title = 'Sign in · blendgate admin';
    byId('login-key').focus();
  }

  function setLoginBusy(busy) {
    const button = byId('login-submit');
    button.disabled = busy;
    button.textContent = busy ? 'Signing in…' : 'Sign in';
  }

  async function signIn(key) {
    setLoginBusy(true);
    byId('login-message').hidden = true;
    let stats;
    try {
      stats = await request('/stats', key);
    } catch (err) {
      if (err.status === 401) {
        storage.clear();
        showLogin(NOT_ACCEPTED);
      } else if (err.status === 403) {
        storage.clear();
        showLogin('The admin API is turned off on this gateway: set admin_key (or admin_key_env) in its configuration.');
      } else if (err.status === 0) {
        showLogin('The gateway cannot be reached. Is it running?');
      } else {
        showLogin(`The gateway could not check the key: ${err.message}`);
      }
      return;
    }
    storage.set(key);
    state.key = key;
    state.authed = true;
    state.generation += 1;
    state.history = [];
    state.config = null;
    byId('login-key').value = '';
    byId('login').hidden = true;
    byId('app').hidden = false;
    ingestStats(stats);
    route();
    scheduleStats(STATS_INTERVAL_MS);
    seedHistory();
  }

  /** The charts start from the gateway's recent samples (GET /admin/api/stats/history), then follow the
   * page's own snapshots. */
  async function seedHistory() {
    let data;
    try {
      data = await api('/stats/history');
    } catch (err) {
      return;   // the charts fill from the page's own snapshots instead
    }
    const live = state.history;
    state.history = [];
    for (const stats of Array.isArray(data && data.data) ? data.data : []) addPoint(historyPoint(stats));
    for (const point of live) addPoint(point);
    if (state.view === 'overview') renderCharts();
  }

  function signOut(message, kind) {
    state.generation += 1;
    state.authed = false;
    state.key = null;
    storage.clear();
    clearTimeout(state.statsTimer);
    clearTimeout(state.detailTimer);
    destroyCharts();
    clearData();
    showLogin(message, kind);
  }

  /** Nothing of the signed-in page stays in the DOM after a sign-out. */
  function clearData() {
    state.history = [];
    state.lastStats = null;
    state.semantic = null;
    document.querySelectorAll('.tile-value, .tile-sub span[data-testid], .facts dd, [data-testid="uptime"]').forEach((node) => {
      node.textContent = DASH;
    });
    document.querySelectorAll('.tile-sub[data-testid]').forEach((node) => { node.textContent = DASH; });
    document.querySelectorAll('#app table tbody').forEach((body) => body.replaceChildren());
    byId('chunk-models').replaceChildren();
    tid('config-json').textContent = '';
    setText('entries-range', DASH);
    document.querySelectorAll('#app .notice').forEach((node) => { node.hidden = true; });
    setLive(null);
  }

  // ------------------------------------------------------------------------------------------------------
  // Navigation
  function currentView() {
    const name = window.location.hash.replace(/^#/, '');
    return Object.prototype.hasOwnProperty.call(VIEWS, name) ? name : 'overview';
  }

  function route() {
    if (!state.authed) return;
    const view = currentView();
    state.view = view;
    document.querySelectorAll('section.view').forEach((section) => {
      section.hidden = section.dataset.view !== view;
    });
    document.querySelectorAll('#nav a').forEach((link) => {
      if (link.dataset.view === view) link.setAttribute('aria-current', 'page');
      else link.removeAttribute('aria-current');
    });
    document.title = `${VIEWS[view]} · blendgate admin`;
    byId('toast').hidden = true;   // a toast speaks of the page it was shown on
    if (view === 'overview') {
      renderCharts();
      if (state.lastStats) renderOverview(state.lastStats);
    }
    clearTimeout(state.detailTimer);
    loadView(view);
  }

  function loadView(view) {
    const loaders = {
      'semantic-cache': loadSemantic,
      'chunk-cache': loadChunk,
      'entries': loadEntries,
      'configuration': loadConfig,
    };
    const loader = loaders[view];
    if (loader) loader();
  }

  /** The semantic- and chunk-cache pages refresh themselves while open. */
  function scheduleDetail(view, delay) {
    clearTimeout(state.detailTimer);
    state.detailTimer = setTimeout(() => {
      if (state.authed && state.view === view) loadView(view);
    }, delay);
  }

  // ------------------------------------------------------------------------------------------------------
  // Overview: stats polling, tiles, charts
  function scheduleStats(delay) {
    clearTimeout(state.statsTimer);
    state.statsTimer = setTimeout(pollStats, delay);
  }

  async function pollStats() {
    const generation = state.generation;
    try {
      ingestStats(await api('/stats'));
    } catch (err) {
      if (quiet(err)) return;
      setLive(false, err.message);
    }
    if (state.authed && generation === state.generation) scheduleStats(STATS_INTERVAL_MS);
  }

  function setLive(ok, detail) {
    const dot = byId('live-dot');
    dot.classList.toggle('ok', ok === true);
    dot.classList.toggle('bad', ok === false);
    byId('live-text').textContent = ok === true ? `Live · ${clock.format(new Date())}`
      : ok === false ? 'Connection lost, retrying' : 'Connecting…';
    byId('live-text').title = ok === true ? 'time of the last snapshot' : (detail || '');
  }

  /** The API's traffic: all requests less the operational routes, so this page's own polling (a request every
   * 2 s), scrapes of /metrics and health probes do not count as load. */
  const OPERATIONAL_ROUTES = ['admin', 'metrics', 'health'];
  function apiRequests(requests) {
    if (!isNum(requests.total)) return undefined;
    const byRoute = requests.by_route || {};
    return requests.total - OPERATIONAL_ROUTES.reduce((sum, r) => sum + (isNum(byRoute[r]) ? byRoute[r] : 0), 0);
  }

  const get = (object, ...path) => path.reduce((o, k) => (o && typeof o === 'object' ? o[k] : undefined), object);

  /** A snapshot's chart fields (a full snapshot or a sample of the gateway's history). */
  function historyPoint(stats) {
    return {
      t: isNum(stats.time) ? stats.time : Date.now() / 1000,
      total: apiRequests(stats.requests || {}),
      semLookups: get(stats, 'layers', 'semantic_cache', 'lookups'),
      semHits: get(stats, 'layers', 'semantic_cache', 'hits'),
      chunkLookups: get(stats, 'layers', 'chunk_cache', 'lookups'),
      chunkHits: get(stats, 'layers', 'chunk_cache', 'hits'),
    };
  }

  function addPoint(point) {
    const last = state.history[state.history.length - 1];
    if (last && point.t <= last.t) {
      state.history[state.history.length - 1] = point;   // same snapshot time: replace
    } else {
      // Counters that went down mean the gateway restarted: rates across the restart make no sense.
      const reset = last && ['total', 'semLookups', 'semHits', 'chunkLookups', 'chunkHits']
        .some((k) => isNum(point[k]) && isNum(last[k]) && point[k] < last[k]);
      if (reset) state.history = [];
      state.history.push(point);
      if (state.history.length > HISTORY_POINTS) state.history.splice(0, state.history.length - HISTORY_POINTS);
    }
  }

  function ingestStats(stats) {
    if (!stats || typeof stats !== 'object') return;
    addPoint(historyPoint(stats));
    state.lastStats = stats;
    setLive(true);
    setText('uptime', fmt.duration(stats.uptime_s));
    if (state.view === 'overview') {
      renderOverview(stats);
      renderCharts();
    }
  }

  function requestRate(i) {
    const a = state.history[i - 1];
    const b = state.history[i];
    if (!a || !b || !isNum(a.total) || !isNum(b.total) || b.t <= a.t) return null;
    return (b.total - a.total) / (b.t - a.t);
  }

  function windowHitRate(i, lookups, hits) {
    const b = state.history[i];
    let j = i - 1;
    while (j > 0 && state.history[j - 1].t >= b.t - HIT_RATE_WINDOW_S) j -= 1;
    const a = state.history[j];
    if (!a || !isNum(a[lookups]) || !isNum(b[lookups]) || !isNum(a[hits]) || !isNum(b[hits])) return null;
    const delta = b[lookups] - a[lookups];
    return delta > 0 ? (100 * (b[hits] - a[hits])) / delta : null;
  }

  function renderOverview(stats) {
    const requests = stats.requests || {};
    const all = isNum(requests.total) ? `All HTTP requests: ${fmt.int(requests.total)}` : null;
    setText('requests-total', fmt.big(apiRequests(requests)), all && `${all}, of which the gateway's own `
      + `(${OPERATIONAL_ROUTES.join(', ')}) are left out here`);
    setText('requests-rate', fmt.rate(requestRate(state.history.length - 1)));

    const layer = (name, prefix) => {
      const data = get(stats, 'layers', name) || {};
      const some = isNum(data.lookups) && data.lookups > 0;
      const rate = isNum(data.hit_rate) ? data.hit_rate : some && isNum(data.hits) ? data.hits / data.lookups : null;
      setText(`${prefix}-hit-rate`, some ? fmt.pct(rate) : DASH);
      setCount(`${prefix}-hits`, data.hits);
      setCount(`${prefix}-lookups`, data.lookups);
    };
    layer('semantic_cache', 'semantic');
    layer('chunk_cache', 'chunk');

    const ttft = (name, prefix) => {
      const data = get(stats, 'ttft_ms', name) || {};
      setText(prefix, isNum(data.count) && data.count > 0 ? fmt.ms(data.mean) : DASH);
      setCount(`${prefix}-count`, data.count);
    };
    ttft('cache_hit', 'ttft-hit');
    ttft('miss', 'ttft-miss');

    setText('tokens-saved', fmt.big(get(stats, 'saved', 'tokens')), fmt.int(get(stats, 'saved', 'tokens')));
    setText('time-saved', fmt.duration(get(stats, 'saved', 'seconds')));

    const pairs = (object) => Object.entries(object || {}).sort((a, b) => (b[1] || 0) - (a[1] || 0));
    fillBody(tid('requests-by-route'), pairs(requests.by_route).map(([route, n]) =>
      h('tr', null, h('td', { text: route }), h('td', { class: 'num', text: fmt.int(n) }))), 'No requests yet', 2);
    fillBody(tid('requests-by-status'), pairs(requests.by_status).map(([status, n]) =>
      h('tr', null, h('td', null, badge(status, /^2/.test(status) ? 'ok' : /^5/.test(status) ? 'bad' : 'warn')),
        h('td', { class: 'num', text: fmt.int(n) }))), 'No requests yet', 2);

    const byModel = requests.by_model || {};
    const queues = get(stats, 'backend', 'queue_depth') || {};
    const models = [...new Set([...Object.keys(byModel), ...Object.keys(queues)])].sort();
    fillBody(tid('requests-by-model'), models.map((model) => h('tr', null,
      h('td', { text: model }), h('td', { class: 'num', text: fmt.int(byModel[model] || 0) }),
      h('td', { class: 'num', text: isNum(queues[model]) ? fmt.int(queues[model]) : DASH }))), 'No models', 3);

    setText('retrieval-requests', fmt.int(get(stats, 'layers', 'retrieval', 'requests')));
    setText('retrieval-mean', get(stats, 'layers', 'retrieval', 'requests') ? fmt.ms(get(stats, 'layers', 'retrieval', 'mean_ms')) : DASH);
    setText('blend-tokens-saved', fmt.int(get(stats, 'blend', 'prefill_tokens_saved')));
    setText('blend-recompute', fmt.pct(get(stats, 'blend', 'mean_recompute_ratio')));
    const redis = stats.redis;
    const up = redis && typeof redis === 'object' ? redis.up : redis;
    const cell = tid('redis-status');
    cell.replaceChildren(up === true ? badge('Up', 'ok', true) : up === false ? badge('Down', 'bad', true)
      : h('span', { class: 'muted', text: 'not configured' }));
  }

  function chartOptions(width, series, yRange, yFormat) {
    const axis = {
      stroke: '#6b7385', font: '11px system-ui, sans-serif', size: 44,
      grid: { stroke: '#eef0f3', width: 1 }, ticks: { stroke: '#e3e6eb', width: 1, size: 4 },
    };
    return {
      width, height: 184,
      padding: [8, 24, 0, 0],
      cursor: { drag: { x: false, y: false }, points: { size: 6 } },
      legend: { show: true, live: false },
      // At least a minute across, so the first snapshots do not stretch over the whole width.
      scales: { x: { time: true, range: (u, min, max) => [Math.min(min, max - 60), max] }, y: { range: yRange } },
      axes: [
        { ...axis, size: 30, space: 70, incrs: [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600],
          values: (u, ticks) => ticks.map((t) => axisClock.format(new Date(t * 1000))) },
        { ...axis, values: (u, ticks) => ticks.map(yFormat) },
      ],
      series: [{}, ...series],
    };
  }

  function chartData() {
    const xs = [];
    const rps = [];
    const sem = [];
    const chunk = [];
    for (let i = 1; i < state.history.length; i += 1) {
      xs.push(state.history[i].t);
      rps.push(requestRate(i));
      sem.push(windowHitRate(i, 'semLookups', 'semHits'));
      chunk.push(windowHitRate(i, 'chunkLookups', 'chunkHits'));
    }
    return { xs, rps, sem, chunk };
  }

  function chartWidth(id) {
    return Math.max(200, Math.floor(byId(id).clientWidth));
  }

  function renderCharts() {
    if (state.view !== 'overview' || typeof window.uPlot !== 'function') return;
    const data = chartData();
    const ready = data.xs.length > 0;
    byId('chart-requests').dataset.points = String(data.xs.length);
    byId('chart-requests-empty').hidden = ready;
    byId('chart-hit-rates-empty').hidden = ready;
    if (!state.charts.requests) {
      const opts = chartOptions(chartWidth('chart-requests'), [{
        label: 'API requests/s', stroke: COLORS.requests, width: 2, fill: 'rgba(47, 91, 211, 0.08)',
        points: { show: false }, value: (u, v) => fmt.rate(v),
      }], (u, min, max) => [0, Math.max(1, (max || 0) * 1.2)], (v) => tick.format(v));
      state.charts.requests = new window.uPlot(opts, [data.xs, data.rps], byId('chart-requests'));
    } else {
      state.charts.requests.setData([data.xs, data.rps]);
    }
    if (!state.charts.hitRates) {
      const line = (label, stroke) => ({
        label, stroke, width: 2, spanGaps: false, points: { show: true, size: 3 },
        value: (u, v) => (isNum(v) ? `${oneDecimal.format(v)} %` : DASH),
      });
      const opts = chartOptions(chartWidth('chart-hit-rates'),
        [line('Semantic cache', COLORS.semantic), line('Chunk-cache', COLORS.chunk)],
        () => [0, 100], (v) => `${intFormat.format(v)} %`);
      state.charts.hitRates = new window.uPlot(opts, [data.xs, data.sem, data.chunk], byId('chart-hit-rates'));
    } else {
      state.charts.hitRates.setData([data.xs, data.sem, data.chunk]);
    }
    fitCharts();
  }

  function fitCharts() {
    if (state.view !== 'overview') return;
    for (const [chart, id] of [[state.charts.requests, 'chart-requests'], [state.charts.hitRates, 'chart-hit-rates']]) {
      if (!chart) continue;
      const width = chartWidth(id);
      if (chart.width !== width) chart.setSize({ width, height: 184 });
    }
  }

  function destroyCharts() {
    for (const chart of Object.values(state.charts)) if (chart) chart.destroy();
    state.charts = { requests: null, hitRates: null };
    byId('chart-requests').replaceChildren();
    byId('chart-hit-rates').replaceChildren();
  }

  /** The configuration, asked once per sign-in: it says whether the semantic cache is on at all, so a gateway
   * without one is never asked for its entries (each 503 would also land in the browser's console). */
  function configOnce() {
    if (!state.config) {
      state.config = api('/config').catch((err) => {
        state.config = null;
        throw err;
      });
    }
    return state.config;
  }

  async function semanticTurnedOff() {
    try {
      return get(await configOnce(), 'semantic_cache', 'enabled') === false;
    } catch (err) {
      if (quiet(err)) throw err;
      return false;   // unknown: ask the endpoint, which says so itself
    }
  }

  const TURNED_OFF = ['The semantic cache is turned off on this gateway.',
    'semantic_cache.enabled is false in its configuration, so no answers are cached.'];

  // ------------------------------------------------------------------------------------------------------
  // Semantic cache
  /** The policy's categories, as a name -> {threshold, ttl_s, cached} map, whichever shape the API sent. */
  function policyCategories(policy) {
    const categories = (policy && policy.categories) || {};
    if (Array.isArray(categories)) {
      const map = {};
      for (const item of categories) if (item) map[item.category || item.name] = item;
      return map;
    }
    return categories;
  }

  function loadLevel(policy) {
    const load = policy && policy.load;
    if (isNum(load)) return { level: load };
    if (load && typeof load === 'object') return { level: load.level, queue: load.queue_depth, latency: load.latency_ms };
    return {};
  }

  async function loadSemantic() {
    let data;
    try {
      if (await semanticTurnedOff()) {
        tid('semantic-body').hidden = true;
        notice('semantic-unavailable', ...TURNED_OFF);
        return;
      }
      data = await api('/semantic-cache');
    } catch (err) {
      if (quiet(err)) return;
      tid('semantic-body').hidden = true;
      if (err.status === 503) {
        notice('semantic-unavailable', 'The semantic cache is disabled or unavailable.',
          `The gateway says: ${err.message.replace(/\.$/, "")}. It is turned on by semantic_cache.enabled in the configuration.`);
      } else {
        notice('semantic-unavailable', 'The semantic cache could not be read.', err.message);
      }
      scheduleDetail('semantic-cache', err.status === 503 ? UNAVAILABLE_INTERVAL_MS : DETAIL_INTERVAL_MS);
      return;
    }
    tid('semantic-unavailable').hidden = true;
    tid('semantic-body').hidden = false;
    state.semantic = data;
    renderSemantic(data);
    fillCategoryFilter();
    scheduleDetail('semantic-cache', DETAIL_INTERVAL_MS);
  }

  function renderSemantic(data) {
    const store = String(data.store || '');
    const embedded = store === 'memory' || store === 'embedded';
    setText('semantic-store', store === 'redis' ? 'Redis' : embedded ? 'Embedded' : (store || DASH));
    setText('semantic-store-detail', store === 'redis' ? 'shared by every replica'
      : embedded ? 'in-process: entries last until a restart' : DASH);
    const available = tid('semantic-available');
    available.replaceChildren(data.available === false ? badge('Down', 'bad', true) : badge('Up', 'ok', true));
    setText('semantic-down-reason', data.available === false ? (data.down_reason || 'the store does not answer')
      : 'serving lookups');
    const partitions = Array.isArray(data.partitions) ? data.partitions : [];
    setText('semantic-entries', fmt.int(data.entries));
    setCount('semantic-partitions', partitions.length);

    const policies = data.policy && typeof data.policy === 'object' ? data.policy : {};
    const models = Object.keys(policies).sort();
    if (!models.includes(state.policyModel)) state.policyModel = models[0] || null;
    const select = byId('policy-model');
    byId('policy-model-field').hidden = models.length < 2;
    if (models.length > 1 && select.options.length !== models.length) {
      select.replaceChildren(...models.map((m) => h('option', { value: m, text: m })));
    }
    if (state.policyModel) select.value = state.policyModel;
    byId('policy-model-note').textContent = models.length === 1 ? `policy in force for ${models[0]}` : '';
    const policy = state.policyModel ? policies[state.policyModel] : null;
    const load = loadLevel(policy);
    setText('semantic-load', fmt.pct(load.level));
    const loadDetail = [];
    if (isNum(load.queue)) loadDetail.push(`queue ${fmt.int(load.queue)}`);
    if (isNum(load.latency)) loadDetail.push(`latency ${fmt.ms(load.latency)}`);
    setText('semantic-load-detail', loadDetail.length ? loadDetail.join(' · ')
      : state.policyModel ? `of ${state.policyModel}` : DASH);

    const stats = data.categories && typeof data.categories === 'object' ? data.categories : {};
    const inForce = policyCategories(policy);
    const names = [...new Set([...Object.keys(inForce), ...Object.keys(stats)])];
    names.sort((a, b) => ((stats[b] || {}).lookups || 0) - ((stats[a] || {}).lookups || 0) || a.localeCompare(b));
    const rows = names.map((name) => {
      const s = stats[name] || {};
      const p = inForce[name] || {};
      const rate = isNum(s.lookups) && s.lookups > 0
        ? (isNum(s.hit_rate) ? s.hit_rate : (s.hits || 0) / s.lookups) : null;
      return h('tr', { 'data-category': name },
        h('td', { class: 'nowrap', text: name }),
        h('td', { class: 'num', text: fmt.pct(rate) }),
        h('td', { class: 'num', text: fmt.int(s.lookups || 0) }),
        h('td', { class: 'num', 'data-testid': `category-hits-${name}`, text: fmt.int(s.hits || 0) }),
        h('td', { class: 'num', 'data-testid': `category-false-hits-${name}`,
          title: 'reported by clients, and (after +) found by hit audits',
          text: fmt.int(s.false_hits || 0) + (s.audits && s.audits.disagree ? ` + ${fmt.int(s.audits.disagree)}` : '') }),
        h('td', { class: 'num', text: fmt.int(s.entries || 0) }),
        h('td', { class: 'num', text: fmt.threshold(p.threshold) }),
        h('td', { class: 'num', text: fmt.duration(p.ttl_s) }),
        h('td', null, p.cached === false ? badge('No', 'warn')
          : p.cached === true ? badge(p.scope === 'user' ? 'Per user' : 'Yes', 'ok') : DASH));
    });
    fillBody(tid('semantic-categories'), rows, 'No categories', 9);
    renderBounds(data, stats);

    const sorted = partitions.slice().sort((a, b) =>
      String(a.tenant).localeCompare(String(b.tenant)) || String(a.category).localeCompare(String(b.category)));
    fillBody(tid('semantic-partitions-table'), sorted.map((p) => h('tr', null,
      h('td', { text: p.tenant }), h('td', { text: p.category }),
      h('td', { class: 'num', text: fmt.int(p.entries) }))), 'No entries cached yet', 3);
  }

  /** Per category: the false-hit bound, the verifier's estimate on its labelled pairs (and the share of
   *  same-answer pairs it serves), the share of hits clients reported wrong, the thresholds in force with what
   *  the reports raised them by, and the live hit rate. */
  function renderBounds(data, stats) {
    const byName = (list) => Object.fromEntries((Array.isArray(list) ? list : []).map((c) => [c.category, c]));
    const calibrated = byName(get(data, 'verifier', 'categories'));
    const learned = byName(get(data, 'feedback', 'categories'));
    const names = [...new Set([...Object.keys(calibrated), ...Object.keys(learned)])].sort();
    const raised = (value, raise) => (isNum(raise) && raise > 0
      ? `${fmt.threshold(value)} (+${fmt.threshold(raise)})` : fmt.threshold(value));
    const rows = names.map((name) => {
      const c = calibrated[name] || {};
      const f = learned[name] || {};
      const s = stats[name] || {};
      const rate = isNum(s.lookups) && s.lookups > 0 ? (isNum(s.hit_rate) ? s.hit_rate : (s.hits || 0) / s.lookups) : null;
      const bound = isNum(c.bound) ? c.bound : f.bound;
      const reported = isNum(f.hits) && f.hits > 0 ? `${fmt.pct(f.reported_false_share)} (${fmt.int(f.reports)} of ${fmt.int(f.hits)})`
        : (f.reports ? `${fmt.int(f.reports)} reports` : DASH);
      return h('tr', { 'data-category': name },
        h('td', { class: 'nowrap', text: name }),
        h('td', { class: 'num', 'data-testid': `bound-${name}`, text: fmt.pct(bound) }),
        h('td', { class: 'num', 'data-testid': `bound-estimate-${name}`, text: fmt.pct(c.estimate),
          title: isNum(c.upper) ? `95% upper bound ${fmt.pct(c.upper)} on ${fmt.int(c.pairs)} labelled pairs` : null }),
        h('td', null, c.met === true ? badge('Yes', 'ok') : c.met === false ? badge('No: guards decide', 'warn') : DASH),
        h('td', { class: 'num', 'data-testid': `bound-served-${name}`, text: fmt.pct(c.hit_rate),
          title: isNum(c.unverified_hit_rate) ? `${fmt.pct(c.unverified_hit_rate)} on the cosine alone` : null }),
        h('td', { class: 'num', 'data-testid': `bound-reported-${name}`, text: reported,
          title: isNum(f.upper) ? `95% upper bound over recent hits ${fmt.pct(f.upper)}` : null }),
        h('td', { class: 'num', 'data-testid': `bound-threshold-${name}`, text: raised(f.cosine_threshold, f.cosine_raise) }),
        h('td', { class: 'num', 'data-testid': `bound-verifier-${name}`,
          text: !isNum(c.threshold_in_force) && !(f.verifier_raise > 0) ? (c.category ? 'guards' : DASH)
            : isNum(f.verifier_threshold) ? raised(f.verifier_threshold, f.verifier_raise)
              : fmt.threshold(c.threshold_in_force) }),
        h('td', { class: 'num', 'data-testid': `bound-hit-rate-${name}`, text: fmt.pct(rate) }));
    });
    fillBody(tid('semantic-bounds'), rows, 'The verifier and learning from reports are off', 9);
  }

  function fillCategoryFilter() {
    const data = state.semantic;
    if (!data) return;
    const names = new Set(Object.keys(data.categories || {}));
    for (const policy of Object.values(data.policy || {})) Object.keys(policyCategories(policy)).forEach((n) => names.add(n));
    const select = byId('entries-category');
    const current = select.value;
    const wanted = [...names].sort();
    const have = [...select.options].slice(1).map((o) => o.value);
    if (wanted.join('\n') === have.join('\n')) return;
    select.replaceChildren(h('option', { value: '', text: 'All categories' }),
      ...wanted.map((n) => h('option', { value: n, text: n })));
    select.value = wanted.includes(current) ? current : '';
  }

  // ------------------------------------------------------------------------------------------------------
  // Chunk-cache
  async function loadChunk() {
    let data;
    try {
      data = await api('/chunk-cache');
    } catch (err) {
      if (quiet(err)) return;
      byId('chunk-models').replaceChildren();
      notice('chunk-unavailable', err.status === 503 ? 'The chunk-cache is unavailable.' : 'The chunk-cache could not be read.',
        err.message);
      scheduleDetail('chunk-cache', err.status === 503 ? UNAVAILABLE_INTERVAL_MS : DETAIL_INTERVAL_MS);
      return;
    }
    tid('chunk-unavailable').hidden = true;
    renderChunk(data || {});
    scheduleDetail('chunk-cache', DETAIL_INTERVAL_MS);
  }

  function renderChunk(data) {
    const models = data.models && typeof data.models === 'object' ? data.models : {};
    const names = Object.keys(models).sort();
    if (!names.length) {
      byId('chunk-models').replaceChildren();
      notice('chunk-unavailable', 'No model has a chunk-cache.',
        'Chunk-caches belong to local Llama-family models with chunk_cache.enabled; this gateway has none.');
      return;
    }
    byId('chunk-models').replaceChildren(...names.map((name) => chunkModelCard(name, models[name] || {})));
  }

  function chunkModelCard(name, model) {
    const tiers = Array.isArray(model.tiers) ? model.tiers : [];
    const hits = tiers.reduce((sum, t) => sum + (isNum(t.hits) ? t.hits : 0), 0);
    // The overview's figure for this model: chunks of RAG prompts found in the cache.
    const documents = model.document_chunks || {};
    const tierRows = tiers.map((tier) => {
      const share = isNum(tier.bytes) && isNum(tier.budget_bytes) && tier.budget_bytes > 0
        ? Math.min(1, tier.bytes / tier.budget_bytes) : null;
      return h('tr', { 'data-tier': tier.name },
        h('td', { class: 'nowrap' }, h('b', { text: tier.name }),
          tier.shared ? h('span', { class: 'muted', text: tier.up === false ? ' shared · down' : ' shared' }) : null),
        h('td', null,
          h('div', { class: `bar${share !== null && share > 0.9 ? ' high' : ''}`, role: 'meter', 'aria-valuemin': 0,
            'aria-valuemax': 100, 'aria-valuenow': share === null ? null : Math.round(share * 100),
            'aria-label': `${tier.name} occupancy` },
          h('span', { style: `width: ${share === null ? 0 : Math.max(share > 0 ? 1 : 0, share * 100).toFixed(1)}%` })),
          h('div', { class: 'bar-label',
            text: `${fmt.bytes(tier.bytes)} of ${fmt.bytes(tier.budget_bytes)}${share === null ? '' : ` · ${fmt.pct(share)}`}` })),
        h('td', { class: 'num', text: fmt.int(tier.entries) }),
        h('td', { class: 'num', text: fmt.int(tier.hits) }),
        h('td', { class: 'num', text: fmt.int(tier.evictions) }));
    });
    const tiersTable = h('table', { class: 'table', 'data-testid': `chunk-tiers-${name}` },
      h('thead', null, h('tr', null, h('th', { text: 'Tier' }), h('th', { text: 'Occupancy' }),
        h('th', { class: 'num', text: 'Entries' }), h('th', { class: 'num', text: 'Hits' }),
        h('th', { class: 'num', text: 'Evictions' }))),
      h('tbody'));
    fillBody(tiersTable, tierRows, 'No tiers', 5);

    const top = Array.isArray(model.top_chunks) ? model.top_chunks : [];
    const byTokens = top.some((c) => isNum(c.tokens)) && !top.some((c) => isNum(c.bytes));
    const topTable = h('table', { class: 'table', 'data-testid': `chunk-top-${name}` },
      h('thead', null, h('tr', null, h('th', { text: 'Chunk' }), h('th', { text: 'Source' }),
        h('th', { text: 'Collection' }), h('th', { class: 'num', text: byTokens ? 'Tokens' : 'Size' }),
        h('th', { class: 'num', text: 'Hits' }), h('th', { text: 'Tier' }))),
      h('tbody'));
    fillBody(topTable, top.map((chunk) => {
      const key = String(chunk.chunk === undefined || chunk.chunk === null ? '' : chunk.chunk);
      const source = chunk.source || (chunk.id ? `chunk ${chunk.id}` : null);
      // A chunk with an origin but no collection came from documents sent inline with a request.
      const collection = chunk.collection || (source ? '(inline)' : '(unknown)');
      return h('tr', null,
        h('td', { class: 'mono', title: key, text: key.length > 12 ? `${key.slice(0, 12)}…` : key || DASH }),
        h('td', { class: 'source-cell', title: chunk.id ? `document chunk ${chunk.id}` : null, text: source || DASH }),
        h('td', { class: 'nowrap', text: collection }),
        h('td', { class: 'num', text: byTokens ? fmt.int(chunk.tokens) : fmt.bytes(chunk.bytes) }),
        h('td', { class: 'num', text: fmt.int(chunk.hits) }),
        h('td', { text: chunk.tier || DASH }));
    }), 'No chunk cached yet', 6);

    const collections = model.collections && typeof model.collections === 'object' ? model.collections : null;
    let collectionsBlock = null;
    if (collections) {
      const collectionsTable = h('table', { class: 'table', 'data-testid': `chunk-collections-${name}` },
        h('thead', null, h('tr', null, h('th', { text: 'Collection' }), h('th', { class: 'num', text: 'Chunks' }),
          h('th', { class: 'num', text: 'Size' }), h('th', { class: 'num', text: 'Hits' }))),
        h('tbody'));
      const rows = Object.entries(collections).sort((a, b) => ((b[1] || {}).bytes || 0) - ((a[1] || {}).bytes || 0));
      fillBody(collectionsTable, rows.map(([collection, c]) => h('tr', null,
        h('td', { text: collection }), h('td', { class: 'num', text: fmt.int((c || {}).chunks) }),
        h('td', { class: 'num', text: fmt.bytes((c || {}).bytes) }),
        h('td', { class: 'num', text: fmt.int((c || {}).hits) }))), 'Nothing cached yet', 4);
      collectionsBlock = h('div', null,
        h('div', { class: 'card-head card-head-sub' }, h('h2', { text: 'By collection' })),
        h('div', { class: 'table-wrap' }, collectionsTable));
    }

    return h('section', { class: 'model-card', 'data-testid': `chunk-model-${name}` },
      h('div', { class: 'card' },
        h('div', { class: 'card-head' }, h('h2', { text: name }),
          h('div', { class: 'model-stats' },
            h('span', { title: 'Chunks placed in RAG prompts whose KV cache was found: the Overview\'s chunk hit rate, for this model' },
              'RAG-chunk hit rate ', h('b', { 'data-testid': `chunk-model-hit-rate-${name}`,
                text: documents.lookups ? fmt.pct(documents.hits / documents.lookups) : DASH }),
              h('span', { class: 'muted', 'data-testid': `chunk-model-lookups-${name}`,
                text: ` (${fmt.int(documents.hits)} of ${fmt.int(documents.lookups)})` })),
            h('span', { title: 'The store\'s own counters: every lookup, the system prompt\'s KV included' },
              'Store hits ', h('b', { 'data-testid': `chunk-hits-${name}`, text: fmt.int(hits) }),
              ' · misses ', h('b', { 'data-testid': `chunk-misses-${name}`, text: fmt.int(model.misses) })),
            h('span', null, 'Corrupt ', h('b', { text: fmt.int(model.corrupt) })),
            model.prefill_costs ? h('span', { 'data-testid': `chunk-costs-${name}`,
              title: 'What blending a prompt is weighed with against a full prefill, in tokens computed: a chunk\'s own '
                + 'forward pass (measured at start-up on a GPU when auto) and placing a cached chunk' },
            'Pass cost ', h('b', { text: fmt.int(model.prefill_costs.pass_tokens) }),
            h('span', { class: 'muted', text: ` tokens (${model.prefill_costs.pass_cost})` }),
            ' · placement ', h('b', { text: fmt.int(model.prefill_costs.placement_tokens) })) : null)),
        h('div', { class: collectionsBlock ? 'model-grid' : '' },
          h('div', null, h('div', { class: 'card-head card-head-sub' }, h('h2', { text: 'Tiers' })),
            h('div', { class: 'table-wrap' }, tiersTable)),
          collectionsBlock),
        h('div', null, h('div', { class: 'card-head card-head-sub' }, h('h2', { text: 'Chunks hit most' })),
          h('div', { class: 'table-wrap' }, topTable))));
  }

  // ------------------------------------------------------------------------------------------------------
  // Entries
  async function loadEntries() {
    const query = state.entries;
    const seq = (query.seq += 1);
    if (!state.semantic) loadCategoriesQuietly();  // the category filter's options
    const params = new URLSearchParams({ offset: String(query.offset), limit: String(query.limit) });
    if (query.search) params.set('search', query.search);
    if (query.category) params.set('category', query.category);
    if (query.tenant) params.set('tenant', query.tenant);
    let data;
    try {
      if (await semanticTurnedOff()) {
        if (seq !== query.seq) return;
        tid('entries-body').hidden = true;
        notice('entries-unavailable', ...TURNED_OFF);
        return;
      }
      data = await api(`/semantic-cache/entries?${params}`);
    } catch (err) {
      if (quiet(err) || seq !== query.seq) return;
      fillBody(tid('entries-table'), [], '', 8);
      setText('entries-range', DASH);
      byId('entries-prev').disabled = true;
      byId('entries-next').disabled = true;
      if (err.status === 503) {
        tid('entries-body').hidden = true;
        notice('entries-unavailable', 'The semantic cache is disabled or unavailable.',
          `The gateway says: ${err.message.replace(/\.$/, "")}. There are no entries to show.`);
      } else {
        notice('entries-unavailable', 'The entries could not be read.', err.message);
      }
      return;
    }
    if (seq !== query.seq) return;   // a newer search has been sent
    tid('entries-unavailable').hidden = true;
    tid('entries-body').hidden = false;
    const rows = Array.isArray(data && data.data) ? data.data : [];
    query.total = isNum(data.total) ? data.total : rows.length;
    if (!rows.length && query.offset > 0 && query.total > 0) {
      // The page emptied (entries invalidated or expired): show the last page that has any.
      query.offset = Math.max(0, Math.floor((query.total - 1) / query.limit) * query.limit);
      loadEntries();
      return;
    }
    renderEntries(rows);
  }

  async function loadCategoriesQuietly() {
    try {
      if (await semanticTurnedOff()) return;
      state.semantic = await api('/semantic-cache');
      fillCategoryFilter();
    } catch (err) {
      /* the entries call reports what matters */
    }
  }

  function renderEntries(rows) {
    const query = state.entries;
    const filtered = query.search || query.category || query.tenant;
    const variants = variantsOf(rows);
    fillBody(tid('entries-table'), rows.map((entry) => entryRow(entry, variants.get(entry))),
      filtered ? 'No entries match these filters.' : 'No answers are cached yet.', 8);
    const first = rows.length ? query.offset + 1 : 0;
    const last = query.offset + rows.length;
    setText('entries-range', rows.length
      ? `${fmt.int(first)}–${fmt.int(last)} of ${fmt.int(query.total)} entries` : `0 of ${fmt.int(query.total)} entries`);
    byId('entries-prev').disabled = query.offset <= 0;
    byId('entries-next').disabled = last >= query.total;
  }

  /** What an entry's answer was cached under besides the question (its `settings`), as short labels; the
   * model first. Long parts (earlier turns, inline documents) come as a count and a digest. */
  function settingLabels(entry) {
    const s = entry.settings && typeof entry.settings === 'object' ? entry.settings : {};
    const text = (v) => (v !== null && typeof v === 'object' ? JSON.stringify(v) : String(v));
    const labels = [`model ${entry.model || DASH}`];
    if (s.namespace) labels.push(`namespace ${s.namespace}`);
    if (s.collection) labels.push(`collection ${s.collection}${s.version === undefined || s.version === null ? '' : ` v${s.version}`}`);
    for (const [name, value] of Object.entries(s.params && typeof s.params === 'object' ? s.params : {})) {
      if (name === 'documents' && value && typeof value === 'object') {
        labels.push(`${fmt.int(value.count)} inline ${value.count === 1 ? 'document' : 'documents'} · ${value.digest}`);
      } else {
        labels.push(`${name} ${text(value)}`);
      }
    }
    if (s.history) labels.push(`${fmt.int(s.history.messages)} earlier ${s.history.messages === 1 ? 'message' : 'messages'} · ${s.history.digest}`);
    if (s.rag_system_prompt) labels.push(`RAG system prompt · ${s.rag_system_prompt.digest}`);
    return labels;
  }

  /** Entries of one tenant's same question on this page, cached under different settings: per entry, how many
   * there are and which of its labels the others do not all share. */
  function variantsOf(rows) {
    const groups = new Map();
    for (const entry of rows) {
      const key = `${entry.tenant}\u0000${String(entry.query || '').trim().toLowerCase()}`;
      if (!groups.has(key)) groups.set(key, []);
      groups.get(key).push(entry);
    }
    const variants = new Map();
    for (const group of groups.values()) {
      if (group.length < 2) continue;
      const labels = group.map((entry) => new Set(settingLabels(entry)));
      group.forEach((entry, i) => {
        const differs = new Set([...labels[i]].filter((label) => !labels.every((other) => other.has(label))));
        variants.set(entry, { count: group.length, differs });
      });
    }
    return variants;
  }

  function entryRow(entry, variant) {
    const id = String(entry.id);
    const now = Date.now() / 1000;
    const expired = isNum(entry.expires_at) && entry.expires_at <= now;
    const differs = variant ? variant.differs : new Set();
    const [modelLabel, ...settings] = settingLabels(entry);
    return h('tr', { 'data-entry-id': id, 'data-testid': 'entry-row' },
      h('td', { class: 'col-question' },
        h('div', { class: 'question', 'data-testid': 'entry-question', text: entry.query || '' }),
        variant ? h('span', { class: 'badge badge-warn variants', 'data-testid': 'entry-variants',
          title: 'This question is cached more than once, under different settings: the settings that differ are marked',
          text: `${variant.count} variants` }) : null,
        entry.response ? h('div', { class: 'answer', title: String(entry.response), text: String(entry.response) }) : null),
      h('td', null, entry.category ? badge(entry.category) : DASH),
      h('td', { class: 'nowrap', text: entry.tenant || DASH },
        entry.scope === 'user' ? h('small', { 'data-testid': 'entry-owner', title: `End user (hash): ${entry.owner}`,
          text: `user ${String(entry.owner || '').slice(0, 8)}` }) : null),
      h('td', { class: 'model-cell' },
        h('div', { class: differs.has(modelLabel) ? 'differs' : null, text: entry.model || DASH }),
        h('div', { class: 'chips', 'data-testid': 'entry-settings' },
          settings.length ? settings.map((label) => h('span', { class: `chip${differs.has(label) ? ' differs' : ''}`,
            'data-differs': differs.has(label), text: label, title: label }))
            : h('span', { class: 'chip chip-quiet', text: 'no parameters set' }))),
      h('td', { class: 'num', text: fmt.int(entry.hits) }),
      h('td', { class: 'when', title: fmt.date(entry.created_at) }, fmt.shortDate(entry.created_at),
        h('small', { text: fmt.relative(entry.created_at) })),
      h('td', { class: 'when', title: fmt.date(entry.expires_at) }, fmt.shortDate(entry.expires_at),
        h('small', { text: expired ? 'expired' : fmt.relative(entry.expires_at) })),
      h('td', { class: 'col-action' },
        h('button', { class: 'button button-small button-danger', type: 'button', 'data-testid': `invalidate-${id}`,
          title: 'Remove this answer from the cache', onclick: (event) => invalidate(id, event.currentTarget) },
        'Invalidate')));
  }

  async function invalidate(id, button) {
    button.disabled = true;
    button.textContent = 'Invalidating…';
    try {
      await api(`/semantic-cache/entries/${encodeURIComponent(id)}`, { method: 'DELETE' });
      toast('Entry invalidated: the next such question goes to the model.');
    } catch (err) {
      if (quiet(err)) return;
      if (err.status === 404) toast('That entry was already gone.');
      else toast(`The entry could not be invalidated: ${err.message}`, true);
    }
    loadEntries();
  }

  function debounce(fn, ms) {
    let timer = null;
    return (...args) => {
      clearTimeout(timer);
      timer = setTimeout(() => fn(...args), ms);
    };
  }

  function readEntryFilters() {
    const query = state.entries;
    query.search = byId('entries-search').value.trim();
    query.category = byId('entries-category').value;
    query.tenant = byId('entries-tenant').value.trim();
    query.limit = Number(byId('entries-limit').value) || 25;
    query.offset = 0;
  }

  // ------------------------------------------------------------------------------------------------------
  // Configuration
  async function loadConfig() {
    let data;
    try {
      data = await api('/config');
    } catch (err) {
      if (quiet(err)) return;
      tid('config-json').textContent = '';
      notice('config-unavailable', 'The configuration could not be read.', err.message);
      return;
    }
    tid('config-unavailable').hidden = true;
    tid('config-json').replaceChildren(...highlightJson(JSON.stringify(data, null, 2)));
  }

  /** Pretty JSON as text nodes and spans (no innerHTML: values are the operator's strings). */
  function highlightJson(text) {
    const nodes = [];
    const token = /("(?:\\.|[^"\\])*")(\s*:)?|\b(true|false)\b|\b(null)\b|(-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)/g;
    let last = 0;
    let match;
    while ((match = token.exec(text)) !== null) {
      if (match.index > last) nodes.push(document.createTextNode(text.slice(last, match.index)));
      if (match[1] !== undefined) {
        nodes.push(h('span', { class: match[2] ? 'k' : 's', text: match[1] }));
        if (match[2]) nodes.push(document.createTextNode(match[2]));
      } else if (match[3] !== undefined) {
        nodes.push(h('span', { class: 'b', text: match[3] }));
      } else if (match[4] !== undefined) {
        nodes.push(h('span', { class: 'z', text: match[4] }));
      } else {
        nodes.push(h('span', { class: 'n', text: match[5] }));
      }
      last = token.lastIndex;
    }
    if (last < text.length) nodes.push(document.createTextNode(text.slice(last)));
    return nodes;
  }

  // ------------------------------------------------------------------------------------------------------
  // Wiring
  function start() {
    byId('login-form').addEventListener('submit', (event) => {
      event.preventDefault();
      const key = byId('login-key').value.trim();
      if (!key) {
        showLogin('Enter the admin key.');
        return;
      }
      signIn(key);
    });
    byId('logout').addEventListener('click', () => signOut('Signed out.', 'info'));
    window.addEventListener('hashchange', route);
    window.addEventListener('resize', debounce(fitCharts, 100));

    const entryFilters = debounce(() => { readEntryFilters(); loadEntries(); }, 300);
    byId('entries-search').addEventListener('input', entryFilters);
    byId('entries-tenant').addEventListener('input', entryFilters);
    byId('entries-category').addEventListener('change', () => { readEntryFilters(); loadEntries(); });
    byId('entries-limit').addEventListener('change', () => { readEntryFilters(); loadEntries(); });
    byId('entries-form').addEventListener('submit', (event) => {
      event.preventDefault();
      const offset = state.entries.offset;
      readEntryFilters();
      state.entries.offset = offset;
      loadEntries();
    });
    byId('entries-prev').addEventListener('click', () => {
      state.entries.offset = Math.max(0, state.entries.offset - state.entries.limit);
      loadEntries();
    });
    byId('entries-next').addEventListener('click', () => {
      state.entries.offset += state.entries.limit;
      loadEntries();
    });
    byId('policy-model').addEventListener('change', (event) => {
      state.policyModel = event.target.value;
      if (state.semantic) renderSemantic(state.semantic);
    });

    const saved = storage.get();
    if (saved) signIn(saved);
    else showLogin('');
  }

  start();
}());
