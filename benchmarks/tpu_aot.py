"""What a TPU would make of our steps, measured by the TPU compiler on any machine (no TPU needed).

  pip install -e ".[tpu]"     # libtpu: its compiler runs on a CPU host
  python benchmarks/tpu_aot.py --model ge2mst_small --topology v5e:2x2 --global_batch 1024 --dtype bfloat16
  python benchmarks/tpu_aot.py --model ge2mst_large --topology v5e:4x4 --global_batch 4096 --fsdp 16
  python benchmarks/tpu_aot.py --smoke                # ge2mst_tiny @32, global batch 8, v5e:2x2 (the test)
  python benchmarks/tpu_aot.py --model ge2mst_small --global_batch 256 --blocks 2:1:2,2:2:3   # blocks alone

The train step is the one train.py runs (`train_lib.make_train_step` on configs/imagenet2012's
recipe: AdamW, mixup/CutMix, label smoothing), the forward steps the one eval.py runs
(`evaluators.make_eval_step`, once with mode 'quantize', once with 'spike'). They are lowered on
`jax.ShapeDtypeStruct`s carrying `NamedSharding`s over a mesh of abstract TPU devices
(`jax.experimental.topologies.get_topology_desc`, as MaxText's train_compile.py does), so nothing
is allocated or initialised, and compiled by libtpu. From the compiled program:

- `memory_analysis()`: per-chip peak bytes = arguments + outputs + temporaries - donated aliases;
- `cost_analysis()`: FLOPs and "bytes accessed" of the per-chip (partitioned) program, divided
  by the per-chip batch: the per-image figures;
- `as_text()`: how many of each collective the step issues, and the same operand and output bytes
  as cost analysis split by the memory each buffer lives in (`hlo_traffic.py`): `hlo_hbm_*` is
  what moves to or from HBM; cost analysis also counts buffers kept in on-chip VMEM.

The roofline is min(peak bf16 FLOP/s / FLOPs per image, HBM bandwidth / HBM bytes per image):
images/s per chip that the chip could not exceed with this program. It is a bound, not a timing.
"""
import os
import sys

# libtpu reads these when the topology is created, and JAX its platform list when it is imported:
# both must be set before `bench_lib` imports JAX. JAX itself runs on the CPU (the host's devices
# are only needed for the record's machine fields); the TPU compiler is reached through the
# topology, as in MaxText's train_compile.py and AXLearn's AOT compile.
_GENERATIONS = {}   # filled below; read by tpu_environment


def tpu_environment(topology: str) -> dict:
  """Environment variables libtpu needs on a host without TPUs, for `topology` (e.g. 'v5e:2x2')."""
  gen, dims = parse_topology(topology)
  chips = int(__import__("math").prod(dims))
  return {"JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
          "TPU_ACCELERATOR_TYPE": _GENERATIONS[gen]["accelerator_type"](chips)}


def parse_topology(topology: str) -> tuple[str, tuple[int, ...]]:
  """'v5e:2x2' -> ('v5e', (2, 2)); a clear error naming the known generations otherwise."""
  gen, _, shape = topology.partition(":")
  if gen not in _GENERATIONS:
    raise SystemExit(f"error: unknown TPU generation in --topology={topology!r}: use one of "
                     f"{', '.join(g + ':' + s['example'] for g, s in _GENERATIONS.items())}.")
  try:
    dims = tuple(int(d) for d in shape.split("x"))
  except ValueError:
    dims = ()
  if len(dims) != _GENERATIONS[gen]["ndim"] or min(dims, default=0) < 1:
    raise SystemExit(f"error: --topology={topology!r}: {gen} topologies have {_GENERATIONS[gen]['ndim']} "
                     f"dimensions, e.g. {gen}:{_GENERATIONS[gen]['example']}.")
  return gen, dims


