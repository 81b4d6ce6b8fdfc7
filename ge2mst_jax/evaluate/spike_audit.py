"""Is spike-mode inference spike-driven? An audit of the program itself, not of the modules.

The spike-mode forward pass is traced to a jaxpr and evaluated equation by equation on real
images. Every synaptic operation — `dot_general`, `conv_general_dilated`, and the multiplies
of the depthwise convolutions (written as shifted multiply-adds, in the 'depthwise' named
scope) — is checked: is one of its operands spikes (every value in {-1, 0, 1})? Its
synaptic operations are counted from the actual non-zero spikes: one accumulate for each
(non-zero spike, output) pair it feeds, or for each pair of non-zero spikes when both
operands are spikes. Those counts are set beside `energy.py`'s, which the layers sow
themselves; the two must agree.

Expected exceptions, named in the result: the real-valued input layers (`stem`, `adapter`: they
see pixels or event counts) and, under `spike_integration='code'`, every synaptic layer (it is
fed the decoded integer code: the same sum regrouped, documented as such). Anything else
driven by non-spike operands is `unexpected`.
"""
from __future__ import annotations

import collections
from typing import Any

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ge2mst_jax.evaluate import energy

SYNAPTIC = ("dot_general", "conv_general_dilated")
# Primitives whose sub-program runs once on the eqn's own operands: evaluated inside, so that
# the operations they wrap are seen (jnp functions are jitted; custom derivatives wrap others).
_CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr"}


def is_spikes(x) -> jax.Array:
  """Whether every value is in {-1, 0, 1} (binary or ternary spikes)."""
  return jnp.all((x == 0) | (x == 1) | (x == -1))


def _layer(stack: str, layers: set) -> str:
  """The innermost named scope of `stack` that is a layer of the network ('' if none)."""
  for part in reversed(stack.split("/")):
    if part in layers:
      return part
  return ""


def _accumulates(eqn, operands, spike_flags) -> jax.Array:
  """Accumulates of a synaptic op: the op itself on 0/1 indicators of the non-zero spikes
  (spike operands) and on ones (the weights), summed; 0 when neither operand is spikes."""
  ind = [jnp.where(f, x != 0, True).astype(jnp.float32) for x, f in zip(operands, spike_flags)]
  if eqn.primitive.name == "mul":
    out = ind[0] * ind[1]
  else:
    params = dict(eqn.params, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)
    out = eqn.primitive.bind(*ind, **params)
  return jnp.where(spike_flags[0] | spike_flags[1], jnp.sum(out, dtype=jnp.float32), 0.0)


class _Interpreter:
  """Re-traces a jaxpr equation by equation, adding for every synaptic operation whether its
  operands are spikes and how many accumulates they trigger. Run under `jax.jit`, so that the
  audit compiles once and evaluates on device like the forward pass (eagerly it would dispatch
  one small program per equation: tens of seconds even for ge2mst_tiny)."""

  def __init__(self, layers: set):
    self.layers, self.records, self.values = layers, [], []

  def run(self, jaxpr, consts, args, stack=""):
    env = {}
    read = lambda v: v.val if isinstance(v, jex.Literal) else env[v]
    for v, x in zip(jaxpr.constvars, consts):
      env[v] = x
    for v, x in zip(jaxpr.invars, args):
      env[v] = x
    for eqn in jaxpr.eqns:
      inner = f"{stack}/{eqn.source_info.name_stack}"
      vals = [read(v) for v in eqn.invars]
      sub = eqn.params.get(_CALLS.get(eqn.primitive.name, ""), None)
      if sub is not None:
        closed = sub if isinstance(sub, jex.ClosedJaxpr) else jex.ClosedJaxpr(sub, ())
        out = self.run(closed.jaxpr, closed.consts, vals, inner)
      else:
        if _contains_synaptic(eqn):
          raise NotImplementedError(f"spike audit: cannot look inside {eqn.primitive.name} (at {inner}), which holds "
                                    f"synaptic operations.")
        out = eqn.primitive.bind(*vals, **eqn.params)
        out = out if eqn.primitive.multiple_results else [out]
        self._record(eqn, vals, inner)
      for v, x in zip(eqn.outvars, out):
        env[v] = x
    return [read(v) for v in jaxpr.outvars]

  def _record(self, eqn, vals, stack):
    name = eqn.primitive.name
    depthwise = name == "mul" and "depthwise" in stack.split("/")
    if name not in SYNAPTIC and not depthwise:
      return
    flags = [is_spikes(v) for v in vals[:2]]
    self.records.append({"layer": _layer(stack, self.layers), "op": "depthwise_mul" if depthwise else name})
    self.values.append((flags[0], flags[1], _accumulates(eqn, vals[:2], flags)))


