"""The evals of a run on its held-out split: the head's top-1 (or a linear probe's), and the evals on frozen
features (FEATURE_EVALS: k-NN and few-shot top-1, knn.py, fewshot.py; config.eval), every eval_every_steps and at
the end, and for the eval objective the dense evals on a frozen encoder's patch tokens (DENSE_EVALS: the linear
segmentation probe, segprobe.py). What they read is the objective's predict function (objectives.Setup.predict:
train_steps.make_predict_fn for a model with its head, linprobe.make_predict_fn for a probe on a frozen encoder)."""

from __future__ import annotations

import logging
import time
from typing import Callable

import jax
import ml_collections
import numpy as np

from tinymim_jax import data, fewshot, knn, linprobe, segprobe
from tinymim_jax import sharding as sh


class Evaluator:
  """The evals of a run, every eval_every_steps and at the end: the top-1 of the model's head (`head='top1'`:
  eval/top1) or of a linear probe (`head='linprobe'`: eval/linprobe_top1, eval/linprobe_top5) on the held-out
  split, and k-NN and few-shot on frozen features (config.eval; up to eval.max_train train images).

  predict(sub_state, images) -> {'feature', 'logits' (optional)} reads the state entries named in `keys`.
  After cache_features() (a probe on fixed features) both splits come from the cache and only the probe runs.
  encoder(host arrays of the `keys` entries) -> the frozen ViT, and feature_spec: what the DENSE_EVALS read (None:
  none run).
  """

  def __init__(self, config, predict, state_sharding, keys, mesh, info, *, head: str = "top1",
               encoder: Callable | None = None, feature_spec=None, name: str = "", frozen_features: bool = True):
    # name: the weights evaluated, a prefix of the head's metric (eval/<name>_top1; '' the model's own);
    # frozen_features: False runs the head only (no k-NN / few-shot).
    self.config, self.mesh, self.info, self.keys, self.head = config, mesh, info, tuple(keys), head
    self.name, self.frozen_features = name, frozen_features
    self.encoder, self.feature_spec = encoder, feature_spec  # the DENSE_EVALS' frozen ViT (the eval objective)
    sub = {k: state_sharding[k] for k in self.keys}

    def fn(state, batch):  # labels and masks ride along so every process sees the global batch
      return {**predict(state, batch["image"]), "label": batch["label"], "mask": batch["mask"]}

    self.predict = jax.jit(fn, in_shardings=(sub, sh.batch_sharding(mesh)), out_shardings=sh.replicated(mesh))
    self.cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    # What the data can give the evals is known now: an eval that cannot run is skipped with one warning here,
    # not found out after the last step.
    self.sections = ()
    if frozen_features:
      self.sections, notes = plan_feature_evals(config.eval, info)
      _WARNED.clear()  # each run says its own warnings once
      for note in notes:
        logging.warning("%s", note)

  def features(self, state, split: str, limit: int | None = None):
    """-> (features (n, D), logits (n, C) or None, labels (n,)) of the first `limit` examples of `split`."""
    sub = {k: state[k] for k in self.keys}
    outs = []
    seen = 0
    for batch in data.make_eval_iterator(self.config.data, split=split, global_batch_size=self.config.batch_size):
      batch = data.to_global(batch, self.mesh, jax.sharding.PartitionSpec(sh.BATCH_AXES))
      out = jax.device_get(self.predict(sub, batch))
      mask = np.asarray(out.pop("mask"), bool)
      outs.append({k: v[mask] for k, v in out.items()})
      seen += int(mask.sum())
      if limit and seen >= limit:
        break
    cat = {k: np.concatenate([o[k] for o in outs])[:limit] for k in outs[0]}
    return cat["feature"], cat.get("logits"), cat["label"]

  def cache_features(self, state) -> tuple[np.ndarray, np.ndarray]:
    """Features of both splits, computed once and kept; -> the train split's (features, labels)."""
    for split in ("train", "test"):
      f, _, y = self.features(state, split)
      self.cache[split] = (f, y.astype(np.int32))
    return self.cache["train"]

  def __call__(self, state, *, cached_probe: bool = False) -> dict[str, float]:
    """The metrics; `cached_probe` (the eval objective) adds a linear probe on cached features of the whole
    train split (config.linprobe's recipe, no augmentation)."""
    t0 = time.time()
    e = self.config.eval
    res: dict[str, float] = {}
    if "test" in self.cache:
      f_test, y_test = self.cache["test"]
      logits = linprobe.predict_on_cache(*_host((state["params"], state["consts"])), f_test)
    else:
      f_test, logits, y_test = self.features(state, "test")
    if logits is not None:
      res.update(_head_metrics(logits, y_test, self.head, self.name))
    if self.sections or cached_probe:
      if "train" in self.cache:
        f_train, y_train = self.cache["train"]
      else:
        f_train, _, y_train = self.features(state, "train", None if cached_probe else e.max_train)
      res.update(_frozen_feature_metrics(self.sections, f_train[:e.max_train], y_train[:e.max_train], f_test,
                                         y_test, self.info.num_classes))
      if cached_probe:
        lp = self.config.linprobe
        params, consts = linprobe.fit_on_cache(
            f_train, y_train, num_classes=self.info.num_classes, batch_size=lp.batch_size, epochs=lp.epochs,
            warmup_epochs=lp.warmup_epochs, base_lr=lp.base_lr, weight_decay=lp.weight_decay,
            momentum=lp.momentum, trust_coefficient=lp.trust_coefficient, seed=self.config.seed,
            lr_scaling_batch=self.config.optim.lr_scaling_batch, min_lr=self.config.optim.min_lr)
        res.update(_head_metrics(linprobe.predict_on_cache(params, consts, f_test), y_test, "linprobe"))
    if self.encoder is not None:
      sections = {name: e[name] for name in DENSE_EVALS if e[name].enabled}
      if sections:
        vit = self.encoder(_host({k: state[k] for k in self.keys}))  # the dense evals run their own passes
        for name, section in sections.items():
          res.update(DENSE_EVALS[name](section, vit, self.feature_spec, data_dir=self.config.data.data_dir,
                                       seed=self.config.seed))
    res[f"time/{self.name + '_' if self.name else ''}eval_seconds"] = time.time() - t0
    return res