# Per-chip figures, from the vendor's published specification tables (Google Cloud TPU docs,
# "TPU v5e" https://cloud.google.com/tpu/docs/v5e, "TPU v5p" https://cloud.google.com/tpu/docs/v5p,
# "TPU v6e" https://cloud.google.com/tpu/docs/v6e; checked 2026-11-25): peak bf16 FLOP/s, HBM
# capacity and HBM bandwidth. Capacities as the tables give them, in decimal GB (the chips hold
# GiB: the fraction of HBM we report errs on the full side). v5p has two TensorCores per chip,
# driven as one JAX device ("megacore"); its accelerator type counts cores (v5p-8 = 4 chips).
_GENERATIONS.update({
    "v5e": dict(libtpu_name="v5e", chip_config="default", ndim=2, example="2x2",
                accelerator_type=lambda chips: f"v5litepod-{chips}",
                peak_flops=197e12, hbm_bytes=16e9, hbm_bandwidth=819e9),
    "v5p": dict(libtpu_name="v5", chip_config="megacore", ndim=3, example="2x2x1",
                accelerator_type=lambda chips: f"v5p-{2 * chips}",
                peak_flops=459e12, hbm_bytes=95e9, hbm_bandwidth=2765e9),
    "v6e": dict(libtpu_name="v6e", chip_config="default", ndim=2, example="2x2",
                accelerator_type=lambda chips: f"v6e-{chips}",
                peak_flops=918e12, hbm_bytes=32e9, hbm_bandwidth=1638e9),
})
CHIP_SPECS = {g: {k: s[k] for k in ("peak_flops", "hbm_bytes", "hbm_bandwidth")} for g, s in _GENERATIONS.items()}


def _topology_arg(argv) -> str:
  for i, a in enumerate(argv):
    if a.startswith("--topology="):
      return a.split("=", 1)[1]
    if a == "--topology" and i + 1 < len(argv):
      return argv[i + 1]
  return "v5e:2x2"


if __name__ == "__main__":
  # Set before bench_lib imports JAX; values the user exported (e.g. on a real TPU VM) win.
  for _k, _v in tpu_environment(_topology_arg(sys.argv[1:])).items():
    os.environ.setdefault(_k, _v)

import re  # noqa: E402
import time  # noqa: E402

import bench_lib  # noqa: E402
import hlo_traffic  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from configs import common as config_common, imagenet2012  # noqa: E402
from ge2mst_jax.train import evaluator as evaluators, loop as train_lib, state as train_state
from ge2mst_jax.nn import models  # noqa: E402
from ge2mst_jax.nn.blocks import REMATS  # noqa: E402
from ge2mst_jax.spiking.forward import Forward  # noqa: E402
from ge2mst_jax.train import sharding as shd  # noqa: E402

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
# An instruction whose op is a collective (async ones counted once, at their -start).
_COLLECTIVE_RE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
STEPS = ("train", "forward_quantize", "forward_spike")


def topology_devices(topology: str) -> list:
  """Abstract TPU devices of `topology`, from libtpu's topology description (no TPU needed)."""
  from jax.experimental import topologies
  gen, dims = parse_topology(topology)
  spec = _GENERATIONS[gen]
  dims3 = tuple(dims) + (1,) * (3 - len(dims))
  # One host drives up to 2x2 chips (MaxText's table: chips_per_host_bounds (2, 2, 1)); links wrap
  # around only on full tori: 16 chips along a v5e/v6e dimension, v5p cubes of 4 and up.
  per_host = tuple(min(d, b) for d, b in zip(dims3, (2, 2, 1)))
  wrap = tuple(d == 16 for d in dims3) if spec["ndim"] == 2 else (min(dims3) >= 4,) * 3
  name = f"{spec['libtpu_name']}:{'x'.join(map(str, dims))}"
  desc = topologies.get_topology_desc(topology_name=name, platform="tpu", chip_config_name=spec["chip_config"],
                                      chips_per_host_bounds=per_host, num_slices=1, wrap=wrap)
  return list(desc.devices)


def make_config(model: str, global_batch: int, dtype: str, fsdp: int, image_size: int | None, remat: str = "none",
                attention: str = "pallas"):
  """configs/imagenet2012's recipe for `model` (what train.py runs on ImageNet) at the model's own
  image size unless `image_size` is given. Depthwise convolutions are grouped convolutions, kernel
  gradients XLA's and GW-SSA's training core the Pallas kernel, as `depthwise='auto'`,
  `conv_kernel_grad='auto'` and `attention_kernel='auto'` build them on a TPU host (this process's
  JAX backend is the CPU); `attention='xla'` compiles the einsums instead."""
  size = image_size or models.arch_config(model).image_size
  cfg = imagenet2012.get_config(f"{model.removeprefix('ge2mst_')},batch={global_batch}")
  cfg.model.name = model
  cfg.model.arch = config_common.arch_dict(model, image_size=size, dtype=dtype, depthwise="conv",
                                             conv_kernel_grad="conv", attention_kernel=attention, remat=remat)
  cfg.data.image_size = size
  cfg.eval_batch_size = global_batch
  cfg.mesh.fsdp = fsdp
  return cfg


