"""Losses of TinyMIM distillation, MAE pretraining and fine-tuning.

Pure jax.numpy functions: no modules, no parameters. Everything is computed in
the wider of float32 and the input dtype: float32 for bfloat16 / float16 /
float32 inputs (the reference runs fp16 autocast but keeps softmax, log and KL
in fp32), float64 for float64 inputs (param_dtype = dtype = float64 models:
exactness tests against the reference's float64 numbers, gradient checks).
"""
import jax
import jax.numpy as jnp


def _f32(x):
  """Casts to float32, except float64 which is kept (float64 models, x64 tests)."""
  x = jnp.asarray(x)
  return x if x.dtype == jnp.float64 else x.astype(jnp.float32)


def relation_logits(a, b):
  """Scaled dot products of one model's tokens: a @ b^T * dh**-0.5.

  Args:
    a: (B, H, N, dh) queries (or values).
    b: (B, H, M, dh) keys (or values).

  Returns:
    (B, H, N, M) float32 logits. dh is the model's own head_dim (docs/method.md section 2: no
    extra temperature, each model uses its own 1/sqrt(dh)).
  """
  a, b = _f32(a), _f32(b)
  # The reference scales the (N, M) product, `(q @ k^T) * scale`; scaling the (N, dh) operand is the same
  # function (exactly so for power-of-two scales, dh = 16, 64) with N/dh times fewer multiplies, and XLA:CPU
  # would otherwise materialise the scale as a full (B, H, N, M) operand of its matmul fusions.
  return jnp.einsum("bhnd,bhmd->bhnm", a * a.shape[-1] ** -0.5, b)


def _kl_rows_sum(teacher_logits, student_logits):
  """Per-row KL(softmax(t) || softmax(s)), summed over keys: (..., N, M) -> (..., N); log_softmax is finite, so
  p == 0 (underflow) contributes exactly 0."""
  log_p = jax.nn.log_softmax(teacher_logits, axis=-1)
  log_q = jax.nn.log_softmax(student_logits, axis=-1)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1), log_p, log_q


# Speed / memory (benchmarks/distill_step.py): the relation KL is one custom-VJP function of the four
# (B, H, N, dh) operands. Plain autodiff keeps two (B, H, N, N) float32 residuals per relation for the
# backward (the teacher's p and the student's softmax); at a GPU batch of 256 with 12 heads each is 0.48 GB.
# Here nothing N x N is saved: the backward recomputes both logits from q/k (or v/v) -- 2 N^2 dh FLOPs per
# head, ~0.3% of the step -- and forms d/ds = softmax(s) * sum(p) - p (exactly what autodiff of the
# log_softmax formula gives) in float32.
# Teacher-side gradients are formed only when the teacher operands are differentiated (never in the
# distillation step, where they are stop_gradient'ed).
@jax.custom_vjp
def _relation_kl(ta, tb, sa, sb):
  """mean over rows of KL(softmax(ta tb^T s_t) || softmax(sa sb^T s_s)); see the comment above."""
  return jnp.mean(_kl_rows_sum(relation_logits(ta, tb), relation_logits(sa, sb))[0])


def _relation_kl_fwd(ta, tb, sa, sb):
  # symbolic_zeros=True: the arguments arrive as CustomVJPPrimal(value, perturbed).
  vals = tuple(x.value for x in (ta, tb, sa, sb))
  teacher_grad = ta.perturbed or tb.perturbed
  loss = jnp.mean(_kl_rows_sum(relation_logits(*vals[:2]), relation_logits(*vals[2:]))[0])
  return loss, (vals, teacher_grad)


def _matmul_grads(g, a, b, like_a, like_b, scale):
  """Cotangents of a, b for logits = a @ b^T * dh**-0.5 with d(loss)/d(logits) = g * scale (float32); the
  scalars are applied to the (N, dh) products, not to the (N, M) cotangent."""
  scale = scale * a.shape[-1] ** -0.5
  ga = jnp.einsum("bhnm,bhmd->bhnd", g, _f32(b)) * scale
  gb = jnp.einsum("bhnm,bhnd->bhmd", g, _f32(a)) * scale
  return ga.astype(like_a.dtype), gb.astype(like_b.dtype)


