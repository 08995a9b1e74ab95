"""Train steps: what moves and what must not, sharded == single device, learning, truncation, NaN guard."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import exact, tiny
from tests.helpers.steps import run
from tinymim_jax import create_model, optim, sharding as sh, train_steps as ts
from tinymim_jax.features import FeatureSpec
from tinymim_jax.objectives import distill, finetune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flat(tree):
  return {optim.path_name(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def distill_batch():
  x = tiny.images(16)
  return {"teacher": x, "student": x * 0.9 + 0.05}


def test_one_distill_step_moves_only_what_the_loss_sees(distill_batch):
  step_fn, state0, _ = tiny.distill_setup(warmup=0)  # lr > 0 at the first step
  before = flat(jax.device_get(state0))
  mesh = sh.make_mesh(devices=jax.devices()[:1])
  state1, (m,) = run(step_fn, state0, distill_batch, 1, mesh)
  after = flat(state1)
  assert m["nonfinite"] == 0 and m["loss"] > 0
  # The teacher is bit-identical.
  teacher = [k for k in before if k.startswith("teachers/teacher/")]
  assert teacher and all(np.array_equal(before[k], after[k]) for k in teacher)
  # Student: relation block 3 (index 2) only contributes norm1 + qkv; the final norm is unused.
  frozen = [k for k in before if k.startswith("params/") and (
      k.startswith("params/norm/") or any(k.startswith(f"params/blocks/2/{m}/") for m in ("attn/proj", "norm2", "mlp")))]
  assert len(frozen) == 2 + 2 + 2 + 4
  for k in frozen:
    assert np.array_equal(before[k], after[k]), k
  moved = ["params/blocks/2/attn/qkv/kernel", "params/blocks/2/norm1/scale", "params/blocks/0/mlp/fc1/kernel",
           "params/cls_token", "params/patch_embed/kernel"]
  for k in moved:
    assert not np.array_equal(before[k], after[k]), k
  # The fixed sin-cos table is not a param at all, and frozen params hold no Adam moments.
  assert "consts/pos_embed" in before and np.array_equal(before["consts/pos_embed"], after["consts/pos_embed"])
  opt_names = [k for k in after if k.startswith("opt/")]
  assert not any("blocks/2/mlp" in k or "blocks/2/attn/proj" in k for k in opt_names)
  assert any("blocks/2/attn/qkv/kernel" in k for k in opt_names)


@pytest.mark.parametrize("fsdp", [1, 2])
def test_sharded_step_equals_single_device(distill_batch, fsdp):
  step_fn, state0, _ = tiny.distill_setup()
  ref_state, ref_m = run(step_fn, state0, distill_batch, 3, sh.make_mesh(devices=jax.devices()[:1]))
  step_fn, state0, _ = tiny.distill_setup()
  mesh = sh.make_mesh(fsdp=fsdp)
  assert mesh.devices.size == 8
  state, m = run(step_fn, state0, distill_batch, 3, mesh)
  np.testing.assert_allclose([x["loss"] for x in m], [x["loss"] for x in ref_m], rtol=1e-5)
  assert_params_close(ref_state["params"], state["params"])


def assert_params_close(ref, got):
  a, b = flat(ref), flat(got)
  for k in a:
    x, y = a[k], b[k]
    if k.endswith("attn/qkv/bias"):
      # The key bias gets an exactly-zero true gradient (softmax is shift invariant per query row), so its
      # float32 gradient is rounding noise that Adam normalises to lr-sized steps: compare it loosely.
      d = x.shape[0] // 3
      np.testing.assert_allclose(y[d:2 * d], x[d:2 * d], atol=1e-4, err_msg=k)
      x, y = np.concatenate([x[:d], x[2 * d:]]), np.concatenate([y[:d], y[2 * d:]])
    np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6, err_msg=k)


def test_fsdp_shards_big_params():
  mesh = sh.make_mesh(fsdp=4)
  params = {"blocks": {0: {"mlp": {"fc1": {"kernel": jnp.zeros((64, 256)), "bias": jnp.zeros((256,))}}}},
            "pos_embed": jnp.zeros((1, 65, 64))}
  s = sh.tree_sharding(params, mesh)
  assert s["blocks"][0]["mlp"]["fc1"]["kernel"].spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert s["blocks"][0]["mlp"]["fc1"]["bias"].spec == jax.sharding.PartitionSpec()
  assert s["pos_embed"].spec == jax.sharding.PartitionSpec()
  # Adam moments of a param are sharded like the param (names end with the param's name).
  opt = {"0": {"mu": params, "nu": params}}
  assert sh.tree_sharding(opt, mesh)["0"]["mu"]["blocks"][0]["mlp"]["fc1"]["kernel"].spec[1] == "fsdp"


def test_distillation_learns_on_a_fixed_batch(distill_batch):
  step_fn, state0, _ = tiny.distill_setup(lr=2e-3)
  _, m = run(step_fn, state0, distill_batch, 40, sh.make_mesh(fsdp=2))
  assert m[-1]["loss"] < 0.5 * m[0]["loss"], [x["loss"] for x in m[::8]]


@pytest.mark.parametrize("target", ["feature", "cls"])
def test_other_targets_learn(distill_batch, target):
  step_fn, state0, _ = tiny.distill_setup(target=target, lr=2e-3)
  assert "distill_proj" in state0["params"]  # student width 48 -> teacher width 64
  _, m = run(step_fn, state0, distill_batch, 25, sh.make_mesh(devices=jax.devices()[:1]))
  assert m[-1]["loss"] < 0.7 * m[0]["loss"], [x["loss"] for x in m[::5]]


def test_masked_student_input(distill_batch):
  step_fn, state0, _ = tiny.distill_setup(mask_ratio=0.5)
  _, m = run(step_fn, state0, distill_batch, 2, sh.make_mesh(devices=jax.devices()[:1]))
  assert np.isfinite(m[-1]["loss"]) and m[-1]["loss"] > 0
  # The student sees 8 of 16 patches: its forward + backward shrinks, the teacher's forward does not.
  assert _flops(mask_ratio=0.5) < 0.8 * _flops(mask_ratio=0.0)


def test_mae_pretraining_learns():
  model = create_model("mae_vit_tiny_patch16", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                       decoder=dict(embed_dim=32, depth=1, num_heads=4))
  schedule = optim.lr_schedule(base_lr=2e-3, global_batch_size=256, total_steps=200, warmup_steps=2)
  _, params, _ = ts.split_model(model)
  tx = optim.make_optimizer(params, schedule=schedule)
  graphdef, _, state = ts.init_state(model, tx)
  # Smooth images (a random plane wave per image): masked patches are predictable from visible ones.
  r = np.random.RandomState(0)
  u = np.linspace(-1, 1, 32)[None, :, None, None]
  v = np.linspace(-1, 1, 32)[None, None, :, None]
  a, b, c = (r.uniform(-2, 2, (8, 1, 1, 3)) for _ in range(3))
  x = np.sin(a * u + b * v + c).astype(np.float32)
  _, m = run(ts.make_mae_step(graphdef, tx, schedule, norm_pix=False), state, {"image": x}, 40,
             sh.make_mesh(fsdp=2))
  assert m[-1]["loss"] < 0.6 * m[0]["loss"], [x["loss"] for x in m[::8]]


def test_finetune_overfits_a_small_batch():
  model = create_model("vit_tiny_patch16", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2,
                       pooling="avg", num_classes=4, pos_embed="learn")
  schedule = optim.lr_schedule(base_lr=5e-3, global_batch_size=256, total_steps=100, warmup_steps=2)
  _, params, _ = ts.split_model(model)
  tx = optim.make_optimizer(params, schedule=schedule, b2=0.999, layer_decay=0.75, depth=2,
                            no_decay=("pos_embed", "cls_token"))
  graphdef, _, state = ts.init_state(model, tx)
  batch = {"image": tiny.images(8, seed=3), "label": np.arange(8, dtype=np.int32) % 4}
  step = finetune.make_finetune_step(graphdef, None, tx, schedule,
                                    finetune.FinetuneSpec(num_classes=4, mixup=0.0, cutmix=0.0, label_smoothing=0.0))
  state, m = run(step, state, batch, 40, sh.make_mesh(devices=jax.devices()[:1]))
  assert m[-1]["train_top1"] == 1.0 and m[-1]["loss"] < 0.1
  preds = ts.make_predict_fn(graphdef, FeatureSpec(block=2))(state, batch["image"])
  assert (np.argmax(preds["logits"], -1) == batch["label"]).all() and preds["feature"].shape == (8, 48)


def test_nonfinite_step_leaves_state_unchanged(distill_batch):
  step_fn, state0, _ = tiny.distill_setup()
  bad = {k: v.copy() for k, v in distill_batch.items()}
  bad["student"][0, 0, 0, 0] = np.nan
  before = flat(jax.device_get(state0))
  state, (m,) = run(step_fn, state0, bad, 1, sh.make_mesh(devices=jax.devices()[:1]))
  assert m["nonfinite"] == 1
  after = flat(state)
  assert all(np.array_equal(before[k], after[k], equal_nan=True) for k in before)


# Float64 gradient checks: each step's gradient (read out of the step through an optimizer that records it)
# against central differences of the step's own loss along a random direction, at dtype = param_dtype =
# float64. The relation target is checked against the authors' float64 gradients in tests/test_reference_float64.py.
F64 = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, dtype="float64", param_dtype="float64")


def _float64_step(objective):
  rec = exact.grad_recorder()
  schedule = optim.lr_schedule(base_lr=1e-3, global_batch_size=256, total_steps=100, warmup_steps=0)
  x = np.random.RandomState(0).randn(4, 32, 32, 3)
  if objective == "mae":  # norm_pix_loss, 75% masked
    model = create_model("mae_vit_tiny_patch16", decoder=dict(embed_dim=32, depth=1, num_heads=2), **F64)
    graphdef, _, state = ts.init_state(model, rec)
    return ts.make_mae_step(graphdef, rec, schedule), state, {"image": x}
  if objective == "finetune":  # drop path, mixup / cutmix, label smoothing, learnable positions
    model = create_model("vit_tiny_patch16", num_classes=5, pooling="avg", pos_embed="learn", drop_path=0.1, **F64)
    # A head of the size training gives it (its init, std 2e-5, makes the loss blind to everything before it).
    model.head.kernel[...] = 0.3 * jax.random.normal(jax.random.PRNGKey(1), model.head.kernel.shape, jnp.float64)
    graphdef, _, state = ts.init_state(model, rec)
    return (finetune.make_finetune_step(graphdef, None, rec, schedule, finetune.FinetuneSpec(num_classes=5)), state,
            {"image": x, "label": np.arange(4, dtype=np.int32) % 5})
  # Feature distillation through the width projection (student D 32 -> teacher D 48).
  student = create_model("vit_tiny_patch16", drop_path=0.1, drop_path_mode="constant", **F64)
  teacher = create_model("vit_tiny_patch16", seed=1, **{**F64, "embed_dim": 48, "num_heads": 4})
  extras = distill.TARGETS["feature"].extra_layers(student.config, teacher.config, nnx.Rngs(0))
  graphdef, tgraph, state = ts.init_state(student, rec, teachers={"teacher": teacher}, extras=extras)
  step = distill.make_distill_step(graphdef, tgraph, rec, schedule, distill.DistillSpec(target="feature", teacher_block=2,
                                                                                student_block=2),
                              {"teacher": distill.TeacherSpec(block=2)})
  return step, state, {"teacher": x, "student": x * 0.9}


@pytest.mark.parametrize("objective", ["mae", "finetune", "feature"])
def test_float64_gradient_check(objective):
  rng = jax.random.PRNGKey(0)
  with jax.enable_x64(True):
    step_fn, state, batch = _float64_step(objective)
    run = exact.step_runner(step_fn, state)
    new, m = run(state, batch, rng)
    assert m["loss"].dtype == np.float64
    assert {x.dtype for x in jax.tree.leaves((new["params"], new["opt"]))} == {np.dtype("float64")}
    gd, fd = exact.directional_check(run, state, batch, rng, eps=1e-4)
  assert not jax.config.jax_enable_x64
  # Measured: ~1e-10 (truncation and rounding of the difference quotient). A float32 cast on the path shows up
  # as ~1e-4 to 1e-3 (e.g. the blocks' softmax in float32: 7e-4 for MAE).
  assert abs(fd - gd) <= 1e-6 * abs(gd), (objective, gd, fd)


def _flops(**config_kw):
  step_fn, state, _ = tiny.distill_setup(**config_kw)
  batch = {"teacher": jax.ShapeDtypeStruct((16, 32, 32, 3), jnp.float32)}
  batch["student"] = batch["teacher"]
  shapes = jax.eval_shape(lambda s: s, state)
  compiled = jax.jit(step_fn).lower(shapes, batch, jax.ShapeDtypeStruct((2,), jnp.uint32)).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return cost["flops"]


def test_compiled_step_has_no_teacher_work_past_its_target_block():
  # A 4-block teacher distilled at block 3 costs what a teacher that only has 3 blocks costs, and less
  # than distilling at its last block.
  truncated = _flops(teacher_depth=4, teacher_block=3)
  only3, at4 = _flops(teacher_depth=3, teacher_block=3), _flops(teacher_depth=4, teacher_block=4)
  assert truncated == pytest.approx(only3, rel=1e-3)
  assert at4 > truncated * 1.02


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _worker(env_extra, devices, fsdp="1"):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") or k == "JAX_PLATFORMS"}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT, **env_extra)
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "tests/helpers/distributed_worker.py"), str(fsdp)],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _results(proc):
  """{fsdp: the worker's result line for that mesh}."""
  out, err = proc.communicate(timeout=240)
  assert proc.returncode == 0, err[-3000:]
  lines = [json.loads(l[len("RESULT "):]) for l in out.splitlines() if l.startswith("RESULT ")]
  return {r["fsdp"]: r for r in lines}


def test_two_processes_equal_one():
  """Each process runs the step on both meshes (fsdp 1 and 2) in turn: one process start per side."""
  port = _free_port()
  procs = [_worker({"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                    "JAX_PROCESS_ID": str(i)}, devices=2, fsdp="1,2") for i in range(2)]
  ref = _results(_worker({}, devices=4, fsdp="1,2"))
  results = [_results(p) for p in procs]
  assert sorted(ref) == [1, 2] and all(sorted(r) == [1, 2] for r in results)
  for fsdp in (1, 2):
    assert [r[fsdp]["count"] for r in results] == [2, 2] and ref[fsdp]["count"] == 1
    for r in results:
      np.testing.assert_allclose(r[fsdp]["losses"], ref[fsdp]["losses"], rtol=1e-5, err_msg=f"fsdp={fsdp}")
      np.testing.assert_allclose(r[fsdp]["qkv_head"], ref[fsdp]["qkv_head"], rtol=1e-5, atol=1e-7,
                                 err_msg=f"fsdp={fsdp}")
      np.testing.assert_allclose(r[fsdp]["qkv_sum"], ref[fsdp]["qkv_sum"], rtol=1e-5, err_msg=f"fsdp={fsdp}")
