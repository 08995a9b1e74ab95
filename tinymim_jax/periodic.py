"""When things happen in a run, one formula each: steps per epoch, the run's length in steps, and whether a
periodic action (log, eval, checkpoint) is due at a step (the idea of clu.periodic_actions).

Pure Python: the data pipeline, the trainer, the linear probe and the study all count with these.
"""

from __future__ import annotations


def steps_per_epoch(num_examples: int, global_batch_size: int, *, process_count: int = 1,
                    name: str = "the data") -> int:
  """Training steps in one epoch of `num_examples` examples: every process takes the same number of local batches
  (global_batch_size // process_count) from its share (num_examples // process_count: shares differ by at most
  one example), and the few left over are dropped per epoch.

  Raises ValueError (naming `name`) when a process holds fewer examples than one local batch.
  """
  batch = global_batch_size // process_count
  fewest = num_examples // process_count
  if fewest < batch or batch < 1:
    raise ValueError(f"{name} has {num_examples} examples, {fewest} per process: fewer than one local batch of "
                     f"{batch} (global_batch_size={global_batch_size}).")
  return fewest // batch


def run_length(config, steps_per_epoch: int) -> tuple[int, int]:
  """-> (total steps, warmup steps) of a run: config.total_steps / warmup_steps, else config.total_epochs /
  warmup_epochs times `steps_per_epoch`. Raises ValueError for a run of no steps."""
  total = config.total_steps if config.total_steps is not None else int(config.total_epochs * steps_per_epoch)
  warmup = config.warmup_steps if config.warmup_steps is not None else int(config.warmup_epochs * steps_per_epoch)
  if total < 1:
    raise ValueError(f"the run has {total} steps: check config.total_steps / total_epochs / batch_size")
  return total, warmup


def is_due(step: int, every: int | None, *, last: bool = False) -> bool:
  """Whether an action that runs every `every` steps (None / 0: never periodically) is due at `step` (1-based),
  or `last`: the run's last step, where every action runs once more."""
  return last or bool(every) and step % every == 0