def _contains_synaptic(eqn) -> bool:
  for sub in jex.jaxprs_in_params(eqn.params):
    for e in sub.eqns:
      if e.primitive.name in SYNAPTIC or _contains_synaptic(e):
        return True
  return False


def audit(model: nnx.Module, images, energy_sops: dict | None = None) -> dict[str, Any]:
  """The spike-driven audit of `model(images, mode='spike')` (BatchNorm on running statistics;
  the caller's model is left as it was). Returns per-layer rows, totals, exceptions.

  `energy_sops`: `energy_report(model, images)['sops_per_layer']` when the caller already has it
  (eval.py does): the instrumented spike pass is then not run a second time."""
  if model.cfg.paradigm != "expg":
    raise ValueError(f"The spike audit checks ExpG-IF spike mode; this is a {model.cfg.paradigm!r} network, whose "
                     f"LIF layers are spiking in training already: evaluate it with mode='stbp'.")
  model = energy._in_eval_mode(model)
  arch = model.cfg
  graphdef, state = nnx.split(model)
  layers = {m.scope for _, m in nnx.iter_graph(model) if hasattr(m, "scope")}
  layers |= {f"{s}.{p}" for s in layers for p in ("qk", "av")}
  images = jnp.asarray(images)
  closed = jax.make_jaxpr(lambda st, x: nnx.merge(graphdef, st)(x, mode="spike"))(state, images)
  interp = _Interpreter(layers)

  @jax.jit
  def evaluate(leaves):
    interp.records, interp.values = [], []
    interp.run(closed.jaxpr, closed.consts, leaves)
    return interp.values

  values = jax.device_get(evaluate(jax.tree.leaves((state, images))))
  for r, (spike_a, spike_b, acc) in zip(interp.records, values):
    r.update(spike_operands=int(spike_a) + int(spike_b), accumulates=float(acc))
  batch = images.shape[0]
  if energy_sops is None:
    _, flat = energy.instrumented_forward(model, images, mode="spike")
    energy_sops = energy.summarize(jax.device_get(flat), None, batch, arch.T)["sops_per_layer"]
  sops = energy_sops
  rows = collections.OrderedDict()
  for r in interp.records:
    row = rows.setdefault(r["layer"], {"layer": r["layer"], "ops": 0, "spike_driven_ops": 0, "both_spikes": 0,
                                       "audit_sops_per_image": 0.0})
    row["ops"] += 1
    row["spike_driven_ops"] += r["spike_operands"] > 0
    row["both_spikes"] += r["spike_operands"] == 2
    row["audit_sops_per_image"] += r["accumulates"] / batch
  code = arch.spike_integration == "code"
  unexpected = []
  for row in rows.values():
    row["energy_sops_per_image"] = float(sops.get(row["layer"], 0.0))
    real_input = row["layer"].split(".")[0] in energy.REAL_INPUT_LAYERS
    row["operands"] = ("spikes" if row["spike_driven_ops"] == row["ops"] else
                       "pixels (real-valued input layer)" if real_input else
                       "integer codes ('code' regrouping)" if code else "NOT SPIKES")
    if row["operands"] == "NOT SPIKES":
      unexpected.append(row["layer"])
  audited = [r for r in rows.values() if r["operands"] == "spikes"]
  return {
      "images": int(batch), "spike_integration": arch.spike_integration, "layers": list(rows.values()),
      "synaptic_ops": sum(r["ops"] for r in rows.values()),
      "spike_driven_ops": sum(r["spike_driven_ops"] for r in rows.values()),
      "expected_exceptions": [r["layer"] for r in rows.values() if r["operands"] not in ("spikes", "NOT SPIKES")],
      "unexpected": unexpected,
      "audit_sops_per_image": sum(r["audit_sops_per_image"] for r in audited),
      "energy_sops_per_image": float(sum(sops.values())),
      "sops_match": all(np.isclose(r["audit_sops_per_image"], r["energy_sops_per_image"], rtol=1e-6) for r in audited),
  }


def markdown_table(result: dict) -> str:
  """The per-layer table of an audit, for report.md and the documentation."""
  lines = [f"Spike audit ({result['images']} images, spike_integration='{result['spike_integration']}'): "
           f"{result['spike_driven_ops']} of {result['synaptic_ops']} synaptic operations driven by spikes; "
           f"unexpected: {', '.join(result['unexpected']) or 'none'}; SOPs "
           f"{'agree with' if result['sops_match'] else 'DIFFER from'} energy.py's.", "",
           "| layer | ops | operands | spike × spike | SOPs / image (audit) | SOPs / image (energy.py) |",
           "|---|---|---|---|---|---|"]
  lines += [f"| {r['layer'] or '?'} | {r['ops']} | {r['operands']} | {r['both_spikes']} | "
            f"{r['audit_sops_per_image']:,.0f} | {r['energy_sops_per_image']:,.0f} |" for r in result["layers"]]
  return "\n".join(lines)