def _relation_kl_bwd(res, ct):
  (ta, tb, sa, sb), teacher_grad = res
  t, s = relation_logits(ta, tb), relation_logits(sa, sb)
  rows = t.size // t.shape[-1]
  log_p = jax.nn.log_softmax(t, axis=-1)
  log_q = jax.nn.log_softmax(s, axis=-1)
  p = jnp.exp(log_p)
  ct = (ct / rows).astype(t.dtype)
  # d/ds = (q - p) ct. Its rows sum to exactly 0 (both are distributions), which is why the key bias gets
  # no true gradient; subtracting the row mean removes the rounding left in those sums (otherwise Adam
  # turns that noise into lr-sized key-bias steps). ct is applied after the matmuls (linear, same value).
  gs = jnp.exp(log_q) - p
  gs = gs - jnp.mean(gs, axis=-1, keepdims=True)
  gsa, gsb = _matmul_grads(gs, sa, sb, sa, sb, ct)
  if teacher_grad:  # d/dt of sum_j p_j (log p_j - log q_j)
    d = log_p - log_q
    sum_p = jnp.sum(p, axis=-1, keepdims=True)
    gt = p * (d - jnp.sum(p * d, axis=-1, keepdims=True) + 1 - sum_p)
    gta, gtb = _matmul_grads(gt, ta, tb, ta, tb, ct)
  else:
    gta, gtb = jnp.zeros_like(ta), jnp.zeros_like(tb)
  return gta, gtb, gsa, gsb


_relation_kl.defvjp(_relation_kl_fwd, _relation_kl_bwd, symbolic_zeros=True)


def relation_loss(teacher, student, *, w_qk=1.0, w_vv=1.0):
  """TinyMIM relation distillation loss (docs/method.md section 2).

  Args:
    teacher: dict with 'q', 'k', 'v', each (B, H, N, dh_t), CLS included.
    student: dict with 'q', 'k', 'v', each (B, H, N, dh_s); same B, H, N as the
      teacher (the student's relation block uses the teacher's head count),
      head dims may differ.
    w_qk: weight of the q-k relation term.
    w_vv: weight of the v-v relation term.

  Returns:
    (loss, {'loss_qk', 'loss_vv'}) with loss = w_qk * L_qk + w_vv * L_vv.
  """
  for name in ("q", "k", "v"):
    t, s = teacher[name].shape, student[name].shape
    if len(t) != 4 or len(s) != 4 or t[:3] != s[:3]:
      raise ValueError(
          f"relation_loss: teacher {name!r} {tuple(t)} and student {name!r} "
          f"{tuple(s)} must both be (B, H, N, dh) with the same B, H, N.")
  loss_qk = _relation_kl(teacher["q"], teacher["k"], student["q"], student["k"])
  loss_vv = _relation_kl(teacher["v"], teacher["v"], student["v"], student["v"])
  loss = w_qk * loss_qk + w_vv * loss_vv
  return loss, {"loss_qk": loss_qk, "loss_vv": loss_vv}


def _smooth_l1(d):
  # torch F.smooth_l1_loss with beta=1.0.
  ad = jnp.abs(d)
  return jnp.where(ad < 1.0, 0.5 * d * d, ad - 0.5)


def _cosine(x, y, eps=1e-8):
  # torch F.cosine_similarity over the last axis; each norm clamped to eps.
  nx = jnp.maximum(jnp.linalg.norm(x, axis=-1), eps)
  ny = jnp.maximum(jnp.linalg.norm(y, axis=-1), eps)
  return jnp.sum(x * y, axis=-1) / (nx * ny)


def _regression(student, teacher, kind):
  """Mean-reduced distance between same-shape arrays; 'cosine' over last axis."""
  if student.shape != teacher.shape:
    raise ValueError(f"student {student.shape} and teacher {teacher.shape} "
                     "must have the same shape.")
  d = student - teacher
  if kind == "smooth_l1":
    return jnp.mean(_smooth_l1(d))
  if kind == "mse":
    return jnp.mean(d * d)
  if kind == "cosine":
    return jnp.mean(1.0 - _cosine(student, teacher))
  raise ValueError(f"Unknown loss kind {kind!r}: smooth_l1 | mse | cosine.")


def class_token_loss(student_cls, teacher_cls, kind="cosine"):
  """Class-token distillation: (B, D) each -> scalar.

  kind: 'cosine' (1 - cosine similarity, mean over batch), 'smooth_l1' (beta 1)
  or 'mse' (both mean over all elements).
  """
  return _regression(_f32(student_cls), _f32(teacher_cls), kind)


