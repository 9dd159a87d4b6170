"""DIR/report.html: one self-contained listening report (no JS, no network, no side files).

Audio and images are embedded as base64 data: URIs so the page still works when copied
anywhere (mailed, attached to an issue). Training curves are inline SVG drawn by matplotlib.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import time

import numpy as np

from mars_jax import fs
from mars_jax import workdir as workdir_lib
from mars_jax.evaluate import images

IMG_SIDE = 256   # spectrogram PNGs are average-pooled to at most this many pixels a side

# (label, generated key, real-ceiling key, which way is better)
PAIRED = (
    ('PIS (pitch inception score)', 'pis', 'real_pis', 'higher'),
    ('IIS (instrument inception score)', 'iis', 'real_iis', 'higher'),
    ('PKID (pitch-classifier embeddings, MMD² unbiased)', 'pkid', 'real_pkid', 'lower'),
    ('IKID (instrument-classifier embeddings)', 'ikid', 'real_ikid', 'lower'),
    ('NDB/k (fraction of different bins)', 'ndb_k', 'real_ndb_k', 'lower'),
    ('NDB Jensen-Shannon divergence', 'ndb_js', 'real_ndb_js', 'lower'),
    ('Fréchet distance, pitch-classifier embeddings (fad_clf, not VGGish FAD)', 'fad_clf_pitch',
     'real_fad_clf_pitch', 'lower'),
    ('Fréchet distance, instrument-classifier embeddings', 'fad_clf_instrument',
     'real_fad_clf_instrument', 'lower'),
    ('mean nearest-training-note cosine distance (memorisation: ~0 = copies)',
     'nn_dist_generated', 'nn_dist_real', 'similar'),
)
# "Where quality is lost": one row per estimator, one column per stage a note goes through.
# A row maps a column's prefix to its key (default prefix + suffix); a column without a key
# has no such measurement (a generated note has no true spectrogram to compare with).
CEILING_COLUMNS = (('real held-out notes', 'real_'), ('Griffin-Lim of the true spectrogram', 'gl_'),
                   ('tokenizer round trip (encode, decode, Griffin-Lim)', 'recon_'),
                   ('generated', ''))
CEILINGS = (
    ('pitch within a semitone (librosa.pyin)', 'pitch_within_semitone', None),
    ('pitch exact (pyin)', 'pitch_exact', None),
    ('pitch detected (pyin voiced)', 'pitch_detected', None),
    ('pitch classifier agrees with the labelled pitch', 'clf_pitch_match', None),
    ('instrument classifier agrees with the label', 'clf_instrument_match', None),
    ('PKID against the training notes', 'pkid', None),
    ('IKID against the training notes', 'ikid', None),
    ('fad_clf_pitch against the training notes', 'fad_clf_pitch', None),
    ('NDB/k against the training notes', 'ndb_k', None),
    ('MSE, spectrogram of the audio vs the true one (normalised scale)', None,
     {'gl_': 'gl_mse', 'recon_': 'recon_audio_mse'}),
    ('MAE, spectrogram of the audio vs the true one', None,
     {'gl_': 'gl_mae', 'recon_': 'recon_audio_mae'}),
    ('MSE, decoded spectrogram vs the true one (the tokenizer alone)', None,
     {'recon_': 'recon_mse'}),
    ('MAE, decoded spectrogram vs the true one', None, {'recon_': 'recon_mae'}),
)
SINGLE = (
    ('tokenizer reconstruction MSE (all held-out notes, normalised scale)', 'mse'),
    ('tokenizer reconstruction MAE (all held-out notes)', 'mae'),
    ('pitch classifier test accuracy', 'acc_pitch_classifier'),
    ('instrument classifier test accuracy', 'acc_instrument_classifier'),
    ('generated notes', 'num_generated'),
    ('unreadable generated files (scored as silence)', 'num_generated_unreadable'),
    ('real training notes used', 'num_real_train'),
    ('real held-out notes used', 'num_real_test'),
    ('real held-out notes scored by pyin', 'num_real_pitch'),
    ('held-out notes through Griffin-Lim and the tokenizer (the ceilings)', 'num_ceiling'),
)

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.grid td,.triples td{font-size:12px}
figure img{display:block}
figure audio{width:320px;height:28px}
.pair{display:flex;flex-direction:column;gap:6px}
.curves{display:flex;flex-wrap:wrap;gap:1em}
figure{margin:0}
figcaption{font-size:13px}
.dim{color:#888}
"""


