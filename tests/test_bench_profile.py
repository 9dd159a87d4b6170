"""bench/profile.py: op_name parsing, categories, and a real trace mapped back to its HLO."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mars_jax.bench import profile


@pytest.mark.parametrize('op_name, op, category', [
    ('jit(step)/jvp(Tokenizer.encode_tokens)/Tokenizer.encode/encoder/conv_in/Conv_0/'
     'conv_general_dilated', 'ynn_fusion.1', 'frozen tokenizer (teacher inputs)'),
    ('jit(step)/transpose(jvp(VAR))/while/body/closed_call/blocks/attn/bhqd,bhkd->bhqk/'
     'dot_general', 'dot_general.41', 'attention QK^T / AV'),
    ('jit(step)/jvp(VAR)/while/body/closed_call/blocks/attn/reduce_max', 'ynn_fusion.7',
     'attention softmax & mask'),
    ('jit(step)/jvp(VAR)/while/body/closed_call/blocks/fc1/dot_general', 'ynn_fusion.1',
     'matmuls (projections, MLP, head)'),
    ('jit(step)/jvp(Tokenizer)/decoder/up_0/Conv_0/conv_general_dilated', 'ynn_fusion.9',
     'convolutions'),
    ('jit(step)/jvp(jit(log_softmax))/exp', 'subtract_exponential_fusion', 'loss'),
    ('jit(step)/jvp(VAR)/while/body/jit(dynamic_update_index_in_dim)/dynamic_update_slice',
     'bitcast_dynamic-update-slice_fusion.2', 'layer scan: slices, stacking, copies'),
    ('', 'wrapped_broadcast.13', 'layer scan: slices, stacking, copies'),
    ('jit(step)/transpose(jvp(VAR))/while/body/closed_call/blocks/mul', 'copy_bitcast_fusion.5',
     'norms, AdaLN, GELU, residuals (elementwise)'),
    ('jit(step)/jit(_where)/select_n', 'add_select_fusion.67', 'optimizer, clipping, NaN guard'),
    ('(convolution)', 'ynn_fusion.117', 'convolutions'),
    ('(dot)', 'dot.3', 'matmuls (projections, MLP, head)'),
    ('jit(f)/sin', 'sine', 'other'),
])
def test_categories(op_name, op, category):
  assert profile.categorise(op_name, op) == category


def test_op_names_reads_instruction_names_and_their_op_name():
  """Each instruction's op_name; a fusion holding a dot is named by the dot, not its root."""
  hlo = '\n'.join([
      'HloModule jit_step, entry_computation_layout={()->f32[]}',
      '%fused_computation.7 (param_0: f32[4,4], param_1: f32[4,4]) -> f32[4] {',
      '  %dot.1 = f32[4,4]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, '
      'rhs_contracting_dims={0}, metadata={op_name="jit(step)/blocks/attn/bhqd,bhkd->bhqk/'
      'dot_general"}',
      '  ROOT %reduce.2 = f32[4]{0} reduce(%dot.1, %c), dimensions={1}, '
      'metadata={op_name="jit(step)/blocks/attn/reduce_max"}',
      '}',
      '',
      'ENTRY %main.9 (a: f32[4,4]) -> f32[4] {',
      '  %ynn_fusion.43 = f32[2720,128]{1,0} fusion(%a, %b), kind=kCustom, '
      'metadata={op_name="jit(step)/blocks/fc1/dot_general" stack_frame_id=796}',
      '  %ynn_fusion.7 = f32[4]{0} fusion(%a, %a), kind=kCustom, calls=%fused_computation.7, '
      'metadata={op_name="jit(step)/blocks/attn/reduce_max"}',
      '  ROOT %copy.5 = f32[4]{0} copy(%x)',
      '  wrapped_broadcast.13 = f32[3]{0} fusion(%c), kind=kLoop',
      '  %convolution.86 = f32[64,3,3,64]{3,2,1,0} convolution(%p, %q), window={size=16x16}',
      '}'])
  names = profile.op_names(hlo)
  assert names['ynn_fusion.43'] == 'jit(step)/blocks/fc1/dot_general'
  assert names['ynn_fusion.7'] == 'jit(step)/blocks/attn/bhqd,bhkd->bhqk/dot_general'
  assert names['copy.5'] == '' and names['wrapped_broadcast.13'] == ''
  assert names['convolution.86'] == '(convolution)'      # no metadata: named by its kind
  assert profile.categorise(names['ynn_fusion.7'], 'ynn_fusion.7') == 'attention QK^T / AV'


def test_a_traced_program_maps_back_to_its_ops(tmp_path):
  """Trace a small jitted matmul + softmax: its ops come back with the model's op_names, every
  duration positive, the matmul among them, and the summary's shares adding up to one."""
  f = jax.jit(lambda a, b: jax.nn.softmax(a @ b, axis=-1))
  a = jnp.asarray(np.random.default_rng(0).normal(size=(256, 256)), jnp.float32)
  compiled = f.lower(a, a).compile()
  jax.block_until_ready(f(a, a))
  calls = 2
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    for _ in range(calls):
      jax.block_until_ready(f(a, a))
  module = profile.module_name(compiled.as_text())
  rows = profile.trace_ops(str(tmp_path), {module: profile.op_names(compiled.as_text())}, calls)
  assert rows and all(r['module'] == module and r['ms'] > 0 for r in rows)
  assert any(r['op_name'].endswith('dot_general') and
             r['category'] == 'matmuls (projections, MLP, head)' for r in rows), rows
  s = profile.summarise(rows)
  assert s['op_ms'] == pytest.approx(sum(r['ms'] for r in rows))
  assert sum(v['share'] for v in s['categories'].values()) == pytest.approx(1.0)
  assert s['backward_share'] == 0.0
