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
SPEC = types.SimpleNamespace(n_fft=256, hop=64, log_eps=1e-5, log_max=1.0)
CONFIG = types.SimpleNamespace(spectrogram=types.SimpleNamespace(sample_rate=SR),
                               data=types.SimpleNamespace(source='synthetic'))


def _note(midi, seed=0):
  t = np.arange(N) / SR
  f = 440.0 * 2 ** ((midi - 69) / 12)
  rng = np.random.default_rng(seed)
  w = 0.5 * np.sin(2 * np.pi * f * t) * np.exp(-3 * t) + 0.01 * rng.standard_normal(N)
  return w.astype(np.float32)


def fake_workdir(root):
  """metrics.jsonl for three stages + a 2 x 2 grid with 3 filled cells."""
  for name, n in (('tokenizer', 30), ('autoregressor', 20), (os.path.join('eval', 'pitch_classifier'), 1)):
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
             'extra_metric': 1.5}
  return report.write_report(CONFIG, root, metrics, grid), len(cells)


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
  assert p.tags.get('audio') == 2 * cells and p.tags.get('img') == 2 * cells
  assert p.tags.get('svg') == 3 and p.tags.get('polyline', 0) >= 3
  assert p.tags.get('script', 0) == 0
  assert all(s.startswith(('data:image/png;base64,', 'data:audio/wav;base64,')) for s in p.srcs)
  assert not re.search(r'(src|href)="(https?:|file:|/)', page)
  row = re.search(r'\(pis\)</span></td><td class="n">([^<]*)</td><td class="n">([^<]*)<', page)
  assert row and row.groups() == ('2.0000', '3.0000')  # generated next to its real ceiling
  assert 'extra_metric' in page  # metrics without a label are still shown
  assert 'n/a' in page  # NaN shown as undefined, not as "nan"


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
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  m = re.search(r'<pre id="probe">(.*?)</pre>', r.stdout, re.S)
  assert m, f'probe did not run (rc {r.returncode}); stderr tail:\n{r.stderr[-2000:]}'
  found = json.loads(html.unescape(m.group(1)))
  assert len(found['audio']) == 2 * cells and len(found['img']) == 2 * cells
  for a in found['audio']:
    assert a['error'] is None and a['duration'] == pytest.approx(N / SR, abs=0.01), found['audio']
  for i in found['img']:
    assert i['w'] > 0, found['img']
