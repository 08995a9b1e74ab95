"""DeiT-style distillation fine-tuning: the losses against numpy re-derivations of DeiT's losses.py, the weight EMA
against timm ModelEmaV2's recurrence, the step (both heads, the teacher on the mixed batch) and its float64
gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.helpers import exact
from tinymim_jax import create_model, losses, optim
from tinymim_jax.objectives import finetune as fd
from tinymim_jax import train_steps as ts
from tinymim_jax.data import mixup_cutmix


# --------------------------------------------------------------------------------------------------------
# Losses: numpy, float64, written from DeiT losses.py DistillationLoss.forward.
# --------------------------------------------------------------------------------------------------------
def np_log_softmax(x):
  x = x - x.max(axis=1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def np_deit_loss(cls, dist, targets, teacher, kind, alpha, tau):
  base = np.mean(-np.sum(targets * np_log_softmax(cls), axis=1))  # SoftTargetCrossEntropy
  if kind == "none":
    return base
  if kind == "soft":
    lt, ls = np_log_softmax(teacher / tau), np_log_softmax(dist / tau)
    term = np.sum(np.exp(lt) * (lt - ls)) * tau * tau / dist.size  # kl_div(sum, log_target) * T^2 / numel
  else:
    term = -np.mean(np_log_softmax(dist)[np.arange(len(dist)), teacher.argmax(axis=1)])
  return base * (1 - alpha) + term * alpha


@pytest.mark.parametrize("kind,alpha,tau", [("none", 0.5, 1.0), ("hard", 0.5, 1.0), ("hard", 0.3, 1.0),
                                            ("soft", 0.5, 1.0), ("soft", 0.7, 3.0)])
def test_distillation_loss_matches_numpy(kind, alpha, tau):
  r = np.random.RandomState(0)
  cls, dist, teacher = (3 * r.randn(6, 10) for _ in range(3))
  targets = r.dirichlet(np.ones(10), size=6)
  ref = np_deit_loss(cls, dist, targets, teacher, kind, alpha, tau)
  with jax.enable_x64(True):
    got, terms = losses.distillation_loss(jnp.asarray(cls), jnp.asarray(dist), jnp.asarray(targets),
                                          jnp.asarray(teacher), kind=kind, alpha=alpha, tau=tau)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(float(got), ref, rtol=1e-12)
  if kind != "none":  # the distillation term is not a constant (it moves with the dist head)
    moved = losses.distillation_loss(cls, dist + r.randn(6, 10), targets, teacher, kind=kind, alpha=alpha, tau=tau)
    assert abs(float(moved[1]["loss_dist"]) - float(terms["loss_dist"])) > 1e-3
  got32, _ = losses.distillation_loss(cls.astype(np.float32), dist.astype(np.float32), targets, teacher,
                                      kind=kind, alpha=alpha, tau=tau)
  np.testing.assert_allclose(float(got32), ref, rtol=1e-5)


def test_distillation_loss_errors():
  with pytest.raises(ValueError, match="distillation type must be one of"):
    losses.distillation_loss(jnp.zeros((2, 3)), None, jnp.ones((2, 3)) / 3, None, kind="kl")
  with pytest.raises(ValueError, match="distillation type must be one of"):
    fd.FinetuneSpec(num_classes=3, distillation_type="Hard")
  with pytest.raises(ValueError, match="EMA decay must be in"):
    fd.FinetuneSpec(num_classes=3, ema_decay=1.0)


# --------------------------------------------------------------------------------------------------------
# EMA.
# --------------------------------------------------------------------------------------------------------
def test_ema_update_matches_timm_recurrence():
  r = np.random.RandomState(1)
  params = [{"w": r.randn(3, 4), "b": r.randn(4)} for _ in range(5)]
  decay = 0.9
  with jax.enable_x64(True):
    ema = jax.tree.map(jnp.asarray, params[0])
    ref = {k: v.copy() for k, v in params[0].items()}
    for p in params[1:]:
      ema = optim.ema_update(ema, jax.tree.map(jnp.asarray, p), decay)
      ref = {k: decay * ref[k] + (1 - decay) * p[k] for k in ref}  # ModelEmaV2._update
    for k in ref:
      np.testing.assert_allclose(np.asarray(ema[k]), ref[k], rtol=1e-14)


# --------------------------------------------------------------------------------------------------------
# The step.
# --------------------------------------------------------------------------------------------------------
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
C = 5


def setup(kind="hard", *, dtype="float32", ema_decay=None, tx=None, mixup=0.8, student_kw=None):
  kw = dict(TINY, dtype=dtype, param_dtype=dtype)
  student = create_model("vit_tiny_patch16", num_classes=C, pos_embed="learn",
                         **{**kw, "dist_token": True, "drop_path": 0.1, **(student_kw or {})})
  # Heads at the size training gives them (their init, std 2e-5, would make the loss blind to the rest).
  for head in (h for h in (student.head, student.head_dist) if h is not None):
    head.kernel[...] = 0.3 * jax.random.normal(jax.random.PRNGKey(id(head) % 97), head.kernel.shape, head.kernel.dtype)
  teacher = create_model("vit_tiny_patch16", num_classes=C, pooling="avg", seed=1, **{**kw, "embed_dim": 48})
  kernel = teacher.head.kernel
  kernel[...] = jax.random.normal(jax.random.PRNGKey(5), kernel.shape, kernel.dtype)
  schedule = optim.lr_schedule(base_lr=1e-3, global_batch_size=256, total_steps=100, warmup_steps=0)
  tx = tx or exact.grad_recorder()
  graphdef, tgraphs, state = ts.init_state(student, tx, teachers={"teacher": teacher})
  if ema_decay is not None:
    state = fd.init_ema(state)
  spec = fd.FinetuneSpec(num_classes=C, distillation_type=kind, alpha=0.5, tau=2.0, ema_decay=ema_decay,
                                mixup=mixup, cutmix=1.0 if mixup else 0.0)
  step = fd.make_finetune_step(graphdef, tgraphs["teacher"], tx, schedule, spec)
  x = np.random.RandomState(0).randn(4, 32, 32, 3).astype(dtype)
  return step, state, {"image": x, "label": np.arange(4, dtype=np.int32) % C}, (graphdef, tgraphs)


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_float64_gradient_check(kind):
  rng = jax.random.PRNGKey(0)
  with jax.enable_x64(True):
    step_fn, state, batch, _ = setup(kind, dtype="float64")
    run = exact.step_runner(step_fn, state)
    new, m = run(state, batch, rng)
    assert m["loss"].dtype == np.float64 and float(m["loss_dist"]) > 0
    assert {x.dtype for x in jax.tree.leaves(new["opt"])} == {np.dtype("float64")}
    gd, fd_ = exact.directional_check(run, state, batch, rng, eps=1e-4)
    # Both heads get gradient: the class head from the label term, the distillation head from the teacher's.
    grads = new["opt"]
    assert float(np.abs(grads["head"]["kernel"]).max()) > 0 and float(np.abs(grads["head_dist"]["kernel"]).max()) > 0
  assert abs(fd_ - gd) <= 1e-6 * abs(gd), (kind, gd, fd_)


def test_step_metrics_and_teacher_on_the_mixed_batch():
  """The logged terms are recomputed outside the step: the teacher's logits on the mixup / cutmix images the
  student saw (same rng split as the step), the student's two heads in train mode."""
  from flax import nnx
  step_fn, state, batch, (graphdef, tgraphs) = setup("soft", student_kw=dict(drop_path=0.0))
  rng = jax.random.PRNGKey(3)
  _, m = jax.jit(step_fn)(state, batch, rng)
  assert {"loss_cls", "loss_dist", "train_top1", "train_top1_cls", "train_top1_dist", "train_top1_teacher"} <= set(m)
  _, mix_rng = ts.step_rngs(rng, state["step"], 2)
  images, targets = mixup_cutmix(mix_rng, batch["image"], batch["label"], num_classes=C)
  assert not np.allclose(images, batch["image"])
  teacher = nnx.merge(tgraphs["teacher"], state["teachers"]["teacher"])
  out = ts.merge_model(graphdef, state["params"], state["consts"])(images, rng=jax.random.PRNGKey(0))
  t_logits = teacher(images)["logits"]
  soft = lambda t: float(losses.soft_distillation(out["logits_dist"], t, tau=2.0))
  np.testing.assert_allclose(float(m["loss_dist"]), soft(t_logits), rtol=1e-5)
  np.testing.assert_allclose(float(m["loss_cls"]), float(losses.soft_cross_entropy(out["logits_cls"], targets)),
                             rtol=1e-5)
  np.testing.assert_allclose(float(m["loss"]), 0.5 * float(m["loss_cls"]) + 0.5 * float(m["loss_dist"]), rtol=1e-6)
  assert abs(soft(teacher(batch["image"])["logits"]) - float(m["loss_dist"])) > 1e-3  # the unmixed batch differs


