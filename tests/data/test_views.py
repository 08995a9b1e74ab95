"""Distillation views: one crop and flip for both, colour jitter on the student view only."""
import numpy as np

from tinymim_jax import data

TEACHER_NORM = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))  # Deliberately not the student's statistics.


def _views(color_jitter, seed=3):
  cfg = data.default_config()
  cfg.image_size = 16
  cfg.teacher_norm = TEACHER_NORM
  cfg.color_jitter = color_jitter
  it = data.make_train_iterator(cfg, mode='distill', global_batch_size=64, seed=seed, process_index=0,
                                process_count=1)
  return next(it), next(it)


def _pixels(view, norm):
  mean, std = (np.array(v, np.float32) for v in norm)
  return (view * std + mean) * 255.0


def test_views_share_crop_and_flip_and_differ_after_jitter():
  plain = _views(0.0)
  jittered = _views(0.4)
  student_norm = data.default_config().student_norm
  for p, j in zip(plain, jittered):
    teacher = _pixels(p['teacher'], TEACHER_NORM)
    # Without jitter the two views are the same pixels, each normalised with its own statistics.
    np.testing.assert_allclose(_pixels(p['student'], student_norm), teacher, atol=1e-3)
    # Jitter draws no crop randomness: the teacher view is unchanged, the student view differs.
    np.testing.assert_array_equal(j['teacher'], p['teacher'])
    student = _pixels(j['student'], student_norm)
    differs = np.abs(student - teacher).reshape(len(teacher), -1).max(-1) > 1.0
    assert differs.mean() > 0.9
    assert student.min() >= -1e-3 and student.max() <= 255 + 1e-3


def test_crops_are_random_and_seeded():
  a, b = _views(0.0, seed=3), _views(0.0, seed=4)
  assert not np.array_equal(a[0]['teacher'], b[0]['teacher'])
  again = _views(0.0, seed=3)
  np.testing.assert_array_equal(again[1]['teacher'], a[1]['teacher'])