def _fmt(v):
  if v is None:
    return 'n/a'
  if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
    return str(int(v))
  v = float(v)
  if not math.isfinite(v):
    return 'n/a'
  if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
    return f'{v:.3e}'
  return f'{v:.4f}'


def _pool(spec, side=IMG_SIDE):
  spec = np.asarray(spec, np.float32)
  F, T = spec.shape
  a = next(k for k in range(1, F + 1) if F % k == 0 and F // k <= side)
  b = next(k for k in range(1, T + 1) if T % k == 0 and T // k <= side)
  return spec.reshape(F // a, a, T // b, b).mean((1, 3))


def png_uri(spec, spec_cfg):
  """(F, T) normalised spectrogram -> data:image/png URI: axes in Hz and seconds, dB colour bar."""
  png = images.spectrogram_png(_pool(spec), spec_cfg)
  return 'data:image/png;base64,' + base64.b64encode(png).decode()


def wav_uri(wave, sample_rate):
  """(N,) float wave -> data:audio/wav URI, 16-bit PCM (what every browser decodes)."""
  data = fs.wav_bytes(np.clip(np.asarray(wave, np.float32), -1.0, 1.0), sample_rate)
  return 'data:audio/wav;base64,' + base64.b64encode(data).decode()


# --- training curves ---------------------------------------------------------------------------


def load_curves(workdir):
  """{name: {series: [(step, value)]}} from DIR/*/metrics.jsonl and DIR/eval/*/metrics.jsonl."""
  order = {'tokenizer': 0, 'autoregressor': 1}  # pipeline order first, then the rest by name
  root = fs.path(workdir)
  paths = sorted(list(root.glob('*/metrics.jsonl')) + list(root.glob('eval/*/metrics.jsonl')),
                 key=lambda p: (order.get(p.parent.name, 2), os.fspath(p)))
  curves = {}
  for p in paths:
    name = os.fspath(p.parent)[len(os.fspath(root)):].strip('/')   # e.g. 'eval/pitch_classifier'
    series, pitch = {}, {}
    for line in p.read_text().splitlines():
      try:
        r = json.loads(line)
        step = float(r['step'])
      except (ValueError, KeyError, TypeError):
        continue
      for keys, out in ((('loss', 'eval/loss'), series), (PITCH_CURVES, pitch)):
        for key in keys:
          v = r.get(key)
          if isinstance(v, (int, float)) and math.isfinite(v):
            out.setdefault(key, []).append((step, float(v)))
    if series:
      curves[name] = series
    if pitch:   # the tokenizer's round trip, tuned on while it trains
      curves[f'{name} pitch'] = pitch
  return curves


PITCH_CURVES = ('recon_pitch_within_semitone', 'gl_pitch_within_semitone')


def svg_curve(series, size=(4.2, 2.2)):
  """Inline SVG drawn by matplotlib: each series value vs step; log y when all values are positive
  and span more than 20x (losses usually do). Text stays text (svg.fonttype 'none')."""
  if not any(series.values()):
    return ''
  import matplotlib
  from matplotlib.backends.backend_svg import FigureCanvasSVG
  from matplotlib.figure import Figure
  fig = Figure(figsize=size, layout='constrained')   # no pyplot: no global state, no leaks
  FigureCanvasSVG(fig)
  ax = fig.add_subplot()
  for name, s in series.items():
    steps, values = zip(*s)
    ax.plot(steps, values, linewidth=1.2, marker='o' if len(s) == 1 else None, markersize=3,
            label=name)
  ys = [v for s in series.values() for _, v in s]
  if min(ys) > 0 and max(ys) / min(ys) > 20:
    ax.set_yscale('log')
  ax.set_xlabel('step', fontsize=8)
  ax.tick_params(labelsize=7)
  ax.grid(alpha=0.3, linewidth=0.5)
  ax.legend(fontsize=7, frameon=False)
  buf = io.StringIO()
  with matplotlib.rc_context({'svg.fonttype': 'none'}):
    fig.savefig(buf, format='svg')
  text = buf.getvalue()
  return text[text.index('<svg'):]                   # no XML prolog inside HTML


# --- page --------------------------------------------------------------------------------------


def _cell(m, key):
  """A metric's table cell: value, and for an accuracy '± se' and its n."""
  if key is None or key not in m:
    return '<td class="n dim">-</td>'
  se, n = m.get(key + '_se'), m.get(key + '_n')
  extra = ''
  if se is not None:
    extra = f' ± {_fmt(se)}'
  if n is not None:
    extra += f' <span class="dim">n={_fmt(n)}</span>'
  return f'<td class="n">{_fmt(m[key])}{extra}</td>'


def _ceilings_table(m):
  """Real -> Griffin-Lim -> tokenizer -> generated, the same estimator along each row."""
  head = ''.join(f'<th>{html.escape(c)}</th>' for c, _ in CEILING_COLUMNS)
  rows = [f'<table class="ceilings"><tr><th>estimator</th>{head}</tr>']
  shown = set()
  for label, suffix, keys in CEILINGS:
    keys = keys or {p: p + suffix for _, p in CEILING_COLUMNS}
    if not any(k in m for k in keys.values()):
      continue
    shown |= set(keys.values())
    cells = ''.join(_cell(m, keys.get(p)) for _, p in CEILING_COLUMNS)
    rows.append(f'<tr><td>{html.escape(label)}</td>{cells}</tr>')
  rows.append('</table>')
  return '\n'.join(rows), shown


def _metrics_table(m, shown=()):
  rows = ['<table><tr><th>metric</th><th>generated</th><th>real held-out (ceiling)</th>'
          '<th>better</th></tr>']
  for label, g, r, better in PAIRED:
    if g not in m and r not in m:
      continue
    rows.append(f'<tr><td>{html.escape(label)} <span class="dim">({g})</span></td>'
                f'<td class="n">{_fmt(m.get(g))}</td><td class="n">{_fmt(m.get(r))}</td>'
                f'<td>{better}</td></tr>')
  rows.append('</table><table><tr><th>other</th><th>value</th></tr>')
  for label, k in SINGLE:
    if k in m:
      rows.append(f'<tr><td>{html.escape(label)} <span class="dim">({k})</span></td>'
                  f'{_cell(m, k)}</tr>')
  known = {k for _, g, r, _ in PAIRED for k in (g, r)} | {k for _, k in SINGLE} | set(shown)
  known |= {k + s for k in known for s in ('_se', '_n')}   # shown beside their accuracy
  for k in sorted(set(m) - known):
    rows.append(f'<tr><td>{html.escape(k)}</td><td class="n">{_fmt(m[k])}</td></tr>')
  rows.append('</table>')
  return '\n'.join(rows)


def _note(spec, wave, spec_cfg, caption):
  return (f'<figure><img alt="{html.escape(caption)}" src="{png_uri(spec, spec_cfg)}">'
          f'<audio controls preload="auto" src="{wav_uri(wave, spec_cfg.sample_rate)}"></audio>'
          f'<figcaption>{html.escape(caption)}</figcaption></figure>')


def _triples_table(triples, spec_cfg):
  """Held-out notes heard at each ceiling: original, Griffin-Lim, tokenizer round trip."""
  if not triples:
    return '<p>No held-out notes to show.</p>'
  rows = ['<table class="triples"><tr><th>held-out note</th><th>original</th>'
          '<th>Griffin-Lim of its spectrogram</th><th>tokenizer round trip</th></tr>']
  for t in triples:
    rows.append(f'<tr><th>{html.escape(str(t["instrument"]))}, MIDI {int(t["pitch"])}'
                f'<br><span class="dim">{html.escape(str(t["name"]))}</span></th>')
    for key, what in (('real', 'original'), ('gl', 'Griffin-Lim'), ('recon', 'round trip')):
      spec, wave = t[key]
      rows.append(f'<td>{_note(spec, wave, spec_cfg, what + ": " + str(t["name"]))}</td>')
    rows.append('</tr>')
  rows.append('</table>')
  return ''.join(rows)


def _grid_table(grid, spec_cfg):
  if not grid or not grid.get('cells'):
    return '<p>No generated notes to show.</p>'
  rows = ['<table class="grid"><tr><th>pitch \\ instrument</th>']
  rows += [f'<th>{html.escape(str(n))}</th>' for n in grid['instruments']]
  rows.append('</tr>')
  for p in grid['pitches']:
    rows.append(f'<tr><th>MIDI {p}</th>')
    for q in grid['instrument_ids']:
      c = grid['cells'].get((p, q))
      if c is None:
        rows.append('<td class="dim">-</td>')
        continue
      nn = c['nn']
      rows.append('<td><div class="pair">'
                  + _note(c['spec'], c['wave'], spec_cfg, f'generated {c["file"]}')
                  + _note(nn['spec'], nn['wave'], spec_cfg,
                          f'nearest train: {nn["name"]} (d={nn["dist"]:.3f})')
                  + '</div></td>')
    rows.append('</tr>')
  rows.append('</table>')
  return ''.join(rows)


def render(metrics, curves, grid, spec_cfg, triples=(), title='mars_jax listening report',
           note=''):
  """The whole page as a string; spec_cfg is config.spectrogram (rate, axes, dB scale)."""
  figs = ''.join(f'<figure>{svg_curve(s)}<figcaption>{html.escape(name)}: '
                 f'{", ".join(html.escape(k) for k in s)}</figcaption></figure>'
                 for name, s in curves.items())
  ceilings, shown = _ceilings_table(metrics)
  return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="dim">{html.escape(note)} Generated {time.strftime('%Y-%m-%d %H:%M:%S')}.</p>
<h2>Where quality is lost</h2>
<p class="dim">The same estimators on held-out real notes at each stage a generated note goes
through, then on the generated notes. A generated note can be no better than the tokenizer's
round trip, and that no better than Griffin-Lim of the true spectrogram: read left to right, the
first big drop is where to work. Accuracies carry their standard error sqrt(p(1-p)/n) over n
notes; a difference under two errors is not a result.</p>
{ceilings}
<h2>Metrics</h2>
<p class="dim">Each metric of the generated notes (against the training notes) sits next to the
same metric for held-out real notes (against the same training notes): the ceiling a perfect
generator would reach. fad_clf_* use this project's classifiers, not VGGish, so they are not
comparable with published FAD values.</p>
{_metrics_table(metrics, shown)}
<h2>Training curves</h2>
<div class="curves">{figs or '<p>No metrics.jsonl found.</p>'}</div>
<h2>Held-out notes at each ceiling</h2>
<p class="dim">A few held-out notes per instrument as heard at each stage: the original audio,
Griffin-Lim of its true spectrogram, and the tokenizer's round trip (encode, tokens, decode,
Griffin-Lim). Spectrograms are recomputed from the audio you hear.</p>
{_triples_table(triples, spec_cfg)}
<h2>Generated notes and their nearest training notes</h2>
<p class="dim">Top: generated (spectrogram recomputed from the audio file); below: the nearest
training note by cosine distance of mean-centred pooled spectrograms, among the training notes
evaluated.</p>
{_grid_table(grid, spec_cfg)}
</body></html>
"""


def write_report(config, workdir, metrics, grid, triples=(), path=None):
  """Renders DIR/report.html (atomically) and returns its path."""
  path = path or fs.join(workdir, workdir_lib.REPORT)
  page = render(metrics, load_curves(workdir), grid, config.spectrogram, triples,
                note=f'workdir {fs.absolute(workdir)}; data.source={config.data.source}.')
  fs.write_text(path, page)
  return path
