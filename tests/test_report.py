"""report.html: self-contained, parses, and really plays/loads in a headless browser."""
import html.parser
import json
import os
import re
import shutil
import subprocess
import tempfile
import types

import numpy as np
import pytest

from mars_jax.audio import spectrogram as spec_lib
from mars_jax.evaluate import report

SR = 8000
N = 8192
SPEC = types.SimpleNamespace(sample_rate=SR, n_fft=256, hop=64, log_eps=1e-5, log_max=1.0,
                             duration=N / SR)
CONFIG = types.SimpleNamespace(spectrogram=SPEC, data=types.SimpleNamespace(source='synthetic'))
# The ceilings of one estimator along the chain, as the evaluate stage writes them.
CEILING_METRICS = {'real_pitch_within_semitone': 1.0, 'gl_pitch_within_semitone': 0.96,
                   'recon_pitch_within_semitone': 0.5, 'pitch_within_semitone': 0.25,
                   'gl_mse': 0.01, 'recon_audio_mse': 0.04, 'recon_mse': 0.02}
for _k in ('real_', 'gl_', 'recon_', ''):
  _p = CEILING_METRICS[_k + 'pitch_within_semitone']
  CEILING_METRICS[_k + 'pitch_within_semitone_se'] = (_p * (1 - _p) / 96) ** 0.5
  CEILING_METRICS[_k + 'pitch_within_semitone_n'] = 96


def _note(midi, seed=0):
  t = np.arange(N) / SR
  f = 440.0 * 2 ** ((midi - 69) / 12)
  rng = np.random.default_rng(seed)
  w = 0.5 * np.sin(2 * np.pi * f * t) * np.exp(-3 * t) + 0.01 * rng.standard_normal(N)
  return w.astype(np.float32)


def fake_workdir(root):
  """metrics.jsonl for three stages, a 2 x 2 grid with 3 filled cells (2 notes each) and 2
  listening triples (3 notes each). Returns (report path, notes on the page / 2)."""
  stages = (('tokenizer', 30), ('autoregressor', 20), (os.path.join('eval', 'pitch_classifier'), 1))
  for name, n in stages:
    os.makedirs(os.path.join(root, name), exist_ok=True)
    with open(os.path.join(root, name, 'metrics.jsonl'), 'w') as f:
      for s in range(1, n + 1):
        rec = {'step': 10 * s, 'loss': 5.0 / s + 0.1}
        if s % 10 == 0:
          rec['eval/loss'] = 6.0 / s
        f.write(json.dumps(rec) + '\n')
  cells = {}
  for (p, q) in ((60, 0), (60, 1), (64, 1)):
    w = _note(p, q)
    nn = _note(p + 1, 7)
    cells[(p, q)] = {'file': f'{p}_{q}.wav', 'spec': spec_lib.spectrogram(w, SPEC), 'wave': w,
                     'seed': 0, 'nn': {'name': f'train/{p}', 'spec': spec_lib.spectrogram(nn, SPEC),
                                       'wave': nn, 'dist': 0.1}}
  grid = {'pitches': [60, 64], 'instruments': ['brass', 'flute'], 'instrument_ids': [0, 1],
          'cells': cells}
  metrics = {'pis': 2.0, 'real_pis': 3.0, 'ndb_k': float('nan'), 'num_generated': 3,
             'extra_metric': 1.5, **CEILING_METRICS}
  triples = []
  for p, name in ((60, 'brass'), (67, 'flute')):
    notes = {}
    for key, seed in (('real', 0), ('gl', 1), ('recon', 2)):
      w = _note(p, seed)
      notes[key] = (spec_lib.spectrogram(w, SPEC), w)
    triples.append({'name': f'test/{name}_{p}', 'pitch': p, 'instrument': name, **notes})
  path = report.write_report(CONFIG, root, metrics, grid, triples)
  return path, (2 * len(cells) + 3 * len(triples)) // 2


class _Counter(html.parser.HTMLParser):
  def __init__(self):
    super().__init__()
    self.tags, self.srcs = {}, []

  def handle_starttag(self, tag, attrs):
    self.tags[tag] = self.tags.get(tag, 0) + 1
    self.srcs += [v for k, v in attrs if k in ('src', 'href')]


