"""Is spike-mode inference spike-driven? Checked on the computation itself, not on the code.

`audit(model, images)` traces the instrumented inference pass (`model(x, mode='spike',
collect=True)`) to a jaxpr and evaluates it equation by equation on the images, recursing
into `jit`, call and custom-derivative sub-jaxprs. Every synaptic operation is looked at
with its actual operand values:
- `dot_general` and `conv_general_dilated` (dense and 1x1 layers, attention products);
- the depthwise convolutions, which `blocks.depthwise_conv2d` writes as k*k shifted copies
  multiplied by a kernel tap (the `mul`s under its `DEPTHWISE_SCOPE`).
An operation is spike-driven when an operand holds spikes only (values in {-1, 0, 1}). Its
SOPs are counted from those spikes: every non-zero spike accumulates once into each output it
reaches, against a partner that is not a spike train (a weight), or once per non-zero partner
spike when both operands are spikes. That is the same operation with operands replaced by
`|spikes|` and ones, summed. The counts are put beside the ones `energy.py` sows in the same
evaluated pass (its own formulas, evaluated on the same spikes), layer by layer.

Operations are attributed to layers by their trace scope (a layer's path, `SynapticConv.scope`);
the SOP counting itself (`blocks.STATS_SCOPE`) is not audited. Expected exceptions: the stem
and the event-frame adapter (real-valued input: pixels, event counts) and, under
`spike_integration='code'`, every synaptic layer (the sum regrouped onto integer codes).
Anything else that is not spike-driven is listed as unexpected.
"""
from __future__ import annotations

import collections
from typing import Any

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ge2mst_jax import energy
from ge2mst_jax.blocks import DEPTHWISE_SCOPE, STATS_SCOPE

SYNAPTIC = ("dot_general", "conv_general_dilated")
# Primitives whose sub-jaxpr is evaluated equation by equation, and the parameter holding it.
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr",
          "remat": "jaxpr", "checkpoint": "jaxpr"}
EXCEPTION_REAL_INPUT = "real-valued input (stem / event adapter)"
EXCEPTION_CODE = "'code' integration (the synaptic sum regrouped onto integer codes)"


def is_spikes(x) -> bool:
  """Whether an operand holds spikes only: floating values in {-1, 0, 1}."""
  x = np.asarray(x)
  return bool(np.issubdtype(x.dtype, np.floating) and np.all((x == 0) | (np.abs(x) == 1)))


def _mask(x, spike: bool):
  """|spikes| of a spike operand (which spikes fire), ones for any other operand (each is reached)."""
  return jnp.abs(jnp.asarray(x, jnp.float32)) if spike else jnp.ones(np.shape(x), jnp.float32)


def _sops(prim: str, params: dict, a, b, spike_a: bool, spike_b: bool) -> float:
  """Accumulates triggered by the non-zero spikes of a synaptic operation (batch total)."""
  ma, mb = _mask(a, spike_a), _mask(b, spike_b)
  if prim == "dot_general":
    reach = jax.lax.dot_general(ma, mb, params["dimension_numbers"], preferred_element_type=jnp.float32)
  elif prim == "conv_general_dilated":
    reach = jax.lax.conv_general_dilated(
        ma, mb, params["window_strides"], params["padding"], params["lhs_dilation"], params["rhs_dilation"],
        params["dimension_numbers"], params["feature_group_count"], params["batch_group_count"],
        preferred_element_type=jnp.float32)
  else:  # a depthwise tap: elementwise
    reach = ma * mb
  # every output element's count is a small exact integer; their sum is taken in float64
  return float(np.sum(np.asarray(reach, np.float64)))


class _Recorder:
  """Collects one record per synaptic operation met while evaluating the jaxpr."""

  def __init__(self):
    self.ops: list[dict] = []
    self.unaudited: list[str] = []

  def visit(self, eqn, scope: str, invals):
    parts = [p for p in scope.split("/") if p]
    if STATS_SCOPE in parts:
      return
    prim = eqn.primitive.name
    depthwise = prim == "mul" and DEPTHWISE_SCOPE in parts
    if prim not in SYNAPTIC and not depthwise:
      sub = [j for j in jcore.jaxprs_in_params(eqn.params)]
      if any(_has_synaptic(j) for j in sub):
        self.unaudited.append(f"{prim} at {scope or '(top level)'}")
      return
    a, b = invals
    spike_a, spike_b = is_spikes(a), is_spikes(b)
    driven = spike_a or spike_b
    self.ops.append({
        "layer": parts[0] if parts else "(unscoped)",
        "primitive": "depthwise mul" if depthwise else prim,
        "shapes": (tuple(np.shape(a)), tuple(np.shape(b))),
        "operands": "×".join("spikes" if s else "values" for s in (spike_a, spike_b)),
        "spike_driven": driven,
        "sops": _sops(prim, eqn.params, a, b, spike_a, spike_b) if driven else 0.0,
    })