def _host(tree):
  """A replicated (possibly multi-process) pytree as numpy."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree)


def _head_metrics(logits, labels, head: str, name: str = "") -> dict[str, float]:
  pre = f"{name}_" if name else ""
  if head == "top1":
    return {f"eval/{pre}top1": linprobe.topk_accuracy(logits, labels, 1)}
  return {f"eval/{pre}{head}_top1": linprobe.topk_accuracy(logits, labels, 1),
          f"eval/{pre}{head}_top5": linprobe.topk_accuracy(logits, labels, 5)}


def _knn(section, f_train, y_train, f_test, y_test, num_classes) -> dict[str, float]:
  """Weighted k-NN top-1 (knn.py; config.eval.knn: k, temperature)."""
  return {"eval/knn_top1": knn.knn_top1(f_train, y_train, f_test, y_test, k=min(section.k, len(y_train)),
                                       temperature=section.temperature, num_classes=num_classes)}


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
  if message not in _WARNED:
    _WARNED.add(message)
    logging.warning("%s", message)


def _fewshot(section, f_train, y_train, f_test, y_test, num_classes) -> dict[str, float]:
  """big_vision's closed-form few-shot top-1 per shot count (fewshot.py; config.eval.fewshot). A shot count that
  some class has too few train images for is not reported (one warning naming the class counts)."""
  shots, problem = fewshot.supported_shots(y_train, num_classes, tuple(section.shots), section.val_per_class)
  if problem is not None:
    _warn_once(problem)
  if not shots:
    return {}
  accs = fewshot.fewshot_top1(f_train, y_train, f_test, y_test, num_classes=num_classes, shots=shots,
                              draws=section.draws, val_per_class=section.val_per_class,
                              l2_regs=tuple(section.l2_regs))
  return {f"eval/fewshot_{k}shot_top1": v for k, v in accs.items()}


def plan_feature_evals(e, info) -> tuple[dict[str, ml_collections.ConfigDict], list[str]]:
  """-> ({name: section} of the enabled FEATURE_EVALS this data can give, warnings for what it cannot).

  Checked from the data's sizes alone (info: num_train, num_classes), when a run starts: the evals read the first
  min(eval.max_train, num_train) train images, so no class has more than that / num_classes of them, and a
  k-shot needs eval.fewshot.val_per_class + k per class (fewshot.supported_shots checks the true counts at each
  eval)."""
  sections, notes = {}, []
  read = min(int(e.max_train), int(info.num_train))
  per_class = read // max(int(info.num_classes), 1)
  for name in _enabled(e):
    section = ml_collections.ConfigDict(e[name].to_dict())
    if name == "fewshot":
      need = lambda k: section.val_per_class + k  # pylint: disable=cell-var-from-loop
      ok = tuple(k for k in section.shots if need(k) <= per_class)
      dropped = [k for k in section.shots if k not in ok]
      if dropped:
        what = "skipped" if not ok else f"{', '.join(f'{k}-shot' for k in dropped)} skipped"
        notes.append(
            f"few-shot eval {what}: k shots need eval.fewshot.val_per_class={section.val_per_class} held-out + k "
            f"train images in every class, and the evals read {read} train images (eval.max_train="
            f"{e.max_train}, {info.num_train} in the data) over {info.num_classes} classes: at most {per_class} "
            f"per class. Lower eval.fewshot.val_per_class / eval.fewshot.shots"
            + (", or raise eval.max_train" if e.max_train < info.num_train else ", or use more train images"))
      if not ok:
        continue
      section.shots = ok
    sections[name] = section
  return sections, notes


# The evals on frozen features of the train and test splits, by their section of config.eval: each runs when its
# section's `enabled` is set. fn(section, f_train (n, D), y_train (n,), f_test, y_test, num_classes) -> metrics.
# A new one (a teacher's k-NN, a dense eval) is one entry here and its section in config_base.base_config().eval.
FEATURE_EVALS: dict[str, Callable[..., dict[str, float]]] = {"knn": _knn, "fewshot": _fewshot}


# The dense evals on a frozen ViT's patch tokens, by their section of config.eval, each when its `enabled` is set:
# fn(section, vit (eval mode, host arrays), feature spec, *, data_dir, seed) -> metrics. They read their own
# (segmentation) data, so only an objective that hands the Evaluator its frozen encoder runs them: 'eval'.
DENSE_EVALS: dict[str, Callable[..., dict[str, float]]] = {"segprobe": segprobe.evaluate}


def _enabled(e) -> list[str]:
  return [name for name in FEATURE_EVALS if e[name].enabled]


def _frozen_feature_metrics(sections, f_train, y_train, f_test, y_test, num_classes) -> dict[str, float]:
  """The FEATURE_EVALS of `sections` ({name: section}: plan_feature_evals') of train -> test features."""
  res = {}
  for name, section in sections.items():
    res.update(FEATURE_EVALS[name](section, f_train, y_train, f_test, y_test, num_classes))
  return res
