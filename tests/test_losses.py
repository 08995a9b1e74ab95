"""Losses against independent numpy re-derivations (float64 at 1e-10, float32)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tinymim_jax import losses


@pytest.fixture
def x64():
  # Scoped: x64 must not leak into other tests.
  with jax.enable_x64(True):
    yield
  assert not jax.config.jax_enable_x64


def _rng(seed=0):
  return np.random.default_rng(seed)


# ---------------------------------------------------------------- numpy refs.


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_relation_kl(t, s):
  """mean_{b,h,i} sum_j p_ij (log p_ij - log q_ij), each model its own dh."""

  def rel(a, b):
    return np.einsum("bhnd,bhmd->bhnm", a, b) / np.sqrt(a.shape[-1])

  out = {}
  for name, (x, y) in {"loss_qk": ("q", "k"), "loss_vv": ("v", "v")}.items():
    lp = np_log_softmax(rel(t[x], t[y]))
    lq = np_log_softmax(rel(s[x], s[y]))
    out[name] = (np.exp(lp) * (lp - lq)).sum(-1).mean()
  return out


def np_smooth_l1(d):
  return np.where(np.abs(d) < 1, 0.5 * d**2, np.abs(d) - 0.5)


def np_cos(x, y):
  return (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) *
                            np.linalg.norm(y, axis=-1))


def np_dist(s, t, kind):
  if kind == "smooth_l1":
    return np_smooth_l1(s - t).mean()
  if kind == "mse":
    return ((s - t)**2).mean()
  return (1 - np_cos(s, t)).mean()


def np_mae_patchify(imgs_nchw, p):
  """Direct transcription of facebookresearch/mae's torch patchify."""
  n = imgs_nchw.shape[0]
  h = w = imgs_nchw.shape[2] // p
  x = imgs_nchw.reshape(n, 3, h, p, w, p)
  x = np.einsum("nchpwq->nhwpqc", x)
  return x.reshape(n, h * w, p**2 * 3)


def np_mae_loss(pred, imgs_nchw, mask, p, norm_pix):
  target = np_mae_patchify(imgs_nchw, p)
  if norm_pix:
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True, ddof=1)
    target = (target - mean) / (var + 1.e-6)**.5
  loss = ((pred - target)**2).mean(-1)
  return (loss * mask).sum() / mask.sum()


def _qkv(rng, b, h, n, dh, scale=1.0):
  return {k: scale * rng.normal(size=(b, h, n, dh)) for k in "qkv"}


# ------------------------------------------------------------------- tests.


def test_relation_loss_matches_numpy_x64(x64):
  rng = _rng(0)
  b, h, n = 2, 4, 1 + 9  # CLS + 3x3 grid.
  # Teacher D=64 over 4 heads (dh 16); student D=48 over the same 4 (dh 12).
  t, s = _qkv(rng, b, h, n, 16, 2.0), _qkv(rng, b, h, n, 12, 2.0)
  want = np_relation_kl(t, s)
  loss, aux = losses.relation_loss(t, s, w_qk=0.7, w_vv=1.3)
  assert loss.dtype == jnp.float64
  np.testing.assert_allclose(aux["loss_qk"], want["loss_qk"], rtol=1e-10)
  np.testing.assert_allclose(aux["loss_vv"], want["loss_vv"], rtol=1e-10)
  np.testing.assert_allclose(
      loss, 0.7 * want["loss_qk"] + 1.3 * want["loss_vv"], rtol=1e-10)


def test_relation_loss_float32():
  rng = _rng(1)
  t, s = _qkv(rng, 2, 4, 17, 16), _qkv(rng, 2, 4, 17, 12)
  want = np_relation_kl(t, s)
  f32 = lambda d: {k: jnp.asarray(v, jnp.float32) for k, v in d.items()}
  loss, aux = jax.jit(losses.relation_loss)(f32(t), f32(s))
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(aux["loss_qk"], want["loss_qk"], rtol=1e-5)
  np.testing.assert_allclose(aux["loss_vv"], want["loss_vv"], rtol=1e-5)
  np.testing.assert_allclose(
      loss, want["loss_qk"] + want["loss_vv"], rtol=1e-5)


