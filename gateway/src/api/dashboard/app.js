// otagw dashboard: one ES module, no dependencies, no build step. Live state
// comes from server-sent events only. All API data is hostile text: the DOM is
// built with createElement/textContent, never from HTML strings.

const S = { overview: null, devices: new Map(), jobs: new Map(), campaigns: new Map(), plugins: null, cache: null };
const STATES = ['idle', 'queued', 'downloading', 'verifying', 'flashing', 'identifying', 'succeeded', 'failed'];
const RUNNING = new Set(['downloading', 'verifying', 'flashing', 'identifying', 'running']);
const TERMINAL = new Set(['succeeded', 'failed']);
let sess = { authenticated: false, reads_need_login: false, csrf: null };
let locked = false; // reads need a login we do not have
let view = null;

// ---- DOM
const $ = (id) => document.getElementById(id);
// h('p.muted', 'text') or h('a', {href, text}, ...children); strings become text nodes.
function h(tag, attrs, ...kids) {
	const [t, ...cls] = tag.split('.');
	const el = document.createElement(t);
	if (t === 'button') el.type = 'button';
	if (cls.length) el.className = cls.join(' ');
	if (typeof attrs === 'string') attrs = { text: attrs };
	for (const k in attrs) {
		const v = attrs[k];
		if (v == null || v === false) continue;
		if (k === 'text') el.textContent = v;
		else el.setAttribute(k, v === true ? '' : v);
	}
	for (const c of kids.flat()) if (c != null && c !== false) el.append(c);
	return el;
}
function svg(tag, attrs, ...kids) {
	const el = document.createElementNS('http://www.w3.org/2000/svg', tag);
	for (const k in attrs) if (k === 'text') el.textContent = attrs[k]; else el.setAttribute(k, attrs[k]);
	el.append(...kids);
	return el;
}
function T(el, s) {
	s = s == null ? '' : String(s);
	if (el.textContent !== s || el.children.length) el.textContent = s;
}
const on = (el, ev, f) => (el.addEventListener(ev, f), el);
const enc = encodeURIComponent;
const devHref = (d) => { const i = d.indexOf('/'); return i < 0 ? '#/devices' : `#/device/${enc(d.slice(0, i))}/${enc(d.slice(i + 1))}`; };
const card = (title, ...kids) => h('section.card', {}, h('h2', title), ...kids);
const wrap = (t) => h('div.table-wrap', {}, t);
const note = (text, cls = 'muted') => h('p.' + cls, text);
const plural = (n, w) => `${n} ${w}${n === 1 ? '' : 's'}`;
const DASH = '—';

// Cell setters make the least change, so a bar moves smoothly.
function cellLink(td, href, text) {
	let a = td.firstChild;
	if (a?.tagName !== 'A' || td.childNodes.length > 1) td.replaceChildren((a = h('a')));
	if (a.getAttribute('href') !== href) a.setAttribute('href', href);
	T(a, text);
}
// A badge whose text is the state name: colour is never the only cue.
function cellBadge(td, state) {
	let b = td.firstChild;
	if (b?.tagName !== 'SPAN' || td.childNodes.length > 1) td.replaceChildren((b = h('span')));
	const c = `badge st-${String(state).replace(/[^a-z_]/g, '')}`;
	if (b.className !== c) b.className = c;
	T(b, state);
}
const badge = (s) => { const x = h('span'); cellBadge(x, s); return x.firstChild; };
// A <progress> and its percent while `show`, else `rest` as text.
function cellBar(td, pct, show, rest) {
	if (!show || pct == null) return T(td, rest);
	let p = td.firstChild;
	if (p?.tagName !== 'PROGRESS') td.replaceChildren((p = h('progress', { max: 100 })), h('span.pct'));
	const v = Math.max(0, Math.min(100, +pct || 0));
	if (!p.hasAttribute('value') || p.value !== v) p.value = v;
	T(td.lastChild, `${v}%`);
}
const txt = (f) => (td, x) => T(td, f(x));
// A column: key (for sorting), label, td class, setter (default: the key's text).
const C = (key, label, cls = key, set = txt((x) => x[key])) => ({ key, label, cls, set });

// ---- formatting
function bytes(n) {
	if (n == null || isNaN(n)) return DASH;
	let i = 0;
	for (; n >= 1024 && i < 4; i++) n /= 1024;
	return `${i ? n.toFixed(n < 10 ? 1 : 0) : n} ${['B', 'KiB', 'MiB', 'GiB', 'TiB'][i]}`;
}
const p2 = (n) => String(n).padStart(2, '0');
function stamp(ms) {
	if (!ms) return DASH;
	const d = new Date(ms);
	return `${d.getFullYear()}-${p2(d.getMonth() + 1)}-${p2(d.getDate())} ${p2(d.getHours())}:${p2(d.getMinutes())}:${p2(d.getSeconds())}`;
}
function age(s) {
	if (s == null || isNaN(s)) return DASH;
	const f = Math.floor;
	s = Math.max(0, Math.round(s));
	return s < 60 ? `${s} s` : s < 3600 ? `${f(s / 60)} min` : s < 86400 ? `${f(s / 3600)} h ${f((s % 3600) / 60)} min` : `${f(s / 86400)} d ${f((s % 86400) / 3600)} h`;
}
function ago(ms) {
	const s = (Date.now() - ms) / 1000;
	return s < -5 ? `in ${age(-s)}` : s < 5 ? 'just now' : `${age(s)} ago`;
}
// Refreshed every 15 s from the clock (no request).
const timeEl = (ms) => (ms ? h('time', { datetime: new Date(ms).toISOString(), 'data-ms': ms, title: stamp(ms), text: ago(ms) }) : DASH);
const cmp = (a, b) => (typeof a === 'number' && typeof b === 'number' ? a - b : String(a ?? '').localeCompare(String(b ?? ''), undefined, { numeric: true, sensitivity: 'base' }));
const short = (s, n = 16) => (s?.length > n + 1 ? s.slice(0, n) + '…' : s || '');

