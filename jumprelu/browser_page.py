"""The feature browser's one page: HTML, CSS and JavaScript, nothing fetched from a network.

It opens from the file system (file://, where Chromium refuses fetch() of local JSON), so its
data are classic scripts: data/meta.js (window.BROWSER: every feature's density, max and mean
activation, top token and promoted tokens, for the table and the search box), data/vocab.js
(window.VOCAB, the token strings) and data/f/NNNNN.js, one chunk of features' examples each,
inserted as a <script> when a feature in it is first opened (browser_site.py writes them).
Routes: index.html (the table) and index.html#f=ID (one feature).
"""

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>SAE feature browser</title>
<style>
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#263238;color:#eceff1;padding:10px 18px}
header h1{font-size:17px;margin:0 0 2px}
header .meta{font-size:12px;color:#b0bec5}
main{padding:12px 18px;max-width:1200px}
a{color:#1565c0;text-decoration:none} a:hover{text-decoration:underline}
#search{font-size:14px;padding:5px 8px;width:340px;border:1px solid #90a4ae;border-radius:4px}
table{border-collapse:collapse;margin-top:8px;background:#fff}
th,td{padding:3px 10px;border-bottom:1px solid #e0e0e0;text-align:left;white-space:nowrap}
th.sort{cursor:pointer;color:#1565c0} th.sort:hover{background:#e3f2fd}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.pager{margin:8px 0} .pager button{margin-right:6px}
.card{background:#fff;border:1px solid #e0e0e0;border-radius:6px;padding:10px 14px;margin:10px 0}
.card.small{display:inline-block}
.card h3{font-size:14px;margin:0 0 6px;color:#37474f}
.row{display:flex;gap:14px;flex-wrap:wrap}
.ex{display:flex;font:13px/1.9 ui-monospace,Menlo,Consolas,monospace;margin:2px 0;white-space:nowrap}
.ex .v{flex:0 0 64px;color:#607d8b;text-align:right;margin-right:8px}
/* the example's token starts the right half: what precedes it is clipped on the left */
.ex .left{flex:0 0 45%;display:flex;justify-content:flex-end;overflow:hidden}
.ex .right{flex:1 1 0;overflow:hidden;text-overflow:ellipsis}
.tok{white-space:pre;border-radius:2px;padding:1px 0;margin-right:1px}
.tok.center{outline:1.5px solid #d84315}
.tok.special{color:#9e9e9e}
.chip{display:inline-block;font:12px ui-monospace,monospace;background:#eceff1;border-radius:3px;
      padding:1px 5px;margin:2px;white-space:pre}
.chip.up{background:#e3f2fd} .chip.down{background:#fce4ec}
.muted{color:#78909c;font-size:12px}
svg text{font:10px system-ui,sans-serif;fill:#546e7a}
</style></head>
<body>
<header><h1>SAE feature browser</h1><div class="meta" id="meta"></div></header>
<main id="app">Loading data/meta.js ...</main>
<script src="data/meta.js"></script>
<script src="data/vocab.js"></script>
<script>
"use strict";
const B = window.BROWSER, V = window.VOCAB || [];
const app = document.getElementById("app");
const chunks = {}, waiting = {};
const PAGE_ROWS = 100;
let sortKey = "density", sortDesc = true, page = 0, query = "";

function esc(s){return String(s).replace(/[&<>"]/g,c=>({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]));}
function tokText(id){
  if(id < 0) return "";
  let s = V[id] === undefined ? "<" + id + ">" : V[id];
  return s.replace(/\n/g,"\u21b5").replace(/\t/g,"\u2192").replace(/\r/g,"");
}
function fmt(x){if(!isFinite(x)) return "-"; const a=Math.abs(x);
  return a>=100?x.toFixed(0):a>=10?x.toFixed(1):a>=1?x.toFixed(2):x.toPrecision(2);}
function pct(x){return x===0?"0":(100*x<0.01?(100*x).toExponential(1):(100*x).toPrecision(3))+"%";}

window.BROWSER_CHUNK = function(i, feats){chunks[i]=feats; (waiting[i]||[]).forEach(f=>f()); delete waiting[i];};
function withFeature(id, done){
  const c = Math.floor(id / B.chunk);
  if(chunks[c]) return done(chunks[c][id - c*B.chunk]);
  if(!waiting[c]){
    waiting[c] = [];
    const s = document.createElement("script");
    s.src = "data/f/" + String(c).padStart(5,"0") + ".js";
    s.onerror = ()=>{app.innerHTML = "<p>Could not load " + esc(s.src) + ".</p>";};
    document.body.appendChild(s);
  }
  waiting[c].push(()=>done(chunks[c][id - c*B.chunk]));
}

function tokensHtml(ex, max, from, to){
  let h = "";
  for(let j=from;j<to;j++){
    const id = ex.t[j], a = ex.a[j];
    const cls = ["tok"];
    if(j === ex.o) cls.push("center");
    if(B.specials.indexOf(id) >= 0) cls.push("special");
    let style = "";
    // a: thousandths of the feature's max activation
    if(a > 0){cls.push("hot"); style = ' style="background:rgba(255,112,0,' + Math.min(1, 0.15 + 0.85*a/1000).toFixed(3) + ')"';}
    h += '<span class="' + cls.join(" ") + '"' + style + ' title="' + esc(tokText(id)) + ': ' + fmt(a*max/1000) + '">' + esc(tokText(id)) + "</span>";
  }
  return h;
}
function exampleRow(ex, max, label){
  return '<div class="ex"><span class="v">' + label + '</span><span class="left">' + tokensHtml(ex, max, 0, ex.o) + '</span><span class="right">' + tokensHtml(ex, max, ex.o, ex.t.length) + "</span></div>";
}
function bars(counts, w, h, mark){ // a small SVG bar chart; mark: an index to draw in red
  const n = counts.length, m = Math.max(1, ...counts), bw = w / Math.max(1, n);
  let s = '<svg width="' + w + '" height="' + (h + 14) + '">';
  counts.forEach((c,i)=>{const bh = c ? Math.max(1, h*c/m) : 0;
    s += '<rect x="' + (i*bw).toFixed(1) + '" y="' + (h-bh).toFixed(1) + '" width="' + Math.max(1,bw-1).toFixed(1) + '" height="' + bh.toFixed(1) + '" fill="' + (i===mark?"#d84315":"#78909c") + '"/>';});
  return s;
}
function histSvg(f){
  const H = B.hist, lo = f.hist[0], counts = f.hist.slice(1);
  const edge = i => Math.pow(10, H.log10_min + i / H.per_decade);
  return bars(counts, 300, 70, -1) + '<text x="0" y="82">' + fmt(edge(lo)) + '</text><text x="300" y="82" text-anchor="end">' + fmt(edge(lo + counts.length)) + '</text></svg>';
}
let densityBins = null;
function densitySvg(d){
  const lo = -7, hi = 0, n = 35;
  if(!densityBins){densityBins = new Array(n).fill(0);
    B.features.density.forEach(x=>{if(x>0) densityBins[Math.min(n-1, Math.max(0, Math.floor((Math.log10(x)-lo)/(hi-lo)*n)))]++;});}
  const mark = d > 0 ? Math.min(n-1, Math.max(0, Math.floor((Math.log10(d)-lo)/(hi-lo)*n))) : -1;
  return bars(densityBins, 300, 70, mark) + '<text x="0" y="82">1e-7</text><text x="150" y="82" text-anchor="middle">log10 density of all features</text><text x="300" y="82" text-anchor="end">1</text></svg>';
}
function chipText(id){const s = tokText(id); return s.trim() ? s : s.replace(/ /g, "\u2423");}  // a blank token: ␣
function chips(list, cls){return list.map(([t,v])=>'<span class="chip ' + cls + '" title="' + fmt(v) + '">' + esc(chipText(t)) + "</span>").join("");}

function showFeature(id){
  const F = B.features, n = B.n_features;
  if(!(id >= 0 && id < n)){app.innerHTML = "<p>No feature " + esc(id) + ' (0 to ' + (n-1) + '). <a href="#">All features</a></p>'; return;}
  const nav = '<p><a href="#">&larr; all features</a> &nbsp; ' + (id>0?'<a href="#f='+(id-1)+'">&lsaquo; '+(id-1)+'</a> ':"") + (id<n-1?' <a href="#f='+(id+1)+'">'+(id+1)+' &rsaquo;</a>':"") + "</p>";
  app.innerHTML = nav + "<h2>Feature " + id + "</h2><p>Loading ...</p>";
  withFeature(id, f=>{
    if(location.hash !== "#f=" + id) return;
    const d = F.density[id], max = F.max[id];
    let h = nav + '<h2 id="title">Feature ' + id + "</h2>";
    h += '<p>fires on <b>' + pct(d) + "</b> of " + B.meta.tokens.toLocaleString() + " tokens &middot; max activation <b>" + fmt(max) + "</b> &middot; mean when firing <b>" + fmt(F.mean[id]) + "</b></p>";
    if(!f){app.innerHTML = h + '<p class="dead">Never fired on these tokens (dead here).</p>'; return;}
    h += '<div class="row"><div class="card"><h3>Activation histogram (log-spaced bins)</h3>' + histSvg(f) + '</div><div class="card"><h3>Firing density</h3>' + densitySvg(d) + "</div></div>";
    h += '<div class="card"><h3>Logit lens: the tokens its decoder direction promotes and suppresses</h3><div>promoted ' + chips(f.up, "up") + '</div><div>suppressed ' + chips(f.down, "down") + "</div></div>";
    h += '<div class="card"><h3>Similar decoder directions</h3>' + f.nbr.map(([j,c])=>'<a class="chip" href="#f=' + j + '">' + j + " (" + c.toFixed(2) + ")</a>").join("") + "</div>";
    h += '<div class="card" id="top"><h3>Top activating contexts (one per context; outlined: the max token)</h3>' + f.top.map(e=>exampleRow(e, max, fmt(e.v))).join("") + "</div>";
    h += '<div class="card" id="samples"><h3>Random firing tokens across the activation distribution (uniform sample, by quantile)</h3>' + f.smp.map(e=>exampleRow(e, max, "q" + Math.round(100*e.q) + " " + fmt(e.v))).join("") + "</div>";
    app.innerHTML = h;
  });
}

function rows(){
  const F = B.features, q = query.trim().toLowerCase();
  let ids = [];
  for(let i=0;i<B.n_features;i++){
    if(q){const words = [F.top_token[i]].concat(F.up[i]).map(t=>t>=0?(V[t]||"").toLowerCase():"");
      if(!words.some(w=>w.indexOf(q) >= 0)) continue;}
    ids.push(i);
  }
  const key = {id:i=>i, density:i=>F.density[i], max:i=>F.max[i], mean:i=>F.mean[i]}[sortKey];
  ids.sort((a,b)=>(sortDesc?key(b)-key(a):key(a)-key(b)) || a-b);
  return ids;
}
function showTable(){
  const F = B.features, ids = rows(), pages = Math.max(1, Math.ceil(ids.length / PAGE_ROWS));
  page = Math.min(page, pages-1);
  const arrow = k => sortKey===k ? (sortDesc?" \u25bc":" \u25b2") : "";
  let h = '<input id="search" placeholder="feature id, or a token (top activating or promoted)" value="' + esc(query) + '">';
  h += ' <span class="muted">' + ids.length + " of " + B.n_features + " features; " + B.meta.live + " fired on " + B.meta.tokens.toLocaleString() + " tokens</span>";
  h += '<div><div class="card small"><h3>Firing density of all features</h3>' + densitySvg(-1) + "</div></div>";
  h += '<div class="pager"><button id="prev">&lsaquo; prev</button><button id="next">next &rsaquo;</button> page ' + (page+1) + " of " + pages + "</div>";
  h += '<table id="features"><thead><tr><th class="sort" data-k="id">feature' + arrow("id") + '</th><th class="sort" data-k="density">density' + arrow("density") + '</th><th class="sort" data-k="max">max act' + arrow("max") + '</th><th class="sort" data-k="mean">mean act' + arrow("mean") + "</th><th>top token</th><th>promoted tokens</th></tr></thead><tbody>";
  for(const i of ids.slice(page*PAGE_ROWS, (page+1)*PAGE_ROWS)){
    h += '<tr><td><a href="#f=' + i + '">' + i + '</a></td><td class="num">' + pct(F.density[i]) + '</td><td class="num">' + fmt(F.max[i]) + '</td><td class="num">' + fmt(F.mean[i]) + "</td><td>" + (F.top_token[i] >= 0 ? '<span class="chip">' + esc(chipText(F.top_token[i])) + "</span>" : "") + "</td><td>" + F.up[i].map(t=>'<span class="chip up">' + esc(chipText(t)) + "</span>").join("") + "</td></tr>";
  }
  app.innerHTML = h + "</tbody></table>";
  const s = document.getElementById("search");
  s.onkeydown = e=>{if(e.key !== "Enter") return; const v = s.value.trim();
    if(/^\d+$/.test(v)){location.hash = "#f=" + v; return;} query = v; page = 0; showTable();
    document.getElementById("search").focus();};
  document.querySelectorAll("th.sort").forEach(th=>th.onclick=()=>{const k = th.dataset.k;
    sortDesc = sortKey === k ? !sortDesc : k !== "id"; sortKey = k; page = 0; showTable();});
  document.getElementById("prev").onclick = ()=>{page = Math.max(0, page-1); showTable();};
  document.getElementById("next").onclick = ()=>{page = page+1; showTable();};
}

function route(){
  const m = location.hash.match(/^#f=(\d+)$/);
  if(m) showFeature(parseInt(m[1], 10)); else showTable();
  window.scrollTo(0, 0);
}
if(!B){app.innerHTML = "<p>data/meta.js is missing: rerun experiments/browse.py.</p>";}
else{
  const M = B.meta;
  document.getElementById("meta").textContent = M.model + " \u00b7 " + M.site + " \u00b7 " + M.arch + " SAE, " + B.n_features + " features \u00b7 " + M.contexts + " held-out contexts from #" + M.first_context + " (" + M.tokens.toLocaleString() + " tokens) \u00b7 " + M.sae;
  window.addEventListener("hashchange", route);
  route();
}
</script>
</body></html>
"""