def test_relation_loss_zero_when_relations_coincide(x64):
  rng = _rng(2)
  t = _qkv(rng, 2, 3, 5, 8)
  loss, _ = losses.relation_loss(t, t)
  assert float(loss) == 0.0
  # Same relations from a student with twice the head dim: zero-pad and
  # rescale by 2**0.25 so q k^T / sqrt(2 dh) equals the teacher's logits.
  pad = lambda x: np.concatenate([x, np.zeros_like(x)], -1) * 2**0.25
  s = {k: pad(v) for k, v in t.items()}
  loss, _ = losses.relation_loss(t, s)
  assert abs(float(loss)) < 1e-12


def test_relation_loss_nonnegative():
  rng = _rng(3)
  for i in range(5):
    t, s = _qkv(rng, 2, 2, 7, 8, 3.0), _qkv(rng, 2, 2, 7, 4, 3.0)
    loss, aux = losses.relation_loss(t, s)
    assert float(loss) >= 0 and float(aux["loss_vv"]) >= 0, i


def test_relation_loss_shape_mismatch():
  rng = _rng(4)
  t, s = _qkv(rng, 2, 4, 10, 16), _qkv(rng, 2, 4, 9, 16)
  with pytest.raises(ValueError, match=r"\(2, 4, 10, 16\).*\(2, 4, 9, 16\)"):
    losses.relation_loss(t, s)
  with pytest.raises(ValueError, match="same B, H, N"):
    losses.relation_loss(t, _qkv(rng, 2, 3, 10, 16))


def test_relation_logits(x64):
  rng = _rng(5)
  a, b = rng.normal(size=(2, 3, 4, 6)), rng.normal(size=(2, 3, 5, 6))
  np.testing.assert_allclose(
      losses.relation_logits(a, b), a @ b.swapaxes(-1, -2) / np.sqrt(6),
      rtol=1e-12)


def test_relation_loss_bfloat16_inputs():
  rng = _rng(6)
  t, s = _qkv(rng, 2, 4, 10, 16), _qkv(rng, 2, 4, 10, 12)
  bf = lambda d: {k: jnp.asarray(v, jnp.bfloat16) for k, v in d.items()}
  f32 = lambda d: {k: v.astype(jnp.float32) for k, v in bf(d).items()}
  loss_bf, _ = losses.relation_loss(bf(t), bf(s))
  loss_32, _ = losses.relation_loss(f32(t), f32(s))
  assert loss_bf.dtype == jnp.float32
  # Same bf16-rounded values, computed in float32 either way.
  np.testing.assert_allclose(loss_bf, loss_32, rtol=1e-6)


@pytest.mark.parametrize("kind", ["cosine", "smooth_l1", "mse"])
def test_class_token_loss(x64, kind):
  rng = _rng(7)
  s, t = 2 * rng.normal(size=(4, 32)), 2 * rng.normal(size=(4, 32))
  np.testing.assert_allclose(
      losses.class_token_loss(s, t, kind), np_dist(s, t, kind), rtol=1e-10)
  # float32 path.
  got = losses.class_token_loss(
      jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), kind)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, np_dist(s, t, kind), rtol=1e-5)


@pytest.mark.parametrize("kind", ["cosine", "smooth_l1", "mse"])
@pytest.mark.parametrize("normalize_target", [False, True])
def test_feature_loss(x64, kind, normalize_target):
  rng = _rng(8)
  s, t = 2 * rng.normal(size=(2, 5, 24)), 3 + 2 * rng.normal(size=(2, 5, 24))
  tt = t
  if normalize_target:
    tt = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True)
                                                   + 1e-6)
  want = np_dist(s, tt, kind)
  np.testing.assert_allclose(
      losses.feature_loss(s, t, kind, normalize_target), want, rtol=1e-10)