def layer_norm(x, eps=1e-6):
  """Parameter-free LayerNorm over the last axis (biased variance, as torch); eps 1e-6 as the ViT's."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def feature_loss(student, teacher, kind="smooth_l1", normalize_target=False):
  """Feature (hidden state) distillation: (B, N, D) each -> scalar.

  The caller has already projected the student to the teacher width.
  kind: 'smooth_l1' | 'mse' (mean over all elements) | 'cosine' (1 - cos over
  D, mean over B, N). normalize_target applies a parameter-free LayerNorm
  (eps 1e-6) over D to the teacher features first.
  """
  teacher = _f32(teacher)
  if normalize_target:
    teacher = layer_norm(teacher)
  return _regression(_f32(student), teacher, kind)


def patchify(imgs, patch):
  """MAE patchify on NHWC images.

  Args:
    imgs: (B, H, W, C) with H, W multiples of patch.
    patch: patch size p.

  Returns:
    (B, L, p*p*C), patches in row-major (row, col) order, each flattened as
    (row-in-patch, col-in-patch, channel): MAE's 'nchpwq->nhwpqc' on NCHW.
  """
  b, hh, ww, c = imgs.shape
  if hh % patch or ww % patch:
    raise ValueError(f"Image size {(hh, ww)} not divisible by patch {patch}.")
  h, w = hh // patch, ww // patch
  x = imgs.reshape(b, h, patch, w, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, h, w, p, p, C)
  return x.reshape(b, h * w, patch * patch * c)


def mae_loss(pred, imgs, mask, patch, norm_pix=True):
  """MAE pixel reconstruction loss (facebookresearch/mae forward_loss).

  Args:
    pred: (B, L, p*p*C) predicted pixels.
    imgs: (B, H, W, C) images.
    mask: (B, L), 1 = masked (removed from the encoder input), 0 = visible.
    patch: patch size p.
    norm_pix: normalise each target patch by its mean and unbiased variance.

  Returns:
    Scalar: per-patch MSE averaged over masked patches only.
  """
  target = patchify(_f32(imgs), patch)
  if norm_pix:
    mean = jnp.mean(target, axis=-1, keepdims=True)
    var = jnp.var(target, axis=-1, keepdims=True, ddof=1)  # torch .var().
    target = (target - mean) / (var + 1e-6) ** 0.5
  per_patch = jnp.mean(jnp.square(_f32(pred) - target), axis=-1)  # (B, L)
  mask = mask.astype(per_patch.dtype)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


def soft_cross_entropy(logits, targets):
  """Mean over batch of -sum(targets * log_softmax(logits)); (B, C) each."""
  logp = jax.nn.log_softmax(_f32(logits), axis=-1)
  return jnp.mean(-jnp.sum(_f32(targets) * logp, axis=-1))


def top1_correct(logits, labels):
  """(B, C) logits, (B,) int labels -> (B,) bool."""
  return jnp.argmax(logits, axis=-1) == labels


# --------------------------------------------------------------------------------------------------------
# DeiT-style distillation through a distillation token (Touvron et al., ICML 2021; DeiT losses.py
# DistillationLoss; docs/method.md section 11.3).
# --------------------------------------------------------------------------------------------------------
DISTILLATION_TYPES = ("none", "soft", "hard")


def soft_distillation(student_logits, teacher_logits, tau=1.0):
  """DeiT's soft term: KL(softmax(t / tau) || softmax(s / tau)) summed over batch and classes, times tau^2,
  divided by the number of logits B * C (not by B: DeiT keeps "the legacy PyTorch behavior", its issue 61).

  (B, C) logits each -> scalar (float32, float64 for float64 inputs). The teacher's side gets no gradient.
  """
  s, t = _f32(student_logits), jax.lax.stop_gradient(_f32(teacher_logits))
  logp_s = jax.nn.log_softmax(s / tau, axis=-1)
  logp_t = jax.nn.log_softmax(t / tau, axis=-1)
  kl = jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s))  # F.kl_div(logp_s, logp_t, 'sum', log_target=True)
  return kl * (tau * tau) / s.size


def hard_distillation(student_logits, teacher_logits):
  """DeiT's hard term: cross-entropy of the student's logits to the teacher's argmax (no label smoothing),
  averaged over the batch. (B, C) each -> scalar."""
  labels = jnp.argmax(jax.lax.stop_gradient(teacher_logits), axis=-1)
  logp = jax.nn.log_softmax(_f32(student_logits), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


def distillation_loss(logits_cls, logits_dist, targets, teacher_logits, *, kind="hard", alpha=0.5, tau=1.0):
  """DeiT's DistillationLoss: base = soft_cross_entropy(logits_cls, targets) (the class head against the
  (mixed, smoothed) label distribution, DeiT's SoftTargetCrossEntropy); then

    'none': base (the distillation head gets nothing; DeiT returns base_loss unweighted)
    'hard': (1 - alpha) base + alpha CE(logits_dist, argmax teacher)   (alpha 0.5: DeiT's paper recipe)
    'soft': (1 - alpha) base + alpha soft_distillation(logits_dist, teacher, tau)

  logits_cls / logits_dist / teacher_logits (B, C), targets (B, C) rows summing to 1; teacher_logits and
  logits_dist may be None with kind 'none'. Returns (loss, {'loss_cls': base, 'loss_dist': the distillation
  term (0 for 'none')}). Raises ValueError for an unknown kind (at trace time).
  """
  if kind not in DISTILLATION_TYPES:
    raise ValueError(f"distillation type must be one of {DISTILLATION_TYPES}, got {kind!r}")
  base = soft_cross_entropy(logits_cls, targets)
  if kind == "none":
    return base, {"loss_cls": base, "loss_dist": jnp.zeros_like(base)}
  dist = (hard_distillation(logits_dist, teacher_logits) if kind == "hard"
          else soft_distillation(logits_dist, teacher_logits, tau))
  return base * (1 - alpha) + dist * alpha, {"loss_cls": base, "loss_dist": dist}
