"""Linear probe: LARS against a numpy re-derivation of MAE's LARS, BatchNorm against torch's, a probe that
learns a known linear rule, cached features vs the encoder in the loop, the cache iterator's order."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tinymim_jax import create_model, linprobe, optim
from tinymim_jax.features import FeatureSpec


def _mae_lars_numpy(params, grads_per_step, lrs, *, momentum, trust, wd):
  """mae/util/lars.py (MoCo v3) step by step in float64."""
  p = {k: np.asarray(v, np.float64).copy() for k, v in params.items()}
  mu = {k: np.zeros_like(v) for k, v in p.items()}
  for grads, lr in zip(grads_per_step, lrs):
    for k in p:
      dp = np.asarray(grads[k], np.float64)
      if p[k].ndim > 1:
        dp = dp + wd * p[k]
        pn, un = np.linalg.norm(p[k]), np.linalg.norm(dp)
        dp = dp * (trust * pn / un if pn > 0 and un > 0 else 1.0)
      mu[k] = momentum * mu[k] + dp
      p[k] = p[k] - lr * mu[k]
  return p


def test_lars_matches_mae_lars_step_by_step():
  rng = np.random.default_rng(0)
  params = {"kernel": rng.normal(size=(6, 4)).astype(np.float32), "bias": rng.normal(size=(4,)).astype(np.float32)}
  grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(3)]
  lrs = [0.5, 2.0, 0.25]  # a changing lr: where optax.lars (lr before the momentum trace) differs
  tx = linprobe.lars(lambda step: jnp.asarray(lrs)[step], momentum=0.9, trust_coefficient=0.01, weight_decay=0.1)
  state, p = tx.init(params), {k: jnp.asarray(v) for k, v in params.items()}
  for g in grads:
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
  want = _mae_lars_numpy(params, grads, lrs, momentum=0.9, trust=0.01, wd=0.1)
  for k in params:
    np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=2e-5, atol=1e-6, err_msg=k)
  # optax.lars as is accumulates lr * g in its trace: not MAE's update under a schedule.
  ref = optax.lars(lambda step: jnp.asarray(lrs)[step], weight_decay=0.1, trust_coefficient=0.01, momentum=0.9,
                   weight_decay_mask=linprobe._matrices, trust_ratio_mask=linprobe._matrices)
  state, q = ref.init(params), {k: jnp.asarray(v) for k, v in params.items()}
  for g in grads:
    updates, state = ref.update(g, state, q)
    q = optax.apply_updates(q, updates)
  assert not np.allclose(np.asarray(q["kernel"]), want["kernel"], rtol=1e-3)


def test_batchnorm_matches_torch_without_affine():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(1)
  bn = torch.nn.BatchNorm1d(5, affine=False, eps=1e-6).double()
  params, consts = linprobe.init_probe(5, 3)
  params = {"head": {"kernel": jnp.eye(5, 3), "bias": jnp.zeros(3)}}  # logits = the normalised features
  for _ in range(3):
    x = (3 + 2 * rng.normal(size=(16, 5))).astype(np.float32)
    got, consts = linprobe.apply_probe(params, consts, x, train=True)
    want = bn.train()(torch.from_numpy(x.astype(np.float64)))[:, :3].detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(consts["bn"]["mean"], bn.running_mean.numpy(), rtol=1e-5)
  np.testing.assert_allclose(consts["bn"]["var"], bn.running_var.numpy(), rtol=1e-5)
  x = rng.normal(size=(4, 5)).astype(np.float32)
  got, _ = linprobe.apply_probe(params, consts, x, train=False)
  np.testing.assert_allclose(got, bn.eval()(torch.from_numpy(x.astype(np.float64)))[:, :3].detach().numpy(),
                             rtol=1e-4, atol=1e-5)


def test_probe_learns_a_linear_rule_on_badly_scaled_features():
  rng = np.random.default_rng(2)
  d, c = 24, 6
  w = rng.normal(size=(d, c))
  scales = 10.0 ** rng.uniform(-2, 2, size=d)  # what the BatchNorm in front of the Linear is for
  x = rng.normal(size=(3000, d))
  y = (x @ w).argmax(1)
  feats = (x * scales + 5.0).astype(np.float32)
  params, consts = linprobe.fit_on_cache(feats[:2000], y[:2000], num_classes=c, batch_size=256, epochs=30,
                                         warmup_epochs=3, base_lr=6.4)
  acc = linprobe.topk_accuracy(linprobe.predict_on_cache(params, consts, feats[2000:]), y[2000:], 1)
  assert acc > 0.93, acc
  top5 = linprobe.topk_accuracy(linprobe.predict_on_cache(params, consts, feats[2000:]), y[2000:], 5)
  assert acc <= top5 <= 1.0
  # The same budget on labels with no linear rule stays near chance.
  params, consts = linprobe.fit_on_cache(feats[:2000], rng.permutation(y[:2000]), num_classes=c, batch_size=256,
                                         epochs=30, warmup_epochs=3, base_lr=6.4)
  assert linprobe.topk_accuracy(linprobe.predict_on_cache(params, consts, feats[2000:]), y[2000:], 1) < 0.4


def test_cached_features_train_the_same_probe_as_the_encoder_in_the_loop():
  vit = create_model("vit_tiny_patch16", img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, seed=3)
  spec = FeatureSpec(block=2, pool="mean", norm=True)
  images = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (48, 16, 16, 3)), np.float32)
  labels = (np.arange(48) % 4).astype(np.int32)
  schedule = optim.lr_schedule(base_lr=6.4, global_batch_size=16, total_steps=12, warmup_steps=2)
  tx = linprobe.lars(schedule)
  graphdef, state0 = linprobe.init_state(vit, tx, dim=32, num_classes=4)
  encode = jax.jit(lambda s, x: linprobe.encode(graphdef, s, x, spec))
  cache = np.asarray(encode(state0["encoder"], images))
  step = jax.jit(linprobe.make_step(graphdef, tx, schedule, spec))
  results = []
  for arrays in ({"feature": cache, "label": labels}, {"image": images, "label": labels}):
    it = linprobe.CacheIterator(arrays, global_batch_size=16, seed=0, process_index=0, process_count=1)
    state = state0
    for _ in range(8):  # nearly three epochs: the order of every epoch matters
      state, metrics = step(state, next(it), None)
    results.append(jax.device_get((state["params"], state["consts"], metrics["loss"])))
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), results[0][0], state0["params"]))
  assert min(moved) > 1e-4  # the probe trained


def test_cache_iterator_resumes_and_splits_over_processes():
  arrays = {"feature": np.arange(50)[:, None].astype(np.float32), "label": np.arange(50)}
  full = linprobe.CacheIterator(arrays, global_batch_size=8, seed=1, process_index=0, process_count=1)
  seq = [next(full)["label"] for _ in range(14)]  # 6 steps per epoch: crosses two epoch boundaries
  assert full.steps_per_epoch == 6 and len(set(np.concatenate(seq[:6]))) == 48
  assert not np.array_equal(seq[0], seq[6])  # a new permutation each epoch
  resumed = linprobe.CacheIterator(arrays, global_batch_size=8, seed=1, start_step=9, process_index=0,
                                   process_count=1)
  np.testing.assert_array_equal(next(resumed)["label"], seq[9])
  parts = [next(linprobe.CacheIterator(arrays, global_batch_size=8, seed=1, process_index=i, process_count=2))["label"]
           for i in range(2)]
  np.testing.assert_array_equal(np.concatenate(parts), seq[0])
  with pytest.raises(ValueError, match="larger than the 50 cached"):
    linprobe.CacheIterator(arrays, global_batch_size=64, seed=0, process_index=0, process_count=1)