def test_report_parses_and_is_self_contained(tmp_path):
  path, cells = fake_workdir(str(tmp_path))
  with open(path, encoding='utf-8') as f:
    page = f.read()
  p = _Counter()
  p.feed(page)
  p.close()
  assert p.tags.get('audio') == 2 * cells and p.tags.get('img') == 2 * cells   # one each a note
  assert p.tags.get('svg') == 3 and p.tags.get('path', 0) >= 3      # one matplotlib plot a stage
  assert p.tags.get('script', 0) == 0
  assert all(s.startswith(('data:image/png;base64,', 'data:audio/wav;base64,')) for s in p.srcs)
  assert not re.search(r'(src|href)="(https?:|file:|/)', page)
  row = re.search(r'\(pis\)</span></td><td class="n">([^<]*)</td><td class="n">([^<]*)<', page)
  assert row and row.groups() == ('2.0000', '3.0000')  # generated next to its real ceiling
  assert 'extra_metric' in page  # metrics without a label are still shown
  assert 'n/a' in page  # NaN shown as undefined, not as "nan"


def test_training_curves_are_matplotlib_plots_with_a_step_axis_and_a_legend():
  losses = {'loss': [(10, 5.0), (20, 1.0), (30, 0.1)], 'eval/loss': [(30, 0.2)]}
  svg = report.svg_curve(losses)
  assert svg.startswith('<svg') and svg.rstrip().endswith('</svg>')
  assert '>step<' in svg and '>loss<' in svg and '>eval/loss<' in svg   # text kept as text
  assert 'matplotlib' in svg.lower()
  flat = report.svg_curve({'acc': [(1, 0.5), (2, 0.6)]})
  assert '>0.50<' in flat or '>0.5<' in flat             # linear ticks read as numbers
  assert report.svg_curve({}) == '' and report.svg_curve({'loss': []}) == ''


def _table(page, cls):
  m = re.search(rf'<table class="{cls}">(.*?)</table>', page, re.S)
  assert m, f'no <table class="{cls}"> in report.html'
  return [[re.sub(r'<[^>]+>', '', c).strip() for c in re.findall(r'<t[hd][^>]*>(.*?)</t[hd]>', r,
                                                                   re.S)]
          for r in re.findall(r'<tr>(.*?)</tr>', m.group(1), re.S)]


def test_report_shows_where_quality_is_lost(tmp_path):
  path, _ = fake_workdir(str(tmp_path))
  with open(path, encoding='utf-8') as f:
    page = f.read()
  assert '<h2>Where quality is lost</h2>' in page
  rows = _table(page, 'ceilings')
  head = rows[0]
  assert [h.split()[0] for h in head[1:]] == ['real', 'Griffin-Lim', 'tokenizer', 'generated']
  pitch = next(r for r in rows if r[0].startswith('pitch within a semitone'))
  # Left to right: real, Griffin-Lim, round trip, generated, each +- its standard error and n.
  assert pitch[1:] == ['1.0000 ± 0.0000 n=96', '0.9600 ± 0.0200 n=96', '0.5000 ± 0.0510 n=96',
                       '0.2500 ± 0.0442 n=96'], pitch
  mse = next(r for r in rows if r[0].startswith('MSE, spectrogram of the audio'))
  assert mse[1:] == ['-', '0.0100', '0.0400', '-'], mse   # no true spectrogram: no cell
  dec = next(r for r in rows if r[0].startswith('MSE, decoded'))
  assert dec[1:] == ['-', '-', '0.0200', '-'], dec
  assert 'pitch_within_semitone_se' not in page   # shown in the table, not listed again
  triples = _table(page, 'triples')
  assert [r[0] for r in triples[1:]] == ['brass, MIDI 60test/brass_60',
                                         'flute, MIDI 67test/flute_67']
  for r in triples[1:]:   # original, Griffin-Lim, round trip: each a player and an image
    assert [c.split(':')[0] for c in r[1:]] == ['original', 'Griffin-Lim', 'round trip']
  body = re.search(r'<table class="triples">(.*?)</table>', page, re.S).group(1)
  assert body.count('<audio') == 6 and body.count('<img') == 6