def test_ema_inside_the_step():
  decay = 0.5
  tx = optax.sgd(0.1)
  step_fn, state, batch, _ = setup("soft", ema_decay=decay, tx=tx)
  step = jax.jit(step_fn)
  ref = jax.tree.map(np.asarray, state["params"])
  for i in range(3):
    state, m = step(state, batch, jax.random.PRNGKey(i))
    assert m["nonfinite"] == 0
    ref = jax.tree.map(lambda e, p: decay * e + (1 - decay) * np.asarray(p), ref, state["params"])
  for a, b in zip(jax.tree.leaves(state["ema"]), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=1e-7)
  assert not np.allclose(np.asarray(state["ema"]["head"]["kernel"]), np.asarray(state["params"]["head"]["kernel"]))
  # A non-finite step leaves params and EMA as they were.
  bad = {**batch, "image": np.full_like(batch["image"], np.nan)}
  new, m = step(state, bad, jax.random.PRNGKey(9))
  assert m["nonfinite"] == 1
  for a, b in zip(jax.tree.leaves(new["ema"]), jax.tree.leaves(state["ema"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_student_without_distillation_token():
  step_fn, state, batch, _ = setup("hard", student_kw=dict(dist_token=False))
  with pytest.raises(ValueError, match="needs a student with a distillation token: set model.dist_token=True"):
    jax.jit(step_fn)(state, batch, jax.random.PRNGKey(0))