// ---- keyed table rows: one <tr attr=key> per item, cells updated in place
class Rows {
	constructor(tbody, cols, keyOf, attr) { Object.assign(this, { tbody, cols, keyOf, attr, rows: new Map() }); }
	upsert(item) {
		const key = this.keyOf(item);
		let r = this.rows.get(key);
		if (!r) {
			const tr = h('tr', { [this.attr]: key });
			r = { key, tr, cells: this.cols.map((c) => tr.appendChild(h('td', { class: c.cls, 'data-label': c.label }))) };
			this.rows.set(key, r);
			this.tbody.append(tr);
		}
		const prev = r.item;
		r.item = item;
		this.cols.forEach((c, i) => c.set(r.cells[i], item, prev));
		return r;
	}
	remove(key) { this.rows.get(key)?.tr.remove(); this.rows.delete(key); }
	sync(items) { // exactly these
		const seen = new Set(items.map((x) => this.upsert(x).key));
		for (const k of [...this.rows.keys()]) if (!seen.has(k)) this.remove(k);
	}
	order(f) { // moves rows only when the order changed
		const list = [...this.rows.values()].sort((a, b) => f(a.item, b.item) || cmp(a.key, b.key));
		if (!list.every((r, i) => this.tbody.children[i] === r.tr)) for (const r of list) this.tbody.append(r.tr);
	}
}
function table(cols, attr, keyOf, attrs, onSort) {
	const tb = h('tbody');
	const head = h('thead', {}, h('tr', {}, cols.map((c) => h('th', { scope: 'col', class: c.cls === 'num' ? 'num' : null },
		onSort ? on(h('button.sort', c.label), 'click', () => onSort(c.key)) : c.label))));
	return { el: h('table.data.cards-sm', attrs, head, tb), head, rows: new Rows(tb, cols, keyOf, attr) };
}
// A static table; cells get their column's label for the narrow-screen cards.
function grid(head, rows, attrs) {
	for (const tr of rows) if (tr.cells.length === head.length) [...tr.cells].forEach((c, i) => c.setAttribute('data-label', head[i]));
	return h('table.data.cards-sm', attrs, h('thead', {}, h('tr', {}, head.map((c) => h('th', { scope: 'col', text: c })))), h('tbody', {}, rows));
}
const td = (text, cls) => h('td', { class: cls, text });

// ---- messages and API
let noticeTimer = 0;
function notice(text, kind = 'error') {
	T($('notice'), text);
	$('notice').className = kind;
	$('notice-close').hidden = false;
	clearTimeout(noticeTimer);
	if (kind === 'ok') noticeTimer = setTimeout(clearNotice, 6000);
}
function clearNotice() {
	$('notice').textContent = $('notice').className = '';
	$('notice-close').hidden = true;
}
// → {ok, status, data, error}; changing requests carry the CSRF token.
async function api(method, path, body) {
	const headers = method === 'GET' ? {} : { 'Content-Type': 'application/json', ...(sess.csrf && { 'X-Otagw-Csrf': sess.csrf }) };
	let r, data = null;
	try {
		r = await fetch(path, { method, headers, body: body && JSON.stringify(body), cache: 'no-store' });
		data = JSON.parse(await r.text());
	} catch (e) {
		if (!r) return { ok: false, status: 0, error: `the gateway did not answer (${e.message})` };
	}
	const error = r.ok ? null : typeof data?.error === 'string' ? data.error : `HTTP ${r.status} ${r.statusText}`.trim();
	return { ok: r.ok, status: r.status, data, error };
}

