"""Checkpoint writes on one process: no per-device slicing of replicated arrays."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mars_jax.train import checkpoint as ckpt


def test_one_process_saves_replicated_arrays_without_compiling(tmp_path):
  """Orbax's replica-parallel default slices each replicated array once per device, an eager
  jax op (and a compile per new shape) each; one process writes them whole from one copy."""
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  rep = NamedSharding(mesh, P())
  state = {f'w{i}': jax.device_put(jnp.full((8 + i, 16), float(i)), rep) for i in range(12)}
  jax.block_until_ready(state)
  compiles, listening = [], [True]

  def on_event(name, secs, **kwargs):
    if listening[0] and 'backend_compile' in name:
      compiles.append(name)

  jax.monitoring.register_event_duration_secs_listener(on_event)
  mngr = ckpt.manager(str(tmp_path / 'checkpoints'))
  try:
    ckpt.save(mngr, 1, state)
    mngr.wait_until_finished()
  finally:
    listening[0] = False
  assert compiles == [], f'{len(compiles)} compiles during one save'
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)
  back = ckpt.restore(mngr, 1, target)
  for k in state:
    np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(state[k]), err_msg=k)
    assert back[k].sharding == rep