def _has_synaptic(jaxpr) -> bool:
  return any(e.primitive.name in SYNAPTIC or any(_has_synaptic(j) for j in jcore.jaxprs_in_params(e.params))
             for e in jaxpr.eqns)


def _eval(jaxpr, consts, args, scope: str, rec: _Recorder):
  """Evaluates `jaxpr` equation by equation (eagerly, on concrete values), recording synaptic ops."""
  env = {}
  read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    name = "/".join(p for p in (scope, str(eqn.source_info.name_stack)) if p)
    param = _CALLS.get(eqn.primitive.name)
    if param is not None and param in eqn.params:
      sub = eqn.params[param]
      closed = sub if isinstance(sub, jcore.ClosedJaxpr) else jcore.ClosedJaxpr(sub, ())
      outs = _eval(closed.jaxpr, closed.consts, invals, name, rec)
    else:
      rec.visit(eqn, name, invals)
      outs = eqn.primitive.bind(*invals, **eqn.params)
      outs = outs if eqn.primitive.multiple_results else [outs]
    for v, x in zip(eqn.outvars, outs):
      if not isinstance(v, jcore.DropVar):
        env[v] = x
  return [read(v) for v in jaxpr.outvars]


def _exception(layer: str, integration: str) -> str | None:
  if layer.split(".")[0] in energy.REAL_INPUT_LAYERS:
    return EXCEPTION_REAL_INPUT
  if integration == "code":
    return EXCEPTION_CODE
  return None