def test_spectrogram_images_have_axes_and_a_colour_bar():
  """The PNG is a matplotlib figure (white margins with ticks around the spectrogram), not the
  bare colour-mapped array: its size is the figure's, not the spectrogram's."""
  import io
  from PIL import Image
  from mars_jax.evaluate import images
  spec = spec_lib.spectrogram(_note(60), SPEC)                # (128, 128)
  img = np.asarray(Image.open(io.BytesIO(images.spectrogram_png(spec, SPEC))).convert('RGB'))
  assert img.shape == (240, 320, 3)
  assert (img[0, 0] == 255).all() and (img[-1, -1] == 255).all()   # margins for labels
  dark = (img.sum(-1) < 200).mean(1)          # rows with tick labels / spectrogram pixels
  assert dark.max() > 0.3
  # The same spectrogram twice gives the same bytes; another one differs (the figure is reused).
  assert images.spectrogram_png(spec, SPEC) == images.spectrogram_png(spec, SPEC)
  assert images.spectrogram_png(spec_lib.spectrogram(_note(72), SPEC), SPEC) != \
      images.spectrogram_png(spec, SPEC)


def _chromium():
  for name in ('chromium', 'chromium-browser', 'google-chrome'):
    path = shutil.which(name)
    if path:
      return path
  return None


# Injected into a copy of the page (the report itself ships no JS): after every <audio> has its
# metadata (or errored) and every <img> has decoded, write the findings into the DOM.
_PROBE = """<script>
(function () {
  function done() {
    var a = Array.from(document.querySelectorAll('audio')).map(function (e) {
      return {duration: e.duration, error: e.error ? e.error.code : null, ready: e.readyState};
    });
    var i = Array.from(document.querySelectorAll('img')).map(function (e) {
      return {w: e.naturalWidth, complete: e.complete};
    });
    var pre = document.createElement('pre');
    pre.id = 'probe';
    pre.textContent = JSON.stringify({audio: a, img: i});
    document.body.appendChild(pre);
  }
  window.addEventListener('load', function () {
    var audios = Array.from(document.querySelectorAll('audio'));
    var waits = audios.map(function (e) {
      return new Promise(function (res) {
        if (e.readyState >= 1 || e.error) { res(); return; }
        e.addEventListener('loadedmetadata', res);
        e.addEventListener('error', res);
        e.load();
      });
    });
    var imgs = Array.from(document.querySelectorAll('img')).map(function (e) {
      return e.decode ? e.decode().catch(function () {}) : Promise.resolve();
    });
    Promise.all(waits.concat(imgs)).then(done);
    // Media decode runs off headless Chromium's virtual clock, which jumps ahead when nothing
    // is pending: ticking in 1 ms steps makes the 20 s budget last long enough in real time.
    (function tick() { if (!document.getElementById('probe')) setTimeout(tick, 1); })();
  });
})();
</script>"""


def test_report_loads_in_headless_chromium(tmp_path):
  exe = _chromium()
  if exe is None:
    pytest.skip('chromium not installed (Debian: apt-get install chromium); '
                'the browser check of report.html is skipped')
  path, cells = fake_workdir(str(tmp_path / 'wd'))
  with open(path, encoding='utf-8') as f:
    page = f.read()
  probe = str(tmp_path / 'probe.html')
  with open(probe, 'w', encoding='utf-8') as f:
    f.write(page.replace('</body>', _PROBE + '</body>'))
  profile = tempfile.mkdtemp(prefix='chromium-profile-', dir=str(tmp_path))
  cmd = [exe, '--headless', '--no-sandbox', '--disable-gpu', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync',
         '--disable-dev-shm-usage', '--mute-audio', '--autoplay-policy=no-user-gesture-required',
         f'--user-data-dir={profile}', '--virtual-time-budget=20000', '--dump-dom',
         'file://' + probe]
  # Should --dump-dom still come before the probe has run (a loaded machine), try again: a page
  # that breaks a player or an image still fails below, once the probe has run.
  for _ in range(3):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="probe">(.*?)</pre>', r.stdout, re.S)
    if m:
      break
  assert m, f'probe did not run (rc {r.returncode}); stderr tail:\n{r.stderr[-2000:]}'
  found = json.loads(html.unescape(m.group(1)))
  assert len(found['audio']) == 2 * cells and len(found['img']) == 2 * cells
  for a in found['audio']:
    assert a['error'] is None and a['duration'] == pytest.approx(N / SR, abs=0.01), found['audio']
  for i in found['img']:
    assert i['w'] > 0, found['img']
