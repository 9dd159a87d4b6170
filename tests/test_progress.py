"""mars_jax.progress: plain lines every N items off a terminal, a live line on one, process 0
only."""
import io

from mars_jax import progress


class Clock:
  def __init__(self):
    self.t = 0.0

  def __call__(self):
    return self.t


class Tty(io.StringIO):
  def isatty(self):
    return True


def test_plain_output_is_one_line_every_n_and_at_the_end():
  out, clock = io.StringIO(), Clock()
  bar = progress.Progress('tokenizer', 25, 'steps', every=10, stream=out, process_index=0,
                          clock=clock)
  for i in range(1, 26):
    clock.t = i * 0.5
    bar.update(i, loss=1.0 / i)
  bar.update(25)                                  # the same count again: no second line
  bar.close()
  lines = out.getvalue().splitlines()
  assert [ln.split()[1] for ln in lines] == ['10/25', '20/25', '25/25']
  assert lines[0].startswith('[tokenizer] 10/25 steps (40%) loss 0.1 2 steps/s eta 0:07')
  assert lines[-1].endswith('eta 0:00')


def test_a_resumed_loop_counts_its_rate_from_where_it_started():
  out, clock = io.StringIO(), Clock()
  bar = progress.Progress('x', 100, 'steps', every=50, start=40, stream=out, process_index=0,
                          clock=clock)
  clock.t = 10.0
  bar.update(50)
  assert '50/100' in out.getvalue() and ' 1 steps/s eta 0:50' in out.getvalue()


def test_only_process_0_prints():
  out = io.StringIO()
  bar = progress.Progress('sample', 4, 'notes', every=1, stream=out, process_index=1)
  for i in range(1, 5):
    bar.update(i)
  bar.close()
  progress.say('hello', process_index=1, stream=out)
  assert out.getvalue() == ''
  progress.say('hello', process_index=0, stream=out)
  assert out.getvalue() == 'hello\n'


def test_a_terminal_gets_one_live_line_redrawn_in_place():
  out, clock = Tty(), Clock()
  bar = progress.Progress('prepare', 100, 'shards', every=1, stream=out, process_index=0,
                          clock=clock, redraw_s=1.0)
  for i in range(1, 101):
    clock.t = i * 0.1                             # redrawn at most once a second
    bar.update(i)
  text = out.getvalue()
  assert text.count('\n') == 1 and text.endswith('\n')
  assert 10 <= text.count('\r') <= 12
  assert text.rstrip('\n').rsplit('\r\033[K', 1)[1].startswith('[prepare] 100/100 shards (100%)')


def test_fmt_time():
  assert progress.fmt_time(59) == '0:59' and progress.fmt_time(3725) == '1:02:05'
  assert progress.fmt_time(float('inf')) == '?'
