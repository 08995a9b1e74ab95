"""Optimizer rules against numpy transcriptions of MAE / torch.optim.AdamW."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tinymim_jax import optim


@pytest.fixture
def x64():
  # Scoped: x64 must not leak into other tests.
  with jax.enable_x64(True):
    yield
  assert not jax.config.jax_enable_x64


def _params(depth=2, d=4, dtype=np.float64, seed=0):
  """A tiny ViT-shaped param tree (int keys for blocks)."""
  rng = np.random.default_rng(seed)
  r = lambda *s: rng.normal(size=s).astype(dtype)
  block = lambda: {
      "norm1": {"scale": r(d), "bias": r(d)},
      "attn": {"qkv": {"kernel": r(d, 3 * d), "bias": r(3 * d)},
               "proj": {"kernel": r(d, d), "bias": r(d)}},
      "mlp": {"fc1": {"kernel": r(d, 4 * d), "bias": r(4 * d)}},
  }
  return {
      "cls_token": r(1, 1, d), "pos_embed": r(1, 5, d),
      "patch_embed": {"kernel": r(2, 2, 3, d), "bias": r(d)},
      "blocks": {i: block() for i in range(depth)},
      "norm": {"scale": r(d), "bias": r(d)},
      "head": {"kernel": r(d, 7), "bias": r(7)},
  }


def _grads(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: rng.normal(size=p.shape).astype(p.dtype),
                      params)


def _named(params):
  names = jax.tree.leaves(optim.param_names(params))
  return dict(zip(names, jax.tree.leaves(params)))


def np_adamw(p, grads, lrs, *, b1, b2, eps, wd):
  """torch.optim.AdamW (amsgrad=False), transcribed step by step."""
  m, v = np.zeros_like(p), np.zeros_like(p)
  for t, (g, lr) in enumerate(zip(grads, lrs), 1):
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    denom = np.sqrt(v) / math.sqrt(bc2) + eps
    p = p - lr / bc1 * m / denom
  return p


def _run(tx, params, grads_seq):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g in grads_seq:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


# ------------------------------------------------------------------- names.


def test_param_names_and_match():
  params = _params()
  names = optim.param_names(params)
  assert names["blocks"][1]["attn"]["qkv"]["kernel"] == (
      "blocks/1/attn/qkv/kernel")
  assert names["patch_embed"]["kernel"] == "patch_embed/kernel"
  assert names["norm"]["scale"] == "norm/scale"
  assert jax.tree.structure(names) == jax.tree.structure(params)
  assert optim.match(("pos_embed", "cls_token"), "cls_token")
  assert optim.match("blocks/1/.*", "blocks/1/mlp/fc1/kernel")
  assert not optim.match("blocks/1", "blocks/1/mlp/fc1/kernel")  # fullmatch.
  assert not optim.match("pos", "pos_embed")
  assert not optim.match((), "pos_embed")


def test_layer_id():
  depth = 12
  assert optim.layer_id("cls_token", depth) == 0
  assert optim.layer_id("pos_embed", depth) == 0
  assert optim.layer_id("dist_token", depth) == 0
  assert optim.layer_id("patch_embed/kernel", depth) == 0
  assert optim.layer_id("blocks/0/norm1/scale", depth) == 1
  assert optim.layer_id("blocks/11/mlp/fc2/kernel", depth) == 12
  for name in ("fc_norm/scale", "head/kernel", "norm/bias"):
    assert optim.layer_id(name, depth) == 13


# ---------------------------------------------------------------- schedule.


def np_mae_lr(step, *, peak, warmup, total, min_lr):
  """MAE util/lr_sched.adjust_learning_rate with epoch := step."""
  if step < warmup:
    return peak * step / warmup
  return min_lr + (peak - min_lr) * 0.5 * (
      1. + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_lr_schedule_matches_mae():
  kw = dict(base_lr=1.5e-4, global_batch_size=4096, total_steps=1000,
            warmup_steps=50)
  assert optim.peak_lr(base_lr=1.5e-4, global_batch_size=4096) == pytest.approx(2.4e-3)
  for min_lr in (0.0, 1e-6):
    sched = optim.lr_schedule(**kw, min_lr=min_lr)
    for step in (0, 1, 25, 49, 50, 51, 300, 525, 999, 1000):
      want = np_mae_lr(step, peak=2.4e-3, warmup=50, total=1000,
                       min_lr=min_lr)
      np.testing.assert_allclose(sched(step), want, rtol=1e-6, atol=1e-12)
    # Jittable with a traced int32 step, and held at min_lr past the end.
    np.testing.assert_allclose(
        jax.jit(sched)(jnp.int32(1500)), min_lr, atol=1e-12)
  no_scale = optim.lr_schedule(**kw, lr_scaling_batch=None)
  np.testing.assert_allclose(no_scale(50), 1.5e-4, rtol=1e-6)
  no_warmup = optim.lr_schedule(**{**kw, "warmup_steps": 0})
  np.testing.assert_allclose(no_warmup(0), 2.4e-3, rtol=1e-6)


# ------------------------------------------------------------------- AdamW.


def test_adamw_matches_torch(x64):
  params = _params()
  grads = [_grads(params, s) for s in (1, 2, 3)]
  lrs = [1e-2, 2e-2, 5e-3]
  hp = dict(b1=0.9, b2=0.95, eps=1e-8)
  tx = optim.make_optimizer(
      params, schedule=lambda count: jnp.asarray(lrs)[count], **hp,
      weight_decay=0.05, no_decay=("pos_embed",))
  new, _ = _run(tx, params, grads)
  p0, p1, gs = _named(params), _named(new), [_named(g) for g in grads]
  for name in p0:
    decayed = p0[name].ndim > 1 and name != "pos_embed"
    want = np_adamw(p0[name], [g[name] for g in gs], lrs, **hp,
                    wd=0.05 if decayed else 0.0)
    np.testing.assert_allclose(p1[name] - p0[name], want - p0[name],
                               rtol=1e-10, atol=1e-14, err_msg=name)


def test_adamw_float32_under_jit():
  params = _params(dtype=np.float32)
  grads = _grads(params, 4)
  tx = optim.make_optimizer(params, schedule=lambda c: 1e-3)
  new, _ = _run(tx, params, [grads])
  p0, p1, g = _named(params), _named(new), _named(grads)
  for name in p0:
    want = np_adamw(p0[name].astype(np.float64), [g[name]], [1e-3],
                    b1=0.9, b2=0.95, eps=1e-8,
                    wd=0.05 if p0[name].ndim > 1 else 0.0)
    assert p1[name].dtype == np.float32
    np.testing.assert_allclose(p1[name] - p0[name], want - p0[name],
                               rtol=1e-3, atol=1e-7, err_msg=name)


# ------------------------------------------------------------------ frozen.


FROZEN = (r"blocks/1/(attn/proj|mlp)/.*", r"norm/.*")


def test_frozen_params_unchanged_and_stateless():
  params = _params(dtype=np.float32)
  grads = [_grads(params, s) for s in (5, 6)]
  tx = optim.make_optimizer(params, schedule=lambda c: 1e-2, frozen=FROZEN)
  new, state = _run(tx, params, grads)
  p0, p1 = _named(params), _named(new)
  frozen = {n for n in p0 if optim.match(FROZEN, n)}
  assert frozen == {"blocks/1/attn/proj/kernel", "blocks/1/attn/proj/bias",
                    "blocks/1/mlp/fc1/kernel", "blocks/1/mlp/fc1/bias",
                    "norm/scale", "norm/bias"}
  for n in p0:
    if n in frozen:
      np.testing.assert_array_equal(p1[n], p0[n])
      assert p1[n].tobytes() == p0[n].tobytes(), n
    else:
      assert not np.array_equal(p1[n], p0[n]), n
  # State: Adam mu and nu for the trainable params only (plus scalars).
  trainable = [p for n, p in p0.items() if n not in frozen]
  arrays = [x for x in jax.tree.leaves(state) if x.ndim > 0]
  assert len(arrays) == 2 * len(trainable)
  assert sum(x.size for x in arrays) == 2 * sum(p.size for p in trainable)
  # fc1 of block 1, frozen, has (4, 16): no state array of that shape is
  # left besides block 0's fc1 (mu, nu).
  assert sum(x.shape == (4, 16) for x in arrays) == 2


def test_frozen_with_grad_accum_and_clip_hold_no_state():
  params = _params(dtype=np.float32)
  tx = optim.make_optimizer(params, schedule=lambda c: 1e-2, frozen=FROZEN,
                            grad_accum_steps=3, grad_clip_norm=1.0)
  new, state = _run(tx, params, [_grads(params, s) for s in range(3)])
  p0, p1 = _named(params), _named(new)
  trainable = [p for n, p in p0.items() if not optim.match(FROZEN, n)]
  arrays = [x for x in jax.tree.leaves(state) if x.ndim > 0]
  # mu, nu and the gradient accumulator.
  assert sum(x.size for x in arrays) == 3 * sum(p.size for p in trainable)
  for n in p0:
    if optim.match(FROZEN, n):
      assert p1[n].tobytes() == p0[n].tobytes(), n


# ------------------------------------------------------------- layer decay.


def test_layer_decay_scales(x64):
  depth, ld, lr, wd = 2, 0.65, 1e-2, 0.05
  params = _params(depth=depth)
  grads = _grads(params, 7)
  no_decay = ("pos_embed", "cls_token")
  tx = optim.make_optimizer(params, schedule=lambda c: lr, weight_decay=wd,
                            no_decay=no_decay, layer_decay=ld, depth=depth)
  new, _ = _run(tx, params, [grads])
  p0, p1, g = _named(params), _named(new), _named(grads)
  seen = set()
  for name in p0:
    lid = optim.layer_id(name, depth)
    seen.add(lid)
    scale = ld**(depth + 1 - lid)
    decayed = p0[name].ndim > 1 and name not in no_decay
    # MAE: the group lr is lr * lr_scale, and torch AdamW scales wd by it.
    want = np_adamw(p0[name], [g[name]], [scale * lr], b1=0.9, b2=0.95,
                    eps=1e-8, wd=wd if decayed else 0.0)
    np.testing.assert_allclose(p1[name] - p0[name], want - p0[name],
                               rtol=1e-10, atol=1e-14, err_msg=name)
  assert seen == set(range(depth + 2))
  # depth is inferred from params['blocks'] when omitted.
  tx2 = optim.make_optimizer(params, schedule=lambda c: lr, weight_decay=wd,
                             no_decay=no_decay, layer_decay=ld)
  new2, _ = _run(tx2, params, [grads])
  jax.tree.map(np.testing.assert_array_equal, new2, new)
  table = optim.describe(params, no_decay=no_decay, layer_decay=ld,
                         depth=depth)
  assert f"{0.65**3:>10.4g}" in table and "layer decay 0.65" in table


# ----------------------------------------------------- clipping, MultiSteps.


def test_grad_clip_norm(x64):
  params = _params()
  # Step 1 is clipped (norm >> 1), step 2 is not: Adam sees the difference.
  grads = [jax.tree.map(lambda g: 100 * g, _grads(params, 8)),
           jax.tree.map(lambda g: 1e-3 * g, _grads(params, 9))]
  tx = optim.make_optimizer(params, schedule=lambda c: 1e-2,
                            weight_decay=0.0, grad_clip_norm=1.0)
  new, _ = _run(tx, params, grads)

  def clip(tree):
    norm = math.sqrt(sum(float((x**2).sum()) for x in jax.tree.leaves(tree)))
    return jax.tree.map(lambda x: x * min(1.0, 1.0 / norm), tree)

  gs = [_named(clip(g)) for g in grads]
  p0, p1 = _named(params), _named(new)
  for name in p0:
    want = np_adamw(p0[name], [g[name] for g in gs], [1e-2, 1e-2], b1=0.9,
                    b2=0.95, eps=1e-8, wd=0.0)
    np.testing.assert_allclose(p1[name] - p0[name], want - p0[name],
                               rtol=1e-9, atol=1e-14, err_msg=name)
  # Grads of frozen params do not enter the norm.
  tx_f = optim.make_optimizer(params, schedule=lambda c: 1e-2,
                              weight_decay=0.0, grad_clip_norm=1.0,
                              frozen=FROZEN)

  def scale_frozen(grads, factor):
    f = lambda n, x: x * (factor if optim.match(FROZEN, n) else 1.0)
    return [jax.tree.map(f, optim.param_names(g), g) for g in grads]

  new_f, _ = _run(tx_f, params, scale_frozen(grads, 1e6))
  new_z, _ = _run(tx_f, params, scale_frozen(grads, 0.0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12),
               new_f, new_z)


def test_multisteps_equals_mean_grad(x64):
  params = _params()
  k = 3
  micro = [_grads(params, 10 + i) for i in range(k)]
  mean = jax.tree.map(lambda *g: sum(g) / k, *micro)
  kw = dict(schedule=lambda c: 1e-2 * (c + 1), weight_decay=0.05,
            grad_clip_norm=0.5)
  acc = optim.make_optimizer(params, grad_accum_steps=k, **kw)
  one = optim.make_optimizer(params, **kw)
  state = acc.init(params)
  p = params
  for i, g in enumerate(micro + micro):  # Two optimizer steps.
    updates, state = jax.jit(acc.update)(g, state, p)
    p_next = optax.apply_updates(p, updates)
    if i % k != k - 1:  # No update on intermediate micro-steps.
      jax.tree.map(np.testing.assert_array_equal, p_next, p)
    p = p_next
  want, _ = _run(one, params, [mean, mean])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10),
               p, want)


# ---------------------------------------------------------------- sharding.


def test_sharded_params_under_jit():
  mesh = jax.make_mesh((8,), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = _params(d=8, dtype=np.float32)
  place = lambda t: jax.tree.map(
      lambda x: jax.device_put(x, shard if x.shape[0] % 8 == 0 else repl), t)
  params, grads = place(params), place(_grads(params, 11))
  tx = optim.make_optimizer(
      params, schedule=optim.lr_schedule(
          base_lr=1e-3, global_batch_size=256, total_steps=10,
          warmup_steps=2), frozen=FROZEN, layer_decay=0.75, depth=2,
      grad_accum_steps=2)
  state = jax.jit(tx.init)(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(4):
    new, state = step(params, state, grads)
  k = new["blocks"][0]["attn"]["qkv"]["kernel"]
  assert k.sharding.is_equivalent_to(shard, k.ndim)
  assert not np.array_equal(k, params["blocks"][0]["attn"]["qkv"]["kernel"])


def test_describe_counts():
  params = _params(dtype=np.float32)
  no_decay = ("pos_embed",)
  table = optim.describe(params, frozen=FROZEN, no_decay=no_decay)
  rows = {}
  for line in table.splitlines()[1:]:
    kind, n, size = line.rsplit(None, 2)
    rows[kind] = (int(n), int(size.replace(",", "")))
  # What the optimizer does with the same rules decides each param's group: with zero gradients only weight decay
  # moves a param (decayed); with nonzero gradients every param but a frozen one moves.
  tx = optim.make_optimizer(params, schedule=lambda c: 1e-2, weight_decay=0.5, frozen=FROZEN, no_decay=no_decay)
  moved = {}
  for fill in (0.0, 1.0):
    grads = jax.tree.map(lambda p: np.full_like(p, fill), params)
    new, _ = _run(tx, params, [grads])
    moved[fill] = {n: not np.array_equal(a, b) for (n, a), b in zip(_named(params).items(), _named(new).values())}
  want = {"decayed": [], "not decayed": [], "frozen": []}
  for n, p in _named(params).items():
    kind = "decayed" if moved[0.0][n] else "not decayed" if moved[1.0][n] else "frozen"
    want[kind].append(p.size)
  assert all(want.values())  # every group is exercised
  assert rows == {k: (len(v), sum(v)) for k, v in want.items()}
