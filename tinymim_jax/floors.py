"""Floors: the trivial baselines a result must clear, measured with the same protocol as the models.

A frozen-feature score means something only beside the same eval on raw pixels, and a fine-tuning score only
beside the same recipe from a random init (the study plans that one as an arm of its own). `pixel_floors` runs
the frozen-feature evals of the `eval` objective (k-NN, few-shot, the linear probe on cached features: the same
functions, settings and train / test images) on the normalised pixels the models see, plus a multinomial
logistic regression on the pixels (scikit-learn, the classic pixel baseline of Xiao et al. 2017, Fashion-MNIST).
"""
from __future__ import annotations

import json
import logging
import os
import time

import numpy as np

from tinymim_jax import data, fewshot, knn, linprobe, paths

DONE = "done.json"


def pixel_arrays(config, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(pixels (n, H*W*C') float32, labels (n,) int32) of a whole split ('train' or 'test') after the eval
  transform (resize, centre crop, student_norm), as every frozen-feature eval reads images. Grey images stored
  as three equal channels keep one (cosine similarities, the probe's BatchNorm and the logistic regression are
  the same up to scale)."""
  xs, ys = [], []
  for batch in data.make_eval_iterator(config.data, split=split, global_batch_size=config.batch_size,
                                       process_index=0, process_count=1):
    mask = np.asarray(batch["mask"], bool)
    xs.append(np.asarray(batch["image"], np.float32)[mask])
    ys.append(np.asarray(batch["label"], np.int32)[mask])
  x, y = np.concatenate(xs), np.concatenate(ys)
  if x.shape[-1] == 3 and np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 0], x[..., 2]):
    x = x[..., :1]
  return x.reshape(len(x), -1), y


def logistic_regression_top1(x_train, y_train, x_test, y_test, *, max_iter: int = 1000) -> float:
  """Top-1 of a multinomial logistic regression (L2, C=1, lbfgs) on standardised features."""
  from sklearn.linear_model import LogisticRegression
  from sklearn.preprocessing import StandardScaler
  scaler = StandardScaler().fit(x_train)
  clf = LogisticRegression(max_iter=max_iter)
  clf.fit(scaler.transform(x_train), y_train)
  return float((clf.predict(scaler.transform(x_test)) == y_test).mean())


def pixel_floors(config) -> dict[str, float]:
  """The frozen-feature evals of config.eval / config.linprobe on raw pixels, under the keys the `eval` objective
  writes (eval/knn_top1, eval/fewshot_{k}shot_top1, eval/linprobe_top1 / top5), plus eval/logreg_top1."""
  e, lp = config.eval, config.linprobe
  x_train, y_train = pixel_arrays(config, "train")
  x_test, y_test = pixel_arrays(config, "test")
  num_classes = int(max(y_train.max(), y_test.max()) + 1)
  res: dict[str, float] = {}
  n = e.max_train or len(y_train)
  if e.knn.enabled:
    res["eval/knn_top1"] = knn.knn_top1(x_train[:n], y_train[:n], x_test, y_test, k=min(e.knn.k, n),
                                        temperature=e.knn.temperature, num_classes=num_classes)
  if e.fewshot.enabled:
    f = e.fewshot
    accs = fewshot.fewshot_top1(x_train[:n], y_train[:n], x_test, y_test, num_classes=num_classes,
                                shots=tuple(f.shots), draws=f.draws, val_per_class=f.val_per_class,
                                l2_regs=tuple(f.l2_regs))
    res.update({f"eval/fewshot_{k}shot_top1": v for k, v in accs.items()})
  params, consts = linprobe.fit_on_cache(
      x_train, y_train, num_classes=num_classes, batch_size=lp.batch_size, epochs=lp.epochs,
      warmup_epochs=lp.warmup_epochs, base_lr=lp.base_lr, weight_decay=lp.weight_decay, momentum=lp.momentum,
      trust_coefficient=lp.trust_coefficient, seed=config.seed, lr_scaling_batch=config.optim.lr_scaling_batch,
      min_lr=config.optim.min_lr)
  logits = linprobe.predict_on_cache(params, consts, x_test)
  res["eval/linprobe_top1"] = linprobe.topk_accuracy(logits, y_test, 1)
  res["eval/linprobe_top5"] = linprobe.topk_accuracy(logits, y_test, 5)
  res["eval/logreg_top1"] = logistic_regression_top1(x_train, y_train, x_test, y_test)
  return res


def run(config, workdir: str) -> dict:
  """Measures the pixel floors into `workdir` (done.json, like a run of the main job; a rerun reads it)."""
  done_path = os.path.join(workdir, DONE)
  if paths.exists(done_path):
    return json.loads(paths.read_text(done_path))
  paths.makedirs(workdir)
  t0 = time.time()
  res = pixel_floors(config)
  res["time/eval_seconds"] = time.time() - t0
  logging.info("pixel floors: %s", res)
  paths.write_atomic(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
  paths.write_atomic(done_path, json.dumps({**res, "step": 0}, indent=2))
  return {**res, "step": 0}
