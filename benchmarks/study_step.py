"""Where a Fashion-MNIST study step's time goes on CPU: the input pipeline, the jitted step, and the loop of both.

  python benchmarks/study_step.py [--stages ft,pretrain,teacher] [--devices 2] [--steps 20] [--guarded]

Each stage of configs/fmnist_study.py (ft: the full-label fine-tune of the random-init arm; pretrain: arm 1's
distillation step with the teacher's forward; teacher: the teacher's MAE step) is built as the trainer builds it
(objectives.get(...).setup, train_steps.jit_step over `--devices` XLA CPU devices) and timed three ways after a
warm-up: `input` = next() of the tf.data iterator alone, `step` = the jitted step on one fixed batch, `loop` =
both, as the trainer runs them (tf.data's threads and XLA's share the cores). --guarded runs the input through
the per-example load guard that splits held in memory skip since 2026-12-03 (data/pipeline._try_map): the path
before. The pretrain stage reads the study workdir's teacher (--root) to build the distillation step.
Prints one line per stage; nothing is appended (BENCHMARKS.md, "Study runs", quotes the figures).
"""

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def measure(stage, devices, steps, root):
  import jax  # pylint: disable=g-import-not-at-top
  from tinymim_jax import config_base, data, objectives  # pylint: disable=g-import-not-at-top
  from tinymim_jax import sharding as sh, train_steps as ts  # pylint: disable=g-import-not-at-top
  from tinymim_jax.study import load_config_module  # pylint: disable=g-import-not-at-top
  module = load_config_module(os.path.join(REPO, "configs", "fmnist_study.py"))
  arm = "control" if stage == "ft" else "tinymim"
  c = config_base.finalize(module.get_config(f"stage={stage},arm={arm},seed=0,root={root}"))
  obj = objectives.get(c.objective)
  mesh = sh.make_mesh(fsdp=c.mesh.fsdp)
  run = obj.setup(c, obj.dataset_info(c), total_steps=1000, warmup_steps=10, is_main=True)
  shardings = sh.tree_sharding(run.state, mesh)
  state = jax.device_put(run.state, shardings)
  step = ts.jit_step(run.step, shardings, mesh)
  it = data.make_train_iterator(c.data, mode=obj.data_mode, global_batch_size=c.batch_size, seed=0)
  spec = jax.sharding.PartitionSpec(sh.BATCH_AXES)
  rng = jax.random.PRNGKey(0)
  batch = data.to_global(next(it), mesh, spec)
  state, m = step(state, batch, rng)
  jax.block_until_ready(m)

  for _ in range(c.data.prefetch + 1):  # the batches tf.data prefetched during the warm-up come free
    next(it)
  t = time.perf_counter()
  for _ in range(steps):
    next(it)
  t_input = (time.perf_counter() - t) / steps
  t = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, batch, rng)
  jax.block_until_ready(m)
  t_step = (time.perf_counter() - t) / steps
  t = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, data.to_global(next(it), mesh, spec), rng)
  jax.block_until_ready(m)
  t_loop = (time.perf_counter() - t) / steps
  return (f"{stage}: {devices} devices, batch {c.batch_size}: input {1e3 * t_input:.0f} ms, step "
          f"{1e3 * t_step:.0f} ms, loop {1e3 * t_loop:.0f} ms/step = {c.batch_size / t_loop:.0f} img/s")


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--stages", default="ft,pretrain,teacher")
  p.add_argument("--devices", type=int, default=2)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--guarded", action="store_true")
  p.add_argument("--root", default="workdirs/fmnist", help="the study workdir whose teacher the distill step reads")
  a = p.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_num_cpu_devices", a.devices)
  if a.guarded:
    from tinymim_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    guarded = pipeline._try_map  # pylint: disable=protected-access
    pipeline._try_map = lambda ds, fn, fallback, n, can_fail=True: guarded(ds, fn, fallback, n)
  for stage in a.stages.split(","):
    print(("guarded input, " if a.guarded else "") + measure(stage, a.devices, a.steps, a.root), flush=True)


if __name__ == "__main__":
  main()