def abstract(tree, shardings):
  """`jax.ShapeDtypeStruct`s with the given shardings for every leaf of `tree` (arrays or shapes)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def collective_counts(hlo: str) -> dict:
  """How many instructions of each collective the compiled program holds."""
  counts = dict.fromkeys(COLLECTIVES, 0)
  for op in _COLLECTIVE_RE.findall(hlo):
    counts[op] += 1
  return counts


def analyse(compiled, per_chip_batch: int, chip: dict) -> tuple[dict, str]:
  """Per-chip memory, per-image FLOPs and HBM bytes, the roofline and collective counts."""
  ma = compiled.memory_analysis()
  args, out, temp, alias = (int(getattr(ma, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias"))
  peak = args + out + temp - alias
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca   # older JAX: one dict per program
  flops, hbm = float(ca["flops"]), float(ca["bytes accessed"])
  f_img, b_img = flops / per_chip_batch, hbm / per_chip_batch
  compute_rate, memory_rate = chip["peak_flops"] / f_img, chip["hbm_bandwidth"] / b_img
  text = compiled.as_text()
  moved = hlo_traffic.traffic(text)
  hlo_hbm_img = moved["hbm_bytes"] / per_chip_batch
  row = {"argument_bytes": args, "output_bytes": out, "temp_bytes": temp, "alias_bytes": alias,
         "peak_bytes_per_chip": peak, "peak_gb_per_chip": peak / 1e9, "hbm_fraction": peak / chip["hbm_bytes"],
         "fits_hbm": peak <= chip["hbm_bytes"],
         "flops_per_chip": flops, "hbm_bytes_per_chip": hbm,
         "flops_per_image": f_img, "gflops_per_image": f_img / 1e9,
         "hbm_bytes_per_image": b_img, "hbm_gb_per_image": b_img / 1e9,
         "arithmetic_intensity": flops / hbm,
         "roofline_images_per_s_per_chip": min(compute_rate, memory_rate),
         "bound": "memory" if memory_rate < compute_rate else "compute",
         "roofline_fraction_of_peak_flops": min(compute_rate, memory_rate) * f_img / chip["peak_flops"],
         # The same sum split by memory space from the compiled HLO (hlo_traffic.py): cost analysis
         # also counts buffers the compiler placed in on-chip VMEM, which never touch HBM.
         "hlo_hbm_bytes_per_image": hlo_hbm_img, "hlo_hbm_gb_per_image": hlo_hbm_img / 1e9,
         "hlo_on_chip_gb_per_image": moved["on_chip_bytes"] / per_chip_batch / 1e9,
         "hlo_while_loops": moved["while_loops"],
         "hlo_hbm_roofline_images_per_s_per_chip": min(compute_rate, chip["hbm_bandwidth"] / hlo_hbm_img),
         **{f"n_{op.replace('-', '_')}": n for op, n in collective_counts(text).items()}}
  return row, text


def probe(model: str, topology: str, global_batch: int, dtype: str, fsdp: int, steps=STEPS,
          image_size: int | None = None, hlo_dir: str | None = None, remat: str = "none",
          attention: str = "pallas") -> list[dict]:
  """Compiles `steps` for `topology` and returns one row per step."""
  gen, _ = parse_topology(topology)
  devices = topology_devices(topology)
  n = len(devices)
  if global_batch % n:
    raise SystemExit(f"error: --global_batch={global_batch} is not divisible by the {n} chips of {topology}: "
                     f"use a multiple of {n}.")
  if fsdp == -1:
    fsdp = n
  if fsdp < 1 or n % fsdp:
    raise SystemExit(f"error: --fsdp={fsdp} does not divide the {n} chips of {topology}: choose a divisor of {n}.")
  mesh = shd.make_mesh(fsdp, devices=devices)   # the project's (data, fsdp) mesh over the abstract chips
  cfg = make_config(model, global_batch, dtype, fsdp, image_size, remat, attention)
  # (not train_lib.validate_config: it checks that the data set is prepared, which the steps never read)
  setup = train_state.abstract_train_state(cfg, mesh)   # shapes only: nothing initialised
  state = abstract(setup.abstract, setup.shardings)
  size = cfg.data.image_size
  image = jax.ShapeDtypeStruct((global_batch, size, size, 3), np.float32, sharding=shd.batch_sharding(mesh, 4))
  labels = jax.ShapeDtypeStruct((global_batch,), np.int32, sharding=shd.batch_sharding(mesh, 1))
  base = {"model": model, "topology": topology, "chips": n, "dtype": dtype, "global_batch": global_batch,
          "per_chip_batch": global_batch // n, "fsdp": fsdp, "image_size": size, "remat": remat,
          "attention_kernel": attention,
          "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(setup.abstract, nnx.Param))))}
  rows = []
  for step in steps:
    if step == "train":
      fn, args = train_lib.make_train_step(cfg, setup), (state, {"image": image, "label": labels})
    else:   # the step eval.py runs, one mode at a time; its arguments include the optimizer state
      mode = step.removeprefix("forward_")
      fn = evaluators.make_eval_step(cfg, setup, (mode,))
      _, metrics = nnx.split(nnx.eval_shape(lambda: evaluators.EvalMetrics((mode,), cfg.data.num_classes)))
      metrics = abstract(metrics, jax.tree.map(lambda _: NamedSharding(mesh, P()), metrics))
      mask = jax.ShapeDtypeStruct((global_batch,), np.bool_, sharding=shd.batch_sharding(mesh, 1))
      args = (state, metrics, {"image": image, "label": labels, "mask": mask})
    t = time.perf_counter()
    lowered = fn.lower(*args)
    lower_s = time.perf_counter() - t
    t = time.perf_counter()
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      # The compiler refuses a program whose buffers exceed the chip's HBM: that is a result
      # (the step does not fit at this batch), recorded with the compiler's own figures.
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      message = str(e).strip().splitlines()[0]
      needed = re.search(r"required for HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", message)
      rows.append({**base, "step": step, "fits_hbm": False, "error": message,
                   "compiler_temp_gib": float(needed.group(1)) if needed else None,
                   "compiler_available_gib": float(needed.group(2)) if needed else None,
                   "lower_s": lower_s, "compile_s": time.perf_counter() - t})
      print(f"{step}: does not fit: {message}", flush=True)
      continue
    compile_s = time.perf_counter() - t
    row, text = analyse(compiled, global_batch // n, CHIP_SPECS[gen])
    row = {**base, "step": step, **row, "lower_s": lower_s, "compile_s": compile_s}
    if hlo_dir:
      os.makedirs(hlo_dir, exist_ok=True)
      name = f"{model}_{topology.replace(':', '-')}_{dtype}_b{global_batch}_fsdp{fsdp}_{step}.hlo"
      row["hlo_file"] = os.path.join(hlo_dir, name)
      with open(row["hlo_file"], "w") as f:
        f.write(text)
    print(f"{step}: compiled in {compile_s:.1f} s", flush=True)
    rows.append(row)
  return rows


def parse_blocks(spec: str, net) -> tuple[int, int, int]:
  """'2:1:2' -> (stage index 1, blocks 1..2 exclusive) of `net`; a one-line error otherwise."""
  try:
    stage, a, b = (int(v) for v in spec.split(":"))
  except ValueError:
    stage = a = b = -1
  n_stages = len(net.stages)
  if not 1 <= stage <= n_stages or not 0 <= a < b <= len(net.stages[stage - 1]):
    sizes = ", ".join(f"stage {i + 1}: {len(st)}" for i, st in enumerate(net.stages))
    raise SystemExit(f"error: --blocks={spec!r}: use STAGE:FIRST:END with 1 <= STAGE <= {n_stages} and "
                     f"0 <= FIRST < END <= the stage's block count ({sizes}).")
  return stage - 1, a, b


def block_network(model: str, per_chip_batch: int, dtype: str, image_size: int | None, remat: str, specs: str,
                  attention: str = "pallas"):
  """`(cfg, network shapes, [(stage, first, end), ...])` for `--blocks`; a bad range is a one-line
  error, raised before libtpu starts."""
  cfg = make_config(model, per_chip_batch, dtype, 1, image_size, remat, attention)
  net = nnx.eval_shape(lambda: models.model_from_config(cfg))
  return cfg, net, [parse_blocks(spec, net) for spec in filter(None, specs.split(","))]


def probe_blocks(cfg, net, ranges, topology: str, hlo_dir: str | None = None) -> list[dict]:
  """One row per `(stage, first, end)` of `ranges` (`block_network`), each compiled alone on one
  chip of `topology`: where a whole step's bytes go, block by block, at a fraction of its compile
  time.

  The blocks run as in the train step (quantize mode, a traced alpha, batch statistics, the
  model's remat) on an input of the shape and dtype the preceding layers hand them, with a
  float32 cotangent on their output; gradients are taken for their parameters and their input."""
  gen, _ = parse_topology(topology)
  rep = NamedSharding(jax.sharding.Mesh(np.array(topology_devices(topology)[:1]), ("data",)), P())
  return [_probe_block(cfg, net, r, topology, CHIP_SPECS[gen], rep, hlo_dir) for r in ranges]


def _probe_block(cfg, net, block_range, topology, chip, rep, hlo_dir) -> dict:
  stage, a, b = block_range
  model, dtype, remat = cfg.model.name, cfg.model.arch.dtype, cfg.model.arch.remat
  per_chip_batch, size = cfg.batch_size, cfg.data.image_size
  chosen = list(net.stages[stage])[a:b]

  def block_input(net, images):   # what the blocks before `a` hand on (shapes only)
    x = net.stem(images.astype(np.float32))
    for si, stage_blocks in enumerate(net.stages):
      for bi, block in enumerate(stage_blocks):
        if (si, bi) == (stage, a):
          return x
        x = block(x, Forward.of("quantize", 0.5))

  graphdef, params = nnx.split(net)
  x = jax.eval_shape(lambda p, i: block_input(nnx.merge(graphdef, p), i), params,
                     jax.ShapeDtypeStruct((per_chip_batch, size, size, 3), np.float32))
  graphdef, params = nnx.split(nnx.List(chosen))

  def forward(params, x, alpha):
    blocks = nnx.merge(graphdef, params)
    for block in blocks:
      x = models.call_block(block, x, Forward.of("quantize", alpha), remat=remat)
    return x, nnx.state(blocks)

  def step(params, x, cotangent, alpha):
    def loss(params, x):
      y, new_params = forward(params, x, alpha)
      return jax.numpy.sum(y.astype(np.float32) * cotangent), new_params
    (_, new_params), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return new_params, grads

  shaped = lambda t: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=rep)
  params, x = jax.tree.map(shaped, params), shaped(x)
  y = jax.eval_shape(forward, params, x, np.float32(0.5))[0]
  args = (params, x, shaped(jax.ShapeDtypeStruct(y.shape, np.float32)), shaped(jax.ShapeDtypeStruct((), np.float32)))
  t = time.perf_counter()
  compiled = jax.jit(step).lower(*args).compile()
  compile_s = time.perf_counter() - t
  row, text = analyse(compiled, per_chip_batch, chip)
  name = f"blocks {stage + 1}:{a}:{b}"
  kinds = [type(block).__name__ for block in chosen]
  row = {"model": model, "topology": topology, "chips": 1, "dtype": dtype, "global_batch": per_chip_batch,
         "per_chip_batch": per_chip_batch, "fsdp": 1, "image_size": size, "remat": remat,
         "attention_kernel": cfg.model.arch.attention_kernel, "step": name,
         "blocks": kinds, "block_input_shape": list(x.shape), **row, "compile_s": compile_s}
  if hlo_dir:
    os.makedirs(hlo_dir, exist_ok=True)
    row["hlo_file"] = os.path.join(hlo_dir, f"{model}_{dtype}_b{per_chip_batch}_blocks{stage + 1}-{a}-{b}.hlo")
    with open(row["hlo_file"], "w") as f:
      f.write(text)
  print(f"{name} ({', '.join(kinds)}): compiled in {compile_s:.1f} s", flush=True)
  return row


def main(argv=None):
  p = bench_lib.arg_parser(__doc__)
  p.add_argument("--model", default="ge2mst_small", help="a family member: ge2mst_small|base|large, ge2mst_tiny, ...")
  p.add_argument("--topology", default="v5e:2x2",
                 help="v5e:AxB, v6e:AxB or v5p:AxBxC (libtpu's v5:AxBxC), e.g. v5e:2x2, v6e:4x4, v5p:2x2x1")
  p.add_argument("--global_batch", type=int, default=1024)
  p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
  p.add_argument("--fsdp", type=int, default=1, help="size of the mesh's fsdp axis (-1: all chips)")
  p.add_argument("--steps", default=",".join(STEPS), help="which of " + ",".join(STEPS))
  p.add_argument("--image_size", type=int, default=None, help="default: the model's own")
  p.add_argument("--remat", default="none", choices=list(REMATS),
                 help="the model's remat option: 'block' keeps only synaptic sums and BatchNorm statistics")
  p.add_argument("--attention", default="pallas", choices=["pallas", "xla"],
                 help="GW-SSA's training core: the Pallas kernel (what a TPU runs by default) or XLA's einsums")
  p.add_argument("--hlo_dir", default=None, help="also write each compiled program's HLO text here")
  p.add_argument("--blocks", default=None, metavar="STAGE:FIRST:END[,...]",
                 help="instead of the steps: the train forward+backward of blocks [FIRST, END) of STAGE (1-4) "
                      "alone, on one chip at --global_batch images, e.g. 2:1:2 for Stage 2's first GW-SSA block; "
                      "several ranges, comma-separated, give one row each")
  a = p.parse_args(argv)
  for k, v in tpu_environment(a.topology).items():   # main() called from Python: before JAX starts, if not yet
    os.environ.setdefault(k, v)
  steps = tuple(s for s in a.steps.split(",") if s)
  if bad := [s for s in steps if s not in STEPS]:
    raise SystemExit(f"error: --steps: unknown {bad}; use some of {','.join(STEPS)}.")
  if a.smoke:
    a.model, a.global_batch, a.image_size = "ge2mst_tiny", 8, 32
  if a.blocks:   # the network's shapes only: a bad range fails before libtpu starts
    blocks = block_network(a.model, a.global_batch, a.dtype, a.image_size, a.remat, a.blocks, a.attention)
  try:
    import libtpu  # noqa: F401
  except ImportError:
    raise SystemExit('error: libtpu is not installed: pip install -e ".[tpu]" (the TPU compiler; no TPU needed).')
  if a.blocks:
    rows = probe_blocks(*blocks, a.topology, a.hlo_dir)
  else:
    rows = probe(a.model, a.topology, a.global_batch, a.dtype, a.fsdp, steps, a.image_size, a.hlo_dir, a.remat,
                 a.attention)
  bench_lib.print_table(rows, [("step", "step", "s"), ("topology", "topology", "s"), ("batch", "global_batch", "d"),
                               ("fsdp", "fsdp", "d"), ("GB/chip", "peak_gb_per_chip", ".2f"),
                               ("of HBM", "hbm_fraction", ".0%"), ("GFLOP/img", "gflops_per_image", ".2f"),
                               ("HBM GB/img", "hbm_gb_per_image", ".3f"),
                               ("HLO HBM GB/img", "hlo_hbm_gb_per_image", ".3f"),
                               ("roofline img/s/chip", "roofline_images_per_s_per_chip", ".0f"),
                               ("all-red", "n_all_reduce", "d"), ("all-gath", "n_all_gather", "d"),
                               ("red-scat", "n_reduce_scatter", "d"), ("coll-perm", "n_collective_permute", "d"),
                               ("all-to-all", "n_all_to_all", "d"), ("compile s", "compile_s", ".1f")])
  remat = "" if a.remat == "none" else f"_remat-{a.remat}"
  remat += "" if a.attention == "pallas" else f"_attn-{a.attention}"
  part = "" if not a.blocks else "_blocks" if "," in a.blocks else f"_blocks{a.blocks.replace(':', '-')}"
  name = ("tpu_aot" + part if a.smoke else
          f"tpu_aot_{a.model}_{a.topology.replace(':', '-')}_{a.dtype}_b{a.global_batch}_fsdp{rows[0]['fsdp']}{remat}{part}")
  path = bench_lib.record(name, rows, a.smoke, a.out, compiler="libtpu " + _libtpu_version(),
                          chip_specs=CHIP_SPECS, chip_specs_source="Google Cloud TPU docs: tpu/docs/v5e, v5p, v6e",
                          roofline="min(peak_flops / flops_per_image, hbm_bandwidth / hbm_bytes_per_image)")
  print(f"wrote {path}")


def _libtpu_version() -> str:
  from importlib import metadata
  for dist in ("libtpu", "libtpu-nightly"):
    try:
      return metadata.version(dist)
    except metadata.PackageNotFoundError:
      pass
  return "unknown"


if __name__ == "__main__":
  main()