// ---- overview
let chartRedraw = null;
function overview() {
	const dl = () => h('dl.kv');
	const kv = (d, label) => { const dd = h('dd'); d.append(h('dt', label), dd); return dd; };
	const [dDev, dUp, dOut, dCache, dPlug, dJobs] = [dl(), dl(), dl(), dl(), dl(), dl()];
	const r = {
		total: kv(dDev, 'Leaves'), up: kv(dUp, 'State'), since: kv(dUp, 'Since'), upErr: kv(dUp, 'Last error'),
		depth: kv(dOut, 'Waiting'), oldest: kv(dOut, 'Oldest'), use: kv(dCache, 'Used'), images: kv(dCache, 'Images'),
		loaded: kv(dPlug, 'Loaded'), broken: kv(dPlug, 'Broken'), running: kv(dJobs, 'Running'), queued: kv(dJobs, 'Queued'),
	};
	const st = h('ul.states'), bar = h('progress.wide', { max: 100, 'aria-label': 'Cache use' });
	const chart = h('div.chart'), legend = h('ul.legend', { 'aria-label': 'Versions' });
	const el = h('div', {}, h('h1.sr-only', 'Overview'),
		h('div.cards', {}, card('Devices', dDev, st), card('Upstream', dUp), card('Outbox', dOut), card('Cache', dCache, bar), card('Plugins', dPlug), card('Jobs', dJobs)),
		card('Versions by family, model and module', chart, legend));
	let last = null;
	const draw = (chartRedraw = () => {
		const v = S.overview?.versions || [];
		const k = JSON.stringify(v) + chart.clientWidth;
		if (k !== last) { last = k; drawChart(chart, legend, v); }
	});
	function fill() {
		const o = S.overview;
		if (!o) return T(r.total, 'waiting for the gateway…'), draw();
		const states = o.states || {};
		T(r.total, Object.values(states).reduce((a, b) => a + (+b || 0), 0));
		const names = [...STATES, ...Object.keys(states).filter((s) => !STATES.includes(s))].filter((s) => states[s]);
		st.replaceChildren(...names.map((s) => h('li', {}, badge(s), h('b', String(states[s])))));
		const u = o.gateway?.upstream || {}, ob = o.outbox || {}, c = o.cache || {}, p = o.plugins || {}, j = o.jobs || {};
		cellBadge(r.up, u.connected ? 'connected' : 'disconnected');
		r.since.replaceChildren(timeEl(u.since_ms), u.since_ms ? h('div.muted.small', stamp(u.since_ms)) : '');
		T(r.upErr, u.last_error || 'none');
		r.upErr.classList.toggle('error-text', !!u.last_error);
		T(r.depth, ob.depth ?? DASH);
		r.oldest.replaceChildren(ob.oldest_since_ms == null ? 'none' : timeEl(ob.oldest_since_ms));
		T(r.use, `${bytes(c.bytes)} of ${bytes(c.cap_bytes)}`);
		T(r.images, c.images ?? DASH);
		bar.value = c.cap_bytes ? Math.min(100, (100 * c.bytes) / c.cap_bytes) : 0;
		T(r.loaded, p.loaded ?? DASH);
		if (p.broken) cellBadge(r.broken, `${p.broken} broken`); else T(r.broken, p.broken ?? DASH);
		T(r.running, j.running ?? DASH);
		T(r.queued, j.queued ?? DASH);
		draw();
	}
	setTimeout(fill, 0); // once in the page, where the chart's width is known
	return { el, title: 'Overview', update: (d) => d.overview && fill(), destroy: () => (chartRedraw = null) };
}

