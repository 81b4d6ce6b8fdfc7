"""Fault injection for the tests, kept out of the production step: wrap the train step that
`train_lib.train_and_evaluate` builds, and change what its `n`-th call does."""
from ge2mst_jax.train import loop as train_lib


def on_train_call(monkeypatch, n: int, fault) -> None:
  """The loop's `n`-th train step call runs `fault(step_fn, state, batch)` instead of the step."""
  real = train_lib.make_train_step

  def make(cfg, setup):
    step_fn, calls = real(cfg, setup), [0]

    def wrapped(state, batch):
      calls[0] += 1
      return fault(step_fn, state, batch) if calls[0] == n else step_fn(state, batch)
    return wrapped

  monkeypatch.setattr(train_lib, "make_train_step", make)


def interrupt(step_fn, state, batch):
  """The process dies in this step (as on Ctrl-C or a crash): no graceful save."""
  raise KeyboardInterrupt