def audit(model, images, mode: str | None = None) -> dict[str, Any]:
  """Audits the spiking inference of `model` on `images` (the model is put in eval mode).

  `mode`: 'spike' (ExpG-IF networks, the default) or 'stbp' (an STBP network's own spikes).
  Returns a dict:
  - `layers`: one row per layer in trace order: `layer`, `ops` (synaptic operations),
    `spike_driven` (how many of them), `primitives` and `operands` (kinds seen, e.g.
    'spikes×values'), `exception` (the expected-exception name, or None), `sops_audit` and
    `sops_energy` (per image), `agree`;
  - `totals`: `ops`, `spike_driven`, `expected_exceptions`, `unexpected`, `sops_audit`,
    `sops_energy` (per image, stem excluded; `sops_audit` is None under 'code'), `sops_agree`,
    `max_abs_sop_diff` (per layer, batch total);
  - `unexpected`: `{layer, primitive, operands, shapes}` of every synaptic operation that is
    neither spike-driven nor an expected exception (empty when the network is spike-driven);
  - `unaudited`: control-flow primitives holding synaptic operations the audit did not open;
  - `mode`, `integration`, `batch`.
  """
  model.eval()
  mode = mode or ("stbp" if model.cfg.paradigm == "stbp" else "spike")
  integration = model.cfg.spike_integration if mode == "spike" else "steps"
  graphdef, state = nnx.split(model)

  def forward(state, x):
    return energy.capture_stats(lambda m, x: m(x, mode=mode, collect=True), nnx.merge(graphdef, state), x)

  rec = _Recorder()
  with jax.default_matmul_precision("highest"):
    closed, shapes = jax.make_jaxpr(forward, return_shape=True)(state, images)
    outs = _eval(closed.jaxpr, closed.consts, jax.tree.leaves((state, images)), "", rec)
  _, flat = jax.tree.unflatten(jax.tree.structure(shapes), outs)

  batch = images.shape[0]
  sown = collections.defaultdict(float)
  for path, v in flat.items():
    layer = energy.sop_layer(path)
    if layer is not None:
      sown[layer] += float(v)
  rows: dict[str, dict] = {}
  unexpected = []
  for op in rec.ops:
    row = rows.setdefault(op["layer"], {"layer": op["layer"], "ops": 0, "spike_driven": 0, "primitives": set(),
                                        "operands": set(), "exception": None, "sops_total": 0.0})
    row["ops"] += 1
    row["spike_driven"] += op["spike_driven"]
    row["primitives"].add(op["primitive"])
    row["operands"].add(op["operands"])
    row["sops_total"] += op["sops"]
    if not op["spike_driven"]:
      row["exception"] = _exception(op["layer"], integration)
      if row["exception"] is None:
        unexpected.append({k: op[k] for k in ("layer", "primitive", "operands", "shapes")})
  for layer in sown.keys() - rows.keys():   # counted by energy.py but no operation found: a disagreement
    rows[layer] = {"layer": layer, "ops": 0, "spike_driven": 0, "primitives": set(), "operands": set(),
                   "exception": None, "sops_total": 0.0}
  out_rows, max_diff = [], 0.0
  for row in rows.values():
    energy_total = sown.get(row["layer"])
    counted = row["exception"] is None        # the audit counts SOPs of spike-driven layers only
    diff = abs(row["sops_total"] - energy_total) if counted and energy_total is not None else 0.0
    if counted and energy_total is None and row["sops_total"] > 0:
      diff = row["sops_total"]
    max_diff = max(max_diff, diff)
    out_rows.append({
        "layer": row["layer"], "ops": row["ops"], "spike_driven": row["spike_driven"],
        "primitives": sorted(row["primitives"]), "operands": sorted(row["operands"]),
        "exception": row["exception"],
        "sops_audit": row["sops_total"] / batch if counted else None,
        "sops_energy": energy_total / batch if energy_total is not None else None,
        "agree": diff == 0.0 if counted else None,
    })
  # under 'code' the synapses see codes, not spikes: the audit has nothing of its own to count
  sops_audit = None if integration == "code" else sum(r["sops_audit"] or 0.0 for r in out_rows)
  sops_energy = sum(r["sops_energy"] or 0.0 for r in out_rows)
  totals = {
      "ops": sum(r["ops"] for r in out_rows),
      "spike_driven": sum(r["spike_driven"] for r in out_rows),
      "expected_exceptions": sum(r["ops"] - r["spike_driven"] for r in out_rows if r["exception"]),
      "unexpected": len(unexpected),
      "sops_audit": sops_audit,
      "sops_energy": sops_energy,
      "sops_agree": max_diff == 0.0 and integration != "code",
      "max_abs_sop_diff": max_diff,
  }
  return {"mode": mode, "integration": integration, "batch": batch, "layers": out_rows, "totals": totals,
          "unexpected": unexpected, "unaudited": rec.unaudited}


def format_audit(result: dict[str, Any]) -> str:
  """A markdown rendering of `audit`'s result: a summary line and the per-layer table."""
  t = result["totals"]
  fmt = lambda v: "—" if v is None else f"{v / 1e6:.4f}"
  lines = [f"Spike-driven audit ({result['mode']} mode, '{result['integration']}' integration, "
           f"{result['batch']} images): {t['spike_driven']} of {t['ops']} synaptic operations spike-driven, "
           f"{t['expected_exceptions']} expected exceptions, **{t['unexpected']} unexpected**; SOPs / image "
           f"{fmt(t['sops_audit'])} M from the operands, {fmt(t['sops_energy'])} M by energy.py"
           f" ({'equal' if t['sops_agree'] else 'not compared' if result['integration'] == 'code' else 'DIFFERENT'}).",
           "",
           "| layer | ops | spike-driven | operation | operands | M SOPs / image (audit) | (energy.py) | note |",
           "|---|---|---|---|---|---|---|---|"]
  for r in result["layers"]:
    note = r["exception"] or ("" if r["spike_driven"] == r["ops"] else "**unexpected**")
    if r["agree"] is False:
      note = (note + "; " if note else "") + "**SOPs differ**"
    lines.append(f"| {r['layer']} | {r['ops']} | {r['spike_driven']} | {', '.join(r['primitives'])} | "
                 f"{', '.join(r['operands'])} | {fmt(r['sops_audit'])} | {fmt(r['sops_energy'])} | {note} |")
  if result["unaudited"]:
    lines += ["", "Not opened by the audit: " + "; ".join(result["unaudited"])]
  return "\n".join(lines)