// One horizontal stacked bar per family/model/module, a segment per version.
function drawChart(box, legend, versions) {
	const W = Math.max(260, Math.floor(box.clientWidth || 600)), ROW = 54;
	const groups = new Map(), totals = new Map();
	for (const v of versions) {
		const k = `${v.family}\0${v.model ?? ''}\0${v.module}`;
		if (!groups.has(k)) groups.set(k, { ...v, segs: [], total: 0 });
		const g = groups.get(k);
		g.segs.push(v);
		g.total += +v.count || 0;
		totals.set(v.version, (totals.get(v.version) || 0) + (+v.count || 0));
	}
	const all = [...totals.keys()].sort(cmp);
	const list = [...groups.values()].sort((a, b) => cmp(a.family, b.family) || cmp(a.model, b.model) || cmp(a.module, b.module));
	const H = Math.max(1, list.length) * ROW;
	const s = svg('svg', { id: 'version-chart', width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': 'Installed versions' });
	if (!list.length) s.append(svg('text', { x: 0, y: 20, text: 'No versions reported yet.' }));
	const fits = (t, w) => t.length * 7.2 + 10 <= w;
	list.forEach((g, i) => {
		const y = i * ROW;
		let x = 0;
		s.append(svg('text', { x: 0, y: y + 15, class: 'glabel', text: W < 500 ? `${g.family} · ${g.model || '?'} · ${g.module}` : `${g.family} · ${g.model ? `model ${g.model}` : 'model unknown'} · module ${g.module}` }),
			svg('text', { x: W, y: y + 15, class: 'gtotal', 'text-anchor': 'end', text: plural(g.total, 'device') }));
		for (const v of g.segs.sort((a, b) => cmp(a.version, b.version))) {
			const w = g.total ? (v.count / g.total) * W : 0, ds = v.devices || [];
			const tip = `${v.version}: ${plural(v.count, 'device')}${ds.length ? ` — ${ds.slice(0, 20).join(', ')}${ds.length > 20 ? ', …' : ''}` : ''}`;
			const seg = svg('g', { class: `seg c${all.indexOf(v.version) % 8}` }, svg('rect', {
				x: x.toFixed(1), y: y + 22, width: w.toFixed(1), height: 26, 'data-family': v.family, 'data-model': v.model ?? '',
				'data-module': v.module, 'data-version': v.version, 'data-count': v.count,
			}, svg('title', { text: tip })));
			const full = `${v.version} (${v.count})`;
			const t = fits(full, w) ? full : fits(String(v.count), w) ? String(v.count) : null;
			if (t) seg.append(svg('text', { x: (x + w / 2).toFixed(1), y: y + 39.5, 'text-anchor': 'middle', text: t }));
			s.append(seg);
			x += w;
		}
	});
	box.replaceChildren(s);
	legend.replaceChildren(...all.map((v, i) => h('li', {}, h(`span.sw.c${i % 8}`), v, h('span.muted', ` × ${totals.get(v)}`))));
}

// ---- devices
const DEV_COLS = [
	C('device', 'Device', 'device', (td, d) => cellLink(td, devHref(d.device), d.device)),
	C('module', 'Module'), C('family', 'Family'), C('link', 'Link'),
	C('bus', 'Bus', 'bus', txt((d) => (d.bus && d.bus === d.link ? 'own link' : d.bus))),
	C('model', 'Model'), C('version', 'Version'),
	C('state', 'State', 'state', (td, d) => cellBadge(td, d.state)),
	C('progress', 'Progress', 'progress', (td, d) => cellBar(td, d.progress, RUNNING.has(d.state), d.state === 'failed' && d.progress != null ? `stopped at ${d.progress}%` : '')),
	C('target_version', 'Target', 'target'),
	C('last_job_ms', 'Last job', 'time', (td, d, p) => p?.last_job_ms !== d.last_job_ms && td.replaceChildren(timeEl(d.last_job_ms))),
	C('last_error', 'Last error', 'error'),
];
const keyOf = (x) => `${x.device || `${x.product_key}/${x.device_name}`}#${x.module}`;
const norm = (d) => (d.device ? d : { ...d, device: `${d.product_key}/${d.device_name}` });
const devTable = (cols, onSort) => table(cols, 'data-key', keyOf, { id: 'devices' }, onSort);
const UI = { filter: '', family: '', sort: 'device', dir: 1 }; // kept across views

function devices() {
	const filter = h('input', { type: 'search', placeholder: 'Filter (any column)', 'aria-label': 'Filter devices', value: UI.filter });
	const family = h('select', { 'aria-label': 'Family' });
	const count = h('span.muted', { 'aria-live': 'polite' }), empty = h('p.muted.empty');
	const t = devTable(DEV_COLS, (k) => { UI.dir = UI.sort === k ? -UI.dir : 1; UI.sort = k; apply(); });
	const el = h('div', {}, h('h1', 'Devices'), h('div.toolbar', {}, filter, family, count), wrap(t.el), empty);
	let fams = null;
	function apply() {
		const list = [...new Set([...S.devices.values()].map((d) => d.family).concat(UI.family || []))].sort(cmp);
		if (list.join('\0') !== fams) {
			fams = list.join('\0');
			family.replaceChildren(h('option', { value: '', text: 'All families' }), ...list.map((f) => h('option', { value: f, text: f })));
			family.value = UI.family;
		}
		const q = UI.filter.trim().toLowerCase();
		let shown = 0;
		for (const { tr, item: d } of t.rows.rows.values()) {
			const hide = !!((UI.family && d.family !== UI.family) || (q && !DEV_COLS.map((c) => d[c.key] ?? '').concat(d.tags || []).join('\n').toLowerCase().includes(q)));
			if (tr.hidden !== hide) tr.hidden = hide;
			shown += !hide;
		}
		t.rows.order((a, b) => UI.dir * cmp(a[UI.sort] ?? '', b[UI.sort] ?? ''));
		DEV_COLS.forEach((c, i) => {
			const th = t.head.rows[0].cells[i];
			if (c.key === UI.sort) th.setAttribute('aria-sort', UI.dir > 0 ? 'ascending' : 'descending'); else th.removeAttribute('aria-sort');
		});
		const n = t.rows.rows.size;
		T(count, shown === n ? plural(n, 'device') : `${shown} of ${plural(n, 'device')}`);
		empty.hidden = shown > 0;
		T(empty, n ? 'No device matches the filter.' : 'No devices yet.');
	}
	on(filter, 'input', () => { UI.filter = filter.value; apply(); });
	on(family, 'change', () => { UI.family = family.value; apply(); });
	for (const d of S.devices.values()) t.rows.upsert(norm(d));
	apply();
	return {
		el, title: 'Devices',
		update(d) {
			if (!d.devices.size) return;
			for (const k of d.devices) S.devices.has(k) ? t.rows.upsert(norm(S.devices.get(k))) : t.rows.remove(k);
			apply();
		},
	};
}

// ---- one device: its live rows and its history per module
const HIST_COLS = [
	...['queued_ms', 'ended_ms'].map((k, i) => C(k, ['Queued', 'Ended'][i], 'time', txt((e) => stamp(e[k])))),
	C('target_version', 'Target', 'version'), C('outcome', 'Outcome', 'state', (td, e) => cellBadge(td, e.outcome)), C('step', 'Step', 'num'),
	C('desc', 'Reason or version', 'error', (td, e) => { td.className = e.outcome === 'succeeded' ? '' : 'error'; T(td, e.desc); }),
	C('progress', 'Furthest', 'num', txt((e) => (e.progress == null ? '' : `${e.progress}%`))),
];

function device(pk, dn) {
	const id = `${pk}/${dn}`, mine = (k) => k.startsWith(`${id}#`);
	const t = devTable(DEV_COLS.slice(1)), info = h('p.muted'), hist = h('div', {}, note('Loading history…'));
	const el = h('div', {}, h('p', {}, h('a', { href: '#/devices', text: 'Devices' }), ' /'), h('h1', id),
		card('Now', wrap(t.el), info), h('h2.plain', 'History'), hist);
	let alive = true, again = 0;
	function extra() {
		const parts = new Set();
		for (const { item: d } of t.rows.rows.values()) {
			const p = d.platform;
			if (p) parts.add(`platform: ${p.state}${p.parked ? ' (parked)' : ''}${p.held ? `, ${p.held} held` : ''}${p.last_error ? ` — ${p.last_error}` : ''}`);
			if (d.tags?.length) parts.add(`tags: ${d.tags.join(', ')}`);
		}
		if (!t.rows.rows.size) parts.add('Not in the live table.');
		T(info, [...parts].join(' · '));
	}
	async function load() {
		const r = await api('GET', `/api/devices/${enc(pk)}/${enc(dn)}/history`);
		if (!alive) return;
		if (r.status === 401) authFailed();
		if (!r.ok) return hist.replaceChildren(note(`History: ${r.error}`, 'error-text'));
		const mods = Array.isArray(r.data) ? r.data : [];
		hist.replaceChildren(...mods.map((m) => {
			let n = 0;
			const ht = table(HIST_COLS, 'data-entry', () => n++, { class: 'data history cards-sm' });
			(m.entries || []).slice().reverse().forEach((e) => ht.rows.upsert(e)); // newest first
			return card(`Module ${m.module}`, n ? wrap(ht.el) : note('No jobs recorded yet.'));
		}), mods.length ? '' : note('No history.'));
	}
	for (const [k, d] of S.devices) if (mine(k)) t.rows.upsert(norm(d));
	extra();
	load();
	return {
		el, title: id,
		update(d) {
			let refetch = false;
			for (const k of d.devices) {
				if (!mine(k)) continue;
				const prev = t.rows.rows.get(k)?.item, x = S.devices.get(k);
				if (!x) { t.rows.remove(k); continue; }
				if (TERMINAL.has(x.state) && prev?.state !== x.state) refetch = true; // a job ended: its entry is there now
				t.rows.upsert(norm(x));
			}
			t.rows.order((a, b) => cmp(a.module, b.module));
			extra();
			if (refetch) { clearTimeout(again); again = setTimeout(load, 300); }
		},
		destroy() { alive = false; clearTimeout(again); },
	};
}

// ---- jobs and campaigns
const JOB_COLS = [
	DEV_COLS[0], DEV_COLS[1], C('target_version', 'Target', 'version'), DEV_COLS[7],
	C('progress', 'Progress', 'progress', (td, j) => cellBar(td, j.progress, !TERMINAL.has(j.state) && j.state !== 'queued', `${j.progress ?? 0}%`)),
	C('step', 'Step', 'num'), C('desc', 'Detail', 'error'),
	C('updated_ms', 'Updated', 'time', (td, j, p) => p?.updated_ms !== j.updated_ms && td.replaceChildren(timeEl(j.updated_ms))),
];
const MEMBER_COLS = [
	DEV_COLS[0], DEV_COLS[1], C('from_version', 'From', 'version'), DEV_COLS[7], C('phase', 'Phase'),
	C('progress', 'Progress', 'progress', (td, m) => cellBar(td, m.progress, m.state === 'running', '')),
	C('version', 'Installed'), C('reason', 'Reason', 'error', txt((m) => (m.reason ? m.reason + (m.counted ? ' (counted)' : '') : ''))),
	C('attempts', 'Tries', 'num', txt((m) => m.attempts || '')),
];

// The verbs that make sense in a state; the server refuses what it must.
const VERBS = { running: ['pause', 'stop'], collecting: ['pause', 'stop'], paused: ['resume', 'approve', 'retry', 'stop'] };
const verbsFor = (c) => VERBS[c.state] || (['finished', 'stopped'].includes(c.state) && c.counts?.failed > 0 ? ['retry'] : []);

function countsText(n) {
	if (!n) return '';
	const p = [`${n.succeeded}/${n.total} succeeded`];
	if (n.running) p.push(`${n.running} running`);
	if (n.failed) p.push(`${n.failed} failed (${n.failed_counted} counted)`);
	for (const k of ['pending', 'not_started', 'superseded']) if (n[k]) p.push(`${n[k]} ${k.replace('_', ' ')}`);
	return p.join(' · ');
}

function campaignBlock(id, onVerb) {
	const state = h('span'), meta = h('p.meta'), pause = h('p.pause'), counts = h('p.counts'), groups = h('div');
	const reason = h('input', { type: 'text', placeholder: 'Reason (optional)', 'aria-label': `Reason for campaign ${id}`, maxlength: 300 });
	const verbs = h('span.verbs'), trans = h('ol'), transSum = h('summary');
	const el = h('section.card.campaign', { 'data-campaign': id }, h('h3', {}, `Campaign ${id} `, state),
		meta, pause, counts, h('div.controls', {}, reason, verbs), groups, h('details', {}, transSum, trans));
	const gs = [];
	let vkey = null;
	function update(c) {
		cellBadge(state, c.state);
		const im = c.image || {};
		T(meta, `version ${c.version} · module ${c.module} · ${c.origin} · created ${stamp(c.created_ms)} · image ${bytes(im.size)} ${im.sign_method || ''} ${short(im.sign)} ${im.url || '(uploaded)'}`);
		pause.hidden = !c.pause_reason;
		T(pause, c.pause_reason && `Paused: ${c.pause_reason}`);
		T(counts, countsText(c.counts));
		const vs = verbsFor(c);
		if (vs.join() !== vkey) {
			vkey = vs.join();
			verbs.replaceChildren(...vs.map((v) => on(h(`button.${v === 'stop' ? 'danger' : 'primary'}`, { 'data-verb': v, text: v[0].toUpperCase() + v.slice(1) }),
				'click', () => onVerb(v, reason, verbs))));
		}
		const ended = ['finished', 'stopped'].includes(c.state);
		(c.groups || []).forEach((g, i) => {
			let G = gs[i];
			if (!G) {
				gs.push((G = table(MEMBER_COLS, 'data-member', keyOf, {})));
				groups.append((G.box = h('div', {}, (G.h = h('h4')), wrap(G.el))));
			}
			T(G.h, `Group ${i + 1}: ${g.name}${i === c.current_group && !ended ? ' (current)' : ''}${g.approved ? ' · approved' : ''} — ${countsText(g.counts)}`);
			G.rows.sync(g.members || []);
		});
		while (gs.length > (c.groups || []).length) gs.pop().box.remove();
		const tr = c.transitions || [];
		T(transSum, `State changes (${tr.length})`);
		if (trans.children.length !== tr.length) trans.replaceChildren(...tr.map((x) => h('li', `${stamp(x.at_ms)} ${x.from} → ${x.to}: ${x.reason}`)));
	}
	return { el, update };
}

function jobs() {
	const jt = table(JOB_COLS, 'data-job', keyOf, { id: 'jobs' });
	const none = note('No jobs.'), noCamp = note('No campaigns.'), camps = h('div');
	const el = h('div', {}, h('h1', 'Jobs'), wrap(jt.el), none, h('h1', 'Campaigns'), noCamp, camps);
	const blocks = new Map();
	const syncJob = (k) => (S.jobs.has(k) ? jt.rows.upsert(norm(S.jobs.get(k))) : jt.rows.remove(k));
	async function verb(id, v, input, box) {
		const reason = input.value.trim(), bs = box.querySelectorAll('button');
		bs.forEach((b) => (b.disabled = true));
		const r = await api('POST', `/api/campaigns/${enc(id)}/${v}`, reason ? { reason } : {});
		bs.forEach((b) => (b.disabled = false));
		if (!r.ok) {
			notice(`Campaign ${id}: ${v} refused: ${r.error}`);
			if (r.status === 401 || r.status === 403) authFailed();
			return;
		}
		input.value = '';
		if (r.data?.id) { S.campaigns.set(r.data.id, r.data); syncCampaign(r.data.id); }
		notice(`Campaign ${id}: ${v} done${r.data?.state ? `; it is ${r.data.state}` : ''}.`, 'ok');
	}
	function syncCampaign(id) {
		const c = S.campaigns.get(id);
		let b = blocks.get(id);
		if (!c) return b?.el.remove(), blocks.delete(id);
		if (!b) blocks.set(id, (b = campaignBlock(id, (...a) => verb(id, ...a))));
		b.update(c);
	}
	function order() { // newest campaign first
		const list = [...blocks].sort((a, b) => cmp(S.campaigns.get(b[0]).created_ms, S.campaigns.get(a[0]).created_ms) || cmp(a[0], b[0]));
		if (!list.every(([, b], i) => camps.children[i] === b.el)) for (const [, b] of list) camps.append(b.el);
		noCamp.hidden = blocks.size > 0;
		jt.rows.order((a, b) => cmp(b.updated_ms, a.updated_ms));
		none.hidden = jt.rows.rows.size > 0;
	}
	S.jobs.forEach((_, k) => syncJob(k));
	S.campaigns.forEach((_, id) => syncCampaign(id));
	order();
	return {
		el, title: 'Jobs',
		update(d) {
			d.jobs.forEach(syncJob);
			d.campaigns.forEach(syncCampaign);
			if (d.jobs.size || d.campaigns.size) order();
		},
	};
}

// ---- plugins (the whole object comes again on every change)
function plugins() {
	const body = h('div', {}, note('Waiting for the gateway…'));
	const open = new Set(); // expanded option schemas survive updates
	const dflt = (o) => (o.secret ? '(not shown)' : o.default == null ? DASH : typeof o.default === 'string' ? o.default : JSON.stringify(o.default));
	function fill() {
		const p = S.plugins;
		if (!p) return;
		const loaded = p.loaded || [], broken = p.broken || [], ups = Object.entries(p.updates || {});
		const rows = loaded.flatMap((x) => {
			const k = `${x.family}@${x.path}`, o = x.options;
			const detail = h('tr.schema-row', { hidden: !open.has(k) }, h('td', { colspan: 7 }, o?.length
				? grid(['Name', 'Kind', 'Default', 'Required', 'Secret', 'Description'], o.map((o) => h('tr', {}, td(o.name, 'mono'), td(o.kind), td(dflt(o), 'mono'),
					td(o.required ? 'required' : 'optional'), td(o.secret ? 'secret' : ''), td(o.doc))))
				: note(o ? 'This plugin takes no options.' : 'No options schema (older contract).')));
			const btn = on(h('button.small', { 'aria-expanded': String(open.has(k)), text: o ? plural(o.length, 'option') : 'no schema' }), 'click', () => {
				detail.hidden = !detail.hidden;
				btn.setAttribute('aria-expanded', !detail.hidden);
				detail.hidden ? open.delete(k) : open.add(k);
			});
			return [h('tr', { 'data-family': x.family }, td(x.family, 'device'), td(x.version), td(x.contract), td((x.transports || []).join(', ')), td(x.description),
				h('td.mono.small', {}, h('div', x.path), h('span.muted', { title: x.sha256, text: `sha256 ${short(x.sha256)}` })), h('td', {}, btn)), detail];
		});
		// Remote updates per family: security floor, the update under way, versions rolled back.
		const upd = ups.map(([fam, r]) => {
			const u = r.update, ph = u?.phase || {};
			return h('li', [`${fam}: security floor ${r.floor ?? 0}`, u && `update ${u.notice?.version ?? '?'} ${ph.phase ?? ''}${ph.reason ? `: ${ph.reason}` : ''}`,
				...(r.blocked || []).map((b) => `rolled back ${b.version}: ${b.reason}`)].filter(Boolean).join('; '));
		});
		body.replaceChildren(card(`Loaded (${loaded.length})`, loaded.length ? wrap(grid(['Family', 'Version', 'Contract', 'Transports', 'Description', 'File', 'Options'], rows, { id: 'plugins' }))
			: note('No plugin loaded: no family can be flashed.', 'error-text')),
		...[broken.length && h('section.card.bad', {}, h('h2', `Broken (${broken.length})`), h('ul.list', {}, broken.map((b) => h('li', {}, h('div.mono', b.path), h('span.error-text', b.error))))),
			ups.length && card('Remote updates', h('ul.list', {}, upd))].filter(Boolean));
	}
	fill();
	return { el: h('div', {}, h('h1', 'Plugins'), body), title: 'Plugins', update: (d) => d.plugins && fill() };
}

// ---- cache
const IMG_COLS = [
	C('digest', 'Image', 'device mono', (td, i) => td.replaceChildren(h('span', { title: [i.digest, i.sha256 && `sha256 ${i.sha256}`, i.md5 && `md5 ${i.md5}`].filter(Boolean).join('\n'), text: short(i.digest) }))),
	C('size', 'Size', 'num', txt((i) => bytes(i.size))),
	C('state', 'State', 'state', (td, i) => cellBadge(td, i.downloading ? 'downloading' : i.state)),
	C('versions', 'Versions', 'version', txt((i) => (i.versions || []).join(', '))),
	C('devices', 'Devices', 'devices', (td, i) => td.replaceChildren(...(i.devices || []).flatMap((d, n) => [n ? ', ' : '', h('a', { href: devHref(d), text: d })]))),
	C('pins', 'Pins', 'num'),
	C('last_use_ms', 'Last use', 'time', (td, i) => td.replaceChildren(timeEl(i.last_use_ms))),
	C('url', 'URL'), // text only, never a link
];

function cache() {
	const use = h('p'), bar = h('progress.wide', { max: 100, 'aria-label': 'Cache use' });
	const it = table(IMG_COLS, 'data-digest', (i) => i.digest, { id: 'cache' }), none = note('The cache is empty.');
	function fill() {
		const c = S.cache;
		if (!c) return T(use, 'Waiting for the gateway…');
		const imgs = c.images || [], dl = imgs.filter((i) => i.downloading).length;
		T(use, `${bytes(c.bytes)} of ${bytes(c.cap_bytes)} · ${plural(imgs.length, 'image')}${dl ? ` · ${dl} downloading` : ''}`);
		bar.value = c.cap_bytes ? Math.min(100, (100 * c.bytes) / c.cap_bytes) : 0;
		it.rows.sync(imgs);
		it.rows.order((a, b) => cmp(b.last_use_ms || 0, a.last_use_ms || 0));
		none.hidden = imgs.length > 0;
	}
	fill();
	return { el: h('div', {}, h('h1', 'Image cache'), card('Use', use, bar), card('Images', wrap(it.el), none)), title: 'Cache', update: (d) => d.cache && fill() };
}

const VIEWS = [
	[/^#\/?$/, overview], [/^#\/devices\/?$/, devices], [/^#\/device\/([^/]+)\/([^/]+)\/?$/, device],
	[/^#\/jobs\/?$/, jobs], [/^#\/plugins\/?$/, plugins], [/^#\/cache\/?$/, cache],
];

function render() {
	view?.destroy?.();
	view = null;
	const main = $('view'), hash = location.hash || '#/';
	for (const a of document.querySelectorAll('nav a')) {
		const b = a.getAttribute('href');
		if (hash === b || (b === '#/devices' && hash.startsWith('#/device/'))) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
	}
	if (locked) return main.replaceChildren(note('Log in to see this gateway.'));
	for (const [re, make] of VIEWS) {
		const m = re.exec(hash);
		if (!m) continue;
		try { view = make(...m.slice(1).map(decodeURIComponent)); } catch { break; }
		main.replaceChildren(view.el);
		document.title = `otagw · ${view.title}`;
		return;
	}
	main.replaceChildren(h('h1', 'No such page'), h('a', { href: '#/', text: 'Back to the overview' }));
}

// ---- live stream: changes are gathered, then applied about once a frame
const fresh = () => ({ reset: false, overview: false, devices: new Set(), jobs: new Set(), campaigns: new Set(), plugins: false, cache: false });
let dirty = fresh(), timer = 0;
function flush() {
	timer = 0;
	const d = dirty, g = S.overview?.gateway;
	dirty = fresh();
	T($('gw-id'), g ? `${g.product_key}/${g.device_name} · v${g.version}` : '');
	if (d.reset) render(); else view?.update?.(d);
}
function clearState() {
	S.overview = S.plugins = S.cache = null;
	S.devices.clear(); S.jobs.clear(); S.campaigns.clear();
}
function live(ok, text) {
	T($('live'), text || (ok ? 'live' : 'reconnecting'));
	$('live').className = ok ? 'live-on' : '';
}

let es = null, backoff = 1000, retry = 0, lastCheck = 0;
function connect() {
	clearTimeout(retry);
	es?.close();
	live(false, 'connecting');
	const s = (es = new EventSource('/api/events'));
	s.onopen = () => { backoff = 1000; live(true); };
	s.onerror = () => es === s && (live(false), trouble(s));
	const add = (name, f) => s.addEventListener(name, (e) => {
		let m = null;
		try { m = JSON.parse(e.data); } catch {}
		if (m) { f(m); timer ||= setTimeout(flush, 16); }
	});
	add('reset', () => { clearState(); dirty = fresh(); dirty.reset = true; live(true); });
	for (const k of ['overview', 'plugins', 'cache']) add(k, (m) => { S[k] = m; dirty[k] = true; });
	for (const [k, kf] of [['devices', keyOf], ['jobs', keyOf], ['campaigns', (c) => c.id]]) add(k, (m) => {
		for (const x of m.upsert || []) { const key = kf(x); S[k].set(key, x); dirty[k].add(key); }
		for (const key of m.remove || []) { S[k].delete(key); dirty[k].add(key); }
	});
}
// The stream failed. A 401 looks like any other error, so ask /api/session.
// The browser retries by itself unless the stream is closed; then we do.
async function trouble(s) {
	if (s.readyState !== EventSource.CLOSED && Date.now() - lastCheck < 10000) return;
	lastCheck = Date.now();
	const ok = await loadSession();
	if (es !== s) return;
	if (ok && sess.reads_need_login && !sess.authenticated) return lock();
	if (s.readyState === EventSource.CLOSED) {
		retry = setTimeout(connect, backoff);
		backoff = Math.min(backoff * 2, 30000);
	}
}

// ---- session and login
async function loadSession() {
	const r = await api('GET', '/api/session');
	if (r.ok && r.data) sess = r.data;
	$('logout').hidden = !sess.authenticated;
	$('login-open').hidden = sess.authenticated || locked;
	return r.ok;
}
function lock() {
	locked = true;
	clearTimeout(retry);
	es?.close();
	es = null;
	clearState();
	live(false, 'logged out');
	$('login-open').hidden = true;
	render();
	showLogin();
}
// A refused request (401/403): read the session again and offer the login.
async function authFailed() {
	await loadSession();
	if (sess.reads_need_login && !sess.authenticated) lock();
	else if (!sess.authenticated) showLogin();
}
function showLogin() {
	if ($('login')) return $('token').focus();
	const input = h('input', { id: 'token', name: 'token', type: 'password', autocomplete: 'current-password', required: true, spellcheck: 'false', autocapitalize: 'off' });
	const submit = h('button.primary', { type: 'submit', text: 'Log in' });
	const form = h('form.card.login', { id: 'login' }, h('h2', 'Log in'),
		h('p', 'The token is the contents of the gateway’s API token file ([api] token_file, default /var/lib/otagw/api-token).'),
		h('label', { for: 'token', text: 'API token' }),
		h('div.row', {}, input, submit, on(h('button', { text: 'Cancel', hidden: locked }), 'click', () => $('login-slot').replaceChildren())));
	on(form, 'submit', async (e) => {
		e.preventDefault();
		submit.disabled = true;
		const r = await api('POST', '/api/login', { token: input.value });
		submit.disabled = false;
		if (!r.ok) return notice(r.status === 403 ? r.error : `Login failed: ${r.error}`), input.select();
		input.value = '';
		$('login-slot').replaceChildren();
		const was = locked;
		locked = false;
		await loadSession();
		notice('Logged in.', 'ok');
		if (was || !es) { render(); connect(); }
	});
	$('login-slot').replaceChildren(form);
	input.focus();
}

// ---- start
on($('logout'), 'click', async () => {
	const r = await api('POST', '/api/logout');
	if (!r.ok && r.status !== 401) return notice(`Log out failed: ${r.error}`);
	await loadSession();
	if (sess.reads_need_login) lock();
	notice('Logged out.', 'ok');
});
on($('login-open'), 'click', showLogin);
on($('notice-close'), 'click', clearNotice);
on(window, 'hashchange', () => { render(); $('view').focus({ preventScroll: true }); scrollTo(0, 0); });
let rz = 0;
on(window, 'resize', () => { clearTimeout(rz); rz = setTimeout(() => chartRedraw?.(), 150); });
setInterval(() => document.querySelectorAll('time[data-ms]').forEach((t) => T(t, ago(+t.dataset.ms))), 15000);
loadSession().then((ok) => {
	if (!ok) notice('No answer from /api/session.');
	if (sess.reads_need_login && !sess.authenticated) return lock();
	render();
	connect();
});