def test_feature_loss_float32_and_errors():
  rng = _rng(9)
  s, t = rng.normal(size=(2, 5, 24)), rng.normal(size=(2, 5, 24))
  got = losses.feature_loss(jnp.asarray(s, jnp.bfloat16),
                            jnp.asarray(t, jnp.float32), "mse")
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, np_dist(s, t, "mse"), rtol=1e-2)
  with pytest.raises(ValueError, match="Unknown loss kind"):
    losses.feature_loss(s, t, "l1")
  with pytest.raises(ValueError, match="same shape"):
    losses.feature_loss(s, t[..., :12])


def test_patchify_matches_mae():
  rng = _rng(10)
  p = 4
  imgs_nchw = rng.normal(size=(2, 3, 16, 16))
  imgs = imgs_nchw.transpose(0, 2, 3, 1)  # NHWC.
  got = np.asarray(losses.patchify(jnp.asarray(imgs), p))
  want = np_mae_patchify(imgs_nchw, p)
  np.testing.assert_array_equal(got, want.astype(np.float32))
  # Spot-check the documented orders: patch (row 1, col 2), pixel (3, 0), ch 2.
  assert got[0, 1 * 4 + 2, (3 * p + 0) * 3 + 2] == np.float32(
      imgs[0, 1 * p + 3, 2 * p + 0, 2])


def test_patchify_non_square_and_errors():
  imgs = jnp.arange(2 * 8 * 12 * 3, dtype=jnp.float32).reshape(2, 8, 12, 3)
  assert losses.patchify(imgs, 4).shape == (2, 6, 48)
  with pytest.raises(ValueError, match="divisible"):
    losses.patchify(imgs, 5)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_matches_numpy(x64, norm_pix):
  rng = _rng(11)
  p, b = 4, 3
  imgs_nchw = rng.normal(size=(b, 3, 16, 16))
  imgs = imgs_nchw.transpose(0, 2, 3, 1)
  pred = rng.normal(size=(b, 16, p * p * 3))
  mask = (rng.uniform(size=(b, 16)) < 0.75).astype(np.float64)
  want = np_mae_loss(pred, imgs_nchw, mask, p, norm_pix)
  got = losses.mae_loss(pred, imgs, mask, p, norm_pix)
  np.testing.assert_allclose(got, want, rtol=1e-10)
  got32 = losses.mae_loss(jnp.asarray(pred, jnp.float32),
                          jnp.asarray(imgs, jnp.float32),
                          jnp.asarray(mask, jnp.bool_), p, norm_pix)
  assert got32.dtype == jnp.float32
  np.testing.assert_allclose(got32, want, rtol=1e-5)


def test_mae_loss_ignores_visible_patches():
  rng = _rng(12)
  imgs = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
  pred = jnp.asarray(rng.normal(size=(2, 16, 48)), jnp.float32)
  mask = jnp.asarray(rng.uniform(size=(2, 16)) < 0.75)
  base = losses.mae_loss(pred, imgs, mask, 4)
  noise = jnp.asarray(rng.normal(size=pred.shape), jnp.float32) * 10
  moved = losses.mae_loss(pred + noise * ~mask[..., None], imgs, mask, 4)
  assert float(moved) == float(base)
  changed = losses.mae_loss(pred + noise * mask[..., None], imgs, mask, 4)
  assert float(changed) != float(base)
  # bf16 predictions: float32 result close to the float32 path.
  bf = losses.mae_loss(pred.astype(jnp.bfloat16), imgs, mask, 4)
  assert bf.dtype == jnp.float32
  np.testing.assert_allclose(bf, base, rtol=1e-2)


def test_soft_cross_entropy_and_top1(x64):
  rng = _rng(13)
  logits = 3 * rng.normal(size=(5, 10))
  targets = rng.dirichlet(np.ones(10), size=5)
  want = -(targets * np_log_softmax(logits)).sum(-1).mean()
  np.testing.assert_allclose(
      losses.soft_cross_entropy(logits, targets), want, rtol=1e-10)
  labels = np.array([logits[0].argmax(), 0, 1, logits[3].argmax(), 2])
  got = np.asarray(losses.top1_correct(logits, labels))
  np.testing.assert_array_equal(got, logits.argmax(-1) == labels)
  assert got.dtype == np.bool_ and got[0] and got[3]


def test_x64_did_not_leak():
  assert jnp.zeros(()).dtype == jnp.float32
